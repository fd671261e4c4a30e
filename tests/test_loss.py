"""Tests of the CAMEO loss and the attention correspondence precision (cameo_corr.train.loss)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cameo_corr.schemas import SchemaError
from cameo_corr.train.loss import (
    DEFAULT_CAMEO_WEIGHT,
    LOSS_MODES,
    HeadMLP,
    QueryKey,
    attention_precision,
    cameo_loss,
    measure_supervised_layer,
)


def _case(B: int = 2, H: int = 3, Fv: int = 3, hw: int = 4, seed: int = 0, p_mask: float = 0.6,
          dtype: torch.dtype = torch.float64) -> dict:
    """Random logits, a cache-like F x F block (identity diagonal, float16-like distance ties, some
    key views without a valid token) and one reference count per sample."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    Q = Fv * hw
    nn_idx = torch.randint(0, hw, (B, Fv, Fv, hw), generator=g)
    mask = torch.rand(B, Fv, Fv, hw, generator=g) < p_mask
    dist = torch.randint(1, 5, (B, Fv, Fv, hw), generator=g).to(torch.float32) / 4  # ties
    dist[torch.rand(B, Fv, Fv, hw, generator=g) < 0.1] = math.inf  # no valid key token
    for i in range(Fv):  # the cache's diagonal: identity, distance 0, mask = valid
        nn_idx[:, i, i] = torch.arange(hw)
        dist[:, i, i] = 0.0
    num_ref = torch.randint(1, Fv, (B,), generator=g)
    return {
        "logits": (torch.randn(B, H, Q, Q, generator=g) * 2.0).to(dtype),
        "corr_nn": nn_idx,
        "corr_mask": mask,
        "corr_dist": dist,
        "head_mlp": HeadMLP(H).to(dtype),
        "ref_views": torch.arange(Fv)[None, :] < num_ref[:, None],
    }


def _softmax(s: list[torch.Tensor]) -> list[torch.Tensor]:
    e = [torch.exp(v) for v in s]
    z = sum(e)
    return [v / z for v in e]


def _view_probs(mlp: HeadMLP, logits: torch.Tensor, b: int, q: int, j: int, hw: int) -> list[torch.Tensor]:
    """p[b, q, j, :]: the head MLP per (query, key) entry, then a softmax over view j's tokens."""
    return _softmax([mlp(logits[b, :, q, j * hw + y]) for y in range(hw)])


def _zero(logits: torch.Tensor, head_mlp: HeadMLP) -> torch.Tensor:
    """The skipped loss: 0, with (zero) gradients for the logits and every MLP parameter."""
    return logits.sum() * 0.0 + sum(p.sum() for p in head_mlp.parameters()) * 0.0


def _reference_paper(logits, corr_nn, corr_mask, head_mlp) -> torch.Tensor:
    """Eq. 1 by explicit loops: per (b, i, j != i, x) with M_ij(x), -log p[nn]; the mean."""
    B = logits.shape[0]
    Fv, hw = corr_nn.shape[1], corr_nn.shape[3]
    terms = []
    for b in range(B):
        for i in range(Fv):
            for j in range(Fv):
                for x in range(hw):
                    if j != i and corr_mask[b, i, j, x]:
                        p = _view_probs(head_mlp, logits, b, i * hw + x, j, hw)
                        terms.append(-torch.log(p[int(corr_nn[b, i, j, x])]))
    if not terms:
        return _zero(logits, head_mlp)
    return sum(terms) / len(terms)


def _reference_official(logits, corr_nn, corr_mask, corr_dist, head_mlp, ref_views) -> torch.Tensor:
    """The official objective by explicit loops, written from its rules:
    j* = argmin over every j != i of dist (lowest j on ties, no mask restriction); every (x, j) row with
    M_ij(x) counts once in its query group (reference or target view i); only the j* row adds
    -log(p[nn[i, j*, x]] + 1e-8); loss = sum_ref / n_ref + sum_tgt / n_tgt, skipped (0) if a group is empty."""
    B = logits.shape[0]
    Fv, hw = corr_nn.shape[1], corr_nn.shape[3]
    sums = {True: [], False: []}
    counts = {True: 0, False: 0}
    for b in range(B):
        for i in range(Fv):
            group = bool(ref_views[b, i])
            for x in range(hw):
                d = {j: float(corr_dist[b, i, j, x]) for j in range(Fv) if j != i}
                j_star = min(d, key=lambda j: (d[j], j))
                for j in range(Fv):
                    if j == i or not corr_mask[b, i, j, x]:
                        continue
                    counts[group] += 1
                    if j == j_star:
                        p = _view_probs(head_mlp, logits, b, i * hw + x, j, hw)
                        sums[group].append(-torch.log(p[int(corr_nn[b, i, j, x])] + 1e-8))
    if counts[True] == 0 or counts[False] == 0:
        return _zero(logits, head_mlp)
    zero = _zero(logits, head_mlp)  # rows may count without any j* term: still a (zero-gradient) function of the inputs
    return sum(sums[True], zero) / counts[True] + sum(sums[False], zero) / counts[False]


def _value_and_grads(fn, c: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    mlp = copy.deepcopy(c["head_mlp"])
    logits = c["logits"].clone().requires_grad_(True)
    value = fn(logits, mlp)
    value.backward()
    return value.detach(), [logits.grad] + [p.grad for p in mlp.parameters()]


def _assert_same(a: tuple, b: tuple, rtol: float = 1e-6) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=1e-10, atol=0)  # tight enough to see the official 1e-8 in log(p + eps)
    for ga, gb in zip(a[1], b[1]):
        # relative to the largest entry; 1e-14 absolute for entries that are 0 analytically (the last
        # bias of the head MLP: a per-view softmax does not see a constant shift)
        assert float((ga - gb).abs().max()) <= rtol * float(gb.abs().max()) + 1e-14, (ga - gb).abs().max()


def _official(c: dict, **kw):
    return lambda logits, mlp: cameo_loss(logits, c["corr_nn"], c["corr_mask"], c["corr_dist"], mlp, mode="official",
                                          ref_views=c["ref_views"], **kw)


def _paper(c: dict, **kw):
    return lambda logits, mlp: cameo_loss(logits, c["corr_nn"], c["corr_mask"], None, mlp, mode="paper", **kw)


def test_default_weight_and_modes() -> None:
    assert DEFAULT_CAMEO_WEIGHT == 0.02
    assert LOSS_MODES == ("official", "paper")


def test_head_mlp_shape() -> None:
    mlp = HeadMLP(5)
    assert [m.__class__.__name__ for m in mlp.net] == ["Linear", "GELU", "Linear"]
    assert mlp.net[0].in_features == 5 and mlp.net[0].out_features == 20 and mlp.net[2].out_features == 1
    assert mlp(torch.randn(2, 7, 5)).shape == (2, 7)


@pytest.mark.parametrize("Fv,seed", [(2, 0), (3, 1), (4, 2)])
def test_official_loss_matches_dense_reference(Fv: int, seed: int) -> None:
    c = _case(Fv=Fv, hw=4 if Fv < 4 else 2, seed=seed)
    ref = _value_and_grads(lambda lg, m: _reference_official(lg, c["corr_nn"], c["corr_mask"], c["corr_dist"], m, c["ref_views"]), c)
    got = _value_and_grads(_official(c), c)
    assert got[0].dtype == torch.float64 and got[0].ndim == 0 and got[0] > 0
    _assert_same(got, ref)


@pytest.mark.parametrize("Fv,seed", [(2, 3), (3, 4)])
def test_paper_loss_matches_dense_reference(Fv: int, seed: int) -> None:
    c = _case(Fv=Fv, seed=seed)
    ref = _value_and_grads(lambda lg, m: _reference_paper(lg, c["corr_nn"], c["corr_mask"], m), c)
    _assert_same(_value_and_grads(_paper(c), c), ref)


@settings(max_examples=10, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 3), Fv=st.integers(2, 3), hw=st.sampled_from([1, 3]),
       seed=st.integers(0, 10_000), p_mask=st.sampled_from([0.1, 0.7]))
def test_official_loss_property_including_skips(B: int, H: int, Fv: int, hw: int, seed: int, p_mask: float) -> None:
    """Random sparse masks often leave the reference or the target rows empty: the skip must agree."""
    c = _case(B, H, Fv, hw, seed, p_mask=p_mask)
    ref = _value_and_grads(lambda lg, m: _reference_official(lg, c["corr_nn"], c["corr_mask"], c["corr_dist"], m, c["ref_views"]), c)
    _assert_same(_value_and_grads(_official(c), c), ref)


def test_official_skips_the_layer_when_a_selection_is_empty() -> None:
    c = _case(seed=5)
    off = ~torch.eye(3, dtype=torch.bool)[None, :, :, None]
    assert (c["corr_mask"] & off).any()
    for empty in (c["ref_views"], ~c["ref_views"]):  # no entering row among the reference / target queries
        c2 = dict(c, corr_mask=c["corr_mask"] & ~empty[:, :, None, None])
        got = _value_and_grads(_official(c2), c2)
        assert got[0].item() == 0.0
        assert all(g is not None and g.abs().max() == 0 for g in got[1])  # connected, zero gradients
        assert _reference_official(c2["logits"], c2["corr_nn"], c2["corr_mask"], c2["corr_dist"], c2["head_mlp"], c2["ref_views"]).item() == 0.0
    # an unmasked j* row gives no term but the other masked rows still count: the loss is not skipped
    c3 = dict(c, corr_mask=c["corr_mask"].clone())
    b, i, x = 0, int(c["ref_views"][0].sum()), 0  # a target query
    j_star = min((j for j in range(3) if j != i), key=lambda j: (float(c["corr_dist"][b, i, j, x]), j))
    c3["corr_mask"][b, i, j_star, x] = False
    _assert_same(_value_and_grads(_official(c3), c3),
                 _value_and_grads(lambda lg, m: _reference_official(lg, c3["corr_nn"], c3["corr_mask"], c3["corr_dist"], m, c3["ref_views"]), c3))


def test_official_target_ignores_the_mask_of_other_views() -> None:
    """j* is the nearest view over all other views: making an unmasked view nearest removes the term."""
    c = _case(seed=6, p_mask=1.0)
    base = _official(c)(c["logits"], c["head_mlp"])
    mask = c["corr_mask"].clone()
    dist = c["corr_dist"].clone()
    b, i, x = 0, 0, 1
    mask[b, i, 2, x] = False
    dist[b, i, 2, x] = 0.0  # view 2 is now nearest but unmasked
    c2 = dict(c, corr_mask=mask, corr_dist=dist)
    ref = _reference_official(c2["logits"], c2["corr_nn"], mask, dist, c2["head_mlp"], c2["ref_views"])
    got = _official(c2)(c2["logits"], c2["head_mlp"])
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=0)
    assert not torch.isclose(got, base)


@pytest.mark.parametrize("mode", LOSS_MODES)
def test_self_blocks_and_unmasked_entries_do_not_matter(mode: str) -> None:
    c = _case(seed=2)
    hw, Fv = 4, 3
    fn = _official if mode == "official" else _paper
    base = fn(c)(c["logits"], c["head_mlp"])
    logits = c["logits"].clone()
    for i in range(Fv):  # self-view blocks: arbitrary values
        logits[:, :, i * hw : (i + 1) * hw, i * hw : (i + 1) * hw] = 50.0 * torch.randn(2, 3, hw, hw, dtype=logits.dtype)
    nn_idx = c["corr_nn"].clone()
    nn_idx[~c["corr_mask"]] = (nn_idx[~c["corr_mask"]] + 1) % hw  # unmasked targets changed
    mask = c["corr_mask"].clone()
    for i in range(Fv):
        mask[:, i, i] = True  # diagonal "valid" entries of the cache are never supervised
    c2 = dict(c, logits=logits, corr_nn=nn_idx, corr_mask=mask)
    torch.testing.assert_close(fn(c2)(logits, c["head_mlp"]), base, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("mode", LOSS_MODES)
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_and_query_key_paths_equal_dense(mode: str, chunk: int) -> None:
    """Chunked scoring of dense logits and chunked recomputation from q and k: same value and gradients."""
    c = _case(B=2, H=2, Fv=3, hw=4, seed=7)
    B, H, Q, d = 2, 2, 12, 5
    g = torch.Generator().manual_seed(7)
    q0 = torch.randn(B, H, Q, d, generator=g, dtype=torch.float64)
    k0 = torch.randn(B, H, Q, d, generator=g, dtype=torch.float64)
    c["head_mlp"] = HeadMLP(H).double()
    fn = _official if mode == "official" else _paper

    def run(kind: str, query_chunk: int | None):
        mlp = copy.deepcopy(c["head_mlp"])
        q, k = q0.clone().requires_grad_(True), k0.clone().requires_grad_(True)
        attn = QueryKey(q, k, 0.4) if kind == "qk" else (q @ k.transpose(-1, -2)) * 0.4
        value = fn(c, query_chunk=query_chunk)(attn, mlp)
        value.backward()
        return value.detach(), [q.grad, k.grad] + [p.grad for p in mlp.parameters()]

    dense = run("logits", None)
    for kind in ("logits", "qk"):
        _assert_same(run(kind, chunk), dense)
    _assert_same(run("qk", None), dense)


def test_fp32_under_autocast() -> None:
    c = _case(seed=8, dtype=torch.float32)
    ref = _official(c)(c["logits"], c["head_mlp"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _official(c)(c["logits"], c["head_mlp"])
        out_qk = _official(c, query_chunk=5)(QueryKey(c["logits"][..., :2].contiguous(), c["logits"][..., 2:4].contiguous(), 1.0),
                                             c["head_mlp"])
    assert out.dtype == torch.float32 and out_qk.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)  # bf16 matmuls would be far off


def test_bad_inputs_raise_schema_errors() -> None:
    c = _case()
    with pytest.raises(SchemaError, match="cache grid"):  # 4 tokens per view in the logits, 9 in the cache
        cameo_loss(c["logits"], torch.zeros(2, 3, 3, 9, dtype=torch.long), torch.ones(2, 3, 3, 9, dtype=torch.bool), None,
                   c["head_mlp"], mode="paper")
    with pytest.raises(SchemaError, match="heads"):
        cameo_loss(c["logits"], c["corr_nn"], c["corr_mask"], None, HeadMLP(4), mode="paper")
    with pytest.raises(SchemaError, match="mode"):
        cameo_loss(c["logits"], c["corr_nn"], c["corr_mask"], None, c["head_mlp"], mode="global")
    with pytest.raises(SchemaError, match="corr_dist"):
        cameo_loss(c["logits"], c["corr_nn"], c["corr_mask"], None, c["head_mlp"], mode="official", ref_views=c["ref_views"])
    with pytest.raises(SchemaError, match="ref_views"):
        cameo_loss(c["logits"], c["corr_nn"], c["corr_mask"], c["corr_dist"], c["head_mlp"], mode="official")
    with pytest.raises(SchemaError, match="query_chunk"):
        cameo_loss(c["logits"], c["corr_nn"], c["corr_mask"], None, c["head_mlp"], mode="paper", query_chunk=0)
    bad = c["corr_nn"].clone()
    bad[c["corr_mask"] & ~torch.eye(3, dtype=torch.bool)[None, :, :, None]] = 7
    with pytest.raises(SchemaError, match="outside"):
        cameo_loss(c["logits"], bad, c["corr_mask"], None, c["head_mlp"], mode="paper")


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


def test_chunked_query_key_loss_never_forms_the_logit_matrix() -> None:
    """No tensor of the forward or backward pass of the chunked loss is as large as the logits
    [B, heads, Q, K]: the largest is one chunk's head-MLP activation."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    B, H, Fv, hw, d, chunk = 2, 2, 3, 16, 4, 8
    c = _case(B=B, H=H, Fv=Fv, hw=hw, seed=9, p_mask=1.0, dtype=torch.float32)
    q = torch.randn(B, H, Fv * hw, d, requires_grad=True)
    k = torch.randn(B, H, Fv * hw, d, requires_grad=True)
    for mode in LOSS_MODES:
        Largest.numel = 0
        with Largest():
            loss = cameo_loss(QueryKey(q, k, 0.5), c["corr_nn"], c["corr_mask"], c["corr_dist"], c["head_mlp"], mode=mode,
                              ref_views=c["ref_views"], query_chunk=chunk)
            loss.backward()
        assert 0 < Largest.numel <= chunk * hw * 4 * H < B * H * (Fv * hw) ** 2 // 4, (mode, Largest.numel)


def test_attention_precision_from_query_key_equals_logits() -> None:
    c = _case(B=2, H=3, Fv=3, hw=4, seed=10, dtype=torch.float32)
    q, k = torch.randn(2, 3, 12, 5), torch.randn(2, 3, 12, 5)
    qk = QueryKey(q, k, 0.3)
    dense = attention_precision(qk.logits(), c["corr_nn"], c["corr_mask"], 2)
    for chunk in (None, 5):
        assert attention_precision(qk, c["corr_nn"], c["corr_mask"], 2, query_chunk=chunk).item() == dense.item()


@pytest.mark.slow
def test_measure_supervised_layer_small() -> None:
    r = measure_supervised_layer("cpu", batch=1, views=3, heads=2, head_dim=8, grid=4, query_chunk=8, repeats=1)
    assert r["dense"]["peak_bytes"] > 0 and r["chunked"]["peak_bytes"] > 0
    assert r["dense"]["seconds"] > 0 and r["chunked"]["seconds"] > 0
    assert r["dense"]["loss"] == pytest.approx(r["chunked"]["loss"], rel=1e-5)
    assert r["grad_max_rel_diff"] < 1e-4
    with pytest.raises(SchemaError, match="mode"):
        measure_supervised_layer("cpu", mode="global")


# ------------------------------------------------------------------- skips and the official numerics
@pytest.mark.parametrize("mode", LOSS_MODES)
def test_a_skipped_loss_can_be_none(mode: str) -> None:
    """``when_skipped="none"``: no term (``None``) where the default returns the connected 0; otherwise the
    same value."""
    c = _case(seed=5)
    fn = _official if mode == "official" else _paper
    assert fn(c, when_skipped="none")(c["logits"], c["head_mlp"]) == fn(c)(c["logits"], c["head_mlp"])
    empty = dict(c, corr_mask=torch.zeros_like(c["corr_mask"]))
    assert fn(empty, when_skipped="none")(c["logits"], c["head_mlp"]) is None
    assert fn(empty)(c["logits"], c["head_mlp"]).item() == 0.0
    with pytest.raises(SchemaError, match="when_skipped"):
        fn(c, when_skipped="drop")(c["logits"], c["head_mlp"])


def test_head_mlp_computes_in_its_input_dtype_with_cast_weights() -> None:
    """bf16 weights on fp64/fp32 input compute in the input's dtype with the weights upcast (what the
    official run's fp32 autocast does to its bf16 head); the float64 reference is written out with the
    bf16-rounded weights. The gradients reach the bf16 weights."""
    torch.manual_seed(0)
    mlp = HeadMLP(5).to(torch.bfloat16)
    x = torch.randn(7, 5, dtype=torch.float64)
    (w1, b1), (w2, b2) = [(m.weight.double(), m.bias.double()) for m in (mlp.net[0], mlp.net[2])]
    h = x @ w1.T + b1
    ref = (0.5 * h * (1 + torch.erf(h / math.sqrt(2)))) @ w2.T + b2
    out = mlp(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref[:, 0], rtol=1e-12, atol=1e-12)
    out32 = mlp(x.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref[:, 0], rtol=1e-5, atol=1e-6)
    out32.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in mlp.parameters())


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).double()


def test_bf16_logits_of_query_key() -> None:
    """``logit_dtype=bf16``: ``q k^T`` and the scaling in bf16 (as under the official layer's bf16 autocast),
    returned in fp32: within one bf16 unit of the float64 value rounded after each operation. The CAMEO
    loss on them equals the loss on those logits given densely, chunked or not."""
    g = torch.Generator().manual_seed(3)
    B, H, Fv, hw, d = 2, 3, 3, 4, 8
    q = torch.randn(B, H, Fv * hw, d, generator=g) * 2
    k = torch.randn(B, H, Fv * hw, d, generator=g) * 2
    scale = d**-0.5
    qk = QueryKey(q, k, scale, torch.bfloat16)
    got = qk.logits()
    assert got.dtype == torch.float32 and qk.detach().logit_dtype == torch.bfloat16
    ref = _bf16(_bf16(_bf16(q) @ _bf16(k).transpose(-1, -2)) * scale)
    ulp = 2.0 ** (torch.floor(torch.log2(ref.abs().clamp_min(1e-30))) - 7)
    assert bool(((got.double() - ref).abs() <= ulp).all())
    assert float((got.double() == ref).double().mean()) > 0.9
    assert not torch.equal(got, QueryKey(q, k, scale).logits())  # the fp32 logits differ
    c = _case(B=B, H=H, Fv=Fv, hw=hw, seed=9, dtype=torch.float32)
    dense = _official(c)(got, c["head_mlp"])
    for chunk in (None, 3):
        torch.testing.assert_close(_official(c, query_chunk=chunk)(qk, c["head_mlp"]), dense, rtol=1e-5, atol=1e-6)
