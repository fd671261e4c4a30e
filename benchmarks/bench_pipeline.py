"""End-to-end preprocessing benchmark: depth backend on synthetic scenes, local Ray, 1 and 2 workers.

Reports, in one run:

* the Ray Data pipeline (``run_preprocess`` of this tree) against the previous hand-written
  actor/task scheduler (``cameo_corr/pipeline/ray_job.py`` of git ref ``--baseline``, default
  ``main``, loaded from git into a temporary module), side by side on the same data and the same
  local Ray instance, alternating A/B for ``--repeats`` rounds per worker count. Both are measured
  the same way from the cache they write: steady windows/s after start-up (windows committed after
  the first shard / time from the first to the last shard commit, from the manifest fragments'
  mtimes), seconds to the first commit (start-up: Ray workers, backend, planning, first shard) and
  end-to-end seconds; medians and Ray Data / previous ratios;
* the share of busy time per stage of the Ray Data runs: read (decode + crop in CPU tasks), backend,
  match, write (the commit task's zarr shard + manifest fragment), and bytes per window;
* our write path (zarr v3 shards, one zstd inner chunk per window, one shard file per array, + parquet
  fragment) against the common research-code path of one ``np.savez_compressed`` file per window, on
  the same window arrays, plus the time to read one random window back from each.

Usage: ``python benchmarks/bench_pipeline.py [--scenes 4 --frames 12 --image-size 256 --views 4
--windows-per-scene 8 --grid 32 --crop-size 256 --shard-size 4 --repeats 3] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np


WRITE_REPEATS = 5
"""Timed runs of each write path (median reported), alternating zarr and npz after one warm-up pair."""


def npz_write(arrays: list[dict[str, np.ndarray]], ids: list[str], out: Path) -> float:
    """Write one compressed .npz per window; returns seconds."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for wid, a in zip(ids, arrays):
        np.savez_compressed(out / f"{wid}.npz", **a)
    return time.perf_counter() - t0


def zarr_write(arrays: list[dict[str, np.ndarray]], records: list, config, out: Path, shard_size: int) -> float:
    """Write the same windows through :class:`CacheWriter` (shards of ``shard_size``); returns seconds."""
    from cameo_corr.cache.writer import CacheWriter, WindowOutcome
    from cameo_corr.schemas import shard_id_of

    writer = CacheWriter(out, config)
    writer.initialize()
    t0 = time.perf_counter()
    for s in range(0, len(records), shard_size):
        recs = records[s : s + shard_size]
        outs = [WindowOutcome(r, arrays=a) for r, a in zip(recs, arrays[s : s + shard_size])]
        writer.write_shard(shard_id_of([r.window_id for r in recs]), outs)
    return time.perf_counter() - t0


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def baseline_module(ref: str, work: Path) -> ModuleType:
    """The previous scheduler: ``cameo_corr/pipeline/ray_job.py`` at git ``ref``, imported as a module
    that Ray pickles by value (its workers cannot import it by name)."""
    import ray.cloudpickle

    repo = Path(__file__).resolve().parents[1]
    text = subprocess.run(["git", "show", f"{ref}:cameo_corr/pipeline/ray_job.py"], cwd=repo, check=True,
                          capture_output=True, text=True).stdout
    path = work / "baseline_ray_job.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("baseline_ray_job", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    ray.cloudpickle.register_pickle_by_value(module)
    return module


def commit_times(cache: Path) -> tuple[list[float], list[int]]:
    """Commit time (manifest fragment mtime, UNIX seconds) and window count of every shard, in commit
    order: a measure both schedulers share, whatever each calls its start-up."""
    import pyarrow.parquet as pq

    frags = sorted((p.stat().st_mtime, pq.read_metadata(p).num_rows) for p in (cache / "manifest").glob("part-*.parquet"))
    return [t for t, _ in frags], [n for _, n in frags]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--windows-per-scene", type=int, default=8)
    parser.add_argument("--grid", type=int, default=32)
    parser.add_argument("--crop-size", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=4, help="windows per shard (small: many commit times to measure)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="alternating A/B rounds per worker count")
    parser.add_argument("--baseline", default="main", help="git ref of the previous scheduler (default: main)")
    parser.add_argument("--workdir", default=None, help="keep data and caches here (default: a temporary directory)")
    parser.add_argument("--json", default=None, help="write the numbers to this JSON file")
    args = parser.parse_args(argv)

    import ray

    from cameo_corr.datasets.synthetic import generate_dataset
    from cameo_corr.cache.reader import CorrCache
    from cameo_corr.job.driver import run_preprocess

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_pipeline_"))
    results: dict = {"settings": vars(args).copy(), "cpu_count": os.cpu_count(), "runs": {}}
    try:
        baseline = baseline_module(args.baseline, work)
        t0 = time.perf_counter()
        data = generate_dataset(work / "data", scenes=args.scenes, frames=args.frames, image_size=args.image_size, seed=0)
        results["generate_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, max(args.workers) + 2), include_dashboard=False,
                 log_to_driver=False)
        results["ray_init_seconds"] = time.perf_counter() - t0
        print(f"data: {args.scenes} scenes x {args.frames} frames at {args.image_size}px "
              f"(generated in {results['generate_seconds']:.1f} s); Ray init {results['ray_init_seconds']:.1f} s")
        print(f"windows: S={args.views}, {args.windows_per_scene}/scene, crop {args.crop_size}px, grid {args.grid}, "
              f"shard size {args.shard_size}; Ray Data vs the scheduler of {args.baseline!r}, {args.repeats} alternating rounds\n")
        common = dict(dataset="synthetic", root=data, backend="depth", grid=args.grid, views=args.views,
                      windows_per_scene=args.windows_per_scene, shard_size=args.shard_size, crop_size=args.crop_size, progress=False)
        keys = ("windows_ok", "windows_failed", "seconds", "startup_seconds", "windows_per_second",
                "processing_windows_per_second", "bytes_per_window", "stage_seconds")
        print(f"{'workers':>7} {'run':>9} {'windows':>7} {'seconds':>8} {'1st commit':>10} {'steady win/s':>12}")
        for w in args.workers:
            runs: dict[str, list[dict]] = {"ray_data": [], "baseline": []}
            for r in range(args.repeats):
                for name, fn in (("ray_data", run_preprocess), ("baseline", baseline.run_preprocess)):
                    out = work / f"cache_{name}_w{w}"
                    shutil.rmtree(out, ignore_errors=True)
                    t0 = time.time()
                    s = fn(out=out, workers=w, **common)
                    times, counts = commit_times(out)
                    run = {k: s[k] for k in keys}
                    run["first_commit_seconds"] = times[0] - t0
                    run["steady_windows_per_second"] = sum(counts[1:]) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
                    runs[name].append(run)
                    print(f"{w:>7} {name:>9} {s['windows_ok']:>7} {s['seconds']:>8.2f} {run['first_commit_seconds']:>10.2f} "
                          f"{run['steady_windows_per_second']:>12.2f}", flush=True)
            med = {name: {k: float(np.median([x[k] for x in rs])) for k in ("seconds", "first_commit_seconds",
                                                                           "steady_windows_per_second", "windows_per_second")}
                   for name, rs in runs.items()}
            st = {k: float(np.median([x["stage_seconds"][k] for x in runs["ray_data"]])) for k in ("read", "backend", "match", "write")}
            busy = sum(st.values()) or 1.0
            results["runs"][w] = {"runs": runs, "median": med,
                                  "steady_ratio": med["ray_data"]["steady_windows_per_second"] / med["baseline"]["steady_windows_per_second"],
                                  "startup_overhead_seconds": med["ray_data"]["first_commit_seconds"] - med["baseline"]["first_commit_seconds"],
                                  "end_to_end_ratio": med["ray_data"]["seconds"] / med["baseline"]["seconds"],
                                  "stage_share": {k: v / busy for k, v in st.items()},
                                  "bytes_per_window": runs["ray_data"][0]["bytes_per_window"]}
        print("(seconds: end to end without Ray init; 1st commit: seconds to the first committed shard; steady win/s: "
              "windows committed after the first shard / time from the first to the last commit)\n")
        print(f"{'workers':>7} {'steady RD':>9} {'steady before':>13} {'ratio':>6} {'1st commit RD':>13} {'before':>7} "
              f"{'e2e RD/before':>13}  {'read':>5} {'backend':>7} {'match':>5} {'write':>5}  {'bytes/win':>9}")
        for w, r in results["runs"].items():
            m = r["median"]
            print(f"{w:>7} {m['ray_data']['steady_windows_per_second']:>9.2f} {m['baseline']['steady_windows_per_second']:>13.2f} "
                  f"{r['steady_ratio']:>6.2f} {m['ray_data']['first_commit_seconds']:>12.1f}s {m['baseline']['first_commit_seconds']:>6.1f}s "
                  f"{r['end_to_end_ratio']:>13.2f}  "
                  + " ".join(f"{100 * r['stage_share'][k]:>4.0f}%" for k in ("read", "backend", "match", "write"))
                  + f"  {r['bytes_per_window']:>9.0f}")
        print("(medians; ratio = Ray Data / previous scheduler, steady state after start-up; stage shares of the Ray Data runs)")
        ray.shutdown()

        cache = CorrCache(work / f"cache_ray_data_w{args.workers[0]}")
        ids = cache.window_ids()
        arrays = [cache.window(i) for i in ids]
        from cameo_corr.schemas import WindowRecord

        records = []
        for wid in ids:
            r = cache.row(wid)
            records.append(WindowRecord(wid, r["dataset"], r["split"], r["scene_id"], ()))
        zdir, ndir = work / "write_zarr", work / "write_npz"
        t_zarr_runs, t_npz_runs = [], []
        for _ in range(WRITE_REPEATS + 1):  # alternating, the first pair is a warm-up
            for d in (zdir, ndir):
                shutil.rmtree(d, ignore_errors=True)
            t_zarr_runs.append(zarr_write(arrays, records, cache.config, zdir, args.shard_size))
            t_npz_runs.append(npz_write(arrays, ids, ndir))
        t_zarr, t_npz = float(np.median(t_zarr_runs[1:])), float(np.median(t_npz_runs[1:]))
        b_zarr, b_npz = dir_bytes(zdir), dir_bytes(ndir)
        f_zarr = sum(1 for p in zdir.rglob("*") if p.is_file())
        f_npz = sum(1 for p in ndir.rglob("*") if p.is_file())
        rng = np.random.default_rng(0)
        picks = [ids[i] for i in rng.integers(len(ids), size=min(20, len(ids)))]
        zc = CorrCache(zdir)
        t0 = time.perf_counter()
        for wid in picks:
            zc.window(wid)
        r_zarr = (time.perf_counter() - t0) / len(picks)
        t0 = time.perf_counter()
        for wid in picks:
            with np.load(ndir / f"{wid}.npz") as z:
                {k: z[k] for k in z.files}
        r_npz = (time.perf_counter() - t0) / len(picks)
        n = len(ids)
        results["write_compare"] = {
            "windows": n,
            "zarr": {"seconds": t_zarr, "windows_per_second": n / t_zarr, "bytes_per_window": b_zarr / n, "files": f_zarr, "read_ms": 1e3 * r_zarr},
            "npz": {"seconds": t_npz, "windows_per_second": n / t_npz, "bytes_per_window": b_npz / n, "files": f_npz, "read_ms": 1e3 * r_npz},
        }
        print(f"\nwrite path, same {n} windows (median of {WRITE_REPEATS} alternating runs after a warm-up):")
        print(f"{'':>22} {'seconds':>8} {'win/s':>8} {'bytes/win':>10} {'files':>6} {'read 1 win':>11}")
        for name, key in (("zarr shards (ours)", "zarr"), ("npz per window", "npz")):
            c = results["write_compare"][key]
            print(f"{name:>22} {c['seconds']:>8.3f} {c['windows_per_second']:>8.1f} {c['bytes_per_window']:>10.0f} {c['files']:>6} "
                  f"{c['read_ms']:>8.2f} ms")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
