"""Token pointmaps, exact all-pairs 3D nearest neighbours, cycle masks and CAMEO targets (SPEC §3).

Public API::

    tokenize(points [S,H,W,3], valid [S,H,W], conf [S,H,W], grid) -> (points [S,h,w,3], valid [S,h,w], conf [S,h,w])
    match_tokens(points [S,h,w,3], valid [S,h,w], *, tau=1.5, backend="auto") -> (nn [S,S,hw], dist [S,S,hw], mask [S,S,hw])
    correspond(result: PointmapResult, *, grid=(32, 32), tau=1.5, backend="auto") -> TokenCorrespondences
    pair_targets(nn, mask) -> (target [...,S,S,hw], weight [...,S,S,hw])
    global_targets(nn, dist, mask) -> (view [...,S,hw], token [...,S,hw], weight [...,S,hw])

Tokens. ``tokenize`` is ``F.interpolate(points, (h, w), mode="bilinear", align_corners=False)`` (what
CAMEO's code does). A pixel is usable when it is valid and its point and confidence are finite; unusable
pixels are set to 0 before interpolation (no NaN can spread) and their indicator is interpolated with the
same weights, so a token is valid only when **no** pixel with a non-zero bilinear weight is unusable.
A valid token's confidence is the bilinear interpolation of its pixels' confidences (the same weights as
its point); invalid tokens get point 0 and confidence 0.

Nearest neighbours. For every ordered pair ``(i, j)``, ``i != j``, ``nn[i, j, x]`` is the valid token of
view ``j`` nearest in 3D to valid token ``x`` of view ``i`` (flattened row-major ``y*w + x``), ``dist`` its
Euclidean distance, ``cycle[i, j, x] = nn[j, i, nn[i, j, x]]`` and ``mask[i, j, x] = |p(x) - p(cycle)|_2
<= tau`` in token units. An invalid query token, or a key view without any valid token, gives ``nn = 0``,
``dist = +inf``, ``mask = False``. The diagonal is the identity: ``nn[i, i] = arange(hw)``, ``dist = 0``,
``mask = valid[i]``. The mask is :func:`cameo_corr.pipeline.masks.cycle_mask`, which loaders call to
recompute it for another ``tau`` (or combine it with a visibility test) without any geometry.

Exactness and ties. Every backend returns the argmin of one reference metric: the squared distance
``(a0-b0)^2 + (a1-b1)^2 + (a2-b2)^2`` evaluated in float64 in that order on the float32 (or float64)
token points. Among keys at exactly the same reference distance the **lowest token index** wins. The
KD-tree computes that metric itself and proves the tie rule during its search; faiss only proposes
candidates, which are re-ranked in the reference metric, and a query whose candidate list cannot be
proven to contain every key at the minimum distance (the gap to the first excluded key is within
faiss's rounding bound) is recomputed by exact brute force. So ``"torch"``, ``"faiss"``, ``"kdtree"``
and ``"auto"`` return identical ``nn`` and ``mask``.

Backends (``backend=``):

* ``"kdtree"``: one KD-tree per key view (:mod:`cameo_corr.pipeline.kdtree`, compiled with numba),
  built on its valid tokens and queried with the valid tokens of all other views stacked (one call per
  key view instead of one per pair). It skips a subtree only when a lower bound of the reference
  metric to its bounding box, rounded the same way, exceeds the best distance found, so every key at
  the minimum distance is examined and the lowest index kept: the exact rule for the price of one
  nearest-neighbour query (library trees need a second neighbour and a re-do of near ties for it).
* ``"faiss"``: ``faiss.knn`` (CPU) or ``faiss.knn_gpu`` (CUDA tensors; needs a faiss build with GPUs) with
  4 candidates, then the exact re-rank. faiss computes ``|a|^2 + |b|^2 - 2 a.b`` in float32, so a row is
  certified only when its 4th candidate is further than the first by more than twice the error bound.
* ``"torch"``: batched brute force in float64 with direct coordinate differences (no matmul expansion),
  chunked so that at most ``max_elements`` distances are alive at once; runs on any device.
* ``"auto"``: the fastest exact method for the tensor's device. On CPU that is the KD-tree path
  (``benchmarks/bench_match.py``, one thread, S=4-8 and 32x32-64x64 grids: 2-3.9x less CPU time than
  per-pair ``cKDTree`` queries with one thread each, 1.3-1.9x less than this package's previous
  two-neighbour ``pykdtree`` path, and an order of magnitude less than faiss and brute force); on CUDA
  the torch brute force (no host round trip).

The CPU backends run on numpy end to end; the torch backend and faiss-gpu on torch tensors on the input
device. Results are torch tensors on the input device.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from cameo_corr.pipeline.masks import check_tau, cycle_mask
from cameo_corr.schemas import DEFAULT_GRID, DEFAULT_TAU, PointmapResult, SchemaError, TokenCorrespondences, as_grid

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch import Tensor

__all__ = [
    "BACKENDS",
    "DEFAULT_MAX_ELEMENTS",
    "GPU_FAISS_HINT",
    "resolve_backend",
    "faiss_rounding",
    "tokenize",
    "match_tokens",
    "correspond",
    "pair_targets",
    "global_targets",
]

BACKENDS = ("auto", "torch", "faiss", "kdtree")
"""Accepted values of ``backend=``."""

DEFAULT_MAX_ELEMENTS = 1 << 22
"""Default bound on the number of query-key distances brute force holds at once (32 MiB per float64
temporary)."""

_FAISS_K = 4
_FAISS_ERR_CPU = 16 * 2.0**-24
_FAISS_ERR_GPU = 64 * 2.0**-24
"""Error bounds of faiss's float32 ``|a|^2 + |b|^2 - 2 a.b`` relative to ``(|a| + |b|)^2``, the rounding of
the centred inputs to float32 included. Both are float32 bounds: faiss-gpu multiplies on its own cuBLAS
handle in the default math mode (plus ``CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION``), where float32
GEMMs never use TF32, so its error is that of float32 arithmetic in another summation order (the GPU
bound is 4x wider for it). faiss-cpu's measured error on smooth token clouds is ~0.03 x 2^-24;
:func:`faiss_rounding` measures it on any device and ``cameo-corr selfcheck`` fails when faiss-gpu
exceeds the bound (a wider bound only sends more rows to brute force: a TF32-sized one would certify
none)."""
GPU_FAISS_HINT = (
    "PyPI's faiss-gpu-cu12 wheels after 1.9.0.0 carry kernels for compute capabilities 7.0 and 8.x only: "
    "on Hopper (9.0) and newer install faiss-gpu-cu12==1.9.0.0 (Python <= 3.12) or conda's faiss-gpu"
)
"""What to install when faiss-gpu has no kernels for the GPU (``pip install 'cameo-corr[gpu]'`` pins 1.9.0.0)."""


# ------------------------------------------------------------------------------------------- helpers
def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The concrete backend ``backend`` means for tensors on ``device`` (``"auto"`` resolved).

    Raises :class:`SchemaError` (field ``backend``) for an unknown name, for ``"faiss"`` when the faiss
    package cannot be imported, and for ``"faiss"`` on a CUDA device when the installed faiss has no GPU
    support (never a silent fallback).
    """
    if backend not in BACKENDS:
        raise SchemaError("backend", f"expected one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        return "torch" if device.type == "cuda" else "kdtree"
    if backend == "faiss":
        try:
            import faiss
        except ImportError as e:
            raise SchemaError(
                "backend",
                f"'faiss' needs the faiss package, which cannot be imported ({e}){_faiss_clash()}; install faiss-cpu "
                "(`pip install 'cameo-corr[faiss]'`), or faiss-gpu for CUDA tensors (`pip install 'cameo-corr[gpu]'`), "
                "or use backend='kdtree', 'torch' or 'auto'",
            ) from e
        if device.type == "cuda" and (not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0):
            raise SchemaError(
                "backend",
                "'faiss' was asked for CUDA tensors but the installed faiss has no GPU support "
                f"(faiss.get_num_gpus() == 0){_faiss_clash()}; install faiss-gpu (`pip install 'cameo-corr[gpu]'`), "
                "or use backend='torch' or 'auto'",
            )
        if device.type == "cuda":
            _probe_faiss_gpu(faiss, device.index if device.index is not None else torch.cuda.current_device())
    return backend


def _faiss_clash() -> str:
    """A note when faiss-cpu and a faiss-gpu wheel are both installed: both ship the ``faiss`` module, so
    whichever was installed last overwrote the other (and removing one breaks the other)."""
    from importlib import metadata

    installed = set()
    for dist in ("faiss-cpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss-gpu-cuvs", "faiss-gpu"):
        try:
            metadata.version(dist)
            installed.add(dist)
        except metadata.PackageNotFoundError:
            pass
    gpu = sorted(installed - {"faiss-cpu"})
    if "faiss-cpu" not in installed or not gpu:
        return ""
    return (f" (faiss-cpu and {', '.join(gpu)} are both installed and overwrite each other's faiss module: "
            f"uninstall both, then install {gpu[0]} alone)")


_FAISS_GPU_PROBED: dict[int, str | None] = {}
_GPU_RESOURCES: dict[int, Any] = {}


FAISS_GPU_TEMP_BYTES = 256 * 2**20
"""Temporary GPU memory the faiss resources of a process reserve on a GPU. faiss's default is a share of
the GPU (18 %, at most 1.5 GiB in recent releases), reserved by every process: actors sharing a GPU
(``--gpus-per-worker 0.25``) each held it. One pair's distance tile at grid 64 is 4096 x 4096 float32
(64 MiB); faiss sizes its tiles to the memory it has and allocates beyond it with ``cudaMalloc``."""


def _gpu_resources(faiss: Any, index: int) -> Any:
    """The process's one ``faiss.StandardGpuResources`` of GPU ``index``, with :data:`FAISS_GPU_TEMP_BYTES`
    of temporary memory."""
    if index not in _GPU_RESOURCES:
        res = faiss.StandardGpuResources()
        res.setTempMemory(FAISS_GPU_TEMP_BYTES)
        _GPU_RESOURCES[index] = res
    return _GPU_RESOURCES[index]


def _probe_faiss_gpu(faiss: Any, index: int) -> None:
    """Run one tiny ``knn_gpu`` on GPU ``index`` (once per process and GPU) and raise :class:`SchemaError`
    (field ``backend``) when faiss-gpu cannot run there, e.g. a wheel without kernels for its compute
    capability ("no kernel image is available"): every window would fail at its first match."""
    if index not in _FAISS_GPU_PROBED:
        try:
            xb = np.arange(12, dtype=np.float32).reshape(4, 3)
            faiss.knn_gpu(_gpu_resources(faiss, index), xb[:2], xb, 1, device=index)
            _FAISS_GPU_PROBED[index] = None
        except Exception as e:  # noqa: BLE001 - faiss raises RuntimeError for CUDA errors; any failure means it cannot run here
            cc = ".".join(map(str, torch.cuda.get_device_capability(index))) if torch.cuda.is_available() else "?"
            _FAISS_GPU_PROBED[index] = (
                f"'faiss' cannot run on cuda:{index} (compute capability {cc}) with faiss {getattr(faiss, '__version__', '?')}: "
                f"{str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}; {GPU_FAISS_HINT}, or use "
                "backend='torch' or 'auto'"
            )
    if _FAISS_GPU_PROBED[index] is not None:
        raise SchemaError("backend", _FAISS_GPU_PROBED[index])


# ------------------------------------------------------------------------------------------ tokens
def tokenize(
    points: "Tensor", valid: "Tensor", conf: "Tensor", grid: int | tuple[int, int]
) -> tuple["Tensor", "Tensor", "Tensor"]:
    """Token pointmaps ``[S, h, w, 3]``, validity ``[S, h, w]`` and confidence ``[S, h, w]``.

    Bilinear resize with ``align_corners=False`` of ``points [S, H, W, 3]``; see the module docstring for
    how validity (no unusable pixel with a non-zero weight) and confidence (bilinear) are defined.
    Results are float32 (float64 for float64 points) on the input device.
    """
    h, w = as_grid(grid)
    points = torch.as_tensor(points)
    valid = torch.as_tensor(valid)
    conf = torch.as_tensor(conf, device=points.device)
    if points.ndim != 4 or points.shape[-1] != 3:
        raise SchemaError("points", f"expected [S, H, W, 3], got {tuple(points.shape)}")
    S, H, W, _ = points.shape
    if tuple(valid.shape) != (S, H, W):
        raise SchemaError("valid", f"expected {(S, H, W)} to match points, got {tuple(valid.shape)}")
    if tuple(conf.shape) != (S, H, W):
        raise SchemaError("conf", f"expected {(S, H, W)} to match points, got {tuple(conf.shape)}")
    dtype = torch.float64 if points.dtype == torch.float64 else torch.float32
    usable = valid.to(device=points.device, dtype=torch.bool) & torch.isfinite(points).all(-1) & torch.isfinite(conf)
    zero = torch.zeros((), dtype=dtype, device=points.device)
    stacked = torch.cat(
        [
            torch.where(usable[..., None], points.to(dtype), zero).permute(0, 3, 1, 2),
            torch.where(usable, conf.to(dtype), zero)[:, None],
            (~usable).to(dtype)[:, None],
        ],
        dim=1,
    )  # [S, 5, H, W]: one interpolation for points, confidence and the unusable indicator
    out = F.interpolate(stacked, size=(h, w), mode="bilinear", align_corners=False)
    tok_valid = out[:, 4] == 0
    tok_points = torch.where(tok_valid[..., None], out[:, :3].permute(0, 2, 3, 1), zero).contiguous()
    tok_conf = torch.where(tok_valid, out[:, 3], zero).contiguous()
    return tok_points, tok_valid, tok_conf


# --------------------------------------------------------------------------- exact nearest neighbours
# The CPU backends (our KD-tree, faiss-cpu) run on numpy end to end: interleaving torch's OpenMP kernels with
# another library's worker threads makes the idle OpenMP threads spin against them (measured 5-10x slower
# on 2 cores with scipy's threads). The torch backend and faiss-gpu run on torch tensors on the input device.
Array = Any  # a numpy array or a torch tensor


def _sqdist_rows(q: Array, k: Array) -> Array:
    """Reference metric between matching rows ``q [..., 3]`` and ``k [..., 3]`` (float64, fixed order)."""
    d = q - k
    d *= d  # each square rounded once, then summed in coordinate order: (d0^2 + d1^2) + d2^2
    out = d[..., 0] + d[..., 1]
    out += d[..., 2]
    return out


def _brute_np(queries: np.ndarray, keys: np.ndarray, max_elements: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact NN of float64 ``queries [n, 3]`` among ``keys [m, 3]`` -> ``(index [n], sqdist [n])``;
    direct differences, first (lowest) index among exact ties, chunks of ``max_elements`` distances."""
    n, m = len(queries), len(keys)
    index = np.empty(n, dtype=np.int64)
    sq = np.empty(n, dtype=np.float64)
    rows = max(1, max_elements // max(m, 1))
    for r0 in range(0, n, rows):
        d2 = _sqdist_rows(queries[r0 : r0 + rows, None, :], keys[None, :, :])
        arg = d2.argmin(axis=1)
        index[r0 : r0 + rows] = arg
        sq[r0 : r0 + rows] = np.take_along_axis(d2, arg[:, None], axis=1)[:, 0]
    return index, sq


def _brute_torch(queries: "Tensor", keys: "Tensor", max_elements: int) -> tuple["Tensor", "Tensor"]:
    """:func:`_brute_np` on torch tensors (any device); ``argmin`` returns the first minimal index."""
    n, m = queries.shape[0], keys.shape[0]
    index = torch.empty(n, dtype=torch.long, device=queries.device)
    sq = torch.empty(n, dtype=torch.float64, device=queries.device)
    rows = max(1, max_elements // max(m, 1))
    for r0 in range(0, n, rows):
        d2 = _sqdist_rows(queries[r0 : r0 + rows, None, :], keys[None, :, :])
        arg = d2.argmin(dim=1)
        index[r0 : r0 + rows] = arg
        sq[r0 : r0 + rows] = d2.gather(1, arg[:, None])[:, 0]
    return index, sq


def _select_np(
    queries: np.ndarray, keys: np.ndarray, cand: np.ndarray, certified: np.ndarray, max_elements: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact NN from candidate lists: ``cand [n, k]`` (indices into ``keys``) re-ranked in the reference
    metric for ``certified`` rows (lowest index on exact ties); brute force for the other rows.
    Returns ``(index [n], distance [n])``."""
    sq = _sqdist_rows(queries[:, None, :], keys[cand])
    best = sq.min(axis=1)
    index = np.where(sq == best[:, None], cand, np.iinfo(np.int64).max).min(axis=1)
    redo = np.flatnonzero(~certified)
    if redo.size:
        index[redo], best[redo] = _brute_np(queries[redo], keys, max_elements)
    return index, np.sqrt(best)


def _select_torch(
    queries: "Tensor", keys: "Tensor", cand: "Tensor", certified: "Tensor", max_elements: int
) -> tuple["Tensor", "Tensor"]:
    """:func:`_select_np` on torch tensors."""
    sq = _sqdist_rows(queries[:, None, :], keys[cand])
    best = sq.min(dim=1).values
    index = torch.where(sq == best[:, None], cand, torch.iinfo(torch.long).max).min(dim=1).values
    redo = torch.nonzero(~certified).flatten()
    if redo.numel():
        index[redo], best[redo] = _brute_torch(queries[redo], keys, max_elements)
    return index, torch.sqrt(best)


def _kdtree_nn(queries: np.ndarray, keys: np.ndarray, max_elements: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact NN via :func:`cameo_corr.pipeline.kdtree.nearest`: one tree on ``keys`` queried with all
    ``queries`` in the reference metric, lowest index on exact ties (``max_elements`` is not needed)."""
    from cameo_corr.pipeline.kdtree import nearest

    index, sq = nearest(queries, keys)
    return index, np.sqrt(sq, out=sq)


def _faiss_certified(D: Array, cand: Array, q_norm: Array, k_norm_max: Array, err_scale: float) -> Array:
    """Rows whose ``k`` faiss candidates provably hold every key at the minimum reference distance."""
    err = err_scale * (q_norm + k_norm_max) ** 2
    return (D[:, -1] - D[:, 0] > 2.0 * err) & (cand >= 0).all(1)


def _faiss_cpu_candidates(queries: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``faiss.knn`` of float64 ``queries`` among ``keys``, both centred on the keys and rounded to float32:
    ``(D [n, k] float32 squared distances, cand [n, k] int64, q32, k32)`` with ``k = min(4, len(keys))``."""
    import faiss

    centre = keys.mean(axis=0)
    q32 = np.ascontiguousarray(queries - centre, dtype=np.float32)
    k32 = np.ascontiguousarray(keys - centre, dtype=np.float32)
    D, cand = faiss.knn(q32, k32, min(_FAISS_K, len(keys)))
    return D, cand.astype(np.int64, copy=False), q32, k32


def _faiss_cpu_nn(queries: np.ndarray, keys: np.ndarray, max_elements: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact NN via ``faiss.knn`` candidates (float32, centred on the keys) + certified re-rank."""
    D, cand, q32, k32 = _faiss_cpu_candidates(queries, keys)
    if cand.shape[1] == len(keys):
        certified = (cand >= 0).all(axis=1)
    else:
        certified = _faiss_certified(
            D.astype(np.float64), cand, np.linalg.norm(q32, axis=1), np.linalg.norm(k32, axis=1).max(), _FAISS_ERR_CPU
        )
    return _select_np(queries, keys, np.maximum(cand, 0), certified, max_elements)


def _faiss_gpu_candidates(queries: "Tensor", keys: "Tensor") -> tuple["Tensor", "Tensor", "Tensor", "Tensor"]:
    """:func:`_faiss_cpu_candidates` on CUDA tensors through ``faiss.knn_gpu`` (results on their device)."""
    import faiss
    import faiss.contrib.torch_utils  # noqa: F401  (lets knn_gpu take torch CUDA tensors)

    dev = queries.device.index if queries.device.index is not None else torch.cuda.current_device()
    res = _gpu_resources(faiss, dev)
    centre = keys.mean(dim=0)
    q32 = (queries - centre).float().contiguous()
    k32 = (keys - centre).float().contiguous()
    with torch.cuda.device(dev):  # knn_gpu runs on torch's stream of the *current* device: make it the tensors'
        D, cand = faiss.knn_gpu(res, q32, k32, min(_FAISS_K, keys.shape[0]), device=dev)
    return D, cand.to(torch.long), q32, k32


def _faiss_gpu_nn(queries: "Tensor", keys: "Tensor", max_elements: int) -> tuple["Tensor", "Tensor"]:
    """Exact NN via ``faiss.knn_gpu`` on CUDA tensors (float32, centred) + certified re-rank."""
    D, cand, q32, k32 = _faiss_gpu_candidates(queries, keys)
    if cand.shape[1] == keys.shape[0]:
        certified = (cand >= 0).all(1)
    else:
        certified = _faiss_certified(
            D.double(), cand, q32.double().norm(dim=1), k32.double().norm(dim=1).max(), _FAISS_ERR_GPU
        )
    return _select_torch(queries, keys, cand.clamp_min(0), certified, max_elements)


def faiss_rounding(queries: "Tensor", keys: "Tensor") -> dict[str, float]:
    """How faiss's candidates behave on ``queries [n, 3]`` among ``keys [m, 3]`` (m > 4) on their device
    (faiss-gpu for CUDA tensors, faiss-cpu otherwise): ``error``, the largest error of its float32 squared
    distances against float64 on the same float32 inputs relative to ``(|q| + max |k|)^2``; ``bound``, the
    error the certification assumes there (the input rounding is covered by the bound, not measured);
    ``certified``, the share of queries whose candidates are certified (the others go to brute force)."""
    queries, keys = torch.as_tensor(queries).double(), torch.as_tensor(keys).double()
    if keys.shape[0] <= _FAISS_K:
        raise SchemaError("keys", f"needs more than {_FAISS_K} keys, got {keys.shape[0]}")
    if queries.device.type == "cuda":
        D, cand, q32, k32 = _faiss_gpu_candidates(queries, keys)
        bound = _FAISS_ERR_GPU
    else:
        D, cand, q32, k32 = (torch.from_numpy(a) for a in _faiss_cpu_candidates(queries.numpy(), keys.numpy()))
        bound = _FAISS_ERR_CPU
    q64, k64, D = q32.double(), k32.double(), D.double()
    exact = ((q64[:, None, :] - k64[cand.clamp_min(0)]) ** 2).sum(-1)
    q_norm, k_norm_max = q64.norm(dim=1), k64.norm(dim=1).max()
    scale = (q_norm[:, None] + k_norm_max) ** 2
    certified = _faiss_certified(D, cand, q_norm, k_norm_max, bound)
    return {"error": float(((D - exact).abs() / scale)[cand >= 0].max()), "bound": bound,
            "certified": float(certified.double().mean())}


def _brute_torch_nn(queries: "Tensor", keys: "Tensor", max_elements: int) -> tuple["Tensor", "Tensor"]:
    """The ``torch`` backend: :func:`_brute_torch` returning ``(index, distance)``."""
    index, sq = _brute_torch(queries, keys, max_elements)
    return index, torch.sqrt(sq)


def _nearest_np(points: np.ndarray, valid: np.ndarray, nn_fn: Callable, max_elements: int) -> tuple[np.ndarray, np.ndarray]:
    """``nn`` int64 and ``dist`` float32 ``[S, S, hw]`` of all ordered pairs of ``points [S, hw, 3]`` (numpy,
    any float dtype; one ``nn_fn`` call per key view with the valid tokens of all other views). The
    diagonal is the identity at distance 0. Raises :class:`SchemaError` for non-finite valid points.

    The valid tokens are gathered once, view after view, into float64 rows stored twice in a row: key
    view ``j``'s tokens are rows ``a:b`` and its queries (every other view's tokens, views ``j+1..S-1``
    then ``0..j-1``) the contiguous rows ``b:N+a`` of the doubled array, so no query array is copied per
    key view; each query view's block of results is written straight to its row ``[i, j]`` at the view's
    valid tokens (no flat index arrays: fewer fresh pages per window).
    """
    S, hw = valid.shape
    nn = np.zeros((S, S, hw), dtype=np.int64)
    dist = np.full((S, S, hw), np.inf, dtype=np.float32)
    nn.reshape(S * S, hw)[:: S + 1] = np.arange(hw)  # the diagonal blocks [i, i]
    dist.reshape(S * S, hw)[:: S + 1] = 0.0
    flat = np.flatnonzero(valid)  # view-major: view i's valid tokens are rows start[i]:start[i + 1]
    n_all = len(flat)
    twice = np.empty((2 * n_all, 3))
    pts = twice[:n_all]
    pts[...] = points.reshape(-1, 3).take(flat, axis=0)
    _check_finite(bool(np.isfinite(pts).all()))
    twice[n_all:] = pts
    view, token = np.divmod(flat, hw)
    start = np.searchsorted(view, np.arange(S + 1)).tolist()
    for j in range(S):
        a, b = start[j], start[j + 1]
        if a == b or b - a == n_all:  # no key, or no query
            continue
        local, d = nn_fn(twice[b : n_all + a], pts[a:b], max_elements)
        found = token[a:b].take(local)
        d = d.astype(np.float32)  # cast once: a float64 -> float32 scatter is 2x slower
        row = 0
        for i in [*range(j + 1, S), *range(j)]:  # the order of the query rows b..N+a
            lo, hi = start[i], start[i + 1]
            if hi > lo:
                tokens = token[lo:hi]
                nn[i, j][tokens] = found[row : row + hi - lo]
                dist[i, j][tokens] = d[row : row + hi - lo]
                row += hi - lo
    return nn, dist


def _nearest_torch(points: "Tensor", valid: "Tensor", nn_fn: Callable, max_elements: int) -> tuple["Tensor", "Tensor"]:
    """:func:`_nearest_np` on torch tensors on their device."""
    S, hw = valid.shape
    nn = torch.zeros(S, S, hw, dtype=torch.long, device=points.device)
    dist = torch.full((S, S, hw), math.inf, dtype=torch.float32, device=points.device)
    for j in range(S):
        nn[j, j] = torch.arange(hw, device=points.device)
        dist[j, j] = 0.0
        keys = torch.nonzero(valid[j]).flatten()
        queries = valid.clone()
        queries[j] = False
        if keys.numel() and bool(queries.any()):
            local, d = nn_fn(points[queries], points[j, keys], max_elements)
            nn[:, j][queries] = keys[local]
            dist[:, j][queries] = d.to(torch.float32)
    return nn, dist


def _check_finite(ok: bool) -> None:
    if not ok:
        raise SchemaError("points", "non-finite coordinates at valid tokens (tokenize marks them invalid)")


def match_tokens(
    points: "Tensor",
    valid: "Tensor",
    *,
    tau: float = DEFAULT_TAU,
    backend: str = "auto",
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> tuple["Tensor", "Tensor", "Tensor"]:
    """All ordered pairs' exact 3D nearest tokens and cycle masks of one window.

    ``points [S, h, w, 3]``, ``valid [S, h, w]`` -> ``nn`` int64, ``dist`` float32 and ``mask`` bool, each
    ``[S, S, h*w]`` on the input device (conventions, exactness and ties: module docstring).
    ``max_elements`` bounds the distances brute force holds at once. Raises :class:`SchemaError` on bad
    shapes, an unknown backend, a bad ``tau`` or non-finite points at valid tokens.
    """
    tau = check_tau(tau)
    points = torch.as_tensor(points)
    valid = torch.as_tensor(valid, device=points.device)
    if points.ndim != 4 or points.shape[-1] != 3:
        raise SchemaError("points", f"expected [S, h, w, 3], got {tuple(points.shape)}")
    S, h, w, _ = points.shape
    if tuple(valid.shape) != (S, h, w):
        raise SchemaError("valid", f"expected {(S, h, w)} to match points, got {tuple(valid.shape)}")
    if max_elements < 1:
        raise SchemaError("max_elements", f"must be >= 1, got {max_elements}")
    device = points.device
    name = resolve_backend(backend, device)
    hw = h * w
    if name == "torch" or (name == "faiss" and device.type == "cuda"):
        pts = points.reshape(S, hw, 3).to(torch.float64)
        vflat = valid.to(torch.bool).reshape(S, hw)
        _check_finite(bool(torch.isfinite(pts[vflat]).all()))
        nn, dist = _nearest_torch(pts, vflat, _brute_torch_nn if name == "torch" else _faiss_gpu_nn, max_elements)
        return nn, dist, cycle_mask(nn, vflat.reshape(S, h, w), tau)
    pts_np = points.detach().cpu().numpy().reshape(S, hw, 3)
    valid_np = valid.cpu().numpy().reshape(S, hw).astype(bool, copy=False)
    nn_np, dist_np = _nearest_np(pts_np, valid_np, _kdtree_nn if name == "kdtree" else _faiss_cpu_nn, max_elements)
    mask_np = cycle_mask(nn_np, valid_np.reshape(S, h, w), tau)
    return torch.from_numpy(nn_np).to(device), torch.from_numpy(dist_np).to(device), torch.from_numpy(mask_np).to(device)


def correspond(
    result: PointmapResult,
    *,
    grid: int | tuple[int, int] = (DEFAULT_GRID, DEFAULT_GRID),
    tau: float = DEFAULT_TAU,
    backend: str = "auto",
) -> TokenCorrespondences:
    """Tokenize a backend's pointmaps on ``grid`` and match all ordered pairs (``tokenize`` + ``match_tokens``)."""
    points, valid, conf = tokenize(result.points, result.valid, result.conf, grid)
    nn, dist, mask = match_tokens(points, valid, tau=tau, backend=backend)
    return TokenCorrespondences(points=points, valid=valid, conf=conf, nn=nn, dist=dist, mask=mask)


# ----------------------------------------------------------------------------------------- targets
def _pair_shape(nn: "Tensor", name: str = "nn") -> int:
    if nn.ndim < 3 or nn.shape[-3] != nn.shape[-2]:
        raise SchemaError(name, f"expected [..., S, S, hw], got {tuple(nn.shape)}")
    return int(nn.shape[-3])


def pair_targets(nn: "Tensor", mask: "Tensor") -> tuple["Tensor", "Tensor"]:
    """The paper's per-pair one-hot targets from cached ``nn``/``mask`` ``[..., S, S, hw]``.

    Returns ``target`` int64 (``nn`` where supervised, else 0) and ``weight`` bool (``mask`` with the
    self-view blocks ``i == j`` cleared), both ``[..., S, S, hw]`` torch tensors on ``nn``'s device.
    """
    nn = torch.as_tensor(nn)
    mask = torch.as_tensor(mask, device=nn.device)
    S = _pair_shape(nn)
    if mask.shape != nn.shape:
        raise SchemaError("mask", f"shape {tuple(mask.shape)} differs from nn {tuple(nn.shape)}")
    off = ~torch.eye(S, dtype=torch.bool, device=nn.device)[:, :, None]
    weight = mask.to(torch.bool) & off
    target = torch.where(weight, nn.to(torch.long), torch.zeros((), dtype=torch.long, device=nn.device))
    return target, weight


def global_targets(nn: "Tensor", dist: "Tensor", mask: "Tensor") -> tuple["Tensor", "Tensor", "Tensor"]:
    """The official code's global one-hot target per query token from cached ``nn``/``dist``/``mask``.

    For query ``(i, x)``: ``view = j* = argmin_{j != i} dist[i, j, x]`` over **all** other views, with no
    mask restriction (lowest ``j`` on ties, non-finite distances last), ``token = nn[i, j*, x]`` (the
    argmax of the official ``argmaxonehot`` over the negative 3D distances to every other view's tokens),
    and ``weight = mask[i, j*, x]`` (the target row itself is supervised). All three are ``[..., S, hw]``
    (``view``/``token`` int64 and 0 where ``weight`` is false) on ``nn``'s device.
    """
    nn = torch.as_tensor(nn)
    dist = torch.as_tensor(dist, device=nn.device)
    mask = torch.as_tensor(mask, device=nn.device)
    S = _pair_shape(nn)
    for name, t in (("dist", dist), ("mask", mask)):
        if t.shape != nn.shape:
            raise SchemaError(name, f"shape {tuple(t.shape)} differs from nn {tuple(nn.shape)}")
    off = ~torch.eye(S, dtype=torch.bool, device=nn.device)[:, :, None]
    d = dist if dist.dtype == torch.float64 else dist.to(torch.float32)
    big = torch.full((), torch.finfo(d.dtype).max, dtype=d.dtype, device=d.device)  # after every finite distance
    d = torch.where(torch.isfinite(d), d, big)
    d = torch.where(off, d, torch.full((), math.inf, dtype=d.dtype, device=d.device))  # never the query's own view
    view = d.argmin(dim=-2, keepdim=True)  # [..., i, 1, x]; first (lowest j) among ties
    weight = torch.gather(mask.to(torch.bool) & off, -2, view).squeeze(-2)
    token = torch.gather(nn.to(torch.long), -2, view).squeeze(-2)
    view = view.squeeze(-2)
    zero = torch.zeros((), dtype=torch.long, device=nn.device)
    return torch.where(weight, view, zero), torch.where(weight, token, zero), weight
