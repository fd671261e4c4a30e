"""``cameo-corr cache stats|verify|viz|compact|migrate``: inspect, check, picture and maintain a cache.

* ``stats``: windows (ok / failed), scenes, shards, mask coverage histogram, valid-token share, bytes
  on disk (shard sizes recorded at write time) and per window, the most common failure reasons,
  orphans left by killed workers. Reads only the manifest columns it needs.
* ``verify``: every ok manifest row has its shard row (the shard's ``window_ids`` attribute agrees),
  every shard row is referenced once, shapes and dtypes match the schema
  (:func:`~cameo_corr.schemas.validate_window_arrays`), ``nn`` diagonal is the identity, masks are
  consistent with ``nn`` (``mask_ij[x]`` exactly when ``x`` is valid, view j has a valid token and the
  cycle ``nn_ji[nn_ij[x]]`` lands within ``tau`` tokens of ``x``), ``nn`` only points at valid tokens,
  and the manifest's ``valid_frac``/``mask_frac`` match the arrays; chunks failing their checksum are
  listed by window. Streams shard by shard (``--max-windows`` reads only what it checks); ``--deep``
  decodes every chunk of every shard. Exits 1 listing the problems, or when no ok window exists.
* ``compact``: consolidate the manifest fragments; ``migrate``: version 1 cache -> version 2 copy.
* ``viz``: a PNG with two views side by side and lines between corresponding tokens (masked ones,
  coloured by the query token's grid position), the view-pair mask coverage matrix and the per-token
  coverage of the first view. Images come from the dataset through ``CorrCache.reader()`` and
  ``CorrCache.view()``, i.e. the same canonical crop the cache was computed on.
"""

from __future__ import annotations

import argparse
import json
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

COVERAGE_BINS = 10


# ------------------------------------------------------------------------------------------ stats
STATS_COLUMNS = ("scene_id", "shard", "status", "valid_frac", "mask_frac", "error", "shard_bytes")


def cache_stats(cache: "CorrCache", *, bins: int = COVERAGE_BINS) -> dict[str, Any]:
    """Summary numbers of a cache (see the module docstring).

    Reads only the manifest columns it needs and computes with Arrow/numpy. Shard bytes are the sizes
    recorded at write time (``shard_bytes``); for version 1 caches, which did not record them, the
    shards folder is walked (``bytes_source`` says which).
    """
    import pyarrow.compute as pc

    from cameo_corr.pipeline.cache import MANIFEST_DIR, SHARDS_DIR, TMP_PREFIX, finished_shard_ids, shard_id_of_name

    if bins < 1:
        raise ValueError(f"--bins must be >= 1, got {bins}")
    table = cache.manifest(None, columns=list(STATS_COLUMNS))
    is_ok = pc.equal(table.column("status"), "ok")
    ok = table.filter(is_ok)
    failed = table.filter(pc.equal(table.column("status"), "failed"))
    mask_frac = ok.column("mask_frac").to_numpy().astype(np.float64)
    valid_frac = ok.column("valid_frac").to_numpy().astype(np.float64)
    counts, edges = np.histogram(mask_frac, bins=bins, range=(0.0, 1.0))
    errors = failed.column("error").to_pylist()
    reasons = Counter((e or "").split(":", 1)[0] for e in errors)
    loc = cache.location
    finished = finished_shard_ids(loc)
    orphans = [
        n for folder in (SHARDS_DIR, MANIFEST_DIR) for n in loc.listdir(folder)
        if n.startswith(TMP_PREFIX) or (folder == SHARDS_DIR and shard_id_of_name(n) is not None and shard_id_of_name(n) not in finished)
    ]
    if ok.num_rows and ok.column("shard_bytes").null_count == 0:
        per_shard = ok.group_by("shard").aggregate([("shard_bytes", "max")])
        shard_bytes, source = int(pc.sum(per_shard.column("shard_bytes_max")).as_py() or 0), "recorded"
    elif ok.num_rows:
        shard_bytes, source = loc.disk_usage(SHARDS_DIR), "measured"
    else:
        shard_bytes, source = 0, "recorded"
    manifest_bytes = loc.disk_usage(MANIFEST_DIR)
    n_ok, n_failed = ok.num_rows, failed.num_rows
    return {
        "path": loc.display,
        "schema_version": cache.version,
        "views": cache.config.views,
        "grid": list(cache.config.grid),
        "tau": cache.config.tau,
        "backend": cache.config.backend.get("name"),
        "windows_ok": n_ok,
        "windows_failed": n_failed,
        "scenes_ok": int(pc.count_distinct(ok.column("scene_id")).as_py()),
        "scenes_total": int(pc.count_distinct(table.column("scene_id")).as_py()),
        "shards": int(pc.count_distinct(ok.column("shard")).as_py()),
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


def format_stats(stats: dict[str, Any]) -> str:
    """Text report of :func:`cache_stats` with a bar chart of the mask coverage histogram."""
    h = stats["mask_frac_histogram"]
    top = max(h["counts"]) if h["counts"] and max(h["counts"]) else 1
    lines = [
        f"cache {stats['path']} (schema version {stats['schema_version']}): S={stats['views']} "
        f"grid={stats['grid'][0]}x{stats['grid'][1]} tau={stats['tau']} backend={stats['backend']}",
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


def verify_cache(cache: "CorrCache", *, max_windows: int | None = None, deep: bool = False) -> list[str]:
    """All problems found in the cache (empty list: the cache is consistent); see :func:`verify_report`."""
    return verify_report(cache, max_windows=max_windows, deep=deep).problems


def verify_report(cache: "CorrCache", *, max_windows: int | None = None, deep: bool = False) -> VerifyReport:
    """Check the cache (see the module docstring); streams shard by shard.

    The manifest checks read only ``window_id``, ``status``, ``shard``, ``row``, ``error`` of all rows.
    Then shards are visited in id order until ``max_windows`` ok windows were checked: each shard is
    opened and decoded once, and only the manifest rows of the visited shards are read in full. A
    corrupt chunk is a problem naming its window (it does not stop the check). ``deep`` also decodes
    every chunk of every shard, whatever ``max_windows``, and lists the bad windows in ``corrupt``.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from cameo_corr.pipeline.cache import CorruptCacheError, read_manifest, window_fractions
    from cameo_corr.schemas import CACHE_ARRAYS, CameoCorrError, validate_window_arrays

    if max_windows is not None and max_windows < 1:
        raise ValueError(f"--max-windows must be >= 1, got {max_windows}")
    cfg = cache.config
    grid = tuple(cfg.grid)
    light = cache.manifest(None, columns=["window_id", "status", "shard", "row", "error"])
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
        full = cache.manifest("ok", columns=columns)
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
        shapes = {n: group[n].shape for n in CACHE_ARRAYS}
        W = shapes["nn"][0]
        if len(ids) != W or any(shape[0] != W for shape in shapes.values()):
            report.problems.append(f"shard {shard_id}: window_ids attribute and array lengths disagree")
            continue
        unreferenced = sorted(set(range(W)) - {r["row"] for r in shard_rows})
        if unreferenced:
            report.problems.append(f"shard {shard_id}: rows {unreferenced} have no manifest row")
        try:
            data: dict[str, np.ndarray] | None = cache.read_shard(shard_id)
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
            arrays = {n: data[n][k] for n in CACHE_ARRAYS} if data is not None else cache.read_row(shard_id, k, r["window_id"])
            try:
                validate_window_arrays(arrays, cfg.views, grid, where=where)
            except CameoCorrError as e:
                report.problems.append(str(e))
                continue
            report.problems += [f"{where}: {p}" for p in check_window_consistency(arrays, cfg.tau, grid)]
            valid_frac, mask_frac = window_fractions(arrays)
            if abs(valid_frac - r["valid_frac"]) > 1e-6 or abs(mask_frac - r["mask_frac"]) > 1e-6:
                report.problems.append(
                    f"{where}: manifest valid_frac/mask_frac {r['valid_frac']:.6f}/{r['mask_frac']:.6f} != arrays "
                    f"{valid_frac:.6f}/{mask_frac:.6f}"
                )
    if deep:
        seen = {(w, sh, a) for w, sh, a in report.corrupt}
        visited = set(visit)
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


def token_colors(grid: tuple[int, int]) -> np.ndarray:
    """``[h*w, 3]`` RGB colour of each token from its grid position (red = x, blue = y)."""
    h, w = grid
    xy = token_coords(grid)
    x = xy[:, 0] / max(w - 1, 1)
    y = xy[:, 1] / max(h - 1, 1)
    return np.stack([x, 0.35 + 0.3 * (1 - np.abs(x - y)), y], axis=-1)


def render_viz(
    cache: "CorrCache", window_id: str, out: str | Path, *, pair: tuple[int, int] = (0, 1), max_lines: int = 200
) -> Path:
    """Write the correspondence picture of one window (see the module docstring) to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arrays = cache.window(window_id)
    images = load_window_images(cache, window_id)
    S, size = images.shape[0], images.shape[1]
    i, j = pair
    if not (0 <= i < S and 0 <= j < S and i != j):
        raise ValueError(f"pair {pair} must be two different views in [0, {S})")
    h, w = tuple(cache.config.grid)
    hw = h * w
    nn, mask, valid = arrays["nn"].astype(np.int64), arrays["mask"], arrays["valid"].reshape(S, hw)
    xy = token_coords((h, w))
    centres = np.stack([(xy[:, 0] + 0.5) * size / w, (xy[:, 1] + 0.5) * size / h], axis=-1)
    queries = np.flatnonzero(mask[i, j])
    if len(queries) > max_lines:
        queries = queries[np.round(np.linspace(0, len(queries) - 1, max_lines)).astype(int)]
    colors = token_colors((h, w))

    fig = plt.figure(figsize=(14, 8.5), layout="constrained")
    gs = fig.add_gridspec(2, 2, height_ratios=[1.15, 1])
    ax = fig.add_subplot(gs[0, :])
    ax.imshow(np.concatenate([images[i], images[j]], axis=1), extent=(0, 2 * size, size, 0))
    for x in queries:
        (u0, v0), (u1, v1) = centres[x], centres[nn[i, j, x]]
        ax.plot([u0, u1 + size], [v0, v1], color=colors[x], linewidth=0.8, alpha=0.9)
        ax.plot([u0, u1 + size], [v0, v1], "o", color=colors[x], markersize=2)
    ax.set_title(f"window {window_id}: view {i} -> view {j}, {int(mask[i, j].sum())} masked of {int(valid[i].sum())} valid "
                 f"query tokens ({len(queries)} drawn)")
    ax.axis("off")

    off = ~np.eye(S, dtype=bool)
    coverage = mask.mean(axis=2)
    ax = fig.add_subplot(gs[1, 0])
    im = ax.imshow(np.where(off, coverage, np.nan), vmin=0, vmax=1, cmap="viridis")
    for a in range(S):
        for b in range(S):
            if a != b:
                ax.text(b, a, f"{coverage[a, b]:.2f}", ha="center", va="center", fontsize=7, color="w" if coverage[a, b] < 0.6 else "k")
    ax.set_xticks(range(S))
    ax.set_yticks(range(S))
    ax.set_xlabel("key view j")
    ax.set_ylabel("query view i")
    ax.set_title("mask coverage: share of query tokens with a cycle-consistent match")
    fig.colorbar(im, ax=ax, shrink=0.8)

    ax = fig.add_subplot(gs[1, 1])
    per_token = mask[i][off[i]].mean(axis=0).reshape(h, w)
    ax.imshow(images[i], extent=(0, size, size, 0))
    im = ax.imshow(per_token, extent=(0, size, size, 0), vmin=0, vmax=1, cmap="magma", alpha=0.6, interpolation="nearest")
    ax.set_title(f"view {i}: share of other views where each token is matched")
    ax.axis("off")
    fig.colorbar(im, ax=ax, shrink=0.8)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------------------ CLI
def _open(args: argparse.Namespace) -> "CorrCache":
    from cameo_corr.pipeline.cache import CorrCache

    return CorrCache(args.cache, dict(args.storage_option) or None)


def cli_errors(command: str) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Wrap a ``cameo-corr cache <command>`` handler: bad input (a missing or invalid cache, a bad
    option value, a corrupt file) prints one line ``cameo-corr cache <command>: error: ...`` on stderr
    and exits 2; a closed output pipe (``| head``) ends quietly with 141 (128 + SIGPIPE) like other
    command-line tools."""
    import functools
    import os

    from cameo_corr.schemas import CameoCorrError

    def wrap(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(handler)
        def run(args: argparse.Namespace) -> int:
            try:
                code = handler(args)
                sys.stdout.flush()
                return code
            except BrokenPipeError:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not raise again
                return 141
            except (CameoCorrError, ValueError, KeyError, OSError) as e:
                text = e.args[0] if isinstance(e, KeyError) and e.args else e
                print(f"cameo-corr cache {command}: error: {text}", file=sys.stderr)
                return 2

        return run

    return wrap


@cli_errors("stats")
def _stats(args: argparse.Namespace) -> int:
    if args.bins < 1:
        raise ValueError(f"--bins must be >= 1, got {args.bins}")
    stats = cache_stats(_open(args), bins=args.bins)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


@cli_errors("verify")
def _verify(args: argparse.Namespace) -> int:
    if args.max_windows is not None and args.max_windows < 1:
        raise ValueError(f"--max-windows must be >= 1, got {args.max_windows}")
    cache = _open(args)
    report = verify_report(cache, max_windows=args.max_windows, deep=args.deep)
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
    print(f"ok: {report.checked} of {report.windows_ok} windows verified in {where}" + (", every chunk decoded" if args.deep else ""))
    return 0


@cli_errors("compact")
def _compact(args: argparse.Namespace) -> int:
    from cameo_corr.pipeline.cache import consolidate_manifest

    cache = _open(args)
    info = consolidate_manifest(cache.location)
    print(f"manifest of {cache.location.display}: {info['rows']} rows in {len(info['files'])} file(s), "
          f"{len(info['fragments'])} shard fragments merged")
    return 0


@cli_errors("migrate")
def _migrate(args: argparse.Namespace) -> int:
    from cameo_corr.pipeline.cache import migrate_cache

    counts = migrate_cache(args.cache, args.out, storage_options=dict(args.storage_option) or None)
    print(f"migrated {counts['windows']} manifest rows and {counts['shards']} shards to {args.out} (schema version 2)")
    return 0


def _viz(args: argparse.Namespace) -> int:
    cache = _open(args)
    window = args.window or cache.window_ids()[0]
    out = render_viz(cache, window, args.out, pair=tuple(args.pair), max_lines=args.max_lines)
    print(f"wrote {out}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cameo-corr cache {stats,verify,viz,compact,migrate}``."""
    from cameo_corr.pipeline.ray_job import key_value_arg

    parser = subparsers.add_parser("cache", help="inspect, verify or visualise a correspondence cache")
    sub = parser.add_subparsers(dest="cache_command", metavar="{stats,verify,viz,compact,migrate}", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("cache", help="cache directory or fsspec URL")
        p.add_argument("--storage-option", action="append", type=key_value_arg, default=[], metavar="KEY=VALUE",
                       help="fsspec storage option (JSON value), repeatable")

    p = sub.add_parser("stats", help="windows, scenes, failures, mask coverage histogram, bytes")
    common(p)
    p.add_argument("--bins", type=int, default=COVERAGE_BINS, help="histogram bins (default: 10)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_stats)

    p = sub.add_parser("verify", help="check manifest <-> shards, schema, nn diagonal and cycle masks; exit 1 on problems")
    common(p)
    p.add_argument("--max-windows", type=int, default=None, help="check at most this many ok windows (streams shard by shard)")
    p.add_argument("--deep", action="store_true", help="also decode every chunk of every shard and list the corrupt windows")
    p.set_defaults(func=_verify)

    p = sub.add_parser("compact", help="merge the manifest fragments into sorted Parquet files (also done at job end)")
    common(p)
    p.set_defaults(func=_compact)

    p = sub.add_parser("migrate", help="convert a schema version 1 cache into a new version 2 cache")
    common(p)
    p.add_argument("--out", required=True, help="directory or URL of the new cache")
    p.set_defaults(func=_migrate)

    p = sub.add_parser("viz", help="PNG: two views with correspondence lines + mask coverage heatmaps")
    common(p)
    p.add_argument("--window", default=None, help="window id (default: the first ok window)")
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--pair", type=int, nargs=2, default=(0, 1), metavar=("I", "J"), help="views to draw (default: 0 1)")
    p.add_argument("--max-lines", type=int, default=200, help="at most this many correspondence lines")
    p.set_defaults(func=_viz)


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
    "token_colors",
    "render_viz",
    "register_cli",
]
