"""recon.table2: paired deltas and spreads over seeds, the planned commands, skipping finished runs, the
report files, clear failures, and one tiny end-to-end table (baseline, 1 seed, 2 steps, tiny synthlab)."""
from __future__ import annotations

import json
import math
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from recon import table2
from tests.recon_helpers import TINY, write_tiny_synthlab

# The random-initialised tiny generator (whatever the default generator is), 32 px, 2 sampling steps.
GEN = ["mixing.generator_config=tiny", "mixing.size=32", "mixing.num_inference_steps=2", "mixing.chunk=4",
       "mixing.capacity=8"]
TESTS = ("synthlab-test-lab", "synthlab-test-wild")


@pytest.fixture(scope="module")
def synthlab_root(tmp_path_factory) -> Path:
    return write_tiny_synthlab(tmp_path_factory.mktemp("synthlab_table2"))


def _argv(synthlab_root: Path, tmp_path: Path, *extra: str) -> list[str]:
    """A table on the tiny synthlab with the tiny regressor and generator (results in tmp_path)."""
    return [
        "--arch", "baseline", "--data-root", str(synthlab_root), "--datasets", "synthlab",
        "--test-datasets", "synthlab:test-lab,synthlab:test-wild", "--batch-size", "4", "--device", "cpu",
        "--out", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results"), "--mean-pose-samples", "0",
        "--prediction-figure", "0", *TINY, *GEN, *extra,
    ]


def _metrics(mpvpe_lab: float, mpvpe_wild: float) -> dict:
    return {
        "synthlab-test-lab": {"MPVPE": mpvpe_lab, "RRVE": mpvpe_lab + 10, "MRRPE": math.nan, "count_MPVPE": 6},
        "synthlab-test-wild": {"MPVPE": mpvpe_wild, "RRVE": mpvpe_wild + 10, "MRRPE": 50.0, "count_MPVPE": 6},
        "mixing": {"taken": 3},
    }


def _fake_finished_runs(argv: list[str], metrics: dict) -> list[table2.RunSpec]:
    """Run folders as recon.train leaves them (config.yaml of the run's config, metrics.json), no training."""
    runs = table2.plan(table2.parse_args(argv))[0]
    for run in runs:
        key = (run.control, run.seed) if (run.control, run.seed) in metrics else (run.ratio, run.seed)
        _fake_finished_run(run, metrics[key])
    return runs


def _fake_finished_run(run: table2.RunSpec, metrics: dict) -> None:
    run.folder.mkdir(parents=True)
    (run.folder / "config.yaml").write_text(OmegaConf.to_yaml(table2.resolve_run_config(run)))
    (run.folder / "metrics.json").write_text(json.dumps(metrics))


def _no_training(monkeypatch):
    """Starting a recon.train process fails the test (other processes, e.g. git, still run)."""
    real_popen = subprocess.Popen

    def guarded(command, *args, **kwargs):
        if table2.TRAIN_MODULE in list(command):
            raise AssertionError(f"a run was started: {command}")
        return real_popen(command, *args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", guarded)


def test_summary_gives_means_sample_stds_and_deltas_paired_by_seed():
    wild = {(0.0, 0): 10.0, (0.0, 1): 12.0, (0.0, 2): 14.0, (0.3, 0): 9.0, (0.3, 1): 12.0, (0.3, 2): 12.0}
    results = {key: {"wild": {"MPVPE": value}, "lab": {"MPVPE": 20.0 + key[1]}} for key, value in wild.items()}
    summary = table2.summarize(results, ratios=[0.0, 0.3], seeds=[0, 1, 2], test_sets=["lab", "wild"],
                               metrics=["MPVPE"])
    assert summary["mean"]["0"]["wild"]["MPVPE"] == 12.0 and summary["std"]["0"]["wild"]["MPVPE"] == 2.0
    assert summary["mean"]["0.3"]["wild"]["MPVPE"] == 11.0
    assert summary["std"]["0.3"]["wild"]["MPVPE"] == pytest.approx(math.sqrt(3.0), abs=1e-12)  # sample std (n - 1)
    assert {s: d["wild"]["MPVPE"] for s, d in summary["deltas"]["0.3"].items()} == {"0": -1.0, "1": 0.0, "2": -2.0}
    assert summary["delta_mean"]["0.3"]["wild"]["MPVPE"] == -1.0 and summary["delta_std"]["0.3"]["wild"]["MPVPE"] == 1.0
    # the same seeds on both sides: the lab deltas are exactly 0 with no spread, although each ratio has one
    assert summary["delta_mean"]["0.3"]["lab"]["MPVPE"] == 0.0 and summary["delta_std"]["0.3"]["lab"]["MPVPE"] == 0.0
    assert summary["std"]["0"]["lab"]["MPVPE"] == 1.0
    assert "0" not in summary["deltas"]  # the reference has no delta

    one = table2.summarize({(0.0, 5): {"t": {"M": 1.0}}, (0.5, 5): {"t": {"M": 4.0}}}, ratios=[0.0, 0.5], seeds=[5],
                           test_sets=["t"], metrics=["M"])
    assert one["delta_mean"]["0.5"]["t"]["M"] == 3.0 and math.isnan(one["delta_std"]["0.5"]["t"]["M"])  # one seed


def test_a_note_says_when_the_runs_of_a_seed_trained_different_numbers_of_steps():
    runs = [{"ratio": 0.0, "seed": 0, "steps": 320}, {"ratio": 0.3, "seed": 0, "steps": 320},
            {"ratio": 0.0, "seed": 1, "steps": None}, {"ratio": 0.3, "seed": 1, "steps": 320}]
    assert table2.steps_note(runs) is None  # equal, or unknown
    runs[1]["steps"] = 420  # batch 8: 8 real samples per step at r = 0, 6 at r = 0.3
    note = table2.steps_note(runs)
    assert "seed 0: r=0: 320, r=0.3: 420" in note and "--schedule steps" in note


def test_dry_run_prints_one_command_per_ratio_and_seed_with_the_same_flags(synthlab_root, tmp_path, capsys):
    argv = _argv(synthlab_root, tmp_path, "--seeds", "2", "--max-steps", "7", "--dry-run", "optim.lr=1e-3")
    assert table2.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    commands = [shlex.split(line) for line in lines]
    seen = set()
    for command in commands:
        assert command[1:3] == ["-m", "recon.train"]
        flags = dict(zip(command[3::2], command[4::2]))  # every token after -m recon.train is "--flag value" or K=V
        ratio, seed = float(flags["--synthetic-ratio"]), int(flags["--seed"])
        seen.add((ratio, seed))
        assert flags["--out"] == str(tmp_path / "runs" / f"baseline_r{ratio:g}_s{seed}")
        assert flags["--max-steps"] == "7" and flags["--batch-size"] == "4" and flags["--device"] == "cpu"
        # overrides passed through, then the equal-steps schedule (--max-steps 7 given: the reference's steps)
        assert command[-len(TINY) - len(GEN) - 4:-2] == [*TINY, *GEN, "optim.lr=1e-3", "optim.lr_decay_epochs=[]"]
        assert command[-2].startswith("optim.lr_decay_steps=[") and command[-1].startswith("train.epoch_steps=")
        # only the ratio, the seed and the folder (the values of tokens 6, 8, 10) differ between the runs
        assert command[5:11:2] == ["--synthetic-ratio", "--seed", "--out"]
        assert [t for i, t in enumerate(command) if i not in (6, 8, 10)] == [
            t for i, t in enumerate(commands[0]) if i not in (6, 8, 10)]
    assert seen == {(0.0, 0), (0.3, 0), (0.0, 1), (0.3, 1)}
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()  # nothing written


def test_five_seeds_by_default_as_the_help_says():
    args = table2.parse_args(["--arch", "interwild"])
    assert table2._parse_seeds(args) == [0, 1, 2, 3, 4]


def test_equal_steps_give_every_run_the_reference_steps_and_learning_rate_drops(synthlab_root, tmp_path, capsys):
    """--schedule steps (default): the reference run's epochs x its steps per epoch, and its epoch milestones
    as step milestones, for every ratio; --schedule epochs passes the flags as they are."""
    from hands.datasets import build_dataset

    n = len(build_dataset("synthlab", synthlab_root, "train-lab"))
    argv = _argv(synthlab_root, tmp_path, "--seeds", "1", "--ratios", "0,0.5", "--epochs", "3", "--dry-run",
                 "optim.lr_decay_epochs=[2]", "optim.lr_decay_steps=[]")  # baseline.demo.yaml's own step drop off
    assert table2.main(argv) == 0
    per_epoch = n // 4
    for line in capsys.readouterr().out.strip().splitlines():
        command = shlex.split(line)
        flags = dict(zip(command[3::2], command[4::2]))
        assert flags["--max-steps"] == str(3 * per_epoch) and flags["--epochs"] == "3"
        # and the reference's epoch clock for every other epoch-counted schedule (warm-up, set_epoch)
        assert command[-3:] == ["optim.lr_decay_epochs=[]", f"optim.lr_decay_steps=[{2 * per_epoch}]",
                                f"train.epoch_steps={per_epoch}"]
    assert table2.main([*argv, "--schedule", "epochs"]) == 0
    for line in capsys.readouterr().out.strip().splitlines():
        command = shlex.split(line)
        assert "--max-steps" not in command and command[-2:] == ["optim.lr_decay_epochs=[2]", "optim.lr_decay_steps=[]"]
        assert not any(part.startswith("train.epoch_steps") for part in command)


def test_lr_drops_at_step_milestones():
    from omegaconf import OmegaConf

    from recon.train import lr_at

    cfg = OmegaConf.create({"optim": {"lr": 1.0, "lr_decay_gamma": 0.1, "lr_decay_epochs": [3],
                                      "lr_decay_steps": [10, 20]}})
    assert [lr_at(cfg, 0, s) for s in (0, 9, 10, 19, 20)] == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01])
    assert lr_at(cfg, 3, 20) == pytest.approx(0.001)


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--ratios", "0,1.2"], "--ratios"),
        (["--ratios", "0,-0.1"], "--ratios"),
        (["--ratios", "0.3"], "--ratios"),
        (["--ratios", "0,0"], "--ratios"),
        (["--seeds", "0"], "--seeds"),
        (["--seed-list", "0,x"], "--seed-list"),
        (["--seeds", "2", "--seed-list", "0,1"], "--seed-list"),
        (["--jobs", "0"], "--jobs"),
        (["--max-steps", "0"], "--max-steps"),
        (["seed=4"], "seed=4"),
        (["train.synthetic_ratio=0.5"], "train.synthetic_ratio"),
        (["no.such_key=1"], "no"),
        (["--arch", "nope"], "--arch nope"),
    ],
)
def test_bad_flags_fail_in_one_line_naming_the_flag(synthlab_root, tmp_path, capsys, extra, flag):
    assert table2.main(_argv(synthlab_root, tmp_path, "--dry-run", *extra)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    error = captured.err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("recon.table2: error:") and flag in error, error


def test_finished_runs_are_skipped_and_the_report_has_every_field(synthlab_root, tmp_path, capsys, monkeypatch):
    argv = _argv(synthlab_root, tmp_path, "--seed-list", "3,4", "--max-steps", "2", "--figure-samples", "0")
    metrics = {(0.0, 3): _metrics(100.0, 120.0), (0.3, 3): _metrics(99.0, 116.0),
               (0.0, 4): _metrics(102.0, 122.0), (0.3, 4): _metrics(100.0, 120.0)}
    runs = _fake_finished_runs(argv, metrics)
    _no_training(monkeypatch)
    assert table2.main(argv) == 0
    out = capsys.readouterr().out
    for run in runs:
        assert f"skip {run.name}: finished" in out
    assert "Δ (r=0.3 − r=0)" in out and "-3.00 ± 1.41" in out  # wild MPVPE deltas -4, -2

    report = json.loads((tmp_path / "results" / "mini-table2.json").read_text())
    assert report["arch"] == "baseline" and report["seeds"] == [3, 4] and report["ratios"] == [0.0, 0.3]
    assert report["reference_ratio"] == 0.0 and report["test_sets"] == list(TESTS) and report["unit"] == "mm"
    assert [(r["ratio"], r["seed"], r["status"]) for r in report["runs"]] == [
        (0.0, 3, "skipped"), (0.3, 3, "skipped"), (0.0, 4, "skipped"), (0.3, 4, "skipped")]
    first = report["runs"][0]
    assert first["folder"] == str(runs[0].folder) and first["metrics"]["synthlab-test-wild"]["MPVPE"] == 120.0
    assert first["metrics"]["synthlab-test-lab"]["MRRPE"] is None  # NaN: nothing counted, written as null
    assert set(first) >= {"name", "steps", "train_time_s", "wall_s", "command"}
    assert report["mean"]["0"]["synthlab-test-wild"]["MPVPE"] == 121.0
    assert report["mean"]["0.3"]["synthlab-test-lab"]["RRVE"] == 109.5
    assert report["std"]["0.3"]["synthlab-test-wild"]["MPVPE"] == pytest.approx(math.sqrt(8.0))
    assert report["deltas"]["0.3"] == {
        "3": {"synthlab-test-lab": {"MPVPE": -1.0, "RRVE": -1.0, "MRRPE": None},
              "synthlab-test-wild": {"MPVPE": -4.0, "RRVE": -4.0, "MRRPE": 0.0}},
        "4": {"synthlab-test-lab": {"MPVPE": -2.0, "RRVE": -2.0, "MRRPE": None},
              "synthlab-test-wild": {"MPVPE": -2.0, "RRVE": -2.0, "MRRPE": 0.0}},
    }
    assert report["delta_wild_mpvpe_mean"] == -3.0
    assert report["delta_wild_mpvpe_std"] == pytest.approx(math.sqrt(2.0))
    assert report["wild_test_set"] == "synthlab-test-wild" and report["delta_wild_ratio"] == "0.3"
    assert report["setup"]["max_steps"] == 2 and report["setup"]["batch_size"] == 4
    assert report["paper"] is None and report["figure"] is None  # synthlab has no paper row
    assert report["command"].startswith("python -m recon.table2 --arch baseline")
    assert "git_commit" in report and report["wall_s"] >= 0
    markdown = (tmp_path / "results" / "mini-table2.md").read_text()
    assert "| baseline (r=0) |" in markdown and "121.00 ± 1.41" in markdown and "## Runs" in markdown
    assert first["weights"] == {} and report["setup"]["weights"] == {"average_last": 1}
    assert "each run scored with its final weights" in markdown


def test_a_table_of_averaged_runs_says_so_and_a_mixed_one_is_refused(synthlab_root, tmp_path, capsys, monkeypatch):
    argv = _argv(synthlab_root, tmp_path, "--seed-list", "3", "--max-steps", "2", "--figure-samples", "0")
    averaged = {"averaged_steps": [1, 2], "checkpoint": "averaged/step_000002.json"}
    metrics = {(0.0, 3): dict(_metrics(100.0, 120.0), weights=averaged),
               (0.3, 3): dict(_metrics(99.0, 116.0), weights=averaged)}
    runs = _fake_finished_runs(argv, metrics)
    _no_training(monkeypatch)
    assert table2.main(argv) == 0
    report = json.loads((tmp_path / "results" / "mini-table2.json").read_text())
    assert [r["weights"] for r in report["runs"]] == [averaged, averaged]
    assert report["setup"]["weights"] == {"average_last": 2}
    assert "mean of the weights of its last 2 checkpoints" in (tmp_path / "results" / "mini-table2.md").read_text()
    capsys.readouterr()
    (runs[1].folder / "metrics.json").write_text(json.dumps(_metrics(99.0, 116.0)))  # this run: final weights
    assert table2.main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the runs' progress bar
    assert error.startswith("recon.table2: error:") and "scored with different weights" in error


def test_the_paper_rows_stand_beside_ours_on_the_paper_test_sets(tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    for name in ("ih26m", "hic", "reih"):
        (data / name).mkdir(parents=True)
    argv = ["--arch", "interwild", "--seeds", "2", "--data-root", str(data), "--datasets", "ih26m",
            "--test-datasets", "hic,reih,ih26m", "--out", str(tmp_path / "runs"), "--figure-samples", "0",
            "--schedule", "epochs", "--mean-pose-samples", "0"]  # the folders are empty: no epoch's steps to count
    values = {name: {"MPVPE": 15.0, "RRVE": 21.0, "MRRPE": 30.0} for name in ("hic", "reih", "ih26m")}
    _fake_finished_runs(argv, {(r, s): values for r in (0.0, 0.3) for s in (0, 1)})
    _no_training(monkeypatch)
    assert table2.main(argv) == 0
    out = capsys.readouterr().out
    assert "| InterWild (paper) | 15.30 | 21.35 | 31.26 |" in out
    assert "| InterWild+AttentionHand (paper) | 14.74 (-0.56) |" in out
    report = json.loads((tmp_path / "runs" / "mini-table2.json").read_text())  # not synthlab: results in --out
    assert set(report["paper"]) == {"InterWild (paper)", "InterWild+AttentionHand (paper)"}
    assert report["method"] == "InterWild" and "delta_wild_mpvpe_mean" not in report  # no test-wild split


def test_a_folder_holding_a_run_of_another_config_is_refused(synthlab_root, tmp_path, capsys):
    argv = _argv(synthlab_root, tmp_path, "--seeds", "1", "--max-steps", "2")
    _fake_finished_runs(argv, {(r, 0): _metrics(1.0, 2.0) for r in (0.0, 0.3)})
    assert table2.main(_argv(synthlab_root, tmp_path, "--seeds", "1", "--max-steps", "3", "--dry-run")) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "baseline_r0_s0 holds a run of another config (train.max_steps: 2 there, 3 now)" in error


def test_augment_kwargs_left_out_in_a_folder_are_the_augmentations_defaults(synthlab_root, tmp_path, capsys):
    """A folder from before data.augment_kwargs (its config.yaml has no such key) holds the same run as a table that
    sets an argument to the augmentation's default (InterWild's rotation sigma 30 degrees), not one that changes it."""
    argv = _argv(synthlab_root, tmp_path, "--seeds", "1", "--max-steps", "2")
    runs = _fake_finished_runs(argv, {(r, 0): _metrics(1.0, 2.0) for r in (0.0, 0.3)})
    for run in runs:  # written as before the key existed
        written = OmegaConf.to_container(OmegaConf.load(run.folder / "config.yaml"))
        assert written["data"].pop("augment_kwargs") == {}
        (run.folder / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(written)))
    capsys.readouterr()
    assert table2.main([*argv, "--dry-run", "data.augment_kwargs.rot_sigma_deg=30"]) == 0
    planned = capsys.readouterr().out.splitlines()
    assert len(planned) == 2 and all(line.startswith("# finished, would be skipped: ") for line in planned)
    assert table2.main([*argv, "--dry-run", "data.augment_kwargs.rot_sigma_deg=10"]) == 2
    error = capsys.readouterr().err.strip()
    assert "holds a run of another config (data.augment_kwargs.rot_sigma_deg: 30.0 there, 10 now)" in error


def test_a_run_trained_elsewhere_without_its_end_evaluation_is_scored_not_trained_again(synthlab_root, tmp_path, capsys):
    """A run trained by hand with the table's command but eval.at_end=false and another train.average_last, its
    folder then moved into the table's --out, is the same training run: the table resumes it at its last step
    with the table's scoring keys and scores it; a key that changes training is still refused."""
    from recon import train as recon_train

    argv = _argv(synthlab_root, tmp_path, "--seeds", "1", "--max-steps", "2", "--figure-samples", "0")
    runs = table2.plan(table2.parse_args(argv))[0]
    reference, mixed = runs
    elsewhere = tmp_path / "elsewhere"
    command = [*reference.command[3:], "eval.at_end=false", "train.average_last=1"]
    command[command.index("--out") + 1] = str(elsewhere)
    assert recon_train.main(command) == 0
    assert not (elsewhere / "metrics.json").exists()
    reference.folder.parent.mkdir(parents=True)
    elsewhere.rename(reference.folder)
    _fake_finished_run(mixed, _metrics(1.0, 2.0))
    capsys.readouterr()

    assert table2.main([*argv, "--dry-run"]) == 0
    planned = [line for line in capsys.readouterr().out.splitlines() if "_r0_s0" in line]
    assert len(planned) == 1 and planned[0].startswith("# would resume: ")
    # every scoring key at the table's value (the resumed config is the checkpoint's); "out" is --out's
    assert " eval.at_end=true " in planned[0] and " train.average_last=3 " in planned[0]
    assert " data.max_test_samples=null " in planned[0] and planned[0].endswith(" --resume auto")

    assert table2.main(argv) == 0
    report = json.loads((tmp_path / "results" / "mini-table2.json").read_text())
    entry = next(run for run in report["runs"] if run["name"] == reference.name)
    assert entry["status"] == "resumed" and entry["steps"] == 2
    metrics = json.loads((reference.folder / "metrics.json").read_text())
    assert metrics["weights"]["step"] == 2 and metrics["weights"]["averaged_steps"] == [2]  # the table's average_last
    assert entry["metrics"]["synthlab-test-lab"]["MPVPE"] == metrics["synthlab-test-lab"]["MPVPE"]
    assert sorted(p.name for p in (reference.folder / "checkpoints").glob("step_*.json")) == ["step_000002.json"]
    assert OmegaConf.load(reference.folder / "config.yaml").out == str(reference.folder)

    # scored on part of the test sets (data.max_test_samples): scored again, the earlier metrics kept aside first
    config = OmegaConf.load(reference.folder / "config.yaml")
    config.data.max_test_samples = 1
    (reference.folder / "config.yaml").write_text(OmegaConf.to_yaml(config))
    (reference.folder / "metrics.json").write_text(json.dumps(dict(metrics, marker="earlier")))
    assert table2.main(argv) == 0
    assert json.loads((reference.folder / "metrics.previous.json").read_text())["marker"] == "earlier"
    again = json.loads((reference.folder / "metrics.json").read_text())
    assert "marker" not in again and again["synthlab-test-lab"] == metrics["synthlab-test-lab"]  # all of it again

    # a folder that pruned checkpoints the table's average needs (kept 3 = max(3, 1 + 1), 1 of them scheduled)
    checkpoints = reference.folder / "checkpoints"
    sidecar = json.loads((checkpoints / "step_000002.json").read_text())
    for step in (3, 4):  # two more checkpoints of the same run, written when it was interrupted
        for suffix in (".safetensors", ".state.pt"):
            (checkpoints / f"step_{step:06d}{suffix}").write_bytes((checkpoints / f"step_000002{suffix}").read_bytes())
        (checkpoints / f"step_{step:06d}.json").write_text(json.dumps(dict(sidecar, step=step, interrupted=True)))
    config.train.average_last = 2
    (reference.folder / "config.yaml").write_text(OmegaConf.to_yaml(config))
    capsys.readouterr()
    assert table2.main([*argv, "--dry-run"]) == 2
    assert "keeps 1 scheduled checkpoint(s) of its run (trained with train.average_last=2" in capsys.readouterr().err

    config.train.average_last, config.data.max_test_samples = 3, None  # the table's again
    (reference.folder / "config.yaml").write_text(OmegaConf.to_yaml(config))

    # scored on part of the test sets and no checkpoint to score again: refused, not taken as finished
    config = OmegaConf.load(mixed.folder / "config.yaml")
    config.data.max_test_samples = 5
    (mixed.folder / "config.yaml").write_text(OmegaConf.to_yaml(config))
    capsys.readouterr()
    assert table2.main([*argv, "--dry-run"]) == 2
    error = capsys.readouterr().err.strip()
    assert "metrics.json was scored under other settings (data.max_test_samples: 5 there" in error
    assert "no checkpoint to score again" in error
    config.data.max_test_samples, config.eval.batch_size = None, config.eval.batch_size + 1
    (mixed.folder / "config.yaml").write_text(OmegaConf.to_yaml(config))
    assert table2.main([*argv, "--dry-run"]) == 0  # another eval batch size alone: the same scores, finished
    assert "# finished, would be skipped: " in capsys.readouterr().out


@pytest.mark.parametrize("extra, refused", [([], False), (["optim.warmup_epochs=1"], True)])
def test_folders_from_before_the_epoch_clock_are_refused_only_where_the_clock_changes_the_run(
        synthlab_root, tmp_path, capsys, extra, refused):
    """A run folder whose config.yaml predates train.epoch_steps is the same run when nothing in its config counts
    epochs (the baseline's step milestones); with a warm-up in epochs the clock moves it, so it is refused."""
    argv = _argv(synthlab_root, tmp_path, "--seeds", "1", "--max-steps", "2", *extra)
    for run in _fake_finished_runs(argv, {(r, 0): _metrics(1.0, 2.0) for r in (0.0, 0.3)}):
        config = OmegaConf.load(run.folder / "config.yaml")
        assert config.train.pop("epoch_steps") > 0  # as the folders written before the key
        (run.folder / "config.yaml").write_text(OmegaConf.to_yaml(config))
    assert table2.main([*argv, "--dry-run"]) == (2 if refused else 0)
    error = capsys.readouterr().err.strip()
    assert ("train.epoch_steps: '<unset>' there" in error) == refused


def test_a_failing_run_stops_the_table_naming_its_folder_and_log(synthlab_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(table2, "TRAIN_MODULE", "recon.no_such_trainer")  # the run's process exits with an error
    assert table2.main(_argv(synthlab_root, tmp_path, "--seeds", "1", "--figure-samples", "0")) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    folder = tmp_path / "runs" / "baseline_r0_s0"
    assert error.startswith(f"recon.table2: error: run {folder} failed (exit 1)")
    assert "No module named recon.no_such_trainer" in error and error.endswith(f"log {folder / 'train.log'}")
    assert not (tmp_path / "results" / "mini-table2.json").exists()


def test_a_tiny_table_end_to_end_and_again_with_every_run_skipped(synthlab_root, tmp_path, capsys):
    from hands.datasets.synthlab import write_synthlab

    # the validation images: train-wild of a synthlab written with another seed
    val_root = write_synthlab(tmp_path / "val", sizes={"train-lab": 0, "test-lab": 0, "train-wild": 3, "test-wild": 0},
                              seed=1, resolution=64, show_progress=False)
    argv = _argv(synthlab_root, tmp_path, "--seeds", "1", "--max-steps", "2", "--jobs", "2", "--val-root", str(val_root),
                 "--prediction-figure", "2", "--mean-pose-samples", "all", "--figure-samples", "2")
    assert table2.main(argv) == 0
    assert capsys.readouterr().out.count("validated ") == 2
    results = tmp_path / "results"
    report = json.loads((results / "mini-table2.json").read_text())
    # the mean-pose predictor's row: recon.meanpose on the reference run's config, beside the table
    from recon.meanpose import mean_pose_errors

    direct = mean_pose_errors(table2.resolve_run_config(table2.plan_runs(table2.parse_args(argv))[0]), kind="mesh")
    for test in TESTS:
        assert report["mean_pose"]["errors"][test]["MPVPE"] == pytest.approx(direct[test]["MPVPE"])
        assert report["mean_pose"]["errors"][test]["count_MPVPE"] == report["test_counts"][test]["count_MPVPE"]
    validation = report["validation"]
    assert validation["key"] == "synthlab-train-wild" and validation["synthlab"]["seed"] == 1
    assert set(validation["runs"]) == {"baseline_r0_s0", "baseline_r0.3_s0"}
    for name, metrics in validation["runs"].items():
        assert metrics["count_MPVPE"] > 0 and math.isfinite(metrics["MPVPE"])
        kept = json.loads((tmp_path / "runs" / name / table2.VAL_METRICS).read_text())
        assert kept["step"] == 2 and kept["metrics"]["MPVPE"] == metrics["MPVPE"]
    delta = validation["runs"]["baseline_r0.3_s0"]["MPVPE"] - validation["runs"]["baseline_r0_s0"]["MPVPE"]
    assert validation["delta_mean"]["0.3"]["synthlab-train-wild"]["MPVPE"] == pytest.approx(delta)
    predictions = report["prediction_figure"]
    assert predictions["runs"] == ["baseline_r0_s0", "baseline_r0.3_s0"] and predictions["samples"] == 2
    assert predictions["test_set"] == "synthlab-test-wild" and predictions["steps"] == [2, 2]
    from PIL import Image

    with Image.open(results / predictions["path"]) as image:  # 2 rows of input | GT | r=0 | r=0.3, 64 px tiles
        assert image.size == (4 * 64 + 5 * 2, 2 * 64 + 3 * 2)
    markdown = (results / "mini-table2.md").read_text()
    assert "## Validation (synthlab-train-wild)" in markdown and "![predictions](mini-table2-predictions.png)" in markdown
    assert "| mean-pose predictor (no image) | " in markdown
    assert (results / "mini-table2.md").read_text().startswith("# Table 2 (baseline)")
    for run in report["runs"]:
        assert run["status"] == "trained" and run["steps"] == 2
        assert (Path(run["folder"]) / "train.log").is_file()
        for test in TESTS:
            assert math.isfinite(run["metrics"][test]["MPVPE"]) and math.isfinite(run["metrics"][test]["RRVE"])
    assert {run["ratio"] for run in report["runs"]} == {0.0, 0.3}
    assert math.isfinite(report["delta_wild_mpvpe_mean"]) and report["delta_wild_mpvpe_std"] is None  # one seed
    assert report["steps_note"] is None  # --max-steps 2 < the epochs' steps of both ratios
    assert report["figure"]["samples"] == 2 and len(report["figure"]["prompts"]) == 2
    from PIL import Image

    with Image.open(results / table2.FIGURE_NAME) as image:  # 2 rows of mesh | generated | overlay, 256 px cells
        assert image.size == (3 * table2.FIGURE_TILE + 4 * 2, 2 * table2.FIGURE_TILE + 3 * 2)
    capsys.readouterr()

    # the same command again: both runs are finished (their real config.yaml and metrics.json), none retrains,
    # and their validation scores are read back, not computed again
    assert table2.main(argv[:-1] + ["0"]) == 0
    out = capsys.readouterr().out
    assert out.count(": finished (") == 2 and "validated " not in out
    again = json.loads((results / "mini-table2.json").read_text())
    assert [r["status"] for r in again["runs"]] == ["skipped", "skipped"]
    assert again["mean"] == report["mean"] and again["validation"]["runs"] == validation["runs"]


# ---- paired t-intervals, control rows, validation, predictions (issue 25, point 3) ----------------------------
def test_paired_interval_is_the_t_interval_of_the_hand_computed_numbers():
    # t(0.975, 4) = 2.776 and t(0.975, 9) = 2.262 in every t table
    assert table2.t_quantile(0.975, 4) == pytest.approx(2.7764, abs=1e-4)
    assert table2.t_quantile(0.975, 9) == pytest.approx(2.2622, abs=1e-4)
    interval = table2.paired_interval([-4.0, -2.0, -1.0, -3.0, -5.0])
    # mean -3, sample std sqrt(2.5), half width 2.7764 * sqrt(2.5) / sqrt(5) = 1.9632
    assert interval["n"] == 5 and interval["mean"] == -3.0 and interval["std"] == pytest.approx(math.sqrt(2.5))
    assert interval["half_width"] == pytest.approx(1.9632, abs=1e-4)
    assert (interval["low"], interval["high"]) == (pytest.approx(-4.9632, abs=1e-4), pytest.approx(-1.0368, abs=1e-4))
    assert table2.paired_interval([-4.0, -2.0, -1.0, -3.0, -5.0], 0.9)["half_width"] == pytest.approx(
        2.1318 * math.sqrt(2.5) / math.sqrt(5), abs=1e-4)  # t(0.95, 4) = 2.132
    one = table2.paired_interval([2.0])
    assert one["mean"] == 2.0 and math.isnan(one["low"]) and math.isnan(one["std"])
    assert math.isnan(table2.paired_interval([1.0, math.nan])["mean"])


def _control_argv(synthlab_root, tmp_path, *extra):
    return _argv(synthlab_root, tmp_path, "--seed-list", "0,1", "--max-steps", "2", "--figure-samples", "0",
                 "--controls", "tas_off,mesh_blank", *extra)


def test_control_rows_are_paired_with_the_reference_and_written_with_intervals(synthlab_root, tmp_path, capsys,
                                                                              monkeypatch):
    argv = _control_argv(synthlab_root, tmp_path, "mixing.tas_steps=2")  # the main runs sample with TAS
    runs = table2.plan(table2.parse_args(argv))[0]
    assert [(r.ratio, r.control, r.seed) for r in runs] == [
        (0.0, None, 0), (0.3, None, 0), (0.3, "tas_off", 0), (0.3, "mesh_blank", 0),
        (0.0, None, 1), (0.3, None, 1), (0.3, "tas_off", 1), (0.3, "mesh_blank", 1)]
    assert runs[2].folder.name == "baseline_r0.3_tas_off_s0"
    metrics = {(0.0, 0): _metrics(100.0, 120.0), (0.3, 0): _metrics(99.0, 116.0), ("tas_off", 0): _metrics(101.0, 118.0),
               ("mesh_blank", 0): _metrics(100.0, 121.0), (0.0, 1): _metrics(102.0, 122.0),
               (0.3, 1): _metrics(100.0, 120.0), ("tas_off", 1): _metrics(102.0, 121.0),
               ("mesh_blank", 1): _metrics(103.0, 124.0)}
    _fake_finished_runs(argv, metrics)
    _no_training(monkeypatch)
    assert table2.main(argv) == 0
    report = json.loads((tmp_path / "results" / "mini-table2.json").read_text())
    wild = "synthlab-test-wild"
    # r = 0.3: wild deltas -4, -2 -> mean -3, std sqrt(2), t(0.975, 1) = 12.706: -3 -+ 12.706
    assert report["confidence"] == 0.95
    low, high = report["delta_ci"]["0.3"][wild]["MPVPE"]
    assert (low, high) == (pytest.approx(-3.0 - 12.7062, abs=1e-3), pytest.approx(-3.0 + 12.7062, abs=1e-3))
    assert report["delta_wild_mpvpe_ci"] == [low, high]
    tas_off, blank = report["controls"]["tas_off"], report["controls"]["mesh_blank"]
    assert tas_off["status"] == blank["status"] == "trained" and tas_off["ratio"] == 0.3
    assert tas_off["overrides"] == ["mixing.tas_steps=0"] and blank["overrides"] == ["mixing.mesh_condition=blank"]
    assert {s: d[wild]["MPVPE"] for s, d in tas_off["deltas"].items()} == {"0": -2.0, "1": -1.0}
    assert blank["delta_mean"][wild]["MPVPE"] == 1.5 and blank["mean"][wild]["MPVPE"] == 122.5
    assert blank["delta_ci"][wild]["MPVPE"] == [pytest.approx(1.5 - 12.7062 * 0.5 * math.sqrt(2) / math.sqrt(2), abs=1e-3),
                                                pytest.approx(1.5 + 12.7062 * 0.5, abs=1e-3)]
    # against the main run at the control's ratio (r = 0.3), the contrast a control is for: wild +2, +1 and +5, +4
    assert {s: d[wild]["MPVPE"] for s, d in tas_off["vs_main"]["deltas"].items()} == {"0": 2.0, "1": 1.0}
    assert blank["vs_main"]["delta_mean"][wild]["MPVPE"] == 4.5
    assert [r["control"] for r in report["runs"]] == [None, None, "tas_off", "mesh_blank"] * 2
    assert report["test_counts"] == {"synthlab-test-lab": {"count_MPVPE": 6}, wild: {"count_MPVPE": 6}}
    assert report["counts_note"] is None and report["mean_pose"] is None and report["validation"] is None
    markdown = (tmp_path / "results" / "mini-table2.md").read_text()
    assert "| baseline+AttentionHand (r=0.3), mesh blanked | 101.50 ± 2.12 |" in markdown
    assert "two-sided 95 % t-interval over 2 seeds" in markdown and "-3.00 [-15.71, +9.71]" in markdown
    assert "| baseline+AttentionHand (r=0.3), TAS off | +0.50 [-5.85, +6.85] |" in markdown
    assert "Each control against the main run at its ratio (r=0.3, same seed)" in markdown
    assert "| baseline+AttentionHand (r=0.3), mesh blanked | +" in markdown.split("Each control against")[1]
    assert "(hands for MPVPE, pairs for RRVE and MRRPE): synthlab-test-lab: MPVPE 6; synthlab-test-wild: MPVPE 6." in markdown


def test_a_tas_off_control_equal_to_the_main_runs_is_not_trained_and_says_so(synthlab_root, tmp_path, capsys):
    # the tiny generator samples without TAS (sampling.tas_steps 0): tas_off would generate as the r = 0.3 runs
    argv = _control_argv(synthlab_root, tmp_path, "--dry-run")
    assert table2.main(argv) == 0
    out = capsys.readouterr().out
    assert "# control tas_off: not trained: its runs would generate exactly as the r=0.3 runs" in out
    assert "tas_off_s0" not in out and "baseline_r0.3_mesh_blank_s0" in out
    # a generator trained without TAS makes it a control: its runs get that generator (any generator folder here)
    generator = Path(table2.__file__).resolve().parents[1] / "generator" / "weights" / "tiny-synthlab"
    assert table2.main(_control_argv(synthlab_root, tmp_path, "--dry-run", "--tas-off-generator", str(generator))) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "baseline_r0.3_tas_off_s0" in line)
    assert "mixing.tas_steps=0" in line and f"mixing.sd_path={generator.resolve()}" in line


def test_controls_of_an_offline_table_are_not_trained_and_say_why(synthlab_root, tmp_path, capsys):
    """Offline mixing reads the same shards in every run: a control's generator settings cannot reach its images,
    so its rows would copy the r = 0.3 rows; the table trains none of them and says why."""
    argv = _control_argv(synthlab_root, tmp_path, "--dry-run", "mixing.tas_steps=2", "mixing.mode=offline",
                         f"mixing.shards={tmp_path / 'shards'}")
    assert table2.main(argv) == 0
    out = capsys.readouterr().out
    for control in ("tas_off", "mesh_blank"):
        assert f"# control {control}: not trained: mixing.mode=offline reads the same pre-generated shards" in out
        assert f"_{control}_s0" not in out


def test_a_time_budget_is_refused_and_folders_from_before_it_hold_the_same_run(synthlab_root, tmp_path, capsys):
    """train.max_minutes makes a run's length depend on the machine: a table (runs of equal steps) refuses it in one
    line; a folder whose config.yaml predates the key had no budget, so it holds the table's run (so does one from
    before train.synthetic_batch, whose batches were share's)."""
    argv = _argv(synthlab_root, tmp_path, "--seeds", "1", "--max-steps", "2")
    assert table2.main([*argv, "--dry-run", "train.max_minutes=5"]) == 2
    error = capsys.readouterr().err.strip()
    assert "train.max_minutes=5.0: a time budget makes a run's length depend on the machine" in error
    assert len(error.splitlines()) == 1
    for run in _fake_finished_runs(argv, {(r, 0): _metrics(1.0, 2.0) for r in (0.0, 0.3)}):
        config = OmegaConf.load(run.folder / "config.yaml")
        assert config.train.pop("max_minutes") is None  # as the folders written before the key
        assert config.train.pop("synthetic_batch") == "share"  # likewise: every sample counted in the batch
        (run.folder / "config.yaml").write_text(OmegaConf.to_yaml(config))
    assert table2.main([*argv, "--dry-run"]) == 0
    planned = capsys.readouterr().out.splitlines()
    assert len(planned) == 2 and all(line.startswith("# finished, would be skipped: ") for line in planned)


def test_a_schedule_restarted_per_epoch_phase_is_refused_on_equal_steps(synthlab_root, tmp_path, capsys):
    argv = _argv(synthlab_root, tmp_path, "--seeds", "1", "--dry-run", "optim.schedule=cosine",
                 "optim.cosine_phases=[1,1]")
    assert table2.main(argv) == 2
    err = capsys.readouterr().err
    assert "optim.cosine_phases=[1, 1]" in err and "--schedule epochs" in err and len(err.strip().splitlines()) == 1
    assert table2.main([*argv, "--schedule", "epochs"]) == 0


def test_the_controls_reach_the_generator(synthlab_root, tmp_path):
    """The control runs' resolved configs, built as recon.train builds its source: tas_off gives the generator
    no TAS step, mesh_blank gives it mesh images without hands (and the labels stay the drawn ones)."""
    from hands.mano import HandModel
    from mixing.build import build_source, generator_config
    from mixing.labels import PriorLabelSource

    runs, configs, _ = table2.plan(table2.parse_args(_control_argv(synthlab_root, tmp_path, "mixing.tas_steps=2")))
    by = {(r.control, r.seed): configs[r.name] for r in runs if r.ratio > 0}
    assert generator_config(by[(None, 0)].mixing).sampling.tas_steps == 2
    assert generator_config(by[("tas_off", 0)].mixing).sampling.tas_steps == 0
    assert table2.generator_tas_steps(by[("mesh_blank", 0)]) == 2  # the blank control keeps everything else

    hand_model = HandModel()
    seen = {}

    class Recorder:
        def __call__(self, mesh_images, local_mesh_images, prompts, *, generator, **kwargs):
            seen.setdefault("mesh", []).append(mesh_images.clone())
            from types import SimpleNamespace

            return SimpleNamespace(images=torch.zeros_like(mesh_images))

    for control in (None, "mesh_blank"):
        cfg = by[(control, 0)]
        source = build_source(cfg.mixing, hand_model=hand_model, labels=PriorLabelSource(hand_model, image_size=64),
                              device="cpu", seed=0)
        source.generator = Recorder()
        batch = source.generate(2, call=0)
        assert bool((batch.right.valid | batch.left.valid).all())  # the labels are the drawn hands either way
    plain, blank = seen["mesh"]
    background = blank[:, :, :1, :1]
    assert torch.equal(blank, background.expand_as(blank))  # nothing drawn: one colour everywhere
    assert not torch.equal(plain, blank)


def test_an_unfinished_control_run_resumes_and_a_finished_one_is_skipped(synthlab_root, tmp_path, capsys):
    argv = _control_argv(synthlab_root, tmp_path, "--seed-list", "0")
    runs, configs, _ = table2.plan(table2.parse_args(argv))
    blank = next(r for r in runs if r.control == "mesh_blank")
    reference = runs[0]
    for run in (blank, reference):
        run.folder.mkdir(parents=True)
        (run.folder / "config.yaml").write_text(OmegaConf.to_yaml(configs[run.name]))
    (blank.folder / "checkpoints").mkdir()
    (blank.folder / "checkpoints" / "step_000001.json").write_text("{}")
    (reference.folder / "metrics.json").write_text(json.dumps(_metrics(1.0, 2.0)))
    assert table2.main(argv + ["--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("# would resume: ") and "baseline_r0.3_mesh_blank_s0" in line
               and line.endswith("--resume auto") for line in lines)
    assert any(line.startswith("# finished, would be skipped: ") and "baseline_r0_s0 " in line for line in lines)


@pytest.mark.parametrize("extra, flag", [
    (["--controls", "nope"], "--controls"), (["--confidence", "1.5"], "--confidence"),
    (["--control-ratio", "0"], "--control-ratio"), (["--val-split", "test-wild"], "--val-split"),
    (["--tas-off-generator", "x", "--controls", "mesh_blank"], "--tas-off-generator"),
    (["--prediction-figure", "-1"], "--prediction-figure"), (["--val-root", "/no/such/dir"], "--val-root"),
])
def test_bad_table_flags_fail_in_one_line(synthlab_root, tmp_path, capsys, extra, flag):
    assert table2.main(_argv(synthlab_root, tmp_path, "--dry-run", *extra)) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and flag in error, error


def test_a_validation_synthlab_with_the_training_seed_is_refused(synthlab_root, tmp_path):
    """--val-root written with the training synthlab's seed holds the training images: refused in one line."""
    from recon.config import load_config

    cfg = load_config(profile="demo", arch="baseline", flags={"data.root": str(synthlab_root)})
    train_seed = json.loads((Path(synthlab_root) / "synthlab.json").read_text())["seed"]
    for seed in (train_seed, train_seed + 1):
        (tmp_path / f"val{seed}").mkdir()
        (tmp_path / f"val{seed}" / "synthlab.json").write_text(json.dumps({"seed": seed}))
    with pytest.raises(table2.UsageError, match=f"written with seed {train_seed}, the training synthlab's seed"):
        table2.check_validation_seed(tmp_path / f"val{train_seed}", cfg)
    table2.check_validation_seed(tmp_path / f"val{train_seed + 1}", cfg)  # another seed: accepted


def test_a_table_says_how_its_runs_were_scored_and_refuses_a_mix():
    from recon.table2 import UsageError, _weights_of_runs, _weights_phrase

    averaged = {"averaged_steps": [1088, 1152, 1200], "checkpoint": "averaged/step_001200.json"}
    assert _weights_of_runs([{"weights": averaged}, {"weights": averaged}]) == {"average_last": 3}
    assert _weights_of_runs([{"weights": {}}, {"weights": {}}]) == {"average_last": 1}
    with pytest.raises(UsageError, match="scored with different weights"):
        _weights_of_runs([{"weights": averaged}, {"weights": {}}])
    assert "mean of the weights of its last 3 checkpoints" in _weights_phrase(3)
    assert _weights_phrase(1) == "each run scored with its final weights"


def _overrides(command) -> dict:
    return dict(part.split("=", 1) for part in command if "=" in part and not part.startswith("-"))


def test_synthetic_batch_add_keeps_the_real_images_per_step_and_says_so(synthlab_root, tmp_path, capsys, monkeypatch):
    """--synthetic-batch add: every run of a ratio r > 0 (controls too, at a control ratio of their own) gets the
    batch whose real part is the reference's, after the table's overrides and before a control's; its folders are
    named apart from a share table's, whose reference runs it shares; the report and the table say which batches ran."""
    from mixing.mixer import split_batch_size

    argv = _argv(synthlab_root, tmp_path, "--seeds", "1", "--ratios", "0,0.3,0.5", "--max-steps", "2",
                 "--figure-samples", "0", "--controls", "mesh_blank", "--control-ratio", "0.25",
                 "--synthetic-batch", "add")
    runs, configs, schedule = table2.plan(table2.parse_args(argv))
    batches = {(run.ratio, run.control): configs[run.name].train.batch_size for run in runs}
    assert batches == {(0.0, None): 4, (0.3, None): 6, (0.5, None): 8, (0.25, "mesh_blank"): 5}
    for run in runs:
        cfg = configs[run.name]
        assert split_batch_size(cfg.train.batch_size, cfg.train.synthetic_ratio)[0] == 4
        assert cfg.train.epoch_steps == schedule["steps_per_epoch"]  # the same epoch clock as before
    assert [run.name for run in runs] == ["baseline_r0_s0", "baseline_r0.3_add_s0", "baseline_r0.5_add_s0",
                                          "baseline_r0.25_add_mesh_blank_s0"]
    mixed = next(run for run in runs if run.ratio == 0.3)
    assert _overrides(mixed.command)["train.batch_size"] == "6"
    assert mixed.command.index("train.batch_size=6") > mixed.command.index("optim.lr_decay_epochs=[]")
    blank = next(run for run in runs if run.control == "mesh_blank")
    assert blank.command[-2:] == ("train.batch_size=5", "mixing.mesh_condition=blank")  # before the control's own
    assert "train.batch_size" not in _overrides(runs[0].command)  # the reference keeps its --batch-size 4
    # share (the default): one batch for every run, and the same reference folder
    share_argv = [a for a in argv if a not in ("--synthetic-batch", "add")]
    share_runs, shared, _ = table2.plan(table2.parse_args(share_argv))
    assert {cfg.train.batch_size for cfg in shared.values()} == {4}
    assert share_runs[0].folder == runs[0].folder and share_runs[1].folder != runs[1].folder
    # the reference's batch from a KEY=VALUE override and a reference ratio above 0: 11 real of batch 16 at r = 0.3
    other = table2.plan(table2.parse_args([*argv, "--ratios", "0.3,0", "--controls", "none", "train.batch_size=16"]))[1]
    assert {cfg.train.synthetic_ratio: cfg.train.batch_size for cfg in other.values()} == {0.3: 16, 0.0: 11}
    # each batch is the one recon.train --synthetic-batch add gives the reference's 4 real images, written whole
    from mixing.mixer import batch_parts

    assert all(sum(batch_parts(4, ratio, "add")) == batch for (ratio, _), batch in batches.items())
    with pytest.raises(table2.UsageError, match="train.synthetic_batch=add .*pass recon.table2 --synthetic-batch add"):
        table2.plan(table2.parse_args([*share_argv, "train.synthetic_batch=add"]))

    metrics = {(0.0, 0): _metrics(10.0, 20.0), (0.3, 0): _metrics(11.0, 18.0), (0.5, 0): _metrics(12.0, 17.0),
               ("mesh_blank", 0): _metrics(11.0, 19.0)}
    _fake_finished_runs(argv, metrics)
    _no_training(monkeypatch)
    assert table2.main(argv) == 0
    report = json.loads((tmp_path / "results" / "mini-table2.json").read_text())
    setup = report["setup"]
    assert setup["synthetic_batch"] == "add" and setup["batch_sizes"] == {"0": 4, "0.25": 5, "0.3": 6, "0.5": 8}
    assert setup["real_per_batch"] == {"0": 4, "0.25": 4, "0.3": 4, "0.5": 4}
    markdown = (tmp_path / "results" / "mini-table2.md").read_text()
    assert ("--synthetic-batch add: the generated images on top of the real ones, batch 4 at r = 0, 5 = 4 real + 1 "
            "generated at r = 0.25, 6 = 4 real + 2 generated at r = 0.3, 8 = 4 real + 4 generated at r = 0.5") in markdown


def test_real_batch_control_trains_the_add_batch_all_real_and_separates_it(synthlab_root, tmp_path, capsys, monkeypatch):
    """--controls real_batch (with --synthetic-batch add): per seed one run at r = 0 with the control ratio's batch
    (6 = 4 real + 2 generated at r = 0.3 -> 6 real), so the table gives what the larger batch alone changes (against
    r = 0) and what the generated images add beyond it (against r = 0.3); refused with share, where it would be the
    reference run itself."""
    argv = _argv(synthlab_root, tmp_path, "--seeds", "2", "--max-steps", "2", "--figure-samples", "0",
                 "--synthetic-batch", "add", "--controls", "real_batch")
    runs, configs, _ = table2.plan(table2.parse_args(argv))
    control = [run for run in runs if run.control == "real_batch"]
    assert [run.name for run in control] == ["baseline_r0.3_add_real_batch_s0", "baseline_r0.3_add_real_batch_s1"]
    cfg = configs[control[0].name]
    assert (cfg.train.synthetic_ratio, cfg.train.batch_size) == (0.0, 6)
    assert control[0].command[-2:] == ("train.batch_size=6", "train.synthetic_ratio=0")
    assert table2.same_as_main(runs, configs) == {}  # generating nothing, it is not the main run's double
    with pytest.raises(table2.UsageError, match="--controls real_batch: only with --synthetic-batch add"):
        table2.parse_args([a for a in argv if a not in ("--synthetic-batch", "add")])

    metrics = {(0.0, 0): _metrics(10.0, 20.0), (0.3, 0): _metrics(11.0, 17.0), ("real_batch", 0): _metrics(9.0, 19.0),
               (0.0, 1): _metrics(12.0, 22.0), (0.3, 1): _metrics(12.0, 18.0), ("real_batch", 1): _metrics(10.0, 21.0)}
    _fake_finished_runs(argv, metrics)
    _no_training(monkeypatch)
    assert table2.main(argv) == 0
    report = json.loads((tmp_path / "results" / "mini-table2.json").read_text())
    entry = report["controls"]["real_batch"]
    assert entry["status"] == "trained" and entry["overrides"] == ["train.synthetic_ratio=0"]
    assert entry["delta_mean"]["synthlab-test-wild"]["MPVPE"] == -1.0  # the larger batch alone: 19 - 20, 21 - 22
    assert entry["vs_main"]["delta_mean"]["synthlab-test-wild"]["MPVPE"] == 2.5  # all real minus generated: +2, +3
    batches = {run["name"]: run["batch"] for run in report["runs"]}
    assert batches["baseline_r0.3_add_real_batch_s0"] == {"size": 6, "real": 6, "generated": 0, "synthetic_ratio": 0.0}
    assert batches["baseline_r0.3_add_s0"] == {"size": 6, "real": 4, "generated": 2, "synthetic_ratio": 0.3}
    assert report["setup"]["real_per_batch"] == {"0": 4, "0.3": 4}  # the control's 6 real do not overwrite r = 0.3's
    markdown = (tmp_path / "results" / "mini-table2.md").read_text()
    assert "| baseline (r=0, all real), the r=0.3 runs' batch | " in markdown
    assert "| baseline_r0.3_add_real_batch_s0 | 0 (r=0.3's batch) | 0 |" in markdown  # trained at r = 0
    assert "+AttentionHand (r=0.3), all real" not in markdown


def test_validation_lines_give_each_control_against_the_reference_and_the_main_run():
    one = lambda value: {"k": {"MPVPE": value}}  # noqa: E731
    validation = {"key": "k", "split": "train-wild", "root": "/val", "mean": {"0": one(50.0), "0.3": one(48.0)},
                  "std": {"0": one(1.0), "0.3": one(1.0)}, "delta_mean": {"0.3": one(-2.0)},
                  "delta_ci": {"0.3": {"k": {"MPVPE": [-3.0, -1.0]}}},
                  "controls": {"real_batch": {"ratio": 0.3, "delta_mean": one(-0.5), "delta_ci": {"k": {"MPVPE": [-1.0, 0.0]}},
                                              "vs_main": {"delta_mean": one(1.5), "delta_ci": {"k": {"MPVPE": [0.5, 2.5]}}}}}}
    lines = table2._validation_lines(validation, ["MPVPE"], {"0": "A (r=0)", "0.3": "A+AttentionHand (r=0.3)"}, "0")
    assert "| Δ real_batch (r=0.3) − r=0 | -0.50 [-1.00, +0.00] |" in lines  # no method: the control's key
    assert "| Δ real_batch (r=0.3) − r=0.3 | +1.50 [+0.50, +2.50] |" in lines
    named = table2._validation_lines(validation, ["MPVPE"], {"0": "A (r=0)", "0.3": "A+AttentionHand (r=0.3)"}, "0", "A")
    assert "| Δ A (r=0, all real), the r=0.3 runs' batch − r=0.3 | +1.50 [+0.50, +2.50] |" in named


def test_steps_note_keeps_a_control_apart_from_the_main_run_at_its_ratio():
    runs = [{"seed": 0, "ratio": 0.0, "steps": 10}, {"seed": 0, "ratio": 0.3, "steps": 10},
            {"seed": 0, "ratio": 0.3, "control": "real_batch", "steps": 7}]
    assert "r=0.3 real_batch: 7" in table2.steps_note(runs) and "r=0.3: 10" in table2.steps_note(runs)
    assert table2.steps_note(runs[:2]) is None
