"""The stages of the preprocessing pipeline, each one named unit on Ray Data's streaming executor.

1. **source** (:func:`source`): an Arrow table of the planned, not yet done windows
   (:func:`~cameo_corr.datasets.planner.plan_table`: ids, scene and frame ids, and the planner's error
   for scenes that cannot give a window), ``ray.data.from_arrow`` in blocks of ``batch_size`` rows;
2. **load** (:func:`load_batch`, CPU tasks, 1 CPU each): rebuilds each
   :class:`~cameo_corr.schemas.WindowRecord` from ``reader.scene(scene_id)`` (the reader and a small LRU
   of scenes are cached per worker process) and reads, decodes and crops it (``load_window``);
3. **geometry** (:class:`GeometryStage`, an actor pool of model replicas): the backend, the pointmap
   checks and the token matcher on the backend's device;
4. **commit** (:class:`ShardSink`, a Ray Data ``Datasink`` with ``min_rows_per_write`` = shard size):
   every write task commits its rows as one shard with
   :meth:`~cameo_corr.cache.writer.CacheWriter.write_shard`.

:func:`build_pipeline` chains them. A bad window (missing frame, corrupt image, non-finite or empty
pointmap, too few frames) is a *data* error (:data:`DATA_ERRORS`): it travels down the stages as the
row's ``error`` and is committed as a ``status=failed`` manifest row. This module imports Ray Data; the
command line imports it only when a job runs.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pickle
import time
import warnings
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from ray.data import Datasink

from cameo_corr.schemas import CameoCorrError, FrameRecord, SchemaError, WindowRecord

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pyarrow as pa
    import ray.data

    from cameo_corr.datasets.base import SceneReader
    from cameo_corr.job.config import JobConfig

DATA_ERRORS: tuple[type[BaseException], ...] = (CameoCorrError, OSError)
"""Exceptions that mean "this window's input is bad" (recorded as failed), not "the job is broken"."""


SCENE_CACHE_SIZE = 8
"""Scene records kept per worker process by the load stage (windows of one scene are planned together)."""
STAGES = ("read", "backend", "match", "write")
"""Busy-time stages of the summary (load, model, matcher, shard commit)."""



def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"



# ----------------------------------------------------------------------------- 1. source
def source(todo: "pa.Table", batch_size: int) -> "ray.data.Dataset":
    """The source stage: the windows to do, in blocks of ``batch_size`` rows (one backend call each)."""
    import ray.data

    return ray.data.from_arrow([todo.slice(i, batch_size) for i in range(0, todo.num_rows, batch_size)])


# ----------------------------------------------------------------------------- 2. load (CPU tasks)
@functools.lru_cache(maxsize=4)
def _reader(dataset_json: str) -> "SceneReader":
    """The dataset reader of this worker process (opened once per process and dataset)."""
    from cameo_corr.datasets.base import open_dataset

    options = json.loads(dataset_json)
    return open_dataset(options.pop("name"), options.pop("root"), **options)



@functools.lru_cache(maxsize=SCENE_CACHE_SIZE)
def _scene_frames(dataset_json: str, scene_id: str) -> dict[str, FrameRecord]:
    """``frame_id -> FrameRecord`` of a scene, through a small per-process LRU (errors are not cached)."""
    return {f.frame_id: f for f in _reader(dataset_json).scene(scene_id).frames}


def window_record(dataset_json: str, row: Mapping[str, Any]) -> WindowRecord:
    """Rebuild a planned window's record: its scene's frames selected by id (none for a failed plan)."""
    if row["error"] is not None:
        return WindowRecord(row["window_id"], row["dataset"], row["split"], row["scene_id"], ())
    return WindowRecord.from_frames(row["window_id"], row["dataset"], row["split"], row["scene_id"], row["frame_ids"],
                                    _scene_frames(dataset_json, row["scene_id"]), root=str(_reader(dataset_json).root))


def stored_views(data: Any, images: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`~cameo_corr.schemas.IMAGE_ARRAYS` of a loaded window (``cache.json``'s ``images``:
    format and quality): its canonical views encoded, and the dataset's cameras of those views."""
    import numpy as np

    from cameo_corr.datasets.image_io import encode_views

    encoded, nbytes = encode_views(data.images, images["format"], images.get("quality"))
    return {"images": encoded, "image_nbytes": nbytes, "image_intrinsics": np.asarray(data.intrinsics, dtype=np.float64),
            "image_extrinsics": np.asarray(data.extrinsics, dtype=np.float64)}


def load_batch(batch: "pa.Table", *, dataset_json: str, crop: Mapping[str, Any], with_depth: bool, with_masks: bool,
               images: Mapping[str, Any] | None = None) -> "pa.Table":
    """Load stage body: read + decode + crop each window; data errors become the row's ``error``.

    Output columns: ``window_id``, ``record`` (pickled :class:`WindowRecord`), ``data`` (pickled
    :class:`~cameo_corr.schemas.WindowData`, null when failed), ``views`` (pickled :func:`stored_views`
    when ``images`` is given, else null), ``error``, ``read_seconds``.
    """
    import pyarrow as pa

    from cameo_corr.datasets.canonical import CanonicalView, load_window

    view = CanonicalView.from_dict(crop)
    out: dict[str, list[Any]] = {"window_id": [], "record": [], "data": [], "views": [], "error": [], "read_seconds": []}
    for row in batch.to_pylist():
        t0 = time.perf_counter()
        record = WindowRecord(row["window_id"], row["dataset"], row["split"], row["scene_id"], ())
        data, views, error = None, None, row["error"]
        if error is None:
            try:
                record = window_record(dataset_json, row)
                window = load_window(_reader(dataset_json), record, view, with_depth=with_depth, with_masks=with_masks)
                data = pickle.dumps(window, protocol=5)
                views = None if images is None else pickle.dumps(stored_views(window, images), protocol=5)
            except DATA_ERRORS as e:
                error = _error_text(e)
        for name, value in (("window_id", row["window_id"]), ("record", pickle.dumps(record, protocol=5)), ("data", data),
                            ("views", views), ("error", error), ("read_seconds", time.perf_counter() - t0)):
            out[name].append(value)
    return pa.table(out, schema=pa.schema([("window_id", pa.string()), ("record", pa.large_binary()), ("data", pa.large_binary()),
                                           ("views", pa.large_binary()), ("error", pa.string()), ("read_seconds", pa.float64())]))



# ----------------------------------------------------------------------------- 3. geometry (actors)
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


def device_name(device: Any) -> str:
    """``cpu``, or ``cuda:<index>`` with the index resolved (``cuda`` means the current device)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"


def check_device(device: Any) -> None:
    """Refuse a CUDA device that this process (the describe actor, with the model actors' resources) cannot use:
    ``--device cuda`` on a node without a GPU, a CPU-only torch, or an index beyond the GPUs Ray gave it.
    Otherwise every window would fail in the actors, after the job started."""
    import socket

    from cameo_corr.pipeline.backends import unusable_cuda

    why = unusable_cuda(device)
    if why is None:
        return
    raise SchemaError("device", f"--device {device}: the model actors cannot use it on {socket.gethostname()} ({why}; "
                      f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); give the workers GPUs "
                      "with --gpus-per-worker, or run on CPU with --device cpu", where="backend")


def describe_backend(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The backend entry of ``cache.json``, the ``load_window`` options of the load stage (``load``:
    ``with_depth``, ``with_masks``: what the backend reads) and the device, from a backend built with
    ``spec`` where the model actors will run (:class:`BackendDescriber`, with their resources). Raises
    :class:`SchemaError` (field ``backend``) when the matcher ``spec["match_backend"]`` cannot run on the
    backend's device (faiss not installed there, or without GPU support for CUDA tensors): every
    window would fail."""
    from cameo_corr.pipeline.backends import make_backend, resolve_device
    from cameo_corr.pipeline.match import resolve_backend

    device = resolve_device(spec["backend_options"].get("device"))  # as the backend resolves it
    resolve_backend(spec["match_backend"], device)
    check_device(device)  # before the backend touches it (vggt's constructor would fail with a raw CUDA error)
    backend = make_backend(spec["backend"], **spec["backend_options"])
    return {"backend": backend.describe(), "device": str(backend.device),
            "load": {"with_depth": bool(backend.needs_depth), "with_masks": bool(backend.needs_masks)}}


class BackendDescriber:
    """A Ray actor that runs :func:`describe_backend` where the model actors will run. The driver kills
    it once it has answered: the process ends at once and frees the model it built. (A task with
    ``max_calls=1``, Ray's default for GPU tasks, exits gracefully instead, and Ray 2.60's graceful
    worker exit can abort with a native crash dump on the driver's console.)"""

    def describe(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """:func:`describe_backend` of ``spec``."""
        return describe_backend(spec)


class GeometryStage:
    """One model replica of the actor pool: the geometry backend and the token matcher.

    ``spec`` holds ``backend``, ``backend_options``, ``match_backend``, ``grid``, ``extra_grids``
    (tokenized and matched from the same pointmaps: one backend pass per window), ``tau`` and
    ``expected`` (the backend description the cache's config was built with; an actor whose backend
    describes itself differently, e.g. another dtype on another GPU type, refuses to start).
    ``progress`` (a :class:`ProgressCounter` actor or ``None``) hears of every window as it finishes.
    """

    def __init__(self, spec: Mapping[str, Any], progress: Any = None) -> None:
        from cameo_corr.pipeline.backends import make_backend

        self.progress = progress
        self.spec = dict(spec)
        self.backend = make_backend(spec["backend"], **spec["backend_options"])
        described = self.backend.describe()
        if json.dumps(described, sort_keys=True, default=str) != json.dumps(spec["expected"], sort_keys=True, default=str):
            raise RuntimeError(f"this worker's backend describes itself as {described}, the cache config says {spec['expected']}")
        self.device = device_name(self.backend.device)
        """Where this actor's model runs (``cpu``, ``cuda:<index>``), reported with every window it computes."""
        self.ready_time = time.time()

    def __call__(self, batch: "pa.Table") -> "pa.Table":
        """Pointmaps + correspondences of the loaded windows of ``batch`` (drops the ``data`` column).

        Adds ``arrays`` (pickled cache arrays with the loaded window's stored ``views`` if any, null when
        failed), ``backend_seconds``,
        ``match_seconds``, ``ready_time`` (when this actor finished loading its model, UNIX time) and
        ``device`` (where its model runs).
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
        self._synchronize()
        share = (time.perf_counter() - t0) / max(len(ready), 1)
        for k, result in zip(ready, results):
            backend_s[k] = share
            t1 = time.perf_counter()
            outcome = self._correspond(records[k], result)
            match_s[k] = time.perf_counter() - t1
            if isinstance(outcome, str):
                errors[k] = outcome
            else:
                views = rows[k].get("views")
                arrays[k] = pickle.dumps({**outcome, **(pickle.loads(views) if views is not None else {})}, protocol=5)
        if self.progress is not None:  # windows done as they finish, before their shard is committed
            self.progress.finished.remote([r["window_id"] for r, e in zip(rows, errors) if e is None],
                                          [r["window_id"] for r, e in zip(rows, errors) if e is not None])
        return pa.table(
            {"window_id": [r["window_id"] for r in rows], "record": [r["record"] for r in rows], "arrays": arrays, "error": errors,
             "read_seconds": [r["read_seconds"] for r in rows], "backend_seconds": backend_s, "match_seconds": match_s,
             "ready_time": [self.ready_time] * len(rows), "device": [self.device] * len(rows)},
            schema=pa.schema([("window_id", pa.string()), ("record", pa.large_binary()), ("arrays", pa.large_binary()),
                              ("error", pa.string()), ("read_seconds", pa.float64()), ("backend_seconds", pa.float64()),
                              ("match_seconds", pa.float64()), ("ready_time", pa.float64()), ("device", pa.string())]),
        )

    def _synchronize(self) -> None:
        """Wait for the backend's queued GPU work, so that it is timed as backend time, not as the
        matcher's (whose device -> host copy would otherwise wait for it)."""
        if self.backend.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.backend.device)

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
        from cameo_corr.cache.shard import window_arrays
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



# ----------------------------------------------------------------------------- 4. commit
class FailFastStop(CameoCorrError):
    """``--fail-fast``: a committed shard holds a failed window; stop the job."""


class ShardSink(Datasink):
    """Commits each write task's rows as one shard (``min_rows_per_write`` = shard size) with the cache's
    protocol; the last write of a run may be smaller. A retried write task finds its fragment and
    commits nothing twice (:meth:`CacheWriter.write_shard` is idempotent per shard id, and the shard id
    is the hash of its window ids)."""

    def __init__(self, out: str, storage_options: Mapping[str, Any] | None, config_json: str, shard_size: int,
                 fail_fast: bool, progress: Any = None) -> None:
        self.out = out
        self.storage_options = dict(storage_options or {}) or None
        self.config_json = config_json
        self.shard_size = shard_size
        self.fail_fast = fail_fast
        self.progress = progress
        self.results: list[dict[str, Any]] = []

    @property
    def min_rows_per_write(self) -> int:
        return self.shard_size

    def get_name(self) -> str:
        return "CommitShards"

    def write(self, blocks: Iterable[Any], ctx: Any) -> dict[str, Any]:
        """Commit one shard; return its counts, stage seconds, shard bytes, the actors' ready time and devices."""
        import pyarrow as pa
        import pyarrow.compute as pc
        from ray.data.block import BlockAccessor

        from cameo_corr.cache.writer import CacheWriter, WindowOutcome
        from cameo_corr.schemas import CacheConfig, shard_id_of

        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        rows = pa.concat_tables(tables).to_pylist() if tables else []
        if not rows:
            return {"ok": 0, "failed": 0, "shards": 0, "bytes": 0, "stages": dict.fromkeys(STAGES, 0.0), "ready": math.inf,
                    "devices": []}
        outcomes = [
            WindowOutcome(pickle.loads(r["record"]), arrays=pickle.loads(r["arrays"])) if r["arrays"] is not None
            else WindowOutcome(pickle.loads(r["record"]), error=r["error"])
            for r in rows
        ]
        writer = CacheWriter(self.out, CacheConfig.from_json(self.config_json), self.storage_options)
        shard_id = shard_id_of([o.record.window_id for o in outcomes])
        t0 = time.perf_counter()
        committed = writer.write_shard(shard_id, outcomes)
        write_s = time.perf_counter() - t0
        failed = sum(1 for o in outcomes if o.error is not None)
        result = {
            "ok": len(outcomes) - failed,
            "failed": failed,
            "shards": 1,
            "bytes": int(pc.max(committed.column("shard_bytes")).as_py() or 0),
            "stages": {"read": sum(r["read_seconds"] for r in rows), "backend": sum(r["backend_seconds"] for r in rows),
                       "match": sum(r["match_seconds"] for r in rows), "write": write_s},
            "ready": min(r["ready_time"] for r in rows),
            "devices": sorted({r["device"] for r in rows}),
        }
        if self.progress is not None:
            self.progress.add.remote(result["ok"], failed)
        if self.fail_fast and failed:
            first = next(o for o in outcomes if o.error is not None)
            raise FailFastStop(f"--fail-fast: window {first.record.window_id} failed ({first.error}); shard {shard_id} committed")
        return result

    def on_write_complete(self, write_result: Any) -> None:
        self.results = list(write_result.write_returns)


class ProgressCounter:
    """Windows done so far (a tiny actor on the driver's node the stages report to): finished by the
    geometry stage, ok or failed (:meth:`finished`; each window counted once, also when Ray retries its
    batch after a system failure: the ids seen are kept as 64-bit integers, about 60 bytes a window),
    and committed in shards (:meth:`add`)."""

    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0
        self.seen: set[int] = set()
        self.finished_ok = 0
        self.finished_failed = 0

    def add(self, ok: int, failed: int) -> None:
        """A shard holding ``ok`` and ``failed`` windows was committed."""
        self.ok += ok
        self.failed += failed

    def finished(self, ok_ids: list[str], failed_ids: list[str]) -> None:
        """These windows left the geometry stage (with arrays, or with an error)."""
        for ids, ok in ((ok_ids, True), (failed_ids, False)):
            for wid in ids:
                key = int(wid, 16)
                if key not in self.seen:
                    self.seen.add(key)
                    if ok:
                        self.finished_ok += 1
                    else:
                        self.finished_failed += 1

    def get(self) -> tuple[int, int]:
        """``(ok, failed)`` windows committed."""
        return self.ok, self.failed

    def counts(self) -> dict[str, int]:
        """``ok`` and ``failed`` windows finished, and ``committed`` windows (ok and failed)."""
        return {"ok": self.finished_ok, "failed": self.finished_failed, "committed": self.ok + self.failed}



# ----------------------------------------------------------------------------- the pipeline
def build_pipeline(todo: "pa.Table", config: "JobConfig", reader: "SceneReader", load: Mapping[str, bool], cache_config_json: str,
                   progress: Any = None) -> tuple["ray.data.Dataset", ShardSink]:
    """source -> load -> geometry -> commit over the windows ``todo``: the dataset to write and its sink.
    ``load`` holds the load stage's ``with_depth`` and ``with_masks`` (:func:`describe_backend`).

    The pool has ``workers`` model actors, or one per block of ``batch_size`` windows when there are
    fewer blocks: each actor loads a model, and Ray Data warns of a pool larger than its input.

    ``--max-retries`` bounds the retries of a load/commit task and the restarts of a model actor (-1:
    Ray Data's default, unlimited). Calls on an actor are always retried (Ray Data's default): after a
    node loss they fail fast with "actor unavailable" until Ray has declared the node dead and restarted
    the actor elsewhere, so any bound would abort the job. Ray marks these remote args deprecated in
    favour of its own defaults, hence the filter.
    """
    from ray.data import ActorPoolStrategy

    task_retries, actor_retries = _retries(config.max_retries)
    view = config.view(reader)
    sink = ShardSink(config.out, config.storage(), cache_config_json, config.shard_size, config.fail_fast, progress)
    actors = max(1, min(config.workers, math.ceil(todo.num_rows / config.batch_size)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        ds = source(todo, config.batch_size)
        ds = ds.map_batches(
            load_batch, batch_format="pyarrow", batch_size=config.batch_size, num_cpus=1, **task_retries,
            fn_kwargs={"dataset_json": json.dumps(reader.describe(), sort_keys=True, default=str), "crop": view.to_dict(),
                       **load, "images": json.loads(cache_config_json).get("images")},
        )
        ds = ds.map_batches(
            GeometryStage, batch_format="pyarrow", batch_size=config.batch_size, compute=ActorPoolStrategy(size=actors),
            num_gpus=config.gpus_per_worker, num_cpus=config.cpus_per_worker, **actor_retries,
            fn_constructor_kwargs={"spec": {**config.geometry_spec(), "expected": json.loads(cache_config_json)["backend"]},
                                   "progress": progress},
        )
    return ds, sink


def commit(ds: "ray.data.Dataset", sink: ShardSink, max_retries: int) -> None:
    """Run the pipeline: stream ``ds`` into the commit stage ``sink`` (write tasks of 1 CPU each)."""
    task_retries, _ = _retries(max_retries)
    ds.write_datasink(sink, ray_remote_args={**task_retries, "num_cpus": 1})


def _retries(max_retries: int) -> tuple[dict[str, int], dict[str, int]]:
    """Ray options of the load/commit tasks and of the model actors for ``--max-retries`` (-1: Ray's default)."""
    if max_retries < 0:
        return {}, {}
    return {"max_retries": max_retries}, {"max_restarts": max_retries}


__all__ = [
    "DATA_ERRORS",
    "STAGES",
    "source",
    "window_record",
    "stored_views",
    "load_batch",
    "check_pointmaps",
    "BackendDescriber",
    "describe_backend",
    "GeometryStage",
    "FailFastStop",
    "ShardSink",
    "ProgressCounter",
    "build_pipeline",
    "commit",
]
