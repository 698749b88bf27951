"""IntagHand (Li, Zhang, Zhang, Chen, Zhu, Li, Liu; CVPR 2022), registered as ``intaghand``.

Architecture and recipe as read from the reference code (FACTS.md §4); the code is our own.

1. Encoder: a timm ResNet (``features_only``) on the ImageNet-normalised crop holding both hands. Two light
   decoders start from the last stage: the heatmap decoder (42 joint heatmaps, right hand's 21 then the left's)
   and the mask/dense decoder (2 masks, right then left, and 6 dense-correspondence channels, right RGB then
   left RGB), each a 1x1 conv then three (x2 bilinear upsample, 3x3 conv) layers, so their outputs are at
   1/4 of the input. The fused feature maps at 1/32, 1/16 and 1/8 of the input (8, 16, 32 px for a 256 crop)
   are 1x1 convolutions (no bias) -> ReLU -> BatchNorm of the two decoders' features concatenated with the
   encoder stage of that size.
2. Graph decoder (the reference's ``DualGraph``), per hand: the global feature (pooled last stage) -> linear +
   layer norm, repeated over the coarsest graph's nodes, plus a 3-d per-node code (the dense-correspondence
   colour, pooled). Three levels (64 -> 128 -> 256 nodes on the procedural hand; 63 -> 126 -> 252 in IntagHand's
   shipped graphs of official MANO); each level (:class:`DualGraphLevel`) adds a vertex position embedding
   shared by both hands, runs a :class:`GraphLayer` per hand (residual Chebyshev blocks, K = 2; the first
   block maps the input width to the output width, everything after it runs at the output width),
   :class:`ImageAttention` per hand (grid tokens of the fused map by a strided convolution, a self-attention
   among them, then one self-attention over [vertex; grid] tokens) and :class:`HandAttention` (a
   self-attention per hand, then the cross-hand attention with shared projections, per-hand norms and
   feed-forwards); x2 repetition to the next level (valid because of the coarsening's order).
3. Output: coordinates on the last level's nodes, a frozen linear map to the 778 vertices (no bias) and a
   weak-perspective camera (scale, tx, ty) per hand from the node features.

The coarse graphs (:mod:`recon.archs.graph`) are computed once per hand model (its fingerprint) and cached in
memory: the reference's heavy-edge-matching coarsening of the loaded model's faces (procedural or official
MANO), 4 levels, fake nodes so that each level halves; Laplacians rescaled as the reference's (or the intended
Chebyshev form, ``laplacian_rescale``); the last level -> 778 map is a local least-squares fit on the hand
model's own meshes (see :func:`recon.archs.graph.fit_upsampling`). A checkpoint carries the graph it was
trained with (the graph-position -> vertex index ``fill_index_*``, the Laplacians ``laplacian_*``, the map
``upsample_*``: persistent buffers, as the reference ships its graph files beside its weights), so that it
predicts the same wherever it is loaded, even where the coarsening would order the nodes differently; a
checkpoint written before it did is refused in one line (:func:`_refuse_previous_layout`).

Frames and units (stated once):

- *normalised space* (IntagHand's label space, what the network predicts): camera axes, origin at the left
  hand's middle-finger knuckle (joint 9; the right hand's when the left hand is absent), scaled so that the
  sample's mean wrist-to-middle-knuckle length is ``BONE_LENGTH`` = 0.095 m. Both hands live in this one
  frame, so the right hand's prediction carries the relative position of the hands.
- *boundary conversion* to :class:`TwoHandOutput` (wrist-rooted, metres, InterWild's metric conventions):
  each hand's wrist is MANO's regressed wrist of the predicted mesh; ``right_verts = s * (verts_n - wrist_n)``
  and ``rel_root = s * (left_wrist_n - right_wrist_n)`` with ``s = 1``: the normalised space is read as metres,
  i.e. the prediction is metric under the assumption that the hand has the canonical size (wrist-to-middle-
  knuckle 0.095 m). IntagHand's own evaluation protocol (middle-knuckle root, each hand rescaled by its
  ground-truth / predicted bone length) is :class:`IntagHandProtocol`, reported beside these metrics.
- image: the batch's input pixels (x right, y down, pixel centres at integers). The weak-perspective camera
  maps a normalised point X to ``((scale * X_xy + t) + 1) / 2 * (W, H) - 0.5``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eval.intaghand_protocol import IntagHandProtocol, joint_regressor, regress_joints
from hands.camera import project
from hands.joints import MANO_TIP_VERTS, MIDDLE_KNUCKLE, WRIST
from hands.mano import HandModel
from hands.render import render_mesh
from hands.sample import HandBatch
from recon.archs.graph import LAPLACIAN_RESCALES, CoarseGraphs, coarsen_mesh, fit_upsampling
from recon.archs.common import HandModelMixin, load_backbone_state, read_weights
from recon.output import TwoHandOutput
from recon.registry import REGRESSORS

__all__ = [
    "IntagHand",
    "HandGraphs",
    "hand_graphs",
    "BONE_LENGTH",
    "normalise_labels",
    "normalised_to_metric",
    "weak_perspective",
]

BONE_LENGTH = 0.095  # metres, IntagHand's mean wrist-to-middle-knuckle length of its label space
SIDES = ("right", "left")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
COARSEN_LEVELS = 4  # 1024 -> 512 -> 256 -> 128 -> 64 on the procedural hand (IntagHand's MANO graphs: 1008 ... 63)
DECODER_LEVELS = (4, 3, 2)  # graph levels of the three decoder stages (64, 128, 256 nodes on the procedural hand)
UPSAMPLE_SAMPLES = 96  # meshes the level-2 -> 778 map is fitted on
UPSAMPLE_SEED = 0
# IntagHand's fingertip vertices of official MANO (its J_regressor's tip rows): thumb, index, middle, ring,
# pinky. The middle tip is 444 (InterWild and hands.joints use 445).
INTAGHAND_TIP_VERTS = (745, 317, 444, 556, 673)
# The coordinate and camera heads start at this fraction of Xavier's weights, so that the first predictions
# have the labels' scale (see IntagHand.__init__; a departure from the reference, docs/fidelity.md).
HEAD_INIT_GAIN = 0.01
# Frames of the 3D loss terms: "shared" (the reference: both hands in the one normalised frame, so that every
# right-hand vertex carries the hands' relative position) or "per_hand" (each hand about its own middle knuckle,
# plus one L1 term on the knuckles' relative position; a departure measured in docs/intaghand.md).
LOSS_FRAMES = ("shared", "per_hand")


# ----------------------------------------------------------------------------------------------------------
# Graphs of a hand model (cached per fingerprint)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class HandGraphs:
    """Everything IntagHand derives from a hand model, per side.

    graphs[side]: :class:`CoarseGraphs` of that side's faces.
    upsample[side]: (778, N2) float32, the frozen map from the decoder's last level (graph order) to the mesh.
    dense_code: (778, 3) float32 in [0, 1], the per-vertex dense-correspondence colour (the template's
        vertex positions normalised to its bounding box; the same code for both sides).
    """

    graphs: Dict[str, CoarseGraphs]
    upsample: Dict[str, np.ndarray]
    dense_code: np.ndarray


@functools.lru_cache(maxsize=4)
def _hand_graphs_cached(fingerprint: str, model_ref: "_Ref") -> HandGraphs:
    model = model_ref.model
    graphs, upsample = {}, {}
    generator = torch.Generator().manual_seed(UPSAMPLE_SEED)
    pose = torch.randn(UPSAMPLE_SAMPLES, 48, generator=generator) * 0.3
    pose[:, :3] = 0.0  # the fit is rotation-equivariant: the global orientation adds nothing
    shape = torch.randn(UPSAMPLE_SAMPLES, 10, generator=generator)
    with torch.no_grad():
        for side in SIDES:
            faces = model.faces_for(side).cpu().numpy()
            num_verts = model.j_regressor_for(side).shape[1]
            graphs[side] = coarsen_mesh(faces, num_verts, COARSEN_LEVELS)
            verts = model(side, pose, shape).verts.cpu().double().numpy()  # (S, 778, 3)
            upsample[side] = fit_upsampling(graphs[side], DECODER_LEVELS[-1], verts).astype(np.float32)
        template = model("right", torch.zeros(1, 48), torch.zeros(1, 10)).verts[0].cpu().double().numpy()
    low, high = template.min(0), template.max(0)
    dense_code = ((template - low) / (high - low)).astype(np.float32)
    return HandGraphs(graphs=graphs, upsample=upsample, dense_code=dense_code)


class _Ref:
    """Hashes by the model's fingerprint so that lru_cache keys on the hand model's files only."""

    def __init__(self, model: HandModel) -> None:
        self.model = model

    def __hash__(self) -> int:
        return hash(self.model.fingerprint())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Ref) and other.model.fingerprint() == self.model.fingerprint()


def hand_graphs(model: HandModel) -> HandGraphs:
    """The coarse graphs, upsampling maps and dense codes of ``model``; computed once per fingerprint."""
    return _hand_graphs_cached(model.fingerprint(), _Ref(model))


def tip_vertices(model: HandModel) -> Tuple[int, ...]:
    """The fingertip vertices IntagHand's joints use: IntagHand's own (middle tip 444) for official MANO, the
    hand model's ``tip_verts`` otherwise (the procedural hand's tips are its own vertices)."""
    tips = tuple(int(v) for v in model.tip_verts.tolist())
    if not model.is_procedural and tips == tuple(MANO_TIP_VERTS):
        return INTAGHAND_TIP_VERTS
    return tips


# ----------------------------------------------------------------------------------------------------------
# Label normalisation (IntagHand's label space)
# ----------------------------------------------------------------------------------------------------------


def _joints_from_verts(model: HandModel, side: str, verts: Tensor, regressor: Optional[Tensor] = None) -> Tensor:
    """verts: (B, 778, 3) of ``side`` -> (B, 21, 3) joints in our order (MANO's 16 regressed + 5 tips,
    IntagHand's tip vertices: :func:`tip_vertices`). regressor: that (21, 778) map
    (:func:`eval.intaghand_protocol.joint_regressor`) on the verts' device, if already built."""
    if regressor is None:
        regressor = joint_regressor(model.j_regressor_for(side).cpu(), tip_vertices(model))
    return regress_joints(verts, regressor)


def normalise_labels(
    right_verts_cam: Tensor,
    left_verts_cam: Tensor,
    right_joints_cam: Tensor,
    left_joints_cam: Tensor,
    right_has_mesh: Tensor,
    left_has_mesh: Tensor,
) -> Tuple[Tensor, Tensor, Tensor]:
    """IntagHand's label space from camera-space labels.

    *_verts_cam: (B, 778, 3), *_joints_cam: (B, 21, 3) metres (joints regressed from the meshes);
    *_has_mesh: (B,) bool. Returns ``origin`` (B, 3) metres (the left middle knuckle, or the right one when
    the left hand has no mesh), ``scale`` (B,) (``BONE_LENGTH`` / mean bone length of the hands with a mesh;
    1 when none) and ``valid`` (B,) bool (some hand has a mesh). Normalised = (x_cam - origin) * scale.
    """
    bones = torch.stack(
        [
            (right_joints_cam[:, MIDDLE_KNUCKLE] - right_joints_cam[:, WRIST]).norm(dim=-1),
            (left_joints_cam[:, MIDDLE_KNUCKLE] - left_joints_cam[:, WRIST]).norm(dim=-1),
        ],
        1,
    )  # (B, 2)
    has = torch.stack([right_has_mesh, left_has_mesh], 1).to(bones.dtype)  # (B, 2)
    mean_bone = (bones * has).sum(1) / has.sum(1).clamp(min=1.0)
    valid = has.sum(1) > 0
    scale = torch.where(valid, BONE_LENGTH / mean_bone.clamp(min=1e-6), torch.ones_like(mean_bone))
    origin = torch.where(
        left_has_mesh[:, None], left_joints_cam[:, MIDDLE_KNUCKLE], right_joints_cam[:, MIDDLE_KNUCKLE]
    )
    return origin, scale, valid


def normalised_to_metric(
    right_verts_norm: Tensor,
    left_verts_norm: Tensor,
    right_joints_norm: Tensor,
    left_joints_norm: Tensor,
    metres_per_unit: Tensor,
) -> Dict[str, Tensor]:
    """The boundary conversion of IntagHand's predictions to :class:`TwoHandOutput`'s conventions.

    *_verts_norm: (B, 778, 3), *_joints_norm: (B, 21, 3) (joint 0 = the mesh's regressed wrist) in the
    normalised space; metres_per_unit: (B,) (1: the canonical hand size; the GT bone length / BONE_LENGTH for
    IntagHand's own protocol). Returns ``right_verts``, ``left_verts`` (B, 778, 3), ``right_joints``,
    ``left_joints`` (B, 21, 3) relative to each hand's wrist and ``rel_root`` (B, 3) = left wrist - right
    wrist, camera axes, metres.
    """
    scale = metres_per_unit[:, None, None]
    right_wrist, left_wrist = right_joints_norm[:, WRIST : WRIST + 1], left_joints_norm[:, WRIST : WRIST + 1]
    return {
        "right_verts": (right_verts_norm - right_wrist) * scale,
        "left_verts": (left_verts_norm - left_wrist) * scale,
        "right_joints": (right_joints_norm - right_wrist) * scale,
        "left_joints": (left_joints_norm - left_wrist) * scale,
        "rel_root": (left_wrist - right_wrist)[:, 0] * metres_per_unit[:, None],
    }


# ----------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------


def _xavier_init(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class FeatureDecoder(nn.Module):
    """1x1 conv then three (x2 bilinear upsample, 3x3 conv), each with ReLU + BatchNorm, then a 1x1 head.

    features: (B, C_in, h, w) -> (out (B, out_channels, 8h, 8w), [four maps (B, width, h * 2^i, w * 2^i)]).
    """

    def __init__(self, in_channels: int, width: int, out_channels: int) -> None:
        super().__init__()
        layers = []
        for index in range(4):
            block: List[nn.Module] = []
            if index > 0:
                block.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True))
            kernel = 1 if index == 0 else 3
            block += [
                nn.Conv2d(in_channels if index == 0 else width, width, kernel, padding=kernel // 2, bias=False),
                nn.ReLU(inplace=True),
                nn.BatchNorm2d(width),
            ]
            layers.append(nn.Sequential(*block))
        self.layers = nn.ModuleList(layers)
        self.head = nn.Conv2d(width, out_channels, 1)

    def forward(self, features: Tensor) -> Tuple[Tensor, List[Tensor]]:
        maps = []
        for layer in self.layers:
            features = layer(features)
            maps.append(features)
        return self.head(features), maps


class ChebConv(nn.Module):
    """Chebyshev graph convolution, K = 2: ``y = [x, L~ x] W + b`` (IntagHand's ``graph_conv_cheby``).

    x: (B, N, C_in) node features in graph order; laplacian: (N, N) rescaled Laplacian. Returns (B, N, C_out).
    The linear layer reads the features interleaved as the reference's (input index ``c * 2 + k``), so its
    weights have the reference's layout. Dense matmul: the graphs have at most a few hundred nodes.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(2 * in_channels, out_channels)

    def forward(self, x: Tensor, laplacian: Tensor) -> Tensor:
        lx = torch.einsum("nm,bmc->bnc", laplacian.to(x.dtype), x)  # (B, N, C_in)
        return self.linear(torch.stack([x, lx], -1).flatten(-2))  # (B, N, 2 C_in) interleaved -> (B, N, C_out)


class GraphResBlock(nn.Module):
    """IntagHand's ``GCN_ResBlock``: ``LN(dropout(cheb(ReLU(LN(cheb(x))))) + linear(x))``.

    x: (B, N, C_in) -> (B, N, C_out); the first Chebyshev convolution maps C_in to C_out, the linear shortcut
    too (always a linear layer, as the reference's, even when C_in == C_out).
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.conv1 = ChebConv(in_channels, out_channels)
        self.norm1 = nn.LayerNorm(out_channels, eps=1e-6)
        self.conv2 = ChebConv(out_channels, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.shortcut = nn.Linear(in_channels, out_channels)
        self.norm_out = nn.LayerNorm(out_channels, eps=1e-6)

    def forward(self, x: Tensor, laplacian: Tensor) -> Tensor:
        h = F.relu(self.norm1(self.conv1(x, laplacian)))
        h = self.dropout(self.conv2(h, laplacian))
        return self.norm_out(h + self.shortcut(x))


class GraphLayer(nn.Module):
    """IntagHand's ``GraphLayer``: ``blocks`` :class:`GraphResBlock` with ReLU between them (not after the
    last); the first maps C_in to C_out, the others run at C_out. x: (B, N, C_in) -> (B, N, C_out)."""

    def __init__(self, in_channels: int, out_channels: int, blocks: int, dropout: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [GraphResBlock(in_channels if i == 0 else out_channels, out_channels, dropout) for i in range(blocks)]
        )

    def forward(self, x: Tensor, laplacian: Tensor) -> Tensor:
        for index, block in enumerate(self.blocks):
            x = block(x, laplacian)
            if index < len(self.blocks) - 1:
                x = F.relu(x)
        return x


class MultiHeadAttention(nn.Module):
    """Multi-head attention with q / k / v / output projections (with bias), ``heads`` heads of C / heads
    channels, dropout on the attention weights and on the output (as the reference's ``SelfAttn``).

    query: (B, Nq, C), context: (B, Nk, C) -> (B, Nq, C) (no residual, no norm).
    """

    def __init__(self, channels: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout_p = heads, dropout
        self.q, self.k, self.v = (nn.Linear(channels, channels) for _ in range(3))
        self.out = nn.Linear(channels, channels)
        self.dropout = nn.Dropout(dropout)

    def forward(self, query: Tensor, context: Tensor) -> Tensor:
        batch, num_query, channels = query.shape
        head_dim = channels // self.heads

        def split(x: Tensor) -> Tensor:
            return x.view(batch, -1, self.heads, head_dim).transpose(1, 2)  # (B, heads, N, C / heads)

        x = F.scaled_dot_product_attention(
            split(self.q(query)), split(self.k(context)), split(self.v(context)),
            dropout_p=self.dropout_p if self.training else 0.0,
        )  # (B, heads, Nq, C / heads)
        return self.dropout(self.out(x.transpose(1, 2).reshape(batch, num_query, channels)))


class FeedForward(nn.Module):
    """The reference's ``MLP_res_block`` (pre-norm): ``x + drop(fc2(drop(ReLU(fc1(LN(x))))))``, hidden = C.
    x: (B, N, C) -> (B, N, C)."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(channels, channels), nn.Linear(channels, channels)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.dropout2(self.fc2(self.dropout1(F.relu(self.fc1(self.norm(x))))))


class SelfAttentionBlock(nn.Module):
    """The reference's ``SelfAttn`` (pre-norm): ``x = x + MHA(LN(x))``, then :class:`FeedForward`.
    x: (B, N, C) -> (B, N, C), every token attends to every token."""

    def __init__(self, channels: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.attention = MultiHeadAttention(channels, heads, dropout)
        self.ffn = FeedForward(channels, dropout)

    def forward(self, x: Tensor) -> Tensor:
        normed = self.norm(x)
        return self.ffn(x + self.attention(normed, normed))


class ImageAttention(nn.Module):
    """One hand's image attention (the reference's ``img_ex``).

    The fused map (B, C_img, S, S) is embedded into ``grid x grid`` tokens by a strided convolution
    (kernel = stride = S / grid) + ReLU, plus a learned position (``nn.Embedding``), and the grid tokens run one
    self-attention layer among themselves; they are then projected to the vertex width and one self-attention
    layer runs over [vertex tokens; grid tokens] together; the vertex tokens are kept.
    verts: (B, N, C) -> (B, N, C).
    """

    def __init__(
        self, image_channels: int, map_size: int, grid: int, grid_width: int, channels: int, heads: int, dropout: float
    ) -> None:
        super().__init__()
        if map_size % grid:
            raise ValueError(f"image attention: the {map_size} px feature map is not a multiple of the {grid} px grid")
        patch = map_size // grid
        self.map_size = map_size
        self.grid_proj = nn.Conv2d(image_channels, grid_width, kernel_size=patch, stride=patch)
        self.grid_position = nn.Embedding(grid * grid, grid_width)
        self.grid_attention = SelfAttentionBlock(grid_width, heads, dropout)
        self.to_vertex = nn.Linear(grid_width, channels)
        self.joint_attention = SelfAttentionBlock(channels, heads, dropout)

    def grid_tokens(self, image_map: Tensor) -> Tensor:
        """image_map: (B, C_img, S, S) -> (B, grid * grid, grid_width) after the grid self-attention."""
        grid = F.relu(self.grid_proj(image_map)).flatten(2).transpose(1, 2)  # (B, g*g, grid_width)
        return self.grid_attention(grid + self.grid_position.weight)

    def forward(self, verts: Tensor, image_map: Tensor) -> Tensor:
        if image_map.shape[-1] != self.map_size or image_map.shape[-2] != self.map_size:
            raise ValueError(
                f"image attention: expected a {self.map_size} x {self.map_size} feature map, got "
                f"{tuple(image_map.shape[-2:])} (the model's input_size does not match the images)"
            )
        tokens = torch.cat([verts, self.to_vertex(self.grid_tokens(image_map))], 1)  # (B, N + g*g, C)
        return self.joint_attention(tokens)[:, : verts.shape[1]]


class HandAttention(nn.Module):
    """The reference's ``inter_attn``: a self-attention layer per hand over its own vertices, then the
    cross-hand attention: each hand's vertices query the other hand's, with q / k / v / output projections
    shared by both directions but a pre-norm and a feed-forward per hand:
    ``right' = FF_right(right + MHA(LN_right(right), LN_left(left)))`` and symmetrically for the left.
    right, left: (B, N, C) -> (B, N, C) each.
    """

    def __init__(self, channels: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.self_attention = nn.ModuleDict({side: SelfAttentionBlock(channels, heads, dropout) for side in SIDES})
        self.cross_attention = MultiHeadAttention(channels, heads, dropout)  # shared by both directions
        self.norm = nn.ModuleDict({side: nn.LayerNorm(channels, eps=1e-6) for side in SIDES})
        self.ffn = nn.ModuleDict({side: FeedForward(channels, dropout) for side in SIDES})

    def forward(self, right: Tensor, left: Tensor) -> Tuple[Tensor, Tensor]:
        right, left = self.self_attention["right"](right), self.self_attention["left"](left)
        right_normed, left_normed = self.norm["right"](right), self.norm["left"](left)
        new_right = self.ffn["right"](right + self.cross_attention(right_normed, left_normed))
        new_left = self.ffn["left"](left + self.cross_attention(left_normed, right_normed))
        return new_right, new_left


def _reference_init(module: nn.Module) -> None:
    """The reference's ``weights_init`` of its graph and attention modules: Xavier-uniform weights for linear
    and convolution layers, zero biases for the linear ones (convolution biases keep PyTorch's default)."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(layer.weight)
            if isinstance(layer, nn.Linear) and layer.bias is not None:
                nn.init.zeros_(layer.bias)


class DualGraphLevel(nn.Module):
    """One decoder level for both hands (the reference's ``DualGraphLayer``).

    right, left: (B, N, C_in) node features in graph order; image_map: (B, C_img, S, S) fused feature map;
    laplacians[side]: (N, N). Returns (B, N, C_out) each: a vertex position embedding shared by both hands
    (``nn.Embedding``, default init), a :class:`GraphLayer` per hand (C_in -> C_out at its first block),
    :class:`ImageAttention` per hand and :class:`HandAttention`, all at C_out.
    """

    def __init__(
        self,
        *,
        num_nodes: int,
        in_channels: int,
        out_channels: int,
        image_channels: int,
        map_size: int,
        grid: int,
        grid_width: int,
        blocks: int,
        heads: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.position = nn.Embedding(num_nodes, in_channels)
        self.graph = nn.ModuleDict({side: GraphLayer(in_channels, out_channels, blocks, dropout) for side in SIDES})
        self.image_attention = nn.ModuleDict(
            {
                side: ImageAttention(image_channels, map_size, grid, grid_width, out_channels, heads, dropout)
                for side in SIDES
            }
        )
        self.hand_attention = HandAttention(out_channels, heads, dropout)
        for module in (self.graph, self.image_attention, self.hand_attention):
            _reference_init(module)

    def forward(
        self, right: Tensor, left: Tensor, image_map: Tensor, laplacians: Dict[str, Tensor]
    ) -> Tuple[Tensor, Tensor]:
        features = {"right": right, "left": left}
        for side in SIDES:
            x = self.graph[side](features[side] + self.position.weight, laplacians[side])
            features[side] = self.image_attention[side](x, image_map)
        return self.hand_attention(features["right"], features["left"])


def weak_perspective(points: Tensor, camera: Tensor, image_size: Tuple[int, int]) -> Tensor:
    """points: (B, N, 3) normalised space; camera: (B, 3) (scale, tx, ty); image_size: (H, W).
    Returns (B, N, 2) input-image pixels: ``((scale * xy + t) + 1) / 2 * (W, H) - 0.5``."""
    height, width = image_size
    unit = camera[:, None, :1] * points[..., :2] + camera[:, None, 1:]  # (B, N, 2) in [-1, 1] over the image
    half = (unit + 1.0) * 0.5
    return torch.cat([half[..., :1] * width, half[..., 1:] * height], -1) - 0.5  # no host-to-device copy


def _normalise_pixels(pixels: Tensor, image_size: Tuple[int, int]) -> Tensor:
    """(..., 2) pixels -> (..., 2) in [-1, 1] over the image (the inverse of weak_perspective's last step)."""
    height, width = image_size
    shifted = pixels + 0.5
    return torch.cat([shifted[..., :1] / width, shifted[..., 1:] / height], -1) * 2.0 - 1.0


# The coarse graph's buffers, saved with the weights (one per side: the graph-position -> vertex index, the three
# levels' Laplacians, the last level -> 778 map).
GRAPH_BUFFERS = tuple(
    [f"fill_index_{side}" for side in SIDES]
    + [f"upsample_{side}" for side in SIDES]
    + [f"laplacian_{side}_{index}" for side in SIDES for index in range(len(DECODER_LEVELS))]
)

# Keys only the previous IntagHand layout (before the decoder followed the reference's structure) had.
_PREVIOUS_LAYOUT_KEYS = ("levels.0.patch_proj.weight", "levels.0.out.right.weight", "fuse.0.bias")


def _refuse_previous_layout(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: a checkpoint of the previous IntagHand layout, or one without its coarse
    graphs, fails in one line."""
    if any(prefix + key in state_dict for key in _PREVIOUS_LAYOUT_KEYS):
        raise RuntimeError(
            "intaghand: this checkpoint has the previous IntagHand decoder layout (before the graph decoder was "
            "rebuilt to the reference's structure); it cannot be loaded, retrain it"
        )
    missing = [key for key in GRAPH_BUFFERS if prefix + key not in state_dict]
    if prefix + "coord_head.weight" in state_dict and missing:
        # Its graph would be the one rebuilt here; the coarsening's node order changed once already (a stable
        # sort, docs/intaghand.md), and weights that meet other nodes than those they were trained on mispredict
        # without an error (measured: a demo checkpoint scoring 54.2 mm on a validation split when trained,
        # 95.3 mm when reloaded after that change). Refuse rather than guess.
        raise RuntimeError(
            f"intaghand: this checkpoint carries no coarse graph ({missing[0]} missing; written before IntagHand "
            "checkpoints stored it), so the node order it was trained with cannot be checked: retrain it"
        )


# ----------------------------------------------------------------------------------------------------------
# The regressor
# ----------------------------------------------------------------------------------------------------------


@REGRESSORS.register("intaghand")
class IntagHand(HandModelMixin, nn.Module):
    """IntagHand: image -> both hands' meshes through a two-hand graph decoder (see the module docstring).
    Its input is IntagHand's crop of 1.25x both hands' projected vertex extent (``input_crop = "verts"``).

    Args (keyword-only):
        backbone: a timm ResNet name (random init; ``load_backbone_weights`` reads pretrained weights).
        backbone_kwargs: extra ``timm.create_model`` arguments (e.g. ``channels`` for a narrow test ResNet).
        input_size: side of the square input crop, pixels, a multiple of 32 (IntagHand: 256); the image
            attention's grid convolutions are sized for the fused maps of this input (input_size / 32, / 16, / 8).
        decoder_width: channels of the heatmap and mask/dense decoders (IntagHand: 128).
        fused_width: channels of the fused feature maps (IntagHand: 256).
        gcn_in / gcn_out: node feature widths in / out of the three graph levels (IntagHand: 512/256/128 in,
            256/128/64 out; ``gcn_out[i] == gcn_in[i + 1]``); each level runs at its output width after its
            first graph block.
        grid_widths: channels of the image grid tokens per level (IntagHand: 256/128/64).
        graph_blocks: residual Chebyshev blocks per hand per level (4). heads: attention heads (4);
        dropout: dropout of the graph blocks and attention layers (0.05); patch_grid: image grid tokens per side
            (8; the fused maps' sides must be multiples of it).
        laplacian_rescale: "reference" (IntagHand's code: L / (2 lambda_max) - I, the coarsest level unscaled)
            or "chebyshev" (2 L / lambda_max - I on every level, the form its comment intends). The Laplacians
            are saved with the weights: a loaded checkpoint brings its own, whatever this argument says.
        mano_dir: folder with the official MANO_RIGHT/LEFT.pkl; None: the procedural hand model.
        weight_*: loss weights (FACTS.md §4): verts 100 (L1, also joints and the coarse level), verts_2d 50
            (MSE in [-1, 1] image units, also the coarse level), normal 10, edge 2000 from ``edge_loss_epoch``
            (50) on (see :meth:`set_epoch`), mask 500 (SmoothL1), dense 30 (SmoothL1), heatmap 100 (MSE).
        heatmap_sigma: the Gaussian of the ground-truth heatmaps, decoder pixels (1/4 of the input).
        loss_frame: "shared" (the reference: the 3D terms compare both hands in the normalised space, whose
            origin is the left middle knuckle, so the right hand's terms include the hands' relative position) or
            "per_hand" (each hand's 3D terms about its own middle knuckle, predicted against true, plus a
            ``rel_root`` L1 term, weight ``weight_verts``, on the right knuckle's position from the left one).
    """

    input_crop = "verts"

    def __init__(
        self,
        *,
        backbone: str = "resnet50",
        backbone_kwargs: Optional[Dict] = None,
        input_size: int = 256,
        decoder_width: int = 128,
        fused_width: int = 256,
        gcn_in: List[int] = [512, 256, 128],  # noqa: B006 (copied; the config needs the default as a list)
        gcn_out: List[int] = [256, 128, 64],  # noqa: B006
        grid_widths: List[int] = [256, 128, 64],  # noqa: B006
        graph_blocks: int = 4,
        heads: int = 4,
        dropout: float = 0.05,
        patch_grid: int = 8,
        laplacian_rescale: str = "reference",
        mano_dir: Optional[str] = None,
        weight_verts: float = 100.0,
        weight_verts_2d: float = 50.0,
        weight_normal: float = 10.0,
        weight_edge: float = 2000.0,
        edge_loss_epoch: int = 50,
        weight_mask: float = 500.0,
        weight_dense: float = 30.0,
        weight_heatmap: float = 100.0,
        heatmap_sigma: float = 2.0,
        loss_frame: str = "shared",
    ) -> None:
        super().__init__()
        gcn_in, gcn_out, grid_widths = list(gcn_in), list(gcn_out), list(grid_widths)
        if len(gcn_in) != 3 or len(gcn_out) != 3 or gcn_out[:2] != gcn_in[1:]:
            raise ValueError(
                f"gcn_in / gcn_out: three levels with gcn_out[i] == gcn_in[i + 1], got {gcn_in} / {gcn_out}"
            )
        if gcn_in[0] <= 3:
            raise ValueError(f"gcn_in[0] must exceed 3 (the per-node code), got {gcn_in[0]}")
        if len(grid_widths) != 3:
            raise ValueError(f"grid_widths: one width per level (three), got {grid_widths}")
        for name, widths in (("gcn_out", gcn_out), ("grid_widths", grid_widths)):
            if any(width % heads for width in widths):
                raise ValueError(f"{name} {widths}: every width must be divisible by heads={heads}")
        map_sizes = [input_size // 32, input_size // 16, input_size // 8]
        if input_size % 32 or map_sizes[0] % patch_grid:
            raise ValueError(
                f"input_size={input_size}: must be a multiple of 32 whose 1/32 map ({input_size / 32:g} px) is a "
                f"multiple of patch_grid={patch_grid}"
            )
        if laplacian_rescale not in LAPLACIAN_RESCALES:
            raise ValueError(
                f"laplacian_rescale={laplacian_rescale!r}: expected one of {', '.join(LAPLACIAN_RESCALES)}"
            )
        if graph_blocks < 1:
            raise ValueError(f"graph_blocks must be at least 1, got {graph_blocks}")
        if loss_frame not in LOSS_FRAMES:
            raise ValueError(f"loss_frame={loss_frame!r}: expected one of {', '.join(LOSS_FRAMES)}")
        self.input_size = input_size
        self.encoder = timm.create_model(
            backbone, pretrained=False, features_only=True, out_indices=(1, 2, 3, 4), **(backbone_kwargs or {})
        )
        stage_channels = self.encoder.feature_info.channels()  # strides 4, 8, 16, 32
        top = stage_channels[-1]
        self.heatmap_decoder = FeatureDecoder(top, decoder_width, 2 * 21)
        self.mask_dense_decoder = FeatureDecoder(top, decoder_width, 2 + 6)
        # Fused maps at strides 32, 16, 8: both decoders' features (+ the encoder stage of that stride), each a
        # 1x1 conv (no bias) -> ReLU -> BatchNorm, the reference's conv1x1.
        self.fuse = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(
                        2 * decoder_width + (stage_channels[3 - index] if index > 0 else 0), fused_width, 1, bias=False
                    ),
                    nn.ReLU(inplace=True),
                    nn.BatchNorm2d(fused_width),
                )
                for index in range(3)
            ]
        )
        self.global_layer = nn.ModuleDict(
            {
                side: nn.Sequential(nn.Linear(top, gcn_in[0] - 3), nn.LayerNorm(gcn_in[0] - 3, eps=1e-6))
                for side in SIDES
            }
        )

        # The hand model is kept out of the checkpoint (as the baseline's MANO layer): it is rebuilt from mano_dir,
        # and the sidecar records its fingerprint. The coarse graph derived from it is saved with the weights
        # (persistent buffers below), so that a checkpoint keeps the node order it was trained with.
        self._set_hand_model(mano_dir)
        derived = hand_graphs(self.hand_model)
        graphs = derived.graphs  # only to build the buffers below: after a load, the checkpoint's graph is the model's
        sizes = {side: graphs[side].sizes for side in SIDES}
        if sizes["right"] != sizes["left"]:
            raise ValueError(f"intaghand: the right and left meshes coarsen differently ({sizes})")
        node_counts = [sizes["right"][level] for level in DECODER_LEVELS]  # e.g. 64, 128, 256
        self.levels = nn.ModuleList(
            [
                DualGraphLevel(
                    num_nodes=node_counts[i],
                    in_channels=gcn_in[i],
                    out_channels=gcn_out[i],
                    image_channels=fused_width,
                    map_size=map_sizes[i],
                    grid=patch_grid,
                    grid_width=grid_widths[i],
                    blocks=graph_blocks,
                    heads=heads,
                    dropout=dropout,
                )
                for i in range(3)
            ]
        )
        self.coord_head = nn.Linear(gcn_out[-1], 3)
        self.node_pool = nn.Linear(node_counts[-1], 1)
        self.camera_head = nn.Linear(gcn_out[-1], 3)
        for module in (self.heatmap_decoder, self.mask_dense_decoder, self.global_layer):
            _xavier_init(module)
        _xavier_init(self.coord_head)
        _xavier_init(self.node_pool)
        _xavier_init(self.camera_head)
        with torch.no_grad():
            # Departure from the reference (docs/fidelity.md): its Xavier-initialised heads read features of unit
            # scale (layer-normed, plus attention residuals), so the first predictions are ~1-2 normalised metres
            # and camera translations ~±3 image halves, 20-50x the labels (hands span ~0.1 m). Over the
            # reference's ~10^6 steps Adam shrinks them early; a short schedule spends its steps on it (160 demo
            # steps ended at 189 mm MPVPE). Both heads start with HEAD_INIT_GAIN of Xavier's weights.
            self.coord_head.weight.mul_(HEAD_INIT_GAIN)
            self.camera_head.weight.mul_(HEAD_INIT_GAIN)
            # start the weak-perspective scale at "0.3 normalised metres span the image"
            self.camera_head.bias.copy_(torch.tensor([2.0 / 0.3, 0.0, 0.0]))

        self.register_buffer("image_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        for side in SIDES:
            for index, level in enumerate(DECODER_LEVELS):
                laplacian = graphs[side].chebyshev_laplacian(level, laplacian_rescale)
                self.register_buffer(f"laplacian_{side}_{index}", torch.tensor(laplacian, dtype=torch.float32))
            # The graph is part of the weights: saved and loaded with them (the module docstring). Copies, not
            # views of the cached arrays: loading a checkpoint writes into these buffers, and a view would carry
            # that checkpoint's graph into every model built later in the process.
            self.register_buffer(f"upsample_{side}", torch.tensor(derived.upsample[side]))
            self.register_buffer(f"fill_index_{side}", torch.tensor(graphs[side].fill_index))
        self.register_buffer("dense_code", torch.tensor(derived.dense_code), persistent=False)
        for side in SIDES:  # (21, 778): the 16 regressed joints + IntagHand's tips, in our joint order
            regressor = joint_regressor(self.hand_model.j_regressor_for(side).cpu(), tip_vertices(self.hand_model))
            self.register_buffer(f"joint_regressor_{side}", regressor, persistent=False)
        self.weights = dict(
            verts=weight_verts, verts_2d=weight_verts_2d, normal=weight_normal, edge=weight_edge,
            mask=weight_mask, dense=weight_dense, heatmap=weight_heatmap,
        )
        self.edge_loss_epoch = edge_loss_epoch
        self.heatmap_sigma = heatmap_sigma
        self.loss_frame = loss_frame
        self.epoch = 0
        self.register_load_state_dict_pre_hook(_refuse_previous_layout)

    # -- bookkeeping -------------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Tell the model the current training epoch (0-based): the edge-length loss is on from
        ``edge_loss_epoch``. The trainer calls this at the start of every epoch, or before every step with the
        epoch of ``train.epoch_steps``'s clock when that is set (recon.table2's equal-steps runs)."""
        self.epoch = int(epoch)

    def protocol_evaluator(self) -> IntagHandProtocol:
        """IntagHand's own evaluation protocol (:mod:`eval.intaghand_protocol`: middle-knuckle root, each hand
        rescaled by its ground-truth / predicted bone length), which ``recon.evaluate`` reports beside the
        InterWild-convention metrics as ``IntagHand_MPVPE`` / ``IntagHand_MPJPE``."""
        hand_model = self.hand_model
        return IntagHandProtocol(
            j_regressor_right=hand_model.j_regressor_for("right"),
            j_regressor_left=hand_model.j_regressor_for("left"),
            tip_verts=tip_vertices(hand_model),
        )

    def load_backbone_weights(self, path: str) -> None:
        """Load pretrained ResNet weights into the encoder: a .safetensors file or a torch state dict of the
        ResNet (the classifier's keys are ignored), or the weights of a ``recon.train`` checkpoint of the baseline
        regressor (``RUN/checkpoints/step_*.safetensors``: its ``backbone.*`` entries, the same timm ResNet; the
        demo's stand-in for ImageNet weights, docs/intaghand.md). Raises ValueError when it does not fit."""
        state = read_weights(path)
        if "conv1.weight" not in state and "backbone.conv1.weight" in state:
            state = {key[len("backbone.") :]: value for key, value in state.items() if key.startswith("backbone.")}
        load_backbone_state(self.encoder, state, path, "encoder")

    def to_graph(self, side: str, x: Tensor) -> Tensor:
        """x: (B, 778, C) mesh order -> (B, N0, C) graph order (fake nodes copy a sibling)."""
        return x[:, getattr(self, f"fill_index_{side}")]

    def pool_graph(self, x: Tensor, level: int) -> Tensor:
        """x: (B, N0, C) graph order -> (B, N0 / 2^level, C) cluster means."""
        batch, nodes, channels = x.shape
        return x.reshape(batch, nodes >> level, 1 << level, channels).mean(2)

    # -- forward -----------------------------------------------------------------------------------------

    def forward(self, batch: HandBatch) -> TwoHandOutput:
        """batch.image: (B, 3, H, W) RGB in [0, 1], H = W = ``input_size`` -> TwoHandOutput (each hand relative
        to its own wrist, camera axes, metres; see the module docstring for the conversion). ``extras`` holds
        the normalised-space predictions the losses read: ``{side}_verts_norm`` (B, 778, 3),
        ``{side}_nodes_norm`` (B, N2, 3) (the last level's nodes), ``{side}_verts_img`` / ``{side}_nodes_img``
        pixels, ``{side}_camera``
        (B, 3), ``heatmaps`` (B, 42, H/4, W/4), ``masks`` (B, 2, H/4, W/4), ``dense`` (B, 6, H/4, W/4)."""
        image = batch.image
        height, width = image.shape[-2:]
        if height != self.input_size or width != self.input_size:
            raise ValueError(
                f"intaghand: the input image must be {self.input_size} x {self.input_size} pixels (model.input_size; "
                f"set data.image_size to match), got {height} x {width}"
            )
        stages = self.encoder((image - self.image_mean) / self.image_std)  # strides 4, 8, 16, 32
        heatmaps, heatmap_maps = self.heatmap_decoder(stages[-1])
        mask_dense, mask_dense_maps = self.mask_dense_decoder(stages[-1])
        fused = []
        for index in range(3):  # strides 32, 16, 8
            parts = [heatmap_maps[index], mask_dense_maps[index]] + ([stages[3 - index]] if index > 0 else [])
            fused.append(self.fuse[index](torch.cat(parts, 1)))
        global_feature = stages[-1].mean(dim=(2, 3))  # (B, C_top)

        bsz = image.shape[0]
        code = self.dense_code[None].expand(bsz, -1, -1) * 2.0 - 1.0  # (B, 778, 3)
        features = {}
        for side in SIDES:
            node_code = self.pool_graph(self.to_graph(side, code), DECODER_LEVELS[0])  # (B, N_top, 3)
            start = self.global_layer[side](global_feature)[:, None].expand(-1, node_code.shape[1], -1)
            features[side] = torch.cat([start, node_code], -1)  # (B, N_top, gcn_in[0])
        for index, level in enumerate(self.levels):
            laplacians = {side: getattr(self, f"laplacian_{side}_{index}") for side in SIDES}
            features["right"], features["left"] = level(features["right"], features["left"], fused[index], laplacians)
            if index < 2:
                features = {side: value.repeat_interleave(2, dim=1) for side, value in features.items()}

        hand_model = self._hand_model_on(image.device)
        size = (height, width)
        extras: Dict[str, Tensor] = {"heatmaps": heatmaps, "masks": mask_dense[:, :2], "dense": mask_dense[:, 2:]}
        out: Dict[str, Tensor] = {}
        for side in SIDES:
            nodes = self.coord_head(features[side])  # (B, N2, 3) normalised space, graph order
            camera = self.camera_head(self.node_pool(features[side].transpose(1, 2))[..., 0])  # (B, 3)
            verts = torch.einsum("vn,bnc->bvc", getattr(self, f"upsample_{side}"), nodes)  # (B, 778, 3)
            joints = _joints_from_verts(hand_model, side, verts, getattr(self, f"joint_regressor_{side}"))  # (B, 21, 3)
            extras.update(
                {
                    f"{side}_nodes_norm": nodes,
                    f"{side}_verts_norm": verts,
                    f"{side}_joints_norm": joints,
                    f"{side}_camera": camera,
                    f"{side}_nodes_img": weak_perspective(nodes, camera, size),
                    f"{side}_verts_img": weak_perspective(verts, camera, size),
                }
            )
            out[f"{side}_joints_img"] = weak_perspective(joints, camera, size)

        # Boundary conversion: normalised space -> wrist-rooted metres (module docstring).
        metres = torch.ones(bsz, device=image.device, dtype=image.dtype)
        out.update(
            normalised_to_metric(
                extras["right_verts_norm"], extras["left_verts_norm"], extras["right_joints_norm"],
                extras["left_joints_norm"], metres,
            )
        )
        return TwoHandOutput(
            right_verts=out["right_verts"],
            left_verts=out["left_verts"],
            right_joints=out["right_joints"],
            left_joints=out["left_joints"],
            rel_root=out["rel_root"],
            right_joints_img=out["right_joints_img"],
            left_joints_img=out["left_joints_img"],
            extras=extras,
        )

    # -- losses ------------------------------------------------------------------------------------------

    def _labels(self, batch: HandBatch, hand_model: HandModel) -> Dict[str, Tensor]:
        """Ground truth in the normalised space (see :func:`normalise_labels`)."""
        has_mesh, verts_cam, joints_cam = {}, {}, {}
        for side in SIDES:
            gt = batch.hand(side)
            has_mesh[side] = gt.valid & gt.mano_valid
            verts_cam[side] = gt.verts_cam.to(batch.image.dtype)
            joints_cam[side] = _joints_from_verts(
                hand_model, side, verts_cam[side], getattr(self, f"joint_regressor_{side}")
            )
        origin, scale, valid = normalise_labels(
            verts_cam["right"], verts_cam["left"], joints_cam["right"], joints_cam["left"],
            has_mesh["right"], has_mesh["left"],
        )
        labels = {"origin": origin, "scale": scale, "valid": valid}
        for side in SIDES:
            labels[f"{side}_has_mesh"] = has_mesh[side]
            labels[f"{side}_verts_cam"] = verts_cam[side]
            labels[f"{side}_verts_norm"] = (verts_cam[side] - origin[:, None]) * scale[:, None, None]
            labels[f"{side}_joints_norm"] = (joints_cam[side] - origin[:, None]) * scale[:, None, None]
        return labels

    def losses(self, output: TwoHandOutput, batch: HandBatch) -> Dict[str, Tensor]:
        """IntagHand's weighted terms (FACTS.md §4), each averaged over the two hands and masked by validity:
        ``verts``, ``joints``, ``verts_2d``, ``normal``, ``edge`` (0 before ``edge_loss_epoch``),
        ``coarse_verts``, ``coarse_verts_2d`` (the last level's nodes against the pooled ground truth), ``mask``,
        ``dense`` (ground truth rendered from the GT meshes at the decoder's resolution), ``heatmap``; with
        ``loss_frame="per_hand"`` also ``rel_root`` (both hands labelled: right minus left middle knuckle).
        3D terms compare normalised-space coordinates (``per_hand``: each hand's about its own middle knuckle);
        2D terms image coordinates scaled to [-1, 1]."""
        extras = output.extras
        hand_model = self._hand_model_on(output.right_verts.device)
        labels = self._labels(batch, hand_model)
        size = tuple(batch.image.shape[-2:])
        K = batch.camera.K.to(batch.image.dtype)
        zero = output.rel_root.new_zeros(())
        names = ("verts", "joints", "verts_2d", "normal", "edge", "coarse_verts", "coarse_verts_2d")
        terms = {name: zero for name in names}
        per_hand = self.loss_frame == "per_hand"
        roots = {}  # per_hand: each hand's middle knuckle, predicted and true, (B, 1, 3)
        for side in SIDES:
            valid = labels[f"{side}_has_mesh"]  # (B,)
            pred_root = extras[f"{side}_joints_norm"][:, MIDDLE_KNUCKLE : MIDDLE_KNUCKLE + 1]
            gt_root = labels[f"{side}_joints_norm"][:, MIDDLE_KNUCKLE : MIDDLE_KNUCKLE + 1]
            roots[side] = (pred_root, gt_root)
            if not per_hand:  # the reference: every 3D term in the shared frame (origin: the left middle knuckle)
                pred_root, gt_root = torch.zeros_like(pred_root), torch.zeros_like(gt_root)
            gt_verts = labels[f"{side}_verts_norm"] - gt_root
            pred_verts = extras[f"{side}_verts_norm"] - pred_root
            gt_verts_img = project(labels[f"{side}_verts_cam"], K)  # (B, 778, 2)
            terms["verts"] = terms["verts"] + _masked_mean((pred_verts - gt_verts).abs(), valid) / 2
            terms["joints"] = terms["joints"] + _masked_mean(
                ((extras[f"{side}_joints_norm"] - pred_root) - (labels[f"{side}_joints_norm"] - gt_root)).abs(), valid
            ) / 2
            error_2d = _normalise_pixels(extras[f"{side}_verts_img"], size) - _normalise_pixels(gt_verts_img, size)
            terms["verts_2d"] = terms["verts_2d"] + _masked_mean(error_2d**2, valid) / 2
            faces = hand_model.faces_for(side)
            terms["normal"] = terms["normal"] + _masked_mean(_normal_error(pred_verts, gt_verts, faces), valid) / 2
            terms["edge"] = terms["edge"] + _masked_mean(_edge_error(pred_verts, gt_verts, faces), valid) / 2
            level = DECODER_LEVELS[-1]
            gt_nodes = self.pool_graph(self.to_graph(side, gt_verts), level)  # (B, N2, 3)
            gt_nodes_img = self.pool_graph(self.to_graph(side, gt_verts_img), level)  # (B, N2, 2)
            terms["coarse_verts"] = terms["coarse_verts"] + _masked_mean(
                ((extras[f"{side}_nodes_norm"] - pred_root) - gt_nodes).abs(), valid
            ) / 2
            coarse_2d = _normalise_pixels(extras[f"{side}_nodes_img"], size) - _normalise_pixels(gt_nodes_img, size)
            terms["coarse_verts_2d"] = terms["coarse_verts_2d"] + _masked_mean(coarse_2d**2, valid) / 2
        if per_hand:  # the hands' relative position, which the shared frame puts into every right-hand vertex
            both = labels["right_has_mesh"] & labels["left_has_mesh"]
            pred_rel = roots["right"][0] - roots["left"][0]
            gt_rel = roots["right"][1] - roots["left"][1]
            terms["rel_root"] = _masked_mean((pred_rel - gt_rel).abs(), both)
        terms.update(self._aux_losses(output, batch, labels, K))
        weights = dict(
            rel_root=self.weights["verts"],
            verts=self.weights["verts"],
            joints=self.weights["verts"],
            verts_2d=self.weights["verts_2d"],
            normal=self.weights["normal"],
            edge=self.weights["edge"] if self.epoch >= self.edge_loss_epoch else 0.0,
            coarse_verts=self.weights["verts"],
            coarse_verts_2d=self.weights["verts_2d"],
            mask=self.weights["mask"],
            dense=self.weights["dense"],
            heatmap=self.weights["heatmap"],
        )
        return {name: weights[name] * value for name, value in terms.items()}

    def _aux_losses(
        self, output: TwoHandOutput, batch: HandBatch, labels: Dict[str, Tensor], K: Tensor
    ) -> Dict[str, Tensor]:
        """Mask, dense and heatmap terms at the decoders' resolution (1/4 of the input)."""
        extras = output.extras
        pred_masks, pred_dense, pred_heatmaps = extras["masks"], extras["dense"], extras["heatmaps"]
        map_h, map_w = pred_masks.shape[-2:]
        height, width = batch.image.shape[-2:]
        sx, sy = map_w / width, map_h / height
        # Pixel centres at integers: x_map = (x + 0.5) * sx - 0.5.
        to_map = K.new_tensor([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])
        gt_masks, gt_dense = self._render_targets(labels, to_map @ K, (map_h, map_w))
        # A sample whose present hands all have meshes has complete mask / dense targets.
        complete = labels["valid"]
        for side in SIDES:
            complete = complete & (labels[f"{side}_has_mesh"] | ~batch.hand(side).valid)
        mask_error = F.smooth_l1_loss(pred_masks, gt_masks, beta=0.05, reduction="none")  # (B, 2, h, w)
        dense_error = torch.stack(
            [
                F.smooth_l1_loss(
                    pred_dense[:, 3 * i : 3 * i + 3] * gt_masks[:, i : i + 1],
                    gt_dense * gt_masks[:, i : i + 1],
                    beta=0.05,
                    reduction="none",
                )
                for i in range(2)
            ],
            1,
        )  # (B, 2, 3, h, w)
        # Heatmaps: right 21 then left 21 channels; a channel counts when its joint is labelled.
        joints_img = torch.cat([batch.right.joints_img, batch.left.joints_img], 1).to(pred_heatmaps.dtype)  # (B, 42, 2)
        joints_map = (
            joints_img * joints_img.new_tensor([sx, sy])
            + joints_img.new_tensor([0.5 * sx - 0.5, 0.5 * sy - 0.5])
        )
        joints_valid = torch.cat(
            [
                batch.right.joints_trunc & batch.right.valid[:, None],  # 2D labels: joints_trunc
                batch.left.joints_trunc & batch.left.valid[:, None],
            ],
            1,
        )  # (B, 42)
        ys = torch.arange(map_h, device=joints_map.device, dtype=joints_map.dtype)
        xs = torch.arange(map_w, device=joints_map.device, dtype=joints_map.dtype)
        gx = torch.exp(-((xs[None, None] - joints_map[..., :1]) ** 2) / (2 * self.heatmap_sigma**2))  # (B, 42, w)
        gy = torch.exp(-((ys[None, None] - joints_map[..., 1:]) ** 2) / (2 * self.heatmap_sigma**2))  # (B, 42, h)
        gt_heatmaps = gy[..., :, None] * gx[..., None, :]  # (B, 42, h, w)
        heatmap_error = (pred_heatmaps - gt_heatmaps) ** 2
        return {
            "mask": _masked_mean(mask_error, complete),
            "dense": _masked_mean(dense_error, complete),
            "heatmap": _masked_mean(heatmap_error, joints_valid, dims=2),
        }

    @torch.no_grad()
    def _render_targets(self, labels: Dict[str, Tensor], K_map: Tensor, size: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
        """Render the GT meshes once (both hands in one z-buffer, unlit vertex colours = dense code).
        Returns masks (B, 2, h, w) float (right, left) and dense (B, 3, h, w) in [0, 1] (0 off the hands)."""
        hand_model = self.hand_model
        right, left = labels["right_verts_cam"], labels["left_verts_cam"]
        batch, num_right = right.shape[:2]
        faces_right, faces_left = hand_model.faces_for("right"), hand_model.faces_for("left")
        faces = torch.cat([faces_right, faces_left + num_right], 0)  # (F_r + F_l, 3)
        face_valid = torch.cat(
            [
                labels["right_has_mesh"][:, None].expand(-1, faces_right.shape[0]),
                labels["left_has_mesh"][:, None].expand(-1, faces_left.shape[0]),
            ],
            1,
        )  # (B, F_r + F_l)
        # Hands without a mesh are moved in front of the camera so that their (undrawn) projection is finite.
        safe = {
            side: torch.where(
                labels[f"{side}_has_mesh"][:, None, None], labels[f"{side}_verts_cam"], torch.ones_like(right)
            )
            for side in SIDES
        }
        colors = self.dense_code.to(right.dtype)[None].expand(batch, -1, -1)
        rendered = render_mesh(
            torch.cat([safe["right"], safe["left"]], 1),
            faces,
            K_map,
            size,
            vertex_colors=torch.cat([colors, colors], 1),
            face_valid=face_valid,
            ambient=1.0,
        )
        face_index = rendered.fragments.face_index  # (B, h, w)
        right_mask = (face_index >= 0) & (face_index < faces_right.shape[0])
        left_mask = face_index >= faces_right.shape[0]
        masks = torch.stack([right_mask, left_mask], 1).to(right.dtype)
        return masks, rendered.image


def _masked_mean(error: Tensor, valid: Tensor, dims: int = 1) -> Tensor:
    """Mean of ``error`` (B, ...) over the entries whose leading ``dims`` indices are valid ((B,) or (B, C)
    bool); 0 with a gradient path when nothing is valid."""
    weight = valid.to(error.dtype).reshape(*valid.shape, *([1] * (error.dim() - dims))).expand_as(error)
    return (error * weight).sum() / weight.sum().clamp(min=1.0)


def _face_edges(verts: Tensor, faces: Tensor) -> Tensor:
    """verts (B, V, 3), faces (F, 3) -> (B, F, 3, 3): the edges v0 - v1, v1 - v2, v2 - v0 of each face."""
    tri = verts[:, faces]  # (B, F, 3, 3)
    return torch.stack([tri[:, :, 0] - tri[:, :, 1], tri[:, :, 1] - tri[:, :, 2], tri[:, :, 2] - tri[:, :, 0]], 2)


def _normal_error(pred_verts: Tensor, gt_verts: Tensor, faces: Tensor) -> Tensor:
    """(B, F, 3) |cos| between each predicted edge and the ground-truth face normal (IntagHand's normal loss)."""
    gt_edges = _face_edges(gt_verts, faces)
    gt_normal = F.normalize(torch.linalg.cross(gt_edges[:, :, 0], gt_edges[:, :, 1]), dim=-1)  # (B, F, 3)
    pred_edges = F.normalize(_face_edges(pred_verts, faces), dim=-1)  # (B, F, 3, 3)
    return (pred_edges * gt_normal[:, :, None]).sum(-1).abs()


def _edge_error(pred_verts: Tensor, gt_verts: Tensor, faces: Tensor) -> Tensor:
    """(B, F, 3) absolute difference of the edge lengths."""
    return (_face_edges(pred_verts, faces).norm(dim=-1) - _face_edges(gt_verts, faces).norm(dim=-1)).abs()
