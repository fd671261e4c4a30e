"""Samples/s of the cached training loader vs computing the same targets online from pointmaps.

The online path is what the official CAMEO code does in its training loop: for every sample, load
the views with their pointmaps (here ground-truth depth through the ``depth`` backend, the cheapest
possible geometry), tokenize and match all ordered pairs with :func:`cameo_corr.pipeline.match.correspond`,
resize the images to the training resolution. The cached path is :class:`CorrStreamDataset`: images
plus a zarr read of the ``F x F`` block. Both produce the same sample (same windows, same view
choice and order); the script also reports how often the online targets equal the cached ones.

It also times the correspondence targets alone (``nn``/``mask``/``dist``, the ``F x F`` gather) over
one epoch in stream order, two ways measured alternately: the stream's reading (each shard decoded
once per visit, :class:`~cameo_corr.train.data.CorrStreamDataset`), and one decode per window per
array (``CorrCache.read_row``, what a per-window reader does). The default cache is one shard of 64
windows of S=8 on a 32x32 grid.

Then the window shuffles over a multi-shard epoch: the built cache's windows are written again through
the real writer as ``--epoch-shards`` shards of ``--shard-size`` windows (their arrays, new ids), and one
epoch of correspondence targets is read in stream order by a fresh process state under each policy,
alternately: ``block`` (the default: blocks of ``--shuffle-shards`` shards, each window of a block
equally likely anywhere in it) and ``buffer`` (the previous default: a ``--shuffle-buffer``-slot buffer,
4 shard visits kept). It reports shard decodes per shard per epoch and CPU seconds per sample.

Then the block shuffle read by ``--loader-workers`` DataLoader workers (batches of ``--batch-size``):
each worker's batches of the stream (:meth:`~cameo_corr.train.data.CorrStreamDataset.worker_items`,
what its ``__iter__`` reads) are read by a fresh process state of its own, alternately with the
order dealt to that many workers (``num_workers``: each worker reads its own lane of blocks) and the
previous order (``num_workers=0``: every worker takes every other batch of every block). It reports
shard decodes per shard per epoch of all workers together and CPU seconds per sample.

Usage: ``python benchmarks/bench_loader.py [--cache DIR] [--samples N] ...``. Without ``--cache`` a
synthetic dataset and its cache are built in a temporary directory first (not timed).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def build_cache(base: Path, args: argparse.Namespace) -> Path:
    """Synthetic scenes -> a cache through the real preprocessing job (depth backend)."""
    from cameo_corr.datasets.synthetic import generate_dataset
    from cameo_corr.job.driver import run_preprocess

    root = generate_dataset(base / "data", scenes=args.scenes, frames=args.frames, image_size=args.image_size, seed=0, layout="co3d")
    out = base / "cache"
    summary = run_preprocess(
        dataset="synthetic", root=root, out=out, backend="depth", grid=args.grid, views=args.views,
        windows_per_scene=args.windows_per_scene, crop_size=args.crop_size, workers=1, progress=False,
        shard_size=args.shard_size,
    )
    print(f"built cache: {summary['windows_ok']} windows in {summary['seconds']:.1f} s")
    return out


class OnlineTargets:
    """The official-code path: per sample, load pointmaps and match tokens in the loop."""

    def __init__(self, cache_path: Path, resolution: int, match_backend: str) -> None:
        from cameo_corr.pipeline.backends import make_backend
        from cameo_corr.cache.reader import CorrCache

        cache = CorrCache(cache_path)
        self.reader = cache.reader()
        self.view = cache.view()
        self.grid = tuple(cache.config.grid)
        self.tau = float(cache.config.tau)
        self.backend = make_backend("depth", device="cpu")
        self.resolution = resolution
        self.match_backend = match_backend
        self.scenes: dict[str, dict[str, Any]] = {}

    def sample(self, window: dict[str, Any], views: np.ndarray, num_ref: int) -> dict[str, Any]:
        from cameo_corr.datasets.canonical import load_window
        from cameo_corr.pipeline.match import correspond
        from cameo_corr.schemas import WindowRecord
        from cameo_corr.train.data import DEFAULT_TAGS

        scene_id = window["scene_id"]
        if scene_id not in self.scenes:
            self.scenes[scene_id] = {f.frame_id: f for f in self.reader.scene(scene_id).frames}
        frames = tuple(self.scenes[scene_id][window["frame_ids"][i]] for i in views)
        record = WindowRecord(window["window_id"], window["dataset"], window["split"], scene_id, frames)
        data = load_window(self.reader, record, self.view, with_depth=True)
        result = self.backend(data)
        corr = correspond(result, grid=self.grid, tau=self.tau, backend=self.match_backend)
        images = torch.from_numpy(data.images).permute(0, 3, 1, 2).float().div_(255.0)
        images = F.interpolate(images, size=(self.resolution, self.resolution), mode="bilinear", antialias=True, align_corners=False)
        K = torch.from_numpy(data.intrinsics).float().clone()
        K[:, :2] *= self.resolution / self.view.size
        n = len(views)
        return {
            "image": images.clamp_(0.0, 1.0),
            "intrinsic": K,
            "extrinsic": torch.from_numpy(data.extrinsics).float(),
            "tag": DEFAULT_TAGS.get(window["dataset"], window["dataset"]),
            "window_id": window["window_id"],
            "num_ref": num_ref,
            "corr_nn": corr.nn.reshape(n, n, -1).long(),
            "corr_mask": corr.mask.reshape(n, n, -1).bool(),
            "corr_dist": corr.dist.reshape(n, n, -1).float(),
        }


def time_targets_by_visit(cache: Path, ds: Any, epoch: list[tuple[int, int, int]], resolution: int) -> float:
    """Seconds per sample for the targets as the stream reads them: a fresh process state (cold:
    no shard decoded yet), each shard decoded once per visit, the ``F x F`` blocks gathered."""
    from cameo_corr.train.data import _ProcessState

    proc = _ProcessState(ds)
    t0 = time.perf_counter()
    for e, w, q in epoch:
        views, _ = ds.choose(w, e, q)
        blocks = proc.shard(ds.shard_ids[ds.window_shard[w]]).corr_row(int(ds.window_row[w]))
        for key in ("nn", "mask", "dist"):
            blocks[key][np.ix_(views, views)]
    return (time.perf_counter() - t0) / len(epoch)


def time_targets_per_window(cache: Path, ds: Any, epoch: list[tuple[int, int, int]]) -> float:
    """Seconds per sample for the same targets read window by window (``read_row``, three arrays)."""
    from cameo_corr.cache.reader import CorrCache

    store = CorrCache(cache)
    t0 = time.perf_counter()
    for e, w, q in epoch:
        views, _ = ds.choose(w, e, q)
        blocks = store.read_row(ds.shard_ids[ds.window_shard[w]], int(ds.window_row[w]), names=("nn", "mask", "dist"))
        for key in ("nn", "mask", "dist"):
            blocks[key][np.ix_(views, views)]
    return (time.perf_counter() - t0) / len(epoch)


def replicate_cache(src: Path, dst: Path, shards: int, shard_size: int) -> Path:
    """A cache of ``shards`` shards of ``shard_size`` windows written by the real writer with the arrays
    of ``src``'s windows (cycled) under new window ids (same scenes and frames), so an epoch spans many
    shards of realistic data."""
    import dataclasses

    from cameo_corr.cache.reader import CorrCache
    from cameo_corr.cache.writer import CacheWriter, WindowOutcome
    from cameo_corr.schemas import WindowRecord, shard_id_of

    cache = CorrCache(src)
    reader = cache.reader()
    scenes: dict[str, dict[str, Any]] = {}
    windows = []
    for row in cache.manifest("ok").to_pylist():
        if row["scene_id"] not in scenes:
            scenes[row["scene_id"]] = {f.frame_id: f for f in reader.scene(row["scene_id"]).frames}
        frames = tuple(scenes[row["scene_id"]][f] for f in row["frame_ids"])
        windows.append((WindowRecord(row["window_id"], row["dataset"], row["split"], row["scene_id"], frames),
                        cache.window(row["window_id"])))
    writer = CacheWriter(dst, cache.config)
    writer.initialize()
    for k in range(shards):
        outs = [WindowOutcome(dataclasses.replace(windows[i % len(windows)][0], window_id=f"{i:016x}"), arrays=windows[i % len(windows)][1])
                for i in range(k * shard_size, (k + 1) * shard_size)]
        writer.write_shard(shard_id_of([o.record.window_id for o in outs]), outs)
    return dst


def time_epoch_targets(cache: Path, policy: str, args: argparse.Namespace) -> dict[str, float]:
    """One epoch of correspondence targets in stream order under window shuffle ``policy``, read by a
    fresh process state: shard decodes per shard and CPU seconds per sample."""
    from cameo_corr.train.data import CorrStreamDataset, _ProcessState

    ds = CorrStreamDataset(cache, num_views=args.num_views, resolution=args.resolution, seed=0, order_scope="sample",
                           window_shuffle=policy, shuffle_shards=args.shuffle_shards, shuffle_buffer=args.shuffle_buffer)
    order = ds.rank_order(0)
    proc = _ProcessState(ds)
    t0 = time.process_time()
    for w, q in order.tolist():
        views, _ = ds.choose(w, 0, q)
        source, shard_id, row = ds.locate(w)
        blocks = proc.shard(shard_id, source).corr_row(row)
        for key in ("nn", "mask", "dist"):
            blocks[key][np.ix_(views, views)]
    cpu = time.process_time() - t0
    return {"decodes_per_shard": proc.shard_reads / len(ds.shard_ids), "cpu_ms_per_sample": 1000 * cpu / len(order)}


def time_worker_targets(cache: Path, dealt_to: int, args: argparse.Namespace) -> dict[str, float]:
    """One epoch of correspondence targets under the block shuffle as ``--loader-workers`` DataLoader
    workers read it, the epoch order dealt to ``dealt_to`` workers: each worker's batches in turn, by a
    fresh process state per worker; shard decodes per shard (all workers) and CPU seconds per sample."""
    from cameo_corr.train.data import CorrStreamDataset, _ProcessState

    ds = CorrStreamDataset(cache, num_views=args.num_views, resolution=args.resolution, seed=0, order_scope="sample", num_epochs=1,
                           shuffle_shards=args.shuffle_shards, batch_size=args.batch_size, num_workers=dealt_to)
    workers, decodes = args.loader_workers, 0
    t0 = time.process_time()
    for worker in range(workers):
        proc = _ProcessState(ds, workers, worker)
        for items in ds.worker_items(worker, workers):
            for _, e, w, q in items:
                views, _ = ds.choose(w, e, q)
                source, shard_id, row = ds.locate(w)
                blocks = proc.shard(shard_id, source).corr_row(row)
                for key in ("nn", "mask", "dist"):
                    blocks[key][np.ix_(views, views)]
        decodes += proc.shard_reads
    cpu = time.process_time() - t0
    return {"decodes_per_shard": decodes / len(ds.shard_ids), "cpu_ms_per_sample": 1000 * cpu / ds.epoch_length}


def compare_shuffles(cache: Path, work: Path, args: argparse.Namespace) -> dict[str, float]:
    """``block`` vs ``buffer`` over a multi-shard epoch, then the block shuffle read by ``--loader-workers``
    workers with the order dealt to them vs not, alternating, medians of ``--repeats``."""
    multi = replicate_cache(cache, work / "multi-shard", args.epoch_shards, args.shard_size)
    runs: dict[str, list[dict[str, float]]] = {"block": [], "buffer": [], "workers_dealt": [], "workers_previous": []}
    for _ in range(args.repeats):
        for policy, done in runs.items():
            if policy.startswith("workers_"):
                done.append(time_worker_targets(multi, args.loader_workers if policy == "workers_dealt" else 0, args))
            else:
                done.append(time_epoch_targets(multi, policy, args))
    med = {p: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for p, rs in runs.items()}
    return {"epoch_shards": args.epoch_shards, "epoch_windows": args.epoch_shards * args.shard_size,
            **{f"{p}_{k}": v for p, m in med.items() for k, v in m.items()},
            "shuffle_cpu_ratio": med["buffer"]["cpu_ms_per_sample"] / med["block"]["cpu_ms_per_sample"]}


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, help="existing cache (default: build a synthetic one)")
    p.add_argument("--scenes", type=int, default=8)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--crop-size", type=int, default=512, help="canonical view size of the built cache")
    p.add_argument("--grid", type=int, default=32)
    p.add_argument("--views", type=int, default=8, help="S of a cached window")
    p.add_argument("--windows-per-scene", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=64, help="windows per shard of the built cache")
    p.add_argument("--repeats", type=int, default=5, help="alternating repeats of the two target readers")
    p.add_argument("--num-views", type=int, default=4, help="F views per training sample")
    p.add_argument("--resolution", type=int, default=256, help="training resolution")
    p.add_argument("--samples", type=int, default=24)
    p.add_argument("--epoch-shards", type=int, default=16, help="shards of the multi-shard cache the shuffles are compared on")
    p.add_argument("--shuffle-shards", type=int, default=4, help="block shuffle: shards per block")
    p.add_argument("--shuffle-buffer", type=int, default=64, help="buffer shuffle: slots")
    p.add_argument("--loader-workers", type=int, default=2, help="DataLoader workers reading the block shuffle")
    p.add_argument("--batch-size", type=int, default=2, help="batch size of the workers' stream (data.batch_size)")
    p.add_argument("--match-backend", default="auto")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args(argv)

    from cameo_corr.train.data import CorrStreamDataset

    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or build_cache(Path(tmp), args)
        # Samples are timed one by one (no batches), so each draws its own view order.
        ds = CorrStreamDataset(cache, num_views=args.num_views, resolution=args.resolution, seed=0, shuffle_buffer=8,
                               order_scope="sample")
        order = np.concatenate([ds.rank_order(e) for e in range(args.samples // max(ds.epoch_length, 1) + 2)])
        epochs = np.concatenate([np.full(ds.epoch_length, e) for e in range(len(order) // ds.epoch_length)])
        items = [(int(e), int(w), int(q)) for e, (w, q) in zip(epochs, order)][: args.samples + 1]
        online = OnlineTargets(Path(cache), args.resolution, args.match_backend)

        ds.sample(items[0][1], items[0][0], items[0][2])  # warm-up (opens reader and shards)
        t0 = time.perf_counter()
        cached = [ds.sample(w, e, q) for e, w, q in items[1:]]
        t_cached = time.perf_counter() - t0

        v, r = ds.choose(items[0][1], items[0][0], items[0][2])
        online.sample(ds.window_meta(items[0][1]), v, r)  # warm-up
        t0 = time.perf_counter()
        computed = []
        for e, w, q in items[1:]:
            views, num_ref = ds.choose(w, e, q)
            computed.append(online.sample(ds.window_meta(w), views, num_ref))
        t_online = time.perf_counter() - t0

        epoch = [(0, int(w), int(q)) for w, q in ds.rank_order(0)]
        visits, per_window = [], []
        for _ in range(args.repeats):  # alternate A and B, report medians
            visits.append(time_targets_by_visit(cache, ds, epoch, args.resolution))
            per_window.append(time_targets_per_window(cache, ds, epoch))
        t_visit, t_window = float(np.median(visits)), float(np.median(per_window))
        shuffles = compare_shuffles(Path(cache), Path(tmp), args)

    both = same_nn = mask_equal = total = 0
    max_image_diff = 0.0
    for a, b in zip(cached, computed):
        assert a["window_id"] == b["window_id"] and a["tag"] == b["tag"]
        m = a["corr_mask"] & b["corr_mask"]
        both += int(m.sum())
        same_nn += int((a["corr_nn"][m] == b["corr_nn"][m]).sum())
        mask_equal += int((a["corr_mask"] == b["corr_mask"]).sum())
        total += a["corr_mask"].numel()
        max_image_diff = max(max_image_diff, float((a["image"] - b["image"]).abs().max()))
    n = len(cached)
    res = {
        "samples": n,
        "cached_samples_per_s": n / t_cached,
        "online_samples_per_s": n / t_online,
        "speedup": t_online / t_cached,
        "targets_ms_per_sample_shard_visit": 1000 * t_visit,
        "targets_ms_per_sample_per_window": 1000 * t_window,
        "targets_speedup": t_window / t_visit,
        "epoch_samples": len(epoch),
        "shards": len(ds.shard_ids),
        "online_ms_per_sample": 1000 * t_online / len(cached),
        "nn_agreement_on_masked": same_nn / max(both, 1),
        "mask_agreement": mask_equal / max(total, 1),
        "max_image_abs_diff": max_image_diff,
        **shuffles,
    }
    print(
        f"cached loader : {res['cached_samples_per_s']:8.2f} samples/s\n"
        f"online targets: {res['online_samples_per_s']:8.2f} samples/s (load GT depth, unproject, tokenize + match per sample)\n"
        f"  online: {res['online_ms_per_sample']:.2f} ms/sample\n"
        f"correspondence targets over one epoch ({res['epoch_samples']} samples, {res['shards']} shard(s), medians of "
        f"{args.repeats} alternating runs): shard read once per visit {res['targets_ms_per_sample_shard_visit']:.3f} ms/sample, "
        f"one decode per window per array {res['targets_ms_per_sample_per_window']:.3f} ms/sample "
        f"(ratio {res['targets_speedup']:.1f}x)\n"
        f"ratio cached/online: {res['speedup']:.1f}x   "
        f"(targets agree: nn {100 * res['nn_agreement_on_masked']:.2f}% of masked entries, mask {100 * res['mask_agreement']:.2f}%)\n"
        f"window shuffles over one epoch of {res['epoch_windows']} windows in {res['epoch_shards']} shards of {args.shard_size} "
        f"(targets only, medians of {args.repeats} alternating runs): block of {args.shuffle_shards} shards "
        f"{res['block_decodes_per_shard']:.2f} decodes per shard, {res['block_cpu_ms_per_sample']:.3f} CPU ms/sample; "
        f"buffer of {args.shuffle_buffer} slots {res['buffer_decodes_per_shard']:.2f} decodes per shard, "
        f"{res['buffer_cpu_ms_per_sample']:.3f} CPU ms/sample (ratio {res['shuffle_cpu_ratio']:.2f}x)\n"
        f"block shuffle read by {args.loader_workers} DataLoader workers (batches of {args.batch_size}): order dealt to the workers "
        f"{res['workers_dealt_decodes_per_shard']:.2f} decodes per shard per epoch, {res['workers_dealt_cpu_ms_per_sample']:.3f} CPU "
        f"ms/sample; previous order (every worker takes every other batch) {res['workers_previous_decodes_per_shard']:.2f} decodes "
        f"per shard, {res['workers_previous_cpu_ms_per_sample']:.3f} CPU ms/sample"
    )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
