"""recon.config: layering, strictness (unknown keys, wrong types name the key), model-section checks."""
from __future__ import annotations

from typing import Optional

import pytest
from omegaconf import OmegaConf

from recon.config import ConfigError, from_config, from_dict, load_config, to_dict


def test_layers_profile_arch_file_flags_overrides(tmp_path):
    demo = load_config()
    assert demo.profile == "demo" and demo.arch == "baseline" and demo.model.backbone == "resnet18"
    paper = load_config(profile="paper")
    assert paper.model.backbone == "resnet50"  # configs/recon/baseline.paper.yaml
    assert paper.train.batch_size == 32 and list(paper.optim.lr_decay_epochs) == [4]
    extra = tmp_path / "mine.yaml"
    extra.write_text("train:\n  epochs: 9\n  batch_size: 5\n")
    cfg = load_config(config_file=str(extra), flags={"train.batch_size": 7}, overrides=["optim.lr=3e-4", "model.hidden_dim=64"])
    assert cfg.train.epochs == 9  # from the file
    assert cfg.train.batch_size == 7  # the flag beats the file
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.model.hidden_dim == 64
    # a checkpoint's config round-trips through JSON-able dicts
    assert OmegaConf.to_container(from_dict(to_dict(cfg))) == OmegaConf.to_container(cfg)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(overrides=["train.lrr=1"]), r"^config \(key=value overrides\): unknown key 'train.lrr'$"),
        (dict(overrides=["optim.lr=fast"]), r"bad value for 'optim.lr'"),
        (dict(overrides=["train.epochs=1.5"]), r"bad value for 'train.epochs'"),
        (dict(overrides=["epochs"]), r"override 'epochs': expected key=value"),
        (
            dict(overrides=["optim.lr=3e-4", "model.backbone_kwargs={channels:[32,64]}"]),
            r"^override 'model.backbone_kwargs=\{channels:\[32,64\]\}': its value is not YAML .*with a space$",
        ),
        (dict(overrides=["data.image_size=[64,64"]), r"^override 'data.image_size=\[64,64': its value is not YAML \([^;]*\)$"),
        (dict(profile="huge"), r"--profile huge: expected one of demo, paper"),
        (dict(config_file="/nonexistent/x.yaml"), r"no such file"),
    ],
)
def test_bad_keys_and_values_fail_naming_the_key(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(**kwargs)
    assert "\n" not in str(info.value)


def test_bad_key_in_a_config_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  image_sise: [64, 64]\n")
    with pytest.raises(ConfigError, match=r"--config .*bad.yaml\): unknown key 'data.image_sise'"):
        load_config(config_file=str(bad))


def test_a_weights_path_in_a_config_file_is_read_from_that_files_folder(tmp_path, monkeypatch):
    """train.backbone_weights written relative in a --config FILE names a file beside FILE, whatever the working
    directory (the shipped IntagHand config finds the shipped encoder from anywhere); given by a flag or an
    override it is the working directory's; absolute paths, null and ??? stay as written."""
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "mine.yaml").write_text("train:\n  backbone_weights: weights/enc.safetensors\n")
    monkeypatch.chdir(tmp_path)  # the file lies under the working directory: recorded relative to it
    assert load_config(config_file="configs/mine.yaml").train.backbone_weights == "configs/weights/enc.safetensors"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # it does not: recorded absolute
    cfg = load_config(config_file=str(folder / "mine.yaml"))
    assert cfg.train.backbone_weights == str((folder / "weights" / "enc.safetensors").resolve())
    assert load_config(config_file=str(folder / "mine.yaml"), flags={"train.backbone_weights": "a.pt"}).train.backbone_weights == "a.pt"
    assert load_config(config_file=str(folder / "mine.yaml"), overrides=["train.backbone_weights=b.pt"]).train.backbone_weights == "b.pt"
    assert load_config(overrides=["train.backbone_weights=c.pt"]).train.backbone_weights == "c.pt"
    (folder / "abs.yaml").write_text(f"train:\n  backbone_weights: {tmp_path / 'x.pt'}\n")
    assert load_config(config_file=str(folder / "abs.yaml")).train.backbone_weights == str(tmp_path / "x.pt")
    (folder / "none.yaml").write_text("train:\n  backbone_weights: null\n")
    assert load_config(config_file=str(folder / "none.yaml")).train.backbone_weights is None
    (folder / "must.yaml").write_text("train:\n  backbone_weights: ???\n")
    with pytest.raises(ConfigError, match="train.backbone_weights is required"):
        load_config(config_file=str(folder / "must.yaml"))
    assert load_config(config_file=str(folder / "must.yaml"), flags={"train.backbone_weights": "d.pt"}).train.backbone_weights == "d.pt"


class _Model:
    def __init__(self, *, width: int = 8, name: str = "x", mano_dir: Optional[str] = None, scale: float = 1.0):
        pass


def test_from_config_checks_the_model_section_against_the_constructor():
    cfg = load_config(arch="_model", overrides=["model.width=16", "mano_dir=/some/mano"])  # no _model.yaml
    kwargs = from_config(cfg, _Model)
    assert kwargs == {"width": 16, "name": "x", "mano_dir": "/some/mano", "scale": 1.0}
    with pytest.raises(ConfigError, match=r"unknown key 'model.depth' for regressor '_model'; it takes: width, name, mano_dir, scale"):
        from_config(load_config(arch="_model", overrides=["model.depth=3"]), _Model)
    with pytest.raises(ConfigError, match=r"bad value for 'model.width'"):
        from_config(load_config(arch="_model", overrides=["model.width=wide"]), _Model)


def test_the_word_off_is_a_mode_not_a_boolean(tmp_path):
    """YAML reads a bare ``off`` as false; ``train.amp`` and ``mixing.compile`` take "off" as a value, as the docs
    write it: an override, a config file and a resumed run's config all give "off"."""
    cfg = load_config(overrides=["train.amp=off", "mixing.compile=off"])
    assert cfg.train.amp == "off" and cfg.mixing.compile == "off"
    (tmp_path / "run.yaml").write_text("train:\n  amp: off\nmixing:\n  compile: off\n")
    cfg = load_config(config_file=str(tmp_path / "run.yaml"), overrides=["train.amp=bf16"])
    assert cfg.train.amp == "bf16" and cfg.mixing.compile == "off"
    resumed = load_config(base=cfg, overrides=["train.amp=off"])
    assert resumed.train.amp == "off" and resumed.mixing.compile == "off"
    assert load_config(overrides=["train.channels_last=off"]).train.channels_last is False  # a real boolean stays one


# The most steps a demo profile may run: about 15 minutes of training at one thread on an idle 2-core machine, at
# the step costs measured (InterWild's demo 0.6 s; the baseline's half-width ResNet-18 at batch 16 0.43 s).
DEMO_STEP_CAP = {"baseline": 2000}


@pytest.mark.parametrize("arch", ["interwild", "baseline"])
def test_demo_runs_are_sized_in_steps(arch):
    # synthlab has 5,000 train-lab images: an epoch-sized demo would run thousands of steps (issue 25)
    demo = load_config(profile="demo", arch=arch)
    assert demo.train.max_steps is not None and demo.train.max_steps <= DEMO_STEP_CAP.get(arch, 1200)
    assert list(demo.optim.lr_decay_epochs) == [] and list(demo.optim.lr_decay_steps) == []  # measured at constant lr
    assert load_config(profile="paper", arch=arch).train.max_steps is None  # the paper profile stays epoch-sized


@pytest.mark.parametrize("arch", ["baseline", "interwild", "intaghand", "dir", "ihmr", "intershape"])
def test_every_demo_profile_is_sized_for_the_default_synthlab(arch):
    """`python -m recon.train --arch A` on the embedded default: a demo sized in epochs of the 256-image synthlab
    it was measured on must not grow 20-fold with synthlab's 5,000 train-lab images (issue 25)."""
    from hands.datasets.synthlab import DEFAULT_SIZES
    from recon.registry import load_builtin_regressors

    load_builtin_regressors()
    cfg = load_config(profile="demo", arch=arch)
    assert list(cfg.data.train) == ["synthlab"]
    train_lab = DEFAULT_SIZES["train-lab"]
    samples = min(cfg.data.max_train_samples or train_lab, train_lab)
    steps = cfg.train.epochs * (samples // cfg.train.batch_size)
    if cfg.train.max_steps is not None:
        steps = min(steps, cfg.train.max_steps)
    assert steps <= DEMO_STEP_CAP.get(arch, 1200), f"{arch}: {steps} demo steps"


def test_the_baselines_demo_is_a_half_width_resnet18_scored_with_averaged_weights():
    """The baseline's demo profile: the 15-minute recipe measured on the studio synthlab (half-width ResNet-18,
    the mean of the last 3 checkpoints), and the paper profile keeps the full width and its final weights."""
    from recon.archs.baseline import BaselineRegressor

    demo = load_config(profile="demo", arch="baseline")
    assert list(demo.model.backbone_kwargs.channels) == [32, 64, 128, 256] and demo.train.average_last == 3
    assert demo.train.max_steps % demo.train.ckpt_every == 0  # the averaged checkpoints are the scheduled ones
    model = BaselineRegressor(**from_config(demo, BaselineRegressor))
    assert sum(p.numel() for p in model.backbone.parameters()) < 0.3 * 11.2e6  # ResNet-18's trunk: 11.2 M
    paper = load_config(profile="paper", arch="baseline")
    assert "backbone_kwargs" not in paper.model and paper.train.average_last == 1
