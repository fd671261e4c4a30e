"""Tests of the CAMEO loss and the attention correspondence precision (cameo_corr.train.loss)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cameo_corr.schemas import SchemaError
from cameo_corr.train.loss import DEFAULT_CAMEO_WEIGHT, HeadMLP, attention_precision, cameo_loss


def _case(B: int = 2, H: int = 3, Fv: int = 3, hw: int = 4, seed: int = 0, p_mask: float = 0.6) -> dict:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    Q = Fv * hw
    nn_idx = torch.randint(0, hw, (B, Fv, Fv, hw), generator=g)
    mask = torch.rand(B, Fv, Fv, hw, generator=g) < p_mask
    eye = torch.arange(hw).expand(B, Fv, hw)
    for i in range(Fv):  # the cache's diagonal: identity, mask = valid
        nn_idx[:, i, i] = eye[:, i]
    return {
        "logits": torch.randn(B, H, Q, Q, generator=g) * 2.0,
        "corr_nn": nn_idx,
        "corr_mask": mask,
        "corr_dist": torch.rand(B, Fv, Fv, hw, generator=g) + 0.01,
        "head_mlp": HeadMLP(H),
    }


def _score(mlp: HeadMLP, logits: torch.Tensor, b: int, q: int, k: int) -> torch.Tensor:
    return mlp(logits[b, :, q, k])


def _reference_pair(logits, corr_nn, corr_mask, head_mlp, query_views=None) -> torch.Tensor:
    """Paper loss by explicit loops: per (b, i, j != i, x) masked, CE of softmax over view j's tokens."""
    B, _, Q, _ = logits.shape
    Fv, hw = corr_nn.shape[1], corr_nn.shape[3]
    terms = []
    for b in range(B):
        for i in range(Fv):
            if query_views is not None and not query_views[b, i]:
                continue
            for j in range(Fv):
                if j == i:
                    continue
                for x in range(hw):
                    if not corr_mask[b, i, j, x]:
                        continue
                    s = torch.stack([_score(head_mlp, logits, b, i * hw + x, j * hw + y) for y in range(hw)])
                    terms.append(-torch.log_softmax(s, dim=0)[corr_nn[b, i, j, x]])
    return torch.stack(terms).mean()


def _reference_global(logits, corr_nn, corr_mask, corr_dist, head_mlp) -> torch.Tensor:
    """Official-code loss by explicit loops: one softmax over all other views' tokens, target view
    j* = argmin over masked j != i of dist[i, j, x], token nn[i, j*, x]."""
    B = logits.shape[0]
    Fv, hw = corr_nn.shape[1], corr_nn.shape[3]
    terms = []
    for b in range(B):
        for i in range(Fv):
            for x in range(hw):
                cands = [j for j in range(Fv) if j != i and corr_mask[b, i, j, x]]
                if not cands:
                    continue
                js = min(cands, key=lambda j: float(corr_dist[b, i, j, x]))
                keys = [(j, y) for j in range(Fv) if j != i for y in range(hw)]
                s = torch.stack([_score(head_mlp, logits, b, i * hw + x, j * hw + y) for j, y in keys])
                t = keys.index((js, int(corr_nn[b, i, js, x])))
                terms.append(-torch.log_softmax(s, dim=0)[t])
    return torch.stack(terms).mean()


def test_default_weight() -> None:
    assert DEFAULT_CAMEO_WEIGHT == 0.02


def test_head_mlp_shape() -> None:
    mlp = HeadMLP(5)
    assert [m.__class__.__name__ for m in mlp.net] == ["Linear", "GELU", "Linear"]
    assert mlp.net[0].in_features == 5 and mlp.net[0].out_features == 20 and mlp.net[2].out_features == 1
    assert mlp(torch.randn(2, 7, 5)).shape == (2, 7)


def test_pair_loss_matches_dense_reference() -> None:
    c = _case()
    got = cameo_loss(c["logits"], c["corr_nn"], c["corr_mask"], None, c["head_mlp"], mode="pair")
    ref = _reference_pair(c["logits"], c["corr_nn"], c["corr_mask"], c["head_mlp"])
    assert got.dtype == torch.float32 and got.ndim == 0
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_global_loss_matches_dense_reference() -> None:
    c = _case(seed=1)
    got = cameo_loss(c["logits"], c["corr_nn"], c["corr_mask"], c["corr_dist"], c["head_mlp"], mode="global")
    ref = _reference_global(c["logits"], c["corr_nn"], c["corr_mask"], c["corr_dist"], c["head_mlp"])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@settings(max_examples=12, deadline=None)
@given(
    B=st.integers(1, 2),
    H=st.integers(1, 3),
    Fv=st.integers(2, 3),
    hw=st.sampled_from([1, 4]),
    seed=st.integers(0, 10_000),
    chunk=st.sampled_from([None, 1, 3]),
)
def test_pair_loss_property(B: int, H: int, Fv: int, hw: int, seed: int, chunk: int | None) -> None:
    c = _case(B, H, Fv, hw, seed, p_mask=0.7)
    off = ~torch.eye(Fv, dtype=torch.bool)[None, :, :, None]
    if not (c["corr_mask"] & off).any():
        c["corr_mask"][0, 0, 1, 0] = True
    got = cameo_loss(c["logits"], c["corr_nn"], c["corr_mask"], None, c["head_mlp"], query_chunk=chunk)
    ref = _reference_pair(c["logits"], c["corr_nn"], c["corr_mask"], c["head_mlp"])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["pair", "global"])
def test_self_blocks_and_unmasked_entries_do_not_matter(mode: str) -> None:
    c = _case(seed=2)
    hw, Fv = 4, 3
    base = cameo_loss(c["logits"], c["corr_nn"], c["corr_mask"], c["corr_dist"], c["head_mlp"], mode=mode)
    logits = c["logits"].clone()
    for i in range(Fv):  # self-view blocks: arbitrary values
        logits[:, :, i * hw : (i + 1) * hw, i * hw : (i + 1) * hw] = 50.0 * torch.randn(2, 3, hw, hw)
    nn_idx = c["corr_nn"].clone()
    nn_idx[~c["corr_mask"]] = (nn_idx[~c["corr_mask"]] + 1) % hw  # unmasked targets changed
    mask = c["corr_mask"].clone()
    for i in range(Fv):
        mask[:, i, i] = True  # diagonal "valid" entries of the cache are never supervised
    out = cameo_loss(logits, nn_idx, mask, c["corr_dist"], c["head_mlp"], mode=mode)
    torch.testing.assert_close(out, base, atol=1e-6, rtol=1e-6)
    # a masked target does matter
    flip = c["corr_nn"].clone()
    b, i, j, x = torch.nonzero(c["corr_mask"] & ~torch.eye(Fv, dtype=torch.bool)[None, :, :, None])[0].tolist()
    flip[b, i, j, x] = (flip[b, i, j, x] + 1) % hw
    if mode == "global":  # make (i, x) pick view j as its global target
        dist = c["corr_dist"].clone()
        dist[b, i, j, x] = 0.0
        base = cameo_loss(c["logits"], c["corr_nn"], c["corr_mask"], dist, c["head_mlp"], mode=mode)
        out = cameo_loss(c["logits"], flip, c["corr_mask"], dist, c["head_mlp"], mode=mode)
    else:
        out = cameo_loss(c["logits"], flip, c["corr_mask"], None, c["head_mlp"], mode=mode)
    assert not torch.isclose(out, base)


@pytest.mark.parametrize("mode", ["pair", "global"])
def test_gradients_reach_mlp_and_logits_not_self_blocks(mode: str) -> None:
    c = _case(seed=3)
    logits = c["logits"].requires_grad_(True)
    loss = cameo_loss(logits, c["corr_nn"], c["corr_mask"], c["corr_dist"], c["head_mlp"], mode=mode)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in c["head_mlp"].parameters())
    g = logits.grad
    assert g.abs().sum() > 0
    hw = 4
    for i in range(3):
        assert g[:, :, i * hw : (i + 1) * hw, i * hw : (i + 1) * hw].abs().max() == 0


def test_chunked_equals_unchunked_with_gradients() -> None:
    c = _case(B=2, H=2, Fv=3, hw=4, seed=4)
    grads = []
    values = []
    for chunk in (None, 3):
        mlp = HeadMLP(2)
        mlp.load_state_dict(c["head_mlp"].state_dict())
        logits = c["logits"][:, :2].clone().requires_grad_(True)
        loss = cameo_loss(logits, c["corr_nn"], c["corr_mask"], None, mlp, query_chunk=chunk)
        loss.backward()
        values.append(loss.detach())
        grads.append((logits.grad, mlp.net[0].weight.grad))
    torch.testing.assert_close(values[0], values[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_query_views_restrict_the_queries() -> None:
    c = _case(seed=5)
    qv = torch.tensor([[False, True, True], [False, False, True]])
    got = cameo_loss(c["logits"], c["corr_nn"], c["corr_mask"], None, c["head_mlp"], query_views=qv)
    ref = _reference_pair(c["logits"], c["corr_nn"], c["corr_mask"], c["head_mlp"], query_views=qv)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_fp32_under_autocast_and_empty_mask() -> None:
    c = _case(seed=6)
    ref = cameo_loss(c["logits"], c["corr_nn"], c["corr_mask"], None, c["head_mlp"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cameo_loss(c["logits"], c["corr_nn"], c["corr_mask"], None, c["head_mlp"])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)  # bf16 matmuls would be far off

    logits = c["logits"].requires_grad_(True)
    empty = cameo_loss(logits, c["corr_nn"], torch.zeros_like(c["corr_mask"]), None, c["head_mlp"])
    assert empty.item() == 0.0
    empty.backward()
    assert logits.grad is not None and logits.grad.abs().max() == 0


def test_bad_inputs_raise_schema_errors() -> None:
    c = _case()
    with pytest.raises(SchemaError, match="cache grid"):  # 4 tokens per view in the logits, 9 in the cache
        cameo_loss(c["logits"], torch.zeros(2, 3, 3, 9, dtype=torch.long), torch.ones(2, 3, 3, 9, dtype=torch.bool), None, c["head_mlp"])
    with pytest.raises(SchemaError, match="heads"):
        cameo_loss(c["logits"], c["corr_nn"], c["corr_mask"], None, HeadMLP(4))
    with pytest.raises(SchemaError, match="mode"):
        cameo_loss(c["logits"], c["corr_nn"], c["corr_mask"], None, c["head_mlp"], mode="both")
    with pytest.raises(SchemaError, match="corr_dist"):
        cameo_loss(c["logits"], c["corr_nn"], c["corr_mask"], None, c["head_mlp"], mode="global")
    bad = c["corr_nn"].clone()
    bad[c["corr_mask"] & ~torch.eye(3, dtype=torch.bool)[None, :, :, None]] = 7
    with pytest.raises(SchemaError, match="outside"):
        cameo_loss(c["logits"], bad, c["corr_mask"], None, c["head_mlp"])


# -------------------------------------------------------------------------------------- precision
def _reference_precision(attn, corr_nn, corr_mask, w: int, query_views=None) -> float:
    B, Q, _ = attn.shape
    Fv, hw = corr_nn.shape[1], corr_nn.shape[3]
    hits = total = 0
    for b in range(B):
        for i in range(Fv):
            if query_views is not None and not query_views[b, i]:
                continue
            for j in range(Fv):
                if i == j:
                    continue
                for x in range(hw):
                    if not corr_mask[b, i, j, x]:
                        continue
                    y = int(attn[b, i * hw + x, j * hw : (j + 1) * hw].argmax())
                    t = int(corr_nn[b, i, j, x])
                    total += 1
                    hits += max(abs(y // w - t // w), abs(y % w - t % w)) <= 1
    return hits / total


def test_attention_precision_neighbourhood_and_reference() -> None:
    Fv, h, w = 2, 4, 4
    hw = h * w
    corr_nn = torch.zeros(1, Fv, Fv, hw, dtype=torch.long)
    corr_nn[0, 0, 1] = torch.arange(hw)
    corr_nn[0, 1, 0] = torch.arange(hw)
    mask = torch.zeros(1, Fv, Fv, hw, dtype=torch.bool)
    mask[0, 0, 1, :4] = True
    mask[0, 0, 0] = True  # self block: ignored
    attn = torch.zeros(1, Fv * hw, Fv * hw)
    # query 0 -> token 0 (exact), 1 -> 6 (diagonal neighbour of 1? (0,1)->(1,2): hit), 2 -> 10 ((0,2)->(2,2): miss), 3 -> 15 (miss)
    for x, y in [(0, 0), (1, 6), (2, 10), (3, 15)]:
        attn[0, x, hw + y] = 1.0
    attn[0, :hw, :hw] = 5.0  # strong self attention must not count
    got = attention_precision(attn, corr_nn, mask, (h, w))
    assert got.item() == pytest.approx(0.5)
    assert got.item() == pytest.approx(_reference_precision(attn, corr_nn, mask, w))
    assert torch.isnan(attention_precision(attn, corr_nn, torch.zeros_like(mask), 4))


def test_attention_precision_head_mean_of_softmax_matches_reference() -> None:
    c = _case(B=2, H=3, Fv=3, hw=4, seed=7)
    probs = c["logits"].softmax(-1).mean(1)
    got = attention_precision(c["logits"], c["corr_nn"], c["corr_mask"], 2)
    assert got.item() == pytest.approx(_reference_precision(probs, c["corr_nn"], c["corr_mask"], 2))
    got_p = attention_precision(c["logits"].softmax(-1), c["corr_nn"], c["corr_mask"], (2, 2), logits=False)
    assert got_p.item() == pytest.approx(got.item())
    qv = torch.tensor([[False, True, True], [True, False, False]])
    got_q = attention_precision(c["logits"], c["corr_nn"], c["corr_mask"], 2, query_views=qv)
    assert got_q.item() == pytest.approx(_reference_precision(probs, c["corr_nn"], c["corr_mask"], 2, query_views=qv))
    # a map whose per-view argmax is the target everywhere scores 1
    B, Fv, hw = 2, 3, 4
    perfect = torch.zeros(B, Fv * hw, Fv * hw)
    for b in range(B):
        for i in range(Fv):
            for j in range(Fv):
                perfect[b, i * hw + torch.arange(hw), j * hw + c["corr_nn"][b, i, j]] = 1.0
    assert attention_precision(perfect, c["corr_nn"], c["corr_mask"], 2).item() == 1.0
    with pytest.raises(SchemaError, match="grid"):
        attention_precision(perfect, c["corr_nn"], c["corr_mask"], 3)
