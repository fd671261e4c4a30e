"""Manifest columns: one row per window (``<cache>/manifest/*.parquet``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cameo_corr.schemas.cache import SCHEMA_VERSION

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pyarrow as pa

MANIFEST_COLUMNS: tuple[tuple[str, str], ...] = (
    ("window_id", "string"),
    ("dataset", "string"),
    ("split", "string"),
    ("scene_id", "string"),
    ("frame_ids", "list<string>"),
    ("image_paths", "list<string>"),
    ("shard", "string"),
    ("row", "int32"),
    ("num_views", "int32"),
    ("valid_frac", "float32"),
    ("mask_frac", "float32"),
    ("status", "string"),
    ("error", "string"),
    ("shard_bytes", "int64"),
)
"""Manifest columns (one row per window) as ``(name, arrow type)``; ``error`` is null when ok.

``shard_bytes`` (version 2) is the size of the window's shard file, recorded when it was written (null
for failed rows and in version 1 manifests), so ``cache stats`` need not walk the shards."""


WINDOW_STATUSES = ("ok", "failed")



def manifest_schema() -> "pa.Schema":
    """The pyarrow schema of a manifest fragment (``<cache>/manifest/part-*.parquet``)."""
    import pyarrow as pa

    types = {
        "string": pa.string(), "list<string>": pa.list_(pa.string()), "int32": pa.int32(), "int64": pa.int64(),
        "float32": pa.float32(),
    }
    return pa.schema(
        [pa.field(name, types[t], nullable=name in ("error", "shard", "row", "shard_bytes")) for name, t in MANIFEST_COLUMNS],
        metadata={b"cameo_corr_schema_version": str(SCHEMA_VERSION).encode()},
    )


__all__ = ["MANIFEST_COLUMNS", "WINDOW_STATUSES", "manifest_schema"]
