"""The mean-pose predictor: what a regressor that ignores its input scores, the floor a trained one must beat.

:class:`MeanPosePredictor` predicts, for every image, the same two hands: the training set's mean MANO pose and
shape per side (``kind="params"``: per joint the chordal mean of the rotation matrices, projected back onto
SO(3); the mean betas) or the training set's mean wrist-relative mesh per side (``kind="mesh"``: the constant
that minimises the squared vertex error, a blurred, shrunken hand when orientations vary), and the mean
relative root (left wrist minus right wrist). Meshes are rooted at the wrist regressed from them, as every
regressor's are, so MPVPE (wrist-aligned) measures the pose and shape alone.

On synthlab (5,000 train-lab images, default sizes) the mean mesh scores MPVPE 89.5 mm on test-lab and 88.7 mm on
test-wild, the mean MANO parameters 121.2 / 122.3 mm (root orientations are spread over the whole sphere, so
their mean rotation says little): a regressor above ~90 mm has learned nothing a constant could not.
``kind="mesh"`` is the default, the stronger floor.

:func:`mean_pose_errors` scores it on a run's test sets with the project's evaluator::

    from recon.config import load_config
    from recon.meanpose import mean_pose_errors
    cfg = load_config(profile="demo", arch="interwild")
    errors = mean_pose_errors(cfg)       # {"synthlab-test-lab": {"MPVPE": ..., "MRRPE": ..., ...}, ...}

``python -m recon.meanpose [--arch A] [--data-root DIR] [--kind params|mesh] [KEY=VALUE ...]`` prints them.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

import torch
from torch import Tensor, nn
from tqdm import tqdm

from hands.joints import WRIST
from hands.rotation import axis_angle_to_matrix, matrix_to_axis_angle
from recon.output import TwoHandOutput

__all__ = ["MeanPosePredictor", "fit_mean_pose", "mean_pose_errors", "main"]

SIDES = ("right", "left")
KINDS = ("params", "mesh")


def _project_so3(matrices: Tensor) -> Tensor:
    """(..., 3, 3) -> the nearest rotations (SVD, determinant +1)."""
    u, _, vh = torch.linalg.svd(matrices)
    det = torch.det(u @ vh)
    fix = torch.ones_like(matrices[..., 0])
    fix[..., 2] = det
    return u @ torch.diag_embed(fix) @ vh


class MeanPosePredictor(nn.Module):
    """A constant two-hand prediction (see the module docstring).

    right_verts, left_verts: (778, 3) wrist-relative meshes (metres, camera axes); right_joints, left_joints:
    (21, 3) wrist-relative joints; rel_root: (3,) left wrist minus right wrist. ``forward(batch)`` repeats them
    for the batch's B images (nothing of the batch but its size and device is read).
    """

    def __init__(self, right_verts: Tensor, left_verts: Tensor, right_joints: Tensor, left_joints: Tensor, rel_root: Tensor):
        super().__init__()
        for name, value in (("right_verts", right_verts), ("left_verts", left_verts), ("right_joints", right_joints),
                            ("left_joints", left_joints), ("rel_root", rel_root)):
            self.register_buffer(name, value.detach().float().clone())

    def forward(self, batch) -> TwoHandOutput:
        n = batch.image.shape[0]
        device = batch.image.device

        def rep(t: Tensor) -> Tensor:
            return t.to(device)[None].expand(n, *t.shape).clone()

        return TwoHandOutput(
            right_verts=rep(self.right_verts), left_verts=rep(self.left_verts),
            right_joints=rep(self.right_joints), left_joints=rep(self.left_joints), rel_root=rep(self.rel_root),
        )


def fit_mean_pose(readers, hand_model, *, kind: str = "params", max_samples: Optional[int] = None,
                  progress: bool = True) -> MeanPosePredictor:
    """The mean-pose predictor of the labels of ``readers`` (dataset readers with ``load_labels(index)``;
    no images are read, no augmentation is applied).

    kind: "params" (mean MANO pose and shape through the hand model) or "mesh" (mean wrist-relative mesh).
    max_samples: at most this many samples per reader (the first ones); None: all.
    Raises ValueError when a side has no MANO-fitted hand in the readers.
    """
    if kind not in KINDS:
        raise ValueError(f"mean pose: kind must be one of {KINDS}, got {kind!r}")
    rot_sum = {s: torch.zeros(16, 3, 3, dtype=torch.float64) for s in SIDES}
    shape_sum = {s: torch.zeros(10, dtype=torch.float64) for s in SIDES}
    verts_sum = {s: torch.zeros(778, 3, dtype=torch.float64) for s in SIDES}
    count = {s: 0 for s in SIDES}
    rel_sum, rel_count = torch.zeros(3, dtype=torch.float64), 0
    total = sum(len(r) if max_samples is None else min(len(r), max_samples) for r in readers)
    with tqdm(total=total, desc="mean pose", unit="sample", disable=not progress) as bar:
        for reader in readers:
            n = len(reader) if max_samples is None else min(len(reader), max_samples)
            for index in range(n):
                sample = reader.load_labels(index)
                bar.update(1)
                if sample is None or not hasattr(sample, "right"):  # a skipped record
                    continue
                for side in SIDES:
                    hand = getattr(sample, side)
                    if not (bool(hand.valid) and bool(hand.mano_valid)):
                        continue
                    rot_sum[side] += axis_angle_to_matrix(hand.mano_pose.double().reshape(16, 3))
                    shape_sum[side] += hand.mano_shape.double()
                    verts = hand.verts_cam.double()
                    wrist = hand_model.regress_joints(side, verts[None].float())[0, WRIST].double()
                    verts_sum[side] += verts - wrist
                    count[side] += 1
                if bool(sample.rel_root_valid):
                    rel_sum += sample.rel_root.double()
                    rel_count += 1
    missing = [s for s in SIDES if count[s] == 0]
    if missing:
        raise ValueError(f"mean pose: no MANO-fitted {' or '.join(missing)} hand in the training readers")
    meshes = {}
    for side in SIDES:
        if kind == "params":
            pose = matrix_to_axis_angle(_project_so3(rot_sum[side] / count[side])).reshape(1, 48).float()
            shape = (shape_sum[side] / count[side]).reshape(1, 10).float()
            with torch.no_grad():
                verts = hand_model(side, pose, shape).verts[0]
        else:
            verts = (verts_sum[side] / count[side]).float()
        joints = hand_model.regress_joints(side, verts[None])[0]
        meshes[side] = (verts - joints[WRIST], joints - joints[WRIST])
    rel_root = (rel_sum / max(rel_count, 1)).float()
    return MeanPosePredictor(meshes["right"][0], meshes["left"][0], meshes["right"][1], meshes["left"][1], rel_root)


def mean_pose_errors(cfg, *, kind: str = "mesh", hand_model=None, test_sets=None, max_train_samples: Optional[int] = None,
                     progress: bool = False) -> dict:
    """{test set key: the evaluator's results (mm)} of the mean-pose predictor fitted on ``cfg.data.train``
    (unaugmented labels) and scored on ``cfg.data.test`` (or ``test_sets``, {spec: dataset} as
    :func:`recon.data.build_test_sets` gives) exactly as a trained regressor is scored."""
    from hands.mano import HandModel
    from recon.data import base_readers, build_test_sets, build_train_set
    from recon.evaluate import evaluate_regressor

    hand_model = hand_model if hand_model is not None else HandModel(mano_dir=cfg.mano_dir)
    readers = base_readers(build_train_set(cfg, hand_model=hand_model))
    if max_train_samples is None:
        max_train_samples = cfg.data.max_train_samples  # the run's own limit (the first samples of each reader)
    predictor = fit_mean_pose(readers, hand_model, kind=kind, max_samples=max_train_samples, progress=progress)
    if test_sets is None:
        test_sets = build_test_sets(cfg, hand_model=hand_model)
    return evaluate_regressor(predictor, test_sets, hand_model=hand_model, device=torch.device("cpu"),
                              batch_size=cfg.eval.batch_size, progress=progress)


def main(argv: Optional[list] = None) -> int:
    from recon.config import ConfigError, load_config
    from recon.registry import load_builtin_regressors

    parser = argparse.ArgumentParser(prog="python -m recon.meanpose", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.test=[synthlab]")
    parser.add_argument("--arch", help="the regressor whose config (input crop, image size) to read")
    parser.add_argument("--profile", choices=("demo", "paper"))
    parser.add_argument("--data-root", help="folder with the datasets (default: the embedded synthlab)")
    parser.add_argument("--kind", choices=KINDS, default="mesh", help="mesh: the mean wrist-relative mesh (the lower, default floor); params: the mean MANO pose and shape")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    load_builtin_regressors()
    try:
        cfg = load_config(profile=args.profile, arch=args.arch, flags={"data.root": args.data_root},
                          overrides=args.overrides)
        results = mean_pose_errors(cfg, kind=args.kind, progress=True)
    except (ConfigError, ValueError, OSError) as error:
        parser.exit(2, f"{parser.prog}: error: {' '.join(str(error).split())}\n")
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for key, values in results.items():
            print(f"{key}: MPVPE {values['MPVPE']:.1f} mm ({values['count_MPVPE']} hands), "
                  f"MRRPE {values['MRRPE']:.1f} mm, RRVE {values['RRVE']:.1f} mm  [mean-pose predictor, {args.kind}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
