"""A node-local, size-bounded copy of the shards of remote caches (``s3://``, ``gs://``...).

Trainers streaming a cache from object storage read each shard many times (every epoch, every
DataLoader worker, every rank of a node). :class:`LocalShardCache` keeps finished shard files in a
local directory, so a shard crosses the network once per node while it stays in the budget:

* **layout**: ``<directory>/<cache key>/<shard file>.<version>``; the cache key hashes the remote
  cache's URL (several caches share one directory and one budget), the version hashes the remote
  object's size and ETag (or modification time) from one listing of ``shards/`` per process, so a
  shard rewritten under the same id (a repaired cache) is fetched again and the old copy ages out;
* **bounded**: the complete files and the downloads in progress stay within ``max_bytes``; before a
  download the least recently used files are evicted (a hit touches its file's modification time);
  a shard larger than the whole budget is an error naming ``data.local_cache_bytes``;
* **cross-process safe**: eviction and reservations run under one ``filelock`` per directory, a
  download under a per-shard lock (any number of DataLoader workers and ranks of one node share the
  directory; a second reader of a shard being fetched waits for it instead of fetching it twice);
  downloads go to a temporary name and are renamed into place after their size is checked, so a
  reader never sees half a file; temporary files of dead processes are removed;
* **prefetch**: :meth:`prefetch` queues shards (the next ones the reading process's own items reach:
  a DataLoader worker's, not the whole stream's) for a background thread, so the next shard is often
  local before the process reaches it. A prefetch that fails is logged at debug level only: the read
  of that shard fetches it again and raises the error.

An evicted file that a reader still holds open stays readable (POSIX unlink semantics); its disk
space is freed when the reader closes it. Checksums are not checked here: the shard format checks
every chunk when it is read (:class:`~cameo_corr.cache.shard.CorruptCacheError`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from cameo_corr.schemas import CameoCorrError, DatasetError, SchemaError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from cameo_corr.cache.location import CacheLocation

logger = logging.getLogger(__name__)

TMP_MARK = ".part-"
"""Infix of a download in progress: ``<file>.part-<pid>-<random>``."""
LOCK_BUCKETS = 64
"""Per-shard download locks are hashed into this many lock files (a bounded set, never deleted)."""


def _key(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _version(info: dict[str, Any]) -> str:
    """A short hash of what identifies one stored object: its size and ETag (or its modification time)."""
    tag = next((info[k] for k in ("ETag", "etag", "generation", "mtime", "LastModified", "last_modified", "created") if info.get(k)), "")
    return _key(f"{int(info['size'])}-{tag}")[:12]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class LocalShardCache:
    """Local copies of remote shard files under a byte budget (see the module docstring).

    Args:
        directory: local directory (created if needed), shared by every process of the node.
        max_bytes: budget of the directory: complete files plus downloads in progress.
        prefetch: how many of the next shards its reading process reaches it asks to fetch ahead in
            a background thread (0: none; :attr:`prefetch_depth`).
    """

    def __init__(self, directory: str | Path, max_bytes: int, *, prefetch: int = 2) -> None:
        if "://" in str(directory):
            raise SchemaError("data.local_cache", f"must be a local directory, got the URL {directory!r}")
        if isinstance(max_bytes, bool) or int(max_bytes) <= 0:
            raise SchemaError("data.local_cache_bytes", f"must be a positive number of bytes, got {max_bytes!r}")
        if int(prefetch) < 0:
            raise SchemaError("data.local_cache_prefetch", f"must be >= 0, got {prefetch!r}")
        self.directory = Path(directory).absolute()
        self.max_bytes = int(max_bytes)
        self.prefetch_depth = int(prefetch)
        self.downloads = 0
        """Shards downloaded by this process (foreground and prefetch)."""
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._listings: dict[str, dict[str, dict[str, Any]]] = {}
        self._queue: queue.Queue[tuple[CacheLocation, str]] | None = None
        self._queued: set[tuple[str, str]] = set()
        self._mutex = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"directory": self.directory, "max_bytes": self.max_bytes, "prefetch_depth": self.prefetch_depth, "downloads": 0}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def __repr__(self) -> str:
        return f"LocalShardCache({str(self.directory)!r}, max_bytes={self.max_bytes})"

    # ------------------------------------------------------------------------------------ reading
    def open(self, location: CacheLocation, rel: str) -> BinaryIO:
        """The local copy of file ``rel`` of the cache at ``location``, open for reading (fetched first
        when absent). Raises :class:`DatasetError` naming the remote file when it does not exist."""
        self._check_process()
        local = self._local_path(location, rel)
        handle = self._open_hit(local)
        if handle is not None:
            return handle
        return self._fetch(location, rel, local)

    def prefetch(self, location: CacheLocation, rels: Sequence[str]) -> None:
        """Queue files ``rels`` of the cache at ``location`` for the background thread (no-op with
        ``prefetch=0``; files already local or queued are skipped)."""
        if self.prefetch_depth <= 0:
            return
        self._check_process()
        for rel in rels:
            key = (location.url(), rel)
            with self._mutex:
                if key in self._queued:
                    continue
            try:
                if self._local_path(location, rel).exists():
                    continue
            except DatasetError:  # not (yet) a shard of the cache: the read will say so
                continue
            with self._mutex:
                self._queued.add(key)
                if self._queue is None:
                    self._queue = queue.Queue()
                    threading.Thread(target=self._prefetch_loop, args=(self._queue,), name="shard-prefetch", daemon=True).start()
                self._queue.put((location, rel))

    def usage(self) -> int:
        """Bytes held in the directory now (complete files and downloads in progress)."""
        return sum(size for _, size, _ in self._scan(clean=False))

    # ---------------------------------------------------------------------------------- internals
    def _check_process(self) -> None:
        if self._pid != os.getpid():  # forked: the parent's thread and queue do not exist here
            self._reset()

    def _open_hit(self, local: Path) -> BinaryIO | None:
        try:
            handle = open(local, "rb")  # noqa: SIM115 - handed to the shard store, which closes it
        except FileNotFoundError:
            return None
        try:
            os.utime(local)  # most recently used
        except FileNotFoundError:  # evicted meanwhile: the open handle still reads it
            pass
        return handle

    def _listing(self, location: CacheLocation, folder: str, *, refresh: bool) -> dict[str, dict[str, Any]]:
        """``{name: info}`` of the remote ``folder`` (one listing per process; again on ``refresh``)."""
        url = location.url(folder)
        with self._mutex:
            cached = self._listings.get(url)
        if cached is not None and not refresh:
            return cached
        path = location.path(folder)
        location.fs.invalidate_cache(path)
        try:
            entries = location.fs.ls(path, detail=True)
        except FileNotFoundError:
            entries = []
        listing = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e for e in entries if e.get("type", "file") == "file"}
        with self._mutex:
            self._listings[url] = listing
        return listing

    def _info(self, location: CacheLocation, rel: str) -> dict[str, Any]:
        """Size and ETag of remote file ``rel`` (from the listing, listed again once for a new file)."""
        folder, _, name = rel.rpartition("/")
        for refresh in (False, True):
            info = self._listing(location, folder, refresh=refresh).get(name)
            if info is not None:
                return info
        raise DatasetError(location.url(rel), "shard listed in the manifest is missing")

    def _local_path(self, location: CacheLocation, rel: str) -> Path:
        info = self._info(location, rel)
        return self.directory / _key(location.url()) / f"{rel.rsplit('/', 1)[-1]}.{_version(info)}"

    def _lock(self, name: str) -> Any:
        from filelock import FileLock

        self.directory.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.directory / f".lock-{name}"))

    def _fetch(self, location: CacheLocation, rel: str, local: Path) -> BinaryIO:
        """Download ``rel`` to ``local`` (under its shard lock, in the budget) and open it."""
        bucket = int(_key(str(local)), 16) % LOCK_BUCKETS
        with self._lock(f"shard-{bucket}"):
            handle = self._open_hit(local)  # fetched by another process while we waited
            if handle is not None:
                return handle
            size = int(self._info(location, rel)["size"])
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f"{local.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
            self._reserve(tmp, size, location.url(rel))
            try:
                location.fs.get_file(location.path(rel), str(tmp))
                got = tmp.stat().st_size
                if got != size:
                    raise DatasetError(location.url(rel), f"downloaded {got} bytes, the store lists {size} (changed while read?)")
                handle = open(tmp, "rb")  # noqa: SIM115 - opened before the rename: an eviction cannot take it away
                os.replace(tmp, local)
            finally:
                tmp.unlink(missing_ok=True)
            self.downloads += 1
            return handle

    def _reserve(self, tmp: Path, size: int, what: str) -> None:
        """Make room for ``size`` more bytes (evict least recently used files) and claim them with a
        placeholder of that size at ``tmp``, all under the directory lock."""
        if size > self.max_bytes:
            raise CameoCorrError(f"{what}: the shard is {size} bytes, more than the whole local shard cache "
                                 f"(data.local_cache_bytes={self.max_bytes}); raise data.local_cache_bytes")
        with self._lock("directory"):
            entries = self._scan(clean=True)
            total = sum(s for _, s, _ in entries)
            for path, s, _ in sorted((e for e in entries if TMP_MARK not in e[0].name), key=lambda e: e[2]):
                if total + size <= self.max_bytes:
                    break
                path.unlink(missing_ok=True)
                total -= s
            if total + size > self.max_bytes:
                logger.warning("local shard cache %s: downloads in progress hold %d bytes, over data.local_cache_bytes=%d",
                               self.directory, total + size, self.max_bytes)
            with open(tmp, "wb") as f:
                f.truncate(size)

    def _scan(self, *, clean: bool) -> list[tuple[Path, int, float]]:
        """``(path, size, mtime)`` of every file and download in progress (``clean``: removing the
        downloads of processes that died)."""
        out = []
        if not self.directory.is_dir():
            return out
        for sub in os.scandir(self.directory):
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub.path):
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                if clean and TMP_MARK in entry.name:
                    pid = int(entry.name.rsplit(TMP_MARK, 1)[1].split("-", 1)[0])
                    if not _pid_alive(pid):
                        Path(entry.path).unlink(missing_ok=True)
                        continue
                out.append((Path(entry.path), int(st.st_size), float(st.st_mtime)))
        return out

    def _prefetch_loop(self, jobs: queue.Queue[tuple[CacheLocation, str]]) -> None:
        while True:
            location, rel = jobs.get()
            try:
                local = self._local_path(location, rel)
                if not local.exists():
                    self._fetch(location, rel, local).close()
            except Exception as e:  # noqa: BLE001 - the foreground read of this shard raises it
                logger.debug("prefetch of %s failed: %s", location.url(rel), e)
            finally:
                with self._mutex:
                    self._queued.discard((location.url(), rel))


__all__ = ["LocalShardCache"]
