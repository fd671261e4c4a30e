"""Window planning: which S frames of which scene become the windows of a cache, grouped into shards.

Two sampling policies, both seeded and deterministic (the random generator of a scene is seeded with a
SHA-256 hash of the seed, dataset, split and scene id, never Python's salted ``hash()``):

``stride`` (RealEstate10K, video clips)
    A window spans between ``S * span_per_view[0]`` and ``S * span_per_view[1]`` *raw video frames*
    (MVGenMaster's RealEstate10K range is ``[S*48, S*144]``, the default) and takes S frames at a
    uniform stride of frame indices inside that span. Raw frame positions come from the frame ordinal
    (``positions="ordinal"``: frame k of the scene is at raw frame k) or from timestamps
    (``positions="timestamp_us"``: frame ids are integer microseconds, position = t * fps / 1e6; this
    is what RealEstate10K's pose files give, and it is right for clips whose listed frames are
    subsampled from the video). Short or sparse clips are clamped: the span range is intersected with
    what the clip can give, ``[smallest span covering S consecutive frames, whole clip]``; if the
    requested range lies entirely above (below) that, the whole clip (the tightest S frames) is used.
``random`` (CO3D, turntable-like sequences)
    S distinct frames drawn uniformly from the whole sequence, returned in capture order.

``K = windows_per_scene`` windows are drawn per scene; windows whose frames coincide with an earlier
window of the scene are dropped (short clips may give fewer than K distinct windows). A scene with
fewer than S frames, or one its reader cannot read (:class:`~cameo_corr.schemas.DatasetError`), yields
one *failed* planned window carrying the error, which the job records as a ``status=failed`` manifest
row instead of crashing. Shards are consecutive runs of planned windows, ``shard_id`` a hash of their
window ids.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from cameo_corr.schemas import CameoCorrError, DatasetError, SceneRecord, SchemaError, WindowRecord, window_id

SAMPLING_POLICIES = ("stride", "random")
POSITION_UNITS = ("ordinal", "timestamp_us")
MVGENMASTER_SPAN_PER_VIEW = (48.0, 144.0)
"""Raw video frames per view bounding a RealEstate10K window's span (MVGenMaster: ``[S*48, S*144]``)."""


@dataclass(frozen=True)
class PlanConfig:
    """How windows are drawn from scenes (recorded in ``cache.json`` under ``created_by.plan``).

    ``views`` is S; ``windows_per_scene`` is K; ``policy`` one of :data:`SAMPLING_POLICIES`;
    ``span_per_view`` the ``(lo, hi)`` raw frames per view of the ``stride`` policy; ``positions`` one
    of :data:`POSITION_UNITS` with ``fps`` the raw video frame rate used for ``timestamp_us``;
    ``seed`` seeds every scene's generator.
    """

    views: int = 8
    windows_per_scene: int = 1
    policy: str = "stride"
    span_per_view: tuple[float, float] = MVGENMASTER_SPAN_PER_VIEW
    positions: str = "ordinal"
    fps: float = 30.0
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "span_per_view", tuple(float(v) for v in self.span_per_view))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`SchemaError` naming the field of an invalid setting."""
        where = "plan config"
        if self.views < 2:
            raise SchemaError("views", f"a window needs at least 2 views, got {self.views}", where=where)
        if self.windows_per_scene < 1:
            raise SchemaError("windows_per_scene", f"must be >= 1, got {self.windows_per_scene}", where=where)
        if self.policy not in SAMPLING_POLICIES:
            raise SchemaError("policy", f"unknown {self.policy!r}; expected one of {SAMPLING_POLICIES}", where=where)
        lo, hi = self.span_per_view if len(self.span_per_view) == 2 else (math.nan, math.nan)
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi):
            raise SchemaError("span_per_view", f"expected finite 0 <= lo <= hi, got {self.span_per_view}", where=where)
        if self.positions not in POSITION_UNITS:
            raise SchemaError("positions", f"unknown {self.positions!r}; expected one of {POSITION_UNITS}", where=where)
        if not (math.isfinite(self.fps) and self.fps > 0):
            raise SchemaError("fps", f"must be positive, got {self.fps}", where=where)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (what ``cache.json`` records)."""
        d = asdict(self)
        d["span_per_view"] = list(self.span_per_view)
        return d


def default_plan_config(dataset: str, **overrides: Any) -> PlanConfig:
    """The sampling each dataset is meant for, with ``overrides`` (``None`` values are ignored).

    RealEstate10K (raw and chunks): ``stride`` on timestamps. CO3D and synthetic (object-centric
    sequences): ``random`` over the whole sequence. Other datasets (7-Scenes): ``stride`` on ordinals.
    """
    if dataset in ("re10k", "re10k-chunks"):
        base: dict[str, Any] = {"policy": "stride", "positions": "timestamp_us"}
    elif dataset in ("co3d", "synthetic"):
        base = {"policy": "random", "positions": "ordinal"}
    else:
        base = {"policy": "stride", "positions": "ordinal"}
    base.update({k: v for k, v in overrides.items() if v is not None})
    return PlanConfig(**base)


@dataclass(frozen=True)
class PlannedWindow:
    """A window to compute, or (``error`` set) a scene that cannot give one, recorded as failed."""

    record: WindowRecord
    error: str | None = None


@dataclass(frozen=True)
class Shard:
    """The unit of work: consecutive planned windows written together by one worker."""

    shard_id: str
    windows: tuple[PlannedWindow, ...]

    @property
    def window_ids(self) -> list[str]:
        return [w.record.window_id for w in self.windows]


def stable_seed(*parts: Any) -> int:
    """A 64-bit seed from the SHA-256 of ``parts`` (stable across processes, unlike ``hash()``)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def scene_rng(seed: int, dataset: str, split: str, scene_id: str) -> np.random.Generator:
    """The generator that draws the windows of one scene."""
    return np.random.default_rng(stable_seed(seed, dataset, split, scene_id))


def frame_positions(scene: SceneRecord, config: PlanConfig) -> np.ndarray:
    """Raw-video-frame position of every frame of ``scene`` (float64, strictly increasing)."""
    where = f"{scene.dataset}/{scene.split}/{scene.scene_id}"
    if config.positions == "ordinal":
        return np.arange(len(scene.frames), dtype=np.float64)
    try:
        t = np.array([int(f.frame_id) for f in scene.frames], dtype=np.float64)
    except ValueError as e:
        raise DatasetError(
            where, f"positions='timestamp_us' needs integer frame ids (microseconds): {e}", field="frame_id", scene_id=scene.scene_id
        ) from e
    if len(t) > 1 and np.any(np.diff(t) <= 0):
        bad = int(np.argmax(np.diff(t) <= 0)) + 1
        raise DatasetError(
            where, f"timestamps must increase; frame {scene.frames[bad].frame_id} does not", field="frame_id", scene_id=scene.scene_id
        )
    return (t - t[0]) * config.fps / 1e6


def stride_indices(positions: np.ndarray, views: int, span: tuple[float, float], rng: np.random.Generator) -> list[int]:
    """Frame indices of one ``stride`` window (see the module docstring for the clamping rule).

    ``span`` is the ``(lo, hi)`` window span in raw frames. A span ``L`` is drawn uniformly from the
    clamped range, then a start frame uniformly among those leaving room for ``L`` and S frames; the
    end frame is the first at or beyond ``start + L`` and the S frames are spaced uniformly in index.
    """
    n = len(positions)
    if n < views:
        raise ValueError(f"{n} frames < {views} views")
    p = np.asarray(positions, dtype=np.float64)
    tightest = float(np.min(p[views - 1 :] - p[: n - views + 1]))
    whole = float(p[-1] - p[0])
    lo = min(max(span[0], tightest), whole)
    hi = min(max(span[1], lo), whole)
    length = float(rng.uniform(lo, hi)) if hi > lo else lo
    eps = 1e-9 * max(1.0, whole)
    ends = np.searchsorted(p, p + length - eps, side="left")
    ends = np.maximum(ends, np.arange(n) + views - 1)
    starts = np.flatnonzero(ends <= n - 1)
    i0 = int(starts[rng.integers(len(starts))])
    i1 = int(ends[i0])
    return [int(v) for v in np.round(np.linspace(i0, i1, views)).astype(np.int64)]


def random_indices(n: int, views: int, rng: np.random.Generator) -> list[int]:
    """S distinct frame indices drawn uniformly from ``range(n)``, sorted (capture order)."""
    if n < views:
        raise ValueError(f"{n} frames < {views} views")
    return sorted(int(v) for v in rng.choice(n, size=views, replace=False))


def plan_scene(scene: SceneRecord, config: PlanConfig, fingerprint: Mapping[str, Any]) -> list[PlannedWindow]:
    """Up to K distinct windows of ``scene``, or one failed window when it has fewer than S frames."""
    S = config.views
    if len(scene.frames) < S:
        return [failed_window(scene.dataset, scene.split, scene.scene_id, fingerprint,
                              f"scene has {len(scene.frames)} frames, fewer than the {S} views of a window",
                              frame_ids=[f.frame_id for f in scene.frames])]
    rng = scene_rng(config.seed, scene.dataset, scene.split, scene.scene_id)
    positions = frame_positions(scene, config) if config.policy == "stride" else None
    span = (S * config.span_per_view[0], S * config.span_per_view[1])
    seen: set[tuple[int, ...]] = set()
    out: list[PlannedWindow] = []
    for _ in range(config.windows_per_scene):
        if positions is not None:
            idx = stride_indices(positions, S, span, rng)
        else:
            idx = random_indices(len(scene.frames), S, rng)
        key = tuple(idx)
        if key in seen:
            continue
        seen.add(key)
        frames = tuple(scene.frames[i] for i in idx)
        wid = window_id(scene.dataset, scene.split, scene.scene_id, [f.frame_id for f in frames], fingerprint)
        out.append(PlannedWindow(WindowRecord(wid, scene.dataset, scene.split, scene.scene_id, frames)))
    return out


def failed_window(
    dataset: str, split: str, scene_id: str, fingerprint: Mapping[str, Any], error: str, *, frame_ids: Sequence[str] = ()
) -> PlannedWindow:
    """A planned window standing for a scene that cannot give windows (no frames attached).

    Its id hashes the scene's frame ids (empty when the scene could not be read), so a scene that is
    later fixed or extended plans new windows instead of reusing the failed row.
    """
    wid = window_id(dataset, split, scene_id, list(frame_ids), fingerprint)
    return PlannedWindow(WindowRecord(wid, dataset, split, scene_id, ()), error=error)


def plan_windows(
    reader: Any,
    config: PlanConfig,
    fingerprint: Mapping[str, Any],
    *,
    scene_ids: Iterable[str] | None = None,
) -> list[PlannedWindow]:
    """Plan the windows of every scene of ``reader`` (a :class:`~cameo_corr.datasets.SceneReader`).

    Scenes whose reading raises :class:`~cameo_corr.schemas.CameoCorrError` (bad pose file, NaN
    camera...) become failed windows with the error text; the order is the reader's scene order.
    """
    out: list[PlannedWindow] = []
    for sid in reader.scene_ids() if scene_ids is None else scene_ids:
        try:
            scene = reader.scene(sid)
            out.extend(plan_scene(scene, config, fingerprint))
        except CameoCorrError as e:
            out.append(failed_window(reader.tag, reader.split, sid, fingerprint, f"{type(e).__name__}: {e}"))
    ids = [w.record.window_id for w in out]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise SchemaError("window_id", f"two planned windows share the id {dup}", where="planner")
    return out


def shard_id_of(window_ids: Sequence[str]) -> str:
    """Deterministic 16-hex-digit shard id: SHA-256 of the window ids in order."""
    return hashlib.sha256("\n".join(window_ids).encode()).hexdigest()[:16]


def make_shards(windows: Sequence[PlannedWindow], shard_size: int, *, skip: Iterable[str] = ()) -> list[Shard]:
    """Group planned windows into shards of at most ``shard_size`` consecutive windows.

    Windows whose id is in ``skip`` (already in the manifest) are dropped *after* grouping, so a
    re-run with the same plan and shard size reproduces the shards of the first run and skips exactly
    the finished ones; shards left empty are omitted.
    """
    if shard_size < 1:
        raise SchemaError("shard_size", f"must be >= 1, got {shard_size}", where="planner")
    done = set(skip)
    shards: list[Shard] = []
    for start in range(0, len(windows), shard_size):
        todo = tuple(w for w in windows[start : start + shard_size] if w.record.window_id not in done)
        if todo:
            shards.append(Shard(shard_id_of([w.record.window_id for w in todo]), todo))
    return shards


__all__ = [
    "SAMPLING_POLICIES",
    "POSITION_UNITS",
    "MVGENMASTER_SPAN_PER_VIEW",
    "PlanConfig",
    "default_plan_config",
    "PlannedWindow",
    "Shard",
    "stable_seed",
    "scene_rng",
    "frame_positions",
    "stride_indices",
    "random_indices",
    "plan_scene",
    "failed_window",
    "plan_windows",
    "shard_id_of",
    "make_shards",
]
