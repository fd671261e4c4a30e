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
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from cameo_corr.cache.config import check_same_identity
from cameo_corr.cache.consolidation import write_compact
from cameo_corr.cache.layout import CONFIG_FILE, TMP_PREFIX, shard_dir
from cameo_corr.cache.location import CacheLocation
from cameo_corr.cache.manifest import read_manifest
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


def merge_caches(
    sources: Sequence[str | Path],
    out: str | Path,
    *,
    selection: WindowSelection = WindowSelection(),
    storage_options: Mapping[str, Any] | None = None,
    command: str | None = None,
) -> MergeReport:
    """Write the union of the caches ``sources`` (same identity) into the new cache ``out``.

    See the module docstring for the rules. ``selection`` keeps only the windows satisfying it (an
    empty result is an error naming the predicate). ``out`` must not exist or be an empty directory.
    ``storage_options`` apply to every URL. Returns a :class:`MergeReport`.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    import cameo_corr

    if len(sources) < 2:
        raise SchemaError("sources", f"merge needs at least two caches, got {len(sources)}")
    options = dict(storage_options or {}) or None
    caches = [CorrCache(s, options if "://" in str(s) else None) for s in sources]
    dst = CacheLocation(out, options if "://" in str(out) else None)
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

    report = MergeReport(out=dst.display)
    expr = selection.expression()
    taken_ids = pa.array([], pa.string())  # ok window ids taken from earlier inputs
    whole_from: dict[str, int] = {}  # shard id -> the input whose shard file was taken whole
    shards: list[str] = []  # every shard of OUT
    ok_parts: list[pa.Table] = []
    failed_parts: list[pa.Table] = []
    seen_ok = 0
    for k, cache in enumerate(caches):  # one input's full manifest in memory at a time
        table = read_manifest(cache.location, filter=expr)
        failed_parts.append(table.filter(pc.equal(table.column("status"), "failed")))
        ok = table.filter(pc.equal(table.column("status"), "ok"))
        del table
        ok = ok.sort_by([("shard", "ascending"), ("row", "ascending")])
        seen_ok += ok.num_rows
        fresh = ~np.asarray(pc.is_in(ok.column("window_id"), value_set=taken_ids).to_numpy(zero_copy_only=False), dtype=bool)
        # whole-shard row counts of this input (selection aside): a shard taken in part is rewritten
        totals = {r["values"]: r["counts"] for r in pc.value_counts(
            read_manifest(cache.location, columns=["shard"], filter=pc.field("status") == "ok").column("shard")).to_pylist()}
        codes = pc.dictionary_encode(ok.column("shard").combine_chunks())
        names = codes.dictionary.to_pylist()
        bounds = np.searchsorted(codes.indices.to_numpy(zero_copy_only=False), np.arange(len(names) + 1))  # sorted by shard
        keep = np.zeros(ok.num_rows, dtype=bool)
        parts: list[pa.Table] = []
        for s, shard_id in enumerate(names):
            lo, hi = int(bounds[s]), int(bounds[s + 1])
            if shard_id in whole_from:
                _same_shard(caches[whole_from[shard_id]], cache, shard_id)
                report.duplicate_shards += 1
                continue
            n_fresh = int(fresh[lo:hi].sum())
            if n_fresh == 0:
                continue
            if n_fresh == totals[shard_id]:
                _transfer(cache.location, dst, shard_dir(shard_id), report)
                whole_from[shard_id] = k
                shards.append(shard_id)
                keep[lo:hi] = True
            else:
                part, new_id = _rewrite_part(cache, shard_id, ok.slice(lo, hi - lo).filter(pa.array(fresh[lo:hi])), dst)
                parts.append(part)
                shards.append(new_id)
                report.rewritten += 1
        parts.append(ok.filter(pa.array(keep)))
        ok_parts += parts
        taken_ids = pa.concat_arrays([taken_ids, *(p.column("window_id").combine_chunks() for p in parts)])
    failed = pa.concat_tables(failed_parts)
    if seen_ok + failed.num_rows == 0:
        raise DatasetError(", ".join(c.location.display for c in caches),
                           f"no windows match the selection ({selection.describe()})" if selection else "the inputs have no manifest rows",
                           field="selection")
    ok_rows = pa.concat_tables(ok_parts)
    del ok_parts
    report.duplicate_windows = seen_ok - ok_rows.num_rows
    superseded = failed.num_rows
    failed = failed.filter(pc.invert(pc.is_in(failed.column("window_id"), value_set=taken_ids)))
    report.duplicate_windows += superseded - failed.num_rows  # failed rows of windows another input has ok
    if failed.num_rows:  # the first input's failed row of each window that no input has ok
        ids = failed.column("window_id").combine_chunks()
        first = np.unique(np.asarray(pc.dictionary_encode(ids).indices.to_numpy(zero_copy_only=False)), return_index=True)[1]
        report.duplicate_windows += failed.num_rows - len(first)
        failed = failed.take(pa.array(np.sort(first), pa.int64()))
    report.windows_ok, report.windows_failed = ok_rows.num_rows, failed.num_rows
    manifest = pa.concat_tables([ok_rows, failed.cast(ok_rows.schema)])
    del ok_rows, failed
    write_compact(dst, manifest, {"files": [], "fragments": []}, sorted(shards))
    config = caches[0].config
    created = {
        "package": "cameo-corr",
        "version": cameo_corr.__version__,
        "command": command or "merge_caches",
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "merged_from": [{"path": c.location.display, "created_by": c.config.created_by} for c in caches],
        "selection": {"split": selection.split, "scenes_file": selection.scenes_file, "min_mask_frac": selection.min_mask_frac},
    }
    dst.write_bytes_atomic(CONFIG_FILE, dataclasses.replace(config, created_by=created).to_json().encode())
    return report


def _rewrite_part(cache: "CorrCache", shard_id: str, rows: "pa.Table", dst: "CacheLocation") -> tuple["pa.Table", str]:
    """Write the windows ``rows`` of shard ``shard_id`` of ``cache`` as a new shard of ``dst`` (id: the
    content hash of its window ids, rows in their original order); return their updated manifest rows
    and the new shard id."""
    import pyarrow as pa


    rows = rows.sort_by("row")
    keep = rows.column("row").to_numpy()
    meta = cache.shard_windows(shard_id)
    data = _stored_arrays(cache, shard_id)
    new_id = shard_id_of([meta["window_ids"][r] for r in keep])
    blob = shard_zip_bytes(new_id, {key: [meta[key][r] for r in keep] for key in meta}, {n: v[keep] for n, v in data.items()},
                           cache.config)
    dst.write_bytes_atomic(shard_dir(new_id), blob)
    n = rows.num_rows

    def column(name: str, values: Any) -> Any:
        return pa.array(values, rows.schema.field(name).type)

    for name, values in (("shard", [new_id] * n), ("row", np.arange(n)), ("shard_bytes", [len(blob)] * n)):
        rows = rows.set_column(rows.schema.get_field_index(name), rows.schema.field(name), column(name, values))
    return rows, new_id


__all__ = ["MergeReport", "merge_caches"]
