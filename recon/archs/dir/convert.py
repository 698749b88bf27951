"""Convert a state dict of the reference DIR (PengfeiRen96/DIR ``models/dir.py``, e.g. the ``net`` entry of its
released checkpoint) to this package's parameter names.

The reference's module tree is ``backbone`` (torchvision ResNet-50 layout, which timm's ``features_only`` ResNet
shares), ``init_regressor`` and ``decoder`` (``skip_layer4``, ``fusion_layer4``, ``projecter_4``, ``enhance_layer4``,
``skip_layer3``, ``fusion_layer3``, ``projecter_3``, ``enhance_layer3``, ``conv_final``, ``seg``, ``dense``). Entries
that have no counterpart here are dropped, each for a stated reason: the classifier ``backbone.fc`` and every
``STEblocks.0`` (never called), the manopth layers' buffers (MANO data: the hand model is rebuilt from
``--mano-dir``), the constant cell grids ``img_gird`` and the loss modules' buffers (``seg_loss.weight``).
"""
from __future__ import annotations

import re
from typing import Dict

from torch import Tensor

__all__ = ["convert_reference_state_dict", "is_reference_state_dict"]

_RESIDUAL = {"bn1": "branch.0", "conv1.conv": "branch.2", "bn2": "branch.3", "conv2.conv": "branch.5",
             "bn3": "branch.6", "conv3.conv": "branch.8", "skip_layer.conv": "skip"}
_DECODER_RESIDUALS = {"skip_layer4": "skip4", "fusion_layer4": "fuse4", "skip_layer3": "skip3",
                      "fusion_layer3": "fuse3", "enhance_layer4": "enhance.0", "enhance_layer3": "enhance.1"}
_STAGES = {"projecter_4": "stages.0", "projecter_3": "stages.1"}
_SIDE = {"left": "left", "right": "right"}
_STE_BLOCK = {"norm1": "norm1", "attn.qkv": "attn.qkv", "attn.proj": "attn.proj", "norm2": "norm2",
              "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.2"}
_GRAPH_CONV = {"W": "weight", "e_0": "edge_self", "e_1": "edge_neighbours", "bias": "bias"}
_DROPPED = (
    re.compile(r"^backbone\.fc\."),  # the ImageNet classifier, never called
    re.compile(r"\.STEblocks\.0\."),  # STE's first block: its loop starts at 1
    re.compile(r"(^|\.)mano_layer_(left|right)\."),  # manopth buffers (MANO data)
    re.compile(r"\.img_gird$"),  # the bone projection's constant cell grid (computed from the map's size here)
    re.compile(r"^(seg_loss|l1_loss|normal_loss_\w+|edge_loss_\w+)\."),  # loss modules' buffers
)


def is_reference_state_dict(state: Dict[str, Tensor]) -> bool:
    """True when ``state`` has the reference DIR's top-level names (``decoder.projecter_4...``)."""
    return any(key.startswith("decoder.projecter_4.") for key in state)


def _stage_key(rest: str) -> str:
    """A key inside ``Joint2BoneFeature`` -> the key inside :class:`recon.archs.dir.heads.RefineStage`."""
    match = re.match(r"img2joint_(left|right)\.filters\.(.*)$", rest)
    if match:
        return f"image_to_joint.{match[1]}.mlp.{match[2]}"
    match = re.match(r"pos_emb_(left|right)\.(.*)$", rest)
    if match:
        return f"position.{match[1]}.{match[2]}"
    match = re.match(r"gcn_(left|right)\.gconv_layers\.(\d+)\.gconv\.(W|e_0|e_1|bias)$", rest)
    if match:
        return f"gcn.{match[1]}.convs.{match[2]}.{_GRAPH_CONV[match[3]]}"
    match = re.match(r"gcn_(left|right)\.gconv_layers\.(\d+)\.bn\.(.*)$", rest)
    if match:
        return f"gcn.{match[1]}.norms.{match[2]}.{match[3]}"
    if rest.startswith("global_pos_emb."):
        return "global_position." + rest[len("global_pos_emb."):]
    if rest.startswith("proj_feat_emb."):
        return "paint_embedding." + rest[len("proj_feat_emb."):]
    if rest.startswith("fusion."):
        return rest
    match = re.match(r"regressor\.mano_(left|right)\.(.*)$", rest)
    if match:
        return f"params.{match[1]}.{match[2]}"
    if rest.startswith("regressor.offset."):
        return "offset." + rest[len("regressor.offset."):]
    if rest == "interaction.spatial_pos_embed":
        return "interaction.position"
    if rest.startswith("interaction.spatial_norm."):
        return "interaction.block_norm." + rest[len("interaction.spatial_norm."):]
    if rest.startswith("interaction.head."):
        return rest
    match = re.match(r"interaction\.STEblocks\.(\d+)\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(.*)$", rest)
    if match:
        return f"interaction.blocks.{int(match[1]) - 1}.{_STE_BLOCK[match[2]]}.{match[3]}"
    raise KeyError(rest)


def _key(key: str) -> str:
    if key.startswith("backbone."):
        return "encoder." + key[len("backbone."):]
    match = re.match(r"init_regressor\.attention_(left|right)\.(.*)$", key)
    if match:
        return f"init_regressor.attention.{match[1]}.{match[2]}"
    match = re.match(r"init_regressor\.mano_(left|right)\.(.*)$", key)
    if match:
        return f"init_regressor.params.{match[1]}.{match[2]}"
    if key.startswith("init_regressor.offset."):
        return key
    match = re.match(r"decoder\.(\w+?)\.(.*)$", key)
    if match:
        module, rest = match[1], match[2]
        if module in _DECODER_RESIDUALS:
            prefix, _, leaf = rest.rpartition(".")
            return f"{_DECODER_RESIDUALS[module]}.{_RESIDUAL[prefix]}.{leaf}"
        if module in _STAGES:
            return f"{_STAGES[module]}.{_stage_key(rest)}"
        if module == "conv_final":
            return "final." + rest
        if module in ("seg", "dense"):
            return f"{module}_head.{rest}"
    raise KeyError(key)


def convert_reference_state_dict(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The reference DIR's state dict (``models/dir.py`` names; a ``module.`` prefix from DataParallel is
    removed) -> a state dict of :class:`recon.archs.dir.DIR` at paper size. Raises KeyError naming the first
    reference key that has no counterpart and is not one of the documented drops."""
    out = {}
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if any(pattern.search(key) for pattern in _DROPPED):
            continue
        try:
            name = _key(key)
        except KeyError:
            raise KeyError(f"reference DIR key {key!r} has no counterpart in recon.archs.dir") from None
        # SemGCN keeps its edge weights as (1, E) rows; ours are (E,)
        out[name] = value.reshape(-1) if name.endswith((".edge_self", ".edge_neighbours")) else value
    return out
