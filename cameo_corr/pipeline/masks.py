"""Supervision masks of cached correspondences, computable at load time (SPEC §3, issue "shareable caches").

Public API::

    cycle_mask(nn [S,S,hw], valid [S,h,w], tau) -> mask [S,S,hw]
    visibility_mask(points [S,h,w,3], valid [S,h,w], intrinsics [S,3,3], extrinsics [S,4,4], image_size, *, tol)
        -> mask [S,S,hw]
    recompute_mask(arrays, *, tau, policy, image_size, tol) -> mask [S,S,hw]   (one cached window)

Cycle mask. ``mask[i, j, x] = |p(x) - p(nn[j, i, nn[i, j, x]])|_2 <= tau`` in token units, false for an
invalid query token and for a key view without any valid token; the diagonal is ``valid[i]``. It is a
function of ``nn`` and ``valid`` only, so a cache written with one ``tau`` serves any other: at the
cache's own ``tau`` it is bit-identical to the stored ``mask`` (the writer calls the same function).

Visibility mask (beyond the paper). The cycle mask admits queries that are occluded in the key view, or
outside it, whose nearest 3D token is then a wrong target. ``visibility_mask`` tests each query
geometrically with the cached token points and cameras: token ``x`` of view ``i`` (its point ``X``) is
projected into view ``j``; it is *visible* when it lands in front of camera ``j`` inside its image and
view ``j``'s own token depth there agrees with the depth ``z`` of ``X`` in camera ``j``:
``|z - d| <= tol * d``. ``d`` comes from the ``h x w`` map of view ``j``'s token depths ``z_j(X_j(y))``
around the landing point in token coordinates (token centres at integers, clamped at the border), and the
query is visible when any of these estimates agrees:

* the **bilinear interpolation of inverse depth** over the four surrounding tokens, when every one with
  a non-zero weight is valid. Inverse depth is affine in the image over a plane, so a slanted surface
  gives the right depth between token centres (nearest-token sampling is off by half a token's depth
  slope, which at grazing incidence exceeds any useful tolerance);
* the depth of the token containing the landing point, when it is valid.

Depth holes (invalid tokens: a real sensor's missing depth, or low-confidence predictions) leave some of
the four tokens invalid. The query is then judged by the valid ones, and visible when any of these
agrees:

* the **plane through the three valid tokens** when one is missing: the bilinear interpolation with the
  missing inverse depth completed to the parallelogram of the other three (``a + b - opposite``), which
  is the affine inverse depth through them, exact on a planar surface;
* the bilinear weights **renormalised over the valid tokens** with a non-zero weight (linear along an
  edge when two neighbours remain);
* the depth of **one valid token** with a non-zero weight, provided that no valid token with a non-zero
  weight lies in front of ``X`` (``z - d > tol * d``: an occluder).

A landing point with no valid token with a non-zero weight is not visible (no depth to judge by). Across
a depth edge the interpolated depths lie between the two surfaces, so a query there agrees with neither
unless a single valid neighbour on its own surface has no occluder beside it: the test errs towards
rejecting. On depth without holes the hole rules never apply. Measured on the synthetic scenes with
holes punched into their depth (:func:`cameo_corr.datasets.depth_holes.punch_depth_holes`) and on real
RGB-D depth by ``benchmarks/bench_visibility_holes.py`` (README, "Supervision masks at load time").

Frames. Cached points and extrinsics are in the backend's output frame (the dataset's world frame for
``depth --frame world``, the first camera's frame for ``depth --frame first`` and ``vggt``), and the
cached extrinsics always map *that* frame to each camera, so the projection needs no frame handling;
the test is invariant to a rigid change of frame and, being relative, to the scale of the scene.

Policies (``policy=``): ``cycle`` (the paper's mask), ``visibility`` (the depth test alone) and ``both``
(their conjunction).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from cameo_corr.schemas import SchemaError

if TYPE_CHECKING:  # pragma: no cover - typing only; torch is imported where used so the CLI parser stays light
    from torch import Tensor

__all__ = [
    "MASK_POLICIES",
    "DEFAULT_VISIBILITY_TOL",
    "cycle_mask",
    "visibility_mask",
    "recompute_mask",
    "mask_inputs",
]

MASK_POLICIES = ("cycle", "visibility", "both")
"""Accepted values of ``policy=``."""

DEFAULT_VISIBILITY_TOL = 0.03
"""Relative depth tolerance of :func:`visibility_mask` (chosen on synthetic scenes, see the README)."""

Array = Any  # a numpy array or a torch tensor


def _number(value: Any, field: str, where: str | None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise SchemaError(field, f"must be a number, got {value!r}", where=where)
    return float(value)


def check_tau(tau: float, field: str = "tau", where: str | None = None) -> float:
    """``tau`` as a float; :class:`SchemaError` naming ``field`` unless finite and non-negative."""
    tau = _number(tau, field, where)
    if not (math.isfinite(tau) and tau >= 0):
        raise SchemaError(field, f"must be a finite non-negative number, got {tau}", where=where)
    return tau


def check_policy(policy: str, field: str = "mask_policy", where: str | None = None) -> str:
    """``policy`` if it is one of :data:`MASK_POLICIES`, else :class:`SchemaError` naming ``field``."""
    if policy not in MASK_POLICIES:
        raise SchemaError(field, f"expected one of {MASK_POLICIES}, got {policy!r}", where=where)
    return policy


def check_visibility_tol(tol: float, field: str = "visibility_tol", where: str | None = None) -> float:
    """``tol`` as a float; :class:`SchemaError` naming ``field`` unless finite and positive."""
    tol = _number(tol, field, where)
    if not (math.isfinite(tol) and tol > 0):
        raise SchemaError(field, f"must be a finite positive number, got {tol}", where=where)
    return tol


def _cycle_flat(nn: Array, valid: Array, w: int, tau: float) -> Array:
    """Cycle mask of ``nn [S, S, hw]`` with flattened ``valid [S, hw]`` on a grid ``w`` tokens wide
    (numpy or torch, whichever ``nn`` is; the diagonal of ``nn`` is not read)."""
    S, hw = valid.shape
    if isinstance(nn, np.ndarray):
        cycle = np.zeros_like(nn)  # cycle[i, j, x] = nn[j, i, nn[i, j, x]]; the diagonal is set below
        for i in range(S):
            for j in range(S):
                if i != j:
                    cycle[i, j] = nn[j, i].take(nn[i, j])  # one 1-D take per pair: 1.7x less than take_along_axis
        tokens = np.arange(hw, dtype=np.int32)
    else:
        import torch

        cycle = torch.gather(nn.transpose(0, 1), 2, nn.long()).long()  # torch.take indexes with int64 only
        tokens = torch.arange(hw, dtype=torch.int32, device=nn.device)
    col, row = tokens % w, tokens // w
    d2 = col.take(cycle)  # in place from here: |dx|^2 + |dy|^2 in int32, compared once (5x less CPU time)
    d2 -= col
    d2 *= d2
    dy = row.take(cycle)
    dy -= row
    dy *= dy
    d2 += dy
    mask = d2 <= tau * tau
    mask &= valid[:, None, :]
    mask &= valid.any(1)[None, :, None]
    for i in range(S):
        mask[i, i] = valid[i]
    return mask


def _grid_of(valid: Array, name: str = "valid") -> tuple[int, int, int]:
    if valid.ndim != 3:
        raise SchemaError(name, f"expected [S, h, w], got {tuple(valid.shape)}")
    S, h, w = (int(v) for v in valid.shape)
    return S, h, w


def cycle_mask(nn: Array, valid: Array, tau: float) -> Array:
    """The cycle-consistency mask ``[S, S, h*w]`` bool of one window (module docstring).

    ``nn`` ``[S, S, h*w]`` integer token indices (any integer dtype, e.g. the cache's int16) and
    ``valid`` ``[S, h, w]``, both numpy arrays or both torch tensors; the result is of the same kind
    (on ``nn``'s device). Monotone in ``tau``; raises :class:`SchemaError` on bad shapes or ``tau``.
    """
    tau = check_tau(tau)
    S, h, w = _grid_of(valid)
    if tuple(nn.shape) != (S, S, h * w):
        raise SchemaError("nn", f"expected {(S, S, h * w)} for valid {(S, h, w)}, got {tuple(nn.shape)}")
    if isinstance(nn, np.ndarray):
        return _cycle_flat(nn, np.asarray(valid, dtype=bool).reshape(S, h * w), w, tau)
    import torch

    return _cycle_flat(nn, torch.as_tensor(valid, device=nn.device).to(torch.bool).reshape(S, h * w), w, tau)


def _key_agreement(own: "Tensor", ok: "Tensor", tx: "Tensor", ty: "Tensor", z: "Tensor", tol: float) -> "Tensor":
    """Whether key view ``j``'s token depths agree with depth ``z [S_i, S_j, n]`` at token coordinates
    ``tx, ty`` (centres at integers) of its token depth map ``own [S, h, w]`` (usable where ``ok``):
    the bilinear, nearest-token and depth-hole estimates of the module docstring."""
    import torch

    S, h, w = own.shape
    base = torch.arange(S, device=own.device)[None, :, None] * (h * w)  # flat offset of key view j
    cx, cy = tx.clamp(0.0, w - 1.0), ty.clamp(0.0, h - 1.0)
    x0 = cx.floor().long().clamp(max=w - 1)
    y0 = cy.floor().long().clamp(max=h - 1)
    fx, fy = cx - x0, cy - y0
    x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
    # The four tokens around the landing point, last axis in the order 00, 10, 01, 11 (x then y offset).
    flat = torch.stack([base + yy * w + xx for yy, xx in ((y0, x0), (y0, x1), (y1, x0), (y1, x1))], -1)
    weight = torch.stack(((1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy), -1)
    good, depth = ok.reshape(-1)[flat], own.reshape(-1)[flat]
    inv = torch.where(good, 1.0 / torch.where(good, depth, torch.ones_like(depth)), torch.zeros_like(depth))
    used = weight > 0

    def agrees_inv(z: "Tensor", inv_d: "Tensor", defined: "Tensor") -> "Tensor":
        defined = defined & (inv_d > 0)
        d = 1.0 / torch.where(defined, inv_d, torch.ones_like(inv_d))
        return defined & ((z - d).abs() <= tol * d)

    complete = (good | ~used).all(-1)
    agrees = agrees_inv(z, (weight * inv).sum(-1), complete)
    near = base + (ty + 0.5).floor().long().clamp(0, h - 1) * w + (tx + 0.5).floor().long().clamp(0, w - 1)
    near_d = own.reshape(-1)[near]
    agrees |= ok.reshape(-1)[near] & ((z - near_d).abs() <= tol * near_d)

    # Depth holes, only where a hole has a non-zero weight and nothing agreed yet.
    todo = ~complete & ~agrees
    z, weight, good, depth, inv, used = z[todo], weight[todo], good[todo], depth[todo], inv[todo], used[todo]
    # Plane through three valid corners: the missing one completed to the parallelogram a + b - opposite.
    completed = inv[:, [1, 0, 0, 1]] + inv[:, [2, 3, 3, 2]] - inv[:, [3, 2, 1, 0]]
    hole = agrees_inv(z, (weight * torch.where(good, inv, completed)).sum(-1), good.sum(-1) == 3)
    # Bilinear weights renormalised over the valid corners with a non-zero weight.
    tap = used & good
    kept = torch.where(tap, weight, torch.zeros_like(weight))
    total = kept.sum(-1)
    hole |= agrees_inv(z, (kept * inv).sum(-1) / torch.where(total > 0, total, torch.ones_like(total)), total > 0)
    # One valid corner agreeing, with no valid corner in front of the point.
    one = (tap & ((z[:, None] - depth).abs() <= tol * depth)).any(-1)
    occluder = (tap & (z[:, None] - depth > tol * depth)).any(-1)
    agrees[todo] = hole | (one & ~occluder)
    return agrees


def visibility_mask(
    points: Array,
    valid: Array,
    intrinsics: Array,
    extrinsics: Array,
    image_size: tuple[int, int],
    *,
    tol: float = DEFAULT_VISIBILITY_TOL,
) -> Array:
    """Depth-consistency visibility ``[S, S, h*w]`` bool of one window (module docstring).

    ``points [S, h, w, 3]`` token points and ``valid [S, h, w]`` (any float dtype, e.g. the cache's
    float16), ``intrinsics [S, 3, 3]`` in pixels of the ``image_size = (H, W)`` canonical view and
    ``extrinsics [S, 4, 4]`` mapping the frame of ``points`` to each camera. ``mask[i, j, x]``: valid
    token ``x`` of view ``i`` is seen by view ``j`` within relative depth tolerance ``tol``; the diagonal
    is ``valid[i]``. Computed in float64; numpy in -> numpy out, torch in -> torch out (same device).
    """
    import torch

    tol = check_visibility_tol(tol)
    as_numpy = isinstance(points, np.ndarray)
    pts = torch.as_tensor(points)
    dev = pts.device
    S, h, w = _grid_of(valid)
    if tuple(pts.shape) != (S, h, w, 3):
        raise SchemaError("points", f"expected {(S, h, w, 3)} to match valid, got {tuple(pts.shape)}")
    K = torch.as_tensor(intrinsics, device=dev).to(torch.float64)
    E = torch.as_tensor(extrinsics, device=dev).to(torch.float64)
    if tuple(K.shape) != (S, 3, 3):
        raise SchemaError("intrinsics", f"expected {(S, 3, 3)}, got {tuple(K.shape)}")
    if tuple(E.shape) != (S, 4, 4):
        raise SchemaError("extrinsics", f"expected {(S, 4, 4)}, got {tuple(E.shape)}")
    H, W = (int(v) for v in image_size)
    if H <= 0 or W <= 0:
        raise SchemaError("image_size", f"expected positive (H, W), got {tuple(image_size)}")
    hw = h * w
    V = torch.as_tensor(valid, device=dev).to(torch.bool).reshape(S, hw)
    X = torch.where(V[..., None], pts.reshape(S, hw, 3).to(torch.float64), torch.zeros((), dtype=torch.float64, device=dev))
    cam = torch.einsum("jab,ixb->ijxa", E[:, :3, :3], X) + E[None, :, None, :3, 3]  # [S_i, S_j, hw, 3]
    z = cam[..., 2]
    uvw = torch.einsum("jab,ijxb->ijxa", K, cam)
    front = z > 0
    safe = torch.where(front, uvw[..., 2], torch.ones_like(z))
    u, v = uvw[..., 0] / safe, uvw[..., 1] / safe
    inside = front & (u >= 0) & (u < W) & (v >= 0) & (v < H)
    own = torch.diagonal(z, dim1=0, dim2=1).T.reshape(S, h, w)  # own[j] = depth of view j's tokens in camera j
    ok = V.reshape(S, h, w) & (own > 0)
    agrees = _key_agreement(own, ok, u * (w / W) - 0.5, v * (h / H) - 0.5, z, tol)
    mask = V[:, None, :] & inside & agrees
    for i in range(S):
        mask[i, i] = V[i]
    return mask.cpu().numpy() if as_numpy else mask


def mask_inputs(policy: str) -> tuple[str, ...]:
    """Names of the cached arrays :func:`recompute_mask` reads for ``policy``."""
    check_policy(policy)
    return {"cycle": ("nn", "valid"), "visibility": ("points", "valid", "intrinsics", "extrinsics")}.get(
        policy, ("nn", "points", "valid", "intrinsics", "extrinsics")
    )


def recompute_mask(
    arrays: Mapping[str, Array],
    *,
    tau: float,
    policy: str = "cycle",
    image_size: tuple[int, int] | None = None,
    tol: float = DEFAULT_VISIBILITY_TOL,
) -> Array:
    """One cached window's supervision mask ``[S, S, h*w]`` bool under ``policy`` (:data:`MASK_POLICIES`).

    ``arrays`` maps cache array names (:func:`mask_inputs` lists those needed: ``nn``, ``valid`` for
    ``cycle``; ``points``, ``valid``, ``intrinsics``, ``extrinsics`` for ``visibility``; all of them for
    ``both``) to one window's arrays (no ``W`` axis), numpy or torch. ``tau`` is the cycle threshold
    (the cache's own ``tau`` reproduces the stored ``mask`` bit for bit), ``image_size`` the canonical
    view ``(H, W)`` the intrinsics refer to (needed by the visibility test) and ``tol`` its relative
    depth tolerance.
    """
    missing = [k for k in mask_inputs(policy) if k not in arrays]
    if missing:
        raise SchemaError(missing[0], f"mask policy {policy!r} needs the cached arrays {list(mask_inputs(policy))}")
    mask = None
    if policy in ("cycle", "both"):
        mask = cycle_mask(arrays["nn"], arrays["valid"], tau)
    if policy in ("visibility", "both"):
        if image_size is None:
            raise SchemaError("image_size", f"mask policy {policy!r} needs the canonical view size (H, W)")
        vis = visibility_mask(arrays["points"], arrays["valid"], arrays["intrinsics"], arrays["extrinsics"], image_size, tol=tol)
        mask = vis if mask is None else mask & vis
    return mask
