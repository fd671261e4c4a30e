"""The ``vggt`` backend: pre/post-processing with small model doubles on CPU, analytic checks against the
``depth`` backend, checkpoint verification, and (where the real ``vggt`` package is installed) a tiny
real VGGT with random weights."""

from __future__ import annotations

import contextlib

import functools
import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.transform import Rotation
from torch import nn

from cameo_corr.pipeline.backends import make_backend
from cameo_corr.pipeline.backends.depth import DepthBackend
from cameo_corr.pipeline.backends.vggt import (
    TINY_VGGT_OPTIONS,
    VGGT_RESOLUTION,
    CheckpointError,
    PredictionError,
    VGGTBackend,
    build_tiny_vggt,
    checkpoint_shapes,
    load_state_dict_strict,
    load_vggt,
    resolve_dtype,
    tiny_vggt_architecture,
    verify_checkpoint,
)
from cameo_corr.schemas import invert_extrinsics
from test_backends_depth import make_window, room_cameras

N = VGGT_RESOLUTION


# ------------------------------------------------------------------------------------ doubles
class _Aggregator(nn.Module):
    """Patch embedding only: one token list ``[B, S, 1 + P, C]`` with a pooled "camera" token first."""

    def __init__(self, dim: int = 8, patch: int = 14) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], int]:
        B, S = images.shape[:2]
        x = self.embed(images.flatten(0, 1))
        tokens = x.flatten(2).transpose(1, 2).reshape(B, S, -1, x.shape[1])
        return [torch.cat([tokens.mean(2, keepdim=True), tokens], dim=2)], 1


class _CameraHead(nn.Module):
    """Pose encodings with sane values: small translations/rotations, fields of view around 0.9 rad."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, 9)

    def forward(self, tokens_list: list[torch.Tensor]) -> list[torch.Tensor]:
        t = self.fc(tokens_list[-1][:, :, 0])
        T = 0.3 * torch.tanh(t[..., :3])
        quat = torch.cat([0.2 * torch.tanh(t[..., 3:6]), torch.ones_like(t[..., 6:7])], dim=-1)
        fov = 0.9 + 0.2 * torch.tanh(t[..., 7:9])
        return [torch.cat([T, quat, fov], dim=-1)]


class _DPTHead(nn.Module):
    """Dense head with DPT's call signature (incl. ``frames_chunk_size``); logs the chunk sizes it ran."""

    def __init__(self, dim: int = 8, out: int = 1, activation: str = "exp") -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, out + 1, 1)
        self.activation = activation
        self.chunks: list[int] = []

    def forward(self, tokens_list, images, patch_start_idx, frames_chunk_size=8):
        B, S, _, H, W = images.shape
        step = S if frames_chunk_size is None or frames_chunk_size >= S else frames_chunk_size
        preds, confs = [], []
        for s0 in range(0, S, step):
            tok = tokens_list[-1][:, s0 : s0 + step, patch_start_idx:]
            s = tok.shape[1]
            self.chunks.append(s)
            x = tok.reshape(B * s, H // 14, W // 14, -1).permute(0, 3, 1, 2)
            y = F.interpolate(self.proj(x), size=(H, W), mode="bilinear", align_corners=False)
            y = y.reshape(B, s, -1, H, W).permute(0, 1, 3, 4, 2)
            pred = torch.exp(y[..., :-1]) + 1.0 if self.activation == "exp" else y[..., :-1]
            preds.append(pred)
            confs.append(1.0 + torch.exp(y[..., -1]))
        return torch.cat(preds, dim=1), torch.cat(confs, dim=1)


class VGGTDouble(nn.Module):
    """Small random network with VGGT's submodule names, forward signature and output dict."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.aggregator = _Aggregator(dim)
        self.camera_head = _CameraHead(dim)
        self.depth_head = _DPTHead(dim, 1, "exp")
        self.point_head = _DPTHead(dim, 3, "linear")

    def forward(self, images: torch.Tensor, query_points: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if images.dim() == 4:
            images = images.unsqueeze(0)
        tokens, start = self.aggregator(images)
        pose = self.camera_head(tokens)
        depth, depth_conf = self.depth_head(tokens, images=images, patch_start_idx=start)
        pts, pts_conf = self.point_head(tokens, images=images, patch_start_idx=start)
        return {
            "pose_enc": pose[-1],
            "pose_enc_list": pose,
            "depth": depth,
            "depth_conf": depth_conf,
            "world_points": pts,
            "world_points_conf": pts_conf,
            "images": images,
        }


class FixedOutputs(nn.Module):
    """Returns given outputs (e.g. ground truth) for a ``[1, S, 3, 518, 518]`` input, checking the input."""

    def __init__(self, outputs: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.outputs = outputs
        self.seen: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor, query_points: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        assert images.shape[-3:] == (3, N, N) and images.dtype == torch.float32
        assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
        self.seen.append(images)
        return {**self.outputs, "images": images}


def gt_pose_encoding(K: np.ndarray, E: np.ndarray, hw: tuple[int, int]) -> torch.Tensor:
    """VGGT ``absT_quaR_FoV`` encoding ``[1, S, 9]`` of cameras relative to the first one, intrinsics ``K``
    given at the network resolution ``hw`` (written independently of the backend, with scipy)."""
    rel = E @ invert_extrinsics(E[0])
    quat = Rotation.from_matrix(rel[:, :3, :3]).as_quat()  # (x, y, z, w), scalar last as VGGT
    fov_h = 2 * np.arctan(hw[0] / 2 / K[:, 1, 1])
    fov_w = 2 * np.arctan(hw[1] / 2 / K[:, 0, 0])
    enc = np.concatenate([rel[:, :3, 3], quat, fov_h[:, None], fov_w[:, None]], axis=-1)
    return torch.from_numpy(enc).float()[None]


def vggt_centred_K(size: int, f: float) -> np.ndarray:
    """Intrinsics of a ``size`` view whose principal point is where VGGT puts it: (W/2, H/2) with integer
    pixel centres at 518, i.e. 259.5 in +0.5 centres, scaled to ``size``."""
    c = (N / 2 + 0.5) * size / N
    return np.array([[f, 0.0, c], [0.0, f, c], [0.0, 0.0, 1.0]])


# ----------------------------------------------------------------------------- pre-processing
def test_preprocess_resizes_to_518_in_unit_range() -> None:
    window = make_window(room_cameras(3), size=64)
    window.images[:] = 128
    backend = VGGTBackend(VGGTDouble(), device="cpu")
    x = backend.preprocess([window, window])
    assert x.shape == (2, 3, 3, N, N) and x.dtype == torch.float32
    assert torch.allclose(x, torch.full_like(x, 128 / 255), atol=1e-6)


def test_dtype_rules_and_no_cuda_or_autocast_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_cuda(*args, **kwargs):
        raise AssertionError("CUDA API called on a CPU run")

    monkeypatch.setattr(torch.cuda, "get_device_capability", no_cuda)
    monkeypatch.setattr(torch.cuda, "synchronize", no_cuda)
    monkeypatch.setattr(torch, "autocast", no_cuda)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_dtype("bfloat16", torch.device("cpu"))
    with pytest.raises(ValueError, match="dtype must be"):
        resolve_dtype("int8", torch.device("cpu"))
    backend = VGGTBackend(VGGTDouble(), device="cpu")
    res = backend(make_window(room_cameras(2), size=28))
    assert res.points.dtype == torch.float32 and backend.describe()["dtype"] == "float32"


def test_float32_on_cuda_runs_without_tf32_and_reduced_precisions_under_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    """``dtype=float32`` is the reference the bf16/fp16 runs are checked against: on CUDA its cuDNN
    convolutions run without TF32 (torch's default allows it), and the flag is restored afterwards, also
    on an error. bf16/fp16 run under autocast, with torch's defaults. (The contexts are chosen here; the
    convolutions run in the selfcheck on a GPU.)"""
    backend = VGGTBackend(VGGTDouble(), device="cpu")
    monkeypatch.setattr(backend, "device", torch.device("cuda"))
    before = torch.backends.cudnn.allow_tf32
    assert before  # torch's default
    with backend._autocast():
        assert torch.backends.cudnn.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 == before
    with pytest.raises(RuntimeError, match="inside"):
        with backend._autocast():
            raise RuntimeError("inside")
    assert torch.backends.cudnn.allow_tf32 == before
    seen = []
    monkeypatch.setattr(torch, "autocast", lambda device_type, **kw: seen.append((device_type, kw)) or contextlib.nullcontext())
    monkeypatch.setattr(backend, "dtype", torch.bfloat16)
    with backend._autocast():
        assert torch.backends.cudnn.allow_tf32 == before
    assert seen == [("cuda", {"dtype": torch.bfloat16})]


def test_missing_vggt_package_raises_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vggt.models.vggt", None)
    with pytest.raises(ImportError, match=r"pip install git\+https://github.com/facebookresearch/vggt.*cameo-corr\[vggt\]"):
        VGGTBackend("facebook/VGGT-1B", device="cpu")


def test_option_validation() -> None:
    for kwargs, msg in [
        ({"points": "mesh"}, "points must be one of"),
        ({"conf_percentile": 100.0}, "conf_percentile"),
        ({"conf_threshold": math.inf}, "conf_threshold"),
        ({"frames_chunk_size": 0}, "frames_chunk_size"),
    ]:
        with pytest.raises(ValueError, match=msg):
            VGGTBackend(VGGTDouble(), device="cpu", **kwargs)
    with pytest.raises(ValueError, match="frames_chunk_size needs VGGT's submodules .* this model only has a forward"):
        VGGTBackend(FixedOutputs({}), device="cpu", frames_chunk_size=2)
    no_points = VGGTDouble()
    no_points.point_head = None  # a VGGT built with enable_point=False
    with pytest.raises(ValueError, match="points='head' needs the model's point_head"):
        VGGTBackend(no_points, device="cpu", points="head")
    VGGTBackend(no_points, device="cpu")  # the depth pointmap does not need the point head


# ---------------------------------------------------------------------------- post-processing
def test_random_double_end_to_end_cameras_and_rays() -> None:
    window = make_window(room_cameras(3), size=64)
    double = VGGTDouble()
    backend = make_backend("vggt", model=double, device="cpu", model_id="double-v0")
    res = backend(window)
    assert res.points.shape == (3, 64, 64, 3) and res.valid.shape == (3, 64, 64) and res.conf.shape == (3, 64, 64)
    assert res.valid.all() and torch.all(res.conf >= 1.0)
    out = double(backend.preprocess([window]))
    enc = out["pose_enc"][0].detach().double().numpy()
    # Independent decoding with scipy: x_cam = R x + t; f = (size/2) / tan(fov/2); c = 259.5 * size / 518.
    R = Rotation.from_quat(enc[:, 3:7]).as_matrix()
    np.testing.assert_allclose(res.extrinsics[:, :3, :3].numpy(), R, atol=1e-5)
    np.testing.assert_allclose(res.extrinsics[:, :3, 3].numpy(), enc[:, :3], atol=1e-6)
    fx = (N / 2) / np.tan(enc[:, 8] / 2) * 64 / N
    fy = (N / 2) / np.tan(enc[:, 7] / 2) * 64 / N
    np.testing.assert_allclose(res.intrinsics[:, 0, 0].numpy(), fx, rtol=1e-5)
    np.testing.assert_allclose(res.intrinsics[:, 1, 1].numpy(), fy, rtol=1e-5)
    np.testing.assert_allclose(res.intrinsics[:, :2, 2].numpy(), (N / 2 + 0.5) * 64 / N, rtol=1e-6)
    # Depth-mode points lie on the rays of their pixels with the predicted cameras, at the resized depth.
    depth64 = F.interpolate(out["depth"][0, ..., 0].unsqueeze(1), size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    centres = np.stack(np.meshgrid(np.arange(64) + 0.5, np.arange(64) + 0.5), -1)
    for k in range(3):
        E = res.extrinsics[k].double().numpy()
        cam = res.points[k].double().numpy() @ E[:3, :3].T + E[:3, 3]
        uv = cam @ res.intrinsics[k].double().numpy().T
        np.testing.assert_allclose(uv[..., :2] / uv[..., 2:], centres, atol=2e-3)
        np.testing.assert_allclose(cam[..., 2], depth64[k].detach().numpy(), rtol=1e-4)
    d = backend.describe()
    assert d["model_id"] == "double-v0" and d["points"] == "depth" and d["conf"] == "depth_conf"


def test_default_runs_only_the_needed_head_in_chunks_of_8_with_forwards_outputs() -> None:
    double = VGGTDouble()
    images = torch.rand(1, 10, 3, 28, 28)
    reference = double(images)  # VGGT.forward: both dense heads, each chunked by its default
    for points, head, keys in (("depth", "depth_head", ("depth", "depth_conf")),
                               ("head", "point_head", ("world_points", "world_points_conf"))):
        backend = VGGTBackend(double, device="cpu", points=points)
        double.depth_head.chunks.clear()
        double.point_head.chunks.clear()
        out = backend.predict(images)
        assert getattr(double, head).chunks == [8, 2]
        other = double.point_head if head == "depth_head" else double.depth_head
        assert other.chunks == []  # the unused dense head never runs
        assert set(out) == {"pose_enc", *keys}
        for k in out:
            assert torch.equal(out[k], reference[k]), k


def test_frames_chunk_size_changes_memory_not_values() -> None:
    window = make_window(room_cameras(3), size=28)
    double = VGGTDouble()
    default = VGGTBackend(double, device="cpu")(window)
    double.depth_head.chunks.clear()
    chunked = VGGTBackend(double, device="cpu", frames_chunk_size=2)(window)
    assert double.depth_head.chunks == [2, 1] and double.point_head.chunks == []
    double.depth_head.chunks.clear()
    whole = VGGTBackend(double, device="cpu", frames_chunk_size=None)(window)
    assert double.depth_head.chunks == [3]
    for other in (chunked, whole):
        assert torch.allclose(default.points, other.points, atol=1e-5)
        assert torch.equal(default.valid, other.valid)


def test_point_head_mode_resizes_world_points_bilinearly() -> None:
    window = make_window(room_cameras(2), size=40)
    double = VGGTDouble()
    backend = VGGTBackend(double, device="cpu", points="head")
    res = backend(window)
    out = double(backend.preprocess([window]))
    expected = F.interpolate(out["world_points"][0].permute(0, 3, 1, 2), size=(40, 40), mode="bilinear", align_corners=False)
    assert torch.allclose(res.points, expected.permute(0, 2, 3, 1), atol=1e-5)
    conf = F.interpolate(out["world_points_conf"][0].unsqueeze(1), size=(40, 40), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(res.conf, conf, atol=1e-5)
    assert backend.describe()["conf"] == "world_points_conf"


def _fixed(S: int, depth: torch.Tensor | None = None, conf: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    pose = torch.zeros(1, S, 9)
    pose[..., 6] = 1.0
    pose[..., 7:] = 1.0
    return {
        "pose_enc": pose,
        "depth": torch.ones(1, S, N, N, 1) if depth is None else depth,
        "depth_conf": torch.ones(1, S, N, N) if conf is None else conf,
    }


def test_absolute_and_percentile_confidence_thresholds() -> None:
    S = 2
    window = make_window(room_cameras(S), size=N)  # network resolution: no resizing of validity
    conf = 1.0 + torch.linspace(0, 9, S * N * N).reshape(1, S, N, N)
    outputs = _fixed(S, conf=conf)
    res = VGGTBackend(FixedOutputs(outputs), device="cpu", conf_threshold=5.5)(window)
    assert torch.equal(res.valid, conf[0] >= 5.5)
    res = VGGTBackend(FixedOutputs(outputs), device="cpu", conf_percentile=30.0)(window)
    assert abs(res.valid.float().mean().item() - 0.7) < 1e-3
    assert res.conf[res.valid].min() >= res.conf[~res.valid].max()
    both = VGGTBackend(FixedOutputs(outputs), device="cpu", conf_threshold=5.5, conf_percentile=30.0)(window)
    assert torch.equal(both.valid, conf[0] >= 5.5)
    # invalid network pixels never leak into the resized view: an output pixel needs all its sources valid
    depth = torch.ones(1, S, N, N, 1)
    depth[0, 0, 100:110, 200:230] = 0.0
    depth[0, 1, 5, 5] = math.nan
    small = make_window(room_cameras(S), size=64)
    res = VGGTBackend(FixedOutputs(_fixed(S, depth=depth)), device="cpu")(small)
    bad = F.interpolate((~(depth[0, ..., 0] > 0)).float().unsqueeze(1), size=(64, 64), mode="bilinear", align_corners=False)[:, 0] > 0
    assert torch.equal(res.valid, ~bad) and bad.any()
    assert torch.isfinite(res.points).all() and torch.all(res.points[~res.valid] == 0)


def test_degenerate_camera_and_bad_outputs_are_errors() -> None:
    window = make_window(room_cameras(2), size=32, window_id="degen")
    outputs = _fixed(2)
    outputs["pose_enc"][0, 1, 8] = 0.0  # zero field of view -> infinite focal length
    with pytest.raises(PredictionError, match=r"window degen: .*view\(s\) \[1\]"):
        VGGTBackend(FixedOutputs(outputs), device="cpu")(window)
    with pytest.raises(KeyError, match="no 'depth_conf'"):
        VGGTBackend(FixedOutputs({k: v for k, v in _fixed(2).items() if k != "depth_conf"}), device="cpu")(window)
    wrong = _fixed(2)
    wrong["depth"] = torch.ones(1, 2, N, N)
    with pytest.raises(ValueError, match=r"'depth' has shape \(1, 2, 518, 518\), expected \(1, 2, 518, 518, 1\)"):
        VGGTBackend(FixedOutputs(wrong), device="cpu")(window)


def test_run_batch_batches_equal_view_counts_and_keeps_order() -> None:
    a = make_window(room_cameras(2, seed=1), size=28, window_id="a")
    b = make_window(room_cameras(3, seed=2), size=42, window_id="b")
    c = make_window(room_cameras(2, seed=3), size=56, window_id="c")
    double = VGGTDouble()
    backend = VGGTBackend(double, device="cpu")
    double.depth_head.chunks.clear()
    batch = backend.run_batch([a, b, c])
    assert double.depth_head.chunks == [2, 3]  # one forward for S=2 (a and c together), one for S=3
    for w, r in zip([a, b, c], batch):
        single = backend(w)
        assert r.points.shape == (w.record.num_views, *w.images.shape[1:3], 3)
        assert torch.allclose(r.points, single.points, atol=1e-4)


# ------------------------------------------------------------------------------ analytic check
def test_ground_truth_double_reproduces_the_depth_backend_exactly_at_518() -> None:
    """GT depth + GT pose encoding through the VGGT post-processing = the depth backend in the first
    camera's frame: proves the pose decoding (quaternion order, world-to-camera, fov) and unprojection."""
    cams = room_cameras(4, seed=7)
    K = vggt_centred_K(N, 0.7 * N)
    window = make_window(cams, size=N, K=K)
    outputs = {
        "pose_enc": gt_pose_encoding(window.intrinsics, window.extrinsics, (N, N)),
        "depth": torch.from_numpy(window.depth)[None, ..., None],
        "depth_conf": torch.ones(1, 4, N, N),
    }
    res = VGGTBackend(FixedOutputs(outputs), device="cpu")(window)
    ref = DepthBackend(device="cpu", frame="first")(window)
    assert torch.equal(res.valid, ref.valid)
    assert torch.allclose(res.extrinsics, ref.extrinsics, atol=1e-5)
    assert torch.allclose(res.intrinsics, ref.intrinsics, atol=1e-3)
    assert (res.points - ref.points).norm(dim=-1).max() < 1e-4 * float(window.depth.max())


def test_ground_truth_double_matches_the_depth_backend_at_512_after_resizing() -> None:
    cams = room_cameras(3, seed=11)
    f512 = 0.7 * 512
    w512 = make_window(cams, size=512, K=vggt_centred_K(512, f512))
    w518 = make_window(cams, size=N, K=vggt_centred_K(N, f512 * N / 512))  # the same cameras at 518
    outputs = {
        "pose_enc": gt_pose_encoding(w518.intrinsics, w518.extrinsics, (N, N)),
        "depth": torch.from_numpy(w518.depth)[None, ..., None],
        "depth_conf": torch.ones(1, 3, N, N),
    }
    res = VGGTBackend(FixedOutputs(outputs), device="cpu")(w512)
    ref = DepthBackend(device="cpu", frame="first")(w512)
    assert torch.allclose(res.intrinsics, ref.intrinsics, atol=1e-3)
    err = (res.points - ref.points).norm(dim=-1) / torch.from_numpy(w512.depth)
    assert float(err.median()) < 1e-4  # planar walls: bilinear depth is exact up to float error
    assert float(torch.quantile(err.flatten(), 0.99)) < 5e-3  # wall edges/corners blend two walls


# ------------------------------------------------------------------------- checkpoint checks
class _Small(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.a = nn.Linear(3, width)
        self.b = nn.Linear(width, 2)


def test_checkpoint_verification_names_the_file(tmp_path) -> None:
    from safetensors.torch import save_file

    model = _Small()
    good = tmp_path / "good.safetensors"
    save_file(model.state_dict(), str(good))
    assert checkpoint_shapes(good)["a.weight"] == (4, 3)
    verify_checkpoint(_Small(), good)
    fresh = _Small()
    load_state_dict_strict(fresh, good)
    assert torch.equal(fresh.a.weight, model.a.weight)

    sd = model.state_dict()
    missing = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in sd.items() if k != "b.bias"}, str(missing))
    with pytest.raises(CheckpointError, match=r"missing\.safetensors: does not match _Small: 1 missing key\(s\) \(e\.g\. b\.bias\)"):
        verify_checkpoint(_Small(), missing)
    extra = tmp_path / "extra.pt"
    torch.save({**sd, "track_head.w": torch.zeros(1)}, str(extra))
    with pytest.raises(CheckpointError, match=r"extra\.pt: .*1 unexpected key\(s\) \(e\.g\. track_head\.w\)"):
        load_state_dict_strict(_Small(), extra)
    with pytest.raises(CheckpointError, match=r"good\.safetensors: .*3 shape-mismatched"):
        verify_checkpoint(_Small(width=5), good)
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        checkpoint_shapes(tmp_path / "absent.safetensors")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pt: cannot be read"):
        checkpoint_shapes(junk)


# --------------------------------------------------------------------- real vggt (if installed)
@pytest.fixture
def tiny_vggt():
    """A real ``vggt.models.vggt.VGGT`` shrunk to ~1.75 M parameters (SPEC section 2), random weights,
    with the camera head's last layer set so every view decodes to an identity pose and 1 rad fov.
    The tiny architecture stays active during the test, so loading routes build it too."""
    vm = pytest.importorskip("vggt.models.vggt", reason="the real vggt package is not installed (optional extra)")
    with tiny_vggt_architecture():
        model = build_tiny_vggt(seed=0)
        last = model.camera_head.pose_branch.fc2
        with torch.no_grad():
            last.weight.zero_()
            last.bias.copy_(torch.tensor([0, 0, 0, 0, 0, 0, 0.25, 0.25, 0.25]))  # 4 refinement steps sum to this x4
        yield vm, model


@pytest.mark.vggt
@pytest.mark.filterwarnings("ignore:.*torch.cuda.amp.autocast:FutureWarning")
def test_real_tiny_vggt_through_the_adapter(tiny_vggt) -> None:
    _, model = tiny_vggt
    window = make_window(room_cameras(2), size=64)
    res = VGGTBackend(model, device="cpu")(window)
    assert res.points.shape == (2, 64, 64, 3) and torch.isfinite(res.points).all() and res.valid.all()
    f = (N / 2) / math.tan(0.5) * 64 / N
    np.testing.assert_allclose(res.intrinsics[:, 0, 0].numpy(), f, rtol=1e-4)
    assert torch.allclose(res.extrinsics, torch.eye(4).expand(2, 4, 4), atol=1e-6)
    chunked = VGGTBackend(model, device="cpu", frames_chunk_size=1)(window)
    assert torch.allclose(chunked.points, res.points, atol=1e-4)
    head = VGGTBackend(model, device="cpu", points="head", conf_percentile=50.0)(window)
    assert 0.3 < head.valid.float().mean().item() < 0.5


@pytest.mark.vggt
@pytest.mark.filterwarnings("ignore:.*torch.cuda.amp.autocast:FutureWarning")
def test_real_vggt_loads_a_saved_directory_and_rejects_a_wrong_one(tiny_vggt, tmp_path) -> None:
    vm, model = tiny_vggt
    good = tmp_path / "good"
    model.save_pretrained(str(good))
    window = make_window(room_cameras(2), size=28)
    loaded = VGGTBackend(str(good), device="cpu")
    assert loaded.describe()["model_id"] == str(good)
    assert torch.allclose(loaded(window).points, VGGTBackend(model, device="cpu")(window).points, atol=1e-5)

    wrong = tmp_path / "wrong"
    model.save_pretrained(str(wrong))
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "enable_point": False}))
    with pytest.raises(CheckpointError, match=r"wrong/model\.safetensors: does not match VGGT: .*unexpected key\(s\) \(e\.g\. point_head\."):
        load_vggt(str(wrong))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty/model\.safetensors: not found"):
        load_vggt(str(tmp_path / "empty"))


@pytest.mark.vggt
@pytest.mark.filterwarnings("ignore:.*torch.cuda.amp.autocast:FutureWarning")
def test_real_vggt_loads_a_single_checkpoint_file(tiny_vggt, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    vm, model = tiny_vggt
    monkeypatch.setattr(vm, "VGGT", functools.partial(vm.VGGT, **TINY_VGGT_OPTIONS))
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), str(path))
    loaded = load_vggt(str(path))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert not loaded.training
    bad = tmp_path / "bad.pt"
    torch.save({**model.state_dict(), "camera_head.pose_branch.fc2.bias": torch.zeros(10)}, str(bad))
    with pytest.raises(CheckpointError, match=r"bad\.pt: .*1 shape-mismatched key\(s\) \(e\.g\. camera_head\.pose_branch\.fc2\.bias\)"):
        load_vggt(str(bad))


@pytest.mark.vggt
@pytest.mark.filterwarnings("ignore:.*torch.cuda.amp.autocast:FutureWarning")
def test_real_vggt_single_head_outputs_equal_forward(tiny_vggt) -> None:
    """The default path (aggregator + camera head + one DPT head, 8 frames per pass) gives exactly
    ``VGGT.forward``'s outputs for that head; 9 frames make the head run two chunks."""
    _, model = tiny_vggt
    images = torch.rand(1, 9, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = model(images)
    for points, keys in (("depth", ("depth", "depth_conf")), ("head", ("world_points", "world_points_conf"))):
        out = VGGTBackend(model, device="cpu", points=points).predict(images)
        assert set(out) == {"pose_enc", *keys}
        for k in out:
            assert torch.equal(out[k], reference[k]), (points, k)


def _mismatched_checkpoint(model: nn.Module, directory) -> None:
    """``save_pretrained`` layout whose weights have one tensor of the wrong shape."""
    from safetensors.torch import save_file

    model.save_pretrained(str(directory))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["camera_head.pose_branch.fc2.bias"] = torch.zeros(10)
    save_file(state, str(directory / "model.safetensors"))


@pytest.mark.vggt
@pytest.mark.filterwarnings("ignore:.*torch.cuda.amp.autocast:FutureWarning")
def test_real_vggt_shape_mismatched_directory_raises_checkpoint_error(tiny_vggt, tmp_path) -> None:
    _, model = tiny_vggt
    _mismatched_checkpoint(model, tmp_path / "bad")
    with pytest.raises(CheckpointError, match=r"bad/model\.safetensors: .*1 shape-mismatched key\(s\) \(e\.g\. camera_head\.pose_branch\.fc2\.bias\)"):
        load_vggt(str(tmp_path / "bad"))


@pytest.mark.vggt
@pytest.mark.filterwarnings("ignore:.*torch.cuda.amp.autocast:FutureWarning")
def test_real_vggt_hub_id_from_an_offline_cache(tiny_vggt, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Hub id resolved from a Hugging Face cache (``HF_HUB_OFFLINE=1``): a good snapshot loads, a
    shape-mismatched one raises CheckpointError naming the snapshot's weights file."""
    from huggingface_hub import constants

    _, model = tiny_vggt
    cache = tmp_path / "hub"
    for repo, commit, good in (("good", "a" * 40, True), ("bad", "b" * 40, False)):
        snapshot = cache / f"models--acme--{repo}" / "snapshots" / commit
        if good:
            model.save_pretrained(str(snapshot))
        else:
            _mismatched_checkpoint(model, snapshot)
        (cache / f"models--acme--{repo}" / "refs").mkdir()
        (cache / f"models--acme--{repo}" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    loaded = load_vggt("acme/good")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    with pytest.raises(CheckpointError, match=r"models--acme--bad/snapshots/b{40}/model\.safetensors: .*shape-mismatched"):
        load_vggt("acme/bad")
