"""CAMEO attention loss and the attention correspondence precision metric.

Public API (signatures are part of the trainer contract)::

    DEFAULT_CAMEO_WEIGHT = 0.02
    class HeadMLP(nn.Module): __init__(heads, ratio=4); forward([..., heads]) -> [...]
    cameo_loss(logits [B, heads, F*hw, F*hw], corr_nn [B, F, F, hw], corr_mask [B, F, F, hw],
               corr_dist [B, F, F, hw] | None, head_mlp, *, mode="pair" | "global",
               query_views [B, F] bool | None = None, query_chunk: int | None = None) -> Tensor  # fp32 scalar
    attention_precision(attn_or_logits [B, heads, Q, K] | [B, Q, K], corr_nn, corr_mask,
                        grid: int | (h, w), *, logits=True, query_views [B, F] bool | None = None) -> Tensor

Token ``x`` of view ``i`` is query ``i*hw + x``; token ``y`` of view ``j`` is key ``j*hw + y`` (the layout
of :class:`cameo_corr.train.model.MultiViewUNet`'s logits, views in batch order). ``corr_nn[b, i, j, x]``
is the token of view ``j`` matched to token ``x`` of view ``i``; ``corr_mask`` marks the cycle-consistent
matches; self-view blocks (``i == j``) are never supervised.

Loss. The logits go through :class:`HeadMLP` over the head axis (``H -> 4H -> 1``, GELU), giving one
score map ``s[b, i, x, j, y]``. Mode ``"pair"`` (paper): for every query ``(i, x)`` and key view
``j != i`` with ``mask[i, j, x]``, cross-entropy of ``softmax_y s[b, i, x, j, :]`` with the one-hot target
``nn[i, j, x]``; the mean over those entries. Mode ``"global"`` (official code): one softmax over the
tokens of all other views together; the target is ``(j*, nn[i, j*, x])`` with ``j* = argmin_{j != i,
mask} dist[i, j, x]`` from :func:`cameo_corr.pipeline.match.global_targets`; the mean over queries with
at least one masked view. Computed in fp32 with autocast disabled. The loss is unweighted: the caller
multiplies it by lambda (:data:`DEFAULT_CAMEO_WEIGHT`). With no supervised entry the loss is 0 (still
connected to the graph, so every parameter receives a gradient).

Memory. The MLP runs on the full ``[B, Q, K, 4H]`` tensor; for large layers pass ``query_chunk`` to score
queries in chunks of that many tokens under activation checkpointing, so only one chunk's MLP
activations are alive at a time (identical value and gradients).

Precision. "Within 1 token" means Chebyshev distance <= 1 on the token grid (the 3x3 neighbourhood of
the target token).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cameo_corr.schemas import SchemaError, as_grid

__all__ = ["DEFAULT_CAMEO_WEIGHT", "HeadMLP", "cameo_loss", "attention_precision"]

DEFAULT_CAMEO_WEIGHT = 0.02
"""lambda of the paper: total loss = diffusion loss + lambda * CAMEO loss."""

_MODES = ("pair", "global")


class HeadMLP(nn.Module):
    """Per-entry MLP over attention heads: ``[..., heads] -> [...]`` (``H -> ratio*H -> 1``, GELU)."""

    def __init__(self, heads: int, ratio: int = 4) -> None:
        super().__init__()
        if heads < 1 or ratio < 1:
            raise SchemaError("heads", f"heads and ratio must be >= 1, got heads={heads}, ratio={ratio}")
        self.heads = int(heads)
        self.net = nn.Sequential(nn.Linear(heads, ratio * heads), nn.GELU(), nn.Linear(ratio * heads, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Fused score of the per-head values in the last axis."""
        return self.net(x).squeeze(-1)


def _check_inputs(logits: Tensor, corr_nn: Tensor, corr_mask: Tensor, heads: int) -> tuple[int, int, int]:
    """Validate shapes; return ``(B, F, hw)``."""
    if logits.ndim != 4:
        raise SchemaError("logits", f"expected [B, heads, F*hw, F*hw], got shape {tuple(logits.shape)}")
    if corr_nn.ndim != 4 or corr_nn.shape[1] != corr_nn.shape[2]:
        raise SchemaError("corr_nn", f"expected [B, F, F, hw], got shape {tuple(corr_nn.shape)}")
    if tuple(corr_mask.shape) != tuple(corr_nn.shape):
        raise SchemaError("corr_mask", f"shape {tuple(corr_mask.shape)} differs from corr_nn {tuple(corr_nn.shape)}")
    if corr_nn.dtype.is_floating_point or corr_nn.dtype == torch.bool:
        raise SchemaError("corr_nn", f"expected integer token indices, got {corr_nn.dtype}")
    B, Fv, _, hw = corr_nn.shape
    if Fv < 2:
        raise SchemaError("corr_nn", f"needs at least 2 views, got {Fv}")
    if logits.shape[0] != B:
        raise SchemaError("logits", f"batch {logits.shape[0]} differs from the correspondences' batch {B}")
    if logits.shape[2] != Fv * hw or logits.shape[3] != Fv * hw:
        raise SchemaError(
            "logits",
            f"{logits.shape[2]}x{logits.shape[3]} query/key tokens but the correspondences imply {Fv} views x {hw}"
            " tokens; the supervised layer's token grid must equal the cache grid",
        )
    if logits.shape[1] != heads:
        raise SchemaError("logits", f"{logits.shape[1]} heads but the head MLP takes {heads}")
    return B, Fv, hw


def _check_targets(target: Tensor, weight: Tensor, limit: int, field: str) -> None:
    """Every supervised target index must lie in ``[0, limit)``."""
    t = torch.where(weight, target, torch.zeros_like(target))
    if bool(((t < 0) | (t >= limit)).any()):
        raise SchemaError(field, f"supervised token index outside [0, {limit})")


def _chunk_sum(
    x: Tensor, head_mlp: nn.Module, views: Tensor, target: Tensor, weight: Tensor, mode: str, Fv: int, hw: int
) -> Tensor:
    """Sum of the cross-entropy terms of one chunk of queries.

    ``x`` ``[B, heads, n_i*c, F*hw]`` fp32 logits of the queries of views ``views`` ``[n_i]``, ``c`` tokens
    each. Pair mode: ``target``/``weight`` ``[B, n_i, c, F]``; global mode: ``[B, n_i, c]`` (flat key index).
    """
    B = x.shape[0]
    n_i = views.shape[0]
    s = head_mlp(x.permute(0, 2, 3, 1)).reshape(B, n_i, -1, Fv, hw)
    if mode == "pair":
        lse = s.logsumexp(dim=-1)
        picked = s.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    else:
        own = views[:, None] == torch.arange(Fv, device=views.device)[None, :]  # [n_i, F]
        s = s.masked_fill(own[None, :, None, :, None], float("-inf")).flatten(-2)
        lse = s.logsumexp(dim=-1)
        picked = s.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return torch.where(weight, lse - picked, torch.zeros_like(lse)).sum()


def cameo_loss(
    logits: Tensor,
    corr_nn: Tensor,
    corr_mask: Tensor,
    corr_dist: Tensor | None,
    head_mlp: nn.Module,
    *,
    mode: str = "pair",
    query_views: Tensor | None = None,
    query_chunk: int | None = None,
) -> Tensor:
    """CAMEO attention loss (fp32 scalar, unweighted; see the module docstring).

    ``logits`` ``[B, heads, F*hw, F*hw]`` pre-softmax attention logits of the supervised layer;
    ``corr_nn``/``corr_mask``/``corr_dist`` ``[B, F, F, hw]`` cached correspondences in the same view
    order (``corr_dist`` is needed for ``mode="global"`` only); ``head_mlp`` a :class:`HeadMLP`.
    ``query_views`` ``[B, F]`` bool restricts the supervised queries to some views (e.g. targets only).
    ``query_chunk`` scores that many query tokens at a time under activation checkpointing.
    """
    if mode not in _MODES:
        raise SchemaError("mode", f"expected one of {_MODES}, got {mode!r}")
    heads = getattr(head_mlp, "heads", logits.shape[1] if logits.ndim == 4 else -1)
    B, Fv, hw = _check_inputs(logits, corr_nn, corr_mask, heads)
    if query_chunk is not None and query_chunk < 1:
        raise SchemaError("query_chunk", f"must be >= 1, got {query_chunk}")
    device = logits.device
    with torch.autocast(device_type=device.type, enabled=False):
        x = logits.float()
        nn_idx = corr_nn.to(device=device, dtype=torch.long)
        off_diag = ~torch.eye(Fv, dtype=torch.bool, device=device)
        mask = corr_mask.to(device=device, dtype=torch.bool) & off_diag[None, :, :, None]
        if query_views is not None:
            if tuple(query_views.shape) != (B, Fv):
                raise SchemaError("query_views", f"expected [B, F] = {(B, Fv)}, got {tuple(query_views.shape)}")
            mask = mask & query_views.to(device=device, dtype=torch.bool)[:, :, None, None]

        if mode == "pair":
            _check_targets(nn_idx, mask, hw, "corr_nn")
            target = torch.where(mask, nn_idx, torch.zeros_like(nn_idx)).permute(0, 1, 3, 2)  # [B, i, x, j]
            weight = mask.permute(0, 1, 3, 2)
        else:
            if corr_dist is None:
                raise SchemaError("corr_dist", "mode='global' needs corr_dist")
            if tuple(corr_dist.shape) != tuple(corr_nn.shape):
                raise SchemaError("corr_dist", f"shape {tuple(corr_dist.shape)} differs from corr_nn {tuple(corr_nn.shape)}")
            from cameo_corr.pipeline.match import global_targets

            view, token, weight = global_targets(nn_idx, corr_dist.to(device=device, dtype=torch.float32), mask)
            view, token, weight = view.long(), token.long(), weight.bool()  # [B, i, x]
            _check_targets(token, weight, hw, "corr_nn")
            _check_targets(view, weight, Fv, "corr_dist")
            target = torch.where(weight, view * hw + token, torch.zeros_like(token))

        views = torch.arange(Fv, device=device)
        if query_chunk is None:
            total = _chunk_sum(x, head_mlp, views, target, weight, mode, Fv, hw)
        else:
            total = x.new_zeros(())
            for i in range(Fv):
                for x0 in range(0, hw, query_chunk):
                    x1 = min(x0 + query_chunk, hw)
                    args = (
                        x[:, :, i * hw + x0 : i * hw + x1],
                        head_mlp,
                        views[i : i + 1],
                        target[:, i : i + 1, x0:x1],
                        weight[:, i : i + 1, x0:x1],
                        mode,
                        Fv,
                        hw,
                    )
                    if torch.is_grad_enabled():
                        total = total + checkpoint(_chunk_sum, *args, use_reentrant=False)
                    else:
                        total = total + _chunk_sum(*args)
        count = weight.sum()
        return total / count.clamp_min(1).to(total.dtype)


@torch.no_grad()
def attention_precision(
    attn_or_logits: Tensor,
    corr_nn: Tensor,
    corr_mask: Tensor,
    grid: int | tuple[int, int],
    *,
    logits: bool = True,
    query_views: Tensor | None = None,
) -> Tensor:
    """Fraction of supervised entries ``(b, i, j != i, x)`` whose attention argmax over view ``j``'s tokens
    lies within Chebyshev distance 1 of ``corr_nn[b, i, j, x]`` on the ``grid``.

    ``attn_or_logits``: ``[B, heads, Q, K]`` per-head logits (``logits=True``: the attention is their
    softmax over all keys, as in the model) or probabilities (``logits=False``), averaged over heads;
    or an already head-fused ``[B, Q, K]`` map (its argmax is used as is). ``query_views`` ``[B, F]``
    bool counts only the queries of those views (e.g. targets). Returns a 0-d fp32 tensor, NaN when no
    entry is masked.
    """
    h, w = as_grid(grid)
    hw = h * w
    if corr_nn.ndim != 4 or corr_nn.shape[-1] != hw:
        raise SchemaError("corr_nn", f"expected [B, F, F, {hw}] for a {h}x{w} grid, got {tuple(corr_nn.shape)}")
    B, Fv = corr_nn.shape[:2]
    x = attn_or_logits
    if x.ndim == 4:
        if logits:
            probs = torch.zeros(x.shape[0], x.shape[2], x.shape[3], dtype=torch.float32, device=x.device)
            for k in range(x.shape[1]):
                probs += x[:, k].float().softmax(dim=-1)
        else:
            probs = x.float().sum(dim=1)
    elif x.ndim == 3:
        probs = x.float()
    else:
        raise SchemaError("attn_or_logits", f"expected [B, heads, Q, K] or [B, Q, K], got {tuple(x.shape)}")
    if tuple(probs.shape) != (B, Fv * hw, Fv * hw):
        raise SchemaError(
            "attn_or_logits",
            f"{tuple(probs.shape[1:])} query/key tokens do not match {Fv} views x {hw} tokens of the {h}x{w} grid",
        )
    arg = probs.view(B, Fv, hw, Fv, hw).argmax(dim=-1)  # [B, i, x, j]
    target = corr_nn.to(device=arg.device, dtype=torch.long).permute(0, 1, 3, 2)
    off_diag = ~torch.eye(Fv, dtype=torch.bool, device=arg.device)
    mask = corr_mask.to(device=arg.device, dtype=torch.bool) & off_diag[None, :, :, None]
    if query_views is not None:
        if tuple(query_views.shape) != (B, Fv):
            raise SchemaError("query_views", f"expected [B, F] = {(B, Fv)}, got {tuple(query_views.shape)}")
        mask = mask & query_views.to(device=arg.device, dtype=torch.bool)[:, :, None, None]
    mask = mask.permute(0, 1, 3, 2)
    cheb = torch.maximum((arg // w - target // w).abs(), (arg % w - target % w).abs())
    hits = ((cheb <= 1) & mask).sum()
    return hits.float() / mask.sum().float()
