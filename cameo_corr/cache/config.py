"""``cache.json``: reading it, and the identity every writer of a cache must share.

``cache.json`` is written by the first shard commit (:meth:`~cameo_corr.cache.writer.CacheWriter.write_shard`,
before that shard's fragment), never by a run that fails before committing anything; a run only
*checks* an existing one. Its identity (:data:`COMPARED_FIELDS`) leaves out the dataset root
(:data:`IDENTITY_EXCLUDED`): the same data read from a moved root is the same cache.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Sequence

from cameo_corr.cache.layout import CONFIG_FILE
from cameo_corr.schemas import CacheConfig, DatasetError, SchemaError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from cameo_corr.cache.location import CacheLocation
    from cameo_corr.cache.reader import CorrCache


class CacheMismatchError(SchemaError):
    """A run's config differs from the ``cache.json`` of the cache it would write into."""


def read_config(location: CacheLocation) -> CacheConfig:
    """Parse ``cache.json``; errors name the file and the field."""
    where = location.url(CONFIG_FILE)
    if not location.exists(CONFIG_FILE):
        if not location.exists():
            bucket = location.missing_bucket()
            raise DatasetError(location.display, f"no such bucket: {bucket}" if bucket else "no such cache directory")
        raise DatasetError(where, "not a cameo-corr cache: cache.json is missing" + _creating_job(location))
    return CacheConfig.from_json(location.read_bytes(CONFIG_FILE).decode(), where=where)


def _creating_job(location: CacheLocation) -> str:
    """What the lease file says when ``cache.json`` is missing: a job writes ``cache.json`` with its first
    shard, so until then its cache has a lease and no config; a job that ended before that left one."""
    from cameo_corr.cache.lease import LEASE_FILE, lease_age, lease_over, read_lease

    lease = read_lease(location)
    if lease is None:
        return ""
    over = lease_over(lease)
    if over is not None:
        return (f"; {LEASE_FILE} was left by a job that ended before writing it ({lease.get('holder', 'unknown')}: {over}); "
                "re-running preprocess takes the lease over")
    return (f"; {LEASE_FILE} names a job creating it ({lease.get('holder', 'unknown')}, lease renewed {lease_age(lease):.0f} s ago), "
            "which writes cache.json with its first shard: retry then")


def read_existing_config(location: "CacheLocation") -> CacheConfig | None:
    """``cache.json`` of the cache at ``location``, or ``None`` when there is none yet (a new cache)."""
    return read_config(location) if location.exists(CONFIG_FILE) else None


def _plain_json(value: Any) -> Any:
    """``value`` after a JSON round trip (tuples become lists), for comparing configs."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


COMPARED_FIELDS = ("schema_version", "grid", "extra_grids", "tau", "views", "crop", "dataset", "backend", "images")
"""``cache.json`` fields that must agree between a cache and a run writing into it (its identity)."""


IDENTITY_EXCLUDED: dict[str, tuple[str, ...]] = {"dataset": ("root",)}
"""Keys of :data:`COMPARED_FIELDS` entries that are recorded but not compared: the dataset root (a cache
resumed from a moved copy of the dataset stays the same cache; ``cache.json`` keeps the first root)."""


def identity_value(config: CacheConfig, name: str) -> Any:
    """The compared value of field ``name`` of ``config`` (JSON round trip, excluded keys dropped)."""
    value = _plain_json(getattr(config, name))
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if k not in IDENTITY_EXCLUDED.get(name, ())}
    return value


def check_compatible(existing: CacheConfig | None, config: CacheConfig, fields: Sequence[str] = COMPARED_FIELDS, *,
                     where: str = CONFIG_FILE) -> None:
    """Raise :class:`CacheMismatchError` (naming ``where``, the cache's ``cache.json``) if ``existing``
    differs from ``config`` in any of ``fields``; a cache without ``cache.json`` (``existing`` is
    ``None``) is compatible with anything."""
    if existing is None:
        return
    diffs = [(f, identity_value(existing, f), identity_value(config, f)) for f in fields
             if identity_value(existing, f) != identity_value(config, f)]
    if diffs:
        raise mismatch_error(diffs, where, hint="convert the cache with `cameo-corr cache migrate` or write to a new --out"
                             if diffs[0][0] == "schema_version" and existing.schema_version < config.schema_version else None)


def mismatch_error(diffs: Sequence[tuple[str, Any, Any]], where: str, *, field: str | None = None,
                   hint: str | None = None) -> CacheMismatchError:
    """The error refusing to mix configs: ``diffs`` are ``(name, the cache's value, this run's value)``;
    ``field`` (default: the first name) is the error's field."""
    detail = "; ".join(f"{f}: cache has {theirs}, this run has {mine}" for f, theirs, mine in diffs)
    return CacheMismatchError(field or diffs[0][0], f"refusing to mix configs in one cache ({detail}); "
                              f"{hint or 'write to a new --out'}", where=where)


def check_same_identity(caches: Sequence["CorrCache"]) -> None:
    """Raise :class:`CacheMismatchError` naming the first ``cache.json`` field
    (of :data:`COMPARED_FIELDS`) whose value differs, both values and both caches."""
    first = caches[0]
    for other in caches[1:]:
        for name in COMPARED_FIELDS:
            a, b = identity_value(first.config, name), identity_value(other.config, name)
            if a != b:
                raise CacheMismatchError(name, f"caches differ: {first.location.display} has {json.dumps(a)}, "
                                         f"{other.location.display} has {json.dumps(b)}; only caches of one config can be merged",
                                         where=other.location.url(CONFIG_FILE))


__all__ = [
    "CacheMismatchError",
    "read_config",
    "read_existing_config",
    "COMPARED_FIELDS",
    "IDENTITY_EXCLUDED",
    "identity_value",
    "check_compatible",
    "mismatch_error",
    "check_same_identity",
]
