"""InterWild run as its reference runs it: the whole image in every profile and at test time (no ground-truth
box is read), joints regressed from the mesh. Tiny models on a tiny synthlab (64 px)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from recon.config import CONFIG_DIR, load_config
from tests.recon_helpers import write_tiny_synthlab

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY_MODEL = [
    "model.body_backbone=resnet10t",
    "model.hand_backbone=resnet10t",
    "model.trans_backbone=resnet10t",
    "model.backbone_channels=[8,16,32,64]",
    "model.body_input_size=[64,48]",
    "model.hand_input_size=64",
    "model.box_channels=32",
    "model.rotation_channels=32",
    "model.trans_grid_size=16",
    "model.trans_sigma=1.0",
    "data.image_size=[64,48]",
]


@pytest.fixture(scope="module")
def synthlab_root(tmp_path_factory) -> Path:
    return write_tiny_synthlab(tmp_path_factory.mktemp("synthlab"))


@pytest.mark.parametrize("profile", ["demo", "paper"])
def test_every_interwild_profile_reads_the_whole_image(profile):
    cfg = load_config(profile=profile, arch="interwild")
    assert cfg.data.crop == "image"
    recipe = load_config(config_file=str(CONFIG_DIR / "interwild-recipe.yaml"))
    assert recipe.arch == "interwild" and recipe.data.crop == "image"
    # IntagHand's reference crops around the hands from the ground truth (1.25x the vertex extent): it keeps that
    assert load_config(profile=profile, arch="intaghand").data.crop == "verts"


def test_interwild_refuses_a_ground_truth_crop():
    from recon.data import DataSpecError, build_test_sets, check_data

    cfg = load_config(profile="demo", arch="interwild", overrides=["data.crop=hands"])
    with pytest.raises(DataSpecError, match=r"data.crop='hands': regressor 'interwild' reads the whole image"):
        check_data(cfg)
    with pytest.raises(DataSpecError, match="data.crop='hands'"):
        build_test_sets(cfg, hand_model=None)


class _Poisoned(Dataset):
    """The reader's samples with every ground-truth box (and IH2.6M's annotation box) moved to a corner."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        sample = self.dataset[index]
        corner = torch.tensor([0.0, 0.0, 3.0, 3.0])
        meta = dict(sample.meta, bbox_ann=corner.clone())
        return dataclasses.replace(
            sample,
            right=dataclasses.replace(sample.right, bbox=corner.clone()),
            left=dataclasses.replace(sample.left, bbox=corner.clone()),
            meta=meta,
        )


def test_evaluation_reads_no_ground_truth_box(synthlab_root, monkeypatch):
    """Poisoned ground-truth boxes give identical metrics: InterWild's test path never reads them."""
    from hands.mano import HandModel
    from recon import data as recon_data
    from recon.config import from_config
    from recon.evaluate import evaluate_regressor
    from recon.registry import REGRESSORS, load_builtin_regressors

    load_builtin_regressors()
    torch.manual_seed(0)
    cfg = load_config(
        profile="demo",
        arch="interwild",
        overrides=[*TINY_MODEL, f"data.root={synthlab_root}", "data.test=[synthlab:test-wild]"],
    )
    hand_model = HandModel()
    model = REGRESSORS.get("interwild")(**from_config(cfg, REGRESSORS.get("interwild"))).eval()

    def evaluate():
        sets = recon_data.build_test_sets(cfg, hand_model=hand_model)
        return evaluate_regressor(model, sets, hand_model=hand_model, device=torch.device("cpu"), batch_size=3, progress=False)

    clean = evaluate()
    real_reader = recon_data._reader
    monkeypatch.setattr(recon_data, "_reader", lambda *args, **kwargs: _Poisoned(real_reader(*args, **kwargs)))
    poisoned = evaluate()
    metrics = clean["synthlab-test-wild"]
    assert metrics["count_MPVPE"] > 0
    assert poisoned == clean


def test_hand_box_targets_are_not_clipped_to_the_augmented_image():
    """InterWild's process_hand_bbox moves a hand box with the augmentation and does not clip it."""
    from hands.datasets.transforms import crop
    from hands.sample import Camera, HandLabels, HandSample

    right = HandLabels.empty()
    right.valid = torch.tensor(True)
    right.bbox = torch.tensor([10.0, 12.0, 30.0, 36.0])
    sample = HandSample(
        image=torch.rand(3, 64, 80), right=right, left=HandLabels.empty(), rel_root=torch.zeros(3),
        rel_root_valid=torch.tensor(False), camera=Camera(torch.eye(3)), hand_type="right",
        meta={"dataset": "test", "id": "0", "is_synthetic": False},
    )
    out = crop(sample, torch.tensor([20.0, 0.0, 60.0, 40.0]), (40, 40))  # the hand's left part leaves the crop
    # 40 source px -> 40 crop px: the box moves by -20 px in x (minus bbox_crop_affine's half-pixel offset)
    box = out.right.bbox
    assert float(box[0]) < -9.0  # the whole box, its left part outside the image
    assert torch.allclose(box[2:] - box[:2], torch.tensor([20.0, 24.0]), atol=1e-4)
    assert out.left.bbox.abs().sum() == 0  # an absent hand's box stays zero


def _tiny_interwild():
    from recon.config import from_config
    from recon.registry import REGRESSORS, load_builtin_regressors

    load_builtin_regressors()
    cls = REGRESSORS.get("interwild")
    return cls(**from_config(load_config(profile="demo", arch="interwild", overrides=TINY_MODEL), cls))


def test_predicted_joints_are_regressed_from_the_predicted_mesh(synthlab_root):
    """InterWild's get_coord: the 21 joints are the joint regressor (+ tips) applied to the posed mesh, and
    mesh and joints are rooted at that regressed wrist (not smplx's LBS joints)."""
    from hands.datasets import build_dataset
    from hands.mano import HandModel
    from hands.sample import collate
    from recon.data import eval_transform

    torch.manual_seed(1)
    model = _tiny_interwild().eval()
    dataset = build_dataset("synthlab", synthlab_root, "test-wild")
    transform = eval_transform("image", (64, 48))
    batch = collate([transform(dataset[i]) for i in range(3)])
    with torch.no_grad():
        out = model(batch)
    hand_model = HandModel()
    for side in ("right", "left"):
        verts, joints = out.side(side)
        regressed = hand_model.regress_joints(side, verts)
        assert torch.allclose(regressed[:, 0], torch.zeros(3), atol=1e-6)  # rooted at the regressed wrist
        assert torch.allclose(joints, regressed, atol=1e-5)


def test_synthlab_joints_are_regressed_from_its_meshes(synthlab_root):
    """Targets use the same definition as predictions: synthlab writes the joints regressed from its meshes."""
    from hands.datasets import build_dataset
    from hands.mano import HandModel

    hand_model = HandModel()
    dataset = build_dataset("synthlab", synthlab_root, "test-lab", hand_model=hand_model)
    checked = 0
    for index in range(len(dataset)):
        sample = dataset[index]
        for side in ("right", "left"):
            hand = sample.hand(side)
            if bool(hand.valid) and bool(hand.mano_valid):
                regressed = hand_model.regress_joints(side, hand.verts_cam)
                valid = hand.joints_valid
                assert torch.allclose(hand.joints_cam[valid], regressed[valid], atol=1e-5)
                checked += 1
    assert checked > 0


def _fisheye_batch(hand_model, dist):
    """Two hands whose labels are consistent through a fisheye camera (64 x 48 image): joints regressed from
    the meshes, joints_img the distorted projection; the right hand's fingers leave the image on the left."""
    from hands.camera import bbox_from_points, scale_bbox
    from hands.datasets.common import project_points
    from hands.sample import Camera, HandLabels, HandSample, collate

    K = torch.tensor([[45.0, 0.0, 23.5], [0.0, 45.0, 31.5], [0.0, 0.0, 1.0]])
    gen = torch.Generator().manual_seed(4)
    hands = {}
    for side, root in (("right", (-0.115, 0.0, 0.45)), ("left", (0.09, 0.05, 0.45))):
        pose = torch.randn(1, 48, generator=gen) * 0.2
        pose[:, :3] = torch.tensor([3.1, 0.0, 0.0])
        verts = hand_model(side, pose, torch.zeros(1, 10)).verts[0]
        joints = hand_model.regress_joints(side, verts)
        shift = torch.tensor(root) - joints[0]
        verts, joints = verts + shift, joints + shift
        joints_img = project_points(joints, K, dist)
        hands[side] = HandLabels(
            mano_pose=pose[0], mano_shape=torch.zeros(10), root_cam=joints[0], verts_cam=verts, joints_cam=joints,
            joints_img=joints_img, bbox=scale_bbox(bbox_from_points(joints_img), 1.2), valid=torch.tensor(True),
            joints_valid=torch.ones(21, dtype=torch.bool), joints_trunc=torch.ones(21, dtype=torch.bool),
            mano_valid=torch.tensor(True),
        )
    sample = HandSample(
        image=torch.rand(3, 64, 48, generator=gen), right=hands["right"], left=hands["left"],
        rel_root=hands["left"].root_cam - hands["right"].root_cam, rel_root_valid=torch.tensor(True),
        camera=Camera(K, dist), hand_type="interacting", meta={"dataset": "test", "id": "0", "is_synthetic": False},
    )
    return collate([sample])


def test_2d_targets_follow_the_distortion_and_interwilds_truncation():
    """mano_joint_img targets are projected through the fisheye distortion (get_mano_data's
    distort_projection_fisheye) and 2D terms skip joints outside the input image (joint_trunc), while the 3D
    terms keep them."""
    from hands.mano import HandModel

    hand_model = HandModel()
    batch = _fisheye_batch(hand_model, torch.tensor([0.08, -0.03, 0.01, 0.0]))
    outside = batch.right.joints_img[0, :, 0] < -0.5
    assert 0 < int(outside.sum()) < 21  # some right-hand joints are truncated by the image border
    torch.manual_seed(0)
    model = _tiny_interwild().eval()
    boxes = torch.stack([batch.right.bbox, batch.left.bbox], 1)  # crops that hold the hands, image or not
    with torch.no_grad():
        full = model(batch)
        out = model.forward_hands(batch.image, batch.camera.K, boxes)
    out.extras.update({k: full.extras[k] for k in ("box_centre", "box_size", "box_stride", "box_conf")})
    # the position head predicts exactly the annotated 2.5D joints; the truncated ones are off by 3 cells
    cells = out.extras["hand_grid_cells"]
    cells_per_px = cells / model.hand_input_size
    grid = []
    for i, side in enumerate(("right", "left")):
        hand = batch.hand(side)
        target, _ = model._hand_grid_targets(hand.joints_img, hand.joints_cam, out.extras["crop_affine"][:, i], cells_per_px, cells)
        grid.append(target)
    grid = torch.stack(grid, 1)  # (1, 2, 21, 3)
    grid[0, 0, outside, 0] += 3.0
    out.extras["joints_hand_grid"] = grid
    losses = model.losses(out, batch)
    assert float(losses["joint_img"]) == pytest.approx(0.0, abs=1e-6)  # truncated joints are not 2D targets
    # the MANO joints are the annotated ones here: through the distortion their targets coincide
    assert float(losses["mano_joint_img"]) == pytest.approx(0.0, abs=1e-4)


def test_hand_boxes_span_the_joints_each_reference_loader_uses():
    """IH2.6M (get_bbox over every 2D-valid joint, then sanitize_bbox clips) vs ReIH (the joints inside the
    image only): for a hand cut by the image border the first box reaches the border, the second does not."""
    from hands.datasets.common import hand_bbox_from_joints

    joints = torch.tensor([[10.0, 10.0], [20.0, 14.0], [30.0, 18.0], [60.0, 22.0]])  # the last one right of x = 39
    valid = torch.ones(4, dtype=torch.bool)
    inside = hand_bbox_from_joints(joints, valid, (32, 40), box_joints="inside")
    every = hand_bbox_from_joints(joints, valid, (32, 40), box_joints="valid")
    assert torch.allclose(inside, torch.tensor([8.0, 9.2, 32.0, 18.8]))  # (10..30) x1.2 about 20
    assert torch.allclose(every, torch.tensor([5.0, 8.8, 39.0, 23.2]))  # (10..60) x1.2, clipped at x = 39
    assert hand_bbox_from_joints(joints[3:], valid[3:], (32, 40), box_joints="valid") is None  # none inside
    with pytest.raises(ValueError, match="box_joints"):
        hand_bbox_from_joints(joints, valid, (32, 40), box_joints="all")
