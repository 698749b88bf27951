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

    def forward(self, latents: torch.Tensor, timestep, text_embeds: torch.Tensor, mesh_images: torch.Tensor,
                conditioning_scale: float = 1.0) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Y_g (Eq. 5) for a batch of N rows (e.g. 2B branch-stacked, 4B with classifier-free guidance).

        latents: (N, 4, h, w) scaled model input; timestep: int or (N,) tensor; text_embeds: (N, 77, D);
        mesh_images: (N, 3, 8h, 8w) in [0, 1]. Returns (down-block residuals, mid-block residual), each (N, C_k, ...).
        """
        down, mid = self.controlnet(latents, timestep, encoder_hidden_states=text_embeds, controlnet_cond=mesh_images,
                                    conditioning_scale=conditioning_scale, return_dict=False)
        return tuple(down), mid


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
                  conditioning_scale: float = 1.0) -> torch.Tensor:
    """Y_d = phi_d(X, K, t) + Y_g (Eq. 6): the frozen UNet's noise prediction with the guidance residuals.

    latents: (N, 4, h, w); text_embeds: (N, 77, D); mesh_images: (N, 3, 8h, 8w) in [0, 1], row-aligned with the
    latents (branch-stacked rows get their own branch's mesh image). guidance None: the plain UNet (text only);
    an `AdapterGuidance`: its features inside the UNet's down blocks.
    Returns the predicted noise (N, 4, h, w). One ControlNet call and one UNet call for all N rows.
    """
    if guidance is None:
        return unet(latents, timestep, encoder_hidden_states=text_embeds, return_dict=False)[0]
    if getattr(guidance, "injects", None) == "adapter":
        features = guidance(latents, timestep, text_embeds, mesh_images, conditioning_scale)
        return unet(latents, timestep, encoder_hidden_states=text_embeds,
                    down_intrablock_additional_residuals=features, return_dict=False)[0]
    down, mid = guidance(latents, timestep, text_embeds, mesh_images, conditioning_scale)
    return unet(latents, timestep, encoder_hidden_states=text_embeds, down_block_additional_residuals=down,
                mid_block_additional_residual=mid, return_dict=False)[0]
