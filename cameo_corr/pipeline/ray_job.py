"""The resumable Ray preprocessing job: dataset -> windows -> pointmaps -> correspondences -> cache.

Topology (one Ray job, local by default):

* the **driver** opens the dataset, asks one worker for the backend description (it decides dtype and
  model id), writes or checks ``cache.json``, sweeps orphans of killed runs, plans the windows
  (:mod:`.planner`), skips windows that already have manifest rows and hands out shards;
* **CPU tasks** (``_load_window``) read, decode and crop one window each (``load_window``) and put
  the :class:`~cameo_corr.schemas.WindowData` in the object store; they are submitted ahead, two
  shards per worker, so decoding overlaps the model;
* **worker actors** (``ShardWorker``, ``num_gpus=gpus_per_worker``) hold the geometry backend, run it
  on the loaded windows (``run_batch`` in groups of ``batch_size``), match tokens on the backend's
  device (:func:`cameo_corr.pipeline.match.correspond`) and write the shard they computed, so each
  shard has exactly one writer.

Failures: a bad window (missing frame, corrupt image, non-finite or empty pointmap, too few frames)
is a *data* error, recorded as a ``status=failed`` manifest row with its error text; the job goes on
and exits non-zero only with ``fail_fast`` (which also stops handing out shards). Anything else
(worker crash, out of memory, a bug) is a *system* error: Ray retries tasks (``max_retries``) and
restarts actors (``max_restarts``, with ``max_task_retries`` for the shard in flight); a shard that
still fails is not recorded, the job exits non-zero and a re-run redoes it. ``ray.init()`` is called
plainly: a local instance unless ``RAY_ADDRESS`` is set (``ray job submit`` sets it).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import os
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from cameo_corr.schemas import CANONICAL_SIZE, DEFAULT_GRID, DEFAULT_TAU, CameoCorrError, SchemaError, WindowRecord, as_grid

if TYPE_CHECKING:  # pragma: no cover - typing only
    from cameo_corr.datasets.base import SceneReader

logger = logging.getLogger(__name__)

DATA_ERRORS: tuple[type[BaseException], ...] = (CameoCorrError, OSError)
"""Exceptions that mean "this window's input is bad" (recorded as failed), not "the job is broken"."""

SHARDS_IN_FLIGHT_PER_WORKER = 2


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------- CPU loading tasks
@dataclass
class LoadedWindow:
    """Result of a load task: the window in the canonical view, or the data error that stopped it."""

    data: Any
    error: str | None
    seconds: float


_READER_CACHE: dict[str, Any] = {}


def _reader(dataset: Mapping[str, Any]) -> Any:
    """The dataset reader of this worker process for ``dataset`` (opened once per process)."""
    from cameo_corr.datasets.base import open_dataset

    key = json.dumps(dataset, sort_keys=True, default=str)
    if key not in _READER_CACHE:
        options = dict(dataset)
        _READER_CACHE[key] = open_dataset(options.pop("name"), options.pop("root"), **options)
    return _READER_CACHE[key]


def _load_window(dataset: Mapping[str, Any], record: WindowRecord, crop: Mapping[str, Any], with_depth: bool) -> LoadedWindow:
    """Read + decode + crop one window (a Ray task body). Data errors are returned, not raised."""
    from cameo_corr.datasets.canonical import CanonicalView, load_window

    t0 = time.perf_counter()
    try:
        data = load_window(_reader(dataset), record, CanonicalView.from_dict(crop), with_depth=with_depth)
        return LoadedWindow(data, None, time.perf_counter() - t0)
    except DATA_ERRORS as e:
        return LoadedWindow(None, _error_text(e), time.perf_counter() - t0)


# ----------------------------------------------------------------------------- GPU worker actors
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


class ShardWorker:
    """One model replica: backend + matcher + the writer of the shards it computes (a Ray actor)."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        from cameo_corr.pipeline.backends import make_backend

        self.spec = dict(spec)
        self.backend = make_backend(spec["backend"], **spec["backend_options"])

    def describe(self) -> dict[str, Any]:
        """The backend entry of ``cache.json`` and whether windows need depth."""
        return {"backend": self.backend.describe(), "needs_depth": bool(self.backend.needs_depth), "device": str(self.backend.device)}

    def process_shard(
        self,
        shard_id: str,
        windows: Sequence[tuple[WindowRecord, str | None]],
        loads: Sequence[list],
        config_json: str,
    ) -> dict[str, Any]:
        """Compute and write one shard; return counts, errors, stage seconds and bytes written.

        ``loads[k]`` is ``[ObjectRef]`` of window k's load task (wrapped in a list so Ray hands the
        reference over unresolved and the actor fetches windows one batch at a time), or ``[]`` for a
        window the planner already marked failed.
        """
        import ray

        from cameo_corr.pipeline.cache import CacheWriter, WindowOutcome, fragment_path, shard_dir
        from cameo_corr.schemas import CacheConfig

        config = CacheConfig.from_json(config_json)
        stages = {"read": 0.0, "read_wait": 0.0, "backend": 0.0, "match": 0.0, "write": 0.0}
        outcomes: dict[int, WindowOutcome] = {}
        todo: list[int] = []
        for k, (record, error) in enumerate(windows):
            if error is not None:
                outcomes[k] = WindowOutcome(record, error=error)
            else:
                todo.append(k)
        batch = max(1, int(self.spec.get("batch_size", 1)))
        for start in range(0, len(todo), batch):
            group = todo[start : start + batch]
            t0 = time.perf_counter()
            loaded: list[LoadedWindow] = [ray.get(loads[k][0]) for k in group]
            stages["read_wait"] += time.perf_counter() - t0
            ready = []
            for k, lw in zip(group, loaded):
                stages["read"] += lw.seconds
                if lw.error is not None:
                    outcomes[k] = WindowOutcome(windows[k][0], error=lw.error)
                else:
                    ready.append((k, lw.data))
            for k, result in self._pointmaps(ready, stages):
                outcomes[k] = self._correspond(windows[k][0], result, config, stages)
        writer = CacheWriter(self.spec["out"], config, self.spec.get("storage_options"))
        t0 = time.perf_counter()
        writer.write_shard(shard_id, [outcomes[k] for k in range(len(windows))])
        stages["write"] += time.perf_counter() - t0
        loc = writer.location
        nbytes = loc.disk_usage(shard_dir(shard_id)) + loc.disk_usage(fragment_path(shard_id))
        failed = [(o.record.window_id, o.error) for o in outcomes.values() if o.error is not None]
        return {
            "shard_id": shard_id,
            "ok": len(windows) - len(failed),
            "failed": len(failed),
            "errors": failed,
            "stages": stages,
            "bytes": nbytes,
        }

    def _pointmaps(self, ready: list[tuple[int, Any]], stages: dict[str, float]) -> list[tuple[int, Any]]:
        """Backend outputs (or error strings) for loaded windows, batched, isolating data errors."""
        if not ready:
            return []
        t0 = time.perf_counter()
        try:
            results: list[Any] = self.backend.run_batch([d for _, d in ready])
        except DATA_ERRORS as e:
            if len(ready) == 1:
                results = [_error_text(e)]
            else:  # find the bad window(s): one by one
                results = []
                for _, d in ready:
                    try:
                        results.append(self.backend(d))
                    except DATA_ERRORS as e1:
                        results.append(_error_text(e1))
        stages["backend"] += time.perf_counter() - t0
        return [(k, r) for (k, _), r in zip(ready, results)]

    def _correspond(self, record: WindowRecord, result: Any, config: Any, stages: dict[str, float]) -> Any:
        from cameo_corr.pipeline.cache import WindowOutcome, window_arrays
        from cameo_corr.pipeline.match import correspond

        if isinstance(result, str):
            return WindowOutcome(record, error=result)
        problem = check_pointmaps(result, record)
        if problem is not None:
            return WindowOutcome(record, error=problem)
        t0 = time.perf_counter()
        try:
            corr = correspond(result, grid=tuple(config.grid), tau=config.tau, backend=self.spec.get("match_backend", "auto"))
            arrays = window_arrays(corr, result)
        except DATA_ERRORS as e:
            return WindowOutcome(record, error=_error_text(e))
        finally:
            stages["match"] += time.perf_counter() - t0
        return WindowOutcome(record, arrays=arrays)


# ----------------------------------------------------------------------------- driver
@dataclass
class _Progress:
    ok: int = 0
    failed: int = 0
    shards: int = 0
    bytes: int = 0
    stages: dict[str, float] = field(default_factory=lambda: {"read": 0.0, "read_wait": 0.0, "backend": 0.0, "match": 0.0, "write": 0.0})
    errors: list[tuple[str, str]] = field(default_factory=list)
    shard_errors: list[tuple[str, str]] = field(default_factory=list)


def _init_ray(num_cpus: int | None, needed_cpus: float) -> bool:
    """``ray.init()`` unless already connected; returns whether this call started the connection.

    With ``RAY_ADDRESS`` set (a cluster, or ``ray job submit``) the cluster's resources are used as
    they are. A local instance gets ``num_cpus`` logical CPUs, by default enough for the workers plus
    one loader even on a 2-core machine (logical CPUs only gate scheduling).
    """
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        cpus = num_cpus if num_cpus is not None else max(os.cpu_count() or 1, int(needed_cpus + 0.999) + 1)
        ray.init(num_cpus=cpus, include_dashboard=False)
    return True


def preflight_backend(
    backend: str, gpus_per_worker: float, backend_options: Mapping[str, Any] | None, reader: "SceneReader | None" = None
) -> None:
    """Driver-side checks before any worker starts: the backend's optional packages are installed
    (:class:`ImportError` with an install hint otherwise), a backend that needs depth gets a dataset that
    has depth (:class:`SchemaError` naming ``backend``), and a GPU backend given no GPU is warned about."""
    from cameo_corr.pipeline.backends import backend_class

    cls = backend_class(backend)
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


def run_preprocess(
    *,
    dataset: str,
    root: str | Path,
    out: str | Path,
    backend: str = "depth",
    grid: int | tuple[int, int] = DEFAULT_GRID,
    views: int = 8,
    tau: float = DEFAULT_TAU,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    windows_per_scene: int = 1,
    split: str | None = None,
    shard_size: int = 16,
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
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Fill (or complete) the cache at ``out`` from a dataset; return a summary dict.

    ``grid`` is ``h = w`` or ``(h, w)``; ``split=None`` uses the reader's default split; ``scenes``
    restricts the run to some scene ids. ``sampling``/``span_per_view``/``positions``/``fps``/``seed``
    override :func:`~cameo_corr.pipeline.planner.default_plan_config`. ``crop_policy=None`` uses the
    reader's default. Summary keys: ``windows_planned``, ``windows_skipped`` (already in the
    manifest), ``windows_ok``, ``windows_failed``, ``shard_size`` (``shard_size`` capped at
    ``ceil(planned / workers)`` so small runs keep every worker busy), ``shards_written``, ``shard_errors``,
    ``stopped_early``, ``orphans_removed``, ``seconds``, ``windows_per_second`` (end to end),
    ``startup_seconds`` (Ray + workers + model load), ``processing_windows_per_second`` (after
    start-up: planning, scheduling and the stages), ``stage_seconds``,
    ``bytes_written``, ``bytes_per_window``, ``errors`` (first 20 window errors).
    """
    import ray
    from tqdm import tqdm

    import cameo_corr
    from cameo_corr.datasets.base import open_dataset
    from cameo_corr.datasets.canonical import CanonicalView
    from cameo_corr.pipeline.cache import COMPARED_FIELDS, CacheLocation, CacheWriter, check_compatible
    from cameo_corr.pipeline.planner import default_plan_config, make_shards, plan_windows
    from cameo_corr.schemas import CacheConfig

    t_start = time.perf_counter()
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    grid_hw = as_grid(grid)
    ds_options = dict(dataset_options or {})
    if split is not None:
        ds_options["split"] = split
    reader = open_dataset(dataset, _absolute_root(root), **ds_options)
    plan = default_plan_config(
        dataset, views=views, windows_per_scene=windows_per_scene, policy=sampling,
        span_per_view=span_per_view, positions=positions, fps=fps, seed=seed,
    )
    view = CanonicalView(size=crop_size, policy=crop_policy or reader.preferred_crop_policy())

    # refuse a mismatching cache before starting workers (the backend entry is checked once known)
    provisional = CacheConfig(grid=grid_hw, tau=float(tau), views=views, backend={"name": backend}, crop=view.to_dict(),
                              dataset=reader.describe())
    provisional.validate()
    check_compatible(CacheLocation(out, storage_options), provisional, [f for f in COMPARED_FIELDS if f != "backend"])
    preflight_backend(backend, gpus_per_worker, backend_options, reader)

    started = _init_ray(num_cpus, workers * cpus_per_worker)
    actors: list[Any] = []
    try:
        worker_cls = ray.remote(ShardWorker).options(
            num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=max_retries, max_task_retries=max_retries
        )
        spec = {
            "backend": backend,
            "backend_options": dict(backend_options or {}),
            "out": str(out),
            "storage_options": dict(storage_options or {}) or None,
            "match_backend": match_backend,
            "batch_size": batch_size,
        }
        actors = [worker_cls.remote(spec) for _ in range(workers)]
        descriptions = ray.get([a.describe.remote() for a in actors])
        if any(d["backend"] != descriptions[0]["backend"] for d in descriptions):
            raise RuntimeError(f"workers disagree on the backend description: {[d['backend'] for d in descriptions]}")
        needs_depth = descriptions[0]["needs_depth"]
        t_ready = time.perf_counter()
        config = CacheConfig(
            grid=grid_hw,
            tau=float(tau),
            views=views,
            backend=descriptions[0]["backend"],
            crop=view.to_dict(),
            dataset=reader.describe(),
            created_by={
                "package": "cameo-corr",
                "version": cameo_corr.__version__,
                "command": command or "run_preprocess",
                "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "plan": plan.to_dict(),
                "devices": sorted({d["device"] for d in descriptions}),
            },
        )
        config.validate()
        writer = CacheWriter(out, config, storage_options)
        writer.initialize()
        orphans = writer.remove_orphans()
        done = writer.done_window_ids()
        planned = plan_windows(reader, plan, config.fingerprint(), scene_ids=scenes)
        # small runs: no bigger shards than needed to give every worker work
        effective_shard_size = max(1, min(shard_size, math.ceil(len(planned) / workers)))
        shards = deque(make_shards(planned, effective_shard_size, skip=done))
        total = sum(len(s.windows) for s in shards)
        config_json = config.to_json()
        crop = view.to_dict()
        dataset_spec = reader.describe()
        load_task = ray.remote(_load_window).options(num_cpus=1, max_retries=max_retries)

        prog = _Progress()
        pending: dict[Any, tuple[int, Any]] = {}
        alive = [True] * len(actors)
        stopped = False

        def submit(a: int) -> None:
            shard = shards.popleft()
            loads = [
                [load_task.remote(dataset_spec, w.record, crop, needs_depth)] if w.error is None else []
                for w in shard.windows
            ]
            windows = [(w.record, w.error) for w in shard.windows]
            pending[actors[a].process_shard.remote(shard.shard_id, windows, loads, config_json)] = (a, shard)

        for _ in range(SHARDS_IN_FLIGHT_PER_WORKER):
            for a in range(len(actors)):
                if shards:
                    submit(a)
        bar = tqdm(total=total, unit="win", desc="preprocess", disable=not progress, dynamic_ncols=True)
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                a, shard = pending.pop(ready[0])
                try:
                    report = ray.get(ready[0])
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
                    logger.error("shard %s failed: %s", shard.shard_id, e)
                    cause = getattr(e, "cause", None)
                    prog.shard_errors.append((shard.shard_id, _error_text(cause if isinstance(cause, BaseException) else e)))
                    if isinstance(e, ray.exceptions.RayActorError):
                        alive[a] = False
                    bar.update(len(shard.windows))
                else:
                    prog.ok += report["ok"]
                    prog.failed += report["failed"]
                    prog.shards += 1
                    prog.bytes += report["bytes"]
                    prog.errors.extend(report["errors"])
                    for k, v in report["stages"].items():
                        prog.stages[k] += v
                    bar.update(report["ok"] + report["failed"])
                bar.set_postfix(ok=prog.ok, failed=prog.failed, errors=len(prog.shard_errors), refresh=False)
                if fail_fast and (prog.failed or prog.shard_errors):
                    stopped = stopped or bool(shards)
                    shards.clear()
                if shards:
                    target = a if alive[a] else next((i for i, ok in enumerate(alive) if ok), None)
                    if target is not None:
                        submit(target)
                    elif not pending:
                        prog.shard_errors.append(("*", f"all workers died; {len(shards)} shards not processed"))
                        stopped = True
                        shards.clear()
        finally:
            bar.close()
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()

    t_end = time.perf_counter()
    seconds = t_end - t_start
    processed = prog.ok + prog.failed
    return {
        "out": str(out),
        "windows_planned": len(planned),
        "windows_skipped": len(planned) - total,
        "windows_ok": prog.ok,
        "windows_failed": prog.failed,
        "shard_size": effective_shard_size,
        "shards_written": prog.shards,
        "shard_errors": prog.shard_errors,
        "stopped_early": stopped,
        "orphans_removed": len(orphans),
        "seconds": seconds,
        "windows_per_second": processed / seconds if seconds > 0 else 0.0,
        "startup_seconds": t_ready - t_start,
        "processing_windows_per_second": processed / (t_end - t_ready) if t_end > t_ready else 0.0,
        "stage_seconds": prog.stages,
        "bytes_written": prog.bytes,
        "bytes_per_window": prog.bytes / prog.ok if prog.ok else 0.0,
        "errors": prog.errors[:20],
    }


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
    parser.add_argument("--grid", type=int, default=DEFAULT_GRID, help="token grid side h = w (default: 32)")
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
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per model actor (default: 1)")
    parser.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of a local Ray instance")
    parser.add_argument("--shard-size", type=int, default=16, help="windows per shard = unit of work (default: 16; capped at ceil(windows / workers))")
    parser.add_argument("--max-retries", type=int, default=3, help="Ray task retries / actor restarts (default: 3)")
    parser.add_argument("--storage-option", action="append", type=key_value_arg, default=[], metavar="KEY=VALUE",
                        help="fsspec storage option for --out (JSON value), repeatable")
    parser.add_argument("--fail-fast", action="store_true", help="stop and exit non-zero at the first failed window")
    parser.add_argument("--summary-json", default=None, help="also write the summary to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_from_args(args: argparse.Namespace) -> int:
    """Run the job from parsed arguments, print the summary, return the exit code."""
    from cameo_corr.pipeline.backends import backend_options_from_args
    from cameo_corr.schemas import CameoCorrError

    try:
        backend_options = backend_options_from_args(args)
    except ValueError as e:
        print(f"cameo-corr preprocess: error: {e}", file=sys.stderr)
        return 2
    try:
        summary = run_preprocess(
            dataset=args.dataset,
            root=args.root,
            out=args.out,
            backend=args.backend,
            grid=args.grid,
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
            progress=not args.no_progress,
            command=" ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        )
    except (CameoCorrError, ImportError) as e:
        print(f"cameo-corr preprocess: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2, default=str))
    if summary["shard_errors"]:
        return 1
    if args.fail_fast and summary["windows_failed"]:
        return 1
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
            "Plan windows of a dataset, run a geometry backend on Ray workers, match tokens and write "
            "a sharded zarr cache + parquet manifest. Re-running resumes: windows with manifest rows "
            "are skipped. Local Ray by default; set RAY_ADDRESS or use `ray job submit` for a cluster."
        ),
    )
    add_preprocess_arguments(parser)
    parser.set_defaults(func=run_from_args)


__all__ = [
    "DATA_ERRORS",
    "LoadedWindow",
    "check_pointmaps",
    "ShardWorker",
    "run_preprocess",
    "key_value_arg",
    "add_preprocess_arguments",
    "run_from_args",
    "format_summary",
    "register_cli",
]
