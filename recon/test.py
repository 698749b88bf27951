"""``python -m recon.test``: evaluate a checkpoint; print Table-2 rows; write JSON; compare with another run.

    python -m recon.test --ckpt runs/recon                         # newest checkpoint; its config's test sets
    python -m recon.test --ckpt runs/recon/checkpoints/step_000256.json --datasets synthlab:test-wild
    python -m recon.test --ckpt CKPT --data-root /data --datasets hic,reih,ih26m --mano-dir /mano
    python -m recon.test --ckpt CKPT --plugin my_regressor.py --compare runs/other/metrics.json
    python -m recon.test --ckpt runs/ihmr --optimize              # IHMR-OPT on the predictions, then scored

The regressor is rebuilt through the registry from the name and constructor arguments in the checkpoint's
sidecar (``--plugin`` registers user regressors first), then loaded from the ``.safetensors`` weights; a
missing sidecar, a damaged file or weights that do not fit are refused with one line. The test sets default
to those of the run's config (the embedded synthlab test splits for a default run). The JSON written
(``--out``, default ``<run>/test_metrics.json``) has the shape of ``metrics.json``:
``{dataset: {"MPVPE": mm, "RRVE": mm, "MRRPE": mm, ..., "records_skipped": n}, "skips": {"test": {dataset:
{reason: count}}}}``: a test record that does not load is counted there, never replaced by another sample.
``--optimize`` runs the regressor's ``test_time_optimize(batch, output)`` on each batch's predictions before
they are scored (default JSON ``<run>/test_metrics_opt.json``); a regressor without one is refused.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from eval.report import NON_DATASET_KEYS
from hands.datasets import DatasetError
from hands.mano import HandModel, MANOError
from hands.paths import output_file
from recon import checkpoint as ckpt
from recon.cards import hand_model_warning
from recon.config import ConfigError, from_dict, load_config
from recon.data import DataSpecError, build_test_sets, describe_skips
from recon.evaluate import HEADLINE, evaluate_regressor, format_results
from recon.registry import REGRESSORS, PluginError, build_regressor, import_plugin, load_builtin_regressors
from recon.train import UsageError, _distributed, one_line, positive_int, resolve_device

__all__ = ["main", "load_regressor", "CheckpointJoints"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m recon.test", description="Evaluate a recon checkpoint.")
    parser.add_argument("--ckpt", required=True, help="a .json sidecar, a .safetensors file or a run folder")
    parser.add_argument("--datasets", help="test datasets, e.g. hic,reih,ih26m or synthlab:test-wild")
    parser.add_argument("--data-root", help="folder with one sub-folder per dataset (or the one dataset's folder)")
    parser.add_argument("--mano-dir", help="MANO folder (default: the checkpoint's)")
    parser.add_argument("--plugin", action="append", default=[], help="module or .py file registering regressors")
    parser.add_argument("--compare", help="another run's metrics JSON; prints the deltas (this minus other)")
    parser.add_argument("--out", help="where to write the metrics JSON (default: <run>/test_metrics.json)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=positive_int, help="evaluation batch size (default: the run's)")
    parser.add_argument("--max-samples", type=positive_int, help="evaluate the first N samples of each test set")
    parser.add_argument(
        "--optimize", action="store_true",
        help="run the regressor's test-time optimisation on its predictions before scoring (IHMR-OPT for ihmr)",
    )
    parser.add_argument(
        "--opt-iterations", type=positive_int, help="--optimize: iterations per stage (default: the method's)"
    )
    parser.add_argument(
        "--figure", type=positive_int, metavar="N",
        help="also write predictions-<test set>.png beside the metrics JSON: the first N samples of each test set, "
             "columns input | ground truth | prediction (placed at the GT right wrist, as InterWild visualises)",
    )
    parser.add_argument(
        "--hand-stats", type=positive_int, metavar="N",
        help="also measure the predicted hands of the first N samples of each test set: their spread across "
             "images (0: one prediction for every image), wrist-to-middle-knuckle length and knuckle width, beside "
             "the ground truth's and its mean hand's, and how they follow the labels per camera axis and in "
             "which way the palm faces (\"hand_stats\" in the metrics JSON)",
    )
    return parser


def write_prediction_figures(model, test_sets: dict, n: int, folder: Path, *, hand_model, device, refine=None) -> list[Path]:
    """``folder/predictions-<test set>.png`` for each test set: its first ``n`` samples, columns input | ground
    truth | prediction (:func:`eval.report.mesh_overlay_grid`); returns the paths."""
    from eval.report import mesh_overlay_grid, save_png
    from hands.sample import collate

    faces = dict(faces_right=hand_model.faces_for("right").to(device), faces_left=hand_model.faces_for("left").to(device),
                 j_regressor_right=hand_model.j_regressor_for("right").to(device),
                 j_regressor_left=hand_model.j_regressor_for("left").to(device))
    paths = []
    for spec, dataset in test_sets.items():
        count = min(n, len(dataset))
        if count == 0:
            continue
        batch = collate([dataset[i] for i in range(count)]).to(device)
        with torch.no_grad():
            output = model(batch)
        if refine is not None:
            output = refine(batch, output)
        path = folder / f"predictions-{spec.key}.png"
        save_png(mesh_overlay_grid(batch, output, max_samples=count, **faces).cpu(), path)
        paths.append(path)
    return paths


def shape_statistics(verts: torch.Tensor, joints: torch.Tensor) -> dict:
    """What a set of wrist-relative hands (N, V, 3) and their joints (N, 21, 3), metres, look like, in mm:
    ``spread`` (the mean distance of each hand's vertices from the same vertices of the set's mean hand: 0 when
    every hand is the same), ``bone`` (wrist to middle knuckle, joints 0 -> 9, mean over the hands),
    ``knuckle_width`` (index to little-finger knuckle, 5 -> 17), and the set's mean hand's own ``mean_bone`` and
    ``mean_knuckle_width``; ``extent_xyz``: how far each hand reaches along the camera's x (image right), y (image
    down) and z (depth) axes (the standard deviation of its vertices' coordinate, mean over the hands: a hand
    flattened along an axis has a small entry there); ``hands``: N. Empty sets give ``{"hands": 0}``."""
    count = int(verts.shape[0])
    if count == 0:
        return {"hands": 0}
    verts, joints = verts.double() * 1000.0, joints.double() * 1000.0
    mean = joints.mean(0)
    return {
        "hands": count,
        "extent_xyz": [round(float(value), 2) for value in verts.std(dim=1, unbiased=False).mean(0)],
        "spread": round(float((verts - verts.mean(0)).norm(dim=-1).mean()), 2),
        "bone": round(float((joints[:, 9] - joints[:, 0]).norm(dim=-1).mean()), 2),
        "knuckle_width": round(float((joints[:, 5] - joints[:, 17]).norm(dim=-1).mean()), 2),
        "mean_bone": round(float((mean[9] - mean[0]).norm()), 2),
        "mean_knuckle_width": round(float((mean[5] - mean[17]).norm()), 2),
    }


# a hand whose palm normal makes less than 60 degrees with the optical axis faces towards or away from the camera
PALM_FACING_MIN_COS = 0.5


def _palm_normal(joints: torch.Tensor) -> torch.Tensor:
    """(N, 3) unit normals of the palms of (N, 21, 3) joints: (index knuckle - wrist) x (little knuckle - wrist),
    the plane synthlab's pose sampler uses (``hands.datasets.poses.PoseSampler.palm_frame``, one numpy hand).
    Its sign depends on the side (a mirror image flips it), so compare a side's predictions with its own labels."""
    normal = torch.cross(joints[:, 5] - joints[:, 0], joints[:, 17] - joints[:, 0], dim=-1)
    return normal / normal.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _independent_agreement(share_true: float, share_pred: float) -> float:
    """How often two independent binary answers agree, given how often each says yes."""
    return share_true * share_pred + (1 - share_true) * (1 - share_pred)


def agreement_statistics(pred_verts, pred_joints, gt_verts, gt_joints) -> dict:
    """How predicted wrist-relative hands (N, V, 3) / (N, 21, 3), metres, follow their labels, in mm:

    - ``mpvpe``: the mean vertex distance, wrist-relative (the test sets' MPVPE puts the root elsewhere for some
      regressors: this is for comparing axes and subsets, not for tables);
    - ``l1_xyz``: the mean absolute error along the camera's x (image right), y (image down) and z (depth) axes;
    - ``follow_xyz``: per axis, the Pearson correlation across the hands between a vertex's predicted and labelled
      coordinate, averaged over the vertices (x 100; 0 where the prediction does not vary across the hands): 100 when
      the prediction moves with the truth along that axis, about 0 when it does not follow it;
    - ``palm_facing``: over the ``clear`` hands whose labelled palm normal makes less than 60 degrees with the
      optical axis, the share whose predicted palm faces the same way (towards or away from the camera;
      ``agree``), ``chance``: the agreement expected were the predicted facings drawn independently of the
      labelled ones with the same shares (p q + (1 - p)(1 - q); ``agree`` above it: the regressor tells the palm
      from the back of the hand), ``majority``: the share of them whose palm faces the more common way (what a
      prediction that always faces one way scores at best), and the mean vertex error of the hands it gets right
      / wrong (``mpvpe_right`` / ``mpvpe_wrong``; None for an empty subset).

    ``follow_xyz`` ignores scale: a prediction that varies by a millimetre in step with the truth follows fully,
    so read it beside ``extent_xyz`` and the spread (:func:`shape_statistics`); it is None for fewer than 2 hands.
    Empty sets give ``{"hands": 0}``."""
    count = int(pred_verts.shape[0])
    if count == 0:
        return {"hands": 0}
    pred, truth = pred_verts.double() * 1000.0, gt_verts.double() * 1000.0
    error = (pred - truth).norm(dim=-1).mean(1)  # (N,)
    p_dev, t_dev = pred - pred.mean(0), truth - truth.mean(0)
    p_std, t_std = p_dev.pow(2).mean(0).sqrt(), t_dev.pow(2).mean(0).sqrt()  # (V, 3)
    moving = (p_std > 1e-6) & (t_std > 1e-6)  # 1e-6 mm: a prediction that does not vary follows nothing
    corr = torch.where(moving, (p_dev * t_dev).mean(0) / (p_std * t_std).clamp_min(1e-12), torch.zeros_like(p_std))
    facing_pred = _palm_normal(pred_joints.double())[:, 2]
    facing_true = _palm_normal(gt_joints.double())[:, 2]
    clear = facing_true.abs() > PALM_FACING_MIN_COS
    right = clear & ((facing_pred > 0) == (facing_true > 0))
    wrong = clear & ~right
    n_clear = int(clear.sum())
    towards_true, towards_pred = int((clear & (facing_true > 0)).sum()), int((clear & (facing_pred > 0)).sum())

    def mean_error(mask):
        return round(float(error[mask].mean()), 2) if bool(mask.any()) else None

    return {
        "hands": count,
        "mpvpe": round(float(error.mean()), 2),
        "l1_xyz": [round(float(value), 2) for value in (pred - truth).abs().mean((0, 1))],
        "follow_xyz": [round(float(value) * 100.0, 1) for value in corr.mean(0)] if count >= 2 else None,
        "palm_facing": {
            "clear": n_clear,
            "agree": round(int(right.sum()) / n_clear, 3) if n_clear else None,
            "chance": round(_independent_agreement(towards_true / n_clear, towards_pred / n_clear), 3) if n_clear else None,
            "majority": round(max(towards_true, n_clear - towards_true) / n_clear, 3) if n_clear else None,
            "mpvpe_right": mean_error(right),
            "mpvpe_wrong": mean_error(wrong),
        },
    }


def hand_statistics(model, test_sets: dict, n: int, *, device, batch_size: int = 16, refine=None) -> dict:
    """{test set key: {side: {"predicted": ..., "ground_truth": ...}}}: :func:`shape_statistics` of the predicted
    and the labelled hands of the first ``n`` samples of each test set (the labels relative to their wrist joint),
    over the samples where that hand is labelled with a mesh (``valid`` and ``mano_valid``; skipped records left
    out), and ``versus_truth``: :func:`agreement_statistics` of the predictions against those labels. A regressor
    that ignores its image has spread 0; one that predicts the data's mean hand has the ground truth's
    ``mean_bone`` and ``mean_knuckle_width``; one that cannot tell which way a palm faces has ``palm_facing``
    agreement no higher than its ``chance`` (issue 25's diagnoses, docs/intaghand.md)."""
    from recon.evaluate import _collate_counting

    report = {}
    for spec, dataset in test_sets.items():
        count = min(n, len(dataset))
        found = {side: {"pred_v": [], "pred_j": [], "gt_v": [], "gt_j": []} for side in ("right", "left")}
        for start in range(0, count, batch_size):
            batch, _ = _collate_counting([dataset[i] for i in range(start, min(start + batch_size, count))])
            if batch is None:  # every record of this slice skipped (counted by the evaluation)
                continue
            batch = batch.to(device)
            with torch.no_grad():
                output = model(batch)
            if refine is not None:
                output = refine(batch, output)
            for side, lists in found.items():
                labels = getattr(batch, side)
                valid = labels.valid.bool() & labels.mano_valid.bool()  # a mesh to compare with
                root = labels.joints_cam[:, :1]
                lists["pred_v"].append(getattr(output, f"{side}_verts")[valid].detach().cpu())
                lists["pred_j"].append(getattr(output, f"{side}_joints")[valid].detach().cpu())
                lists["gt_v"].append((labels.verts_cam - root)[valid].cpu())
                lists["gt_j"].append((labels.joints_cam - root)[valid].cpu())
        report[spec.key] = {
            side: {
                "predicted": shape_statistics(torch.cat(lists["pred_v"]), torch.cat(lists["pred_j"])),
                "ground_truth": shape_statistics(torch.cat(lists["gt_v"]), torch.cat(lists["gt_j"])),
                "versus_truth": agreement_statistics(
                    *(torch.cat(lists[key]) for key in ("pred_v", "pred_j", "gt_v", "gt_j"))
                ),
            }
            for side, lists in found.items()
        }
    return report


def load_regressor(path: str | Path, *, device: torch.device | str = "cpu", mano_dir: Optional[str] = None):
    """(model in eval mode on ``device``, CheckpointInfo) for a checkpoint, rebuilt through the registry.

    mano_dir: overrides the MANO folder the checkpoint was trained with (a regressor taking ``mano_dir``).
    Raises CheckpointError (one line) for damaged or mismatched checkpoints.
    """
    info = ckpt.read_checkpoint_info(path)
    load_builtin_regressors()
    if info.arch not in REGRESSORS:
        raise ckpt.CheckpointError(
            f"{info.json_path}: regressor {info.arch!r} is not registered (known: {', '.join(REGRESSORS.names())}); "
            "pass the module that registers it with --plugin"
        )
    kwargs = info.model_kwargs
    if mano_dir is not None and "mano_dir" in kwargs:
        kwargs["mano_dir"] = mano_dir
    try:
        model = build_regressor(info.arch, **kwargs)
    except TypeError as error:
        raise ckpt.CheckpointError(f"{info.json_path}: cannot rebuild regressor {info.arch!r}: {error}") from None
    ckpt.load_weights(model, info, device=device)
    return model.to(device).eval(), info


class CheckpointJoints:
    """A recon checkpoint as the 3D joint regressor of generated-image metrics (MSE-3D, e.g. ``generator.table1
    --mse3d-ckpt``): ``eval.genmetrics.GenerationEvaluator(joint_regressor=...)`` calls it with the labels'
    batch holding the generated images; each image goes through the checkpoint's own test-time input protocol
    (its config's ``data.crop`` and ``data.image_size``, as ``recon.test`` feeds test images: a crop of the
    labelled hands' union box x1.3 for the baseline, the whole image for InterWild) and the regressor returns a
    TwoHandOutput (wrist-relative joints, metres).

    path: a run folder (its newest checkpoint) or a checkpoint's JSON sidecar; mano_dir: the MANO folder the
    labels use (a regressor taking ``mano_dir`` is rebuilt with it; a checkpoint trained with another MANO model
    gets a one-line warning in ``warning``)."""

    def __init__(self, path: str | Path, *, device: torch.device | str = "cpu", mano_dir: Optional[str] = None,
                 hand_model=None) -> None:
        from recon.data import eval_transform

        self.model, self.info = load_regressor(path, device=device, mano_dir=mano_dir)
        cfg = from_dict(self.info.meta["config"])
        self.crop, self.image_size = str(cfg.data.crop), (int(cfg.data.image_size[0]), int(cfg.data.image_size[1]))
        self._transform = eval_transform(self.crop, self.image_size)
        self.device = torch.device(device)
        self.warning = hand_model_warning(self.info.meta, hand_model) if hand_model is not None else None

    def describe(self) -> dict:
        """What the table's settings record about the regressor."""
        return {"checkpoint": str(self.info.json_path), "arch": self.info.arch, "step": self.info.step,
                "input": {"crop": self.crop, "image_size": list(self.image_size)}}

    @torch.no_grad()
    def __call__(self, batch):
        from hands.sample import collate

        samples = [self._transform(sample) for sample in batch.to("cpu").unbind()]
        return self.model(collate(samples).to(self.device))


def _read_metrics(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"--compare {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"--compare {path}: not valid JSON ({error})") from None
    except OSError as error:  # a folder, unreadable
        raise UsageError(f"--compare {path}: cannot read it ({error.strerror or type(error).__name__})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise UsageError(f"--compare {path}: expected {{dataset: {{metric: value}}}} (a metrics.json)")
    for key in NON_DATASET_KEYS:  # beside the datasets: mixing statistics, skips, scored weights, --hand-stats
        data.pop(key, None)
    for dataset, values in data.items():
        for name in HEADLINE:
            value = values.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise UsageError(f"--compare {path}: {dataset}.{name} is {value!r}; expected a number (mm)")
    return data


def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    for plugin in args.plugin:
        import_plugin(plugin)
    compare = _read_metrics(args.compare) if args.compare else None
    if args.out:  # a bad output path fails now, not after the evaluation
        try:
            output_file(args.out, "--out")
        except ValueError as error:
            raise UsageError(str(error)) from None
    rank, world_size, local_rank = _distributed()
    device = resolve_device(args.device, local_rank)
    if args.opt_iterations is not None and not args.optimize:
        raise UsageError("--opt-iterations: only with --optimize")
    model, info = load_regressor(args.ckpt, device=device, mano_dir=args.mano_dir)
    refine = None
    if args.optimize:
        if not callable(getattr(model, "test_time_optimize", None)):
            raise UsageError(f"--optimize: regressor {info.arch!r} has no test-time optimisation (test_time_optimize)")

        def refine(batch, output):
            return model.test_time_optimize(batch, output, iterations=args.opt_iterations)

    flags = {"data.root": args.data_root, "mano_dir": args.mano_dir, "data.max_test_samples": args.max_samples}
    cfg = load_config(base=from_dict(info.meta["config"]), flags=flags)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    hand_model = HandModel(mano_dir=cfg.mano_dir)
    mismatch = hand_model_warning(info.meta, hand_model)
    if mismatch:
        print(f"recon.test: warning: {mismatch}", file=sys.stderr)
    datasets = args.datasets.split(",") if args.datasets else None
    test_sets = build_test_sets(cfg, hand_model=hand_model, datasets=datasets)
    skips: dict = {}
    results = evaluate_regressor(
        model,
        test_sets,
        hand_model=hand_model,
        device=device,
        batch_size=args.batch_size or cfg.eval.batch_size,
        num_workers=cfg.data.num_workers,
        rank=rank,
        world_size=world_size,
        skips=skips,
        refine=refine,
    )
    if rank == 0:
        run_name = f"{info.arch} step {info.step}" + (" + test-time optimisation" if args.optimize else "")
        print(format_results(results, run=run_name, compare=compare, compare_name=Path(args.compare).name if compare else ""))
        if compare is not None:
            for key, values in results.items():
                for name in HEADLINE:
                    other = compare.get(key, {}).get(name, math.nan)
                    print(f"delta {key} {name}: {values.get(name, math.nan) - other:+.2f} mm")
        for key, found in skips.items():
            if found:
                print(f"{key}: {describe_skips(found)} record(s) skipped, not scored")
        default_name = "test_metrics_opt.json" if args.optimize else "test_metrics.json"
        out = Path(args.out) if args.out else info.json_path.parent.parent / default_name
        out.parent.mkdir(parents=True, exist_ok=True)
        report = dict(results, skips={"test": {key: dict(found) for key, found in skips.items() if found}})
        out.write_text(json.dumps(report, indent=2, sort_keys=True))
        print(f"wrote {out} ({time.perf_counter() - start:.1f} s)")
        if args.hand_stats:  # after the metrics are on disk: a failure here loses no evaluation
            report["hand_stats"] = hand_statistics(model, test_sets, args.hand_stats, device=device,
                                                   batch_size=args.batch_size or cfg.eval.batch_size, refine=refine)
            for key, sides in report["hand_stats"].items():
                for side, found in sides.items():
                    pred, truth = found["predicted"], found["ground_truth"]
                    if pred["hands"]:
                        print(f"{key} {side} hands ({pred['hands']}): spread {pred['spread']:.1f} mm, bone "
                              f"{pred['bone']:.1f} mm (truth {truth['bone']:.1f}), knuckle width "
                              f"{pred['knuckle_width']:.1f} mm (truth {truth['knuckle_width']:.1f}; the truth's mean "
                              f"hand {truth['mean_knuckle_width']:.1f})")
                        versus, facing = found["versus_truth"], found["versus_truth"]["palm_facing"]
                        follow = versus["follow_xyz"] or [None] * 3
                        axes = " / ".join(f"{p:.0f} ({t:.0f}), follows " + ("-" if c is None else f"{c:.0f} %")
                                          for p, t, c in zip(pred["extent_xyz"], truth["extent_xyz"], follow))
                        agree = "-" if facing["agree"] is None else (
                            f"{facing['agree']:.2f} of {facing['clear']} (chance {facing['chance']:.2f})")
                        print(f"    x / y / z extent mm (truth): {axes}; palm facing the labelled way: {agree}")
            out.write_text(json.dumps(report, indent=2, sort_keys=True))
            print(f"added hand_stats to {out}")
        if args.figure:
            for path in write_prediction_figures(model, test_sets, args.figure, out.parent, hand_model=hand_model,
                                                 device=device, refine=refine):
                print(f"wrote {path}")
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (UsageError, ConfigError, ckpt.CheckpointError, DatasetError, DataSpecError, PluginError, MANOError) as error:
        print(f"recon.test: error: {one_line(error)}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
