"""recon.doctor: versions, devices, every optional part named, a fix line for each part that is not usable."""
from __future__ import annotations

import json
import re

import pytest

from recon import doctor


def _sd_folder(root):
    for name in ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps({}))
    for name in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        (root / name).write_bytes(b"0")
    return root


def test_doctor_names_every_part_and_gives_a_fix_for_each_missing_one(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HANDS_MANO_DIR", raising=False)
    empty = tmp_path / "mano"
    empty.mkdir()
    assert doctor.main(["--mano-dir", str(empty), "--sd-path", str(tmp_path / "no-sd")]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "python" in out and "cpu:" in out
    for name in ("procedural hand model", "official MANO files", "Stable Diffusion folder", "mediapipe",
                 "moderngl (headless EGL)", "Ray (Data + Train)", "ONNX export", "video (imageio + ffmpeg)"):
        assert re.search(rf"\[(ok|--)\] {re.escape(name)}:", out), name
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("[--]"):
            assert lines[i + 1].strip().startswith("fix: "), line
    assert "[ok] procedural hand model" in out
    assert f"[--] official MANO files: {empty}" in out and "https://mano.is.tue.mpg.de" in out
    assert "[--] Stable Diffusion folder:" in out and "is not a folder" in out


def test_doctor_accepts_a_valid_sd_folder_and_require_fails_on_a_missing_part(tmp_path, capsys):
    sd = _sd_folder(tmp_path / "sd")
    assert doctor.main(["--sd-path", str(sd), "--require", "sd"]) == 0
    assert f"[ok] Stable Diffusion folder: {sd}" in capsys.readouterr().out
    assert doctor.main(["--sd-path", str(tmp_path / "nothing"), "--require", "sd"]) == 1
    assert "not usable here: sd" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        doctor.main(["--require", "warp-drive"])
