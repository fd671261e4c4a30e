"""``cameo-corr cache stats|verify|viz|compact|migrate|merge``: inspect, check, picture, maintain and combine caches.

``stats``, ``verify``, ``viz`` and ``merge`` take a window selection (``--split``, ``--scenes FILE``,
``--min-mask-frac``; :class:`~cameo_corr.pipeline.sharing.WindowSelection`); ``merge`` writes the union of
caches of one config (:func:`~cameo_corr.pipeline.sharing.merge_caches`).

* ``stats``: windows (ok / failed), scenes, shards, mask coverage histogram, valid-token share, bytes
  on disk (shard sizes recorded at write time) and per window, the most common failure reasons,
  orphans left by killed workers. Reads only the manifest columns it needs.
* ``verify``: every ok manifest row has its shard row (the shard's ``window_ids`` attribute agrees),
  every shard row is referenced once, shapes and dtypes match the schema
  (:func:`~cameo_corr.schemas.validate_window_arrays`), ``nn`` diagonal is the identity, masks are
  consistent with ``nn`` (``mask_ij[x]`` exactly when ``x`` is valid, view j has a valid token and the
  cycle ``nn_ji[nn_ij[x]]`` lands within ``tau`` tokens of ``x``), ``nn`` only points at valid tokens,
  and the manifest's ``valid_frac``/``mask_frac`` match the arrays (of the primary grid); every grid of
  a multi-grid cache is checked (``--grid`` picks some); chunks failing their checksum are
  listed by window. Streams shard by shard (``--max-windows`` reads only what it checks); ``--deep``
  decodes every chunk of every shard. Exits 1 listing the problems, or when no ok window exists.
* ``compact``: consolidate the manifest fragments; ``migrate``: version 1 cache -> version 2 copy.
* ``viz``: a PNG of one window (:func:`render_viz`): two labelled views with a few numbered,
  well-spread cycle-consistent matches, the query view's tokens by status and the matched share of
  valid query tokens for every view pair. Images come from the dataset through ``CorrCache.reader()``
  and ``CorrCache.view()``, i.e. the same canonical crop the cache was computed on.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from cameo_corr.schemas import token_coords

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pyarrow as pa

    from cameo_corr.pipeline.cache import CorrCache, CorruptCacheError
    from cameo_corr.pipeline.sharing import WindowSelection

COVERAGE_BINS = 10


# ------------------------------------------------------------------------------------------ stats
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

    from cameo_corr.pipeline.cache import MANIFEST_DIR, SHARDS_DIR, TMP_PREFIX, finished_shard_ids, shard_id_of_name

    if bins < 1:
        raise ValueError(f"--bins must be >= 1, got {bins}")
    if selection:
        from cameo_corr.pipeline.sharing import selected_manifest

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
    finished = finished_shard_ids(loc)
    orphans = [
        n for folder in (SHARDS_DIR, MANIFEST_DIR) for n in loc.listdir(folder)
        if n.startswith(TMP_PREFIX) or (folder == SHARDS_DIR and shard_id_of_name(n) is not None and shard_id_of_name(n) not in finished)
    ]
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
    from cameo_corr.pipeline.cache import window_fractions

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


# ------------------------------------------------------------------------------------------ verify
def check_window_consistency(arrays: dict[str, np.ndarray], tau: float, grid: tuple[int, int]) -> list[str]:
    """Problems of one window's arrays beyond dtypes/shapes: diagonal, nn targets, cycle masks."""
    problems = []
    h, w = grid
    hw = h * w
    valid = np.asarray(arrays["valid"]).reshape(-1, hw)
    nn = np.asarray(arrays["nn"]).astype(np.int64)
    mask = np.asarray(arrays["mask"])
    dist = np.asarray(arrays["dist"])
    S = valid.shape[0]
    ident = np.arange(hw)
    xy = token_coords(grid)
    for i in range(S):
        if not np.array_equal(nn[i, i], ident):
            problems.append(f"nn[{i},{i}] is not the identity")
        if not np.array_equal(mask[i, i], valid[i]):
            problems.append(f"mask[{i},{i}] differs from valid[{i}]")
        if np.any(dist[i, i] != 0):
            problems.append(f"dist[{i},{i}] is not 0")
    for i in range(S):
        for j in range(S):
            if i == j:
                continue
            queries = valid[i] & valid[j].any()
            bad_target = queries & ~valid[j][nn[i, j]]
            if bad_target.any():
                problems.append(f"nn[{i},{j}] points at invalid tokens of view {j} for {int(bad_target.sum())} queries")
            cycle = nn[j, i][nn[i, j]]
            d2 = ((xy - xy[cycle]) ** 2).sum(-1)
            expected = queries & (d2 <= tau * tau + 1e-9)
            wrong = expected != mask[i, j]
            if wrong.any():
                problems.append(
                    f"mask[{i},{j}] disagrees with the cycle test (|p(x) - p(nn_ji[nn_ij[x]])| <= {tau}) "
                    f"at {int(wrong.sum())} tokens"
                )
    return problems


@dataclass
class VerifyReport:
    """What :func:`verify_report` found: ``problems`` (empty: consistent), how many ok windows were
    checked of ``windows_ok``, and ``corrupt`` (windows whose chunks fail their checksum or decoding,
    as ``(window id or None for a whole shard, shard id, array or None)``)."""

    problems: list[str] = field(default_factory=list)
    checked: int = 0
    windows_ok: int = 0
    corrupt: list[tuple[str | None, str, str | None]] = field(default_factory=list)


def _manifest_problems(table: "pa.Table") -> tuple[list[str], np.ndarray]:
    """Row-level manifest problems (vectorised over all rows) and the mask of well-formed ok rows."""
    from cameo_corr.pipeline.cache import id_array

    import pyarrow.compute as pc

    def mask(arr: Any) -> np.ndarray:
        return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=bool)

    status = table.column("status")
    shard_null, row_null = mask(table.column("shard").is_null()), mask(table.column("row").is_null())
    error = table.column("error")
    error_null = mask(error.is_null())
    error_empty = error_null | mask(pc.equal(error.fill_null(""), ""))
    ids = id_array(table.column("window_id"))
    problems: list[str] = []
    srt = np.sort(ids)
    dup = np.unique(srt[1:][srt[1:] == srt[:-1]]) if len(srt) > 1 else srt[:0]
    problems += [f"window {w.decode()}: {int((ids == w).sum())} manifest rows" for w in dup]
    is_ok, is_failed = mask(pc.equal(status, "ok").fill_null(False)), mask(pc.equal(status, "failed").fill_null(False))
    for i in np.flatnonzero(~(is_ok | is_failed)):
        problems.append(f"window {ids[i].decode()}: unknown status {status[int(i)].as_py()!r}")
    for i in np.flatnonzero(is_failed & ~(shard_null & row_null & ~error_empty)):
        problems.append(f"window {ids[i].decode()}: failed row must have shard/row null and an error")
    bad_ok = is_ok & (shard_null | row_null | ~error_null)
    for i in np.flatnonzero(bad_ok):
        problems.append(f"window {ids[i].decode()}: ok row must have shard and row and no error")
    return problems, is_ok & ~bad_ok


def find_corrupt_windows(cache: "CorrCache", shard_ids: Sequence[str] | None = None) -> list["CorruptCacheError"]:
    """Decode every chunk of every array of the given (default: all finished) shards and return one
    :class:`~cameo_corr.pipeline.cache.CorruptCacheError` per bad window (or per unreadable shard)."""
    import pyarrow.compute as pc

    from cameo_corr.pipeline.cache import CorruptCacheError

    if shard_ids is None:
        column = cache.manifest("ok", columns=["shard"]).column("shard")
        shard_ids = sorted(pc.unique(column).to_pylist())
    bad: list[CorruptCacheError] = []
    for sid in shard_ids:
        try:
            bad += cache.corrupt_windows(sid)
        except CorruptCacheError as e:
            bad.append(e)
    return bad


def repair_corrupt_shards(cache: "CorrCache") -> dict[str, list[str]]:
    """Find the corrupt windows (every chunk of every shard decoded) and drop their shards
    (:func:`~cameo_corr.pipeline.cache.drop_shards`), so the next ``preprocess`` run recomputes
    their windows. Returns ``{"shards": [...], "windows": [window ids whose rows were removed]}``."""
    from cameo_corr.pipeline.cache import drop_shards

    shards = sorted({e.shard for e in find_corrupt_windows(cache)})
    windows = drop_shards(cache.location, shards)
    cache.refresh()
    return {"shards": shards, "windows": windows}


def verify_cache(cache: "CorrCache", *, max_windows: int | None = None, deep: bool = False,
                 grids: Sequence[tuple[int, int]] | None = None) -> list[str]:
    """All problems found in the cache (empty list: the cache is consistent); see :func:`verify_report`."""
    return verify_report(cache, max_windows=max_windows, deep=deep, grids=grids).problems


def verify_report(cache: "CorrCache", *, max_windows: int | None = None, deep: bool = False,
                  grids: Sequence[tuple[int, int]] | None = None, selection: "WindowSelection | None" = None) -> VerifyReport:
    """Check the cache (see the module docstring); streams shard by shard.

    The arrays of every grid in ``grids`` (default: every grid the cache stores) are checked; the
    manifest's ``valid_frac``/``mask_frac`` against the primary grid's.
    The manifest checks read only ``window_id``, ``status``, ``shard``, ``row``, ``error`` of all rows.
    Then shards are visited in id order until ``max_windows`` ok windows were checked: each shard is
    opened and decoded once, and only the manifest rows of the visited shards are read in full. A
    corrupt chunk is a problem naming its window (it does not stop the check). ``deep`` also decodes
    every chunk of every shard, whatever ``max_windows``, and lists the bad windows in ``corrupt``.
    With ``selection`` only the selected windows (and, with ``deep``, the shards holding them) are checked.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from cameo_corr.pipeline.cache import CorruptCacheError, read_manifest, window_fractions
    from cameo_corr.schemas import CACHE_ARRAYS, CameoCorrError, validate_window_arrays

    if max_windows is not None and max_windows < 1:
        raise ValueError(f"--max-windows must be >= 1, got {max_windows}")
    cfg = cache.config
    primary = tuple(cfg.grid)
    check = [cache.select_grid(g) for g in (cfg.grids if grids is None else grids)]
    light_columns = ["window_id", "status", "shard", "row", "error"]
    if selection:
        from cameo_corr.pipeline.sharing import selected_manifest

        light = selected_manifest(cache, selection, None, light_columns)
        # rows of every ok window (selected or not) that the shards' rows are checked against
        referenced: dict[str, set[int]] = {}
        for sid, r in zip(*cache.manifest("ok", columns=["shard", "row"]).to_pydict().values()):
            referenced.setdefault(sid, set()).add(r)
    else:
        light = cache.manifest(None, columns=light_columns)
    report = VerifyReport()
    report.problems, ok_mask = _manifest_problems(light)
    ok = light.filter(pa.array(ok_mask))
    report.windows_ok = ok.num_rows
    counts = pc.value_counts(ok.column("shard")).to_pylist()
    sizes = dict(sorted((c["values"], c["counts"]) for c in counts))
    visit: list[str] = []
    budget = max_windows
    for sid, size in sizes.items():
        if budget is not None and budget <= 0:
            break
        visit.append(sid)
        if budget is not None:
            budget -= size
    wanted = ok.filter(pc.is_in(ok.column("shard"), pa.array(visit, pa.string()))).column("window_id")
    columns = ["window_id", "status", "shard", "row", "num_views", "frame_ids", "valid_frac", "mask_frac"]
    if max_windows is None:
        expr = selection.expression() if selection else None
        full = read_manifest(cache.location, columns=columns, filter=pc.field("status") == "ok" if expr is None else (pc.field("status") == "ok") & expr)
    else:
        full = read_manifest(cache.location, columns=columns, filter=pc.field("window_id").isin(wanted.combine_chunks()))
    rows_by_shard: dict[str, list[dict[str, Any]]] = {}
    for r in full.to_pylist():
        if r["status"] == "ok" and r["shard"] in sizes:
            rows_by_shard.setdefault(r["shard"], []).append(r)
    for shard_id in visit:
        shard_rows = sorted(rows_by_shard.get(shard_id, []), key=lambda r: r["row"])
        for r in shard_rows:
            if r["num_views"] != cfg.views or len(r["frame_ids"]) != cfg.views:
                report.problems.append(f"window {r['window_id']}: {r['num_views']} views / {len(r['frame_ids'])} frame ids, "
                                       f"cache has S={cfg.views}")
        try:
            group = cache.open_shard(shard_id)
        except CameoCorrError as e:
            report.problems.append(f"shard {shard_id}: {e}")
            continue
        ids = list(group.attrs.get("window_ids", []))
        shapes = {key: group[key].shape for key in cfg.stored_keys()}
        W = shapes["nn"][0]
        if len(ids) != W or any(shape[0] != W for shape in shapes.values()):
            report.problems.append(f"shard {shard_id}: window_ids attribute and array lengths disagree")
            continue
        unreferenced = sorted(set(range(W)) - (referenced.get(shard_id, set()) if selection else {r["row"] for r in shard_rows}))
        if unreferenced:
            report.problems.append(f"shard {shard_id}: rows {unreferenced} have no manifest row")
        try:
            data: dict[tuple[int, int], dict[str, np.ndarray]] | None = {g: cache.read_shard(shard_id, grid=g) for g in check}
            bad_rows: set[int] = set()
        except CorruptCacheError:
            data, errors = None, cache.corrupt_windows(shard_id)
            report.problems += [str(e) for e in errors]
            report.corrupt += [(e.window, e.shard, e.array) for e in errors]
            bad_rows = {ids.index(e.window) for e in errors if e.window in ids}
        for r in shard_rows:
            if max_windows is not None and report.checked >= max_windows:
                break
            report.checked += 1
            where = f"window {r['window_id']} (shard {shard_id} row {r['row']})"
            k = r["row"]
            if not 0 <= k < W:
                report.problems.append(f"{where}: row outside the shard's {W} windows")
                continue
            if ids[k] != r["window_id"]:
                report.problems.append(f"{where}: shard row holds window {ids[k]}")
                continue
            if k in bad_rows:
                continue
            for g in check:
                if data is not None:
                    arrays = {n: data[g][n][k] for n in CACHE_ARRAYS}
                else:
                    arrays = cache.read_row(shard_id, k, r["window_id"], grid=g)
                at = where if len(cfg.grids) == 1 else f"{where} grid {g[0]}x{g[1]}"
                try:
                    validate_window_arrays(arrays, cfg.views, g, where=at)
                except CameoCorrError as e:
                    report.problems.append(str(e))
                    continue
                report.problems += [f"{at}: {p}" for p in check_window_consistency(arrays, cfg.tau, g)]
                if g != primary:
                    continue
                valid_frac, mask_frac = window_fractions(arrays)
                if abs(valid_frac - r["valid_frac"]) > 1e-6 or abs(mask_frac - r["mask_frac"]) > 1e-6:
                    report.problems.append(
                        f"{where}: manifest valid_frac/mask_frac {r['valid_frac']:.6f}/{r['mask_frac']:.6f} != arrays "
                        f"{valid_frac:.6f}/{mask_frac:.6f}"
                    )
    if deep:
        seen = {(w, sh, a) for w, sh, a in report.corrupt}
        visited = set(visit) if set(check) == set(cfg.grids) else set()  # --deep decodes the grids not checked too
        for e in find_corrupt_windows(cache, [s for s in sizes if s not in visited]):
            if (e.window, e.shard, e.array) not in seen:
                report.problems.append(str(e))
                report.corrupt.append((e.window, e.shard, e.array))
    return report


# ------------------------------------------------------------------------------------------ viz
def load_window_images(cache: "CorrCache", window_id: str) -> np.ndarray:
    """``[S, size, size, 3]`` uint8 canonical views of a cached window, read from its dataset."""
    from cameo_corr.datasets.canonical import load_window
    from cameo_corr.schemas import DatasetError, WindowRecord

    row = cache.row(window_id)
    reader = cache.reader()
    scene = reader.scene(row["scene_id"])
    by_id = {f.frame_id: f for f in scene.frames}
    missing = [f for f in row["frame_ids"] if f not in by_id]
    if missing:
        raise DatasetError(str(reader.root), f"frames {missing} of window {window_id} are no longer in the dataset", scene_id=row["scene_id"])
    record = WindowRecord(window_id, row["dataset"], row["split"], row["scene_id"], tuple(by_id[f] for f in row["frame_ids"]))
    return load_window(reader, record, cache.view()).images


MATCH_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")
"""Marker colours of the drawn matches (matplotlib's tab10), cycled; each marker also carries its number."""
STATUS_COLORS = {"matched": "#0072B2", "unmatched": "#E69F00", "invalid": "#000000"}
"""Token status overlay (Okabe-Ito blue / orange, readable with colour-vision deficiencies; black = no geometry)."""
DEFAULT_MATCHES = 10


def spread_matches(queries: np.ndarray, targets: np.ndarray, grid: tuple[int, int], count: int) -> np.ndarray:
    """Up to ``count`` of the query token indices ``queries`` (matched to ``targets`` in the key view),
    spread over both views; returned in row-major order of the query.

    Farthest-point sampling in both views at once: a candidate's distance to the picks is the smaller
    of its query-view and key-view distances, and the image borders count as picks, so the markers
    keep away from each other and from the edges in both views (the first pick is the most central).
    """
    queries = np.asarray(queries, dtype=np.int64)
    if len(queries) <= count:
        return queries
    h, w = grid
    xy = token_coords(grid).astype(np.float64)
    q, k = xy[queries], xy[np.asarray(targets, dtype=np.int64)]

    def border(p: np.ndarray) -> np.ndarray:
        return np.minimum.reduce([p[:, 0] + 0.5, w - 0.5 - p[:, 0], p[:, 1] + 0.5, h - 0.5 - p[:, 1]]) ** 2

    d2 = np.minimum(border(q), border(k))
    chosen: list[int] = []
    while len(chosen) < count:
        c = int(np.argmax(d2))
        chosen.append(c)
        d2 = np.minimum(d2, np.minimum(((q - q[c]) ** 2).sum(-1), ((k - k[c]) ** 2).sum(-1)))
    return np.sort(queries[chosen])


def pair_coverage(mask: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``[S, S]`` share of view i's *valid* tokens with a cycle-consistent match in view j (NaN on the
    diagonal and for views without a valid token): the one denominator the whole picture uses."""
    S = mask.shape[0]
    n_valid = valid.reshape(S, -1).sum(axis=1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        cover = mask.sum(axis=2) / n_valid[:, None]
    cover[np.eye(S, dtype=bool)] = np.nan
    return cover


def render_viz(
    cache: "CorrCache", window_id: str, out: str | Path, *, pair: tuple[int, int] = (0, 1), matches: int = DEFAULT_MATCHES,
    grid: tuple[int, int] | None = None,
) -> Path:
    """Write the correspondence picture of one window to ``out`` (PNG).

    Top: query view ``i`` and key view ``j`` as two labelled panels; ``matches`` numbered, well-spread
    cycle-consistent query tokens of view i and their nearest neighbours in view j, joined across the
    gap. Bottom left: every token of view i by status for key view j (matched / valid without a
    consistent match / no geometry). Bottom right: the same share for every view pair. Every share
    is over the query view's *valid* tokens, so the title, the status counts and the highlighted
    cell of the matrix agree. ``grid`` picks the token grid of a multi-grid cache (default: the primary one).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap, to_rgba
    from matplotlib.lines import Line2D
    from matplotlib.patches import ConnectionPatch, Patch, Rectangle

    grid = cache.select_grid(grid)
    arrays = cache.window(window_id, grid=grid)
    row = cache.row(window_id)
    images = load_window_images(cache, window_id)
    S, size = images.shape[0], images.shape[1]
    i, j = pair
    if not (0 <= i < S and 0 <= j < S and i != j):
        raise ValueError(f"pair {pair} must be two different views in [0, {S})")
    if matches < 1:
        raise ValueError(f"matches must be >= 1, got {matches}")
    h, w = grid
    hw = h * w
    nn, mask, valid = arrays["nn"].astype(np.int64), np.asarray(arrays["mask"]), np.asarray(arrays["valid"]).reshape(S, hw)
    xy = token_coords((h, w))
    centres = np.stack([(xy[:, 0] + 0.5) * size / w, (xy[:, 1] + 0.5) * size / h], axis=-1)
    n_valid, n_masked = int(valid[i].sum()), int(mask[i, j].sum())
    masked = np.flatnonzero(mask[i, j])
    shown = spread_matches(masked, nn[i, j, masked], (h, w), matches)
    frames = row["frame_ids"]

    fig = plt.figure(figsize=(12, 11.5))
    outer = fig.add_gridspec(2, 1, height_ratios=[1, 1], hspace=0.2, left=0.04, right=0.96, top=0.85, bottom=0.09)
    top = outer[0].subgridspec(1, 2, wspace=0.12)
    bottom = outer[1].subgridspec(1, 2, wspace=0.3)
    fig.suptitle(f"window {window_id}  ·  {row['dataset']} scene {row['scene_id']}  ·  {S} views, {h}x{w} tokens, "
                 f"tau={cache.config.tau:g}", fontsize=13, fontweight="bold")
    share = f" ({100 * n_masked / n_valid:.1f}%)" if n_valid else ""
    fig.text(0.5, 0.905, f"view {i} -> view {j}: {n_masked} of {n_valid} valid query tokens{share} have a cycle-consistent match\n"
             + (f"{len(shown)} of them spread over view {i}: circle n on the left is a query token, circle n on the right "
                f"its nearest 3D point in view {j}" if len(shown) else "no match to draw"),
             ha="center", va="center", fontsize=11, linespacing=1.5)

    ax_i, ax_j = fig.add_subplot(top[0, 0]), fig.add_subplot(top[0, 1])
    for ax, v, role in ((ax_i, i, "query"), (ax_j, j, "key")):
        ax.imshow(images[v], extent=(0, size, size, 0))
        ax.set_title(f"{role} view {v}  (frame {frames[v]})", fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_linewidth(2)
    for k, x in enumerate(shown):  # figure-level artists: lines over both panels, markers over the lines
        color = MATCH_COLORS[k % len(MATCH_COLORS)]
        (u0, v0), (u1, v1) = centres[x], centres[nn[i, j, x]]
        fig.add_artist(ConnectionPatch((u0, v0), (u1, v1), "data", "data", axesA=ax_i, axesB=ax_j, color=color,
                                       linewidth=1.3, alpha=0.7, zorder=3))
        for ax, (u, v) in ((ax_i, (u0, v0)), (ax_j, (u1, v1))):
            fig.add_artist(Line2D([u], [v], transform=ax.transData, marker="o", markersize=15, markerfacecolor=color,
                                  markeredgecolor="white", markeredgewidth=1.5, zorder=4))
            fig.text(u, v, str(k + 1), transform=ax.transData, ha="center", va="center", fontsize=8, fontweight="bold",
                     color="white", zorder=5)

    status = np.where(mask[i, j], 0, np.where(valid[i], 1, 2)).reshape(h, w)
    counts = [int((status == s).sum()) for s in range(3)]
    ax = fig.add_subplot(bottom[0, 0])
    gray = images[i].astype(np.float64).mean(axis=-1)
    ax.imshow(gray, extent=(0, size, size, 0), cmap="gray", vmin=0, vmax=255)
    cmap = ListedColormap([to_rgba(STATUS_COLORS[k]) for k in ("matched", "unmatched", "invalid")])
    ax.imshow(status, extent=(0, size, size, 0), cmap=cmap, vmin=-0.5, vmax=2.5, alpha=0.55, interpolation="nearest")
    ax.set_title(f"tokens of view {i}, matched in view {j}?", fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(handles=[
        Patch(color=STATUS_COLORS["matched"], alpha=0.7, label=f"cycle-consistent match ({counts[0]})"),
        Patch(color=STATUS_COLORS["unmatched"], alpha=0.7, label=f"valid, no consistent match ({counts[1]})"),
        Patch(color=STATUS_COLORS["invalid"], alpha=0.7, label=f"no geometry, not a query ({counts[2]})"),
    ], loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=1, fontsize=9, frameon=False)

    cover = pair_coverage(mask, valid)
    ax = fig.add_subplot(bottom[0, 1])
    cmap = plt.get_cmap("viridis").with_extremes(bad="#d9d9d9")
    im = ax.imshow(np.ma.masked_invalid(cover), vmin=0, vmax=1, cmap=cmap)
    for a in range(S):
        for b in range(S):
            text = "self" if a == b else ("-" if np.isnan(cover[a, b]) else f"{cover[a, b]:.2f}")
            dark = a == b or np.isnan(cover[a, b]) or cover[a, b] > 0.6
            ax.text(b, a, text, ha="center", va="center", fontsize=9 if S <= 8 else 6, color="black" if dark else "white")
    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#d62728", linewidth=3))
    ax.set_xticks(range(S))
    ax.set_yticks(range(S))
    ax.set_xlabel("key view j")
    ax.set_ylabel("query view i")
    ax.set_title("all view pairs: matched share of valid query tokens", fontsize=11)
    fig.colorbar(im, ax=ax, shrink=0.8, label="matched / valid query tokens")
    ax.legend(handles=[Line2D([], [], color="#d62728", linewidth=3, label=f"the pair drawn above ({i} -> {j})")],
              loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=9, frameon=False)

    png = io.BytesIO()  # rendered in memory, then written: a failed write (full disk) raises instead of being lost
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        out.write_bytes(png.getvalue())
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(out)) from e  # name the file (a failed write does not)
    return out


# ------------------------------------------------------------------------------------------ CLI
def _open(args: argparse.Namespace) -> "CorrCache":
    from cameo_corr.pipeline.cache import CorrCache

    return CorrCache(args.cache, dict(args.storage_option) or None)


def _selection(args: argparse.Namespace) -> "WindowSelection":
    """The window selection of the ``--split``/``--scenes``/``--min-mask-frac`` flags."""
    from cameo_corr.pipeline.sharing import WindowSelection

    if args.min_mask_frac is not None and not 0.0 <= args.min_mask_frac <= 1.0:
        raise ValueError(f"--min-mask-frac must be in [0, 1], got {args.min_mask_frac}")
    if args.scenes is not None:
        from cameo_corr.pipeline.sharing import read_scene_list

        read_scene_list(args.scenes)  # a bad file is reported before any cache is read
    return WindowSelection(args.split, args.scenes, args.min_mask_frac)


def cli_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a ``cameo-corr cache <command>`` handler so that a bad option value or a missing key
    (``ValueError``/``KeyError``) is reported as a usage error; :func:`cameo_corr.cli.main` turns it,
    like every other error, closed pipe and full disk, into one line and an exit code."""
    import functools

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        from cameo_corr.cli import UsageError

        try:
            return handler(args)
        except (ValueError, KeyError) as e:
            text = e.args[0] if isinstance(e, KeyError) and e.args else e
            raise UsageError(str(text)) from e

    return run


@cli_errors
def _stats(args: argparse.Namespace) -> int:
    if args.bins < 1:
        raise ValueError(f"--bins must be >= 1, got {args.bins}")
    stats = cache_stats(_open(args), bins=args.bins, grid=args.grid, selection=_selection(args))
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


@cli_errors
def _verify(args: argparse.Namespace) -> int:
    if args.max_windows is not None and args.max_windows < 1:
        raise ValueError(f"--max-windows must be >= 1, got {args.max_windows}")
    selection = _selection(args)
    cache = _open(args)
    report = verify_report(cache, max_windows=args.max_windows, deep=args.deep, grids=args.grid, selection=selection)
    where = cache.location.display
    if report.problems:
        print(f"{len(report.problems)} problem(s) in {where}:", file=sys.stderr)
        for p in report.problems:
            print(f"  {p}", file=sys.stderr)
        if report.corrupt:
            print(f"corrupt windows: {len(report.corrupt)} (recompute them with `cameo-corr preprocess --repair`)", file=sys.stderr)
        return 1
    if report.windows_ok == 0:
        print(f"cameo-corr cache verify: error: no ok window to verify in {where} "
              f"({cache.manifest(None, columns=['window_id']).num_rows} manifest rows)", file=sys.stderr)
        return 1
    grids = ", ".join(f"{h}x{w}" for h, w in (cache.config.grids if args.grid is None else args.grid))
    print(f"ok: {report.checked} of {report.windows_ok} windows verified in {where} (grid {grids})"
          + (", every chunk decoded" if args.deep else "") + (f" (selection: {selection.describe()})" if selection else ""))
    return 0


@cli_errors
def _compact(args: argparse.Namespace) -> int:
    from cameo_corr.pipeline.cache import consolidate_manifest
    from cameo_corr.pipeline.lease import CacheLease

    cache = _open(args)
    # the cache's lease: a running job consolidates too (periodically and at its end), never both at once
    with CacheLease(cache.location, force=args.force).acquire():
        info = consolidate_manifest(cache.location, full=True)
    print(f"manifest of {cache.location.display}: {info['rows']} rows in {len(info['files'])} file(s), "
          f"{len(info['fragments'])} shard fragments merged")
    return 0


@cli_errors
def _merge(args: argparse.Namespace) -> int:
    from cameo_corr.cli import UsageError
    from cameo_corr.pipeline.sharing import merge_caches

    if len(args.caches) < 2:
        raise UsageError(f"merge needs at least two caches, got {len(args.caches)}", where="command line")
    report = merge_caches(args.caches, args.out, selection=_selection(args), storage_options=dict(args.storage_option) or None,
                          command=" ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]))
    print(report.summary())
    return 0


@cli_errors
def _migrate(args: argparse.Namespace) -> int:
    from cameo_corr.pipeline.cache import migrate_cache

    counts = migrate_cache(args.cache, args.out, storage_options=dict(args.storage_option) or None)
    print(f"migrated {counts['windows']} manifest rows and {counts['shards']} shards to {args.out} (schema version 2)")
    return 0


def _viz(args: argparse.Namespace) -> int:
    from cameo_corr.cli import UsageError

    cache = _open(args)
    where = cache.location.display
    if args.matches < 1:
        raise UsageError(f"--matches must be at least 1, got {args.matches}", where="command line")
    selection = _selection(args)
    if selection:
        from cameo_corr.pipeline.sharing import selected_manifest

        ok = sorted(selected_manifest(cache, selection, "ok", ["window_id"]).column("window_id").to_pylist())
    else:
        ok = cache.window_ids()
    if args.window is None:
        if not ok:
            table = cache.manifest(None)
            raise UsageError(f"no ok window to draw ({table.num_rows} windows in the manifest, none ok; see "
                             "'cameo-corr cache stats' for the failures)", where=where)
        window = ok[0]
    elif args.window in ok:
        window = args.window
    else:
        failed = dict(zip(*cache.manifest(None).select(["window_id", "error"]).to_pydict().values()))
        if args.window in failed:
            what = f"window {args.window!r} failed ({failed[args.window]}), there is nothing to draw"
        elif selection and args.window in cache.window_ids():
            what = f"window {args.window!r} is not in the selection ({selection.describe()})"
        elif ok:
            listed = ", ".join(ok[:5]) + (f", ... ({len(ok)} in all)" if len(ok) > 5 else "")
            what = f"no ok window {args.window!r}; valid ids: {listed}"
        else:
            what = f"no ok window {args.window!r}; the cache has no ok window"
        raise UsageError(what, where=where)
    S = cache.config.views
    i, j = args.pair
    if not (0 <= i < S and 0 <= j < S and i != j):
        raise UsageError(f"--pair {i} {j}: need two different views in 0..{S - 1} (windows of this cache have S={S} views)",
                         where=where)
    try:
        grid = cache.select_grid(args.grid)
    except ValueError as e:
        raise UsageError(str(e), where=where) from None
    out = render_viz(cache, window, args.out, pair=(i, j), matches=args.matches, grid=grid)
    print(f"wrote {out}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cameo-corr cache {stats,verify,viz,compact,migrate,merge}``."""
    from cameo_corr.pipeline.ray_job import grid_arg, grids_arg, key_value_arg

    parser = subparsers.add_parser("cache", help="inspect, verify or visualise a correspondence cache")
    sub = parser.add_subparsers(dest="cache_command", metavar="{stats,verify,viz,compact,migrate,merge}", required=True)

    def common(p: argparse.ArgumentParser, positional: bool = True) -> None:
        if positional:
            p.add_argument("cache", help="cache directory or fsspec URL")
        p.add_argument("--storage-option", action="append", type=key_value_arg, default=[], metavar="KEY=VALUE",
                       help="fsspec storage option (JSON value), repeatable")

    def subset(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("window selection (manifest predicates, combined with 'and')")
        g.add_argument("--split", default=None, help="only windows of this dataset split")
        g.add_argument("--scenes", default=None, metavar="FILE", help="only windows of the scenes listed in FILE (one scene id per line)")
        g.add_argument("--min-mask-frac", type=float, default=None, metavar="X",
                       help="only windows with at least this share of masked query tokens (manifest mask_frac)")

    p = sub.add_parser("stats", help="windows, scenes, failures, mask coverage histogram, bytes")
    common(p)
    p.add_argument("--bins", type=int, default=COVERAGE_BINS, help="histogram bins (default: 10)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--grid", type=grid_arg, default=None, metavar="SIDE",
                   help="token grid the valid/mask shares describe, 32 or 32x16 (default: the primary grid)")
    subset(p)
    p.set_defaults(func=_stats)

    p = sub.add_parser("verify", help="check manifest <-> shards, schema, nn diagonal and cycle masks; exit 1 on problems")
    common(p)
    p.add_argument("--max-windows", type=int, default=None, help="check at most this many ok windows (streams shard by shard)")
    p.add_argument("--deep", action="store_true", help="also decode every chunk of every shard and list the corrupt windows")
    p.add_argument("--grid", type=grids_arg, default=None, metavar="SIDES",
                   help="check these grids' arrays, comma-separated (default: every grid the cache stores)")
    subset(p)
    p.set_defaults(func=_verify)

    p = sub.add_parser("compact", help="merge the manifest fragments into sorted Parquet files (also done at job end)")
    common(p)
    p.add_argument("--force", action="store_true",
                   help="take the cache's lease even if a job renewed it recently (only when that job is dead)")
    p.set_defaults(func=_compact)

    p = sub.add_parser("migrate", help="convert a schema version 1 cache into a new version 2 cache")
    common(p)
    p.add_argument("--out", required=True, help="directory or URL of the new cache")
    p.set_defaults(func=_migrate)

    p = sub.add_parser("viz", help="PNG: two views with numbered matches, token status map, pair coverage matrix",
                       description="Draw one window: a few well-spread cycle-consistent matches between two views, the "
                       "query view's tokens by status, and the matched share of valid query tokens for every view pair.")
    common(p)
    p.add_argument("--window", default=None, help="ok window id (default: the first ok window)")
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--pair", type=int, nargs=2, default=(0, 1), metavar=("I", "J"),
                   help="query and key view, two different numbers in 0..S-1 (default: 0 1)")
    p.add_argument("--matches", type=int, default=DEFAULT_MATCHES,
                   help=f"matches to draw, spread over the query view (default: {DEFAULT_MATCHES})")
    p.add_argument("--grid", type=grid_arg, default=None, metavar="SIDE",
                   help="token grid to draw, 32 or 32x16 (default: the primary grid)")
    subset(p)
    p.set_defaults(func=_viz)

    p = sub.add_parser("merge", help="union of caches of one config into a new cache (shards hard-linked where possible)",
                       description="Write the union of caches with equal cache.json identities into a new cache OUT: shard "
                       "files are hard-linked on a local filesystem (copied where a link is impossible, e.g. across "
                       "devices, and on object stores), a window present in several inputs is taken once (an ok row "
                       "supersedes a failed one), the manifest is consolidated and cache.json records the sources.")
    p.add_argument("caches", nargs="+", metavar="CACHE", help="two or more cache directories or URLs (earlier ones win ties)")
    p.add_argument("--out", required=True, help="new cache directory or URL (must not exist or be empty)")
    common(p, positional=False)
    subset(p)
    p.set_defaults(func=_merge)


__all__ = [
    "cache_stats",
    "format_stats",
    "check_window_consistency",
    "VerifyReport",
    "find_corrupt_windows",
    "repair_corrupt_shards",
    "verify_cache",
    "verify_report",
    "cli_errors",
    "load_window_images",
    "spread_matches",
    "pair_coverage",
    "render_viz",
    "register_cli",
]
