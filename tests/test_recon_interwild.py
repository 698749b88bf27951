"""InterWild (recon.archs.interwild): output shapes, mirroring, the virtual camera, backbone weights, and an
overfit on 4 rendered samples. Tiny models (reduced-width ResNet-10t backbones, 64 x 48 images)."""
from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import timm
import torch

from hands.camera import apply_affine, bbox_from_points, make_intrinsics, project, scale_bbox
from hands.mano import HandModel
from hands.render import render_hands
from hands.rotation import axis_angle_to_matrix, mirror_axis_angle
from hands.sample import Camera, HandLabels, HandSample, collate
from recon.archs.interwild import InterWild, mirror_hand_params, virtual_depth_scale
from recon.registry import build_regressor

HEIGHT, WIDTH = 64, 48
TINY = dict(
    body_backbone="resnet10t",
    hand_backbone="resnet10t",
    trans_backbone="resnet10t",
    backbone_channels=[8, 16, 32, 64],
    body_input_size=(64, 48),
    hand_input_size=64,
    box_channels=32,
    rotation_channels=32,
    trans_grid_size=16,
    trans_sigma=1.0,
)
MIRROR = torch.tensor([-1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def hand_model() -> HandModel:
    return HandModel()


def _intrinsics() -> torch.Tensor:
    return make_intrinsics((60.0, 60.0), ((WIDTH - 1) / 2, (HEIGHT - 1) / 2))


def _make_batch(hand_model: HandModel, n: int, seed: int = 0):
    """n rendered two-hand samples with consistent MANO, 3D and 2D labels (64 x 48 images)."""
    gen = torch.Generator().manual_seed(seed)
    K = _intrinsics()
    labels, verts = {}, {}
    for side, offset in (("right", (-0.03, -0.06)), ("left", (0.03, 0.06))):
        pose = torch.randn(n, 48, generator=gen) * 0.25
        pose[:, :3] = torch.tensor([math.pi, 0.0, 0.0]) + torch.randn(n, 3, generator=gen) * 0.3  # palm to camera
        shape = torch.randn(n, 10, generator=gen) * 0.5
        out = hand_model(side, pose, shape)
        root = torch.tensor([*offset, 0.7]) + torch.randn(n, 3, generator=gen) * torch.tensor([0.02, 0.02, 0.03])
        shift = root - out.joints[:, 0]
        joints_cam, verts_cam = out.joints + shift[:, None], out.verts + shift[:, None]
        joints_img = project(joints_cam, K)
        labels[side] = [
            HandLabels(
                mano_pose=pose[i],
                mano_shape=shape[i],
                root_cam=root[i],
                verts_cam=verts_cam[i],
                joints_cam=joints_cam[i],
                joints_img=joints_img[i],
                bbox=scale_bbox(bbox_from_points(joints_img[i]), 1.2),
                valid=torch.tensor(True),
                joints_valid=torch.ones(21, dtype=torch.bool),
                joints_trunc=torch.ones(21, dtype=torch.bool),
                mano_valid=torch.tensor(True),
            )
            for i in range(n)
        ]
        verts[side] = verts_cam
    images = render_hands(
        verts["right"], verts["left"], hand_model.faces_for("right"), hand_model.faces_for("left"), K, (HEIGHT, WIDTH)
    ).image
    samples = [
        HandSample(
            image=images[i],
            right=labels["right"][i],
            left=labels["left"][i],
            rel_root=labels["left"][i].root_cam - labels["right"][i].root_cam,
            rel_root_valid=torch.tensor(True),
            camera=Camera(K),
            hand_type="interacting",
            meta={"dataset": "test", "id": str(i), "is_synthetic": False},
        )
        for i in range(n)
    ]
    return collate(samples)


def test_builds_from_registry_and_every_output_has_its_shape(hand_model, caplog):
    model = build_regressor("interwild", **TINY)
    assert isinstance(model, InterWild)
    batch = _make_batch(hand_model, 2)
    with caplog.at_level("WARNING", logger="recon.archs.interwild"):
        out = model(batch)
    assert "body (resnet10t), hand (resnet10t), trans (resnet10t) backbone(s) start from random init" in caplog.text
    out.validate(2)  # verts (2, 778, 3), joints (2, 21, 3), rel_root (2, 3), joints_img, MANO params
    expected = {
        "box_centre": (2, 2, 2),
        "box_size": (2, 2, 2),
        "box_stride": (2,),
        "box_conf": (2, 2),
        "right_box": (2, 4),
        "left_box": (2, 4),
        "crop_affine": (2, 2, 2, 3),
        "joints_hand_grid": (2, 2, 21, 3),
        "joints_proj_hand_grid": (2, 2, 21, 2),
        "right_root_cam": (2, 3),
        "left_root_cam": (2, 3),
        "right_pose_matrix": (2, 16, 3, 3),
        "left_pose_matrix": (2, 16, 3, 3),
    }
    for name, shape in expected.items():
        assert tuple(out.extras[name].shape) == shape, name
    # box grid: 64 x 48 body input -> stride-32 features (2 x 2) -> three x2 deconvolutions
    assert out.extras["box_stride"].tolist() == [WIDTH / 16, HEIGHT / 16]
    # wrist-relative outputs
    assert torch.allclose(out.right_joints[:, 0], torch.zeros(2, 3), atol=1e-6)
    assert torch.allclose(out.left_joints[:, 0], torch.zeros(2, 3), atol=1e-6)
    # position-head depth inside its D bins, confidences are probabilities
    assert (out.extras["joints_hand_grid"][..., 2] >= 0).all() and (out.extras["joints_hand_grid"][..., 2] <= 7).all()
    assert ((out.extras["box_conf"] > 0) & (out.extras["box_conf"] <= 1)).all()
    losses = model.losses(out, batch)
    names = {
        "box_centre_right", "box_size_right", "box_centre_left", "box_size_left", "rel_root", "mano_pose",
        "mano_shape", "joint_cam", "mano_mesh_cam", "joint_img", "mano_joint_img", "joint_proj",
    }  # fmt: skip
    assert set(losses) == names
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())


def test_losses_respect_validity_masks(hand_model):
    model = InterWild(**TINY)
    batch = _make_batch(hand_model, 2)
    out = model(batch)
    for side in ("right", "left"):
        hand = batch.hand(side)
        hand.valid[:] = False
        hand.mano_valid[:] = False
        hand.joints_valid[:] = False
    batch.rel_root_valid[:] = False
    losses = model.losses(out, batch)
    assert all(float(v.detach()) == 0.0 for v in losses.values()), {k: float(v.detach()) for k, v in losses.items()}


def test_mirroring_twice_returns_the_same_params_and_the_mirrored_left_mesh_is_the_right_one(hand_model):
    gen = torch.Generator().manual_seed(1)
    pose = torch.randn(3, 48, generator=gen) * 0.4
    shape = torch.randn(3, 10, generator=gen)
    translation = torch.randn(3, 3, generator=gen)
    left_pose, left_translation = mirror_hand_params(pose, translation)
    back_pose, back_translation = mirror_hand_params(left_pose, left_translation)
    assert torch.equal(back_pose, pose) and torch.equal(back_translation, translation)
    right = hand_model("right", pose, shape)
    left = hand_model("left", left_pose, shape)
    right_verts = right.verts - right.joints[:, :1]
    left_verts = left.verts - left.joints[:, :1]
    assert torch.allclose(left_verts, right_verts * MIRROR, atol=1e-5)
    again = hand_model("right", back_pose, shape)
    assert torch.allclose(again.verts, right.verts, atol=1e-6)


def test_left_hand_path_un_mirrors_what_the_hand_stream_predicts(hand_model):
    """A left-right symmetric image with mirror-symmetric boxes: the mirrored left crop equals the right crop,
    so the hand stream predicts the same right hand twice; after un-mirroring, the left hand must be exactly
    the mirror image of the right one (rotations, mesh, 2D joints and the camera-space wrist)."""
    torch.manual_seed(3)
    model = InterWild(**TINY).eval()
    image = torch.rand(2, 3, HEIGHT, WIDTH)
    image = (image + image.flip(-1)) / 2
    K = _intrinsics().expand(2, 3, 3)
    right_box = torch.tensor([[4.0, 10.0, 20.0, 30.0], [10.0, 30.0, 22.0, 50.0]])
    left_box = torch.stack((WIDTH - 1 - right_box[:, 2], right_box[:, 1], WIDTH - 1 - right_box[:, 0], right_box[:, 3]), -1)
    with torch.no_grad():
        out = model.forward_hands(image, K, torch.stack((right_box, left_box), 1))
    right_rot = axis_angle_to_matrix(out.right_mano_pose.reshape(2, 16, 3))
    left_rot = axis_angle_to_matrix(out.left_mano_pose.reshape(2, 16, 3))
    flip = torch.diag(MIRROR)
    assert torch.allclose(left_rot, flip @ right_rot @ flip, atol=1e-4)
    assert torch.allclose(axis_angle_to_matrix(mirror_axis_angle(out.right_mano_pose).reshape(2, 16, 3)), left_rot, atol=1e-4)
    assert torch.allclose(out.left_mano_shape, out.right_mano_shape, atol=1e-5)
    assert torch.allclose(out.left_verts, out.right_verts * MIRROR, atol=1e-5)
    assert torch.allclose(out.left_joints, out.right_joints * MIRROR, atol=1e-5)
    mirrored_right_img = torch.stack((WIDTH - 1 - out.right_joints_img[..., 0], out.right_joints_img[..., 1]), -1)
    assert torch.allclose(out.left_joints_img, mirrored_right_img, atol=1e-3)
    assert torch.allclose(out.extras["left_root_cam"], out.extras["right_root_cam"] * MIRROR, atol=1e-4)


def test_virtual_camera_gives_the_camera_space_wrist():
    """The virtual focal trick: a wrist expressed in a crop's virtual camera (focal 5000) maps back to the
    camera-space point it came from."""
    model = InterWild(**TINY)
    K = torch.stack((_intrinsics(), make_intrinsics((90.0, 80.0), (20.0, 30.0))))
    crop_boxes = torch.tensor([[[2.0, 8.0, 26.0, 32.0], [20.0, 4.0, 50.0, 34.0]], [[0.0, 0.0, 40.0, 40.0], [5.0, 25.0, 25.0, 45.0]]])
    affine, _ = model.crop_affines(crop_boxes)
    root_cam = torch.tensor([[[-0.05, 0.02, 0.5], [0.06, -0.01, 0.7]], [[0.0, 0.1, 0.4], [-0.1, 0.0, 0.9]]])
    root_crop = apply_affine(project(root_cam, K)[:, :, None], affine)[:, :, 0]  # (2, 2, 2) crop px
    zoom = torch.linalg.det(affine[..., :2]).abs().sqrt()
    real_focal = torch.sqrt(K[:, 0, 0] * K[:, 1, 1])[:, None] * zoom
    tz = root_cam[..., 2] * model.virtual_focal / real_focal
    txy = (root_crop - (model.hand_input_size - 1) / 2) * tz[..., None] / model.virtual_focal
    recovered = model.roots_in_camera(torch.cat((txy, tz[..., None]), -1), affine, K)
    assert torch.allclose(recovered, root_cam, atol=1e-5)
    # InterWild's k for its own numbers: 5000 * 0.6 / 256
    assert virtual_depth_scale(5000.0, 0.6, 256) == pytest.approx(5000 * 0.6 / 256)


def test_backbone_weights_load_into_every_backbone_they_fit(tmp_path):
    from safetensors.torch import save_file

    model = InterWild(**TINY)
    source = timm.create_model("resnet10t", pretrained=False, num_classes=7, channels=(8, 16, 32, 64))
    file = tmp_path / "resnet10t.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(file))
    report = model.load_backbone_weights(str(file))
    assert report == {"body": str(file), "hand": str(file), "trans": str(file)}
    assert model.backbone_sources == report
    for backbone in (model.body_backbone, model.hand_backbone):
        for key, value in backbone.state_dict().items():
            assert torch.equal(value, source.state_dict()[key]), key
    assert torch.equal(model.trans_net.stages[2][0].conv1.weight, source.layer3[0].conv1.weight)
    # a folder with <timm name>.<ext> files works the same
    assert model.load_backbone_weights(str(tmp_path))["body"] == str(file)
    wrong = tmp_path / "other.pth"
    torch.save(timm.create_model("resnet10t", pretrained=False, channels=(4, 8, 16, 32)).state_dict(), wrong)
    with pytest.raises(ValueError, match="fits none of the backbones"):
        model.load_backbone_weights(str(wrong))
    with pytest.raises(ValueError, match="no such file"):
        model.load_backbone_weights(str(tmp_path / "missing.pth"))


def test_bad_arguments_fail_with_one_line():
    with pytest.raises(ValueError, match="unknown timm backbone 'resnet_nope'"):
        InterWild(**{**TINY, "body_backbone": "resnet_nope"})
    with pytest.raises(ValueError, match="trans_grid_size"):
        InterWild(**{**TINY, "trans_grid_size": 12})


@contextmanager
def _one_thread():
    """Tiny models step faster on one thread, and do not busy-wait for a second core shared with others."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_overfitting_four_samples_lowers_the_losses_and_finds_the_boxes(hand_model):
    torch.manual_seed(0)
    batch = _make_batch(hand_model, 4, seed=5)
    model = InterWild(**TINY)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    history = []
    with _one_thread():
        for _ in range(80):
            losses = model.losses(model(batch), batch)
            total = sum(losses.values())
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            history.append({k: float(v.detach()) for k, v in losses.items()})
    first, last = history[0], history[-1]
    assert sum(last.values()) < 0.5 * sum(first.values())
    for name in ("box_centre_right", "box_centre_left", "mano_pose", "joint_cam", "mano_mesh_cam", "rel_root"):
        assert last[name] < first[name], (name, first[name], last[name])
    # box centres (train-mode forward, the overfit batch) within a few pixels of the ground truth
    with torch.no_grad():
        out = model(batch)
    for side in ("right", "left"):
        pred = out.extras[f"{side}_box"]
        centre = (pred[:, :2] + pred[:, 2:]) / 2
        gt_box = batch.hand(side).bbox
        gt_centre = (gt_box[:, :2] + gt_box[:, 2:]) / 2
        error = (centre - gt_centre).norm(dim=-1)
        assert (error < 2.5).all(), (side, error.tolist())  # hands are about 18 x 8 px; a box cell is 3 x 4 px


def test_onnx_export_with_the_whole_image_crops_matches_pytorch(tmp_path):
    """InterWild crops the hands inside the graph (an affine grid) and back-projects its roots with K^-1: the
    export needs opset 20's AffineGrid and a closed-form inverse (ONNX has no matrix inverse)."""
    pytest.importorskip("onnx", reason="ONNX export needs the 'export' extra (onnx)")
    pytest.importorskip("onnxruntime", reason="the comparison needs the 'export' extra (onnxruntime)")
    from types import SimpleNamespace

    from recon import export as recon_export

    torch.manual_seed(0)
    model = InterWild(**TINY).eval()
    info = SimpleNamespace(meta={"config": {"data": {"image_size": [HEIGHT, WIDTH]}}})
    names = recon_export.export_onnx(model, info, tmp_path / "interwild.onnx", batch=1)
    assert names[:5] == ["right_verts", "left_verts", "right_joints", "left_joints", "rel_root"]
    diffs = recon_export.compare_with_onnxruntime(model, info, tmp_path / "interwild.onnx", batch=1)
    assert set(diffs) == set(names) and max(diffs.values()) < 1e-3, diffs
