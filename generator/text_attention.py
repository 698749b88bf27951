"""Text attention stage (TAS), paper §3.3 Eqs. (2)-(4), after Attend-and-Excite.

Conventions (shared by the whole module):
- Attention maps are cross-attention probabilities of the UNet at the *attention resolution* (H, W) =
  latent size / `attention_downsample` (16 x 16 for SD 1.5's 64 x 64 latents, downsample 4), averaged over
  heads and over every cross-attention layer running at that resolution: (B, H, W, T) with T = 77 tokens,
  position 0 = the start token. Each map row sums to 1 over the T tokens.
- Recording uses diffusers attention processors installed by module path (`unet.set_attn_processor`);
  the recorded tensors live in an `AttentionStore` outside the UNet. Nothing patches the UNet's code.
- The TAS forward (`tas_attention_maps`) takes the *conditional* text embedding only and stops right after the
  last cross-attention layer at the attention resolution: the recorder raises a private exception once that
  layer has recorded. We chose this over running the down/mid/up blocks by hand because it reuses diffusers'
  own `UNet2DConditionModel.forward` unchanged (time and class embeddings, skip wiring, upsample sizes, added
  residuals) for any UNet configuration; a hand-written partial forward would copy that logic and drift from it.
  For SD 1.5 it skips the two finest up blocks (32 x 32 and 64 x 64), the most expensive part of the UNet.
  The UNet keeps no state across the exit (diffusers' forward wrapper restores LoRA scales in a `finally`).
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Sequence

import kornia
import torch

TOKENS_FIRST, TOKENS_LAST = 1, 75  # positions TAS looks at: drop the start token (0) and the last position (76)
SOFTMAX_SCALE = 100.0
# The reference writes sigma 0.5 in exp(-((x - mu) / (2 sigma))^2), i.e. a Gaussian of std sigma * sqrt(2).
SMOOTHING_SIGMA = 0.5 * math.sqrt(2.0)
SMOOTHING_KERNEL = 3


class _StopForward(Exception):
    """Raised by the recorder after the last needed layer: ends the TAS forward early (private)."""


class AttentionStore:
    """Cross-attention maps recorded by `CrossAttentionRecorder`s during UNet forwards (lives outside the UNet).

    layer_names: processor names (keys of `unet.attn_processors`) recorded, in execution order.
    attention_hw: (H, W) of the attention resolution.
    Flags set by the caller: `active` (record; otherwise the original processors run untouched) and
    `stop_early` (raise `_StopForward` after the last layer in `layer_names` has recorded).
    """

    def __init__(self, layer_names: Sequence[str], attention_hw: tuple[int, int]):
        if not layer_names:
            raise ValueError("AttentionStore needs at least one cross-attention layer name")
        self.layer_names = list(layer_names)
        self.attention_hw = (int(attention_hw[0]), int(attention_hw[1]))
        self.active = False
        self.stop_early = False
        self._maps: list[torch.Tensor] = []

    def reset(self) -> None:
        self._maps = []

    def record(self, name: str, probs: torch.Tensor) -> None:
        """probs: (B, heads, H*W, T) attention probabilities of layer `name`."""
        h, w = self.attention_hw
        if probs.shape[2] != h * w:
            raise RuntimeError(f"layer {name} attends over {probs.shape[2]} pixels, expected {h}x{w}={h * w}: the "
                               "latent size does not match the one the store was built for")
        # (B, HW, T) in fp32 at least, whatever the UNet's dtype (bf16 / fp16 sampling)
        self._maps.append(probs.to(torch.promote_types(probs.dtype, torch.float32)).mean(dim=1))
        if self.stop_early and name == self.layer_names[-1]:
            raise _StopForward

    def maps(self) -> torch.Tensor:
        """The recorded maps averaged over heads and layers: (B, H, W, T)."""
        if len(self._maps) != len(self.layer_names):
            raise RuntimeError(f"recorded {len(self._maps)} of {len(self.layer_names)} cross-attention layers "
                               "(are the recorders installed? run inside `with recording(unet, store):`)")
        mean = torch.stack(self._maps).mean(dim=0)  # (B, HW, T)
        return mean.unflatten(1, self.attention_hw)  # (B, H, W, T)


class CrossAttentionRecorder:
    """Attention processor recording cross-attention probabilities into a store (diffusers processor API).

    When the store is inactive it calls the layer's original processor. When active it runs diffusers' classic
    `AttnProcessor` computation with explicit probabilities (SDPA does not return them) and records them.
    """

    def __init__(self, store: AttentionStore, name: str, original):
        self.store = store
        self.name = name
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if not self.store.active:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        # Mirrors diffusers.models.attention_processor.AttnProcessor, keeping the probabilities.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        query = attn.head_to_batch_dim(query)
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B*heads, HW, T)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        out = out / attn.rescale_output_factor
        self.store.record(self.name, probs.unflatten(0, (-1, attn.heads)))  # (B, heads, HW, T)
        return out


_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^(mid_block)\.")
_ORDER = re.compile(r"attentions\.(\d+)\.transformer_blocks\.(\d+)\.")


def _level_sizes(unet, latent_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """Spatial size at which each down block runs (a stride-2 conv with padding 1 maps n -> ceil(n / 2))."""
    sizes, (h, w) = [], latent_hw
    for block in unet.down_blocks:
        sizes.append((h, w))
        if getattr(block, "downsamplers", None):
            h, w = (h + 1) // 2, (w + 1) // 2
    return sizes


def cross_attention_layers(unet, latent_hw: tuple[int, int], attention_hw: tuple[int, int]) -> list[str]:
    """Names (keys of `unet.attn_processors`) of the cross-attention layers running at `attention_hw`, in
    execution order. latent_hw: (h, w) of the UNet input latents. Raises ValueError naming the available sizes."""
    sizes = _level_sizes(unet, tuple(latent_hw))
    n_down, n_up = len(unet.down_blocks), len(unet.up_blocks)
    found: dict[tuple[int, int], list[tuple[tuple, str]]] = {}
    for name in unet.attn_processors:
        if ".attn2." not in name:
            continue
        m = _BLOCK.match(name)
        if m is None:
            continue
        if m.group(3):  # mid block runs at the coarsest level
            stage, index, size = 1, 0, sizes[n_down - 1]
        elif m.group(1) == "down_blocks":
            stage, index = 0, int(m.group(2))
            size = sizes[index]
        else:  # up block j runs at the size of down level n_up - 1 - j
            stage, index = 2, int(m.group(2))
            size = sizes[n_up - 1 - index]
        o = _ORDER.search(name)
        order = (stage, index, *(map(int, o.groups()) if o else (0, 0)), name)
        found.setdefault(size, []).append((order, name))
    target = (int(attention_hw[0]), int(attention_hw[1]))
    if target not in found:
        raise ValueError(f"no cross-attention layer of this UNet runs at {target[0]}x{target[1]} for "
                         f"{latent_hw[0]}x{latent_hw[1]} latents; available: "
                         f"{sorted(f'{h}x{w}' for h, w in found)} (set attention_downsample accordingly)")
    return [name for _, name in sorted(found[target])]


def attention_hw_for(latent_hw: tuple[int, int], attention_downsample: int) -> tuple[int, int]:
    """The attention resolution for latents of size latent_hw: (h // downsample, w // downsample)."""
    h, w = latent_hw[0] // attention_downsample, latent_hw[1] // attention_downsample
    if h < 1 or w < 1:
        raise ValueError(f"attention_downsample {attention_downsample} is too large for {latent_hw} latents")
    return h, w


@contextmanager
def recording(unet, store: AttentionStore) -> Iterator[AttentionStore]:
    """Install `CrossAttentionRecorder`s on `store.layer_names` (by module path) for the duration of the block;
    the UNet's previous processors are restored on exit. Recording starts only when `store.active` is set."""
    previous = unet.attn_processors
    missing = [n for n in store.layer_names if n not in previous]
    if missing:
        raise ValueError(f"the UNet has no attention layers named {missing}")
    processors = dict(previous)
    for name in store.layer_names:
        processors[name] = CrossAttentionRecorder(store, name, previous[name])
    unet.set_attn_processor(processors)
    try:
        yield store
    finally:
        unet.set_attn_processor(previous)


def tas_attention_maps(unet, store: AttentionStore, latents: torch.Tensor, timestep, cond_embeds: torch.Tensor,
                       *, early_exit: bool = True, **unet_kwargs) -> torch.Tensor:
    """The TAS forward: attention maps of `latents` under the conditional text embedding.

    Needs recorders installed (`recording(unet, store)`). latents: (B, C, h, w) scaled model input;
    timestep: int or tensor; cond_embeds: (B, 77, D) conditional text embedding. early_exit: stop after the last
    cross-attention layer at the attention resolution (False runs the whole UNet; same maps).
    Returns (B, H, W, 77), differentiable w.r.t. latents.
    """
    store.reset()
    store.active, store.stop_early = True, early_exit
    try:
        unet(latents, timestep, encoder_hidden_states=cond_embeds, return_dict=False, **unet_kwargs)
    except _StopForward:
        pass
    finally:
        store.active, store.stop_early = False, False
    return store.maps()


def token_mask(token_indices: Sequence[Sequence[int]], device=None) -> torch.Tensor:
    """(B, 75) bool mask over positions 1..75 from per-sample hand-token positions. Build it once, outside a
    sampling loop, to keep the loop free of host-to-device copies."""
    mask = torch.zeros(len(token_indices), TOKENS_LAST, dtype=torch.bool)
    for i, indices in enumerate(token_indices):
        for position in indices:
            if not TOKENS_FIRST <= position <= TOKENS_LAST:
                raise ValueError(f"token position {position} of sample {i} is outside 1..75")
            mask[i, position - TOKENS_FIRST] = True
    return mask.to(device)


def _selection(attention: torch.Tensor, token_indices) -> torch.Tensor:
    b = attention.shape[0]
    selected = token_indices if isinstance(token_indices, torch.Tensor) else token_mask(token_indices)
    if selected.shape != (b, TOKENS_LAST):
        raise ValueError(f"token selection has shape {tuple(selected.shape)} for {b} attention maps; "
                         f"expected ({b}, {TOKENS_LAST})")
    return selected.to(attention.device)  # no-op when built on the attention's device


def tas_loss_batch(attention: torch.Tensor, token_indices: Sequence[Sequence[int]] | torch.Tensor, *,
                   smoothing: bool = True) -> torch.Tensor:
    """L_TAS (Eq. 3) per sample.

    attention: (B, H, W, T) averaged cross-attention maps (T = 77). token_indices: per sample, positions in the
    CLIP sequence (1..75) of the hand-related tokens, or their (B, 75) `token_mask`. Steps (as the reference):
    take positions 1..75, x100, softmax over those tokens, smooth each map with a 3x3 Gaussian (std 0.5*sqrt(2),
    reflect padding 1), peak over patches s_n; loss = max over selected tokens of max(0, 1 - s_n).
    smoothing False: no Gaussian filter (the paper's Fig. 10 ablation "w/o Gaussian filter").
    Samples with no token get 0. Returns (B,).
    """
    selected = _selection(attention, token_indices)
    probs = torch.softmax(attention[..., TOKENS_FIRST:TOKENS_LAST + 1] * SOFTMAX_SCALE, dim=-1)  # (B, H, W, 75)
    maps = probs.permute(0, 3, 1, 2)  # (B, 75, H, W)
    smoothed = maps if not smoothing else kornia.filters.gaussian_blur2d(
        maps, (SMOOTHING_KERNEL, SMOOTHING_KERNEL), (SMOOTHING_SIGMA, SMOOTHING_SIGMA), border_type="reflect")
    peaks = smoothed.amax(dim=(-2, -1))  # (B, 75)
    per_token = torch.clamp(1.0 - peaks, min=0.0)
    return torch.where(selected, per_token, torch.zeros_like(per_token)).amax(dim=-1)  # (B,)


def load_balancing_loss_batch(attention: torch.Tensor,
                              token_indices: Sequence[Sequence[int]] | torch.Tensor) -> torch.Tensor:
    """L_LB per sample: the Switch Transformer load-balancing loss (Fedus et al. 2022, Eq. 4; the paper's [42],
    Fig. 10 "L_LB") with the attention map's positions as the routed tokens and the hand tokens as the experts.

    The router probabilities at each of the H*W positions (the 2D map flattened to 1D, as the paper describes
    L_LB) are TAS's x100 softmax over text positions 1..75; the experts are the N_k selected hand tokens plus one
    "rest" expert holding the other tokens' summed probability (so that a prompt with a single hand token still
    has two experts to balance). f_i = fraction of positions whose most probable expert is i (no gradient, as in
    Switch), P_i = mean probability of expert i; L_LB = N_e * sum_i f_i P_i with N_e = N_k + 1 experts; its
    minimum 1 is a perfectly balanced load. Samples with no token get 0. Returns (B,).
    """
    selected = _selection(attention, token_indices)
    probs = torch.softmax(attention[..., TOKENS_FIRST:TOKENS_LAST + 1] * SOFTMAX_SCALE, dim=-1)  # (B, H, W, 75)
    probs = probs.flatten(1, 2)  # (B, HW, 75)
    hand = torch.where(selected[:, None, :], probs, torch.zeros_like(probs))  # (B, HW, 75): experts 1..N_k
    rest = (probs - hand).sum(-1, keepdim=True)  # (B, HW, 1): the "rest" expert
    experts = torch.cat([hand, rest], -1)  # (B, HW, 76); unselected columns are 0 and never win
    winner = experts.detach().argmax(-1)  # (B, HW)
    f = torch.nn.functional.one_hot(winner, experts.shape[-1]).to(probs.dtype).mean(1)  # (B, 76)
    p = experts.mean(1)  # (B, 76)
    n_experts = selected.sum(-1).to(probs.dtype) + 1
    loss = n_experts * (f * p).sum(-1)
    return torch.where(selected.any(-1), loss, torch.zeros_like(loss))


TAS_LOSSES = {"tas": tas_loss_batch, "lb": load_balancing_loss_batch}


def tas_loss_function(kind: str = "tas", *, smoothing: bool = True) -> Callable:
    """The per-sample loss of the TAS latent update: "tas" (L_TAS, Eq. 3; smoothing False drops the Gaussian
    filter) or "lb" (L_LB, `load_balancing_loss_batch`, the Fig. 10 ablation)."""
    if kind not in TAS_LOSSES:
        raise ValueError(f"TAS loss {kind!r}: expected one of {', '.join(TAS_LOSSES)}")
    if kind == "tas":
        return tas_loss_batch if smoothing else (lambda attention, tokens: tas_loss_batch(attention, tokens,
                                                                                           smoothing=False))
    return load_balancing_loss_batch


def tas_loss(attention: torch.Tensor, token_indices: Sequence[int]) -> torch.Tensor:
    """L_TAS (Eq. 3) of one sample. attention: (H, W, 77); token_indices: positions 1..75. Returns a scalar."""
    return tas_loss_batch(attention[None], [token_indices])[0]


@dataclass(frozen=True, kw_only=True)
class TasSchedule:
    """Step sizes alpha of the latent update X <- X - alpha * grad L_TAS (Eq. 4).

    kind "reference": scale * sqrt(linspace(start, end, n)) (the reference code and Attend-and-Excite:
    20 -> 14.1 with the defaults); kind "paper": scale * linspace(start, end, n) (the paper's text: 20 -> 10);
    kind "constant": scale at every update (the step-size regularisation ablation, issue 18).
    """

    kind: Literal["reference", "paper", "constant"] = "reference"
    scale: float = 20.0
    start: float = 1.0
    end: float = 0.5

    def step_sizes(self, n: int) -> list[float]:
        """n step sizes (python floats: no device sync when used)."""
        if n < 1:
            return []
        fractions = [self.start + (self.end - self.start) * k / max(n - 1, 1) for k in range(n)]
        if self.kind == "reference":
            return [self.scale * math.sqrt(f) for f in fractions]
        if self.kind == "paper":
            return [self.scale * f for f in fractions]
        if self.kind == "constant":
            return [self.scale] * n
        raise ValueError(f"TasSchedule.kind must be 'reference', 'paper' or 'constant', got {self.kind!r}")


def apply_tas(unet, store: AttentionStore, latents: torch.Tensor, timestep, cond_embeds: torch.Tensor,
              token_indices: Sequence[Sequence[int]] | torch.Tensor, step_sizes: Sequence[float],
              model_input: Callable[[torch.Tensor], torch.Tensor] | None = None,
              loss_fn: Callable[..., torch.Tensor] = tas_loss_batch,
              **unet_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Update latents with TAS: one early-exit forward + gradient per step size (Eq. 4).

    latents: (B, C, h, w) noisy latents X_t. model_input: the scheduler's input scaling
    (`scheduler.scale_model_input`; identity for DDIM), applied inside the graph so the gradient is taken
    w.r.t. X_t. cond_embeds: (B, 77, D) conditional text embedding. token_indices: per sample, hand-token
    positions, or their (B, 75) `token_mask`; a sample without tokens has zero loss, so zero gradient, and is
    returned unchanged (pass only the rows with tokens to save their compute). step_sizes: alpha per update.
    loss_fn: (maps, mask) -> (B,) losses, L_TAS by default (`tas_loss_function` for the ablations).
    Returns (updated latents (B, C, h, w) detached, L_TAS before the last update (B,) detached).
    Needs recorders installed (`recording(unet, store)`). Samples are independent (GroupNorm UNet), so the
    gradient of the summed loss is each sample's own gradient.
    """
    mask = token_indices if isinstance(token_indices, torch.Tensor) else token_mask(token_indices, latents.device)
    x = latents.detach()
    exact = torch.promote_types(latents.dtype, torch.float32)  # the loss and the update in fp32 at least
    losses = torch.zeros(latents.shape[0], device=latents.device, dtype=exact)
    for alpha in step_sizes:
        with torch.enable_grad():
            x.requires_grad_(True)
            unet_input = model_input(x) if model_input is not None else x
            maps = tas_attention_maps(unet, store, unet_input, timestep, cond_embeds, **unet_kwargs)
            losses = loss_fn(maps, mask)  # (B,)
            grad = torch.autograd.grad(losses.sum(), x)[0]
        x = (x.to(exact) - alpha * grad.to(exact)).to(latents.dtype).detach()
    return x, losses.detach()
