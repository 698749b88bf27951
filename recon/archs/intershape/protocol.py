"""InterShape's own evaluation protocol (iscas3dv/Two-Hand-Shape-Pose_v2 ``data/InterHand2.6M/dataset.py``
``evaluate``; the first repository's README: "samples without middle finger's MCP joint or root joint are not used
... because we use these joints for alignment"), reported by ``recon.evaluate`` beside the InterWild-convention
metrics.

Per hand whose wrist and middle knuckle are labelled:

1. the predicted joints and mesh are shifted to the predicted middle knuckle (joint 9) and scaled by (ground-truth
   / predicted wrist-to-middle-knuckle length), then placed at the ground-truth middle knuckle;
2. ``InterShape_MPJPE``: the error of every labelled joint, averaged per joint over the hands, then over the 21
   joints (the reference's per-joint lists), mm;
3. ``InterShape_MPVPE``: on hands with a MANO fit, the mean vertex error, averaged over hands, mm.

All frames count (the reference reports single- and interacting-hand frames apart; here they are pooled, and
``recon.evaluate``'s per-dataset split is the only split). The ground truth reads labels (the bone lengths): these
numbers compare with InterShape's, not a test-time setting.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from eval.metrics import sum_over_ranks
from hands.joints import MIDDLE_KNUCKLE, WRIST
from hands.sample import HandBatch
from hands.units import to_mm

__all__ = ["INTERSHAPE_METRICS", "InterShapeProtocol", "aligned"]

INTERSHAPE_METRICS = ("InterShape_MPVPE", "InterShape_MPJPE")


def aligned(pred_joints: Tensor, pred_verts: Tensor, gt_joints: Tensor) -> tuple[Tensor, Tensor]:
    """Step 1: (B, 21, 3), (B, V, 3) predicted joints / mesh (any frame) and (B, 21, 3) ground-truth joints ->
    the prediction rescaled and placed at the ground truth's middle knuckle."""
    pred_root = pred_joints[:, MIDDLE_KNUCKLE : MIDDLE_KNUCKLE + 1]
    gt_root = gt_joints[:, MIDDLE_KNUCKLE : MIDDLE_KNUCKLE + 1]
    pred_len = (pred_joints[:, MIDDLE_KNUCKLE] - pred_joints[:, WRIST]).norm(dim=-1)
    gt_len = (gt_joints[:, MIDDLE_KNUCKLE] - gt_joints[:, WRIST]).norm(dim=-1)
    scale = (gt_len / pred_len.clamp(min=1e-12))[:, None, None]
    return (pred_joints - pred_root) * scale + gt_root, (pred_verts - pred_root) * scale + gt_root


class InterShapeProtocol:
    """Streaming InterShape-protocol metrics (``reset`` / ``process`` / ``evaluate``; module docstring).
    distributed: sum the statistics over ranks in :meth:`evaluate` when torch.distributed is initialised."""

    def __init__(self, *, distributed: bool = True) -> None:
        self.distributed = distributed
        self.reset()

    def reset(self) -> None:
        # rows 0-20: per-joint error sum and count; row 21: per-hand mean vertex error sum and hands
        self._stats = torch.zeros(22, 2, dtype=torch.float64)

    @torch.no_grad()
    def process(self, outputs, batch: HandBatch) -> None:
        def get(name: str) -> Tensor:
            value = outputs[name] if isinstance(outputs, dict) else getattr(outputs, name)
            return value.detach().to(device="cpu", dtype=torch.float64)

        for side in ("right", "left"):
            gt = batch.hand(side)
            joints_valid = (gt.valid[:, None] & gt.joints_valid).cpu()  # (B, 21)
            keep = joints_valid[:, WRIST] & joints_valid[:, MIDDLE_KNUCKLE]
            if not bool(keep.any()):
                continue
            gt_joints = gt.joints_cam.detach().to("cpu", torch.float64)[keep]
            joints, verts = aligned(get(f"{side}_joints")[keep], get(f"{side}_verts")[keep], gt_joints)
            counted = joints_valid[keep]
            error = (joints - gt_joints).norm(dim=-1)  # (K, 21)
            self._stats[:21, 0] += torch.where(counted, error, torch.zeros_like(error)).sum(0)
            self._stats[:21, 1] += counted.sum(0).to(torch.float64)
            fitted = gt.mano_valid.cpu()[keep].bool()
            if bool(fitted.any()):
                gt_verts = gt.verts_cam.detach().to("cpu", torch.float64)[keep][fitted]
                per_hand = (verts[fitted] - gt_verts).norm(dim=-1).mean(1)
                self._stats[21] += torch.tensor([float(per_hand.sum()), float(len(per_hand))], dtype=torch.float64)

    def evaluate(self) -> dict[str, float]:
        """``InterShape_MPVPE``, ``InterShape_MPJPE`` (mm; NaN when nothing counted), ``count_InterShape`` (hands
        with a mesh). A collective under torch.distributed: call it on every rank."""
        stats = sum_over_ranks(self._stats, self.distributed)
        joints = stats[:21]
        per_joint = joints[joints[:, 1] > 0]
        mpjpe = float(to_mm((per_joint[:, 0] / per_joint[:, 1]).mean())) if len(per_joint) else math.nan
        mpvpe = float(to_mm(stats[21, 0] / stats[21, 1])) if stats[21, 1] > 0 else math.nan
        return {"InterShape_MPVPE": mpvpe, "InterShape_MPJPE": mpjpe, "count_InterShape": int(stats[21, 1])}
