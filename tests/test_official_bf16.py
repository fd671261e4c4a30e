"""``train.precision: official_bf16``: the official run's numerics (bf16 weights with fp32 masters, bf16
latents, noise and targets), against float64 references that round after every operation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from cameo_corr.schemas import SchemaError
from cameo_corr.train.config import load_config, preset_path
from cameo_corr.train.model import VAECodec
from cameo_corr.train.precision import MasterWeights, encode_latents

BF16 = torch.bfloat16


def _bf16(x: torch.Tensor) -> torch.Tensor:
    """Round to bf16, back in float64."""
    return x.to(BF16).to(torch.float64)


def _within_one_bf16_unit(got: torch.Tensor, ref: torch.Tensor) -> bool:
    ulp = 2.0 ** (torch.floor(torch.log2(ref.abs().clamp_min(1e-30))) - 7)
    return bool(((got.double() - ref).abs() <= ulp).all())


def test_master_weights_keep_fp32_copies_of_a_bf16_module(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 3), nn.GELU(), nn.Linear(3, 2))
    frozen = nn.Linear(2, 2).requires_grad_(False)
    module.append(frozen)
    original = {n: p.detach().clone() for n, p in module.named_parameters()}
    master = MasterWeights(module)
    assert master.names == ["0.weight", "0.bias", "2.weight", "2.bias"]  # trainable parameters only
    assert all(p.dtype == BF16 for p in module.parameters()) and all(m.dtype == torch.float32 for m in master.params)
    assert all(torch.equal(m, original[n]) for n, m in zip(master.names, master.params))
    module(torch.randn(5, 4, dtype=BF16)).sum().backward()
    master.take_grads()
    assert all(p.grad is None for p in module.parameters())
    assert all(m.grad is not None and m.grad.dtype == torch.float32 for m in master.params)
    with torch.no_grad():
        for m in master.params:
            m.add_(1e-3)
    master.to_model()
    for n, p in module.named_parameters():
        if n in master.names:
            assert torch.equal(p, master.params[master.names.index(n)].detach().to(BF16))
    assert master.subset("2.") == master.params[2:]
    master.save(tmp_path / "m.safetensors")
    other = MasterWeights(nn.Sequential(nn.Linear(4, 3), nn.GELU(), nn.Linear(3, 2), nn.Linear(2, 2).requires_grad_(False)))
    other.load(tmp_path / "m.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(other.params, master.params))
    with pytest.raises(SchemaError, match="2.bias"):
        other.load_state_dict({k: v for k, v in master.state_dict().items() if k != "2.bias"}, where="ckpt")
    with pytest.raises(SchemaError, match="0.weight.*expected float32"):
        other.load_state_dict({k: v.double() for k, v in master.state_dict().items()})
    with pytest.raises(SchemaError, match="master weights, and this file is missing"):
        other.load(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("prediction", ["v_prediction", "epsilon"])
def test_official_diffusion_inputs_are_bf16_and_follow_the_rules(prediction: str) -> None:
    """Identity latents rounded to bf16, noise drawn in bf16, ``add_noise`` and the velocity computed in bf16
    (each product and sum rounded), references clean; the fp32 path keeps fp32."""
    from cameo_corr.train.loop import diffusion_inputs, make_noise_scheduler
    from cameo_corr.train.model import IdentityCodec

    overrides = [f"diffusion.prediction_type={prediction}", "diffusion.beta_schedule=snr_rescale", "diffusion.snr_rescale=4",
                 "diffusion.rescale_betas_zero_snr=true"]
    cfg16 = load_config(preset_path("tiny_cpu"), ["train.precision=official_bf16", "train.mixed_precision=bf16", *overrides])
    cfg32 = load_config(preset_path("tiny_cpu"), overrides)
    codec, scheduler = IdentityCodec(8), make_noise_scheduler(cfg16)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 4, 3, 32, 32, generator=g)
    ref_mask = torch.tensor([[True, False, False, False], [True, True, False, False], [True, True, True, False]])
    got = diffusion_inputs(codec, scheduler, images, ref_mask, cfg16, torch.Generator().manual_seed(5))
    assert {x.dtype for x in (got.latents, got.model_input, got.target)} == {BF16}

    replay = torch.Generator().manual_seed(5)  # the identity codec draws nothing: timesteps, then noise
    t = torch.randint(0, 1000, (3,), generator=replay)
    noise = torch.randn(got.latents.shape, generator=replay, dtype=BF16).double()
    assert torch.equal(got.timesteps, t)
    x = _bf16(codec.encode(images).double())
    assert torch.equal(got.latents.double(), x)
    a = _bf16(scheduler.alphas_cumprod.double())[t][:, None, None, None, None]
    sa, sb = _bf16(a.sqrt()), _bf16(_bf16(1 - a).sqrt())
    noisy = _bf16(_bf16(sa * x) + _bf16(sb * noise))
    target = _bf16(_bf16(sa * noise) - _bf16(sb * x)) if prediction == "v_prediction" else noise
    model_input = torch.where(ref_mask[:, :, None, None, None], x, noisy)
    assert _within_one_bf16_unit(got.model_input, model_input) and _within_one_bf16_unit(got.target, target)

    fp32 = diffusion_inputs(codec, scheduler, images, ref_mask, cfg32, torch.Generator().manual_seed(5))
    assert {x.dtype for x in (fp32.latents, fp32.model_input, fp32.target)} == {torch.float32}
    scale = float(fp32.target.abs().max())
    assert float((fp32.target - got.target.float()).abs().max()) < 2e-2 * scale  # the same problem, rounded


def _tiny_vae_codec(device: str) -> "VAECodec":
    """The random tiny ``AutoencoderKL`` codec of ``model.vae: tiny`` (fixed seed)."""
    from cameo_corr.train.model import build_model

    torch.manual_seed(0)
    return build_model(vae="tiny", latent_factor=8)[1].to(device)


def test_official_vae_latents_need_cuda_elsewhere_refused() -> None:
    codec = _tiny_vae_codec("cpu").to(BF16)
    images = torch.rand(1, 2, 3, 64, 64)
    with pytest.raises(SchemaError, match="needs a CUDA device .*model.vae=identity"):
        encode_latents(codec, images, None, "official_bf16")
    with pytest.raises(SchemaError, match="train.precision"):
        encode_latents(codec, images, None, "fp8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the official VAE encode runs under CUDA's fp16 autocast: needs CUDA")
def test_official_vae_latents_encode_under_fp16_autocast_then_bf16() -> None:
    """A VAE codec: bf16 VAE, its convolutions in fp16 (the official encode's CUDA autocast), the posterior
    sample rounded to bf16 and scaled in bf16."""
    codec = _tiny_vae_codec("cuda")
    images = torch.rand(1, 2, 3, 64, 64, device="cuda")
    fp32 = encode_latents(codec, images, torch.Generator("cuda").manual_seed(1), "fp32")
    codec = codec.to(BF16)
    seen: list[torch.dtype] = []
    hook = codec.vae.encoder.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    got = encode_latents(codec, images, torch.Generator("cuda").manual_seed(1), "official_bf16")
    hook.remove()
    assert seen == [torch.float16] and got.dtype == BF16
    with torch.autocast("cuda", dtype=torch.float16):
        z = codec.posterior_sample(images, torch.Generator("cuda").manual_seed(1))
    ref = _bf16(_bf16(z.double()) * codec.scaling_factor)
    assert _within_one_bf16_unit(got, ref)
    torch.testing.assert_close(got.float(), fp32, rtol=5e-2, atol=5e-2 * float(fp32.abs().max()))


@pytest.mark.slow
def test_official_bf16_trainer_masters_resume_and_loss(tiny_train_cache: Path, tmp_path: Path, fresh_accelerate_state: None) -> None:
    """The trainer with ``official_bf16``: a bf16 model, AdamW on fp32 masters whose rounding the model is
    after every step; exact resume (masters, moments, data position); a checkpoint resumes only under its
    precision; on the same first batch and initial weights the losses are within 2 % of fp32's."""
    from accelerate.state import AcceleratorState
    from safetensors.torch import load_file

    from cameo_corr.train.loop import Trainer, checkpoint_dirs, read_metrics, train
    from cameo_corr.train.precision import MASTER_FILE

    base = [f"data.cache={tiny_train_cache}", "data.num_views=3", "data.batch_size=2", "data.shuffle_buffer=3", "train.log_every=1"]
    cfg = load_config(preset_path("tiny_cpu"), [*base, "train.precision=official_bf16", "train.mixed_precision=bf16",
                                                "train.max_steps=2", "train.checkpoint_every=1"])
    straight = train(cfg, tmp_path / "a", resume="never", progress=False)
    train(cfg, tmp_path / "b", resume="never", max_steps=1, progress=False)
    rest = train(cfg, tmp_path / "b", resume="auto", progress=False)
    assert straight.step == rest.step == 2 and [r["step"] for r in rest.history] == [2]
    for ra, rb in zip(read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")):
        assert all(ra[k] == rb[k] or (math.isnan(ra[k]) and math.isnan(rb[k])) for k in ("loss", "diffusion", "cameo", "lr"))
    ca, cb = checkpoint_dirs(tmp_path / "a")[-1], checkpoint_dirs(tmp_path / "b")[-1]
    for name in ("model.safetensors", MASTER_FILE):
        a, b = load_file(str(ca / name)), load_file(str(cb / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model, master = load_file(str(ca / "model.safetensors")), load_file(str(ca / MASTER_FILE))
    assert {v.dtype for v in model.values()} == {BF16} and {v.dtype for v in master.values()} == {torch.float32}
    assert all(torch.equal(model[k], master[k].to(BF16)) for k in master)
    assert any(not torch.equal(model[k].float(), master[k]) for k in master)  # the masters keep what bf16 rounds away

    trainer = Trainer(cfg, tmp_path / "c")
    opt_params = [p for group in trainer.optimizer.optimizer.param_groups for p in group["params"]]
    assert [id(p) for p in opt_params] == [id(p) for p in trainer.master.params]
    assert all(p.dtype == BF16 for p in trainer.accelerator.unwrap_model(trainer.trainable).parameters())

    AcceleratorState._reset_state(reset_partial_state=True)
    fp32 = load_config(preset_path("tiny_cpu"), [*base, "train.max_steps=1"])
    with pytest.raises(SchemaError, match="train.precision=official_bf16"):
        train(fp32, tmp_path / "a", resume="auto", progress=False)
    first = train(fp32, tmp_path / "d", resume="never", progress=False).history[0]
    for k in ("diffusion", "cameo"):
        official = straight.history[0][k]
        assert official != first[k] and abs(official - first[k]) < 0.02 * abs(first[k]), k
