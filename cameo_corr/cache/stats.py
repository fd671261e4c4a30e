"""``cameo-corr cache stats``: windows (ok / failed), scenes, shards, mask coverage histogram,
valid-token share, bytes on disk (shard sizes recorded at write time) and per window, the most common
failure reasons, orphans left by killed workers. Reads only the manifest columns it needs."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from cameo_corr.cache.layout import MANIFEST_DIR, SHARDS_DIR
from cameo_corr.cache.manifest import find_orphans
from cameo_corr.cache.select import selected_manifest
from cameo_corr.cache.shard import window_fractions

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pyarrow as pa

    from cameo_corr.cache.reader import CorrCache
    from cameo_corr.cache.select import WindowSelection

COVERAGE_BINS = 10
STATS_COLUMNS = ("scene_id", "shard", "status", "valid_frac", "mask_frac", "error", "shard_bytes")



def _codes(column: "pa.ChunkedArray") -> tuple[np.ndarray, int]:
    """``(code per row, number of distinct values)`` of a string column: one hash pass (Arrow's
    dictionary encoding of the whole column), so distinct counts of any row subset are a linear
    numpy pass over int32 codes, not a hash aggregation per chunk and subset. Nulls get code -1."""
    import pyarrow.compute as pc

    encoded = pc.dictionary_encode(column.combine_chunks())
    return pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False), len(encoded.dictionary)


def _distinct(codes: np.ndarray, size: int) -> int:
    """How many distinct non-null codes (< ``size``) ``codes`` holds."""
    seen = np.zeros(size + 1, dtype=bool)
    seen[codes] = True  # null (-1) lands in the spare last slot
    return int(seen[:size].sum())


def cache_stats(cache: "CorrCache", *, bins: int = COVERAGE_BINS, grid: tuple[int, int] | None = None,
                selection: "WindowSelection | None" = None) -> dict[str, Any]:
    """Summary numbers of a cache (see the module docstring); with ``selection``, of the selected
    windows only (window, scene, shard and byte counts; orphans are the cache's).

    Reads only the manifest columns it needs and computes with Arrow/numpy. Shard bytes are the sizes
    recorded at write time (``shard_bytes``); for version 1 caches, which did not record them, the
    shards folder is walked (``bytes_source`` says which). The valid and mask shares describe ``grid``
    (default: the primary grid, whose shares the manifest records; another grid of a multi-grid cache
    is read from the shards' ``valid`` and ``mask`` arrays).
    """
    import pyarrow as pa
    import pyarrow.compute as pc


    if bins < 1:
        raise ValueError(f"--bins must be >= 1, got {bins}")
    if selection:

        table = selected_manifest(cache, selection, None, [*STATS_COLUMNS, "row"])
    else:
        table = cache.manifest(None, columns=list(STATS_COLUMNS))
    ok_mask = pc.equal(table.column("status"), "ok").to_numpy(zero_copy_only=False)
    failed = table.filter(pc.equal(table.column("status"), "failed"))
    grid = cache.select_grid(grid)
    if grid == tuple(cache.config.grid):
        mask_frac = table.column("mask_frac").to_numpy()[ok_mask].astype(np.float64)
        valid_frac = table.column("valid_frac").to_numpy()[ok_mask].astype(np.float64)
    else:
        ok_shards = pc.unique(table.column("shard").filter(pa.array(ok_mask))).to_pylist()
        rows: dict[str, set[int]] | None = None
        if selection:  # only the selected rows of the shards
            rows = {}
            ok_rows = table.filter(pa.array(ok_mask))
            for sid, r in zip(ok_rows.column("shard").to_pylist(), ok_rows.column("row").to_pylist()):
                rows.setdefault(sid, set()).add(r)
        valid_frac, mask_frac = _grid_fractions(cache, sorted(ok_shards), grid, rows)
    counts, edges = np.histogram(mask_frac, bins=bins, range=(0.0, 1.0))
    errors = failed.column("error").to_pylist()
    reasons = Counter((e or "").split(":", 1)[0] for e in errors)
    scene, n_scenes = _codes(table.column("scene_id"))
    shard, n_shards = _codes(table.column("shard"))
    loc = cache.location
    orphans = find_orphans(loc)
    n_ok, n_failed = int(ok_mask.sum()), failed.num_rows
    recorded = table.column("shard_bytes").to_numpy()[ok_mask]
    if n_ok and not np.isnan(recorded.astype(np.float64)).any():
        per_shard = np.zeros(n_shards, dtype=np.int64)  # the size recorded with each ok row of a shard (the same for all)
        np.maximum.at(per_shard, shard[ok_mask], recorded.astype(np.int64))
        shard_bytes, source = int(per_shard.sum()), "recorded"
    elif n_ok:
        shard_bytes, source = loc.disk_usage(SHARDS_DIR), "measured"
    else:
        shard_bytes, source = 0, "recorded"
    manifest_bytes = loc.disk_usage(MANIFEST_DIR)
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
        "scenes_ok": _distinct(scene[ok_mask], n_scenes),
        "scenes_total": _distinct(scene, n_scenes),
        "shards": _distinct(shard[ok_mask], n_shards),
        "valid_frac_mean": float(valid_frac.mean()) if n_ok else 0.0,
        "mask_frac_mean": float(mask_frac.mean()) if n_ok else 0.0,
        "mask_frac_histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
        "failure_reasons": dict(reasons.most_common()),
        "failure_examples": errors[:5],
        "bytes_shards": shard_bytes,
        "bytes_manifest": manifest_bytes,
        "bytes_total": shard_bytes + manifest_bytes,
        "bytes_per_window": shard_bytes / n_ok if n_ok else 0.0,
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
        f"bytes: {stats['bytes_total']:,} on disk ({stats['bytes_shards']:,} shards {stats['bytes_source']}, "
        f"{stats['bytes_manifest']:,} manifest), {stats['bytes_per_window']:,.0f} per ok window"
    )
    if stats["failure_reasons"]:
        lines.append("failures: " + ", ".join(f"{k or '?'} x{v}" for k, v in stats["failure_reasons"].items()))
        lines += [f"  e.g. {e}" for e in stats["failure_examples"]]
    if stats["orphans"]:
        lines.append(f"orphans (left by killed workers; removed by the next preprocess run): {len(stats['orphans'])}")
    return "\n".join(lines)


__all__ = ["COVERAGE_BINS", "cache_stats", "format_stats"]
