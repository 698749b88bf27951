"""ReInterHand and HIC readers on fixtures written in their real layouts."""
from __future__ import annotations

import json

import pytest
import torch

from hands.datasets import DatasetError, build_dataset
from hands.datasets.common import project_points
from hands.datasets.fixtures import REIH_TEST_CAPTURE, REIH_TRAIN_CAPTURE, write_hic_fixture, write_reih_fixture
from hands.datasets.hic import HIC_FOCAL, HIC_PRINCPT
from hands.datasets.reih import REIH_TO_OURS


@pytest.fixture(scope="module")
def model():
    from hands.mano import HandModel

    return HandModel()


@pytest.fixture(scope="module")
def reih(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("reih")
    return root, write_reih_fixture(root, model)


def test_reih_joint_map_drops_thumb0_pinky0_and_the_forearm_stub():
    assert len(REIH_TO_OURS) == 21 and len(set(REIH_TO_OURS)) == 21
    assert not {1, 18, 23} & set(REIH_TO_OURS)
    assert REIH_TO_OURS[0] == 0 and REIH_TO_OURS[1:5] == (2, 3, 4, 5) and REIH_TO_OURS[17:] == (19, 20, 21, 22)


def test_reih_split_by_capture_and_labels(reih, model):
    root, truth = reih
    test = build_dataset("reih", root, "test", hand_model=model)
    train = build_dataset("reih", root, "train", hand_model=model)
    assert {r["capture"] for r in test.records} == {REIH_TEST_CAPTURE}
    assert {r["capture"] for r in train.records} == {REIH_TRAIN_CAPTURE}
    assert len(test) == 4 and len(train) == 4  # 2 cameras x 2 frames (5 fps: frames found as images)
    for index in range(len(test)):
        sample = test[index]
        sample.validate()
        record = test.records[index]
        cam = truth[REIH_TEST_CAPTURE]["cameras"][record["camera"]]
        R, t = torch.tensor(cam["R"]), torch.tensor(cam["t_m"])
        assert sample.hand_type == "interacting" and bool(sample.rel_root_valid)
        for side in ("right", "left"):
            fit = truth[REIH_TEST_CAPTURE]["frames"][record["frame"]][side]
            hand = sample.hand(side)
            expected = torch.tensor(fit["joints"]) @ R.T + t
            assert torch.allclose(hand.joints_cam.double(), expected, atol=1e-5)
            assert bool(hand.mano_valid)
            assert torch.allclose(hand.verts_cam.double(), torch.tensor(fit["verts"]) @ R.T + t, atol=1e-5)
        expected_rel = sample.left.joints_cam[0] - sample.right.joints_cam[0]  # keypoint wrists
        assert torch.allclose(sample.rel_root, expected_rel)


def test_reih_egocentric_keeps_fisheye_coefficients(reih, model):
    root, truth = reih
    dataset = build_dataset("reih", root, "test", cameras="ego", hand_model=model)
    assert len(dataset) == 2
    sample = dataset[0]
    ego = truth[REIH_TEST_CAPTURE]["ego"][0]
    assert torch.allclose(sample.camera.dist, torch.tensor(ego["D"], dtype=torch.float32))
    assert bool(sample.camera.is_fisheye)
    hand = sample.right
    # joints_img use the fisheye model, which differs from the pinhole projection
    fisheye = project_points(hand.joints_cam, sample.camera.K, sample.camera.dist)
    assert torch.allclose(hand.joints_img, fisheye, atol=1e-3)
    pinhole = project_points(hand.joints_cam, sample.camera.K)
    assert (pinhole - fisheye).abs().max() > 1e-2


def test_reih_bad_records_and_missing_files(tmp_path, model):
    write_reih_fixture(tmp_path, model, captures=(REIH_TEST_CAPTURE,), ego=False)
    capture = tmp_path / REIH_TEST_CAPTURE
    (capture / "orig_fits/left/Keypoints/keypoint-000006.json").write_text(json.dumps([[0.0, 0.0]] * 24))
    dataset = build_dataset("reih", tmp_path, "test", hand_model=model)
    assert len(dataset) == 2 and dataset.skipped["keypoints: wrong size"] == 2
    (capture / "Mugsy_cameras/cam_params.json").unlink()
    with pytest.raises(DatasetError, match="cam_params.json"):
        build_dataset("reih", tmp_path, "test", hand_model=model)
    with pytest.raises(DatasetError, match="no train capture"):
        build_dataset("reih", tmp_path, "train", hand_model=model)
    with pytest.raises(DatasetError, match="capture folders"):
        build_dataset("reih", tmp_path / REIH_TEST_CAPTURE / "orig_fits", "test")


def test_hic_meshes_joints_and_hand_types(tmp_path, model):
    truth = write_hic_fixture(tmp_path, model, count=3)
    dataset = build_dataset("hic", tmp_path, "test", hand_model=model)
    assert len(dataset) == 3
    K = torch.tensor([[HIC_FOCAL[0], 0, HIC_PRINCPT[0]], [0, HIC_FOCAL[1], HIC_PRINCPT[1]], [0, 0, 1.0]])
    for index in range(3):
        sample = dataset[index]
        sample.validate()
        assert sample.hand_type == truth["hand_type"][index]
        assert torch.allclose(sample.camera.K, K)
        for side in ("right", "left"):
            verts = truth["meshes"][index][side]
            hand = sample.hand(side)
            assert bool(hand.valid) == (verts is not None)
            assert not bool(hand.mano_valid)  # HIC gives meshes, not MANO parameters
            if verts is None:
                continue
            assert torch.allclose(hand.verts_cam.double(), torch.tensor(verts), atol=1e-6)
            # joints: the model's regressor + tips applied to the mesh, our order
            regressed = (model.j_regressor_for(side).double() @ torch.tensor(verts))[0]
            assert torch.allclose(hand.joints_cam[0].double(), regressed, atol=1e-5)
            assert torch.allclose(hand.joints_cam[4].double(), torch.tensor(verts[int(model.tip_verts[0])]), atol=1e-6)
        assert bool(sample.rel_root_valid) == (sample.hand_type == "interacting")


def test_hic_bad_records_and_split(tmp_path, model):
    write_hic_fixture(tmp_path, model, count=3)
    data = json.loads((tmp_path / "HIC.json").read_text())
    data["annotations"][0]["right_mano_path"] = "meshes/missing.ply"
    data["annotations"][1]["hand_type"] = "both"
    (tmp_path / "HIC.json").write_text(json.dumps(data))
    dataset = build_dataset("hic", tmp_path, "test", hand_model=model)
    assert len(dataset) == 1
    assert dataset.skipped == {"mesh file missing": 1, "annotation: hand_type not right/left/interacting": 1}
    (tmp_path / "meshes/0002_left.ply").write_text("ply\nformat ascii 1.0\nelement vertex 3\n")
    dataset = build_dataset("hic", tmp_path, "test", hand_model=model)
    with pytest.raises(DatasetError, match="no sample could be loaded"):
        dataset[0]
    assert dataset.skipped["mesh file does not load"] + dataset.skipped["mesh: not 778 vertices"] == 1
    with pytest.raises(ValueError, match="only the 'test' split"):
        build_dataset("hic", tmp_path, "train")


def test_truncation_ratios_that_are_not_finite_numbers_are_skipped_not_crashes():
    """Found by the fuzz test: an integer beyond float range made np.isfinite raise TypeError."""
    from hands.datasets.reih import _finite_number

    assert _finite_number(0.5) and _finite_number(-9_223_372_036_854_775_809)
    assert not any(_finite_number(v) for v in (10**400, float("nan"), float("inf"), True, "0.5", None))


def test_hic_image_entries_without_an_integer_id_are_counted(tmp_path, model):
    write_hic_fixture(tmp_path, model, count=3)
    data = json.loads((tmp_path / "HIC.json").read_text())
    data["images"][0]["id"] = "zero"
    data["images"].append("not an object")
    (tmp_path / "HIC.json").write_text(json.dumps(data))
    dataset = build_dataset("hic", tmp_path, "test", hand_model=model)
    assert len(dataset) == 2
    assert dataset.skipped == {
        "image entry: id not an integer": 1,
        "image entry: not an object": 1,
        "annotation: image_id not among the images": 1,
    }
