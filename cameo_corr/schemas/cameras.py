"""Camera conventions and conversions (SPEC section 1).

Internal convention everywhere: **OpenCV**, x right, y down, z forward; ``extrinsics`` is the 4x4
world-to-camera matrix (``x_cam = R X + t``) and ``intrinsics`` is 3x3 in pixels of the image it belongs
to, with pixel centres at integer + 0.5. Helpers convert RealEstate10K normalized intrinsics and
PyTorch3D NDC cameras (CO3D) to and from it, and validate cameras.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from cameo_corr.schemas.errors import SchemaError

CANONICAL_SIZE = 512
"""Side of the canonical square training view, in pixels."""


def intrinsics_from_normalized(fx: float, fy: float, cx: float, cy: float, width: int, height: int) -> np.ndarray:
    """Pixel intrinsics from RealEstate10K-style intrinsics normalized by image width/height."""
    return np.array(
        [[width * fx, 0.0, width * cx], [0.0, height * fy, height * cy], [0.0, 0.0, 1.0]], dtype=np.float64
    )


def intrinsics_to_normalized(K: np.ndarray, width: int, height: int) -> tuple[float, float, float, float]:
    """Inverse of :func:`intrinsics_from_normalized`: ``(fx, fy, cx, cy)`` divided by width/height."""
    K = np.asarray(K, dtype=np.float64)
    return K[0, 0] / width, K[1, 1] / height, K[0, 2] / width, K[1, 2] / height


def make_extrinsics(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """4x4 world-to-camera matrix from rotation ``R`` (3x3) and translation ``t`` (3,)."""
    E = np.eye(4, dtype=np.float64)
    E[:3, :3] = R
    E[:3, 3] = np.asarray(t, dtype=np.float64).reshape(3)
    return E


def invert_extrinsics(E: np.ndarray) -> np.ndarray:
    """Inverse of rigid 4x4 transforms (``[..., 4, 4]``), computed as ``[R^T, -R^T t]``."""
    E = np.asarray(E, dtype=np.float64)
    R = E[..., :3, :3]
    t = E[..., :3, 3:]
    Rt = np.swapaxes(R, -1, -2)
    out = np.zeros_like(E)
    out[..., :3, :3] = Rt
    out[..., :3, 3:] = -Rt @ t
    out[..., 3, 3] = 1.0
    return out


def camera_centers(E: np.ndarray) -> np.ndarray:
    """World positions of the cameras of world-to-camera matrices ``[..., 4, 4]`` -> ``[..., 3]``."""
    return invert_extrinsics(E)[..., :3, 3]


def project(points_world: np.ndarray, K: np.ndarray, E: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project world points ``[..., 3]`` with one camera.

    Returns ``(uv, z)``: ``uv[..., 2]`` in continuous pixel coordinates (the centre of pixel
    ``(col, row)`` is ``(col + 0.5, row + 0.5)``) and camera-frame depth ``z``.
    """
    X = np.asarray(points_world, dtype=np.float64)
    Xc = X @ E[:3, :3].T + E[:3, 3]
    z = Xc[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uvw = Xc @ np.asarray(K, dtype=np.float64).T
        uv = uvw[..., :2] / uvw[..., 2:3]
    return uv, z


def pixel_centers(height: int, width: int) -> np.ndarray:
    """``[H, W, 2]`` continuous ``(u, v)`` coordinates of pixel centres (``col + 0.5, row + 0.5``)."""
    u = np.arange(width, dtype=np.float64) + 0.5
    v = np.arange(height, dtype=np.float64) + 0.5
    uu, vv = np.meshgrid(u, v, indexing="xy")
    return np.stack([uu, vv], axis=-1)


def unproject_depth(depth: np.ndarray, K: np.ndarray, E: np.ndarray) -> np.ndarray:
    """World points ``[H, W, 3]`` of a z-depth map ``[H, W]`` seen by camera ``(K, E)``.

    Pixel ``(row, col)`` is the ray through ``(col + 0.5, row + 0.5)``. Invalid depth (0 or
    non-finite) yields non-finite or meaningless points; mask them with the depth validity.
    """
    depth = np.asarray(depth, dtype=np.float64)
    H, W = depth.shape
    uv = pixel_centers(H, W)
    Kinv = np.linalg.inv(np.asarray(K, dtype=np.float64))
    rays = np.concatenate([uv, np.ones((H, W, 1))], axis=-1) @ Kinv.T
    Xc = rays * depth[..., None]
    C2W = invert_extrinsics(E)
    return Xc @ C2W[:3, :3].T + C2W[:3, 3]


# PyTorch3D (row-vector, +X left, +Y up, NDC intrinsics) <-> OpenCV.
_P3D_FLIP = np.diag([-1.0, -1.0, 1.0])
CO3D_INTRINSICS_FORMATS = ("ndc_isotropic", "ndc_norm_image_bounds")


def pytorch3d_to_opencv(
    R: np.ndarray,
    T: np.ndarray,
    focal_length: Sequence[float],
    principal_point: Sequence[float],
    image_size_hw: Sequence[int],
    intrinsics_format: str = "ndc_isotropic",
) -> tuple[np.ndarray, np.ndarray]:
    """Convert a CO3D/PyTorch3D NDC camera to OpenCV ``(K, E)`` in pixels of an ``[H, W]`` image.

    PyTorch3D maps ``X_cam = X_world @ R + T`` with +X left and +Y up. With ``s = min(W, H) / 2``:
    ``fx = f0 s, fy = f1 s, cx = W/2 - p0 s, cy = H/2 - p1 s``; ``R_cv = diag(-1,-1,1) R^T`` and
    ``t_cv = (-T0, -T1, T2)``. ``ndc_norm_image_bounds`` (legacy CO3D v1) first multiplies focal
    length and principal point by ``image_size_wh / min(image_size_wh)``. Any other format is an error.
    """
    if intrinsics_format not in CO3D_INTRINSICS_FORMATS:
        raise SchemaError(
            "intrinsics_format", f"unknown value {intrinsics_format!r}; expected one of {CO3D_INTRINSICS_FORMATS}"
        )
    H, W = (float(v) for v in image_size_hw)
    f = np.asarray(focal_length, dtype=np.float64).reshape(2)
    p = np.asarray(principal_point, dtype=np.float64).reshape(2)
    if intrinsics_format == "ndc_norm_image_bounds":
        scale = np.array([W, H]) / min(W, H)
        f = f * scale
        p = p * scale
    s = min(W, H) / 2.0
    K = np.array([[f[0] * s, 0.0, W / 2 - p[0] * s], [0.0, f[1] * s, H / 2 - p[1] * s], [0.0, 0.0, 1.0]])
    R = np.asarray(R, dtype=np.float64).reshape(3, 3)
    T = np.asarray(T, dtype=np.float64).reshape(3)
    E = make_extrinsics(_P3D_FLIP @ R.T, T * np.array([-1.0, -1.0, 1.0]))
    return K, E


def opencv_to_pytorch3d(
    K: np.ndarray, E: np.ndarray, image_size_hw: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`pytorch3d_to_opencv` (``ndc_isotropic``): returns ``(R, T, focal, principal_point)``."""
    H, W = (float(v) for v in image_size_hw)
    s = min(W, H) / 2.0
    K = np.asarray(K, dtype=np.float64)
    E = np.asarray(E, dtype=np.float64)
    focal = np.array([K[0, 0] / s, K[1, 1] / s])
    pp = np.array([(W / 2 - K[0, 2]) / s, (H / 2 - K[1, 2]) / s])
    R = (_P3D_FLIP @ E[:3, :3]).T
    T = E[:3, 3] * np.array([-1.0, -1.0, 1.0])
    return R, T, focal, pp


def validate_camera(K: Any, E: Any, *, where: str, rot_tol: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Check pixel intrinsics ``K`` (3x3) and world-to-camera ``E`` (4x4); return them as float64.

    Raises :class:`SchemaError` naming ``intrinsics`` or ``extrinsics`` (and ``where``) when a value is
    not finite, has the wrong shape, has non-positive focal lengths, or ``R`` is not a rotation.
    """
    K = np.asarray(K, dtype=np.float64)
    E = np.asarray(E, dtype=np.float64)
    if K.shape != (3, 3):
        raise SchemaError("intrinsics", f"expected shape (3, 3), got {K.shape}", where=where)
    if E.shape != (4, 4):
        raise SchemaError("extrinsics", f"expected shape (4, 4), got {E.shape}", where=where)
    if not np.all(np.isfinite(K)):
        raise SchemaError("intrinsics", "contains non-finite values", where=where)
    if not np.all(np.isfinite(E)):
        raise SchemaError("extrinsics", "contains non-finite values", where=where)
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        raise SchemaError("intrinsics", f"focal lengths must be positive, got fx={K[0, 0]}, fy={K[1, 1]}", where=where)
    if not np.allclose(K[2], [0.0, 0.0, 1.0]) or K[1, 0] != 0 or K[2, 0] != 0:
        raise SchemaError("intrinsics", "last row must be [0, 0, 1] and K upper triangular", where=where)
    if not np.allclose(E[3], [0.0, 0.0, 0.0, 1.0]):
        raise SchemaError("extrinsics", "last row must be [0, 0, 0, 1]", where=where)
    R = E[:3, :3]
    if not np.allclose(R @ R.T, np.eye(3), atol=rot_tol) or abs(np.linalg.det(R) - 1.0) > rot_tol:
        raise SchemaError("extrinsics", "rotation block is not a proper rotation (R R^T != I or det != 1)", where=where)
    return K, E


def first_invalid_camera(K: Any, E: Any, *, rot_tol: float = 1e-3) -> tuple[int, SchemaError] | None:
    """Batch form of :func:`validate_camera` for ``K [N, 3, 3]`` and ``E [N, 4, 4]``: checks all
    cameras with a few vectorised operations and returns ``(index, error)`` of the first invalid one
    (the error :func:`validate_camera` raises for it), or ``None`` when all are valid."""
    K = np.asarray(K, dtype=np.float64)
    E = np.asarray(E, dtype=np.float64)
    n = len(K)
    if K.shape != (n, 3, 3) or E.shape != (n, 4, 4):
        raise SchemaError("intrinsics", f"expected [N, 3, 3] and [N, 4, 4], got {K.shape} and {E.shape}")
    R = E[:, :3, :3]

    def close(a: np.ndarray, b: Any, atol: float = 1e-8) -> np.ndarray:  # np.isclose's rule, without its overhead
        return np.abs(a - b) <= atol + 1e-5 * np.abs(b)

    with np.errstate(invalid="ignore", over="ignore"):
        ok = np.isfinite(K).all(axis=(1, 2)) & np.isfinite(E).all(axis=(1, 2))
        ok &= (K[:, 0, 0] > 0) & (K[:, 1, 1] > 0) & (K[:, 1, 0] == 0) & (K[:, 2, 0] == 0)
        ok &= close(K[:, 2], np.array([0.0, 0.0, 1.0])).all(axis=1) & close(E[:, 3], np.array([0.0, 0.0, 0.0, 1.0])).all(axis=1)
        ok &= close(R @ np.swapaxes(R, 1, 2), np.eye(3), atol=rot_tol).all(axis=(1, 2))
        ok &= np.abs(np.linalg.det(np.where(np.isfinite(R), R, 0.0)) - 1.0) <= rot_tol
    if ok.all():
        return None
    i = int(np.argmin(ok))
    try:
        validate_camera(K[i], E[i], where="")
    except SchemaError as e:
        return i, e
    raise AssertionError(f"camera {i} failed the batch check but passes validate_camera")  # pragma: no cover


__all__ = [
    "CANONICAL_SIZE",
    "intrinsics_from_normalized",
    "intrinsics_to_normalized",
    "make_extrinsics",
    "invert_extrinsics",
    "camera_centers",
    "project",
    "pixel_centers",
    "unproject_depth",
    "CO3D_INTRINSICS_FORMATS",
    "pytorch3d_to_opencv",
    "opencv_to_pytorch3d",
    "validate_camera",
    "first_invalid_camera",
]
