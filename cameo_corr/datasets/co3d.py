"""CO3D v2 reader (Common Objects in 3D, version 2): sequences of object-centric video frames with
PyTorch3D NDC cameras, depth maps and foreground masks.

Layout (every path inside the annotation files is relative to the dataset root)::

    <root>/<category>/frame_annotations.jgz                 gzip JSON list, one entry per frame:
        sequence_name, frame_number, frame_timestamp,
        image     {path, size: [H, W]}
        depth     {path, scale_adjustment, mask_path}        optional
        mask      {path, mass}                               optional
        viewpoint {R, T, focal_length, principal_point, intrinsics_format}
        meta      {...}                                      ignored
    <root>/<category>/sequence_annotations.jgz              per-sequence metadata (not needed here)
    <root>/<category>/set_lists/set_lists_<subset>.json     {"train" | "val" | "test": [[sequence_name,
                                                              frame_number, image_path], ...]}

Scenes are sequences, ``scene_id = "<category>/<sequence_name>"``, frames sorted by ``frame_number``
(``frame_id`` is the frame number as a string). With ``subset`` given (default ``fewview_dev``), a scene
holds exactly the frames that the subset's set list puts in ``split``; with ``subset=None`` it holds all
annotated frames of the sequence and ``split`` is only a label recorded in the scene records.

Cameras: ``viewpoint`` is PyTorch3D's row-vector camera (``X_cam = X_world @ R + T``, +X left, +Y
up) with NDC focal length and principal point, converted by
:func:`cameo_corr.schemas.pytorch3d_to_opencv`. ``intrinsics_format`` is ``ndc_isotropic`` (CO3D v2)
or ``ndc_norm_image_bounds`` (legacy; also the value CO3D's own ``ViewpointAnnotation`` dataclass
assumes when the field is absent, so an absent field means that). Any other value is an error.

Depth: a uint16 PNG whose bits are float16 values (:func:`decode_depth_png`), times
``depth.scale_adjustment``; non-finite or negative values become 0 (invalid), and the depth mask PNG
(``depth.mask_path``, CO3D's geometric-consistency mask), when present, is ANDed in. Foreground masks
are ``mask PNG > 0.5 * 255`` (CO3D stores ``P(foreground) * 255``).

Crop: a square centred on the principal point (``principal_point``), or on the foreground-mask bounding
box (``mask_bbox``) when masks exist: :meth:`CO3DReader.preferred_crop_policy` picks ``mask_bbox`` when
every annotated frame of the reader's categories names a mask (CO3D v2 does), else
``principal_point``. ``cameo-corr preprocess --crop-policy`` overrides the choice; the policy is
recorded in ``cache.json`` and the trainer re-applies it.

Each category's ``frame_annotations.jgz`` is parsed once per reader and kept in memory; frames are
converted (and checked) when their scene is requested, so a bad frame fails its scene only.
"""

from __future__ import annotations

import gzip
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from cameo_corr.datasets.base import SceneReader
from cameo_corr.datasets.image_io import read_image, read_png16
from cameo_corr.schemas import (
    CO3D_INTRINSICS_FORMATS,
    DatasetError,
    FrameRecord,
    SceneRecord,
    SchemaError,
    pytorch3d_to_opencv,
    validate_camera,
)

FRAME_ANNOTATIONS = "frame_annotations.jgz"
SEQUENCE_ANNOTATIONS = "sequence_annotations.jgz"
SET_LIST_DIR = "set_lists"
SET_LIST_SPLITS = ("train", "val", "test")
DEFAULT_SUBSET = "fewview_dev"
LEGACY_INTRINSICS_FORMAT = "ndc_norm_image_bounds"
"""``intrinsics_format`` of a viewpoint that does not name one (CO3D's dataclass default)."""
MASK_THRESHOLD = 0.5
"""Foreground where ``mask PNG / 255 > MASK_THRESHOLD``."""


# ------------------------------------------------------------------------------------ file formats
def read_jgz(path: Path, *, scene_id: str | None = None) -> Any:
    """Decode a gzip-compressed JSON file; truncated/corrupt gzip or bad JSON raise :class:`DatasetError`."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DatasetError(str(path), "file does not exist", scene_id=scene_id) from None
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DatasetError(str(path), f"corrupt or truncated gzip file: {e}", scene_id=scene_id) from e
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DatasetError(str(path), f"not UTF-8 text: {e}", scene_id=scene_id) from e
    except json.JSONDecodeError as e:
        raise DatasetError(str(path), f"invalid JSON: {e.msg} (column {e.colno})", line=e.lineno,
                           scene_id=scene_id) from e


def write_jgz(path: Path, obj: Any) -> None:
    """Write ``obj`` as gzip JSON like CO3D; byte-identical for equal ``obj`` (gzip mtime fixed at 0)."""
    data = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
        f.write(data)


def decode_depth_png(path: Path, *, scene_id: str | None = None) -> np.ndarray:
    """CO3D depth PNG -> float32 ``[H, W]``: the uint16 pixel bits reinterpreted as float16 (unscaled)."""
    return read_png16(path, field="depth", scene_id=scene_id).view(np.float16).astype(np.float32)


def encode_depth_png(depth: np.ndarray, path: Path) -> None:
    """Write float depth ``[H, W]`` as a CO3D depth PNG (float16 bits stored in a uint16 PNG)."""
    depth = np.asarray(depth)
    if depth.ndim != 2:
        raise ValueError(f"depth must be [H, W], got shape {depth.shape}")
    bits = np.ascontiguousarray(depth.astype(np.float16)).view(np.uint16)
    Image.fromarray(bits).save(path, format="PNG")


# ------------------------------------------------------------------------------------ annotations
@dataclass(frozen=True)
class _Category:
    """Parsed ``frame_annotations.jgz`` of one category (raw entries, checked when a scene is built)."""

    path: Path
    sequences: dict[str, list[tuple[int, dict[str, Any]]]]
    """sequence name -> ``(entry index, entry)`` sorted by frame number."""
    depth_masks: dict[str, str | None]
    """depth path -> depth mask path (``None`` when the frame has no depth mask)."""

    @property
    def all_masked(self) -> bool:
        """Whether every frame annotation names a foreground mask (``mask.path``)."""
        return all(isinstance(e.get("mask"), dict) and e["mask"].get("path")
                   for entries in self.sequences.values() for _, e in entries)


@dataclass(frozen=True)
class _SetList:
    """One split of a set list: sequence name -> {frame number: image path}."""

    path: Path
    frames: dict[str, dict[int, str]]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_category(path: Path) -> _Category:
    entries = read_jgz(path)
    if not isinstance(entries, list):
        raise DatasetError(str(path), f"expected a JSON list of frame annotations, got {type(entries).__name__}")
    sequences: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    seen: dict[tuple[str, int], int] = {}
    depth_masks: dict[str, str | None] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DatasetError(str(path), f"entry {i} is not an object", field=f"[{i}]")
        seq, num = entry.get("sequence_name"), entry.get("frame_number")
        if not isinstance(seq, str) or not seq or "/" in seq:
            raise DatasetError(str(path), f"entry {i}: sequence_name must be a non-empty string without '/', got {seq!r}",
                               field="sequence_name")
        if not _is_int(num) or num < 0:
            raise DatasetError(str(path), f"entry {i} (sequence {seq!r}): frame_number must be a non-negative integer, "
                               f"got {num!r}", field="frame_number")
        if (seq, num) in seen:
            raise DatasetError(str(path), f"frame {num} of sequence {seq!r} annotated twice (entries {seen[seq, num]} "
                               f"and {i})", field="frame_number")
        seen[seq, num] = i
        sequences.setdefault(seq, []).append((i, entry))
        depth = entry.get("depth")
        if isinstance(depth, dict) and isinstance(depth.get("path"), str):
            mask_path = depth.get("mask_path")
            depth_masks[depth["path"]] = mask_path if isinstance(mask_path, str) else None
    for frames in sequences.values():
        frames.sort(key=lambda item: item[1]["frame_number"])
    return _Category(path=path, sequences=sequences, depth_masks=depth_masks)


def _parse_set_list(path: Path, split: str) -> _SetList:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(str(path), "set list does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(str(path), f"cannot read set list: {e}") from e
    except json.JSONDecodeError as e:
        raise DatasetError(str(path), f"invalid JSON: {e.msg} (column {e.colno})", line=e.lineno) from e
    if not isinstance(data, dict):
        raise DatasetError(str(path), "set list must be a JSON object mapping split names to frame lists")
    if split not in data:
        raise DatasetError(str(path), f"set list has no split {split!r} (has {sorted(data)})", field=split)
    items = data[split]
    if not isinstance(items, list):
        raise DatasetError(str(path), "expected a list of [sequence_name, frame_number, image_path]", field=split)
    frames: dict[str, dict[int, str]] = {}
    for i, item in enumerate(items):
        if (not isinstance(item, list) or len(item) != 3 or not isinstance(item[0], str) or not _is_int(item[1])
                or not isinstance(item[2], str)):
            raise DatasetError(str(path), f"expected [sequence_name, frame_number, image_path], got {item!r}",
                               field=f"{split}[{i}]")
        frames.setdefault(item[0], {})[item[1]] = item[2]
    return _SetList(path=path, frames=frames)


def _numbers(value: Any, shape: tuple[int, ...], path: Path, field: str, where: str, scene_id: str) -> np.ndarray:
    """A finite float array of ``shape`` from a JSON value; errors name file, field and frame."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DatasetError(str(path), f"{where}: expected numbers of shape {shape}, got {value!r}", field=field,
                           scene_id=scene_id) from None
    if arr.shape != shape:
        raise DatasetError(str(path), f"{where}: expected shape {shape}, got {arr.shape}", field=field, scene_id=scene_id)
    if not np.all(np.isfinite(arr)):
        raise DatasetError(str(path), f"{where}: non-finite value in {value!r}", field=field, scene_id=scene_id)
    return arr


def _optional_section(entry: Mapping[str, Any], key: str, path: Path, where: str, scene_id: str) -> dict | None:
    """``entry[key]`` as an object, ``None`` when absent or null; errors name the field."""
    value = entry.get(key)
    if value is not None and not isinstance(value, dict):
        raise DatasetError(str(path), f"{where}: expected an object, got {type(value).__name__}", field=key,
                           scene_id=scene_id)
    return value


def _section(entry: Mapping[str, Any], key: str, path: Path, where: str, scene_id: str) -> dict:
    """``entry[key]`` as an object; a missing section is an error naming the field."""
    value = _optional_section(entry, key, path, where, scene_id)
    if value is None:
        raise DatasetError(str(path), f"{where}: missing", field=key, scene_id=scene_id)
    return value


def _string(section: Mapping[str, Any], key: str, path: Path, field: str, where: str, scene_id: str) -> str:
    value = section.get(key)
    if not isinstance(value, str) or not value:
        raise DatasetError(str(path), f"{where}: expected a non-empty string, got {value!r}", field=field,
                           scene_id=scene_id)
    return value


def frame_record(entry: Mapping[str, Any], path: Path, scene_id: str) -> FrameRecord:
    """Convert one CO3D frame annotation to a validated :class:`FrameRecord` (OpenCV pixel camera).

    Errors are :class:`DatasetError` naming ``path`` (the annotation file), the field
    (``image.size``, ``viewpoint.R``, ...) and, in the message, the frame.
    """
    where = f"frame {entry.get('frame_number')!r} of sequence {entry.get('sequence_name')!r}"
    image = _section(entry, "image", path, where, scene_id)
    image_path = _string(image, "path", path, "image.path", where, scene_id)
    size = image.get("size")
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and v > 0 for v in size)):
        raise DatasetError(str(path), f"{where}: expected [H, W] positive integers, got {size!r}", field="image.size",
                           scene_id=scene_id)
    hw = (int(size[0]), int(size[1]))

    vp = _section(entry, "viewpoint", path, where, scene_id)
    R = _numbers(vp.get("R"), (3, 3), path, "viewpoint.R", where, scene_id)
    T = _numbers(vp.get("T"), (3,), path, "viewpoint.T", where, scene_id)
    focal = _numbers(vp.get("focal_length"), (2,), path, "viewpoint.focal_length", where, scene_id)
    pp = _numbers(vp.get("principal_point"), (2,), path, "viewpoint.principal_point", where, scene_id)
    fmt = vp.get("intrinsics_format", LEGACY_INTRINSICS_FORMAT)
    if fmt not in CO3D_INTRINSICS_FORMATS:
        raise DatasetError(str(path), f"{where}: unknown intrinsics_format {fmt!r}; expected one of "
                           f"{CO3D_INTRINSICS_FORMATS}", field="viewpoint.intrinsics_format", scene_id=scene_id)
    K, E = pytorch3d_to_opencv(R, T, focal, pp, hw, fmt)
    try:
        validate_camera(K, E, where=where)
    except SchemaError as e:
        field = "viewpoint.R" if e.field == "extrinsics" else "viewpoint.focal_length"
        raise DatasetError(str(path), str(e), field=field, scene_id=scene_id) from e

    depth_path: str | None = None
    depth_scale = 1.0
    depth = _optional_section(entry, "depth", path, where, scene_id)
    if depth is not None:
        depth_path = _string(depth, "path", path, "depth.path", where, scene_id)
        scale = depth.get("scale_adjustment")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise DatasetError(str(path), f"{where}: expected a positive finite number, got {scale!r}",
                               field="depth.scale_adjustment", scene_id=scene_id)
        depth_scale = float(scale)
        depth_mask = depth.get("mask_path")
        if depth_mask is not None and (not isinstance(depth_mask, str) or not depth_mask):
            raise DatasetError(str(path), f"{where}: expected a non-empty string or null, got {depth_mask!r}",
                               field="depth.mask_path", scene_id=scene_id)
    mask = _optional_section(entry, "mask", path, where, scene_id)
    mask_path = _string(mask, "path", path, "mask.path", where, scene_id) if mask is not None else None
    return FrameRecord(frame_id=str(entry["frame_number"]), image_path=image_path, image_size=hw, intrinsics=K,
                       extrinsics=E, depth_path=depth_path, depth_scale=depth_scale, mask_path=mask_path)


# ------------------------------------------------------------------------------------------ reader
class CO3DReader(SceneReader):
    """CO3D v2 categories under ``root``; scenes are sequences (``"<category>/<sequence_name>"``).

    ``categories=None`` uses every folder of ``root`` holding a ``frame_annotations.jgz``; ``subset``
    names the set list (``set_lists/set_lists_<subset>.json`` of each category) restricting the frames
    to ``split``; ``subset=None`` uses all annotated frames (see the module docstring).
    """

    name = "co3d"
    default_crop_policy = "principal_point"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        categories: Sequence[str] | None = None,
        subset: str | None = DEFAULT_SUBSET,
    ) -> None:
        super().__init__(root, split)
        if subset is not None and split not in SET_LIST_SPLITS:
            raise DatasetError(str(self.root), f"unknown split {split!r}; set lists have {SET_LIST_SPLITS}", field="split")
        self.subset = subset
        if categories is None:
            found = sorted(p.name for p in self.root.iterdir() if (p / FRAME_ANNOTATIONS).is_file())
            if not found:
                raise DatasetError(str(self.root), f"no category folder with a {FRAME_ANNOTATIONS}", field="categories")
            self.categories: tuple[str, ...] = tuple(found)
            self._explicit_categories = False
        else:
            if isinstance(categories, str):
                raise DatasetError(str(self.root), "categories must be a list of names, not a string", field="categories")
            self.categories = tuple(categories)
            self._explicit_categories = True
            for cat in self.categories:
                if not (self.root / cat / FRAME_ANNOTATIONS).is_file():
                    raise DatasetError(str(self.root / cat / FRAME_ANNOTATIONS), f"category {cat!r} has no frame "
                                       "annotations", field="categories")
        self._parsed: dict[str, _Category] = {}
        self._set_lists: dict[str, _SetList] = {}

    def preferred_crop_policy(self) -> str:
        """``mask_bbox`` when every annotated frame of the reader's categories has a foreground mask, else
        ``principal_point`` (SPEC: CO3D crops centre on the principal point, or the mask bbox when masks exist)."""
        return "mask_bbox" if all(self._category(cat).all_masked for cat in self.categories) else self.default_crop_policy

    # ------------------------------------------------------------------------------- scenes
    def scene_ids(self) -> list[str]:
        """Sorted ``"<category>/<sequence>"`` ids with at least one frame in the split."""
        ids: list[str] = []
        for cat in self.categories:
            names: Iterable[str] = (self._set_list(cat).frames if self.subset is not None
                                    else self._category(cat).sequences)
            ids.extend(f"{cat}/{seq}" for seq in names)
        return sorted(ids)

    def scene(self, scene_id: str) -> SceneRecord:
        """The frames of one sequence (restricted to the split's set list), sorted by frame number."""
        cat, sep, seq = scene_id.partition("/")
        if not sep or cat not in self.categories or not seq:
            raise DatasetError(str(self.root), f"unknown scene {scene_id!r}; expected '<category>/<sequence_name>' with "
                               f"a category of {self.categories}", field="scene_id", scene_id=scene_id)
        parsed = self._category(cat)
        entries = parsed.sequences.get(seq, [])
        if self.subset is not None:
            wanted = self._set_list(cat)
            listed = wanted.frames.get(seq)
            if not listed:
                raise DatasetError(str(wanted.path), f"sequence {seq!r} has no frames in split {self.split!r}",
                                   field=self.split, scene_id=scene_id)
            by_number = {e["frame_number"]: e for _, e in entries}
            for num, image_path in sorted(listed.items()):
                if num not in by_number:
                    raise DatasetError(str(wanted.path), f"frame {num} of sequence {seq!r} is not in {parsed.path}",
                                       field=self.split, scene_id=scene_id)
                annotated = _section(by_number[num], "image", parsed.path, f"frame {num} of sequence {seq!r}",
                                     scene_id).get("path")
                if annotated != image_path:
                    raise DatasetError(str(wanted.path), f"frame {num} of sequence {seq!r}: image path {image_path!r} "
                                       f"differs from the annotation's {annotated!r}", field=self.split,
                                       scene_id=scene_id)
            entries = [(i, e) for i, e in entries if e["frame_number"] in listed]
        if not entries:
            raise DatasetError(str(parsed.path), f"sequence {seq!r} has no annotated frames", field="sequence_name",
                               scene_id=scene_id)
        frames = tuple(frame_record(e, parsed.path, scene_id) for _, e in entries)
        record = SceneRecord(self.tag, self.split, scene_id, frames)
        try:
            record.validate()
        except SchemaError as e:
            raise DatasetError(str(parsed.path), str(e), field=e.field, scene_id=scene_id) from e
        return record

    # ------------------------------------------------------------------------------- pixels
    def load_image(self, frame: FrameRecord) -> np.ndarray:
        """RGB uint8 ``[H, W, 3]`` of ``<root>/<image.path>``."""
        return read_image(self.root / frame.image_path, "RGB")

    def load_depth(self, frame: FrameRecord) -> np.ndarray | None:
        """Scaled z-depth float32 ``[H, W]``, 0 where non-finite, negative or outside the depth mask."""
        if frame.depth_path is None:
            return None
        path = self.root / frame.depth_path
        depth = decode_depth_png(path) * np.float32(frame.depth_scale)
        depth[~np.isfinite(depth) | (depth < 0)] = 0.0
        cat = frame.depth_path.split("/", 1)[0]
        parsed = self._category(cat) if cat in self.categories else None
        if parsed is None or frame.depth_path not in parsed.depth_masks:
            raise DatasetError(str(path), f"depth map is not annotated in the categories {self.categories} of this "
                               "reader", field="depth.path")
        mask_path = parsed.depth_masks[frame.depth_path]
        if mask_path is not None:
            valid = read_image(self.root / mask_path, "L", field="depth.mask_path") > 0
            if valid.shape != depth.shape:
                raise DatasetError(str(self.root / mask_path), f"depth mask size {valid.shape} differs from the depth "
                                   f"map's {depth.shape} ({path})", field="depth.mask_path")
            depth[~valid] = 0.0
        return depth.astype(np.float32, copy=False)

    def load_mask(self, frame: FrameRecord) -> np.ndarray | None:
        """Foreground bool ``[H, W]``: mask PNG ``> 0.5 * 255``; ``None`` when the frame has no mask."""
        if frame.mask_path is None:
            return None
        return read_image(self.root / frame.mask_path, "L", field="mask") > MASK_THRESHOLD * 255

    def options(self) -> dict[str, Any]:
        """``split``, ``subset`` and, when given explicitly, ``categories``."""
        opts: dict[str, Any] = {"split": self.split, "subset": self.subset}
        if self._explicit_categories:
            opts["categories"] = list(self.categories)
        return opts

    # ---------------------------------------------------------------------------- internals
    def _category(self, cat: str) -> _Category:
        if cat not in self._parsed:
            self._parsed[cat] = _parse_category(self.root / cat / FRAME_ANNOTATIONS)
        return self._parsed[cat]

    def _set_list(self, cat: str) -> _SetList:
        """The split of the subset's set list of ``cat`` (only called when ``subset`` is set)."""
        if cat not in self._set_lists:
            path = self.root / cat / SET_LIST_DIR / f"set_lists_{self.subset}.json"
            self._set_lists[cat] = _parse_set_list(path, self.split)
        return self._set_lists[cat]


__all__ = [
    "FRAME_ANNOTATIONS",
    "SEQUENCE_ANNOTATIONS",
    "SET_LIST_DIR",
    "SET_LIST_SPLITS",
    "DEFAULT_SUBSET",
    "LEGACY_INTRINSICS_FORMAT",
    "MASK_THRESHOLD",
    "read_jgz",
    "write_jgz",
    "decode_depth_png",
    "encode_depth_png",
    "frame_record",
    "CO3DReader",
]
