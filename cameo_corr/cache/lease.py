"""One writer per cache: a lease file in the cache, renewed by the job that holds it.

``<cache>/lease.json`` holds ``{"holder", "token", "acquired", "renewed", "timeout"}`` plus who the
holder is for machines (host, pid, process start, machine id, Ray job and cluster address:
:mod:`cameo_corr.cache.lease_holder`): ``holder`` names the job for people (``user@host pid N``, plus
the Ray job id under ``ray job submit``), ``token`` is a random id that tells this job's lease from any
other, ``renewed`` a UTC UNIX time the holder rewrites every ``timeout / 4`` seconds from a background
thread, ``timeout`` the seconds after which an unrenewed lease counts as *stale* (its job crashed or
lost its node without releasing it).

Acquiring (:meth:`CacheLease.acquire`):

* no lease file: create ours, only if there still is none;
* a live lease (``now - renewed < timeout``) whose holder is not provably gone: refuse with
  :class:`LeaseHeldError` naming the holder and how long ago it renewed (the CLI turns it into exit
  code 2), unless ``force``;
* a stale lease, a holder that is provably gone (its process exited on this machine, or Ray reports its
  job ended: :func:`~cameo_corr.cache.lease_holder.holder_gone`), or ``force``: take it over, logged
  with the previous holder and why; the replacement only succeeds if the file is still the one read.

Creating and replacing are compare-and-swaps of the store (:mod:`cameo_corr.cache.lease_store`): a
local file lock and ``O_EXCL`` on local paths, S3's conditional writes (``If-None-Match: *`` to create,
``If-Match: <ETag>`` to replace) on ``s3://``, so of two jobs starting together exactly one wins and the
other refuses like any later job; other fsspec stores write, wait :data:`SETTLE_SECONDS` and read back,
which is not strictly atomic. Renewal is a swap too: a job whose lease was taken over (``--force`` by
someone else) stops renewing and :attr:`CacheLease.lost` tells the driver, which fails the run. Times
are compared with the local clock; keep the nodes' clocks in sync (NTP) or use a timeout well above
their skew. The lease is released (deleted, if still ours) when the job ends, also on errors and Ctrl-C.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from cameo_corr.cache.lease_holder import describe_holder, holder_gone, this_holder
from cameo_corr.cache.lease_store import SETTLE_SECONDS, LeaseStore, lease_store_for
from cameo_corr.cache.location import store_errors
from cameo_corr.schemas import CameoCorrError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from cameo_corr.cache.location import CacheLocation

logger = logging.getLogger(__name__)

LEASE_FILE = "lease.json"
DEFAULT_LEASE_TIMEOUT = 180.0
"""Seconds without renewal after which a lease is stale and another job may take it over."""
ACQUIRE_ATTEMPTS = 3
"""Looks at the lease file before giving up when it keeps changing under us (other jobs starting)."""
UNREADABLE = {"holder": "unknown (unreadable lease)", "renewed": 0.0}


class LeaseHeldError(CameoCorrError):
    """Another live job holds the cache's lease."""


class CacheLease:
    """The lease of one job on one cache; use as ``with CacheLease(loc).acquire(): ...``."""

    def __init__(self, location: CacheLocation, *, timeout: float = DEFAULT_LEASE_TIMEOUT, force: bool = False) -> None:
        if not timeout > 0:
            raise ValueError(f"lease timeout must be positive, got {timeout}")
        self.location = location
        self.timeout = float(timeout)
        self.force = force
        self.token = uuid.uuid4().hex
        self.who = this_holder()
        self.holder = str(self.who["holder"])
        self.acquired = 0.0
        self.taken_over: dict[str, Any] | None = None
        self.lost: str | None = None
        self._store: LeaseStore | None = None
        self._version: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def store(self) -> LeaseStore:
        """The compare-and-swap store of this cache (chosen on first use: it may probe an S3 store)."""
        if self._store is None:
            self._store = lease_store_for(self.location, LEASE_FILE)
        return self._store

    def _record(self) -> bytes:
        record = {**self.who, "token": self.token, "acquired": self.acquired, "renewed": time.time(), "timeout": self.timeout}
        return json.dumps(record).encode()

    @staticmethod
    def _parse(data: bytes | None) -> dict[str, Any] | None:
        if data is None:
            return None
        try:
            parsed = json.loads(data.decode())
        except ValueError:
            return dict(UNREADABLE)
        return parsed if isinstance(parsed, dict) else dict(UNREADABLE)

    def read(self) -> dict[str, Any] | None:
        """The current lease file (``None`` when there is none; an unreadable file counts as stale)."""
        return self._parse(self.store.read()[0])

    # --------------------------------------------------------------------------------- protocol
    def acquire(self) -> CacheLease:
        """Take the lease (see the module docstring) and start renewing it; return ``self``."""
        self.acquired = time.time()
        for _ in range(ACQUIRE_ATTEMPTS):  # the file changed between our read and our swap: look again
            data, version = self.store.read()
            current = self._parse(data)
            if current is None:
                self._version = self.store.create(self._record())
            else:
                self.taken_over = {**current, "reason": self._judge(current)}
                self._version = self.store.replace(self._record(), version)
            if self._version is not None:
                break
            self.taken_over = None
        else:
            holder = (self.read() or {}).get("holder", "unknown")
            raise LeaseHeldError(f"{self.location.url(LEASE_FILE)}: another job ({holder}) took the cache's lease at the "
                                 "same time; run one job per cache")
        if self.taken_over is not None:
            logger.warning("taking over the cache lease of %s (renewed %.0f s ago): %s", self.taken_over.get("holder"),
                           lease_age(self.taken_over), self.taken_over["reason"])
        self._thread = threading.Thread(target=self._renew_loop, name="cache-lease", daemon=True)
        self._thread.start()
        return self

    def _judge(self, current: dict[str, Any]) -> str:
        """Why the lease ``current`` may be taken over (stale, its holder provably gone, ``force``); a live
        lease of a holder that is not provably gone raises :class:`LeaseHeldError` naming it."""
        stale = _not_renewed(current, self.timeout)
        if stale is not None:
            return stale
        if self.force:
            return "--force"
        gone = holder_gone(current)
        if gone is None:
            raise LeaseHeldError(
                f"{self.location.url(LEASE_FILE)}: the cache is being written by another job ({current.get('holder')}, "
                f"lease renewed {lease_age(current):.0f} s ago); wait for it, or pass --force if that job is dead")
        return gone

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.timeout / 4):
            try:
                version = self.store.replace(self._record(), self._version)
                if version is None:
                    current = self.read()
                    self.lost = str(current.get("holder")) if current else "nobody (the lease file was deleted)"
                    logger.error("lost the cache lease to %s", self.lost)
                    return
                self._version = version
            except store_errors() as e:  # a transient store error (disk, network, S3): try again at the next period
                logger.warning("could not renew the cache lease: %s", e)

    def release(self) -> None:
        """Stop renewing and delete the lease file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._version is None:
            return
        try:
            self.store.delete(self._version)
        except OSError as e:
            logger.warning("could not release the cache lease %s: %s", self.location.url(LEASE_FILE), e)

    def __enter__(self) -> CacheLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lease_age(record: dict[str, Any]) -> float:
    """Seconds since the lease ``record`` was last renewed (never negative; unreadable: since the epoch)."""
    return max(time.time() - float(record.get("renewed") or 0.0), 0.0)


def _not_renewed(record: dict[str, Any], timeout: float) -> str | None:
    """``not renewed for N s`` when ``record`` outlived its timeout (its own, else ``timeout``), else ``None``."""
    age = lease_age(record)
    return f"not renewed for {age:.0f} s" if age >= float(record.get("timeout") or timeout) else None


def read_lease(location: CacheLocation) -> dict[str, Any] | None:
    """The cache's lease record for a command that only looks: read as a plain file, without choosing a
    lease store (on S3 that probes conditional writes with a PUT); ``None`` when there is none."""
    if not location.exists(LEASE_FILE):
        return None
    return CacheLease._parse(location.read_bytes(LEASE_FILE))


def lease_over(record: dict[str, Any]) -> str | None:
    """Why the lease ``record`` no longer protects a job (unreadable, not renewed within its timeout, its
    holder provably gone), or ``None`` while its job may be running."""
    if not record.get("renewed"):
        return "the lease file is unreadable"
    return _not_renewed(record, DEFAULT_LEASE_TIMEOUT) or holder_gone(record)


__all__ = ["DEFAULT_LEASE_TIMEOUT", "LEASE_FILE", "SETTLE_SECONDS", "CacheLease", "LeaseHeldError", "describe_holder",
           "lease_age", "lease_over", "read_lease"]
