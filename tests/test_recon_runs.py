"""Run folders (recon.runs): one run per --out, a lock naming its owner, checkpoints tied to the run id."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from recon import checkpoint as ckpt
from recon import test as recon_test
from recon import train as recon_train
from recon.runs import RunFolderError, claim_run_folder
from tests.recon_helpers import run_args, write_tiny_synthlab

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def synthlab_root(tmp_path_factory) -> Path:
    return write_tiny_synthlab(tmp_path_factory.mktemp("synthlab_runs"))


def _sidecars(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step_*.json"))


def _one_line_error(capsys) -> str:
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0, error
    return error


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_reused_out_is_refused_then_overwritten_and_test_scores_this_runs_checkpoint(synthlab_root, tmp_path, capsys):
    out = tmp_path / "run"
    quick = ["eval.at_end=false", "train.ckpt_every=1", "train.average_last=1"]  # the final weights: keep_last rules alone
    # an older, longer run: checkpoints 4, 5, 6 (keep_last 3)
    assert recon_train.main(run_args(synthlab_root, out, "--max-steps", "6", "--epochs", "3", *quick)) == 0
    old_run = json.loads((out / "run.json").read_text())["run_id"]
    capsys.readouterr()
    # a new run into it is refused in one line, and nothing of the old run is touched
    assert recon_train.main(run_args(synthlab_root, out, "--max-steps", "2", *quick)) == 2
    error = _one_line_error(capsys)
    assert f"--out {out}: holds a run already" in error and "--resume" in error and "--overwrite" in error
    assert _sidecars(out) == ["step_000004.json", "step_000005.json", "step_000006.json"]
    # --overwrite replaces it: the new run's step-1/2 checkpoints are kept (pruning never compares runs)
    assert recon_train.main(run_args(synthlab_root, out, "--max-steps", "2", "--overwrite", *quick)) == 0
    new_run = json.loads((out / "run.json").read_text())["run_id"]
    assert new_run != old_run and _sidecars(out) == ["step_000001.json", "step_000002.json"]
    assert json.loads((out / "checkpoints" / "step_000002.json").read_text())["run_id"] == new_run
    assert not (out / "run.lock").exists()  # released at the end
    printed = capsys.readouterr().out
    assert "deleted the previous run's" in printed and "checkpoint " + str(out / "checkpoints" / "step_000002.json") in printed
    # recon.test --ckpt FOLDER evaluates this run's newest checkpoint
    assert recon_test.main(["--ckpt", str(out), "--out", str(tmp_path / "t.json"), "--max-samples", "1"]) == 0
    assert "baseline step 2" in capsys.readouterr().out


def test_a_second_run_on_a_locked_out_is_refused_naming_the_owner_and_a_dead_owners_lock_is_taken_over(
    synthlab_root, tmp_path, capsys
):
    out = tmp_path / "locked"
    out.mkdir()
    owner = {"pid": os.getppid(), "host": os.uname().nodename, "run_id": "abc", "started": "2026-01-01T00:00:00"}
    (out / "run.lock").write_text(json.dumps(owner))
    assert recon_train.main(run_args(synthlab_root, out, "--max-steps", "1", "eval.at_end=false")) == 2
    error = _one_line_error(capsys)
    assert f"in use by process {os.getppid()}" in error and "run.lock" in error
    assert not (out / "checkpoints").exists() and not (out / "config.yaml").exists()  # nothing written
    # the owner died (kill -9): its lock and a half-written checkpoint file are cleaned up
    (out / "run.lock").write_text(json.dumps(dict(owner, pid=_dead_pid())))
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "step_000001.safetensors.tmp-99999").write_bytes(b"half")
    assert recon_train.main(run_args(synthlab_root, out, "--max-steps", "1", "eval.at_end=false")) == 0
    printed = capsys.readouterr().out
    assert "took over the lock of process" in printed and "removed 1 partial file(s)" in printed
    assert _sidecars(out) == ["step_000001.json"] and not list((out / "checkpoints").glob("*.tmp-*"))


def test_resume_from_an_earlier_checkpoint_reports_its_step_and_tensorboard_keeps_each_step_once(
    synthlab_root, tmp_path, capsys
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "resumed"
    common = ["eval.at_end=false", "train.ckpt_every=2", "train.log_every=1", "--epochs", "3"]
    assert recon_train.main(run_args(synthlab_root, out, "--max-steps", "4", *common)) == 0
    step2 = out / "checkpoints" / "step_000002.json"
    capsys.readouterr()
    # a later checkpoint of the run exists: resuming an earlier one needs --overwrite (which drops step 4)
    assert recon_train.main(["--resume", str(step2), "--out", str(out), "--max-steps", "4"]) == 2
    assert "holds later checkpoints of this run (step_000004.json)" in _one_line_error(capsys)
    assert recon_train.main(["--resume", str(step2), "--out", str(out), "--max-steps", "4", "--overwrite"]) == 0
    assert f"resuming {step2} at step 2" in capsys.readouterr().out
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3, 4]
    # a resume into a folder holding another run is refused
    other = tmp_path / "other"
    assert recon_train.main(run_args(synthlab_root, other, "--max-steps", "1", "eval.at_end=false")) == 0
    capsys.readouterr()
    assert recon_train.main(["--resume", str(step2), "--out", str(other)]) == 2
    assert "but the checkpoint to resume belongs to run" in _one_line_error(capsys)


def test_out_naming_a_file_is_refused_and_a_run_failing_before_its_first_file_leaves_no_folder(
    synthlab_root, tmp_path, capsys
):
    target = tmp_path / "a_file"
    target.write_text("x")
    assert recon_train.main(run_args(synthlab_root, target, "--max-steps", "1")) == 2
    assert f"--out {target}: is a file" in _one_line_error(capsys)
    out = tmp_path / "never"
    assert recon_train.main(run_args(synthlab_root, out, "--backbone-weights", str(target))) == 2
    assert "--backbone-weights" in _one_line_error(capsys) and not out.exists()


def _save(folder: Path, step: int, run_id: str) -> Path:
    model = nn.Linear(2, 2)
    progress = {"step": step, "epoch": 0, "step_in_epoch": step, "sampler_seed": 0, "world_size": 1}
    return ckpt.save_checkpoint(folder, model=model, arch="tiny", model_kwargs={}, config={}, optimizer=None,
                                progress=progress, keep_last=2, run_id=run_id)


def test_pruning_and_folder_lookup_go_by_run_id(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        _save(folder, step, "old")
    for step in (1, 2, 3):
        _save(folder, step, "new")
    # each run kept its own two newest: the new run's steps were not pruned for being below 20
    assert _sidecars(tmp_path) == [f"step_{s:06d}.json" for s in (2, 3, 20, 30)]
    with pytest.raises(ckpt.CheckpointError, match="checkpoints of 2 different runs and no run.json"):
        ckpt.find_checkpoint(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"run_id": "new"}))
    assert ckpt.find_checkpoint(tmp_path).name == "step_000003.json"
    assert ckpt.find_checkpoint(folder).name == "step_000003.json"
    (tmp_path / "run.json").write_text(json.dumps({"run_id": "gone"}))
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint of run gone"):
        ckpt.find_checkpoint(tmp_path)


def test_claim_keeps_other_files_and_refuses_a_second_claim(tmp_path):
    (tmp_path / "train.log").write_text("recon.table2's log lives beside the run\n")
    first = claim_run_folder(tmp_path, say=lambda *_: None)  # a log only: not a run
    with pytest.raises(RunFolderError, match=f"in use by process {os.getpid()}"):
        claim_run_folder(tmp_path, say=lambda *_: None)
    first.record()
    first.release()
    assert not (tmp_path / "run.lock").exists() and (tmp_path / "train.log").exists()
    with pytest.raises(RunFolderError, match="holds a run already \\(run.json\\)"):
        claim_run_folder(tmp_path, say=lambda *_: None)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.pop("step_in_epoch"), "lacks the key 'step_in_epoch' (needed to resume)"),
        (lambda m: m.update(step="ten"), "sidecar key 'step' is 'ten'; expected a non-negative integer"),
        (lambda m: m.update(model_kwargs=[1]), "sidecar key 'model_kwargs' is not a JSON object"),
        (lambda m: m.update(weights="../x.safetensors"), "expected a file name beside the sidecar"),
    ],
)
def test_a_sidecar_missing_or_mistyping_keys_is_refused_in_one_line(tmp_path, edit, message):
    path = _save(tmp_path, 1, "r")
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    with pytest.raises(ckpt.CheckpointError, match=message.replace("(", "\\(").replace(")", "\\)")):
        ckpt.read_checkpoint_info(path, need_state=True)


def test_table2_restarts_an_attempt_killed_before_its_first_checkpoint_with_overwrite(tmp_path):
    from recon.table2 import RunSpec, _state_flags

    run = RunSpec(arch="baseline", ratio=0.0, seed=0, folder=tmp_path / "r0", command=("python",))
    run.folder.mkdir()
    (run.folder / "train.log").write_text("")
    assert _state_flags(run, "new") == [] and _state_flags(run, "resume") == ["--resume", "auto"]
    (run.folder / "config.yaml").write_text("seed: 0\n")  # killed after writing its config, before a checkpoint
    assert _state_flags(run, "new") == ["--overwrite"]


def test_checkpoints_from_before_run_ids_stay_resumable(tmp_path):
    folder = tmp_path / "checkpoints"
    legacy = _save(folder, 4, None)
    meta = json.loads(legacy.read_text())
    assert meta["run_id"] is None
    assert ckpt.find_checkpoint(tmp_path) == legacy  # no run.json: the one run there
    # a resume of it records a new run id before writing its first checkpoint (then crashes): still found
    (tmp_path / "run.json").write_text(json.dumps({"run_id": "fresh"}))
    assert ckpt.find_checkpoint(tmp_path) == legacy
    _save(folder, 6, "fresh")
    assert ckpt.find_checkpoint(tmp_path).name == "step_000006.json"


def _claim_at_once(out: str, barrier, results) -> None:
    barrier.wait()
    try:
        folder = claim_run_folder(out, say=lambda *_: None)
    except RunFolderError as error:
        results.put(("refused", str(error)))
        barrier.wait()
        return
    folder.record()
    results.put(("claimed", folder.run_id))
    barrier.wait()  # the winner holds the lock until every process has tried
    folder.release()


def test_processes_claiming_one_out_at_once_one_wins_the_others_are_refused(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("fork")  # no re-import of torch per process: the claim itself races
    barrier, results = context.Barrier(6), context.Queue()
    procs = [context.Process(target=_claim_at_once, args=(str(tmp_path / "race"), barrier, results)) for _ in range(6)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    winners = [detail for kind, detail in outcomes if kind == "claimed"]
    assert len(winners) == 1, outcomes
    assert all("in use by process" in detail for kind, detail in outcomes if kind == "refused")
    assert json.loads((tmp_path / "race" / "run.json").read_text())["run_id"] == winners[0]


def test_numpy_and_python_random_are_seeded_from_the_run_seed(synthlab_root, tmp_path):
    from safetensors.torch import load_file

    plugin = tmp_path / "draws_regressor.py"
    plugin.write_text(
        "import random\n"
        "import numpy as np\n"
        "import torch\n"
        "from recon.archs.baseline import BaselineRegressor\n"
        "from recon.registry import REGRESSORS\n"
        "@REGRESSORS.register('_test_draws')\n"
        "class Draws(BaselineRegressor):\n"
        "    def __init__(self, **kwargs):\n"
        "        super().__init__(**kwargs)\n"
        "        self.register_buffer('draws', torch.tensor([np.random.rand(), random.random()], dtype=torch.float64))\n"
        "import inspect\n"
        "Draws.__init__.__signature__ = inspect.signature(BaselineRegressor.__init__)  # the baseline's arguments\n"
    )

    def draws(name: str, seed: str) -> list[float]:
        out = tmp_path / name
        argv = run_args(synthlab_root, out, "--plugin", str(plugin), "--arch", "_test_draws", "--seed", seed,
                        "--max-steps", "1", "eval.at_end=false")
        assert recon_train.main(argv) == 0
        return load_file(str(out / "checkpoints" / "step_000001.safetensors"))["draws"].tolist()

    first, again, other = draws("a", "5"), draws("b", "5"), draws("c", "6")
    assert first == again and first != other
