"""Evidence that the CAMEO loss works: attention correspondence precision with and without it.

Builds a synthetic training set and a held-out synthetic evaluation set (other scenes), caches both
(depth backend, 8x8 token grid on 64x64 canonical views), then trains the tiny CPU model of
the ``tiny_cpu`` preset twice with the same seed and the same data stream (``mixed`` view order): once
with the CAMEO loss in ``--mode`` (default ``official``, CAMEO's released objective; lambda = ``--lam``)
and once with lambda = 0. Every ``--eval-every`` steps both runs are evaluated
on the same fixed held-out batches (fixed timestep, noise, views; no camera dropout): the attention
correspondence precision of the supervised layer (head-mean attention; a masked query counts when its
per-key-view argmax is within one token of the cached target). Writes the two curves to a PNG and the
numbers to a JSON file next to it.

Usage: ``python benchmarks/cameo_vs_baseline.py [--steps 300] [--png docs/cameo_vs_baseline.png] [--set KEY=VALUE ...]``.
On a busy machine the two runs can go in parallel: ``--arm cameo`` and ``--arm baseline`` (same ``--work``) train
one run each, then a plain invocation finds both finished (resumed from their final checkpoints) and plots.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def build(base: Path, name: str, *, scenes: int, frames: int, seed: int, windows_per_scene: int) -> Path:
    """Generate synthetic scenes and cache them (skipped when the cache already exists)."""
    from cameo_corr.datasets.synthetic import generate_dataset
    from cameo_corr.pipeline.ray_job import run_preprocess

    out = base / f"{name}_cache"
    if (out / "cache.json").exists():
        return out
    root = generate_dataset(base / f"{name}_data", scenes=scenes, frames=frames, image_size=64, seed=seed, layout="co3d")
    summary = run_preprocess(
        dataset="synthetic", root=root, out=out, backend="depth", grid=8, views=8,
        windows_per_scene=windows_per_scene, crop_size=64, workers=1, progress=False, seed=seed,
    )
    print(f"{name}: {summary['windows_ok']} windows cached ({summary['windows_failed']} failed)")
    return out


def run(cfg_overrides: list[str], out: Path, steps: int) -> list[dict[str, Any]]:
    """Train (or resume) one run; return its evaluation rows."""
    from cameo_corr.train.config import load_config, preset_path
    from cameo_corr.train.loop import read_metrics, train

    cfg = load_config(preset_path("tiny_cpu"), [*cfg_overrides, f"train.max_steps={steps}"])
    train(cfg, out, resume="auto")
    return read_metrics(out)


def smooth(values: list[float], k: int = 15) -> list[float]:
    """Trailing moving average (ignoring NaN)."""
    out = []
    for i in range(len(values)):
        window = [v for v in values[max(0, i - k + 1) : i + 1] if not math.isnan(v)]
        out.append(sum(window) / len(window) if window else math.nan)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=REPO / "runs" / "cameo_vs_baseline", help="data, caches and runs")
    p.add_argument("--png", type=Path, default=REPO / "docs" / "cameo_vs_baseline.png")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lam", type=float, default=0.02, help="CAMEO loss weight of the CAMEO run")
    p.add_argument("--mode", choices=["official", "paper"], default="official", help="CAMEO loss mode of the CAMEO run")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--scenes", type=int, default=8)
    p.add_argument("--eval-scenes", type=int, default=4)
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for both runs, repeatable (e.g. data.mask_policy=both eval.mask_policy=both)")
    p.add_argument("--arm", choices=["all", "cameo", "baseline"], default="all", help="train only one run (no plot)")
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.work.mkdir(parents=True, exist_ok=True)
    train_cache = build(args.work, "train", scenes=args.scenes, frames=args.frames, seed=args.seed, windows_per_scene=4)
    eval_cache = build(args.work, "eval", scenes=args.eval_scenes, frames=args.frames, seed=args.seed + 1000, windows_per_scene=4)
    common = [
        f"data.cache={train_cache}", f"eval.cache={eval_cache}", f"eval.every={args.eval_every}",
        f"eval.batches={args.eval_batches}", f"train.seed={args.seed}", f"data.seed={args.seed}", "train.checkpoint_every=0",
        *args.set,
    ]
    arms = {
        "cameo": ([*common, f"loss.cameo_weight={args.lam}", f"loss.mode={args.mode}"], args.work / f"run_cameo_{args.mode}"),
        "baseline": ([*common, "loss.cameo_weight=0"], args.work / "run_baseline"),
    }
    if args.arm != "all":
        run(*arms[args.arm], args.steps)
        return {}
    rows = {name: run(overrides, out, args.steps) for name, (overrides, out) in arms.items()}

    fig, (ax_p, ax_d) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"cameo": "tab:red", "baseline": "tab:blue"}
    labels = {"cameo": f"CAMEO loss ({args.mode}, lambda={args.lam:g})", "baseline": "baseline (lambda=0)"}
    summary: dict[str, Any] = {"steps": args.steps, "lambda": args.lam, "mode": args.mode, "eval_every": args.eval_every}
    for name, rs in rows.items():
        ev = [r for r in rs if "eval_precision" in r]
        late = [r for r in ev if r["step"] > args.steps // 2]
        ax_p.plot([r["step"] for r in ev], [100 * r["eval_precision"] for r in ev], "-o", ms=3, color=colors[name], label=f"{labels[name]}, held-out")
        ax_p.plot([r["step"] for r in rs], [100 * v for v in smooth([r["precision"] for r in rs])], ":", color=colors[name], alpha=0.7,
                  label=f"{labels[name]}, training batches (smoothed)")
        ax_d.plot([r["step"] for r in rs], smooth([r["diffusion"] for r in rs], 50), color=colors[name], label=labels[name])
        summary[name] = {
            "final_eval_precision": ev[-1]["eval_precision"],
            "best_eval_precision": max(r["eval_precision"] for r in ev),
            "initial_eval_precision": ev[0]["eval_precision"],
            "mean_eval_precision_second_half": sum(r["eval_precision"] for r in late) / len(late),
            "final_eval_diffusion": ev[-1]["eval_diffusion"],
            "final_train_diffusion_smoothed": smooth([r["diffusion"] for r in rs], 50)[-1],
            "seconds": rs[-1]["time"],
        }
    ax_p.set_xlabel("optimizer step")
    ax_p.set_ylabel("attention correspondence precision (%)")
    ax_p.set_title("supervised layer, within 1 token of the cached target")
    ax_p.legend(fontsize=7)
    ax_p.grid(alpha=0.3)
    ax_d.set_xlabel("optimizer step")
    ax_d.set_ylabel("diffusion loss (v-prediction MSE, 50-step mean)")
    ax_d.set_title("diffusion loss on training batches")
    ax_d.legend(fontsize=7)
    ax_d.grid(alpha=0.3)
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=120)
    args.png.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    for name in ("cameo", "baseline"):
        s = summary[name]
        print(f"{name:9s} held-out precision: first eval {100 * s['initial_eval_precision']:.1f}%  final {100 * s['final_eval_precision']:.1f}%"
              f"  best {100 * s['best_eval_precision']:.1f}%  mean over the second half {100 * s['mean_eval_precision_second_half']:.1f}%  diffusion {s['final_eval_diffusion']:.4f}  ({s['seconds']:.0f} s)")
    print(f"wrote {args.png}")
    return summary


if __name__ == "__main__":
    main()
