"""synthlab, the embedded benchmark: two-hand images rendered from a MANO-format hand, in IH2.6M's layout.

``python -m hands.datasets.synthlab --out DIR [--seed 0] [--sizes 5000 500 5000 500] [--resolution 256]
[--mano-dir DIR] [--viewpoints sphere|studio]`` writes, for each split, exactly what :class:`hands.datasets.ih26m.InterHand26M` reads::

    DIR/annotations/{split}/InterHand2.6M_{split}_{data,camera,joint_3d,MANO_NeuralAnnot}.json
    DIR/images/{split}/Capture{c}/{seq}/cam{k}/image{frame}.jpg
    DIR/captions/{split}.json      {annotation id: caption}
    DIR/synthlab.json              format version, seed, sizes, resolution, viewpoints, hand model fingerprint
                                   (written last: the folder is complete when it exists)

Splits mirror the paper's setting in miniature:

- ``train-lab``, ``test-lab``: plain dark backgrounds and even, white light (like IH2.6M's studio);
- ``train-wild``, ``test-wild``: cluttered procedural backgrounds (a scene palette: kitchen, office, garden,
  street, living room, beach), colour casts from the light, occluders, uneven lighting; the test split uses
  other seeds.

Each capture has a rig of 4 cameras looking at the hands from random directions (0.45-0.7 m away,
focal 1.2-1.6 x the image width); each time step draws a two-hand configuration (clasped, palms facing,
near each other, or one hand: :mod:`hands.datasets.poses`) whose hands are in view of every camera. By default
(``--viewpoints sphere``) cameras come from every direction with any roll and hands have uniformly random
orientations; ``--viewpoints studio`` holds the hands upright in front of a person and puts the cameras in front
of them with little roll, as in a capture studio (VIEWPOINTS; written to synthlab.json and the cache stamp). Hands
have per-vertex skin colours (a skin tone per person with smooth variation), Lambert + ambient shading
(:func:`hands.render.render_mesh`). Every image has a caption: a template sentence naming the hands'
action and, for wild images, the scene and the light. Deterministic for a seed; a tqdm bar shows progress.

Default sizes: 5,000 train-lab and train-wild, 500 test-lab and test-wild images at 256x256 (enough for a
regressor to learn from, issue 25); written in 148 s (11,000 images, one thread, load average ~1.3 on the 2-core
machine; about 75 images/s). Tests write a few images only (``sizes=``).

:class:`SynthLab` reads it (the IH2.6M reader + captions as ``meta["prompt"]``, ``meta["dataset"] =
"synthlab"``); :func:`ensure_synthlab` writes it once into ``hands.paths.cache_dir() / "synthlab"``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hands.datasets.common import DatasetError, load_json
from hands.datasets.ih26m import InterHand26M
from hands.datasets.layouts import IH26MWriter
from hands.datasets.poses import PoseSampler
from hands.joints import IH26M_TO_OURS

__all__ = ["SPLITS", "DEFAULT_SIZES", "VIEWPOINTS", "SynthLab", "write_synthlab", "ensure_synthlab", "cache_stamp", "cache_folder_name",
           "main"]

SPLITS = ("train-lab", "test-lab", "train-wild", "test-wild")
DEFAULT_SIZES = {"train-lab": 5000, "test-lab": 500, "train-wild": 5000, "test-wild": 500}
DEFAULT_RESOLUTION = 256
CAMERAS_PER_CAPTURE = 4
# how the rig's cameras and the hands' orientations are drawn (``viewpoints``):
#   sphere: cameras from every direction with any roll, hands at uniformly random orientations (the default):
#           every orientation of a hand in the camera frame is equally likely
#   studio: an IH2.6M-like capture: hands held upright in front of a person (PoseSampler's ``upright``), cameras
#           in front of them (azimuth within 80 degrees of the front, elevation -15 to 50 degrees, roll within 12
#           degrees): image up is about world up, and the data's mean hand is a hand, not a point
VIEWPOINTS = ("sphere", "studio")
# 3: default sizes 5000/500/5000/500 and a cache stamp that includes them; 2: joints regressed from the mesh
# (1: smplx's LBS joints). The cache folder is keyed by it, so an older cache is never read.
FORMAT_VERSION = 3

SKIN_TONES = np.array(
    [
        [0.96, 0.80, 0.69],
        [0.91, 0.72, 0.59],
        [0.84, 0.63, 0.49],
        [0.76, 0.54, 0.40],
        [0.62, 0.42, 0.30],
        [0.47, 0.31, 0.22],
        [0.36, 0.24, 0.17],
    ]
)
SCENES = {
    # name: (palette of RGB colours, caption phrase)
    "kitchen": ([[0.55, 0.38, 0.22], [0.85, 0.83, 0.78], [0.70, 0.52, 0.32], [0.35, 0.25, 0.18], [0.9, 0.9, 0.88]], "a cluttered kitchen"),
    "office": ([[0.45, 0.47, 0.50], [0.20, 0.30, 0.50], [0.85, 0.85, 0.82], [0.15, 0.15, 0.17], [0.6, 0.62, 0.66]], "a busy office"),
    "garden": ([[0.20, 0.45, 0.18], [0.35, 0.55, 0.22], [0.45, 0.35, 0.20], [0.62, 0.70, 0.35], [0.12, 0.28, 0.10]], "a leafy garden"),
    "street": ([[0.40, 0.40, 0.42], [0.60, 0.28, 0.22], [0.25, 0.25, 0.27], [0.75, 0.72, 0.65], [0.50, 0.50, 0.55]], "a city street"),
    "living room": ([[0.80, 0.72, 0.60], [0.60, 0.18, 0.15], [0.35, 0.28, 0.40], [0.90, 0.85, 0.75], [0.45, 0.30, 0.20]], "a cosy living room"),
    "beach": ([[0.88, 0.80, 0.60], [0.40, 0.65, 0.85], [0.95, 0.92, 0.85], [0.30, 0.50, 0.70], [0.80, 0.70, 0.50]], "a sunny beach"),
}
LIGHTS = {
    # name: (RGB tint of the light, caption phrase)
    "warm": ((1.12, 0.98, 0.78), "warm light"),
    "cool": ((0.82, 0.95, 1.15), "cool blue light"),
    "green": ((0.88, 1.1, 0.86), "greenish light"),
    "dim": ((0.7, 0.68, 0.66), "dim light"),
    "bright": ((1.1, 1.1, 1.08), "bright daylight"),
    "pink": ((1.12, 0.85, 0.98), "pink neon light"),
}
ACTIONS = {
    "clasp": ["clasping hands", "holding hands together", "interlocking the fingers of both hands"],
    "facing": ["pressing both hands together", "holding two hands palm to palm", "touching fingertips of both hands"],
    "near": ["gesturing with both hands", "raising two hands side by side", "moving both hands close together"],
}
GESTURE_PHRASES = {
    "open": "showing an open {side} hand",
    "relaxed": "holding up a relaxed {side} hand",
    "fist": "making a fist with the {side} hand",
    "point": "pointing a finger of the {side} hand",
    "peace": "making a peace sign with the {side} hand",
    "pinch": "pinching the fingers of the {side} hand",
    "random": "moving the fingers of the {side} hand",
}


# -- appearance ----------------------------------------------------------------------------------------------
def _noise(rng: np.random.Generator, size: int, octaves: int = 4, channels: int = 1) -> torch.Tensor:
    """Multi-octave value noise (channels, size, size) in about [-1, 1] (bilinear upsampling of random grids)."""
    out = torch.zeros(channels, size, size)
    for octave in range(octaves):
        cells = 2 ** (octave + 2)
        grid = torch.from_numpy(rng.uniform(-1, 1, size=(1, channels, cells, cells)).astype(np.float32))
        out += F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)[0] / (2**octave)
    return out / 1.9


def _shapes(rng: np.random.Generator, size: int, count: int, colors: np.ndarray, image: torch.Tensor, max_frac: float) -> torch.Tensor:
    """Draw ``count`` random ellipses, rectangles and stripes with textured fills onto image (3, S, S)."""
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    texture = 1.0 + 0.15 * _noise(rng, size, octaves=3)  # one texture per call, shifted per shape
    for _ in range(count):
        color = torch.tensor(colors[rng.integers(len(colors))], dtype=torch.float32) * float(rng.uniform(0.7, 1.2))
        cx, cy = rng.uniform(0, size, size=2)
        rx, ry = rng.uniform(0.04, max_frac, size=2) * size
        kind = rng.integers(3)
        angle = rng.uniform(0, math.pi)
        u = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)
        v = -(xx - cx) * math.sin(angle) + (yy - cy) * math.cos(angle)
        if kind == 0:
            mask = (u / rx) ** 2 + (v / ry) ** 2 <= 1
        elif kind == 1:
            mask = (u.abs() <= rx) & (v.abs() <= ry)
        else:
            mask = (v.abs() <= ry * 0.25) & (u.abs() <= size)
        shift = [int(v) for v in rng.integers(0, size, size=2)]
        stripes = 1.0 + 0.1 * torch.sin(u / rng.uniform(2.0, 8.0)) if rng.random() < 0.4 else 1.0
        fill = (color[:, None, None] * texture.roll(shift, (1, 2)) * stripes).clamp(0, 1)
        image = torch.where(mask[None], fill, image)
    return image


def lab_background(rng: np.random.Generator, size: int) -> torch.Tensor:
    """A plain dark studio background (3, S, S): dark grey with faint noise."""
    level = rng.uniform(0.03, 0.12)
    tint = rng.uniform(0.9, 1.1, size=3)
    base = torch.tensor(level * tint, dtype=torch.float32)[:, None, None].expand(3, size, size)
    return (base + 0.01 * _noise(rng, size, octaves=3)).clamp(0, 1)


def wild_background(rng: np.random.Generator, size: int, scene: str) -> torch.Tensor:
    """A cluttered procedural background (3, S, S) in the palette of ``scene``; drawn at half resolution
    and upsampled (backgrounds are smooth; this halves the writer's time)."""
    half = max(size // 2, 16)
    image = _wild_background(rng, half, scene)
    return F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False)[0].clamp(0, 1)


def _wild_background(rng: np.random.Generator, size: int, scene: str) -> torch.Tensor:
    palette = np.array(SCENES[scene][0])
    base = torch.tensor(palette[rng.integers(len(palette))], dtype=torch.float32)[:, None, None]
    image = (base * (1.0 + 0.25 * _noise(rng, size))).expand(3, size, size).clamp(0, 1)
    image = image + 0.08 * _noise(rng, size, channels=3)
    # a horizontal surface (table, floor, ground) in the lower part
    if rng.random() < 0.7:
        horizon = int(rng.uniform(0.45, 0.8) * size)
        surface = torch.tensor(palette[rng.integers(len(palette))], dtype=torch.float32)[:, None, None]
        grain = 1.0 + 0.2 * _noise(rng, size, octaves=5)
        image = image.clone()
        image[:, horizon:] = (surface * grain[:, horizon:]).expand(3, -1, -1)
    image = _shapes(rng, size, int(rng.integers(6, 14)), palette, image.clamp(0, 1), max_frac=0.25)
    return image.clamp(0, 1)


def skin_colors(rng: np.random.Generator, rest_verts: np.ndarray) -> torch.Tensor:
    """Per-vertex skin colour (V, 3): a tone from SKIN_TONES with smooth variation over the rest mesh."""
    tone = SKIN_TONES[rng.integers(len(SKIN_TONES))] * rng.uniform(0.93, 1.07, size=3)
    variation = np.zeros(len(rest_verts))
    for _ in range(3):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        variation += np.sin(rest_verts @ direction * rng.uniform(60, 160) + rng.uniform(0, 2 * math.pi))
    colors = tone[None] * (1.0 + 0.04 * variation[:, None]) + rng.normal(0, 0.01, size=(len(rest_verts), 3))
    return torch.from_numpy(np.clip(colors, 0, 1).astype(np.float32))


def uneven_light(rng: np.random.Generator, size: int) -> torch.Tensor:
    """A smooth light field (1, S, S): a linear ramp and an off-centre spot, about 0.55..1.35."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    angle = rng.uniform(0, 2 * math.pi)
    ramp = 1.0 + rng.uniform(0.15, 0.35) * (xx * math.cos(angle) + yy * math.sin(angle))
    sx, sy = rng.uniform(-0.8, 0.8, size=2)
    spot = rng.uniform(0.1, 0.35) * torch.exp(-((xx - sx) ** 2 + (yy - sy) ** 2) / rng.uniform(0.2, 0.6))
    return (ramp + spot)[None]


# -- cameras -------------------------------------------------------------------------------------------------
def look_at(position: np.ndarray, target: np.ndarray, roll: float) -> np.ndarray:
    """World -> camera rotation (3, 3) of a camera at ``position`` looking at ``target`` (+z forward,
    +y down in the image), rolled by ``roll`` radians about its axis."""
    forward = target - position
    forward /= np.linalg.norm(forward)
    up_hint = np.array([0.0, 0.0, 1.0]) if abs(forward[2]) < 0.9 else np.array([0.0, 1.0, 0.0])
    right = np.cross(forward, up_hint)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    R = np.stack([right, down, forward])  # rows: camera axes in world coordinates
    c, s = math.cos(roll), math.sin(roll)
    roll_matrix = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return roll_matrix @ R


def random_rig(rng: np.random.Generator, resolution: int, count: int, viewpoints: str = "sphere") -> list[dict]:
    """``count`` cameras around the world origin: R (3, 3), position (3,) metres, focal (2,), princpt (2,);
    directions and roll as ``viewpoints`` says (VIEWPOINTS)."""
    if viewpoints not in VIEWPOINTS:
        raise ValueError(f"synthlab: unknown viewpoints {viewpoints!r}; known: {', '.join(VIEWPOINTS)}")
    studio = viewpoints == "studio"
    rig = []
    for _ in range(count):
        if studio:  # in front of the person (who stands at +y and faces -y)
            azimuth, elevation = math.radians(rng.uniform(-80, 80)), math.radians(rng.uniform(-15, 50))
            direction = np.array(
                [math.sin(azimuth) * math.cos(elevation), -math.cos(azimuth) * math.cos(elevation), math.sin(elevation)]
            )
        else:
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction)
        position = direction * rng.uniform(0.45, 0.7)
        target = rng.uniform(-0.02, 0.02, size=3)
        focal = rng.uniform(1.2, 1.6) * resolution
        focal = np.array([focal, focal * rng.uniform(0.99, 1.01)])
        princpt = np.array([(resolution - 1) / 2, (resolution - 1) / 2]) + rng.uniform(-3, 3, size=2)
        roll = math.radians(rng.uniform(-12, 12)) if studio else rng.uniform(-math.pi, math.pi)
        rig.append({"R": look_at(position, target, roll), "position": position, "focal": focal, "princpt": princpt})
    return rig


def _project(points_world: np.ndarray, cam: dict) -> tuple[np.ndarray, np.ndarray]:
    cam_points = (points_world - cam["position"]) @ cam["R"].T
    z = cam_points[..., 2]
    uv = cam_points[..., :2] / np.maximum(z, 1e-6)[..., None] * cam["focal"] + cam["princpt"]
    return uv, z


# -- writer --------------------------------------------------------------------------------------------------
def _caption(rng: np.random.Generator, config: str, fits: dict, wild: dict | None) -> str:
    if config.startswith("single"):
        side = config.split("-")[1]
        action = GESTURE_PHRASES[fits[side].gesture].format(side=side)
    else:
        action = str(rng.choice(ACTIONS[config]))
    if wild is None:
        where = str(rng.choice(["in front of a plain dark background", "against a dark studio backdrop", "in a dark capture studio"]))
        return f"a person {action} {where} under even white light"
    return f"a person {action} in {SCENES[wild['scene']][1]} under {LIGHTS[wild['light']][1]}"


def _to_ih_order(joints_ours: np.ndarray, offset: int, out: np.ndarray) -> None:
    out[offset + np.array(IH26M_TO_OURS)] = joints_ours


def write_split(
    root: Path, split: str, count: int, *, seed: int, resolution: int, model, sampler: PoseSampler, progress=None,
    viewpoints: str = "sphere",
) -> int:
    """Write ``count`` images of ``split`` under ``root``; returns the number written."""
    from hands.render import render_mesh

    split_index = SPLITS.index(split) if split in SPLITS else len(SPLITS)
    rng = np.random.default_rng([seed, split_index, 7919])
    wild = split.endswith("wild")
    writer = IH26MWriter(root, split)
    captions: dict[str, str] = {}
    faces = {side: model.faces_for(side).cpu().long() for side in ("right", "left")}
    num_verts = 778
    with torch.no_grad():
        rest_right = model("right", torch.zeros(1, 48), torch.zeros(1, 10)).verts[0].numpy()
    written, capture, frames_per_capture = 0, 0, 12
    margin = 0.04 * resolution
    while written < count:
        rig = random_rig(rng, resolution, CAMERAS_PER_CAPTURE, viewpoints)
        for k, cam in enumerate(rig):
            writer.add_camera(capture, str(400000 + k), cam["R"], cam["position"], cam["focal"], cam["princpt"])
        for frame in range(frames_per_capture):
            if written >= count:
                break
            # a configuration in view of every camera of the rig
            for _attempt in range(30):
                config, fits = sampler.sample_frame(rng)
                outputs = {}
                for side, fit in fits.items():
                    if fit is not None:
                        verts, _ = sampler.forward(side, fit.pose[None], fit.shape[None], fit.trans[None])
                        # the joints are regressed from the mesh (+ tips), InterWild's definition (get_coord)
                        joints = model.regress_joints(side, torch.from_numpy(verts[0])).numpy()
                        outputs[side] = (verts[0], joints)
                points = np.concatenate([v for v, _ in outputs.values()])
                visible = True
                for cam in rig:
                    uv, z = _project(points, cam)
                    if (z < 0.2).any() or (uv < margin).any() or (uv > resolution - 1 - margin).any():
                        visible = False
                        break
                if visible:
                    break
            joints_world = np.zeros((42, 3))
            joint_valid = np.zeros(42, dtype=int)
            for side, offset in (("right", 0), ("left", 21)):
                if side in outputs:
                    _to_ih_order(outputs[side][1], offset, joints_world)
                    joint_valid[offset : offset + 21] = 1
            writer.add_frame(
                capture,
                frame,
                joints_world,
                joint_valid,
                {side: (None if fit is None else {"pose": fit.pose, "shape": fit.shape, "trans": fit.trans}) for side, fit in fits.items()},
            )
            hand_type = "interacting" if len(outputs) == 2 else next(iter(outputs))
            colors = skin_colors(rng, rest_right)
            # render every camera of the frame in one batch
            verts_world = np.concatenate(
                [outputs[s][0] if s in outputs else np.zeros((num_verts, 3)) for s in ("right", "left")]
            )  # (2V, 3)
            Rs = np.stack([cam["R"] for cam in rig])
            verts_cam = torch.from_numpy(np.einsum("kij,vj->kvi", Rs, verts_world) - np.einsum("kij,kj->ki", Rs, np.stack([c["position"] for c in rig]))[:, None]).float()
            Ks = torch.tensor(
                np.stack([[[c["focal"][0], 0, c["princpt"][0]], [0, c["focal"][1], c["princpt"][1]], [0, 0, 1]] for c in rig]),
                dtype=torch.float32,
            )
            all_faces = torch.cat([faces["right"], faces["left"] + num_verts])
            face_valid = torch.cat(
                [torch.full((len(faces["right"]),), "right" in outputs), torch.full((len(faces["left"]),), "left" in outputs)]
            )[None].expand(len(rig), -1)
            vertex_colors = torch.cat([colors, colors]).expand(len(rig), -1, -1)
            n_frame = min(len(rig), count - written)
            if wild:
                light_dirs = [np.array([rng.uniform(-0.8, 0.8), rng.uniform(-0.8, 0.8), -1.0]) for _ in rig]
                ambient = float(rng.uniform(0.25, 0.5))
            else:
                light_dirs = [np.array([rng.uniform(-0.1, 0.1), rng.uniform(-0.1, 0.1), -1.0]) for _ in rig]
                ambient = 0.5
            render = render_mesh(
                verts_cam,
                all_faces,
                Ks,
                (resolution, resolution),
                vertex_colors=vertex_colors,
                face_valid=face_valid,
                light_dir=torch.tensor(np.stack(light_dirs), dtype=torch.float32),
                ambient=ambient,
            )
            for k in range(n_frame):
                cam = rig[k]
                scene_info = None
                if wild:
                    scene = str(rng.choice(list(SCENES)))
                    light = str(rng.choice(list(LIGHTS)))
                    scene_info = {"scene": scene, "light": light}
                    background = wild_background(rng, resolution, scene)
                    image = torch.where(render.mask[k][None], render.image[k], background)
                    if rng.random() < 0.6:  # occluders in front of the hands
                        image = _shapes(rng, resolution, int(rng.integers(1, 3)), np.array(SCENES[scene][0]), image, max_frac=0.12)
                    tint = torch.tensor(LIGHTS[light][0], dtype=torch.float32)[:, None, None]
                    image = (image * tint * uneven_light(rng, resolution)).clamp(0, 1)
                else:
                    background = lab_background(rng, resolution)
                    image = torch.where(render.mask[k][None], render.image[k], background)
                uv, _ = _project(joints_world[joint_valid.astype(bool)], cam)
                lo, hi = uv.min(0), uv.max(0)
                centre, half = (lo + hi) / 2, (hi - lo) / 2 * 1.2
                box = np.concatenate([centre - half, 2 * half])
                cam_name = str(400000 + k)
                file_name = f"Capture{capture}/{config}/cam{cam_name}/image{frame:05d}.jpg"
                aid = writer.add_image(
                    file_name,
                    size=(resolution, resolution),
                    capture=capture,
                    camera=cam_name,
                    frame_idx=frame,
                    seq_name=config,
                    hand_type=hand_type,
                    bbox_xywh=box,
                    joint_valid=joint_valid,
                    image=image,
                )
                captions[str(aid)] = _caption(rng, config, fits, scene_info)
                written += 1
                if progress is not None:
                    progress.update(1)
        capture += 1
    writer.write()
    (root / "captions").mkdir(parents=True, exist_ok=True)
    with open(root / "captions" / f"{split}.json", "w") as f:
        json.dump(captions, f, indent=0)
    return written


def write_synthlab(
    out: str | Path,
    *,
    seed: int = 0,
    sizes: dict | None = None,
    resolution: int = DEFAULT_RESOLUTION,
    mano_dir: str | Path | None = None,
    hand_model=None,
    show_progress: bool = True,
    viewpoints: str = "sphere",
) -> Path:
    """Write synthlab into ``out`` (created; existing files of the same splits are overwritten).

    sizes: {split: number of images} (missing splits: DEFAULT_SIZES; 0 skips a split).
    viewpoints: ``sphere`` (default) or ``studio`` (VIEWPOINTS).
    Returns ``out``. synthlab.json is written last.
    """
    from tqdm import tqdm

    if resolution < 32:
        raise ValueError(f"synthlab: resolution must be at least 32 px, got {resolution}")
    if viewpoints not in VIEWPOINTS:
        raise ValueError(f"synthlab: unknown viewpoints {viewpoints!r}; known: {', '.join(VIEWPOINTS)}")
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"synthlab: unknown split(s) {sorted(unknown)}; known: {', '.join(SPLITS)}")
    if hand_model is None:
        from hands.mano import HandModel

        hand_model = HandModel(mano_dir=mano_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    total = sum(sizes.values())
    # Small per-image tensor work: one thread is faster than two fighting over the cores (measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sampler = PoseSampler(hand_model, orientation="upright" if viewpoints == "studio" else "uniform")
        with tqdm(total=total, desc="synthlab", unit="img", disable=not show_progress) as bar:
            for split in SPLITS:
                if sizes[split] > 0:
                    write_split(out, split, sizes[split], seed=seed, resolution=resolution, model=hand_model, sampler=sampler, progress=bar,
                                viewpoints=viewpoints)
    finally:
        torch.set_num_threads(threads)
    info = {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "sizes": sizes,
        "resolution": resolution,
        "viewpoints": viewpoints,
        "hand_model_fingerprint": hand_model.fingerprint(),
        "hand_model_procedural": bool(hand_model.is_procedural),
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "synthlab.json").write_text(json.dumps(info, indent=1))
    return out


_HOST = socket.gethostname().replace("-", "_")


def _remove_stale_partials(folder: Path) -> int:
    """Delete the ``.synthlab-<host>-<pid>-*`` folders of writers on this host that are gone (a killed first
    use); a live writer's folder and other hosts' (a shared cache) are left alone. Returns how many."""
    removed = 0
    for path in folder.glob(f".synthlab-{_HOST}-*-*"):
        pid = path.name[len(f".synthlab-{_HOST}-"):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still writing
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError, OSError):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    return removed


def cache_stamp(options: dict) -> dict:
    """What a cached synthlab must have been written with for ``options`` (ensure_synthlab's): format version,
    seed, sizes per split, resolution, and the viewpoints when they are not the default ``sphere`` (so that the
    default's stamp, and its cache folder, are those of the writers before the option; the hand model is in the
    folder's name and checked by the reader)."""
    stamp = {
        "format_version": FORMAT_VERSION,
        "seed": int(options.get("seed", 0)),
        "sizes": {**DEFAULT_SIZES, **(options.get("sizes") or {})},
        "resolution": int(options.get("resolution", DEFAULT_RESOLUTION)),
    }
    if options.get("viewpoints", "sphere") != "sphere":
        stamp["viewpoints"] = options["viewpoints"]
    return stamp


def cache_folder_name(fingerprint: str, options: dict) -> str:
    """``<hand model fingerprint[:16]>-v<FORMAT_VERSION>-<first 8 hex of the stamp's sha1>``: the default
    cache folder of a synthlab written with ``options`` (see :func:`ensure_synthlab`)."""
    stamp = json.dumps(cache_stamp(options), sort_keys=True)
    return f"{fingerprint[:16]}-v{FORMAT_VERSION}-{hashlib.sha1(stamp.encode()).hexdigest()[:8]}"


def _stamp_of(root: Path) -> dict | None:
    try:
        info = json.loads((root / "synthlab.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    stamp = {key: info.get(key) for key in ("format_version", "seed", "sizes", "resolution")}
    if info.get("viewpoints", "sphere") != "sphere":
        stamp["viewpoints"] = info["viewpoints"]
    return stamp


def ensure_synthlab(root: str | Path | None = None, **options) -> Path:
    """The synthlab folder, written on first use: ``root`` or
    ``hands.paths.cache_dir() / "synthlab" / <hand model fingerprint>-v<FORMAT_VERSION>-<stamp hash>``.

    The default folder is keyed by the hand model's fingerprint, the format version and a hash of the
    cache's stamp (:func:`cache_stamp`: format version, seed, sizes, resolution, and viewpoints when not the
    default sphere), so a changed hand model
    (another ``mano_dir``, a new version of the procedural hand), a changed label definition or other sizes
    get their own benchmark instead of a stale one, and writing one never touches a folder another process
    may be reading (a synthlab of other sizes is another folder; old ones stay until the user deletes them).
    A cached folder whose synthlab.json does not match its stamp (edited by hand) is written again. A
    ``root`` given by the caller is the caller's: a complete one is returned as it is (its synthlab.json
    says how it was written).
    Written into a temporary sibling folder (``.synthlab-<host>-<pid>-*``) and renamed into place, so an
    interrupted run leaves no half-written benchmark; such a folder left by a killed writer on this host is
    deleted by the next first use. ``options`` go to :func:`write_synthlab` (seed, sizes, resolution, viewpoints,
    mano_dir, hand_model).
    """
    cached = root is None
    if root is None:
        from hands.paths import cache_dir

        model = options.get("hand_model")
        if model is None:
            from hands.mano import HandModel

            model = options["hand_model"] = HandModel(mano_dir=options.get("mano_dir"))
        root = cache_dir() / "synthlab" / cache_folder_name(model.fingerprint(), options)
    root = Path(root)
    stale = None
    if (root / "synthlab.json").is_file():
        if not cached or _stamp_of(root) == cache_stamp(options):
            return root
        stale = _stamp_of(root)
    elif root.exists() and any(root.iterdir()):
        raise DatasetError(f"{root}: exists but has no synthlab.json (an incomplete synthlab?); remove it and retry")
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(root.parent)
    if stale is not None:
        print(
            f"synthlab: the cache {root} was written with {stale}, not {cache_stamp(options)}; writing it again",
            file=sys.stderr,
        )
    tmp = Path(tempfile.mkdtemp(prefix=f".synthlab-{_HOST}-{os.getpid()}-", dir=root.parent))
    try:
        write_synthlab(tmp, **options)
        try:
            if stale is not None:  # move the old cache aside (a sibling temporary name), then swap
                old = Path(tempfile.mkdtemp(prefix=f".synthlab-{_HOST}-{os.getpid()}-old-", dir=root.parent))
                os.replace(root, old / "synthlab")
                shutil.rmtree(old, ignore_errors=True)
            elif root.exists():
                root.rmdir()  # an empty folder left by the user; a finished one from a racing process stays
            os.replace(tmp, root)
        except OSError:
            if _stamp_of(root) == cache_stamp(options):  # another process finished first
                return root
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


# -- reader --------------------------------------------------------------------------------------------------
class SynthLab(InterHand26M):
    """synthlab as HandSamples: the IH2.6M reader on synthlab's folder, with ``meta["prompt"]`` captions.

    Args:
        root: the synthlab folder; None = :func:`ensure_synthlab` (written on first use).
        split: one of SPLITS.
        hand_model / mano_dir: must be the hand model synthlab was written with (checked by fingerprint).
    """

    name = "synthlab"

    def __init__(self, root: str | Path | None, split: str, *, hand_model=None, mano_dir=None, with_mano: bool = True) -> None:
        if split not in SPLITS:
            raise ValueError(f"synthlab: unknown split {split!r}; known: {', '.join(SPLITS)}")
        root = ensure_synthlab(root, mano_dir=mano_dir, hand_model=hand_model) if root is None else Path(root)
        self.info = load_json(Path(root) / "synthlab.json", "synthlab's description (written last by the writer)")
        super().__init__(root, split, hand_model=hand_model, mano_dir=mano_dir, with_mano=with_mano, human_annot=False)
        captions = load_json(self.root / "captions" / f"{split}.json", "captions {annotation id: text}")
        self.captions = {str(k): v for k, v in captions.items() if isinstance(v, str)}

    def _model(self):
        model = super()._model()
        expected = self.info.get("hand_model_fingerprint")
        if expected is not None and not getattr(self, "_fingerprint_checked", False):
            if model.fingerprint() != expected:
                raise DatasetError(
                    f"{self.root / 'synthlab.json'}: written with another hand model (fingerprint {expected[:12]}...); "
                    f"read it with the same mano_dir, or delete {self.root} to write it again with this model"
                )
            self._fingerprint_checked = True
        return model

    def load(self, record: dict, with_image: bool = True):
        sample = super().load(record, with_image=with_image)
        sample.meta["prompt"] = self.captions.get(str(record["aid"]), "a photo of two hands")
        return sample


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hands.datasets.synthlab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to write (created)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sizes", type=int, nargs=4, metavar=("TRAIN_LAB", "TEST_LAB", "TRAIN_WILD", "TEST_WILD"),
        default=[DEFAULT_SIZES[s] for s in SPLITS], help="images per split",
    )
    parser.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION, help="square image size in pixels")
    parser.add_argument("--mano-dir", type=Path, default=None, help="folder with MANO_RIGHT.pkl / MANO_LEFT.pkl")
    parser.add_argument(
        "--viewpoints", choices=VIEWPOINTS, default="sphere",
        help="sphere: cameras from every direction, hands at any orientation (default); studio: hands held upright "
        "in front of a person, cameras in front of them, little roll (an IH2.6M-like capture)",
    )
    args = parser.parse_args(argv)
    if any(s < 0 for s in args.sizes):
        parser.error("--sizes must be non-negative")
    try:
        if args.out.exists() and not args.out.is_dir():
            raise ValueError(f"--out {args.out}: is a file; expected a folder")
        out = write_synthlab(
            args.out, seed=args.seed, sizes=dict(zip(SPLITS, args.sizes)), resolution=args.resolution, mano_dir=args.mano_dir,
            viewpoints=args.viewpoints,
        )
    except (ValueError, OSError) as error:  # bad sizes or resolution, a bad MANO folder, an unwritable --out
        parser.exit(2, f"{parser.prog}: error: {' '.join(str(error).split())}\n")
    info = json.loads((out / "synthlab.json").read_text())
    print(f"synthlab written to {out} ({sum(info['sizes'].values())} images, {info['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
