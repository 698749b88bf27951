"""eval.report: the paper's Table 2 transcription, Table-2-style Markdown/CSV/JSON, and the mesh figure."""
from __future__ import annotations

import csv
import io
import json
import math

import pytest
import torch

from eval import report
from eval.evaluator import Prediction

# The red subscripts of the paper's Table 2 as printed (transcribed separately from the values), in the
# column order HIC MPVPE RRVE MRRPE | ReIH ... | IH2.6M ...
PRINTED_DELTAS = {
    "IHM": (-1.84, -1.41, -25.01, -1.79, -2.43, -11.38, -1.85, -1.43, -1.18),
    "InterShape": (-2.62, -1.36, -30.08, -1.43, -2.02, -18.63, -1.07, -1.13, -1.52),
    "IntagHand": (-1.20, -1.65, -5.35, -2.51, -1.28, -8.24, -0.92, -1.51, -0.13),
    "DIR": (-1.23, -0.24, -2.57, -1.91, -2.99, -1.96, -0.17, -0.12, -0.96),
    "InterWild": (-0.56, -0.25, -2.00, -0.04, -0.13, -0.33, -0.90, -0.68, -1.13),
}


def test_paper_table2_values_reproduce_the_printed_differences():
    table = report.make_table(report.paper_results(), datasets=("hic", "reih", "ih26m"))
    assert len(table.rows) == 10 and len(table.columns) == 9
    for method, deltas in PRINTED_DELTAS.items():
        run = f"{method}+AttentionHand (paper)"
        assert table.baselines[run] == f"{method} (paper)"
        got = [round(table.delta(run, c), 2) for c in table.columns]
        assert got == pytest.approx(list(deltas), abs=1e-9), method
    # spot checks of the transcription against the text
    assert table.value("InterWild (paper)", ("hic", "MPVPE")) == 15.30
    assert table.value("IHM (paper)", ("hic", "MRRPE")) == 119.64
    assert table.value("InterWild+AttentionHand (paper)", ("ih26m", "MRRPE")) == 25.74
    with pytest.raises(ValueError, match="known"):
        report.paper_results(["FooNet"])


def ours():
    return {
        "InterWild": {"hic": {"MPVPE": 16.0, "RRVE": 22.0, "MRRPE": 33.0, "count_MPVPE": 10}, "reih": {"MPVPE": 14.5}},
        "InterWild+AttentionHand": {"hic": {"MPVPE": 15.58, "RRVE": 22.5, "MRRPE": 30.0}, "reih": {"MPVPE": 14.0}},
    }


def test_markdown_shows_values_and_differences_like_the_paper():
    results = {**ours(), **report.paper_results(["InterWild"])}
    table = report.make_table(results)
    assert [c[0] for c in table.columns[::3]] == ["hic", "reih", "ih26m"]
    text = report.to_markdown(table, title="Table 2")
    lines = text.splitlines()
    assert lines[2].startswith("| Method | HIC MPVPE ↓ | HIC RRVE ↓ | HIC MRRPE ↓ | ReIH MPVPE ↓")
    row = next(line for line in lines if line.startswith("| InterWild+AttentionHand |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == ["15.58 (-0.42)", "22.50 (+0.50)", "30.00 (-3.00)"]
    assert cells[5] == "-"  # ReIH RRVE not evaluated
    assert cells[7] == "-"  # no IH2.6M for our runs
    paper_row = next(line for line in lines if line.startswith("| InterWild+AttentionHand (paper) |"))
    assert "14.74 (-0.56)" in paper_row and "25.74 (-1.13)" in paper_row
    base_row = next(line for line in lines if line.startswith("| InterWild |"))
    assert "(" not in base_row  # no baseline, no difference


def test_csv_and_json_round_trip(tmp_path):
    table = report.make_table(ours(), baselines={"InterWild+AttentionHand": "InterWild"})
    rows = list(csv.DictReader(io.StringIO(report.to_csv(table))))
    assert rows[1]["run"] == "InterWild+AttentionHand" and rows[1]["baseline"] == "InterWild"
    assert float(rows[1]["HIC MPVPE"]) == 15.58 and float(rows[1]["HIC MPVPE delta"]) == pytest.approx(-0.42)
    assert rows[0]["HIC MPVPE delta"] == "" and rows[0]["ReIH RRVE"] == ""

    payload = json.loads(report.to_json(table))
    assert payload["unit"] == "mm"
    assert payload["rows"][1]["deltas"]["hic/MRRPE"] == pytest.approx(-3.0)
    assert payload["rows"][0]["values"]["reih/RRVE"] is None

    paths = report.write_table(table, tmp_path / "out", stem="t2")
    assert sorted(p.name for p in paths.values()) == ["t2.csv", "t2.json", "t2.md"]
    assert "15.58 (-0.42)" in paths["md"].read_text()
    with pytest.raises(ValueError, match="baseline 'Nope'"):
        report.make_table(ours(), baselines={"InterWild": "Nope"})


# ---- figure ------------------------------------------------------------------------------------------
def plane_hand(batch: int, z: float):
    """A flat 27x28 grid mesh (756 used vertices + 22 spare at its centre = 778), 8 cm wide, at depth z."""
    ys, xs = torch.meshgrid(torch.linspace(-0.04, 0.04, 28), torch.linspace(-0.04, 0.04, 27), indexing="ij")
    grid = torch.stack([xs, ys, torch.zeros_like(xs)], -1).reshape(-1, 3)  # (756, 3)
    verts = torch.cat([grid, torch.zeros(22, 3)], 0) + torch.tensor([0.0, 0.0, z])
    faces = []
    for r in range(27):
        for c in range(26):
            i = r * 27 + c
            faces += [(i, i + 1, i + 27), (i + 1, i + 28, i + 27)]
    return verts.expand(batch, -1, -1).clone(), torch.tensor(faces)


def test_mesh_overlay_grid_draws_gt_and_prediction(tmp_path):
    from tests.test_eval_evaluator import make_batch
    from tests.test_eval_metrics import one_hot_wrist_regressor

    reg = one_hot_wrist_regressor().float()
    batch = make_batch(["interacting", "right"], size=32)
    batch.image = torch.full_like(batch.image, 0.5)
    verts, faces = plane_hand(2, 0.4)
    batch.right.verts_cam = verts - torch.tensor([0.045, 0.0, 0.0])
    batch.left.verts_cam = verts + torch.tensor([0.045, 0.0, 0.0])
    batch.right.root_cam = batch.right.verts_cam[:, 0].clone()  # the regressed wrist (vertex 0)
    batch.left.root_cam = batch.left.verts_cam[:, 0].clone()
    batch.camera.K = torch.tensor([[100.0, 0, 15.5], [0, 100.0, 15.5], [0, 0, 1]]).repeat(2, 1, 1)
    rel = batch.left.root_cam - batch.right.root_cam
    # a wrist-relative prediction equal to the ground truth
    pred = Prediction(
        right_verts=batch.right.verts_cam - batch.right.root_cam[:, None],
        left_verts=batch.left.verts_cam - batch.left.root_cam[:, None],
        right_joints=torch.zeros(2, 21, 3), left_joints=torch.zeros(2, 21, 3), rel_root=rel,
    )
    grid = report.mesh_overlay_grid(batch, pred, faces_right=faces, faces_left=faces, j_regressor_right=reg, padding=2)
    assert grid.shape == (3, 2 * 34 + 2, 3 * 34 + 2)
    assert grid.min() >= 0 and grid.max() <= 1
    tile = lambda row, col: grid[:, 2 + row * 34 : 2 + row * 34 + 32, 2 + col * 34 : 2 + col * 34 + 32]  # noqa: E731
    image, gt, prediction = tile(0, 0), tile(0, 1), tile(0, 2)
    assert torch.allclose(image, torch.full_like(image, 0.5))
    changed = (gt - image).abs().amax(0) > 0.05
    assert 0.2 < changed.float().mean() < 0.9  # the meshes cover part of the image
    assert torch.allclose(prediction, gt, atol=1e-4)  # placed at the GT wrist: same picture
    # the single-right frame draws only the right hand: the left half stays the input image
    gt_single = tile(1, 1)
    assert ((gt_single - 0.5).abs().amax(0) > 0.05)[:, :14].any()
    assert not ((gt_single - 0.5).abs().amax(0) > 0.05)[:, 20:].any()

    path = report.save_png(grid, tmp_path / "fig" / "meshes.png")
    from PIL import Image

    with Image.open(path) as png:
        assert png.size == (grid.shape[2], grid.shape[1]) and png.mode == "RGB"


def test_command_line_reads_results_files_and_adds_paper_rows(tmp_path, capsys):
    for name, mpvpe in (("base", 16.0), ("aug", 15.5)):
        # an evaluator's dict per dataset; NaN (nothing counted) as JSON allows it
        (tmp_path / f"{name}.json").write_text(json.dumps({"hic": {"MPVPE": mpvpe, "RRVE": math.nan, "count_MPVPE": 3}}))
    code = report.main([
        "--results", f"InterWild={tmp_path / 'base.json'}",
        "--results", f"InterWild+AttentionHand={tmp_path / 'aug.json'}",
        "--paper", "InterWild", "--datasets", "hic", "--out", str(tmp_path / "out"),
    ])
    assert code == 0
    out = capsys.readouterr().out
    assert "| InterWild+AttentionHand | 15.50 (-0.50) | - |" in out
    assert "| InterWild+AttentionHand (paper) | 14.74 (-0.56) | 21.10 (-0.25) | 29.26 (-2.00) |" in out
    assert (tmp_path / "out" / "table2.csv").is_file()
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(SystemExit):
        report.main(["--results", f"x={tmp_path / 'bad.json'}"])
    assert "bad.json: expected {dataset: {metric: value}}" in capsys.readouterr().err
