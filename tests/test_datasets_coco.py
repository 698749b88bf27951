"""The MSCOCO reader (COCO-WholeBody hands + NeuralAnnot MANO fits) on a fixture in InterWild's layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hands.camera import make_intrinsics, project
from hands.datasets import DatasetError, build_dataset
from hands.datasets.check import main as check_main
from hands.datasets.coco import body_box, sanitize_box
from hands.datasets.fixtures import write_coco_fixture
from hands.sample import collate


@pytest.fixture(scope="module")
def model():
    from hands.mano import HandModel

    return HandModel()


@pytest.fixture(scope="module")
def coco(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("coco")
    return root, write_coco_fixture(root, model)


def test_interwild_box_rules():
    # sanitize_bbox: x2 = min(W - 1, x1 + max(0, w - 1)); an empty or outside box is None
    assert np.allclose(sanitize_box([-3, 2, 10, 5], 80, 60), [0, 2, 9, 4])
    assert np.allclose(sanitize_box([75, 50, 20, 20], 80, 60), [75, 50, 4, 9])
    assert sanitize_box([90, 2, 5, 5], 80, 60) is None and sanitize_box([2, 2, 0, 5], 80, 60) is None
    # process_bbox for 512x384: W:H = 3:4 about the centre, x1.25
    box = body_box([10, 10, 30, 20], 200, 200)
    w, h = box[2] - box[0], box[3] - box[1]
    assert w / h == pytest.approx(0.75) and w == pytest.approx(29 * 1.25)
    assert (box[:2] + box[2:]) / 2 == pytest.approx([10 + 29 / 2, 10 + 19 / 2])


def test_records_kept_and_skips_counted_by_reason(coco, model):
    root, truth = coco
    train = build_dataset("coco", root, "train", hand_model=model)
    assert [r["aid"] for r in train.records] == sorted(truth["train"])
    reasons = list(train.skipped.elements())
    for aid, reason in truth["skipped_train"].items():
        assert any(reason in r for r in reasons), (aid, reason, reasons)
    assert sum(1 for r in reasons if not r.startswith("fit dropped")) == len(truth["skipped_train"])
    assert train.skipped["fit dropped: fit pose: wrong size"] == 1  # aid 22's broken right fit
    message = train.report_skips(log=lambda m: None)
    assert "coco" in message and "neither hand valid" in message


def test_labels_match_the_annotations_and_fits(coco, model):
    root, truth = coco
    train = build_dataset("coco", root, "train", hand_model=model)
    for index, record in enumerate(train.records):
        expected = truth["train"][record["aid"]]
        sample = train[index]
        sample.validate()
        assert sample.meta["id"] == str(record["aid"]) and sample.meta["joints_3d"] is False
        assert not bool(sample.rel_root_valid)
        assert tuple(sample.image.shape) == (3, *expected["size"])
        for side in ("right", "left"):
            hand, kpts = sample.hand(side), expected["kpts"][side]
            valid = kpts[:, 2] > 0
            assert torch.equal(hand.joints_valid, torch.from_numpy(valid))
            assert torch.allclose(hand.joints_img[valid], torch.tensor(kpts[valid, :2], dtype=torch.float32), atol=1e-4)
            box = expected["boxes"][side]
            if box is None and bool(valid.any()):  # aid 31's left: the keypoints' box x1.2, inside the image
                inside = valid & (kpts[:, 0] >= 0) & (kpts[:, 0] <= 79) & (kpts[:, 1] >= 0) & (kpts[:, 1] <= 59)
                lo, hi = kpts[inside, :2].min(0), kpts[inside, :2].max(0)
                centre, half = (lo + hi) / 2, (hi - lo) / 2 * 1.2
                derived = np.clip(np.concatenate([centre - half, centre + half]), 0, [79, 59, 79, 59])
                assert torch.allclose(hand.bbox, torch.tensor(derived, dtype=torch.float32), atol=1e-3)
            elif box is None:
                assert torch.equal(hand.bbox, torch.zeros(4)) and not bool(hand.valid)
            else:
                assert torch.allclose(hand.bbox, torch.tensor(box, dtype=torch.float32), atol=1e-4)
            fit = expected["fits"][side]
            assert bool(hand.mano_valid) == (fit is not None)
            assert bool(hand.valid) == (box is not None or bool(valid.any()) or fit is not None)
            if bool(hand.valid):
                assert bool((hand.bbox[2:] > hand.bbox[:2]).all())
            if fit is None:
                continue
            if record["aid"] != 31:  # aid 31's right fit is written in a world frame (cam_param R, t)
                assert torch.allclose(hand.mano_pose.double(), torch.from_numpy(fit["pose"]), atol=1e-5)
            assert torch.allclose(hand.mano_shape.double(), torch.from_numpy(fit["shape"]), atol=1e-5)
            # the mesh projects through the sample's K where it projected through the fit's own camera
            own = make_intrinsics(fit["focal"], fit["princpt"])
            truth_uv = project(torch.tensor(fit["verts"], dtype=torch.float32)[None], own[None])[0]
            uv = project(hand.verts_cam[None], sample.camera.K[None])[0]
            if torch.allclose(own, sample.camera.K):  # the same mesh, R and t applied where given
                assert torch.allclose(hand.verts_cam.double(), torch.from_numpy(fit["verts"]), atol=1e-4)
            else:  # aid 11's left hand: another virtual camera; wrist exact, the rest within half a pixel
                assert torch.allclose(hand.root_cam.double(), torch.from_numpy(fit["joints"][0]), atol=1e-5) is False
                wrist_uv = project(hand.root_cam[None, None], sample.camera.K[None])[0, 0]
                wrist_truth = project(torch.tensor(fit["joints"][:1], dtype=torch.float32)[None], own[None])[0, 0]
                assert torch.allclose(wrist_uv, wrist_truth, atol=1e-3)
                assert (uv - truth_uv).norm(dim=-1).max() < 0.5
    assert train[train.records.index(next(r for r in train.records if r["aid"] == 11))].hand_type == "interacting"


def test_one_person_filter_and_val_split(coco, model):
    root, truth = coco
    single = build_dataset("coco", root, "train", hand_model=model, one_person=True)
    kept = [r["aid"] for r in single.records]
    assert kept == [aid for aid in sorted(truth["train"]) if truth["persons"][truth["train"][aid]["image_id"]] == 1]
    assert single.skipped["more than one person in the image (one_person)"] >= 2  # aids 21, 22 (+ image 4)
    fitted = build_dataset("coco", root, "train", hand_model=model, one_person=True, require_fit=True)
    assert [r["aid"] for r in fitted.records] == [11, 31]  # both have a fit; 21 and 22 have none
    assert [r["aid"] for r in build_dataset("coco", root, "train", hand_model=model, require_fit=True).records] == [11, 31]
    assert build_dataset("coco", root, "train", hand_model=model, require_fit=True).skipped["no MANO fit (require_fit)"] == 2
    val = build_dataset("coco", root, "val", hand_model=model)
    assert [r["aid"] for r in val.records] == [91]
    sample = val[0]
    assert bool(sample.right.valid) and bool(sample.left.valid)
    assert not bool(sample.right.mano_valid) and not bool(sample.left.mano_valid)
    labels = val.load_labels(0)
    assert float(labels.image.abs().sum()) == 0.0 and tuple(labels.image.shape[1:]) == truth["val"][91]["size"]


def test_batches_mark_2d_only_samples(coco, model):
    root, _ = coco
    train = build_dataset("coco", root, "train", hand_model=model)
    batch = collate([train[0], train[1]])
    assert batch.joints_3d.tolist() == [False, False]
    batch.meta[1] = {k: v for k, v in batch.meta[1].items() if k != "joints_3d"}
    assert batch.joints_3d.tolist() == [False, True]


def test_missing_files_name_the_path(tmp_path, coco, model):
    root, _ = coco
    with pytest.raises(DatasetError, match="coco_wholebody_train_v1.0.json"):
        build_dataset("coco", tmp_path, "train", hand_model=model)
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    (copy / "images" / "train2017" / "000000000001.jpg").write_bytes(b"not a jpeg")
    train = build_dataset("coco", copy, "train", hand_model=model)
    sample = train[0]  # an image that does not decode is skipped at load time and counted
    assert sample.meta["substituted_for"] == "11" and train.skipped["image does not decode"] == 1
    (copy / "annotations" / "MSCOCO_train_MANO_NeuralAnnot.json").unlink()
    with pytest.raises(DatasetError, match="MSCOCO_train_MANO_NeuralAnnot.json"):
        build_dataset("coco", copy, "train", hand_model=model)
    assert len(build_dataset("coco", copy, "val", hand_model=model)) == 1  # val never reads the fits
    with pytest.raises(ValueError, match="split"):
        build_dataset("coco", copy, "test", hand_model=model)


def test_check_cli(coco, capsys):
    root, _ = coco
    assert check_main(["--name", "coco", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "train: ok, 4 records" in out and "val: ok, 1 records" in out
    assert "skipped: neither hand valid (InterWild's filter): 1" in out
    assert check_main(["--name", "coco", "--root", str(root), "--one-person", "--splits", "train"]) == 0
    assert "train: ok, 2 records" in capsys.readouterr().out
    (root / "annotations" / "coco_wholebody_val_v1.0.json").rename(root / "val.json")
    try:
        assert check_main(["--name", "coco", "--root", str(root), "--splits", "val"]) == 1
        assert "val: ABSENT no annotations/coco_wholebody_val_v1.0.json" in capsys.readouterr().out
    finally:
        (root / "val.json").rename(root / "annotations" / "coco_wholebody_val_v1.0.json")


def test_interwild_augment_crops_the_person_box(coco, model):
    from hands.datasets.transforms import InterWildAugment

    root, _ = coco
    sample = build_dataset("coco", root, "train", hand_model=model)[0]
    body = sample.meta["body_bbox"]
    augment = InterWildAugment((64, 48), box="image")
    params = {"scale": 1.0, "rotation_deg": 0.0, "color": torch.ones(3), "flip": False}
    out = augment.apply(sample, params)
    # the person box (already 3:4) fills the 48x64 output; a hand box moves with it
    assert torch.allclose(out.meta["body_bbox"], torch.tensor([0.0, 0.0, 47.0, 63.0]), atol=0.6)
    s = 48 / float(body[2] - body[0])
    expected = (sample.right.bbox - body[[0, 1, 0, 1]]) * s
    assert torch.allclose(out.right.bbox, expected, atol=0.6)
    flipped = augment.apply(sample, dict(params, flip=True))
    assert torch.allclose(flipped.left.bbox[[1, 3]], out.right.bbox[[1, 3]], atol=1e-4)
