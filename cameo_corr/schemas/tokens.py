"""Token grids (SPEC section 3): grid sizes, token coordinates and indices (row-major ``y*w + x``)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cameo_corr.schemas.errors import SchemaError

DEFAULT_GRID = 32
DEFAULT_TAU = 1.5

MAX_TOKENS = int(np.iinfo(np.int16).max)
"""``nn`` is stored as int16, so a token grid may hold at most this many tokens."""


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


__all__ = ["DEFAULT_GRID", "DEFAULT_TAU", "MAX_TOKENS", "pixel_to_token", "token_coords", "as_grid", "parse_grids", "check_grids", "grid_name"]
