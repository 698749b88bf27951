"""InterWild (Moon, Su, Saito, Zollhoefer, Jung, Lee; CVPR 2023), registered as ``interwild``.

Architecture and recipe as read from the reference code (FACTS.md §3); the code is our own.

1. Body stream: the input image (scaled to [0, 1] only) is resized to the body input size and goes through
   a backbone; the box net upsamples its features by three deconvolutions (x8), predicts one hand-centre
   heatmap per hand, takes the soft-argmax as the centre, the box size from the features sampled at the
   centre, and a confidence from the softmax heatmap at the centre.
2. Hand crops: each predicted box is made square and enlarged 2x; an S x S crop of the *input* image is cut
   with an affine warp (no gradient); the left crop is mirrored and batched after the right crops, so that
   the hand stream only ever sees right hands.
3. Hand stream: a backbone on the 2B crops; the position head predicts 21 x D heatmap channels and takes a
   3D soft-argmax in the h x h x D volume; the rotation head samples 512-channel features at the 21 joints,
   appends their coordinates and regresses the root and 15 joint rotations as 6D; shape (10) and camera
   (tx, ty, gamma) come from the pooled features, with tz = sigmoid(gamma) * sqrt(f * f * 0.6^2 / (S * S))
   for the virtual focal f = 5000 of the crop.
4. The left hand's outputs are un-mirrored: rotations (x, -y, -z), translation x -> -x, crop x -> S - 1 - x.
   MANO (hands.mano.HandModel) gives both meshes; the 21 joints are regressed from each mesh (joint
   regressor + tip vertices, InterWild's ``get_coord``) and joints and vertices are made relative to that
   regressed wrist.
5. Relative translation net: both hands' joints (position head, no gradient) are drawn as 3D Gaussian
   heatmaps in the square union of their boxes (G^3 voxels, sigma 2.5 at G = 64), 2 x 21 x G channels ->
   conv -> ResNet stages -> features sampled at the two wrists -> linear -> left wrist minus right wrist.

Frames and units used in this module (stated once):

- image: the batch's input image, pixels, x right, y down, pixel centres at integer coordinates
  (hands.camera's convention); ``K`` (B, 3, 3) its intrinsics; camera space metres (OpenCV axes).
- box grid: the box net's output cells (Hb/4 x Wb/4 for a Hb x Wb body input); one cell covers
  ``stride = (W / grid_w, H / grid_h)`` image pixels; cell centre c maps to image pixel (c + 0.5) * stride - 0.5.
- crop: S x S pixels of a crop; its *virtual camera* has focal 5000 and principal point (S - 1) / 2 (the
  crop centre; InterWild writes S / 2 in its pixel-corner convention). ``crop_affine`` maps image pixels to
  crop pixels (hands.camera.bbox_crop_affine); for the left hand the *un-mirrored* crop is meant unless a
  name says ``mirrored``.
- hand grid: the position head's h x h x D voxels over a crop; x, y in cells ((px + 0.5) * h / S - 0.5),
  z in D bins spanning ``depth_range`` metres of depth relative to the wrist, the wrist at D / 2.
- trans grid: the relative-translation net's G^3 voxels over the union box of both hands.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import timm
import torch
import torch.nn.functional as F
from kornia.geometry.subpix import spatial_soft_argmax2d, spatial_softmax2d
from torch import Tensor, nn

from hands.camera import (
    apply_affine,
    bbox_crop_affine,
    bbox_from_points,
    crop_image,
    inverse_3x3,
    invert_affine,
    project,
    scale_bbox,
    square_bbox,
)
from hands.joints import WRIST
from hands.mano import HandModel
from hands.rotation import axis_angle_to_matrix, matrix_to_axis_angle, mirror_axis_angle, rot6d_to_matrix
from hands.sample import HandBatch
from recon.output import TwoHandOutput
from recon.registry import REGRESSORS

__all__ = ["InterWild", "mirror_hand_params", "virtual_depth_scale"]

logger = logging.getLogger(__name__)

NUM_JOINTS = 21
NUM_MANO_ROTATIONS = 16  # root + 15 joints
SIDES = ("right", "left")
# Reflection through the x = 0 plane; S R S mirrors a rotation matrix (the matrix form of (x, -y, -z)).
_MIRROR = (-1.0, 1.0, 1.0)
_CONSTANTS: dict = {}


def _constant(values: tuple, like: Tensor) -> Tensor:
    """A small constant on ``like``'s device and dtype, copied from the host once per (values, device, dtype): a
    blocking host-to-device copy every step is a stream synchronisation on a GPU. Read-only: never modify it."""
    key = (values, like.device, like.dtype)
    out = _CONSTANTS.get(key)
    if out is None:
        out = _CONSTANTS[key] = torch.tensor(values, dtype=like.dtype, device=like.device)
    return out


# ----------------------------------------------------------------------------------------------------------
# Small geometric helpers
# ----------------------------------------------------------------------------------------------------------


def virtual_depth_scale(virtual_focal: float, camera_3d_size: float, crop_size: int) -> float:
    """InterWild's k: tz = sigmoid(gamma) * k, k = sqrt(f * f * size^2 / (S * S)) (metres)."""
    return math.sqrt(virtual_focal * virtual_focal * camera_3d_size**2 / (crop_size * crop_size))


def mirror_hand_params(pose: Tensor, translation: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """Mirror a hand through the camera's x = 0 plane (a right hand becomes a left hand and back).

    pose: (B, 48) MANO axis-angle, root first -> (x, -y, -z) per joint (hands.rotation.mirror_axis_angle).
    translation: optional (B, 3) camera-space translation, metres -> x negated.
    The operation is its own inverse: un-mirroring is mirroring again.
    """
    mirrored_translation = None
    if translation is not None:
        mirrored_translation = translation * _constant(_MIRROR, translation)
    return mirror_axis_angle(pose), mirrored_translation


def _mirror_matrix(matrix: Tensor) -> Tensor:
    """(..., 3, 3) rotations -> S R S with S = diag(-1, 1, 1) (equals (x, -y, -z) on axis-angle)."""
    signs = _constant(_MIRROR, matrix)
    return matrix * signs[:, None] * signs[None, :]


def _sample_points(features: Tensor, points: Tensor) -> Tensor:
    """Bilinear features at points. features: (B, C, h, w); points: (B, N, 2) x, y in feature cells
    (cell centres at integers) -> (B, N, C). Points outside the map read zeros."""
    h, w = features.shape[-2:]
    grid = torch.stack(
        (points[..., 0] / max(w - 1, 1) * 2 - 1, points[..., 1] / max(h - 1, 1) * 2 - 1), -1
    )  # (B, N, 2) in [-1, 1]
    sampled = F.grid_sample(features, grid[:, :, None, :], mode="bilinear", align_corners=True)  # (B, C, N, 1)
    return sampled[..., 0].transpose(1, 2)


def _soft_argmax_3d(heatmaps: Tensor) -> Tensor:
    """heatmaps: (B, J, D, h, w) logits -> (B, J, 3) expected (x, y, z) in voxels.

    Written here because kornia has only the 2D form (its conv_soft_argmax3d is a windowed local
    soft-argmax, not the global one InterWild uses)."""
    batch, joints, depth, height, width = heatmaps.shape
    prob = heatmaps.reshape(batch, joints, -1).softmax(-1).reshape(batch, joints, depth, height, width)
    xs = torch.arange(width, dtype=prob.dtype, device=prob.device)
    ys = torch.arange(height, dtype=prob.dtype, device=prob.device)
    zs = torch.arange(depth, dtype=prob.dtype, device=prob.device)
    x = (prob.sum((2, 3)) * xs).sum(-1)
    y = (prob.sum((2, 4)) * ys).sum(-1)
    z = (prob.sum((3, 4)) * zs).sum(-1)
    return torch.stack((x, y, z), -1)


def _pixels_to_cells(xy: Tensor, cells_per_pixel) -> Tensor:
    """Pixel coordinates -> grid-cell coordinates (both with centres at integers)."""
    return (xy + 0.5) * cells_per_pixel - 0.5


def _cells_to_pixels(xy: Tensor, pixels_per_cell) -> Tensor:
    """Grid-cell coordinates -> pixel coordinates (inverse of :func:`_pixels_to_cells`)."""
    return (xy + 0.5) * pixels_per_cell - 0.5


def _box_from_centre_size(centre: Tensor, size: Tensor) -> Tensor:
    """centre, size: (..., 2) -> (..., 4) x0, y0, x1, y1."""
    return torch.cat((centre - size / 2, centre + size / 2), -1)


def _gaussian_heatmaps_3d(points: Tensor, grid_size: int, sigma: float) -> Tensor:
    """points: (B, J, 3) x, y, z in voxels of a G^3 grid -> (B, J, G, G, G) (z, y, x) Gaussians, peak 255.

    A 3D isotropic Gaussian factorises into x, y and z profiles; building it as their outer product costs
    3 G exponentials per joint instead of G^3."""
    axis = torch.arange(grid_size, dtype=points.dtype, device=points.device)
    profile = torch.exp(-0.5 * ((axis - points[..., None]) / sigma) ** 2)  # (B, J, 3, G)
    gx, gy, gz = profile.unbind(2)
    return 255.0 * torch.einsum("bjz,bjy,bjx->bjzyx", gz, gy, gx)


def _timm_backbone(name: str, channels: Optional[List[int]] = None) -> nn.Module:
    """A timm model without classifier and pooling (``forward_features`` gives the last feature map).

    channels: optional stage widths of a timm ResNet (e.g. [16, 32, 64, 128]) for reduced-width models."""
    kwargs = {} if channels is None else {"channels": tuple(int(c) for c in channels)}
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, global_pool="", **kwargs)
    except RuntimeError as error:  # timm raises RuntimeError("Unknown model ...")
        raise ValueError(f"InterWild: unknown timm backbone {name!r} ({error})") from None
    except TypeError as error:  # a model family that takes no ``channels``
        raise ValueError(f"InterWild: backbone_channels needs a timm ResNet, {name!r} rejects it ({error})") from None


def _interwild_init(module: nn.Module) -> None:
    """InterWild's head initialisation: conv / deconv N(0, 0.001), linear N(0, 0.01), zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, std=0.001)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


# ----------------------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------------------


class BoxNet(nn.Module):
    """Hand boxes from the body features.

    forward(features (B, C, h, w)) -> dict with
      ``centre`` (B, 2, 2): right and left hand centres, x, y in box-grid cells (8h x 8w grid);
      ``size`` (B, 2, 2): box width, height in box-grid cells;
      ``conf`` (B, 2): the softmax heatmap's value at each centre;
      ``grid_size`` (h_out, w_out).
    """

    def __init__(self, in_channels: int, channels: int = 256) -> None:
        super().__init__()
        layers = []
        for i in range(3):
            layers += [
                nn.ConvTranspose2d(in_channels if i == 0 else channels, channels, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            ]
        self.deconv = nn.Sequential(*layers)
        self.centre_heatmap = nn.Conv2d(channels, 2, 1)
        self.size = nn.ModuleDict(
            {
                side: nn.Sequential(nn.Linear(channels, channels), nn.ReLU(inplace=True), nn.Linear(channels, 2))
                for side in SIDES
            }
        )

    def forward(self, features: Tensor) -> Dict[str, Tensor]:
        features = self.deconv(features)  # (B, 256, 8h, 8w)
        heatmaps = self.centre_heatmap(features)  # (B, 2, 8h, 8w): right, left
        centre = spatial_soft_argmax2d(heatmaps, normalized_coordinates=False)  # (B, 2, 2) cells
        sizes = []
        for i, side in enumerate(SIDES):
            sampled = _sample_points(features, centre[:, i : i + 1].detach())[:, 0]  # (B, 256)
            sizes.append(self.size[side](sampled))
        prob = spatial_softmax2d(heatmaps)  # (B, 2, 8h, 8w)
        conf = torch.stack(
            [_sample_points(prob[:, i : i + 1], centre[:, i : i + 1])[:, 0, 0] for i in range(2)], 1
        )  # (B, 2)
        return {
            "centre": centre,
            "size": torch.stack(sizes, 1),
            "conf": conf,
            "grid_size": tuple(heatmaps.shape[-2:]),
        }


class PositionNet(nn.Module):
    """forward(features (N, C, h, w)) -> (N, 21, 3) joints x, y in hand-grid cells, z in depth bins."""

    def __init__(self, in_channels: int, depth_bins: int) -> None:
        super().__init__()
        self.depth_bins = depth_bins
        self.conv = nn.Conv2d(in_channels, NUM_JOINTS * depth_bins, 1)

    def forward(self, features: Tensor) -> Tensor:
        heatmaps = self.conv(features)
        n, _, h, w = heatmaps.shape
        return _soft_argmax_3d(heatmaps.reshape(n, NUM_JOINTS, self.depth_bins, h, w))


class RotationNet(nn.Module):
    """MANO rotations, shape and virtual camera from the hand features.

    forward(features (N, C, h, w), joints (N, 21, 3) hand-grid coordinates) ->
      root_6d (N, 6), pose_6d (N, 15, 6) (hands.rotation's 6D), shape (N, 10), camera (N, 3) raw (tx, ty, gamma).
    """

    def __init__(self, in_channels: int, channels: int = 512) -> None:
        super().__init__()
        self.conv = _conv_bn_relu(in_channels, channels, 1)
        joint_dim = NUM_JOINTS * (channels + 3)
        self.root_out = nn.Linear(joint_dim, 6)
        self.pose_out = nn.Linear(joint_dim, (NUM_MANO_ROTATIONS - 1) * 6)
        self.shape_out = nn.Linear(in_channels, 10)
        self.camera_out = nn.Linear(in_channels, 3)

    def forward(self, features: Tensor, joints: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        pooled = features.mean((2, 3))  # (N, C)
        shape = self.shape_out(pooled)
        camera = self.camera_out(pooled)
        sampled = _sample_points(self.conv(features), joints[..., :2])  # (N, 21, 512)
        joint_features = torch.cat((sampled, joints), -1).flatten(1)  # (N, 21 * 515)
        root_6d = self.root_out(joint_features)
        pose_6d = self.pose_out(joint_features).reshape(-1, NUM_MANO_ROTATIONS - 1, 6)
        return root_6d, pose_6d, shape, camera


class TransNet(nn.Module):
    """Relative root translation (left wrist minus right wrist, metres) from both hands' 2.5D joints.

    forward(right_joints_img, left_joints_img (B, 21, 2) image pixels, right_depth, left_depth (B, 21) hand-grid
    depth bins in [0, D)) -> (B, 3).
    """

    def __init__(
        self, *, backbone: str, grid_size: int, sigma: float, depth_bins: int, channels: Optional[List[int]] = None
    ) -> None:
        super().__init__()
        self.grid_size = grid_size
        self.sigma = sigma
        self.depth_bins = depth_bins
        resnet = _timm_backbone(backbone, channels)
        if not all(hasattr(resnet, f"layer{i}") for i in range(1, 5)):
            raise ValueError(f"InterWild: trans_backbone {backbone!r} must be a timm ResNet (layer1..layer4)")
        # ResNet stages without the stem: the heatmap conv takes the stem's place.
        self.stages = nn.Sequential(resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)
        stem_channels = resnet.layer1[0].conv1.in_channels
        self.conv = _conv_bn_relu(2 * NUM_JOINTS * grid_size, stem_channels, 3)
        self.num_features = resnet.num_features
        self.fc = nn.Linear(2 * (self.num_features + 2), 3)

    def forward(
        self, right_joints_img: Tensor, left_joints_img: Tensor, right_depth: Tensor, left_depth: Tensor
    ) -> Tensor:
        grid = self.grid_size
        # tight boxes (x1.2) of each hand's joints, their union, made square
        right_box = scale_bbox(bbox_from_points(right_joints_img), 1.2)
        left_box = scale_bbox(bbox_from_points(left_joints_img), 1.2)
        union = torch.cat(
            (torch.minimum(right_box[:, :2], left_box[:, :2]), torch.maximum(right_box[:, 2:], left_box[:, 2:])), -1
        )
        union = square_bbox(_min_box_size(union, 1.0))
        affine = bbox_crop_affine(union, (grid, grid))  # image px -> trans grid
        depth_scale = grid / self.depth_bins
        right = torch.cat((apply_affine(right_joints_img, affine), right_depth[..., None] * depth_scale), -1)
        left = torch.cat((apply_affine(left_joints_img, affine), left_depth[..., None] * depth_scale), -1)
        heatmaps = torch.cat(
            (
                _gaussian_heatmaps_3d(right, grid, self.sigma).flatten(1, 2),  # (B, 21 * G, G, G)
                _gaussian_heatmaps_3d(left, grid, self.sigma).flatten(1, 2),
            ),
            1,
        )  # (B, 42 G, G, G)
        features = self.stages(self.conv(heatmaps))  # (B, C, G / 8, G / 8)
        wrists = torch.stack((right[:, WRIST, :2], left[:, WRIST, :2]), 1)  # (B, 2, 2) trans-grid px
        wrists = _pixels_to_cells(wrists, features.shape[-1] / grid)  # feature cells
        wrist_features = torch.cat((_sample_points(features, wrists), wrists), -1)  # (B, 2, C + 2)
        return self.fc(wrist_features.flatten(1))


def _min_box_size(box: Tensor, min_size) -> Tensor:
    """Boxes (..., 4) whose width and height are at least ``min_size`` (about the same centre).

    A guard for untrained networks, whose predicted boxes can be empty or inverted; a degenerate box would
    make the crop affine singular."""
    centre = (box[..., :2] + box[..., 2:]) / 2
    size = (box[..., 2:] - box[..., :2]).abs().clamp(min=min_size)
    return _box_from_centre_size(centre, size)


# ----------------------------------------------------------------------------------------------------------
# The regressor
# ----------------------------------------------------------------------------------------------------------


@REGRESSORS.register("interwild")
class InterWild(nn.Module):
    # InterWild's input protocol: the whole image is the body box (process_bbox([0, 0, W, H], 1.0) for IH2.6M,
    # ReIH and HIC, in training and at test); its box net finds the hands, so no ground-truth box is read.
    input_crop = "image"

    """InterWild two-hand mesh regressor (see the module docstring for the data flow and frames).

    Keyword arguments (the ``model:`` section of configs/recon/interwild*.yaml):
      body_backbone, hand_backbone, trans_backbone: timm model names (ResNet-50 / ResNet-50 / ResNet-18 in
        the paper); the trans backbone must be a ResNet (its four stages are used without the stem).
      body_input_size: (H, W) the input image is resized to for the body stream (256 x 192).
      hand_input_size: S, side of the hand crops (256).
      box_scale: enlargement of the predicted hand box before cropping (2.0).
      depth_bins: D, depth bins of the position head's volume (8); depth_range: metres it spans (0.3).
      virtual_focal: focal of the crops' virtual camera (5000); camera_3d_size: InterWild's 0.6 m in k.
      trans_grid_size: G of the relative-translation heatmaps (64); trans_sigma: their sigma in voxels (2.5).
      backbone_channels: None (the backbones' own widths) or four stage widths given to all three timm
        ResNets, for reduced-width CPU/test models; box_channels (256) and rotation_channels (512): widths
        of the box net's deconvolutions and of the rotation head's joint features.
      cam_loss_weight: weight of the joint and mesh terms (10).
      mano_dir: the official MANO files' folder; None: the procedural MANO-format hand (hands.mano).

    Inputs are the batch's image (B, 3, H, W) in [0, 1] and intrinsics ``camera.K`` (B, 3, 3); any H, W
    works (the reference feeds the whole image made 3:4 and resized to 512 x 384: ``data.crop: image``).
    Nothing else of the batch is read by ``forward``; the labels are read by :meth:`losses` only.
    """

    def __init__(
        self,
        *,
        body_backbone: str = "resnet50",
        hand_backbone: str = "resnet50",
        trans_backbone: str = "resnet18",
        body_input_size: Tuple[int, int] = (256, 192),
        hand_input_size: int = 256,
        box_scale: float = 2.0,
        depth_bins: int = 8,
        depth_range: float = 0.3,
        virtual_focal: float = 5000.0,
        camera_3d_size: float = 0.6,
        trans_grid_size: int = 64,
        trans_sigma: float = 2.5,
        backbone_channels: Optional[List[int]] = None,
        box_channels: int = 256,
        rotation_channels: int = 512,
        cam_loss_weight: float = 10.0,
        mano_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        if len(body_input_size) != 2 or min(body_input_size) < 32:
            raise ValueError(f"InterWild: body_input_size must be (H, W) >= 32 px, got {tuple(body_input_size)}")
        if hand_input_size < 32:
            raise ValueError(f"InterWild: hand_input_size must be >= 32 px, got {hand_input_size}")
        if trans_grid_size < 8 or trans_grid_size % 8:
            raise ValueError(f"InterWild: trans_grid_size must be a multiple of 8, got {trans_grid_size}")
        self.body_input_size = (int(body_input_size[0]), int(body_input_size[1]))
        self.hand_input_size = int(hand_input_size)
        self.box_scale = float(box_scale)
        self.depth_bins = int(depth_bins)
        self.depth_range = float(depth_range)
        self.virtual_focal = float(virtual_focal)
        self.depth_k = virtual_depth_scale(virtual_focal, camera_3d_size, hand_input_size)
        self.cam_loss_weight = float(cam_loss_weight)
        self.backbone_names = {"body": body_backbone, "hand": hand_backbone, "trans": trans_backbone}
        # Where each backbone's weights came from; the first training forward logs the random ones.
        self.backbone_sources = {name: "random init" for name in self.backbone_names}
        self._sources_logged = False

        self.body_backbone = _timm_backbone(body_backbone, backbone_channels)
        self.box_net = BoxNet(self.body_backbone.num_features, box_channels)
        self.hand_backbone = _timm_backbone(hand_backbone, backbone_channels)
        self.position_net = PositionNet(self.hand_backbone.num_features, self.depth_bins)
        self.rotation_net = RotationNet(self.hand_backbone.num_features, rotation_channels)
        self.trans_net = TransNet(
            backbone=trans_backbone,
            grid_size=trans_grid_size,
            sigma=trans_sigma,
            depth_bins=self.depth_bins,
            channels=backbone_channels,
        )
        for head in (self.box_net, self.position_net, self.rotation_net, self.trans_net.conv, self.trans_net.fc):
            _interwild_init(head)
        # The hand model is kept out of the module tree: its buffers are MANO's (licence-restricted) data and
        # must not end up in checkpoints. It follows the inputs' device in forward().
        self._mano_layer = {"model": HandModel(mano_dir), "device": torch.device("cpu")}

    # -- hand model -------------------------------------------------------------------------------------

    def hand_model(self, device: torch.device) -> HandModel:
        """The MANO layer on ``device`` (moved on first use there)."""
        layer = self._mano_layer  # a plain dict, so that nn.Module does not register the model
        if layer["device"] != device:
            layer["model"] = layer["model"].to(device)
            layer["device"] = device
        return layer["model"]

    def _mano(self, side: str, pose: Tensor, shape: Tensor) -> Tuple[Tensor, Tensor]:
        """pose (N, 48), shape (N, 10) -> wrist-relative verts (N, 778, 3), joints (N, 21, 3), metres.

        InterWild's ``get_coord``: all 21 joints are regressed from the posed mesh (joint regressor + the five
        tip vertices), and mesh and joints are rooted at that regressed wrist (not smplx's LBS joints)."""
        verts = self.hand_model(pose.device)(side, pose, shape).verts
        joints = self.joints_from_verts(side, verts)
        wrist = joints[:, WRIST : WRIST + 1]
        return verts - wrist, joints - wrist

    def joints_from_verts(self, side: str, verts: Tensor) -> Tensor:
        """verts (N, 778, 3) of ``side`` -> (N, 21, 3) joints in our order: MANO's 16 regressed + 5 tips
        (:meth:`hands.mano.HandModel.regress_joints`)."""
        return self.hand_model(verts.device).regress_joints(side, verts)

    # -- crops ------------------------------------------------------------------------------------------

    def crop_boxes(self, hand_boxes: Tensor, min_size: float = 1.0) -> Tensor:
        """(..., 4) hand boxes (image px) -> square boxes enlarged ``box_scale`` times (the crops' boxes)."""
        return scale_bbox(square_bbox(_min_box_size(hand_boxes, min_size)), self.box_scale)

    def crop_affines(self, crop_boxes: Tensor) -> Tuple[Tensor, Tensor]:
        """crop_boxes (B, 2, 4) right, left -> (affine (B, 2, 2, 3) image px -> un-mirrored crop px,
        mirrored_left (B, 2, 3) image px -> the mirrored left crop the hand stream sees)."""
        size = (self.hand_input_size, self.hand_input_size)
        right = bbox_crop_affine(crop_boxes[:, 0], size)
        left = bbox_crop_affine(crop_boxes[:, 1], size)
        mirrored_left = bbox_crop_affine(crop_boxes[:, 1], size, flip=True)
        return torch.stack((right, left), 1), mirrored_left

    # -- forward ----------------------------------------------------------------------------------------

    def forward(self, batch: HandBatch) -> TwoHandOutput:
        """batch.image (B, 3, H, W) in [0, 1], batch.camera.K (B, 3, 3) -> TwoHandOutput.

        extras: ``box_centre``/``box_size`` (B, 2, 2) box-grid cells (right, left) and ``box_stride`` (2,)
        image px per cell; ``box_conf`` (B, 2); and everything :meth:`forward_hands` puts there.
        """
        image = batch.image
        height, width = image.shape[-2:]
        if self.training and not self._sources_logged:
            self._log_backbone_sources()

        # 1. body stream and box net
        body_image = F.interpolate(image, size=self.body_input_size, mode="bilinear", align_corners=False)
        box = self.box_net(self.body_backbone.forward_features(body_image))
        grid_h, grid_w = box["grid_size"]
        stride = _constant((width / grid_w, height / grid_h), image)  # image px per box-grid cell
        hand_boxes = _box_from_centre_size(_cells_to_pixels(box["centre"], stride), box["size"] * stride)  # (B, 2, 4)

        min_box = float(torch.tensor(max(width / grid_w, height / grid_h), dtype=stride.dtype))  # no host sync
        output = self.forward_hands(image, batch.camera.K, hand_boxes.detach(), min_box_size=min_box)
        output.extras.update(box_centre=box["centre"], box_size=box["size"], box_stride=stride, box_conf=box["conf"])
        return output

    def forward_hands(self, image: Tensor, K: Tensor, hand_boxes: Tensor, min_box_size: float = 1.0) -> TwoHandOutput:
        """Steps 2-7 of the module docstring for given hand boxes.

        image: (B, 3, H, W) in [0, 1]; K: (B, 3, 3); hand_boxes: (B, 2, 4) right and left hand boxes, image px
        (the box net's, or any others); min_box_size: boxes are widened to at least this many pixels.
        Returns a TwoHandOutput whose extras hold ``right_box``/``left_box`` (B, 4) the hand boxes;
        ``crop_affine`` (B, 2, 2, 3) image px -> un-mirrored crop px of each hand; ``joints_hand_grid``
        (B, 2, 21, 3) position-head joints (un-mirrored hand grid); ``joints_proj_hand_grid`` (B, 2, 21, 2)
        MANO joints projected by the virtual camera (hand grid); ``right_root_cam``/``left_root_cam`` (B, 3)
        each wrist in camera space from the virtual camera (metres); ``right_pose_matrix`` /
        ``left_pose_matrix`` (B, 16, 3, 3); ``hand_grid_cells`` (int, h).
        """
        K = K.to(image.dtype)

        # 2. hand crops from the input image (no gradient), the left one mirrored and batched after the right
        crop_boxes = self.crop_boxes(hand_boxes, min_size=min_box_size)
        crop_affine, mirrored_left_affine = self.crop_affines(crop_boxes)
        size = self.hand_input_size
        with torch.no_grad():
            affines = torch.cat((crop_affine[:, 0], mirrored_left_affine))  # (2B, 2, 3)
            crops = crop_image(torch.cat((image, image)), affines, (size, size))  # (2B, 3, S, S)

        # 3. hand stream: (2B, ...) with rows [right hands; mirrored left hands]
        hand_features = self.hand_backbone.forward_features(crops)
        joints_grid = self.position_net(hand_features)  # (2B, 21, 3)
        root_6d, pose_6d, shape, camera = self.rotation_net(hand_features, joints_grid.detach())
        rotations = rot6d_to_matrix(torch.cat((root_6d[:, None], pose_6d), 1))  # (2B, 16, 3, 3)
        translation = torch.cat((camera[:, :2], torch.sigmoid(camera[:, 2:]) * self.depth_k), -1)  # (2B, 3) virtual

        # 4. un-mirror the left hand: rotations (x, -y, -z), translation x -> -x, crop x -> S - 1 - x
        batch_size = image.shape[0]
        right, left = slice(0, batch_size), slice(batch_size, 2 * batch_size)
        grid_cells = hand_features.shape[-1]
        joints_grid = torch.stack((joints_grid[right], _mirror_grid_x(joints_grid[left], grid_cells)), 1)  # (B,2,21,3)
        pose_matrix = torch.stack((rotations[right], _mirror_matrix(rotations[left])), 1)  # (B, 2, 16, 3, 3)
        translation = torch.stack((translation[right], translation[left] * _constant(_MIRROR, translation)), 1)
        shape = torch.stack((shape[right], shape[left]), 1)  # (B, 2, 10)
        pose = matrix_to_axis_angle(pose_matrix).flatten(2)  # (B, 2, 48)

        # 5. MANO, wrist-relative
        meshes = [self._mano(side, pose[:, i], shape[:, i]) for i, side in enumerate(SIDES)]

        # 6. 2D: position-head joints and virtual-camera projections in each hand's grid; image pixels
        cells_per_px = grid_cells / size
        inverse_affine = invert_affine(crop_affine)  # (B, 2, 2, 3) crop px -> image px
        virtual_K = _virtual_intrinsics(self.virtual_focal, size, image)
        joints_proj_grid = torch.stack(
            [
                _pixels_to_cells(project(meshes[i][1] + translation[:, i, None], virtual_K), cells_per_px)
                for i in range(2)
            ],
            1,
        )  # (B, 2, 21, 2)
        joints_crop = _cells_to_pixels(joints_grid[..., :2], 1.0 / cells_per_px)  # (B, 2, 21, 2) crop px
        joints_img = torch.stack([apply_affine(joints_crop[:, i], inverse_affine[:, i]) for i in range(2)], 1)  # img px
        roots_cam = self.roots_in_camera(translation, crop_affine, K)  # (B, 2, 3)

        # 7. relative translation from both hands' joints (no gradient into the hand stream)
        joints_img_fixed, depth_fixed = joints_img.detach(), joints_grid[..., 2].detach()
        rel_root = self.trans_net(joints_img_fixed[:, 0], joints_img_fixed[:, 1], depth_fixed[:, 0], depth_fixed[:, 1])

        return TwoHandOutput(
            right_verts=meshes[0][0],
            left_verts=meshes[1][0],
            right_joints=meshes[0][1],
            left_joints=meshes[1][1],
            rel_root=rel_root,
            right_joints_img=joints_img[:, 0],
            left_joints_img=joints_img[:, 1],
            right_mano_pose=pose[:, 0],
            left_mano_pose=pose[:, 1],
            right_mano_shape=shape[:, 0],
            left_mano_shape=shape[:, 1],
            extras={
                "right_box": hand_boxes[:, 0],
                "left_box": hand_boxes[:, 1],
                "crop_affine": crop_affine,
                "joints_hand_grid": joints_grid,
                "joints_proj_hand_grid": joints_proj_grid,
                "right_root_cam": roots_cam[:, 0],
                "left_root_cam": roots_cam[:, 1],
                "right_pose_matrix": pose_matrix[:, 0],
                "left_pose_matrix": pose_matrix[:, 1],
                "hand_grid_cells": grid_cells,
            },
        )

    def roots_in_camera(self, translation: Tensor, crop_affine: Tensor, K: Tensor) -> Tensor:
        """The wrists in camera space from the virtual cameras (the virtual focal trick).

        translation: (B, 2, 3) wrist in each (un-mirrored) crop's virtual camera, metres; crop_affine:
        (B, 2, 2, 3) image px -> crop px; K: (B, 3, 3) -> (B, 2, 3) camera space, metres.
        The wrist's crop pixel is mapped back to the image; its depth scales by the ratio of the crop's
        real focal (K's focal times the crop zoom) to the virtual one.
        """
        virtual_K = _virtual_intrinsics(self.virtual_focal, self.hand_input_size, translation)
        root_crop = project(translation[..., None, :], virtual_K)[..., 0, :]  # (B, 2, 2) crop px
        root_img = apply_affine(root_crop[:, :, None], invert_affine(crop_affine))[:, :, 0]  # (B, 2, 2) image px
        zoom = torch.linalg.det(crop_affine[..., :2]).abs().sqrt()  # (B, 2) crop px per image px
        real_focal = torch.sqrt(K[:, 0, 0] * K[:, 1, 1])[:, None] * zoom  # (B, 2)
        depth = translation[..., 2] * real_focal / self.virtual_focal  # (B, 2)
        homogeneous = torch.cat((root_img, torch.ones_like(root_img[..., :1])), -1)  # (B, 2, 3)
        rays = homogeneous @ inverse_3x3(K).transpose(-1, -2)  # (B, 2, 3), z = 1; no sync, exportable
        return rays * depth[..., None]

    # -- losses -----------------------------------------------------------------------------------------

    def losses(self, output: TwoHandOutput, batch: HandBatch) -> Dict[str, Tensor]:
        """InterWild's loss terms (L1 everywhere, each the mean over its elements with invalid ones zeroed).

        box_centre_<side>, box_size_<side>: box-grid cells, masked by the hand's ``valid``;
        rel_root: metres, masked by ``rel_root_valid``;
        mano_pose: rotation matrices, mano_shape: betas, masked by ``mano_valid``;
        joint_cam (x10): wrist-relative joints, masked by ``joints_valid`` (3D; and the wrist's) and
          ``batch.joints_3d`` (2D-only samples such as MSCOCO's have none; their joint_img loses its depth);
        mano_mesh_cam (x10): wrist-relative vertices, masked by ``mano_valid``;
        joint_img, mano_joint_img: position-head joints vs. annotated / MANO joints in the hand grid of the
          crop that was actually used (x, y cells, z depth bins), masked as InterWild's joint_trunc /
          mano_joint_trunc: ``joints_trunc`` (2D) and inside the input image and the crop's volume; the MANO
          joints are projected through the camera's fisheye distortion where it has one;
        joint_proj: virtual-camera projections vs. annotated joints, hand grid, same mask as joint_img.
        """
        extras = output.extras
        dtype = output.right_verts.dtype
        K = batch.camera.K.to(dtype)
        dist = batch.camera.dist.to(dtype)
        image_size = tuple(batch.image.shape[-2:])
        stride = extras["box_stride"]
        grid_cells = extras["hand_grid_cells"]
        cells_per_px = grid_cells / self.hand_input_size
        terms: Dict[str, Tensor] = {}

        # Per side, stacked along dim 1 below (right, left): targets and their masks.
        keys = ("joints", "joints_valid", "verts", "mano_valid", "grid", "grid_valid", "mano_grid", "mano_grid_valid")
        gt = {key: [] for key in keys}
        joints_3d = batch.joints_3d  # (B,) bool: False for 2D-only samples (MSCOCO)
        for i, side in enumerate(SIDES):
            hand = batch.hand(side)

            # boxes, in box-grid cells
            box_size_px = hand.bbox[:, 2:] - hand.bbox[:, :2]
            box_valid = (hand.valid & (box_size_px > 0).all(-1)).to(dtype)[:, None]  # (B, 1)
            centre_cells = _pixels_to_cells((hand.bbox[:, :2] + hand.bbox[:, 2:]) / 2, 1.0 / stride)
            terms[f"box_centre_{side}"] = _masked_l1(extras["box_centre"][:, i], centre_cells, box_valid)
            terms[f"box_size_{side}"] = _masked_l1(extras["box_size"][:, i], box_size_px / stride, box_valid)

            # 3D joints relative to the annotated wrist; vertices relative to the MANO-regressed wrist
            joints_valid = hand.joints_valid & hand.joints_valid[:, WRIST : WRIST + 1] & hand.valid[:, None]  # (B, 21)
            mano_valid = hand.valid & hand.mano_valid  # (B,)
            gt_mano_joints = self.joints_from_verts(side, hand.verts_cam)  # (B, 21, 3)
            gt["joints"].append(hand.joints_cam - hand.joints_cam[:, WRIST : WRIST + 1])
            gt["joints_valid"].append(joints_valid)
            gt["verts"].append(hand.verts_cam - gt_mano_joints[:, WRIST : WRIST + 1])
            gt["mano_valid"].append(mano_valid)

            # 2.5D targets in the hand grid of the crop that was used. The 2D masks are InterWild's truncation
            # masks (joint_trunc, mano_joint_trunc): valid, inside the (augmented) input image and inside the
            # crop's h x h x D volume; the 3D terms above keep joints that are valid but truncated in 2D.
            affine = extras["crop_affine"][:, i]
            target, inside = self._hand_grid_targets(hand.joints_img, hand.joints_cam, affine, cells_per_px, grid_cells)
            gt["grid"].append(target)
            # the 2D mask starts from the labels' joints_trunc (2D-labelled, inside the image); 2D-only samples
            # (MSCOCO: no depth target) need no labelled wrist for their x, y (InterWild's joint_trunc)
            xy_valid = hand.joints_trunc & torch.where(joints_3d[:, None], joints_valid, hand.valid[:, None])
            gt["grid_valid"].append(inside & xy_valid & _inside_image(hand.joints_img, image_size))
            mano_img = _project_distorted(gt_mano_joints, K, dist)  # fisheye views: the distorted projection
            target, inside = self._hand_grid_targets(mano_img, gt_mano_joints, affine, cells_per_px, grid_cells)
            gt["mano_grid"].append(target)
            gt["mano_grid_valid"].append(inside & mano_valid[:, None] & _inside_image(mano_img, image_size))
        gt = {key: torch.stack(values, 1) for key, values in gt.items()}  # (B, 2, ...)
        mano_valid = gt["mano_valid"].to(dtype)  # (B, 2)

        terms["rel_root"] = _masked_l1(output.rel_root, batch.rel_root, batch.rel_root_valid.to(dtype)[:, None])

        pred_pose = torch.stack((extras["right_pose_matrix"], extras["left_pose_matrix"]), 1)  # (B, 2, 16, 3, 3)
        gt_pose = torch.stack((batch.right.mano_pose, batch.left.mano_pose), 1)  # (B, 2, 48)
        gt_pose = axis_angle_to_matrix(gt_pose.reshape(*gt_pose.shape[:2], NUM_MANO_ROTATIONS, 3))
        terms["mano_pose"] = _masked_l1(pred_pose, gt_pose, mano_valid[:, :, None, None, None])
        pred_shape = torch.stack((output.right_mano_shape, output.left_mano_shape), 1)  # (B, 2, 10)
        gt_shape = torch.stack((batch.right.mano_shape, batch.left.mano_shape), 1)
        terms["mano_shape"] = _masked_l1(pred_shape, gt_shape, mano_valid[:, :, None])

        pred_joints = torch.stack((output.right_joints, output.left_joints), 1)  # (B, 2, 21, 3)
        pred_verts = torch.stack((output.right_verts, output.left_verts), 1)  # (B, 2, 778, 3)
        # 2D-only samples (MSCOCO, InterWild's is_3D = 0): no joint_cam and no depth of joint_img
        is_3d = joints_3d.to(dtype)[:, None, None, None]  # (B, 1, 1, 1)
        joints_valid = gt["joints_valid"][..., None].to(dtype)  # (B, 2, 21, 1)
        terms["joint_cam"] = self.cam_loss_weight * _masked_l1(pred_joints, gt["joints"], joints_valid * is_3d)
        terms["mano_mesh_cam"] = self.cam_loss_weight * _masked_l1(pred_verts, gt["verts"], mano_valid[:, :, None, None])

        joints_grid = extras["joints_hand_grid"]  # (B, 2, 21, 3)
        grid_valid = gt["grid_valid"][..., None].to(dtype)  # (B, 2, 21, 1)
        xyz_valid = torch.cat((grid_valid.expand(-1, -1, -1, 2), grid_valid * is_3d), -1)  # (B, 2, 21, 3)
        terms["joint_img"] = _masked_l1(joints_grid, gt["grid"], xyz_valid)
        terms["mano_joint_img"] = _masked_l1(joints_grid, gt["mano_grid"], gt["mano_grid_valid"][..., None].to(dtype))
        terms["joint_proj"] = _masked_l1(extras["joints_proj_hand_grid"], gt["grid"][..., :2], grid_valid)
        return terms

    def _hand_grid_targets(
        self, joints_img: Tensor, joints_cam: Tensor, affine: Tensor, cells_per_px: float, grid_cells: int
    ) -> Tuple[Tensor, Tensor]:
        """joints_img (B, 21, 2) image px, joints_cam (B, 21, 3) metres, affine (B, 2, 3) image -> crop px
        -> (targets (B, 21, 3) in the hand grid, inside (B, 21) bool: within the h x h x D volume)."""
        xy = _pixels_to_cells(apply_affine(joints_img, affine), cells_per_px)
        depth = joints_cam[..., 2] - joints_cam[:, WRIST : WRIST + 1, 2]
        z = (depth / (self.depth_range / 2) + 1) / 2 * self.depth_bins
        target = torch.cat((xy, z[..., None]), -1)
        inside = (
            (xy >= -0.5).all(-1)
            & (xy[..., 0] < grid_cells - 0.5)
            & (xy[..., 1] < grid_cells - 0.5)
            & (z >= 0)
            & (z < self.depth_bins)
        )
        return target.detach(), inside

    # -- weights ----------------------------------------------------------------------------------------

    def load_backbone_weights(self, path: str) -> Dict[str, str]:
        """Load ImageNet-pretrained backbone weights (timm or torchvision ResNet files: .safetensors, .pth,
        .pt, .bin) into every backbone they fit.

        path: a weights file, loaded into each backbone whose parameters it matches exactly (a ResNet-50
        file fills the body and hand backbones; the trans net takes only the ``layer1..4`` stages); or a
        folder holding ``<timm name>.<ext>`` files (e.g. ``resnet50.safetensors``, ``resnet18.pth``).
        Returns {backbone: file or "random init"} and logs it. Raises ValueError when nothing fits.
        """
        source = Path(path)
        if not source.exists():
            raise ValueError(f"--backbone-weights {path}: no such file or folder")
        targets = {
            "body": (self.body_backbone, None),
            "hand": (self.hand_backbone, None),
            "trans": (self.trans_net.stages, ("layer1.", "layer2.", "layer3.", "layer4.")),
        }
        report: Dict[str, str] = {}
        for name, (module, prefixes) in targets.items():
            file = _weights_file(source, self.backbone_names[name])
            if file is None:
                report[name] = "random init"
                continue
            state = _read_state_dict(file)
            if prefixes is not None:  # the stages are an nn.Sequential: layer1.* -> 0.*
                state = {
                    f"{prefixes.index(prefix)}.{key[len(prefix):]}": value
                    for key, value in state.items()
                    for prefix in prefixes
                    if key.startswith(prefix)
                }
            own = module.state_dict()
            fits = set(own) <= set(state) and all(own[k].shape == state[k].shape for k in own)
            if not fits:
                report[name] = "random init"
                continue
            module.load_state_dict({k: state[k] for k in own})
            report[name] = str(file)
        if all(what == "random init" for what in report.values()):
            raise ValueError(
                f"--backbone-weights {path}: fits none of the backbones {sorted(set(self.backbone_names.values()))}"
            )
        for name, what in report.items():
            if what != "random init":
                self.backbone_sources[name] = what
                logger.warning("InterWild %s backbone (%s): weights from %s", name, self.backbone_names[name], what)
        return report

    def _log_backbone_sources(self) -> None:
        """Say (once) which backbones train from random init: ImageNet weights cannot be downloaded here."""
        self._sources_logged = True
        random = [
            f"{name} ({self.backbone_names[name]})"
            for name, what in self.backbone_sources.items()
            if what == "random init"
        ]
        if random:
            logger.warning(
                "InterWild: the %s backbone(s) start from random init; pass --backbone-weights FILE_OR_FOLDER "
                "with ImageNet-pretrained timm/torchvision weights to start from them as the paper does",
                ", ".join(random),
            )


def _mirror_grid_x(joints: Tensor, cells: int) -> Tensor:
    """(N, 21, 3) hand-grid joints of a mirrored crop -> the un-mirrored crop's (x -> cells - 1 - x)."""
    return torch.cat((cells - 1 - joints[..., :1], joints[..., 1:]), -1)


def _virtual_intrinsics(focal: float, crop_size: int, like: Tensor) -> Tensor:
    """(3, 3) intrinsics of a crop's virtual camera: focal ``focal``, principal point at the crop centre."""
    centre = (crop_size - 1) / 2
    return _constant(((focal, 0.0, centre), (0.0, focal, centre), (0.0, 0.0, 1.0)), like)


def _inside_image(points: Tensor, image_size: Tuple[int, int]) -> Tensor:
    """points (B, N, 2) px -> (B, N) bool: inside the H x W image (pixel centres at integers, so the image
    spans [-0.5, W - 0.5) x [-0.5, H - 0.5); InterWild's 0 <= x < W in its pixel-corner convention)."""
    height, width = image_size
    x, y = points[..., 0], points[..., 1]
    return (x >= -0.5) & (x < width - 0.5) & (y >= -0.5) & (y < height - 0.5)


def _project_distorted(points: Tensor, K: Tensor, dist: Tensor) -> Tensor:
    """points (B, N, 3) camera space, metres; K (B, 3, 3); dist (B, 4) OpenCV fisheye k1..k4, zeros for a
    pinhole camera -> (B, N, 2) px. InterWild's ``get_mano_data`` projects with ``distort_projection_fisheye``
    where a camera has ``D`` (ReIH's egocentric views). Both projections are computed and selected per sample
    (no host read-back); kornia's Kannala-Brandt model is the fisheye one."""
    from kornia.geometry.camera.distortion_kannala_brandt import distort_points_kannala_brandt

    pinhole = project(points, K)
    normalized = points[..., :2] / points[..., 2:3].clamp(min=1e-6)  # (B, N, 2) on the z = 1 plane
    params = torch.cat((K[:, 0, 0:1], K[:, 1, 1:2], K[:, 0, 2:3], K[:, 1, 2:3], dist), -1)  # (B, 8)
    fisheye = distort_points_kannala_brandt(normalized, params[:, None].expand(-1, points.shape[1], -1))
    is_fisheye = (dist.abs().sum(-1) > 0)[:, None, None]  # (B, 1, 1)
    return torch.where(is_fisheye, fisheye, pinhole)


def _masked_l1(pred: Tensor, target, valid: Tensor) -> Tensor:
    """mean(|pred - target| * valid) over all elements (InterWild's reduction; invalid entries count as 0)."""
    return ((pred - target).abs() * valid).mean()


_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def _weights_file(source: Path, backbone: str) -> Optional[Path]:
    """The weights file for ``backbone``: ``source`` itself when it is a file, else ``<backbone>.<ext>`` in it."""
    if source.is_file():
        return source
    for suffix in _WEIGHT_SUFFIXES:
        candidate = source / f"{backbone}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _read_state_dict(file: Path) -> Dict[str, Tensor]:
    """A state dict from a timm / torchvision checkpoint file (plain, or under ``state_dict`` / ``model``)."""
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"--backbone-weights {file}: cannot read it ({type(error).__name__}: {error})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"--backbone-weights {file}: not a state dict of tensors")
    return {key.removeprefix("module."): value for key, value in state.items()}
