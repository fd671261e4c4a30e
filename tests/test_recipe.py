"""The official CAMEO model recipe as config switches (cameo_corr.train.model / config / loop).

Each switch is checked against an independent reference written from the official code's rules
(float64 where numbers are compared); the SD2.1 preset is built on the real SD2.1 UNet config
without allocating its weights (fake tensors for the forward, the meta device for the layout).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from cameo_corr.schemas import SchemaError, make_extrinsics
from cameo_corr.train.config import load_config
from cameo_corr.train.loop import compute_losses, make_noise_scheduler
from cameo_corr.train.model import (
    SD21_UNET_CONFIG,
    IdentityCodec,
    MultiViewAttnProcessor,
    MultiViewUNet,
    _PixelCondEncoder,
    camera_rays,
    domain_labels,
    layer_grid,
    normalize_cameras_official,
    self_attention_layers,
    tiny_unet_config,
)
from test_model import _cameras, _inputs, _rotation

DOMAINS = {"re10k": 0, "co3d": 1, "others": 2}


def _unet(seed: int = 0, channels: int = 4) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**tiny_unet_config(channels, block_out_channels=(16, 32), attention_head_dim=4, cross_attention_dim=16))


def _attention_reference(attn: Attention, x: torch.Tensor, views: int) -> torch.Tensor:
    """float64 self-attention of ``x`` [B*F, N, C] over groups of ``views`` frames, LayerNorm on q and k
    per head when the module has it (the official processor's order: project, split heads, norm)."""
    bf, n, c = x.shape
    x = x.double().reshape(bf // views, views * n, c)
    heads = attn.heads
    d = attn.inner_dim // heads

    def lin(layer: nn.Linear, t: torch.Tensor) -> torch.Tensor:
        out = t @ layer.weight.double().T
        return out + layer.bias.double() if layer.bias is not None else out

    def norm(ln: nn.LayerNorm | None, t: torch.Tensor) -> torch.Tensor:
        if ln is None:
            return t
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + ln.eps) * ln.weight.double() + ln.bias.double()

    q, k, v = (lin(layer, x).reshape(x.shape[0], -1, heads, d).transpose(1, 2) for layer in (attn.to_q, attn.to_k, attn.to_v))
    q, k = norm(attn.norm_q, q), norm(attn.norm_k, k)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    out = (p @ v).transpose(1, 2).reshape(x.shape[0], -1, heads * d)
    return lin(attn.to_out[0], out).reshape(bf, n, c)


# ----------------------------------------------------------------------------------------- qk_norm
def test_qk_norm_is_layer_norm_on_queries_and_keys_of_every_attention_layer() -> None:
    model = MultiViewUNet(_unet(), layer="mid_block", qk_norm=True, frame_local_width=16, camera_dropout=0.0)
    attns = [m for m in model.unet.modules() if isinstance(m, Attention)]
    assert attns and all(isinstance(a.norm_q, nn.LayerNorm) and isinstance(a.norm_k, nn.LayerNorm) for a in attns)
    for a in attns:  # what diffusers' Attention(qk_norm="layer_norm") builds: LayerNorm(head_dim, eps=1e-5), affine
        assert a.norm_q.normalized_shape == (a.inner_dim // a.heads,) and a.norm_q.eps == 1e-5 and a.norm_q.elementwise_affine
    assert any(a.norm_q is not None for a in _unet().modules() if isinstance(a, Attention)) is False
    torch.manual_seed(3)
    for name in self_attention_layers(model.unet):  # both processor kinds apply the norms, as the reference does
        attn = model.unet.get_submodule(name.removesuffix(".processor"))
        for ln in (attn.norm_q, attn.norm_k):
            nn.init.normal_(ln.weight, 1.0, 0.3)
            nn.init.normal_(ln.bias, 0.0, 0.3)
        views = 1 if name in model.frame_local_layers else 3
        model._state.num_views = 3
        x = torch.randn(6, 5, attn.query_dim)
        with torch.no_grad():
            out = attn(x)
        torch.testing.assert_close(out.double(), _attention_reference(attn, x, views), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------ text cross-attention
def test_no_text_cross_attn_removes_attn2_and_the_null_embedding() -> None:
    model = MultiViewUNet(_unet(), layer=0, no_text_cross_attn=True, camera_dropout=0.0).eval()
    blocks = [m for m in model.unet.modules() if isinstance(m, BasicTransformerBlock)]
    assert blocks and all(b.attn2 is None and b.norm2 is None for b in blocks)
    assert sorted(model.unet.attn_processors) == self_attention_layers(model.unet)  # CAMEO's index space
    assert model.null_embedding is None and not any("null_embedding" in n for n, _ in model.named_parameters())
    inp = _inputs(model, 2, 3)
    with torch.no_grad():
        out = model(**inp)
    assert torch.isfinite(out.sample).all()
    with pytest.raises(ValueError, match="no text cross-attention"):
        model(**inp, encoder_hidden_states=torch.zeros(2, 1, 16))
    kept = MultiViewUNet(_unet(), layer=0)
    assert kept.null_embedding is not None and all(b.attn2 is not None for b in kept.unet.modules() if isinstance(b, BasicTransformerBlock))


# ------------------------------------------------------------------------------- frame-local layers
def test_layers_of_the_frame_local_width_attend_within_each_frame() -> None:
    model = MultiViewUNet(_unet(), layer="up_blocks.0.attentions.0", frame_local_width=16, camera_dropout=0.0).eval()
    assert model.frame_local_layers == [n for n in self_attention_layers(model.unet) if n.startswith(("down_blocks.0", "up_blocks.1"))]
    procs = model.unet.attn_processors
    for name in self_attention_layers(model.unet):
        local = name in model.frame_local_layers
        assert isinstance(procs[name], AttnProcessor2_0 if local else MultiViewAttnProcessor), name
        attn = model.unet.get_submodule(name.removesuffix(".processor"))
        model._state.num_views = 2
        x = torch.randn(4, 6, attn.query_dim)
        moved = x.clone()
        moved[1] += 1.0  # frame 1 of sample 0
        with torch.no_grad():
            a, b = attn(x), attn(moved)
        assert torch.equal(a[2:], b[2:])  # never across samples
        if local:
            assert torch.equal(a[0], b[0])  # frame 0 does not see frame 1
        else:
            assert (a[0] - b[0]).abs().max() > 1e-4
    with pytest.raises(SchemaError, match="must attend across views"):
        MultiViewUNet(_unet(), layer="down_blocks.0.attentions.0", frame_local_width=16)


# ------------------------------------------------------------------------------ domain embedding
def test_domain_embedding_is_zero_initialised_and_selected_by_the_dataset_tag() -> None:
    assert domain_labels(["re10k", "co3d", "dl3dv", "others"], DOMAINS).tolist() == [0, 1, 2, 2]
    plain = MultiViewUNet(_unet(seed=4), layer=0, camera_dropout=0.0).eval()
    model = MultiViewUNet(_unet(seed=4), layer=0, domain_dict=DOMAINS, camera_dropout=0.0).eval()
    model.null_embedding.data.copy_(plain.null_embedding.data)
    emb = model.unet.class_embedding
    assert isinstance(emb, nn.Embedding) and emb.weight.shape == (3, model.unet.time_embedding.linear_2.out_features)
    assert emb.weight.eq(0).all() and model.unet.config.num_class_embeds == 3
    inp = _inputs(model, 3, 3)
    labels = domain_labels(["re10k", "co3d", "scannet"], DOMAINS)
    with torch.no_grad():
        base = plain(**inp, return_logits=False).sample
        torch.testing.assert_close(model(**inp, class_labels=labels, return_logits=False).sample, base)  # zero init
        emb.weight[1].normal_()
        out = model(**inp, class_labels=labels, return_logits=False).sample
    torch.testing.assert_close(out[[0, 2]], base[[0, 2]])
    assert (out[1] - base[1]).abs().max() > 1e-3  # only the co3d sample's timestep embedding moved
    with pytest.raises(ValueError, match="class_labels"):
        model(**inp)
    with pytest.raises(ValueError, match="no domain embedding"):
        plain(**inp, class_labels=labels)
    with pytest.raises(SchemaError, match="others"):
        MultiViewUNet(_unet(), layer=0, domain_dict={"re10k": 0})
    with pytest.raises(SchemaError, match="0..n-1"):
        MultiViewUNet(_unet(), layer=0, domain_dict={"re10k": 0, "others": 2})


# -------------------------------------------------------------------------------- pixel encoder
def test_pixel_encoder_layout_mask_first_and_zero_initialised() -> None:
    enc = _PixelCondEncoder(7, 16)
    convs = [m for m in enc.body if isinstance(m, nn.Conv2d)]
    norms = [m for m in enc.body if isinstance(m, nn.GroupNorm)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [(7, 32, 1), (32, 64, 2), (64, 128, 2), (128, 256, 2)]
    assert [(n.num_groups, n.eps) for n in norms] == [(8, 1e-6), (16, 1e-6), (32, 1e-6), (64, 1e-6)]
    assert enc.out.weight.eq(0).all() and enc.out.bias.eq(0).all() and enc(torch.randn(1, 7, 64, 64)).shape == (1, 16, 8, 8)

    plain = MultiViewUNet(_unet(seed=2), layer=0, camera_dropout=0.0).eval()
    model = MultiViewUNet(_unet(seed=2), layer=0, cond_encoder="pixel", camera_dropout=0.0).eval()
    model.null_embedding.data.copy_(plain.null_embedding.data)
    assert model.ray_hw((8, 8)) == (64, 64)
    inp = _inputs(model, 2, 3)
    seen: list[torch.Tensor] = []
    model.unet.conv_in.cond.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    plain_inp = dict(inp, plucker=torch.zeros(2, 3, 6, 8, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(**inp, return_logits=False).sample, plain(**plain_inp, return_logits=False).sample)
        model(**inp, drop_camera=torch.tensor([True, False]), return_logits=False)
    mask = (~inp["ref_mask"]).float()  # official: 1 marks the views to generate
    for cond in seen:
        assert cond.shape == (6, 7, 64, 64)
        assert torch.equal(cond[:, 0], mask.reshape(6, 1, 1).expand(6, 64, 64))
    assert torch.equal(seen[0][:, 1:], inp["plucker"].flatten(0, 1))
    assert seen[1][:3, 1:].eq(0).all() and torch.equal(seen[1][3:, 1:], seen[0][3:, 1:])  # rays dropped, mask kept
    with pytest.raises(ValueError, match="plucker must be"):
        model(**dict(inp, plucker=torch.zeros(2, 3, 6, 8, 8)))
    with pytest.raises(SchemaError, match="downsamples 8x"):
        MultiViewUNet(_unet(), layer=0, cond_encoder="pixel", latent_factor=4)


# ---------------------------------------------------------------------------- camera normalisation
def _official_rays_reference(K: np.ndarray, E: np.ndarray, H: int, W: int) -> np.ndarray:
    """The official batch_sample_rays + embed_rays written out with loops, float64: [B, F, 6, H, W]."""
    B, Fv = E.shape[:2]
    out = np.zeros((B, Fv, 6, H, W))
    for b in range(B):
        last_c2w = np.linalg.inv(E[b, -1])
        c2ws = [np.linalg.inv(last_c2w @ E[b, f]) for f in range(Fv)]
        farthest = max(abs(c[i, 3]) for c in c2ws for i in range(3))
        for f in range(Fv):
            o = c2ws[f][:3, 3] / (farthest + 1e-8)
            Kinv = np.linalg.inv(K[b, f])
            for r in range(H):
                for c in range(W):
                    d = c2ws[f][:3, :3] @ (Kinv @ np.array([c - 0.5, r + 0.5, 1.0]))
                    d = d / np.linalg.norm(d)
                    out[b, f, :3, r, c] = d
                    out[b, f, 3:, r, c] = np.cross(o, d)
    return out


def test_official_camera_normalisation_matches_the_official_rules() -> None:
    H, W = 5, 7
    K, E = _cameras(2, 3, 6, seed=5, dtype=torch.float64)
    got = camera_rays(K, E, (H, W), (H, W), norm="official")
    torch.testing.assert_close(got, torch.from_numpy(_official_rays_reference(K.numpy(), E.numpy(), H, W)), atol=1e-10, rtol=1e-10)
    n = normalize_cameras_official(E)
    torch.testing.assert_close(n[:, -1], torch.eye(4, dtype=torch.float64).expand(2, 4, 4), atol=1e-12, rtol=0)
    # unlike first_view, the official left product depends on the world frame the dataset chose
    G = torch.from_numpy(make_extrinsics(_rotation(np.random.default_rng(9)), np.array([0.3, -1.0, 2.0])))
    moved = E @ torch.linalg.inv(G)
    torch.testing.assert_close(camera_rays(K, moved, (H, W), (H, W)), camera_rays(K, E, (H, W), (H, W)), atol=1e-9, rtol=1e-9)
    assert (camera_rays(K, moved, (H, W), (H, W), norm="official") - got).abs().max() > 1e-3
    with pytest.raises(SchemaError, match="model.camera_norm"):
        camera_rays(K, E, (H, W), (H, W), norm="bogus")


# ------------------------------------------------------------------------------------- scheduler
def test_snr_rescale_and_zero_terminal_snr_betas() -> None:
    cfg = load_config(None, ["diffusion.beta_schedule=snr_rescale", "diffusion.snr_rescale=4", "diffusion.rescale_betas_zero_snr=true"])
    sched = make_noise_scheduler(cfg)
    T = 1000
    beta = np.linspace(0.00085**0.5, 0.012**0.5, T) ** 2
    beta = 2 * beta / (1 + beta)  # 1 / ((1 - b) / b / sqrt(4) + 1)
    sab = np.sqrt(np.cumprod(1 - beta))  # zero terminal SNR (Lin et al. 2023, algorithm 1)
    sab = (sab - sab[-1]) * sab[0] / (sab[0] - sab[-1])
    np.testing.assert_allclose(sched.alphas_cumprod.double().numpy(), sab**2, rtol=1e-4, atol=1e-7)
    assert sched.alphas_cumprod[-1] == 0 and sched.config.rescale_betas_zero_snr
    plain = make_noise_scheduler(load_config(None))
    assert plain.alphas_cumprod[-1] > 0 and not plain.config.rescale_betas_zero_snr
    with pytest.raises(SchemaError, match="diffusion.snr_rescale"):
        load_config(None, ["diffusion.snr_rescale=4"])


# ------------------------------------------------------------------------------------ the loop
class _Stop(Exception):
    """Raised by a probing :class:`_Recorder` once the call is recorded."""


class _Recorder(nn.Module):
    """Wraps the real model and records the keyword arguments of its calls; with ``probe`` it stops the
    step right after recording (to sample many steps' conditioning draws cheaply)."""

    def __init__(self, model: MultiViewUNet) -> None:
        super().__init__()
        self.model = model
        self.calls: list[dict] = []
        self.probe = False

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, **kwargs):
        self.calls.append({"timesteps": timesteps, **kwargs})
        if self.probe:
            raise _Stop
        return self.model(latents, timesteps, **kwargs)


def _drops(rec: _Recorder, cfg, batch: dict, seeds: range) -> list[torch.Tensor]:
    """The camera-dropout vectors ``compute_losses`` draws for the given step seeds."""
    rec.probe, start = True, len(rec.calls)
    for seed in seeds:
        with pytest.raises(_Stop):
            compute_losses(rec, None, IdentityCodec(8), make_noise_scheduler(cfg), batch, cfg, (8, 8), torch.Generator().manual_seed(seed))
    rec.probe = False
    return [c["drop_camera"] for c in rec.calls[start:]]


def _batch(B: int = 4, Fv: int = 3, size: int = 64, grid: int = 8) -> dict:
    g = torch.Generator().manual_seed(0)
    K, E = _cameras(B, Fv, size, seed=1)
    hw = grid * grid
    return {
        "image": torch.rand(B, Fv, 3, size, size, generator=g), "intrinsic": K, "extrinsic": E,
        "tag": ["re10k", "co3d", "dl3dv", "re10k"][:B], "num_ref": torch.tensor([1, 2, 1, 1][:B]),
        "corr_nn": torch.randint(0, hw, (B, Fv, Fv, hw), generator=g), "corr_mask": torch.rand(B, Fv, Fv, hw, generator=g) < 0.5,
        "corr_dist": torch.rand(B, Fv, Fv, hw, generator=g),
    }


def test_loop_applies_the_recipe_switches() -> None:
    official = ["model.ref_timestep=sample", "model.cond_dropout_scope=batch", "model.cond_dropout=0.5", "model.camera_norm=official",
                "model.cond_encoder=pixel", "model.domain_dict={re10k: 0, co3d: 1, others: 2}", "model.no_text_cross_attn=true",
                "model.qk_norm=true", "model.frame_local_width=32", "model.layer=up_blocks.0.attentions.0"]
    for overrides in ([], official):
        cfg = load_config("tiny_cpu", overrides)
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**tiny_unet_config(192))
        model = MultiViewUNet(unet, layer=cfg.model.layer, camera_dropout=cfg.model.cond_dropout, **cfg.model.recipe())
        batch = _batch(grid=model.grid((8, 8))[0])
        rec = _Recorder(model)
        with torch.no_grad():
            m = compute_losses(rec, None, IdentityCodec(8), make_noise_scheduler(cfg), batch, cfg, model.grid((8, 8)),
                               torch.Generator().manual_seed(0))
        assert torch.isfinite(m["loss"]) and torch.isfinite(m["diffusion"])
        call = rec.calls[0]
        ref = torch.arange(3)[None] < batch["num_ref"][:, None]
        if not overrides:
            assert call["timesteps"].shape == (4, 3) and call["timesteps"][ref].eq(0).all() and call["class_labels"] is None
            torch.testing.assert_close(call["plucker"], camera_rays(batch["intrinsic"], batch["extrinsic"], (8, 8), (64, 64)))
        else:
            assert call["timesteps"].shape == (4,)  # the sample's timestep on references too
            assert call["class_labels"].tolist() == [0, 1, 2, 0]
            torch.testing.assert_close(call["plucker"], camera_rays(batch["intrinsic"], batch["extrinsic"], (64, 64), (64, 64), norm="official"))
            drops = _drops(rec, cfg, batch, range(1, 25))
            assert all(bool(d.all()) or not bool(d.any()) for d in drops)  # one draw for the whole batch
            assert any(bool(d.all()) for d in drops) and any(not bool(d.any()) for d in drops)
    cfg = load_config("tiny_cpu", ["model.cond_dropout=0.5"])
    drops = _drops(_Recorder(model), cfg, _batch(), range(24))
    assert any(0 < int(d.sum()) < 4 for d in drops)  # independent draws per sample


def test_recipe_config_errors_name_the_key() -> None:
    for override, key in (("model.cond_encoder=conv", "model.cond_encoder"), ("model.camera_norm=last", "model.camera_norm"),
                          ("model.cond_dropout_scope=step", "model.cond_dropout_scope"), ("model.ref_timestep=one", "model.ref_timestep"),
                          ("model.domain_dict={re10k: 0}", "model.domain_dict"), ("model.domain_dict={re10k: x, others: 1}", "model.domain_dict"),
                          ("model.frame_local_width=0", "model.frame_local_width"), ("model.cond_dropout=1.5", "model.cond_dropout")):
        with pytest.raises(SchemaError, match=key.replace(".", r"\.")):
            load_config(None, [override])
    cfg = load_config("sd21_cameo", ["model.domain_dict={a: 0, others: 1}"])
    assert cfg.model.domain_dict == {"a": 0, "others": 1}  # an override replaces the mapping, it does not merge


# ------------------------------------------------------------------------------ the SD2.1 preset
def test_sd21_preset_builds_the_official_recipe_on_the_sd21_unet() -> None:
    """The preset on the real SD2.1 UNet config: layout on the meta device, one forward on fake tensors
    (shapes through the real code, no 865M-parameter allocation), and the 320-channel layers' processors
    run on materialised copies of those layers."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg = load_config("sd21_cameo")
    m = cfg.model
    assert (m.qk_norm, m.no_text_cross_attn, m.frame_local_width, m.cond_encoder, m.camera_norm, m.ref_timestep) == (
        True, True, 320, "pixel", "official", "sample")
    assert m.domain_dict == DOMAINS and (m.cond_dropout, m.cond_dropout_scope) == (0.1, "batch")
    o, d = cfg.optim, cfg.diffusion
    assert (o.lr, o.warmup_steps, o.lr_scheduler, o.weight_decay, o.max_grad_norm, o.betas, o.eps) == (
        2.5e-5, 500, "constant_with_warmup", 0.01, 1.0, (0.9, 0.999), 1e-8)
    assert (d.beta_schedule, d.snr_rescale, d.rescale_betas_zero_snr, d.prediction_type) == ("snr_rescale", 4.0, True, "v_prediction")
    assert cfg.data.resolution == 512 and cfg.data.num_views == 4

    def build() -> MultiViewUNet:
        unet = UNet2DConditionModel(**SD21_UNET_CONFIG)
        return MultiViewUNet(unet, layer=m.layer, camera_dropout=m.cond_dropout, latent_factor=8, **m.recipe())

    with torch.device("meta"):
        model = build()
    unet = model.unet
    assert model.layer_name == "up_blocks.2.attentions.0.transformer_blocks.0.attn1.processor"
    assert sorted(unet.attn_processors)[10] == model.layer_name  # CAMEO's index 10, no attn2 in the sorted list
    assert model.heads == 10 and layer_grid(unet, m.layer, (64, 64)) == (32, 32)
    assert model.frame_local_layers == [f"{b}.attentions.{i}.transformer_blocks.0.attn1.processor"
                                        for b, n in (("down_blocks.0", 2), ("up_blocks.3", 3)) for i in range(n)]
    attns = [a for a in unet.modules() if isinstance(a, Attention)]
    assert len(attns) == 16 and all(a.norm_q is not None and a.norm_k is not None for a in attns)
    assert unet.class_embedding.weight.shape == (3, 1280) and isinstance(unet.conv_in.cond, _PixelCondEncoder)
    procs = unet.attn_processors
    for name in self_attention_layers(unet):
        attn = unet.get_submodule(name.removesuffix(".processor"))
        local = attn.inner_dim == 320
        assert (name in model.frame_local_layers) == local
        assert isinstance(procs[name], AttnProcessor2_0 if local else MultiViewAttnProcessor)
    for name in (model.frame_local_layers[0], model.layer_name):  # run the real processors on real copies
        attn = unet.get_submodule(name.removesuffix(".processor")).to_empty(device="cpu")
        torch.manual_seed(0)
        for p in attn.parameters():
            nn.init.normal_(p, 0.0, 0.05)
        model._state.num_views = 2
        x = torch.randn(2, 16, attn.query_dim)
        moved = x.clone()
        moved[1] += 1.0
        with torch.no_grad():
            same = torch.equal(attn(x)[0], attn(moved)[0])
        assert same == (name in model.frame_local_layers)

    with FakeTensorMode():
        fake = build()
        B, Fv = 1, 2
        out = fake(torch.randn(B, Fv, 4, 64, 64), torch.tensor([500]), plucker=torch.randn(B, Fv, 6, 512, 512),
                   ref_mask=torch.tensor([[True, False]]), class_labels=torch.tensor([1]))
    assert out.sample.shape == (B, Fv, 4, 64, 64)
    assert out.qk.shape == (B, 10, Fv * 32 * 32, Fv * 32 * 32) and out.qk.query.shape[-1] == 64  # 10 heads of 64
