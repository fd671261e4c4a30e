"""VGGT adapter: the single-head path (default) against ``VGGT.forward``, on the tiny real model.

``VGGT.forward`` runs the aggregator, the camera head and **both** DPT heads (depth and point), each
8 frames per pass; the backend's default path runs the aggregator, the camera head and the one head
its pointmap uses, with the same calls. This script times, in one process and alternating A/B so
load changes hit both alike (median of ``--repeats`` pairs after one warm-up each):

* ``forward``: ``model(images)`` (what the adapter called before);
* ``single-head``: ``VGGTBackend(model).predict(images)`` (depth pointmap, the default);

on ``[1, S, 3, size, size]`` random images (518 by default) with the tiny real VGGT of
:func:`cameo_corr.pipeline.backends.vggt.build_tiny_vggt` (random weights; needs the vggt package),
checks that the single-head outputs equal ``forward``'s, and prints the ratio. With the tiny model
the heads are a larger share of the time than with the 1B model (its aggregator is 24 layers of width
1024), so the saving measured here is an upper bound of the saving on the real model.

Usage: ``python benchmarks/bench_vggt_heads.py [--views 16] [--size 518] [--repeats 5] [--device cpu|cuda]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cameo_corr.pipeline.backends.vggt import VGGT_RESOLUTION, VGGTBackend, build_tiny_vggt, ieee_float32_convolutions


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--views", type=int, default=16, help="frames S of the window (default 16)")
    parser.add_argument("--repeats", type=int, default=5, help="timed A/B pairs (median)")
    parser.add_argument("--size", type=int, default=VGGT_RESOLUTION, help="image side, a multiple of 14 (default 518)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    try:
        model = build_tiny_vggt(seed=0).to(device)
    except ImportError as e:  # the optional extra: one line with the install hint
        raise SystemExit(str(e)) from None
    backend = VGGTBackend(model, device=device, dtype="float32")
    images = torch.rand(1, args.views, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(device)

    def forward() -> dict[str, torch.Tensor]:
        with torch.inference_mode(), ieee_float32_convolutions():  # as the backend runs float32 on CUDA
            return model(images)

    reference, single = forward(), backend.predict(images)
    for key, value in single.items():
        if not torch.equal(value, reference[key]):
            raise SystemExit(f"single-head output {key!r} differs from VGGT.forward's")
    times: dict[str, list[float]] = {"forward": [], "single-head": []}
    for _ in range(args.repeats):
        times["forward"].append(_timed(forward, device))
        times["single-head"].append(_timed(lambda: backend.predict(images), device))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"tiny real VGGT, S={args.views}, {args.size}x{args.size}, {device}, fp32; median of {args.repeats} alternating runs")
    for name, seconds in med.items():
        print(f"  {name:<12} {seconds * 1000:9.1f} ms   runs: {', '.join(f'{t * 1000:.0f}' for t in times[name])}")
    print(f"  single-head / forward = {med['single-head'] / med['forward']:.3f}  (outputs identical)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
