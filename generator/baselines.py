"""The other generators of paper Tables 1 and A, behind AttentionHandPipeline's interface.

Every generator here is called as `pipe(mesh_images (B, 3, S, S) in [0, 1], local_mesh_images | None, prompts, *,
generator=..., **sampling) -> output with .images (B, 3, S, S) in [0, 1]` and moves with `.to(device)`; the
sampling keywords are AttentionHandPipeline's (num_inference_steps, guidance_scale, eta, negative_prompts,
latents, ...). All of them run AttentionHandPipeline's own denoising loop (DDIM 20 steps, guidance 9.0 by default):

- "attentionhand": AttentionHandPipeline itself (global + local branch, TAS as configured).
- "sd": plain Stable Diffusion, text only: the loop with no guidance module. The mesh images only fix the
  batch size, resolution and device (Table A row "Stable Diffusion").
- "controlnet": a ControlNet on the global mesh image only: the loop with the guidance ControlNet, no local
  branch and no TAS (row "ControlNet"). Its weights come from `guidance_path` (e.g. a ControlNet trained by
  `python -m generator.train --lambda-local 0 --tas-updates 0`). With an `sd_path` and no `guidance_path` it is
  refused: `<sd_path>/guidance/` holds AttentionHand's own guidance module (the shipped generator's does), and a
  fresh copy of the UNet is no trained baseline. Only the random-init tiny test model (no `sd_path`) builds it
  from the fresh copy of its UNet.
- "t2i-adapter": a T2I-Adapter (diffusers `T2IAdapter`, full adapter) on the global mesh image (row
  "T2I-Adapter"). Its features are computed once per call (they do not depend on the timestep) and added inside
  the UNet's down blocks (`down_intrablock_additional_residuals`), as diffusers' StableDiffusionAdapterPipeline
  does. Weights: `guidance_path` = a local diffusers T2IAdapter folder (or `<sd_path>/adapter/`); with the
  built-in tiny generator and no folder, a tiny adapter randomly initialised from the config's seed.

Uni-ControlNet (the fourth baseline of Tables 1 / A) is not provided: it needs its own multi-condition adapter
weights, which have no diffusers implementation.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .model import GeneratorConfig, build_components
from .pipeline import AttentionHandOutput, AttentionHandPipeline

GENERATORS = ("attentionhand", "sd", "controlnet", "t2i-adapter")


class GlobalOnlyPipeline:
    """An AttentionHandPipeline run on the global mesh images only, without TAS (the "sd" and "controlnet"
    baselines; "sd" has no guidance module). local_mesh_images are accepted and ignored."""

    def __init__(self, pipe: AttentionHandPipeline, name: str):
        self.pipe, self.name = pipe, name

    def to(self, device=None, dtype=None):
        self.pipe.to(device, dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    @property
    def default_size(self) -> int:
        return self.pipe.default_size

    def _check(self, sampling: dict) -> None:
        if sampling.get("tas_steps"):
            raise ValueError(f"generator {self.name!r} has no text attention stage: tas_steps must be 0 "
                             f"(got {sampling['tas_steps']})")

    def __call__(self, mesh_images: torch.Tensor, local_mesh_images: torch.Tensor | None,
                 prompts: str | Sequence[str], *, generator=None, **sampling) -> AttentionHandOutput:
        """See the module docstring; mesh_images (B, 3, S, S) in [0, 1]. Returns .images (B, 3, S, S)."""
        self._check(sampling)
        sampling["tas_steps"] = 0
        return self.pipe(mesh_images, None, prompts, generator=generator, **sampling)


class AdapterUNet(nn.Module):
    """The frozen UNet with T2I-Adapter features added inside its down blocks.

    `features` (set per call by `T2IAdapterPipeline`): the adapter's outputs for the B conditional rows, one
    (B, C_k, h_k, w_k) tensor per UNet level; a UNet batch of k*B rows (classifier-free guidance) gets them
    repeated k times, as diffusers' adapter pipeline does. Every other attribute (config, dtype,
    attention processors, down_blocks) is the wrapped UNet's, so AttentionHandPipeline runs on it unchanged.
    """

    def __init__(self, unet: nn.Module, adapter: nn.Module):
        super().__init__()
        self.unet = unet
        self.adapter = adapter
        self.features: list[torch.Tensor] | None = None

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["unet"], name)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, **kwargs):
        if self.features is not None:
            repeat = sample.shape[0] // self.features[0].shape[0]
            kwargs["down_intrablock_additional_residuals"] = [f.repeat(repeat, 1, 1, 1) for f in self.features]
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)


class T2IAdapterPipeline(GlobalOnlyPipeline):
    """The T2I-Adapter baseline: the global mesh image through the adapter, text through the UNet.

    pipe: an AttentionHandPipeline whose unet is an `AdapterUNet` and whose guidance is None.
    adapter_conditioning_scale: multiplies the adapter features (diffusers' default 1.0).
    """

    def __init__(self, pipe: AttentionHandPipeline, *, adapter_conditioning_scale: float = 1.0):
        if not isinstance(pipe.unet, AdapterUNet):
            raise ValueError("T2IAdapterPipeline needs a pipeline whose unet is an AdapterUNet")
        super().__init__(pipe, "t2i-adapter")
        self.adapter_conditioning_scale = adapter_conditioning_scale

    @property
    def adapter(self) -> nn.Module:
        return self.pipe.unet.adapter

    def __call__(self, mesh_images, local_mesh_images, prompts, *, generator=None, **sampling):
        self._check(sampling)
        sampling["tas_steps"] = 0
        scale = sampling.pop("adapter_conditioning_scale", self.adapter_conditioning_scale)
        unet = self.pipe.unet
        with torch.no_grad():
            features = self.adapter(mesh_images.to(unet.dtype))
        unet.features = [f * scale for f in features]
        try:
            return self.pipe(mesh_images, None, prompts, generator=generator, **sampling)
        finally:
            unet.features = None


def tiny_t2i_adapter(unet, *, seed: int = 0, num_res_blocks: int = 1, downscale_factor: int = 8):
    """A randomly initialised full T2I-Adapter matching `unet` (one level per UNet down block, the UNet's
    channels; mesh images at downscale_factor x the latent size). The global RNG is left untouched."""
    from diffusers import T2IAdapter

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return T2IAdapter(in_channels=3, channels=list(unet.config.block_out_channels),
                          num_res_blocks=num_res_blocks, downscale_factor=downscale_factor,
                          adapter_type="full_adapter")


def _is_adapter_folder(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("_class_name") == "T2IAdapter"


def load_t2i_adapter(config: GeneratorConfig, unet, vae_scale_factor: int = 8):
    """The T2I-Adapter of `config`: guidance_path (a diffusers T2IAdapter folder), else <sd_path>/adapter/,
    else (tiny generator only) a random tiny adapter. An SD generator without adapter weights fails."""
    from diffusers import T2IAdapter

    candidates = [Path(config.guidance_path)] if config.guidance_path else []
    if config.sd_path:
        candidates.append(Path(config.sd_path) / "adapter")
    for path in candidates:
        if _is_adapter_folder(path):
            return T2IAdapter.from_pretrained(path, local_files_only=True)
    if config.guidance_path:
        raise ValueError(f"guidance_path {config.guidance_path} is not a diffusers T2IAdapter folder "
                         "(config.json with _class_name T2IAdapter) for generator 't2i-adapter'")
    if config.sd_path:
        raise ValueError(f"generator 't2i-adapter' on {config.sd_path} needs adapter weights: pass "
                         "guidance_path=/path/to/t2iadapter (a diffusers T2IAdapter folder, e.g. an SD 1.5 "
                         "T2I-Adapter) or put it in <sd_path>/adapter/")
    return tiny_t2i_adapter(unet, seed=config.seed, downscale_factor=vae_scale_factor)


def build_baseline(name: str, gen_cfg: GeneratorConfig):
    """The generator `name` (one of GENERATORS) built from `gen_cfg` on the CPU; move it with `.to(device)`."""
    if name not in GENERATORS:
        raise ValueError(f"unknown generator {name!r}; known: {', '.join(GENERATORS)}")
    if name == "attentionhand":
        return AttentionHandPipeline.from_config(gen_cfg)
    own_guidance = name == "controlnet"
    if own_guidance and gen_cfg.sd_path and not gen_cfg.guidance_path:
        raise ValueError(f"generator 'controlnet' needs weights trained for it: pass guidance_path=DIR (a ControlNet "
                         f"trained with `python -m generator.train --lambda-local 0 --tas-updates 0`); "
                         f"{gen_cfg.sd_path}/guidance holds AttentionHand's own guidance module, not the baseline's")
    components = build_components(gen_cfg if own_guidance else dataclasses.replace(gen_cfg, guidance_path=None))
    unet, guidance = components.unet, components.guidance if own_guidance else None
    if name == "t2i-adapter":
        adapter = load_t2i_adapter(gen_cfg, unet, components.vae_scale_factor)
        adapter.requires_grad_(False).eval().to(dtype=unet.dtype)
        unet = AdapterUNet(unet, adapter)
    pipe = AttentionHandPipeline(tokenizer=components.tokenizer, text_encoder=components.text_encoder,
                                 vae=components.vae, unet=unet, scheduler=components.scheduler, guidance=guidance,
                                 attention_downsample=gen_cfg.attention_downsample, sampling=gen_cfg.sampling)
    return T2IAdapterPipeline(pipe) if name == "t2i-adapter" else GlobalOnlyPipeline(pipe, name)
