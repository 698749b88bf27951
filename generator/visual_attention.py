"""Visual attention stage (VAS), paper §3.3 Eqs. (5)-(6).

The guidance module phi_g is a ControlNet copied from the frozen diffusion UNet phi_d
(`ControlNetModel.from_unet`: same encoder weights, zero convolutions on its outputs), conditioned on hand mesh
images. How the global and local branches combine, read from the paper:

    Eq. (5)  Y_g = phi_g(X_t, I_mesh, K, t; theta_g),   I_mesh = (I_mesh^G, I_mesh^L), Y_g = (Y_g^G, Y_g^L)
    Eq. (6)  Y_d = phi_d(X_t, K, t; theta_d) + Y_g,     X_t = (X_t^G, X_t^L),       Y_d = (Y_d^G, Y_d^L)

The pairs are *concatenations along the batch* (Y_g, Y_d in R^{2 x 4 x 64 x 64}): the global latent is guided by
the global mesh image and the local latent by the local one, through one shared set of weights (Table 4
"Shared"; Fig. 6 "global and local denoising networks share weights"). Nothing is summed or weighted across the
two branches; they meet only in the loss, Eq. (9) L = lambda_G L_G + lambda_L L_L. So both branches run as
ONE ControlNet call on a batch of 2B (`stack_branches`), and each branch's residuals go into the frozen UNet's
pass over that branch's own latent ("+ Y_g" is ControlNet's addition of its residuals to the UNet's skip
connections and mid block).

Conventions: latents (N, 4, h, w) in SD latent space; mesh images (N, 3, H, W) RGB in [0, 1] with H = 8h
(the VAE's scale); text embeddings (N, 77, D); branch-stacked tensors hold the global rows first, then the local.
"""
from __future__ import annotations

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from torch import nn


def stack_branches(global_x: torch.Tensor, local_x: torch.Tensor) -> torch.Tensor:
    """(B, ...) global and (B, ...) local -> (2B, ...): global rows first (the batch layout of Eqs. 5-6)."""
    if global_x.shape != local_x.shape:
        raise ValueError(f"global and local tensors must have the same shape, got {tuple(global_x.shape)} "
                         f"and {tuple(local_x.shape)}")
    return torch.cat([global_x, local_x], dim=0)


def split_branches(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B, ...) -> ((B, ...) global, (B, ...) local); inverse of `stack_branches`."""
    if x.shape[0] % 2:
        raise ValueError(f"a branch-stacked batch has an even size, got {x.shape[0]}")
    return x[: x.shape[0] // 2], x[x.shape[0] // 2:]


class GuidanceModule(nn.Module):
    """phi_g: one ControlNet shared by the global and local branches.

    controlnet: a `diffusers.ControlNetModel` whose encoder matches the UNet's (made with `from_unet`).
    """

    def __init__(self, *, controlnet: ControlNetModel):
        super().__init__()
        self.controlnet = controlnet

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, *,
                  conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)) -> "GuidanceModule":
        """theta_g initialised as a copy of the UNet's encoder (zero convolutions at the outputs).
        conditioning_embedding_out_channels: the mesh-image encoder; its len - 1 stride-2 convolutions must equal
        the VAE's downsampling (3 for SD's factor 8)."""
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(
            conditioning_embedding_out_channels), conditioning_channels=3)
        return cls(controlnet=controlnet)

    def forward(self, latents: torch.Tensor, timestep, text_embeds: torch.Tensor, mesh_images: torch.Tensor | None,
                conditioning_scale: float = 1.0, *, condition: torch.Tensor | None = None,
                attention_kwargs: dict | None = None) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Y_g (Eq. 5) for a batch of N rows (e.g. 2B branch-stacked, 4B with classifier-free guidance).

        latents: (N, 4, h, w) scaled model input; timestep: int or (N,) tensor; text_embeds: (N, 77, D);
        mesh_images: (N, 3, 8h, 8w) in [0, 1]; or instead `condition`, their `embed_condition` (N, C, h, w), which
        does not change over the denoising steps: a sampler computes it once per call (the same values as
        ControlNet's own forward, without its mesh-image encoder at every step). attention_kwargs: diffusers'
        cross_attention_kwargs (e.g. `generator.text_kv`'s precomputed keys and values).
        Returns (down-block residuals, mid-block residual), each (N, C_k, ...).
        """
        if condition is None:
            down, mid = self.controlnet(latents, timestep, encoder_hidden_states=text_embeds,
                                        controlnet_cond=mesh_images, conditioning_scale=conditioning_scale,
                                        cross_attention_kwargs=attention_kwargs, return_dict=False)
            return tuple(down), mid
        return self._forward_embedded(latents, timestep, text_embeds, condition, conditioning_scale,
                                      attention_kwargs)

    @property
    def reuses_condition(self) -> bool:
        """Whether `condition=` is supported: ControlNet without class or added embeddings and without global
        pooling (SD 1.5's and every config built here); others take the mesh images at each step."""
        config = self.controlnet.config
        return (self.controlnet.class_embedding is None and config.addition_embed_type is None
                and not config.global_pool_conditions)

    def embed_condition(self, mesh_images: torch.Tensor) -> torch.Tensor:
        """ControlNet's conditioning embedding of (N, 3, 8h, 8w) mesh images in [0, 1]: (N, C, h, w), the term its
        forward adds to `conv_in(latents)`."""
        if self.controlnet.config.controlnet_conditioning_channel_order == "bgr":
            mesh_images = torch.flip(mesh_images, dims=[1])
        return self.controlnet.controlnet_cond_embedding(mesh_images)

    def _forward_embedded(self, latents, timestep, text_embeds, condition, conditioning_scale, attention_kwargs):
        # diffusers' ControlNetModel.forward (0.42) for the configs `reuses_condition` accepts, with the
        # conditioning embedding given; step for step the same operations, so the same values
        cn = self.controlnet
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], dtype=torch.float64 if isinstance(timestep, float) else torch.int64,
                                     device=latents.device)
        elif timesteps.ndim == 0:
            timesteps = timesteps[None].to(latents.device)
        t_emb = cn.time_proj(timesteps.expand(latents.shape[0])).to(dtype=latents.dtype)
        emb = cn.time_embedding(t_emb, None)
        sample = cn.conv_in(latents) + condition
        residuals = (sample,)
        for block in cn.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=text_embeds,
                                    cross_attention_kwargs=attention_kwargs)
            else:
                sample, res = block(hidden_states=sample, temb=emb)
            residuals += res
        if cn.mid_block is not None:
            if getattr(cn.mid_block, "has_cross_attention", False):
                sample = cn.mid_block(sample, emb, encoder_hidden_states=text_embeds,
                                      cross_attention_kwargs=attention_kwargs)
            else:
                sample = cn.mid_block(sample, emb)
        down = tuple(block(res) * conditioning_scale for res, block in zip(residuals, cn.controlnet_down_blocks))
        return down, cn.controlnet_mid_block(sample) * conditioning_scale


class AdapterGuidance(nn.Module):
    """A T2I-Adapter (diffusers `T2IAdapter`) in the guidance module's place (the "t2i-adapter" baseline):
    features of the mesh image, one per UNet down block, added inside the UNet's down blocks
    (`down_intrablock_additional_residuals`, as diffusers' StableDiffusionAdapterPipeline). They do not depend
    on the latents, the timestep or the text."""

    injects = "adapter"

    def __init__(self, adapter: nn.Module):
        super().__init__()
        self.adapter = adapter

    def forward(self, latents: torch.Tensor, timestep, text_embeds: torch.Tensor, mesh_images: torch.Tensor,
                conditioning_scale: float = 1.0) -> list[torch.Tensor]:
        """mesh_images (N, 3, H, W) in [0, 1] -> one (N, C_k, h_k, w_k) feature per UNet level, x scale."""
        return [f * conditioning_scale for f in self.adapter(mesh_images.to(latents.dtype))]


def predict_noise(unet: UNet2DConditionModel, guidance: GuidanceModule | None, latents: torch.Tensor, timestep,
                  text_embeds: torch.Tensor, mesh_images: torch.Tensor | None,
                  conditioning_scale: float = 1.0, *, condition: torch.Tensor | None = None,
                  attention_kwargs: dict | None = None) -> torch.Tensor:
    """Y_d = phi_d(X, K, t) + Y_g (Eq. 6): the frozen UNet's noise prediction with the guidance residuals.

    latents: (N, 4, h, w); text_embeds: (N, 77, D); mesh_images: (N, 3, 8h, 8w) in [0, 1], row-aligned with the
    latents (branch-stacked rows get their own branch's mesh image). guidance None: the plain UNet (text only);
    an `AdapterGuidance`: its features inside the UNet's down blocks. condition: a `GuidanceModule`'s
    `embed_condition(mesh_images)`, given instead of the mesh images (computed once per sampling call).
    attention_kwargs: diffusers' cross_attention_kwargs for the UNet and the guidance (`generator.text_kv`).
    Returns the predicted noise (N, 4, h, w). One ControlNet call and one UNet call for all N rows.
    """
    if guidance is None:
        return unet(latents, timestep, encoder_hidden_states=text_embeds, cross_attention_kwargs=attention_kwargs,
                    return_dict=False)[0]
    if getattr(guidance, "injects", None) == "adapter":
        features = guidance(latents, timestep, text_embeds, mesh_images, conditioning_scale)
        return unet(latents, timestep, encoder_hidden_states=text_embeds, cross_attention_kwargs=attention_kwargs,
                    down_intrablock_additional_residuals=features, return_dict=False)[0]
    down, mid = guidance(latents, timestep, text_embeds, mesh_images, conditioning_scale, condition=condition,
                         attention_kwargs=attention_kwargs)
    return unet(latents, timestep, encoder_hidden_states=text_embeds, down_block_additional_residuals=down,
                mid_block_additional_residual=mid, cross_attention_kwargs=attention_kwargs, return_dict=False)[0]
