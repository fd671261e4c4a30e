"""``cameo-corr cache stats``: windows (ok / failed), scenes, shards, mask coverage histogram,
valid-token share, bytes stored (shard sizes recorded at write time) and per window, the most common
failure reasons, orphans left by killed workers. Reads only the manifest columns it needs."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from cameo_corr.cache.layout import MANIFEST_DIR, SHARDS_DIR
from cameo_corr.cache.manifest import StringCodes, find_orphans, scan_manifest
from cameo_corr.cache.select import selected_manifest
from cameo_corr.cache.shard import window_fractions

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pyarrow as pa

    from cameo_corr.cache.reader import CorrCache
    from cameo_corr.cache.select import WindowSelection

COVERAGE_BINS = 10
STATS_COLUMNS = ("scene_id", "shard", "status", "valid_frac", "mask_frac", "error", "shard_bytes")



class _Distinct:
    """The distinct values of a string column streamed in batches: each batch's uniques, merged into one
    unique array every :attr:`merge_every` batches (memory: the distinct values and a few batches)."""

    merge_every = 16

    def __init__(self) -> None:
        self._parts: list[Any] = []

    def add(self, column: Any) -> None:
        """Take the distinct values of one batch's column."""
        import pyarrow.compute as pc

        self._parts.append(pc.unique(column))
        if len(self._parts) > self.merge_every:
            self._parts = [self.values()]

    def values(self) -> Any:
        """The distinct values seen so far (a pyarrow array; a null among them when nulls were seen)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        return pc.unique(pa.chunked_array(self._parts, pa.string()))


def _stats_columns(batches: Iterable["pa.RecordBatch"]) -> dict[str, Any]:
    """What :func:`cache_stats` needs of every row, folded batch by batch (:func:`scan_manifest`): the ok
    rows' fractions (float32), the shards with ok rows and their recorded sizes, the distinct scenes of
    ok and of all rows, the failed rows' errors; with a ``row`` column (a selection), the ok rows' shard
    codes and rows. No Arrow table and no shard code of every row is kept."""
    import pyarrow.compute as pc

    shards = StringCodes(keep=False)
    keep: dict[str, list[Any]] = {k: [] for k in ("mask_frac", "valid_frac", "shard", "row")}
    scenes_ok, scenes_other = _Distinct(), _Distinct()
    errors: list[str | None] = []
    seen, size, unrecorded, n_ok = np.zeros(0, bool), np.zeros(0, np.int64), False, 0
    for batch in batches:
        status = batch.column("status")
        ok = pc.equal(status, "ok").fill_null(False)
        errors += batch.column("error").filter(pc.equal(status, "failed").fill_null(False)).to_pylist()
        codes = shards.add(batch.column("shard"))[ok.to_numpy(zero_copy_only=False)]
        n_ok += len(codes)
        grow = len(shards.names) - len(seen)
        seen, size = np.concatenate([seen, np.zeros(grow, bool)]), np.concatenate([size, np.zeros(grow, np.int64)])
        seen[codes] = True
        recorded = batch.column("shard_bytes").filter(ok)
        unrecorded |= recorded.null_count > 0
        np.maximum.at(size, codes, recorded.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64))  # the same for a shard's rows
        for name in ("mask_frac", "valid_frac", "row"):
            if name in batch.schema.names:
                keep[name].append(batch.column(name).filter(ok).to_numpy(zero_copy_only=False))
        if "row" in batch.schema.names:
            keep["shard"].append(codes)
        scenes_ok.add(batch.column("scene_id").filter(ok))
        scenes_other.add(batch.column("scene_id").filter(pc.invert(ok)))
    ok_values = scenes_ok.values()
    scenes_other.add(ok_values)
    scenes_all = scenes_other.values()
    out: dict[str, Any] = {k: np.concatenate(v) if v else np.zeros(0) for k, v in keep.items()}
    out.update(errors=errors, shards=shards.names, seen=seen, size=size, unrecorded=unrecorded, n_ok=n_ok,
               scenes_ok=len(ok_values) - int(ok_values.null_count > 0), scenes_total=len(scenes_all) - int(scenes_all.null_count > 0))
    return out


def _ok_per_shard(batches: Iterable["pa.RecordBatch"]) -> dict[str, int]:
    """Ok rows per shard name, folded batch by batch (:func:`scan_manifest` of ``status`` and ``shard``)."""
    import pyarrow.compute as pc

    shards = StringCodes(keep=False)
    counts = np.zeros(0, np.int64)
    for batch in batches:
        codes = shards.add(batch.column("shard"))[pc.equal(batch.column("status"), "ok").fill_null(False).to_numpy(zero_copy_only=False)]
        counts = np.bincount(codes, minlength=len(shards.names)) + np.pad(counts, (0, len(shards.names) - len(counts)))
    return dict(zip(shards.names, counts.tolist()))


def cache_stats(cache: "CorrCache", *, bins: int = COVERAGE_BINS, grid: tuple[int, int] | None = None,
                selection: "WindowSelection | None" = None) -> dict[str, Any]:
    """Summary numbers of a cache (see the module docstring); with ``selection``, of the selected
    windows only (window, scene and shard counts, the bytes of the shards holding them, and per ok
    window each selected window's share of its shard; orphans are the cache's).

    Reads only the manifest columns it needs and computes with Arrow/numpy. Shard bytes are the sizes
    recorded at write time (``shard_bytes``); for version 1 caches, which did not record them, the
    shards folder is walked (``bytes_source`` says which). The valid and mask shares describe ``grid``
    (default: the primary grid, whose shares the manifest records; another grid of a multi-grid cache
    is read from the shards' ``valid`` and ``mask`` arrays).
    """
    if bins < 1:
        raise ValueError(f"--bins must be >= 1, got {bins}")
    if selection:
        cols = _stats_columns(selected_manifest(cache, selection, None, [*STATS_COLUMNS, "row"]).to_batches())
    else:  # streamed: no Arrow table of every row
        cols = scan_manifest(cache.location, _stats_columns, list(STATS_COLUMNS))
    grid = cache.select_grid(grid)
    n_ok, shard_names = cols["n_ok"], cols["shards"]
    if grid == tuple(cache.config.grid):
        mask_frac, valid_frac = cols["mask_frac"], cols["valid_frac"]
    else:
        ok_shards = sorted(shard_names[k] for k in np.flatnonzero(cols["seen"]).tolist())
        rows: dict[str, set[int]] | None = None
        if selection:  # only the selected rows of the shards
            rows = {}
            for k, r in zip(cols["shard"].tolist(), cols["row"].tolist()):
                rows.setdefault(shard_names[k], set()).add(int(r))
        valid_frac, mask_frac = _grid_fractions(cache, ok_shards, grid, rows)
    counts, edges = np.histogram(mask_frac, bins=bins, range=(0.0, 1.0))
    errors = cols["errors"]
    reasons = Counter((e or "").split(":", 1)[0] for e in errors)
    loc = cache.location
    orphans = find_orphans(loc)
    n_failed = len(errors)
    if n_ok and not cols["unrecorded"]:
        shard_bytes, source = int(cols["size"].sum()), "recorded"
    elif n_ok:
        shard_bytes, source = loc.disk_usage(SHARDS_DIR), "measured"
    else:
        shard_bytes, source = 0, "recorded"
    manifest_bytes = loc.disk_usage(MANIFEST_DIR)
    per_window = shard_bytes / n_ok if n_ok else 0.0
    if selection and n_ok:  # the selected windows' share of their shards, which hold unselected windows too
        ok_in = scan_manifest(loc, _ok_per_shard, ["status", "shard"])
        if source == "recorded":
            picked = np.bincount(cols["shard"].astype(np.int64), minlength=len(shard_names))
            per_window = sum(int(cols["size"][k]) * int(picked[k]) / ok_in[shard_names[k]] for k in np.flatnonzero(picked)) / n_ok
        else:  # sizes measured over the whole shards folder
            per_window = shard_bytes / sum(ok_in.values())
    return {
        "path": loc.display,
        "selection": selection.describe() if selection else None,
        "schema_version": cache.version,
        "views": cache.config.views,
        "grid": list(grid),
        "grids": [list(g) for g in cache.config.grids],
        "tau": cache.config.tau,
        "backend": cache.config.backend.get("name"),
        "windows_ok": n_ok,
        "windows_failed": n_failed,
        "scenes_ok": cols["scenes_ok"],
        "scenes_total": cols["scenes_total"],
        "shards": int(cols["seen"].sum()),
        "valid_frac_mean": float(np.mean(valid_frac, dtype=np.float64)) if n_ok else 0.0,
        "mask_frac_mean": float(np.mean(mask_frac, dtype=np.float64)) if n_ok else 0.0,
        "mask_frac_histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
        "failure_reasons": dict(reasons.most_common()),
        "failure_examples": errors[:5],
        "bytes_shards": shard_bytes,
        "bytes_manifest": manifest_bytes,
        "bytes_total": shard_bytes + manifest_bytes,
        "bytes_per_window": per_window,
        "bytes_source": source,
        "orphans": orphans,
    }


def _grid_fractions(cache: "CorrCache", shard_ids: Sequence[str], grid: tuple[int, int],
                    rows: dict[str, set[int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(valid_frac, mask_frac)`` of every window of ``shard_ids`` (only rows ``rows[shard]`` when given)
    on ``grid``, from the shards' arrays."""

    fracs = []
    for sid in shard_ids:
        data = cache.read_shard(sid, ("valid", "mask"), grid=grid)
        fracs += [window_fractions({"valid": v, "mask": m}) for r, (v, m) in enumerate(zip(data["valid"], data["mask"]))
                  if rows is None or r in rows[sid]]
    out = np.asarray(fracs, dtype=np.float64).reshape(-1, 2)
    return out[:, 0], out[:, 1]


def format_stats(stats: dict[str, Any]) -> str:
    """Text report of :func:`cache_stats` with a bar chart of the mask coverage histogram."""
    h = stats["mask_frac_histogram"]
    top = max(h["counts"]) if h["counts"] and max(h["counts"]) else 1
    lines = [
        f"cache {stats['path']} (schema version {stats['schema_version']}): S={stats['views']} "
        f"grid={stats['grid'][0]}x{stats['grid'][1]} tau={stats['tau']} backend={stats['backend']}"
        + (f" (grids stored: {', '.join(f'{h}x{w}' for h, w in stats['grids'])})" if len(stats["grids"]) > 1 else ""),
        *([f"selection: {stats['selection']}"] if stats.get("selection") else []),
        f"windows: {stats['windows_ok']} ok, {stats['windows_failed']} failed; scenes: {stats['scenes_ok']} with ok windows "
        f"of {stats['scenes_total']}; shards: {stats['shards']}",
        f"valid tokens: {100 * stats['valid_frac_mean']:.1f}% mean; masked query tokens (i != j): "
        f"{100 * stats['mask_frac_mean']:.1f}% mean",
        "mask coverage per window (mask_frac):",
    ]
    for lo, hi, c in zip(h["edges"][:-1], h["edges"][1:], h["counts"]):
        lines.append(f"  [{lo:.1f}, {hi:.1f}{']' if hi >= 1.0 else ')'} {c:6d} {'#' * int(round(40 * c / top))}")
    lines.append(
        f"bytes: {stats['bytes_total']:,} stored ({stats['bytes_shards']:,} shards {stats['bytes_source']}, "
        f"{stats['bytes_manifest']:,} manifest), {stats['bytes_per_window']:,.0f} per ok window"
    )
    if stats["failure_reasons"]:
        lines.append("failures: " + ", ".join(f"{k or '?'} x{v}" for k, v in stats["failure_reasons"].items()))
        lines += [f"  e.g. {e}" for e in stats["failure_examples"]]
    if stats["orphans"]:
        lines.append(f"orphans (left by killed workers; removed by the next preprocess run): {len(stats['orphans'])}")
    return "\n".join(lines)


__all__ = ["COVERAGE_BINS", "cache_stats", "format_stats"]
