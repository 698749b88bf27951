"""DIR's regression heads: the initial MANO regressor and one decoupled refinement stage.

Reference: ``models/dir.py`` (``InitRegressor``, ``Joint2BoneFeature``, ``RegressorOffset``) and the manopth
layer it builds (``root_rot_mode='6D'``, ``use_pca=True``, ``ncomps=45``, ``flat_hand_mean=False``,
``robust_rot=True``).

Per hand, DIR regresses 64 numbers (``HAND_PARAMS``): a 6D root rotation (manopth's "robust" 6D, see
:func:`robust_rot6d_to_matrix`), 45 MANO pose-PCA coefficients, 10 shape values and a weak-perspective camera
(scale, tx, ty) mapping the wrist-rooted joints (metres) to normalised image coordinates:
``uv = scale * xyz[:2] + (tx, ty)``. Both hands' relative position is ``offset`` = (right wrist - left wrist)
/ 0.15 m (``OFFSET_UNIT``).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .modules import (
    HAND_EDGES,
    ImageToJointFeature,
    JointGCN,
    JointTransformer,
    bone_feature_map,
    init_conv_bn,
)

__all__ = [
    "HAND_PARAMS",
    "PARAM_SPLIT",
    "OFFSET_UNIT",
    "robust_rot6d_to_matrix",
    "InitRegressor",
    "RefineStage",
]

PARAM_SPLIT = (6, 45, 10, 3)  # root 6D, pose PCA, shape, camera (scale, tx, ty)
HAND_PARAMS = sum(PARAM_SPLIT)  # 64
OFFSET_UNIT = 0.15  # metres: DIR divides every 3D quantity by 0.15 (its "normal" xyz)
SIDES = ("right", "left")


def robust_rot6d_to_matrix(rot6d: Tensor) -> Tensor:
    """manopth's ``robust_compute_rotation_matrix_from_ortho6d``: the two 3-vectors a = rot6d[:3],
    b = rot6d[3:] are normalised, and the orthonormal pair is placed symmetrically about their bisector, so
    neither vector is privileged (unlike Gram-Schmidt, which keeps a's direction).

    rot6d: (..., 6) -> (..., 3, 3) with columns x, y, z = x cross y. This layout (a and b are the first two
    *columns*, stored one after the other) is DIR's, not the project's :mod:`hands.rotation` 6D convention.
    """
    a = F.normalize(rot6d[..., :3], dim=-1, eps=1e-8)
    b = F.normalize(rot6d[..., 3:6], dim=-1, eps=1e-8)
    middle = F.normalize(a + b, dim=-1, eps=1e-8)
    orthogonal = F.normalize(a - b, dim=-1, eps=1e-8)
    x = F.normalize(middle + orthogonal, dim=-1, eps=1e-8)
    y = F.normalize(middle - orthogonal, dim=-1, eps=1e-8)
    z = F.normalize(torch.cross(x, y, dim=-1), dim=-1, eps=1e-8)
    return torch.stack((x, y, z), dim=-1)


class InitRegressor(nn.Module):
    """Both hands' first MANO parameters from the last backbone stage.

    features: (B, C, h, w). Per hand a spatial attention map (3x3 conv C -> C/2, BN, ReLU, 1x1 conv -> 1,
    sigmoid) pools the features (attention-weighted mean); a linear layer gives the hand's 64 parameters.
    The offset is a linear map of the plainly averaged features. Returns {"right": (B, 64), "left": (B, 64),
    "offset": (B, 3)}.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.attention = nn.ModuleDict(
            {
                side: nn.Sequential(
                    nn.Conv2d(channels, channels // 2, 3, padding=1),
                    nn.BatchNorm2d(channels // 2),
                    nn.ReLU(),
                    nn.Conv2d(channels // 2, 1, 1),
                    nn.Sigmoid(),
                )
                for side in SIDES
            }
        )
        self.offset = nn.Linear(channels, 3)
        self.params = nn.ModuleDict({side: nn.Linear(channels, HAND_PARAMS) for side in SIDES})
        init_conv_bn(self, linear_std=0.001)

    def forward(self, features: Tensor) -> Dict[str, Tensor]:
        out = {"offset": self.offset(features.mean(dim=(2, 3)))}
        for side in SIDES:
            attention = self.attention[side](features)  # (B, 1, h, w)
            pooled = (features * attention).sum(dim=(2, 3)) / (attention.sum(dim=(2, 3)) + 1e-8)  # (B, C)
            out[side] = self.params[side](pooled)
        return out


def _point_mlp(in_channels: int, channels: int) -> nn.Sequential:
    """Conv1d in -> C, BatchNorm1d, ReLU, Conv1d C -> C (applied per joint)."""
    return nn.Sequential(
        nn.Conv1d(in_channels, channels, 1), nn.BatchNorm1d(channels), nn.ReLU(), nn.Conv1d(channels, channels, 1)
    )


def _per_joint(mlp: nn.Module, x: Tensor) -> Tensor:
    """(B, J, C_in) -> (B, J, C_out) through a Conv1d stack."""
    return mlp(x.transpose(1, 2)).transpose(1, 2)


class RefineStage(nn.Module):
    """One refinement stage of DIR (``Joint2BoneFeature`` with its ``RegressorOffset``).

    :meth:`regress` -- joint space: image features sampled at the previous stage's 2D joints + an embedding of
    its wrist-rooted 3D joints, a joint-graph GCN per hand, a global position embedding placing the hands at
    -/+ offset / 2, then a transformer over both hands' 42 joint tokens; linear layers map each hand's joint
    features (with the previous parameters, detached) to new parameters, and both hands' features (with the
    previous offset) to a new offset.
    :meth:`paint` -- image space: the joint features, re-embedded, are painted along the bones of the *new* 2D
    skeletons (:func:`recon.archs.dir.modules.bone_feature_map`) and fused into a C-channel map.

    Args: image_channels C (DIR: 256), joint_channels (128), joint_out_channels (64), gcn_layers (4),
    transformer_blocks (3 run in the reference), heads (4), radius: cells around a bone that it paints (DIR: 1 on
    the 16 px map, 2 on the 32 px map).
    """

    def __init__(
        self,
        *,
        image_channels: int,
        joint_channels: int,
        joint_out_channels: int,
        radius: float,
        gcn_layers: int = 4,
        transformer_blocks: int = 3,
        heads: int = 4,
        num_joints: int = 21,
    ) -> None:
        super().__init__()
        self.radius = radius
        self.num_joints = num_joints
        self.image_to_joint = nn.ModuleDict({s: ImageToJointFeature(image_channels, joint_channels) for s in SIDES})
        self.position = nn.ModuleDict({s: _point_mlp(3, joint_channels) for s in SIDES})
        self.gcn = nn.ModuleDict({s: JointGCN(joint_channels, gcn_layers, HAND_EDGES, num_joints) for s in SIDES})
        self.global_position = _point_mlp(3, joint_channels)  # shared by both hands
        self.interaction = JointTransformer(2 * num_joints, joint_channels, joint_out_channels, transformer_blocks, heads)
        self.params = nn.ModuleDict(
            {s: nn.Linear(num_joints * joint_out_channels + HAND_PARAMS, HAND_PARAMS) for s in SIDES}
        )
        self.offset = nn.Linear(2 * num_joints * joint_out_channels + 3, 3)
        self.paint_embedding = _point_mlp(joint_out_channels, joint_out_channels)  # shared by both hands
        bones = len(HAND_EDGES)
        self.fusion = nn.Sequential(
            nn.Conv2d(2 * bones * joint_out_channels, image_channels, 3, padding=1),
            nn.BatchNorm2d(image_channels),
            nn.ReLU(),
            nn.Conv2d(image_channels, image_channels, 1),
        )

    def regress(
        self, feature_map: Tensor, previous: Dict[str, Dict[str, Tensor]], offset: Tensor
    ) -> Tuple[Dict[str, Tensor], Tensor, Dict[str, Tensor]]:
        """feature_map: (B, C, h, w); previous[side]: ``joints`` (B, 21, 3) wrist-rooted metres, ``joints_uv``
        (B, 21, 2), ``params`` (B, 64); offset: (B, 3) previous offset (units of 0.15 m). Everything previous
        is detached here. Returns (new params {side: (B, 64)}, new offset (B, 3), joint features
        {side: (B, 21, joint_out_channels)})."""
        offset = offset.detach()
        features = {}
        for sign, side in ((1.0, "right"), (-1.0, "left")):
            joints = previous[side]["joints"].detach() / OFFSET_UNIT  # (B, 21, 3)
            x = self.image_to_joint[side](feature_map, previous[side]["joints_uv"]) + _per_joint(self.position[side], joints)
            x = self.gcn[side](x)
            features[side] = x + _per_joint(self.global_position, joints + sign * offset[:, None] / 2)
        # The reference orders the tokens left hand first.
        tokens = self.interaction(torch.cat([features["left"], features["right"]], 1))  # (B, 42, C_out)
        joint_features = {"left": tokens[:, : self.num_joints], "right": tokens[:, self.num_joints :]}
        flat = {side: joint_features[side].flatten(1) for side in SIDES}  # (B, 21 * C_out)
        params = {
            side: self.params[side](torch.cat([flat[side], previous[side]["params"].detach()], -1)) for side in SIDES
        }
        new_offset = self.offset(torch.cat([flat["left"], flat["right"], offset], -1))
        return params, new_offset, joint_features

    def paint(self, joints_uv: Dict[str, Tensor], joint_features: Dict[str, Tensor], size: Tuple[int, int]) -> Tensor:
        """joints_uv[side]: (B, 21, 2) the new 2D joints; joint_features[side]: (B, 21, C_out).
        Returns the fused bone map (B, C, h, w) (left hand's bones first, as the reference)."""
        maps = [
            bone_feature_map(joints_uv[side], _per_joint(self.paint_embedding, joint_features[side]), size, self.radius)
            for side in ("left", "right")
        ]
        return self.fusion(torch.cat(maps, 1))
