"""3D validity (``joints_valid``, InterWild's joint_valid) and 2D truncation validity (``joints_trunc``, its
joint_trunc) as separate masks: IH2.6M fixtures in the real layout, the transforms, and the InterWild losses."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hands.camera import bbox_crop_affine, scale_bbox, square_bbox
from hands.datasets import build_dataset
from hands.datasets.fixtures import write_ih26m_fixture
from hands.datasets.transforms import warp
from hands.joints import IH26M_TO_OURS
from hands.sample import collate


@pytest.fixture(scope="module")
def model():
    from hands.mano import HandModel

    return HandModel()


def _annotations(root):
    return root / "annotations" / "test"


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _unflag(flags: list, index: int) -> None:
    flags[index] = [0] if isinstance(flags[index], list) else 0  # IH2.6M writes (42, 1) or (42,)


def test_ih26m_3d_and_2d_flags_are_separate_masks(model, tmp_path):
    """joint_3d's joint_valid -> joints_valid (3D); the annotation's joint_valid -> joints_trunc (2D): a joint
    valid in 3D only is a 3D label and not a 2D one; a joint flagged in 2D only has no projection, so neither."""
    write_ih26m_fixture(tmp_path, model, frames=1, cameras=1, size=(96, 128))
    only_3d, only_2d = 3, 25  # IH2.6M indices: a right-hand joint, a left-hand joint (neither is a wrist)
    _edit_json(_annotations(tmp_path) / "InterHand2.6M_test_data.json", lambda d: _unflag(d["annotations"][0]["joint_valid"], only_3d))
    _edit_json(_annotations(tmp_path) / "InterHand2.6M_test_joint_3d.json", lambda d: _unflag(d["0"]["0"]["joint_valid"], only_2d))
    sample = build_dataset("ih26m", tmp_path, "test", hand_model=model)[0]
    right_joint, left_joint = IH26M_TO_OURS.index(only_3d), IH26M_TO_OURS.index(only_2d - 21)
    assert bool(sample.right.joints_valid[right_joint]) and not bool(sample.right.joints_trunc[right_joint])
    assert not bool(sample.left.joints_valid[left_joint]) and not bool(sample.left.joints_trunc[left_joint])
    assert int(sample.right.joints_valid.sum()) == 21 and int(sample.right.joints_trunc.sum()) == 20
    assert int(sample.left.joints_valid.sum()) == 20 and int(sample.left.joints_trunc.sum()) == 20
    # the 3D-only joint's 2D position is still its projection (joints_img covers every 3D-valid joint)
    K = sample.camera.K
    uvw = sample.right.joints_cam[right_joint] @ K.T
    assert torch.allclose(sample.right.joints_img[right_joint], uvw[:2] / uvw[2], atol=1e-3)


def _shift_left_hand(root, truth, outside: float) -> None:
    """Move frame 0's left hand (joints and MANO fit, world space) along the camera's x axis until its
    leftmost projected joint lies ``outside`` x its projected width beyond the image's right edge."""
    camera = truth["cameras"][0]
    R, t, K = camera["R"], camera["t"], camera["K"]
    width = 2 * K[0, 2] + 1  # the fixture's principal point is the image centre
    joints_world = truth["frames"][0]["joints_ih"][21:]  # metres

    def projected_u(dx):
        cam = joints_world @ R.T + t + np.array([dx, 0.0, 0.0])
        return cam[:, 0] / cam[:, 2] * K[0, 0] + K[0, 2]

    lo, hi = 0.0, 2.0
    for _ in range(60):  # bisection: the hand moves right with dx
        mid = (lo + hi) / 2
        u = projected_u(mid)
        lo, hi = (mid, hi) if u.min() < width - 0.5 + outside * (u.max() - u.min()) else (lo, mid)
    shift_world = R.T @ np.array([(lo + hi) / 2, 0.0, 0.0])  # metres

    def edit_joints(d):
        coords = np.array(d["0"]["0"]["world_coord"], dtype=float)
        coords[21:] += shift_world * 1000.0  # world_coord is in mm
        d["0"]["0"]["world_coord"] = coords.tolist()

    def edit_fit(d):
        d["0"]["0"]["left"]["trans"] = (np.array(d["0"]["0"]["left"]["trans"]) + shift_world).tolist()

    _edit_json(_annotations(root) / "InterHand2.6M_test_joint_3d.json", edit_joints)
    _edit_json(_annotations(root) / "InterHand2.6M_test_MANO_NeuralAnnot.json", edit_fit)


def test_ih26m_hand_just_outside_the_image_is_valid_in_3d_and_truncated_in_2d(model, tmp_path):
    """InterWild's loader keeps a hand whose 2D-flagged joints all lie outside the image when their x1.2 box
    (get_bbox) still reaches in (sanitize_bbox): valid in 3D, with its mesh, every joint truncated in 2D."""
    height, width = 96, 128
    near, far = tmp_path / "near", tmp_path / "far"
    # the x1.2 box reaches 10 % of the joints' extent beyond them: 3 % outside is kept, 20 % outside is not
    for root, outside in ((near, 0.03), (far, 0.2)):
        truth = write_ih26m_fixture(root, model, frames=1, cameras=1, size=(height, width))
        _shift_left_hand(root, truth, outside)
    dataset = build_dataset("ih26m", near, "test", hand_model=model)
    assert len(dataset) == 1 and not dataset.skipped
    sample = dataset[0]
    left = sample.left
    assert float(left.joints_img[:, 0].min()) > width - 0.5  # every joint outside the image
    assert bool(left.valid) and bool(left.mano_valid)
    assert bool(left.joints_valid.all()) and not bool(left.joints_trunc.any())
    x0, y0, x1, y1 = left.bbox.tolist()
    assert 0 <= x0 < x1 <= width - 1 and x1 - x0 >= 1 and 0 <= y0 < y1 <= height - 1
    assert sample.hand_type == "interacting" and bool(sample.rel_root_valid)
    # its mesh is the shifted fit's: the regressed wrist of the mesh sits at the annotated wrist
    assert torch.allclose(model.regress_joints("left", left.verts_cam)[0], left.joints_cam[0], atol=2e-3)

    # further out the x1.2 box misses the image: the hand is absent (InterWild: sanitize_bbox -> None)
    sample = build_dataset("ih26m", far, "test", hand_model=model)[0]
    assert not bool(sample.left.valid) and not bool(sample.left.joints_valid.any()) and not bool(sample.left.mano_valid)
    assert bool(sample.right.valid)


def test_warp_truncates_in_2d_and_keeps_3d(model, tmp_path):
    """A warp that pushes part of a hand out of the image truncates those joints in 2D; they stay valid in 3D,
    and a truncated joint stays truncated when a later warp brings its position back into the image."""
    write_ih26m_fixture(tmp_path, model, frames=1, cameras=1, size=(96, 128))
    sample = build_dataset("ih26m", tmp_path, "test", hand_model=model)[0]
    right = sample.right
    assert bool(right.joints_trunc.all()) and bool(right.joints_valid.all())
    x_mid = float(right.joints_img[:, 0].median())
    shift = torch.tensor([[1.0, 0.0, -x_mid], [0.0, 1.0, 0.0]])  # x -> x - x_mid, same size
    out = warp(sample, shift, (96, 128))
    expected = right.joints_img[:, 0] - x_mid >= -0.5
    assert torch.equal(out.right.joints_trunc, expected) and 0 < int(expected.sum()) < 21
    assert bool(out.right.joints_valid.all())
    back = warp(out, torch.tensor([[1.0, 0.0, x_mid], [0.0, 1.0, 0.0]]), (96, 128))
    assert torch.allclose(back.right.joints_img, right.joints_img, atol=1e-3)
    assert torch.equal(back.right.joints_trunc, expected)  # the cut-off joints are padding there, not pixels


def test_interwild_2d_terms_use_joints_trunc_and_3d_terms_joints_valid(model):
    """A joint truncated in 2D (joints_trunc False, joints_valid True): its joint_img / joint_proj targets are
    ignored, its joint_cam target is not."""
    from recon.archs.interwild import InterWild
    from tests.recon_helpers import rendered_two_hand_samples

    torch.manual_seed(0)
    net = InterWild(
        body_backbone="resnet10t", hand_backbone="resnet10t", trans_backbone="resnet10t", backbone_channels=[8, 16, 32, 64],
        body_input_size=(64, 64), hand_input_size=64, box_channels=32, rotation_channels=32, trans_grid_size=16, trans_sigma=1.0,
    ).eval()
    batch = collate(rendered_two_hand_samples(model, 2, size=64))
    assert bool(batch.right.joints_trunc.all())
    with torch.no_grad():
        out = net(batch)
        # the untrained box net's crops may miss the hands: crop both at their ground-truth boxes (x2, square)
        boxes = [scale_bbox(square_bbox(batch.hand(side).bbox), 2.0) for side in ("right", "left")]
        out.extras["crop_affine"] = torch.stack([bbox_crop_affine(box, (64, 64)) for box in boxes], 1)
        base = net.losses(out, batch)
        moved = collate(rendered_two_hand_samples(model, 2, size=64))
        moved.right.joints_img[:, 5:10] += 7.0  # 2D targets of five joints moved (still inside the image)
        moved.right.joints_cam[:, 5:10] += 0.01  # and their 3D targets
        changed = net.losses(out, moved)
        moved.right.joints_trunc[:, 5:10] = False  # now truncated in 2D, still valid in 3D
        truncated = net.losses(out, moved)
        reference = collate(rendered_two_hand_samples(model, 2, size=64))
        reference.right.joints_trunc[:, 5:10] = False
        masked = net.losses(out, reference)
    for term in ("joint_img", "joint_proj"):
        assert float(changed[term]) != pytest.approx(float(base[term]), rel=1e-4), term
        assert float(truncated[term]) == pytest.approx(float(masked[term]), rel=1e-6), term  # the moved targets are ignored
    assert float(truncated["joint_cam"]) == pytest.approx(float(changed["joint_cam"]), rel=1e-6)  # 3D kept
    assert float(truncated["joint_cam"]) != pytest.approx(float(base["joint_cam"]), rel=1e-4)
