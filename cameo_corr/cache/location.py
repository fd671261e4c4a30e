"""Where a cache lives: a local directory or any fsspec URL (``s3://``, ``gs://``, ``file://``,
``memory://``), with the few file operations the cache needs (atomic writes, moves, listings that
bypass object-store listing caches, zarr stores)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Mapping

from cameo_corr.cache.layout import TMP_PREFIX
from cameo_corr.cli.errors import note_store
from cameo_corr.schemas import DatasetError

BUCKET_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az"})
"""Object stores whose fsspec ``makedirs`` creates a missing bucket (directories there are key prefixes)."""


_STORE_ERRORS: tuple[type[BaseException], ...] | None = None


def store_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean a store could not be reached or did not answer, not that its data is bad:
    ``OSError`` (local disks, and the S3 error codes s3fs translates) and botocore's connection, timeout
    and credential errors (``BotoCoreError``), which s3fs passes through unchanged. Readers let them
    through instead of calling a shard corrupt; the lease keeps renewing after them."""
    global _STORE_ERRORS
    if _STORE_ERRORS is None:
        errors: list[type[BaseException]] = [OSError]
        try:
            from botocore.exceptions import BotoCoreError

            errors.append(BotoCoreError)
        except ImportError:  # no s3fs/botocore installed: no such errors can occur
            pass
        _STORE_ERRORS = tuple(errors)
    return _STORE_ERRORS


def options_for(path: str | Path, storage_options: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The storage options that apply to the cache at ``path``: ``storage_options`` for a URL, none for a
    local directory (:class:`CacheLocation` refuses options there), so one set serves a mix of both."""
    return storage_options if "://" in str(path) else None


def _check_session_options(fs: Any, url: str) -> None:
    """Refuse storage options s3fs does not know. s3fs hands them to aiobotocore's session, which
    raises a ``TypeError`` at the first request (``--storage-option retries=3`` was a traceback)."""
    extra = getattr(fs, "kwargs", None)
    if type(fs).__module__.split(".")[0] != "s3fs" or not extra:
        return
    import inspect

    from aiobotocore.session import AioSession

    unknown = sorted(set(extra) - set(inspect.signature(AioSession.__init__).parameters))
    if unknown:
        raise DatasetError(url, f"s3fs takes no storage option {', '.join(map(repr, unknown))} (botocore's settings, such as "
                           "timeouts and retries, go in config_kwargs)")


class CacheLocation:
    """Where a cache lives: a local directory or an fsspec URL, with the few file operations we need."""

    def __init__(self, path: str | Path, storage_options: Mapping[str, Any] | None = None) -> None:
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        text = str(path)
        self.storage_options = dict(storage_options or {})
        self.local = "://" not in text
        if self.local:
            if self.storage_options:
                raise ValueError(f"storage_options given for the local path {text!r}; they apply to URLs only")
            self.fs = LocalFileSystem(auto_mkdir=True)
            self.root = os.path.abspath(text)
        else:
            options = dict(self.storage_options)
            if text.startswith(("file://", "local://")):
                options.setdefault("auto_mkdir", True)
            self.fs, self.root = fsspec.core.url_to_fs(text, **options)
            self.root = self.root.rstrip("/")
            if not isinstance(self.fs, LocalFileSystem):
                note_store(text)
                _check_session_options(self.fs, text)
        self.display = text

    def path(self, *parts: str) -> str:
        """Filesystem path (no protocol) of ``parts`` under the cache root."""
        return "/".join([self.root, *parts])

    def url(self, *parts: str) -> str:
        """Full URL (with protocol) of ``parts``; a plain path for local caches."""
        p = self.path(*parts)
        return p if self.local else self.fs.unstrip_protocol(p)

    def _fresh(self, path: str) -> str:
        """``path`` after dropping cached listings of it and its parents.

        Object-store filesystems (s3fs, gcsfs) cache directory listings per instance and answer
        ``exists``/``info``/``ls`` from them; writes by other processes (workers) and by zarr's own
        store instance never reach that cache, so every query here starts from the store itself.
        """
        self.fs.invalidate_cache(path)
        return path

    def exists(self, *parts: str) -> bool:
        return bool(self.fs.exists(self._fresh(self.path(*parts))))

    def listdir(self, *parts: str) -> list[str]:
        """Names (not paths) of the entries directly under ``parts``; empty when it does not exist."""
        if self.local:  # one system call, no per-entry path normalisation (a cache holds ~N/64 shard files)
            try:
                return sorted(os.listdir(self.path(*parts)))
            except (FileNotFoundError, NotADirectoryError):
                return []
        base = self._fresh(self.path(*parts))
        if not self.fs.exists(base):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False))

    def makedirs(self, *parts: str) -> None:
        """Create the directory ``parts`` (and its parents) where directories exist. Nothing on an object
        store: its keys need no directory, and fsspec's ``makedirs`` there would create a missing bucket,
        so a mistyped bucket in ``--out`` would become a new bucket instead of an error."""
        if not self.in_bucket:
            self.fs.makedirs(self.path(*parts), exist_ok=True)

    @property
    def in_bucket(self) -> bool:
        """Whether this location is on an object store with buckets (s3, gcs, azure)."""
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
        return bool(protocols & BUCKET_PROTOCOLS)

    def missing_bucket(self) -> str | None:
        """The bucket of this location when it is on an object store and the store says the bucket does
        not exist (``HeadBucket`` answers 404 on s3). ``None`` otherwise, also when the store refuses to
        say: credentials allowed only a prefix of the bucket may not list or head it (s3fs's ``exists``
        reads that as a missing bucket), and then the command's own requests tell."""
        if not self.in_bucket:
            return None
        bucket = self.root.split("/", 1)[0]
        try:
            if hasattr(self.fs, "call_s3"):
                self.fs.call_s3("head_bucket", Bucket=bucket)
            else:
                self.fs.info(self._fresh(bucket))
        except FileNotFoundError:
            return bucket
        except store_errors():  # refused or not answering: not provably missing
            return None
        return None

    def check_writable(self, field: str = "out") -> None:
        """Write and delete an empty probe file at the root, before a command writes anything else; a
        missing bucket or directory that cannot be made, no write permission or a read-only disk raises
        :class:`~cameo_corr.schemas.DatasetError` naming this location and ``field``. (A store that does
        not answer raises its own error, :func:`store_errors`.)"""
        probe = f"{TMP_PREFIX}probe-{uuid.uuid4().hex[:8]}"
        bucket = self.missing_bucket()
        if bucket:
            raise DatasetError(self.display, f"no such bucket: {bucket}", field=field)
        try:
            self.makedirs()
            self.fs.pipe_file(self.path(probe), b"")
            self.fs.rm(self.path(probe))
        except OSError as e:
            raise DatasetError(self.display, f"cannot write the cache there ({(e.strerror or str(e)).lower()})",
                               field=field) from None

    def remove(self, *parts: str) -> None:
        """Delete a file or a directory tree."""
        self.fs.rm(self.path(*parts), recursive=True)

    def move(self, src: str, dst: str) -> None:
        """Rename ``src`` to ``dst`` (relative paths): atomic ``os.rename`` locally (also ``file://``).

        On object stores (``s3://``, ``gs://``...) a directory is only a key prefix, and fsspec's
        recursive ``mv`` also tries to copy the prefixes themselves (and raises), so a directory is
        moved as the list of its files (server-side copies), then the source is deleted.
        """
        from fsspec.implementations.local import LocalFileSystem

        if self.local or isinstance(self.fs, LocalFileSystem):
            os.rename(self.path(src), self.path(dst))
            return
        src_path, dst_path = self._fresh(self.path(src)), self._fresh(self.path(dst))
        if not self.fs.isdir(src_path):
            self.fs.mv(src_path, dst_path)
            return
        files = self.fs.find(src_path)
        if files:
            self.fs.copy(files, [dst_path + f[len(src_path) :] for f in files], on_error="raise")
        self.fs.rm(src_path, recursive=True)

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        """Write ``data`` to ``rel`` through a temporary name in the same folder, then rename."""
        folder, _, name = rel.rpartition("/")
        tmp = f"{folder}/{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}" if folder else f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
        self.makedirs(*([folder] if folder else []))
        with self.fs.open(self.path(tmp), "wb") as f:
            f.write(data)
        self.move(tmp, rel)

    def read_bytes(self, rel: str) -> bytes:
        """The bytes of ``rel``, fetched whole (one GET on an object store). A file replaced while it is
        read (``consolidated.json``, ``lease.json``) gives the old or the new bytes: a file object would
        pin the ETag of its first request and refuse an object replaced before its read."""
        return self.fs.cat_file(self._fresh(self.path(rel)))

    def zarr_store(self, rel: str, *, read_only: bool) -> Any:
        """A zarr v3 store rooted at ``rel``: ``LocalStore`` locally, ``FsspecStore`` for URLs."""
        from zarr.storage import FsspecStore, LocalStore

        if self.local:
            return LocalStore(self.path(rel), read_only=read_only)
        options = dict(self.storage_options)
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else tuple(self.fs.protocol)
        if "file" in protocols:
            options.setdefault("auto_mkdir", True)
        return FsspecStore.from_url(self.url(rel), storage_options=options or None, read_only=read_only)

    def disk_usage(self, *parts: str) -> int:
        """Total bytes of the files under ``parts`` (0 when absent)."""
        base = self._fresh(self.path(*parts))
        try:
            return int(sum(info["size"] for info in self.fs.find(base, detail=True).values()))
        except FileNotFoundError:  # absent, or removed meanwhile (a fragment consolidated by the job)
            return 0


__all__ = ["CacheLocation", "options_for", "store_errors"]
