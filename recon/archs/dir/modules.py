"""DIR's building blocks (Ren et al., ICCV 2023; PengfeiRen96/DIR), written from the reference's facts.

Reference files: ``models/backbone/hourglass.py`` (``Residual``), ``SemGCN/p_gcn.py`` and
``SemGCN/p_graph_conv.py`` (the joint-graph convolution), ``transformer/mixSTE.py`` (``STE``, the two-hand
joint transformer), ``models/dir.py`` (``ImgFeature2JointFeature``, ``Joint2BoneFeature.bone_proj``).

Conventions shared by the module: joint features are (B, J, C) (joints along dim 1); feature maps (B, C, h, w);
2D joint positions ``uv`` are in DIR's normalised image coordinates, x and y in [-1, 1] over the whole input
image (``grid_sample``'s ``align_corners=False`` convention: -1 and 1 are the outer edges of the border pixels).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "HAND_EDGES",
    "BONE_PARENTS",
    "BONE_CHILDREN",
    "Residual",
    "JointGraphConv",
    "JointGCN",
    "JointTransformer",
    "ImageToJointFeature",
    "bone_feature_map",
    "init_conv_bn",
    "index_on",
]

# The hand skeleton in our joint order (hands/joints.py, which is DIR's order too): wrist -> each finger's
# knuckle, then along the finger (SemGCN/utils.get_sketch_setting).
HAND_EDGES: Tuple[Tuple[int, int], ...] = tuple((0 if k % 4 == 1 else k - 1, k) for k in range(1, 21))
BONE_PARENTS: Tuple[int, ...] = tuple(a for a, _ in HAND_EDGES)  # 20 bones
BONE_CHILDREN: Tuple[int, ...] = tuple(b for _, b in HAND_EDGES)


@functools.lru_cache(maxsize=16)
def index_on(values: Tuple[int, ...], device: torch.device) -> Tensor:
    """A constant long index tensor on ``device``, made once per device (no host-to-device copy per call)."""
    return torch.as_tensor(values, dtype=torch.long, device=device)


def init_conv_bn(module: nn.Module, linear_std: float | None = None) -> None:
    """DIR's ``init_weights``: every Conv2d ~ N(0, sqrt(2 / (k_h k_w C_out))), BatchNorm2d (1, 0); with
    ``linear_std`` also every Linear's weight ~ N(0, linear_std) (biases keep PyTorch's default)."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            fan = layer.kernel_size[0] * layer.kernel_size[1] * layer.out_channels
            nn.init.normal_(layer.weight, 0.0, math.sqrt(2.0 / fan))
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
        elif linear_std is not None and isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, 0.0, linear_std)


class Residual(nn.Module):
    """The stacked-hourglass residual block DIR's decoder is made of (pre-activation bottleneck).

    x: (B, C_in, h, w) -> (B, C_out, h, w) = conv1x1(C_out)(ReLU(BN(conv3x3(C_out/2)(ReLU(BN(conv1x1(C_out/2)
    (ReLU(BN(x))))))))) + skip(x), where skip is a 1x1 convolution when C_in != C_out (all of DIR's are).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.branch = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(),
            nn.Conv2d(in_channels, mid, 1),
            nn.BatchNorm2d(mid),
            nn.ReLU(),
            nn.Conv2d(mid, mid, 3, padding=1),
            nn.BatchNorm2d(mid),
            nn.ReLU(),
            nn.Conv2d(mid, out_channels, 1),
        )
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.branch(x) + self.skip(x)


def _row_normalised_adjacency(num_nodes: int, edges: Sequence[Tuple[int, int]]) -> Tensor:
    """(N, N) symmetric adjacency without self-loops, each row divided by its degree (SemGCN's
    ``adj_mx_from_edges(eye=False)``). Only its non-zero pattern matters to :class:`JointGraphConv`."""
    adj = torch.zeros(num_nodes, num_nodes)
    for a, b in edges:
        adj[a, b] = adj[b, a] = 1.0
    return adj / adj.sum(1, keepdim=True).clamp(min=1.0)


class JointGraphConv(nn.Module):
    """SemGCN's high-order graph convolution with per-node weights (``PGraphConv``).

    x: (B, N, C_in) -> (B, N, C_out) = softmax-masked(e0) (x W0[n]) + softmax-masked(e1, neighbours) (x W1[n]) + b.
    W: (2, N, C_in, C_out) Xavier-uniform (gain 1.414); e0 over the self-loops and e1 over the neighbour
    pattern are learned edge weights starting at 1, turned into a row-softmax over the allowed entries (so the
    self term is the node's own feature, the neighbour term the mean over its neighbours at initialisation).
    """

    def __init__(self, in_channels: int, out_channels: int, edges: Sequence[Tuple[int, int]], num_nodes: int) -> None:
        super().__init__()
        adjacency = _row_normalised_adjacency(num_nodes, edges)
        self.weight = nn.Parameter(torch.empty(2, num_nodes, in_channels, out_channels))
        nn.init.xavier_uniform_(self.weight, gain=1.414)
        self.num_nodes = num_nodes
        # flat (row-major) positions of the self-loops and of the neighbour pattern's non-zero entries
        self.register_buffer("index_self", torch.eye(num_nodes, dtype=torch.bool).flatten().nonzero()[:, 0], persistent=False)
        self.register_buffer("index_neighbours", (adjacency > 0).flatten().nonzero()[:, 0], persistent=False)
        self.edge_self = nn.Parameter(torch.ones(num_nodes))
        self.edge_neighbours = nn.Parameter(torch.ones(len(self.index_neighbours)))
        self.bias = nn.Parameter(torch.empty(out_channels))
        bound = 1.0 / math.sqrt(num_nodes)  # the reference draws it from 1/sqrt(W.size(1)) = 1/sqrt(N)
        nn.init.uniform_(self.bias, -bound, bound)

    def _attention(self, index: Tensor, values: Tensor) -> Tensor:
        """(N, N) row-softmax of the learned values at the flat positions ``index``, -9e15 elsewhere."""
        logits = torch.full((self.num_nodes * self.num_nodes,), -9e15, dtype=values.dtype, device=values.device)
        logits = logits.scatter(0, index, values).reshape(self.num_nodes, self.num_nodes)
        return torch.softmax(logits, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        h_self = torch.einsum("bnc,nco->bno", x, self.weight[0])  # (B, N, C_out)
        h_neighbours = torch.einsum("bnc,nco->bno", x, self.weight[1])
        a_self = self._attention(self.index_self, self.edge_self)  # (N, N)
        a_neighbours = self._attention(self.index_neighbours, self.edge_neighbours)
        return a_self @ h_self + a_neighbours @ h_neighbours + self.bias


class JointGCN(nn.Module):
    """``ResSimplePGCN``: ``layers`` x (JointGraphConv -> BatchNorm1d over channels -> ReLU), width kept.
    (The reference calls it residual; it has no skip connection.) x: (B, 21, C) -> (B, 21, C)."""

    def __init__(self, channels: int, layers: int = 4, edges: Sequence[Tuple[int, int]] = HAND_EDGES, num_nodes: int = 21):
        super().__init__()
        self.convs = nn.ModuleList(JointGraphConv(channels, channels, edges, num_nodes) for _ in range(layers))
        self.norms = nn.ModuleList(nn.BatchNorm1d(channels) for _ in range(layers))

    def forward(self, x: Tensor) -> Tensor:
        for conv, norm in zip(self.convs, self.norms):
            x = F.relu(norm(conv(x).transpose(1, 2)).transpose(1, 2))
        return x


class _Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (mixSTE's ``Attention``, ``comb=False``)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, T, dim / heads)
        attention = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        return self.proj((attention @ v).transpose(1, 2).reshape(batch, tokens, dim))


class _Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)) (GELU, hidden = mlp_ratio x dim)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class JointTransformer(nn.Module):
    """mixSTE's ``STE`` as DIR uses it: the joint-space interaction of both hands' 42 joint tokens.

    x: (B, T, C_in) -> (B, T, C_out). A learned position embedding (zeros at init) is added, then
    ``blocks`` transformer blocks, each followed by one shared LayerNorm (``spatial_norm``), then
    LayerNorm + Linear to C_out. ``blocks`` counts the blocks that run: the reference builds ``depth = 4``
    blocks and its loop starts at index 1, so three run and the first one's parameters are never used (they
    are not built here; see docs/fidelity.md).
    """

    def __init__(self, tokens: int, in_channels: int, out_channels: int, blocks: int = 3, heads: int = 4, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.position = nn.Parameter(torch.zeros(1, tokens, in_channels))
        self.blocks = nn.ModuleList(_Block(in_channels, heads, mlp_ratio) for _ in range(blocks))
        self.block_norm = nn.LayerNorm(in_channels, eps=1e-6)
        self.head = nn.Sequential(nn.LayerNorm(in_channels), nn.Linear(in_channels, out_channels))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.position
        for block in self.blocks:
            x = self.block_norm(block(x))
        return self.head(x)


class ImageToJointFeature(nn.Module):
    """Image features sampled at the joints' 2D positions (bilinear), then a per-joint MLP
    (Conv1d C_img -> C, BatchNorm1d, ReLU, Conv1d C -> C).

    feature_map: (B, C_img, h, w); uv: (B, J, 2) normalised image coordinates (detached: the sampling
    positions get no gradient, as in the reference). Returns (B, J, C).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Conv1d(in_channels, out_channels, 1),
            nn.BatchNorm1d(out_channels),
            nn.ReLU(),
            nn.Conv1d(out_channels, out_channels, 1),
        )

    def forward(self, feature_map: Tensor, uv: Tensor) -> Tensor:
        sampled = F.grid_sample(feature_map, uv.detach()[:, None], align_corners=False)[:, :, 0]  # (B, C_img, J)
        return self.mlp(sampled).transpose(1, 2)


def bone_feature_map(uv: Tensor, joint_features: Tensor, size: Tuple[int, int], radius: float) -> Tensor:
    """DIR's joint-to-image projection (``Joint2BoneFeature.bone_proj``): every bone of the skeleton paints
    its two joints' features, blended linearly along the bone, onto the feature-map cells whose centre lies
    within ``radius`` cells of the bone segment.

    uv: (B, 21, 2) normalised image coordinates; joint_features: (B, 21, C); size: (h, w) of the map.
    Returns (B, 20 * C, h, w): bone k's C channels at [k * C, (k + 1) * C), zero away from the bone. The blend
    weight of the parent joint is ``1 - d_a / (d_a + d_b)`` (d_a, d_b: the cell centre's distances to the bone's
    ends); gradients reach ``uv`` through these weights (not through the mask).
    """
    height, width = size
    batch, _, channels = joint_features.shape
    parents, children = index_on(BONE_PARENTS, uv.device), index_on(BONE_CHILDREN, uv.device)
    cells = torch.stack([(uv[..., 0] + 1.0) / 2.0 * width, (uv[..., 1] + 1.0) / 2.0 * height], -1)  # (B, 21, 2) cells
    a = cells[:, parents][:, None]  # (B, 1, 20, 2)
    b = cells[:, children][:, None]
    ys = torch.arange(height, device=uv.device, dtype=uv.dtype) + 0.5
    xs = torch.arange(width, device=uv.device, dtype=uv.dtype) + 0.5
    # cell centres in row-major order (row i, column j at i * w + j): (1, hw, 1, 2) as (x, y)
    grid = torch.stack([xs.repeat(height), ys.repeat_interleave(width)], -1).reshape(1, height * width, 1, 2)
    # Distance from each cell centre to each bone segment (the reference's lineseg_dists).
    direction = b - a
    length = (direction**2).sum(-1, keepdim=True).sqrt()
    unit = direction / length  # (B, 1, 20, 2); a zero-length bone gives NaN, so no cell is within radius
    along_before = ((a - grid) * unit).sum(-1)  # > 0: before a
    along_after = ((grid - b) * unit).sum(-1)  # > 0: beyond b
    outside = torch.clamp(torch.maximum(along_before, along_after), min=0.0)
    offset = grid - a
    across = offset[..., 0] * unit[..., 1] - offset[..., 1] * unit[..., 0]
    distance = (outside**2 + across**2).sqrt()  # (B, hw, 20)
    near = (distance < radius)[..., None]  # (B, hw, 20, 1)
    dist_a = ((grid - a + 1e-6) ** 2).sum(-1).sqrt()  # F.pairwise_distance's eps
    dist_b = ((grid - b + 1e-6) ** 2).sum(-1).sqrt()
    weight_a = (1.0 - dist_a / (dist_a + dist_b))[..., None]  # (B, hw, 20, 1)
    weight_b = (1.0 - dist_b / (dist_a + dist_b))[..., None]
    feature_a = joint_features[:, parents][:, None]  # (B, 1, 20, C)
    feature_b = joint_features[:, children][:, None]
    painted = feature_a * weight_a + feature_b * weight_b  # (B, hw, 20, C)
    painted = torch.where(near, painted, torch.zeros_like(painted))
    return painted.reshape(batch, height, width, len(BONE_PARENTS) * channels).permute(0, 3, 1, 2)
