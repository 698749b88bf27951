"""``python -m recon.export``: export a checkpoint's regressor network to ONNX.

    pip install 'attentionhand-aug[export]'          # onnx + onnxruntime
    python -m recon.export --ckpt runs/recon --onnx baseline.onnx
    python -m recon.export --ckpt runs/recon --onnx baseline.onnx --batch 4 --check

The exported graph takes ``image`` (B, 3, H, W) float RGB in [0, 1] at the checkpoint's input size
(``data.image_size``, the crop the regressor was trained on) and ``K`` (B, 3, 3) the intrinsics of that
crop in pixels, and returns the :class:`recon.output.TwoHandOutput` tensors by name: ``right_verts``,
``left_verts`` (B, 778, 3) and ``right_joints``, ``left_joints`` (B, 21, 3) relative to each hand's wrist,
``rel_root`` (B, 3) left wrist minus right wrist (metres, camera axes), plus each optional field the
regressor fills (``right_mano_pose`` (B, 48), ``right_mano_shape`` (B, 10), ``right_joints_img``
(B, 21, 2), ...). The MANO layer is part of the graph. A regressor that ignores ``K`` (the baseline)
gives a graph whose only input is ``image`` (the exporter drops unused inputs); InterWild's uses both.
The batch size is fixed at export (``--batch``).

Exported with ``torch.onnx.export`` (the TorchScript-based exporter, ``dynamo=False``, opset 20: InterWild's crops need its AffineGrid).
``--check`` runs the file in ONNX Runtime on a random input and prints the largest difference from
PyTorch's outputs (what tests/test_tools_recon.py asserts).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from hands.sample import Camera, HandBatch
from recon import checkpoint as ckpt
from recon.output import _OPTIONAL_SHAPES, _REQUIRED_SHAPES
from recon.registry import PluginError, import_plugin

__all__ = ["ExportWrapper", "export_onnx", "compare_with_onnxruntime", "main"]

OPSET = 20


class ExportWrapper(nn.Module):
    """A regressor as ``forward(image (B, 3, H, W), K (B, 3, 3)) -> tuple of tensors`` (``output_names``).

    The batch handed to the regressor carries the image and the camera only: labels do not exist at
    inference, and the contract's ``forward`` reads no labels.
    """

    def __init__(self, model: nn.Module, output_names: Sequence[str]):
        super().__init__()
        self.model = model
        self.output_names = list(output_names)

    def forward(self, image: Tensor, K: Tensor) -> tuple[Tensor, ...]:
        output = _call(self.model, image, K)
        return tuple(getattr(output, name) for name in self.output_names)


def _call(model: nn.Module, image: Tensor, K: Tensor):
    """model(HandBatch with the image and camera only) -> TwoHandOutput."""
    batch = HandBatch(
        image=image,
        right=None,
        left=None,
        rel_root=None,
        rel_root_valid=None,
        camera=Camera(K=K, dist=torch.zeros(image.shape[0], 4, dtype=image.dtype, device=image.device)),
        hand_type=[],
        meta=[],
    )
    return model(batch)


def _output_names(model: nn.Module, image: Tensor, K: Tensor) -> list[str]:
    """The TwoHandOutput fields this regressor fills (required ones first)."""
    with torch.no_grad():
        output = _call(model, image, K)
    return list(_REQUIRED_SHAPES) + [name for name in _OPTIONAL_SHAPES if getattr(output, name, None) is not None]


def example_inputs(info: ckpt.CheckpointInfo, batch: int = 1, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A random image at the checkpoint's input size and a plausible K for it (focal = larger side)."""
    height, width = (int(v) for v in info.meta["config"]["data"]["image_size"])
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, height, width, generator=generator)
    focal = float(max(height, width))
    K = torch.tensor([[focal, 0.0, (width - 1) / 2], [0.0, focal, (height - 1) / 2], [0.0, 0.0, 1.0]])
    return image, K.expand(batch, 3, 3).contiguous()


def export_onnx(model: nn.Module, info: ckpt.CheckpointInfo, path: str | Path, *, batch: int = 1) -> list[str]:
    """Write the ONNX file; returns the output names."""
    model = model.eval()
    image, K = example_inputs(info, batch)
    names = _output_names(model, image, K)
    wrapper = ExportWrapper(model, names).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the exporter's constant-folding notes
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks traced as constants (fixed batch)
        torch.onnx.export(
            wrapper, (image, K), str(path), input_names=["image", "K"], output_names=names, opset_version=OPSET,
            dynamo=False,
        )
    return names


def compare_with_onnxruntime(model: nn.Module, info: ckpt.CheckpointInfo, path: str | Path, *, batch: int = 1, seed: int = 1) -> dict[str, float]:
    """{output name: max |onnxruntime - torch|} on one random input (metres for the 3D outputs)."""
    import onnxruntime

    image, K = example_inputs(info, batch, seed=seed)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    feeds = {"image": image.numpy(), "K": K.numpy()}
    got = session.run(names, {i.name: feeds[i.name] for i in session.get_inputs()})  # K is dropped when unused
    with torch.no_grad():
        expected = ExportWrapper(model.eval(), names)(image, K)
    return {name: float((torch.from_numpy(a) - b).abs().max()) for name, a, b in zip(names, got, expected)}


def _positive_int(text: str) -> int:
    from recon.train import positive_int

    return positive_int(text)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recon.export", description="Export a regressor to ONNX.")
    parser.add_argument("--ckpt", required=True, help="a .json sidecar, a .safetensors file or a run folder")
    parser.add_argument("--onnx", required=True, help="the .onnx file to write")
    parser.add_argument("--batch", type=_positive_int, default=1, help="batch size of the exported graph")
    parser.add_argument("--check", action="store_true", help="compare ONNX Runtime's outputs with PyTorch's")
    parser.add_argument("--mano-dir", help="MANO folder (default: the checkpoint's)")
    parser.add_argument("--plugin", action="append", default=[], help="module or .py file registering regressors")
    args = parser.parse_args(argv)
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
    except ImportError:
        print("recon.export: error: ONNX export needs onnx: pip install 'attentionhand-aug[export]'", file=sys.stderr)
        return 2
    from hands.mano import MANOError
    from hands.paths import output_file
    from recon.test import load_regressor

    try:
        output_file(args.onnx, "--onnx")
        for plugin in args.plugin:
            import_plugin(plugin)
        model, info = load_regressor(args.ckpt, device="cpu", mano_dir=args.mano_dir)
    except (ckpt.CheckpointError, PluginError, MANOError, ValueError) as error:  # ValueError: output_file
        print(f"recon.export: error: {error}", file=sys.stderr)
        return 2
    try:
        names = export_onnx(model, info, args.onnx, batch=args.batch)
    except torch.onnx.errors.OnnxExporterError as error:  # an operator the exporter has no ONNX form for
        first = " ".join(str(error).split())[:300]
        print(f"recon.export: error: {info.arch} cannot be exported to ONNX (opset {OPSET}): {first}", file=sys.stderr)
        return 1
    print(f"recon.export: wrote {args.onnx} ({info.arch}, inputs image {list(example_inputs(info, args.batch)[0].shape)}, K; outputs {', '.join(names)})")
    if args.check:
        try:
            diffs = compare_with_onnxruntime(model, info, args.onnx, batch=args.batch)
        except ImportError:
            print("recon.export: error: --check needs onnxruntime: pip install 'attentionhand-aug[export]'", file=sys.stderr)
            return 2
        for name, value in diffs.items():
            print(f"  {name}: max |onnxruntime - torch| = {value:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
