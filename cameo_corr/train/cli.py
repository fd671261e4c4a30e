"""``cameo-corr train``: train the multi-view diffusion model with the CAMEO loss from a cache.

``cameo-corr train --cache DIR --config YAML [--out DIR] [--max-steps N] [--resume auto|never|CKPT]
[section.key=value ...]``. Multi-GPU: ``accelerate launch -m cameo_corr.cli train ...``.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any, Mapping

from cameo_corr.cli.args import add_storage_option, storage_options

if TYPE_CHECKING:  # pragma: no cover - typing only
    from cameo_corr.schemas import CacheConfig
    from cameo_corr.train.config import TrainConfig


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` command."""
    from cameo_corr.train.config import preset_names

    p = subparsers.add_parser(
        "train",
        help="train the multi-view diffusion model with the CAMEO loss from a correspondence cache",
        description="Train from a correspondence cache with a YAML config and section.key=value overrides. "
        "Multi-GPU: accelerate launch -m cameo_corr.cli train ...",
    )
    p.add_argument("--cache", help="cache directory or URL (overrides data.cache)")
    p.add_argument("--config", help=f"YAML config file or a built-in preset: {', '.join(preset_names())} "
                   "(default: the built-in defaults)")
    p.add_argument("--out", default="runs/train", help="run directory: config.yaml, metrics.jsonl, checkpoints/ and, with train.tensorboard=true, logs/")
    p.add_argument("--max-steps", type=int, help="total optimizer steps (overrides train.max_steps)")
    p.add_argument("--resume", default="auto", help="auto (latest checkpoint in --out, if any), never, or a checkpoint directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_storage_option(p, " of caches given by URL (not written to the run's config.yaml)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. loss.cameo_weight=0")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from cameo_corr.cli.errors import UsageError
    from cameo_corr.train.config import load_config

    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max-steps must be at least 1, got {args.max_steps}", where="command line")
    overrides = list(args.overrides)
    if args.cache is not None and any(o.split("=", 1)[0].strip() == "data.caches" for o in overrides):
        raise UsageError("give either --cache or data.caches (a mixture), not both", where="command line")
    if args.cache is not None:
        overrides.append(f"data.cache={json.dumps(str(args.cache))}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={int(args.max_steps)}")
    cfg = load_config(args.config, overrides)
    options = storage_options(args)
    configs = check_views(cfg, options)
    from accelerate import PartialState

    from cameo_corr.train.loop import end_process_group, train  # torch + diffusers: only once the input is good

    result = train(cfg, args.out, resume=args.resume, progress=not args.no_progress, configs=configs, storage_options=options)
    end_process_group()
    if not PartialState().is_main_process:  # one summary per run, not one per rank
        return 0
    last = result.history[-1] if result.history else {}
    summary = {
        "step": result.step,
        **{k: last[k] for k in ("diffusion", "cameo", "precision", "corrupt_skipped") if k in last},
        "checkpoint": result.checkpoints[-1] if result.checkpoints else None,
    }
    print(json.dumps(summary))
    return 0


def check_views(cfg: "TrainConfig", storage_options: Mapping[str, Any] | None = None) -> "dict[str, CacheConfig]":
    """Refuse ``data.num_views`` larger than a cache's views per window, saying which override fixes it;
    return every cache's ``cache.json`` (read here once for the whole command, by path)."""
    from cameo_corr.cli.errors import UsageError
    from cameo_corr.cache.layout import CONFIG_FILE
    from cameo_corr.train.config import read_cache_configs, training_cache_paths

    configs = read_cache_configs(cfg, storage_options=storage_options)
    for path in training_cache_paths(cfg):
        S = configs[str(path)].views
        if cfg.data.num_views > S:
            raise UsageError(
                f"data.num_views={cfg.data.num_views} but the cache has S={S} views per window; pass data.num_views={S} "
                f"(or fewer, at least 2) on the command line", where=f"{path}/{CONFIG_FILE}")
    return configs
