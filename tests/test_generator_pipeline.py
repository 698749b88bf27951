"""AttentionHandPipeline on the tiny generator; model building from configs and SD-layout folders."""
from __future__ import annotations

import logging
import re
import shutil

from pathlib import Path

import pytest
import torch

from generator.model import (GeneratorConfig, TinyArchitecture, build_components, build_tiny_components,
                             load_config, load_sd_components, save_components)
from generator.pipeline import AttentionHandPipeline

TINY = TinyArchitecture(unet_channels=(4, 8), attention_heads=2, cross_attention_dim=8, latent_size=4,
                        vae_channels=(4, 8, 8, 8), text_layers=1, text_heads=2, text_intermediate_size=8)
PROMPTS = ["A man unscrewing a bottle with both hands", "A cat on a sofa"]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTENTIONHAND_CACHE", str(tmp_path_factory.getbasetemp() / "ah_cache"))
        components = build_tiny_components(TINY, seed=0, guidance_embedding_channels=(4, 4, 4, 4))
        yield AttentionHandPipeline.from_components(components, attention_downsample=2)


def _mesh(b=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g), torch.rand(b, 3, size, size, generator=g)


def _gens(b=2, base=0):
    return [torch.Generator().manual_seed(base + i) for i in range(b)]


def test_deterministic_finite_images_of_requested_shape(pipe):
    mesh, local = _mesh()
    a = pipe(mesh, local, PROMPTS, num_inference_steps=2, generator=_gens())
    b = pipe(mesh, local, PROMPTS, num_inference_steps=2, generator=_gens())
    for out in (a, b):
        assert out.images.shape == (2, 3, 32, 32) and out.local_images.shape == (2, 3, 32, 32)
        assert torch.isfinite(out.images).all() and out.images.min() >= 0 and out.images.max() <= 1
    assert torch.equal(a.images, b.images) and torch.equal(a.local_images, b.local_images)
    c = pipe(mesh, local, PROMPTS, num_inference_steps=2, generator=_gens(base=10))
    assert not torch.equal(a.images, c.images)  # another seed, other images


def test_global_branch_equals_diffusers_controlnet_pipeline(pipe):
    """Without local meshes and TAS, sampling is exactly diffusers' StableDiffusionControlNetPipeline (same
    components, latents, DDIM, guidance 9) - the reference's inference path."""
    from diffusers import StableDiffusionControlNetPipeline

    guidance = pipe.guidance.controlnet
    saved = {k: v.clone() for k, v in guidance.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a "trained" ControlNet: non-zero output convolutions
        for name, p in guidance.named_parameters():
            if name.split(".")[0] in ("controlnet_down_blocks", "controlnet_mid_block"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    try:
        reference = StableDiffusionControlNetPipeline(
            vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
            controlnet=guidance, scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        reference.set_progress_bar_config(disable=True)
        mesh, _ = _mesh()
        latents = torch.randn(2, 4, 4, 4, generator=g)
        ours = pipe(mesh, None, PROMPTS, num_inference_steps=2, latents=latents).images
        theirs = reference(PROMPTS, image=mesh, num_inference_steps=2, guidance_scale=9.0, eta=0.0, latents=latents,
                           output_type="pt", height=32, width=32).images
    finally:
        guidance.load_state_dict(saved)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_per_sample_generators_make_samples_independent_of_the_batch(pipe):
    mesh, _ = _mesh()
    both = pipe(mesh, None, PROMPTS, num_inference_steps=2, generator=_gens())
    first = pipe(mesh[:1], None, PROMPTS[:1], num_inference_steps=2, generator=_gens(1))
    assert both.local_images is None
    assert torch.allclose(both.images[:1], first.images, atol=1e-5)


def test_tas_steps_change_the_result_and_skip_prompts_without_hand_words(pipe, caplog):
    mesh, local = _mesh()
    plain = pipe(mesh, local, PROMPTS, num_inference_steps=2, generator=_gens())
    with caplog.at_level(logging.WARNING, logger="generator.pipeline"):
        tas = pipe(mesh, local, PROMPTS, num_inference_steps=2, tas_steps=1, generator=_gens(), return_attention=True)
    assert "TAS skipped for 1 of 2 prompts" in caplog.text and "A cat on a sofa" in caplog.text
    assert tas.token_indices == [[3, 4, 5, 10], []]
    assert tas.tas_losses.shape == (1, 4)  # one TAS step, 2B rows (global, local)
    assert tas.tas_losses[0, 0] > 0 and tas.tas_losses[0, 1] == 0 and tas.tas_losses[0, 3] == 0
    assert (tas.images[0] - plain.images[0]).abs().amax() > 1e-4
    # no hand word: TAS left this sample alone (recording attention only changes float rounding)
    assert torch.allclose(tas.images[1], plain.images[1], atol=1e-5)
    assert tas.attention_maps.shape == (2, 2, 2, 77) and tas.local_attention_maps.shape == (2, 2, 2, 77)
    assert torch.allclose(tas.attention_maps.sum(-1), torch.ones(2, 2, 2), atol=1e-5)


@pytest.mark.parametrize("bad, message", [
    (dict(mesh_images=torch.rand(2, 1, 32, 32)), r"\(B, 3, H, W\)"),
    (dict(mesh_images=torch.rand(2, 3, 40, 32)), "multiples of 16"),
    (dict(mesh_images=torch.rand(2, 3, 32, 32) * 255), r"in \[0, 1\]"),
    (dict(local_mesh_images=torch.rand(2, 3, 16, 16)), "shape of mesh_images"),
    (dict(prompts=["only one"]), "list of 2 strings"),
    (dict(tas_steps=3), "tas_steps"),
    (dict(generator=_gens(3)), "one torch.Generator per sample"),
])
def test_check_inputs_says_what_to_fix(pipe, bad, message):
    mesh, local = _mesh()
    args = dict(mesh_images=mesh, local_mesh_images=local, prompts=PROMPTS, num_inference_steps=2)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        pipe(args.pop("mesh_images"), args.pop("local_mesh_images"), args.pop("prompts"), **args)


def test_non_sd_folder_fails_naming_what_is_missing(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"missing model_index.json, vae/config.json, text_encoder/config.json"):
        build_components(GeneratorConfig(sd_path=str(tmp_path)))


def test_sd_folder_written_by_save_pretrained_loads_through_sd_path(pipe, tmp_path):
    from generator.model import GeneratorComponents

    components = GeneratorComponents(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                                     unet=pipe.unet, scheduler=pipe.scheduler, guidance=pipe.guidance)
    folder = save_components(components, tmp_path / "sd")
    assert (folder / "model_index.json").is_file() and (folder / "guidance" / "config.json").is_file()
    loaded = build_components(GeneratorConfig(sd_path=str(folder)))  # the --sd-path route
    for name in ("unet", "vae", "text_encoder", "guidance"):
        ours, theirs = getattr(components, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert type(loaded.scheduler) is type(pipe.scheduler)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.scheduler.config) == public(pipe.scheduler.config)
    assert loaded.tokenizer(PROMPTS[0]).input_ids == pipe.tokenizer(PROMPTS[0]).input_ids
    # the same folder without guidance/ gets a fresh ControlNet from its UNet; a guidance file must fit
    shutil.rmtree(folder / "guidance")
    assert torch.equal(load_sd_components(folder).guidance.controlnet.conv_in.weight, pipe.unet.conv_in.weight)
    (tmp_path / "bad.safetensors").write_bytes(b"")
    with pytest.raises(Exception):
        load_sd_components(folder, guidance_path=tmp_path / "bad.safetensors")


def test_configs_load_strictly():
    tiny = load_config("tiny")
    assert tiny.sd_path is None and tiny.sampling.guidance_scale == 9.0 and tiny.sampling.num_inference_steps == 20
    assert load_config("tiny", ["sampling.tas_steps=5"]).sampling.tas_steps == 5
    with pytest.raises(ValueError, match="needs sd_path"):
        load_config("sd15")
    assert load_config("sd15", ["sd_path=/models/sd15"]).attention_downsample == 4
    with pytest.raises(Exception, match="nonsense"):
        load_config("tiny", ["nonsense=1"])


def test_relative_paths_in_a_config_file_are_relative_to_the_file(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mine.yaml").write_text("sd_path: ../weights/model\nguidance_path: g.safetensors\n")
    monkeypatch.chdir(tmp_path / "configs")
    cfg = load_config(tmp_path / "configs" / "mine.yaml")
    assert cfg.sd_path == str((tmp_path / "weights" / "model").resolve())
    assert cfg.guidance_path == str((tmp_path / "configs" / "g.safetensors").resolve())
    # an override is a command-line path: relative to the working directory, left as given
    assert load_config(tmp_path / "configs" / "mine.yaml", ["sd_path=other"]).sd_path == "other"
    # ~ is the home folder, and ${...} resolves as written
    (tmp_path / "configs" / "home.yaml").write_text("sd_path: ~/sd15\nguidance_path: ${oc.env:MY_GUIDANCE}\n")
    monkeypatch.setenv("MY_GUIDANCE", "rel/g.safetensors")
    cfg = load_config(tmp_path / "configs" / "home.yaml")
    assert cfg.sd_path == str(Path("~/sd15").expanduser()) and cfg.guidance_path == "rel/g.safetensors"


def test_prompt_banks_always_name_hand_tokens():
    from generator.prompts import prompt_bank
    from generator.tagging import hand_token_indices
    from generator.text import load_clip_tokenizer

    tokenizer = load_clip_tokenizer()
    synthlab = prompt_bank("synthlab")
    assert synthlab.prompt(0) == "a person clasping hands in a cluttered kitchen under warm light"
    assert load_config("tiny-synthlab-init").prompts == "synthlab" and load_config("tiny").prompts == "wild"
    g = torch.Generator().manual_seed(0)
    for bank in (synthlab, prompt_bank("wild")):
        for prompt in bank.sample(12, g) + bank.sample(12, g, hands=["right", "left"] * 6):
            assert hand_token_indices(prompt, tokenizer), prompt
        for action in bank.one_hand_actions:  # every one-hand action is tagged, not only the drawn ones
            assert hand_token_indices(action.format(side="left"), tokenizer), action
    with pytest.raises(ValueError, match="unknown prompt bank 'nope'"):
        prompt_bank("nope")


def test_prompt_bank_draws_one_hand_prompts_for_one_hand_labels():
    from generator.prompts import prompt_bank

    for name in ("synthlab", "wild"):
        bank = prompt_bank(name)
        hands = ["both", "right", "left", "right"] * 6
        drawn = bank.sample(len(hands), torch.Generator().manual_seed(4), hands=hands)
        # the two-hand prompts are the same draws as without ``hands``
        before = bank.sample(len(hands), torch.Generator().manual_seed(4))
        assert [p for p, h in zip(drawn, hands) if h == "both"] == [p for p, h in zip(before, hands) if h == "both"]
        for prompt, side in zip(drawn, hands):
            if side == "both":
                assert any(action in prompt for action in bank.actions)
            else:
                other = "left" if side == "right" else "right"
                assert f"{side} hand" in prompt and not re.search(rf"\b({other}|both|hands)\b", prompt), prompt
        assert len({p for p, h in zip(drawn, hands) if h != "both"}) > 6  # the one-hand draws vary
    synthlab = prompt_bank("synthlab")
    assert synthlab.prompt(0, "left") == "a person showing an open left hand in a cluttered kitchen under warm light"
    with pytest.raises(ValueError, match="hands 'two'"):
        synthlab.prompt(0, "two")
    with pytest.raises(ValueError, match="hands: 2 entries for 3 prompts"):
        synthlab.sample(3, torch.Generator().manual_seed(0), hands=["both", "left"])
