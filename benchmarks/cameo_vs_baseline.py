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
On a busy machine the runs can go in parallel: ``--arm cameo`` and ``--arm baseline`` (same ``--work``) train
one run each, then a plain invocation finds them finished (resumed from their final checkpoints) and plots.

Comparing two CAMEO variants: ``--cameo-set KEY=VALUE`` applies to the CAMEO run only, and ``--compare-set
KEY=VALUE`` adds a second CAMEO run (arm ``compare``, same lambda and mode) with its own overrides; ``--no-baseline``
drops the lambda=0 run. E.g. the visibility-aware mask against the cycle mask, all runs scored on the same
visible targets, also re-scored on the cycle mask's targets from their checkpoints::

    python benchmarks/cameo_vs_baseline.py --steps 300 --eval-every 25 --set eval.mask_policy=both \
        --cameo-set data.mask_policy=both --compare-set data.mask_policy=cycle --also-eval cycle \
        --png docs/cameo_vs_mask_policy.png

Each run's directory under ``--work`` is named after a hash of its overrides, so runs with other settings are
never resumed by mistake.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def build(base: Path, name: str, *, scenes: int, frames: int, seed: int, windows_per_scene: int) -> Path:
    """Generate synthetic scenes and cache them (skipped when the cache already exists)."""
    from cameo_corr.datasets.synthetic import generate_dataset
    from cameo_corr.job.driver import run_preprocess

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


def run_dir(work: Path, name: str, overrides: list[str]) -> Path:
    """The directory of one run: the arm's name and a hash of its overrides."""
    digest = hashlib.sha1("\n".join(overrides).encode()).hexdigest()[:10]
    return work / f"run_{name}_{digest}"


def run(cfg_overrides: list[str], out: Path, steps: int) -> list[dict[str, Any]]:
    """Train (or resume) one run to ``steps``; return its metric rows up to ``steps`` (a run that went
    further is read up to there: the LR schedule is constant, so the first ``steps`` do not depend on
    the length of the run)."""
    from cameo_corr.train.config import load_config, preset_path
    from cameo_corr.train.loop import read_metrics, train

    cfg = load_config(preset_path("tiny_cpu"), [*cfg_overrides, f"train.max_steps={steps}"])
    train(cfg, out, resume="auto")
    rows = read_metrics(out)
    if rows[-1]["step"] > steps and cfg.optim.lr_scheduler not in ("constant", "constant_with_warmup"):
        raise SystemExit(f"{out} went past --steps {steps} with optim.lr_scheduler={cfg.optim.lr_scheduler},"
                         " so its first steps depend on its length: use --steps of at least its length")
    return [r for r in rows if r["step"] <= steps]


def reevaluate(cfg_overrides: list[str], out: Path, steps: int, policy: str) -> list[dict[str, Any]]:
    """Evaluate every checkpoint (up to ``steps``) of a finished run again with ``eval.mask_policy=policy``
    (same held-out batches, timestep and noise; only the mask of the targets differs). Rows are cached in
    ``<out>/eval_<policy>.jsonl``."""
    from cameo_corr.train.config import load_config, preset_path
    from cameo_corr.train.loop import Trainer, checkpoint_dirs, evaluate

    cached = out / f"eval_{policy}.jsonl"
    checkpoints = [c for c in checkpoint_dirs(out) if int(c.name.split("-")[-1]) <= steps]
    if cached.exists():
        rows = [json.loads(line) for line in cached.read_text().splitlines() if line.strip()]
        if [r["checkpoint"] for r in rows] == [c.name for c in checkpoints]:
            return rows
    cfg = load_config(preset_path("tiny_cpu"), [*cfg_overrides, f"train.max_steps={steps}", f"eval.mask_policy={policy}"])
    trainer = Trainer(cfg, out)
    rows = []
    for checkpoint in checkpoints:
        trainer.load(checkpoint)
        ev = evaluate(trainer.trainable, trainer.head_mlp, trainer.codec, trainer.noise_scheduler, trainer.eval_batches,
                      cfg, trainer.grid, trainer.accelerator.device)
        rows.append({"checkpoint": checkpoint.name, "step": trainer.state.step, **ev})
    cached.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def curve_summary(ev: list[dict[str, Any]], steps: int) -> dict[str, float]:
    """First, final, best and second-half mean of an evaluation curve (rows with ``eval_precision``)."""
    late = [r for r in ev if r["step"] > steps // 2]
    return {
        "final_eval_precision": ev[-1]["eval_precision"],
        "best_eval_precision": max(r["eval_precision"] for r in ev),
        "initial_eval_precision": ev[0]["eval_precision"],
        "mean_eval_precision_second_half": sum(r["eval_precision"] for r in late) / len(late),
        "final_eval_diffusion": ev[-1]["eval_diffusion"],
    }


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
    p.add_argument("--lam", type=float, default=0.02, help="CAMEO loss weight of the CAMEO run(s)")
    p.add_argument("--mode", choices=["official", "paper"], default="official", help="CAMEO loss mode of the CAMEO run(s)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--scenes", type=int, default=8)
    p.add_argument("--eval-scenes", type=int, default=4)
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run, repeatable (e.g. eval.mask_policy=both)")
    p.add_argument("--cameo-set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the CAMEO run only, repeatable (e.g. data.mask_policy=both)")
    p.add_argument("--compare-set", action="append", default=[], metavar="KEY=VALUE",
                   help="add a second CAMEO run (arm 'compare') with this override, repeatable (e.g. data.mask_policy=cycle)")
    p.add_argument("--no-baseline", action="store_true", help="no lambda=0 run")
    p.add_argument("--also-eval", choices=["cycle", "visibility", "both"], default=None,
                   help="also score every run's checkpoints (one per evaluation) with this evaluation mask")
    p.add_argument("--arm", choices=["all", "cameo", "compare", "baseline"], default="all", help="train only one run (no plot)")
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.work.mkdir(parents=True, exist_ok=True)
    train_cache = build(args.work, "train", scenes=args.scenes, frames=args.frames, seed=args.seed, windows_per_scene=4)
    eval_cache = build(args.work, "eval", scenes=args.eval_scenes, frames=args.frames, seed=args.seed + 1000, windows_per_scene=4)
    checkpoints = [f"train.checkpoint_every={args.eval_every}", "train.keep_checkpoints=null"] if args.also_eval else ["train.checkpoint_every=0"]
    common = [
        f"data.cache={train_cache}", f"eval.cache={eval_cache}", f"eval.every={args.eval_every}",
        f"eval.batches={args.eval_batches}", f"train.seed={args.seed}", f"data.seed={args.seed}", *checkpoints,
        *args.set,
    ]
    cameo = [*common, f"loss.cameo_weight={args.lam}", f"loss.mode={args.mode}"]
    specs = {  # arm -> (overrides, label)
        "cameo": ([*cameo, *args.cameo_set], " ".join([f"CAMEO loss ({args.mode}, lambda={args.lam:g})", *args.cameo_set])),
    }
    if args.compare_set:
        specs["compare"] = ([*cameo, *args.compare_set], " ".join([f"CAMEO loss ({args.mode}, lambda={args.lam:g})", *args.compare_set]))
    if not args.no_baseline:
        specs["baseline"] = ([*common, "loss.cameo_weight=0"], "baseline (lambda=0)")
    if args.arm != "all":
        if args.arm not in specs:
            p.error(f"--arm {args.arm}: no such run with these options (compare needs --compare-set; baseline is off with --no-baseline)")
        overrides = specs[args.arm][0]
        run(overrides, run_dir(args.work, args.arm, overrides), args.steps)
        return {}
    rows = {name: run(overrides, run_dir(args.work, name, overrides), args.steps) for name, (overrides, _) in specs.items()}
    extra = {name: reevaluate(overrides, run_dir(args.work, name, overrides), args.steps, args.also_eval)
             for name, (overrides, _) in specs.items()} if args.also_eval else {}

    from cameo_corr.train.config import load_config, preset_path

    def eval_policy(overrides: list[str]) -> str:
        e = load_config(preset_path("tiny_cpu"), overrides)
        return e.eval.mask_policy or e.data.mask_policy

    ax_e = None
    if extra:
        fig, (ax_p, ax_e, ax_d) = plt.subplots(1, 3, figsize=(17, 4.8))
    else:
        fig, (ax_p, ax_d) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"cameo": "tab:red", "compare": "tab:green", "baseline": "tab:blue"}
    summary: dict[str, Any] = {"steps": args.steps, "lambda": args.lam, "mode": args.mode, "eval_every": args.eval_every,
                               "set": args.set, "also_eval": args.also_eval}
    for name, rs in rows.items():
        label = specs[name][1]
        ev = [r for r in rs if "eval_precision" in r]
        ax_p.plot([r["step"] for r in ev], [100 * r["eval_precision"] for r in ev], "-o", ms=3, color=colors[name],
                  label=f"{label}, held-out ({eval_policy(specs[name][0])} targets)")
        ax_p.plot([r["step"] for r in rs], [100 * v for v in smooth([r["precision"] for r in rs])], ":", color=colors[name], alpha=0.7,
                  label=f"{label}, training batches, own mask (smoothed)")
        if ax_e is not None:
            ax_e.plot([r["step"] for r in extra[name]], [100 * r["eval_precision"] for r in extra[name]], "-s", ms=3,
                      color=colors[name], label=label)
        ax_d.plot([r["step"] for r in rs], smooth([r["diffusion"] for r in rs], 50), color=colors[name], label=label)
        summary[name] = {
            "label": label,
            "overrides": [o for o in specs[name][0] if o not in common],
            "eval_mask_policy": eval_policy(specs[name][0]),
            **curve_summary(ev, args.steps),
            "final_train_diffusion_smoothed": smooth([r["diffusion"] for r in rs], 50)[-1],
            "seconds": rs[-1]["time"],
            "eval": [{"step": r["step"], "precision": r["eval_precision"], "diffusion": r["eval_diffusion"]} for r in ev],
        }
        if name in extra:
            summary[name][f"{args.also_eval}_targets"] = {
                **curve_summary(extra[name], args.steps),
                "eval": [{"step": r["step"], "precision": r["eval_precision"]} for r in extra[name]],
            }
    axes = [ax_p, ax_d] if ax_e is None else [ax_p, ax_e, ax_d]
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    ax_p.set_ylabel("attention correspondence precision (%)")
    ax_p.set_title("supervised layer, argmax within 1 token of the target", fontsize=10)
    if ax_e is not None:
        ax_e.set_ylabel("attention correspondence precision (%)")
        ax_e.set_title(f"held-out, scored on {args.also_eval} targets (from checkpoints)", fontsize=10)
    ax_d.set_ylabel("diffusion loss (v-prediction MSE, 50-step mean)")
    ax_d.set_title("diffusion loss on training batches", fontsize=10)
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=120)
    args.png.with_suffix(".json").write_text(json.dumps(summary, indent=2))

    def line(s: dict[str, float]) -> str:
        return (f"first eval {100 * s['initial_eval_precision']:.1f}%  final {100 * s['final_eval_precision']:.1f}%"
                f"  best {100 * s['best_eval_precision']:.1f}%  mean over the second half {100 * s['mean_eval_precision_second_half']:.1f}%"
                f"  diffusion {s['final_eval_diffusion']:.4f}")

    for name in rows:
        s = summary[name]
        print(f"{name:9s} held-out precision: {line(s)}  ({s['seconds']:.0f} s)  [{s['label']}]")
        if name in extra:
            print(f"{'':9s} on {args.also_eval} targets: {line(s[f'{args.also_eval}_targets'])}")
    print(f"wrote {args.png}")
    return summary


if __name__ == "__main__":
    main()
