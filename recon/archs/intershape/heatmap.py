"""InterShape's first stage: 2.5D joint heatmaps of both hands (InterNet's PoseNet design, which InterShape
reads), their training target, and what the later stages read from them (2D keypoints with confidences, the
hand pose-aware attention maps, the heatmap handed to the mesh encoder)."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "HEATMAP_AMPLITUDE",
    "DEPTH_RANGE_M",
    "HeatmapHead",
    "heatmap_target",
    "heatmap_keypoints",
    "hand_attention",
]

HEATMAP_AMPLITUDE = 255.0  # InterNet renders its Gaussian targets x255
DEPTH_RANGE_M = 0.4  # InterNet's bbox_3d_size (400 mm): the depth axis spans +-0.2 m about each hand's wrist
JOINTS = 21


class HeatmapHead(nn.Module):
    """Per hand, three x2 transposed convolutions (4 x 4, BN, ReLU) on the encoder's last map, then a 1 x 1
    convolution to 21 x ``depth`` channels: (B, C, h, w) -> (B, 42, depth, 8h, 8w), right hand's 21 joints
    first (InterNet's two ``joint_deconv`` / ``joint_conv`` branches)."""

    def __init__(self, in_channels: int, channels: int, depth: int) -> None:
        super().__init__()
        self.depth = depth
        self.branches = nn.ModuleList(self._branch(in_channels, channels, depth) for _ in range(2))

    @staticmethod
    def _branch(in_channels: int, channels: int, depth: int) -> nn.Sequential:
        layers = []
        for index in range(3):
            layers += [
                nn.ConvTranspose2d(in_channels if index == 0 else channels, channels, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            ]
        layers.append(nn.Conv2d(channels, JOINTS * depth, 1))
        branch = nn.Sequential(*layers)
        for module in branch.modules():  # InterNet's init: deconvolutions N(0, 0.001), convolutions N(0, 0.001)
            if isinstance(module, (nn.ConvTranspose2d, nn.Conv2d)):
                nn.init.normal_(module.weight, std=0.001)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        return branch

    def forward(self, feature: Tensor) -> Tensor:
        maps = [branch(feature) for branch in self.branches]  # right, left: (B, 21 * D, H, W)
        batch, _, height, width = maps[0].shape
        return torch.cat(maps, 1).view(batch, 2 * JOINTS, self.depth, height, width)


def heatmap_target(
    joints_img: Tensor, joints_cam: Tensor, shape: Tuple[int, int, int], image_size: Tuple[int, int], *, sigma: float = 2.5
) -> Tensor:
    """InterNet's 2.5D Gaussian target. joints_img (B, 42, 2) input pixels; joints_cam (B, 42, 3) metres (right 21
    then left 21, each hand's wrist first); shape (D, H, W) of the heatmap; image_size (H, W) of the input.
    Returns (B, 42, D, H, W): ``255 exp(-(dx^2 + dy^2 + dz^2) / (2 sigma^2))`` in heatmap cells, x and y scaled from
    the input to the heatmap, z = each joint's depth relative to its hand's wrist over +-0.2 m mapped onto the D
    bins."""
    depth, height, width = shape
    x = joints_img[..., 0] * (width / image_size[1])
    y = joints_img[..., 1] * (height / image_size[0])
    wrists = torch.cat([joints_cam[:, :1, 2].expand(-1, JOINTS), joints_cam[:, JOINTS : JOINTS + 1, 2].expand(-1, JOINTS)], 1)
    z = ((joints_cam[..., 2] - wrists) / (DEPTH_RANGE_M / 2) + 1.0) / 2.0 * depth
    grid = lambda n: torch.arange(n, dtype=joints_img.dtype, device=joints_img.device)  # noqa: E731
    gx = torch.exp(-((grid(width)[None, None] - x[..., None]) ** 2) / (2 * sigma**2))  # (B, 42, W)
    gy = torch.exp(-((grid(height)[None, None] - y[..., None]) ** 2) / (2 * sigma**2))
    gz = torch.exp(-((grid(depth)[None, None] - z[..., None]) ** 2) / (2 * sigma**2))
    return HEATMAP_AMPLITUDE * gz[..., :, None, None] * gy[..., None, :, None] * gx[..., None, None, :]


def heatmap_keypoints(heatmap: Tensor) -> Tensor:
    """(B, K, D, H, W) -> (B, K, 3): per joint the (x, y) heatmap cell of the volume's maximum and that maximum
    (its confidence), as the reference reads its keypoints."""
    batch, joints, depth, height, width = heatmap.shape
    value, index = heatmap.flatten(2).max(-1)  # (B, K)
    cell = index % (height * width)
    x = (cell % width).to(heatmap.dtype)
    y = torch.div(cell, width, rounding_mode="floor").to(heatmap.dtype)
    return torch.stack([x, y, value], -1)


def hand_attention(heatmap: Tensor) -> Tensor:
    """(B, 42, D, H, W) -> (B, 2, H, W): per hand (right, left) the maximum over its 21 joints' volumes, the hand
    pose-aware attention map."""
    batch, _, depth, height, width = heatmap.shape
    per_hand = heatmap.view(batch, 2, JOINTS * depth, height, width)
    return per_hand.amax(2)


def encoder_heatmap(heatmap: Tensor, depth_stride: int, size: Tuple[int, int]) -> Tensor:
    """The heatmap handed to the mesh encoder: every ``depth_stride``-th depth bin, every second cell in x and y
    (the reference's ``[:, :, ::4, ::2, ::2]``), as channels: (B, 42 * ceil(D / depth_stride), size). When the
    subsampled map does not match ``size`` (odd input sizes) it is resized (nearest)."""
    picked = heatmap[:, :, ::depth_stride, ::2, ::2]
    batch, joints, depth, height, width = picked.shape
    flat = picked.reshape(batch, joints * depth, height, width)
    if (height, width) != tuple(size):
        flat = F.interpolate(flat, size=tuple(size), mode="nearest")
    return flat
