"""generator.table1: Table 1's protocol (MSCOCO train meshes, MSCOCO val prompts) on the COCO fixture with the
tiny random generator and a fixed random feature map; the synthlab miniature end to end (train, sample, measure,
write the table and the figure) on the tiny random generator."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from generator.table1 import Table1Settings, main, run_table1, val_prompts
from hands.datasets.captions import default_captions_path

from tests.generator_helpers import TINY_YAML_2_STEPS as TINY_YAML, tiny_generator_env


def features(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 12): a fixed map (2x2 colour means), enough to tell image sets apart."""
    return F.adaptive_avg_pool2d(images, 2).flatten(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from generator.model import load_config
    from generator.pipeline import AttentionHandPipeline
    from hands.datasets.fixtures import write_coco_fixture
    from hands.mano import HandModel

    base = tmp_path_factory.mktemp("table1")
    model = HandModel()
    write_coco_fixture(base / "coco", model)
    config = base / "tiny.yaml"
    config.write_text(TINY_YAML)
    pipe = AttentionHandPipeline.from_config(load_config(config))
    return base / "coco", model, pipe, config


def test_needs_the_val_captions(setup, tmp_path, capsys):
    root, _, _, config = setup
    with pytest.raises(ValueError, match="attentionhand_captions_val.jsonl"):
        val_prompts(root)
    code = main(["--dataset", "coco", "--root", str(root), "--out", str(tmp_path / "out"),
                 "--inception-weights", str(tmp_path / "none.pth"),
                 "--generator-config", str(config)])
    assert code == 1 and "generator.caption" in capsys.readouterr().err


def test_train_meshes_val_prompts_and_metrics(setup):
    root, model, pipe, _ = setup
    captions = default_captions_path(root, "val")
    captions.write_text(json.dumps({"image_id": 91, "file_name": "000000000091.jpg", "raw": "r",
                                    "caption": "A person claps both hands."}) + "\n")
    try:
        settings = Table1Settings(root=root, n=3, batch_size=2, seed=1)
        calls = []

        def recording_pipe(mesh, local, prompts, **kwargs):
            calls.append((mesh.shape, local, list(prompts)))
            return pipe(mesh, local, prompts, **kwargs)

        recording_pipe.default_size = pipe.default_size
        first = run_table1(settings, recording_pipe, feature_extractor=features, hand_model=model, progress=False)
        again = run_table1(settings, pipe, feature_extractor=features, hand_model=model, progress=False)
    finally:
        captions.unlink()
    # one person with a fit: aids 11 and 31 -> only 2 labelled samples although 3 were asked
    assert first["n"] == 2 and first["metrics"]["num_generated"] == 2 and first["metrics"]["num_real"] == 2
    assert [c[2] for c in calls] == [["A person claps both hands."] * 2]  # MSCOCO val's captions
    size = pipe.default_size
    assert calls[0][0] == (2, 3, size, size) and calls[0][1] is None  # the global branch only
    assert math.isfinite(first["metrics"]["FID"]) and first["metrics"]["FID"] > 0
    assert first["metrics"] == again["metrics"]  # seeded: the same samples, prompts and noise
    assert tuple(first["samples_grid"].shape) == (6, 3, size, size)


def test_synthlab_miniature_end_to_end(tmp_path, monkeypatch, capsys):
    """python -m generator.table1 as a new user runs it, on a 4+2-image synthlab and the tiny random generator:
    the trained rows train (1 step), every row samples the same labels, the files are written, a rerun skips
    the finished training and gives the same table."""
    from PIL import Image

    monkeypatch.setenv("ATTENTIONHAND_CACHE", str(tmp_path / "cache"))
    _, root, config = tiny_generator_env(tmp_path, yaml=TINY_YAML, seed=3, test_wild=2)
    args = ["--root", str(root), "--generator-config", str(config), "--runs", str(tmp_path / "runs"),
            "--steps", "1", "--train-batch-size", "2", "--n", "2", "--batch-size", "2",
            "--generators", "sd,controlnet,t2i-adapter,attentionhand", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    first = capsys.readouterr().out
    table = json.loads((tmp_path / "out" / "mini-table1.json").read_text())
    assert list(table["metrics"]) == ["sd", "controlnet", "t2i-adapter", "attentionhand"]
    for row in table["metrics"].values():
        assert row["num_generated"] == 2 and math.isfinite(row["KID"]) and 0 <= row["SilhouetteIoU"] <= 1
    assert table["settings"]["n"] == 2 and table["paper_rows"]["attentionhand"]["FID"] == 20.71
    assert table["provenance"]["command"].startswith("python -m generator.table1 ") and table["provenance"]["created"]
    assert set(table["provenance"]) >= {"git_commit", "git_dirty", "version"}
    md = (tmp_path / "out" / "mini-table1.md").read_text()
    assert "| attentionhand | Table 1: AttentionHand (w/ TAS) |" in md and "paper" in md
    width, height = Image.open(tmp_path / "out" / "mini-table1.png").size
    assert height == 6 * (64 + 2)  # rows: mesh, real, 4 generators (32 px shown at 2x)
    assert "training" in first and (tmp_path / "runs" / "t2i-adapter" / "t2i-adapter" / "config.json").is_file()
    assert main([*args, "--out", str(tmp_path / "again")]) == 0
    rerun = capsys.readouterr().out
    assert "skipped" in rerun and "training from" not in rerun
    again = json.loads((tmp_path / "again" / "mini-table1.json").read_text())
    assert again["metrics"] == table["metrics"]  # seeded: same labels, prompts, noise and weights
    assert main([*args, "--out", str(tmp_path / "bad"), "--generators", "uni-controlnet"]) == 1
    assert "unknown uni-controlnet" in capsys.readouterr().err

    # --mediapipe (mocked MediaPipe results): Hand1000's Hand Conf and landmark-box FID-H columns appear
    from tests.test_eval_genmetrics import _fake_mediapipe

    calls = _fake_mediapipe(monkeypatch, [[("Left", 0.75, (0.2, 0.2, 0.6, 0.7))]])
    assert main([*args, "--out", str(tmp_path / "mp"), "--mediapipe", "--generators", "sd"]) == 0
    row = json.loads((tmp_path / "mp" / "mini-table1.json").read_text())["metrics"]["sd"]
    assert row["HandConf"] == pytest.approx(0.75) and row["num_generated_lm_crops"] == 2
    assert sorted(c["min_detection_confidence"] for c in calls["init"]) == [0.0, 0.5]  # Hand1000's two settings
    assert math.isfinite(row["MSE-2D"]) and row["MSE-2D"] > 0  # the fixture's landmarks vs the labels' joints
    settings = json.loads((tmp_path / "mp" / "mini-table1.json").read_text())["settings"]
    assert settings["mse2d"].startswith("squared px of the 32 px generated image") and settings["mse3d"] is None

    # --mse3d-ckpt: a recon checkpoint on the generated images fills MSE-3D (squared mm) and is recorded
    ckpt = _tiny_regressor_checkpoint(tmp_path / "regressor")
    assert main([*args, "--out", str(tmp_path / "m3"), "--generators", "sd,controlnet", "--mse3d-ckpt",
                 str(tmp_path / "regressor")]) == 0
    table3 = json.loads((tmp_path / "m3" / "mini-table1.json").read_text())
    assert all(math.isfinite(r["MSE-3D"]) and r["MSE-3D"] > 0 for r in table3["metrics"].values())
    assert table3["metrics"]["sd"]["FID"] == table["metrics"]["sd"]["FID"]  # the same samples as without it
    assert table3["settings"]["mse3d"]["checkpoint"] == str(ckpt) and table3["settings"]["mse3d"]["arch"] == "baseline"
    md3 = (tmp_path / "m3" / "mini-table1.md").read_text().splitlines()
    line = next(x for x in md3 if x.startswith("| sd |"))
    assert line.split(" | ")[-2] != "-"  # MSE-3D, left of SilhouetteIoU
    # the real test images through the same regressor and segmenter: the alignment columns' reference row
    real = table3["real_alignment"]
    assert math.isfinite(real["MSE-3D"]) and 0 <= real["SilhouetteIoU"] <= 1 and math.isnan(real["MSE-2D"])
    assert any(x.startswith("| (real test images) |") and x.split(" | ")[-2] == f"{real['MSE-3D']:.4g}" for x in md3)
    assert main([*args, "--out", str(tmp_path / "cm"), "--generators", "sd", "--mse3d-ckpt", str(ckpt), "--mse3d-unit",
                 "cm", "--no-silhouette"]) == 0
    in_cm = json.loads((tmp_path / "cm" / "mini-table1.json").read_text())
    assert in_cm["metrics"]["sd"]["MSE-3D"] == pytest.approx(table3["metrics"]["sd"]["MSE-3D"] / 100)  # cm^2 = mm^2 / 100
    assert in_cm["settings"]["mse3d"]["unit"].startswith("squared cm")
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "bad3"), "--mse3d-ckpt", str(tmp_path / "nothing")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("generator.table1: error: ") and "nothing" in error and error.count("\n") == 1


def _tiny_regressor_checkpoint(folder):
    """A real (untrained) baseline checkpoint: narrow ResNet-18, 48 px input, the "hands" crop."""
    from recon import checkpoint as ckpt
    from recon.config import load_config, to_dict
    from recon.registry import build_regressor, load_builtin_regressors
    from tests.recon_helpers import TINY

    load_builtin_regressors()
    kwargs = dict(backbone="resnet18", backbone_kwargs={"channels": [8, 16, 32, 64], "stem_width": 8}, hidden_dim=32)
    torch.manual_seed(0)
    model = build_regressor("baseline", **kwargs)
    cfg = to_dict(load_config(overrides=[*TINY, "data.image_size=[48,48]"]))
    progress = {"step": 3, "epoch": 0, "step_in_epoch": 3, "sampler_seed": 0, "world_size": 1}
    return ckpt.save_checkpoint(folder, model=model, arch="baseline", model_kwargs=kwargs, config=cfg,
                                optimizer=None, progress=progress)


def test_mse3d_runs_a_recon_checkpoint_on_the_generated_images(tmp_path):
    """CheckpointJoints feeds each generated image through the checkpoint's own test-time crop (the labelled
    hands' box x1.3, resized to its 48 px input); MSE-3D is 0 when the prediction is the labels' joints, 0 for
    a constant shift (wrist-aligned), and 10^2 mm^2 on the non-wrist joints for a 10 mm offset of those joints."""
    from eval.genmetrics import GenerationEvaluator
    from recon.output import TwoHandOutput
    from recon.test import CheckpointJoints
    from tests.test_eval_evaluator import make_batch

    joints = CheckpointJoints(_tiny_regressor_checkpoint(tmp_path / "ckpt"))
    assert joints.describe()["arch"] == "baseline" and joints.describe()["step"] == 3
    assert joints.describe()["input"] == {"crop": "hands", "image_size": [48, 48]}
    batch = make_batch(["interacting", "right"], size=32)
    output = joints(batch)  # the real network
    assert isinstance(output, TwoHandOutput) and output.right_joints.shape == (2, 21, 3)

    seen = []

    def predict(offset, wrist_too):
        def forward(inputs):
            seen.append(tuple(inputs.image.shape))
            shift = torch.tensor(offset)
            right, left = inputs.right.joints_cam.clone(), inputs.left.joints_cam.clone()
            (right if wrist_too else right[:, 1:]).add_(shift)
            (left if wrist_too else left[:, 1:]).add_(shift)
            return {"right_joints": right, "left_joints": left}
        return forward

    valid = torch.stack([batch.right.joints_valid, batch.left.joints_valid], 1)
    valid = valid & valid[..., :1] & torch.tensor([[True, True], [True, False]])[..., None]
    share = valid[..., 1:].sum().item() / valid.sum().item()
    for offset, wrist_too, expected in (((0.0, 0.0, 0.0), False, 0.0), ((0.05, -0.02, 0.1), True, 0.0),
                                        ((0.0, 0.006, 0.008), False, 100.0 * share)):
        joints.model = predict(offset, wrist_too)
        evaluator = GenerationEvaluator(feature_extractor=features, joint_regressor=joints)
        evaluator.add_generated(batch.image, batch)
        assert evaluator.compute()["MSE-3D"] == pytest.approx(expected, rel=1e-5, abs=1e-6)  # float32 joints
    assert seen == [(2, 3, 48, 48)] * 3  # the checkpoint's input size, not the generated image's 32 px


def test_paper_setup_sd_folder_and_coco_captions(setup, tmp_path, capsys):
    """The paper's setup as a user with the assets runs it: --dataset coco (MSCOCO train meshes with a fit, MSCOCO
    val captions), the sd15 generator config on --sd-path (here a tiny random model saved in Stable Diffusion's
    diffusers layout, three UNet levels so that sd15's TAS maps at latent / 4 exist): the trained rows train
    from that base, every row samples, table1.{json,md,png} are written and the paper's rows print beside ours."""
    from generator.model import GeneratorConfig, TinyArchitecture, build_components, save_components

    root = setup[0]
    cfg = GeneratorConfig(tiny=TinyArchitecture(unet_channels=(4, 8, 8), attention_heads=2, cross_attention_dim=8,
                                                latent_size=8, vae_channels=(4, 8, 8, 8), text_layers=1, text_heads=2,
                                                text_intermediate_size=8), guidance_embedding_channels=(4, 4, 4, 4))
    sd = save_components(build_components(cfg), tmp_path / "sd15")
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"} <= {p.name for p in sd.iterdir()}
    captions = default_captions_path(root, "val")
    captions.write_text(json.dumps({"image_id": 91, "file_name": "000000000091.jpg", "raw": "r",
                                    "caption": "A person claps both hands."}) + "\n")
    try:
        code = main(["--dataset", "coco", "--root", str(root), "--sd-path", str(sd), "--steps", "1",
                     "--train-batch-size", "1", "--lr", "1e-5", "--n", "2", "--batch-size", "2", "--generators",
                     "sd,attentionhand", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
                     "--no-progress", "--no-silhouette"])
    finally:
        captions.unlink()
    assert code == 0
    printed = capsys.readouterr().out
    table = json.loads((tmp_path / "out" / "table1.json").read_text())
    assert table["settings"]["generator_config"] == "sd15" and table["settings"]["sd_path"] == str(sd)
    assert table["settings"]["dataset"] == "coco" and table["settings"]["n"] == 2
    assert list(table["metrics"]) == ["sd", "attentionhand"]
    assert all(math.isfinite(r["FID"]) and r["num_generated"] == 2 for r in table["metrics"].values())
    trained = json.loads((tmp_path / "runs" / "attentionhand" / "train_config.json").read_text())["train"]
    assert (trained["generator_config"], trained["sd_path"], trained["dataset"]) == ("sd15", str(sd), "coco")
    assert (trained["steps"], trained["batch_size"], trained["lr"], trained["tas_updates"]) == (1, 1, 1e-5, 2)
    assert "| sd | 40.52 | 0.00684 | 50.78 |" in printed and "| attentionhand | 20.71 |" in printed  # the paper's rows
    assert "| attentionhand | Table 1: AttentionHand (w/ TAS) |" in printed and (tmp_path / "out" / "table1.png").is_file()
