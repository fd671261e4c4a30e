"""``cameo-corr preprocess``: the command line of the preprocessing job (also what ``jobs/preprocess.py``
runs under ``ray job submit``). Parsing imports neither torch nor Ray; a run imports them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Mapping

from cameo_corr.cli.args import add_dataset_option, add_sampling_arguments, add_storage_option, grids_arg
from cameo_corr.cli.errors import RunFailed
from cameo_corr.datasets.planner import DEFAULT_SHARD_SIZE
from cameo_corr.schemas import CANONICAL_SIZE, DEFAULT_GRID, DEFAULT_TAU


def add_preprocess_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``cameo-corr preprocess`` (shared with ``jobs/preprocess.py``).

    Backend flags come from :func:`cameo_corr.pipeline.backends.add_backend_arguments` (read back by
    ``backend_options_from_args``); that module imports torch lazily, so the parser stays light.
    """
    from cameo_corr.datasets.base import DATASET_NAMES
    from cameo_corr.datasets.planner import POSITION_UNITS, SAMPLING_POLICIES
    from cameo_corr.pipeline.backends import add_backend_arguments

    parser.add_argument("--dataset", required=True, choices=DATASET_NAMES, help="dataset reader")
    parser.add_argument("--root", required=True, help="dataset root directory")
    parser.add_argument("--out", required=True, help="cache directory or fsspec URL (s3://bucket/cache)")
    parser.add_argument("--split", default=None, help="dataset split (default: the reader's default)")
    add_dataset_option(parser)
    parser.add_argument("--grid", type=grids_arg, default=((DEFAULT_GRID, DEFAULT_GRID),), metavar="SIDES",
                        help="token grid side h = w, or several comma-separated (16,32,64: one backend pass stores every "
                             "grid; the first is the primary one); 32x16 for h x w (default: 32)")
    parser.add_argument("--views", type=int, default=8, help="views per window S (default: 8)")
    parser.add_argument("--tau", type=float, default=DEFAULT_TAU, help="cycle-consistency threshold in tokens (default: 1.5)")
    add_sampling_arguments(parser, policies=SAMPLING_POLICIES, positions=POSITION_UNITS)
    parser.add_argument("--scene", action="append", default=None, help="only this scene id (repeatable)")
    parser.add_argument("--max-windows", type=int, default=None, metavar="N",
                        help="compute at most N of the windows still to do, in plan order (a trial run; re-run without it "
                             "to do the rest)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (scenes, windows, failures by reason, what the cache holds, estimated bytes) and "
                             "exit, without Ray and without writing")
    parser.add_argument("--crop-policy", choices=("center", "principal_point", "mask_bbox"), default=None,
                        help="canonical crop (default: the reader's; CO3D with masks: pass mask_bbox)")
    parser.add_argument("--crop-size", type=int, default=CANONICAL_SIZE, help="canonical view side in pixels (default: 512)")
    parser.add_argument("--store-images", choices=("none", "jpeg", "png"), default="none",
                        help="also store each window's canonical views in its shard, so training needs no dataset root "
                             "(default: none)")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of --store-images jpeg (default: 90)")
    add_backend_arguments(parser)
    parser.add_argument("--match-backend", default="auto", choices=("auto", "torch", "faiss", "kdtree"), help="exact NN method (default: auto)")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per backend call (VGGT batching; default: 1)")
    parser.add_argument("--workers", type=int, default=1, help="model actors (default: 1)")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per model actor (default: 0)")
    parser.add_argument("--cpus-per-worker", type=float, default=0.0,
                        help="logical CPUs reserved per model actor (default: 0, so actors never starve the load and commit tasks)")
    parser.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of a local Ray instance")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                        help=f"windows per shard = unit of commit (default: {DEFAULT_SHARD_SIZE}; capped at ceil(windows / workers))")
    parser.add_argument("--max-retries", type=int, default=3,
                        help="Ray retries of a load/commit task and restarts of a model actor after a system failure (default: 3; -1: unlimited)")
    parser.add_argument("--retry-failed", action="store_true", help="redo the windows recorded as failed (their rows are superseded)")
    parser.add_argument("--repair", action="store_true",
                        help="decode every chunk of the existing cache first and redo the windows of shards that fail their checksum")
    parser.add_argument("--force", action="store_true", help="take over the cache's lease even if another job renewed it recently")
    parser.add_argument("--lease-timeout", type=float, default=None,
                        help="seconds without renewal after which another job's lease is stale (default: 180)")
    parser.add_argument("--consolidate-every", type=int, default=None, metavar="SHARDS",
                        help="consolidate the manifest while the job runs once this many shard fragments are pending "
                             "(default: 256; a killed job leaves about this many for the next start-up to read)")
    parser.add_argument("--consolidate-seconds", type=float, default=None,
                        help="also consolidate pending fragments after this many seconds (default: 600)")
    add_storage_option(parser, " for --out")
    parser.add_argument("--fail-fast", action="store_true", help="stop and exit non-zero at the first failed window")
    parser.add_argument("--summary-json", default=None, help="also write the summary to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_from_args(args: argparse.Namespace) -> int:
    """Run the job from parsed arguments, print the summary, return 0.

    Errors are raised for the CLI's one error layer (:func:`cameo_corr.cli.main`): input and usage
    errors (bad flag values, a busy or unwritable ``--out``, a mismatching cache, a missing optional
    package, a plan without a window to compute) before Ray starts exit 2; a failed run (storage
    error, a backend that cannot be built where the actors run, Ray failure, ``--fail-fast``, a cache left
    without an ok window) raises
    :class:`~cameo_corr.cli.RunFailed` (exit 1); Ctrl-C exits 130 saying that committed shards are
    kept. ``--dry-run`` prints the plan instead (:func:`dry_run`).
    """
    from cameo_corr.job.config import JobConfig
    from cameo_corr.job.driver import BackendBuildError, CacheWriteError, run_job

    config = JobConfig.from_args(args)
    if args.dry_run:
        return dry_run(config, args.summary_json)
    try:
        summary = run_job(config)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"the shards already committed to {args.out} are kept, re-run the same command to resume") from None
    except (CacheWriteError, BackendBuildError) as e:
        raise RunFailed(str(e)) from None
    print(format_summary(summary))
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2, default=str))
    if summary["shard_errors"]:
        raise RunFailed(f"the run failed ({summary['shard_errors'][0][1]}); the shards committed are kept: remove the cause, "
                        "then re-run the same command to resume")
    if summary["stopped_early"] or (args.fail_fast and summary["windows_failed"]):
        raise RunFailed(f"--fail-fast: stopped at the first failed window ({summary['errors'][0][1] if summary['errors'] else '?'})")
    if not summary["cache_windows_ok"]:
        raise RunFailed(no_ok_window(summary))
    return 0


def no_ok_window(summary: Mapping[str, Any]) -> str:
    """Why a run left its cache without an ok window, and how to redo the failed windows."""
    errors = list(summary["errors"]) + list(summary["errors_earlier"])
    first = f", first: {errors[0][1]}" if errors else ""
    if summary["windows_failed_earlier"]:
        return (f"the cache has no ok window: {summary['cache_windows_failed']} windows are recorded as failed ("
                f"{summary['windows_failed_earlier']} by an earlier run, skipped now){first}; fix the input and re-run with "
                "--retry-failed to redo them")
    n = summary["windows_failed"]
    if n:
        one = n == 1
        return (f"no window succeeded: {'the one window' if one else f'all {n} windows'} failed{first} (see the 'failed' "
                f"line{'' if one else 's'} above); fix the input and re-run with --retry-failed to redo {'it' if one else 'them'}")
    return f"the cache has no ok window and this run computed none ({summary['windows_planned']} windows planned)"


def format_summary(summary: Mapping[str, Any]) -> str:
    """Human-readable summary of :func:`run_preprocess`."""
    st = summary["stage_seconds"]
    busy = sum(st[k] for k in ("read", "backend", "match", "write")) or 1.0
    lines = [
        f"cache: {summary['out']}",
        f"windows: planned {summary['windows_planned']}, already done {summary['windows_skipped']}"
        + (f" ({summary['windows_failed_earlier']} of them failed)" if summary["windows_failed_earlier"] else "")
        + (f", left for a later run (--max-windows) {summary['windows_deferred']}" if summary["windows_deferred"] else "")
        + f", ok {summary['windows_ok']}, failed {summary['windows_failed']}",
        f"shards written: {summary['shards_written']}, orphans removed: {summary['orphans_removed']}, "
        f"shards repaired: {summary['shards_repaired']} missing, {summary['shards_corrupt']} corrupt, failed windows retried: {summary['failed_retried']}, "
        f"shard errors: {len(summary['shard_errors'])}" + (" (stopped early)" if summary["stopped_early"] else ""),
        f"time: {summary['seconds']:.1f} s ({summary['startup_seconds']:.1f} s start-up), "
        f"{summary['windows_per_second']:.2f} windows/s end to end, {summary['processing_windows_per_second']:.2f} after start-up; stages "
        + ", ".join(f"{k} {st[k]:.1f} s ({100 * st[k] / busy:.0f}%)" for k in ("read", "backend", "match", "write")),
        f"bytes written: {summary['bytes_written']}, per ok window: {summary['bytes_per_window']:.0f}"
        + (f"; model actors ran on {', '.join(summary['devices_used'])}" if summary["devices_used"] else ""),
    ]
    lines += [f"  failed {wid}: {err}" for wid, err in summary["errors"]]
    lines += [f"  shard error {sid}: {err}" for sid, err in summary["shard_errors"]]
    if summary["config_replaced"]:
        lines.append(f"the cache had no ok window and another config: its config and {summary['failed_dropped']} failed rows "
                     "were replaced by this run's")
    if summary["windows_planned"] and summary["windows_skipped"] == summary["windows_planned"] and not summary["shard_errors"]:
        lines.append(f"nothing left to compute: all {summary['windows_planned']} planned windows are in the cache")
    if summary["windows_failed_earlier"]:
        n = summary["windows_failed_earlier"]
        s, were, them = ("", "was", "it") if n == 1 else ("s", "were", "them")
        lines.append(f"{n} window{s} recorded as failed by an earlier run {were} not redone (e.g. "
                     + "; ".join(f"{w}: {e}" for w, e in summary["errors_earlier"][:2])
                     + f"); re-run with --retry-failed to redo {them}")
    return "\n".join(lines)


def dry_run(config: Any, summary_json: str | None) -> int:
    """``--dry-run``: print the plan (:func:`~cameo_corr.job.preview.plan_preview`), optionally as JSON too; 0."""
    from cameo_corr.job.preview import format_plan, plan_preview

    preview = plan_preview(config)
    print(format_plan(preview))
    if summary_json:
        Path(summary_json).write_text(json.dumps(preview, indent=2, default=str))
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cameo-corr preprocess``."""
    parser = subparsers.add_parser(
        "preprocess",
        help="build or resume a correspondence cache with Ray",
        description=(
            "Plan windows of a dataset, run a geometry backend on a Ray Data pipeline, match tokens and "
            "write a sharded zarr cache + parquet manifest. Re-running resumes: windows with manifest rows "
            "are skipped, shards whose file is missing are redone. One job per cache (a lease). Local "
            "Ray by default; set RAY_ADDRESS or use `ray job submit` for a cluster (see jobs/README.md)."
        ),
    )
    add_preprocess_arguments(parser)
    parser.set_defaults(func=run_from_args)


__all__ = ["add_preprocess_arguments", "run_from_args", "no_ok_window", "format_summary", "dry_run", "register_cli"]
