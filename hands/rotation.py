"""Rotation conversions: axis-angle <-> matrix <-> 6D.

6D convention (one for the whole project, InterWild's): the 6D vector holds the first two *columns* of
the rotation matrix, flattened row-major from the (3, 2) block, i.e. ``[R00, R01, R10, R11, R20, R21]``.
:func:`rot6d_to_matrix` orthonormalises by Gram-Schmidt (Zhou et al., CVPR 2019):
``b1 = normalize(a1)``, ``b2 = normalize(a2 - <b1, a2> b1)``, ``b3 = b1 x b2``.

Axis-angle vectors are (..., 3) in radians; matrices (..., 3, 3) rotate column vectors (x' = R x).
The axis-angle/matrix conversions come from kornia.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from kornia.geometry.conversions import axis_angle_to_rotation_matrix, rotation_matrix_to_axis_angle
from torch import Tensor

__all__ = [
    "axis_angle_to_matrix",
    "matrix_to_axis_angle",
    "rot6d_to_matrix",
    "matrix_to_rot6d",
    "rot6d_to_axis_angle",
    "axis_angle_to_rot6d",
    "mirror_axis_angle",
]


def axis_angle_to_matrix(axis_angle: Tensor) -> Tensor:
    """axis_angle: (..., 3) radians -> (..., 3, 3) rotation matrices."""
    shape = axis_angle.shape[:-1]
    return axis_angle_to_rotation_matrix(axis_angle.reshape(-1, 3)).reshape(*shape, 3, 3)


def matrix_to_axis_angle(matrix: Tensor) -> Tensor:
    """matrix: (..., 3, 3) rotation matrices -> (..., 3) axis-angle, angle in [0, pi]."""
    shape = matrix.shape[:-2]
    return rotation_matrix_to_axis_angle(matrix.reshape(-1, 3, 3)).reshape(*shape, 3)


def rot6d_to_matrix(rot6d: Tensor) -> Tensor:
    """rot6d: (..., 6) in the module's convention -> (..., 3, 3) rotation matrices."""
    block = rot6d.reshape(*rot6d.shape[:-1], 3, 2)  # (..., 3, 2): columns a1, a2
    a1, a2 = block[..., 0], block[..., 1]
    b1 = F.normalize(a1, dim=-1)
    b2 = F.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack((b1, b2, b3), dim=-1)


def matrix_to_rot6d(matrix: Tensor) -> Tensor:
    """matrix: (..., 3, 3) -> (..., 6), the first two columns flattened row-major."""
    return matrix[..., :, :2].reshape(*matrix.shape[:-2], 6)


def rot6d_to_axis_angle(rot6d: Tensor) -> Tensor:
    """rot6d: (..., 6) -> (..., 3) axis-angle."""
    return matrix_to_axis_angle(rot6d_to_matrix(rot6d))


def axis_angle_to_rot6d(axis_angle: Tensor) -> Tensor:
    """axis_angle: (..., 3) -> (..., 6)."""
    return matrix_to_rot6d(axis_angle_to_matrix(axis_angle))


def mirror_axis_angle(axis_angle: Tensor) -> Tensor:
    """Mirror rotations through the x = 0 plane: (x, y, z) -> (x, -y, -z) per 3-vector.

    axis_angle: (..., 3k), e.g. a (B, 48) MANO pose. A right hand's pose mirrored this way is the pose of
    the mirrored (left) hand, and vice versa (InterWild's flip and un-mirroring rule).
    """
    signs = axis_angle.new_tensor([1.0, -1.0, -1.0])
    return (axis_angle.reshape(*axis_angle.shape[:-1], -1, 3) * signs).reshape(axis_angle.shape)
