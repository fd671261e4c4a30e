"""Batched torch camera geometry shared by the geometry backends (works on any device).

Conventions are the package's (OpenCV, world-to-camera extrinsics, pixel intrinsics whose pixel
centres sit at integer + 0.5). VGGT's own conventions (pose encoding, integer pixel centres) are
converted here so the backends never mix them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def invert_rigid(E: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid transforms ``[..., 4, 4]`` (or ``[..., 3, 4]``) as ``[..., 4, 4]``: ``[R^T, -R^T t]``."""
    R = E[..., :3, :3]
    t = E[..., :3, 3:]
    Rt = R.transpose(-1, -2)
    out = torch.zeros(E.shape[:-2] + (4, 4), dtype=E.dtype, device=E.device)
    out[..., :3, :3] = Rt
    out[..., :3, 3:] = -Rt @ t
    out[..., 3, 3] = 1.0
    return out


def pixel_rays(intrinsics: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Camera-frame rays ``[..., H, W, 3]`` with ``z = 1`` through the pixel centres ``(col + 0.5, row + 0.5)``.

    ``intrinsics`` is ``[..., 3, 3]`` in pixels of an ``height x width`` image (zero skew not required:
    the full inverse is used).
    """
    dtype, device = intrinsics.dtype, intrinsics.device
    u = torch.arange(width, dtype=dtype, device=device) + 0.5
    v = torch.arange(height, dtype=dtype, device=device) + 0.5
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    pix = torch.stack([uu, vv, torch.ones_like(uu)], dim=-1)  # [H, W, 3]
    Kinv = torch.linalg.inv(intrinsics)  # [..., 3, 3]
    return torch.einsum("...ij,hwj->...hwi", Kinv, pix)


def unproject_depth(depth: torch.Tensor, intrinsics: torch.Tensor, extrinsics: torch.Tensor) -> torch.Tensor:
    """World points ``[..., H, W, 3]`` of z-depth maps ``[..., H, W]`` seen by cameras ``(K, E)``.

    ``intrinsics`` ``[..., 3, 3]`` pixels; ``extrinsics`` ``[..., 4, 4]`` (or ``[..., 3, 4]``)
    world-to-camera. Matches :func:`cameo_corr.schemas.unproject_depth` (the numpy reference) and
    VGGT's ``unproject_depth_map_to_point_map`` once VGGT intrinsics are shifted to +0.5 centres.
    Values at invalid depth are whatever the arithmetic gives; callers mask them.
    """
    H, W = depth.shape[-2:]
    rays = pixel_rays(intrinsics, H, W)
    cam = rays * depth.unsqueeze(-1)
    c2w = invert_rigid(extrinsics)
    R = c2w[..., :3, :3]
    t = c2w[..., :3, 3]
    return torch.einsum("...ij,...hwj->...hwi", R, cam) + t[..., None, None, :]


def quat_xyzw_to_matrix(quat: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``[..., 3, 3]`` of (not necessarily unit) quaternions ``[..., 4]`` in ``(x, y, z, w)`` order.

    Same formula as VGGT's ``quat_to_mat`` (scalar last; the quaternion is normalised implicitly).
    """
    x, y, z, w = torch.unbind(quat, dim=-1)
    two_s = 2.0 / (quat * quat).sum(-1)
    m = torch.stack(
        (
            1 - two_s * (y * y + z * z),
            two_s * (x * y - z * w),
            two_s * (x * z + y * w),
            two_s * (x * y + z * w),
            1 - two_s * (x * x + z * z),
            two_s * (y * z - x * w),
            two_s * (x * z - y * w),
            two_s * (y * z + x * w),
            1 - two_s * (x * x + y * y),
        ),
        dim=-1,
    )
    return m.reshape(quat.shape[:-1] + (3, 3))


def decode_vggt_pose(pose_enc: torch.Tensor, image_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode VGGT's ``absT_quaR_FoV`` pose encoding ``[..., 9]`` into cameras of the *network input* image.

    ``pose_enc = [t (3), quaternion (x, y, z, w), fov_h, fov_w]`` (VGGT ``pose_encoding_to_extri_intri``).
    Returns ``(extrinsics [..., 4, 4] world-to-camera, intrinsics [..., 3, 3])``. The intrinsics follow
    this package's convention (pixel centres at +0.5): VGGT puts the principal point at ``(W/2, H/2)``
    with integer pixel centres, i.e. at ``(W/2 + 0.5, H/2 + 0.5)`` here.
    """
    H, W = image_hw
    t = pose_enc[..., :3]
    R = quat_xyzw_to_matrix(pose_enc[..., 3:7])
    E = torch.zeros(pose_enc.shape[:-1] + (4, 4), dtype=pose_enc.dtype, device=pose_enc.device)
    E[..., :3, :3] = R
    E[..., :3, 3] = t
    E[..., 3, 3] = 1.0
    fy = (H / 2.0) / torch.tan(pose_enc[..., 7] / 2.0)
    fx = (W / 2.0) / torch.tan(pose_enc[..., 8] / 2.0)
    K = torch.zeros(pose_enc.shape[:-1] + (3, 3), dtype=pose_enc.dtype, device=pose_enc.device)
    K[..., 0, 0] = fx
    K[..., 1, 1] = fy
    K[..., 0, 2] = W / 2.0 + 0.5
    K[..., 1, 2] = H / 2.0 + 0.5
    K[..., 2, 2] = 1.0
    return E, K


def rescale_intrinsics(K: torch.Tensor, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> torch.Tensor:
    """Intrinsics ``[..., 3, 3]`` of an ``src_hw`` image mapped to the same view resized to ``dst_hw``.

    Exact for the +0.5 pixel-centre convention: continuous coordinates scale with the image, so
    ``fx, cx`` scale by ``W_dst / W_src`` and ``fy, cy`` by ``H_dst / H_src``.
    """
    sy = dst_hw[0] / src_hw[0]
    sx = dst_hw[1] / src_hw[1]
    out = K.clone()
    out[..., 0, :] = K[..., 0, :] * sx
    out[..., 1, :] = K[..., 1, :] * sy
    return out


def cameras_ok(E: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """``[...]`` bool: cameras with finite extrinsics/intrinsics and positive focal lengths."""
    finite = torch.isfinite(E).flatten(-2).all(-1) & torch.isfinite(K).flatten(-2).all(-1)
    return finite & (K[..., 0, 0] > 0) & (K[..., 1, 1] > 0)


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``, i.e. pixel-centre aligned) of ``[N, C, H, W]`` maps."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def resize_valid(valid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a validity mask ``[N, H, W]`` so an output pixel is valid only if every input pixel with a
    non-zero bilinear weight is valid (invalid values never leak through :func:`resize_maps`)."""
    if tuple(valid.shape[-2:]) == tuple(size):
        return valid
    invalid = F.interpolate((~valid).unsqueeze(1).float(), size=size, mode="bilinear", align_corners=False)
    return invalid.squeeze(1) <= 0.0


__all__ = [
    "invert_rigid",
    "pixel_rays",
    "unproject_depth",
    "quat_xyzw_to_matrix",
    "decode_vggt_pose",
    "rescale_intrinsics",
    "cameras_ok",
    "resize_maps",
    "resize_valid",
]
