"""The geometry-backend interface, its registry and the ``depth`` backend (ground-truth unprojection).

Windows are built analytically: cameras inside a box room, z-depth by exact ray casting against the
box walls, so every unprojected point must lie on a wall and reproject to its own pixel centre.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cameo_corr.pipeline.backends import (
    GeometryBackend,
    add_backend_arguments,
    backend_class,
    backend_options_from_args,
    make_backend,
)
from cameo_corr.pipeline.backends.depth import DepthBackend
from cameo_corr.pipeline.backends.geometry import invert_rigid, pixel_rays, unproject_depth
from cameo_corr.schemas import (
    FrameRecord,
    PointmapResult,
    SchemaError,
    WindowData,
    WindowRecord,
    invert_extrinsics,
    make_extrinsics,
    project,
)
from cameo_corr.schemas import unproject_depth as unproject_depth_np

BOX = np.array([2.0, 1.5, 2.5])
"""Half extents of the box room centred at the origin."""


def look_at(center: np.ndarray, target: np.ndarray, up: np.ndarray = np.array([0.0, -1.0, 0.0])) -> np.ndarray:
    """World-to-camera (OpenCV: x right, y down, z forward) of a camera at ``center`` looking at ``target``."""
    z = target - center
    z = z / np.linalg.norm(z)
    x = np.cross(up, z)
    if np.linalg.norm(x) < 1e-6:
        x = np.cross(np.array([1.0, 0.0, 0.0]), z)
    x = x / np.linalg.norm(x)
    y = np.cross(z, x)
    R = np.stack([x, y, z])
    return make_extrinsics(R, -R @ center)


def box_depth(K: np.ndarray, E: np.ndarray, height: int, width: int) -> np.ndarray:
    """Exact z-depth ``[H, W]`` of the box room walls seen by camera ``(K, E)`` (camera inside the box)."""
    c2w = invert_extrinsics(E)
    C = c2w[:3, 3]
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    rays_cam = np.stack([u, v, np.ones_like(u)], -1) @ np.linalg.inv(K).T  # z = 1
    d = rays_cam @ c2w[:3, :3].T
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(d > 0, (BOX - C) / d, np.where(d < 0, (-BOX - C) / d, np.inf))
    return t.min(axis=-1).astype(np.float32)


def make_window(
    extrinsics: list[np.ndarray], size: int | tuple[int, int] = 48, K: np.ndarray | None = None, window_id: str = "w"
) -> WindowData:
    """A window of the box room seen by ``extrinsics`` with exact depth (images are a function of depth)."""
    H, W = (size, size) if isinstance(size, int) else size
    if K is None:
        K = np.array([[0.8 * W, 0.0, W / 2], [0.0, 0.8 * W, H / 2], [0.0, 0.0, 1.0]])
    frames, depths = [], []
    for k, E in enumerate(extrinsics):
        frames.append(FrameRecord(f"f{k}", f"f{k}.png", (H, W), K, E))
        depths.append(box_depth(K, E, H, W))
    depth = np.stack(depths)
    images = np.clip(depth[..., None] * 60.0, 0, 255).astype(np.uint8).repeat(3, axis=-1)
    record = WindowRecord(window_id, "analytic", "test", "box", tuple(frames))
    S = len(extrinsics)
    return WindowData(record, images, np.tile(K, (S, 1, 1)), np.stack(extrinsics), depth=depth)


def room_cameras(S: int = 3, seed: int = 0) -> list[np.ndarray]:
    """S cameras inside the box looking at different points of the room."""
    rng = np.random.default_rng(seed)
    cams = []
    for _ in range(S):
        center = rng.uniform(-0.5, 0.5, 3) * BOX
        target = rng.uniform(-1.0, 1.0, 3) * BOX
        cams.append(look_at(center, target))
    return cams


def on_box_wall(points: np.ndarray, atol: float = 1e-3) -> np.ndarray:
    """True where a point lies on the box surface (max over axes of |x_a| / half-extent == 1)."""
    r = np.max(np.abs(points) / BOX, axis=-1)
    return np.abs(r - 1.0) <= atol


# ---------------------------------------------------------------------------------- interface
def test_registry_builds_backends_by_name_and_dotted_path() -> None:
    assert isinstance(make_backend("depth", device="cpu"), DepthBackend)
    assert backend_class("cameo_corr.pipeline.backends.depth:DepthBackend") is DepthBackend
    with pytest.raises(ValueError, match="unknown geometry backend 'nope'"):
        make_backend("nope")
    with pytest.raises(ValueError, match="not a GeometryBackend subclass"):
        backend_class("cameo_corr.schemas:WindowData")


def test_a_new_backend_is_one_subclass() -> None:
    class Planar(GeometryBackend):
        name = "planar"
        version = "0"

        def __call__(self, window: WindowData) -> PointmapResult:
            S, H, W = window.images.shape[:3]
            pts = torch.zeros(S, H, W, 3)
            pts[..., 2] = 1.0
            ones = torch.ones(S, H, W)
            return PointmapResult(pts, ones.bool(), ones, torch.from_numpy(window.intrinsics), torch.from_numpy(window.extrinsics))

    window = make_window(room_cameras(2), size=8)
    backend = Planar(device="cpu")
    out = backend.run_batch([window, window])  # default run_batch loops over __call__
    assert len(out) == 2 and out[1].points.shape == (2, 8, 8, 3)
    assert backend.describe() == {"name": "planar", "version": "0"}


def test_cli_options_are_checked_against_the_backend() -> None:
    parser = argparse.ArgumentParser()
    add_backend_arguments(parser)
    args = parser.parse_args(["--backend", "depth", "--frame", "first", "--device", "cpu"])
    assert backend_options_from_args(args) == {"device": "cpu", "frame": "first"}
    args = parser.parse_args(["--backend", "depth", "--conf-threshold", "2"])
    with pytest.raises(ValueError, match="does not take --conf-threshold"):
        backend_options_from_args(args)
    args = parser.parse_args(["--backend", "vggt", "--model", "some/dir", "--points", "head", "--conf-percentile", "30"])
    assert backend_options_from_args(args) == {"model": "some/dir", "points": "head", "conf_percentile": 30.0}


# ------------------------------------------------------------------------------ depth backend
def test_unprojected_points_lie_on_the_walls_and_reproject_to_their_pixels() -> None:
    window = make_window(room_cameras(3), size=40)
    res = DepthBackend(device="cpu")(window)
    assert res.points.shape == (3, 40, 40, 3) and res.points.dtype == torch.float32
    assert res.valid.all() and torch.all(res.conf == 1.0)
    pts = res.points.double().numpy()
    assert on_box_wall(pts).all()
    centres = np.stack(np.meshgrid(np.arange(40) + 0.5, np.arange(40) + 0.5), -1)
    for k in range(3):
        uv, z = project(pts[k], window.intrinsics[k], window.extrinsics[k])
        np.testing.assert_allclose(uv, centres, atol=2e-3)
        np.testing.assert_allclose(z, window.depth[k], rtol=1e-5)
        np.testing.assert_allclose(pts[k], unproject_depth_np(window.depth[k], window.intrinsics[k], window.extrinsics[k]), atol=1e-5)
    np.testing.assert_allclose(res.extrinsics.numpy(), window.extrinsics, atol=1e-6)
    np.testing.assert_allclose(res.intrinsics.numpy(), window.intrinsics, atol=1e-4)


def test_invalid_depth_and_background_become_invalid_pixels() -> None:
    window = make_window(room_cameras(2), size=16)
    window.depth[0, 0, 0] = 0.0
    window.depth[0, 1, 1] = np.nan
    window.depth[1, 2, 2] = np.inf
    window.depth[1, 3, 3] = -1.0
    res = DepthBackend(device="cpu")(window)
    bad = [(0, 0, 0), (0, 1, 1), (1, 2, 2), (1, 3, 3)]
    for idx in bad:
        assert not res.valid[idx]
        assert torch.all(res.points[idx] == 0)
    assert int((~res.valid).sum()) == len(bad)
    assert torch.isfinite(res.points).all()

    masks = np.ones((2, 16, 16), dtype=bool)
    masks[:, :, :4] = False
    window.masks = masks
    res_m = DepthBackend(device="cpu", mask_background=True)(window)
    assert not res_m.valid[:, :, :4].any()
    assert torch.equal(res_m.valid[:, :, 4:], res.valid[:, :, 4:])
    window.masks = None
    with pytest.raises(SchemaError, match="masks"):
        DepthBackend(device="cpu", mask_background=True)(window)


def test_first_camera_frame_is_a_rigid_re_expression() -> None:
    window = make_window(room_cameras(3, seed=4), size=24)
    world = DepthBackend(device="cpu")(window)
    first = DepthBackend(device="cpu", frame="first")(window)
    E0 = window.extrinsics[0]
    mapped = world.points.double().numpy() @ E0[:3, :3].T + E0[:3, 3]
    np.testing.assert_allclose(first.points.numpy(), mapped, atol=1e-4)
    np.testing.assert_allclose(first.extrinsics[0].numpy(), np.eye(4), atol=1e-6)
    np.testing.assert_allclose(first.extrinsics.numpy(), window.extrinsics @ invert_extrinsics(E0), atol=1e-5)
    assert DepthBackend(frame="first").describe()["frame"] == "first"
    with pytest.raises(ValueError, match="frame must be one of"):
        DepthBackend(frame="camera")


def test_run_batch_groups_sizes_and_keeps_order() -> None:
    a = make_window(room_cameras(2, seed=1), size=16, window_id="a")
    b = make_window(room_cameras(3, seed=2), size=(12, 20), window_id="b")
    c = make_window(room_cameras(2, seed=3), size=16, window_id="c")
    backend = DepthBackend(device="cpu")
    batch = backend.run_batch([a, b, c])
    for w, r in zip([a, b, c], batch):
        single = backend(w)
        assert r.points.shape == single.points.shape
        assert torch.equal(r.points, single.points) and torch.equal(r.valid, single.valid)


def test_missing_depth_is_a_schema_error_naming_the_window() -> None:
    window = make_window(room_cameras(2), size=8, window_id="nodepth")
    window.depth = None
    with pytest.raises(SchemaError, match=r"window nodepth: field 'depth'"):
        DepthBackend(device="cpu")(window)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    fx=st.floats(5.0, 80.0),
    fy=st.floats(5.0, 80.0),
    cx=st.floats(-5.0, 20.0),
    cy=st.floats(-5.0, 20.0),
)
def test_unproject_then_project_is_the_identity(seed: int, fx: float, fy: float, cx: float, cy: float) -> None:
    rng = np.random.default_rng(seed)
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    x, y, z, w = q
    R = np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )
    E = make_extrinsics(R, rng.normal(size=3) * 3)
    K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
    depth = rng.uniform(0.1, 20.0, size=(6, 7))
    pts = unproject_depth(torch.from_numpy(depth), torch.from_numpy(K), torch.from_numpy(E)).numpy()
    uv, zz = project(pts, K, E)
    centres = np.stack(np.meshgrid(np.arange(7) + 0.5, np.arange(6) + 0.5), -1)
    np.testing.assert_allclose(uv, centres, atol=1e-6)
    np.testing.assert_allclose(zz, depth, rtol=1e-9)
    assert torch.allclose(invert_rigid(invert_rigid(torch.from_numpy(E))), torch.from_numpy(E), atol=1e-12)
    rays = pixel_rays(torch.from_numpy(K), 6, 7)
    assert torch.allclose(rays[..., 2], torch.ones(6, 7, dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_depth_backend_on_cuda_matches_cpu() -> None:
    window = make_window(room_cameras(3), size=32)
    cpu = DepthBackend(device="cpu")(window)
    gpu = DepthBackend(device="cuda")(window)
    assert gpu.points.device.type == "cuda"
    assert torch.allclose(gpu.points.cpu(), cpu.points, atol=1e-4)
    assert torch.equal(gpu.valid.cpu(), cpu.valid)
