"""The manifest, write side: consolidation of fragments into sorted parts, and row removal.

:func:`consolidate_manifest` (while a job runs, every few hundred shards (:class:`PeriodicConsolidation`),
at job end, and ``cameo-corr cache compact``) moves the pending fragments into a new *part* of Parquet
files sorted by ``window_id`` with sized row groups, merging the newest parts when they have grown as
large as the one before, records them in ``consolidated.json`` (written atomically, so readers see
either the old or the new set) and only then deletes the merged fragments.

:func:`remove_rows` supersedes manifest rows (a repair forgetting shards, :func:`drop_shards`; a retry of
failed windows): fragments holding such rows are atomically rewritten without them and the compact
files are rewritten without theirs *before* the windows are redone, so a window never has two rows,
even if the run dies in between (it is then simply not done). Only the cache's lease holder writes.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence


from cameo_corr.cache.layout import CONSOLIDATED_FILE, MANIFEST_DIR, SHARD_SUFFIXES, fragment_shard, shard_dir
from cameo_corr.cache.kway import SortedMerge, SpilledRuns, file_batches, mapped, part_runs, sliced, sort_table, write_sorted
from cameo_corr.cache.manifest import (
    MANIFEST_FILE_ROWS,
    MANIFEST_ROW_GROUP,
    compact_paths,
    fragment_names,
    parquet_bytes,
    read_consolidation,
    read_manifest_file,
)
from cameo_corr.schemas import SCHEMA_VERSION, CameoCorrError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pyarrow as pa

    from cameo_corr.cache.location import CacheLocation

logger = logging.getLogger(__name__)


def _write_part(location: CacheLocation, table: "pa.Table", gen: int, *, row_group_size: int, file_rows: int) -> dict[str, Any]:
    """Write ``table`` sorted by ``window_id`` as the compact files of generation ``gen``; returns the
    part entry of ``consolidated.json``."""
    return write_sorted(location, sliced(sort_table(table)), gen, row_group_size=row_group_size, file_rows=file_rows)


def _next_generation(info: Mapping[str, Any]) -> int:
    return max([int(n.split("-")[1]) for n in info["files"]] + [0]) + 1


def write_consolidation(location: CacheLocation, info: Mapping[str, Any], parts: Sequence[Mapping[str, Any]],
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


def write_compact(location: CacheLocation, table: "pa.Table", info: Mapping[str, Any], merged: Sequence[str],
                   *, row_group_size: int = MANIFEST_ROW_GROUP, file_rows: int = MANIFEST_FILE_ROWS) -> dict[str, Any]:
    """Write ``table`` as the one part of the next generation listing ``merged`` shard fragments,
    swap ``consolidated.json`` atomically, then delete the previous generations' files."""
    part = _write_part(location, table, _next_generation(info), row_group_size=row_group_size, file_rows=file_rows)
    return write_consolidation(location, info, [part], merged)


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
    """:func:`consolidate_manifest`, also returning the names of the fragments it merged.

    The pending fragments become sorted runs (:class:`~cameo_corr.cache.kway.SpilledRuns`: one chunk in
    memory, more spilled); the parts to merge are read a batch at a time; :class:`SortedMerge` streams
    them all into the new part. Memory: a batch per run and one row group, whatever the row count."""
    info = read_consolidation(location)
    pending = fragment_names(location)
    parts = [dict(q) for q in info["parts"]]
    if not pending and not (full and len(parts) > 1):
        return info, []
    with SpilledRuns(location, info, pending, spill=location) as new:
        sizes = [q["rows"] for q in parts] + ([new.rows] if new.rows else [])
        first = 0 if full else _parts_to_merge(sizes)
        if first < len(sizes) and (len(sizes) - first > 1 or len(sizes) > len(parts)):  # one new part: the new rows + merged parts
            merge = SortedMerge(part_runs(location, parts[first:]) + new.runs())
            parts[first:] = [write_sorted(location, merge, _next_generation(info), row_group_size=row_group_size, file_rows=file_rows)]
    new_info = write_consolidation(location, info, parts, set(info["fragments"]) | {fragment_shard(n) for n in pending})
    for name in pending:
        location.remove(MANIFEST_DIR, name)
    return new_info, pending


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


def remove_rows(location: "CacheLocation", predicate: Callable[["pa.Table"], Any], *, shards: Iterable[str] | None = None,
                columns: Sequence[str] | None = None) -> list[str]:
    """Remove the manifest rows for which ``predicate(table)`` (a boolean Arrow array) is true; return
    their window ids.

    Every pending fragment holding such rows is rewritten atomically without them (deleted when nothing
    is left), then the compact files are rewritten without theirs as one new part, streamed (a batch
    per part in memory). ``columns`` names the columns ``predicate`` reads (all by default): the compact
    files are first scanned with those only, and rewritten only when a row goes. With ``shards``, only
    the fragments of those shards are read, and those shard ids stop being listed as merged in
    ``consolidated.json`` (so a later commit of the same shard id is not taken for finished).
    """
    forget = set(shards) if shards is not None else set()
    info = read_consolidation(location)
    removed: list[str] = []
    for name in fragment_names(location):
        if shards is None or fragment_shard(name) in forget:
            removed += _remove_from_fragment(location, f"{MANIFEST_DIR}/{name}", predicate)
    merged = set(info["fragments"])
    if info["files"] and (shards is None or forget & merged):
        gone = _compact_matches(location, info, predicate, columns)
        if gone:
            removed += gone
            def keep(table: "pa.Table") -> "pa.Table":
                return table.filter(_negated(predicate(table)))

            merge = SortedMerge([mapped(run, keep) for run in part_runs(location, info["parts"])])
            part = write_sorted(location, merge, _next_generation(info), row_group_size=MANIFEST_ROW_GROUP, file_rows=MANIFEST_FILE_ROWS)
            write_consolidation(location, info, [part], sorted(merged - forget))
        elif forget & merged:
            write_consolidation(location, info, info["parts"], sorted(merged - forget))
    return removed


def _negated(mask: Any) -> Any:
    """Rows to keep: not ``mask`` (nulls count as false, i.e. kept)."""
    import pyarrow.compute as pc

    return pc.invert(pc.fill_null(mask, False))


def _remove_from_fragment(location: "CacheLocation", rel: str, predicate: Callable[["pa.Table"], Any]) -> list[str]:
    """Rewrite one fragment without the rows ``predicate`` selects (delete it when none is left);
    returns their window ids."""
    import pyarrow.compute as pc

    table = read_manifest_file(location, rel)
    gone = pc.fill_null(predicate(table), False)
    if not pc.any(gone).as_py():
        return []
    kept = table.filter(pc.invert(gone))
    if kept.num_rows:
        location.write_bytes_atomic(rel, parquet_bytes(kept, MANIFEST_ROW_GROUP))
    else:
        location.remove(rel)
    return table.filter(gone).column("window_id").to_pylist()


def _compact_matches(location: "CacheLocation", info: Mapping[str, Any], predicate: Callable[["pa.Table"], Any],
                     columns: Sequence[str] | None) -> list[str]:
    """Window ids of the compact rows ``predicate`` selects (reading ``columns`` and ``window_id`` only)."""
    import pyarrow.compute as pc

    wanted = None if columns is None else list(dict.fromkeys(["window_id", *columns]))
    gone: list[str] = []
    for table in file_batches(location, compact_paths(location, info["files"]), columns=wanted):
        mask = pc.fill_null(predicate(table), False)
        if pc.any(mask).as_py():
            gone += table.filter(mask).column("window_id").to_pylist()
    return gone


def drop_shards(location: "CacheLocation", shard_ids: Iterable[str]) -> list[str]:
    """Forget shards: remove their ok manifest rows (:func:`remove_rows`) and then their shard files, so
    the next run recomputes those windows. Failed rows stay (they never pointed at a shard file).
    Returns the window ids whose rows were removed. Crash-safe in that order: a shard file without rows
    is an orphan the next run deletes."""
    import pyarrow as pa
    import pyarrow.compute as pc

    drop = set(shard_ids)
    if not drop:
        return []
    values = pa.array(sorted(drop), pa.string())
    removed = remove_rows(location, lambda t: pc.is_in(t.column("shard"), values), shards=drop, columns=["shard"])
    for shard_id in sorted(drop):
        for version in SHARD_SUFFIXES:
            if location.exists(shard_dir(shard_id, version)):
                location.remove(shard_dir(shard_id, version))
    return removed


def drop_failed_rows(location: "CacheLocation") -> list[str]:
    """Supersede the failed rows (:func:`remove_rows`), before their windows are retried; returns the
    dropped window ids."""
    import pyarrow.compute as pc

    return remove_rows(location, lambda t: pc.equal(t.column("status"), "failed"), columns=["status"])


__all__ = [
    "write_compact",
    "write_consolidation",
    "consolidate_manifest",
    "DEFAULT_CONSOLIDATE_EVERY",
    "DEFAULT_CONSOLIDATE_SECONDS",
    "CONSOLIDATE_POLL_SECONDS",
    "PeriodicConsolidation",
    "remove_rows",
    "drop_shards",
    "drop_failed_rows",
]
