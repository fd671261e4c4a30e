"""One writer per cache: a lease file in the cache, renewed by the job that holds it.

``<cache>/lease.json`` holds ``{"holder", "token", "acquired", "renewed", "timeout"}``: ``holder`` names
the job for people (``user@host pid N``, plus the Ray job id under ``ray job submit``), ``token`` is a
random id that tells this job's lease from any other, ``renewed`` a UTC UNIX time the holder rewrites
every ``timeout / 4`` seconds from a background thread, ``timeout`` the seconds after which an
unrenewed lease counts as *stale* (its job crashed or lost its node without releasing it).

Acquiring (:meth:`CacheLease.acquire`):

* no lease file: write ours;
* a live lease (``now - renewed < timeout``): refuse with :class:`LeaseHeldError` naming the holder and
  how long ago it renewed (the CLI turns it into exit code 2), unless ``force``;
* a stale lease, or ``force``: take it over (logged with the previous holder).

Writing is "write to a temporary name, rename, read back": on a local path the first lease is created
with ``O_EXCL``, so of two jobs starting together exactly one wins; on fsspec stores (``s3://``...),
which have no portable exclusive create, the lease is written, then read back after
:data:`SETTLE_SECONDS`, and the job whose token is not in the file lost the race and refuses like any
other second writer. Renewal checks the token too: a job whose lease was taken over (``--force`` by
someone else) stops renewing and :attr:`CacheLease.lost` tells the driver, which fails the run.
Times are compared with the local clock; keep the nodes' clocks in sync (NTP) or use a timeout well
above their skew. The lease is released (deleted, if still ours) when the job ends, also on errors
and Ctrl-C.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from cameo_corr.schemas import CameoCorrError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from cameo_corr.cache.location import CacheLocation

logger = logging.getLogger(__name__)

LEASE_FILE = "lease.json"
DEFAULT_LEASE_TIMEOUT = 180.0
"""Seconds without renewal after which a lease is stale and another job may take it over."""
SETTLE_SECONDS = 1.0
"""Wait between writing a lease to an fsspec store and reading it back (lost-race detection)."""


class LeaseHeldError(CameoCorrError):
    """Another live job holds the cache's lease."""


def describe_holder() -> str:
    """``user@host pid N`` plus the Ray job id when running under ``ray job submit``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    text = f"{user}@{socket.gethostname()} pid {os.getpid()}"
    job = os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_JOB_SUBMISSION_ID")
    return f"{text} (ray job {job})" if job else text


class CacheLease:
    """The lease of one job on one cache; use as ``with CacheLease(loc).acquire(): ...``."""

    def __init__(self, location: "CacheLocation", *, timeout: float = DEFAULT_LEASE_TIMEOUT, force: bool = False) -> None:
        if not timeout > 0:
            raise ValueError(f"lease timeout must be positive, got {timeout}")
        self.location = location
        self.timeout = float(timeout)
        self.force = force
        self.token = uuid.uuid4().hex
        self.holder = describe_holder()
        self.acquired = 0.0
        self.taken_over: dict[str, Any] | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --------------------------------------------------------------------------------- file i/o
    def _record(self) -> dict[str, Any]:
        return {"holder": self.holder, "token": self.token, "acquired": self.acquired, "renewed": time.time(), "timeout": self.timeout}

    def read(self) -> dict[str, Any] | None:
        """The current lease file (``None`` when there is none; an unreadable file counts as stale)."""
        if not self.location.exists(LEASE_FILE):
            return None
        try:
            data = json.loads(self.location.read_bytes(LEASE_FILE).decode())
            return data if isinstance(data, dict) else {"holder": "unknown (unreadable lease)", "renewed": 0.0}
        except (OSError, ValueError):
            return {"holder": "unknown (unreadable lease)", "renewed": 0.0}

    def _create_exclusive_local(self) -> bool:
        """Create the lease file only if none exists (local paths); ``False`` when one appeared."""
        self.location.fs.makedirs(self.location.root, exist_ok=True)
        try:
            fd = os.open(self.location.path(LEASE_FILE), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self._record()))
        return True

    # --------------------------------------------------------------------------------- protocol
    def acquire(self) -> "CacheLease":
        """Take the lease (see the module docstring) and start renewing it; return ``self``."""
        where = self.location.url(LEASE_FILE)
        self.acquired = time.time()
        for _ in range(2):  # a lease that vanishes between our read and our create: look again once
            current = self.read()
            if current is not None and current.get("token") != self.token:
                age = time.time() - float(current.get("renewed") or 0.0)
                if age < float(current.get("timeout") or self.timeout) and not self.force:
                    raise LeaseHeldError(
                        f"{where}: the cache is being written by another job ({current.get('holder')}, lease renewed "
                        f"{max(age, 0.0):.0f} s ago); wait for it, or pass --force if that job is dead"
                    )
                self.taken_over = current
                logger.warning("taking over the lease of %s (renewed %.0f s ago%s)", current.get("holder"), age,
                               ", --force" if self.force else "")
            if self.location.local:
                if current is not None:
                    self.location.remove(LEASE_FILE)
                if self._create_exclusive_local():
                    break
                continue
            self.location.write_bytes_atomic(LEASE_FILE, json.dumps(self._record()).encode())
            time.sleep(SETTLE_SECONDS)
            break
        final = self.read()
        if final is None or final.get("token") != self.token:
            holder = final.get("holder") if final else "unknown"
            raise LeaseHeldError(f"{where}: another job ({holder}) took the cache's lease at the same time; run one job per cache")
        self._thread = threading.Thread(target=self._renew_loop, name="cache-lease", daemon=True)
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.timeout / 4):
            try:
                current = self.read()
                if current is None or current.get("token") != self.token:
                    self.lost = str(current.get("holder")) if current else "nobody (the lease file was deleted)"
                    logger.error("lost the cache lease to %s", self.lost)
                    return
                self.location.write_bytes_atomic(LEASE_FILE, json.dumps(self._record()).encode())
            except OSError as e:  # a transient store error: try again at the next period
                logger.warning("could not renew the cache lease: %s", e)

    def release(self) -> None:
        """Stop renewing and delete the lease file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            current = self.read()
            if current is not None and current.get("token") == self.token:
                self.location.remove(LEASE_FILE)
        except OSError as e:
            logger.warning("could not release the cache lease %s: %s", self.location.url(LEASE_FILE), e)

    def __enter__(self) -> "CacheLease":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


__all__ = ["LEASE_FILE", "DEFAULT_LEASE_TIMEOUT", "SETTLE_SECONDS", "LeaseHeldError", "describe_holder", "CacheLease"]
