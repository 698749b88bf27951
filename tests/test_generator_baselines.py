"""generator.baselines: Table A's generators behind AttentionHandPipeline's interface (tiny models, 32 px, CPU)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from generator.baselines import GENERATORS, AdapterUNet, build_baseline, tiny_t2i_adapter
from generator.model import GeneratorConfig, TinyArchitecture, build_components, save_components
from generator.pipeline import AttentionHandPipeline

CFG = GeneratorConfig(tiny=TinyArchitecture(unet_channels=(4, 8), attention_heads=2, cross_attention_dim=8,
                                            latent_size=4, vae_channels=(4, 8, 8, 8), text_layers=1, text_heads=2,
                                            text_intermediate_size=8),
                      guidance_embedding_channels=(4, 4, 4, 4), attention_downsample=2)
PROMPTS = ["a woman clapping hands in a kitchen", "two hands holding a cup"]


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTENTIONHAND_CACHE", str(tmp_path_factory.getbasetemp() / "ah_cache"))
        yield


@pytest.fixture(scope="module")
def pipes():
    return {name: build_baseline(name, CFG).to("cpu") for name in GENERATORS}


def _mesh(seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 32, 32, generator=g), torch.rand(b, 3, 32, 32, generator=g)


def _gens(base=0, b=2):
    return [torch.Generator().manual_seed(base + i) for i in range(b)]


def _run(pipe, mesh, local=None, base=0):
    return pipe(mesh, local, PROMPTS, generator=_gens(base), num_inference_steps=2).images


@pytest.mark.parametrize("name", GENERATORS)
def test_each_generator_is_deterministic_finite_and_of_the_requested_shape(pipes, name):
    mesh, local = _mesh()
    a, b = _run(pipes[name], mesh, local), _run(pipes[name], mesh, local)
    assert a.shape == (2, 3, 32, 32) and torch.isfinite(a).all() and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, _run(pipes[name], mesh, local, base=10))


def _train_like(guidance, seed=1):
    """Non-zero zero-convolutions (outputs and the mesh encoder's last conv): a ControlNet whose residuals depend
    on the mesh, as a trained one's do."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in guidance.controlnet.named_parameters():
            zero_conv = pname.split(".")[0] in ("controlnet_down_blocks", "controlnet_mid_block")
            if zero_conv or "cond_embedding.conv_out" in pname:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_what_each_baseline_is_conditioned_on(pipes):
    mesh, local = _mesh()
    other, other_local = _mesh(seed=5)
    sd = pipes["sd"]
    assert sd.pipe.guidance is None
    assert torch.equal(_run(sd, mesh, local), _run(sd, other, other_local))  # text only
    t2i = pipes["t2i-adapter"]
    assert not torch.equal(_run(t2i, mesh), _run(t2i, other))  # the adapter sees the global mesh
    assert torch.equal(_run(t2i, mesh, local), _run(t2i, mesh, other_local))  # ... and never a local one
    controlnet = build_baseline("controlnet", CFG)
    _train_like(controlnet.pipe.guidance)
    assert not torch.equal(_run(controlnet, mesh), _run(controlnet, other))
    assert torch.equal(_run(controlnet, mesh, local), _run(controlnet, mesh, other_local))
    with pytest.raises(ValueError, match="tas_steps"):
        controlnet(mesh, None, PROMPTS, num_inference_steps=2, tas_steps=1)


def test_controlnet_baseline_is_the_global_branch_of_attentionhand(pipes):
    """Same components and seeds: the ControlNet baseline equals AttentionHand sampled without local meshes."""
    mesh, _ = _mesh()
    ours = pipes["attentionhand"]
    assert isinstance(ours, AttentionHandPipeline)
    assert torch.equal(_run(pipes["controlnet"], mesh), _run(ours, mesh, None))


def test_controlnet_baseline_without_its_own_weights_refuses_in_one_line(tmp_path):
    """An SD folder's guidance/ is AttentionHand's own module: the ControlNet baseline must not borrow it."""
    sd_folder = tmp_path / "sd"
    save_components(build_components(CFG), sd_folder)
    with pytest.raises(ValueError, match="needs weights trained for it: pass guidance_path") as err:
        build_baseline("controlnet", dataclasses.replace(CFG, sd_path=str(sd_folder)))
    assert "\n" not in str(err.value)


def test_t2i_adapter_features_enter_the_unet_down_blocks():
    components = build_components(CFG)
    adapter = tiny_t2i_adapter(components.unet, seed=0)
    features = adapter(torch.rand(2, 3, 32, 32))
    assert [tuple(f.shape) for f in features] == [(2, 4, 4, 4), (2, 8, 2, 2)]  # one per UNet level
    wrapped = AdapterUNet(components.unet, adapter)
    assert wrapped.config is components.unet.config and wrapped.dtype == components.unet.dtype
    x, t, text = torch.randn(4, 4, 4, 4), torch.tensor(10), torch.randn(4, 77, 8)
    with torch.no_grad():
        plain = wrapped(x, t, encoder_hidden_states=text, return_dict=False)[0]
        wrapped.features = features
        guided = wrapped(x, t, encoder_hidden_states=text, return_dict=False)[0]  # 4 rows = 2 x 2 (CFG)
        direct = components.unet(x, t, encoder_hidden_states=text, return_dict=False,
                                 down_intrablock_additional_residuals=[f.repeat(2, 1, 1, 1) for f in features])[0]
    assert torch.equal(guided, direct) and not torch.equal(plain, guided)


def test_t2i_adapter_weights_from_a_folder_and_clear_errors(tmp_path):
    components = build_components(CFG)
    adapter = tiny_t2i_adapter(components.unet, seed=7)
    adapter.save_pretrained(tmp_path / "adapter")
    pipe = build_baseline("t2i-adapter", dataclasses.replace(CFG, guidance_path=str(tmp_path / "adapter")))
    loaded = pipe.adapter.state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in adapter.state_dict().items())
    sd_folder = save_components(components, tmp_path / "sd")  # an SD-layout folder without adapter weights
    with pytest.raises(ValueError, match="needs adapter weights"):
        build_baseline("t2i-adapter", dataclasses.replace(CFG, sd_path=str(sd_folder)))
    with pytest.raises(ValueError, match="not a diffusers T2IAdapter folder"):
        build_baseline("t2i-adapter", dataclasses.replace(CFG, guidance_path=str(tmp_path / "sd" / "guidance")))


def test_unknown_generator_names_fail_listing_the_known_ones():
    with pytest.raises(ValueError, match="unknown generator 'uni-controlnet'; known: attentionhand, sd, "
                                         "controlnet, t2i-adapter"):
        build_baseline("uni-controlnet", CFG)
