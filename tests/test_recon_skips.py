"""Skipped records in recon.train / recon.test: counted, reported, never replaced by another sample's data;
an empty split is an error naming the dataset and the commonest reason."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import Subset

from hands.datasets import build_dataset
from hands.datasets.common import SkippedRecord
from recon import test as recon_test
from recon import train as recon_train
from tests.recon_helpers import run_args, write_tiny_synthlab

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def synthlab_root(tmp_path_factory) -> Path:
    return write_tiny_synthlab(tmp_path_factory.mktemp("synthlab_skips"))


@pytest.fixture(scope="module")
def trained(synthlab_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("skips_run") / "run"
    assert recon_train.main(run_args(synthlab_root, out, "--max-steps", "1", "eval.at_end=false")) == 0
    return out


def _copy(root: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "synthlab"
    shutil.copytree(root, copy)
    return copy


def _images(root: Path, split: str) -> list[Path]:
    return sorted((root / "images" / split).rglob("*.jpg"))


def _corrupt_image_of(reader, index: int) -> None:
    """Overwrite the image file of the reader's record ``index`` with bytes that do not decode."""
    original = reader[index].image
    for path in _images(Path(reader.root), reader.split):
        saved = path.read_bytes()
        path.write_bytes(b"not a jpeg")
        probe = build_dataset("synthlab", reader.root, reader.split)
        probe.substitute = False
        if isinstance(probe[index], SkippedRecord):
            return
        path.write_bytes(saved)
    raise AssertionError(f"no image file found for record {index} ({original.shape})")


def test_an_undecodable_test_image_is_counted_and_scored_as_if_the_record_were_absent(synthlab_root, trained, tmp_path):
    from recon.config import from_dict, load_config
    from recon.data import build_test_sets
    from recon.evaluate import evaluate_regressor
    from recon.test import load_regressor
    from hands.mano import HandModel

    root = _copy(synthlab_root, tmp_path)
    reader = build_dataset("synthlab", root, "test-wild")
    _corrupt_image_of(reader, 2)
    model, info = load_regressor(trained)
    cfg = load_config(base=from_dict(info.meta["config"]), flags={"data.root": str(root)})
    hand_model = HandModel()
    test_sets = build_test_sets(cfg, hand_model=hand_model, datasets=["synthlab:test-wild"])
    (spec, dataset), = test_sets.items()
    assert isinstance(dataset[2], SkippedRecord) and dataset[2].reason == "image does not decode"
    skips: dict = {}
    got = evaluate_regressor(model, test_sets, hand_model=hand_model, device=torch.device("cpu"), batch_size=4,
                             skips=skips, progress=False)[spec.key]
    # the reference: the same test set without record 2 (no sample stands in for it)
    without = {spec: Subset(dataset, [0, 1, 3, 4, 5])}
    expected = evaluate_regressor(model, without, hand_model=hand_model, device=torch.device("cpu"), batch_size=4,
                                  progress=False)[spec.key]
    assert got["records_skipped"] == 1 and expected["records_skipped"] == 0
    assert dict(skips[spec.key]) == {"image does not decode": 1}
    for name in ("MPVPE", "RRVE", "MRRPE", "count_MPVPE"):
        assert got[name] == pytest.approx(expected[name], nan_ok=True), name


def test_recon_test_reports_skips_and_refuses_a_test_set_with_nothing_left(synthlab_root, trained, tmp_path, capsys):
    root = _copy(synthlab_root, tmp_path)
    reader = build_dataset("synthlab", root, "test-wild")
    _corrupt_image_of(reader, 0)
    out = tmp_path / "m.json"
    argv = ["--ckpt", str(trained), "--data-root", str(root), "--datasets", "synthlab:test-wild", "--out", str(out)]
    assert recon_test.main(argv) == 0
    assert "synthlab-test-wild: 1 (image does not decode: 1) record(s) skipped, not scored" in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert written["synthlab-test-wild"]["records_skipped"] == 1
    assert written["skips"] == {"test": {"synthlab-test-wild": {"image does not decode": 1}}}
    for path in _images(root, "test-wild"):
        path.write_bytes(b"")
    assert recon_test.main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar's line
    assert error == ("recon.test: error: test dataset synthlab-test-wild: no sample could be evaluated; every record "
                     "was skipped: 6 (image does not decode: 6)")


def test_index_time_skips_are_reported_at_the_start_and_in_metrics_and_an_empty_split_is_refused(
    synthlab_root, tmp_path, capsys
):
    root = _copy(synthlab_root, tmp_path)
    data_json = root / "annotations" / "train-lab" / "InterHand2.6M_train-lab_data.json"
    data = json.loads(data_json.read_text())
    data["images"][0]["width"] = 0  # one bad record: dropped when the index is built
    data_json.write_text(json.dumps(data))
    out = tmp_path / "run"
    assert recon_train.main(run_args(root, out, "--max-steps", "1")) == 0
    printed = capsys.readouterr().out
    assert f"train {root}, split train-lab: 1 (image: width/height not in 1..100000: 1) record(s) skipped when indexing" in printed
    skips = json.loads((out / "metrics.json").read_text())["skips"]
    assert list(skips["train"].values()) == [{"image: width/height not in 1..100000": 1}] and skips["test"] == {}
    # every record bad: one line naming the dataset and the commonest reason, before training
    for image in data["images"]:
        image["width"] = 0
    data_json.write_text(json.dumps(data))
    assert recon_train.main(run_args(root, tmp_path / "empty", "--max-steps", "1")) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("recon.train: error: train dataset synthlab:train-lab (") and "\n" not in error
    assert error.endswith("no usable sample; every record was skipped: 12 (image: width/height not in 1..100000: 12)")
    assert not (tmp_path / "empty" / "checkpoints").exists()


def test_undecodable_training_images_are_replaced_and_counted(synthlab_root, tmp_path, capsys):
    root = _copy(synthlab_root, tmp_path)
    for path in _images(root, "train-lab")[:2]:
        path.write_bytes(b"\x89PNG broken")
    out = tmp_path / "run"
    assert recon_train.main(run_args(root, out, "--max-steps", "3", "--epochs", "1")) == 0
    assert "sample(s) replaced by the next one because their image did not decode" in capsys.readouterr().out
    skips = json.loads((out / "metrics.json").read_text())["skips"]
    assert skips["train_samples_substituted"] == 2  # one epoch reads each of the 12 records once
