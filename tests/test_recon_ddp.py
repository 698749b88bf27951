"""recon.train under torchrun: 2 processes on gloo/CPU; data split between ranks; rank 0 alone writes;
evaluation sums over ranks (equal to a single-process recon.test of the same checkpoint)."""
from __future__ import annotations

import json

import pytest
import torch

from recon import test as recon_test
from recon.data import ResumableSampler, ShardSampler
from tests.recon_helpers import run_args, write_tiny_synthlab


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_samplers_split_the_data_between_ranks_and_resume_inside_an_epoch():
    dataset = list(range(13))
    shares = [
        list(ResumableSampler(dataset, num_replicas=2, rank=rank, seed=5, batch_size=2)) for rank in (0, 1)
    ]
    assert len(shares[0]) == len(shares[1]) == 6 and not set(shares[0]) & set(shares[1])
    sampler = ResumableSampler(dataset, num_replicas=2, rank=1, seed=5, batch_size=2)
    sampler.set_epoch(4)
    whole = list(sampler)
    sampler.set_epoch(4, start_batch=2)
    assert list(sampler) == whole[4:] and len(sampler) == 2
    sampler.set_epoch(5)
    assert list(sampler) != whole  # a new permutation each epoch
    evaluation = [list(ShardSampler(13, num_replicas=2, rank=rank)) for rank in (0, 1)]
    assert sorted(evaluation[0] + evaluation[1]) == list(range(13))  # every test sample once, no padding


def test_torchrun_two_processes(tmp_path):
    root = write_tiny_synthlab(tmp_path / "synthlab")
    out = tmp_path / "ddp"
    # both ranks evaluate the mean of the last two checkpoints (steps 3 and 6) that rank 0 wrote
    argv = run_args(root, out, "--epochs", "2", "--batch-size", "2", "train.image_every=3", "train.ckpt_every=3",
                    "train.average_last=2")
    from tests.recon_helpers import torchrun_two_processes

    result = torchrun_two_processes(argv, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout and result.stdout.count("wall time") == 1  # rank 0 alone prints
    # 12 images / 2 ranks / batch 2 = 3 steps per epoch (a single process would take 6)
    meta = json.loads((out / "checkpoints" / "step_000006.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 6 and (meta["epoch"], meta["step_in_epoch"]) == (2, 0)
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1  # one writer: rank 0's
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics.pop("skips") == {"train": {}, "test": {}}
    assert metrics.pop("weights") == {"step": 6, "averaged_steps": [3, 6], "checkpoint": "averaged/step_000006.json"}
    single = tmp_path / "single.json"
    torch.set_num_threads(1)
    assert recon_test.main(["--ckpt", str(out / "averaged"), "--out", str(single)]) == 0
    again = json.loads(single.read_text())
    for key in metrics:
        assert again[key]["records_skipped"] == metrics[key]["records_skipped"] == 0
        for name in ("count_MPVPE", "count_RRVE", "count_MRRPE"):  # every test sample counted once
            assert again[key][name] == metrics[key][name] > 0, (key, name)
        for name in ("MPVPE", "RRVE", "MRRPE"):  # float32 convolutions differ slightly with the batch size
            assert again[key][name] == pytest.approx(metrics[key][name], rel=1e-3), (key, name)
