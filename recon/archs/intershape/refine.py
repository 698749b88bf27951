"""InterShape's MANO regression branches and its context-aware cascaded refinement.

- :class:`ManoBranch`: an MLP (ReLU between layers) from a hand's feature vector to 48 axis-angle MANO pose values
  (root first; no PCA) and 10 shape values.
- :class:`RelativeBranch`: an MLP from the global feature to the relative transformation of the two hands,
  (log scale, translation (3)) in the right hand's normalised frame (:func:`recon.archs.intershape.losses`).
- :class:`RefineStage`: one cascade step. Per hand, the previous stage's 3D joints are placed on the image by the
  weak-perspective (scale, 2D shift) that best fits them to the heatmap keypoints (confidence-weighted least
  squares, no gradient); a joint heatmap drawn there at one encoder level's resolution masks that level's feature
  map; a bottleneck block brings it to the last level's width and resolution; its mean is the hand's feature. The
  hand's new pose and shape come from an MLP that reads its feature, **the other hand's previous pose and shape**
  (the context), its own previous pose and shape, and the relative transformation.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import Tensor, nn

__all__ = ["mlp", "ManoBranch", "RelativeBranch", "Bottleneck", "fit_weak_perspective", "joint_heatmap", "RefineStage"]

POSE, SHAPE, RELATIVE = 48, 10, 4


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers of ``sizes``, each followed by ReLU."""
    layers = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _small_output(layer: nn.Linear) -> nn.Linear:
    """N(0, 0.01) weights and zero bias (the reference's Linear init): a head starts near MANO's mean hand."""
    nn.init.normal_(layer.weight, std=0.01)
    nn.init.zeros_(layer.bias)
    return layer


class ManoBranch(nn.Module):
    """feature (B, in_dim) -> pose (B, 48) axis-angle (root first, MANO's ``hands_mean`` added by the hand model),
    shape (B, 10). ``hidden``: the MLP's widths (the reference: 512, 512, 512, 512)."""

    def __init__(self, in_dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        self.base = mlp([in_dim, *hidden])
        self.pose = _small_output(nn.Linear(hidden[-1], POSE))
        self.shape = _small_output(nn.Linear(hidden[-1], SHAPE))

    def forward(self, feature: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.base(feature)
        return self.pose(hidden), self.shape(hidden)


class RelativeBranch(nn.Module):
    """feature (B, C) -> (B, 4): log scale and translation of the left hand in the right hand's normalised frame
    (one hidden layer of C/2, the reference's AbsoluteBranch)."""

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(mlp([in_dim, in_dim // 2]), _small_output(nn.Linear(in_dim // 2, RELATIVE)))

    def forward(self, feature: Tensor) -> Tensor:
        return self.net(feature)


class Bottleneck(nn.Module):
    """1x1 (to ``mid``), 3x3 (stride), 1x1 (to ``out``) convolutions with ReLU and a strided 1x1 shortcut, no
    normalisation (the reference's refinement extractor)."""

    def __init__(self, in_channels: int, mid: int, out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, mid, 1, bias=False), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False), nn.ReLU(inplace=True),
            nn.Conv2d(mid, out, 1, bias=False),
        )
        self.shortcut = nn.Conv2d(in_channels, out, 1, stride=stride, bias=False)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x) + self.shortcut(x))


def fit_weak_perspective(joints: Tensor, keypoints: Tensor, eps: float = 1e-4) -> Tensor:
    """The (scale, tx, ty) minimising ``sum_j w_j || s * joints_j[:2] + t - uv_j ||^2``.

    joints (B, J, 3) any frame and unit; keypoints (B, J, 3) = (u, v, confidence) with w = max(confidence, 0) +
    ``eps`` (a joint with a negative or zero response counts next to nothing; all of them: equal weights).
    Returns (B, 3). The closed form (weighted means, then the scale) equals the reference's normal equations."""
    xy, uv = joints[..., :2], keypoints[..., :2]
    w = keypoints[..., 2].clamp(min=0.0) + eps  # (B, J)
    total = w.sum(1, keepdim=True)
    mean_xy = (w[..., None] * xy).sum(1, keepdim=True) / total[..., None]
    mean_uv = (w[..., None] * uv).sum(1, keepdim=True) / total[..., None]
    dxy, duv = xy - mean_xy, uv - mean_uv
    scale = (w * (dxy * duv).sum(-1)).sum(1) / ((w * (dxy * dxy).sum(-1)).sum(1) + 1e-12)  # (B,)
    shift = mean_uv[:, 0] - scale[:, None] * mean_xy[:, 0]
    return torch.cat([scale[:, None], shift], -1)


def joint_heatmap(points: Tensor, size: tuple[int, int], sigma: float = 3.0) -> Tensor:
    """points (B, J, 2) cells of a (H, W) map -> (B, H, W): ``1 - prod_j (1 - exp(-d_j^2 / sigma))``, the union of
    the joints' blobs (the reference's ``generate_batch_heatmap``, sigma 3 cells^2)."""
    height, width = size
    xs = torch.arange(width, dtype=points.dtype, device=points.device)
    ys = torch.arange(height, dtype=points.dtype, device=points.device)
    dx = (points[..., 0:1] - xs) ** 2  # (B, J, W)
    dy = (points[..., 1:2] - ys) ** 2  # (B, J, H)
    blobs = torch.exp(-(dx[:, :, None, :] + dy[:, :, :, None]) / sigma)  # (B, J, H, W)
    return 1.0 - torch.prod(1.0 - blobs, dim=1)


class RefineStage(nn.Module):
    """One context-aware refinement step (module docstring).

    Args: in_channels: width of the encoder level it reads; out_channels: the last level's width; stride: from this
    level's resolution to the last's; hidden: the MLP's widths.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, hidden: Sequence[int]) -> None:
        super().__init__()
        self.extract = nn.ModuleDict(
            {side: Bottleneck(in_channels, max(in_channels // 2, 1), out_channels, stride) for side in ("right", "left")}
        )
        in_dim = out_channels + 2 * (POSE + SHAPE) + RELATIVE
        self.branch = nn.ModuleDict({side: ManoBranch(in_dim, hidden) for side in ("right", "left")})

    def hand_feature(self, side: str, level: Tensor, joints: Tensor, keypoints: Tensor, heatmap_size: tuple[int, int]) -> Tensor:
        """level (B, C, h, w): the encoder map; joints (B, 21, 3): the hand's previous joints; keypoints (B, 21, 3):
        its heatmap keypoints (cells of the ``heatmap_size`` map) -> (B, out_channels)."""
        with torch.no_grad():
            camera = fit_weak_perspective(joints.detach(), keypoints)
        height, width = level.shape[-2:]
        points = camera[:, None, :1] * joints[..., :2] + camera[:, None, 1:]  # heatmap cells
        points = torch.stack([points[..., 0] * (width / heatmap_size[1]), points[..., 1] * (height / heatmap_size[0])], -1)
        mask = joint_heatmap(points.detach(), (height, width))
        return self.extract[side](level * mask[:, None]).mean((2, 3))

    def regress(self, side: str, feature: Tensor, own: Dict[str, Tensor], other: Dict[str, Tensor], relative: Tensor) -> tuple[Tensor, Tensor]:
        """The hand's new (pose, shape) from its feature, the other hand's and its own previous ``shape`` / ``pose``
        and the relative transformation (the reference's ``cascaded_input='double'`` order)."""
        context = torch.cat([other["shape"], other["pose"], own["shape"], own["pose"], feature, relative], 1)
        return self.branch[side](context)
