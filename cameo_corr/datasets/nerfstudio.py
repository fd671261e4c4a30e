"""nerfstudio ``transforms.json`` scenes (DL3DV-10K, ScanNet++ exports, ``ns-process-data`` captures).

Layout (every path in ``transforms.json`` is relative to the folder holding it)::

    <root>/<scene...>/transforms.json      one per scene, found up to ``max_depth`` (default 3) levels
                                           below the root; the root itself may be the scene
    <scene>/images/frame_00001.png         ``frames[i].file_path``
    <scene>/images_N/frame_00001.png       downscaled copies, read with the option ``downscale=N``
    <scene>/depths/frame_00001.png         optional ``frames[i].depth_file_path``: 16-bit PNG, z-depth =
                                           value * ``depth_unit_scale_factor`` (default 1e-3), 0 = invalid
    <scene>/masks/frame_00001.png          optional ``frames[i].mask_path``: non-zero = pixel kept

``transforms.json`` keys read: ``camera_model``, intrinsics ``fl_x fl_y cx cy w h`` and distortion
``k1 k2 k3 k4 p1 p2`` (each global or per frame; a frame value that contradicts a global one is an
error), ``frames[i].transform_matrix`` and ``<split>_filenames``. The camera models are nerfstudio's
perspective ones (``SIMPLE_PINHOLE PINHOLE SIMPLE_RADIAL RADIAL OPENCV``; no ``camera_model`` means
perspective, as in nerfstudio), with all distortion coefficients zero: non-zero distortion is refused
with an error naming the file and the key (undistort first, e.g. COLMAP's ``image_undistorter``), since
no exact pinhole view of distorted pixels exists without resampling them.

Cameras: ``transform_matrix`` is camera-to-world in nerfstudio's OpenGL axes (x right, y up, z back);
our world-to-camera OpenCV extrinsics are ``inv(c2w @ diag(1, -1, -1, 1))``
(:func:`opengl_c2w_to_opencv_w2c`). nerfstudio casts pixel ``(col, row)`` through ``(col + 0.5, row +
0.5)``, the project's convention, so ``fl_x fl_y cx cy`` are used as they are. Rotations are checked
(tolerance of :func:`~cameo_corr.schemas.validate_camera`) and projected onto SO(3). The poses are
kept as written: nerfstudio's own re-centring/re-scaling (``auto_orient_and_center_poses``) is a
similarity of the world that correspondences do not need, and depth stays in the units of the poses.

Downscaled images (``downscale=N``; unlike nerfstudio, which picks a factor by itself when none is
given, the default is always the full-size ``images/``) follow nerfstudio's ``_get_fname``: ``images_N/<file name>``,
``depths_N/<file name>``, ``masks_N/<file name>`` beside ``transforms.json``. Their size is read from
one image header per distinct ``(w, h)`` of the scene (usually one per scene) and must be within a
pixel of ``(w/N, h/N)``; intrinsics follow the size actually read: ``K' = diag(W'/w, H'/h, 1) K``,
exact for a resize of the whole image with pixel centres at +0.5. Without ``downscale`` no image is
opened before pixels are loaded: sizes come from ``w``/``h``. A depth map or mask at another size than
its image (e.g. phone depth at 256x192) is resampled nearest-neighbour at pixel centres, as
nerfstudio does.

Scenes are sorted by relative path, frames by ``file_path`` (as nerfstudio sorts them); ``frame_id``
is the normalised ``file_path``. ``split="all"`` (default) reads every frame, ``train``/``val``/``test``
the frames listed in ``<split>_filenames`` (an error when the file has no such list). Existence of the
files is checked at :meth:`NerfstudioReader.scene` time by listing each folder once.
"""

from __future__ import annotations

import json
import math
import posixpath
from pathlib import Path
from typing import Any

import numpy as np

from cameo_corr.datasets.base import DEFAULT_MAX_DEPTH, SceneFolderReader, existing_files
from cameo_corr.datasets.image_io import downscaled_size, read_image, read_png16, resize_nearest
from cameo_corr.schemas import DatasetError, FrameRecord, SceneRecord, SchemaError, invert_extrinsics, validate_camera

TRANSFORMS = "transforms.json"
CAMERA_MODELS = ("SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV")
"""nerfstudio's perspective camera models; accepted with zero distortion only."""
INTRINSIC_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h")
DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")
SPLITS = ("all", "train", "val", "test")
DEFAULT_DEPTH_UNIT_SCALE = 1e-3
"""nerfstudio's default ``depth_unit_scale_factor`` (millimetre PNGs to metres)."""
OPENGL_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])
"""Flips camera y and z: OpenGL camera axes (x right, y up, z back) <-> OpenCV (x right, y down, z forward)."""


def opengl_c2w_to_opencv_w2c(c2w: np.ndarray) -> np.ndarray:
    """World-to-camera OpenCV 4x4 from a camera-to-world OpenGL ``transform_matrix`` (4x4 or 3x4)."""
    M = np.eye(4)
    M[:3, :4] = np.asarray(c2w, dtype=np.float64)[:3, :4]
    return invert_extrinsics(M @ OPENGL_TO_OPENCV)


def opencv_w2c_to_opengl_c2w(E: np.ndarray) -> np.ndarray:
    """Inverse of :func:`opengl_c2w_to_opencv_w2c`: the ``transform_matrix`` of OpenCV extrinsics ``E``."""
    return invert_extrinsics(np.asarray(E, dtype=np.float64)) @ OPENGL_TO_OPENCV


def read_json(path: Path, scene_id: str | None = None) -> Any:
    """Parse a JSON file; errors name the file (and the line of a syntax error)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(str(path), "file does not exist", scene_id=scene_id) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(str(path), f"cannot read: {e}", scene_id=scene_id) from e
    except json.JSONDecodeError as e:
        raise DatasetError(str(path), f"invalid JSON: {e.msg} (column {e.colno})", line=e.lineno, scene_id=scene_id) from e


class NerfstudioReader(SceneFolderReader):
    """Scenes of nerfstudio ``transforms.json`` files under ``root`` (see the module docstring).

    Options: ``split`` (``all``, ``train``, ``val``, ``test``), ``downscale`` (read ``images_N``),
    ``depth_unit_scale_factor`` (depth PNG units to scene units) and ``max_depth`` (search depth).
    """

    name = "nerfstudio"
    default_crop_policy = "center"
    scene_marker = TRANSFORMS

    def __init__(
        self,
        root: str | Path,
        split: str = "all",
        downscale: int = 1,
        depth_unit_scale_factor: float = DEFAULT_DEPTH_UNIT_SCALE,
        max_depth: int = DEFAULT_MAX_DEPTH,
    ) -> None:
        super().__init__(root, split, downscale, max_depth)
        if split not in SPLITS:
            raise DatasetError(str(self.root), f"unknown split {split!r}; expected one of {SPLITS}", field="split")
        scale = depth_unit_scale_factor
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
            raise DatasetError(str(self.root), f"must be a positive number, got {scale!r}", field="depth_unit_scale_factor")
        self.depth_unit_scale_factor = float(scale)

    def is_scene(self, folder: Path) -> bool:
        """A folder holding a ``transforms.json``."""
        return (folder / TRANSFORMS).is_file()

    def scene(self, scene_id: str) -> SceneRecord:
        """Parse and check the scene's ``transforms.json``; errors name the file and the key."""
        rel = self.scene_folder(scene_id)
        path = self.root / rel / TRANSFORMS
        meta = read_json(path, scene_id)
        parser = _Transforms(meta, path, scene_id)
        entries = parser.frames(self.split)
        N = self.downscale
        # paths relative to the dataset root, after the downscale redirection of nerfstudio's _get_fname
        for e in entries:
            for key, prefix in (("image", "images"), ("depth", "depths"), ("mask", "masks")):
                if e[key] is not None:
                    e[key] = _under(rel, e[key] if N == 1 else f"{prefix}_{N}/{posixpath.basename(e[key])}", path,
                                    e["where"] + "." + {"image": "file_path", "depth": "depth_file_path", "mask": "mask_path"}[key],
                                    scene_id)
        present = existing_files(self.root, [e[k] for e in entries for k in ("image", "depth", "mask") if e[k] is not None])
        for e in entries:
            for key, field in (("image", "file_path"), ("depth", "depth_file_path"), ("mask", "mask_path")):
                if e[key] is not None and e[key] not in present:
                    raise DatasetError(str(path), f"{key} file {self.root / e[key]} does not exist{self._hint(rel)}",
                                       field=f"{e['where']}.{field}", scene_id=scene_id)
        sizes: dict[tuple[int, int], tuple[int, int]] = {}
        frames = []
        for e in entries:
            full = (e["h"], e["w"])
            if N == 1:
                hw = full
            else:
                if full not in sizes:
                    sizes[full] = downscaled_size(self.root / e["image"], full, N, path=str(path),
                                                  field=f"{e['where']}.file_path", scene_id=scene_id)
                hw = sizes[full]
            K = np.diag([hw[1] / full[1], hw[0] / full[0], 1.0]) @ e["K"]
            try:
                validate_camera(K, e["E"], where=e["where"])
            except SchemaError as err:
                raise DatasetError(str(path), str(err), field=f"{e['where']}.{'transform_matrix' if err.field == 'extrinsics' else 'fl_x'}",
                                   scene_id=scene_id) from err
            frames.append(FrameRecord(frame_id=e["file_path"], image_path=e["image"], image_size=hw, intrinsics=K,
                                      extrinsics=e["E"], depth_path=e["depth"], depth_scale=self.depth_unit_scale_factor,
                                      mask_path=e["mask"]))
        return SceneRecord(self.tag, self.split, scene_id, tuple(frames))

    def load_depth(self, frame: FrameRecord) -> np.ndarray | None:
        """z-depth float32 ``[H, W]`` (PNG value * ``depth_unit_scale_factor``, 0 = invalid), at the image size."""
        if frame.depth_path is None:
            return None
        path = self.root / frame.depth_path
        raw = read_png16(path)
        depth = raw.astype(np.float32) * np.float32(frame.depth_scale)
        return resize_nearest(depth, frame.image_size, path=str(path), field="depth")

    def load_mask(self, frame: FrameRecord) -> np.ndarray | None:
        """bool ``[H, W]`` (mask PNG non-zero = kept pixel) at the image size; ``None`` without ``mask_path``."""
        if frame.mask_path is None:
            return None
        path = self.root / frame.mask_path
        mask = read_image(path, "L", field="mask") > 0
        return resize_nearest(mask, frame.image_size, path=str(path), field="mask")

    def options(self) -> dict[str, Any]:
        """``split``, ``downscale``, ``max_depth`` and ``depth_unit_scale_factor``."""
        return {**super().options(), "depth_unit_scale_factor": self.depth_unit_scale_factor}

    def _hint(self, rel: str) -> str:
        folder = self.root / rel
        scaled = sorted(p.name for p in folder.glob("images_*") if p.is_dir() and p.name[7:].isdigit())
        if self.downscale == 1 and scaled and not (folder / "images").is_dir():
            return f" (the scene has {', '.join(scaled)}: pass the option downscale=N to read images_N)"
        return ""


def _under(scene_rel: str, rel: str, path: Path, field: str, scene_id: str) -> str:
    """``rel`` (relative to the scene folder) as a normalised path relative to the dataset root."""
    joined = posixpath.normpath(posixpath.join(scene_rel, rel)) if scene_rel else posixpath.normpath(rel)
    if joined == ".." or joined.startswith("../") or posixpath.isabs(rel):
        raise DatasetError(str(path), f"path {rel!r} leaves the dataset root", field=field, scene_id=scene_id)
    return joined


class _Transforms:
    """Checks one ``transforms.json`` and turns its frames into dicts (paths still relative to the scene)."""

    def __init__(self, meta: Any, path: Path, scene_id: str) -> None:
        self.path, self.scene_id = path, scene_id
        if not isinstance(meta, dict):
            self._fail("expected a JSON object", None)
        self.meta = meta
        model = meta.get("camera_model", "PINHOLE")
        if model not in CAMERA_MODELS:
            self._fail(f"camera model {model!r} not supported (perspective models {CAMERA_MODELS}, zero distortion)",
                       "camera_model")
        self.model = model
        self.glob = {k: self._number(meta[k], k) for k in INTRINSIC_KEYS + DISTORTION_KEYS if k in meta}

    def _fail(self, message: str, field: str | None) -> None:
        raise DatasetError(str(self.path), message, field=field, scene_id=self.scene_id)

    def _number(self, value: Any, field: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self._fail(f"expected a finite number, got {value!r}", field)
        if field in ("w", "h") or field.endswith((".w", ".h")):
            if value != int(value) or value <= 0:
                self._fail(f"expected a positive integer, got {value!r}", field)
        return float(value)

    def _string(self, value: Any, field: str) -> str:
        if not isinstance(value, str) or not value:
            self._fail(f"expected a non-empty path string, got {value!r}", field)
        return posixpath.normpath(value)

    def frames(self, split: str) -> list[dict[str, Any]]:
        """Checked frames of ``split``, sorted by ``file_path``."""
        raw = self.meta.get("frames")
        if not isinstance(raw, list) or not raw:
            self._fail("expected a non-empty list of frames", "frames")
        entries = [self._frame(i, fr) for i, fr in enumerate(raw)]
        for key, field in (("depth", "depth_file_path"), ("mask", "mask_path")):
            has = [e[key] is not None for e in entries]
            if any(has) and not all(has):
                i = has.index(False)
                self._fail(f"{field} is given for some frames only (every frame or none)", f"frames[{i}].{field}")
        seen: dict[str, str] = {}
        for e in entries:
            if e["file_path"] in seen:
                self._fail(f"file_path {e['file_path']!r} repeats {seen[e['file_path']]}", f"{e['where']}.file_path")
            seen[e["file_path"]] = e["where"]
        if split != "all":
            key = f"{split}_filenames"
            listed = self.meta.get(key)
            if not isinstance(listed, list):
                self._fail(f"split {split!r} needs a list {key!r} (use split 'all' to read every frame)", key)
            wanted = {self._string(v, f"{key}[{k}]") for k, v in enumerate(listed)}
            unknown = sorted(wanted - set(seen))
            if unknown:
                self._fail(f"lists {unknown[0]!r}, which is no frame's file_path", key)
            entries = [e for e in entries if e["file_path"] in wanted]
            if not entries:
                self._fail(f"split {split!r} has no frames", key)
        return sorted(entries, key=lambda e: e["file_path"])

    def _frame(self, i: int, fr: Any) -> dict[str, Any]:
        where = f"frames[{i}]"
        if not isinstance(fr, dict):
            self._fail("expected an object", where)
        values: dict[str, float] = {}
        for key in INTRINSIC_KEYS + DISTORTION_KEYS:
            if key in fr:
                v = self._number(fr[key], f"{where}.{key}")
                if key in self.glob and v != self.glob[key]:
                    self._fail(f"{key}={v:g} contradicts the global {key}={self.glob[key]:g}", f"{where}.{key}")
                values[key] = v
            elif key in self.glob:
                values[key] = self.glob[key]
            elif key in INTRINSIC_KEYS:
                self._fail(f"{key} is missing (given neither globally nor for the frame)", f"{where}.{key}")
        for key in DISTORTION_KEYS:
            if values.get(key, 0.0) != 0.0:
                field = f"{where}.{key}" if key in fr else key
                self._fail(f"non-zero distortion {key}={values[key]:g} ({self.model}): undistort the images first (e.g. "
                           "COLMAP image_undistorter); only pinhole images are read", field)
        try:
            c2w = np.asarray(fr.get("transform_matrix"), dtype=np.float64)
        except (TypeError, ValueError):
            c2w = np.empty(0)
        if c2w.shape not in ((4, 4), (3, 4)) or not np.all(np.isfinite(c2w)):
            self._fail(f"expected a finite 4x4 (or 3x4) camera-to-world matrix, got {fr.get('transform_matrix')!r}",
                       f"{where}.transform_matrix")
        if c2w.shape == (4, 4) and not np.allclose(c2w[3], [0, 0, 0, 1]):
            self._fail("last row must be [0, 0, 0, 1]", f"{where}.transform_matrix")
        R = c2w[:3, :3]
        if not np.allclose(R @ R.T, np.eye(3), atol=1e-3) or abs(np.linalg.det(R) - 1.0) > 1e-3:
            self._fail("rotation block is not a proper rotation (scaled or mirrored camera-to-world?)",
                       f"{where}.transform_matrix")
        U, _, Vt = np.linalg.svd(R)
        c2w = c2w.copy()
        c2w[:3, :3] = U @ Vt
        K = np.array([[values["fl_x"], 0.0, values["cx"]], [0.0, values["fl_y"], values["cy"]], [0.0, 0.0, 1.0]])
        return {
            "where": where,
            "file_path": self._string(fr.get("file_path"), f"{where}.file_path"),
            "image": self._string(fr.get("file_path"), f"{where}.file_path"),
            "depth": self._string(fr["depth_file_path"], f"{where}.depth_file_path") if "depth_file_path" in fr else None,
            "mask": self._string(fr["mask_path"], f"{where}.mask_path") if "mask_path" in fr else None,
            "w": int(values["w"]),
            "h": int(values["h"]),
            "K": K,
            "E": opengl_c2w_to_opencv_w2c(c2w),
        }


__all__ = [
    "TRANSFORMS",
    "CAMERA_MODELS",
    "INTRINSIC_KEYS",
    "DISTORTION_KEYS",
    "SPLITS",
    "DEFAULT_DEPTH_UNIT_SCALE",
    "OPENGL_TO_OPENCV",
    "opengl_c2w_to_opencv_w2c",
    "opencv_w2c_to_opengl_c2w",
    "read_json",
    "NerfstudioReader",
]
