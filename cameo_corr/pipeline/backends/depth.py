"""The ``depth`` backend: ground-truth z-depth unprojected with the dataset cameras.

Works for every reader with depth (CO3D depth PNGs, synthetic scenes, 7-Scenes RGB-D). All frames
of a window are unprojected in one batched torch call on the backend's device.

Output frame (option ``frame``, recorded by :meth:`DepthBackend.describe`):

* ``"world"`` (default): the dataset's world frame and scale; output extrinsics are the dataset's.
* ``"first"``: the first view's camera frame (what VGGT predicts, up to scale): points are mapped by
  ``E_0`` and extrinsics become ``E_k E_0^{-1}`` (so view 0 has the identity).

Invalid pixels: depth 0 or non-finite and, with ``mask_background=True``, pixels outside the
window's foreground masks. Their points are set to 0 and ``valid`` is False; ``conf`` is 1.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from cameo_corr.pipeline.backends import GeometryBackend
from cameo_corr.pipeline.backends.geometry import unproject_depth
from cameo_corr.schemas import PointmapResult, SchemaError, WindowData, invert_extrinsics

FRAMES = ("world", "first")


class DepthBackend(GeometryBackend):
    """Ground-truth pointmaps from depth + cameras (see the module docstring for the options)."""

    name: ClassVar[str] = "depth"
    version: ClassVar[str] = "1"
    needs_depth: ClassVar[bool] = True

    def __init__(self, device: str | torch.device | None = None, *, frame: str = "world", mask_background: bool = False) -> None:
        super().__init__(device)
        if frame not in FRAMES:
            raise ValueError(f"depth backend: frame must be one of {FRAMES}, got {frame!r}")
        self.frame = frame
        self.mask_background = bool(mask_background)

    @property
    def needs_masks(self) -> bool:  # type: ignore[override]
        """The foreground masks are read when the background is masked out."""
        return self.mask_background

    def options(self) -> dict[str, Any]:
        return {"model_id": None, "dtype": "float32", "frame": self.frame, "mask_background": self.mask_background}

    def output_extrinsics(self, window: WindowData) -> np.ndarray:
        """World-to-camera ``[S, 4, 4]`` (float64) of the output frame for ``window``."""
        E = np.asarray(window.extrinsics, dtype=np.float64)
        if self.frame == "first":
            return E @ invert_extrinsics(E[0])
        return E

    def __call__(self, window: WindowData) -> PointmapResult:
        return self.run_batch([window])[0]

    def run_batch(self, windows: list[WindowData]) -> list[PointmapResult]:
        """Unproject every frame of all windows of equal image size in one batched call."""
        results: dict[int, PointmapResult] = {}
        groups: dict[tuple[int, int], list[int]] = {}
        for i, w in enumerate(windows):
            self.check_window(w)
            if self.mask_background and w.masks is None:
                raise SchemaError(
                    "masks", "mask_background=True needs foreground masks (dataset without masks?)", where=f"window {w.record.window_id}"
                )
            groups.setdefault(tuple(w.images.shape[1:3]), []).append(i)
        for idx in groups.values():
            for i, res in zip(idx, self._unproject_group([windows[i] for i in idx])):
                results[i] = res
        return [results[i] for i in range(len(windows))]

    def _unproject_group(self, windows: list[WindowData]) -> list[PointmapResult]:
        dev = self.device
        sizes = [w.record.num_views for w in windows]
        depth = torch.from_numpy(np.concatenate([np.asarray(w.depth, dtype=np.float32) for w in windows])).to(dev)
        K = torch.from_numpy(np.concatenate([np.asarray(w.intrinsics, dtype=np.float64) for w in windows])).to(dev, torch.float32)
        E = torch.from_numpy(np.concatenate([self.output_extrinsics(w) for w in windows])).to(dev, torch.float32)
        valid = torch.isfinite(depth) & (depth > 0)
        if self.mask_background:
            valid &= torch.from_numpy(np.concatenate([np.asarray(w.masks, dtype=bool) for w in windows])).to(dev)
        points = unproject_depth(torch.where(valid, depth, torch.zeros_like(depth)), K, E)
        points = torch.where(valid.unsqueeze(-1), points, torch.zeros_like(points))
        conf = torch.ones_like(depth)
        out = []
        for p, v, c, k, e in zip(
            points.split(sizes), valid.split(sizes), conf.split(sizes), K.split(sizes), E.split(sizes)
        ):
            out.append(PointmapResult(points=p, valid=v, conf=c, intrinsics=k, extrinsics=e))
        return out


__all__ = ["DepthBackend", "FRAMES"]
