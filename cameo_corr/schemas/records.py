"""The records that flow through the pipeline: frames and scenes (readers), windows (planner, job,
trainer), loaded windows (backends), pointmaps and token correspondences (matcher); and the stable
ids of windows and shards."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from cameo_corr.schemas.cameras import validate_camera
from cameo_corr.schemas.errors import DatasetError, SchemaError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch


@dataclass(frozen=True)
class FrameRecord:
    """One frame of a scene as a dataset reader describes it (no pixels loaded).

    ``image_path`` is relative to the dataset root; readers whose images live inside container files
    (pixelSplat chunks) use ``"<file>#<key>/<index>"``. ``intrinsics`` are in pixels of the stored
    image of size ``image_size = (H, W)``; ``extrinsics`` are world-to-camera, OpenCV.
    ``depth_path``/``mask_path`` are relative to the dataset root when the dataset has them;
    ``depth_scale`` multiplies decoded depth values into scene units.
    """

    frame_id: str
    image_path: str
    image_size: tuple[int, int]
    intrinsics: np.ndarray
    extrinsics: np.ndarray
    depth_path: str | None = None
    depth_scale: float = 1.0
    mask_path: str | None = None

    def validate(self, where: str) -> None:
        """Raise :class:`SchemaError` naming the field when the record breaks the contract."""
        loc = f"{where} frame {self.frame_id!r}"
        if not self.frame_id:
            raise SchemaError("frame_id", "must be a non-empty string", where=where)
        if len(self.image_size) != 2 or min(self.image_size) <= 0:
            raise SchemaError("image_size", f"expected positive (H, W), got {self.image_size}", where=loc)
        validate_camera(self.intrinsics, self.extrinsics, where=loc)
        if not math.isfinite(self.depth_scale) or self.depth_scale <= 0:
            raise SchemaError("depth_scale", f"must be positive and finite, got {self.depth_scale}", where=loc)


@dataclass(frozen=True)
class SceneRecord:
    """All frames of one scene (clip / sequence), in capture order."""

    dataset: str
    split: str
    scene_id: str
    frames: tuple[FrameRecord, ...]

    def validate(self) -> None:
        """Validate every frame and that frame ids are unique."""
        where = f"{self.dataset}/{self.split}/{self.scene_id}"
        ids = [f.frame_id for f in self.frames]
        if len(set(ids)) != len(ids):
            raise SchemaError("frame_id", "frame ids of a scene must be unique", where=where)
        for f in self.frames:
            f.validate(where)


def window_id(dataset: str, split: str, scene_id: str, frame_ids: Sequence[str], config: Mapping[str, Any]) -> str:
    """Stable 16-hex-digit id of a window: a hash of dataset, split, scene, frame ids and config.

    ``config`` holds everything that changes the cached values (grid, tau, backend, crop policy...);
    it is serialised as sorted JSON, so key order does not matter.
    """
    payload = json.dumps(
        [dataset, split, scene_id, list(frame_ids), dict(config)], sort_keys=True, separators=(",", ":"), default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class WindowIdHasher:
    """:func:`window_id` for many windows of one ``config``: the config's JSON is serialised once.

    ``WindowIdHasher(config)(dataset, split, scene_id, frame_ids) == window_id(..., config)`` (same
    payload string, so the same ids), at a fraction of the cost when planning millions of windows.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        self._config = json.dumps(dict(config), sort_keys=True, separators=(",", ":"), default=str)

    def __call__(self, dataset: str, split: str, scene_id: str, frame_ids: Sequence[str]) -> str:
        head = json.dumps([dataset, split, scene_id, list(frame_ids)], separators=(",", ":"), default=str)
        return hashlib.sha256(f"{head[:-1]},{self._config}]".encode()).hexdigest()[:16]

    def windows(self, dataset: str, split: str, scene_id: str, frame_ids: Sequence[str], windows: Any) -> list[str]:
        """Ids of the windows of one scene given as rows of frame indices into ``frame_ids`` (strings):
        ``[self(dataset, split, scene_id, [frame_ids[i] for i in row]) for row in windows]``, with the
        scene's part of the payload and each frame id serialised once."""
        head = json.dumps([dataset, split, scene_id], separators=(",", ":"))[:-1]
        encoded: dict[int, str] = {}
        out = []
        for row in windows:
            parts = []
            for i in row:
                if i not in encoded:
                    encoded[i] = json.encoder.encode_basestring_ascii(frame_ids[i])  # what json.dumps writes
                parts.append(encoded[i])
            payload = f"{head},[{','.join(parts)}],{self._config}]"
            out.append(hashlib.sha256(payload.encode()).hexdigest()[:16])
        return out


def shard_id_of(window_ids: Sequence[str]) -> str:
    """Deterministic 16-hex-digit shard id: SHA-256 of the window ids in order."""
    return hashlib.sha256("\n".join(window_ids).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class WindowRecord:
    """S frames of one scene processed together (all their points share one world frame)."""

    window_id: str
    dataset: str
    split: str
    scene_id: str
    frames: tuple[FrameRecord, ...]

    @classmethod
    def from_frames(cls, window_id: str, dataset: str, split: str, scene_id: str, frame_ids: Sequence[str],
                    frames: Mapping[str, FrameRecord], *, root: str) -> "WindowRecord":
        """The window ``window_id`` made of the frames ``frame_ids`` (in that order) of a scene whose
        frames are ``frames`` (``frame_id -> FrameRecord``): how a planned window or a manifest row
        becomes a record again. Frames the scene no longer has are a :class:`DatasetError` naming the
        dataset ``root``, the window and the scene."""
        missing = [f for f in frame_ids if f not in frames]
        if missing:
            raise DatasetError(root, f"frames {missing} of window {window_id} are not in scene {scene_id!r} any more",
                               field="frame_ids", scene_id=scene_id)
        return cls(window_id, dataset, split, scene_id, tuple(frames[f] for f in frame_ids))

    @property
    def num_views(self) -> int:
        return len(self.frames)

    @property
    def frame_ids(self) -> list[str]:
        return [f.frame_id for f in self.frames]

    @property
    def image_paths(self) -> list[str]:
        return [f.image_path for f in self.frames]


@dataclass
class WindowData:
    """A window loaded in the canonical view: what a geometry backend consumes.

    ``images`` ``[S, H, W, 3]`` uint8; ``intrinsics`` ``[S, 3, 3]`` in canonical pixels;
    ``extrinsics`` ``[S, 4, 4]`` world-to-camera; ``depth`` ``[S, H, W]`` float32 z-depth with 0 for
    invalid pixels, when the dataset has depth; ``masks`` ``[S, H, W]`` bool foreground, when it has
    masks.
    """

    record: WindowRecord
    images: np.ndarray
    intrinsics: np.ndarray
    extrinsics: np.ndarray
    depth: np.ndarray | None = None
    masks: np.ndarray | None = None

    def validate(self) -> None:
        """Check shapes and dtypes against each other; raise :class:`SchemaError` naming the field."""
        where = f"window {self.record.window_id}"
        S = self.record.num_views
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[0] != S or self.images.shape[-1] != 3:
            raise SchemaError("images", f"expected uint8 [{S}, H, W, 3], got {self.images.dtype} {self.images.shape}", where=where)
        H, W = self.images.shape[1:3]
        _check_shape("intrinsics", self.intrinsics, (S, 3, 3), where)
        _check_shape("extrinsics", self.extrinsics, (S, 4, 4), where)
        if self.depth is not None:
            _check_shape("depth", self.depth, (S, H, W), where)
        if self.masks is not None:
            _check_shape("masks", self.masks, (S, H, W), where)


def _check_shape(name: str, arr: Any, shape: tuple[int, ...], where: str) -> None:
    if tuple(arr.shape) != tuple(shape):
        raise SchemaError(name, f"expected shape {tuple(shape)}, got {tuple(arr.shape)}", where=where)


@dataclass
class PointmapResult:
    """Output of a geometry backend for one window (torch tensors on the backend's device).

    ``points`` ``[S, H, W, 3]`` float32 in one frame shared by the window; ``valid`` ``[S, H, W]``
    bool; ``conf`` ``[S, H, W]`` float32 (higher is better; 1 for ground truth); ``intrinsics``
    ``[S, 3, 3]`` canonical-view pixels and ``extrinsics`` ``[S, 4, 4]`` world-to-camera in the frame
    of ``points`` (ground truth or predicted).
    """

    points: "torch.Tensor"
    valid: "torch.Tensor"
    conf: "torch.Tensor"
    intrinsics: "torch.Tensor"
    extrinsics: "torch.Tensor"


@dataclass
class TokenCorrespondences:
    """All-ordered-pairs token correspondences of one window (SPEC section 3).

    ``points`` ``[S, h, w, 3]``, ``valid`` ``[S, h, w]``, ``conf`` ``[S, h, w]``; ``nn``, ``dist``,
    ``mask`` ``[S, S, h*w]`` with ``nn[i, j, x]`` the token of view j nearest in 3D to token x of view i
    (flattened row-major ``y*w + x``); the diagonal is the identity with ``dist = 0`` and
    ``mask = valid``.
    """

    points: "torch.Tensor"
    valid: "torch.Tensor"
    conf: "torch.Tensor"
    nn: "torch.Tensor"
    dist: "torch.Tensor"
    mask: "torch.Tensor"


__all__ = [
    "FrameRecord",
    "SceneRecord",
    "window_id",
    "WindowIdHasher",
    "shard_id_of",
    "WindowRecord",
    "WindowData",
    "PointmapResult",
    "TokenCorrespondences",
]
