"""The dataset reader interface, the registry of readers by name, and the dataset tag.

A reader's ``name`` is its registry name (the on-disk layout it reads). Its ``tag`` names the
*dataset* in manifests, window ids and the trainer's ``tag``: the registry name by default, or the
``tag`` option of :func:`open_dataset` for sets that share a layout (ACID in the RealEstate10K layout:
``open_dataset("re10k", root, tag="acid")``, ``--dataset-option tag=acid`` on the command line).
"""

from __future__ import annotations

import abc
import collections.abc
import importlib
import inspect
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator, Sequence

import numpy as np

from cameo_corr.datasets.image_io import read_image
from cameo_corr.schemas import CameoCorrError, DatasetError, FrameRecord, SceneRecord


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
        self.tag: str = self.name
        """The dataset name recorded in scene records, manifests and window ids (see the module docstring)."""
        if not self.root.is_dir():
            raise DatasetError(str(self.root), f"dataset root of '{self.name}' is not a directory")

    @abc.abstractmethod
    def scene_ids(self) -> list[str]:
        """Sorted ids of the scenes of this split."""

    @abc.abstractmethod
    def scene(self, scene_id: str) -> SceneRecord:
        """The validated record of one scene (frames in capture order)."""

    def frame_ids(self, scene_id: str) -> list[str]:
        """Ids of the frames of a valid scene in capture order: what window planning needs.

        Raises like :meth:`scene` on a bad scene. Readers whose :meth:`scene` builds many frame
        records override this with a path that validates the same input without building them.
        """
        return [f.frame_id for f in self.scene(scene_id).frames]

    def frame_ids_batch(self, scene_ids: Sequence[str]) -> list[list[str] | CameoCorrError]:
        """:meth:`frame_ids` of many scenes, each the list of ids or the :class:`CameoCorrError` reading
        that scene raised (what window planning asks for). Readers that validate many scenes faster
        together override it; the results and errors stay those of :meth:`frame_ids`."""
        out: list[list[str] | CameoCorrError] = []
        for sid in scene_ids:
            try:
                out.append(self.frame_ids(sid))
            except CameoCorrError as e:
                out.append(e)
        return out

    def scenes(self) -> Iterator[SceneRecord]:
        """All scenes of the split, in :meth:`scene_ids` order (errors propagate per scene)."""
        for sid in self.scene_ids():
            yield self.scene(sid)

    @abc.abstractmethod
    def load_image(self, frame: FrameRecord) -> np.ndarray:
        """RGB uint8 ``[H, W, 3]`` pixels of ``frame`` (its ``image_size``)."""

    @classmethod
    def stores_depth(cls) -> bool:
        """Whether this reader's datasets store depth at all (readers with depth override :meth:`load_depth`)."""
        return cls.load_depth is not SceneReader.load_depth

    @property
    def has_depth(self) -> bool:
        """Whether the dataset stores depth at all (:meth:`stores_depth`)."""
        return self.stores_depth()

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
        """``{"name", "root", **options}`` plus ``tag`` when it differs from ``name``: what ``cache.json``
        records under ``dataset`` (and :func:`open_dataset` reopens)."""
        described = {"name": self.name, "root": str(self.root), **self.options()}
        if self.tag != self.name:
            described["tag"] = self.tag
        return described


def find_scene_dirs(root: Path, is_scene: Callable[[Path], bool], max_depth: int) -> dict[str, str]:
    """Scene folders under ``root``: ``{scene_id: folder relative to root (posix, "" for root)}``.

    A folder is a scene when ``is_scene(folder)``; the search goes at most ``max_depth`` levels below
    ``root``, skips hidden folders and never descends into a scene. The scene id is the relative path,
    or the root folder's own name when the root itself is the (only) scene.
    """
    if is_scene(root):
        return {root.resolve().name: ""}
    found: dict[str, str] = {}
    level = [root]
    for _ in range(max_depth):
        below: list[Path] = []
        for folder in level:
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError as e:
                raise DatasetError(str(folder), f"cannot list the folder: {e}") from e
            for entry in entries:
                if entry.name.startswith(".") or not entry.is_dir():
                    continue
                path = Path(entry.path)
                if is_scene(path):
                    rel = path.relative_to(root).as_posix()
                    found[rel] = rel
                else:
                    below.append(path)
        level = below
    return found


def existing_files(root: Path, rel_paths: Iterable[str]) -> set[str]:
    """The members of ``rel_paths`` (posix, relative to ``root``) that exist as files or links, found by
    listing each parent folder once (no per-file system call; a missing folder lists nothing)."""
    by_dir: dict[str, list[str]] = {}
    for rel in rel_paths:
        parent, _, name = rel.rpartition("/")
        by_dir.setdefault(parent, []).append(name)
    found: set[str] = set()
    for parent, names in by_dir.items():
        try:
            listed = {e.name for e in os.scandir(root / parent) if not e.is_dir()}
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            raise DatasetError(str(root / parent), f"cannot list the folder: {e}") from e
        found.update(f"{parent}/{n}" if parent else n for n in names if n in listed)
    return found


DEFAULT_MAX_DEPTH = 3
"""How many folder levels below the root :class:`SceneFolderReader` looks for scenes by default."""


class SceneFolderReader(SceneReader):
    """A reader whose scenes are folders found below the root by :meth:`is_scene` (nerfstudio, COLMAP).

    Options shared by these layouts: ``downscale`` (read the ``images_N`` copies; 1 = full size) and
    ``max_depth`` (folder levels searched, see :func:`find_scene_dirs`). ``scene_marker`` describes
    what makes a folder a scene, for the error when none is found.
    """

    scene_marker: ClassVar[str]

    def __init__(self, root: str | Path, split: str, downscale: int, max_depth: int) -> None:
        super().__init__(root, split)
        if isinstance(downscale, bool) or not isinstance(downscale, int) or downscale < 1:
            raise DatasetError(str(self.root), f"must be a positive integer, got {downscale!r}", field="downscale")
        if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 0:
            raise DatasetError(str(self.root), f"must be a non-negative integer, got {max_depth!r}", field="max_depth")
        self.downscale = downscale
        self.max_depth = max_depth
        self._scene_dirs = find_scene_dirs(self.root, self.is_scene, max_depth)
        if not self._scene_dirs:
            raise DatasetError(str(self.root), f"no {self.scene_marker} within {max_depth} folder levels", field="root")

    @abc.abstractmethod
    def is_scene(self, folder: Path) -> bool:
        """Whether ``folder`` holds a scene of this layout."""

    def scene_ids(self) -> list[str]:
        """Sorted scene ids: folder paths relative to the root (the root's name when it is the scene)."""
        return sorted(self._scene_dirs)

    def scene_folder(self, scene_id: str) -> str:
        """The folder of ``scene_id`` relative to the root (posix, ``""`` for the root itself)."""
        if scene_id not in self._scene_dirs:
            raise DatasetError(str(self.root), f"unknown scene {scene_id!r}", field="scene_id", scene_id=scene_id)
        return self._scene_dirs[scene_id]

    def load_image(self, frame: FrameRecord) -> np.ndarray:
        """RGB uint8 ``[H, W, 3]`` of the frame's image file."""
        return read_image(self.root / frame.image_path, "RGB")

    def options(self) -> dict[str, Any]:
        """``split``, ``downscale`` and ``max_depth``."""
        return {"split": self.split, "downscale": self.downscale, "max_depth": self.max_depth}


_READERS: dict[str, str] = {
    "re10k": "cameo_corr.datasets.re10k:RE10KReader",
    "re10k-chunks": "cameo_corr.datasets.re10k:RE10KChunkReader",
    "co3d": "cameo_corr.datasets.co3d:CO3DReader",
    "synthetic": "cameo_corr.datasets.synthetic:SyntheticReader",
    "7scenes": "cameo_corr.datasets.sevenscenes:SevenScenesReader",
    "nerfstudio": "cameo_corr.datasets.nerfstudio:NerfstudioReader",
    "colmap": "cameo_corr.datasets.colmap:ColmapReader",
}
DATASET_NAMES = tuple(_READERS)
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def reader_class(name: str) -> type[SceneReader]:
    """The reader class registered as ``name`` (its module is imported on first use)."""
    if name not in _READERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASET_NAMES}")
    module, cls_name = _READERS[name].split(":")
    return getattr(importlib.import_module(module), cls_name)


def open_dataset(name: str, root: str | Path, /, *, tag: str | None = None, **options: Any) -> SceneReader:
    """Open a reader by registry name (:data:`DATASET_NAMES`) with reader ``options``.

    ``tag`` names the dataset in scene records, manifests and window ids (default: ``name``), e.g.
    ``open_dataset("re10k", root, tag="acid")``. It must be a simple name (letters, digits, ``._-``)
    and not the registry name of another reader.
    """
    cls = reader_class(name)
    if "name" in options:
        raise DatasetError(str(root), f"'name' is the reader ({name!r}); name the dataset with the option "
                           f"tag={options['name']}", field="name")
    if tag is not None:
        if not isinstance(tag, str) or not _TAG_RE.match(tag):
            raise DatasetError(str(root), f"dataset tag must be letters, digits, '.', '_' or '-', got {tag!r}", field="tag")
        if tag != name and tag in _READERS:
            raise DatasetError(str(root), f"dataset tag {tag!r} is the name of another reader", field="tag")
    accepted = [p for p in inspect.signature(cls).parameters if p != "root"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DatasetError(str(root), f"unknown option {unknown[0]!r} of reader {name!r}; it takes {accepted + ['tag']}",
                           field=unknown[0])
    check_option_types(cls, options, str(root))
    reader = cls(root, **options)
    if tag is not None:
        reader.tag = tag
    return reader


def _accepts(hint: Any, value: Any) -> bool:
    """Whether ``value`` (a JSON value from the command line) fits the annotation ``hint`` of a reader option:
    ``int`` (not a bool), ``float`` (an int or float, not a bool), ``str``/``Path`` (a string), ``bool``,
    ``None``, ``Sequence[X]`` (a list or tuple of X), a union of these, or ``Any``; from Python a ``Path``
    option also takes a ``Path``."""
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(h, value) for h in typing.get_args(hint))
    if origin is not None and isinstance(origin, type) and issubclass(origin, collections.abc.Sequence):
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, (list, tuple)) and all(_accepts(item, v) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is Path:
        return isinstance(value, (str, os.PathLike))
    return isinstance(hint, type) and isinstance(value, hint)


def _describe_hint(hint: Any) -> str:
    """An option annotation in words (``a string or null``)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        words = list(dict.fromkeys(_describe_hint(h) for h in typing.get_args(hint)))
        return " or ".join(words)
    if origin is not None and isinstance(origin, type) and issubclass(origin, collections.abc.Sequence):
        (item,) = typing.get_args(hint) or (Any,)
        return f"a list of {_describe_hint(item).removeprefix('a ').removeprefix('an ')}s"
    return {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string",
            Path: "a string"}.get(hint, getattr(hint, "__name__", str(hint)))


def check_option_types(cls: type[SceneReader], options: dict[str, Any], where: str) -> None:
    """Refuse a reader option whose value does not have the type the reader's constructor declares
    (:class:`DatasetError` naming the option, e.g. ``--dataset-option max_depth="3"``); values are
    checked by the reader itself."""
    hints = typing.get_type_hints(cls.__init__)
    for name, value in options.items():
        hint = hints.get(name, Any)
        if not _accepts(hint, value):
            raise DatasetError(where, f"expected {_describe_hint(hint)}, got {json.dumps(value)}", field=name)
