"""``cameo-corr eval-corr``: how good are a backend's token correspondences, judged by ground-truth depth.

For every window of a dataset with depth, the backend's pointmaps give token correspondences
``P`` (``nn``) and cycle masks ``M`` (:func:`cameo_corr.pipeline.match.correspond`). The ground truth
is *geometric*, never a nearest-neighbour search, so it is meaningful for every backend:

* the query token's 3D point is the ground-truth token pointmap (the ``depth`` backend's output
  tokenized exactly like the cache), in the dataset's world frame;
* it is projected into the other view with the ground-truth cameras. It is **visible** there when it
  lands inside the image in front of the camera and the ground-truth depth at that pixel agrees with
  its depth within ``occlusion_tol`` (relative); **not visible** when outside the image, behind the
  camera or occluded; **unknown** when the query token or the depth at the landing pixel is invalid
  (holes), and then it is left out of every count.

Per ordered pair ``(i, j)``, ``i != j``, binned by the angle between the two optical axes
(default bins 0-30, 30-60, 60-90, 90-120 degrees):

* ``precision`` (precision at 1 token) = masked visible queries whose ``nn`` token lies within
  ``radius`` tokens (Euclidean, token units) of the reprojected location, over masked visible queries;
* ``mask_precision`` = masked queries that are visible, over masked queries with a known ground
  truth (a masked query occluded or outside the key view is a wrong supervision target);
* ``coverage`` = visible queries that are masked, over visible queries;
* ``retained`` = the share of the cycle mask's correct entries (masked, visible and within the radius
  under the ``cycle`` policy) that the policy's mask also keeps (1 for ``cycle`` itself).

Each of the mask policies of :mod:`cameo_corr.pipeline.masks` (``--mask-policy``: ``cycle``, the
paper's cycle-consistency mask; ``visibility``, the depth-consistency test on the backend's own token
points and cameras; ``both``) is scored on the same correspondences. With the ``depth`` backend the
visibility test sees the ground-truth geometry at token resolution, so its score measures what the
token grid loses; with a predicted geometry (``vggt``) it also measures the prediction's errors.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from cameo_corr.schemas import (
    DEFAULT_GRID,
    DEFAULT_TAU,
    CameoCorrError,
    PointmapResult,
    SchemaError,
    TokenCorrespondences,
    WindowData,
    check_grids,
    grid_name,
)
from cameo_corr.pipeline.masks import DEFAULT_VISIBILITY_TOL, MASK_POLICIES

if TYPE_CHECKING:  # pragma: no cover - typing only; torch is imported lazily so the CLI parser stays light
    import torch

    from cameo_corr.datasets.planner import PlanConfig

ANGLE_BINS: tuple[float, ...] = (0.0, 30.0, 60.0, 90.0, 120.0)
"""Edges (degrees) of the view-angle bins: ``[0, 30), [30, 60), [60, 90), [90, 120]``."""


# --------------------------------------------------------------------------------- geometry
def optical_axis_angles(extrinsics: torch.Tensor) -> torch.Tensor:
    """``[S, S]`` angles in degrees between the optical axes of world-to-camera matrices ``[S, 4, 4]``."""
    import torch

    axes = extrinsics[:, 2, :3].double()  # third row of R = camera z axis in world coordinates
    axes = axes / axes.norm(dim=-1, keepdim=True)
    cos = (axes @ axes.T).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(cos))


@dataclass
class ReprojectionTargets:
    """Ground truth for every ordered pair of a window, ``[S, S, h*w]`` per query token.

    ``target`` ``[S, S, hw, 2]`` continuous ``(x, y)`` token coordinates of the query's 3D point in the
    key view; ``visible`` where it is seen there; ``known`` where the ground truth is defined (query
    token valid and, if it lands in the key image in front of the camera, valid depth there).
    """

    target: torch.Tensor
    visible: torch.Tensor
    known: torch.Tensor


def reprojection_targets(
    points: torch.Tensor,
    valid: torch.Tensor,
    depth: torch.Tensor,
    intrinsics: torch.Tensor,
    extrinsics: torch.Tensor,
    *,
    occlusion_tol: float = 0.05,
) -> ReprojectionTargets:
    """Project each view's ground-truth token points into every view (see the module docstring).

    ``points`` ``[S, h, w, 3]`` world token points and ``valid`` ``[S, h, w]``; ``depth`` ``[S, H, W]``
    ground-truth z-depth (0 = invalid); ``intrinsics`` ``[S, 3, 3]`` pixels of the ``H x W`` view;
    ``extrinsics`` ``[S, 4, 4]`` world-to-camera in the frame of ``points``.
    """
    import torch

    S, h, w, _ = points.shape
    H, W = depth.shape[-2:]
    X = points.reshape(S, h * w, 3).double()
    R = extrinsics[:, :3, :3].double()
    t = extrinsics[:, :3, 3].double()
    cam = torch.einsum("jab,ixb->ijxa", R, X) + t[None, :, None, :]  # [S_i, S_j, hw, 3]
    z = cam[..., 2]
    uvw = torch.einsum("jab,ijxb->ijxa", intrinsics.double(), cam)
    safe_z = torch.where(z > 0, uvw[..., 2], torch.ones_like(z))
    uv = uvw[..., :2] / safe_z.unsqueeze(-1)
    inside = (z > 0) & (uv[..., 0] >= 0) & (uv[..., 0] < W) & (uv[..., 1] >= 0) & (uv[..., 1] < H)
    col = uv[..., 0].floor().clamp(0, W - 1).long()
    row = uv[..., 1].floor().clamp(0, H - 1).long()
    view = torch.arange(S, device=depth.device)[None, :, None].expand_as(col)
    d = depth[view, row, col].double()
    d_ok = torch.isfinite(d) & (d > 0)
    agrees = (z - d).abs() <= occlusion_tol * d
    q_valid = valid.reshape(S, 1, h * w).expand(S, S, h * w)
    visible = q_valid & inside & d_ok & agrees
    known = q_valid & (~inside | d_ok)
    target = torch.stack([uv[..., 0] * (w / W) - 0.5, uv[..., 1] * (h / H) - 0.5], dim=-1)
    return ReprojectionTargets(target=target.float(), visible=visible, known=known)


# ---------------------------------------------------------------------------------- scoring
@dataclass
class BinCounts:
    """Counts accumulated over the ordered pairs of one view-angle bin.

    ``masked``: masked queries with a known ground truth; ``visible``: queries visible in the key
    view; ``covered``: masked and visible; ``correct``: covered and within the radius.
    """

    pairs: int = 0
    masked: int = 0
    correct: int = 0
    visible: int = 0
    covered: int = 0

    def add(self, other: "BinCounts") -> None:
        for name in ("pairs", "masked", "correct", "visible", "covered"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def to_dict(self) -> dict[str, Any]:
        """Counts plus ``precision``, ``mask_precision`` and ``coverage`` (``None`` for a zero denominator)."""
        return {
            "pairs": self.pairs,
            "masked": self.masked,
            "correct": self.correct,
            "visible": self.visible,
            "covered": self.covered,
            "precision": self.correct / self.covered if self.covered else None,
            "mask_precision": self.covered / self.masked if self.masked else None,
            "coverage": self.covered / self.visible if self.visible else None,
        }


def score_pairs(
    nn: torch.Tensor,
    mask: torch.Tensor,
    gt: ReprojectionTargets,
    angles: torch.Tensor,
    grid: tuple[int, int],
    *,
    radius: float = 1.0,
    bins: Sequence[float] = ANGLE_BINS,
) -> list[BinCounts]:
    """Per-bin counts of one window: ``nn``/``mask`` ``[S, S, hw]`` from the backend's correspondences,
    ``gt`` from :func:`reprojection_targets`, ``angles`` ``[S, S]`` degrees. Pairs outside the bins and
    the diagonal are skipped."""
    import torch

    S = nn.shape[0]
    h, w = grid
    pred = torch.stack([nn % w, torch.div(nn, w, rounding_mode="floor")], dim=-1).float()
    close = (pred - gt.target.to(pred.device)).norm(dim=-1) <= radius
    mask = mask.to(torch.bool)
    known, visible = gt.known.to(mask.device), gt.visible.to(mask.device)
    masked = mask & known
    correct = masked & visible & close.to(mask.device)
    covered = visible & mask
    edges = list(bins)
    out = [BinCounts() for _ in range(len(edges) - 1)]
    for i in range(S):
        for j in range(S):
            if i == j:
                continue
            b = angle_bin(float(angles[i, j]), edges)
            if b is None:
                continue
            out[b].add(
                BinCounts(
                    pairs=1,
                    masked=int(masked[i, j].sum()),
                    correct=int(correct[i, j].sum()),
                    visible=int(visible[i, j].sum()),
                    covered=int(covered[i, j].sum()),
                )
            )
    return out


def angle_bin(angle: float, edges: Sequence[float]) -> int | None:
    """Index of the bin ``[edges[k], edges[k+1])`` holding ``angle`` (the last bin is closed), else ``None``."""
    for k in range(len(edges) - 1):
        last = k == len(edges) - 2
        if edges[k] <= angle < edges[k + 1] or (last and angle == edges[k + 1]):
            return k
    return None


def score_window(
    window: WindowData,
    gt: PointmapResult,
    corr: TokenCorrespondences,
    grid: tuple[int, int],
    *,
    masks: dict[str, torch.Tensor] | None = None,
    radius: float = 1.0,
    occlusion_tol: float = 0.05,
    bins: Sequence[float] = ANGLE_BINS,
) -> dict[str, list[BinCounts]]:
    """Score a backend's correspondences ``corr`` of ``window`` against ground truth ``gt`` (the
    ``depth`` backend's world-frame output for the same window), once per mask of ``masks``
    (``{name: [S, S, hw] bool}``; default ``{"cycle": corr.mask}``). Returns ``{name: per-bin counts}``."""
    import numpy as np
    import torch

    from cameo_corr.pipeline.match import tokenize

    gt_pts, gt_valid, _ = tokenize(gt.points, gt.valid, gt.conf, grid)
    depth = torch.from_numpy(np.asarray(window.depth, dtype=np.float32)).to(gt.points.device)
    targets = reprojection_targets(gt_pts, gt_valid, depth, gt.intrinsics, gt.extrinsics, occlusion_tol=occlusion_tol)
    angles = optical_axis_angles(gt.extrinsics)
    masks = {"cycle": corr.mask} if masks is None else masks
    return {name: score_pairs(corr.nn, m, targets, angles, grid, radius=radius, bins=bins) for name, m in masks.items()}


def policy_masks(
    window: WindowData, result: PointmapResult, corr: TokenCorrespondences, policies: Sequence[str], visibility_tol: float
) -> dict[str, torch.Tensor]:
    """``{policy: [S, S, hw] bool}`` for one window: always ``cycle`` (the matcher's mask), and
    ``visibility`` and ``both`` when any policy other than ``cycle`` is asked for. The visibility test
    runs on the backend's own token points and cameras (its own frame), on the canonical view of
    ``window``."""
    import torch

    from cameo_corr.pipeline.masks import visibility_mask

    out: dict[str, torch.Tensor] = {"cycle": corr.mask.to(torch.bool)}
    if any(p != "cycle" for p in policies):
        vis = visibility_mask(
            corr.points, corr.valid, result.intrinsics, result.extrinsics, tuple(window.images.shape[1:3]), tol=visibility_tol
        ).to(out["cycle"].device)
        out["visibility"] = vis
        out["both"] = vis & out["cycle"]
    return out


# ------------------------------------------------------------------------------- evaluation
@dataclass
class EvalConfig:
    """Settings of one evaluation run (recorded in the JSON report)."""

    views: int = 4
    windows: int = 8
    windows_per_scene: int = 1
    grid: tuple[int, int] = (DEFAULT_GRID, DEFAULT_GRID)
    extra_grids: tuple[tuple[int, int], ...] = ()
    """More grids scored on the same backend outputs (one backend pass per window); reported under ``grids``."""
    tau: float = DEFAULT_TAU
    match_backend: str = "auto"
    radius: float = 1.0
    occlusion_tol: float = 0.05
    bins: tuple[float, ...] = ANGLE_BINS
    seed: int = 0
    size: int = 512
    policy: str | None = None
    batch_size: int = 1
    mask_policies: tuple[str, ...] = MASK_POLICIES
    visibility_tol: float = DEFAULT_VISIBILITY_TOL
    sampling: str | None = None
    """Window sampling policy (``None``: the dataset's default, as ``preprocess`` plans it)."""
    span_per_view: tuple[float, float] | None = None
    """``stride`` sampling: a window spans ``[S*lo, S*hi]`` raw frames (``None``: the default)."""
    positions: str | None = None
    """``stride`` sampling: frame positions, ``ordinal`` or ``timestamp_us`` (``None``: the dataset's default)."""
    fps: float | None = None
    """Raw video frame rate for ``timestamp_us`` positions (``None``: the default)."""

    def validate(self) -> None:
        """Raise :class:`~cameo_corr.schemas.SchemaError` (a ``ValueError``) whose ``field`` names the
        setting that is out of range (:data:`EVAL_FLAGS` maps it to its command-line flag)."""
        from cameo_corr.datasets.planner import PlanConfig

        checks = [
            ("views", self.views >= 2, f"must be >= 2, got {self.views}"),
            ("windows", self.windows >= 1, f"must be >= 1, got {self.windows}"),
            ("windows_per_scene", self.windows_per_scene >= 1, f"must be >= 1, got {self.windows_per_scene}"),
            ("batch_size", self.batch_size >= 1, f"must be >= 1, got {self.batch_size}"),
            ("tau", math.isfinite(self.tau) and self.tau >= 0, f"must be a finite number >= 0 (tokens), got {self.tau}"),
            ("radius", self.radius > 0 and math.isfinite(self.radius), f"must be positive, got {self.radius}"),
            ("occlusion_tol", self.occlusion_tol > 0 and math.isfinite(self.occlusion_tol), f"must be positive, got {self.occlusion_tol}"),
            ("bins", len(self.bins) >= 2 and all(b1 > b0 for b0, b1 in zip(self.bins, self.bins[1:])),
             f"must be increasing edges, got {self.bins}"),
            ("mask_policies", bool(self.mask_policies) and all(p in MASK_POLICIES for p in self.mask_policies),
             f"must be one or more of {MASK_POLICIES}, got {self.mask_policies}"),
            ("visibility_tol", self.visibility_tol > 0 and math.isfinite(self.visibility_tol),
             f"must be positive, got {self.visibility_tol}"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise SchemaError(name, message)
        try:
            check_grids([tuple(self.grid), *self.extra_grids])
        except SchemaError as e:
            raise SchemaError("grid", e.message) from None
        side = max(max(g) for g in (self.grid, *self.extra_grids))
        if self.size < side:
            raise SchemaError("size", f"must be >= the token grid side ({side}: every token needs at least one pixel), got {self.size}")
        try:
            PlanConfig(**self._plan_overrides())
        except SchemaError as e:
            raise SchemaError({"policy": "sampling"}.get(e.field, e.field), e.message) from None

    def _plan_overrides(self) -> dict[str, Any]:
        """The sampling settings given (``None``: the dataset's default), as ``PlanConfig`` fields."""
        given = {"views": self.views, "windows_per_scene": self.windows_per_scene, "policy": self.sampling,
                 "span_per_view": self.span_per_view, "positions": self.positions, "fps": self.fps, "seed": self.seed}
        return {k: v for k, v in given.items() if v is not None}

    def plan_config(self, dataset: str) -> "PlanConfig":
        """How windows of ``dataset`` (a reader name) are drawn: its default sampling with these settings."""
        from cameo_corr.datasets.planner import default_plan_config

        return default_plan_config(dataset, **self._plan_overrides())


EVAL_FLAGS: dict[str, str] = {
    "size": "--crop-size", "policy": "--crop-policy", "mask_policies": "--mask-policy", "extra_grids": "--grid", "bins": "bins",
}
"""Command-line flags of the :class:`EvalConfig` settings whose flag is not ``--`` + the name with dashes."""


def eval_flag(field: str) -> str:
    """The ``eval-corr`` flag of :class:`EvalConfig` setting ``field``."""
    return EVAL_FLAGS.get(field, "--" + field.replace("_", "-"))


def evaluate_backend(reader: Any, backend: Any, config: EvalConfig, *, progress: bool = False) -> dict[str, Any]:
    """Evaluate ``backend`` (a :class:`~cameo_corr.pipeline.backends.GeometryBackend`) on the first
    ``config.windows`` planned windows of ``reader`` (a reader with depth). Returns the JSON report:
    ``bins`` and ``overall`` score the cycle mask (what a cache stores), ``policies`` maps each of
    ``config.mask_policies`` to its own ``bins`` and ``overall``; all on ``config.grid``. With
    ``config.extra_grids``, ``grids`` maps every grid (``"16x16"``) to its own ``bins``, ``overall`` and
    ``policies``, scored on the same backend outputs (the windows are planned as for ``config.grid`` alone).

    Windows are planned with the dataset's default sampling (:mod:`cameo_corr.datasets.planner`); a
    window whose loading or processing raises a :class:`~cameo_corr.schemas.CameoCorrError` is listed
    under ``failed`` and the run goes on.
    """
    from tqdm import tqdm

    from cameo_corr.datasets.canonical import CanonicalView, load_window
    from cameo_corr.pipeline.backends.depth import DepthBackend
    from cameo_corr.pipeline.match import correspond, resolve_backend
    from cameo_corr.datasets.planner import plan_windows

    config.validate()
    resolve_backend(config.match_backend, backend.device)  # before any window (faiss without GPU support on CUDA)
    view = CanonicalView(size=config.size, policy=config.policy or reader.preferred_crop_policy())
    plan = config.plan_config(reader.name)
    fingerprint = {"eval_corr": backend.describe(), "grid": list(config.grid), "tau": config.tau, "crop": view.to_dict()}
    planned = plan_windows(reader, plan, fingerprint)
    failed_plan = [{"window_id": p.record.window_id, "scene_id": p.record.scene_id, "error": p.error, "planning": True}
                   for p in planned if p.error]
    failed: list[dict[str, Any]] = list(failed_plan)
    todo = [p.record for p in planned if not p.error][: config.windows]
    truth = DepthBackend(device=backend.device, frame="world")
    # ``both`` is counted whenever the visibility test runs: ``visibility & cycle == both`` gives every
    # policy's share of the cycle mask's correct entries.
    counted = ["cycle", *config.mask_policies] + (["both"] if "visibility" in config.mask_policies else [])
    grids = [tuple(config.grid), *(tuple(g) for g in config.extra_grids)]
    totals_of = {g: {name: [BinCounts() for _ in range(len(config.bins) - 1)] for name in dict.fromkeys(counted)} for g in grids}
    totals = totals_of[grids[0]]
    evaluated = 0
    batches = [todo[k : k + config.batch_size] for k in range(0, len(todo), config.batch_size)]
    for batch in tqdm(batches, desc="eval-corr", unit="batch", disable=not progress):
        loaded: list[WindowData] = []
        for record in batch:
            try:
                loaded.append(load_window(reader, record, view, with_depth=True))
            except CameoCorrError as e:
                failed.append({"window_id": record.window_id, "scene_id": record.scene_id, "error": f"{type(e).__name__}: {e}"})
        if not loaded:
            continue
        try:
            results = backend.run_batch(loaded)
        except CameoCorrError as e:
            failed.extend(
                {"window_id": w.record.window_id, "scene_id": w.record.scene_id, "error": f"{type(e).__name__}: {e}"} for w in loaded
            )
            continue
        for window, result, gt in zip(loaded, results, truth.run_batch(loaded)):
            for grid in grids:
                corr = correspond(result, grid=grid, tau=config.tau, backend=config.match_backend)
                masks = policy_masks(window, result, corr, config.mask_policies, config.visibility_tol)
                counts = score_window(
                    window, gt, corr, grid, masks={k: masks[k] for k in totals},
                    radius=config.radius, occlusion_tol=config.occlusion_tol, bins=config.bins,
                )
                for name, per_bin in counts.items():
                    for total, c in zip(totals_of[grid][name], per_bin):
                        total.add(c)
            evaluated += 1
    return {
        "dataset": reader.describe(),
        "backend": backend.describe(),
        "config": {
            "views": config.views,
            "windows": config.windows,
            "windows_per_scene": config.windows_per_scene,
            "grid": list(config.grid),
            **({"extra_grids": [list(g) for g in config.extra_grids]} if config.extra_grids else {}),
            "tau": config.tau,
            "match_backend": config.match_backend,
            "radius": config.radius,
            "occlusion_tol": config.occlusion_tol,
            "seed": config.seed,
            "crop": view.to_dict(),
            "mask_policies": list(config.mask_policies),
            "visibility_tol": config.visibility_tol,
            "plan": plan.to_dict(),
        },
        "windows_planned": len(planned) - len(failed_plan),
        "scenes_planned": len({p.record.scene_id for p in planned if not p.error}),
        "windows_evaluated": evaluated,
        "failed": failed,
        **_policy_report(totals, "cycle", config.bins),
        "policies": {p: _policy_report(totals, p, config.bins) for p in config.mask_policies},
        **({"grids": {
            grid_name(g): {**_policy_report(t, "cycle", config.bins),
                           "policies": {p: _policy_report(t, p, config.bins) for p in config.mask_policies}}
            for g, t in totals_of.items()
        }} if config.extra_grids else {}),
    }


def _policy_report(totals: dict[str, list[BinCounts]], policy: str, bins: Sequence[float]) -> dict[str, Any]:
    """Per-bin and overall numbers of one policy, with the share of the cycle mask's correct entries
    it keeps (``retained``: correct entries of ``policy & cycle``, which is ``both`` for every policy
    but ``cycle``, over those of ``cycle``)."""
    kept_by = totals["cycle" if policy == "cycle" else "both"]

    def entry(c: BinCounts, kept: BinCounts, cycle: BinCounts) -> dict[str, Any]:
        return {**c.to_dict(), "retained": kept.correct / cycle.correct if cycle.correct else None}

    overall = {name: BinCounts() for name in ("policy", "kept", "cycle")}
    rows = []
    for k, (c, kept, cyc) in enumerate(zip(totals[policy], kept_by, totals["cycle"])):
        for name, value in (("policy", c), ("kept", kept), ("cycle", cyc)):
            overall[name].add(value)
        rows.append({"range_deg": [bins[k], bins[k + 1]], **entry(c, kept, cyc)})
    return {"bins": rows, "overall": entry(overall["policy"], overall["kept"], overall["cycle"])}


def format_table(report: dict[str, Any]) -> str:
    """The report's per-bin numbers as fixed-width text, one table per mask policy."""

    def pct(v: float | None) -> str:
        return "     -" if v is None else f"{100 * v:6.2f}"

    cfg = report["config"]
    header = (
        f"{'angle (deg)':>12} {'pairs':>6} {'masked':>8} {'mask prec %':>12} {'prec@1 %':>9} {'visible':>8} "
        f"{'cover %':>8} {'kept %':>7}"
    )
    lines = [
        f"eval-corr: backend={report['backend']['name']} windows={report['windows_evaluated']} "
        f"(of {cfg['windows']} requested) "
        f"failed={len(report['failed'])} grid={', '.join(report['grids']) if 'grids' in report else grid_name(cfg['grid'])} "
        f"tau={cfg['tau']} visibility_tol={cfg['visibility_tol']}"
    ]
    per_grid = report.get("grids") or {grid_name(cfg["grid"]): report}
    tables = [(f"grid {g}, mask policy: {policy}" if "grids" in report else f"mask policy: {policy}", numbers)
              for g, r in per_grid.items() for policy, numbers in r["policies"].items()]
    for title, numbers in tables:
        lines += ["", title, header, "-" * len(header)]
        rows = [(f"{b['range_deg'][0]:g}-{b['range_deg'][1]:g}", b) for b in numbers["bins"]] + [("all", numbers["overall"])]
        for label, b in rows:
            lines.append(
                f"{label:>12} {b['pairs']:>6} {b['masked']:>8} {pct(b['mask_precision']):>12} {pct(b['precision']):>9} "
                f"{b['visible']:>8} {pct(b['coverage']):>8} {pct(b['retained']):>7}"
            )
    return "\n".join(lines)


# ------------------------------------------------------------------------------ command line
def register_cli(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``eval-corr`` command."""
    from cameo_corr.cli.args import add_dataset_option, add_sampling_arguments, grids_arg
    from cameo_corr.datasets.base import DATASET_NAMES
    from cameo_corr.datasets.planner import POSITION_UNITS, SAMPLING_POLICIES
    from cameo_corr.pipeline.backends import add_backend_arguments

    depth = depth_dataset_names()
    p = subparsers.add_parser(
        "eval-corr",
        help="precision/coverage of a backend's token correspondences against ground-truth depth",
        description="Judge a geometry backend's token correspondences (nn) and cycle masks against ground truth "
        "from a dataset with depth and cameras: per view pair, binned by the angle between the optical axes, "
        "precision at 1 token, mask precision and coverage. Datasets without depth cannot be evaluated. Windows are "
        "planned as `preprocess` plans them (the same dataset and sampling options). When the dataset yields fewer "
        "windows than --windows, the ones it has are evaluated and the shortfall is explained.",
    )
    p.add_argument("--dataset", required=True, choices=DATASET_NAMES, metavar="DATASET",
                   help=f"a dataset with depth: {', '.join(depth)}")
    p.add_argument("--root", required=True, type=Path, help="dataset root")
    p.add_argument("--split", default=None, help="dataset split (reader default when omitted)")
    add_dataset_option(p)
    p.add_argument("--views", type=int, default=4, help="views per window (default 4)")
    p.add_argument("--windows", type=int, default=8, help="windows to evaluate (default 8)")
    add_sampling_arguments(p, policies=SAMPLING_POLICIES, positions=POSITION_UNITS)
    p.add_argument("--grid", type=grids_arg, default=((DEFAULT_GRID, DEFAULT_GRID),), metavar="SIDES",
                   help=f"token grid side, or several comma-separated (16,32,64) scored on the same backend outputs "
                        f"(default {DEFAULT_GRID})")
    p.add_argument("--tau", type=float, default=DEFAULT_TAU, help=f"cycle threshold in tokens (default {DEFAULT_TAU})")
    p.add_argument("--match-backend", default="auto", choices=("auto", "torch", "faiss", "kdtree"), help="exact NN method (default: auto)")
    p.add_argument("--radius", type=float, default=1.0, help="a match is correct within this many tokens (default 1)")
    p.add_argument("--occlusion-tol", type=float, default=0.05, help="relative depth tolerance of the ground truth's visibility")
    p.add_argument("--mask-policy", nargs="+", choices=MASK_POLICIES, default=list(MASK_POLICIES), metavar="POLICY",
                   help=f"mask policies to score, one or more of {', '.join(MASK_POLICIES)} (default: all)")
    p.add_argument("--visibility-tol", type=float, default=DEFAULT_VISIBILITY_TOL,
                   help=f"relative depth tolerance of the visibility mask (default {DEFAULT_VISIBILITY_TOL})")
    p.add_argument("--crop-size", type=int, default=512, help="canonical view side in pixels (default 512)")
    p.add_argument("--crop-policy", choices=("center", "principal_point", "mask_bbox"), default=None,
                   help="canonical crop (default: the reader's)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per backend call (default 1)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    add_backend_arguments(p)
    p.set_defaults(func=_run_cli)


def depth_dataset_names() -> tuple[str, ...]:
    """Registered datasets whose reader stores ground-truth depth (the ones ``eval-corr`` can judge against)."""
    from cameo_corr.datasets.base import DATASET_NAMES, reader_class

    return tuple(n for n in DATASET_NAMES if reader_class(n).stores_depth())


def shortfall_reasons(report: dict[str, Any], requested: int, reader: Any) -> list[str]:
    """Why a run evaluated fewer than ``requested`` windows, and the options that would give more
    (``[]`` when it evaluated them all). When the dataset planned too few windows, ``reader`` is planned
    again (frame ids only, no pixel) with more windows per scene, then also with a shorter stride span,
    random sampling or one view fewer, and the first of these that gives more windows is named. (A
    stride window's span is clamped to its scene, so on short scenes every draw gives the same frames
    and more windows per scene alone add nothing.)"""
    import dataclasses

    from cameo_corr.datasets.planner import PlanConfig, plan_table

    plan, views = PlanConfig(**report["config"]["plan"]), report["config"]["views"]
    K, planned, scenes = plan.windows_per_scene, report["windows_planned"], report["scenes_planned"]
    reasons: list[str] = []
    failed_plan = sum(1 for f in report["failed"] if f.get("planning"))
    if planned < requested:
        what = f"the dataset yields only {planned} window(s) from {scenes} scene(s) with --views {views} --windows-per-scene {K}"
        k = max(K + 1, math.ceil(requested / max(scenes, 1)))
        candidates = [(f"--windows-per-scene {k}", {"windows_per_scene": k})]
        if plan.policy == "stride":
            candidates += [(f"--windows-per-scene {k} --span-per-view 1 2", {"windows_per_scene": k, "span_per_view": (1.0, 2.0)}),
                           (f"--windows-per-scene {k} --sampling random", {"windows_per_scene": k, "policy": "random"})]
        if views > 2:
            candidates.append((f"--views {views - 1} --windows-per-scene {k}", {"windows_per_scene": k, "views": views - 1}))
        hint = "no scene gives a window: see the planning errors above (a scene needs at least --views frames)"
        if scenes:
            hint = ("neither more windows per scene nor, with them, a shorter --span-per-view, --sampling random or one view "
                    "fewer gives more distinct windows of these scenes; add scenes")
            for flags, overrides in candidates:
                probe = plan_table(reader, dataclasses.replace(plan, **overrides), {})
                more = probe.column("error").null_count
                if more > planned:
                    hint = f"{flags} gives {more}"
                    if overrides.keys() != {"windows_per_scene"} and plan.policy == "stride":
                        lo, hi = plan.span_per_view
                        hint += (f"; a stride window spans {views}x{lo:g} to {views}x{hi:g} raw frames, clamped to the scene, "
                                 "so on these short scenes more draws give the same frames")
                    break
        reasons.append(f"{what} ({hint})")
    if failed_plan:
        reasons.append(f"{failed_plan} scene(s) could not be planned (listed above)")
    if len(report["failed"]) > failed_plan:
        reasons.append(f"{len(report['failed']) - failed_plan} window(s) failed (listed above)")
    return reasons


def _run_cli(args: argparse.Namespace) -> int:
    from cameo_corr.cli.errors import UsageError
    from cameo_corr.datasets import open_dataset
    from cameo_corr.pipeline.backends import backend_options_from_args, make_backend, resolve_device, unusable_cuda

    depth = depth_dataset_names()
    if args.dataset not in depth:
        raise UsageError(f"--dataset {args.dataset}: this dataset has no ground-truth depth, which eval-corr scores "
                         f"against; use one with depth: {', '.join(depth)}")
    reader_options = dict(args.dataset_option)
    if args.split is not None:
        reader_options["split"] = args.split
    config = EvalConfig(
        views=args.views,
        windows=args.windows,
        windows_per_scene=args.windows_per_scene,
        grid=args.grid[0],
        extra_grids=tuple(args.grid[1:]),
        tau=args.tau,
        match_backend=args.match_backend,
        radius=args.radius,
        occlusion_tol=args.occlusion_tol,
        seed=args.seed,
        size=args.crop_size,
        policy=args.crop_policy,
        batch_size=args.batch_size,
        mask_policies=tuple(dict.fromkeys(args.mask_policy)),
        visibility_tol=args.visibility_tol,
        sampling=args.sampling,
        span_per_view=None if args.span_per_view is None else tuple(args.span_per_view),
        positions=args.positions,
        fps=args.fps,
    )
    try:
        config.validate()
    except SchemaError as e:
        raise UsageError(f"{eval_flag(e.field)}: {e.message}") from None
    try:
        options = backend_options_from_args(args)
        device = resolve_device(options.get("device"))
        why = unusable_cuda(device)
        if why is not None:  # before the backend or any tensor touches it (a traceback from deep in torch)
            raise UsageError(f"--device {device}: this machine cannot use it ({why}); use --device cpu")
        reader = open_dataset(args.dataset, args.root, **reader_options)
        backend = make_backend(args.backend, **options)
    except (ImportError, ValueError) as e:  # SchemaError and DatasetError are ValueErrors
        raise UsageError(str(e)) from e
    report = evaluate_backend(reader, backend, config, progress=sys.stderr.isatty())
    print(format_table(report))
    for f in report["failed"]:
        print(f"failed window {f['window_id']} (scene {f['scene_id']}): {f['error']}", file=sys.stderr)
    if report["windows_evaluated"] < args.windows:
        print(f"cameo-corr eval-corr: note: evaluated {report['windows_evaluated']} of the {args.windows} requested "
              f"windows: {'; '.join(shortfall_reasons(report, args.windows, reader))}", file=sys.stderr)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, sort_keys=True))
        print(f"wrote {args.out}")
    return 0 if report["windows_evaluated"] > 0 else 1


__all__ = [
    "ANGLE_BINS",
    "optical_axis_angles",
    "ReprojectionTargets",
    "reprojection_targets",
    "BinCounts",
    "score_pairs",
    "angle_bin",
    "score_window",
    "policy_masks",
    "EvalConfig",
    "EVAL_FLAGS",
    "eval_flag",
    "evaluate_backend",
    "shortfall_reasons",
    "format_table",
    "depth_dataset_names",
    "register_cli",
]
