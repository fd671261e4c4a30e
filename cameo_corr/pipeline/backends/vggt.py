"""The ``vggt`` backend: facebookresearch VGGT (Visual Geometry Grounded Transformer) as a geometry backend.

VGGT is an optional extra that is not on PyPI; it is imported only when this backend is built::

    pip install git+https://github.com/facebookresearch/vggt
    pip install 'cameo-corr[vggt]'      # einops, huggingface_hub, safetensors

Pipeline of one batch of windows with equal S (all on the backend's device):

1. canonical views ``[S, H, W, 3]`` uint8 -> ``[B, S, 3, 518, 518]`` floats in ``[0, 1]`` (bicubic,
   antialiased, as VGGT's own loader);
2. the network, fp32 on CPU, ``torch.autocast`` with bf16 (compute capability >= 8) or fp16 on CUDA;
   only the aggregator, the camera head and the one dense head the pointmap uses run (outputs
   identical to ``VGGT.forward``'s for that head, without the cost of the other one);
3. cameras from ``pose_enc`` (``[t, quaternion xyzw, fov_h, fov_w]``, world-to-camera, view 0 ~
   identity): VGGT's principal point ``(W/2, H/2)`` uses integer pixel centres, so it is shifted by
   +0.5 and the intrinsics are scaled to the window's pixels (exact in the +0.5 convention);
4. validity at network resolution (finite, depth > 0, confidence thresholds), then resized so an
   output pixel is valid only if every contributing network pixel is valid;
5. ``points="depth"`` (default): the depth map is resized bilinearly to the window size and
   unprojected with the mapped cameras (every point lies on its pixel's ray); ``points="head"``: the
   point head's ``world_points`` are resized bilinearly. ``conf`` is ``depth_conf`` or
   ``world_points_conf`` accordingly (recorded in :meth:`VGGTBackend.describe`).

Points and extrinsics are VGGT's: the first view's camera frame, up to an unknown scale.
"""

from __future__ import annotations

import contextlib
import functools
import math
from pathlib import Path
from typing import Any, ClassVar, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cameo_corr.pipeline.backends import GeometryBackend
from cameo_corr.pipeline.backends.geometry import (
    cameras_ok,
    decode_vggt_pose,
    rescale_intrinsics,
    resize_maps,
    resize_valid,
    unproject_depth,
)
from cameo_corr.schemas import CameoCorrError, PointmapResult, WindowData

DEFAULT_MODEL_ID = "facebook/VGGT-1B"
VGGT_RESOLUTION = 518
"""Side of VGGT's square input (a multiple of its patch size 14)."""
DEFAULT_FRAMES_CHUNK_SIZE = 8
"""Frames per DPT-head pass (``DPTHead.forward``'s default, what ``VGGT.forward`` uses)."""
INSTALL_HINT = (
    "install it with `pip install git+https://github.com/facebookresearch/vggt` and the extra "
    "`pip install 'cameo-corr[vggt]'` (einops, huggingface_hub, safetensors)"
)
POINT_SOURCES = ("depth", "head")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS = "model.safetensors"


class CheckpointError(CameoCorrError, ValueError):
    """A checkpoint file that does not hold the weights of the model it is loaded into."""

    def __init__(self, path: str | Path, message: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {message}")


class PredictionError(CameoCorrError, RuntimeError):
    """The network's output for a window cannot be turned into a pointmap (e.g. a degenerate camera)."""


# ------------------------------------------------------------------------------------ loading
def import_vggt_class() -> type[nn.Module]:
    """The ``vggt.models.vggt.VGGT`` class, or an :class:`ImportError` with the install hint."""
    try:
        from vggt.models.vggt import VGGT
    except ImportError as e:
        raise ImportError(f"the 'vggt' geometry backend needs the vggt package ({e}); {INSTALL_HINT}") from e
    return VGGT


def checkpoint_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes stored in a ``.safetensors`` or torch checkpoint, without loading tensors
    into memory (safetensors header / memory-mapped ``torch.load(weights_only=True)``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "checkpoint file not found")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    state = _torch_load(path)
    return {k: tuple(v.shape) for k, v in state.items()}


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
        raise CheckpointError(path, f"cannot be read as a torch checkpoint: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(path, "expected a flat state dict of tensors")
    return state


def verify_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Raise :class:`CheckpointError` naming ``path`` unless it holds exactly ``model``'s parameters
    (same names, same shapes). ``PyTorchModelHubMixin.from_pretrained`` loads with ``strict=False``,
    which would silently keep random weights for every missing key."""
    stored = checkpoint_shapes(path)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(stored) if expected[k] != stored[k])
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched)):
            if keys:
                parts.append(f"{len(keys)} {label} key(s) (e.g. {', '.join(keys[:3])})")
        raise CheckpointError(path, f"does not match {type(model).__name__}: " + "; ".join(parts))


def load_state_dict_strict(model: nn.Module, path: str | Path) -> None:
    """Load a ``.safetensors`` or torch checkpoint file into ``model`` with ``strict=True``."""
    path = Path(path)
    verify_checkpoint(model, path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = _torch_load(path)
    model.load_state_dict(state, strict=True)


@functools.cache
def _strict_vggt_class(VGGT: type[nn.Module]) -> type[nn.Module]:
    """``VGGT`` whose ``from_pretrained`` verifies and loads its weights file strictly.

    ``PyTorchModelHubMixin.from_pretrained`` resolves ``config.json`` and the weights file (a local
    directory, or the Hugging Face cache / Hub) and then calls ``_load_as_safetensor`` /
    ``_load_as_pickle`` with the resolved file; it loads with ``strict=False``, which keeps random
    weights for missing keys and raises a bare ``RuntimeError: size mismatch`` for wrong shapes. Both
    hooks are overridden here so every ``from_pretrained`` route runs :func:`load_state_dict_strict`,
    which raises :class:`CheckpointError` naming the resolved file.
    """

    def load_strict(cls: type, model: nn.Module, model_file: str, map_location: str, strict: bool) -> nn.Module:
        load_state_dict_strict(model, model_file)
        return model.eval()

    hook = classmethod(load_strict)
    return type(VGGT.__name__, (VGGT,), {"__doc__": VGGT.__doc__, "_load_as_safetensor": hook, "_load_as_pickle": hook})


def load_vggt(model: str | Path = DEFAULT_MODEL_ID, *, revision: str | None = None) -> nn.Module:
    """Build VGGT with verified weights, in eval mode on the CPU.

    ``model`` is a Hugging Face model id (``facebook/VGGT-1B``), a local directory in
    ``save_pretrained`` layout (``config.json`` + ``model.safetensors``), or one checkpoint file
    (``.safetensors``, ``.pt``/``.pth``/``.bin`` state dict, e.g. the released ``model.pt``) loaded
    into the default ``VGGT()``. Every route verifies that the file's keys and shapes match the model
    exactly before loading it (strictly) and raises :class:`CheckpointError` naming the file otherwise,
    also for a Hub id resolved from the Hugging Face cache (the file under ``snapshots/``).
    """
    VGGT = import_vggt_class()
    path = Path(model).expanduser()
    if path.is_file():
        net = VGGT()
        load_state_dict_strict(net, path)
    elif path.is_dir():
        weights = path / _SAFETENSORS
        if not weights.is_file():
            raise CheckpointError(weights, "not found: a local VGGT directory needs config.json + model.safetensors (save_pretrained layout)")
        net = _strict_vggt_class(VGGT).from_pretrained(str(path))
    elif str(model).startswith((".", "/", "~")) or str(model).count("/") != 1:
        raise CheckpointError(path, "neither an existing file or directory nor a Hugging Face id 'owner/name'")
    else:
        net = _strict_vggt_class(VGGT).from_pretrained(str(model), revision=revision)
    return net.eval()


TINY_VGGT_OPTIONS: dict[str, Any] = {"embed_dim": 64, "enable_track": False}
"""``VGGT(**TINY_VGGT_OPTIONS)`` inside :func:`tiny_vggt_architecture` is the tiny model."""


@contextlib.contextmanager
def tiny_vggt_architecture() -> Iterator[type[nn.Module]]:
    """While active, VGGT built by vggt's own code (its constructor, also inside ``from_pretrained``)
    has a small aggregator (depth 4, 4 heads, convolutional patch embedding: no DINOv2 weights) and
    small DPT heads (32 features reading aggregator layers 0-3). Yields the ``VGGT`` class.

    VGGT's constructor takes none of these settings, so vggt's module-level ``Aggregator`` and
    ``DPTHead`` names are swapped and restored on exit. Raises :class:`ImportError` with the install
    hint without the vggt package.
    """
    VGGT = import_vggt_class()
    import vggt.models.vggt as vm
    from vggt.heads.dpt_head import DPTHead
    from vggt.models.aggregator import Aggregator

    originals = vm.Aggregator, vm.DPTHead
    vm.Aggregator = functools.partial(Aggregator, depth=4, num_heads=4, patch_embed="conv")
    vm.DPTHead = functools.partial(DPTHead, features=32, out_channels=[32] * 4, intermediate_layer_idx=[0, 1, 2, 3])
    try:
        yield VGGT
    finally:
        vm.Aggregator, vm.DPTHead = originals


def build_tiny_vggt(seed: int = 0) -> nn.Module:
    """A real ``vggt.models.vggt.VGGT`` shrunk to ~1.75 M parameters with random weights (seeded,
    without touching the global RNG), in eval mode on the CPU: the architecture code and output
    keys/shapes of the released model at a size that runs 4 frames at 518x518 in seconds on a CPU.
    For checks and benchmarks of the adapter without the 1B checkpoint (:func:`tiny_vggt_architecture`).
    """
    with tiny_vggt_architecture() as VGGT, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VGGT(**TINY_VGGT_OPTIONS).eval()


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA compute capability >= 8, fp16 below, fp32 on CPU (no CUDA call on CPU).

    Mixed precision runs through ``torch.autocast`` on CUDA only, so an explicit half dtype on a
    non-CUDA device is an error.
    """
    if dtype == "auto":
        if device.type == "cuda":
            major, _ = torch.cuda.get_device_capability(device)
            return torch.bfloat16 if major >= 8 else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"vggt backend: dtype must be 'auto' or one of {tuple(DTYPES)}, got {dtype!r}")
    if DTYPES[dtype] != torch.float32 and device.type != "cuda":
        raise ValueError(f"vggt backend: dtype {dtype} needs a CUDA device (got {device}); use float32 on {device.type}")
    return DTYPES[dtype]


# ------------------------------------------------------------------------------------ backend
@contextlib.contextmanager
def ieee_float32_convolutions() -> Iterator[None]:
    """In this context, cuDNN's float32 convolutions run without TF32 (torch's default lets cuDNN use TF32, 10-bit
    mantissas): ``dtype=float32`` is the full-precision reference the bf16/fp16 runs are checked against.
    Matrix products are float32 already (``torch.backends.cuda.matmul.allow_tf32`` defaults to off).
    Reduced precisions keep torch's default, as VGGT's own inference does for its heads."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


class VGGTBackend(GeometryBackend):
    """VGGT pointmaps, confidences and predicted cameras mapped back to the canonical view.

    ``model``: Hugging Face id or local path (see :func:`load_vggt`), or an already built
    ``nn.Module`` (then ``model_id`` labels it in :meth:`describe`).

    A VGGT model (one with an ``aggregator``) runs only what the pointmap needs: the aggregator, the
    camera head and the depth head (``points="depth"``) or the point head (``points="head"``), with
    the same calls, precision and outputs as ``VGGT.forward`` for those heads (which also runs the
    unused dense head and, given query points, the track head). The DPT head processes
    ``frames_chunk_size`` frames at a time (default 8, VGGT's own default; ``None``: all frames of a
    window at once); this is a memory knob and does not change the values. A module without an
    ``aggregator`` (e.g. a wrapper returning VGGT's output dict) runs through its ``forward``, which
    then decides the chunking, so a non-default ``frames_chunk_size`` is refused for it.

    ``conf_threshold`` (absolute) and ``conf_percentile`` (0-100, per window over its valid pixels)
    mark low-confidence pixels invalid; both may be given.
    """

    name: ClassVar[str] = "vggt"
    version: ClassVar[str] = "1"
    needs_depth: ClassVar[bool] = False
    wants_gpu: ClassVar[bool] = True

    @classmethod
    def check_requirements(cls) -> None:
        """The vggt package must be importable (install hint otherwise)."""
        import_vggt_class()

    def __init__(
        self,
        model: str | Path | nn.Module = DEFAULT_MODEL_ID,
        *,
        device: str | torch.device | None = None,
        dtype: str = "auto",
        points: str = "depth",
        conf_threshold: float | None = None,
        conf_percentile: float | None = None,
        frames_chunk_size: int | None = DEFAULT_FRAMES_CHUNK_SIZE,
        revision: str | None = None,
        model_id: str | None = None,
    ) -> None:
        super().__init__(device)
        if points not in POINT_SOURCES:
            raise ValueError(f"vggt backend: points must be one of {POINT_SOURCES}, got {points!r}")
        if conf_threshold is not None and not math.isfinite(conf_threshold):
            raise ValueError(f"vggt backend: conf_threshold must be finite, got {conf_threshold}")
        if conf_percentile is not None and not 0.0 <= conf_percentile < 100.0:
            raise ValueError(f"vggt backend: conf_percentile must be in [0, 100), got {conf_percentile}")
        if frames_chunk_size is not None and frames_chunk_size < 1:
            raise ValueError(f"vggt backend: frames_chunk_size must be >= 1, got {frames_chunk_size}")
        self.points = points
        self.conf_threshold = None if conf_threshold is None else float(conf_threshold)
        self.conf_percentile = None if conf_percentile is None else float(conf_percentile)
        self.frames_chunk_size = frames_chunk_size
        self.dtype = resolve_dtype(dtype, self.device)
        if isinstance(model, nn.Module):
            net = model
            cls = type(model)
            self.model_id = model_id or f"{cls.__module__}.{cls.__qualname__}"
        else:
            net = load_vggt(model, revision=revision)
            self.model_id = model_id or str(model)
            if revision is not None:
                self.model_id += f"@{revision}"
        self.model = net.to(self.device).eval()
        self.head = "depth_head" if points == "depth" else "point_head"
        self.single_head = getattr(self.model, "aggregator", None) is not None
        if self.single_head:
            missing = [a for a in ("camera_head", self.head) if getattr(self.model, a, None) is None]
            if missing:
                raise ValueError(
                    f"vggt backend: points={points!r} needs the model's {' and '.join(missing)} "
                    "(a VGGT built with that head enabled)"
                )
        elif frames_chunk_size != DEFAULT_FRAMES_CHUNK_SIZE:
            raise ValueError(
                "vggt backend: frames_chunk_size needs VGGT's submodules (aggregator, camera_head, "
                f"{self.head}); this model only has a forward"
            )

    def options(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "dtype": str(self.dtype).removeprefix("torch."),
            "points": self.points,
            "conf": "depth_conf" if self.points == "depth" else "world_points_conf",
            "conf_threshold": self.conf_threshold,
            "conf_percentile": self.conf_percentile,
            "resolution": VGGT_RESOLUTION,
            "valid_resize": "all_contributing",
            "frame": "first_camera",
        }

    def __call__(self, window: WindowData) -> PointmapResult:
        return self.run_batch([window])[0]

    def run_batch(self, windows: list[WindowData]) -> list[PointmapResult]:
        """Run windows with equal S as one network batch (one batch per distinct S), results in order."""
        groups: dict[int, list[int]] = {}
        for i, w in enumerate(windows):
            self.check_window(w)
            groups.setdefault(w.record.num_views, []).append(i)
        results: dict[int, PointmapResult] = {}
        for idx in groups.values():
            batch = [windows[i] for i in idx]
            outputs = self.predict(self.preprocess(batch))
            for i, res in zip(idx, self.postprocess(batch, outputs)):
                results[i] = res
        return [results[i] for i in range(len(windows))]

    # -- stages (public so tests and tools can inspect each step) --------------------------------
    def preprocess(self, windows: list[WindowData]) -> torch.Tensor:
        """``[B, S, 3, 518, 518]`` float32 images in ``[0, 1]`` on the device (bicubic, antialiased)."""
        frames = []
        for w in windows:
            x = torch.from_numpy(np.ascontiguousarray(w.images)).to(self.device)
            x = x.permute(0, 3, 1, 2).float() / 255.0
            if tuple(x.shape[-2:]) != (VGGT_RESOLUTION, VGGT_RESOLUTION):
                x = F.interpolate(x, size=(VGGT_RESOLUTION, VGGT_RESOLUTION), mode="bicubic", align_corners=False, antialias=True)
            frames.append(x.clamp_(0.0, 1.0))
        return torch.stack(frames)

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Network outputs needed for :attr:`points` (``pose_enc``, depth or world points, confidence), float32."""
        need = ("pose_enc", "depth", "depth_conf") if self.points == "depth" else ("pose_enc", "world_points", "world_points_conf")
        with torch.inference_mode(), self._autocast():
            out = self._single_head_forward(images) if self.single_head else self.model(images)
        B, S, _, H, W = images.shape
        shapes = {
            "pose_enc": (B, S, 9),
            "depth": (B, S, H, W, 1),
            "depth_conf": (B, S, H, W),
            "world_points": (B, S, H, W, 3),
            "world_points_conf": (B, S, H, W),
        }
        result = {}
        for key in need:
            if key not in out:
                raise KeyError(f"vggt backend: model output has no '{key}' (keys: {sorted(out)})")
            if tuple(out[key].shape) != shapes[key]:
                raise ValueError(f"vggt backend: model output '{key}' has shape {tuple(out[key].shape)}, expected {shapes[key]}")
            result[key] = out[key].float()
        return result

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type == "cuda" and self.dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.dtype)
        if self.device.type == "cuda":
            return ieee_float32_convolutions()
        return contextlib.nullcontext()

    def _heads_full_precision(self) -> contextlib.AbstractContextManager[Any]:
        # VGGT.forward runs its heads with autocast disabled; the single-head forward does the same.
        if self.device.type == "cuda":
            return torch.autocast("cuda", enabled=False)
        return contextlib.nullcontext()

    def _single_head_forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``VGGT.forward`` restricted to the camera head and the dense head of :attr:`points`.

        Same calls in the same order and precision: the aggregator under the caller's autocast, the
        heads with autocast disabled, the DPT head chunked by :attr:`frames_chunk_size` frames.
        """
        m = self.model
        tokens, patch_start_idx = m.aggregator(images)
        out: dict[str, torch.Tensor] = {}
        with self._heads_full_precision():
            out["pose_enc"] = m.camera_head(tokens)[-1]
            keys = ("depth", "depth_conf") if self.points == "depth" else ("world_points", "world_points_conf")
            head = getattr(m, self.head)
            out[keys[0]], out[keys[1]] = head(
                tokens, images=images, patch_start_idx=patch_start_idx, frames_chunk_size=self.frames_chunk_size
            )
        return out

    def postprocess(self, windows: list[WindowData], outputs: dict[str, torch.Tensor]) -> list[PointmapResult]:
        """Map network outputs of a batch back to each window's canonical view."""
        net_hw = (VGGT_RESOLUTION, VGGT_RESOLUTION)
        extrinsics, K_net = decode_vggt_pose(outputs["pose_enc"], net_hw)
        conf_key = "depth_conf" if self.points == "depth" else "world_points_conf"
        results = []
        ok = cameras_ok(extrinsics, K_net)
        for b, w in enumerate(windows):
            if not bool(ok[b].all()):
                bad = torch.nonzero(~ok[b]).flatten().tolist()
                raise PredictionError(
                    f"window {w.record.window_id}: VGGT predicted a degenerate camera (non-finite, or field of view "
                    f"outside (0, pi)) for view(s) {bad}"
                )
            out_hw = tuple(int(v) for v in w.images.shape[1:3])
            conf = outputs[conf_key][b]
            if self.points == "depth":
                value = outputs["depth"][b, ..., 0]
                valid = torch.isfinite(value) & (value > 0)
            else:
                value = outputs["world_points"][b]
                valid = torch.isfinite(value).all(dim=-1)
            valid &= self._confident(conf, valid)
            conf = torch.where(torch.isfinite(conf), conf, torch.zeros_like(conf))
            valid_out = resize_valid(valid, out_hw)
            conf_out = resize_maps(conf.unsqueeze(1), out_hw).squeeze(1)
            K = rescale_intrinsics(K_net[b], net_hw, out_hw)
            E = extrinsics[b]
            if self.points == "depth":
                depth = torch.where(valid, value, torch.zeros_like(value))
                depth_out = resize_maps(depth.unsqueeze(1), out_hw).squeeze(1)
                pts = unproject_depth(depth_out, K, E)
            else:
                wp = torch.where(valid.unsqueeze(-1), value, torch.zeros_like(value))
                pts = resize_maps(wp.permute(0, 3, 1, 2), out_hw).permute(0, 2, 3, 1)
            pts = torch.where(valid_out.unsqueeze(-1), pts, torch.zeros_like(pts))
            results.append(PointmapResult(points=pts.contiguous(), valid=valid_out, conf=conf_out, intrinsics=K, extrinsics=E))
        return results

    def _confident(self, conf: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Pixels passing the absolute and the per-window percentile confidence thresholds."""
        finite = torch.isfinite(conf)
        keep = finite.clone()
        if self.conf_threshold is not None:
            keep &= conf >= self.conf_threshold
        if self.conf_percentile is not None:
            values = conf[valid & finite]  # percentile of the window's valid pixels, independent of the absolute threshold
            if values.numel():
                k = max(1, math.ceil(self.conf_percentile / 100.0 * values.numel()))
                keep &= conf >= values.kthvalue(k).values
        return keep


__all__ = [
    "DEFAULT_MODEL_ID",
    "ieee_float32_convolutions",
    "VGGT_RESOLUTION",
    "DEFAULT_FRAMES_CHUNK_SIZE",
    "INSTALL_HINT",
    "CheckpointError",
    "PredictionError",
    "import_vggt_class",
    "checkpoint_shapes",
    "verify_checkpoint",
    "load_state_dict_strict",
    "load_vggt",
    "TINY_VGGT_OPTIONS",
    "tiny_vggt_architecture",
    "build_tiny_vggt",
    "resolve_dtype",
    "VGGTBackend",
]
