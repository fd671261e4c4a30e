"""Seeded depth holes like those of real RGB-D sensors, punched into exact depth maps.

Structured-light and time-of-flight depth (Kinect, 7-Scenes, ScanNet) misses two kinds of pixels: thin
bands along depth discontinuities, on the far side, where the background is seen by the camera but not
by the projector (or mixes with the foreground), and irregular blobs on dark, specular or distant
surfaces. :func:`punch_depth_holes` imitates both on a ``[S, H, W]`` z-depth stack, so that code judged
on real holey depth (the visibility mask of :mod:`cameo_corr.pipeline.masks`) can also be judged on
synthetic scenes, whose exact depth is the ground truth.

Per view, in this order:

1. pixels already invalid (``<= 0`` or not finite) stay invalid;
2. **edge bands**: a pixel whose depth exceeds the smallest valid depth within ``edge_width`` pixels
   (Chebyshev distance) by more than ``edge_jump`` (relative) becomes invalid: the far side of every
   discontinuity, ``edge_width`` pixels wide;
3. **blobs**: a smooth random field (white noise blurred by a Gaussian of standard deviation
   ``blob_sigma`` times the longer image side) picks the pixels where it is largest until the view has
   ``round(fraction * H * W)`` invalid pixels. If steps 1-2 already reach that count, no blob is added
   and the view keeps its larger share: the result has *at least* ``fraction`` invalid pixels per view.

Everything is drawn from ``numpy.random.default_rng(seed)`` in view order, so the same arguments give
the same holes on every machine.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["punch_depth_holes"]


def punch_depth_holes(
    depth: np.ndarray,
    fraction: float,
    *,
    seed: int,
    blob_sigma: float = 0.03,
    edge_width: int = 2,
    edge_jump: float = 0.05,
) -> np.ndarray:
    """A copy of ``depth`` ``[S, H, W]`` (z-depth, ``<= 0`` or non-finite = invalid) with holes set to 0
    (module docstring): edge bands of ``edge_width`` pixels behind relative jumps above ``edge_jump``
    (``edge_width=0`` disables them), then blobs of scale ``blob_sigma`` until each view has at least
    ``fraction`` of its pixels invalid. Float32 result; raises ``ValueError`` naming the bad argument.
    """
    from scipy import ndimage

    depth = np.asarray(depth)
    if depth.ndim != 3 or min(depth.shape) == 0:
        raise ValueError(f"depth: expected a non-empty [S, H, W] array, got shape {depth.shape}")
    if isinstance(fraction, bool) or not (isinstance(fraction, (int, float)) and 0.0 <= fraction < 1.0):
        raise ValueError(f"fraction: expected a number in [0, 1), got {fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    if not (isinstance(blob_sigma, (int, float)) and math.isfinite(blob_sigma) and blob_sigma > 0):
        raise ValueError(f"blob_sigma: expected a positive number, got {blob_sigma!r}")
    if isinstance(edge_width, bool) or not isinstance(edge_width, (int, np.integer)) or edge_width < 0:
        raise ValueError(f"edge_width: expected a non-negative integer (pixels), got {edge_width!r}")
    if not (isinstance(edge_jump, (int, float)) and math.isfinite(edge_jump) and edge_jump > 0):
        raise ValueError(f"edge_jump: expected a positive number, got {edge_jump!r}")
    out = np.where(np.isfinite(depth) & (depth > 0), depth, 0).astype(np.float32)
    rng = np.random.default_rng(seed)
    _, H, W = out.shape
    target = round(fraction * H * W)
    for view in out:
        holes = view <= 0
        if edge_width > 0:
            nearest = ndimage.minimum_filter(np.where(holes, np.inf, view), size=2 * edge_width + 1, mode="nearest")
            holes |= view > (1.0 + edge_jump) * nearest
        field = ndimage.gaussian_filter(rng.standard_normal((H, W)), blob_sigma * max(H, W), mode="wrap")
        missing = target - int(holes.sum())
        if missing > 0:
            candidates = np.flatnonzero(~holes)
            largest = np.argsort(-field.ravel()[candidates], kind="stable")[:missing]
            holes.ravel()[candidates[largest]] = True
        view[holes] = 0
    return out
