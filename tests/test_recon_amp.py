"""recon.train's speed options on the CPU: mixed precision (bf16; fp16 with a GradScaler), channels-last, and
exact resume with them; a bad train.amp is refused in one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recon import train as recon_train
from tests.recon_helpers import run_args, write_tiny_synthlab

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def synthlab_root(tmp_path_factory) -> Path:
    return write_tiny_synthlab(tmp_path_factory.mktemp("synthlab_amp"))


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(sorted((out / "checkpoints").glob("step_*.safetensors"))[-1]))


def test_fp16_with_channels_last_resumes_exactly_and_keeps_the_loss_scale(synthlab_root, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    common = ["--epochs", "2", "eval.at_end=false", "train.ckpt_every=100", "train.amp=fp16", "train.channels_last=true"]
    assert recon_train.main(run_args(synthlab_root, full, "--max-steps", "4", *common)) == 0
    assert recon_train.main(run_args(synthlab_root, split, "--max-steps", "2", *common)) == 0
    state = torch.load(split / "checkpoints" / "step_000002.state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0  # the GradScaler's state travels with the optimizer's
    assert recon_train.main(["--resume", "--out", str(split), "--max-steps", "4"]) == 0
    expected, resumed = _weights(full), _weights(split)
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name


def test_bf16_trains_logs_images_and_evaluates_in_full_precision(synthlab_root, tmp_path):
    out = tmp_path / "bf16"
    args = run_args(synthlab_root, out, "--max-steps", "2", "train.amp=bf16", "train.image_every=1")
    result = recon_train.train(recon_train.parse_args(args))
    assert result["step"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    mpvpe = [v["MPVPE"] for v in metrics.values() if isinstance(v, dict) and "MPVPE" in v]
    assert len(mpvpe) == 2 and all(0 < m < 1e4 for m in mpvpe)  # test-lab, test-wild; mm
    weights = _weights(out)
    assert all(t.dtype == torch.float32 for t in weights.values() if t.is_floating_point())  # fp32 master weights


def test_autocast_leaves_the_mano_mesh_in_full_precision():
    from hands.mano import HandModel

    model = HandModel()
    pose, shape = torch.zeros(1, 48), torch.zeros(1, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model("right", pose, shape)
    assert out.verts.dtype == torch.float32
    torch.testing.assert_close(out.verts, model("right", pose, shape).verts, rtol=0, atol=0)


def test_a_bad_amp_mode_is_one_line(synthlab_root, tmp_path, capsys):
    assert recon_train.main(run_args(synthlab_root, tmp_path / "bad", "--max-steps", "1", "train.amp=fp8")) == 2
    error = capsys.readouterr().err.strip()
    assert error == "recon.train: error: train.amp='fp8': expected one of off, bf16, fp16, auto"


def test_the_log_says_when_the_forward_pass_runs_under_autocast(synthlab_root, tmp_path, capsys):
    def start_line(*extra: str) -> str:
        args = run_args(synthlab_root, tmp_path / "_".join(extra or ("fp32",)), "--max-steps", "1", "eval.at_end=false", *extra)
        assert recon_train.main(args) == 0
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("training ")]
        assert len(lines) == 1, lines
        return lines[0]

    assert start_line("train.amp=bf16").endswith("per process; forward pass under bfloat16 autocast (train.amp=bf16)")
    assert start_line().endswith("per process")  # train.amp=off, the default: nothing said
    assert start_line("train.amp=auto").endswith("per process")  # auto on the CPU: full precision, nothing said
