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
            return np.asarray(im.convert(mode))
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


__all__ = ["PNG16_MODES", "read_image", "read_image_size", "read_png16"]
