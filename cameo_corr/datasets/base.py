"""The dataset reader interface and the registry of readers by name."""

from __future__ import annotations

import abc
import importlib
from pathlib import Path
from typing import Any, ClassVar, Iterator

import numpy as np

from cameo_corr.schemas import DatasetError, FrameRecord, SceneRecord


class SceneReader(abc.ABC):
    """Reads one split of a dataset as :class:`SceneRecord` s and loads their pixels.

    Subclasses set ``name`` and ``default_crop_policy`` and implement :meth:`scene_ids`,
    :meth:`scene` and :meth:`load_image`; datasets with depth or masks override
    :meth:`load_depth` / :meth:`load_mask`. Every error on bad input is a :class:`DatasetError`
    naming the file and the line/field, with ``scene_id`` set when only one scene is affected, so a
    caller can record that scene as failed and go on.
    """

    name: ClassVar[str]
    default_crop_policy: ClassVar[str] = "center"

    def __init__(self, root: str | Path, split: str) -> None:
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            raise DatasetError(str(self.root), f"dataset root of '{self.name}' is not a directory")

    @abc.abstractmethod
    def scene_ids(self) -> list[str]:
        """Sorted ids of the scenes of this split."""

    @abc.abstractmethod
    def scene(self, scene_id: str) -> SceneRecord:
        """The validated record of one scene (frames in capture order)."""

    def scenes(self) -> Iterator[SceneRecord]:
        """All scenes of the split, in :meth:`scene_ids` order (errors propagate per scene)."""
        for sid in self.scene_ids():
            yield self.scene(sid)

    @abc.abstractmethod
    def load_image(self, frame: FrameRecord) -> np.ndarray:
        """RGB uint8 ``[H, W, 3]`` pixels of ``frame`` (its ``image_size``)."""

    @property
    def has_depth(self) -> bool:
        """Whether the dataset stores depth at all (readers with depth override :meth:`load_depth`)."""
        return type(self).load_depth is not SceneReader.load_depth

    def load_depth(self, frame: FrameRecord) -> np.ndarray | None:
        """z-depth ``[H, W]`` float32 in scene units, 0 where invalid; ``None`` if the dataset has none."""
        return None

    def load_mask(self, frame: FrameRecord) -> np.ndarray | None:
        """Foreground mask ``[H, W]`` bool; ``None`` if the dataset has none."""
        return None

    def preferred_crop_policy(self) -> str:
        """The canonical crop used when the user picks none (recorded in ``cache.json``).

        ``default_crop_policy`` unless the reader knows better from its data (CO3D: ``mask_bbox``
        when every frame has a foreground mask).
        """
        return self.default_crop_policy

    def options(self) -> dict[str, Any]:
        """Keyword options that reopen this reader with :func:`open_dataset` (recorded in the cache)."""
        return {"split": self.split}

    def describe(self) -> dict[str, Any]:
        """``{"name", "root", **options}``: what ``cache.json`` records under ``dataset``."""
        return {"name": self.name, "root": str(self.root), **self.options()}


_READERS: dict[str, str] = {
    "re10k": "cameo_corr.datasets.re10k:RE10KReader",
    "re10k-chunks": "cameo_corr.datasets.re10k:RE10KChunkReader",
    "co3d": "cameo_corr.datasets.co3d:CO3DReader",
    "synthetic": "cameo_corr.datasets.synthetic:SyntheticReader",
    "7scenes": "cameo_corr.datasets.sevenscenes:SevenScenesReader",
}
DATASET_NAMES = tuple(_READERS)


def open_dataset(name: str, root: str | Path, **options: Any) -> SceneReader:
    """Open a reader by registry name (``re10k``, ``re10k-chunks``, ``co3d``, ``synthetic``, ``7scenes``)."""
    if name not in _READERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASET_NAMES}")
    module, cls = _READERS[name].split(":")
    return getattr(importlib.import_module(module), cls)(root, **options)
