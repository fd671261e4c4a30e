"""CO3D v2 reader: camera conversion vs PyTorch3D's projection math, real apple cameras, set lists,
float16 depth PNGs, masks and errors on bad annotation files."""

from __future__ import annotations

import copy
import gzip
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cameo_corr.datasets import open_dataset
from cameo_corr.datasets.canonical import CanonicalView, load_window
from cameo_corr.datasets.co3d import CO3DReader, decode_depth_png, encode_depth_png, write_jgz
from cameo_corr.schemas import DatasetError, WindowRecord, camera_centers, project

APPLE_SEQ = "110_13051_23361"


def _p3d_project(X: np.ndarray, vp: dict[str, Any], hw: tuple[int, int]) -> np.ndarray:
    """PyTorch3D's projection written out: row-vector world->view, NDC pinhole, NDC->pixel (top-left = 0)."""
    H, W = hw
    Xc = X @ np.asarray(vp["R"]) + np.asarray(vp["T"])
    f, p = np.asarray(vp["focal_length"]), np.asarray(vp["principal_point"])
    ndc = f * Xc[:, :2] / Xc[:, 2:3] + p  # +X left, +Y up
    if vp.get("intrinsics_format", "ndc_norm_image_bounds") == "ndc_isotropic":
        half = np.array([min(H, W) / 2.0] * 2)  # the shorter side spans [-1, 1]
    else:
        half = np.array([W / 2.0, H / 2.0])  # the image bounds span [-1, 1] on both axes
    return np.array([W / 2.0, H / 2.0]) - ndc * half


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _entry(
    seq: str, num: int, vp: dict[str, Any], hw: tuple[int, int], cat: str = "cat", **extra: Any
) -> dict[str, Any]:
    return {"sequence_name": seq, "frame_number": num, "frame_timestamp": num / 30,
            "image": {"path": f"{cat}/{seq}/images/frame{num:06d}.jpg", "size": list(hw)}, "viewpoint": vp, **extra}


def _write_category(root: Path, entries: list[dict[str, Any]], cat: str = "cat",
                    set_lists: dict[str, dict[str, list]] | None = None) -> Path:
    (root / cat / "set_lists").mkdir(parents=True, exist_ok=True)
    write_jgz(root / cat / "frame_annotations.jgz", entries)
    for subset, lists in (set_lists or {}).items():
        (root / cat / "set_lists" / f"set_lists_{subset}.json").write_text(json.dumps(lists))
    return root / cat / "frame_annotations.jgz"


# ----------------------------------------------------------------------------- camera conversion
def test_projection_matches_pytorch3d_math_both_formats(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    hw = (300, 420)  # landscape, non-square: the two NDC formats differ
    entries, vps = [], []
    for i in range(9):
        vp = {"R": _rotation(rng).tolist(), "T": [*rng.normal(0, 0.3, 2), float(rng.uniform(4, 6))],
              "focal_length": rng.uniform(1.0, 3.0, 2).tolist(), "principal_point": rng.normal(0, 0.1, 2).tolist()}
        if i % 3 == 0:
            vp["intrinsics_format"] = "ndc_isotropic"
        elif i % 3 == 1:
            vp["intrinsics_format"] = "ndc_norm_image_bounds"
        # i % 3 == 2: no field -> CO3D's dataclass default, ndc_norm_image_bounds
        entries.append(_entry("s", i, vp, hw))
        vps.append(vp)
    _write_category(tmp_path, entries)
    reader = CO3DReader(tmp_path, subset=None)
    scene = reader.scene("cat/s")
    assert [f.frame_id for f in scene.frames] == [str(i) for i in range(9)]
    for frame, vp in zip(scene.frames, vps):
        R, T = np.asarray(vp["R"]), np.asarray(vp["T"])
        # world points in front of the camera: X_cam (PyTorch3D) with positive depth, mapped back to world
        Xc = np.column_stack([rng.uniform(-1, 1, (50, 2)), rng.uniform(2, 8, 50)])
        X = (Xc - T) @ R.T
        uv, z = project(X, frame.intrinsics, frame.extrinsics)
        np.testing.assert_allclose(uv, _p3d_project(X, vp, hw), rtol=0, atol=1e-9)
        np.testing.assert_allclose(z, Xc[:, 2], atol=1e-12)
    # the two formats give different pixels for the same numbers (the test above can tell them apart)
    iso = dict(vps[0], intrinsics_format="ndc_isotropic")
    legacy = dict(vps[0], intrinsics_format="ndc_norm_image_bounds")
    X = np.array([[0.3, -0.2, 0.0]]) @ np.asarray(vps[0]["R"]).T
    assert np.abs(_p3d_project(X, iso, hw) - _p3d_project(X, legacy, hw)).max() > 1.0


@pytest.fixture(scope="module")
def apple_root(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CO3D-layout fixture written from the real apple frames and their cameras (gt_cameras.npz)."""
    src = shared_data / "co3d_apple_frames"
    root = tmp_path_factory.mktemp("co3d")
    images = root / "apple" / APPLE_SEQ / "images"
    images.mkdir(parents=True)
    cams = np.load(src / "gt_cameras.npz")
    files = sorted(src.glob("frame*.jpg"))
    assert len(files) == len(cams["gtR"]) == 20
    entries = []
    for jpg, R, T, fl in zip(files, cams["gtR"], cams["gtT"], cams["gtFL"]):
        (images / jpg.name).symlink_to(jpg)
        with Image.open(jpg) as im:
            W, H = im.size
        num = int(re.fullmatch(r"frame(\d+)\.jpg", jpg.name).group(1))
        vp = {"R": R.tolist(), "T": T.tolist(), "focal_length": fl.tolist(), "principal_point": [0.0, 0.0],
              "intrinsics_format": "ndc_isotropic"}
        entry = _entry(APPLE_SEQ, num, vp, (H, W), cat="apple")
        entry["image"]["path"] = f"apple/{APPLE_SEQ}/images/{jpg.name}"
        entries.append(entry)
    listed = [[e["sequence_name"], e["frame_number"], e["image"]["path"]] for e in entries]
    _write_category(root, entries[::-1], cat="apple",  # unsorted on purpose: the reader sorts by frame number
                    set_lists={"fewview_dev": {"train": listed[:12], "val": listed[12:], "test": []}})
    return root


def test_real_apple_cameras_orbit_a_common_point(apple_root: Path) -> None:
    reader = open_dataset("co3d", apple_root, subset=None)
    assert isinstance(reader, CO3DReader) and reader.scene_ids() == [f"apple/{APPLE_SEQ}"]
    scene = reader.scene(f"apple/{APPLE_SEQ}")
    scene.validate()
    nums = [int(f.frame_id) for f in scene.frames]
    assert len(nums) == 20 and nums == sorted(nums)
    frame = scene.frames[0]
    assert frame.image_size == (1896, 1066)  # portrait: [H, W]
    K = frame.intrinsics
    assert K[0, 2] == pytest.approx(533.0) and K[1, 2] == pytest.approx(948.0)  # principal point 0 -> centre
    assert K[0, 0] == pytest.approx(K[1, 1]) and K[0, 0] == pytest.approx(533.0 * 3.5171254, rel=1e-6)
    image = reader.load_image(frame)
    assert image.shape == (1896, 1066, 3) and image.dtype == np.uint8
    assert reader.load_depth(frame) is None and reader.load_mask(frame) is None

    E = np.stack([f.extrinsics for f in scene.frames])
    C, axes = camera_centers(E), E[:, 2, :3]
    P = np.eye(3) - axes[:, :, None] * axes[:, None, :]  # projectors orthogonal to each optical axis
    x = np.linalg.solve(P.sum(0), np.einsum("nij,nj->i", P, C))  # least-squares closest point to all axes
    residual = np.linalg.norm(np.einsum("nij,nj->ni", P, x - C), axis=1)
    distance = np.linalg.norm(C - x, axis=1)
    assert np.sqrt(np.mean(residual**2)) < 0.15 * distance.mean()
    for f in scene.frames:  # the common point is in front of every camera and inside every image
        uv, z = project(x, f.intrinsics, f.extrinsics)
        assert z > 0 and 0 < uv[0] < 1066 and 0 < uv[1] < 1896


def test_set_list_restricts_frames(apple_root: Path) -> None:
    train = CO3DReader(apple_root, split="train")  # default subset: fewview_dev
    val = CO3DReader(apple_root, split="val")
    test = CO3DReader(apple_root, split="test")
    sid = f"apple/{APPLE_SEQ}"
    assert train.scene_ids() == val.scene_ids() == [sid] and test.scene_ids() == []
    t_ids = [f.frame_id for f in train.scene(sid).frames]
    v_ids = [f.frame_id for f in val.scene(sid).frames]
    assert len(t_ids) == 12 and len(v_ids) == 8 and not set(t_ids) & set(v_ids)
    all_ids = [f.frame_id for f in CO3DReader(apple_root, subset=None).scene(sid).frames]
    assert sorted(t_ids + v_ids, key=int) == all_ids
    with pytest.raises(DatasetError, match="no frames in split 'test'") as e:
        test.scene(sid)
    assert e.value.scene_id == sid and "set_lists_fewview_dev.json" in e.value.path
    with pytest.raises(DatasetError, match="set_lists_manyview_dev_0.json"):
        CO3DReader(apple_root, subset="manyview_dev_0").scene_ids()
    reopened = open_dataset("co3d", apple_root, **val.options())
    assert [f.frame_id for f in reopened.scene(sid).frames] == v_ids


def test_set_list_frame_missing_from_annotations(tmp_path: Path) -> None:
    vp = {"R": np.eye(3).tolist(), "T": [0, 0, 5], "focal_length": [2, 2], "principal_point": [0, 0],
          "intrinsics_format": "ndc_isotropic"}
    entries = [_entry("s", i, vp, (64, 64)) for i in range(3)]
    listed = [["s", i, e["image"]["path"]] for i, e in enumerate(entries)] + [["s", 7, "cat/s/images/frame000007.jpg"]]
    _write_category(tmp_path, entries, set_lists={"dev": {"train": listed, "val": [], "test": []}})
    with pytest.raises(DatasetError, match="frame 7 of sequence 's' is not in") as e:
        CO3DReader(tmp_path, subset="dev").scene("cat/s")
    assert e.value.field == "train"


def test_set_listed_frame_with_malformed_image_section(tmp_path: Path) -> None:
    """A non-object ``image`` of a set-listed frame is a DatasetError naming it (not an AttributeError)."""
    entries = [_good_entry()]
    listed = [["s", 4, entries[0]["image"]["path"]]]
    entries[0]["image"] = "cat/s/images/frame000004.jpg"
    path = _write_category(tmp_path, entries, set_lists={"dev": {"train": listed, "val": [], "test": []}})
    with pytest.raises(DatasetError, match="expected an object") as e:
        CO3DReader(tmp_path, subset="dev").scene("cat/s")
    assert e.value.path == str(path) and e.value.field == "image" and e.value.scene_id == "cat/s"


# ------------------------------------------------------------------------------------ pixels
def test_depth_png_decode_exact_scale_and_masks(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    H, W = 12, 16
    raw = rng.uniform(0.1, 40.0, (H, W)).astype(np.float16)
    raw[0, :4] = [np.inf, -np.inf, np.nan, -2.0]
    seq_dir = tmp_path / "cat" / "s"
    for sub in ("depths", "depth_masks", "masks"):
        (seq_dir / sub).mkdir(parents=True)
    encode_depth_png(raw, seq_dir / "depths" / "d0.png")
    np.testing.assert_array_equal(decode_depth_png(seq_dir / "depths" / "d0.png").view(np.float32),
                                  raw.astype(np.float32).view(np.float32))  # bit-exact, NaN included
    valid = np.ones((H, W), dtype=bool)
    valid[5, 5:9] = False
    Image.fromarray(valid).save(seq_dir / "depth_masks" / "m0.png")
    soft = np.zeros((H, W), dtype=np.uint8)
    soft[2:6, 3:9] = 200
    soft[7, 0], soft[7, 1] = 127, 128  # threshold 0.5 * 255 = 127.5
    Image.fromarray(soft).save(seq_dir / "masks" / "f0.png")
    vp = {"R": np.eye(3).tolist(), "T": [0, 0, 5], "focal_length": [2, 2], "principal_point": [0, 0],
          "intrinsics_format": "ndc_isotropic"}
    entries = [
        _entry("s", 0, vp, (H, W), depth={"path": "cat/s/depths/d0.png", "scale_adjustment": 2.5,
                                          "mask_path": "cat/s/depth_masks/m0.png"},
               mask={"path": "cat/s/masks/f0.png", "mass": 1.0}),
        _entry("s", 1, vp, (H, W), depth={"path": "cat/s/depths/d1.png", "scale_adjustment": 1.0, "mask_path": None}),
    ]
    encode_depth_png(raw, seq_dir / "depths" / "d1.png")
    _write_category(tmp_path, entries)
    reader = CO3DReader(tmp_path, subset=None)
    f0, f1 = reader.scene("cat/s").frames
    assert f0.depth_scale == 2.5 and f1.mask_path is None
    assert reader.preferred_crop_policy() == "principal_point"  # frame 1 has no foreground mask
    depth = reader.load_depth(f0)
    expected = raw.astype(np.float32) * np.float32(2.5)
    expected[~np.isfinite(expected) | (expected < 0) | ~valid] = 0.0
    assert depth.dtype == np.float32
    np.testing.assert_array_equal(depth, expected)
    d1 = reader.load_depth(f1)  # no depth mask: only non-finite / negative values are invalid
    assert (d1 == 0).sum() == 4 and d1[5, 5] == np.float32(raw[5, 5])
    mask = reader.load_mask(f0)
    np.testing.assert_array_equal(mask, soft > 127)
    assert not mask[7, 0] and mask[7, 1] and reader.load_mask(f1) is None
    # a fresh reader (as in a pipeline worker) finds the depth mask from the record alone
    fresh = CO3DReader(tmp_path, subset=None)
    np.testing.assert_array_equal(fresh.load_depth(f0), expected)
    Image.fromarray(np.zeros((H, W), dtype=np.uint8)).save(seq_dir / "depths" / "d1.png")
    with pytest.raises(DatasetError, match="16-bit") as e:
        fresh.load_depth(f1)
    assert e.value.path.endswith("d1.png")


def test_load_window_principal_point_crop(apple_root: Path) -> None:
    reader = CO3DReader(apple_root, subset=None)
    assert reader.default_crop_policy == reader.preferred_crop_policy() == "principal_point"  # no masks
    scene = reader.scene(reader.scene_ids()[0])
    record = WindowRecord("w", "co3d", "train", scene.scene_id, scene.frames[:2])
    data = load_window(reader, record, CanonicalView(size=64, policy=reader.default_crop_policy))
    # principal point (533, 948) = image centre: the crop is the full width (x0 = 0), y0 = 948 - 533
    s, y0 = 64 / 1066, 948 - 533
    A = np.array([[s, 0, 0], [0, s, -s * y0], [0, 0, 1]])
    np.testing.assert_allclose(data.intrinsics[0], A @ scene.frames[0].intrinsics)
    assert data.images.shape == (2, 64, 64, 3) and data.masks is None


# ------------------------------------------------------------------------------------ errors
def _good_entry() -> dict[str, Any]:
    vp = {"R": np.eye(3).tolist(), "T": [0.0, 0.0, 5.0], "focal_length": [2.0, 2.0], "principal_point": [0.0, 0.0],
          "intrinsics_format": "ndc_isotropic"}
    return _entry("s", 4, vp, (64, 48))


_DELETE = object()


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    """Set (or, with ``_DELETE``, remove) the nested key ``a.b`` of ``d``."""
    *parents, last = dotted.split(".")
    for key in parents:
        d = d[key]
    if value is _DELETE:
        del d[last]
    else:
        d[last] = copy.deepcopy(value)


@pytest.mark.parametrize(
    ("dotted", "value", "field", "message"),
    [
        ("viewpoint.intrinsics_format", "screen", "viewpoint.intrinsics_format", "unknown intrinsics_format 'screen'"),
        ("viewpoint.R", [[float("nan"), 0, 0], [0, 1, 0], [0, 0, 1]], "viewpoint.R", "non-finite"),
        ("viewpoint.T", [0, 0], "viewpoint.T", "expected shape"),
        ("viewpoint.focal_length", [-2.0, 2.0], "viewpoint.focal_length", "positive"),
        ("viewpoint.R", [[2, 0, 0], [0, 1, 0], [0, 0, 1]], "viewpoint.R", "not a proper rotation"),
        ("viewpoint", _DELETE, "viewpoint", "missing"),
        ("image.size", [64], "image.size", "expected \\[H, W\\]"),
        ("image.path", _DELETE, "image.path", "non-empty string"),
        ("depth", {"path": "x.png", "scale_adjustment": float("inf")}, "depth.scale_adjustment", "positive finite"),
        ("depth", {"path": "x.png", "scale_adjustment": 1.0, "mask_path": 3}, "depth.mask_path", "string or null"),
    ],
)
def test_bad_frame_fields_name_file_field_and_frame(
    tmp_path: Path, dotted: str, value: Any, field: str, message: str
) -> None:
    entry = _good_entry()
    _set(entry, dotted, value)
    path = _write_category(tmp_path, [entry])
    reader = CO3DReader(tmp_path, subset=None)
    with pytest.raises(DatasetError, match=message) as e:
        reader.scene("cat/s")
    assert e.value.path == str(path) and e.value.field == field and e.value.scene_id == "cat/s"
    assert "frame 4 of sequence 's'" in str(e.value)


def test_truncated_gzip_and_bad_json(tmp_path: Path) -> None:
    path = _write_category(tmp_path, [_good_entry()])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="corrupt or truncated gzip") as e:
        CO3DReader(tmp_path, subset=None).scene_ids()
    assert e.value.path == str(path)
    path.write_bytes(gzip.compress(b'[{"sequence_name": "s",\n "frame_number": }]'))
    with pytest.raises(DatasetError, match="invalid JSON") as e:
        CO3DReader(tmp_path, subset=None).scene_ids()
    assert e.value.line == 2
    write_jgz(path, [_good_entry(), _good_entry()])
    with pytest.raises(DatasetError, match="annotated twice"):
        CO3DReader(tmp_path, subset=None).scene_ids()
    write_jgz(path, [{"sequence_name": "s", "frame_number": "4"}])
    with pytest.raises(DatasetError, match="frame_number must be a non-negative integer") as e:
        CO3DReader(tmp_path, subset=None).scene_ids()
    assert e.value.field == "frame_number"


def test_roots_categories_and_splits(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no category folder"):
        CO3DReader(tmp_path)
    _write_category(tmp_path, [_good_entry()], cat="apple")
    _write_category(tmp_path, [_good_entry()], cat="bench")
    (tmp_path / "not_a_category").mkdir()
    assert CO3DReader(tmp_path, subset=None).scene_ids() == ["apple/s", "bench/s"]
    only = CO3DReader(tmp_path, categories=["bench"], subset=None)
    assert only.scene_ids() == ["bench/s"] and only.options()["categories"] == ["bench"]
    with pytest.raises(DatasetError, match="category 'car' has no frame annotations"):
        CO3DReader(tmp_path, categories=["car"])
    with pytest.raises(DatasetError, match="unknown split"):
        CO3DReader(tmp_path, split="dev")
    with pytest.raises(DatasetError, match="unknown scene"):
        only.scene("apple/s")


def test_mask_bbox_crop_preferred_when_every_frame_has_a_mask(tmp_path: Path) -> None:
    vp = {"R": np.eye(3).tolist(), "T": [0, 0, 5], "focal_length": [2, 2], "principal_point": [0, 0],
          "intrinsics_format": "ndc_isotropic"}
    masked = [_entry("s", i, vp, (12, 16), mask={"path": f"cat/s/masks/f{i}.png", "mass": 1.0}) for i in range(2)]
    _write_category(tmp_path, masked)
    assert CO3DReader(tmp_path, subset=None).preferred_crop_policy() == "mask_bbox"
