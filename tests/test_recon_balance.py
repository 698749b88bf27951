"""InterWild's 50/50 sampling of 3D sets vs MSCOCO, and 2D-only samples in the regressors' losses."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils.data import ConcatDataset, Dataset

from recon.balance import SameLength, balance_2d_3d
from recon.data import ResumableSampler, base_readers, set_epoch


class Tagged(Dataset):
    def __init__(self, tag: str, n: int):
        self.tag, self.n = tag, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return (self.tag, index)


def test_same_length_is_interwilds_make_same_len():
    three_d, two_d = Tagged("3d", 7), Tagged("2d", 3)
    data = SameLength([three_d, two_d], seed=1)
    assert len(data) == 14
    assert [data[i] for i in range(7)] == [("3d", i) for i in range(7)]
    # the short part: two whole rounds (0 1 2 0 1 2), then one seeded random index
    assert [data[7 + i][1] for i in range(6)] == [0, 1, 2, 0, 1, 2]
    tail = data[13]
    assert tail[0] == "2d" and 0 <= tail[1] < 3 and data[13] == tail  # repeatable
    with pytest.raises(IndexError):
        data[14]


def test_every_epoch_is_half_3d_half_coco_and_batches_are_balanced_on_average():
    data = balance_2d_3d([Tagged("ih26m", 40), Tagged("reih", 24), Tagged("coco", 100)], ["ih26m", "reih", "coco"], seed=0)
    assert isinstance(data, SameLength) and len(data) == 200
    sampler = ResumableSampler(data, num_replicas=1, rank=0, seed=0, batch_size=8)
    fractions = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        set_epoch(data, epoch)
        indices = list(sampler)
        tags = Counter(data[i][0] for i in indices)
        assert tags["coco"] == 100 and tags["ih26m"] + tags["reih"] == 100  # exactly 50/50 per epoch
        assert tags["ih26m"] >= 40 and tags["reih"] >= 24  # one whole round of the 3D sets, then random draws
        for start in range(0, len(indices), 8):
            batch = [data[i][0] for i in indices[start : start + 8]]
            fractions.append(sum(tag == "coco" for tag in batch) / 8)
    assert sum(fractions) / len(fractions) == pytest.approx(0.5)
    assert sum(0 < f < 1 for f in fractions) > len(fractions) // 2  # shuffled: most batches mix both kinds


def test_no_coco_or_only_coco_keeps_plain_concatenation():
    parts = [Tagged("ih26m", 4), Tagged("reih", 2)]
    assert isinstance(balance_2d_3d(parts, ["ih26m", "reih"], seed=0), ConcatDataset)
    only = Tagged("coco", 3)
    assert balance_2d_3d([only], ["coco"], seed=0) is only
    data = balance_2d_3d([Tagged("ih26m", 4), Tagged("coco", 2)], ["ih26m", "coco"], seed=0)
    assert [r.tag for r in base_readers(data)] == ["ih26m", "coco"]


def _two_d_only(batch):
    for meta in batch.meta:
        meta["joints_3d"] = False
    return batch


def test_interwild_gives_2d_only_samples_no_3d_joint_loss():
    from hands.mano import HandModel
    from recon.archs.interwild import InterWild
    from tests.test_recon_interwild import TINY, _make_batch

    torch.manual_seed(0)
    model = InterWild(**TINY).eval()
    batch = _make_batch(HandModel(), 2)
    with torch.no_grad():
        out = model(batch)
    full = model.losses(out, batch)
    assert float(full["joint_cam"]) > 0
    flat = _two_d_only(_make_batch(HandModel(), 2))
    for side in ("right", "left"):
        flat.hand(side).mano_valid[:] = False
    two_d = model.losses(out, flat)
    moved = _two_d_only(_make_batch(HandModel(), 2))
    for side in ("right", "left"):
        moved.hand(side).mano_valid[:] = False
        moved.hand(side).joints_cam.add_(torch.randn(2, 21, 3))  # not labels: must not matter
    assert float(two_d["joint_cam"]) == 0.0 and float(two_d["mano_mesh_cam"]) == 0.0
    assert float(two_d["joint_img"]) > 0 and float(two_d["joint_proj"]) > 0  # the 2D keypoints still supervise
    assert float(model.losses(out, moved)["joint_img"]) == pytest.approx(float(two_d["joint_img"]))
    assert float(two_d["joint_proj"]) == pytest.approx(float(full["joint_proj"]))
    # hand crops that hold the hands (the random model's own boxes hold at most a joint or two)
    out.extras["crop_affine"] = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(2, 2, 2, 3).clone()
    for side in ("right", "left"):
        flat.hand(side).joints_valid[:, 0] = False  # the wrist unlabelled: the other 2D keypoints still count
        batch.hand(side).joints_valid[:, 0] = False  # a 3D sample without its wrist: no 2.5D target (InterWild)
    assert float(model.losses(out, flat)["joint_proj"]) > 0
    assert float(model.losses(out, batch)["joint_proj"]) == 0.0


def test_baseline_gives_2d_only_samples_no_3d_joint_loss():
    from recon.registry import build_regressor
    from tests.test_recon_interwild import _make_batch
    from hands.mano import HandModel

    torch.manual_seed(0)
    model = build_regressor("baseline", backbone="resnet18", backbone_kwargs={"channels": (8, 16, 32, 64), "stem_width": 8}, hidden_dim=16).eval()
    batch = _make_batch(HandModel(), 2)
    with torch.no_grad():
        out = model(batch)
    assert float(model.losses(out, batch)["joints"]) > 0
    assert float(model.losses(out, _two_d_only(batch))["joints"]) == 0.0


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from hands.datasets.fixtures import write_coco_fixture
    from hands.mano import HandModel
    from tests.recon_helpers import write_tiny_synthlab

    root = tmp_path_factory.mktemp("balance")
    write_coco_fixture(root / "coco", HandModel())
    write_tiny_synthlab(root / "synthlab")
    return root


def test_mixing_labels_can_name_the_coco_reader(data_root):
    from hands.datasets import build_dataset
    from hands.mano import HandModel
    from mixing.build import build_label_source
    from mixing.config import MixingConfig

    model = HandModel()
    readers = [build_dataset("synthlab", data_root / "synthlab", "train-lab", hand_model=model),
               build_dataset("coco", data_root / "coco", "train", hand_model=model)]
    source = build_label_source(MixingConfig(labels="coco"), hand_model=model, train_readers=readers)
    batch = source.draw(3, torch.Generator().manual_seed(0))
    assert {m["dataset"] for m in batch.meta} == {"coco"}
    assert bool((batch.right.mano_valid | batch.left.mano_valid).all())
    assert build_label_source(MixingConfig(labels="train"), hand_model=model, train_readers=readers).dataset is readers[0]
    with pytest.raises(ValueError, match="mixing.labels=ih26m: no training reader of that name"):
        build_label_source(MixingConfig(labels="ih26m"), hand_model=model, train_readers=readers)
    with pytest.raises(ValueError, match="mixing.labels='nope'"):
        MixingConfig(labels="nope").check()


def test_recon_train_samples_synthlab_and_coco_half_and_half(data_root, tmp_path, capsys):
    from recon import train as recon_train
    from tests.recon_helpers import TINY

    argv = ["--data-root", str(data_root), "--datasets", "synthlab,coco", "--out", str(tmp_path / "run"),
            "--batch-size", "4", "--max-steps", "2", "--seed", "0", *TINY]
    assert recon_train.main(argv) == 0
    out = capsys.readouterr().out
    assert "6 steps/epoch" in out  # 2 x max(12 synthlab, 4 coco) samples / batch 4
    assert "synthlab-test-lab" in out and "coco" not in out.split("| Method")[-1]  # coco has no test split
