"""The canonical view: exact intrinsics for crop + resize, crop policies, nearest depth/mask, load_window."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cameo_corr.datasets.base import SceneReader
from cameo_corr.datasets.canonical import (
    MASK_BBOX_MIN_FRACTION,
    MASK_BBOX_PADDING,
    CanonicalView,
    load_window,
)
from cameo_corr.schemas import (
    DatasetError,
    FrameRecord,
    SceneRecord,
    SchemaError,
    WindowRecord,
    make_extrinsics,
    project,
    unproject_depth,
)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _frame(H: int, W: int, K: np.ndarray | None = None, E: np.ndarray | None = None, fid: str = "f0") -> FrameRecord:
    if K is None:
        K = np.array([[0.9 * W, 0.0, W / 2], [0.0, 0.9 * W, H / 2], [0.0, 0.0, 1.0]])
    if E is None:
        E = np.eye(4)
    return FrameRecord(frame_id=fid, image_path=f"img/{fid}.png", image_size=(H, W), intrinsics=K, extrinsics=E)


boxes = st.tuples(
    st.integers(8, 120),  # H
    st.integers(8, 120),  # W
    st.floats(0.05, 1.0),  # side fraction of min(H, W)
    st.floats(0.0, 1.0),  # x position fraction
    st.floats(0.0, 1.0),  # y position fraction
    st.integers(4, 96),  # output size
    st.integers(0, 2**31 - 1),  # camera seed
)


@settings(max_examples=60, deadline=None)
@given(boxes)
def test_intrinsics_exact_by_reprojection(params: tuple) -> None:
    """Known 3D points project to ``(uv - (x0, y0)) * size / side`` with the updated intrinsics."""
    H, W, frac, fx_pos, fy_pos, size, seed = params
    rng = np.random.default_rng(seed)
    side = frac * min(H, W)
    box = (fx_pos * (W - side), fy_pos * (H - side), side)
    K = np.array([[rng.uniform(20, 300), rng.uniform(-2, 2), rng.uniform(0, W)],
                  [0.0, rng.uniform(20, 300), rng.uniform(0, H)], [0.0, 0.0, 1.0]])
    E = make_extrinsics(_rotation(rng), rng.normal(size=3))
    view = CanonicalView(size=size)
    K2 = view.apply_intrinsics(K, box)
    Xc = np.concatenate([rng.uniform(-1, 1, size=(50, 2)), rng.uniform(0.5, 5, size=(50, 1))], axis=1)
    X = (Xc - E[:3, 3]) @ E[:3, :3]  # camera -> world
    uv, z = project(X, K, E)
    uv2, z2 = project(X, K2, E)
    expected = (uv - np.array(box[:2])) * (size / side)
    np.testing.assert_allclose(uv2, expected, rtol=1e-9, atol=1e-7)
    np.testing.assert_allclose(z2, z)


@settings(max_examples=30, deadline=None)
@given(boxes)
@example(params=(8, 8, 1.0, 0.0, 0.0, 4, 0))  # every canonical pixel centre on a source pixel boundary
def test_depth_nearest_matches_intrinsics(params: tuple) -> None:
    """The source pixel sampled for each canonical pixel is the one its ray hits under (K, E)."""
    H, W, frac, fx_pos, fy_pos, size, seed = params
    rng = np.random.default_rng(seed)
    side = frac * min(H, W)
    box = (fx_pos * (W - side), fy_pos * (H - side), side)
    K = np.array([[rng.uniform(20, 300), 0.0, rng.uniform(0, W)], [0.0, rng.uniform(20, 300), rng.uniform(0, H)], [0, 0, 1.0]])
    E = make_extrinsics(_rotation(rng), rng.normal(size=3))
    view = CanonicalView(size=size)
    code = (np.arange(H)[:, None] * W + np.arange(W)[None, :] + 1).astype(np.float32)  # unique per pixel
    sampled = view.apply_depth(code, box).astype(np.int64) - 1
    X = unproject_depth(np.full((size, size), 2.0), view.apply_intrinsics(K, box), E)
    uv, _ = project(X, K, E)
    # a ray landing on a pixel boundary (to rounding) may be sampled from either neighbour: checked per axis
    # (a crop whose pixel centres all fall on source boundaries, e.g. 8 px -> 4 px, has no other ray)
    for got, coord, n in (((sampled % W), uv[..., 0], W), ((sampled // W), uv[..., 1], H)):
        edge = np.round(coord).astype(np.int64)
        boundary = np.abs(coord - edge) <= 1e-6
        np.testing.assert_array_equal(got[~boundary], np.clip(np.floor(coord + 1e-9).astype(np.int64), 0, n - 1)[~boundary])
        either = (got == np.clip(edge - 1, 0, n - 1)) | (got == np.clip(edge, 0, n - 1))
        assert either[boundary].all()


@pytest.mark.parametrize("box,size", [((30.0, 10.0, 180.0), 60), ((0.5, 0.0, 200.0), 200), ((40.25, 5.5, 90.0), 120)])
def test_image_resampling_follows_the_same_map(box: tuple, size: int) -> None:
    """A horizontal/vertical ramp ``I = u - 0.5`` (exact for bilinear) lands where the affine map says."""
    H, W = 220, 250
    ramp_u = np.broadcast_to(np.arange(W, dtype=np.uint8)[None, :], (H, W))
    ramp_v = np.broadcast_to(np.arange(H, dtype=np.uint8)[:, None], (H, W))
    image = np.stack([ramp_u, ramp_v, np.zeros((H, W), np.uint8)], axis=-1)
    out = CanonicalView(size=size).apply_image(image, box).astype(np.float64)
    x0, y0, side = box
    centres = (np.arange(size) + 0.5) * side / size
    # interior only: the filter support is truncated at the image border
    ok = slice(3, size - 3)
    np.testing.assert_allclose(out[ok, ok, 0], np.broadcast_to((x0 + centres - 0.5)[None, ok], out[ok, ok, 0].shape), atol=0.75)
    np.testing.assert_allclose(out[ok, ok, 1], np.broadcast_to((y0 + centres - 0.5)[ok, None], out[ok, ok, 1].shape), atol=0.75)


def test_image_downscale_is_antialiased() -> None:
    """A one-pixel checkerboard shrunk 4x averages to grey instead of aliasing to black/white."""
    checker = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)
    out = CanonicalView(size=16).apply_image(np.repeat(checker[..., None], 3, axis=-1), (0.0, 0.0, 64.0))
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert np.all(np.abs(out[2:-2, 2:-2].astype(int) - 127) <= 3)


def test_center_policy() -> None:
    assert CanonicalView(policy="center").crop_box(_frame(256, 384)) == (64.0, 0.0, 256.0)
    assert CanonicalView(policy="center").crop_box(_frame(480, 271)) == (0.0, 104.5, 271.0)


def test_principal_point_policy() -> None:
    K = np.array([[300.0, 0, 100.0], [0, 300.0, 120.0], [0, 0, 1]])
    assert CanonicalView(policy="principal_point").crop_box(_frame(300, 400, K)) == (0.0, 20.0, 200.0)
    K_out = K.copy()
    K_out[0, 2] = -3.0
    with pytest.raises(SchemaError, match="principal point") as e:
        CanonicalView(policy="principal_point").crop_box(_frame(300, 400, K_out, fid="bad_pp"))
    assert e.value.field == "intrinsics" and "bad_pp" in str(e.value)


def test_mask_bbox_policy() -> None:
    view = CanonicalView(policy="mask_bbox")
    H, W = 300, 400
    mask = np.zeros((H, W), bool)
    mask[50:90, 100:150] = True  # bbox 50 x 40 pixels, centre (125, 70)
    side = max(MASK_BBOX_PADDING * 50, MASK_BBOX_MIN_FRACTION * 300)
    assert view.crop_box(_frame(H, W), mask) == pytest.approx((125 - side / 2, 70 - side / 2, side))
    big = np.zeros((H, W), bool)
    big[100:250, 10:200] = True  # 190 wide -> 228 side, centre (105, 175): x shifted right to stay inside
    assert view.crop_box(_frame(H, W), big) == pytest.approx((0.0, 175 - 114, 228.0))
    full = np.ones((H, W), bool)
    assert view.crop_box(_frame(H, W), full) == (50.0, 0.0, 300.0)
    with pytest.raises(SchemaError, match="needs a foreground mask") as e:
        view.crop_box(_frame(H, W, fid="frame_without_mask"))
    assert "frame_without_mask" in str(e.value)
    with pytest.raises(SchemaError, match="non-empty"):
        view.crop_box(_frame(H, W), np.zeros((H, W), bool))
    with pytest.raises(SchemaError, match="does not match"):
        view.crop_box(_frame(H, W), np.ones((10, 10), bool))


def test_depth_nearest_keeps_invalid_zero() -> None:
    rng = np.random.default_rng(0)
    depth = rng.uniform(1, 5, size=(97, 131)).astype(np.float32)
    depth[rng.random(depth.shape) < 0.3] = 0.0
    out = CanonicalView(size=64).apply_depth(depth, (10.0, 3.0, 90.0))
    assert out.dtype == np.float32 and out.shape == (64, 64)
    assert np.isin(out, depth).all()  # no interpolated values
    assert 0.2 < (out == 0).mean() < 0.4
    mask = CanonicalView(size=64).apply_mask(depth > 0, (10.0, 3.0, 90.0))
    np.testing.assert_array_equal(mask, out > 0)


def test_bad_inputs() -> None:
    view = CanonicalView(size=32)
    with pytest.raises(SchemaError, match="non-negative"):
        view.apply_depth(np.array([[np.nan, 1.0]], np.float32), (0.0, 0.0, 1.0))
    with pytest.raises(SchemaError, match="not inside"):
        view.apply_image(np.zeros((10, 10, 3), np.uint8), (5.0, 0.0, 8.0))
    with pytest.raises(SchemaError) as e:
        view.apply_image(np.zeros((10, 10), np.uint8), (0.0, 0.0, 10.0))
    assert e.value.field == "image"
    with pytest.raises(SchemaError) as e:
        CanonicalView(size=0)
    assert e.value.field == "size"
    with pytest.raises(SchemaError) as e:
        CanonicalView(policy="zoom")
    assert e.value.field == "policy"


def test_dict_round_trip() -> None:
    for view in (CanonicalView(), CanonicalView(size=256, policy="mask_bbox")):
        assert CanonicalView.from_dict(view.to_dict()) == view
    with pytest.raises(SchemaError) as e:
        CanonicalView.from_dict({"policy": "center", "size": 512, "scale": 2})
    assert e.value.field == "crop.scale"
    with pytest.raises(SchemaError) as e:
        CanonicalView.from_dict({"policy": "center"})
    assert e.value.field == "crop.size"


class ArrayReader(SceneReader):
    """A dataset held in memory: one scene of frames with arrays for image, depth and masks."""

    name = "arrays"

    def __init__(self, root: Path, pixels: dict[str, dict[str, np.ndarray]], frames: list[FrameRecord]) -> None:
        super().__init__(root, "test")
        self.pixels = pixels
        self.frames = frames

    def scene_ids(self) -> list[str]:
        return ["s"]

    def scene(self, scene_id: str) -> SceneRecord:
        return SceneRecord(self.name, self.split, scene_id, tuple(self.frames))

    def load_image(self, frame: FrameRecord) -> np.ndarray:
        return self.pixels[frame.frame_id]["image"]

    def load_depth(self, frame: FrameRecord) -> np.ndarray | None:
        return self.pixels[frame.frame_id].get("depth")

    def load_mask(self, frame: FrameRecord) -> np.ndarray | None:
        return self.pixels[frame.frame_id].get("mask")


def _array_reader(tmp_path: Path, n: int = 3, *, masks: bool = True, H: int = 60, W: int = 80) -> ArrayReader:
    rng = np.random.default_rng(1)
    frames, pixels = [], {}
    for i in range(n):
        fid = f"f{i}"
        frames.append(_frame(H, W, fid=fid, E=make_extrinsics(_rotation(rng), rng.normal(size=3))))
        mask = np.zeros((H, W), bool)
        mask[10 + i : 30 + i, 20:50] = True
        pixels[fid] = {"image": rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
                       "depth": np.where(mask, 2.0, 0.0).astype(np.float32)}
        if masks:
            pixels[fid]["mask"] = mask
    return ArrayReader(tmp_path, pixels, frames)


def test_load_window_mask_bbox(tmp_path: Path) -> None:
    reader = _array_reader(tmp_path)
    record = WindowRecord("w", "arrays", "test", "s", tuple(reader.frames))
    view = CanonicalView(size=48, policy="mask_bbox")
    data = load_window(reader, record, view, with_depth=True)
    assert data.images.shape == (3, 48, 48, 3) and data.depth.shape == (3, 48, 48) and data.masks.shape == (3, 48, 48)
    for i, frame in enumerate(reader.frames):
        box = view.crop_box(frame, reader.pixels[frame.frame_id]["mask"])
        np.testing.assert_allclose(data.intrinsics[i], view.apply_intrinsics(frame.intrinsics, box))
        np.testing.assert_array_equal(data.extrinsics[i], frame.extrinsics)
        np.testing.assert_array_equal(data.masks[i], data.depth[i] > 0)
    no_depth = load_window(reader, record, view)
    assert no_depth.depth is None and no_depth.masks is not None


def test_load_window_without_masks(tmp_path: Path) -> None:
    """``with_masks=False`` returns no masks and reads none unless the crop needs them (``mask_bbox``);
    images, cameras and depth are those of the load with masks."""
    reader = _array_reader(tmp_path)
    record = WindowRecord("w", "arrays", "test", "s", tuple(reader.frames))
    calls: list[str] = []
    load_mask = reader.load_mask
    reader.load_mask = lambda frame: calls.append(frame.frame_id) or load_mask(frame)
    for policy, reads in (("center", []), ("mask_bbox", ["f0", "f1", "f2"])):
        view = CanonicalView(size=48, policy=policy)
        full = load_window(reader, record, view, with_depth=True)
        calls.clear()
        lean = load_window(reader, record, view, with_depth=True, with_masks=False)
        assert lean.masks is None and full.masks is not None and calls == reads, policy
        for name in ("images", "intrinsics", "extrinsics", "depth"):
            np.testing.assert_array_equal(getattr(lean, name), getattr(full, name), err_msg=f"{policy}: {name}")


def test_load_window_errors(tmp_path: Path) -> None:
    reader = _array_reader(tmp_path, masks=False)
    record = WindowRecord("w", "arrays", "test", "s", tuple(reader.frames))
    with pytest.raises(SchemaError, match="mask"):
        load_window(reader, record, CanonicalView(size=16, policy="mask_bbox"))
    reader.pixels["f0"]["mask"] = np.ones((60, 80), bool)
    with pytest.raises(DatasetError, match="earlier frames"):
        load_window(reader, record, CanonicalView(size=16))
    del reader.pixels["f0"]["mask"]
    del reader.pixels["f1"]["depth"]
    with pytest.raises(DatasetError, match="no depth") as e:
        load_window(reader, record, CanonicalView(size=16), with_depth=True)
    assert e.value.field == "depth" and e.value.scene_id == "s"
    reader.pixels["f2"]["image"] = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(DatasetError, match="frame record says") as e:
        load_window(reader, record, CanonicalView(size=16))
    assert e.value.path == "img/f2.png"
