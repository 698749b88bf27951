"""DIR (recon.archs.dir): the parameter count at paper size equals the reference's, outputs follow the
contract, the refinement stages change the prediction, DIR's losses on hand-made cases, an overfit on four
rendered samples, the profiles, and (on a tiny run of recon.train with generated samples mixed in) ONNX export,
recon.demo with boxes and a two-process DDP run. Tiny models (narrow ResNet-18, 8-16 channel heads, 64 px)."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from hands.camera import project
from hands.mano import HandModel
from hands.render import render_hands
from hands.sample import collate
from recon.archs.dir import DIR
from recon.archs.dir.heads import OFFSET_UNIT, robust_rot6d_to_matrix
from recon.archs.dir.losses import (
    edge_length_loss,
    lovasz_softmax,
    normal_vector_loss,
    segmentation_loss,
    smooth_l1,
)
from recon.archs.dir.model import SEG_LEFT, SEG_RIGHT, joints_from_verts
from recon.archs.dir.modules import BONE_PARENTS, JointGraphConv, bone_feature_map
from recon.config import from_config, load_config
from recon.registry import build_regressor
from tests.recon_helpers import overfit_history, rendered_two_hand_samples

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SIZE = 64
TINY = dict(
    backbone="resnet18",
    backbone_kwargs=dict(channels=[8, 16, 32, 64], stem_width=8),
    decoder_channels=16,
    joint_channels=8,
    joint_out_channels=4,
    gcn_layers=1,
    transformer_blocks=1,
    heads=2,
)
TINY_ARGS = [
    "model.backbone=resnet18",
    "model.backbone_kwargs.channels=[8,16,32,64]",
    "model.backbone_kwargs.stem_width=8",
    "model.decoder_channels=16",
    "model.joint_channels=8",
    "model.joint_out_channels=4",
    "model.gcn_layers=1",
    "model.transformer_blocks=1",
    "model.heads=2",
    f"data.image_size=[{SIZE},{SIZE}]",
    "train.image_every=0",
]


@pytest.fixture(scope="module")
def hand_model() -> HandModel:
    return HandModel()


def _make_batch(hand_model: HandModel, n: int, seed: int = 0):
    """n rendered two-hand samples (64 x 64) with consistent 3D and 2D labels, collated."""
    return collate(_make_samples(hand_model, n, seed))


def _make_samples(hand_model: HandModel, n: int, seed: int = 0) -> list:
    """n rendered two-hand samples (64 x 64) with consistent 3D and 2D labels."""
    return rendered_two_hand_samples(hand_model, n, seed, size=SIZE)


# -- size ---------------------------------------------------------------------------------------------------------


def test_parameter_count_at_paper_size_equals_the_reference():
    """The reference (models/dir.py, DIR(21, mano_path)) holds 92,725,019 parameters, counted by instantiating its
    modules (MANO layers stubbed: they hold buffers only): 90,411,059 take part in its forward pass, plus the
    ResNet-50's unused ImageNet classifier (2048 x 1000 + 1000 = 2,049,000) and, in each of the two refinement
    stages, the transformer block the loop skips (132,480 each). Ours builds the 90,411,059."""
    model = build_regressor("dir")
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(model) == 90_411_059 == 92_725_019 - 2_049_000 - 2 * 132_480
    assert count(model.encoder) == 23_508_032  # torchvision's ResNet-50 without fc
    assert count(model.init_regressor) == 2 * 18_878_465 + 6_147 + 2 * 131_136
    assert [count(stage) for stage in model.stages] == [12_365_492 - 132_480] * 2  # Joint2BoneFeature
    assert count(model.stages[0].gcn["left"]) == 2_754_292  # ResSimplePGCN: per-joint weights
    assert count(model.fuse4) == 1_070_848 and count(model.skip4) == 576_768 and count(model.seg_head) == 295_683


# -- contract -----------------------------------------------------------------------------------------------------


def test_outputs_follow_the_contract(hand_model):
    torch.manual_seed(0)
    model = build_regressor("dir", **TINY).eval()
    assert isinstance(model, DIR)
    batch = _make_batch(hand_model, 2)
    with torch.no_grad():
        out = model(batch)
    out.validate(2)
    stages = out.extras["stages"]
    assert len(stages) == 3 and out.extras["seg"].shape == (2, 3, SIZE // 8, SIZE // 8)
    assert out.extras["dense"].shape == (2, 3, SIZE // 8, SIZE // 8)
    for side in ("right", "left"):
        verts, joints = out.side(side)
        # Wrist-rooted metres: the mesh's regressed wrist is the origin and joint 0 is that wrist.
        wrist = torch.einsum("v,bvc->bc", hand_model.j_regressor_for(side)[0], verts)
        assert torch.allclose(wrist, torch.zeros_like(wrist), atol=1e-6)
        assert torch.allclose(joints[:, 0], torch.zeros(2, 3), atol=1e-7)
        # The MANO parameters in the output rebuild the mesh.
        mano = hand_model(side, getattr(out, f"{side}_mano_pose"), getattr(out, f"{side}_mano_shape"))
        rebuilt = joints_from_verts(hand_model, side, mano.verts)
        assert torch.allclose(verts, mano.verts - rebuilt[:, :1], atol=1e-6)
        # 2D joints: DIR's normalised coordinates -> input pixels.
        uv = stages[-1][side]["joints_uv"]
        assert torch.allclose(getattr(out, f"{side}_joints_img"), (uv + 1) / 2 * SIZE - 0.5, atol=1e-5)
    # DIR's offset is (right - left) / 0.15 m; the contract's rel_root is left - right in metres.
    assert torch.allclose(out.rel_root, -OFFSET_UNIT * stages[-1]["offset"], atol=1e-7)
    with pytest.raises(ValueError, match="multiple of 32"):
        model(dataclasses.replace(batch, image=torch.zeros(2, 3, 48, 48)))


def test_refinement_stages_change_the_prediction(hand_model):
    torch.manual_seed(0)
    model = build_regressor("dir", **TINY).eval()
    batch = _make_batch(hand_model, 2)
    with torch.no_grad():
        out = model(batch)
        stages = out.extras["stages"]
        verts = [stage["right"]["verts"] for stage in stages]
        offsets = [stage["offset"] for stage in stages]
        for a, b in ((0, 1), (1, 2), (0, 2)):
            assert (verts[a] - verts[b]).abs().max() > 1e-5, (a, b)
            assert (offsets[a] - offsets[b]).abs().max() > 1e-6, (a, b)
        # The output is the last refinement, not the initial regression.
        assert torch.equal(out.right_verts, verts[2]) and torch.equal(out.left_verts, stages[2]["left"]["verts"])
        # A refinement stage reads the previous stage's parameters: another initial regression changes it.
        model.init_regressor.params["right"].bias.add_(0.05)
        moved = model(batch).extras["stages"]
    assert (moved[0]["right"]["verts"] - verts[0]).abs().max() > 1e-4
    assert (moved[1]["right"]["verts"] - verts[1]).abs().max() > 1e-6


# -- losses on hand-made cases ------------------------------------------------------------------------------------


def test_smooth_l1_is_huber_with_delta_0_01_averaged_per_sample():
    target = torch.zeros(3, 2)
    pred = torch.tensor([[0.005, -0.005], [0.1, -0.1], [7.0, 7.0]])
    per_sample = torch.tensor([0.5 * 0.005**2, 0.01 * (0.1 - 0.005), 0.01 * (7.0 - 0.005)])
    assert smooth_l1(pred, target).item() == pytest.approx(per_sample.mean().item(), rel=1e-6)
    valid = torch.tensor([True, True, False])  # the third sample has no label
    assert smooth_l1(pred, target, valid).item() == pytest.approx(per_sample[:2].mean().item(), rel=1e-6)
    assert smooth_l1(pred, target, torch.zeros(3, dtype=torch.bool)).item() == 0.0


def test_edge_and_normal_losses_on_hand_meshes(hand_model):
    verts = hand_model("right", torch.zeros(2, 48), torch.zeros(2, 10)).verts
    faces = hand_model.faces_for("right")
    assert edge_length_loss(verts, verts, faces).item() == pytest.approx(0.0, abs=1e-7)
    assert normal_vector_loss(verts, verts, faces).item() == pytest.approx(0.0, abs=1e-5)  # edges lie in their face
    # Twice the size: every edge is longer by its own length; the shape (and so every normal) is unchanged.
    edges = torch.cat([(verts[:, faces[:, i]] - verts[:, faces[:, j]]).norm(dim=-1) for i, j in ((0, 1), (0, 2), (1, 2))], 1)
    assert edge_length_loss(2 * verts, verts, faces).item() == pytest.approx(edges.mean().item(), rel=1e-4)
    assert normal_vector_loss(2 * verts, verts, faces).item() == pytest.approx(0.0, abs=1e-5)
    # A rotated copy: the same edge lengths, edges out of the target faces' planes.
    turn = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert edge_length_loss(verts @ turn.T, verts, faces).item() == pytest.approx(0.0, abs=1e-6)
    assert normal_vector_loss(verts @ turn.T, verts, faces).item() > 0.1
    # A sample without a mesh does not count.
    broken = torch.cat([verts[:1], verts[1:] * 3])
    assert edge_length_loss(broken, verts, faces, torch.tensor([True, False])).item() == pytest.approx(0.0, abs=1e-7)


def test_lovasz_softmax_is_the_jaccard_loss_on_hard_predictions():
    labels = torch.tensor([0, 0, 1, 1]).reshape(1, 2, 2)
    perfect = torch.nn.functional.one_hot(labels, 2).permute(0, 3, 1, 2).float()
    assert lovasz_softmax(perfect, labels).item() == pytest.approx(0.0, abs=1e-7)
    guess = torch.tensor([1, 0, 0, 1]).reshape(1, 2, 2)  # per class: intersection 1, union 3 -> 1 - 1/3
    hard = torch.nn.functional.one_hot(guess, 2).permute(0, 3, 1, 2).float()
    assert lovasz_softmax(hard, labels).item() == pytest.approx(2.0 / 3.0, rel=1e-6)
    # Only classes present in the labels count; an invalid sample's pixels are left out.
    three = torch.cat([hard, torch.zeros(1, 1, 2, 2)], 1)
    assert lovasz_softmax(three, labels).item() == pytest.approx(2.0 / 3.0, rel=1e-6)
    both = torch.cat([perfect, hard])
    assert lovasz_softmax(both, torch.cat([labels, labels]), torch.tensor([True, False])).item() == pytest.approx(0.0, abs=1e-7)


def test_segmentation_loss_weighs_background_less():
    logits = torch.zeros(1, 3, 1, 2)
    logits[0, SEG_RIGHT, 0, 0] = 2.0  # pixel 0 says right, pixel 1 is undecided
    labels = torch.tensor([[[0, SEG_LEFT]]])
    log_p = torch.log_softmax(logits, 1)[0, :, 0]  # (3, 2)
    expected = -(0.1 * log_p[0, 0] + 0.45 * log_p[SEG_LEFT, 1]) / (0.1 + 0.45)
    assert segmentation_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_robust_6d_places_the_frame_symmetrically():
    assert torch.allclose(robust_rot6d_to_matrix(torch.tensor([1.0, 0, 0, 0, 1, 0])), torch.eye(3), atol=1e-6)
    rot6d = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
    matrix = robust_rot6d_to_matrix(rot6d)
    assert torch.allclose(matrix.transpose(1, 2) @ matrix, torch.eye(3).expand(64, 3, 3), atol=1e-5)
    assert torch.allclose(torch.linalg.det(matrix), torch.ones(64), atol=1e-5)
    a = torch.nn.functional.normalize(rot6d[:, :3], dim=-1)
    b = torch.nn.functional.normalize(rot6d[:, 3:], dim=-1)
    # Neither input is privileged: x is as far from a as y is from b (Gram-Schmidt would keep x = a).
    assert torch.allclose((matrix[..., 0] * a).sum(-1), (matrix[..., 1] * b).sum(-1), atol=1e-5)


def test_joint_graph_convolution_starts_as_self_plus_neighbour_mean():
    conv = JointGraphConv(2, 2, [(0, 1), (1, 2)], num_nodes=3)
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [4.0, 4.0]]])
    with torch.no_grad():
        conv.bias.zero_()
        conv.weight[0] = torch.eye(2)
        conv.weight[1] = 0.0
        assert torch.allclose(conv(x), x)  # the self term: each node's own feature
        conv.weight[0] = 0.0
        conv.weight[1] = torch.eye(2)
        neighbours = torch.stack([x[0, 1], (x[0, 0] + x[0, 2]) / 2, x[0, 1]])[None]
        assert torch.allclose(conv(x), neighbours)  # the neighbour term: the mean over the neighbours


def test_bone_feature_map_paints_features_along_the_bone():
    size = 8
    cells = torch.full((1, 21, 2), 100.0)  # every joint far outside the map ...
    cells[0, 0] = torch.tensor([1.5, 4.5])  # ... but the wrist and thumb1, bone 0, along row 4
    cells[0, 1] = torch.tensor([6.5, 4.5])
    cells[0, 2] = torch.tensor([6.5, 4.5])  # thumb1 -> thumb2 has zero length: it paints nothing
    uv = cells / size * 2 - 1
    features = torch.zeros(1, 21, 2)
    features[0, 0] = torch.tensor([1.0, 0.0])
    features[0, 1] = torch.tensor([0.0, 1.0])
    painted = bone_feature_map(uv, features, (size, size), radius=1.0)  # (1, 40, 8, 8)
    assert painted.shape == (1, len(BONE_PARENTS) * 2, size, size)
    bone0 = painted[0, :2]  # (2, 8, 8)
    assert torch.allclose(bone0[:, 4, 1], torch.tensor([1.0, 0.0]), atol=1e-5)  # at the wrist
    assert torch.allclose(bone0[:, 4, 6], torch.tensor([0.0, 1.0]), atol=1e-5)  # at thumb1
    assert torch.allclose(bone0[:, 4, 3], torch.tensor([0.6, 0.4]), atol=1e-5)  # 2 and 3 cells from the ends
    on_bone = torch.zeros(size, size, dtype=torch.bool)
    on_bone[4, 1:7] = True
    assert (bone0[:, ~on_bone] == 0).all()  # the neighbouring rows are 1 cell away: not < radius
    assert (painted[0, 2:4] == 0).all()  # bone 1 (zero length)


def test_dir_protocol_on_hand_made_predictions(hand_model):
    from eval.dir_protocol import DIRProtocol, dir_errors

    batch = _make_batch(hand_model, 3)
    gt = {side: batch.hand(side).verts_cam for side in ("right", "left")}
    regressor = {side: hand_model.j_regressor_for(side) for side in ("right", "left")}
    tips = tuple(hand_model.tip_verts.tolist())
    wrist = {side: torch.einsum("v,bvc->bc", regressor[side][0], gt[side]) for side in ("right", "left")}
    # Another size and place: the protocol roots each hand at its wrist and rescales it by its bone length.
    moved = 1.7 * (gt["right"] - wrist["right"][:, None]) + torch.tensor([0.3, -0.1, 0.2])
    verts_error, joints_error = dir_errors(moved, gt["right"], regressor["right"], tips)
    assert verts_error.abs().max() < 1e-6 and joints_error.abs().max() < 1e-6
    # A root-relative error stays: a quarter turn about the wrist.
    turn = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    turned = (gt["right"] - wrist["right"][:, None]) @ turn.T
    verts_error, _ = dir_errors(turned, gt["right"], regressor["right"], tips)
    expected = (turned - (gt["right"] - wrist["right"][:, None])).norm(dim=-1)
    assert torch.allclose(verts_error, expected, atol=1e-6)
    # The streaming evaluator: interacting samples with both meshes; the root error is the offset's error.
    protocol = DIRProtocol(j_regressor_right=regressor["right"], j_regressor_left=regressor["left"], tip_verts=tips)
    rel_root = wrist["left"] - wrist["right"] + torch.tensor([0.003, 0.004, 0.0])  # 5 mm off
    outputs = {"right_verts": gt["right"] * 2, "left_verts": gt["left"] - 1.0, "rel_root": rel_root}
    batch.hand_type[2] = "right"  # a single-hand frame does not count
    protocol.process(outputs, batch)
    results = protocol.evaluate()
    assert results["count_DIR"] == 2
    assert results["DIR_MPVPE"] == pytest.approx(0.0, abs=1e-3) and results["DIR_MPJPE"] == pytest.approx(0.0, abs=1e-3)
    assert results["DIR_root"] == pytest.approx(5.0, rel=1e-4)


def test_dir_augmentation_keeps_labels_consistent_and_draws_the_references_ranges(hand_model):
    from recon.archs.dir.augment import DIRAugment, motion_blur_kernel
    from recon.data import train_transform

    augment = DIRAugment((SIZE, SIZE))
    generator = torch.Generator().manual_seed(0)
    draws = [augment.draw(generator) for _ in range(400)]
    assert all(0.9 <= d["scale"] <= 1.1 and abs(d["rotation_deg"]) <= 180 for d in draws)
    assert all(max(abs(v) for v in d["shift"]) <= 10 * SIZE / 256 for d in draws)
    assert all(0.7 <= c <= 1.3 for d in draws for c in d["color"]) and all(abs(d["brightness"]) <= 0.05 for d in draws)
    blurs = [d["blur"] for d in draws if d["blur"] is not None]
    assert {size for size, _ in blurs} == set(range(3, 10)) and all(abs(angle) <= math.pi for _, angle in blurs)
    assert abs(len(blurs) / len(draws) - 0.3) < 0.07 and abs(sum(d["flip"] for d in draws) / len(draws) - 0.5) < 0.08
    assert max(abs(d["rotation_deg"]) for d in draws) > 170  # the full circle, not InterWild's clipped normal

    sample = _make_samples(hand_model, 1)[0]
    for seed in range(6):
        params = augment.draw(torch.Generator().manual_seed(seed))
        params.update(flip=seed % 2 == 1, blur=(5, 2.0) if seed < 3 else None)
        out = augment.apply(sample, params)
        assert out.image.shape == (3, SIZE, SIZE) and 0.0 <= float(out.image.min()) and float(out.image.max()) <= 1.0
        for side in ("right", "left"):
            hand = out.hand(side)  # 2D labels stay the projection of the (rotated, mirrored) 3D labels
            assert torch.allclose(hand.joints_img, project(hand.joints_cam, out.camera.K), atol=1e-3)
        assert out.meta["augment"]["flip"] == params["flip"]
    again = augment(sample, torch.Generator().manual_seed(7))
    assert torch.equal(again.image, augment(sample, torch.Generator().manual_seed(7)).image)  # seeded

    flat = motion_blur_kernel(5, 0.0)
    assert flat.sum().item() == pytest.approx(1.0) and torch.allclose(flat[2], torch.full((5,), 0.2), atol=1e-6)
    upright = motion_blur_kernel(5, 90.0)
    assert torch.allclose(upright[:, 2], torch.full((5,), 0.2), atol=1e-5)
    # DIR's profiles use it, for real and generated samples alike (mixing reuses train_transform)
    for profile in ("demo", "paper"):
        cfg = load_config(profile=profile, arch="dir")
        assert cfg.data.augmentation == "dir" and isinstance(train_transform(cfg), DIRAugment)


# -- training -----------------------------------------------------------------------------------------------------


def test_losses_fall_when_overfitting_four_samples(hand_model):
    torch.manual_seed(0)
    model = build_regressor("dir", **TINY)
    batch = _make_batch(hand_model, 4, seed=1)
    first = model.losses(model(batch), batch)
    names = {f"{n}_{i}" for n in ("joint_uv", "mesh_uv", "joint_xyz", "mesh_xyz", "edge", "normal", "offset") for i in range(3)}
    assert set(first) == names | {"seg", "lovasz", "dense"}
    history = overfit_history(model, batch, 12, 2e-3)
    assert sum(history[-1].values()) < 0.5 * sum(history[0].values())
    for name in ("mesh_xyz_0", "mesh_xyz_2", "joint_uv_2", "offset_2", "seg", "dense"):
        assert history[-1][name] < history[0][name], name


def test_dense_targets_match_the_rendered_sides(hand_model):
    model = build_regressor("dir", **TINY)
    batch = _make_batch(hand_model, 2)
    labels = model._labels(batch, hand_model, torch.float32)
    seg, dense, complete = model._dense_targets(batch, labels, (SIZE, SIZE))
    side = render_hands(
        batch.right.verts_cam, batch.left.verts_cam, hand_model.faces_for("right"), hand_model.faces_for("left"),
        batch.camera.K, (SIZE, SIZE),
    ).side  # 1 right, 2 left
    assert torch.equal(seg == SEG_RIGHT, side == 1) and torch.equal(seg == SEG_LEFT, side == 2)
    assert (dense.amax(1)[seg == 0] == 0).all() and (dense.amax(1)[seg > 0] > 0).all() and complete.all()
    # A present hand without a mesh makes the sample's targets incomplete.
    batch.left.mano_valid[1] = False
    labels = model._labels(batch, hand_model, torch.float32)
    assert model._dense_targets(batch, labels, (SIZE, SIZE))[2].tolist() == [True, False]


def test_profiles_and_the_cosine_schedule():
    from recon.train import lr_at

    paper = load_config(profile="paper", arch="dir")
    assert list(paper.data.image_size) == [256, 256] and paper.data.crop == "verts"  # IntagHand's crop, DIR's data
    assert paper.data.train_frames == "interacting_both_fits"
    assert paper.model.backbone == "resnet50" and paper.model.decoder_channels == 256
    assert (paper.optim.optimizer, paper.optim.schedule, paper.optim.lr, paper.optim.weight_decay) == ("adamw", "cosine", 5e-4, 0.01)
    assert paper.train.batch_size == 64 and paper.train.epochs == 50 and paper.optim.grad_clip == 0.0
    assert [lr_at(paper, epoch) for epoch in (0, 25, 50)] == pytest.approx([5e-4, 2.5e-4, 0.0], abs=1e-12)
    # With a step budget (recon.table2's equal-steps runs) the cosine anneals over the steps instead.
    capped = load_config(profile="paper", arch="dir", flags={"train.max_steps": 100})
    assert [lr_at(capped, 7, step) for step in (0, 50, 100)] == pytest.approx([5e-4, 2.5e-4, 0.0], abs=1e-12)
    kwargs = from_config(paper, DIR)
    assert kwargs["weight_coord"] == 10.0 and kwargs["bone_radius"] == [1.0, 2.0]
    demo = load_config(profile="demo", arch="dir")
    assert demo.model.backbone == "resnet18" and demo.data.image_size[0] % 32 == 0 and demo.optim.optimizer == "adam"


# -- recon.train with generated samples, ONNX, demo, DDP ------------------------------------------------------------

def _run_args(root, out, *extra: str) -> list:
    from tests.recon_helpers import arch_run_args

    return arch_run_args(root, out, "dir", TINY_ARGS, *extra)


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    """(synthlab root, run folder, result) of 2 steps of tiny DIR with half of each batch generated."""
    from tests.recon_helpers import tiny_mixed_run

    return tiny_mixed_run(tmp_path_factory, "dir", TINY_ARGS)


def test_trains_with_generated_samples_mixed_in(mixed_run):
    _, out, result = mixed_run
    assert result["step"] == 2 and result["mixing"]["taken"] == 2 * 2  # batch 4, r = 0.5
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("synthlab-test-lab", "synthlab-test-wild"):
        assert metrics[key]["count_MPVPE"] > 0 and math.isfinite(metrics[key]["MPVPE"]) and math.isfinite(metrics[key]["MRRPE"])
        assert {"DIR_MPVPE", "DIR_MPJPE", "DIR_root", "count_DIR"} <= metrics[key].keys()  # DIR's own protocol
    sidecar = json.loads(sorted((out / "checkpoints").glob("step_*.json"))[-1].read_text())
    assert sidecar["arch"] == "dir" and sidecar["model_kwargs"]["decoder_channels"] == 16


def test_onnx_export_matches_pytorch(mixed_run, tmp_path):
    pytest.importorskip("onnx", reason="ONNX export needs the 'export' extra (onnx)")
    pytest.importorskip("onnxruntime", reason="the comparison needs the 'export' extra (onnxruntime)")
    from recon import export as recon_export
    from recon import test as recon_test

    _, out, _ = mixed_run
    model, info = recon_test.load_regressor(out)
    path = tmp_path / "dir.onnx"
    names = recon_export.export_onnx(model, info, path, batch=2)
    assert names[:5] == ["right_verts", "left_verts", "right_joints", "left_joints", "rel_root"]
    assert {"right_joints_img", "right_mano_pose", "left_mano_shape"} <= set(names)
    diffs = recon_export.compare_with_onnxruntime(model, info, path, batch=2)
    assert set(diffs) == set(names) and max(diffs.values()) < 1e-4, diffs


def test_demo_with_boxes(mixed_run, tmp_path):
    from hands.datasets import build_dataset
    from recon import demo as recon_demo

    root, out, _ = mixed_run
    dataset = build_dataset("synthlab", root, "test-lab")
    sample = next(dataset[i] for i in range(len(dataset)) if bool(dataset[i].right.valid) and bool(dataset[i].left.valid))
    images = tmp_path / "images"
    images.mkdir()
    (images / "two.jpg").write_bytes(open(sample.meta["image_path"], "rb").read())
    boxes = {"two.jpg": {side: sample.hand(side).bbox.tolist() for side in ("right", "left")}}
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    demo_out = tmp_path / "demo"
    assert recon_demo.main(["--ckpt", str(out), "--input", str(images), "--out", str(demo_out), "--boxes", str(tmp_path / "boxes.json")]) == 0
    frame = json.loads((demo_out / "json" / "two.json").read_text())
    assert [hand["side"] for hand in frame["hands"]] == ["right", "left"] and len(frame["rel_root"]) == 3
    assert (demo_out / "overlays" / "two.png").is_file() and len(list((demo_out / "meshes").glob("two_*.obj"))) == 2


def test_torchrun_two_processes(mixed_run, tmp_path):
    from tests.recon_helpers import torchrun_two_processes

    root, _, _ = mixed_run
    out = tmp_path / "ddp"
    argv = _run_args(root, out, "--max-steps", "2", "--batch-size", "2", "eval.at_end=false")
    result = torchrun_two_processes(argv)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    meta = json.loads((out / "checkpoints" / "step_000002.json").read_text())
    assert meta["world_size"] == 2 and meta["arch"] == "dir"


def test_table2_puts_the_papers_and_dirs_own_numbers_beside_ours(tmp_path, capsys, monkeypatch):
    from recon import table2
    from tests.test_table2 import _fake_finished_runs, _no_training

    data = tmp_path / "data"
    for name in ("ih26m", "hic", "reih"):
        (data / name).mkdir(parents=True)
    argv = ["--arch", "dir", "--seeds", "2", "--data-root", str(data), "--datasets", "ih26m",
            "--test-datasets", "hic,reih,ih26m", "--out", str(tmp_path / "runs"), "--figure-samples", "0",
            "--schedule", "epochs", "--mean-pose-samples", "0"]
    values = {name: {"MPVPE": 20.0, "RRVE": 25.0, "MRRPE": 40.0} for name in ("hic", "reih")}
    values["ih26m"] = {"MPVPE": 11.0, "RRVE": 17.0, "MRRPE": 29.0, "DIR_MPVPE": 10.5, "DIR_MPJPE": 10.7, "DIR_root": 29.5}
    _fake_finished_runs(argv, {(r, s): values for r in (0.0, 0.3) for s in (0, 1)})
    _no_training(monkeypatch)
    assert table2.main(argv) == 0
    out = capsys.readouterr().out
    assert "| DIR (paper) | 21.89 | 26.11 | 43.11 |" in out  # the AttentionHand paper's Table 2 row
    assert "| DIR (r=0), ours |" in out and "10.50 ± 0.00 | 10.70 ± 0.00 | 29.50 ± 0.00 |" in out
    assert "| DIR README (2023 release) |" in out and "9.95 | 10.18 | 28.98 |" in out
    report = json.loads((tmp_path / "runs" / "mini-table2.json").read_text())
    own = report["own_protocol"]
    assert own["metrics"] == ["DIR_MPVPE", "DIR_MPJPE", "DIR_root"] and own["mean"]["0.3"]["ih26m"]["DIR_root"] == 29.5
    assert own["published"]["DIR README (2024 model)"] == {"ih26m": {"DIR_MPVPE": 10.0, "DIR_MPJPE": 10.23, "DIR_root": 29.26}}


def test_a_reference_checkpoint_converts_onto_our_names_and_shapes(tmp_path):
    """tests/data/dir_reference_state_dict.json.gz lists the reference DIR's state-dict names and shapes (its
    source says how). Every one maps onto the paper-size model with its shape, or is one of the documented drops;
    and a reference-format checkpoint ({"net": ...}) loads through --backbone-weights (here at tiny size: the names
    do not depend on the size). With the reference's modules at hand, /work/notes/dir/ref/compare.py found the
    converted model's stages equal to the reference's to float precision."""
    import gzip
    from pathlib import Path

    from recon.archs.dir.convert import convert_reference_state_dict

    data = Path(__file__).parent / "data" / "dir_reference_state_dict.json.gz"
    shapes = json.loads(gzip.open(data, "rt").read())["shapes"]
    reference = {key: torch.zeros(shape) for key, shape in shapes.items()}
    converted = convert_reference_state_dict(reference)
    paper = build_regressor("dir").state_dict()
    assert set(converted) == set(paper)
    assert all(converted[k].numel() == paper[k].numel() for k in paper)
    dropped = set(shapes) - {k for k in shapes if not k.startswith("backbone.fc.") and ".STEblocks.0." not in k
                             and not k.endswith("img_gird") and not k.startswith("seg_loss.")}
    assert len(shapes) - len(converted) == len(dropped) == 2 + 2 * 12 + 2 + 1  # fc, 2 x STE block 0, grids, CE weight

    torch.manual_seed(0)
    tiny = build_regressor("dir", **TINY)
    ours = tiny.state_dict()
    names = {f"backbone.{key[len('encoder.'):]}": key for key in ours if key.startswith("encoder.")}  # a ResNet-18
    for key in shapes:  # reference name -> our name, through the converter one key at a time
        mapped = convert_reference_state_dict({key: torch.zeros(1)})
        if mapped and not key.startswith("backbone.") and next(iter(mapped)) in ours:  # tiny: 1 graph layer, 1 block
            names[key] = next(iter(mapped))
    assert set(names.values()) == set(ours)
    state = {key: torch.randn(ours[name].shape) if ours[name].is_floating_point() else ours[name].clone()
             for key, name in names.items()}
    state = {key: value[None] if names[key].endswith((".edge_self", ".edge_neighbours")) else value for key, value in state.items()}
    torch.save({"net": state, "last_epoch": 49}, tmp_path / "DIR.pth")
    target = build_regressor("dir", **TINY)
    target.load_backbone_weights(str(tmp_path / "DIR.pth"))
    loaded = target.state_dict()
    assert torch.equal(loaded["stages.1.params.left.weight"], state["decoder.projecter_3.regressor.mano_left.weight"])
    assert torch.equal(loaded["stages.0.interaction.blocks.0.attn.qkv.weight"],
                       state["decoder.projecter_4.interaction.STEblocks.1.attn.qkv.weight"])
    assert torch.equal(loaded["stages.0.gcn.right.convs.0.edge_neighbours"],
                       state["decoder.projecter_4.gcn_right.gconv_layers.0.gconv.e_1"][0])
    torch.save({"net": {**state, "decoder.projecter_4.extra.weight": torch.zeros(1)}}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="decoder.projecter_4.extra.weight"):
        target.load_backbone_weights(str(tmp_path / "bad.pth"))


def test_check_reference_refuses_a_folder_without_the_reference(tmp_path, capsys):
    from recon.archs.dir import check_reference

    assert check_reference.main(["--reference", str(tmp_path)]) == 2
    assert "no models/dir.py" in capsys.readouterr().err


def test_recon_test_writes_a_predictions_figure(mixed_run, tmp_path):
    """recon.test --figure N: predictions-<test set>.png beside the metrics, N rows of input | GT | prediction."""
    import numpy as np
    from PIL import Image

    from recon import test as recon_test

    _, out, _ = mixed_run
    metrics = tmp_path / "metrics.json"
    argv = ["--ckpt", str(out), "--out", str(metrics), "--figure", "2", "--datasets", "synthlab:test-lab"]
    assert recon_test.main(argv) == 0
    assert "synthlab-test-lab" in json.loads(metrics.read_text())
    figure = np.asarray(Image.open(tmp_path / "predictions-synthlab-test-lab.png"))
    height, width, _ = figure.shape
    assert abs(width / height - 3 / 2) < 0.1 and figure.std() > 0  # 2 rows of 3 square tiles, not blank
