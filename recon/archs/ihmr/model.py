"""IHMR (Rong et al., "Monocular 3D Reconstruction of Interacting Hands via Collision-Aware Factorized
Refinements", 3DV 2021; penincillin/IHMR, MIT): the baseline regressor and the factorized refinement (MLP)
stages, as one regressor of ``recon.train`` / ``recon.test``.

Read against the reference (``src/models/networks.py``, ``baseline_model.py``, ``mlp_model.py``,
``loss_utils.py``, ``strategies/mlp_default.py``, ``options/*.py``):

1. **IHMR-Baseline** (``InterHandEncoder``): ResNet -> 1024-d feature (``fc1``) -> ReLU, Linear(1024, 1024),
   ReLU -> HMR-style iterative error feedback, 3 iterations of ``params += Linear(1024 + 122, 122)([feature,
   params])`` from the mean parameters. The 122 parameters: weak-perspective camera (scale, tx, ty; mean
   scale 5), right and left MANO pose (48 axis-angle each, root first), right and left betas (10 each), and
   the left wrist's translation from the right wrist (3). A hand-type classifier (Linear(1024, 2), sigmoid:
   right present, left present).
2. **IHMR-MLP** (``InterHandSubNetwork`` x 6): each stage is an MLP (1024 + 122 -> 512 -> 256 -> 128 -> k,
   ReLU, xavier init with gain 0.01) reading the feature and the current parameters and adding a residual to
   one factor: the translation, the left root rotation, the right root rotation, both finger poses, both
   shapes, the camera (:data:`STAGES`). After each stage a sample keeps the update only when it lowers both
   the 3D-joint deviation from the keypoint prediction and the collision term (the camera stage: the 2D
   deviation), as ``MLPModel.select_better_params``.
3. **Collision term**: :mod:`recon.archs.ihmr.collision` (the reference's CUDA SDF grid, computed exactly
   at the vertices in torch).
4. **Keypoint branch**: the reference's selection and its test-time optimisation (IHMR-OPT,
   :mod:`recon.archs.ihmr.optimize`) compare against 2D/3D joints *predicted by another network*, read from
   its prediction files (``pred_joints_2d`` / ``pred_joints_3d``); that network is not part of the
   repository. Here a linear keypoint head on the same feature predicts them (docs/fidelity.md).

Training follows ``train_baseline.sh`` then ``train_mlp.sh`` in one run: for ``baseline_epochs`` epochs the
baseline (and the keypoint head) learn; then each refinement stage learns for its own epochs
(``stage_epochs``, the reference's 2, 2, 2, 2, 2, 5) with everything before it fixed. A part that does not
learn in an epoch keeps its loss terms at weight 0 (so every parameter has a gradient, as DDP needs).

Frames and units: camera axes, metres. Inside the model both hands live in the reference's frame: the right
hand's wrist at the origin, the left hand's wrist at the predicted translation (``rel_root``). The
2D joints are the input crop's pixels normalised to [-1, 1] (x: ``2 u / W - 1``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hands.rotation import axis_angle_to_matrix
from hands.sample import HandBatch
from recon.archs.common import HandModelMixin, load_backbone_state, read_weights
from recon.archs.ihmr.collision import close_boundary, collision_loss
from recon.output import TwoHandOutput
from recon.registry import REGRESSORS

__all__ = ["IHMR", "STAGES", "Stage", "PARAM_SLICES", "NUM_PARAMS", "decode_params"]

FEATURE_DIM = 1024
NUM_JOINTS = 42  # right 21 then left 21 (hands.joints order)

# The 122 parameters, in the reference's order: [cam, right pose, left pose, right betas, left betas, trans].
PARAM_SLICES: Dict[str, slice] = {
    "cam": slice(0, 3),
    "right_orient": slice(3, 6),
    "right_pose": slice(6, 51),
    "left_orient": slice(51, 54),
    "left_pose": slice(54, 99),
    "right_shape": slice(99, 109),
    "left_shape": slice(109, 119),
    "trans": slice(119, 122),
}
NUM_PARAMS = 122
MEAN_CAM_SCALE = 5.0  # the reference's mean_params[0, 0]


@dataclass(frozen=True)
class Stage:
    """One factorized refinement stage (a dict of ``strategies/mlp_default.py``).

    update: the parameter groups the stage's MLP changes (residuals, in this order).
    weights: its training loss weights. epochs: its training epochs.
    filters: (per-sample loss, percent): an update is kept only where the new loss < old x (1 + percent/100).
    select: the per-sample loss that must not grow (new <= old).
    """

    name: str
    update: tuple
    weights: Dict[str, float]
    epochs: int
    filters: tuple
    select: str


def _weights(**overrides: float) -> Dict[str, float]:
    base = dict(joints_2d=10.0, joints_3d=10.0, pose=10.0, shape=10.0, trans=10.0, shape_reg=0.1, collision=1.0)
    base.update(overrides)
    return base


_COLLISION_FILTERS = (("joints_3d_p", 0.0), ("collision", 0.0))
# strategies/mlp_default.py (shape_residual_loss has weight 0 in every stage and is left out).
STAGES: tuple = (
    Stage("trans", ("trans",), _weights(joints_3d=1000.0, trans=1000.0), 2, _COLLISION_FILTERS, "collision"),
    Stage("left_orient", ("left_orient",), _weights(), 2, _COLLISION_FILTERS, "collision"),
    Stage("right_orient", ("right_orient",), _weights(), 2, _COLLISION_FILTERS, "collision"),
    Stage("pose", ("left_pose", "right_pose"), _weights(), 2, _COLLISION_FILTERS, "collision"),
    Stage("shape", ("left_shape", "right_shape"), _weights(), 2, _COLLISION_FILTERS, "collision"),
    Stage("cam", ("cam",), _weights(), 5, (("joints_2d_p", 0.0),), "joints_2d_p"),
)
# MLPModel.set_default_loss_weights: the weights of the per-sample losses that the selection compares.
SELECTION_WEIGHTS = _weights()


def mean_params(batch: int = 1) -> Tensor:
    """(batch, 122) the starting point of the iterative regression: camera scale 5, zero rotations and finger
    poses (MANO's mean hand, flat_hand_mean=False), zero betas, zero translation."""
    params = torch.zeros(batch, NUM_PARAMS)
    params[:, 0] = MEAN_CAM_SCALE
    return params


def weak_perspective(points: Tensor, cam: Tensor) -> Tensor:
    """The reference's ``batch_orthogonal_project``: points (B, N, 3), cam (B, 3) = (s, tx, ty) ->
    (B, N, 2) = s * (xy + t), in the crop's [-1, 1] coordinates."""
    return cam[:, None, :1] * (points[..., :2] + cam[:, None, 1:])


@dataclass
class Decoded:
    """MANO meshes of a parameter vector in the right-wrist frame (see the module docstring).

    right_verts, left_verts (B, 778, 3); joints (B, 42, 3): right then left; joints_2d (B, 42, 2) in
    [-1, 1]; right_wrist, left_wrist (B, 3): each hand's joint 0 in its MANO frame.
    """

    params: Tensor
    right_verts: Tensor
    left_verts: Tensor
    joints: Tensor
    joints_2d: Tensor
    right_wrist: Tensor
    left_wrist: Tensor
    right_verts_mano: Tensor
    left_verts_mano: Tensor
    right_joints_mano: Tensor
    left_joints_mano: Tensor


def decode_params(hand_model, params: Tensor) -> Decoded:
    """params (B, 122) -> :class:`Decoded` (MANO through ``hand_model``, a :class:`hands.mano.HandModel`)."""
    s = PARAM_SLICES
    right = hand_model("right", params[:, 3:51], params[:, s["right_shape"]])
    left = hand_model("left", params[:, 51:99], params[:, s["left_shape"]])
    right_wrist, left_wrist = right.joints[:, 0], left.joints[:, 0]  # (B, 3)
    trans = params[:, s["trans"]][:, None]  # (B, 1, 3)
    right_verts = right.verts - right_wrist[:, None]
    left_verts = left.verts - left_wrist[:, None] + trans
    joints = torch.cat([right.joints - right_wrist[:, None], left.joints - left_wrist[:, None] + trans], 1)
    return Decoded(
        params=params,
        right_verts=right_verts,
        left_verts=left_verts,
        joints=joints,
        joints_2d=weak_perspective(joints, params[:, s["cam"]]),
        right_wrist=right_wrist,
        left_wrist=left_wrist,
        right_verts_mano=right.verts,
        left_verts_mano=left.verts,
        right_joints_mano=right.joints,
        left_joints_mano=left.joints,
    )


# -- per-sample losses (the reference's LossUtil, returning (B,) before the batch mean) ----------------------


def joints_2d_error(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """``_joints_2d_loss``: mean |pred - target| x weight over (42, 2). pred/target (B, 42, 2), weight (B, 42)."""
    return ((pred - target).abs() * weight[..., None]).flatten(1).mean(1)


def _root_aligned(joints: Tensor, has_right: Tensor) -> Tensor:
    """``__align_by_root``: subtract the right wrist (joint 0) where it is valid, else the left (joint 21)."""
    root = torch.where(has_right[:, None], joints[:, 0], joints[:, 21])  # (B, 3)
    return joints - root[:, None]


def joints_3d_error(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """``_joints_3d_loss``: both root-aligned (right wrist when valid, else left), mean squared error x
    weight over (42, 3). pred/target (B, 42, 3) metres, weight (B, 42). Returns (B,)."""
    has_right = weight[:, 0] > 0.5
    diff = _root_aligned(pred, has_right) - _root_aligned(target, has_right)
    return (diff.pow(2) * weight[..., None]).flatten(1).mean(1)


def finger_pose_error(pred_pose: Tensor, gt_pose: Tensor) -> Tensor:
    """``_mano_pose_loss`` without the root (use_hand_rotation off): mean squared error of the 15 finger
    joints' rotation matrices. pred_pose/gt_pose (B, 45) axis-angle. Returns (B,)."""
    pred = axis_angle_to_matrix(pred_pose.reshape(-1, 15, 3))
    gt = axis_angle_to_matrix(gt_pose.reshape(-1, 15, 3))
    return (pred - gt).pow(2).flatten(1).mean(1)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of values (B,) over the samples where mask (B,) holds; 0 (with a gradient path) when none does."""
    weight = mask.to(values.dtype)
    return (values * weight).sum() / weight.sum().clamp(min=1.0)


@dataclass
class Targets:
    """The labels of a batch in the model's terms (see :meth:`IHMR.targets`)."""

    joints_3d: Tensor  # (B, 42, 3) camera frame
    joints_3d_weight: Tensor  # (B, 42)
    joints_2d: Tensor  # (B, 42, 2) in [-1, 1]
    joints_2d_weight: Tensor  # (B, 42)
    pose: Dict[str, Tensor]  # side -> (B, 48)
    shape: Dict[str, Tensor]  # side -> (B, 10)
    mano_valid: Dict[str, Tensor]  # side -> (B,) bool
    trans: Tensor  # (B, 3)
    trans_valid: Tensor  # (B,) bool
    hand_type: Tensor  # (B, 2) float: right present, left present
    both: Tensor  # (B,) bool


class RefineMLP(nn.Module):
    """``InterHandSubNetwork``: (B, 1024 + 122) -> (B, out_dim) residuals; xavier init, gain 0.01."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        layers = [nn.Linear(in_dim, 512), nn.Linear(512, 256), nn.Linear(256, 128), nn.Linear(128, out_dim)]
        for layer in layers:
            nn.init.xavier_uniform_(layer.weight, gain=0.01)
        self.net = nn.Sequential(layers[0], nn.ReLU(), layers[1], nn.ReLU(), layers[2], nn.ReLU(), layers[3])

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@REGRESSORS.register("ihmr")
class IHMR(HandModelMixin, nn.Module):
    """IHMR: the baseline regressor, the keypoint head and the six factorized refinement stages.

    Args (keyword-only):
        backbone: a timm model name (the reference: ResNet-50, ImageNet-pretrained; random init here,
            ``load_backbone_weights`` reads pretrained weights).
        backbone_kwargs: extra ``timm.create_model`` arguments (a narrow ResNet in tests).
        iterations: iterative-error-feedback iterations of the baseline regressor (3).
        refine: run the factorized refinement stages (False: IHMR-Baseline alone).
        baseline_epochs: epochs that train the baseline before the first refinement stage (20).
        stage_epochs: training epochs of each refinement stage (2, 2, 2, 2, 2, 5).
        weight_*: the baseline's loss weights (``train_options.py`` defaults, as ``train_baseline.sh``):
            joints_2d 10 (L1, [-1, 1] units), joints_3d 10 (squared, metres), pose 10 (squared rotation
            matrices), shape 10 (L1), trans 10 (squared, metres), shape_reg 0.1 (squared right - left
            betas), hand_type 1 (binary cross-entropy). weight_keypoints: the keypoint head's L1 (ours).
        use_collision_loss: add the collision term to the baseline's loss (the reference's flag; off in
            ``train_baseline.sh``). weight_collision: its weight (1).
        sdf_robustifier: the reference's robustifier of the collision term in training (None: off).
        mano_dir: folder with the official MANO_RIGHT/LEFT.pkl; None: the procedural hand model.
    """

    def __init__(
        self,
        *,
        backbone: str = "resnet50",
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        iterations: int = 3,
        refine: bool = True,
        baseline_epochs: int = 20,
        stage_epochs: List[int] = [2, 2, 2, 2, 2, 5],  # noqa: B006 (a config schema default, never mutated)
        weight_joints_2d: float = 10.0,
        weight_joints_3d: float = 10.0,
        weight_pose: float = 10.0,
        weight_shape: float = 10.0,
        weight_trans: float = 10.0,
        weight_shape_reg: float = 0.1,
        weight_hand_type: float = 1.0,
        weight_keypoints: float = 10.0,
        use_collision_loss: bool = False,
        weight_collision: float = 1.0,
        sdf_robustifier: Optional[float] = None,
        mano_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        if iterations < 1:
            raise ValueError(f"iterations={iterations}: expected at least 1")
        if len(stage_epochs) != len(STAGES) or min(stage_epochs) < 0:
            raise ValueError(
                f"stage_epochs={list(stage_epochs)}: expected {len(STAGES)} non-negative epoch counts "
                f"(stages {', '.join(s.name for s in STAGES)})"
            )
        if sdf_robustifier is not None and sdf_robustifier <= 0:
            raise ValueError(f"sdf_robustifier={sdf_robustifier}: expected a positive number or None")
        self.backbone = timm.create_model(
            backbone, pretrained=False, num_classes=0, global_pool="avg", **(backbone_kwargs or {})
        )
        self.fc1 = nn.Linear(self.backbone.num_features, FEATURE_DIM)  # the reference's ResNet ends in fc1 -> 1024
        self.feat_encoder = nn.Sequential(nn.ReLU(), nn.Linear(FEATURE_DIM, FEATURE_DIM), nn.ReLU())
        self.regressor = nn.Linear(FEATURE_DIM + NUM_PARAMS, NUM_PARAMS)
        self.hand_classifier = nn.Linear(FEATURE_DIM, 2)
        self.keypoint_head = nn.Linear(FEATURE_DIM, NUM_JOINTS * 5)  # 3D (42 x 3) then 2D (42 x 2)
        nn.init.zeros_(self.keypoint_head.weight)
        nn.init.zeros_(self.keypoint_head.bias)
        self.refiners = nn.ModuleList(
            RefineMLP(FEATURE_DIM + NUM_PARAMS, sum(_group_dim(g) for g in stage.update)) for stage in STAGES
        ) if refine else nn.ModuleList()
        self.register_buffer("mean_params", mean_params(), persistent=False)
        self.register_buffer("image_mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1), persistent=False)
        self._set_hand_model(mano_dir)
        self._caps: Dict[str, Tensor] = {}
        self.iterations = iterations
        self.refine = refine
        self.baseline_epochs = baseline_epochs
        self.stage_epochs = list(stage_epochs)
        self.weights = dict(
            joints_2d=weight_joints_2d, joints_3d=weight_joints_3d, pose=weight_pose, shape=weight_shape,
            trans=weight_trans, shape_reg=weight_shape_reg, hand_type=weight_hand_type,
            keypoints=weight_keypoints, collision=weight_collision,
        )
        self.use_collision_loss = use_collision_loss
        self.sdf_robustifier = sdf_robustifier
        self.epoch = 0

    # -- training phases ---------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Called by recon.train at each epoch: chooses the part that learns (:meth:`active_stage`)."""
        self.epoch = int(epoch)

    def active_stage(self) -> int:
        """-1: the baseline learns (the first ``baseline_epochs``); k: refinement stage k learns; with
        ``refine`` off, or after the last stage's epochs, the baseline (-1) or the last stage keeps learning."""
        if not self.refine or self.epoch < self.baseline_epochs:
            return -1
        end = self.baseline_epochs
        for index, epochs in enumerate(self.stage_epochs):
            end += epochs
            if self.epoch < end:
                return index
        return max(i for i, e in enumerate(self.stage_epochs) if e > 0) if any(self.stage_epochs) else -1

    def total_epochs(self) -> int:
        return self.baseline_epochs + (sum(self.stage_epochs) if self.refine else 0)

    # -- pieces ------------------------------------------------------------------------------------------

    def load_backbone_weights(self, path: str) -> None:
        """Load pretrained backbone weights (a .safetensors file or a torch state dict; the classifier's keys
        are ignored). Raises ValueError when the file does not fit the backbone."""
        load_backbone_state(self.backbone, read_weights(path), path, "backbone")

    def caps(self, side: str, faces: Tensor) -> Tensor:
        """The wrist cap of ``side``'s mesh (:func:`collision.close_boundary`), cached per device."""
        key = f"{side}:{faces.device}"
        if key not in self._caps:
            self._caps[key] = close_boundary(faces)
        return self._caps[key]

    def collision(self, decoded: Decoded, *, robustifier: Optional[float] = None,
                  samples: Optional[Tensor] = None) -> Tensor:
        """(B,) the collision term of decoded meshes (right-wrist frame), unweighted by hand presence;
        ``samples`` (B,) bool: measure only these (0 for the others)."""
        hand_model = self._hand_model_on(decoded.right_verts.device)
        faces_right, faces_left = hand_model.faces_for("right"), hand_model.faces_for("left")
        loss, _ = collision_loss(
            decoded.right_verts, decoded.left_verts, faces_right, faces_left,
            caps_right=self.caps("right", faces_right), caps_left=self.caps("left", faces_left),
            robustifier=robustifier, samples=samples,
        )
        return loss

    def features(self, image: Tensor) -> Tensor:
        """image (B, 3, H, W) in [0, 1] -> (B, 1024) the feature every head reads."""
        return self.feat_encoder(self.fc1(self.backbone((image - self.image_mean) / self.image_std)))

    def regress(self, feature: Tensor) -> Tensor:
        """Iterative error feedback: (B, 1024) -> (B, 122) parameters."""
        params = self.mean_params.expand(feature.shape[0], -1)
        for _ in range(self.iterations):
            params = params + self.regressor(torch.cat([feature, params], 1))
        return params

    def keypoints(self, feature: Tensor) -> tuple[Tensor, Tensor]:
        """The keypoint head: (B, 1024) -> 3D joints (B, 42, 3) in the right-wrist frame (metres) and 2D
        joints (B, 42, 2) in [-1, 1]."""
        out = self.keypoint_head(feature)
        return out[:, : NUM_JOINTS * 3].reshape(-1, NUM_JOINTS, 3), out[:, NUM_JOINTS * 3 :].reshape(-1, NUM_JOINTS, 2)

    def selection_losses(self, decoded: Decoded, keypoints_3d: Tensor, keypoints_2d: Tensor, collision: Tensor,
                         both: Tensor) -> Dict[str, Tensor]:
        """The per-sample losses the stages compare (B,) each: ``joints_3d_p`` / ``joints_2d_p`` (the
        deviation from the keypoint prediction, default weights) and ``collision`` (0 unless both hands)."""
        ones = torch.ones(keypoints_3d.shape[:2], dtype=keypoints_3d.dtype, device=keypoints_3d.device)
        return {
            "joints_3d_p": SELECTION_WEIGHTS["joints_3d"] * joints_3d_error(decoded.joints, keypoints_3d, ones),
            "joints_2d_p": SELECTION_WEIGHTS["joints_2d"] * joints_2d_error(decoded.joints_2d, keypoints_2d, ones),
            "collision": SELECTION_WEIGHTS["collision"] * collision * both.to(collision.dtype),
        }

    # -- forward -----------------------------------------------------------------------------------------

    def forward(self, batch: HandBatch) -> TwoHandOutput:
        """batch.image: (B, 3, H, W) RGB in [0, 1] -> TwoHandOutput (wrist-relative meshes, metres).

        In eval mode every refinement stage runs, each followed by the per-sample selection; in training the
        stages up to the one that learns (:meth:`active_stage`) run. ``extras`` hold what the losses and
        IHMR-OPT read (``params``, ``baseline``, ``stages``, ``keypoints_3d``, ``keypoints_2d``,
        ``hand_prob``, ``feature``)."""
        hand_model = self._hand_model_on(batch.image.device)
        feature = self.features(batch.image)
        # heads in float32 (under mixed precision the linear layers return bf16/fp16; MANO, the collision term
        # and the losses work in full precision)
        hand_prob = torch.sigmoid(self.hand_classifier(feature)).float()  # (B, 2)
        keypoints_3d, keypoints_2d = (k.float() for k in self.keypoints(feature))
        params = self.regress(feature).float()
        decoded = decode_params(hand_model, params)
        baseline = decoded
        stages: List[Dict[str, Any]] = []
        if self.refine:
            last = len(STAGES) - 1 if not self.training else self.active_stage()
            both = (hand_prob.detach() > 0.5).all(dim=1)
            labelled_both = None
            if self.training and batch.right is not None:  # the learning stage's loss needs every such sample
                labelled_both = batch.right.valid & batch.left.valid
            kp3, kp2 = keypoints_3d.detach(), keypoints_2d.detach()
            previous = None
            if last >= 0:
                collision = self.collision(_detached(decoded), samples=both)
                previous = self.selection_losses(_detached(decoded), kp3, kp2, collision, both)
            current = params.detach()
            for index, (stage, refiner) in enumerate(zip(STAGES, self.refiners)):
                residual = refiner(torch.cat([feature.detach().to(current.dtype), current], 1)).float()
                if index > last:  # not run yet: kept in the graph at weight 0 (DDP wants every parameter used)
                    stages.append({"stage": stage, "residual": residual})
                    continue
                updated = _apply_residual(current, residual, stage.update)
                new = decode_params(hand_model, updated)
                zero = torch.zeros_like(previous["collision"])
                losses = self.selection_losses(_detached(new), kp3, kp2, zero, both)
                if _uses_collision(stage):
                    # Only samples the stage can accept need the term (a lower joint deviation, a collision to
                    # lower); the others are rejected whatever it is. The learning stage's loss needs all.
                    need = both & (losses["joints_3d_p"] < previous["joints_3d_p"]) & (previous["collision"] > 0)
                    if index == last and labelled_both is not None:
                        need = need | labelled_both
                    collision = self.collision(new, samples=need)
                else:  # the camera does not move the meshes
                    collision = previous["collision"]
                losses["collision"] = SELECTION_WEIGHTS["collision"] * collision.detach() * both.to(collision.dtype)
                keep = _accepted(stage, losses, previous)  # (B,) bool
                stages.append({"stage": stage, "residual": residual, "decoded": new, "collision": collision, "keep": keep})
                current = torch.where(keep[:, None], updated, current).detach()
                previous = {name: torch.where(keep, losses[name], previous[name]) for name in losses}
            if last >= 0:  # training: the learning stage's own prediction (its losses read it); eval: the selection
                decoded = stages[last]["decoded"] if self.training else decode_params(hand_model, current)
        extras = dict(
            baseline=baseline, stages=stages, keypoints_3d=keypoints_3d, keypoints_2d=keypoints_2d,
            hand_prob=hand_prob, feature=feature, image_size=tuple(batch.image.shape[-2:]),
        )
        return self.prediction(decoded, extras)

    def prediction(self, decoded: Decoded, extras: Dict[str, Any]) -> TwoHandOutput:
        """The TwoHandOutput of decoded parameters (wrist-relative meshes; ``rel_root`` = the translation;
        2D joints in input pixels); ``extras`` are carried over, with ``params`` and ``decoded`` set."""
        height, width = extras["image_size"]
        unit = decoded.joints_2d + 1.0  # (B, 42, 2) in [0, 2]
        joints_img = torch.stack([unit[..., 0] * (width / 2.0), unit[..., 1] * (height / 2.0)], -1)  # input pixels
        s = PARAM_SLICES
        params = decoded.params
        return TwoHandOutput(
            right_verts=decoded.right_verts,
            left_verts=decoded.left_verts - params[:, None, s["trans"]],
            right_joints=decoded.joints[:, :21],
            left_joints=decoded.joints[:, 21:] - params[:, None, s["trans"]],
            rel_root=params[:, s["trans"]],
            right_joints_img=joints_img[:, :21],
            left_joints_img=joints_img[:, 21:],
            right_mano_pose=params[:, 3:51],
            left_mano_pose=params[:, 51:99],
            right_mano_shape=params[:, s["right_shape"]],
            left_mano_shape=params[:, s["left_shape"]],
            extras={**extras, "params": params, "decoded": decoded},
        )

    def protocol_evaluator(self):
        """IHMR's own evaluation protocol (:mod:`recon.archs.ihmr.protocol`: per-hand wrist-aligned MPJPE, the
        interacting MPJPE after per-axis scale and translation, the collision depth), which ``recon.evaluate``
        reports beside the InterWild-convention metrics as ``IHMR_*``."""
        from recon.archs.ihmr.protocol import IHMRProtocol

        return IHMRProtocol(faces_right=self.hand_model.faces_for("right"), faces_left=self.hand_model.faces_for("left"))

    def test_time_optimize(self, batch: HandBatch, output: TwoHandOutput, *, iterations: Optional[int] = None) -> TwoHandOutput:
        """IHMR-OPT on this model's predictions for ``batch`` (:func:`recon.archs.ihmr.optimize.optimize`);
        ``recon.test --optimize`` calls it. iterations: per stage (None: the reference's 300)."""
        from recon.archs.ihmr.optimize import optimize

        return optimize(self, output, iterations=iterations)

    # -- losses ------------------------------------------------------------------------------------------

    def targets(self, batch: HandBatch) -> Targets:
        """The batch's labels in the model's terms: 42 joints (right, left) in camera space with their
        validity, 2D joints normalised to [-1, 1] (valid and inside the crop), MANO fits, the translation,
        hand presence."""
        height, width = batch.image.shape[-2:]
        joints_3d, weight_3d, joints_2d, weight_2d = [], [], [], []
        pose, shape, mano_valid = {}, {}, {}
        for side in ("right", "left"):
            gt = batch.hand(side)
            joints_3d.append(gt.joints_cam)
            weight_3d.append(gt.valid[:, None] & gt.joints_valid)
            u, v = gt.joints_img[..., 0], gt.joints_img[..., 1]  # (B, 21) pixels
            inside = (u >= 0) & (u <= width) & (v >= 0) & (v <= height)
            joints_2d.append(torch.stack([2.0 * u / width - 1.0, 2.0 * v / height - 1.0], -1))
            weight_2d.append(gt.valid[:, None] & gt.joints_trunc & inside)  # 2D labels: joints_trunc
            pose[side], shape[side] = gt.mano_pose, gt.mano_shape
            mano_valid[side] = gt.valid & gt.mano_valid
        hand_type = torch.stack([batch.right.valid, batch.left.valid], 1).float()
        return Targets(
            joints_3d=torch.cat(joints_3d, 1),
            joints_3d_weight=torch.cat(weight_3d, 1).float(),
            joints_2d=torch.cat(joints_2d, 1),
            joints_2d_weight=torch.cat(weight_2d, 1).float(),
            pose=pose,
            shape=shape,
            mano_valid=mano_valid,
            trans=batch.rel_root,
            trans_valid=batch.rel_root_valid.bool(),
            hand_type=hand_type,
            both=batch.right.valid & batch.left.valid,
        )

    def mesh_terms(self, decoded: Decoded, targets: Targets, weights: Dict[str, float],
                   mask: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """The reference's parameter and joint terms of one prediction (``backward_E`` / ``compute_loss``),
        weighted, each a scalar; ``mask`` (B,) limits them to some samples (refinement: both hands)."""
        params = decoded.params
        batch = params.shape[0]
        every = torch.ones(batch, dtype=torch.bool, device=params.device) if mask is None else mask
        s = PARAM_SLICES
        j2d = joints_2d_error(decoded.joints_2d, targets.joints_2d, targets.joints_2d_weight)
        j3d = joints_3d_error(decoded.joints, targets.joints_3d, targets.joints_3d_weight)
        pose = params.new_zeros(())
        shape = params.new_zeros(())
        for side in ("right", "left"):
            fit = every & targets.mano_valid[side]
            pose = pose + _masked_mean(finger_pose_error(params[:, s[f"{side}_pose"]], targets.pose[side][:, 3:]), fit)
            shape = shape + _masked_mean(
                (params[:, s[f"{side}_shape"]] - targets.shape[side]).abs().mean(1), fit
            )
        trans = _masked_mean((params[:, s["trans"]] - targets.trans).pow(2).mean(1), every & targets.trans_valid)
        shape_reg = _masked_mean((params[:, s["right_shape"]] - params[:, s["left_shape"]]).pow(2).mean(1), every)
        return {
            "joints_2d": weights["joints_2d"] * _masked_mean(j2d, every),
            "joints_3d": weights["joints_3d"] * _masked_mean(j3d, every),
            "pose": weights["pose"] * pose,
            "shape": weights["shape"] * shape,
            "trans": weights["trans"] * trans,
            "shape_reg": weights["shape_reg"] * shape_reg,
        }

    def losses(self, output: TwoHandOutput, batch: HandBatch) -> dict[str, Tensor]:
        """Weighted terms. Keys: the baseline's ``joints_2d``, ``joints_3d``, ``pose``, ``shape``, ``trans``,
        ``shape_reg``, ``hand_type``, ``keypoints`` (and ``collision`` with use_collision_loss), and one
        ``refine_<stage>`` per refinement stage (its own terms, collision included, on interacting samples).
        The part that does not learn this epoch has weight 0 (:meth:`active_stage`)."""
        extras = output.extras
        targets = self.targets(batch)
        active = self.active_stage() if self.training else -1
        baseline_on = 1.0 if active < 0 else 0.0
        terms = self.mesh_terms(extras["baseline"], targets, self.weights)
        bce = F.binary_cross_entropy(extras["hand_prob"], targets.hand_type, reduction="none").mean(1)
        terms["hand_type"] = self.weights["hand_type"] * bce.mean()
        kp3 = joints_3d_frame(targets)
        kp_weight = targets.joints_3d_weight
        kp_3d = ((extras["keypoints_3d"] - kp3).abs() * kp_weight[..., None]).sum() / (3 * kp_weight.sum()).clamp(min=1.0)
        kp_2d_weight = targets.joints_2d_weight
        kp_2d = ((extras["keypoints_2d"] - targets.joints_2d).abs() * kp_2d_weight[..., None]).sum() / (
            2 * kp_2d_weight.sum()
        ).clamp(min=1.0)
        terms["keypoints"] = self.weights["keypoints"] * (kp_3d + kp_2d)
        if self.use_collision_loss:
            collision = self.collision(extras["baseline"], robustifier=self.sdf_robustifier)
            terms["collision"] = self.weights["collision"] * _masked_mean(collision, targets.both)
        terms = {name: value * baseline_on for name, value in terms.items()}
        for index, entry in enumerate(extras["stages"]):
            stage = entry["stage"]
            name = f"refine_{stage.name}"
            if index != active or "decoded" not in entry:
                terms[name] = entry["residual"].sum() * 0.0  # keeps the stage's MLP in the graph
                continue
            stage_terms = self.mesh_terms(entry["decoded"], targets, stage.weights, mask=targets.both)
            collision = entry["collision"]
            if self.sdf_robustifier:
                collision = self.collision(entry["decoded"], robustifier=self.sdf_robustifier)
            stage_terms["collision"] = stage.weights["collision"] * _masked_mean(collision, targets.both)
            terms[name] = sum(stage_terms.values())
        return terms


def joints_3d_frame(targets: Targets) -> Tensor:
    """The GT 42 joints in the keypoint head's frame (right wrist at the origin; where the right hand is
    absent, the left wrist at the ground-truth translation, or at the origin without one). (B, 42, 3)."""
    joints = targets.joints_3d
    has_right = targets.joints_3d_weight[:, 0] > 0.5
    left_root = torch.where(targets.trans_valid[:, None], targets.trans, torch.zeros_like(targets.trans))
    root = torch.where(has_right[:, None], joints[:, 0], joints[:, 21] - left_root)
    return joints - root[:, None]


def _group_dim(group: str) -> int:
    part = PARAM_SLICES[group]
    return part.stop - part.start


def _apply_residual(params: Tensor, residual: Tensor, groups: Sequence[str]) -> Tensor:
    """params (B, 122) with ``residual`` (B, sum of the groups' sizes) added to ``groups``, in order."""
    pieces = dict((name, params[:, part]) for name, part in PARAM_SLICES.items())
    offset = 0
    for group in groups:
        size = _group_dim(group)
        pieces[group] = pieces[group] + residual[:, offset : offset + size]
        offset += size
    return torch.cat([pieces[name] for name in PARAM_SLICES], 1)


def _uses_collision(stage: Stage) -> bool:
    return stage.select == "collision" or any(name == "collision" for name, _ in stage.filters)


def _accepted(stage: Stage, new: Dict[str, Tensor], old: Dict[str, Tensor]) -> Tensor:
    """``select_better_params``: keep where every filter loss < old x (1 + percent / 100) and the selection
    loss <= old. (B,) bool."""
    keep = new[stage.select] <= old[stage.select]
    for name, percent in stage.filters:
        keep = keep & (new[name] < old[name] * (1.0 + percent / 100.0))
    return keep


def _detached(decoded: Decoded) -> Decoded:
    return Decoded(**{name: value.detach() for name, value in decoded.__dict__.items()})
