"""``python -m recon.demo``: run a trained regressor on your own images or videos.

    python -m recon.demo --ckpt runs/recon --input photo.jpg --out demo/
    python -m recon.demo --ckpt runs/interwild --input frames/ --out demo/ --focal 1400 --princpt 960 540
    python -m recon.demo --ckpt runs/intaghand --input clip.mp4 --out demo/ --boxes boxes.json

Inputs: one image, a folder of images (sorted by name), or a video (decoded by imageio's ffmpeg plugin, whose
binary ships in the imageio-ffmpeg wheel). Outputs under ``--out``:

- ``overlays/<frame>.png``: the predicted meshes over the full frame (right and left in hands.render's
  colours); for a video also ``overlay.mp4`` at the input's frame rate;
- ``json/<frame>.json``: per frame, each present hand's MANO pose (48, axis-angle, flat_hand_mean=False)
  and shape (10), its 21 joints (hands.joints order) and the left-minus-right wrist offset, metres, OpenCV
  camera axes of the user's camera (``K`` is recorded); ``"hands": []`` for a frame without hands;
- ``meshes/<frame>_<side>.obj``: each present hand's mesh (metres; camera space when absolute, else
  relative to that hand's wrist, as the JSON says);
- ``demo.json``: the run's summary (checkpoint, arch, frames, how boxes and positions were obtained).

The regressor's input is what it was trained on (the checkpoint's ``data.crop`` and ``data.image_size``):

- ``crop: image``: the whole frame, made to the input's aspect ratio and resized (InterWild's protocol: its
  box net finds the hands in it);
- ``crop: hands`` (a region around both hands grown 1.3x): the boxes come from ``--boxes FILE``, a JSON
  ``{frame: [x0, y0, x1, y1]}`` (the hands' region) or ``{frame: {"right": box | null, "left": box | null}}``
  (per hand; null: the hand is absent), frame being the image's file name or the video frame's index; else,
  for an InterWild checkpoint, from InterWild's own box net run on the whole frame (a first pass); for any
  other regressor, from the box net of an InterWild checkpoint given as ``--detector``; else the whole
  frame, with a log line saying so. The hands' union box is grown 1.3x (as at test time) and kept at
  least a tenth of the frame's larger side.

Which hands are present: from the box file when it names hands; for InterWild, a hand is present when its
box confidence (the box net's softmax heatmap at the predicted centre) is at least ``--hand-threshold``
(default 0.05); other regressors predict no presence, so both hands are reported. Zero hands: the frame is
written without overlay and its JSON has ``"hands": []``.

Positions: regressors return wrist-relative meshes and the relative root. When a regressor also gives the
right wrist in camera space (InterWild's ``right_root_cam``, from its virtual-camera depth), joints are
absolute (``"absolute": true``). Otherwise ``joints_cam`` holds wrist-relative joints (``"absolute": false``)
and the overlay places the right wrist on the ray through the input box's centre at the depth where a
0.25 m two-hand extent fills the box (a display heuristic only, recorded as ``"overlay_placement"``).

Camera: ``--focal F`` or ``--focal FX FY`` and ``--princpt CX CY`` in pixels of the frame; by default the
focal is the frame's larger side (a ~53 degree field of view) and the principal point its centre.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from hands.camera import bbox_crop_affine, crop_image, make_intrinsics, scale_bbox, square_bbox, transform_intrinsics
from hands.sample import Camera, HandLabels, HandSample, collate
from recon import checkpoint as ckpt
from recon.registry import PluginError, import_plugin

__all__ = ["main", "Frame", "iter_frames", "read_boxes", "DemoError", "predict_frame", "HAND_EXTENT_M"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".gif")
HAND_EXTENT_M = 0.25  # the two-hand extent assumed by the overlay heuristic when no absolute root is predicted
EXTEND = 1.3  # the hands' region grown as recon.data.eval_transform grows it
MIN_BOX_FRACTION = 0.1  # the input region spans at least this share of the frame's larger side


class DemoError(ValueError):
    """A bad input, box file or camera (one line naming it)."""


@dataclass
class Frame:
    """One input frame: ``key`` (file name or video frame index, the box file's key), ``stem`` (output
    file names), ``image`` (3, H, W) float RGB in [0, 1]."""

    key: str
    stem: str
    image: Tensor


def _to_tensor(array: np.ndarray) -> Tensor:
    if array.ndim == 2:
        array = np.stack([array] * 3, -1)
    return torch.from_numpy(np.array(array[..., :3], copy=True)).permute(2, 0, 1).float().div_(255.0)


def _read_image(path: Path) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return _to_tensor(np.asarray(image.convert("RGB")))
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise DemoError(f"{path}: not a readable image ({type(error).__name__})") from None


# what imageio / ffmpeg raise for a file that is not a decodable video (empty, truncated, another format)
_VIDEO_ERRORS = (OSError, ValueError, RuntimeError, IndexError, KeyError, StopIteration)


def video_fps(path: Path) -> float:
    """The video's frame rate (25 when the container does not say); DemoError when it is not a readable video."""
    import imageio.v3 as iio

    if path.stat().st_size == 0:
        raise DemoError(f"--input {path}: an empty file (0 bytes), not a video")
    try:
        meta = iio.immeta(path, plugin="FFMPEG")
    except _VIDEO_ERRORS as error:
        raise DemoError(f"--input {path}: cannot read it as a video ({type(error).__name__}: {_first_line(error)})") from None
    fps = meta.get("fps")
    try:
        fps = float(fps) if fps else 25.0
    except (TypeError, ValueError):
        fps = 25.0
    return fps if 0 < fps < 10_000 else 25.0


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(error).__name__


def iter_frames(path: str | Path, max_frames: Optional[int] = None) -> Iterator[Frame]:
    """Frames of an image, a folder of images (sorted) or a video (imageio's ffmpeg plugin)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DemoError(f"--input {path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        for file in files[:max_frames]:
            yield Frame(file.name, file.stem, _read_image(file))
    elif path.suffix.lower() in VIDEO_SUFFIXES:
        if not path.is_file():
            raise DemoError(f"--input {path}: no such file")
        try:
            import imageio.v3 as iio
        except ImportError:
            raise DemoError("video input needs imageio and imageio-ffmpeg: pip install 'attentionhand-aug[video]'") from None
        if path.stat().st_size == 0:
            raise DemoError(f"--input {path}: an empty file (0 bytes), not a video")
        count = 0
        try:
            for index, array in enumerate(iio.imiter(path, plugin="FFMPEG")):
                if max_frames is not None and index >= max_frames:
                    break
                count += 1
                yield Frame(str(index), f"frame_{index:06d}", _to_tensor(array))
        except _VIDEO_ERRORS as error:
            raise DemoError(f"--input {path}: cannot decode the video ({type(error).__name__}: {_first_line(error)})") from None
        if count == 0 and max_frames != 0:
            raise DemoError(f"--input {path}: the video holds no frame")
    elif path.is_file():
        yield Frame(path.name, path.stem, _read_image(path))
    else:
        raise DemoError(f"--input {path}: no such file or folder")


def read_boxes(path: str | Path) -> dict[str, dict]:
    """A box file -> {frame key: {"right": (4,) tensor | None, "left": ... } or {"union": (4,) tensor}}."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DemoError(f"--boxes {path}: no such file") from None
    except json.JSONDecodeError as error:
        raise DemoError(f"--boxes {path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise DemoError(f"--boxes {path}: expected {{frame: [x0, y0, x1, y1]}} or {{frame: {{right: box, left: box}}}}")

    def box(value, where: str) -> Tensor:
        numbers = isinstance(value, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
        )
        if not (numbers and len(value) == 4):
            raise DemoError(f"--boxes {path}: {where}: expected [x0, y0, x1, y1] in pixels, got {value!r}")
        out = torch.tensor([float(v) for v in value])
        if not (out[2] > out[0] and out[3] > out[1]):
            raise DemoError(f"--boxes {path}: {where}: empty box {value}")
        return out

    boxes = {}
    for key, value in data.items():
        if isinstance(value, dict):
            unknown = set(value) - {"right", "left"}
            if unknown:
                raise DemoError(f"--boxes {path}: frame {key}: unknown keys {sorted(unknown)} (expected right, left)")
            boxes[str(key)] = {
                side: None if value.get(side) is None else box(value[side], f"frame {key} {side}") for side in ("right", "left")
            }
        else:
            boxes[str(key)] = {"union": box(value, f"frame {key}")}
    return boxes


def _overlaps_frame(box: Tensor, height: int, width: int) -> bool:
    """Whether an (x0, y0, x1, y1) pixel box shares some area with the ``width`` x ``height`` frame."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return x0 < width and y0 < height and x1 > 0 and y1 > 0


def _intrinsics(args, height: int, width: int) -> Tensor:
    focal = args.focal or [float(max(height, width))]
    if len(focal) not in (1, 2) or min(focal) <= 0:
        raise DemoError(f"--focal {focal}: expected one or two positive numbers (pixels)")
    focal = focal * 2 if len(focal) == 1 else focal
    princpt = args.princpt or [(width - 1) / 2.0, (height - 1) / 2.0]
    return make_intrinsics(focal, princpt)


def _input_batch(image: Tensor, K: Tensor, box: Tensor, input_size: tuple[int, int]):
    """(HandBatch of one crop, affine (2, 3) frame px -> input px) for the regressor."""
    height, width = input_size
    square = square_bbox(box.to(K.dtype), aspect=width / height)
    affine = bbox_crop_affine(square[None], (height, width))[0]
    crop = crop_image(image[None], affine[None], (height, width))[0].clamp(0, 1)
    empty = HandLabels.empty()
    sample = HandSample(
        image=crop,
        right=empty,
        left=HandLabels.empty(),
        rel_root=torch.zeros(3),
        rel_root_valid=torch.tensor(False),
        camera=Camera(K=transform_intrinsics(K, affine), dist=torch.zeros(4)),
        hand_type="interacting",
        meta={"dataset": "demo", "id": "frame", "is_synthetic": False},
    )
    return collate([sample]), square


@torch.no_grad()
def predict_frame(model, image: Tensor, K: Tensor, box: Tensor, input_size, device):
    """Run the regressor on the input crop of ``box`` (x0 y0 x1 y1, frame px) -> TwoHandOutput (B = 1)."""
    batch, _ = _input_batch(image, K, box, input_size)
    return model(batch.to(device))


def _whole(image: Tensor) -> Tensor:
    height, width = image.shape[-2:]
    return torch.tensor([0.0, 0.0, width - 1.0, height - 1.0])


def _has_box_net(model) -> bool:
    """InterWild-style: a box net and forward_hands (boxes and their confidences from the whole frame)."""
    return callable(getattr(model, "forward_hands", None)) and hasattr(model, "box_net")


def _union_box(boxes: list[Tensor], height: int, width: int) -> Tensor:
    """The union of hand boxes (frame px) grown by EXTEND, at least MIN_BOX_FRACTION of the frame's larger
    side (an untrained or unsure box net can predict empty boxes)."""
    stacked = torch.stack(boxes)
    union = scale_bbox(torch.cat([stacked[:, :2].amin(0), stacked[:, 2:].amax(0)]), EXTEND)
    centre = (union[:2] + union[2:]) / 2
    half = torch.clamp((union[2:] - union[:2]) / 2, min=MIN_BOX_FRACTION * max(height, width) / 2)
    return torch.cat([centre - half, centre + half])


@torch.no_grad()
def _interwild_boxes(model, image, K, input_size, device, threshold: float) -> dict:
    """InterWild's first pass on the whole frame -> {"right"/"left": box in frame px or None, confidences}."""
    whole = _whole(image)
    batch, square = _input_batch(image, K, whole, input_size)
    output = model(batch.to(device))
    affine = bbox_crop_affine(square[None], tuple(input_size))[0]  # frame px -> input px
    from hands.camera import apply_affine, invert_affine

    back = invert_affine(affine[None])[0]
    result, conf = {}, output.extras["box_conf"][0].cpu()
    for index, side in enumerate(("right", "left")):
        box_in = output.extras[f"{side}_box"][0].cpu()
        corners = apply_affine(box_in.view(1, 2, 2), back[None])[0].flatten()
        result[side] = corners if float(conf[index]) >= threshold else None
        result[f"{side}_conf"] = float(conf[index])
    return result


def _obj(path: Path, verts: np.ndarray, faces: np.ndarray) -> None:
    import trimesh

    path.parent.mkdir(parents=True, exist_ok=True)
    trimesh.Trimesh(vertices=verts.astype(np.float64), faces=faces, process=False).export(path)


def _placement_depth(K: Tensor, box: Tensor) -> float:
    """Depth (m) at which HAND_EXTENT_M spans the box (the overlay heuristic without an absolute root)."""
    size = float(torch.maximum(box[2] - box[0], box[3] - box[1]).clamp(min=1.0))
    return float(torch.sqrt(K[0, 0] * K[1, 1])) * HAND_EXTENT_M / size


def run(args: argparse.Namespace) -> dict:
    from eval.report import save_png
    from hands.render import render_hands
    from recon.test import load_regressor
    from recon.train import resolve_device

    from hands.paths import output_folder

    start = time.perf_counter()
    try:
        output_folder(args.out, "--out")
    except ValueError as error:
        raise DemoError(str(error)) from None
    for plugin in args.plugin:
        import_plugin(plugin)
    device = resolve_device(args.device, 0)
    model, info = load_regressor(args.ckpt, device=device, mano_dir=args.mano_dir)
    data_cfg = info.meta["config"]["data"]
    crop_mode, input_size = data_cfg["crop"], tuple(int(v) for v in data_cfg["image_size"])
    from hands.mano import HandModel

    hand_model = HandModel(mano_dir=args.mano_dir or info.meta["config"].get("mano_dir")).to(device)
    boxes = read_boxes(args.boxes) if args.boxes else None
    is_interwild = _has_box_net(model)
    detector, detector_size = (model, input_size) if is_interwild else (None, None)
    if args.detector and crop_mode in ("hands", "verts") and boxes is None:
        detector, detector_info = load_regressor(args.detector, device=device, mano_dir=args.mano_dir)
        if not _has_box_net(detector):
            raise DemoError(f"--detector {args.detector}: {detector_info.arch!r} has no box net (give an InterWild checkpoint)")
        detector_size = tuple(int(v) for v in detector_info.meta["config"]["data"]["image_size"])
    if crop_mode == "image":
        box_source = "whole frame (the checkpoint was trained on whole images)"
        if is_interwild and boxes is None:
            box_source += f"; InterWild's box net finds the hands (present when box_conf >= {args.hand_threshold})"
    elif boxes is not None:
        box_source = f"box file {args.boxes}"
    elif detector is not None:
        which = "the --detector checkpoint's" if detector is not model else "InterWild's"
        box_source = f"{which} box net on the whole frame (hand present when box_conf >= {args.hand_threshold})"
    else:
        box_source = "whole frame (no --boxes given and the regressor predicts no boxes)"
        print(
            f"recon.demo: {info.arch} was trained on crops around the hands; no --boxes file or --detector was given "
            "and it has no box net, so the whole frame is its input (pass --boxes FILE or --detector INTERWILD_CKPT)",
            file=sys.stderr,
        )
    out = Path(args.out)
    for sub in ("overlays", "json", "meshes"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    input_path = Path(args.input)
    is_video = input_path.is_file() and input_path.suffix.lower() in VIDEO_SUFFIXES
    writer = None
    if is_video:
        try:
            import imageio.v2 as imageio
            import imageio_ffmpeg  # noqa: F401  (the ffmpeg binary)
        except ImportError:
            raise DemoError(f"--input {input_path}: video needs imageio and imageio-ffmpeg: pip install 'attentionhand-aug[video]'") from None
        fps = video_fps(input_path)
        writer = imageio.get_writer(out / "overlay.mp4", fps=fps, codec="libx264", macro_block_size=1, quality=7)
    faces = {side: hand_model.faces_for(side).cpu().numpy() for side in ("right", "left")}
    frames_done = []
    try:
        for frame in iter_frames(input_path, args.max_frames):
            image = frame.image
            height, width = image.shape[-2:]
            K = _intrinsics(args, height, width)
            present = {"right": True, "left": True}
            confidences = {}
            box = _whole(image)
            if crop_mode in ("hands", "verts"):  # "verts" (IntagHand): no GT vertices here, the boxes stand in
                if boxes is not None:
                    entry = boxes.get(frame.key)
                    if entry is None:
                        raise DemoError(f"--boxes {args.boxes}: no entry for frame {frame.key!r}")
                    for name, given_box in entry.items():
                        if given_box is not None and not _overlaps_frame(given_box, height, width):
                            where = f"frame {frame.key}" + ("" if name == "union" else f" {name}")
                            raise DemoError(
                                f"--boxes {args.boxes}: {where}: box {[round(float(v), 1) for v in given_box]} lies "
                                f"wholly outside the {width}x{height} frame (x0, y0, x1, y1 in pixels of the frame)"
                            )
                    if "union" in entry:
                        box = _union_box([entry["union"]], height, width)
                    else:
                        present = {side: entry[side] is not None for side in ("right", "left")}
                        given = [entry[s] for s in ("right", "left") if entry[s] is not None]
                        if given:
                            box = _union_box(given, height, width)
                elif detector is not None:
                    found = _interwild_boxes(detector, image, K, detector_size, device, args.hand_threshold)
                    present = {side: found[side] is not None for side in ("right", "left")}
                    confidences = {side: found[f"{side}_conf"] for side in ("right", "left")}
                    given = [found[s] for s in ("right", "left") if found[s] is not None]
                    if given:
                        box = _union_box(given, height, width)
            record = {
                "frame": frame.key,
                "image_size": [int(height), int(width)],
                "K": K.tolist(),
                "input_box": [round(float(v), 2) for v in box],
                "units": "metres, OpenCV camera axes (x right, y down, z forward)",
                "joint_order": "hands.joints: wrist, thumb, index, middle, ring, pinky (knuckle to tip)",
                "hands": [],
            }
            overlay = image
            if any(present.values()):
                output = predict_frame(model, image, K, box, input_size, device)
                if crop_mode == "image" and is_interwild and boxes is None:
                    conf = output.extras["box_conf"][0].cpu()
                    confidences = {side: float(conf[i]) for i, side in enumerate(("right", "left"))}
                    present = {side: confidences[side] >= args.hand_threshold for side in ("right", "left")}
                root = output.extras.get("right_root_cam")
                absolute = root is not None
                if absolute:
                    right_wrist = root[0].cpu()
                    if not present["right"] and output.extras.get("left_root_cam") is not None:
                        right_wrist = output.extras["left_root_cam"][0].cpu() - output.rel_root[0].cpu()
                    placement = "predicted (the regressor's right_root_cam; left = right + rel_root)"
                else:
                    centre = torch.stack([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2, torch.tensor(1.0)])
                    ray = torch.linalg.inv(K) @ centre
                    right_wrist = ray * _placement_depth(K, box) - output.rel_root[0].cpu() / 2
                    placement = f"heuristic: hands centred on the input box's ray, {HAND_EXTENT_M} m extent filling the box"
                rel_root = output.rel_root[0].cpu()
                wrists = {"right": right_wrist, "left": right_wrist + rel_root}
                verts_cam = {}
                for side in ("right", "left"):
                    if not present[side]:
                        continue
                    verts, joints = (t[0].cpu() for t in output.side(side))
                    shift = wrists[side] if absolute else torch.zeros(3)
                    pose = getattr(output, f"{side}_mano_pose")
                    shape = getattr(output, f"{side}_mano_shape")
                    hand = {
                        "side": side,
                        "mano_pose": None if pose is None else pose[0].cpu().tolist(),
                        "mano_shape": None if shape is None else shape[0].cpu().tolist(),
                        "joints_cam": (joints + shift).tolist(),
                        "wrist_cam": wrists[side].tolist() if absolute else None,
                        "confidence": confidences.get(side),
                        "mesh": f"meshes/{frame.stem}_{side}.obj",
                    }
                    record["hands"].append(hand)
                    _obj(out / hand["mesh"], (verts + shift).numpy(), faces[side])
                    verts_cam[side] = verts + wrists[side]
                record["absolute"] = absolute
                record["joints_frame"] = "camera space" if absolute else "relative to each hand's own wrist (camera axes)"
                record["rel_root"] = rel_root.tolist() if all(present.values()) else None
                record["overlay_placement"] = placement
                zeros = torch.zeros(778, 3)
                render = render_hands(
                    verts_cam.get("right", zeros)[None].to(device),
                    verts_cam.get("left", zeros)[None].to(device),
                    hand_model.faces_for("right"),
                    hand_model.faces_for("left"),
                    K[None].to(device),
                    (int(height), int(width)),
                    right_valid=torch.tensor([present["right"]], device=device),
                    left_valid=torch.tensor([present["left"]], device=device),
                )
                mask = (render.side[0] > 0).cpu()[None].float() * args.alpha
                overlay = image * (1 - mask) + render.image[0].cpu() * mask
            (out / "json" / f"{frame.stem}.json").write_text(json.dumps(record, indent=1))
            save_png(overlay, out / "overlays" / f"{frame.stem}.png")
            if writer is not None:
                writer.append_data((overlay.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
            frames_done.append({"frame": frame.key, "stem": frame.stem, "hands": [h["side"] for h in record["hands"]]})
            print(f"{frame.key}: {len(record['hands'])} hand(s) {' '.join(h['side'] for h in record['hands'])}")
    finally:
        if writer is not None:
            writer.close()
    summary = {
        "checkpoint": str(info.json_path),
        "arch": info.arch,
        "input": str(input_path),
        "crop": crop_mode,
        "input_size": list(input_size),
        "boxes": box_source,
        "video": str(out / "overlay.mp4") if is_video else None,
        "frames": frames_done,
        "seconds": round(time.perf_counter() - start, 2),
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    print(f"recon.demo: {len(frames_done)} frame(s) -> {out} ({summary['seconds']} s; boxes: {box_source})")
    return summary


def _positive_int(text: str) -> int:
    from recon.train import positive_int

    return positive_int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m recon.demo", description="Run a regressor on your own images or videos.")
    parser.add_argument("--ckpt", required=True, help="a .json sidecar, a .safetensors file or a run folder")
    parser.add_argument("--input", required=True, help="an image, a folder of images, or a video")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--boxes", help="JSON {frame: [x0,y0,x1,y1]} or {frame: {right: box|null, left: box|null}}")
    parser.add_argument("--detector", help="an InterWild checkpoint whose box net finds the hands for another regressor")
    parser.add_argument("--focal", type=float, nargs="+", help="focal length(s) in pixels: F or FX FY")
    parser.add_argument("--princpt", type=float, nargs=2, metavar=("CX", "CY"), help="principal point in pixels")
    parser.add_argument("--hand-threshold", type=float, default=0.05, help="InterWild box confidence for a present hand")
    parser.add_argument("--alpha", type=float, default=0.7, help="overlay opacity")
    parser.add_argument("--max-frames", type=_positive_int, help="process at most this many frames")
    parser.add_argument("--mano-dir", help="MANO folder (default: the checkpoint's)")
    parser.add_argument("--plugin", action="append", default=[], help="module or .py file registering regressors")
    parser.add_argument("--device", default="auto")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from hands.mano import MANOError
    from recon.train import UsageError

    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (DemoError, UsageError, ckpt.CheckpointError, PluginError, MANOError) as error:
        print(f"recon.demo: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
