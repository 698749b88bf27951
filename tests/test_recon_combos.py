"""Configuration combinations that pass the type checks but cannot train: refused in one line naming the flag
or file, before anything is built or written; and a ratio that rounds to no generated sample is a warning."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from recon import test as recon_test
from recon import train as recon_train
from tests.recon_helpers import GEN, run_args, write_tiny_synthlab

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py



@pytest.fixture(scope="module")
def synthlab_root(tmp_path_factory) -> Path:
    return write_tiny_synthlab(tmp_path_factory.mktemp("synthlab_combos"))


def _empty_sd(folder: Path) -> Path:
    for name in ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                 "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")
    return folder


COMBOS = {
    "ratio_leaves_no_real": (["--synthetic-ratio", "0.99"],
                             "--synthetic-ratio 0.99 with --batch-size 4: round(r * B) = 4 generated samples leave no real"),
    "batch_one": (["--synthetic-ratio", "0.6", "--batch-size", "1"], "--synthetic-ratio 0.6 with --batch-size 1"),
    "capacity": (["--synthetic-ratio", "0.5", *GEN, "mixing.capacity=1"],
                 "mixing.capacity=1: smaller than the 2 generated samples each batch takes"),
    "size": (["--synthetic-ratio", "0.5", *GEN, "mixing.size=40"],
             "mixing.size=40: generator tiny-synthlab needs a multiple of 16 px"),
    "generator_config": (["--synthetic-ratio", "0.5", *GEN, "mixing.generator_config=nope"],
                         "mixing.generator_config=nope: generator config not found: nope"),
    "sd_empty_files": (["--synthetic-ratio", "0.5", *GEN, "mixing.generator_config=sd15", "--sd-path", "{sd}"],
                       "empty files model_index.json"),
    "max_test_samples": (["data.max_test_samples=0"], "data.max_test_samples=0: expected a positive number"),
}


@pytest.mark.parametrize("name", sorted(COMBOS))
def test_a_combination_that_cannot_train_is_refused_before_anything_is_written(name, synthlab_root, tmp_path, capsys):
    extra, message = COMBOS[name]
    sd = _empty_sd(tmp_path / "sd")
    extra = [part.replace("{sd}", str(sd)) for part in extra]
    out = tmp_path / "run"
    assert recon_train.main(run_args(synthlab_root, out, "--max-steps", "1", *extra)) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("recon.train: error: ") and message in error and "\n" not in error, error
    assert not out.exists()


def test_a_ratio_rounding_to_no_generated_sample_warns_and_the_card_names_no_generator(synthlab_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert recon_train.main(run_args(synthlab_root, out, "--max-steps", "1", "--synthetic-ratio", "0.1",
                                     "eval.at_end=false", *GEN)) == 0
    assert "round(r * B) = 0, so no batch gets a generated sample" in capsys.readouterr().err
    card = json.loads((out / "checkpoints" / "step_000001.json").read_text())["card"]
    assert card["generator"] is None and card["mix"]["mode"] is None and card["mix"]["synthetic_ratio"] == 0.1


@pytest.mark.parametrize("value", ['"fast"', "true", "[1]", '{"mm": 3}'])
def test_recon_test_compare_with_a_non_numeric_metric_is_one_line(synthlab_root, tmp_path, capsys, value):
    other = tmp_path / "other.json"
    other.write_text('{"synthlab-test-wild": {"MPVPE": %s}}' % value)
    assert recon_test.main(["--ckpt", str(tmp_path / "nowhere"), "--compare", str(other)]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (f"recon.test: error: --compare {other}: synthlab-test-wild.MPVPE is {json.loads(value)!r}; "
                     "expected a number (mm)")
