"""3D two-hand reconstruction metrics, exactly as InterWild's evaluation code defines them.

Conventions (stated once for the module):
- Inputs are in metres (camera axes); outputs are in millimetres, converted only through
  :func:`hands.units.to_mm`. Every function returns one value per sample, shape (B,).
- The wrist of a mesh is row 0 of MANO's joint regressor applied to *that* mesh: prediction and ground
  truth are each aligned at their own regressed wrist. No Procrustes alignment, no scale alignment.
- ``rel_root`` is the left wrist minus the right wrist, (B, 3), metres.
- Joints follow :mod:`hands.joints` (21 per hand, wrist first).

Which samples count towards a dataset's average differs per dataset (HIC, ReIH, IH2.6M); that is the
evaluator's job (:mod:`eval.evaluator`), not these functions'.

Bad input: a shape mismatch raises ``ValueError`` naming the argument. A *ground-truth* argument whose
values look like millimetres (:func:`hands.units.looks_like_mm`) raises ``ValueError``; a *predicted*
argument that looks like millimetres only warns (``UserWarning`` naming the argument), because a diverged
model can legitimately predict far-away points and its (large) error should still be reported. The unit
check reads a maximum back to the host; ``check_units=False`` skips it (the evaluator checks once per batch).
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from hands.units import looks_like_mm, to_mm

__all__ = [
    "NUM_VERTS",
    "wrist_from_verts",
    "align_at_wrist",
    "mpvpe",
    "rrve",
    "mrrpe",
    "per_joint_error",
    "mpjpe",
    "sum_over_ranks",
]

NUM_VERTS = 778


# ----------------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------------
def _check_points(
    x: Tensor, name: str, num: int | None, *, is_gt: bool, batch: int | None = None, check_units: bool = True
) -> None:
    """x: (B, num, 3) metres. Raises ValueError naming ``name`` on a wrong shape or mm-looking GT."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(x).__name__}")
    if num is None:
        ok = x.ndim == 2 and x.shape[-1] == 3
        want = "(B, 3)"
    else:
        ok = x.ndim == 3 and x.shape[-2:] == (num, 3)
        want = f"(B, {num}, 3)"
    if not ok:
        raise ValueError(f"{name}: expected shape {want}, got {tuple(x.shape)}")
    if batch is not None and x.shape[0] != batch:
        raise ValueError(f"{name}: batch size {x.shape[0]} does not match the other inputs' {batch}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a float tensor (metres), got {x.dtype}")
    if check_units:
        _check_units(x, name, is_gt=is_gt)


def _check_units(x: Tensor, name: str, *, is_gt: bool) -> None:
    if looks_like_mm(x.detach()):
        message = (
            f"{name}: values up to {x.detach().abs().max().item():.1f} look like millimetres; "
            "metrics take metres (convert with hands.units.mm_to_m)"
        )
        if is_gt:
            raise ValueError(message)
        warnings.warn(message, UserWarning, stacklevel=3)


def _check_regressor(j_regressor: Tensor, name: str = "j_regressor", num_verts: int = NUM_VERTS) -> None:
    if not isinstance(j_regressor, Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(j_regressor).__name__}")
    if j_regressor.ndim != 2 or j_regressor.shape[1] != num_verts or j_regressor.shape[0] < 1:
        raise ValueError(f"{name}: expected shape (J, {num_verts}) with row 0 = wrist, got {tuple(j_regressor.shape)}")


# ----------------------------------------------------------------------------------------------------
# wrist alignment
# ----------------------------------------------------------------------------------------------------
def wrist_from_verts(verts: Tensor, j_regressor: Tensor) -> Tensor:
    """The wrist regressed from a mesh.

    verts: (B, V, 3) mesh vertices, metres (any frame); j_regressor: (J, V), row 0 = wrist.
    Returns (B, 3) in the same frame and unit as ``verts``.
    """
    row = j_regressor[0].to(device=verts.device, dtype=verts.dtype)  # (V,)
    return torch.einsum("v,bvc->bc", row, verts)


def align_at_wrist(verts: Tensor, j_regressor: Tensor) -> Tensor:
    """verts: (B, V, 3) -> (B, V, 3) with the mesh's own regressed wrist moved to the origin."""
    return verts - wrist_from_verts(verts, j_regressor)[:, None, :]


# ----------------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------------
def mpvpe(pred_verts: Tensor, gt_verts: Tensor, j_regressor: Tensor, *, check_units: bool = True) -> Tensor:
    """Mean per-vertex position error of one hand.

    pred_verts, gt_verts: (B, 778, 3) one hand's meshes, metres (camera frame; absolute or wrist-relative).
    j_regressor: (J, 778) this hand's MANO joint regressor; row 0 gives the wrist.
    Each mesh is aligned at its own regressed wrist; returns the mean Euclidean vertex distance, (B,) mm.
    check_units=False skips the millimetre check (it reads values back to the host).
    """
    _check_regressor(j_regressor)
    _check_points(gt_verts, "gt_verts", NUM_VERTS, is_gt=True, check_units=check_units)
    _check_points(pred_verts, "pred_verts", NUM_VERTS, is_gt=False, batch=gt_verts.shape[0], check_units=check_units)
    pred = align_at_wrist(pred_verts, j_regressor)
    gt = align_at_wrist(gt_verts.to(pred.dtype), j_regressor)
    return to_mm((pred - gt).norm(dim=-1).mean(dim=-1))


def rrve(
    pred_right: Tensor,
    pred_left: Tensor,
    pred_rel_root: Tensor,
    gt_right: Tensor,
    gt_left: Tensor,
    gt_rel_root: Tensor,
    j_regressor: Tensor,
    j_regressor_left: Tensor | None = None,
    *,
    check_units: bool = True,
) -> Tensor:
    """Right-hand-relative vertex error of a two-hand mesh.

    pred_right, pred_left, gt_right, gt_left: (B, 778, 3) meshes, metres.
    pred_rel_root, gt_rel_root: (B, 3) left wrist minus right wrist, metres.
    j_regressor: (J, 778) regressor (row 0 = wrist) for the right mesh, and for the left one too unless
    ``j_regressor_left`` is given.
    Each mesh is aligned at its own wrist, then the left mesh is shifted by its rel_root (the ground-truth
    translation for the ground-truth mesh, the predicted one for the prediction); returns the mean
    Euclidean distance over all 1556 vertices, (B,) mm.
    """
    j_regressor_left = j_regressor if j_regressor_left is None else j_regressor_left
    _check_regressor(j_regressor)
    _check_regressor(j_regressor_left, "j_regressor_left")
    _check_points(gt_right, "gt_right", NUM_VERTS, is_gt=True, check_units=check_units)
    batch = gt_right.shape[0]
    for value, name, num, is_gt in (
        (gt_left, "gt_left", NUM_VERTS, True),
        (gt_rel_root, "gt_rel_root", None, True),
        (pred_right, "pred_right", NUM_VERTS, False),
        (pred_left, "pred_left", NUM_VERTS, False),
        (pred_rel_root, "pred_rel_root", None, False),
    ):
        _check_points(value, name, num, is_gt=is_gt, batch=batch, check_units=check_units)
    dtype = pred_right.dtype
    pred = torch.cat(
        [
            align_at_wrist(pred_right, j_regressor),
            align_at_wrist(pred_left, j_regressor_left) + pred_rel_root[:, None, :],
        ],
        dim=1,
    )  # (B, 1556, 3)
    gt = torch.cat(
        [
            align_at_wrist(gt_right.to(dtype), j_regressor),
            align_at_wrist(gt_left.to(dtype), j_regressor_left) + gt_rel_root.to(dtype)[:, None, :],
        ],
        dim=1,
    )  # (B, 1556, 3)
    return to_mm((pred - gt).norm(dim=-1).mean(dim=-1))


def mrrpe(pred_rel_root: Tensor, gt_rel_root: Tensor, *, check_units: bool = True) -> Tensor:
    """Mean relative-root position error.

    pred_rel_root, gt_rel_root: (B, 3) left wrist minus right wrist, metres.
    Returns the Euclidean norm of their difference, (B,) mm.
    """
    _check_points(gt_rel_root, "gt_rel_root", None, is_gt=True, check_units=check_units)
    _check_points(pred_rel_root, "pred_rel_root", None, is_gt=False, batch=gt_rel_root.shape[0], check_units=check_units)
    return to_mm((pred_rel_root - gt_rel_root.to(pred_rel_root.dtype)).norm(dim=-1))


def per_joint_error(pred_joints: Tensor, gt_joints: Tensor, *, check_units: bool = True) -> Tensor:
    """Per-joint position error after aligning each hand's joints at its own wrist (joint 0).

    pred_joints, gt_joints: (B, 21, 3) one hand's joints, metres, wrist first.
    Returns (B, 21) Euclidean distances in mm (the wrist's is 0 by construction).
    """
    if not isinstance(gt_joints, Tensor) or gt_joints.ndim != 3:
        raise ValueError(f"gt_joints: expected shape (B, J, 3), got {tuple(getattr(gt_joints, 'shape', ()))}")
    _check_points(gt_joints, "gt_joints", gt_joints.shape[-2], is_gt=True, check_units=check_units)
    _check_points(
        pred_joints, "pred_joints", gt_joints.shape[-2], is_gt=False, batch=gt_joints.shape[0], check_units=check_units
    )
    pred = pred_joints - pred_joints[:, :1]
    gt = gt_joints.to(pred.dtype) - gt_joints.to(pred.dtype)[:, :1]
    return to_mm((pred - gt).norm(dim=-1))


def mpjpe(
    pred_joints: Tensor, gt_joints: Tensor, joints_valid: Tensor | None = None, *, check_units: bool = True
) -> Tensor:
    """Mean per-joint position error of one hand, wrist-aligned (no Procrustes, no scaling).

    pred_joints, gt_joints: (B, 21, 3) metres, wrist first; joints_valid: (B, 21) bool, the joints that
    count (default all). Returns (B,) mm, the mean over each sample's valid joints (NaN where none is).
    """
    errors = per_joint_error(pred_joints, gt_joints, check_units=check_units)  # (B, J)
    if joints_valid is None:
        return errors.mean(dim=-1)
    if tuple(joints_valid.shape) != tuple(errors.shape):
        raise ValueError(f"joints_valid: expected shape {tuple(errors.shape)}, got {tuple(joints_valid.shape)}")
    weight = joints_valid.to(errors.dtype)
    return (errors * weight).sum(-1) / weight.sum(-1)  # 0/0 -> NaN where no joint is valid


def sum_over_ranks(stats: Tensor, distributed: bool = True) -> Tensor:
    """A copy of ``stats`` summed over ranks when ``distributed`` and torch.distributed is initialised (on the
    current CUDA device under NCCL), on the CPU. A collective then: call it on every rank."""
    import torch.distributed as dist

    stats = stats.clone()
    if distributed and dist.is_available() and dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        stats = stats.to(device)
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
    return stats.cpu()
