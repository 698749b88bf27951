"""AttentionHandPipeline: mesh images + prompts -> hand images (paper §3, Fig. 3; sampling as the reference).

Batch layout: B prompts and B global mesh images; with local mesh images the latents are branch-stacked
(global rows, then local rows: N = 2B, see generator.visual_attention), and classifier-free guidance doubles
that again (unconditional rows first, then conditional: 2N) so that each step is ONE ControlNet call and ONE UNet
call. Everything stays on the inputs' device; the denoising loop has no host synchronisation (no `.item()`,
timesteps iterated as python numbers taken once before the loop).

Random numbers: `generator` is one `torch.Generator` for the whole batch or a list of B, one per sample (then
sample i's noise does not depend on the other samples; with local mesh images each generator draws the global
latent first, then the local one). The same generator(s) feed the scheduler when it is stochastic (eta > 0).
"""
from __future__ import annotations

import functools
import inspect
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from .model import GeneratorComponents, _to_kwargs, GeneratorConfig, SamplingConfig, build_components, encode_prompts
from .tagging import hand_token_indices
from .text_attention import (AttentionStore, TasSchedule, apply_tas, attention_hw_for, cross_attention_layers,
                             recording, token_mask)
from .visual_attention import GuidanceModule, predict_noise, split_branches, stack_branches

logger = logging.getLogger(__name__)


@dataclass
class AttentionHandOutput:
    """images: (B, 3, H, W) generated from the global mesh images, RGB in [0, 1], on the inputs' device.
    local_images: (B, 3, H, W) generated from the local mesh images (None without them).
    attention_maps / local_attention_maps: (B, h, w, 77) conditional cross-attention maps at the attention
    resolution, averaged over heads, layers and steps (only with return_attention=True).
    token_indices: per prompt, the hand-token positions TAS used ([] = TAS skipped for that prompt).
    tas_losses: (tas_steps, N) L_TAS before each TAS update, N = B or 2B rows (None without TAS)."""

    images: torch.Tensor
    local_images: torch.Tensor | None = None
    attention_maps: torch.Tensor | None = None
    local_attention_maps: torch.Tensor | None = None
    token_indices: list[list[int]] = field(default_factory=list)
    tas_losses: torch.Tensor | None = None


class AttentionHandPipeline:
    """Sampler of the AttentionHand generator (TAS + VAS on a frozen SD UNet).

    tokenizer, text_encoder, vae, unet, scheduler: SD components (frozen); guidance: phi_g (None: text only,
    the plain SD baseline); attention_downsample: TAS attention resolution = latent size / this;
    sampling: default arguments of `__call__`.
    """

    def __init__(self, *, tokenizer, text_encoder, vae, unet, scheduler, guidance: GuidanceModule | None,
                 attention_downsample: int = 4, sampling: SamplingConfig | None = None):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.vae = vae
        self.unet = unet
        self.scheduler = scheduler
        self.guidance = guidance
        self.attention_downsample = attention_downsample
        self.sampling = sampling or SamplingConfig()
        self._compiled = None  # the guided noise prediction (`_guided_noise`) under torch.compile, see `optimize`
        self._cudagraphs = False  # compiled with mode="reduce-overhead": CUDA graphs of the static-shape steps
        self._text_kv = False  # cross-attention keys/values of the prompts computed once per call (`optimize`)
        self._math_attention = False  # attention as plain matrix products (`optimize`)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    @classmethod
    def from_components(cls, components: GeneratorComponents, **kwargs) -> "AttentionHandPipeline":
        return cls(tokenizer=components.tokenizer, text_encoder=components.text_encoder, vae=components.vae,
                   unet=components.unet, scheduler=components.scheduler, guidance=components.guidance, **kwargs)

    @classmethod
    def from_config(cls, config: GeneratorConfig) -> "AttentionHandPipeline":
        """Build the components (CPU; move with `.to(device)`) and the pipeline with the config's defaults."""
        return cls.from_components(build_components(config), attention_downsample=config.attention_downsample,
                                   sampling=config.sampling)

    def to(self, device=None, dtype=None) -> "AttentionHandPipeline":
        for module in (self.text_encoder, self.vae, self.unet, self.guidance):
            if module is not None:
                module.to(**_to_kwargs(device, dtype))
        return self

    def optimize(self, *, dtype: torch.dtype | str | None = None, channels_last: bool = False,
                 compile: bool | str = False, reuse_text_kv: bool | None = None,
                 math_attention: bool | None = None) -> "AttentionHandPipeline":
        """Speed options (docs/performance.md). dtype: the text encoder, VAE, UNet and guidance in this dtype
        (e.g. torch.bfloat16; TAS's attention maps, its loss and latent update stay in fp32; images are returned
        as fp32). channels_last: the UNet, guidance and VAE in channels-last memory format. compile: torch.compile
        one denoising step's model work as one region, the guidance call, the UNet call and the classifier-free
        guidance combination (True, or a mode such as "max-autotune" / "reduce-overhead" for static shapes),
        used on the steps that record no attention (no TAS, no return_attention); the first call per shape pays
        the compilation. reuse_text_kv: every cross-attention layer's keys and values of the prompt embeddings
        (the same at every step) computed once per call instead of at every step (`generator.text_kv`: diffusers'
        default attention processor with them precomputed; the same operations, so the same images), on the
        steps that record no attention. math_attention: attention as softmax(q k^T / sqrt(d)) v with plain matrix
        products instead of the fused SDPA kernel (the same values to float rounding; with compile on the CPU
        about 10% faster for the tiny generator, docs/performance.md; on a GPU keep SDPA). reuse_text_kv and
        math_attention left None keep what an earlier call set (both off at first). Returns self."""
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if dtype is not None:
            self.to(dtype=dtype)
        if channels_last:
            for module in (self.unet, self.guidance, self.vae):
                if module is not None:
                    module.to(memory_format=torch.channels_last)
        changed = reuse_text_kv is not None or math_attention is not None
        reuse_text_kv = self._text_kv if reuse_text_kv is None else reuse_text_kv
        math_attention = self._math_attention if math_attention is None else math_attention
        if changed and not (reuse_text_kv or math_attention or self._math_attention):
            self._text_kv = False  # keys/values at every step again (diffusers' computation, no math to undo)
        elif changed:
            from .text_kv import install

            models = [("unet.", self.unet)]
            if isinstance(self.guidance, GuidanceModule):
                models.append(("controlnet.", self.guidance.controlnet))
            installed = all([install(model, prefix, math=math_attention) for prefix, model in models])
            self._text_kv = installed and reuse_text_kv
            self._math_attention = installed and math_attention
            if not installed:
                logger.warning("reuse_text_kv / math_attention: the UNet or ControlNet has custom attention "
                               "processors, left as they are (keys and values computed at every step)")
        if compile:
            mode = compile if isinstance(compile, str) else None
            self._compiled = torch.compile(functools.partial(_guided_noise, self.unet, self.guidance), mode=mode)
            self._cudagraphs = mode == "reduce-overhead"
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def default_size(self) -> int:
        """The image size the UNet was built for (its latent sample_size x the VAE's factor)."""
        sample = self.unet.config.sample_size
        sample = sample[0] if isinstance(sample, (tuple, list)) else sample
        return int(sample) * self.vae_scale_factor

    # ------------------------------------------------------------------------------------------------------------
    def check_inputs(self, mesh_images, local_mesh_images, prompts, negative_prompts, num_inference_steps,
                     tas_steps, guidance_scale, generator, latents) -> list[str]:
        """Validate the arguments of `__call__`; returns the prompts as a list of B strings."""
        if not isinstance(mesh_images, torch.Tensor) or mesh_images.ndim != 4 or mesh_images.shape[1] != 3:
            shape = tuple(mesh_images.shape) if isinstance(mesh_images, torch.Tensor) else type(mesh_images).__name__
            raise ValueError(f"mesh_images must be a (B, 3, H, W) tensor in [0, 1]; got {shape}")
        if not mesh_images.is_floating_point():
            raise ValueError(f"mesh_images must be float in [0, 1]; got dtype {mesh_images.dtype} "
                             "(divide uint8 images by 255)")
        b, _, h, w = mesh_images.shape
        multiple = self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if h % multiple or w % multiple:
            raise ValueError(f"mesh_images height and width must be multiples of {multiple} "
                             f"(VAE x{self.vae_scale_factor}"
                             f", UNet x{multiple // self.vae_scale_factor}); got {h}x{w}: resize or pad them")
        if local_mesh_images is not None:
            if not isinstance(local_mesh_images, torch.Tensor) or local_mesh_images.shape != mesh_images.shape:
                shape = tuple(local_mesh_images.shape) if isinstance(local_mesh_images, torch.Tensor) else None
                raise ValueError(f"local_mesh_images must have the shape of mesh_images {tuple(mesh_images.shape)}; "
                                 f"got {shape} (crop with hands.render.crop_local to the same size)")
            if local_mesh_images.device != mesh_images.device:
                raise ValueError(f"local_mesh_images are on {local_mesh_images.device}, mesh_images on "
                                 f"{mesh_images.device}: put them on the same device")
        for name, images in (("mesh_images", mesh_images), ("local_mesh_images", local_mesh_images)):
            if images is not None and not bool(((images >= 0) & (images <= 1)).all()):  # one sync, before the loop
                raise ValueError(f"{name} must be in [0, 1] (mesh renders, not [-1, 1] or 0-255 values)")
        prompts = [prompts] * b if isinstance(prompts, str) else list(prompts)
        if len(prompts) != b or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a string or a list of {b} strings (one per mesh image); "
                             f"got {len(prompts)} entries")
        if negative_prompts is not None and not isinstance(negative_prompts, str) and len(negative_prompts) != b:
            raise ValueError(f"negative_prompts must be a string or a list of {b} strings; got {len(negative_prompts)}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1; got {num_inference_steps}")
        if not 0 <= tas_steps <= num_inference_steps:
            raise ValueError(f"tas_steps must be in [0, num_inference_steps={num_inference_steps}]; got {tas_steps}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0 (<= 1 turns classifier-free guidance off); "
                             f"got {guidance_scale}")
        if isinstance(generator, list) and len(generator) != b:
            raise ValueError(f"generator is a list of {len(generator)}; give one torch.Generator per sample ({b}) "
                             "or a single one")
        if latents is not None:
            n = b * (2 if local_mesh_images is not None else 1)
            expected = (n, self.unet.config.in_channels, h // self.vae_scale_factor, w // self.vae_scale_factor)
            if tuple(latents.shape) != expected:
                raise ValueError(f"latents must have shape {expected} (global rows, then local rows); "
                                 f"got {tuple(latents.shape)}")
        return prompts

    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, mesh_images: torch.Tensor, local_mesh_images: torch.Tensor | None, prompts: str | Sequence[str],
                 *, negative_prompts: str | Sequence[str] | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, eta: float | None = None,
                 conditioning_scale: float | None = None, tas_steps: int | None = None,
                 tas_schedule: TasSchedule | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, return_attention: bool = False,
                 progress: bool = False) -> AttentionHandOutput:
        """Generate hand images aligned with the mesh images and the prompts.

        mesh_images: (B, 3, H, W) global hand mesh renders in [0, 1] (H, W multiples of 64 for SD).
        local_mesh_images: (B, 3, H, W) local (bbox-cropped, resized) renders, or None to run the global branch
            only (as the reference inference does).
        prompts: one string or B strings. Other arguments default to `self.sampling` (DDIM 20 steps, guidance 9.0,
        eta 0, control strength 1, no TAS). tas_steps: apply one TAS latent update in each of the first k steps.
        latents: optional initial noise (N, 4, H/8, W/8), N = B or 2B. Returns an `AttentionHandOutput`.
        """
        s = self.sampling
        num_inference_steps = s.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance_scale = s.guidance_scale if guidance_scale is None else guidance_scale
        eta = s.eta if eta is None else eta
        conditioning_scale = s.conditioning_scale if conditioning_scale is None else conditioning_scale
        tas_steps = s.tas_steps if tas_steps is None else tas_steps
        tas_schedule = tas_schedule or TasSchedule(kind=s.tas_schedule, scale=s.tas_scale, start=s.tas_start,
                                                   end=s.tas_end)

        # 1. Check inputs.
        prompts = self.check_inputs(mesh_images, local_mesh_images, prompts, negative_prompts, num_inference_steps,
                                    tas_steps, guidance_scale, generator, latents)
        device, dtype = mesh_images.device, self.unet.dtype
        b, _, height, width = mesh_images.shape
        with_local = local_mesh_images is not None
        branches = 2 if with_local else 1
        cfg = guidance_scale > 1.0

        # 2. Encode the prompts (conditional; unconditional for classifier-free guidance).
        cond = encode_prompts(self.tokenizer, self.text_encoder, prompts, device)  # (B, 77, D)
        negative = [""] * b if negative_prompts is None else (
            [negative_prompts] * b if isinstance(negative_prompts, str) else list(negative_prompts))
        uncond = encode_prompts(self.tokenizer, self.text_encoder, negative, device) if cfg else None
        cond_rows = cond.repeat(branches, 1, 1)  # (N, 77, D)
        text = torch.cat([uncond.repeat(branches, 1, 1), cond_rows]) if cfg else cond_rows  # (2N or N, 77, D)

        # 3. Prepare the mesh conditions (branch-stacked, duplicated for guidance) and the hand tokens.
        mesh = stack_branches(mesh_images, local_mesh_images) if with_local else mesh_images  # (N, 3, H, W)
        mesh = mesh.to(dtype)
        condition = None
        if isinstance(self.guidance, GuidanceModule) and self.guidance.reuses_condition:
            # ControlNet's mesh-image encoder gives the same (N, C, h, w) at every step: once per call, not per step
            condition = self.guidance.embed_condition(mesh)
            condition = torch.cat([condition, condition]) if cfg else condition
            mesh_rows = None
        else:
            mesh_rows = torch.cat([mesh, mesh]) if cfg else mesh
        token_indices = [hand_token_indices(p, self.tokenizer) for p in prompts]
        if tas_steps > 0:
            skipped = [p for p, idx in zip(prompts, token_indices) if not idx]
            if skipped:
                logger.warning("TAS skipped for %d of %d prompts with no hand-related word: %s",
                               len(skipped), b, "; ".join(repr(p) for p in skipped))
        rows_tokens = token_indices * branches  # per latent row (global rows, then local rows)
        run_tas = tas_steps > 0 and any(token_indices)
        if run_tas:  # TAS runs on the rows with hand tokens only; index and mask built once, outside the loop
            tas_rows = torch.tensor([i for i, idx in enumerate(rows_tokens) if idx], device=device)
            tas_mask = token_mask([idx for idx in rows_tokens if idx], device)
            tas_embeds = cond_rows.index_select(0, tas_rows)

        # 4. Timesteps (a private scheduler copy keeps this call reentrant). The models get them as device tensors,
        #    the scheduler as python numbers read once here, so the loop needs no host synchronisation (DDIM).
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps_device = scheduler.timesteps
        timesteps = timesteps_device.tolist()
        step_sizes = tas_schedule.step_sizes(len(timesteps))
        step_generator = generator * branches if isinstance(generator, list) else generator
        step_kwargs = {}
        step_params = inspect.signature(scheduler.step).parameters
        if "eta" in step_params:
            step_kwargs["eta"] = eta
        if "generator" in step_params:
            step_kwargs["generator"] = step_generator

        # 5. Prepare the initial latents (global rows, then local rows).
        shape = (b, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            draws = [randn_tensor(shape, generator=generator, device=device, dtype=dtype) for _ in range(branches)]
            latents = torch.cat(draws)  # (N, 4, h, w)
        latents = latents.to(device=device, dtype=dtype) * scheduler.init_noise_sigma

        # 6. Denoising loop: optional TAS update, one guided ControlNet + UNet call, scheduler step.
        store = None
        if run_tas or return_attention:
            latent_hw = (shape[2], shape[3])
            attention_hw = attention_hw_for(latent_hw, self.attention_downsample)
            store = AttentionStore(cross_attention_layers(self.unet, latent_hw, attention_hw), attention_hw)
        n = latents.shape[0]
        attention_kwargs = None
        if self._text_kv and store is None:
            from .text_kv import text_kv

            kv = text_kv(self.unet, text)
            if isinstance(self.guidance, GuidanceModule):
                kv.update(text_kv(self.guidance.controlnet, text))
            attention_kwargs = {"text_kv": kv}
        maps_sum = None
        tas_losses = []
        with recording(self.unet, store) if store is not None else nullcontext():
            for i, t in enumerate(tqdm(timesteps, desc="AttentionHand", disable=not progress)):
                t_device = timesteps_device[i]
                if run_tas and i < tas_steps:
                    updated, loss = apply_tas(self.unet, store, latents.index_select(0, tas_rows), t_device,
                                              tas_embeds, tas_mask, [step_sizes[i]],
                                              model_input=lambda x, t=t: scheduler.scale_model_input(x, t))
                    latents = latents.index_copy(0, tas_rows, updated)
                    tas_losses.append(torch.zeros(n, device=device, dtype=loss.dtype).index_copy(0, tas_rows, loss))
                model_input = torch.cat([latents, latents]) if cfg else latents
                model_input = scheduler.scale_model_input(model_input, t)
                if return_attention:
                    store.reset()
                    store.active = True
                if self._compiled is not None and store is None:
                    if self._cudagraphs:  # the last step's graph outputs are consumed: replay into their memory
                        torch.compiler.cudagraph_mark_step_begin()
                    noise = self._compiled(model_input, t_device, text, mesh_rows, conditioning_scale, condition,
                                           guidance_scale if cfg else None, attention_kwargs)
                else:
                    noise = predict_noise(self.unet, self.guidance, model_input, t_device, text, mesh_rows,
                                          conditioning_scale, condition=condition, attention_kwargs=attention_kwargs)
                    if return_attention:
                        store.active = False
                        step_maps = store.maps()[-n:]  # conditional rows (N, h, w, 77)
                        maps_sum = step_maps if maps_sum is None else maps_sum + step_maps
                    noise = _combine_guidance(noise, guidance_scale) if cfg else noise
                latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]

        # 7. Decode the latents to images in [0, 1].
        images = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        images = (images.float() / 2 + 0.5).clamp(0, 1)  # (N, 3, H, W)
        maps = maps_sum / len(timesteps) if maps_sum is not None else None
        output = AttentionHandOutput(images=images, token_indices=token_indices,
                                     tas_losses=torch.stack(tas_losses) if tas_losses else None)
        if with_local:
            output.images, output.local_images = split_branches(images)
            if maps is not None:
                output.attention_maps, output.local_attention_maps = split_branches(maps)
        else:
            output.attention_maps = maps
        return output


def _combine_guidance(noise: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: (2N, ...) predictions, unconditional rows first -> (N, ...)."""
    noise_uncond, noise_cond = noise.chunk(2)
    return noise_uncond + guidance_scale * (noise_cond - noise_uncond)


def _guided_noise(unet, guidance, model_input, timestep, text, mesh_rows, conditioning_scale, condition,
                  guidance_scale, attention_kwargs=None):
    """One step's noise prediction, guided (guidance_scale None: no classifier-free guidance): the region
    `optimize(compile=...)` compiles."""
    noise = predict_noise(unet, guidance, model_input, timestep, text, mesh_rows, conditioning_scale,
                          condition=condition, attention_kwargs=attention_kwargs)
    return noise if guidance_scale is None else _combine_guidance(noise, guidance_scale)
