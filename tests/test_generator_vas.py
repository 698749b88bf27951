"""Visual attention stage: one shared ControlNet for both branches, one call on 2B rows, Eq. (6) wiring."""
from __future__ import annotations

import pytest
import torch
from diffusers import ControlNetModel

from generator.model import TinyArchitecture, build_tiny_components
from generator.visual_attention import GuidanceModule, predict_noise, split_branches, stack_branches

TINY = TinyArchitecture(unet_channels=(4, 8), attention_heads=2, cross_attention_dim=8, latent_size=8,
                        vae_channels=(4, 8, 8, 8), text_layers=1, text_heads=2, text_intermediate_size=8)


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTENTIONHAND_CACHE", str(tmp_path_factory.getbasetemp() / "ah_cache"))
        c = build_tiny_components(TINY, seed=0, guidance_embedding_channels=(4, 4, 4, 4))
        # a trained phi_g: non-zero output convolutions (from_unet initialises them to zero)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in c.guidance.named_parameters():
                if name.split(".")[1] in ("controlnet_down_blocks", "controlnet_mid_block") or "conv_out" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        yield c


def _inputs(b=2):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2 * b, 4, 8, 8, generator=g)
    text = torch.randn(2 * b, 77, 8, generator=g)
    mesh = torch.rand(2 * b, 3, 64, 64, generator=g)
    return latents, text, mesh


def test_guidance_is_one_controlnet_copied_from_the_unet(components):
    fresh = GuidanceModule.from_unet(components.unet, conditioning_embedding_out_channels=(4, 4, 4, 4))
    controlnets = [m for m in fresh.modules() if isinstance(m, ControlNetModel)]
    assert len(controlnets) == 1
    # theta_g starts as a copy of theta_d (encoder), with zero convolutions at its outputs
    assert torch.equal(fresh.controlnet.conv_in.weight, components.unet.conv_in.weight)
    assert all(torch.count_nonzero(z.weight) == 0 for z in fresh.controlnet.controlnet_down_blocks)
    latents, text, mesh = _inputs()
    with torch.no_grad():
        plain = predict_noise(components.unet, None, latents, 500, text, None)
        guided = predict_noise(components.unet, fresh, latents, 500, text, mesh)
    assert torch.allclose(plain, guided, atol=1e-6)  # zero-initialised residuals leave phi_d unchanged


def test_branches_run_as_one_batch_through_shared_weights(components):
    latents, text, mesh = _inputs(b=2)
    seen = []
    hook = components.guidance.controlnet.register_forward_hook(lambda m, args, kwargs, out: seen.append(
        kwargs.get("controlnet_cond", args[3] if len(args) > 3 else None).shape[0]), with_kwargs=True)
    try:
        with torch.no_grad():
            both = predict_noise(components.unet, components.guidance, latents, 500, text, mesh)
    finally:
        hook.remove()
    assert seen == [4]  # one ControlNet call on 2B rows
    # the same weights serve each branch: running a branch alone gives its rows of the stacked call
    with torch.no_grad():
        global_only = predict_noise(components.unet, components.guidance, latents[:2], 500, text[:2], mesh[:2])
        local_only = predict_noise(components.unet, components.guidance, latents[2:], 500, text[2:], mesh[2:])
    global_rows, local_rows = split_branches(both)
    assert torch.allclose(global_rows, global_only, atol=1e-5)
    assert torch.allclose(local_rows, local_only, atol=1e-5)


def test_each_branch_is_guided_by_its_own_mesh_only(components):
    """Eq. (5)-(6): Y_g = (Y_g^G, Y_g^L) are batch rows, not summed: a new local mesh changes only local rows."""
    latents, text, mesh = _inputs(b=2)
    changed = mesh.clone()
    changed[2:] = 1.0 - changed[2:]
    with torch.no_grad():
        before = predict_noise(components.unet, components.guidance, latents, 500, text, mesh)
        after = predict_noise(components.unet, components.guidance, latents, 500, text, changed)
        plain = predict_noise(components.unet, None, latents, 500, text, None)
    assert torch.equal(before[:2], after[:2])
    assert (before[2:] - after[2:]).abs().amax() > 1e-4  # float noise is ~1e-7
    assert not torch.allclose(before, plain, atol=1e-4)  # the guidance residuals are added (Y_d = phi_d + Y_g)


def test_a_precomputed_condition_gives_controlnets_own_residuals_and_the_sampler_embeds_once(components):
    """The sampler encodes the mesh images once per call (`embed_condition`) and passes the embedding at every
    step: the residuals are those of diffusers' ControlNet forward, bit for bit, in both channel orders."""
    from generator.pipeline import AttentionHandPipeline

    guidance = components.guidance
    latents, text, mesh = _inputs(b=2)
    t = torch.tensor(500)
    assert guidance.reuses_condition
    config = guidance.controlnet.config
    try:
        for order in ("rgb", "bgr"):
            config.controlnet_conditioning_channel_order = order
            with torch.no_grad():
                down, mid = guidance(latents, t, text, mesh, 0.7)
                down2, mid2 = guidance(latents, t, text, None, 0.7, condition=guidance.embed_condition(mesh))
            assert len(down) == len(down2) and torch.equal(mid, mid2)
            assert all(torch.equal(a, b) for a, b in zip(down, down2))
    finally:
        config.controlnet_conditioning_channel_order = "rgb"
    pipe = AttentionHandPipeline.from_components(components, attention_downsample=2)
    calls = []
    hook = guidance.controlnet.controlnet_cond_embedding.register_forward_hook(
        lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        pipe(mesh[:2], mesh[2:], ["a hand", "two hands"], num_inference_steps=3, guidance_scale=9.0,
             generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert calls == [4]  # once per call, on the 2B branch rows (not 4B guidance rows at each of the 3 steps)


def test_stack_and_split_branches():
    g, l = torch.zeros(2, 3), torch.ones(2, 3)
    stacked = stack_branches(g, l)
    assert stacked.shape == (4, 3) and torch.equal(split_branches(stacked)[1], l)
    with pytest.raises(ValueError, match="same shape"):
        stack_branches(g, torch.ones(3, 3))
