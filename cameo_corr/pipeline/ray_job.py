"""The resumable preprocessing job on Ray Data: dataset -> windows -> pointmaps -> correspondences -> cache.

Pipeline (Ray Data's streaming executor; local Ray by default, a cluster under ``ray job submit``):

1. **source**: an Arrow table of the planned, not yet done windows
   (:func:`~cameo_corr.pipeline.planner.plan_table`: ids, scene and frame ids, and the planner's error
   for scenes that cannot give a window; planned from reader metadata, no image opened per frame,
   before the model actors start), ``ray.data.from_arrow`` in blocks of ``--batch-size`` rows;
2. **load** (CPU tasks, ``map_batches``, 1 CPU each): :func:`load_batch` rebuilds each
   :class:`~cameo_corr.schemas.WindowRecord` from ``reader.scene(scene_id)`` (the reader and a small LRU
   of scenes are cached per worker process) and reads, decodes and crops it (``load_window``);
3. **geometry** (an actor pool of ``--workers`` :class:`GeometryStage` actors, ``--gpus-per-worker``
   GPUs and ``--cpus-per-worker`` CPUs each, ``--batch-size`` windows per call): the backend, the
   pointmap checks and the token matcher on the backend's device;
4. **commit** (:class:`~cameo_corr.pipeline.commit.ShardSink`, a Ray Data ``Datasink`` with ``min_rows_per_write = shard size``):
   every write task commits its rows as one shard with :meth:`CacheWriter.write_shard` (shard group
   under a temporary name, rename, ``cache.json`` at the first commit, manifest fragment last).

Backpressure between the stages, resource reservation, task retries, actor restarts and lineage
reconstruction of blocks lost with a node are Ray Data's. Model actors reserve no CPU by default
(``--cpus-per-worker 0``): they are bounded by ``--workers`` and their GPUs, so they can never hold
every CPU while load and commit tasks wait for one (the deadlock of a scheduler whose actors each took
a CPU), whatever the ratio of workers to CPUs, also after a node is lost.

Failures: a bad window (missing frame, corrupt image, non-finite or empty pointmap, too few frames)
is a *data* error, recorded as a ``status=failed`` manifest row with its error text; the job goes on
(``--fail-fast`` stops it after the shard holding the first failure is committed). Anything else
(worker crash, node loss, out of memory) is a *system* error that Ray retries (``--max-retries``); a
bug in our code fails the run, which exits 1 and a re-run resumes.

One job per cache: the driver holds the cache's lease (:mod:`cameo_corr.pipeline.lease`) from before
Ray starts until the job ends. Before planning it sweeps orphans of killed runs, forgets shards whose
file is missing, with ``repair`` also the shards whose chunks fail their checksum (every chunk is
decoded), and with ``retry_failed`` supersedes the failed rows. While the job runs, a thread of the
driver consolidates the manifest fragments into sorted Parquet parts every ``--consolidate-every``
shards (:class:`~cameo_corr.pipeline.cache.PeriodicConsolidation`), so a killed job leaves a bounded
number of fragments; at the end it consolidates the rest.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import errno
import functools
import json
import logging
import math
import os
import pickle
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from cameo_corr.pipeline.planner import DEFAULT_SHARD_SIZE
from cameo_corr.schemas import (
    CANONICAL_SIZE,
    DEFAULT_GRID,
    DEFAULT_TAU,
    CameoCorrError,
    SchemaError,
    WindowRecord,
    as_grid,
    check_grids,
    grid_name,
    parse_grids,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pyarrow as pa

    from cameo_corr.datasets.base import SceneReader

logger = logging.getLogger(__name__)

DATA_ERRORS: tuple[type[BaseException], ...] = (CameoCorrError, OSError)
"""Exceptions that mean "this window's input is bad" (recorded as failed), not "the job is broken"."""

SCENE_CACHE_SIZE = 8
"""Scene records kept per worker process by the load stage (windows of one scene are planned together)."""

STAGES = ("read", "backend", "match", "write")
"""Busy-time stages of the summary (load, model, matcher, shard commit)."""


class UsageError(CameoCorrError):
    """A command-line value that cannot work (the CLI exits 2 with the message)."""


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------- source table
# ----------------------------------------------------------------------------- load stage (CPU tasks)
@functools.lru_cache(maxsize=4)
def _reader(dataset_json: str) -> "SceneReader":
    """The dataset reader of this worker process (opened once per process and dataset)."""
    from cameo_corr.datasets.base import open_dataset

    options = json.loads(dataset_json)
    return open_dataset(options.pop("name"), options.pop("root"), **options)


@functools.lru_cache(maxsize=SCENE_CACHE_SIZE)
def _scene(dataset_json: str, scene_id: str) -> Any:
    """``reader.scene(scene_id)`` through a small per-process LRU (errors are not cached)."""
    return _reader(dataset_json).scene(scene_id)


def window_record(dataset_json: str, row: Mapping[str, Any]) -> WindowRecord:
    """Rebuild a planned window's record: its scene's frames selected by id (none for a failed plan)."""
    if row["error"] is not None:
        return WindowRecord(row["window_id"], row["dataset"], row["split"], row["scene_id"], ())
    scene = _scene(dataset_json, row["scene_id"])
    by_id = {f.frame_id: f for f in scene.frames}
    missing = [fid for fid in row["frame_ids"] if fid not in by_id]
    if missing:
        raise SchemaError("frame_ids", f"frames {missing} are not in the scene any more", where=f"window {row['window_id']}")
    return WindowRecord(row["window_id"], row["dataset"], row["split"], row["scene_id"], tuple(by_id[f] for f in row["frame_ids"]))


def load_batch(batch: "pa.Table", *, dataset_json: str, crop: Mapping[str, Any], with_depth: bool) -> "pa.Table":
    """Load stage body: read + decode + crop each window; data errors become the row's ``error``.

    Output columns: ``window_id``, ``record`` (pickled :class:`WindowRecord`), ``data`` (pickled
    :class:`~cameo_corr.schemas.WindowData`, null when failed), ``error``, ``read_seconds``.
    """
    import pyarrow as pa

    from cameo_corr.datasets.canonical import CanonicalView, load_window

    view = CanonicalView.from_dict(crop)
    out: dict[str, list[Any]] = {"window_id": [], "record": [], "data": [], "error": [], "read_seconds": []}
    for row in batch.to_pylist():
        t0 = time.perf_counter()
        record = WindowRecord(row["window_id"], row["dataset"], row["split"], row["scene_id"], ())
        data, error = None, row["error"]
        if error is None:
            try:
                record = window_record(dataset_json, row)
                data = pickle.dumps(load_window(_reader(dataset_json), record, view, with_depth=with_depth), protocol=5)
            except DATA_ERRORS as e:
                error = _error_text(e)
        for name, value in (("window_id", row["window_id"]), ("record", pickle.dumps(record, protocol=5)), ("data", data),
                            ("error", error), ("read_seconds", time.perf_counter() - t0)):
            out[name].append(value)
    return pa.table(out, schema=pa.schema([("window_id", pa.string()), ("record", pa.large_binary()), ("data", pa.large_binary()),
                                           ("error", pa.string()), ("read_seconds", pa.float64())]))


# ----------------------------------------------------------------------------- geometry stage (actors)
def check_pointmaps(result: Any, record: WindowRecord) -> str | None:
    """Why a backend result is unusable (non-finite points where valid, a view without valid pixel)."""
    import torch

    valid = result.valid
    if not bool(torch.isfinite(result.points[valid]).all()):
        return "PointmapError: non-finite pointmap values at valid pixels"
    per_view = valid.flatten(1).any(dim=1)
    if not bool(per_view.all()):
        bad = [record.frames[i].frame_id for i in torch.nonzero(~per_view).flatten().tolist()]
        return f"PointmapError: no valid pointmap pixel in frame(s) {bad} (depth all invalid or NaN?)"
    return None


def describe_backend(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The backend entry of ``cache.json``, whether windows need depth and the device, from a backend
    built with ``spec`` where the model actors will run (a Ray task with their resources)."""
    from cameo_corr.pipeline.backends import make_backend

    backend = make_backend(spec["backend"], **spec["backend_options"])
    return {"backend": backend.describe(), "needs_depth": bool(backend.needs_depth), "device": str(backend.device)}


class GeometryStage:
    """One model replica of the actor pool: the geometry backend and the token matcher.

    ``spec`` holds ``backend``, ``backend_options``, ``match_backend``, ``grid``, ``extra_grids``
    (tokenized and matched from the same pointmaps: one backend pass per window), ``tau`` and
    ``expected`` (the backend description the cache's config was built with; an actor whose backend
    describes itself differently, e.g. another dtype on another GPU type, refuses to start).
    """

    def __init__(self, spec: Mapping[str, Any]) -> None:
        from cameo_corr.pipeline.backends import make_backend

        self.spec = dict(spec)
        self.backend = make_backend(spec["backend"], **spec["backend_options"])
        described = self.backend.describe()
        if json.dumps(described, sort_keys=True, default=str) != json.dumps(spec["expected"], sort_keys=True, default=str):
            raise RuntimeError(f"this worker's backend describes itself as {described}, the cache config says {spec['expected']}")
        self.ready_time = time.time()

    def __call__(self, batch: "pa.Table") -> "pa.Table":
        """Pointmaps + correspondences of the loaded windows of ``batch`` (drops the ``data`` column).

        Adds ``arrays`` (pickled cache arrays, null when failed), ``backend_seconds``,
        ``match_seconds`` and ``ready_time`` (when this actor finished loading its model, UNIX time).
        """
        import pyarrow as pa

        rows = batch.to_pylist()
        records = [pickle.loads(r["record"]) for r in rows]
        errors: list[str | None] = [r["error"] for r in rows]
        arrays: list[bytes | None] = [None] * len(rows)
        backend_s, match_s = [0.0] * len(rows), [0.0] * len(rows)
        ready = [k for k, r in enumerate(rows) if r["error"] is None]
        t0 = time.perf_counter()
        results = self._pointmaps([pickle.loads(rows[k]["data"]) for k in ready])
        share = (time.perf_counter() - t0) / max(len(ready), 1)
        for k, result in zip(ready, results):
            backend_s[k] = share
            t1 = time.perf_counter()
            outcome = self._correspond(records[k], result)
            match_s[k] = time.perf_counter() - t1
            if isinstance(outcome, str):
                errors[k] = outcome
            else:
                arrays[k] = pickle.dumps(outcome, protocol=5)
        return pa.table(
            {"window_id": [r["window_id"] for r in rows], "record": [r["record"] for r in rows], "arrays": arrays, "error": errors,
             "read_seconds": [r["read_seconds"] for r in rows], "backend_seconds": backend_s, "match_seconds": match_s,
             "ready_time": [self.ready_time] * len(rows)},
            schema=pa.schema([("window_id", pa.string()), ("record", pa.large_binary()), ("arrays", pa.large_binary()),
                              ("error", pa.string()), ("read_seconds", pa.float64()), ("backend_seconds", pa.float64()),
                              ("match_seconds", pa.float64()), ("ready_time", pa.float64())]),
        )

    def _pointmaps(self, windows: list[Any]) -> list[Any]:
        """Backend outputs (or error strings) for loaded windows, batched, isolating data errors."""
        if not windows:
            return []
        try:
            return list(self.backend.run_batch(windows))
        except DATA_ERRORS as e:
            if len(windows) == 1:
                return [_error_text(e)]
        results: list[Any] = []
        for d in windows:  # find the bad window(s): one by one
            try:
                results.append(self.backend(d))
            except DATA_ERRORS as e1:
                results.append(_error_text(e1))
        return results

    def _correspond(self, record: WindowRecord, result: Any) -> "dict[str, Any] | str":
        """The window's cache arrays, or the error text of a data error."""
        from cameo_corr.pipeline.cache import window_arrays
        from cameo_corr.pipeline.match import correspond

        if isinstance(result, str):
            return result
        problem = check_pointmaps(result, record)
        if problem is not None:
            return problem
        try:
            corr = correspond(result, grid=tuple(self.spec["grid"]), tau=self.spec["tau"], backend=self.spec["match_backend"])
            extra = {tuple(g): correspond(result, grid=tuple(g), tau=self.spec["tau"], backend=self.spec["match_backend"])
                     for g in self.spec.get("extra_grids", ())}
            return window_arrays(corr, result, extra)
        except DATA_ERRORS as e:
            return _error_text(e)


def _watch_progress(counter: Any, total: int, stop: threading.Event) -> None:
    """Driver thread: a tqdm bar of committed windows with ok / failed counts and the rate."""
    import ray
    from tqdm import tqdm

    bar = tqdm(total=total, unit="win", desc="preprocess", dynamic_ncols=True)
    try:
        while True:
            stopping = stop.wait(1.0)
            try:
                ok, failed = ray.get(counter.get.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - progress only: the counter may be restarting
                ok, failed = bar.n, 0
            bar.update(ok + failed - bar.n)
            bar.set_postfix(ok=ok, failed=failed, refresh=True)
            if stopping:
                return
    finally:
        bar.close()


# ----------------------------------------------------------------------------- driver
def _init_ray(num_cpus: int | None, needed_cpus: float) -> bool:
    """Connect to ``RAY_ADDRESS`` if set (a cluster, or ``ray job submit``), else start a local
    instance (never an unrelated ``ray start`` cluster of this machine); returns whether this call
    connected. A local instance gets ``num_cpus`` logical CPUs, by default enough for one load and
    one commit task next to the actors' reservation (logical CPUs only gate scheduling).

    Ray >= 2.5x enables token authentication for new local instances (a token in ``~/.ray``) and logs
    a warning saying so on every start; a local start keeps that default and drops the notice.
    """
    import ray

    if ray.is_initialized():
        return False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return True
    cpus = num_cpus if num_cpus is not None else max(os.cpu_count() or 1, int(needed_cpus + 0.999) + 2)
    auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = auth_log.level
    auth_log.setLevel(logging.ERROR)  # Ray's default (token auth on) stays; only its per-start notice goes
    try:
        ray.init(address="local", num_cpus=cpus, include_dashboard=False)
    finally:
        auth_log.setLevel(level)
    return True


def preflight_backend(
    backend: str, gpus_per_worker: float, backend_options: Mapping[str, Any] | None, reader: "SceneReader | None" = None
) -> None:
    """Driver-side checks before any worker starts: the backend exists (:class:`UsageError`), its
    optional packages are installed (:class:`ImportError` with an install hint otherwise), a backend
    that needs depth gets a dataset that has depth (:class:`SchemaError` naming ``backend``), and a GPU
    backend given no GPU is warned about."""
    from cameo_corr.pipeline.backends import backend_class

    try:
        cls = backend_class(backend)
    except ValueError as e:
        raise UsageError(f"--backend {backend}: {e}") from None
    cls.check_requirements()
    if reader is not None and cls.needs_depth and not reader.has_depth:
        raise SchemaError("backend", f"the {backend!r} backend needs depth, and dataset {reader.name!r} has none "
                          "(use a geometry model such as --backend vggt)", where=str(reader.root))
    if cls.wants_gpu and gpus_per_worker <= 0 and (backend_options or {}).get("device") != "cpu":
        warnings.warn(f"--gpus-per-worker is 0: Ray gives the workers no GPU, so the {backend!r} backend runs on CPU "
                      "in fp32 (pass --gpus-per-worker 1, or --device cpu to silence this)", stacklevel=3)


def _absolute_root(root: str | Path) -> str:
    text = str(root)
    return text if "://" in text else os.path.abspath(text)


def check_job_options(*, workers: int, gpus_per_worker: float, cpus_per_worker: float, shard_size: int, batch_size: int,
                      max_retries: int, crop_size: int, grid: tuple[int, int], lease_timeout: float,
                      extra_grids: Sequence[tuple[int, int]] = (), consolidate_every: int = 1, consolidate_seconds: float = 1.0) -> None:
    """Refuse values that cannot work, naming the flag and what is valid (:class:`UsageError`)."""
    try:
        check_grids([grid, *extra_grids])
    except SchemaError as e:
        raise UsageError(f"--grid: {e.message}") from None
    side = max(max(g) for g in (grid, *extra_grids))
    checks = [
        (workers >= 1, f"--workers must be >= 1 (model actors), got {workers}"),
        (gpus_per_worker >= 0, f"--gpus-per-worker must be >= 0, got {gpus_per_worker}"),
        (cpus_per_worker >= 0, f"--cpus-per-worker must be >= 0, got {cpus_per_worker}"),
        (shard_size >= 1, f"--shard-size must be >= 1 (windows per shard), got {shard_size}"),
        (batch_size >= 1, f"--batch-size must be >= 1 (windows per backend call), got {batch_size}"),
        (max_retries >= -1, f"--max-retries must be >= 0, or -1 for unlimited, got {max_retries}"),
        (crop_size >= side, f"--crop-size must be an integer >= the token grid side ({side} for --grid "
                            f"{','.join(str(g[0]) if g[0] == g[1] else grid_name(g) for g in (grid, *extra_grids))}: every token needs "
                            f"at least one pixel), got {crop_size}"),
        (lease_timeout > 0, f"--lease-timeout must be > 0 seconds, got {lease_timeout}"),
        (consolidate_every >= 1, f"--consolidate-every must be >= 1 (pending shard fragments), got {consolidate_every}"),
        (consolidate_seconds > 0, f"--consolidate-seconds must be > 0, got {consolidate_seconds}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def check_out(out: str | Path, storage_options: Mapping[str, Any] | None) -> "Any":
    """The cache location, refusing an ``--out`` that is a file (:class:`UsageError`)."""
    from cameo_corr.pipeline.cache import CacheLocation

    try:
        location = CacheLocation(out, storage_options)
    except ValueError as e:
        raise UsageError(f"--out {out}: {e}") from None
    if location.fs.isfile(location.root):
        raise UsageError(f"--out {out}: is a file; give a cache directory (new or existing)")
    return location


def _root_cause(e: BaseException) -> BaseException:
    """The first of our errors (or an ``OSError``) behind a Ray/Ray Data exception chain, else ``e``."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [e]
    while stack:
        x = stack.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, (CameoCorrError, OSError)) and not type(x).__module__.startswith("ray"):
            return x
        stack += [getattr(x, "cause", None), x.__cause__, x.__context__]
    return e


class CacheWriteError(CameoCorrError):
    """The cache storage refused a write (full disk, permissions, quota): the run failed."""


def run_preprocess(
    *,
    dataset: str,
    root: str | Path,
    out: str | Path,
    backend: str = "depth",
    grid: int | tuple[int, int] = DEFAULT_GRID,
    extra_grids: Sequence[int | tuple[int, int]] = (),
    views: int = 8,
    tau: float = DEFAULT_TAU,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 0.0,
    windows_per_scene: int = 1,
    split: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    fail_fast: bool = False,
    backend_options: Mapping[str, Any] | None = None,
    dataset_options: Mapping[str, Any] | None = None,
    crop_policy: str | None = None,
    crop_size: int = CANONICAL_SIZE,
    sampling: str | None = None,
    span_per_view: tuple[float, float] | None = None,
    positions: str | None = None,
    fps: float | None = None,
    seed: int = 0,
    scenes: Sequence[str] | None = None,
    match_backend: str = "auto",
    batch_size: int = 1,
    num_cpus: int | None = None,
    max_retries: int = 3,
    storage_options: Mapping[str, Any] | None = None,
    retry_failed: bool = False,
    repair: bool = False,
    force: bool = False,
    lease_timeout: float | None = None,
    consolidate_every: int | None = None,
    consolidate_seconds: float | None = None,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Fill (or complete) the cache at ``out`` from a dataset; return a summary dict.

    ``grid`` is ``h = w`` or ``(h, w)``; ``extra_grids`` are more grids tokenized and matched from the
    same pointmaps (one backend pass per window serves them all; ``grid`` stays the primary one, what
    the manifest fractions describe); ``split=None`` uses the reader's default split; ``scenes``
    restricts the run to some scene ids. ``sampling``/``span_per_view``/``positions``/``fps``/``seed``
    override :func:`~cameo_corr.pipeline.planner.default_plan_config`. ``crop_policy=None`` uses the
    reader's default. ``retry_failed`` redoes the windows that have failed rows (the rows are
    superseded); ``repair`` decodes every chunk of the existing cache first and redoes the windows of
    shards that fail (``cache verify --deep``); ``force`` takes over another job's lease; ``lease_timeout`` (default
    :data:`~cameo_corr.pipeline.lease.DEFAULT_LEASE_TIMEOUT`) is when an unrenewed lease is stale.
    While the job runs, the driver consolidates the manifest once ``consolidate_every`` shard fragments
    are pending (default :data:`~cameo_corr.pipeline.cache.DEFAULT_CONSOLIDATE_EVERY`), or every
    ``consolidate_seconds`` (default :data:`~cameo_corr.pipeline.cache.DEFAULT_CONSOLIDATE_SECONDS`) when
    any are, so a killed job leaves about ``consolidate_every`` fragments for the next start-up to read.

    Summary keys: ``windows_planned``, ``windows_skipped`` (already in the manifest),
    ``windows_ok``, ``windows_failed`` (rows this run committed), ``shard_size`` (``shard_size`` capped
    at ``ceil(to do / workers)`` so small runs keep every worker busy), ``shards_written``,
    ``shard_errors`` (``(where, error)`` of a run that failed), ``stopped_early``, ``orphans_removed``,
    ``shards_repaired`` (missing shard files), ``shards_corrupt`` (dropped by ``repair``),
    ``failed_retried``, ``manifest_consolidations`` (periodic, while the job ran), ``seconds``, ``windows_per_second`` (end to end),
    ``startup_seconds`` (until the first model actor was ready), ``processing_windows_per_second``
    (after start-up), ``stage_seconds``, ``bytes_written``, ``bytes_per_window``, ``errors`` (first 20
    window errors).
    """
    import pyarrow.compute as pc
    import ray

    import cameo_corr
    from cameo_corr.datasets.base import open_dataset
    from cameo_corr.datasets.canonical import CanonicalView
    from cameo_corr.pipeline.cache import (
        COMPARED_FIELDS, DEFAULT_CONSOLIDATE_EVERY, DEFAULT_CONSOLIDATE_SECONDS, CacheWriter, PeriodicConsolidation, check_compatible,
        fragment_names, read_config, read_manifest,
    )
    from cameo_corr.pipeline.lease import DEFAULT_LEASE_TIMEOUT, CacheLease
    from cameo_corr.pipeline.cache import CorrCache
    from cameo_corr.pipeline.cache_tools import repair_corrupt_shards
    from cameo_corr.pipeline.planner import default_plan_config, plan_table
    from cameo_corr.schemas import CacheConfig

    t_start, t_start_wall = time.perf_counter(), time.time()
    grid_hw = as_grid(grid)
    extra_hw = tuple(as_grid(g) for g in extra_grids)
    lease_timeout = DEFAULT_LEASE_TIMEOUT if lease_timeout is None else float(lease_timeout)
    consolidate_every = DEFAULT_CONSOLIDATE_EVERY if consolidate_every is None else int(consolidate_every)
    consolidate_seconds = DEFAULT_CONSOLIDATE_SECONDS if consolidate_seconds is None else float(consolidate_seconds)
    check_job_options(workers=workers, gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker, shard_size=shard_size,
                      batch_size=batch_size, max_retries=max_retries, crop_size=crop_size, grid=grid_hw, lease_timeout=lease_timeout,
                      extra_grids=extra_hw, consolidate_every=consolidate_every, consolidate_seconds=consolidate_seconds)
    location = check_out(out, storage_options)
    ds_options = dict(dataset_options or {})
    if split is not None:
        ds_options["split"] = split
    reader = open_dataset(dataset, _absolute_root(root), **ds_options)
    plan = default_plan_config(
        dataset, views=views, windows_per_scene=windows_per_scene, policy=sampling,
        span_per_view=span_per_view, positions=positions, fps=fps, seed=seed,
    )
    view = CanonicalView(size=crop_size, policy=crop_policy or reader.preferred_crop_policy())

    # refuse a mismatching cache before starting Ray (the full backend entry is checked once described)
    provisional = CacheConfig(grid=grid_hw, tau=float(tau), views=views, backend={"name": backend}, crop=view.to_dict(),
                              dataset=reader.describe(), extra_grids=extra_hw)
    provisional.validate()
    check_compatible(location, provisional, [f for f in COMPARED_FIELDS if f != "backend"])
    preflight_backend(backend, gpus_per_worker, backend_options, reader)
    if location.exists("cache.json"):
        recorded = read_config(location).backend
        given = {"name": backend, **(backend_options or {})}
        diff = {k: (recorded[k], v) for k, v in given.items() if k in recorded and v != "auto" and recorded[k] != v}
        if diff:
            from cameo_corr.pipeline.cache import CacheMismatchError

            detail = "; ".join(f"{k}: cache has {a}, this run has {b}" for k, (a, b) in diff.items())
            raise CacheMismatchError("backend", f"refusing to mix configs in one cache ({detail}); write to a new --out",
                                     where=location.url("cache.json"))

    try:
        lease = CacheLease(location, timeout=lease_timeout, force=force).acquire()
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write the cache there ({e.strerror or e})") from None
    started = False
    try:
        started = _init_ray(num_cpus, workers * cpus_per_worker)
        cluster_cpus = float(ray.cluster_resources().get("CPU", 0.0))
        if workers * cpus_per_worker > cluster_cpus - 1:
            raise UsageError(f"--workers {workers} x --cpus-per-worker {cpus_per_worker} leaves no CPU of the cluster's "
                             f"{cluster_cpus:g} for the load and commit tasks; lower --cpus-per-worker (0 is fine)")
        spec = {"backend": backend, "backend_options": dict(backend_options or {}), "match_backend": match_backend,
                "grid": list(grid_hw), "extra_grids": [list(g) for g in extra_hw], "tau": float(tau)}
        describe = ray.remote(describe_backend).options(num_cpus=0, num_gpus=gpus_per_worker, max_retries=max_retries)
        described = ray.get(describe.remote(spec))
        config = CacheConfig(
            grid=grid_hw,
            extra_grids=extra_hw,
            tau=float(tau),
            views=views,
            backend=described["backend"],
            crop=view.to_dict(),
            dataset=reader.describe(),
            created_by={
                "package": "cameo-corr",
                "version": cameo_corr.__version__,
                "command": command or "run_preprocess",
                "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "plan": plan.to_dict(),
                "devices": [described["device"]],
            },
        )
        config.validate()
        writer = CacheWriter(out, config, storage_options)
        writer.initialize()
        orphans = writer.remove_orphans()
        repaired = writer.repair_missing_shards()
        corrupt: list[str] = []
        if repair and location.exists("cache.json"):
            corrupt = repair_corrupt_shards(CorrCache(out, dict(storage_options or {}) or None))["shards"]
        retried = writer.drop_failed_rows() if retry_failed else []
        table = plan_table(reader, plan, config.fingerprint(), scene_ids=scenes)
        todo = table.filter(pc.invert(pc.is_in(table.column("window_id"), value_set=writer.done_window_ids())))
        total = todo.num_rows
        effective_shard_size = max(1, min(shard_size, math.ceil(total / workers))) if total else shard_size
        fragments_before = set(fragment_names(location))
        sink, stopped, shard_errors, shards_written = None, False, [], 0
        t_ready = time.perf_counter()
        # the driver (the lease holder) consolidates while the write tasks commit: bounded pending fragments
        periodic = PeriodicConsolidation(location, every_shards=consolidate_every, every_seconds=consolidate_seconds,
                                         holds_lease=lambda: lease.lost is None)
        if total:
            periodic.start()
            try:
                sink, stopped, shard_errors, t_ready = _run_pipeline(
                    todo, config, reader, spec, described["needs_depth"], view, str(out), storage_options, workers=workers,
                    gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker, batch_size=batch_size,
                    shard_size=effective_shard_size, max_retries=max_retries, fail_fast=fail_fast, progress=progress,
                    t_start=(t_start, t_start_wall),
                )
            finally:
                periodic.stop()
        shards_written = len((periodic.merged | set(fragment_names(location))) - fragments_before)
        if lease.lost:
            shard_errors.append(("lease", f"the cache's lease was taken over by {lease.lost} during the run"))
        else:  # job end: this run's fragments join the sorted consolidated manifest
            writer.consolidate()
    finally:
        lease.release()
        if started:
            ray.shutdown()

    t_end = time.perf_counter()
    mine = read_manifest(location, columns=["window_id", "status", "error"],
                         filter=pc.field("window_id").isin(todo.column("window_id").combine_chunks()))
    failed_rows = mine.filter(pc.equal(mine.column("status"), "failed"))
    n_failed = failed_rows.num_rows
    n_ok = mine.num_rows - n_failed
    results = sink.results if sink is not None else []
    stages = {k: float(sum(r["stages"][k] for r in results)) for k in STAGES}
    nbytes = sum(r["bytes"] for r in results)
    seconds = t_end - t_start
    processed = n_ok + n_failed
    return {
        "out": str(out),
        "windows_planned": table.num_rows,
        "windows_skipped": table.num_rows - total,
        "windows_ok": n_ok,
        "windows_failed": n_failed,
        "shard_size": effective_shard_size,
        "shards_written": shards_written,
        "shard_errors": shard_errors,
        "stopped_early": stopped,
        "orphans_removed": len(orphans),
        "shards_repaired": len(repaired),
        "shards_corrupt": len(corrupt),
        "failed_retried": len(retried),
        "manifest_consolidations": periodic.rounds,
        "seconds": seconds,
        "windows_per_second": processed / seconds if seconds > 0 else 0.0,
        "startup_seconds": t_ready - t_start,
        "processing_windows_per_second": processed / (t_end - t_ready) if t_end > t_ready else 0.0,
        "stage_seconds": stages,
        "bytes_written": nbytes,
        "bytes_per_window": nbytes / n_ok if n_ok and nbytes else 0.0,
        "errors": list(zip(failed_rows.column("window_id").to_pylist()[:20], failed_rows.column("error").to_pylist()[:20])),
    }


def _run_pipeline(
    todo: "pa.Table", config: Any, reader: "SceneReader", spec: dict[str, Any], needs_depth: bool, view: Any, out: str,
    storage_options: Mapping[str, Any] | None, *, workers: int, gpus_per_worker: float, cpus_per_worker: float,
    batch_size: int, shard_size: int, max_retries: int, fail_fast: bool, progress: bool, t_start: tuple[float, float],
) -> tuple[Any, bool, list[tuple[str, str]], float]:
    """Build and run the Ray Data pipeline over ``todo``; return the sink (its write results), whether
    ``--fail-fast`` stopped it, the run's errors and the (perf-counter) time the first actor was ready."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext
    from ray.util.debug import log_once
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from cameo_corr.pipeline.commit import FailFastStop, ProgressCounter, ShardSink

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver shows ok / failed / rate itself ...
    log_once("ray_data_progress_manager_disabled")  # ... so Ray Data's notice about its own bars is moot
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    counter, stop, watcher = None, threading.Event(), None
    if progress:
        counter = ray.remote(ProgressCounter).options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        ).remote()
        watcher = threading.Thread(target=_watch_progress, args=(counter, todo.num_rows, stop), daemon=True)
        watcher.start()
    sink = ShardSink(out, storage_options, config.to_json(), shard_size, fail_fast, counter)
    # retries (jobs/README.md): --max-retries bounds the retries of a load/commit task and the restarts
    # of a model actor (-1: Ray Data's default, unlimited). Calls on an actor are always retried
    # (Ray Data's default): after a node loss they fail fast with "actor unavailable" until Ray has
    # declared the node dead and restarted the actor elsewhere, so any bound would abort the job.
    # Ray marks these remote args deprecated in favour of its own defaults, hence the filter.
    task_retries = {} if max_retries < 0 else {"max_retries": max_retries}
    actor_retries = {} if max_retries < 0 else {"max_restarts": max_retries}
    blocks = [todo.slice(i, batch_size) for i in range(0, todo.num_rows, batch_size)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        ds = ray.data.from_arrow(blocks)
        ds = ds.map_batches(
            load_batch, batch_format="pyarrow", batch_size=batch_size, num_cpus=1, **task_retries,
            fn_kwargs={"dataset_json": json.dumps(reader.describe(), sort_keys=True, default=str), "crop": view.to_dict(),
                       "with_depth": needs_depth},
        )
        ds = ds.map_batches(
            GeometryStage, batch_format="pyarrow", batch_size=batch_size, compute=ActorPoolStrategy(size=workers),
            num_gpus=gpus_per_worker, num_cpus=cpus_per_worker, **actor_retries,
            fn_constructor_kwargs={"spec": {**spec, "expected": config.backend}},
        )
    stopped, errors = False, []
    try:
        ds.write_datasink(sink, ray_remote_args={**task_retries, "num_cpus": 1})
    except Exception as e:  # noqa: BLE001 - classified below: ours, storage, or a failed run
        cause = _root_cause(e)
        if isinstance(cause, FailFastStop):
            stopped = True
            errors = []
        elif isinstance(cause, OSError):
            raise CacheWriteError(f"cannot write the cache at {out}: {cause.strerror or cause}"
                                  + (" (the disk is full)" if cause.errno == errno.ENOSPC else "")) from None
        elif isinstance(cause, CameoCorrError):
            raise cause from None
        else:
            errors = [("*", " ".join(f"{type(cause).__name__}: {cause}".split())[:500])]
    finally:
        stop.set()
        if watcher is not None:
            watcher.join(timeout=15)
    ready = min((r["ready"] for r in sink.results), default=math.inf)
    t_ready = t_start[0] + (ready - t_start[1]) if math.isfinite(ready) else time.perf_counter()
    return sink, stopped, errors, t_ready


# ----------------------------------------------------------------------------- command line
def key_value_arg(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE parsed as JSON when it is valid JSON, else kept as a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def grids_arg(text: str) -> tuple[tuple[int, int], ...]:
    """``--grid`` value: one or several comma-separated grids (:func:`~cameo_corr.schemas.parse_grids`)."""
    try:
        return parse_grids(text)
    except SchemaError as e:
        raise argparse.ArgumentTypeError(e.message) from None


def grid_arg(text: str) -> tuple[int, int]:
    """A ``--grid`` value naming exactly one grid (``32``, ``32x16``)."""
    grids = grids_arg(text)
    if len(grids) != 1:
        raise argparse.ArgumentTypeError(f"give one grid (like 32 or 32x16), got {text!r}")
    return grids[0]


def add_preprocess_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``cameo-corr preprocess`` (shared with ``jobs/preprocess.py``).

    Backend flags come from :func:`cameo_corr.pipeline.backends.add_backend_arguments` (read back by
    ``backend_options_from_args``); that module imports torch lazily, so the parser stays light.
    """
    from cameo_corr.datasets.base import DATASET_NAMES
    from cameo_corr.pipeline.backends import add_backend_arguments
    from cameo_corr.pipeline.planner import POSITION_UNITS, SAMPLING_POLICIES

    parser.add_argument("--dataset", required=True, choices=DATASET_NAMES, help="dataset reader")
    parser.add_argument("--root", required=True, help="dataset root directory")
    parser.add_argument("--out", required=True, help="cache directory or fsspec URL (s3://bucket/cache)")
    parser.add_argument("--split", default=None, help="dataset split (default: the reader's default)")
    parser.add_argument("--dataset-option", action="append", type=key_value_arg, default=[], metavar="KEY=VALUE",
                        help="extra reader option (JSON value), repeatable")
    parser.add_argument("--grid", type=grids_arg, default=((DEFAULT_GRID, DEFAULT_GRID),), metavar="SIDES",
                        help="token grid side h = w, or several comma-separated (16,32,64: one backend pass stores every "
                             "grid; the first is the primary one); 32x16 for h x w (default: 32)")
    parser.add_argument("--views", type=int, default=8, help="views per window S (default: 8)")
    parser.add_argument("--tau", type=float, default=DEFAULT_TAU, help="cycle-consistency threshold in tokens (default: 1.5)")
    parser.add_argument("--windows-per-scene", type=int, default=1, help="windows K drawn per scene (default: 1)")
    parser.add_argument("--sampling", choices=SAMPLING_POLICIES, default=None, help="window sampling (default: per dataset)")
    parser.add_argument("--span-per-view", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                        help="stride sampling: window span in [S*LO, S*HI] raw frames (default: 48 144)")
    parser.add_argument("--positions", choices=POSITION_UNITS, default=None, help="stride sampling: frame positions (default: per dataset)")
    parser.add_argument("--fps", type=float, default=None, help="raw video frame rate for timestamp positions (default: 30)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--scene", action="append", default=None, help="only this scene id (repeatable)")
    parser.add_argument("--crop-policy", choices=("center", "principal_point", "mask_bbox"), default=None,
                        help="canonical crop (default: the reader's; CO3D with masks: pass mask_bbox)")
    parser.add_argument("--crop-size", type=int, default=CANONICAL_SIZE, help="canonical view side in pixels (default: 512)")
    add_backend_arguments(parser)
    parser.add_argument("--match-backend", default="auto", choices=("auto", "torch", "faiss", "kdtree"), help="exact NN method (default: auto)")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per backend call (VGGT batching; default: 1)")
    parser.add_argument("--workers", type=int, default=1, help="model actors (default: 1)")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per model actor (default: 0)")
    parser.add_argument("--cpus-per-worker", type=float, default=0.0,
                        help="logical CPUs reserved per model actor (default: 0, so actors never starve the load and commit tasks)")
    parser.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of a local Ray instance")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                        help=f"windows per shard = unit of commit (default: {DEFAULT_SHARD_SIZE}; capped at ceil(windows / workers))")
    parser.add_argument("--max-retries", type=int, default=3,
                        help="Ray retries of a load/commit task and restarts of a model actor after a system failure (default: 3; -1: unlimited)")
    parser.add_argument("--retry-failed", action="store_true", help="redo the windows recorded as failed (their rows are superseded)")
    parser.add_argument("--repair", action="store_true",
                        help="decode every chunk of the existing cache first and redo the windows of shards that fail their checksum")
    parser.add_argument("--force", action="store_true", help="take over the cache's lease even if another job renewed it recently")
    parser.add_argument("--lease-timeout", type=float, default=None,
                        help="seconds without renewal after which another job's lease is stale (default: 180)")
    parser.add_argument("--consolidate-every", type=int, default=None, metavar="SHARDS",
                        help="consolidate the manifest while the job runs once this many shard fragments are pending "
                             "(default: 256; a killed job leaves about this many for the next start-up to read)")
    parser.add_argument("--consolidate-seconds", type=float, default=None,
                        help="also consolidate pending fragments after this many seconds (default: 600)")
    parser.add_argument("--storage-option", action="append", type=key_value_arg, default=[], metavar="KEY=VALUE",
                        help="fsspec storage option for --out (JSON value), repeatable")
    parser.add_argument("--fail-fast", action="store_true", help="stop and exit non-zero at the first failed window")
    parser.add_argument("--summary-json", default=None, help="also write the summary to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_from_args(args: argparse.Namespace) -> int:
    """Run the job from parsed arguments, print the summary, return 0.

    Errors are raised for the CLI's one error layer (:func:`cameo_corr.cli.main`): input and usage
    errors (bad flag values, a busy or unwritable ``--out``, a mismatching cache, a missing optional
    package) before Ray starts exit 2; a failed run (storage error, Ray failure, ``--fail-fast``, no
    window succeeded) raises :class:`~cameo_corr.cli.RunFailed` (exit 1); Ctrl-C exits 130 saying
    that committed shards are kept.
    """
    from cameo_corr.cli import RunFailed
    from cameo_corr.pipeline.backends import backend_options_from_args

    try:
        backend_options = backend_options_from_args(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        summary = run_preprocess(
            dataset=args.dataset,
            root=args.root,
            out=args.out,
            backend=args.backend,
            grid=args.grid[0],
            extra_grids=args.grid[1:],
            views=args.views,
            tau=args.tau,
            workers=args.workers,
            gpus_per_worker=args.gpus_per_worker,
            cpus_per_worker=args.cpus_per_worker,
            windows_per_scene=args.windows_per_scene,
            split=args.split,
            shard_size=args.shard_size,
            fail_fast=args.fail_fast,
            backend_options=backend_options,
            dataset_options=dict(args.dataset_option),
            crop_policy=args.crop_policy,
            crop_size=args.crop_size,
            sampling=args.sampling,
            span_per_view=tuple(args.span_per_view) if args.span_per_view else None,
            positions=args.positions,
            fps=args.fps,
            seed=args.seed,
            scenes=args.scene,
            match_backend=args.match_backend,
            batch_size=args.batch_size,
            num_cpus=args.num_cpus,
            max_retries=args.max_retries,
            storage_options=dict(args.storage_option),
            retry_failed=args.retry_failed,
            repair=args.repair,
            force=args.force,
            lease_timeout=args.lease_timeout,
            consolidate_every=args.consolidate_every,
            consolidate_seconds=args.consolidate_seconds,
            progress=not args.no_progress,
            command=" ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        )
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"the shards already committed to {args.out} are kept, re-run the same command to resume") from None
    except CacheWriteError as e:
        raise RunFailed(str(e)) from None
    except ImportError as e:
        raise UsageError(str(e)) from None
    print(format_summary(summary))
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2, default=str))
    if summary["shard_errors"]:
        raise RunFailed(f"the run failed ({summary['shard_errors'][0][1]}); committed shards are kept, re-run to resume")
    if summary["stopped_early"] or (args.fail_fast and summary["windows_failed"]):
        raise RunFailed(f"--fail-fast: stopped at the first failed window ({summary['errors'][0][1] if summary['errors'] else '?'})")
    if summary["windows_planned"] and not summary["windows_ok"] and not summary["windows_skipped"]:
        first = summary["errors"][0][1] if summary["errors"] else "no error recorded"
        raise RunFailed(f"no window succeeded: all {summary['windows_failed']} windows failed, first: {first} (see the 'failed' "
                        f"lines above; e.g. fewer frames per scene than --views {args.views}?)")
    return 0

def format_summary(summary: Mapping[str, Any]) -> str:
    """Human-readable summary of :func:`run_preprocess`."""
    st = summary["stage_seconds"]
    busy = sum(st[k] for k in ("read", "backend", "match", "write")) or 1.0
    lines = [
        f"cache: {summary['out']}",
        f"windows: planned {summary['windows_planned']}, already done {summary['windows_skipped']}, "
        f"ok {summary['windows_ok']}, failed {summary['windows_failed']}",
        f"shards written: {summary['shards_written']}, orphans removed: {summary['orphans_removed']}, "
        f"shards repaired: {summary['shards_repaired']} missing, {summary['shards_corrupt']} corrupt, failed windows retried: {summary['failed_retried']}, "
        f"shard errors: {len(summary['shard_errors'])}" + (" (stopped early)" if summary["stopped_early"] else ""),
        f"time: {summary['seconds']:.1f} s ({summary['startup_seconds']:.1f} s start-up), "
        f"{summary['windows_per_second']:.2f} windows/s end to end, {summary['processing_windows_per_second']:.2f} after start-up; stages "
        + ", ".join(f"{k} {st[k]:.1f} s ({100 * st[k] / busy:.0f}%)" for k in ("read", "backend", "match", "write")),
        f"bytes written: {summary['bytes_written']}, per ok window: {summary['bytes_per_window']:.0f}",
    ]
    lines += [f"  failed {wid}: {err}" for wid, err in summary["errors"]]
    lines += [f"  shard error {sid}: {err}" for sid, err in summary["shard_errors"]]
    return "\n".join(lines)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cameo-corr preprocess``."""
    parser = subparsers.add_parser(
        "preprocess",
        help="build or resume a correspondence cache with Ray",
        description=(
            "Plan windows of a dataset, run a geometry backend on a Ray Data pipeline, match tokens and "
            "write a sharded zarr cache + parquet manifest. Re-running resumes: windows with manifest rows "
            "are skipped, shards whose folder is missing are redone. One job per cache (a lease). Local "
            "Ray by default; set RAY_ADDRESS or use `ray job submit` for a cluster (see jobs/README.md)."
        ),
    )
    add_preprocess_arguments(parser)
    parser.set_defaults(func=run_from_args)


__all__ = [
    "DATA_ERRORS",
    "UsageError",
    "CacheWriteError",
    "window_record",
    "load_batch",
    "check_pointmaps",
    "describe_backend",
    "GeometryStage",
    "preflight_backend",
    "check_job_options",
    "check_out",
    "run_preprocess",
    "key_value_arg",
    "grids_arg",
    "grid_arg",
    "add_preprocess_arguments",
    "run_from_args",
    "format_summary",
    "register_cli",
]
