"""Table-2-style reports (Markdown, CSV, JSON) and figures of predicted / ground-truth meshes over images.

A *results* mapping is what the evaluators produce, gathered per run and dataset::

    {"InterWild": {"hic": {"MPVPE": 15.3, "RRVE": ..., "MRRPE": ..., ...}, "reih": {...}},
     "InterWild+AttentionHand": {...}}

(millimetres; extra keys such as counts are ignored by the tables). :func:`make_table` turns it into a
:class:`Table` with rows = runs and columns = (dataset, metric); a run may be compared with a baseline run,
and the difference (run minus baseline) is shown as in the paper's red subscripts: ``"14.74 (-0.56)"``.
:data:`PAPER_TABLE2` holds the paper's Table 2, so that :func:`paper_results` can put "paper" rows beside
ours.
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from hands.render import render_hands

from . import metrics

__all__ = [
    "DATASET_TITLES",
    "TABLE2_METRICS",
    "PAPER_TABLE2",
    "paper_results",
    "Table",
    "make_table",
    "to_markdown",
    "to_csv",
    "to_json",
    "write_table",
    "mesh_overlay_grid",
    "save_png",
    "load_results",
    "main",
]

# Column titles of the datasets (keys are the rule-set / dataset names of eval.evaluator).
DATASET_TITLES = {"hic": "HIC", "reih": "ReIH", "ih26m": "IH2.6M", "synthlab": "synthlab"}
TABLE2_METRICS = ("MPVPE", "RRVE", "MRRPE")
ATTENTIONHAND_SUFFIX = "+AttentionHand"

# AttentionHand (Park et al., ECCV 2024), Table 2: "Quantitative comparisons with state-of-the-art 3D hand
# mesh reconstruction methods with and without AttentionHand", millimetres, transcribed from
# /work/shared/paper/AttentionHand.txt. HIC and ReIH are the "in-the-wild" columns, IH2.6M "in-the-lab".
# The paper's subscripts (differences) are not stored: they are recomputed from these values and equal
# the printed ones (tests/test_eval_report.py checks every one of them).
_T2 = ("hic", "reih", "ih26m")


def _row(*values: float) -> dict[str, dict[str, float]]:
    assert len(values) == 9
    return {d: dict(zip(TABLE2_METRICS, values[3 * k : 3 * k + 3])) for k, d in enumerate(_T2)}


PAPER_TABLE2: dict[str, dict[str, dict[str, float]]] = {
    #                                      HIC: MPVPE RRVE  MRRPE | ReIH: MPVPE RRVE MRRPE | IH2.6M: MPVPE RRVE MRRPE
    "IHM": _row(38.57, 45.51, 119.64, 30.90, 45.55, 98.45, 16.94, 21.98, 33.39),
    "IHM+AttentionHand": _row(36.73, 44.10, 94.63, 29.11, 43.12, 87.07, 15.09, 20.55, 32.21),
    "InterShape": _row(27.66, 34.69, 110.25, 27.87, 38.56, 80.04, 12.97, 17.35, 31.56),
    "InterShape+AttentionHand": _row(25.04, 33.33, 80.17, 26.44, 36.54, 61.41, 11.90, 16.22, 30.04),
    "IntagHand": _row(23.07, 28.74, 52.46, 25.90, 30.05, 42.22, 12.34, 17.32, 29.31),
    "IntagHand+AttentionHand": _row(21.87, 27.09, 47.11, 23.39, 28.77, 33.98, 11.42, 15.81, 29.18),
    "DIR": _row(21.89, 26.11, 43.11, 21.82, 29.66, 37.01, 10.26, 17.11, 28.98),
    "DIR+AttentionHand": _row(20.66, 25.87, 40.54, 19.91, 26.67, 35.05, 10.09, 16.99, 28.02),
    "InterWild": _row(15.30, 21.35, 31.26, 13.99, 20.07, 22.38, 11.52, 19.77, 26.87),
    "InterWild+AttentionHand": _row(14.74, 21.10, 29.26, 13.95, 19.94, 22.05, 10.62, 19.09, 25.74),
}


def paper_results(methods: Sequence[str] | None = None, suffix: str = " (paper)") -> dict:
    """The paper's Table 2 rows as a results mapping, run names suffixed (e.g. "InterWild (paper)").

    methods: base method names ("InterWild", "IntagHand", ...); each brings its row and its
    "+AttentionHand" row. Default: all five methods. Unknown names raise ValueError listing the known ones.
    """
    known = [name for name in PAPER_TABLE2 if not name.endswith(ATTENTIONHAND_SUFFIX)]
    methods = known if methods is None else list(methods)
    out = {}
    for method in methods:
        if method not in known:
            raise ValueError(f"methods: {method!r} is not a Table 2 row; known: {known}")
        for name in (method, method + ATTENTIONHAND_SUFFIX):
            out[name + suffix] = {d: dict(v) for d, v in PAPER_TABLE2[name].items()}
    return out


# ----------------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------------
@dataclass
class Table:
    """rows: run names in order; columns: (dataset, metric) pairs in order;
    values[run][(dataset, metric)]: mm or NaN (not evaluated); baselines[run]: the run it is compared with."""

    rows: list[str]
    columns: list[tuple[str, str]]
    values: dict[str, dict[tuple[str, str], float]]
    baselines: dict[str, str] = field(default_factory=dict)

    def value(self, run: str, column: tuple[str, str]) -> float:
        return self.values[run].get(column, math.nan)

    def delta(self, run: str, column: tuple[str, str]) -> float:
        """run minus its baseline (NaN without a baseline or a value)."""
        base = self.baselines.get(run)
        if base is None:
            return math.nan
        return self.value(run, column) - self.value(base, column)

    def column_title(self, column: tuple[str, str]) -> str:
        dataset, metric = column
        return f"{DATASET_TITLES.get(dataset, dataset)} {metric}"


def _auto_baseline(run: str, runs: Sequence[str]) -> str | None:
    """'X+AttentionHand<suffix>' is compared with 'X<suffix>' when that run exists."""
    if ATTENTIONHAND_SUFFIX not in run:
        return None
    base = run.replace(ATTENTIONHAND_SUFFIX, "", 1)
    return base if base in runs and base != run else None


def make_table(
    results: Mapping[str, Mapping[str, Mapping[str, float]]],
    *,
    datasets: Sequence[str] | None = None,
    metrics: Sequence[str] = TABLE2_METRICS,
    baselines: Mapping[str, str] | str | None = "auto",
) -> Table:
    """Build a :class:`Table` from a results mapping (see the module docstring).

    datasets: column order (default: the order in which datasets first appear); metrics: per dataset;
    baselines: {run: baseline run} for the deltas, "auto" (each "X+AttentionHand" run against "X"), or None.
    """
    runs = list(results)
    if datasets is None:
        datasets = []
        for per_dataset in results.values():
            datasets += [d for d in per_dataset if d not in datasets]
    columns = [(d, m) for d in datasets for m in metrics]
    values = {
        run: {(d, m): float(results[run].get(d, {}).get(m, math.nan)) for d, m in columns} for run in runs
    }
    if baselines == "auto":
        baselines = {run: base for run in runs if (base := _auto_baseline(run, runs)) is not None}
    elif baselines is None:
        baselines = {}
    else:
        baselines = dict(baselines)
        for run, base in baselines.items():
            for name, what in ((run, "run"), (base, "baseline")):
                if name not in results:
                    raise ValueError(f"baselines: {what} {name!r} is not in the results; runs: {runs}")
    return Table(rows=runs, columns=columns, values=values, baselines=baselines)


def _fmt(value: float, precision: int) -> str:
    return "-" if math.isnan(value) else f"{value:.{precision}f}"


def _fmt_delta(value: float, precision: int) -> str:
    return "" if math.isnan(value) else f" ({value:+.{precision}f})"


def to_markdown(table: Table, precision: int = 2, title: str | None = None) -> str:
    """A Markdown table: one row per run, cells "value" or "value (delta)" against the run's baseline (mm)."""
    header = ["Method"] + [table.column_title(c) + " ↓" for c in table.columns]
    lines = [f"**{title}**", ""] if title else []
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * len(table.columns)) + "|")
    for run in table.rows:
        cells = [
            _fmt(table.value(run, c), precision) + _fmt_delta(table.delta(run, c), precision) for c in table.columns
        ]
        lines.append("| " + " | ".join([run] + cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: Table, precision: int = 4) -> str:
    """CSV text: columns run, baseline, then "<DATASET> <METRIC>" values and "<DATASET> <METRIC> delta"
    differences (empty cells where missing); numbers rounded to ``precision`` decimals."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    titles = [table.column_title(c) for c in table.columns]
    writer.writerow(["run", "baseline"] + titles + [t + " delta" for t in titles])

    def cell(x: float) -> str:
        return "" if math.isnan(x) else f"{x:.{precision}f}"

    for run in table.rows:
        writer.writerow(
            [run, table.baselines.get(run, "")]
            + [cell(table.value(run, c)) for c in table.columns]
            + [cell(table.delta(run, c)) for c in table.columns]
        )
    return buffer.getvalue()


def to_json(table: Table) -> str:
    """JSON text: {"columns": [{"dataset", "metric"}], "rows": [{"run", "baseline", "values", "deltas"}]},
    values and deltas keyed "dataset/metric", NaN written as null."""

    def clean(x: float):
        return None if math.isnan(x) else x

    payload = {
        "unit": "mm",
        "columns": [{"dataset": d, "metric": m} for d, m in table.columns],
        "rows": [
            {
                "run": run,
                "baseline": table.baselines.get(run),
                "values": {f"{d}/{m}": clean(table.value(run, (d, m))) for d, m in table.columns},
                "deltas": {f"{d}/{m}": clean(table.delta(run, (d, m))) for d, m in table.columns},
            }
            for run in table.rows
        ],
    }
    return json.dumps(payload, indent=2, allow_nan=False)


def write_table(table: Table, out_dir: str | Path, stem: str = "table2", title: str | None = None) -> dict[str, Path]:
    """Write ``<stem>.md``, ``<stem>.csv`` and ``<stem>.json`` into out_dir (created); returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / f"{stem}.md", "csv": out_dir / f"{stem}.csv", "json": out_dir / f"{stem}.json"}
    paths["md"].write_text(to_markdown(table, title=title), encoding="utf-8")
    paths["csv"].write_text(to_csv(table), encoding="utf-8")
    paths["json"].write_text(to_json(table), encoding="utf-8")
    return paths


# ----------------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------------
def _pred_field(outputs, name: str) -> Tensor:
    value = outputs.get(name) if isinstance(outputs, Mapping) else getattr(outputs, name, None)
    if value is None:
        raise ValueError(f"outputs.{name}: missing")
    return value


@torch.no_grad()
def mesh_overlay_grid(
    batch,
    outputs,
    *,
    faces_right: Tensor,
    faces_left: Tensor,
    j_regressor_right: Tensor,
    j_regressor_left: Tensor | None = None,
    max_samples: int = 4,
    alpha: float = 0.7,
    place_at_gt_root: bool = True,
    padding: int = 2,
) -> Tensor:
    """A figure of ground-truth and predicted meshes over the input images (hands.render).

    batch: :class:`hands.sample.HandBatch` (images (B, 3, H, W) in [0, 1], camera.K (B, 3, 3), GT meshes in
    camera space, metres); outputs: a prediction with ``right_verts`` / ``left_verts`` (B, 778, 3) and
    ``rel_root`` (B, 3), metres (the contract of :mod:`eval.evaluator`); faces_*: (F, 3) long;
    j_regressor_*: (J, 778), row 0 = wrist (default left = right).
    place_at_gt_root: predictions are usually wrist-relative, so the predicted right mesh is moved to put
    its regressed wrist on the GT right wrist (``batch.right.root_cam``; for a left-only frame, the GT left
    wrist minus the predicted rel_root) and the predicted left mesh at that point plus the predicted
    rel_root, as InterWild visualises its two-hand output. False draws the predicted vertices as they are.
    Only the hands present in the ground truth (``valid``) are drawn.

    Returns (3, H', W') float in [0, 1]: one row per sample (the first ``max_samples``), columns input |
    ground truth | prediction; ready for ``SummaryWriter.add_image`` or :func:`save_png`.
    """
    from torchvision.utils import make_grid  # imported here: torchvision is slow to import, figures are rare

    n = min(int(max_samples), len(batch))
    if n < 1:
        raise ValueError("mesh_overlay_grid: got an empty batch")
    batch = batch.select(slice(0, n))
    images = batch.image
    dtype, device = images.dtype, images.device
    pred_right = _pred_field(outputs, "right_verts")[:n].to(device=device, dtype=dtype)
    pred_left = _pred_field(outputs, "left_verts")[:n].to(device=device, dtype=dtype)
    pred_rel = _pred_field(outputs, "rel_root")[:n].to(device=device, dtype=dtype)
    for name, value in (("right_verts", pred_right), ("left_verts", pred_left)):
        if value.ndim != 3 or value.shape[1:] != (metrics.NUM_VERTS, 3):
            raise ValueError(f"outputs.{name}: expected shape (B, 778, 3), got {tuple(value.shape)}")
    j_regressor_left = j_regressor_right if j_regressor_left is None else j_regressor_left
    right_valid, left_valid = batch.right.valid.bool(), batch.left.valid.bool()
    if place_at_gt_root:
        anchor = torch.where(
            right_valid[:, None], batch.right.root_cam.to(dtype), batch.left.root_cam.to(dtype) - pred_rel
        )  # (n, 3) where the predicted right wrist goes
        pred_right = metrics.align_at_wrist(pred_right, j_regressor_right) + anchor[:, None]
        pred_left = metrics.align_at_wrist(pred_left, j_regressor_left) + (anchor + pred_rel)[:, None]

    size = tuple(images.shape[-2:])
    K = batch.camera.K.to(dtype)
    tiles = [images]
    for right_verts, left_verts in (
        (batch.right.verts_cam.to(dtype), batch.left.verts_cam.to(dtype)),
        (pred_right, pred_left),
    ):
        render = render_hands(
            right_verts, left_verts, faces_right, faces_left, K, size, right_valid=right_valid, left_valid=left_valid
        )
        mask = (render.side > 0).unsqueeze(1).to(dtype) * alpha  # (n, 1, H, W)
        tiles.append(images * (1 - mask) + render.image * mask)
    stacked = torch.stack(tiles, 1).flatten(0, 1)  # (n * 3, 3, H, W): per sample input, GT, prediction
    return make_grid(stacked.clamp(0, 1), nrow=3, padding=padding, pad_value=1.0)


def save_png(image: Tensor, path: str | Path) -> Path:
    """image: (3, H, W) float in [0, 1] -> an 8-bit RGB PNG at ``path`` (parent folders created)."""
    from PIL import Image

    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image: expected shape (3, H, W), got {tuple(image.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (image.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    Image.fromarray(array).save(path)
    return path


# ----------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------
# keys of a metrics JSON (recon.train's metrics.json, recon.test's) that sit beside the datasets: the mixing
# statistics, the skip counts, the scored weights, --hand-stats' shapes
NON_DATASET_KEYS = ("mixing", "skips", "weights", "hand_stats")


def load_results(path: str | Path) -> dict[str, dict[str, float]]:
    """A run's results file: JSON ``{dataset: {metric: value, ...}, ...}`` (the evaluators' dicts per
    dataset, millimetres). Raises ValueError naming the file when it is not of that form."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read a results JSON ({error})") from error
    if not isinstance(payload, dict) or not all(isinstance(v, dict) for v in payload.values()):
        raise ValueError(f"{path}: expected {{dataset: {{metric: value}}}}, got {type(payload).__name__}")
    for key in NON_DATASET_KEYS:
        payload.pop(key, None)
    return {
        dataset: {k: (math.nan if v is None else float(v)) for k, v in values.items() if isinstance(v, (int, float)) or v is None}
        for dataset, values in payload.items()
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m eval.report --results NAME=FILE.json ... [--paper METHOD ...] [--out DIR]``: print a
    Table-2-style Markdown table of the runs (and the paper's rows), and write .md/.csv/.json with --out."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m eval.report", description=main.__doc__)
    parser.add_argument("--results", action="append", default=[], metavar="NAME=FILE",
                        help="a run's results JSON {dataset: {metric: value}}; repeat for more runs")
    parser.add_argument("--paper", nargs="*", metavar="METHOD",
                        help="add the paper's Table 2 rows of these methods (no name: all five)")
    parser.add_argument("--datasets", default=None, help="comma-separated column order, e.g. hic,reih,ih26m")
    parser.add_argument("--out", default=None, help="folder for table2.md, table2.csv, table2.json")
    args = parser.parse_args(argv)

    results: dict = {}
    for item in args.results:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            parser.error(f"--results {item!r}: expected NAME=FILE.json")
        try:
            results[name] = load_results(file)
        except ValueError as error:
            parser.error(str(error))
    if args.paper is not None:
        try:
            results.update(paper_results(args.paper or None))
        except ValueError as error:
            parser.error(str(error))
    if not results:
        parser.error("nothing to report: give --results NAME=FILE.json and/or --paper")
    if args.out:
        from hands.paths import output_folder

        try:
            output_folder(args.out, "--out")
        except ValueError as error:
            parser.error(str(error))
    datasets = args.datasets.split(",") if args.datasets else None
    table = make_table(results, datasets=datasets)
    print(to_markdown(table), end="")
    if args.out:
        for path in write_table(table, args.out).values():
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
