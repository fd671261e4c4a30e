"""The shard format: one file per shard holding a zarr v3 group of its ok windows.

A shard is **one object**: the zarr group (arrays of :data:`~cameo_corr.schemas.CACHE_ARRAYS`, plus a
``g<h>x<w>/`` subgroup of grid arrays per extra grid of a multi-grid cache; one zarr shard per array
with inner chunks of :data:`CHUNK_WINDOWS` windows, consolidated metadata, per-window ids, scenes and
frame ids in the group attributes) is built in memory and stored as an uncompressed zip, written under
a temporary name and renamed into place. Opening a shard reads the zip directory and one
``zarr.json``; a window read is two byte ranges per array. Every chunk is zstd-compressed and then
checksummed (zarr's ``crc32c`` codec; the shard index carries its own crc32c), so a flipped byte
anywhere raises :class:`CorruptCacheError` naming the cache, shard, array and window.
"""

from __future__ import annotations

import asyncio
from typing import Any, BinaryIO, Callable, Mapping, Sequence

import numpy as np

from cameo_corr.schemas import (
    CACHE_ARRAYS,
    GRID_ARRAYS,
    SCHEMA_VERSION,
    CacheConfig,
    CameoCorrError,
    PointmapResult,
    SchemaError,
    TokenCorrespondences,
    WindowRecord,
    array_key,
)

ZSTD_LEVEL = 3

CHUNK_WINDOWS = 8
"""Windows per inner chunk of a version 2 shard array. zarr decodes each chunk through its codec
pipeline with a fixed per-chunk overhead, so a shard visit of the training stream (three arrays of all
windows) costs ``3 * W / CHUNK_WINDOWS`` decodes; a single-window read decodes this many windows."""



class CorruptCacheError(CameoCorrError):
    """Stored bytes of a cache fail their checksum or cannot be decoded.

    ``cache``, ``shard``, ``array`` and ``window`` (``None`` when the whole shard is unreadable) name
    what is broken; ``cameo-corr cache verify --deep`` lists every such window and
    ``cameo-corr preprocess --repair`` recomputes them.
    """

    def __init__(self, cache: str, shard: str, array: str | None, window: str | None, cause: BaseException | str) -> None:
        self.cache, self.shard, self.array, self.window = cache, shard, array, window
        what = f"array '{array}'" if array else "shard metadata"
        which = f"window {window}" if window else "all windows of the shard"
        reason = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        self.reason = reason
        super().__init__(f"{cache}: shard {shard}, {what}, {which}: corrupt data ({reason})")

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle by the named parts (a DataLoader worker hands the error to the training process intact)."""
        return type(self), (self.cache, self.shard, self.array, self.window, self.reason)



def run_on_zarr_loop(coro: Any) -> Any:
    """Run a coroutine of zarr's async API on zarr's own event loop (what its sync API does), so
    several array operations of one shard or window overlap instead of running one by one."""
    from zarr.core.sync import sync

    return sync(coro)


async def gather_all(*aws: Any) -> list[Any]:
    """``asyncio.gather(*aws)`` that lets every read finish before raising the first error.

    A plain ``gather`` raises at the first failure and leaves the other reads, and the chunk tasks zarr
    started inside the failed one, pending on zarr's loop; at exit Python then reports each as "Task was
    destroyed but it is pending!". Here the tasks started meanwhile are awaited (their own errors are
    retrieved and dropped) before the first error is raised."""
    before = asyncio.all_tasks()
    results = await asyncio.gather(*aws, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        left = asyncio.all_tasks() - before
        await asyncio.gather(*left, return_exceptions=True)
        raise errors[0]
    return results



SHARD_WINDOW_KEYS = ("window_ids", "scene_ids", "frame_ids", "datasets", "splits")
"""Per-row metadata lists stored in a version 2 shard's attributes."""



def shard_window_meta(records: Sequence[WindowRecord]) -> dict[str, list[Any]]:
    """The :data:`SHARD_WINDOW_KEYS` lists of the windows of a shard, in row order."""
    return {
        "window_ids": [r.window_id for r in records],
        "scene_ids": [r.scene_id for r in records],
        "frame_ids": [r.frame_ids for r in records],
        "datasets": [r.dataset for r in records],
        "splits": [r.split for r in records],
    }


def shard_zip_bytes(shard_id: str, windows: Mapping[str, list[Any]], data: Mapping[str, np.ndarray], config: CacheConfig) -> bytes:
    """The version 2 shard file: a zarr group built in memory, stored as an uncompressed zip.

    ``data[key]`` holds the stacked ``[W, ...]`` arrays of the shard's ok windows, keyed by their path
    in the group (``g<h>x<w>/<name>`` for an extra grid's arrays, a subgroup per grid). Each array is one
    zarr shard with inner chunks of :data:`CHUNK_WINDOWS` windows, codecs ``bytes -> zstd -> crc32c``
    (a corrupt chunk makes exactly its windows unreadable); the group carries
    consolidated metadata and ``windows`` (the :data:`SHARD_WINDOW_KEYS` lists) in its attributes,
    so a reader of a shard needs no manifest.
    """
    import io
    import warnings
    import zipfile

    import zarr
    from zarr.api.asynchronous import open_group
    from zarr.codecs import Crc32cCodec, ZstdCodec
    from zarr.storage import MemoryStore

    attrs = {
        "shard_id": shard_id,
        "schema_version": SCHEMA_VERSION,
        "views": config.views,
        "grid": list(config.grid),
        **({"extra_grids": [list(g) for g in config.extra_grids]} if config.extra_grids else {}),
        **{k: list(windows[k]) for k in SHARD_WINDOW_KEYS},
    }
    entries: dict[str, Any] = {}
    store = MemoryStore(entries)

    rows = min(CHUNK_WINDOWS, len(windows["window_ids"]))
    span = -(-len(windows["window_ids"]) // rows) * rows  # the one zarr shard covers all rows (a multiple of the chunk)

    async def write() -> None:
        group = await open_group(store=store, mode="w", attributes=attrs)
        await asyncio.gather(
            *(
                group.create_array(
                    name=name, data=values, chunks=(rows, *values.shape[1:]), shards=(span, *values.shape[1:]),
                    compressors=[ZstdCodec(level=ZSTD_LEVEL), Crc32cCodec()], fill_value=0,
                )
                for name, values in data.items()
            )
        )

    run_on_zarr_loop(write())
    with warnings.catch_warnings():  # "consolidated metadata is not part of the v3 spec": we rely on zarr-python only
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(store)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(entries):
            zf.writestr(key, entries[key].to_bytes())
    return buffer.getvalue()


def shard_zip_store(name: str, opener: Callable[[], BinaryIO]) -> Any:
    """A read-only zarr store over a version 2 shard file (``opener()`` gives a seekable binary file).

    zarr's ``ZipStore`` serves a byte range of a zip member by reading the member from its start (and
    checks the zip CRC only when it reaches the end), so a window read would cost the whole array. The
    shard's members are stored uncompressed, so ranged reads here seek straight to the member's bytes;
    integrity comes from the crc32c of every chunk and of every shard index. Whole-member reads (the
    metadata) keep the zip CRC check.
    """
    import threading
    import zipfile

    from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
    from zarr.storage import ZipStore

    class ShardZipStore(ZipStore):
        def __init__(self) -> None:
            super().__init__(name, mode="r")
            self._offsets: dict[str, tuple[int, int]] = {}

        def _sync_open(self) -> None:
            if self._is_open:
                raise ValueError("store is already open")
            self._lock = threading.RLock()
            self._file = opener()
            self._zf = zipfile.ZipFile(self._file, mode="r")
            self._is_open = True

        def _member(self, key: str) -> tuple[int, int] | None:
            """``(offset of the member's data in the file, size)`` of a stored member."""
            if key not in self._offsets:
                info = self._zf.NameToInfo.get(key)
                if info is None or info.compress_type != zipfile.ZIP_STORED:
                    return None
                self._file.seek(info.header_offset)
                header = self._file.read(30)
                if header[:4] != b"PK\x03\x04":
                    raise zipfile.BadZipFile(f"bad local header of member {key!r}")
                start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
                self._offsets[key] = (start, info.file_size)
            return self._offsets[key]

        def _get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
            if byte_range is None:
                return super()._get(key, prototype, byte_range)
            if not self._is_open:
                self._sync_open()
            with self._lock:
                member = self._member(key)
                if member is None:
                    return super()._get(key, prototype, byte_range)
                start, size = member
                if isinstance(byte_range, RangeByteRequest):
                    lo, hi = byte_range.start, min(byte_range.end, size)
                elif isinstance(byte_range, OffsetByteRequest):
                    lo, hi = byte_range.offset, size
                elif isinstance(byte_range, SuffixByteRequest):
                    lo, hi = max(0, size - byte_range.suffix), size
                else:
                    raise TypeError(f"unexpected byte range {byte_range!r}")
                self._file.seek(start + lo)
                return prototype.buffer.from_bytes(self._file.read(max(0, hi - lo)))

    return ShardZipStore()


def window_arrays(
    corr: TokenCorrespondences, result: PointmapResult, extra: Mapping[tuple[int, int], TokenCorrespondences] | None = None
) -> dict[str, np.ndarray]:
    """One window's cache arrays (schema dtypes, no ``W`` axis) from matcher + backend outputs.

    ``corr`` holds the primary grid's correspondences; ``extra`` maps each extra grid to its own
    (matched on the same pointmaps), stored under ``g<h>x<w>/<name>`` (:func:`~cameo_corr.schemas.array_key`).
    Raises :class:`SchemaError` (field ``points``) when a valid token's point overflows float16.
    """
    if extra:
        primary = tuple(corr.valid.shape[1:3])
        arrays = window_arrays(corr, result)
        for grid, c in extra.items():
            more = window_arrays(c, result)
            arrays.update({array_key(n, tuple(grid), primary): more[n] for n in GRID_ARRAYS})  # type: ignore[arg-type]
        return arrays

    def host(t: Any) -> np.ndarray:
        return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)

    S = corr.nn.shape[0]
    out = {
        "points": host(corr.points),
        "valid": host(corr.valid),
        "conf": host(corr.conf),
        "nn": host(corr.nn).reshape(S, S, -1),
        "dist": host(corr.dist).reshape(S, S, -1),
        "mask": host(corr.mask).reshape(S, S, -1),
        "intrinsics": host(result.intrinsics),
        "extrinsics": host(result.extrinsics),
    }
    with np.errstate(over="ignore"):  # float16 overflow is checked explicitly below
        arrays = {name: out[name].astype(spec.dtype, copy=False) for name, spec in CACHE_ARRAYS.items()}
    if np.any(~np.isfinite(arrays["points"][arrays["valid"]])):
        raise SchemaError("points", "valid token points overflow float16 (|x| > 65504): rescale the scene")
    return arrays


def window_fractions(arrays: Mapping[str, np.ndarray]) -> tuple[float, float]:
    """``(valid_frac, mask_frac)``: share of valid tokens, and share of masked queries over ordered
    pairs ``i != j`` (all query tokens counted, diagonal blocks excluded). Of the primary grid (the
    plain-named arrays) when a window holds several."""
    valid = np.asarray(arrays["valid"])
    mask = np.asarray(arrays["mask"])
    S = mask.shape[0]
    off = ~np.eye(S, dtype=bool)
    valid_frac = float(valid.mean()) if valid.size else 0.0
    mask_frac = float(mask[off].mean()) if S > 1 else 0.0
    return valid_frac, mask_frac


__all__ = [
    "ZSTD_LEVEL",
    "CHUNK_WINDOWS",
    "CorruptCacheError",
    "run_on_zarr_loop",
    "gather_all",
    "SHARD_WINDOW_KEYS",
    "shard_window_meta",
    "shard_zip_bytes",
    "shard_zip_store",
    "window_arrays",
    "window_fractions",
]
