"""How a cache's lease file is created, replaced and deleted on each kind of store.

Every store offers the same compare-and-swap on one small file (``<cache>/lease.json``):

* :meth:`LeaseStore.read` gives the file's bytes and its *version* (what a later swap must match);
* :meth:`LeaseStore.create` writes the file only if there is none;
* :meth:`LeaseStore.replace` writes it only if it is still at the version read;
* :meth:`LeaseStore.delete` deletes it only if it is still at that version.

Three implementations, chosen per cache by :func:`lease_store_for`:

* **local paths** (also ``file://``): the swaps run under a lock file (``lease.json.lock``, ``filelock``)
  and the first lease is created with ``O_EXCL``; exact.
* **S3** (``s3://``, s3fs): conditional writes of the S3 API. ``create`` is a ``PutObject`` with
  ``If-None-Match: *`` (the store answers 412 when the key exists), ``replace`` a ``PutObject`` with
  ``If-Match: <ETag>``; exact, as long as the store honours those headers. An S3-compatible store
  that ignores them would let two writers win, so the store is probed once per lease (an object
  written twice, the second time with ``If-None-Match: *``): a store that accepts the second write, or
  does not implement the header, gets the settle store below and a warning saying so. ``delete``
  reads the ETag and deletes when it matches (two requests: a ``--force`` takeover landing between
  them is the one window left; the taker then notices that its lease file is gone).
* **other fsspec stores** (``gs://``, ``memory://``...): no portable conditional write, so a write is
  followed by :data:`SETTLE_SECONDS` of waiting and a read back; of two jobs writing within that
  window the one whose bytes are not in the file loses. This is *not strictly atomic*: two writers
  whose writes are further apart than the store's read-after-write delay but closer than the read
  back could both win; the renewal of the loser then notices (:attr:`CacheLease.lost`).
"""

from __future__ import annotations

import errno
import logging
import os
import time
import uuid
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    from cameo_corr.cache.location import CacheLocation

logger = logging.getLogger(__name__)

SETTLE_SECONDS = 1.0
"""Wait between writing a lease to a store without conditional writes and reading it back."""
PROBE_SUFFIX = ".probe-"
"""``lease.json.probe-<hex>``: the object written twice to learn whether an S3 store honours ``If-None-Match``."""


class LeaseStore:
    """Compare-and-swap of one file through fsspec: the settle-and-read-back store (the base of the others)."""

    kind = "write, settle, read back (not strictly atomic)"

    def __init__(self, location: CacheLocation, name: str) -> None:
        self.location = location
        self.name = name

    def read(self) -> tuple[bytes | None, Any]:
        """``(bytes, version)`` of the file, ``(None, None)`` when there is none."""
        if not self.location.exists(self.name):
            return None, None
        try:
            data = self.location.read_bytes(self.name)
        except FileNotFoundError:  # deleted between the two calls
            return None, None
        return data, data

    def create(self, data: bytes) -> Any | None:
        """Write ``data`` if there is no file; its version, or ``None`` when another writer was first."""
        if self.location.exists(self.name):
            return None
        return self._write_and_check(data)

    def replace(self, data: bytes, version: Any) -> Any | None:
        """Write ``data`` if the file is still at ``version``; the new version, or ``None`` when it changed."""
        if self.read()[1] != version:
            return None
        return self._write_and_check(data)

    def delete(self, version: Any) -> bool:
        """Delete the file if it is still at ``version``; whether it was deleted."""
        if self.read()[1] != version:
            return False
        self.location.remove(self.name)
        return True

    def _write_and_check(self, data: bytes) -> Any | None:
        self.location.write_bytes_atomic(self.name, data)
        time.sleep(SETTLE_SECONDS)
        current = self.read()[1]
        return current if current == data else None


class LocalLeaseStore(LeaseStore):
    """A local directory: swaps under ``<name>.lock`` (``filelock``), the first file created with ``O_EXCL``."""

    kind = "local file lock and exclusive create"

    def _lock(self) -> Any:
        from filelock import FileLock

        self.location.makedirs()
        return FileLock(self.location.path(self.name + ".lock"), timeout=60)

    def create(self, data: bytes) -> Any | None:
        with self._lock():
            try:
                fd = os.open(self.location.path(self.name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return None
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return data

    def replace(self, data: bytes, version: Any) -> Any | None:
        with self._lock():
            if LeaseStore.read(self)[1] != version:
                return None
            self.location.write_bytes_atomic(self.name, data)
            return data

    def delete(self, version: Any) -> bool:
        with self._lock():
            return LeaseStore.delete(self, version)


class S3LeaseStore(LeaseStore):
    """An S3 bucket (s3fs): ``If-None-Match: *`` creates, ``If-Match: <ETag>`` replaces."""

    kind = "S3 conditional writes (If-None-Match / If-Match)"

    def __init__(self, location: CacheLocation, name: str) -> None:
        super().__init__(location, name)
        self.bucket, self.key, _ = location.fs.split_path(location.path(name))

    def _call(self, method: str, **kwargs: Any) -> dict[str, Any]:
        return self.location.fs.call_s3(method, Bucket=self.bucket, **kwargs)

    def read(self) -> tuple[bytes | None, Any]:
        from fsspec.asyn import sync

        async def get() -> tuple[bytes, str]:
            response = await self.location.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            async with response["Body"] as body:
                return await body.read(), response["ETag"]

        try:
            return sync(self.location.fs.loop, get)
        except FileNotFoundError:
            return None, None

    def create(self, data: bytes) -> Any | None:
        try:
            return self._call("put_object", Key=self.key, Body=data, IfNoneMatch="*")["ETag"]
        except FileExistsError:  # 412: the key exists
            return None
        except OSError as e:
            if e.errno == errno.EBUSY:  # 409 ConditionalRequestConflict: a concurrent conditional write
                return None
            raise

    def replace(self, data: bytes, version: Any) -> Any | None:
        try:
            return self._call("put_object", Key=self.key, Body=data, IfMatch=version)["ETag"]
        except FileNotFoundError:  # deleted meanwhile
            return None
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EBUSY):  # 412 PreconditionFailed (changed), 409 (concurrent write)
                return None
            raise

    def delete(self, version: Any) -> bool:
        if self.read()[1] != version:
            return False
        self._call("delete_object", Key=self.key)
        return True

    def honours_conditional_create(self) -> bool:
        """Whether the store refuses a second ``If-None-Match: *`` write of one key (written, then deleted)."""
        key = f"{self.key}{PROBE_SUFFIX}{uuid.uuid4().hex[:12]}"
        self._call("put_object", Key=key, Body=b"probe")
        try:
            self._call("put_object", Key=key, Body=b"probe again", IfNoneMatch="*")
        except FileExistsError:
            return True
        except OSError as e:
            if e.errno == errno.ENOSYS:  # 501 NotImplemented
                return False
            raise
        finally:
            self._call("delete_object", Key=key)
        return False


def lease_store_for(location: CacheLocation, name: str) -> LeaseStore:
    """The exact store of ``location`` (local, S3), else the settle store; an S3 store that ignores
    ``If-None-Match`` is warned about and gets the settle store."""
    from fsspec.implementations.local import LocalFileSystem

    if location.local or isinstance(location.fs, LocalFileSystem):
        return LocalLeaseStore(location, name)
    protocols = (location.fs.protocol,) if isinstance(location.fs.protocol, str) else tuple(location.fs.protocol)
    if "s3" in protocols and hasattr(location.fs, "call_s3"):
        store = S3LeaseStore(location, name)
        if store.honours_conditional_create():
            return store
        logger.warning("%s: this S3 store ignores If-None-Match (conditional writes); the lease falls back to "
                       "write, wait %g s, read back, which two jobs starting together can both pass",
                       location.url(name), SETTLE_SECONDS)
    return LeaseStore(location, name)


__all__ = ["SETTLE_SECONDS", "LeaseStore", "LocalLeaseStore", "S3LeaseStore", "lease_store_for"]
