"""COLMAP reader: text and binary models of synthetic scenes (every supported camera model, exact
cameras and dense depth), quaternions against SciPy, the binary and dense-array formats against
hand-packed bytes, downscaled images, bad input naming file, line and field, and eval-corr."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy.spatial.transform import Rotation

from cameo_corr.datasets import open_dataset
from cameo_corr.datasets.colmap import (
    CAMERA_PARAMS,
    ColmapReader,
    qvec_to_rotmat,
    read_cameras_binary,
    read_colmap_array,
    read_images_binary,
    rotmat_to_qvec,
    write_colmap_array,
)
from cameo_corr.datasets.synthetic import generate_dataset, make_sequence
from cameo_corr.schemas import DatasetError, project, unproject_depth

quaternions = st.tuples(*[st.floats(-1, 1) for _ in range(4)]).filter(lambda q: np.linalg.norm(q) > 0.2)


@settings(max_examples=80, deadline=None)
@given(q=quaternions, t=st.tuples(*[st.floats(-50, 50)] * 3), X=st.tuples(*[st.floats(-20, 20)] * 3))
def test_quaternions_against_scipy(q, t, X) -> None:
    """COLMAP's (QW, QX, QY, QZ) is a Hamilton quaternion, scalar first (SciPy wants scalar last)."""
    q = np.asarray(q) / np.linalg.norm(q)
    R = Rotation.from_quat([q[1], q[2], q[3], q[0]]).as_matrix()
    np.testing.assert_allclose(qvec_to_rotmat(q), R, atol=1e-12)
    back = rotmat_to_qvec(R)
    assert back[0] >= 0 and abs(np.linalg.norm(back) - 1) < 1e-12
    assert np.allclose(back, q, atol=1e-9) or np.allclose(back, -q, atol=1e-9)  # q and -q: one rotation
    # world-to-camera: x_cam = R X + t, as COLMAP's projection (ours, with E = [R t])
    K = np.array([[100.0, 0, 50], [0, 90.0, 40], [0, 0, 1]])
    E = np.eye(4)
    E[:3, :3], E[:3, 3] = qvec_to_rotmat(q), t
    xc = R @ np.asarray(X) + np.asarray(t)
    if abs(xc[2]) > 1e-3:
        uv, z = project(np.asarray(X), K, E)
        np.testing.assert_allclose(uv, (K @ xc)[:2] / xc[2], rtol=1e-9, atol=1e-9)


def test_dense_array_format_against_hand_packed_bytes(tmp_path: Path) -> None:
    """``width&height&channels&`` then float32 column-major [width, height, channels] (x fastest)."""
    W, H, C = 3, 2, 2
    values = np.arange(W * H * C, dtype=np.float32) + 0.25
    (tmp_path / "a.bin").write_bytes(b"3&2&2&" + struct.pack(f"<{W * H * C}f", *values))
    arr = read_colmap_array(tmp_path / "a.bin")
    assert arr.shape == (H, W, C)
    for x in range(W):
        for y in range(H):
            for c in range(C):
                assert arr[y, x, c] == values[x + W * y + W * H * c]
    write_colmap_array(tmp_path / "b.bin", arr)
    assert (tmp_path / "b.bin").read_bytes() == (tmp_path / "a.bin").read_bytes()
    for data, match in ((b"3&2&", "header"), (b"3&x&1&" + bytes(24), "malformed header"),
                        (b"3&2&1&" + bytes(20), "needs 24 bytes"), (b"0&2&1&", "empty array")):
        (tmp_path / "c.bin").write_bytes(data)
        with pytest.raises(DatasetError, match=match) as e:
            read_colmap_array(tmp_path / "c.bin")
        assert e.value.path == str(tmp_path / "c.bin")


def test_binary_model_against_hand_packed_bytes(tmp_path: Path) -> None:
    cams = struct.pack("<Q", 2) + struct.pack("<iiQQ", 7, 1, 640, 480) + struct.pack("<4d", 500, 510, 320, 240) \
        + struct.pack("<iiQQ", 9, 2, 64, 48) + struct.pack("<4d", 50, 32, 24, 0.0)
    (tmp_path / "cameras.bin").write_bytes(cams)
    cameras = read_cameras_binary(tmp_path / "cameras.bin")
    assert cameras[7].model == "PINHOLE" and cameras[7].params == (500, 510, 320, 240) and cameras[7].width == 640
    assert cameras[9].model == "SIMPLE_RADIAL" and cameras[9].height == 48
    imgs = struct.pack("<Q", 2)
    imgs += struct.pack("<i4d3di", 3, 1, 0, 0, 0, 1, 2, 3, 7) + b"a/b.jpg\x00" + struct.pack("<Q", 2) + bytes(48)
    imgs += struct.pack("<i4d3di", 1, 0, 1, 0, 0, 0, 0, 0, 9) + b"c.png\x00" + struct.pack("<Q", 0)
    (tmp_path / "images.bin").write_bytes(imgs)
    images = read_images_binary(tmp_path / "images.bin")
    assert [(i.image_id, i.name, i.camera_id, i.qvec, i.tvec) for i in images] == [
        (3, "a/b.jpg", 7, (1, 0, 0, 0), (1, 2, 3)), (1, "c.png", 9, (0, 1, 0, 0), (0, 0, 0))]
    (tmp_path / "images.bin").write_bytes(imgs[:-3])
    with pytest.raises(DatasetError, match="truncated binary file") as e:
        read_images_binary(tmp_path / "images.bin")
    assert e.value.field == "images[1].num_points2D"
    (tmp_path / "images.bin").write_bytes(imgs + b"\x00")
    with pytest.raises(DatasetError, match="trailing bytes after 2 images"):
        read_images_binary(tmp_path / "images.bin")
    (tmp_path / "cameras.bin").write_bytes(cams[:8 + 24] + struct.pack("<iiQQ", 9, 5, 64, 48))
    (tmp_path / "cameras.bin").write_bytes(struct.pack("<Q", 1) + struct.pack("<iiQQ", 4, 5, 64, 48) + bytes(64))
    with pytest.raises(DatasetError, match="camera 4: camera model OPENCV_FISHEYE not supported") as e:
        read_cameras_binary(tmp_path / "cameras.bin")
    assert e.value.field == "MODEL"


# ------------------------------------------------------------------------------ synthetic layout
@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("colmap") / "data", scenes=5, frames=3, image_size=25, seed=4,
                            layout="colmap", image_format="png")


def test_synthetic_models_read_back_exactly(synth: Path) -> None:
    reader = open_dataset("colmap", synth)
    assert isinstance(reader, ColmapReader) and reader.has_depth
    assert reader.scene_ids() == [f"scene_{i:04d}" for i in range(5)]
    written = []
    for index, scene_id in enumerate(reader.scene_ids()):
        model = synth / scene_id / "sparse" / "0"
        binary = (model / "cameras.bin").is_file()
        assert binary == (index % 2 == 1)
        first = (model / "cameras.txt").read_text().splitlines()[-1].split() if not binary else None
        written.append(first[1] if first else read_cameras_binary(model / "cameras.bin")[1].model)
        seq = make_sequence(4, index, frames=3, image_size=(25, 25))
        scene = reader.scene(scene_id)
        assert [f.frame_id for f in scene.frames] == ["frame_00001.png", "frame_00002.png", "frame_00003.png"]
        for i, frame in enumerate(scene.frames):
            assert frame.image_path == f"{scene_id}/images/frame_{i + 1:05d}.png" and frame.image_size == (25, 25)
            np.testing.assert_allclose(frame.intrinsics, seq.intrinsics[i], rtol=0, atol=1e-12)
            np.testing.assert_allclose(frame.extrinsics, seq.extrinsics[i], rtol=0, atol=1e-12)
            image, depth, ids = seq.render(i)
            np.testing.assert_array_equal(reader.load_image(frame), image)
            np.testing.assert_array_equal(reader.load_depth(frame), depth)  # float32, exact
            points = unproject_depth(depth, frame.intrinsics, frame.extrinsics)
            for k, surface in enumerate(seq.scene.surfaces):
                if (ids == k).any():
                    assert surface.distance(points[ids == k]).max() < 1e-4
            assert reader.load_mask(frame) is None
    assert written == list(CAMERA_PARAMS)  # every supported model, text and binary


def test_downscaled_images_and_full_size_depth(synth: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: (opened.append(str(fp)), real_open(fp, *a, **k))[1])
    assert all(len(s.frames) == 3 for s in open_dataset("colmap", synth).scenes()) and opened == []  # metadata only
    reader = open_dataset("colmap", synth, downscale=2)
    scene = reader.scene("scene_0002")
    assert len(opened) == 1  # one header for the scene's one camera
    seq = make_sequence(4, 2, frames=3, image_size=(25, 25))
    for i, frame in enumerate(scene.frames):
        assert frame.image_size == (13, 13) and frame.image_path == f"scene_0002/images_2/frame_{i + 1:05d}.png"
        np.testing.assert_allclose(frame.intrinsics, np.diag([13 / 25, 13 / 25, 1]) @ seq.intrinsics[i], atol=1e-12)
        np.testing.assert_array_equal(reader.load_image(frame), seq.render(i, (13, 13))[0])
        depth = reader.load_depth(frame)  # the 25 px depth map sampled at the 13 px pixel centres
        full = seq.render(i)[1]
        idx = np.minimum(((np.arange(13) + 0.5) * 25 / 13).astype(int), 24)
        np.testing.assert_array_equal(depth, full[np.ix_(idx, idx)])


# ----------------------------------------------------------------------------------- bad input
def _project(folder: Path, cameras: str, images: str) -> Path:
    (folder / "sparse" / "0").mkdir(parents=True)
    (folder / "images").mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(folder / "images" / name)
    (folder / "sparse" / "0" / "cameras.txt").write_text(cameras)
    (folder / "sparse" / "0" / "images.txt").write_text(images)
    return folder


GOOD_CAMERAS = "# comment\n1 PINHOLE 8 6 10 10 4 3\n2 OPENCV 8 6 10 10 4 3 0 0 0 0\n"
GOOD_IMAGES = "# comment\n1 1 0 0 0 0 0 0 1 a.png\n1.5 2.5 -1\n2 1 0 0 0 0 0 1 2 b.png\n\n"

BAD_MODELS = [
    ("cameras", "1 OPENCV_FISHEYE 8 6 10 10 4 3 0 0 0 0\n", 1, "MODEL", "camera model OPENCV_FISHEYE not supported"),
    ("cameras", "1 SIMPLE_RADIAL 8 6 10 4 3 0.01\n", 1, "PARAMS.k", "non-zero distortion k=0.01"),
    ("cameras", "1 OPENCV 8 6 10 10 4 3 0 0 0.001 0\n", 1, "PARAMS.p1", "non-zero distortion p1=0.001"),
    ("cameras", "1 PINHOLE 8 6 10 10 4\n", 1, "PARAMS", "takes 4 parameters"),
    ("cameras", "1 PINHOLE 8 6 10 nan 4 3\n", 1, "PARAMS", "non-finite"),
    ("cameras", "1 PINHOLE 8 0 10 10 4 3\n", 1, "WIDTH", "must be positive"),
    ("cameras", "1 PINHOLE 8 6 -10 10 4 3\n", 1, "PARAMS", "focal lengths must be positive"),
    ("cameras", "x PINHOLE 8 6 10 10 4 3\n", 1, "CAMERA_ID", "expected an integer"),
    ("images", "1 1 0 0 0 0 0 0 3 a.png\n\n", 1, "CAMERA_ID", "camera 3 is not in cameras.txt"),
    ("images", "1 0.5 0 0 0 0 0 0 1 a.png\n\n", 1, "QW QX QY QZ", "quaternion norm 0.500000 is not 1"),
    ("images", "1 1 0 0 0 0 0 0 1 a.png\n\n2 1 0 0 0 0 0 0 1 a.png\n\n", 3, "NAME", "repeats image 1"),
    ("images", "1 1 0 0 0 0 0 0 1 c.png\n\n", 1, "NAME", "does not exist"),
    ("images", "1 1 0 0 0 0 0 0 1 ../a.png\n\n", 1, "NAME", "leaves the images folder"),
    ("images", "1 1 0 0 0 0 0 1 a.png\n", 1, "columns", "10 fields"),
    ("images", "1 1 0 0 zero 0 0 0 1 a.png\n", 1, "QZ", "malformed number"),
    ("images", "# nothing\n", None, None, "no registered images"),
]


@pytest.mark.parametrize("which,text,line,field,match", BAD_MODELS)
def test_bad_models_name_file_line_and_field(tmp_path: Path, which: str, text: str, line, field, match: str) -> None:
    cameras = text if which == "cameras" else "1 PINHOLE 8 6 10 10 4 3\n"
    images = text if which == "images" else GOOD_IMAGES.replace(" 2 b.png", " 1 b.png")
    root = _project(tmp_path / "p", cameras, images)
    with pytest.raises(DatasetError, match=match) as e:
        open_dataset("colmap", root).scene("p")
    assert e.value.path == str(root / "sparse" / "0" / f"{which}.txt")
    assert (e.value.line, e.value.field, e.value.scene_id) == (line, field, "p")


def test_good_text_model_and_options(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", GOOD_CAMERAS, GOOD_IMAGES)
    scene = open_dataset("colmap", root).scene("p")
    assert [f.frame_id for f in scene.frames] == ["a.png", "b.png"]
    np.testing.assert_allclose(scene.frames[1].extrinsics[:3, 3], [0, 0, 1])
    assert all(f.depth_path is None for f in scene.frames)
    with pytest.raises(DatasetError, match="no splits") as e:
        open_dataset("colmap", root, split="train")
    assert e.value.field == "split"
    with pytest.raises(DatasetError, match="no COLMAP model"):
        open_dataset("colmap", root / "images")
    # a dense workspace: sparse/ holds the model directly, stereo/depth_maps the depth
    dense = tmp_path / "dense"
    (dense / "sparse").mkdir(parents=True)
    (dense / "images").mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(dense / "images" / name)
    for name in ("cameras.txt", "images.txt"):
        (dense / "sparse" / name).write_text((root / "sparse" / "0" / name).read_text())
    write_colmap_array(dense / "stereo" / "depth_maps" / "a.png.geometric.bin", np.full((3, 4), 2.0))
    write_colmap_array(dense / "stereo" / "depth_maps" / "b.png.geometric.bin", np.full((6, 8, 3), 2.0))
    reader = open_dataset("colmap", tmp_path, tag="mine")
    assert reader.scene_ids() == ["dense", "p"]
    frames = reader.scene("dense").frames
    assert reader.scene("dense").dataset == "mine" and reader.describe()["tag"] == "mine"
    np.testing.assert_array_equal(reader.load_depth(frames[0]), np.full((6, 8), 2.0, np.float32))  # resampled
    with pytest.raises(DatasetError, match="a depth map has 1 channel, this array has 3"):
        reader.load_depth(frames[1])
