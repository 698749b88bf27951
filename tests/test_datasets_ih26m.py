"""InterHand2.6M reader on fixtures written in its real layout (numbers constructed here)."""
from __future__ import annotations

import json

import pytest
import torch

from hands.camera import project
from hands.datasets import DatasetError, build_dataset
from hands.datasets.fixtures import write_ih26m_fixture
from hands.datasets.mano_fit import fit_to_camera, fit_to_camera_mesh
from hands.joints import IH26M_TO_OURS


@pytest.fixture(scope="module")
def model():
    from hands.mano import HandModel

    return HandModel()


@pytest.fixture(scope="module")
def fixture(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("ih26m")
    truth = write_ih26m_fixture(root, model, frames=3, cameras=2, null_fit=(2, "right"), invalid_joint=(0, 37))
    return root, truth


def test_samples_match_the_constructed_numbers(fixture, model):
    root, truth = fixture
    dataset = build_dataset("ih26m", root, "test", hand_model=model)
    assert len(dataset) == 6 and not dataset.skipped
    for index, info in enumerate(truth["images"]):
        sample = dataset[index]
        sample.validate()
        frame = truth["frames"][info["frame"]]
        cam = truth["cameras"][info["camera"]]
        R, t = torch.tensor(cam["R"]), torch.tensor(cam["t"])
        assert sample.hand_type == frame["hand_type"]
        assert sample.meta["dataset"] == "ih26m" and sample.meta["id"] == str(info["aid"])
        assert torch.allclose(sample.camera.K, torch.tensor(cam["K"], dtype=torch.float32))
        for side in ("right", "left"):
            hand = sample.hand(side)
            fit = frame["all_fits"][side]
            assert bool(hand.valid) == (fit is not None)
            if fit is None:
                continue
            # joints: world (mm in the file) -> camera metres, IH2.6M order -> ours
            expected = torch.tensor(fit["joints"]) @ R.T + t
            valid = hand.joints_valid
            assert torch.allclose(hand.joints_cam[valid].double(), expected[valid], atol=1e-5)
            assert torch.allclose(hand.joints_img[valid], project(hand.joints_cam[valid], sample.camera.K), atol=1e-3)
            assert torch.allclose(hand.root_cam.double(), expected[0], atol=1e-5)
            x0, y0, x1, y1 = hand.bbox.tolist()
            height, width = sample.image_size
            inside = hand.joints_img[valid]
            inside = inside[(inside[:, 0] >= 0) & (inside[:, 0] <= width - 1) & (inside[:, 1] >= 0) & (inside[:, 1] <= height - 1)]
            assert len(inside) > 0 and x0 >= 0 and y0 >= 0 and x1 <= width - 1 and y1 <= height - 1
            assert (inside[:, 0] >= x0 - 1e-3).all() and (inside[:, 0] <= x1 + 1e-3).all()
            assert (inside[:, 1] >= y0 - 1e-3).all() and (inside[:, 1] <= y1 + 1e-3).all()
            # MANO: mesh equals the world mesh moved into the camera; null fit -> mano_valid False
            if frame["fits"][side] is None:
                assert not bool(hand.mano_valid)
            else:
                assert bool(hand.mano_valid)
                verts_expected = torch.tensor(fit["verts"]) @ R.T + t
                assert torch.allclose(hand.verts_cam.double(), verts_expected, atol=1e-5)
        if sample.right.valid and sample.left.valid:
            assert bool(sample.rel_root_valid)
            assert torch.allclose(sample.rel_root, sample.left.joints_cam[0] - sample.right.joints_cam[0])


def test_joint_validity_is_carried_joint_by_joint(fixture, model):
    root, truth = fixture
    sample = build_dataset("ih26m", root, "test", hand_model=model)[0]
    # IH2.6M joint 37 = left hand's 17th entry (pinky, tip first) -> ours: the left pinky knuckle (17)
    ours = IH26M_TO_OURS.index(37 - 21)
    assert not bool(sample.left.joints_valid[ours])
    assert int(sample.left.joints_valid.sum()) == 20 and bool(sample.right.joints_valid.all())


def test_converted_fit_reproduces_the_annotated_joints(fixture, model):
    """MANO joints of the camera-space fit (pose with the camera's rotation in the root, translation
    corrected for the rotation about the wrist) land on the annotation's 3D joints."""
    root, truth = fixture
    for info in truth["images"]:
        frame = truth["frames"][info["frame"]]
        cam = truth["cameras"][info["camera"]]
        for side, fit in frame["fits"].items():
            if fit is None:
                continue
            pose, shape, trans = (torch.tensor(fit[k], dtype=torch.float32)[None] for k in ("pose", "shape", "trans"))
            R = torch.tensor(cam["R"], dtype=torch.float32)[None]
            t = torch.tensor(cam["t"], dtype=torch.float32)[None]
            pose_cam, trans_cam = fit_to_camera(model, side, pose, shape, trans, R, t)
            joints = model(side, pose_cam, shape, trans_cam).joints[0].double()
            annotated = torch.tensor(fit["joints"]) @ torch.tensor(cam["R"]).T + torch.tensor(cam["t"])
            assert torch.allclose(joints, annotated, atol=2e-5)
            # a wrong correction (camera translation only) misses by centimetres
            naive = model(side, pose_cam, shape, (R @ trans[..., None])[..., 0] + t).joints[0].double()
            assert (naive - annotated).norm(dim=-1).max() > 5e-3
            # the one-forward path gives the same fit
            pose2, trans2, verts2, wrist2 = fit_to_camera_mesh(model, side, pose, shape, trans, R, t)
            assert torch.allclose(trans2, trans_cam, atol=1e-6) and torch.allclose(pose2, pose_cam)
            assert torch.allclose(wrist2[0].double(), annotated[0], atol=2e-5)


def test_human_annotated_subset_and_variants(tmp_path, model):
    variant = tmp_path / "InterHand2.6M_5fps_batch1"
    write_ih26m_fixture(variant, model, frames=2, cameras=2, human_annot_ids=[3, 0, 999], write_images=True)
    dataset = build_dataset("ih26m", tmp_path, "test", variant="5fps", hand_model=model)
    assert dataset.subset == "human_annot"
    assert [r["aid"] for r in dataset.records] == [3, 0]
    assert dataset.skipped["listed id not in annotations"] == 1
    assert len(build_dataset("ih26m", tmp_path, "test", hand_model=model, human_annot=False)) == 4  # variant found
    with pytest.raises(DatasetError, match="InterHand2.6M_30fps_batch1"):
        build_dataset("ih26m", tmp_path, "test", variant="30fps")
    (variant / "aid_human_annot_test.txt").unlink()
    with pytest.raises(DatasetError, match="aid_human_annot_test.txt"):
        build_dataset("ih26m", tmp_path, "test", human_annot=True)


def test_bad_records_are_skipped_and_counted(tmp_path, model, caplog):
    write_ih26m_fixture(tmp_path / "clean", model, frames=1, cameras=1)
    tmp_path = tmp_path / "bad"
    write_ih26m_fixture(tmp_path, model, frames=2, cameras=2)
    data_path = tmp_path / "annotations/test/InterHand2.6M_test_data.json"
    data = json.loads(data_path.read_text())
    data["annotations"][0]["bbox"] = [5.0, 5.0, 0.0, 10.0]  # empty box
    del data["annotations"][1]["hand_type"]  # missing key
    data["annotations"][2]["bbox"] = [500.0, 500.0, 10.0, 10.0]  # outside the image
    data_path.write_text(json.dumps(data))
    mano_path = tmp_path / "annotations/test/InterHand2.6M_test_MANO_NeuralAnnot.json"
    manos = json.loads(mano_path.read_text())
    manos["0"]["1"]["right"]["pose"][5] = float("nan")  # NaN parameter -> both images of frame 1
    mano_path.write_text(json.dumps(manos))
    dataset = build_dataset("ih26m", tmp_path, "test", hand_model=model)
    assert len(dataset) == 0 or all(r["frame"] == "0" for r in dataset.records)
    assert dataset.skipped["bbox empty or outside the image"] == 2
    assert dataset.skipped["annotation: missing key 'hand_type'"] == 1
    assert dataset.skipped["mano pose: NaN or inf"] == 1
    with caplog.at_level("WARNING", logger="hands.datasets"):
        message = dataset.report_skips()
    assert "4 record(s) skipped so far (4 new" in message and message in caplog.text
    assert "(0 new since the last report)" in dataset.report_skips()  # the next epoch's report
    assert build_dataset("ih26m", tmp_path.parent / "clean", "test", hand_model=model).report_skips() is None


def test_undecodable_image_is_replaced_deterministically_and_counted(tmp_path, model):
    truth = write_ih26m_fixture(tmp_path, model, frames=2, cameras=2)
    (tmp_path / "images/test/Capture0/ROM_seq/cam400001/image00000.jpg").write_bytes(b"not a jpeg")
    dataset = build_dataset("ih26m", tmp_path, "test", hand_model=model)
    sample = dataset[1]
    assert sample.meta["id"] == str(truth["images"][2]["aid"]) and sample.meta["substituted_for"] == "1"
    assert dataset.skipped["image does not decode"] == 1
    assert dataset[1].meta["id"] == sample.meta["id"] and dataset.skipped["image does not decode"] == 1


def test_missing_files_name_the_path(tmp_path, model):
    with pytest.raises(DatasetError, match="annotations"):
        build_dataset("ih26m", tmp_path, "test")
    write_ih26m_fixture(tmp_path, model, frames=1, cameras=1)
    (tmp_path / "annotations/test/InterHand2.6M_test_joint_3d.json").unlink()
    with pytest.raises(DatasetError, match="InterHand2.6M_test_joint_3d.json"):
        build_dataset("ih26m", tmp_path, "test")
    with pytest.raises(DatasetError, match="split .val."):
        build_dataset("ih26m", tmp_path, "val")


def test_unknown_dataset_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="hic, ih26m, reih, synthlab"):
        build_dataset("freihand", "/nowhere", "test")
