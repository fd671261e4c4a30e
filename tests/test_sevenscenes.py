"""7-Scenes reader on the real ``stairs`` sample: splits, depth in metres, poses, cross-view geometry."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cameo_corr.datasets import open_dataset
from cameo_corr.datasets.canonical import CanonicalView, load_window
from cameo_corr.datasets.sevenscenes import DEPTH_INTRINSICS, SevenScenesReader
from cameo_corr.schemas import DatasetError, FrameRecord, WindowRecord, invert_extrinsics, project, unproject_depth


@pytest.fixture(scope="module")
def stairs(shared_data: Path) -> Path:
    return shared_data / "sevenscenes_stairs"


def test_splits(stairs: Path) -> None:
    assert SevenScenesReader(stairs, "test").scene_ids() == ["seq-01", "seq-04"]
    assert SevenScenesReader(stairs, "train").scene_ids() == ["seq-02", "seq-03"]
    assert open_dataset("7scenes", stairs, split="all").scene_ids() == ["seq-01", "seq-02", "seq-03", "seq-04"]
    with pytest.raises(DatasetError) as e:
        SevenScenesReader(stairs, "val")
    assert e.value.field == "split"


def test_frames_depth_and_poses(stairs: Path) -> None:
    reader = SevenScenesReader(stairs, "all")
    for scene in reader.scenes():
        scene.validate()
        assert [f.frame_id for f in scene.frames] == ["frame-000000", "frame-000001", "frame-000002"]
        for frame in scene.frames:
            np.testing.assert_array_equal(frame.intrinsics, [[585, 0, 320], [0, 585, 240], [0, 0, 1]])
            c2w = np.loadtxt(stairs / scene.scene_id / f"{frame.frame_id}.pose.txt")
            np.testing.assert_allclose(invert_extrinsics(frame.extrinsics), c2w, atol=5e-4)
            np.testing.assert_allclose(invert_extrinsics(frame.extrinsics)[:3, 3], c2w[:3, 3], atol=1e-12)
    frame = reader.scene("seq-02").frames[1]
    raw = np.asarray(Image.open(stairs / frame.depth_path))
    depth = reader.load_depth(frame)
    assert depth.dtype == np.float32 and depth.shape == (480, 640)
    invalid = (raw == 0) | (raw == 65535)
    assert invalid.any() and np.all(depth[invalid] == 0)
    np.testing.assert_allclose(depth[~invalid], raw[~invalid] / 1000.0, rtol=1e-6)
    assert 0.3 < np.median(depth[~invalid]) < 5.0  # metres, indoor stairs
    assert reader.load_image(frame).shape == (480, 640, 3)


def _reprojection_error(reader: SevenScenesReader, a: FrameRecord, b: FrameRecord, E_b: np.ndarray) -> tuple[float, float]:
    """(fraction of A's valid points seen by B, median |z - depth_B| / depth_B over them)."""
    da, db = reader.load_depth(a), reader.load_depth(b)
    X = unproject_depth(da, a.intrinsics, a.extrinsics)[da > 0]
    uv, z = project(X, b.intrinsics, E_b)
    px = np.floor(uv).astype(np.int64)
    inside = (z > 0) & (px[:, 0] >= 0) & (px[:, 0] < 640) & (px[:, 1] >= 0) & (px[:, 1] < 480)
    zb = db[px[inside, 1], px[inside, 0]]
    seen = zb > 0
    rel = np.abs(z[inside][seen] - zb[seen]) / zb[seen]
    return seen.sum() / len(X), float(np.median(rel))


def test_cross_sequence_geometry_agrees(stairs: Path) -> None:
    """Frame 0 of seq-01 unprojected and reprojected into frame 0 of seq-02 (same world frame) matches
    seq-02's depth; with seq-01's pose in place of seq-02's the same check fails."""
    reader = SevenScenesReader(stairs, "all")
    a = reader.scene("seq-01").frames[0]
    b = reader.scene("seq-02").frames[0]
    overlap, err = _reprojection_error(reader, a, b, b.extrinsics)
    assert overlap > 0.5 and err < 0.03
    _, wrong = _reprojection_error(reader, a, b, a.extrinsics)
    assert wrong > 0.1
    c = reader.scene("seq-04").frames[2]
    overlap, err = _reprojection_error(reader, reader.scene("seq-04").frames[0], c, c.extrinsics)
    assert overlap > 0.5 and err < 0.03


def test_load_window_with_depth(stairs: Path) -> None:
    reader = SevenScenesReader(stairs, "test")
    scene = reader.scene("seq-01")
    data = load_window(reader, WindowRecord("w", "7scenes", "test", "seq-01", scene.frames), CanonicalView(size=96), with_depth=True)
    assert data.depth.shape == (3, 96, 96) and data.masks is None
    np.testing.assert_allclose(data.intrinsics[0], [[585 * 0.2, 0, 48], [0, 585 * 0.2, 48], [0, 0, 1]])
    assert 0.0 < (data.depth == 0).mean() < 0.5


def _copy_scene(stairs: Path, tmp_path: Path, *, sensors: bool = True) -> Path:
    root = tmp_path / "stairs"
    root.mkdir()
    shutil.copytree(stairs / "seq-01", root / "seq-01")
    for name in ("TestSplit.txt", "TrainSplit.txt") + (("sensors.txt",) if sensors else ()):
        shutil.copy(stairs / name, root / name)
    (root / "seq-01").chmod(0o755)
    for p in (root / "seq-01").iterdir():
        p.chmod(0o644)
    return root


def test_intrinsics_source(stairs: Path, tmp_path: Path) -> None:
    root = _copy_scene(stairs, tmp_path, sensors=False)
    assert SevenScenesReader(root).depth_camera == DEPTH_INTRINSICS
    (root / "sensors.txt").write_text("# kapture format: 1.1\nkinect_depth, kinect_depth, depth, PINHOLE, 640, 480, 580, 590, 321, 239\n")
    K = SevenScenesReader(root).scene("seq-01").frames[0].intrinsics
    np.testing.assert_array_equal(K, [[580, 0, 321], [0, 590, 239], [0, 0, 1]])
    (root / "sensors.txt").write_text("# c\nkinect_depth, kinect_depth, depth, OPENCV, 640, 480, 5, 5, 3, 2, 0, 0, 0, 0\n")
    with pytest.raises(DatasetError, match="not supported") as e:
        SevenScenesReader(root)
    assert e.value.line == 2 and e.value.field == "model"
    (root / "sensors.txt").write_text("kinect_rgb, kinect_rgb, camera, SIMPLE_PINHOLE, 640, 480, 525, 320, 240\n")
    with pytest.raises(DatasetError, match="no sensor 'kinect_depth'"):
        SevenScenesReader(root)


def test_bad_files(stairs: Path, tmp_path: Path) -> None:
    root = _copy_scene(stairs, tmp_path)
    (root / "TestSplit.txt").write_text("sequence1\nseq two\n")
    with pytest.raises(DatasetError) as e:
        SevenScenesReader(root)
    assert e.value.line == 2 and e.value.field == "sequence" and e.value.path.endswith("TestSplit.txt")
    (root / "TestSplit.txt").write_text("sequence1\nsequence4\n")
    reader = SevenScenesReader(root)
    with pytest.raises(DatasetError, match="sequence folder does not exist") as e:
        reader.scene("seq-04")
    assert e.value.scene_id == "seq-04"
    pose = root / "seq-01" / "frame-000001.pose.txt"
    lines = pose.read_text().splitlines()

    def with_value(row: int, col: int, value: str) -> str:
        tokens = lines[row].split()
        tokens[col] = value
        return "\n".join(lines[:row] + [" ".join(tokens)] + lines[row + 1 :])

    pose.write_text(with_value(2, 2, "nan"))
    with pytest.raises(DatasetError, match="non-finite") as e:
        reader.scene("seq-01")
    assert e.value.line == 3 and e.value.path == str(pose) and e.value.scene_id == "seq-01"
    pose.write_text(with_value(0, 0, "1.9"))
    with pytest.raises(DatasetError, match="not rigid"):
        reader.scene("seq-01")
    pose.write_text("\n".join(lines[:3]))
    with pytest.raises(DatasetError, match="got 3 rows"):
        reader.scene("seq-01")
    pose.write_text("\n".join(lines))
    (root / "seq-01" / "frame-000002.depth.png").unlink()
    with pytest.raises(DatasetError, match="does not exist") as e:
        reader.scene("seq-01")
    assert e.value.field == "depth" and e.value.path.endswith("frame-000002.depth.png")


def test_depth_decoded_as_int32_mode_i(stairs: Path, tmp_path: Path) -> None:
    """Pillow < 10.3 hands 16-bit grey PNGs back in mode "I" (int32): same metres, and 8-bit depth is refused.

    The "I" image is stored as a TIFF under the ``.depth.png`` name (Pillow identifies files by content), which
    reproduces what those Pillow releases return for the real PNG.
    """
    root = _copy_scene(stairs, tmp_path)
    reader = SevenScenesReader(root)
    frame = reader.scene("seq-01").frames[0]
    expected = reader.load_depth(frame)
    path = root / frame.depth_path
    with Image.open(path) as im:
        raw = np.asarray(im).astype(np.int32)
    assert np.isin(raw, (0, 65535)).any() and (raw > 0).any()
    Image.fromarray(raw).save(path, format="TIFF")
    with Image.open(path) as im:
        assert im.mode == "I"
    np.testing.assert_array_equal(reader.load_depth(frame), expected)
    Image.fromarray((raw // 256).astype(np.uint8)).save(path, format="PNG")
    with pytest.raises(DatasetError, match="16-bit single-channel") as e:
        reader.load_depth(frame)
    assert e.value.path == str(path) and e.value.field == "depth"


@pytest.mark.slow
def test_real_rgbd_sample_through_the_nerfstudio_and_colmap_layouts(stairs: Path, tmp_path: Path) -> None:
    """The real stairs frames exported to a nerfstudio capture (millimetre PNGs, OpenGL camera-to-world)
    and to COLMAP projects (text model, dense depth maps) read back as the 7-Scenes reader reads them,
    and eval-corr on real, holey depth scores identically through all three readers."""
    import json

    from cameo_corr.datasets.colmap import ColmapImage, Camera, DEPTH_DIR, DEPTH_SUFFIX, rotmat_to_qvec, \
        write_colmap_array, write_colmap_model
    from cameo_corr.datasets.image_io import read_png16
    from cameo_corr.datasets.nerfstudio import opencv_w2c_to_opengl_c2w
    from cameo_corr.pipeline.backends.depth import DepthBackend
    from cameo_corr.pipeline.evaluate import EvalConfig, evaluate_backend

    ref = SevenScenesReader(stairs, "all")
    c = ref.depth_camera
    for scene in ref.scenes():
        ns, cm = tmp_path / "ns" / scene.scene_id, tmp_path / "colmap" / scene.scene_id
        for d in (ns / "images", ns / "depths", cm / "images"):
            d.mkdir(parents=True)
        frames, images = [], []
        for k, f in enumerate(scene.frames):
            name = Path(f.image_path).name
            for d in (ns, cm):
                (d / "images" / name).symlink_to(stairs / f.image_path)
            raw = read_png16(stairs / f.depth_path)
            raw[raw == 65535] = 0  # nerfstudio: 0 is the only invalid value
            Image.fromarray(raw).save(ns / "depths" / f"{f.frame_id}.png")
            frames.append({"file_path": f"images/{name}", "depth_file_path": f"depths/{f.frame_id}.png",
                           "transform_matrix": opencv_w2c_to_opengl_c2w(f.extrinsics).tolist()})
            write_colmap_array(cm / DEPTH_DIR / f"{name}{DEPTH_SUFFIX}", ref.load_depth(f))
            images.append(ColmapImage(k + 1, tuple(rotmat_to_qvec(f.extrinsics[:3, :3])), tuple(f.extrinsics[:3, 3]), 1,
                                      name, None))
        meta = {"camera_model": "PINHOLE", "fl_x": c["fx"], "fl_y": c["fy"], "cx": c["cx"], "cy": c["cy"], "w": c["width"],
                "h": c["height"], "frames": frames}
        (ns / "transforms.json").write_text(json.dumps(meta))
        camera = Camera(1, "SIMPLE_PINHOLE", c["width"], c["height"], (c["fx"], c["cx"], c["cy"]), None)
        write_colmap_model(cm / "sparse" / "0", [camera], images, binary=False)
    readers = [ref, open_dataset("nerfstudio", tmp_path / "ns"), open_dataset("colmap", tmp_path / "colmap")]
    assert readers[1].scene_ids() == readers[2].scene_ids() == ref.scene_ids()
    for sid in ref.scene_ids():
        for f0, f1, f2 in zip(*(r.scene(sid).frames for r in readers)):
            for f in (f1, f2):
                np.testing.assert_allclose(f.intrinsics, f0.intrinsics, rtol=0, atol=1e-12)
                np.testing.assert_allclose(f.extrinsics, f0.extrinsics, rtol=0, atol=1e-12)
                assert f.image_size == f0.image_size == (480, 640)
            depth = ref.load_depth(f0)
            np.testing.assert_array_equal(readers[1].load_depth(f1), depth)
            np.testing.assert_array_equal(readers[2].load_depth(f2), depth)
            np.testing.assert_array_equal(readers[1].load_image(f1), ref.load_image(f0))
    config = EvalConfig(views=3, windows=2, grid=(16, 16), size=128)
    reports = [evaluate_backend(r, DepthBackend(device="cpu"), config) for r in readers]
    assert reports[0]["windows_evaluated"] == 2 and reports[0]["overall"]["masked"] > 0
    assert reports[1]["overall"] == reports[0]["overall"] == reports[2]["overall"]
    assert reports[1]["bins"] == reports[0]["bins"] == reports[2]["bins"]
