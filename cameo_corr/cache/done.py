"""What a resumed job needs from the manifest, read once: the done window ids and the shards in use.

:class:`DoneWindows` reads the ``window_id`` and ``shard`` columns a batch at a time
(:func:`~cameo_corr.cache.kway.manifest_batches`) into a sorted fixed-width numpy array of ids (16
bytes per window, no Python object or hash set per window) and the set of shard ids that ok rows point
at (about one per 64 windows). Planned windows are then filtered by binary search
(:meth:`DoneWindows.contains`), so the cost grows with the number of windows, not with an ``is_in``
value set. Pending fragments are read for these two columns only, which they store uncompressed (a
never-consolidated cache: about 0.25 ms of CPU per fragment file, the fixed cost of opening a Parquet
file); merging them first measured ~4x slower at a million windows, and the job's first periodic round
merges them anyway, streamed, while its workers start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import numpy as np

from cameo_corr.cache.kway import manifest_batches
from cameo_corr.cache.manifest import distinct_sorted, id_array, id_keys, ids_of_keys, sorted_member

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pyarrow as pa

    from cameo_corr.cache.location import CacheLocation


class DoneWindows:
    """The ids of the windows with a manifest row (ok or failed), sorted, and the shards of the ok rows.

    :attr:`ids` holds ``uint64`` keys when every id is 16 hex digits (:func:`~cameo_corr.cache.manifest.id_keys`),
    the fixed-width ids otherwise."""

    def __init__(self, ids: np.ndarray | None = None, shards: set[str] | None = None) -> None:
        self.ids = np.zeros(0, dtype="S1") if ids is None else ids
        self.shards = set() if shards is None else shards

    @classmethod
    def read(cls, location: "CacheLocation") -> "DoneWindows":
        """One pass over the ``window_id`` and ``shard`` columns of the manifest of ``location``."""
        import pyarrow.compute as pc

        ids: list[np.ndarray] = []
        shard_keys: list[np.ndarray] = []  # hex shard ids as uint64 keys (a batch of a sorted part spans most shards)
        shards: set[str] = set()
        for table in manifest_batches(location, ["window_id", "shard"]):
            if table.num_rows:
                ids.append(id_array(table.column("window_id")))
                present = table.column("shard").combine_chunks().drop_null()
                keys = id_keys(id_array(present)) if len(present) else np.zeros(0, np.uint64)
                if keys.dtype == np.uint64:
                    shard_keys.append(distinct_sorted(keys))
                else:
                    shards.update(pc.unique(present).to_pylist())
        if shard_keys:
            shards.update(ids_of_keys(distinct_sorted(np.concatenate(shard_keys))).astype("U16").tolist())
        if not ids:
            return cls(None, shards)
        done = id_keys(np.concatenate(ids))  # hex ids as uint64 keys: 8 bytes each, radix-sorted
        del ids
        done.sort(kind="stable")
        return cls(done, shards)

    def __len__(self) -> int:
        return len(self.ids)

    def contains(self, window_ids: "pa.Array | pa.ChunkedArray") -> np.ndarray:
        """Whether each of ``window_ids`` is done (a boolean numpy array)."""
        return _member(id_keys(id_array(window_ids)), self.ids)

    def todo(self, planned: "pa.Table") -> "pa.Table":
        """The rows of ``planned`` whose ``window_id`` is not done, in their order."""
        import pyarrow as pa

        if not planned.num_rows:
            return planned
        return planned.filter(pa.array(~self.contains(planned.column("window_id"))))

    def forget(self, window_ids: Iterable[str]) -> None:
        """Take ``window_ids`` out of the done set (their rows were dropped: they are to be redone)."""
        import pyarrow as pa

        gone = list(window_ids)
        if gone and len(self.ids):
            self.ids = self.ids[~_member(self.ids, np.sort(id_keys(id_array(pa.array(gone, pa.string()))), kind="stable"))]


def _member(asked: np.ndarray, table: np.ndarray) -> np.ndarray:
    """:func:`~cameo_corr.cache.manifest.sorted_member` of ids or keys; where one side holds ``uint64``
    keys and the other ids that are not all hex, both are compared as ids."""
    if asked.dtype != table.dtype:
        asked = ids_of_keys(asked) if asked.dtype == np.uint64 else asked
        table = ids_of_keys(table) if table.dtype == np.uint64 else table
    return sorted_member(asked, table)


__all__ = ["DoneWindows"]
