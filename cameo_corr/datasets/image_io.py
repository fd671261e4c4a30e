"""Image file decoding shared by the dataset readers; every error is a :class:`DatasetError` naming the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from cameo_corr.schemas import DatasetError

PNG16_MODES = ("I;16", "I;16L", "I;16B", "I")
"""Pillow modes of a 16-bit single-channel PNG (Pillow >= 10.3 gives "I;16" (uint16), older releases "I" (int32))."""


def read_image(
    source: Path | BinaryIO, mode: str, *, path: str | None = None, field: str = "image", scene_id: str | None = None
) -> np.ndarray:
    """Decode an image file or buffer converted to Pillow ``mode`` (``"RGB"`` gives uint8 ``[H, W, 3]``).

    Errors name ``path`` (default: ``source``) and ``field``; a missing file is reported as such.
    """
    where = str(source) if path is None else path
    try:
        with Image.open(source) as im:
            return np.asarray(im if im.mode == mode else im.convert(mode))  # convert() to its own mode only copies
    except FileNotFoundError:
        raise DatasetError(where, f"{field} file does not exist", field=field, scene_id=scene_id) from None
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DatasetError(where, f"cannot decode {field}: {e}", field=field, scene_id=scene_id) from e


def read_image_size(source: Path | BinaryIO, path: str, scene_id: str | None, **where: Any) -> tuple[int, int]:
    """``(H, W)`` from an image header (no pixel decoding); errors name ``path`` and ``where`` (field, line)."""
    try:
        with Image.open(source) as im:
            W, H = im.size
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DatasetError(path, f"cannot read image header: {e}", scene_id=scene_id, **where) from e
    return int(H), int(W)


def read_png16(path: Path, *, field: str = "depth", scene_id: str | None = None) -> np.ndarray:
    """A 16-bit single-channel PNG as uint16 ``[H, W]``; any other PNG is a :class:`DatasetError`."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            raw = np.asarray(im)
    except FileNotFoundError:
        raise DatasetError(str(path), f"{field} file does not exist", field=field, scene_id=scene_id) from None
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DatasetError(str(path), f"cannot decode {field} PNG: {e}", field=field, scene_id=scene_id) from e
    if (mode not in PNG16_MODES or raw.ndim != 2 or raw.dtype.kind not in "iu"
            or (raw.size and (raw.min() < 0 or raw.max() > 0xFFFF))):
        raise DatasetError(str(path), f"expected a 16-bit single-channel PNG, got mode {mode!r} ({raw.dtype} "
                           f"{raw.shape})", field=field, scene_id=scene_id)
    return raw.astype(np.uint16)


def resize_nearest(arr: np.ndarray, hw: tuple[int, int], *, path: str, field: str,
                   scene_id: str | None = None) -> np.ndarray:
    """Resample a depth map or mask ``[h, w]`` to ``hw = (H, W)`` by nearest neighbour at pixel centres.

    Output pixel ``(r, c)`` takes source pixel ``(floor((r + 0.5) h / H), floor((c + 0.5) w / W))``, so
    invalid depth (0) never mixes with valid depth. The source must be a scaled copy of the image
    (same aspect ratio up to one pixel of rounding); anything else is a :class:`DatasetError`.
    """
    h, w = arr.shape[:2]
    H, W = hw
    if (h, w) == (H, W):
        return arr
    if abs(h * W - w * H) > W + H:
        raise DatasetError(path, f"{field} has size {(h, w)}, not a scaled copy of the {(H, W)} image",
                           field=field, scene_id=scene_id)
    rows = np.minimum(((np.arange(H) + 0.5) * (h / H)).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(W) + 0.5) * (w / W)).astype(np.int64), w - 1)
    return arr[np.ix_(rows, cols)]


def downscaled_size(source: Path, full_hw: tuple[int, int], factor: int, *, path: str, field: str,
                    scene_id: str | None = None) -> tuple[int, int]:
    """``(H, W)`` of a ``1/factor`` downscaled copy (``images_<factor>/``) of a ``full_hw`` image, read
    from the header of ``source``; a size more than one pixel away from ``full_hw / factor`` is an error."""
    hw = read_image_size(source, str(source), scene_id, field=field)
    if any(abs(n - f / factor) > 1 for n, f in zip(hw, full_hw)):
        raise DatasetError(str(source), f"size {hw} is not a 1/{factor} copy of the {full_hw} size in {path}",
                           field=field, scene_id=scene_id)
    return hw


def encode_views(images: np.ndarray, fmt: str, quality: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 views ``[S, H, W, 3]`` as image files: ``(bytes [S, L] uint8, zero padded to the longest,
    lengths [S] int32)``; ``fmt`` is ``jpeg`` (at ``quality``, Pillow's default 4:2:0 chroma subsampling)
    or ``png`` (lossless)."""
    import io

    files = []
    for view in np.asarray(images):
        buffer = io.BytesIO()
        im = Image.fromarray(np.ascontiguousarray(view))
        if fmt == "jpeg":
            im.save(buffer, format="JPEG", quality=int(quality if quality is not None else 90))
        elif fmt == "png":
            im.save(buffer, format="PNG", compress_level=6)
        else:
            raise ValueError(f"unknown image format {fmt!r}; expected jpeg or png")
        files.append(buffer.getvalue())
    lengths = np.array([len(f) for f in files], dtype=np.int32)
    out = np.zeros((len(files), int(lengths.max(initial=0))), dtype=np.uint8)
    for i, f in enumerate(files):
        out[i, : len(f)] = np.frombuffer(f, dtype=np.uint8)
    return out, lengths


def decode_view(data: np.ndarray, nbytes: int, size: int, *, where: str) -> np.ndarray:
    """One stored view (the first ``nbytes`` of ``data``) as RGB uint8 ``[size, size, 3]``, resized from
    the stored side with Pillow's antialiased bilinear filter (a JPEG is decoded at a reduced DCT scale
    first when ``size`` is at most half its side). Errors are :class:`DatasetError` naming ``where``."""
    import io

    try:
        with Image.open(io.BytesIO(np.asarray(data[:nbytes]).tobytes())) as im:
            if im.format == "JPEG":
                im.draft("RGB", (size, size))
            rgb = im.convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), resample=Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DatasetError(where, f"cannot decode the stored view: {e}", field="images") from e


__all__ = ["encode_views", "decode_view", "PNG16_MODES", "read_image", "read_image_size", "read_png16", "resize_nearest", "downscaled_size"]
