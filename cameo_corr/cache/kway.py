"""Streaming k-way merge of manifest rows sorted by ``window_id``, in bounded memory.

Consolidation, ``cache compact``, ``cache merge`` and row removal used to concatenate whole manifests
in memory (~1.6 KB per row at S=8 once sorted and taken). Here every input is a *sorted run*: an
iterator of Arrow tables sorted by ``window_id`` (a consolidated part read a few thousand rows at a
time with :meth:`pyarrow.parquet.ParquetFile.iter_batches`, or pending fragments read in groups,
sorted in memory :data:`SORT_CHUNK_ROWS` rows at a time and spilled as temporary sorted files).
:class:`SortedMerge` holds one batch per run and emits, at each step, every buffered row below the
smallest last key of the runs that may still have more: those rows can no longer be preceded by an
unread one. The output equals a stable sort of the runs' concatenation (ties in run order), and
:func:`write_sorted` streams it into compact files with the usual row groups, one row group buffered.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from cameo_corr.cache.layout import MANIFEST_DIR, TMP_PREFIX
from cameo_corr.cache.manifest import arrow_input, compact_paths, conform, fragment_rows, id_array
from cameo_corr.schemas import DatasetError, manifest_schema

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pyarrow as pa

    from cameo_corr.cache.location import CacheLocation

MERGE_BATCH_ROWS = 8_192
"""Rows read at a time from each sorted run (memory: about this many rows per run, ~0.5 KB each at S=8)."""
SORT_CHUNK_ROWS = 131_072
"""Rows of unsorted fragments sorted in memory at once; more pending rows are spilled as sorted runs."""
NARROW_BATCH_ROWS = 65_536
"""Rows per batch of :func:`manifest_batches` (a few narrow columns: a row group at a time)."""
FRAGMENT_GROUP = 256
"""Fragment files read together (on the reader's thread pool)."""
SPILL_COMPRESSION = "lz4"
"""Compression of the spilled sorted runs, Arrow IPC files: written and read once, so a fast codec (lz4
IPC: ~4.5x less CPU to write and read back than zstd Parquet, at ~3x the bytes)."""


class SortedMerge:
    """Iterate the rows of ``runs`` (iterators of tables sorted by ``key``) in ``key`` order, stable.

    At most one table per run is buffered (plus, when a run's buffered rows all equal the current
    frontier, its next table joined to them). :attr:`peak_rows` is the most rows buffered at once,
    :attr:`rows` the rows emitted. ``transform`` (optional) maps each emitted table (e.g. a filter).
    """

    def __init__(self, runs: Sequence[Iterable["pa.Table"]], key: str = "window_id") -> None:
        self.runs = [iter(r) for r in runs]
        self.key = key
        self.peak_rows = 0
        self.rows = 0

    def _pull(self, i: int) -> tuple["pa.Table", np.ndarray] | None:
        """The next non-empty table of run ``i`` with its keys, or ``None`` when the run is done."""
        import pyarrow as pa

        for table in self.runs[i]:
            if isinstance(table, pa.RecordBatch):
                table = pa.Table.from_batches([table])
            if table.num_rows:
                return table, id_array(table.column(self.key))
        return None

    def __iter__(self) -> Iterator["pa.Table"]:
        import pyarrow as pa

        k = len(self.runs)
        bufs: list[tuple[pa.Table, np.ndarray] | None] = [self._pull(i) for i in range(k)]
        more = [b is not None for b in bufs]  # the run may hold unread tables
        while True:
            for i in range(k):
                if more[i] and bufs[i] is None:
                    bufs[i] = self._pull(i)
                    more[i] = bufs[i] is not None
            live = [i for i in range(k) if bufs[i] is not None]
            if not live:
                return
            self.peak_rows = max(self.peak_rows, sum(bufs[i][0].num_rows for i in live))  # type: ignore[index]
            open_ = [bufs[i][1][-1] for i in live if more[i]]  # type: ignore[index]
            frontier = min(open_) if open_ else None
            takes = {i: len(bufs[i][1]) if frontier is None else int(np.searchsorted(bufs[i][1], frontier, "left"))  # type: ignore[index]
                     for i in live}
            if not any(takes.values()):  # every buffered row is >= frontier: the runs ending on it read on
                for i in live:
                    table, ids = bufs[i]  # type: ignore[misc]
                    if more[i] and ids[-1] == frontier:
                        nxt = self._pull(i)
                        more[i] = nxt is not None
                        if nxt is not None:
                            bufs[i] = (pa.concat_tables([table, nxt[0]]), np.concatenate([ids, nxt[1]]))
                continue
            yield self._emit(bufs, takes)

    def _emit(self, bufs: list, takes: dict[int, int]) -> "pa.Table":
        """Take the first ``takes[i]`` rows of each buffer (in run order) and sort them stably."""
        import pyarrow as pa

        tables, keys = [], []
        for i, n in takes.items():
            if not n:
                continue
            table, ids = bufs[i]
            tables.append(table.slice(0, n))
            keys.append(ids[:n])
            bufs[i] = (table.slice(n), ids[n:]) if n < len(ids) else None
        out = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        if len(keys) > 1:
            out = out.take(pa.array(np.argsort(np.concatenate(keys), kind="stable")))
        self.rows += out.num_rows
        return out


def file_batches(location: "CacheLocation", paths: Sequence[str], *, columns: Sequence[str] | None = None,
                 batch_rows: int | None = None) -> Iterator["pa.Table"]:
    """The rows of the manifest files ``paths`` (in order), ``batch_rows`` at a time, with the manifest
    schema (or its ``columns``); one row group read at a time (iterating a whole file lets Arrow's
    reader buffer far ahead: ~350 MB for a 4M-row file against ~140 MB)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    full = manifest_schema()
    schema = full if columns is None else pa.schema([full.field(c) for c in columns], metadata=full.metadata)
    batch_rows = batch_rows or MERGE_BATCH_ROWS
    for path in paths:
        try:
            with arrow_input(location, path) as source, pq.ParquetFile(source, pre_buffer=False) as f:
                present = [c for c in schema.names if c in f.schema_arrow.names]
                for group in range(f.num_row_groups):  # one row group at a time: a whole-file reader reads ahead
                    for batch in f.iter_batches(batch_size=batch_rows, row_groups=[group], columns=present, use_threads=False):
                        yield conform(pa.Table.from_batches([batch]), schema)
        except (pa.ArrowInvalid, OSError) as e:
            raise DatasetError(location.url(MANIFEST_DIR), f"cannot read the manifest file {path.rsplit('/', 1)[-1]}: {e}") from e


def sort_table(table: "pa.Table") -> "pa.Table":
    """``table`` stably sorted by ``window_id`` (numpy sort of fixed-width ids)."""
    import pyarrow as pa

    order = np.argsort(id_array(table.column("window_id")), kind="stable")
    return table.take(pa.array(order))


def sliced(table: "pa.Table", rows: int | None = None) -> Iterator["pa.Table"]:
    """``table`` in slices of ``rows`` rows (default :data:`MERGE_BATCH_ROWS`; zero-copy)."""
    rows = rows or MERGE_BATCH_ROWS
    for start in range(0, table.num_rows, rows):
        yield table.slice(start, rows)


class SpilledRuns:
    """Pending fragments as sorted runs: read :data:`FRAGMENT_GROUP` files at a time (rows the compact
    files already hold are skipped, :func:`~cameo_corr.cache.manifest.fragment_rows`), filtered by
    ``filter``, sorted :data:`SORT_CHUNK_ROWS` rows at a time. One chunk stays in memory; more are
    spilled under ``spill`` as temporary files (``manifest/.tmp-run-*``, orphans if the process dies),
    deleted by :meth:`close`. Use as a context manager; :attr:`rows` counts the rows."""

    def __init__(self, location: "CacheLocation", info: Any, fragments: Sequence[str], *, spill: "CacheLocation",
                 filter: Any = None, chunk_rows: int | None = None) -> None:
        self.spill, self.spilled, self.rows = spill, [], 0
        chunk_rows = chunk_rows or SORT_CHUNK_ROWS
        self.memory: "pa.Table | None" = None
        pending: list["pa.Table"] = []
        held = 0
        for start in range(0, len(fragments), FRAGMENT_GROUP):
            table = fragment_rows(location, info, fragments[start : start + FRAGMENT_GROUP], manifest_schema(), filter)
            pending.append(table)
            held += table.num_rows
            if held >= chunk_rows:
                self._spill(pending)
                pending, held = [], 0
        if pending and (held or not self.spilled):
            import pyarrow as pa

            if self.spilled:
                self._spill(pending)
            else:
                self.memory = sort_table(pa.concat_tables(pending))
                self.rows += self.memory.num_rows

    def _spill(self, tables: list["pa.Table"]) -> None:
        import pyarrow as pa

        table = sort_table(pa.concat_tables(tables))
        self.rows += table.num_rows
        rel = f"{MANIFEST_DIR}/{TMP_PREFIX}run-{uuid.uuid4().hex[:12]}.arrow"
        self.spill.makedirs(MANIFEST_DIR)
        with self.spill.fs.open(self.spill.path(rel), "wb") as f, \
                pa.ipc.new_file(f, table.schema, options=pa.ipc.IpcWriteOptions(compression=SPILL_COMPRESSION)) as w:
            w.write_table(table, max_chunksize=MERGE_BATCH_ROWS)
        self.spilled.append(rel)

    def runs(self, batch_rows: int | None = None) -> list[Iterable["pa.Table"]]:
        """The sorted runs (spilled files in order, or the one in-memory chunk)."""
        if self.memory is not None:
            return [sliced(self.memory, batch_rows)]
        return [self._read_spilled(rel, batch_rows) for rel in self.spilled]

    def _read_spilled(self, rel: str, batch_rows: int | None) -> Iterator["pa.Table"]:
        """The rows of the spilled run ``rel``, ``batch_rows`` at a time, one record batch read at a time."""
        import pyarrow as pa

        with self.spill.fs.open(self.spill.path(rel), "rb") as f:
            reader = pa.ipc.open_file(f)
            for i in range(reader.num_record_batches):
                yield from sliced(pa.Table.from_batches([reader.get_batch(i)]), batch_rows)

    def close(self) -> None:
        """Delete the spilled files."""
        for rel in self.spilled:
            self.spill.remove(rel)
        self.spilled, self.memory = [], None

    def __enter__(self) -> "SpilledRuns":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def part_runs(location: "CacheLocation", parts: Sequence[Any], batch_rows: int | None = None) -> list[Iterable["pa.Table"]]:
    """One sorted run per consolidated part (its files in order)."""
    return [file_batches(location, compact_paths(location, q["files"]), batch_rows=batch_rows) for q in parts]


def manifest_batches(location: "CacheLocation", columns: Sequence[str], filter: Any = None,
                     filter_columns: Sequence[str] | None = None) -> Iterator["pa.Table"]:
    """The manifest rows (``columns`` only, ``filter`` applied; it reads ``filter_columns``, all columns
    when not given) a batch at a time: the compact files
    :data:`NARROW_BATCH_ROWS` rows at a time, then the pending fragments :data:`FRAGMENT_GROUP` files at
    a time (rows the compact files hold skipped). Unsorted; memory: one batch."""
    import pyarrow as pa

    from cameo_corr.cache.manifest import fragment_names, read_consolidation

    info = read_consolidation(location)
    full = manifest_schema()
    schema = pa.schema([full.field(c) for c in columns], metadata=full.metadata)
    names = list(columns) if filter is None else full.names if filter_columns is None else list(dict.fromkeys([*columns, *filter_columns]))
    for table in file_batches(location, compact_paths(location, info["files"]), columns=names, batch_rows=NARROW_BATCH_ROWS):
        yield (table if filter is None else table.filter(filter)).select(schema.names)
    fragments = fragment_names(location)
    for start in range(0, len(fragments), FRAGMENT_GROUP):
        yield fragment_rows(location, info, fragments[start : start + FRAGMENT_GROUP], schema, filter, filter_columns)


def mapped(tables: Iterable["pa.Table"], fn: Callable[["pa.Table"], "pa.Table"]) -> Iterator["pa.Table"]:
    """``fn`` applied to each table of ``tables``."""
    for table in tables:
        yield fn(table)


def write_sorted(location: "CacheLocation", tables: Iterable["pa.Table"], gen: int, *, row_group_size: int,
                 file_rows: int) -> dict[str, Any]:
    """Stream ``tables`` (already sorted) into the compact files ``compact-<gen>-<k>.parquet`` (at most
    ``file_rows`` rows each, row groups of ``row_group_size``; each written under a temporary name and
    renamed); returns the part entry ``{"files": [...], "rows": n}`` of ``consolidated.json``. One row
    group is buffered. No rows still writes one empty file (as a whole-table write did)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = manifest_schema()
    files: list[str] = []
    state: dict[str, Any] = {"writer": None, "sink": None, "tmp": None, "in_file": 0}
    total = 0

    def open_file() -> None:
        name = f"compact-{gen:06d}-{len(files):05d}.parquet"
        tmp = f"{MANIFEST_DIR}/{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
        location.makedirs(MANIFEST_DIR)
        sink = location.fs.open(location.path(tmp), "wb")
        state.update(writer=pq.ParquetWriter(sink, schema, compression="zstd"), sink=sink, tmp=tmp, in_file=0)
        files.append(name)

    def close_file() -> None:
        state["writer"].close()
        state["sink"].close()
        location.move(state["tmp"], f"{MANIFEST_DIR}/{files[-1]}")
        state["writer"] = None

    def emit(table: "pa.Table") -> None:
        while table.num_rows:
            if state["writer"] is None:
                open_file()
            n = min(table.num_rows, file_rows - state["in_file"])
            state["writer"].write_table(table.slice(0, n), row_group_size=row_group_size)
            state["in_file"] += n
            table = table.slice(n)
            if state["in_file"] >= file_rows:
                close_file()

    pending: list[pa.Table] = []
    held = 0
    for table in tables:
        table = conform(table, schema)
        pending.append(table)
        held += table.num_rows
        total += table.num_rows
        while held >= row_group_size:  # one row group at a time (file boundaries split it as before)
            whole = pa.concat_tables(pending)
            room = file_rows - state["in_file"] if state["writer"] is not None else file_rows
            n = min(row_group_size, room)
            emit(whole.slice(0, n))
            rest = whole.slice(n)
            pending, held = [rest], rest.num_rows
    if held:
        emit(pa.concat_tables(pending))
    if state["writer"] is not None:
        close_file()
    if not files:
        open_file()
        close_file()
    return {"files": files, "rows": total}


__all__ = [
    "MERGE_BATCH_ROWS",
    "SORT_CHUNK_ROWS",
    "FRAGMENT_GROUP",
    "SortedMerge",
    "file_batches",
    "sort_table",
    "sliced",
    "SpilledRuns",
    "part_runs",
    "manifest_batches",
    "mapped",
    "write_sorted",
]
