"""Peak memory and time of the supervised CAMEO layer: dense logits against chunked recomputation.

One training step of SD2.1's supervised layer 10 (``up_blocks.2.attentions.0``: 10 heads of 64, 32x32
tokens at 512 px) with random weights: the layer's forward, the CAMEO loss and the backward pass, with
B=2, F=4 and every pair masked (the most work for the chunked path). ``dense`` is the previous
implementation (explicit fp32 ``[B, heads, F*hw, F*hw]`` logits, softmax and ``probs @ v`` in the
layer; the head MLP over ``--query-chunk`` query rows at a time); ``chunked`` runs
``scaled_dot_product_attention`` and lets :func:`cameo_corr.train.loss.cameo_loss` recompute the logits
of the supervised entries chunk by chunk under activation checkpointing. See
:func:`cameo_corr.train.loss.measure_supervised_layer` for how memory is measured (CPU: peak RSS added
in a fresh process per path; CUDA: ``max_memory_allocated``). Times are medians of alternating runs.

Usage: ``python benchmarks/bench_cameo_memory.py [--device cpu] [--modes official paper] [--out FILE.json]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    import torch

    from cameo_corr.train.loss import measure_supervised_layer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--modes", nargs="+", choices=["official", "paper"], default=["official", "paper"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--grid", type=int, default=32)
    p.add_argument("--query-chunk", type=int, default=256)
    p.add_argument("--mask-frac", type=float, default=1.0, help="fraction of masked (supervised) pairs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = p.parse_args(argv)

    rows = []
    for mode in args.modes:
        r = measure_supervised_layer(args.device, getattr(torch, args.dtype), batch=args.batch, views=args.views, grid=args.grid,
                                     mode=mode, query_chunk=args.query_chunk, mask_frac=args.mask_frac, repeats=args.repeats)
        rows.append(r)
        gib = 2.0**30
        print(f"{mode:8s} B={r['batch']} F={r['views']} {r['heads']}x{r['head_dim']} heads, {r['grid'][0]}x{r['grid'][1]} tokens, "
              f"{r['dtype']} on {r['device']} ({r['peak_memory']}):")
        for path in ("dense", "chunked"):
            x = r[path]
            print(f"  {path:8s} peak {x['peak_bytes'] / gib:6.2f} GiB   time {x['seconds']:7.2f} s   loss {x['loss']:.6f}")
        print(f"  memory dense/chunked {r['memory_ratio']:.1f}x   time chunked/dense {r['time_ratio']:.2f}x   "
              f"input-gradient max rel diff {r['grad_max_rel_diff']:.1e}")
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
