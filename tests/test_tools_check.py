"""hands.datasets.check on a tiny synthlab: a good folder, a missing annotation file, a corrupt image."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hands.datasets import check


@pytest.fixture(scope="module")
def synthlab(tmp_path_factory) -> Path:
    from hands.datasets.synthlab import write_synthlab

    sizes = {"train-lab": 3, "test-lab": 2, "train-wild": 0, "test-wild": 0}
    return write_synthlab(tmp_path_factory.mktemp("synthlab"), sizes=sizes, resolution=32, show_progress=False)


@pytest.fixture
def copy(synthlab, tmp_path) -> Path:
    return Path(shutil.copytree(synthlab, tmp_path / "synthlab"))


def test_a_good_folder_passes_with_counts(synthlab, capsys):
    assert check.main(["--name", "synthlab", "--root", str(synthlab)]) == 0
    out = capsys.readouterr().out
    assert "train-lab: ok, 3 records, 0 skipped by the reader, 3 images checked: 0 missing, 0 do not decode" in out
    assert "test-lab: ok, 2 records" in out
    assert "test-wild: ABSENT" in out  # not asked for: reported, not an error
    assert "layout ['v1.0 annotations/{split}']" in out and out.rstrip().endswith("hands.datasets.check: ok")


def test_a_missing_annotation_file_fails_naming_it(copy, capsys):
    missing = copy / "annotations" / "train-lab" / "InterHand2.6M_train-lab_joint_3d.json"
    missing.unlink()
    assert check.main(["--name", "synthlab", "--root", str(copy)]) == 1
    captured = capsys.readouterr()
    assert f"train-lab: ERROR {missing}: expected a file" in captured.out
    assert "FAILED: train-lab" in captured.err


def test_corrupt_and_missing_images_are_counted_and_fail_only_with_strict(copy, capsys):
    images = sorted((copy / "images" / "train-lab").rglob("*.jpg"))
    images[0].write_bytes(images[0].read_bytes()[:40])  # truncated: the header may parse, the pixels do not
    images[1].unlink()
    assert check.main(["--name", "synthlab", "--root", str(copy), "--splits", "train-lab"]) == 0
    out = capsys.readouterr().out
    assert "3 images checked: 1 missing, 1 do not decode" in out
    assert f"does not decode: {images[0]}" in out and f"missing: {images[1]}" in out
    assert check.main(["--name", "synthlab", "--root", str(copy), "--splits", "train-lab", "--strict"]) == 1


def test_an_asked_split_that_is_absent_or_a_missing_root_fails(synthlab, tmp_path, capsys):
    assert check.main(["--name", "synthlab", "--root", str(synthlab), "--splits", "test-wild"]) == 1
    assert check.main(["--name", "ih26m", "--root", str(tmp_path / "nowhere")]) == 1
    assert f"{tmp_path / 'nowhere'}: expected the ih26m dataset folder, found nothing" in capsys.readouterr().err


def test_ih26m_variants_and_subsets_are_described(synthlab, tmp_path):
    root = tmp_path / "ih"
    variant = root / "InterHand2.6M_5fps_batch1"
    shutil.copytree(synthlab / "annotations", variant / "annotations")
    (variant / "annotations" / "test-lab" / "aid_human_annot_test-lab.txt").write_text("0\n")
    info = check.describe_variants("synthlab", root)
    assert info["fps"] == ["5fps"]
    assert info["subsets"]["test-lab"] == "H and H+M"
    assert info["subsets"]["train-lab"].startswith("H+M only")
    (variant / "annotations" / "human_annot").mkdir()
    assert "v0.0 annotations/{all,human_annot,machine_annot}" in check.describe_variants("synthlab", root)["layout"]


def test_the_real_layouts_of_ih26m_reih_and_hic(tmp_path, capsys):
    from hands.datasets.fixtures import write_hic_fixture, write_ih26m_fixture, write_reih_fixture
    from hands.mano import HandModel

    model = HandModel()
    write_ih26m_fixture(tmp_path / "ih26m", model, split="test", human_annot_ids=[0, 1])
    write_reih_fixture(tmp_path / "reih", model)
    write_hic_fixture(tmp_path / "hic", model, count=2, size=(48, 64))
    assert check.main(["--name", "ih26m", "--root", str(tmp_path / "ih26m"), "--splits", "test"]) == 0
    out = capsys.readouterr().out
    assert "'test': 'H and H+M'" in out and "test: ok, 2 records" in out
    assert check.main(["--name", "reih", "--root", str(tmp_path / "reih"), "--cameras", "ego", "--splits", "test"]) == 0
    assert "cameras ['ego', 'mugsy']" in capsys.readouterr().out
    image = sorted((tmp_path / "hic" / "images").iterdir())[0]
    image.unlink()
    assert check.main(["--name", "hic", "--root", str(tmp_path / "hic")]) == 0
    out = capsys.readouterr().out
    assert "test: ok, 2 records" in out and "1 missing" in out and f"missing: {image}" in out
