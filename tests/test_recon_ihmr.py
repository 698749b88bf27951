"""IHMR (recon.archs.ihmr): the collision term against a brute-force signed distance on small meshes and on
the hand, positive for interpenetrating hands and zero for separated ones; outputs in the project's contract;
the training phases (baseline, then one refinement stage at a time) and the stages' per-sample selection;
losses falling when overfitting 4 rendered samples; IHMR-OPT lowering the collision term; recon.train /
recon.test --optimize / ONNX end to end on a tiny run. Tiny models (narrow ResNet-18, 64 x 64 images)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hands.mano import HandModel
from hands.sample import collate
from recon import test as recon_test
from recon import train as recon_train
from recon.archs.ihmr.collision import (
    close_boundary,
    collision_loss,
    penetration_depth,
    point_triangle_distance,
    ray_parity,
    surface_distance,
    winding_number,
)
from recon.archs.ihmr.model import IHMR, PARAM_SLICES, STAGES, _accepted, decode_params
from recon.archs.ihmr.optimize import finger_regulariser
from recon.config import from_config, load_config
from recon.registry import build_regressor
from tests.recon_helpers import (
    overfit_history,
    rendered_two_hand_samples,
    write_tiny_synthlab,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SIZE = 64
TINY = dict(backbone="resnet18", backbone_kwargs=dict(channels=[8, 16, 32, 64], stem_width=8))
TINY_ARGS = [
    "model.backbone=resnet18",
    "model.backbone_kwargs.channels=[8,16,32,64]",
    "model.backbone_kwargs.stem_width=8",
    "data.image_size=[64,64]",
    "train.image_every=0",
]


@pytest.fixture(scope="module")
def hand_model() -> HandModel:
    return HandModel()


# -- brute-force references (plain Python/NumPy, one point and one triangle at a time) ---------------------


def _closest_point_on_triangle(p, a, b, c):
    """Ericson, Real-Time Collision Detection, 5.1.5: the closest point of triangle abc to p."""
    ab, ac, ap = b - a, c - a, p - a
    d1, d2 = ab @ ap, ac @ ap
    if d1 <= 0 and d2 <= 0:
        return a
    bp = p - b
    d3, d4 = ab @ bp, ac @ bp
    if d3 >= 0 and d4 <= d3:
        return b
    vc = d1 * d4 - d3 * d2
    if vc <= 0 and d1 >= 0 and d3 <= 0:
        return a + d1 / (d1 - d3) * ab
    cp = p - c
    d5, d6 = ab @ cp, ac @ cp
    if d6 >= 0 and d5 <= d6:
        return c
    vb = d5 * d2 - d1 * d6
    if vb <= 0 and d2 >= 0 and d6 <= 0:
        return a + d2 / (d2 - d6) * ac
    va = d3 * d6 - d5 * d4
    if va <= 0 and d4 - d3 >= 0 and d5 - d6 >= 0:
        return b + (d4 - d3) / ((d4 - d3) + (d5 - d6)) * (c - b)
    denom = 1.0 / (va + vb + vc)
    return a + ab * (vb * denom) + ac * (vc * denom)


def _ray_hits(p, direction, a, b, c) -> bool:
    """Moller-Trumbore: does the ray p + t d (t > 0) cross triangle abc?"""
    e1, e2 = b - a, c - a
    h = np.cross(direction, e2)
    det = e1 @ h
    if abs(det) < 1e-12:
        return False
    s = p - a
    u = (s @ h) / det
    if u < 0 or u > 1:
        return False
    q = np.cross(s, e1)
    v = (direction @ q) / det
    if v < 0 or u + v > 1:
        return False
    return (e2 @ q) / det > 0


def _brute_depth(points, verts, faces, closing):
    """Per point: inside by ray parity (another direction than ours) on the closed mesh, depth = the distance
    to the nearest triangle (closing faces excluded) when inside, else 0."""
    direction = np.array([-0.3, 0.7, -0.64])
    out = []
    for p in points:
        crossings = sum(_ray_hits(p, direction, *verts[f]) for f in np.concatenate([faces, closing]))
        if crossings % 2 == 0:
            out.append(0.0)
            continue
        out.append(min(np.linalg.norm(p - _closest_point_on_triangle(p, *verts[f])) for f in faces))
    return np.array(out)


def _bumpy_icosahedron(seed: int):
    """A closed, irregular 20-triangle mesh (outward winding) of radius ~1."""
    t = (1 + 5**0.5) / 2
    verts = np.array([[-1, t, 0], [1, t, 0], [-1, -t, 0], [1, -t, 0], [0, -1, t], [0, 1, t], [0, -1, -t],
                      [0, 1, -t], [t, 0, -1], [t, 0, 1], [-t, 0, -1], [-t, 0, 1]], dtype=np.float64)
    verts /= np.linalg.norm(verts, axis=1, keepdims=True)
    verts *= np.random.default_rng(seed).uniform(0.8, 1.2, size=(12, 1))
    faces = np.array([[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9], [5, 11, 4],
                      [11, 10, 2], [10, 7, 6], [7, 1, 8], [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8],
                      [3, 8, 9], [4, 9, 5], [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1]])
    return verts, faces


# -- the collision term ------------------------------------------------------------------------------------


def test_point_triangle_distance_matches_the_closest_point_reference():
    rng = np.random.default_rng(0)
    triangles = rng.normal(size=(30, 3, 3))
    points = rng.normal(size=(40, 3)) * 1.5
    ours = point_triangle_distance(torch.from_numpy(points), torch.from_numpy(triangles)).numpy()
    brute = np.array([[np.linalg.norm(p - _closest_point_on_triangle(p, *t)) for t in triangles] for p in points])
    np.testing.assert_allclose(ours, brute, atol=1e-9)
    # surface_distance (only the triangles that can be nearest) equals the minimum over all of them
    verts, faces = _bumpy_icosahedron(1)
    pts = torch.from_numpy(rng.normal(size=(200, 3)))
    dense = point_triangle_distance(pts, torch.from_numpy(verts[faces])).min(dim=1).values
    assert torch.allclose(surface_distance(pts, torch.from_numpy(verts), torch.from_numpy(faces)), dense, atol=1e-12)


def test_inside_tests_and_depth_match_brute_force_on_a_closed_mesh():
    verts, faces = _bumpy_icosahedron(2)
    points = np.random.default_rng(3).uniform(-1.3, 1.3, size=(300, 3))
    no_caps = np.zeros((0, 3), dtype=np.int64)
    brute = _brute_depth(points, verts, faces, no_caps)
    assert 20 < (brute > 0).sum() < 280  # both cases are exercised
    pts, v, f = torch.from_numpy(points), torch.from_numpy(verts), torch.from_numpy(faces)
    assert torch.equal(ray_parity(pts, v[f]), torch.from_numpy(brute > 0))
    assert torch.equal(winding_number(pts, v[f]).abs() > 0.5, torch.from_numpy(brute > 0))
    assert close_boundary(f).shape == (0, 3)  # already closed
    depth = penetration_depth(pts, v, f)
    np.testing.assert_allclose(depth.numpy(), brute, atol=1e-9)


def test_depth_inside_the_hand_matches_brute_force(hand_model):
    faces = hand_model.faces_for("right")
    caps = close_boundary(faces)
    # MANO's wrist opening (16 boundary edges) closed by a 14-triangle fan: every edge then has two faces
    assert caps.shape == (14, 3)
    edges = torch.cat([faces, caps])[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2).sort(dim=1).values
    assert torch.unique(edges, dim=0, return_counts=True)[1].eq(2).all()
    verts = hand_model("right", torch.randn(1, 48, generator=torch.Generator().manual_seed(0)) * 0.2,
                       torch.zeros(1, 10)).verts[0].double()
    normals = torch.zeros_like(verts).index_add_(
        0, faces.flatten(), torch.cross(verts[faces[:, 1]] - verts[faces[:, 0]], verts[faces[:, 2]] - verts[faces[:, 0]],
                                        dim=-1).repeat_interleave(3, 0))
    normals = normals / normals.norm(dim=1, keepdim=True)
    index = torch.arange(0, 778, 39)
    points = torch.cat([verts[index] - 0.003 * normals[index], verts[index] + 0.003 * normals[index]])  # in, out
    brute = _brute_depth(points.numpy(), verts.numpy(), faces.numpy(), caps.numpy())
    assert (brute[: len(index)] > 0).mean() > 0.8 and (brute[len(index):] == 0).mean() > 0.8
    depth = penetration_depth(points, verts, faces, caps)
    np.testing.assert_allclose(depth.numpy(), brute, atol=1e-9)


def _two_hands(hand_model, offset: float, n: int = 2):
    """Right and left hands posed alike, the left one's middle knuckle at the right one's plus ``offset``
    along z (0: deep interpenetration)."""
    gen = torch.Generator().manual_seed(4)
    pose = torch.randn(n, 48, generator=gen) * 0.2
    right = hand_model("right", pose, torch.zeros(n, 10))
    left = hand_model("left", pose, torch.zeros(n, 10))
    shift = right.joints[:, 9] - left.joints[:, 9] + torch.tensor([0.0, 0.0, offset])
    return right.verts, left.verts + shift[:, None]


def test_collision_is_positive_for_interpenetrating_hands_and_zero_for_separated(hand_model):
    faces_right, faces_left = hand_model.faces_for("right"), hand_model.faces_for("left")
    right, left = _two_hands(hand_model, 0.0)
    right = right.clone().requires_grad_(True)
    loss, depth_sum = collision_loss(right, left, faces_right, faces_left)
    assert (loss > 0).all() and (depth_sum > 0).all()
    loss.sum().backward()
    moved = right.grad.abs().sum(-1) > 0  # only the penetrating vertices are pushed
    inside = penetration_depth(right[0].detach(), left[0], faces_left) > 0
    assert torch.equal(moved[0], inside)
    with torch.no_grad():  # a small step against the gradient lowers the term
        stepped, _ = collision_loss(right - 1e-4 * right.grad / right.grad.abs().max(), left, faces_right, faces_left)
    assert (stepped < loss.detach()).all()
    apart_right, apart_left = _two_hands(hand_model, 0.3)
    loss, depth_sum = collision_loss(apart_right, apart_left, faces_right, faces_left)
    assert torch.equal(loss, torch.zeros(2)) and torch.equal(depth_sum, torch.zeros(2))
    # the reference's units: sum over both hands of depth / (other hand's 1.2 x half box side) / 4
    right, left = _two_hands(hand_model, 0.0, n=1)
    loss, _ = collision_loss(right, left, faces_right, faces_left)
    expected = 0.0
    for points, verts, faces in ((right[0], left[0], faces_left), (left[0], right[0], faces_right)):
        scale = 1.2 * 0.5 * (verts.amax(0) - verts.amin(0)).max()
        expected += float(penetration_depth(points, verts, faces).sum() / scale / 4)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# -- the regressor -------------------------------------------------------------------------------------------


def _rendered_batch(hand_model: HandModel, n: int, seed: int = 0):
    """n rendered two-hand samples (64 x 64) with consistent 3D, 2D and MANO labels, collated."""
    return collate(rendered_two_hand_samples(hand_model, n, seed, size=SIZE, offset=0.05))


def test_outputs_follow_the_contract(hand_model):
    torch.manual_seed(0)
    model = build_regressor("ihmr", **TINY).eval()
    assert isinstance(model, IHMR)
    batch = _rendered_batch(hand_model, 2)
    with torch.no_grad():
        out = model(batch)
    out.validate(2)
    params = out.extras["params"]
    assert params.shape == (2, 122) and len(out.extras["stages"]) == len(STAGES) == 6
    assert out.extras["keypoints_3d"].shape == (2, 42, 3) and out.extras["hand_prob"].shape == (2, 2)
    assert torch.equal(out.rel_root, params[:, PARAM_SLICES["trans"]])
    for side in ("right", "left"):
        verts, joints = out.side(side)
        assert torch.allclose(joints[:, 0], torch.zeros(2, 3), atol=1e-7)  # each hand rooted at its wrist
        mano = hand_model(side, getattr(out, f"{side}_mano_pose"), getattr(out, f"{side}_mano_shape"))
        assert torch.allclose(verts, mano.verts - mano.joints[:, :1], atol=1e-6)  # metres, MANO's own mesh
    # the 2D joints: weak perspective of the right-wrist frame, in input pixels
    decoded = decode_params(hand_model, params)
    cam = params[:, PARAM_SLICES["cam"]]
    expected = (cam[:, None, :1] * (decoded.joints[:, :21, :2] + cam[:, None, 1:]) + 1) * SIZE / 2
    assert torch.allclose(out.right_joints_img, expected, atol=1e-5)
    # refine off: IHMR-Baseline, the regression's own output
    baseline = build_regressor("ihmr", **TINY, refine=False).eval()
    baseline.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        plain = baseline(batch)
    assert torch.equal(plain.extras["params"], out.extras["baseline"].params) and plain.extras["stages"] == []


def test_a_stage_keeps_an_update_only_where_it_lowers_both_criteria():
    stage = STAGES[0]
    old = {"joints_3d_p": torch.tensor([1.0, 1.0, 1.0, 1.0]), "collision": torch.tensor([2.0, 2.0, 0.0, 2.0]),
           "joints_2d_p": torch.zeros(4)}
    new = {"joints_3d_p": torch.tensor([0.5, 1.5, 0.5, 0.5]), "collision": torch.tensor([1.0, 1.0, 0.0, 3.0]),
           "joints_2d_p": torch.zeros(4)}
    # strictly lower joint deviation and collision (mlp_model.select_better_params): a sample without
    # collision never takes a collision stage's update
    assert _accepted(stage, new, old).tolist() == [True, False, False, False]
    cam = STAGES[-1]
    assert cam.update == ("cam",) and cam.select == "joints_2d_p"
    old["joints_2d_p"], new["joints_2d_p"] = torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([0.5, 1.0, 2.0, 0.0])
    assert _accepted(cam, new, old).tolist() == [True, False, False, True]


def test_training_phases_follow_the_reference_schedule(hand_model):
    torch.manual_seed(0)
    model = build_regressor("ihmr", **TINY, baseline_epochs=2, stage_epochs=[1, 1, 1, 1, 1, 2]).train()
    assert model.total_epochs() == 9
    assert [model.set_epoch(e) or model.active_stage() for e in range(10)] == [-1, -1, 0, 1, 2, 3, 4, 5, 5, 5]
    batch = _rendered_batch(hand_model, 2, seed=2)
    baseline_terms = {"joints_2d", "joints_3d", "pose", "shape", "trans", "shape_reg", "hand_type", "keypoints"}
    for epoch, active in ((0, None), (3, "refine_left_orient")):
        model.set_epoch(epoch)
        model.zero_grad()
        losses = model.losses(model(batch), batch)
        assert set(losses) == baseline_terms | {f"refine_{s.name}" for s in STAGES}
        sum(losses.values()).backward()
        # every parameter takes part (DDP), the parts that do not learn at weight 0
        assert all(p.grad is not None for p in model.parameters())
        learning = {name for name, value in losses.items() if value.item() != 0.0}
        if active is None:
            assert learning == baseline_terms
            assert all(float(p.grad.abs().sum()) == 0 for p in model.refiners.parameters())
        else:
            assert learning == {active}
            assert float(model.backbone.conv1.weight.grad.abs().sum()) == 0  # the baseline is fixed
            assert float(model.refiners[1].net[0].weight.grad.abs().sum()) > 0
            assert float(model.refiners[0].net[0].weight.grad.abs().sum()) == 0


def test_losses_fall_when_overfitting_four_rendered_samples(hand_model):
    torch.manual_seed(0)
    model = build_regressor("ihmr", **TINY).train()
    batch = _rendered_batch(hand_model, 4, seed=1)
    history = overfit_history(model, batch, 10, 1e-3)
    assert sum(history[-1].values()) < 0.5 * sum(history[0].values())
    for name in ("joints_2d", "pose", "shape", "hand_type", "keypoints"):
        assert history[-1][name] < history[0][name], name


def test_finger_regulariser_is_zero_for_straight_fingers_and_positive_for_twisted_ones():
    straight = torch.zeros(1, 42, 3)
    straight[0, :, 0] = torch.arange(42.0) * 0.01  # all joints on a line
    assert finger_regulariser(straight).item() == pytest.approx(0.0, abs=1e-12)
    twisted = straight.clone()
    twisted[0, 2] += torch.tensor([0.0, 0.01, 0.0])
    twisted[0, 3] += torch.tensor([0.0, 0.0, 0.01])
    assert finger_regulariser(twisted).item() > 0


def test_test_time_optimisation_lowers_the_collision_term(hand_model):
    torch.manual_seed(0)
    model = build_regressor("ihmr", **TINY).eval()
    batch = _rendered_batch(hand_model, 1)
    with torch.no_grad():
        out = model(batch)
    # interpenetrating hands, with keypoints 5 cm apart: the predictions the optimisation starts from
    params = out.extras["params"].clone()
    params[:, PARAM_SLICES["trans"]] = 0.0
    start = decode_params(hand_model, params)
    meet = start.joints[:, 9] - start.joints[:, 21 + 9]
    params[:, PARAM_SLICES["trans"]] = meet + torch.tensor([0.0, 0.0, 0.01])
    target = params.clone()
    target[:, PARAM_SLICES["trans"]] = meet + torch.tensor([0.0, 0.0, 0.06])
    goal = decode_params(hand_model, target)
    out.extras.update(params=params, hand_prob=torch.ones(1, 2), keypoints_3d=goal.joints, keypoints_2d=goal.joints_2d)
    before = model.collision(decode_params(hand_model, params))
    assert before.item() > 1.0
    result = model.test_time_optimize(batch, out, iterations=10)
    result.validate(1)
    after = result.extras["opt_collision"]
    assert torch.allclose(result.extras["opt_collision_before"], before)
    assert after.item() < 0.9 * before.item()  # each stage keeps only records that cut it by >= 9.9 %
    assert torch.allclose(model.collision(decode_params(hand_model, result.extras["opt_params"])), after)


def test_config_profiles(tmp_path):
    paper = load_config(profile="paper", arch="ihmr")
    assert list(paper.data.image_size) == [224, 224] and paper.data.crop == "hands"
    assert paper.model.backbone == "resnet50" and paper.train.batch_size == 64 and paper.optim.lr == 1e-4
    kwargs = from_config(paper, IHMR)
    assert kwargs["baseline_epochs"] == 20 and kwargs["stage_epochs"] == [2, 2, 2, 2, 2, 5]
    assert paper.train.epochs == kwargs["baseline_epochs"] + sum(kwargs["stage_epochs"])
    demo = load_config(profile="demo", arch="ihmr")
    kwargs = from_config(demo, IHMR)
    assert demo.train.epochs == kwargs["baseline_epochs"] + sum(kwargs["stage_epochs"])
    with pytest.raises(ValueError, match="stage_epochs"):
        build_regressor("ihmr", **TINY, stage_epochs=[1, 1])


# -- end to end ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny ihmr run on a tiny synthlab: one baseline epoch, then the trans stage (3 steps each)."""
    root = write_tiny_synthlab(tmp_path_factory.mktemp("synthlab_ihmr"))
    out = tmp_path_factory.mktemp("ihmr_run")
    argv = [
        "--arch", "ihmr", "--data-root", str(root), "--datasets", "synthlab", "--test-datasets", "synthlab:test-lab",
        "--out", str(out), "--batch-size", "4", "--seed", "3", "--epochs", "2", *TINY_ARGS,
        "model.baseline_epochs=1", "model.stage_epochs=[1,0,0,0,0,0]",
    ]
    assert recon_train.main(argv) == 0
    return root, out


def test_recon_train_and_test_with_the_optimisation_stage(tiny_run, tmp_path):
    root, out = tiny_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["synthlab-test-lab"]["count_MPVPE"] > 0 and math.isfinite(metrics["synthlab-test-lab"]["MPVPE"])
    plain, optimised = tmp_path / "plain.json", tmp_path / "opt.json"
    base = ["--ckpt", str(out), "--datasets", "synthlab:test-lab", "--max-samples", "2"]
    assert recon_test.main([*base, "--out", str(plain)]) == 0
    assert recon_test.main([*base, "--out", str(optimised), "--optimize", "--opt-iterations", "2"]) == 0
    for path in (plain, optimised):
        result = json.loads(path.read_text())["synthlab-test-lab"]
        assert result["count_MPVPE"] == 2 and math.isfinite(result["MPVPE"])
    assert recon_test.main([*base, "--opt-iterations", "2"]) == 2  # only with --optimize


def test_onnx_export_of_the_regressor(tiny_run, tmp_path):
    pytest.importorskip("onnx", reason="ONNX export needs the 'export' extra (onnx)")
    pytest.importorskip("onnxruntime", reason="the comparison needs the 'export' extra (onnxruntime)")
    from recon import export as recon_export

    _, out = tiny_run
    model, info = recon_test.load_regressor(out)
    path = tmp_path / "ihmr.onnx"
    names = recon_export.export_onnx(model, info, path, batch=1)
    assert names[:5] == ["right_verts", "left_verts", "right_joints", "left_joints", "rel_root"]
    diffs = recon_export.compare_with_onnxruntime(model, info, path, batch=1)
    assert max(diffs.values()) < 1e-4, diffs


def _tiny_argv(root, out, *extra: str) -> list:
    return [
        "--arch", "ihmr", "--data-root", str(root), "--datasets", "synthlab", "--test-datasets", "synthlab:test-lab",
        "--out", str(out), "--batch-size", "4", "--seed", "3", *TINY_ARGS, *extra,
    ]


def test_trains_with_generated_samples_in_every_batch(tiny_run, tmp_path):
    root, _ = tiny_run
    gen = ["mixing.size=32", "mixing.num_inference_steps=2", "mixing.chunk=4", "mixing.capacity=8", "mixing.max_reuse=2"]
    argv = _tiny_argv(root, tmp_path / "mix", "--synthetic-ratio", "0.5", "--max-steps", "2", "--mix-mode", "sync",
                      "eval.at_end=false", "model.baseline_epochs=0", *gen)
    result = recon_train.train(recon_train.parse_args(argv))
    assert result["step"] == 2 and result["mixing"]["taken"] == 2 * 2  # batch 4, r = 0.5


def test_torchrun_two_processes(tiny_run, tmp_path):
    root, _ = tiny_run
    out = tmp_path / "ddp"
    argv = _tiny_argv(root, out, "--epochs", "2", "--batch-size", "2", "model.baseline_epochs=1",
                      "model.stage_epochs=[0,0,0,1,0,0]")
    from tests.recon_helpers import torchrun_two_processes

    result = torchrun_two_processes(argv, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    meta = json.loads((out / "checkpoints" / "step_000006.json").read_text())  # 12 images / 2 ranks / 2 = 3 a epoch
    assert meta["world_size"] == 2 and meta["epoch"] == 2
    metrics = json.loads((out / "metrics.json").read_text())["synthlab-test-lab"]
    single = tmp_path / "single.json"
    assert recon_test.main(["--ckpt", str(out), "--out", str(single)]) == 0  # every test sample counted once
    assert json.loads(single.read_text())["synthlab-test-lab"]["count_MPVPE"] == metrics["count_MPVPE"] > 0


def test_table2_puts_the_papers_ihm_row_beside_ours():
    from eval.report import PAPER_TABLE2
    from recon.table2 import paper_method

    assert paper_method("ihmr") == "IHM"
    assert PAPER_TABLE2["IHM"]["hic"]["MPVPE"] == 38.57 and PAPER_TABLE2["IHM"]["ih26m"]["MRRPE"] == 33.39


def test_recon_demo_runs_an_ihmr_checkpoint(tiny_run, tmp_path):
    from recon import demo as recon_demo

    root, out = tiny_run
    image = sorted((root / "images" / "test-lab").rglob("*.jpg"))[0]
    assert recon_demo.main(["--ckpt", str(out), "--input", str(image), "--out", str(tmp_path / "demo")]) == 0
    record = json.loads((tmp_path / "demo" / "json" / f"{image.stem}.json").read_text())
    assert len(record["hands"]) == 2 and (tmp_path / "demo" / "overlays" / f"{image.stem}.png").is_file()
    hand = record["hands"][0]
    assert len(hand["mano_pose"]) == 48 and len(hand["joints_cam"]) == 21


def test_ihmr_protocol_against_a_direct_computation(hand_model):
    from recon.archs.ihmr.protocol import IHMRProtocol, inter_joint_errors

    batch = _rendered_batch(hand_model, 2, seed=5)
    right, left = _two_hands(hand_model, 0.0, n=2)
    right_joints = torch.stack([batch.right.joints_cam[b] - batch.right.joints_cam[b, :1] for b in range(2)])
    right_joints[:, 1:] += 0.01
    left_joints = torch.stack([batch.left.joints_cam[b] - batch.left.joints_cam[b, :1] for b in range(2)])
    rel_root = batch.rel_root + torch.tensor([0.02, 0.0, 0.0])
    outputs = {"right_joints": right_joints, "left_joints": left_joints, "rel_root": torch.zeros(2, 3),
               "right_verts": right, "left_verts": left}
    protocol = IHMRProtocol(faces_right=hand_model.faces_for("right"), faces_left=hand_model.faces_for("left"))
    protocol.process(outputs, batch)
    result = protocol.evaluate()
    # per-hand wrist-aligned: the right joints off by (1, 1, 1) cm except the wrist, the left exact
    expected = (20 * 3**0.5 * 10 + 0) / 42  # mm, pooled over 42 joints
    assert result["IHMR_MPJPE"] == pytest.approx(expected, rel=1e-5)
    # the interacting MPJPE is invariant to a per-axis scale and shift of the prediction
    pred = torch.cat([right_joints[0], left_joints[0] + rel_root[0]])
    gt = torch.cat([batch.right.joints_cam[0], batch.left.joints_cam[0]]).double()
    valid = torch.ones(42, dtype=torch.bool)
    moved = pred.double() * torch.tensor([2.0, 0.5, 3.0]) + torch.tensor([1.0, -2.0, 0.3])
    assert torch.allclose(inter_joint_errors(moved, gt, valid), inter_joint_errors(pred.double(), gt, valid), atol=1e-9)
    # collision: both hands interpenetrate (rel_root 0 in outputs): mean and max depth, mm
    depth = torch.cat([penetration_depth(right[0], left[0], hand_model.faces_for("left")),
                       penetration_depth(left[0], right[0], hand_model.faces_for("right"))])
    assert result["count_IHMR_collision"] == 2 and result["IHMR_collision_max"] > result["IHMR_collision_ave"] > 0
    depth_1 = torch.cat([penetration_depth(right[1], left[1], hand_model.faces_for("left")),
                         penetration_depth(left[1], right[1], hand_model.faces_for("right"))])
    assert result["IHMR_collision_ave"] == pytest.approx(float(depth.mean() + depth_1.mean()) / 2 * 1000, rel=1e-4)


def test_backbone_weights_load_and_a_wrong_file_is_refused(tmp_path):
    torch.manual_seed(0)
    source = build_regressor("ihmr", **TINY, refine=False)
    path = tmp_path / "backbone.pt"
    torch.save(source.backbone.state_dict(), path)
    target = build_regressor("ihmr", **TINY, refine=False)
    target.load_backbone_weights(str(path))
    for key, value in source.backbone.state_dict().items():
        assert torch.equal(target.backbone.state_dict()[key], value)
    torch.save({"not_a_layer.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not fit the backbone"):
        target.load_backbone_weights(str(tmp_path / "bad.pt"))


def test_optimize_is_refused_for_a_regressor_without_one(tiny_run, tmp_path, capsys):
    from tests.recon_helpers import run_args

    root, _ = tiny_run
    out = tmp_path / "baseline"
    assert recon_train.main(run_args(root, out, "--max-steps", "1", "eval.at_end=false")) == 0
    assert recon_test.main(["--ckpt", str(out), "--optimize", "--max-samples", "1"]) == 2
    assert "--optimize: regressor 'baseline' has no test-time optimisation" in capsys.readouterr().err


def test_trains_under_bf16_mixed_precision(tiny_run, tmp_path):
    root, _ = tiny_run
    out = tmp_path / "bf16"
    argv = _tiny_argv(root, out, "--epochs", "2", "train.amp=bf16", "model.baseline_epochs=1",
                      "model.stage_epochs=[1,0,0,0,0,0]")
    assert recon_train.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())["synthlab-test-lab"]
    assert math.isfinite(metrics["MPVPE"]) and math.isfinite(metrics["IHMR_collision_ave"])


def test_the_paper_profile_anneals_like_the_reference_per_phase():
    """IHMR's update_learning_rate: 0.5 (1 + cos(pi e / T)) x 1e-4 after epoch e, T = 20 for the baseline
    (train_baseline.sh) and the --total_epoch default 100 within each refinement stage (train_mlp.py)."""
    import math

    from recon.train import lr_at

    paper = load_config(profile="paper", arch="ihmr")
    cos = lambda e, t: 1e-4 * 0.5 * (1 + math.cos(math.pi * e / t))  # noqa: E731
    assert lr_at(paper, 0) == pytest.approx(1e-4) and lr_at(paper, 10) == pytest.approx(cos(10, 20))
    assert lr_at(paper, 19) == pytest.approx(cos(19, 20))
    assert lr_at(paper, 20) == pytest.approx(1e-4)  # stage 1 restarts
    assert lr_at(paper, 21) == pytest.approx(cos(1, 100))
    assert lr_at(paper, 30) == pytest.approx(1e-4) and lr_at(paper, 34) == pytest.approx(cos(4, 100))  # stage 6: 5 epochs
    assert lr_at(paper, 40) == pytest.approx(cos(5, 100))  # past the last phase: where its cosine ends


def test_cosine_phases_are_checked():
    from recon.train import UsageError, check_config

    with pytest.raises(UsageError, match="optim.cosine_periods"):
        check_config(load_config(profile="demo", arch="ihmr", flags={"optim.cosine_phases": [2, 3], "optim.cosine_periods": [2]}))
