"""Multi-view diffusion model: a diffusers ``UNet2DConditionModel`` with 3D self-attention across views.

Public API (signatures are part of the trainer contract)::

    SD21_UNET_CONFIG: dict
    self_attention_layers(unet) -> list[str]
    resolve_layer(unet, layer: str | int) -> str
    layer_grid(unet, layer: str | int, latent_hw: tuple[int, int]) -> tuple[int, int]
    plucker_rays(K [..., 3, 3], E [..., 4, 4], h, w, image_size: int | (H, W), *, offset=(0.5, 0.5))
        -> Tensor [..., 6, h, w]
    normalize_cameras(E [..., F, 4, 4]) / normalize_cameras_official(E) -> Tensor [..., F, 4, 4]
    camera_rays(K [B, F, 3, 3], E [B, F, 4, 4], ray_hw, image_size, *, norm="first_view") -> [B, F, 6, h, w]
    domain_labels(tags, domain_dict) -> Tensor [B]
    noise_targets(latents, noisy_latents, ref_mask [B, F]) -> Tensor        # references clean, targets noisy
    class LatentCodec / IdentityCodec(factor=8) / VAECodec(vae, chunk=16)
        encode(images [B, F, 3, H, W] in [0, 1]) -> latents [B, F, C, h, w]; decode(latents) -> images
        latent_size((H, W)) -> (h, w); VAECodec.posterior_sample(images) (unscaled), VAECodec.scale(z)
    class MultiViewOutput(NamedTuple): sample [B, F, C, h, w]; qk: QueryKey | None (q, k [B, heads, F*N, d], scale)
    class MultiViewUNet(nn.Module):
        __init__(unet, *, layer: str | int, camera_dropout=0.1, null_tokens=1, qk_norm=False,
                 no_text_cross_attn=False, frame_local_width=None, domain_dict=None, cond_encoder="latent",
                 latent_factor=8)
        forward(latents [B, F, C, h, w], timesteps [B] | [B, F], *, plucker [B, F, 6, *ray_hw],
                ref_mask [B, F] bool, encoder_hidden_states [B, L, D] | None = None,
                class_labels [B] | None = None, drop_camera [B] bool | None = None,
                return_logits=True) -> MultiViewOutput
        grid(latent_hw) -> (h, w); ray_hw(latent_hw) -> (h, w); check_grid(latent_hw, cache_grids);
        enable_gradient_checkpointing()
    build_model(*, pretrained=None, layer=0, vae="identity", cond_dropout=0.1, gradient_checkpointing=False,
                qk_norm=False, no_text_cross_attn=False, frame_local_width=None, domain_dict=None,
                cond_encoder="latent", **options) -> (MultiViewUNet, LatentCodec)

Multi-view attention. Every self-attention layer (``attn1`` of the transformer blocks) attends over the
tokens of all F views of a sample: ``[B*F, N, C] -> [B, F*N, C]``, attention, and back (CAT3D /
MVGenMaster style), except the layers of width ``frame_local_width``, which attend within each frame
(diffusers' ``AttnProcessor2_0``). Cross-attention layers (``attn2``) keep diffusers' default processor. Views of a
sample must be consecutive in the UNet batch, which :class:`MultiViewUNet` guarantees.

Supervised layer. Like every layer it attends with ``F.scaled_dot_product_attention`` (so the
``[B, heads, F*N, F*N]`` logit matrix is never formed); it hands its queries and keys (after
``norm_q``/``norm_k``, with their graph) and scale to the caller as a
:class:`cameo_corr.train.loss.QueryKey`, whose logits ``q k^T * scale`` the CAMEO loss recomputes in
fp32, chunk by chunk. The network output does not depend on whether they are requested, and
gradient-checkpoint recomputation sees the same graph.

Layer index. CAMEO addresses layers by their position in ``sorted(unet.attn_processors)`` of a UNet
without text cross-attention, i.e. in the lexicographically sorted names of the self-attention
processors. :func:`self_attention_layers` returns exactly that list (``attn1`` processors only, Python's
``sorted``), so for the SD2.1 architecture index 10 is
``up_blocks.2.attentions.0.transformer_blocks.0.attn1.processor`` (32x32 tokens for 512x512 images).
For other configurations the index is the position in the same sorted list: with fewer than ten blocks
per level and one transformer block per attention, sorted order equals execution order (down blocks,
mid block, up blocks); with ten or more transformer blocks per attention (SDXL-style) the lexicographic
sort places ``transformer_blocks.10`` before ``transformer_blocks.2``, so prefer names there.

Conditioning. Plücker rays (6 channels, :func:`plucker_rays`) and a reference mask (1 channel) go
through an encoder ending in a zero-initialised convolution whose output is added to ``conv_in``'s
output, so a pretrained UNet's behaviour is unchanged at initialisation: ``cond_encoder="latent"``
(rays + mask with 1 for references, at latent resolution, one 3x3 convolution) or ``"pixel"`` (the
official CAMEO/MVGenMaster layout: mask with 1 for targets + rays, at image resolution, through a
stride-2 convolution stack). Camera dropout zeroes the rays for classifier-free guidance; the mask
is kept. Text conditioning: a learned null embedding (no text encoder) of the cross-attention width,
or ``encoder_hidden_states`` from the caller; ``no_text_cross_attn`` removes text cross-attention.

The official recipe (CAMEO's ``configs/config.yaml`` on MVGenMaster's UNet) adds LayerNorm on queries
and keys (``qk_norm``), no text cross-attention, per-frame attention in the 320-channel layers
(``frame_local_width=320``: ``down_blocks.0`` and ``up_blocks.3``), a zero-initialised domain class
embedding (``domain_dict``) and the ``pixel`` encoder; see :class:`MultiViewUNet`.
"""

from __future__ import annotations

import abc
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence, TypeVar

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import Tensor, nn

from cameo_corr.pipeline.backends.geometry import invert_rigid
from cameo_corr.schemas import SchemaError, as_grid
from cameo_corr.train.config import CAMERA_NORMS, COND_ENCODERS, check_domain_dict
from cameo_corr.train.loss import QueryKey

__all__ = [
    "SD21_UNET_CONFIG",
    "CAMERA_CHANNELS",
    "self_attention_layers",
    "resolve_layer",
    "layer_grid",
    "plucker_rays",
    "normalize_cameras",
    "normalize_cameras_official",
    "camera_rays",
    "domain_labels",
    "noise_targets",
    "LatentCodec",
    "IdentityCodec",
    "VAECodec",
    "MultiViewAttnProcessor",
    "MultiViewOutput",
    "MultiViewUNet",
    "build_model",
    "tiny_unet_config",
]

CAMERA_CHANNELS = 7
"""Conditioning channels per view: 6 Plücker ray channels + 1 reference-mask channel."""

SD21_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 96,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": True,
    "use_linear_projection": True,
}
"""``unet/config.json`` of Stable Diffusion 2.1 (768-v). Build it on the meta device to inspect layers."""


# ------------------------------------------------------------------------------------ layer naming
def _self_attention_modules(unet: nn.Module) -> dict[str, Attention]:
    """``{processor name: module}`` of the self-attention ``attn1`` layers of ``unet``."""
    out: dict[str, Attention] = {}
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and name.rsplit(".", 1)[-1] == "attn1" and not module.is_cross_attention:
            out[f"{name}.processor"] = module
    return out


def self_attention_layers(unet: nn.Module) -> list[str]:
    """Sorted processor names of the self-attention layers: the list CAMEO's layer index points into."""
    return sorted(_self_attention_modules(unet))


def resolve_layer(unet: nn.Module, layer: str | int) -> str:
    """Full processor name of ``layer``: CAMEO's index into :func:`self_attention_layers`, or a name.

    A name may be the full processor name, the module name (without ``.processor``), or a prefix that
    selects exactly one self-attention layer (e.g. ``up_blocks.2.attentions.0``).
    """
    names = self_attention_layers(unet)
    if not names:
        raise SchemaError("layer", "the UNet has no self-attention (attn1) layers")
    if isinstance(layer, bool):
        raise SchemaError("layer", f"expected a layer index or name, got {layer!r}")
    if isinstance(layer, int):
        if not 0 <= layer < len(names):
            raise SchemaError("layer", f"index {layer} out of range: this UNet has {len(names)} self-attention layers (0..{len(names) - 1})")
        return names[layer]
    if not isinstance(layer, str):
        raise SchemaError("layer", f"expected a layer index or name, got {layer!r}")
    matches = [n for n in names if n in (layer, f"{layer}.processor") or n.startswith(f"{layer}.")]
    if len(matches) != 1:
        what = "matches no" if not matches else f"matches {len(matches)}"
        raise SchemaError("layer", f"{layer!r} {what} self-attention layers; choose one of: {', '.join(names)}")
    return matches[0]


def _downsample(size: int, times: int) -> int:
    """Spatial size after ``times`` stride-2, padding-1, kernel-3 convolutions (diffusers' Downsample2D)."""
    for _ in range(times):
        size = (size - 1) // 2 + 1
    return size


def layer_grid(unet: UNet2DConditionModel, layer: str | int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """Token grid ``(h, w)`` that the self-attention ``layer`` sees for latents of size ``latent_hw``.

    Down block ``i`` runs after ``i`` downsamplers, the mid block after ``n - 1`` and up block ``i``
    at the resolution of down block ``n - 1 - i`` (every block but the last one of each path resamples).
    """
    name = resolve_layer(unet, layer)
    n = len(unet.config.down_block_types)
    head, _, rest = name.partition(".")
    if head == "down_blocks":
        steps = int(rest.split(".", 1)[0])
    elif head == "mid_block":
        steps = n - 1
    elif head == "up_blocks":
        steps = n - 1 - int(rest.split(".", 1)[0])
    else:
        raise SchemaError("layer", f"cannot place {name!r} in the UNet's down/mid/up blocks")
    return _downsample(int(latent_hw[0]), steps), _downsample(int(latent_hw[1]), steps)


# -------------------------------------------------------------------------------------- cameras
_Fn = TypeVar("_Fn", bound=Callable[..., Tensor])


def without_autocast(fn: _Fn) -> _Fn:
    """Run the camera function ``fn`` with autocast disabled on the device of its first argument (a tensor):
    an autocast region around the caller (the UNet's bf16 forward, a selfcheck) would otherwise compute
    its matrix products in bf16/fp16 and, on CUDA, feed ``linalg.cross`` mixed dtypes."""

    @functools.wraps(fn)
    def wrapper(first: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        with torch.autocast(first.device.type, enabled=False):
            return fn(first, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


@without_autocast
def plucker_rays(
    K: Tensor, E: Tensor, h: int, w: int, image_size: int | tuple[int, int], *, offset: tuple[float, float] = (0.5, 0.5)
) -> Tensor:
    """Plücker ray embedding ``(d, o x d)`` of an ``h x w`` grid of pixels over the image: ``[..., 6, h, w]``.

    ``K`` ``[..., 3, 3]`` are pixel intrinsics of the image of size ``image_size`` (``int`` or ``(H, W)``),
    ``E`` ``[..., 4, 4]`` world-to-camera extrinsics (OpenCV); batch dims broadcast. Cell ``(r, c)`` of the
    grid is the ray through the image point ``((c + ox) W / w, (r + oy) H / h)`` with ``offset = (ox, oy)``;
    the default ``(0.5, 0.5)`` is the centre of the cell (pixel centres at +0.5). ``d`` is the unit
    world-space direction, ``o`` the camera centre. Computed in at least float32, also inside an autocast region.
    """
    H, W = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
    dtype = torch.promote_types(torch.promote_types(K.dtype, E.dtype), torch.float32)
    K = K.to(dtype)
    E = E.to(dtype)
    u = (torch.arange(w, device=K.device, dtype=dtype) + offset[0]) * (W / w)
    v = (torch.arange(h, device=K.device, dtype=dtype) + offset[1]) * (H / h)
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    pix = torch.stack([uu, vv, torch.ones_like(uu)], dim=-1)  # [h, w, 3]
    R = E[..., :3, :3]
    t = E[..., :3, 3]
    dirs_cam = torch.einsum("...ij,hwj->...hwi", torch.linalg.inv(K), pix)
    dirs = torch.einsum("...ji,...hwj->...hwi", R, dirs_cam)  # R^T d_cam
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    origin = -torch.einsum("...ji,...j->...i", R, t)  # camera centre -R^T t
    moment = torch.linalg.cross(origin[..., None, None, :].expand_as(dirs), dirs, dim=-1)
    return torch.cat([dirs, moment], dim=-1).movedim(-1, -3)


@without_autocast
def normalize_cameras(E: Tensor) -> Tensor:
    """Extrinsics ``[..., F, 4, 4]`` re-expressed in view 0's camera frame, scaled so the farthest camera
    centre is at distance 1 from view 0 (unchanged scale when all centres coincide)."""
    rel = E @ invert_rigid(E[..., :1, :, :])
    centres = -(rel[..., :3, :3].transpose(-1, -2) @ rel[..., :3, 3:])[..., 0]  # [..., F, 3]
    scale = centres.norm(dim=-1).amax(dim=-1)  # [...]
    scale = torch.where(scale > 1e-8, scale, torch.ones_like(scale))
    out = rel.clone()
    out[..., :3, 3] = rel[..., :3, 3] / scale[..., None, None]
    return out


@without_autocast
def normalize_cameras_official(E: Tensor) -> Tensor:
    """The official CAMEO/MVGenMaster camera normalisation of extrinsics ``[..., F, 4, 4]`` (world-to-camera).

    ``normalize_extrinsic`` (reference view ``-1``, the last one): ``E_i <- inverse(E_last) @ E_i``, a
    *left* product, so the last view becomes the identity but the result is not the clip re-expressed
    in the last camera's frame (that would be ``E_i @ inverse(E_last)``, :func:`normalize_cameras`);
    it depends on the world frame the dataset chose. ``normalize_t``: camera centres divided by the
    largest absolute centre coordinate over the views and x, y, z, plus ``1e-8``.
    """
    rel = torch.linalg.inv(E[..., -1:, :, :]) @ E
    centres = -(rel[..., :3, :3].transpose(-1, -2) @ rel[..., :3, 3:])[..., 0]  # [..., F, 3]
    farthest = centres.abs().amax(dim=(-1, -2))  # [...]
    out = rel.clone()
    out[..., :3, 3] = rel[..., :3, 3] / (farthest[..., None, None] + 1e-8)
    return out


def camera_rays(
    K: Tensor, E: Tensor, ray_hw: tuple[int, int], image_size: int | tuple[int, int], *, norm: str = "first_view"
) -> Tensor:
    """Plücker rays ``[B, F, 6, h, w]`` on an ``ray_hw`` grid (latent or image resolution) for cameras
    ``K``/``E`` ``[B, F, ...]``.

    ``norm``: ``first_view`` makes the cameras relative to view 0 and scale-normalised
    (:func:`normalize_cameras`), which removes the arbitrary world frame and scale of the clip;
    ``official`` is the official code's ``normalize_extrinsic`` + ``normalize_t``
    (:func:`normalize_cameras_official`) with its pixel grid ``(c - 0.5, r + 0.5)`` (the official x
    coordinate is shifted by one pixel against y; use it on a full-resolution grid to match); ``none``
    keeps the dataset's cameras.
    """
    h, w = int(ray_hw[0]), int(ray_hw[1])
    if norm == "first_view":
        return plucker_rays(K, normalize_cameras(E), h, w, image_size)
    if norm == "official":
        return plucker_rays(K, normalize_cameras_official(E), h, w, image_size, offset=(-0.5, 0.5))
    if norm == "none":
        return plucker_rays(K, E, h, w, image_size)
    raise SchemaError("model.camera_norm", f"expected one of {', '.join(CAMERA_NORMS)}, got {norm!r}")


def noise_targets(latents: Tensor, noisy_latents: Tensor, ref_mask: Tensor) -> Tensor:
    """``[B, F, C, h, w]`` model input: clean latents for reference views (``ref_mask`` ``[B, F]`` True),
    noisy latents for target views."""
    return torch.where(ref_mask.bool()[:, :, None, None, None], latents, noisy_latents)


# --------------------------------------------------------------------------------------- codecs
class LatentCodec(nn.Module, abc.ABC):
    """Maps images ``[B, F, 3, H, W]`` in [0, 1] to diffusion latents ``[B, F, C, H/factor, W/factor]``."""

    factor: int
    latent_channels: int

    def latent_size(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """Latent ``(h, w)`` of images of size ``image_hw``; both must be multiples of ``factor``."""
        H, W = int(image_hw[0]), int(image_hw[1])
        if H % self.factor or W % self.factor:
            raise SchemaError("resolution", f"image size {H}x{W} is not a multiple of the latent factor {self.factor}")
        return H // self.factor, W // self.factor

    @abc.abstractmethod
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Latents ``[B, F, C, h, w]`` of images ``[B, F, 3, H, W]`` in [0, 1] (no gradient)."""

    @abc.abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Images ``[B, F, 3, H, W]`` in [0, 1] of latents ``[B, F, C, h, w]`` (no gradient)."""


class IdentityCodec(LatentCodec):
    """Lossless "identity latents" for CPU runs: ``pixel_unshuffle(2 x - 1, factor)``, ``3 factor^2`` channels."""

    def __init__(self, factor: int = 8) -> None:
        super().__init__()
        if factor < 1:
            raise SchemaError("latent_factor", f"must be >= 1, got {factor}")
        self.factor = int(factor)
        self.latent_channels = 3 * self.factor**2

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``pixel_unshuffle`` of the images mapped to [-1, 1]; deterministic (``generator`` unused)."""
        B, Fv = images.shape[:2]
        z = F.pixel_unshuffle(images.flatten(0, 1) * 2.0 - 1.0, self.factor)
        return z.unflatten(0, (B, Fv))

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Exact inverse of :meth:`encode` (clamped to [0, 1])."""
        B, Fv = latents.shape[:2]
        x = F.pixel_shuffle(latents.flatten(0, 1), self.factor)
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0).unflatten(0, (B, Fv))


class VAECodec(LatentCodec):
    """A frozen diffusers ``AutoencoderKL``: ``vae.encode(2 x - 1).latent_dist.sample() * scaling_factor``.

    Images are encoded ``chunk`` at a time (large batches of big images exceed what one VAE call handles).
    """

    def __init__(self, vae: AutoencoderKL, chunk: int = 16) -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.chunk = int(chunk)
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = int(vae.config.latent_channels)
        self.scaling_factor = float(vae.config.scaling_factor)
        shift = getattr(vae.config, "shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else 0.0

    def train(self, mode: bool = True) -> "VAECodec":
        """The VAE stays in eval mode (it is frozen)."""
        super().train(mode)
        self.vae.eval()
        return self

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Sampled latents (``generator`` seeds the posterior sample), scaled by the VAE's scaling factor."""
        return self.scale(self.posterior_sample(images, generator))

    @torch.no_grad()
    def posterior_sample(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The unscaled posterior sample ``[B, F, C, h, w]`` of images ``[B, F, 3, H, W]`` in [0, 1]."""
        B, Fv = images.shape[:2]
        x = (images.flatten(0, 1) * 2.0 - 1.0).to(self.vae.dtype)
        parts = [
            self.vae.encode(x[i : i + self.chunk]).latent_dist.sample(generator) for i in range(0, x.shape[0], self.chunk)
        ]
        return torch.cat(parts).unflatten(0, (B, Fv))

    def scale(self, z: Tensor) -> Tensor:
        """Diffusion latents of a posterior sample: ``(z - shift_factor) * scaling_factor`` in ``z``'s dtype."""
        return (z - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Decoded images in [0, 1]."""
        B, Fv = latents.shape[:2]
        z = latents.flatten(0, 1).to(self.vae.dtype) / self.scaling_factor + self.shift_factor
        parts = [self.vae.decode(z[i : i + self.chunk]).sample for i in range(0, z.shape[0], self.chunk)]
        return ((torch.cat(parts) + 1.0) / 2.0).clamp(0.0, 1.0).unflatten(0, (B, Fv))


# ---------------------------------------------------------------------------- attention processor
@dataclass
class _MultiViewState:
    """Per-forward state shared by the processors of one :class:`MultiViewUNet`."""

    num_views: int = 1
    recording: bool = False
    qk: QueryKey | None = None


class MultiViewAttnProcessor:
    """Self-attention over the tokens of all views of a sample (``[B*F, N, C] -> [B, F*N, C]``).

    Attention is ``F.scaled_dot_product_attention``. With ``supervised=True``, while the owning model
    records, the layer's queries and keys ``[B, heads, F*N, d]`` (after ``norm_q``/``norm_k``) and its
    scale are stored in the shared state as a :class:`~cameo_corr.train.loss.QueryKey`.
    """

    def __init__(self, state: _MultiViewState, *, supervised: bool = False) -> None:
        self.state = state
        self.supervised = supervised

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
    ) -> Tensor:
        """Multi-view self-attention of ``hidden_states`` ``[B*F, N, C]`` (or ``[B*F, C, h, w]``)."""
        if encoder_hidden_states is not None:
            raise ValueError("MultiViewAttnProcessor is for self-attention layers; got encoder_hidden_states")
        if attention_mask is not None:
            raise ValueError("MultiViewAttnProcessor does not support attention masks")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            bf, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(bf, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        bf, n, _ = hidden_states.shape
        views = self.state.num_views
        if bf % views:
            raise ValueError(f"batch of {bf} images is not a multiple of the number of views {views}")
        b = bf // views
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def split_heads(x: Tensor) -> Tensor:  # [B*F, N, heads*d] -> [B, heads, F*N, d]
            return x.reshape(b, views * n, attn.heads, head_dim).transpose(1, 2)

        query, key, value = split_heads(query), split_heads(key), split_heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if self.supervised and self.state.recording:
            self.state.qk = QueryKey(query, key, float(attn.scale))
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False, scale=attn.scale)

        out = out.transpose(1, 2).reshape(bf, n, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(bf, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class _PixelCondEncoder(nn.Module):
    """The official conditioning encoder (MVGenMaster's ``ExConvEncoder``) for image-resolution inputs.

    A 3x3 convolution ``cond -> 32`` then three stride-2 ones ``32 -> 64 -> 128 -> 256`` (8x downsampling,
    the VAE factor), each followed by ``GroupNorm`` (8, 16, 32, 64 groups, eps 1e-6) and SiLU, and a
    zero-initialised 3x3 convolution ``256 -> out_channels`` at latent resolution.
    """

    def __init__(self, in_channels: int, out_channels: int, **factory: Any) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for i, (ch, groups) in enumerate(((32, 8), (64, 16), (128, 32), (256, 64))):
            conv = nn.Conv2d(prev, ch, 3, stride=1 if i == 0 else 2, padding=1, **factory)
            layers += [conv, nn.GroupNorm(groups, ch, eps=1e-6, **factory), nn.SiLU()]
            prev = ch
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(prev, out_channels, 3, padding=1, **factory)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Latent-resolution features of ``x`` ``[N, in_channels, 8h, 8w]``."""
        return self.out(self.body(x))


class _CameraConvIn(nn.Module):
    """``conv_in(latents) + cond(conditioning)``; the conditioning tensor is handed over in ``pending``.

    ``cond`` ends in a zero-initialised convolution, so the wrapped UNet initially behaves as before.
    """

    def __init__(self, conv_in: nn.Conv2d, encoder: str = "latent", cond_channels: int = CAMERA_CHANNELS) -> None:
        super().__init__()
        self.conv = conv_in
        self.cond: nn.Module
        factory = {"device": conv_in.weight.device, "dtype": conv_in.weight.dtype}
        if encoder == "latent":
            self.cond = nn.Conv2d(cond_channels, conv_in.out_channels, kernel_size=3, padding=1, **factory)
            nn.init.zeros_(self.cond.weight)
            nn.init.zeros_(self.cond.bias)
        elif encoder == "pixel":
            self.cond = _PixelCondEncoder(cond_channels, conv_in.out_channels, **factory)
        else:
            raise SchemaError("model.cond_encoder", f"expected one of {', '.join(COND_ENCODERS)}, got {encoder!r}")
        self.pending: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        """Features of the latents plus those of the pending conditioning (set by :class:`MultiViewUNet`)."""
        if self.pending is None:
            raise RuntimeError("conv_in called without conditioning: call the UNet through MultiViewUNet")
        feats = self.cond(self.pending.to(x.dtype))
        if feats.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"conditioning features {tuple(feats.shape[-2:])} do not match the latents {tuple(x.shape[-2:])}")
        return self.conv(x) + feats


def _remove_text_cross_attention(unet: nn.Module) -> None:
    """Drop ``attn2``/``norm2`` of every transformer block: the official ``no_text_cross_attn`` builds the
    UNet with ``cross_attention_dim=None``, so its blocks have self-attention and the MLP only."""
    from diffusers.models.attention import BasicTransformerBlock

    for module in unet.modules():
        if isinstance(module, BasicTransformerBlock):
            module.attn2 = None
            module.norm2 = None


def _add_qk_norm(unet: nn.Module) -> None:
    """LayerNorm over the head dimension of queries and keys in every attention layer: the modules
    diffusers' ``Attention(qk_norm="layer_norm")`` creates (``norm_q``/``norm_k``, eps 1e-5, affine),
    added after loading as the official code does (its processors apply them after the head split)."""
    for module in unet.modules():
        if isinstance(module, Attention):
            head_dim = module.inner_dim // module.heads
            factory = {"device": module.to_q.weight.device, "dtype": module.to_q.weight.dtype}
            module.norm_q = nn.LayerNorm(head_dim, eps=1e-5, **factory)
            module.norm_k = nn.LayerNorm(head_dim, eps=1e-5, **factory)


def domain_labels(tags: Sequence[str], domain_dict: Mapping[str, int], device: torch.device | str | None = None) -> Tensor:
    """Domain class labels ``[B]`` of the batch's dataset ``tags``: ``domain_dict[tag]``, or
    ``domain_dict["others"]`` for a tag it does not list (the official rule)."""
    return torch.tensor([int(domain_dict.get(t, domain_dict["others"])) for t in tags], dtype=torch.long, device=device)


# -------------------------------------------------------------------------------------- model
class MultiViewOutput(NamedTuple):
    """Output of :class:`MultiViewUNet`: the prediction and the supervised layer's queries and keys."""

    sample: Tensor
    """``[B, F, C, h, w]`` model prediction (noise or velocity, per the caller's scheduler)."""
    qk: QueryKey | None
    """Queries and keys ``[B, heads, F*N, d]`` and scale of the supervised layer; ``qk.logits()`` are its
    ``[B, heads, F*N, F*N]`` pre-softmax logits in fp32 (``None`` if not requested)."""


class MultiViewUNet(nn.Module):
    """A ``UNet2DConditionModel`` turned into a multi-view model (see the module docstring).

    ``layer`` selects the supervised self-attention layer (CAMEO index or name, :func:`resolve_layer`).
    ``camera_dropout`` is the per-sample probability of dropping the camera rays in training mode when
    the caller does not decide (``drop_camera``). ``null_tokens`` is the length of the learned null text
    embedding. The official recipe's options (all off by default):

    - ``qk_norm``: LayerNorm on queries and keys of every attention layer (:func:`_add_qk_norm`);
    - ``no_text_cross_attn``: no text cross-attention (``attn2`` removed; no null embedding);
    - ``frame_local_width``: self-attention layers of this width (``inner_dim``; 320 officially)
      attend within each frame only (diffusers' ``AttnProcessor2_0``), all others across the views;
    - ``domain_dict``: a zero-initialised class embedding (one row per label) added to the timestep
      embedding, selected per sample by ``class_labels`` (:func:`domain_labels`);
    - ``cond_encoder``: ``latent`` or ``pixel`` (:data:`cameo_corr.train.config.COND_ENCODERS`); ``pixel``
      needs ``latent_factor`` 8.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        *,
        layer: str | int,
        camera_dropout: float = 0.1,
        null_tokens: int = 1,
        qk_norm: bool = False,
        no_text_cross_attn: bool = False,
        frame_local_width: int | None = None,
        domain_dict: Mapping[str, int] | None = None,
        cond_encoder: str = "latent",
        latent_factor: int = 8,
    ) -> None:
        super().__init__()
        if not 0.0 <= camera_dropout <= 1.0:
            raise SchemaError("cond_dropout", f"must be in [0, 1], got {camera_dropout}")
        if null_tokens < 1:
            raise SchemaError("null_tokens", f"must be >= 1, got {null_tokens}")
        if cond_encoder == "pixel" and latent_factor != 8:
            raise SchemaError("model.cond_encoder", f"the pixel encoder downsamples 8x but the latents are {latent_factor}x smaller")
        self.unet = unet
        if no_text_cross_attn:
            _remove_text_cross_attention(unet)
        if qk_norm:
            _add_qk_norm(unet)
        self.layer_name = resolve_layer(unet, layer)
        self.camera_dropout = float(camera_dropout)
        self.cond_encoder = cond_encoder
        self.latent_factor = int(latent_factor)
        modules = _self_attention_modules(unet)
        self.frame_local_layers = sorted(n for n, m in modules.items() if frame_local_width is not None and m.inner_dim == frame_local_width)
        if self.layer_name in self.frame_local_layers:
            raise SchemaError("model.layer", f"{self.layer_name} attends within each frame (frame_local_width={frame_local_width});"
                              " the supervised layer must attend across views")
        self.heads = int(modules[self.layer_name].heads)
        self._state = _MultiViewState()
        processors = dict(unet.attn_processors)
        for name in modules:
            if name in self.frame_local_layers:
                processors[name] = AttnProcessor2_0()
            else:
                processors[name] = MultiViewAttnProcessor(self._state, supervised=name == self.layer_name)
        unet.set_attn_processor(processors)
        unet.conv_in = _CameraConvIn(unet.conv_in, cond_encoder)
        param = unet.conv_in.conv.weight
        self.domain_dict = dict(domain_dict) if domain_dict is not None else None
        if self.domain_dict is not None:
            if unet.class_embedding is not None:
                raise SchemaError("model.domain_dict", "the UNet already has a class embedding")
            n = check_domain_dict(self.domain_dict)
            unet.class_embedding = nn.Embedding(n, unet.time_embedding.linear_2.out_features, device=param.device, dtype=param.dtype)
            nn.init.zeros_(unet.class_embedding.weight)
            unet.register_to_config(num_class_embeds=n)
        self.null_embedding: nn.Parameter | None = None
        if not no_text_cross_attn:
            width = unet.config.cross_attention_dim
            if not isinstance(width, int):
                raise SchemaError("cross_attention_dim", f"expected one cross-attention width, got {width!r}")
            self.null_embedding = nn.Parameter(0.02 * torch.randn(null_tokens, width, device=param.device, dtype=param.dtype))

    def ray_hw(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """Grid of the camera rays the model takes: the latent grid, or the image grid for ``pixel``."""
        f = self.latent_factor if self.cond_encoder == "pixel" else 1
        return int(latent_hw[0]) * f, int(latent_hw[1]) * f

    @property
    def latent_channels(self) -> int:
        """Channels of the latents the UNet denoises."""
        return int(self.unet.config.in_channels)

    def grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """Token grid ``(h, w)`` of the supervised layer for latents of size ``latent_hw``."""
        return layer_grid(self.unet, self.layer_name, latent_hw)

    def check_grid(self, latent_hw: tuple[int, int], cache_grids: Any, *, cache: str | None = None) -> tuple[int, int]:
        """The supervised layer's token grid for latents of size ``latent_hw``; raise :class:`SchemaError`
        unless the cache stores it. ``cache_grids`` is the cache's grid or the list of grids it stores
        (``CacheConfig.grids``); ``cache`` names the cache in the error."""
        many = isinstance(cache_grids, (list, tuple)) and bool(cache_grids) and isinstance(cache_grids[0], (list, tuple))
        stored = [as_grid(g) for g in cache_grids] if many else [as_grid(cache_grids)]
        got = self.grid(latent_hw)
        if got not in stored:
            names = ", ".join(f"{h}x{w}" for h, w in stored)
            side = got[0] if got[0] == got[1] else f"{got[0]}x{got[1]}"
            raise SchemaError(
                "layer",
                f"supervised layer {self.layer_name} sees a {got[0]}x{got[1]} token grid for {latent_hw[0]}x{latent_hw[1]}"
                f" latents but the cache stores {'grids' if len(stored) > 1 else 'grid'} {names}; change the layer, the"
                f" training resolution, or preprocess the cache with --grid including {side}",
                where=cache,
            )
        return got

    def enable_gradient_checkpointing(self) -> None:
        """Recompute UNet block activations in the backward pass (diffusers' non-reentrant checkpointing)."""
        self.unet.enable_gradient_checkpointing()

    def forward(
        self,
        latents: Tensor,
        timesteps: Tensor | int,
        *,
        plucker: Tensor,
        ref_mask: Tensor,
        encoder_hidden_states: Tensor | None = None,
        class_labels: Tensor | None = None,
        drop_camera: Tensor | None = None,
        return_logits: bool = True,
    ) -> MultiViewOutput:
        """Denoise ``latents`` ``[B, F, C, h, w]`` (references clean, targets noisy; see :func:`noise_targets`).

        ``timesteps``: ``[B]`` (shared by the views of a sample), ``[B, F]`` or a scalar. ``plucker``
        ``[B, F, 6, *ray_hw]`` from :func:`camera_rays` on the grid :meth:`ray_hw`; ``ref_mask`` ``[B, F]``
        bool, True for references. ``encoder_hidden_states`` ``[B, L, D]`` or ``[B*F, L, D]``; ``None``
        uses the learned null embedding (and must be ``None`` without text cross-attention).
        ``class_labels`` ``[B]`` domain labels (required with a domain embedding). ``drop_camera`` ``[B]``
        bool forces camera dropout per sample (True = unconditional); ``None`` applies random dropout
        with probability ``camera_dropout`` in training mode only.
        """
        if latents.ndim != 5:
            raise ValueError(f"latents must be [B, F, C, h, w], got shape {tuple(latents.shape)}")
        B, Fv, C, h, w = latents.shape
        rh, rw = self.ray_hw((h, w))
        if tuple(plucker.shape) != (B, Fv, 6, rh, rw):
            raise ValueError(f"plucker must be [B, F, 6, {rh}, {rw}] = {(B, Fv, 6, rh, rw)}, got {tuple(plucker.shape)}")
        if tuple(ref_mask.shape) != (B, Fv):
            raise ValueError(f"ref_mask must be [B, F] = {(B, Fv)}, got {tuple(ref_mask.shape)}")
        dtype = latents.dtype
        if drop_camera is None and self.training and self.camera_dropout > 0.0:
            drop_camera = torch.rand(B, device=latents.device) < self.camera_dropout
        if drop_camera is not None:
            if tuple(drop_camera.shape) != (B,):
                raise ValueError(f"drop_camera must be [B] = ({B},), got {tuple(drop_camera.shape)}")
            plucker = plucker.masked_fill(drop_camera.to(plucker.device, torch.bool)[:, None, None, None, None], 0.0)
        ref = ref_mask.to(device=latents.device, dtype=torch.bool)[:, :, None, None, None]
        if self.cond_encoder == "pixel":  # the official layout: [mask (1 = target), rays] at image resolution
            cond = torch.cat([(~ref).to(dtype).expand(B, Fv, 1, rh, rw), plucker.to(dtype)], dim=2)
        else:
            cond = torch.cat([plucker.to(dtype), ref.to(dtype).expand(B, Fv, 1, h, w)], dim=2)

        t = torch.as_tensor(timesteps, device=latents.device)
        if t.ndim == 0:
            t = t.expand(B * Fv)
        elif tuple(t.shape) == (B,):
            t = t.repeat_interleave(Fv)
        elif tuple(t.shape) == (B, Fv):
            t = t.reshape(B * Fv)
        else:
            raise ValueError(f"timesteps must be a scalar, [B] or [B, F], got shape {tuple(t.shape)}")

        labels = None
        if self.domain_dict is not None:
            if class_labels is None or tuple(class_labels.shape) != (B,):
                got = None if class_labels is None else tuple(class_labels.shape)
                raise ValueError(f"class_labels [B] = ({B},) are required with the domain embedding, got {got}")
            labels = class_labels.to(latents.device).repeat_interleave(Fv)
        elif class_labels is not None:
            raise ValueError("class_labels given but the model has no domain embedding (model.domain_dict)")

        ehs: Tensor | None
        if self.null_embedding is None:
            if encoder_hidden_states is not None:
                raise ValueError("the model has no text cross-attention (no_text_cross_attn): encoder_hidden_states must be None")
            ehs = None
        elif encoder_hidden_states is None:
            ehs = self.null_embedding[None].expand(B * Fv, -1, -1)
        elif encoder_hidden_states.ndim == 3 and encoder_hidden_states.shape[0] == B:
            ehs = encoder_hidden_states.repeat_interleave(Fv, dim=0)
        elif encoder_hidden_states.ndim == 3 and encoder_hidden_states.shape[0] == B * Fv:
            ehs = encoder_hidden_states
        else:
            raise ValueError(f"encoder_hidden_states must be [B, L, D] or [B*F, L, D], got {tuple(encoder_hidden_states.shape)}")

        state = self._state
        conv_in = self.unet.conv_in
        state.num_views, state.recording, state.qk = Fv, return_logits, None
        conv_in.pending = cond.flatten(0, 1)
        try:
            sample = self.unet(latents.flatten(0, 1), t, encoder_hidden_states=None if ehs is None else ehs.to(dtype),
                               class_labels=labels, return_dict=False)[0]
            qk = state.qk
        finally:
            state.recording, state.qk = False, None
            conv_in.pending = None
        if return_logits:
            gh, gw = self.grid((h, w))
            expected = (B, self.heads, Fv * gh * gw, Fv * gh * gw)
            if qk is None or tuple(qk.shape) != expected:
                got = None if qk is None else tuple(qk.shape)
                raise RuntimeError(f"supervised layer {self.layer_name} produced logits {got}, expected {expected}")
        return MultiViewOutput(sample.unflatten(0, (B, Fv)), qk)


# -------------------------------------------------------------------------------------- builder
_TINY_DEFAULTS: dict[str, Any] = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
    "latent_factor": 8,
    "null_tokens": 1,
}


def tiny_unet_config(
    latent_channels: int,
    *,
    block_out_channels: Sequence[int] = (32, 64),
    layers_per_block: int = 1,
    attention_head_dim: int = 8,
    cross_attention_dim: int = 32,
    norm_num_groups: int = 8,
    sample_size: int = 8,
) -> dict[str, Any]:
    """Config of a small ``UNet2DConditionModel`` for CPU runs: cross-attention blocks at every level.

    ``attention_head_dim`` follows diffusers' (SD-inherited) meaning: it is the number of heads.
    """
    n = len(block_out_channels)
    return {
        "sample_size": sample_size,
        "in_channels": latent_channels,
        "out_channels": latent_channels,
        "layers_per_block": layers_per_block,
        "block_out_channels": tuple(int(c) for c in block_out_channels),
        "down_block_types": ("CrossAttnDownBlock2D",) * n,
        "up_block_types": ("CrossAttnUpBlock2D",) * n,
        "attention_head_dim": attention_head_dim,
        "cross_attention_dim": cross_attention_dim,
        "norm_num_groups": norm_num_groups,
        "use_linear_projection": True,
    }


def _tiny_vae(latent_channels: int, factor: int, sample_size: int) -> AutoencoderKL:
    """A randomly initialised small ``AutoencoderKL`` with downsampling ``factor`` (a power of two)."""
    levels = int(round(math.log2(factor))) + 1
    if 2 ** (levels - 1) != factor:
        raise SchemaError("latent_factor", f"the tiny VAE needs a power of two, got {factor}")
    channels = tuple(min(8 * 2**i, 32) for i in range(levels))
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=sample_size,
    )


def build_model(
    *,
    pretrained: str | Path | None = None,
    layer: str | int = 0,
    vae: str = "identity",
    cond_dropout: float = 0.1,
    gradient_checkpointing: bool = False,
    qk_norm: bool = False,
    no_text_cross_attn: bool = False,
    frame_local_width: int | None = None,
    domain_dict: Mapping[str, int] | None = None,
    cond_encoder: str = "latent",
    **options: Any,
) -> tuple[MultiViewUNet, LatentCodec]:
    """Build the multi-view model and its latent codec.

    ``pretrained``: local directory with SD2.1-architecture ``unet/`` (and, for ``vae="pretrained"``,
    ``vae/``) subfolders in diffusers format; ``None`` builds the tiny UNet of :func:`tiny_unet_config`
    from scratch. ``vae``: ``"identity"`` (:class:`IdentityCodec`), ``"tiny"`` (random small
    ``AutoencoderKL``) or ``"pretrained"``. ``qk_norm`` ... ``cond_encoder``: the recipe options of
    :class:`MultiViewUNet`. ``options`` (tiny model only, except ``null_tokens``):
    ``block_out_channels``, ``layers_per_block``, ``attention_head_dim``, ``cross_attention_dim``,
    ``norm_num_groups``, ``latent_factor`` (identity / tiny VAE downsampling), ``null_tokens``.
    """
    unknown = sorted(set(options) - set(_TINY_DEFAULTS))
    if unknown:
        raise SchemaError(f"model.options.{unknown[0]}", f"unknown option (known: {', '.join(sorted(_TINY_DEFAULTS))})")
    if vae not in ("identity", "tiny", "pretrained"):
        raise SchemaError("model.vae", f"expected identity, tiny or pretrained, got {vae!r}")
    opts = {**_TINY_DEFAULTS, **options}
    null_tokens = int(opts.pop("null_tokens"))
    factor = int(opts.pop("latent_factor"))

    if pretrained is not None:
        root = Path(pretrained)
        if not (root / "unet" / "config.json").is_file():
            raise SchemaError("model.pretrained", "no unet/config.json (expected a diffusers SD2.1-style directory)", where=str(root))
        tiny_only = sorted(k for k in options if k not in ("null_tokens",))
        if tiny_only:
            raise SchemaError(f"model.options.{tiny_only[0]}", "only applies to the tiny model built without --pretrained")
        unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet")
    else:
        if vae == "pretrained":
            raise SchemaError("model.vae", "vae=pretrained needs model.pretrained (a directory with a vae/ subfolder)")
        latent_channels = 3 * factor**2 if vae == "identity" else 4
        unet = UNet2DConditionModel(**tiny_unet_config(latent_channels, **opts))

    codec: LatentCodec
    if vae == "identity":
        codec = IdentityCodec(factor)
    elif vae == "tiny":
        codec = VAECodec(_tiny_vae(int(unet.config.in_channels), factor, sample_size=int(unet.config.sample_size) * factor))
    else:
        assert pretrained is not None
        vae_dir = Path(pretrained) / "vae"
        if not (vae_dir / "config.json").is_file():
            raise SchemaError("model.vae", "no vae/config.json in the pretrained directory", where=str(Path(pretrained)))
        codec = VAECodec(AutoencoderKL.from_pretrained(pretrained, subfolder="vae"))
    if codec.latent_channels != int(unet.config.in_channels):
        raise SchemaError(
            "model.vae",
            f"the {vae} codec makes {codec.latent_channels}-channel latents but the UNet takes {unet.config.in_channels}",
        )

    model = MultiViewUNet(
        unet,
        layer=layer,
        camera_dropout=cond_dropout,
        null_tokens=null_tokens,
        qk_norm=qk_norm,
        no_text_cross_attn=no_text_cross_attn,
        frame_local_width=frame_local_width,
        domain_dict=domain_dict,
        cond_encoder=cond_encoder,
        latent_factor=codec.factor,
    )
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model, codec
