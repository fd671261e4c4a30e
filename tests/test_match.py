"""Tests of cameo_corr.pipeline.match: tokenize, exact all-pairs NN backends, cycle masks, targets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cameo_corr.pipeline.match import (
    correspond,
    global_targets,
    match_tokens,
    pair_targets,
    resolve_backend,
    tokenize,
)
from cameo_corr.schemas import PointmapResult, SchemaError

EXACT_BACKENDS = ["torch", "kdtree", "faiss", "auto"]


# ------------------------------------------------------------------------------------------ reference
def reference_match(points: np.ndarray, valid: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SPEC §3 by explicit loops: float64 ``(a0-b0)^2 + (a1-b1)^2 + (a2-b2)^2``, lowest index on ties."""
    S, h, w, _ = points.shape
    P = points.reshape(S, h * w, 3).astype(np.float64)
    V = valid.reshape(S, h * w)
    hw = h * w
    nn = np.zeros((S, S, hw), dtype=np.int64)
    sq = np.full((S, S, hw), np.inf)
    for i in range(S):
        for j in range(S):
            for x in range(hw):
                if i == j:
                    nn[i, j, x], sq[i, j, x] = x, 0.0
                    continue
                if not V[i, x]:
                    continue
                best, arg = math.inf, -1
                for y in range(hw):
                    if not V[j, y]:
                        continue
                    d = P[i, x] - P[j, y]
                    d2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
                    if d2 < best:
                        best, arg = d2, y
                if arg >= 0:
                    nn[i, j, x], sq[i, j, x] = arg, best
    mask = np.zeros((S, S, hw), dtype=bool)
    for i in range(S):
        for j in range(S):
            for x in range(hw):
                if i == j:
                    mask[i, j, x] = V[i, x]
                elif V[i, x] and V[j].any():
                    c = nn[j, i, nn[i, j, x]]
                    mask[i, j, x] = math.hypot(x % w - c % w, x // w - c // w) <= tau
    return nn, np.sqrt(sq), mask


def assert_matches_reference(points: np.ndarray, valid: np.ndarray, tau: float = 1.5, backends=EXACT_BACKENDS) -> None:
    ref_nn, ref_dist, ref_mask = reference_match(points, valid, tau)
    for backend in backends:
        nn, dist, mask = match_tokens(torch.from_numpy(points), torch.from_numpy(valid), tau=tau, backend=backend)
        assert nn.dtype == torch.int64 and dist.dtype == torch.float32 and mask.dtype == torch.bool, backend
        np.testing.assert_array_equal(nn.numpy(), ref_nn, err_msg=backend)
        np.testing.assert_array_equal(mask.numpy(), ref_mask, err_msg=backend)
        np.testing.assert_array_equal(dist.numpy(), ref_dist.astype(np.float32), err_msg=backend)  # bit for bit


def smooth_views(S: int, h: int, w: int, seed: int) -> np.ndarray:
    """Float32 pointmaps of one smooth surface seen with small shifts (overlapping views)."""
    rng = np.random.default_rng(seed)
    u, v = np.meshgrid(np.linspace(-1, 1, w), np.linspace(-1, 1, h))
    out = []
    for _ in range(S):
        du, dv = rng.uniform(-0.2, 0.2, 2)
        x, y = u + du, v + dv
        z = 2.0 + 0.3 * np.sin(3 * x) * np.cos(2 * y)
        out.append(np.stack([x * z, y * z, z], -1))
    return np.stack(out).astype(np.float32)


# --------------------------------------------------------------------------------- backends agree
@pytest.mark.parametrize("seed", [0, 1])
def test_backends_match_reference_random(seed: int) -> None:
    rng = np.random.default_rng(seed)
    points = rng.normal(size=(3, 5, 6, 3)).astype(np.float32)
    valid = rng.random((3, 5, 6)) > 0.2
    assert_matches_reference(points, valid)


def test_backends_match_reference_structured() -> None:
    """Smooth overlapping views with holes, one view without valid tokens and one with a single one."""
    points = smooth_views(5, 6, 7, seed=3)
    valid = np.ones((5, 6, 7), dtype=bool)
    valid[0, 2:4, 3:5] = False
    valid[3] = False
    valid[4] = False
    valid[4, 2, 2] = True
    assert_matches_reference(points, valid)


def test_lattice_ties_take_lowest_index() -> None:
    """Integer lattices shifted by half a cell: every query has 2 or 4 keys at exactly the same distance
    (forcing faiss's uncertified rows through the exact fallback and the KD-tree's lowest-index rule)."""
    g = 6
    yy, xx = np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32), indexing="ij")
    a = np.stack([xx, yy, np.zeros_like(xx)], -1)
    points = np.stack([a, a + np.float32([0.5, 0.5, 0.0]), a + np.float32([0.5, 0.0, 0.0]), a.copy()])
    valid = np.ones((4, g, g), dtype=bool)
    assert_matches_reference(points, valid)
    nn, _, _ = match_tokens(torch.from_numpy(points), torch.from_numpy(valid), backend="auto")
    # token (1, 1) of view 0 is equidistant from keys (0,0), (1,0), (0,1), (1,1) of view 1: lowest wins
    assert int(nn[0, 1, 1 * g + 1]) == 0


def test_duplicate_keys_take_lowest_index() -> None:
    points = np.zeros((2, 1, 4, 3), dtype=np.float32)
    points[0, 0, :, 0] = [0.0, 1.0, 2.0, 3.0]
    points[1, 0, :, 0] = [5.0, 1.0, 1.0, 1.0]  # keys 1, 2, 3 coincide
    valid = np.ones((2, 1, 4), dtype=bool)
    assert_matches_reference(points, valid)
    nn, _, _ = match_tokens(torch.from_numpy(points), torch.from_numpy(valid))
    assert nn[0, 1].tolist() == [1, 1, 1, 0]  # query 3.0 is 2 away from key 0 (5.0) and keys 1-3 (1.0)


def test_near_ties_beyond_float32_resolution_are_exact() -> None:
    """Six keys at distance 1 + (7 - k) * 1e-9 from the query (the highest index is nearest) next to a
    far key: in float32 (faiss) all six are at distance 1, so its 4 candidates cannot be certified and
    the row is re-done exactly."""
    points = np.zeros((2, 1, 8, 3))
    points[1, 0, 0] = [3e4, 0.0, 0.0]
    for k, direction in enumerate(np.concatenate([np.eye(3), -np.eye(3)]), start=1):
        points[1, 0, k] = direction * (1.0 + (7 - k) * 1e-9)
    points[1, 0, 7] = [-3e4, 5.0, 0.0]
    points[0, 0, 1:] = np.linspace(5.0, 6.0, 7)[:, None]
    valid = np.ones((2, 1, 8), dtype=bool)
    assert_matches_reference(points, valid)
    nn, _, _ = match_tokens(torch.from_numpy(points), torch.from_numpy(valid), backend="faiss")
    assert int(nn[0, 1, 0]) == 6


@settings(max_examples=25, deadline=None)
@given(
    S=st.integers(2, 4),
    h=st.integers(1, 4),
    w=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    integer=st.booleans(),
    tau=st.sampled_from([0.0, 1.0, 1.5, 3.0]),
)
def test_backends_match_reference_property(S: int, h: int, w: int, seed: int, integer: bool, tau: float) -> None:
    rng = np.random.default_rng(seed)
    if integer:  # many exact ties
        points = rng.integers(-2, 3, size=(S, h, w, 3)).astype(np.float32)
    else:
        points = rng.normal(size=(S, h, w, 3)).astype(np.float32)
    valid = rng.random((S, h, w)) > 0.25
    assert_matches_reference(points, valid, tau=tau)


def test_backends_agree_on_larger_smooth_window() -> None:
    points = smooth_views(4, 24, 24, seed=7)
    valid = np.random.default_rng(7).random((4, 24, 24)) > 0.05
    P, V = torch.from_numpy(points), torch.from_numpy(valid)
    ref = match_tokens(P, V, backend="torch")
    for backend in ("kdtree", "faiss", "auto"):
        out = match_tokens(P, V, backend=backend)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[2], ref[2]), backend
        torch.testing.assert_close(out[1], ref[1], rtol=1e-6, atol=1e-6)
    chunked = match_tokens(P, V, backend="torch", max_elements=7)
    assert all(torch.equal(a, b) for a, b in zip(chunked, ref))
    assert ref[2][~torch.eye(4, dtype=torch.bool)].float().mean() > 0.5  # overlapping views: many matches


# ------------------------------------------------------------------- KD-tree vs float64 brute force
def assert_same_as_brute_force(points: np.ndarray, valid: np.ndarray, tau: float = 1.5) -> None:
    """``kdtree`` (a tree search that prunes only boxes provably further than the best key) against
    ``torch`` (float64 brute force over every key): identical nn, dist and mask."""
    P, V = torch.from_numpy(points), torch.from_numpy(valid)
    fast = match_tokens(P, V, tau=tau, backend="kdtree")
    brute = match_tokens(P, V, tau=tau, backend="torch")
    for name, a, b in zip(("nn", "dist", "mask"), fast, brute):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{name} differs from the float64 brute force"


@pytest.mark.parametrize("S,grid", [(4, 32), (8, 16), (2, 48)])
def test_kdtree_equals_brute_force_on_smooth_and_snapped_views(S: int, grid: int) -> None:
    """Smooth overlapping views, then the same views snapped to a 1/8 lattice: exact ties and duplicate
    points everywhere, which the tree settles by the lowest index."""
    points = smooth_views(S, grid, grid, seed=S + grid)
    valid = np.random.default_rng(grid).random((S, grid, grid)) > 0.1
    assert_same_as_brute_force(points, valid)
    snapped = (np.round(points * 8) / 8).astype(np.float32)
    assert_same_as_brute_force(snapped, valid)
    assert len(np.unique(snapped[valid], axis=0)) < valid.sum()  # the lattice really holds duplicates


def test_kdtree_degenerate_windows_match_reference() -> None:
    """Every token at one point (all keys tie), one valid token per view, duplicated key pairs, NaN at
    invalid tokens, and float64 input."""
    rng = np.random.default_rng(4)
    same = np.zeros((3, 3, 4, 3), dtype=np.float32) + np.float32([1.0, -2.0, 0.5])
    valid = rng.random((3, 3, 4)) > 0.3
    valid[:, 0, 0] = True
    assert_matches_reference(same, valid)
    nn, dist, _ = match_tokens(torch.from_numpy(same), torch.from_numpy(valid))
    first = [int(np.flatnonzero(valid[j].ravel())[0]) for j in range(3)]
    assert all(bool((nn[i, j, valid[i].ravel()] == first[j]).all()) for i in range(3) for j in range(3) if i != j)
    assert bool((dist[~torch.eye(3, dtype=torch.bool)][:, 0] == 0).all())

    one = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    single = np.zeros((4, 3, 3), dtype=bool)
    single[np.arange(4), rng.integers(0, 3, 4), rng.integers(0, 3, 4)] = True
    assert_matches_reference(one, single)

    pairs = rng.normal(size=(3, 2, 6, 3)).astype(np.float32)
    pairs[:, :, 1::2] = pairs[:, :, 0::2]  # every key has a twin at the next index
    holes = rng.random((3, 2, 6)) > 0.2
    noisy = pairs.copy()
    noisy[~holes] = np.nan
    assert_matches_reference(noisy, holes)
    assert_matches_reference(pairs.astype(np.float64), holes)


def test_kdtree_near_tie_is_exact() -> None:
    """Two keys whose squared distances to the query differ by ~1e-13 relative (resolvable in float64):
    the reference metric's nearest one, here the higher index, wins."""
    points = np.zeros((2, 1, 3, 3))
    points[0, 0, 0] = [0.0, 0.0, 0.0]
    points[1, 0, 0] = [1.0 + 1e-13, 0.0, 0.0]
    points[1, 0, 1] = [0.0, -1.0, 0.0]
    points[1, 0, 2] = [40.0, 40.0, 40.0]
    points[0, 0, 1:] = [[7.0, 7.0, 7.0], [9.0, 9.0, 9.0]]
    valid = np.ones((2, 1, 3), dtype=bool)
    assert_matches_reference(points, valid)
    nn, _, _ = match_tokens(torch.from_numpy(points), torch.from_numpy(valid), backend="kdtree")
    assert int(nn[0, 1, 0]) == 1


@settings(max_examples=30, deadline=None)
@given(
    S=st.integers(2, 5),
    h=st.integers(1, 20),
    w=st.integers(1, 20),
    seed=st.integers(0, 2**31 - 1),
    lattice=st.booleans(),
    scale=st.sampled_from([1.0, 1e-3, 1e4]),
    keep=st.floats(0.05, 1.0),
)
def test_kdtree_equals_brute_force_property(
    S: int, h: int, w: int, seed: int, lattice: bool, scale: float, keep: float
) -> None:
    """Random windows, on an integer lattice (ties) or not, at several scales and densities of valid
    tokens (including views with none or one)."""
    rng = np.random.default_rng(seed)
    if lattice:
        points = rng.integers(-3, 4, size=(S, h, w, 3)) * scale
    else:
        points = rng.normal(size=(S, h, w, 3)) * scale
    valid = rng.random((S, h, w)) < keep
    assert_same_as_brute_force(points.astype(np.float32), valid)


@settings(max_examples=30, deadline=None)
@given(
    S=st.integers(2, 5),
    h=st.integers(1, 8),
    w=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
    rel=st.sampled_from([1e-13, 1e-10, 1e-8, 1e-6]),
    keep=st.floats(0.3, 1.0),
)
def test_kdtree_near_ties_in_every_key_view_equal_brute_force(
    S: int, h: int, w: int, seed: int, rel: float, keep: float
) -> None:
    """Integer lattices nudged by multiples of ``rel`` (float64): every query has several keys whose
    squared distances differ by about ``rel`` relative (1e-13 to 1e-6) in every key view, with the valid tokens of the views before and after it as queries (the two ends
    of the gathered rows); against the explicit loop and the float64 brute force."""
    rng = np.random.default_rng(seed)
    points = rng.integers(-3, 4, size=(S, h, w, 3)).astype(np.float64)
    points += rng.integers(-2, 3, size=points.shape) * (4.0 * rel)
    valid = rng.random((S, h, w)) < keep
    assert_same_as_brute_force(points, valid)
    assert_matches_reference(points, valid, backends=["kdtree", "auto"])


# ------------------------------------------------------------------------------------- semantics
@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_identical_views_give_identity(backend: str) -> None:
    view = smooth_views(1, 8, 9, seed=1)[0]
    points = np.stack([view, view, view])
    valid = np.ones((3, 8, 9), dtype=bool)
    valid[:, 0, :3] = False
    nn, dist, mask = match_tokens(torch.from_numpy(points), torch.from_numpy(valid), backend=backend)
    v = torch.from_numpy(valid.reshape(3, -1))
    ident = torch.arange(72).expand(3, 3, 72)
    assert torch.equal(nn[:, :, v[0]], ident[:, :, v[0]])
    assert torch.equal(dist[:, :, v[0]], torch.zeros_like(dist[:, :, v[0]]))
    assert torch.equal(mask, v[:, None, :].expand(3, 3, 72))


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_invalid_tokens_are_never_matched(backend: str) -> None:
    rng = np.random.default_rng(5)
    points = rng.normal(size=(3, 6, 6, 3)).astype(np.float32)
    valid = rng.random((3, 6, 6)) > 0.4
    points[~valid] = np.nan  # invalid tokens may hold anything
    nn, dist, mask = match_tokens(torch.from_numpy(points), torch.from_numpy(valid), backend=backend)
    V = torch.from_numpy(valid.reshape(3, -1))
    for i in range(3):
        for j in range(3):
            if i == j:
                continue
            q = V[i]
            assert bool(V[j][nn[i, j, q]].all()), "a valid query matched an invalid key"
            assert not bool(mask[i, j, ~q].any()), "an invalid query is masked"
            assert bool((nn[i, j, ~q] == 0).all()) and bool(torch.isinf(dist[i, j, ~q]).all())
            targets = nn[i, j][mask[i, j]]
            assert bool(V[j][targets].all()), "an invalid token is a target"


def test_key_view_without_valid_tokens() -> None:
    points = smooth_views(3, 4, 4, seed=2)
    valid = np.ones((3, 4, 4), dtype=bool)
    valid[2] = False
    nn, dist, mask = match_tokens(torch.from_numpy(points), torch.from_numpy(valid))
    assert bool((nn[:, 2][[0, 1]] == 0).all()) and bool(torch.isinf(dist[:, 2][[0, 1]]).all())
    assert not bool(mask[:, 2].any()) and not bool(mask[2].any())


@settings(max_examples=25, deadline=None)
@given(S=st.integers(2, 4), h=st.integers(1, 5), w=st.integers(1, 5), seed=st.integers(0, 2**31 - 1),
       tau=st.floats(0.0, 4.0))
def test_mask_is_the_cycle_definition(S: int, h: int, w: int, seed: int, tau: float) -> None:
    """mask_ij[x] = |p(x) - p(nn_ji[nn_ij[x]])| <= tau (explicit loop over the returned nn)."""
    rng = np.random.default_rng(seed)
    points = rng.normal(size=(S, h, w, 3)).astype(np.float32)
    valid = rng.random((S, h, w)) > 0.2
    nn, _, mask = match_tokens(torch.from_numpy(points), torch.from_numpy(valid), tau=tau)
    V = valid.reshape(S, -1)
    for i in range(S):
        for j in range(S):
            for x in range(h * w):
                if i == j:
                    expected = V[i, x]
                elif not (V[i, x] and V[j].any()):
                    expected = False
                else:
                    c = int(nn[j, i, nn[i, j, x]])
                    expected = math.hypot(x % w - c % w, x // w - c // w) <= tau
                assert bool(mask[i, j, x]) == expected


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), S=st.integers(2, 4), h=st.integers(1, 4), w=st.integers(1, 4))
def test_mutual_neighbours_are_masked_for_any_tau(seed: int, S: int, h: int, w: int) -> None:
    rng = np.random.default_rng(seed)
    points = rng.integers(-3, 4, size=(S, h, w, 3)).astype(np.float32)
    valid = rng.random((S, h, w)) > 0.2
    nn, _, mask = match_tokens(torch.from_numpy(points), torch.from_numpy(valid), tau=0.0)
    V = torch.from_numpy(valid.reshape(S, -1))
    for i in range(S):
        for j in range(S):
            if i == j:
                continue
            x = torch.nonzero(V[i]).flatten()
            if not bool(V[j].any()):  # nothing to match: nn = 0 by convention, never masked
                assert not bool(mask[i, j].any())
                continue
            mutual = nn[j, i, nn[i, j, x]] == x
            assert bool(mask[i, j, x[mutual]].all())
            assert not bool(mask[i, j, x[~mutual]].any())  # tau = 0: only mutual neighbours


_SIGNED_PERMUTATIONS = [(p, s) for p in ([0, 1, 2], [2, 0, 1], [1, 0, 2]) for s in ([1, 1, 1], [-1, 1, -1], [1, -1, 1])]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rot=st.sampled_from(_SIGNED_PERMUTATIONS),
       shift=st.tuples(*[st.integers(-100, 100)] * 3), backend=st.sampled_from(["kdtree", "torch", "faiss"]))
def test_rigid_transform_invariance(seed: int, rot: tuple, shift: tuple, backend: str) -> None:
    """Rotations by signed axis permutations and integer translations are exact in float, so nn, mask
    and dist must be unchanged, ties included (integer coordinates)."""
    rng = np.random.default_rng(seed)
    points = rng.integers(-4, 5, size=(3, 4, 4, 3)).astype(np.float32)
    valid = rng.random((3, 4, 4)) > 0.2
    perm, sign = rot
    moved = (points[..., perm] * np.float32(sign) + np.float32(shift)).astype(np.float32)
    a = match_tokens(torch.from_numpy(points), torch.from_numpy(valid), backend=backend)
    b = match_tokens(torch.from_numpy(moved), torch.from_numpy(valid), backend=backend)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# -------------------------------------------------------------------------------------- tokenize
def _contributors(src: int, dst: int) -> list[set[int]]:
    """Source indices with a non-zero weight for each output index (bilinear, align_corners=False)."""
    scale = src / dst
    out = []
    for t in range(dst):
        c = max((t + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(math.floor(c)), src - 1)
        i1 = min(i0 + 1, src - 1)
        lam = c - i0
        out.append({i for i, wgt in ((i0, 1.0 - lam), (i1, lam)) if wgt > 0})
    return out


def test_tokenize_matches_cameo_interpolation_on_valid_input() -> None:
    rng = np.random.default_rng(0)
    points = torch.from_numpy(rng.normal(size=(2, 64, 48, 3)).astype(np.float32))
    conf = torch.from_numpy(rng.random((2, 64, 48)).astype(np.float32))
    tp, tv, tc = tokenize(points, torch.ones(2, 64, 48, dtype=torch.bool), conf, (8, 6))
    expected = F.interpolate(points.permute(0, 3, 1, 2), (8, 6), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(tp, expected)
    torch.testing.assert_close(tc, F.interpolate(conf[:, None], (8, 6), mode="bilinear", align_corners=False)[:, 0])
    assert tv.all() and tp.shape == (2, 8, 6, 3) and tv.dtype == torch.bool


@pytest.mark.parametrize("size,grid", [((64, 64), (4, 4)), ((50, 70), (8, 6)), ((20, 30), (20, 30)), ((12, 12), (32, 32))])
def test_single_invalid_pixel_invalidates_exactly_its_tokens(size: tuple[int, int], grid: tuple[int, int]) -> None:
    H, W = size
    h, w = grid
    rows, cols = _contributors(H, h), _contributors(W, w)
    points = torch.ones(1, H, W, 3)
    rng = np.random.default_rng(H * W)
    for r, c in [(0, 0), (H - 1, W - 1), (H // 2, W // 3)] + [tuple(rng.integers(0, [H, W])) for _ in range(4)]:
        for how in ("valid", "nan", "conf"):
            valid = torch.ones(1, H, W, dtype=torch.bool)
            pts, conf = points.clone(), torch.ones(1, H, W)
            if how == "valid":
                valid[0, r, c] = False
            elif how == "nan":
                pts[0, r, c, 1] = math.nan
            else:
                conf[0, r, c] = math.inf
            tp, tv, tc = tokenize(pts, valid, conf, grid)
            expected = torch.tensor([[not (r in rows[ty] and c in cols[tx]) for tx in range(w)] for ty in range(h)])
            assert torch.equal(tv[0], expected), (r, c, how)
            assert torch.isfinite(tp).all() and torch.isfinite(tc).all()
            assert bool((tp[0][~expected] == 0).all()) and bool((tc[0][~expected] == 0).all())
            torch.testing.assert_close(tp[0][expected], torch.ones_like(tp[0][expected]))


def test_tokenize_canonical_512_to_32_uses_four_pixels() -> None:
    rows = _contributors(512, 32)
    assert all(r == {16 * t + 7, 16 * t + 8} for t, r in enumerate(rows))


# ----------------------------------------------------------------------------------- correspond
def test_correspond_on_pointmap_result() -> None:
    S, H = 3, 64
    pts = torch.from_numpy(np.repeat(smooth_views(1, H, H, seed=4), S, axis=0))
    valid = torch.ones(S, H, H, dtype=torch.bool)
    valid[1, :16, :16] = False
    result = PointmapResult(points=pts, valid=valid, conf=torch.ones(S, H, H), intrinsics=torch.eye(3).expand(S, 3, 3),
                            extrinsics=torch.eye(4).expand(S, 4, 4))
    corr = correspond(result, grid=(8, 8), tau=1.5)
    assert corr.points.shape == (S, 8, 8, 3) and corr.nn.shape == (S, S, 64) and corr.mask.shape == (S, S, 64)
    assert not bool(corr.valid[1, :2, :2].any()) and bool(corr.valid[0].all())
    # identical views: valid tokens map to themselves
    q = corr.valid[0].flatten() & corr.valid[1].flatten()
    assert torch.equal(corr.nn[0, 1, q], torch.arange(64)[q])
    assert not bool(corr.mask[1, 0, ~corr.valid[1].flatten()].any())


# -------------------------------------------------------------------------------------- targets
def _random_cache(B: int, S: int, hw: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    nn = torch.randint(0, hw, (B, S, S, hw), generator=g)
    dist = torch.randint(0, 4, (B, S, S, hw), generator=g).to(torch.float16)  # float16 cache, many ties
    mask = torch.rand(B, S, S, hw, generator=g) < 0.5
    for i in range(S):
        nn[:, i, i] = torch.arange(hw)
        dist[:, i, i] = 0
        mask[:, i, i] = True  # diagonal = valid; it must never be a target
    return nn, dist, mask


def test_pair_targets() -> None:
    nn, _, mask = _random_cache(2, 3, 5, seed=0)
    target, weight = pair_targets(nn, mask)
    assert target.dtype == torch.int64 and weight.dtype == torch.bool and target.shape == nn.shape
    for b in range(2):
        for i in range(3):
            for j in range(3):
                for x in range(5):
                    sup = bool(mask[b, i, j, x]) and i != j
                    assert bool(weight[b, i, j, x]) == sup
                    assert int(target[b, i, j, x]) == (int(nn[b, i, j, x]) if sup else 0)
    t2, w2 = pair_targets(nn[0].numpy(), mask[0].numpy())  # numpy input, no batch dim
    assert torch.equal(t2, target[0]) and torch.equal(w2, weight[0])


@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 2), S=st.integers(2, 4), hw=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_global_targets_match_explicit_loop(B: int, S: int, hw: int, seed: int) -> None:
    nn, dist, mask = _random_cache(B, S, hw, seed)
    dist[torch.rand(dist.shape, generator=torch.Generator().manual_seed(seed)) < 0.1] = math.inf  # no valid key token
    view, token, weight = global_targets(nn, dist, mask)
    assert view.shape == token.shape == weight.shape == (B, S, hw)
    for b in range(B):
        for i in range(S):
            for x in range(hw):
                others = [j for j in range(S) if j != i]  # every other view, masked or not (official rule)
                js = min(others, key=lambda j: (float(dist[b, i, j, x]), j))  # lowest j on ties
                sup = bool(mask[b, i, js, x])
                assert bool(weight[b, i, x]) == sup
                assert int(view[b, i, x]) == (js if sup else 0) and int(token[b, i, x]) == (int(nn[b, i, js, x]) if sup else 0)


def test_targets_from_real_matches() -> None:
    points = smooth_views(3, 6, 6, seed=9)
    nn, dist, mask = match_tokens(torch.from_numpy(points), torch.ones(3, 6, 6, dtype=torch.bool))
    view, token, weight = global_targets(nn[None], dist[None], mask[None])
    _, pw = pair_targets(nn[None], mask[None])
    assert bool((weight <= pw.any(dim=-2)).all())  # the global target is one of the masked pairs
    assert not bool((view[0] == torch.arange(3)[:, None])[weight[0]].any())  # never the query's own view


# --------------------------------------------------------------------------------------- errors
def test_bad_inputs_raise_schema_errors() -> None:
    pts, valid = torch.zeros(2, 3, 3, 3), torch.ones(2, 3, 3, dtype=torch.bool)
    cases = [
        (dict(backend="annoy"), "backend"),
        (dict(tau=-1.0), "tau"),
        (dict(tau=math.nan), "tau"),
        (dict(max_elements=0), "max_elements"),
    ]
    for kwargs, field in cases:
        with pytest.raises(SchemaError) as e:
            match_tokens(pts, valid, **kwargs)
        assert e.value.field == field
    with pytest.raises(SchemaError) as e:
        match_tokens(pts, valid[:, :2])
    assert e.value.field == "valid"
    with pytest.raises(SchemaError) as e:
        match_tokens(pts[..., :2], valid)
    assert e.value.field == "points"
    bad = pts.clone()
    bad[0, 0, 0, 0] = math.inf
    for backend in ("kdtree", "torch"):
        with pytest.raises(SchemaError, match="non-finite") as e:
            match_tokens(bad, valid, backend=backend)
        assert e.value.field == "points"
    with pytest.raises(SchemaError) as e:
        tokenize(torch.zeros(2, 8, 8, 3), torch.ones(2, 8, 8, dtype=torch.bool), torch.ones(2, 8, 7), 4)
    assert e.value.field == "conf"
    with pytest.raises(SchemaError) as e:
        tokenize(torch.zeros(2, 8, 8, 3), torch.ones(2, 8, 8, dtype=torch.bool), torch.ones(2, 8, 8), (0, 4))
    assert e.value.field == "grid"
    with pytest.raises(SchemaError) as e:
        global_targets(torch.zeros(2, 3, 4, dtype=torch.long), torch.zeros(2, 3, 4), torch.ones(2, 3, 4, dtype=torch.bool))
    assert e.value.field == "nn"


def test_backend_resolution() -> None:
    assert resolve_backend("auto", "cpu") == "kdtree"
    assert resolve_backend("auto", "cuda") == "torch"  # no CUDA call is made to decide
    assert resolve_backend("faiss", "cpu") == "faiss"
    import faiss

    if faiss.get_num_gpus() == 0:
        with pytest.raises(SchemaError, match="no GPU support") as e:
            resolve_backend("faiss", "cuda")
        assert e.value.field == "backend"


def test_faiss_backend_without_faiss_is_refused_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "faiss", None)  # a Python where faiss cannot be imported
    points, valid = torch.from_numpy(smooth_views(3, 8, 8, seed=2)), torch.ones(3, 8, 8, dtype=torch.bool)
    for call in (lambda: resolve_backend("faiss", "cpu"), lambda: match_tokens(points, valid, backend="faiss")):
        with pytest.raises(SchemaError, match=r"'faiss' needs the faiss package.*faiss-cpu.*cameo-corr\[gpu\]") as e:
            call()
        assert e.value.field == "backend"
    assert torch.equal(match_tokens(points, valid, backend="auto")[0], match_tokens(points, valid, backend="torch")[0])


def test_faiss_gpu_matcher_logic_with_gpu_sized_distance_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """The faiss-gpu matcher's own code (centring, float32 candidates, certification with the GPU error
    bound, exact float64 re-rank) on CPU tensors, with ``faiss.knn_gpu`` stood in by CPU faiss whose
    distances get errors of up to 16 x 2^-24 (|q| + max|k|)^2 (float32-sized, a quarter of the GPU bound)
    and are re-sorted by them, as a GPU returns its candidates: the result equals brute force bit for
    bit, on lattice points with exact ties and on continuous ones, and the certification is not dead
    code: it accepts nearly every row of the continuous clouds (a TF32-sized bound accepted none). The
    stand-in also checks the call runs with the tensors' CUDA device current (faiss takes torch's stream
    of the current device). The real call runs in ``cameo-corr selfcheck`` on a GPU."""
    pytest.importorskip("faiss")
    import faiss
    import faiss.contrib.torch_utils  # noqa: F401  (faiss.knn on torch tensors, as knn_gpu takes them)

    from cameo_corr.pipeline import match as M
    from cameo_corr.selfcheck import lattice_tokens

    current: list[int] = [7]
    gen = torch.Generator().manual_seed(0)

    class device_context:  # torch.cuda.device on a machine without CUDA: records the device made current
        def __init__(self, index: int) -> None:
            self.index, self.saved = index, None

        def __enter__(self) -> None:
            self.saved, current[0] = current[0], self.index

        def __exit__(self, *exc: object) -> None:
            current[0] = self.saved

    calls: list[int] = []

    def knn_gpu(res, xq, xb, k, D=None, I=None, metric=None, device=-1, use_cuvs=False):  # noqa: E741 - faiss's names
        assert xq.dtype == xb.dtype == torch.float32 and xq.is_contiguous() and xb.is_contiguous()
        assert device == current[0] == 3, (device, current[0])
        calls.append(k)
        dist, ids = faiss.knn(xq, xb, k)
        scale = 16 * 2.0**-24 * (xq.norm(dim=1, keepdim=True) + xb.norm(dim=1).max()) ** 2
        dist = dist + scale * (2 * torch.rand(dist.shape, generator=gen) - 1)
        order = dist.argsort(dim=1)
        return dist.gather(1, order), ids.gather(1, order)

    monkeypatch.setattr(faiss, "knn_gpu", knn_gpu, raising=False)
    monkeypatch.setattr(faiss, "StandardGpuResources", GpuResources, raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "device", device_context)
    monkeypatch.setattr(M, "_GPU_RESOURCES", {})
    shares: list[float] = []
    certify = M._faiss_certified

    def recorded(*args: object) -> torch.Tensor:
        out = certify(*args)
        shares.append(float(out.double().mean()))
        return out

    monkeypatch.setattr(M, "_faiss_certified", recorded)
    cases = [lattice_tokens(torch.device("cpu"), views=4, grid=16, seed=seed) for seed in range(3)]
    cases += [(torch.from_numpy(smooth_views(4, 16, 16, seed=seed)), torch.rand(4, 16, 16, generator=gen) > 0.2) for seed in range(3)]
    for n, (points, valid) in enumerate(cases):
        shares.clear()
        p, v = points.reshape(4, 256, 3).double(), valid.reshape(4, 256)
        got = M._nearest_torch(p, v, M._faiss_gpu_nn, M.DEFAULT_MAX_ELEMENTS)
        want = M._nearest_torch(p, v, M._brute_torch_nn, M.DEFAULT_MAX_ELEMENTS)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        if n >= 3:  # continuous clouds (the lattice's exact ties go to brute force by design)
            assert min(shares) > 0.95, shares
    assert calls and current == [7]


def test_faiss_rounding_measures_the_error_the_certification_assumes() -> None:
    pytest.importorskip("faiss")
    from cameo_corr.pipeline.match import faiss_rounding

    views = torch.from_numpy(smooth_views(8, 32, 32, seed=0)).reshape(8, -1, 3)
    out = faiss_rounding(views[1:].reshape(-1, 3), views[0])
    assert 0 < out["error"] < out["bound"] / 100  # faiss-cpu on smooth clouds: ~0.03 x 2^-24
    assert out["certified"] == 1.0
    with pytest.raises(SchemaError, match="more than 4 keys"):
        faiss_rounding(views[1, :3], views[0, :4])


class GpuResources:
    """faiss's ``StandardGpuResources`` as the matcher uses it: the temporary memory it is given."""

    def __init__(self) -> None:
        self.temp_bytes: int | None = None

    def setTempMemory(self, size: int) -> None:  # noqa: N802 - faiss's name
        self.temp_bytes = size


class _FakeFaiss:
    """A faiss module whose GPU build cannot run on this GPU (a wheel without its kernels)."""

    __version__ = "1.14.1"

    def __init__(self, error: str | None) -> None:
        self.error, self.calls = error, 0

    def StandardGpuResources(self) -> "GpuResources":  # noqa: N802 - faiss's name
        return GpuResources()

    def get_num_gpus(self) -> int:
        return 1

    def knn_gpu(self, res: object, xq: np.ndarray, xb: np.ndarray, k: int, device: int = -1) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        if self.error is not None:
            raise RuntimeError(f"Error in virtual void faiss::gpu::...\n{self.error}")
        return np.zeros((len(xq), k), np.float32), np.zeros((len(xq), k), np.int64)


def test_faiss_gpu_without_kernels_for_the_gpu_is_refused_once_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """A faiss-gpu that imports and sees the GPU but cannot launch there is refused by one probe per
    process and GPU, naming the CUDA error and what to install (the real probe runs on a GPU in the
    ray-job check of ``cameo-corr selfcheck``: the job resolves its matcher before any window)."""
    import sys

    from cameo_corr.pipeline import match as M

    monkeypatch.setattr(M, "_FAISS_GPU_PROBED", {})
    monkeypatch.setattr(M, "_GPU_RESOURCES", {})  # the fake's resources stay out of the process's cache
    broken = _FakeFaiss("CUDA error 209 no kernel image is available for execution on the device")
    monkeypatch.setitem(sys.modules, "faiss", broken)
    for _ in range(2):
        with pytest.raises(SchemaError, match=r"cannot run on cuda:0 .*faiss 1\.14\.1: CUDA error 209 no kernel image.*"
                                              r"faiss-gpu-cu12==1\.9\.0\.0.*backend='torch'") as e:
            resolve_backend("faiss", "cuda:0")
        assert e.value.field == "backend" and "\n" not in str(e.value)
    assert broken.calls == 1
    working = _FakeFaiss(None)
    monkeypatch.setitem(sys.modules, "faiss", working)
    assert resolve_backend("faiss", "cuda:1") == "faiss" == resolve_backend("faiss", "cuda:1")
    assert working.calls == 1
    # one resources object per GPU and process, with bounded temporary memory (faiss's default reserves
    # up to 1.5 GiB in every process: actors sharing a GPU each held it)
    assert M._GPU_RESOURCES[1].temp_bytes == M.FAISS_GPU_TEMP_BYTES == 256 * 2**20


def test_faiss_cpu_beside_faiss_gpu_is_named_in_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """faiss-cpu and faiss-gpu-cu12 both ship the ``faiss`` module: when both are installed, the error
    of a faiss without GPU support says so and what to do."""
    import sys
    from importlib import metadata

    real_version = metadata.version

    def version(dist: str) -> str:
        return "1.9.0.0" if dist in ("faiss-cpu", "faiss-gpu-cu12") else real_version(dist)

    monkeypatch.setattr(metadata, "version", version)
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(SchemaError, match=r"faiss-cpu and faiss-gpu-cu12 are both installed .*install faiss-gpu-cu12 alone"):
        resolve_backend("faiss", "cuda")

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_torch_backend_equals_cpu() -> None:
    points = torch.from_numpy(smooth_views(4, 16, 16, seed=11))
    valid = torch.rand(4, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.1
    ref = match_tokens(points, valid, backend="kdtree")
    out = match_tokens(points.cuda(), valid.cuda(), backend="auto")
    assert out[0].device.type == "cuda"
    assert torch.equal(out[0].cpu(), ref[0]) and torch.equal(out[2].cpu(), ref[2])
    tp, tv, tc = tokenize(points.cuda(), valid.cuda(), torch.ones(4, 16, 16, device="cuda"), 8)
    cp, cv, cc = tokenize(points, valid, torch.ones(4, 16, 16), 8)
    assert torch.equal(tv.cpu(), cv)
    torch.testing.assert_close(tp.cpu(), cp)
