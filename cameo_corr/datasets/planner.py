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

At scale, :func:`iter_plan_batches` / :func:`plan_table` plan without keeping frame records: each
planned window is one row of an Arrow table (``window_id``, ``dataset``, ``split``, ``scene_id``,
``frame_ids``, ``error``: :func:`plan_schema`), built scene by scene in record batches, so a million
planned windows take tens of MB; the load stage rebuilds the frames with ``reader.scene(scene_id)``.
Readers supply image sizes from metadata (RealEstate10K: one header per clip) and give the frame ids
of many scenes at once (``reader.frame_ids_batch``: RealEstate10K parses and checks the cameras of a
few hundred clips together), so planning opens no image per frame and does no per-frame Python work
beyond reading ids. Large plans run in worker processes (:func:`plan_workers`), each planning whole
batches of scenes; the batches are joined in scene order, so the table is the same with any number
of workers. :func:`assign_shards` groups the table into shards the way :func:`make_shards` does.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import os
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from cameo_corr.schemas import (
    CameoCorrError,
    DatasetError,
    SceneRecord,
    SchemaError,
    WindowIdHasher,
    WindowRecord,
    shard_id_of,
    window_id,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pyarrow as pa

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
    return positions_of([f.frame_id for f in scene.frames], config, f"{scene.dataset}/{scene.split}/{scene.scene_id}", scene.scene_id)


def positions_of(frame_ids: Sequence[str], config: PlanConfig, where: str, scene_id: str) -> np.ndarray:
    """:func:`frame_positions` from the frame ids alone (errors name ``where``)."""
    if config.positions == "ordinal":
        return np.arange(len(frame_ids), dtype=np.float64)
    try:
        t = np.array([int(f) for f in frame_ids], dtype=np.float64)
    except ValueError as e:
        raise DatasetError(
            where, f"positions='timestamp_us' needs integer frame ids (microseconds): {e}", field="frame_id", scene_id=scene_id
        ) from e
    if len(t) > 1 and np.any(np.diff(t) <= 0):
        bad = int(np.argmax(np.diff(t) <= 0)) + 1
        raise DatasetError(where, f"timestamps must increase; frame {frame_ids[bad]} does not", field="frame_id", scene_id=scene_id)
    return (t - t[0]) * config.fps / 1e6


def stride_bounds(positions: np.ndarray, views: int, span: tuple[float, float], rng: np.random.Generator,
                  count: int = 1) -> list[tuple[int, int]]:
    """``(first, last)`` frame indices of ``count`` successive ``stride`` windows (see the module
    docstring for the clamping rule); :func:`spaced_indices` gives their S frames.

    ``positions`` must be non-decreasing. ``span`` is the ``(lo, hi)`` window span in raw frames. A
    span ``L`` is drawn uniformly from the clamped range, then a start frame uniformly among those
    leaving room for ``L`` and S frames; the end frame is the first at or beyond ``start + L`` (at
    least S - 1 frames on). The scene's bounds are computed once and each draw costs two binary
    searches, with the generator called exactly as a per-window search over all frames would.
    """
    n = len(positions)
    if n < views:
        raise ValueError(f"{n} frames < {views} views")
    p = np.asarray(positions, dtype=np.float64)
    tightest = float(np.min(p[views - 1 :] - p[: n - views + 1]))
    whole = float(p[-1] - p[0])
    lo = min(max(span[0], tightest), whole)
    hi = min(max(span[1], lo), whole)
    eps = 1e-9 * max(1.0, whole)
    pl = p.tolist()
    out: list[tuple[int, int]] = []
    for _ in range(count):
        length = float(rng.uniform(lo, hi)) if hi > lo else lo
        # start i is possible when the first frame at/after p[i] + L exists and i + S - 1 < n; both
        # hold on a prefix of the frames since positions do not decrease
        possible = min(bisect.bisect_right(pl, pl[-1], key=lambda x: x + length - eps), n - views + 1)
        i0 = int(rng.integers(possible))
        out.append((i0, max(bisect.bisect_left(pl, pl[i0] + length - eps), i0 + views - 1)))
    return out


def spaced_indices(bounds: Iterable[tuple[int, int]], views: int) -> list[list[int]]:
    """S frame indices spaced uniformly from ``first`` to ``last`` of each ``(first, last)`` in
    ``bounds``: ``np.round(np.linspace(first, last, S))`` (the same floating-point steps, rounding
    half to even), computed in Python, which is faster for a few windows."""
    out = []
    for first, last in bounds:
        step = (last - first) / (views - 1)
        out.append([round(k * step + first) for k in range(views - 1)] + [int(last)])
    return out


def stride_indices(positions: np.ndarray, views: int, span: tuple[float, float], rng: np.random.Generator) -> list[int]:
    """Frame indices of one ``stride`` window (:func:`stride_bounds` then :func:`spaced_indices`)."""
    return spaced_indices(stride_bounds(positions, views, span, rng), views)[0]


def random_indices(n: int, views: int, rng: np.random.Generator) -> list[int]:
    """S distinct frame indices drawn uniformly from ``range(n)``, sorted (capture order)."""
    if n < views:
        raise ValueError(f"{n} frames < {views} views")
    return sorted(int(v) for v in rng.choice(n, size=views, replace=False))


def scene_window_bounds(dataset: str, split: str, scene_id: str, frame_ids: Sequence[str], config: PlanConfig) -> list[tuple[int, int]]:
    """``(first, last)`` frame index of the up to K distinct ``stride`` windows of a scene with at
    least S frames ``frame_ids`` (capture order), duplicates dropped (a window's frames are fixed by
    its first and last)."""
    rng = scene_rng(config.seed, dataset, split, scene_id)
    positions = positions_of(frame_ids, config, f"{dataset}/{split}/{scene_id}", scene_id)
    span = (config.views * config.span_per_view[0], config.views * config.span_per_view[1])
    return list(dict.fromkeys(stride_bounds(positions, config.views, span, rng, config.windows_per_scene)))


def scene_window_indices(dataset: str, split: str, scene_id: str, frame_ids: Sequence[str], config: PlanConfig) -> list[list[int]]:
    """Frame indices of the up to K distinct windows of a scene with frames ``frame_ids`` (capture
    order); empty when it has fewer than S frames."""
    S = config.views
    if len(frame_ids) < S:
        return []
    if config.policy == "stride":
        return spaced_indices(scene_window_bounds(dataset, split, scene_id, frame_ids, config), S)
    rng = scene_rng(config.seed, dataset, split, scene_id)
    windows = (tuple(random_indices(len(frame_ids), S, rng)) for _ in range(config.windows_per_scene))
    return [list(idx) for idx in dict.fromkeys(windows)]


def _too_short(frames: int, config: PlanConfig) -> str:
    return f"scene has {frames} frames, fewer than the {config.views} views of a window"


TOO_SHORT = "fewer frames than views"
"""The :func:`failure_reason` of a scene with fewer frames than the views of a window."""
_TOO_SHORT_RE = re.compile(r"^scene has \d+ frames, fewer than the \d+ views of a window$")


def failure_reason(error: str) -> str:
    """The reason class of a planned or computed window's ``error`` text, to count failures by reason:
    :data:`TOO_SHORT` for a scene with fewer frames than views, else the error class name that starts
    the text (``DatasetError: ...``), else the whole text."""
    if _TOO_SHORT_RE.match(error):
        return TOO_SHORT
    head = error.split(":", 1)[0]
    return head if head.isidentifier() else error


def plan_scene(scene: SceneRecord, config: PlanConfig, fingerprint: Mapping[str, Any]) -> list[PlannedWindow]:
    """Up to K distinct windows of ``scene``, or one failed window when it has fewer than S frames."""
    if len(scene.frames) < config.views:
        return [failed_window(scene.dataset, scene.split, scene.scene_id, fingerprint, _too_short(len(scene.frames), config),
                              frame_ids=[f.frame_id for f in scene.frames])]
    hasher = WindowIdHasher(fingerprint)
    out: list[PlannedWindow] = []
    for idx in scene_window_indices(scene.dataset, scene.split, scene.scene_id, [f.frame_id for f in scene.frames], config):
        frames = tuple(scene.frames[i] for i in idx)
        wid = hasher(scene.dataset, scene.split, scene.scene_id, [f.frame_id for f in frames])
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


PLAN_COLUMNS: tuple[str, ...] = ("window_id", "dataset", "split", "scene_id", "frame_ids", "error")
"""Columns of a planned-window table (``error`` null: compute the window; set: record it as failed)."""
DEFAULT_SHARD_SIZE = 64
"""Windows per shard: 64 windows of S=8 at 32x32 make shard files of about 20 MB (one object each)."""


def plan_schema() -> "pa.Schema":
    """The Arrow schema of a planned-window table."""
    import pyarrow as pa

    return pa.schema([
        pa.field("window_id", pa.string(), nullable=False), pa.field("dataset", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False), pa.field("scene_id", pa.string(), nullable=False),
        pa.field("frame_ids", pa.list_(pa.string()), nullable=False), pa.field("error", pa.string()),
    ])


def iter_plan_batches(
    reader: Any, config: PlanConfig, fingerprint: Mapping[str, Any], *, scene_ids: Iterable[str] | None = None,
    scenes_per_batch: int = 2048, workers: int = 1,
) -> Iterator["pa.RecordBatch"]:
    """Plan scene by scene, yielding record batches of :func:`plan_schema` (one per
    ``scenes_per_batch`` scenes), in the reader's scene order; no frame record outlives its scene.

    Same windows and ids as :func:`plan_windows`. Frame ids come from
    ``reader.frame_ids_batch`` (readers validate many scenes together), at most
    :data:`READ_BATCH` scenes at a time. With ``workers > 1`` the batches are planned by that many
    processes (the reader is sent to each once) and yielded in the same order, so the result is
    the same as with one. A consumer may start work on a batch while the next ones are planned.
    """
    ids: Iterable[str] = reader.scene_ids() if scene_ids is None else scene_ids
    if workers <= 1:
        yield from _plan_batches(reader, config, fingerprint, ids, scenes_per_batch)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")  # never fork a process that may run Ray or torch threads
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_planner,
                               initargs=(reader, config, dict(fingerprint)))
    try:
        yield from pool.map(_plan_chunk, _chunks(ids, scenes_per_batch))
    finally:
        pool.shutdown(cancel_futures=True)


def plan_workers(scenes: int, scenes_per_batch: int = 2048) -> int:
    """Processes :func:`plan_table` uses by default: one below :data:`PARALLEL_MIN_BATCHES` batches of
    scenes (starting a process costs about a second), else one per CPU of this process, at most one
    per batch and at most 8."""
    batches = math.ceil(scenes / scenes_per_batch)
    if batches < PARALLEL_MIN_BATCHES:
        return 1
    return max(1, min(usable_cpus(), batches, 8))


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the platform reports it, else every CPU)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


PARALLEL_MIN_BATCHES = 4
"""Batches of scenes below which planning stays in the calling process."""

_PLANNER: tuple[Any, PlanConfig, Mapping[str, Any]] | None = None
"""``(reader, config, fingerprint)`` of a planning worker process (set by :func:`_start_planner`)."""


def _start_planner(reader: Any, config: PlanConfig, fingerprint: Mapping[str, Any]) -> None:
    global _PLANNER
    _PLANNER = (reader, config, fingerprint)


def _plan_chunk(scene_ids: list[str]) -> "pa.RecordBatch":
    """The planned windows of ``scene_ids`` as one record batch (in a planning worker)."""
    assert _PLANNER is not None, "planning worker not started"
    (batch,) = _plan_batches(*_PLANNER, scene_ids, len(scene_ids))
    return batch


def _plan_batches(reader: Any, config: PlanConfig, fingerprint: Mapping[str, Any], scene_ids: Iterable[str],
                  scenes_per_batch: int) -> Iterator["pa.RecordBatch"]:
    """:func:`iter_plan_batches` in this process."""
    import pyarrow as pa

    hasher = WindowIdHasher(fingerprint)
    schema = plan_schema()
    dataset, split = reader.tag, reader.split
    cols: dict[str, list[Any]] = {c: [] for c in PLAN_COLUMNS}

    def add(sid: str, ids: list[str], frames: list[list[str]], error: str | None) -> None:
        cols["window_id"] += ids
        cols["frame_ids"] += frames
        for c, v in (("dataset", dataset), ("split", split), ("scene_id", sid), ("error", error)):
            cols[c] += [v] * len(ids)

    n = 0
    for chunk in _chunks(scene_ids, min(READ_BATCH, scenes_per_batch)):
        for sid, frame_ids in zip(chunk, reader.frame_ids_batch(chunk)):
            if isinstance(frame_ids, CameoCorrError):
                add(sid, [hasher(dataset, split, sid, [])], [[]], f"{type(frame_ids).__name__}: {frame_ids}")
            elif len(frame_ids) < config.views:
                add(sid, [hasher(dataset, split, sid, frame_ids)], [[]], _too_short(len(frame_ids), config))
            else:
                try:
                    idx = scene_window_indices(dataset, split, sid, frame_ids, config)
                except CameoCorrError as e:
                    add(sid, [hasher(dataset, split, sid, [])], [[]], f"{type(e).__name__}: {e}")
                else:
                    add(sid, hasher.windows(dataset, split, sid, frame_ids, idx), [[frame_ids[i] for i in w] for w in idx], None)
            n += 1
            if n % scenes_per_batch == 0 and cols["window_id"]:
                yield pa.RecordBatch.from_pydict(cols, schema=schema)
                cols = {c: [] for c in PLAN_COLUMNS}
    if cols["window_id"]:
        yield pa.RecordBatch.from_pydict(cols, schema=schema)


READ_BATCH = 256
"""Scenes whose frame ids a reader is asked for at once while planning."""


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    """``items`` in lists of ``size`` (the last one shorter)."""
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def plan_table(
    reader: Any, config: PlanConfig, fingerprint: Mapping[str, Any], *, scene_ids: Iterable[str] | None = None,
    workers: int | None = None,
) -> "pa.Table":
    """All planned windows of ``reader`` as one Arrow table (:func:`iter_plan_batches` with
    ``workers`` processes, by default :func:`plan_workers`); raises :class:`SchemaError` when two
    planned windows share an id."""
    import pyarrow.compute as pc

    ids = list(reader.scene_ids() if scene_ids is None else scene_ids)
    workers = plan_workers(len(ids)) if workers is None else workers
    table = plan_schema().empty_table()
    batches = list(iter_plan_batches(reader, config, fingerprint, scene_ids=ids, workers=workers))
    if batches:
        import pyarrow as pa

        table = pa.Table.from_batches(batches, schema=plan_schema())
    ids = table.column("window_id")
    if pc.count_distinct(ids).as_py() != len(ids):
        counts = pc.value_counts(ids)
        dup = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
        raise SchemaError("window_id", f"two planned windows share the id {dup}", where="planner")
    return table


def assign_shards(table: "pa.Table", shard_size: int, *, skip: Any = None) -> "pa.Table":
    """``table`` (planned windows) without the windows in ``skip`` (ids already in the manifest: a
    pyarrow array or any iterable of ids), with a ``shard_id`` column: the grouping of
    :func:`make_shards` (consecutive runs of ``shard_size`` planned windows, done ones dropped after
    grouping, so a re-run reproduces the unfinished shards)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if shard_size < 1:
        raise SchemaError("shard_size", f"must be >= 1, got {shard_size}", where="planner")
    group = np.arange(table.num_rows) // shard_size
    if skip is not None:
        done = skip if isinstance(skip, (pa.Array, pa.ChunkedArray)) else pa.array(list(skip), pa.string())
        keep = pc.invert(pc.is_in(table.column("window_id"), value_set=done)).to_numpy(zero_copy_only=False)
        table, group = table.filter(pa.array(keep)), group[keep]
    ids = table.column("window_id").to_pylist()
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]]) if len(group) else np.zeros(0, dtype=np.int64)
    ends = np.r_[starts[1:], len(group)].astype(np.int64)
    shard_ids = np.empty(len(ids), dtype=object)
    for a, b in zip(starts, ends):
        shard_ids[a:b] = shard_id_of(ids[a:b])
    return table.append_column("shard_id", pa.array(shard_ids.tolist(), pa.string()))


def make_shards(windows: Sequence[PlannedWindow], shard_size: int, *, skip: Iterable[str] = ()) -> list[Shard]:
    """Group planned windows into shards of at most ``shard_size`` consecutive windows.

    Windows whose id is in ``skip`` (already in the manifest) are dropped *after* grouping, so a
    re-run with the same plan and shard size reproduces the shards of the first run and skips exactly
    the finished ones; shards left empty are omitted.
    """
    if shard_size < 1:
        raise SchemaError("shard_size", f"must be >= 1, got {shard_size}", where="planner")
    done = set(skip.to_pylist() if hasattr(skip, "to_pylist") else skip)
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
    "positions_of",
    "stride_bounds",
    "spaced_indices",
    "stride_indices",
    "random_indices",
    "scene_window_bounds",
    "scene_window_indices",
    "plan_scene",
    "TOO_SHORT",
    "failure_reason",
    "failed_window",
    "plan_windows",
    "PLAN_COLUMNS",
    "DEFAULT_SHARD_SIZE",
    "plan_schema",
    "iter_plan_batches",
    "plan_workers",
    "usable_cpus",
    "PARALLEL_MIN_BATCHES",
    "READ_BATCH",
    "plan_table",
    "assign_shards",
    "make_shards",
]
