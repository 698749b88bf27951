"""P1 (our sampler vs diffusers' StableDiffusionControlNetPipeline) and P3 (TAS on the first k steps vs none).

Both pipelines share one set of modules (same weights): the CLIP text model, VAE, UNet and the ControlNet that
our `GuidanceModule` wraps; DDIM, the same steps, batch, resolution, guidance 9.0 and starting noise, images
returned as tensors. diffusers' pipeline has no local branch, so P1 gives both the global mesh image only.

P1 times three variants, interleaved: diffusers' pipeline, ours as built (eager), and ours with its UNet and
ControlNet wrapped in `torch.compile` (the compiled wrappers are private to our pipeline object: diffusers'
pipeline keeps the eager modules). The ratio is the compiled variant's (compilation time reported separately,
not timed: it is paid once per process and shape, and the mixing producer samples thousands of times).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from generator.model import build_components, load_config
from generator.pipeline import AttentionHandPipeline

from .common import Timings, interleaved, mib

PROMPT = "a photo of two hands, the right hand and the left hand, realistic skin"


@dataclass
class SamplerSettings:
    """What one sampler measurement runs: `config` a name in configs/generator/ (tiny, sd15-sized random
    init via `sd15`), images of `size` px, `batch` prompts, `steps` DDIM steps, `tas_steps` k for P3."""

    config: str = "tiny"
    size: int = 128
    batch: int = 4
    steps: int = 20
    tas_steps: int = 10
    repeats: int = 5
    compile: bool = True  # P1: time ours with torch.compile'd UNet + ControlNet as well


def build(settings: SamplerSettings, device: torch.device):
    """(our AttentionHandPipeline, diffusers' StableDiffusionControlNetPipeline) on `device`, same modules."""
    from diffusers import StableDiffusionControlNetPipeline

    config = load_config(settings.config)
    components = build_components(config).to(device)
    ours = AttentionHandPipeline.from_components(components, attention_downsample=config.attention_downsample,
                                                 sampling=config.sampling)
    theirs = StableDiffusionControlNetPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=components.unet, controlnet=components.guidance.controlnet,
        scheduler=type(components.scheduler).from_config(components.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    return ours, theirs, components


def _mesh_images(settings: SamplerSettings, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Global and local mesh-image stand-ins (B, 3, S, S) in [0, 1]; sampling speed does not depend on them."""
    g = torch.Generator().manual_seed(0)
    shape = (settings.batch, 3, settings.size, settings.size)
    return torch.rand(shape, generator=g).to(device), torch.rand(shape, generator=g).to(device)


def run_p1(settings: SamplerSettings, device: torch.device) -> dict:
    """images/s of ours over diffusers' ControlNet pipeline (global branch only, same everything)."""
    ours, theirs, components = build(settings, device)
    mesh, _ = _mesh_images(settings, device)
    prompts = [PROMPT] * settings.batch
    latent = settings.size // components.vae_scale_factor
    noise = torch.randn((settings.batch, 4, latent, latent), generator=torch.Generator().manual_seed(1)).to(device)

    def run_ours():
        return ours(mesh, None, prompts, num_inference_steps=settings.steps, guidance_scale=9.0, tas_steps=0,
                    latents=noise).images

    def run_theirs():
        return theirs(prompt=prompts, image=mesh, num_inference_steps=settings.steps, guidance_scale=9.0,
                      height=settings.size, width=settings.size, latents=noise, output_type="pt",
                      controlnet_conditioning_scale=1.0, guess_mode=False).images

    variants = {"ours_eager": run_ours, "diffusers": run_theirs}
    extra = {}
    with torch.inference_mode():
        reference = run_theirs()
        extra["max_abs_diff_eager"] = float((run_ours() - reference).abs().max())  # sanity: same images
        if settings.compile:
            fast = AttentionHandPipeline(
                tokenizer=components.tokenizer, text_encoder=components.text_encoder, vae=components.vae,
                unet=torch.compile(components.unet), scheduler=components.scheduler,
                guidance=torch.compile(components.guidance), attention_downsample=ours.attention_downsample,
                sampling=ours.sampling)

            def run_fast():
                return fast(mesh, None, prompts, num_inference_steps=settings.steps, guidance_scale=9.0,
                            tas_steps=0, latents=noise).images

            started = time.perf_counter()
            extra["max_abs_diff_compiled"] = float((run_fast() - reference).abs().max())
            extra["compile_s"] = round(time.perf_counter() - started, 1)
            variants = {"ours_compiled": run_fast, **variants}
        timings = interleaved(variants, settings.repeats, device)
    ips = {name: round(settings.batch / timings.median(name), 3) for name in variants}
    ours_name = "ours_compiled" if settings.compile else "ours_eager"
    extra.update(ours=ours_name, images_per_s=ips, ratio_eager=round(ips["ours_eager"] / ips["diffusers"], 3))
    return _entry(timings, ratio=ips[ours_name] / ips["diffusers"], target=1.3 if device.type == "cpu" else 2.0,
                  higher_is_better=True, settings=settings, extra=extra)


def run_p3(settings: SamplerSettings, device: torch.device) -> dict:
    """Sampling time with TAS on the first k = settings.tas_steps steps over without TAS (global + local branches, as AttentionHand
    samples for mixing)."""
    ours, _, components = build(settings, device)
    mesh, local = _mesh_images(settings, device)
    prompts = [PROMPT] * settings.batch

    def run(k: int):
        def call():
            g = torch.Generator(device=device).manual_seed(2)
            return ours(mesh, local, prompts, num_inference_steps=settings.steps, guidance_scale=9.0, tas_steps=k,
                        generator=g).images
        return call

    timings = interleaved({"tas": run(settings.tas_steps), "no_tas": run(0)}, settings.repeats, device)
    return _entry(timings, ratio=timings.median("tas") / timings.median("no_tas"), target=1.3,
                  higher_is_better=False, settings=settings, extra={"tas_steps": settings.tas_steps})


def _entry(timings: Timings, *, ratio: float, target: float, higher_is_better: bool, settings: SamplerSettings,
           extra: dict) -> dict:
    met = ratio >= target if higher_is_better else ratio <= target
    return {
        "ratio": round(ratio, 3), "target": target, "met": bool(met),
        "better": "higher" if higher_is_better else "lower",
        "median_s": {n: round(timings.median(n), 4) for n in timings.seconds},
        "seconds": {n: [round(s, 4) for s in v] for n, v in timings.seconds.items()},
        "peak_mib": {n: mib(b) for n, b in timings.peak_bytes.items()},
        "peak_growth_mib": {n: mib(b) for n, b in timings.peak_growth_bytes.items()},
        "settings": {"config": settings.config, "size": settings.size, "batch": settings.batch,
                     "steps": settings.steps, "repeats": settings.repeats, "scheduler": "DDIMScheduler",
                     "guidance_scale": 9.0},
        **extra,
    }
