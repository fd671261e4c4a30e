"""The correspondence cache on disk (SPEC section 4): shard writer, manifest and the reader API.

Layout::

    <cache>/cache.json                       written once; a run with another config is refused
    <cache>/manifest/part-<shard_id>.parquet one fragment per shard, written LAST (tmp name + rename)
    <cache>/shards/<shard_id>.zarr/          zarr v3 group of the shard's ok windows (tmp name + rename)

A shard's arrays (:data:`~cameo_corr.schemas.CACHE_ARRAYS`) are zarr v3 arrays with one zstd
compressed inner chunk per window inside a single zarr shard per array, so the writer does exactly one
whole-shard write per array and the reader decodes only the window it asks for. The shard group is
built under ``shards/.tmp-<shard_id>-<nonce>.zarr`` and renamed into place (``os.rename`` locally,
``fs.mv`` on fsspec filesystems such as ``s3://``, where a "rename" is copy + delete); its manifest
fragment is written after that, also to a temporary name first. A window is *done* only when its
manifest row exists, so a worker killed at any point leaves nothing a reader trusts: temporary
entries and shards without a fragment are orphans that :meth:`CacheWriter.remove_orphans` deletes
before a run redoes them. A shard with a fragment is finished and never rewritten.

Local paths use zarr's ``LocalStore``; any URL (``s3://``, ``gs://``, ``file://``, ``memory://``) goes
through fsspec and zarr's ``FsspecStore`` with ``storage_options``. Only one job may write a cache at a
time (the orphan sweep at the start of a run assumes so): the job holds the cache's lease
(:mod:`cameo_corr.pipeline.lease`) while it writes.

Life cycle of a cache (what a new manifest format must keep):

* ``cache.json`` is written by the first shard commit (:meth:`CacheWriter.write_shard`, before that
  shard's fragment), never by a run that fails before committing anything; a run only *checks* an
  existing one (:meth:`CacheWriter.initialize`). Its identity (:data:`COMPARED_FIELDS`) leaves out the
  dataset root (:data:`IDENTITY_EXCLUDED`): the same data read from a moved root is the same cache.
* Repair (:meth:`CacheWriter.repair_missing_shards`): a fragment whose ok rows point at a shard group
  that is missing (found with one listing of ``shards/``) is deleted, so its windows are redone.
* Retry of failed windows (:meth:`CacheWriter.drop_failed_rows`): every fragment holding failed rows
  is atomically rewritten without them (deleted when nothing is left) *before* the windows are
  redone, so a window never has two rows, even if the run dies in between (it is then simply not done).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from cameo_corr.schemas import (
    CACHE_ARRAYS,
    SCHEMA_VERSION,
    CacheConfig,
    DatasetError,
    PointmapResult,
    SchemaError,
    TokenCorrespondences,
    WindowRecord,
    manifest_schema,
    validate_window_arrays,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pyarrow as pa
    import zarr

    from cameo_corr.datasets.base import SceneReader
    from cameo_corr.datasets.canonical import CanonicalView

CONFIG_FILE = "cache.json"
SHARDS_DIR = "shards"
MANIFEST_DIR = "manifest"
TMP_PREFIX = ".tmp-"
ZSTD_LEVEL = 3


class CacheMismatchError(SchemaError):
    """A run's config differs from the ``cache.json`` of the cache it would write into."""


# ------------------------------------------------------------------------------------------ storage
class CacheLocation:
    """Where a cache lives: a local directory or an fsspec URL, with the few file operations we need."""

    def __init__(self, path: str | Path, storage_options: Mapping[str, Any] | None = None) -> None:
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        text = str(path)
        self.storage_options = dict(storage_options or {})
        self.local = "://" not in text
        if self.local:
            if self.storage_options:
                raise ValueError(f"storage_options given for the local path {text!r}; they apply to URLs only")
            self.fs = LocalFileSystem(auto_mkdir=True)
            self.root = os.path.abspath(text)
        else:
            options = dict(self.storage_options)
            if text.startswith(("file://", "local://")):
                options.setdefault("auto_mkdir", True)
            self.fs, self.root = fsspec.core.url_to_fs(text, **options)
            self.root = self.root.rstrip("/")
        self.display = text

    def path(self, *parts: str) -> str:
        """Filesystem path (no protocol) of ``parts`` under the cache root."""
        return "/".join([self.root, *parts])

    def url(self, *parts: str) -> str:
        """Full URL (with protocol) of ``parts``; a plain path for local caches."""
        p = self.path(*parts)
        return p if self.local else self.fs.unstrip_protocol(p)

    def _fresh(self, path: str) -> str:
        """``path`` after dropping cached listings of it and its parents.

        Object-store filesystems (s3fs, gcsfs) cache directory listings per instance and answer
        ``exists``/``info``/``ls`` from them; writes by other processes (workers) and by zarr's own
        store instance never reach that cache, so every query here starts from the store itself.
        """
        self.fs.invalidate_cache(path)
        return path

    def exists(self, *parts: str) -> bool:
        return bool(self.fs.exists(self._fresh(self.path(*parts))))

    def listdir(self, *parts: str) -> list[str]:
        """Names (not paths) of the entries directly under ``parts``; empty when it does not exist."""
        base = self._fresh(self.path(*parts))
        if not self.fs.exists(base):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False))

    def remove(self, *parts: str) -> None:
        """Delete a file or a directory tree."""
        self.fs.rm(self.path(*parts), recursive=True)

    def move(self, src: str, dst: str) -> None:
        """Rename ``src`` to ``dst`` (relative paths): atomic ``os.rename`` locally (also ``file://``).

        On object stores (``s3://``, ``gs://``...) a directory is only a key prefix, and fsspec's
        recursive ``mv`` also tries to copy the prefixes themselves (and raises), so a directory is
        moved as the list of its files (server-side copies), then the source is deleted.
        """
        from fsspec.implementations.local import LocalFileSystem

        if self.local or isinstance(self.fs, LocalFileSystem):
            os.rename(self.path(src), self.path(dst))
            return
        src_path, dst_path = self._fresh(self.path(src)), self._fresh(self.path(dst))
        if not self.fs.isdir(src_path):
            self.fs.mv(src_path, dst_path)
            return
        files = self.fs.find(src_path)
        if files:
            self.fs.copy(files, [dst_path + f[len(src_path) :] for f in files], on_error="raise")
        self.fs.rm(src_path, recursive=True)

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        """Write ``data`` to ``rel`` through a temporary name in the same folder, then rename."""
        folder, _, name = rel.rpartition("/")
        tmp = f"{folder}/{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}" if folder else f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
        self.fs.makedirs(self.path(folder) if folder else self.root, exist_ok=True)
        with self.fs.open(self.path(tmp), "wb") as f:
            f.write(data)
        self.move(tmp, rel)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open(self._fresh(self.path(rel)), "rb") as f:
            return f.read()

    def zarr_store(self, rel: str, *, read_only: bool) -> Any:
        """A zarr v3 store rooted at ``rel``: ``LocalStore`` locally, ``FsspecStore`` for URLs."""
        from zarr.storage import FsspecStore, LocalStore

        if self.local:
            return LocalStore(self.path(rel), read_only=read_only)
        options = dict(self.storage_options)
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else tuple(self.fs.protocol)
        if "file" in protocols:
            options.setdefault("auto_mkdir", True)
        return FsspecStore.from_url(self.url(rel), storage_options=options or None, read_only=read_only)

    def disk_usage(self, *parts: str) -> int:
        """Total bytes of the files under ``parts`` (0 when absent)."""
        base = self._fresh(self.path(*parts))
        if not self.fs.exists(base):
            return 0
        return int(sum(info["size"] for info in self.fs.find(base, detail=True).values()))


def shard_dir(shard_id: str) -> str:
    """Relative path of a finished shard group."""
    return f"{SHARDS_DIR}/{shard_id}.zarr"


def fragment_path(shard_id: str) -> str:
    """Relative path of a shard's manifest fragment."""
    return f"{MANIFEST_DIR}/part-{shard_id}.parquet"


def read_config(location: CacheLocation) -> CacheConfig:
    """Parse ``cache.json``; errors name the file and the field."""
    where = location.url(CONFIG_FILE)
    if not location.exists(CONFIG_FILE):
        raise DatasetError(where, "not a cameo-corr cache: cache.json is missing")
    return CacheConfig.from_json(location.read_bytes(CONFIG_FILE).decode(), where=where)


def fragment_names(location: CacheLocation) -> list[str]:
    """Names of the finished manifest fragments, sorted (``part-<shard_id>.parquet``)."""
    return [n for n in location.listdir(MANIFEST_DIR) if n.startswith("part-") and n.endswith(".parquet")]


def read_manifest(location: CacheLocation) -> "pa.Table":
    """All finished fragments concatenated in fragment-name order (empty table when none)."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    schema = manifest_schema()
    names = fragment_names(location)
    if not names:
        return schema.empty_table()
    paths = [location.path(MANIFEST_DIR, n) for n in names]
    try:
        table = pads.dataset(paths, format="parquet", filesystem=location.fs, schema=schema).to_table()
    except (pa.ArrowInvalid, OSError) as e:
        raise DatasetError(location.url(MANIFEST_DIR), f"cannot read the manifest fragments: {e}") from e
    return table.replace_schema_metadata(schema.metadata)


# ------------------------------------------------------------------------------------------ arrays
def window_arrays(corr: TokenCorrespondences, result: PointmapResult) -> dict[str, np.ndarray]:
    """One window's cache arrays (schema dtypes, no ``W`` axis) from matcher + backend outputs.

    Raises :class:`SchemaError` (field ``points``) when a valid token's point overflows float16.
    """
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
    pairs ``i != j`` (all query tokens counted, diagonal blocks excluded)."""
    valid = np.asarray(arrays["valid"])
    mask = np.asarray(arrays["mask"])
    S = mask.shape[0]
    off = ~np.eye(S, dtype=bool)
    valid_frac = float(valid.mean()) if valid.size else 0.0
    mask_frac = float(mask[off].mean()) if S > 1 else 0.0
    return valid_frac, mask_frac


@dataclass
class WindowOutcome:
    """What the writer records for one window: its arrays (ok) or its error (failed)."""

    record: WindowRecord
    arrays: dict[str, np.ndarray] | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        if (self.arrays is None) == (self.error is None):
            raise ValueError(f"window {self.record.window_id}: exactly one of arrays and error must be set")


# ------------------------------------------------------------------------------------------ writer
def _plain_json(value: Any) -> Any:
    """``value`` after a JSON round trip (tuples become lists), for comparing configs."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


COMPARED_FIELDS = ("schema_version", "grid", "tau", "views", "crop", "dataset", "backend")
"""``cache.json`` fields that must agree between a cache and a run writing into it (its identity)."""

IDENTITY_EXCLUDED: dict[str, tuple[str, ...]] = {"dataset": ("root",)}
"""Keys of :data:`COMPARED_FIELDS` entries that are recorded but not compared: the dataset root (a cache
resumed from a moved copy of the dataset stays the same cache; ``cache.json`` keeps the first root)."""


def _identity(config: CacheConfig, name: str) -> Any:
    """The compared value of field ``name`` of ``config`` (JSON round trip, excluded keys dropped)."""
    value = _plain_json(getattr(config, name))
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if k not in IDENTITY_EXCLUDED.get(name, ())}
    return value


def check_compatible(location: CacheLocation, config: CacheConfig, fields: Sequence[str] = COMPARED_FIELDS) -> None:
    """Raise :class:`CacheMismatchError` if the cache at ``location`` has a config that differs from
    ``config`` in any of ``fields``; a cache without ``cache.json`` is compatible with anything."""
    if not location.exists(CONFIG_FILE):
        return
    existing = read_config(location)
    diffs = [(f, _identity(existing, f), _identity(config, f)) for f in fields if _identity(existing, f) != _identity(config, f)]
    if diffs:
        detail = "; ".join(f"{f}: cache has {theirs}, this run has {mine}" for f, theirs, mine in diffs)
        raise CacheMismatchError(
            diffs[0][0], f"refusing to mix configs in one cache ({detail}); write to a new --out", where=location.url(CONFIG_FILE)
        )


class CacheWriter:
    """Writes shards and manifest fragments of one cache (one instance per worker is fine)."""

    def __init__(self, path: str | Path, config: CacheConfig, storage_options: Mapping[str, Any] | None = None) -> None:
        config.validate()
        self.location = CacheLocation(path, storage_options)
        self.config = config

    def initialize(self) -> None:
        """Refuse to write into a cache whose ``cache.json`` has a different identity.

        Nothing is written here: ``cache.json`` is written by the first shard commit
        (:meth:`write_shard`), so a run that fails before committing leaves no config behind. The
        comparison covers everything that changes the cached values or their meaning
        (:data:`COMPARED_FIELDS`: the fingerprint's schema version, grid, tau, backend and crop, the
        number of views and the dataset without its root); ``created_by`` may differ.
        """
        check_compatible(self.location, self.config)

    def done_window_ids(self) -> "pa.Array":
        """Ids of windows that already have a manifest row (ok or failed), as a pyarrow string array."""
        return read_manifest(self.location).column("window_id").combine_chunks()

    def repair_missing_shards(self) -> list[str]:
        """Delete the manifest fragments whose ok rows point at a missing shard group; return their
        shard ids. One listing of ``shards/`` finds the missing groups; the windows of a deleted
        fragment (ok and failed rows alike) are then not done and a run redoes them."""
        import pyarrow.compute as pc

        present = {n[: -len(".zarr")] for n in self.location.listdir(SHARDS_DIR) if n.endswith(".zarr")}
        referenced = pc.unique(read_manifest(self.location).column("shard").drop_null()).to_pylist()
        missing = sorted(s for s in referenced if s not in present)
        for shard_id in missing:
            self.location.remove(fragment_path(shard_id))
        return missing

    def drop_failed_rows(self) -> list[str]:
        """Supersede the failed rows (``--retry-failed``): rewrite every fragment holding failed rows
        without them (atomically; deleted when only failed rows were in it) and return the window ids
        dropped. Call before redoing those windows, so no window ever has two manifest rows."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        dropped: list[str] = []
        for name in fragment_names(self.location):
            rel = f"{MANIFEST_DIR}/{name}"
            with self.location.fs.open(self.location.path(rel), "rb") as f:
                table = pq.read_table(f, schema=manifest_schema())
            failed = pc.equal(table.column("status"), "failed")
            if not pc.any(failed).as_py():
                continue
            dropped += table.filter(failed).column("window_id").to_pylist()
            kept = table.filter(pc.invert(failed))
            if kept.num_rows == 0:
                self.location.remove(rel)
                continue
            sink = pa.BufferOutputStream()
            pq.write_table(kept, sink, compression="zstd")
            self.location.write_bytes_atomic(rel, sink.getvalue().to_pybytes())
        return dropped

    def remove_orphans(self) -> list[str]:
        """Delete what killed workers left behind; returns the removed relative paths.

        Orphans are temporary entries in ``shards/``, ``manifest/`` and the cache root, and shard
        groups without a manifest fragment (renamed but never recorded). Call this only when no other
        writer of this cache is running.
        """
        removed: list[str] = []
        for folder in (SHARDS_DIR, MANIFEST_DIR):
            for name in self.location.listdir(folder):
                if name.startswith(TMP_PREFIX):
                    removed.append(f"{folder}/{name}")
        for name in self.location.listdir():
            if name.startswith(TMP_PREFIX):
                removed.append(name)
        finished = {n[len("part-") : -len(".parquet")] for n in fragment_names(self.location)}
        for name in self.location.listdir(SHARDS_DIR):
            if name.endswith(".zarr") and not name.startswith(TMP_PREFIX) and name[: -len(".zarr")] not in finished:
                removed.append(f"{SHARDS_DIR}/{name}")
        for rel in removed:
            self.location.remove(rel)
        return removed

    def write_shard(self, shard_id: str, outcomes: Sequence[WindowOutcome]) -> "pa.Table":
        """Write one shard (its ok windows) and then its manifest fragment; return the fragment rows.

        Failed windows get a row with their error, ``shard``/``row`` null and NaN fractions. The first
        commit into a new cache writes ``cache.json`` (before the fragment, so no fragment exists
        without it; concurrent first commits of one job write the same bytes).

        A shard whose fragment already exists is finished: nothing is written and its rows are
        returned (an actor retried after finishing). A stale group without a fragment is replaced.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.location.exists(fragment_path(shard_id)):
            with self.location.fs.open(self.location.path(fragment_path(shard_id)), "rb") as f:
                return pq.read_table(f, schema=manifest_schema())
        ok = [o for o in outcomes if o.arrays is not None]
        if ok:
            self._write_group(shard_id, ok)
        if not self.location.exists(CONFIG_FILE):  # the first commit of a new cache
            self.location.write_bytes_atomic(CONFIG_FILE, self.config.to_json().encode())
        rows = []
        row_of = {o.record.window_id: r for r, o in enumerate(ok)}
        for o in outcomes:
            rec = o.record
            valid_frac, mask_frac = window_fractions(o.arrays) if o.arrays is not None else (math.nan, math.nan)
            rows.append(
                {
                    "window_id": rec.window_id,
                    "dataset": rec.dataset,
                    "split": rec.split,
                    "scene_id": rec.scene_id,
                    "frame_ids": rec.frame_ids,
                    "image_paths": rec.image_paths,
                    "shard": shard_id if o.arrays is not None else None,
                    "row": row_of.get(rec.window_id),
                    "num_views": rec.num_views,
                    "valid_frac": valid_frac,
                    "mask_frac": mask_frac,
                    "status": "ok" if o.arrays is not None else "failed",
                    "error": o.error,
                }
            )
        table = pa.Table.from_pylist(rows, schema=manifest_schema())
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        self.location.write_bytes_atomic(fragment_path(shard_id), sink.getvalue().to_pybytes())
        return table

    def _write_group(self, shard_id: str, ok: Sequence[WindowOutcome]) -> None:
        """Build the shard group under a temporary name (all arrays created and written concurrently
        in one pass on zarr's event loop), then rename it into place."""
        from zarr.api.asynchronous import open_group
        from zarr.codecs import ZstdCodec

        views, grid = self.config.views, tuple(self.config.grid)
        for o in ok:
            validate_window_arrays(o.arrays, views, grid, where=f"window {o.record.window_id}")  # type: ignore[arg-type]
        data = {name: np.stack([o.arrays[name] for o in ok]) for name in CACHE_ARRAYS}  # type: ignore[index]
        attrs = {
            "shard_id": shard_id,
            "window_ids": [o.record.window_id for o in ok],
            "schema_version": SCHEMA_VERSION,
            "views": views,
            "grid": list(grid),
        }
        tmp = f"{SHARDS_DIR}/{TMP_PREFIX}{shard_id}-{uuid.uuid4().hex[:8]}.zarr"
        store = self.location.zarr_store(tmp, read_only=False)

        async def write() -> None:
            group = await open_group(store=store, mode="w", attributes=attrs)
            await asyncio.gather(
                *(
                    group.create_array(
                        name=name,
                        data=values,
                        chunks=(1, *values.shape[1:]),
                        shards=values.shape,
                        compressors=ZstdCodec(level=ZSTD_LEVEL),
                        fill_value=0,
                    )
                    for name, values in data.items()
                )
            )

        run_on_zarr_loop(write())
        final = shard_dir(shard_id)
        if self.location.exists(final):
            self.location.remove(final)
        self.location.move(tmp, final)


def run_on_zarr_loop(coro: Any) -> Any:
    """Run a coroutine of zarr's async API on zarr's own event loop (what its sync API does), so
    several array operations of one shard or window overlap instead of running one by one."""
    from zarr.core.sync import sync

    return sync(coro)


# ------------------------------------------------------------------------------------------ reader
class CorrCache:
    """Read-only view of a finished (or growing) cache: manifest, windows, shards, dataset, crop.

    ``CorrCache(path).window(window_id)`` returns the window's arrays (``CACHE_ARRAYS`` names, stored
    dtypes, no ``W`` axis) as numpy, or torch tensors with ``torch=True``. The manifest is read once
    (call :meth:`refresh` to see shards written since). Instances pickle without their open shards,
    so they can be handed to DataLoader worker processes.
    """

    max_open_shards = 64

    def __init__(self, path: str | Path, storage_options: dict | None = None) -> None:
        self.location = CacheLocation(path, storage_options)
        self.path = path
        self.storage_options = storage_options
        self.config: CacheConfig = read_config(self.location)
        self._manifest: pa.Table | None = None
        self._index: dict[str, int] | None = None
        self._shards: OrderedDict[str, zarr.Group] = OrderedDict()
        self._arrays: dict[str, dict[str, zarr.Array]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_shards"] = OrderedDict()
        state["_arrays"] = {}
        return state

    def __repr__(self) -> str:
        return f"CorrCache({self.location.display!r}, views={self.config.views}, grid={tuple(self.config.grid)})"

    def __len__(self) -> int:
        return len(self.window_ids())

    def refresh(self) -> None:
        """Forget the cached manifest and open shards (see fragments written since)."""
        self._manifest = None
        self._index = None
        self._shards.clear()
        self._arrays.clear()

    def _full_manifest(self) -> "pa.Table":
        if self._manifest is None:
            self._manifest = read_manifest(self.location)
            ids = self._manifest.column("window_id").to_pylist()
            self._index = {wid: i for i, wid in enumerate(ids)}
        return self._manifest

    def manifest(self, status: str | None = "ok") -> "pa.Table":
        """Manifest rows with ``status`` (``"ok"``, ``"failed"``, or ``None`` for all), fragment order."""
        import pyarrow.compute as pc

        table = self._full_manifest()
        if status is None:
            return table
        if status not in ("ok", "failed"):
            raise ValueError(f"status must be 'ok', 'failed' or None, got {status!r}")
        return table.filter(pc.equal(table.column("status"), status))

    def window_ids(self) -> list[str]:
        """Ids of the ok windows, in manifest order."""
        return self.manifest("ok").column("window_id").to_pylist()

    def row(self, window_id: str) -> dict[str, Any]:
        """The manifest row of ``window_id`` as a dict (``KeyError`` naming the cache if absent)."""
        table = self._full_manifest()
        assert self._index is not None
        if window_id not in self._index:
            raise KeyError(f"window {window_id!r} is not in the manifest of {self.location.display}")
        return table.slice(self._index[window_id], 1).to_pylist()[0]

    def open_shard(self, shard_id: str) -> "zarr.Group":
        """The read-only zarr group of a finished shard (lazy; kept in a small LRU)."""
        import zarr

        if shard_id in self._shards:
            self._shards.move_to_end(shard_id)
            return self._shards[shard_id]
        rel = shard_dir(shard_id)
        if not self.location.exists(rel):
            raise DatasetError(self.location.url(rel), "shard listed in the manifest is missing")
        group = zarr.open_group(self.location.zarr_store(rel, read_only=True), mode="r")
        self._shards[shard_id] = group
        while len(self._shards) > self.max_open_shards:
            evicted, _ = self._shards.popitem(last=False)
            self._arrays.pop(evicted, None)
        return group

    def _shard_arrays(self, shard_id: str) -> "dict[str, zarr.Array]":
        """The opened arrays of a shard (array metadata is read once per shard, not per window)."""
        group = self.open_shard(shard_id)
        if shard_id not in self._arrays:
            self._arrays[shard_id] = {name: group[name] for name in CACHE_ARRAYS}
        return self._arrays[shard_id]

    def window(self, window_id: str, *, torch: bool = False) -> dict[str, Any]:
        """The arrays of one ok window (numpy, or torch tensors when ``torch=True``)."""
        row = self.row(window_id)
        if row["status"] != "ok":
            raise KeyError(f"window {window_id!r} failed during preprocessing: {row['error']}")
        arrays = self._shard_arrays(row["shard"])
        r = int(row["row"])

        async def read() -> list[Any]:
            return await asyncio.gather(*(arr.async_array.getitem(r) for arr in arrays.values()))

        out: dict[str, Any] = {name: np.asarray(v) for name, v in zip(arrays, run_on_zarr_loop(read()))}
        if torch:
            import torch as _torch

            out = {k: _torch.from_numpy(v) for k, v in out.items()}
        return out

    def reader(self) -> "SceneReader":
        """The dataset reader the cache was built from (``open_dataset(**config.dataset)``)."""
        from cameo_corr.datasets.base import open_dataset

        options = dict(self.config.dataset)
        root = options.pop("root")
        if "://" not in str(root) and not os.path.isdir(root):
            raise DatasetError(str(root), "the dataset root recorded in cache.json is not a directory (moved? the root is not "
                               "part of the cache's identity: pass the new one, e.g. data.dataset_root=<dir> to train, "
                               "--root to preprocess)", field="dataset.root")
        return open_dataset(options.pop("name"), root, **options)

    def view(self) -> "CanonicalView":
        """The canonical view (crop policy + size) the cache was computed on."""
        from cameo_corr.datasets.canonical import CanonicalView

        return CanonicalView.from_dict(self.config.crop)


__all__ = [
    "CONFIG_FILE",
    "SHARDS_DIR",
    "MANIFEST_DIR",
    "TMP_PREFIX",
    "CacheMismatchError",
    "CacheLocation",
    "COMPARED_FIELDS",
    "IDENTITY_EXCLUDED",
    "check_compatible",
    "shard_dir",
    "fragment_path",
    "read_config",
    "fragment_names",
    "read_manifest",
    "window_arrays",
    "window_fractions",
    "WindowOutcome",
    "CacheWriter",
    "run_on_zarr_loop",
    "CorrCache",
]
