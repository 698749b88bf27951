"""HandEvaluator with the project's hand model (procedural MANO-format files) and on the dataset readers'
own output (tiny fixtures in each real layout): the readers' validity flags and rel_root meet each
dataset's rules, so a perfect prediction scores 0 mm over exactly the samples the rules count."""
from __future__ import annotations

import pytest
import torch

from eval.evaluator import HandEvaluator, Prediction
from hands.datasets import build_dataset
from hands.datasets.fixtures import REIH_TEST_CAPTURE, write_hic_fixture, write_ih26m_fixture, write_reih_fixture
from hands.sample import collate
from tests.test_eval_evaluator import make_batch


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("ATTENTIONHAND_CACHE", str(tmp_path_factory.mktemp("cache")))
    from hands.mano import HandModel

    yield HandModel()
    mp.undo()


def perfect_prediction(batch) -> Prediction:
    """The ground truth, wrist-relative (as regressors output it) and with the batch's rel_root."""
    return Prediction(
        right_verts=batch.right.verts_cam - batch.right.root_cam[:, None],
        left_verts=batch.left.verts_cam - batch.left.root_cam[:, None],
        right_joints=batch.right.joints_cam - batch.right.joints_cam[:, :1],
        left_joints=batch.left.joints_cam - batch.left.joints_cam[:, :1],
        rel_root=batch.rel_root,
    )


def evaluate(model, dataset):
    batch = collate([dataset[i] for i in range(len(dataset))])
    evaluator = HandEvaluator(j_regressor_right=model.j_regressor_for("right"), j_regressor_left=model.j_regressor_for("left"))
    evaluator.process(perfect_prediction(batch), batch)  # rules from meta["dataset"]
    return evaluator.evaluate()


def assert_zero_with_counts(results, counts):
    for metric, (single, interacting) in counts.items():
        assert (results[f"count_{metric}_single"], results[f"count_{metric}_interacting"]) == (single, interacting), metric
        assert results[metric] == pytest.approx(0.0, abs=1e-3), metric


def test_hic_reader_and_rules(model, tmp_path):
    # interacting, right, left, interacting, right, left; 640x480 (hands outside the image are not valid)
    write_hic_fixture(tmp_path, model, count=6)
    results = evaluate(model, build_dataset("hic", tmp_path, "test", hand_model=model))
    assert_zero_with_counts(results, {"MPVPE": (4, 4), "RRVE": (0, 2), "MRRPE": (0, 2)})


def test_ih26m_reader_and_rules(model, tmp_path):
    # frames 0, 2 interacting, 1, 3 right only; frame 0's left hand has no MANO fit (its joints are valid)
    write_ih26m_fixture(tmp_path, model, frames=4, cameras=1, size=(24, 32), null_fit=(0, "left"))
    results = evaluate(model, build_dataset("ih26m", tmp_path, "test", hand_model=model))
    assert_zero_with_counts(results, {"MPVPE": (2, 3), "RRVE": (0, 1), "MRRPE": (0, 2)})


@pytest.mark.parametrize("wrist", [41, 20])  # IH2.6M's left wrist, right wrist
def test_ih26m_hand_with_an_invalid_wrist_is_dropped_as_interwild_does(model, tmp_path, wrist):
    """InterWild's loader: a hand whose wrist is invalid loses all its joints, its box and its MANO fit, so it is
    neither evaluated nor counted as interacting for RRVE, and no relative root comes from its zeroed wrist."""
    # frames 0, 2 interacting, 1, 3 right only; frame 0's wrist `wrist` is invalid
    write_ih26m_fixture(tmp_path, model, frames=4, cameras=1, size=(24, 32), invalid_joint=(0, wrist))
    dataset = build_dataset("ih26m", tmp_path, "test", hand_model=model)
    frame0 = next(dataset[i] for i in range(len(dataset)) if dataset[i].meta["frame_idx"] == 0)
    dropped, kept = ("left", "right") if wrist == 41 else ("right", "left")
    assert not bool(frame0.hand(dropped).valid) and not bool(frame0.hand(dropped).mano_valid)
    assert not bool(frame0.hand(dropped).joints_valid.any())
    assert bool(frame0.hand(kept).valid) and bool(frame0.hand(kept).mano_valid)
    assert frame0.hand_type == "interacting" and not bool(frame0.rel_root_valid)  # the annotation's type is kept

    # a perfect prediction whose relative root is off by 10 mm: RRVE moves the left mesh (half the vertices)
    batch = collate([dataset[i] for i in range(len(dataset))])
    prediction = perfect_prediction(batch)
    prediction.rel_root = batch.rel_root + torch.tensor([0.010, 0.0, 0.0])
    evaluator = HandEvaluator(j_regressor_right=model.j_regressor_for("right"), j_regressor_left=model.j_regressor_for("left"))
    evaluator.process(prediction, batch)
    results = evaluator.evaluate()
    # InterWild's counts: MPVPE single = frames 1, 3; interacting = frame 0's kept hand + both of frame 2;
    # RRVE and MRRPE: frame 2 only (frames 1 and 3 have no left wrist)
    counts = {"MPVPE": (2, 3), "RRVE": (0, 1), "MRRPE": (0, 1)}
    for metric, (single, interacting) in counts.items():
        assert (results[f"count_{metric}_single"], results[f"count_{metric}_interacting"]) == (single, interacting), metric
    assert results["MPVPE"] == pytest.approx(0.0, abs=1e-3)
    assert results["RRVE"] == pytest.approx(5.0, abs=1e-3)  # 10 mm on 778 of 1556 vertices
    assert results["MRRPE"] == pytest.approx(10.0, abs=1e-3)
    # the dropped hand's joints are not evaluated: 5 hands x 21 joints (4 right + 1 left, or 3 right + 2 left)
    assert results["count_MPJPE"] == 5 * 21


def test_hic_hand_out_of_the_frame_is_evaluated_as_interwild_does(model, tmp_path):
    """InterWild's HIC evaluation scores every hand that has a mesh; a hand outside the image is valid in 3D
    (its 2D joints truncated), so it counts for MPVPE, RRVE and MRRPE."""
    import trimesh

    write_hic_fixture(tmp_path, model, count=3)  # interacting, right, left
    ply = tmp_path / "meshes" / "0000_left.ply"
    mesh = trimesh.load(ply, process=False)
    mesh.vertices = mesh.vertices + [0.6, 0.0, 0.0]  # 0.6 m to the right at 0.5 m depth: far outside 640 px
    mesh.export(ply)
    dataset = build_dataset("hic", tmp_path, "test", hand_model=model)
    left = dataset[0].left
    assert bool(left.valid) and float(left.joints_img[:, 0].min()) > 640
    results = evaluate(model, dataset)
    assert_zero_with_counts(results, {"MPVPE": (2, 2), "RRVE": (0, 1), "MRRPE": (0, 1)})


def test_reih_reader_and_rules(model, tmp_path):
    write_reih_fixture(tmp_path, model, captures=(REIH_TEST_CAPTURE,), frames=(0, 6), cameras=1, size=(24, 32), ego=False)
    results = evaluate(model, build_dataset("reih", tmp_path, "test", hand_model=model))
    assert results["skipped"] == 0
    total = results["count_MRRPE"]
    assert total == 2 and results["count_MPVPE"] == 2 * total and results["count_RRVE"] == total
    for metric in ("MPVPE", "RRVE", "MRRPE"):
        assert results[metric] == pytest.approx(0.0, abs=1e-3), metric


# ---- with the project's hand model (procedural MANO-format files) ------------------------------------
def test_with_the_procedural_hand_model(model):
    """The model's regressed wrist (j_regressor row 0) is its joint 0, so HIC's mesh-wrist rel_root and
    IH2.6M's joint-wrist rel_root agree; a perturbed pose gives a positive MPVPE, a translation none."""
    gen = torch.Generator().manual_seed(0)
    pose = {s: 0.3 * torch.randn(2, 48, generator=gen) for s in ("right", "left")}
    shape = torch.zeros(2, 10)
    trans = {"right": torch.tensor([[-0.05, 0.0, 0.5]] * 2), "left": torch.tensor([[0.06, 0.01, 0.5]] * 2)}
    gt = {s: model(s, pose[s], shape, trans[s]) for s in ("right", "left")}
    batch = make_batch(["interacting", "interacting"], dataset="hic")
    for side in ("right", "left"):
        hand = batch.hand(side)
        hand.verts_cam, hand.joints_cam = gt[side].verts, gt[side].joints
        hand.joints_valid[:] = True
    moved = {s: model(s, pose[s] + 0.1 * torch.randn(2, 48, generator=gen), shape) for s in ("right", "left")}
    pred = Prediction(
        right_verts=moved["right"].verts, left_verts=moved["left"].verts,
        right_joints=moved["right"].joints, left_joints=moved["left"].joints,
        rel_root=gt["left"].joints[:, 0] - gt["right"].joints[:, 0],
    )
    results = {}
    for rules in ("hic", "ih26m"):
        evaluator = HandEvaluator(
            j_regressor_right=model.j_regressor_for("right"), j_regressor_left=model.j_regressor_for("left"), rules=rules
        )
        evaluator.process(pred, batch)
        results[rules] = evaluator.evaluate()
    assert results["hic"]["MRRPE"] == pytest.approx(0.0, abs=1e-3)
    assert results["ih26m"]["MRRPE"] == pytest.approx(0.0, abs=1e-3)
    assert results["hic"]["RRVE"] == pytest.approx(results["ih26m"]["RRVE"], rel=1e-5)
    assert 1.0 < results["hic"]["MPVPE"] < 100.0  # a 0.1 rad pose perturbation: millimetres, not metres
    same = HandEvaluator(j_regressor_right=model.j_regressor, rules="hic")
    same.process(Prediction(gt["right"].verts - 0.2, gt["left"].verts + 0.1, gt["right"].joints, gt["left"].joints,
                            pred.rel_root), batch)
    assert same.evaluate()["MPVPE"] == pytest.approx(0.0, abs=1e-3)
