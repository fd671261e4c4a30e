"""``cameo-corr demo``: the whole pipeline end to end on an embedded default, on CPU.

synthetic scenes (exact ground truth) -> local Ray preprocessing with the depth backend -> sharded
Zarr cache + Parquet manifest -> ``cache stats`` / ``cache verify`` -> a correspondence PNG -> a few
CAMEO training steps of the tiny model on the cache it just built. Every stage is the one the real
commands run; re-running the demo with the same ``--out`` resumes (done windows are skipped,
training continues from its last checkpoint); re-running it there with other ``--scenes``, ``--frames``,
``--size``, ``--windows-per-scene`` or ``--seed`` is refused (exit 2) instead of mixing old and new data.
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
SETTINGS_FILE = "demo.json"
"""Written into ``--out`` once the scenes exist: the settings a re-run must match to reuse the data."""


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
    out = Path(out)
    data, cache_dir, run_dir = out / "data", out / "cache", out / "train"
    summary: dict[str, Any] = {}
    t0 = time.perf_counter()
    settings = {"scenes": scenes, "frames": frames, "size": image_size, "windows_per_scene": windows_per_scene, "seed": seed}
    reuse = check_previous_run(out, settings)

    from cameo_corr.cli.errors import RunFailed
    from cameo_corr.datasets.synthetic import generate_dataset
    from cameo_corr.cache.reader import CorrCache
    from cameo_corr.cache.stats import cache_stats, format_stats
    from cameo_corr.cache.verify import verify_cache
    from cameo_corr.cache.viz import render_viz
    from cameo_corr.job.cli import format_summary
    from cameo_corr.job.driver import run_preprocess
    from cameo_corr.train.config import load_config, preset_path
    from cameo_corr.train.loop import train

    if reuse:
        _stage(f"1/5 synthetic scenes already in {data}")
    else:
        _stage(f"1/5 synthesizing {scenes} scenes x {frames} frames ({image_size}px) into {data}")
        generate_dataset(data, scenes=scenes, frames=frames, image_size=image_size, seed=seed)
        (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))
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
        raise RunFailed(f"preprocessing produced no ok window (first errors: {pre.get('errors')[:2]})", where=str(cache_dir))

    _stage("3/5 cache stats and verify")
    cache = CorrCache(cache_dir)
    stats = cache_stats(cache)
    print(format_stats(stats))
    problems = verify_cache(cache)
    if problems:
        raise RunFailed(f"cache verify found {len(problems)} problem(s), first: {problems[0]}", where=str(cache_dir))
    summary["cache"] = {"windows": len(cache), "verify": "ok"}

    viz = out / "correspondences.png"
    _stage(f"4/5 correspondence picture -> {viz}")
    render_viz(cache, cache.window_ids()[0], viz)
    summary["viz"] = str(viz)

    _stage(f"5/5 training the tiny model for {steps} steps with the CAMEO loss -> {run_dir}")
    cfg = load_config(preset_path(DEMO_PRESET), [f"data.cache={json.dumps(str(cache_dir))}", f"train.max_steps={steps}"])
    result = train(cfg, run_dir, progress=progress)
    last = result.history[-1] if result.history else {}
    summary["train"] = {"step": result.step, **{k: last[k] for k in ("diffusion", "cameo", "precision") if k in last}}
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def check_previous_run(out: Path, settings: dict[str, Any]) -> bool:
    """Whether ``out`` already holds the demo data of ``settings`` (then it is reused and resumed).

    A run made with other settings, or data without the settings file (a synthesis that did not
    finish, or a directory the demo did not write), is refused with a :class:`~cameo_corr.cli.UsageError`
    rather than silently mixed with the new settings.
    """
    from cameo_corr.cli.errors import UsageError

    data, record = out / "data", out / SETTINGS_FILE
    if record.is_file():
        try:
            previous = json.loads(record.read_text())
        except json.JSONDecodeError as e:
            raise UsageError(f"unreadable demo settings ({e}); remove the directory or pass another --out", where=str(record)) from e
        changed = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v}
        if changed:
            flags = ", ".join(f"--{k.replace('_', '-')} {old} (now {new})" for k, (old, new) in changed.items())
            raise UsageError(f"this output directory holds a demo made with {flags}; pass another --out, or remove "
                             "it to start over", where=str(out))
        return data.is_dir()
    if data.is_dir() and any(data.iterdir()):
        raise UsageError(f"{data} holds data without the demo's {SETTINGS_FILE} (an unfinished or foreign run); "
                         "pass another --out, or remove it to start over", where=str(out))
    return False


def _stage(text: str) -> None:
    print(f"\n== {text}", flush=True)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` command."""
    p = subparsers.add_parser(
        "demo",
        help="end to end on CPU: synthetic scenes -> local Ray -> cache -> stats/viz -> a few training steps",
        description="Run the whole pipeline on generated synthetic scenes (exact ground truth) on this machine. "
        "Re-running with the same --out resumes; other --scenes/--frames/--size/--windows-per-scene/--seed need "
        "a new --out (the old run is not overwritten).",
    )
    p.add_argument("--out", default="demo-run", help="output directory (data/, cache/, train/, correspondences.png)")
    p.add_argument("--scenes", type=int, default=4, help="synthetic scenes (default: 4)")
    p.add_argument("--frames", type=int, default=24, help="frames per scene (default: 24)")
    p.add_argument("--size", type=int, default=256, help="rendered image size in pixels (default: 256)")
    p.add_argument("--windows-per-scene", type=int, default=4, help="windows per scene (default: 4)")
    p.add_argument("--workers", type=int, default=2, help="Ray workers (default: 2)")
    p.add_argument("--steps", type=int, default=20, help="training steps (default: 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of scenes and window sampling (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (preprocessing and training)")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from cameo_corr.cli.errors import UsageError

    minimum = {"scenes": 1, "frames": DEMO_VIEWS, "size": 8, "windows_per_scene": 1, "workers": 1, "steps": 1}
    for name, low in minimum.items():
        if getattr(args, name) < low:
            flag = f"--{name.replace('_', '-')}"
            raise UsageError(f"{flag} must be at least {low}, got {getattr(args, name)}", where="command line")
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
