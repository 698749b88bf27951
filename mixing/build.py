"""The one place where a :class:`mixing.config.MixingConfig` becomes a generator, a source and a provider."""
from __future__ import annotations

import logging
from typing import Callable

import torch

from hands.sample import HandBatch, collate
from mixing.config import MixingConfig
from mixing.labels import DatasetLabelSource, PriorLabelSource
from mixing.mixer import SyncProvider
from mixing.pool import SamplePool
from mixing.shards import ShardReader
from mixing.source import SyntheticSource

__all__ = ["generator_config", "build_generator", "generator_dtype", "build_label_source", "build_source", "build_provider", "per_sample_preprocess"]

logger = logging.getLogger(__name__)


def generator_config(cfg: MixingConfig):
    """The :class:`generator.model.GeneratorConfig` that ``cfg`` resolves to (its config file, sd_path /
    guidance_path and sampling overrides)."""
    from generator.model import load_config

    overrides = []
    if cfg.sd_path:
        overrides.append(f"sd_path={cfg.sd_path}")
    if cfg.guidance_path:
        overrides.append(f"guidance_path={cfg.guidance_path}")
    if cfg.sd_path and cfg.generator_config == "tiny-synthlab":
        from generator.model import is_project_generator

        if not is_project_generator(cfg.sd_path):
            raise ValueError(
                f"mixing.sd_path={cfg.sd_path} with mixing.generator_config=tiny-synthlab (the default): that config's "
                "TAS resolution, prompts and sampling are the tiny generator's; for Stable Diffusion 1.5 also pass "
                "mixing.generator_config=sd15 (an export of python -m generator.train --train-modules all is fine)")
    if cfg.scheduler is not None:
        import diffusers

        if not cfg.scheduler.endswith("Scheduler") or not hasattr(getattr(diffusers, cfg.scheduler, None), "from_config"):
            raise ValueError(f"mixing.scheduler={cfg.scheduler!r}: not a diffusers scheduler class (e.g. DDIMScheduler, "
                             "DPMSolverMultistepScheduler, UniPCMultistepScheduler)")
        overrides.append(f"scheduler={cfg.scheduler}")
    gen_cfg = load_config(cfg.generator_config, overrides)
    if cfg.num_inference_steps is not None:
        gen_cfg.sampling.num_inference_steps = cfg.num_inference_steps
    if cfg.guidance_scale is not None:
        gen_cfg.sampling.guidance_scale = cfg.guidance_scale
    if cfg.tas_steps is not None:
        gen_cfg.sampling.tas_steps = cfg.tas_steps
    return gen_cfg


def build_generator(cfg: MixingConfig, device: torch.device | str = "cpu"):
    """The generator named by ``cfg.generator`` on ``device`` (an :class:`mixing.source.ImageGenerator`)."""
    gen_cfg = generator_config(cfg)
    if cfg.generator == "attentionhand":
        from generator.pipeline import AttentionHandPipeline

        pipe = AttentionHandPipeline.from_config(gen_cfg)
    else:
        try:
            from generator.baselines import build_baseline
        except ImportError as exc:
            raise ValueError(
                f"mixing.generator={cfg.generator!r}: the baseline generators (generator.baselines) are not "
                f"available ({exc}); use mixing.generator=attentionhand"
            ) from exc
        pipe = build_baseline(cfg.generator, gen_cfg)
    pipe = pipe.to(device)
    if callable(getattr(pipe, "optimize", None)):
        pipe.optimize(dtype=generator_dtype(cfg, device), channels_last=cfg.channels_last,
                      compile={"off": False, "default": True}.get(cfg.compile, cfg.compile),
                      reuse_text_kv=True,  # exact: the prompts' attention keys/values once per chunk
                      math_attention=cfg.math_attention)
    return pipe


def generator_dtype(cfg: MixingConfig, device: torch.device | str) -> torch.dtype | None:
    """The generator's dtype for ``cfg.dtype`` on ``device`` (None: keep the generator config's)."""
    device = torch.device(device)
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if device.type != "cuda":
        return None
    try:
        bf16 = torch.cuda.is_bf16_supported()
    except Exception:  # the device cannot be asked (a simulator, a broken driver): keep the config's dtype
        return None
    return torch.bfloat16 if bf16 else torch.float16


def build_label_source(cfg: MixingConfig, *, hand_model, train_readers=()):
    """Labels from the training readers (``cfg.labels == "train"``: the first reader that serves labels; a
    dataset name: that reader, e.g. ``coco``) or from the pose prior."""
    if cfg.labels == "prior":
        return PriorLabelSource(hand_model, image_size=max(cfg.size, 256))
    for reader in train_readers:
        if hasattr(reader, "load_labels") and cfg.labels in ("train", getattr(reader, "name", None)):
            return DatasetLabelSource(reader, hand_model)
    if cfg.labels != "train":
        names = ", ".join(getattr(r, "name", type(r).__name__) for r in train_readers) or "none"
        raise ValueError(f"mixing.labels={cfg.labels}: no training reader of that name (training readers: {names})")
    names = ", ".join(type(r).__name__ for r in train_readers) or "none"
    raise ValueError(f"mixing.labels=train: no training reader serves labels (readers: {names}); use mixing.labels=prior")


def build_source(cfg: MixingConfig, *, hand_model, labels, device, seed: int, rank: int = 0) -> SyntheticSource:
    """The synthetic source of ``cfg``: its generator, prompts from the bank the generator config names."""
    from generator.prompts import prompt_bank

    gen_cfg = generator_config(cfg)
    return SyntheticSource(
        labels=labels,
        generator=build_generator(cfg, device),
        faces_right=hand_model.faces_for("right"),
        faces_left=hand_model.faces_for("left"),
        size=cfg.size,
        use_local=cfg.use_local,
        framing=cfg.framing or gen_cfg.framing,
        extend=gen_cfg.extend if cfg.extend is None else cfg.extend,
        prompts=prompt_bank(gen_cfg.prompts),
        seed=seed,
        rank=rank,
        device=device,
        blank_mesh=cfg.mesh_condition == "blank",
    )


def build_provider(
    cfg: MixingConfig, *, source: SyntheticSource | None, device, seed: int, rank: int = 0, world_size: int = 1
):
    """The synthetic provider of ``cfg.mode``: a started :class:`SamplePool`, a :class:`SyncProvider`, or a
    :class:`ShardReader` (which needs no source)."""
    cfg.check()
    if cfg.mode == "offline":
        return ShardReader(cfg.shards, device=device, seed=seed, rank=rank, world_size=world_size)
    if source is None:
        raise ValueError(f"mixing.mode={cfg.mode} needs a synthetic source")
    if cfg.mode == "sync":
        return SyncProvider(source.generate)
    chunk = cfg.chunk
    return SamplePool(
        lambda: source.generate(chunk),
        capacity=cfg.capacity,
        max_reuse=cfg.max_reuse,
        device=device,
        seed=seed + rank,
        resident=(source.generator, source.faces_right, source.faces_left),  # read on the producer's stream
        max_resident_mib=cfg.max_pool_mib,
        max_share=cfg.max_producer_share,
    )


def per_sample_preprocess(
    transform: Callable, *, seed: int, rank: int = 0
) -> Callable[[HandBatch], HandBatch]:
    """Apply a per-sample ``transform(sample, generator) -> sample`` (the arch's crop and augmentation) to
    every sample of a generated batch, with generators seeded by (seed, rank, running index), on the batch's
    device."""
    counter = {"n": 0}

    def apply(batch: HandBatch) -> HandBatch:
        out = []
        for sample in batch.unbind():
            g = torch.Generator().manual_seed((seed * 1_000_003 + rank * 7_919 + counter["n"]) % (2**63 - 1))
            counter["n"] += 1
            out.append(transform(sample, g))
        return collate(out)

    return apply
