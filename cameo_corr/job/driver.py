"""The preprocessing job's driver: :func:`run_job` reads as the pipeline it runs.

check the input (before Ray starts) -> take the cache's lease -> start or join Ray -> describe the
backend where the model actors will run -> check the cache's identity -> upkeep of the cache (orphans,
missing and corrupt shards, failed windows to retry) -> plan the windows still to do -> run the stages
(:mod:`cameo_corr.job.stages`) while a driver thread consolidates the manifest -> consolidate the rest
-> the summary.

Failures: a bad window is a *data* error, recorded as a ``status=failed`` manifest row; the job goes on
(``fail_fast`` stops it after the shard holding the first failure is committed). Anything else (worker
crash, node loss, out of memory) is a *system* error that Ray retries (``max_retries``); a bug in our
code fails the run, which a re-run resumes. Backpressure between the stages, resource reservation,
task retries, actor restarts and lineage reconstruction of blocks lost with a node are Ray Data's.
Model actors reserve no CPU by default (``cpus_per_worker=0``): they are bounded by ``workers`` and
their GPUs, so they can never hold every CPU while load and commit tasks wait for one.

One job per cache: the driver holds the cache's lease (:mod:`cameo_corr.cache.lease`) from before Ray
starts until the job ends. While the job runs, a thread of the driver consolidates the manifest
fragments into sorted Parquet parts every ``consolidate_every`` shards
(:class:`~cameo_corr.cache.consolidation.PeriodicConsolidation`), so a killed job leaves a bounded
number of fragments; at the end it consolidates the rest.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import errno
import logging
import math
import os
import re
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from cameo_corr.cache.config import COMPARED_FIELDS, CacheMismatchError, check_compatible, mismatch_error, read_existing_config
from cameo_corr.cache.consolidation import PeriodicConsolidation, consolidate_manifest, drop_failed_rows
from cameo_corr.cache.done import DoneWindows
from cameo_corr.cache.layout import CONFIG_FILE
from cameo_corr.cache.lease import CacheLease
from cameo_corr.cache.location import CacheLocation
from cameo_corr.cache.kway import manifest_batches
from cameo_corr.cache.manifest import fragment_names, id_array, read_manifest, sorted_member
from cameo_corr.cache.reader import CorrCache
from cameo_corr.cache.verify import repair_corrupt_shards
from cameo_corr.cache.writer import CacheWriter
from cameo_corr.cli.errors import UsageError
from cameo_corr.job.config import JobConfig
from cameo_corr.schemas import CacheConfig, CameoCorrError, SchemaError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pyarrow as pa

    from cameo_corr.cache.lease import CacheLease
    from cameo_corr.datasets.base import SceneReader
    from cameo_corr.datasets.canonical import CanonicalView
    from cameo_corr.datasets.planner import PlanConfig

logger = logging.getLogger(__name__)


class CacheWriteError(CameoCorrError):
    """The cache storage refused a write (full disk, permissions, quota): the run failed."""


class BackendBuildError(CameoCorrError):
    """The backend could not be built where the model actors run (its constructor raised, or its worker
    died): the run failed before any window."""

@dataclass
class Clock:
    """When the job started (``perf_counter`` and wall time), to place the actors' ready times."""

    start: float = field(default_factory=time.perf_counter)
    wall: float = field(default_factory=time.time)

    def at(self, wall: float) -> float:
        """The ``perf_counter`` time of a wall-clock ``wall`` (UNIX time)."""
        return self.start + (wall - self.wall)


@dataclass
class Upkeep:
    """What the start-up upkeep of the cache removed: orphan paths, shards with a missing file, corrupt
    shards (``repair``), failed windows superseded for a retry (``retry_failed``), and the config of a
    cache without an ok window that this run replaced (``unpinned``)."""

    orphans: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)
    unpinned: list[str] | None = None
    """The failed windows dropped with the config of a cache that had no ok window (:func:`unpin`);
    ``None`` when the cache kept its config."""
    done: DoneWindows = field(default_factory=DoneWindows)
    """The windows with a manifest row after the upkeep (read once: :class:`DoneWindows`)."""


@dataclass
class StageRun:
    """What running the stages gave: the sink (its write results), whether ``fail_fast`` stopped them,
    the run's errors as ``(where, error)``, when the first actor was ready, the shard size used, shards
    written and the periodic consolidation rounds."""

    sink: Any = None
    stopped: bool = False
    errors: list[tuple[str, str]] = field(default_factory=list)
    t_ready: float = field(default_factory=time.perf_counter)
    shard_size: int = 0
    shards_written: int = 0
    consolidations: int = 0


def run_preprocess(**options: Any) -> dict[str, Any]:
    """``run_job(JobConfig(**options))``: the job from Python with the flags as keywords
    (:class:`~cameo_corr.job.config.JobConfig` documents them)."""
    return run_job(JobConfig(**options))


def run_job(config: JobConfig) -> dict[str, Any]:
    """Fill (or complete) the cache at ``config.out`` from its dataset; return the summary
    (:func:`summarize`). Input errors raise before Ray starts."""
    import ray

    clock = Clock()
    location = check_out(config)
    reader = config.open_reader()
    plan, view = config.plan_config(), config.view(reader)
    existing = read_existing_config(location)
    pinned = check_before_start(config, location, reader, view, existing)
    import_run_modules()
    lease = take_lease(config, location)
    connected: str | None = None
    try:
        unpinned = unpin(location, existing) if existing is not None and pinned is None else None
        existing = pinned
        # a cache to resume: what is left is known before Ray starts. Not with --repair or --retry-failed,
        # whose rows dropped must stay until the model, built where the actors run, matched the cache's
        early = existing is not None and not (config.repair or config.retry_failed)
        if early:
            upkeep = keep_up(config, location, existing)
            planned, todo = windows_to_do(reader, plan, existing, upkeep.done, config.scenes)
            todo, deferred = limit_windows(todo, config.max_windows)
            if not todo.num_rows:  # nothing to compute: no Ray, no model (a changed one is compared when there is work)
                return summarize(config, location, planned, todo, upkeep, StageRun(), clock, deferred=deferred)
        connected = init_ray(config.num_cpus, config.workers * config.cpus_per_worker)
        check_cluster(config, local=connected == "local")
        described = describe_on_cluster(config)
        cache_config = make_cache_config(config, reader, view, plan, described)
        existing = existing or read_existing_config(location)  # another job may have created it before our lease
        # the backend as built where the actors run must match the cache's (same fingerprint, same window ids)
        check_compatible(existing, cache_config, where=location.url(CONFIG_FILE))
        if not early:
            upkeep = keep_up(config, location, existing or cache_config)
            upkeep.unpinned = unpinned
            planned, todo = windows_to_do(reader, plan, cache_config, upkeep.done, config.scenes)
            todo, deferred = limit_windows(todo, config.max_windows)
        run = run_stages(todo, config, reader, cache_config, described["load"], (location, lease, clock))
    finally:
        lease.release()
        if connected:
            ray.shutdown()
    return summarize(config, location, planned, todo, upkeep, run, clock, deferred=deferred)


# ----------------------------------------------------------------------------- before Ray starts
def import_run_modules() -> None:
    """Import every module of the package the driver uses later in the run, before it takes the lease.

    Under ``ray job submit`` the driver runs from the job's working directory as Ray unpacked it on the
    head node. A module first imported late in the run depends on that directory still being whole then;
    importing them here, after the input checks (bad input is still refused at once) and before the
    lease, means a job that cannot import its code fails before it holds the cache, not after it has
    taken the lease (a precaution: the cause of one CI run whose first job ended right after taking the
    lease was not established)."""
    import importlib

    for module in RUN_MODULES:
        importlib.import_module(module)


RUN_MODULES = ("cameo_corr.cache.verify", "cameo_corr.datasets.planner", "cameo_corr.job.plan", "cameo_corr.job.stages",
               "cameo_corr.pipeline.backends")
"""The package's modules the driver imports after taking the lease (:func:`import_run_modules`)."""


def check_out(config: JobConfig) -> CacheLocation:
    """The cache location, refusing an ``--out`` that is a file or in a bucket that does not exist (:class:`UsageError`)."""
    try:
        location = CacheLocation(config.out, config.storage())
    except CameoCorrError:  # names the location itself
        raise
    except ValueError as e:
        raise UsageError(f"--out {config.out}: {e}") from None
    bucket = location.missing_bucket()
    if bucket:  # also for --dry-run, which writes nothing
        raise UsageError(f"--out {config.out}: no such bucket: {bucket}")
    if location.fs.isfile(location.root):
        raise UsageError(f"--out {config.out}: is a file; give a cache directory (new or existing)")
    return location


def provisional_config(config: JobConfig, reader: "SceneReader", view: "CanonicalView") -> CacheConfig:
    """The run's ``cache.json`` before the backend described itself (its backend entry is the name only)."""
    provisional = CacheConfig(grid=config.grid, tau=config.tau, views=config.views, backend={"name": config.backend},
                              crop=view.to_dict(), dataset=reader.describe(), extra_grids=config.extra_grids,
                              images=config.images())
    provisional.validate()
    return provisional


def check_before_start(config: JobConfig, location: CacheLocation, reader: "SceneReader", view: "CanonicalView",
                       existing: CacheConfig | None) -> CacheConfig | None:
    """Refuse a mismatching cache, a backend that cannot run and a plan without a window to compute
    (:func:`~cameo_corr.job.plan.check_plan`), before starting Ray (the full backend entry is compared
    once the backend described itself, :func:`run_job`).

    Returns the config the cache is pinned to: ``existing``, or ``None`` when the cache's config differs
    from this run's but the cache has no ok window (nothing to keep consistent with: :func:`unpin`
    replaces its config once the run holds the lease)."""
    from cameo_corr.job.plan import check_plan

    provisional = provisional_config(config, reader, view)
    where = location.url(CONFIG_FILE)
    preflight_backend(config.backend, config.gpus_per_worker, config.backend_options, reader, config.match_backend)
    try:
        check_compatible(existing, provisional, [f for f in COMPARED_FIELDS if f != "backend"], where=where)
        if existing is not None:
            given = {"name": config.backend, **config.backend_options}
            recorded = existing.backend
            diffs = [(k, recorded[k], v) for k, v in given.items() if k in recorded and v != "auto" and recorded[k] != v]
            if diffs:
                raise mismatch_error(diffs, where, field="backend")
    except CacheMismatchError:
        if has_ok_window(location):
            raise
        existing = None
    check_plan(config, reader, config.plan_config())
    return existing


def has_ok_window(location: CacheLocation) -> bool:
    """Whether the cache's manifest has an ok row (a cache without one pins no config)."""
    import pyarrow.compute as pc

    status = read_manifest(location, columns=["status"]).column("status")
    return bool(pc.any(pc.equal(status, "ok")).as_py())


def unpin(location: CacheLocation, replaced: CacheConfig) -> list[str]:
    """Under the lease: drop the failed rows and ``cache.json`` of a cache without an ok window whose
    config this run replaces (the first commit writes the new one); returns the dropped window ids.
    When another job committed an ok window meanwhile, nothing is dropped (the config check that
    follows refuses the run)."""
    if has_ok_window(location):
        return []
    dropped = drop_failed_rows(location)
    if location.exists(CONFIG_FILE):
        location.remove(CONFIG_FILE)
    logger.info("cache %s had no ok window: its config (%s) and %d failed rows were dropped", location.display,
                replaced.to_json(), len(dropped))
    return dropped


def preflight_backend(
    backend: str, gpus_per_worker: float, backend_options: Mapping[str, Any] | None, reader: "SceneReader | None" = None,
    match_backend: str = "auto",
) -> None:
    """Driver-side checks before any worker starts: the backend exists (:class:`UsageError`), its
    optional packages are installed (:class:`UsageError` with the install hint otherwise), a backend
    that needs depth gets a dataset that has depth (:class:`SchemaError` naming ``backend``), the
    matcher ``match_backend``'s package imports (:class:`SchemaError`; its GPU support is checked where
    the actors run, :func:`~cameo_corr.job.stages.describe_backend`), and a GPU backend given no GPU is
    warned about."""
    from cameo_corr.pipeline.backends import backend_class
    from cameo_corr.pipeline.match import resolve_backend

    try:
        cls = backend_class(backend)
    except ValueError as e:
        raise UsageError(f"--backend {backend}: {e}") from None
    try:
        cls.check_requirements()
    except ImportError as e:  # the one line with the install hint, for a run and a --dry-run alike
        raise UsageError(str(e)) from None
    if reader is not None and cls.needs_depth and not reader.has_depth:
        raise SchemaError("backend", f"the {backend!r} backend needs depth, and dataset {reader.name!r} has none "
                          "(use a geometry model such as --backend vggt)", where=str(reader.root))
    device = str((backend_options or {}).get("device") or "")
    if gpus_per_worker <= 0 and device.startswith("cuda"):
        warnings.warn(f"--device {device} with --gpus-per-worker 0: Ray reserves no GPU for the model actors, so every one of "
                      "them uses that GPU outside Ray's scheduling (pass --gpus-per-worker 1 to give each its own)", stacklevel=3)
    elif cls.wants_gpu and gpus_per_worker <= 0 and not device:
        warnings.warn(f"--gpus-per-worker is 0: Ray gives the workers no GPU, so the {backend!r} backend runs on CPU "
                      "in fp32 (pass --gpus-per-worker 1, or --device cpu to silence this)", stacklevel=3)
    resolve_backend(match_backend, "cpu")



def take_lease(config: JobConfig, location: CacheLocation) -> "CacheLease":
    """The cache's lease for this job (:class:`~cameo_corr.cache.lease.LeaseHeldError` when another live
    job holds it; :class:`UsageError` when ``--out`` cannot be written)."""

    try:
        return CacheLease(location, timeout=config.lease_timeout, force=config.force).acquire()
    except OSError as e:
        raise UsageError(f"--out {config.out}: cannot write the cache there ({e.strerror or e})") from None


# ----------------------------------------------------------------------------- Ray
def init_ray(num_cpus: int | None, needed_cpus: float) -> str | None:
    """Connect to ``RAY_ADDRESS`` if set (a cluster, or ``ray job submit``), else start a local
    instance (never an unrelated ``ray start`` cluster of this machine); returns what this call
    connected to, ``"cluster"`` or ``"local"`` (``None``: Ray was initialised already). A local instance gets ``num_cpus`` logical CPUs, by default enough for one load and
    one commit task next to the actors' reservation (logical CPUs only gate scheduling).

    Ray >= 2.5x enables token authentication for new local instances (a token in ``~/.ray``) and logs
    a warning saying so on every start; a local start keeps that default and drops the notice.
    """
    import ray

    if ray.is_initialized():
        return None
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return "cluster"
    cpus = num_cpus if num_cpus is not None else max(os.cpu_count() or 1, int(needed_cpus + 0.999) + 2)
    auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = auth_log.level
    auth_log.setLevel(logging.ERROR)  # Ray's default (token auth on) stays; only its per-start notice goes
    try:
        ray.init(address="local", num_cpus=cpus, include_dashboard=False)
    finally:
        auth_log.setLevel(level)
    return "local"



def check_cluster(config: JobConfig, *, local: bool) -> None:
    """Refuse model actors that would reserve every CPU of the cluster (no CPU left for load and commit), and
    on a ``local`` instance (this machine, which no autoscaler grows) GPUs it does not have: their tasks
    would wait forever. A cluster short of GPUs gets a note that the job waits for GPU nodes to join."""
    import ray

    resources = ray.cluster_resources()
    cluster_cpus = float(resources.get("CPU", 0.0))
    if config.workers * config.cpus_per_worker > cluster_cpus - 1:
        raise UsageError(f"--workers {config.workers} x --cpus-per-worker {config.cpus_per_worker} leaves no CPU of the cluster's "
                         f"{cluster_cpus:g} for the load and commit tasks; lower --cpus-per-worker (0 is fine)")
    gpus, needed = float(resources.get("GPU", 0.0)), config.workers * config.gpus_per_worker
    if needed > gpus:
        wanted = f"--workers {config.workers} x --gpus-per-worker {config.gpus_per_worker:g} need {needed:g} GPU(s)"
        if local:
            raise UsageError(f"{wanted} and this machine's local Ray instance has {gpus:g}; lower them (--gpus-per-worker 0 "
                             "runs the backend on CPU)")
        print(f"{NOTE_PREFIX}{wanted} and the Ray cluster has {gpus:g} now: the job waits until nodes with GPUs join",
              file=sys.stderr, flush=True)


def describe_on_cluster(config: JobConfig) -> dict[str, Any]:
    """The backend's ``cache.json`` entry, the load stage's options and its device
    (:func:`~cameo_corr.job.stages.describe_backend`), from a backend built where the model actors will
    run (a Ray actor with their resources, killed once it answered); a matcher that cannot run on that device raises its
    :class:`SchemaError` here, before any window is read."""
    import ray

    from cameo_corr.job.stages import BackendDescriber

    describer = ray.remote(BackendDescriber).options(num_cpus=0, num_gpus=config.gpus_per_worker,
                                                     max_restarts=config.max_retries,
                                                     max_task_retries=config.max_retries).remote()
    try:
        return ray.get(describer.describe.remote(config.geometry_spec()))
    except Exception as e:  # noqa: BLE001 - our error behind Ray's wrapper is re-raised as itself, any other is named
        cause = _root_cause(e)
        if isinstance(cause, CameoCorrError):
            raise cause from None
        raise BackendBuildError(f"the {config.backend!r} backend could not be built where the model actors run: "
                                f"{failure_text(e)}") from None
    finally:
        ray.kill(describer)  # its process ends now, with the model it built (host and GPU memory)


def make_cache_config(config: JobConfig, reader: "SceneReader", view: "CanonicalView", plan: "PlanConfig",
                      described: Mapping[str, Any]) -> CacheConfig:
    """The ``cache.json`` this run writes (or must match)."""
    import cameo_corr

    cache_config = CacheConfig(
        grid=config.grid, extra_grids=config.extra_grids, tau=config.tau, views=config.views, backend=described["backend"],
        crop=view.to_dict(), dataset=reader.describe(), images=config.images(),
        created_by={
            "package": "cameo-corr",
            "version": cameo_corr.__version__,
            "command": config.command or "run_preprocess",
            "cwd": os.getcwd(),  # where the command's relative paths start
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "plan": plan.to_dict(),
            "devices": [described["device"]],
        },
    )
    cache_config.validate()
    return cache_config


# ----------------------------------------------------------------------------- the cache before the run
def keep_up(config: JobConfig, location: CacheLocation, cache_config: CacheConfig) -> Upkeep:
    """Sweep orphans of killed runs, forget shards whose file is missing, with ``repair`` also the shards
    whose chunks fail their checksum (every chunk is decoded), with ``retry_failed`` supersede the failed
    rows. ``cache_config`` is the cache's (read once; the run's own for a new cache)."""

    writer = CacheWriter(config.out, cache_config, config.storage())
    orphans = writer.remove_orphans()
    # pending fragments (a killed job that never consolidated) are read for two columns only; merging
    # them first costs ~4x more start-up, and the job's first periodic round merges them (streamed) anyway
    done = DoneWindows.read(location)
    upkeep = Upkeep(orphans=orphans, missing=writer.repair_missing_shards(referenced=done.shards), done=done)
    if config.repair and location.exists(CONFIG_FILE):
        upkeep.corrupt = repair_corrupt_shards(CorrCache(config.out, config.storage(), config=cache_config))["shards"]
    if config.retry_failed:
        upkeep.retried = drop_failed_rows(location)
        done.forget(upkeep.retried)
    if upkeep.missing or upkeep.corrupt:  # rows of forgotten shards were dropped: read the done ids again
        upkeep.done = DoneWindows.read(location)
    return upkeep


def windows_to_do(reader: "SceneReader", plan: "PlanConfig", cache_config: CacheConfig, done: DoneWindows,
                  scenes: Any) -> tuple["pa.Table", "pa.Table"]:
    """``(planned, todo)``: every planned window of the run, and those not ``done`` (without a
    manifest row yet; binary search in the sorted done ids)."""
    from cameo_corr.datasets.planner import plan_table

    planned = plan_table(reader, plan, cache_config.fingerprint(), scene_ids=scenes)
    return planned, done.todo(planned)


def limit_windows(todo: "pa.Table", max_windows: int | None) -> tuple["pa.Table", int]:
    """``(the first max_windows windows of todo, how many are left for later runs)`` (``--max-windows``:
    a trial run computes a prefix of the plan; a later run resumes with the rest)."""
    if max_windows is None or todo.num_rows <= max_windows:
        return todo, 0
    return todo.slice(0, max_windows), todo.num_rows - max_windows


# ----------------------------------------------------------------------------- the run
def run_stages(todo: "pa.Table", config: JobConfig, reader: "SceneReader", cache_config: CacheConfig, load: Mapping[str, bool],
               held: tuple[CacheLocation, "CacheLease", Clock]) -> StageRun:
    """Run the stages over ``todo`` while a driver thread consolidates the manifest, then consolidate the
    rest (unless the lease was lost). The shard size is capped at ``ceil(todo / workers)`` so small runs
    keep every worker busy. ``load`` is the load stage's ``load_window`` options (what the backend reads),
    ``held`` the cache's location, this job's lease and its clock."""

    location, lease, clock = held
    total = todo.num_rows
    shard_size = max(1, min(config.shard_size, math.ceil(total / config.workers))) if total else config.shard_size
    fragments_before = set(fragment_names(location))
    periodic = PeriodicConsolidation(location, every_shards=config.consolidate_every, every_seconds=config.consolidate_seconds,
                                     holds_lease=lambda: lease.lost is None)
    run = StageRun()
    if total:
        periodic.start()
        try:
            run = execute(todo, dataclasses.replace(config, shard_size=shard_size), reader, cache_config, load, clock)
        finally:
            periodic.stop()
    run.shard_size, run.consolidations = shard_size, periodic.rounds
    run.shards_written = len((periodic.merged | set(fragment_names(location))) - fragments_before)
    if lease.lost:
        run.errors.append(("lease", f"the cache's lease was taken over by {lease.lost} during the run"))
    else:  # job end: this run's fragments join the sorted consolidated manifest
        consolidate_manifest(location)
    return run


def execute(todo: "pa.Table", config: JobConfig, reader: "SceneReader", cache_config: CacheConfig, load: Mapping[str, bool],
            clock: Clock) -> StageRun:
    """Build and run the Ray Data pipeline over ``todo`` (a progress bar of the windows done as they
    finish, ok / failed, and committed, unless ``config.progress`` is off; one note per Ray message that
    reads like a failure and is none); errors are classified: ``--fail-fast``, storage
    (:class:`CacheWriteError`), our own errors (raised), anything else (a failed run, in the run's errors)."""
    from ray.data import DataContext
    from ray.util.debug import log_once

    from cameo_corr.job.stages import FailFastStop, build_pipeline, commit

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver shows ok / failed / rate itself ...
    log_once("ray_data_progress_manager_disabled")  # ... so Ray Data's notice about its own bars is moot
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    check_free_cpu()
    if config.max_retries != 0:  # the geometry actors get max_restarts > 0: Ray's core worker says so at error level
        print(f"{NOTE_PREFIX}{RAY_ACTOR_ARGS_NOTE}", file=sys.stderr, flush=True)
    stop = threading.Event()
    threads: list[threading.Thread] = []  # stopped and joined however this ends (Ctrl-C included), before Ray shuts down
    quiet = QuietFailFast()
    for name in RAY_DATA_ERROR_LOGGERS:
        logging.getLogger(name).addFilter(quiet)
    try:
        counter = None
        if config.progress:
            counter, watcher = start_progress(todo.num_rows, stop)
            threads.append(watcher)
        threads.append(watch_nodes(stop))
        ds, sink = build_pipeline(todo, config, reader, load, cache_config.to_json(), counter)
        run = StageRun(sink=sink)
        try:
            commit(ds, sink, config.max_retries)
        except Exception as e:  # noqa: BLE001 - classified below: ours, storage, or a failed run
            cause = _root_cause(e)
            if isinstance(cause, FailFastStop):
                run.stopped = True
            elif isinstance(cause, OSError):
                raise CacheWriteError(f"cannot write the cache at {config.out}: {cause.strerror or cause}"
                                      + (" (the disk is full)" if cause.errno == errno.ENOSPC else "")) from None
            elif isinstance(cause, CameoCorrError):
                raise cause from None
            else:
                run.errors = [("*", failure_text(e))]
    finally:
        for name in RAY_DATA_ERROR_LOGGERS:
            logging.getLogger(name).removeFilter(quiet)
        stop.set()
        for thread in threads:
            thread.join(timeout=15)
    ready = min((r["ready"] for r in sink.results), default=math.inf)
    run.t_ready = clock.at(ready) if math.isfinite(ready) else time.perf_counter()
    return run


NOTE_PREFIX = "cameo-corr preprocess: note: "
RAY_ACTOR_ARGS_NOTE = (
    "Ray's core worker logs at error level that the geometry actors have 'constructor arguments in the object store "
    "and max_restarts > 0': Ray Data passes every actor pool's arguments that way (ray-project/ray#57733); the "
    "arguments live on this driver's node, so a restarted actor finds them, and the line is no failure")
"""The one line that says what Ray's "constructor arguments in the object store" error-level line means."""
NODE_LOST_NOTE = (
    "the Ray node {node} ({address}) was lost; the '(raylet)' lines Ray prints about it (the raylet's last log lines, "
    "'marked dead') describe that loss: its tasks and actors are retried on the other nodes (--max-retries) and the run "
    "goes on")
"""The one line that says what Ray's "(raylet)" lines after a node loss mean."""
NODE_POLL_SECONDS = 2.0
"""How often :func:`watch_nodes` asks Ray which nodes are alive."""
FREE_CPU_PATIENCE = 5.0
"""Seconds without a free CPU before :func:`check_free_cpu` warns that the job waits for one."""


def check_free_cpu(patience: float = FREE_CPU_PATIENCE) -> None:
    """Warn when no CPU of the Ray cluster frees up within ``patience`` seconds (other jobs hold them all:
    the load and commit tasks wait for one).

    This replaces Ray Data's own check, which looks once, at the instant the dataset starts, and right
    after the job's start-up (the actor that describes the backend) often sees a transient zero: it then
    printed "The Dataset job will hang" on healthy runs. The job's actors reserve CPUs only with
    ``--cpus-per-worker``, and :func:`check_cluster` refuses a reservation that leaves none free."""
    import ray
    from ray.util.debug import log_once

    log_once("cpu_warning")  # Ray Data's one-shot check is taken as done; this one looks for a while
    deadline = time.monotonic() + patience
    while ray.available_resources().get("CPU", 0.0) < 1.0:
        if time.monotonic() >= deadline:
            logger.warning("no CPU of the Ray cluster has been free for %g s (other jobs hold them): the job's load and commit "
                           "tasks wait until one is", patience)
            return
        time.sleep(0.25)


def watch_nodes(stop: threading.Event, interval: float = NODE_POLL_SECONDS) -> threading.Thread:
    """A driver thread that, until ``stop`` is set, prints one note (:data:`NODE_LOST_NOTE`) for each Ray
    node that dies while the stages run: Ray prints a node's last raylet log lines and "marked dead"
    to every driver, which read like a failure of the job although Ray retries its work elsewhere."""
    import ray

    def look(watched: dict[str, str]) -> None:
        if not ray.is_initialized():  # Ray shut down under us (an interrupted driver)
            return
        try:
            listing = ray.nodes()
        except Exception:  # noqa: BLE001 - a note only: the GCS may be busy right after a node loss; ask again
            return
        for node, address in newly_dead_nodes(watched, listing):
            print(NOTE_PREFIX + NODE_LOST_NOTE.format(node=node[:12], address=address), file=sys.stderr, flush=True)

    def run() -> None:
        watched: dict[str, str] = {}
        look(watched)
        while not stop.wait(interval):
            look(watched)
        look(watched)  # one last look once the stages ended

    thread = threading.Thread(target=run, daemon=True, name="cameo-node-watch")
    thread.start()
    return thread


def newly_dead_nodes(watched: dict[str, str], listing: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The nodes of ``watched`` (node id -> address: nodes seen alive and not yet reported) that Ray's node
    table ``listing`` (``ray.nodes()``) now lists as dead, as (node id, address); they leave ``watched``,
    and the nodes it lists alive join it.

    Only Ray's own verdict counts: a node missing from one listing is no loss (a healthy node once
    missed from a listing taken during another node's loss, and was reported lost with it)."""
    dead = []
    for entry in listing:
        node = entry.get("NodeID")
        if entry.get("Alive"):
            watched.setdefault(node, entry.get("NodeManagerAddress", "?"))
        elif node in watched:
            dead.append((node, watched.pop(node)))
    return dead


def start_progress(total: int, stop: threading.Event) -> tuple[Any, threading.Thread]:
    """A progress counter actor on the driver's node, and the driver thread drawing it until ``stop``."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from cameo_corr.job.stages import ProgressCounter

    counter = ray.remote(ProgressCounter).options(
        num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    ).remote()
    watcher = threading.Thread(target=_watch_progress, args=(counter, total, stop), daemon=True, name="cameo-progress")
    watcher.start()
    return counter, watcher


def _watch_progress(counter: Any, total: int, stop: threading.Event) -> None:
    """Driver thread: a tqdm bar of the windows done as they finish (ok / failed), the windows committed
    in shards so far and the rate. It never calls Ray once Ray is shut down: a call on an actor handle
    then starts a new local Ray instance (Ray's auto-init), from this thread."""
    import ray
    from tqdm import tqdm

    bar = tqdm(total=total, unit="win", desc="preprocess", dynamic_ncols=True)
    counts = {"ok": 0, "failed": 0, "committed": 0}
    try:
        while True:
            stopping = stop.wait(1.0)
            if not ray.is_initialized():
                return
            try:
                counts = ray.get(counter.counts.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - progress only: the counter may be restarting; keep the last counts
                pass
            bar.set_postfix(counts, refresh=False)
            bar.update(counts["ok"] + counts["failed"] - bar.n)
            bar.refresh()
            if stopping:
                return
    finally:
        bar.close()


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def failure_text(e: BaseException) -> str:
    """One line naming the error behind a failed run: the innermost exception of Ray's wrappers
    (``RayTaskError(UserCodeException)`` around the actor's own error) as ``<type>: <message>``, without
    Ray's colour codes and tracebacks (at most 500 characters)."""
    inner, seen = e, {id(e)}
    while True:
        nxt = getattr(inner, "cause", None) or inner.__cause__
        if not isinstance(nxt, BaseException) or id(nxt) in seen:
            break
        inner = nxt
        seen.add(id(inner))
    text = _ANSI.sub("", str(inner))
    if type(inner).__module__.startswith("ray"):  # no cause kept: Ray's text ends with the error's own line
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return (lines[-1] if lines else type(inner).__name__)[:500]
    return " ".join(f"{type(inner).__name__}: {text}".split())[:500]


RAY_DATA_ERROR_LOGGERS = ("ray.data._internal.execution.streaming_executor_state", "ray.data.exceptions")
"""The loggers through which Ray Data reports, at error level with tracebacks, the task error that aborts
a dataset's execution (the second one calls any error from a ``Datasink`` a Ray bug to report)."""


class QuietFailFast(logging.Filter):
    """Drops Ray Data's error-level reports (~160 lines of tracebacks, and the advice to report a Ray bug)
    of the deliberate ``--fail-fast`` stop, which the job reports in one line; every other error is logged
    as Ray Data logs it. A record without ``exc_info`` is judged by the exception being handled where it
    was logged (Ray Data logs from inside its ``except`` block)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from cameo_corr.job.stages import FailFastStop

        error = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return error is None or not isinstance(_root_cause(error), FailFastStop)


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



# ----------------------------------------------------------------------------- summary
def summarize(config: JobConfig, location: CacheLocation, planned: "pa.Table", todo: "pa.Table", upkeep: Upkeep,
              run: StageRun, clock: Clock, *, deferred: int = 0) -> dict[str, Any]:
    """The run's summary.

    Keys: ``windows_planned``, ``windows_skipped`` (already in the manifest), ``windows_deferred`` (left
    for a later run by ``max_windows``), ``windows_ok``, ``windows_failed`` (rows this run committed),
    ``windows_failed_earlier`` (skipped windows recorded as failed by an earlier run: ``retry_failed``
    redoes them), ``cache_windows_ok`` and ``cache_windows_failed`` (the whole cache after the run),
    ``config_replaced`` (the cache had no ok window and another config: its config and its
    ``failed_dropped`` failed rows were replaced), ``shard_size`` (the size used), ``shards_written``,
    ``shard_errors`` (``(where, error)`` of a run that failed), ``stopped_early``, ``orphans_removed``,
    ``shards_repaired`` (missing shard files), ``shards_corrupt`` (dropped by ``repair``),
    ``failed_retried``, ``manifest_consolidations`` (periodic, while the job ran), ``seconds``,
    ``windows_per_second`` (end to end), ``startup_seconds`` (until the first model actor was ready),
    ``processing_windows_per_second`` (after start-up), ``stage_seconds``, ``bytes_written`` (shard
    files), ``bytes_per_window``, ``devices_used`` (where the model actors that computed this run's
    windows ran: ``cpu``, ``cuda:<index>``), ``errors`` (first 20 window errors of this run), ``errors_earlier``
    (up to 5 of the earlier failures).
    """
    from cameo_corr.job.stages import STAGES

    t_end = time.perf_counter()
    whole = cache_failures(location, planned, todo)
    n_ok, n_failed = whole["mine_ok"], whole["mine_failed"]
    results = run.sink.results if run.sink is not None else []
    nbytes = sum(r["bytes"] for r in results)
    seconds = t_end - clock.start
    processed = n_ok + n_failed
    return {
        "out": config.out,
        "windows_planned": planned.num_rows,
        "windows_skipped": planned.num_rows - todo.num_rows - deferred,
        "windows_deferred": deferred,
        "windows_ok": n_ok,
        "windows_failed": n_failed,
        "windows_failed_earlier": whole["failed_earlier"],
        "cache_windows_ok": whole["ok"],
        "cache_windows_failed": whole["failed"],
        "config_replaced": upkeep.unpinned is not None,
        "failed_dropped": len(upkeep.unpinned or []),
        "shard_size": run.shard_size,
        "shards_written": run.shards_written,
        "shard_errors": run.errors,
        "stopped_early": run.stopped,
        "orphans_removed": len(upkeep.orphans),
        "shards_repaired": len(upkeep.missing),
        "shards_corrupt": len(upkeep.corrupt),
        "failed_retried": len(upkeep.retried),
        "manifest_consolidations": run.consolidations,
        "seconds": seconds,
        "windows_per_second": processed / seconds if seconds > 0 else 0.0,
        "startup_seconds": run.t_ready - clock.start,
        "processing_windows_per_second": processed / (t_end - run.t_ready) if t_end > run.t_ready else 0.0,
        "stage_seconds": {k: float(sum(r["stages"][k] for r in results)) for k in STAGES},
        "bytes_written": nbytes,
        "bytes_per_window": nbytes / n_ok if n_ok and nbytes else 0.0,
        "devices_used": sorted({d for r in results for d in r["devices"]}),
        "errors": whole["errors"],
        "errors_earlier": whole["examples"],
    }


def cache_failures(location: CacheLocation, planned: "pa.Table", todo: "pa.Table") -> dict[str, Any]:
    """The cache after a run, in one pass over the ``window_id``, ``status`` and ``error`` columns (a
    batch at a time; membership by binary search in sorted ids): ``ok`` and ``failed`` rows of the
    whole cache, ``mine_ok`` and ``mine_failed`` (rows of this run's windows, ``todo``) with ``errors``
    (the first 20 of its failures as ``(window_id, error)``), ``failed_earlier`` (planned windows this
    run skipped because an earlier run recorded them as failed) and ``examples`` (up to 5 of those)."""
    import pyarrow.compute as pc

    mine = np.sort(id_array(todo.column("window_id")))
    planned_ids = id_array(planned.column("window_id"))
    skipped = np.sort(planned_ids[~sorted_member(planned_ids, mine)])
    out: dict[str, Any] = {"ok": 0, "failed": 0, "mine_ok": 0, "mine_failed": 0, "errors": [], "failed_earlier": 0, "examples": []}
    for table in manifest_batches(location, ["window_id", "status", "error"]):
        if not table.num_rows:
            continue
        ids = id_array(table.column("window_id"))
        ok = pc.equal(table.column("status"), "ok").to_numpy(zero_copy_only=False).astype(bool)
        in_run, earlier = sorted_member(ids, mine), ~ok & sorted_member(ids, skipped)
        out["ok"] += int(ok.sum())
        out["failed"] += int((~ok).sum())
        out["mine_ok"] += int((in_run & ok).sum())
        out["mine_failed"] += int((in_run & ~ok).sum())
        out["failed_earlier"] += int(earlier.sum())
        for key, mask, limit in (("errors", in_run & ~ok, 20), ("examples", earlier, 5)):
            picked = np.flatnonzero(mask)[: limit - len(out[key])]
            if len(picked):
                rows = table.take(picked)
                out[key] += list(zip(rows.column("window_id").to_pylist(), rows.column("error").to_pylist()))
    return out


__all__ = ["BackendBuildError", "CacheWriteError", "run_preprocess", "run_job", "preflight_backend", "check_out", "provisional_config", "check_before_start",
           "has_ok_window", "unpin", "limit_windows", "summarize", "cache_failures"]
