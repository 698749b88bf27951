"""recon.checkpoint: atomic three-file checkpoints, exact round trips, clear refusals of damaged ones."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from recon import checkpoint as ckpt


def _model(width: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(3, width), nn.BatchNorm1d(width), nn.Linear(width, 2))


def _save(folder, model, step=5, **kwargs):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    path = ckpt.save_checkpoint(
        folder,
        model=model,
        arch="tiny",
        model_kwargs={"width": 4},
        config={"seed": 0},
        optimizer=optimizer,
        progress={"step": step, "epoch": 1, "step_in_epoch": 2, "sampler_seed": 0, "world_size": 1},
        **kwargs,
    )
    return path, optimizer


def test_round_trip_weights_optimizer_rng_and_progress(tmp_path):
    model = _model()
    path, optimizer = _save(tmp_path, model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000005.json", "step_000005.safetensors", "step_000005.state.pt"]
    info = ckpt.read_checkpoint_info(tmp_path, need_state=True)  # a folder resolves to its newest checkpoint
    assert info.json_path == path and info.arch == "tiny" and info.model_kwargs == {"width": 4}
    assert (info.meta["epoch"], info.meta["step_in_epoch"]) == (1, 2)
    fresh = _model()
    ckpt.load_weights(fresh, info)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    state = ckpt.load_training_state(info)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    fresh_opt.load_state_dict(state["optimizer"])
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    # RNG states: after restoring, the streams repeat the draws made after the capture
    ckpt.restore_rng_state(state["rng"])
    draws = (torch.rand(3), np.random.rand(2), random.random())
    ckpt.restore_rng_state(state["rng"])
    assert torch.equal(draws[0], torch.rand(3)) and np.array_equal(draws[1], np.random.rand(2)) and draws[2] == random.random()


def test_keep_last_prunes_older_checkpoints(tmp_path):
    model = _model()
    for step in (1, 2, 3, 4):
        _save(tmp_path, model, step=step, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["step_000003.json", "step_000004.json"]
    assert len(list(tmp_path.glob("*.safetensors"))) == 2 and len(list(tmp_path.glob("*.state.pt"))) == 2
    assert ckpt.find_checkpoint(tmp_path).name == "step_000004.json"


def test_truncated_weights_are_refused(tmp_path):
    path, _ = _save(tmp_path, _model())
    weights = path.with_suffix(".safetensors")
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ckpt.CheckpointError, match=r"step_000005.safetensors: checksum differs.*truncated"):
        ckpt.read_checkpoint_info(path)


def test_corrupt_header_is_refused_even_with_a_matching_checksum(tmp_path):
    path, _ = _save(tmp_path, _model())
    weights = path.with_suffix(".safetensors")
    weights.write_bytes(b"\xff" * 8 + weights.read_bytes()[8:])
    meta = json.loads(path.read_text())
    meta["weights_sha256"] = ckpt._sha256(weights)
    path.write_text(json.dumps(meta))
    info = ckpt.read_checkpoint_info(path)
    with pytest.raises(ckpt.CheckpointError, match="unreadable safetensors file"):
        ckpt.load_weights(_model(), info)


def test_missing_sidecar_bad_json_and_mismatched_keys(tmp_path):
    path, _ = _save(tmp_path, _model())
    weights = path.with_suffix(".safetensors")
    with pytest.raises(ckpt.CheckpointError, match="sidecar step_000005.json is missing"):
        path.rename(tmp_path / "elsewhere.json")
        ckpt.read_checkpoint_info(weights)
    (tmp_path / "elsewhere.json").rename(path)
    with pytest.raises(ckpt.CheckpointError, match="weights do not fit regressor 'tiny'"):
        ckpt.load_weights(_model(width=5), ckpt.read_checkpoint_info(path))
    with pytest.raises(ckpt.CheckpointError, match="unexpected keys"):
        ckpt.load_weights(nn.Sequential(nn.Linear(3, 4)), ckpt.read_checkpoint_info(path))
    path.write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="not a valid JSON sidecar"):
        ckpt.read_checkpoint_info(path)
    empty = tmp_path / "empty-run"
    empty.mkdir()
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        ckpt.find_checkpoint(empty)


def test_damaged_training_state_is_refused_for_resuming(tmp_path):
    path, _ = _save(tmp_path, _model())
    path.with_name("step_000005.state.pt").write_bytes(b"garbage")
    ckpt.read_checkpoint_info(path)  # evaluating needs the weights only
    with pytest.raises(ckpt.CheckpointError, match="state.pt: checksum differs"):
        ckpt.read_checkpoint_info(path, need_state=True)


class _Tied(nn.Module):
    """Two names for one weight (safetensors stores it once)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = self.a


def test_average_checkpoints_is_the_mean_and_refuses_weights_that_do_not_fit(tmp_path):
    torch.manual_seed(0)
    models = [_model() for _ in range(3)]
    for model in models:
        model.train()
        model(torch.randn(8, 3))  # BatchNorm statistics differ between the three
    paths = [_save(tmp_path, model, step=step)[0] for model, step in zip(models, (2, 4, 6))]
    target = _model()
    assert ckpt.average_checkpoints(target, paths) == [2, 4, 6]
    saved = [m.state_dict() for m in models]
    for key, value in target.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, sum(s[key] for s in saved) / 3, atol=1e-6), key
        else:
            assert torch.equal(value, saved[-1][key]), key  # num_batches_tracked: the newest
    with pytest.raises(ckpt.CheckpointError, match=r"step_000002.safetensors: weights do not fit regressor 'tiny'.*missing keys"):
        ckpt.average_checkpoints(_model(width=5), paths)  # other shapes
    with pytest.raises(ckpt.CheckpointError, match="no checkpoints to average"):
        ckpt.average_checkpoints(target, [])
    tied = [_Tied() for _ in range(2)]
    tied_paths = [ckpt.save_checkpoint(tmp_path / "tied", model=m, arch="tied", model_kwargs={}, config={}, optimizer=None,
                                       progress={"step": k, "epoch": 0, "step_in_epoch": k, "sampler_seed": 0, "world_size": 1})
                  for k, m in enumerate(tied, 1)]
    into = _Tied()
    assert ckpt.average_checkpoints(into, tied_paths) == [1, 2]
    assert torch.allclose(into.a.weight, (tied[0].a.weight + tied[1].a.weight) / 2) and into.b is into.a


def test_interrupted_checkpoints_are_resumable_but_not_averaged(tmp_path):
    model = _model()
    paths = [_save(tmp_path, model, step=step, run_id="r", extra={"interrupted": True} if step == 3 else None)[0]
             for step in (2, 3, 4)]
    assert ckpt.run_checkpoints(tmp_path, "r") == paths
    assert ckpt.run_checkpoints(tmp_path, "r", scheduled_only=True) == [paths[0], paths[2]]
    assert ckpt.read_checkpoint_info(paths[1], need_state=True).step == 3
    assert ckpt.run_checkpoints(tmp_path / "nothing", "r") == []


def test_averaged_weights_are_refused_for_resuming_even_with_a_state_file(tmp_path):
    # the first version of train.average_last wrote averaged weights with a state file and no "resumable" key
    path, _ = _save(tmp_path, _model(), step=4, extra={"averaged_steps": [2, 4]})
    with pytest.raises(ckpt.CheckpointError, match=r"not resumable \(weights only, the mean of steps \[2, 4\]\)"):
        ckpt.read_checkpoint_info(path, need_state=True)
    assert ckpt.read_checkpoint_info(path).step == 4  # scoring them is fine
