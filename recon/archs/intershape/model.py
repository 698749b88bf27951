"""InterShape (Zhang, Wang, Deng, Zhang, Tan, Ma, Wang; "Interacting Two-Hand 3D Pose and Shape Reconstruction
from Single Color Image", ICCV 2021), registered as ``intershape``. Built from the paper, with the layer sizes,
input size and MANO use read from the authors' inference code (BaowenZ/Two-Hand-Shape-Pose) and the loss weights
and recipe from their later training release (iscas3dv/Two-Hand-Shape-Pose_v2); both forbid redistribution, and
nothing here is copied from them (docs/intershape.md, docs/fidelity.md).

1. **2.5D heatmaps** (:mod:`.heatmap`): a ResNet on the ImageNet-normalised crop holding both hands and InterNet's
   deconvolution head give 42 joint volumes (21 per hand, ``heatmap_depth`` depth bins about each hand's wrist,
   1/4 of the input's resolution). The reference loads a pretrained, frozen InterNet; here the head learns with
   InterNet's heatmap loss in the same run, and everything downstream reads the heatmaps **detached** (as from a
   fixed network).
2. **Mesh encoder**: a second ResNet. The heatmap (every ``depth_stride``-th bin, every second cell) joins its
   stride-8 map as extra channels at the input of its third stage.
3. **Hand pose-aware attention**: per hand, the maximum over its joints' heatmap volumes, resized (nearest) to the
   last encoder map, weighs that map; its spatial mean is the hand's feature.
4. **Two-hand pose and shape** (:mod:`.refine`): per hand an MLP (``mano_hidden``) -> 48 axis-angle MANO pose
   values and 10 betas; from the mean of the last map an MLP -> the relative transformation of the two hands
   (log scale, translation of the left hand in the right hand's normalised frame).
5. **Context-aware cascaded refinement** (``cascade`` stages, 3 in the paper): stage i reads encoder level 4 - i
   (strides 32, 16, 8), masked per hand by a joint heatmap of the previous stage's joints placed on the image by a
   weak-perspective fit to that hand's heatmap keypoints, and regresses the hand's pose and shape from that
   feature together with **the other hand's** and its own previous pose and shape and the relative transformation.
6. **MANO** (:class:`hands.mano.HandModel`, both sides, left-hand shapedirs fixed): pose relative to MANO's mean
   hand (``flat_hand_mean=False``), no PCA.

Frames and units: InterShape's hands are scale-free (normalised by the wrist-to-middle-knuckle length). The
project's contract is metric: each hand's mesh is the MANO mesh of its predicted shape, in camera axes, metres,
relative to its own wrist (row 0 of MANO's joint regressor on the mesh, the project's joints); ``rel_root`` is the
left wrist placed by the relative transformation in the right hand's normalised frame, times the right hand's
predicted bone length: ``L_r ((t - m_l / L_l) e^s) + m_r`` with m the middle knuckles (wrist-rooted) and L the
bone lengths. 2D joints are the heatmap maxima, in input pixels.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hands.joints import MIDDLE_KNUCKLE, WRIST
from hands.mano import HandModel
from hands.sample import HandBatch
from recon.archs.common import HandModelMixin, load_backbone_state, read_weights
from recon.output import TwoHandOutput
from recon.registry import REGRESSORS

from . import losses as L
from .heatmap import HeatmapHead, encoder_heatmap, hand_attention, heatmap_keypoints, heatmap_target
from .protocol import InterShapeProtocol
from .refine import ManoBranch, RefineStage, RelativeBranch

__all__ = ["InterShape", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIDES = ("right", "left")
OTHER = {"right": "left", "left": "right"}
JOINT_SLICE = {"right": slice(0, 21), "left": slice(21, 42)}
MAX_CASCADE = 3  # one stage per encoder level: strides 32, 16, 8


def _widened(conv: nn.Conv2d, extra: int) -> nn.Conv2d:
    """A convolution like ``conv`` reading ``extra`` more input channels (fresh weights)."""
    return nn.Conv2d(
        conv.in_channels + extra, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
    )


@REGRESSORS.register("intershape")
class InterShape(HandModelMixin, nn.Module):
    """InterShape: image -> 2.5D heatmaps -> per-hand attention features -> both hands' MANO parameters and their
    relative transformation -> context-aware cascaded refinement (module docstring).

    Args (keyword-only):
        backbone: the mesh encoder, a timm ResNet name (random init; ``load_backbone_weights`` reads pretrained
            weights into both encoders). heatmap_backbone: the heatmap network's ResNet.
        backbone_kwargs: extra ``timm.create_model`` arguments for both (e.g. ``channels`` for a narrow test ResNet).
        heatmap_channels: width of the deconvolution head (InterNet: 256). heatmap_depth: depth bins (64).
        depth_stride: every how many depth bins reach the mesh encoder (the reference: 4).
        mano_hidden: widths of the MANO MLPs (the reference: 512, 512, 512, 512).
        cascade: refinement stages (0-3; the paper: 3).
        mano_dir: folder with the official MANO_RIGHT/LEFT.pkl; None: the procedural hand model.
        weight_heatmap (1, InterNet), weight_joints (10), weight_offset (1), weight_bone (100), weight_shape (0.1),
        weight_shape_consistency (0.01), weight_regulariser (0.1): the loss weights (:meth:`losses`).

    InterShape's own evaluation protocol (middle-knuckle root, GT / predicted bone-length rescale per hand) is
    :meth:`protocol_evaluator`, reported by ``recon.evaluate`` beside the InterWild-convention metrics.
    """

    input_crop = "hands"  # InterNet's input: the hands' box (the reference's crops of IH2.6M's hand boxes)

    def __init__(
        self,
        *,
        backbone: str = "resnet50",
        heatmap_backbone: str = "resnet50",
        backbone_kwargs: Optional[Dict] = None,
        heatmap_channels: int = 256,
        heatmap_depth: int = 64,
        depth_stride: int = 4,
        mano_hidden: List[int] = [512, 512, 512, 512],  # noqa: B006 (copied; the config needs a list default)
        cascade: int = 3,
        mano_dir: Optional[str] = None,
        weight_heatmap: float = 1.0,
        weight_joints: float = 10.0,
        weight_offset: float = 1.0,
        weight_bone: float = 100.0,
        weight_shape: float = 0.1,
        weight_shape_consistency: float = 0.01,
        weight_regulariser: float = 0.1,
    ) -> None:
        super().__init__()
        if not 0 <= cascade <= MAX_CASCADE:
            raise ValueError(f"cascade: 0 to {MAX_CASCADE} refinement stages (one per encoder level), got {cascade}")
        if heatmap_depth < 1 or depth_stride < 1:
            raise ValueError(f"heatmap_depth ({heatmap_depth}) and depth_stride ({depth_stride}) must be positive")
        mano_hidden = [int(n) for n in mano_hidden]
        if not mano_hidden:
            raise ValueError("mano_hidden: at least one hidden layer")
        kwargs = dict(backbone_kwargs or {})
        self.heatmap_encoder = timm.create_model(heatmap_backbone, pretrained=False, features_only=True, out_indices=(4,), **kwargs)
        self.heatmap_head = HeatmapHead(self.heatmap_encoder.feature_info.channels()[-1], heatmap_channels, heatmap_depth)
        self.depth_stride = depth_stride
        self.extra_channels = 42 * len(range(0, heatmap_depth, depth_stride))
        encoder = timm.create_model(backbone, pretrained=False, num_classes=0, **kwargs)
        block = encoder.layer3[0]
        block.conv1 = _widened(block.conv1, self.extra_channels)
        block.downsample[0] = _widened(block.downsample[0], self.extra_channels)
        self.encoder = encoder
        channels = [info["num_chs"] for info in encoder.feature_info][-3:]  # layer2, layer3, layer4
        c4 = channels[-1]
        self.init_branch = nn.ModuleDict({side: ManoBranch(c4, mano_hidden) for side in SIDES})
        self.relative = RelativeBranch(c4)
        self.refine = nn.ModuleList(
            RefineStage(channels[-1 - i], c4, 2**i, mano_hidden) for i in range(cascade)
        )
        self.register_buffer("image_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._set_hand_model(mano_dir)
        self.weights = dict(
            heatmap=weight_heatmap, joints=weight_joints, offset=weight_offset, bone=weight_bone, shape=weight_shape,
            shape_consistency=weight_shape_consistency, regulariser=weight_regulariser,
        )

    # -- weights -----------------------------------------------------------------------------------------

    def load_backbone_weights(self, path: str) -> None:
        """Load pretrained ResNet weights (a .safetensors file or a torch state dict; the classifier's keys are
        ignored) into both encoders. The mesh encoder's widened third-stage inputs get the pretrained weights on
        the image channels and zeros on the heatmap channels. Raises ValueError when the file does not fit."""
        state = read_weights(path)
        load_backbone_state(self.heatmap_encoder, state, path, "heatmap encoder")
        padded = dict(state)
        ours = self.encoder.state_dict()
        for key in ("layer3.0.conv1.weight", "layer3.0.downsample.0.weight"):
            if key in padded and key in ours and padded[key].shape[1] + self.extra_channels == ours[key].shape[1]:
                weight = padded[key]
                extra = weight.new_zeros(weight.shape[0], self.extra_channels, *weight.shape[2:])
                padded[key] = torch.cat([weight, extra], 1)
        load_backbone_state(self.encoder, padded, path, "mesh encoder")

    # -- forward -----------------------------------------------------------------------------------------

    def decode(self, side: str, pose: Tensor, shape: Tensor, hand_model: HandModel) -> Dict[str, Tensor]:
        """(B, 48) pose and (B, 10) betas -> {pose, shape, verts (B, 778, 3), joints (B, 21, 3)} wrist-rooted metres
        (the project's joints: MANO's regressor on the mesh plus the tips)."""
        verts = hand_model(side, pose, shape).verts.to(pose.dtype)
        joints = hand_model.regress_joints(side, verts)
        wrist = joints[:, WRIST : WRIST + 1]
        return {"pose": pose, "shape": shape, "verts": verts - wrist, "joints": joints - wrist}

    def encode(self, image: Tensor, heatmap: Tensor) -> List[Tensor]:
        """The mesh encoder: the normalised image and the detached heatmap -> its stride 8, 16, 32 maps."""
        m = self.encoder
        x = m.maxpool(m.act1(m.bn1(m.conv1(image))))
        c2 = m.layer2(m.layer1(x))
        c3 = m.layer3(torch.cat([c2, encoder_heatmap(heatmap, self.depth_stride, c2.shape[-2:])], 1))
        c4 = m.layer4(c3)
        return [c2, c3, c4]

    def forward(self, batch: HandBatch) -> TwoHandOutput:
        """batch.image: (B, 3, H, W) RGB in [0, 1], H and W multiples of 32 -> TwoHandOutput of the last stage
        (frames: module docstring). ``extras``: ``heatmap`` (B, 42, D, H/4, W/4), ``keypoints`` (B, 42, 3)
        (heatmap cell x, y and value), ``relative`` (B, 4), ``stages`` (the first estimate and each refinement,
        {side: :meth:`decode`'s dict})."""
        image = batch.image
        height, width = image.shape[-2:]
        if height % 32 or width % 32:
            raise ValueError(f"intershape: the input image must be a multiple of 32 pixels, got {height} x {width}")
        hand_model = self._hand_model_on(image.device)
        image = (image - self.image_mean) / self.image_std
        heatmap = self.heatmap_head(self.heatmap_encoder(image)[-1])
        fixed = heatmap.detach()  # the later stages read the heatmaps as from a fixed network
        keypoints = heatmap_keypoints(fixed)
        levels = self.encode(image, fixed)
        c4 = levels[-1]
        attention = F.interpolate(hand_attention(fixed), size=c4.shape[-2:], mode="nearest")
        relative = self.relative(c4.mean((2, 3)))
        stages = [{
            side: self.decode(side, *self.init_branch[side]((c4 * attention[:, i : i + 1]).mean((2, 3))), hand_model)
            for i, side in enumerate(SIDES)
        }]
        heatmap_size = tuple(fixed.shape[-2:])
        for index, stage in enumerate(self.refine):
            level, previous = levels[-1 - index], stages[-1]
            current = {}
            for side in SIDES:
                feature = stage.hand_feature(side, level, previous[side]["joints"], keypoints[:, JOINT_SLICE[side]], heatmap_size)
                pose, shape = stage.regress(side, feature, previous[side], previous[OTHER[side]], relative)
                current[side] = self.decode(side, pose, shape, hand_model)
            stages.append(current)
        last = stages[-1]
        out = {}
        for side in SIDES:
            out[f"{side}_verts"] = last[side]["verts"]
            out[f"{side}_joints"] = last[side]["joints"]
            cells = keypoints[:, JOINT_SLICE[side]]
            out[f"{side}_joints_img"] = torch.stack(
                [cells[..., 0] * (width / heatmap_size[1]), cells[..., 1] * (height / heatmap_size[0])], -1
            )
            out[f"{side}_mano_pose"] = last[side]["pose"]
            out[f"{side}_mano_shape"] = last[side]["shape"]
        rel_root = relative_root(last["right"]["joints"], last["left"]["joints"], relative)
        extras = {"heatmap": heatmap, "keypoints": keypoints, "relative": relative, "stages": stages}
        return TwoHandOutput(rel_root=rel_root, extras=extras, **out)

    def protocol_evaluator(self) -> InterShapeProtocol:
        """InterShape's own protocol (:mod:`recon.archs.intershape.protocol`), reported as ``InterShape_MPVPE`` /
        ``InterShape_MPJPE`` beside the InterWild-convention metrics."""
        return InterShapeProtocol()

    # -- losses ------------------------------------------------------------------------------------------

    def losses(self, output: TwoHandOutput, batch: HandBatch) -> Dict[str, Tensor]:
        """The weighted terms, each summed over the first estimate and every refinement stage and over both hands,
        masked by the labels (docs/intershape.md): ``heatmap`` (InterNet's MSE to 255-amplitude Gaussians),
        ``joints`` (L1 of normalised joints), ``bone`` (squared error of the 15 normalised bone lengths),
        ``offset`` (squared error of left-minus-right joint offsets in each hand's normalised frame; the relative
        transformation learns from it), ``shape`` (betas, hands with a MANO fit), ``shape_consistency`` (the two
        hands' betas alike) and ``regulariser`` (betas and finger poses towards zero). A hand's joints count when
        its wrist and middle knuckle are labelled (they define the normalisation)."""
        extras = output.extras
        dtype = output.right_verts.dtype
        w = self.weights
        gt, valid, norm_ok = {}, {}, {}
        for side in SIDES:
            hand = batch.hand(side)
            joints_valid = hand.valid[:, None].bool() & hand.joints_valid.bool()
            norm_ok[side] = joints_valid[:, WRIST] & joints_valid[:, MIDDLE_KNUCKLE]
            valid[side] = joints_valid & norm_ok[side][:, None]
            gt[side] = hand.joints_cam.to(dtype)
        both = torch.cat([gt["right"], gt["left"]], 1)  # (B, 42, 3) camera frame
        gt_frames = {
            "right_frame": _in_frame(both, gt["right"]),
            "left_frame": _in_frame(both, gt["left"]),
        }
        pair_valid = valid["right"] & valid["left"] & batch.rel_root_valid.bool()[:, None]
        gt_norm = {side: L.normalise(gt[side]) for side in SIDES}
        relative = extras["relative"]
        terms = {name: output.rel_root.new_zeros(()) for name in ("joints", "bone", "offset", "shape", "shape_consistency", "regulariser")}
        for stage in extras["stages"]:
            pred = {side: L.normalise(stage[side]["joints"]) for side in SIDES}
            for side in SIDES:
                hand = batch.hand(side)
                terms["joints"] = terms["joints"] + L.joint_loss(pred[side], gt_norm[side], valid[side])
                terms["bone"] = terms["bone"] + L.bone_loss(pred[side], gt_norm[side], valid[side])
                fitted = hand.valid.bool() & hand.mano_valid.bool()
                terms["shape"] = terms["shape"] + L.shape_loss(stage[side]["shape"], hand.mano_shape.to(dtype), fitted)
                terms["regulariser"] = terms["regulariser"] + L.regulariser(stage[side]["shape"], stage[side]["pose"])
            pred_frames = {
                "right_frame": torch.cat([pred["right"], L.left_in_right_frame(pred["left"], relative)], 1),
                "left_frame": torch.cat([L.right_in_left_frame(pred["right"], relative), pred["left"]], 1),
            }
            terms["offset"] = terms["offset"] + L.offset_loss(pred_frames, gt_frames, pair_valid)
            present = batch.right.valid.bool() & batch.left.valid.bool()
            terms["shape_consistency"] = terms["shape_consistency"] + L.shape_consistency_loss(
                stage["right"]["shape"], stage["left"]["shape"], present
            )
        heatmap = extras["heatmap"]
        image_size = tuple(batch.image.shape[-2:])
        joints_img = torch.cat([batch.right.joints_img, batch.left.joints_img], 1).to(heatmap.dtype)
        target = heatmap_target(joints_img, both.to(heatmap.dtype), tuple(heatmap.shape[2:]), image_size)
        # a target needs the 2D label inside the image (joints_trunc) and the 3D depth relative to the wrist
        joint_valid = torch.cat([valid[side] & batch.hand(side).joints_trunc.bool() for side in SIDES], 1).to(heatmap.dtype)
        terms["heatmap"] = ((heatmap - target) ** 2 * joint_valid[..., None, None, None]).mean()
        return {name: w[name] * value for name, value in terms.items()}


def _in_frame(points: Tensor, hand: Tensor) -> Tensor:
    """Points (B, N, 3) in the normalised frame of ``hand`` (B, 21, 3): shifted to its middle knuckle, divided by its
    bone length."""
    length = L.bone_length(hand).clamp(min=1e-8)
    return (points - hand[:, MIDDLE_KNUCKLE : MIDDLE_KNUCKLE + 1]) / length[:, None, None]


def relative_root(right_joints: Tensor, left_joints: Tensor, relative: Tensor) -> Tensor:
    """The left wrist minus the right wrist, metres, from wrist-rooted joints (B, 21, 3) of both hands and the
    relative transformation (B, 4) = (s, t): ``L_r ((t - m_l / L_l) e^s) + m_r`` (module docstring)."""
    length_r = L.bone_length(right_joints).clamp(min=1e-8)[:, None]
    length_l = L.bone_length(left_joints).clamp(min=1e-8)[:, None]
    left_wrist = L.left_in_right_frame((-left_joints[:, MIDDLE_KNUCKLE] / length_l)[:, None], relative)[:, 0]
    return length_r * left_wrist + right_joints[:, MIDDLE_KNUCKLE]
