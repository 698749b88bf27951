"""IntagHand's own evaluation protocol (its ``apps/eval_interhand.py``), offered beside the InterWild-convention
metrics of :mod:`eval.evaluator`.

Per hand, on the meshes only (any frame, any unit: the protocol is invariant to each hand's translation and scale):

1. joints = the hand model's 16 regressed joints + 5 fingertip vertices (IntagHand's tips on official MANO:
   745, 317, 444, 556, 673), in :mod:`hands.joints` order, for the prediction and the ground truth alike;
2. root = the middle-finger knuckle (joint 9): both meshes and joint sets are shifted to their own root;
3. the prediction is rescaled by (its ground-truth bone length / its predicted bone length), bone = wrist to
   middle knuckle, *per hand*;
4. MPVPE / MPJPE = mean Euclidean error over the vertices / joints, in millimetres; each side's mean over its
   hands, then the mean of the two sides (the reference's "all").

Which frames count: IntagHand evaluates InterHand2.6M's interacting test frames with both MANO fits; here, samples
of ``hand_type == "interacting"`` whose two hands both have a mesh (``valid & mano_valid``). The ground truth reads
labels (the bone lengths): these numbers are comparable with IntagHand's paper, not a test-time setting.
"""
from __future__ import annotations

import abc
import math
from typing import Sequence

import torch
from torch import Tensor

from eval.metrics import sum_over_ranks
from hands.joints import MANO21_TO_OURS, MIDDLE_KNUCKLE, WRIST
from hands.sample import HandBatch
from hands.units import to_mm

__all__ = ["joint_regressor", "regress_joints", "intaghand_errors", "bone_rescaled_errors", "RescaledMeshProtocol", "IntagHandProtocol"]

SIDES = ("right", "left")


def joint_regressor(j_regressor: Tensor, tip_verts: Sequence[int]) -> Tensor:
    """j_regressor: (16, V) (row 0 the wrist); tip_verts: 5 vertex indices (thumb, index, middle, ring, pinky).
    Returns (21, V): the rows that give the 21 joints in :mod:`hands.joints` order (one-hot rows for the tips)."""
    tips = torch.zeros(5, j_regressor.shape[1], dtype=j_regressor.dtype, device=j_regressor.device)
    tips[torch.arange(5), torch.as_tensor(list(tip_verts))] = 1.0
    return torch.cat([j_regressor, tips], 0)[list(MANO21_TO_OURS)]


def regress_joints(verts: Tensor, regressor: Tensor) -> Tensor:
    """verts: (B, V, 3); regressor: (21, V) from :func:`joint_regressor`. Returns (B, 21, 3), the verts' frame."""
    return torch.einsum("jv,bvc->bjc", regressor.to(verts), verts)


def intaghand_errors(pred_verts: Tensor, gt_verts: Tensor, regressor: Tensor) -> tuple[Tensor, Tensor]:
    """One hand's errors under IntagHand's protocol (module docstring, steps 1-3).

    pred_verts, gt_verts: (B, V, 3) the predicted and ground-truth meshes of one side (each in any frame; the
    ground truth in metres gives errors in metres); regressor: (21, V) (:func:`joint_regressor`).
    Returns (verts_error (B, V), joints_error (B, 21)).
    """
    return bone_rescaled_errors(pred_verts, gt_verts, regressor, root=MIDDLE_KNUCKLE)


def bone_rescaled_errors(pred_verts: Tensor, gt_verts: Tensor, regressor: Tensor, *, root: int) -> tuple[Tensor, Tensor]:
    """Steps 2-3 with the root joint ``root`` (IntagHand: the middle knuckle; DIR: the wrist): each mesh and
    joint set shifted to its own root, the prediction rescaled by (GT bone / predicted bone), bone = wrist to
    middle knuckle per hand. Returns (verts_error (B, V), joints_error (B, 21)) in the inputs' unit."""
    pred_joints = regress_joints(pred_verts, regressor)
    gt_joints = regress_joints(gt_verts, regressor)
    pred_root = pred_joints[:, root : root + 1]  # (B, 1, 3)
    gt_root = gt_joints[:, root : root + 1]
    pred_bone = (pred_joints[:, MIDDLE_KNUCKLE] - pred_joints[:, WRIST]).norm(dim=-1)  # (B,)
    gt_bone = (gt_joints[:, MIDDLE_KNUCKLE] - gt_joints[:, WRIST]).norm(dim=-1)
    scale = (gt_bone / pred_bone)[:, None, None]
    verts_error = ((pred_verts - pred_root) * scale - (gt_verts - gt_root)).norm(dim=-1)
    joints_error = ((pred_joints - pred_root) * scale - (gt_joints - gt_root)).norm(dim=-1)
    return verts_error, joints_error


class RescaledMeshProtocol(abc.ABC):
    """What the bone-rescaled mesh protocols (IntagHand's, DIR's) take: the hand model's (16, V) joint regressors
    (row 0 the wrist), the 5 fingertip vertices and whether to sum over ranks; ``reset`` is theirs."""

    def __init__(
        self, *, j_regressor_right: Tensor, j_regressor_left: Tensor, tip_verts: Sequence[int], distributed: bool = True
    ) -> None:
        if len(tip_verts) != 5:
            raise ValueError(f"tip_verts: expected 5 fingertip vertices, got {len(tip_verts)}")
        self.j_regressor = {"right": j_regressor_right, "left": j_regressor_left}
        self.tip_verts = tuple(int(v) for v in tip_verts)
        self.distributed = distributed
        self.reset()

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget everything processed so far."""


class IntagHandProtocol(RescaledMeshProtocol):
    """Streaming IntagHand-protocol MPVPE / MPJPE (``reset`` / ``process`` / ``evaluate``).

    Args (keyword-only):
        j_regressor_right, j_regressor_left: (16, V) the hand model's joint regressors (row 0 the wrist).
        tip_verts: the 5 fingertip vertices (IntagHand's ``(745, 317, 444, 556, 673)`` on official MANO).
        distributed: sum the statistics over ranks in :meth:`evaluate` when torch.distributed is initialised.
    """

    def reset(self) -> None:
        """Forget everything processed so far."""
        self._stats: Tensor | None = None  # (side, [verts, joints], [sum of means, hands]) on the inputs' device

    @torch.no_grad()
    def process(self, outputs, batch: HandBatch) -> None:
        """outputs: ``right_verts`` / ``left_verts`` (B, V, 3) (a TwoHandOutput or a mapping); batch: the ground
        truth. Accumulates the interacting samples whose two hands both have a mesh (no host sync)."""
        preds = {
            side: (outputs[f"{side}_verts"] if isinstance(outputs, dict) else getattr(outputs, f"{side}_verts"))
            for side in SIDES
        }
        device = preds["right"].device
        keep = torch.tensor([t == "interacting" for t in batch.hand_type]).to(device, non_blocking=True)
        for side in SIDES:
            gt = batch.hand(side)
            keep = keep & gt.valid.to(device).bool() & gt.mano_valid.to(device).bool()
        weight = keep.to(torch.float64)  # (B,)
        if self._stats is None:
            self._stats = torch.zeros(2, 2, 2, dtype=torch.float64, device=device)
            self._regressors = {
                s: joint_regressor(self.j_regressor[s].to(torch.float64).cpu(), self.tip_verts).to(device) for s in SIDES
            }
        for index, side in enumerate(SIDES):
            pred = preds[side].detach().to(torch.float64)
            gt = batch.hand(side).verts_cam.to(device=device, dtype=torch.float64)
            verts_error, joints_error = intaghand_errors(pred, gt, self._regressors[side])
            zero = verts_error.new_zeros(())
            self._stats[index, 0, 0] += torch.where(keep, verts_error.mean(1), zero).sum()  # NaN-safe masking
            self._stats[index, 1, 0] += torch.where(keep, joints_error.mean(1), zero).sum()
            self._stats[index, :, 1] += weight.sum()

    def evaluate(self) -> dict[str, float]:
        """``IntagHand_MPVPE``, ``IntagHand_MPJPE`` (mm; the mean of the right and left means; NaN when nothing
        counted) and ``count_IntagHand`` (samples). A collective under torch.distributed: call it on every rank."""
        stats = self._stats if self._stats is not None else torch.zeros(2, 2, 2, dtype=torch.float64)
        stats = sum_over_ranks(stats, self.distributed)
        results: dict[str, float] = {}
        for index, name in enumerate(("MPVPE", "MPJPE")):
            sums, counts = stats[:, index, 0], stats[:, index, 1]
            results[f"IntagHand_{name}"] = float(to_mm((sums / counts).mean())) if bool((counts > 0).all()) else math.nan
        results["count_IntagHand"] = int(stats[0, 0, 1])
        return results
