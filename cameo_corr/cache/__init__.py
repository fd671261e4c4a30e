"""The correspondence cache (SPEC section 4): one module per part of the format and per job on it.

The format, bottom up:

* :mod:`.layout`: the files of a cache (``cache.json``, ``shards/``, ``manifest/``, the lease) and their names;
* :mod:`.location`: where a cache lives (a directory or any fsspec URL) and the file operations it needs;
* :mod:`.config`: ``cache.json``, read once per command, and the identity every writer must share;
* :mod:`.shard`: one zip file per shard holding a checksummed zarr v3 group of its windows;
* :mod:`.manifest`: one row per window; fragments, consolidated parts, the numpy index of a reader;
* :mod:`.consolidation`: fragments into sorted parts (also while a job runs), and row removal.

Jobs on a cache:

* :mod:`.writer`: :class:`CacheWriter`, a shard and then its manifest fragment per commit;
* :mod:`.lease`: one writer per cache;
* :mod:`.reader`: :class:`CorrCache`, the read API of the job's and the trainer's consumers;
* :mod:`.select` (subsets by manifest predicate), :mod:`.merge` (unions), :mod:`.migrate` (version 1 -> 2);
* :mod:`.stats`, :mod:`.verify`, :mod:`.viz` and :mod:`.cli`: ``cameo-corr cache stats|verify|viz|compact|migrate|merge``.

Life cycle: a window is *done* only once its manifest row exists. Re-runs skip done windows, never
rewrite a finished shard, and redo whatever a killed worker left (orphans). Reading one::

    from cameo_corr.cache import CorrCache
    cache = CorrCache("caches/re10k")           # or an fsspec URL: s3://bucket/cache
    arrays = cache.window(cache.window_ids()[0])

Importing this package is light (no zarr, pyarrow or torch until a cache is opened).
"""

from cameo_corr.cache.config import CacheMismatchError, read_config
from cameo_corr.cache.location import CacheLocation
from cameo_corr.cache.reader import CorrCache, WindowIds
from cameo_corr.cache.select import WindowSelection
from cameo_corr.cache.shard import CorruptCacheError
from cameo_corr.cache.writer import CacheWriter, WindowOutcome

__all__ = [
    "CacheLocation",
    "CacheMismatchError",
    "CacheWriter",
    "CorrCache",
    "WindowIds",
    "CorruptCacheError",
    "WindowOutcome",
    "WindowSelection",
    "read_config",
]
