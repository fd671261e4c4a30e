"""CAMEO attention loss and the attention correspondence precision metric.

Public API (signatures are part of the trainer contract)::

    DEFAULT_CAMEO_WEIGHT = 0.02
    LOSS_MODES = ("official", "paper")
    class HeadMLP(nn.Module): __init__(heads, ratio=4); forward([..., heads]) -> [...]   # in the input's dtype
    class QueryKey(NamedTuple): query [B, heads, Q, d], key [B, heads, K, d], scale, logit_dtype=None;
        logits() -> [B, heads, Q, K]
    cameo_loss(attn: logits [B, heads, F*hw, F*hw] | QueryKey, corr_nn [B, F, F, hw], corr_mask [B, F, F, hw],
               corr_dist [B, F, F, hw] | None, head_mlp, *, mode="official",
               ref_views [B, F] bool | None = None, query_chunk: int | None = None,
               when_skipped="zero") -> Tensor (scalar) | None
    attention_precision(attn: [B, heads, Q, K] | [B, Q, K] | QueryKey, corr_nn, corr_mask,
                        grid: int | (h, w), *, logits=True, query_views [B, F] bool | None = None,
                        query_chunk: int | None = None) -> Tensor

Token ``x`` of view ``i`` is query ``i*hw + x``; token ``y`` of view ``j`` is key ``j*hw + y`` (the layout
of :class:`cameo_corr.train.model.MultiViewUNet`'s supervised layer, views in batch order, references
first). ``corr_nn[b, i, j, x]`` is the token of view ``j`` matched to token ``x`` of view ``i``;
``corr_mask`` marks the cycle-consistent matches (``M_ij(x)``); self-view blocks (``i == j``) are never
supervised.

Scores. The pre-softmax logits ``q k^T * scale`` of the supervised layer go through :class:`HeadMLP`
over the head axis (``H -> 4H -> 1``, GELU), giving one score map ``s[b, i, x, j, y]``, and a softmax
over each key view's tokens at temperature 1: ``p[b, i, x, j, :] = softmax_y s[b, i, x, j, :]`` (the
official ``HeadMlp_Softmax`` with ``per_view: true``, ``softmax_temp: 1.0``, ``mlp_ratio: 4``).

Mode ``"official"`` (CAMEO's released ``train.py`` with its ``configs/config.yaml``):

1. target: the global one-hot. ``j* = argmin_{j != i} dist[b, i, j, x]`` over **all** other views with
   no mask restriction (:func:`cameo_corr.pipeline.match.global_targets`); a row ``(b, i, x, j)`` enters
   when ``M_ij(x)``, and only the ``j*`` row carries a non-zero target (``nn[b, i, j*, x]``), the other
   entering rows add 0 to the sum and 1 to the count;
2. per entering row ``-(gt * log(p + 1e-8)).sum(-1)``, i.e. ``-log(p[b, i, x, j*, nn] + 1e-8)`` or 0;
3. normalisation: the mean over the rows whose query view is a reference plus the mean over the rows
   whose query view is a target (``ref_views``), keys from both references and targets, pooled over
   the batch;
4. when either selection is empty (no entering row among the reference queries, or none among the
   target queries), the layer's loss is skipped for the step: the result is 0.

Mode ``"paper"`` (eq. 1 of the paper): for every ``(b, i, x, j != i)`` with ``M_ij(x)``, the
cross-entropy ``-log p[b, i, x, j, nn[b, i, j, x]]`` (exact ``log_softmax``); the mean over those
entries; 0 when there is none.

The loss is computed in at least fp32 with autocast disabled and is unweighted: the caller multiplies
it by lambda (:data:`DEFAULT_CAMEO_WEIGHT`). The head MLP computes in its input's dtype whatever its
weights' dtype (bf16 weights are upcast, as the official run's fp32 autocast does). A skipped or empty
loss is a 0 still connected to the inputs and the head MLP, so every parameter receives a (zero)
gradient, or, with ``when_skipped="none"``, ``None``: the caller then adds no term at all (the
official code's skip, which gives the head MLP no gradient).

The logits are ``q k^T * scale`` in at least fp32; a :class:`QueryKey` with ``logit_dtype`` (bf16 in
the official run, whose supervised layer computes them under bf16 autocast) computes the product and the
scaling in that dtype and upcasts the result.

Memory. Given dense ``logits`` the head MLP runs on the full ``[B, Q, K, 4H]`` tensor unless
``query_chunk`` is set. Given a :class:`QueryKey` (what the model's supervised layer hands out: it runs
``scaled_dot_product_attention`` and never forms the logit matrix) with ``query_chunk``, each chunk of
that many query tokens recomputes its logits ``q_c k^T * scale``, scores and loss terms under activation
checkpointing (``torch.utils.checkpoint``), so neither the ``[B, heads, Q, K]`` logits nor the
``[B, Q, K, 4H]`` MLP activations are ever alive at once; value and gradients equal the dense path's.
Only the supervised (query token, key view) entries are scored: one key view per query row in the
official mode. :func:`measure_supervised_layer` times and measures a whole supervised layer both ways
(``benchmarks/bench_cameo_memory.py``; the GPU self-check calls it on CUDA).

Precision. "Within 1 token" means Chebyshev distance <= 1 on the token grid (the 3x3 neighbourhood of
the target token).
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cameo_corr.schemas import SchemaError, as_grid

__all__ = [
    "DEFAULT_CAMEO_WEIGHT",
    "LOSS_MODES",
    "OFFICIAL_EPS",
    "HeadMLP",
    "QueryKey",
    "cameo_loss",
    "attention_precision",
    "measure_supervised_layer",
]

DEFAULT_CAMEO_WEIGHT = 0.02
"""lambda of the paper: total loss = diffusion loss + lambda * CAMEO loss."""

LOSS_MODES = ("official", "paper")
"""``official``: CAMEO's released training code; ``paper``: eq. 1 of the paper (see the module docstring)."""

OFFICIAL_EPS = 1e-8
"""The official cross-entropy's ``log(p + eps)``."""


class HeadMLP(nn.Module):
    """Per-entry MLP over attention heads: ``[..., heads] -> [...]`` (``H -> ratio*H -> 1``, GELU)."""

    def __init__(self, heads: int, ratio: int = 4) -> None:
        super().__init__()
        if heads < 1 or ratio < 1:
            raise SchemaError("heads", f"heads and ratio must be >= 1, got heads={heads}, ratio={ratio}")
        self.heads = int(heads)
        self.net = nn.Sequential(nn.Linear(heads, ratio * heads), nn.GELU(), nn.Linear(ratio * heads, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Fused score of the per-head values in the last axis, computed in ``x``'s dtype (the weights are
        cast to it, as autocast casts them: bf16 weights on fp32 input compute in fp32)."""
        first, act, last = self.net
        h = act(F.linear(x, first.weight.to(x.dtype), first.bias.to(x.dtype)))
        return F.linear(h, last.weight.to(x.dtype), last.bias.to(x.dtype)).squeeze(-1)


class QueryKey(NamedTuple):
    """Queries and keys of the supervised layer (after ``norm_q``/``norm_k``) and its attention scale.

    Their logits ``query @ key^T * scale`` are the layer's pre-softmax attention logits; the loss and the
    precision metric recompute them chunk by chunk instead of keeping the full matrix.
    """

    query: Tensor
    """``[B, heads, Q, d]``"""
    key: Tensor
    """``[B, heads, K, d]``"""
    scale: float
    logit_dtype: torch.dtype | None = None
    """Compute ``query @ key^T * scale`` in this dtype and upcast the result (``None``: in at least fp32)."""

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Shape ``[B, heads, Q, K]`` of the logits."""
        B, H, Q, _ = self.query.shape
        return (B, H, Q, int(self.key.shape[2]))

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the product and the scaling: ``logit_dtype``, or the queries' dtype promoted to fp32."""
        return self.logit_dtype if self.logit_dtype is not None else torch.promote_types(self.query.dtype, torch.float32)

    def logits(self, rows: slice = slice(None)) -> Tensor:
        """The logits of query rows ``rows`` ``[B, heads, rows, K]`` in at least fp32 (computed in
        :attr:`compute_dtype`)."""
        ct = self.compute_dtype
        with torch.autocast(device_type=self.query.device.type, enabled=False):
            out = torch.matmul(self.query[:, :, rows].to(ct), self.key.to(ct).transpose(-1, -2)) * self.scale
        return out.to(torch.promote_types(ct, torch.float32))

    def detach(self) -> "QueryKey":
        """The same queries and keys without their graph."""
        return QueryKey(self.query.detach(), self.key.detach(), self.scale, self.logit_dtype)


Attn = Tensor | QueryKey


def _compute_dtype(attn: Attn) -> torch.dtype:
    src = attn.query if isinstance(attn, QueryKey) else attn
    return torch.promote_types(src.dtype, torch.float32)


def _rows(attn: Attn, rows: slice, dtype: torch.dtype) -> Tensor:
    """Logits ``[B, heads, rows, K]`` of some query rows."""
    return attn.logits(rows) if isinstance(attn, QueryKey) else attn[:, :, rows].to(dtype)


def _check_inputs(attn: Attn, corr_nn: Tensor, corr_mask: Tensor, heads: int) -> tuple[int, int, int]:
    """Validate shapes; return ``(B, F, hw)``."""
    shape = tuple(attn.shape)
    if isinstance(attn, QueryKey):
        q, k = attn.query, attn.key
        if q.ndim != 4 or k.ndim != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
            raise SchemaError("attn", f"expected query [B, heads, Q, d] and key [B, heads, K, d], got {tuple(q.shape)} and {tuple(k.shape)}")
    elif attn.ndim != 4:
        raise SchemaError("logits", f"expected [B, heads, F*hw, F*hw], got shape {shape}")
    if corr_nn.ndim != 4 or corr_nn.shape[1] != corr_nn.shape[2]:
        raise SchemaError("corr_nn", f"expected [B, F, F, hw], got shape {tuple(corr_nn.shape)}")
    if tuple(corr_mask.shape) != tuple(corr_nn.shape):
        raise SchemaError("corr_mask", f"shape {tuple(corr_mask.shape)} differs from corr_nn {tuple(corr_nn.shape)}")
    if corr_nn.dtype.is_floating_point or corr_nn.dtype == torch.bool:
        raise SchemaError("corr_nn", f"expected integer token indices, got {corr_nn.dtype}")
    B, Fv, _, hw = corr_nn.shape
    if Fv < 2:
        raise SchemaError("corr_nn", f"needs at least 2 views, got {Fv}")
    if shape[0] != B:
        raise SchemaError("logits", f"batch {shape[0]} differs from the correspondences' batch {B}")
    if shape[2] != Fv * hw or shape[3] != Fv * hw:
        raise SchemaError(
            "logits",
            f"{shape[2]}x{shape[3]} query/key tokens but the correspondences imply {Fv} views x {hw}"
            " tokens; the supervised layer's token grid must equal the cache grid",
        )
    if shape[1] != heads:
        raise SchemaError("logits", f"{shape[1]} heads but the head MLP takes {heads}")
    return B, Fv, hw


def _check_targets(target: Tensor, weight: Tensor, limit: int, field: str) -> None:
    """Every supervised target index must lie in ``[0, limit)``."""
    t = torch.where(weight, target, torch.zeros_like(target))
    if bool(((t < 0) | (t >= limit)).any()):
        raise SchemaError(field, f"supervised token index outside [0, {limit})")


def _row_weights(
    corr_nn: Tensor, corr_mask: Tensor, corr_dist: Tensor | None, mode: str, ref_views: Tensor | None, dtype: torch.dtype
) -> tuple[Tensor, Tensor] | None:
    """Targets (long) and weights ``[B, F*hw, F]`` per (query token, key view), or ``None`` to skip.

    The loss is ``sum(weight * term)`` with ``term`` the cross-entropy of the key view's softmax at the
    target token (see the module docstring for the two modes).
    """
    B, Fv, _, hw = corr_nn.shape
    device = corr_nn.device
    off = ~torch.eye(Fv, dtype=torch.bool, device=device)[None, :, :, None]
    mask = corr_mask.to(torch.bool) & off  # [B, i, j, x]
    nn_idx = corr_nn.to(torch.long)
    if mode == "paper":
        _check_targets(nn_idx, mask, hw, "corr_nn")
        count = int(mask.sum())
        if count == 0:
            return None
        weight = mask.to(dtype) / count
        target = torch.where(mask, nn_idx, torch.zeros_like(nn_idx))
    else:
        if corr_dist is None:
            raise SchemaError("corr_dist", "mode='official' needs corr_dist (its target is the global nearest view)")
        if tuple(corr_dist.shape) != tuple(corr_nn.shape):
            raise SchemaError("corr_dist", f"shape {tuple(corr_dist.shape)} differs from corr_nn {tuple(corr_nn.shape)}")
        if ref_views is None:
            raise SchemaError("ref_views", "mode='official' needs the reference views [B, F] (its two means)")
        if tuple(ref_views.shape) != (B, Fv):
            raise SchemaError("ref_views", f"expected [B, F] = {(B, Fv)}, got {tuple(ref_views.shape)}")
        from cameo_corr.pipeline.match import global_targets

        view, token, hit = global_targets(nn_idx, corr_dist.to(device), mask)  # [B, i, x]
        _check_targets(token, hit, hw, "corr_nn")
        ref = ref_views.to(device=device, dtype=torch.bool)
        rows = mask.sum(dim=(2, 3))  # [B, i]: entering rows (x, j) of each query view
        n_ref, n_tgt = int(rows[ref].sum()), int(rows[~ref].sum())
        if n_ref == 0 or n_tgt == 0:
            return None
        inv = torch.tensor([1.0 / n_tgt, 1.0 / n_ref], dtype=dtype, device=device)
        per_view = inv[ref.long()]  # [B, i]: 1 / n of the query view's group
        onehot = torch.nn.functional.one_hot(view, Fv).to(torch.bool) & hit[..., None]  # [B, i, x, j]
        weight = (onehot.to(dtype) * per_view[:, :, None, None]).permute(0, 1, 3, 2)  # [B, i, j, x]
        target = torch.where(onehot.permute(0, 1, 3, 2), token[:, :, None, :], torch.zeros_like(nn_idx))
    # [B, i, j, x] -> [B, i*hw + x, j]
    return target.permute(0, 1, 3, 2).reshape(B, Fv * hw, Fv), weight.permute(0, 1, 3, 2).reshape(B, Fv * hw, Fv)


def _terms_sum(logits: Tensor, head_mlp: nn.Module, target: Tensor, weight: Tensor, eps: float, Fv: int, hw: int) -> Tensor:
    """``sum(weight * term)`` over query rows: ``logits`` ``[B, heads, c, F*hw]``, ``target``/``weight`` ``[B, c, F]``."""
    B, _, c, _ = logits.shape
    s = head_mlp(logits.permute(0, 2, 3, 1)).reshape(B, c, Fv, hw)
    logp = s.gather(-1, target.unsqueeze(-1)).squeeze(-1) - s.logsumexp(dim=-1)  # [B, c, F]
    term = -logp if eps == 0.0 else -torch.log(logp.exp() + eps)
    return (weight * term).sum()


def _group_sum(
    a: Tensor, key: Tensor | None, idx: Tensor, j: int, hw: int, scale: float, head_mlp: nn.Module, target: Tensor,
    weight: Tensor, eps: float, dtype: torch.dtype,
) -> Tensor:
    """``sum(weight * term)`` of query rows ``idx`` of one sample against the tokens of key view ``j``.

    ``a`` is that sample's queries ``[heads, Q, d]`` with ``key`` ``[heads, K, d]`` (the logits are
    recomputed in their dtype, times ``scale``, then cast to ``dtype``) or its logits ``[heads, Q, K]``
    with ``key=None``; ``target``/``weight`` ``[n]`` per row.
    """
    if key is not None:  # a and key are in the logits' compute dtype
        logits = (torch.matmul(a.index_select(1, idx), key[:, j * hw : (j + 1) * hw].transpose(-1, -2)) * scale).to(dtype)
    else:
        logits = a.index_select(1, idx)[:, :, j * hw : (j + 1) * hw].to(dtype)
    s = head_mlp(logits.permute(1, 2, 0))  # [n, hw]
    logp = s.gather(-1, target.unsqueeze(-1)).squeeze(-1) - s.logsumexp(dim=-1)
    term = -logp if eps == 0.0 else -torch.log(logp.exp() + eps)
    return (weight * term).sum()


def _connected_zero(attn: Attn, head_mlp: nn.Module) -> Tensor:
    """A 0 that depends on the inputs and every MLP parameter (zero gradients instead of none)."""
    src = (attn.query.sum() + attn.key.sum()) if isinstance(attn, QueryKey) else attn.sum()
    z = src.to(_compute_dtype(attn)) * 0.0
    for p in head_mlp.parameters():
        z = z + p.sum().to(z.dtype) * 0.0
    return z


def cameo_loss(
    attn: Attn,
    corr_nn: Tensor,
    corr_mask: Tensor,
    corr_dist: Tensor | None,
    head_mlp: nn.Module,
    *,
    mode: str = "official",
    ref_views: Tensor | None = None,
    query_chunk: int | None = None,
    when_skipped: str = "zero",
) -> Tensor | None:
    """CAMEO attention loss (scalar in at least fp32, unweighted; see the module docstring).

    ``attn``: the supervised layer's pre-softmax logits ``[B, heads, F*hw, F*hw]`` or its
    :class:`QueryKey`; ``corr_nn``/``corr_mask``/``corr_dist`` ``[B, F, F, hw]`` cached correspondences
    in the same view order (``corr_dist`` is needed for ``mode="official"`` only); ``head_mlp`` a
    :class:`HeadMLP`. ``ref_views`` ``[B, F]`` bool marks the reference views (needed for
    ``mode="official"``). ``query_chunk`` scores that many query tokens at a time under activation
    checkpointing (with a :class:`QueryKey`, their logits are recomputed per chunk as well).
    ``when_skipped``: what a skipped loss (no supervised row, or an empty official selection) returns,
    ``"zero"`` (a 0 connected to the inputs and the head MLP) or ``"none"`` (``None``).
    """
    if mode not in LOSS_MODES:
        raise SchemaError("mode", f"expected one of {LOSS_MODES}, got {mode!r}")
    if when_skipped not in ("zero", "none"):
        raise SchemaError("when_skipped", f"expected 'zero' or 'none', got {when_skipped!r}")
    heads = getattr(head_mlp, "heads", attn.shape[1] if len(attn.shape) == 4 else -1)
    B, Fv, hw = _check_inputs(attn, corr_nn, corr_mask, heads)
    if query_chunk is not None and query_chunk < 1:
        raise SchemaError("query_chunk", f"must be >= 1, got {query_chunk}")
    device = attn.query.device if isinstance(attn, QueryKey) else attn.device
    dtype = _compute_dtype(attn)
    with torch.autocast(device_type=device.type, enabled=False):
        dist = None if corr_dist is None else corr_dist.to(device)
        rw = _row_weights(corr_nn.to(device), corr_mask.to(device), dist, mode, ref_views, dtype)
        if rw is None:
            return _connected_zero(attn, head_mlp) if when_skipped == "zero" else None
        target, weight = rw
        eps = OFFICIAL_EPS if mode == "official" else 0.0
        Q = Fv * hw
        if query_chunk is None or query_chunk >= Q:
            return _terms_sum(_rows(attn, slice(None), dtype), head_mlp, target, weight, eps, Fv, hw)
        total = torch.zeros((), dtype=dtype, device=device)
        # Only the supervised (query token, key view) entries are scored, grouped by sample and key view:
        # the official target has one key view per query row, so this is about 1/F of the dense work.
        for b in range(B):
            if isinstance(attn, QueryKey):
                ct = attn.compute_dtype
                src = (attn.query[b].to(ct), attn.key[b].to(ct), attn.scale)
            else:
                src = (attn[b], None, 1.0)
            for j in range(Fv):
                rows = torch.nonzero(weight[b, :, j]).flatten()
                for r0 in range(0, rows.numel(), query_chunk):
                    idx = rows[r0 : r0 + query_chunk]
                    args = (src[0], src[1], idx, j, hw, src[2], head_mlp, target[b, idx, j], weight[b, idx, j], eps, dtype)
                    part = checkpoint(_group_sum, *args, use_reentrant=False) if torch.is_grad_enabled() else _group_sum(*args)
                    total = total + part
        return total + _connected_zero(attn, head_mlp)


@torch.no_grad()
def attention_precision(
    attn: Attn,
    corr_nn: Tensor,
    corr_mask: Tensor,
    grid: int | tuple[int, int],
    *,
    logits: bool = True,
    query_views: Tensor | None = None,
    query_chunk: int | None = None,
) -> Tensor:
    """Fraction of supervised entries ``(b, i, j != i, x)`` whose attention argmax over view ``j``'s tokens
    lies within Chebyshev distance 1 of ``corr_nn[b, i, j, x]`` on the ``grid``.

    ``attn``: ``[B, heads, Q, K]`` per-head logits (``logits=True``: the attention is their softmax over
    all keys, as in the model) or probabilities (``logits=False``), averaged over heads; a
    :class:`QueryKey` (its logits); or an already head-fused ``[B, Q, K]`` map (its argmax is used as
    is). ``query_views`` ``[B, F]`` bool counts only the queries of those views (e.g. targets).
    ``query_chunk`` processes that many query rows at a time. Returns a 0-d fp32 tensor, NaN when no
    entry is masked.
    """
    h, w = as_grid(grid)
    hw = h * w
    if corr_nn.ndim != 4 or corr_nn.shape[-1] != hw:
        raise SchemaError("corr_nn", f"expected [B, F, F, {hw}] for a {h}x{w} grid, got {tuple(corr_nn.shape)}")
    B, Fv = corr_nn.shape[:2]
    shape = tuple(attn.shape)
    if len(shape) not in (3, 4):
        raise SchemaError("attn_or_logits", f"expected [B, heads, Q, K] or [B, Q, K], got {shape}")
    if (shape[0], shape[-2], shape[-1]) != (B, Fv * hw, Fv * hw):
        raise SchemaError(
            "attn_or_logits",
            f"{shape[-2:]} query/key tokens do not match {Fv} views x {hw} tokens of the {h}x{w} grid",
        )
    device = attn.query.device if isinstance(attn, QueryKey) else attn.device
    Q = Fv * hw
    step = Q if query_chunk is None else max(1, int(query_chunk))
    parts = []
    for q0 in range(0, Q, step):
        rows = slice(q0, min(q0 + step, Q))
        if isinstance(attn, QueryKey) or (len(shape) == 4 and logits):
            x = _rows(attn, rows, torch.float32)
            probs = torch.zeros(B, x.shape[2], Q, dtype=torch.float32, device=device)
            for k in range(x.shape[1]):
                probs += x[:, k].softmax(dim=-1)
        elif len(shape) == 4:
            probs = attn[:, :, rows].float().sum(dim=1)
        else:
            probs = attn[:, rows].float()
        parts.append(probs.view(B, -1, Fv, hw).argmax(dim=-1))  # [B, rows, j]
    arg = torch.cat(parts, dim=1).view(B, Fv, hw, Fv)  # [B, i, x, j]
    target = corr_nn.to(device=device, dtype=torch.long).permute(0, 1, 3, 2)
    off_diag = ~torch.eye(Fv, dtype=torch.bool, device=device)
    mask = corr_mask.to(device=device, dtype=torch.bool) & off_diag[None, :, :, None]
    if query_views is not None:
        if tuple(query_views.shape) != (B, Fv):
            raise SchemaError("query_views", f"expected [B, F] = {(B, Fv)}, got {tuple(query_views.shape)}")
        mask = mask & query_views.to(device=device, dtype=torch.bool)[:, :, None, None]
    mask = mask.permute(0, 1, 3, 2)
    cheb = torch.maximum((arg // w - target // w).abs(), (arg % w - target % w).abs())
    hits = ((cheb <= 1) & mask).sum()
    return hits.float() / mask.sum().float()


# ------------------------------------------------------------------------------- measurement
def _layer_case(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Random inputs of one supervised layer at ``spec``'s sizes: an attention module, hidden states,
    a head MLP and a correspondence block whose masks keep ``mask_frac`` of the pairs."""
    from diffusers.models.attention_processor import Attention

    g = torch.Generator().manual_seed(int(spec["seed"]))
    torch.manual_seed(int(spec["seed"]))
    B, Fv, H, d = spec["batch"], spec["views"], spec["heads"], spec["head_dim"]
    hw = spec["grid"][0] * spec["grid"][1]
    attn = Attention(query_dim=H * d, heads=H, dim_head=d).to(device)
    x = torch.randn(B * Fv, hw, H * d, generator=g).to(device)
    nn_idx = torch.randint(0, hw, (B, Fv, Fv, hw), generator=g)
    mask = torch.rand(B, Fv, Fv, hw, generator=g) < spec["mask_frac"]
    dist = torch.rand(B, Fv, Fv, hw, generator=g)
    num_ref = torch.randint(1, Fv, (B,), generator=g)
    return {
        "attn": attn, "x": x, "mlp": HeadMLP(H).to(device),
        "corr": (nn_idx.to(device), mask.to(device), dist.to(device)),
        "ref_views": (torch.arange(Fv)[None, :] < num_ref[:, None]).to(device),
    }


def _layer_step(case: dict[str, Any], spec: dict[str, Any], path: str) -> tuple[Tensor, Tensor]:
    """Forward and backward of the supervised layer plus the CAMEO loss; returns the loss and dL/dx.

    ``dense`` is the previous implementation: explicit fp32 logits, softmax and ``probs @ v`` in the
    layer, the logits handed to the loss, whose head MLP runs over every key of ``query_chunk`` query
    rows at a time under checkpointing. ``chunked``: ``scaled_dot_product_attention`` in the layer,
    queries and keys handed to :func:`cameo_loss`, which recomputes the logits of the supervised entries
    chunk by chunk under checkpointing.
    """
    attn, mlp = case["attn"], case["mlp"]
    nn_idx, mask, dist = case["corr"]
    B, Fv, H, d = spec["batch"], spec["views"], spec["heads"], spec["head_dim"]
    hw = spec["grid"][0] * spec["grid"][1]
    x = case["x"].detach().requires_grad_(True)
    dtype = spec["dtype"]
    device = x.device
    with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32):
        def heads(t: Tensor) -> Tensor:
            return t.reshape(B, Fv * hw, H, d).transpose(1, 2)

        q, k, v = heads(attn.to_q(x)), heads(attn.to_k(x)), heads(attn.to_v(x))
        if path == "dense":
            with torch.autocast(device_type=device.type, enabled=False):
                logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scale
            out = torch.matmul(logits.softmax(dim=-1).to(v.dtype), v)
        else:
            out = _sdpa(q, k, v, scale=attn.scale)
        y = attn.to_out[0](out.transpose(1, 2).reshape(B * Fv, hw, H * d))
    kwargs = dict(mode=spec["mode"], ref_views=case["ref_views"])
    if path == "dense":
        with torch.autocast(device_type=device.type, enabled=False):
            rw = _row_weights(nn_idx, mask, dist, spec["mode"], case["ref_views"], torch.float32)
            assert rw is not None
            target, weight = rw
            eps = OFFICIAL_EPS if spec["mode"] == "official" else 0.0
            loss = logits.new_zeros(())
            for q0 in range(0, Fv * hw, spec["query_chunk"]):
                rows = slice(q0, q0 + spec["query_chunk"])
                loss = loss + checkpoint(_terms_sum, logits[:, :, rows], mlp, target[:, rows], weight[:, rows], eps, Fv, hw,
                                         use_reentrant=False)
    else:
        loss = cameo_loss(QueryKey(q, k, float(attn.scale)), nn_idx, mask, dist, mlp, query_chunk=spec["query_chunk"], **kwargs)
    total = y.float().square().mean() + DEFAULT_CAMEO_WEIGHT * loss
    total.backward()
    return loss.detach(), x.grad


def _sdpa(q: Tensor, k: Tensor, v: Tensor, *, scale: float) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` (what every layer of the model runs)."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False, scale=scale)


def _peak_child(spec: dict[str, Any], path: str, queue: Any) -> None:
    """In a fresh process: peak resident memory added by one step of ``path`` (Linux ``ru_maxrss``)."""
    import resource

    import psutil

    torch.set_num_threads(spec["threads"])
    tiny = dict(spec, batch=1, views=2, grid=(2, 2), query_chunk=2)
    _layer_step(_layer_case(tiny, torch.device("cpu")), tiny, path)  # library and thread-pool set-up
    case = _layer_case(spec, torch.device("cpu"))
    gc.collect()
    before = psutil.Process().memory_info().rss
    _layer_step(case, spec, path)
    queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)


def measure_supervised_layer(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    batch: int = 2,
    views: int = 4,
    heads: int = 10,
    head_dim: int = 64,
    grid: int | tuple[int, int] = 32,
    mode: str = "official",
    query_chunk: int = 256,
    mask_frac: float = 1.0,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Peak memory and time of one training step of the supervised layer, dense against chunked.

    Defaults are SD2.1's layer 10 (``up_blocks.2.attentions.0``: 10 heads of 64, 32x32 tokens at 512 px)
    with B=2, F=4 and every pair masked (``mask_frac=1``, the most work for the chunked path). A step is
    the layer's forward (random weights, ``dtype`` autocast on the layer when not fp32), the CAMEO loss
    and the backward pass; see :func:`_layer_step` for the two paths. Peak memory: on CUDA
    ``torch.cuda.max_memory_allocated`` above the inputs, after an unmeasured step of each path (first-use
    allocations out of both); on CPU the peak resident set size a step adds in a fresh process per path
    (Linux ``ru_maxrss``; includes allocator slack). Time: the median of
    ``repeats`` steps per path, the paths alternating, after one warm-up step each. Also returns the
    loss values and the largest relative difference of the input gradients between the paths.
    """
    device = torch.device(device)
    h, w = as_grid(grid)
    if mode not in LOSS_MODES:
        raise SchemaError("mode", f"expected one of {LOSS_MODES}, got {mode!r}")
    spec = dict(batch=batch, views=views, heads=heads, head_dim=head_dim, grid=(h, w), mode=mode, query_chunk=query_chunk,
                mask_frac=mask_frac, seed=seed, dtype=dtype, threads=torch.get_num_threads())
    paths = ("dense", "chunked")
    peak: dict[str, float] = {}
    if device.type == "cuda":
        case = _layer_case(spec, device)
        for path in paths:  # first-use allocations (cuBLAS workspaces, kernels) out of both peaks
            _layer_step(case, spec, path)
            case["attn"].zero_grad(set_to_none=True)
            case["mlp"].zero_grad(set_to_none=True)
        for path in paths:
            gc.collect()
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            _layer_step(case, spec, path)
            torch.cuda.synchronize(device)
            peak[path] = float(torch.cuda.max_memory_allocated(device) - base)
            case["attn"].zero_grad(set_to_none=True)
            case["mlp"].zero_grad(set_to_none=True)
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        for path in paths:
            queue = ctx.Queue()
            proc = ctx.Process(target=_peak_child, args=(spec, path, queue))
            proc.start()
            value = queue.get()
            proc.join()
            peak[path] = float(value)
        case = _layer_case(spec, device)

    def timed(path: str) -> tuple[float, Tensor, Tensor]:
        case["attn"].zero_grad(set_to_none=True)
        case["mlp"].zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        loss, grad = _layer_step(case, spec, path)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0, loss, grad

    results = {path: timed(path) for path in paths}  # warm-up, and the values compared below
    times: dict[str, list[float]] = {path: [] for path in paths}
    for _ in range(repeats):
        for path in paths:
            times[path].append(timed(path)[0])
    seconds = {path: statistics.median(t) for path, t in times.items()}
    gd, gc_ = results["dense"][2], results["chunked"][2]
    return {
        "device": str(device), "dtype": str(dtype).removeprefix("torch."), "batch": batch, "views": views, "heads": heads,
        "head_dim": head_dim, "grid": [h, w], "mode": mode, "query_chunk": query_chunk, "mask_frac": mask_frac,
        "peak_memory": "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS added, fresh process per path",
        "dense": {"peak_bytes": peak["dense"], "seconds": seconds["dense"], "loss": float(results["dense"][1])},
        "chunked": {"peak_bytes": peak["chunked"], "seconds": seconds["chunked"], "loss": float(results["chunked"][1])},
        "memory_ratio": peak["dense"] / max(peak["chunked"], 1.0),
        "time_ratio": seconds["chunked"] / seconds["dense"],
        "grad_max_rel_diff": float((gd - gc_).abs().max() / gd.abs().max().clamp_min(1e-30)),
    }
