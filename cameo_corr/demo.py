"""``cameo-corr demo``: the whole pipeline end to end on an embedded default, on CPU.

synthetic scenes (exact ground truth) -> local Ray preprocessing with the depth backend -> sharded
Zarr cache + Parquet manifest -> ``cache stats`` / ``cache verify`` -> a correspondence PNG -> a few
CAMEO training steps of the tiny model on the cache it just built. Every stage is the one the real
commands run; re-running the demo with the same ``--out`` resumes (done windows are skipped,
training continues from its last checkpoint).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

DEMO_PRESET = "tiny_cpu"
"""The training preset of the demo; its supervised layer sees an ``DEMO_GRID`` token grid."""
DEMO_GRID = 8
DEMO_VIEWS = 4


def run_demo(
    out: str | Path,
    *,
    scenes: int = 4,
    frames: int = 24,
    image_size: int = 256,
    windows_per_scene: int = 4,
    workers: int = 2,
    steps: int = 20,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the demo into ``out``; return a summary of every stage (also written to ``summary.json``)."""
    from cameo_corr.datasets.synthetic import generate_dataset
    from cameo_corr.pipeline.cache import CorrCache
    from cameo_corr.pipeline.cache_tools import cache_stats, format_stats, render_viz, verify_cache
    from cameo_corr.pipeline.ray_job import format_summary, run_preprocess
    from cameo_corr.train.config import load_config, preset_path
    from cameo_corr.train.loop import train

    out = Path(out)
    data, cache_dir, run_dir = out / "data", out / "cache", out / "train"
    summary: dict[str, Any] = {}

    t0 = time.perf_counter()
    if not (data.is_dir() and any(data.iterdir())):
        _stage(f"1/5 synthesizing {scenes} scenes x {frames} frames ({image_size}px) into {data}")
        generate_dataset(data, scenes=scenes, frames=frames, image_size=image_size, seed=seed)
    else:
        _stage(f"1/5 synthetic scenes already in {data}")
    summary["synthesize_seconds"] = round(time.perf_counter() - t0, 2)

    _stage(f"2/5 preprocessing on local Ray ({workers} workers, depth backend, {DEMO_GRID}x{DEMO_GRID} tokens, S={DEMO_VIEWS})")
    pre = run_preprocess(
        dataset="synthetic",
        root=data,
        out=cache_dir,
        backend="depth",
        grid=DEMO_GRID,
        views=DEMO_VIEWS,
        workers=workers,
        windows_per_scene=windows_per_scene,
        seed=seed,
        progress=progress,
        command="cameo-corr demo",
    )
    print(format_summary(pre))
    summary["preprocess"] = {k: pre[k] for k in ("windows_ok", "windows_failed", "windows_skipped", "seconds")}
    if pre["windows_ok"] + pre["windows_skipped"] == 0:
        raise RuntimeError(f"preprocessing produced no window; errors: {pre.get('errors')}")

    _stage("3/5 cache stats and verify")
    cache = CorrCache(cache_dir)
    stats = cache_stats(cache)
    print(format_stats(stats))
    problems = verify_cache(cache)
    if problems:
        raise RuntimeError("cache verify found problems:\n" + "\n".join(problems))
    summary["cache"] = {"windows": len(cache), "verify": "ok"}

    viz = out / "correspondences.png"
    _stage(f"4/5 correspondence picture -> {viz}")
    render_viz(cache, cache.window_ids()[0], viz)
    summary["viz"] = str(viz)

    _stage(f"5/5 training the tiny model for {steps} steps with the CAMEO loss -> {run_dir}")
    cfg = load_config(preset_path(DEMO_PRESET), [f"data.cache={json.dumps(str(cache_dir))}", f"train.max_steps={steps}"])
    result = train(cfg, run_dir)
    last = result.history[-1] if result.history else {}
    summary["train"] = {"step": result.step, **{k: last[k] for k in ("diffusion", "cameo", "precision") if k in last}}
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _stage(text: str) -> None:
    print(f"\n== {text}", flush=True)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` command."""
    p = subparsers.add_parser(
        "demo",
        help="end to end on CPU: synthetic scenes -> local Ray -> cache -> stats/viz -> a few training steps",
        description="Run the whole pipeline on generated synthetic scenes (exact ground truth) on this machine.",
    )
    p.add_argument("--out", default="demo-run", help="output directory (data/, cache/, train/, correspondences.png)")
    p.add_argument("--scenes", type=int, default=4, help="synthetic scenes (default: 4)")
    p.add_argument("--frames", type=int, default=24, help="frames per scene (default: 24)")
    p.add_argument("--size", type=int, default=256, help="rendered image size in pixels (default: 256)")
    p.add_argument("--windows-per-scene", type=int, default=4, help="windows per scene (default: 4)")
    p.add_argument("--workers", type=int, default=2, help="Ray workers (default: 2)")
    p.add_argument("--steps", type=int, default=20, help="training steps (default: 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of scenes and window sampling (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    summary = run_demo(
        args.out,
        scenes=args.scenes,
        frames=args.frames,
        image_size=args.size,
        windows_per_scene=args.windows_per_scene,
        workers=args.workers,
        steps=args.steps,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print("\n" + json.dumps(summary, indent=2))
    return 0
