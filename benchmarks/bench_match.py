"""Token matching benchmark: all ordered pairs of one window, exact NN + cycle masks (SPEC §3).

For every S in ``--views`` and grid in ``--grids`` it measures, on the same smooth random pointmaps
(or, with ``--sevenscenes ROOT``, real windows: a 7-Scenes scene's depth and poses through the depth
backend) (median of ``--repeats`` rounds, one process, one table), the **CPU time** of (``time.process_time``:
every thread of the process, so a shared, loaded machine blurs it less than wall time; wall time is
reported beside it):

* ``auto`` (ours; the ratios are relative to it) and the three exact backends of
  :func:`cameo_corr.pipeline.match.match_tokens`: ``kdtree``, ``faiss``, ``torch``;
* ``ckdtree/pair``: the common research-code baseline (DUSt3R/MASt3R): one ``cKDTree`` per view, one
  ``k=1`` query per ordered pair on all cores, then the cycle mask (no tie handling); ``ckdtree/pair/1``
  the same with one thread per query;
* ``ckdtree/view``: the same exact tie rule with a library tree (how this package matched before it had
  its own): one ``cKDTree`` per key view queried with the other views' tokens stacked, ``k=2``, rows
  with a (near) tie re-done by brute force;
* ``faiss/pair``: one ``faiss.knn(k=1)`` per ordered pair, then the cycle mask (inexact float32 BLAS);
* ``numpy loop``: a naive per-pair loop, full ``[hw, hw]`` distance matrix + argmin per pair;
* ``matmul floor``: a lower bound for brute force: one dense ``[S*hw, S*hw]`` float32 matmul (row
  chunks of 64 Mi elements) + argmin per key view, no cycle mask and not exact.

Each method runs once untimed (warm-up and agreement check), then ``--repeats`` rounds in which every
method runs once in turn (so a burst of load hits all of them alike); the table shows the medians. The
brute-force methods (``faiss``, ``torch``, ``faiss/pair``, ``numpy loop``, ``matmul floor``) are first
timed on 2 views and extrapolated; a size whose estimate exceeds ``--budget`` seconds is skipped and
shown as ``skip (~N s)``, and a method whose warm-up exceeds ``--slow`` seconds is reported by that one
run.

torch and faiss bring two OpenMP runtimes whose idle threads busy-wait by default; on 2 cores they
starve each other (and the KD-trees' threads), inflating faiss calls by up to 100x. Unless the caller
set it, the benchmark runs with ``OMP_WAIT_POLICY=PASSIVE`` (idle threads sleep), which is fair to every
method. ``OMP_NUM_THREADS`` (torch's and faiss's threads) is left as the caller set it: with
``OMP_NUM_THREADS=1`` the table is the CPU cost of one pipeline worker (Ray gives each worker one thread
unless told otherwise); unset, torch and faiss use every core (less wall time, more CPU time). Our
KD-tree runs on one thread either way. Its functions are compiled (or loaded from numba's cache) in the
untimed warm-up run.
The exact methods (the backends and ``ckdtree/view``) must return the same ``nn`` as ``auto``, and the
backends the same ``dist`` and ``mask``; a mismatch aborts the run.

Usage: ``python benchmarks/bench_match.py [--views 4 8 16] [--grids 16 32 64] [--repeats 7]
[--budget 12] [--slow 1.5] [--sevenscenes ROOT] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when the OpenMP runtimes load (imports below)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cameo_corr.pipeline.match import match_tokens, resolve_backend  # noqa: E402
from cameo_corr.schemas import SchemaError  # noqa: E402


def smooth_pointmaps(S: int, grid: int, seed: int = 0, invalid_frac: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """``S`` token pointmaps ``[S, g, g, 3]`` float32 of one smooth random surface seen from nearby cameras,
    with ``invalid_frac`` random invalid tokens (``valid [S, g, g]``)."""
    rng = np.random.default_rng(seed)
    u = (np.arange(grid) + 0.5) / grid * 2 - 1
    uu, vv = np.meshgrid(u, u, indexing="xy")
    freqs = rng.uniform(0.5, 3.0, size=(4, 2))
    phases = rng.uniform(0, 2 * np.pi, size=4)
    amps = rng.uniform(0.05, 0.2, size=4)
    pts = np.empty((S, grid, grid, 3))
    for s in range(S):
        ang = rng.uniform(-0.15, 0.15, size=3)
        cx, cy, cz = np.cos(ang)
        sx, sy, sz = np.sin(ang)
        R = (
            np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
            @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
            @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
        )
        t = rng.uniform(-0.2, 0.2, size=3)
        rays = np.stack([uu, vv, np.ones_like(uu)], -1) @ R.T
        x, y = rays[..., 0] / rays[..., 2] + t[0], rays[..., 1] / rays[..., 2] + t[1]
        z = 3.0 + sum(a * np.sin(f[0] * x + f[1] * y + p) for a, f, p in zip(amps, freqs, phases))
        pts[s] = np.stack([x * z, y * z, z], -1)
    valid = rng.random((S, grid, grid)) >= invalid_frac
    return pts.astype(np.float32), valid


def sevenscenes_pointmaps(root: str, S: int, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Token pointmaps ``[S, g, g, 3]`` float32 and validity of one real window: the first ``S`` frames of
    a 7-Scenes scene (sequences in order, one world frame) through the depth backend, 512 px crop."""
    from cameo_corr.datasets import open_dataset
    from cameo_corr.datasets.canonical import CanonicalView, load_window
    from cameo_corr.pipeline.backends import make_backend
    from cameo_corr.pipeline.match import tokenize
    from cameo_corr.schemas import WindowRecord

    reader = open_dataset("7scenes", root, split="all")
    frames = [f for sid in reader.scene_ids() for f in reader.scene(sid).frames]
    if len(frames) < S:
        raise SystemExit(f"--sevenscenes {root}: {len(frames)} frames, a window of {S} views needs more")
    record = WindowRecord(f"bench-{S}", "7scenes", "all", "scene", tuple(frames[:S]))
    window = load_window(reader, record, CanonicalView(size=512, policy=reader.preferred_crop_policy()), with_depth=True)
    result = make_backend("depth", device="cpu")(window)
    points, valid, _ = tokenize(result.points, result.valid, result.conf, grid)
    return points.numpy(), valid.numpy()


def _cycle_mask(nn: np.ndarray, valid: np.ndarray, w: int, tau: float) -> np.ndarray:
    """Cycle mask of baseline ``nn [S, S, hw]`` (same definition as the package)."""
    S, _, hw = nn.shape
    v = np.arange(S)
    cyc = nn.swapaxes(0, 1)[v[:, None, None], v[None, :, None], nn]
    x = np.arange(hw)
    d2 = (x % w - cyc % w) ** 2 + (x // w - cyc // w) ** 2
    return (d2 <= tau * tau) & valid[:, None, :]


def ckdtree_per_pair(pts: np.ndarray, valid: np.ndarray, tau: float = 1.5, workers: int = -1) -> np.ndarray:
    """DUSt3R-style baseline: one cKDTree per view on its valid tokens, one k=1 query per ordered pair
    (``workers`` threads per query; DUSt3R passes several)."""
    from scipy.spatial import cKDTree

    S, g = pts.shape[0], pts.shape[1]
    P = pts.reshape(S, -1, 3).astype(np.float64)
    V = valid.reshape(S, -1)
    idx = [np.flatnonzero(V[j]) for j in range(S)]
    trees = [cKDTree(P[j, idx[j]]) for j in range(S)]
    nn = np.zeros((S, S, P.shape[1]), dtype=np.int64)
    for i in range(S):
        for j in range(S):
            if i != j:
                nn[i, j, idx[i]] = idx[j][trees[j].query(P[i, idx[i]], k=1, workers=workers)[1]]
    return _cycle_mask(nn, V, g, tau)


def ckdtree_per_view(pts: np.ndarray, valid: np.ndarray, tau: float = 1.5, rtol: float = 1e-9) -> tuple[np.ndarray, np.ndarray]:
    """The exact tie rule with a library tree: one cKDTree per key view on its valid tokens, queried once
    with the valid tokens of all other views (``k=2``, all cores from 8192 rows); rows whose second
    neighbour is within ``rtol`` of the first are re-done by float64 brute force (lowest index on ties).
    Returns ``(nn, mask)``."""
    from scipy.spatial import cKDTree

    S, g = pts.shape[0], pts.shape[1]
    P = pts.reshape(S, -1, 3).astype(np.float64)
    V = valid.reshape(S, -1)
    nn = np.zeros((S, S, P.shape[1]), dtype=np.int64)
    for j in range(S):
        nn[j, j] = np.arange(P.shape[1])
        keys = np.flatnonzero(V[j])
        queries = V.copy()
        queries[j] = False
        if not (keys.size and queries.any()):
            continue
        Q, K = P[queries], P[j, keys]
        k = min(2, len(keys))
        d, cand = cKDTree(K).query(Q, k=k, workers=-1 if len(Q) >= 8192 else 1)
        d, cand = d.reshape(len(Q), k), cand.reshape(len(Q), k)
        index = cand[:, 0].copy()
        if k > 1:
            for r in np.flatnonzero(d[:, 1] <= d[:, 0] * (1.0 + rtol)):
                diff = Q[r] - K
                index[r] = np.argmin(diff[:, 0] * diff[:, 0] + diff[:, 1] * diff[:, 1] + diff[:, 2] * diff[:, 2])
        nn[:, j][queries] = keys[index]
    return nn, _cycle_mask(nn, V, g, tau)


def faiss_per_pair(pts: np.ndarray, valid: np.ndarray, tau: float = 1.5) -> np.ndarray:
    """One ``faiss.knn(k=1)`` per ordered pair (float32, inexact) + cycle mask."""
    import faiss

    S, g = pts.shape[0], pts.shape[1]
    P = np.ascontiguousarray(pts.reshape(S, -1, 3))
    V = valid.reshape(S, -1)
    idx = [np.flatnonzero(V[j]) for j in range(S)]
    keys = [np.ascontiguousarray(P[j, idx[j]]) for j in range(S)]
    nn = np.zeros((S, S, P.shape[1]), dtype=np.int64)
    for i in range(S):
        for j in range(S):
            if i != j:
                nn[i, j, idx[i]] = idx[j][faiss.knn(keys[i], keys[j], 1)[1][:, 0]]
    return _cycle_mask(nn, V, g, tau)


def numpy_loop(pts: np.ndarray, valid: np.ndarray, tau: float = 1.5) -> np.ndarray:
    """Naive per-pair loop: full distance matrix by broadcasting + argmin, float64."""
    S, g = pts.shape[0], pts.shape[1]
    P = pts.reshape(S, -1, 3).astype(np.float64)
    V = valid.reshape(S, -1)
    nn = np.zeros((S, S, P.shape[1]), dtype=np.int64)
    for i in range(S):
        for j in range(S):
            if i != j:
                d2 = ((P[i][:, None, :] - P[j][None, :, :]) ** 2).sum(-1)
                d2[:, ~V[j]] = np.inf
                nn[i, j] = d2.argmin(1)
    return _cycle_mask(nn, V, g, tau)


def matmul_floor(pts: np.ndarray, valid: np.ndarray, chunk_elements: int = 1 << 26) -> torch.Tensor:
    """Lower bound for brute force: dense ``[S*hw, S*hw]`` float32 ``|a|^2 + |b|^2 - 2ab`` + argmin per view."""
    S = pts.shape[0]
    X = torch.from_numpy(pts.reshape(-1, 3))
    n = X.shape[0]
    sq = (X * X).sum(1)
    out = torch.empty(n, S, dtype=torch.long)
    rows = max(1, chunk_elements // n)
    for r0 in range(0, n, rows):
        d = sq[r0 : r0 + rows, None] + sq[None, :] - 2.0 * (X[r0 : r0 + rows] @ X.T)
        out[r0 : r0 + rows] = d.view(d.shape[0], S, -1).argmin(-1)
    return out


def _runner(
    name: str, pts: np.ndarray, valid: np.ndarray, tau: float, baselines: dict[str, Callable[[np.ndarray, np.ndarray], object]]
) -> Callable[[], object]:
    """A no-argument call of method ``name`` (a ``match_tokens`` backend or a baseline) on one window."""
    if name in baselines:
        return lambda: baselines[name](pts, valid)
    P, V = torch.from_numpy(pts), torch.from_numpy(valid)
    return lambda: match_tokens(P, V, tau=tau, backend=name)


def _cell(result: dict, ours: dict, key: str = "cpu") -> str:
    """``ms (ratio to ours)`` of ``key`` (``cpu`` or ``wall`` seconds), or the skip note of one table cell."""
    if result.get("unavailable"):
        return "unavailable"
    if result.get("skipped"):
        return f"skip (~{result['estimate_s']:.0f} s)"
    return f"{1e3 * result[key]:.1f} ({result[key] / ours[key]:.2f}x)"


def _clock(fn: Callable[[], object]) -> tuple[float, float, object]:
    """``(cpu seconds, wall seconds, result)`` of one call; CPU time sums every thread of the process."""
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return time.process_time() - c0, time.perf_counter() - w0, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--views", type=int, nargs="+", default=[4, 8, 16], help="window sizes S")
    parser.add_argument("--grids", type=int, nargs="+", default=[16, 32, 64], help="token grid sides")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per size (median)")
    parser.add_argument("--budget", type=float, default=12.0, help="skip a brute-force run estimated above this (s)")
    parser.add_argument("--slow", type=float, default=1.5, help="a method whose warm-up takes longer is reported by that run (s)")
    parser.add_argument("--tau", type=float, default=1.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sevenscenes", metavar="ROOT", help="real windows instead: a 7-Scenes scene's depth + poses (e.g. the "
                        "shared stairs sample) through the depth backend")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    backends = ["auto", "kdtree", "faiss", "torch"]
    baselines: dict[str, Callable[[np.ndarray, np.ndarray], object]] = {
        "ckdtree/pair": lambda p, v: ckdtree_per_pair(p, v, args.tau),
        "ckdtree/pair/1": lambda p, v: ckdtree_per_pair(p, v, args.tau, workers=1),
        "ckdtree/view": lambda p, v: ckdtree_per_view(p, v, args.tau),
        "faiss/pair": lambda p, v: faiss_per_pair(p, v, args.tau),
        "numpy loop": lambda p, v: numpy_loop(p, v, args.tau),
        "matmul floor": lambda p, v: matmul_floor(p, v),
    }
    pairs = lambda S: S * (S - 1) / 2  # noqa: E731  (brute-force cost of S views relative to 2 views)
    brute_scale = {
        "faiss": pairs,
        "torch": pairs,
        "faiss/pair": pairs,
        "numpy loop": pairs,
        "matmul floor": lambda S: (S / 2) ** 2,
    }
    columns = backends + list(baselines)
    unavailable = {}  # columns whose package is missing (faiss on a machine without it), shown as such
    try:
        resolve_backend("faiss", torch.device("cpu"))
    except SchemaError as e:
        unavailable = {"faiss": str(e), "faiss/pair": str(e)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
          f"median of {args.repeats} rounds; CPU ms, (x) = CPU time / auto's; "
          f"{'7-Scenes windows from ' + args.sevenscenes if args.sevenscenes else 'smooth random pointmaps'}; "
          f"load average {os.getloadavg()[0]:.1f}")
    for name, why in unavailable.items():
        print(f"{name}: unavailable ({why})")
    match_tokens(torch.zeros(2, 2, 2, 3), torch.ones(2, 2, 2, dtype=torch.bool))  # imports outside timing
    results = []
    for S in args.views:
        for g in args.grids:
            if args.sevenscenes:
                pts, valid = sevenscenes_pointmaps(args.sevenscenes, S, g)
            else:
                pts, valid = smooth_pointmaps(S, g, seed=args.seed)
            ref = match_tokens(torch.from_numpy(pts), torch.from_numpy(valid), tau=args.tau, backend="auto")
            row: dict[str, dict] = {}
            runs: dict[str, Callable[[], object]] = {}
            clocks: dict[str, list[tuple[float, float]]] = {}
            for name in columns:
                if name in unavailable:
                    row[name] = {"unavailable": True}
                    continue
                if name in brute_scale:
                    estimate = _clock(_runner(name, pts[:2], valid[:2], args.tau, baselines))[1] * brute_scale[name](S)
                    if estimate > args.budget:
                        row[name] = {"skipped": True, "estimate_s": estimate}
                        continue
                run = _runner(name, pts, valid, args.tau, baselines)
                cpu, wall, out = _clock(run)  # warm-up: exact methods must agree with auto
                if name in backends and not all(torch.equal(a, b) for a, b in zip(out, ref)):
                    raise SystemExit(f"backend {name} disagrees with auto at S={S}, grid={g}")
                if name == "ckdtree/view" and not np.array_equal(out[0], ref[0].numpy()):
                    raise SystemExit(f"{name} disagrees with auto at S={S}, grid={g}")
                clocks[name] = [(cpu, wall)]
                if wall < args.slow:
                    runs[name] = run
            for name in runs:
                clocks[name] = []
            for _ in range(args.repeats):  # rounds: every method once in turn
                for name, run in runs.items():
                    clocks[name].append(_clock(run)[:2])
            for name, cs in clocks.items():
                row[name] = {"cpu": statistics.median(c for c, _ in cs), "wall": statistics.median(w for _, w in cs),
                             "runs": [{"cpu": c, "wall": w} for c, w in cs]}
            results.append({"S": S, "grid": g, **row})
            ours = row["auto"]
            print(f"S={S:2d} grid={g:2d} | " + " | ".join(f"{n}: {_cell(row[n], ours)}" for n in columns), flush=True)

    load = os.getloadavg()[0]
    print(f"\nload average at the end: {load:.1f}")
    for key, title in (("cpu", "CPU time"), ("wall", "wall time")):
        print(f"\n{title}, ms (x = {title} / auto's)\n")
        print("| S | grid | " + " | ".join(columns) + " |")
        print("|" + "---|" * (len(columns) + 2))
        for row in results:
            print(f"| {row['S']} | {row['grid']} | " + " | ".join(_cell(row[n], row["auto"], key) for n in columns) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"repeats": args.repeats, "tau": args.tau, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                       "load_average_end": load,
                       "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
