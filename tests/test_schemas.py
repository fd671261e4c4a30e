"""The contract in code: camera conventions and conversions, records, window ids, cache layout."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cameo_corr.schemas import (
    CACHE_ARRAYS,
    MANIFEST_COLUMNS,
    SCHEMA_VERSION,
    CacheConfig,
    FrameRecord,
    SceneRecord,
    SchemaError,
    camera_centers,
    intrinsics_from_normalized,
    intrinsics_to_normalized,
    invert_extrinsics,
    make_extrinsics,
    manifest_schema,
    opencv_to_pytorch3d,
    pixel_centers,
    pixel_to_token,
    project,
    pytorch3d_to_opencv,
    token_coords,
    unproject_depth,
    validate_camera,
    validate_window_arrays,
    window_id,
)

seeds = st.integers(0, 2**31 - 1)
sizes = st.tuples(st.integers(16, 2000), st.integers(16, 2000))  # (H, W)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


# ------------------------------------------------------------------------------------ intrinsics
@settings(max_examples=50, deadline=None)
@given(sizes, st.tuples(*[st.floats(0.05, 3.0)] * 2, *[st.floats(-0.5, 1.5)] * 2))
def test_normalized_intrinsics_round_trip(hw: tuple[int, int], f: tuple[float, ...]) -> None:
    H, W = hw
    K = intrinsics_from_normalized(*f, width=W, height=H)
    np.testing.assert_allclose([K[0, 0], K[1, 1], K[0, 2], K[1, 2]], [f[0] * W, f[1] * H, f[2] * W, f[3] * H])
    np.testing.assert_allclose(intrinsics_to_normalized(K, W, H), f, rtol=1e-12)


def test_normalized_principal_point_half_is_image_centre() -> None:
    K = intrinsics_from_normalized(0.5, 0.8, 0.5, 0.5, width=384, height=256)
    uv, _ = project(np.array([0.0, 0.0, 3.0]), K, np.eye(4))
    np.testing.assert_allclose(uv, [192.0, 128.0])  # image centre, pixel corners at integers


# ------------------------------------------------------------------------------- PyTorch3D cameras
def _p3d_camera(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    R = _rotation(rng)
    T = rng.normal(size=3) + np.array([0.0, 0.0, 6.0])
    focal = rng.uniform(0.5, 4.0, size=2)
    pp = rng.uniform(-0.3, 0.3, size=2)
    return R, T, focal, pp


def _p3d_project(X: np.ndarray, R: np.ndarray, T: np.ndarray, focal, pp, hw, fmt: str) -> np.ndarray:
    """Pixels by PyTorch3D's own math: row-vector camera, NDC with +X left / +Y up, then to pixels."""
    H, W = hw
    Xc = X @ R + T
    ndc = np.stack([focal[0] * Xc[:, 0] / Xc[:, 2] + pp[0], focal[1] * Xc[:, 1] / Xc[:, 2] + pp[1]], axis=-1)
    if fmt == "ndc_isotropic":  # the shorter side spans [-1, 1]
        half = np.array([min(H, W) / 2.0] * 2)
    else:  # ndc_norm_image_bounds: both sides span [-1, 1]
        half = np.array([W / 2.0, H / 2.0])
    return np.array([W / 2.0, H / 2.0]) - ndc * half


@settings(max_examples=50, deadline=None)
@given(seeds, sizes, st.sampled_from(["ndc_isotropic", "ndc_norm_image_bounds"]))
def test_pytorch3d_projection_matches_opencv(seed: int, hw: tuple[int, int], fmt: str) -> None:
    rng = np.random.default_rng(seed)
    R, T, focal, pp = _p3d_camera(rng)
    K, E = pytorch3d_to_opencv(R, T, focal, pp, hw, fmt)
    validate_camera(K, E, where="test")
    X = rng.normal(size=(30, 3))
    z_p3d = (X @ R + T)[:, 2]
    X = X[z_p3d > 0.1]
    uv, z = project(X, K, E)
    np.testing.assert_allclose(uv, _p3d_project(X, R, T, focal, pp, hw, fmt), rtol=1e-9, atol=1e-7)
    np.testing.assert_allclose(z, (X @ R + T)[:, 2], rtol=1e-12)


@settings(max_examples=50, deadline=None)
@given(seeds, sizes)
def test_pytorch3d_opencv_round_trip(seed: int, hw: tuple[int, int]) -> None:
    rng = np.random.default_rng(seed)
    R, T, focal, pp = _p3d_camera(rng)
    K, E = pytorch3d_to_opencv(R, T, focal, pp, hw)
    R2, T2, f2, p2 = opencv_to_pytorch3d(K, E, hw)
    for a, b in ((R2, R), (T2, T), (f2, focal), (p2, pp)):
        np.testing.assert_allclose(a, b, atol=1e-12)
    K3, E3 = pytorch3d_to_opencv(R2, T2, f2, p2, hw)
    np.testing.assert_allclose(K3, K)
    np.testing.assert_allclose(E3, E)


def test_unknown_intrinsics_format_is_an_error() -> None:
    with pytest.raises(SchemaError) as e:
        pytorch3d_to_opencv(np.eye(3), np.zeros(3), (1, 1), (0, 0), (10, 10), "screen")
    assert e.value.field == "intrinsics_format"


# ---------------------------------------------------------------------- projection and extrinsics
@settings(max_examples=30, deadline=None)
@given(seeds, st.integers(2, 40), st.integers(2, 40))
def test_project_unproject_hits_pixel_centres(seed: int, H: int, W: int) -> None:
    rng = np.random.default_rng(seed)
    K = np.array([[rng.uniform(10, 100), rng.uniform(-1, 1), rng.uniform(0, W)],
                  [0.0, rng.uniform(10, 100), rng.uniform(0, H)], [0.0, 0.0, 1.0]])
    E = make_extrinsics(_rotation(rng), rng.normal(size=3))
    depth = rng.uniform(0.5, 20.0, size=(H, W))
    uv, z = project(unproject_depth(depth, K, E), K, E)
    np.testing.assert_allclose(uv, pixel_centers(H, W), atol=1e-8)
    np.testing.assert_allclose(uv[0, 0], [0.5, 0.5], atol=1e-8)
    np.testing.assert_allclose(z, depth, rtol=1e-10)


@settings(max_examples=30, deadline=None)
@given(seeds)
def test_invert_extrinsics(seed: int) -> None:
    rng = np.random.default_rng(seed)
    E = np.stack([make_extrinsics(_rotation(rng), rng.normal(size=3) * 5) for _ in range(3)])
    Einv = invert_extrinsics(E)
    np.testing.assert_allclose(E @ Einv, np.broadcast_to(np.eye(4), E.shape), atol=1e-12)
    np.testing.assert_allclose(invert_extrinsics(Einv), E, atol=1e-12)
    C = camera_centers(E)  # the camera centre maps to the camera-frame origin
    np.testing.assert_allclose(np.einsum("nij,nj->ni", E[:, :3, :3], C) + E[:, :3, 3], 0.0, atol=1e-12)


def test_opencv_axes() -> None:
    """x right, y down, z forward: a point right of and below the optical axis lands right and below."""
    K = np.array([[100.0, 0, 50], [0, 100.0, 40], [0, 0, 1]])
    uv, z = project(np.array([0.1, 0.2, 1.0]), K, np.eye(4))
    np.testing.assert_allclose(uv, [60.0, 60.0])
    assert z == 1.0


def test_token_helpers() -> None:
    np.testing.assert_array_equal(token_coords((2, 3)), [[0, 0], [1, 0], [2, 0], [0, 1], [1, 1], [2, 1]])
    # token (tx, ty) covers pixels [tx W/w, (tx+1) W/w): its centre maps to integer tx
    np.testing.assert_allclose(pixel_to_token(np.array([[8.0, 8.0], [24.0, 40.0]]), (64, 64), (4, 4)), [[0, 0], [1, 2]])


# --------------------------------------------------------------------------------------- records
def test_validate_camera_errors() -> None:
    K, E = np.eye(3), np.eye(4)
    cases = [
        (np.eye(4), E, "intrinsics", "shape"),
        (K, np.eye(3), "extrinsics", "shape"),
        (np.where(np.eye(3) > 0, np.nan, 0.0), E, "intrinsics", "non-finite"),
        (K, np.full((4, 4), np.inf), "extrinsics", "non-finite"),
        (np.diag([-1.0, 1.0, 1.0]), E, "intrinsics", "positive"),
        (np.array([[1.0, 0, 0], [0.5, 1, 0], [0, 0, 1]]), E, "intrinsics", "upper triangular"),
        (K, np.vstack([np.eye(4)[:3], [0, 0, 1, 1]]), "extrinsics", "last row"),
        (K, np.diag([1.0, 1.0, -1.0, 1.0]), "extrinsics", "proper rotation"),
        (K, np.diag([1.1, 1.0, 1.0, 1.0]), "extrinsics", "proper rotation"),
    ]
    for Kc, Ec, field, match in cases:
        with pytest.raises(SchemaError, match=match) as e:
            validate_camera(Kc, Ec, where="cam7")
        assert e.value.field == field and "cam7" in str(e.value)
    validate_camera(K, E, where="ok")


def test_record_validation() -> None:
    f = FrameRecord("a", "a.png", (10, 20), np.eye(3), np.eye(4))
    SceneRecord("d", "test", "s", (f, FrameRecord("b", "b.png", (10, 20), np.eye(3), np.eye(4)))).validate()
    with pytest.raises(SchemaError) as e:
        SceneRecord("d", "test", "s", (f, f)).validate()
    assert e.value.field == "frame_id"
    with pytest.raises(SchemaError) as e:
        FrameRecord("a", "a.png", (0, 20), np.eye(3), np.eye(4)).validate("here")
    assert e.value.field == "image_size"
    with pytest.raises(SchemaError) as e:
        FrameRecord("a", "a.png", (10, 20), np.eye(3), np.eye(4), depth_scale=0.0).validate("here")
    assert e.value.field == "depth_scale"


def test_window_id_stable_and_config_order_insensitive() -> None:
    cfg = {"grid": [32, 32], "tau": 1.5, "backend": {"name": "depth", "version": "1"}, "crop": {"policy": "center", "size": 512}}
    reordered = {k: cfg[k] for k in reversed(list(cfg))}
    wid = window_id("re10k", "test", "abc", ["1", "2", "3"], cfg)
    assert wid == window_id("re10k", "test", "abc", ["1", "2", "3"], reordered)
    assert len(wid) == 16 and int(wid, 16) >= 0
    assert wid == "8fb16d81839d0d7b"  # pinned: ids must not change between runs or versions of the code
    assert wid != window_id("re10k", "test", "abc", ["2", "1", "3"], cfg)
    assert wid != window_id("re10k", "train", "abc", ["1", "2", "3"], cfg)
    assert wid != window_id("re10k", "test", "abc", ["1", "2", "3"], {**cfg, "tau": 1.0})


# ---------------------------------------------------------------------------------- cache layout
def _config() -> CacheConfig:
    return CacheConfig(grid=(32, 32), tau=1.5, views=8, backend={"name": "depth", "version": "1"},
                       crop={"policy": "center", "size": 512}, dataset={"name": "re10k", "root": "data", "split": "test"},
                       created_by={"version": "0.1.0"})


def test_cache_config_round_trip() -> None:
    cfg = _config()
    back = CacheConfig.from_json(cfg.to_json())
    assert back == cfg and back.grid == (32, 32)
    assert json.loads(cfg.to_json())["schema_version"] == SCHEMA_VERSION
    assert set(cfg.fingerprint()) == {"schema_version", "grid", "tau", "backend", "crop"}


@pytest.mark.parametrize(
    "change,field",
    [
        (lambda d: d.pop("tau"), "tau"),
        (lambda d: d.update(extra=1), "extra"),
        (lambda d: d.update(schema_version=SCHEMA_VERSION + 1), "schema_version"),
        (lambda d: d.update(grid=[0, 32]), "grid"),
        (lambda d: d.update(grid=[256, 256]), "grid"),
        (lambda d: d.update(tau=-1.0), "tau"),
        (lambda d: d.update(views=1), "views"),
        (lambda d: d["backend"].pop("name"), "backend.name"),
        (lambda d: d.update(crop={"policy": "center"}), "crop"),
        # wrong JSON types name the field too (no bare TypeError, no silent int() truncation)
        (lambda d: d.update(grid=32), "grid"),
        (lambda d: d.update(grid=["a", 32]), "grid"),
        (lambda d: d.update(grid=[32.7, 32]), "grid"),
        (lambda d: d.update(tau="1.5"), "tau"),
        (lambda d: d.update(tau=None), "tau"),
        (lambda d: d.update(views="4"), "views"),
        (lambda d: d.update(views=2.5), "views"),
        (lambda d: d.update(backend=None), "backend"),
        (lambda d: d.update(crop=[]), "crop"),
        (lambda d: d.update(created_by="me"), "created_by"),
        (lambda d: d.update(schema_version=str(SCHEMA_VERSION)), "schema_version"),
    ],
)
def test_cache_config_errors_name_the_field(change, field: str) -> None:
    d = json.loads(_config().to_json())
    change(d)
    with pytest.raises(SchemaError) as e:
        CacheConfig.from_json(json.dumps(d), where="c/cache.json")
    assert e.value.field == field and "c/cache.json" in str(e.value)


def test_cache_config_bad_json() -> None:
    for text in ("{", "[1]"):
        with pytest.raises(SchemaError) as e:
            CacheConfig.from_json(text)
        assert e.value.field == "<json>"


def _window_arrays(S: int, grid: tuple[int, int]) -> dict[str, np.ndarray]:
    return {name: np.zeros(spec.shape(1, S, grid)[1:], dtype=spec.dtype) for name, spec in CACHE_ARRAYS.items()}


def test_window_arrays_validation() -> None:
    S, grid = 3, (4, 5)
    arrays = _window_arrays(S, grid)
    assert arrays["nn"].shape == (3, 3, 20) and arrays["points"].shape == (3, 4, 5, 3)
    validate_window_arrays(arrays, S, grid, where="w")
    bad = [
        ({"dist": None}, "dist", "missing"),
        ({"points": np.zeros((3, 4, 5, 3), np.float32)}, "points", "dtype"),
        ({"valid": np.zeros((3, 5, 4), bool)}, "valid", "shape"),
        ({"nn": np.full((3, 3, 20), 20, np.int16)}, "nn", "outside"),
        ({"mask": np.ones((3, 3, 20), bool)}, "mask", "not valid"),
    ]
    for change, field, match in bad:
        a = {**arrays, **change}
        if a["dist"] is None:
            del a["dist"]
        with pytest.raises(SchemaError, match=match) as e:
            validate_window_arrays(a, S, grid, where="shard3/row2")
        assert e.value.field == field and "shard3/row2" in str(e.value)
    with pytest.raises(SchemaError) as e:
        validate_window_arrays(_window_arrays(2, (1, 2)), 2, (256, 256), where="w")
    assert e.value.field == "grid"


def test_manifest_schema() -> None:
    schema = manifest_schema()
    assert schema.names == [name for name, _ in MANIFEST_COLUMNS]
    assert schema.field("frame_ids").type == pa.list_(pa.string())
    assert schema.field("row").type == pa.int32() and schema.field("valid_frac").type == pa.float32()
    assert schema.field("error").nullable and not schema.field("window_id").nullable
    assert schema.metadata[b"cameo_corr_schema_version"] == str(SCHEMA_VERSION).encode()
    for required in ("window_id", "dataset", "split", "scene_id", "image_paths", "shard", "num_views", "mask_frac", "status"):
        assert required in schema.names


def test_every_error_of_the_package_pickles_as_itself() -> None:
    """Errors raised in a Ray task or a worker process reach the caller with their type, message and
    attributes, whatever their constructor takes."""
    import pickle

    from cameo_corr.cache.config import CacheMismatchError
    from cameo_corr.cache.shard import CorruptCacheError
    from cameo_corr.cli.errors import UsageError
    from cameo_corr.pipeline.backends.vggt import CheckpointError
    from cameo_corr.schemas import DatasetError, SchemaError

    errors = [
        SchemaError("backend", "no GPU support", where="c/cache.json"),
        CacheMismatchError("grid", "8 vs 16"),
        DatasetError("root/a.txt", "bad number", line=3, field="fx", scene_id="s1"),
        CorruptCacheError("c", "shard-1", "nn", "w1", ValueError("crc")),
        CheckpointError("w.safetensors", "missing key"),
        UsageError("--out x: cannot write", "--out"),
    ]
    for error in errors:
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error) and str(back) == str(error) and back.args == error.args
        assert vars(back) == vars(error)
    assert pickle.loads(pickle.dumps(errors[0])).field == "backend"
