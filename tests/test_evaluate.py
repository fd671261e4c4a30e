"""``eval-corr``: the ground-truth reprojection, the per-angle-bin scoring, and end-to-end runs of the
command on synthetic scenes and on real 7-Scenes depth."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cameo_corr.pipeline.backends.geometry import unproject_depth
from cameo_corr.pipeline.evaluate import (
    ANGLE_BINS,
    BinCounts,
    angle_bin,
    format_table,
    optical_axis_angles,
    reprojection_targets,
    score_pairs,
)
from cameo_corr.schemas import pixel_to_token, project
from test_backends_depth import box_depth, look_at, make_window

GRID = (16, 16)


def token_points(window) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ground-truth points at the token centres (the box-room depth evaluated on the token grid)."""
    H, W = window.images.shape[1:3]
    h, w = GRID
    pts = []
    for K, E in zip(window.intrinsics, window.extrinsics):
        Kt = K.copy()
        Kt[0] *= w / W
        Kt[1] *= h / H
        d = box_depth(Kt, E, h, w)
        pts.append(unproject_depth(torch.from_numpy(d).double(), torch.from_numpy(Kt), torch.from_numpy(E)))
    points = torch.stack(pts).float()
    return points, torch.ones(points.shape[:3], dtype=torch.bool)


def brute_force_targets(window, points: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Reference visibility/target with an explicit loop over pairs and tokens (schemas.project)."""
    S, h, w, _ = points.shape
    H, W = window.images.shape[1:3]
    vis = np.zeros((S, S, h * w), dtype=bool)
    tgt = np.zeros((S, S, h * w, 2))
    for i in range(S):
        for j in range(S):
            uv, z = project(points[i].reshape(-1, 3), window.intrinsics[j], window.extrinsics[j])
            tgt[i, j] = pixel_to_token(uv, (H, W), (h, w))
            for x in range(h * w):
                u, v = uv[x]
                if z[x] > 0 and 0 <= u < W and 0 <= v < H:
                    d = window.depth[j, int(v), int(u)]
                    vis[i, j, x] = d > 0 and abs(z[x] - d) <= tol * d
    return vis, tgt


def two_views_of_a_wall(angle_deg: float) -> list[np.ndarray]:
    """Two cameras at the room centre looking at the far wall, rotated by ``angle_deg`` about y."""
    a = math.radians(angle_deg)
    return [look_at(np.zeros(3), np.array([0.0, 0.0, 1.0])), look_at(np.zeros(3), np.array([math.sin(a), 0.0, math.cos(a)]))]


# ---------------------------------------------------------------------------------- geometry
def test_reprojection_targets_match_a_brute_force_reference() -> None:
    window = make_window(two_views_of_a_wall(25.0) + [look_at(np.array([0.3, 0.2, -0.5]), np.array([0.5, 0.0, 2.5]))], size=64)
    pts, valid = token_points(window)
    gt = reprojection_targets(pts, valid, torch.from_numpy(window.depth), torch.from_numpy(window.intrinsics), torch.from_numpy(window.extrinsics))
    vis, tgt = brute_force_targets(window, pts.double().numpy(), 0.05)
    assert torch.equal(gt.visible, torch.from_numpy(vis))
    inside = torch.from_numpy(vis)
    assert torch.allclose(gt.target[inside].double(), torch.from_numpy(tgt)[inside], atol=1e-3)
    for i in range(3):  # a view sees all of itself at its own token centres
        assert gt.visible[i, i].all()
        coords = torch.stack(torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="xy"), -1).reshape(-1, 2)
        assert torch.allclose(gt.target[i, i], coords, atol=1e-3)
    assert 0 < int(gt.visible[0, 1].sum()) < 256  # partial overlap: some tokens leave the other view


def test_occluded_and_unknown_queries() -> None:
    window = make_window(two_views_of_a_wall(0.0), size=32)
    pts, valid = token_points(window)
    window.depth[1, :, :16] *= 0.5  # an occluder in front of the left half of view 1
    window.depth[1, :8, 16:] = 0.0  # a hole (invalid depth) in view 1
    valid[0, 15, 15] = False  # an invalid query token of view 0
    gt = reprojection_targets(pts, valid, torch.from_numpy(window.depth), torch.from_numpy(window.intrinsics), torch.from_numpy(window.extrinsics))
    g = gt.visible[0, 1].reshape(16, 16)
    known = gt.known[0, 1].reshape(16, 16)
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[4:, 8:] = True
    expected[15, 15] = False
    assert torch.equal(g, expected)
    assert known[:, :8].all()  # occluded: known, not visible
    assert not known[:4, 8:].any()  # hole in the key view's depth: unknown
    assert not known[15, 15] and not gt.visible[0, :, 15 * 16 + 15].any()  # invalid query: unknown everywhere


def test_optical_axis_angles_and_bins() -> None:
    E = np.stack(two_views_of_a_wall(0.0)[:1] + two_views_of_a_wall(47.0)[1:] + two_views_of_a_wall(100.0)[1:])
    ang = optical_axis_angles(torch.from_numpy(E))
    assert torch.allclose(ang, ang.T) and torch.allclose(torch.diagonal(ang), torch.zeros(3, dtype=ang.dtype), atol=1e-5)
    assert abs(float(ang[0, 1]) - 47.0) < 1e-6 and abs(float(ang[0, 2]) - 100.0) < 1e-6 and abs(float(ang[1, 2]) - 53.0) < 1e-6
    assert [angle_bin(a, ANGLE_BINS) for a in (0.0, 29.99, 30.0, 89.0, 120.0, 120.01, 170.0)] == [0, 0, 1, 2, 3, None, None]


# ----------------------------------------------------------------------------------- scoring
def test_perfect_shifted_and_mask_all_predictors() -> None:
    window = make_window(two_views_of_a_wall(20.0), size=64)
    pts, valid = token_points(window)
    gt = reprojection_targets(pts, valid, torch.from_numpy(window.depth), torch.from_numpy(window.intrinsics), torch.from_numpy(window.extrinsics))
    angles = optical_axis_angles(torch.from_numpy(window.extrinsics))
    h, w = GRID
    xy = gt.target.round().long()
    xy[..., 0].clamp_(0, w - 1)
    xy[..., 1].clamp_(0, h - 1)
    perfect = xy[..., 1] * w + xy[..., 0]
    counts = score_pairs(perfect, gt.visible, gt, angles, GRID)
    assert counts[0].pairs == 2 and all(c.pairs == 0 for c in counts[1:])
    d = counts[0].to_dict()
    assert d["precision"] == 1.0 and d["mask_precision"] == 1.0 and d["coverage"] == 1.0
    assert d["masked"] == int(gt.visible[0, 1].sum() + gt.visible[1, 0].sum())
    assert counts[1].to_dict()["precision"] is None

    shifted = xy.clone()
    shifted[..., 0] = (shifted[..., 0] + 2) % w
    far = score_pairs(shifted[..., 1] * w + shifted[..., 0], gt.visible, gt, angles, GRID)[0]
    assert far.correct == 0 and far.masked == d["masked"] and far.to_dict()["precision"] == 0.0

    everything = torch.ones_like(gt.visible)
    all_masked = score_pairs(perfect, everything, gt, angles, GRID)[0]
    assert all_masked.masked == int(gt.known[0, 1].sum() + gt.known[1, 0].sum())  # not-visible masked queries count
    am = all_masked.to_dict()
    assert am["precision"] == 1.0 and am["coverage"] == 1.0 and am["mask_precision"] < 1.0
    assert am["mask_precision"] == pytest.approx(d["masked"] / all_masked.masked)
    none = score_pairs(perfect, torch.zeros_like(gt.visible), gt, angles, GRID)[0].to_dict()
    assert none["coverage"] == 0.0 and none["precision"] is None and none["mask_precision"] is None


def test_report_table_formatting() -> None:
    totals = [BinCounts(pairs=2, masked=10, correct=9, visible=20, covered=10), BinCounts(), BinCounts(), BinCounts()]
    overall = BinCounts()
    for c in totals:
        overall.add(c)
    numbers = {
        "bins": [{"range_deg": [ANGLE_BINS[k], ANGLE_BINS[k + 1]], **c.to_dict(), "retained": 0.5 if k == 0 else None}
                 for k, c in enumerate(totals)],
        "overall": {**overall.to_dict(), "retained": 0.5},
    }
    report = {
        "backend": {"name": "depth"},
        "windows_evaluated": 1,
        "failed": [],
        "config": {"grid": [16, 16], "tau": 1.5, "visibility_tol": 0.03, "windows": 1},
        "policies": {"cycle": numbers, "both": numbers},
    }
    lines = format_table(report).splitlines()
    assert " grid=16x16 tau=1.5 " in lines[0]
    assert lines[2] == "mask policy: cycle" and lines[11] == "mask policy: both"
    assert lines[5].split() == ["0-30", "2", "10", "100.00", "90.00", "20", "50.00", "50.00"]
    assert lines[6].split()[-1] == "-"
    assert lines[-1].split()[0] == "all" and "mask prec %" in lines[3] and "kept %" in lines[3]


# ------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_eval_corr_cli_on_synthetic_scenes_depth_backend_scores_about_one(tmp_path, capsys) -> None:
    from cameo_corr.cli import main
    from cameo_corr.datasets.synthetic import generate_dataset

    root = generate_dataset(tmp_path / "synth", scenes=2, frames=8, image_size=96, seed=3, layout="co3d")
    out = tmp_path / "eval.json"
    code = main(
        ["eval-corr", "--dataset", "synthetic", "--root", str(root), "--backend", "depth", "--views", "3",
         "--windows", "2", "--grid", "16", "--crop-size", "128", "--out", str(out), "--device", "cpu"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "prec@1" in printed and "all" in printed
    assert [line for line in printed.splitlines() if line.startswith("mask policy:")] == [
        "mask policy: cycle", "mask policy: visibility", "mask policy: both"]
    report = json.loads(out.read_text())
    assert report["windows_evaluated"] == 2 and report["failed"] == []
    overall = report["overall"]
    assert overall["masked"] > 0 and overall["visible"] > 0
    # Ground-truth pointmaps: where the cycle mask is on and the point is visible, the match is right.
    assert overall["precision"] >= 0.95
    assert overall["coverage"] >= 0.8
    # The cycle mask alone also admits occluded / out-of-view queries at wide baselines (measured ~0.7).
    assert 0.5 <= overall["mask_precision"] < 1.0
    assert sum(b["pairs"] for b in report["bins"]) <= 2 * 3 * 2
    assert report["policies"]["cycle"] == {"bins": report["bins"], "overall": overall}
    assert report["backend"]["name"] == "depth" and report["config"]["grid"] == [16, 16]
    # The visibility test drops most occluded / out-of-view queries and keeps most correct ones.
    both = report["policies"]["both"]["overall"]
    assert both["mask_precision"] > overall["mask_precision"] and both["mask_precision"] >= 0.95
    assert both["retained"] >= 0.8 and overall["retained"] == 1.0
    assert both["masked"] <= overall["masked"]


def test_eval_corr_cli_input_errors_exit_2(tmp_path, capsys) -> None:
    from cameo_corr.cli import main
    from cameo_corr.datasets.synthetic import generate_dataset

    assert main(["eval-corr", "--dataset", "synthetic", "--root", str(tmp_path / "missing")]) == 2
    assert "missing: dataset root of 'synthetic' is not a directory" in capsys.readouterr().err
    generate_dataset(tmp_path / "synth", scenes=1, frames=3, image_size=16)
    assert main(["eval-corr", "--dataset", "synthetic", "--root", str(tmp_path / "synth"), "--backend", "depth",
                 "--points", "head"]) == 2
    assert "does not take --points" in capsys.readouterr().err
    (tmp_path / "re" / "test").mkdir(parents=True)
    assert main(["eval-corr", "--dataset", "re10k", "--root", str(tmp_path / "re")]) == 2  # a reader without depth
    assert "error: --dataset re10k: this dataset has no ground-truth depth" in capsys.readouterr().err
    assert main(["eval-corr", "--dataset", "synthetic", "--root", str(tmp_path / "synth"), "--backend", "depth",
                 "--visibility-tol", "0"]) == 2
    assert "cameo-corr eval-corr: error: --visibility-tol: must be positive, got 0.0" in capsys.readouterr().err
    for flags, message in [(["--span-per-view", "3", "1"], "--span-per-view: expected finite 0 <= lo <= hi"),
                           (["--fps", "0"], "--fps: must be positive"), (["--views", "1"], "--views: must be >= 2"),
                           (["--crop-size", "8", "--grid", "16"], "--crop-size: must be >= the token grid side (16"),
                           (["--dataset-option", "subset=3"], "[subset]: expected a string or null, got 3"),
                           (["--device", f"cuda:{torch.cuda.device_count()}"], "this machine cannot use it")]:
        assert main(["eval-corr", "--dataset", "synthetic", "--root", str(tmp_path / "synth"), *flags]) == 2, flags
        err = capsys.readouterr().err
        assert "cameo-corr eval-corr: error: " in err and message in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit) as exit_info:
        main(["eval-corr", "--dataset", "synthetic", "--root", str(tmp_path / "synth"), "--mask-policy", "occlusion"])
    assert exit_info.value.code == 2 and "invalid choice: 'occlusion'" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_corr_on_real_sevenscenes_depth(shared_data, tmp_path) -> None:
    from cameo_corr.datasets import open_dataset
    from cameo_corr.pipeline.backends.depth import DepthBackend
    from cameo_corr.pipeline.evaluate import EvalConfig, evaluate_backend

    reader = open_dataset("7scenes", shared_data / "sevenscenes_stairs", split="all")
    report = evaluate_backend(reader, DepthBackend(device="cpu"), EvalConfig(views=3, windows=2, grid=(16, 16), size=128))
    assert report["windows_evaluated"] == 2
    overall = report["overall"]
    # Real, holey, noisy depth: ground-truth depth still matches its own reprojection almost always.
    assert overall["masked"] > 0 and overall["precision"] >= 0.9
    assert overall["mask_precision"] >= 0.9 and overall["coverage"] >= 0.9
    assert report["bins"][0]["pairs"] == 2 * 3 * 2  # consecutive frames: all pairs in the 0-30 degree bin
    both = report["policies"]["both"]["overall"]
    assert both["mask_precision"] >= overall["mask_precision"] and both["retained"] >= 0.8


def test_a_matcher_that_cannot_run_on_the_backends_device_is_refused_before_any_window(tmp_path) -> None:
    """faiss without GPU support asked for CUDA tensors: one error up front, before the model runs on
    any window (it came after the first batch's forward)."""
    import faiss

    from cameo_corr.datasets import open_dataset
    from cameo_corr.datasets.synthetic import generate_dataset
    from cameo_corr.pipeline.backends.depth import DepthBackend
    from cameo_corr.pipeline.evaluate import EvalConfig, evaluate_backend
    from cameo_corr.schemas import SchemaError

    if faiss.get_num_gpus() > 0:
        pytest.skip("this faiss has GPU support")
    reader = open_dataset("synthetic", generate_dataset(tmp_path / "synth", scenes=1, frames=4, image_size=48, seed=0))
    backend = DepthBackend(device="cuda")  # builds without touching CUDA; the matcher is refused first
    with pytest.raises(SchemaError, match="the installed faiss has no GPU support"):
        evaluate_backend(reader, backend, EvalConfig(views=3, windows=1, grid=(8, 8), size=48, match_backend="faiss"))
