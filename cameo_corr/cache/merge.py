"""The union of caches: ``cameo-corr cache merge A B [C ...] --out OUT``.

:func:`merge_caches` writes the union of caches whose ``cache.json`` identities agree
(:data:`~cameo_corr.cache.config.COMPARED_FIELDS`, compared like
:func:`~cameo_corr.cache.config.check_compatible`). Shard files are hard-linked into ``OUT`` on a
local filesystem (copied when linking is impossible, e.g. across devices; the report says which and
why) and copied on object stores (a server-side copy when both caches are on the same filesystem).
A window present in several inputs is taken once (the first input's ok row; a failed row only when no
input has it ok). A shard is taken whole: a shard id present in several inputs must be the same shard
(same windows and decoded arrays, checked, since shard files of separate runs differ in their zip
timestamps), and a shard of which only some windows are taken (the rest already came from another
input, or lie outside the selection) is rewritten with those windows under a new content-hash id.
``OUT`` gets a consolidated manifest and, last, a ``cache.json`` whose ``created_by`` records the
sources, so an interrupted merge leaves no directory that looks like a cache.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import errno
import filecmp
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np

from cameo_corr.cache.config import check_same_identity
from cameo_corr.cache.consolidation import write_consolidation
from cameo_corr.cache.kway import SortedMerge, SpilledRuns, manifest_batches, mapped, part_runs, write_sorted
from cameo_corr.cache.layout import CONFIG_FILE, TMP_PREFIX, shard_dir
from cameo_corr.cache.location import CacheLocation, options_for
from cameo_corr.cache.manifest import (
    MANIFEST_FILE_ROWS,
    MANIFEST_ROW_GROUP,
    fragment_names,
    id_array,
    read_consolidation,
    sorted_member,
)
from cameo_corr.cache.reader import CorrCache
from cameo_corr.cache.select import WindowSelection
from cameo_corr.cache.shard import shard_zip_bytes
from cameo_corr.schemas import CACHE_ARRAYS, GRID_ARRAYS, IMAGE_ARRAYS, SCHEMA_VERSION, DatasetError, SchemaError, shard_id_of

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pyarrow as pa

    from cameo_corr.cache.location import CacheLocation
    from cameo_corr.cache.reader import CorrCache


@dataclass
class MergeReport:
    """What :func:`merge_caches` did: rows written, and how each shard reached ``OUT``."""

    out: str
    windows_ok: int = 0
    windows_failed: int = 0
    linked: int = 0
    """Shard files hard-linked (local filesystems)."""
    copied: int = 0
    """Shard files copied (object stores, or where a hard link was impossible: see ``copy_reasons``)."""
    rewritten: int = 0
    """Shards written anew with part of their windows (duplicates or the selection took the rest)."""
    duplicate_shards: int = 0
    """Shards present in several inputs (checked to be the same shard, taken once)."""
    duplicate_windows: int = 0
    """Window ids present in several inputs (taken once)."""
    copy_reasons: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One paragraph for the command line."""
        text = (f"merged into {self.out}: {self.windows_ok} ok and {self.windows_failed} failed windows; shards: "
                f"{self.linked} hard-linked, {self.copied} copied, {self.rewritten} rewritten with part of their windows; "
                f"{self.duplicate_windows} window ids and {self.duplicate_shards} shards were in several inputs (taken once)")
        if self.copy_reasons:
            reasons = sorted(set(self.copy_reasons))
            text += "\ncopied instead of linked: " + "; ".join(reasons)
        return text


def _same_shard(a: "CorrCache", b: "CorrCache", shard_id: str) -> None:
    """Check that shard ``shard_id`` of ``a`` and of ``b`` hold the same windows and arrays."""

    rel = shard_dir(shard_id, a.version)
    if a.location.local and b.location.local:
        pa_, pb = a.location.path(rel), b.location.path(rel)
        if os.path.samefile(pa_, pb) or filecmp.cmp(pa_, pb, shallow=False):
            return
    where = f"shard {shard_id} of {a.location.display} and of {b.location.display}"
    if a.shard_windows(shard_id) != b.shard_windows(shard_id):
        raise DatasetError(where, "the two inputs hold different windows under one shard id")
    da, db = _stored_arrays(a, shard_id), _stored_arrays(b, shard_id)
    for name in da:
        if da[name].shape != db[name].shape or not np.array_equal(da[name], db[name], equal_nan=da[name].dtype.kind == "f"):
            raise DatasetError(where, f"array '{name}' differs between the two inputs (computed twice, not the same values); "
                               "merge only one of them or select disjoint windows")


def _stored_arrays(cache: "CorrCache", shard_id: str) -> dict[str, np.ndarray]:
    """Every array of a shard, keyed by its path in the shard group (all arrays of the primary grid,
    the grid arrays of each extra grid), each decoded once."""

    out: dict[str, np.ndarray] = {}
    for g in cache.config.grids:
        names = tuple(CACHE_ARRAYS) if tuple(g) == tuple(cache.config.grid) else tuple(GRID_ARRAYS)
        keys = cache.config.array_keys(tuple(g), names)
        out.update({keys[n]: v for n, v in cache.read_shard(shard_id, names, grid=tuple(g)).items()})
    if cache.config.images is not None:  # the stored views of a self-contained cache
        out.update(cache.read_shard(shard_id, tuple(IMAGE_ARRAYS)))
    return out


def _transfer(src: "CacheLocation", dst: "CacheLocation", rel: str, report: MergeReport) -> None:
    """Bring one shard file from ``src`` to ``dst``: a hard link locally (a copy when the filesystem
    refuses one, reason recorded), a server-side copy on one object store, else a streamed copy."""
    from fsspec.implementations.local import LocalFileSystem


    src_local = src.local or isinstance(src.fs, LocalFileSystem)
    dst_local = dst.local or isinstance(dst.fs, LocalFileSystem)
    if src_local and dst_local:
        target = dst.path(rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            os.link(src.path(rel), target)
            report.linked += 1
            return
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES):
                raise
            report.copy_reasons.append(f"{os.strerror(e.errno).lower()} ({src.display} -> {dst.display})")
        tmp = f"{os.path.dirname(target)}/{TMP_PREFIX}{os.path.basename(target)}"
        shutil.copyfile(src.path(rel), tmp)
        os.rename(tmp, target)
        report.copied += 1
        return
    if type(src.fs) is type(dst.fs) and src.storage_options == dst.storage_options:
        src.fs.copy(src.path(rel), dst.path(rel))  # server-side on object stores
        report.copy_reasons.append(f"object store: server-side copy ({src.display} -> {dst.display})")
    else:
        dst.write_bytes_atomic(rel, src.read_bytes(rel))
        report.copy_reasons.append(f"different filesystems: copied through this machine ({src.display} -> {dst.display})")
    report.copied += 1


@dataclass
class _Taken:
    """What :func:`merge_caches` takes from one input, aligned to its selected manifest rows sorted by
    ``window_id`` (the order in which :func:`_sorted_rows` streams them)."""

    rows: int
    keep: np.ndarray
    failed_pos: np.ndarray
    failed_ids: np.ndarray
    rep_pos: list[np.ndarray] = field(default_factory=list)
    """Positions of the rows of rewritten shards, with their new shard id, row and shard size."""
    rep_shard: list[str] = field(default_factory=list)
    rep_row: list[np.ndarray] = field(default_factory=list)
    rep_bytes: list[int] = field(default_factory=list)


def merge_caches(
    sources: Sequence[str | Path],
    out: str | Path,
    *,
    selection: WindowSelection = WindowSelection(),
    storage_options: Mapping[str, Any] | None = None,
    command: str | None = None,
    dataset_root: str | None = None,
) -> MergeReport:
    """Write the union of the caches ``sources`` (same identity) into the new cache ``out``.

    See the module docstring for the rules. ``selection`` keeps only the windows satisfying it (an
    empty result is an error naming the predicate). ``out`` must not exist or be an empty directory.
    ``storage_options`` apply to every URL. Inputs built from different dataset roots are refused
    (``cache.json`` records one root: the other inputs' scenes would be unknown to ``viz`` and
    ``train``) unless ``dataset_root`` names the root that holds every input's scenes, which ``OUT``
    then records. Memory: a few dozen bytes per window of one input (ids, shard codes, rows) and a
    batch per sorted run, never the whole manifest. Returns a :class:`MergeReport`.
    """
    if len(sources) < 2:
        raise SchemaError("sources", f"merge needs at least two caches, got {len(sources)}")
    options = dict(storage_options or {}) or None
    caches = [CorrCache(s, options_for(s, options)) for s in sources]
    dst = CacheLocation(out, options_for(out, options))
    _check_inputs(caches, dst, sources, dataset_root)

    report = MergeReport(out=dst.display)
    expr = selection.expression()
    taken = np.zeros(0, dtype="S1")  # sorted ok window ids taken from earlier inputs
    whole_from: dict[str, int] = {}  # shard id -> the input whose shard file was taken whole
    shards: list[str] = []  # every shard of OUT
    plans: list[_Taken] = []
    seen_ok = 0
    for k, cache in enumerate(caches):  # one input's narrow columns in memory at a time
        ids, codes, names, rows, ok = _narrow_index(cache, selection)
        plan = _Taken(len(ids), np.zeros(len(ids), dtype=bool), np.flatnonzero(~ok), ids[~ok])
        seen_ok += int(ok.sum())
        fresh = ok & ~sorted_member(ids, taken)
        totals = _shard_totals(cache, codes[ok], names, bool(selection))
        for shard_id, pos in _shard_groups(codes, names, rows, ok):
            if shard_id in whole_from:
                _same_shard(caches[whole_from[shard_id]], cache, shard_id)
                report.duplicate_shards += 1
                continue
            mine = pos[fresh[pos]]
            if not len(mine):
                continue
            if len(mine) == totals[shard_id]:
                _transfer(cache.location, dst, shard_dir(shard_id), report)
                whole_from[shard_id] = k
            else:
                shard_id, nbytes = _rewrite_part(cache, shard_id, rows[mine], dst)
                plan.rep_pos.append(mine)
                plan.rep_shard.append(shard_id)
                plan.rep_row.append(np.arange(len(mine), dtype=np.int32))
                plan.rep_bytes.append(nbytes)
                report.rewritten += 1
            shards.append(shard_id)
            plan.keep[mine] = True
        taken = _sorted_union(taken, ids[plan.keep])
        plans.append(plan)
        del ids, codes, rows, ok, fresh
    total_failed = sum(len(p.failed_ids) for p in plans)
    if seen_ok + total_failed == 0:
        raise DatasetError(", ".join(c.location.display for c in caches),
                           f"no windows match the selection ({selection.describe()})" if selection else "the inputs have no manifest rows",
                           field="selection")
    report.windows_ok = len(taken)
    report.duplicate_windows = seen_ok - len(taken)
    report.windows_failed = _take_failed(plans, taken)
    report.duplicate_windows += total_failed - report.windows_failed  # failed rows of windows taken ok or failed before
    aligners = [_Aligner(plan, cache.location.display) for cache, plan in zip(caches, plans)]
    streams = [mapped(_sorted_rows(cache, dst, expr), aligner) for cache, aligner in zip(caches, aligners)]
    part = write_sorted(dst, SortedMerge(streams), 1, row_group_size=MANIFEST_ROW_GROUP, file_rows=MANIFEST_FILE_ROWS)
    for aligner in aligners:
        aligner.check_done()
    write_consolidation(dst, {"files": []}, [part], sorted(shards))
    _write_config(caches, dst, selection, command, dataset_root)
    return report


def _check_inputs(caches: Sequence["CorrCache"], dst: "CacheLocation", sources: Sequence[str | Path], dataset_root: str | None) -> None:
    """Refuse an input given twice, ``OUT`` among the inputs, not empty or not writable (a missing
    bucket), caches of other identities, old layouts, and inputs of different dataset roots unless
    ``dataset_root`` is given."""
    roots = [c.location.url() for c in caches]
    if len(set(roots)) != len(roots):
        raise SchemaError("sources", f"a cache is given twice: {', '.join(str(s) for s in sources)}")
    if dst.url() in roots:
        raise SchemaError("out", "is one of the inputs; merge into a new directory", where=dst.display)
    if dst.exists() and dst.listdir():
        raise DatasetError(dst.display, "output exists and is not empty; merge into a new directory", field="out")
    check_same_identity(caches)
    for c in caches:
        if c.version != SCHEMA_VERSION:
            raise SchemaError("schema_version", f"version {c.version} cache; convert it first with `cameo-corr cache migrate`",
                              where=c.location.url(CONFIG_FILE))
    first = caches[0]
    for other in caches[1:]:
        a, b = first.config.dataset.get("root"), other.config.dataset.get("root")
        if a != b and dataset_root is None:
            raise SchemaError("dataset.root", f"{first.location.display} was built from {a}, {other.location.display} from {b}; "
                              "the merged cache.json records one dataset root, so the windows of the other would be unknown "
                              "scenes to viz and train: merge caches of one root, or pass --dataset-root ROOT if one root "
                              "holds every input's scenes", where=other.location.url(CONFIG_FILE))
    if dataset_root is not None and "://" not in dataset_root and not os.path.isdir(dataset_root):
        raise DatasetError(dataset_root, "not a directory (the dataset root the merged cache is to record)", field="dataset_root")
    dst.check_writable("out")


def _write_config(caches: Sequence["CorrCache"], dst: "CacheLocation", selection: WindowSelection, command: str | None,
                  dataset_root: str | None) -> None:
    """``OUT``'s ``cache.json`` (written last): the first input's config, ``created_by`` naming the
    sources (and their roots) and the selection, the dataset root replaced by ``dataset_root`` if given."""
    import cameo_corr

    config = caches[0].config
    created = {
        "package": "cameo-corr",
        "version": cameo_corr.__version__,
        "command": command or "merge_caches",
        "cwd": os.getcwd(),  # where the command's relative paths start
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "merged_from": [{"path": c.location.url(), "created_by": c.config.created_by} for c in caches],
        "selection": {"split": selection.split, "scenes_file": selection.scenes_file, "min_mask_frac": selection.min_mask_frac},
    }
    if dataset_root is not None:
        created["dataset_roots"] = [c.config.dataset.get("root") for c in caches]
        config = dataclasses.replace(config, dataset={**config.dataset, "root": dataset_root})
    dst.write_bytes_atomic(CONFIG_FILE, dataclasses.replace(config, created_by=created).to_json().encode())


def _narrow_index(cache: "CorrCache", selection: WindowSelection) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray, np.ndarray]:
    """``(ids, shard codes, shard names, rows, ok)`` of the selected manifest rows of ``cache`` sorted by
    ``window_id`` (stable: the order in which :func:`_sorted_rows` streams them), read a batch at a time
    (null shard and row: -1)."""
    import pyarrow.compute as pc

    names: dict[str, int] = {}
    parts: list[tuple[np.ndarray, ...]] = []
    for t in manifest_batches(cache.location, ["window_id", "shard", "row", "status"], selection.expression(),
                              filter_columns=selection.columns()):
        enc = pc.dictionary_encode(t.column("shard").combine_chunks())
        lut = np.array([names.setdefault(n, len(names)) for n in enc.dictionary.to_pylist()] + [-1], dtype=np.int32)
        local = pc.fill_null(enc.indices, len(lut) - 1).to_numpy(zero_copy_only=False)
        parts.append((id_array(t.column("window_id")), lut[local], pc.fill_null(t.column("row"), -1).to_numpy().astype(np.int32),
                      pc.equal(t.column("status"), "ok").to_numpy(zero_copy_only=False).astype(bool)))
    if not parts:
        return np.zeros(0, "S1"), np.zeros(0, np.int32), [], np.zeros(0, np.int32), np.zeros(0, bool)
    cols = [np.concatenate([p[i] for p in parts]) for i in range(4)]
    del parts  # one copy of each column from here on
    order = np.argsort(cols[0], kind="stable")
    for i in range(4):
        cols[i] = cols[i][order]
    return cols[0], cols[1], list(names), cols[2], cols[3]


def _shard_totals(cache: "CorrCache", codes: np.ndarray, names: list[str], selected: bool) -> dict[str, int]:
    """Ok rows per shard of the whole input (selection aside): a shard taken in part is rewritten."""
    import pyarrow.compute as pc

    if not selected:
        counts = np.bincount(codes, minlength=len(names))
        return {n: int(c) for n, c in zip(names, counts)}
    totals: dict[str, int] = {}
    for t in manifest_batches(cache.location, ["shard"], pc.field("status") == "ok", filter_columns=["status"]):
        for r in pc.value_counts(t.column("shard").combine_chunks()).to_pylist():
            totals[r["values"]] = totals.get(r["values"], 0) + r["counts"]
    return totals


def _shard_groups(codes: np.ndarray, names: list[str], rows: np.ndarray, ok: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """``(shard id, positions of its ok rows ordered by row)`` for each shard, by shard id."""
    pos = np.flatnonzero(ok)
    if not len(pos):
        return
    rank = np.empty(len(names), dtype=np.int64)
    rank[np.argsort(np.array(names, dtype=object))] = np.arange(len(names))
    pos = pos[np.lexsort((rows[pos], rank[codes[pos]]))]
    bounds = np.flatnonzero(np.diff(codes[pos])) + 1
    for group in np.split(pos, bounds):
        yield names[codes[group[0]]], group


def _sorted_union(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The sorted distinct values of the sorted arrays ``a`` and ``b`` (one sort in place, no extra copies
    beyond the result: ``np.union1d`` holds about four)."""
    both = np.concatenate([a, b]) if len(a) else b.copy()
    both.sort(kind="stable")
    if len(both) > 1:
        fresh = np.empty(len(both), dtype=bool)
        fresh[0] = True
        np.not_equal(both[1:], both[:-1], out=fresh[1:])
        if not fresh.all():
            both = both[fresh]
    return both


def _take_failed(plans: Sequence[_Taken], taken: np.ndarray) -> int:
    """Keep the first input's failed row of each window no input has ok; returns how many."""
    seen = np.zeros(0, dtype="S1")
    kept = 0
    for plan in plans:
        fresh = ~sorted_member(plan.failed_ids, taken) & ~sorted_member(plan.failed_ids, seen)
        plan.keep[plan.failed_pos[fresh]] = True
        seen = np.union1d(seen, plan.failed_ids[fresh])
        kept += int(fresh.sum())
    return kept


def _sorted_rows(cache: "CorrCache", spill: "CacheLocation", expr: Any) -> Iterator["pa.Table"]:
    """The selected manifest rows of ``cache`` sorted by ``window_id``, streamed (its consolidated parts
    a batch at a time, its pending fragments as sorted runs spilled under ``spill``)."""
    info = read_consolidation(cache.location)
    with SpilledRuns(cache.location, info, fragment_names(cache.location), spill=spill, filter=expr) as pending:
        runs = part_runs(cache.location, info["parts"])
        if expr is not None:
            runs = [mapped(run, lambda t: t.filter(expr)) for run in runs]
        yield from SortedMerge(runs + pending.runs())


class _Aligner:
    """Keeps the rows of one input's sorted stream that :func:`merge_caches` took, with the new shard,
    row and shard size of rewritten shards (positions count the stream's rows)."""

    def __init__(self, plan: _Taken, where: str) -> None:
        self.plan, self.where, self.offset = plan, where, 0
        self.rep_pos = np.concatenate(plan.rep_pos) if plan.rep_pos else np.zeros(0, np.int64)
        order = np.argsort(self.rep_pos, kind="stable")
        self.rep_pos = self.rep_pos[order]
        sizes = [len(p) for p in plan.rep_pos]
        self.rep_shard = np.repeat(np.arange(len(sizes)), sizes)[order]
        self.rep_row = (np.concatenate(plan.rep_row) if plan.rep_row else np.zeros(0, np.int32))[order]

    def check_done(self) -> None:
        """Raise unless the stream had exactly the rows first read."""
        if self.offset != self.plan.rows:
            raise DatasetError(f"{self.where}/manifest", f"the manifest changed during the merge ({self.offset} rows, "
                               f"{self.plan.rows} first read)")

    def __call__(self, table: "pa.Table") -> "pa.Table":
        import pyarrow as pa

        lo, hi = self.offset, self.offset + table.num_rows
        if hi > self.plan.rows:
            raise DatasetError(f"{self.where}/manifest", "the manifest changed during the merge (more rows than first read)")
        self.offset = hi
        at = np.flatnonzero(self.plan.keep[lo:hi])
        table = table.take(pa.array(at))
        a, b = np.searchsorted(self.rep_pos, [lo, hi])
        if a == b:
            return table
        j = np.searchsorted(at, self.rep_pos[a:b] - lo)
        shard = table.column("shard").to_numpy(zero_copy_only=False).astype(object)
        row = table.column("row").to_numpy(zero_copy_only=False).astype(np.float64)
        nbytes = table.column("shard_bytes").to_numpy(zero_copy_only=False).astype(np.float64)
        shard[j] = [self.plan.rep_shard[s] for s in self.rep_shard[a:b]]
        row[j] = self.rep_row[a:b]
        nbytes[j] = [self.plan.rep_bytes[s] for s in self.rep_shard[a:b]]
        for name, values in (("shard", pa.array(shard, pa.string())), ("row", pa.array(row, pa.float64(), from_pandas=True)),
                             ("shard_bytes", pa.array(nbytes, pa.float64(), from_pandas=True))):
            i = table.schema.get_field_index(name)
            table = table.set_column(i, table.schema.field(name), values.cast(table.schema.field(name).type))
        return table


def _rewrite_part(cache: "CorrCache", shard_id: str, rows: np.ndarray, dst: "CacheLocation") -> tuple[str, int]:
    """Write the rows ``rows`` (ascending) of shard ``shard_id`` of ``cache`` as a new shard of ``dst``
    (id: the content hash of its window ids, rows in their original order); return the new shard id and
    its size in bytes (the windows' new rows are ``0..len(rows)-1``)."""
    meta = cache.shard_windows(shard_id)
    data = _stored_arrays(cache, shard_id)
    new_id = shard_id_of([meta["window_ids"][r] for r in rows])
    blob = shard_zip_bytes(new_id, {key: [meta[key][r] for r in rows] for key in meta}, {n: v[rows] for n, v in data.items()},
                           cache.config)
    dst.write_bytes_atomic(shard_dir(new_id), blob)
    return new_id, len(blob)


__all__ = ["MergeReport", "merge_caches"]
