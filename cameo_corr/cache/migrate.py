"""Version 1 -> version 2: ``cameo-corr cache migrate OLD --out NEW``.

Version 1 caches (one zarr *directory* per shard, fragments only, no checksums) stay readable;
:func:`migrate_cache` converts one into a version 2 cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from cameo_corr.cache.consolidation import write_compact
from cameo_corr.cache.layout import CONFIG_FILE, MANIFEST_DIR, fragment_shard, shard_dir
from cameo_corr.cache.location import CacheLocation
from cameo_corr.cache.manifest import fragment_names
from cameo_corr.cache.reader import CorrCache
from cameo_corr.cache.shard import shard_zip_bytes
from cameo_corr.schemas import SCHEMA_VERSION, DatasetError, SchemaError, manifest_schema


def migrate_cache(src: str | Path, dst: str | Path, *, storage_options: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Convert a version 1 cache into a new version 2 cache at ``dst`` (``src`` is left untouched).

    Every shard is re-read (decoding checks it) and rewritten as one checksummed zip file with the
    same rows; manifest rows are kept (values, window ids, ``row``) with ``shard_bytes`` added, and
    the manifest is consolidated. ``cache.json`` is written last. Returns counts.
    """
    import dataclasses

    import pyarrow as pa

    old = CorrCache(src, dict(storage_options or {}) or None)
    if old.version != 1:
        raise SchemaError("schema_version", f"only version 1 caches need migrating, this one is version {old.version}",
                          where=old.location.url(CONFIG_FILE))
    config = dataclasses.replace(old.config, schema_version=SCHEMA_VERSION)
    out = CacheLocation(dst, storage_options)
    if out.exists(CONFIG_FILE) or out.listdir(MANIFEST_DIR):
        raise DatasetError(out.url(), "migration target already holds a cache; choose a new directory")
    out.check_writable("out")
    table = old.manifest(None)
    sizes: dict[str, int] = {}
    shards = sorted(s for s in set(table.column("shard").to_pylist()) if s is not None)
    for shard_id in shards:
        meta = old.shard_windows(shard_id)
        data = old.read_shard(shard_id)
        blob = shard_zip_bytes(shard_id, meta, data, config)
        out.write_bytes_atomic(shard_dir(shard_id), blob)
        sizes[shard_id] = len(blob)
    shard_col = table.column("shard").to_pylist()
    table = table.set_column(
        table.schema.get_field_index("shard_bytes"), manifest_schema().field("shard_bytes"),
        pa.array([sizes.get(s) if s is not None else None for s in shard_col], pa.int64()),
    )
    fragments = [fragment_shard(n) for n in fragment_names(old.location)]
    write_compact(out, table, {"files": [], "fragments": []}, fragments)  # sorted by window_id
    out.write_bytes_atomic(CONFIG_FILE, config.to_json().encode())
    return {"shards": len(shards), "windows": table.num_rows}


__all__ = ["migrate_cache"]
