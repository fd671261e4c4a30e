"""Tests of cameo_corr.pipeline.kdtree: the exact nearest key with the lowest-index tie rule, against a
float64 brute force written from the rule (every query-key distance in the reference metric, argmin)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cameo_corr.pipeline.kdtree import LEAF_SIZE, nearest


def brute(queries: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference: ``(q0-k0)^2 + (q1-k1)^2 + (q2-k2)^2`` in float64 for every pair, first minimal index."""
    d = queries[:, None, :] - keys[None, :, :]
    d = d * d
    sq = (d[..., 0] + d[..., 1]) + d[..., 2]
    index = sq.argmin(axis=1)
    return index, sq[np.arange(len(queries)), index]


def assert_exact(queries: np.ndarray, keys: np.ndarray, leaf: int = LEAF_SIZE) -> None:
    got_index, got_sq = nearest(queries, keys, leaf)
    want_index, want_sq = brute(queries, keys)
    assert got_index.dtype == np.int64 and got_sq.dtype == np.float64
    np.testing.assert_array_equal(got_index, want_index)
    assert np.array_equal(got_sq.view(np.int64), want_sq.view(np.int64))  # every bit


@settings(max_examples=120, deadline=None)
@given(
    n=st.integers(1, 300),
    m=st.integers(1, 400),
    leaf=st.integers(1, 24),
    kind=st.sampled_from(["normal", "lattice", "duplicates", "near-ties", "float32", "plane", "clusters"]),
    scale=st.sampled_from([1e-150, 1e-3, 1.0, 1e4, 1e150]),
    seed=st.integers(0, 2**31 - 1),
)
def test_nearest_equals_brute_force(n: int, m: int, leaf: int, kind: str, scale: float, seed: int) -> None:
    """Random keys and queries of many shapes (exact ties on lattices and duplicates, near ties down to
    1e-13 relative, flat and clustered sets, squares that underflow to 0 or overflow to inf) and leaf
    sizes: the same index and the same squared distance in every bit as the brute force."""
    rng = np.random.default_rng(seed)
    if kind == "lattice":
        keys = rng.integers(-3, 4, size=(m, 3)).astype(np.float64)
        queries = rng.integers(-6, 7, size=(n, 3)) / 2.0  # half-cells: 2, 4 or 8 keys at the same distance
    elif kind == "duplicates":
        base = rng.normal(size=(max(1, m // 4), 3))
        keys = base[rng.integers(0, len(base), m)]
        queries = np.concatenate([keys[rng.integers(0, m, n // 2)], rng.normal(size=(n - n // 2, 3))])
    elif kind == "near-ties":
        keys = rng.integers(-3, 4, size=(m, 3)).astype(np.float64)
        keys += rng.integers(-2, 3, size=keys.shape) * 4.0 * rng.choice([1e-13, 1e-10, 1e-6], size=(m, 1))
        queries = rng.integers(-6, 7, size=(n, 3)) / 2.0
    elif kind == "plane":
        keys = np.column_stack([rng.normal(size=(m, 2)), np.zeros(m)])
        queries = rng.normal(size=(n, 3))
    elif kind == "clusters":
        centres = rng.normal(size=(3, 3)) * 100.0
        keys = centres[rng.integers(0, 3, m)] + rng.normal(size=(m, 3))
        queries = centres[rng.integers(0, 3, n)] + rng.normal(size=(n, 3)) * 3.0
    else:
        keys, queries = rng.normal(size=(m, 3)), rng.normal(size=(n, 3))
    if kind == "float32":  # token points are float32 upcast to float64 (within float32's range)
        scale = min(scale, 1e30)
    keys, queries = keys * scale, queries * scale
    if kind == "float32":
        keys, queries = keys.astype(np.float32).astype(np.float64), queries.astype(np.float32).astype(np.float64)
    assert_exact(queries, keys, leaf)


def test_token_grids_with_repeated_rows_and_all_keys_equal() -> None:
    """Two smooth token grids (the pipeline's data: queries in raster order), a grid whose every key is
    the same point (all tie: index 0 for every query), one key, and no query."""
    y, x = np.meshgrid(np.linspace(-1, 1, 40), np.linspace(-1, 1, 40), indexing="ij")
    grid = np.stack([x, y, np.sin(3 * x) * np.cos(2 * y)], -1).reshape(-1, 3)
    shifted = grid + np.array([0.013, -0.021, 0.05])
    assert_exact(shifted, grid)
    assert_exact(np.repeat(grid[:10], 3, axis=0), grid)
    same = np.tile([[1.0, -2.0, 0.5]], (100, 1))
    index, sq = nearest(grid, same)
    assert (index == 0).all()
    assert_exact(grid, same, leaf=1)
    assert_exact(grid, grid[7:8])
    index, sq = nearest(np.zeros((0, 3)), grid)
    assert index.shape == sq.shape == (0,)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="no keys"):
        nearest(np.zeros((3, 3)), np.zeros((0, 3)))
    with pytest.raises(ValueError, match=r"\[n, 3\]"):
        nearest(np.zeros((3, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="finite"):
        nearest(np.zeros((3, 3)), np.array([[0.0, np.nan, 1.0]]))
    with pytest.raises(ValueError, match="finite"):
        nearest(np.array([[np.inf, 0.0, 1.0]]), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="leaf"):
        nearest(np.zeros((3, 3)), np.zeros((4, 3)), leaf=0)


def test_without_a_writable_cache_directory_it_warns_once_and_still_answers() -> None:
    """Where numba finds no writable cache directory (a read-only install without a writable home; here
    numba's list of cache locations is emptied, in a fresh interpreter), importing the module warns once,
    naming ``NUMBA_CACHE_DIR``, and the compiled-per-process functions give the exact answer."""
    code = textwrap.dedent(
        """
        import warnings
        import numpy as np
        import numba.core.caching as caching
        impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl
        impl._locator_classes = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from cameo_corr.pipeline import kdtree
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1 and "NUMBA_CACHE_DIR" in messages[0], messages
        assert kdtree._UNCACHED == ["_select", "_build", "_box_bound", "_nearest"], kdtree._UNCACHED
        keys = np.array([[1.0, 0, 0], [3.0, 0, 0], [1.0, 0, 0], [2.0, 0, 0]])
        index, sq = kdtree.nearest(np.array([[0.0, 0, 0], [2.5, 0, 0]]), keys)
        assert index.tolist() == [0, 1] and sq.tolist() == [1.0, 0.25], (index, sq)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
