"""recon.meanpose: the mean-pose predictor is the training labels' mean, scored like any regressor."""
from __future__ import annotations

import math

import pytest
import torch

from hands.datasets.synthlab import write_synthlab
from hands.mano import HandModel
from recon.config import load_config
from recon.meanpose import fit_mean_pose, main, mean_pose_errors


@pytest.fixture(scope="module")
def model():
    return HandModel()


@pytest.fixture(scope="module")
def root(tmp_path_factory, model):
    sizes = {"train-lab": 6, "test-lab": 3, "train-wild": 0, "test-wild": 0}
    return write_synthlab(tmp_path_factory.mktemp("meanpose"), seed=5, sizes=sizes, resolution=48, hand_model=model,
                          show_progress=False)


def _cfg(root, *overrides):
    return load_config(profile="demo", arch="baseline", flags={"data.root": str(root)},
                       overrides=["data.image_size=[48,48]", "data.test=[synthlab:test-lab]", *overrides])


@pytest.mark.parametrize("kind", ["params", "mesh"])
def test_the_mean_of_one_sample_predicts_that_sample_exactly(root, model, kind):
    # trained and tested on the same single image: the mean is that image's hands, so MPVPE is ~0
    cfg = _cfg(root, "data.train=[synthlab:test-lab]", "data.max_train_samples=1", "data.max_test_samples=1")
    results = mean_pose_errors(cfg, kind=kind, hand_model=model)["synthlab-test-lab"]
    assert results["count_MPVPE"] >= 1
    assert results["MPVPE"] < 0.01  # mm


def test_predictions_are_wrist_relative_constants_and_the_mesh_mean_is_the_label_mean(root, model):
    from hands.datasets.synthlab import SynthLab

    reader = SynthLab(root, "train-lab", hand_model=model)
    predictor = fit_mean_pose([reader], model, kind="mesh", progress=False)
    labels = [reader.load_labels(i) for i in range(len(reader))]
    right = [s.right for s in labels if bool(s.right.valid) and bool(s.right.mano_valid)]
    expected = torch.stack([h.verts_cam - model.regress_joints("right", h.verts_cam[None])[0, 0] for h in right]).mean(0)
    wrist = model.regress_joints("right", expected[None])[0, 0]
    assert torch.allclose(predictor.right_verts, expected - wrist, atol=1e-5)
    assert torch.allclose(predictor.right_joints[0], torch.zeros(3), atol=1e-6)
    batch = type("B", (), {"image": torch.zeros(4, 3, 8, 8)})()
    out = predictor(batch)
    out.validate(4)
    assert torch.equal(out.right_verts[0], out.right_verts[3])


def test_mean_pose_errors_scores_every_test_split_and_the_cli_prints_them(root, model, capsys):
    cfg = _cfg(root, "data.test=[synthlab:test-lab,synthlab:train-lab]")
    results = mean_pose_errors(cfg, hand_model=model)
    assert set(results) == {"synthlab-test-lab", "synthlab-train-lab"}
    for values in results.values():
        assert math.isfinite(values["MPVPE"]) and values["MPVPE"] > 1.0 and values["count_MPVPE"] > 0
    assert main(["--arch", "baseline", "--data-root", str(root), "data.image_size=[48,48]",
                 "data.test=[synthlab:test-lab]"]) == 0
    assert "synthlab-test-lab: MPVPE" in capsys.readouterr().out
    with pytest.raises(ValueError, match="kind"):
        fit_mean_pose([], model, kind="median")
