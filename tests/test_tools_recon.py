"""recon.demo, recon.export and checkpoint cards on a tiny baseline checkpoint trained for 2 steps."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from recon import demo as recon_demo
from recon import test as recon_test
from recon import train as recon_train
from tests.recon_helpers import run_args, write_tiny_synthlab


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(synthlab root, run folder) of a 2-step tiny baseline run (no evaluation at the end)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = write_tiny_synthlab(tmp_path_factory.mktemp("synthlab"))
    out = tmp_path_factory.mktemp("run")
    code = recon_train.main(run_args(root, out, "--max-steps", "2", "eval.at_end=false"))
    torch.set_num_threads(threads)
    assert code == 0
    return root, out


def _test_images(root: Path, n: int) -> list[Path]:
    return sorted((root / "images" / "test-lab").rglob("*.jpg"))[:n]


def _gt_boxes(root: Path) -> dict:
    """{image file: {"right": box | None, "left": box | None}} from the synthlab reader (pixels)."""
    from hands.datasets import build_dataset

    dataset = build_dataset("synthlab", root, "test-lab")
    boxes = {}
    for i in range(len(dataset)):
        sample = dataset[i]
        boxes[sample.meta["image_path"]] = {
            side: sample.hand(side).bbox.tolist() if bool(sample.hand(side).valid) else None for side in ("right", "left")
        }
    return boxes


# -- demo ------------------------------------------------------------------------------------------------------
def test_demo_on_images_writes_overlays_json_and_meshes_for_two_one_and_zero_hands(run, tmp_path):
    import trimesh

    from hands.mano import HandModel

    root, ckpt = run
    gt = _gt_boxes(root)
    two = next(path for path, b in gt.items() if b["right"] and b["left"])
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a_two.jpg", "b_left.jpg", "c_none.jpg"):
        shutil.copy(two, images / name)
    boxes = {
        "a_two.jpg": gt[two],
        "b_left.jpg": {"right": None, "left": gt[two]["left"]},
        "c_none.jpg": {"right": None, "left": None},
    }
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    out = tmp_path / "demo"
    code = recon_demo.main(["--ckpt", str(ckpt), "--input", str(images), "--out", str(out), "--boxes", str(tmp_path / "boxes.json")])
    assert code == 0

    source = np.asarray(Image.open(images / "c_none.jpg").convert("RGB")).astype(int)
    for stem in ("a_two", "b_left", "c_none"):
        overlay = np.asarray(Image.open(out / "overlays" / f"{stem}.png")).astype(int)
        assert overlay.shape == source.shape
    # zero hands: the frame as it is, "hands": [], no meshes
    none = json.loads((out / "json" / "c_none.json").read_text())
    assert none["hands"] == []
    assert np.abs(np.asarray(Image.open(out / "overlays" / "c_none.png")).astype(int) - source).max() <= 1
    assert not list((out / "meshes").glob("c_none_*"))
    # one hand
    left_only = json.loads((out / "json" / "b_left.json").read_text())
    assert [h["side"] for h in left_only["hands"]] == ["left"] and left_only["rel_root"] is None
    assert sorted(p.name for p in (out / "meshes").glob("b_left_*")) == ["b_left_left.obj"]
    # two hands: MANO parameters, wrist-relative joints (no absolute root from the baseline), rel_root, OBJ
    both = json.loads((out / "json" / "a_two.json").read_text())
    assert [h["side"] for h in both["hands"]] == ["right", "left"]
    assert both["absolute"] is False and "wrist" in both["joints_frame"] and len(both["rel_root"]) == 3
    assert np.abs(np.asarray(Image.open(out / "overlays" / "a_two.png")).astype(int) - source).max() > 30  # meshes drawn
    hand_model = HandModel()
    for hand in both["hands"]:
        pose = torch.tensor(hand["mano_pose"])[None]
        shape = torch.tensor(hand["mano_shape"])[None]
        assert pose.shape == (1, 48) and shape.shape == (1, 10)
        mano = hand_model(hand["side"], pose, shape)
        joints = torch.tensor(hand["joints_cam"])
        assert joints.shape == (21, 3)
        torch.testing.assert_close(joints, (mano.joints - mano.joints[:, :1])[0], atol=1e-5, rtol=0)  # params <-> joints
        mesh = trimesh.load(out / hand["mesh"], process=False)
        assert mesh.vertices.shape == (778, 3) and mesh.faces.shape == (1538, 3)
        torch.testing.assert_close(
            torch.tensor(mesh.vertices, dtype=torch.float32), (mano.verts - mano.joints[:, :1])[0], atol=1e-5, rtol=0
        )
    summary = json.loads((out / "demo.json").read_text())
    assert [f["hands"] for f in summary["frames"]] == [["right", "left"], ["left"], []]
    assert summary["boxes"].startswith("box file")


def test_demo_on_a_video_writes_an_mp4_and_uses_the_given_camera(run, tmp_path):
    imageio = pytest.importorskip("imageio.v2")
    pytest.importorskip("imageio_ffmpeg")
    import imageio.v3 as iio

    root, ckpt = run
    video = tmp_path / "clip.mp4"
    writer = imageio.get_writer(video, fps=5, codec="libx264", macro_block_size=1)
    for path in _test_images(root, 4):
        writer.append_data(np.asarray(Image.open(path).convert("RGB")))
    writer.close()
    out = tmp_path / "demo"
    code = recon_demo.main(
        ["--ckpt", str(ckpt), "--input", str(video), "--out", str(out), "--focal", "80", "90", "--princpt", "30", "33"]
    )
    assert code == 0
    frames = sorted(p.name for p in (out / "json").glob("*.json"))
    assert frames == [f"frame_{i:06d}.json" for i in range(4)]
    record = json.loads((out / "json" / "frame_000002.json").read_text())
    assert record["K"] == [[80.0, 0.0, 30.0], [0.0, 90.0, 33.0], [0.0, 0.0, 1.0]]
    assert len(record["hands"]) == 2  # no presence prediction and no box file: both hands reported
    decoded = list(iio.imiter(out / "overlay.mp4", plugin="FFMPEG"))
    assert len(decoded) == 4 and decoded[0].shape[:2] == (64, 64)


def test_demo_refuses_bad_input_in_one_line(run, tmp_path, capsys):
    root, ckpt = run
    image = _test_images(root, 1)[0]
    (tmp_path / "boxes.json").write_text(json.dumps({"other.jpg": [0, 0, 10, 10]}))
    code = recon_demo.main(["--ckpt", str(ckpt), "--input", str(image), "--out", str(tmp_path / "o"), "--boxes", str(tmp_path / "boxes.json")])
    assert code == 2 and f"no entry for frame '{image.name}'" in capsys.readouterr().err
    (tmp_path / "boxes.json").write_text(json.dumps({image.name: [10, 10, 5, 20]}))
    code = recon_demo.main(["--ckpt", str(ckpt), "--input", str(image), "--out", str(tmp_path / "o"), "--boxes", str(tmp_path / "boxes.json")])
    assert code == 2 and "empty box" in capsys.readouterr().err
    code = recon_demo.main(["--ckpt", str(ckpt), "--input", str(tmp_path / "missing.png"), "--out", str(tmp_path / "o")])
    assert code == 2 and "missing.png: no such file" in capsys.readouterr().err


# -- export ----------------------------------------------------------------------------------------------------
def test_onnx_export_matches_pytorch_in_onnxruntime(run, tmp_path):
    pytest.importorskip("onnx", reason="ONNX export needs the 'export' extra (onnx)")
    onnxruntime = pytest.importorskip("onnxruntime", reason="the comparison needs the 'export' extra (onnxruntime)")
    from recon import export as recon_export

    _, ckpt = run
    model, info = recon_test.load_regressor(ckpt)
    with torch.no_grad():  # a head whose output depends on the image, so the comparison is not of constants
        model.head[-1].weight.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "baseline.onnx"
    names = recon_export.export_onnx(model, info, path, batch=2)
    assert names[:5] == ["right_verts", "left_verts", "right_joints", "left_joints", "rel_root"]
    assert "right_mano_pose" in names and "left_mano_shape" in names
    diffs = recon_export.compare_with_onnxruntime(model, info, path, batch=2)
    assert set(diffs) == set(names)
    assert max(diffs.values()) < 1e-4, diffs
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = {o.name: o.shape for o in session.get_outputs()}
    assert outputs["right_verts"] == [2, 778, 3] and outputs["rel_root"] == [2, 3]
    image_a, _ = recon_export.example_inputs(info, 2, seed=3)
    verts_a = session.run(["right_verts"], {"image": image_a.numpy()})[0]
    verts_b = session.run(["right_verts"], {"image": (1 - image_a).numpy()})[0]
    assert np.abs(verts_a - verts_b).max() > 1e-4  # the graph reads its input


# -- cards -----------------------------------------------------------------------------------------------------
def test_checkpoint_card_records_provenance(run):
    from hands.mano import HandModel

    root, out = run
    meta = json.loads(sorted((out / "checkpoints").glob("step_*.json"))[-1].read_text())
    card = meta["card"]
    assert set(card) == {"datasets", "mix", "generator", "hand_model", "code", "licences"}
    assert card["datasets"]["train"] == ["synthlab:train-lab"]
    assert card["datasets"]["test"] == ["synthlab:test-lab", "synthlab:test-wild"]
    assert card["datasets"]["root"] == str(root) and "synthlab" in card["datasets"]["variants"]
    assert card["mix"]["synthetic_ratio"] == 0.0 and card["generator"] is None
    assert card["hand_model"] == {"kind": "procedural", "fingerprint": HandModel().fingerprint(), "mano_dir": None}
    assert card["code"]["package"] == "attentionhand-aug" and "git_commit" in card["code"]
    parts = [entry["part"] for entry in card["licences"]]
    assert any("procedural hand model" in p for p in parts) and any(p.startswith("synthlab") for p in parts)
    assert all(entry["url"].startswith("https://") for entry in card["licences"])


def test_card_with_generated_images_records_the_generator_and_its_weights(tmp_path):
    from hands.mano import HandModel
    from recon.cards import build_card
    from recon.config import load_config

    sd = tmp_path / "sd"
    (sd / "unet").mkdir(parents=True)
    weights = sd / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"not really weights, hashed all the same")
    cfg = load_config(overrides=["train.synthetic_ratio=0.25", "mixing.mode=sync", f"mixing.sd_path={sd}", "data.train=[ih26m]", "data.test=[hic]"])
    card = build_card(cfg, HandModel())["card"]
    assert card["mix"] == {"synthetic_ratio": 0.25, "mode": "sync", "labels": "train", "size": 64,
                           "synthetic_batch": "share", "real_per_batch": 12, "generated_per_batch": 4}
    added = load_config(overrides=["train.synthetic_ratio=0.25", "train.synthetic_batch=add", "mixing.mode=sync",
                                   f"mixing.sd_path={sd}", "data.train=[ih26m]", "data.test=[hic]"])
    mix = build_card(added, HandModel())["card"]["mix"]  # batch 16 real + round(0.25 * 16 / 0.75) = 5 on top
    assert (mix["synthetic_batch"], mix["real_per_batch"], mix["generated_per_batch"]) == ("add", 16, 5)
    generator = card["generator"]
    assert generator["name"] == "attentionhand" and generator["config_name"] == "tiny-synthlab"
    assert generator["config"]["sd_path"] == str(sd) and generator["config"]["tiny"]["unet_channels"]
    assert generator["weights"]["sd_path"] == {"unet/diffusion_pytorch_model.safetensors": hashlib.sha256(weights.read_bytes()).hexdigest()}
    names = [entry["name"] for entry in card["licences"]]
    assert "CreativeML Open RAIL-M" in names and names.count("CC BY-NC 4.0") == 1  # IH2.6M; HIC has its own terms
    assert card["datasets"]["train"] == ["ih26m:train"] and card["datasets"]["test"] == ["hic:test"]


def test_card_of_the_embedded_generator_names_its_own_licence_not_stable_diffusions():
    from hands.mano import HandModel
    from recon.cards import build_card
    from recon.config import load_config

    cfg = load_config(overrides=["train.synthetic_ratio=0.25"])  # the default generator: tiny-synthlab
    card = build_card(cfg, HandModel())["card"]
    names = [entry["name"] for entry in card["licences"]]
    assert card["generator"]["config_name"] == "tiny-synthlab" and card["generator"]["weights"]["sd_path"]
    assert "CreativeML Open RAIL-M" not in names
    assert any("embedded tiny generator" in entry["part"] for entry in card["licences"])


def test_recon_test_warns_when_evaluated_with_another_mano_model(run, tmp_path, capsys):
    root, out = run
    source = sorted((out / "checkpoints").glob("step_*.json"))[-1]
    copy = tmp_path / "run" / "checkpoints"
    copy.mkdir(parents=True)
    shutil.copy(source.with_suffix(".safetensors"), copy / (source.stem + ".safetensors"))
    meta = json.loads(source.read_text())
    args = ["--datasets", "synthlab:test-lab", "--data-root", str(root), "--max-samples", "2"]

    shutil.copy(source, copy / source.name)
    assert recon_test.main(["--ckpt", str(copy / source.name), *args, "--out", str(tmp_path / "a.json")]) == 0
    assert "warning" not in capsys.readouterr().err

    meta["card"]["hand_model"] = {"kind": "official", "fingerprint": "f" * 64, "mano_dir": "/data/mano"}
    meta["hand_model"] = "f" * 64
    (copy / source.name).write_text(json.dumps(meta))
    assert recon_test.main(["--ckpt", str(copy / source.name), *args, "--out", str(tmp_path / "b.json")]) == 0
    err = capsys.readouterr().err
    assert "recon.test: warning:" in err and "official MANO model (ffffffffffff...)" in err
    assert "procedural one" in err and "--mano-dir /data/mano" in err


def test_demo_with_interwild_finds_boxes_itself_and_reports_absolute_positions(run, tmp_path):
    root, _ = run
    tiny = [
        "model.body_backbone=resnet10t", "model.hand_backbone=resnet10t", "model.trans_backbone=resnet10t",
        "model.backbone_channels=[8,16,32,64]", "model.body_input_size=[64,48]", "model.hand_input_size=64",
        "model.box_channels=32", "model.rotation_channels=32", "model.trans_grid_size=16", "model.trans_sigma=1.0",
        "data.image_size=[64,48]",
    ]
    ckpt = tmp_path / "iw"
    args = ["--arch", "interwild", "--data-root", str(root), "--datasets", "synthlab", "--out", str(ckpt), "--batch-size", "4",
            "--seed", "3", "--max-steps", "1", "eval.at_end=false", "train.image_every=0", *tiny]
    assert recon_train.main(args) == 0
    images = tmp_path / "images"
    images.mkdir()
    for i, path in enumerate(_test_images(root, 2)):
        shutil.copy(path, images / f"{i}_{path.name}")
    out = tmp_path / "all"
    assert recon_demo.main(["--ckpt", str(ckpt), "--input", str(images), "--out", str(out), "--hand-threshold", "0"]) == 0
    summary = json.loads((out / "demo.json").read_text())
    # InterWild reads the whole frame (its reference's protocol); its box net finds the hands in it
    assert summary["boxes"].startswith("whole frame") and "InterWild's box net finds the hands" in summary["boxes"]
    record = json.loads((out / "json" / f"{summary['frames'][0]['stem']}.json").read_text())
    assert record["absolute"] is True and [h["side"] for h in record["hands"]] == ["right", "left"]
    right, left = record["hands"]
    assert 0.0 <= right["confidence"] <= 1.0 and right["wrist_cam"][2] > 0
    # absolute joints: the wrist joint is the wrist position, and left wrist - right wrist = rel_root
    np.testing.assert_allclose(right["joints_cam"][0], right["wrist_cam"], atol=1e-5)
    np.testing.assert_allclose(np.subtract(left["wrist_cam"], right["wrist_cam"]), record["rel_root"], atol=1e-5)
    x0, y0, x1, y1 = record["input_box"]
    assert [x0, y0, x1, y1] == [0.0, 0.0, 63.0, 63.0]  # the whole 64 px frame
    # another regressor with InterWild's boxes (--detector): presence and input region from the detector
    out = tmp_path / "baseline"
    baseline = run[1]
    assert recon_demo.main(["--ckpt", str(baseline), "--input", str(images), "--out", str(out), "--detector", str(ckpt), "--hand-threshold", "0"]) == 0
    summary = json.loads((out / "demo.json").read_text())
    assert summary["arch"] == "baseline" and summary["boxes"].startswith("the --detector checkpoint's box net")
    detected = json.loads((out / "json" / f"{summary['frames'][0]['stem']}.json").read_text())
    x0, y0, x1, y1 = detected["input_box"]  # the detected hands' region, never empty
    assert x1 - x0 >= 0.1 * 64 - 1e-3 and y1 - y0 >= 0.1 * 64 - 1e-3
    assert detected["hands"][0]["confidence"] == right["confidence"]  # the same box net on the same whole frame
    assert recon_demo.main(["--ckpt", str(baseline), "--input", str(images), "--out", str(out), "--detector", str(baseline)]) == 2
    # a confidence threshold no hand reaches: zero hands, frames written as they are
    out = tmp_path / "none"
    assert recon_demo.main(["--ckpt", str(ckpt), "--input", str(images), "--out", str(out), "--hand-threshold", "1.01"]) == 0
    assert all(json.loads(p.read_text())["hands"] == [] for p in (out / "json").glob("*.json"))
    assert len(list((out / "overlays").glob("*.png"))) == 2


def test_card_and_table_setup_record_the_start_weights_by_hash(tmp_path):
    from hands.mano import HandModel
    from recon import table2
    from recon.cards import build_card
    from recon.config import load_config

    encoder = tmp_path / "encoder.safetensors"
    encoder.write_bytes(b"an encoder's bytes")
    digest = hashlib.sha256(encoder.read_bytes()).hexdigest()
    cfg = load_config(overrides=[f"train.backbone_weights={encoder}"])
    card = build_card(cfg, HandModel())["card"]
    assert card["start_weights"] == {"path": str(encoder), "weights": {"encoder.safetensors": digest}}
    assert "start_weights" not in build_card(load_config(), HandModel())["card"]  # random init
    setup = table2._setup(cfg, cfg)
    assert setup["start_weights"] == card["start_weights"] and table2._setup(load_config(), load_config())["start_weights"] is None
    assert table2._start_weights_lines(setup["start_weights"]) == [
        f"Every run started from `{encoder}` (SHA-256: encoder.safetensors {digest[:16]}).", ""]
    assert table2._start_weights_lines(None) == []
    encoder.write_bytes(b"another encoder at the same path")  # the same path, other weights: another hash
    assert build_card(cfg, HandModel())["card"]["start_weights"]["weights"]["encoder.safetensors"] != digest
