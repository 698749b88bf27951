"""InterShape (recon.archs.intershape): outputs follow the contract, the refinement reads the other hand's pose
and shape, the weak-perspective fit and joint heatmaps, the losses and the relative transformation on hand-made
cases, InterShape's protocol, an overfit on four rendered samples, the profiles, and (on a tiny run of recon.train
with generated samples mixed in) ONNX export, recon.demo, a two-process DDP run and the Table 2 row. Tiny models
(narrow ResNet-18s, 8-channel heatmap head with 4 depth bins, 64 px)."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from hands.joints import MIDDLE_KNUCKLE
from hands.mano import HandModel
from hands.sample import collate
from recon.archs.intershape import InterShape
from recon.archs.intershape import losses as L
from recon.archs.intershape.heatmap import heatmap_keypoints, heatmap_target
from recon.archs.intershape.model import relative_root
from recon.archs.intershape.protocol import InterShapeProtocol
from recon.archs.intershape.refine import fit_weak_perspective, joint_heatmap
from recon.config import from_config, load_config
from recon.registry import build_regressor
from tests.recon_helpers import overfit_history, rendered_two_hand_samples

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SIZE = 64
TINY = dict(
    backbone="resnet18",
    heatmap_backbone="resnet18",
    backbone_kwargs=dict(channels=[8, 16, 32, 64], stem_width=8),
    heatmap_channels=8,
    heatmap_depth=4,
    depth_stride=2,
    mano_hidden=[32, 32],
)
TINY_ARGS = [
    "model.backbone=resnet18",
    "model.heatmap_backbone=resnet18",
    "model.backbone_kwargs.channels=[8,16,32,64]",
    "model.backbone_kwargs.stem_width=8",
    "model.heatmap_channels=8",
    "model.heatmap_depth=4",
    "model.depth_stride=2",
    "model.mano_hidden=[32,32]",
    f"data.image_size=[{SIZE},{SIZE}]",
    "train.image_every=0",
]


@pytest.fixture(scope="module")
def hand_model() -> HandModel:
    return HandModel()


def _batch(hand_model: HandModel, n: int, seed: int = 0):
    return collate(rendered_two_hand_samples(hand_model, n, seed, size=SIZE))


def _relative_from_labels(batch) -> torch.Tensor:
    """The (log scale, translation) that places the labelled left hand on the labelled right hand's frame."""
    right, left = batch.right.joints_cam, batch.left.joints_cam
    length_r, length_l = L.bone_length(right), L.bone_length(left)
    t = (left[:, MIDDLE_KNUCKLE] - right[:, MIDDLE_KNUCKLE]) / length_l[:, None]
    return torch.cat([torch.log(length_l / length_r)[:, None], t], 1)


# -- contract -----------------------------------------------------------------------------------------------------


def test_outputs_follow_the_contract(hand_model):
    torch.manual_seed(0)
    model = build_regressor("intershape", **TINY).eval()
    assert isinstance(model, InterShape) and InterShape.input_crop == "hands"
    batch = _batch(hand_model, 2)
    with torch.no_grad():
        out = model(batch)
    out.validate(2)
    extras = out.extras
    assert extras["heatmap"].shape == (2, 42, 4, SIZE // 4, SIZE // 4) and extras["relative"].shape == (2, 4)
    assert len(extras["stages"]) == 1 + 3
    for side in ("right", "left"):
        verts, joints = out.side(side)
        wrist = torch.einsum("v,bvc->bc", hand_model.j_regressor_for(side)[0], verts)
        assert torch.allclose(wrist, torch.zeros_like(wrist), atol=1e-6) and torch.allclose(joints[:, 0], torch.zeros(2, 3), atol=1e-7)
        mano = hand_model(side, getattr(out, f"{side}_mano_pose"), getattr(out, f"{side}_mano_shape"))
        rebuilt = hand_model.regress_joints(side, mano.verts)
        assert torch.allclose(verts, mano.verts - rebuilt[:, :1], atol=1e-6)
        # 2D joints: the heatmap maxima (cells of the 1/4 map) in input pixels.
        cells = extras["keypoints"][:, :21] if side == "right" else extras["keypoints"][:, 21:]
        assert torch.equal(getattr(out, f"{side}_joints_img"), cells[..., :2] * 4)
    assert torch.allclose(out.rel_root, relative_root(out.right_joints, out.left_joints, extras["relative"]))
    with pytest.raises(ValueError, match="multiple of 32"):
        model(dataclasses.replace(batch, image=torch.zeros(2, 3, 48, 48)))
    with pytest.raises(ValueError, match="cascade"):
        build_regressor("intershape", **{**TINY, "cascade": 4})
    assert len(build_regressor("intershape", **{**TINY, "cascade": 0})(batch).extras["stages"]) == 1


def test_refinement_reads_the_other_hands_pose_and_shape(hand_model):
    torch.manual_seed(0)
    model = build_regressor("intershape", **TINY).eval()
    for stage in model.refine:  # heads start near zero (N(0, 0.01)); larger ones make the dependence visible
        for branch in stage.branch.values():
            torch.nn.init.normal_(branch.pose.weight, std=0.2)
            torch.nn.init.normal_(branch.shape.weight, std=0.2)
    batch = _batch(hand_model, 2)
    with torch.no_grad():
        stages = model(batch).extras["stages"]
        # One refinement step directly: another "other hand" (pose, shape) changes this hand's new pose and shape.
        stage = model.refine[0]
        feature = torch.randn(2, 64)
        own, other = stages[0]["right"], stages[0]["left"]
        relative = torch.zeros(2, 4)
        pose, shape = stage.regress("right", feature, own, other, relative)
        moved = {"pose": other["pose"] + 0.3, "shape": other["shape"] - 0.5}
        pose2, shape2 = stage.regress("right", feature, own, moved, relative)
        assert (pose2 - pose).abs().max() > 1e-5 and (shape2 - shape).abs().max() > 1e-5
        # End to end: moving only the left hand's first estimate leaves the right hand's first estimate as it was
        # and changes the right hand's refined estimates.
        model.init_branch["left"].shape.bias.add_(0.5)
        model.init_branch["left"].pose.bias.add_(0.2)
        again = model(batch).extras["stages"]
    assert torch.equal(again[0]["right"]["verts"], stages[0]["right"]["verts"])
    assert (again[0]["left"]["verts"] - stages[0]["left"]["verts"]).abs().max() > 1e-4
    for index in (1, 2, 3):
        assert (again[index]["right"]["verts"] - stages[index]["right"]["verts"]).abs().max() > 1e-6, index


def test_weak_perspective_fit_and_joint_heatmap():
    gen = torch.Generator().manual_seed(0)
    joints = torch.randn(3, 21, 3, generator=gen)
    camera = torch.tensor([[2.0, 5.0, 7.0], [0.5, -1.0, 3.0], [-1.5, 0.0, 0.0]])
    uv = camera[:, None, :1] * joints[..., :2] + camera[:, None, 1:]
    confidence = torch.rand(3, 21, generator=gen) + 0.1
    fitted = fit_weak_perspective(joints, torch.cat([uv, confidence[..., None]], -1))
    assert torch.allclose(fitted, camera, atol=1e-4)
    # A wrong keypoint with zero (or negative) confidence does not move the fit.
    uv_bad = uv.clone()
    uv_bad[:, 0] += 50.0
    confidence[:, 0] = -3.0
    fitted = fit_weak_perspective(joints, torch.cat([uv_bad, confidence[..., None]], -1))
    assert torch.allclose(fitted, camera, atol=1e-2)
    # The joint heatmap: 1 at each joint, the union of overlapping blobs, ~0 far away.
    points = torch.tensor([[[2.0, 3.0], [2.0, 4.0], [12.0, 12.0]]])
    heat = joint_heatmap(points, (16, 16))
    g = math.exp(-1 / 3)
    assert heat[0, 3, 2] == pytest.approx(1.0) and heat[0, 12, 12] == pytest.approx(1.0)
    assert heat[0, 3, 3] == pytest.approx(1 - (1 - g) * (1 - math.exp(-2 / 3)), abs=1e-6)
    assert heat[0, 8, 8] < 1e-3


def test_heatmap_target_peaks_at_each_joint_and_keypoints_read_it():
    joints_img = torch.tensor([[[8.0, 12.0]] * 21 + [[40.0, 20.0]] * 21])  # input pixels of a 64 px image
    joints_cam = torch.zeros(1, 42, 3)
    joints_cam[0, 1:21, 2] = 0.1  # right fingers 0.1 m behind the right wrist: bin (0.1 / 0.2 + 1) / 2 * 8 = 6
    target = heatmap_target(joints_img, joints_cam, (8, 16, 16), (64, 64))
    assert target.shape == (1, 42, 8, 16, 16)
    keypoints = heatmap_keypoints(target)
    assert keypoints[0, 0].tolist() == [2.0, 3.0, 255.0]  # the wrist at depth bin 4, on the grid: the full amplitude
    assert keypoints[0, 5, :2].tolist() == [2.0, 3.0] and keypoints[0, 30, :2].tolist() == [10.0, 5.0]
    assert int(target[0, 5].amax((1, 2)).argmax()) == 6 and int(target[0, 0].amax((1, 2)).argmax()) == 4


# -- losses on hand-made cases ------------------------------------------------------------------------------------


def test_normalisation_and_joint_and_bone_losses(hand_model):
    batch = _batch(hand_model, 2, seed=3)
    joints = batch.right.joints_cam
    valid = torch.ones(2, 21, dtype=torch.bool)
    # Normalised hands forget translation and scale: a moved, doubled hand has no joint or bone loss.
    moved = joints * 2.0 + torch.tensor([0.1, -0.2, 0.3])
    assert L.joint_loss(L.normalise(moved), L.normalise(joints), valid) < 1e-5
    assert L.bone_loss(L.normalise(moved), L.normalise(joints), valid) < 1e-10
    normed = L.normalise(joints)
    assert torch.allclose(normed[:, MIDDLE_KNUCKLE], torch.zeros(2, 3)) and torch.allclose(L.bone_length(normed), torch.ones(2))
    # L1 summed over joints and axes, divided by the batch; masked joints do not count.
    shifted = normed + torch.tensor([0.1, 0.0, -0.2])
    assert L.joint_loss(shifted, normed, valid) == pytest.approx(2 * 21 * 0.3 / 2)
    valid[1] = False
    assert L.joint_loss(shifted, normed, valid) == pytest.approx(21 * 0.3 / 2)
    # A stretched bone: one (3 -> 4 is a tip: not counted; 2 -> 3 is) bone's length error squared.
    stretched = normed.clone()
    stretched[0, 3:5] += 0.5 * (normed[0, 3] - normed[0, 2]) / (normed[0, 3] - normed[0, 2]).norm()
    assert len(L.BONES) == 15
    expected = 0.5**2 / 2  # bone 2 -> 3 grows by 0.5; 3 -> 4 moves rigidly
    assert L.bone_loss(stretched, normed, torch.ones(2, 21, dtype=torch.bool)) == pytest.approx(expected, rel=1e-4)


def test_relative_transformation_from_labels_gives_rel_root_and_no_offset_loss(hand_model):
    batch = _batch(hand_model, 3, seed=4)
    right, left = batch.right.joints_cam, batch.left.joints_cam
    relative = _relative_from_labels(batch)
    rooted = lambda j: j - j[:, :1]  # noqa: E731
    assert torch.allclose(relative_root(rooted(right), rooted(left), relative), batch.rel_root, atol=1e-6)
    both = torch.cat([right, left], 1)
    frames = lambda r, l: {  # noqa: E731
        "right_frame": (both - r[:, MIDDLE_KNUCKLE : MIDDLE_KNUCKLE + 1]) / L.bone_length(r)[:, None, None],
        "left_frame": (both - l[:, MIDDLE_KNUCKLE : MIDDLE_KNUCKLE + 1]) / L.bone_length(l)[:, None, None],
    }
    gt = frames(right, left)
    nr, nl = L.normalise(right), L.normalise(left)
    pred = {
        "right_frame": torch.cat([nr, L.left_in_right_frame(nl, relative)], 1),
        "left_frame": torch.cat([L.right_in_left_frame(nr, relative), nl], 1),
    }
    valid = torch.ones(3, 21, dtype=torch.bool)
    assert torch.allclose(pred["right_frame"], gt["right_frame"], atol=1e-5)
    assert L.offset_loss(pred, gt, valid) < 1e-8
    # A wrong translation: the offsets in the right frame are off by t, in the left frame by t exp(-s)... summed.
    wrong = relative + torch.tensor([0.0, 0.1, 0.0, 0.0])
    pred["right_frame"] = torch.cat([nr, L.left_in_right_frame(nl, wrong)], 1)
    pred["left_frame"] = torch.cat([L.right_in_left_frame(nr, wrong), nl], 1)
    scale = torch.exp(relative[:, 0])
    expected = (21 * (0.1 * scale) ** 2 + 21 * 0.1**2).sum() / 3
    assert L.offset_loss(pred, gt, valid) == pytest.approx(float(expected), rel=1e-4)
    assert L.offset_loss(pred, gt, torch.zeros(3, 21, dtype=torch.bool)) == 0


def test_shape_terms_and_regulariser():
    pred, gt = torch.zeros(2, 10), torch.ones(2, 10)
    assert L.shape_loss(pred, gt, torch.tensor([True, False])) == pytest.approx(10 / 2)
    assert L.shape_consistency_loss(pred, gt, torch.tensor([True, True])) == pytest.approx(10.0)
    pose = torch.zeros(2, 48)
    pose[:, :3] = 5.0  # the root rotation is not regularised
    pose[0, 3] = 2.0
    assert L.regulariser(torch.full((2, 10), 0.5), pose) == pytest.approx((20 * 0.25 + 0.1 * 4.0) / 2)


def test_losses_are_masked_by_the_labels(hand_model):
    torch.manual_seed(0)
    model = build_regressor("intershape", **TINY)
    batch = _batch(hand_model, 2, seed=2)
    out = model(batch)
    terms = model.losses(out, batch)
    assert set(terms) == {"heatmap", "joints", "bone", "offset", "shape", "shape_consistency", "regulariser"}
    assert all(torch.isfinite(v) and v >= 0 for v in terms.values())
    # Without any label only the regulariser (a prior) is left.
    for side in ("right", "left"):
        batch.hand(side).valid[:] = False
    batch.rel_root_valid[:] = False
    empty = model.losses(out, batch)
    assert all(float(empty[name].detach()) == 0.0 for name in empty if name != "regulariser")


def test_a_joint_truncated_in_2d_leaves_the_heatmap_target_and_keeps_its_3d_terms(hand_model):
    """joints_trunc False (2D label outside the image, 3D kept): that joint's heatmap error no longer counts; the
    3D terms, which read joints_valid, do not change."""
    torch.manual_seed(0)
    model = build_regressor("intershape", **TINY)
    batch = _batch(hand_model, 2, seed=2)
    out = model(batch)
    before = {k: float(v.detach()) for k, v in model.losses(out, batch).items()}
    for side in ("right", "left"):
        batch.hand(side).joints_trunc[:] = False
    after = {k: float(v.detach()) for k, v in model.losses(out, batch).items()}
    assert before["heatmap"] > 0 and after["heatmap"] == 0.0
    assert all(after[k] == pytest.approx(before[k]) for k in before if k != "heatmap")


# -- protocol -----------------------------------------------------------------------------------------------------


def test_intershape_protocol_on_hand_made_predictions(hand_model):
    batch = _batch(hand_model, 2, seed=5)
    rooted = {side: batch.hand(side).joints_cam - batch.hand(side).joints_cam[:, :1] for side in ("right", "left")}
    verts = {side: batch.hand(side).verts_cam - batch.hand(side).joints_cam[:, :1] for side in ("right", "left")}
    # The ground truth scaled (x1.3) and moved anywhere is exact under this protocol.
    outputs = {f"{s}_{k}": v * 1.3 for s in ("right", "left") for k, v in (("joints", rooted[s]), ("verts", verts[s]))}
    protocol = InterShapeProtocol(distributed=False)
    protocol.process(outputs, batch)
    result = protocol.evaluate()
    assert result["InterShape_MPVPE"] < 1e-4 and result["InterShape_MPJPE"] < 1e-4 and result["count_InterShape"] == 4
    # Every right vertex 5 mm off along x (joints exact): MPVPE = (2 x 5 + 2 x 0) / 4 hands = 2.5 mm.
    outputs["right_verts"] = (verts["right"] + torch.tensor([0.005, 0.0, 0.0])) * 1.3
    protocol.reset()
    protocol.process(outputs, batch)
    assert protocol.evaluate()["InterShape_MPVPE"] == pytest.approx(2.5, abs=1e-3)
    # A hand without its middle knuckle is left out.
    batch.left.joints_valid[:, MIDDLE_KNUCKLE] = False
    protocol.reset()
    protocol.process(outputs, batch)
    assert protocol.evaluate()["count_InterShape"] == 2


def test_internet_augmentation_keeps_labels_consistent_and_draws_the_references_ranges(hand_model):
    from hands.camera import project
    from recon.archs.intershape.augment import InterNetAugment
    from recon.data import train_transform

    augment = InterNetAugment((SIZE, SIZE))
    generator = torch.Generator().manual_seed(0)
    draws = [augment.draw(generator) for _ in range(400)]
    assert all(0.75 <= d["scale"] <= 1.25 and abs(d["rotation_deg"]) <= 90 for d in draws)
    assert all(float(d["shift"].abs().max()) <= 0.15 for d in draws) and max(float(d["shift"].abs().max()) for d in draws) > 0.14
    assert max(abs(d["rotation_deg"]) for d in draws) > 60  # 45 clip(N, +-2): wider than InterWild's 30
    assert abs(sum(d["rotation_deg"] == 0 for d in draws) / len(draws) - 0.4) < 0.08
    assert all(0.8 <= c <= 1.2 for d in draws for c in d["color"]) and abs(sum(d["flip"] for d in draws) / 400 - 0.5) < 0.08
    sample = rendered_two_hand_samples(hand_model, 1, 0, size=SIZE)[0]
    plain = augment.apply(sample, dict(augment.draw(torch.Generator().manual_seed(1)), shift=torch.zeros(2), flip=False))
    for seed in range(4):
        params = augment.draw(torch.Generator().manual_seed(seed))
        params.update(flip=seed % 2 == 1)
        out = augment.apply(sample, params)
        assert out.image.shape == (3, SIZE, SIZE)
        for side in ("right", "left"):
            hand = out.hand(side)  # 2D labels stay the projection of the (rotated, mirrored) 3D labels
            assert torch.allclose(hand.joints_img, project(hand.joints_cam, out.camera.K), atol=1e-3)
    # the translation moves the content by the shift x the box, opposite to the box
    params = dict(augment.draw(torch.Generator().manual_seed(1)), shift=torch.tensor([0.1, 0.0]), flip=False)
    moved = augment.apply(sample, params)
    dx = (moved.right.joints_img - plain.right.joints_img)[:, 0]
    assert torch.allclose(dx, torch.full_like(dx, float(dx.mean())), atol=1e-3) and float(dx.mean()) < -1.0
    for profile in ("demo", "paper"):  # InterShape's profiles use it (and mixing reuses train_transform)
        cfg = load_config(profile=profile, arch="intershape")
        assert cfg.data.augmentation == "internet" and isinstance(train_transform(cfg), InterNetAugment)


# -- training -----------------------------------------------------------------------------------------------------


def test_losses_fall_when_overfitting_four_samples(hand_model):
    torch.manual_seed(0)
    model = build_regressor("intershape", **TINY)
    batch = _batch(hand_model, 4, seed=1)
    history = overfit_history(model, batch, 30, 2e-3)
    mesh = lambda terms: sum(value for name, value in terms.items() if name != "heatmap")  # noqa: E731
    assert mesh(history[-1]) < 0.5 * mesh(history[0])  # measured: 3145 -> 1108
    for name in ("heatmap", "joints", "offset"):  # the 255-amplitude heatmap MSE falls slowly: 3628 -> 3573
        assert history[-1][name] < history[0][name], name


def test_profiles():
    paper = load_config(profile="paper", arch="intershape")
    assert list(paper.data.image_size) == [256, 256] and paper.data.crop == "hands"
    assert paper.model.backbone == paper.model.heatmap_backbone == "resnet50"
    assert paper.model.heatmap_depth == 64 and paper.model.depth_stride == 4 and list(paper.model.mano_hidden) == [512] * 4
    assert (paper.optim.optimizer, paper.optim.lr, list(paper.optim.lr_decay_epochs)) == ("adam", 1e-4, [45, 47])
    assert paper.train.batch_size == 32 and paper.train.epochs == 100 and paper.optim.grad_clip == 0.0
    kwargs = from_config(paper, InterShape)
    assert kwargs["cascade"] == 3 and kwargs["weight_bone"] == 100.0 and kwargs["weight_joints"] == 10.0
    model = build_regressor("intershape", **{k: v for k, v in kwargs.items() if k != "mano_dir"})
    assert model.extra_channels == 42 * 16  # the reference's addition_channels = 42 * 64 // 4
    assert model.encoder.layer3[0].conv1.in_channels == 512 + 42 * 16
    demo = load_config(profile="demo", arch="intershape")
    assert demo.model.backbone == "resnet18" and demo.data.image_size[0] % 32 == 0 and demo.data.crop == "hands"
    assert demo.train.max_steps == 160 and list(demo.optim.lr_decay_steps) == [128] and demo.optim.grad_clip == 0.0


def test_backbone_weights_fill_both_encoders(tmp_path):
    import timm

    torch.manual_seed(0)
    model = build_regressor("intershape", **TINY)
    source = timm.create_model("resnet18", pretrained=False, channels=[8, 16, 32, 64], stem_width=8)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model.load_backbone_weights(str(path))
    assert torch.equal(model.heatmap_encoder.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert torch.equal(model.encoder.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    widened = model.encoder.layer3[0].conv1.weight
    assert torch.equal(widened[:, :16], source.layer3[0].conv1.weight) and (widened[:, 16:] == 0).all()
    torch.save({"conv1.weight": torch.zeros(3, 3, 3, 3)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="wrong.pth"):
        model.load_backbone_weights(str(tmp_path / "wrong.pth"))


# -- recon.train with generated samples, ONNX, demo, DDP, Table 2 ---------------------------------------------------

def _run_args(root, out, *extra: str) -> list:
    from tests.recon_helpers import arch_run_args

    return arch_run_args(root, out, "intershape", TINY_ARGS, *extra)


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    """(synthlab root, run folder, result) of 2 steps of tiny InterShape with half of each batch generated."""
    from tests.recon_helpers import tiny_mixed_run

    return tiny_mixed_run(tmp_path_factory, "intershape", TINY_ARGS)


def test_trains_with_generated_samples_mixed_in(mixed_run):
    _, out, result = mixed_run
    assert result["step"] == 2 and result["mixing"]["taken"] == 2 * 2  # batch 4, r = 0.5
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("synthlab-test-lab", "synthlab-test-wild"):
        assert metrics[key]["count_MPVPE"] > 0 and math.isfinite(metrics[key]["MPVPE"]) and math.isfinite(metrics[key]["MRRPE"])
        assert math.isfinite(metrics[key]["InterShape_MPVPE"]) and metrics[key]["count_InterShape"] > 0  # its own protocol
    sidecar = json.loads(sorted((out / "checkpoints").glob("step_*.json"))[-1].read_text())
    assert sidecar["arch"] == "intershape" and sidecar["model_kwargs"]["heatmap_depth"] == 4


def test_a_crop_other_than_the_hands_is_refused(mixed_run, tmp_path):
    from recon import train as recon_train
    from recon.data import DataSpecError

    root, _, _ = mixed_run
    with pytest.raises(DataSpecError, match="data.crop='image'.*intershape"):
        recon_train.train(recon_train.parse_args(_run_args(root, tmp_path / "x", "--max-steps", "1", "data.crop=image")))


def test_onnx_export_matches_pytorch(mixed_run, tmp_path):
    pytest.importorskip("onnx", reason="ONNX export needs the 'export' extra (onnx)")
    pytest.importorskip("onnxruntime", reason="the comparison needs the 'export' extra (onnxruntime)")
    from recon import export as recon_export
    from recon import test as recon_test

    _, out, _ = mixed_run
    model, info = recon_test.load_regressor(out)
    path = tmp_path / "intershape.onnx"
    names = recon_export.export_onnx(model, info, path, batch=2)
    assert names[:5] == ["right_verts", "left_verts", "right_joints", "left_joints", "rel_root"]
    assert {"right_joints_img", "right_mano_pose", "left_mano_shape"} <= set(names)
    diffs = recon_export.compare_with_onnxruntime(model, info, path, batch=2)
    assert set(diffs) == set(names) and max(diffs.values()) < 1e-4, diffs


def test_recon_demo_runs_an_intershape_checkpoint(mixed_run, tmp_path):
    from recon import demo as recon_demo

    root, out, _ = mixed_run
    image = sorted((root / "images" / "test-lab").rglob("*.jpg"))[0]
    assert recon_demo.main(["--ckpt", str(out), "--input", str(image), "--out", str(tmp_path / "demo")]) == 0
    record = json.loads((tmp_path / "demo" / "json" / f"{image.stem}.json").read_text())
    assert len(record["hands"]) == 2 and (tmp_path / "demo" / "overlays" / f"{image.stem}.png").is_file()
    assert len(record["hands"][0]["mano_pose"]) == 48 and len(record["hands"][0]["joints_cam"]) == 21


def test_torchrun_two_processes(mixed_run, tmp_path):
    from tests.recon_helpers import torchrun_two_processes

    root, _, _ = mixed_run
    out = tmp_path / "ddp"
    argv = _run_args(root, out, "--max-steps", "2", "--batch-size", "2", "eval.at_end=false")
    result = torchrun_two_processes(argv)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    meta = json.loads((out / "checkpoints" / "step_000002.json").read_text())
    assert meta["world_size"] == 2 and meta["arch"] == "intershape"


def test_table2_puts_the_papers_intershape_row_beside_ours():
    from eval.report import PAPER_TABLE2
    from recon.table2 import paper_method

    assert paper_method("intershape") == "InterShape"
    row = PAPER_TABLE2["InterShape"]
    assert (row["hic"]["MPVPE"], row["reih"]["RRVE"], row["ih26m"]["MRRPE"]) == (27.66, 38.56, 31.56)
    assert PAPER_TABLE2["InterShape+AttentionHand"]["hic"]["MRRPE"] == 80.17
