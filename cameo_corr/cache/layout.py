"""The files of a cache: names and paths (SPEC section 4, schema version 2; version 1 still read).

::

    <cache>/cache.json                          written once (first shard commit); its identity is checked by every writer
    <cache>/lease.json                          the job writing the cache (one writer at a time, renewed while it runs)
    <cache>/lease.json.lock                     local caches only: the lock under which the lease file is swapped
    <cache>/shards/<shard_id>.zarr.zip          one zip file per shard: a zarr v3 group of its ok windows (version 1: a
                                                <shard_id>.zarr directory)
    <cache>/manifest/part-<shard_id>.parquet    one fragment per shard, written LAST (tmp name + rename)
    <cache>/manifest/compact-<gen>-<k>.parquet  consolidated fragments: parts, each sorted by window_id
    <cache>/manifest/consolidated.json          which parts (compact files) are current, which fragments they hold

Every file is written under a temporary name (:data:`TMP_PREFIX`) and renamed into place, so a reader
never sees half a file; temporary names left by a killed writer are orphans (:func:`~cameo_corr.cache.manifest.find_orphans`).
The shard format is :mod:`cameo_corr.cache.shard`, the manifest's :mod:`cameo_corr.cache.manifest`.
"""

from __future__ import annotations

from cameo_corr.schemas import SCHEMA_VERSION

CONFIG_FILE = "cache.json"
SHARDS_DIR = "shards"
MANIFEST_DIR = "manifest"
CONSOLIDATED_FILE = f"{MANIFEST_DIR}/consolidated.json"
TMP_PREFIX = ".tmp-"

SHARD_SUFFIXES = {1: ".zarr", 2: ".zarr.zip"}
"""File name suffix of a finished shard per schema version (directory group in 1, zip file in 2)."""



def shard_dir(shard_id: str, version: int = SCHEMA_VERSION) -> str:
    """Relative path of a finished shard: ``shards/<id>.zarr.zip`` (version 1: the ``.zarr`` directory)."""
    return f"{SHARDS_DIR}/{shard_id}{SHARD_SUFFIXES[version]}"


def shard_id_of_name(name: str) -> str | None:
    """The shard id of a finished shard entry name in ``shards/`` (``None`` for anything else)."""
    if name.startswith(TMP_PREFIX):
        return None
    for suffix in (".zarr.zip", ".zarr"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def fragment_path(shard_id: str) -> str:
    """Relative path of a shard's manifest fragment."""
    return f"{MANIFEST_DIR}/part-{shard_id}.parquet"


def fragment_shard(name: str) -> str:
    return name[len("part-") : -len(".parquet")]


def is_fragment(name: str) -> bool:
    """Whether ``name`` (an entry of ``manifest/``) is a shard's manifest fragment."""
    return name.startswith("part-") and name.endswith(".parquet")


__all__ = [
    "CONFIG_FILE",
    "SHARDS_DIR",
    "MANIFEST_DIR",
    "CONSOLIDATED_FILE",
    "TMP_PREFIX",
    "SHARD_SUFFIXES",
    "shard_dir",
    "shard_id_of_name",
    "fragment_path",
    "fragment_shard",
    "is_fragment",
]
