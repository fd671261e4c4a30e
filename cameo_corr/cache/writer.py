"""Writing a cache: one shard file and then its manifest fragment per commit, plus the start-up
maintenance of a run (orphans, missing shards, failed rows).

A window is *done* only when its manifest row exists. A worker killed at any point leaves nothing a
reader trusts: temporary entries and shards without a manifest entry are orphans that
:meth:`CacheWriter.remove_orphans` deletes before a run redoes them. A shard with a manifest entry is
finished and never rewritten. Only one job may write a cache at a time (the orphan sweep assumes so):
the job holds the cache's lease (:mod:`cameo_corr.cache.lease`) while it writes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from cameo_corr.cache.config import check_compatible, read_existing_config
from cameo_corr.cache.consolidation import consolidate_manifest, drop_failed_rows, drop_shards
from cameo_corr.cache.layout import CONFIG_FILE, fragment_path, shard_dir
from cameo_corr.cache.location import CacheLocation
from cameo_corr.cache.manifest import (
    MANIFEST_ROW_GROUP,
    find_orphans,
    parquet_bytes,
    read_consolidation,
    read_manifest,
    read_manifest_file,
    stored_shard_ids,
)
from cameo_corr.cache.shard import shard_window_meta, shard_zip_bytes, window_fractions
from cameo_corr.schemas import (
    CacheConfig,
    SchemaError,
    WindowRecord,
    manifest_schema,
    validate_image_arrays,
    validate_window_arrays,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pyarrow as pa


@dataclass
class WindowOutcome:
    """What the writer records for one window: its arrays (ok) or its error (failed)."""

    record: WindowRecord
    arrays: dict[str, np.ndarray] | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        if (self.arrays is None) == (self.error is None):
            raise ValueError(f"window {self.record.window_id}: exactly one of arrays and error must be set")



class CacheWriter:
    """Writes shards and manifest fragments of one cache (one instance per worker is fine)."""

    def __init__(self, path: str | Path, config: CacheConfig, storage_options: Mapping[str, Any] | None = None) -> None:
        config.validate()
        self.location = CacheLocation(path, storage_options)
        self.config = config

    def initialize(self) -> None:
        """Refuse to write into a cache whose ``cache.json`` has a different identity.

        Nothing is written here: ``cache.json`` is written by the first shard commit
        (:meth:`write_shard`), so a run that fails before committing leaves no config behind. The
        comparison covers everything that changes the cached values, their meaning or their layout
        (:data:`~cameo_corr.cache.config.COMPARED_FIELDS`: schema version, grid, tau, backend and crop,
        the number of views and the dataset without its root); ``created_by`` may differ. A version 1
        cache is refused with a hint to migrate.
        """
        check_compatible(read_existing_config(self.location), self.config, where=self.location.url(CONFIG_FILE))

    def done_window_ids(self) -> "pa.Array":
        """Ids of windows that already have a manifest row (ok or failed), as a pyarrow string array."""
        return read_manifest(self.location, columns=["window_id"]).column("window_id").combine_chunks()

    def remove_orphans(self) -> list[str]:
        """Delete what killed workers left behind (:func:`~cameo_corr.cache.manifest.find_orphans`);
        returns the removed relative paths. Call this only when no other writer of this cache is running."""
        removed = find_orphans(self.location)
        for rel in removed:
            self.location.remove(rel)
        return removed

    def repair_missing_shards(self, referenced: Iterable[str] | None = None) -> list[str]:
        """Forget the shards whose ok manifest rows point at a missing shard file (one listing of
        ``shards/``): their rows are removed (:func:`drop_shards`), so a run redoes their windows.
        ``referenced`` (the shard ids of the ok rows, e.g. :attr:`DoneWindows.shards
        <cameo_corr.cache.done.DoneWindows.shards>` of a read already made) saves reading the
        ``shard`` column again. Returns the shard ids."""
        import pyarrow.compute as pc

        present = stored_shard_ids(self.location)
        if referenced is None:
            referenced = pc.unique(read_manifest(self.location, columns=["shard"]).column("shard").drop_null()).to_pylist()
        missing = sorted(s for s in referenced if s not in present)
        drop_shards(self.location, missing)
        return missing

    def drop_failed_rows(self) -> list[str]:
        """Supersede the failed rows before their windows are retried
        (:func:`~cameo_corr.cache.consolidation.drop_failed_rows`); returns the dropped window ids."""
        return drop_failed_rows(self.location)

    def consolidate(self, *, full: bool = False) -> dict[str, Any]:
        """Move the manifest fragments into the sorted Parquet manifest (:func:`consolidate_manifest`)."""
        return consolidate_manifest(self.location, full=full)

    def _finished_rows(self, shard_id: str, outcomes: Sequence[WindowOutcome]) -> "pa.Table | None":
        """The manifest rows of a shard that already has a fragment or a consolidated entry (for a
        consolidated shard: the rows of ``outcomes``' windows; shard ids hash their window ids)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if self.location.exists(fragment_path(shard_id)):
            try:
                return read_manifest_file(self.location, fragment_path(shard_id))
            except FileNotFoundError:  # consolidated meanwhile: consolidated.json lists it now
                pass
        if shard_id in read_consolidation(self.location)["fragments"]:
            ids = [o.record.window_id for o in outcomes]
            table = read_manifest(self.location, filter=pc.field("window_id").isin(ids))
            if table.num_rows == 0:  # all its rows were dropped (repair, retry of failed windows): redo it
                return None
            order = {w: i for i, w in enumerate(ids)}
            got = table.column("window_id").to_pylist()
            return table.take(pa.array(sorted(range(len(got)), key=lambda i: order[got[i]]), pa.int64()))
        return None

    def write_shard(self, shard_id: str, outcomes: Sequence[WindowOutcome]) -> "pa.Table":
        """Write one shard (its ok windows) and then its manifest fragment; return the fragment rows.

        Failed windows get a row with their error, ``shard``/``row``/``shard_bytes`` null and NaN
        fractions. The first commit into a new cache writes ``cache.json`` (before the fragment, so no
        fragment exists without it; concurrent first commits of one job write the same bytes). A shard
        that already has manifest rows is finished: nothing is written and its rows are returned (an
        actor retried after finishing), unless those rows are ok and the shard file is missing (a killed
        job's writer committed the rows after the next job swept the file as an orphan): the file is then
        written again from ``outcomes`` when they are the same windows in the same rows. A stale shard
        file without rows is replaced.
        """
        import pyarrow as pa

        finished = self._finished_rows(shard_id, outcomes)
        if finished is not None:
            self._restore_missing_file(shard_id, finished, outcomes)
            return finished
        ok = [o for o in outcomes if o.arrays is not None]
        nbytes = self._write_group(shard_id, ok) if ok else None
        if not self.location.exists(CONFIG_FILE):  # the first commit of a new cache
            self.location.write_bytes_atomic(CONFIG_FILE, self.config.to_json().encode())
        rows = []
        row_of = {o.record.window_id: r for r, o in enumerate(ok)}
        for o in outcomes:
            rec = o.record
            valid_frac, mask_frac = window_fractions(o.arrays) if o.arrays is not None else (math.nan, math.nan)
            rows.append(
                {
                    "window_id": rec.window_id,
                    "dataset": rec.dataset,
                    "split": rec.split,
                    "scene_id": rec.scene_id,
                    "frame_ids": rec.frame_ids,
                    "image_paths": rec.image_paths,
                    "shard": shard_id if o.arrays is not None else None,
                    "row": row_of.get(rec.window_id),
                    "num_views": rec.num_views,
                    "valid_frac": valid_frac,
                    "mask_frac": mask_frac,
                    "status": "ok" if o.arrays is not None else "failed",
                    "error": o.error,
                    "shard_bytes": nbytes if o.arrays is not None else None,
                }
            )
        table = pa.Table.from_pylist(rows, schema=manifest_schema())
        self.location.write_bytes_atomic(fragment_path(shard_id), parquet_bytes(table, MANIFEST_ROW_GROUP))
        return table

    def _restore_missing_file(self, shard_id: str, finished: "pa.Table", outcomes: Sequence[WindowOutcome]) -> None:
        """Write the file of a finished shard whose ok rows point at a missing file, from ``outcomes``
        when their ok windows are the rows' windows in the rows' order (else leave it to the next run's
        repair of missing shard files)."""
        import pyarrow.compute as pc

        ok_rows = finished.filter(pc.equal(finished.column("status"), "ok"))
        if not ok_rows.num_rows or self.location.exists(shard_dir(shard_id)):
            return
        by_row = ok_rows.sort_by("row").column("window_id").to_pylist()
        ok = [o for o in outcomes if o.arrays is not None]
        if [o.record.window_id for o in ok] == by_row:
            self._write_group(shard_id, ok)

    def _write_group(self, shard_id: str, ok: Sequence[WindowOutcome]) -> int:
        """Validate the ok windows, write the shard file under a temporary name, rename it into place;
        returns its size in bytes."""
        cfg = self.config
        for o in ok:
            for grid in cfg.grids:
                keys = cfg.array_keys(grid)
                where = f"window {o.record.window_id}" + (f", grid {grid[0]}x{grid[1]}" if cfg.extra_grids else "")
                missing = [k for k in keys.values() if k not in o.arrays]  # type: ignore[operator]
                if missing:
                    raise SchemaError(missing[0], "missing", where=where)
                validate_window_arrays({n: o.arrays[k] for n, k in keys.items()}, cfg.views, grid, where=where)  # type: ignore[index]
            if cfg.images is not None:
                validate_image_arrays(o.arrays, cfg.views, where=f"window {o.record.window_id}")  # type: ignore[arg-type]
        data = {key: _stack(key, [o.arrays[key] for o in ok]) for key in cfg.stored_keys()}  # type: ignore[index]
        blob = shard_zip_bytes(shard_id, shard_window_meta([o.record for o in ok]), data, self.config)
        self.location.write_bytes_atomic(shard_dir(shard_id), blob)
        return len(blob)


def _stack(key: str, values: Sequence[np.ndarray]) -> np.ndarray:
    """The ``[W, ...]`` array of ``key`` of a shard's windows; the encoded views (``images``, whose last
    axis is each window's longest view) are zero padded to the shard's longest."""
    longest = max(v.shape[-1] for v in values)
    if key == "images" and any(v.shape[-1] != longest for v in values):
        values = [np.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, longest - v.shape[-1])]) for v in values]
    return np.stack(values)


__all__ = ["WindowOutcome", "CacheWriter"]
