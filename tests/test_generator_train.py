"""generator.train: only phi_g learns, the loss falls on a fixed batch, checkpoints resume exactly and load as the
generator's guidance_path. Tiny generator (4/8 channels, 32 px), a 4-image synthlab."""
from __future__ import annotations

import json

import pytest
import torch

from generator.model import build_components, load_config
from generator.train import (FramedDataset, GuidanceTrainer, TrainConfig, load_checkpoint, main, make_train_batch,
                             parse_args, save_checkpoint, step_generator, train)

from tests.generator_helpers import tiny_generator_env


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """(hand model, synthlab root, tiny generator YAML) with the cache in a temporary folder."""
    base = tmp_path_factory.mktemp("gen_train")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTENTIONHAND_CACHE", str(base / "cache"))
        yield tiny_generator_env(base)


@pytest.fixture(scope="module")
def batch(env):
    from hands.datasets import build_dataset

    model, root, _ = env
    data = FramedDataset(build_dataset("synthlab", root, "train-wild", hand_model=model), 32)
    return make_train_batch([data[0], data[1]], model.faces_for("right"), model.faces_for("left"))


def test_batch_holds_framed_rgb_mesh_and_local_crops(batch):
    assert batch.rgb.shape == batch.mesh.shape == batch.rgb_local.shape == batch.mesh_local.shape == (2, 3, 32, 32)
    for images in (batch.rgb, batch.mesh, batch.rgb_local, batch.mesh_local):
        assert images.min() >= 0 and images.max() <= 1
    drawn = batch.mesh.amax(1) > 0  # the hands are rendered inside the window, framed with a margin
    assert drawn.flatten(1).any(1).all() and not drawn[:, 0, :].any() and not drawn[:, -1, :].any()
    assert (batch.mesh_local.amax(1) > 0).flatten(1).float().mean(1).min() > (drawn.flatten(1).float().mean(1)).min()
    assert all(isinstance(p, str) and p for p in batch.prompts)


def _frozen(components):
    return {f"{name}.{k}": v.clone() for name in ("unet", "vae", "text_encoder")
            for k, v in getattr(components, name).state_dict().items()}


def test_step_changes_only_the_guidance_and_lowers_the_loss(env, batch):
    _, _, config = env
    components = build_components(load_config(config))
    frozen = _frozen(components)
    guidance_before = {k: v.clone() for k, v in components.guidance.state_dict().items()}
    trainer = GuidanceTrainer(components, lr=3e-3, tas_updates=1, attention_downsample=2)
    losses = [float(trainer.step(batch, step_generator(0, 0, "cpu")).total) for _ in range(3)]
    after = _frozen(components)
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)  # UNet, VAE, text encoder untouched
    changed = [k for k, v in components.guidance.state_dict().items() if not torch.equal(v, guidance_before[k])]
    assert changed and any(k.startswith("controlnet.controlnet_down_blocks") for k in changed)
    assert all(p.grad is None for m in (components.unet, components.vae, components.text_encoder)
               for p in m.parameters())
    assert losses[-1] < losses[0], losses  # same batch, same noise: the loss falls


def test_tas_updates_change_the_noisy_latents_the_loss_sees(env, batch):
    _, _, config = env
    components = build_components(load_config(config))
    with_tas = GuidanceTrainer(components, tas_updates=1, attention_downsample=2)
    without = GuidanceTrainer(components, tas_updates=0, attention_downsample=2)
    _, a = with_tas.loss(batch, step_generator(0, 3, "cpu"))
    _, b = without.loss(batch, step_generator(0, 3, "cpu"))
    assert float(a.tas) > 0 and float(b.tas) == 0
    assert not torch.isclose(a.total, b.total)


def test_resume_continues_exactly_and_checkpoint_loads_as_guidance_path(env, tmp_path):
    from safetensors.torch import load_file

    model, root, config = env
    common = ["--data-root", str(root), "--generator-config", str(config), "--size", "32", "--batch-size", "2",
              "--lr", "1e-3", "--sample-steps", "1", "--sample-every", "0", "--no-progress", "--device", "cpu",
              "--seed", "5", "--tas-updates", "0"]
    straight = train(parse_args(common + ["--out", str(tmp_path / "a"), "--steps", "2"]), hand_model=model)
    first = train(parse_args(common + ["--out", str(tmp_path / "b"), "--steps", "1"]), hand_model=model)
    resumed = train(parse_args(common + ["--out", str(tmp_path / "b"), "--steps", "2", "--resume",
                                         str(tmp_path / "b")]), hand_model=model)
    assert straight["step"] == resumed["step"] == 2 and first["step"] == 1
    a, b = load_file(tmp_path / "a" / "guidance.safetensors"), load_file(tmp_path / "b" / "guidance.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert abs(straight["loss"] - resumed["loss"]) < 1e-6
    state = json.loads((tmp_path / "b" / "checkpoints" / "step_0000002" / "state.json").read_text())
    assert state["step"] == 2 and state["config"]["size"] == 32
    assert (tmp_path / "a" / "samples" / "step_0000002.png").is_file()
    assert list((tmp_path / "a" / "tb").glob("events.out.tfevents.*"))
    # the trained weights are what the generator loads through guidance_path (as mixing does)
    loaded = build_components(load_config(config, [f"guidance_path={tmp_path / 'a' / 'guidance.safetensors'}"]))
    weights = loaded.guidance.controlnet.state_dict()
    assert all(torch.equal(weights[k], a[k]) for k in a)
    fresh = build_components(load_config(config)).guidance.controlnet.state_dict()
    assert any(not torch.equal(fresh[k], a[k]) for k in a)


def test_checkpoint_round_trip_restores_weights_and_optimizer(env, batch, tmp_path):
    _, _, config = env
    components = build_components(load_config(config))
    trainer = GuidanceTrainer(components, lr=1e-3, tas_updates=0, attention_downsample=2)
    trainer.step(batch, step_generator(0, 0, "cpu"))
    folder = save_checkpoint(tmp_path, trainer, step=1, config={"x": 1})
    assert sorted(p.name for p in folder.iterdir()) == ["guidance.safetensors", "optimizer.pt", "state.json"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp left
    other = GuidanceTrainer(build_components(load_config(config)), lr=1e-3, tas_updates=0, attention_downsample=2)
    assert load_checkpoint(tmp_path, other) == 1
    for k, v in components.guidance.state_dict().items():
        assert torch.equal(v, other.components.guidance.state_dict()[k])
    exp_a = trainer.optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(exp_a, other.optimizer.state_dict()["state"][0]["exp_avg"])


def test_cli_flags_and_bad_resume(env, tmp_path):
    cfg = parse_args(["--steps", "7", "--tas-updates", "3", "--set", "seed=1", "--set", "sampling.eta=0.5"])
    assert isinstance(cfg, TrainConfig) and cfg.steps == 7 and cfg.tas_updates == 3
    assert cfg.overrides == ["seed=1", "sampling.eta=0.5"] and cfg.lr == 1e-5 and cfg.dataset == "synthlab"
    assert parse_args(["--config", "train-sd15"]).tas_updates == 50
    with pytest.raises(FileNotFoundError, match="--resume"):
        load_checkpoint(tmp_path, GuidanceTrainer(build_components(load_config(env[2])), attention_downsample=2))
    with pytest.raises(SystemExit):
        main(["--no-such-flag"])


def test_from_scratch_trains_vae_then_base_resumes_across_phases_and_exports_a_loadable_model(env, tmp_path):
    """--train-modules all --vae-steps N: the VAE phase changes only the VAE and sets the latent scaling factor;
    the diffusion phase changes UNet, text encoder and phi_g, not the VAE; a run stopped at the phase boundary or
    inside the second phase and resumed ends bit-identical to an uninterrupted one; <out>/model loads as sd_path."""
    from safetensors.torch import load_file

    model, root, config = env
    common = ["--data-root", str(root), "--generator-config", str(config), "--size", "32", "--batch-size", "2",
              "--lr", "1e-3", "--vae-lr", "1e-2", "--sample-steps", "1", "--sample-every", "0", "--no-progress",
              "--device", "cpu", "--seed", "3", "--tas-updates", "1", "--train-modules", "all", "--vae-steps", "2",
              "--caption-dropout", "0.5", "--checkpoint-every", "1", "--keep-checkpoints", "9"]
    straight = train(parse_args(common + ["--out", str(tmp_path / "a"), "--steps", "2"]), hand_model=model)
    assert straight["step"] == 4 and straight["model_path"] == str(tmp_path / "a" / "model")
    ckpt = tmp_path / "a" / "checkpoints"
    fresh = build_components(load_config(config))
    after_vae = load_file(ckpt / "step_0000002" / "base.safetensors")
    final = load_file(ckpt / "step_0000004" / "base.safetensors")
    for name, module in (("unet", fresh.unet), ("text_encoder", fresh.text_encoder), ("vae", fresh.vae)):
        init = module.state_dict()
        changed_in_vae = any(not torch.equal(after_vae[f"{name}.{k}"], v) for k, v in init.items())
        changed_later = any(not torch.equal(final[f"{name}.{k}"], after_vae[f"{name}.{k}"]) for k in init)
        assert changed_in_vae == (name == "vae") and changed_later == (name != "vae"), name
    assert json.loads((ckpt / "step_0000002" / "state.json").read_text())["phase"] == "vae"
    assert json.loads((ckpt / "step_0000003" / "state.json").read_text())["phase"] == "diffusion"

    for split in (0, 1):  # stop at the phase boundary (diffusion steps 0), or one step into the diffusion phase
        out = tmp_path / f"b{split}"
        train(parse_args(common + ["--out", str(out), "--steps", str(split)]), hand_model=model)
        resumed = train(parse_args(common + ["--out", str(out), "--steps", "2", "--resume", str(out)]),
                        hand_model=model)
        assert resumed["step"] == 4 and abs(resumed["loss"] - straight["loss"]) < 1e-6
        other = load_file(out / "checkpoints" / "step_0000004" / "base.safetensors")
        assert all(torch.equal(final[k], other[k]) for k in final)

    loaded = build_components(load_config(None, [f"sd_path={straight['model_path']}"]))
    factor = loaded.vae.config.scaling_factor
    assert factor != pytest.approx(0.18215) and factor > 0
    assert all(torch.equal(v, final[f"unet.{k}"]) for k, v in loaded.unet.state_dict().items())
    guidance = load_file(tmp_path / "a" / "guidance.safetensors")
    assert all(torch.equal(v, guidance[k]) for k, v in loaded.guidance.controlnet.state_dict().items())
    assert (tmp_path / "a" / "samples" / "step_0000002.png").is_file()  # the VAE phase's reconstructions
    from generator.model import is_project_generator

    assert is_project_generator(straight["model_path"])  # marked as ours: cards do not call it Stable Diffusion
    with pytest.raises(ValueError, match="trained with --vae-steps 2, resumed with --vae-steps 1"):
        train(parse_args([*common[:-8], "--vae-steps", "1", "--checkpoint-every", "1", "--out", str(tmp_path / "a"),
                          "--steps", "3", "--resume", str(tmp_path / "a")]), hand_model=model)


def test_from_scratch_flags_are_checked(env, tmp_path):
    model, root, config = env
    base = ["--data-root", str(root), "--generator-config", str(config), "--size", "32", "--out", str(tmp_path),
            "--no-progress", "--device", "cpu"]
    with pytest.raises(ValueError, match="--vae-steps.*--train-modules all"):
        train(parse_args(base + ["--vae-steps", "2"]), hand_model=model)
    with pytest.raises(ValueError, match="--caption-dropout"):
        train(parse_args(base + ["--train-modules", "all", "--caption-dropout", "1.0", "--steps", "1"]),
              hand_model=model)
    with pytest.raises(ValueError, match="--size 30 must be a multiple"):
        train(parse_args(base[:4] + ["--size", "30", "--out", str(tmp_path), "--no-progress"]), hand_model=model)
    assert parse_args(["--config", "train-tiny"]).train_modules == "all"


def test_tas_targets_on_a_hand_made_case():
    """epsilon: the shifted latent against the drawn noise; residual: the noise the shifted latent holds, guarded
    (rows whose shift term is too large train as without TAS, and are counted)."""
    from generator.train import tas_training_target

    x0 = torch.tensor([1.0, -2.0, 0.5, 0.0]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    eps = torch.tensor([0.3, 0.1, -0.4, 1.0]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    alphas = torch.tensor([0.64, 0.64]).view(2, 1, 1, 1)  # sqrt 0.8, sqrt(1 - abar) 0.6
    x_t = 0.8 * x0 + 0.6 * eps
    delta = torch.zeros_like(x0)
    delta[0] = 0.06  # shift term 0.06 / 0.6 = 0.1 (kept); row 1: 1.2 / 0.6 = 2 (guarded at 1)
    delta[1] = 1.2
    x_hat = x_t + delta
    inp, target, guarded = tas_training_target("epsilon", x_hat, x_t, x0, eps, alphas)
    assert torch.equal(inp, x_hat) and torch.equal(target, eps) and int(guarded) == 0
    inp, target, guarded = tas_training_target("residual", x_hat, x_t, x0, eps, alphas, residual_max=1.0)
    torch.testing.assert_close(target[0], eps[0] + 0.1)
    torch.testing.assert_close(target[0], (x_hat[0] - 0.8 * x0[0]) / 0.6)  # the paper's residual noise
    assert torch.equal(inp[0], x_hat[0]) and torch.equal(inp[1], x_t[1]) and torch.equal(target[1], eps[1])
    assert int(guarded) == 1
    with pytest.raises(ValueError, match="epsilon, residual"):
        tas_training_target("x0", x_hat, x_t, x0, eps, alphas)


def test_epsilon_target_moves_the_x0_prediction_along_the_tas_shift(env, batch):
    """First order: a denoiser that meets its target at the shifted latent x_hat = x_t + delta predicts
    x0_hat = (x_hat - sqrt(1 - abar) eps_hat) / sqrt(abar). With the epsilon target that is x0 + delta / sqrt(abar):
    the TAS shift (a real one, from apply_tas on the tiny generator) reaches the denoised image; with the residual
    target it is x0: the shift is undone."""
    from generator.tagging import hand_token_indices
    from generator.text_attention import AttentionStore, apply_tas, cross_attention_layers, recording
    from generator.train import tas_training_target

    _, _, config = env
    c = build_components(load_config(config))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 4, 4, generator=g)
    eps = torch.randn(2, 4, 4, 4, generator=g)
    t = torch.tensor([400, 400])
    x_t = c.scheduler.add_noise(x0, eps, t)
    text = c.encode_prompts(batch.prompts, "cpu")
    tokens = [hand_token_indices(p, c.tokenizer) for p in batch.prompts]
    assert all(tokens)
    store = AttentionStore(cross_attention_layers(c.unet, (4, 4), (2, 2)), (2, 2))
    with recording(c.unet, store):
        x_hat, _ = apply_tas(c.unet, store, x_t, t, text, tokens, [2000.0])
    delta = x_hat - x_t
    assert delta.abs().amax() > 0
    abar = c.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    for kind, expected in (("epsilon", x0 + delta / abar.sqrt()), ("residual", x0)):
        inp, target, _ = tas_training_target(kind, x_hat, x_t, x0, eps, abar, residual_max=float("inf"))
        x0_hat = (inp - (1 - abar).sqrt() * target) / abar.sqrt()
        torch.testing.assert_close(x0_hat, expected, atol=1e-5, rtol=1e-5)
    moved = (x0 + delta / abar.sqrt() - x0).flatten()
    assert torch.nn.functional.cosine_similarity(moved, delta.flatten(), dim=0) > 0.999


def test_trainer_takes_the_target_and_the_mesh_dropout(env, batch):
    _, _, config = env
    components = build_components(load_config(config))
    totals = {}
    for kind in ("epsilon", "residual"):
        for updates in (0, 1):
            trainer = GuidanceTrainer(components, tas_updates=updates, attention_downsample=2, tas_target=kind,
                                      tas_residual_max=float("inf"))
            totals[kind, updates] = trainer.loss(batch, step_generator(0, 3, "cpu"))[1]
    assert torch.equal(totals["epsilon", 0].total, totals["residual", 0].total)  # no TAS: both are eps
    assert not torch.equal(totals["epsilon", 1].total, totals["residual", 1].total)
    dropped = GuidanceTrainer(components, tas_updates=0, attention_downsample=2, mesh_dropout=0.99)
    assert not torch.equal(dropped.loss(batch, step_generator(0, 3, "cpu"))[1].total, totals["epsilon", 0].total)
    with pytest.raises(ValueError, match="--tas-target"):
        GuidanceTrainer(components, tas_target="x0")
    with pytest.raises(ValueError, match="--mesh-dropout"):
        GuidanceTrainer(components, mesh_dropout=1.0)


def test_attention_grounding_loss_on_a_hand_made_case():
    from generator.train import attention_grounding_loss

    maps = torch.full((1, 2, 2, 77), 1 / 77)
    maps[0, 0, 0, 3] = 0.3  # token 3 puts 0.3 / (0.3 + 3 / 77) of its map on cell (0, 0)
    coverage = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # the silhouette covers cell (0, 0) only
    selected = torch.zeros(1, 75, dtype=torch.bool)
    selected[0, 3 - 1] = True  # position 3 (positions 1..75 map to 0..74)
    share = 0.3 / (0.3 + 3 / 77)
    assert attention_grounding_loss(maps, selected, coverage).item() == pytest.approx((1 - share) ** 2, rel=1e-5)
    selected[0, 5 - 1] = True  # a flat token: share 1/4
    expected = ((1 - share) ** 2 + 0.75 ** 2) / 2
    assert attention_grounding_loss(maps, selected, coverage).item() == pytest.approx(expected, rel=1e-5)
    assert attention_grounding_loss(maps, torch.zeros(1, 75, dtype=torch.bool), coverage).item() == 0.0


def test_attention_loss_is_off_by_default_and_trains_the_cross_attention(env, batch):
    _, _, config = env
    components = build_components(load_config(config))
    plain = GuidanceTrainer(components, tas_updates=0, attention_downsample=2, train_modules="all")
    losses = plain.loss(batch, step_generator(0, 3, "cpu"))[1]
    assert losses.attention is None
    grounded = GuidanceTrainer(components, tas_updates=0, attention_downsample=2, train_modules="all",
                               attention_loss=0.5)
    total, parts = grounded.loss(batch, step_generator(0, 3, "cpu"))
    assert 0 < float(parts.attention) <= 1
    assert float(parts.total) == pytest.approx(float(losses.total) + 0.5 * float(parts.attention), rel=1e-5)
    total.backward()  # the auxiliary term reaches the UNet's cross-attention keys and the text encoder
    key = next(p for n, p in components.unet.named_parameters() if "attn2.to_k" in n)
    assert key.grad is not None and key.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="--attention-loss"):
        GuidanceTrainer(components, attention_loss=-1.0)
