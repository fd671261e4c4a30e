"""The cache contract: layout version, the arrays of a shard (names, dtypes, shapes, per-grid paths)
and ``cache.json`` (:class:`CacheConfig`)."""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from cameo_corr.schemas.errors import SchemaError
from cameo_corr.schemas.tokens import MAX_TOKENS, as_grid, check_grids, grid_name

SCHEMA_VERSION = 2
"""Version of the cache layout written by this code. Bump on any incompatible change.

Version 1: one zarr directory group per shard (17 files), one manifest fragment per shard, no chunk
checksums. Version 2: one zip file per shard holding the zarr group with consolidated metadata and
per-window metadata in its attributes, every chunk checksummed (crc32c after zstd), manifest
fragments consolidated into sorted Parquet files, shard byte counts recorded in the manifest.

Several grids per cache (``CacheConfig.extra_grids``) are an addition to version 2, not a new
version: a single-grid cache is byte-for-byte what it was, and code older than the addition refuses
a multi-grid ``cache.json`` (unknown field ``extra_grids``) instead of misreading it. Stored views
(``CacheConfig.images``, :data:`IMAGE_ARRAYS`) are an addition of the same kind.
"""
READABLE_SCHEMA_VERSIONS = (1, 2)
"""Cache layouts this code reads (version 1 caches convert with ``cameo-corr cache migrate``)."""
VALUES_VERSION = 1
"""Version of the cached *values* (what every ``window_id`` hashes as ``schema_version``). Layout
changes that keep the per-window values (version 2's container) keep it, so window ids stay stable."""



def _is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (Python or numpy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


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
IMAGE_ARRAYS: dict[str, ArraySpec] = {
    spec.name: spec
    for spec in (
        ArraySpec("images", np.dtype(np.uint8), ("W", "S", "L"), "encoded canonical view (JPEG or PNG file bytes), zero padded"),
        ArraySpec("image_nbytes", np.dtype(np.int32), ("W", "S"), "length of each encoded view in 'images'"),
        ArraySpec("image_intrinsics", np.dtype(np.float64), ("W", "S", 3, 3), "dataset intrinsics, canonical-view pixels"),
        ArraySpec("image_extrinsics", np.dtype(np.float64), ("W", "S", 4, 4), "dataset world-to-camera, OpenCV"),
    )
}
"""The stored views of a self-contained cache (``CacheConfig.images`` set; ``preprocess --store-images``):
each window's canonical views as image files with the dataset's cameras, so a trainer needs no dataset
root. ``L`` is the longest encoded view of the shard (fixed-size uint8 rows: plain zarr v3 arrays)."""
IMAGE_FORMATS = ("jpeg", "png")
"""Encodings of stored views (``CacheConfig.images["format"]``)."""
GRID_ARRAYS: tuple[str, ...] = ("points", "valid", "conf", "nn", "dist", "mask")
"""The arrays that depend on the token grid: stored once per grid of a multi-grid cache. The others
(the cameras) are stored once per window."""


def array_key(name: str, grid: tuple[int, int], primary: tuple[int, int]) -> str:
    """Path of array ``name`` of ``grid`` inside a shard group.

    The primary grid's arrays and the cameras keep their plain names (a single-grid shard is exactly
    that); the arrays of an extra grid live in the subgroup ``g<h>x<w>/`` (``g16x16/nn``).
    """
    if name in IMAGE_ARRAYS:
        return name
    if name not in CACHE_ARRAYS:
        raise SchemaError(name, f"not a cache array; expected one of {list(CACHE_ARRAYS) + list(IMAGE_ARRAYS)}")
    if name not in GRID_ARRAYS or tuple(grid) == tuple(primary):
        return name
    return f"g{grid_name(grid)}/{name}"


def validate_image_arrays(arrays: Mapping[str, np.ndarray], views: int, *, where: str) -> None:
    """Check one window's stored views (:data:`IMAGE_ARRAYS` without the ``W`` axis): dtypes, shapes,
    and lengths that fit the encoded rows."""
    for name, spec in IMAGE_ARRAYS.items():
        if name not in arrays:
            raise SchemaError(name, "missing (the cache stores views: CacheConfig.images)", where=where)
        arr = np.asarray(arrays[name])
        if arr.dtype != spec.dtype:
            raise SchemaError(name, f"expected dtype {spec.dtype}, got {arr.dtype}", where=where)
        expected = tuple(views if d == "S" else d for d in spec.dims[1:])  # "L": any length
        if len(arr.shape) != len(expected) or any(d != "L" and n != d for n, d in zip(arr.shape, expected)):
            raise SchemaError(name, f"expected shape {expected}, got {arr.shape}", where=where)
    nbytes = np.asarray(arrays["image_nbytes"])
    if np.any(nbytes <= 0) or np.any(nbytes > np.asarray(arrays["images"]).shape[-1]):
        raise SchemaError("image_nbytes", f"lengths {nbytes.tolist()} do not fit the encoded rows", where=where)


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
    images: dict[str, Any] | None = None
    """Stored views (``preprocess --store-images``): ``{"format": "jpeg", "quality": 90}`` or
    ``{"format": "png"}``; each shard then holds :data:`IMAGE_ARRAYS`. Absent from ``cache.json`` when
    ``None`` (the default), so such a cache.json is unchanged and older code refuses a cache with views."""

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
        if self.images is not None:
            keys += list(IMAGE_ARRAYS)
        return keys

    def window_nbytes(self) -> int:
        """Bytes of one window's arrays as the shard format holds them before compression
        (:data:`CACHE_ARRAYS` dtypes and shapes: the grid arrays once per stored grid, the cameras once)."""
        total = 0
        for name, spec in CACHE_ARRAYS.items():
            for grid in self.grids if name in GRID_ARRAYS else self.grids[:1]:
                total += int(np.prod(spec.shape(1, self.views, grid))) * spec.dtype.itemsize
        return total

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
        _validate_images(self.images, where)
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
        if self.images is None:
            del d["images"]
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


def _validate_images(images: Any, where: str) -> None:
    """Check ``cache.json``'s ``images``: ``None``, ``{"format": "png"}`` or ``{"format": "jpeg", "quality": 1..100}``."""
    if images is None:
        return
    if not isinstance(images, Mapping) or images.get("format") not in IMAGE_FORMATS:
        raise SchemaError("images", f"expected {{'format': one of {IMAGE_FORMATS}, ...}}, got {images!r}", where=where)
    allowed = {"format", "quality"} if images["format"] == "jpeg" else {"format"}
    unknown = sorted(set(images) - allowed)
    if unknown:
        raise SchemaError(f"images.{unknown[0]}", "unknown field", where=where)
    if images["format"] == "jpeg":
        q = images.get("quality")
        if not _is_int(q) or not 1 <= q <= 100:
            raise SchemaError("images.quality", f"JPEG quality must be an integer in [1, 100], got {q!r}", where=where)


__all__ = [
    "SCHEMA_VERSION",
    "READABLE_SCHEMA_VERSIONS",
    "VALUES_VERSION",
    "ArraySpec",
    "CACHE_ARRAYS",
    "GRID_ARRAYS",
    "IMAGE_ARRAYS",
    "IMAGE_FORMATS",
    "array_key",
    "validate_image_arrays",
    "validate_window_arrays",
    "CacheConfig",
]
