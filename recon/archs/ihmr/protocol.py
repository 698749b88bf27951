"""IHMR's own evaluation protocol (penincillin/IHMR ``src/utils/evaluator.py``, ``utils/metric_utils.py``),
reported by ``recon.evaluate`` beside the InterWild-convention metrics (``IHMR.protocol_evaluator``).

- ``IHMR_MPJPE``: per hand, the 21 joints shifted to that hand's wrist (prediction and ground truth), the
  Euclidean error of every valid joint, pooled over joints and samples (``get_single_joints_error``), mm.
- ``IHMR_inter_MPJPE``: both hands' 42 joints, the prediction in the right-wrist frame (the left hand at
  ``rel_root``), each axis standardised and mapped onto the ground truth's per-axis mean and standard deviation
  (``calc_transform_no_rot``, scale and translation, no rotation), pooled over valid joints, mm; samples with
  fewer than two valid joints are left out.
- ``IHMR_collision_ave`` / ``IHMR_collision_max``: on interacting samples, the depth of each of the 1556
  vertices inside the other hand (:mod:`recon.archs.ihmr.collision`; the reference's
  ``collision_loss_origin_scale``), its mean and its maximum per sample, averaged over samples, mm.

The reference reads its test set's per-sample ``scale`` (1 for IH2.6M); none is applied here.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from eval.metrics import sum_over_ranks
from hands.sample import HandBatch
from hands.units import to_mm
from recon.archs.ihmr.collision import close_boundary, penetration_depth

__all__ = ["IHMRProtocol", "inter_joint_errors"]


def inter_joint_errors(pred: Tensor, gt: Tensor, valid: Tensor) -> Tensor:
    """``calc_transform_no_rot`` then the errors: pred/gt (42, 3), valid (42,) bool -> (n_valid,) errors."""
    pred, gt = pred[valid], gt[valid]
    mapped = (pred - pred.mean(0)) / pred.std(0, unbiased=False) * gt.std(0, unbiased=False) + gt.mean(0)
    return (mapped - gt).norm(dim=-1)


class IHMRProtocol:
    """Streaming IHMR-protocol metrics (``reset`` / ``process`` / ``evaluate``; module docstring).

    Args (keyword-only): faces_right, faces_left (F, 3) long: the hand model's faces; distributed: sum the
    statistics over ranks in :meth:`evaluate` when torch.distributed is initialised.
    """

    def __init__(self, *, faces_right: Tensor, faces_left: Tensor, distributed: bool = True) -> None:
        self.faces = {"right": faces_right, "left": faces_left}
        self.caps = {side: close_boundary(faces) for side, faces in self.faces.items()}
        self.distributed = distributed
        self.reset()

    def reset(self) -> None:
        # rows: MPJPE, inter MPJPE, collision mean, collision max; columns: sum, count
        self._stats = torch.zeros(4, 2, dtype=torch.float64)

    @torch.no_grad()
    def process(self, outputs, batch: HandBatch) -> None:
        def get(name: str) -> Tensor:
            value = outputs[name] if isinstance(outputs, dict) else getattr(outputs, name)
            return value.detach().to(device="cpu", dtype=torch.float64)

        rel_root = get("rel_root")
        pred_joints = {"right": get("right_joints"), "left": get("left_joints")}
        pred_verts = {"right": get("right_verts"), "left": get("left_verts")}
        gt = {side: batch.hand(side) for side in ("right", "left")}
        gt_joints = {side: gt[side].joints_cam.detach().to("cpu", torch.float64) for side in gt}
        valid = {side: (gt[side].valid[:, None] & gt[side].joints_valid).cpu() for side in gt}  # (B, 21)
        for side in ("right", "left"):
            ok = valid[side] & valid[side][:, :1]  # the hand's wrist must be valid to align at it
            pred = pred_joints[side] - pred_joints[side][:, :1]
            error = (pred - (gt_joints[side] - gt_joints[side][:, :1])).norm(dim=-1)
            self._stats[0] += torch.tensor([float(error[ok].sum()), float(ok.sum())])
        pred_42 = torch.cat([pred_joints["right"], pred_joints["left"] + rel_root[:, None]], 1)
        gt_42 = torch.cat([gt_joints["right"], gt_joints["left"]], 1)
        valid_42 = torch.cat([valid["right"], valid["left"]], 1)
        for b in range(len(batch)):
            if int(valid_42[b].sum()) < 2:
                continue
            errors = inter_joint_errors(pred_42[b], gt_42[b], valid_42[b])
            self._stats[1] += torch.tensor([float(errors.sum()), float(errors.numel())])
        for b, kind in enumerate(batch.hand_type):
            if kind != "interacting":
                continue
            right, left = pred_verts["right"][b], pred_verts["left"][b] + rel_root[b]
            depth = torch.cat([
                penetration_depth(right, left, self.faces["left"].cpu(), self.caps["left"].cpu()),
                penetration_depth(left, right, self.faces["right"].cpu(), self.caps["right"].cpu()),
            ])
            self._stats[2] += torch.tensor([float(depth.mean()), 1.0])
            self._stats[3] += torch.tensor([float(depth.max()), 1.0])

    def evaluate(self) -> dict[str, float]:
        """``IHMR_MPJPE``, ``IHMR_inter_MPJPE``, ``IHMR_collision_ave``, ``IHMR_collision_max`` (mm; NaN when
        nothing counted), ``count_IHMR_collision`` (interacting samples). A collective under torch.distributed."""
        stats = sum_over_ranks(self._stats, self.distributed)
        names = ("IHMR_MPJPE", "IHMR_inter_MPJPE", "IHMR_collision_ave", "IHMR_collision_max")
        result = {
            name: float(to_mm(stats[i, 0] / stats[i, 1])) if stats[i, 1] > 0 else math.nan
            for i, name in enumerate(names)
        }
        result["count_IHMR_collision"] = int(stats[2, 1])
        return result
