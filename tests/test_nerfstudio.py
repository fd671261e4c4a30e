"""nerfstudio ``transforms.json`` reader: synthetic scenes written in the layout (exact cameras, depth,
masks, downscaled copies), the OpenGL camera-to-world conversion against nerfstudio's ray model, scene
discovery, metadata-only planning, bad input naming file and key, and eval-corr on exact depth."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cameo_corr.datasets import open_dataset
from cameo_corr.datasets.canonical import CanonicalView, load_window
from cameo_corr.datasets.nerfstudio import NerfstudioReader, opencv_w2c_to_opengl_c2w, opengl_c2w_to_opencv_w2c
from cameo_corr.datasets.synthetic import FIRST_OBJECT_ID, SyntheticSequence, generate_dataset, make_sequence
from cameo_corr.schemas import DatasetError, WindowRecord, project, unproject_depth


def _on_surfaces(seq: SyntheticSequence, depth: np.ndarray, ids: np.ndarray, K: np.ndarray, E: np.ndarray, tol: float) -> None:
    """Every valid depth pixel, unprojected with the reader's camera, lies on the analytic surface it shows."""
    points = unproject_depth(depth, K, E)
    for k, surface in enumerate(seq.scene.surfaces):
        sel = (ids == k) & (depth > 0)
        if sel.any():
            assert surface.distance(points[sel]).max() < tol, f"surface {k} ({surface.kind})"


# ---------------------------------------------------------------------------------- conventions
def _rotation(q: tuple[float, float, float, float]) -> np.ndarray:
    w, x, y, z = np.asarray(q) / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                     [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                     [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


quaternions = st.tuples(*[st.floats(-1, 1) for _ in range(4)]).filter(lambda q: np.linalg.norm(q) > 0.2)


@settings(max_examples=60, deadline=None)
@given(q=quaternions, t=st.tuples(*[st.floats(-50, 50)] * 3), f=st.tuples(st.floats(20, 2000), st.floats(20, 2000)),
       c=st.tuples(st.floats(-100, 900), st.floats(-100, 900)), uv=st.tuples(st.floats(0, 800), st.floats(0, 600)),
       z=st.floats(0.05, 100))
def test_opengl_c2w_matches_nerfstudio_ray_model(q, t, f, c, uv, z) -> None:
    """nerfstudio casts pixel (u, v) along c2w_R @ ((u - cx)/fx, -(v - cy)/fy, -1) from c2w_t (OpenGL camera,
    pixel centres at +0.5 like ours): the point at z-depth z there must project back to (u, v) at depth z."""
    c2w = np.eye(4)
    c2w[:3, :3], c2w[:3, 3] = _rotation(q), t
    K = np.array([[f[0], 0, c[0]], [0, f[1], c[1]], [0, 0, 1.0]])
    ray = np.array([(uv[0] - c[0]) / f[0], -(uv[1] - c[1]) / f[1], -1.0])
    X = c2w[:3, 3] + z * (c2w[:3, :3] @ ray)
    E = opengl_c2w_to_opencv_w2c(c2w)
    got_uv, got_z = project(X, K, E)
    np.testing.assert_allclose(got_uv, uv, atol=1e-6 * (1 + max(abs(uv[0]), abs(uv[1]))))
    assert math.isclose(float(got_z), z, rel_tol=1e-9, abs_tol=1e-9)
    np.testing.assert_allclose(opencv_w2c_to_opengl_c2w(E), c2w, atol=1e-9)
    np.testing.assert_allclose(opengl_c2w_to_opencv_w2c(c2w[:3]), E)  # 3x4 transform_matrix


# ------------------------------------------------------------------------------ synthetic layout
@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("ns") / "data", scenes=2, frames=4, image_size=31, seed=3,
                            layout="nerfstudio", split="val", image_format="png")


def test_synthetic_scenes_read_back_exactly(synth: Path) -> None:
    reader = open_dataset("nerfstudio", synth)
    assert isinstance(reader, NerfstudioReader) and reader.has_depth
    assert reader.scene_ids() == ["scene_0000", "scene_0001"]
    meta = [json.loads((synth / s / "transforms.json").read_text()) for s in reader.scene_ids()]
    assert "fl_x" in meta[0] and meta[0]["camera_model"] == "OPENCV"  # global intrinsics, zero distortion
    assert "fl_x" not in meta[1] and "fl_x" in meta[1]["frames"][0]  # per-frame intrinsics, frames reversed
    for index, scene_id in enumerate(reader.scene_ids()):
        seq = make_sequence(3, index, frames=4, image_size=(31, 31))
        scene = reader.scene(scene_id)
        assert scene.dataset == "nerfstudio" and scene.split == "all"
        assert [f.frame_id for f in scene.frames] == [f"images/frame_{i:05d}.png" for i in range(1, 5)]
        for i, frame in enumerate(scene.frames):
            assert frame.image_path == f"{scene_id}/images/frame_{i + 1:05d}.png" and frame.image_size == (31, 31)
            np.testing.assert_allclose(frame.intrinsics, seq.intrinsics[i], rtol=0, atol=1e-9)
            np.testing.assert_allclose(frame.extrinsics, seq.extrinsics[i], rtol=0, atol=1e-9)
            image, depth, ids = seq.render(i)
            np.testing.assert_array_equal(reader.load_image(frame), image)
            d = reader.load_depth(frame)
            assert d.dtype == np.float32 and np.abs(d - depth).max() <= 0.5e-3 + 1e-6  # millimetre PNG
            _on_surfaces(seq, d, ids, frame.intrinsics, frame.extrinsics, tol=1e-3)
            np.testing.assert_array_equal(reader.load_mask(frame), ids >= FIRST_OBJECT_ID)
    # the split lists of the file: every frame is in 'val', none in 'train'
    assert len(open_dataset("nerfstudio", synth, split="val").scene("scene_0001").frames) == 4
    with pytest.raises(DatasetError, match="split 'train' has no frames") as e:
        open_dataset("nerfstudio", synth, split="train").scene("scene_0000")
    assert e.value.field == "train_filenames" and e.value.path == str(synth / "scene_0000" / "transforms.json")


def test_downscaled_images_intrinsics_follow_the_size_read(synth: Path) -> None:
    reader = open_dataset("nerfstudio", synth, downscale=2)
    for index, scene_id in enumerate(reader.scene_ids()):
        seq = make_sequence(3, index, frames=4, image_size=(31, 31))
        for i, frame in enumerate(reader.scene(scene_id).frames):
            # 31 px written as 16 px (rounded up): K scales by 16/31 exactly, not by 1/2
            assert frame.image_size == (16, 16) and frame.image_path.endswith(f"images_2/frame_{i + 1:05d}.png")
            np.testing.assert_allclose(frame.intrinsics, np.diag([16 / 31, 16 / 31, 1]) @ seq.intrinsics[i], atol=1e-12)
            image, depth, ids = seq.render(i, (16, 16))
            np.testing.assert_array_equal(reader.load_image(frame), image)
            assert frame.depth_path.endswith("depths_2/frame_%05d.png" % (i + 1))
            _on_surfaces(seq, reader.load_depth(frame), ids, frame.intrinsics, frame.extrinsics, tol=1e-3)
            np.testing.assert_array_equal(reader.load_mask(frame), ids >= FIRST_OBJECT_ID)
    scene = reader.scene("scene_0000")
    data = load_window(reader, WindowRecord("w", "nerfstudio", "all", "scene_0000", scene.frames[:2]), CanonicalView(size=8),
                       with_depth=True)
    assert data.images.shape == (2, 8, 8, 3) and data.depth.shape == (2, 8, 8) and data.masks.shape == (2, 8, 8)
    assert reader.describe()["downscale"] == 2
    described = reader.describe()
    reopened = open_dataset(described.pop("name"), described.pop("root"), **described)
    assert reopened.scene("scene_0000").frames[0].image_size == (16, 16)


def test_scene_metadata_opens_no_image_without_downscale(synth: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: (opened.append(str(fp)), real_open(fp, *a, **k))[1])
    for scene in open_dataset("nerfstudio", synth).scenes():
        assert len(scene.frames) == 4
    assert opened == []
    for scene in open_dataset("nerfstudio", synth, downscale=2).scenes():
        assert scene.frames[-1].image_size == (16, 16)
    assert len(opened) == 2  # one header per scene (one camera size each)


def test_smaller_depth_maps_are_resampled_at_pixel_centres(tmp_path: Path) -> None:
    """Phone captures store depth below image resolution; nerfstudio resizes it nearest-neighbour."""
    root = _scene(tmp_path, size=(6, 8), frames=1)
    depth = np.arange(12, dtype=np.uint16).reshape(3, 4) * 1000 + 500
    Image.fromarray(depth).save(root / "d.png")
    meta = json.loads((root / "transforms.json").read_text())
    meta["frames"][0]["depth_file_path"] = "d.png"
    (root / "transforms.json").write_text(json.dumps(meta))
    reader = open_dataset("nerfstudio", root, depth_unit_scale_factor=0.01)
    d = reader.load_depth(reader.scene(reader.scene_ids()[0]).frames[0])
    assert d.shape == (6, 8)
    np.testing.assert_allclose(d, np.repeat(np.repeat(depth * 0.01, 2, 0), 2, 1), rtol=1e-6)
    Image.fromarray(np.zeros((5, 4), np.uint16)).save(root / "d.png")
    with pytest.raises(DatasetError, match="not a scaled copy") as e:
        reader.load_depth(reader.scene(reader.scene_ids()[0]).frames[0])
    assert e.value.path == str(root / "d.png") and e.value.field == "depth"


def test_scene_discovery(tmp_path: Path) -> None:
    _scene(tmp_path / "root" / "a" / "b" / "deep")
    _scene(tmp_path / "root" / "c")
    (tmp_path / "root" / ".hidden").mkdir()
    _scene(tmp_path / "root" / ".hidden" / "x")
    assert open_dataset("nerfstudio", tmp_path / "root").scene_ids() == ["a/b/deep", "c"]
    assert open_dataset("nerfstudio", tmp_path / "root", max_depth=1).scene_ids() == ["c"]
    frame = open_dataset("nerfstudio", tmp_path / "root").scene("a/b/deep").frames[0]
    assert frame.image_path == "a/b/deep/images/f0.png"
    single = open_dataset("nerfstudio", tmp_path / "root" / "c")  # the root is the scene
    assert single.scene_ids() == ["c"] and single.scene("c").frames[0].image_path == "images/f0.png"
    with pytest.raises(DatasetError, match="no transforms.json within 3 folder levels"):
        open_dataset("nerfstudio", tmp_path / "root" / "a" / "b" / "deep" / "images")


# ----------------------------------------------------------------------------------- bad input
def _scene(folder: Path, size: tuple[int, int] = (6, 8), frames: int = 2) -> Path:
    """A minimal valid scene: ``frames`` PNGs of ``size`` and a transforms.json with global intrinsics."""
    (folder / "images").mkdir(parents=True)
    H, W = size
    for i in range(frames):
        Image.fromarray(np.full((H, W, 3), 40 * i, np.uint8)).save(folder / "images" / f"f{i}.png")
    meta = {"camera_model": "OPENCV", "fl_x": 10.0, "fl_y": 11.0, "cx": W / 2, "cy": H / 2, "w": W, "h": H, "k1": 0.0,
            "frames": [{"file_path": f"images/f{i}.png", "transform_matrix": np.eye(4).tolist()} for i in range(frames)]}
    (folder / "transforms.json").write_text(json.dumps(meta))
    return folder


def _edit(folder: Path, meta: dict[str, Any] | None = None, frames: dict[str, Any] | None = None, drop: tuple[str, ...] = ()) -> None:
    path = folder / "transforms.json"
    d = json.loads(path.read_text())
    d.update(meta or {})
    for key in drop:
        d.pop(key)
    if frames:
        d["frames"][1].update(frames)
    path.write_text(json.dumps(d))


BAD_TRANSFORMS = [
    (dict(meta={"k1": 0.1}), "k1", "non-zero distortion k1=0.1"),
    (dict(frames={"p2": -0.002}), "frames[1].p2", "non-zero distortion p2=-0.002"),
    (dict(meta={"camera_model": "OPENCV_FISHEYE"}), "camera_model", "camera model 'OPENCV_FISHEYE' not supported"),
    (dict(drop=("fl_x",)), "frames[0].fl_x", "fl_x is missing"),
    (dict(frames={"fl_y": 12.0}), "frames[1].fl_y", "contradicts the global fl_y=11"),
    (dict(frames={"transform_matrix": (np.eye(4) * 2).tolist()}), "frames[1].transform_matrix", "last row"),
    (dict(frames={"transform_matrix": np.diag([1.0, 1, -1, 1]).tolist()}), "frames[1].transform_matrix", "not a proper rotation"),
    (dict(frames={"transform_matrix": [[1, 0, 0]]}), "frames[1].transform_matrix", "4x4"),
    (dict(frames={"file_path": "images/missing.png"}), "frames[1].file_path", "does not exist"),
    (dict(frames={"file_path": "../../x.png"}), "frames[1].file_path", "leaves the dataset root"),
    (dict(frames={"file_path": "images/f0.png"}), "frames[1].file_path", r"repeats frames\[0\]"),
    (dict(frames={"depth_file_path": "d.png"}), "frames[0].depth_file_path", "some frames only"),
    (dict(meta={"w": 8.5}), "w", "positive integer"),
    (dict(meta={"cx": "4"}), "cx", "finite number"),
    (dict(meta={"frames": []}), "frames", "non-empty list"),
]


@pytest.mark.parametrize("edit,field,match", BAD_TRANSFORMS)
def test_bad_transforms_name_file_and_key(tmp_path: Path, edit: dict, field: str, match: str) -> None:
    root = _scene(tmp_path / "s")
    _edit(root, **edit)
    reader = open_dataset("nerfstudio", root)
    with pytest.raises(DatasetError, match=match) as e:
        reader.scene("s")
    assert e.value.path == str(root / "transforms.json") and e.value.field == field and e.value.scene_id == "s"


def test_more_bad_input(tmp_path: Path) -> None:
    root = _scene(tmp_path / "s")
    (root / "transforms.json").write_text('{"frames": [\n  {"file_path": }]}')
    with pytest.raises(DatasetError, match="invalid JSON") as e:
        open_dataset("nerfstudio", root).scene("s")
    assert e.value.line == 2
    root = _scene(tmp_path / "t")
    with pytest.raises(DatasetError, match="needs a list 'test_filenames'") as e:
        open_dataset("nerfstudio", root, split="test").scene("t")
    _edit(root, meta={"train_filenames": ["images/nope.png"]})
    with pytest.raises(DatasetError, match="which is no frame's file_path") as e:
        open_dataset("nerfstudio", root, split="train").scene("t")
    assert e.value.field == "train_filenames"
    for options, field in (({"split": "eval"}, "split"), ({"downscale": 0}, "downscale"), ({"downscale": 1.5}, "downscale"),
                           ({"depth_unit_scale_factor": -1}, "depth_unit_scale_factor"), ({"max_depth": -1}, "max_depth")):
        with pytest.raises(DatasetError) as e:
            open_dataset("nerfstudio", root, **options)
        assert e.value.field == field
    # only images_4 exists: the error says how to read it
    (root / "images").rename(root / "images_4")
    with pytest.raises(DatasetError, match="pass the option downscale=N") as e:
        open_dataset("nerfstudio", root).scene("t")
    assert e.value.field == "frames[0].file_path"
    # images_4 holding images that are not a quarter of w x h
    with pytest.raises(DatasetError, match=r"size \(6, 8\) is not a 1/4 copy of the \(6, 8\) size") as e:
        open_dataset("nerfstudio", root, downscale=4).scene("t")
    assert e.value.path == str(root / "images_4" / "f0.png")
