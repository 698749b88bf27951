"""recon.train with generated samples in every batch: online, sync and offline mixing end to end (tiny)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixing import pregenerate
from recon import train as recon_train
from tests.recon_helpers import GEN, run_args, torchrun_two_processes, write_tiny_synthlab

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def synthlab_root(tmp_path_factory) -> Path:
    return write_tiny_synthlab(tmp_path_factory.mktemp("synthlab_mix"))


@pytest.mark.parametrize("mode", ["online", "sync"])
def test_every_step_takes_round_rB_generated_samples_and_reports_statistics(synthlab_root, tmp_path, mode):
    out = tmp_path / mode
    args = run_args(synthlab_root, out, "--synthetic-ratio", "0.5", "--max-steps", "3", "--mix-mode", mode, *GEN)
    result = recon_train.train(recon_train.parse_args(args))
    stats = result["mixing"]
    assert stats["taken"] == 3 * 2  # batch 4, r = 0.5: two generated samples in each of 3 steps
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mixing"]["taken"] == 6
    assert {"synthlab-test-lab", "synthlab-test-wild"} <= metrics.keys()
    if mode == "online":
        assert 0.0 <= stats["fresh_fraction"] <= 1.0 and stats["produced"] >= 2
        assert "trainer_stall_s" in stats and stats["generator_busy_s"] > 0
    config = (out / "config.yaml").read_text()
    assert f"mode: {mode}" in config and "synthetic_ratio: 0.5" in config


def test_offline_mixing_reads_pregenerated_shards(synthlab_root, tmp_path):
    shards = tmp_path / "shards"
    assert pregenerate.main(["--n", "4", "--shard-size", "2", "--out", str(shards), "--data-root", str(synthlab_root),
                             "--size", "32", "--steps", "1", "--device", "cpu"]) == 0
    out = tmp_path / "offline"
    args = run_args(synthlab_root, out, "--synthetic-ratio", "0.25", "--max-steps", "2", "--mix-mode", "offline",
                    f"mixing.shards={shards}")
    result = recon_train.train(recon_train.parse_args(args))
    assert result["mixing"]["taken"] == 2  # batch 4, r = 0.25: one generated sample per step


def test_a_failing_generator_stops_training_with_its_cause(synthlab_root, tmp_path, monkeypatch):
    from mixing import source as mixing_source
    from mixing.pool import ProducerError

    def broken(self, n, *, call=None):
        raise OSError("generator weights unreadable")

    monkeypatch.setattr(mixing_source.SyntheticSource, "generate", broken)
    args = run_args(synthlab_root, tmp_path / "broken", "--synthetic-ratio", "0.5", "--max-steps", "2", *GEN)
    with pytest.raises(ProducerError, match="generator weights unreadable") as info:
        recon_train.train(recon_train.parse_args(args))
    assert isinstance(info.value.__cause__, OSError)


def test_torchrun_each_rank_generates_and_mixes_its_own_share(synthlab_root, tmp_path):
    out = tmp_path / "ddp_mix"
    argv = run_args(synthlab_root, out, "--max-steps", "2", "--batch-size", "4", "--synthetic-ratio", "0.5",
                    "--mix-mode", "sync", *GEN)
    result = torchrun_two_processes(argv, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    mixing = json.loads((out / "metrics.json").read_text())["mixing"]
    assert [rank["taken"] for rank in mixing["ranks"]] == [4, 4]  # 2 steps x 2 generated samples, on each rank


def test_ctrl_c_leaves_a_checkpoint_that_resume_continues(synthlab_root, tmp_path, monkeypatch):
    from mixing import mixer as mixing_mixer

    real_iter = mixing_mixer.Mixer.__iter__

    def interrupted(self):
        for k, batch in enumerate(real_iter(self)):
            if k == 2:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(mixing_mixer.Mixer, "__iter__", interrupted)
    out = tmp_path / "ctrl_c"
    args = run_args(synthlab_root, out, "--synthetic-ratio", "0.5", "--max-steps", "3", "--mix-mode", "sync", *GEN)
    with pytest.raises(KeyboardInterrupt):
        recon_train.train(recon_train.parse_args(args))
    meta = json.loads(sorted((out / "checkpoints").glob("step_*.json"))[-1].read_text())
    assert meta["step"] == 2
    monkeypatch.setattr(mixing_mixer.Mixer, "__iter__", real_iter)
    result = recon_train.train(recon_train.parse_args([*args, "--resume"]))
    assert result["step"] == 3


def test_sync_mixing_repeats_bit_for_bit_under_the_same_seed(synthlab_root, tmp_path):
    """`mixing.mode=sync` (table2's `--mix-mode sync`) repeats bit for bit: two runs with the same seed end with
    identical weights. At this size online mixing happens to repeat as well, so this does not show that online
    differs (shown on 20-step InterWild runs, docs/reproduce-table2.md)."""
    from safetensors.torch import load_file

    weights = []
    for name in ("first", "second"):
        out = tmp_path / name
        args = run_args(synthlab_root, out, "--synthetic-ratio", "0.5", "--max-steps", "3", "--mix-mode", "sync", *GEN)
        recon_train.train(recon_train.parse_args(args))
        weights.append(load_file(sorted((out / "checkpoints").glob("step_*.safetensors"))[-1]))
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert weights[0][key].equal(weights[1][key]), key


def test_synthetic_batch_add_keeps_the_real_batch_of_r0_and_puts_the_generated_on_top(
    synthlab_root, tmp_path, monkeypatch, capsys
):
    """--synthetic-batch add: --batch-size counts the real samples; each step gets the same real samples as the r = 0
    run of that batch and seed, and the generated ones on top (batch 4 at r = 0.5: 4 real + 4 generated); the
    checkpoint's card says so. share (the default) at the same flags takes half of the 4."""
    from mixing import mixer as mixing_mixer

    steps, current = {}, [None]
    real_iter = mixing_mixer.Mixer.__iter__

    def recording(self):
        for batch in real_iter(self):
            steps.setdefault(current[0], []).append(
                ([m["id"] for m in batch.meta if not m.get("is_synthetic")], sum(bool(m.get("is_synthetic")) for m in batch.meta))
            )
            yield batch

    monkeypatch.setattr(mixing_mixer.Mixer, "__iter__", recording)
    common = ("--max-steps", "3", "--mix-mode", "sync", "eval.at_end=false", *GEN)
    runs = {"r0": ("--synthetic-ratio", "0"), "add": ("--synthetic-ratio", "0.5", "--synthetic-batch", "add"),
            "share": ("--synthetic-ratio", "0.5")}
    for name, flags in runs.items():
        current[0] = name
        recon_train.train(recon_train.parse_args(run_args(synthlab_root, tmp_path / name, *flags, *common)))
    assert [len(real) for real, _ in steps["r0"]] == [4, 4, 4] and [n for _, n in steps["r0"]] == [0, 0, 0]
    assert all(isinstance(i, str) and i for real, _ in steps["r0"] for i in real)
    assert [real for real, _ in steps["add"]] == [real for real, _ in steps["r0"]]  # the same real images a step
    assert [n for _, n in steps["add"]] == [4, 4, 4]
    assert [(len(real), n) for real, n in steps["share"]] == [(2, 2)] * 3
    assert "3 steps, batch 8 (4 real + 4 generated on top)" in capsys.readouterr().out
    card = json.loads(sorted((tmp_path / "add" / "checkpoints").glob("step_*.json"))[-1].read_text())["card"]
    assert card["mix"]["synthetic_batch"] == "add"
    assert (card["mix"]["real_per_batch"], card["mix"]["generated_per_batch"]) == (4, 4)
    assert "synthetic_batch: add" in (tmp_path / "add" / "config.yaml").read_text()
