"""recon.train / recon.test end to end on a tiny synthlab: learning, exact resume, metrics, clear failures."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recon import test as recon_test
from recon import train as recon_train
from tests.recon_helpers import TINY, run_args, write_tiny_synthlab


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="session")
def synthlab_root(tmp_path_factory) -> Path:
    return write_tiny_synthlab(tmp_path_factory.mktemp("synthlab"))


_run = run_args


def _weights(out: Path) -> dict[str, torch.Tensor]:
    newest = sorted((out / "checkpoints").glob("step_*.safetensors"))[-1]
    return load_file(str(newest))


def test_baseline_loss_falls_on_a_fixed_batch(synthlab_root):
    from hands.datasets import build_dataset
    from hands.sample import collate
    from recon.data import eval_transform
    from recon.registry import build_regressor

    torch.manual_seed(0)
    dataset = build_dataset("synthlab", synthlab_root, "train-lab")
    crop = eval_transform("hands", (64, 64))
    batch = collate([crop(dataset[i]) for i in range(4)])
    model = build_regressor(
        "baseline", backbone="resnet18", backbone_kwargs={"channels": (8, 16, 32, 64), "stem_width": 8}, hidden_dim=32
    )
    output = model(batch)
    output.validate(4)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for _ in range(40):
        losses = model.losses(model(batch), batch)
        assert set(losses) == {"verts", "joints", "pose", "shape", "rel_root"}
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    assert history[-1] < 0.4 * history[0], history


def test_train_writes_checkpoints_tensorboard_and_metrics_and_test_reproduces_them(synthlab_root, tmp_path, capsys):
    out = tmp_path / "run"
    code = recon_train.main(_run(synthlab_root, out, "--max-steps", "4", "train.ckpt_every=2", "train.image_every=2",
                                 "train.average_last=1"))  # the baseline's demo profile averages 3; here the final weights
    assert code == 0
    printed = capsys.readouterr().out
    assert "wall time" in printed and "synthlab-test-wild" in printed
    assert [p.name for p in sorted((out / "checkpoints").glob("*.json"))] == ["step_000002.json", "step_000004.json"]
    assert list((out / "tb").glob("events.out.tfevents.*"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"synthlab-test-lab", "synthlab-test-wild", "skips", "weights"}
    assert metrics.pop("weights") == {"step": 4}  # the final weights
    assert metrics.pop("skips") == {"train": {}, "test": {}}  # the tiny synthlab has no bad record
    for values in metrics.values():
        assert values["count_MPVPE"] > 0 and values["records_skipped"] == 0
        for name in ("MPVPE", "RRVE", "MRRPE"):  # NaN only where nothing counted (e.g. no two-hand frame)
            assert (0 < values[name] < 2000) if values[f"count_{name}"] else math.isnan(values[name])  # mm
    sidecar = json.loads((out / "checkpoints" / "step_000004.json").read_text())
    assert sidecar["arch"] == "baseline" and sidecar["model_kwargs"]["backbone_kwargs"]["stem_width"] == 8
    assert sidecar["config"]["train"]["batch_size"] == 4 and sidecar["step"] == 4

    # recon.test rebuilds the model from the checkpoint alone and gets the same numbers
    test_json = tmp_path / "test.json"
    assert recon_test.main(["--ckpt", str(out), "--out", str(test_json), "--compare", str(out / "metrics.json")]) == 0
    printed = capsys.readouterr().out
    again = json.loads(test_json.read_text())
    for key in metrics:
        for name in ("MPVPE", "RRVE", "MRRPE"):
            assert again[key][name] == pytest.approx(metrics[key][name], rel=1e-5, nan_ok=True)
    assert "delta synthlab-test-wild MPVPE: +0.00 mm" in printed
    only = tmp_path / "only.json"
    argv = ["--ckpt", str(out), "--data-root", str(synthlab_root), "--datasets", "synthlab:test-lab", "--max-samples", "3"]
    assert recon_test.main([*argv, "--out", str(only)]) == 0
    subset = json.loads(only.read_text())
    assert list(subset) == ["skips", "synthlab-test-lab"] and 0 < subset["synthlab-test-lab"]["count_MPVPE"] <= 6  # 3 images
    capsys.readouterr()

    # --hand-stats: the predicted and labelled hands of the first N samples, over the samples that label each hand
    from hands.datasets import build_dataset

    stats_json = tmp_path / "stats.json"
    assert recon_test.main([*argv, "--out", str(stats_json), "--hand-stats", "3", "--compare", str(only)]) == 0
    printed = capsys.readouterr().out  # (and --compare skipped the new key)
    assert "synthlab-test-lab " in printed and " hands (" in printed and "knuckle width" in printed
    stats = json.loads(stats_json.read_text())["hand_stats"]["synthlab-test-lab"]
    samples = [build_dataset("synthlab", synthlab_root, "test-lab")[i] for i in range(3)]
    for side in ("right", "left"):
        labelled = [getattr(sample, side) for sample in samples if bool(getattr(sample, side).valid)]
        truth = stats[side]["ground_truth"]
        assert stats[side]["predicted"]["hands"] == truth["hands"] == len(labelled)
        if labelled:
            bones = [float((h.joints_cam[9] - h.joints_cam[0]).norm()) * 1000 for h in labelled]
            assert truth["bone"] == pytest.approx(sum(bones) / len(bones), abs=0.01)
            assert stats[side]["predicted"]["spread"] >= 0 and stats[side]["predicted"]["bone"] > 0

    # a truncated checkpoint is refused in one line
    weights = out / "checkpoints" / "step_000004.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert recon_test.main(["--ckpt", str(weights)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("recon.test: error:") and "checksum differs" in error and "\n" not in error


def test_resume_gives_the_weights_of_an_uninterrupted_run(synthlab_root, tmp_path, capsys):
    # 12 images, batch 4 -> 3 steps per epoch: stop mid-epoch (step 2), resume across an epoch boundary (to 5)
    full, split = tmp_path / "full", tmp_path / "split"
    common = ["--epochs", "3", "eval.at_end=false", "train.ckpt_every=100"]
    assert recon_train.main(_run(synthlab_root, full, "--max-steps", "5", *common)) == 0
    assert recon_train.main(_run(synthlab_root, split, "--max-steps", "2", *common)) == 0
    sidecar = split / "checkpoints" / "step_000002.json"
    meta = json.loads(sidecar.read_text())
    assert (meta["epoch"], meta["step_in_epoch"]) == (0, 2)
    # another real batch cannot continue the data order: refused in one line, nothing written
    capsys.readouterr()
    assert recon_train.main(["--resume", "--out", str(split), "--max-steps", "5", "--batch-size", "3"]) == 2
    error = capsys.readouterr().err.strip()
    assert "trained with batch 4, this command gives batch 3: 4 real samples a step cannot resume as 3" in error
    assert error.count("\n") == 0 and sorted(p.name for p in (split / "checkpoints").glob("*.json")) == [sidecar.name]
    # a checkpoint from before train.synthetic_batch resumes as share, the same run
    assert meta["config"]["train"].pop("synthetic_batch") == "share"
    sidecar.write_text(json.dumps(meta))
    assert recon_train.main(["--resume", "--out", str(split), "--max-steps", "5"]) == 0
    expected, resumed = _weights(full), _weights(split)
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name


def test_average_last_evaluates_the_mean_of_the_last_checkpoints(synthlab_root, tmp_path, capsys):
    # 5 steps, a checkpoint every 2: steps 2, 4 and the final 5; average_last=3 averages all three
    out = tmp_path / "avg"
    assert recon_train.main(_run(synthlab_root, out, "--max-steps", "5", "train.ckpt_every=2", "train.average_last=3")) == 0
    assert "averaged the weights of steps 2, 4, 5 (train.average_last)" in capsys.readouterr().out
    singles = [load_file(str(out / "checkpoints" / f"step_00000{k}.safetensors")) for k in (2, 4, 5)]
    averaged = load_file(str(out / "averaged" / "step_000005.safetensors"))
    assert averaged.keys() == singles[-1].keys()
    moved = 0
    for name, value in averaged.items():
        if value.is_floating_point():  # weights and BatchNorm statistics: the mean of the three
            mean = sum(s[name].double() for s in singles) / 3
            assert torch.allclose(value.double(), mean, atol=1e-6), name
            moved += not torch.equal(value, singles[-1][name])
        else:  # num_batches_tracked: the newest checkpoint's
            assert torch.equal(value, singles[-1][name]), name
    assert moved > 0  # the weights changed between the checkpoints, so the mean is not the last one
    # the averaged checkpoint is not resumable state and resuming never picks it: --resume continues step 5
    meta = json.loads((out / "averaged" / "step_000005.json").read_text())
    assert meta["averaged_steps"] == [2, 4, 5] and meta["step"] == 5
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["weights"] == {"step": 5, "averaged_steps": [2, 4, 5], "checkpoint": "averaged/step_000005.json"}
    # metrics.json scored the averaged weights: recon.test on them gives the same numbers, the last single differs
    again_json = tmp_path / "again.json"
    assert recon_test.main(["--ckpt", str(out / "averaged"), "--out", str(again_json)]) == 0
    again = json.loads(again_json.read_text())
    for key in ("synthlab-test-lab", "synthlab-test-wild"):
        assert again[key]["MPVPE"] == pytest.approx(metrics[key]["MPVPE"], rel=1e-5)
    from recon.table2 import evaluated_weights
    assert evaluated_weights(out) == out / "averaged" / "step_000005.json"
    assert evaluated_weights(tmp_path) == tmp_path  # a folder without metrics.json: its newest checkpoint
    capsys.readouterr()
    # the averaged weights are not resumable state: refused in one line
    assert recon_train.main(["--resume", str(out / "averaged" / "step_000005.json"), "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert "not resumable (weights only, the mean of steps [2, 4, 5])" in error and "\n" not in error
    # resuming a finished run that trains nothing and averages the same steps keeps its metrics.json
    assert recon_train.main(["--resume", "--out", str(out), "--max-steps", "5", "eval.at_end=false"]) == 0
    assert "moved" not in capsys.readouterr().out and json.loads((out / "metrics.json").read_text()) == metrics
    # --resume continues the newest resumable checkpoint (step 5); without an evaluation the metrics.json that
    # scored the step-5 average is moved aside, and the new average (steps 4, 5, 6) is kept beside the old one
    assert recon_train.main(["--resume", "--out", str(out), "--max-steps", "6", "eval.at_end=false"]) == 0
    printed = capsys.readouterr().out
    assert "resuming" in printed and "moved" in printed and not (out / "metrics.json").exists()
    assert json.loads((out / "metrics.previous.json").read_text()) == metrics
    assert (out / "checkpoints" / "step_000006.json").is_file()
    assert json.loads((out / "averaged" / "step_000006.json").read_text())["averaged_steps"] == [4, 5, 6]
    assert (out / "averaged" / "step_000005.json").is_file()
    assert recon_test.main(["--ckpt", str(out / "averaged"), "--out", str(again_json)]) == 0  # the newest: step 6
    assert "step 6" in capsys.readouterr().out
    # resuming an earlier checkpoint with --overwrite discards the later steps' checkpoints and their averages
    argv = ["--resume", str(out / "checkpoints" / "step_000004.json"), "--out", str(out), "--overwrite",
            "--max-steps", "4", "eval.at_end=false"]
    assert recon_train.main(argv) == 0
    assert sorted(p.name for p in (out / "averaged").glob("*.json")) == ["step_000004.json"]
    assert json.loads((out / "averaged" / "step_000004.json").read_text())["averaged_steps"] == [2, 4]
    capsys.readouterr()
    # --overwrite removes the averaged weights with the rest of the old run
    assert recon_train.main(_run(synthlab_root, out, "--max-steps", "1", "--overwrite", "eval.at_end=false",
                                 "train.average_last=1")) == 0
    assert not (out / "averaged").exists()


def test_max_minutes_ends_the_run_at_the_first_checkpoint_after_the_budget(synthlab_root, tmp_path, capsys):
    """train.max_minutes: a budget spent before the first checkpoint (step 2 of 6) ends the run there, with the
    weights a run told to stop at step 2 ends with, averaged over the checkpoints it has; metrics.json says so.
    A budget not spent leaves the run to its steps."""
    out = tmp_path / "budget"
    argv = _run(synthlab_root, out, "--max-steps", "6", "train.ckpt_every=2", "train.average_last=2",
                "train.max_minutes=1e-9")
    assert recon_train.main(argv) == 0
    printed = capsys.readouterr().out
    assert "train.max_minutes=1e-09: the time budget is spent; the run ends at step 2 of 6" in printed
    assert sorted(p.name for p in (out / "checkpoints").glob("*.json")) == ["step_000002.json"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["weights"]["step"] == 2 and metrics["weights"]["averaged_steps"] == [2]
    budget = metrics["time_budget"]
    assert (budget["max_minutes"], budget["ended_run"], budget["steps"]) == (1e-9, True, 2) and budget["train_time_s"] > 0
    two = tmp_path / "two"
    assert recon_train.main(_run(synthlab_root, two, "--max-steps", "2", "train.ckpt_every=2", "eval.at_end=false")) == 0
    for name, value in load_file(str(two / "checkpoints" / "step_000002.safetensors")).items():
        assert torch.equal(value, _weights(out)[name]), name
    capsys.readouterr()
    plenty = tmp_path / "plenty"
    argv = _run(synthlab_root, plenty, "--max-steps", "3", "train.ckpt_every=2", "train.max_minutes=60")
    assert recon_train.main(argv) == 0
    assert "time budget" not in capsys.readouterr().out
    budget = json.loads((plenty / "metrics.json").read_text())["time_budget"]
    assert (budget["ended_run"], budget["steps"]) == (False, 3)


def test_max_minutes_ends_the_run_at_the_first_checkpoint_after_the_budget_not_before(
        synthlab_root, tmp_path, capsys, monkeypatch):
    """On a clock that reads 30 s at the step-2 checkpoint and 90 s at step 4, a 1-minute budget ends the run at
    step 4 of 8 (not at 2, where 30 s were spent, nor at 3, no checkpoint step); the averaged weights are those of
    the checkpoints it wrote. Resumed without the budget, the run goes on to its steps."""
    readings = iter([0.0, 30.0, 90.0])  # the budget's start, then one reading per checkpoint step it checks
    monkeypatch.setattr(recon_train, "_budget_clock", lambda: next(readings))
    out = tmp_path / "after"
    argv = _run(synthlab_root, out, "--max-steps", "8", "train.ckpt_every=2", "train.average_last=2",
                "train.max_minutes=1")
    assert recon_train.main(argv) == 0
    assert "the run ends at step 4 of 8" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["weights"]["averaged_steps"] == [2, 4] and metrics["time_budget"]["steps"] == 4
    assert sorted(p.name for p in (out / "checkpoints").glob("*.json")) == ["step_000002.json", "step_000004.json"]
    assert recon_train.main(["--resume", "--out", str(out), "eval.at_end=false", "train.max_minutes=null"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert json.loads((out / "checkpoints" / "step_000008.json").read_text())["step"] == 8


def _agree_on_the_budget(rank: int, world_size: int, init_file: str, spent_ranks: tuple, results: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        stop = recon_train._out_of_time(rank in spent_ranks, world_size, torch.device("cpu"))
        Path(results, f"rank{rank}").write_text(json.dumps(stop))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("spent_ranks, stop", [((1,), True), ((), False)])
def test_every_process_stops_when_one_has_spent_its_budget(tmp_path, spent_ranks, stop):
    """Two processes (gloo): when one of them has spent its time budget both end the run at that step."""
    import torch.multiprocessing as mp

    mp.spawn(_agree_on_the_budget, args=(2, str(tmp_path / "init"), spent_ranks, str(tmp_path)), nprocs=2, join=True)
    assert [json.loads((tmp_path / f"rank{rank}").read_text()) for rank in (0, 1)] == [stop, stop]


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_max_minutes_must_be_a_positive_number(synthlab_root, tmp_path, capsys, value):
    assert recon_train.main(_run(synthlab_root, tmp_path / "bad", "--max-steps", "1", f"train.max_minutes={value}")) == 2
    error = capsys.readouterr().err.strip()
    assert "train.max_minutes=" in error and "expected a positive number of minutes" in error and "\n" not in error


def test_average_last_must_be_positive(synthlab_root, tmp_path, capsys):
    assert recon_train.main(_run(synthlab_root, tmp_path / "bad", "--max-steps", "1", "train.average_last=0")) == 2
    assert "train.average_last=0: expected a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--synthetic-ratio", "1.0"], "argument --synthetic-ratio: expected 0 <= r < 1, got 1.0"),
        (["--synthetic-ratio", "-0.1"], "expected 0 <= r < 1"),
        (["--max-steps", "0"], "argument --max-steps: expected a positive integer"),
        (["--profile", "fast"], "argument --profile: invalid choice"),
    ],
)
def test_bad_flags_fail_clearly(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        recon_train.main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--arch", "nope"], "--arch nope: unknown regressor; known: "),
        (["train.lrate=1"], "unknown key 'train.lrate'"),
        (["train.batch_size=four"], "bad value for 'train.batch_size'"),
        (["model.depth=3"], "unknown key 'model.depth' for regressor 'baseline'"),
        (["mixing.mode=bogus"], "mixing.mode='bogus': expected one of online, sync, offline"),
        (["--mix-mode", "offline"], "mixing.mode=offline needs mixing.shards=DIR"),
        (["--datasets", "freihand"], "dataset 'freihand' (in train datasets): unknown; known: coco, hic, ih26m, reih, synthlab"),
        (["--datasets", "ih26m"], "dataset 'ih26m' needs --data-root"),
        (["--resume"], "--resume: no checkpoints in "),
        (["threads=0"], "threads=0: expected a positive number of CPU threads"),
        (["train.synthetic_batch=extra"], "train.synthetic_batch=extra: expected one of share, add"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
    ],
)
def test_bad_config_fails_in_one_line(argv, message, capsys, tmp_path):
    code = recon_train.main([*argv, "--out", str(tmp_path / "never"), *TINY])
    error = capsys.readouterr().err.strip()
    assert code == 2 and message in error and error.count("\n") == 0, error
    if argv[0] == "--arch":
        assert "baseline" in error


def test_non_finite_loss_stops_with_the_loss_dict(synthlab_root, tmp_path, capsys):
    plugin = tmp_path / "nan_regressor.py"
    plugin.write_text(
        "import torch\n"
        "from recon.archs.baseline import BaselineRegressor\n"
        "from recon.registry import REGRESSORS\n"
        "@REGRESSORS.register('_test_nan_after_2')\n"
        "class NanAfterTwo(BaselineRegressor):\n"
        "    calls = 0\n"
        "    def losses(self, output, batch):\n"
        "        terms = super().losses(output, batch)\n"
        "        NanAfterTwo.calls += 1\n"
        "        if NanAfterTwo.calls > 2:\n"
        "            terms['verts'] = terms['verts'] * float('nan')\n"
        "        return terms\n"
    )
    argv = _run(synthlab_root, tmp_path / "nan", "--plugin", str(plugin), "--arch", "_test_nan_after_2", "--max-steps", "5")
    assert recon_train.main(argv) == 1
    error = capsys.readouterr().err
    assert "non-finite loss at step 2 (epoch 0)" in error and "'verts': nan" in error and "'rel_root'" in error


def test_default_data_is_announced_in_one_line_and_roots_resolve(tmp_path):
    from recon.config import load_config
    from recon.data import DataSpecError, dataset_root, describe_default_data, parse_specs

    note = describe_default_data(load_config())
    assert note.startswith("no dataset configured") and "synthlab" in note and "\n" not in note
    assert describe_default_data(load_config(flags={"data.root": str(tmp_path), "data.train": ["ih26m"]})) is None
    specs = parse_specs(["synthlab", "ih26m,hic:test"], "test")
    assert [s.key for s in specs] == ["synthlab-test-lab", "synthlab-test-wild", "ih26m", "hic"]
    (tmp_path / "reih").mkdir()
    assert dataset_root("reih", str(tmp_path), 2) == tmp_path / "reih"
    assert dataset_root("ih26m", str(tmp_path), 1) == tmp_path  # the one dataset's own folder
    with pytest.raises(DataSpecError, match="no folder ih26m/"):
        dataset_root("ih26m", str(tmp_path), 2)


def test_backbone_weights_load_into_the_baseline_and_mismatches_are_refused(tmp_path):
    from safetensors.torch import save_file

    from recon.registry import build_regressor

    kwargs = dict(backbone="resnet18", backbone_kwargs={"channels": (8, 16, 32, 64), "stem_width": 8}, hidden_dim=32)
    source = build_regressor("baseline", **kwargs)
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in source.backbone.state_dict().items()}, str(path))
    target = build_regressor("baseline", **kwargs)
    target.load_backbone_weights(str(path))
    for name, value in source.backbone.state_dict().items():
        assert torch.equal(value, target.backbone.state_dict()[name]), name
    wider = build_regressor("baseline", backbone="resnet18", backbone_kwargs={"channels": (8, 16, 32, 128), "stem_width": 8})
    with pytest.raises(ValueError, match="backbone.safetensors: does not fit the backbone: .*size mismatch"):
        wider.load_backbone_weights(str(path))


def test_backbone_weight_files_that_cannot_be_read_or_do_not_fit_give_one_line_errors(tmp_path):
    """The helpers every regressor's load_backbone_weights uses (baseline, IntagHand, IHMR, DIR)."""
    from recon.archs.common import load_backbone_state, read_weights

    (tmp_path / "text.pt").write_text("not weights")
    with pytest.raises(ValueError, match=r"^--backbone-weights .*text.pt: cannot read it"):
        read_weights(tmp_path / "text.pt")
    with pytest.raises(ValueError, match=r"missing.pt: cannot read it \(FileNotFoundError"):
        read_weights(tmp_path / "missing.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"list.pt: not a state dict"):
        read_weights(tmp_path / "list.pt")
    layer = torch.nn.Linear(2, 3)
    torch.save({"net": {"weight": torch.ones(3, 2), "bias": torch.ones(3)}, "state_dict": {}}, tmp_path / "ref.pt")
    state = read_weights(tmp_path / "ref.pt", keys=("net", "state_dict"))  # the first key present wins
    load_backbone_state(layer, {**state, "fc.weight": torch.zeros(1)}, "ref.pt", "encoder")  # classifier ignored
    assert torch.equal(layer.weight, torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"ref.pt: does not fit the encoder: .*size mismatch"):
        load_backbone_state(torch.nn.Linear(2, 4), state, "ref.pt", "encoder")
    with pytest.raises(ValueError, match=r"ref.pt: does not fit the encoder: 0 missing keys \[\], 1 unexpected"):
        load_backbone_state(layer, {**state, "extra": torch.ones(1)}, "ref.pt", "encoder")


def test_help_lists_the_registered_regressors():
    from recon import table2, train

    for parser in (train.build_parser(), table2.build_parser()):
        text = " ".join(parser.format_help().split())
        for name in ("baseline", "dir", "ihmr", "intaghand", "intershape", "interwild"):
            assert name in text.rsplit("--arch ARCH", 1)[1].split(" --", 1)[0], (parser.prog, name)


def test_epoch_steps_is_the_clock_of_the_epoch_counted_schedules(synthlab_root, tmp_path):
    """train.epoch_steps=K (recon.table2's equal-steps runs): the regressor's set_epoch and the warm-up read
    epoch = step // K at every step, whatever the data's epochs; unset, set_epoch follows the passes over the data."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hands.datasets import build_dataset

    record = tmp_path / "epochs.txt"
    plugin = tmp_path / "epoch_regressor.py"
    plugin.write_text(
        "from recon.archs.baseline import BaselineRegressor\n"
        "from recon.registry import REGRESSORS\n"
        "@REGRESSORS.register('_test_epoch_recorder')\n"
        "class EpochRecorder(BaselineRegressor):\n"
        "    epoch = None\n"
        "    def set_epoch(self, epoch):\n"
        "        self.epoch = epoch\n"
        "    def losses(self, output, batch):\n"
        f"        with open({str(record)!r}, 'a') as f:\n"
        "            f.write(f'{self.epoch}\\n')\n"
        "        return super().losses(output, batch)\n"
    )
    per_epoch = len(build_dataset("synthlab", synthlab_root, "train-lab")) // 4
    steps = per_epoch + 2
    common = ["--plugin", str(plugin), "--arch", "_test_epoch_recorder", "--max-steps", str(steps), "--epochs", "5",
              "optim.lr=1.0", "optim.warmup_epochs=2", "optim.warmup_start=0.5", "train.log_every=1", "eval.at_end=false"]
    assert recon_train.main(_run(synthlab_root, tmp_path / "clock", *common, "train.epoch_steps=2")) == 0
    assert [int(line) for line in record.read_text().split()] == [step // 2 for step in range(steps)]
    events = EventAccumulator(str(tmp_path / "clock" / "tb"))
    events.Reload()
    lr = [event.value for event in events.Scalars("train/lr")]  # logged after step s + 1 with step s's rate
    warmup = {0: 0.5, 1: 0.75}  # 0.5 + 0.5 * epoch / 2 over the 2 warm-up epochs, then 1
    assert lr == pytest.approx([warmup.get(step // 2, 1.0) for step in range(steps)])
    record.unlink()
    # resumed, the clock goes on from the checkpoint's step
    first = list(common)
    first[first.index("--max-steps") + 1] = "3"
    assert recon_train.main(_run(synthlab_root, tmp_path / "resumed", *first, "train.epoch_steps=2", "train.ckpt_every=3")) == 0
    assert recon_train.main(_run(synthlab_root, tmp_path / "resumed", *common, "train.epoch_steps=2", "train.ckpt_every=3",
                                 "--resume")) == 0
    assert [int(line) for line in record.read_text().split()] == [step // 2 for step in range(steps)]
    record.unlink()
    assert recon_train.main(_run(synthlab_root, tmp_path / "data", *common)) == 0
    assert [int(line) for line in record.read_text().split()] == [0] * per_epoch + [1, 1]


def test_epoch_steps_must_be_positive(synthlab_root, tmp_path, capsys):
    assert recon_train.main(_run(synthlab_root, tmp_path / "bad", "--max-steps", "1", "train.epoch_steps=0")) == 2
    assert "train.epoch_steps=0: expected a positive integer" in capsys.readouterr().err


def test_shape_statistics_on_hand_made_hands():
    """Two hands: the mean hand's bone and knuckle width, each hand's, and the spread about the mean hand (mm)."""
    joints = torch.zeros(2, 21, 3)
    joints[:, 9] = torch.tensor([[0.0, 0.08, 0.0], [0.0, 0.0, 0.08]])  # middle knuckles 8 cm away, at 90 degrees
    joints[:, 5, 0], joints[:, 17, 0] = 0.03, -0.03  # knuckles 6 cm apart in both
    verts = torch.zeros(2, 4, 3)
    verts[0, :, 0], verts[1, :, 0] = 0.01, -0.01  # each 10 mm from the mean
    stats = recon_test.shape_statistics(verts, joints)
    assert stats["hands"] == 2 and stats["spread"] == pytest.approx(10.0)
    assert stats["bone"] == pytest.approx(80.0) and stats["knuckle_width"] == pytest.approx(60.0)
    assert stats["mean_bone"] == pytest.approx(80.0 / 2**0.5, abs=0.01) and stats["mean_knuckle_width"] == pytest.approx(60.0)
    assert recon_test.shape_statistics(verts[:0], joints[:0]) == {"hands": 0}


def test_agreement_statistics_on_hand_made_hands():
    """Per-axis following, errors and palm facing of predictions against labels (mm): a prediction mirrored
    across the image's vertical axis follows x backwards and turns every palm the other way; a constant one
    follows nothing."""
    # three hands: the palm normal along -z, edge-on (normal +x), along +z (the camera looks down +z)
    joints = torch.zeros(3, 21, 3, dtype=torch.float64)
    joints[0, 5], joints[0, 17] = torch.tensor([0.03, -0.08, 0.0]), torch.tensor([-0.03, -0.08, 0.0])
    joints[1, 5], joints[1, 17] = torch.tensor([0.0, -0.08, 0.03]), torch.tensor([0.0, -0.08, -0.03])
    joints[2, 5], joints[2, 17] = torch.tensor([-0.03, -0.08, 0.0]), torch.tensor([0.03, -0.08, 0.0])
    verts = torch.randn(3, 10, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.02
    mirror = torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)

    same = recon_test.agreement_statistics(verts, joints, verts, joints)
    assert same["hands"] == 3 and same["mpvpe"] == 0.0 and same["l1_xyz"] == [0.0, 0.0, 0.0]
    assert same["follow_xyz"] == [100.0, 100.0, 100.0]
    assert same["palm_facing"] == {"clear": 2, "agree": 1.0, "chance": 0.5, "majority": 0.5, "mpvpe_right": 0.0,
                                   "mpvpe_wrong": None}
    assert recon_test.agreement_statistics(verts[:1], joints[:1], verts[:1], joints[:1])["follow_xyz"] is None  # one hand
    facing_one_way = recon_test.agreement_statistics(verts, joints[[0, 1, 0]], verts, joints[[0, 1, 0]])["palm_facing"]
    assert facing_one_way["clear"] == 2 and facing_one_way["majority"] == 1.0 and facing_one_way["chance"] == 1.0

    stretched = verts * torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64) + 0.01  # follows: scale and shift aside
    assert recon_test.agreement_statistics(stretched, joints, verts, joints)["follow_xyz"] == [100.0, 100.0, 100.0]

    mirrored = recon_test.agreement_statistics(verts * mirror, joints * mirror, verts, joints)
    assert mirrored["follow_xyz"] == [-100.0, 100.0, 100.0]
    assert mirrored["l1_xyz"][1:] == [0.0, 0.0]
    assert mirrored["l1_xyz"][0] == pytest.approx(float((2 * verts[..., 0]).abs().mean()) * 1000, abs=0.01)
    errors = (verts * mirror - verts).norm(dim=-1).mean(1) * 1000
    facing = mirrored["palm_facing"]
    assert facing["clear"] == 2 and facing["agree"] == 0.0 and facing["mpvpe_right"] is None
    assert facing["mpvpe_wrong"] == pytest.approx(float(errors[[0, 2]].mean()), abs=0.01)

    constant = recon_test.agreement_statistics(verts[:1].expand(3, -1, -1), joints[:1].expand(3, -1, -1), verts, joints)
    assert constant["follow_xyz"] == [0.0, 0.0, 0.0]
    assert constant["palm_facing"]["agree"] == 0.5  # the first hand's facing: right for it, wrong for the third
    assert constant["palm_facing"]["chance"] == 0.5  # one facing for all: agreement is the labels' share of it
    assert recon_test.agreement_statistics(verts[:0], joints[:0], verts[:0], joints[:0]) == {"hands": 0}

    extent = recon_test.shape_statistics(verts * torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64), joints)["extent_xyz"]
    assert extent[0] == 0.0 and extent[1] > 0 and extent[2] > 0  # a hand flattened along x


def test_hand_stats_of_a_regressor_that_predicts_the_labels_are_the_labels(synthlab_root, tmp_path, capsys):
    """recon.test --hand-stats on a regressor whose output is its input's labels (wrist-relative): the predicted
    hands' spread, bone, knuckle width and mean hand equal the ground truth's."""
    plugin = tmp_path / "truth_regressor.py"
    plugin.write_text(
        "from recon.archs.baseline import BaselineRegressor\n"
        "from recon.output import TwoHandOutput\n"
        "from recon.registry import REGRESSORS\n"
        "@REGRESSORS.register('_test_truth')\n"
        "class Truth(BaselineRegressor):\n"
        "    def forward(self, batch):\n"
        "        zero = 0.0 * super().forward(batch).right_verts.sum()  # a gradient path for the one training step\n"
        "        r, l = batch.right, batch.left\n"
        "        return TwoHandOutput(\n"
        "            right_verts=r.verts_cam - r.joints_cam[:, :1] + zero, left_verts=l.verts_cam - l.joints_cam[:, :1] + zero,\n"
        "            right_joints=r.joints_cam - r.joints_cam[:, :1] + zero, left_joints=l.joints_cam - l.joints_cam[:, :1] + zero,\n"
        "            rel_root=l.joints_cam[:, 0] - r.joints_cam[:, 0] + zero)\n"
        "    def losses(self, output, batch):\n"
        "        return {'zero': 0.0 * output.right_verts.sum()}\n"
    )
    out = tmp_path / "truth"
    argv = _run(synthlab_root, out, "--plugin", str(plugin), "--arch", "_test_truth", "--max-steps", "1", "eval.at_end=false")
    assert recon_train.main(argv) == 0
    stats_json = tmp_path / "stats.json"
    assert recon_test.main(["--ckpt", str(out), "--plugin", str(plugin), "--data-root", str(synthlab_root),
                            "--datasets", "synthlab:test-lab", "--hand-stats", "8", "--out", str(stats_json)]) == 0
    capsys.readouterr()
    from eval.report import load_results

    assert list(load_results(stats_json)) == ["synthlab-test-lab"]  # eval.report's tables skip the key
    stats = json.loads(stats_json.read_text())["hand_stats"]["synthlab-test-lab"]
    assert stats["right"]["ground_truth"]["hands"] + stats["left"]["ground_truth"]["hands"] > 0
    for side in ("right", "left"):
        predicted, truth = stats[side]["predicted"], stats[side]["ground_truth"]
        assert set(predicted) == set(truth)
        for key, value in truth.items():
            assert predicted[key] == pytest.approx(value, abs=0.02), (side, key)
        versus = stats[side]["versus_truth"]
        assert versus["hands"] == truth["hands"]
        if versus["hands"]:
            assert versus["mpvpe"] == pytest.approx(0.0, abs=0.01) and versus["l1_xyz"] == pytest.approx([0.0] * 3, abs=0.01)
            assert versus["palm_facing"]["agree"] in (None, 1.0) and versus["palm_facing"]["mpvpe_wrong"] is None
            facing = versus["palm_facing"]
            assert facing["majority"] is None or 0.5 <= facing["majority"] <= 1.0
            assert facing["chance"] is None or facing["chance"] == pytest.approx(  # the labels as predictions
                facing["majority"] ** 2 + (1 - facing["majority"]) ** 2, abs=2e-3)
        if versus["hands"] >= 2:
            assert versus["follow_xyz"] == pytest.approx([100.0] * 3, abs=0.1)
