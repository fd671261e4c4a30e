"""``cameo-corr cache stats|verify|viz|compact|migrate|merge``: inspect, check, picture, maintain and combine caches.

``stats``, ``verify``, ``viz`` and ``merge`` take a window selection (``--split``, ``--scenes FILE``,
``--min-mask-frac``; :class:`~cameo_corr.cache.select.WindowSelection`); ``merge`` writes the union of
caches of one config (:func:`~cameo_corr.cache.merge.merge_caches`); ``compact`` consolidates the
manifest fragments; ``migrate`` copies a version 1 cache into a version 2 one.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Callable

from cameo_corr.cache.consolidation import consolidate_manifest
from cameo_corr.cache.lease import CacheLease
from cameo_corr.cache.manifest import find_orphans, fragment_names
from cameo_corr.cache.merge import merge_caches
from cameo_corr.cache.migrate import migrate_cache
from cameo_corr.cache.reader import CorrCache
from cameo_corr.cache.select import WindowSelection, read_scene_list, selected_manifest
from cameo_corr.cache.stats import COVERAGE_BINS, cache_stats, format_stats
from cameo_corr.cache.verify import verify_report
from cameo_corr.cache.viz import DEFAULT_MATCHES, render_viz
from cameo_corr.cli.args import add_storage_option, grid_arg, grids_arg, recorded_command, storage_options
from cameo_corr.cli.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from cameo_corr.cache.reader import CorrCache
    from cameo_corr.cache.select import WindowSelection
    from cameo_corr.cache.verify import VerifyReport


def _open(args: argparse.Namespace) -> "CorrCache":
    return CorrCache(args.cache, storage_options(args))


def _selection(args: argparse.Namespace) -> "WindowSelection":
    """The window selection of the ``--split``/``--scenes``/``--min-mask-frac`` flags."""
    if args.min_mask_frac is not None and not 0.0 <= args.min_mask_frac <= 1.0:
        raise ValueError(f"--min-mask-frac must be in [0, 1], got {args.min_mask_frac}")
    if args.scenes is not None:
        read_scene_list(args.scenes)  # a bad file is reported before any cache is read
    return WindowSelection(args.split, args.scenes, args.min_mask_frac)


def cli_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a ``cameo-corr cache <command>`` handler so that a bad option value or a missing key
    (``ValueError``/``KeyError``) is reported as a usage error; :func:`cameo_corr.cli.main` turns it,
    like every other error, closed pipe and full disk, into one line and an exit code."""
    import functools

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
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
    orphans = find_orphans(cache.location)  # not a problem of the data: storage the next preprocess run frees
    if args.json:
        print(json.dumps(verify_json(cache, report, args, selection, orphans), indent=2))
        return 0 if report.windows_ok and not report.problems else 1
    if orphans:
        print(f"{args.command_name}: note: {len(orphans)} orphan(s) of killed writers in {where} (temporary files, shards "
              "without manifest rows; not read, deleted by the next `cameo-corr preprocess` run)", file=sys.stderr)
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


def verify_json(cache: "CorrCache", report: "VerifyReport", args: argparse.Namespace, selection: "WindowSelection",
                orphans: list[str]) -> dict:
    """``cache verify --json``: ``ok`` (no problem and at least one ok window: exit 0), ``path``,
    ``grids`` checked, ``deep``, ``selection``, ``windows_ok``, ``checked``, ``problems`` (one line
    each), ``corrupt`` (``{"window", "shard", "array"}``, ``null`` for a whole shard or its metadata)
    and ``orphans`` (what killed writers left: relative paths the next preprocess run deletes)."""
    return {
        "ok": bool(report.windows_ok) and not report.problems,
        "path": cache.location.display,
        "grids": [list(g) for g in (cache.config.grids if args.grid is None else args.grid)],
        "deep": args.deep,
        "selection": selection.describe() if selection else None,
        "windows_ok": report.windows_ok,
        "checked": report.checked,
        "problems": list(report.problems),
        "corrupt": [{"window": w, "shard": sh, "array": a} for w, sh, a in report.corrupt],
        "orphans": orphans,
    }


@cli_errors
def _compact(args: argparse.Namespace) -> int:
    cache = _open(args)
    # the cache's lease: a running job consolidates too (periodically and at its end), never both at once
    with CacheLease(cache.location, force=args.force).acquire():
        pending = len(fragment_names(cache.location))
        info = consolidate_manifest(cache.location, full=True)
    print(f"manifest of {cache.location.display}: {info['rows']} rows in {len(info['files'])} file(s), "
          f"{pending} pending shard fragments merged")
    return 0


@cli_errors
def _merge(args: argparse.Namespace) -> int:
    if len(args.caches) < 2:
        raise UsageError(f"merge needs at least two caches, got {len(args.caches)}", where="command line")
    report = merge_caches(args.caches, args.out, selection=_selection(args), storage_options=storage_options(args),
                          command=recorded_command(getattr(args, "command_line", None)), dataset_root=args.dataset_root)
    print(report.summary())
    return 0


@cli_errors
def _migrate(args: argparse.Namespace) -> int:
    counts = migrate_cache(args.cache, args.out, storage_options=storage_options(args))
    print(f"migrated {counts['windows']} manifest rows and {counts['shards']} shards to {args.out} (schema version 2)")
    return 0


def _viz(args: argparse.Namespace) -> int:
    cache = _open(args)
    where = cache.location.display
    if args.matches < 1:
        raise UsageError(f"--matches must be at least 1, got {args.matches}", where="command line")
    selection = _selection(args)
    if selection:
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
    parser = subparsers.add_parser("cache", help="inspect, verify or visualise a correspondence cache")
    sub = parser.add_subparsers(dest="cache_command", metavar="{stats,verify,viz,compact,migrate,merge}", required=True)

    def common(p: argparse.ArgumentParser, positional: bool = True) -> None:
        if positional:
            p.add_argument("cache", help="cache directory or fsspec URL")
        add_storage_option(p)

    def subset(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("window selection (manifest predicates, combined with 'and')")
        g.add_argument("--split", default=None, help="only windows of this dataset split")
        g.add_argument("--scenes", default=None, metavar="FILE", help="only windows of the scenes listed in FILE (one scene id per line)")
        g.add_argument("--min-mask-frac", type=float, default=None, metavar="X",
                       help="only windows with at least this share of masked query tokens (manifest mask_frac)")

    p = sub.add_parser("stats", help="windows, scenes, failures, mask coverage histogram, bytes")
    common(p)
    p.add_argument("--bins", type=int, default=COVERAGE_BINS, help="histogram bins (default: 10)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON (for scripts)")
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
    p.add_argument("--json", action="store_true",
                   help="print the report as JSON on stdout (ok, windows checked, problems, corrupt windows); same exit code")
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
    p.add_argument("--dataset-root", default=None, metavar="ROOT",
                   help="dataset root to record in OUT's cache.json when the inputs were built from different roots "
                   "(ROOT must hold every input's scenes; without it such inputs are refused)")
    common(p, positional=False)
    subset(p)
    p.set_defaults(func=_merge)


__all__ = ["cli_errors", "verify_json", "register_cli"]
