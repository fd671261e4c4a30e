"""Visibility mask on depth with holes: the hole-robust rule against the strict rule it replaced.

The visibility test of :mod:`cameo_corr.pipeline.masks` compares a query's depth in the key view with the
key view's token depths around its landing point. The strict rule (the baseline here, as it was before
the hole rules) needs all four surrounding tokens valid for the bilinear estimate, or the containing
token valid; on real RGB-D depth with holes it drops many correct correspondences. Ours also judges a
landing point by its valid neighbours (plane through three, renormalised bilinear, one neighbour
without an occluder). A third rule, ``unknown``, measures the other way of handling holes: ours, plus
every query whose landing point has no valid token to judge by ("unknown" apart from "occluded"), so
that the cycle mask alone decides there. All three are scored in the same run, on the same
correspondences, as the ``both`` policy (cycle mask AND visibility) against reprojection ground truth,
per token grid:

* **precision**: masked queries that are visible in the key view, over masked queries with a known
  ground truth (``mask_precision`` of ``eval-corr``);
* **kept**: the share of the cycle mask's correct entries (masked, visible, ``nn`` within 1 token of
  the reprojected point) that the mask keeps;
* **worst bin**: the lowest precision over the view-angle bins (0-30, 30-60, 60-90, 90-120 degrees)
  that hold at least 100 masked queries.

Sources (the ``depth`` backend, ground-truth geometry at token resolution, 512 px canonical view):

* ``synthetic``: seeded synthetic rooms (``synthesize --scenes 8 --size 256 --seed 1`` unless
  ``--synthetic-root`` names a co3d-layout root), ``--windows-per-scene`` windows of 4 frames per
  scene. For every ``--fractions`` value, holes are punched into the depth
  (:func:`cameo_corr.datasets.depth_holes.punch_depth_holes`, seed ``--seed`` plus the window's index)
  before the backend runs, so the cached points and validity have holes; the ground truth is the
  exact depth without holes, so every query is judged, including those landing in holes;
* ``7-Scenes``: the real Kinect depth of ``--sevenscenes`` (the project's ``sevenscenes_stairs``
  sample: four sequences of 3 frames, 7-21 % of the canonical view's pixels invalid): each sequence as
  a window, and the two holiest (seq-03, seq-04; the sequences share one world frame) as one 6-frame
  window. The ground truth is the same holey depth, so queries landing on a hole are left out of the
  counts (which favours ``unknown``: its extra queries are mostly uncounted there).

Also timed (fastest of 15 on one thread, the two taking turns): ``strict`` and ours on the same
inputs, the first window with the most holes, every grid.

Usage: ``python benchmarks/bench_visibility_holes.py [--synthetic-root DIR] [--sevenscenes DIR]
[--fractions 0 0.1 0.22 0.35] [--grids 16 32] [--windows-per-scene 2] [--seed 0] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cameo_corr.datasets import open_dataset
from cameo_corr.datasets.canonical import CanonicalView, load_window
from cameo_corr.datasets.depth_holes import punch_depth_holes
from cameo_corr.pipeline.backends.depth import DepthBackend
from cameo_corr.pipeline.evaluate import ANGLE_BINS, BinCounts, score_window
from cameo_corr.pipeline.masks import DEFAULT_VISIBILITY_TOL, visibility_mask
from cameo_corr.pipeline.match import correspond
from cameo_corr.schemas import DEFAULT_TAU, WindowData, WindowRecord

SIZE = 512
VIEWS = 4
MIN_BIN = 100


def _landing(points: torch.Tensor, valid: torch.Tensor, K: torch.Tensor, E: torch.Tensor,
             image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Every query projected into every view, ``[S, S, h*w]``: its depth ``z``, ``inside`` the key image,
    and the key view's four surrounding tokens (``weight``, ``good``, ``inv`` depth; last axis of 4) and
    containing token (``near`` depth, ``near_ok``)."""
    S, h, w = valid.shape
    H, W = image_size
    V = valid.reshape(S, h * w).bool()
    X = torch.where(V[..., None], points.reshape(S, h * w, 3).double(), torch.zeros((), dtype=torch.float64))
    E, K = E.double(), K.double()
    cam = torch.einsum("jab,ixb->ijxa", E[:, :3, :3], X) + E[None, :, None, :3, 3]
    z = cam[..., 2]
    uvw = torch.einsum("jab,ijxb->ijxa", K, cam)
    safe = torch.where(z > 0, uvw[..., 2], torch.ones_like(z))
    u, v = uvw[..., 0] / safe, uvw[..., 1] / safe
    own = torch.diagonal(z, dim1=0, dim2=1).T.reshape(S, h, w)
    ok = V.reshape(S, h, w) & (own > 0)
    tx, ty = u * (w / W) - 0.5, v * (h / H) - 0.5
    view = torch.arange(S)[None, :, None].expand(tx.shape)
    cx, cy = tx.clamp(0.0, w - 1.0), ty.clamp(0.0, h - 1.0)
    x0, y0 = cx.floor().long().clamp(max=w - 1), cy.floor().long().clamp(max=h - 1)
    fx, fy = cx - x0, cy - y0
    x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
    corners = ((y0, x0), (y0, x1), (y1, x0), (y1, x1))
    good = torch.stack([ok[view, yy, xx] for yy, xx in corners], -1)
    depth = torch.stack([own[view, yy, xx] for yy, xx in corners], -1)
    nx, ny = (tx + 0.5).floor().long().clamp(0, w - 1), (ty + 0.5).floor().long().clamp(0, h - 1)
    return {
        "V": V, "z": z, "inside": (z > 0) & (u >= 0) & (u < W) & (v >= 0) & (v < H),
        "weight": torch.stack(((1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy), -1), "good": good,
        "inv": torch.where(good, 1.0 / torch.where(good, depth, torch.ones_like(depth)), torch.zeros_like(depth)),
        "near": own[view, ny, nx], "near_ok": ok[view, ny, nx],
    }


def _with_diagonal(mask: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    for i in range(len(V)):
        mask[i, i] = V[i]
    return mask


def strict_visibility(points: torch.Tensor, valid: torch.Tensor, K: torch.Tensor, E: torch.Tensor, image_size: tuple[int, int],
                      tol: float) -> torch.Tensor:
    """The baseline: the visibility rule without the depth-hole estimates. Visible when the bilinear
    inverse depth of the four surrounding tokens (all valid where their weight is non-zero) or the
    containing token's depth agrees within ``tol``; ``[S, S, h*w]`` bool, the diagonal ``valid``."""
    g = _landing(points, valid, K, E, image_size)
    z, near = g["z"], g["near"]
    inv_bil = (g["weight"] * g["inv"]).sum(-1)
    bil_ok = (g["good"] | (g["weight"] == 0)).all(-1) & (inv_bil > 0)
    bil = 1.0 / torch.where(bil_ok, inv_bil, torch.ones_like(inv_bil))
    agrees = (bil_ok & ((z - bil).abs() <= tol * bil)) | (g["near_ok"] & ((z - near).abs() <= tol * near))
    return _with_diagonal(g["V"][:, None, :] & g["inside"] & agrees, g["V"])


def unknown_passes(points: torch.Tensor, valid: torch.Tensor, K: torch.Tensor, E: torch.Tensor, image_size: tuple[int, int],
                   tol: float) -> torch.Tensor:
    """The alternative of treating "unknown" apart from "occluded": ours, plus every query landing in the
    key image where no token with a non-zero weight (nor the containing token) is valid, so that the
    cycle mask alone decides there under ``both``."""
    g = _landing(points, valid, K, E, image_size)
    unknown = ~(g["good"] & (g["weight"] > 0)).any(-1) & ~g["near_ok"]
    ours = visibility_mask(points, valid, K, E, image_size, tol=tol)
    return _with_diagonal(ours | (g["V"][:, None, :] & g["inside"] & unknown), g["V"])


RULES: dict[str, Callable[..., torch.Tensor]] = {"strict": strict_visibility, "ours": visibility_mask, "unknown": unknown_passes}


def synthetic_windows(root: Path, per_scene: int, seed: int) -> list[WindowData]:
    """``per_scene`` windows of :data:`VIEWS` frames (drawn with ``seed``, sorted) of every scene."""
    reader = open_dataset("synthetic", root)
    view = CanonicalView(size=SIZE, policy=reader.preferred_crop_policy())
    rng = np.random.default_rng(seed)
    out = []
    for scene_id in reader.scene_ids():
        frames = reader.scene(scene_id).frames
        for k in range(per_scene):
            pick = sorted(rng.choice(len(frames), VIEWS, replace=False).tolist())
            record = WindowRecord(f"{scene_id}-{k}", "synthetic", reader.split, scene_id, tuple(frames[p] for p in pick))
            out.append(load_window(reader, record, view, with_depth=True))
    return out


def sevenscenes_windows(root: Path) -> dict[str, list[WindowData]]:
    """``{label: windows}`` of the 7-Scenes sample: every sequence, and seq-03 + seq-04 as one window."""
    reader = open_dataset("7scenes", root, split="all")
    view = CanonicalView(size=SIZE, policy=reader.preferred_crop_policy())

    def window(seqs: Iterable[str]) -> WindowData:
        seqs = list(seqs)
        frames = tuple(f for s in seqs for f in reader.scene(s).frames)
        return load_window(reader, WindowRecord("+".join(seqs), "7scenes", "all", seqs[0], frames), view, with_depth=True)

    sequences = reader.scene_ids()
    return {"7-Scenes, each sequence (3 views)": [window([s]) for s in sequences],
            "7-Scenes, seq-03 + seq-04 (6 views)": [window(["seq-03", "seq-04"])]}


def score(pairs: list[tuple[WindowData, WindowData]], grid: int, tol: float) -> dict[str, list[BinCounts]]:
    """Per-bin counts of ``cycle`` and of ``both`` under each rule, over ``(truth, holey)`` window pairs:
    correspondences and masks from ``holey``, ground truth from ``truth``."""
    backend = DepthBackend(device="cpu", frame="world")
    totals = {name: [BinCounts() for _ in ANGLE_BINS[1:]] for name in ("cycle", *RULES)}
    for truth, holey in pairs:
        gt = backend.run_batch([truth])[0]
        result = gt if holey is truth else backend.run_batch([holey])[0]
        corr = correspond(result, grid=grid, tau=DEFAULT_TAU)
        cycle = corr.mask.bool()
        masks = {"cycle": cycle}
        for name, rule in RULES.items():
            masks[name] = cycle & rule(corr.points, corr.valid, result.intrinsics, result.extrinsics, (SIZE, SIZE), tol=tol)
        for name, per_bin in score_window(truth, gt, corr, (grid, grid), masks=masks).items():
            for total, counts in zip(totals[name], per_bin):
                total.add(counts)
    return totals


def summary(totals: dict[str, list[BinCounts]]) -> dict[str, Any]:
    """Precision, kept and worst-bin precision of ``cycle`` and each rule's ``both``."""

    def overall(bins: list[BinCounts]) -> BinCounts:
        out = BinCounts()
        for b in bins:
            out.add(b)
        return out

    cycle_correct = overall(totals["cycle"]).correct
    out: dict[str, Any] = {}
    for name, bins in totals.items():
        o = overall(bins)
        worst = [b.covered / b.masked for b in bins if b.masked >= MIN_BIN]
        out[name] = {"precision": o.covered / o.masked if o.masked else None,
                     "kept": o.correct / cycle_correct if cycle_correct else None,
                     "worst_bin_precision": min(worst) if worst else None, "masked": o.masked}
    return out


def pct(v: float | None) -> str:
    return "    -" if v is None else f"{100 * v:5.1f}"


def row(label: str, grid: int, s: dict[str, Any], invalid: float) -> str:
    ratio = s["ours"]["kept"] / s["strict"]["kept"] if s["strict"]["kept"] else float("nan")
    cells = " | ".join(f"{pct(s[n]['precision'])} {pct(s[n]['kept'])} {pct(s[n]['worst_bin_precision'])}" for n in RULES)
    return f"{label:<38} {invalid * 100:5.1f} {grid:>4} | {pct(s['cycle']['precision'])} | {cells} | {ratio:5.3f}"


def invalid_share(windows: Iterable[WindowData]) -> float:
    depth = np.concatenate([w.depth for w in windows])
    return float((depth <= 0).mean())


def time_rules(window: WindowData, grid: int, tol: float, repeats: int = 15) -> dict[str, float]:
    """Fastest of ``repeats`` runs (seconds) of ``strict`` and ours on one window's correspondences, on
    one thread, taking turns (the minimum is the least disturbed by other work on a shared machine)."""
    result = DepthBackend(device="cpu", frame="world").run_batch([window])[0]
    corr = correspond(result, grid=grid, tau=DEFAULT_TAU)
    timed = {name: RULES[name] for name in ("strict", "ours")}
    runs: dict[str, list[float]] = {name: [] for name in timed}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(repeats):
            for name, rule in timed.items():
                t0 = time.perf_counter()
                rule(corr.points, corr.valid, result.intrinsics, result.extrinsics, (SIZE, SIZE), tol=tol)
                runs[name].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return {name: min(r) for name, r in runs.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--synthetic-root", type=Path, default=None, help="co3d-layout synthetic root (default: generate 8 scenes, seed 1)")
    p.add_argument("--sevenscenes", type=Path, default=Path(__file__).resolve().parents[1] / "../shared/data/sevenscenes_stairs",
                   help="the 7-Scenes stairs sample (skipped when absent)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.1, 0.22, 0.35], help="invalid-pixel shares punched")
    p.add_argument("--grids", type=int, nargs="+", default=[16, 32])
    p.add_argument("--windows-per-scene", type=int, default=2)
    p.add_argument("--tol", type=float, default=DEFAULT_VISIBILITY_TOL)
    p.add_argument("--seed", type=int, default=0, help="window sampling and hole seed")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.synthetic_root
        if root is None:
            from cameo_corr.datasets.synthetic import generate_dataset

            root = generate_dataset(Path(tmp) / "synthetic", scenes=8, frames=24, image_size=256, seed=1)
        clean = synthetic_windows(root, args.windows_per_scene, args.seed)
    sources: list[tuple[str, list[tuple[WindowData, WindowData]]]] = []
    for fraction in args.fractions:
        pairs = [(w, w if fraction == 0 else dataclasses.replace(w, depth=punch_depth_holes(w.depth, fraction, seed=args.seed + k)))
                 for k, w in enumerate(clean)]
        sources.append((f"synthetic, {len(clean)} windows, holes {fraction:g}", pairs))
    if args.sevenscenes.is_dir():
        for label, windows in sevenscenes_windows(args.sevenscenes).items():
            sources.append((label, [(w, w) for w in windows]))
    else:
        print(f"note: {args.sevenscenes} not found; the 7-Scenes rows are skipped")

    print(f"visibility tol {args.tol}, cycle tau {DEFAULT_TAU}, {SIZE} px view; precision / kept / worst-bin precision in %,"
          f" kept ratio = ours / strict")
    header = (f"{'source':<38} {'inv%':>5} {'grid':>4} | {'cycle':>5} | "
              + " | ".join(f"{n + ': prec  kept worst':>17}" for n in RULES) + f" | {'ratio':>5}")
    print(header + "\n" + "-" * len(header))
    report = []
    for label, pairs in sources:
        invalid = invalid_share(h for _, h in pairs)
        for grid in args.grids:
            s = summary(score(pairs, grid, args.tol))
            print(row(label, grid, s, invalid), flush=True)
            report.append({"source": label, "invalid_share": invalid, "grid": grid, **s})
    holey = sources[len(args.fractions) - 1][1][0][1]
    times = {grid: time_rules(holey, grid, args.tol) for grid in args.grids}
    print()
    for grid, t in times.items():
        print(f"time of one {VIEWS}-view window at grid {grid} (fastest of 15, one thread): strict {t['strict'] * 1e3:.1f} ms, "
              f"ours {t['ours'] * 1e3:.1f} ms, ratio {t['ours'] / t['strict']:.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": report, "time_s": times, "tol": args.tol, "seed": args.seed}, indent=2))


if __name__ == "__main__":
    main()
