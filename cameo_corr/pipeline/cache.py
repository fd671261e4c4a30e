"""The correspondence cache on disk (SPEC section 4): shard writer, manifest and the reader API.

Layout (schema version 2)::

    <cache>/cache.json                          written once; a run with another config is refused
    <cache>/shards/<shard_id>.zarr.zip          one zip file per shard: a zarr v3 group of its ok windows
    <cache>/manifest/part-<shard_id>.parquet    one fragment per shard, written LAST (tmp name + rename)
    <cache>/manifest/compact-<gen>-<k>.parquet  consolidated fragments: parts, each sorted by window_id
    <cache>/manifest/consolidated.json          which parts (compact files) are current, which fragments they hold

A shard is **one object**: the zarr group (arrays of :data:`~cameo_corr.schemas.CACHE_ARRAYS`, plus a
``g<h>x<w>/`` subgroup of grid arrays per extra grid of a multi-grid cache; one zarr shard per array
with inner chunks of 8 windows, consolidated metadata, per-window ids, scenes and frame ids in the
group attributes) is built in memory and stored as an uncompressed zip, written
under a temporary name and renamed into place (``os.rename`` locally, ``fs.mv`` on fsspec
filesystems such as ``s3://``). Opening a shard reads the zip directory and one ``zarr.json``; a window
read is two byte ranges per array. Every chunk is zstd-compressed and then checksummed (zarr's
``crc32c`` codec; the shard index carries its own crc32c), so a flipped byte anywhere raises
:class:`CorruptCacheError` naming the cache, shard, array and window.

A window is *done* only when its manifest row exists. While a job runs, every shard adds one small
fragment (crash safe: a worker killed at any point leaves nothing a reader trusts; temporary entries
and shards without a manifest entry are orphans that :meth:`CacheWriter.remove_orphans` deletes
before a run redoes them). :func:`consolidate_manifest` (while a job runs, every few hundred shards
(:class:`PeriodicConsolidation`), at job end, and ``cameo-corr cache compact``) moves the pending
fragments into a new *part* of Parquet files sorted by ``window_id`` with sized row groups, merging
the newest parts when they have grown as large as the one before, records them in
``consolidated.json`` (written atomically, so readers see either the old or the new set) and only
then deletes the merged fragments. Readers take the consolidated parts plus the fragments that are
not listed as merged. A shard with a manifest entry is finished and never rewritten.

Version 1 caches (one zarr *directory* per shard, fragments only, no checksums) stay readable;
:func:`migrate_cache` converts one into a version 2 cache. Local paths use zarr's ``LocalStore`` /
``ZipStore``; any URL (``s3://``, ``gs://``, ``file://``, ``memory://``) goes through fsspec with
``storage_options``. Only one job may write a cache at a time (the orphan sweep assumes so): the job
holds the cache's lease (:mod:`cameo_corr.pipeline.lease`) while it writes.

Life cycle of a cache:

* ``cache.json`` is written by the first shard commit (:meth:`CacheWriter.write_shard`, before that
  shard's fragment), never by a run that fails before committing anything; a run only *checks* an
  existing one (:meth:`CacheWriter.initialize`). Its identity (:data:`COMPARED_FIELDS`) leaves out the
  dataset root (:data:`IDENTITY_EXCLUDED`): the same data read from a moved root is the same cache.
* Repair (:meth:`CacheWriter.repair_missing_shards`): the ok rows of shards whose file is missing
  (found with one listing of ``shards/``) are removed, so their windows are redone; corrupt shards
  are dropped the same way (:func:`drop_shards`, ``preprocess --repair``).
* Retry of failed windows (:meth:`CacheWriter.drop_failed_rows`): fragments and consolidated files
  holding failed rows are atomically rewritten without them *before* the windows are redone, so a
  window never has two rows, even if the run dies in between (it is then simply not done).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterable, Mapping, Sequence

import numpy as np

from cameo_corr.schemas import (
    CACHE_ARRAYS,
    GRID_ARRAYS,
    SCHEMA_VERSION,
    CacheConfig,
    CameoCorrError,
    DatasetError,
    PointmapResult,
    SchemaError,
    TokenCorrespondences,
    WindowRecord,
    array_key,
    manifest_schema,
    validate_window_arrays,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pyarrow as pa
    import zarr

    from cameo_corr.datasets.base import SceneReader
    from cameo_corr.datasets.canonical import CanonicalView

logger = logging.getLogger(__name__)

CONFIG_FILE = "cache.json"
SHARDS_DIR = "shards"
MANIFEST_DIR = "manifest"
CONSOLIDATED_FILE = f"{MANIFEST_DIR}/consolidated.json"
TMP_PREFIX = ".tmp-"
ZSTD_LEVEL = 3
SHARD_SUFFIXES = {1: ".zarr", 2: ".zarr.zip"}
"""File name suffix of a finished shard per schema version (directory group in 1, zip file in 2)."""
CHUNK_WINDOWS = 8
"""Windows per inner chunk of a version 2 shard array. zarr decodes each chunk through its codec
pipeline with a fixed per-chunk overhead, so a shard visit of the training stream (three arrays of all
windows) costs ``3 * W / CHUNK_WINDOWS`` decodes; a single-window read decodes this many windows."""
MANIFEST_ROW_GROUP = 65_536
"""Rows per Parquet row group of a consolidated manifest file."""
MANIFEST_FILE_ROWS = 4_194_304
"""Rows per consolidated manifest file."""
MANIFEST_READAHEAD = 64
"""Compact manifest files a dataset scan reads ahead."""
MANIFEST_READ_THREADS = 8
"""Threads reading pending fragments (small files: a job killed before consolidating leaves up to
``--consolidate-every`` of them, or thousands when it ran without periodic consolidation)."""
MANIFEST_READ_ATTEMPTS = 3
"""Reads of the manifest when a concurrent consolidation deletes files under a reader."""


class CacheMismatchError(SchemaError):
    """A run's config differs from the ``cache.json`` of the cache it would write into."""


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
        super().__init__(f"{cache}: shard {shard}, {what}, {which}: corrupt data ({reason})")


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
        if self.local:  # one system call, no per-entry path normalisation (a cache holds ~N/64 shard files)
            try:
                return sorted(os.listdir(self.path(*parts)))
            except (FileNotFoundError, NotADirectoryError):
                return []
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
        try:
            return int(sum(info["size"] for info in self.fs.find(base, detail=True).values()))
        except FileNotFoundError:  # absent, or removed meanwhile (a fragment consolidated by the job)
            return 0


def shard_dir(shard_id: str, version: int = SCHEMA_VERSION) -> str:
    """Relative path of a finished shard: ``shards/<id>.zarr.zip`` (version 1: the ``.zarr`` directory)."""
    return f"{SHARDS_DIR}/{shard_id}{SHARD_SUFFIXES[version]}"


def shard_id_of_name(name: str) -> str | None:
    """The shard id of a finished shard entry name in ``shards/`` (``None`` for anything else)."""
    if name.startswith(TMP_PREFIX):
        return None
    for suffix in (".zarr.zip", ".zarr"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def fragment_path(shard_id: str) -> str:
    """Relative path of a shard's manifest fragment."""
    return f"{MANIFEST_DIR}/part-{shard_id}.parquet"


def read_config(location: CacheLocation) -> CacheConfig:
    """Parse ``cache.json``; errors name the file and the field."""
    where = location.url(CONFIG_FILE)
    if not location.exists(CONFIG_FILE):
        if not location.exists():
            raise DatasetError(location.display, "no such cache directory")
        raise DatasetError(where, "not a cameo-corr cache: cache.json is missing")
    return CacheConfig.from_json(location.read_bytes(CONFIG_FILE).decode(), where=where)


def _fragment_shard(name: str) -> str:
    return name[len("part-") : -len(".parquet")]


def read_consolidation(location: CacheLocation) -> dict[str, Any]:
    """``consolidated.json``: ``{"files": [...], "fragments": [shard ids], "rows": n, "parts": [...]}``
    (empty when absent). ``parts`` (oldest first) groups the compact files written together, each
    ``{"files": [...], "rows": n}``; a file written before parts existed reads as one part."""
    if not location.exists(CONSOLIDATED_FILE):
        return {"files": [], "fragments": [], "rows": 0, "parts": []}
    where = location.url(CONSOLIDATED_FILE)
    try:
        info = json.loads(location.read_bytes(CONSOLIDATED_FILE))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(where, f"not valid JSON: {e}") from e
    if not isinstance(info, dict) or not isinstance(info.get("files"), list) or not isinstance(info.get("fragments"), list):
        raise DatasetError(where, "expected an object with lists 'files' and 'fragments'")
    if "parts" not in info:
        info["parts"] = [{"files": list(info["files"]), "rows": int(info.get("rows", 0))}] if info["files"] else []
    parts = info["parts"]
    if (not isinstance(parts, list) or not all(isinstance(q, dict) and isinstance(q.get("files"), list) and isinstance(q.get("rows"), int) for q in parts)
            or [f for q in parts for f in q["files"]] != info["files"]):
        raise DatasetError(where, "field 'parts': expected a list of {'files': [...], 'rows': n} covering 'files' in order")
    return info


def fragment_names(location: CacheLocation) -> list[str]:
    """Names of the manifest fragment files present (``part-<shard_id>.parquet``), sorted.

    A fragment whose shard is listed as merged in ``consolidated.json`` is either left over by a
    consolidation that died before deleting it (its rows are all in the compact files) or the new
    fragment of a shard id committed again after its rows were dropped (repair, retry of failed
    windows); :func:`read_manifest` keeps only the rows of such a fragment that the compact files lack.
    """
    return [n for n in location.listdir(MANIFEST_DIR) if n.startswith("part-") and n.endswith(".parquet")]


def finished_shard_ids(location: CacheLocation) -> set[str]:
    """Ids of the shards that have manifest rows (a pending fragment or a consolidated entry)."""
    info = read_consolidation(location)
    return set(info["fragments"]) | {_fragment_shard(n) for n in fragment_names(location)}


def read_manifest(location: CacheLocation, columns: Sequence[str] | None = None, filter: Any = None) -> "pa.Table":
    """The manifest: consolidated files (each sorted by ``window_id``) then the pending fragments.

    ``columns`` selects columns (all by default: reading only what is needed is what keeps a million
    window manifest cheap); ``filter`` is a ``pyarrow.compute`` expression pushed down to the Parquet
    reader (row groups are skipped by their statistics). Version 1 fragments lack ``shard_bytes``,
    which reads as null. An empty table when the cache has no rows. A consolidation running meanwhile
    (the job consolidates periodically) may delete files between the listing and the read: the read
    then starts again from the new ``consolidated.json``.
    """
    import pyarrow as pa

    schema = manifest_schema()
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in columns], metadata=schema.metadata)
    for attempt in range(MANIFEST_READ_ATTEMPTS):
        info = read_consolidation(location)
        fragments = fragment_names(location)
        try:
            table = pa.concat_tables([_read_parquet(location, _compact_paths(location, info["files"]), schema, filter),
                                      _fragment_rows(location, info, fragments, schema, filter)])
        except DatasetError as e:
            if isinstance(e.__cause__, FileNotFoundError) and attempt + 1 < MANIFEST_READ_ATTEMPTS:
                continue
            raise
        return table.replace_schema_metadata(schema.metadata)
    raise AssertionError("unreachable")  # pragma: no cover


def _compact_paths(location: CacheLocation, names: Iterable[str]) -> list[str]:
    return [location.path(MANIFEST_DIR, n) for n in names]


def _fragment_rows(location: CacheLocation, info: Mapping[str, Any], fragments: Sequence[str], schema: "pa.Schema",
                   filter: Any) -> "pa.Table":
    """Rows of the fragments ``fragments`` that the compact files of ``info`` do not hold (see
    :func:`fragment_names`: a fragment of a shard listed as merged may repeat compact rows)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    merged = set(info["fragments"])
    table = _read_fragments(location, _compact_paths(location, [n for n in fragments if _fragment_shard(n) not in merged]), schema, filter)
    again = _compact_paths(location, [n for n in fragments if _fragment_shard(n) in merged])
    if again:
        extra = _read_fragments(location, again, schema, filter)
        if "window_id" in schema.names and extra.num_rows:
            compact = _read_parquet(location, _compact_paths(location, info["files"]), pa.schema([manifest_schema().field("window_id")]),
                                    pc.field("window_id").isin(extra.column("window_id")))
            extra = extra.filter(pc.invert(pc.is_in(extra.column("window_id"), value_set=compact.column("window_id"))))
        table = pa.concat_tables([table, extra])
    return table


def _arrow_filesystem(location: CacheLocation) -> Any:
    """The filesystem Arrow reads the manifest with: Arrow's own for local caches (C++ reads on
    Arrow's I/O threads, no Python call per file), the fsspec filesystem otherwise."""
    if location.local:
        import pyarrow.fs as pafs

        return pafs.LocalFileSystem()
    return location.fs


def _read_parquet(location: CacheLocation, paths: list[str], schema: "pa.Schema", filter: Any) -> "pa.Table":
    """Columns ``schema`` of the manifest files ``paths`` (empty table when none)."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    if not paths:
        return schema.empty_table()
    try:
        dataset = pads.dataset(paths, format="parquet", filesystem=_arrow_filesystem(location), schema=manifest_schema())
        # many small fragments (a job killed before consolidating): read ahead many files at once
        return dataset.to_table(columns=list(schema.names), filter=filter, fragment_readahead=MANIFEST_READAHEAD)
    except (pa.ArrowInvalid, OSError) as e:
        raise DatasetError(location.url(MANIFEST_DIR), f"cannot read the manifest: {e}") from e


def _read_fragments(location: CacheLocation, paths: list[str], schema: "pa.Schema", filter: Any) -> "pa.Table":
    """Columns ``schema`` of the fragment files ``paths``, filtered by ``filter``.

    A fragment is one small row group, so the fixed cost per file (open, footer, metadata) is all
    there is: each file is read whole by ``pyarrow.parquet.ParquetFile`` on a pool of
    :data:`MANIFEST_READ_THREADS` threads (Arrow releases the GIL), about 1.5x less CPU per file than
    a dataset scan. Columns a version 1 fragment lacks read as null.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not paths:
        return schema.empty_table()
    full = manifest_schema()
    wanted = full.names if filter is not None else schema.names  # the filter may name other columns
    target = pa.schema([full.field(c) for c in wanted])

    def read(path: str) -> "pa.Table":
        try:
            with (open(path, "rb") if location.local else location.fs.open(path, "rb")) as source, pq.ParquetFile(source) as f:
                table = f.read(columns=[c for c in wanted if c in f.schema_arrow.names])
            if table.schema.equals(target):
                return table
            columns = [table.column(c) if c in table.column_names else pa.nulls(table.num_rows, full.field(c).type) for c in wanted]
            return pa.Table.from_arrays(columns, names=wanted).cast(target)
        except (pa.ArrowInvalid, OSError) as e:
            raise DatasetError(location.url(MANIFEST_DIR), f"cannot read the manifest fragment {path.rsplit('/', 1)[-1]}: {e}") from e

    with ThreadPoolExecutor(MANIFEST_READ_THREADS) as pool:
        table = pa.concat_tables(list(pool.map(read, paths)))
    if filter is not None:
        table = table.filter(filter)
    return table.select(schema.names)


def _parquet_bytes(table: "pa.Table", row_group_size: int) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=row_group_size)
    return sink.getvalue().to_pybytes()


def _write_part(location: CacheLocation, table: "pa.Table", gen: int, *, row_group_size: int, file_rows: int) -> dict[str, Any]:
    """Write ``table`` sorted by ``window_id`` as the compact files of generation ``gen``; returns the
    part entry of ``consolidated.json``."""
    ids = id_array(table.column("window_id"))
    table = table.take(np.argsort(ids, kind="stable"))
    files = []
    for k, start in enumerate(range(0, max(table.num_rows, 1), file_rows)):
        name = f"compact-{gen:06d}-{k:05d}.parquet"
        location.write_bytes_atomic(f"{MANIFEST_DIR}/{name}", _parquet_bytes(table.slice(start, file_rows), row_group_size))
        files.append(name)
    return {"files": files, "rows": table.num_rows}


def _next_generation(info: Mapping[str, Any]) -> int:
    return max([int(n.split("-")[1]) for n in info["files"]] + [0]) + 1


def _swap_consolidation(location: CacheLocation, info: Mapping[str, Any], parts: Sequence[Mapping[str, Any]],
                        merged: Iterable[str]) -> dict[str, Any]:
    """Replace ``consolidated.json`` atomically (``parts``, merged shard ids), then delete the compact
    files of ``info`` that the new one no longer lists."""
    files = [f for q in parts for f in q["files"]]
    new = {"schema_version": SCHEMA_VERSION, "files": files, "fragments": sorted(merged), "rows": sum(q["rows"] for q in parts),
           "parts": [dict(q) for q in parts]}
    location.write_bytes_atomic(CONSOLIDATED_FILE, json.dumps(new).encode())
    for name in set(info["files"]) - set(files):
        location.remove(MANIFEST_DIR, name)
    return new


def _write_compact(location: CacheLocation, table: "pa.Table", info: Mapping[str, Any], merged: Sequence[str],
                   *, row_group_size: int = MANIFEST_ROW_GROUP, file_rows: int = MANIFEST_FILE_ROWS) -> dict[str, Any]:
    """Write ``table`` as the one part of the next generation listing ``merged`` shard fragments,
    swap ``consolidated.json`` atomically, then delete the previous generations' files."""
    part = _write_part(location, table, _next_generation(info), row_group_size=row_group_size, file_rows=file_rows)
    return _swap_consolidation(location, info, [part], merged)


def _parts_to_merge(rows: Sequence[int]) -> int:
    """Index of the first of the trailing parts to merge: while the parts after a part hold at least as
    many rows as it does, it joins them. Part sizes then at least double towards the oldest, so there
    are at most ``log2(rows / smallest part) + 1`` parts and a row is rewritten that many times at most
    (a binary counter): consolidating a whole job costs O(N log N) rows written, never O(N^2)."""
    i, newer = max(len(rows) - 1, 0), rows[-1] if rows else 0
    while i > 0 and rows[i - 1] <= newer:
        i -= 1
        newer += rows[i]
    return i


def consolidate_manifest(
    location: CacheLocation, *, full: bool = False, row_group_size: int = MANIFEST_ROW_GROUP, file_rows: int = MANIFEST_FILE_ROWS
) -> dict[str, Any]:
    """Move the pending fragments into the consolidated manifest; return the new ``consolidated.json``.

    Incremental: the pending fragments' rows become a new *part* (compact files sorted by
    ``window_id``, row groups of ``row_group_size`` rows, at most ``file_rows`` rows per file); the
    newest parts are merged only when they together hold as many rows as the part before them
    (:func:`_parts_to_merge`), so a job that consolidates every few hundred shards writes each row a
    logarithmic number of times. ``full`` merges every part into one (``cameo-corr cache compact``).
    Steps, each crash-safe: write the new compact files, replace ``consolidated.json`` atomically
    (readers see the old or the new set; unlisted files are ignored and swept as orphans), then delete
    the merged fragments and the replaced compact files. A fragment left by a crash after the swap
    repeats rows the compact files hold, and readers and the next consolidation skip those rows, so
    nothing is lost or counted twice at any instant. Only the cache's lease holder may call this.
    """
    info, _ = _consolidate(location, full=full, row_group_size=row_group_size, file_rows=file_rows)
    return info


def _consolidate(location: CacheLocation, *, full: bool, row_group_size: int = MANIFEST_ROW_GROUP,
                 file_rows: int = MANIFEST_FILE_ROWS) -> tuple[dict[str, Any], list[str]]:
    """:func:`consolidate_manifest`, also returning the names of the fragments it merged."""
    import pyarrow as pa

    info = read_consolidation(location)
    pending = fragment_names(location)
    parts = [dict(q) for q in info["parts"]]
    if not pending and not (full and len(parts) > 1):
        return info, []
    tables = [_fragment_rows(location, info, pending, manifest_schema(), None)] if pending else []
    sizes = [q["rows"] for q in parts] + [t.num_rows for t in tables if t.num_rows]
    first = 0 if full else _parts_to_merge(sizes)
    if first < len(sizes) and (len(sizes) - first > 1 or len(sizes) > len(parts)):  # one new part: the new rows + merged parts
        names = [f for q in parts[first:] for f in q["files"]]
        table = pa.concat_tables([read_manifest_file(location, f"{MANIFEST_DIR}/{n}") for n in names] + tables)
        parts[first:] = [_write_part(location, table, _next_generation(info), row_group_size=row_group_size, file_rows=file_rows)]
    new = _swap_consolidation(location, info, parts, set(info["fragments"]) | {_fragment_shard(n) for n in pending})
    for name in pending:
        location.remove(MANIFEST_DIR, name)
    return new, pending


DEFAULT_CONSOLIDATE_EVERY = 256
"""Pending fragments (shards) after which a running job consolidates its manifest: a killed job
leaves about this many fragments for the next run's start-up to read."""
DEFAULT_CONSOLIDATE_SECONDS = 600.0
"""Seconds after which a running job consolidates whatever fragments are pending (slow jobs)."""
CONSOLIDATE_POLL_SECONDS = 2.0
"""How often the job's driver lists ``manifest/`` to decide whether to consolidate."""


class PeriodicConsolidation:
    """Consolidates the manifest while a job runs, from a background thread of the job's driver.

    Every :data:`CONSOLIDATE_POLL_SECONDS` (or ``every_seconds`` if shorter) it lists ``manifest/``;
    when ``every_shards`` fragments are pending, or any are and ``every_seconds`` passed since the last
    consolidation, it runs :func:`consolidate_manifest` (incremental), as long as ``holds_lease()`` says the job still holds
    the cache's lease (one consolidator per cache). Write tasks keep committing meanwhile: a fragment
    renamed into place after the listing simply waits for the next round. A failed round (a store
    error) is logged and retried at the next poll; it leaves the manifest as it was (crash-safe
    protocol). :attr:`merged` collects the names of the fragments it merged, :attr:`rounds` counts them.
    """

    def __init__(self, location: CacheLocation, *, every_shards: int = DEFAULT_CONSOLIDATE_EVERY,
                 every_seconds: float = DEFAULT_CONSOLIDATE_SECONDS, holds_lease: Callable[[], bool] = lambda: True) -> None:
        if every_shards < 1 or not every_seconds > 0:
            raise ValueError(f"consolidate every >= 1 shards and > 0 seconds, got {every_shards} and {every_seconds}")
        self.location = location
        self.every_shards, self.every_seconds = int(every_shards), float(every_seconds)
        self.holds_lease = holds_lease
        self.merged: set[str] = set()
        self.rounds = 0
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def step(self) -> bool:
        """Consolidate if due (see the class docstring); whether it did."""
        pending = fragment_names(self.location)
        due = len(pending) >= self.every_shards or (bool(pending) and time.monotonic() - self._last >= self.every_seconds)
        if not due or not self.holds_lease():
            return False
        _, merged = _consolidate(self.location, full=False)
        self.merged.update(merged)
        self.rounds += 1
        self._last = time.monotonic()
        return True

    def _loop(self) -> None:
        while not self._stop.wait(min(CONSOLIDATE_POLL_SECONDS, self.every_seconds)):
            try:
                self.step()
            except (OSError, CameoCorrError) as e:  # the next poll tries again
                logger.warning("periodic manifest consolidation of %s failed (retried): %s", self.location.display, e)

    def start(self) -> "PeriodicConsolidation":
        """Start the background thread; return ``self``."""
        self._thread = threading.Thread(target=self._loop, name="manifest-consolidation", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread (a round in progress finishes first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def drop_shards(location: CacheLocation, shard_ids: Iterable[str]) -> list[str]:
    """Forget shards: remove their ok manifest rows (pending fragments rewritten or deleted, the
    consolidated files rewritten without them) and then their shard files, so the next run recomputes
    those windows. Failed rows stay (they never pointed at a shard file). Returns the window ids whose
    rows were removed. Crash-safe in that order: a shard file without rows is an orphan the next run
    deletes."""
    import pyarrow as pa
    import pyarrow.compute as pc

    drop = set(shard_ids)
    if not drop:
        return []
    values = pa.array(sorted(drop), pa.string())
    info = read_consolidation(location)
    removed: list[str] = []
    for name in fragment_names(location):
        if _fragment_shard(name) in drop:
            rel = f"{MANIFEST_DIR}/{name}"
            table = read_manifest_file(location, rel)
            gone = pc.fill_null(pc.is_in(table.column("shard"), values), False)
            removed += table.filter(gone).column("window_id").to_pylist()
            kept = table.filter(pc.invert(gone))
            if kept.num_rows:
                location.write_bytes_atomic(rel, _parquet_bytes(kept, MANIFEST_ROW_GROUP))
            else:
                location.remove(rel)
    if drop & set(info["fragments"]):
        parts = [read_manifest_file(location, f"{MANIFEST_DIR}/{n}") for n in info["files"]]
        table = pa.concat_tables(parts) if parts else manifest_schema().empty_table()
        gone = pc.fill_null(pc.is_in(table.column("shard"), values), False)
        removed += table.filter(gone).column("window_id").to_pylist()
        _write_compact(location, table.filter(pc.invert(gone)), info, sorted(set(info["fragments"]) - drop))
    for shard_id in sorted(drop):
        for version in SHARD_SUFFIXES:
            if location.exists(shard_dir(shard_id, version)):
                location.remove(shard_dir(shard_id, version))
    return removed


def read_manifest_file(location: CacheLocation, rel: str) -> "pa.Table":
    """One manifest Parquet file (a fragment or a compact file) with the manifest schema."""
    import pyarrow.parquet as pq

    with location.fs.open(location.path(rel), "rb") as f:
        return pq.read_table(f, schema=manifest_schema())


# ------------------------------------------------------------------------------------------ arrays
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


COMPARED_FIELDS = ("schema_version", "grid", "extra_grids", "tau", "views", "crop", "dataset", "backend")
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
        hint = "write to a new --out"
        if diffs[0][0] == "schema_version" and existing.schema_version < config.schema_version:
            hint = "convert the cache with `cameo-corr cache migrate` or write to a new --out"
        raise CacheMismatchError(
            diffs[0][0], f"refusing to mix configs in one cache ({detail}); {hint}", where=location.url(CONFIG_FILE)
        )


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
        comparison covers everything that changes the cached values, their meaning or their layout
        (:data:`COMPARED_FIELDS`: schema version, grid, tau, backend and crop, the number of views and
        the dataset without its root); ``created_by`` may differ. A version 1 cache is refused with a
        hint to migrate.
        """
        check_compatible(self.location, self.config)

    def done_window_ids(self) -> "pa.Array":
        """Ids of windows that already have a manifest row (ok or failed), as a pyarrow string array."""
        return read_manifest(self.location, columns=["window_id"]).column("window_id").combine_chunks()

    def remove_orphans(self) -> list[str]:
        """Delete what killed workers left behind; returns the removed relative paths.

        Orphans are temporary entries in ``shards/``, ``manifest/`` and the cache root, compact
        manifest files that ``consolidated.json`` does not list, and shard files without manifest rows
        (renamed but never recorded). Call this only when no other
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
        listed = set(read_consolidation(self.location)["files"])  # compact files of a consolidation that died
        removed += [f"{MANIFEST_DIR}/{n}" for n in self.location.listdir(MANIFEST_DIR) if n.startswith("compact-") and n not in listed]
        finished = finished_shard_ids(self.location)
        for name in self.location.listdir(SHARDS_DIR):
            sid = shard_id_of_name(name)
            if sid is not None and sid not in finished:
                removed.append(f"{SHARDS_DIR}/{name}")
        for rel in removed:
            self.location.remove(rel)
        return removed

    def repair_missing_shards(self) -> list[str]:
        """Forget the shards whose ok manifest rows point at a missing shard file (one listing of
        ``shards/``): their rows are removed (:func:`drop_shards`), so a run redoes their windows.
        Returns the shard ids."""
        import pyarrow.compute as pc

        present = {sid for n in self.location.listdir(SHARDS_DIR) if (sid := shard_id_of_name(n)) is not None}
        referenced = pc.unique(read_manifest(self.location, columns=["shard"]).column("shard").drop_null()).to_pylist()
        missing = sorted(s for s in referenced if s not in present)
        drop_shards(self.location, missing)
        return missing

    def drop_failed_rows(self) -> list[str]:
        """Supersede the failed rows (retrying failed windows): every pending fragment holding failed
        rows is rewritten without them (atomically; deleted when nothing is left) and the consolidated
        files are rewritten without theirs, *before* the windows are redone, so no window ever has two
        rows. Returns the dropped window ids."""
        import pyarrow as pa
        import pyarrow.compute as pc

        dropped: list[str] = []
        info = read_consolidation(self.location)
        for name in fragment_names(self.location):
            rel = f"{MANIFEST_DIR}/{name}"
            table = read_manifest_file(self.location, rel)
            failed = pc.equal(table.column("status"), "failed")
            if not pc.any(failed).as_py():
                continue
            dropped += table.filter(failed).column("window_id").to_pylist()
            kept = table.filter(pc.invert(failed))
            if kept.num_rows == 0:
                self.location.remove(rel)
            else:
                self.location.write_bytes_atomic(rel, _parquet_bytes(kept, MANIFEST_ROW_GROUP))
        if info["files"]:
            table = pa.concat_tables([read_manifest_file(self.location, f"{MANIFEST_DIR}/{n}") for n in info["files"]])
            failed = pc.equal(table.column("status"), "failed")
            if pc.any(failed).as_py():
                dropped += table.filter(failed).column("window_id").to_pylist()
                _write_compact(self.location, table.filter(pc.invert(failed)), info, info["fragments"])
        return dropped

    def consolidate(self, *, full: bool = False) -> dict[str, Any]:
        """Move the manifest fragments into the sorted Parquet manifest (:func:`consolidate_manifest`)."""
        return consolidate_manifest(self.location, full=full)

    def _finished_rows(self, shard_id: str, outcomes: Sequence[WindowOutcome]) -> "pa.Table | None":
        """The manifest rows of a shard that already has a fragment or a consolidated entry (for a
        consolidated shard: the rows of ``outcomes``' windows; shard ids hash their window ids)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if self.location.exists(fragment_path(shard_id)):
            try:
                return read_manifest_file(self.location, fragment_path(shard_id))
            except FileNotFoundError:  # consolidated meanwhile: consolidated.json lists it now
                pass
        if shard_id in read_consolidation(self.location)["fragments"]:
            ids = [o.record.window_id for o in outcomes]
            table = read_manifest(self.location, filter=pc.field("window_id").isin(ids))
            if table.num_rows == 0:  # all its rows were dropped (repair, retry of failed windows): redo it
                return None
            order = {w: i for i, w in enumerate(ids)}
            got = table.column("window_id").to_pylist()
            return table.take(pa.array(sorted(range(len(got)), key=lambda i: order[got[i]]), pa.int64()))
        return None

    def write_shard(self, shard_id: str, outcomes: Sequence[WindowOutcome]) -> "pa.Table":
        """Write one shard (its ok windows) and then its manifest fragment; return the fragment rows.

        Failed windows get a row with their error, ``shard``/``row``/``shard_bytes`` null and NaN
        fractions. The first commit into a new cache writes ``cache.json`` (before the fragment, so no
        fragment exists without it; concurrent first commits of one job write the same bytes). A shard
        that already has manifest rows is finished: nothing is written and its rows are returned (an
        actor retried after finishing). A stale shard file without rows is replaced.
        """
        import pyarrow as pa

        finished = self._finished_rows(shard_id, outcomes)
        if finished is not None:
            return finished
        ok = [o for o in outcomes if o.arrays is not None]
        nbytes = self._write_group(shard_id, ok) if ok else None
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
                    "shard_bytes": nbytes if o.arrays is not None else None,
                }
            )
        table = pa.Table.from_pylist(rows, schema=manifest_schema())
        self.location.write_bytes_atomic(fragment_path(shard_id), _parquet_bytes(table, MANIFEST_ROW_GROUP))
        return table

    def _write_group(self, shard_id: str, ok: Sequence[WindowOutcome]) -> int:
        """Validate the ok windows, write the shard file under a temporary name, rename it into place;
        returns its size in bytes."""
        cfg = self.config
        for o in ok:
            for grid in cfg.grids:
                keys = cfg.array_keys(grid)
                where = f"window {o.record.window_id}" + (f", grid {grid[0]}x{grid[1]}" if cfg.extra_grids else "")
                missing = [k for k in keys.values() if k not in o.arrays]  # type: ignore[operator]
                if missing:
                    raise SchemaError(missing[0], "missing", where=where)
                validate_window_arrays({n: o.arrays[k] for n, k in keys.items()}, cfg.views, grid, where=where)  # type: ignore[index]
        data = {key: np.stack([o.arrays[key] for o in ok]) for key in cfg.stored_keys()}  # type: ignore[index]
        blob = shard_zip_bytes(shard_id, shard_window_meta([o.record for o in ok]), data, self.config)
        self.location.write_bytes_atomic(shard_dir(shard_id), blob)
        return len(blob)


def run_on_zarr_loop(coro: Any) -> Any:
    """Run a coroutine of zarr's async API on zarr's own event loop (what its sync API does), so
    several array operations of one shard or window overlap instead of running one by one."""
    from zarr.core.sync import sync

    return sync(coro)


# ------------------------------------------------------------------------------------------ reader
def id_array(values: "pa.Array | pa.ChunkedArray") -> np.ndarray:
    """Window ids as a numpy fixed-width bytes array (``S<n>``): 16 bytes per id instead of a Python
    string each. Equal-length ids (all ids this package makes) are viewed from the Arrow buffer."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    arr = arr.cast(pa.string())
    if len(arr) == 0:
        return np.zeros(0, dtype="S1")
    lengths = pc.utf8_length(arr) if arr.null_count == 0 else None
    if lengths is not None:
        lo, hi = pc.min_max(pc.binary_length(arr)).values()
        if lo.as_py() == hi.as_py() and lo.as_py() > 0:
            width = lo.as_py()
            offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32, count=len(arr) + 1, offset=4 * arr.offset)
            data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
            return data.view(f"S{width}").copy()
    return np.array([v.encode() for v in arr.to_pylist()], dtype=bytes)


class ManifestIndex:
    """What a reader needs per ok window, as numpy columns (no Python object per window).

    ``ids`` (``S<n>``) sorted, with ``shard`` (index into ``shards``) and ``row`` aligned to them.
    Built from the ``window_id``, ``shard``, ``row`` columns of the ok rows only.
    """

    def __init__(self, table: "pa.Table") -> None:
        import pyarrow.compute as pc

        ids = id_array(table.column("window_id"))
        order = np.argsort(ids, kind="stable")
        self.ids = ids[order]
        encoded = pc.dictionary_encode(table.column("shard").combine_chunks())
        self.shards: list[str] = encoded.dictionary.to_pylist()
        self.shard = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int32)[order]
        self.row = table.column("row").to_numpy().astype(np.int32)[order]
        if len(self.ids) > 1 and np.any(self.ids[1:] == self.ids[:-1]):
            dup = self.ids[1:][self.ids[1:] == self.ids[:-1]][0].decode()
            raise SchemaError("window_id", f"window {dup} has more than one ok manifest row")

    def __len__(self) -> int:
        return len(self.ids)

    def find(self, window_id: str) -> int:
        """Position of ``window_id`` in :attr:`ids`, or -1."""
        key = np.array(window_id.encode(), dtype=self.ids.dtype) if len(self.ids) else None
        if key is None or len(window_id.encode()) > self.ids.dtype.itemsize:
            return -1
        i = int(np.searchsorted(self.ids, key))
        return i if i < len(self.ids) and self.ids[i] == key else -1


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


class CorrCache:
    """Read-only view of a finished (or growing) cache: manifest, windows, shards, dataset, crop.

    ``CorrCache(path).window(window_id)`` returns the window's arrays (``CACHE_ARRAYS`` names, stored
    dtypes, no ``W`` axis) as numpy, or torch tensors with ``torch=True``; :meth:`read_shard` decodes
    whole arrays of a shard at once (the training stream reads a shard once per visit). Opening reads
    ``cache.json`` only; the manifest is read lazily, only the columns a call needs (call
    :meth:`refresh` to see shards written since). Bytes failing their checksum raise
    :class:`CorruptCacheError`. Reads schema versions 1 and 2. Instances pickle without their open
    shards or manifest, so they can be handed to DataLoader worker processes.
    """

    max_open_shards = 64

    def __init__(self, path: str | Path, storage_options: dict | None = None) -> None:
        self.location = CacheLocation(path, storage_options)
        self.path = path
        self.storage_options = storage_options
        self.config: CacheConfig = read_config(self.location)
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
            return read_manifest(self.location, columns=columns, filter=filt)
        table = self._full_manifest()
        return table if status is None else table.filter(pc.equal(table.column("status"), status))

    def _full_manifest(self) -> "pa.Table":
        if self._manifest is None:
            self._manifest = read_manifest(self.location)
        return self._manifest

    def index(self) -> ManifestIndex:
        """The numpy index of the ok windows (read once: ``window_id``, ``shard``, ``row`` columns)."""
        if self._index is None:
            self._index = ManifestIndex(self.manifest("ok", columns=["window_id", "shard", "row"]))
        return self._index

    def window_ids(self) -> list[str]:
        """Ids of the ok windows, sorted."""
        ids = self.index().ids
        try:
            return ids.astype(f"U{max(ids.dtype.itemsize, 1)}").tolist()  # hex ids: one vectorised decode
        except UnicodeDecodeError:
            return [v.decode() for v in ids.tolist()]

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

    def _open_store(self, shard_id: str) -> Any:
        rel = shard_dir(shard_id, self.version)
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
            return agroup, await asyncio.gather(*(agroup.getitem(key) for key in keys))

        try:
            agroup, arrays = run_on_zarr_loop(open_all())
            group = zarr.Group(agroup)
            self._arrays[shard_id] = {key: zarr.Array(arr) for key, arr in zip(keys, arrays)}
        except KeyError as e:
            raise CorruptCacheError(self.location.display, shard_id, None, None, f"array {e} missing") from e
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
            except Exception as e:  # checksum mismatch (ValueError), zstd/zip errors...: all "corrupt"
                raise CorruptCacheError(self.location.display, shard_id, name, window, e) from e

        async def read() -> list[Any]:
            return await asyncio.gather(*(one(n) for n in names))

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


# ------------------------------------------------------------------------------------------ migrate
def migrate_cache(src: str | Path, dst: str | Path, *, storage_options: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Convert a version 1 cache into a new version 2 cache at ``dst`` (``src`` is left untouched).

    Every shard is re-read (decoding checks it) and rewritten as one checksummed zip file with the
    same rows; manifest rows are kept (values, window ids, ``row``) with ``shard_bytes`` added, and
    the manifest is consolidated. ``cache.json`` is written last. Returns counts.
    """
    import dataclasses

    import pyarrow as pa

    old = CorrCache(src, dict(storage_options or {}) or None)
    if old.version != 1:
        raise SchemaError("schema_version", f"only version 1 caches need migrating, this one is version {old.version}",
                          where=old.location.url(CONFIG_FILE))
    config = dataclasses.replace(old.config, schema_version=SCHEMA_VERSION)
    out = CacheLocation(dst, storage_options)
    if out.exists(CONFIG_FILE) or out.listdir(MANIFEST_DIR):
        raise DatasetError(out.url(), "migration target already holds a cache; choose a new directory")
    table = old.manifest(None)
    sizes: dict[str, int] = {}
    shards = sorted(s for s in set(table.column("shard").to_pylist()) if s is not None)
    for shard_id in shards:
        meta = old.shard_windows(shard_id)
        data = old.read_shard(shard_id)
        blob = shard_zip_bytes(shard_id, meta, data, config)
        out.write_bytes_atomic(shard_dir(shard_id), blob)
        sizes[shard_id] = len(blob)
    shard_col = table.column("shard").to_pylist()
    table = table.set_column(
        table.schema.get_field_index("shard_bytes"), manifest_schema().field("shard_bytes"),
        pa.array([sizes.get(s) if s is not None else None for s in shard_col], pa.int64()),
    )
    fragments = [_fragment_shard(n) for n in fragment_names(old.location)]
    _write_compact(out, table, {"files": [], "fragments": []}, fragments)  # sorted by window_id
    out.write_bytes_atomic(CONFIG_FILE, config.to_json().encode())
    return {"shards": len(shards), "windows": table.num_rows}


__all__ = [
    "CONFIG_FILE",
    "SHARDS_DIR",
    "MANIFEST_DIR",
    "CONSOLIDATED_FILE",
    "SHARD_SUFFIXES",
    "CHUNK_WINDOWS",
    "TMP_PREFIX",
    "CacheMismatchError",
    "CorruptCacheError",
    "CacheLocation",
    "COMPARED_FIELDS",
    "IDENTITY_EXCLUDED",
    "check_compatible",
    "shard_dir",
    "shard_id_of_name",
    "fragment_path",
    "read_config",
    "read_consolidation",
    "fragment_names",
    "finished_shard_ids",
    "read_manifest",
    "consolidate_manifest",
    "DEFAULT_CONSOLIDATE_EVERY",
    "DEFAULT_CONSOLIDATE_SECONDS",
    "PeriodicConsolidation",
    "drop_shards",
    "read_manifest_file",
    "SHARD_WINDOW_KEYS",
    "shard_window_meta",
    "shard_zip_bytes",
    "id_array",
    "ManifestIndex",
    "shard_zip_store",
    "migrate_cache",
    "window_arrays",
    "window_fractions",
    "WindowOutcome",
    "CacheWriter",
    "run_on_zarr_loop",
    "CorrCache",
]
