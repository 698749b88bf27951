"""The smallest honest two-hand regressor, and the worked example of docs/new-regressor.md.

Image -> timm backbone -> pooled features -> MLP -> for each hand the MANO pose (16 joint rotations, 6D) and
shape (10), plus the relative root translation (3). Meshes and joints come from the MANO layer
(:class:`hands.mano.HandModel`), each hand relative to its own wrist. No crops, no 2D heads, no absolute
root: what a reader needs to see how a regressor plugs into ``recon.train`` / ``recon.test`` and what a
stronger model (InterWild) improves on.

Frames and units: camera axes, metres; the 6D rotation convention is :mod:`hands.rotation`'s.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import timm
import torch
from torch import Tensor, nn

from hands.rotation import axis_angle_to_matrix, matrix_to_axis_angle, rot6d_to_matrix
from hands.sample import HandBatch
from recon.losses import masked_l1
from recon.archs.common import HandModelMixin, load_backbone_state, read_weights
from recon.output import TwoHandOutput
from recon.registry import REGRESSORS

__all__ = ["BaselineRegressor"]

NUM_MANO_JOINTS = 16  # root + 15 finger joints
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@REGRESSORS.register("baseline")
class BaselineRegressor(HandModelMixin, nn.Module):
    """Backbone -> both hands' MANO parameters + relative root translation.

    Args (keyword-only):
        backbone: a timm model name (random init; ``load_backbone_weights`` reads pretrained weights).
        backbone_kwargs: extra arguments of ``timm.create_model`` (e.g. ``channels``, ``stem_width`` for
            a narrow ResNet in tests).
        hidden_dim: width of the MLP head.
        mano_dir: folder with the official MANO_RIGHT/LEFT.pkl; None: the procedural hand model.
        weight_verts, weight_joints: L1 weights of the wrist-relative vertices and joints (metres).
        weight_pose: L1 weight on the joint rotation matrices (as InterWild's pose loss).
        weight_shape: L1 weight on the MANO betas.
        weight_rel_root: L1 weight on the relative root translation (metres).
    """

    def __init__(
        self,
        *,
        backbone: str = "resnet18",
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        hidden_dim: int = 512,
        mano_dir: Optional[str] = None,
        weight_verts: float = 10.0,
        weight_joints: float = 10.0,
        weight_pose: float = 1.0,
        weight_shape: float = 0.1,
        weight_rel_root: float = 10.0,
    ) -> None:
        super().__init__()
        self.backbone = timm.create_model(
            backbone, pretrained=False, num_classes=0, global_pool="avg", **(backbone_kwargs or {})
        )
        feature_dim = self.backbone.num_features
        self.per_hand = NUM_MANO_JOINTS * 6 + 10  # 6D rotations + betas
        self.head = nn.Sequential(
            nn.Linear(feature_dim, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, 2 * self.per_hand + 3),
        )
        # Start from the mean hand (identity rotations in the flat_hand_mean=False convention, zero betas)
        # and a zero relative translation: the head learns residuals from there.
        last = self.head[-1]
        nn.init.zeros_(last.weight)
        identity_6d = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
        bias = torch.zeros(2 * self.per_hand + 3)
        for offset in (0, self.per_hand):
            bias[offset : offset + NUM_MANO_JOINTS * 6] = identity_6d.repeat(NUM_MANO_JOINTS)
        with torch.no_grad():
            last.bias.copy_(bias)
        self.register_buffer("image_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        # The MANO layer is kept out of the module tree so that its buffers stay out of the checkpoint (the
        # hand model is chosen at run time by mano_dir, and recorded by fingerprint in the sidecar).
        self._set_hand_model(mano_dir)
        self.weights = dict(
            verts=weight_verts, joints=weight_joints, pose=weight_pose, shape=weight_shape, rel_root=weight_rel_root
        )

    def load_backbone_weights(self, path: str) -> None:
        """Load pretrained backbone weights (a .safetensors file or a torch state dict; the classifier's keys,
        absent here, are ignored). Raises ValueError when the file does not fit the backbone."""
        load_backbone_state(self.backbone, read_weights(path), path, "backbone")

    def forward(self, batch: HandBatch) -> TwoHandOutput:
        """batch.image: (B, 3, H, W) RGB in [0, 1] -> TwoHandOutput (wrist-relative meshes, metres)."""
        images = (batch.image - self.image_mean) / self.image_std
        params = self.head(self.backbone(images))  # (B, 2 * per_hand + 3)
        hand_model = self._hand_model_on(images.device)
        result = {}
        for index, side in enumerate(("right", "left")):
            chunk = params[:, index * self.per_hand : (index + 1) * self.per_hand]
            rot6d = chunk[:, : NUM_MANO_JOINTS * 6].reshape(-1, NUM_MANO_JOINTS, 6)  # (B, 16, 6)
            rotmat = rot6d_to_matrix(rot6d)  # (B, 16, 3, 3)
            pose = matrix_to_axis_angle(rotmat).reshape(-1, NUM_MANO_JOINTS * 3)  # (B, 48)
            shape = chunk[:, NUM_MANO_JOINTS * 6 :]  # (B, 10)
            mano = hand_model(side, pose, shape)
            wrist = mano.joints[:, :1]  # (B, 1, 3): joint 0, the regressed wrist
            result[f"{side}_verts"] = mano.verts - wrist
            result[f"{side}_joints"] = mano.joints - wrist
            result[f"{side}_mano_pose"] = pose
            result[f"{side}_mano_shape"] = shape
            result[f"{side}_rotmat"] = rotmat
        return TwoHandOutput(
            right_verts=result["right_verts"],
            left_verts=result["left_verts"],
            right_joints=result["right_joints"],
            left_joints=result["left_joints"],
            rel_root=params[:, -3:],
            right_mano_pose=result["right_mano_pose"],
            left_mano_pose=result["left_mano_pose"],
            right_mano_shape=result["right_mano_shape"],
            left_mano_shape=result["left_mano_shape"],
            extras={"right_rotmat": result["right_rotmat"], "left_rotmat": result["left_rotmat"]},
        )

    def losses(self, output: TwoHandOutput, batch: HandBatch) -> dict[str, Tensor]:
        """Weighted L1 terms, each masked by the labels' validity; keys ``verts``, ``joints``, ``pose``,
        ``shape``, ``rel_root``. Ground-truth meshes are aligned at their own regressed wrist, joints at
        joint 0, as the metrics do."""
        hand_model = self._hand_model_on(output.right_verts.device)
        terms = {name: output.rel_root.new_zeros(()) for name in ("verts", "joints", "pose", "shape")}
        for side in ("right", "left"):
            gt = batch.hand(side)
            mano_valid = gt.valid & gt.mano_valid  # (B,)
            wrist_row = hand_model.j_regressor_for(side)[0].to(gt.verts_cam.dtype)  # (778,)
            gt_wrist = torch.einsum("v,bvc->bc", wrist_row, gt.verts_cam)  # (B, 3)
            gt_verts = gt.verts_cam - gt_wrist[:, None]
            pred_verts, pred_joints = output.side(side)
            terms["verts"] = terms["verts"] + masked_l1(pred_verts, gt_verts, mano_valid[:, None, None])
            joints_valid = gt.valid[:, None] & gt.joints_valid & gt.joints_valid[:, :1] & batch.joints_3d[:, None]  # (B, 21)
            gt_joints = gt.joints_cam - gt.joints_cam[:, :1]
            terms["joints"] = terms["joints"] + masked_l1(pred_joints, gt_joints, joints_valid[..., None])
            gt_rotmat = axis_angle_to_matrix(gt.mano_pose.reshape(-1, NUM_MANO_JOINTS, 3))  # (B, 16, 3, 3)
            terms["pose"] = terms["pose"] + masked_l1(
                output.extras[f"{side}_rotmat"], gt_rotmat, mano_valid[:, None, None, None]
            )
            pred_shape = getattr(output, f"{side}_mano_shape")
            terms["shape"] = terms["shape"] + masked_l1(pred_shape, gt.mano_shape, mano_valid[:, None])
        terms["rel_root"] = masked_l1(output.rel_root, batch.rel_root, batch.rel_root_valid[:, None])
        return {name: self.weights[name] * value for name, value in terms.items()}
