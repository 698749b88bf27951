"""The baselines and ablations of paper Tables 1 / 4 and Fig. 10 trained by generator.train (issue 18): each trains
from the same tiny base, writes its own weights, and the sampler of its row loads them (images differ from
AttentionHand's); L_LB and the ablations' TAS settings on hand-made cases. Tiny generator (4/8 channels, 32 px)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from generator.text_attention import (TasSchedule, load_balancing_loss_batch, tas_loss_batch, tas_loss_function,
                                      token_mask)

from tests.generator_helpers import TINY_YAML_2_STEPS, tiny_generator_env


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every trained row of generator.table1, 1 step each from the same tiny base: {name: weights path}."""
    base = tmp_path_factory.mktemp("variants")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTENTIONHAND_CACHE", str(base / "cache"))
        from generator.table1 import DEFAULT_GENERATORS, train_variants
        from generator.train import TrainConfig
        model, root, config = tiny_generator_env(base, yaml=TINY_YAML_2_STEPS)
        cfg = TrainConfig(data_root=str(root), generator_config=str(config), steps=1, batch_size=2, size=32,
                          sample_every=0, checkpoint_every=1, progress=False, lr=1e-2,
                          default_prompt="a photo of two hands")
        logs = []
        paths = train_variants(DEFAULT_GENERATORS, cfg, base / "runs", hand_model=model, log=logs.append)
        again = []
        train_variants(DEFAULT_GENERATORS, cfg, base / "runs", hand_model=model, log=again.append)
        yield config, paths, base / "runs", logs, again, cfg, model


def test_every_row_trains_once_and_a_finished_run_is_skipped(trained):
    _, paths, runs, logs, again, _, _ = trained
    assert set(paths) == {"controlnet", "t2i-adapter", "attentionhand-no-tas", "attentionhand", "no-local",
                          "separate-weights", "no-gaussian", "l-lb", "constant-step"}
    assert all(p.exists() for p in paths.values())
    assert (paths["t2i-adapter"] / "config.json").is_file()  # a diffusers T2IAdapter folder
    assert (runs / "separate-weights" / "guidance_local.safetensors").is_file()
    assert sum("training" in m for m in logs) == 9 and all("skipped" in m for m in again)


def test_each_trained_row_loads_its_own_weights_and_draws_other_images(trained):
    from generator.model import load_config
    from generator.table1 import build_generator

    config, paths, *_ = trained
    gen_cfg = load_config(config)
    mesh = torch.zeros(1, 3, 32, 32)
    mesh[:, :, 8:24, 10:22] = 0.8

    def draw(name):
        pipe = build_generator(name, gen_cfg, paths.get(name))
        return pipe(mesh, None, ["a photo of two hands"], generator=torch.Generator().manual_seed(0),
                    guidance_scale=1.0).images

    images = {name: draw(name) for name in ["attentionhand", "controlnet", "t2i-adapter", "no-local", "l-lb"]}
    for name in ("controlnet", "t2i-adapter", "no-local", "l-lb"):
        assert (images[name] - images["attentionhand"]).abs().max() > 1e-4, name
    # the controlnet row loaded the weights trained for it, not AttentionHand's or a fresh copy
    from safetensors.torch import load_file

    pipe = build_generator("controlnet", gen_cfg, paths["controlnet"])
    state = load_file(str(paths["controlnet"]))
    key = next(k for k in state if "zero_convs" in k or "controlnet_down_blocks" in k)
    assert torch.equal(pipe.pipe.guidance.controlnet.state_dict()[key], state[key])
    assert state[key].abs().max() > 0  # trained away from the zero convolution


def test_variants_resume_and_refuse_a_changed_kind(trained, tmp_path):
    from generator.train import train

    _, _, runs, _, _, cfg, model = trained
    longer = dataclasses.replace(cfg, **{"guidance": "t2i-adapter", "local_branch": False, "tas_updates": 0},
                                 out=str(runs / "t2i-adapter"), resume=str(runs / "t2i-adapter"), steps=2,
                                 fresh_guidance=True)
    assert train(longer, hand_model=model)["step"] == 2
    wrong = dataclasses.replace(cfg, out=str(runs / "t2i-adapter"), resume=str(runs / "t2i-adapter"), steps=3)
    with pytest.raises(ValueError, match="--guidance"):
        train(wrong, hand_model=model)
    with pytest.raises(ValueError, match="trained with --tas-loss tas, resumed with --tas-loss lb"):
        train(dataclasses.replace(longer, tas_loss="lb", steps=3), hand_model=model)
    with pytest.raises(ValueError, match="--separate-weights"):
        train(dataclasses.replace(cfg, separate_weights=True, local_branch=False, out=str(tmp_path / "x")),
              hand_model=model)


def test_load_balancing_loss_is_switchs_and_minimal_when_balanced():
    # 2x2 map, hand token at position 1 (column 0 of 75), the rest spread elsewhere
    attention = torch.full((2, 2, 2, 77), -10.0)
    attention[0, 0, :, 1] = 10.0  # sample 0: the hand token wins half of the positions (balanced 2 experts)
    attention[0, 1, :, 5] = 10.0
    attention[1, :, :, 5] = 10.0  # sample 1: the rest wins everywhere (all load on one expert)
    mask = token_mask([[1], [1]])
    loss = load_balancing_loss_batch(attention / 100.0 * 100.0, mask)
    # f = (0.5, 0.5), P ~ (0.5, 0.5): 2 * 0.5 = 1; f = (0, 1), P ~ (0, 1): 2 * 1 = 2
    assert loss[0].item() == pytest.approx(1.0, abs=1e-3) and loss[1].item() == pytest.approx(2.0, abs=1e-3)
    assert load_balancing_loss_batch(attention, token_mask([[], [1]]))[0] == 0  # no hand token: 0
    with pytest.raises(ValueError, match="TAS loss"):
        tas_loss_function("kl")


def test_gaussian_filter_ablation_and_constant_schedule():
    torch.manual_seed(0)
    attention = torch.randn(1, 4, 4, 77)
    mask = token_mask([[2]])
    smooth = tas_loss_batch(attention, mask)
    raw = tas_loss_function("tas", smoothing=False)(attention, mask)
    probs = torch.softmax(attention[..., 1:76] * 100.0, -1)
    assert raw.item() == pytest.approx(1 - probs[..., 1].max().item(), abs=1e-6)  # the plain peak
    assert smooth.item() >= raw.item() - 1e-6  # smoothing lowers the peak
    assert TasSchedule(kind="constant").step_sizes(3) == [20.0, 20.0, 20.0]
    assert TasSchedule(kind="reference").step_sizes(2)[1] == pytest.approx(20 * 0.5 ** 0.5)
