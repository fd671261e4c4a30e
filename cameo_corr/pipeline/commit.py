"""The commit stage of the preprocessing pipeline: a Ray Data ``Datasink`` writing whole shards.

Kept apart from :mod:`cameo_corr.pipeline.ray_job` so that the command line does not import Ray Data
(only a run does).
"""

from __future__ import annotations

import math
import pickle
import time
from typing import Any, Iterable, Mapping

from ray.data import Datasink

from cameo_corr.schemas import CameoCorrError


class FailFastStop(CameoCorrError):
    """``--fail-fast``: a committed shard holds a failed window; stop the job."""


class ShardSink(Datasink):
    """Commits each write task's rows as one shard (``min_rows_per_write`` = shard size) with the cache's
    protocol; the last write of a run may be smaller. A retried write task finds its fragment and
    commits nothing twice (:meth:`CacheWriter.write_shard` is idempotent per shard id, and the shard id
    is the hash of its window ids)."""

    def __init__(self, out: str, storage_options: Mapping[str, Any] | None, config_json: str, shard_size: int,
                 fail_fast: bool, progress: Any = None) -> None:
        self.out = out
        self.storage_options = dict(storage_options or {}) or None
        self.config_json = config_json
        self.shard_size = shard_size
        self.fail_fast = fail_fast
        self.progress = progress
        self.results: list[dict[str, Any]] = []

    @property
    def min_rows_per_write(self) -> int:
        return self.shard_size

    def get_name(self) -> str:
        return "CommitShards"

    def write(self, blocks: Iterable[Any], ctx: Any) -> dict[str, Any]:
        """Commit one shard; return its counts, stage seconds, bytes and actor ready time."""
        import pyarrow as pa
        from ray.data.block import BlockAccessor

        from cameo_corr.pipeline.cache import CacheWriter, WindowOutcome, fragment_path, shard_dir
        from cameo_corr.pipeline.planner import shard_id_of
        from cameo_corr.schemas import CacheConfig

        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        rows = pa.concat_tables(tables).to_pylist() if tables else []
        if not rows:
            return {"ok": 0, "failed": 0, "shards": 0, "bytes": 0, "stages": dict.fromkeys(("read", "backend", "match", "write"), 0.0), "ready": math.inf}
        outcomes = [
            WindowOutcome(pickle.loads(r["record"]), arrays=pickle.loads(r["arrays"])) if r["arrays"] is not None
            else WindowOutcome(pickle.loads(r["record"]), error=r["error"])
            for r in rows
        ]
        writer = CacheWriter(self.out, CacheConfig.from_json(self.config_json), self.storage_options)
        shard_id = shard_id_of([o.record.window_id for o in outcomes])
        t0 = time.perf_counter()
        writer.write_shard(shard_id, outcomes)
        write_s = time.perf_counter() - t0
        loc = writer.location
        failed = sum(1 for o in outcomes if o.error is not None)
        result = {
            "ok": len(outcomes) - failed,
            "failed": failed,
            "shards": 1,
            "bytes": loc.disk_usage(shard_dir(shard_id)) + loc.disk_usage(fragment_path(shard_id)),
            "stages": {"read": sum(r["read_seconds"] for r in rows), "backend": sum(r["backend_seconds"] for r in rows),
                       "match": sum(r["match_seconds"] for r in rows), "write": write_s},
            "ready": min(r["ready_time"] for r in rows),
        }
        if self.progress is not None:
            self.progress.add.remote(result["ok"], failed)
        if self.fail_fast and failed:
            first = next(o for o in outcomes if o.error is not None)
            raise FailFastStop(f"--fail-fast: window {first.record.window_id} failed ({first.error}); shard {shard_id} committed")
        return result

    def on_write_complete(self, write_result: Any) -> None:
        self.results = list(write_result.write_returns)


class ProgressCounter:
    """Windows committed so far (a tiny actor on the driver's node the commit tasks report to)."""

    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0

    def add(self, ok: int, failed: int) -> None:
        self.ok += ok
        self.failed += failed

    def get(self) -> tuple[int, int]:
        return self.ok, self.failed


__all__ = ["FailFastStop", "ShardSink", "ProgressCounter"]
