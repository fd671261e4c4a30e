"""The lean CAMEO training loop: accelerate, DDPM v-prediction, CAMEO attention loss, exact resume.

One optimizer step accumulates ``gradient_accumulation_steps`` batches from the cache stream
(:class:`~cameo_corr.train.data.StreamLoader`). Per batch: images -> latents (frozen codec); one
timestep per sample; references stay clean (conditioned on timestep 0, or on the sample's timestep
with ``model.ref_timestep: sample`` as the official code does), targets are noised by the
``DDPMScheduler``; camera rays (``model.camera_norm``) are dropped with probability ``model.cond_dropout``
per sample or per batch; the dataset ``tag`` selects the domain label (``model.domain_dict``); the
multi-view UNet predicts ``v`` (or epsilon/sample per config) and returns the queries and keys of the
supervised layer (the loss recomputes their logits, in ``loss.query_chunk`` chunks when set). The loss
is the diffusion MSE over target views plus
``cameo_weight`` times the CAMEO loss (fp32, computed by :func:`cameo_corr.train.loss.cameo_loss`).
The attention correspondence precision of the supervised layer (head-mean attention, per key view,
argmax within one token of the cached target) is logged with both losses. ``train.precision`` sets the
numerics (:mod:`cameo_corr.train.precision`).

Skips and stops, as the official code does. A micro-batch whose CAMEO term is skipped (the official
mode's empty reference- or target-query selection) or NaN (logged as a warning naming the step and the
batch's window ids) trains on the diffusion loss alone. When no micro-batch of any rank had a CAMEO
term in an optimizer step, the head MLP gets no gradient and AdamW leaves it untouched
(``loss.skipped_grad: none``), or a zero gradient (``zero``: what DeepSpeed ZeRO-2 does in the official
run). A non-finite total loss stops the run with :class:`NonFiniteLoss`, naming the step and the window ids.

Randomness that shapes a step (timesteps, noise, camera-condition dropout) is drawn from a generator
seeded by ``(seed, rank, step, micro-batch)``, so it does not depend on history. A checkpoint
(``accelerator.save_state``) holds the model + head MLP as safetensors, the optimizer, the learning
rate schedule, every process's data stream position and RNG states, the frozen codec when it is the tiny
random VAE (a pretrained one is reloaded from its directory); resuming from it continues bit-for-bit like
the uninterrupted run on CPU (CUDA's atomics-based backward kernels are not bitwise deterministic, so two
uninterrupted CUDA runs differ in the last bits too).

Multi-GPU: ``accelerate launch -m cameo_corr.cli train ...``; every rank reads its own part of the
cache stream (rank and world size are handed to the dataset explicitly, the DataLoader is not
prepared by accelerate).
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, NamedTuple

import numpy as np
import torch
from torch import nn

from cameo_corr.cli.errors import RunFailed
from cameo_corr.schemas import SchemaError
from cameo_corr.train.config import TrainConfig, read_cache_configs, training_cache_paths

if TYPE_CHECKING:  # pragma: no cover - typing only
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from cameo_corr.schemas import CacheConfig
    from cameo_corr.train.data import StreamLoader
    from cameo_corr.train.model import LatentCodec, MultiViewUNet
    from cameo_corr.train.precision import MasterWeights

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
_CKPT_RE = re.compile(r"^step-(\d+)$")

logger = logging.getLogger(__name__)


class NonFiniteLoss(RunFailed):
    """The total training loss of a micro-batch was NaN or infinite: the run stops (exit 1 on the command line)."""


class CameoTrainable(nn.Module):
    """Everything the optimizer updates: the multi-view UNet and, when lambda > 0, the head MLP."""

    def __init__(self, model: "MultiViewUNet", head_mlp: nn.Module | None) -> None:
        super().__init__()
        self.model = model
        self.head_mlp = head_mlp

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The multi-view UNet's forward (the head MLP is applied inside the loss)."""
        return self.model(*args, **kwargs)


@dataclass
class LoopState:
    """Checkpointed loop state: optimizer steps done, the process count, the training precision (a
    checkpoint resumes only under the precision that wrote it) and every rank's data stream: its position
    and the corrupt windows it skipped so far (``data.on_corrupt=skip``; each ``metrics.jsonl`` row has
    their total over ranks). accelerate saves this object from the main process only, so the ranks'
    streams are gathered into it first (:meth:`gather`, a collective) and each rank resumes its own."""

    step: int = 0
    loader: "StreamLoader | None" = None
    world_size: int = 1
    precision: str = "fp32"
    rank: int = 0
    ranks: list[dict[str, Any]] | None = None
    """Every rank's :meth:`stream`, gathered by :meth:`gather` for the next save (``None``: this rank's only)."""

    def stream(self) -> dict[str, Any]:
        """This rank's ``{"data": loader position, "corrupt_skipped": count}``."""
        return {"data": None if self.loader is None else self.loader.state_dict(),
                "corrupt_skipped": 0 if self.loader is None else self.loader.corrupt_skipped}

    def gather(self) -> None:
        """Collect every rank's :meth:`stream` for the next :meth:`state_dict` (every rank must call it)."""
        from accelerate.utils import gather_object

        self.ranks = gather_object([self.stream()])

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "world_size": self.world_size, "precision": self.precision,
                "ranks": self.ranks if self.ranks is not None else [self.stream()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = int(state.get("world_size", self.world_size))
        if saved != self.world_size:
            warnings.warn(f"the checkpoint was written by {saved} processes and is resumed by {self.world_size}: the "
                          "data position is per rank, so the sample stream does not continue exactly", stacklevel=2)
        precision = str(state.get("precision", "fp32"))  # checkpoints from before train.precision are fp32
        if precision != self.precision:
            raise SchemaError("train.precision", f"the checkpoint was written with train.precision={precision} and cannot be "
                              f"resumed with {self.precision}; resume it with train.precision={precision} or start a new --out")
        self.step = int(state["step"])
        # checkpoints from before per-rank streams hold the main process's only: every rank takes its position
        ranks = state.get("ranks") or [{"data": state["data"], "corrupt_skipped": int(state.get("corrupt_skipped", 0))}]
        if saved == self.world_size and len(ranks) == saved:
            mine, skipped = ranks[self.rank], int(ranks[self.rank]["corrupt_skipped"])
        else:  # another process count: positions cannot carry over exactly; the skipped total stays on rank 0
            mine = ranks[min(self.rank, len(ranks) - 1)]
            skipped = sum(int(r["corrupt_skipped"]) for r in ranks) if self.rank == 0 else 0
        if self.loader is not None:
            if mine["data"] is not None:
                self.loader.load_state_dict(mine["data"])
            self.loader.corrupt_skipped = skipped


@dataclass
class TrainResult:
    """What :func:`train` returns: steps done, per-step metrics and checkpoint paths."""

    step: int
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)


def step_generator(seed: int, rank: int, step: int, micro: int, device: torch.device) -> torch.Generator:
    """The generator of one micro-batch: a pure function of ``(seed, rank, step, micro)``."""
    state = np.random.SeedSequence([seed, rank, step, micro]).generate_state(2, dtype=np.uint32)
    g = torch.Generator(device=device)
    g.manual_seed(int(state[0]) << 31 ^ int(state[1]))
    return g


def snr_rescale_betas(num_train_timesteps: int, beta_start: float, beta_end: float, snr_rescale: float) -> torch.Tensor:
    """MVGenMaster's ``snr_rescale`` betas (float32, as its scheduler computes them): scaled-linear betas
    ``beta``, per-step SNR ``(1 - beta) / beta`` divided by ``sqrt(snr_rescale)``, ``beta' = 1 / (SNR' + 1)``."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    snr = (1 - betas) / betas / math.sqrt(snr_rescale)
    return 1 / (snr + 1)


def make_noise_scheduler(cfg: TrainConfig) -> "DDPMScheduler":
    """The DDPM training scheduler of the config (SD2.1 defaults: scaled-linear betas, v-prediction).

    ``snr_rescale`` is passed to diffusers as ``trained_betas`` (:func:`snr_rescale_betas`); diffusers then
    applies ``rescale_betas_zero_snr`` to them, as the official scheduler does.
    """
    from diffusers import DDPMScheduler

    d = cfg.diffusion
    kwargs: dict[str, Any] = {"beta_schedule": d.beta_schedule}
    if d.beta_schedule == "snr_rescale":
        kwargs = {"trained_betas": snr_rescale_betas(d.num_train_timesteps, d.beta_start, d.beta_end, d.snr_rescale).numpy()}
    return DDPMScheduler(
        num_train_timesteps=d.num_train_timesteps,
        beta_start=d.beta_start,
        beta_end=d.beta_end,
        prediction_type=d.prediction_type,
        rescale_betas_zero_snr=d.rescale_betas_zero_snr,
        **kwargs,
    )


def batch_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move the tensors of a batch dict to ``device`` (non-tensors such as ``tag`` are kept)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}



class DiffusionInputs(NamedTuple):
    """The denoising problem of one batch (:func:`diffusion_inputs`)."""

    latents: torch.Tensor
    """``[B, F, C, h, w]`` clean latents."""
    timesteps: torch.Tensor
    """``[B]`` long, one per sample."""
    model_input: torch.Tensor
    """``[B, F, C, h, w]``: the clean latents of the references, the noised latents of the targets."""
    target: torch.Tensor
    """``[B, F, C, h, w]``: what the model predicts (velocity, noise or sample, ``diffusion.prediction_type``)."""


def diffusion_inputs(
    codec: "LatentCodec",
    noise_scheduler: "DDPMScheduler",
    images: torch.Tensor,
    ref_mask: torch.Tensor,
    cfg: TrainConfig,
    generator: torch.Generator,
    *,
    timestep: int | None = None,
) -> DiffusionInputs:
    """Latents of ``images`` ``[B, F, 3, H, W]``, one uniform timestep per sample (or ``timestep`` for every
    sample), noise, the model input (references, ``ref_mask`` ``[B, F]``, stay clean) and the target, in
    the numerics of ``cfg.train.precision``: all in the latents' dtype (fp32, or bf16 for ``official_bf16``,
    where ``add_noise`` and the velocity are then computed in bf16 as in the official run). Draws from
    ``generator`` in this order: the codec's posterior sample, the timesteps, the noise.
    """
    from cameo_corr.train.model import noise_targets
    from cameo_corr.train.precision import encode_latents

    B = images.shape[0]
    device = images.device
    latents = encode_latents(codec, images, generator, cfg.train.precision)
    T = int(noise_scheduler.config.num_train_timesteps)
    if timestep is None:
        t = torch.randint(0, T, (B,), generator=generator, device=device)
    else:
        t = torch.full((B,), int(timestep), device=device, dtype=torch.long)
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    model_in = noise_targets(latents, noise_scheduler.add_noise(latents, noise, t), ref_mask)
    prediction = cfg.diffusion.prediction_type
    if prediction == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, t)
    elif prediction == "epsilon":
        target = noise
    else:
        target = latents
    return DiffusionInputs(latents, t, model_in, target)


def compute_losses(
    trainable: nn.Module,
    head_mlp: nn.Module | None,
    codec: "LatentCodec",
    noise_scheduler: "DDPMScheduler",
    batch: dict[str, Any],
    cfg: TrainConfig,
    grid: tuple[int, int],
    generator: torch.Generator,
    *,
    timestep: int | None = None,
    camera_dropout: bool = True,
) -> dict[str, torch.Tensor]:
    """Losses and attention precision of one batch (already on the model's device).

    Returns ``loss`` (diffusion + ``cameo_weight`` * CAMEO; what is back-propagated), ``diffusion``,
    ``cameo`` (the CAMEO term; ``nan`` when ``head_mlp`` is ``None``, i.e. lambda = 0, or when the term
    is skipped), ``precision`` (attention correspondence precision of the supervised layer on the token
    ``grid``; ``nan`` when no query is masked), ``cameo_applied`` (whether the CAMEO term is in ``loss``)
    and ``cameo_nan`` (whether it was left out because it was NaN). A skipped term (empty official
    selection, or NaN) adds an exact 0 that back-propagates zero gradients into the head MLP, so that DDP
    sees a gradient for every parameter on every rank. ``timestep`` fixes every sample's timestep
    (evaluation); ``camera_dropout=False`` keeps every camera condition. All randomness comes from
    ``generator``. The numerics follow ``cfg.train.precision`` (:mod:`cameo_corr.train.precision`).
    """
    from cameo_corr.train.loss import attention_precision, cameo_loss
    from cameo_corr.train.model import camera_rays, domain_labels
    from cameo_corr.train.precision import OFFICIAL_DTYPE

    images = batch["image"]
    B, F, _, H, W = images.shape
    device = images.device
    ref_mask = torch.arange(F, device=device)[None, :] < batch["num_ref"].to(device)[:, None]
    latents, t, model_in, target = diffusion_inputs(codec, noise_scheduler, images, ref_mask, cfg, generator, timestep=timestep)
    m = cfg.model
    if m.ref_timestep == "zero":  # references are clean: t = 0
        timesteps = torch.where(ref_mask, torch.zeros_like(t)[:, None], t[:, None])
    else:  # the sample's timestep on every view (official)
        timesteps = t
    drop_p = m.cond_dropout if camera_dropout else 0.0
    draws = 1 if m.cond_dropout_scope == "batch" else B
    drop = (torch.rand((draws,), generator=generator, device=device) < drop_p).expand(B)
    ray_hw = tuple(latents.shape[-2:]) if m.cond_encoder == "latent" else (H, W)
    plucker = camera_rays(batch["intrinsic"], batch["extrinsic"], ray_hw, (H, W), norm=m.camera_norm)
    labels = domain_labels(batch["tag"], m.domain_dict, device) if m.domain_dict is not None else None
    out = trainable(model_in, timesteps, plucker=plucker, ref_mask=ref_mask, class_labels=labels, drop_camera=drop,
                    return_logits=True)

    err = (out.sample.float() - target.float()).pow(2).mean(dim=(2, 3, 4))  # [B, F]
    diffusion = err[~ref_mask].mean()
    qk = out.qk._replace(logit_dtype=OFFICIAL_DTYPE) if cfg.train.precision == "official_bf16" else out.qk
    term, nan_term = None, False
    if head_mlp is not None:
        term = cameo_loss(qk, batch["corr_nn"], batch["corr_mask"], batch["corr_dist"], head_mlp, mode=cfg.loss.mode,
                          ref_views=ref_mask, query_chunk=cfg.loss.query_chunk, when_skipped="none")
        if term is not None and bool(torch.isnan(term)):
            term, nan_term = None, True
    if term is not None:
        cameo, loss = term.detach(), diffusion + cfg.loss.cameo_weight * term
    else:
        cameo = torch.full((), float("nan"), device=device)
        loss = diffusion if head_mlp is None else diffusion + zero_gradients_into(head_mlp)
    with torch.no_grad():
        precision = attention_precision(qk.detach(), batch["corr_nn"], batch["corr_mask"], grid,
                                        query_chunk=cfg.loss.query_chunk)
    return {"loss": loss, "diffusion": diffusion.detach(), "cameo": cameo, "precision": precision.detach(),
            "cameo_applied": term is not None, "cameo_nan": nan_term}


def zero_gradients_into(module: nn.Module) -> torch.Tensor:
    """An exact 0 (fp32 scalar) whose gradient into every parameter of ``module`` is exactly zero, whatever
    the parameters hold (NaN included)."""
    total = torch.stack([p.float().sum() for p in module.parameters()]).sum()
    return (total * 0.0).nan_to_num(0.0, 0.0, 0.0)


# ------------------------------------------------------------------------------------ checkpoints
def checkpoint_dirs(out: str | Path) -> list[Path]:
    """Finished checkpoints under ``<out>/checkpoints`` (``step-<N>``), oldest first."""
    root = Path(out) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CKPT_RE.match(p.name)) and (p / "loop_state.json").is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(out: str | Path, resume: str) -> Path | None:
    """The checkpoint to resume from: ``auto`` (latest under ``out``, if any), ``never``, or a path."""
    if resume == "never":
        return None
    if resume == "auto":
        found = checkpoint_dirs(out)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "loop_state.json").is_file():
        raise SchemaError("resume", "not a finished checkpoint (no loop_state.json)", where=str(path))
    return path


# ------------------------------------------------------------------------------------------ setup
def make_loader(cfg: TrainConfig, *, cache: "str | None" = None, rank: int, world_size: int, split: str | None = None,
                seed: int | None = None, num_epochs: int | None = None, pin_memory: bool = False,
                mask_policy: str | None = None, grid: tuple[int, int] | None = None,
                configs: "Mapping[str, CacheConfig] | None" = None,
                storage_options: "Mapping[str, Any] | None" = None) -> "StreamLoader":
    """The training stream of this rank (``cfg.data``), as a resumable loader (``pin_memory`` for CUDA training;
    ``split``, ``seed`` and ``mask_policy`` override ``cfg.data``'s; ``grid`` is the token grid read from
    caches that store several, default the (first) cache's primary grid). ``cache`` reads that one cache;
    ``None`` reads ``data.cache`` or the mixture ``data.caches``. ``configs``: the caches' ``cache.json``
    read already, by path (see :func:`~cameo_corr.train.config.read_cache_configs`). ``storage_options``:
    fsspec options of the caches given by URL (``--storage-option``; never written to the run's config)."""
    from cameo_corr.train.config import data_sources
    from cameo_corr.train.data import CorrStreamDataset, StreamLoader

    d = cfg.data
    mixture = data_sources(d) if cache is None else None
    source = cache if cache is not None else (mixture if mixture is not None else d.cache)
    if source is None:
        raise SchemaError("data.cache", "no cache given (use --cache, data.cache or data.caches in the config)")
    dataset = CorrStreamDataset(
        source,
        storage_options=storage_options,
        num_views=d.num_views,
        resolution=d.resolution,
        min_ref=d.min_ref,
        max_ref=d.max_ref,
        order=d.order,
        shuffle_prob=d.shuffle_prob,
        order_scope=d.order_scope,
        tags=d.tags,
        seed=d.seed if seed is None else seed,
        shard_shuffle=d.shard_shuffle,
        window_shuffle=d.window_shuffle,
        shuffle_shards=d.shuffle_shards,
        shuffle_buffer=d.shuffle_buffer,
        rank=rank,
        world_size=world_size,
        batch_size=d.batch_size,
        num_workers=d.num_workers,
        num_epochs=num_epochs,
        dataset_root=d.dataset_root if mixture is None else None,
        split=d.split if split is None else split,
        scenes_file=d.scenes_file,
        min_mask_frac=d.min_mask_frac,
        tau=d.tau,
        mask_policy=d.mask_policy if mask_policy is None else mask_policy,
        visibility_tol=d.visibility_tol,
        on_corrupt=d.on_corrupt,
        grid=grid,
        local_cache=d.local_cache,
        local_cache_bytes=d.local_cache_bytes,
        local_cache_prefetch=d.local_cache_prefetch,
        configs=configs,
    )
    return StreamLoader(dataset, num_workers=d.num_workers, multiprocessing_context=d.multiprocessing_context,
                        pin_memory=pin_memory)


@torch.no_grad()
def evaluate(
    trainable: nn.Module,
    head_mlp: nn.Module | None,
    codec: "LatentCodec",
    noise_scheduler: "DDPMScheduler",
    batches: Iterable[dict[str, Any]],
    cfg: TrainConfig,
    grid: tuple[int, int],
    device: torch.device,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Mean losses and precision over fixed batches at the fixed timestep ``cfg.eval.timestep``,
    with fixed noise and no camera dropout (comparable between runs and steps). A batch without a value
    (no CAMEO term, no masked query) does not count. ``reduce_sum`` (a sum over processes, every rank
    calling it) makes them the means over every rank's batches."""
    was_training = trainable.training
    trainable.eval()
    sums: dict[str, list[float]] = {}
    try:
        for i, batch in enumerate(batches):
            g = step_generator(cfg.eval.seed, 0, 0, i, device)
            m = compute_losses(trainable, head_mlp, codec, noise_scheduler, batch_to(batch, device), cfg, grid, g,
                               timestep=cfg.eval.timestep, camera_dropout=False)
            for k in ("diffusion", "cameo", "precision"):
                sums.setdefault(k, []).append(float(m[k]))
    finally:
        trainable.train(was_training)
    # the same keys in the same order on every rank
    return {f"eval_{k}": mean_known(torch.tensor(v, dtype=torch.float64, device=device), reduce_sum) for k, v in sums.items()}


def mean_known(values: torch.Tensor, reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """The mean of the non-NaN entries of ``values`` (NaN when there is none); with ``reduce_sum`` (a sum over
    processes, which every rank calls) the mean over every rank's entries."""
    known = ~torch.isnan(values)
    total = torch.stack([values[known].sum(), known.sum().to(values.dtype)])
    if reduce_sum is not None:
        total = reduce_sum(total)
    return float(total[0] / total[1]) if float(total[1]) > 0 else math.nan


class Trainer:
    """Builds everything from a :class:`TrainConfig` and runs optimizer steps (see :func:`train`)."""

    def __init__(self, cfg: TrainConfig, out: str | Path, configs: "Mapping[str, CacheConfig] | None" = None,
                 storage_options: "Mapping[str, Any] | None" = None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed
        from diffusers.optimization import get_scheduler

        from cameo_corr.train.loss import HeadMLP
        from cameo_corr.train.model import build_model

        from cameo_corr.train.config import data_sources

        mixture = data_sources(cfg.data)
        if cfg.data.cache is None and mixture is None:
            raise SchemaError("data.cache", "no cache given (use --cache, data.cache or data.caches in the config)")
        self.cfg = cfg
        self.out = Path(out)
        r = cfg.train
        self.accelerator: Accelerator = Accelerator(
            mixed_precision=r.mixed_precision,
            gradient_accumulation_steps=r.gradient_accumulation_steps,
            log_with="tensorboard" if r.tensorboard else None,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")),
        )
        acc = self.accelerator
        set_seed(r.seed)
        model, codec = build_model(
            pretrained=cfg.model.pretrained,
            layer=cfg.model.layer,
            vae=cfg.model.vae,
            cond_dropout=cfg.model.cond_dropout,
            gradient_checkpointing=cfg.model.gradient_checkpointing,
            **cfg.model.recipe(),
            **cfg.model.options,
        )
        latent_hw = codec.latent_size((cfg.data.resolution, cfg.data.resolution))
        self.configs: dict[str, CacheConfig] = read_cache_configs(cfg, configs, storage_options)
        """Every cache's ``cache.json``, read once for the whole run (training and evaluation streams)."""
        self.grid: tuple[int, int] = [model.check_grid(latent_hw, self.configs[str(p)].grids, cache=str(p))
                                      for p in training_cache_paths(cfg)][0]
        """The supervised layer's token grid (every cache must store it): the grid read from caches that store several."""
        if cfg.eval.every > 0 and cfg.eval.cache is not None:
            model.check_grid(latent_hw, self.configs[str(cfg.eval.cache)].grids, cache=str(cfg.eval.cache))
        head_mlp = HeadMLP(model.heads) if cfg.loss.cameo_weight > 0 else None
        trainable = CameoTrainable(model, head_mlp)
        self.master: MasterWeights | None = None
        """fp32 master weights of the bf16 model (``train.precision: official_bf16``); ``None`` for fp32."""
        self.optimized: list[nn.Parameter] = [p for p in trainable.parameters() if p.requires_grad]
        """The parameters the optimizer updates (the model's own, or the fp32 masters)."""
        self.head_params: list[nn.Parameter] = [] if head_mlp is None else list(head_mlp.parameters())
        """The head MLP's parameters as the optimizer sees them (``loss.skipped_grad``)."""
        if r.precision == "official_bf16":
            from cameo_corr.train.precision import OFFICIAL_DTYPE, MasterWeights

            trainable.to(acc.device)
            self.master = MasterWeights(trainable, OFFICIAL_DTYPE)  # casts the UNet and head MLP to bf16
            codec = codec.to(OFFICIAL_DTYPE)
            self.optimized, self.head_params = self.master.params, self.master.subset("head_mlp.")
        o = cfg.optim
        optimizer = torch.optim.AdamW(self.optimized, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        self.lr_scheduler = get_scheduler(o.lr_scheduler, optimizer, num_warmup_steps=o.warmup_steps, num_training_steps=r.max_steps)
        self.trainable, self.optimizer = acc.prepare(trainable, optimizer)
        self.codec = codec.to(acc.device)
        self.head_mlp = acc.unwrap_model(self.trainable).head_mlp
        self.noise_scheduler = make_noise_scheduler(cfg)
        pin = acc.device.type == "cuda"
        self.loader = make_loader(cfg, rank=acc.process_index, world_size=acc.num_processes, pin_memory=pin, grid=self.grid,
                                  configs=self.configs, storage_options=storage_options)
        self.state = LoopState(step=0, loader=self.loader, world_size=acc.num_processes, precision=r.precision,
                               rank=acc.process_index)
        self._micro = 0
        """Micro-batches done in the current optimizer step."""
        self._cameo_in_step = False
        """Whether a micro-batch of the current optimizer step (on this rank) had a CAMEO term."""
        # The frozen codec is saved only where its weights exist nowhere else (the tiny random VAE): a
        # pretrained VAE is reloaded from model.pretrained (~335 MB per checkpoint saved), identity has none.
        extra_state = [self.codec] if cfg.model.vae == "tiny" else []
        acc.register_for_checkpointing(self.lr_scheduler, self.state, *extra_state)
        self.eval_batches: list[dict[str, Any]] = []
        if cfg.eval.every > 0:
            eval_loader = make_loader(cfg, cache=cfg.eval.cache, rank=acc.process_index,
                                      world_size=acc.num_processes, split=cfg.eval.split, seed=cfg.eval.seed, num_epochs=1,
                                      mask_policy=cfg.eval.mask_policy, grid=self.grid, configs=self.configs,
                                      storage_options=storage_options)
            for batch in eval_loader:
                self.eval_batches.append(batch)
                if len(self.eval_batches) == cfg.eval.batches:
                    break
            if len(self.eval_batches) < cfg.eval.batches:
                raise SchemaError(
                    "eval.batches",
                    f"the evaluation windows give only {len(self.eval_batches)} batches of {cfg.data.batch_size} on this rank,"
                    f" fewer than eval.batches={cfg.eval.batches}",
                )

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over every process (a collective: every rank calls it)."""
        return self.accelerator.reduce(t, reduction="sum")

    # ----------------------------------------------------------------------------------- state
    def save(self) -> Path:
        """Write ``<out>/checkpoints/step-<N>`` (model + head MLP as safetensors, optimizer, LR
        schedule, data position, codec, RNG states, and the fp32 master weights of ``official_bf16``);
        prune to ``keep_checkpoints``."""
        from cameo_corr.train.precision import MASTER_FILE

        acc = self.accelerator
        path = self.out / CHECKPOINT_DIR / f"step-{self.state.step:08d}"
        self.state.gather()  # accelerate saves the loop state from the main process only: every rank's stream into it
        try:
            acc.save_state(str(path), safe_serialization=True)
            if self.master is not None and acc.is_main_process:
                self.master.save(path / MASTER_FILE)
            acc.wait_for_everyone()  # every rank's RNG state is on disk before the checkpoint is marked finished
            if acc.is_main_process:
                (path / "loop_state.json").write_text(json.dumps(self.state.state_dict()))
                keep = self.cfg.train.keep_checkpoints
                if keep is not None:
                    for old in checkpoint_dirs(self.out)[:-keep]:
                        shutil.rmtree(old)
            acc.wait_for_everyone()
        finally:
            self.state.ranks = None
        return path

    def load(self, path: str | Path) -> None:
        """Restore everything :meth:`save` wrote."""
        from cameo_corr.train.precision import MASTER_FILE

        self.accelerator.load_state(str(path))
        if self.master is not None:
            self.master.load(Path(path) / MASTER_FILE)

    def micro_step(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Train on one micro-batch (already on the training device) of the current optimizer step.

        Computes the losses (:func:`compute_losses`) and stops on a non-finite total loss
        (:class:`NonFiniteLoss`, naming the step, the rank, the micro-batch and the batch's window ids);
        a NaN CAMEO term is left out with a warning. Then backward; at the step's last micro-batch the
        head MLP's gradient rule (``loss.skipped_grad``), clipping, the optimizer step and, for
        ``official_bf16``, the rounding of the masters into the model. Returns the losses with
        ``synced`` (whether this micro-batch ended an optimizer step).
        """
        acc, cfg = self.accelerator, self.cfg
        g = step_generator(cfg.train.seed, acc.process_index, self.state.step, self._micro, acc.device)
        with acc.accumulate(self.trainable):
            m = compute_losses(self.trainable, self.head_mlp, self.codec, self.noise_scheduler, batch, cfg, self.grid, g)
            self._check_losses(m, batch)
            self._cameo_in_step |= bool(m["cameo_applied"])
            acc.backward(m["loss"])
            if acc.sync_gradients:
                self._finish_gradients()
            self.optimizer.step()
            if acc.sync_gradients and self.master is not None:
                self.master.to_model()
            self.optimizer.zero_grad(set_to_none=True)
        synced = bool(acc.sync_gradients)
        self._micro = 0 if synced else self._micro + 1
        return {**m, "synced": synced}

    def _where(self, batch: dict[str, Any]) -> str:
        """``step N (rank r, micro-batch k), windows a, b, ...`` of the micro-batch being trained."""
        windows = ", ".join(str(w) for w in batch.get("window_id", []))
        return (f"step {self.state.step + 1} (rank {self.accelerator.process_index}, micro-batch {self._micro}), "
                f"windows {windows}")

    def _check_losses(self, m: dict[str, Any], batch: dict[str, Any]) -> None:
        """Stop on a non-finite total loss; warn about a NaN CAMEO term that was left out."""
        if not bool(torch.isfinite(m["loss"].detach())):
            found = checkpoint_dirs(self.out)
            raise NonFiniteLoss(
                f"non-finite training loss {float(m['loss'].detach()):.6g} at {self._where(batch)}: diffusion {float(m['diffusion']):.6g}, "
                f"CAMEO {float(m['cameo']):.6g} (weight {self.cfg.loss.cameo_weight}); training stopped, as the official "
                f"code stops on a NaN loss; last checkpoint: {found[-1] if found else 'none'}", where=str(self.out))
        if m["cameo_nan"]:
            logger.warning("the CAMEO loss is NaN at %s: it is left out of this micro-batch's loss (the official code skips "
                           "a NaN CAMEO term)", self._where(batch))

    def _finish_gradients(self) -> None:
        """At the end of an optimizer step's backward passes: masters take the gradients
        (``official_bf16``); without any CAMEO term in the step on any rank, the head MLP's gradient is
        removed (``loss.skipped_grad: none``) or kept at zero (``zero``); then clipping."""
        acc, cfg = self.accelerator, self.cfg
        if self.master is not None:
            self.master.take_grads()
        if self.head_mlp is not None:
            had = torch.tensor([float(self._cameo_in_step)], device=acc.device)
            if acc.num_processes > 1:
                had = acc.reduce(had, reduction="sum")
            if float(had) == 0.0 and cfg.loss.skipped_grad == "none":
                for p in self.head_params:
                    p.grad = None
            self._cameo_in_step = False
        if cfg.optim.max_grad_norm is not None:
            acc.clip_grad_norm_(self.optimized, cfg.optim.max_grad_norm)

    # ------------------------------------------------------------------------------------ run
    def batches(self) -> Iterator[dict[str, Any]]:
        """The rank's batches on the training device, streamed forever from the current position."""
        while True:
            for batch in self.loader:
                yield batch_to(batch, self.accelerator.device)

    def run(self, max_steps: int | None = None, *, show_progress: bool = True) -> TrainResult:
        """Train until ``max_steps`` optimizer steps (default ``cfg.train.max_steps``) are done."""
        from tqdm.auto import tqdm

        acc, cfg = self.accelerator, self.cfg
        total = cfg.train.max_steps if max_steps is None else int(max_steps)
        result = TrainResult(step=self.state.step)
        if cfg.train.tensorboard:
            acc.init_trackers("cameo", config=_flat(cfg.to_dict()))
        metrics_path = self.out / METRICS_FILE
        progress = tqdm(total=total, initial=self.state.step, disable=not (show_progress and acc.is_local_main_process), desc="train", unit="step")
        stream = self.batches()
        acc_metrics: dict[str, list[torch.Tensor]] = {}
        skipped = 0
        t0 = time.perf_counter()
        try:  # the bar is closed before an error propagates: its last line comes before the error's
            while self.state.step < total:
                m = self.micro_step(next(stream))
                for k in ("loss", "diffusion", "cameo", "precision"):
                    acc_metrics.setdefault(k, []).append(m[k].detach().float())
                skipped += int(self.head_mlp is not None and not m["cameo_applied"])
                if not m["synced"]:
                    continue
                if not acc.optimizer_step_was_skipped:  # fp16: the grad scaler skipped an overflowing step
                    self.lr_scheduler.step()
                self.state.step += 1
                row = {"step": self.state.step, "lr": float(self.lr_scheduler.get_last_lr()[0])}
                for k, values in acc_metrics.items():  # the mean over every rank's micro-batches with a value
                    row[k] = mean_known(torch.stack(values), self.reduce_sum)
                if self.head_mlp is not None:  # micro-batches of the step (all ranks) without a CAMEO term
                    row["cameo_skipped"] = int(self.reduce_sum(torch.tensor([float(skipped)], device=acc.device)))
                acc_metrics, skipped = {}, 0
                row["corrupt_skipped"] = int(self.reduce_sum(torch.tensor([self.loader.corrupt_skipped], device=acc.device)))
                row["time"] = time.perf_counter() - t0
                if cfg.eval.every > 0 and (self.state.step % cfg.eval.every == 0 or self.state.step == total):
                    ev = evaluate(self.trainable, self.head_mlp, self.codec, self.noise_scheduler, self.eval_batches, cfg, self.grid,
                                  acc.device, reduce_sum=self.reduce_sum)
                    row.update(ev)
                    result.evals.append({"step": self.state.step, **ev})
                result.history.append(row)
                if acc.is_main_process:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                if cfg.train.tensorboard:
                    acc.log({k: v for k, v in row.items() if k != "step" and not math.isnan(v)}, step=self.state.step)
                progress.update(1)
                if self.state.step % cfg.train.log_every == 0 or self.state.step == total:
                    progress.set_postfix({k: f"{row[k]:.4g}" for k in ("diffusion", "cameo", "precision") if k in row}
                                         | ({"corrupt_skipped": row["corrupt_skipped"]} if row["corrupt_skipped"] else {}))
                every = cfg.train.checkpoint_every
                if (every and self.state.step % every == 0) or self.state.step == total:
                    result.checkpoints.append(str(self.save()))
        finally:
            progress.close()
        for tracker in acc.trackers:  # flush the logs; the process group stays up (end_training would destroy it)
            tracker.finish()
        result.step = self.state.step
        return result


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a nested config for tensorboard hparams (lists and None become strings)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, f"{key}."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def train(
    cfg: TrainConfig, out: str | Path, *, resume: str = "auto", max_steps: int | None = None, progress: bool = True,
    configs: "Mapping[str, CacheConfig] | None" = None, storage_options: "Mapping[str, Any] | None" = None,
) -> TrainResult:
    """Train from ``cfg`` writing into ``out`` (config, ``metrics.jsonl``, ``checkpoints/``; ``logs/`` with ``train.tensorboard``).

    ``resume``: ``auto`` continues from the latest checkpoint under ``out`` when there is one,
    ``never`` starts fresh (refusing an ``out`` that already has checkpoints), or a checkpoint path.
    ``max_steps`` overrides ``cfg.train.max_steps`` (the LR schedule still uses the config's value).
    ``progress=False`` hides the progress bar. ``configs``: the caches' ``cache.json`` read already, by path.
    ``storage_options``: fsspec options of the caches given by URL (not written to ``config.yaml``).
    """
    out = Path(out)
    start = resolve_resume(out, resume)
    if resume == "never" and checkpoint_dirs(out):
        raise SchemaError("resume", "output directory already has checkpoints; use --resume auto or a new --out", where=str(out))
    trainer = Trainer(cfg, out, configs, storage_options)
    if trainer.accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml())
        if start is None and (out / METRICS_FILE).exists():
            (out / METRICS_FILE).unlink()
    trainer.accelerator.wait_for_everyone()
    if start is not None:
        trainer.load(start)
        if trainer.accelerator.is_main_process:
            _truncate_metrics(out / METRICS_FILE, trainer.state.step)
    return trainer.run(max_steps, show_progress=progress)


def end_process_group() -> None:
    """End this process's part of a multi-process run (``accelerate launch`` / ``torchrun``) after it
    succeeded: wait for every rank, then destroy the default process group. Left to interpreter shutdown,
    a gloo group's worker threads can abort a process whose run succeeded (SIGABRT), and NCCL warns. Call
    it once the process needs no more collectives, and not after an error (a rank still inside a
    collective would never reach the barrier). A no-op in a single process."""
    from accelerate import PartialState

    state = PartialState()
    state.wait_for_everyone()
    state.destroy_process_group()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows after ``step`` (written by a run that was interrupted after its checkpoint)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(r + "\n" for r in rows))


def read_metrics(out: str | Path) -> list[dict[str, float]]:
    """The per-step metric rows of a run directory (``metrics.jsonl``)."""
    path = Path(out) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
