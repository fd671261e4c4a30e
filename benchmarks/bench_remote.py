"""Training from object storage, and self-contained caches: samples/s and loader cost, side by side.

1. **Remote shards** (``data.local_cache``): one epoch of :class:`~cameo_corr.train.data.CorrStreamDataset`
   (one process, ``num_workers=0``; opening the stream, once per run, is timed apart) read three ways,
   alternately over ``--rounds`` rounds in a rotating order: from a local cache directory (the
   baseline), from ``s3://`` through an empty local shard cache (cold: each shard is downloaded once)
   and again through the filled one (warm), and from ``s3://`` without a local cache (direct). By default the S3 endpoint is
   moto's server in a separate process on the loopback interface (``--endpoint-url`` names another
   one), so network latency and bandwidth are those of loopback, not of a real object store.
2. **Stored views** (``--store-images``): the same windows preprocessed with ``none``, ``jpeg`` and
   ``png``; shard bytes per window, and the loader's CPU seconds per sample reading images from the
   dataset root (decode the source frame, crop, resize) vs decoding the stored canonical views (local
   caches, alternately).

Targets (issue 19): warm >= 0.9x local, cold >= 0.5x local. Usage:
``python benchmarks/bench_remote.py [--scenes 4] [--windows-per-scene 8] [--views 8] [--crop-size 256] ...``.
Building the caches (the preprocessing job, three times) is not timed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

CREDENTIALS = {"key": "bench", "secret": "bench"}


def build(base: Path, args: argparse.Namespace) -> dict[str, Path]:
    """A synthetic dataset and its cache three times (views stored as none, jpeg, png)."""
    from cameo_corr.datasets.synthetic import generate_dataset
    from cameo_corr.job.driver import run_preprocess

    caches = {fmt: base / f"cache-{fmt}" for fmt in ("none", "jpeg", "png")}
    if all((c / "cache.json").exists() for c in caches.values()):
        print(f"reusing the caches under {base}")
        return caches
    root = generate_dataset(base / "data", scenes=args.scenes, frames=args.frames, image_size=args.image_size, seed=0)
    for fmt, out in caches.items():
        run_preprocess(dataset="synthetic", root=root, out=out, backend="depth", grid=args.grid, views=args.views,
                       windows_per_scene=args.windows_per_scene, shard_size=args.shard_size, crop_size=args.crop_size,
                       workers=1, progress=False, store_images=fmt, jpeg_quality=args.jpeg_quality)
    return caches


def start_moto() -> tuple[str, subprocess.Popen]:
    """moto's S3 server in its own process on a free loopback port (its CPU is not this process's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return url, proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def upload(local: Path, endpoint: str, options: dict[str, Any]) -> str:
    import boto3
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    bucket = f"bench-{os.getpid()}"
    if not fs.exists(bucket):  # a bucket in us-east-1 (no location constraint), as moto expects
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=options["key"], aws_secret_access_key=options["secret"],
                     region_name="us-east-1").create_bucket(Bucket=bucket)
    fs.put(str(local) + "/", f"{bucket}/cache", recursive=True)
    return f"s3://{bucket}/cache"


def epoch(cache: str, args: argparse.Namespace, **kw: Any) -> tuple[float, float, float, int]:
    """``(open wall s, epoch wall s, epoch CPU s, samples)``: building the stream (manifest read once
    per run), then one epoch of it (shards, images, targets)."""
    from cameo_corr.train.data import CorrStreamDataset

    t0 = time.perf_counter()
    ds = CorrStreamDataset(cache, num_views=args.num_views, resolution=args.resolution, seed=0, order_scope="sample",
                           num_epochs=1, **kw)
    t1, c1 = time.perf_counter(), time.process_time()
    n = sum(1 for _ in ds)
    return t1 - t0, time.perf_counter() - t1, time.process_time() - c1, n


def remote_section(caches: dict[str, Path], base: Path, args: argparse.Namespace) -> None:
    endpoint, server = (args.endpoint_url, None) if args.endpoint_url else start_moto()
    options = {**CREDENTIALS, "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    try:
        url = upload(caches["none"], endpoint, options)
        rates: dict[str, list[float]] = {"local": [], "s3 cold": [], "s3 warm": [], "s3 direct": []}
        opens: dict[str, list[float]] = {k: [] for k in rates}
        for r in range(args.rounds):
            lc = base / f"lc-{r}"
            runs = {"local": (str(caches["none"]), {}),
                    "s3 cold": (url, {"storage_options": options, "local_cache": lc}),
                    "s3 warm": (url, {"storage_options": options, "local_cache": lc}),
                    "s3 direct": (url, {"storage_options": options})}
            groups = [["local"], ["s3 cold", "s3 warm"], ["s3 direct"]]  # cold before warm; the groups rotate per round
            for name in [n for g in groups[r % 3:] + groups[: r % 3] for n in g]:
                src, kw = runs[name]
                t_open, wall, _, n = epoch(src, args, **kw)
                rates[name].append(n / wall)
                opens[name].append(t_open)
            shutil.rmtree(lc)
        med = {k: float(np.median(v)) for k, v in rates.items()}
        print(f"\n1. samples/s over one epoch ({n} samples, median of {args.rounds} rounds; endpoint: "
              f"{'moto on loopback' if server else endpoint})")
        for name, v in med.items():
            print(f"   {name:10s} {v:8.1f} samples/s (rounds {min(rates[name]):.1f}-{max(rates[name]):.1f})   "
                  f"{v / med['local']:.2f}x local   opening the stream: {np.median(opens[name]):.2f} s, once per run")
        print(f"   targets: warm >= 0.9x local: {'met' if med['s3 warm'] >= 0.9 * med['local'] else 'NOT met'}; "
              f"cold >= 0.5x local: {'met' if med['s3 cold'] >= 0.5 * med['local'] else 'NOT met'}")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)


def stored_section(caches: dict[str, Path], args: argparse.Namespace) -> None:
    from cameo_corr.cache.reader import CorrCache

    print(f"\n2. stored views (crop {args.crop_size} px, S={args.views}, training resolution {args.resolution})")
    per = {}
    for fmt, path in caches.items():
        table = CorrCache(path).manifest("ok", columns=["shard", "shard_bytes"])
        shards = dict(zip(table.column("shard").to_pylist(), table.column("shard_bytes").to_pylist()))
        per[fmt] = sum(shards.values()) / table.num_rows
    for fmt, b in per.items():
        print(f"   --store-images {fmt:5s} {b / 1024:9.1f} KiB/window   {b / per['none']:.2f}x none")
    cpu: dict[str, list[float]] = {fmt: [] for fmt in caches}
    rate: dict[str, list[float]] = {fmt: [] for fmt in caches}
    for _ in range(args.rounds):
        for fmt, path in caches.items():
            _, wall, c, n = epoch(str(path), args)
            cpu[fmt].append(c / n)
            rate[fmt].append(n / wall)
    base = float(np.median(cpu["none"]))
    for fmt in caches:
        c = float(np.median(cpu[fmt]))
        how = "images from the dataset root" if fmt == "none" else f"stored {fmt} views decoded"
        print(f"   {how:30s} {c * 1000:7.1f} ms CPU/sample ({c / base:.2f}x)   {np.median(rate[fmt]):7.1f} samples/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenes", type=int, default=4)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--image-size", type=int, default=384, help="synthetic source frames (JPEG files)")
    p.add_argument("--windows-per-scene", type=int, default=8)
    p.add_argument("--views", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=4)
    p.add_argument("--crop-size", type=int, default=256)
    p.add_argument("--grid", type=int, default=16)
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--num-views", type=int, default=4)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--endpoint-url", default=None, help="an S3 endpoint to use instead of a local moto server")
    p.add_argument("--work", default=None, help="keep the dataset and caches here and reuse them on the next run "
                                                 "(default: a temporary directory; the build options must not change)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        caches = build(work, args)
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
        remote_section(caches, Path(tmp), args)
        stored_section(caches, args)
        print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
