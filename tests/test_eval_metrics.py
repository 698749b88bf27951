"""eval.metrics against a naive NumPy reference (loops, written from FACTS.md §1) and hand-computed cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from eval import metrics

V = 778


def random_regressor(num_joints: int = 16, seed: int = 0) -> torch.Tensor:
    """A row-stochastic (J, 778) regressor: each joint is a convex combination of a few vertices."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(num_joints, V, generator=gen) * (torch.rand(num_joints, V, generator=gen) < 0.02)
    weights[:, 0] += 1e-3  # no empty row
    return (weights / weights.sum(1, keepdim=True)).double()


def random_hands(batch: int, seed: int) -> torch.Tensor:
    """(B, 778, 3) hand-sized random point clouds at random places in front of the camera, metres."""
    gen = torch.Generator().manual_seed(seed)
    centre = torch.tensor([0.0, 0.0, 0.6]) + 0.2 * torch.randn(batch, 1, 3, generator=gen)
    return (centre + 0.05 * torch.randn(batch, V, 3, generator=gen)).double()


# ---- naive NumPy reference -------------------------------------------------------------------------
def np_wrist(mesh: np.ndarray, reg: np.ndarray) -> np.ndarray:
    out = np.zeros(3)
    for v in range(mesh.shape[0]):
        out += reg[0, v] * mesh[v]
    return out


def np_mpvpe(pred, gt, reg):
    out = []
    for b in range(pred.shape[0]):
        p = pred[b] * 1000 - np_wrist(pred[b] * 1000, reg)
        g = gt[b] * 1000 - np_wrist(gt[b] * 1000, reg)
        out.append(np.mean([np.sqrt(np.sum((p[v] - g[v]) ** 2)) for v in range(p.shape[0])]))
    return np.array(out)


def np_rrve(pr, pl, prel, gr, gl, grel, reg_r, reg_l):
    out = []
    for b in range(pr.shape[0]):
        p = np.concatenate(
            [pr[b] - np_wrist(pr[b], reg_r), pl[b] - np_wrist(pl[b], reg_l) + prel[b]]
        ) * 1000
        g = np.concatenate(
            [gr[b] - np_wrist(gr[b], reg_r), gl[b] - np_wrist(gl[b], reg_l) + grel[b]]
        ) * 1000
        out.append(np.mean([np.linalg.norm(p[v] - g[v]) for v in range(p.shape[0])]))
    return np.array(out)


def np_mpjpe(pred, gt, valid):
    out = []
    for b in range(pred.shape[0]):
        errs = [
            np.linalg.norm((pred[b, j] - pred[b, 0]) - (gt[b, j] - gt[b, 0])) * 1000
            for j in range(pred.shape[1])
            if valid[b, j]
        ]
        out.append(np.mean(errs) if errs else np.nan)
    return np.array(out)


# ---- against the reference ---------------------------------------------------------------------------
def test_mpvpe_matches_naive_reference():
    reg = random_regressor()
    pred, gt = random_hands(3, 1), random_hands(3, 2)
    got = metrics.mpvpe(pred, gt, reg)
    assert got.shape == (3,)
    np.testing.assert_allclose(got.numpy(), np_mpvpe(pred.numpy(), gt.numpy(), reg.numpy()), rtol=1e-9)


def test_rrve_matches_naive_reference_with_two_regressors():
    reg_r, reg_l = random_regressor(seed=1), random_regressor(seed=2)
    pr, pl, gr, gl = (random_hands(2, s) for s in (3, 4, 5, 6))
    prel = torch.randn(2, 3, dtype=torch.float64) * 0.1
    grel = torch.randn(2, 3, dtype=torch.float64) * 0.1
    got = metrics.rrve(pr, pl, prel, gr, gl, grel, reg_r, j_regressor_left=reg_l)
    want = np_rrve(*(t.numpy() for t in (pr, pl, prel, gr, gl, grel, reg_r, reg_l)))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9)


def test_mrrpe_and_mpjpe_match_naive_reference():
    prel, grel = torch.randn(5, 3).double() * 0.1, torch.randn(5, 3).double() * 0.1
    want = np.array([np.linalg.norm(p - g) * 1000 for p, g in zip(prel.numpy(), grel.numpy())])
    np.testing.assert_allclose(metrics.mrrpe(prel, grel).numpy(), want, rtol=1e-9)

    pred = torch.randn(4, 21, 3).double() * 0.05
    gt = torch.randn(4, 21, 3).double() * 0.05
    valid = torch.rand(4, 21) > 0.3
    valid[3] = False  # no valid joint -> NaN
    got = metrics.mpjpe(pred, gt, valid).numpy()
    want = np_mpjpe(pred.numpy(), gt.numpy(), valid.numpy())
    np.testing.assert_allclose(got[:3], want[:3], rtol=1e-9)
    assert np.isnan(got[3])
    np.testing.assert_allclose(
        metrics.mpjpe(pred, gt).numpy(), np_mpjpe(pred.numpy(), gt.numpy(), np.ones((4, 21), bool)), rtol=1e-9
    )


# ---- small cases computed by hand --------------------------------------------------------------------
def one_hot_wrist_regressor() -> torch.Tensor:
    reg = torch.zeros(16, V, dtype=torch.float64)
    reg[0, 0] = 1.0  # the wrist is vertex 0
    reg[1:, 1] = 1.0
    return reg


def test_mpvpe_by_hand():
    reg = one_hot_wrist_regressor()
    gt = random_hands(1, 7)
    # a rigid translation is removed by the wrist alignment
    assert metrics.mpvpe(gt + torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64), gt, reg).item() == pytest.approx(0, abs=1e-9)
    # one non-wrist vertex moved by 0.778 m -> mean over 778 vertices = 1 mm
    pred = gt.clone()
    pred[0, 10, 0] += 0.778
    assert metrics.mpvpe(pred, gt, reg).item() == pytest.approx(1.0, abs=1e-9)
    # moving the wrist vertex by 3-4-0 cm shifts every other vertex by 5 cm after alignment
    pred = gt.clone()
    pred[0, 0] += torch.tensor([0.03, 0.04, 0.0], dtype=torch.float64)
    assert metrics.mpvpe(pred, gt, reg).item() == pytest.approx(50.0 * 777 / 778, abs=1e-9)


def test_rrve_and_mrrpe_by_hand():
    reg = one_hot_wrist_regressor()
    gt_right, gt_left = random_hands(1, 8), random_hands(1, 9)
    gt_rel = torch.tensor([[0.2, 0.0, 0.0]], dtype=torch.float64)
    pred_rel = gt_rel + torch.tensor([[0.003, 0.004, 0.0]], dtype=torch.float64)  # 5 mm off
    # the meshes are perfect up to a translation: only the left half (778 of 1556 vertices) is 5 mm off
    got = metrics.rrve(gt_right + 1.0, gt_left - 1.0, pred_rel, gt_right, gt_left, gt_rel, reg)
    assert got.item() == pytest.approx(2.5, abs=1e-9)
    assert metrics.mrrpe(pred_rel, gt_rel).item() == pytest.approx(5.0, abs=1e-9)


def test_metrics_keep_gradients_and_dtype():
    reg = random_regressor().float()
    pred = random_hands(2, 1).float().requires_grad_()
    out = metrics.mpvpe(pred, random_hands(2, 2).float(), reg)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()


# ---- bad input ---------------------------------------------------------------------------------------
def test_shape_mismatch_names_the_argument():
    reg = random_regressor()
    gt = random_hands(2, 1)
    with pytest.raises(ValueError, match="pred_verts"):
        metrics.mpvpe(gt[:, :700], gt, reg)
    with pytest.raises(ValueError, match="pred_verts.*batch size"):
        metrics.mpvpe(gt[:1], gt, reg)
    with pytest.raises(ValueError, match="j_regressor"):
        metrics.mpvpe(gt, gt, reg[:, :700])
    with pytest.raises(ValueError, match="gt_rel_root"):
        metrics.mrrpe(torch.zeros(2, 3), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="joints_valid"):
        metrics.mpjpe(torch.zeros(2, 21, 3), torch.zeros(2, 21, 3), torch.ones(2, 20, dtype=torch.bool))


def test_millimetre_inputs_error_for_gt_and_warn_for_predictions():
    reg = random_regressor()
    gt = random_hands(2, 1)
    with pytest.raises(ValueError, match="gt_verts.*millimetres"):
        metrics.mpvpe(gt, gt * 1000, reg)
    with pytest.warns(UserWarning, match="pred_rel_root.*millimetres"):
        value = metrics.mrrpe(torch.full((2, 3), 150.0), torch.zeros(2, 3))
    assert torch.allclose(value, torch.full((2,), 150.0 * 3**0.5 * 1000))


def _sum_worker(rank: int, init: str, queue) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        stats = torch.tensor([[1.0 + rank, 2.0], [3.0, 4.0 * rank]], dtype=torch.float64)
        summed = metrics.sum_over_ranks(stats)
        alone = metrics.sum_over_ranks(stats, distributed=False)
        queue.put((rank, summed.tolist(), alone.tolist(), stats.tolist()))
    finally:
        torch.distributed.destroy_process_group()


def test_sum_over_ranks_sums_a_copy_and_leaves_the_input(tmp_path):
    stats = torch.ones(2, 2, dtype=torch.float64)
    copy = metrics.sum_over_ranks(stats)  # torch.distributed not initialised: a copy
    copy += 1
    assert stats.tolist() == [[1.0, 1.0], [1.0, 1.0]] and copy.device.type == "cpu"
    import torch.multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    init = str(tmp_path / "init")
    procs = [ctx.Process(target=_sum_worker, args=(r, init, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {rank: rest for rank, *rest in (queue.get(timeout=60) for _ in procs)}
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    for rank, (summed, alone, left) in results.items():
        assert summed == [[3.0, 4.0], [6.0, 4.0]]  # summed over both ranks
        assert alone == left == [[1.0 + rank, 2.0], [3.0, 4.0 * rank]]  # distributed=False and the input untouched
