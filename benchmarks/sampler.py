"""P1 (our sampler vs diffusers' StableDiffusionControlNetPipeline) and P3 (TAS on the first k steps vs none).

Both pipelines share one set of modules (same weights): the CLIP text model, VAE, UNet and the ControlNet that
our `GuidanceModule` wraps; DDIM, the same steps, batch, resolution, guidance 9.0 and starting noise, images
returned as tensors. diffusers' pipeline has no local branch, so P1 gives both the global mesh image only.

P1 times three variants, interleaved: diffusers' pipeline, ours as built (eager), and ours with the pipeline's
own `optimize(compile=True, reuse_text_kv=True, math_attention=True)` (math attention on the CPU only) (a second pipeline object over a copy of the modules, same
weights: its attention processors and compiled region are private to it, diffusers' pipeline keeps the eager
modules with diffusers' processors). The ratio is the compiled variant's (compilation time reported separately,
not timed: it is paid once per process and shape, and the mixing producer samples thousands of times). Both of
ours encode the mesh images once per call (`GuidanceModule.embed_condition`), as the pipeline always does.

P5 (CUDA): an SD1.5-sized random-initialised generator (`SD15_SIZED`), our pipeline in fp32 and in the default
mixing setting (`mixing.dtype=auto`: bf16 where supported, else fp16; channels-last), diffusers' pipeline in fp32.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from generator.model import build_components, load_config
from generator.pipeline import AttentionHandPipeline

from .common import Timings, interleaved, mib

# TinyArchitecture overrides of the same sizes as Stable Diffusion 1.5 (UNet 320/640/1280/1280 with 2 layers per
# block, 8 heads, CLIP-L-sized 12-layer text model of width 768, VAE 128/256/512/512) with ControlNet's hint
# encoder; random init: nothing is downloaded.
SD15_SIZED = (
    "tiny.unet_channels=[320,640,1280,1280]", "tiny.layers_per_block=2", "tiny.attention_heads=8",
    "tiny.cross_attention_dim=768", "tiny.latent_size=64", "tiny.vae_channels=[128,256,512,512]",
    "tiny.text_layers=12", "tiny.text_heads=12", "tiny.text_intermediate_size=3072",
    "guidance_embedding_channels=[16,32,96,256]", "attention_downsample=4",
)
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
    overrides: tuple[str, ...] = ()  # generator config overrides (SD15_SIZED)


def build(settings: SamplerSettings, device: torch.device):
    """(our AttentionHandPipeline, diffusers' StableDiffusionControlNetPipeline) on `device`, same modules."""
    from diffusers import StableDiffusionControlNetPipeline

    config = load_config(settings.config, list(settings.overrides))
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
            import copy

            fast = AttentionHandPipeline.from_components(copy.deepcopy(components),
                                                         attention_downsample=ours.attention_downsample,
                                                         sampling=ours.sampling).optimize(
                compile=True, reuse_text_kv=True, math_attention=device.type == "cpu")  # on a GPU: SDPA

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
    return _entry(timings, ratio=ips[ours_name] / ips["diffusers"], target=1.5 if device.type == "cpu" else 2.0,
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


def run_p5(settings: SamplerSettings, device: torch.device) -> dict:
    """images/s of the SD1.5-sized generator in the default mixing setting (bf16 / fp16, channels-last) over fp32,
    global + local branches as mixing samples; diffusers' pipeline (fp32, global only) timed beside it."""
    import copy

    from mixing.build import generator_dtype
    from mixing.config import MixingConfig

    ours, theirs, components = build(settings, device)
    dtype = generator_dtype(MixingConfig(), device) or torch.float32
    fast_components = copy.deepcopy(components)  # its own modules: the cast must not touch the fp32 ones
    fast = AttentionHandPipeline.from_components(fast_components, attention_downsample=ours.attention_downsample,
                                                 sampling=ours.sampling).optimize(dtype=dtype, channels_last=True,
                                                                                  compile=settings.compile)
    mesh, local = _mesh_images(settings, device)
    prompts = [PROMPT] * settings.batch

    def run(pipe):
        def call():
            g = [torch.Generator(device=device).manual_seed(i) for i in range(settings.batch)]
            return pipe(mesh, local, prompts, num_inference_steps=settings.steps, guidance_scale=9.0, tas_steps=0,
                        generator=g).images
        return call

    def run_theirs():
        return theirs(prompt=prompts, image=mesh, num_inference_steps=settings.steps, guidance_scale=9.0,
                      height=settings.size, width=settings.size, output_type="pt").images

    with torch.inference_mode():
        a, b = run(ours)(), run(fast)()
        agreement = {"mean_abs_diff": float((a - b).abs().mean()), "max_abs_diff": float((a - b).abs().max())}
        timings = interleaved({"fp32": run(ours), "default_mixing": run(fast), "diffusers_fp32_global": run_theirs},
                              settings.repeats, device)
    ips = {name: round(settings.batch / timings.median(name), 3) for name in timings.seconds}
    return _entry(timings, ratio=ips["default_mixing"] / ips["fp32"], target=2.0, higher_is_better=True,
                  settings=settings, extra={"images_per_s": ips, "dtype": str(dtype).replace("torch.", ""),
                                            "agreement_vs_fp32": agreement, "overrides": list(settings.overrides)})


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
