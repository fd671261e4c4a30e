"""``cameo-corr selfcheck`` (also ``python -m cameo_corr.selfcheck``): check a machine's compute paths.

Run it once on a new GPU machine (a few minutes on one GPU). It prints one row per check (check,
device, result, time, tolerance) and exits 1 when any check fails, 0 otherwise; skipped checks are
listed with the reason (with ``--strict`` a skipped check fails the run too). The device is
``--device`` (default: ``cuda`` when visible, else ``cpu``); every check picks its CUDA or CPU
variant from it:

* **matching**: the exact token matchers ``kdtree``, ``torch`` and ``faiss`` (faiss-gpu on CUDA
  tensors) on two windows of tokens on the device, one on a lattice (exact distance ties) and one on
  a smooth surface (where faiss's candidates are certified rather than redone by brute force), must
  return the ``nn`` and ``mask`` of the float64 brute-force reference bit for bit (``dist`` within
  float32 rounding); **faiss rounding** measures the error of faiss's float32 distances on the smooth
  tokens, which must stay within the bound its certification assumes, and the share it certifies.
* **vggt single-head** (needs the vggt package): the adapter's default path (aggregator, camera head,
  depth head, 8 frames per pass) against ``VGGT.forward`` on the tiny real model with random weights.
* **vggt bf16 / fp16** (CUDA): the adapter in mixed precision against fp32 on the tiny real model,
  relative errors of every output against tolerances derived from the unit roundoff of the dtype.
* **ray job**: the ``depth`` backend and token matching in the Ray preprocessing job on a small
  synthetic set (``gpus_per_worker=1`` on CUDA), through :func:`cameo_corr.job.driver.run_preprocess`:
  every window done, the cache verified, and on CUDA the cache compared with a CPU run of the job.
* **trainer**: tiny-model CAMEO training steps on one fixed batch of that cache (fixed timestep and
  noise), the model prepared by accelerate as the Trainer prepares it: bf16 autocast of its forward on
  CUDA (20 steps, batch 2), fp32 on CPU (8 steps, batch 1): the loss and its CAMEO part finite, the
  mean of the last quarter of the steps below that of the first quarter.
* **trainer official_bf16** (CUDA with bf16): ``train.precision: official_bf16`` through the real
  Trainer (bf16 weights, fp32 masters, the tiny VAE under CUDA's fp16 autocast), 3 steps straight and
  2 + 1 resumed from a checkpoint: losses finite, the resumed last step equal to the straight one.
* **supervised layer** (CUDA): peak memory and time of forward + CAMEO loss + backward of the
  supervised attention layer at SD2.1 layer-10 size (random weights) for the dense path and the
  chunked path (when this build provides it).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:  # pragma: no cover - typing only; torch is imported lazily so the CLI parser stays light
    import torch

STATUSES = ("ok", "FAIL", "skip")

MATCH_VIEWS = 4
MATCH_GRID = 32
MATCH_LATTICE = 16
"""Token coordinates are multiples of ``1 / MATCH_LATTICE``: many exactly equal distances (ties)."""

VGGT_SINGLE_HEAD_VIEWS = 9
"""Frames of the single-head check: two passes of the 8-frame DPT chunking."""
VGGT_PRECISION_VIEWS = 4
HALF_PRECISION_FACTOR = 8
"""Tolerance of a mixed-precision VGGT output = this factor x the dtype's unit roundoff ``u``, as
relative L2 error ``|half - fp32| / |fp32|``. Measured on the tiny real model (4 frames at 518, random
weights) with CPU autocast, which lowers the same convolutions, linears, matmuls and attention as
CUDA autocast: bf16 gives 0.5-1.3 u (pose_enc 5.0e-3, depth 2.0e-3, depth_conf 3.1e-3; u = 2^-8),
fp16 0.5-1.8 u (9.0e-4, 2.5e-4, 3.5e-4; u = 2^-11), fp32 against fp64 <= 4e-7. 8 u leaves 4x for
GPU kernels that round and accumulate differently; a broken path (overflow, a head run in the wrong
precision or a mixed-up output) gives errors of order 1."""
UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11}
NO_BF16 = "this GPU has no bf16 support (compute capability < 8.0)"
"""Why the bf16 checks of a GPU without native bf16 are skipped."""
NO_CACHE = "needs the cache of the ray job check, which did not finish"
"""Why the trainer checks are skipped when the Ray check wrote no cache."""

RAY_SCENES = 2
RAY_FRAMES = 6
RAY_VIEWS = 3
RAY_GRID = 8
RAY_SIZE = 64
"""The synthetic set of the Ray check: its cache is also the trainer check's input (the tiny
trainer preset sees an 8x8 token grid at 64x64 pixels)."""
RAY_MATCH_AGREEMENT = 0.99
"""Share of query tokens whose ``nn`` and ``mask`` must agree between the CUDA and the CPU job. The
matchers are exact, but the depth backend's points differ in the last float32 bits between devices,
and a synthetic room has exact ties between equidistant tokens that such bits can resolve either way."""

TRAIN_STEPS = {"cuda": 20, "cpu": 8}
TRAIN_BATCH = {"cuda": 2, "cpu": 1}
"""Steps and batch size of the trainer check (the CPU variant is kept short: CI runs it)."""
TRAIN_TIMESTEP = 500


@dataclass
class Row:
    """One line of the selfcheck table."""

    check: str
    device: str
    status: str
    """``ok``, ``FAIL`` or ``skip``."""
    result: str
    """What was measured, or why the check failed or was skipped."""
    seconds: float | None = None
    tolerance: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")


@dataclass
class Context:
    """What the checks share: the device, a scratch directory, and the cache the Ray check wrote."""

    device: "torch.device"
    workdir: Path
    cache: Path | None = None
    log: Callable[[str], None] = print
    """Progress lines (the CLI prints them on stderr)."""


# ------------------------------------------------------------------------------------- helpers
def _synchronize(device: "torch.device") -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def native_bf16() -> bool:
    """Whether the current GPU computes in bf16 natively (torch's default answer also counts emulation: a V100
    or T4 would say yes)."""
    import torch

    return torch.cuda.is_bf16_supported(including_emulation=False)


def raised(e: BaseException) -> str:
    """The result of a failed row whose check raised ``e``: ``raised <Type>: <message>`` (one line)."""
    return "raised " + traceback.format_exception_only(type(e), e)[-1].strip()


def timed(fn: Callable[[], Any], device: "torch.device") -> tuple[Any, float]:
    """``fn()`` and its wall time in seconds (CUDA work included: synchronized before and after)."""
    _synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    _synchronize(device)
    return out, time.perf_counter() - t0


def relative_error(value: "torch.Tensor", reference: "torch.Tensor") -> float:
    """``|value - reference| / |reference|`` (L2 over all finite reference entries, in float64)."""
    import torch

    ref = reference.double()
    val = value.double()
    keep = torch.isfinite(ref)
    diff = torch.where(keep, val - ref, torch.zeros_like(ref))
    norm = torch.where(keep, ref, torch.zeros_like(ref)).norm()
    if not bool(torch.isfinite(diff).all()):
        return math.inf
    return float(diff.norm() / norm) if float(norm) > 0 else float(diff.norm())


def decreasing(values: Sequence[float], k: int) -> bool:
    """Whether the mean of the last ``k`` values is below the mean of the first ``k`` (robust to the
    step-to-step noise of single values)."""
    if k < 1 or len(values) < 2 * k:
        raise ValueError(f"need at least {2 * k} values to compare the first and last {k}, got {len(values)}")
    return statistics.fmean(values[-k:]) < statistics.fmean(values[:k])


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------------ matching
def match_backends(device: "torch.device") -> list[tuple[str, str | None]]:
    """``(backend, reason it cannot run on device or None)`` for ``kdtree``, ``torch``, ``faiss``."""
    from cameo_corr.pipeline.match import resolve_backend
    from cameo_corr.schemas import SchemaError

    out: list[tuple[str, str | None]] = []
    for name in ("kdtree", "torch", "faiss"):
        try:
            resolve_backend(name, device)
            out.append((name, None))
        except SchemaError as e:
            out.append((name, str(e)))
    return out


def lattice_tokens(device: "torch.device", *, views: int = MATCH_VIEWS, grid: int = MATCH_GRID, seed: int = 0) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Token points ``[S, g, g, 3]`` on a coarse lattice (exact distance ties) and ``valid`` with ~10 %
    invalid tokens, on ``device``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    points = torch.randint(0, MATCH_LATTICE, (views, grid, grid, 3), generator=g).double() / MATCH_LATTICE
    valid = torch.rand(views, grid, grid, generator=g) > 0.1
    return points.float().to(device), valid.to(device)


def smooth_tokens(device: "torch.device", *, views: int = MATCH_VIEWS, grid: int = MATCH_GRID, seed: int = 0) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Token points ``[S, g, g, 3]`` of one smooth surface seen by ``views`` shifted cameras (continuous
    coordinates: faiss's candidates are certified, not redone by brute force) and ``valid`` with ~10 %
    invalid tokens, on ``device``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    v, u = torch.meshgrid(torch.linspace(-1, 1, grid, dtype=torch.float64), torch.linspace(-1, 1, grid, dtype=torch.float64), indexing="ij")
    shift = (torch.rand(views, 2, generator=g, dtype=torch.float64) - 0.5) * 0.4
    x, y = u + shift[:, :1, None], v + shift[:, 1:, None]
    z = 2.0 + 0.3 * torch.sin(3 * x) * torch.cos(2 * y)
    valid = torch.rand(views, grid, grid, generator=g) > 0.1
    return torch.stack([x * z, y * z, z], dim=-1).float().to(device), valid.to(device)


def check_matching(ctx: Context) -> list[Row]:
    """kdtree / torch / faiss on device tensors against the float64 brute-force reference on the CPU, on
    lattice tokens (exact ties: faiss's rows go to brute force) and smooth ones (faiss's candidates are
    certified and re-ranked); one row per backend (a backend that raises is a failed row of its own, the
    others are still checked), then a row measuring faiss's rounding against its bound."""
    import torch

    from cameo_corr.pipeline.match import faiss_rounding, match_tokens

    sets = {name: make(ctx.device) for name, make in (("lattice", lattice_tokens), ("smooth", smooth_tokens))}
    refs = {name: match_tokens(points.cpu().double(), valid.cpu(), backend="torch") for name, (points, valid) in sets.items()}
    tolerance = "nn, mask exact; dist rel 1e-6"
    where = f"S={MATCH_VIEWS}, {MATCH_GRID}x{MATCH_GRID} tokens, lattice and smooth"
    rows = []
    backends = match_backends(ctx.device)
    for name, reason in backends:
        check = f"matching {name}"
        if reason is not None:
            rows.append(Row(check, str(ctx.device), "skip", reason, tolerance=tolerance))
            continue
        seconds, problems, dist_err = 0.0, [], 0.0
        try:
            for tokens, (points, valid) in sets.items():
                match_tokens(points, valid, backend=name)  # warm-up (faiss GPU resources, CUDA kernels)
                (nn, dist, mask), t = timed(lambda: match_tokens(points, valid, backend=name), ctx.device)
                seconds += t
                if nn.device != points.device:
                    problems.append(f"results on {nn.device}, inputs on {points.device}")
                    break
                ref_nn, ref_dist, ref_mask = refs[tokens]
                bad_nn = int((nn.cpu() != ref_nn).sum())
                bad_mask = int((mask.cpu() != ref_mask).sum())
                finite = torch.isfinite(ref_dist)
                err = float(((dist.cpu().double() - ref_dist.double()).abs() / ref_dist.double().clamp_min(1e-12))[finite].max())
                dist_err = max(dist_err, err)
                if bad_nn or bad_mask or not torch.equal(torch.isfinite(dist.cpu()), finite) or err > 1e-6:
                    problems.append(f"{tokens}: {bad_nn} nn and {bad_mask} mask entries differ from the reference, dist rel err {err:.1e}")
        except Exception as e:  # noqa: BLE001 - one matcher's crash is its failed row; the others are still checked
            rows.append(Row(check, str(ctx.device), "FAIL", raised(e), tolerance=tolerance))
            continue
        if problems:
            rows.append(Row(check, str(ctx.device), "FAIL", "; ".join(problems), seconds, tolerance))
        else:
            rows.append(Row(check, str(ctx.device), "ok", f"identical ({where}, dist rel err {dist_err:.1e})", seconds, tolerance))
    tolerance = "error <= the certification's bound"
    cannot = dict(backends).get("faiss")
    if cannot is not None:
        rows.append(Row("faiss rounding", str(ctx.device), "skip", cannot, tolerance=tolerance))
    else:
        points, valid = sets["smooth"]
        flat, keep = points.reshape(MATCH_VIEWS, -1, 3), valid.reshape(MATCH_VIEWS, -1)
        try:
            out, seconds = timed(lambda: faiss_rounding(flat[1:][keep[1:]], flat[0][keep[0]]), ctx.device)
        except Exception as e:  # noqa: BLE001 - reported as the failed row
            rows.append(Row("faiss rounding", str(ctx.device), "FAIL", raised(e), tolerance=tolerance))
        else:
            u = 2.0**-24
            result = (f"error {out['error'] / u:.3g} x 2^-24 of (|q| + max|k|)^2, bound {out['bound'] / u:.3g} x 2^-24; "
                      f"{out['certified']:.1%} of smooth queries certified (the rest go to brute force)")
            rows.append(Row("faiss rounding", str(ctx.device), "ok" if out["error"] <= out["bound"] else "FAIL", result, seconds, tolerance))
    return rows


# ---------------------------------------------------------------------------------------- vggt
def vggt_precisions(device: "torch.device") -> list[tuple[str, str | None]]:
    """``(dtype, reason it cannot run or None)`` of the mixed-precision VGGT checks on ``device``."""
    if device.type != "cuda":
        return [(d, "mixed precision runs through CUDA autocast only (the adapter uses fp32 on CPU)") for d in UNIT_ROUNDOFF]
    return [(name, None if name != "bfloat16" or native_bf16() else NO_BF16) for name in UNIT_ROUNDOFF]


def vggt_images(device: "torch.device", views: int, size: int, seed: int = 0) -> "torch.Tensor":
    """Random ``[1, views, 3, size, size]`` images in [0, 1] on ``device``."""
    import torch

    return torch.rand(1, views, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(device)


def check_vggt(ctx: Context) -> list[Row]:
    """The adapter's single-head path against ``VGGT.forward``; bf16/fp16 against fp32 (CUDA)."""
    import torch

    from cameo_corr.pipeline.backends.vggt import VGGT_RESOLUTION, VGGTBackend, build_tiny_vggt, ieee_float32_convolutions

    dev = str(ctx.device)
    try:
        model = build_tiny_vggt(seed=0).to(ctx.device)
    except ImportError:
        return [Row("vggt", dev, "skip", "the optional vggt package is not installed (pip install git+https://github.com/facebookresearch/vggt)")]
    rows = []
    # single head vs forward: the CPU run uses a smaller input (any multiple of 14 works) to stay quick
    size = VGGT_RESOLUTION if ctx.device.type == "cuda" else 112
    images = vggt_images(ctx.device, VGGT_SINGLE_HEAD_VIEWS, size)
    exact = ctx.device.type != "cuda"
    tolerance = "identical" if exact else "rel 1e-6 (kernel nondeterminism)"
    check = "vggt single-head vs forward"
    try:
        with torch.inference_mode(), ieee_float32_convolutions():  # as the backend runs float32 on CUDA
            reference = model(images)
        out, seconds = timed(lambda: VGGTBackend(model, device=ctx.device, dtype="float32").predict(images), ctx.device)
    except Exception as e:  # noqa: BLE001 - its failed row; the precision checks still run
        rows.append(Row(check, dev, "FAIL", raised(e), tolerance=tolerance))
    else:
        errors = {k: relative_error(v, reference[k]) for k, v in out.items()}
        equal = all(torch.equal(v, reference[k]) for k, v in out.items())
        ok = equal if exact else max(errors.values()) <= 1e-6
        detail = f"S={VGGT_SINGLE_HEAD_VIEWS} at {size}px, keys {', '.join(out)}: " + ("identical" if equal else f"max rel err {max(errors.values()):.1e}")
        rows.append(Row(check, dev, "ok" if ok else "FAIL", detail, seconds, tolerance))

    images = vggt_images(ctx.device, VGGT_PRECISION_VIEWS, VGGT_RESOLUTION, seed=1)
    reference_out: dict[str, torch.Tensor] | None = None
    for name, reason in vggt_precisions(ctx.device):
        u = UNIT_ROUNDOFF[name]
        tol = HALF_PRECISION_FACTOR * u
        tolerance = f"rel L2 <= {HALF_PRECISION_FACTOR} u = {tol:.1e}"
        check = f"vggt {name} vs float32"
        if reason is not None:
            rows.append(Row(check, dev, "skip", reason, tolerance=tolerance))
            continue
        try:
            if reference_out is None:
                reference_out = VGGTBackend(model, device=ctx.device, dtype="float32").predict(images)
            out, seconds = timed(lambda: VGGTBackend(model, device=ctx.device, dtype=name).predict(images), ctx.device)
        except Exception as e:  # noqa: BLE001 - its failed row; the other precision is still checked
            rows.append(Row(check, dev, "FAIL", raised(e), tolerance=tolerance))
            continue
        errors = {k: relative_error(v, reference_out[k]) for k, v in out.items()}
        worst = max(errors, key=errors.get)
        detail = ", ".join(f"{k} {e:.1e}" for k, e in errors.items())
        status = "ok" if errors[worst] <= tol else "FAIL"
        rows.append(Row(check, dev, status, f"rel err {detail}", seconds, tolerance))
    return rows


# ------------------------------------------------------------------------------------- ray job
def preprocess_options(device: "torch.device") -> dict[str, Any]:
    """Keyword arguments of :func:`~cameo_corr.job.driver.run_preprocess` for the Ray check on
    ``device`` (one worker with one GPU on CUDA; the backend picks the GPU Ray assigns it)."""
    options: dict[str, Any] = dict(
        dataset="synthetic", backend="depth", grid=RAY_GRID, views=RAY_VIEWS, windows_per_scene=2,
        crop_size=RAY_SIZE, shard_size=2, workers=1, progress=False,
    )
    if device.type == "cuda":
        options["gpus_per_worker"] = 1
    else:
        options["gpus_per_worker"] = 0
        options["backend_options"] = {"device": "cpu"}
    return options


def compare_caches(cache: Path, reference: Path) -> tuple[float, float, list[str]]:
    """``(nn agreement, mask agreement, problems)`` of two caches of the same windows: agreement is the
    share of valid query tokens of all pairs; problems list differing window sets, valid maps or
    points beyond float16 rounding."""
    import numpy as np

    from cameo_corr.cache.reader import CorrCache

    a, b = CorrCache(cache), CorrCache(reference)
    ids = sorted(a.window_ids())
    problems = []
    if ids != sorted(b.window_ids()):
        problems.append(f"window ids differ: {ids} vs {sorted(b.window_ids())}")
        return 0.0, 0.0, problems
    same_nn = same_mask = total = 0
    for wid in ids:
        x, y = a.window(wid), b.window(wid)
        if not np.array_equal(x["valid"], y["valid"]):
            problems.append(f"window {wid}: valid tokens differ")
            continue
        pts_x, pts_y = x["points"].astype(np.float64), y["points"].astype(np.float64)
        if not np.allclose(pts_x, pts_y, rtol=2.0**-9, atol=1e-6):
            problems.append(f"window {wid}: points differ by up to {np.abs(pts_x - pts_y).max():.3g}")
        S = x["valid"].shape[0]
        query = np.broadcast_to(x["valid"].reshape(S, 1, -1), x["nn"].shape) & ~np.eye(S, dtype=bool)[:, :, None]
        same_nn += int((x["nn"] == y["nn"])[query].sum())
        same_mask += int((x["mask"] == y["mask"])[query].sum())
        total += int(query.sum())
    if total == 0:
        problems.append("no valid query token in the caches")
        return 0.0, 0.0, problems
    return same_nn / total, same_mask / total, problems


def check_ray_job(ctx: Context) -> list[Row]:
    """The depth backend + matching in the Ray job (GPU worker on CUDA); sets ``ctx.cache``."""
    from cameo_corr.datasets.synthetic import generate_dataset
    from cameo_corr.cache.reader import CorrCache
    from cameo_corr.cache.verify import verify_cache
    from cameo_corr.job.driver import run_preprocess

    dev = str(ctx.device)
    root = generate_dataset(ctx.workdir / "data", scenes=RAY_SCENES, frames=RAY_FRAMES, image_size=RAY_SIZE, seed=0)
    rows = []
    caches = {}
    devices = [ctx.device] if ctx.device.type == "cpu" else [ctx.device, _cpu()]
    for device in devices:
        out = ctx.workdir / f"cache-{device.type}"
        options = preprocess_options(device)
        summary, seconds = timed(lambda: run_preprocess(root=root, out=out, command="cameo-corr selfcheck", **options), device)
        planned, done, failed = summary["windows_planned"], summary["windows_ok"], summary["windows_failed"]
        problems = verify_cache(CorrCache(out))
        used = summary["devices_used"]  # reported by the model actors themselves, window by window
        check = f"ray job depth+match (gpus_per_worker={options['gpus_per_worker']})"
        tolerance = "all windows ok, cache verified"
        if not used or any(d.split(":")[0] != device.type for d in used):
            problems.append(f"the model actors ran on {', '.join(used) or 'nothing'}, not on {device.type}")
        if planned == 0 or done != planned or failed or problems:
            errors = "; ".join(f"{w}: {e}" for w, e in (summary.get("errors") or [])[:2])
            result = f"{done}/{planned} windows ok, {failed} failed; " + "; ".join(problems[:3] + ([errors] if errors else []))
            rows.append(Row(check, str(device), "FAIL", result, seconds, tolerance))
            return rows
        rows.append(Row(check, str(device), "ok", f"{done} windows ({RAY_VIEWS} views, {RAY_GRID}x{RAY_GRID} tokens) on {', '.join(used)}, cache verified", seconds, tolerance))
        caches[device.type] = out
        if device == ctx.device:  # the trainer checks use it even when the CPU reference run fails
            ctx.cache = out
    if "cuda" in caches:
        (nn_share, mask_share, problems), seconds = timed(lambda: compare_caches(caches["cuda"], caches["cpu"]), _cpu())
        tolerance = f"valid identical, points within fp16 rounding, nn and mask >= {RAY_MATCH_AGREEMENT:.0%} equal"
        ok = not problems and min(nn_share, mask_share) >= RAY_MATCH_AGREEMENT
        result = f"nn {nn_share:.2%} and mask {mask_share:.2%} of query tokens equal" + ("; " + "; ".join(problems[:3]) if problems else "")
        rows.append(Row("ray job cuda vs cpu cache", dev, "ok" if ok else "FAIL", result, seconds, tolerance))
    return rows


def _cpu() -> "torch.device":
    import torch

    return torch.device("cpu")


# ------------------------------------------------------------------------------------- trainer
def trainer_precision(device: "torch.device") -> tuple[str, str]:
    """accelerate's ``mixed_precision`` for the trainer check (``bf16`` on a GPU with native bf16, else
    ``no``) and its label."""
    if device.type == "cuda":
        if native_bf16():
            return "bf16", "bf16"
        return "no", "fp32 (no bf16 on this GPU)"
    return "no", "fp32"


def check_trainer(ctx: Context) -> list[Row]:
    """CAMEO training steps of the tiny model on one fixed batch of the Ray check's cache, with the numerics
    of the :class:`~cameo_corr.train.loop.Trainer`: the model prepared by accelerate (its mixed precision
    autocasts the model's forward only; cameras, latents and losses stay outside it), backward through
    accelerate."""
    import torch
    from accelerate import Accelerator

    from cameo_corr.train.config import load_config, preset_path
    from cameo_corr.train.loop import CameoTrainable, batch_to, compute_losses, make_loader, make_noise_scheduler, step_generator
    from cameo_corr.train.loss import HeadMLP
    from cameo_corr.train.model import build_model

    dev = str(ctx.device)
    kind = "cuda" if ctx.device.type == "cuda" else "cpu"
    steps = TRAIN_STEPS[kind]
    k = max(2, steps // 4)
    mixed_precision, label = trainer_precision(ctx.device)
    check = f"trainer {steps} steps {label}"
    tolerance = f"finite; mean of last {k} < mean of first {k}"
    if ctx.cache is None:
        return [Row(check, dev, "skip", NO_CACHE, tolerance=tolerance)]
    cfg = load_config(preset_path("tiny_cpu"), [f"data.cache={ctx.cache}", f"data.num_views={RAY_VIEWS}", f"data.batch_size={TRAIN_BATCH[kind]}",
                                                "data.shuffle_buffer=1"])
    torch.manual_seed(0)
    model, codec = build_model(pretrained=None, layer=cfg.model.layer, vae=cfg.model.vae, cond_dropout=0.0,
                               **cfg.model.recipe(), **cfg.model.options)  # as the Trainer builds it
    head_mlp = HeadMLP(model.heads)
    trainable = CameoTrainable(model, head_mlp).to(ctx.device).train()
    codec = codec.to(ctx.device)
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    # the device is the check's (accelerate's own pick would be the current CUDA device, not --device's)
    acc = Accelerator(mixed_precision=mixed_precision, cpu=ctx.device.type == "cpu", device_placement=False)
    trainable, optimizer = acc.prepare(trainable, optimizer)
    scheduler = make_noise_scheduler(cfg)
    batch = batch_to(next(iter(make_loader(cfg, cache=str(ctx.cache), rank=0, world_size=1))), ctx.device)
    grid = model.grid(codec.latent_size((cfg.data.resolution, cfg.data.resolution)))
    losses: list[float] = []
    cameo: list[float] = []

    def run() -> None:
        for step in range(steps):
            g = step_generator(0, 0, 0, 0, ctx.device)  # the same timestep draw and noise every step
            m = compute_losses(trainable, head_mlp, codec, scheduler, batch, cfg, grid, g, timestep=TRAIN_TIMESTEP, camera_dropout=False)
            acc.backward(m["loss"])
            acc.clip_grad_norm_(trainable.parameters(), cfg.optim.max_grad_norm or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(m["loss"].detach()))
            cameo.append(float(m["cameo"]))
            ctx.log(f"selfcheck:   trainer step {step + 1}/{steps}: loss {losses[-1]:.5g}, CAMEO {cameo[-1]:.5g}")

    _, seconds = timed(run, ctx.device)
    finite = all(math.isfinite(v) for v in losses + cameo)
    ok = finite and decreasing(losses, k) and decreasing(cameo, k)
    result = (f"loss {statistics.fmean(losses[:k]):.4g} -> {statistics.fmean(losses[-k:]):.4g}, "
              f"CAMEO {statistics.fmean(cameo[:k]):.4g} -> {statistics.fmean(cameo[-k:]):.4g} (means of first/last {k})")
    if not finite:
        result = "non-finite loss: " + result
    return [Row(check, dev, "ok" if ok else "FAIL", result, seconds, tolerance)]


OFFICIAL_STEPS = 3
OFFICIAL_RESUME_TOLERANCE = 1e-2
"""Largest relative difference of the last step's losses between the straight and the resumed
``official_bf16`` run: the same batch, noise and weights up to CUDA's nondeterministic kernels, which a
bf16 rounding of the weights can lift to ~1e-4; a resume that restored the wrong data position, RNG
state or masters gives another timestep and noise (differences of order 1)."""


def official_trainer_run(cache: Path, out: Path, *, vae: str) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """The metrics rows of two ``train.precision: official_bf16`` runs of the tiny preset on ``cache``
    through :func:`~cameo_corr.train.loop.train`: one straight for :data:`OFFICIAL_STEPS` steps, one
    stopped a step early and resumed from its checkpoint (``model.vae``: ``vae``)."""
    from cameo_corr.train.config import load_config, preset_path
    from cameo_corr.train.loop import read_metrics, train

    cfg = load_config(preset_path("tiny_cpu"), [
        f"data.cache={cache}", f"data.num_views={RAY_VIEWS}", "data.batch_size=2", "data.shuffle_buffer=1", f"model.vae={vae}",
        "train.precision=official_bf16", "train.mixed_precision=bf16", f"train.max_steps={OFFICIAL_STEPS}",
        "train.checkpoint_every=1", "train.log_every=1"])
    train(cfg, out / "straight", resume="never", progress=False)
    train(cfg, out / "resumed", resume="never", max_steps=OFFICIAL_STEPS - 1, progress=False)
    train(cfg, out / "resumed", resume="auto", progress=False)
    return read_metrics(out / "straight"), read_metrics(out / "resumed")


def check_official_trainer(ctx: Context) -> list[Row]:
    """``train.precision: official_bf16`` through the real Trainer on CUDA: bf16 weights with fp32 masters,
    the tiny VAE encoding under CUDA's fp16 autocast, accelerate's bf16 autocast, pinned batches, a
    checkpoint written and resumed; losses finite and the resumed last step equal to the straight one."""
    import torch

    dev = str(ctx.device)
    check = f"trainer official_bf16 {OFFICIAL_STEPS} steps, resumed"
    tolerance = f"finite; resumed last step rel <= {OFFICIAL_RESUME_TOLERANCE:.0e}"
    if ctx.device.type != "cuda":
        return [Row(check, dev, "skip", "its VAE encodes under CUDA's fp16 autocast (CPU: tests/test_official_bf16.py)", tolerance=tolerance)]
    if not native_bf16():
        return [Row(check, dev, "skip", NO_BF16, tolerance=tolerance)]
    if ctx.cache is None:
        return [Row(check, dev, "skip", NO_CACHE, tolerance=tolerance)]
    with torch.cuda.device(ctx.device):  # the Trainer trains on accelerate's device: the current one
        (straight, resumed), seconds = timed(lambda: official_trainer_run(ctx.cache, ctx.workdir / "official", vae="tiny"), ctx.device)
    keys = ("loss", "diffusion", "cameo")
    last, again = straight[-1], resumed[-1]
    finite = all(math.isfinite(row[k]) for row in straight + resumed for k in ("loss", "diffusion"))
    diff = max((abs(again[k] - last[k]) / max(abs(last[k]), 1e-12) for k in keys if math.isfinite(last[k])), default=math.inf)
    ok = finite and [r["step"] for r in straight] == [r["step"] for r in resumed] == list(range(1, OFFICIAL_STEPS + 1)) \
        and diff <= OFFICIAL_RESUME_TOLERANCE
    result = (f"loss {straight[0]['loss']:.4g} -> {last['loss']:.4g}, CAMEO {last['cameo']:.4g}; resumed step {again['step']:g}: "
              f"max rel diff {diff:.1e} (steps {[r['step'] for r in resumed]})")
    return [Row(check, dev, "ok" if ok else "FAIL", ("" if finite else "non-finite loss: ") + result, seconds, tolerance)]


# ---------------------------------------------------------------------------- supervised layer
@dataclass(frozen=True)
class LayerSize:
    """Shape of one supervised-layer problem: ``batch`` samples of ``views`` views, a token ``grid``."""

    batch: int
    views: int
    grid: tuple[int, int]
    module: Any
    """The self-attention module (diffusers ``Attention``; on the meta device: shapes only)."""

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]


def sd21_layer_size(layer: int | str = 10, *, image_size: int = 512, batch: int = 2, views: int = 4) -> LayerSize:
    """The supervised layer of SD2.1 (``layer``, CAMEO's index; 10 by default: 640 channels, 10 heads
    of 64, a 32x32 grid at 512x512 pixels), built on the meta device from ``SD21_UNET_CONFIG``."""
    import torch
    from diffusers import UNet2DConditionModel

    from cameo_corr.train.model import SD21_UNET_CONFIG, layer_grid, resolve_layer

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD21_UNET_CONFIG)
    name = resolve_layer(unet, layer)
    latent = image_size // 8
    return LayerSize(batch, views, layer_grid(unet, layer, (latent, latent)), unet.get_submodule(name.removesuffix(".processor")))


LAYER_GRAD_TOLERANCE = 8 * UNIT_ROUNDOFF["bfloat16"]
"""Largest relative difference of the input gradients between the dense and the chunked supervised
layer (bf16 autocast on the layer, the loss in fp32 on the same q and k: only summation order differs)."""


def comparison_rows(result: dict[str, Any], device: str, what: str) -> list[Row]:
    """Rows of a dense-vs-chunked measurement in the format of
    ``cameo_corr.train.loss.measure_supervised_layer`` (``dense``/``chunked`` with ``peak_bytes``,
    ``seconds``, ``loss``; ``memory_ratio``, ``time_ratio``, ``grad_max_rel_diff``)."""
    tolerance = "measurement (no tolerance)"
    dense, chunked = result["dense"], result["chunked"]
    rows = [Row("supervised layer dense", device, "ok",
                f"peak {_fmt_bytes(int(dense['peak_bytes']))}, {dense['seconds'] * 1000:.0f} ms/step ({what})", dense["seconds"], tolerance)]
    diff = float(result["grad_max_rel_diff"])
    same = math.isfinite(dense["loss"]) and math.isfinite(chunked["loss"]) and diff <= LAYER_GRAD_TOLERANCE
    rows.append(Row(
        "supervised layer chunked", device, "ok" if same else "FAIL",
        f"peak {_fmt_bytes(int(chunked['peak_bytes']))} ({result['memory_ratio']:.1f}x less), {chunked['seconds'] * 1000:.0f} ms/step "
        f"({result['time_ratio']:.2f}x the dense time); loss {chunked['loss']:.6g} vs {dense['loss']:.6g}, grad rel diff {diff:.1e}",
        chunked["seconds"], f"grad rel diff <= 8 u(bf16) = {LAYER_GRAD_TOLERANCE:.1e}"))
    return rows


def check_supervised_layer(ctx: Context) -> list[Row]:
    """Peak GPU memory and time of the dense and the chunked supervised layer at SD2.1 layer-10 size,
    measured alternating in one harness by ``cameo_corr.train.loss.measure_supervised_layer``."""
    import torch

    from cameo_corr.train.loss import measure_supervised_layer

    dev = str(ctx.device)
    size = sd21_layer_size()
    what = f"B={size.batch}, F={size.views}, {size.grid[0]}x{size.grid[1]} tokens, {size.module.heads} heads, SD2.1 layer 10, bf16"
    tolerance = "measurement (no tolerance)"
    if ctx.device.type != "cuda":
        reason = "peak GPU memory needs CUDA (CPU: benchmarks/bench_cameo_memory.py)"
        return [Row("supervised layer dense", dev, "skip", reason, tolerance=tolerance),
                Row("supervised layer chunked", dev, "skip", reason, tolerance=tolerance)]
    try:
        result = measure_supervised_layer(ctx.device, torch.bfloat16, batch=size.batch, views=size.views, heads=size.module.heads,
                                          head_dim=size.module.to_q.out_features // size.module.heads, grid=size.grid)
        return comparison_rows(result, dev, what)
    except torch.OutOfMemoryError:
        total = torch.cuda.get_device_properties(ctx.device).total_memory
        return [Row("supervised layer", dev, "skip", f"out of memory on this {_fmt_bytes(total)} GPU ({what})", tolerance=tolerance)]
    finally:
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------- driver
CHECKS: tuple[tuple[str, Callable[[Context], list[Row]]], ...] = (
    ("matching", check_matching),
    ("vggt", check_vggt),
    ("ray job", check_ray_job),
    ("trainer", check_trainer),
    ("trainer official_bf16", check_official_trainer),
    ("supervised layer", check_supervised_layer),
)
"""The checks in run order (the trainers read the cache the Ray job writes)."""


def run_selfcheck(device: "str | torch.device | None" = None, *, workdir: str | Path | None = None,
                  log: Callable[[str], None] | None = None) -> list[Row]:
    """Run every check on ``device`` (default: ``cuda`` when visible, else ``cpu``) and return the rows.

    ``workdir`` holds the synthetic data and caches (default: a temporary directory, removed after).
    A check that raises is reported as a failed row with the exception; the others still run.
    """
    from cameo_corr.pipeline.backends import resolve_device

    dev = resolve_device(device)
    log = log or (lambda text: None)
    scratch = tempfile.TemporaryDirectory(prefix="cameo-selfcheck-") if workdir is None else contextlib.nullcontext(str(workdir))
    with scratch as base:
        ctx = Context(dev, Path(base), log=log)
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        rows: list[Row] = []
        for name, check in CHECKS:
            log(f"selfcheck: {name} on {dev} ...")
            t0 = time.perf_counter()
            try:
                new = check(ctx)
            except Exception as e:  # noqa: BLE001 - a crashing check is a failed check, the others still run
                new = [Row(name, str(dev), "FAIL", raised(e), time.perf_counter() - t0)]
            for row in new:
                log(f"selfcheck:   {row.status:<4} {row.check}: {row.result}")
            rows.extend(new)
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """The rows as an aligned text table (check, device, result, time, tolerance)."""
    header = ("check", "device", "result", "time", "tolerance")
    lines = [(r.check, r.device, f"{r.status}: {r.result}", "-" if r.seconds is None else f"{r.seconds:.2f} s", r.tolerance) for r in rows]
    widths = [max(len(x[i]) for x in [header, *lines]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*x) for x in lines]
    return "\n".join(line.rstrip() for line in out)


def exit_code(rows: Sequence[Row], *, strict: bool = False) -> int:
    """1 when any row failed (with ``strict`` also when any was skipped), else 0."""
    return 1 if any(r.status == "FAIL" or (strict and r.status == "skip") for r in rows) else 0


def summary_line(rows: Sequence[Row], seconds: float) -> str:
    """``N ok, N failed, N skipped in T s``."""
    count = {s: sum(r.status == s for r in rows) for s in STATUSES}
    return f"{count['ok']} ok, {count['FAIL']} failed, {count['skip']} skipped in {seconds:.1f} s"


# ----------------------------------------------------------------------------------------- CLI
def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="torch device to check (default: cuda if visible, else cpu)")
    parser.add_argument("--workdir", default=None, help="keep the synthetic data and caches here (default: a temporary directory)")
    parser.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    parser.add_argument("--strict", action="store_true",
                        help="a skipped check fails the run too (e.g. faiss-gpu or vggt missing on a GPU machine meant to have them)")


def _run(args: argparse.Namespace) -> int:
    import json

    import torch

    prog = "cameo-corr selfcheck"
    try:
        device = torch.device(args.device) if args.device is not None else None
    except RuntimeError as e:
        print(f"{prog}: error: {e}, --device", file=sys.stderr)
        return 2
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():
        print(f"{prog}: error: no CUDA device is visible, --device {args.device}", file=sys.stderr)
        return 2
    if device is not None and device.type not in ("cuda", "cpu"):
        print(f"{prog}: error: only cuda and cpu devices are checked, --device {args.device}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rows = run_selfcheck(device, workdir=args.workdir, log=lambda text: print(text, file=sys.stderr, flush=True))
    print(format_table(rows))
    print(summary_line(rows, time.perf_counter() - t0))
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=2))
    return exit_code(rows, strict=args.strict)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cameo-corr selfcheck``."""
    p = subparsers.add_parser("selfcheck", help="check this machine's GPU (or CPU) paths end to end",
                              description=__doc__.split("\n\n")[0])
    _add_arguments(p)
    p.set_defaults(func=_run)


def main(argv: list[str] | None = None) -> int:
    """``python -m cameo_corr.selfcheck``."""
    parser = argparse.ArgumentParser(prog="python -m cameo_corr.selfcheck", description=__doc__.split("\n\n")[0])
    _add_arguments(parser)
    return _run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
