"""Training numerics: ``train.precision`` (:data:`~cameo_corr.train.config.PRECISIONS`).

``fp32`` (the default) keeps fp32 weights in the forward pass and in the optimizer; ``train.mixed_precision``
picks accelerate's autocast for the UNet (``bf16`` in ``sd21_cameo``). Latents, noise and targets are fp32,
and the CAMEO loss (logits, head MLP, softmax, cross-entropy) is fp32.

``official_bf16`` reproduces the numerics of the official run, without DeepSpeed. That run is CAMEO's
``train.sh``: accelerate with DeepSpeed ZeRO-2, ``"bf16": {"enabled": true}`` and
``--autocast_fp32_on_distill``.

* Weights. DeepSpeed casts the whole trained module (UNet and head MLP) to bf16 (``module.bfloat16()``),
  so gradients are bf16. Its ZeRO partitions keep fp32 master copies, and the optimizer updates those.
  Here :class:`MasterWeights` does the same: the module is bf16, AdamW steps fp32 masters that receive
  the bf16 gradients, and after every step the bf16 weights are the masters rounded. The masters are part
  of each checkpoint (:data:`MASTER_FILE`).
* The UNet runs under bf16 autocast (``train.mixed_precision: bf16``). Its inputs are bf16: latents and
  camera rays.
* Latents (:func:`encode_latents`). The VAE is bf16 and encodes under CUDA's default autocast dtype,
  fp16: the official ``slice_vae_encode`` enters ``torch.autocast("cuda")``. The posterior sample is
  rounded to bf16 and multiplied by the scaling factor in bf16. That needs a CUDA device (other devices'
  autocast casts other ops, e.g. CPU's keeps group norms in fp16 and refuses their bf16 weights), so a
  VAE codec under ``official_bf16`` elsewhere is an error. The identity codec's latents are rounded to
  bf16 on any device.
* Noise is drawn in bf16, and ``add_noise`` and the velocity target are computed in bf16 (diffusers casts
  ``alphas_cumprod`` to the latents' dtype).
* Supervised logits. ``q k^T * scale`` is computed in bf16, as the official attention processor does
  under the UNet's bf16 autocast (:attr:`~cameo_corr.train.loss.QueryKey.logit_dtype`).
* Head MLP, softmax and cross-entropy use fp32 arithmetic on those bf16 logits and the bf16 head weights.
  The official distillation block runs under ``torch.autocast("cuda", dtype=torch.float32)``. CUDA
  accepts that dtype and casts ``linear``'s bf16 inputs and weights to fp32, and autocast runs softmax in
  fp32. :class:`~cameo_corr.train.loss.HeadMLP` computes in its input's dtype.
* The diffusion loss is the fp32 MSE of the bf16 prediction and target, as in the official code.

What differs: the supervised layer attends with ``scaled_dot_product_attention`` on bf16 q, k, v. The
official layer forms the bf16 logits, takes an fp32 softmax and multiplies it with v in bf16. With several
processes, gradients are averaged in bf16 by DDP; DeepSpeed's reduction dtype is its own setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from cameo_corr.schemas import SchemaError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from cameo_corr.train.model import LatentCodec

__all__ = ["MASTER_FILE", "OFFICIAL_DTYPE", "MasterWeights", "encode_latents"]

OFFICIAL_DTYPE = torch.bfloat16
"""The dtype of the official run's weights, latents, noise, targets and supervised logits."""

MASTER_FILE = "master_weights.safetensors"
"""The fp32 master weights in an ``official_bf16`` checkpoint directory."""


class MasterWeights:
    """fp32 master copies of a module's trainable parameters, whose module copies are low precision.

    Building it copies the trainable parameters to fp32 and casts ``module`` to ``dtype``; the parameter
    objects stay the same. The optimizer is given :attr:`params`. After the backward pass,
    :meth:`take_grads` moves the module's gradients to the masters. After the optimizer step,
    :meth:`to_model` rounds the masters into the module.
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype = OFFICIAL_DTYPE) -> None:
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.names: list[str] = [n for n, _ in named]
        """Parameter names in ``module`` (the keys of :meth:`state_dict`)."""
        self.model: list[nn.Parameter] = [p for _, p in named]
        """The module's own (low-precision) parameters."""
        self.params: list[nn.Parameter] = [nn.Parameter(p.detach().to(torch.float32).clone()) for p in self.model]
        """The fp32 masters, in the order of :attr:`names`: what the optimizer updates."""
        module.to(dtype)

    def subset(self, prefix: str) -> list[nn.Parameter]:
        """The masters of the parameters whose name starts with ``prefix`` (e.g. ``"head_mlp."``)."""
        return [m for n, m in zip(self.names, self.params) if n.startswith(prefix)]

    def take_grads(self) -> None:
        """Move the module's gradients to the masters (in fp32); a parameter without one leaves its master
        without one."""
        for master, p in zip(self.params, self.model):
            master.grad = None if p.grad is None else p.grad.detach().to(torch.float32)
            p.grad = None

    @torch.no_grad()
    def to_model(self) -> None:
        """Round the masters into the module's parameters."""
        for master, p in zip(self.params, self.model):
            p.copy_(master)

    def state_dict(self) -> dict[str, Tensor]:
        """``{name: fp32 master}`` (CPU tensors)."""
        return {n: m.detach().cpu().contiguous() for n, m in zip(self.names, self.params)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor], where: str | None = None) -> None:
        """Restore the masters (every name, fp32, same shapes) and round them into the module."""
        missing = sorted(set(self.names) - set(state))
        extra = sorted(set(state) - set(self.names))
        if missing or extra:
            name = (missing or extra)[0]
            raise SchemaError(name, f"{'missing from' if missing else 'unknown to'} the master weights "
                              f"({len(missing)} missing, {len(extra)} unknown)", where=where)
        for n, m in zip(self.names, self.params):
            value = state[n]
            if value.dtype != torch.float32 or tuple(value.shape) != tuple(m.shape):
                raise SchemaError(n, f"expected float32 {tuple(m.shape)}, got {value.dtype} {tuple(value.shape)}", where=where)
            m.copy_(value)
        self.to_model()

    def save(self, path: str | Path) -> None:
        """Write the masters as safetensors."""
        from safetensors.torch import save_file

        save_file(self.state_dict(), str(path))

    def load(self, path: str | Path) -> None:
        """Read masters written by :meth:`save` (see :meth:`load_state_dict`)."""
        from safetensors.torch import load_file

        if not Path(path).is_file():
            raise SchemaError("train.precision", "an official_bf16 checkpoint needs its fp32 master weights, and this file is missing",
                              where=str(path))
        self.load_state_dict(load_file(str(path)), where=str(path))


def encode_latents(codec: "LatentCodec", images: Tensor, generator: torch.Generator | None, precision: str) -> Tensor:
    """Latents ``[B, F, C, h, w]`` of ``images`` in [0, 1] with the numerics of ``precision``.

    ``fp32``: ``codec.encode``. ``official_bf16``: a VAE codec (whose VAE the trainer made bf16) takes its
    posterior sample under CUDA's fp16 autocast (a CUDA device is required), rounds it to bf16 and scales it
    in bf16; other codecs' latents are rounded to bf16.
    """
    from cameo_corr.train.model import VAECodec

    if precision == "fp32":
        return codec.encode(images, generator=generator)
    if precision != "official_bf16":
        raise SchemaError("train.precision", f"unknown precision {precision!r}")
    if isinstance(codec, VAECodec):
        if images.device.type != "cuda":
            raise SchemaError("train.precision", "official_bf16 encodes with the VAE under CUDA's fp16 autocast, as the official "
                              f"run does, which needs a CUDA device (the images are on {images.device.type}); use model.vae=identity "
                              "off CUDA, or train.precision=fp32")
        with torch.autocast(device_type="cuda", dtype=torch.float16):
            z = codec.posterior_sample(images, generator=generator)
        return codec.scale(z.to(OFFICIAL_DTYPE))
    return codec.encode(images, generator=generator).to(OFFICIAL_DTYPE)
