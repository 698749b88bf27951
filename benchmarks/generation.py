"""P6: the mixing producer's generator images/s in the default mixing config over the behaviour of issue 26's
filing (point 10: ">= 2x today's at equal resolution and steps").

Both sides run `SyntheticSource.generate(chunk)` (label draw, framing, mesh rendering, prompts, sampling, as the
producer thread does) with one generator: `build_generator(MixingConfig())` (the shipped tiny-synthlab
generator, its config's sampling: DDIM 20 steps, guidance 9; fp32 on the CPU), the mixing size and chunk, and
the same label draws and noise (`call=` fixed per repetition).

- `default`: `MixingConfig()` as it is: the global branch only (`mixing.use_local: false`), ControlNet's
  mesh-image encoder run once per call (`GuidanceModule.embed_condition`) and the prompts' cross-attention keys
  and values once per call (`reuse_text_kv`, which `build_generator` turns on).
- `issue_time`: what the producer did when the issue was filed: the local branch's rows sampled too
  (`use_local=True`: twice the latent rows and VAE decodes, plus the local crop's rendering), the mesh images
  encoded and the keys and values computed at every step (diffusers' ControlNet forward and attention; the
  `_PerStepCondition` wrapper and `_text_kv = False` below restore both).

Labels come from the pose prior (`PriorLabelSource`), not a training set: the sampling cost does not depend on
the poses, and the benchmark needs no dataset on disk.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from generator.visual_attention import GuidanceModule

from .common import Timings, interleaved, mib


class _PerStepCondition(GuidanceModule):
    """The same ControlNet, fed the mesh images at every step (the pipeline before `embed_condition`)."""

    @property
    def reuses_condition(self) -> bool:
        return False


@dataclass
class GenerationSettings:
    repeats: int = 5


def run_p6(settings: GenerationSettings, device: torch.device) -> dict:
    from hands.mano import HandModel
    from mixing.build import build_generator, build_source
    from mixing.labels import PriorLabelSource

    from mixing.config import MixingConfig

    cfg = MixingConfig()
    hand_model = HandModel()
    labels = PriorLabelSource(hand_model, image_size=max(cfg.size, 256))
    default = build_source(cfg, hand_model=hand_model, labels=labels, device=device, seed=0)
    issue_time = copy.copy(default)
    issue_time.use_local = True
    issue_time.generator = copy.copy(default.generator)  # the same modules; only its guidance wrapper differs
    guidance = default.generator.guidance
    issue_time.generator.guidance = _PerStepCondition(controlnet=guidance.controlnet).eval()
    issue_time.generator._text_kv = False  # the prompts' attention keys and values at every step, as then
    # call=0 on both sides, every time: the same label draws, prompts and noise
    sides = {"default": lambda: default.generate(cfg.chunk, call=0),
             "issue_time": lambda: issue_time.generate(cfg.chunk, call=0)}
    with torch.inference_mode():
        a, b = sides["default"](), sides["issue_time"]()
        # the global images are the same either way (the local rows do not touch them; the embedding is reused)
        max_abs_diff = float((a.image - b.image).abs().max())
        timings = interleaved(sides, settings.repeats, device)
    ips = {name: round(cfg.chunk / timings.median(name), 3) for name in sides}
    ratio = ips["default"] / ips["issue_time"]
    return _entry(timings, ratio=ratio, ips=ips, cfg=cfg, settings=settings, max_abs_diff=max_abs_diff,
                  steps=default.generator.sampling.num_inference_steps if cfg.num_inference_steps is None
                  else cfg.num_inference_steps)


def _entry(timings: Timings, *, ratio, ips, cfg, settings, max_abs_diff, steps) -> dict:
    return {
        "ratio": round(ratio, 3), "target": 2.0, "met": bool(ratio >= 2.0), "better": "higher",
        "median_s": {n: round(timings.median(n), 4) for n in timings.seconds},
        "seconds": {n: [round(s, 4) for s in v] for n, v in timings.seconds.items()},
        "peak_mib": {n: mib(b) for n, b in timings.peak_bytes.items()},
        "peak_growth_mib": {n: mib(b) for n, b in timings.peak_growth_bytes.items()},
        "images_per_s": ips, "max_abs_diff_global_images": max_abs_diff,
        "settings": {"generator_config": cfg.generator_config, "size": cfg.size, "chunk": cfg.chunk,
                     "steps": steps, "repeats": settings.repeats, "labels": "prior"},
    }
