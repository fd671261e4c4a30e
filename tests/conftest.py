"""Shared fixtures: the real sample data beside the project (``../shared/data``)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

# CI runs the property tests on fixed examples (reproducible, no example database); locally they explore.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# The files that take most of the suite's time (each minutes, in this order, in a serial run): a parallel
# run starts them first, so that no worker is left with one of them when the others are done.
SLOWEST_FILES = ("test_ray_job", "test_ray_cluster", "test_train_loop", "test_demo", "test_s3_cache", "test_cli",
                 "test_store_images", "test_local_cache", "test_selfcheck", "test_loss", "test_official_bf16", "test_masks")


# Tests that start several Ray instances or nodes at once: beside another worker's Ray start-ups, a
# raylet did not register with its GCS within Ray's fixed 30 s on 2 cores. A parallel run runs them alone.
RUN_ALONE = ("test_ray_cluster.py::", "test_s3_cache.py::test_two_jobs_on_one_bucket_one_refused_cache_equals_reference")


@contextlib.contextmanager
def machine_hold(lock_dir: Path, alone: bool) -> Iterator[None]:
    """Hold this machine shared (a test beside the other workers' tests) or exclusive (a test that runs
    alone) through a ``flock`` in ``lock_dir``. An exclusive taker queues at a turnstile first and keeps
    it while it waits, so that the shared takers of the other workers' next tests cannot starve it."""
    with open(lock_dir / "turnstile.lock", "a") as turnstile, open(lock_dir / "machine.lock", "a") as machine:
        fcntl.flock(turnstile, fcntl.LOCK_EX)  # behind an exclusive taker that waits
        if alone:
            fcntl.flock(machine, fcntl.LOCK_EX)
        fcntl.flock(turnstile, fcntl.LOCK_UN)
        if not alone:
            fcntl.flock(machine, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(machine, fcntl.LOCK_UN)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> object:
    """In a parallel run, every test (its setup, call and teardown, module fixtures included) holds the
    machine shared and a test of :data:`RUN_ALONE` holds it exclusive (the run's directory holds the lock)."""
    basetemp = item.config.option.basetemp
    if not (hasattr(item.config, "workerinput") and basetemp):
        return (yield)
    alone = f"{item.path.name}::{item.name}".startswith(RUN_ALONE)
    with machine_hold(Path(basetemp).parent, alone):
        return (yield)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Parallel runs (pytest-xdist, ``--dist loadgroup``): a test file is one group, run whole by one
    worker, so that its module fixtures (a Ray instance, a cache built by the real job) are set up once;
    a test's own ``xdist_group`` mark overrides its file's. In the workers, the files of
    :data:`SLOWEST_FILES` come first (the scheduler hands out the groups in collection order)."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))
    if hasattr(config, "workerinput"):
        rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
        items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: the others keep their order


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the real sample clips; tests using it skip with a reason when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample data not found at {SHARED_DATA} (expected ../shared/data beside the project)")
    return SHARED_DATA


def pipeline_reference(dataset_root: Path, config, views: int, windows_per_scene: int) -> dict:
    """Every planned window's cache arrays computed by calling the pipeline functions directly (no
    Ray): planner -> load_window -> depth backend -> check_pointmaps -> correspond -> window_arrays;
    ``None`` for a window whose computation fails. The reference of the Ray job's output."""
    from cameo_corr.cache.shard import window_arrays
    from cameo_corr.datasets.base import open_dataset
    from cameo_corr.datasets.canonical import CanonicalView, load_window
    from cameo_corr.datasets.planner import default_plan_config, plan_windows
    from cameo_corr.job.stages import DATA_ERRORS, check_pointmaps
    from cameo_corr.pipeline.backends import make_backend
    from cameo_corr.pipeline.match import correspond

    reader = open_dataset("synthetic", dataset_root)
    backend = make_backend("depth", device="cpu")
    plan = default_plan_config("synthetic", views=views, windows_per_scene=windows_per_scene)
    out: dict = {}
    for w in plan_windows(reader, plan, config.fingerprint()):
        out[w.record.window_id] = None
        if w.error is not None:
            continue
        try:
            result = backend(load_window(reader, w.record, CanonicalView.from_dict(config.crop), with_depth=True))
            if check_pointmaps(result, w.record) is None:
                out[w.record.window_id] = window_arrays(correspond(result, grid=tuple(config.grid), tau=config.tau), result)
        except DATA_ERRORS:
            pass
    return out


def assert_cache_equals_reference(cache_path, reference: dict) -> None:
    """The cache has one manifest row per planned window and the reference's arrays for the ok ones."""
    import numpy as np

    from cameo_corr.cache.reader import CorrCache

    cache = CorrCache(cache_path)
    ids = cache.manifest(None).column("window_id").to_pylist()
    assert sorted(ids) == sorted(reference), "manifest rows differ from the planned windows (missing or duplicated)"
    assert sorted(cache.window_ids()) == sorted(k for k, v in reference.items() if v is not None)
    for wid in cache.window_ids():
        got = cache.window(wid)
        assert set(got) == set(reference[wid])
        for name, value in reference[wid].items():
            assert got[name].dtype == value.dtype and np.array_equal(got[name], value, equal_nan=True), (wid, name)


@pytest.fixture(scope="session")
def tiny_train_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real cache (synthetic scenes through the real preprocessing job, ~1 min to build), shared
    read-only by the training-data, training-loop and cache-sharing tests: copy it before changing it.
    In a parallel run the first worker that needs it builds it in the run's temporary directory, under a
    file lock, and the others use that one."""
    from filelock import FileLock
    from test_train_data import build_tiny_cache

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return build_tiny_cache(tmp_path_factory.mktemp("tiny_train_cache"))[1]
    run_dir = tmp_path_factory.getbasetemp().parent  # the workers' temporary directories are under it
    built = run_dir / "tiny_train_cache.path"
    with FileLock(run_dir / "tiny_train_cache.lock"):
        if not built.is_file():
            base = run_dir / "tiny_train_cache"
            shutil.rmtree(base, ignore_errors=True)  # what a worker that failed to build it left
            base.mkdir()
            built.write_text(str(build_tiny_cache(base)[1]))
        return Path(built.read_text())


@pytest.fixture(scope="session")
def reference_of():
    """``reference_of(root, config, views, windows_per_scene)``: :func:`pipeline_reference`."""
    return pipeline_reference


@pytest.fixture(scope="session")
def assert_equals_reference():
    """:func:`assert_cache_equals_reference` for test modules."""
    return assert_cache_equals_reference


@pytest.fixture
def fresh_accelerate_state():
    """accelerate's process-wide state reset before and after the test, so that a Trainer may choose its
    own ``train.mixed_precision`` (accelerate refuses to change it within a process otherwise)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint (moto's server) for the whole session; see ``tests/s3_endpoint.py``."""
    pytest.importorskip("s3fs", reason="s3fs is needed for s3:// caches (pip install -e '.[cluster]')")
    from s3_endpoint import start_endpoint

    endpoint = start_endpoint()
    try:
        yield endpoint
    finally:
        endpoint.server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A fresh, empty bucket on :func:`s3_endpoint`, as ``s3://<name>``."""
    return s3_endpoint.new_bucket()


def _sigint_as_in_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def default_sigint():
    """A ``preexec_fn`` giving the child SIGINT as a terminal's foreground command has it: a suite started
    in the background by a non-interactive shell inherits SIGINT ignored, and so would a command whose
    Ctrl-C handling a test checks."""
    return _sigint_as_in_a_terminal
