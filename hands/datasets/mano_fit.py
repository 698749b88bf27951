"""Moving a MANO fit given in world coordinates into a camera's frame.

A MANO mesh is ``M(R_root) + trans`` where ``M(R)`` rotates the articulated hand about a fixed centre (the
rest-pose wrist, which depends on the shape only). A camera maps world points by ``X_cam = R X + t``. The
camera-space fit keeps the articulation and shape, takes the root rotation ``R R_root``, and needs a new
translation, because the rotation about the wrist does not commute with the camera's rotation about the
world origin: for any point p of the mesh (we use the wrist),

    trans_cam = R (p_world + trans) + t - p'

where p_world is p on the world-posed mesh at zero translation and p' is p on the mesh posed with the new
root at zero translation. (For MANO p_world = p' = the rest wrist; computing both keeps this exact for any
point and any model whose root rotates about a fixed centre.)
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor

from hands.rotation import axis_angle_to_matrix, matrix_to_axis_angle

__all__ = ["fit_to_camera", "fit_to_camera_mesh", "hand_forward", "wrist_is_root_centre"]

_ROOT_CENTRE_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def hand_forward(model, side: str, pose: Tensor, shape: Tensor, trans: Tensor | None = None):
    """Run ``model(side, pose (B, 48), shape (B, 10), trans (B, 3))`` without gradients; returns its output."""
    with torch.no_grad():
        return model(side, pose, shape, trans)


def fit_to_camera(
    model, side: str, pose_world: Tensor, shape: Tensor, trans_world: Tensor, R: Tensor, t: Tensor
) -> tuple[Tensor, Tensor]:
    """A world-frame MANO fit -> the same mesh's fit in a camera frame.

    pose_world: (B, 48) axis-angle, root first (flat_hand_mean=False); shape: (B, 10);
    trans_world: (B, 3) metres, world; R: (B, 3, 3) world -> camera rotation; t: (B, 3) metres, so that
    X_cam = R X_world + t. Returns (pose_cam (B, 48), trans_cam (B, 3)) such that
    ``model(side, pose_cam, shape, trans_cam).verts == R @ model(side, pose_world, shape, trans_world).verts + t``.
    """
    dtype = pose_world.dtype
    R = R.to(dtype)
    root_world = axis_angle_to_matrix(pose_world[:, :3])  # (B, 3, 3)
    root_cam = matrix_to_axis_angle(R @ root_world)  # (B, 3)
    pose_cam = torch.cat([root_cam, pose_world[:, 3:]], 1)
    zeros = torch.zeros_like(trans_world)
    wrist_world = hand_forward(model, side, pose_world, shape, zeros).joints[:, 0]  # (B, 3) p_world
    wrist_new = hand_forward(model, side, pose_cam, shape, zeros).joints[:, 0]  # (B, 3) p'
    trans_cam = (R @ (wrist_world + trans_world).unsqueeze(-1)).squeeze(-1) + t.to(dtype) - wrist_new
    return pose_cam, trans_cam


def wrist_is_root_centre(model, side: str) -> bool:
    """True when the model's wrist joint does not move under root rotations (smplx's MANO: the root turns
    about the rest wrist), checked once per model and side with one small forward."""
    cache = _ROOT_CENTRE_CACHE.setdefault(model, {})
    if side not in cache:
        pose = torch.zeros(2, 48)
        pose[1, :3] = torch.tensor([0.7, -1.1, 0.4])
        shape = torch.zeros(2, 10)
        shape[:, 0] = 0.5
        wrists = hand_forward(model, side, pose, shape, torch.zeros(2, 3)).joints[:, 0]
        cache[side] = bool((wrists[0] - wrists[1]).abs().max() < 1e-6)
    return cache[side]


def fit_to_camera_mesh(
    model, side: str, pose_world: Tensor, shape: Tensor, trans_world: Tensor, R: Tensor, t: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`fit_to_camera` plus the camera-space mesh, with one forward when the wrist is the root centre.

    Returns pose_cam (B, 48), trans_cam (B, 3), verts_cam (B, 778, 3), wrist_cam (B, 3) (metres, camera).
    """
    if not wrist_is_root_centre(model, side):
        pose_cam, trans_cam = fit_to_camera(model, side, pose_world, shape, trans_world, R, t)
        out = hand_forward(model, side, pose_cam, shape, trans_cam)
        return pose_cam, trans_cam, out.verts, out.joints[:, 0]
    dtype = pose_world.dtype
    R = R.to(dtype)
    root_cam = matrix_to_axis_angle(R @ axis_angle_to_matrix(pose_world[:, :3]))
    pose_cam = torch.cat([root_cam, pose_world[:, 3:]], 1)
    out = hand_forward(model, side, pose_cam, shape, torch.zeros_like(trans_world))
    wrist = out.joints[:, 0]  # p_world == p' (the rest wrist)
    trans_cam = (R @ (wrist + trans_world).unsqueeze(-1)).squeeze(-1) + t.to(dtype) - wrist
    return pose_cam, trans_cam, out.verts + trans_cam[:, None], wrist + trans_cam
