"""Training from object storage: the node-local shard cache (LRU byte budget, shared by processes,
prefetch) against the real S3 endpoint, and the stream it feeds (same samples as a local read)."""

from __future__ import annotations

import multiprocessing as mp
import shutil
import time
from pathlib import Path

import pytest
import torch

from cameo_corr.cache.layout import SHARDS_DIR, shard_dir
from cameo_corr.cache.local_cache import LocalShardCache
from cameo_corr.cache.location import CacheLocation
from cameo_corr.cache.reader import CorrCache
from cameo_corr.schemas import CameoCorrError, DatasetError, SchemaError

pytest.importorskip("s3fs")


def upload(local: Path, bucket: str, storage_options: dict) -> str:
    """Copy a local cache to ``<bucket>/cache`` with s3fs; returns its URL."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **storage_options)
    fs.put(str(local) + "/", f"{bucket}/cache", recursive=True)
    return f"{bucket}/cache"


@pytest.fixture
def remote(tiny_train_cache: Path, s3_endpoint, s3_bucket) -> tuple[str, dict]:
    return upload(tiny_train_cache, s3_bucket, s3_endpoint.storage_options), s3_endpoint.storage_options


def shard_rels(url: str, options: dict) -> list[str]:
    loc = CacheLocation(url, options)
    return [f"{SHARDS_DIR}/{n}" for n in loc.listdir(SHARDS_DIR)]


def stream(source: str, options: dict | None, **kw) -> list[dict]:
    from cameo_corr.train.data import CorrStreamDataset

    ds = CorrStreamDataset(source, num_views=3, resolution=32, seed=3, shuffle_buffer=3, order_scope="sample", num_epochs=2,
                           storage_options=options, **kw)
    return list(ds), ds


def test_samples_from_s3_equal_a_local_read_and_a_warm_cache_downloads_nothing(tiny_train_cache, remote, tmp_path):
    url, options = remote
    local, _ = stream(str(tiny_train_cache), None)
    cold, ds = stream(url, options, local_cache=tmp_path / "lc", local_cache_prefetch=0)
    assert len(cold) == len(local) == 12
    for x, y in zip(local, cold):
        assert x["window_id"] == y["window_id"]
        for k in ("image", "intrinsic", "extrinsic", "corr_nn", "corr_mask", "corr_dist"):
            assert torch.equal(x[k], y[k]), k
    shards = len(shard_rels(url, options))
    assert ds._process().local_cache.downloads == shards  # each shard crossed the network once over 2 epochs
    warm, ds2 = stream(url, options, local_cache=tmp_path / "lc")
    assert [s["window_id"] for s in warm] == [s["window_id"] for s in cold]
    assert ds2._process().local_cache.downloads == 0


def test_lru_budget_evicts_the_least_recently_used_shard(remote, tmp_path):
    url, options = remote
    loc = CacheLocation(url, options)
    rels = shard_rels(url, options)
    sizes = {r: loc.fs.info(loc.path(r))["size"] for r in rels}
    budget = sizes[rels[0]] + sizes[rels[1]] + min(sizes.values()) // 2  # room for two shards, not three
    cache = LocalShardCache(tmp_path / "lc", budget, prefetch=0)
    for rel in rels[:2]:
        cache.open(loc, rel).close()
    time.sleep(0.05)
    cache.open(loc, rels[0]).close()  # a hit: rels[0] is now the most recently used
    cache.open(loc, rels[2]).close()  # needs room: rels[1] goes
    assert cache.usage() <= budget
    assert cache.downloads == 3
    held = {p.name.rsplit(".", 1)[0] for p in (tmp_path / "lc").glob("*/*")}
    assert held == {rels[0].rsplit("/", 1)[1], rels[2].rsplit("/", 1)[1]}
    with loc.fs.open(loc.path(rels[2]), "rb") as f, cache.open(loc, rels[2]) as g:
        assert f.read() == g.read()
    tiny = LocalShardCache(tmp_path / "lc2", 10, prefetch=0)
    with pytest.raises(CameoCorrError, match=r"more than the whole local shard cache \(data.local_cache_bytes=10\)"):
        tiny.open(loc, rels[0])


def _open_all(directory: str, url: str, options: dict, rels: list[str], out: mp.Queue) -> None:
    cache = LocalShardCache(directory, 1 << 30, prefetch=0)
    loc = CacheLocation(url, options)
    contents = {}
    for rel in rels:
        with cache.open(loc, rel) as f:
            contents[rel] = len(f.read())
    out.put((cache.downloads, contents))


def test_two_processes_share_the_directory_and_fetch_each_shard_once(remote, tmp_path):
    url, options = remote
    rels = shard_rels(url, options)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_open_all, args=(str(tmp_path / "lc"), url, options, rels, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sum(d for d, _ in results) == len(rels)  # one download per shard across both processes
    loc = CacheLocation(url, options)
    expected = {r: loc.fs.info(loc.path(r))["size"] for r in rels}
    assert all(c == expected for _, c in results)
    assert not list((tmp_path / "lc").glob("*/*.part-*"))


def test_prefetch_fetches_the_next_shards_of_the_epoch_order(remote, tmp_path):
    from cameo_corr.train.data import CorrStreamDataset

    url, options = remote
    ds = CorrStreamDataset(url, num_views=3, resolution=32, seed=3, shuffle_buffer=1, order_scope="sample", num_epochs=1,
                           storage_options=options, local_cache=tmp_path / "lc", local_cache_prefetch=2)
    order = ds.rank_order(0)[:, 0]
    next(iter(ds))  # the first shard of the order, and two more in the background
    shards = list(dict.fromkeys(ds.window_shard[order].tolist()))
    wanted = {ds.shard_ids[k] for k in shards[:3]}
    deadline = time.time() + 30
    while time.time() < deadline:
        held = {p.name.split(".", 1)[0] for p in (tmp_path / "lc").glob("*/*") if ".part-" not in p.name}
        if held >= wanted:
            break
        time.sleep(0.05)
    assert held == wanted


def test_missing_and_rewritten_shards(remote, tmp_path):
    url, options = remote
    loc = CacheLocation(url, options)
    rels = shard_rels(url, options)
    cache = LocalShardCache(tmp_path / "lc", 1 << 30, prefetch=0)
    with pytest.raises(DatasetError, match="shards/nope.zarr.zip.*missing"):
        cache.open(loc, f"{SHARDS_DIR}/nope.zarr.zip")
    cache.open(loc, rels[0]).close()
    loc.fs.pipe(loc.path(rels[0]), b"rewritten")  # the same name, other bytes (a repaired shard)
    fresh = LocalShardCache(tmp_path / "lc", 1 << 30, prefetch=0)  # a new process lists shards/ again
    with fresh.open(loc, rels[0]) as f:
        assert f.read() == b"rewritten"
    with pytest.raises(SchemaError, match="data.local_cache"):
        LocalShardCache("s3://x/y", 10)
    with pytest.raises(SchemaError, match="data.local_cache_bytes"):
        LocalShardCache(tmp_path, 0)


def test_corrupt_shard_from_s3_still_raises_naming_the_window(tiny_train_cache, s3_endpoint, s3_bucket, tmp_path):
    from test_train_data import _corrupt_first_shard

    from cameo_corr.cache.shard import CorruptCacheError

    src = tmp_path / "cache"
    shutil.copytree(tiny_train_cache, src)
    bad = _corrupt_first_shard(src)
    url = upload(src, s3_bucket, s3_endpoint.storage_options)
    with pytest.raises(CorruptCacheError, match="array 'nn', window (" + "|".join(bad) + ")"):
        stream(url, s3_endpoint.storage_options, local_cache=tmp_path / "lc")
    cache = CorrCache(url, s3_endpoint.storage_options, local_cache=LocalShardCache(tmp_path / "lc", 1 << 30))
    shard = CorrCache(src).locate(bad[0])[0]
    assert [e.window for e in cache.corrupt_windows(shard)] == bad
    assert (tmp_path / "lc").exists() and shard_dir(shard).endswith(".zarr.zip")


def test_dataloader_workers_share_the_local_cache(tiny_train_cache, remote, tmp_path):
    from cameo_corr.train.data import CorrStreamDataset, StreamLoader

    url, options = remote

    def batches(source: str, **kw) -> list[dict]:
        ds = CorrStreamDataset(source, num_views=3, resolution=32, seed=3, shuffle_buffer=3, batch_size=2, num_epochs=1, **kw)
        return list(StreamLoader(ds, num_workers=2, multiprocessing_context="fork"))

    local = batches(str(tiny_train_cache))
    remote_batches = batches(url, storage_options=options, local_cache=tmp_path / "lc", local_cache_bytes=1 << 30)
    assert [b["window_id"] for b in remote_batches] == [b["window_id"] for b in local]
    for x, y in zip(local, remote_batches):
        assert torch.equal(x["corr_nn"], y["corr_nn"]) and torch.equal(x["image"], y["image"])
    copies = [p for p in (tmp_path / "lc").glob("*/*") if ".part-" not in p.name]
    assert len(copies) == len(shard_rels(url, options))  # one copy per shard, whichever worker fetched it
