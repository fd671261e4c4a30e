"""The Ray Data preprocessing job end to end on synthetic scenes: clean run with arrays equal to the
pipeline functions called directly, bad scenes, resume after a SIGKILL of the whole job, orphan
clean-up, repair of a deleted shard, --retry-failed, resume from a moved dataset root, one writer per
cache (lease), refused config mixing, CLI exit codes and one-line errors."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")
synthetic = pytest.importorskip("cameo_corr.datasets.synthetic", reason="synthetic generator not available")
pytest.importorskip("cameo_corr.pipeline.match", reason="token matcher not available")

from cameo_corr.cli import main as cli_main  # noqa: E402
from cameo_corr.datasets.base import open_dataset  # noqa: E402
from cameo_corr.cache.config import CacheMismatchError
from cameo_corr.cache.consolidation import drop_shards
from cameo_corr.cache.layout import shard_dir
from cameo_corr.cache.manifest import finished_shard_ids, fragment_names, read_consolidation
from cameo_corr.cache.reader import CorrCache
from cameo_corr.cache.verify import verify_cache  # noqa: E402
from cameo_corr.job.driver import newly_dead_nodes, preflight_backend, run_preprocess  # noqa: E402
from cameo_corr.job.cli import format_summary, no_ok_window  # noqa: E402
from cameo_corr.job.stages import window_record
from cameo_corr.schemas import DatasetError, SchemaError  # noqa: E402

RUN = dict(backend="depth", grid=8, views=3, windows_per_scene=2, crop_size=48, shard_size=2, progress=False)
GOOD, CORRUPT, MISSING, NAN_DEPTH = 0, 1, 2, 3


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray instance shared by the tests of this module (start-up costs seconds)."""
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """5 synthetic scenes; scene 1 has corrupt images, scene 2 missing images, scene 3 NaN depth."""
    from PIL import Image

    root = synthetic.generate_dataset(tmp_path_factory.mktemp("data") / "synth", scenes=5, frames=6, image_size=48, seed=0)
    reader = open_dataset("synthetic", root)
    sids = reader.scene_ids()
    for f in reader.scene(sids[CORRUPT]).frames:
        p = Path(root) / f.image_path
        p.write_bytes(p.read_bytes()[:40])
    for f in reader.scene(sids[MISSING]).frames:
        (Path(root) / f.image_path).unlink()
    for f in reader.scene(sids[NAN_DEPTH]).frames:
        h, w = f.image_size
        nan_bits = np.full((h, w), np.float16(np.nan)).view(np.uint16)
        Image.fromarray(nan_bits).save(Path(root) / f.depth_path)
    return Path(root)


@pytest.fixture(scope="module")
def clean(ray_session, dataset, tmp_path_factory) -> tuple[Path, dict]:
    """A clean run through the CLI (exit code 0 although some windows fail) and its summary."""
    tmp = tmp_path_factory.mktemp("clean")
    out, summary_json = tmp / "cache", tmp / "summary.json"
    rc = cli_main([
        "preprocess", "--dataset", "synthetic", "--root", str(dataset), "--out", str(out), "--backend", "depth",
        "--grid", "8", "--views", "3", "--windows-per-scene", "2", "--crop-size", "48", "--shard-size", "2",
        "--workers", "1", "--no-progress", "--summary-json", str(summary_json), "--consolidate-seconds", "0.05",
    ])
    assert rc == 0
    return out, json.loads(summary_json.read_text())


def assert_same_cache(a: Path, b: Path) -> None:
    ca, cb = CorrCache(a), CorrCache(b)
    assert sorted(ca.window_ids()) == sorted(cb.window_ids())
    assert sorted(ca.manifest("failed").column("window_id").to_pylist()) == sorted(cb.manifest("failed").column("window_id").to_pylist())
    for wid in ca.window_ids():
        wa, wb = ca.window(wid), cb.window(wid)
        for name in wa:
            assert np.array_equal(wa[name], wb[name], equal_nan=True), (wid, name)
        ra, rb = ca.row(wid), cb.row(wid)
        assert {k: ra[k] for k in ("frame_ids", "image_paths", "valid_frac", "mask_frac")} == {
            k: rb[k] for k in ("frame_ids", "image_paths", "valid_frac", "mask_frac")
        }


def test_clean_run(clean, dataset):
    out, s = clean
    sids = open_dataset("synthetic", dataset).scene_ids()
    assert s["windows_planned"] == 10 and s["windows_skipped"] == 0 and not s["shard_errors"]
    assert s["windows_ok"] == 4 and s["windows_failed"] == 6
    assert s["shards_written"] == 5 and s["manifest_consolidations"] >= 1  # consolidated while it ran, and at the end
    assert fragment_names(_loc(out)) == [] and sum(q["rows"] for q in read_consolidation(_loc(out))["parts"]) == 10
    cache = CorrCache(out)
    failed = {r["scene_id"]: r["error"] for r in cache.manifest("failed").to_pylist()}
    assert set(failed) == {sids[CORRUPT], sids[MISSING], sids[NAN_DEPTH]}
    assert "no valid pointmap pixel" in failed[sids[NAN_DEPTH]]
    assert {r["scene_id"] for r in cache.manifest().to_pylist()} == {sids[GOOD], sids[4]}
    assert verify_cache(cache) == []
    w = cache.window(cache.window_ids()[0])
    assert w["nn"].shape == (3, 3, 64) and w["points"].shape == (3, 8, 8, 3)
    reader = open_dataset("synthetic", dataset)
    assert cache.config.crop["policy"] == reader.default_crop_policy and cache.config.crop["size"] == 48
    assert cache.config.dataset == reader.describe()
    assert cache.config.created_by["plan"]["policy"] == "random"
    assert s["bytes_per_window"] > 0 and set(s["stage_seconds"]) >= {"read", "backend", "match", "write"}
    assert s["devices_used"] == ["cpu"]  # reported by the model actors themselves


def test_arrays_equal_the_pipeline_functions_called_directly(clean, dataset, reference_of, assert_equals_reference):
    cache = CorrCache(clean[0])
    assert_equals_reference(clean[0], reference_of(dataset, cache.config, RUN["views"], RUN["windows_per_scene"]))


def test_planned_table_rebuilds_the_planner_records(dataset):
    from cameo_corr.datasets.planner import default_plan_config, plan_table, plan_windows

    reader = open_dataset("synthetic", dataset)
    plan = default_plan_config("synthetic", views=3, windows_per_scene=2)
    planned = plan_windows(reader, plan, {"x": 1}, scene_ids=[*reader.scene_ids(), "gone"])
    table = plan_table(reader, plan, {"x": 1}, scene_ids=[*reader.scene_ids(), "gone"])
    assert table.schema.field("frame_ids").type.value_type == "string" and table.num_rows == len(planned)
    assert planned[-1].error and "gone" in planned[-1].error
    key = json.dumps(reader.describe(), sort_keys=True, default=str)
    for w, row in zip(planned, table.to_pylist()):
        got = window_record(key, row)
        assert row["error"] == w.error and len(got.frames) == len(w.record.frames)
        assert all(np.array_equal(a.intrinsics, b.intrinsics) and np.array_equal(a.extrinsics, b.extrinsics)
                   for a, b in zip(got.frames, w.record.frames))
        assert (got.window_id, got.scene_id, got.frame_ids, got.image_paths) == (
            w.record.window_id, w.record.scene_id, w.record.frame_ids, w.record.image_paths)


def load_stage(cfg) -> tuple[dict, dict, pa.Table]:
    """``cfg``'s geometry spec, its backend as the job describes it (``describe_backend``), and every
    planned window through the load stage with the options that description gives, as the job runs it."""
    from cameo_corr.datasets.planner import plan_table
    from cameo_corr.job.stages import describe_backend, load_batch

    reader = cfg.open_reader()
    spec = cfg.geometry_spec()
    described = describe_backend(spec)
    loaded = load_batch(plan_table(reader, cfg.plan_config(), {}), dataset_json=json.dumps(reader.describe(), sort_keys=True, default=str),
                        crop=cfg.view(reader).to_dict(), **described["load"])
    return spec, described, loaded


def test_geometry_stage_reports_each_window_as_it_finishes(dataset, tmp_path):
    """The progress counter hears of every window when the geometry stage is done with it (ok or failed),
    before any shard is committed, and counts a window once when Ray retries its batch."""
    from types import SimpleNamespace

    from cameo_corr.job.config import JobConfig
    from cameo_corr.job.stages import GeometryStage, ProgressCounter

    spec, described, loaded = load_stage(JobConfig(dataset="synthetic", root=dataset, out=str(tmp_path / "c"), workers=1, **RUN))
    calls: list[tuple[list[str], list[str]]] = []
    recorder = SimpleNamespace(finished=SimpleNamespace(remote=lambda ok, failed: calls.append((ok, failed))))
    out = GeometryStage({**spec, "expected": described["backend"]}, progress=recorder)(loaded).to_pylist()
    ok = [r["window_id"] for r in out if r["arrays"] is not None]
    failed = [r["window_id"] for r in out if r["arrays"] is None]
    assert calls == [(ok, failed)] and len(ok) == 4 and len(failed) == 6
    counter = ProgressCounter()
    counter.finished(ok, failed)
    counter.finished(ok[:2], failed[:1])  # a batch retried after a worker crash
    counter.add(2, 0)
    assert counter.counts() == {"ok": 4, "failed": 6, "committed": 2} and counter.get() == (2, 0)


def test_geometry_stage_times_queued_gpu_work_as_backend_time(dataset, tmp_path, monkeypatch):
    """On a CUDA backend the stage waits for the device after the backend's batch and before matching,
    so kernels still queued are charged to ``backend_seconds``, not to ``match_seconds`` (the backend
    runs on CPU here; only its device says CUDA)."""
    import torch

    from cameo_corr.job.config import JobConfig
    from cameo_corr.job.stages import GeometryStage

    spec, described, loaded = load_stage(JobConfig(dataset="synthetic", root=dataset, out=str(tmp_path / "c"), workers=1, **RUN))
    stage = GeometryStage({**spec, "expected": described["backend"]})
    events: list[str] = []
    backend, correspond = stage.backend, stage._correspond

    class Recorded:  # the real backend, recording its batches, on the device given
        def __init__(self, device: torch.device) -> None:
            self.device = device

        def run_batch(self, windows):
            events.append("backend")
            return backend.run_batch(windows)

        def __call__(self, window):
            events.append("backend")
            return backend(window)

    monkeypatch.setattr(stage, "_correspond", lambda *a: events.append("match") or correspond(*a))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: events.append(f"synchronize {device}"))
    stage.backend = Recorded(backend.device)
    stage(loaded)
    assert "synchronize" not in " ".join(events) and "match" in events  # a CPU backend has nothing to wait for
    events.clear()
    stage.backend = Recorded(torch.device("cuda", 0))
    stage(loaded)
    assert events[:2] == ["backend", "synchronize cuda:0"] and set(events[2:]) == {"match"}


def test_load_stage_reads_what_the_backend_needs(dataset, tmp_path):
    """The load stage decodes the foreground masks only for a backend that reads them (the depth backend
    with ``mask_background``), and that backend then keeps its background out of the valid pixels."""
    from cameo_corr.job.config import JobConfig
    from cameo_corr.job.stages import GeometryStage

    valid = {}
    for options in ({"device": "cpu"}, {"device": "cpu", "mask_background": True}):
        cfg = JobConfig(dataset="synthetic", root=dataset, out=str(tmp_path / "c"), workers=1, backend_options=options, **RUN)
        spec, described, loaded = load_stage(cfg)
        masked = options.get("mask_background", False)
        assert described["load"] == {"with_depth": True, "with_masks": masked}
        windows = [pickle.loads(d) for d in loaded.column("data").to_pylist() if d is not None]
        assert windows and all((w.masks is not None) == masked for w in windows)
        out = GeometryStage({**spec, "expected": described["backend"]})(loaded).to_pylist()
        valid[masked] = [pickle.loads(r["arrays"])["valid"].mean() for r in out if r["arrays"] is not None]
    assert len(valid[True]) == len(valid[False]) > 0
    assert all(m < u for m, u in zip(valid[True], valid[False]))


def test_rerun_skips_everything(clean, dataset, tmp_path, monkeypatch):
    """A re-run of a finished cache says so without starting Ray or building the model."""
    import cameo_corr.job.driver as driver

    out = tmp_path / "cache"
    shutil.copytree(clean[0], out)
    before = sorted(os.listdir(out / "shards"))

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started for a run with nothing to compute")

    monkeypatch.setattr(driver, "init_ray", no_ray)
    s = run_preprocess(dataset="synthetic", root=dataset, out=out, workers=1, **RUN)
    assert s["windows_skipped"] == 10 and s["shards_written"] == 0 and s["windows_ok"] == 0
    assert sorted(os.listdir(out / "shards")) == before
    text = format_summary(s)
    assert "nothing left to compute: all 10 planned windows are in the cache" in text
    failed = s["windows_failed_earlier"]
    assert failed
    assert f"{failed} window{'s' if failed > 1 else ''} recorded as failed by an earlier run {'were' if failed > 1 else 'was'} not redone" in text
    assert "nothing left to compute" not in format_summary({**s, "windows_skipped": 7, "windows_deferred": 3})
    one = format_summary({**s, "windows_failed_earlier": 1})
    assert "1 window recorded as failed by an earlier run was not redone" in one and one.endswith("--retry-failed to redo it")
    # a run that failed before committing anything computed nothing either, but had work left
    failed_run = {**s, "windows_skipped": 0, "windows_failed_earlier": 0, "shard_errors": [("*", "SystemException")]}
    assert "nothing left to compute" not in format_summary(failed_run)
    assert "nothing left to compute" not in format_summary({**s, "windows_skipped": 7, "windows_ok": 3})
    assert "the one window failed" in no_ok_window({**s, "windows_failed": 1, "windows_failed_earlier": 0, "errors": []})


def test_max_windows_computes_a_prefix_and_a_rerun_the_rest(clean, dataset, tmp_path):
    out = tmp_path / "cache"
    s = run_preprocess(dataset="synthetic", root=dataset, out=out, workers=1, max_windows=3, **RUN)
    assert s["windows_ok"] + s["windows_failed"] == 3 and s["windows_deferred"] == 7 and s["windows_skipped"] == 0
    s = run_preprocess(dataset="synthetic", root=dataset, out=out, workers=1, **RUN)
    assert s["windows_skipped"] == 3 and s["windows_deferred"] == 0 and s["windows_ok"] + s["windows_failed"] == 7
    assert_same_cache(clean[0], out)


def test_fewer_windows_than_workers_start_one_actor_per_block(ray_session, dataset, tmp_path):
    """One window left and ``--workers 2``: one model actor, not two (each loads a model), and Ray Data's
    two-line warning about an actor pool larger than its input is not printed."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = run_preprocess(dataset="synthetic", root=dataset, out=tmp_path / "cache", workers=2, max_windows=1, **RUN)
    assert s["windows_ok"] + s["windows_failed"] == 1
    assert not [w for w in caught if "concurrent actors" in str(w.message)], [str(w.message) for w in caught]


def test_the_progress_thread_never_restarts_ray_after_it_shut_down():
    """Ctrl-C shuts Ray down in the main thread; a progress thread still polling its counter actor would
    start a new local Ray instance (Ray's auto-init: "SIGTERM handler is not set because current thread is
    not the main thread"). It stops instead."""
    code = (
        "import ray, threading, time\n"
        "from cameo_corr.job.driver import start_progress\n"
        "ray.init(address='local', num_cpus=1, include_dashboard=False, log_to_driver=False)\n"
        "stop = threading.Event()\n"
        "counter, watcher = start_progress(3, stop)\n"
        "time.sleep(1.5)\n"
        "ray.shutdown()\n"
        "watcher.join(timeout=20)\n"
        "print('ray restarted' if ray.is_initialized() else 'ray stayed down', 'thread alive' if watcher.is_alive() else 'thread ended')\n"
    )
    env = local_env()
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split("\n")[-2] == "ray stayed down thread ended", res.stdout + res.stderr[-3000:]
    assert "SIGTERM handler is not set" not in res.stderr


def test_orphans_of_killed_workers_are_redone(clean, dataset, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(clean[0], out)
    cache = CorrCache(out)
    shard = cache.row(cache.window_ids()[0])["shard"]
    shard_file = (out / shard_dir(shard)).read_bytes()
    drop_shards(_loc(out), [shard])
    (out / shard_dir(shard)).write_bytes(shard_file)  # killed between shard rename and its manifest rows
    (out / "shards" / ".tmp-0123456789abcdef-deadbeef.zarr").mkdir()  # killed mid-write
    (out / "shards" / ".tmp-0123456789abcdef-deadbeef.zarr" / "zarr.json").write_text("{}")
    s = run_preprocess(dataset="synthetic", root=dataset, out=out, workers=1, **RUN)
    assert s["orphans_removed"] == 2 and s["shards_written"] == 1 and s["windows_skipped"] == 10 - s["windows_ok"] - s["windows_failed"]
    assert not any(n.startswith(".tmp-") for n in os.listdir(out / "shards"))
    assert_same_cache(clean[0], out)


def test_sigkill_whole_job_then_rerun_equals_clean(clean, dataset, tmp_path, caplog):
    """SIGKILL the CLI job (driver + its local Ray workers) mid-run, re-run, compare with a clean run."""
    import psutil

    out = tmp_path / "cache"
    cmd = [
        sys.executable, "-m", "cameo_corr.cli", "preprocess", "--dataset", "synthetic", "--root", str(dataset),
        "--out", str(out), "--backend", "depth", "--grid", "8", "--views", "3", "--windows-per-scene", "2",
        "--crop-size", "48", "--shard-size", "1", "--workers", "1", "--num-cpus", "2", "--no-progress",
        "--consolidate-every", "2",  # the driver consolidates while it runs: the kill may land in a consolidation
    ]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            children = psutil.Process(proc.pid).children(recursive=True) or children
            if len(finished_shard_ids(_loc(out))) >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the job ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for child in children:  # Ray processes of the killed job (same session), by pid
            if child.is_running():
                child.kill()
    done = len(finished_shard_ids(_loc(out)))
    assert 2 <= done < 10, f"expected a partial cache after the kill, found {done} of 10 shards"
    # the killed job's lease is live by its timeout (180 s), but its process has exited: a resume takes it
    # over at once, saying whose lease it was and why (issue 21); with two workers: the cache must not
    # depend on how many workers wrote it
    with caplog.at_level(logging.WARNING, logger="cameo_corr.cache.lease"):
        s = run_preprocess(dataset="synthetic", root=dataset, out=out, workers=2, **{**RUN, "shard_size": 1})
    assert f"pid {proc.pid}" in caplog.text and f"its process {proc.pid} on " in caplog.text and "has exited" in caplog.text
    assert s["windows_skipped"] >= done and not s["shard_errors"]
    assert not any(n.startswith(".tmp-") for n in os.listdir(out / "shards"))
    assert verify_cache(CorrCache(out)) == []
    assert_same_cache(clean[0], out)


def _loc(path: Path):
    from cameo_corr.cache.location import CacheLocation

    return CacheLocation(path)


def test_config_mixing_refused(clean, dataset, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(clean[0], out)
    with pytest.raises(CacheMismatchError, match="field 'tau'"):
        run_preprocess(dataset="synthetic", root=dataset, out=out, workers=1, **{**RUN, "tau": 2.0})
    with pytest.raises(CacheMismatchError, match="field 'backend'"):  # checked once the workers describe it
        run_preprocess(dataset="synthetic", root=dataset, out=out, workers=1, **{**RUN, "backend_options": {"frame": "first"}})


def test_cli_fail_fast_and_bad_options(ray_session, dataset, tmp_path, capsys):
    sids = open_dataset("synthetic", dataset).scene_ids()
    base = ["preprocess", "--dataset", "synthetic", "--root", str(dataset), "--backend", "depth", "--grid", "8", "--views", "3",
            "--crop-size", "48", "--no-progress", "--scene", sids[CORRUPT]]
    assert cli_main([*base, "--out", str(tmp_path / "b"), "--fail-fast"]) == 1
    assert "failed 1" in capsys.readouterr().out
    assert cli_main([*base, "--out", str(tmp_path / "c"), "--frame", "first", "--points", "head"]) == 2
    assert "does not take --points" in capsys.readouterr().err


def test_cli_errors_before_starting_workers(dataset, tmp_path, capsys, monkeypatch):
    base = ["preprocess", "--dataset", "synthetic", "--grid", "8", "--views", "3", "--no-progress", "--out", str(tmp_path / "c")]
    for name in ["vggt", *(m for m in sys.modules if m.startswith("vggt."))]:  # as without the optional extra
        monkeypatch.setitem(sys.modules, name, None)
    for dry in ([], ["--dry-run"]):  # a dry run used to show the ImportError's traceback (exit 1)
        assert cli_main([*base, "--root", str(dataset), "--backend", "vggt", *dry]) == 2
        err = capsys.readouterr().err
        assert "needs the vggt package" in err and "pip install git+https://github.com/facebookresearch/vggt" in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert cli_main([*base, "--root", str(tmp_path / "missing")]) == 2
    assert "missing: dataset root of 'synthetic' is not a directory" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "faiss", None)  # a matcher whose package is missing: every window would fail
    assert cli_main([*base, "--root", str(dataset), "--backend", "depth", "--match-backend", "faiss"]) == 2
    err = capsys.readouterr().err
    assert "'faiss' needs the faiss package" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_a_matcher_that_cannot_run_on_the_workers_device_is_refused_before_any_window(ray_session, dataset, tmp_path):
    """The matcher is checked where the model actors run, on their device (here a depth backend told to use
    CUDA tensors with a faiss that has no GPU support), and Ray's wrapper is taken off the error."""
    import faiss

    from cameo_corr.job.config import JobConfig
    from cameo_corr.job.driver import describe_on_cluster

    if faiss.get_num_gpus() > 0:
        pytest.skip("this faiss has GPU support")
    cfg = JobConfig(dataset="synthetic", root=dataset, out=str(tmp_path / "c"), workers=1, backend_options={"device": "cuda"},
                    match_backend="faiss", **{k: v for k, v in RUN.items() if k != "backend"}, backend="depth")
    with pytest.raises(SchemaError, match="'faiss' was asked for CUDA tensors but the installed faiss has no GPU support") as e:
        describe_on_cluster(cfg)
    assert type(e.value) is SchemaError and e.value.field == "backend"
    ok = JobConfig(dataset="synthetic", root=dataset, out=str(tmp_path / "c"), workers=1, match_backend="faiss", **RUN)
    assert describe_on_cluster(ok)["device"] == "cpu"


def test_the_describe_actors_process_is_gone_once_it_answered(ray_session, dataset, tmp_path):
    """The actor that built the backend to describe it is killed when it has answered (success or error):
    its process, holding the model's host and GPU memory, ends instead of idling beside the model actors."""
    import psutil

    from cameo_corr.job.config import JobConfig
    from cameo_corr.job.driver import describe_on_cluster

    def describers() -> list[dict]:
        return [a for a in ray._private.state.actors().values() if a["ActorClassName"] == "BackendDescriber"]

    before = {a["ActorID"] for a in describers()}
    ok = JobConfig(dataset="synthetic", root=dataset, out=str(tmp_path / "c"), workers=1, **RUN)
    assert describe_on_cluster(ok)["device"] == "cpu"
    bad = JobConfig(dataset="synthetic", root=dataset, out=str(tmp_path / "c"), workers=1, match_backend="no-such-matcher", **RUN)
    with pytest.raises(SchemaError, match="no-such-matcher"):
        describe_on_cluster(bad)
    ours = [a for a in describers() if a["ActorID"] not in before]
    assert len(ours) == 2 and all(a["State"] == "DEAD" for a in ours), ours
    deadline = time.time() + 20
    while any(psutil.pid_exists(a["Pid"]) for a in ours) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(psutil.pid_exists(a["Pid"]) for a in ours)


def test_the_device_is_checked_before_the_backend_is_built(monkeypatch):
    """A backend whose constructor touches the device (vggt moves its model there) is never built for a
    device the model actors cannot use: the one-line refusal comes first, not the constructor's CUDA error."""
    import torch

    import cameo_corr.pipeline.backends as backends
    from cameo_corr.job.stages import describe_backend

    if torch.cuda.is_available():
        pytest.skip("needs a machine without a usable GPU")

    def touch_the_device(name, **options):
        raise AssertionError("Torch not compiled with CUDA enabled")

    monkeypatch.setattr(backends, "make_backend", touch_the_device)
    spec = {"backend": "vggt", "backend_options": {"device": "cuda"}, "match_backend": "auto"}
    with pytest.raises(SchemaError, match=r"--device cuda: the model actors cannot use it"):
        describe_backend(spec)


def test_a_device_the_workers_cannot_use_is_refused_before_any_window(dataset, tmp_path):
    """``--device cuda`` where the model actors get no usable GPU: refused by the describe actor (where the
    actors will run) with one line naming the cause, instead of every window failing in the actors with
    a cut Ray traceback and the advice to re-run; the preflight's warning is one line too."""
    import torch

    from cameo_corr.job.stages import check_device

    check_device("cpu")
    if torch.cuda.is_available():
        with pytest.raises(SchemaError, match=r"--device cuda:99: the model actors cannot use it"):
            check_device("cuda:99")
        return
    with pytest.raises(SchemaError, match=r"--device cuda: the model actors cannot use it on .*(CPU-only build|0 CUDA device)"):
        check_device("cuda")
    env = local_env()
    res = subprocess.run(_cli(dataset, tmp_path / "c", "--backend", "depth", "--device", "cuda", "--no-progress"), env=env,
                         capture_output=True, text=True, timeout=300)
    ours = [line for line in res.stderr.splitlines() if line.startswith("cameo-corr preprocess:")]
    assert res.returncode == 2 and "Traceback" not in res.stderr and "UserWarning" not in res.stderr, res.stderr[-3000:]
    assert ours[0].startswith("cameo-corr preprocess: warning: --device cuda with --gpus-per-worker 0: Ray reserves no GPU")
    assert ours[-1].startswith("cameo-corr preprocess: error: backend: field 'device': --device cuda: the model actors cannot use it")
    assert len(ours) == 2


def test_a_failed_run_names_the_error_behind_rays_wrappers():
    """A run that failed in an actor: the line names the actor's own error, without Ray's colours and traceback."""
    from ray.exceptions import RayTaskError, UserCodeException

    from cameo_corr.job.driver import failure_text

    try:
        try:
            raise AssertionError("Torch not compiled with CUDA enabled")
        except AssertionError as inner:
            raise UserCodeException("UDF failed to process a data block.") from inner
    except UserCodeException as user:
        wrapped = RayTaskError("MapWorker(GeometryStage).submit", "\x1b[36mray::MapWorker.submit()\x1b[39m\nTraceback (most "
                               "recent call last):\n  File \"x.py\", line 1\nAssertionError: Torch not compiled with CUDA enabled",
                               user).as_instanceof_cause()
    assert failure_text(wrapped) == "AssertionError: Torch not compiled with CUDA enabled"
    bare = RayTaskError("f", "\x1b[31mray::f()\x1b[39m\nTraceback (most recent call last):\nValueError: bad\n", None)
    assert failure_text(bare) == "ValueError: bad"


def test_preflight_warns_when_a_gpu_backend_gets_no_gpu(monkeypatch):
    from cameo_corr.pipeline.backends.vggt import VGGTBackend

    monkeypatch.setattr(VGGTBackend, "check_requirements", classmethod(lambda cls: None))
    with pytest.warns(UserWarning, match="backend runs on CPU"):
        preflight_backend("vggt", 0, None)
    with pytest.warns(UserWarning, match="--device cuda with --gpus-per-worker 0: Ray reserves no GPU") as caught:
        preflight_backend("vggt", 0, {"device": "cuda"})  # it does not run on CPU: only the reservation is missing
    assert not any("runs on CPU" in str(w.message) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        preflight_backend("vggt", 1, None)
        preflight_backend("vggt", 1, {"device": "cuda:0"})
        preflight_backend("vggt", 0, {"device": "cpu"})
        preflight_backend("depth", 0, None)


def test_model_actors_use_the_device_ray_assigns(tmp_path):
    """Without GPUs the actors' backend runs on CPU (Ray now leaves a zero-GPU worker the machine's GPUs, where
    the backend's default would pick cuda); with GPUs it takes Ray's (``cuda``); a device index no actor
    can see is refused."""
    from cameo_corr.cli.errors import UsageError
    from cameo_corr.job.config import JobConfig

    def spec(**kw):
        return JobConfig(dataset="synthetic", root="data", out=str(tmp_path / "c"), **kw).geometry_spec()["backend_options"]

    assert spec() == {"device": "cpu"}
    assert spec(backend_options={"frame": "first"}) == {"frame": "first", "device": "cpu"}
    assert spec(gpus_per_worker=1) == {}
    assert spec(gpus_per_worker=0.5, backend_options={"device": "cuda:0"}) == {"device": "cuda:0"}
    assert spec(backend_options={"device": "cuda:1"}) == {"device": "cuda:1"}  # no GPU from Ray: the user's choice (warned)
    assert spec(gpus_per_worker=2, backend_options={"device": "cuda:1"}) == {"device": "cuda:1"}
    for gpus, device in ((1, "cuda:1"), (0.5, "cuda:1"), (2, "cuda:2")):
        with pytest.raises(UsageError, match=rf"--device {device}: each model actor sees only the {max(1, int(gpus))} GPU\(s\) Ray"):
            spec(gpus_per_worker=gpus, backend_options={"device": device})


def test_gpus_the_ray_instance_lacks(ray_session, tmp_path, capsys):
    """Model actors asking for more GPUs than Ray has: refused on a local instance (nothing will add them),
    a note on a cluster (an autoscaler may); none asked, nothing said."""
    from cameo_corr.cli.errors import UsageError
    from cameo_corr.job.config import JobConfig
    from cameo_corr.job.driver import check_cluster

    gpus = ray.cluster_resources().get("GPU", 0)
    cfg = JobConfig(dataset="synthetic", root="data", out=str(tmp_path / "c"), workers=2, gpus_per_worker=gpus + 1)
    with pytest.raises(UsageError, match=rf"--workers 2 x --gpus-per-worker {gpus + 1:g} need {2 * (gpus + 1):g} GPU\(s\) and "
                                         rf"this machine's local Ray instance has {gpus:g}"):
        check_cluster(cfg, local=True)
    check_cluster(cfg, local=False)
    assert capsys.readouterr().err == (f"cameo-corr preprocess: note: --workers 2 x --gpus-per-worker {gpus + 1:g} need "
                                       f"{2 * (gpus + 1):g} GPU(s) and the Ray cluster has {gpus:g} now: the job waits until nodes "
                                       "with GPUs join\n")
    check_cluster(JobConfig(dataset="synthetic", root="data", out=str(tmp_path / "c"), workers=2), local=True)
    assert capsys.readouterr().err == ""


def test_a_node_is_reported_lost_once_and_only_on_rays_verdict():
    """The node watch notes a node when Ray's node table lists it dead, once; a node missing from one
    listing (a partial answer while the GCS handles another node's loss) is no loss."""
    def node(i: str, alive: bool) -> dict:
        return {"NodeID": i * 8, "Alive": alive, "NodeManagerAddress": f"10.0.0.{i}"}

    watched: dict[str, str] = {}
    assert newly_dead_nodes(watched, [node("1", True), node("2", True), node("3", True)]) == []
    assert newly_dead_nodes(watched, [node("1", True), node("2", True)]) == []  # 3 missing: not dead
    assert newly_dead_nodes(watched, [node("1", True), node("2", False), node("3", True)]) == [("2" * 8, "10.0.0.2")]
    assert newly_dead_nodes(watched, [node("1", True), node("2", False), node("3", True)]) == []  # once
    assert newly_dead_nodes(watched, [node("9", False), node("4", True)]) == []  # dead before it was seen alive
    assert newly_dead_nodes(watched, [node("4", False), node("3", False)]) == [("4" * 8, "10.0.0.4"), ("3" * 8, "10.0.0.3")]
    assert watched == {"1" * 8: "10.0.0.1"}


def test_depth_backend_on_a_dataset_without_depth_is_refused_up_front(shared_data, tmp_path, capsys):
    re10k = open_dataset("re10k", shared_data / "re10k_clips")
    assert not re10k.has_depth and open_dataset("7scenes", shared_data / "sevenscenes_stairs").has_depth
    with pytest.raises(SchemaError, match="field 'backend': the 'depth' backend needs depth, and dataset 're10k' has none"):
        preflight_backend("depth", 0, None, re10k)
    assert cli_main(["preprocess", "--dataset", "re10k", "--root", str(shared_data / "re10k_clips"), "--out",
                     str(tmp_path / "c"), "--backend", "depth", "--views", "4", "--no-progress"]) == 2
    assert "needs depth" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_runtime_env_ships_code_only():
    """The runtime env must work whether Ray lives in a venv or an image: no per-job pip/conda env."""
    import yaml

    env = yaml.safe_load((Path(__file__).resolve().parents[1] / "jobs" / "runtime_env.yaml").read_text())
    assert not {"pip", "conda", "uv"} & set(env) and ".git" in env["excludes"]


def test_jobs_entry_point_help():
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, str(root / "jobs" / "preprocess.py"), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "--gpus-per-worker" in res.stdout and "--fail-fast" in res.stdout


def test_several_grids_in_one_pass_equal_the_single_grid_run(clean, dataset, tmp_path):
    """--grid 8,4 through the job: the 8x8 arrays equal the single-grid run's (same frames, other ids)."""
    out = tmp_path / "multi"
    s = run_preprocess(dataset="synthetic", root=dataset, out=out, workers=1, **{**RUN, "extra_grids": (4,)})
    single, multi = CorrCache(clean[0]), CorrCache(out)
    assert s["windows_ok"] == clean[1]["windows_ok"] and multi.config.grids == ((8, 8), (4, 4))

    def by_frames(cache):
        return {(r["scene_id"], tuple(r["frame_ids"])): r for r in cache.manifest("ok").to_pylist()}

    a, b = by_frames(single), by_frames(multi)
    assert a.keys() == b.keys() and not {r["window_id"] for r in a.values()} & {r["window_id"] for r in b.values()}
    for k, row in a.items():
        want, got = single.window(row["window_id"]), multi.window(b[k]["window_id"])
        assert all(np.array_equal(want[n], got[n], equal_nan=True) for n in want), k
        assert (row["valid_frac"], row["mask_frac"]) == (b[k]["valid_frac"], b[k]["mask_frac"])
        assert multi.window(b[k]["window_id"], grid=4)["nn"].shape == (3, 3, 16)
    assert verify_cache(multi) == []
    with pytest.raises(CacheMismatchError, match="extra_grids"):
        run_preprocess(dataset="synthetic", root=dataset, out=out, workers=1, **RUN)


def test_deleted_shard_is_repaired(clean, dataset, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(clean[0], out)
    cache = CorrCache(out)
    shard = cache.row(cache.window_ids()[0])["shard"]
    (out / shard_dir(shard)).unlink()
    s = run_preprocess(dataset="synthetic", root=dataset, out=out, workers=1, **RUN)
    assert s["shards_repaired"] == 1 and s["windows_ok"] >= 1 and not s["shard_errors"]
    assert verify_cache(CorrCache(out)) == []
    assert_same_cache(clean[0], out)


def test_job_end_consolidates_and_repair_redoes_corrupt_shards(clean, dataset, tmp_path):
    from test_cache import _flip_chunk_byte

    out = tmp_path / "cache"
    shutil.copytree(clean[0], out)
    assert fragment_names(_loc(out)) == [] and (out / "manifest" / "consolidated.json").is_file()  # consolidated at job end
    shard, _ = CorrCache(out).locate(CorrCache(out).window_ids()[0])
    _flip_chunk_byte(out / shard_dir(shard), "points")
    assert any("corrupt data" in p for p in verify_cache(CorrCache(out), deep=True))
    s = run_preprocess(dataset="synthetic", root=dataset, out=out, workers=1, repair=True, **RUN)
    assert s["shards_corrupt"] == 1 and s["windows_ok"] >= 1 and not s["shard_errors"]
    assert verify_cache(CorrCache(out), deep=True) == [] and fragment_names(_loc(out)) == []
    assert_same_cache(clean[0], out)


def test_retry_failed_supersedes_the_failed_rows(clean, dataset, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(clean[0], out)
    s = run_preprocess(dataset="synthetic", root=dataset, out=out, workers=1, retry_failed=True, **RUN)
    assert s["failed_retried"] == 6 and s["windows_failed"] == 6 and s["windows_skipped"] == 4  # the data is still bad
    ids = CorrCache(out).manifest(None).column("window_id").to_pylist()
    assert len(ids) == len(set(ids)) == 10  # superseded, never duplicated
    assert_same_cache(clean[0], out)


def test_resume_from_a_moved_dataset_root(clean, dataset, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(dataset, moved)
    out = tmp_path / "cache"
    shutil.copytree(clean[0], out)
    cache = CorrCache(out)
    shard = cache.row(cache.window_ids()[-1])["shard"]
    drop_shards(_loc(out), [shard])  # some work left to do
    s = run_preprocess(dataset="synthetic", root=moved, out=out, workers=1, **RUN)
    assert s["windows_skipped"] < 10 and s["windows_ok"] >= 1 and not s["shard_errors"]
    assert_same_cache(clean[0], out)
    assert CorrCache(out).config.dataset["root"] == str(dataset)  # recorded once, not part of the identity
    gone = CorrCache(out)
    gone.config.dataset["root"] = str(tmp_path / "gone")  # as after moving the original root away
    with pytest.raises(DatasetError, match=r"gone \[dataset.root\]: .*data.dataset_root=<dir> to train"):
        gone.reader()


def test_a_plan_without_any_window_is_refused_before_ray(shared_data, tmp_path, capsys):
    """7-Scenes sample scenes have 3 frames: with the default 8 views no scene gives a window, which the
    planning check before Ray says in one line naming the scenes and the flag (exit 2, nothing written)."""
    started = ray.is_initialized()
    rc = cli_main(["preprocess", "--dataset", "7scenes", "--root", str(shared_data / "sevenscenes_stairs"), "--out",
                   str(tmp_path / "c"), "--grid", "8", "--crop-size", "64", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 2
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("cameo-corr preprocess: error: no window to compute: every one of the 2 planned")
    assert "scene has 3 frames, fewer than the 8 views of a window" in err[0] and "lower --views (now 8)" in err[0]
    assert "Traceback" not in captured.err and not (tmp_path / "c" / "cache.json").exists()
    assert ray.is_initialized() == started


def test_second_run_after_every_window_failed(ray_session, tmp_path, capsys):
    """Every image corrupt: the run exits 1 saying so. After the data is fixed, a re-run skips the failed
    windows, says how many there are and how to redo them, and exits 1 (the cache has no ok window);
    such a cache pins no config: a run with other --views replaces it and succeeds."""
    root = synthetic.generate_dataset(tmp_path / "synth", scenes=2, frames=5, image_size=32, seed=2)
    images = {p: p.read_bytes() for p in Path(root).rglob("images/*")}
    for path, data in images.items():
        path.write_bytes(data[:40])
    out = tmp_path / "cache"
    base = ["preprocess", "--dataset", "synthetic", "--root", str(root), "--out", str(out), "--grid", "4", "--crop-size", "32",
            "--windows-per-scene", "2", "--no-progress"]

    def error_line() -> str:
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cameo-corr preprocess: error:")]
        assert len(err) == 1, err
        return err[0]

    assert cli_main([*base, "--views", "3"]) == 1
    line = error_line()
    assert "no window succeeded: all 4 windows failed" in line and "--retry-failed" in line
    for path, data in images.items():  # the data is fixed
        path.write_bytes(data)
    assert cli_main([*base, "--views", "3"]) == 1
    printed = capsys.readouterr()
    assert "already done 4 (4 of them failed)" in printed.out and "re-run with --retry-failed to redo them" in printed.out
    line = [x for x in printed.err.splitlines() if x.startswith("cameo-corr preprocess: error:")]
    assert len(line) == 1 and "the cache has no ok window: 4 windows are recorded as failed (4 by an earlier run" in line[0]
    assert "--retry-failed" in line[0] and "DatasetError" in line[0]
    summary = tmp_path / "summary.json"
    assert cli_main([*base, "--views", "4", "--summary-json", str(summary)]) == 0
    s = json.loads(summary.read_text())
    assert s["config_replaced"] and s["failed_dropped"] == 4 and s["windows_ok"] == s["cache_windows_ok"] >= 2
    assert "its config and 4 failed rows were replaced" in capsys.readouterr().out
    cache = CorrCache(out)
    assert cache.config.views == 4 and cache.manifest("failed").num_rows == 0 and verify_cache(cache) == []
    with pytest.raises(CacheMismatchError, match="views: cache has 4, this run has 3"):  # ok windows pin the config
        run_preprocess(dataset="synthetic", root=root, out=out, workers=1, backend="depth", grid=4, views=3, crop_size=32,
                       progress=False)


INJECT_ENOSPC = '''
import errno
from cameo_corr.cache import writer as cache


def _full_disk(self, shard_id, outcomes):
    raise OSError(errno.ENOSPC, "No space left on device")


cache.CacheWriter.write_shard = _full_disk
'''


def local_env(*first_on_path: Path) -> dict[str, str]:
    """The environment of a command that starts its own local Ray instance (no ``RAY_ADDRESS``); the
    directories ``first_on_path``, then the repository, lead ``PYTHONPATH`` for the driver and its workers."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if first_on_path:
        env["PYTHONPATH"] = os.pathsep.join([*map(str, first_on_path), str(Path(__file__).resolve().parents[1]),
                                             os.environ.get("PYTHONPATH", "")])
    return env


def _cli(dataset: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cameo_corr.cli", "preprocess", "--dataset", "synthetic", "--root", str(dataset),
            "--out", str(out), "--grid", "8", "--views", "3", "--windows-per-scene", "2", "--crop-size", "48",
            "--num-cpus", "2", *extra]


def test_full_disk_is_one_line_and_exit_1(dataset, tmp_path):
    """ENOSPC injected into every process of the run (driver and local Ray workers import
    sitecustomize from PYTHONPATH); also: Ray's token-auth notice is not printed on a local start."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(INJECT_ENOSPC)
    env = local_env(hook)
    res = subprocess.run(_cli(dataset, tmp_path / "c", "--no-progress"), env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr[-3000:]
    err = [line for line in res.stderr.splitlines() if line.startswith("cameo-corr preprocess: error:")]
    assert len(err) == 1 and "No space left on device" in err[0] and "the disk is full" in err[0], res.stderr[-3000:]
    assert "Traceback (most recent call last)" not in res.stderr.split("cameo-corr preprocess: error:")[-1]
    assert "Token authentication is enabled" not in res.stderr


def test_healthy_run_prints_no_false_alarm_and_progress_per_window(dataset, tmp_path):
    """A healthy run from the command line: besides Ray's start-up line and its error-level line about the
    actors' constructor arguments (explained by our one-line note, printed once), stderr holds only the
    progress bar, which counts windows ok / failed as they finish and the windows committed."""
    import re

    from cameo_corr.job.driver import NOTE_PREFIX, RAY_ACTOR_ARGS_NOTE

    sids = open_dataset("synthetic", dataset).scene_ids()
    env = local_env()
    res = subprocess.run(_cli(dataset, tmp_path / "c", "--scene", sids[GOOD], "--scene", sids[CORRUPT]), env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line.strip() for line in re.split(r"[\r\n]+", res.stderr) if line.strip()]
    ray_lines = ("Started a local Ray instance", "has constructor arguments in the object store and max_restarts > 0")
    assert [line for line in lines if not line.startswith(("preprocess:", NOTE_PREFIX)) and not any(r in line for r in ray_lines)] == []
    assert lines.count(NOTE_PREFIX + RAY_ACTOR_ARGS_NOTE) == 1 and "will hang" not in res.stderr
    assert "ok=2, failed=2, committed=4" in lines[-1] and "4/4" in lines[-1]


def test_a_backend_that_cannot_be_built_where_the_actors_run_is_one_line_and_exit_1(dataset, tmp_path):
    """A backend whose constructor raises in the describe actor (e.g. out of GPU memory loading the model):
    one line naming the error behind Ray's wrappers, exit 1, no traceback."""
    mod = tmp_path / "mod"
    mod.mkdir()
    (mod / "crashbk.py").write_text(
        "from cameo_corr.pipeline.backends.depth import DepthBackend\n"
        "class Crash(DepthBackend):\n"
        "    def __init__(self, **kw):\n"
        "        raise RuntimeError('CUDA out of memory while loading the model')\n")
    env = local_env(mod)
    res = subprocess.run(_cli(dataset, tmp_path / "c", "--backend", "crashbk:Crash", "--no-progress"), env=env,
                         capture_output=True, text=True, timeout=300)
    ours = [line for line in res.stderr.splitlines() if line.startswith("cameo-corr preprocess: error:")]
    assert res.returncode == 1 and len(ours) == 1, res.stderr[-3000:]
    assert ("the 'crashbk:Crash' backend could not be built where the model actors run: RuntimeError: CUDA out of memory "
            "while loading the model") in ours[0]
    assert "Traceback" not in res.stderr and "RayTaskError" not in res.stderr, res.stderr[-3000:]


def test_fail_fast_from_the_command_line_is_one_line(dataset, tmp_path):
    """--fail-fast's deliberate stop: one error line, without Ray Data's ~160 lines of tracebacks and its
    advice to report a Ray bug (it takes any Datasink error for one)."""
    sids = open_dataset("synthetic", dataset).scene_ids()
    env = local_env()
    res = subprocess.run(_cli(dataset, tmp_path / "c", "--scene", sids[CORRUPT], "--fail-fast", "--no-progress"), env=env,
                         capture_output=True, text=True, timeout=300)
    ours = [line for line in res.stderr.splitlines() if line.startswith("cameo-corr preprocess: error:")]
    assert res.returncode == 1 and len(ours) == 1 and "--fail-fast: stopped at the first failed window" in ours[0], res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "open an issue" not in res.stderr, res.stderr[-3000:]


def test_ctrl_c_is_one_line(dataset, tmp_path, default_sigint):
    out = tmp_path / "c"
    env = local_env()
    proc = subprocess.Popen(_cli(dataset, out, "--shard-size", "1"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=default_sigint)  # SIGINT not inherited ignored
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None and not fragment_names(_loc(out)):
            time.sleep(0.05)
        assert proc.poll() is None, "the job ended before Ctrl-C"
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends: the whole foreground group
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode in (130, 1), err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("cameo-corr preprocess: interrupted")]
    assert len(lines) == 1 and "re-run the same command to resume" in lines[0], err[-3000:]
    assert "KeyboardInterrupt" not in err and "will be retried" not in err, err[-3000:]
    assert "SIGTERM handler is not set" not in err and err.count("Started a local Ray instance") == 1, err[-3000:]
    assert not (out / "lease.json").exists()
