"""``cameo-corr preprocess`` input errors (one line, exit 2, before Ray starts) and the cache lease."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from cameo_corr.cache.lease import LEASE_FILE, CacheLease
from cameo_corr.cache.layout import shard_dir
from cameo_corr.cache.location import CacheLocation
from cameo_corr.cache.reader import CorrCache
from cameo_corr.cli import main as cli_main

synthetic = pytest.importorskip("cameo_corr.datasets.synthetic")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return Path(synthetic.generate_dataset(tmp_path_factory.mktemp("d") / "synth", scenes=1, frames=4, image_size=32, seed=0))


def preprocess(root: Path, out: Path | str, *extra: str) -> int:
    return cli_main(["preprocess", "--dataset", "synthetic", "--root", str(root), "--out", str(out), "--grid", "8",
                     "--views", "3", "--crop-size", "32", "--no-progress", *extra])


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cameo-corr preprocess: error: "), err
    assert "Traceback" not in err and all(n in lines[0] for n in needles), err
    return lines[0]


def assert_ray_not_started() -> None:
    import ray

    assert not ray.is_initialized()


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--workers", "0"], ["--workers must be >= 1", "got 0"]),
        (["--backend", "nosuch"], ["--backend nosuch", "unknown geometry backend", "depth"]),
        (["--dataset-option", "foo=1"], ["[foo]: unknown option 'foo' of reader 'synthetic'; it takes"]),
        (["--shard-size", "0"], ["--shard-size must be >= 1"]),
        (["--crop-size", "7"], ["--crop-size must be an integer >= the token grid side (8 for --grid 8", "got 7"]),
        (["--batch-size", "0"], ["--batch-size must be >= 1"]),
        (["--tau", "-1"], ["--tau must be a finite number >= 0", "got -1.0"]),
        (["--views", "1"], ["--views: a window needs at least 2 views, got 1"]),
        (["--span-per-view", "3", "1"], ["--span-per-view: expected finite 0 <= lo <= hi"]),
        (["--fps", "0"], ["--fps: must be positive"]),
        (["--max-windows", "0"], ["--max-windows must be >= 1, got 0"]),
        (["--views", "9"], ["no window to compute: every one of the 1 planned scene(s) fails planning",
                            "scene has 4 frames, fewer than the 9 views of a window", "lower --views (now 9)"]),
        (["--scene", "nosuch"], ["--scene nosuch: no such scene in dataset 'synthetic'", "synthetic/scene_0000"]),
        (["--dataset-option", "subset=3"], ["[subset]: expected a string or null, got 3"]),
        (["--dry-run", "--views", "9"], ["no window to compute"]),
        (["--gpus-per-worker", "1", "--device", "cuda:1"], ["--device cuda:1: each model actor sees only the 1 GPU(s) Ray "
                                                             "assigns it (--gpus-per-worker 1), numbered from cuda:0"]),
    ],
)
def test_bad_values_exit_2_with_one_line_before_ray(root, tmp_path, capsys, extra, needles):
    out = tmp_path / "cache"
    assert preprocess(root, out, *extra) == 2
    one_line_error(capsys, *needles)
    assert not (out / "cache.json").exists()
    assert_ray_not_started()


def test_gpus_this_machine_lacks_exit_2_with_one_line(root, tmp_path):
    """GPU actors on a local Ray instance without those GPUs: exit 2 with one error line after Ray's start-up
    line (their tasks would wait forever), nothing written."""
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-m", "cameo_corr.cli", "preprocess", "--dataset", "synthetic", "--root", str(root),
                           "--out", str(out), "--grid", "8", "--views", "3", "--crop-size", "32", "--no-progress",
                           "--gpus-per-worker", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1] == (
        "cameo-corr preprocess: error: --workers 1 x --gpus-per-worker 1 need 1 GPU(s) and this machine's local Ray "
        "instance has 0; lower them (--gpus-per-worker 0 runs the backend on CPU)"), proc.stderr
    assert not (out / "cache.json").exists()


def test_dry_run_prints_the_plan_without_ray_or_writing(root, tmp_path, capsys):
    out = tmp_path / "cache"
    assert preprocess(root, out, "--dry-run", "--windows-per-scene", "3", "--max-windows", "2") == 0
    printed = capsys.readouterr().out
    assert "dry run: nothing computed or written" in printed and "1 scenes, 1 of them give windows (S=3, K=3" in printed
    assert "windows: planned 3, computable 3, failed at planning 0" in printed and "cache: new" in printed
    assert "this run: 2 of 3 windows to do (--max-windows), 2 to compute" in printed
    from cameo_corr.schemas import CACHE_ARRAYS

    per_window = sum(int(np.prod(spec.shape(1, 3, (8, 8)))) * spec.dtype.itemsize for spec in CACHE_ARRAYS.values())
    assert f"bytes: about {2 * per_window:,} for this run ({per_window:,} per window of uncompressed arrays)" in printed
    assert not out.exists()
    assert_ray_not_started()


def test_dry_run_of_existing_caches(tmp_path, capsys):
    """A cache with ok windows: the plan's ids are the cache's, measured bytes per window; a cache
    without an ok window and another config: it says the config would be replaced."""
    from test_cli import _write_cache

    ok = _write_cache(tmp_path / "ok", 3, ok=True)
    failed = _write_cache(tmp_path / "failed", 3, ok=False)
    common = ["preprocess", "--dataset", "synthetic", "--grid", "8", "--crop-size", "64", "--sampling", "random", "--no-progress",
              "--dry-run"]
    summary = tmp_path / "plan.json"
    assert cli_main([*common, "--root", str(tmp_path / "ok" / "data"), "--out", str(ok), "--views", "3",
                     "--summary-json", str(summary)]) == 0
    printed = capsys.readouterr().out
    plan = json.loads(summary.read_text())
    assert "cache: 2 of the planned windows ok, 0 failed" in printed and "this run: 0 of 0 windows to do" in printed
    shard_bytes = sum(f.stat().st_size for f in (ok / "shards").iterdir())
    assert plan["bytes_per_window_measured"] == shard_bytes / 2
    assert plan["cache"] == {"ok": 2, "failed": 0, "config_replaced": False, "orphans": 0, "shards_missing": 0, "windows_missing": 0}
    # a damaged cache: the dry run shows what the run's start-up repairs, and what it then computes
    damaged = tmp_path / "damaged"
    shutil.copytree(ok, damaged)
    shard = CorrCache(damaged).row(CorrCache(damaged).window_ids()[0])["shard"]
    (damaged / shard_dir(shard)).unlink()
    (damaged / "shards" / ".tmp-0123456789abcdef-deadbeef.zarr.zip").write_bytes(b"partial")
    argv = [*common, "--root", str(tmp_path / "ok" / "data"), "--out", str(damaged), "--views", "3", "--summary-json", str(summary)]
    assert cli_main([*argv, "--repair"]) == 0
    printed, plan = capsys.readouterr().out, json.loads(summary.read_text())
    lost = plan["cache"]["windows_missing"]
    assert plan["cache"]["shards_missing"] == 1 and lost >= 1 and plan["cache"]["orphans"] == 1
    assert plan["bytes_per_window_measured"] == shard_bytes / 2  # measured also from the shard whose file went missing
    assert f"1 shard file(s) missing: their {lost} ok window(s) are redone" in printed and "1 orphan(s)" in printed
    assert f"this run: {lost} of {lost} windows to do" in printed and "--repair: every chunk is decoded" in printed
    assert (damaged / "shards" / ".tmp-0123456789abcdef-deadbeef.zarr.zip").exists()  # a dry run deletes nothing
    assert cli_main([*common, "--root", str(tmp_path / "failed" / "data"), "--out", str(failed), "--views", "4"]) == 0
    assert "cache: has no ok window and another config: its failed rows and cache.json would be replaced" in capsys.readouterr().out
    assert cli_main([*common, "--root", str(tmp_path / "ok" / "data"), "--out", str(ok), "--views", "4"]) == 2
    one_line_error(capsys, "refusing to mix configs", "views: cache has 3, this run has 4")
    assert (failed / "cache.json").exists() and len(CorrCache(failed).manifest("failed")) == 2  # a dry run changes nothing
    assert_ray_not_started()


def test_out_is_a_file(root, tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert preprocess(root, f) == 2
    one_line_error(capsys, f"--out {f}: is a file")
    assert preprocess(root, f / "sub") == 2
    one_line_error(capsys, f"--out {f / 'sub'}: cannot write the cache there")
    assert_ray_not_started()


def test_read_only_out(root, tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: the kernel's answer to anyone else, injected
        real_open = os.open

        def refusing_open(path, *args, **kwargs):
            if str(path).startswith(str(ro)):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", refusing_open)
    try:
        assert preprocess(root, ro) == 2
        one_line_error(capsys, f"--out {ro}: cannot write the cache there (Permission denied)")
    finally:
        ro.chmod(0o755)
    assert_ray_not_started()


def test_second_job_on_a_cache_is_refused_naming_the_holder(root, tmp_path, capsys):
    out = tmp_path / "cache"
    lease = CacheLease(CacheLocation(out)).acquire()  # a live job holding the cache
    try:
        assert preprocess(root, out) == 2
        one_line_error(capsys, "being written by another job", f"pid {os.getpid()}", "--force")
    finally:
        lease.release()
    assert not (out / LEASE_FILE).exists()
    assert_ray_not_started()


