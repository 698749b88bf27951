"""DIR's own evaluation protocol (PengfeiRen96/DIR ``apps/eval.py`` with its defaults ``--root_joint 0
--scale True``, which gives the numbers of its README), offered beside the InterWild-convention metrics of
:mod:`eval.evaluator`.

Per hand, on the meshes (any frame: the protocol is invariant to each hand's translation and scale):

1. joints = the hand model's 16 regressed joints + 5 fingertip vertices (DIR's tips on official MANO: 745, 317,
   444, 556, 673 for both hands), in :mod:`hands.joints` order, for the prediction and the ground truth alike;
2. root = the **wrist** (joint 0): both meshes and joint sets are shifted to their own wrist;
3. the prediction is rescaled by (its ground-truth bone length / its predicted bone length), bone = wrist to
   middle knuckle, *per hand*;
4. MPVPE / MPJPE = mean Euclidean error over the vertices / joints, in millimetres; each side's mean over its
   hands, then the mean of the two sides (the README's "all");
5. root error = ``|| (GT right wrist - GT left wrist) - predicted offset ||`` (mm), the GT wrists regressed from the
   GT meshes, the prediction unscaled; with this project's ``rel_root`` (left - right) that is
   ``|| (GT left wrist - GT right wrist) - rel_root ||``.

Which frames count: DIR evaluates IntagHand's preparation of InterHand2.6M's test set, interacting frames with both
MANO fits; here, samples of ``hand_type == "interacting"`` whose two hands both have a mesh (``valid &
mano_valid``). Steps 3 read labels (the bone lengths): the MPVPE / MPJPE numbers are comparable with DIR's, not a
test-time setting.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from eval.intaghand_protocol import RescaledMeshProtocol, bone_rescaled_errors, joint_regressor
from eval.metrics import sum_over_ranks
from hands.joints import WRIST
from hands.sample import HandBatch
from hands.units import to_mm

__all__ = ["DIR_TIP_VERTS", "DIR_METRICS", "DIR_PUBLISHED", "dir_errors", "DIRProtocol"]

DIR_TIP_VERTS = (745, 317, 444, 556, 673)  # apps/eval.py's Jr on official MANO (both hands)
DIR_METRICS = ("DIR_MPVPE", "DIR_MPJPE", "DIR_root")
# DIR's README (PengfeiRen96/DIR), millimetres, this protocol on IntagHand's preparation of the IH2.6M test set:
# the numbers of the first release (commit 7b7bf48, 2023-09/10) and of the model updated on 2024-06-05 (e309457,
# "We fixed some minor bugs"). The AttentionHand paper's Table 2 row "DIR" has IH2.6M MRRPE 28.98 = the first
# root error.
DIR_PUBLISHED = {
    "DIR README (2023 release)": {"ih26m": {"DIR_MPVPE": 9.95, "DIR_MPJPE": 10.18, "DIR_root": 28.98}},
    "DIR README (2024 model)": {"ih26m": {"DIR_MPVPE": 10.00, "DIR_MPJPE": 10.23, "DIR_root": 29.26}},
}
SIDES = ("right", "left")


def dir_errors(pred_verts: Tensor, gt_verts: Tensor, j_regressor: Tensor, tip_verts: Sequence[int]) -> tuple[Tensor, Tensor]:
    """One hand's errors under DIR's protocol (module docstring, steps 1-3).

    pred_verts, gt_verts: (B, V, 3) the predicted and ground-truth meshes of one side (each in any frame; the
    ground truth in metres gives errors in metres). Returns (verts_error (B, V), joints_error (B, 21)).
    """
    regressor = joint_regressor(j_regressor.to(pred_verts), tip_verts)  # (21, V)
    return bone_rescaled_errors(pred_verts, gt_verts.to(pred_verts), regressor, root=WRIST)


class DIRProtocol(RescaledMeshProtocol):
    """Streaming DIR-protocol MPVPE / MPJPE / root error (``reset`` / ``process`` / ``evaluate``).

    Args (keyword-only):
        j_regressor_right, j_regressor_left: (16, V) the hand model's joint regressors (row 0 the wrist).
        tip_verts: the 5 fingertip vertices (:data:`DIR_TIP_VERTS` on official MANO).
        distributed: sum the statistics over ranks in :meth:`evaluate` when torch.distributed is initialised.
    """

    def reset(self) -> None:
        """Forget everything processed so far."""
        # rows: right verts, right joints, left verts, left joints, root error; columns: sum of means, count
        self._stats = torch.zeros(5, 2, dtype=torch.float64)

    @torch.no_grad()
    def process(self, outputs, batch: HandBatch) -> None:
        """outputs: ``right_verts`` / ``left_verts`` (B, V, 3) and ``rel_root`` (B, 3) (a TwoHandOutput or a
        mapping); batch: the ground truth. Accumulates the interacting samples whose two hands have a mesh."""
        def get(name: str) -> Tensor:
            value = outputs[name] if isinstance(outputs, dict) else getattr(outputs, name)
            return value.detach().to(torch.float64)

        both = torch.ones(len(batch), dtype=torch.bool, device=batch.image.device)
        for side in SIDES:
            gt = batch.hand(side)
            both = both & gt.valid.bool() & gt.mano_valid.bool()
        interacting = torch.tensor([t == "interacting" for t in batch.hand_type], device=both.device)
        keep = both & interacting
        if not bool(keep.any()):
            return
        wrists = {}
        for index, side in enumerate(SIDES):
            pred = get(f"{side}_verts")
            keep_here = keep.to(pred.device)
            pred = pred[keep_here]
            gt = batch.hand(side).verts_cam.to(device=pred.device, dtype=torch.float64)[keep_here]
            regressor = self.j_regressor[side].to(device=pred.device, dtype=torch.float64)
            verts_error, joints_error = dir_errors(pred, gt, regressor, self.tip_verts)
            self._stats[2 * index] += torch.tensor([float(verts_error.mean(1).sum()), float(len(pred))])
            self._stats[2 * index + 1] += torch.tensor([float(joints_error.mean(1).sum()), float(len(pred))])
            wrists[side] = torch.einsum("v,bvc->bc", regressor[WRIST], gt)  # (K, 3)
        rel_root = get("rel_root")[keep.to(get("rel_root").device)]
        root_error = ((wrists["left"] - wrists["right"]) - rel_root.to(wrists["left"].device)).norm(dim=-1)
        self._stats[4] += torch.tensor([float(root_error.sum()), float(len(root_error))])

    def evaluate(self) -> dict[str, float]:
        """``DIR_MPVPE``, ``DIR_MPJPE`` (mm; the mean of the right and left means), ``DIR_root`` (mm) (NaN when
        nothing counted) and ``count_DIR`` (samples). A collective under torch.distributed: call it on every rank."""
        stats = sum_over_ranks(self._stats, self.distributed)
        counted = bool((stats[:, 1] > 0).all())
        means = stats[:, 0] / stats[:, 1].clamp(min=1.0)
        nan = math.nan
        return {
            "DIR_MPVPE": float(to_mm((means[0] + means[2]) / 2)) if counted else nan,
            "DIR_MPJPE": float(to_mm((means[1] + means[3]) / 2)) if counted else nan,
            "DIR_root": float(to_mm(means[4])) if counted else nan,
            "count_DIR": int(stats[4, 1]),
        }
