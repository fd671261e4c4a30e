"""Tests of the multi-view diffusion model (cameo_corr.train.model)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from hypothesis import given, settings
from hypothesis import strategies as st

from cameo_corr.schemas import SchemaError, make_extrinsics, project
from cameo_corr.train.model import (
    SD21_UNET_CONFIG,
    IdentityCodec,
    MultiViewAttnProcessor,
    MultiViewUNet,
    VAECodec,
    _MultiViewState,
    build_model,
    camera_rays,
    layer_grid,
    normalize_cameras,
    noise_targets,
    plucker_rays,
    resolve_layer,
    self_attention_layers,
    tiny_unet_config,
)

LATENT_CH = 4


def _tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**tiny_unet_config(LATENT_CH, block_out_channels=(16, 32), attention_head_dim=4, cross_attention_dim=16))


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def _cameras(B: int, Fv: int, size: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    K = np.array([[0.9 * size, 0, 0.5 * size], [0, 0.95 * size, 0.48 * size], [0, 0, 1.0]])
    Es = [[make_extrinsics(_rotation(rng), rng.normal(size=3)) for _ in range(Fv)] for _ in range(B)]
    return torch.tensor(K, dtype=dtype).expand(B, Fv, 3, 3).clone(), torch.tensor(np.array(Es), dtype=dtype)


def _inputs(model: MultiViewUNet, B: int, Fv: int, hw: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    K, E = _cameras(B, Fv, hw * 8, seed)
    ref = torch.zeros(B, Fv, dtype=torch.bool)
    ref[:, 0] = True
    return {
        "latents": torch.randn(B, Fv, model.latent_channels, hw, hw, generator=g),
        "timesteps": torch.randint(0, 1000, (B,), generator=g),
        "plucker": camera_rays(K, E, model.ray_hw((hw, hw)), hw * 8),
        "ref_mask": ref,
    }


# ------------------------------------------------------------------------------ attention processor
@pytest.mark.parametrize("supervised", [False, True])
@pytest.mark.parametrize("qk_norm", [None, "layer_norm"])
def test_processor_matches_default_for_single_view(supervised: bool, qk_norm: str | None) -> None:
    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=4, dim_head=8, qk_norm=qk_norm)
    x = torch.randn(6, 20, 32)
    ref = AttnProcessor2_0()(attn, x)
    state = _MultiViewState(num_views=1, recording=True)
    out = MultiViewAttnProcessor(state, supervised=supervised)(attn, x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if not supervised:
        assert state.qk is None
        return
    # the handed-out q and k are the ones attended with: after norm_q / norm_k when the layer has them
    q = attn.to_q(x).reshape(6, 20, 4, 8).transpose(1, 2)
    k = attn.to_k(x).reshape(6, 20, 4, 8).transpose(1, 2)
    if qk_norm is not None:
        q, k = attn.norm_q(q), attn.norm_k(k)
    torch.testing.assert_close(state.qk.logits(), q @ k.transpose(-1, -2) / math.sqrt(8), atol=1e-5, rtol=1e-5)


def test_processor_equals_joint_attention_over_concatenated_views() -> None:
    torch.manual_seed(1)
    attn = Attention(query_dim=16, heads=2, dim_head=8)
    B, Fv, N = 2, 3, 5
    x = torch.randn(B * Fv, N, 16)
    out = MultiViewAttnProcessor(_MultiViewState(num_views=Fv))(attn, x)
    joint = AttnProcessor2_0()(attn, x.reshape(B, Fv * N, 16)).reshape(B * Fv, N, 16)
    torch.testing.assert_close(out, joint, atol=1e-5, rtol=1e-5)


def test_multiview_unet_single_view_equals_plain_unet() -> None:
    """F = 1 with the zero-initialised camera conv: exactly the pretrained UNet's prediction."""
    unet = _tiny_unet()
    plain = copy.deepcopy(unet)
    plain.set_attn_processor(AttnProcessor2_0())
    model = MultiViewUNet(unet, layer=2, camera_dropout=0.0).eval()
    inp = _inputs(model, B=3, Fv=1)
    with torch.no_grad():
        out = model(**inp)
        ref = plain(
            inp["latents"].flatten(0, 1),
            inp["timesteps"],
            encoder_hidden_states=model.null_embedding[None].expand(3, -1, -1),
        ).sample
    torch.testing.assert_close(out.sample.flatten(0, 1), ref, atol=1e-5, rtol=1e-4)


def test_views_mix_within_a_sample_but_not_across_samples() -> None:
    model = MultiViewUNet(_tiny_unet(), layer=0, camera_dropout=0.0).eval()
    inp = _inputs(model, B=2, Fv=3)
    with torch.no_grad():
        base = model(**inp, return_logits=False).sample
        moved = dict(inp, latents=inp["latents"].clone())
        moved["latents"][0, 2] += 1.0  # perturb view 2 of sample 0
        out = model(**moved, return_logits=False).sample
    assert (out[0, 0] - base[0, 0]).abs().max() > 1e-3  # view 0 of the same sample sees view 2
    torch.testing.assert_close(out[1], base[1], atol=1e-6, rtol=0)  # the other sample does not


def test_captured_logits_equal_manual_qk() -> None:
    model = MultiViewUNet(_tiny_unet(), layer="up_blocks.1.attentions.0", camera_dropout=0.0).eval()
    attn = model.unet.get_submodule(model.layer_name.removesuffix(".processor"))
    seen: list[torch.Tensor] = []
    handle = attn.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    B, Fv = 2, 3
    inp = _inputs(model, B=B, Fv=Fv)
    with torch.no_grad():
        out = model(**inp)
    handle.remove()
    gh, gw = model.grid((8, 8))
    assert (gh, gw) == (8, 8)
    N = gh * gw
    assert out.qk.shape == (B, attn.heads, Fv * N, Fv * N)
    hs = seen[0]  # [B*F, N, C]
    d = attn.to_q.out_features // attn.heads
    q = attn.to_q(hs).reshape(B, Fv * N, attn.heads, d).transpose(1, 2)
    k = attn.to_k(hs).reshape(B, Fv * N, attn.heads, d).transpose(1, 2)
    manual = q @ k.transpose(-1, -2) / math.sqrt(d)
    torch.testing.assert_close(out.qk.logits(), manual, atol=1e-5, rtol=1e-5)
    # the output does not depend on whether logits are requested
    with torch.no_grad():
        again = model(**inp, return_logits=False)
    assert again.qk is None
    torch.testing.assert_close(again.sample, out.sample, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logits_are_fp32_under_autocast(dtype: torch.dtype) -> None:
    """Mixed precision (accelerate autocast) must not coarsen the supervised logits: they are the fp32
    product of the layer's (half-precision) q and k, as the fp32 CAMEO loss needs."""
    model = MultiViewUNet(_tiny_unet(), layer="up_blocks.1.attentions.0", camera_dropout=0.0).eval()
    attn = model.unet.get_submodule(model.layer_name.removesuffix(".processor"))
    qk: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda mod, args, out: qk.append(out.detach())) for m in (attn.to_q, attn.to_k)]
    B, Fv = 2, 3
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        out = model(**_inputs(model, B=B, Fv=Fv))
    for h in hooks:
        h.remove()
    q, k = qk
    assert q.dtype == dtype  # the layer itself ran in half precision
    d = q.shape[-1] // attn.heads
    q, k = (x.float().reshape(B, -1, attn.heads, d).transpose(1, 2) for x in (q, k))
    assert out.qk.query.dtype == dtype  # handed out as computed (no fp32 copy of the layer's q, k)
    logits = out.qk.logits()
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, q @ k.transpose(-1, -2) * attn.scale, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_keeps_logit_gradients() -> None:
    model_a = MultiViewUNet(_tiny_unet(), layer=3, camera_dropout=0.0).train()
    model_b = copy.deepcopy(model_a)
    model_b.enable_gradient_checkpointing()
    inp = _inputs(model_a, B=1, Fv=2)
    grads = []
    for model in (model_a, model_b):
        out = model(**inp)
        (out.qk.logits().square().mean() + out.sample.mean()).backward()
        attn = model.unet.get_submodule(model.layer_name.removesuffix(".processor"))
        grads.append(attn.to_q.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_camera_conditioning_and_dropout() -> None:
    model = MultiViewUNet(_tiny_unet(), layer=0, camera_dropout=1.0)
    torch.nn.init.normal_(model.unet.conv_in.cond.weight, std=0.1)
    inp = _inputs(model, B=2, Fv=2)
    zero = dict(inp, plucker=torch.zeros_like(inp["plucker"]))
    with torch.no_grad():
        model.eval()
        cond = model(**inp, return_logits=False).sample
        uncond = model(**zero, return_logits=False).sample
        forced = model(**inp, drop_camera=torch.tensor([True, False]), return_logits=False).sample
        model.train()
        dropped = model(**inp, return_logits=False).sample
    assert (cond - uncond).abs().max() > 1e-4  # the rays matter once the conv is trained
    torch.testing.assert_close(dropped, uncond)  # p = 1 in training mode drops every sample's rays
    torch.testing.assert_close(forced[0], uncond[0])
    torch.testing.assert_close(forced[1], cond[1])


def test_noise_targets_keeps_references_clean() -> None:
    clean, noisy = torch.zeros(2, 3, 4, 2, 2), torch.ones(2, 3, 4, 2, 2)
    ref = torch.tensor([[True, False, False], [True, True, False]])
    out = noise_targets(clean, noisy, ref)
    assert out[0, 0].eq(0).all() and out[0, 1:].eq(1).all()
    assert out[1, :2].eq(0).all() and out[1, 2].eq(1).all()


# ------------------------------------------------------------------------------------ layer choice
def test_sd21_layer_index_10_is_up_blocks_2_attentions_0() -> None:
    with torch.device("meta"):  # architecture only: no 865M-parameter allocation
        unet = UNet2DConditionModel(**SD21_UNET_CONFIG)
    names = self_attention_layers(unet)
    assert len(names) == 16
    assert names[10] == "up_blocks.2.attentions.0.transformer_blocks.0.attn1.processor"
    assert resolve_layer(unet, 10) == resolve_layer(unet, "up_blocks.2.attentions.0") == names[10]
    # sorting all processors (attn1 + attn2) would point index 10 elsewhere: CAMEO's UNet has no attn2
    assert sorted(unet.attn_processors)[10] != names[10]
    assert unet.get_submodule(names[10].removesuffix(".processor")).heads == 10
    assert layer_grid(unet, 10, (64, 64)) == (32, 32)  # 512x512 images -> the default 32x32 cache grid
    assert layer_grid(unet, 0, (64, 64)) == (64, 64)
    assert layer_grid(unet, 6, (64, 64)) == (8, 8)  # mid block


def test_resolve_layer_errors_and_grid_check() -> None:
    unet = _tiny_unet()
    with pytest.raises(SchemaError, match="out of range"):
        resolve_layer(unet, 99)
    with pytest.raises(SchemaError, match="matches 2"):
        resolve_layer(unet, "up_blocks.0")
    with pytest.raises(SchemaError, match="matches no"):
        resolve_layer(unet, "nope")
    model = MultiViewUNet(unet, layer="mid_block")
    assert model.grid((8, 8)) == (4, 4)
    assert model.check_grid((8, 8), 4) == (4, 4)
    with pytest.raises(SchemaError, match="cache stores grid 8x8"):
        model.check_grid((8, 8), 8)
    # a multi-grid cache: the layer's grid is picked among the stored ones, or the error lists them and the cache
    assert model.check_grid((8, 8), ((8, 8), (4, 4))) == (4, 4)
    with pytest.raises(SchemaError, match=r"caches/a: .*stores grids 8x8, 16x16; .*--grid including 4"):
        model.check_grid((8, 8), ((8, 8), (16, 16)), cache="caches/a")


# --------------------------------------------------------------------------------------- cameras
def test_plucker_rays_geometry() -> None:
    K, E = _cameras(1, 2, 64, seed=3)
    h, w = 4, 8
    rays = plucker_rays(K[0], E[0], h, w, (48, 64)).double()  # [2, 6, h, w]
    assert rays.shape == (2, 6, h, w)
    d, m = rays[:, :3], rays[:, 3:]
    torch.testing.assert_close(d.norm(dim=1), torch.ones(2, h, w, dtype=torch.float64))
    for v in range(2):
        Kv, Ev = K[0, v].double().numpy(), E[0, v].double().numpy()
        o = -Ev[:3, :3].T @ Ev[:3, 3]
        for r, c in [(0, 0), (3, 7), (2, 5)]:
            dv = d[v, :, r, c].numpy()
            np.testing.assert_allclose(m[v, :, r, c].numpy(), np.cross(o, dv), atol=1e-5)
            X = o + 2.5 * dv  # a point on the ray
            uv, z = project(X, Kv, Ev)
            np.testing.assert_allclose(uv, [(c + 0.5) * 64 / w, (r + 0.5) * 48 / h], atol=1e-3)
            assert z > 0
            np.testing.assert_allclose(np.cross(X, dv), m[v, :, r, c].numpy(), atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(0.1, 10.0))
def test_camera_rays_invariant_to_world_similarity(seed: int, scale: float) -> None:
    K, E = _cameras(1, 3, 32, seed)
    rng = np.random.default_rng(seed + 1)
    S = torch.tensor(make_extrinsics(_rotation(rng), rng.normal(size=3))).float()  # new world -> old world
    E2 = E @ S
    E2[..., :3, 3] *= scale  # world coordinates scaled by `scale`
    a = camera_rays(K, E, (4, 4), 32)
    b = camera_rays(K, E2, (4, 4), 32)
    torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)
    n = normalize_cameras(E2)
    torch.testing.assert_close(n[0, 0], torch.eye(4), atol=1e-5, rtol=0)
    centres = -(n[0, :, :3, :3].transpose(-1, -2) @ n[0, :, :3, 3:])[..., 0]
    assert abs(centres.norm(dim=-1).max().item() - 1.0) < 1e-4



@pytest.mark.parametrize("norm", ["first_view", "official", "none"])
def test_camera_rays_are_float32_inside_an_autocast_region(norm: str) -> None:
    """Rays computed where the caller runs under bf16 autocast (as the GPU selfcheck's trainer step did)
    equal the fp32 ones bit for bit: the camera maths leaves autocast (on CUDA, its bf16 products and
    fp32 norm fed ``linalg.cross`` mixed dtypes)."""
    K, E = _cameras(2, 3, 32, seed=3)
    reference = camera_rays(K, E, (4, 4), 32, norm=norm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = camera_rays(K, E, (4, 4), 32, norm=norm)
        normalized = normalize_cameras(E)
    assert got.dtype == torch.float32 and normalized.dtype == E.dtype
    assert torch.equal(got, reference)
    assert torch.equal(normalized, normalize_cameras(E))

# ------------------------------------------------------------------------------- codecs and builder
def test_identity_codec_round_trip() -> None:
    codec = IdentityCodec(4)
    img = torch.rand(2, 3, 3, 16, 24)
    z = codec.encode(img)
    assert z.shape == (2, 3, 48, 4, 6) and codec.latent_channels == 48
    torch.testing.assert_close(codec.decode(z), img)
    assert codec.latent_size((16, 24)) == (4, 6)
    with pytest.raises(SchemaError, match="not a multiple"):
        codec.latent_size((18, 24))


def test_build_model_tiny_and_pretrained_dir(tmp_path) -> None:
    model, codec = build_model(layer="up_blocks.1.attentions.0")
    assert isinstance(codec, IdentityCodec) and model.latent_channels == codec.latent_channels == 192
    assert model.grid(codec.latent_size((64, 64))) == (8, 8)
    with pytest.raises(SchemaError, match="model.options.bogus"):
        build_model(bogus=1)
    with pytest.raises(SchemaError, match="unet/config.json"):
        build_model(pretrained=tmp_path / "missing")

    # a local diffusers directory with unet/ and vae/ subfolders is loaded as the pretrained model
    unet = _tiny_unet(seed=5)
    unet.save_pretrained(tmp_path / "sd" / "unet")
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=LATENT_CH,
    )
    vae.save_pretrained(tmp_path / "sd" / "vae")
    model, codec = build_model(pretrained=tmp_path / "sd", vae="pretrained", layer=4, gradient_checkpointing=True)
    assert isinstance(codec, VAECodec) and codec.factor == 8
    torch.testing.assert_close(model.unet.conv_in.conv.weight, unet.conv_in.weight)
    img = torch.rand(1, 2, 3, 64, 64)
    z = codec.encode(img, generator=torch.Generator().manual_seed(0))
    assert z.shape == (1, 2, LATENT_CH, 8, 8)
    assert codec.decode(z).shape == img.shape
    K, E = _cameras(1, 2, 64)
    out = model(z, torch.tensor([3]), plucker=camera_rays(K, E, (8, 8), 64), ref_mask=torch.tensor([[True, False]]))
    gh, gw = model.grid((8, 8))
    assert (gh, gw) == (4, 4)  # index 4 of the tiny UNet: up_blocks.0.attentions.1, after one downsampler
    assert out.sample.shape == z.shape and out.qk.shape[-1] == 2 * gh * gw
