"""Reading a cache: :class:`CorrCache`, the read-only view of a finished (or growing) cache."""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence, overload

import numpy as np

from cameo_corr.cache.config import read_config
from cameo_corr.cache.layout import CONFIG_FILE, shard_dir
from cameo_corr.cache.location import CacheLocation, store_errors
from cameo_corr.cache.manifest import ManifestIndex, find_sorted_id, read_manifest, scan_manifest
from cameo_corr.cache.shard import SHARD_WINDOW_KEYS, CorruptCacheError, gather_all, run_on_zarr_loop, shard_zip_store
from cameo_corr.schemas import CACHE_ARRAYS, CacheConfig, DatasetError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pyarrow as pa
    import zarr

    from cameo_corr.cache.local_cache import LocalShardCache
    from cameo_corr.datasets.base import SceneReader
    from cameo_corr.datasets.canonical import CanonicalView


class WindowIds(Sequence[str]):
    """The sorted ids of a cache's ok windows, as a read-only sequence of ``str`` over one numpy
    ``S<n>`` array (16 bytes per id instead of a ~70-byte Python string and a list slot each: 10M ids
    hold 160 MB, not 0.8 GB). An id is decoded when read; ``in`` is a binary search; a slice is a list.
    Equal to another :class:`WindowIds` or to any sequence of the same strings in the same order (so
    ``ids == sorted(expected)`` reads as it would on a list)."""

    __hash__ = None  # type: ignore[assignment]  # equal to lists, so not hashable either

    def __init__(self, ids: np.ndarray) -> None:
        self.array = ids
        """The ids as a sorted numpy ``S<n>`` array (shared with the cache's index: do not modify)."""

    def __len__(self) -> int:
        return len(self.array)

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [v.decode() for v in self.array[i].tolist()]
        return self.array[i].decode()

    def __iter__(self) -> Iterator[str]:
        step = 1 << 16  # decode in blocks: no list of every id at once
        for start in range(0, len(self.array), step):
            yield from (v.decode() for v in self.array[start : start + step].tolist())

    def __contains__(self, window_id: object) -> bool:
        return isinstance(window_id, str) and find_sorted_id(self.array, window_id) >= 0

    def __eq__(self, other: object) -> bool:
        if isinstance(other, WindowIds):
            return len(self) == len(other) and bool(np.array_equal(self.array, other.array))
        if isinstance(other, (list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __repr__(self) -> str:
        head = ", ".join(repr(w) for w in self[:3])
        return f"WindowIds([{head}{', ...' if len(self) > 3 else ''}], {len(self)} ids)"


class CorrCache:
    """Read-only view of a finished (or growing) cache: manifest, windows, shards, dataset, crop.

    ``CorrCache(path).window(window_id)`` returns the window's arrays (``CACHE_ARRAYS`` names, stored
    dtypes, no ``W`` axis) as numpy, or torch tensors with ``torch=True``; :meth:`read_shard` decodes
    whole arrays of a shard at once (the training stream reads a shard once per visit). Opening reads
    ``cache.json`` only, and not even that when ``config`` is given (a caller that read it already);
    the manifest is read lazily, only the columns a call needs (call :meth:`refresh` to see shards
    written since). Bytes failing their checksum raise
    :class:`CorruptCacheError`. Reads schema versions 1 and 2. Instances pickle without their open
    shards or manifest, so they can be handed to DataLoader worker processes.

    With ``local_cache`` (a :class:`~cameo_corr.cache.local_cache.LocalShardCache`) the shard files of
    a remote cache are read from local copies (fetched once per node, kept in a byte budget) and
    :meth:`prefetch` fetches shards ahead; a local cache, and version 1 caches, read shards directly.
    """

    max_open_shards = 64

    def __init__(self, path: str | Path, storage_options: dict | None = None, *, config: CacheConfig | None = None,
                 local_cache: LocalShardCache | None = None) -> None:
        from fsspec.implementations.local import LocalFileSystem

        self.location = CacheLocation(path, storage_options)
        remote = not isinstance(self.location.fs, LocalFileSystem)
        self.local_cache = local_cache if remote else None
        """Where shard files of this (remote) cache are read from; ``None``: read from the cache itself."""
        self.path = path
        self.storage_options = storage_options
        self.config: CacheConfig = read_config(self.location) if config is None else config
        self.version: int = int(self.config.schema_version)
        self._manifest: pa.Table | None = None
        self._index: ManifestIndex | None = None
        self._shards: OrderedDict[str, zarr.Group] = OrderedDict()
        self._arrays: dict[str, dict[str, zarr.Array]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_shards=OrderedDict(), _arrays={}, _manifest=None, _index=None)
        return state

    def __repr__(self) -> str:
        extra = f", extra_grids={tuple(tuple(g) for g in self.config.extra_grids)}" if self.config.extra_grids else ""
        return f"CorrCache({self.location.display!r}, views={self.config.views}, grid={tuple(self.config.grid)}{extra})"

    def __len__(self) -> int:
        return len(self.index())

    def refresh(self) -> None:
        """Forget the cached manifest and open shards (see fragments written since)."""
        self._manifest = None
        self._index = None
        self._shards.clear()
        self._arrays.clear()

    def manifest(self, status: str | None = "ok", columns: Sequence[str] | None = None) -> "pa.Table":
        """Manifest rows with ``status`` (``"ok"``, ``"failed"``, or ``None`` for all).

        Consolidated rows come sorted by ``window_id``, then rows of pending fragments. With
        ``columns`` only those columns are read (and nothing is kept in memory).
        """
        import pyarrow.compute as pc

        if status not in ("ok", "failed", None):
            raise ValueError(f"status must be 'ok', 'failed' or None, got {status!r}")
        if columns is not None:
            filt = None if status is None else pc.field("status") == status
            return read_manifest(self.location, columns=columns, filter=filt, filter_columns=["status"])
        table = self._full_manifest()
        return table if status is None else table.filter(pc.equal(table.column("status"), status))

    def _full_manifest(self) -> "pa.Table":
        if self._manifest is None:
            self._manifest = read_manifest(self.location)
        return self._manifest

    def index(self) -> ManifestIndex:
        """The numpy index of the ok windows (read once: ``window_id``, ``shard``, ``row`` columns,
        streamed: 10M windows peak at ~0.6 GB, the index itself is 240 MB)."""
        if self._index is None:
            import pyarrow.compute as pc

            self._index = scan_manifest(self.location, ManifestIndex.from_batches, ["window_id", "shard", "row"],
                                        pc.field("status") == "ok")
        return self._index

    def window_ids(self) -> WindowIds:
        """Ids of the ok windows, sorted: a :class:`WindowIds` sequence of ``str`` over the index's numpy
        array (no Python string per window until one is read; ``list(...)`` makes a plain list)."""
        return WindowIds(self.index().ids)

    def row(self, window_id: str) -> dict[str, Any]:
        """The manifest row of ``window_id`` as a dict (``KeyError`` naming the cache if absent)."""
        import pyarrow.compute as pc

        table = self.manifest(None, columns=None) if self._manifest is not None else read_manifest(
            self.location, filter=pc.field("window_id") == window_id
        )
        rows = table.filter(pc.equal(table.column("window_id"), window_id)).to_pylist()
        if not rows:
            raise KeyError(f"window {window_id!r} is not in the manifest of {self.location.display}")
        return rows[0]

    def locate(self, window_id: str) -> tuple[str, int]:
        """``(shard id, row)`` of an ok window (``KeyError`` naming the cache and the reason if none)."""
        index = self.index()
        i = index.find(window_id)
        if i < 0:
            row = None
            try:
                row = self.row(window_id)
            except KeyError:
                pass
            if row is not None and row["status"] != "ok":
                raise KeyError(f"window {window_id!r} failed during preprocessing: {row['error']}")
            raise KeyError(f"window {window_id!r} is not in the manifest of {self.location.display}")
        return index.shards[index.shard[i]], int(index.row[i])

    def prefetch(self, shard_ids: Sequence[str]) -> None:
        """Fetch these shards into the local shard cache in the background (no-op without one)."""
        if self.local_cache is not None and self.version >= 2:
            self.local_cache.prefetch(self.location, [shard_dir(s, self.version) for s in shard_ids])

    def _open_store(self, shard_id: str) -> Any:
        rel = shard_dir(shard_id, self.version)
        if self.local_cache is not None and self.version >= 2:
            handle = self.local_cache.open(self.location, rel)  # a missing shard raises DatasetError here
            return shard_zip_store(self.location.url(rel), lambda: handle)
        if not self.location.exists(rel):
            raise DatasetError(self.location.url(rel), "shard listed in the manifest is missing")
        if self.version == 1:
            return self.location.zarr_store(rel, read_only=True)
        fs, path = self.location.fs, self.location.path(rel)
        return shard_zip_store(self.location.url(rel), lambda: fs.open(path, "rb"))

    def open_shard(self, shard_id: str) -> "zarr.Group":
        """The read-only zarr group of a finished shard (lazy; kept in a small LRU).

        Raises :class:`DatasetError` when the shard is missing and :class:`CorruptCacheError` when its
        file or metadata cannot be read.
        """
        import zarr

        if shard_id in self._shards:
            self._shards.move_to_end(shard_id)
            return self._shards[shard_id]
        from zarr.api.asynchronous import open_group

        store = self._open_store(shard_id)
        keys = self.config.stored_keys()

        async def open_all() -> tuple[Any, list[Any]]:  # one trip to zarr's event loop for group and arrays
            agroup = await open_group(store=store, mode="r", use_consolidated=True if self.version >= 2 else None)
            return agroup, await gather_all(*(agroup.getitem(key) for key in keys))

        try:
            agroup, arrays = run_on_zarr_loop(open_all())
            group = zarr.Group(agroup)
            self._arrays[shard_id] = {key: zarr.Array(arr) for key, arr in zip(keys, arrays)}
        except KeyError as e:
            raise CorruptCacheError(self.location.display, shard_id, None, None, f"array {e} missing") from e
        except store_errors():  # the store did not answer: not a verdict on the shard's bytes
            raise
        except Exception as e:  # zip, JSON and zarr metadata errors all mean "this shard is unreadable"
            raise CorruptCacheError(self.location.display, shard_id, None, None, e) from e
        self._shards[shard_id] = group
        while len(self._shards) > self.max_open_shards:
            evicted, _ = self._shards.popitem(last=False)
            self._arrays.pop(evicted, None)
        return group

    def _shard_arrays(self, shard_id: str) -> "dict[str, zarr.Array]":
        """The opened arrays of a shard (array metadata is read once per shard, not per window)."""
        self.open_shard(shard_id)
        return self._arrays[shard_id]

    def shard_windows(self, shard_id: str) -> dict[str, list[Any]]:
        """Per-row metadata of a shard: ``window_ids``, ``scene_ids``, ``frame_ids``, ``datasets``,
        ``splits`` (lists indexed by row). Version 2 stores them in the shard; for version 1 they come
        from the manifest rows of the shard."""
        group = self.open_shard(shard_id)
        attrs = group.attrs.asdict()
        if "frame_ids" in attrs:
            return {k: list(attrs[k]) for k in SHARD_WINDOW_KEYS}
        import pyarrow.compute as pc

        table = self.manifest("ok")
        rows = table.filter(pc.equal(table.column("shard"), shard_id)).sort_by("row").to_pydict()
        if rows["row"] != list(range(len(rows["row"]))) or rows["window_id"] != list(attrs.get("window_ids", [])):
            raise DatasetError(self.location.url(shard_dir(shard_id, self.version)), "manifest rows and shard window_ids disagree")
        return {"window_ids": rows["window_id"], "scene_ids": rows["scene_id"], "frame_ids": rows["frame_ids"],
                "datasets": rows["dataset"], "splits": rows["split"]}

    def select_grid(self, grid: int | tuple[int, int] | None = None) -> tuple[int, int]:
        """``grid`` as ``(h, w)`` (``None``: the primary grid); a :class:`SchemaError` listing the
        cache's grids and naming its ``cache.json`` when the cache does not store it."""
        return self.config.select_grid(grid, where=self.location.url(CONFIG_FILE))

    def _keys(self, names: Sequence[str], grid: int | tuple[int, int] | None) -> dict[str, str]:
        """``{name: path in the shard group}`` of arrays ``names`` of ``grid``."""
        return self.config.array_keys(self.select_grid(grid), names)

    def _read_named(self, shard_id: str, names: Sequence[str], grid: int | tuple[int, int] | None, selection: Any,
                    window: str | None) -> dict[str, np.ndarray]:
        keys = self._keys(names, grid)
        data = self._read(shard_id, list(keys.values()), selection, window)
        return {name: data[key] for name, key in keys.items()}

    def _read(self, shard_id: str, names: Sequence[str], selection: Any, window: str | None) -> dict[str, np.ndarray]:
        """Read ``selection`` of arrays ``names`` (paths in the shard group) of a shard concurrently;
        decode errors become :class:`CorruptCacheError` naming the array (and ``window``)."""
        arrays = self._shard_arrays(shard_id)

        async def one(name: str) -> Any:
            try:
                return await arrays[name].async_array.getitem(selection)
            except store_errors():  # the store did not answer (network, disk): not corrupt data
                raise
            except Exception as e:  # checksum mismatch (ValueError), zstd/zip errors...: all "corrupt"
                raise CorruptCacheError(self.location.display, shard_id, name, window, e) from e

        async def read() -> list[Any]:
            return await gather_all(*(one(n) for n in names))

        return {name: np.asarray(v) for name, v in zip(names, run_on_zarr_loop(read()))}

    def read_shard(self, shard_id: str, names: Sequence[str] = tuple(CACHE_ARRAYS), grid: int | tuple[int, int] | None = None
                   ) -> dict[str, np.ndarray]:
        """Arrays ``names`` of ``grid`` (default: the primary grid) of every row of a shard
        (``[W, ...]``), each decoded once.

        On a corrupt chunk the error names the first bad window (rows are re-read one by one to find it).
        """
        try:
            return self._read_named(shard_id, names, grid, slice(None), None)
        except CorruptCacheError as e:
            ids = self.shard_windows(shard_id)["window_ids"]
            for r, wid in enumerate(ids):
                self._read(shard_id, [e.array or self._keys(names, grid)[names[0]]], r, wid)
            raise

    def corrupt_windows(self, shard_id: str) -> list[CorruptCacheError]:
        """Every window of a shard whose chunks fail to decode, in any grid (one error per window; the
        whole shard when its file or metadata is unreadable). Empty when the shard is intact."""
        keys = self.config.stored_keys()
        try:
            ids = self.shard_windows(shard_id)["window_ids"]
            self._read(shard_id, keys, slice(None), None)
            return []
        except CorruptCacheError as e:
            if e.array is None:
                return [e]
        bad = []
        for r, wid in enumerate(ids):
            try:
                self._read(shard_id, keys, r, wid)
            except CorruptCacheError as e:
                bad.append(e)
        return bad

    def read_row(self, shard_id: str, row: int, window_id: str | None = None, names: Sequence[str] = tuple(CACHE_ARRAYS),
                 grid: int | tuple[int, int] | None = None) -> dict[str, np.ndarray]:
        """Arrays ``names`` of ``grid`` (default: the primary grid) of one row of a shard
        (``window_id`` only names it in errors)."""
        return self._read_named(shard_id, names, grid, int(row), window_id)

    def window(self, window_id: str, *, torch: bool = False, grid: int | tuple[int, int] | None = None) -> dict[str, Any]:
        """The arrays of one ok window on ``grid`` (default: the primary grid; numpy, or torch
        tensors when ``torch=True``). Arrays keep their plain names whatever the grid."""
        shard_id, r = self.locate(window_id)
        out: dict[str, Any] = self.read_row(shard_id, r, window_id, grid=grid)
        if torch:
            import torch as _torch

            out = {k: _torch.from_numpy(v) for k, v in out.items()}
        return out

    def dataset_root(self) -> str:
        """The dataset root recorded in ``cache.json``; a :class:`DatasetError` (field ``dataset.root``)
        when it is not a directory, saying where to give another one."""
        root = str(self.config.dataset["root"])
        if "://" not in root and not os.path.isdir(root):
            hint = "" if self.config.images is not None else ("; or preprocess with --store-images jpeg (or png) so the "
                                                                "cache holds its views and training needs no dataset root")
            raise DatasetError(root, "the dataset root recorded in cache.json is not a directory (moved? the root is not "
                               "part of the cache's identity: pass the new one, e.g. data.dataset_root=<dir> to train, "
                               f"--root to preprocess){hint}", field="dataset.root")
        return root

    def reader(self) -> "SceneReader":
        """The dataset reader the cache was built from (``open_dataset(**config.dataset)``)."""
        from cameo_corr.datasets.base import open_dataset

        options = dict(self.config.dataset)
        root = self.dataset_root()
        options.pop("root")
        return open_dataset(options.pop("name"), root, **options)

    def view(self) -> "CanonicalView":
        """The canonical view (crop policy + size) the cache was computed on."""
        from cameo_corr.datasets.canonical import CanonicalView

        return CanonicalView.from_dict(self.config.crop)


__all__ = ["CorrCache", "WindowIds"]
