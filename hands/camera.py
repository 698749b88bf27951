"""Pinhole projection, boxes and affine crops.

Conventions: points in camera space are (..., N, 3) metres with +z in front of the camera; image points
are (..., N, 2) pixels (x right, y down, pixel centres at integer coordinates); boxes are (..., 4)
``x0, y0, x1, y1`` pixels; affine transforms are (..., 2, 3) matrices mapping *source* pixels to
*target* pixels (``p' = A[:, :2] p + A[:, 2]``). Warping uses kornia.
"""
from __future__ import annotations

import math

import torch
from kornia.geometry.transform import warp_affine
from torch import Tensor

__all__ = [
    "inside_image",
    "make_intrinsics",
    "project",
    "bbox_from_points",
    "scale_bbox",
    "square_bbox",
    "bbox_crop_affine",
    "apply_affine",
    "affine_to_3x3",
    "invert_affine",
    "inverse_3x3",
    "crop_image",
    "transform_intrinsics",
]


def make_intrinsics(focal, princpt, dtype=torch.float32, device=None) -> Tensor:
    """focal (fx, fy) and princpt (cx, cy) in pixels -> K (3, 3)."""
    fx, fy = (float(focal[0]), float(focal[1])) if hasattr(focal, "__len__") else (float(focal),) * 2
    cx, cy = float(princpt[0]), float(princpt[1])
    return torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=dtype, device=device)


def project(points_cam: Tensor, K: Tensor, eps: float = 1e-6) -> Tensor:
    """points_cam: (..., N, 3) camera space, metres; K: (..., 3, 3) -> (..., N, 2) pixels.

    Depths are clamped to ``eps`` so points behind the camera do not divide by zero.
    """
    uvw = points_cam @ K.transpose(-1, -2)  # (..., N, 3)
    return uvw[..., :2] / uvw[..., 2:3].clamp(min=eps)


def inside_image(points: Tensor, image_size: tuple[int, int]) -> Tensor:
    """points (..., 2) px -> (...) bool: inside the H x W image. Pixel centres are at integers, so the image
    spans [-0.5, W - 0.5) x [-0.5, H - 0.5) (InterWild's ``0 <= x < W`` in its pixel-corner convention)."""
    height, width = image_size
    x, y = points[..., 0], points[..., 1]
    return (x >= -0.5) & (x < width - 0.5) & (y >= -0.5) & (y < height - 0.5)


def bbox_from_points(points: Tensor, valid: Tensor | None = None) -> Tensor:
    """points: (..., N, 2) pixels; valid: (..., N) bool -> (..., 4) tight box x0, y0, x1, y1.

    Rows with no valid point give a zero box.
    """
    if valid is None:
        valid = torch.ones(points.shape[:-1], dtype=torch.bool, device=points.device)
    big = torch.finfo(points.dtype).max
    mask = valid.unsqueeze(-1)
    lo = torch.where(mask, points, big).amin(-2)  # a Python fill: no host-to-device copy
    hi = torch.where(mask, points, -big).amax(-2)
    box = torch.cat([lo, hi], -1)
    return torch.where(valid.any(-1, keepdim=True), box, torch.zeros_like(box))


def scale_bbox(bbox: Tensor, factor: float) -> Tensor:
    """Grow (factor > 1) or shrink a box about its centre. bbox: (..., 4) -> (..., 4)."""
    centre = (bbox[..., :2] + bbox[..., 2:]) / 2
    half = (bbox[..., 2:] - bbox[..., :2]) / 2 * factor
    return torch.cat([centre - half, centre + half], -1)


def square_bbox(bbox: Tensor, aspect: float = 1.0) -> Tensor:
    """Extend the shorter side so that width / height == aspect, keeping the centre. (..., 4) -> (..., 4)."""
    centre = (bbox[..., :2] + bbox[..., 2:]) / 2
    w = bbox[..., 2] - bbox[..., 0]
    h = bbox[..., 3] - bbox[..., 1]
    w_new = torch.maximum(w, h * aspect)
    h_new = torch.maximum(h, w / aspect)
    half = torch.stack([w_new, h_new], -1) / 2
    return torch.cat([centre - half, centre + half], -1)


def bbox_crop_affine(
    bbox: Tensor,
    out_size: tuple[int, int],
    rotation_deg: Tensor | float = 0.0,
    flip: Tensor | bool = False,
) -> Tensor:
    """Affine maps from source pixels into an (out_h, out_w) crop of ``bbox``.

    bbox: (B, 4) boxes (their aspect should match out_w / out_h, see :func:`square_bbox`);
    rotation_deg: (B,) or scalar, the crop content turns counter-clockwise by this angle about the box
    centre; flip: (B,) bool or scalar, mirror the crop horizontally. Returns (B, 2, 3).
    """
    bbox = bbox.reshape(-1, 4)
    batch = bbox.shape[0]
    dtype, device = bbox.dtype, bbox.device
    out_h, out_w = out_size
    centre = (bbox[:, :2] + bbox[:, 2:]) / 2  # (B, 2)
    size = (bbox[:, 2:] - bbox[:, :2]).clamp(min=1e-6)  # (B, 2)
    sx = out_w / size[:, 0]
    sy = out_h / size[:, 1]
    # Python numbers become fills on the box's device (no host-to-device copy); tensors are moved to it
    if isinstance(rotation_deg, Tensor):
        rot = rotation_deg.to(device=device, dtype=dtype).expand(batch) * (math.pi / 180.0)
        cos, sin = torch.cos(rot), torch.sin(rot)
    else:
        theta = math.radians(float(rotation_deg))
        cos, sin = torch.full_like(sx, math.cos(theta)), torch.full_like(sx, math.sin(theta))
    if isinstance(flip, Tensor):
        fx = torch.where(flip.to(device).expand(batch).bool(), -torch.ones_like(sx), torch.ones_like(sx))
    else:
        fx = torch.full_like(sx, -1.0 if flip else 1.0)
    # p' = S F Rot (p - c) + o, with o the crop centre ((out - 1) / 2 for pixel centres)
    lin = torch.zeros(batch, 2, 2, dtype=dtype, device=device)
    lin[:, 0, 0] = sx * fx * cos
    lin[:, 0, 1] = sx * fx * sin
    lin[:, 1, 0] = -sy * sin
    lin[:, 1, 1] = sy * cos
    trans = -(lin @ centre.unsqueeze(-1)).squeeze(-1)
    trans[:, 0] += (out_w - 1) / 2
    trans[:, 1] += (out_h - 1) / 2
    return torch.cat([lin, trans.unsqueeze(-1)], -1)


def apply_affine(points: Tensor, affine: Tensor) -> Tensor:
    """points: (B, N, 2) pixels; affine: (B, 2, 3) -> (B, N, 2)."""
    return points @ affine[..., :2].transpose(-1, -2) + affine[..., None, :, 2]


def affine_to_3x3(affine: Tensor) -> Tensor:
    """(..., 2, 3) -> (..., 3, 3) with a last row [0, 0, 1]."""
    last = torch.zeros(*affine.shape[:-2], 1, 3, dtype=affine.dtype, device=affine.device)
    last[..., 0, 2] = 1.0
    return torch.cat([affine, last], -2)


def inverse_3x3(matrix: Tensor) -> Tensor:
    """(..., 3, 3) -> its inverse, in closed form (adjugate / determinant): no error check (torch.linalg.inv's
    is a host sync on an accelerator) and exportable to ONNX (which has no matrix inverse). The matrices of this
    module (intrinsics, affines) are invertible."""
    (a, b, c), (d, e, f), (g, h, i) = (matrix[..., r, :].unbind(-1) for r in range(3))
    cofactors = torch.stack([
        torch.stack([e * i - f * h, c * h - b * i, b * f - c * e], -1),
        torch.stack([f * g - d * i, a * i - c * g, c * d - a * f], -1),
        torch.stack([d * h - e * g, b * g - a * h, a * e - b * d], -1),
    ], -2)  # the adjugate
    det = a * cofactors[..., 0, 0] + b * cofactors[..., 1, 0] + c * cofactors[..., 2, 0]
    return cofactors / det[..., None, None]


def invert_affine(affine: Tensor) -> Tensor:
    """(..., 2, 3) -> its inverse (..., 2, 3) (:func:`inverse_3x3`: no host sync, exportable)."""
    return inverse_3x3(affine_to_3x3(affine))[..., :2, :]


def crop_image(image: Tensor, affine: Tensor, out_size: tuple[int, int], mode: str = "bilinear") -> Tensor:
    """image: (B, C, H, W); affine: (B, 2, 3) from :func:`bbox_crop_affine` -> (B, C, out_h, out_w).

    Pixels outside the source are zero.
    """
    return warp_affine(image, affine.to(image.dtype), dsize=out_size, mode=mode, padding_mode="zeros", align_corners=True)


def transform_intrinsics(K: Tensor, affine: Tensor) -> Tensor:
    """Intrinsics after an image-plane affine: K: (..., 3, 3), affine: (..., 2, 3) -> (..., 3, 3).

    Projecting with the result equals projecting with K and then applying the affine.
    """
    return affine_to_3x3(affine) @ K
