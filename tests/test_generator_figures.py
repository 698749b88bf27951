"""generator.figures: attention maps per hand token without / with TAS, samples from one mesh (tiny, 32 px)."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from generator.figures import (CAPTION_HEIGHT, PAD, attention_figure, heat_overlay, main, samples_figure,
                               token_texts)
from generator.model import GeneratorConfig, TinyArchitecture
from generator.pipeline import AttentionHandPipeline

TINY = TinyArchitecture(unet_channels=(4, 8), attention_heads=2, cross_attention_dim=8, latent_size=4,
                        vae_channels=(4, 8, 8, 8), text_layers=1, text_heads=2, text_intermediate_size=8)
PROMPT = "a man unscrewing a bottle with both hands"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTENTIONHAND_CACHE", str(tmp_path_factory.getbasetemp() / "ah_cache"))
        yield AttentionHandPipeline.from_config(GeneratorConfig(tiny=TINY, guidance_embedding_channels=(4, 4, 4, 4),
                                                                attention_downsample=2))


def _size(cols, rows, s=32):
    return cols * (s + PAD) + PAD, rows * (s + CAPTION_HEIGHT + PAD) + PAD


def test_attention_figure_has_one_column_per_hand_token_and_tas_changes_the_maps(pipe):
    mesh = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    figure, info = attention_figure(pipe, mesh, PROMPT, tas_steps=2, num_inference_steps=2)
    assert info["tokens"] == token_texts(pipe.tokenizer, PROMPT, pipe(mesh, None, PROMPT, num_inference_steps=1)
                                         .token_indices[0])
    assert "".join(info["tokens"][:-1]) == "unscrewing" and info["tokens"][-1] == "hands"
    assert figure.size == _size(1 + len(info["tokens"]), 2)
    assert not torch.equal(info["maps"]["without"], info["maps"]["with"])
    with pytest.raises(ValueError, match="no hand-related word"):
        attention_figure(pipe, mesh, "a cat on a sofa", tas_steps=1, num_inference_steps=1)


def test_heat_overlay_follows_the_map():
    image = torch.zeros(3, 32, 32)
    attention = torch.zeros(4, 4)
    attention[0, 0] = 1.0
    out = heat_overlay(image, attention)
    assert out.shape == (3, 32, 32) and out.min() >= 0 and out.max() <= 1
    hot, cold = out[:, :2, :2].mean((1, 2)), out[:, -4:, -4:].mean((1, 2))  # jet: red where hot, blue where cold
    assert hot[0] > hot[2] and cold[2] > cold[0]


def test_samples_figure_and_command_write_pngs(pipe, tmp_path):
    mesh = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    figure, images = samples_figure(pipe, mesh, PROMPT, num_samples=3, num_inference_steps=2)
    assert images.shape == (3, 3, 32, 32) and figure.size == _size(4, 1)
    assert not torch.equal(images[0], images[1])  # several samples from one mesh

    from hands.datasets.synthlab import write_synthlab
    from hands.mano import HandModel

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTENTIONHAND_CACHE", str(tmp_path / "cache"))
        root = write_synthlab(tmp_path / "synthlab", seed=1, sizes={"train-lab": 0, "test-lab": 0, "train-wild": 0,
                                                                     "test-wild": 1},
                              resolution=64, hand_model=HandModel(), show_progress=False)
        config = tmp_path / "tiny.yaml"
        config.write_text("tiny: {unet_channels: [4, 8], attention_heads: 2, cross_attention_dim: 8, latent_size: 4,"
                          " vae_channels: [4, 8, 8, 8], text_layers: 1, text_heads: 2, text_intermediate_size: 8}\n"
                          "guidance_embedding_channels: [4, 4, 4, 4]\nattention_downsample: 2\n")
        assert main(["--out", str(tmp_path / "figs"), "--generator-config", str(config), "--data-root", str(root),
                     "--size", "32", "--steps", "2", "--tas-steps", "1", "--samples", "2", "--device", "cpu",
                     "--prompt", PROMPT]) == 0
    attention = Image.open(tmp_path / "figs" / "generator-attention-tas.png")
    samples = Image.open(tmp_path / "figs" / "generator-samples.png")
    assert attention.format == samples.format == "PNG"
    assert attention.size == _size(1 + 4, 2) and samples.size == _size(3, 1)  # un, scre, wing, hands
