"""The loss difference between ``train.precision: official_bf16`` and fp32 on the tiny model, side by side.

Builds the synthetic training cache of ``cameo_vs_baseline.py`` (8x8 token grid on 64x64 views) and
runs the ``tiny_cpu`` model under three numerics, from the same initial weights and the same data
stream:

* ``fp32``: fp32 weights, no autocast (the ``tiny_cpu`` default);
* ``fp32+autocast``: fp32 master weights with bf16 autocast (``train.mixed_precision=bf16``, the numerics of
  ``sd21_cameo``);
* ``official_bf16``: the official run's numerics (:mod:`cameo_corr.train.precision`).

Two measurements:

1. the same weights, the same batches: the initial model's diffusion and CAMEO losses on ``--batches``
   batches of the stream (each batch with its own timesteps and noise, the same in every arm), against
   ``fp32`` (mean absolute and relative difference, and the ratio of the means);
2. training: ``--steps`` optimizer steps of each arm, logged per step, against ``fp32`` (mean absolute
   difference over the steps, and at the last step).

Usage: ``python benchmarks/official_bf16_vs_fp32.py [--steps 20] [--batches 16] [--work DIR] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ARMS = {
    "fp32": [],
    "fp32+autocast": ["train.mixed_precision=bf16"],
    "official_bf16": ["train.precision=official_bf16", "train.mixed_precision=bf16"],
}


def trainer_for(cache: Path, out: Path, overrides: list[str], steps: int) -> Any:
    """A fresh Trainer of the ``tiny_cpu`` preset (accelerate's process state reset, so each arm picks its own
    mixed precision)."""
    from accelerate.state import AcceleratorState

    from cameo_corr.train.config import load_config, preset_path
    from cameo_corr.train.loop import Trainer

    AcceleratorState._reset_state(reset_partial_state=True)
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: Trainer.run appends to the directory's metrics
    cfg = load_config(preset_path("tiny_cpu"), [f"data.cache={cache}", f"train.max_steps={steps}", "train.checkpoint_every=0",
                                                "train.log_every=1", *overrides])
    out.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, out)


def same_weights_losses(trainer: Any, batches: int) -> list[dict[str, float]]:
    """The initial model's losses on the first ``batches`` batches of the stream (no update)."""
    import torch

    from cameo_corr.train.loop import compute_losses, step_generator

    rows = []
    stream = trainer.batches()
    with torch.no_grad():
        for i in range(batches):
            g = step_generator(trainer.cfg.train.seed, 0, i, 0, trainer.accelerator.device)
            m = compute_losses(trainer.trainable, trainer.head_mlp, trainer.codec, trainer.noise_scheduler, next(stream),
                               trainer.cfg, trainer.grid, g)
            rows.append({k: float(m[k]) for k in ("diffusion", "cameo")})
    return rows


def compare(rows: list[dict[str, float]], base: list[dict[str, float]], key: str) -> dict[str, float]:
    """Mean |difference|, mean relative |difference| and the ratio of the means of ``key`` against ``base``."""
    pairs = [(r[key], b[key]) for r, b in zip(rows, base) if r[key] == r[key] and b[key] == b[key]]  # NaN-free
    return {
        "mean_abs_diff": statistics.fmean(abs(a - b) for a, b in pairs),
        "mean_rel_diff": statistics.fmean(abs(a - b) / abs(b) for a, b in pairs),
        "ratio_of_means": statistics.fmean(a for a, _ in pairs) / statistics.fmean(b for _, b in pairs),
        "n": len(pairs),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="optimizer steps of each training arm")
    p.add_argument("--batches", type=int, default=16, help="batches of the same-weights comparison")
    p.add_argument("--work", type=Path, help="cache and run directory (default: a temporary one)")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args(argv)

    from cameo_vs_baseline import build

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        cache = build(work, "train", scenes=8, frames=24, seed=0, windows_per_scene=4)
        same: dict[str, list[dict[str, float]]] = {}
        runs: dict[str, list[dict[str, float]]] = {}
        seconds: dict[str, float] = {}
        for name, overrides in ARMS.items():
            trainer = trainer_for(cache, work / f"same_{name}", overrides, args.steps)
            same[name] = same_weights_losses(trainer, args.batches)
            trainer = trainer_for(cache, work / f"run_{name}", overrides, args.steps)
            t0 = time.perf_counter()
            runs[name] = trainer.run(show_progress=False).history
            seconds[name] = time.perf_counter() - t0
    report: dict[str, Any] = {"steps": args.steps, "batches": args.batches, "seconds": seconds, "same_weights": {}, "training": {}}
    print(f"same weights, {args.batches} batches, against fp32:")
    for name in ARMS:
        if name == "fp32":
            continue
        for key in ("diffusion", "cameo"):
            c = compare(same[name], same["fp32"], key)
            report["same_weights"][f"{name}/{key}"] = c
            print(f"  {name:14s} {key:9s} mean |diff| {c['mean_abs_diff']:.3e}  mean rel {c['mean_rel_diff']:.3e}  "
                  f"ratio of means {c['ratio_of_means']:.5f}  (fp32 mean {statistics.fmean(r[key] for r in same['fp32']):.4f})")
    print(f"training {args.steps} steps, per-step losses against fp32:")
    for name in ARMS:
        if name == "fp32":
            continue
        for key in ("loss", "diffusion", "cameo"):
            c = compare(runs[name], runs["fp32"], key)
            last = runs[name][-1][key] - runs["fp32"][-1][key]
            report["training"][f"{name}/{key}"] = {**c, "last_step_diff": last}
            print(f"  {name:14s} {key:9s} mean |diff| {c['mean_abs_diff']:.3e}  mean rel {c['mean_rel_diff']:.3e}  "
                  f"ratio of means {c['ratio_of_means']:.5f}  last step diff {last:+.3e}")
    print("seconds per arm (training): " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())
          + f"; official_bf16 / fp32 time {seconds['official_bf16'] / seconds['fp32']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
