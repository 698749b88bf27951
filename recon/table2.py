"""``python -m recon.table2``: Table 2 of the paper for one regressor — trained without and with generated
images, several seeds, evaluated, tabulated with the paired deltas, their spread and t-intervals over seeds,
control rows, the mean-pose predictor's error, a validation split and a figure of predictions.

    python -m recon.table2 --arch interwild --jobs 2                    # the mini Table 2 on synthlab (5 seeds)
    python -m recon.table2 --arch intaghand --stem mini-table2-intaghand --val-root data/synthlab-val
    python -m recon.table2 --arch interwild --seeds 3 --profile paper --data-root DATA --mano-dir MANO \\
        --sd-path SD15 --backbone-weights resnet50.pth mixing.generator_config=sd15 mixing.guidance_path=CKPT
    python -m recon.table2 --arch baseline --ratios 0,0.1,0.3 --seed-list 0,1 --max-steps 200 --dry-run

What it does, top to bottom:

1. plan: one ``python -m recon.train`` run per (ratio, seed) — ``--ratios`` (default ``0,0.3``; the first is
   the reference) times ``--seeds N`` (default 5: seeds ``0..N-1``) or ``--seed-list`` — each with ``--arch A
   --synthetic-ratio r --seed s --out OUT/<arch>_r<r>_s<seed>`` plus the flags and ``KEY=VALUE`` overrides
   given here (the same steps, data and config for every run; only the ratio and the seed differ). Every
   run's config is resolved and checked here first (:mod:`recon.config`), so a bad flag fails in one line
   before anything trains. ``--dry-run`` prints the commands and stops.
2. a figure, ``<results-dir>/<stem>-samples.png``: rows of mesh image | generated image | overlay for
   ``--figure-samples`` generated samples, made by the code and with the seed that the first run with r > 0
   generates with (:mod:`mixing.build` from that run's resolved ``mixing`` config, labels from its
   training readers, prompts from the bank its generator uses). It is made before the runs, so a generator
   that cannot be built fails in minutes, not after the r = 0 runs.
3. the runs, ``--jobs`` at a time, each in its own process (``sys.executable -m recon.train``), its output in
   ``OUT/<run>/train.log``; a tqdm bar over runs. A run whose folder holds a finished ``metrics.json`` (every
   test set evaluated) is skipped, one with checkpoints but no metrics continues from its newest checkpoint
   (``--resume``), so a killed table run continues where it stopped; a folder whose ``config.yaml`` differs
   from the run's config is refused (another experiment's run), unless it differs only in where the run was
   written and how it is scored (``SCORING_KEYS``: ``out``, ``eval.at_end``, ``eval.batch_size``,
   ``train.average_last``, ``data.test``, ``data.max_test_samples``): that is the same training run (trained
   by hand with the table's command and ``eval.at_end=false``, say, then moved into ``--out``), resumed at its
   last step with the table's values of those keys, so it is scored as the table's other runs, not trained again
   (a ``metrics.json`` it had is kept as ``metrics.previous.json``; ``out`` or ``eval.batch_size`` alone: the
   same scores, skipped as finished). A failed run stops the table (the other
   runs get SIGINT, which makes recon.train leave a resumable checkpoint) with one line naming its folder
   and its log.
   Control rows (``--controls``; default for InterWild: ``tas_off,mesh_blank``): per seed one more run at
   ``--control-ratio`` (default the first ratio after the reference) with the control's overrides after the
   table's: ``tas_off`` = ``mixing.tas_steps=0`` (and ``mixing.sd_path`` = ``--tas-off-generator``, a generator
   trained without TAS), ``mesh_blank`` = ``mixing.mesh_condition=blank`` (the generator's mesh images drawn
   without hands: images that do not follow their labels, so a gain from regularisation alone shows). A control
   whose runs would generate exactly as the main runs (tas_off when the generator samples without TAS and no
   ``--tas-off-generator`` is given) is not trained; the table says why. ``real_batch`` (only with
   ``--synthetic-batch add``) = ``train.synthetic_ratio=0`` at the control ratio's batch: as many images a step as
   the main run, all real, so that the table separates the generated images from the larger batch they come in.
   Control folders: ``OUT/<arch>_r<r>_<control>_s<seed>`` (``..._add_<control>_...`` with add); they resume like
   the others.
4. the table: per test set and metric, the mean ± sample standard deviation (n - 1) over seeds of every
   ratio and control, and the delta ``metric(r) - metric(r0)`` paired by seed, mean ± std and its two-sided
   ``--confidence`` (0.95) t-interval ``mean ± t(1 - a/2, n - 1) std / sqrt(n)`` (scipy.stats.t), for every
   ratio and every control against the reference; the test-set counts (hands / pairs per metric); the
   mean-pose predictor's errors (:mod:`recon.meanpose`, kind mesh: the training labels' mean wrist-relative
   meshes and relative root, no image; ``--mean-pose-samples``); the means again in the paper's style (eval.report), beside the paper's rows of
   this regressor when the test sets are the paper's (HIC, ReIH, IH2.6M).
5. validation (``--val-root DIR``): every run's newest checkpoint scored on ``--val-split`` (default
   ``train-wild``) of a synthlab written with another seed (``python -m hands.datasets.synthlab --out DIR --seed
   1 --sizes 0 0 500 0``): the numbers to make choices on (never the test splits); kept in
   ``<run>/val_metrics.json``, so a resumed table does not score them again.
6. a figure of predictions, ``<stem>-predictions.png``: ``--prediction-figure`` test-wild images (evenly spaced),
   rows of input | ground truth | r = reference | r = next ratio, the first seed's runs.
   Printed, and written atomically as ``<results-dir>/<stem>.md`` and ``.json`` (``--stem``, default
   ``mini-table2``; results dir: ``docs/results`` when every dataset is synthlab, else OUT; ``--results-dir``).

The JSON (millimetres)::

    {"arch", "method", "profile", "unit": "mm", "seeds": [0, 1, 2], "ratios": [0.0, 0.3],
     "reference_ratio": 0.0, "test_sets": ["synthlab-test-lab", ...], "metrics": ["MPVPE", "RRVE", "MRRPE"],
     "setup": {datasets, steps, batch size, image size, generator, "synthetic_batch": "share" | "add",
               "batch_sizes": {ratio: batch}, "real_per_batch": {ratio: n} ...},
     "runs": [{"name", "ratio", "seed", "control": null | name, "folder", "batch": {"size", "real", "generated",
               "synthetic_ratio"}, "status": "trained" | "resumed" | "skipped", "steps", "train_time_s", "wall_s", "metrics": {test set: {metric: mm, count_*: n, ...}}},
              ...],
     "mean": {"0": {test set: {metric: mm}}, "0.3": ...}, "std": {...same; null with one seed...},
     "deltas": {"0.3": {"0": {test set: {metric: mm}}, ...}},          # per seed, r minus the reference
     "delta_mean": {"0.3": {test set: {metric: mm}}}, "delta_std": {...},
     "delta_ci": {"0.3": {test set: {metric: [low, high]}}}, "confidence": 0.95,
     "controls": {name: {"title", "description", "ratio", "overrides", "status": "trained" | "same_as_main",
                         "reason" | "mean", "std", "deltas", "delta_mean", "delta_std", "delta_ci"}},
     "test_counts": {test set: {count_*: n}}, "counts_note": null | "...",
     "mean_pose": {"errors": {test set: {metric: mm}}, "kind", "train_samples_per_reader", "how"} | null,
     "validation": {"root", "split", "key", "synthlab": {seed, sizes}, "runs": {run: metrics}, "mean", "std",
                    "deltas", "delta_mean", "delta_std", "delta_ci", "controls"} | null,
     "prediction_figure": {"path", "test_set", "samples", "indices", "runs", "steps", "columns"} | null,
     "steps_note": null | "why the runs of a seed trained different numbers of steps",
     "delta_wild_mpvpe_mean", "delta_wild_mpvpe_std", "delta_wild_mpvpe_ci", "delta_wild_ratio",
     "wild_test_set",                                                           # with a test-wild set
     "paper": {"InterWild (paper)": {...}, ...} | null, "figure": {...} | null,
     "own_protocol": {"name", "metrics", "mean", "std", "published"} | null,    # DIR: its own protocol
     "command", "git_commit", "git_dirty", "created", "wall_s"}

Ratio keys are written as ``f"{r:g}"``; NaN (a metric with nothing to count) is written as null. The
``delta_wild_*`` fields compare the first ratio after the reference with the reference, on the test set
named ``*-test-wild`` (synthlab's in-the-wild split).

Steps (``--schedule``): recon.train's epoch is a pass over the *real* data, and a batch with r > 0 holds
``B - round(r * B)`` real samples, so an epoch of a run with r > 0 has more steps. The default, ``steps``,
compares at equal optimizer steps and equal learning rates: the reference run's length (``--max-steps``, else
its epochs x its steps per epoch, counted from its training set) is given to every run as ``--max-steps``, and
its epoch milestones ``optim.lr_decay_epochs`` become step milestones ``optim.lr_decay_steps`` at the same
steps (the JSON's ``schedule``), and every other schedule counted in epochs (the warm-up, a regressor's
``set_epoch``: IntagHand's edge term from epoch 50) runs on the reference run's epoch clock
(``train.epoch_steps`` = its steps per epoch). ``epochs`` passes the flags unchanged (the same real epochs, more steps with
r > 0); ``steps_note`` then says when the runs of a seed trained different numbers of steps.

Batches (``--synthetic-batch``): ``share`` (default; recon.train's ``--synthetic-ratio``) gives a run with r > 0
the reference's batch B, of which round(r x B) are generated, so it sees fewer real images per step (16 -> 11
at r = 0.3); ``add`` keeps the reference run's real images per batch in every run and puts the generated images
on top: a run at ratio r gets ``train.batch_size`` = B_r = n + round(r x n / (1 - r)) for the reference's n real
images, whose share split B_r - round(r x B_r) is n again (:func:`mixing.mixer.batch_with_real`; 16 real at
r = 0.3: B_r = 23 = 16 + 7), one reading of the paper's "additionally
training" with generated images: the batch ``recon.train --synthetic-batch add`` gives with the reference's real
count, written as the whole batch so that the runs' configs stay those of a share run (a config of the table's
with ``train.synthetic_batch=add`` is refused). Equal real images per step also make every run's epochs equally long. Its runs at r > 0 are
``OUT/<arch>_r<r>_add_s<seed>`` (controls ``..._add_<control>_s<seed>``), so a share table's reference runs in the
same ``--out`` serve an add table as they are.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

from tqdm import tqdm

from hands.paths import write_atomic
from hands.stats import paired_interval, t_quantile  # noqa: F401  (t_quantile: part of this module's interface)
from recon.runs import RUN_FILES
from recon.train import positive_int
from mixing.config import MIX_MODES

__all__ = [
    "RunSpec",
    "RunFailed",
    "UsageError",
    "build_parser",
    "parse_args",
    "plan_runs",
    "train_command",
    "resolve_run_config",
    "run_state",
    "summarize",
    "format_markdown",
    "steps_note",
    "make_figure",
    "main",
]

TRAIN_MODULE = "recon.train"
STEM = "mini-table2"
FIGURE_NAME = f"{STEM}-samples.png"
FIGURE_TILE = 256  # px per figure cell: the tiny generator's 64 px upscaled (nearest), SD's 512 px downscaled
POLL_S = 0.2  # how often the parent looks at its runs
STOP_TIMEOUT_S = 120.0  # how long a stopped run may take to write its checkpoint before it is killed
RESERVED_KEYS = {"arch", "seed", "out", "train.synthetic_ratio"}  # set per run by this command
PAPER_TEST_SETS = ("hic", "reih", "ih26m")
_TRAINED_RE = re.compile(r"trained (\d+) steps in ([0-9.]+) s")
VAL_METRICS = "val_metrics.json"  # a run's scores on the validation split, in its folder


@dataclass(frozen=True)
class Control:
    """A control row: runs at the control ratio with ``overrides`` added, paired by seed with the reference."""

    overrides: tuple[str, ...]
    title: str
    description: str
    row: str = "{method}+AttentionHand (r={ratio}), {title}"  # its rows' name in the md tables (CONTROL_ROW)


CONTROLS = {
    "tas_off": Control(
        ("mixing.tas_steps=0",),
        "TAS off",
        "the generator's TAS off: no TAS update at sampling (mixing.tas_steps=0) and, with --tas-off-generator, a "
        "generator trained without TAS",
    ),
    "mesh_blank": Control(
        ("mixing.mesh_condition=blank",),
        "mesh blanked",
        "the same generator with its mesh conditioning blanked (mixing.mesh_condition=blank: mesh images without "
        "hands), so the images do not follow their labels: what regularisation alone gives",
    ),
    "real_batch": Control(
        ("train.synthetic_ratio=0",),
        "all real, same batch",
        "no generated image: the main run's batch at the control ratio, all of it real (train.synthetic_ratio=0; e.g. "
        "with --synthetic-batch add, 23 real where the main run has 16 real + 7 generated), so that a gain the "
        "larger batch alone gives shows: whether the generated images help more than as many real ones would",
        "{method} (r=0, all real), the r={ratio} runs' batch",
    ),
}
DEFAULT_CONTROLS = {"interwild": ("tas_off", "mesh_blank")}
CONTROL_ROW = Control.row  # a control row's name unless its Control says otherwise


class UsageError(ValueError):
    """A bad command line, in one line naming the flag."""


class RunFailed(RuntimeError):
    """A training run exited with an error; the message names its folder and its log."""


# ----------------------------------------------------------------------------------------------------
# 1. the command line and the plan
# ----------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line (argparse would print the usage too)
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m recon.table2",
        description="Train a regressor with and without generated images over several seeds; print and write "
        "a Table-2-style table with the deltas and their spread.",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides passed to every run")
    from recon.registry import REGRESSORS, load_builtin_regressors

    load_builtin_regressors()
    parser.add_argument("--arch", required=True,
                        help=f"registered regressor: {', '.join(REGRESSORS.names())} or a --plugin's")
    parser.add_argument("--ratios", default="0,0.3",
                        help="synthetic ratios, comma-separated; the first is the reference (default 0,0.3)")
    parser.add_argument("--seeds", help="seeds 0..N-1 (default 5)")
    parser.add_argument("--seed-list", help="explicit seeds, comma-separated (instead of --seeds)")
    parser.add_argument("--jobs", default="1", help="runs trained side by side (default 1)")
    parser.add_argument("--schedule", choices=("steps", "epochs"), default="steps",
                        help="steps (default): every run trains the reference run's optimizer steps with its "
                        "learning-rate drops at the same steps; epochs: every run trains the same passes over the "
                        "real data (runs with r > 0 then take more steps)")
    parser.add_argument("--synthetic-batch", choices=("share", "add"), default="share",
                        help="share (default): the generated images take round(r x B) of every batch of B, so a run "
                        "with r > 0 sees fewer real images per step; add: every run keeps the reference run's real "
                        "images per batch and the generated images come on top (batch B_r = n + round(r x n / (1 - r)) "
                        "for n real; 16 real at r = 0.3: batch 23; folders <arch>_r<r>_add_s<seed>), one "
                        "reading of the paper's 'additionally training'")
    parser.add_argument("--out", default="runs/table2", help="folder of the run folders (default runs/table2)")
    parser.add_argument("--results-dir", help="where mini-table2.md/.json/-samples.png go (default: docs/results on "
                        "synthlab, else --out)")
    parser.add_argument("--figure-samples", default="8", help="generated samples in the figure; 0: no figure")
    parser.add_argument("--controls", default="auto",
                        help="control rows, comma-separated: tas_off (the generator's TAS off), mesh_blank (the mesh "
                        "conditioning blanked: images that do not follow their labels), real_batch (with "
                        "--synthetic-batch add: the control ratio's batch, all real); none; auto (default): tas_off and "
                        "mesh_blank for interwild, none otherwise")
    parser.add_argument("--control-ratio", help="the ratio of the control runs (default: the first after the reference)")
    parser.add_argument("--tas-off-generator",
                        help="tas_off control: a generator folder trained without TAS (generator.train --tas-updates 0), "
                        "given to the control runs as mixing.sd_path (sampling TAS is off there too)")
    parser.add_argument("--confidence", default="0.95", help="two-sided level of the paired t-intervals (default 0.95)")
    parser.add_argument("--val-root", help="a synthlab folder written with another --seed whose --val-split holds the "
                        "validation images (train-wild-style, never the test splits): every run is also scored on it, "
                        "for choices (see docs/reproduce-table2.md)")
    parser.add_argument("--val-split", default="train-wild", help="the split of --val-root to validate on (default train-wild)")
    parser.add_argument("--prediction-figure", default="4",
                        help="test-wild images in the figure of predictions, r = reference vs the next ratio (first "
                        "seed); 0: none (default 4)")
    parser.add_argument("--mean-pose-samples", default="all",
                        help="training samples per reader the mean-pose predictor averages (the first N; default all); "
                        "0: no mean-pose row")
    parser.add_argument("--stem", default=STEM, help=f"name of the result files <stem>.md/.json/-samples.png/-predictions.png "
                        f"(default {STEM}; e.g. {STEM}-intaghand)")
    parser.add_argument("--dry-run", action="store_true", help="print the training commands and stop")
    # passed through to every recon.train run
    parser.add_argument("--profile", choices=("demo", "paper"))
    parser.add_argument("--config", help="a YAML file layered over the profile and arch files")
    parser.add_argument("--data-root")
    parser.add_argument("--datasets")
    parser.add_argument("--test-datasets")
    parser.add_argument("--mano-dir")
    parser.add_argument("--sd-path")
    parser.add_argument("--max-steps", type=positive_int)
    parser.add_argument("--epochs", type=positive_int)
    parser.add_argument("--batch-size", type=positive_int)
    parser.add_argument("--device")
    parser.add_argument("--plugin", action="append", default=[])
    parser.add_argument("--backbone-weights")
    parser.add_argument("--mix-mode", choices=MIX_MODES)
    parser.add_argument("--generator")
    return parser


# recon.train flags given here as they are: (our attribute, recon.train flag)
_PASSED = (
    ("profile", "--profile"),
    ("config", "--config"),
    ("data_root", "--data-root"),
    ("datasets", "--datasets"),
    ("test_datasets", "--test-datasets"),
    ("mano_dir", "--mano-dir"),
    ("sd_path", "--sd-path"),
    ("max_steps", "--max-steps"),
    ("epochs", "--epochs"),
    ("batch_size", "--batch-size"),
    ("device", "--device"),
    ("backbone_weights", "--backbone-weights"),
    ("mix_mode", "--mix-mode"),
    ("generator", "--generator"),
)


def ratio_tag(ratio: float) -> str:
    """How a ratio is written in folder names and JSON keys: ``0``, ``0.3``."""
    return f"{ratio:g}"


def _parse_ratios(text: str) -> list[float]:
    ratios = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise UsageError(f"--ratios {text}: expected numbers 0 <= r < 1 separated by commas") from None
        if not 0.0 <= value < 1.0:
            raise UsageError(f"--ratios {text}: {part} is outside 0 <= r < 1")
        if value in ratios:
            raise UsageError(f"--ratios {text}: ratio {part} is given twice")
        ratios.append(value)
    if len(ratios) < 2:
        raise UsageError(f"--ratios {text}: expected at least two ratios (the first is the reference), e.g. 0,0.3")
    return ratios


def _parse_seeds(args: argparse.Namespace) -> list[int]:
    if args.seeds is not None and args.seed_list is not None:
        raise UsageError("--seeds and --seed-list: give one of them")
    if args.seed_list is not None:
        try:
            seeds = [int(part) for part in args.seed_list.split(",")]
        except ValueError:
            raise UsageError(f"--seed-list {args.seed_list}: expected integers separated by commas") from None
        if len(set(seeds)) != len(seeds):
            raise UsageError(f"--seed-list {args.seed_list}: a seed is given twice")
        return seeds
    text = "5" if args.seeds is None else args.seeds
    try:
        n = int(text)
    except ValueError:
        raise UsageError(f"--seeds {text}: expected a number of seeds >= 1") from None
    if n < 1:
        raise UsageError(f"--seeds {text}: expected a number of seeds >= 1")
    return list(range(n))


def _int_at_least(flag: str, text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise UsageError(f"{flag} {text}: expected an integer >= {least}")
    return value


def _parse_controls(args: argparse.Namespace) -> list[str]:
    text = args.controls.strip()
    if text == "auto":
        return list(DEFAULT_CONTROLS.get(args.arch, ()))
    if text == "none":
        return []
    names = [part.strip() for part in text.split(",") if part.strip()]
    for name in names:
        if name not in CONTROLS:
            raise UsageError(f"--controls {text}: unknown control {name!r}; known: {', '.join(CONTROLS)}, none, auto")
    if len(set(names)) != len(names):
        raise UsageError(f"--controls {text}: a control is given twice")
    return names


def _parse_confidence(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value < 1.0:
        raise UsageError(f"--confidence {text}: expected a level 0 < c < 1, e.g. 0.95")
    return value


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the command line; adds ``ratio_list``, ``seed_values``, ``jobs_n``, ``figure_n``,
    ``control_list``, ``control_ratio_value``, ``confidence_level``, ``prediction_n``, ``mean_pose_n``. Raises
    UsageError with one line naming the flag."""
    args = build_parser().parse_intermixed_args(argv)  # KEY=VALUE may come before or after the flags
    args.ratio_list = _parse_ratios(args.ratios)
    args.seed_values = _parse_seeds(args)
    args.jobs_n = _int_at_least("--jobs", args.jobs, 1)
    args.figure_n = _int_at_least("--figure-samples", args.figure_samples, 0)
    args.prediction_n = _int_at_least("--prediction-figure", args.prediction_figure, 0)
    args.mean_pose_n = None if args.mean_pose_samples == "all" else _int_at_least("--mean-pose-samples", args.mean_pose_samples, 0)
    args.confidence_level = _parse_confidence(args.confidence)
    args.control_list = _parse_controls(args)
    if args.control_ratio is None:
        args.control_ratio_value = args.ratio_list[1]
    else:
        try:
            args.control_ratio_value = float(args.control_ratio)
        except ValueError:
            raise UsageError(f"--control-ratio {args.control_ratio}: expected a number 0 < r < 1") from None
        if not 0.0 < args.control_ratio_value < 1.0:
            raise UsageError(f"--control-ratio {args.control_ratio}: expected a number 0 < r < 1")
    if "real_batch" in args.control_list and args.synthetic_batch != "add":
        raise UsageError("--controls real_batch: only with --synthetic-batch add (with share the main run's batch is "
                         "the reference's, and the control would be the r = 0 run itself)")
    if args.tas_off_generator is not None and "tas_off" not in args.control_list:
        raise UsageError("--tas-off-generator: only with the tas_off control (--controls tas_off,...)")
    if args.tas_off_generator is not None and not Path(args.tas_off_generator).is_dir():
        raise UsageError(f"--tas-off-generator {args.tas_off_generator}: expected a generator folder (diffusers layout)")
    if args.val_split.startswith("test"):
        raise UsageError(f"--val-split {args.val_split}: a test split; validate on train-wild-style images of another "
                         "synthlab seed (issue 25: no choice is tuned on the test splits)")
    if args.val_root is not None and not Path(args.val_root).is_dir():
        raise UsageError(f"--val-root {args.val_root}: expected a synthlab folder (python -m hands.datasets.synthlab --out DIR --seed 1 ...)")
    for item in args.overrides:
        key = item.partition("=")[0].strip()
        if key in RESERVED_KEYS:
            raise UsageError(
                f"override {item}: recon.table2 sets {key} for every run itself "
                "(--arch, --ratios, --seeds / --seed-list, --out)"
            )
    return args


@dataclass(frozen=True)
class RunSpec:
    """One training run of the table: ``command`` is its full ``recon.train`` command line (without
    ``--resume``), ``folder`` its ``--out``."""

    arch: str
    ratio: float
    seed: int
    folder: Path
    command: tuple[str, ...]
    control: Optional[str] = None  # a name of CONTROLS, None for a row of the table proper

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def log(self) -> Path:
        return self.folder / "train.log"


def control_overrides(args: argparse.Namespace, control: str) -> list[str]:
    """The overrides a control run adds to the table's (after them, so they win)."""
    overrides = list(CONTROLS[control].overrides)
    if control == "tas_off" and args.tas_off_generator is not None:
        overrides.append(f"mixing.sd_path={Path(args.tas_off_generator).resolve()}")
    return overrides


def train_command(args: argparse.Namespace, ratio: float, seed: int, folder: Path, control: Optional[str] = None) -> list[str]:
    """The ``recon.train`` command of one run: the same passed-through flags and overrides for every run,
    only ``--synthetic-ratio``, ``--seed`` and ``--out`` differ (and a control run's own overrides)."""
    command = [sys.executable, "-m", TRAIN_MODULE, "--arch", args.arch, "--synthetic-ratio", ratio_tag(ratio),
               "--seed", str(seed), "--out", str(folder)]
    for attribute, flag in _PASSED:
        value = getattr(args, attribute)
        if value is not None:
            command += [flag, str(value)]
    for plugin in args.plugin:
        command += ["--plugin", plugin]
    batch = (getattr(args, "batch_by_ratio", None) or {}).get(ratio)
    own = [f"train.batch_size={batch}"] if batch is not None else []  # --synthetic-batch add (see plan)
    return command + list(args.overrides) + own + (control_overrides(args, control) if control else [])


def added_batches(args: argparse.Namespace, reference_cfg) -> dict[float, int]:
    """{ratio: train.batch_size} for ``--synthetic-batch add``: every ratio of the table and the control ratio
    get the batch whose real part is the reference run's (its batch at its ratio)."""
    from mixing.mixer import batch_with_real, split_batch_size

    n_real, _ = split_batch_size(reference_cfg.train.batch_size, reference_cfg.train.synthetic_ratio)
    ratios = set(args.ratio_list) | ({args.control_ratio_value} if getattr(args, "control_list", ()) else set())
    return {ratio: batch_with_real(n_real, ratio) for ratio in sorted(ratios)}


def equal_steps(reference_cfg) -> dict:
    """The reference run's schedule in optimizer steps: {"steps", "lr_decay_steps", "steps_per_epoch"}.

    steps: train.epochs x steps per epoch, or train.max_steps when smaller (one process: the training set's length //
    its real samples per batch, as recon.train's drop_last loader); lr_decay_steps: every lr_decay_epochs
    milestone times the steps per epoch, plus its own lr_decay_steps."""
    from hands.mano import HandModel
    from mixing.mixer import split_batch_size
    from recon.data import build_train_set

    if list(reference_cfg.optim.get("cosine_phases", []) or []):
        raise UsageError(
            f"optim.cosine_phases={list(reference_cfg.optim.cosine_phases)}: a schedule restarted per epoch phase "
            "(IHMR's, whose stages also switch by epoch) cannot be put on equal steps across ratios; pass "
            "--schedule epochs"
        )
    # share's split: plan() refuses a table config with train.synthetic_batch=add (the table sets add batches itself)
    n_real, _ = split_batch_size(reference_cfg.train.batch_size, reference_cfg.train.synthetic_ratio)
    size = len(build_train_set(reference_cfg, hand_model=HandModel(mano_dir=reference_cfg.mano_dir)))
    per_epoch = size // n_real
    if per_epoch < 1:
        raise UsageError(f"--batch-size {reference_cfg.train.batch_size}: larger than the training set ({size} samples)")
    steps = reference_cfg.train.epochs * per_epoch  # recon.train stops at whichever bound comes first
    if reference_cfg.train.max_steps is not None:
        steps = min(steps, reference_cfg.train.max_steps)
    drops = sorted({m * per_epoch for m in reference_cfg.optim.lr_decay_epochs} | set(reference_cfg.optim.lr_decay_steps))
    return {"steps": int(steps), "lr_decay_steps": [int(d) for d in drops], "steps_per_epoch": int(per_epoch)}


def _batch_tag(args: argparse.Namespace, ratio: float) -> str:
    """``_add`` in the folder name of a run whose batch --synthetic-batch add set (every ratio but the
    reference's), so that a share table and an add table can use one --out, sharing their reference runs."""
    return "_add" if ratio in (getattr(args, "batch_by_ratio", None) or {}) else ""


def plan_runs(args: argparse.Namespace) -> list[RunSpec]:
    """Every (ratio, seed) run and every control run (``<arch>_r<r>_<control>_s<seed>``), ordered seed by seed
    (so that a stopped table has whole pairs first)."""
    out = Path(args.out)
    runs = []
    for seed in args.seed_values:
        for ratio in args.ratio_list:
            folder = out / f"{args.arch}_r{ratio_tag(ratio)}{_batch_tag(args, ratio)}_s{seed}"
            runs.append(RunSpec(args.arch, ratio, seed, folder, tuple(train_command(args, ratio, seed, folder))))
        for control in getattr(args, "control_list", ()):
            ratio = args.control_ratio_value
            folder = out / f"{args.arch}_r{ratio_tag(ratio)}{_batch_tag(args, ratio)}_{control}_s{seed}"
            command = tuple(train_command(args, ratio, seed, folder, control))
            runs.append(RunSpec(args.arch, ratio, seed, folder, command, control))
    return runs


def effective_generator(cfg) -> dict:
    """What a run's generator is (the sampling settings its generator config resolves to, with the mixing
    overrides applied; its weights; its conditioning): equal for two runs exactly when they generate alike.
    Generating runs only (r > 0)."""
    from dataclasses import asdict

    from mixing.build import generator_config

    if cfg.mixing.mode == "offline":  # reads pre-generated shards: no generator setting reaches its images
        return {"offline_shards": str(cfg.mixing.shards)}
    gen_cfg = generator_config(cfg.mixing)
    return {"generator": cfg.mixing.generator, "config": asdict(gen_cfg), "mesh_condition": cfg.mixing.mesh_condition}


def same_as_main(runs: Sequence[RunSpec], configs: dict) -> dict[str, str]:
    """{control: why} for the controls whose runs would generate exactly as the main runs at the control ratio
    (e.g. tas_off with a generator that samples without TAS anyway): they are not trained, the table says so."""
    out = {}
    for run in runs:
        if run.control is None or run.control in out:
            continue
        main = next((r for r in runs if r.control is None and r.seed == run.seed and r.ratio == run.ratio), None)
        if main is None or configs[run.name].train.synthetic_ratio != configs[main.name].train.synthetic_ratio:
            continue  # a control with a ratio of its own (real_batch: none generated) differs from main in it
        if effective_generator(configs[run.name]) == effective_generator(configs[main.name]):
            if configs[main.name].mixing.mode == "offline":
                out[run.control] = (
                    "mixing.mode=offline reads the same pre-generated shards (mixing.shards) in every run, so a "
                    "control's generator settings never reach its images: it was not trained; run the table with "
                    "online mixing for its controls"
                )
                continue
            tas = configs[main.name].mixing.tas_steps
            out[run.control] = (
                f"its runs would generate exactly as the r={ratio_tag(run.ratio)} runs (the generator config samples "
                f"with tas_steps={generator_tas_steps(configs[main.name])}"
                + (f", mixing.tas_steps={tas}" if tas is not None else "")
                + "), so they were not trained; pass --tas-off-generator DIR (a generator trained without TAS) or "
                "mixing.tas_steps=K > 0 for the table's runs to make it a control"
            )
    return out


def generator_tas_steps(cfg) -> int:
    """The TAS updates per sampling of a run's generator (its config's, after mixing.tas_steps)."""
    from mixing.build import generator_config

    return int(generator_config(cfg.mixing).sampling.tas_steps)


def plan(args: argparse.Namespace) -> tuple[list[RunSpec], dict, dict]:
    """(runs, their resolved configs by run name, the schedule) of a parsed command line. With
    ``--synthetic-batch add`` every ratio but the reference's gets the batch whose real part is the reference's
    (:func:`added_batches`; folders ``<arch>_r<r>_add_s<seed>``). With ``--schedule
    steps`` every run's command also gets the reference run's steps (``--max-steps``) and learning-rate drops
    (``optim.lr_decay_steps``; see the module docstring). Plugins must be imported before."""
    args.batch_by_ratio = None
    runs = plan_runs(args)
    configs = {run.name: resolve_run_config(run) for run in runs}
    added = sorted({run.name for run in runs if configs[run.name].train.get("synthetic_batch", "share") != "share"})
    if added:  # the table sets every run's batch itself; the same real images a step is its --synthetic-batch add
        raise UsageError(f"train.synthetic_batch={configs[added[0]].train.synthetic_batch} (run {added[0]}): the table "
                         "gives every run its batch; leave it share and pass recon.table2 --synthetic-batch add")
    if getattr(args, "synthetic_batch", "share") == "add":
        # equal real images per step: the reference's batch at its ratio fixes the real part of every run's batch
        args.batch_by_ratio = {r: b for r, b in added_batches(args, configs[runs[0].name]).items()
                               if r != args.ratio_list[0]}
        runs = plan_runs(args)
        configs = {run.name: resolve_run_config(run) for run in runs}
    budgets = sorted({str(cfg.train.max_minutes) for cfg in configs.values() if cfg.train.max_minutes is not None})
    if budgets:
        raise UsageError(f"train.max_minutes={budgets[0]}: a time budget makes a run's length depend on the machine; "
                         "the table compares runs of equal steps (leave it unset, give --max-steps or train.max_steps)")
    schedule = {"kind": args.schedule}
    if args.schedule == "steps":
        schedule.update(equal_steps(configs[runs[0].name]))
        args.max_steps = schedule["steps"]
        args.overrides = [*args.overrides, "optim.lr_decay_epochs=[]",
                          "optim.lr_decay_steps=[" + ",".join(map(str, schedule["lr_decay_steps"])) + "]",
                          f"train.epoch_steps={schedule['steps_per_epoch']}"]
        runs = plan_runs(args)
        configs = {run.name: resolve_run_config(run) for run in runs}
    return runs, configs, schedule


def resolve_run_config(run: RunSpec):
    """The config ``recon.train`` resolves for this run's command (a read-only DictConfig), checked as
    recon.train checks it (:func:`recon.train.check_config`, :func:`recon.data.check_data`). Plugins
    (``--plugin``) must be imported before."""
    from recon import train as recon_train
    from recon.config import load_config
    from recon.data import check_data
    from recon.registry import load_builtin_regressors

    load_builtin_regressors()
    train_args = recon_train.parse_args(list(run.command[3:]))
    cfg = load_config(
        profile=train_args.profile,
        arch=train_args.arch,
        config_file=train_args.config,
        flags=recon_train._flags(train_args),  # the one place where recon.train's flags become config keys
        overrides=train_args.overrides,
    )
    recon_train.check_config(cfg)
    check_data(cfg)
    return cfg


# ----------------------------------------------------------------------------------------------------
# 2. the figure
# ----------------------------------------------------------------------------------------------------
def make_figure(cfg, n: int, path: Path, *, tile: int = FIGURE_TILE) -> dict:
    """Write ``path``: rows of mesh image | generated image | overlay for ``n`` generated samples, made as
    recon.train's run of ``cfg`` makes them (rank 0, its generator seed); returns the figure's facts
    (prompts, generator, size). Raises UsageError when the generator cannot be built."""
    import torch
    import torch.nn.functional as F
    from omegaconf import OmegaConf
    from torchvision.utils import make_grid

    from generator.train import overlay, save_png
    from hands.mano import HandModel
    from hands.render import render_hands
    from mixing.build import build_label_source, build_provider, build_source
    from mixing.config import MixingConfig
    from recon.data import base_readers, build_train_set
    from recon.train import generator_seed, resolve_device

    mix_cfg = MixingConfig(**OmegaConf.to_container(cfg.mixing))
    device = resolve_device(cfg.device, 0)
    seed = generator_seed(cfg)  # as recon.train.synthetic_provider seeds the generator side (rank 0)
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        with torch.no_grad():
            hand_model = HandModel(mano_dir=cfg.mano_dir)
            if mix_cfg.mode == "offline":  # the run reads pre-generated shards: show those
                provider = build_provider(mix_cfg, source=None, device=device, seed=seed)
                batch = provider.take(n)
                provider.close()
                mesh = render_hands(
                    batch.right.verts_cam, batch.left.verts_cam,
                    hand_model.faces_for("right").to(device), hand_model.faces_for("left").to(device),
                    batch.camera.K, tuple(batch.image.shape[-2:]),
                    right_valid=batch.right.valid, left_valid=batch.left.valid,
                ).image
            else:
                train_set = build_train_set(cfg, hand_model=hand_model)
                labels = build_label_source(mix_cfg, hand_model=hand_model, train_readers=base_readers(train_set))
                source = build_source(mix_cfg, hand_model=hand_model, labels=labels, device=device, seed=seed, rank=0)
                batch = source.generate(n)
                mesh, _ = source.render_conditions(batch)  # the global mesh image the generator was given
            images = batch.image.float()
            mesh = mesh.float()
            cells = torch.stack([mesh, images, overlay(images, mesh)], 1).flatten(0, 1)  # (3n, 3, S, S)
            if cells.shape[-1] < tile:
                cells = F.interpolate(cells, size=(tile, tile), mode="nearest")
            elif cells.shape[-1] > tile:
                cells = F.interpolate(cells, size=(tile, tile), mode="bilinear", antialias=True, align_corners=False)
            grid = make_grid(cells.clamp(0, 1).cpu(), nrow=3, padding=2, pad_value=1.0)
            save_png(grid, path)  # atomic
    except (ValueError, ImportError) as error:
        raise UsageError(f"figure (mixing.generator={mix_cfg.generator}): {error}") from error
    finally:
        torch.set_num_threads(threads)
    prompts = [str(m.get("prompt", "")) for m in batch.meta]
    del batch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "path": path.name,
        "samples": n,
        "ratio": ratio_tag(cfg.train.synthetic_ratio),
        "seed": int(cfg.seed),
        "generator": mix_cfg.generator,
        "generator_config": mix_cfg.generator_config,
        "size": mix_cfg.size,
        "mode": mix_cfg.mode,
        "prompts": prompts,
    }


# ----------------------------------------------------------------------------------------------------
# 3. the runs
# ----------------------------------------------------------------------------------------------------
def _flat(data, prefix: str = "") -> dict:
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: list(data) if isinstance(data, tuple) else data}  # a YAML list is a typed tuple here


# Keys that say where a run is written and how it is scored, not what it trains: a folder whose config differs
# from the run's only in these holds the same training run (moved, or trained with eval.at_end=false or another
# train.average_last); it is resumed and scored again under the table's values (see :func:`run_state`).
# (train.average_last also sets how many checkpoints a run keeps: run_state checks that enough were kept.)
SCORING_KEYS = ("out", "eval.at_end", "eval.batch_size", "train.average_last", "data.test", "data.max_test_samples")
# of these, the ones whose difference alone does not call for scoring again: where the folder is, and the
# evaluation's batch size (the same scores up to float rounding)
_NO_RESCORE = ("out", "eval.batch_size")


def _differing_keys(run: RunSpec, cfg) -> dict[str, tuple]:
    """{dotted key: (value in ``<folder>/config.yaml``, value now)} for every key that differs (``mixing`` only
    counts for r > 0: a run without generated images does not use it); {"config.yaml": (error, None)} when the
    file cannot be read."""
    from omegaconf import OmegaConf

    try:
        old = OmegaConf.to_container(OmegaConf.load(run.folder / "config.yaml"), resolve=True)
    except Exception as error:  # yaml / OmegaConf errors: an unreadable file is a different config
        return {"config.yaml": (f"unreadable ({str(error).splitlines()[0] if str(error) else type(error).__name__})", None)}
    new = OmegaConf.to_container(cfg, resolve=True)
    if float(cfg.train.synthetic_ratio) == 0:  # run.ratio is the control ratio for a real_batch control
        old.pop("mixing", None)
        new.pop("mixing", None)
    old, new = _flat(old), _flat(new)
    if "train.epoch_steps" not in old and not epoch_clock_matters(cfg):
        old["train.epoch_steps"] = new.get("train.epoch_steps")  # folders from before the key: the same run
    old.setdefault("train.max_minutes", None)  # folders from before the key had no time budget
    old.setdefault("train.synthetic_batch", "share")  # folders from before the key: every sample counted in the batch
    # data.augment_kwargs: an argument one side leaves out is the augmentation's default (folders from before the
    # key, or a range given back to its default as an override, hold the same run)
    prefix = "data.augment_kwargs."
    named = {key for key in set(old) | set(new) if key.startswith(prefix)}
    if named and old.get("data.augmentation") == new.get("data.augmentation"):
        from recon.data import DataSpecError, augmentation_class, augmentation_defaults

        try:
            defaults = augmentation_defaults(augmentation_class(str(new.get("data.augmentation", "interwild"))))
        except DataSpecError:
            defaults = {}
        for key in named:
            default = defaults.get(key[len(prefix):], "<unset>")
            default = list(default) if isinstance(default, tuple) else default
            old.setdefault(key, default)
            new.setdefault(key, default)
    return {key: (old.get(key, "<unset>"), new.get(key, "<unset>")) for key in sorted(set(old) | set(new))
            if old.get(key, "<unset>") != new.get(key, "<unset>")}


def _difference_lines(differing: dict) -> list[str]:
    """``key: old there, new now`` lines of :func:`_differing_keys`'s result."""
    return [f"config.yaml {old}" if key == "config.yaml" else f"{key}: {old!r} there, {new!r} now"
            for key, (old, new) in differing.items()]


def _config_differences(run: RunSpec, cfg) -> list[str]:
    """The keys whose value in ``<folder>/config.yaml`` differs from the run's config, as lines."""
    return _difference_lines(_differing_keys(run, cfg))


def rescore_overrides(cfg) -> list[str]:
    """``KEY=VALUE`` overrides of every scoring key (:data:`SCORING_KEYS`, but ``out``: the run's ``--out`` says it)
    at the run's config's value. A resumed run takes its config from its checkpoint, whatever its config.yaml says
    now, so every resume gets them: it scores as the table asks."""
    from omegaconf import OmegaConf

    values = _flat(OmegaConf.to_container(cfg, resolve=True))
    return [f"{key}={json.dumps(values[key])}" for key in SCORING_KEYS if key != "out"]


def epoch_clock_matters(cfg) -> bool:
    """Whether ``train.epoch_steps`` can change a run of ``cfg``: it has a warm-up, epoch milestones, a cosine
    counted in epochs, or a regressor with ``set_epoch`` (IntagHand's edge term, IHMR's stages)."""
    from recon.registry import REGRESSORS

    optim = cfg.optim
    cosine_by_epoch = optim.schedule == "cosine" and (list(optim.cosine_phases) or not cfg.train.max_steps)
    return bool(optim.warmup_epochs > 0 or list(optim.lr_decay_epochs) or cosine_by_epoch
                or callable(getattr(REGRESSORS.get(cfg.arch), "set_epoch", None)))


def eval_set_keys(cfg) -> list[str]:
    """The keys of the run's test sets in metrics.json (``synthlab-test-wild``, ``hic``, ...)."""
    from recon.data import parse_specs

    return [spec.key for spec in parse_specs(cfg.data.test, "test")]


def all_dataset_names(cfg) -> set[str]:
    """The names of the run's training and test datasets (``{"synthlab"}`` on the embedded default)."""
    from recon.data import parse_specs

    return {spec.name for spec in parse_specs(cfg.data.train, "train") + parse_specs(cfg.data.test, "test")}


def read_metrics(folder: Path, test_sets: Sequence[str]) -> Optional[dict]:
    """``<folder>/metrics.json`` when it is finished (valid JSON with every test set), else None."""
    try:
        data = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not all(isinstance(data.get(key), dict) for key in test_sets):
        return None
    return {key: data[key] for key in test_sets}


def run_state(run: RunSpec, cfg, test_sets: Sequence[str]) -> str:
    """``"finished"`` (skip it), ``"resume"`` (checkpoints, no metrics; or metrics scored under other scoring keys
    than the table's, :data:`SCORING_KEYS`: scored again) or ``"new"``. Raises UsageError when the folder holds a
    run of another config (a key outside :data:`SCORING_KEYS` differs), or one to score again that cannot be (no
    checkpoint; fewer scheduled checkpoints kept than the table's ``train.average_last`` averages)."""
    rescore = False
    if (run.folder / "config.yaml").is_file():
        differing = _differing_keys(run, cfg)
        trained = _difference_lines({key: value for key, value in differing.items() if key not in SCORING_KEYS})
        if trained:
            shown = "; ".join(trained[:3]) + ("; ..." if len(trained) > 3 else "")
            raise UsageError(
                f"--out {run.folder.parent}: {run.folder} holds a run of another config ({shown}); "
                "give another --out or remove that folder"
            )
        rescore = any(key not in _NO_RESCORE for key in differing)
        if "train.average_last" in differing and cfg.train.average_last > 1:
            # recon.train keeps max(3, average_last + 1) checkpoints: a folder that kept fewer than the table's
            # runs keep may have pruned some the table's mean needs (where it kept all it wrote, it is as a new run)
            from recon.checkpoint import folder_run_id, run_checkpoints

            old_last = differing["train.average_last"][0]
            run_id = folder_run_id(run.folder)
            written = run_checkpoints(run.folder / "checkpoints", run_id)
            scheduled = run_checkpoints(run.folder / "checkpoints", run_id, scheduled_only=True)
            if len(written) >= max(3, int(old_last) + 1) and len(scheduled) < cfg.train.average_last:
                raise UsageError(
                    f"--out {run.folder.parent}: {run.folder} keeps {len(scheduled)} scheduled checkpoint(s) of its "
                    f"run (trained with train.average_last={old_last}, which pruned the rest); the table's "
                    f"train.average_last={cfg.train.average_last} averages more; train it again or score alike"
                )
    has_checkpoints = any((run.folder / "checkpoints").glob("step_*.json"))
    if read_metrics(run.folder, test_sets) is not None:
        if not rescore:
            return "finished"
        if not has_checkpoints:
            raise UsageError(f"--out {run.folder.parent}: {run.folder}'s metrics.json was scored under other settings "
                             f"({'; '.join(_config_differences(run, cfg)[:3])}) and it keeps no checkpoint to score "
                             "again; remove that folder or give another --out")
    if has_checkpoints:
        return "resume"
    return "new"


def _child_env() -> dict:
    """The environment of a run: this project importable wherever the command is started, output unbuffered
    (train.log follows the run)."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else ""), "PYTHONUNBUFFERED": "1"}


def _last_line(log: Path) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]
    return lines[-1] if lines else ""


def _stop(running: dict, *, grace_s: float) -> None:
    """Stop the runs still going: wait ``grace_s`` (after a Ctrl-C they got the SIGINT themselves), then
    SIGINT (recon.train saves a resumable checkpoint), then kill after STOP_TIMEOUT_S."""
    deadline = time.monotonic() + grace_s
    for proc in running:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            pass
    for proc in running:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for proc, (_, _, log) in running.items():
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _state_flags(run: RunSpec, state: str) -> list[str]:
    """``--resume auto`` for a run to continue; ``--overwrite`` for a new run whose folder holds the files of an
    attempt killed before its first checkpoint (same config, checked by :func:`run_state`): recon.train refuses
    a folder holding a run otherwise."""
    if state == "resume":
        return ["--resume", "auto"]
    return ["--overwrite"] if any((run.folder / name).exists() for name in RUN_FILES) else []


def execute(todo: Sequence[tuple[RunSpec, str]], *, jobs: int, bar, say: Callable[[str], None]) -> dict[str, float]:
    """Train ``todo`` ((run, "new" | "resume")) with at most ``jobs`` processes at a time; returns each run's
    wall time (s). Raises RunFailed on the first failure (the others are stopped, resumable)."""
    pending = list(todo)
    running: dict = {}  # Popen -> (run, start time, open log)
    walls: dict[str, float] = {}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                run, state = pending.pop(0)
                command = list(run.command) + _state_flags(run, state)
                run.folder.mkdir(parents=True, exist_ok=True)
                log = open(run.log, "a")
                log.write(f"# recon.table2 {datetime.now().isoformat(timespec='seconds')}: {shlex.join(command)}\n")
                log.flush()
                proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=_child_env())
                running[proc] = (run, time.perf_counter(), log)
                say(f"{'resume' if state == 'resume' else 'start'} {run.name} (log {run.log})")
                bar.set_postfix_str(", ".join(r.name for r, _, _ in running.values()))
            time.sleep(POLL_S)
            for proc, (run, start, log) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                log.close()
                del running[proc]
                if code != 0:
                    cause = _last_line(run.log)
                    cause = f": {cause}" if cause else ""
                    raise RunFailed(f"run {run.folder} failed (exit {code}){cause}; log {run.log}")
                walls[run.name] = time.perf_counter() - start
                say(f"done {run.name} in {walls[run.name]:.0f} s")
                bar.update(1)
                bar.set_postfix_str(", ".join(r.name for r, _, _ in running.values()))
    except KeyboardInterrupt:
        _stop(running, grace_s=10.0)
        raise
    except BaseException:
        _stop(running, grace_s=0.0)
        raise
    return walls


def _log_facts(log: Path) -> tuple[Optional[int], Optional[float]]:
    """(steps, training time in s) from the "trained N steps in T s" lines recon.train printed into the run's
    log: the last line's steps, the sum of the times of every attempt that got that far (a resumed run's
    time before its interruption is not counted); (None, None) without such a line."""
    try:
        matches = _TRAINED_RE.findall(log.read_text(errors="replace"))
    except OSError:
        return None, None
    if not matches:
        return None, None
    return int(matches[-1][0]), sum(float(seconds) for _, seconds in matches)


# ----------------------------------------------------------------------------------------------------
# 4. the table
# ----------------------------------------------------------------------------------------------------
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; NaN for one value); NaN when a value is NaN."""
    if any(math.isnan(v) for v in values):
        return math.nan, math.nan
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan


def _paired(value: Callable, row, reference, seeds, test_sets, metrics, confidence: float) -> dict:
    """Deltas of ``row`` minus ``reference`` paired by seed, with their means, stds and t-intervals."""
    deltas = {str(s): {t: {m: value(row, s, t, m) - value(reference, s, t, m) for m in metrics} for t in test_sets}
              for s in seeds}
    out = {"deltas": deltas, "delta_mean": {}, "delta_std": {}, "delta_ci": {}}
    for test in test_sets:
        intervals = {m: paired_interval([deltas[str(s)][test][m] for s in seeds], confidence) for m in metrics}
        out["delta_mean"][test] = {m: intervals[m]["mean"] for m in metrics}
        out["delta_std"][test] = {m: intervals[m]["std"] for m in metrics}
        out["delta_ci"][test] = {m: [intervals[m]["low"], intervals[m]["high"]] for m in metrics}
    return out


def summarize(
    results: dict[tuple[float, int], dict[str, dict[str, float]]],
    *,
    ratios: Sequence[float],
    seeds: Sequence[int],
    test_sets: Sequence[str],
    metrics: Sequence[str] = ("MPVPE", "RRVE", "MRRPE"),
    controls: Sequence[str] = (),
    control_ratio: Optional[float] = None,
    confidence: float = 0.95,
) -> dict:
    """Means, spreads and paired deltas over seeds.

    results: {(ratio, seed): {test set: {metric: mm}}} for every ratio and seed, and {(control name, seed): ...}
    for every control; ratios[0] is the reference.
    Returns {"mean", "std": {ratio tag: {test set: {metric}}}, "deltas": {ratio tag: {seed (str): {test set:
    {metric}}}} (r minus the reference at the same seed), "delta_mean", "delta_std": {ratio tag (r > ref):
    {test set: {metric}}}, "delta_ci": the same with [low, high], the two-sided ``confidence`` t-interval of the
    mean paired delta (:func:`paired_interval`), "confidence", "controls": {name: {"ratio", "mean", "std",
    "deltas", "delta_mean", "delta_std", "delta_ci"} (each control paired with the reference), and "vs_main": the
    same paired against the main run at the control's ratio}; std is the
    sample standard deviation (n - 1), NaN with one seed.
    """

    def value(ratio, seed, test, metric) -> float:
        v = results[(ratio, seed)].get(test, {}).get(metric)
        return math.nan if v is None else float(v)

    def means(row) -> tuple[dict, dict]:
        mean, std = {}, {}
        for test in test_sets:
            pairs = {m: _mean_std([value(row, s, test, m) for s in seeds]) for m in metrics}
            mean[test] = {m: pairs[m][0] for m in metrics}
            std[test] = {m: pairs[m][1] for m in metrics}
        return mean, std

    out = {"mean": {}, "std": {}, "deltas": {}, "delta_mean": {}, "delta_std": {}, "delta_ci": {},
           "confidence": confidence, "controls": {}}
    reference = ratios[0]
    for ratio in ratios:
        tag = ratio_tag(ratio)
        out["mean"][tag], out["std"][tag] = means(ratio)
        if ratio == reference:
            continue
        paired = _paired(value, ratio, reference, seeds, test_sets, metrics, confidence)
        for key in ("deltas", "delta_mean", "delta_std", "delta_ci"):
            out[key][tag] = paired[key]
    for control in controls:
        mean, std = means(control)
        out["controls"][control] = {"ratio": control_ratio, "mean": mean, "std": std,
                                    **_paired(value, control, reference, seeds, test_sets, metrics, confidence)}
        if control_ratio in ratios:  # the contrast a control exists for: control minus the main run at its ratio
            out["controls"][control]["vs_main"] = _paired(value, control, control_ratio, seeds, test_sets, metrics,
                                                          confidence)
    return out


def steps_note(runs: Sequence[dict]) -> Optional[str]:
    """A sentence when runs of the same seed trained different numbers of steps (None when every seed's runs
    agree or the steps are unknown). recon.train's epoch is a pass over the real data and a batch with
    r > 0 holds fewer real samples, so without --max-steps an epoch of a run with r > 0 has more steps (and a
    real_batch control's, with more real samples a batch, fewer). Control runs are named with their control."""
    by_seed: dict[int, dict[str, int]] = {}
    for run in runs:
        if run["steps"] is not None:
            tag = ratio_tag(run["ratio"]) + (f" {run['control']}" if run.get("control") else "")
            by_seed.setdefault(run["seed"], {})[tag] = run["steps"]
    differing = {seed: steps for seed, steps in by_seed.items() if len(set(steps.values())) > 1}
    if not differing:
        return None
    seed, steps = next(iter(differing.items()))
    shown = ", ".join(f"r={tag}: {n}" for tag, n in steps.items())
    return (
        f"the runs of a seed trained different numbers of steps (seed {seed}: {shown}). An epoch is a pass "
        "over the real data and a batch with r > 0 holds fewer real samples, so it has more steps; give "
        "--schedule steps (the default) for equal steps and learning-rate drops at equal steps."
    )


# Registered names that differ from the paper's row name (the paper calls IHMR "IHM").
PAPER_ROW_ALIASES = {"ihmr": "IHM"}


def paper_method(arch: str) -> Optional[str]:
    """The paper's Table 2 row name of a regressor ("interwild" -> "InterWild", "ihmr" -> "IHM"), None when it
    has none."""
    from eval.report import PAPER_TABLE2

    if arch.lower() in PAPER_ROW_ALIASES:
        return PAPER_ROW_ALIASES[arch.lower()]
    for name in PAPER_TABLE2:
        if "+" not in name and name.lower() == arch.lower():
            return name
    return None


def own_protocol(arch: str, results: dict, *, ratios, seeds, test_sets) -> Optional[dict]:
    """A regressor's own published protocol beside the table (DIR's, :mod:`eval.dir_protocol`): our means and
    spreads over seeds of its metrics ({"name", "metrics", "mean", "std"}) and its published numbers on the test
    sets we share ("published": {row: {test set: {metric: mm}}}). None for a regressor without one."""
    if arch != "dir":
        return None
    from eval.dir_protocol import DIR_METRICS, DIR_PUBLISHED

    summary = summarize(results, ratios=ratios, seeds=seeds, test_sets=test_sets, metrics=DIR_METRICS)
    published = {
        row: {t: values[t] for t in test_sets if t in values}
        for row, values in DIR_PUBLISHED.items()
        if any(t in values for t in test_sets)
    }
    return {
        "name": "DIR's own protocol (eval/dir_protocol.py: wrist root, GT bone-length rescale per hand; interacting "
                "frames with both meshes)",
        "metrics": list(DIR_METRICS),
        "mean": summary["mean"],
        "std": summary["std"],
        "published": published,
    }


def wild_test_set(test_sets: Sequence[str]) -> Optional[str]:
    """The in-the-wild test split (``synthlab-test-wild``), None without one."""
    return next((key for key in test_sets if key.endswith("test-wild")), None)


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 100 else f"{seconds / 60:.1f} min"


def _cell(mean: float, std: float, signed: bool = False) -> str:
    if math.isnan(mean):
        return "-"
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return text if math.isnan(std) else f"{text} ± {std:.2f}"


def row_names(method: str, ratios: Sequence[float]) -> dict[str, str]:
    """{ratio tag: row name}: the reference is the method, the others "<method>+AttentionHand"."""
    names = {ratio_tag(ratios[0]): f"{method} (r={ratio_tag(ratios[0])})"}
    for ratio in ratios[1:]:
        names[ratio_tag(ratio)] = f"{method}+AttentionHand (r={ratio_tag(ratio)})"
    return names


def _start_weights_lines(start: Optional[dict]) -> list[str]:
    """The weights every run started from (--backbone-weights), by path and SHA-256; none for random init."""
    if not start:
        return []
    hashes = ", ".join(f"{name} {digest[:16]}" for name, digest in start["weights"].items()) or "not found when tabulated"
    return [f"Every run started from `{start['path']}` (SHA-256: {hashes}).", ""]


def _schedule_lines(schedule: Optional[dict]) -> list[str]:
    if not schedule or schedule.get("kind") != "steps":
        return []
    drops = ", ".join(map(str, schedule["lr_decay_steps"])) or "none"
    return [f"Equal steps: every run trained {schedule['steps']} optimizer steps with its learning-rate drops at "
            f"steps {drops} (the reference run's schedule; {schedule['steps_per_epoch']} steps per epoch of its "
            "real data, the epoch clock of every run's other epoch-counted schedules: train.epoch_steps).", ""]


def control_row_name(method: str, control: dict) -> str:
    template = CONTROLS[control["name"]].row if control.get("name") in CONTROLS else CONTROL_ROW
    return template.format(method=method, ratio=ratio_tag(control["ratio"]), title=control["title"])


def _ci_cell(mean, interval) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    low, high = interval or (None, None)
    if low is None or high is None or (isinstance(low, float) and math.isnan(low)):
        return f"{mean:+.2f}"
    return f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"


def _interval_lines(report: dict, tests, metrics, names: dict, controls: dict) -> list[str]:
    """The paired Δ of every ratio and control against the reference with its t-interval."""
    from eval.report import DATASET_TITLES

    reference = ratio_tag(report["ratios"][0])
    level = round(100 * report.get("confidence", 0.95))
    columns = [(t, m) for t in tests for m in metrics]
    lines = ["", f"Paired Δ against r={reference} (same seed), mean and two-sided {level} % t-interval over "
             f"{len(report['seeds'])} seeds (t with n − 1 degrees of freedom); below zero is better:", "",
             "| Δ against r=" + reference + " | " + " | ".join(f"{DATASET_TITLES.get(t, t)} {m}" for t, m in columns) + " |",
             "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|"]
    for ratio in report["ratios"][1:]:
        tag = ratio_tag(ratio)
        cells = [_ci_cell(report["delta_mean"][tag][t][m], report["delta_ci"][tag][t][m]) for t, m in columns]
        lines.append(f"| {names[tag]} | " + " | ".join(cells) + " |")
    for control in controls.values():
        cells = [_ci_cell(control["delta_mean"][t][m], control["delta_ci"][t][m]) for t, m in columns]
        lines.append(f"| {control_row_name(report['method'], control)} | " + " | ".join(cells) + " |")
    versus = [c for c in controls.values() if c.get("vs_main")]
    if versus:
        main = ratio_tag(versus[0]["ratio"])
        lines += ["", f"Each control against the main run at its ratio (r={main}, same seed): a Δ above zero means the "
                  "control lost what the main run gained.", "",
                  f"| Δ against r={main} | " + " | ".join(f"{DATASET_TITLES.get(t, t)} {m}" for t, m in columns) + " |",
                  "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|"]
        for control in versus:
            cells = [_ci_cell(control["vs_main"]["delta_mean"][t][m], control["vs_main"]["delta_ci"][t][m])
                     for t, m in columns]
            lines.append(f"| {control_row_name(report['method'], control)} | " + " | ".join(cells) + " |")
    for control in controls.values():
        lines += ["", f"Control {control['title']}: {control['description']}."]
    return lines


def _weights_phrase(average_last: int) -> str:
    """How every run was scored (``train.average_last``)."""
    if average_last > 1:
        return (f"each run scored with the mean of the weights of its last {average_last} checkpoints "
                f"(train.average_last={average_last})")
    return "each run scored with its final weights"


def _validation_lines(validation: dict, metrics, names: dict, reference: str, method: str = "") -> list[str]:
    stamp = validation.get("synthlab") or {}
    where = f"{validation['split']} of {validation['root']}" + (f" (synthlab seed {stamp['seed']})" if "seed" in stamp else "")
    lines = ["", f"## Validation ({validation['key']})", "",
             f"For choices (never the test splits): every run's scored weights (those of the table above) on {where}; mean ± std over "
             "seeds, paired Δ with its t-interval.", "",
             "| Row | " + " | ".join(metrics) + " |", "|" + "|".join(["---"] + ["---:"] * len(metrics)) + "|"]
    key = validation["key"]
    for tag, name in names.items():
        cells = [_cell(_num(validation["mean"][tag][key][m]), _num(validation["std"][tag][key][m])) for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if tag != reference:
            cells = [_ci_cell(validation["delta_mean"][tag][key][m], validation["delta_ci"][tag][key][m]) for m in metrics]
            lines.append(f"| Δ (r={tag} − r={reference}) | " + " | ".join(cells) + " |")
    for name, control in (validation.get("controls") or {}).items():
        row = (control_row_name(method, {"name": name, "ratio": control["ratio"], "title": CONTROLS[name].title})
               if method and name in CONTROLS else f"{name} (r={ratio_tag(control['ratio'])})")
        cells = [_ci_cell(control["delta_mean"][key][m], control["delta_ci"][key][m]) for m in metrics]
        lines.append(f"| Δ {row} − r={reference} | " + " | ".join(cells) + " |")
        versus = control.get("vs_main")
        if versus:  # against the main run at its ratio: above zero, the control lost what the main run gained
            cells = [_ci_cell(versus["delta_mean"][key][m], versus["delta_ci"][key][m]) for m in metrics]
            lines.append(f"| Δ {row} − r={ratio_tag(control['ratio'])} | " + " | ".join(cells) + " |")
    return lines


def _num(x) -> float:
    return math.nan if x is None else float(x)


def format_markdown(report: dict) -> str:
    """The Markdown of a report (the JSON payload of :func:`main`): the spread table, the means in the
    paper's style (with the paper's rows when they apply), the runs, the figure."""
    from eval.report import DATASET_TITLES, make_table, to_markdown

    ratios, tests, metrics = report["ratios"], report["test_sets"], report["metrics"]
    reference = ratio_tag(ratios[0])
    names = row_names(report["method"], ratios)
    columns = [(t, m) for t in tests for m in metrics]

    def num(x) -> float:
        return math.nan if x is None else float(x)

    setup = report["setup"]
    lines = [
        f"# Table 2 ({report['method']}): {len(report['seeds'])} seed(s), synthetic ratios "
        f"{', '.join(ratio_tag(r) for r in ratios)}",
        "",
        f"`{report['command']}` (commit {(report.get('git_commit') or 'unknown')[:12]}"
        f"{', with uncommitted changes' if report.get('git_dirty') else ''}; {report['created']}; "
        f"{_duration(report['wall_s'])} in all).",
        "",
        f"Every run: {setup['arch']} trained on {', '.join(setup['train_datasets'])} "
        f"({setup['length']}, {_batch_phrase(setup)}, {setup['image_size'][0]}x"
        f"{setup['image_size'][1]} px, profile {setup['profile']}), seeds {', '.join(map(str, report['seeds']))}; "
        f"r = share of every batch generated by {setup['generator']} ({setup['generator_config']}, "
        f"{setup['generator_size']} px, labels: {setup['labels']}); "
        f"{_weights_phrase((setup.get('weights') or {}).get('average_last', 1))}. Millimetres, lower is "
        "better; mean ± sample standard deviation over seeds; Δ = metric(r) − metric(r="
        f"{reference}), paired by seed.",
        "",
        *_start_weights_lines(setup.get("start_weights")),
        *_schedule_lines(report.get("schedule")),
        "| Method | " + " | ".join(f"{DATASET_TITLES.get(t, t)} {m} ↓" for t, m in columns) + " |",
        "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|",
    ]
    for ratio in ratios:
        tag = ratio_tag(ratio)
        cells = [_cell(num(report["mean"][tag][t][m]), num(report["std"][tag][t][m])) for t, m in columns]
        lines.append(f"| {names[tag]} | " + " | ".join(cells) + " |")
    controls = {name: c for name, c in (report.get("controls") or {}).items() if c.get("status") == "trained"}
    for name, control in controls.items():
        cells = [_cell(num(control["mean"][t][m]), num(control["std"][t][m])) for t, m in columns]
        lines.append(f"| {control_row_name(report['method'], control)} | " + " | ".join(cells) + " |")
    mean_pose = report.get("mean_pose")
    if mean_pose:
        cells = [_cell(num(mean_pose["errors"].get(t, {}).get(m)), math.nan) for t, m in columns]
        lines.append("| mean-pose predictor (no image) | " + " | ".join(cells) + " |")
    for ratio in ratios[1:]:
        tag = ratio_tag(ratio)
        cells = [_cell(num(report["delta_mean"][tag][t][m]), num(report["delta_std"][tag][t][m]), signed=True)
                 for t, m in columns]
        lines.append(f"| Δ (r={tag} − r={reference}) | " + " | ".join(cells) + " |")
    if mean_pose:
        lines += ["", "The mean-pose predictor (" + mean_pose["how"] + ") reads no image: a regressor at its level has "
                  "learned nothing from the images."]
    lines += _interval_lines(report, tests, metrics, names, controls)
    if report.get("delta_wild_mpvpe_mean") is not None:
        delta = _cell(num(report["delta_wild_mpvpe_mean"]), num(report.get("delta_wild_mpvpe_std")), signed=True)
        pair = f"r={report['delta_wild_ratio']} − r={reference}"
        ci = report.get("delta_wild_mpvpe_ci") or [None, None]
        interval = "" if ci[0] is None else f", {round(100 * report['confidence'])} % t-interval [{ci[0]:+.2f}, {ci[1]:+.2f}]"
        lines += ["", f"Δ MPVPE on {report['wild_test_set']} ({pair}): {delta} mm{interval}."]
    counts = report.get("test_counts")
    if counts:
        shown = "; ".join(f"{DATASET_TITLES.get(t, t)}: " + ", ".join(f"{k[len('count_'):]} {v}" for k, v in c.items()
                                                                   if k in ("count_MPVPE", "count_RRVE", "count_MRRPE"))
                          for t, c in counts.items())
        lines += ["", f"Test-set counts (hands for MPVPE, pairs for RRVE and MRRPE): {shown}."
                  + (f" Note: {report['counts_note']}." if report.get("counts_note") else "")]
    for name, control in (report.get("controls") or {}).items():
        if control.get("status") == "same_as_main":
            lines += ["", f"Control {name} ({control['title']}): {control['reason']}."]
    validation = report.get("validation")
    if validation:
        lines += _validation_lines(validation, metrics, names, reference, report["method"])

    if report.get("steps_note"):
        lines += ["", f"Note: {report['steps_note']}"]

    # the means in the paper's style (eval.report): "value (difference to the reference)"
    results = {f"{names[ratio_tag(r)]}, ours": {t: {m: num(report["mean"][ratio_tag(r)][t][m]) for m in metrics}
                                                 for t in tests} for r in ratios}
    baselines = {f"{names[ratio_tag(r)]}, ours": f"{names[reference]}, ours" for r in ratios[1:]}
    if report.get("paper"):
        results.update(report["paper"])
        paper_rows = list(report["paper"])
        baselines.update({run: run.replace("+AttentionHand", "", 1) for run in paper_rows if "+AttentionHand" in run})
    table = make_table(results, datasets=tests, metrics=metrics, baselines=baselines)
    title = "Means (difference to the reference in brackets)"
    if report.get("paper"):
        title += ", beside the paper's rows"
    lines += ["", to_markdown(table, title=title).rstrip()]

    own = report.get("own_protocol")
    if own:
        own_columns = [(t, m) for t in tests for m in own["metrics"]]
        lines += ["", f"{own['name']}, mean ± std over seeds:", "",
                  "| Method | " + " | ".join(f"{DATASET_TITLES.get(t, t)} {m} ↓" for t, m in own_columns) + " |",
                  "|" + "|".join(["---"] + ["---:"] * len(own_columns)) + "|"]
        for ratio in ratios:
            tag = ratio_tag(ratio)
            cells = [_cell(num(own["mean"][tag][t][m]), num(own["std"][tag][t][m])) for t, m in own_columns]
            lines.append(f"| {names[tag]}, ours | " + " | ".join(cells) + " |")
        for row, values in own.get("published", {}).items():
            cells = [_cell(num(values.get(t, {}).get(m)), math.nan) for t, m in own_columns]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")

    lines += ["", "## Runs", "",
              "| run | r | seed | status | steps | train time | "
              + " | ".join(f"{DATASET_TITLES.get(t, t)} MPVPE" for t in tests) + " |",
              "|---|---:|---:|---|---:|---:|" + "---:|" * len(tests)]
    for run in report["runs"]:
        steps = "-" if run["steps"] is None else str(run["steps"])
        train_time = "-" if run["train_time_s"] is None else _duration(run["train_time_s"])
        mpvpe = [_cell(num(run["metrics"][t].get("MPVPE")), math.nan) for t in tests]
        trained = (run.get("batch") or {}).get("synthetic_ratio", run["ratio"])
        ratio = ratio_tag(run["ratio"]) if trained == run["ratio"] else f"{ratio_tag(trained)} (r={ratio_tag(run['ratio'])}'s batch)"
        lines.append(f"| {run['name']} | {ratio} | {run['seed']} | {run['status']} | {steps} | "
                     f"{train_time} | " + " | ".join(mpvpe) + " |")

    predictions = report.get("prediction_figure")
    if predictions:
        lines += ["", "## Predictions on " + DATASET_TITLES.get(predictions["test_set"], predictions["test_set"]), "",
                  " | ".join(predictions["columns"]) + f" ({predictions['samples']} images, evenly spaced over the test "
                  "set; each predicted mesh placed at the ground-truth right wrist).", "",
                  f"![predictions]({predictions['path']})"]

    figure = report.get("figure")
    if figure:
        lines += ["", "## Generated samples", "",
                  f"Mesh image | generated | overlay, {figure['samples']} samples made as the r={figure['ratio']} run "
                  f"with seed {figure['seed']} makes them ({figure['generator']}, {figure['generator_config']}, "
                  f"{figure['size']} px; mixing.mode={figure['mode']}).", "",
                  f"![generated samples]({figure['path']})", ""]
        lines += [f"{i + 1}. {prompt}" for i, prompt in enumerate(figure["prompts"])]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# 5. beside the table: test-set counts, the mean-pose predictor, the validation split, predictions
# ----------------------------------------------------------------------------------------------------
def test_counts(run_entries: Sequence[dict], test_sets: Sequence[str]) -> tuple[dict, Optional[str]]:
    """({test set: {count_*: n}} of the first run, a note when another run counted differently (None when all
    agree)): how many hands / pairs each metric of each test set averages over."""
    def counts(run: dict) -> dict:
        return {t: {k: v for k, v in run["metrics"].get(t, {}).items() if k.startswith("count_")} for t in test_sets}

    if not run_entries:
        return {}, None
    first = counts(run_entries[0])
    differing = [run["name"] for run in run_entries[1:] if counts(run) != first]
    note = None
    if differing:
        note = f"runs {', '.join(differing)} counted other test samples than {run_entries[0]['name']} (skipped records?)"
    return first, note


def mean_pose_row(cfg, max_samples: Optional[int], test_sets: Sequence[str]) -> dict:
    """The mean-pose predictor's errors on the table's test sets (:func:`recon.meanpose.mean_pose_errors`, kind
    ``mesh``: per side the training labels' mean wrist-relative mesh, and their mean relative root, the same for
    every image, scored as a trained regressor is): what a regressor that learned nothing from the image scores."""
    from recon.meanpose import mean_pose_errors

    errors = mean_pose_errors(cfg, kind="mesh", max_train_samples=max_samples)
    return {
        "errors": {t: {k: v for k, v in errors[t].items() if v is None or isinstance(v, (int, float))} for t in test_sets},
        "kind": "mesh",
        "train_samples_per_reader": max_samples,
        "how": "recon.meanpose, kind mesh: per side the training labels' mean wrist-relative mesh and their mean "
               "relative root, one prediction for every image",
    }


def run_weights(folder: Path) -> dict:
    """What a finished run's ``metrics.json`` scored when it names averaged weights (``train.average_last`` > 1):
    its ``weights`` entry (``step``, ``averaged_steps``, ``checkpoint`` relative to the run folder); else ``{}``
    (its final weights)."""
    try:
        weights = json.loads((folder / "metrics.json").read_text()).get("weights") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    return weights if isinstance(weights, dict) and weights.get("checkpoint") else {}


def evaluated_weights(folder: Path) -> Path:
    """The checkpoint a finished run's ``metrics.json`` scored: the averaged weights it names (a missing file is
    then an error where it is loaded, never a silent fallback), else the run folder (its newest checkpoint)."""
    weights = run_weights(folder)
    return folder / str(weights["checkpoint"]) if weights else folder


def _weights_of_runs(entries: Sequence[dict]) -> dict:
    """How the table's runs were scored: ``{"average_last": k}`` when every run averaged k checkpoints, 1 when
    none did; a table that mixes the two is refused (its rows would not be comparable)."""
    counts = {len(entry["weights"].get("averaged_steps", [])) or 1 for entry in entries}
    if len(counts) > 1:
        raise UsageError(
            "the runs were scored with different weights (some with train.average_last, some with their final "
            f"weights or another count: {sorted(counts)}); score them alike (docs/reproduce-table2.md)"
        )
    return {"average_last": counts.pop() if counts else 1}


def score_checkpoint(folder: Path, datasets: Sequence[str], *, data_root: Optional[str], device) -> tuple[dict, int]:
    """(the evaluator's results {key: metrics} of a run's newest checkpoint on ``datasets`` read from
    ``data_root`` with the run's own input protocol, the checkpoint's step)."""
    import torch

    from hands.mano import HandModel
    from recon.config import from_dict, load_config
    from recon.data import build_test_sets
    from recon.evaluate import evaluate_regressor
    from recon.test import load_regressor

    device = torch.device(device or "cpu")
    model, info = load_regressor(evaluated_weights(folder), device=device)
    cfg = load_config(base=from_dict(info.meta["config"]), flags={"data.root": data_root})
    hand_model = HandModel(mano_dir=cfg.mano_dir)
    test_sets = build_test_sets(cfg, hand_model=hand_model, datasets=list(datasets))
    results = evaluate_regressor(model, test_sets, hand_model=hand_model, device=device,
                                 batch_size=cfg.eval.batch_size, progress=False)
    return results, int(info.step)


def check_validation_seed(val_root, cfg) -> None:
    """UsageError when ``--val-root`` is a synthlab written with the training synthlab's seed: its images would
    be the training images (same seed, same split), not held-out ones."""
    from hands.datasets.synthlab import ensure_synthlab
    from recon.data import dataset_root

    names = all_dataset_names(cfg)
    if "synthlab" not in names:
        return
    train_root = dataset_root("synthlab", cfg.data.root, len(names)) or ensure_synthlab(None, mano_dir=cfg.mano_dir)
    seeds = []
    for root in (Path(val_root), Path(train_root)):
        try:
            seeds.append(json.loads((root / "synthlab.json").read_text()).get("seed"))
        except (OSError, ValueError):
            return  # not a synthlab folder written by its writer: nothing to compare
    if seeds[0] is not None and seeds[0] == seeds[1]:
        raise UsageError(f"--val-root {val_root}: written with seed {seeds[0]}, the training synthlab's seed; "
                         "validate on a synthlab written with another --seed (python -m hands.datasets.synthlab "
                         "--out DIR --seed 1)")


def validate_runs(args: argparse.Namespace, runs: Sequence[RunSpec], metrics: Sequence[str], *, say) -> dict:
    """Every run's newest checkpoint scored on the validation split (``--val-root``, ``--val-split``): images of
    the training data's style that neither training nor the test splits contain, for choices made on the table
    (issue 25, point 4: never tune on the test splits). Each run's scores are kept in ``<run>/val_metrics.json``
    (reused while its checkpoint step, root and split are the same), so a resumed table does not score again."""
    from recon.checkpoint import read_checkpoint_info
    from recon.data import parse_specs

    spec = parse_specs([f"synthlab:{args.val_split}"], "test")[0]
    root = str(Path(args.val_root).resolve())
    results = {}
    per_run = {}
    for run in runs:
        path = run.folder / VAL_METRICS
        cached = None
        try:
            cached = json.loads(path.read_text())
        except (OSError, ValueError):
            pass
        info = read_checkpoint_info(evaluated_weights(run.folder))  # the weights the run's test numbers scored
        step, sha = info.step, info.meta["weights_sha256"]
        if not (isinstance(cached, dict) and cached.get("root") == root and cached.get("split") == args.val_split
                and cached.get("step") == step and cached.get("weights_sha256") == sha
                and isinstance(cached.get("metrics"), dict)):
            scores, step = score_checkpoint(run.folder, [f"{spec.name}:{spec.split}"], data_root=root, device=args.device)
            cached = {"root": root, "split": args.val_split, "step": step, "weights_sha256": sha,
                      "metrics": scores[spec.key]}
            _write_text(path, json.dumps(_clean(cached), indent=2, allow_nan=False) + "\n")
            say(f"validated {run.name} on {spec.key} of {root}")
        per_run[run.name] = {k: v for k, v in cached["metrics"].items() if v is None or isinstance(v, (int, float))}
        results[(run.control or run.ratio, run.seed)] = {spec.key: cached["metrics"]}
    controls = sorted({run.control for run in runs if run.control}, key=list(CONTROLS).index)
    summary = summarize(results, ratios=args.ratio_list, seeds=args.seed_values, test_sets=[spec.key], metrics=metrics,
                        controls=controls, control_ratio=args.control_ratio_value, confidence=args.confidence_level)
    stamp = None
    try:
        stamp = json.loads((Path(root) / "synthlab.json").read_text())
        stamp = {k: stamp[k] for k in ("seed", "sizes", "resolution") if k in stamp}
    except (OSError, ValueError):
        pass
    return {"root": root, "split": args.val_split, "key": spec.key, "synthlab": stamp, "runs": per_run, **summary}


def prediction_figure(pair: Sequence[RunSpec], test_key: str, n: int, path: Path, *, device=None) -> dict:
    """Write ``path``: ``n`` images of the test set ``test_key`` (evenly spaced), one row each: input | ground
    truth | the first run's prediction | the second's (meshes over the image, each placed at the ground-truth
    right wrist as :func:`eval.report.mesh_overlay_grid` places them); returns the figure's facts."""
    import torch

    from eval.report import mesh_overlay_grid, save_png
    from hands.mano import HandModel
    from hands.sample import HandSample, collate
    from recon.config import from_dict, load_config
    from recon.data import build_test_sets, parse_specs
    from recon.test import load_regressor

    device = torch.device(device or "cpu")
    models, steps = [], []
    for run in pair:
        model, info = load_regressor(evaluated_weights(run.folder), device=device)
        models.append(model)
        steps.append(int(info.step))
    cfg = load_config(base=from_dict(info.meta["config"]))
    hand_model = HandModel(mano_dir=cfg.mano_dir)
    spec = next(s for s in parse_specs(cfg.data.test, "test") if s.key == test_key)
    dataset = next(iter(build_test_sets(cfg, hand_model=hand_model, datasets=[f"{spec.name}:{spec.split}"]).values()))
    count = min(n, len(dataset))
    indices = sorted({round(i * (len(dataset) - 1) / max(count - 1, 1)) for i in range(count)})
    samples = [sample for sample in (dataset[i] for i in indices) if isinstance(sample, HandSample)]
    if not samples:
        raise RunFailed(f"prediction figure: no sample of {test_key} could be read")
    batch = collate(samples).to(device)
    faces = {side: hand_model.faces_for(side).to(device) for side in ("right", "left")}
    regressors = {side: hand_model.j_regressor_for(side).to(device) for side in ("right", "left")}
    pad = 2
    grids = []
    with torch.no_grad():
        for model in models:
            grids.append(mesh_overlay_grid(batch, model(batch), faces_right=faces["right"], faces_left=faces["left"],
                                           j_regressor_right=regressors["right"], j_regressor_left=regressors["left"],
                                           max_samples=len(samples), padding=pad))
    column = batch.image.shape[-1] + pad
    image = torch.cat([grids[0]] + [grid[:, :, pad + 2 * column:] for grid in grids[1:]], -1)  # input | GT | preds
    save_png(image.cpu(), path)
    return {
        "path": path.name,
        "test_set": test_key,
        "samples": len(samples),
        "indices": indices,
        "runs": [run.name for run in pair],
        "steps": steps,
        "columns": ["input", "ground truth"] + [f"r={ratio_tag(run.ratio)}, seed {run.seed}" for run in pair],
    }


def _clean(data):
    """NaN -> None, recursively (JSON without NaN)."""
    if isinstance(data, dict):
        return {k: _clean(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_clean(v) for v in data]
    if isinstance(data, float) and not math.isfinite(data):
        return None
    return data


def _write_text(path: Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# ----------------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------------
def _setup(cfg, mixed_cfg) -> dict:
    """The facts every run shares (from the reference run's config) and the generator of the runs with r > 0."""
    from recon.cards import start_weights_card
    from recon.data import parse_specs

    return {
        "arch": cfg.arch,
        "profile": cfg.profile,
        "train_datasets": [f"{s.name}:{s.split}" for s in parse_specs(cfg.data.train, "train")],
        "test_datasets": [f"{s.name}:{s.split}" for s in parse_specs(cfg.data.test, "test")],
        "data_root": cfg.data.root,
        "mano_dir": cfg.mano_dir,
        "length": f"{cfg.train.max_steps} steps" if cfg.train.max_steps is not None else f"{cfg.train.epochs} epochs",
        "epochs": cfg.train.epochs,
        "max_steps": cfg.train.max_steps,
        "batch_size": cfg.train.batch_size,
        "image_size": list(cfg.data.image_size),
        "generator": mixed_cfg.mixing.generator,
        "generator_config": mixed_cfg.mixing.generator_config,
        "generator_size": mixed_cfg.mixing.size,
        "mix_mode": mixed_cfg.mixing.mode,
        "labels": mixed_cfg.mixing.labels,
        "start_weights": start_weights_card(cfg),  # --backbone-weights: path and SHA-256 (a path alone is not the weights)
    }


def _batch_setup(args: argparse.Namespace, runs: Sequence[RunSpec], configs: dict) -> dict:
    """{"synthetic_batch": share | add, "batch_sizes": {ratio: batch}, "real_per_batch": {ratio: n}} of every
    ratio that ran, the control ratio included."""
    sizes, real = {}, {}
    for run in sorted(runs, key=lambda run: run.ratio):
        batch = _run_batch(configs[run.name])
        if batch["synthetic_ratio"] != run.ratio:
            continue  # a real_batch control: its ratio's batch, all real (its row says so)
        sizes[ratio_tag(run.ratio)], real[ratio_tag(run.ratio)] = batch["size"], batch["real"]
    return {"synthetic_batch": getattr(args, "synthetic_batch", "share"), "batch_sizes": sizes, "real_per_batch": real}


def _run_batch(cfg) -> dict:
    """{"size", "real", "generated", "synthetic_ratio"}: what one run trained on a step (a real_batch control:
    its ratio's batch at synthetic_ratio 0)."""
    from recon.train import batch_split

    n_real, n_generated = batch_split(cfg)
    return {"size": n_real + n_generated, "real": n_real, "generated": n_generated,
            "synthetic_ratio": float(cfg.train.synthetic_ratio)}


def _batch_phrase(setup: dict) -> str:
    """The batch in the table's setup line: one number, or with --synthetic-batch add the batch of every ratio."""
    if setup.get("synthetic_batch") != "add":
        return f"batch {setup['batch_size']}"
    sizes, real = setup["batch_sizes"], setup["real_per_batch"]
    per_ratio = ", ".join(f"{sizes[tag]} at r = {tag}" if sizes[tag] == real[tag] else
                          f"{sizes[tag]} = {real[tag]} real + {sizes[tag] - real[tag]} generated at r = {tag}"
                          for tag in sizes)
    return f"--synthetic-batch add: the generated images on top of the real ones, batch {per_ratio}"


def run_table(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    """Plan, check, draw the figure, train, tabulate (see the module docstring); returns the JSON payload
    (or {} for --dry-run)."""
    wall_start = time.perf_counter()
    from recon.registry import import_plugin, load_builtin_regressors

    # 1. plan and check every run's config -------------------------------------------------------------
    for plugin in args.plugin:
        import_plugin(plugin)
    load_builtin_regressors()
    runs, configs, schedule = plan(args)
    reference_cfg = configs[runs[0].name]
    tests = eval_set_keys(reference_cfg)
    identical = same_as_main(runs, configs)  # controls that would generate exactly as the main runs
    runs = [run for run in runs if run.control not in identical]
    states = {run.name: run_state(run, configs[run.name], tests) for run in runs}
    # a resumed run scores under the table's scoring keys, whatever its checkpoint's config says of them
    runs = [dataclasses.replace(run, command=(*run.command, *rescore_overrides(configs[run.name])))
            if states[run.name] == "resume" else run for run in runs]
    if args.dry_run:
        for control, why in identical.items():
            print(f"# control {control}: not trained: {why}")
        for run in runs:
            state = states[run.name]
            note = {"finished": "# finished, would be skipped: ", "resume": "# would resume: "}.get(state, "")
            print(note + shlex.join(list(run.command) + _state_flags(run, state)))
        return {}

    on_synthlab = all_dataset_names(reference_cfg) == {"synthlab"}
    results_dir = Path(args.results_dir or ("docs/results" if on_synthlab else args.out))
    stem = args.stem
    first_mixed = next(run for run in runs if run.ratio > 0 and run.control is None)
    say = tqdm.write
    say(f"recon.table2: {len(args.ratio_list)} ratios x {len(args.seed_values)} seeds"
        + (f" + {len(args.control_list) - len(identical)} control(s)" if args.control_list else "")
        + f" = {len(runs)} runs of {args.arch} in {args.out} ({args.jobs_n} at a time); results in {results_dir}")
    for control, why in identical.items():
        say(f"recon.table2: control {control}: {why}")

    # 2. the figure --------------------------------------------------------------------------------------
    figure = None
    if args.figure_n > 0:
        start = time.perf_counter()
        figure_path = results_dir / f"{stem}-samples.png"
        figure = make_figure(configs[first_mixed.name], args.figure_n, figure_path)
        say(f"wrote {figure_path} ({figure['samples']} samples, {time.perf_counter() - start:.1f} s)")

    # 3. the runs ----------------------------------------------------------------------------------------
    todo = []
    for run in runs:
        if states[run.name] == "finished":
            warn = "" if (run.folder / "config.yaml").is_file() else " (no config.yaml to check it against)"
            say(f"skip {run.name}: finished ({run.folder / 'metrics.json'}){warn}")
        else:
            stale = run.folder / "metrics.json"
            if states[run.name] == "resume" and stale.is_file():  # scored under other settings: kept aside, so
                os.replace(stale, run.folder / "metrics.previous.json")  # an unfinished rescore never looks done
                say(f"moved {stale} to metrics.previous.json: {run.name} is scored again under the table's settings")
            todo.append((run, states[run.name]))
    done = len(runs) - len(todo)
    with tqdm(total=len(runs), initial=done, desc="table2 runs", unit="run", dynamic_ncols=True) as bar:
        walls = execute(todo, jobs=args.jobs_n, bar=bar, say=say)

    # 4. the table ---------------------------------------------------------------------------------------
    results, run_entries = {}, []
    for run in runs:
        metrics = read_metrics(run.folder, tests)
        if metrics is None:
            raise RunFailed(f"run {run.folder} ended without a finished metrics.json; log {run.log}")
        results[(run.control or run.ratio, run.seed)] = metrics
        steps, train_time = _log_facts(run.log)
        status = {"finished": "skipped", "resume": "resumed", "new": "trained"}[states[run.name]]
        run_entries.append({
            "name": run.name, "ratio": run.ratio, "seed": run.seed, "control": run.control, "folder": str(run.folder),
            "batch": _run_batch(configs[run.name]),
            "status": status, "steps": steps, "train_time_s": train_time, "wall_s": walls.get(run.name),
            "weights": run_weights(run.folder),
            "metrics": {t: {k: v for k, v in metrics[t].items() if v is None or isinstance(v, (int, float))}
                        for t in tests},
            "command": shlex.join(run.command),
        })
    from eval.report import TABLE2_METRICS, paper_results
    from recon.cards import code_version

    metric_names = list(TABLE2_METRICS)
    trained_controls = [c for c in args.control_list if c not in identical]
    summary = summarize(results, ratios=args.ratio_list, seeds=args.seed_values, test_sets=tests, metrics=metric_names,
                        controls=trained_controls, control_ratio=args.control_ratio_value,
                        confidence=args.confidence_level)
    for control in args.control_list:
        entry = {"name": control, "title": CONTROLS[control].title, "description": CONTROLS[control].description,
                 "ratio": args.control_ratio_value, "overrides": control_overrides(args, control)}
        if control in identical:
            summary["controls"][control] = {**entry, "status": "same_as_main", "reason": identical[control]}
        else:
            summary["controls"][control] = {**entry, "status": "trained", **summary["controls"][control]}
    paper_name = paper_method(args.arch)
    method = paper_name or args.arch
    paper = paper_results([paper_name]) if paper_name and set(tests) <= set(PAPER_TEST_SETS) else None

    version = code_version()
    report = {
        "arch": args.arch,
        "method": method,
        "profile": reference_cfg.profile,
        "unit": "mm",
        "seeds": list(args.seed_values),
        "ratios": list(args.ratio_list),
        "reference_ratio": args.ratio_list[0],
        "test_sets": tests,
        "metrics": metric_names,
        "setup": {**_setup(reference_cfg, configs[first_mixed.name]), "weights": _weights_of_runs(run_entries),
                  **_batch_setup(args, runs, configs)},
        "schedule": schedule,
        "runs": run_entries,
        **summary,
    }
    report["test_counts"], report["counts_note"] = test_counts(run_entries, tests)
    report["steps_note"] = steps_note(run_entries)
    if report["steps_note"]:
        say(f"recon.table2: note: {report['steps_note']}")
    wild = wild_test_set(tests)
    if wild is not None:
        tag = ratio_tag(args.ratio_list[1])
        report.update(
            wild_test_set=wild,
            delta_wild_ratio=tag,
            delta_wild_mpvpe_mean=summary["delta_mean"][tag][wild]["MPVPE"],
            delta_wild_mpvpe_std=summary["delta_std"][tag][wild]["MPVPE"],
            delta_wild_mpvpe_ci=summary["delta_ci"][tag][wild]["MPVPE"],
        )

    # 5. what "learned" means, validation, predictions ----------------------------------------------------
    report["mean_pose"] = None
    if args.mean_pose_n != 0:
        start = time.perf_counter()
        report["mean_pose"] = mean_pose_row(reference_cfg, args.mean_pose_n, tests)
        say(f"recon.table2: mean-pose predictor scored ({time.perf_counter() - start:.1f} s)")
    report["validation"] = None
    if args.val_root is not None:
        check_validation_seed(args.val_root, reference_cfg)
        report["validation"] = validate_runs(args, runs, metric_names, say=say)
    report["prediction_figure"] = None
    if args.prediction_n > 0 and wild is not None:
        pair = [next(r for r in runs if r.control is None and r.seed == args.seed_values[0] and r.ratio == ratio)
                for ratio in args.ratio_list[:2]]
        path = results_dir / f"{stem}-predictions.png"
        report["prediction_figure"] = prediction_figure(pair, wild, args.prediction_n, path, device=args.device)
        say(f"wrote {path}")
    report.update(
        paper=paper,
        own_protocol=own_protocol(args.arch, results, ratios=args.ratio_list, seeds=args.seed_values, test_sets=tests),
        figure=figure,
        command="python -m recon.table2 " + shlex.join(argv),
        git_commit=version["git_commit"],
        git_dirty=version["git_dirty"],
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        wall_s=time.perf_counter() - wall_start,
    )
    report = _clean(report)
    markdown = format_markdown(report)
    print("\n" + markdown, end="")
    md_path = _write_text(results_dir / f"{stem}.md", markdown)
    json_path = _write_text(results_dir / f"{stem}.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    print(f"wrote {md_path} and {json_path}")
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    from hands.datasets import DatasetError
    from hands.mano import MANOError
    from recon.config import ConfigError
    from recon.data import DataSpecError
    from recon.registry import PluginError
    from recon.checkpoint import CheckpointError
    from recon.train import UsageError as TrainUsageError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        run_table(args, argv)
    except (UsageError, TrainUsageError, ConfigError, DataSpecError, DatasetError, PluginError, MANOError,
            CheckpointError) as error:  # CheckpointError: e.g. the averaged weights a run's metrics.json names are gone
        print(f"recon.table2: error: {error}", file=sys.stderr)
        return 2
    except RunFailed as error:
        print(f"recon.table2: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("recon.table2: interrupted; the same command continues (finished runs are skipped, the others "
              "resume from their newest checkpoint)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
