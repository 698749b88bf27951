"""InterShape's loss terms (weights in :class:`recon.archs.intershape.InterShape`), on scale-free hands.

Every hand is normalised as InterShape does: shifted to its middle-finger knuckle (joint 9) and divided by its
wrist-to-middle-knuckle length (the reference's ``ROOT_JOINT_IDX`` / normalisation length). Each function returns the
sum over the counted elements divided by the batch size (the reference's ``.sum() / batchsize``).
"""
from __future__ import annotations

import functools
from typing import Dict, Tuple

import torch
from torch import Tensor

from hands.joints import FINGER_TIPS, MIDDLE_KNUCKLE, SKELETON, WRIST

__all__ = [
    "BONES",
    "bone_length",
    "normalise",
    "joint_loss",
    "bone_loss",
    "offset_loss",
    "shape_loss",
    "shape_consistency_loss",
    "regulariser",
    "left_in_right_frame",
]

# The 15 bones that end at a joint, not a fingertip (the reference's JOINT_LEVEL_IDX levels 0-3).
BONES: Tuple[Tuple[int, int], ...] = tuple((a, b) for a, b in SKELETON if b not in FINGER_TIPS)


def bone_length(joints: Tensor) -> Tensor:
    """(B, 21, 3) -> (B,) the wrist-to-middle-knuckle length."""
    return (joints[:, MIDDLE_KNUCKLE] - joints[:, WRIST]).norm(dim=-1)


def normalise(joints: Tensor, eps: float = 1e-8) -> Tensor:
    """(B, N, 3) points of a hand whose first 21 rows are its joints -> shifted to the middle knuckle and divided by
    :func:`bone_length` (any trailing rows, e.g. vertices, follow the same map)."""
    length = bone_length(joints[:, :21]).clamp(min=eps)
    return (joints - joints[:, MIDDLE_KNUCKLE : MIDDLE_KNUCKLE + 1]) / length[:, None, None]


def left_in_right_frame(left_normalised: Tensor, relative: Tensor) -> Tensor:
    """The left hand's normalised points placed in the right hand's normalised frame: ``(p + t) exp(s)``,
    relative (B, 4) = (s, t)."""
    return (left_normalised + relative[:, None, 1:]) * torch.exp(relative[:, None, :1])


def right_in_left_frame(right_normalised: Tensor, relative: Tensor) -> Tensor:
    """The inverse map: ``p exp(-s) - t``."""
    return right_normalised * torch.exp(-relative[:, None, :1]) - relative[:, None, 1:]


def _per_batch(values: Tensor, batch: int) -> Tensor:
    return values.sum() / max(batch, 1)


def joint_loss(pred: Tensor, gt: Tensor, valid: Tensor) -> Tensor:
    """L1 of normalised joints. pred/gt (B, 21, 3) normalised; valid (B, 21) bool."""
    return _per_batch(torch.where(valid[..., None], (pred - gt).abs(), torch.zeros_like(pred)), pred.shape[0])


@functools.lru_cache(maxsize=8)
def _bone_index(device: torch.device) -> Tuple[Tensor, Tensor]:
    """(parents, children) of :data:`BONES` as index tensors on ``device`` (made once per device)."""
    return tuple(torch.tensor(index, device=device) for index in zip(*BONES))


def bone_loss(pred: Tensor, gt: Tensor, valid: Tensor) -> Tensor:
    """Squared error of the 15 normalised bone lengths (:data:`BONES`). pred/gt (B, 21, 3) normalised joints; valid
    (B, 21) bool (a bone counts when both its joints do)."""
    parent, child = _bone_index(pred.device)
    lengths = lambda j: (j[:, child] - j[:, parent]).norm(dim=-1)  # noqa: E731
    counted = valid[:, child] & valid[:, parent]
    error = (lengths(pred) - lengths(gt)) ** 2
    return _per_batch(torch.where(counted, error, torch.zeros_like(error)), pred.shape[0])


def offset_loss(pred: Dict[str, Tensor], gt: Dict[str, Tensor], valid: Tensor) -> Tensor:
    """Squared error of the joint-to-joint offsets (left joint j minus right joint j) seen from each hand's
    normalised frame. pred/gt: {"right_frame", "left_frame"} -> (B, 42, 3) both hands' joints (right 21 first) in
    that frame; valid (B, 21) bool (joint j of both hands counted)."""
    total = 0.0
    for frame in ("right_frame", "left_frame"):
        offset = lambda joints: joints[:, 21:] - joints[:, :21]  # noqa: E731
        error = (offset(pred[frame]) - offset(gt[frame])) ** 2
        total = total + _per_batch(torch.where(valid[..., None], error, torch.zeros_like(error)), error.shape[0])
    return total


def shape_loss(pred: Tensor, gt: Tensor, valid: Tensor) -> Tensor:
    """Squared error of the betas. pred/gt (B, 10); valid (B,) bool (the hand has a MANO fit)."""
    error = (pred - gt) ** 2
    return _per_batch(torch.where(valid[:, None], error, torch.zeros_like(error)), pred.shape[0])


def shape_consistency_loss(right: Tensor, left: Tensor, both: Tensor) -> Tensor:
    """Squared difference of the two hands' betas (one person's hands), on samples showing both hands."""
    error = (right - left) ** 2
    return _per_batch(torch.where(both[:, None], error, torch.zeros_like(error)), right.shape[0])


def regulariser(shape: Tensor, pose: Tensor) -> Tensor:
    """``sum beta^2 + 0.1 sum theta_fingers^2`` per batch (the root rotation is free). shape (B, 10), pose (B, 48)."""
    return _per_batch(shape**2, shape.shape[0]) + 0.1 * _per_batch(pose[:, 3:] ** 2, pose.shape[0])
