"""Streaming two-hand evaluator (detectron2 style: ``reset`` / ``process`` / ``evaluate``) applying each
dataset's rules of which samples count, as InterWild's evaluation code does (FACTS.md §1).

The prediction contract (``eval`` never imports ``recon``; ``recon.output.TwoHandOutput`` satisfies it,
and so does :class:`Prediction` or a plain dict with these keys):

- ``right_verts``, ``left_verts``: (B, 778, 3) predicted meshes, camera axes, metres. Absolute, or each
  relative to its own wrist: the metrics re-align every mesh at its own regressed wrist anyway.
- ``right_joints``, ``left_joints``: (B, 21, 3) predicted joints, camera axes, metres, wrist first
  (:mod:`hands.joints` order); absolute or wrist-relative (re-aligned at joint 0).
- ``rel_root``: (B, 3) predicted left wrist minus right wrist, camera axes, metres.

The ground truth is the :class:`hands.sample.HandBatch` the prediction was made from (same order, same B).

Rules (``rules=`` or each sample's ``meta["dataset"]``):

========== ================================== ============================ ==============================
rules      MPVPE (per hand)                   RRVE (per sample)            MRRPE (per sample)
========== ================================== ============================ ==============================
hic        each present hand (``valid``) of   interacting frames with both interacting frames with both
           its frame's type                   meshes; GT rel_root from the meshes; GT rel_root from the
                                              GT meshes' regressed wrists  GT meshes' regressed wrists
reih       both hands of every sample         every sample; GT rel_root =  every sample, same GT rel_root
                                              ``batch.rel_root`` (the
                                              reader fills it from the
                                              keypoint wrists)
ih26m,     the frame type's hand(s) with a    interacting frames with both both wrists valid
synthlab   MANO fit (``mano_valid``)          fits and both wrists valid;  (``joints_valid`` and
                                              GT rel_root from the GT 3D   ``joints_trunc``), any hand
                                              joints' wrists               type; GT rel_root from the GT
                                                                           3D joints' wrists
========== ================================== ============================ ==============================

"single-hand frame of type right" counts only the right hand's MPVPE (and vice versa). Every value is
also split by the frame's ``hand_type`` into ``_single`` (right/left) and ``_interacting``.

MPJPE follows InterWild's aggregation: wrist-aligned per-joint errors on the counted joints (and a counted GT
wrist, needed for the alignment), averaged per joint over samples, then over joints; a joint counts when it has
``joints_valid`` (3D) and, under the ih26m/synthlab rules, also ``joints_trunc`` (InterWild's ``joint_trunc``:
2D-flagged and inside the image), which also decides the wrists of MRRPE and RRVE there;
"all" averages the single and interacting per-joint means together (42 + 42 values). GT joints are
``batch.<side>.joints_cam`` for every rule set (InterWild regresses ReIH's from the GT mesh instead).

Which hands are present is the readers' business: the IH2.6M reader (as InterWild's loader) drops a hand
whose wrist is invalid, MANO fit included, so nothing here is derived from an invalid wrist; the RRVE rule
also requires both wrists so that a reader which keeps such a hand cannot score RRVE against a zeroed wrist.

Deviations from the reference code, chosen on purpose:
- IH2.6M validity: MPJPE's joints and MRRPE's / RRVE's wrists count with ``joints_trunc`` as the reference's
  ``joint_trunc`` does, and also need the 3D flag (``joints_valid``): the reference reads ``joint_cam``, whose
  3D-invalid joints it has set to a 1 mm filler, and would score a prediction against that filler.
- HIC MRRPE also requires both GT meshes (the reference regresses a wrist from an all-zero mesh when an
  "interacting" frame misses one, which is a bug, not a rule).
- ReIH samples missing a hand's mesh (``valid``/``mano_valid`` False) or the GT rel_root
  (``rel_root_valid`` False) cannot be scored; they are skipped and counted in ``skipped``.

Everything accumulates as sums and counts on the inputs' device; ``process`` reads back one small
tensor per batch (the millimetre check of every input at once, see :mod:`eval.metrics`); under
``torch.distributed`` :meth:`HandEvaluator.evaluate` sums them over ranks, so a
multi-rank evaluation gives the numbers of a single-rank one.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from hands.sample import HandBatch
from hands.units import looks_like_mm
from . import metrics

__all__ = [
    "RULES",
    "TwoHandPrediction",
    "Prediction",
    "rules_for_dataset",
    "HandEvaluator",
]

RULES = ("ih26m", "reih", "hic", "synthlab")
MESH_METRICS = ("MPVPE", "RRVE", "MRRPE")
SPLITS = ("single", "interacting")

# meta["dataset"] prefixes -> rule set (the longest matching prefix wins; case-insensitive)
_DATASET_PREFIXES = {
    "ih26m": "ih26m",
    "interhand26m": "ih26m",
    "interhand2.6m": "ih26m",
    "reih": "reih",
    "reinterhand": "reih",
    "hic": "hic",
    "synthlab": "synthlab",
}

PRED_FIELDS = ("right_verts", "left_verts", "right_joints", "left_joints", "rel_root")


@runtime_checkable
class TwoHandPrediction(Protocol):
    """What :meth:`HandEvaluator.process` reads from a prediction (see the module docstring)."""

    right_verts: Tensor
    left_verts: Tensor
    right_joints: Tensor
    left_joints: Tensor
    rel_root: Tensor


@dataclass
class Prediction:
    """A plain prediction container with the fields of :class:`TwoHandPrediction`.

    right_verts, left_verts: (B, 778, 3) metres; right_joints, left_joints: (B, 21, 3) metres, wrist first;
    rel_root: (B, 3) left wrist minus right wrist, metres. Camera axes throughout.
    """

    right_verts: Tensor
    left_verts: Tensor
    right_joints: Tensor
    left_joints: Tensor
    rel_root: Tensor


def rules_for_dataset(name: str) -> str:
    """Map a dataset name (``meta["dataset"]``, e.g. "ih26m", "ReIH", "synthlab-test-wild") to its rule set."""
    lowered = str(name).strip().lower()
    matches = [prefix for prefix in _DATASET_PREFIXES if lowered.startswith(prefix)]
    if not matches:
        raise ValueError(
            f"meta['dataset']={name!r}: no evaluation rules for this dataset; "
            f"known: {sorted(_DATASET_PREFIXES)} (or pass rules= one of {RULES})"
        )
    return _DATASET_PREFIXES[max(matches, key=len)]


def _pred_field(outputs, name: str) -> Tensor:
    value = outputs.get(name) if isinstance(outputs, Mapping) else getattr(outputs, name, None)
    if value is None:
        raise ValueError(f"outputs.{name}: missing; a prediction needs {PRED_FIELDS}")
    return value


def _check_units_once(gt: dict[str, Tensor], pred: dict[str, Tensor]) -> None:
    """Millimetre check (hands.units.looks_like_mm) of many tensors with one host read-back in the
    common case: ground truth in mm raises ValueError, predictions in mm warn; both name the tensor."""
    named = list(gt.items()) + list(pred.items())
    device = named[0][1].device
    # each tensor's largest finite magnitude, (N,) on the device; non-finite values are ignored
    maxima = torch.stack([
        torch.nan_to_num(t.detach().to(device), nan=0.0, posinf=0.0, neginf=0.0).abs().amax().float()
        for _, t in named
    ])
    if not looks_like_mm(maxima):
        return
    for index, (name, tensor) in enumerate(named):  # the rare failure path: find the culprit(s)
        if looks_like_mm(tensor.detach()):
            message = (
                f"{name}: values up to {float(tensor.detach().abs().max()):.1f} look like millimetres; "
                "the evaluator takes metres (convert with hands.units.mm_to_m)"
            )
            if index < len(gt):
                raise ValueError(message)
            warnings.warn(message, UserWarning, stacklevel=3)


class HandEvaluator:
    """MPVPE / RRVE / MRRPE / MPJPE over a stream of (prediction, HandBatch) pairs, one dataset's rules.

    Args (keyword-only):
        j_regressor_right: (J, 778) the right MANO joint regressor (row 0 = wrist), e.g.
            ``hands.mano.HandModel().j_regressor``.
        j_regressor_left: (J, 778) the left one; defaults to ``j_regressor_right``.
        rules: one of :data:`RULES`; ``None`` reads each sample's ``meta["dataset"]`` (all samples an
            evaluator sees must map to one rule set: use one evaluator per dataset).
        distributed: sum the statistics over ranks in :meth:`evaluate` when torch.distributed is initialised.
    """

    def __init__(
        self,
        *,
        j_regressor_right: Tensor,
        j_regressor_left: Tensor | None = None,
        rules: str | None = None,
        distributed: bool = True,
    ) -> None:
        metrics._check_regressor(j_regressor_right, "j_regressor_right")
        j_regressor_left = j_regressor_right if j_regressor_left is None else j_regressor_left
        metrics._check_regressor(j_regressor_left, "j_regressor_left")
        if rules is not None and rules not in RULES:
            raise ValueError(f"rules={rules!r}: expected one of {RULES}")
        self.j_regressor_right = j_regressor_right
        self.j_regressor_left = j_regressor_left
        self.rules = rules
        self.distributed = distributed
        self.reset()

    # ------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything processed so far."""
        self._seen_rules: str | None = self.rules
        self._mesh_stats: Tensor | None = None  # (3 metrics, 2 splits, [sum, count])
        self._joint_stats: Tensor | None = None  # (2 splits, 2 sides * J joints, [sum, count])
        self._skipped: Tensor | None = None  # () number of skipped samples

    def _batch_rules(self, batch: HandBatch) -> str:
        if self.rules is not None:
            return self.rules
        found = {rules_for_dataset(m.get("dataset", "")) for m in batch.meta}
        if self._seen_rules is not None:
            found.add(self._seen_rules)
        if len(found) != 1:
            raise ValueError(
                f"meta['dataset']: this evaluator got samples with different rules {sorted(found)}; "
                "use one HandEvaluator per dataset"
            )
        self._seen_rules = found.pop()
        return self._seen_rules

    def _init_stats(self, device: torch.device, num_joints: int) -> None:
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self._mesh_stats = torch.zeros(len(MESH_METRICS), len(SPLITS), 2, dtype=dtype, device=device)
        self._joint_stats = torch.zeros(len(SPLITS), 2 * num_joints, 2, dtype=dtype, device=device)
        self._skipped = torch.zeros((), dtype=dtype, device=device)

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def process(self, outputs: TwoHandPrediction | Mapping, batch: HandBatch) -> None:
        """Accumulate one batch. outputs: see the module docstring; batch: the ground truth (B samples)."""
        rules = self._batch_rules(batch)
        pred = {name: _pred_field(outputs, name) for name in PRED_FIELDS}
        batch_size = len(batch)
        for name, value in pred.items():
            if not isinstance(value, Tensor) or value.shape[:1] != (batch_size,):
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"outputs.{name}: expected a leading batch dimension {batch_size}, got {shape}")
        device = pred["right_verts"].device
        # at least float32: half-precision outputs (autocast) would lose sub-millimetre errors
        dtype = torch.promote_types(pred["right_verts"].dtype, torch.float32)
        pred = {name: value.detach().to(device=device, dtype=dtype) for name, value in pred.items()}
        batch = batch.to(device)
        num_joints = batch.right.joints_cam.shape[1]
        if self._mesh_stats is None:
            self._init_stats(device, num_joints)
        jr = self.j_regressor_right.to(device=device, dtype=dtype)
        jl = self.j_regressor_left.to(device=device, dtype=dtype)

        right, left = batch.right, batch.left
        right_valid, left_valid = right.valid.bool(), left.valid.bool()
        right_fit, left_fit = right.mano_valid.bool(), left.mano_valid.bool()
        right_joints_valid, left_joints_valid = right.joints_valid.bool(), left.joints_valid.bool()
        hand_type = batch.hand_type
        is_right_frame = torch.tensor([t == "right" for t in hand_type], device=device)
        is_left_frame = torch.tensor([t == "left" for t in hand_type], device=device)
        interacting = torch.tensor([t == "interacting" for t in hand_type], device=device)
        split = interacting.long()  # (B,) 0 single, 1 interacting

        gt_right_verts = right.verts_cam.to(dtype)
        gt_left_verts = left.verts_cam.to(dtype)
        skipped = torch.zeros(batch_size, dtype=torch.bool, device=device)

        # 1. which samples count, and the ground-truth relative root translation, per rule set
        if rules == "hic":
            count_right = right_valid & (is_right_frame | interacting)
            count_left = left_valid & (is_left_frame | interacting)
            both = interacting & right_valid & left_valid
            count_rrve, count_mrrpe = both, both
            gt_rel_root = metrics.wrist_from_verts(gt_left_verts, jl) - metrics.wrist_from_verts(gt_right_verts, jr)
        elif rules == "reih":
            usable = right_valid & left_valid & right_fit & left_fit & batch.rel_root_valid.bool()
            skipped = ~usable
            count_right = count_left = count_rrve = count_mrrpe = usable
            gt_rel_root = batch.rel_root.to(dtype)
        else:  # ih26m, synthlab
            count_right = right_fit & (is_right_frame | interacting)
            count_left = left_fit & (is_left_frame | interacting)
            # nothing derived from an invalid wrist counts: RRVE needs the GT relative root too (InterWild's
            # loader drops a hand whose wrist is invalid, fit included; this also guards other readers)
            # InterWild's evaluate reads its wrists and MPJPE's joints through joint_trunc (the 2D flags inside
            # the image); a joint also needs its 3D position here (joints_valid), see the module docstring
            right_joints_valid = right_joints_valid & right.joints_trunc.bool()
            left_joints_valid = left_joints_valid & left.joints_trunc.bool()
            count_mrrpe = right_joints_valid[:, 0] & left_joints_valid[:, 0]
            count_rrve = interacting & right_fit & left_fit & count_mrrpe
            gt_rel_root = left.joints_cam[:, 0].to(dtype) - right.joints_cam[:, 0].to(dtype)

        # 2. units: one read-back for the whole batch (ground truth in mm raises, predictions in mm warn)
        gt_tensors = {
            "batch.right.verts_cam": gt_right_verts, "batch.left.verts_cam": gt_left_verts,
            "batch.right.joints_cam": right.joints_cam, "batch.left.joints_cam": left.joints_cam,
            "batch.rel_root": batch.rel_root,
        }
        _check_units_once(gt_tensors, {f"outputs.{k}": v for k, v in pred.items()})

        # 3. per-sample values (mm); values of samples that do not count are masked out below
        mpvpe_right = metrics.mpvpe(pred["right_verts"], gt_right_verts, jr, check_units=False)  # (B,)
        mpvpe_left = metrics.mpvpe(pred["left_verts"], gt_left_verts, jl, check_units=False)  # (B,)
        rrve = metrics.rrve(
            pred["right_verts"], pred["left_verts"], pred["rel_root"],
            gt_right_verts, gt_left_verts, gt_rel_root, jr, jl, check_units=False,
        )  # (B,)
        mrrpe = metrics.mrrpe(pred["rel_root"], gt_rel_root, check_units=False)  # (B,)

        # 4. accumulate sums and counts per (metric, split)
        stats = self._mesh_stats
        for index, values, mask in (
            (0, mpvpe_right, count_right),
            (0, mpvpe_left, count_left),
            (1, rrve, count_rrve),
            (2, mrrpe, count_mrrpe),
        ):
            weight = mask.to(stats.dtype)
            stats[index, :, 0].index_add_(0, split, torch.where(mask, values.to(stats.dtype), 0.0))
            stats[index, :, 1].index_add_(0, split, weight)

        # 5. MPJPE: per-joint sums and counts, right joints then left joints
        for offset, side, joints_valid, pred_joints in (
            (0, right, right_joints_valid, pred["right_joints"]),
            (num_joints, left, left_joints_valid, pred["left_joints"]),
        ):
            errors = metrics.per_joint_error(pred_joints, side.joints_cam.to(dtype), check_units=False)  # (B, J)
            mask = joints_valid & joints_valid[:, :1] & ~skipped[:, None]  # (B, J)
            weight = mask.to(stats.dtype)
            sums = torch.where(mask, errors.to(stats.dtype), 0.0)
            self._joint_stats[:, offset : offset + num_joints, 0].index_add_(0, split, sums)
            self._joint_stats[:, offset : offset + num_joints, 1].index_add_(0, split, weight)

        self._skipped += skipped.sum()

    # ------------------------------------------------------------------------------------------------
    def _reduced(self) -> tuple[Tensor, Tensor, Tensor]:
        """The statistics, summed over ranks when running distributed."""
        mesh, joints, skipped = self._mesh_stats, self._joint_stats, self._skipped
        dist = torch.distributed
        world = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if mesh is None:
            # nothing processed here; other ranks may have processed samples (the shapes must match theirs)
            device = torch.device("cpu")
            if world and dist.get_backend() == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            self._init_stats(device, num_joints=21)
            mesh, joints, skipped = self._mesh_stats, self._joint_stats, self._skipped
        if self.distributed and world:
            mesh, joints, skipped = mesh.clone(), joints.clone(), skipped.clone()
            for tensor in (mesh, joints, skipped):
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return mesh.cpu(), joints.cpu(), skipped.cpu()

    def evaluate(self) -> dict[str, float]:
        """The results, in millimetres, as a flat dict. Under torch.distributed it is a collective: call it
        on every rank (each gets the same numbers).

        For each of MPVPE, RRVE, MRRPE, MPJPE: ``M`` (all), ``M_single``, ``M_interacting`` and
        ``count_M``, ``count_M_single``, ``count_M_interacting`` (number of hand meshes for MPVPE, samples
        for RRVE / MRRPE, joint errors for MPJPE). A mean with nothing counted is NaN. Plus ``skipped``
        (samples that could not be scored).
        """
        mesh, joints, skipped = self._reduced()
        results: dict[str, float] = {}

        def mean(total: float, count: float) -> float:
            return total / count if count > 0 else math.nan

        for index, name in enumerate(MESH_METRICS):
            sums, counts = mesh[index, :, 0], mesh[index, :, 1]
            results[name] = mean(float(sums.sum()), float(counts.sum()))
            results[f"{name}_single"] = mean(float(sums[0]), float(counts[0]))
            results[f"{name}_interacting"] = mean(float(sums[1]), float(counts[1]))
            results[f"count_{name}"] = int(counts.sum())
            results[f"count_{name}_single"] = int(counts[0])
            results[f"count_{name}_interacting"] = int(counts[1])

        # per-joint means (joints never seen are left out), then the mean over joints
        sums, counts = joints[..., 0], joints[..., 1]  # (2 splits, 2J)
        seen = counts > 0
        joint_means = torch.where(seen, sums / counts.clamp(min=1), 0.0)

        def mean_over_joints(selector: Tensor) -> float:
            n = int(selector.sum())
            return float(joint_means[selector].sum()) / n if n else math.nan

        results["MPJPE"] = mean_over_joints(seen)
        results["MPJPE_single"] = mean_over_joints(seen & torch.tensor([True, False])[:, None])
        results["MPJPE_interacting"] = mean_over_joints(seen & torch.tensor([False, True])[:, None])
        results["count_MPJPE"] = int(counts.sum())
        results["count_MPJPE_single"] = int(counts[0].sum())
        results["count_MPJPE_interacting"] = int(counts[1].sum())
        results["skipped"] = int(skipped)
        return results
