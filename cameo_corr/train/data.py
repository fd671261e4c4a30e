"""Streaming training data from a correspondence cache (no online geometry).

:class:`CorrStreamDataset` is an ``IterableDataset`` over the ``ok`` windows of a cache manifest. Its
sample order is a pure function of ``(seed, epoch)``, computed from the manifest alone:

1. the shards are shuffled (shard-level shuffle, so reads stay sequential within a shard);
2. the windows are shuffled by ``window_shuffle`` (:data:`~cameo_corr.train.config.WINDOW_SHUFFLES`):
   ``block`` (default, :func:`block_order`) cuts the shuffled shards into blocks of ``shuffle_shards``
   shards and permutes each block's windows uniformly, so a process holds ``shuffle_shards`` decoded
   shards and decodes each shard once per epoch; ``buffer`` (the previous policy, :func:`epoch_order`)
   streams them, shard after shard, through a seeded shuffle buffer of ``shuffle_buffer`` slots;
3. the epoch order is padded by wrapping to a multiple of ``world_size`` (as ``DistributedSampler``
   does, so every rank sees the same number of samples) and rank ``r`` takes every ``world_size``-th
   window starting at ``r``;
4. with ``num_workers=N > 1`` (the DataLoader workers that will read the stream) the rank's epoch order is
   dealt to ``N`` lanes (:func:`deal_to_lanes`): counting batches (or single samples) from the rank's
   stream position 0, batch ``j`` belongs to lane ``j % N``, and lane ``i`` takes the ``i``-th of ``N``
   consecutive stretches of the epoch order, so each lane runs through its own blocks of shards.
   ``num_workers`` 0 and 1 leave the order as it is; any other worker count is part of the order;
5. a rank's stream is cut into batches (or single samples) that the DataLoader workers take round-robin,
   which is the order in which ``DataLoader`` returns them, so the loader yields the rank's stream in
   order whatever the number of workers. When the dataset's ``num_workers`` is the loader's, worker
   ``w`` reads one lane only and decodes each of its shards about once per epoch (without the lanes
   every worker reads every block and decodes nearly every shard once per epoch).

**Mixtures** (several caches, ``data.caches: [{path, weight, tag}]``): an epoch has as many samples as
the caches have selected windows in total, ``N = sum_k n_k``; cache ``k`` contributes
``c_k = N * w_k / sum(w)`` of them (largest-remainder rounding, :func:`mixture_counts`), so ``weight``
is the share of samples drawn from a cache per epoch. Each cache cycles through its own endless
stream of passes (pass ``p`` is step 1-2 above over that cache's shards, seeded per cache), and epoch
``e`` takes the samples ``e * c_k ... (e + 1) * c_k - 1`` of it: weights proportional to the sizes
visit every window once per epoch, a heavier weight repeats a cache's windows, a lighter one spreads
a pass over several epochs. The epoch's slots are then assigned to caches by a seeded shuffle
(``(seed, epoch)``), and steps 3-5 follow unchanged; the order stays a pure function of ``(seed,
epoch)``, so resuming is exact. A sample's ``tag`` is its entry's ``tag`` when set. Caches must agree
on the token grid (and on ``tau`` when their stored masks are used): :func:`check_mixture`.

Which ``F`` of the window's ``S`` views a sample takes is drawn from a generator keyed by ``(seed, epoch,
index in the padded epoch order)``. How many references and in which order (:func:`reference_order`)
is drawn once per batch by default (``order_scope="batch"``, as CAMEO's training code does): from a
generator keyed by ``(seed, g)`` with ``g`` the position of the batch's first sample in this rank's
stream (``epoch * epoch_length + position``), so every sample of a batch shares it, the batch at a given
step draws the same on every rank (the official ranks seed Python's ``random`` alike) and after a
resume. With ``order_scope="sample"`` each sample draws its own, keyed like its views. Nothing depends
on workers or on how far the stream was read before. The state of a stream is ``(epoch, position)``
with ``position`` counted in samples of this rank;
:class:`StreamLoader` wraps the ``DataLoader``, counts what was consumed and offers
``state_dict``/``load_state_dict`` so a resumed run yields exactly the remaining samples, in order.

Images are loaded from the dataset root through the cache's reader with the cache's canonical view
(same crop box as the pipeline) resized directly to the training resolution, so the cached token grid
lines up with the pixels. A self-contained cache (``preprocess --store-images``) holds each window's
canonical views and their dataset cameras: they are decoded from the shard (read with the shard's
other arrays) and resized to the training resolution, and no dataset root is needed; a ``dataset_root``
given explicitly still reads the images from there. The ``F x F`` block of ``nn``/``mask``/``dist`` is gathered and frames are
reordered ``[references, targets]``; the same permutation is applied to every per-view axis and both
view axes of the per-pair tensors (``nn`` values stay token indices of the key view).

Output per sample (SPEC section 5): ``image`` float32 ``[F, 3, H, W]`` in ``[0, 1]``, ``intrinsic``
float32 ``[F, 3, 3]`` (pixels of the training resolution), ``extrinsic`` float32 ``[F, 4, 4]``
(world-to-camera, OpenCV, from the dataset), ``tag`` (the dataset tag: the manifest's ``dataset``
mapped through ``tags``, :data:`DEFAULT_TAGS`), ``window_id`` (str), ``num_ref`` (int), ``corr_nn``
int64 ``[F, F, h*w]``, ``corr_mask`` bool ``[F, F, h*w]``, ``corr_dist`` float32 ``[F, F, h*w]``. Batches
are collated with :func:`collate_samples` to ``[B, ...]`` (``tag`` and ``window_id`` become lists,
``num_ref`` ``[B]``).

Windows are held as numpy columns, sorted by shard: per window only its row in the shard (1 byte
for shards of up to 256 windows), per shard its first window, cache and number of views; no Python
object per window, so ten million windows pickle into each DataLoader worker in about 10 MB (sent once
per iteration of a :class:`StreamLoader`, which streams every epoch of a run). A worker reads a shard
once per visit: the ``nn``/``mask``/``dist`` arrays of all its windows are decoded together and kept
for the next windows of the same shard (the shards of the current block, per cache: an LRU of
:attr:`CorrStreamDataset.shard_visits`), with the windows' ids, scenes and frame ids from the shard
itself. A window whose cached bytes fail their checksum raises
:class:`~cameo_corr.cache.shard.CorruptCacheError` (``on_corrupt="raise"``), or with
``on_corrupt="skip"`` is left out, logged and counted (:attr:`StreamLoader.corrupt_skipped`; the
training loop writes the count into every ``metrics.jsonl`` row and checkpoints it).

Reader, zarr groups and scene records are opened lazily per process (worker), and the dataset holds
only plain data, so it is safe under the ``fork`` and ``spawn`` multiprocessing contexts.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from cameo_corr.pipeline.masks import DEFAULT_VISIBILITY_TOL, check_policy, check_tau, check_visibility_tol, mask_inputs, recompute_mask
from cameo_corr.schemas import IMAGE_ARRAYS, CacheConfig, CameoCorrError, DatasetError, SchemaError, WindowRecord
from cameo_corr.train.config import ORDER_POLICIES, ORDER_SCOPES, WINDOW_SHUFFLES

if TYPE_CHECKING:  # pragma: no cover - typing only
    from cameo_corr.datasets.base import SceneReader
    from cameo_corr.datasets.canonical import CanonicalView
    from cameo_corr.cache.local_cache import LocalShardCache
    from cameo_corr.cache.manifest import StringCodes
    from cameo_corr.cache.reader import CorrCache
    from cameo_corr.train.mixture import CacheSource

DEFAULT_SHUFFLE_PROB = 0.5
"""The official ``shuffle_train_rate``."""

DEFAULT_TAGS = {"re10k": "re10k", "re10k-chunks": "re10k", "co3d": "co3d"}
"""Manifest ``dataset`` -> batch ``tag``. The tags are the keys of the official ``domain_dict``
(``re10k`` 0, ``co3d`` 1, anything else ``others``); datasets not listed keep their own name."""

_CORR_KEYS = ("nn", "mask", "dist")
CORRUPT_POLICIES = ("raise", "skip")
"""What the stream does with a window whose cached bytes are corrupt: stop with the error, or skip it."""
SKIPPED_KEY = "corrupt_skipped"
"""Batch key: how many of the batch's stream positions were corrupt windows left out (``skip``)."""
WORKER_ERROR_KEY = "worker_error"
"""Key of the one-item batch that carries an error out of a DataLoader worker (:class:`CarryErrors`)."""

BUFFER_SHARD_VISITS = 4
"""Shard visits a process keeps per cache under ``window_shuffle="buffer"`` (as before the block shuffle)."""

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamState:
    """Where a rank's stream is: ``position`` samples of epoch ``epoch`` were already consumed."""

    epoch: int = 0
    position: int = 0


def epoch_order(
    shard_rows: Sequence[Sequence[int]], *, seed: int, epoch: int, shard_shuffle: bool = True, shuffle_buffer: int = 1
) -> np.ndarray:
    """The global order of one epoch: window indices after shard shuffle and buffer shuffle.

    ``shard_rows[k]`` lists the window indices of shard ``k`` in storage order. Shards are permuted
    (when ``shard_shuffle``), their windows streamed through a buffer of ``shuffle_buffer`` slots from
    which a uniformly random slot is emitted and refilled (``shuffle_buffer <= 1``: no buffer shuffle).
    Deterministic in ``(seed, epoch)``.
    """
    if shuffle_buffer < 0:
        raise SchemaError("shuffle_buffer", f"must be >= 0, got {shuffle_buffer}")
    shards = np.arange(len(shard_rows))
    if shard_shuffle:
        shards = np.random.default_rng([seed, epoch, 0]).permutation(len(shard_rows))
    parts = [np.asarray(shard_rows[k], dtype=np.int64) for k in shards]
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if shuffle_buffer <= 1 or len(stream) <= 1:
        return stream
    rng = np.random.default_rng([seed, epoch, 1])
    size = min(shuffle_buffer, len(stream))
    slots = rng.integers(size, size=len(stream) - size)  # the buffer is full from here on
    # Step t emits what slot ``slots[t]`` holds and refills it with ``stream[size + t]``: it holds the
    # item of the previous step that drew the same slot, or its initial item. Found for all steps at
    # once by a stable sort on the slot (same order as the sequential buffer, without a Python loop;
    # numpy's stable sort of 16-bit keys is a linear radix sort).
    steps = np.argsort(slots.astype(np.uint16) if size <= 1 << 16 else slots, kind="stable")
    drawn = slots[steps]  # slots in sorted order: runs of equal slots, each run in step order
    first = np.ones(len(steps), dtype=bool)
    first[1:] = drawn[1:] != drawn[:-1]
    previous = np.empty_like(steps)
    previous[1:] = steps[:-1] + size
    held = np.empty(len(steps), dtype=np.int64)
    held[steps] = np.where(first, drawn, previous)  # the slot's initial item, or the refill of its previous draw
    last = np.arange(size, dtype=np.int64)  # what each slot holds at the end: the refill of its last draw
    final = np.ones(len(steps), dtype=bool)
    final[:-1] = first[1:]
    last[drawn[final]] = steps[final] + size
    return np.concatenate([stream[held], stream[last[rng.permutation(size)]]])


def block_order(shard_start: np.ndarray, *, seed: int, epoch: int, shard_shuffle: bool = True, block_shards: int = 4
                ) -> np.ndarray:
    """The global order of one epoch under the block shuffle: window indices, shard by shard.

    Shard ``k`` holds the window indices ``shard_start[k]:shard_start[k + 1]``. The shards are permuted
    (when ``shard_shuffle``; the same permutation as :func:`epoch_order`'s), cut into blocks of
    ``block_shards`` consecutive shards, and the windows of each block are permuted uniformly
    (``block_shards=0``: kept in storage order). A reader holding ``block_shards`` decoded shards decodes
    each shard once. Deterministic in ``(seed, epoch)``.
    """
    if block_shards < 0:
        raise SchemaError("shuffle_shards", f"must be >= 0, got {block_shards}")
    start = np.asarray(shard_start, dtype=np.int64)
    sizes = np.diff(start)
    shards = np.arange(len(sizes))
    if shard_shuffle:
        shards = np.random.default_rng([seed, epoch, 0]).permutation(len(sizes))
    lengths = sizes[shards]
    offsets = np.cumsum(lengths) - lengths  # where each shard's windows start in the stream
    stream = np.repeat(start[shards] - offsets, lengths) + np.arange(int(lengths.sum()))
    if block_shards == 0:
        return stream
    rng = np.random.default_rng([seed, epoch, 5])
    bounds = np.append(offsets[::block_shards], len(stream)).tolist()
    for a, b in itertools.pairwise(bounds):
        stream[a:b] = stream[a:b][rng.permutation(b - a)]
    return stream


def deal_to_lanes(order: np.ndarray, *, first: int, unit: int, lanes: int) -> np.ndarray:
    """``order`` (the items at stream positions ``first, first + 1, ...``) rearranged for ``lanes`` readers
    that take units of ``unit`` positions in turn.

    The unit holding stream position ``g`` is the ``g // unit``-th and belongs to lane ``(g // unit) %
    lanes``; lane ``i``'s positions, in stream order, receive the ``i``-th of ``lanes`` consecutive
    stretches of ``order`` (each as long as the lane has positions here). A reader of one lane thus
    meets ``order``'s items in their order, from one stretch only. ``lanes <= 1``: ``order`` itself.
    """
    if lanes <= 1:
        return order
    lane = ((first + np.arange(len(order), dtype=np.int64)) // unit % lanes).astype(np.min_scalar_type(lanes - 1))
    dealt = np.empty_like(order)
    dealt[np.argsort(lane, kind="stable")] = order  # lane 0's positions take the first stretch, and so on
    return dealt


def reference_order(num_views: int, num_ref: int, policy: str, rng: np.random.Generator, shuffle_prob: float = DEFAULT_SHUFFLE_PROB) -> np.ndarray:
    """Permutation of ``range(num_views)`` putting the ``num_ref`` references first (see ORDER_POLICIES).

    ``mixed`` draws one uniform number from ``rng`` to choose ``shuffle`` (below ``shuffle_prob``) or
    ``uniform_push``; ``shuffle`` draws the permutation from ``rng``.
    """
    if not 1 <= num_ref < num_views:
        raise SchemaError("num_ref", f"must be in [1, {num_views - 1}] for {num_views} views, got {num_ref}")
    if policy == "mixed":
        if not 0.0 <= shuffle_prob <= 1.0:
            raise SchemaError("shuffle_prob", f"must be in [0, 1], got {shuffle_prob}")
        policy = "shuffle" if rng.random() < shuffle_prob else "uniform_push"
    idx = np.arange(num_views)
    if policy == "uniform_push":
        if num_ref == 1:
            refs = np.array([max(num_views // 2 - 1, 0)])
        else:
            refs = np.linspace(0, num_views - 1, num_ref).astype(np.int64)
        return np.concatenate([refs, idx[~np.isin(idx, refs)]])
    if policy == "shuffle":
        return rng.permutation(num_views)
    if policy == "capture":
        return idx
    raise SchemaError("order", f"unknown policy {policy!r}; expected one of {ORDER_POLICIES}")


def collate_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples to a batch dict ``[B, ...]`` (``tag`` and ``window_id`` become lists of strings)."""
    return default_collate(list(samples))


def mixture_counts(weights: Sequence[float], total: int) -> np.ndarray:
    """Samples drawn from each cache in one epoch of ``total`` samples: ``total * w_k / sum(w)``
    rounded by largest remainder (ties to the earlier cache), so the counts sum to ``total``."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    rest = total - int(counts.sum())
    if rest:
        counts[np.argsort(-(exact - counts), kind="stable")[:rest]] += 1
    return counts


def check_mixture(caches: Sequence["CorrCache"], grid: tuple[int, int], *, tau_matters: bool) -> None:
    """Refuse a mixture whose caches disagree on what the model reads: every cache must store the token
    ``grid`` read (the supervised layer's), and agree on ``tau`` when the supervision mask is the cycle
    mask at each cache's own ``tau`` (``tau_matters``; set ``data.tau`` to recompute every cache's mask at
    one threshold). The error names the field, both values and both caches."""
    from cameo_corr.cache.config import CacheMismatchError
    from cameo_corr.cache.layout import CONFIG_FILE

    first = caches[0]
    for other in caches[1:]:
        checks = []
        if tuple(grid) not in [tuple(g) for g in other.config.grids]:
            stored = [list(g) for g in other.config.grids]
            checks.append(("grid", list(grid), stored[0] if len(stored) == 1 else stored,
                           "the model's supervised layer reads one token grid, which every cache must store"))
        if tau_matters:
            checks.append(("tau", first.config.tau, other.config.tau, "their stored cycle masks differ; set data.tau to "
                           "recompute every cache's mask at one tau"))
        for name, a, b, why in checks:
            if a != b:
                raise CacheMismatchError(name, f"the caches of a mixture must agree ({why}): {first.location.display} has {a}, "
                                         f"{other.location.display} has {b}", where=other.location.url(CONFIG_FILE))


class _SortedCodes:
    """Codes of a string column streamed in batches, numbered in the values' sorted order (``add`` each
    batch's column, then :meth:`result`). Values of 16 hex digits (every shard id this package makes)
    are kept as their exact ``uint64`` keys, which sort as the ids do, and coded once at the end by a
    sort (no hash, no string per row); a batch with any other value (or a null) turns the coding over to
    :class:`~cameo_corr.cache.manifest.StringCodes` for every row."""

    CHUNK = 1 << 16
    """Keys searched at a time at the end (sorted first: a binary search in cache order)."""

    def __init__(self) -> None:
        self._keys: list[np.ndarray] = []
        self._strings: StringCodes | None = None

    def add(self, column: Any) -> None:
        """Take one batch's column."""
        import pyarrow as pa

        from cameo_corr.cache.manifest import (
            StringCodes,
            id_array,
            id_keys,
            ids_of_keys,
        )

        if self._strings is None and not column.null_count:
            keys = id_keys(id_array(column))
            if keys.dtype == np.uint64:
                self._keys.append(keys)
                return
        if self._strings is None:  # the batches taken so far, as their values again
            self._strings = StringCodes()
            for keys in self._keys:
                self._strings.add(pa.array(ids_of_keys(keys), pa.binary()).cast(pa.string()))
            self._keys = []
        self._strings.add(column)

    def result(self) -> tuple[np.ndarray, list[str]]:
        """``(int32 code per row, the distinct values sorted)``: code ``k`` is the ``k``-th smallest value
        (-1: null)."""
        from cameo_corr.cache.manifest import distinct_sorted, ids_of_keys

        if self._strings is not None:
            codes, names = self._strings.result()
            rank = np.argsort(np.argsort(np.array(names, dtype=str))).astype(np.int32)
            return np.append(rank, -1)[codes], sorted(names)
        keys = np.concatenate(self._keys) if self._keys else np.zeros(0, np.uint64)
        self._keys = []
        distinct = distinct_sorted(keys.copy())
        codes = np.empty(len(keys), np.int32)
        for a in range(0, len(keys), self.CHUNK):
            part = keys[a : a + self.CHUNK]
            order = np.argsort(part)
            codes[a : a + self.CHUNK][order] = np.searchsorted(distinct, part[order])
        return codes, ids_of_keys(distinct).astype(str).tolist()


def _shard_columns(batches: Iterator[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """``(shard code, row, views, shard ids)`` of manifest batches, each batch turned into numpy at once;
    shard codes index the sorted shard ids (:class:`_SortedCodes`)."""
    codes, rows, views = _SortedCodes(), [], []
    for batch in batches:
        codes.add(batch.column("shard"))
        rows.append(batch.column("row").to_numpy(zero_copy_only=False).astype(np.int32))
        views.append(batch.column("num_views").to_numpy(zero_copy_only=False).astype(np.int16))
    shard, names = codes.result()
    return shard, (np.concatenate(rows) if rows else np.zeros(0, np.int32)), (np.concatenate(views) if views else np.zeros(0, np.int16)), names


def _source_windows(cache: "CorrCache", selection: Any, num_views: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """The selected ok windows of one cache as numpy columns: ``(shard code, row, views, shard ids)``,
    shard codes indexing the sorted shard ids. The manifest is streamed (no Arrow table of all rows)."""
    import pyarrow.compute as pc

    from cameo_corr.cache.manifest import scan_manifest

    where = f"{cache.location.display}/manifest"
    expr, chosen = pc.field("status") == "ok", selection.expression()
    shard, row, views, names = scan_manifest(cache.location, _shard_columns, ["shard", "row", "num_views"],
                                             expr if chosen is None else expr & chosen)
    if len(row) == 0:
        if selection:
            raise DatasetError(where, f"no 'ok' windows match the selection ({selection.describe()})", field="selection")
        raise DatasetError(where, "no 'ok' windows", field="status")
    if views.min() < num_views:
        raise DatasetError(where, f"{int((views < num_views).sum())} windows have fewer views than num_views="
                           f"{num_views} (e.g. {int(views.min())})", field="num_views")
    return shard, row, views, names


def stored_window(arrays: dict[str, np.ndarray], views: np.ndarray, size: int, resolution: int, *, where: str
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(images uint8 [F, R, R, 3], intrinsics [F, 3, 3], extrinsics [F, 4, 4])`` of views ``views`` of a
    window's stored views (its :data:`~cameo_corr.schemas.IMAGE_ARRAYS` row; canonical side ``size``)
    at the training resolution ``R``: decoded and resized, intrinsics scaled by ``R / size`` (exact for
    the canonical view's pixel-centre convention)."""
    from cameo_corr.datasets.image_io import decode_view

    images = np.stack([decode_view(arrays["images"][i], int(arrays["image_nbytes"][i]), resolution, where=where) for i in views])
    scale = np.diag([resolution / size, resolution / size, 1.0])
    intrinsics = scale @ np.asarray(arrays["image_intrinsics"][views], dtype=np.float64)
    return images, intrinsics, np.asarray(arrays["image_extrinsics"][views])


def _row_slots(shard: np.ndarray, row: np.ndarray, start: np.ndarray) -> np.ndarray | None:
    """Where each window goes when the windows are sorted by ``(shard, row)``: ``start[shard] + row``, when
    each shard's rows are exactly ``0 ... n - 1`` (all its windows selected: the usual case); else ``None``."""
    if not len(row) or row.min() < 0:
        return None
    slots = start[:-1][shard]
    if not bool((row < start[1:][shard] - slots).all()):
        return None
    slots += row
    filled = np.zeros(len(row), bool)
    filled[slots] = True
    return slots if bool(filled.all()) else None  # n rows below n, none left empty: each once


def _window_columns(caches: Sequence[CorrCache], sources: Sequence[CacheSource], defaults: Any, num_views: int) -> dict[str, Any]:
    """The selected windows of all caches as compact columns, sorted by cache, shard, then row:
    ``shard_ids``, ``shard_source``, ``shard_start`` (``[shards + 1]`` bounds), ``shard_views`` (one S per
    shard) and ``window_row`` (the smallest unsigned dtype holding the largest row)."""
    shard_parts, row_parts, view_parts, names_all, shard_source = [], [], [], [], []
    for k, (src, cache) in enumerate(zip(sources, caches)):
        shard, row, views, names = _source_windows(cache, src.selection.over(defaults), num_views)
        shard_parts.append(shard + len(names_all))
        row_parts.append(row)
        view_parts.append(views)
        names_all += names
        shard_source.append(np.full(len(names), k, dtype=np.int16))
    shard, row, views = (parts[0] if len(parts) == 1 else np.concatenate(parts) for parts in (shard_parts, row_parts, view_parts))
    del shard_parts, row_parts, view_parts
    start = np.concatenate([[0], np.cumsum(np.bincount(shard, minlength=len(names_all)))]).astype(np.int64)
    owner = np.concatenate(shard_source)
    row_type = np.min_scalar_type(int(row.max()) if len(row) else 0)
    slots = _row_slots(shard, row, start)
    if slots is not None:  # scattered to their places: the rows become 0 ... n - 1 per shard
        rows, ordered = np.empty(len(row), row_type), np.empty_like(views)
        rows[slots], ordered[slots] = row, views
        views = ordered
    else:
        order = np.argsort((shard.astype(np.int64) << 32) | row.astype(np.int64), kind="stable")
        shard, rows = shard[order], row[order]
        same = (rows[1:] == rows[:-1]) & (shard[1:] == shard[:-1])
        if same.any():
            k, r = int(shard[1:][same][0]), int(rows[1:][same][0])
            raise DatasetError(f"{caches[owner[k]].location.display}/manifest", f"shard {names_all[k]} row {r} is listed by more "
                               "than one ok window", field="row")
        rows, views = rows.astype(row_type), views[order]
    del shard, row, slots
    low, high = np.minimum.reduceat(views, start[:-1]), np.maximum.reduceat(views, start[:-1])
    if np.any(low != high):
        k = int(np.flatnonzero(low != high)[0])
        raise DatasetError(f"{caches[owner[k]].location.display}/manifest", f"the windows of shard {names_all[k]} have "
                           f"{int(low[k])} to {int(high[k])} views; a shard holds windows of one S", field="num_views")
    return {"shard_ids": tuple(names_all), "shard_source": owner, "shard_start": start, "shard_views": low.astype(np.int16),
            "window_row": rows}


class _ShardVisit:
    """One shard as a worker reads it: the arrays ``names`` of all its windows (the correspondence
    arrays, plus the inputs of a mask recomputed at load time), decoded once, and the windows' metadata
    (ids, scenes, frame ids). Rows whose bytes are corrupt map to their error."""

    def __init__(self, cache: "CorrCache", shard_id: str, grid: tuple[int, int], names: Sequence[str]) -> None:
        from cameo_corr.cache.shard import CorruptCacheError

        self.shard_id = shard_id
        self.names = tuple(names)
        self.bad: dict[int, CorruptCacheError] = {}
        self.broken: CorruptCacheError | None = None
        try:
            self.meta = cache.shard_windows(shard_id)
            self.corr = cache.read_shard(shard_id, self.names, grid=grid)
        except CorruptCacheError as e:
            if e.array is None:  # the shard file or its metadata: no window of it is readable
                self.broken = e
                return
            self.corr = {}
            rows = {}
            for r, wid in enumerate(self.meta["window_ids"]):
                try:
                    rows[r] = cache.read_row(shard_id, r, wid, self.names, grid=grid)
                except CorruptCacheError as err:
                    self.bad[r] = err
            self.rows = rows

    def corr_row(self, row: int) -> dict[str, np.ndarray]:
        """The arrays of one row; raises the row's :class:`CorruptCacheError`."""
        if self.broken is not None:
            raise self.broken
        if row in self.bad:
            raise self.bad[row]
        if self.corr:
            return {k: self.corr[k][row] for k in self.names}
        return self.rows[row]


class _ProcessState:
    """Per-process lazily opened resources, per cache of the stream: the cache (and its zarr shard
    groups), the dataset reader and canonical view; and the shards being visited and the frame records
    of recently used scenes (keyed by cache index)."""

    def __init__(self, owner: "CorrStreamDataset", workers: int = 1, worker: int = 0) -> None:
        from cameo_corr.datasets.base import open_dataset
        from cameo_corr.datasets.canonical import CanonicalView
        from cameo_corr.cache.location import options_for
        from cameo_corr.cache.reader import CorrCache

        self.pid = os.getpid()
        self.local_cache = owner.make_local_cache()
        """This process's handle on the node's shard cache (``None``: shards are read from the caches)."""
        self.caches: list[CorrCache] = []
        self.readers: list[SceneReader | None] = []
        """The dataset reader of each cache (``None`` for a cache whose stored views are used)."""
        self.views: list[CanonicalView] = []
        for source, stored, config in zip(owner.sources, owner.stored_views, owner.cache_configs):
            cache = CorrCache(source.path, storage_options=options_for(source.path, owner.storage_options), config=config,
                              local_cache=self.local_cache)
            if stored:
                reader = None
            elif source.dataset_root is None:
                reader = cache.reader()
            else:
                ds = dict(cache.config.dataset)
                reader = open_dataset(ds.pop("name"), source.dataset_root, **{k: v for k, v in ds.items() if k != "root"})
            view = cache.view().to_dict()
            view["size"] = owner.resolution
            self.caches.append(cache)
            self.readers.append(reader)
            self.views.append(CanonicalView.from_dict(view))
        self.scenes: OrderedDict[tuple[int, str], dict[str, Any]] = OrderedDict()
        self.shards: OrderedDict[tuple[int, str], _ShardVisit] = OrderedDict()
        self.max_open = owner.max_open * len(owner.sources)
        lanes = max(owner.num_workers, 1)
        self.max_shards = owner.shard_visits * (lanes // math.gcd(lanes, workers))
        """Shard visits kept per cache: :attr:`CorrStreamDataset.shard_visits` for each lane of the stream this
        process reads (one of ``workers`` DataLoader worker processes, or the only process: ``workers=1``)."""
        self.grid = owner.grid
        self.read_names = _CORR_KEYS
        """Arrays read per shard visit: the correspondence arrays, and the inputs of a recomputed mask."""
        if owner.mask_options:
            self.read_names = tuple(dict.fromkeys(_CORR_KEYS + mask_inputs(owner.mask_options["policy"])))
        self.worker, self.workers = worker, workers
        """Which DataLoader worker this process is, of how many (``0, 1``: the only process)."""
        self.shard_reads = 0
        self.upcoming: tuple[tuple[int, StreamState], dict[int, int], np.ndarray] | None = None
        """``((epoch, start state), {shard index: position}, shard indices)``: the order in which the items
        this process reads first reach each shard in an epoch (:meth:`CorrStreamDataset.worker_shards`; for
        prefetching the next ones)."""

    def prefetch_after(self, owner: CorrStreamDataset, epoch: int, shard: int) -> None:
        """Ask the local shard cache for the ``owner.local_cache_prefetch`` shards that this process's own
        items reach after shard index ``shard`` in ``epoch`` (:meth:`CorrStreamDataset.worker_shards` of
        this worker: its lane when the loader has the workers the order was dealt to, whatever it reads
        otherwise; the rank's whole stream for the only process). Computed once per epoch and start state."""
        if self.local_cache is None or owner.local_cache_prefetch <= 0:
            return
        key = (epoch, owner.state)
        if self.upcoming is None or self.upcoming[0] != key:
            seq = owner.worker_shards(epoch, self.worker, self.workers)
            self.upcoming = (key, {int(k): i for i, k in enumerate(seq.tolist())}, seq)
        _, position, seq = self.upcoming
        i = position.get(shard)
        if i is None:
            return
        for k in seq[i + 1 : i + 1 + owner.local_cache_prefetch].tolist():
            self.caches[int(owner.shard_source[k])].prefetch([owner.shard_ids[k]])

    def shard(self, shard_id: str, source: int = 0) -> _ShardVisit:
        """The decoded shard of cache ``source`` (read once per visit; the few most recent shards are kept)."""
        key = (source, shard_id)
        if key not in self.shards:
            names = self.read_names + (tuple(IMAGE_ARRAYS) if self.readers[source] is None else ())
            self.shards[key] = _ShardVisit(self.caches[source], shard_id, self.grid, names)
            self.shard_reads += 1
            mine = [k for k in self.shards if k[0] == source]  # each cache keeps its own block, however often drawn
            for old in mine[: max(len(mine) - self.max_shards, 0)]:
                del self.shards[old]
        self.shards.move_to_end(key)
        return self.shards[key]

    def frames(self, scene_id: str, source: int = 0) -> dict[str, Any]:
        """``frame_id -> FrameRecord`` of a scene of cache ``source`` (a few scenes kept, least recently used evicted)."""
        key = (source, scene_id)
        if key not in self.scenes:
            scene = self.readers[source].scene(scene_id)
            self.scenes[key] = {f.frame_id: f for f in scene.frames}
            while len(self.scenes) > self.max_open:
                self.scenes.popitem(last=False)
        self.scenes.move_to_end(key)
        return self.scenes[key]


class CorrStreamDataset(IterableDataset):
    """Seeded, resumable stream of CAMEO training samples from a correspondence cache.

    Args:
        cache: cache directory or fsspec URL (``<cache>/cache.json``, ``manifest/``, ``shards/``), or a
            mixture: a sequence of :class:`~cameo_corr.train.mixture.CacheSource` (path, weight, tag,
            dataset root, window selection), see :meth:`epoch_windows`.
        num_views: ``F``, views per sample (``2 <= F <= S`` of every window).
        resolution: side of the square training images (the canonical crop resized to it).
        min_ref, max_ref: the number of references is uniform in ``[min_ref, max_ref]``
            (default ``[1, F - 1]``).
        order: reordering policy, one of :data:`ORDER_POLICIES`.
        shuffle_prob: probability of ``shuffle`` under the ``mixed`` policy.
        order_scope: one of :data:`ORDER_SCOPES`: ``batch`` draws the number of references and the order
            once per batch of ``batch_size`` (so it needs ``batch_size``), ``sample`` per sample.
        tags: manifest ``dataset`` -> batch ``tag`` (default :data:`DEFAULT_TAGS`; unlisted datasets
            keep their name).
        seed: seed of every random choice.
        shard_shuffle: shuffle the shards (else storage order).
        window_shuffle: how the windows are shuffled, one of :data:`~cameo_corr.train.config.WINDOW_SHUFFLES`:
            ``block`` (:func:`block_order`, blocks of ``shuffle_shards`` shards) or ``buffer``
            (:func:`epoch_order`, a buffer of ``shuffle_buffer`` slots; the previous policy).
        shuffle_shards: shards per block of the block shuffle (0: no window shuffle).
        shuffle_buffer: slots of the buffer shuffle.
        rank, world_size: this process's data-parallel rank and the number of ranks (pass them
            explicitly, e.g. ``accelerator.process_index`` / ``accelerator.num_processes``).
        batch_size: when given, the stream yields collated batches of this many samples (use with
            ``DataLoader(batch_size=None)``, as :class:`StreamLoader` does); ``None`` yields samples.
        num_workers: the DataLoader workers that will read the stream (``data.num_workers``): above 1,
            the epoch order is dealt to that many lanes, one per worker (:func:`deal_to_lanes`), so each
            worker decodes its own shards; part of the order (0 and 1: the same order). Any loader still
            yields the stream in order, only with more decodes when its workers differ.
        num_epochs: stop after this many epochs; ``None`` streams forever.
        dataset_root: dataset root to read images from instead of the one recorded in ``cache.json``
            (one cache; a mixture gives it per entry).
        storage_options: fsspec options for a remote cache.
        split, scenes_file, min_mask_frac: only the ``ok`` windows of this split, of the scenes listed in
            this file (one id per line) and with at least this ``mask_frac``
            (:class:`~cameo_corr.cache.select.WindowSelection`; ``None``: no condition). A mixture
            entry's own predicates replace these. An empty selection is an error naming the predicate.
        max_open: scenes whose frame records are kept per process.
        tau, mask_policy, visibility_tol: the supervision mask (:mod:`cameo_corr.pipeline.masks`).
            With ``tau=None`` and ``mask_policy="cycle"`` (defaults) it is the stored ``mask``; otherwise
            it is recomputed per window from the cached arrays: the cycle mask at ``tau`` (``None``: the
            cache's), the depth-consistency ``visibility`` test, or ``both``.
        on_corrupt: one of :data:`CORRUPT_POLICIES`: ``raise`` stops with the
            :class:`~cameo_corr.cache.shard.CorruptCacheError` naming cache, shard, array and
            window; ``skip`` leaves the window out, logs it and counts it in the batch's
            :data:`SKIPPED_KEY` (a batch of only skipped windows is ``{SKIPPED_KEY: n}``).
        grid: the token grid to read from a cache storing several (``None``: its primary grid); a grid
            the cache lacks is a :class:`~cameo_corr.schemas.SchemaError` listing the stored grids.
        local_cache, local_cache_bytes, local_cache_prefetch: a local directory keeping copies of the
            shard files of remote caches within a byte budget, shared by the processes of a node, and
            how many shards each process fetches ahead: the next ones its own items reach (a DataLoader
            worker's batches, :meth:`worker_shards`; its lane when the workers are those the order is dealt
            to) (:class:`~cameo_corr.cache.local_cache.LocalShardCache`; ``None``: read shards from the store).
        configs: the ``cache.json`` of caches the caller has read already, by path as given (``str``); the
            others are read here. Worker processes reuse what the dataset holds.
    """

    def __init__(
        self,
        cache: "str | Path | Sequence[CacheSource]",
        *,
        num_views: int,
        resolution: int,
        min_ref: int = 1,
        max_ref: int | None = None,
        order: str = "mixed",
        shuffle_prob: float = DEFAULT_SHUFFLE_PROB,
        order_scope: str = "batch",
        tags: dict[str, str] | None = None,
        seed: int = 0,
        shard_shuffle: bool = True,
        window_shuffle: str = "block",
        shuffle_shards: int = 4,
        shuffle_buffer: int = 64,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int | None = None,
        num_workers: int = 0,
        num_epochs: int | None = None,
        dataset_root: str | Path | None = None,
        storage_options: dict[str, Any] | None = None,
        split: str | None = None,
        scenes_file: str | None = None,
        min_mask_frac: float | None = None,
        max_open: int = 8,
        tau: float | None = None,
        mask_policy: str = "cycle",
        visibility_tol: float = DEFAULT_VISIBILITY_TOL,
        on_corrupt: str = "raise",
        grid: int | tuple[int, int] | None = None,
        local_cache: str | Path | None = None,
        local_cache_bytes: int = 50 * 2**30,
        local_cache_prefetch: int = 2,
        configs: Mapping[str, CacheConfig] | None = None,
    ) -> None:
        from cameo_corr.cache.location import options_for
        from cameo_corr.cache.reader import CorrCache
        from cameo_corr.cache.select import WindowSelection
        from cameo_corr.train.mixture import CacheSource

        super().__init__()
        if isinstance(cache, (str, Path)):
            sources: tuple[CacheSource, ...] = (CacheSource(str(cache), dataset_root=None if dataset_root is None else str(dataset_root)),)
        else:
            sources = tuple(cache)
            if not sources:
                raise SchemaError("caches", "a mixture needs at least one cache")
            if dataset_root is not None:
                raise SchemaError("dataset_root", "give the dataset root of each cache of a mixture in its entry (dataset_root)")
        self.sources = sources
        """The caches of the stream (one, or a weighted mixture), in configuration order."""
        self.storage_options = dict(storage_options or {}) or None
        """fsspec options of the caches given by URL (a local cache of a mixture takes none)."""
        self.num_views = int(num_views)
        self.resolution = int(resolution)
        self.min_ref = int(min_ref)
        self.max_ref = self.num_views - 1 if max_ref is None else int(max_ref)
        self.order = order
        self.shuffle_prob = float(shuffle_prob)
        self.order_scope = order_scope
        self.tags = dict(DEFAULT_TAGS if tags is None else tags)
        self.seed = int(seed)
        self.shard_shuffle = bool(shard_shuffle)
        self.window_shuffle = window_shuffle
        self.shuffle_shards = int(shuffle_shards)
        self.shuffle_buffer = int(shuffle_buffer)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.num_workers = int(num_workers)
        """DataLoader workers the epoch order is dealt to (``<= 1``: not dealt)."""
        self.num_epochs = num_epochs
        self.max_open = int(max_open)
        self.on_corrupt = on_corrupt
        self.local_cache = None if local_cache is None else str(local_cache)
        self.local_cache_bytes = int(local_cache_bytes)
        self.local_cache_prefetch = int(local_cache_prefetch)
        self.make_local_cache()  # checks the options now, not in the first worker
        self._check_options()

        known = dict(configs or {})
        caches = [CorrCache(src.path, storage_options=options_for(src.path, storage_options), config=known.get(str(src.path)))
                  for src in sources]
        self.cache_configs: tuple[CacheConfig, ...] = tuple(c.config for c in caches)
        """Each source's ``cache.json``, read once here (or given): the worker processes reuse it."""
        self.grid: tuple[int, int] = caches[0].select_grid(grid)
        """The token grid read (``grid``; default the first cache's primary grid), stored by every cache."""
        uses_cycle = check_policy(mask_policy) != "visibility"
        check_mixture(caches, self.grid, tau_matters=tau is None and uses_cycle)
        self.mask_options: dict[str, Any] | None = None
        """Keyword arguments of :func:`~cameo_corr.pipeline.masks.recompute_mask` but ``image_size`` (each
        cache's own canonical size is used for its windows); ``None``: stored mask."""
        self.view_sizes = tuple(int(c.view().size) for c in caches)
        """Canonical crop size of each cache (the image size of its cached intrinsics)."""
        self.stored_views = tuple(c.config.images is not None and src.dataset_root is None for src, c in zip(sources, caches))
        """Per cache: whether images come from its stored views (``--store-images``) rather than a dataset root."""
        for src, cache_obj, stored in zip(sources, caches, self.stored_views):
            if not stored and src.dataset_root is None:
                cache_obj.dataset_root()  # neither stored views nor a dataset root: say so now, not in a worker
        if tau is not None or mask_policy != "cycle":
            self.mask_options = {"tau": check_tau(caches[0].config.tau if tau is None else tau), "policy": mask_policy,
                                 "tol": check_visibility_tol(visibility_tol)}
        cols = _window_columns(caches, sources, WindowSelection(split, scenes_file, min_mask_frac), self.num_views)
        self.shard_ids: tuple[str, ...] = cols["shard_ids"]
        """Shard ids, sorted within each cache, caches in order; :attr:`shard_start` and :attr:`window_shard` index it."""
        self.shard_source: np.ndarray = cols["shard_source"]
        """``[shards]`` int16 index (into :attr:`sources`) of the cache of each shard."""
        self.shard_start: np.ndarray = cols["shard_start"]
        """``[shards + 1]`` int64: the windows of shard ``k`` are ``shard_start[k]:shard_start[k + 1]`` (windows
        sorted by cache, shard, then row)."""
        self.shard_views: np.ndarray = cols["shard_views"]
        """``[shards]`` int16 number of views S of the windows of each shard."""
        self.window_row: np.ndarray = cols["window_row"]
        """``[N]`` row of each window in its shard (the smallest unsigned dtype holding the largest row)."""
        self._window_shard: np.ndarray | None = None
        sizes = np.bincount(self.shard_source, weights=np.diff(self.shard_start), minlength=len(sources)).astype(np.int64)
        self.source_windows: np.ndarray = sizes
        """``[caches]`` number of selected windows of each cache."""
        self.source_counts: np.ndarray = mixture_counts([s.weight for s in sources], int(sizes.sum()))
        """``[caches]`` samples drawn from each cache per epoch (see :func:`mixture_counts`)."""
        self.epoch_length = math.ceil(int(sizes.sum()) / self.world_size)
        """Samples per epoch on each rank (the padded epoch order divided by ``world_size``)."""
        self.shard_visits = max(self.shuffle_shards, 1) if self.window_shuffle == "block" else BUFFER_SHARD_VISITS
        """Decoded shards a process keeps per cache: a block's (``shuffle_shards``), or
        :data:`BUFFER_SHARD_VISITS` under the buffer shuffle."""
        self.state = StreamState()
        self._proc: _ProcessState | None = None

    def _check_options(self) -> None:
        if self.num_views < 2:
            raise SchemaError("num_views", f"needs at least 2 views (a reference and a target), got {self.num_views}")
        if not 1 <= self.min_ref <= self.max_ref <= self.num_views - 1:
            raise SchemaError("min_ref", f"need 1 <= min_ref <= max_ref <= num_views - 1, got {self.min_ref}, {self.max_ref}, F={self.num_views}")
        if self.order not in ORDER_POLICIES:
            raise SchemaError("order", f"unknown policy {self.order!r}; expected one of {ORDER_POLICIES}")
        if not 0.0 <= self.shuffle_prob <= 1.0:
            raise SchemaError("shuffle_prob", f"must be in [0, 1], got {self.shuffle_prob}")
        if self.order_scope not in ORDER_SCOPES:
            raise SchemaError("order_scope", f"unknown scope {self.order_scope!r}; expected one of {ORDER_SCOPES}")
        bad = [k for k, v in self.tags.items() if not isinstance(k, str) or not isinstance(v, str) or not v]
        if bad:
            raise SchemaError("tags", f"expected a mapping of dataset names to non-empty tag strings, got {bad[0]!r}: {self.tags[bad[0]]!r}")
        if not 0 <= self.rank < self.world_size:
            raise SchemaError("rank", f"need 0 <= rank < world_size, got rank={self.rank}, world_size={self.world_size}")
        if self.resolution <= 0:
            raise SchemaError("resolution", f"must be positive, got {self.resolution}")
        if self.batch_size is not None and self.batch_size <= 0:
            raise SchemaError("batch_size", f"must be positive, got {self.batch_size}")
        if self.num_workers < 0:
            raise SchemaError("num_workers", f"must be >= 0, got {self.num_workers}")
        if self.num_epochs is not None and self.num_epochs <= 0:
            raise SchemaError("num_epochs", f"must be positive or None, got {self.num_epochs}")
        if self.on_corrupt not in CORRUPT_POLICIES:
            raise SchemaError("on_corrupt", f"unknown policy {self.on_corrupt!r}; expected one of {CORRUPT_POLICIES}")
        if self.window_shuffle not in WINDOW_SHUFFLES:
            raise SchemaError("window_shuffle", f"unknown policy {self.window_shuffle!r}; expected one of {WINDOW_SHUFFLES}")
        for name in ("shuffle_shards", "shuffle_buffer"):
            if getattr(self, name) < 0:
                raise SchemaError(name, f"must be >= 0, got {getattr(self, name)}")

    def make_local_cache(self) -> LocalShardCache | None:
        """A handle on the node's local shard cache (``None`` without ``local_cache``)."""
        from cameo_corr.cache.local_cache import LocalShardCache

        if self.local_cache is None:
            return None
        return LocalShardCache(self.local_cache, self.local_cache_bytes, prefetch=self.local_cache_prefetch)

    # ------------------------------------------------------------------------------ order and state
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_proc"] = None  # open readers and zarr groups never cross a process boundary
        state["_window_shard"] = None  # rebuilt from shard_start where needed: 4 bytes per window not pickled
        return state

    def __len__(self) -> int:
        """Number of windows (not samples per epoch: see :attr:`epoch_length`)."""
        return len(self.window_row)

    @property
    def window_shard(self) -> np.ndarray:
        """``[N]`` int32 shard index of each window (built from :attr:`shard_start` once per process)."""
        if self._window_shard is None:
            self._window_shard = np.repeat(np.arange(len(self.shard_ids), dtype=np.int32), np.diff(self.shard_start))
        return self._window_shard

    def shard_of(self, window: int) -> int:
        """Shard index of window index ``window`` (a binary search of :attr:`shard_start`)."""
        return int(np.searchsorted(self.shard_start, window, side="right")) - 1

    def shard_rows(self, source: int | None = None) -> list[np.ndarray]:
        """Window indices of each shard (of cache ``source``; ``None``: all), in row order (what
        :func:`epoch_order` shuffles)."""
        shards = range(len(self.shard_ids)) if source is None else np.flatnonzero(self.shard_source == source)
        return [np.arange(self.shard_start[k], self.shard_start[k + 1]) for k in shards]

    def pass_order(self, source: int | None, seed: int, epoch: int) -> np.ndarray:
        """One pass over the windows of cache ``source`` (``None``: all) in stream order: shard shuffle then
        window shuffle (:func:`block_order` or :func:`epoch_order`, per :attr:`window_shuffle`)."""
        if self.window_shuffle == "buffer":
            return epoch_order(self.shard_rows(source), seed=seed, epoch=epoch, shard_shuffle=self.shard_shuffle,
                               shuffle_buffer=self.shuffle_buffer)
        first, last = (0, len(self.shard_ids) - 1) if source is None else np.flatnonzero(self.shard_source == source)[[0, -1]]
        return block_order(self.shard_start[first : last + 2], seed=seed, epoch=epoch, shard_shuffle=self.shard_shuffle,
                           block_shards=self.shuffle_shards)

    def epoch_windows(self, epoch: int) -> np.ndarray:
        """The window indices of one epoch, in stream order, before the rank split.

        One cache: :meth:`pass_order` of ``(seed, epoch)``. A mixture: cache ``k`` contributes
        :attr:`source_counts` ``[k]`` samples per epoch, the next ones of its own endless stream (its
        passes ``p = 0, 1, ...``, each :meth:`pass_order` of ``(seed_k, p)`` over its shards, so reads stay
        shard-ordered within each cache); the caches' samples are interleaved by a seeded shuffle of the
        epoch's slots.
        """
        if len(self.sources) == 1:
            return self.pass_order(None, self.seed, epoch)
        slots = np.repeat(np.arange(len(self.sources)), self.source_counts)
        np.random.default_rng([self.seed, epoch, 3]).shuffle(slots)
        out = np.empty(len(slots), dtype=np.int64)
        for k, (n, c) in enumerate(zip(self.source_windows.tolist(), self.source_counts.tolist())):
            if c == 0:
                continue
            seed = self.seed if k == 0 else int(np.random.SeedSequence([self.seed, k]).generate_state(1)[0])
            start = epoch * c
            first, last = start // n, (start + c - 1) // n
            stream = np.concatenate([self.pass_order(k, seed, p) for p in range(first, last + 1)])
            out[slots == k] = stream[start - first * n : start - first * n + c]
        return out

    def rank_order(self, epoch: int) -> np.ndarray:
        """``[epoch_length, 2]`` of ``(window index, index in the padded epoch order)`` for this rank, in
        stream order (dealt to the lanes of :attr:`num_workers` workers, :func:`deal_to_lanes`)."""
        order = self.epoch_windows(epoch)
        padded = self.epoch_length * self.world_size
        q = np.arange(padded, dtype=np.int64)
        windows = order[q % len(order)]
        mine = slice(self.rank, padded, self.world_size)
        return deal_to_lanes(np.stack([windows[mine], q[mine]], axis=1), first=epoch * self.epoch_length,
                             unit=self.batch_size or 1, lanes=self.num_workers)

    def state_dict(self) -> dict[str, int]:
        """The start state of the next iteration (:meth:`state_dict_of`)."""
        return self.state_dict_of(self.state)

    def state_dict_of(self, state: StreamState) -> dict[str, int]:
        """``{"epoch", "position"}`` of ``state``, and ``"num_workers"`` when the epoch order is dealt to
        more than one worker (the order depends on it)."""
        out = {"epoch": state.epoch, "position": state.position}
        if self.num_workers > 1:
            out["num_workers"] = self.num_workers
        return out

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Start the next iteration at ``state`` (as returned by :meth:`state_dict`, or a :class:`StreamState`'s
        fields). A state saved with another worker count (no ``"num_workers"``: 0 or 1) is taken with a
        warning: the epoch order is dealt to the workers, so the stream does not continue exactly."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0:
            raise SchemaError("epoch", f"must be >= 0, got {epoch}")
        if not 0 <= position < self.epoch_length:
            raise SchemaError("position", f"must be in [0, {self.epoch_length}) (samples per epoch on this rank), got {position}")
        saved = int(state.get("num_workers", 0))
        if max(saved, 1) != max(self.num_workers, 1):
            warnings.warn(f"the data stream was saved with data.num_workers={saved} and is resumed with {self.num_workers}: the "
                          "epoch order is dealt to the workers, so the sample stream does not continue exactly", stacklevel=2)
        self.state = StreamState(epoch, position)

    def state_after(self, consumed: int, start: StreamState | None = None) -> StreamState:
        """The state after ``consumed`` more samples from ``start`` (default: the current start state)."""
        start = self.state if start is None else start
        g = start.epoch * self.epoch_length + start.position + int(consumed)
        return StreamState(g // self.epoch_length, g % self.epoch_length)

    def _positions(self) -> Iterator[tuple[int, int, int, int]]:
        """``(stream position g, epoch, window index, padded index)`` of this rank's stream from the start
        state (``g = epoch * epoch_length + position``)."""
        epoch, pos = self.state.epoch, self.state.position
        while self.num_epochs is None or epoch < self.num_epochs:
            order = self.rank_order(epoch)
            for k, (w, q) in enumerate(order[pos:], start=pos):
                yield epoch * self.epoch_length + k, epoch, int(w), int(q)
            epoch, pos = epoch + 1, 0

    def worker_items(self, worker: int = 0, workers: int = 1) -> Iterator[list[tuple[int, int, int, int]]]:
        """The ``(g, epoch, window, q)`` items of the stream (from the start state) that DataLoader worker
        ``worker`` of ``workers`` reads, a batch at a time: the stream cut into batches of ``batch_size``
        (the last may be shorter; single samples without ``batch_size``), the ``k``-th for worker ``k % workers``."""
        unit = self.batch_size or 1
        chunk: list[tuple[int, int, int, int]] = []
        for n, item in enumerate(self._positions()):
            if n // unit % workers == worker:
                chunk.append(item)
                if len(chunk) == unit:
                    yield chunk
                    chunk = []
        if chunk:
            yield chunk

    def worker_shards(self, epoch: int, worker: int = 0, workers: int = 1) -> np.ndarray:
        """Shard indices in the order in which the items of ``epoch`` that DataLoader worker ``worker`` of
        ``workers`` reads (:meth:`worker_items`, from the start state) first reach them: what that worker
        prefetches into a local shard cache. With the workers the order was dealt to, worker ``w`` reads lane
        ``w`` (:func:`deal_to_lanes`) and these are its lane's shards; ``workers=1``: the rank's stream.
        Vectorised over the epoch (no Python per window)."""
        windows = self.rank_order(epoch)[:, 0]
        start = self.state.epoch * self.epoch_length + self.state.position  # stream position of the first item read
        skip = min(max(start - epoch * self.epoch_length, 0), len(windows))  # positions before the start: not read
        windows = windows[skip:]
        if workers > 1:
            unit = self.batch_size or 1
            period = unit * workers  # the item read n-th from the start belongs to worker n // unit % workers
            turn = np.zeros(period, dtype=bool)
            turn[worker * unit : (worker + 1) * unit] = True
            shift = (epoch * self.epoch_length + skip - start) % period  # n of the epoch's first item read
            windows = windows[np.resize(np.roll(turn, -shift), len(windows))]
        shards = self.window_shard[windows]
        _, first = np.unique(shards, return_index=True)
        return shards[np.sort(first)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if self.batch_size is None:
            if self.order_scope == "batch":
                raise SchemaError("order_scope", "'batch' draws the number of references and the order once per batch, but this "
                                  "stream yields single samples (batch_size=None): give batch_size, or order_scope='sample'")
            for [(_, epoch, w, q)] in self.worker_items(worker, workers):
                sample = self.sample(w, epoch, q)
                if sample is not None:
                    yield sample
            return
        for items in self.worker_items(worker, workers):
            yield self._batch(items)

    def _batch(self, items: Sequence[tuple[int, int, int, int]]) -> dict[str, Any]:
        """Collated samples of ``(g, epoch, window, q)`` items (the batch's draw keyed by the first ``g``);
        with ``on_corrupt="skip"`` the batch also carries :data:`SKIPPED_KEY` (and is only that when every
        window of it was corrupt)."""
        first = items[0][0]
        samples = [self.sample(w, e, q, first=first) for _, e, w, q in items]
        kept = [x for x in samples if x is not None]
        if self.on_corrupt == "raise":
            return collate_samples(kept)
        skipped = len(samples) - len(kept)
        return {**collate_samples(kept), SKIPPED_KEY: skipped} if kept else {SKIPPED_KEY: skipped}

    # -------------------------------------------------------------------------------------- samples
    def _process(self) -> _ProcessState:
        if self._proc is None or self._proc.pid != os.getpid():
            info = get_worker_info()
            self._proc = _ProcessState(self, 1, 0) if info is None else _ProcessState(self, info.num_workers, info.id)
        return self._proc

    def batch_order(self, first: int) -> tuple[int, np.ndarray]:
        """``(num_ref, order)`` of the batch whose first sample is at position ``first`` of this rank's
        stream (``order_scope="batch"``): ``order`` is the :func:`reference_order` permutation of the
        ``F`` chosen views (in capture order) that every sample of the batch applies. Drawn in the
        official order (number of references, then the ``shuffle``/``uniform_push`` choice, then the
        permutation) from a generator keyed by ``(seed, first)``."""
        rng = np.random.default_rng([self.seed, int(first), 4])
        num_ref = int(rng.integers(self.min_ref, self.max_ref + 1))
        return num_ref, reference_order(self.num_views, num_ref, self.order, rng, self.shuffle_prob)

    def choose(self, window: int, epoch: int, q: int, first: int | None = None) -> tuple[np.ndarray, int]:
        """The views of a sample, in output order (indices into the window's S views), and ``num_ref``.

        The ``F`` views are drawn per sample from ``(seed, epoch, q)``. The number of references and the
        order come from the batch (:meth:`batch_order` of ``first``, the stream position of the batch's
        first sample; ``order_scope="batch"``) or from the sample's own generator after its views
        (``order_scope="sample"``, ``first`` unused).
        """
        rng = np.random.default_rng([self.seed, epoch, q, 2])
        S = int(self.shard_views[self.shard_of(window)])
        chosen = np.sort(rng.choice(S, size=self.num_views, replace=False))
        if self.order_scope == "sample":
            num_ref = int(rng.integers(self.min_ref, self.max_ref + 1))
            return chosen[reference_order(self.num_views, num_ref, self.order, rng, self.shuffle_prob)], num_ref
        if first is None:
            raise SchemaError("first", "order_scope='batch' draws the order per batch: pass the stream position of the batch's first sample")
        num_ref, order = self.batch_order(first)
        return chosen[order], num_ref

    def locate(self, window: int) -> tuple[int, str, int]:
        """``(cache index, shard id, row)`` of a window index."""
        shard = self.shard_of(window)
        return int(self.shard_source[shard]), self.shard_ids[shard], int(self.window_row[window])

    def window_meta(self, window: int) -> dict[str, Any]:
        """``source`` (cache index), ``window_id``, ``dataset``, ``split``, ``scene_id``, ``frame_ids``,
        ``shard``, ``row`` of a window index (read from its shard in this process)."""
        source, shard_id, row = self.locate(window)
        meta = self._process().shard(shard_id, source).meta
        return {"source": source, "window_id": meta["window_ids"][row], "dataset": meta["datasets"][row], "split": meta["splits"][row],
                "scene_id": meta["scene_ids"][row], "frame_ids": list(meta["frame_ids"][row]), "shard": shard_id, "row": row}

    def sample(self, window: int, epoch: int = 0, q: int = 0, first: int | None = None) -> dict[str, Any] | None:
        """The training sample of window index ``window`` at padded epoch index ``q`` of ``epoch``, in a
        batch starting at stream position ``first`` (``order_scope="batch"``; see :meth:`choose`)
        (``None`` when the window is corrupt and ``on_corrupt="skip"``)."""
        from cameo_corr.cache.shard import CorruptCacheError

        proc = self._process()
        source, shard_id, row = self.locate(window)
        views, num_ref = self.choose(window, epoch, q, first)
        reads = proc.shard_reads
        visit = proc.shard(shard_id, source)
        if proc.shard_reads != reads:  # a new shard visit: fetch the next shards of the order ahead
            proc.prefetch_after(self, epoch, int(self.window_shard[window]))
        try:
            blocks = visit.corr_row(row)
            if self.mask_options:
                size = self.view_sizes[source]
                blocks = {**blocks, "mask": recompute_mask(blocks, **{**self.mask_options, "image_size": (size, size)})}
        except CorruptCacheError as e:
            if self.on_corrupt == "raise":
                raise
            logger.warning("skipping a corrupt window (data.on_corrupt=skip): %s", e)
            return None
        meta = visit.meta
        window_id, scene_id, frame_ids = meta["window_ids"][row], meta["scene_ids"][row], meta["frame_ids"][row]
        corr = {}
        for key in _CORR_KEYS:
            block = blocks[key]
            S = block.shape[0]
            if block.shape[:2] != (S, S) or S != len(frame_ids):
                raise SchemaError(key, f"row {row} has shape {block.shape}, the shard lists {len(frame_ids)} views", where=f"shard {shard_id}")
            corr[key] = block[np.ix_(views, views)]
        if proc.readers[source] is None:
            images, intrinsics, extrinsics = stored_window(blocks, views, self.view_sizes[source], self.resolution,
                                                           where=f"{self.sources[source].path}: shard {shard_id}, window {window_id}")
        else:
            from cameo_corr.datasets.canonical import load_window

            reader = proc.readers[source]
            record = WindowRecord.from_frames(window_id, meta["datasets"][row], meta["splits"][row], scene_id,
                                              [frame_ids[i] for i in views], proc.frames(scene_id, source), root=str(reader.root))
            data = load_window(reader, record, proc.views[source], with_depth=False)
            images, intrinsics, extrinsics = data.images, data.intrinsics, data.extrinsics
        image = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
        return {
            "image": image,
            "intrinsic": torch.from_numpy(np.asarray(intrinsics, dtype=np.float32)),
            "extrinsic": torch.from_numpy(np.asarray(extrinsics, dtype=np.float32)),
            "tag": self.sources[source].tag or self.tags.get(meta["datasets"][row], meta["datasets"][row]),
            "window_id": window_id,
            "num_ref": num_ref,
            "corr_nn": torch.from_numpy(corr["nn"].astype(np.int64)),
            "corr_mask": torch.from_numpy(corr["mask"].astype(np.bool_)),
            "corr_dist": torch.from_numpy(corr["dist"].astype(np.float32)),
        }


class CarryErrors(IterableDataset):
    """``dataset`` as the DataLoader's workers run it, with our errors carried out as data.

    PyTorch re-raises an error of a worker process by calling its class with one formatted message,
    which our errors (they name a file and a field) and botocore's (keyword arguments only) do not
    take: a corrupt chunk or an unreachable object store met by a worker became a ``RuntimeError`` with
    two tracebacks. Here a :class:`~cameo_corr.schemas.CameoCorrError` or an error of the store
    (:func:`~cameo_corr.cache.location.store_errors`: ``OSError``, botocore's) raised while iterating
    ends the worker's stream with a batch ``{WORKER_ERROR_KEY: error}`` (the error itself when it
    pickles, else a ``CameoCorrError`` with its message), which :class:`StreamLoader` raises in the
    training process.
    """

    def __init__(self, dataset: "CorrStreamDataset") -> None:
        self.dataset = dataset

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import pickle

        from cameo_corr.cache.location import store_errors

        try:
            yield from self.dataset
        except (CameoCorrError, *store_errors()) as e:
            if get_worker_info() is None:
                raise
            try:
                carried: Exception = pickle.loads(pickle.dumps(e))
            except Exception:  # noqa: BLE001 - an error class that cannot be rebuilt: keep its message
                carried = CameoCorrError(str(e))
            yield {WORKER_ERROR_KEY: carried}


class StreamLoader:
    """A ``DataLoader`` over a :class:`CorrStreamDataset` that knows how far it was read.

    The dataset yields collated batches itself (``batch_size`` set on the dataset), so the wrapped
    ``DataLoader`` runs with ``batch_size=None``; workers take batches round-robin, which is the order
    the ``DataLoader`` returns them in. Corrupt windows skipped by the dataset are counted in
    :attr:`corrupt_skipped` (and in the stream position); a whole epoch of this rank's stream skipped
    in a row is an error (nothing left to train on). An error of ours in a worker is raised here as
    itself (:class:`CarryErrors`). :meth:`state_dict` is the stream state after the batches
    consumed so far; after :meth:`load_state_dict` the next iteration yields exactly the remaining
    batches. Every iteration starts fresh workers with a copy of the dataset at the current state
    (persistent workers would keep a stale start state, so they are not offered). ``num_workers``
    defaults to the dataset's, whose epoch order is dealt to that many workers (each then decodes its
    own shards); another count still yields the stream in order, with more shard decodes. The
    ``DataLoader``'s own base seed comes from a private generator, so iterating never touches the
    global torch RNG (which the training loop checkpoints).
    """

    def __init__(
        self,
        dataset: CorrStreamDataset,
        *,
        num_workers: int | None = None,
        multiprocessing_context: str | None = None,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ) -> None:
        if dataset.batch_size is None:
            raise SchemaError("batch_size", "StreamLoader needs a dataset built with batch_size")
        num_workers = dataset.num_workers if num_workers is None else int(num_workers)
        if multiprocessing_context is not None and num_workers == 0:
            raise SchemaError("multiprocessing_context", "given but num_workers is 0")
        if max(num_workers, 1) != max(dataset.num_workers, 1):
            logger.warning("a StreamLoader of %d workers over a stream dealt to %d (the dataset's num_workers): the order is "
                           "kept, but its workers decode shards of each other's lanes", num_workers, dataset.num_workers)
        self.dataset = dataset
        self.num_workers = num_workers
        self.multiprocessing_context = multiprocessing_context
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self._consumed = 0
        self.corrupt_skipped = 0
        """Corrupt windows left out so far (``on_corrupt="skip"``)."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Restart from what was consumed: the workers get a dataset copy starting there.
        self.dataset.state = self.dataset.state_after(self._consumed)
        self._consumed = 0
        generator = torch.Generator().manual_seed(self.dataset.seed)
        loader = DataLoader(
            CarryErrors(self.dataset),
            batch_size=None,
            num_workers=self.num_workers,
            multiprocessing_context=self.multiprocessing_context,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
            generator=generator,
        )
        in_a_row = 0  # corrupt windows skipped since the last kept sample
        for batch in loader:
            if WORKER_ERROR_KEY in batch:
                raise batch[WORKER_ERROR_KEY]
            skipped = int(batch.pop(SKIPPED_KEY, 0))
            self.corrupt_skipped += skipped
            self._consumed += skipped + (len(batch["num_ref"]) if batch else 0)
            in_a_row = 0 if batch else in_a_row + skipped
            if in_a_row >= self.dataset.epoch_length:
                raise CameoCorrError(
                    f"data.on_corrupt=skip: the last {in_a_row} windows read were all corrupt, a whole epoch of this "
                    "rank's stream, so nothing is left to train on; list them with `cameo-corr cache verify --deep` and "
                    "recompute them with `cameo-corr preprocess --repair`")
            if batch:
                yield batch

    def state_dict(self) -> dict[str, int]:
        """The stream state after the samples consumed so far (:meth:`CorrStreamDataset.state_dict_of`)."""
        return self.dataset.state_dict_of(self.dataset.state_after(self._consumed))

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from ``state`` at the next iteration."""
        self.dataset.load_state_dict(state)
        self._consumed = 0
