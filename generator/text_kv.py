"""Cross-attention keys and values of the prompt embeddings, computed once per sampling call.

In the denoising loop the text embeddings are the same at every step, and so is every cross-attention layer's
`to_k(text)` and `to_v(text)`. `TextKVProcessor` is diffusers' `AttnProcessor2_0` (the same operations in the
same order, so the same values) that also takes them precomputed: `text_kv`, a dict from each layer's key to
its (key, value), passed to the UNet and the ControlNet through `cross_attention_kwargs`. Without it (training,
TAS's updates, diffusers' own pipeline sharing the modules), or in self-attention, it computes them itself.

`install(model, prefix)` puts one on every attention layer of a UNet or ControlNet whose processors are all
diffusers' default; `text_kv(model, text)` computes the dict for one call.

`math=True` computes the attention as softmax(q k^T / sqrt(d)) v with plain matrix products instead of
`F.scaled_dot_product_attention`: the same values to float rounding (about 2e-6 on the P1 images), and under
`torch.compile` on the CPU faster at the small head sizes of the tiny generator, where the fused SDPA kernel is
slow (docs/performance.md, P1). Masks are not supported there (the pipeline passes none).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0


class TextKVProcessor:
    """AttnProcessor2_0 with optional precomputed cross-attention keys and values (`text_kv[self.key]`)."""

    def __init__(self, key: str, math: bool = False):
        self.key = key
        self.math = math

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 text_kv: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        cached = text_kv.get(self.key) if text_kv is not None and encoder_hidden_states is not None else None
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                          else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if cached is not None:
            key, value = cached
        else:
            key, value = _key_value(attn, hidden_states if encoder_hidden_states is None else encoder_hidden_states,
                                    cross=encoder_hidden_states is not None)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if self.math and attention_mask is None:
            scores = torch.matmul(query * (query.shape[-1] ** -0.5), key.transpose(-1, -2))
            hidden_states = torch.matmul(scores.softmax(-1), value)
        else:
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                           is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _key_value(attn: Attention, context: torch.Tensor, *, cross: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if cross and attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    return attn.to_k(context), attn.to_v(context)


def install(model, prefix: str, math: bool = False) -> bool:
    """Put a `TextKVProcessor` (keyed `prefix` + layer name) on every attention layer of `model` (a diffusers
    UNet or ControlNet). Only when all its processors are diffusers' default `AttnProcessor2_0` (others, e.g. a
    recorder or xformers, are left alone); returns whether it did. Idempotent (sets `math` on installed ones)."""
    processors = model.attn_processors
    if processors and all(isinstance(p, TextKVProcessor) for p in processors.values()):
        for processor in processors.values():
            processor.math = math
        return True
    if not processors or not all(type(p) is AttnProcessor2_0 for p in processors.values()):
        return False
    model.set_attn_processor({name: TextKVProcessor(prefix + name, math) for name in processors})
    return True


def text_kv(model, text: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(key, value) of `text` (N, 77, D) for each cross-attention layer of `model` that has a TextKVProcessor."""
    out = {}
    for module in model.modules():
        if isinstance(module, Attention) and module.is_cross_attention and isinstance(module.processor,
                                                                                      TextKVProcessor):
            out[module.processor.key] = _key_value(module, text, cross=True)
    return out
