"""IHMR-OPT: the reference's test-time optimisation (``src/optimize.py``, ``models/optimize_model.py``,
``strategies/opt_default.py``, ``utils/opt_utils.py``, ``bash/optimize.sh``), on a regressor's predictions.

Starting from the predicted parameters, four stages each optimise one factor with Adam (betas 0.9, 0.999):
the translation (lr 1e-4), both root rotations, both finger poses, both shapes (lr 1e-2), 300 iterations each
(301 forward passes, ``range(epoch + 1)``). The objective keeps the hands near the keypoint prediction
(2D joints, L1; 3D joints, squared, root-aligned; the left wrist's translation, squared) and adds the
collision term, the shape regulariser (right minus left betas, squared) and, in the pose stage, the finger
regulariser (``_finger_reg_loss``: each finger's bones coplanar and bending one way). Every
``save_every`` iterations (``--save_mid_freq 10``) the parameters and per-sample losses are recorded; at the
end of a stage each sample takes, among the records whose 3D-joint deviation did not grow (+0.1 %) and whose
collision fell by at least 9.9 % (``'-10'`` with the reference's +0.1 smoothing), the one closest to the
keypoints; its starting point always qualifies. The camera is not optimised (its stage is commented out in
``opt_default.py``).

The keypoint prediction is the model's keypoint head (:mod:`recon.archs.ihmr.model`: the reference reads
another network's predictions from files). Frames and units as in the model: right-wrist frame, metres.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import Tensor

from recon.archs.ihmr.model import (
    PARAM_SLICES,
    IHMR,
    decode_params,
    joints_2d_error,
    joints_3d_error,
)
from recon.output import TwoHandOutput

__all__ = ["OptStage", "OPT_STAGES", "finger_regulariser", "optimize"]


@dataclass(frozen=True)
class OptStage:
    """One stage of ``strategies/opt_default.py``: the parameter groups it optimises, its loss weights, the
    learning rate, the iterations, the filters ((loss, percent): keep records with loss <= start x (1 +
    (percent + 0.1) / 100)) and the loss that picks among the kept records (smallest)."""

    name: str
    update: tuple
    weights: Dict[str, float]
    lr: float
    iterations: int
    filters: tuple = (("joints_3d_p", 0.0), ("collision", -10.0))
    select: str = "joints_3d_p"


def _w(joints_2d, joints_3d, trans, collision, finger_reg, shape_reg=0.1) -> Dict[str, float]:
    return dict(joints_2d=joints_2d, joints_3d=joints_3d, trans=trans, shape_reg=shape_reg, collision=collision,
                finger_reg=finger_reg)


OPT_STAGES: tuple = (
    OptStage("trans", ("trans",), _w(100.0, 1000.0, 1000.0, 0.1, 0.0), 1e-4, 300),
    OptStage("orient", ("left_orient", "right_orient"), _w(10.0, 1000.0, 100.0, 1.0, 0.0), 1e-2, 300),
    OptStage("pose", ("left_pose", "right_pose"), _w(10.0, 1000.0, 100.0, 1.0, 100000.0), 1e-2, 300),
    OptStage("shape", ("left_shape", "right_shape"), _w(10.0, 1000.0, 100.0, 1.0, 0.0), 1e-2, 300),
)
SAVE_EVERY = 10  # bash/optimize.sh --save_mid_freq


def finger_regulariser(joints: Tensor) -> Tensor:
    """``_finger_reg_loss`` per sample: for each of the 10 fingers (MCP, PIP, DIP, tip; hands.joints order),
    bones b1, b2, b3 between consecutive joints: ``|b3 . (b1 x b2)| - min(0, (b1 x b2) . (b2 x b3))``, summed.

    joints: (B, 42, 3) right then left, metres. Returns (B,)."""
    index = torch.tensor([hand * 21 + 1 + 4 * finger + k for hand in (0, 1) for finger in range(5) for k in range(4)],
                         device=joints.device)
    fingers = joints[:, index].reshape(joints.shape[0], 10, 4, 3)  # (B, 10, 4, 3)
    bones = fingers[:, :, :3] - fingers[:, :, 1:]  # (B, 10, 3, 3): j[i] - j[i+1]
    cross12 = torch.cross(bones[:, :, 0], bones[:, :, 1], dim=-1)
    coplanar = (bones[:, :, 2] * cross12).sum(-1)  # C1
    cross23 = torch.cross(bones[:, :, 1], bones[:, :, 2], dim=-1)
    same_way = (cross12 * cross23).sum(-1)  # C2
    return (coplanar.abs() - torch.clamp(same_way, max=0.0)).sum(1)


def optimize(model: IHMR, output: TwoHandOutput, *, iterations: Optional[int] = None,
             save_every: int = SAVE_EVERY, stages: tuple = OPT_STAGES) -> TwoHandOutput:
    """Run IHMR-OPT on a batch's predictions (``output`` of ``model``); returns a new TwoHandOutput
    (``extras["opt_collision"]``: (B,) the collision term before and after, ``extras["opt_params"]``).

    iterations: per stage (None: each stage's own, 300). Gradients are enabled inside whatever the caller's
    mode; the model's weights are not touched.
    """
    if save_every < 1:
        raise ValueError(f"save_every={save_every}: expected a positive number of iterations")
    extras = output.extras
    hand_model = model._hand_model_on(output.right_verts.device)
    keypoints_3d = extras["keypoints_3d"].detach()
    keypoints_2d = extras["keypoints_2d"].detach()
    keypoint_trans = keypoints_3d[:, 21] - keypoints_3d[:, 0]  # the reference's init_hand_trans_j
    both = (extras["hand_prob"].detach() > 0.5).all(dim=1).to(keypoints_3d.dtype)  # (B,)
    ones = torch.ones(keypoints_3d.shape[:2], dtype=keypoints_3d.dtype, device=keypoints_3d.device)
    params = extras["params"].detach().clone()

    def evaluate(current: Tensor, weights: Dict[str, float]):
        decoded = decode_params(hand_model, current)
        collision = model.collision(decoded, samples=both > 0) * both  # (B,)
        per_sample = {
            "joints_3d_p": weights["joints_3d"] * joints_3d_error(decoded.joints, keypoints_3d, ones),
            "joints_2d_p": weights["joints_2d"] * joints_2d_error(decoded.joints_2d, keypoints_2d, ones),
            "collision": collision,
        }
        trans = current[:, PARAM_SLICES["trans"]]
        shape_diff = current[:, PARAM_SLICES["right_shape"]] - current[:, PARAM_SLICES["left_shape"]]
        loss = (
            per_sample["joints_2d_p"].mean()
            + per_sample["joints_3d_p"].mean()
            + weights["trans"] * (trans - keypoint_trans).pow(2).mean()
            + weights["collision"] * collision.mean()
            + weights["shape_reg"] * shape_diff.pow(2).mean()
            + weights["finger_reg"] * finger_regulariser(decoded.joints).mean()
        )
        return decoded, per_sample, loss

    with torch.enable_grad():
        start_collision = evaluate(params, OPT_STAGES[0].weights)[1]["collision"].detach()
        for stage in stages:
            steps = stage.iterations if iterations is None else iterations
            groups = {name: params[:, PARAM_SLICES[name]].clone().requires_grad_(True) for name in stage.update}
            optimizer = torch.optim.Adam(list(groups.values()), lr=stage.lr, betas=(0.9, 0.999))
            records_params, records_losses = [], []
            for step in range(steps + 1):
                current = _assemble(params, groups)
                _, per_sample, loss = evaluate(current, stage.weights)
                if step % save_every == 0:
                    records_params.append(current.detach())
                    records_losses.append({name: value.detach() for name, value in per_sample.items()})
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            params = _pick(stage, records_params, records_losses)
        with torch.no_grad():
            decoded, per_sample, _ = evaluate(params, OPT_STAGES[0].weights)
    result = model.prediction(decoded, extras)
    result.extras.update(opt_params=params, opt_collision_before=start_collision, opt_collision=per_sample["collision"])
    return result


def _assemble(params: Tensor, groups: Dict[str, Tensor]) -> Tensor:
    """params (B, 122) with the optimised groups put in (differentiable in them)."""
    return torch.cat([groups[name] if name in groups else params[:, part] for name, part in PARAM_SLICES.items()], 1)


def _pick(stage: OptStage, records_params, records_losses) -> Tensor:
    """``opt_utils.filter_by_losses`` + ``select_params``: per sample, the kept record with the smallest
    selection loss; record 0 (the stage's start) always qualifies. Returns (B, 122)."""
    all_params = torch.stack(records_params)  # (R, B, 122)
    losses = {name: torch.stack([r[name] for r in records_losses]) for name in records_losses[0]}  # (R, B)
    keep = torch.ones_like(losses[stage.select], dtype=torch.bool)
    for name, percent in stage.filters:
        keep &= losses[name] <= losses[name][:1] * (1.0 + (percent + 0.1) / 100.0)
    keep[0] = True
    score = torch.where(keep, losses[stage.select], torch.full_like(losses[stage.select], float("inf")))
    best = score.argmin(dim=0)  # (B,)
    return all_params[best, torch.arange(all_params.shape[1], device=best.device)]
