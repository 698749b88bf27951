"""recon.demo on broken inputs: exit status 2 and one line, never a traceback (its docs' promise)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from recon import demo as recon_demo
from recon import train as recon_train
from tests.recon_helpers import run_args, write_tiny_synthlab

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = write_tiny_synthlab(tmp_path_factory.mktemp("synthlab_demo"))
    out = tmp_path_factory.mktemp("demo_run") / "run"
    assert recon_train.main(run_args(root, out, "--max-steps", "1", "eval.at_end=false")) == 0
    return root, out


def _image(root: Path) -> Path:
    return sorted((root / "images" / "test-lab").rglob("*.jpg"))[0]


def _demo_error(argv, capsys) -> str:
    assert recon_demo.main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("recon.demo: error: ") and not any("Traceback" in l for l in lines), lines
    return lines[-1]


def _video(root: Path, path: Path) -> Path:
    imageio = pytest.importorskip("imageio.v2")
    pytest.importorskip("imageio_ffmpeg")
    writer = imageio.get_writer(path, fps=5, codec="libx264", macro_block_size=1)
    for image in sorted((root / "images" / "test-lab").rglob("*.jpg"))[:6]:
        writer.append_data(np.asarray(Image.open(image).convert("RGB")))
    writer.close()
    return path


@pytest.mark.parametrize("kind", ["empty", "random_bytes", "truncated", "not_a_video"])
def test_a_broken_video_is_one_line(run, tmp_path, capsys, kind):
    root, ckpt = run
    video = tmp_path / "clip.mp4"
    if kind == "empty":
        video.write_bytes(b"")
    elif kind == "random_bytes":
        video.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "truncated":
        data = _video(root, tmp_path / "full.mp4").read_bytes()
        video.write_bytes(data[: len(data) // 3])
    else:
        video.write_text("just some text, named like a video\n" * 50)
    error = _demo_error(["--ckpt", str(ckpt), "--input", str(video), "--out", str(tmp_path / "o")], capsys)
    assert f"--input {video}: " in error
    if kind == "empty":
        assert error.endswith("an empty file (0 bytes), not a video")


@pytest.mark.parametrize(
    "boxes, message",
    [
        ([100, 100, 120, 130], "box [100.0, 100.0, 120.0, 130.0] lies wholly outside the 64x64 frame"),
        ([-50, -50, -1, -1], "lies wholly outside the 64x64 frame"),
        ({"right": [70, 0, 90, 20], "left": None}, "right: box [70.0, 0.0, 90.0, 20.0] lies wholly outside"),
        ([0, 0, float("nan"), 10], "expected [x0, y0, x1, y1] in pixels"),
        ([0, 0, True, 10], "expected [x0, y0, x1, y1] in pixels"),
    ],
)
def test_boxes_outside_the_frame_or_not_numbers_are_refused(run, tmp_path, capsys, boxes, message):
    root, ckpt = run
    image = _image(root)
    box_file = tmp_path / "boxes.json"
    box_file.write_text(json.dumps({image.name: boxes}))
    argv = ["--ckpt", str(ckpt), "--input", str(image), "--out", str(tmp_path / "o"), "--boxes", str(box_file)]
    assert message in _demo_error(argv, capsys)


def test_a_box_partly_inside_the_frame_is_used(run, tmp_path, capsys):
    root, ckpt = run
    image = _image(root)
    box_file = tmp_path / "boxes.json"
    box_file.write_text(json.dumps({image.name: [40, 40, 200, 200]}))
    out = tmp_path / "o"
    assert recon_demo.main(["--ckpt", str(ckpt), "--input", str(image), "--out", str(out), "--boxes", str(box_file)]) == 0
    assert (out / "json" / f"{image.stem}.json").is_file()
