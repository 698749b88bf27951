"""A fuzz suite for the command lines: bad invocations and broken inputs, in-process (each CLI's
``main(argv)``), derandomized (a fixed list built from templates; the only random bytes come from a seeded
generator). Every case must end in one of:

- success (exit status 0);
- a one-line error: a non-zero exit status whose last line on stderr is ``<prog>: error: ...`` (argparse's
  ``usage:`` line may come before it) or, for the checkers (``hands.datasets.check``, ``recon.doctor``),
  their one-line verdict naming themselves; and no traceback;

never an exception escaping ``main``. The inputs cover the run folders, skipped records, bad MANO folders,
configuration combinations, demo inputs of issue 24, plus corrupted dataset files read through the CLIs.
"""
from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from tests.recon_helpers import TINY, write_tiny_synthlab

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

GEN = ["mixing.size=32", "mixing.num_inference_steps=1", "mixing.chunk=2", "mixing.capacity=4", "mixing.max_reuse=2"]
QUICK = ["--max-steps", "1", "eval.at_end=false", *TINY]


def _mains() -> dict[str, Callable]:
    from eval import report
    from generator import figures as generator_figures
    from generator import train as generator_train
    from hands.datasets import check, synthlab
    from mixing import pregenerate
    from recon import demo, doctor, export, table2
    from recon import test as recon_test
    from recon import train as recon_train

    return {
        "recon.train": recon_train.main, "recon.test": recon_test.main, "recon.demo": demo.main,
        "recon.export": export.main, "recon.table2": table2.main, "recon.doctor": doctor.main,
        "hands.datasets.check": check.main, "hands.datasets.synthlab": synthlab.main,
        "mixing.pregenerate": pregenerate.main, "eval.report": report.main,
        "generator.train": generator_train.main, "generator.figures": generator_figures.main,
    }


# -- the broken inputs (written once per session into one folder) --------------------------------------------
@dataclass
class Assets:
    root: Path  # the tiny synthlab
    ckpt: Path  # a trained tiny run folder
    files: Path  # broken files and folders


def _write_files(files: Path, root: Path, ckpt: Path) -> None:
    rng = np.random.default_rng(24)
    files.mkdir(parents=True, exist_ok=True)
    (files / "empty").write_bytes(b"")
    (files / "random.bin").write_bytes(rng.integers(0, 256, 2048, dtype=np.uint8).tobytes())
    (files / "bad.json").write_text('{"a": [1, 2,')
    (files / "list.json").write_text("[1, 2, 3]")
    (files / "strings.json").write_text('{"hic": {"MPVPE": "fast"}}')
    (files / "nan.json").write_text('{"synthlab-test-wild": {"MPVPE": NaN, "RRVE": 1e400}}')
    (files / "text.txt").write_text("hello\n")
    (files / "bad.yaml").write_text("train: [unclosed\n")
    (files / "unknown.yaml").write_text("train:\n  lrate: 3\n")
    (files / "wrongtype.yaml").write_text("train:\n  batch_size: four\n")
    (files / "list.yaml").write_text("- 1\n- 2\n")
    (files / "folder").mkdir(exist_ok=True)
    (files / "folder" / "note.txt").write_text("not a checkpoint\n")
    (files / "plugin_syntax.py").write_text("def broken(:\n")
    (files / "plugin_raises.py").write_text("raise RuntimeError('plugin exploded at import')\n")
    (files / "plugin_ok.py").write_text("x = 1\n")
    # box files for the demo
    image = sorted((root / "images" / "test-lab").rglob("*.jpg"))[0]
    shutil.copy(image, files / "frame.jpg")
    for name, boxes in {
        "boxes_outside": {"frame.jpg": [300, 300, 400, 400]},
        "boxes_nan": {"frame.jpg": [0, 0, "nan", 10]},
        "boxes_inverted": {"frame.jpg": [10, 10, 5, 5]},
        "boxes_missing_frame": {"other.jpg": [0, 0, 10, 10]},
        "boxes_unknown_side": {"frame.jpg": {"middle": [0, 0, 10, 10]}},
        "boxes_short": {"frame.jpg": [0, 0, 10]},
        "boxes_ok": {"frame.jpg": [5, 5, 60, 60]},
        "boxes_per_hand_none": {"frame.jpg": {"right": None, "left": None}},
    }.items():
        (files / f"{name}.json").write_text(json.dumps(boxes))
    (files / "video_empty.mp4").write_bytes(b"")
    (files / "video_random.mp4").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (files / "video_text.avi").write_text("not a video\n" * 20)
    (files / "image_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (files / "frames").mkdir(exist_ok=True)
    (files / "frames" / "a.jpg").write_bytes(b"")
    # MANO folders
    from hands.procedural import write_procedural_mano

    good = files / "mano_good"
    write_procedural_mano(good)
    data = pickle.loads((good / "MANO_RIGHT.pkl").read_bytes(), encoding="latin1")
    (files / "mano_empty").mkdir(exist_ok=True)
    for name, edit in {
        "mano_one_hand": None,
        "mano_nan": lambda d: d.update(v_template=np.full((778, 3), np.nan)),
        "mano_shape": lambda d: d.update(weights=np.zeros((778, 3))),
        "mano_missing_key": lambda d: d.pop("posedirs"),
        "mano_faces": lambda d: d.update(f=-np.ones((1538, 3), dtype=np.int64)),
        "mano_kintree": lambda d: d.update(kintree_table=np.full((2, 16), 99)),
        "mano_strings": lambda d: d.update(hands_mean=np.array(["a"] * 45)),
    }.items():
        folder = files / name
        shutil.copytree(good, folder, dirs_exist_ok=True)
        if edit is None:
            (folder / "MANO_LEFT.pkl").unlink()
            continue
        changed = dict(data)
        edit(changed)
        (folder / "MANO_RIGHT.pkl").write_bytes(pickle.dumps(changed, protocol=2))
    (files / "mano_not_pickle").mkdir(exist_ok=True)
    for side in ("RIGHT", "LEFT"):
        (files / "mano_not_pickle" / f"MANO_{side}.pkl").write_bytes(b"<html>not found</html>")
    # broken checkpoints: copies of the run's newest checkpoint with one thing wrong
    source = sorted((ckpt / "checkpoints").glob("step_*.json"))[-1]
    meta = json.loads(source.read_text())

    def ckpt_copy(name: str, edit_meta=None, weights=None, state=None) -> None:
        folder = files / name
        folder.mkdir(exist_ok=True)
        for suffix in (".safetensors", ".state.pt"):
            shutil.copy(source.with_name(source.stem + suffix), folder / (source.stem + suffix))
        changed = json.loads(json.dumps(meta))
        if edit_meta is not None:
            edit_meta(changed)
        (folder / source.name).write_text(json.dumps(changed) if changed is not None else "{not json")
        if weights is not None:
            weights(folder / (source.stem + ".safetensors"))
        if state is not None:
            state(folder / (source.stem + ".state.pt"))

    ckpt_copy("ckpt_no_arch", lambda m: m.pop("arch"))
    ckpt_copy("ckpt_no_epoch", lambda m: m.pop("epoch"))
    ckpt_copy("ckpt_step_text", lambda m: m.update(step="ten"))
    ckpt_copy("ckpt_kwargs_list", lambda m: m.update(model_kwargs=[1, 2]))
    ckpt_copy("ckpt_kwargs_unknown", lambda m: m["model_kwargs"].update(depth=3))
    ckpt_copy("ckpt_kwargs_wrong", lambda m: m["model_kwargs"].update(hidden_dim="wide"))
    ckpt_copy("ckpt_arch_unknown", lambda m: m.update(arch="nope"))
    ckpt_copy("ckpt_version", lambda m: m.update(version=99))
    ckpt_copy("ckpt_format", lambda m: m.update(format="other"))
    ckpt_copy("ckpt_weights_path", lambda m: m.update(weights="../../etc/passwd"))
    ckpt_copy("ckpt_config_bad", lambda m: m["config"].update(train="oops"))
    ckpt_copy("ckpt_config_unknown", lambda m: m["config"].update(colour="blue"))
    ckpt_copy("ckpt_world_size", lambda m: m.update(world_size=4))
    ckpt_copy("ckpt_truncated", weights=lambda p: p.write_bytes(p.read_bytes()[:100]))
    ckpt_copy("ckpt_no_weights", weights=lambda p: p.unlink())
    ckpt_copy("ckpt_no_state", state=lambda p: p.unlink())
    ckpt_copy("ckpt_state_garbage", lambda m: m.update(state_sha256=_sha(b"garbage")),
              state=lambda p: p.write_bytes(b"garbage"))

    def sidecar_garbage(m):
        m.clear()

    ckpt_copy("ckpt_sidecar_empty_object", sidecar_garbage)
    folder = files / "ckpt_sidecar_not_json"
    shutil.copytree(files / "ckpt_no_arch", folder, dirs_exist_ok=True)
    (folder / source.name).write_text("{not json")
    # broken datasets: copies of the tiny synthlab with one file damaged
    annotations = root / "annotations" / "test-wild"
    for name, damage in {
        "data_bad_json": lambda r: (r / "annotations/test-wild/InterHand2.6M_test-wild_data.json").write_text("{"),
        "data_empty": lambda r: (r / "annotations/test-wild/InterHand2.6M_test-wild_data.json").write_text(""),
        "data_list": lambda r: (r / "annotations/test-wild/InterHand2.6M_test-wild_data.json").write_text("[]"),
        "joints_missing": lambda r: (r / "annotations/test-wild/InterHand2.6M_test-wild_joint_3d.json").unlink(),
        "camera_garbage": lambda r: (r / "annotations/test-wild/InterHand2.6M_test-wild_camera.json").write_text('{"0": 5}'),
        "mano_fits_nan": lambda r: _nan_everywhere(r / "annotations/test-wild/InterHand2.6M_test-wild_MANO_NeuralAnnot.json"),
        "joints_nan": lambda r: _nan_everywhere(r / "annotations/test-wild/InterHand2.6M_test-wild_joint_3d.json"),
        "images_gone": lambda r: shutil.rmtree(r / "images" / "test-wild"),
        "images_corrupt": lambda r: [p.write_bytes(b"x") for p in (r / "images" / "test-wild").rglob("*.jpg")],
        "one_image_corrupt": lambda r: sorted((r / "images" / "test-wild").rglob("*.jpg"))[0].write_bytes(b""),
        "no_synthlab_json": lambda r: (r / "synthlab.json").unlink(),
        "captions_gone": lambda r: shutil.rmtree(r / "captions"),
        "annotations_gone": lambda r: shutil.rmtree(r / "annotations"),
        "train_all_bad": lambda r: _all_widths_zero(r / "annotations/train-lab/InterHand2.6M_train-lab_data.json"),
    }.items():
        copy = files / f"data_{name}"
        shutil.copytree(root, copy, dirs_exist_ok=True)
        damage(copy)
    assert annotations.is_dir()


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _nan_everywhere(path: Path) -> None:
    def walk(node):
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return float("nan") if isinstance(node, float) else node

    path.write_text(json.dumps(walk(json.loads(path.read_text()))))


def _all_widths_zero(path: Path) -> None:
    data = json.loads(path.read_text())
    for image in data["images"]:
        image["width"] = 0
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One cache folder for the module (the procedural hand written once); no case may write synthlab there."""
    folder = tmp_path_factory.mktemp("cli_fuzz_cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("ATTENTIONHAND_CACHE", str(folder))
    yield folder
    patch.undo()


@pytest.fixture(scope="module")
def assets(tmp_path_factory, cache) -> Assets:
    from recon import train as recon_train
    from tests.recon_helpers import run_args

    base = tmp_path_factory.mktemp("cli_fuzz")
    root = write_tiny_synthlab(base / "synthlab")
    ckpt = base / "run"
    assert recon_train.main(run_args(root, ckpt, "--max-steps", "1", "eval.at_end=false")) == 0
    _write_files(base / "files", root, ckpt)
    return Assets(root=root, ckpt=ckpt, files=base / "files")


# -- the cases -------------------------------------------------------------------------------------------------
# Placeholders: {root} tiny synthlab, {ckpt} its trained run, {f} the broken-inputs folder, {out} a fresh
# folder for the case, {mano:NAME} the folder files/mano_NAME, {data:NAME} the damaged synthlab files/data_NAME.
TRAIN_BASE = ["--data-root", "{root}", "--datasets", "synthlab", "--test-datasets", "synthlab:test-wild",
              "--out", "{out}", "--batch-size", "4"]


def _train_cases() -> list[list[str]]:
    bad_values = {
        "--batch-size": ["0", "-3", "x", "2.5", "", "100000"],
        "--epochs": ["0", "-1", "many", "1e3"],
        "--max-steps": ["0", "-5", "nan", ""],
        "--seed": ["x", "1.5", "", "99999999999999999999999"],
        "--synthetic-ratio": ["nan", "inf", "-inf", "1", "-0.0001", "abc", "0.99", "1e-400", ""],
        "--arch": ["", "nope", "../baseline", "Baseline", "interwild intaghand"],
        "--device": ["tpu", "cuda:99", "", "cpu:x", "meta"],
        "--profile": ["fast", "", "PAPER"],
        "--mix-mode": ["bogus", ""],
        "--generator": ["nope", ""],
        "--config": ["{f}/missing.yaml", "{f}/folder", "{f}/bad.yaml", "{f}/unknown.yaml", "{f}/wrongtype.yaml",
                     "{f}/list.yaml", "{f}/empty", "{f}/random.bin"],
        "--datasets": ["", ",", "nope", "synthlab:nosplit", "ih26m", "synthlab,,", ":train", "synthlab:"],
        "--test-datasets": ["nope", "synthlab:nosplit", "hic", ","],
        "--data-root": ["{f}/missing", "{f}/text.txt", "{f}/folder", "{f}/empty"],
        "--mano-dir": ["{f}/missing", "{f}/text.txt", "{f}/mano_empty", "{f}/mano_one_hand", "{f}/mano_nan",
                       "{f}/mano_shape", "{f}/mano_missing_key", "{f}/mano_faces", "{f}/mano_kintree",
                       "{f}/mano_strings", "{f}/mano_not_pickle"],
        "--out": ["{f}/text.txt", "{f}/empty", "{ckpt}"],
        "--resume": ["{f}/missing.json", "{f}/folder", "{f}/bad.json", "{f}/list.json", "{f}/text.txt",
                     "{f}/ckpt_no_arch", "{f}/ckpt_no_epoch", "{f}/ckpt_step_text", "{f}/ckpt_kwargs_list",
                     "{f}/ckpt_kwargs_unknown", "{f}/ckpt_arch_unknown", "{f}/ckpt_version", "{f}/ckpt_format",
                     "{f}/ckpt_weights_path", "{f}/ckpt_config_bad", "{f}/ckpt_config_unknown",
                     "{f}/ckpt_world_size", "{f}/ckpt_truncated", "{f}/ckpt_no_weights", "{f}/ckpt_no_state",
                     "{f}/ckpt_state_garbage", "{f}/ckpt_sidecar_empty_object", "{f}/ckpt_sidecar_not_json",
                     "{f}/ckpt_kwargs_wrong"],
        "--plugin": ["nope_module_xyz", "{f}/plugin_syntax.py", "{f}/plugin_raises.py", "{f}/missing.py",
                     "{f}/text.txt", "os.path"],
        "--backbone-weights": ["{f}/missing.pt", "{f}/random.bin", "{f}/empty", "{f}/text.txt", "{f}/folder",
                               "{f}/bad.json"],
        "--sd-path": ["{f}/missing", "{f}/text.txt", "{f}/folder"],
    }
    cases = []
    for flag, values in bad_values.items():
        for value in values:
            extra = ["--synthetic-ratio", "0.5", *GEN] if flag == "--sd-path" else []
            cases.append([*TRAIN_BASE, *QUICK, flag, value, *extra])  # the fuzzed value last: it wins
    overrides = ["train.lrate=1", "train.batch_size=four", "model.depth=3", "mixing.mode=bogus", "threads=0",
                 "optim.lr=-1", "optim.lr=nan", "optim.lr=0", "data.image_size=[8,8]", "data.image_size=abc",
                 "data.image_size=[64]", "data.crop=middle", "train.ckpt_every=0", "train.log_every=-1",
                 "eval.batch_size=0", "seed=abc", "=", "novalue", "train=3", "train.lr_decay_gamma=x",
                 "data.max_train_samples=0", "data.max_test_samples=-1", "mixing.capacity=0", "mixing.size=12",
                 "mixing.chunk=0", "mixing.labels=nowhere", "optim.grad_clip=abc", "data.num_workers=-1",
                 "data.augment_kwargs.nope=1", "data.augment_kwargs.rot_sigma_deg=abc",
                 "${oc.env:NOPE_XYZ}=1", "train.max_steps=${nope}"]
    cases += [[*TRAIN_BASE, *QUICK, override] for override in overrides]
    combos = [
        ["--synthetic-ratio", "0.99", *GEN], ["--synthetic-ratio", "0.6", "--batch-size", "1", *GEN],
        ["--synthetic-ratio", "0.5", *GEN, "mixing.capacity=1"], ["--synthetic-ratio", "0.5", *GEN, "mixing.size=40"],
        ["--synthetic-ratio", "0.5", *GEN, "mixing.generator_config=nope"],
        ["--synthetic-ratio", "0.5", *GEN, "mixing.generator_config={f}/bad.yaml"],
        ["--synthetic-ratio", "0.5", *GEN, "--mix-mode", "offline"],
        ["--synthetic-ratio", "0.5", *GEN, "--mix-mode", "offline", "mixing.shards={f}/folder"],
        ["--synthetic-ratio", "0.5", *GEN, "mixing.generator_config=sd15"],
        ["--resume"], ["--resume", "--overwrite"],
    ]
    cases += [[*TRAIN_BASE, *QUICK, *combo] for combo in combos]
    # damaged datasets (test-wild, or every train-lab record): refused before training starts
    for name in ("data_bad_json", "data_empty", "data_list", "joints_missing", "camera_garbage", "mano_fits_nan",
                 "joints_nan", "images_gone", "no_synthlab_json", "captions_gone", "annotations_gone",
                 "train_all_bad", "images_corrupt"):
        cases.append(["--data-root", "{f}/data_" + name, "--datasets", "synthlab", "--test-datasets",
                      "synthlab:test-wild", "--out", "{out}", "--batch-size", "4", "--max-steps", "1", *TINY])
    return cases


def _test_cases() -> list[list[str]]:
    cases = [[], ["--ckpt"], ["--ckpt", "{f}/missing"], ["--ckpt", "{f}/folder"], ["--ckpt", "{f}/text.txt"],
             ["--ckpt", "{f}/bad.json"], ["--ckpt", "{f}/empty"], ["--ckpt", "{root}"]]
    for name in ("no_arch", "step_text", "kwargs_list", "kwargs_unknown", "kwargs_wrong", "arch_unknown",
                 "version", "format", "weights_path", "config_bad", "config_unknown", "truncated", "no_weights",
                 "sidecar_empty_object", "sidecar_not_json"):
        cases.append(["--ckpt", "{f}/ckpt_" + name, "--out", "{out}/m.json", "--max-samples", "2"])
    ok = ["--ckpt", "{ckpt}", "--out", "{out}/m.json", "--data-root", "{root}"]
    for flag, values in {
        "--datasets": ["nope", "synthlab:nosplit", ",", "hic", "ih26m,reih"],
        "--batch-size": ["0", "-1", "x"],
        "--max-samples": ["0", "-2", "many"],
        "--device": ["tpu", "cuda:7"],
        "--compare": ["{f}/missing.json", "{f}/bad.json", "{f}/list.json", "{f}/strings.json", "{f}/text.txt",
                      "{f}/folder"],
        "--mano-dir": ["{f}/missing", "{f}/mano_empty", "{f}/mano_one_hand", "{f}/mano_nan", "{f}/mano_not_pickle",
                       "{f}/mano_faces"],
        "--plugin": ["nope_module_xyz", "{f}/plugin_syntax.py", "{f}/plugin_raises.py"],
        "--out": ["{f}/folder", "{f}/text.txt/m.json"],
    }.items():
        for value in values:
            cases.append([*ok, "--datasets", "synthlab:test-wild", "--max-samples", "2", flag, value]
                         if flag != "--datasets" else [*ok, flag, value])
    for name in ("data_bad_json", "data_empty", "data_list", "joints_missing", "camera_garbage", "mano_fits_nan",
                 "joints_nan", "images_gone", "images_corrupt", "one_image_corrupt", "no_synthlab_json",
                 "captions_gone", "annotations_gone"):
        cases.append(["--ckpt", "{ckpt}", "--out", "{out}/m.json", "--data-root", "{f}/data_" + name,
                      "--datasets", "synthlab:test-wild"])
    cases.append([*ok, "--datasets", "synthlab:test-wild", "--compare", "{f}/nan.json"])
    return cases


def _demo_cases() -> list[list[str]]:
    base = ["--ckpt", "{ckpt}", "--out", "{out}"]
    cases = [[], ["--ckpt", "{ckpt}"], [*base], [*base, "--input", "{f}/missing.jpg"],
             [*base, "--input", "{f}/folder"], [*base, "--input", "{f}/empty"], [*base, "--input", "{f}/text.txt"],
             [*base, "--input", "{f}/image_broken.png"], [*base, "--input", "{f}/frames"],
             [*base, "--input", "{f}/video_empty.mp4"], [*base, "--input", "{f}/video_random.mp4"],
             [*base, "--input", "{f}/video_text.avi"], ["--ckpt", "{f}/ckpt_truncated", "--out", "{out}", "--input", "{f}/frame.jpg"],
             ["--ckpt", "{f}/missing", "--out", "{out}", "--input", "{f}/frame.jpg"]]
    frame = [*base, "--input", "{f}/frame.jpg"]
    for name in ("outside", "nan", "inverted", "missing_frame", "unknown_side", "short", "ok", "per_hand_none"):
        cases.append([*frame, "--boxes", "{f}/boxes_" + name + ".json"])
    for extra in (["--boxes", "{f}/bad.json"], ["--boxes", "{f}/list.json"], ["--boxes", "{f}/missing.json"],
                  ["--focal", "0"], ["--focal", "-5"], ["--focal", "1", "2", "3"], ["--focal", "nan"],
                  ["--princpt", "1"], ["--princpt", "nan", "3"], ["--max-frames", "0"], ["--max-frames", "-1"],
                  ["--hand-threshold", "x"], ["--alpha", "x"], ["--detector", "{f}/missing"],
                  ["--detector", "{ckpt}"], ["--mano-dir", "{f}/mano_nan"], ["--mano-dir", "{f}/missing"],
                  ["--device", "tpu"], ["--plugin", "nope_module_xyz"], ["--out", "{f}/text.txt"]):
        cases.append([*frame, *extra])
    return cases


def _other_cases() -> list[tuple[str, list[str]]]:
    cases: list[tuple[str, list[str]]] = []
    for argv in ([], ["--ckpt", "{ckpt}"], ["--ckpt", "{f}/missing", "--onnx", "{out}/m.onnx"],
                 ["--ckpt", "{f}/ckpt_truncated", "--onnx", "{out}/m.onnx"],
                 ["--ckpt", "{f}/ckpt_arch_unknown", "--onnx", "{out}/m.onnx"],
                 ["--ckpt", "{ckpt}", "--onnx", "{out}/m.onnx", "--batch", "0"],
                 ["--ckpt", "{ckpt}", "--onnx", "{out}/m.onnx", "--batch", "x"],
                 ["--ckpt", "{ckpt}", "--onnx", "{f}/text.txt/m.onnx"],
                 ["--ckpt", "{ckpt}", "--onnx", "{out}/m.onnx", "--mano-dir", "{f}/mano_nan"],
                 ["--ckpt", "{ckpt}", "--onnx", "{out}/m.onnx", "--plugin", "{f}/plugin_raises.py"]):
        cases.append(("recon.export", argv))
    for argv in ([], ["--name", "nope", "--root", "{root}"], ["--name", "synthlab"],
                 ["--name", "synthlab", "--root", "{f}/missing"], ["--name", "synthlab", "--root", "{f}/text.txt"],
                 ["--name", "synthlab", "--root", "{f}/folder"], ["--name", "ih26m", "--root", "{root}", "--splits", "nope"],
                 ["--name", "synthlab", "--root", "{root}", "--splits", "nope"],
                 ["--name", "synthlab", "--root", "{root}", "--splits", ","],
                 ["--name", "synthlab", "--root", "{root}", "--max-images", "-1"],
                 ["--name", "synthlab", "--root", "{root}", "--max-images", "x"],
                 ["--name", "synthlab", "--root", "{root}", "--variant", "nope"],
                 ["--name", "reih", "--root", "{root}"], ["--name", "hic", "--root", "{root}"],
                 ["--name", "synthlab", "--root", "{f}/data_data_bad_json", "--splits", "test-wild"],
                 ["--name", "synthlab", "--root", "{f}/data_images_corrupt", "--splits", "test-wild", "--strict"],
                 ["--name", "synthlab", "--root", "{f}/data_one_image_corrupt", "--splits", "test-wild"],
                 ["--name", "synthlab", "--root", "{f}/data_joints_nan", "--splits", "test-wild"],
                 ["--name", "synthlab", "--root", "{f}/data_annotations_gone"]):
        cases.append(("hands.datasets.check", argv))
    for argv in ([], ["--results", "x"], ["--results", "a={f}/missing.json"], ["--results", "a={f}/bad.json"],
                 ["--results", "a={f}/list.json"], ["--results", "a={f}/strings.json"], ["--results", "={f}/nan.json"],
                 ["--results", "a={f}/nan.json", "--paper", "Nope"], ["--results", "a={f}/nan.json", "--out", "{f}/text.txt"],
                 ["--results", "a={f}/text.txt"], ["--paper"], ["--paper", "InterWild", "--datasets", "nope"]):
        cases.append(("eval.report", argv))
    for argv in ([], ["--n", "0", "--out", "{out}", "--data-root", "{root}"], ["--n", "x", "--out", "{out}"],
                 ["--n", "2", "--out", "{out}", "--shard-size", "0"],
                 ["--n", "2", "--out", "{out}", "--size", "40", "--data-root", "{root}"],
                 ["--n", "2", "--out", "{out}", "--size", "-8", "--data-root", "{root}"],
                 ["--n", "2", "--out", "{out}", "--labels", "nope"],
                 ["--n", "2", "--out", "{out}", "--generator-config", "nope", "--data-root", "{root}"],
                 ["--n", "2", "--out", "{out}", "--mano-dir", "{f}/mano_nan", "--data-root", "{root}"],
                 ["--n", "2", "--out", "{out}", "--data-root", "{f}/missing"],
                 ["--n", "2", "--out", "{out}", "--dataset", "nope", "--data-root", "{root}"],
                 ["--n", "2", "--out", "{out}", "--data-root", "{root}", "--split", "nope"],
                 ["--n", "2", "--out", "{f}/text.txt", "--data-root", "{root}"],
                 ["--n", "2", "--out", "{out}", "--sd-path", "{f}/folder", "--generator-config", "sd15",
                  "--data-root", "{root}"],
                 ["--n", "2", "--out", "{out}", "--device", "tpu", "--data-root", "{root}"],
                 ["--n", "2", "--out", "{out}", "--steps", "0", "--data-root", "{root}"],
                 ["--n", "2", "--out", "{out}", "--generator", "nope", "--data-root", "{root}"]):
        cases.append(("mixing.pregenerate", argv))
    for argv in (["--require", "nope"], ["--mano-dir", "{f}/mano_nan", "--require", "mano"],
                 ["--sd-path", "{f}/text.txt", "--require", "sd15"]):
        cases.append(("recon.doctor", argv))
    for argv in ([], ["--out", "{f}/text.txt/x", "--sizes", "1", "0", "0", "0"],
                 ["--out", "{out}", "--sizes", "-1", "0", "0", "0"], ["--out", "{out}", "--resolution", "8"],
                 ["--out", "{out}", "--sizes", "1", "0", "0", "0", "--mano-dir", "{f}/mano_nan"],
                 ["--out", "{out}", "--sizes", "x"]):
        cases.append(("hands.datasets.synthlab", argv))
    table = ["--dry-run", "--data-root", "{root}", "--datasets", "synthlab", "--results-dir", "{out}/results"]
    for argv in (["--dry-run"], ["--arch", "nope", *table], ["--arch", "baseline", "--ratios", "x", *table],
                 ["--arch", "baseline", "--ratios", "1.5", *table], ["--arch", "baseline", "--seeds", "0", *table],
                 ["--arch", "baseline", "--seeds", "x", *table], ["--arch", "baseline", "--seed-list", ",", *table],
                 ["--arch", "baseline", "--out", "{f}/text.txt", *table],
                 ["--arch", "baseline", "--config", "{f}/bad.yaml", *table],
                 ["--arch", "baseline", "--mano-dir", "{f}/mano_nan", *table],
                 ["--arch", "baseline", "train.lrate=3", *table], ["--arch", "baseline", "--jobs", "0", *table],
                 ["--arch", "baseline", "--figure-samples", "-1", *table],
                 ["--arch", "baseline", "--data-root", "{f}/missing", "--dry-run"]):
        cases.append(("recon.table2", argv))
    safe = ["--steps", "1", "--vae-steps", "0", "--batch-size", "2", "--sample-every", "0", "--sample-steps", "1",
            "--no-progress", "--data-root", "{root}", "--split", "train-lab", "--out", "{out}"]
    for argv in (["--steps", "-1"], ["--batch-size", "0"], ["--steps", "x"], [*safe, "--generator-config", "nope"],
                 [*safe, "--mano-dir", "{f}/mano_nan"], [*safe, "--resume", "{f}/missing"],
                 [*safe, "--config", "{f}/bad.yaml"], [*safe, "--device", "tpu"], [*safe, "--out", "{f}/text.txt"],
                 [*safe, "--split", "nope"], [*safe, "--lr", "nan"], [*safe, "--set", "nope=1"],
                 [*safe, "--sd-path", "{f}/folder", "--generator-config", "sd15"],
                 [*safe, "--dataset-option", "nokey"]):
        cases.append(("generator.train", argv))
    for argv in (["--out", "{out}", "--generator-config", "nope"],
                 ["--out", "{out}", "--data-root", "{root}", "--index", "999"],
                 ["--out", "{out}", "--data-root", "{root}", "--split", "nope"],
                 ["--out", "{out}", "--data-root", "{f}/missing"], ["--out", "{out}", "--device", "tpu"],
                 ["--out", "{out}", "--set", "x=1"], ["--out", "{out}", "--steps", "x"]):
        cases.append(("generator.figures", argv))
    return cases


def all_cases() -> list[tuple[str, list[str]]]:
    return ([("recon.train", argv) for argv in _train_cases()] + [("recon.test", argv) for argv in _test_cases()]
            + [("recon.demo", argv) for argv in _demo_cases()] + _other_cases())


CASES = all_cases()


def _resolve(argv: list[str], assets: Assets, out: Path) -> list[str]:
    return [part.replace("{root}", str(assets.root)).replace("{ckpt}", str(assets.ckpt))
            .replace("{f}", str(assets.files)).replace("{out}", str(out)) for part in argv]


def test_there_are_at_least_200_cases_and_no_duplicates():
    assert len(CASES) >= 200
    assert len({(cli, tuple(argv)) for cli, argv in CASES}) == len(CASES)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{cli}-{i}" for i, (cli, _) in enumerate(CASES)])
def test_a_bad_invocation_ends_in_success_or_one_line(index, assets, cache, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default output folder (runs/...) lands here
    cli, argv = CASES[index]
    argv = _resolve(argv, assets, tmp_path / "out")
    main = _mains()[cli]
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's usage errors (status 2) and --help
        code = stop.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, f"{cli} {argv}: {captured.err[-2000:]}"
    if code in (0, None):
        return
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert lines, f"{cli} {argv}: exit {code} with nothing on stderr"
    last = lines[-1]
    named = last.startswith((f"{cli}:", f"python -m {cli}:"))  # a checker's verdict ("hands.datasets.check: FAILED")
    assert ": error: " in last or named, f"{cli} {argv}: exit {code}, last line {last!r}"
    assert not (cache / "synthlab").exists(), f"{cli} {argv}: rendered the embedded synthlab"
