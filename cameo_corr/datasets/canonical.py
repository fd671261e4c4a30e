"""The canonical training view: one deterministic square crop + resize shared by pipeline and trainer.

A crop box ``(x0, y0, side)`` is a square in continuous source pixel coordinates (the top-left corner
of the image is ``(0, 0)``, the centre of pixel ``(col, row)`` is ``(col + 0.5, row + 0.5)``). The
canonical view is the affine map of the continuous image plane

    u' = (u - x0) * size / side,    v' = (v - y0) * size / side,

so with pixel centres at +0.5 on both sides the intrinsics update is exact: ``cx, cy`` shift by
``-x0, -y0`` and ``fx, fy, cx, cy`` (and the skew) scale by ``size / side``. Images are resampled by
Pillow in one step over exactly this map (``Image.resize(..., box=crop box)``, bilinear with the filter
support widened when shrinking, i.e. antialiased); depth maps and masks are sampled nearest-neighbour
at the same output pixel centres, so an invalid depth (0) never mixes with valid depth.

Policies (:data:`CROP_POLICIES`):

* ``center``: the largest square centred on the image centre (the RealEstate10K default);
* ``principal_point``: the largest square centred on the principal point ``(cx, cy)`` that fits in
  the image (the CO3D default); a principal point outside the image is an error;
* ``mask_bbox``: a square centred on the centre of the foreground mask's bounding box (pixel edges),
  of side ``clamp(MASK_BBOX_PADDING * max(bbox width, bbox height), min(H, W) * MASK_BBOX_MIN_FRACTION,
  min(H, W))``, then shifted (not shrunk) so it lies inside the image. Needs a mask with at least one
  foreground pixel for every frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
from PIL import Image

from cameo_corr.schemas import CANONICAL_SIZE, DatasetError, FrameRecord, SchemaError, WindowData, WindowRecord

if TYPE_CHECKING:  # pragma: no cover - typing only
    from cameo_corr.datasets.base import SceneReader

CROP_POLICIES = ("center", "principal_point", "mask_bbox")
MASK_BBOX_PADDING = 1.2
"""``mask_bbox`` square side relative to the longer side of the mask's bounding box."""
MASK_BBOX_MIN_FRACTION = 0.25
"""``mask_bbox`` square side is at least this fraction of ``min(H, W)`` (tiny masks are not blown up)."""

CropBox = tuple[float, float, float]
"""``(x0, y0, side)`` of a square crop in continuous source pixels."""

_BOX_TOL = 1e-6


@dataclass(frozen=True)
class CanonicalView:
    """A square crop of the source image (chosen by ``policy``) resized to ``size x size`` pixels."""

    size: int = CANONICAL_SIZE
    policy: str = "center"

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer)) or self.size <= 0:
            raise SchemaError("size", f"must be a positive integer, got {self.size!r}", where="canonical view")
        if self.policy not in CROP_POLICIES:
            raise SchemaError("policy", f"unknown crop policy {self.policy!r}; expected one of {CROP_POLICIES}", where="canonical view")

    # ------------------------------------------------------------------------------- crop boxes
    def crop_box(self, frame: FrameRecord, mask: np.ndarray | None = None) -> CropBox:
        """The square ``(x0, y0, side)`` of ``frame`` (source pixels) selected by the policy.

        ``mask`` (``[H, W]`` bool foreground of the frame) is required by ``mask_bbox`` and ignored by
        the other policies. Raises :class:`SchemaError` naming the frame when the policy cannot apply.
        """
        H, W = (int(v) for v in frame.image_size)
        where = f"frame {frame.frame_id!r} ({frame.image_path})"
        if self.policy == "center":
            side = float(min(H, W))
            return ((W - side) / 2.0, (H - side) / 2.0, side)
        if self.policy == "principal_point":
            K = np.asarray(frame.intrinsics, dtype=np.float64)
            cx, cy = float(K[0, 2]), float(K[1, 2])
            half = min(cx, W - cx, cy, H - cy)
            if not (math.isfinite(half) and half > 0):
                raise SchemaError(
                    "intrinsics", f"principal point ({cx:.3f}, {cy:.3f}) is not inside the {W}x{H} image", where=where
                )
            return (cx - half, cy - half, 2.0 * half)
        # mask_bbox
        if mask is None:
            raise SchemaError("mask", "crop policy 'mask_bbox' needs a foreground mask and the frame has none", where=where)
        mask = np.asarray(mask)
        if mask.shape != (H, W):
            raise SchemaError("mask", f"shape {mask.shape} does not match the image size {(H, W)}", where=where)
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            raise SchemaError("mask", "crop policy 'mask_bbox' needs a non-empty foreground mask", where=where)
        x_lo, x_hi = float(cols[0]), float(cols[-1] + 1)
        y_lo, y_hi = float(rows[0]), float(rows[-1] + 1)
        short = float(min(H, W))
        side = min(max(MASK_BBOX_PADDING * max(x_hi - x_lo, y_hi - y_lo), MASK_BBOX_MIN_FRACTION * short), short)
        x0 = min(max((x_lo + x_hi) / 2.0 - side / 2.0, 0.0), W - side)
        y0 = min(max((y_lo + y_hi) / 2.0 - side / 2.0, 0.0), H - side)
        return (x0, y0, side)

    # ------------------------------------------------------------------------------- transforms
    def apply_image(self, image: np.ndarray, box: CropBox) -> np.ndarray:
        """RGB uint8 ``[H, W, 3]`` -> uint8 ``[size, size, 3]`` (antialiased bilinear over the crop)."""
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise SchemaError("image", f"expected uint8 [H, W, 3], got {image.dtype} {image.shape}", where="canonical view")
        x0, y0, side = self._check_box(box, image.shape[:2])
        pil = Image.fromarray(np.ascontiguousarray(image))
        out = pil.resize((self.size, self.size), resample=Image.Resampling.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
        return np.asarray(out, dtype=np.uint8)

    def apply_intrinsics(self, K: np.ndarray, box: CropBox) -> np.ndarray:
        """Exact pixel intrinsics of the canonical view: ``A @ K`` with ``A`` the crop+resize affine map."""
        K = np.asarray(K, dtype=np.float64)
        if K.shape != (3, 3):
            raise SchemaError("intrinsics", f"expected shape (3, 3), got {K.shape}", where="canonical view")
        x0, y0, side = (float(v) for v in box)
        s = self.size / side
        A = np.array([[s, 0.0, -s * x0], [0.0, s, -s * y0], [0.0, 0.0, 1.0]])
        return A @ K

    def apply_depth(self, depth: np.ndarray, box: CropBox) -> np.ndarray:
        """z-depth ``[H, W]`` (0 = invalid) -> float32 ``[size, size]``, nearest neighbour."""
        depth = np.asarray(depth)
        if depth.ndim != 2 or not np.issubdtype(depth.dtype, np.floating):
            raise SchemaError("depth", f"expected float [H, W], got {depth.dtype} {depth.shape}", where="canonical view")
        if not np.all(np.isfinite(depth)) or np.any(depth < 0):
            raise SchemaError("depth", "must be finite and non-negative (0 marks invalid pixels)", where="canonical view")
        rows, cols = self._nearest_indices(box, depth.shape)
        return np.ascontiguousarray(depth[np.ix_(rows, cols)], dtype=np.float32)

    def apply_mask(self, mask: np.ndarray, box: CropBox) -> np.ndarray:
        """Foreground mask ``[H, W]`` -> bool ``[size, size]``, nearest neighbour."""
        mask = np.asarray(mask)
        if mask.ndim != 2:
            raise SchemaError("mask", f"expected [H, W], got shape {mask.shape}", where="canonical view")
        rows, cols = self._nearest_indices(box, mask.shape)
        return np.ascontiguousarray(mask[np.ix_(rows, cols)], dtype=np.bool_)

    # ---------------------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """``{"policy", "size"}``: what ``cache.json`` records under ``crop``."""
        return {"policy": self.policy, "size": int(self.size)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CanonicalView":
        """Inverse of :meth:`to_dict`; unknown or missing keys raise :class:`SchemaError` naming them."""
        unknown = sorted(set(d) - {"policy", "size"})
        if unknown:
            raise SchemaError(f"crop.{unknown[0]}", "unknown field", where="canonical view")
        for key in ("policy", "size"):
            if key not in d:
                raise SchemaError(f"crop.{key}", "missing", where="canonical view")
        return cls(size=d["size"], policy=d["policy"])

    # --------------------------------------------------------------------------------- helpers
    def _check_box(self, box: CropBox, hw: tuple[int, int]) -> CropBox:
        x0, y0, side = (float(v) for v in box)
        H, W = hw
        tol = _BOX_TOL * max(H, W)
        if not (math.isfinite(x0) and math.isfinite(y0) and math.isfinite(side) and side > 0):
            raise SchemaError("box", f"invalid crop box {box}", where="canonical view")
        if x0 < -tol or y0 < -tol or x0 + side > W + tol or y0 + side > H + tol:
            raise SchemaError("box", f"crop box {box} is not inside the {W}x{H} image", where="canonical view")
        return x0, y0, side

    def _nearest_indices(self, box: CropBox, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Source rows/cols holding the output pixel centres ``(i + 0.5)`` under the crop map."""
        x0, y0, side = self._check_box(box, hw)
        H, W = hw
        centres = (np.arange(self.size, dtype=np.float64) + 0.5) * (side / self.size)
        cols = np.clip(np.floor(x0 + centres).astype(np.int64), 0, W - 1)
        rows = np.clip(np.floor(y0 + centres).astype(np.int64), 0, H - 1)
        return rows, cols


def load_window(reader: "SceneReader", record: WindowRecord, view: CanonicalView, *, with_depth: bool = False,
                with_masks: bool = True) -> WindowData:
    """Load the S frames of ``record`` through ``reader`` into the canonical ``view``.

    Images, intrinsics and extrinsics are always returned; foreground masks when ``with_masks`` and the
    reader has them (all frames or none); depth when ``with_depth`` (an error if the reader has none).
    Masks are read only when returned or when the crop policy needs them (``mask_bbox``): a backend
    that ignores them (VGGT) skips their decoding, cropping and transport. Pixel arrays must match
    each frame's ``image_size``; mismatches raise :class:`DatasetError` naming the file.
    """
    S = record.num_views
    if S == 0:
        raise SchemaError("frames", "a window needs at least one frame", where=f"window {record.window_id}")
    size = view.size
    images = np.empty((S, size, size, 3), dtype=np.uint8)
    intrinsics = np.empty((S, 3, 3), dtype=np.float64)
    extrinsics = np.empty((S, 4, 4), dtype=np.float64)
    depth = np.empty((S, size, size), dtype=np.float32) if with_depth else None
    masks: np.ndarray | None = None
    read_masks = with_masks or view.policy == "mask_bbox"
    for i, frame in enumerate(record.frames):
        hw = tuple(int(v) for v in frame.image_size)
        mask = reader.load_mask(frame) if read_masks else None
        if mask is not None:
            _check_pixels(mask, hw, frame.mask_path or frame.image_path, "mask", record.scene_id)
            if masks is None:
                if i > 0:
                    raise DatasetError(frame.mask_path or frame.image_path, "only some frames of the window have masks",
                                       field="mask", scene_id=record.scene_id)
                masks = np.empty((S, size, size), dtype=np.bool_)
        elif masks is not None:
            raise DatasetError(frame.image_path, "frame has no mask while earlier frames of the window do",
                               field="mask", scene_id=record.scene_id)
        box = view.crop_box(frame, mask)
        image = reader.load_image(frame)
        _check_pixels(image, hw, frame.image_path, "image", record.scene_id)
        images[i] = view.apply_image(image, box)
        intrinsics[i] = view.apply_intrinsics(frame.intrinsics, box)
        extrinsics[i] = np.asarray(frame.extrinsics, dtype=np.float64)
        if masks is not None and with_masks:
            masks[i] = view.apply_mask(mask, box)
        if depth is not None:
            d = reader.load_depth(frame)
            if d is None:
                raise DatasetError(str(reader.root), f"dataset '{reader.name}' has no depth for frame {frame.frame_id!r}",
                                   field="depth", scene_id=record.scene_id)
            _check_pixels(d, hw, frame.depth_path or frame.image_path, "depth", record.scene_id)
            depth[i] = view.apply_depth(d, box)
    data = WindowData(record=record, images=images, intrinsics=intrinsics, extrinsics=extrinsics, depth=depth,
                      masks=masks if with_masks else None)
    data.validate()
    return data


def _check_pixels(arr: np.ndarray, hw: tuple[int, ...], path: str, field: str, scene_id: str) -> None:
    if tuple(arr.shape[:2]) != hw:
        raise DatasetError(path, f"{field} has size {tuple(arr.shape[:2])}, the frame record says {hw}",
                           field=field, scene_id=scene_id)


__all__ = ["CROP_POLICIES", "MASK_BBOX_PADDING", "MASK_BBOX_MIN_FRACTION", "CropBox", "CanonicalView", "load_window"]
