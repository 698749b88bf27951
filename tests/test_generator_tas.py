"""Text attention stage: recorders, early-exit forward, L_TAS against hand and naive computations, the update."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from generator.model import TinyArchitecture, build_tiny_components
from generator.text_attention import (AttentionStore, TasSchedule, apply_tas, attention_hw_for,
                                      cross_attention_layers, recording, tas_attention_maps, tas_loss,
                                      tas_loss_batch)

TINY = TinyArchitecture(unet_channels=(4, 8), attention_heads=2, cross_attention_dim=8, latent_size=8,
                        vae_channels=(4, 8, 8, 8), text_layers=1, text_heads=2, text_intermediate_size=8)
PROMPT = "A man unscrewing a bottle with both hands"


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTENTIONHAND_CACHE", str(tmp_path_factory.getbasetemp() / "ah_cache"))
        components = build_tiny_components(TINY, seed=0, guidance_embedding_channels=(4, 4, 4, 4))
        ids = components.tokenizer([PROMPT] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            embeds = components.text_encoder(ids)[0]
        yield components, embeds


def test_tas_loss_matches_hand_computation():
    attention = torch.zeros(4, 4, 77)
    attention[1, 2, 3] = 1.0  # token 3 dominates pixel (1, 2); elsewhere all 75 tokens tie
    # x100 then softmax over tokens 1..75: token 3 is ~1 at (1, 2), every token is 1/75 elsewhere.
    # 3x3 Gaussian of std 0.5*sqrt(2): 1-D weights exp(-x^2) -> centre c = 1 / (1 + 2/e).
    c = 1.0 / (1.0 + 2.0 / math.e)
    peak_token3 = c * c * 1.0 + (1.0 - c * c) / 75.0
    assert tas_loss(attention, [3]).item() == pytest.approx(1.0 - peak_token3, abs=1e-6)
    # token 7 is uniform (1/75 everywhere): its loss 1 - 1/75 is the larger, so it is the max.
    assert tas_loss(attention, [3, 7]).item() == pytest.approx(1.0 - 1.0 / 75.0, abs=1e-6)
    # a peaked map (value 1 after smoothing) gives max(0, 1 - s) = 0
    peaked = torch.zeros(4, 4, 77)
    peaked[:, :, 5] = 1.0
    assert tas_loss(peaked, [5]).item() == pytest.approx(0.0, abs=1e-6)


def _naive_tas_loss(attention, indices):
    """The reference's recipe written out: kernel exp(-((x - mu) / (2 sigma))^2) with sigma 0.5, reflect pad 1."""
    a = torch.softmax(attention[:, :, 1:76] * 100, dim=-1)
    grid = torch.arange(3, dtype=torch.float64)
    k1 = torch.exp(-((grid - 1) / (2 * 0.5)) ** 2)
    kernel = (k1[:, None] * k1[None, :]) / (k1[:, None] * k1[None, :]).sum()
    losses = []
    for i in indices:
        image = F.pad(a[:, :, i - 1][None, None], (1, 1, 1, 1), mode="reflect")
        smoothed = F.conv2d(image, kernel[None, None].to(image.dtype))
        losses.append(max(0.0, 1.0 - smoothed.max().item()))
    return max(losses)


def test_tas_loss_matches_naive_reference_on_random_maps():
    g = torch.Generator().manual_seed(3)
    attention = torch.softmax(torch.randn(2, 6, 5, 77, generator=g, dtype=torch.float64) * 3, dim=-1)
    indices = [[2, 9, 40], [75]]
    batch = tas_loss_batch(attention, indices)
    for b in range(2):
        assert batch[b].item() == pytest.approx(_naive_tas_loss(attention[b], indices[b]), abs=1e-9)


def test_tas_loss_rejects_positions_outside_1_to_75():
    with pytest.raises(ValueError, match="outside 1..75"):
        tas_loss(torch.zeros(4, 4, 77), [0])
    with pytest.raises(ValueError, match="outside 1..75"):
        tas_loss(torch.zeros(4, 4, 77), [76])


def test_step_schedules():
    reference = TasSchedule().step_sizes(50)
    assert reference[0] == pytest.approx(20.0) and reference[-1] == pytest.approx(20 * math.sqrt(0.5))
    assert reference[10] == pytest.approx(20 * math.sqrt(1 - 0.5 * 10 / 49))
    paper = TasSchedule(kind="paper").step_sizes(5)
    assert paper == pytest.approx([20.0, 17.5, 15.0, 12.5, 10.0])


def test_layer_selection_and_bad_resolution(parts):
    components, _ = parts
    layers = cross_attention_layers(components.unet, (8, 8), (4, 4))
    assert layers == [
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor",
        "mid_block.attentions.0.transformer_blocks.0.attn2.processor",
        "up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor",
        "up_blocks.0.attentions.1.transformer_blocks.0.attn2.processor",
    ]
    assert attention_hw_for((64, 64), 4) == (16, 16)
    with pytest.raises(ValueError, match="available"):
        cross_attention_layers(components.unet, (8, 8), (2, 2))


def test_early_exit_gives_the_full_forward_maps_and_skips_the_rest(parts):
    components, embeds = parts
    unet = components.unet
    store = AttentionStore(cross_attention_layers(unet, (8, 8), (4, 4)), (4, 4))
    latents = torch.randn(2, 4, 8, 8)
    calls = []
    hook = unet.up_blocks[1].register_forward_hook(lambda *args: calls.append(1))
    try:
        with torch.no_grad(), recording(unet, store):
            full = tas_attention_maps(unet, store, latents, 400, embeds, early_exit=False)
            assert len(calls) == 1
            early = tas_attention_maps(unet, store, latents, 400, embeds)
            assert len(calls) == 1  # the finest up block never ran
    finally:
        hook.remove()
    assert early.shape == (2, 4, 4, 77)
    assert torch.equal(early, full)
    assert torch.allclose(early.sum(-1), torch.ones(2, 4, 4), atol=1e-5)
    # the original processors are back after the recording block
    assert all(type(p).__name__ != "CrossAttentionRecorder" for p in unet.attn_processors.values())


def test_recording_processor_keeps_the_layer_output(parts):
    """The recording processor computes the same layer output as the original (SDPA) processor."""
    components, embeds = parts
    unet = components.unet
    latents = torch.randn(2, 4, 8, 8)
    store = AttentionStore(cross_attention_layers(unet, (8, 8), (4, 4)), (4, 4))
    with torch.no_grad():
        plain = unet(latents, 300, encoder_hidden_states=embeds).sample
        with recording(unet, store):
            store.active = True
            recorded = unet(latents, 300, encoder_hidden_states=embeds).sample
            store.active = False
    assert torch.allclose(plain, recorded, atol=1e-5)


def test_one_update_lowers_tas_loss(parts):
    components, embeds = parts
    unet = components.unet.double()
    embeds = embeds.double()
    try:
        store = AttentionStore(cross_attention_layers(unet, (8, 8), (4, 4)), (4, 4))
        latents = torch.randn(3, 4, 8, 8, dtype=torch.float64)
        indices = [[3, 4, 5, 10], [10], []]  # the third sample has no hand token: left unchanged
        embeds3 = torch.cat([embeds, embeds[:1]])
        with recording(unet, store):
            before = tas_loss_batch(tas_attention_maps(unet, store, latents, 500, embeds3), indices)
            updated, reported = apply_tas(unet, store, latents, 500, embeds3, indices, TasSchedule().step_sizes(20)[:1])
            after = tas_loss_batch(tas_attention_maps(unet, store, updated, 500, embeds3), indices)
    finally:
        unet.float()
    assert torch.allclose(reported, before)
    assert (after[:2] < before[:2]).all()
    assert not torch.equal(updated[:2], latents[:2])
    assert torch.equal(updated[2], latents[2]) and after[2] == 0 and not updated.requires_grad


def test_sd15_layout_records_the_five_16x16_layers():
    """SD 1.5's block layout (small channels): 16x16 maps for 64x64 latents come from down_blocks.2 (2 layers)
    and up_blocks.1 (3 layers); the mid block runs at 8x8."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=64, block_out_channels=(8, 8, 8, 8), layers_per_block=2, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=8, attention_head_dim=2)
    layers = cross_attention_layers(unet, (64, 64), attention_hw_for((64, 64), 4))
    assert [name.split(".transformer_blocks")[0] for name in layers] == [
        "down_blocks.2.attentions.0", "down_blocks.2.attentions.1",
        "up_blocks.1.attentions.0", "up_blocks.1.attentions.1", "up_blocks.1.attentions.2"]
