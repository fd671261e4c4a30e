"""The lean CAMEO trainer that streams the correspondence cache (no online geometry).

Modules: :mod:`~cameo_corr.train.data` (seeded, resumable ``IterableDataset`` over the cache),
:mod:`~cameo_corr.train.model` (multi-view UNet), :mod:`~cameo_corr.train.loss` (CAMEO loss and
attention precision), :mod:`~cameo_corr.train.config` (YAML config), :mod:`~cameo_corr.train.precision`
(the training numerics, fp32 or the official run's bf16), :mod:`~cameo_corr.train.loop` (accelerate
training loop) and :mod:`~cameo_corr.train.cli` (``cameo-corr train``).

The names below are imported lazily, so ``import cameo_corr.train`` stays cheap for the CLI.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CorrStreamDataset": "cameo_corr.train.data",
    "StreamLoader": "cameo_corr.train.data",
    "collate_samples": "cameo_corr.train.data",
    "TrainConfig": "cameo_corr.train.config",
    "load_config": "cameo_corr.train.config",
    "Trainer": "cameo_corr.train.loop",
    "train": "cameo_corr.train.loop",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cameo_corr.train' has no attribute {name!r}")
