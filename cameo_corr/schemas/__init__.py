"""The versioned contract between the cameo-corr readers, pipeline, cache and trainer.

Everything another part of the project may rely on lives here:

* camera conventions (OpenCV, world-to-camera, pixel intrinsics with pixel centres at +0.5) and the
  helpers that convert to and from them (RealEstate10K normalized intrinsics, PyTorch3D NDC cameras);
* the records that flow through the pipeline (:class:`FrameRecord`, :class:`SceneRecord`,
  :class:`WindowRecord`, :class:`WindowData`, :class:`PointmapResult`, :class:`TokenCorrespondences`);
* the cache layout (schema version 2, version 1 still read): array names, dtypes, shapes, manifest
  columns, ``cache.json``, the per-grid array paths of a cache holding several token grids;
* the errors raised on bad input, which always name the file and the field or line.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pyarrow as pa
    import torch

SCHEMA_VERSION = 2
"""Version of the cache layout written by this code. Bump on any incompatible change.

Version 1: one zarr directory group per shard (17 files), one manifest fragment per shard, no chunk
checksums. Version 2: one zip file per shard holding the zarr group with consolidated metadata and
per-window metadata in its attributes, every chunk checksummed (crc32c after zstd), manifest
fragments consolidated into sorted Parquet files, shard byte counts recorded in the manifest.

Several grids per cache (``CacheConfig.extra_grids``) are an addition to version 2, not a new
version: a single-grid cache is byte-for-byte what it was, and code older than the addition refuses
a multi-grid ``cache.json`` (unknown field ``extra_grids``) instead of misreading it.
"""
READABLE_SCHEMA_VERSIONS = (1, 2)
"""Cache layouts this code reads (version 1 caches convert with ``cameo-corr cache migrate``)."""
VALUES_VERSION = 1
"""Version of the cached *values* (what every ``window_id`` hashes as ``schema_version``). Layout
changes that keep the per-window values (version 2's container) keep it, so window ids stay stable."""

DEFAULT_GRID = 32
DEFAULT_TAU = 1.5
CANONICAL_SIZE = 512
"""Side of the canonical square training view, in pixels."""
MAX_TOKENS = int(np.iinfo(np.int16).max)
"""``nn`` is stored as int16, so a token grid may hold at most this many tokens."""


# --------------------------------------------------------------------------------------------- errors
class CameoCorrError(Exception):
    """Base class of every error this package raises on purpose."""


class SchemaError(CameoCorrError, ValueError):
    """A value does not match the contract. ``field`` names the offending field."""

    def __init__(self, field: str, message: str, *, where: str | None = None) -> None:
        self.field = field
        self.where = where
        self.message = message
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}field '{field}': {message}")


class DatasetError(CameoCorrError, ValueError):
    """Bad dataset input. Names the file and, where known, the line and the field.

    ``scene_id`` is set when the error concerns one scene only, so callers can record the scene as
    failed and continue with the next one.
    """

    def __init__(
        self,
        path: str,
        message: str,
        *,
        line: int | None = None,
        field: str | None = None,
        scene_id: str | None = None,
    ) -> None:
        self.path = str(path)
        self.line = line
        self.field = field
        self.scene_id = scene_id
        loc = self.path
        if line is not None:
            loc += f":{line}"
        if field is not None:
            loc += f" [{field}]"
        super().__init__(f"{loc}: {message}")


# ---------------------------------------------------------------------------------- camera helpers
def intrinsics_from_normalized(fx: float, fy: float, cx: float, cy: float, width: int, height: int) -> np.ndarray:
    """Pixel intrinsics from RealEstate10K-style intrinsics normalized by image width/height."""
    return np.array(
        [[width * fx, 0.0, width * cx], [0.0, height * fy, height * cy], [0.0, 0.0, 1.0]], dtype=np.float64
    )


def intrinsics_to_normalized(K: np.ndarray, width: int, height: int) -> tuple[float, float, float, float]:
    """Inverse of :func:`intrinsics_from_normalized`: ``(fx, fy, cx, cy)`` divided by width/height."""
    K = np.asarray(K, dtype=np.float64)
    return K[0, 0] / width, K[1, 1] / height, K[0, 2] / width, K[1, 2] / height


def make_extrinsics(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """4x4 world-to-camera matrix from rotation ``R`` (3x3) and translation ``t`` (3,)."""
    E = np.eye(4, dtype=np.float64)
    E[:3, :3] = R
    E[:3, 3] = np.asarray(t, dtype=np.float64).reshape(3)
    return E


def invert_extrinsics(E: np.ndarray) -> np.ndarray:
    """Inverse of rigid 4x4 transforms (``[..., 4, 4]``), computed as ``[R^T, -R^T t]``."""
    E = np.asarray(E, dtype=np.float64)
    R = E[..., :3, :3]
    t = E[..., :3, 3:]
    Rt = np.swapaxes(R, -1, -2)
    out = np.zeros_like(E)
    out[..., :3, :3] = Rt
    out[..., :3, 3:] = -Rt @ t
    out[..., 3, 3] = 1.0
    return out


def camera_centers(E: np.ndarray) -> np.ndarray:
    """World positions of the cameras of world-to-camera matrices ``[..., 4, 4]`` -> ``[..., 3]``."""
    return invert_extrinsics(E)[..., :3, 3]


def project(points_world: np.ndarray, K: np.ndarray, E: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project world points ``[..., 3]`` with one camera.

    Returns ``(uv, z)``: ``uv[..., 2]`` in continuous pixel coordinates (the centre of pixel
    ``(col, row)`` is ``(col + 0.5, row + 0.5)``) and camera-frame depth ``z``.
    """
    X = np.asarray(points_world, dtype=np.float64)
    Xc = X @ E[:3, :3].T + E[:3, 3]
    z = Xc[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uvw = Xc @ np.asarray(K, dtype=np.float64).T
        uv = uvw[..., :2] / uvw[..., 2:3]
    return uv, z


def pixel_centers(height: int, width: int) -> np.ndarray:
    """``[H, W, 2]`` continuous ``(u, v)`` coordinates of pixel centres (``col + 0.5, row + 0.5``)."""
    u = np.arange(width, dtype=np.float64) + 0.5
    v = np.arange(height, dtype=np.float64) + 0.5
    uu, vv = np.meshgrid(u, v, indexing="xy")
    return np.stack([uu, vv], axis=-1)


def unproject_depth(depth: np.ndarray, K: np.ndarray, E: np.ndarray) -> np.ndarray:
    """World points ``[H, W, 3]`` of a z-depth map ``[H, W]`` seen by camera ``(K, E)``.

    Pixel ``(row, col)`` is the ray through ``(col + 0.5, row + 0.5)``. Invalid depth (0 or
    non-finite) yields non-finite or meaningless points; mask them with the depth validity.
    """
    depth = np.asarray(depth, dtype=np.float64)
    H, W = depth.shape
    uv = pixel_centers(H, W)
    Kinv = np.linalg.inv(np.asarray(K, dtype=np.float64))
    rays = np.concatenate([uv, np.ones((H, W, 1))], axis=-1) @ Kinv.T
    Xc = rays * depth[..., None]
    C2W = invert_extrinsics(E)
    return Xc @ C2W[:3, :3].T + C2W[:3, 3]


def pixel_to_token(uv: np.ndarray, image_size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """Continuous pixel coordinates -> continuous token coordinates (token centres at integers).

    ``image_size`` is ``(H, W)`` and ``grid`` is ``(h, w)``. Token ``(tx, ty)`` covers pixels
    ``[tx W/w, (tx+1) W/w)``, so its centre ``(tx + 0.5) W/w`` maps to ``tx``.
    """
    H, W = image_size
    h, w = grid
    uv = np.asarray(uv, dtype=np.float64)
    return np.stack([uv[..., 0] * (w / W) - 0.5, uv[..., 1] * (h / H) - 0.5], axis=-1)


def token_coords(grid: tuple[int, int]) -> np.ndarray:
    """``[h*w, 2]`` integer ``(x, y)`` coordinates of flattened row-major tokens (index ``y*w + x``)."""
    h, w = grid
    idx = np.arange(h * w)
    return np.stack([idx % w, idx // w], axis=-1)


def as_grid(grid: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """Token grid ``(h, w)`` from an int (square grid) or a pair; raises :class:`SchemaError` (field ``grid``) otherwise."""
    if isinstance(grid, (int, np.integer)):
        h = w = int(grid)
    else:
        try:
            h, w = (int(v) for v in grid)
        except (TypeError, ValueError) as e:
            raise SchemaError("grid", f"expected an int or (h, w), got {grid!r}") from e
    if h <= 0 or w <= 0:
        raise SchemaError("grid", f"expected positive (h, w), got {(h, w)}")
    return h, w


def parse_grids(text: str) -> tuple[tuple[int, int], ...]:
    """Token grids from a comma-separated list of sides (``"16,32,64"``; ``"32x16"`` for ``h x w``).

    The first grid is the primary one. Raises :class:`SchemaError` (field ``grid``) on a malformed or
    non-positive entry, a repeated grid, or a grid with more than :data:`MAX_TOKENS` tokens.
    """
    grids: list[tuple[int, int]] = []
    for item in str(text).split(","):
        parts = item.strip().lower().split("x")
        try:
            sides = [int(p) for p in parts]
        except ValueError:
            raise SchemaError("grid", f"expected sides like 32 or 32x16, separated by commas, got {item.strip()!r}") from None
        if len(sides) not in (1, 2):
            raise SchemaError("grid", f"expected sides like 32 or 32x16, separated by commas, got {item.strip()!r}")
        grids.append(as_grid(sides[0] if len(sides) == 1 else sides))
    check_grids(grids)
    return tuple(grids)


def check_grids(grids: Sequence[tuple[int, int]], *, where: str | None = None) -> None:
    """Raise :class:`SchemaError` (field ``grid``) on a repeated grid or one whose tokens overflow int16 ``nn``."""
    seen: set[tuple[int, int]] = set()
    for h, w in grids:
        if (h, w) in seen:
            raise SchemaError("grid", f"{h}x{w} is given twice", where=where)
        seen.add((h, w))
        if h * w > MAX_TOKENS:
            raise SchemaError("grid", f"{h}x{w} has {h * w} tokens, more than {MAX_TOKENS} (int16 'nn')", where=where)


def grid_name(grid: tuple[int, int]) -> str:
    """``"<h>x<w>"``, how errors and tools name a grid."""
    return f"{grid[0]}x{grid[1]}"


# PyTorch3D (row-vector, +X left, +Y up, NDC intrinsics) <-> OpenCV.
_P3D_FLIP = np.diag([-1.0, -1.0, 1.0])
CO3D_INTRINSICS_FORMATS = ("ndc_isotropic", "ndc_norm_image_bounds")


def pytorch3d_to_opencv(
    R: np.ndarray,
    T: np.ndarray,
    focal_length: Sequence[float],
    principal_point: Sequence[float],
    image_size_hw: Sequence[int],
    intrinsics_format: str = "ndc_isotropic",
) -> tuple[np.ndarray, np.ndarray]:
    """Convert a CO3D/PyTorch3D NDC camera to OpenCV ``(K, E)`` in pixels of an ``[H, W]`` image.

    PyTorch3D maps ``X_cam = X_world @ R + T`` with +X left and +Y up. With ``s = min(W, H) / 2``:
    ``fx = f0 s, fy = f1 s, cx = W/2 - p0 s, cy = H/2 - p1 s``; ``R_cv = diag(-1,-1,1) R^T`` and
    ``t_cv = (-T0, -T1, T2)``. ``ndc_norm_image_bounds`` (legacy CO3D v1) first multiplies focal
    length and principal point by ``image_size_wh / min(image_size_wh)``. Any other format is an error.
    """
    if intrinsics_format not in CO3D_INTRINSICS_FORMATS:
        raise SchemaError(
            "intrinsics_format", f"unknown value {intrinsics_format!r}; expected one of {CO3D_INTRINSICS_FORMATS}"
        )
    H, W = (float(v) for v in image_size_hw)
    f = np.asarray(focal_length, dtype=np.float64).reshape(2)
    p = np.asarray(principal_point, dtype=np.float64).reshape(2)
    if intrinsics_format == "ndc_norm_image_bounds":
        scale = np.array([W, H]) / min(W, H)
        f = f * scale
        p = p * scale
    s = min(W, H) / 2.0
    K = np.array([[f[0] * s, 0.0, W / 2 - p[0] * s], [0.0, f[1] * s, H / 2 - p[1] * s], [0.0, 0.0, 1.0]])
    R = np.asarray(R, dtype=np.float64).reshape(3, 3)
    T = np.asarray(T, dtype=np.float64).reshape(3)
    E = make_extrinsics(_P3D_FLIP @ R.T, T * np.array([-1.0, -1.0, 1.0]))
    return K, E


def opencv_to_pytorch3d(
    K: np.ndarray, E: np.ndarray, image_size_hw: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`pytorch3d_to_opencv` (``ndc_isotropic``): returns ``(R, T, focal, principal_point)``."""
    H, W = (float(v) for v in image_size_hw)
    s = min(W, H) / 2.0
    K = np.asarray(K, dtype=np.float64)
    E = np.asarray(E, dtype=np.float64)
    focal = np.array([K[0, 0] / s, K[1, 1] / s])
    pp = np.array([(W / 2 - K[0, 2]) / s, (H / 2 - K[1, 2]) / s])
    R = (_P3D_FLIP @ E[:3, :3]).T
    T = E[:3, 3] * np.array([-1.0, -1.0, 1.0])
    return R, T, focal, pp


def validate_camera(K: Any, E: Any, *, where: str, rot_tol: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Check pixel intrinsics ``K`` (3x3) and world-to-camera ``E`` (4x4); return them as float64.

    Raises :class:`SchemaError` naming ``intrinsics`` or ``extrinsics`` (and ``where``) when a value is
    not finite, has the wrong shape, has non-positive focal lengths, or ``R`` is not a rotation.
    """
    K = np.asarray(K, dtype=np.float64)
    E = np.asarray(E, dtype=np.float64)
    if K.shape != (3, 3):
        raise SchemaError("intrinsics", f"expected shape (3, 3), got {K.shape}", where=where)
    if E.shape != (4, 4):
        raise SchemaError("extrinsics", f"expected shape (4, 4), got {E.shape}", where=where)
    if not np.all(np.isfinite(K)):
        raise SchemaError("intrinsics", "contains non-finite values", where=where)
    if not np.all(np.isfinite(E)):
        raise SchemaError("extrinsics", "contains non-finite values", where=where)
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        raise SchemaError("intrinsics", f"focal lengths must be positive, got fx={K[0, 0]}, fy={K[1, 1]}", where=where)
    if not np.allclose(K[2], [0.0, 0.0, 1.0]) or K[1, 0] != 0 or K[2, 0] != 0:
        raise SchemaError("intrinsics", "last row must be [0, 0, 1] and K upper triangular", where=where)
    if not np.allclose(E[3], [0.0, 0.0, 0.0, 1.0]):
        raise SchemaError("extrinsics", "last row must be [0, 0, 0, 1]", where=where)
    R = E[:3, :3]
    if not np.allclose(R @ R.T, np.eye(3), atol=rot_tol) or abs(np.linalg.det(R) - 1.0) > rot_tol:
        raise SchemaError("extrinsics", "rotation block is not a proper rotation (R R^T != I or det != 1)", where=where)
    return K, E


def first_invalid_camera(K: Any, E: Any, *, rot_tol: float = 1e-3) -> tuple[int, SchemaError] | None:
    """Batch form of :func:`validate_camera` for ``K [N, 3, 3]`` and ``E [N, 4, 4]``: checks all
    cameras with a few vectorised operations and returns ``(index, error)`` of the first invalid one
    (the error :func:`validate_camera` raises for it), or ``None`` when all are valid."""
    K = np.asarray(K, dtype=np.float64)
    E = np.asarray(E, dtype=np.float64)
    n = len(K)
    if K.shape != (n, 3, 3) or E.shape != (n, 4, 4):
        raise SchemaError("intrinsics", f"expected [N, 3, 3] and [N, 4, 4], got {K.shape} and {E.shape}")
    R = E[:, :3, :3]

    def close(a: np.ndarray, b: Any, atol: float = 1e-8) -> np.ndarray:  # np.isclose's rule, without its overhead
        return np.abs(a - b) <= atol + 1e-5 * np.abs(b)

    with np.errstate(invalid="ignore", over="ignore"):
        ok = np.isfinite(K).all(axis=(1, 2)) & np.isfinite(E).all(axis=(1, 2))
        ok &= (K[:, 0, 0] > 0) & (K[:, 1, 1] > 0) & (K[:, 1, 0] == 0) & (K[:, 2, 0] == 0)
        ok &= close(K[:, 2], np.array([0.0, 0.0, 1.0])).all(axis=1) & close(E[:, 3], np.array([0.0, 0.0, 0.0, 1.0])).all(axis=1)
        ok &= close(R @ np.swapaxes(R, 1, 2), np.eye(3), atol=rot_tol).all(axis=(1, 2))
        ok &= np.abs(np.linalg.det(np.where(np.isfinite(R), R, 0.0)) - 1.0) <= rot_tol
    if ok.all():
        return None
    i = int(np.argmin(ok))
    try:
        validate_camera(K[i], E[i], where="")
    except SchemaError as e:
        return i, e
    raise AssertionError(f"camera {i} failed the batch check but passes validate_camera")  # pragma: no cover


# --------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class FrameRecord:
    """One frame of a scene as a dataset reader describes it (no pixels loaded).

    ``image_path`` is relative to the dataset root; readers whose images live inside container files
    (pixelSplat chunks) use ``"<file>#<key>/<index>"``. ``intrinsics`` are in pixels of the stored
    image of size ``image_size = (H, W)``; ``extrinsics`` are world-to-camera, OpenCV.
    ``depth_path``/``mask_path`` are relative to the dataset root when the dataset has them;
    ``depth_scale`` multiplies decoded depth values into scene units.
    """

    frame_id: str
    image_path: str
    image_size: tuple[int, int]
    intrinsics: np.ndarray
    extrinsics: np.ndarray
    depth_path: str | None = None
    depth_scale: float = 1.0
    mask_path: str | None = None

    def validate(self, where: str) -> None:
        """Raise :class:`SchemaError` naming the field when the record breaks the contract."""
        loc = f"{where} frame {self.frame_id!r}"
        if not self.frame_id:
            raise SchemaError("frame_id", "must be a non-empty string", where=where)
        if len(self.image_size) != 2 or min(self.image_size) <= 0:
            raise SchemaError("image_size", f"expected positive (H, W), got {self.image_size}", where=loc)
        validate_camera(self.intrinsics, self.extrinsics, where=loc)
        if not math.isfinite(self.depth_scale) or self.depth_scale <= 0:
            raise SchemaError("depth_scale", f"must be positive and finite, got {self.depth_scale}", where=loc)


@dataclass(frozen=True)
class SceneRecord:
    """All frames of one scene (clip / sequence), in capture order."""

    dataset: str
    split: str
    scene_id: str
    frames: tuple[FrameRecord, ...]

    def validate(self) -> None:
        """Validate every frame and that frame ids are unique."""
        where = f"{self.dataset}/{self.split}/{self.scene_id}"
        ids = [f.frame_id for f in self.frames]
        if len(set(ids)) != len(ids):
            raise SchemaError("frame_id", "frame ids of a scene must be unique", where=where)
        for f in self.frames:
            f.validate(where)


def window_id(dataset: str, split: str, scene_id: str, frame_ids: Sequence[str], config: Mapping[str, Any]) -> str:
    """Stable 16-hex-digit id of a window: a hash of dataset, split, scene, frame ids and config.

    ``config`` holds everything that changes the cached values (grid, tau, backend, crop policy...);
    it is serialised as sorted JSON, so key order does not matter.
    """
    payload = json.dumps(
        [dataset, split, scene_id, list(frame_ids), dict(config)], sort_keys=True, separators=(",", ":"), default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class WindowIdHasher:
    """:func:`window_id` for many windows of one ``config``: the config's JSON is serialised once.

    ``WindowIdHasher(config)(dataset, split, scene_id, frame_ids) == window_id(..., config)`` (same
    payload string, so the same ids), at a fraction of the cost when planning millions of windows.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        self._config = json.dumps(dict(config), sort_keys=True, separators=(",", ":"), default=str)

    def __call__(self, dataset: str, split: str, scene_id: str, frame_ids: Sequence[str]) -> str:
        head = json.dumps([dataset, split, scene_id, list(frame_ids)], separators=(",", ":"), default=str)
        return hashlib.sha256(f"{head[:-1]},{self._config}]".encode()).hexdigest()[:16]

    def windows(self, dataset: str, split: str, scene_id: str, frame_ids: Sequence[str], windows: Any) -> list[str]:
        """Ids of the windows of one scene given as rows of frame indices into ``frame_ids`` (strings):
        ``[self(dataset, split, scene_id, [frame_ids[i] for i in row]) for row in windows]``, with the
        scene's part of the payload and each frame id serialised once."""
        head = json.dumps([dataset, split, scene_id], separators=(",", ":"))[:-1]
        encoded: dict[int, str] = {}
        out = []
        for row in windows:
            parts = []
            for i in row:
                if i not in encoded:
                    encoded[i] = json.encoder.encode_basestring_ascii(frame_ids[i])  # what json.dumps writes
                parts.append(encoded[i])
            payload = f"{head},[{','.join(parts)}],{self._config}]"
            out.append(hashlib.sha256(payload.encode()).hexdigest()[:16])
        return out


@dataclass(frozen=True)
class WindowRecord:
    """S frames of one scene processed together (all their points share one world frame)."""

    window_id: str
    dataset: str
    split: str
    scene_id: str
    frames: tuple[FrameRecord, ...]

    @property
    def num_views(self) -> int:
        return len(self.frames)

    @property
    def frame_ids(self) -> list[str]:
        return [f.frame_id for f in self.frames]

    @property
    def image_paths(self) -> list[str]:
        return [f.image_path for f in self.frames]


@dataclass
class WindowData:
    """A window loaded in the canonical view: what a geometry backend consumes.

    ``images`` ``[S, H, W, 3]`` uint8; ``intrinsics`` ``[S, 3, 3]`` in canonical pixels;
    ``extrinsics`` ``[S, 4, 4]`` world-to-camera; ``depth`` ``[S, H, W]`` float32 z-depth with 0 for
    invalid pixels, when the dataset has depth; ``masks`` ``[S, H, W]`` bool foreground, when it has
    masks.
    """

    record: WindowRecord
    images: np.ndarray
    intrinsics: np.ndarray
    extrinsics: np.ndarray
    depth: np.ndarray | None = None
    masks: np.ndarray | None = None

    def validate(self) -> None:
        """Check shapes and dtypes against each other; raise :class:`SchemaError` naming the field."""
        where = f"window {self.record.window_id}"
        S = self.record.num_views
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[0] != S or self.images.shape[-1] != 3:
            raise SchemaError("images", f"expected uint8 [{S}, H, W, 3], got {self.images.dtype} {self.images.shape}", where=where)
        H, W = self.images.shape[1:3]
        _check_shape("intrinsics", self.intrinsics, (S, 3, 3), where)
        _check_shape("extrinsics", self.extrinsics, (S, 4, 4), where)
        if self.depth is not None:
            _check_shape("depth", self.depth, (S, H, W), where)
        if self.masks is not None:
            _check_shape("masks", self.masks, (S, H, W), where)


def _is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (Python or numpy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_shape(name: str, arr: Any, shape: tuple[int, ...], where: str) -> None:
    if tuple(arr.shape) != tuple(shape):
        raise SchemaError(name, f"expected shape {tuple(shape)}, got {tuple(arr.shape)}", where=where)


@dataclass
class PointmapResult:
    """Output of a geometry backend for one window (torch tensors on the backend's device).

    ``points`` ``[S, H, W, 3]`` float32 in one frame shared by the window; ``valid`` ``[S, H, W]``
    bool; ``conf`` ``[S, H, W]`` float32 (higher is better; 1 for ground truth); ``intrinsics``
    ``[S, 3, 3]`` canonical-view pixels and ``extrinsics`` ``[S, 4, 4]`` world-to-camera in the frame
    of ``points`` (ground truth or predicted).
    """

    points: "torch.Tensor"
    valid: "torch.Tensor"
    conf: "torch.Tensor"
    intrinsics: "torch.Tensor"
    extrinsics: "torch.Tensor"


@dataclass
class TokenCorrespondences:
    """All-ordered-pairs token correspondences of one window (SPEC section 3).

    ``points`` ``[S, h, w, 3]``, ``valid`` ``[S, h, w]``, ``conf`` ``[S, h, w]``; ``nn``, ``dist``,
    ``mask`` ``[S, S, h*w]`` with ``nn[i, j, x]`` the token of view j nearest in 3D to token x of view i
    (flattened row-major ``y*w + x``); the diagonal is the identity with ``dist = 0`` and
    ``mask = valid``.
    """

    points: "torch.Tensor"
    valid: "torch.Tensor"
    conf: "torch.Tensor"
    nn: "torch.Tensor"
    dist: "torch.Tensor"
    mask: "torch.Tensor"


# ---------------------------------------------------------------------------------- cache layout
@dataclass(frozen=True)
class ArraySpec:
    """One cache array: dtype and shape in terms of ``W`` (windows), ``S``, ``h``, ``w``, ``hw``."""

    name: str
    dtype: np.dtype
    dims: tuple[str | int, ...]
    doc: str

    def shape(self, windows: int, views: int, grid: tuple[int, int]) -> tuple[int, ...]:
        """Concrete shape for a shard of ``windows`` windows of ``views`` views on ``grid``."""
        h, w = grid
        sizes = {"W": windows, "S": views, "h": h, "w": w, "hw": h * w}
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.dims)


CACHE_ARRAYS: dict[str, ArraySpec] = {
    spec.name: spec
    for spec in (
        ArraySpec("points", np.dtype(np.float16), ("W", "S", "h", "w", 3), "token pointmaps"),
        ArraySpec("valid", np.dtype(np.bool_), ("W", "S", "h", "w"), "token validity"),
        ArraySpec("conf", np.dtype(np.float16), ("W", "S", "h", "w"), "token confidence"),
        ArraySpec("nn", np.dtype(np.int16), ("W", "S", "S", "hw"), "nn[i, j] = P_ij as token indices"),
        ArraySpec("dist", np.dtype(np.float16), ("W", "S", "S", "hw"), "3D distance to the nearest neighbour"),
        ArraySpec("mask", np.dtype(np.bool_), ("W", "S", "S", "hw"), "cycle-consistency mask M_ij"),
        ArraySpec("intrinsics", np.dtype(np.float32), ("W", "S", 3, 3), "canonical-view pixels"),
        ArraySpec("extrinsics", np.dtype(np.float32), ("W", "S", 4, 4), "world-to-camera, OpenCV"),
    )
}
"""Arrays of one shard group (``<cache>/shards/<shard_id>.zarr.zip``; ``.zarr`` directory in version 1)."""
GRID_ARRAYS: tuple[str, ...] = ("points", "valid", "conf", "nn", "dist", "mask")
"""The arrays that depend on the token grid: stored once per grid of a multi-grid cache. The others
(the cameras) are stored once per window."""


def array_key(name: str, grid: tuple[int, int], primary: tuple[int, int]) -> str:
    """Path of array ``name`` of ``grid`` inside a shard group.

    The primary grid's arrays and the cameras keep their plain names (a single-grid shard is exactly
    that); the arrays of an extra grid live in the subgroup ``g<h>x<w>/`` (``g16x16/nn``).
    """
    if name not in CACHE_ARRAYS:
        raise SchemaError(name, f"not a cache array; expected one of {list(CACHE_ARRAYS)}")
    if name not in GRID_ARRAYS or tuple(grid) == tuple(primary):
        return name
    return f"g{grid_name(grid)}/{name}"


def validate_window_arrays(arrays: Mapping[str, np.ndarray], views: int, grid: tuple[int, int], *, where: str) -> None:
    """Check one window's arrays (the shard arrays without the leading ``W`` axis).

    Every name of :data:`CACHE_ARRAYS` must be present with the exact dtype and shape; ``nn`` must
    index inside the grid; masks may only be set where the query token is valid.
    """
    if grid[0] * grid[1] > MAX_TOKENS:
        raise SchemaError("grid", f"{grid[0]}x{grid[1]} tokens do not fit the int16 'nn' array", where=where)
    for name, spec in CACHE_ARRAYS.items():
        if name not in arrays:
            raise SchemaError(name, "missing", where=where)
        arr = np.asarray(arrays[name])
        expected = spec.shape(1, views, grid)[1:]
        if arr.dtype != spec.dtype:
            raise SchemaError(name, f"expected dtype {spec.dtype}, got {arr.dtype}", where=where)
        if arr.shape != expected:
            raise SchemaError(name, f"expected shape {expected}, got {arr.shape}", where=where)
    nn = np.asarray(arrays["nn"])
    if nn.size and (nn.min() < 0 or nn.max() >= grid[0] * grid[1]):
        raise SchemaError("nn", "indices outside the token grid", where=where)
    valid = np.asarray(arrays["valid"]).reshape(views, 1, -1)
    if np.any(np.asarray(arrays["mask"]) & ~valid):
        raise SchemaError("mask", "set for a query token that is not valid", where=where)


MANIFEST_COLUMNS: tuple[tuple[str, str], ...] = (
    ("window_id", "string"),
    ("dataset", "string"),
    ("split", "string"),
    ("scene_id", "string"),
    ("frame_ids", "list<string>"),
    ("image_paths", "list<string>"),
    ("shard", "string"),
    ("row", "int32"),
    ("num_views", "int32"),
    ("valid_frac", "float32"),
    ("mask_frac", "float32"),
    ("status", "string"),
    ("error", "string"),
    ("shard_bytes", "int64"),
)
"""Manifest columns (one row per window) as ``(name, arrow type)``; ``error`` is null when ok.

``shard_bytes`` (version 2) is the size of the window's shard file, recorded when it was written (null
for failed rows and in version 1 manifests), so ``cache stats`` need not walk the shards."""

WINDOW_STATUSES = ("ok", "failed")


def manifest_schema() -> "pa.Schema":
    """The pyarrow schema of a manifest fragment (``<cache>/manifest/part-*.parquet``)."""
    import pyarrow as pa

    types = {
        "string": pa.string(), "list<string>": pa.list_(pa.string()), "int32": pa.int32(), "int64": pa.int64(),
        "float32": pa.float32(),
    }
    return pa.schema(
        [pa.field(name, types[t], nullable=name in ("error", "shard", "row", "shard_bytes")) for name, t in MANIFEST_COLUMNS],
        metadata={b"cameo_corr_schema_version": str(SCHEMA_VERSION).encode()},
    )


@dataclass
class CacheConfig:
    """Contents of ``<cache>/cache.json``: everything needed to interpret and reproduce the cache.

    ``backend`` holds ``name``, ``version``, ``model_id``, ``dtype`` and backend options (e.g.
    ``points``: ``depth`` or ``head``, confidence threshold); ``crop`` holds the canonical view policy
    (``policy``, ``size``); ``dataset`` holds ``name``, ``root`` and reader options; ``created_by``
    holds package version, command line and time.
    """

    grid: tuple[int, int]
    tau: float
    views: int
    backend: dict[str, Any]
    crop: dict[str, Any]
    dataset: dict[str, Any]
    created_by: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    extra_grids: tuple[tuple[int, int], ...] = ()
    """Grids stored next to ``grid`` from the same pointmaps (``--grid 16,32,64``: ``grid`` is 16x16 and
    these are 32x32 and 64x64). Absent from ``cache.json`` when empty, so a single-grid cache.json is
    unchanged and code without multi-grid support refuses a multi-grid one (unknown field)."""

    @property
    def grids(self) -> tuple[tuple[int, int], ...]:
        """All stored grids, the primary one first."""
        return (tuple(self.grid), *(tuple(g) for g in self.extra_grids))  # type: ignore[return-value]

    def select_grid(self, grid: int | tuple[int, int] | list[int] | None = None, *, where: str = "cache.json") -> tuple[int, int]:
        """``grid`` as ``(h, w)`` if the cache stores it (``None``: the primary grid); otherwise a
        :class:`SchemaError` (field ``grid``) that lists the stored grids and names ``where``."""
        if grid is None:
            return tuple(self.grid)  # type: ignore[return-value]
        hw = as_grid(grid)
        if hw not in self.grids:
            stored = ", ".join(grid_name(g) for g in self.grids)
            raise SchemaError("grid", f"no {grid_name(hw)} token grid in this cache (it stores {stored}); "
                              f"preprocess with --grid listing {hw[0] if hw[0] == hw[1] else grid_name(hw)}", where=where)
        return hw

    def array_keys(self, grid: tuple[int, int] | None = None, names: Sequence[str] = tuple(CACHE_ARRAYS)) -> dict[str, str]:
        """``{name: path in the shard group}`` of arrays ``names`` of ``grid`` (default primary)."""
        g = self.select_grid(grid)
        return {n: array_key(n, g, tuple(self.grid)) for n in names}  # type: ignore[arg-type]

    def stored_keys(self) -> list[str]:
        """Every array path of a shard group: all arrays of the primary grid, then the grid arrays of
        each extra grid."""
        keys = list(CACHE_ARRAYS)
        for g in self.extra_grids:
            keys += [array_key(n, tuple(g), tuple(self.grid)) for n in GRID_ARRAYS]  # type: ignore[arg-type]
        return keys

    def fingerprint(self) -> dict[str, Any]:
        """The part of the config that changes cached values (goes into every ``window_id``).

        Its ``schema_version`` is :data:`VALUES_VERSION`, not the layout version, so a version 2 cache
        plans the same window ids as the version 1 cache of the same config. ``extra_grids`` is
        included when there are any (all grids are part of a multi-grid window's id)."""
        out = {
            "schema_version": VALUES_VERSION,
            "grid": list(self.grid),
            "tau": self.tau,
            "backend": self.backend,
            "crop": self.crop,
        }
        if self.extra_grids:  # only then: single-grid window ids stay what they were
            out["extra_grids"] = [list(g) for g in self.extra_grids]
        return out

    def validate(self, where: str = "cache.json") -> None:
        """Raise :class:`SchemaError` naming the field on an invalid config (wrong type or value)."""
        if not _is_int(self.schema_version) or self.schema_version not in READABLE_SCHEMA_VERSIONS:
            raise SchemaError(
                "schema_version", f"this code reads versions {READABLE_SCHEMA_VERSIONS}, the cache is version {self.schema_version!r}",
                where=where,
            )
        if not isinstance(self.grid, (tuple, list)) or len(self.grid) != 2 or not all(_is_int(v) and v > 0 for v in self.grid):
            raise SchemaError("grid", f"expected positive integer (h, w), got {self.grid!r}", where=where)
        if isinstance(self.tau, bool) or not isinstance(self.tau, numbers.Real):
            raise SchemaError("tau", f"must be a number, got {self.tau!r}", where=where)
        if not _is_int(self.views):
            raise SchemaError("views", f"must be an integer, got {self.views!r}", where=where)
        for name in ("backend", "crop", "dataset", "created_by"):
            if not isinstance(getattr(self, name), Mapping):
                raise SchemaError(name, f"must be an object, got {getattr(self, name)!r}", where=where)
        if self.grid[0] * self.grid[1] > MAX_TOKENS:
            raise SchemaError("grid", f"{self.grid} has more than {MAX_TOKENS} tokens (int16 'nn')", where=where)
        if not isinstance(self.extra_grids, (tuple, list)) or not all(
            isinstance(g, (tuple, list)) and len(g) == 2 and all(_is_int(v) and v > 0 for v in g) for g in self.extra_grids
        ):
            raise SchemaError("extra_grids", f"expected a list of positive integer (h, w), got {self.extra_grids!r}", where=where)
        if self.extra_grids and self.schema_version < 2:
            raise SchemaError("extra_grids", "needs schema version 2 (version 1 caches hold one grid)", where=where)
        check_grids(self.grids, where=where)
        if not (math.isfinite(self.tau) and self.tau >= 0):
            raise SchemaError("tau", f"must be a finite non-negative number, got {self.tau}", where=where)
        if self.views < 2:
            raise SchemaError("views", f"a window needs at least 2 views, got {self.views}", where=where)
        for name in ("backend", "dataset"):
            if "name" not in getattr(self, name):
                raise SchemaError(f"{name}.name", "missing", where=where)
        if "policy" not in self.crop or "size" not in self.crop:
            raise SchemaError("crop", "needs 'policy' and 'size'", where=where)

    def to_json(self) -> str:
        """Serialise as pretty JSON (what ``cache.json`` holds)."""
        d = asdict(self)
        d["grid"] = list(self.grid)
        if self.extra_grids:
            d["extra_grids"] = [list(g) for g in self.extra_grids]
        else:
            del d["extra_grids"]
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "cache.json") -> "CacheConfig":
        """Parse and validate ``cache.json`` text; errors name ``where`` and the field."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise SchemaError("<json>", f"not valid JSON: {e}", where=where) from e
        if not isinstance(d, dict):
            raise SchemaError("<json>", "top level must be an object", where=where)
        known = {f for f in cls.__dataclass_fields__}
        missing = [k for k in ("grid", "tau", "views", "backend", "crop", "dataset", "schema_version") if k not in d]
        if missing:
            raise SchemaError(missing[0], "missing", where=where)
        unknown = sorted(set(d) - known)
        if unknown:
            raise SchemaError(unknown[0], "unknown field", where=where)
        if isinstance(d["grid"], list):
            d["grid"] = tuple(d["grid"])
        if isinstance(d.get("extra_grids"), list):
            d["extra_grids"] = tuple(tuple(g) if isinstance(g, list) else g for g in d["extra_grids"])
        cfg = cls(**d)
        cfg.validate(where)
        return cfg


__all__ = [
    "SCHEMA_VERSION",
    "READABLE_SCHEMA_VERSIONS",
    "VALUES_VERSION",
    "DEFAULT_GRID",
    "DEFAULT_TAU",
    "CANONICAL_SIZE",
    "MAX_TOKENS",
    "CameoCorrError",
    "SchemaError",
    "DatasetError",
    "intrinsics_from_normalized",
    "intrinsics_to_normalized",
    "make_extrinsics",
    "invert_extrinsics",
    "camera_centers",
    "project",
    "pixel_centers",
    "unproject_depth",
    "pixel_to_token",
    "token_coords",
    "as_grid",
    "parse_grids",
    "check_grids",
    "grid_name",
    "CO3D_INTRINSICS_FORMATS",
    "pytorch3d_to_opencv",
    "opencv_to_pytorch3d",
    "validate_camera",
    "first_invalid_camera",
    "FrameRecord",
    "SceneRecord",
    "window_id",
    "WindowIdHasher",
    "WindowRecord",
    "WindowData",
    "PointmapResult",
    "TokenCorrespondences",
    "ArraySpec",
    "CACHE_ARRAYS",
    "GRID_ARRAYS",
    "array_key",
    "validate_window_arrays",
    "MANIFEST_COLUMNS",
    "WINDOW_STATUSES",
    "manifest_schema",
    "CacheConfig",
]
