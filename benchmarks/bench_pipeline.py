"""End-to-end preprocessing benchmark: depth backend on synthetic scenes, local Ray, 1 and 2 workers.

Reports, in one run (``--mode job``, the default):

* the Ray Data job (``run_job`` of this tree) with each ``--workers`` count for ``--repeats`` rounds on
  the same data and local Ray instance, measured from the cache it writes: steady windows/s after
  start-up (windows committed after the first shard / time from the first to the last shard commit,
  from the manifest fragments' mtimes), seconds to the first commit (start-up: Ray workers, backend,
  planning, first shard) and end-to-end seconds; medians, and the ratio of each worker count to the
  first;
* the share of busy time per stage: read (decode + crop in CPU tasks), backend, match, write (the
  commit task's zarr shard + manifest fragment), and bytes per window;
* our write path (zarr v3 shards, one zstd inner chunk per window, one shard file per array, + parquet
  fragment) against the common research-code path of one ``np.savez_compressed`` file per window, on
  the same window arrays, plus the time to read one random window back from each.

The hand-written actor/task scheduler that the Ray Data job replaced is no longer in the tree (its
modules were redistributed when the code was split into rooms), so the A/B against it that this
script used to run can no longer be repeated on this tree; its figures stay in the README as measured.

Usage: ``python benchmarks/bench_pipeline.py [--scenes 4 --frames 12 --image-size 256 --views 4
--windows-per-scene 8 --grid 32 --crop-size 256 --shard-size 4 --workers 1 2 --repeats 3] [--json out.json]``.

``--mode throughput`` measures one geometry worker's stages instead, in one process, window after
window (after ``--warmup`` untimed windows), on synthetic scenes written to disk:

* device stages, wall time per window (``torch.cuda.synchronize`` around each on CUDA) and windows/s:
  upload + resize to 518, the VGGT forward (``VGGTBackend.predict``: aggregator, camera head, depth
  head, under the backend's autocast), its postprocess, tokenize, and the matcher backends
  (``--match-backends``, default ``torch faiss`` on CUDA: torch brute force against faiss-gpu; ``auto
  torch faiss`` on CPU), which must agree exactly;
* host stages, CPU time per window (``time.process_time``): load + decode + crop
  (:func:`~cameo_corr.datasets.canonical.load_window`, without the masks VGGT does not read, as the
  job loads them), the two pickle hops between pipeline stages
  (loaded window, cache arrays), device -> host copy and cache dtypes
  (:func:`~cameo_corr.cache.shard.window_arrays`), and the shard + manifest fragment write
  (:class:`~cameo_corr.cache.writer.CacheWriter`, shards of ``--shard-size``);
* their ratio: host CPU seconds per window / VGGT forward seconds per window (target: below 5 %);
* the forward's FLOPs per window (``torch.utils.flop_counter`` on one untimed forward before the
  warm-up) and the rate it achieved (FLOPs / median forward time).

Models (``--model``): ``vggt-1b``, the released architecture (``vggt.models.vggt.VGGT()``, 1.26 B
parameters) with random weights, built on the device (default on CUDA, with ``--dtype bfloat16``);
``vggt-tiny``, the real architecture shrunk by
:func:`~cameo_corr.pipeline.backends.vggt.build_tiny_vggt` (default on CPU where the vggt package is
installed); ``stand-in``, a small random convolutional network with VGGT's submodule interface that is
**not** VGGT (default on CPU without the vggt package; its forward time means nothing, it only runs
the stages end to end). Random weights give meaningless cameras and depth, so the postprocess runs
on the network's depth maps with fixed cameras, and the matchers run on the depth backend's
pointmaps of the same windows (the synthetic scenes' true geometry).

GPU run: ``python benchmarks/bench_pipeline.py --mode throughput --device cuda --views 8 --windows 16
[--batch-size 1] [--json out.json]`` (needs the vggt package); CPU small mode: ``python
benchmarks/bench_pipeline.py --mode throughput --device cpu`` (4 views, 3 windows, 256 px).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import pickle
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


WRITE_REPEATS = 5
"""Timed runs of each write path (median reported), alternating zarr and npz after one warm-up pair."""


def npz_write(arrays: list[dict[str, np.ndarray]], ids: list[str], out: Path) -> float:
    """Write one compressed .npz per window; returns seconds."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for wid, a in zip(ids, arrays):
        np.savez_compressed(out / f"{wid}.npz", **a)
    return time.perf_counter() - t0


def zarr_write(arrays: list[dict[str, np.ndarray]], records: list, config, out: Path, shard_size: int) -> float:
    """Write the same windows through :class:`CacheWriter` (shards of ``shard_size``); returns seconds."""
    from cameo_corr.cache.writer import CacheWriter, WindowOutcome
    from cameo_corr.schemas import shard_id_of

    writer = CacheWriter(out, config)
    writer.initialize()
    t0 = time.perf_counter()
    for s in range(0, len(records), shard_size):
        recs = records[s : s + shard_size]
        outs = [WindowOutcome(r, arrays=a) for r, a in zip(recs, arrays[s : s + shard_size])]
        writer.write_shard(shard_id_of([r.window_id for r in recs]), outs)
    return time.perf_counter() - t0


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def commit_times(cache: Path) -> tuple[list[float], list[int]]:
    """Commit time (the shard file's mtime, UNIX seconds: a shard is written whole, then renamed into
    place) and window count (its manifest rows) of every shard, in commit order: the job's own clock,
    whatever it calls its start-up. The manifest is read after the job, consolidated or not."""
    from collections import Counter

    from cameo_corr.cache.location import CacheLocation
    from cameo_corr.cache.manifest import read_manifest

    rows = Counter(read_manifest(CacheLocation(cache), columns=["shard"]).column("shard").to_pylist())
    commits = sorted((p.stat().st_mtime, rows[p.name.removesuffix(".zarr.zip")]) for p in (cache / "shards").glob("*.zarr.zip"))
    return [t for t, _ in commits], [n for _, n in commits]


# ------------------------------------------------------------------------------ throughput mode
class _StandInAggregator(nn.Module):
    """Patch embedding + one linear layer: a token list ``[B, S, 1 + P, C]`` with a pooled first token."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 14, stride=14)
        self.mix = nn.Linear(dim, dim)

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], int]:
        B, S = images.shape[:2]
        x = self.embed(images.flatten(0, 1))
        tokens = self.mix(x.flatten(2).transpose(1, 2)).reshape(B, S, -1, x.shape[1])
        return [torch.cat([tokens.mean(2, keepdim=True), tokens], dim=2)], 1


class _StandInCameraHead(nn.Module):
    """Pose encodings ``[t, quaternion xyzw, fov_h, fov_w]`` near the identity with fields of view ~0.9 rad."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, 9)

    def forward(self, tokens_list: list[torch.Tensor]) -> list[torch.Tensor]:
        t = self.fc(tokens_list[-1][:, :, 0])
        quat = torch.cat([0.1 * torch.tanh(t[..., 3:6]), torch.ones_like(t[..., 6:7])], dim=-1)
        return [torch.cat([0.1 * torch.tanh(t[..., :3]), quat, 0.9 + 0.1 * torch.tanh(t[..., 7:9])], dim=-1)]


class _StandInDepthHead(nn.Module):
    """Positive depth and confidence at full resolution from the patch tokens (DPT head's signature)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, 2, 1)

    def forward(self, tokens_list: list[torch.Tensor], images: torch.Tensor, patch_start_idx: int,
                frames_chunk_size: int | None = 8) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, _, H, W = images.shape
        tokens = tokens_list[-1][:, :, patch_start_idx:]
        x = tokens.reshape(B * S, H // 14, W // 14, -1).permute(0, 3, 1, 2)
        y = F.interpolate(self.proj(x), size=(H, W), mode="bilinear", align_corners=False).reshape(B, S, 2, H, W)
        return (2.0 + torch.tanh(y[:, :, 0]))[..., None], 1.0 + torch.exp(y[:, :, 1])


class StandInVGGT(nn.Module):
    """**Not VGGT**: a small random convolutional network with VGGT's submodules (``aggregator``,
    ``camera_head``, ``depth_head``) and output shapes, so that :class:`VGGTBackend` runs its real
    single-head path around it where the vggt package is absent. Its forward time means nothing."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.aggregator = _StandInAggregator(dim)
        self.camera_head = _StandInCameraHead(dim)
        self.depth_head = _StandInDepthHead(dim)
        self.point_head = None


def _vggt_installed() -> bool:
    """Whether the optional vggt package can be imported."""
    return importlib.util.find_spec("vggt") is not None


def build_model(name: str, device: torch.device, seed: int) -> tuple[nn.Module, str]:
    """``(module in eval mode on device, label)`` of ``--model name`` with random weights (seeded)."""
    net, label = _build_model(name, device, seed)
    return net.eval().requires_grad_(False), label  # inference only (and the FLOP counter's module hooks need it)


def _build_model(name: str, device: torch.device, seed: int) -> tuple[nn.Module, str]:
    from cameo_corr.pipeline.backends.vggt import build_tiny_vggt, import_vggt_class

    torch.manual_seed(seed)
    if name == "vggt-1b":
        VGGT = import_vggt_class()  # ImportError with the install hint without the vggt package
        with device:  # parameters allocated and initialized on the device (seconds on a GPU, a minute on a CPU)
            net = VGGT()
        count = sum(p.numel() for p in net.parameters())
        return net.eval(), f"VGGT 1B architecture (vggt.models.vggt.VGGT(), {count / 1e9:.2f} B parameters), random weights"
    if name == "vggt-tiny":
        net = build_tiny_vggt(seed=seed).to(device)
        count = sum(p.numel() for p in net.parameters())
        return net, f"tiny real VGGT (build_tiny_vggt, {count / 1e6:.2f} M parameters), random weights"
    net = StandInVGGT().to(device).eval()
    return net, "STAND-IN, NOT VGGT (random conv net with VGGT's interface; its forward time means nothing)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_time(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """``(seconds, result)`` of a device stage: wall time, the device synchronized before and after."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def cpu_time(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """``(seconds, result)`` of a host stage: process CPU time, queued device work finished first."""
    _sync(device)
    t0 = time.process_time()
    out = fn()
    return time.process_time() - t0, out


def _fixed_cameras(batch: int, views: int, device: torch.device) -> torch.Tensor:
    """Pose encodings of identity cameras with 0.9 rad fields of view (``[B, S, 9]``)."""
    enc = torch.zeros(batch, views, 9, device=device)
    enc[..., 6] = 1.0
    enc[..., 7:] = 0.9
    return enc


def throughput_records(reader: Any, views: int, count: int) -> list[Any]:
    """``count`` windows of ``views`` consecutive frames, scene after scene (disjoint frames)."""
    from cameo_corr.schemas import WindowRecord

    records = []
    for scene_id in reader.scene_ids():
        frames = reader.scene(scene_id).frames
        for start in range(0, len(frames) - views + 1, views):
            if len(records) == count:
                return records
            chunk = tuple(frames[start:start + views])
            records.append(WindowRecord(f"{scene_id}-{start:04d}", reader.describe()["name"], "train", scene_id, chunk))
    if len(records) < count:
        raise SystemExit(f"the synthetic data holds {len(records)} windows of {views} views, {count} needed")
    return records


def _median_ms(values: list[float]) -> float:
    return 1e3 * statistics.median(values)


def forward_flops(vggt: Any, images: torch.Tensor) -> float:
    """FLOPs of one VGGT forward per window (``torch.utils.flop_counter``: matrix products, convolutions
    and attention), counted on an untimed forward of ``images``."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        vggt.predict(images)
    return counter.get_total_flops() / images.shape[0]


def run_throughput(args: argparse.Namespace) -> int:
    """One geometry worker's stages on ``--device``: device stages in wall time, host stages in CPU time."""
    from cameo_corr.datasets.base import open_dataset
    from cameo_corr.datasets.canonical import CanonicalView, load_window
    from cameo_corr.datasets.synthetic import generate_dataset
    from cameo_corr.pipeline.backends import make_backend
    from cameo_corr.pipeline.backends.vggt import VGGT_RESOLUTION, VGGTBackend
    from cameo_corr.cache.shard import window_arrays
    from cameo_corr.cache.writer import CacheWriter, WindowOutcome
    from cameo_corr.pipeline.match import match_tokens, resolve_backend, tokenize
    from cameo_corr.schemas import shard_id_of
    from cameo_corr.schemas import CacheConfig, SchemaError, TokenCorrespondences

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: this torch sees no CUDA device")
    for name, value in THROUGHPUT_DEFAULTS["cuda" if device.type == "cuda" else "cpu"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    model_name = args.model or ("vggt-1b" if device.type == "cuda" else "vggt-tiny" if _vggt_installed() else "stand-in")
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    matchers = args.match_backends or (["torch", "faiss"] if device.type == "cuda" else ["auto", "torch", "faiss"])
    S, B, grid = args.views, args.batch_size, args.grid
    total = args.warmup + args.windows
    if B < 1 or args.windows < 1 or args.warmup < 0 or args.windows % B or args.warmup % B:
        raise SystemExit(f"--windows {args.windows} (>= 1) and --warmup {args.warmup} must be multiples of --batch-size {B} (>= 1)")
    unavailable: dict[str, str] = {}
    for m in list(matchers):
        try:
            resolve_backend(m, device)
        except SchemaError as e:
            unavailable[m] = str(e)
            matchers.remove(m)
    if not matchers:
        raise SystemExit(f"no matcher backend can run on {device}: {unavailable}")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_throughput_"))
    try:
        frames = args.frames or S * math.ceil(total / args.scenes)
        data = generate_dataset(work / "data", scenes=args.scenes, frames=frames, image_size=args.image_size, seed=args.seed)
        reader = open_dataset("synthetic", data)
        view = CanonicalView(size=args.crop_size, policy=reader.preferred_crop_policy())
        records = throughput_records(reader, S, total)
        try:
            net, label = build_model(model_name, device, args.seed)
        except ImportError as e:
            raise SystemExit(f"--model {model_name}: {e}") from None
        vggt = VGGTBackend(net, device=device, dtype=dtype, model_id=f"bench:{model_name}")
        geometry = make_backend("depth", device=str(device))
        config = CacheConfig(grid=(grid, grid), tau=float(args.tau), views=S, backend=vggt.describe(), crop=view.to_dict(),
                             dataset=reader.describe(), created_by={"command": "bench_pipeline --mode throughput"})
        writer = CacheWriter(work / "cache", config)
        writer.initialize()
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPUs"
        print(f"throughput on {device} ({device_name}), torch {torch.__version__}; model: {label}; {dtype}")
        print(f"S={S}, batch {B}, {VGGT_RESOLUTION}x{VGGT_RESOLUTION} network input from a {args.crop_size} px crop of "
              f"{args.image_size} px frames, grid {grid}, shards of {args.shard_size}; {args.windows} timed windows after "
              f"{args.warmup} warm-up")
        print("(postprocess on the network's depth with fixed cameras and matching on the depth backend's pointmaps: "
              "random weights predict no usable geometry)\n")

        dev: dict[str, list[float]] = {k: [] for k in ("upload+resize", "forward", "postprocess", "tokenize")}
        dev.update({f"match {m}": [] for m in matchers})
        host: dict[str, list[float]] = {k: [] for k in ("load+decode+crop", "pickle hops", "device->host", "shard write")}
        def load(rec: Any) -> Any:  # as the job's load stage: without the masks the backend does not read
            return load_window(reader, rec, view, with_masks=vggt.needs_masks)

        flops = forward_flops(vggt, vggt.preprocess([load(rec) for rec in records[:B]]))
        pending: list[Any] = []
        for b0 in range(0, total, B):
            timed = b0 >= args.warmup
            batch_records = records[b0:b0 + B]
            loaded, hop = [], []
            for rec in batch_records:
                c_load, window = cpu_time(lambda: load(rec), device)
                c_hop, window = cpu_time(lambda: pickle.loads(pickle.dumps(window, protocol=5)), device)
                loaded.append(window)
                hop.append((c_load, c_hop))
            t_up, images = wall_time(lambda: vggt.preprocess(loaded), device)
            t_fwd, outputs = wall_time(lambda: vggt.predict(images), device)
            outputs["pose_enc"] = _fixed_cameras(len(loaded), S, device)
            t_post, _ = wall_time(lambda: vggt.postprocess(loaded, outputs), device)
            results = geometry.run_batch([load_window(reader, rec, view, with_depth=True) for rec in batch_records])
            if timed:
                dev["upload+resize"].append(t_up / len(loaded))
                dev["forward"].append(t_fwd / len(loaded))
                dev["postprocess"].append(t_post / len(loaded))
            for rec, result, (c_load, c_hop) in zip(batch_records, results, hop):
                t_tok, (tp, tv, tc) = wall_time(lambda: tokenize(result.points, result.valid, result.conf, grid), device)
                matched = {}
                for m in matchers:
                    t_m, matched[m] = wall_time(lambda: match_tokens(tp, tv, tau=args.tau, backend=m), device)
                    if timed:
                        dev[f"match {m}"].append(t_m)
                first = matched[matchers[0]]
                for m, out in matched.items():
                    if not all(torch.equal(a, b) for a, b in zip(out, first)):
                        raise SystemExit(f"matcher {m} disagrees with {matchers[0]} on window {rec.window_id}")
                corr = TokenCorrespondences(points=tp, valid=tv, conf=tc, nn=first[0], dist=first[1], mask=first[2])
                c_host, arrays = cpu_time(lambda: window_arrays(corr, result), device)
                c_hop2, arrays = cpu_time(lambda: pickle.loads(pickle.dumps(arrays, protocol=5)), device)
                pending.append(WindowOutcome(rec, arrays=arrays))
                if timed:
                    dev["tokenize"].append(t_tok)
                    host["load+decode+crop"].append(c_load)
                    host["pickle hops"].append(c_hop + c_hop2)
                    host["device->host"].append(c_host)
            last_warmup = b0 + B == args.warmup
            while len(pending) >= args.shard_size or (pending and (last_warmup or b0 + B == total)):
                shard, pending = pending[:args.shard_size], pending[args.shard_size:]  # warm-up windows: shards of their own
                c_write, _ = cpu_time(lambda: writer.write_shard(shard_id_of([o.record.window_id for o in shard]), shard), device)
                if timed:
                    host["shard write"] += [c_write / len(shard)] * len(shard)

        forward = statistics.median(dev["forward"])
        host_total = sum(statistics.median(v) for v in host.values())
        results_json: dict[str, Any] = {
            "settings": {k: v for k, v in vars(args).items()}, "device": str(device), "device_name": device_name,
            "model": model_name, "model_label": label, "dtype": dtype, "torch": torch.__version__,
            "device_stages_seconds": {k: statistics.median(v) for k, v in dev.items()},
            "host_stages_cpu_seconds": {k: statistics.median(v) for k, v in host.items()},
            "host_cpu_seconds_per_window": host_total, "host_cpu_over_forward": host_total / forward,
            "forward_flops_per_window": flops, "forward_flops_per_second": flops / forward,
            "matchers_unavailable": unavailable, "runs": {"device": dev, "host": host},
        }
        print(f"{'device stage (wall)':<24} {'ms/window':>10} {'windows/s':>10}")
        for k, v in dev.items():
            print(f"{k:<24} {_median_ms(v):>10.2f} {1.0 / statistics.median(v):>10.2f}")
        for m, why in unavailable.items():
            print(f"{'match ' + m:<24} {'unavailable':>10}  ({why})")
        print(f"\n{'host stage (CPU)':<24} {'ms/window':>10}")
        for k, v in host.items():
            print(f"{k:<24} {_median_ms(v):>10.2f}")
        print(f"{'total':<24} {1e3 * host_total:>10.2f}")
        note = "" if model_name != "stand-in" else "  (meaningless: the stand-in is not VGGT)"
        print(f"\nVGGT forward: {flops / 1e9:,.1f} GFLOP per window (matrix products, convolutions, attention), "
              f"{flops / forward / 1e12:.2f} TFLOP/s achieved{note}")
        print(f"host CPU per window / VGGT forward per window = {100 * host_total / forward:.1f} % (target < 5 %: "
              f"{1e3 * 0.05 * forward:.2f} ms of host CPU per window){note}")
        if args.json:
            Path(args.json).write_text(json.dumps(results_json, indent=2, default=str))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


JOB_DEFAULTS = {"frames": 12, "image_size": 256, "views": 4, "crop_size": 256, "shard_size": 4}
"""Defaults of ``--mode job`` for the options both modes share."""
THROUGHPUT_DEFAULTS = {
    "cuda": {"views": 8, "windows": 16, "warmup": 2, "image_size": 512, "crop_size": 512, "shard_size": 8},
    "cpu": {"views": 4, "windows": 3, "warmup": 1, "image_size": 256, "crop_size": 256, "shard_size": 4},
}
"""Defaults of ``--mode throughput`` per device type: a GPU measurement, or the small CPU mode."""
MODELS = ("vggt-1b", "vggt-tiny", "stand-in")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("job", "throughput"), default="job",
                        help="job: the Ray Data job and the write paths (default); throughput: one worker's stages")
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--frames", type=int, default=None, help="frames per scene (job default 12; throughput: as needed)")
    parser.add_argument("--image-size", type=int, default=None, help="synthetic frame side (default 256; throughput on CUDA 512)")
    parser.add_argument("--views", type=int, default=None, help="S (default 4; throughput on CUDA 8)")
    parser.add_argument("--windows-per-scene", type=int, default=8)
    parser.add_argument("--grid", type=int, default=32)
    parser.add_argument("--crop-size", type=int, default=None, help="canonical crop (default 256; throughput on CUDA 512)")
    parser.add_argument("--shard-size", type=int, default=None,
                        help="windows per shard (default 4, small: many commit times to measure; throughput on CUDA 8)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="rounds per worker count")
    parser.add_argument("--workdir", default=None, help="keep data and caches here (default: a temporary directory)")
    parser.add_argument("--json", default=None, help="write the numbers to this JSON file")
    g = parser.add_argument_group("--mode throughput")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--model", choices=MODELS, default=None,
                   help="vggt-1b (default on CUDA), vggt-tiny (default on CPU with vggt installed), stand-in (not VGGT)")
    g.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="VGGT compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--windows", type=int, default=None, help="timed windows (default 16 on CUDA, 3 on CPU)")
    g.add_argument("--warmup", type=int, default=None, help="untimed windows first (default 2 on CUDA, 1 on CPU)")
    g.add_argument("--batch-size", type=int, default=1, help="windows per VGGT forward")
    g.add_argument("--match-backends", nargs="+", default=None,
                   help="matchers to time (default: torch faiss on CUDA, auto torch faiss on CPU)")
    g.add_argument("--tau", type=float, default=1.5)
    g.add_argument("--seed", type=int, default=0, help="random weights and synthetic scenes")
    args = parser.parse_args(argv)
    if args.mode == "throughput":
        return run_throughput(args)
    for name, value in JOB_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return run_job_mode(args)


def job_runs(args: argparse.Namespace, data: Path, work: Path) -> dict:
    """``--repeats`` runs of the Ray Data job per ``--workers`` count, each into a fresh cache: medians,
    ratios to the first worker count, stage shares and bytes per window."""
    from cameo_corr.job.driver import run_preprocess

    common = dict(dataset="synthetic", root=data, backend="depth", grid=args.grid, views=args.views,
                  windows_per_scene=args.windows_per_scene, shard_size=args.shard_size, crop_size=args.crop_size, progress=False)
    print(f"{'workers':>7} {'round':>5} {'windows':>7} {'seconds':>8} {'1st commit':>10} {'steady win/s':>12}")
    results: dict = {}
    for w in args.workers:
        runs = []
        for r in range(args.repeats):
            out = work / f"cache_w{w}"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.time()
            s = run_preprocess(out=out, workers=w, **common)
            times, counts = commit_times(out)
            runs.append({"seconds": s["seconds"], "windows_ok": s["windows_ok"], "stage_seconds": s["stage_seconds"],
                         "bytes_per_window": s["bytes_per_window"], "first_commit_seconds": times[0] - t0,
                         "steady_windows_per_second": sum(counts[1:]) / (times[-1] - times[0]) if len(times) > 1 else float("nan")})
            print(f"{w:>7} {r:>5} {s['windows_ok']:>7} {s['seconds']:>8.2f} {runs[-1]['first_commit_seconds']:>10.2f} "
                  f"{runs[-1]['steady_windows_per_second']:>12.2f}", flush=True)
        med = {k: float(np.median([x[k] for x in runs])) for k in ("seconds", "first_commit_seconds", "steady_windows_per_second")}
        st = {k: float(np.median([x["stage_seconds"][k] for x in runs])) for k in ("read", "backend", "match", "write")}
        busy = sum(st.values()) or 1.0
        results[w] = {"runs": runs, "median": med, "stage_share": {k: v / busy for k, v in st.items()},
                      "bytes_per_window": runs[0]["bytes_per_window"]}
    first = results[args.workers[0]]["median"]
    print("(seconds: end to end without Ray init; 1st commit: seconds to the first committed shard; steady win/s: "
          "windows committed after the first shard / time from the first to the last commit)\n")
    print(f"{'workers':>7} {'steady win/s':>12} {'ratio':>6} {'1st commit':>10} {'e2e s':>7} {'ratio':>6}  "
          f"{'read':>5} {'backend':>7} {'match':>5} {'write':>5}  {'bytes/win':>9}")
    for w, r in results.items():
        m = r["median"]
        r["steady_ratio"] = m["steady_windows_per_second"] / first["steady_windows_per_second"]
        r["end_to_end_ratio"] = m["seconds"] / first["seconds"]
        print(f"{w:>7} {m['steady_windows_per_second']:>12.2f} {r['steady_ratio']:>6.2f} {m['first_commit_seconds']:>9.1f}s "
              f"{m['seconds']:>6.1f}s {r['end_to_end_ratio']:>6.2f}  "
              + " ".join(f"{100 * r['stage_share'][k]:>4.0f}%" for k in ("read", "backend", "match", "write"))
              + f"  {r['bytes_per_window']:>9.0f}")
    print(f"(medians of {args.repeats} rounds; ratios to {args.workers[0]} worker(s); stage shares of busy time)")
    return results


def write_compare(cache_dir: Path, work: Path, shard_size: int) -> dict:
    """Our shard writer against one ``np.savez_compressed`` file per window on the windows of ``cache_dir``:
    write time (median of alternating runs after a warm-up), bytes, files, and one random window's read."""
    from cameo_corr.cache.reader import CorrCache
    from cameo_corr.schemas import WindowRecord

    cache = CorrCache(cache_dir)
    ids = cache.window_ids()
    arrays = [cache.window(i) for i in ids]
    records = [WindowRecord(wid, r["dataset"], r["split"], r["scene_id"], ()) for wid in ids for r in [cache.row(wid)]]
    zdir, ndir = work / "write_zarr", work / "write_npz"
    t_zarr_runs, t_npz_runs = [], []
    for _ in range(WRITE_REPEATS + 1):  # alternating, the first pair is a warm-up
        for d in (zdir, ndir):
            shutil.rmtree(d, ignore_errors=True)
        t_zarr_runs.append(zarr_write(arrays, records, cache.config, zdir, shard_size))
        t_npz_runs.append(npz_write(arrays, ids, ndir))
    picks = [ids[i] for i in np.random.default_rng(0).integers(len(ids), size=min(20, len(ids)))]
    zc = CorrCache(zdir)
    t0 = time.perf_counter()
    for wid in picks:
        zc.window(wid)
    r_zarr = (time.perf_counter() - t0) / len(picks)
    t0 = time.perf_counter()
    for wid in picks:
        with np.load(ndir / f"{wid}.npz") as z:
            {k: z[k] for k in z.files}
    r_npz = (time.perf_counter() - t0) / len(picks)
    n = len(ids)
    out = {}
    for key, d, runs, read in (("zarr", zdir, t_zarr_runs, r_zarr), ("npz", ndir, t_npz_runs, r_npz)):
        t = float(np.median(runs[1:]))
        out[key] = {"seconds": t, "windows_per_second": n / t, "bytes_per_window": dir_bytes(d) / n,
                    "files": sum(1 for p in d.rglob("*") if p.is_file()), "read_ms": 1e3 * read}
    print(f"\nwrite path, same {n} windows (median of {WRITE_REPEATS} alternating runs after a warm-up):")
    print(f"{'':>22} {'seconds':>8} {'win/s':>8} {'bytes/win':>10} {'files':>6} {'read 1 win':>11}")
    for name, key in (("zarr shards (ours)", "zarr"), ("npz per window", "npz")):
        c = out[key]
        print(f"{name:>22} {c['seconds']:>8.3f} {c['windows_per_second']:>8.1f} {c['bytes_per_window']:>10.0f} {c['files']:>6} "
              f"{c['read_ms']:>8.2f} ms")
    print(f"(ratio ours / npz: write time {out['zarr']['seconds'] / out['npz']['seconds']:.2f}, "
          f"bytes {out['zarr']['bytes_per_window'] / out['npz']['bytes_per_window']:.2f}, read {r_zarr / r_npz:.2f})")
    return {"windows": n, **out}


def run_job_mode(args: argparse.Namespace) -> int:
    """The Ray Data job per worker count, then the write paths (``--mode job``)."""
    import ray

    from cameo_corr.datasets.synthetic import generate_dataset

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_pipeline_"))
    results: dict = {"settings": vars(args).copy(), "cpu_count": os.cpu_count()}
    try:
        t0 = time.perf_counter()
        data = generate_dataset(work / "data", scenes=args.scenes, frames=args.frames, image_size=args.image_size, seed=0)
        results["generate_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, max(args.workers) + 2), include_dashboard=False,
                 log_to_driver=False)
        results["ray_init_seconds"] = time.perf_counter() - t0
        print(f"data: {args.scenes} scenes x {args.frames} frames at {args.image_size}px "
              f"(generated in {results['generate_seconds']:.1f} s); Ray init {results['ray_init_seconds']:.1f} s")
        print(f"windows: S={args.views}, {args.windows_per_scene}/scene, crop {args.crop_size}px, grid {args.grid}, "
              f"shard size {args.shard_size}; {args.repeats} rounds per worker count\n")
        results["runs"] = job_runs(args, data, work)
        ray.shutdown()
        results["write_compare"] = write_compare(work / f"cache_w{args.workers[-1]}", work, args.shard_size)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
