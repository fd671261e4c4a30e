"""The training configuration: a YAML file of sections mapped onto dataclasses.

A config file has the sections ``data``, ``model``, ``loss``, ``optim``, ``diffusion``, ``train`` and ``eval``
(all optional; missing keys take the defaults below). Overrides ``section.key=value`` (the value
parsed as YAML, e.g. ``train.max_steps=10``, ``model.layer=up_blocks.0.attentions.0``) are applied on
top. Unknown sections or keys and values of the wrong type raise :class:`SchemaError` naming the file
and the dotted key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from cameo_corr.pipeline.masks import DEFAULT_VISIBILITY_TOL, check_policy, check_tau, check_visibility_tol
from cameo_corr.schemas import CacheConfig, SchemaError

if typing.TYPE_CHECKING:  # pragma: no cover - typing only
    from cameo_corr.train.mixture import CacheSource


ORDER_POLICIES = ("mixed", "uniform_push", "shuffle", "capture")
"""How the ``F`` chosen views are reordered ``[references, targets]``:

* ``mixed`` (CAMEO's training default): ``shuffle`` with probability ``shuffle_prob`` (the official
  ``shuffle_train_rate``, 0.5), ``uniform_push`` otherwise;
* ``uniform_push`` (CAMEO's ``uniform_push_batch``): views in capture order; with one reference the
  view at index ``F // 2 - 1``, otherwise ``linspace(0, F - 1, num_ref)`` (truncated) are references;
  they are pushed to the front, the remaining views follow in capture order;
* ``shuffle`` (CAMEO's ``shuffle_batch``): a random permutation; its first ``num_ref`` views are
  references;
* ``capture``: capture order; the first ``num_ref`` views are references.

The number of references is drawn first, uniform in ``[min_ref, max_ref]`` (the official
``random.randint(min_cond_num, max_cond_num)``, ``[1, 3]`` for ``F = 4``), whatever the policy. What one
draw covers is :data:`ORDER_SCOPES`.
"""

ORDER_SCOPES = ("batch", "sample")
"""What one draw of the number of references, the ``shuffle``/``uniform_push`` choice and the permutation
covers (``data.order_scope``):

* ``batch`` (CAMEO's training code, which draws them once per loop iteration, ``train.py`` of
  cvlab-kaist/CAMEO around line 782, and permutes the whole batch, ``src/datasets/__init__.py``): every
  sample of a batch has the same number of references and the same order. The draw is a function of
  ``(seed, position of the batch's first sample in the rank's stream)``, so it is the same on every rank
  at the same step (the official ranks seed Python's ``random`` alike) and after a resume;
* ``sample``: each sample draws its own (the views chosen are the same in both scopes).
"""

WINDOW_SHUFFLES = ("block", "buffer")
"""How an epoch's windows are shuffled after the shards are (``data.window_shuffle``):

* ``block`` (default): the shuffled shards are cut into blocks of ``shuffle_shards`` consecutive shards
  and the windows of each block are permuted uniformly. A stream then holds ``shuffle_shards`` decoded
  shards per cache and decodes each shard once per epoch (per process); ``shuffle_shards`` of 64 windows
  each mix 256 windows by default (every order of a block's windows is equally likely);
* ``buffer`` (the previous policy): the windows, shard after shard, go through a seeded shuffle buffer of
  ``shuffle_buffer`` slots. Its stragglers outlive the 4 shard visits a process keeps, so a shard is
  decoded several times per epoch (about 4x with 64 slots over shards of 64).
"""

PRECISIONS = ("fp32", "official_bf16")
"""Training numerics (``train.precision``, :mod:`cameo_corr.train.precision`): ``fp32`` weights (autocast
per ``train.mixed_precision``), or ``official_bf16``, the numerics of the official DeepSpeed bf16 run."""

SKIPPED_GRADS = ("none", "zero")
"""The head MLP's gradient on an optimizer step without any CAMEO term (``loss.skipped_grad``)."""

CAMERA_NORMS = ("first_view", "official", "none")
"""Camera normalisations of :func:`cameo_corr.train.model.camera_rays` (``model.camera_norm``)."""

COND_ENCODERS = ("latent", "pixel")
"""Conditioning encoders (``model.cond_encoder``): ``latent`` (rays + reference mask at latent resolution,
one zero-initialised 3x3 convolution) or ``pixel`` (the official layout: target mask + rays at image
resolution through a stride-2 convolution stack)."""


def check_domain_dict(domain_dict: Mapping[str, int], where: str | None = None) -> int:
    """Validate a domain dictionary (an ``others`` entry, labels ``0..n-1`` all used) and return ``n``."""
    if "others" not in domain_dict:
        raise SchemaError("model.domain_dict", "needs an 'others' entry (the label of datasets it does not list)", where=where)
    labels = sorted({int(v) for v in domain_dict.values()})
    if labels != list(range(len(labels))):
        raise SchemaError("model.domain_dict", f"labels must be 0..n-1, got {labels}", where=where)
    return len(labels)


@dataclass
class DataConfig:
    """The streaming dataset (:class:`cameo_corr.train.data.CorrStreamDataset`)."""

    cache: str | None = None
    """Cache directory or fsspec URL (the CLI's ``--cache`` overrides it)."""
    caches: list[dict[str, Any]] | None = None
    """A mixture instead of ``cache``: entries ``{path, weight, tag, dataset_root, split, scenes_file,
    min_mask_frac}`` (:class:`cameo_corr.train.mixture.CacheSource`; ``weight`` is the share of samples
    per epoch, ``tag`` replaces the dataset tag of its samples)."""
    dataset_root: str | None = None
    """Read images from here instead of the dataset root recorded in the cache (one cache only)."""
    split: str | None = None
    """Only windows of this split (a mixture entry's own ``split`` replaces it)."""
    scenes_file: str | None = None
    """Only windows of the scenes listed in this file, one scene id per line."""
    min_mask_frac: float | None = None
    """Only windows with at least this share of masked query tokens (manifest ``mask_frac``)."""
    num_views: int = 4
    resolution: int = 64
    min_ref: int = 1
    max_ref: int | None = None
    order: str = "mixed"
    """View order policy: ``mixed`` (official: ``shuffle`` with probability ``shuffle_prob``, else
    ``uniform_push``), ``uniform_push``, ``shuffle`` or ``capture`` (:data:`ORDER_POLICIES`)."""
    shuffle_prob: float = 0.5
    """Probability of ``shuffle`` under ``order: mixed`` (the official ``shuffle_train_rate``)."""
    order_scope: str = "batch"
    """What one order draw covers: ``batch`` (official: one number of references and one order per batch)
    or ``sample`` (:data:`ORDER_SCOPES`)."""
    tags: dict[str, str] | None = None
    """Manifest ``dataset`` -> batch ``tag``; ``None``: :data:`cameo_corr.train.data.DEFAULT_TAGS`."""
    batch_size: int = 2
    window_shuffle: str = "block"
    """Window shuffle after the shard shuffle: ``block`` or ``buffer`` (:data:`WINDOW_SHUFFLES`)."""
    shuffle_shards: int = 4
    """``window_shuffle: block``: shards whose windows are permuted together (0: no window shuffle)."""
    shuffle_buffer: int = 64
    """``window_shuffle: buffer``: slots of the shuffle buffer."""
    shard_shuffle: bool = True
    num_workers: int = 0
    """DataLoader workers; above 1 the epoch order is dealt to them, one lane each (part of the order:
    :func:`~cameo_corr.train.data.deal_to_lanes`)."""
    multiprocessing_context: str | None = None
    seed: int = 0
    tau: float | None = None
    """Cycle-mask threshold in tokens; ``None``: the cache's (its stored ``mask``)."""
    mask_policy: str = "cycle"
    """Supervision mask: ``cycle``, ``visibility`` or ``both`` (:mod:`cameo_corr.pipeline.masks`)."""
    visibility_tol: float = DEFAULT_VISIBILITY_TOL
    """Relative depth tolerance of the visibility mask."""
    on_corrupt: str = "raise"
    """A window whose cached bytes fail their checksum: ``raise`` (stop naming it) or ``skip`` (count it)."""
    local_cache: str | None = None
    """Local directory holding copies of a remote cache's shard files (``s3://``, ``gs://``...), shared by
    the workers and ranks of a node (:class:`cameo_corr.cache.local_cache.LocalShardCache`); ``None``:
    read shards from the store. Ignored for local caches."""
    local_cache_bytes: int = 50 * 2**30
    """Byte budget of ``local_cache`` (least recently used shards are evicted)."""
    local_cache_prefetch: int = 2
    """Shards fetched ahead into ``local_cache``, in the epoch's order (0: none)."""


@dataclass
class ModelConfig:
    """The multi-view diffusion model (:mod:`cameo_corr.train.model`)."""

    pretrained: str | None = None
    """Local directory with SD2.1-architecture ``unet/`` and ``vae/`` subfolders; ``None``: tiny model."""
    layer: str | int = 0
    """Supervised self-attention layer: a processor name or CAMEO's index (sorted names)."""
    vae: str = "identity"
    """``identity`` (pixel-unshuffled image as latents), ``tiny`` (random tiny AutoencoderKL), or
    ``pretrained`` (the ``vae/`` subfolder of ``pretrained``)."""
    cond_dropout: float = 0.1
    """Probability of dropping the camera rays (classifier-free guidance; official ``cfg_training_rate``)."""
    cond_dropout_scope: str = "sample"
    """``sample``: an independent draw per sample; ``batch``: one draw drops the whole batch (official)."""
    gradient_checkpointing: bool = False
    qk_norm: bool = False
    """LayerNorm on queries and keys of every attention layer (official ``qk_norm``)."""
    no_text_cross_attn: bool = False
    """Remove text cross-attention (official ``no_text_cross_attn``)."""
    frame_local_width: int | None = None
    """Self-attention layers of this width attend within each frame only (official: 320)."""
    domain_dict: dict[str, int] | None = None
    """Dataset tag -> domain label of a zero-initialised class embedding; needs ``others`` (official
    ``domain_dict``: re10k 0, co3d 1, others 2). ``None``: no domain embedding."""
    cond_encoder: str = "latent"
    """``latent`` (rays + reference mask at latent resolution) or ``pixel`` (official: target mask + rays
    at image resolution through a stride-2 convolution stack)."""
    camera_norm: str = "first_view"
    """``first_view`` (relative to view 0, farthest centre at distance 1), ``official``
    (``normalize_extrinsic`` + ``normalize_t``) or ``none``."""
    ref_timestep: str = "zero"
    """Timestep of the clean reference views: ``zero`` or ``sample`` (the sample's timestep, official)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword options of the tiny model builder (e.g. ``block_out_channels``)."""

    def recipe(self) -> dict[str, Any]:
        """The recipe keyword arguments of :class:`~cameo_corr.train.model.MultiViewUNet` / ``build_model``."""
        return {
            "qk_norm": self.qk_norm,
            "no_text_cross_attn": self.no_text_cross_attn,
            "frame_local_width": self.frame_local_width,
            "domain_dict": self.domain_dict,
            "cond_encoder": self.cond_encoder,
        }


@dataclass
class LossConfig:
    """The CAMEO attention loss (:mod:`cameo_corr.train.loss`)."""

    cameo_weight: float = 0.02
    """lambda; 0 trains the plain diffusion baseline (precision is still measured)."""
    mode: str = "official"
    """``official`` (CAMEO's released code) or ``paper`` (eq. 1); see :mod:`cameo_corr.train.loss`."""
    query_chunk: int | None = 256
    """Recompute the logits of this many supervised query rows at a time under activation checkpointing
    (bounded memory: at 4 views of 32x32 tokens the full logits and the head MLP's activations take
    tens of GB); a layer with no more query tokens than this forms the full logit matrix, and so does
    ``None`` (``loss.query_chunk=null``) at any size."""
    skipped_grad: str = "none"
    """The head MLP's gradient on an optimizer step in which no micro-batch of any rank has a CAMEO term
    (the official skips: an empty reference- or target-query selection, or a NaN term). ``none``: no
    gradient, so AdamW leaves the head's weights and moments untouched (the official code's autograd: the
    term is never added); ``zero``: a zero gradient, so AdamW decays the weights and moves the moments,
    which is what DeepSpeed ZeRO-2 (the official ``train.sh``) makes of the missing gradient, since it
    fills it with zeros in its flat fp32 partition."""


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (``diffusers.optimization.get_scheduler``)."""

    lr: float = 2.5e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    lr_scheduler: str = "constant_with_warmup"
    warmup_steps: int = 0


@dataclass
class DiffusionConfig:
    """The DDPM noise schedule (``diffusers.DDPMScheduler``)."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    """A diffusers schedule (``scaled_linear``, ``linear``, ...) or ``snr_rescale`` (MVGenMaster's:
    scaled-linear betas with the per-step SNR ``(1 - beta) / beta`` divided by ``sqrt(snr_rescale)``)."""
    beta_start: float = 0.00085
    beta_end: float = 0.012
    snr_rescale: float = 1.0
    """The ``snr_rescale`` schedule's factor (official: 4)."""
    rescale_betas_zero_snr: bool = False
    """Rescale the betas to zero terminal SNR (Lin et al. 2023; official: true)."""
    prediction_type: str = "v_prediction"


@dataclass
class RunConfig:
    """The run: steps, precision, accumulation, checkpoints and logging."""

    max_steps: int = 100
    """Optimizer steps (each accumulates ``gradient_accumulation_steps`` batches)."""
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    """accelerate's autocast: ``no``, ``fp16`` or ``bf16``."""
    precision: str = "fp32"
    """``fp32``: fp32 weights in the forward and the optimizer, autocast per ``mixed_precision``;
    ``official_bf16``: the official run's numerics (bf16 weights with fp32 master copies, bf16 latents,
    noise and targets, bf16 supervised logits; needs ``mixed_precision: bf16``), see
    :mod:`cameo_corr.train.precision`."""
    seed: int = 0
    checkpoint_every: int = 0
    """Save a checkpoint every N optimizer steps (0: only at the end)."""
    keep_checkpoints: int | None = 3
    log_every: int = 10
    tensorboard: bool = False


@dataclass
class EvalConfig:
    """Periodic evaluation on fixed batches (fixed timestep, noise and view choices)."""

    every: int = 0
    """Evaluate every N optimizer steps and at the end (0: never)."""
    cache: str | None = None
    """Cache of the evaluation windows (``None``: the training cache or mixture)."""
    split: str | None = None
    batches: int = 4
    timestep: int = 500
    seed: int = 1234
    mask_policy: str | None = None
    """Mask of the evaluation targets (``None``: ``data.mask_policy``); fix it to compare runs trained
    with different masks on the same targets."""


@dataclass
class TrainConfig:
    """The whole training configuration (one section per dataclass)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON serialisable)."""
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        """The config as YAML text (loads back with :func:`load_config`)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _check_type(value: Any, tp: Any, key: str, where: str) -> Any:
    """Return ``value`` converted to the annotation ``tp`` or raise SchemaError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _check_type(value, arm, key, where)
            except SchemaError:
                continue
        raise SchemaError(key, f"{value!r} does not match {tp}", where=where)
    if tp is type(None):
        if value is None:
            return None
        raise SchemaError(key, f"expected null, got {value!r}", where=where)
    if tp is Any:
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise SchemaError(key, f"expected a list of {len(args)} values, got {value!r}", where=where)
        return tuple(_check_type(v, a, key, where) for v, a in zip(value, args))
    if origin is list:
        if not isinstance(value, list):
            raise SchemaError(key, f"expected a list, got {value!r}", where=where)
        (arg,) = typing.get_args(tp)
        return [_check_type(v, arg, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SchemaError(key, f"expected a mapping, got {value!r}", where=where)
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise SchemaError(key, f"expected true/false, got {value!r}", where=where)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise SchemaError(key, f"expected an integer, got {value!r}", where=where)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise SchemaError(key, f"expected a number, got {value!r}", where=where)
    if tp is str:
        if isinstance(value, str):
            return value
        raise SchemaError(key, f"expected a string, got {value!r}", where=where)
    raise SchemaError(key, f"unsupported annotation {tp}", where=where)


def _build(cls: type, values: Mapping[str, Any], prefix: str, where: str) -> Any:
    if not isinstance(values, Mapping):
        raise SchemaError(prefix, f"expected a mapping, got {values!r}", where=where)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise SchemaError(f"{prefix}.{unknown[0]}" if prefix else unknown[0], f"unknown key (known: {', '.join(sorted(names))})", where=where)
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        key = f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, key, where)
        else:
            kwargs[name] = _check_type(value, tp, key, where)
    return cls(**kwargs)


def parse_overrides(overrides: Sequence[str], where: str = "command line") -> dict[str, Any]:
    """``["train.max_steps=10", ...]`` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise SchemaError(item, "override must look like section.key=value", where=where)
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise SchemaError(key, "override key must be section.key", where=where)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SchemaError(key, f"value {text!r} is not valid YAML: {e}", where=where) from e
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise SchemaError(key, "conflicts with another override", where=where)
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) and k not in ("options", "domain_dict"):
            out[k] = _merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def config_from_dict(values: Mapping[str, Any], *, where: str = "config") -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from nested plain values."""
    cfg = _build(TrainConfig, values, "", where) if values else TrainConfig()
    validate_config(cfg, where)
    return cfg


PRESETS_DIR = Path(__file__).with_name("presets")
"""Built-in configs shipped with the package (``tiny_cpu``, ``sd21_cameo``)."""


def preset_names() -> list[str]:
    """Names of the built-in configs (usable wherever a config path is accepted)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    """Path of the built-in config ``name``; an unknown name is an error listing the presets."""
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise SchemaError("config", f"no built-in config {name!r}; presets: {', '.join(preset_names())}")
    return path


def training_cache_paths(cfg: TrainConfig) -> list[Any]:
    """The caches the training stream reads: the mixture's (``data.caches``) or ``data.cache`` (none when
    neither is set)."""
    mixture = data_sources(cfg.data)
    if mixture is not None:
        return [m.path for m in mixture]
    return [cfg.data.cache] if cfg.data.cache is not None else []


def read_cache_configs(cfg: TrainConfig, known: Mapping[str, CacheConfig] | None = None,
                       storage_options: Mapping[str, Any] | None = None) -> dict[str, CacheConfig]:
    """The ``cache.json`` of every cache ``cfg`` reads (``data.cache`` or the mixture's, and ``eval.cache``),
    by path as configured; the ones in ``known`` (read by the caller) are not read again.
    ``storage_options``: fsspec options of the caches given by URL."""
    from cameo_corr.cache.config import read_config
    from cameo_corr.cache.location import CacheLocation, options_for

    paths = training_cache_paths(cfg)
    if cfg.eval.every > 0 and cfg.eval.cache is not None:
        paths.append(cfg.eval.cache)
    if storage_options and not any("://" in str(p) for p in paths):
        raise SchemaError("storage_options", f"given, but no cache is a URL ({', '.join(map(str, paths))}); storage "
                          "options apply to s3:// and other URL caches")
    configs = dict(known or {})
    for path in paths:
        if str(path) not in configs:
            configs[str(path)] = read_config(CacheLocation(path, options_for(path, storage_options)))
    return configs


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config and apply ``section.key=value`` overrides.

    ``path`` is a YAML file, the name of a built-in preset (:func:`preset_names`, e.g. ``tiny_cpu``)
    or ``None`` for the defaults.
    """
    values: dict[str, Any] = {}
    where = "config"
    if path is not None and not Path(path).exists() and str(path) in preset_names():
        path = preset_path(str(path))
    if path is not None:
        where = str(path)
        if not Path(path).exists():
            raise SchemaError("config", f"no such file, and not a built-in preset ({', '.join(preset_names())})", where=where)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise SchemaError("<file>", f"cannot read: {e}", where=where) from e
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SchemaError("<yaml>", f"not valid YAML: {e}", where=where) from e
        if loaded is not None and not isinstance(loaded, dict):
            raise SchemaError("<yaml>", "top level must be a mapping of sections", where=where)
        values = loaded or {}
    values = _merge(values, parse_overrides(overrides))
    try:
        return config_from_dict(values, where=where)
    except SchemaError as e:
        given = next((o for o in overrides if _names(o.split("=", 1)[0].strip(), e.field)), None)
        if given is None:
            raise
        raise SchemaError(e.field, e.message, where=f"command-line override {given!r}") from None


def _names(key: str, field: str) -> bool:
    """Whether the override key ``key`` sets ``field`` (itself, or an item or key inside it: ``data.caches[0].path``)."""
    return field == key or field.startswith((f"{key}[", f"{key}."))


def validate_config(cfg: TrainConfig, where: str = "config") -> None:
    """Value checks that types alone do not express; errors name the dotted key."""
    d, r = cfg.data, cfg.train
    if d.num_views < 2:
        raise SchemaError("data.num_views", f"needs >= 2, got {d.num_views}", where=where)
    max_ref = d.num_views - 1 if d.max_ref is None else d.max_ref
    if not 1 <= d.min_ref <= max_ref <= d.num_views - 1:
        raise SchemaError("data.min_ref", f"need 1 <= min_ref <= max_ref <= num_views - 1, got {d.min_ref}, {max_ref}", where=where)
    for key, value in (("data.resolution", d.resolution), ("data.batch_size", d.batch_size), ("train.max_steps", r.max_steps),
                       ("train.gradient_accumulation_steps", r.gradient_accumulation_steps), ("train.log_every", r.log_every)):
        if value <= 0:
            raise SchemaError(key, f"must be positive, got {value}", where=where)
    data_sources(d, where)  # the mixture entries and the window selection
    if d.tau is not None:
        check_tau(d.tau, "data.tau", where)
    check_policy(d.mask_policy, "data.mask_policy", where)
    check_visibility_tol(d.visibility_tol, "data.visibility_tol", where)
    if cfg.eval.mask_policy is not None:
        check_policy(cfg.eval.mask_policy, "eval.mask_policy", where)
    if d.multiprocessing_context not in (None, "fork", "spawn", "forkserver"):
        raise SchemaError("data.multiprocessing_context", f"expected fork, spawn or forkserver, got {d.multiprocessing_context!r}", where=where)
    _validate_local_cache(d, where)
    if r.mixed_precision not in ("no", "fp16", "bf16"):
        raise SchemaError("train.mixed_precision", f"expected no, fp16 or bf16, got {r.mixed_precision!r}", where=where)
    if cfg.loss.mode not in ("official", "paper"):
        raise SchemaError("loss.mode", f"expected official or paper, got {cfg.loss.mode!r}", where=where)
    if d.order not in ORDER_POLICIES:
        raise SchemaError("data.order", f"expected mixed, uniform_push, shuffle or capture, got {d.order!r}", where=where)
    if d.order_scope not in ORDER_SCOPES:
        raise SchemaError("data.order_scope", f"expected one of {', '.join(ORDER_SCOPES)}, got {d.order_scope!r}", where=where)
    if r.precision not in PRECISIONS:
        raise SchemaError("train.precision", f"expected one of {', '.join(PRECISIONS)}, got {r.precision!r}", where=where)
    if r.precision == "official_bf16" and r.mixed_precision != "bf16":
        raise SchemaError("train.precision", "official_bf16 runs the UNet under bf16 autocast as the official code does; "
                          f"set train.mixed_precision=bf16 as well (it is {r.mixed_precision!r})", where=where)
    if cfg.loss.skipped_grad not in SKIPPED_GRADS:
        raise SchemaError("loss.skipped_grad", f"expected one of {', '.join(SKIPPED_GRADS)}, got {cfg.loss.skipped_grad!r}", where=where)
    if not 0.0 <= d.shuffle_prob <= 1.0:
        raise SchemaError("data.shuffle_prob", f"must be in [0, 1], got {d.shuffle_prob}", where=where)
    if d.window_shuffle not in WINDOW_SHUFFLES:
        raise SchemaError("data.window_shuffle", f"expected one of {', '.join(WINDOW_SHUFFLES)}, got {d.window_shuffle!r}", where=where)
    if d.shuffle_shards < 0 or d.shuffle_buffer < 0:
        field = "data.shuffle_shards" if d.shuffle_shards < 0 else "data.shuffle_buffer"
        raise SchemaError(field, f"must be >= 0, got {d.shuffle_shards if d.shuffle_shards < 0 else d.shuffle_buffer}", where=where)
    if cfg.loss.query_chunk is not None and cfg.loss.query_chunk < 1:
        raise SchemaError("loss.query_chunk", f"must be >= 1, got {cfg.loss.query_chunk}", where=where)
    if cfg.loss.cameo_weight < 0:
        raise SchemaError("loss.cameo_weight", f"must be >= 0, got {cfg.loss.cameo_weight}", where=where)
    _validate_recipe(cfg, where)
    if cfg.diffusion.prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise SchemaError("diffusion.prediction_type", f"unknown {cfg.diffusion.prediction_type!r}", where=where)
    e = cfg.eval
    if e.every < 0 or e.batches <= 0:
        raise SchemaError("eval.every" if e.every < 0 else "eval.batches", f"need every >= 0 and batches > 0, got {e.every}, {e.batches}", where=where)
    if not 0 <= e.timestep < cfg.diffusion.num_train_timesteps:
        raise SchemaError("eval.timestep", f"must be in [0, {cfg.diffusion.num_train_timesteps}), got {e.timestep}", where=where)
    if r.keep_checkpoints is not None and r.keep_checkpoints < 1:
        raise SchemaError("train.keep_checkpoints", f"must be >= 1 or null (keep all), got {r.keep_checkpoints}", where=where)
    if r.checkpoint_every < 0:
        raise SchemaError("train.checkpoint_every", f"must be >= 0, got {r.checkpoint_every}", where=where)


def _validate_local_cache(d: DataConfig, where: str) -> None:
    """Checks of ``data.local_cache*`` (a local directory, a positive budget, a prefetch depth >= 0)."""
    if d.local_cache is not None and "://" in d.local_cache:
        raise SchemaError("data.local_cache", f"must be a local directory, got the URL {d.local_cache!r}", where=where)
    if isinstance(d.local_cache_bytes, bool) or d.local_cache_bytes <= 0:
        raise SchemaError("data.local_cache_bytes", f"must be a positive number of bytes, got {d.local_cache_bytes!r}", where=where)
    if d.local_cache_prefetch < 0:
        raise SchemaError("data.local_cache_prefetch", f"must be >= 0, got {d.local_cache_prefetch}", where=where)


def data_sources(d: DataConfig, where: str = "config") -> "list[CacheSource] | None":
    """The mixture of ``data.caches`` as :class:`~cameo_corr.train.mixture.CacheSource` entries
    (``None`` without a mixture); errors name ``data.caches[i].<key>``."""
    from cameo_corr.cache.select import WindowSelection
    from cameo_corr.train.mixture import CacheSource

    try:
        WindowSelection(d.split, d.scenes_file, d.min_mask_frac)
    except SchemaError as e:
        raise SchemaError(f"data.{e.field}", e.message, where=where) from None
    if d.caches is None:
        return None
    if d.cache is not None:
        raise SchemaError("data.caches", "give either data.cache (or --cache) or data.caches (a mixture), not both", where=where)
    if not d.caches:
        raise SchemaError("data.caches", "a mixture needs at least one entry {path, weight, tag}", where=where)
    if d.dataset_root is not None:
        raise SchemaError("data.dataset_root", "applies to data.cache only; give a mixture entry its own dataset_root", where=where)
    return [CacheSource.from_dict(entry, f"data.caches[{i}]", where) for i, entry in enumerate(d.caches)]


def _validate_recipe(cfg: TrainConfig, where: str) -> None:
    """Checks of the model-recipe and noise-schedule options."""
    m, d = cfg.model, cfg.diffusion
    for key, value, allowed in (("model.cond_encoder", m.cond_encoder, COND_ENCODERS), ("model.camera_norm", m.camera_norm, CAMERA_NORMS),
                                ("model.cond_dropout_scope", m.cond_dropout_scope, ("sample", "batch")),
                                ("model.ref_timestep", m.ref_timestep, ("zero", "sample"))):
        if value not in allowed:
            raise SchemaError(key, f"expected one of {', '.join(allowed)}, got {value!r}", where=where)
    if not 0.0 <= m.cond_dropout <= 1.0:
        raise SchemaError("model.cond_dropout", f"must be in [0, 1], got {m.cond_dropout}", where=where)
    if m.frame_local_width is not None and m.frame_local_width < 1:
        raise SchemaError("model.frame_local_width", f"must be a positive width or null, got {m.frame_local_width}", where=where)
    if m.domain_dict is not None:
        if not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in m.domain_dict.items()):
            raise SchemaError("model.domain_dict", f"expected a mapping of dataset tag -> integer label, got {m.domain_dict!r}", where=where)
        check_domain_dict(m.domain_dict, where)
    if d.snr_rescale <= 0:
        raise SchemaError("diffusion.snr_rescale", f"must be > 0, got {d.snr_rescale}", where=where)
    if d.snr_rescale != 1.0 and d.beta_schedule != "snr_rescale":
        raise SchemaError("diffusion.snr_rescale", f"only applies to beta_schedule snr_rescale, not {d.beta_schedule!r}", where=where)
