"""DIR: Decoupled Iterative Refinement (Ren, Wen, Zheng, Xue, Sun, Qi, Wang, Liao; ICCV 2023), registered
as ``dir``. Architecture, losses and recipe as read from the reference code (PengfeiRen96/DIR, MIT:
``models/dir.py``, ``models/loss.py``, ``train.py``, ``config.py``); the code is our own.

1. Encoder: a ResNet-50 (timm, ``features_only``) on the ImageNet-normalised 256 x 256 crop holding both hands;
   stages c1..c4 at strides 4, 8, 16, 32 (c1 is not used).
2. Initial regression (:class:`~recon.archs.dir.heads.InitRegressor`) from c4: per hand attention pooling ->
   64 MANO/camera parameters; the hands' offset from the mean-pooled c4.
3. Two refinement stages (:class:`~recon.archs.dir.heads.RefineStage`), decoupled between image space and
   joint space. Stage 1 works on the 16 px map ``F1 = Residual(up(c4) ++ Residual(c3))``: joint features
   sampled at the previous 2D joints interact in joint space (GCN per hand, transformer over 42 joints), give
   new parameters and offset, and are painted back along the new 2D bones into an image map that enhances
   ``F1`` (``Residual(F1 ++ painted)``). Stage 2 repeats this on the 32 px map made from the enhanced map and c2.
   Every stage's inputs from the previous one are detached.
4. Auxiliary dense heads on the last enhanced map: a 3-class segmentation (background, left, right) and a
   3-channel dense-correspondence map (the vertices' template-position colours), both at 1/8 of the input.
5. MANO (both sides, left-hand shapedirs fixed by :class:`hands.mano.HandModel`): a robust-6D root rotation,
   45 pose-PCA coefficients (hands_components, flat_hand_mean=False), 10 betas; the mesh is rooted at its wrist.

Frames and units (stated once): every 3D prediction is in camera axes, metres, each hand relative to its own
wrist, the wrist being row 0 of MANO's joint regressor applied to that hand's mesh (the project's convention;
DIR roots its MANO output at manopth's kinematic wrist, which is the same point up to pose blend shapes at the
wrist). The 21 joints are MANO's 16 regressed joints plus the five tip vertices, in :mod:`hands.joints` order
(DIR's order too). DIR's offset is (right wrist - left wrist) / 0.15 m; the output ``rel_root`` = left - right
= ``-0.15 * offset``. 2D joints in DIR's normalised image coordinates ([-1, 1] over the input image, pixel edges
at -1 and 1) become input pixels as ``(uv + 1) / 2 * (W, H) - 0.5``.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Optional, Tuple

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hands.camera import project
from eval.dir_protocol import DIR_TIP_VERTS, DIRProtocol
from hands.joints import MANO_TIP_VERTS, WRIST
from hands.mano import HandModel, load_mano_file
from hands.render import render_mesh
from hands.rotation import matrix_to_axis_angle
from hands.sample import HandBatch
from recon.archs.common import HandModelMixin, load_backbone_state, read_weights
from recon.output import TwoHandOutput
from recon.registry import REGRESSORS

from .convert import convert_reference_state_dict, is_reference_state_dict
from .heads import HAND_PARAMS, OFFSET_UNIT, PARAM_SPLIT, InitRegressor, RefineStage, robust_rot6d_to_matrix
from .losses import edge_length_loss, lovasz_softmax, normal_vector_loss, segmentation_loss, smooth_l1
from .modules import Residual, init_conv_bn

__all__ = [
    "DIR",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SEG_LEFT",
    "SEG_RIGHT",
    "dense_code",
    "joints_from_verts",
    "protocol_tip_vertices",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIDES = ("right", "left")
SEG_LEFT, SEG_RIGHT = 1, 2  # DIR's segmentation classes (0: background)


def joints_from_verts(hand_model: HandModel, side: str, verts: Tensor) -> Tensor:
    """verts: (B, 778, 3) of ``side`` -> (B, 21, 3) joints in our order (MANO's 16 regressed + 5 tip vertices)."""
    return hand_model.regress_joints(side, verts)


def protocol_tip_vertices(hand_model: HandModel) -> Tuple[int, ...]:
    """The fingertip vertices of DIR's evaluation joints: DIR's own (middle tip 444, both hands) for official
    MANO, the hand model's ``tip_verts`` otherwise (the procedural hand's tips are its own vertices)."""
    tips = tuple(int(v) for v in hand_model.tip_verts.tolist())
    if not hand_model.is_procedural and tips == tuple(MANO_TIP_VERTS):
        return DIR_TIP_VERTS
    return tips


@functools.lru_cache(maxsize=4)
def _mano_arrays(paths: Tuple[str, str]) -> Tuple[np.ndarray, np.ndarray]:
    """(right, left) hands_components (45, 45) float32 of the MANO files at ``paths`` (read once)."""
    return tuple(np.asarray(load_mano_file(path)["hands_components"], dtype=np.float32) for path in paths)


def dense_code(hand_model: HandModel) -> Tensor:
    """(778, 3) in [0, 1]: the right template's (zero pose and shape) vertex positions normalised to their
    bounding box; the per-vertex colour of the dense-correspondence target (both hands use it)."""
    with torch.no_grad():
        template = hand_model("right", torch.zeros(1, 48), torch.zeros(1, 10)).verts[0].cpu()
    low, high = template.amin(0), template.amax(0)
    return (template - low) / (high - low)


@REGRESSORS.register("dir")
class DIR(HandModelMixin, nn.Module):
    """DIR: image -> both hands' MANO meshes through decoupled iterative refinement (module docstring).

    Args (keyword-only):
        backbone: a timm ResNet name (random init; ``load_backbone_weights`` reads pretrained weights).
        backbone_kwargs: extra ``timm.create_model`` arguments (e.g. ``channels`` for a narrow test ResNet).
        decoder_channels: width of the decoder's maps (DIR: 256).
        joint_channels: joint-feature width in the refinement stages (DIR: 128); joint_out_channels: width after
            the transformer (DIR: 64).
        gcn_layers: graph convolutions per hand and stage (DIR: 4). transformer_blocks: transformer blocks that
            run per stage (DIR: 3; the reference builds a fourth that never runs). heads: attention heads (4).
        bone_radius: per stage, how many cells around a bone the joint features are painted (DIR: 1 on the
            stride-16 map, 2 on the stride-8 map).
        mano_dir: folder with the official MANO_RIGHT/LEFT.pkl; None: the procedural hand model.
        weight_coord: weight of every 2D, 3D and offset term (DIR: 10); weight_edge (1), weight_normal (0.1),
            weight_seg (0.1, the cross-entropy), weight_lovasz (0.1), weight_dense (1).

    DIR's own evaluation protocol (wrist root, per-hand GT / predicted bone-length rescale, root error) is
    :meth:`protocol_evaluator`, reported by ``recon.evaluate`` beside the InterWild-convention metrics.
    """

    def __init__(
        self,
        *,
        backbone: str = "resnet50",
        backbone_kwargs: Optional[Dict] = None,
        decoder_channels: int = 256,
        joint_channels: int = 128,
        joint_out_channels: int = 64,
        gcn_layers: int = 4,
        transformer_blocks: int = 3,
        heads: int = 4,
        bone_radius: List[float] = [1.0, 2.0],  # noqa: B006 (copied; the config needs the default as a list)
        mano_dir: Optional[str] = None,
        weight_coord: float = 10.0,
        weight_edge: float = 1.0,
        weight_normal: float = 0.1,
        weight_seg: float = 0.1,
        weight_lovasz: float = 0.1,
        weight_dense: float = 1.0,
    ) -> None:
        super().__init__()
        bone_radius = [float(r) for r in bone_radius]
        if len(bone_radius) != 2:
            raise ValueError(f"bone_radius: one radius per refinement stage (2), got {bone_radius}")
        if joint_channels % heads:
            raise ValueError(f"joint_channels={joint_channels} must be divisible by heads={heads}")
        self.encoder = timm.create_model(
            backbone, pretrained=False, features_only=True, out_indices=(1, 2, 3, 4), **(backbone_kwargs or {})
        )
        c1, c2, c3, c4 = self.encoder.feature_info.channels()  # strides 4, 8, 16, 32
        width = decoder_channels
        self.init_regressor = InitRegressor(c4)
        # The decoder (the reference's FusionJointInterIterDecoder).
        self.skip4 = Residual(c3, width)
        self.fuse4 = Residual(c4 + width, width)
        self.skip3 = Residual(c2, width)
        self.fuse3 = Residual(2 * width, width)
        self.stages = nn.ModuleList(
            RefineStage(
                image_channels=width, joint_channels=joint_channels, joint_out_channels=joint_out_channels,
                radius=radius, gcn_layers=gcn_layers, transformer_blocks=transformer_blocks, heads=heads,
            )
            for radius in bone_radius
        )
        self.enhance = nn.ModuleList(Residual(2 * width, width) for _ in bone_radius)
        self.final = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, width, 1)
        )
        self.seg_head = self._dense_head(width)
        self.dense_head = self._dense_head(width)
        for module in (self.skip4, self.fuse4, self.skip3, self.fuse3, self.stages, self.enhance, self.final,
                       self.seg_head, self.dense_head):
            init_conv_bn(module, linear_std=0.001)  # the reference re-initialises its whole decoder so

        self.register_buffer("image_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        # The hand model and what derives from it stay out of the checkpoint (rebuilt from mano_dir).
        self._set_hand_model(mano_dir)
        paths = (str(self.hand_model.paths["right"]), str(self.hand_model.paths["left"]))
        for side, components in zip(SIDES, _mano_arrays(paths)):
            self.register_buffer(f"pca_{side}", torch.as_tensor(components), persistent=False)
        self.register_buffer("dense_code", dense_code(self.hand_model), persistent=False)
        self.weights = dict(
            coord=weight_coord, edge=weight_edge, normal=weight_normal, seg=weight_seg, lovasz=weight_lovasz,
            dense=weight_dense,
        )

    @staticmethod
    def _dense_head(width: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(width, width // 2, 3, padding=1), nn.BatchNorm2d(width // 2), nn.ReLU(), nn.Conv2d(width // 2, 3, 1)
        )

    def load_backbone_weights(self, path: str) -> None:
        """Load pretrained ResNet weights into the encoder (a .safetensors file or a torch state dict; the
        classifier's keys are ignored), or, when the file is a checkpoint of the reference DIR (its ``net`` state
        dict, ``models/dir.py`` names), the whole model (:mod:`recon.archs.dir.convert`; paper size only).
        Raises ValueError when the file does not fit."""
        state = read_weights(path, keys=("net", "state_dict"))
        if isinstance(state, dict) and is_reference_state_dict(state):
            try:
                converted = convert_reference_state_dict(state)
            except KeyError as error:
                raise ValueError(f"--backbone-weights {path}: {error.args[0]}") from None
            ours = self.state_dict()
            wrong = [k for k, v in converted.items() if k in ours and tuple(v.shape) != tuple(ours[k].shape)]
            missing = sorted(set(ours) - set(converted))
            if wrong or missing:
                raise ValueError(
                    f"--backbone-weights {path}: a reference DIR checkpoint that does not fit this model (build it at "
                    f"paper size): {len(wrong)} shapes differ {wrong[:3]}, {len(missing)} missing {missing[:3]}"
                )
            self.load_state_dict(converted)
            return
        load_backbone_state(self.encoder, state, path, "encoder")

    # -- MANO ------------------------------------------------------------------------------------------

    def decode(self, side: str, params: Tensor, hand_model: HandModel) -> Dict[str, Tensor]:
        """params: (B, 64) one hand's DIR parameters -> {``params``, ``pose`` (B, 48) axis-angle (root first,
        hands_mean not included), ``shape`` (B, 10), ``verts`` (B, 778, 3) and ``joints`` (B, 21, 3) wrist-rooted
        metres, ``verts_uv`` (B, 778, 2) and ``joints_uv`` (B, 21, 2) normalised image coordinates}."""
        root6d, pca, shape, camera = params.split(PARAM_SPLIT, dim=-1)
        root = matrix_to_axis_angle(robust_rot6d_to_matrix(root6d))  # (B, 3)
        pose = torch.cat([root, pca @ getattr(self, f"pca_{side}").to(pca)], -1)  # (B, 48)
        verts = hand_model(side, pose, shape).verts.to(params.dtype)
        joints = joints_from_verts(hand_model, side, verts)
        wrist = joints[:, WRIST : WRIST + 1]
        verts, joints = verts - wrist, joints - wrist
        scale, shift = camera[:, None, :1], camera[:, None, 1:]  # weak perspective
        return {
            "params": params,
            "pose": pose,
            "shape": shape,
            "verts": verts,
            "joints": joints,
            "verts_uv": scale * verts[..., :2] + shift,
            "joints_uv": scale * joints[..., :2] + shift,
        }

    # -- forward ---------------------------------------------------------------------------------------

    def forward(self, batch: HandBatch) -> TwoHandOutput:
        """batch.image: (B, 3, H, W) RGB in [0, 1], H and W multiples of 32 -> TwoHandOutput of the last stage
        (see the module docstring for frames). ``extras``: ``stages`` (the initial prediction and the two
        refinements, each {side: :meth:`decode`'s dict, "offset": (B, 3)}), ``seg`` (B, 3, H/8, W/8) logits
        (background, left, right), ``dense`` (B, 3, H/8, W/8)."""
        image = batch.image
        height, width = image.shape[-2:]
        if height % 32 or width % 32:
            raise ValueError(f"dir: the input image must be a multiple of 32 pixels, got {height} x {width}")
        hand_model = self._hand_model_on(image.device)
        _, c2, c3, c4 = self.encoder((image - self.image_mean) / self.image_std)

        def decode_all(params: Dict[str, Tensor], offset: Tensor) -> Dict:
            return {**{side: self.decode(side, params[side], hand_model) for side in SIDES}, "offset": offset}

        init = self.init_regressor(c4)
        stages = [decode_all(init, init["offset"])]
        feature = self.fuse4(torch.cat([_up(c4), self.skip4(c3)], 1))  # stride 16
        for index, stage in enumerate(self.stages):
            if index == 1:
                feature = self.fuse3(torch.cat([_up(feature), self.skip3(c2)], 1))  # stride 8
            previous = stages[-1]
            params, offset, joint_features = stage.regress(feature, previous, previous["offset"])
            current = decode_all(params, offset)
            painted = stage.paint({side: current[side]["joints_uv"] for side in SIDES}, joint_features, feature.shape[-2:])
            feature = self.enhance[index](torch.cat([feature, painted], 1))
            stages.append(current)
        final = self.final(feature)
        extras = {"stages": stages, "seg": self.seg_head(final), "dense": self.dense_head(final)}

        last = stages[-1]
        out = {}
        for side in SIDES:
            out[f"{side}_verts"] = last[side]["verts"]
            out[f"{side}_joints"] = last[side]["joints"]
            out[f"{side}_joints_img"] = unit_to_pixels(last[side]["joints_uv"], height, width)
            out[f"{side}_mano_pose"] = last[side]["pose"]
            out[f"{side}_mano_shape"] = last[side]["shape"]
        return TwoHandOutput(rel_root=-OFFSET_UNIT * last["offset"], extras=extras, **out)

    def protocol_evaluator(self) -> DIRProtocol:
        """DIR's own evaluation protocol (:mod:`eval.dir_protocol`: wrist root, each hand rescaled by its
        ground-truth / predicted bone length, root error of the offset), reported by ``recon.evaluate`` beside
        the InterWild-convention metrics as ``DIR_MPVPE`` / ``DIR_MPJPE`` / ``DIR_root``."""
        hand_model = self.hand_model
        return DIRProtocol(
            j_regressor_right=hand_model.j_regressor_for("right"),
            j_regressor_left=hand_model.j_regressor_for("left"),
            tip_verts=protocol_tip_vertices(hand_model),
        )

    # -- losses ------------------------------------------------------------------------------------------

    def _labels(self, batch: HandBatch, hand_model: HandModel, dtype: torch.dtype) -> Dict[str, Dict[str, Tensor]]:
        """Per side: ``valid`` (B,) (the hand is present with a mesh), wrist-rooted ``verts`` / ``joints``
        (metres; joints regressed from the GT mesh), their normalised 2D projections ``verts_uv`` /
        ``joints_uv``, and ``verts_cam``."""
        height, width = batch.image.shape[-2:]
        K = batch.camera.K.to(dtype)
        labels = {}
        for side in SIDES:
            gt = batch.hand(side)
            verts_cam = gt.verts_cam.to(dtype)
            joints_cam = joints_from_verts(hand_model, side, verts_cam)
            wrist = joints_cam[:, WRIST : WRIST + 1]
            labels[side] = {
                "valid": gt.valid & gt.mano_valid,
                "verts_cam": verts_cam,
                "verts": verts_cam - wrist,
                "joints": joints_cam - wrist,
                "verts_uv": pixels_to_unit(project(verts_cam, K), height, width),
                "joints_uv": pixels_to_unit(project(joints_cam, K), height, width),
            }
        return labels

    def losses(self, output: TwoHandOutput, batch: HandBatch) -> Dict[str, Tensor]:
        """DIR's weighted terms, each summed over the two hands (as the reference sums its left and right terms)
        and masked by validity, for every stage i (0: the initial regression, 1 and 2: the refinements):
        ``joint_uv_i``, ``mesh_uv_i``, ``joint_xyz_i``, ``mesh_xyz_i``, ``offset_i`` (x ``weight_coord``),
        ``edge_i`` (x ``weight_edge``), ``normal_i`` (x ``weight_normal``), on 3D coordinates divided by 0.15 m;
        and on the dense heads ``seg`` (cross-entropy x ``weight_seg``), ``lovasz`` (x ``weight_lovasz``),
        ``dense`` (x ``weight_dense``), against targets rendered from the GT meshes."""
        extras = output.extras
        hand_model = self._hand_model_on(output.right_verts.device)
        dtype = output.right_verts.dtype
        labels = self._labels(batch, hand_model, dtype)
        w = self.weights
        gt_offset = -batch.rel_root.to(dtype) / OFFSET_UNIT  # (right - left) / 0.15
        terms: Dict[str, Tensor] = {}
        for index, stage in enumerate(extras["stages"]):
            parts = {name: 0.0 for name in ("joint_uv", "mesh_uv", "joint_xyz", "mesh_xyz", "edge", "normal")}
            for side in SIDES:
                pred, gt = stage[side], labels[side]
                valid = gt["valid"]
                faces = hand_model.faces_for(side)
                pred_verts, gt_verts = pred["verts"] / OFFSET_UNIT, gt["verts"] / OFFSET_UNIT
                parts["joint_uv"] = parts["joint_uv"] + smooth_l1(pred["joints_uv"], gt["joints_uv"], valid)
                parts["mesh_uv"] = parts["mesh_uv"] + smooth_l1(pred["verts_uv"], gt["verts_uv"], valid)
                parts["joint_xyz"] = parts["joint_xyz"] + smooth_l1(pred["joints"] / OFFSET_UNIT, gt["joints"] / OFFSET_UNIT, valid)
                parts["mesh_xyz"] = parts["mesh_xyz"] + smooth_l1(pred_verts, gt_verts, valid)
                parts["edge"] = parts["edge"] + edge_length_loss(pred_verts, gt_verts, faces, valid)
                parts["normal"] = parts["normal"] + normal_vector_loss(pred_verts, gt_verts, faces, valid)
            for name in ("joint_uv", "mesh_uv", "joint_xyz", "mesh_xyz"):
                terms[f"{name}_{index}"] = w["coord"] * parts[name]
            terms[f"edge_{index}"] = w["edge"] * parts["edge"]
            terms[f"normal_{index}"] = w["normal"] * parts["normal"]
            terms[f"offset_{index}"] = w["coord"] * smooth_l1(stage["offset"], gt_offset, batch.rel_root_valid)
        seg_labels, dense_target, complete = self._dense_targets(batch, labels, extras["seg"].shape[-2:])
        terms["seg"] = w["seg"] * segmentation_loss(extras["seg"], seg_labels, complete)
        terms["lovasz"] = w["lovasz"] * lovasz_softmax(extras["seg"], seg_labels, complete)
        terms["dense"] = w["dense"] * smooth_l1(extras["dense"], dense_target, complete)
        return terms

    @torch.no_grad()
    def _dense_targets(
        self, batch: HandBatch, labels: Dict[str, Dict[str, Tensor]], size: Tuple[int, int]
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """The segmentation (B, h, w) long (0 background, 1 left, 2 right) and dense-correspondence (B, 3, h, w)
        targets, rendered from the GT meshes (one z-buffer for both hands, unlit template-position colours) at
        the heads' resolution; and (B,) bool: the sample's targets are complete (every present hand has a mesh)."""
        hand_model = self.hand_model
        map_h, map_w = size
        height, width = batch.image.shape[-2:]
        sx, sy = map_w / width, map_h / height
        K = batch.camera.K.to(labels["right"]["verts_cam"].dtype)
        to_map = K.new_tensor([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])
        faces = {side: hand_model.faces_for(side) for side in SIDES}
        num_faces = faces["right"].shape[0]
        # Hands without a mesh are moved in front of the camera so that their (undrawn) projection is finite.
        verts = {
            side: torch.where(
                labels[side]["valid"][:, None, None], labels[side]["verts_cam"], torch.ones_like(labels[side]["verts_cam"])
            )
            for side in SIDES
        }
        face_valid = torch.cat(
            [labels[side]["valid"][:, None].expand(-1, faces[side].shape[0]) for side in SIDES], 1
        )  # (B, 2F)
        colors = self.dense_code.to(K)[None].expand(K.shape[0], -1, -1)
        rendered = render_mesh(
            torch.cat([verts["right"], verts["left"]], 1),
            torch.cat([faces["right"], faces["left"] + verts["right"].shape[1]], 0),
            to_map @ K,
            (map_h, map_w),
            vertex_colors=torch.cat([colors, colors], 1),
            face_valid=face_valid,
            ambient=1.0,
        )
        face_index = rendered.fragments.face_index  # (B, h, w), -1 where empty
        seg = torch.zeros_like(face_index)
        seg = torch.where((face_index >= 0) & (face_index < num_faces), torch.full_like(seg, SEG_RIGHT), seg)
        seg = torch.where(face_index >= num_faces, torch.full_like(seg, SEG_LEFT), seg)
        complete = labels["right"]["valid"] | labels["left"]["valid"]
        for side in SIDES:
            complete = complete & (labels[side]["valid"] | ~batch.hand(side).valid)
        return seg.long(), rendered.image, complete


def pixels_to_unit(points: Tensor, height: int, width: int) -> Tensor:
    """(..., 2) input pixels (centres at integers) -> DIR's normalised image coordinates ([-1, 1] edge to edge)."""
    return torch.stack([(points[..., 0] + 0.5) / width * 2.0 - 1.0, (points[..., 1] + 0.5) / height * 2.0 - 1.0], -1)


def unit_to_pixels(uv: Tensor, height: int, width: int) -> Tensor:
    """The inverse of :func:`pixels_to_unit`: (..., 2) normalised coordinates -> input pixels."""
    return torch.stack([(uv[..., 0] + 1.0) / 2.0 * width - 0.5, (uv[..., 1] + 1.0) / 2.0 * height - 0.5], -1)


def _up(x: Tensor) -> Tensor:
    """x2 bilinear upsampling (``nn.Upsample(scale_factor=2, mode='bilinear')``, align_corners=False)."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
