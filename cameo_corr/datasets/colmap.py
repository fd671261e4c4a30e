"""COLMAP reconstructions (MVImgNet, Mip-NeRF 360, ETH3D, Tanks and Temples, any ``colmap mapper`` output).

Layout of one scene (a COLMAP project or a dense workspace)::

    <root>/<scene...>/sparse/0/cameras.{bin,txt}    found up to ``max_depth`` (default 3) levels below the
    <scene>/sparse/0/images.{bin,txt}               root (the root itself may be the scene); a dense
                                                    workspace's ``sparse/cameras.*`` is used when there
                                                    is no ``sparse/0``; binary files when both exist
    <scene>/images/<name>                           ``NAME`` of images.*, may contain sub-folders
    <scene>/images_N/<name>                         downscaled copies, read with the option ``downscale=N``
    <scene>/stereo/depth_maps/<name>.geometric.bin  optional dense depth (COLMAP's array format)

``points3D.*`` is not needed. Camera models: ``SIMPLE_PINHOLE`` (f cx cy), ``PINHOLE`` (fx fy cx cy),
and ``SIMPLE_RADIAL`` (f cx cy k), ``RADIAL`` (f cx cy k1 k2), ``OPENCV`` (fx fy cx cy k1 k2 p1 p2)
only with all distortion coefficients zero; any other model or non-zero distortion is refused naming
the file, the camera and the field (undistort with ``colmap image_undistorter`` first: its output is
``PINHOLE``). Poses: ``QW QX QY QZ TX TY TZ`` are the world-to-camera rotation (Hamilton unit
quaternion, scalar first) and translation in OpenCV axes, i.e. exactly our extrinsics
(:func:`qvec_to_rotmat`); a quaternion whose norm is off 1 by more than 1e-3 is an error.

Pixel convention: "COLMAP uses the convention that the upper left image corner has coordinate
``(0, 0)`` and the center of the upper left most pixel has coordinate ``(0.5, 0.5)``" (COLMAP's
database format documentation, keypoints; its default principal point is ``(w/2, h/2)`` and pycolmap's
own examples cast rays through pixel index + 0.5). That is the project's convention, so ``cx, cy`` are
used unchanged (no half-pixel shift); the synthetic COLMAP scenes, rendered through ``(col + 0.5, row +
0.5)`` and written with unchanged ``cx, cy``, read back onto the exact analytic surfaces.

Depth maps: COLMAP's dense array format, a text header ``width&height&channels&`` followed by
little-endian float32 values in column-major ``[width, height, channels]`` order (x fastest), one
channel; z-depth in model units, values ``<= 0`` or non-finite invalid (0). A depth map at another size
than its image (``--PatchMatchStereo.max_image_size``, or ``downscale``) is resampled nearest-neighbour
at pixel centres. Image sizes come from ``cameras.*`` (no image is opened) unless ``downscale=N``,
where one image header per distinct camera size gives the size, which must be within a pixel of ``(w/N, h/N)``, and
``K' = diag(W'/w, H'/h, 1) K``.

Frames are the registered images sorted by name; ``frame_id`` is the image name. COLMAP models carry
no split: the only split is ``all``.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np

from cameo_corr.datasets.base import DEFAULT_MAX_DEPTH, SceneFolderReader, existing_files
from cameo_corr.datasets.image_io import downscaled_size, resize_nearest
from cameo_corr.schemas import DatasetError, FrameRecord, SceneRecord, SchemaError, make_extrinsics, validate_camera

MODEL_DIRS = ("sparse/0", "sparse")
"""Where a scene's model is looked for, in this order."""
DEPTH_DIR = "stereo/depth_maps"
DEPTH_SUFFIX = ".geometric.bin"
CAMERA_MODEL_IDS: dict[int, str] = {
    0: "SIMPLE_PINHOLE", 1: "PINHOLE", 2: "SIMPLE_RADIAL", 3: "RADIAL", 4: "OPENCV", 5: "OPENCV_FISHEYE",
    6: "FULL_OPENCV", 7: "FOV", 8: "SIMPLE_RADIAL_FISHEYE", 9: "RADIAL_FISHEYE", 10: "THIN_PRISM_FISHEYE",
}
"""COLMAP's camera model ids (binary files)."""
CAMERA_PARAMS: dict[str, tuple[str, ...]] = {
    "SIMPLE_PINHOLE": ("f", "cx", "cy"),
    "PINHOLE": ("fx", "fy", "cx", "cy"),
    "SIMPLE_RADIAL": ("f", "cx", "cy", "k"),
    "RADIAL": ("f", "cx", "cy", "k1", "k2"),
    "OPENCV": ("fx", "fy", "cx", "cy", "k1", "k2", "p1", "p2"),
}
"""The supported models and their parameters (the ones after ``cx, cy`` are distortion, which must be 0)."""
_IMAGE_HEADER = struct.Struct("<i4d3di")
_CAMERA_HEADER = struct.Struct("<iiQQ")
_POINT2D_BYTES = struct.calcsize("<ddq")


# ------------------------------------------------------------------------------------ conversions
def qvec_to_rotmat(q: Sequence[float]) -> np.ndarray:
    """Rotation matrix of a unit quaternion ``(qw, qx, qy, qz)`` (Hamilton, scalar first)."""
    w, x, y, z = (float(v) for v in q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def rotmat_to_qvec(R: np.ndarray) -> np.ndarray:
    """Unit quaternion ``(qw, qx, qy, qz)`` with ``qw >= 0`` of a rotation matrix (inverse of
    :func:`qvec_to_rotmat`; Shepperd's method, branching on the largest diagonal term for stability)."""
    R = np.asarray(R, dtype=np.float64)
    tr = R[0, 0] + R[1, 1] + R[2, 2]
    if tr > 0:
        s = 2.0 * math.sqrt(tr + 1.0)
        q = [s / 4, (R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s]
    elif R[0, 0] > R[1, 1] and R[0, 0] > R[2, 2]:
        s = 2.0 * math.sqrt(1.0 + R[0, 0] - R[1, 1] - R[2, 2])
        q = [(R[2, 1] - R[1, 2]) / s, s / 4, (R[0, 1] + R[1, 0]) / s, (R[0, 2] + R[2, 0]) / s]
    elif R[1, 1] > R[2, 2]:
        s = 2.0 * math.sqrt(1.0 + R[1, 1] - R[0, 0] - R[2, 2])
        q = [(R[0, 2] - R[2, 0]) / s, (R[0, 1] + R[1, 0]) / s, s / 4, (R[1, 2] + R[2, 1]) / s]
    else:
        s = 2.0 * math.sqrt(1.0 + R[2, 2] - R[0, 0] - R[1, 1])
        q = [(R[1, 0] - R[0, 1]) / s, (R[0, 2] + R[2, 0]) / s, (R[1, 2] + R[2, 1]) / s, s / 4]
    qv = np.array(q) / np.linalg.norm(q)
    return qv if qv[0] >= 0 else -qv


def camera_matrix(model: str, params: Sequence[float]) -> np.ndarray:
    """Pixel ``K`` of a supported camera model (distortion parameters are not looked at here)."""
    if model in ("SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL"):
        f, cx, cy = params[:3]
        fx = fy = f
    else:
        fx, fy, cx, cy = params[:4]
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=np.float64)


# ----------------------------------------------------------------------------------- model files
@dataclass(frozen=True)
class Camera:
    """One camera of ``cameras.*``; ``line`` is its line in a text file (``None`` in a binary one)."""

    camera_id: int
    model: str
    width: int
    height: int
    params: tuple[float, ...]
    line: int | None


@dataclass(frozen=True)
class ColmapImage:
    """One registered image of ``images.*``."""

    image_id: int
    qvec: tuple[float, float, float, float]
    tvec: tuple[float, float, float]
    camera_id: int
    name: str
    line: int | None


def _text_lines(path: Path, scene_id: str | None) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(str(path), f"cannot read: {e}", scene_id=scene_id) from e


def _parse_numbers(tokens: Sequence[str], names: Sequence[str], path: Path, line: int, scene_id: str | None) -> list[float]:
    out = []
    for name, tok in zip(names, tokens):
        try:
            v = float(tok)
        except ValueError:
            raise DatasetError(str(path), f"malformed number {tok!r}", line=line, field=name, scene_id=scene_id) from None
        if not math.isfinite(v):
            raise DatasetError(str(path), f"non-finite value {tok!r}", line=line, field=name, scene_id=scene_id)
        out.append(v)
    return out


def _parse_int(tok: str, path: Path, line: int, field: str, scene_id: str | None) -> int:
    try:
        return int(tok)
    except ValueError:
        raise DatasetError(str(path), f"expected an integer, got {tok!r}", line=line, field=field, scene_id=scene_id) from None


def _check_camera(cam: Camera, path: Path, scene_id: str | None) -> Camera:
    """Refuse unsupported models, wrong parameter counts, bad sizes and non-zero distortion."""
    where = {"line": cam.line, "scene_id": scene_id}
    label = f"camera {cam.camera_id}"
    if cam.model not in CAMERA_PARAMS:
        raise DatasetError(str(path), f"{label}: camera model {cam.model} not supported (supported: {tuple(CAMERA_PARAMS)}, "
                           "distortion zero; undistort with colmap image_undistorter)", field="MODEL", **where)
    names = CAMERA_PARAMS[cam.model]
    if len(cam.params) != len(names):
        raise DatasetError(str(path), f"{label}: {cam.model} takes {len(names)} parameters {names}, got {len(cam.params)}",
                           field="PARAMS", **where)
    if cam.width <= 0 or cam.height <= 0:
        raise DatasetError(str(path), f"{label}: image size must be positive, got {cam.width}x{cam.height}",
                           field="WIDTH", **where)
    if not all(math.isfinite(p) for p in cam.params):
        raise DatasetError(str(path), f"{label}: non-finite parameter in {cam.params}", field="PARAMS", **where)
    n_pinhole = 3 if names[0] == "f" else 4
    for name, value in zip(names[n_pinhole:], cam.params[n_pinhole:]):
        if value != 0.0:
            raise DatasetError(str(path), f"{label}: non-zero distortion {name}={value:g} ({cam.model}); undistort the "
                               "images first (colmap image_undistorter); only pinhole images are read",
                               field=f"PARAMS.{name}", **where)
    return cam


def read_cameras_text(path: Path, scene_id: str | None = None) -> dict[int, Camera]:
    """``cameras.txt``: ``CAMERA_ID MODEL WIDTH HEIGHT PARAMS[]`` per line, ``#`` comments."""
    cameras: dict[int, Camera] = {}
    for line_no, raw in enumerate(_text_lines(path, scene_id), start=1):
        tokens = raw.split()
        if not tokens or tokens[0].startswith("#"):
            continue
        if len(tokens) < 4:
            raise DatasetError(str(path), "expected CAMERA_ID MODEL WIDTH HEIGHT PARAMS[]", line=line_no, field="columns",
                               scene_id=scene_id)
        cam_id = _parse_int(tokens[0], path, line_no, "CAMERA_ID", scene_id)
        if cam_id in cameras:
            raise DatasetError(str(path), f"camera {cam_id} defined twice", line=line_no, field="CAMERA_ID", scene_id=scene_id)
        cam = Camera(cam_id, tokens[1], _parse_int(tokens[2], path, line_no, "WIDTH", scene_id),
                     _parse_int(tokens[3], path, line_no, "HEIGHT", scene_id),
                     tuple(_parse_numbers(tokens[4:], ["PARAMS"] * len(tokens[4:]), path, line_no, scene_id)), line_no)
        cameras[cam_id] = _check_camera(cam, path, scene_id)
    return cameras


def read_images_text(path: Path, scene_id: str | None = None) -> list[ColmapImage]:
    """``images.txt``: per image a line ``IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME`` followed by one
    line of 2D points (possibly empty, not parsed)."""
    lines = _text_lines(path, scene_id)
    images: list[ColmapImage] = []
    k = 0
    while k < len(lines):
        tokens = lines[k].split()
        line_no = k + 1
        if not tokens or tokens[0].startswith("#"):
            k += 1
            continue
        if len(tokens) != 10:
            raise DatasetError(str(path), f"expected IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME (10 fields), got "
                               f"{len(tokens)}", line=line_no, field="columns", scene_id=scene_id)
        v = _parse_numbers(tokens[1:8], ("QW", "QX", "QY", "QZ", "TX", "TY", "TZ"), path, line_no, scene_id)
        images.append(ColmapImage(_parse_int(tokens[0], path, line_no, "IMAGE_ID", scene_id), (v[0], v[1], v[2], v[3]),
                            (v[4], v[5], v[6]), _parse_int(tokens[8], path, line_no, "CAMERA_ID", scene_id), tokens[9],
                            line_no))
        k += 2  # the POINTS2D line belongs to this image, even when it is empty
    return images


def _read(f: BinaryIO, n: int, path: Path, field: str, scene_id: str | None) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise DatasetError(str(path), "truncated binary file", field=field, scene_id=scene_id)
    return data


def _open_binary(path: Path, scene_id: str | None) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as e:
        raise DatasetError(str(path), f"cannot read: {e}", scene_id=scene_id) from e


def read_cameras_binary(path: Path, scene_id: str | None = None) -> dict[int, Camera]:
    """``cameras.bin``: uint64 count, then per camera int32 id, int32 model id, uint64 width, height and
    float64 parameters (little-endian)."""
    cameras: dict[int, Camera] = {}
    with _open_binary(path, scene_id) as f:
        (count,) = struct.unpack("<Q", _read(f, 8, path, "num_cameras", scene_id))
        for k in range(count):
            cam_id, model_id, width, height = _CAMERA_HEADER.unpack(_read(f, _CAMERA_HEADER.size, path, f"cameras[{k}]", scene_id))
            model = CAMERA_MODEL_IDS.get(model_id, f"<unknown model id {model_id}>")
            if model not in CAMERA_PARAMS:
                _check_camera(Camera(cam_id, model, width, height, (), None), path, scene_id)
            n = len(CAMERA_PARAMS[model])
            params = struct.unpack(f"<{n}d", _read(f, 8 * n, path, f"cameras[{k}].params", scene_id))
            if cam_id in cameras:
                raise DatasetError(str(path), f"camera {cam_id} defined twice", field=f"cameras[{k}].camera_id", scene_id=scene_id)
            cameras[cam_id] = _check_camera(Camera(cam_id, model, width, height, params, None), path, scene_id)
        if f.read(1):
            raise DatasetError(str(path), f"trailing bytes after {count} cameras", field="num_cameras", scene_id=scene_id)
    return cameras


def read_images_binary(path: Path, scene_id: str | None = None) -> list[ColmapImage]:
    """``images.bin``: uint64 count, then per image int32 id, 4+3 float64 (qvec, tvec), int32 camera id,
    NUL-terminated name, uint64 number of 2D points and that many (float64 x, y, int64 point id) records."""
    images: list[ColmapImage] = []
    size = path.stat().st_size
    with _open_binary(path, scene_id) as f:
        (count,) = struct.unpack("<Q", _read(f, 8, path, "num_reg_images", scene_id))
        for k in range(count):
            values = _IMAGE_HEADER.unpack(_read(f, _IMAGE_HEADER.size, path, f"images[{k}]", scene_id))
            name = bytearray()
            while (c := _read(f, 1, path, f"images[{k}].name", scene_id)) != b"\x00":
                name += c
            (n2d,) = struct.unpack("<Q", _read(f, 8, path, f"images[{k}].num_points2D", scene_id))
            f.seek(n2d * _POINT2D_BYTES, 1)
            if f.tell() > size:
                raise DatasetError(str(path), "truncated binary file", field=f"images[{k}].points2D", scene_id=scene_id)
            try:
                text = name.decode("utf-8")
            except UnicodeDecodeError:
                raise DatasetError(str(path), f"image name is not UTF-8: {bytes(name)!r}", field=f"images[{k}].name",
                                   scene_id=scene_id) from None
            q, t = values[1:5], values[5:8]
            if not all(math.isfinite(v) for v in values[1:8]):
                raise DatasetError(str(path), f"image {values[0]}: non-finite pose {values[1:8]}", field=f"images[{k}].qvec",
                                   scene_id=scene_id)
            images.append(ColmapImage(values[0], q, t, values[8], text, None))
        if f.tell() != size:
            raise DatasetError(str(path), f"trailing bytes after {count} images", field="num_reg_images", scene_id=scene_id)
    return images


def write_colmap_model(folder: Path, cameras: Sequence[Camera], images: Sequence[ColmapImage], *, binary: bool,
                       points2d: Sequence[Sequence[tuple[float, float, int]]] | None = None) -> None:
    """Write ``cameras``, ``images`` (with optional 2D points per image) and an empty ``points3D`` in
    COLMAP's text or binary format (what :func:`read_cameras_text` and friends read)."""
    folder.mkdir(parents=True, exist_ok=True)
    points2d = points2d or [[] for _ in images]
    if binary:
        ids = {name: k for k, name in CAMERA_MODEL_IDS.items()}
        with open(folder / "cameras.bin", "wb") as f:
            f.write(struct.pack("<Q", len(cameras)))
            for c in cameras:
                f.write(_CAMERA_HEADER.pack(c.camera_id, ids[c.model], c.width, c.height))
                f.write(struct.pack(f"<{len(c.params)}d", *c.params))
        with open(folder / "images.bin", "wb") as f:
            f.write(struct.pack("<Q", len(images)))
            for im, pts in zip(images, points2d):
                f.write(_IMAGE_HEADER.pack(im.image_id, *im.qvec, *im.tvec, im.camera_id))
                f.write(im.name.encode("utf-8") + b"\x00")
                f.write(struct.pack("<Q", len(pts)))
                for x, y, pid in pts:
                    f.write(struct.pack("<ddq", x, y, pid))
        (folder / "points3D.bin").write_bytes(struct.pack("<Q", 0))
        return
    cam_lines = ["# Camera list with one line of data per camera:", "#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]"]
    cam_lines += [" ".join([str(c.camera_id), c.model, str(c.width), str(c.height), *(repr(float(p)) for p in c.params)])
                  for c in cameras]
    (folder / "cameras.txt").write_text("\n".join(cam_lines) + "\n", encoding="utf-8")
    img_lines = ["# Image list with two lines of data per image:", "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME",
                 "#   POINTS2D[] as (X, Y, POINT3D_ID)"]
    for im, pts in zip(images, points2d):
        img_lines.append(" ".join([str(im.image_id), *(repr(float(v)) for v in (*im.qvec, *im.tvec)), str(im.camera_id),
                                   im.name]))
        img_lines.append(" ".join(f"{x!r} {y!r} {pid}" for x, y, pid in pts))
    (folder / "images.txt").write_text("\n".join(img_lines) + "\n", encoding="utf-8")
    (folder / "points3D.txt").write_text("# 3D point list with one line of data per point:\n", encoding="utf-8")


def read_colmap_array(path: Path, scene_id: str | None = None) -> np.ndarray:
    """A COLMAP dense array file (``*.geometric.bin`` depth/normal maps) as float32 ``[H, W, C]``.

    Format: ASCII ``width&height&channels&`` then ``width*height*channels`` little-endian float32 values,
    column-major over ``[width, height, channels]`` (x varies fastest, then y, then the channel).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(str(path), "depth map does not exist", field="depth", scene_id=scene_id) from None
    except OSError as e:
        raise DatasetError(str(path), f"cannot read: {e}", field="depth", scene_id=scene_id) from e
    end = -1
    for _ in range(3):
        end = data.find(b"&", end + 1, 64)
        if end < 0:
            raise DatasetError(str(path), "expected a 'width&height&channels&' header", field="header", scene_id=scene_id)
    try:
        W, H, C = (int(v) for v in data[:end].decode("ascii").split("&"))
    except ValueError:
        raise DatasetError(str(path), f"malformed header {data[:end + 1]!r}", field="header", scene_id=scene_id) from None
    if min(W, H, C) <= 0:
        raise DatasetError(str(path), f"header gives an empty array {W}x{H}x{C}", field="header", scene_id=scene_id)
    payload = memoryview(data)[end + 1 :]
    if len(payload) != 4 * W * H * C:
        raise DatasetError(str(path), f"header {W}x{H}x{C} needs {4 * W * H * C} bytes of float32, the file has "
                           f"{len(payload)}", field="data", scene_id=scene_id)
    return np.frombuffer(payload, dtype="<f4").reshape(C, H, W).transpose(1, 2, 0).astype(np.float32)


def write_colmap_array(path: Path, array: np.ndarray) -> None:
    """Write ``[H, W]`` or ``[H, W, C]`` float values in COLMAP's dense array format."""
    a = np.asarray(array, dtype="<f4")
    if a.ndim == 2:
        a = a[..., None]
    H, W, C = a.shape
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(f"{W}&{H}&{C}&".encode("ascii") + np.ascontiguousarray(a.transpose(2, 0, 1)).tobytes())


# ------------------------------------------------------------------------------------------ reader
def _model_dir(folder: Path) -> Path | None:
    for sub in MODEL_DIRS:
        d = folder / sub
        if any((d / f"cameras{ext}").is_file() for ext in (".bin", ".txt")) and \
                any((d / f"images{ext}").is_file() for ext in (".bin", ".txt")):
            return d
    return None


class ColmapReader(SceneFolderReader):
    """COLMAP reconstructions under ``root``, one scene per project folder (see the module docstring).

    Options: ``split`` (only ``all``), ``downscale`` (read ``images_N``), ``max_depth`` (search depth).
    """

    name = "colmap"
    default_crop_policy = "center"
    scene_marker = "COLMAP model (sparse/0/ or sparse/ with cameras.* and images.*)"

    def __init__(self, root: str | Path, split: str = "all", downscale: int = 1, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
        super().__init__(root, split, downscale, max_depth)
        if split != "all":
            raise DatasetError(str(self.root), f"COLMAP models have no splits; split must be 'all', got {split!r}", field="split")

    def is_scene(self, folder: Path) -> bool:
        """A folder with a model in ``sparse/0`` or ``sparse``."""
        return _model_dir(folder) is not None

    def scene(self, scene_id: str) -> SceneRecord:
        """The registered images of the scene's model, sorted by name; errors name file, line and field."""
        rel = self.scene_folder(scene_id)
        prefix = f"{rel}/" if rel else ""
        model = _model_dir(self.root / rel)
        assert model is not None  # found at construction
        binary = (model / "cameras.bin").is_file() and (model / "images.bin").is_file()
        cam_path, img_path = (model / "cameras.bin", model / "images.bin") if binary else (model / "cameras.txt", model / "images.txt")
        for p in (cam_path, img_path):
            if not p.is_file():
                raise DatasetError(str(p), f"missing (the model has {'binary' if binary else 'text'} files)", scene_id=scene_id)
        cameras = (read_cameras_binary if binary else read_cameras_text)(cam_path, scene_id)
        images = (read_images_binary if binary else read_images_text)(img_path, scene_id)
        if not images:
            raise DatasetError(str(img_path), "the model has no registered images", scene_id=scene_id)
        N = self.downscale
        image_dir = "images" if N == 1 else f"images_{N}"
        by_name: dict[str, ColmapImage] = {}
        for im in images:
            field = f"image {im.image_id} ({im.name})"
            if im.name in by_name:
                raise DatasetError(str(img_path), f"image name {im.name!r} repeats image {by_name[im.name].image_id}",
                                   line=im.line, field="NAME", scene_id=scene_id)
            if im.camera_id not in cameras:
                raise DatasetError(str(img_path), f"{field}: camera {im.camera_id} is not in {cam_path.name}", line=im.line,
                                   field="CAMERA_ID", scene_id=scene_id)
            norm = math.sqrt(sum(v * v for v in im.qvec))
            if abs(norm - 1.0) > 1e-3:
                raise DatasetError(str(img_path), f"{field}: quaternion norm {norm:.6f} is not 1", line=im.line,
                                   field="QW QX QY QZ", scene_id=scene_id)
            if im.name.startswith("/") or ".." in im.name.split("/"):
                raise DatasetError(str(img_path), f"{field}: image name leaves the images folder", line=im.line,
                                   field="NAME", scene_id=scene_id)
            by_name[im.name] = im
        names = sorted(by_name)
        image_paths = {n: f"{prefix}{image_dir}/{n}" for n in names}
        depth_paths = {n: f"{prefix}{DEPTH_DIR}/{n}{DEPTH_SUFFIX}" for n in names}
        present = existing_files(self.root, [*image_paths.values(), *depth_paths.values()])
        sizes: dict[tuple[int, int], tuple[int, int]] = {}
        frames = []
        for n in names:
            im = by_name[n]
            if image_paths[n] not in present:
                raise DatasetError(str(img_path), f"image file {self.root / image_paths[n]} does not exist", line=im.line,
                                   field="NAME", scene_id=scene_id)
            cam = cameras[im.camera_id]
            full = (cam.height, cam.width)
            if N == 1:
                hw = full
            else:
                if full not in sizes:  # one header per distinct camera size (per-image cameras share it)
                    sizes[full] = downscaled_size(self.root / image_paths[n], full, N, path=str(cam_path),
                                                  field="image", scene_id=scene_id)
                hw = sizes[full]
            K = np.diag([hw[1] / full[1], hw[0] / full[0], 1.0]) @ camera_matrix(cam.model, cam.params)
            q = np.asarray(im.qvec) / np.linalg.norm(im.qvec)
            E = make_extrinsics(qvec_to_rotmat(q), im.tvec)
            try:
                validate_camera(K, E, where=f"image {im.image_id} ({n})")
            except SchemaError as e:
                bad = (img_path, im.line, "QW QX QY QZ") if e.field == "extrinsics" else (cam_path, cam.line, "PARAMS")
                raise DatasetError(str(bad[0]), str(e), line=bad[1], field=bad[2], scene_id=scene_id) from e
            frames.append(FrameRecord(frame_id=n, image_path=image_paths[n], image_size=hw, intrinsics=K, extrinsics=E,
                                      depth_path=depth_paths[n] if depth_paths[n] in present else None))
        return SceneRecord(self.tag, self.split, scene_id, tuple(frames))

    def load_depth(self, frame: FrameRecord) -> np.ndarray | None:
        """z-depth float32 ``[H, W]`` from the dense depth map (0 where ``<= 0`` or non-finite), at the image
        size; ``None`` when the frame has no depth map."""
        if frame.depth_path is None:
            return None
        path = self.root / frame.depth_path
        arr = read_colmap_array(path)
        if arr.shape[2] != 1:
            raise DatasetError(str(path), f"a depth map has 1 channel, this array has {arr.shape[2]}", field="header")
        depth = arr[..., 0]
        depth = np.where(np.isfinite(depth) & (depth > 0), depth, np.float32(0.0)).astype(np.float32)
        return resize_nearest(depth, frame.image_size, path=str(path), field="depth")


__all__ = [
    "MODEL_DIRS",
    "DEPTH_DIR",
    "DEPTH_SUFFIX",
    "CAMERA_MODEL_IDS",
    "CAMERA_PARAMS",
    "qvec_to_rotmat",
    "rotmat_to_qvec",
    "camera_matrix",
    "Camera",
    "ColmapImage",
    "read_cameras_text",
    "read_images_text",
    "read_cameras_binary",
    "read_images_binary",
    "write_colmap_model",
    "read_colmap_array",
    "write_colmap_array",
    "ColmapReader",
]
