"""The streaming training dataset over a real (tiny) cache: order, splits, resume, permutation, workers."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cameo_corr.schemas import DatasetError, SchemaError
from cameo_corr.train.data import (
    CorrStreamDataset,
    StreamLoader,
    StreamState,
    block_order,
    collate_samples,
    deal_to_lanes,
    epoch_order,
    reference_order,
)

CROP = 64  # canonical crop of the test cache (pixels)
GRID = 8
VIEWS = 5  # S of a cached window
F = 3  # views per training sample


def build_tiny_cache(base: Path, *, scenes: int = 3, windows_per_scene: int = 2, shard_size: int = 2) -> tuple[Path, Path]:
    """Synthetic scenes -> cache through the real preprocessing job (depth backend, exact GT)."""
    from cameo_corr.datasets.synthetic import generate_dataset
    from cameo_corr.job.driver import run_preprocess

    root = generate_dataset(base / "data", scenes=scenes, frames=10, image_size=CROP, seed=0, layout="co3d")
    out = base / "cache"
    summary = run_preprocess(
        dataset="synthetic", root=root, out=out, backend="depth", grid=GRID, views=VIEWS, windows_per_scene=windows_per_scene,
        shard_size=shard_size, crop_size=CROP, workers=1, progress=False,
    )
    assert summary["windows_ok"] == scenes * windows_per_scene, summary
    return root, out


@pytest.fixture(scope="module")
def tiny_cache(tiny_train_cache: Path) -> Path:
    return tiny_train_cache


def make(cache: Path, **kw) -> CorrStreamDataset:
    """The test dataset; a stream of single samples (no ``batch_size``) draws its order per sample."""
    opts = dict(num_views=F, resolution=32, seed=3, shuffle_buffer=3, order_scope="batch" if kw.get("batch_size") else "sample")
    opts.update(kw)
    return CorrStreamDataset(cache, **opts)


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["tag"] == y["tag"] and x["window_id"] == y["window_id"]
        for k in ("image", "intrinsic", "extrinsic", "num_ref", "corr_nn", "corr_mask", "corr_dist"):
            assert torch.equal(x[k], y[k]), k


# ------------------------------------------------------------------------------------------ order
@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 6), min_size=1, max_size=6),
    seed=st.integers(0, 2**31),
    epoch=st.integers(0, 5),
    buffer=st.integers(0, 8),
)
def test_epoch_order_is_a_seeded_permutation(sizes: list[int], seed: int, epoch: int, buffer: int) -> None:
    start = np.cumsum([0] + sizes)
    shard_rows = [list(range(start[k], start[k + 1])) for k in range(len(sizes))]
    order = epoch_order(shard_rows, seed=seed, epoch=epoch, shuffle_buffer=buffer)
    assert sorted(order.tolist()) == list(range(sum(sizes)))
    assert np.array_equal(order, epoch_order(shard_rows, seed=seed, epoch=epoch, shuffle_buffer=buffer))
    if buffer <= 1:  # shard shuffle only: each shard's windows stay together and in storage order
        pos = {w: i for i, w in enumerate(order.tolist())}
        for rows in shard_rows:
            if rows:
                idx = [pos[w] for w in rows]
                assert idx == list(range(idx[0], idx[0] + len(rows)))


def _buffer_shuffle_reference(stream: list[int], size: int, rng: np.random.Generator) -> list[int]:
    """The shuffle buffer step by step: emit a uniformly drawn slot, refill it with the next item."""
    buffer, out = stream[:size], []
    for item, slot in zip(stream[size:], rng.integers(size, size=len(stream) - size).tolist()):
        out.append(buffer[slot])
        buffer[slot] = item
    return out + [buffer[i] for i in rng.permutation(size)]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 300), buffer=st.integers(2, 40), seed=st.integers(0, 2**31), epoch=st.integers(0, 3))
def test_vectorised_buffer_shuffle_equals_the_sequential_buffer(n: int, buffer: int, seed: int, epoch: int) -> None:
    shard_rows = [list(range(n))]
    expected = _buffer_shuffle_reference(list(range(n)), min(buffer, n), np.random.default_rng([seed, epoch, 1]))
    assert epoch_order(shard_rows, seed=seed, epoch=epoch, shard_shuffle=False, shuffle_buffer=buffer).tolist() == expected


def test_buffer_shuffle_keeps_locality() -> None:
    shard_rows = [list(range(10 * k, 10 * k + 10)) for k in range(10)]
    order = epoch_order(shard_rows, seed=0, epoch=0, shard_shuffle=False, shuffle_buffer=4).tolist()
    assert order != sorted(order)
    # an item leaves the buffer at most (buffer - 1) places early, so position >= index - 3
    assert all(i >= w - 3 for i, w in enumerate(order))


def test_reference_order_matches_cameo_uniform_push() -> None:
    rng = np.random.default_rng(0)
    # CAMEO uniform_push_batch: one reference -> index F // 2 - 1; else linspace(0, F - 1, n).long()
    assert reference_order(4, 1, "uniform_push", rng).tolist() == [1, 0, 2, 3]
    assert reference_order(4, 2, "uniform_push", rng).tolist() == [0, 3, 1, 2]
    assert reference_order(5, 3, "uniform_push", rng).tolist() == [0, 2, 4, 1, 3]
    assert reference_order(4, 2, "capture", rng).tolist() == [0, 1, 2, 3]
    perm = reference_order(6, 2, "shuffle", rng)
    assert sorted(perm.tolist()) == list(range(6))
    with pytest.raises(SchemaError, match="num_ref"):
        reference_order(4, 4, "uniform_push", rng)
    with pytest.raises(SchemaError, match="order"):
        reference_order(4, 1, "random", rng)
    with pytest.raises(SchemaError, match="shuffle_prob"):
        reference_order(4, 1, "mixed", rng, 1.5)


def test_mixed_order_shuffles_with_the_given_probability() -> None:
    """``mixed``: one uniform draw picks ``shuffle`` (below shuffle_prob) or ``uniform_push``, as the
    official loop does with ``random.random() < shuffle_train_rate``; the rest of the draws follow."""
    for p in (0.0, 1.0, 0.5):
        for seed in range(20):
            got = reference_order(4, 2, "mixed", np.random.default_rng(seed), p)
            rng = np.random.default_rng(seed)
            pick = "shuffle" if rng.random() < p else "uniform_push"
            assert got.tolist() == reference_order(4, 2, pick, rng).tolist()
    # frequency over many samples: shuffles that differ from the uniform_push order, F = 4, two references
    push = reference_order(4, 2, "uniform_push", np.random.default_rng(0)).tolist()
    n = 4000
    rng = np.random.default_rng(1)
    other = sum(reference_order(4, 2, "mixed", rng, 0.5).tolist() != push for _ in range(n)) / n
    assert abs(other - 0.5 * (1 - 1 / 24)) < 0.03  # a random permutation equals the push order with p = 1/24


# ------------------------------------------------------------------------------------ the dataset
def test_sample_contract_and_canonical_view(tiny_cache: Path) -> None:
    from cameo_corr.cache.reader import CorrCache

    ds = make(tiny_cache, num_epochs=1)
    cache = CorrCache(tiny_cache)
    samples = list(ds)
    assert len(samples) == len(cache.window_ids()) == ds.epoch_length
    assert Counter(s["window_id"] for s in samples) == Counter(cache.window_ids())
    assert {s["tag"] for s in samples} == {"synthetic"}  # the dataset tag: not in DEFAULT_TAGS, so its own name
    for s in samples:
        assert s["image"].shape == (F, 3, 32, 32) and s["image"].dtype == torch.float32
        assert 0.0 <= float(s["image"].min()) and float(s["image"].max()) <= 1.0
        assert s["corr_nn"].shape == (F, F, GRID * GRID) and s["corr_nn"].dtype == torch.int64
        assert s["corr_mask"].dtype == torch.bool and s["corr_dist"].dtype == torch.float32
        assert 1 <= s["num_ref"] <= F - 1
        # intrinsics: the cache's canonical-view intrinsics scaled to the training resolution
        # (same crop box), matched view by view through the extrinsics.
        arrays = cache.window(s["window_id"])
        src = match_views(s["extrinsic"].numpy(), arrays["extrinsics"])
        expected = arrays["intrinsics"][src].copy()
        expected[:, :2] *= 32 / CROP
        np.testing.assert_allclose(s["intrinsic"].numpy(), expected, rtol=1e-5, atol=1e-4)
    batch = collate_samples(samples[:2])
    assert batch["image"].shape == (2, F, 3, 32, 32) and batch["corr_nn"].shape == (2, F, F, GRID * GRID)
    assert batch["tag"] == [samples[0]["tag"], samples[1]["tag"]] and batch["num_ref"].shape == (2,)
    assert batch["window_id"] == [samples[0]["window_id"], samples[1]["window_id"]]
    mapped = next(iter(make(tiny_cache, tags={"synthetic": "others", "co3d": "co3d"})))
    assert mapped["tag"] == "others"


def match_views(extrinsics: np.ndarray, cached: np.ndarray) -> np.ndarray:
    """Index of the cached view of every sample view (identified by its camera pose)."""
    d = np.abs(extrinsics[:, None] - cached[None]).reshape(len(extrinsics), len(cached), -1).max(-1)
    src = d.argmin(1)
    assert np.all(d[np.arange(len(src)), src] < 1e-4), "sample view not found among the window's cached views"
    assert len(set(src.tolist())) == len(src)
    return src


@pytest.mark.parametrize("order", ["uniform_push", "shuffle", "mixed"])
def test_reordering_keeps_correspondences_geometric(tiny_cache: Path, order: str) -> None:
    """After the [references, targets] reordering corr_nn[i, j] still maps view i's tokens to their
    matches in view j: with the views identified independently (by camera pose), the cached token
    points of the masked pairs are at distance corr_dist and are nearest neighbours in 3D."""
    from cameo_corr.cache.reader import CorrCache

    cache = CorrCache(tiny_cache)
    ds = make(tiny_cache, order=order, num_epochs=2)
    checked = 0
    for s in ds:
        arrays = cache.window(s["window_id"])
        src = match_views(s["extrinsic"].numpy(), arrays["extrinsics"])
        points = arrays["points"].astype(np.float64).reshape(VIEWS, -1, 3)[src]  # [F, hw, 3] in sample order
        valid = arrays["valid"].reshape(VIEWS, -1)[src]
        extent = np.ptp(points[valid], axis=0).max()
        nn, mask, dist = s["corr_nn"].numpy(), s["corr_mask"].numpy(), s["corr_dist"].numpy()
        for i in range(F):
            assert np.array_equal(nn[i, i], np.arange(GRID * GRID)) and np.array_equal(mask[i, i], valid[i])
            for j in range(F):
                if i == j:
                    continue
                m = mask[i, j]
                gap = np.linalg.norm(points[i][m] - points[j][nn[i, j][m]], axis=-1)
                np.testing.assert_allclose(gap, dist[i, j][m], rtol=2e-2, atol=2e-3 * extent)
                # ... and corr_nn[i, j] is the nearest valid token of view j (the defining property)
                all_d = np.linalg.norm(points[i][m][:, None] - points[j][None], axis=-1)
                all_d[:, ~valid[j]] = np.inf
                assert np.all(gap <= all_d.min(axis=1) + 1e-3 * extent)
                checked += int(m.sum())
        if order == "uniform_push":  # references, then targets, each group in capture order
            k = int(s["num_ref"])
            assert np.all(np.diff(src[:k]) > 0) and np.all(np.diff(src[k:]) > 0)
    assert checked > 100


def test_same_seed_same_stream_other_seed_differs(tiny_cache: Path) -> None:
    a = list(make(tiny_cache, batch_size=2, num_epochs=2))
    b = list(make(tiny_cache, batch_size=2, num_epochs=2))
    assert_batches_equal(a, b)
    c = list(make(tiny_cache, batch_size=2, num_epochs=2, seed=4))
    assert [x["window_id"] for x in a] != [x["window_id"] for x in c] or any(not torch.equal(x["corr_nn"], y["corr_nn"]) for x, y in zip(a, c))
    # epochs differ in order (reshuffled) but cover the same windows
    first, second = [t for x in a[:3] for t in x["window_id"]], [t for x in a[3:] for t in x["window_id"]]
    assert sorted(first) == sorted(second)


@pytest.mark.parametrize("world", [2, 4])
def test_rank_split_disjoint_and_complete(tiny_cache: Path, world: int) -> None:
    n = len(make(tiny_cache))
    tags = [[s["window_id"] for s in make(tiny_cache, rank=r, world_size=world, num_epochs=1)] for r in range(world)]
    assert len({len(t) for t in tags}) == 1  # equal length per rank (DDP stays in step)
    everything = [t for ts in tags for t in ts]
    from cameo_corr.cache.reader import CorrCache

    assert set(everything) == set(CorrCache(tiny_cache).window_ids())
    padding = len(everything) - n
    assert padding == (-n) % world
    if padding == 0:
        assert len(set(everything)) == n


def test_worker_split_yields_the_rank_stream_in_order(tiny_cache: Path) -> None:
    ref = list(make(tiny_cache, batch_size=2, num_epochs=2))
    for workers in (1, 2):
        loader = StreamLoader(make(tiny_cache, batch_size=2, num_epochs=2), num_workers=workers, multiprocessing_context="fork")
        assert_batches_equal(list(loader), ref)


def test_spawn_workers(tiny_cache: Path) -> None:
    ref = list(make(tiny_cache, batch_size=2, num_epochs=1))
    loader = StreamLoader(make(tiny_cache, batch_size=2, num_epochs=1), num_workers=2, multiprocessing_context="spawn")
    assert_batches_equal(list(loader), ref)


def test_resume_yields_exactly_the_remaining_batches(tiny_cache: Path) -> None:
    full = list(StreamLoader(make(tiny_cache, batch_size=2, num_epochs=3)))
    assert len(full) == 9  # 6 windows x 3 epochs / 2
    for cut in (1, 4, 5):  # inside the first epoch, at the boundary, inside the second
        loader = StreamLoader(make(tiny_cache, batch_size=2, num_epochs=3))
        it = iter(loader)
        head = [next(it) for _ in range(cut)]
        state = loader.state_dict()
        assert state == {"epoch": (2 * cut) // 6, "position": (2 * cut) % 6}
        resumed = StreamLoader(make(tiny_cache, batch_size=2, num_epochs=3), num_workers=2, multiprocessing_context="fork")
        resumed.load_state_dict(state)
        assert_batches_equal(head + list(resumed), full)


def test_bad_options_raise_naming_the_field(tiny_cache: Path) -> None:
    with pytest.raises(DatasetError, match="num_views"):
        make(tiny_cache, num_views=VIEWS + 1)
    with pytest.raises(SchemaError, match="min_ref"):
        make(tiny_cache, min_ref=F)
    with pytest.raises(SchemaError, match="rank"):
        make(tiny_cache, rank=2, world_size=2)
    with pytest.raises(SchemaError, match="shuffle_prob"):
        make(tiny_cache, shuffle_prob=-0.1)
    with pytest.raises(SchemaError, match="tags"):
        make(tiny_cache, tags={"synthetic": ""})
    with pytest.raises(DatasetError, match="no 'ok' windows"):
        make(tiny_cache, split="no-such-split")
    ds = make(tiny_cache)
    with pytest.raises(SchemaError, match="position"):
        ds.load_state_dict({"epoch": 0, "position": ds.epoch_length})
    with pytest.raises(SchemaError, match="batch_size"):
        StreamLoader(make(tiny_cache))


# ------------------------------------------------------------------------------ masks at load time
def test_mask_policies_at_load_time(tiny_cache: Path) -> None:
    from cameo_corr.cache.reader import CorrCache
    from cameo_corr.pipeline.masks import cycle_mask, visibility_mask

    cache = CorrCache(tiny_cache)
    default = list(make(tiny_cache, num_epochs=1))
    # The cache's own tau, recomputed: bit-identical samples to the stored masks.
    assert_batches_equal(list(make(tiny_cache, num_epochs=1, batch_size=2, tau=cache.config.tau)),
                         list(make(tiny_cache, num_epochs=1, batch_size=2)))
    size = (CROP, CROP)
    for tau, policy in ((0.5, "cycle"), (None, "visibility"), (3.0, "both")):
        other = list(make(tiny_cache, num_epochs=1, tau=tau, mask_policy=policy))
        for s, d in zip(other, default):
            assert s["window_id"] == d["window_id"] and torch.equal(s["corr_nn"], d["corr_nn"]) and torch.equal(s["image"], d["image"])
            arrays = cache.window(s["window_id"])
            views = match_views(s["extrinsic"].numpy(), arrays["extrinsics"])
            expected = np.ones(arrays["mask"].shape, dtype=bool)
            if policy != "visibility":
                expected &= cycle_mask(arrays["nn"], arrays["valid"], tau)
            if policy != "cycle":
                expected &= visibility_mask(arrays["points"], arrays["valid"], arrays["intrinsics"], arrays["extrinsics"], size)
            assert np.array_equal(s["corr_mask"].numpy(), expected[np.ix_(views, views)]), (tau, policy)
        assert any(not torch.equal(s["corr_mask"], d["corr_mask"]) for s, d in zip(other, default)), (tau, policy)
    with pytest.raises(SchemaError, match="field 'mask_policy'"):
        make(tiny_cache, mask_policy="occlusion")
    with pytest.raises(SchemaError, match="field 'tau'"):
        make(tiny_cache, tau=-1.0)
    with pytest.raises(SchemaError, match="field 'visibility_tol'"):
        make(tiny_cache, mask_policy="both", visibility_tol=0.0)


def test_mask_config_keys() -> None:
    from cameo_corr.train.config import load_config

    cfg = load_config(None, ["data.tau=2", "data.mask_policy=both", "data.visibility_tol=0.05"])
    assert (cfg.data.tau, cfg.data.mask_policy, cfg.data.visibility_tol) == (2, "both", 0.05)
    assert load_config(None).data.tau is None and load_config(None).data.mask_policy == "cycle"
    with pytest.raises(SchemaError, match="field 'data.mask_policy': expected one of"):
        load_config(None, ["data.mask_policy=occlusion"])
    with pytest.raises(SchemaError, match="field 'data.tau'"):
        load_config(None, ["data.tau=-1"])
    with pytest.raises(SchemaError, match="field 'data.visibility_tol'"):
        load_config(None, ["data.visibility_tol=0"])
    with pytest.raises(SchemaError, match="field 'eval.mask_policy'"):
        load_config(None, ["eval.mask_policy=all"])


def test_eval_batches_can_fix_their_mask(tiny_cache: Path) -> None:
    """Runs trained with different masks are compared on the same evaluation targets (eval.mask_policy)."""
    from cameo_corr.train.config import load_config
    from cameo_corr.train.loop import make_loader

    cfg = load_config(None, [f"data.num_views={F}", "data.resolution=32", "data.mask_policy=both", "eval.mask_policy=cycle"])
    train_loader = make_loader(cfg, cache=str(tiny_cache), rank=0, world_size=1)
    eval_loader = make_loader(cfg, cache=str(tiny_cache), rank=0, world_size=1, num_epochs=1, mask_policy=cfg.eval.mask_policy)
    assert train_loader.dataset.mask_options["policy"] == "both"
    stored = make_loader(load_config(None, [f"data.num_views={F}", "data.resolution=32"]), cache=str(tiny_cache), rank=0,
                         world_size=1, num_epochs=1)
    assert eval_loader.dataset.mask_options is None
    assert_batches_equal(list(eval_loader), list(stored))


def test_reference_count_is_uniform_like_the_official_cond_num(tiny_cache: Path) -> None:
    """F = 4: num_ref uniform in [1, 3] (official ``random.randint(min_cond_num=1, max_cond_num=3)``)."""
    ds = make(tiny_cache, num_views=4)
    counts = Counter(ds.choose(0, 0, q)[1] for q in range(3000))
    assert set(counts) == {1, 2, 3}
    assert all(abs(c / 3000 - 1 / 3) < 0.03 for c in counts.values())


# ---------------------------------------------------------------------------- per-batch order draws
def view_pattern(views: np.ndarray) -> tuple[int, ...]:
    """The order of a sample's views relative to capture order: the rank of each output view among them."""
    return tuple(np.argsort(np.argsort(views)).tolist())


def test_every_sample_of_a_batch_shares_the_reference_count_and_the_order(tiny_cache: Path) -> None:
    """``order_scope="batch"`` (the default): the samples of a batch have the same number of references and
    the same order of their views (the official code draws ``cond_num``, the shuffle/push choice and the
    permutation once per batch); the draw is the batch's :meth:`batch_order`, keyed by its first stream
    position. Views are identified independently, by camera pose."""
    ds = make(tiny_cache, num_views=4, batch_size=3, num_epochs=4)
    assert ds.order_scope == "batch"
    cache = ds._process().caches[0]  # the stream's own cache reader
    seen_refs, seen_patterns = set(), set()
    for b, batch in enumerate(ds):
        num_ref, order = ds.batch_order(3 * b)
        assert batch["num_ref"].tolist() == [num_ref] * len(batch["window_id"])
        for i, wid in enumerate(batch["window_id"]):
            src = match_views(batch["extrinsic"][i].numpy(), cache.window(wid)["extrinsics"])
            assert view_pattern(src) == tuple(order.tolist())
        seen_refs.add(num_ref)
        seen_patterns.add(tuple(order.tolist()))
    assert b == 7 and len(seen_refs) > 1 and len(seen_patterns) > 1  # 24 samples in batches of 3; the draws vary


def test_batch_draws_follow_the_official_distribution(tiny_cache: Path) -> None:
    """Over many batches: ``num_ref`` uniform in [1, 3] for F = 4, ``shuffle`` with probability 0.5 (its
    permutation equals the push order with probability 1/24), every permutation reachable. With per-sample
    draws only 1/9 of the batches of 3 share a reference count."""
    ds = make(tiny_cache, num_views=4, batch_size=3)
    n = 6000
    draws = [ds.batch_order(3 * b) for b in range(n)]
    refs = Counter(r for r, _ in draws)
    assert set(refs) == {1, 2, 3} and all(abs(c / n - 1 / 3) < 0.025 for c in refs.values())
    push = {r: tuple(reference_order(4, r, "uniform_push", np.random.default_rng(0)).tolist()) for r in (1, 2, 3)}
    not_push = sum(tuple(o.tolist()) != push[r] for r, o in draws) / n
    assert abs(not_push - 0.5 * (1 - 1 / 24)) < 0.025
    assert len({tuple(o.tolist()) for _, o in draws}) == 24
    per_sample = make(tiny_cache, num_views=4, order_scope="sample")
    shared = np.mean([len({per_sample.choose(0, 0, q)[1] for q in range(3 * b, 3 * b + 3)}) == 1 for b in range(n // 2)])
    assert abs(shared - 1 / 9) < 0.02


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_draw_the_single_process_order_of_each_batch(tiny_cache: Path, world: int) -> None:
    """Each rank has its own samples, and its batch ``b`` takes the order of batch ``b`` of a single process
    (keyed by the stream position ``2 b``), so all ranks share it at every step, as the official ranks do."""
    single = make(tiny_cache, batch_size=2, num_epochs=3)
    per_rank = [list(make(tiny_cache, batch_size=2, num_epochs=3, rank=r, world_size=world)) for r in range(world)]
    assert len({len(p) for p in per_rank}) == 1
    for b, batches in enumerate(zip(*per_rank)):
        num_ref = single.batch_order(2 * b)[0]
        assert all(batch["num_ref"].tolist() == [num_ref] * len(batch["window_id"]) for batch in batches)
    assert len({wid for p in per_rank for batch in p[:1] for wid in batch["window_id"]}) == 2 * world  # their own samples


def test_per_sample_draws_stay_available(tiny_cache: Path) -> None:
    """``order_scope="sample"``: each sample draws its own reference count after its views (the samples
    are those of the per-sample policy), so batches mix reference counts; the views are the same in both
    scopes. A stream of single samples cannot draw per batch."""
    per_sample = make(tiny_cache, num_views=4, batch_size=3, num_epochs=4, order_scope="sample")
    counts = [len(set(batch["num_ref"].tolist())) for batch in per_sample]
    assert max(counts) > 1
    per_batch = make(tiny_cache, num_views=4, batch_size=3, order_scope="batch")
    for w, q in per_sample.rank_order(0):
        views, _ = per_sample.choose(int(w), 0, int(q))
        assert sorted(views.tolist()) == sorted(per_batch.choose(int(w), 0, int(q), first=0)[0].tolist())
    with pytest.raises(SchemaError, match="order_scope"):
        next(iter(make(tiny_cache, order_scope="batch")))
    with pytest.raises(SchemaError, match="first"):
        per_batch.choose(0, 0, 0)
    with pytest.raises(SchemaError, match="order_scope"):
        make(tiny_cache, order_scope="epoch")


def test_windows_are_numpy_columns_and_shards_are_read_once_per_visit(tiny_cache: Path) -> None:
    import pickle

    from cameo_corr.cache.reader import CorrCache

    ds = make(tiny_cache, num_epochs=1, shuffle_shards=0, shard_shuffle=False)
    assert {type(getattr(ds, k)) for k in ("window_row", "window_shard", "shard_start", "shard_views")} == {np.ndarray}
    assert len(pickle.dumps(ds)) < 4096  # a few bytes per window, no Python object per window
    cache = CorrCache(tiny_cache)
    shards = cache.manifest("ok", columns=["shard"]).column("shard").to_pylist()
    tags = [s["window_id"] for s in ds]
    assert sorted(tags) == cache.window_ids()
    assert ds._proc.shard_reads == len(set(shards))  # shard-ordered stream: one decode per shard visit


def _corrupt_first_shard(cache: Path, array: str = "nn") -> list[str]:
    """Flip a byte of the first chunk of ``array`` in the first shard; return the ids of its windows
    (the test cache has 2 windows per shard, both in that chunk)."""
    from test_cache import _flip_chunk_byte

    from cameo_corr.cache.layout import shard_dir
    from cameo_corr.cache.reader import CorrCache

    c = CorrCache(cache)
    shard = sorted(c.manifest("ok", columns=["shard"]).column("shard").to_pylist())[0]
    _flip_chunk_byte(cache / shard_dir(shard), array)
    return c.shard_windows(shard)["window_ids"]


def test_corrupt_window_stops_or_is_skipped_and_counted(tiny_cache: Path, tmp_path: Path) -> None:
    import shutil

    from cameo_corr.cache.shard import CorruptCacheError

    src = tmp_path / "cache"
    shutil.copytree(tiny_cache, src)
    bad = _corrupt_first_shard(src)
    with pytest.raises(CorruptCacheError, match="array 'nn', window (" + "|".join(bad) + ")"):
        list(make(src, num_epochs=1))
    loader = StreamLoader(make(src, num_epochs=1, batch_size=1, on_corrupt="skip"))
    tags = [t for b in loader for t in b["window_id"]]
    assert not set(bad) & set(tags) and len(tags) == 4 and loader.corrupt_skipped == 2
    assert loader.state_dict() == {"epoch": 1, "position": 0}
    with pytest.raises(SchemaError, match="on_corrupt"):
        make(src, on_corrupt="ignore")


# ------------------------------------------------------------------------------ shard-aware order
@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 6), min_size=1, max_size=9), seed=st.integers(0, 2**31), epoch=st.integers(0, 5),
       block=st.integers(0, 4))
def test_block_order_permutes_windows_within_blocks_of_shards(sizes: list[int], seed: int, epoch: int, block: int) -> None:
    start = np.cumsum([0] + sizes)
    order = block_order(start, seed=seed, epoch=epoch, block_shards=block)
    assert sorted(order.tolist()) == list(range(sum(sizes)))
    assert np.array_equal(order, block_order(start, seed=seed, epoch=epoch, block_shards=block))
    perm = np.random.default_rng([seed, epoch, 0]).permutation(len(sizes))  # the buffer shuffle's shard order
    rank = np.empty(len(sizes), dtype=np.int64)
    rank[perm] = np.arange(len(sizes))
    shard = np.searchsorted(start, order, side="right") - 1
    blocks = rank[shard] // max(block, 1)
    assert np.all(np.diff(blocks) >= 0)  # a block's windows are emitted together, blocks in shard order
    if block == 0:  # no window shuffle: shard after shard, storage order
        rows = [list(range(start[k], start[k + 1])) for k in perm]
        assert order.tolist() == [w for r in rows for w in r]


def test_block_order_is_uniform_within_blocks_and_over_the_epoch() -> None:
    start = np.arange(0, 24 * 8 + 1, 8)  # 24 shards of 8 windows, blocks of 4 shards (32 windows)
    first = Counter(int(block_order(start, seed=s, epoch=0, shard_shuffle=False)[0]) for s in range(3200))
    assert set(first) == set(range(32)) and min(first.values()) > 50 and max(first.values()) < 160  # ~100 each
    positions = np.zeros(192)
    for s in range(400):
        order = block_order(start, seed=s, epoch=1)
        positions[order] += np.arange(192) / 191
    assert np.abs(positions / 400 - 0.5).max() < 0.1  # every window is as likely early as late in an epoch
    order = block_order(start, seed=0, epoch=0)
    same = (np.searchsorted(start, order[1:], side="right") == np.searchsorted(start, order[:-1], side="right")).mean()
    assert 0.1 < same < 0.35  # neighbours share a shard about 7/31 of the time (storage order: 7/8)
    assert not np.array_equal(order, block_order(start, seed=0, epoch=1))


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> Path:
    """A cache of 24 shards of 8 windows through the real writer (one set of schema-valid arrays for every
    window: the order and the shard visits are under test, not the values; the tiny cache's dataset)."""
    from test_cache import config as cache_config
    from test_cache import record, token_arrays

    from cameo_corr.cache.reader import CorrCache
    from cameo_corr.cache.writer import CacheWriter, WindowOutcome
    from cameo_corr.schemas import shard_id_of

    base = tmp_path_factory.mktemp("many-shards")
    arrays = token_arrays(0)
    writer = CacheWriter(base / "cache", cache_config(dataset=dict(CorrCache(tiny_cache).config.dataset)))
    writer.initialize()
    for k in range(24):
        outs = [WindowOutcome(record(i), arrays=arrays) for i in range(8 * k, 8 * k + 8)]
        writer.write_shard(shard_id_of([o.record.window_id for o in outs]), outs)
    return base / "cache"


def epoch_decodes(ds: CorrStreamDataset, monkeypatch: pytest.MonkeyPatch) -> int:
    """``_ShardVisit`` constructions of one process reading the correspondence targets of the stream in
    order (what :meth:`CorrStreamDataset.sample` reads before the images)."""
    import cameo_corr.train.data as data

    built = []

    class Counted(data._ShardVisit):
        def __init__(self, *args, **kw) -> None:
            built.append(args[1])
            super().__init__(*args, **kw)

    monkeypatch.setattr(data, "_ShardVisit", Counted)
    proc = ds._process()
    for _, _, w, _ in ds._positions():
        source, shard_id, row = ds.locate(w)
        proc.shard(shard_id, source).corr_row(row)
    return len(built)


@pytest.mark.parametrize("world", [1, 2])
def test_default_shuffle_decodes_each_shard_once_per_epoch(many_shards: Path, monkeypatch: pytest.MonkeyPatch, world: int) -> None:
    ds = CorrStreamDataset(many_shards, num_views=2, resolution=32, num_epochs=3, world_size=world, rank=world - 1)
    assert ds.window_shuffle == "block" and len(ds.shard_ids) == 24
    assert epoch_decodes(ds, monkeypatch) <= 1.2 * 24 * 3
    # the previous policy, a 64-slot buffer over shards of 8 with 4 visits kept, decodes shards again and again
    old = CorrStreamDataset(many_shards, num_views=2, resolution=32, num_epochs=3, world_size=world, rank=world - 1,
                            window_shuffle="buffer", shuffle_buffer=64)
    assert epoch_decodes(old, monkeypatch) > 2 * 24 * 3


def test_block_shuffle_resumes_mid_epoch_exactly(many_shards: Path) -> None:
    full = list(CorrStreamDataset(many_shards, num_views=2, resolution=32, num_epochs=2, world_size=2)._positions())
    for cut in (1, 37, 96, 130):  # in the first block, mid-epoch, at the epoch boundary, in the second epoch
        ds = CorrStreamDataset(many_shards, num_views=2, resolution=32, num_epochs=2, world_size=2)
        ds.load_state_dict(ds.state_after(cut, StreamState()).__dict__)
        assert list(ds._positions()) == full[cut:]


def test_dataset_pickles_without_per_window_objects(many_shards: Path) -> None:
    import pickle

    ds = CorrStreamDataset(many_shards, num_views=2, resolution=32)
    per_window = [k for k, v in vars(ds).items() if isinstance(v, (list, tuple, dict)) and len(v) >= len(ds)]
    assert per_window == []  # no Python object per window
    assert ds.window_row.itemsize == 1 and ds.shard_views.tolist() == [3] * 24
    blob = pickle.dumps(ds)
    assert len(blob) < 4096 + 2 * len(ds) + 48 * len(ds.shard_ids)  # ~1 byte per window (its row) and ~40 per shard
    copy = pickle.loads(blob)
    assert copy._window_shard is None and np.array_equal(copy.window_shard, ds.window_shard)
    assert [copy.locate(w) for w in range(len(ds))] == [ds.locate(w) for w in range(len(ds))]


def test_window_shuffle_options_are_checked(tiny_cache: Path) -> None:
    from cameo_corr.train.config import load_config

    with pytest.raises(SchemaError, match="window_shuffle"):
        make(tiny_cache, window_shuffle="global")
    with pytest.raises(SchemaError, match="shuffle_shards"):
        make(tiny_cache, shuffle_shards=-1)
    with pytest.raises(SchemaError, match="data.window_shuffle"):
        load_config(None, ["data.window_shuffle=global"])
    with pytest.raises(SchemaError, match="data.shuffle_shards"):
        load_config(None, ["data.shuffle_shards=-2"])
    cfg = load_config(None, ["data.window_shuffle=buffer", "data.shuffle_shards=2"])
    assert (cfg.data.window_shuffle, cfg.data.shuffle_shards) == ("buffer", 2)


# ------------------------------------------------------------------------------ construction
def test_sorted_codes_number_values_in_sorted_order() -> None:
    """Shard codes by the ids' sorted order: 16-hex-digit ids through their uint64 keys; a batch with any
    other id (or a null, code -1) turns every row over to the hashed codes, with the same result."""
    import pyarrow as pa

    from cameo_corr.train.data import _SortedCodes

    rng = np.random.default_rng(0)
    pool = [f"{rng.integers(2**63):016x}" for _ in range(50)]
    batches = [[pool[i] for i in rng.integers(0, 50, 40)] for _ in range(4)]
    hex_only = _SortedCodes()
    for values in batches:
        hex_only.add(pa.array(values, pa.string()))
    codes, names = hex_only.result()
    every = list(itertools.chain(*batches))
    assert names == sorted(set(every)) and [names[c] for c in codes] == every
    mixed = _SortedCodes()
    for values in batches + [["shard-c", None, pool[0]]] + batches[:1]:
        mixed.add(pa.array(values, pa.string()))
    codes, names = mixed.result()
    every += ["shard-c", None, pool[0]] + batches[0]
    assert names == sorted({v for v in every if v is not None})
    assert [None if c < 0 else names[c] for c in codes] == every


def test_scan_takes_or_skips_constant_row_groups_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compact row group whose filter columns are constant (all ``ok``, all ``failed``) is kept or skipped
    by its statistics, without reading them; a mixed one is filtered; pending fragments too."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from test_cache import config as cache_config
    from test_cache import outcomes

    from cameo_corr.cache.consolidation import consolidate_manifest
    from cameo_corr.cache.manifest import read_manifest, scan_manifest
    from cameo_corr.cache.writer import CacheWriter

    writer = CacheWriter(tmp_path / "cache", cache_config())
    writer.initialize()
    writer.write_shard("a", outcomes(range(4)))  # ids sort as their numbers: row groups of 4 are these shards
    writer.write_shard("b", outcomes(range(4, 8), failed=range(4, 8)))
    writer.write_shard("c", outcomes(range(8, 12), failed=(9,)))
    consolidate_manifest(writer.location, row_group_size=4)
    writer.write_shard("d", outcomes(range(12, 14), failed=(13,)))  # a pending fragment
    read: list[tuple[list[int], list[str]]] = []
    real = pq.ParquetFile.iter_batches

    def iter_batches(self, *args, **kw):
        read.append((list(kw["row_groups"]), list(kw["columns"])))
        return real(self, *args, **kw)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", iter_batches)
    for expr in (pc.field("status") == "ok", (pc.field("status") == "ok") & (pc.field("split") == "train")):
        read.clear()
        got = scan_manifest(writer.location, lambda batches: pa.Table.from_batches(list(batches)), ["window_id", "row"], expr)
        want = read_manifest(writer.location, ["window_id", "row"], expr)
        assert got.to_pylist() == want.to_pylist() and got.num_rows == 4 + 3 + 1
        assert [g for g, _ in read] == [[0], [2]]  # the failed group is skipped
        assert "status" not in read[0][1] and "status" in read[1][1]


def test_construction_keeps_every_window_in_shard_and_row_order(many_shards: Path, tiny_cache: Path) -> None:
    """The dataset's columns against the manifest sorted in Python: every selected window once, by shard
    id then row; with a selection that leaves shards partly taken (the sorted path) too."""
    from cameo_corr.cache.manifest import read_manifest
    from cameo_corr.cache.reader import CorrCache

    fracs = sorted(CorrCache(tiny_cache).manifest("ok", columns=["mask_frac"]).column("mask_frac").to_pylist())
    for cache, least in ((many_shards, None), (tiny_cache, None), (tiny_cache, fracs[len(fracs) // 2])):
        ds = CorrStreamDataset(cache, num_views=2, resolution=32, min_mask_frac=least)
        rows = read_manifest(CorrCache(cache).location, ["shard", "row", "num_views", "status", "mask_frac"]).to_pylist()
        rows = sorted((r["shard"], r["row"], r["num_views"]) for r in rows if r["status"] == "ok" and (least is None or r["mask_frac"] >= least))
        assert least is None or {k for k, r, _ in rows if r} - {k for k, r, _ in rows if not r}  # a shard without its row 0
        got = [(ds.shard_ids[k], int(ds.window_row[w]), int(ds.shard_views[k])) for k in range(len(ds.shard_ids))
               for w in range(ds.shard_start[k], ds.shard_start[k + 1])]
        assert got == rows


# ------------------------------------------------------------------------------ DataLoader workers
@settings(max_examples=80, deadline=None)
@given(n=st.integers(0, 60), first=st.integers(0, 200), unit=st.integers(1, 7), lanes=st.integers(0, 4))
def test_deal_to_lanes_gives_each_lane_one_stretch_in_order(n: int, first: int, unit: int, lanes: int) -> None:
    order = np.stack([np.arange(n) * 10, np.arange(n)], axis=1)
    dealt = deal_to_lanes(order, first=first, unit=unit, lanes=lanes)
    if lanes <= 1:
        assert dealt is order
        return
    assert sorted(dealt[:, 1].tolist()) == list(range(n)) and np.array_equal(dealt[:, 0], dealt[:, 1] * 10)  # rows moved whole
    lane = (first + np.arange(n)) // unit % lanes
    stretches = [dealt[lane == i, 1].tolist() for i in range(lanes)]
    assert list(itertools.chain(*stretches)) == list(range(n))  # lane 0 the first stretch, lane 1 the next, ... each in order


def reference_rank_order(ds: CorrStreamDataset, epoch: int) -> np.ndarray:
    """The rank order as it was before the workers' lanes: block order, padded by wrapping, every world_size-th."""
    order = block_order(ds.shard_start, seed=ds.seed, epoch=epoch, block_shards=ds.shuffle_shards)
    q = np.arange(ds.epoch_length * ds.world_size)
    return np.stack([order[q % len(order)], q], axis=1)[ds.rank :: ds.world_size]


@pytest.mark.parametrize("world", [1, 2])
def test_zero_or_one_worker_keeps_the_order(many_shards: Path, world: int) -> None:
    for workers in (0, 1):
        for batch in (None, 5):
            ds = CorrStreamDataset(many_shards, num_views=2, resolution=32, world_size=world, rank=world - 1, num_workers=workers,
                                   batch_size=batch, order_scope="sample")
            for epoch in range(3):
                assert np.array_equal(ds.rank_order(epoch), reference_rank_order(ds, epoch))
    two = CorrStreamDataset(many_shards, num_views=2, resolution=32, world_size=world, rank=world - 1, num_workers=2, batch_size=5)
    dealt, before = two.rank_order(1), reference_rank_order(two, 1)
    assert not np.array_equal(dealt, before) and sorted(map(tuple, dealt.tolist())) == sorted(map(tuple, before.tolist()))


def worker_decodes(ds: CorrStreamDataset, workers: int) -> int:
    """Shard decodes of ``workers`` DataLoader workers reading the correspondence targets of the stream, each
    what ``__iter__`` reads in worker ``w`` of ``workers`` (a fresh process state each)."""
    from cameo_corr.train.data import _ProcessState

    total = 0
    for w in range(workers):
        proc = _ProcessState(ds, workers, w)
        for items in ds.worker_items(w, workers):
            for _, _, window, _ in items:
                source, shard_id, row = ds.locate(window)
                proc.shard(shard_id, source).corr_row(row)
        total += proc.shard_reads
    return total


@pytest.mark.parametrize(("world", "batch", "mixture"), [(1, 5, False), (2, 4, False), (1, None, False), (1, 3, True)])
def test_two_workers_decode_each_shard_about_once_per_epoch(many_shards: Path, world: int, batch: int | None, mixture: bool) -> None:
    from cameo_corr.train.mixture import CacheSource

    opts = {"num_views": 2, "resolution": 32, "num_epochs": 3, "world_size": world, "rank": world - 1, "batch_size": batch,
            "order_scope": "sample"}
    cache = [CacheSource(str(many_shards), 1.0), CacheSource(str(many_shards), 1.0)] if mixture else many_shards
    ds = CorrStreamDataset(cache, num_workers=2, **opts)
    shards = len(ds.shard_ids)  # each cache's, a mixture's caches apart
    assert worker_decodes(ds, 2) <= 1.2 * shards * 3
    assert worker_decodes(ds, 1) <= 1.3 * shards * 3  # one process reading both lanes keeps both lanes' blocks (LRU: a few more)
    # the previous policy: each worker takes every other batch of every block, so decodes nearly every shard
    assert worker_decodes(CorrStreamDataset(cache, num_workers=0, **opts), 2) > 1.6 * shards * 3


def test_workers_loader_yields_the_stream_order_and_resumes_exactly(tiny_cache: Path) -> None:
    stream = list(make(tiny_cache, batch_size=2, num_epochs=3, num_workers=2))
    assert [t for b in stream for t in b["window_id"]] != [t for b in make(tiny_cache, batch_size=2, num_epochs=3) for t in b["window_id"]]
    full = list(StreamLoader(make(tiny_cache, batch_size=2, num_epochs=3, num_workers=2), multiprocessing_context="fork"))
    assert_batches_equal(full, stream)
    for cut in (1, 4, 5):  # inside the first epoch, at the boundary, inside the second
        loader = StreamLoader(make(tiny_cache, batch_size=2, num_epochs=3, num_workers=2), multiprocessing_context="fork")
        it = iter(loader)
        head = [next(it) for _ in range(cut)]
        state = loader.state_dict()
        assert state == {"epoch": (2 * cut) // 6, "position": (2 * cut) % 6, "num_workers": 2}
        resumed = StreamLoader(make(tiny_cache, batch_size=2, num_epochs=3, num_workers=2), multiprocessing_context="fork")
        resumed.load_state_dict(state)
        assert_batches_equal(head + list(resumed), full)
    ds = make(tiny_cache, batch_size=2, num_epochs=3, num_workers=2)
    ds.load_state_dict(ds.state_dict_of(ds.state_after(3, StreamState())))  # any position: batches not aligned to the lanes
    assert [x for b in ds.worker_items() for x in b] == list(make(tiny_cache, batch_size=2, num_epochs=3, num_workers=2)._positions())[3:]
    with pytest.warns(UserWarning, match="num_workers=2 and is resumed with 0"):
        make(tiny_cache, batch_size=2).load_state_dict({"epoch": 0, "position": 2, "num_workers": 2})
    with pytest.raises(SchemaError, match="num_workers"):
        make(tiny_cache, num_workers=-1)


# ------------------------------------------------------------------------------ prefetch per worker
@pytest.fixture(scope="module")
def lane_shards(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> Path:
    """Twelve shards of two real windows (the tiny cache's, cycled, under new ids, so samples load their
    images) written by the real writer: lanes of several shards each."""
    import dataclasses

    from cameo_corr.cache.reader import CorrCache
    from cameo_corr.cache.writer import CacheWriter, WindowOutcome
    from cameo_corr.schemas import WindowRecord, shard_id_of

    cache = CorrCache(tiny_cache)
    reader = cache.reader()
    windows = []
    for row in cache.manifest("ok").to_pylist():
        frames = {f.frame_id: f for f in reader.scene(row["scene_id"]).frames}
        record = WindowRecord(row["window_id"], row["dataset"], row["split"], row["scene_id"], tuple(frames[f] for f in row["frame_ids"]))
        windows.append((record, cache.window(row["window_id"])))
    out = tmp_path_factory.mktemp("lane-shards") / "cache"
    writer = CacheWriter(out, cache.config)
    writer.initialize()
    for k in range(12):
        outs = [WindowOutcome(dataclasses.replace(windows[i % len(windows)][0], window_id=f"{i:016x}"), arrays=windows[i % len(windows)][1])
                for i in range(2 * k, 2 * k + 2)]
        writer.write_shard(shard_id_of([o.record.window_id for o in outs]), outs)
    return out


def prefetch_log(ds: CorrStreamDataset, worker: int, workers: int, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    """``("visit", epoch, shard index)`` for each shard decode and ``("prefetch", epoch, shard index)`` for each
    shard asked of the local cache, in order, while ``ds`` is iterated as DataLoader worker ``worker`` of
    ``workers`` sees it (``workers=0``: the main process, no worker info)."""
    from types import SimpleNamespace

    from cameo_corr.cache.reader import CorrCache
    from cameo_corr.train import data

    log: list[tuple[str, int, int]] = []
    epoch = [-1]
    choose = CorrStreamDataset.choose

    def choose_noting_the_epoch(self, window, e, q, first=None):
        epoch[0] = e  # sample() chooses the views before it visits the window's shard
        return choose(self, window, e, q, first)

    class Logged(data._ShardVisit):
        def __init__(self, *args, **kw) -> None:
            log.append(("visit", epoch[0], ds.shard_ids.index(args[1])))
            super().__init__(*args, **kw)

    info = None if workers == 0 else SimpleNamespace(id=worker, num_workers=workers)
    monkeypatch.setattr(data, "get_worker_info", lambda: info)
    monkeypatch.setattr(CorrStreamDataset, "choose", choose_noting_the_epoch)
    monkeypatch.setattr(data, "_ShardVisit", Logged)
    monkeypatch.setattr(CorrCache, "prefetch", lambda self, ids: log.extend(("prefetch", epoch[0], ds.shard_ids.index(s)) for s in ids))
    assert sum(len(b["window_id"]) if ds.batch_size else 1 for b in ds) > 0
    return log


@pytest.mark.parametrize(("dealt", "workers", "batch", "world", "start"), [
    (2, 2, 2, 1, 0),  # the loader's workers are those the order was dealt to: each reads its own lane
    (2, 2, None, 1, 0),  # single samples
    (2, 2, 3, 2, 0),  # rank 1 of 2
    (2, 2, 2, 1, 5),  # resumed mid-epoch, off the batches: each worker's batches straddle the lanes
    (2, 3, 2, 1, 0),  # more workers than lanes
    (0, 2, 2, 1, 0),  # an order not dealt, read by two workers
    (0, 0, 2, 1, 0),  # the main process: the rank's stream
])
def test_each_worker_prefetches_the_next_shards_its_own_items_reach(lane_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    dealt: int, workers: int, batch: int | None, world: int, start: int) -> None:
    depth = 2
    opts = {"num_views": 2, "resolution": 32, "num_epochs": 2, "world_size": world, "rank": world - 1, "batch_size": batch,
            "order_scope": "sample", "shuffle_shards": 2, "num_workers": dealt, "local_cache": tmp_path / "lc", "local_cache_prefetch": depth}
    own: dict[int, list[list[int]]] = {}  # per worker, per epoch: its shards in the order its items first reach them
    for w in range(max(workers, 1)):
        ds = CorrStreamDataset(lane_shards, **opts)
        ds.load_state_dict(ds.state_dict_of(StreamState(0, start)))
        items = [x for b in ds.worker_items(w, max(workers, 1)) for x in b]
        own[w] = [list(dict.fromkeys(int(ds.window_shard[win]) for _, e, win, _ in items if e == epoch)) for epoch in range(2)]
        assert [ds.worker_shards(epoch, w, max(workers, 1)).tolist() for epoch in range(2)] == own[w]
    for w in range(max(workers, 1)):
        ds = CorrStreamDataset(lane_shards, **opts)
        ds.load_state_dict(ds.state_dict_of(StreamState(0, start)))
        log = prefetch_log(ds, w, workers, monkeypatch)
        expected = []
        for kind, epoch, shard in log:
            if kind == "visit":  # a shard of its own, then the next ones its own items reach
                seq = own[w][epoch]
                expected += [("visit", epoch, shard)] + [("prefetch", epoch, k) for k in seq[seq.index(shard) + 1 : seq.index(shard) + 1 + depth]]
        assert log == expected
        # the first epoch read decodes each of its shards afresh (later ones may start on shards still held): every own shard but the first is asked
        assert {s for kind, e, s in log if kind == "prefetch" and e == 0} == set(own[w][0][1:])
        if dealt == workers > 1 and start == 0:  # one lane each: never a shard only another lane reads
            others = {s for v in own if v != w for seq in own[v] for s in seq}
            assert not {s for kind, _, s in log if kind == "prefetch"} & (others - {s for seq in own[w] for s in seq})
            assert others - {s for seq in own[w] for s in seq}  # (there are such shards)
