"""``cameo-corr preprocess`` input errors (one line, exit 2, before Ray starts) and the cache lease."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest

from cameo_corr.cli import main as cli_main
from cameo_corr.cache.location import CacheLocation
from cameo_corr.cache.lease import LEASE_FILE, CacheLease, LeaseHeldError

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
    ],
)
def test_bad_values_exit_2_with_one_line_before_ray(root, tmp_path, capsys, extra, needles):
    out = tmp_path / "cache"
    assert preprocess(root, out, *extra) == 2
    one_line_error(capsys, *needles)
    assert not (out / "cache.json").exists()
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


@pytest.fixture(params=["local", "memory"])
def location(request, tmp_path, monkeypatch):
    import cameo_corr.cache.lease as lease_mod

    monkeypatch.setattr(lease_mod, "SETTLE_SECONDS", 0.0)
    if request.param == "local":
        yield CacheLocation(tmp_path / "cache")
        return
    import fsspec

    url = f"memory://lease-{tmp_path.name}/cache"
    yield CacheLocation(url)
    fsspec.filesystem("memory").rm(url.removeprefix("memory://"), recursive=True)


def test_lease_one_holder_stale_takeover_force_and_release(location):
    first = CacheLease(location).acquire()
    held = json.loads(location.read_bytes(LEASE_FILE))
    assert held["token"] == first.token and f"pid {os.getpid()}" in held["holder"]
    with pytest.raises(LeaseHeldError, match=r"another job \(.*pid \d+.*renewed \d+ s ago.*--force"):
        CacheLease(location).acquire()
    forced = CacheLease(location, force=True).acquire()
    assert forced.taken_over["token"] == first.token
    first.release()  # no longer ours: left alone
    assert json.loads(location.read_bytes(LEASE_FILE))["token"] == forced.token
    forced.release()
    assert not location.exists(LEASE_FILE)
    # a crashed job's lease: renewed long ago, taken over without --force
    stale = {"holder": "someone@elsewhere pid 1", "token": "dead", "renewed": time.time() - 1000, "timeout": 60}
    location.write_bytes_atomic(LEASE_FILE, json.dumps(stale).encode())
    taker = CacheLease(location).acquire()
    assert taker.taken_over["holder"] == "someone@elsewhere pid 1"
    taker.release()


def test_lease_is_renewed_and_loss_is_noticed(location):
    lease = CacheLease(location, timeout=0.4).acquire()
    try:
        first = json.loads(location.read_bytes(LEASE_FILE))["renewed"]
        deadline = time.monotonic() + 10
        while json.loads(location.read_bytes(LEASE_FILE))["renewed"] == first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert json.loads(location.read_bytes(LEASE_FILE))["renewed"] > first
        other = CacheLease(location, force=True).acquire()
        deadline = time.monotonic() + 10
        while lease.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lease.lost is not None and f"pid {os.getpid()}" in lease.lost
        other.release()
    finally:
        lease.release()
