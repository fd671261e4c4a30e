"""Exact 3D nearest neighbours with the lowest-index tie rule, in one KD-tree pass (compiled with numba).

``nearest(queries [n, 3], keys [m, 3])`` (float64) returns, for every query row, the index of the key at
the smallest **reference distance** ``(q0-k0)^2 + (q1-k1)^2 + (q2-k2)^2`` (float64, each square rounded
once, summed in that order: the metric of :mod:`cameo_corr.pipeline.match`) and that squared distance;
among keys at exactly the same distance the lowest index wins.

Library trees (scipy's ``cKDTree``, ``pykdtree``) return *a* nearest key; to honour the tie rule one has
to ask them for two neighbours and re-do the rows whose two distances are (nearly) equal, and the second
neighbour costs 30-60% more than the first. This tree proves the tie rule during the search itself, at
the price of one nearest-neighbour query:

* Build: median splits along the widest axis of each node's bounding box (quickselect on an index
  permutation), down to leaves of at most ``leaf`` keys; every node keeps the bounding box of its keys,
  whose corners are key coordinates.
* Query: depth first, near child first; a node is skipped only when the lower bound of the reference
  distance to its box **exceeds** the best distance found so far (strictly), so every key at the minimum
  distance is examined, and a key replaces the best one when it is closer, or as close with a lower
  index.
* Exactness of the bound: the box bound is the reference formula evaluated on the query and the nearest
  box coordinate of each axis (0 on the axes where the query lies inside the box). Rounding is monotone,
  so for any key in the box each rounded difference is at least as large in magnitude as the bound's,
  each rounded square and each rounded sum at least as large: the bound never exceeds the reference
  distance of any key in the box, and no key at the minimum distance can be pruned.

Inputs must be finite (checked). The first call in a process compiles the functions or loads
them from numba's on-disk cache (``__pycache__`` beside this file, numba's directory in the user's cache,
or ``NUMBA_CACHE_DIR``); without a writable one it warns and compiles in every process.
"""

from __future__ import annotations

import warnings
from typing import Callable

import numba
import numpy as np

__all__ = ["LEAF_SIZE", "nearest"]

LEAF_SIZE = 16
"""Keys per leaf (at most). 8-24 are within noise of each other on token pointmaps; 16 was the fastest."""

_STACK = 128  # depth-first stack; a median-split tree of < 2**62 keys is < 64 levels deep


_UNCACHED: list[str] = []  # the functions compiled without the disk cache (warned once)


def _compiled(**options: object) -> Callable:
    """``numba.njit(nogil=True, cache=True, **options)``; where numba finds no writable cache directory
    (a read-only install without a writable home or ``NUMBA_CACHE_DIR``), it warns once and compiles
    without the disk cache, in every process."""

    def wrap(fn: Callable) -> Callable:
        try:
            return numba.njit(nogil=True, cache=True, **options)(fn)
        except RuntimeError as err:  # numba: "cannot cache function ...: no locator available"
            if not _UNCACHED:
                warnings.warn(
                    f"{err}; compiling {__name__} in every process (~3 s). Set NUMBA_CACHE_DIR to a "
                    "writable directory to keep the compiled code.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            _UNCACHED.append(fn.__name__)
            return numba.njit(nogil=True, **options)(fn)

    return wrap


@_compiled()
def _select(order: np.ndarray, keys: np.ndarray, a: int, b: int, k: int, axis: int) -> None:
    """Partition ``order[a:b]`` in place so that ``order[k]`` is a key with the k-th smallest coordinate
    ``axis`` of the range, with no larger one before it and no smaller one after it (Hoare quickselect)."""
    lo, hi = a, b - 1
    while hi > lo:
        pivot = keys[order[(lo + hi) >> 1], axis]
        i, j = lo, hi
        while i <= j:
            while keys[order[i], axis] < pivot:
                i += 1
            while keys[order[j], axis] > pivot:
                j -= 1
            if i <= j:
                order[i], order[j] = order[j], order[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            return


@_compiled()
def _build(keys: np.ndarray, leaf: int):  # noqa: ANN202 - a numba tuple of arrays
    """The tree of ``keys [m, 3]``: ``(points [m, 3] in leaf order, order [m] (key index of each point),
    box [nodes, 6] (min xyz, max xyz), span [nodes, 2] (point range), child [nodes] (first child, -1 for
    a leaf; the second is ``child + 1``), split [nodes] (the axis the children are split along))``. Node 0
    is the root."""
    m = keys.shape[0]
    order = np.arange(m)
    cap = 2 * (m // max(leaf // 2, 1)) + 3
    box = np.empty((cap, 6))
    span = np.empty((cap, 2), np.int64)
    child = np.full(cap, -1, np.int64)
    split = np.zeros(cap, np.int64)
    nodes = 1
    span[0, 0], span[0, 1] = 0, m
    stack = np.empty(_STACK, np.int64)
    stack[0] = 0
    sp = 1
    while sp > 0:
        sp -= 1
        nd = stack[sp]
        a, b = span[nd, 0], span[nd, 1]
        l0 = l1 = l2 = np.inf
        h0 = h1 = h2 = -np.inf
        for t in range(a, b):
            o = order[t]
            l0, h0 = min(l0, keys[o, 0]), max(h0, keys[o, 0])
            l1, h1 = min(l1, keys[o, 1]), max(h1, keys[o, 1])
            l2, h2 = min(l2, keys[o, 2]), max(h2, keys[o, 2])
        box[nd, 0], box[nd, 1], box[nd, 2] = l0, l1, l2
        box[nd, 3], box[nd, 4], box[nd, 5] = h0, h1, h2
        if b - a <= leaf:
            continue
        axis, width = 0, h0 - l0
        if h1 - l1 > width:
            axis, width = 1, h1 - l1
        if h2 - l2 > width:
            axis = 2
        mid = (a + b) >> 1
        _select(order, keys, a, b, mid, axis)
        c = nodes
        nodes += 2
        child[nd], split[nd] = c, axis
        span[c, 0], span[c, 1] = a, mid
        span[c + 1, 0], span[c + 1, 1] = mid, b
        stack[sp], stack[sp + 1] = c, c + 1
        sp += 2
    points = np.empty((m, 3))
    for t in range(m):
        o = order[t]
        points[t, 0], points[t, 1], points[t, 2] = keys[o, 0], keys[o, 1], keys[o, 2]
    return points, order, box[:nodes], span[:nodes], child[:nodes], split[:nodes]


@_compiled(inline="always")
def _box_bound(box: np.ndarray, nd: int, q0: float, q1: float, q2: float) -> float:
    """Lower bound of the reference distance from ``q`` to any key in node ``nd``'s box (module docstring)."""
    g = box[nd, 0] - q0
    if g < 0.0:
        g = max(q0 - box[nd, 3], 0.0)
    bound = g * g
    g = box[nd, 1] - q1
    if g < 0.0:
        g = max(q1 - box[nd, 4], 0.0)
    bound += g * g
    g = box[nd, 2] - q2
    if g < 0.0:
        g = max(q2 - box[nd, 5], 0.0)
    bound += g * g
    return bound


@_compiled()
def _nearest(queries: np.ndarray, keys: np.ndarray, leaf: int):  # noqa: ANN202 - a numba tuple of arrays
    points, order, box, span, child, split = _build(keys, leaf)
    n = queries.shape[0]
    index = np.empty(n, np.int64)
    sqdist = np.empty(n)
    stack_node = np.empty(_STACK, np.int64)
    stack_bound = np.empty(_STACK)
    none = np.int64(1) << 62
    for r in range(n):
        q0, q1, q2 = queries[r, 0], queries[r, 1], queries[r, 2]
        best, best_key = np.inf, none
        sp = 0
        nd = 0
        while True:
            c = child[nd]
            while c >= 0:  # descend to the leaf on the query's side, stacking the far children still in reach
                # the near child is the one on the query's side of the gap between the two boxes
                ax = split[nd]
                near_first = 2.0 * queries[r, ax] <= box[c, 3 + ax] + box[c + 1, ax]
                near, far = (c, c + 1) if near_first else (c + 1, c)
                bound = _box_bound(box, far, q0, q1, q2)
                if bound <= best:
                    stack_node[sp], stack_bound[sp] = far, bound
                    sp += 1
                nd = near
                c = child[nd]
            for t in range(span[nd, 0], span[nd, 1]):
                e0, e1, e2 = q0 - points[t, 0], q1 - points[t, 1], q2 - points[t, 2]
                d = e0 * e0 + e1 * e1
                d += e2 * e2
                if d < best or (d == best and order[t] < best_key):
                    best, best_key = d, order[t]
            nd = -1
            while sp > 0:  # the next stacked node still in reach of the (possibly smaller) best
                sp -= 1
                if stack_bound[sp] <= best:
                    nd = stack_node[sp]
                    break
            if nd < 0:
                break
        index[r] = best_key
        sqdist[r] = best
    return index, sqdist


def nearest(queries: np.ndarray, keys: np.ndarray, leaf: int = LEAF_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Exact nearest key of every query: ``queries [n, 3]``, ``keys [m, 3]`` (float64, finite, ``m >= 1``)
    -> ``(index int64 [n], squared reference distance float64 [n])``, lowest index on exact ties."""
    if len(keys) == 0:
        raise ValueError("nearest: no keys")
    if leaf < 1:
        raise ValueError(f"nearest: leaf must be >= 1, got {leaf}")
    q = np.ascontiguousarray(queries, dtype=np.float64)
    k = np.ascontiguousarray(keys, dtype=np.float64)
    if q.ndim != 2 or q.shape[1] != 3 or k.ndim != 2 or k.shape[1] != 3:
        raise ValueError(f"nearest: expected queries [n, 3] and keys [m, 3], got {q.shape} and {k.shape}")
    if not (np.isfinite(q).all() and np.isfinite(k).all()):
        raise ValueError("nearest: queries and keys must be finite")
    return _nearest(q, k, leaf)
