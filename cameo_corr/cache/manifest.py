"""The manifest, read side: one row per window (:func:`~cameo_corr.schemas.manifest_schema`).

While a job runs, every shard adds one small *fragment* (``manifest/part-<shard>.parquet``, written
last, after its shard: a window is *done* only when its manifest row exists). Consolidation
(:mod:`cameo_corr.cache.consolidation`) moves fragments into *parts* of compact Parquet files sorted by
``window_id`` listed in ``consolidated.json``. Readers take the consolidated parts plus the fragments
not listed as merged (:func:`read_manifest`, columns and filters pushed down to Parquet), and index
the ok windows as numpy columns (:class:`ManifestIndex`: no Python object per window).
"""

from __future__ import annotations

import binascii
import json
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import numpy as np

from cameo_corr.cache.layout import (
    CONSOLIDATED_FILE,
    MANIFEST_DIR,
    SHARDS_DIR,
    TMP_PREFIX,
    fragment_shard,
    is_fragment,
    shard_id_of_name,
)
from cameo_corr.schemas import DatasetError, SchemaError, manifest_schema

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pyarrow as pa

    from cameo_corr.cache.location import CacheLocation

MANIFEST_ROW_GROUP = 65_536
"""Rows per Parquet row group of a consolidated manifest file."""
MANIFEST_FILE_ROWS = 4_194_304
"""Rows per consolidated manifest file."""
MANIFEST_READAHEAD = 64
"""Compact manifest files a dataset scan reads ahead."""
MANIFEST_READ_THREADS = 8
"""Threads reading pending fragments from an object store (local fragments are read in the calling thread; small files: a
job killed before consolidating leaves up to ``--consolidate-every`` of them, or thousands when it ran
without periodic consolidation)."""
MANIFEST_READ_ATTEMPTS = 3
"""Reads of the manifest when a concurrent consolidation deletes files under a reader."""
T = TypeVar("T")



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
    return [n for n in location.listdir(MANIFEST_DIR) if is_fragment(n)]


def finished_shard_ids(location: CacheLocation) -> set[str]:
    """Ids of the shards that have manifest rows (a pending fragment or a consolidated entry)."""
    info = read_consolidation(location)
    return set(info["fragments"]) | {fragment_shard(n) for n in fragment_names(location)}


def stored_shard_ids(location: "CacheLocation") -> set[str]:
    """The ids of the shard files in ``shards/`` (one listing; temporary names are not shards)."""
    return {sid for n in location.listdir(SHARDS_DIR) if (sid := shard_id_of_name(n)) is not None}


def find_orphans(location: "CacheLocation") -> list[str]:
    """Relative paths of what killed writers left behind (each folder listed once).

    Orphans are temporary entries in ``shards/``, ``manifest/`` and the cache root, compact manifest
    files that ``consolidated.json`` does not list (a consolidation that died), and shard files without
    manifest rows (renamed into place but never recorded). Only safe to delete while no job writes the
    cache (:meth:`~cameo_corr.cache.writer.CacheWriter.remove_orphans`).
    """
    info = read_consolidation(location)
    manifest, shards = location.listdir(MANIFEST_DIR), location.listdir(SHARDS_DIR)
    finished = set(info["fragments"]) | {fragment_shard(n) for n in manifest if is_fragment(n)}
    listed = set(info["files"])
    found = [f"{SHARDS_DIR}/{n}" for n in shards if n.startswith(TMP_PREFIX)]
    found += [f"{MANIFEST_DIR}/{n}" for n in manifest if n.startswith(TMP_PREFIX)]
    found += [n for n in location.listdir() if n.startswith(TMP_PREFIX)]
    found += [f"{MANIFEST_DIR}/{n}" for n in manifest if n.startswith("compact-") and n not in listed]
    found += [f"{SHARDS_DIR}/{n}" for n in shards if (sid := shard_id_of_name(n)) is not None and sid not in finished]
    return found


def read_manifest(location: CacheLocation, columns: Sequence[str] | None = None, filter: Any = None,
                  filter_columns: Sequence[str] | None = None) -> "pa.Table":
    """The manifest: consolidated files (each sorted by ``window_id``) then the pending fragments.

    ``columns`` selects columns (all by default: reading only what is needed is what keeps a million
    window manifest cheap); ``filter`` is a ``pyarrow.compute`` expression pushed down to the Parquet
    reader (row groups are skipped by their statistics); ``filter_columns`` names the columns it reads
    (pending fragments are then decoded for those and ``columns`` only; every column when not given).
    Version 1 fragments lack ``shard_bytes``,
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
            table = pa.concat_tables([_read_parquet(location, compact_paths(location, info["files"]), schema, filter),
                                      fragment_rows(location, info, fragments, schema, filter, filter_columns)])
        except DatasetError as e:
            if isinstance(e.__cause__, FileNotFoundError) and attempt + 1 < MANIFEST_READ_ATTEMPTS:
                continue
            raise
        return table.replace_schema_metadata(schema.metadata)
    raise AssertionError("unreachable")  # pragma: no cover


def scan_manifest(location: CacheLocation, fold: Callable[[Iterator["pa.RecordBatch"]], T], columns: Sequence[str],
                  filter: Any = None) -> T:
    """``fold`` of the rows :func:`read_manifest` would return, streamed as record batches (the compact
    files one row group at a time, then the pending fragments) instead of one table: ``fold`` keeps what
    it needs (numpy columns, counts), so the peak is that plus a batch or two. Three columns of a
    10M-window manifest peak at 0.29 GB scanned against 0.97 GB read as a table. Row groups are read in
    turn (a dataset scan reads ahead of a slow ``fold``: 0.8 GB). A row group whose statistics show
    every column ``filter`` reads constant (``status`` all ``ok``: the usual case) is kept or skipped
    whole without reading those columns. When a concurrent consolidation deletes files under the scan, ``fold`` runs again on fresh batches."""
    import pyarrow as pa

    full = manifest_schema()
    schema = pa.schema([full.field(c) for c in columns], metadata=full.metadata)
    for attempt in range(MANIFEST_READ_ATTEMPTS):
        info = read_consolidation(location)
        fragments = fragment_names(location)

        def batches(info: Mapping[str, Any] = info, fragments: Sequence[str] = fragments) -> Iterator[pa.RecordBatch]:
            for path in compact_paths(location, info["files"]):
                yield from _file_batches(location, path, schema, filter)
            yield from fragment_rows(location, info, fragments, schema, filter).to_batches()

        try:
            return fold(batches())
        except DatasetError as e:
            if isinstance(e.__cause__, FileNotFoundError) and attempt + 1 < MANIFEST_READ_ATTEMPTS:
                continue
            raise
    raise AssertionError("unreachable")  # pragma: no cover


def _constant_filter(row_group: Any, columns: Sequence[str], filter: Any) -> bool | None:
    """``filter``'s value on every row of a Parquet row group (its metadata) when each of ``columns`` (those
    the filter reads) is constant there by its statistics (no null, ``min == max``), else ``None``."""
    import pyarrow as pa

    where = {row_group.column(j).path_in_schema: j for j in range(row_group.num_columns)}
    values = {}
    for c in columns:
        stats = row_group.column(where[c]).statistics if c in where else None
        if stats is None or not stats.has_min_max or not stats.has_null_count or stats.null_count or stats.min != stats.max:
            return None
        values[c] = stats.min
    full = manifest_schema()
    one = pa.table({c: pa.array([v], full.field(c).type) for c, v in values.items()})
    return one.filter(filter).num_rows == 1


def _file_batches(location: CacheLocation, path: str, schema: "pa.Schema", filter: Any) -> Iterator["pa.RecordBatch"]:
    """Columns ``schema`` of one compact manifest file, a row group at a time, rows satisfying ``filter``
    (:func:`_constant_filter` decides a row group whole when it can)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = list(schema.names)
    read_by_filter: list[str] = []
    if filter is not None:  # the columns the filter reads (a name inside a literal only adds a column)
        read_by_filter = [c for c in manifest_schema().names if c in str(filter)]
    try:
        with arrow_input(location, path) as source, pq.ParquetFile(source, pre_buffer=False) as f:
            for i in range(f.metadata.num_row_groups):
                keep = True if filter is None else _constant_filter(f.metadata.row_group(i), read_by_filter, filter)
                if keep is False:
                    continue
                extra = [c for c in read_by_filter if c not in names] if keep is None else []
                for batch in f.iter_batches(batch_size=MANIFEST_ROW_GROUP, row_groups=[i], columns=names + extra, use_threads=False):
                    table = pa.Table.from_batches([batch])
                    if keep is None:
                        table = table.filter(filter)
                    yield from table.select(names).cast(schema).to_batches()
    except (pa.ArrowInvalid, OSError) as e:
        raise DatasetError(location.url(MANIFEST_DIR), f"cannot read the manifest file {path.rsplit('/', 1)[-1]}: {e}") from e


class StringCodes:
    """Integer codes of a string column streamed in batches (:func:`scan_manifest`): a running dictionary
    of the values, each value one code for good (new values of a batch take the next codes), so no string
    is kept per row (``add`` each batch's column, then :meth:`result`; with ``keep=False`` only
    :attr:`names` is kept). Nulls get code -1.

    Values are matched by a 64-bit hash of their bytes (numpy, no Python object per row), checked
    against each code's stored bytes, so a hash collision is an error, never a wrong code."""

    def __init__(self, keep: bool = True) -> None:
        self.names: list[str] = []
        """The distinct values (code ``k`` is ``names[k]``)."""
        self._hashes = np.zeros(0, np.uint64)  # sorted
        self._codes = np.zeros(0, np.int32)  # code of each sorted hash
        self._stored = np.zeros(0, "S1")  # the bytes of each code's value, in code order (capacity doubles as it fills)
        self._parts: list[np.ndarray] = []
        self._keep = keep

    def add(self, column: "pa.Array") -> np.ndarray:
        """Code the rows of one batch's column (new values join the dictionary); returns the codes."""
        import pyarrow.compute as pc

        valid = np.asarray(pc.is_valid(column).to_numpy(zero_copy_only=False), dtype=bool)
        raw = id_array(column.filter(pc.is_valid(column)) if column.null_count else column)  # the valid rows
        width = -(-max(raw.dtype.itemsize, 1) // 8) * 8
        words = np.zeros((len(raw), width), np.uint8)
        if len(raw):
            words[:, : raw.dtype.itemsize] = raw.view(np.uint8).reshape(len(raw), raw.dtype.itemsize)
        hashes = np.zeros(len(raw), np.uint64)
        for k, col in enumerate(words.view(np.uint64).T):  # sum of word * P**k: zero padding adds nothing
            hashes += col * np.uint64(pow(0x100000001B3, k + 1, 1 << 64))
        hashes ^= hashes >> np.uint64(33)  # then mix the bits
        hashes *= np.uint64(0xFF51AFD7ED558CCD)
        hashes ^= hashes >> np.uint64(29)
        # np.unique(hashes, return_index=True, return_inverse=True) without its stable sort (2-3x slower):
        # the distinct hashes sorted, a row of each, and each row's
        order = np.argsort(hashes)
        ranked = hashes[order]
        starts = np.ones(len(order), bool)
        starts[1:] = ranked[1:] != ranked[:-1]
        uniq, first = ranked[starts], order[starts]
        inverse = np.empty(len(order), np.intp)
        inverse[order] = np.cumsum(starts) - 1
        pos = np.searchsorted(self._hashes, uniq)
        known = (pos < len(self._hashes)) & (self._hashes[np.minimum(pos, len(self._hashes) - 1)] == uniq) if len(self._hashes) else np.zeros(len(uniq), bool)
        new = np.flatnonzero(~known)
        codes_u = np.full(len(uniq), -1, np.int32)
        codes_u[known] = self._codes[pos[known]]
        codes_u[new] = np.arange(len(self.names), len(self.names) + len(new), dtype=np.int32)
        self._store(raw[first[new]])
        self.names += [v.decode() for v in raw[first[new]].tolist()]
        at = pos[new]  # where the new hashes go in the sorted ones (both sorted: a merge, no sort)
        self._hashes, self._codes = np.insert(self._hashes, at, uniq[new]), np.insert(self._codes, at, codes_u[new])
        out = np.full(len(valid), -1, np.int32)
        out[valid] = codes_u[inverse]
        if len(raw) and not np.array_equal(self._stored[out[valid]], raw):
            raise SchemaError(str(column.type), "two distinct manifest values share a 64-bit hash (never seen: please report)")
        if self._keep:
            self._parts.append(out)
        return out

    def _store(self, fresh: np.ndarray) -> None:
        """Append the bytes of new values (codes ``len(names) ...``) to :attr:`_stored`, growing it by doubling
        (a copy per doubling or wider value, not per batch)."""
        n, need = len(self.names), len(self.names) + len(fresh)
        width = max(self._stored.dtype.itemsize, fresh.dtype.itemsize)
        if need > len(self._stored) or width > self._stored.dtype.itemsize:
            grown = np.zeros(max(need, 2 * len(self._stored)), f"S{width}")
            grown[:n] = self._stored[:n]
            self._stored = grown
        self._stored[n:need] = fresh

    def result(self) -> tuple[np.ndarray, list[str]]:
        """``(int32 code per row, the distinct values)``."""
        return (np.concatenate(self._parts) if self._parts else np.zeros(0, np.int32)), list(self.names)


def compact_paths(location: CacheLocation, names: Iterable[str]) -> list[str]:
    return [location.path(MANIFEST_DIR, n) for n in names]


def fragment_rows(location: CacheLocation, info: Mapping[str, Any], fragments: Sequence[str], schema: "pa.Schema",
                   filter: Any, filter_columns: Sequence[str] | None = None) -> "pa.Table":
    """Rows of the fragments ``fragments`` that the compact files of ``info`` do not hold (see
    :func:`fragment_names`: a fragment of a shard listed as merged may repeat compact rows); ``filter``
    reads ``filter_columns`` (all columns when not given)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    merged = set(info["fragments"])
    table = _read_fragments(location, compact_paths(location, [n for n in fragments if fragment_shard(n) not in merged]), schema, filter,
                            filter_columns)
    again = compact_paths(location, [n for n in fragments if fragment_shard(n) in merged])
    if again:
        extra = _read_fragments(location, again, schema, filter, filter_columns)
        if "window_id" in schema.names and extra.num_rows:
            compact = _read_parquet(location, compact_paths(location, info["files"]), pa.schema([manifest_schema().field("window_id")]),
                                    pc.field("window_id").isin(extra.column("window_id")))
            extra = extra.filter(pc.invert(pc.is_in(extra.column("window_id"), value_set=compact.column("window_id"))))
        table = pa.concat_tables([table, extra])
    return table


def arrow_input(location: CacheLocation, path: str) -> Any:
    """A file Arrow reads ``path`` through: Arrow's own native file for a local cache, the fsspec file
    object otherwise (read synchronously only: :func:`_read_parquet`)."""
    import pyarrow as pa

    return pa.OSFile(path, "r") if location.local else location.fs.open(path, "rb")


def _read_parquet(location: CacheLocation, paths: list[str], schema: "pa.Schema", filter: Any) -> "pa.Table":
    """Columns ``schema`` of the manifest files ``paths`` (empty table when none).

    Arrow never reads a Python object (a file, bytes) on its I/O threads: a local cache is scanned with
    Arrow's own filesystem, an object store's files are read in this thread (:func:`_file_batches`).
    An asynchronous read of a Python object (a dataset scan, ``pq.read_table``) leaves its last
    reference in a task of Arrow's I/O pool; when that task is destroyed while the interpreter exits,
    the thread cannot take the GIL and the process aborts (SIGABRT after a finished job: 10 of 30
    short processes reading one fragment with ``pq.read_table(open(...))``, 1 of 30 from bytes).
    Every read here is synchronous (``ParquetFile``, ``pre_buffer=False``) or of Arrow's own files."""
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    if not paths:
        return schema.empty_table()
    if not location.local:
        return pa.Table.from_batches([b for path in paths for b in _file_batches(location, path, schema, filter)], schema=schema)
    try:
        dataset = pads.dataset(paths, format="parquet", filesystem=pafs.LocalFileSystem(), schema=manifest_schema())
        # many small fragments (a job killed before consolidating): read ahead many files at once
        return dataset.to_table(columns=list(schema.names), filter=filter, fragment_readahead=MANIFEST_READAHEAD)
    except (pa.ArrowInvalid, OSError) as e:
        raise DatasetError(location.url(MANIFEST_DIR), f"cannot read the manifest: {e}") from e


def _read_fragments(location: CacheLocation, paths: list[str], schema: "pa.Schema", filter: Any,
                    filter_columns: Sequence[str] | None = None) -> "pa.Table":
    """Columns ``schema`` of the fragment files ``paths``, filtered by ``filter``.

    A fragment is one small row group, so the fixed cost per file (open, footer, metadata) is all
    there is: each file is fetched whole (one request on an object store) and read from memory by
    ``pyarrow.parquet.ParquetFile``, about 1.5x less CPU per file than a dataset scan. Local files
    are read and every file is parsed in this thread: the parse holds the GIL for most of its ~0.25 ms
    per file, so parsing on a pool of threads gave no less wall time on 2 cores and cost ~50% more CPU
    (switching). From an object store, :data:`MANIFEST_READ_THREADS` threads overlap the requests and
    only fetch. Columns a version 1 fragment lacks read as null.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not paths:
        return schema.empty_table()
    full = manifest_schema()
    if filter is None:
        wanted = list(schema.names)
    else:  # the filter may name other columns
        wanted = full.names if filter_columns is None else [c for c in full.names if c in {*schema.names, *filter_columns}]
    target = pa.schema([full.field(c) for c in wanted])

    def fetch(path: str) -> bytes:
        try:
            if location.local:
                with open(path, "rb") as source:
                    return source.read()
            return location.fs.cat_file(path)  # one GET (a file object makes two requests, and refuses a fragment rewritten in between)
        except OSError as e:
            raise DatasetError(location.url(MANIFEST_DIR), f"cannot read the manifest fragment {path.rsplit('/', 1)[-1]}: {e}") from e

    def parse(path: str, data: bytes) -> "pa.Table":
        try:  # from memory: no pre-buffering; a name the file lacks is skipped (filled with nulls below)
            with pq.ParquetFile(pa.BufferReader(data), pre_buffer=False) as f:
                table = f.read(columns=wanted, use_threads=False)
        except (pa.ArrowInvalid, OSError) as e:
            raise DatasetError(location.url(MANIFEST_DIR), f"cannot read the manifest fragment {path.rsplit('/', 1)[-1]}: {e}") from e
        return conform(table, target)

    if location.local:
        table = pa.concat_tables([parse(p, fetch(p)) for p in paths])
    else:  # each file parsed as its bytes arrive, in order
        with ThreadPoolExecutor(MANIFEST_READ_THREADS) as pool:
            table = pa.concat_tables([parse(p, d) for p, d in zip(paths, pool.map(fetch, paths))])
    if filter is not None:
        table = table.filter(filter)
    return table.select(schema.names)


def conform(table: "pa.Table", schema: "pa.Schema") -> "pa.Table":
    """``table`` with the columns of ``schema`` in its order and types (absent columns: nulls, as a
    version 1 manifest's ``shard_bytes``)."""
    import pyarrow as pa

    if table.schema.equals(schema):
        return table
    cols = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def read_manifest_file(location: CacheLocation, rel: str) -> "pa.Table":
    """One manifest Parquet file (a fragment or a compact file) with the manifest schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    # its bytes (one GET), read in this thread: ``pq.read_table`` of Python-owned bytes or a Python file
    # reads on Arrow's I/O threads, which can abort the process as it exits (see _read_parquet)
    with pq.ParquetFile(pa.BufferReader(location.read_bytes(rel)), pre_buffer=False) as f:
        return conform(f.read(use_threads=False), manifest_schema())


FRAGMENT_PLAIN_COLUMNS = ("window_id", "shard")
"""Columns a manifest fragment stores uncompressed: the two a resumed job reads from every pending
fragment (:class:`~cameo_corr.cache.done.DoneWindows`). A fragment holds one shard's few rows, so
reading a column is mostly fixed cost, and a zstd column chunk adds ~30% to the CPU of that read
(measured on fragments of 64 rows, S=8) for ~9% fewer bytes per fragment."""


def parquet_bytes(table: "pa.Table", row_group_size: int) -> bytes:
    """``table`` (manifest rows: a fragment) as Parquet bytes: zstd, except the
    :data:`FRAGMENT_PLAIN_COLUMNS`, which are stored uncompressed. The footer holds neither the
    serialized Arrow schema nor column statistics: a fragment is read whole and cast to
    :func:`~cameo_corr.schemas.manifest_schema` (never pruned by statistics), and the smaller footer
    takes ~18% less CPU to open (~0.25 ms instead of ~0.30 ms per fragment, measured on fragments of
    64 rows, S=8), which is most of what a resume over pending fragments costs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    compression = {path: "none" if path in FRAGMENT_PLAIN_COLUMNS else "zstd" for path in _leaf_paths(table.schema)}
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=compression, row_group_size=row_group_size, store_schema=False,
                   write_statistics=False)
    return sink.getvalue().to_pybytes()


def _leaf_paths(schema: "pa.Schema") -> list[str]:
    """The Parquet column paths of ``schema``'s fields, as a per-column option names them (a list
    field ``f`` is the column ``f.list.element``)."""
    import pyarrow as pa

    return [f"{f.name}.list.element" if pa.types.is_list(f.type) else f.name for f in schema]


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


def id_keys(ids: np.ndarray) -> np.ndarray:
    """``S16`` ids of 16 lowercase hex digits (every id this package makes) as ``uint64`` keys, which
    sort and compare as the bytes do and binary-search ~10x faster; other ids are returned as they are."""
    if ids.dtype != np.dtype("S16") or not len(ids):
        return ids
    raw = np.ascontiguousarray(ids).tobytes()
    if raw.translate(None, b"0123456789abcdef"):  # an id with another byte (upper case, padding): as they are
        return ids
    return np.frombuffer(binascii.unhexlify(raw), dtype=">u8").astype(np.uint64)


def ids_of_keys(keys: np.ndarray) -> np.ndarray:
    """The ``S16`` hex ids of ``uint64`` keys (the inverse of :func:`id_keys`)."""
    nibbles = (keys[:, None] >> (np.uint64(4) * np.arange(15, -1, -1, dtype=np.uint64))) & np.uint64(15)
    return np.frombuffer(b"0123456789abcdef", dtype=np.uint8)[nibbles].view("S16").ravel()


def find_sorted_id(sorted_ids: np.ndarray, window_id: str) -> int:
    """Position of ``window_id`` in the sorted fixed-width (``S<n>``) array ``sorted_ids``, or -1 (binary search)."""
    key = window_id.encode()
    if not len(sorted_ids) or len(key) > sorted_ids.dtype.itemsize:
        return -1
    k = np.array(key, dtype=sorted_ids.dtype)
    i = int(np.searchsorted(sorted_ids, k))
    return i if i < len(sorted_ids) and sorted_ids[i] == k else -1


def distinct_sorted(keys: np.ndarray) -> np.ndarray:
    """The distinct values of ``keys``, sorted; ``keys`` itself is sorted in place (``np.unique`` on
    ``uint64`` keys costs ~10x more: it sorts a copy stably)."""
    keys.sort()
    return keys[np.concatenate([[True], keys[1:] != keys[:-1]])] if len(keys) else keys


def sorted_member(ids: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    """Whether each of ``ids`` is in the sorted array ``sorted_ids`` (binary search over fixed-width
    ids, as ``uint64`` keys when both are hex ids: no hash set, no Python object per id)."""
    if not len(sorted_ids) or not len(ids):
        return np.zeros(len(ids), dtype=bool)
    keys, table = id_keys(ids), id_keys(sorted_ids)
    if keys.dtype != table.dtype:
        keys, table = ids, sorted_ids
    order = np.argsort(keys, kind="stable")  # searching in key order: ~3x fewer cache misses than at random
    keys = keys[order]
    found = np.empty(len(keys), dtype=bool)
    found[order] = table[np.minimum(np.searchsorted(table, keys), len(table) - 1)] == keys
    return found


class ManifestIndex:
    """What a reader needs per ok window, as numpy columns (no Python object per window).

    ``ids`` (``S<n>``) sorted, with ``shard`` (index into ``shards``) and ``row`` aligned to them.
    Built from the ``window_id``, ``shard``, ``row`` columns of the ok rows only.
    """

    def __init__(self, table: "pa.Table") -> None:
        import pyarrow.compute as pc

        encoded = pc.dictionary_encode(table.column("shard").combine_chunks())
        self._build(id_array(table.column("window_id")), encoded.indices.to_numpy(zero_copy_only=False).astype(np.int32),
                    encoded.dictionary.to_pylist(), table.column("row").to_numpy().astype(np.int32))

    @classmethod
    def from_batches(cls, batches: Iterable["pa.RecordBatch"]) -> "ManifestIndex":
        """The index of ok rows streamed as batches (:func:`scan_manifest`): each batch becomes numpy at
        once, so the Arrow table of all rows never exists."""
        ids, rows, shards = [], [], StringCodes()
        for batch in batches:
            ids.append(id_array(batch.column("window_id")))
            shards.add(batch.column("shard"))
            rows.append(batch.column("row").to_numpy(zero_copy_only=False).astype(np.int32))
        index = cls.__new__(cls)
        codes, names = shards.result()
        index._build(np.concatenate(ids) if ids else np.zeros(0, "S1"), codes, names,
                     np.concatenate(rows) if rows else np.zeros(0, np.int32))
        return index

    def _build(self, ids: np.ndarray, shard: np.ndarray, shards: list[str], row: np.ndarray) -> None:
        self.shards: list[str] = shards
        if len(ids) < 2 or bool(np.all(ids[1:] >= ids[:-1])):  # one consolidated part: already sorted
            self.ids, self.shard, self.row = ids, shard, row
        else:
            order = np.argsort(ids, kind="stable")
            self.ids = ids[order]
            del ids
            self.shard = shard[order]
            self.row = row[order]
        if len(self.ids) > 1 and np.any(self.ids[1:] == self.ids[:-1]):
            dup = self.ids[1:][self.ids[1:] == self.ids[:-1]][0].decode()
            raise SchemaError("window_id", f"window {dup} has more than one ok manifest row")

    def __len__(self) -> int:
        return len(self.ids)

    def find(self, window_id: str) -> int:
        """Position of ``window_id`` in :attr:`ids`, or -1."""
        return find_sorted_id(self.ids, window_id)


__all__ = [
    "MANIFEST_ROW_GROUP",
    "MANIFEST_FILE_ROWS",
    "read_consolidation",
    "fragment_names",
    "finished_shard_ids",
    "find_orphans",
    "stored_shard_ids",
    "read_manifest",
    "compact_paths",
    "fragment_rows",
    "read_manifest_file",
    "conform",
    "arrow_input",
    "FRAGMENT_PLAIN_COLUMNS",
    "parquet_bytes",
    "id_array",
    "id_keys",
    "ids_of_keys",
    "find_sorted_id",
    "distinct_sorted",
    "sorted_member",
    "ManifestIndex",
    "scan_manifest",
    "StringCodes",
]
