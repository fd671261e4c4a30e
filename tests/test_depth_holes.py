"""Seeded depth holes (cameo_corr.datasets.depth_holes): reproducible, at least the asked share, only
zeros added, edge bands on the far side of a discontinuity, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cameo_corr.datasets.depth_holes import punch_depth_holes


def step_depth(S: int = 2, H: int = 48, W: int = 64) -> np.ndarray:
    """A near box (depth 1) in front of a slanted far wall (depth 3 to 4), no holes."""
    wall = np.broadcast_to(np.linspace(3.0, 4.0, W, dtype=np.float32), (S, H, W)).copy()
    wall[:, 16:32, 20:40] = 1.0
    return wall


@settings(max_examples=30, deadline=None)
@given(fraction=st.floats(0.0, 0.9), seed=st.integers(0, 2**32 - 1), edge_width=st.integers(0, 3))
def test_share_zeros_only_and_reproducible(fraction: float, seed: int, edge_width: int) -> None:
    depth = step_depth()
    depth[0, :3, :5] = 0.0  # an existing hole
    depth[1, 5, 7] = np.nan  # non-finite: invalid too
    out = punch_depth_holes(depth, fraction, seed=seed, edge_width=edge_width)
    assert out.dtype == np.float32 and out.shape == depth.shape
    assert np.array_equal(out, punch_depth_holes(depth, fraction, seed=seed, edge_width=edge_width))
    holes = out == 0
    assert holes[0, :3, :5].all() and holes[1, 5, 7] and np.isfinite(out).all()
    kept = ~holes
    assert np.array_equal(out[kept], depth[kept])  # only holes are added, no value changes
    for view in holes:
        assert view.sum() >= round(fraction * view.size)


def test_blobs_fill_exactly_to_the_share_and_depend_on_the_seed() -> None:
    depth = step_depth()
    a = punch_depth_holes(depth, 0.22, seed=1, edge_width=0)
    b = punch_depth_holes(depth, 0.22, seed=2, edge_width=0)
    for view in (a, b):
        assert [int((v == 0).sum()) for v in view] == [round(0.22 * 48 * 64)] * 2
    assert not np.array_equal(a == 0, b == 0)
    assert not np.array_equal(a[0] == 0, a[1] == 0)  # each view draws its own field
    # blobs, not salt and pepper: most holes have a hole beside them
    h = a[0] == 0
    neighbours = h[1:-1, 1:-1] & (h[:-2, 1:-1] | h[2:, 1:-1] | h[1:-1, :-2] | h[1:-1, 2:])
    assert neighbours.sum() >= 0.9 * h[1:-1, 1:-1].sum()


def test_edge_bands_lie_on_the_far_side_of_a_discontinuity() -> None:
    depth = step_depth(S=1)
    out = punch_depth_holes(depth, 0.0, seed=0, edge_width=2)
    holes = out[0] == 0
    near_box = np.zeros_like(holes)
    near_box[14:34, 18:42] = True
    box = np.zeros_like(holes)
    box[16:32, 20:40] = True
    assert np.array_equal(holes, near_box & ~box)  # a 2 pixel band of wall around the box, the box intact
    assert not (punch_depth_holes(depth, 0.0, seed=0, edge_width=0) == 0).any()
    # a jump below edge_jump (the slanted wall itself) is not an edge
    assert not (punch_depth_holes(np.full((1, 8, 8), 2.0, np.float32) * np.linspace(1, 1.04, 8, dtype=np.float32), 0.0, seed=0) == 0).any()


def test_bad_arguments_name_the_argument() -> None:
    depth = step_depth()
    for kwargs, name in (
        ({"fraction": 1.0}, "fraction"),
        ({"fraction": -0.1}, "fraction"),
        ({"fraction": True}, "fraction"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"blob_sigma": 0.0}, "blob_sigma"),
        ({"edge_width": -1}, "edge_width"),
        ({"edge_jump": float("nan")}, "edge_jump"),
    ):
        args = {"fraction": 0.1, "seed": 0, **kwargs}
        with pytest.raises(ValueError, match=f"^{name}:"):
            punch_depth_holes(depth, args.pop("fraction"), **args)
    with pytest.raises(ValueError, match="^depth:"):
        punch_depth_holes(depth[0], 0.1, seed=0)
