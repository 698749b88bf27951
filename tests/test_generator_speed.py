"""The sampler's speed options (AttentionHandPipeline.optimize, mixing.dtype/compile/channels_last): bf16 with
channels-last gives the fp32 images within bf16's error, TAS's maps and losses stay fp32; bad values are refused."""
from __future__ import annotations

import pytest
import torch

from generator.model import build_components, load_config
from generator.pipeline import AttentionHandPipeline

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
PROMPTS = ["a photo of two hands", "a hand"]


def _pipe():
    config = load_config("tiny-synthlab")
    return AttentionHandPipeline.from_components(build_components(config), attention_downsample=config.attention_downsample,
                                                 sampling=config.sampling)


def test_bf16_channels_last_sampling_agrees_with_fp32_and_keeps_tas_in_fp32():
    reference, fast = _pipe(), _pipe().optimize(dtype="bfloat16", channels_last=True)
    assert fast.unet.dtype == torch.bfloat16 and fast.vae.dtype == torch.bfloat16
    assert fast.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    size = reference.default_size
    mesh = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    kwargs = dict(num_inference_steps=4, tas_steps=2, return_attention=True)
    a = reference(mesh, mesh, PROMPTS, generator=[torch.Generator().manual_seed(i) for i in range(2)], **kwargs)
    b = fast(mesh, mesh, PROMPTS, generator=[torch.Generator().manual_seed(i) for i in range(2)], **kwargs)
    assert b.images.dtype == b.attention_maps.dtype == b.tas_losses.dtype == torch.float32
    # measured: mean |difference| 0.004, max 0.11 on [0, 1] images; TAS losses within 3e-4
    assert (a.images - b.images).abs().mean() < 0.02
    torch.testing.assert_close(b.tas_losses, a.tas_losses, atol=3e-3, rtol=0)


def test_the_mixing_generator_dtype_follows_the_device():
    from mixing.build import generator_dtype
    from mixing.config import MixingConfig

    assert generator_dtype(MixingConfig(), "cpu") is None  # the generator config's dtype (fp32) on the CPU
    assert generator_dtype(MixingConfig(dtype="float16"), "cpu") == torch.float16
    for key, value in (("dtype", "fp8"), ("compile", "fast")):
        with pytest.raises(ValueError, match=f"mixing.{key}='{value}': expected one of"):
            MixingConfig(**{key: value}).check()
