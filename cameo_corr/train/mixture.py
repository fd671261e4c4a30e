"""Mixtures of caches for training: one ``data.caches`` entry of the training config per cache."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from cameo_corr.cache.select import WindowSelection
from cameo_corr.schemas import SchemaError

MIXTURE_KEYS = ("path", "weight", "tag", "dataset_root", "split", "scenes_file", "min_mask_frac")
"""Keys of one ``data.caches`` entry of the training config."""



@dataclass(frozen=True)
class CacheSource:
    """One cache of a training mixture: ``path``, sampling ``weight`` (> 0, relative to the other
    entries), ``tag`` (the batch ``tag`` of its samples; ``None``: the dataset tag), ``dataset_root``
    (read images from here instead of the root in its ``cache.json``) and its window ``selection``."""

    path: str
    weight: float = 1.0
    tag: str | None = None
    dataset_root: str | None = None
    selection: WindowSelection = WindowSelection()

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise SchemaError("path", f"must be a cache directory or URL, got {self.path!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not (math.isfinite(self.weight) and self.weight > 0):
            raise SchemaError("weight", f"must be a finite number > 0, got {self.weight!r}")
        if self.tag is not None and not (isinstance(self.tag, str) and self.tag):
            raise SchemaError("tag", f"must be a non-empty string, got {self.tag!r}")

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any], key: str = "data.caches[0]", where: str | None = None) -> "CacheSource":
        """Build from a config entry; errors name ``key.<field>`` and ``where``."""
        if not isinstance(entry, Mapping):
            raise SchemaError(key, f"expected a mapping with keys {', '.join(MIXTURE_KEYS)}, got {entry!r}", where=where)
        unknown = sorted(set(entry) - set(MIXTURE_KEYS))
        if unknown:
            raise SchemaError(f"{key}.{unknown[0]}", f"unknown key (known: {', '.join(MIXTURE_KEYS)})", where=where)
        if "path" not in entry:
            raise SchemaError(f"{key}.path", "missing (the cache directory or URL)", where=where)
        for name in ("path", "tag", "dataset_root", "split", "scenes_file"):
            if entry.get(name) is not None and not isinstance(entry[name], str):
                raise SchemaError(f"{key}.{name}", f"expected a string, got {entry[name]!r}", where=where)
        try:
            selection = WindowSelection(entry.get("split"), entry.get("scenes_file"), entry.get("min_mask_frac"))
            return cls(entry["path"], entry.get("weight", 1.0), entry.get("tag"), entry.get("dataset_root"), selection)
        except SchemaError as e:
            raise SchemaError(f"{key}.{e.field}", e.message, where=where) from None


__all__ = ["MIXTURE_KEYS", "CacheSource"]
