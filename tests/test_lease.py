"""The cache's lease on every kind of store (local, a real S3 endpoint, an fsspec store without conditional
writes): one holder, races between jobs starting together, renewal, loss, stale and crashed holders."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time

import pytest

from cameo_corr.cache import lease_store
from cameo_corr.cache.lease import LEASE_FILE, CacheLease, LeaseHeldError
from cameo_corr.cache.lease_holder import holder_gone, process_start, this_holder
from cameo_corr.cache.lease_store import LeaseStore, LocalLeaseStore, S3LeaseStore
from cameo_corr.cache.location import CacheLocation


@pytest.fixture(params=["local", "s3", "memory"])
def location(request, tmp_path, monkeypatch):
    """A cache location on each store; the settle store waits 0.2 s (enough within one process)."""
    monkeypatch.setattr(lease_store, "SETTLE_SECONDS", 0.2)
    if request.param == "local":
        yield CacheLocation(tmp_path / "cache")
    elif request.param == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        yield CacheLocation(f"{endpoint.new_bucket()}/cache", endpoint.storage_options)
    else:
        import fsspec

        url = f"memory://lease-{tmp_path.name}/cache"
        yield CacheLocation(url)
        memory = fsspec.filesystem("memory")
        if memory.exists(url.removeprefix("memory://")):
            memory.rm(url.removeprefix("memory://"), recursive=True)


def test_each_store_gets_its_swap(location):
    store = CacheLease(location).store
    expected = {"local": LocalLeaseStore, "s3": S3LeaseStore, "memory": LeaseStore}
    kind = "local" if location.local else location.fs.protocol if isinstance(location.fs.protocol, str) else location.fs.protocol[0]
    assert type(store) is expected[kind]


def test_lease_one_holder_stale_takeover_force_and_release(location):
    first = CacheLease(location).acquire()
    held = json.loads(location.read_bytes(LEASE_FILE))
    assert held["token"] == first.token and f"pid {os.getpid()}" in held["holder"]
    assert held["pid"] == os.getpid() and held["host"] and held["process_start"] == process_start(os.getpid())
    with pytest.raises(LeaseHeldError, match=r"another job \(.*pid \d+.*renewed \d+ s ago.*--force"):
        CacheLease(location).acquire()
    forced = CacheLease(location, force=True).acquire()
    assert forced.taken_over["token"] == first.token and forced.taken_over["reason"] == "--force"
    first.release()  # no longer ours: left alone
    assert json.loads(location.read_bytes(LEASE_FILE))["token"] == forced.token
    forced.release()
    assert not location.exists(LEASE_FILE)
    # a crashed job's lease: renewed long ago, taken over without --force
    stale = {"holder": "someone@elsewhere pid 1", "token": "dead", "renewed": time.time() - 1000, "timeout": 60}
    location.write_bytes_atomic(LEASE_FILE, json.dumps(stale).encode())
    taker = CacheLease(location).acquire()
    assert taker.taken_over["holder"] == "someone@elsewhere pid 1" and "not renewed for" in taker.taken_over["reason"]
    taker.release()


def race(leases: list[CacheLease]) -> tuple[list[CacheLease], list[str]]:
    """Acquire every lease at the same instant (one thread each): the winners and the refusals."""
    start, won, refused = threading.Barrier(len(leases)), [], []

    def take(lease: CacheLease) -> None:
        start.wait()
        try:
            won.append(lease.acquire())
        except LeaseHeldError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return won, refused


def test_two_jobs_starting_together_exactly_one_wins(location):
    """Jobs racing for a new cache, then for a stale lease: one wins each round, the others refuse."""
    for stale in (False, True):
        if stale:
            old = {"holder": "crashed@elsewhere pid 7", "token": "dead", "renewed": time.time() - 1000, "timeout": 60}
            location.write_bytes_atomic(LEASE_FILE, json.dumps(old).encode())
        leases = [CacheLease(location) for _ in range(4)]
        won, refused = race(leases)
        assert len(won) == 1 and len(refused) == len(leases) - 1, (won, refused)
        assert json.loads(location.read_bytes(LEASE_FILE))["token"] == won[0].token
        assert all(won[0].holder in e for e in refused), refused
        won[0].release()
        assert not location.exists(LEASE_FILE)


def test_lease_is_renewed_and_loss_is_noticed(location):
    lease = CacheLease(location, timeout=0.8).acquire()
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
        assert json.loads(location.read_bytes(LEASE_FILE))["token"] == other.token  # the loser never wrote again
        other.release()
    finally:
        lease.release()


HOLD_AND_DIE = """
import os, sys
from cameo_corr.cache.lease import CacheLease
from cameo_corr.cache.location import CacheLocation
CacheLease(CacheLocation(sys.argv[1]), timeout=3600).acquire()
os._exit(9)  # crashed: no release, no cleanup
"""


def test_crashed_holder_on_this_machine_is_taken_over_at_once(tmp_path, caplog):
    """Issue 21: a lease whose process has exited is taken over at once, naming the previous holder."""
    out = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", HOLD_AND_DIE, str(out)], env=env, timeout=60, check=False)
    assert proc.returncode == 9
    dead = json.loads((out / LEASE_FILE).read_text())
    assert time.time() - dead["renewed"] < 60 and dead["timeout"] == 3600  # live by its timeout
    with caplog.at_level(logging.WARNING, logger="cameo_corr.cache.lease"):
        taker = CacheLease(CacheLocation(out)).acquire()
    try:
        assert taker.taken_over["token"] == dead["token"]
        assert taker.taken_over["reason"] == f"its process {dead['pid']} on {dead['host']} has exited"
        assert f"taking over the cache lease of {dead['holder']}" in caplog.text and "has exited" in caplog.text
    finally:
        taker.release()


def test_holder_gone_proves_or_abstains():
    me = {**this_holder(), "renewed": time.time(), "timeout": 60}
    if me["machine"] is None:
        pytest.skip("process identity needs /proc (Linux)")
    assert holder_gone(me) is None  # this very process: alive
    reused = {**me, "process_start": me["process_start"] - 1}
    assert "the pid now belongs to another process" in holder_gone(reused)
    assert holder_gone({**me, "machine": "another-boot/pid:[1]"}) is None  # another machine: not provable here
    assert holder_gone({**me, "host": "elsewhere"}) is None
    # a Ray job of a cluster this process is not part of proves nothing (and asks no one)
    assert holder_gone({**me, "machine": None, "ray_job": "raysubmit_x", "ray_address": "10.0.0.1:6379"}) is None


def test_live_lease_of_this_very_process_is_refused(tmp_path):
    """A second lease in one live process (another thread's job) is a live holder, not a crashed one."""
    location = CacheLocation(tmp_path / "cache")
    with CacheLease(location).acquire(), pytest.raises(LeaseHeldError, match="being written by another job"):
        CacheLease(location).acquire()


def test_an_s3_store_that_ignores_conditional_writes_gets_the_settle_lease_and_a_warning(s3_endpoint, monkeypatch, caplog):
    location = CacheLocation(f"{s3_endpoint.new_bucket()}/cache", s3_endpoint.storage_options)
    assert S3LeaseStore(location, LEASE_FILE).honours_conditional_create()  # moto's server does, as AWS S3 does
    assert location.listdir() == []  # the probe object is gone
    monkeypatch.setattr(S3LeaseStore, "honours_conditional_create", lambda self: False)
    with caplog.at_level(logging.WARNING, logger="cameo_corr.cache.lease_store"):
        store = CacheLease(location).store
    assert type(store) is LeaseStore and "ignores If-None-Match" in caplog.text


def test_renewal_survives_a_store_that_does_not_answer(tmp_path, monkeypatch):
    """botocore's connection errors (s3fs passes them through, they are not OSError) are transient for
    the renewal thread as OSError is: it keeps renewing instead of dying with the lease never lost."""
    from botocore.exceptions import EndpointConnectionError

    location = CacheLocation(str(tmp_path / "cache"))
    lease = CacheLease(location, timeout=0.8).acquire()
    try:
        real, failures = lease.store.replace, [2]

        def unreachable_twice(record, version):
            if failures[0]:
                failures[0] -= 1
                raise EndpointConnectionError(endpoint_url="http://store/cache/lease.json")
            return real(record, version)

        monkeypatch.setattr(lease.store, "replace", unreachable_twice)
        first = json.loads(location.read_bytes(LEASE_FILE))["renewed"]
        deadline = time.monotonic() + 10
        while (failures[0] or json.loads(location.read_bytes(LEASE_FILE))["renewed"] == first) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert failures[0] == 0 and json.loads(location.read_bytes(LEASE_FILE))["renewed"] > first
        assert lease.lost is None and lease._thread is not None and lease._thread.is_alive()
    finally:
        lease.release()
