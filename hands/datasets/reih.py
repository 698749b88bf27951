"""ReInterHand (ReIH) in its released layout (FACTS.md §2; InterWild's loader for the folder names).

Layout under ``root`` (or ``root/data``), one folder per capture::

    {capture}/Mugsy_cameras/cam_params.json                       {camera: {R, t (mm), focal, princpt}}
    {capture}/Mugsy_cameras/{envmap}/images/{camera}/%06d.png     third-person views
    {capture}/Ego_cameras/{envmap}/images/%06d.png                egocentric views (fisheye)
    {capture}/Ego_cameras/{envmap}/cam_params/%06d.json           {R, t (mm), focal, princpt, D}
    {capture}/Ego_cameras/{envmap}/truncation_ratio.json          {"%06d": ratio}
    {capture}/frame_list.txt                                      "<anything> <frame_idx>" per line
    {capture}/orig_fits/{right,left}/Keypoints/keypoint-%06d.json 24 joints, world, mm
    {capture}/mano_fits/params/{frame}_{side}.json                {pose, shape, trans}, world, metres

``envmap`` is ``envmap_per_frame`` (Mugsy views rendered at 5 fps: frames are the image files found) or
``envmap_per_segment`` (frames from frame_list.txt, like every egocentric setting). Egocentric frames whose
truncation ratio is below 0.2 are left out, as InterWild does (counted as "filtered: truncation ratio").

Test split = the captures whose id holds RNS217, NKC880 or QZX685; train = the others.
Cameras: ``X_cam = R X_world + t``; the fisheye coefficients ``D`` (k1..k4, OpenCV fisheye) are kept in
``sample.camera.dist`` and used for ``joints_img``. Keypoints: 24 per hand (wrist, thumb 0-4, index 1-4,
middle 1-4, ring 1-4, pinky 0-4, forearm stub); we keep the 21 of MANO's joint set (thumb 0, pinky 0 and
the forearm stub are dropped), see :data:`REIH_TO_OURS`. ``rel_root`` comes from the keypoint wrists.
"""
from __future__ import annotations

import math

from pathlib import Path

import numpy as np
import torch

from hands.datasets.common import (
    BadRecord,
    DatasetError,
    HandDataset,
    as_bounded,
    as_rotation,
    assemble_sample,
    image_size,
    load_image,
    load_json,
    make_hand_labels,
    require_dir,
    require_file,
)
from hands.sample import SIDES
from hands.units import mm_to_m

__all__ = ["ReInterHand", "REIH_TO_OURS", "TEST_CAPTURE_KEYS"]

# ReIH's 24 keypoints: 0 wrist, 1-5 thumb 0-4, 6-9 index 1-4, 10-13 middle 1-4, 14-17 ring 1-4,
# 18-22 pinky 0-4, 23 forearm stub. Rows for our 21 (wrist, thumb 1-4, index 1-4, ..., pinky 1-4).
REIH_TO_OURS = (0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 19, 20, 21, 22)
TEST_CAPTURE_KEYS = ("RNS217", "NKC880", "QZX685")
ENVMAPS = ("envmap_per_frame", "envmap_per_segment")


def _camera(params: dict, where: str) -> dict:
    if not isinstance(params, dict):
        raise BadRecord(f"{where}: camera not an object")
    try:
        cam = {
            "R": as_rotation(params["R"], "R"),
            "t": mm_to_m(as_bounded(params["t"], (3,), "t", 1e6)),
            "focal": as_bounded(params["focal"], (2,), "focal", 1e6),
            "princpt": as_bounded(params["princpt"], (2,), "princpt", 1e6),
        }
        cam["D"] = as_bounded(params["D"], (4,), "D", 10.0) if "D" in params else np.zeros(4)
    except KeyError as missing:
        raise BadRecord(f"{where}: camera missing key {missing}") from None
    if (cam["focal"] <= 0).any():
        raise BadRecord(f"{where}: focal not positive")
    return cam



def _finite_number(value) -> bool:
    """A JSON number (not a bool) that is finite as a float; an integer too large for a float is not."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False

class ReInterHand(HandDataset):
    """ReInterHand as HandSamples.

    Args:
        root: the folder of capture folders (or its parent holding ``data/``).
        split: "train" | "test".
        cameras: "mugsy" (third-person) | "ego" (egocentric fisheye).
        envmap: "envmap_per_frame" | "envmap_per_segment".
        hand_model / mano_dir / with_mano: as for :class:`hands.datasets.ih26m.InterHand26M`.
    """

    name = "reih"

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        cameras: str = "mugsy",
        envmap: str = "envmap_per_frame",
        hand_model=None,
        mano_dir: str | Path | None = None,
        with_mano: bool = True,
    ) -> None:
        super().__init__()
        if split not in ("train", "test"):
            raise ValueError(f"reih: split must be 'train' or 'test', got {split!r}")
        if cameras not in ("mugsy", "ego"):
            raise ValueError(f"reih: cameras must be 'mugsy' or 'ego', got {cameras!r}")
        if envmap not in ENVMAPS:
            raise ValueError(f"reih: envmap must be one of {ENVMAPS}, got {envmap!r}")
        self.split, self.cameras, self.envmap = split, cameras, envmap
        self.hand_model, self.mano_dir, self.with_mano = hand_model, mano_dir, with_mano
        root = require_dir(Path(root).expanduser(), "the ReInterHand root with one folder per capture")
        if not self._captures_in(root) and (root / "data").is_dir():
            root = root / "data"
        self.root = root
        captures = self._captures_in(root)
        if not captures:
            raise DatasetError(f"{root}: expected ReInterHand capture folders (each with orig_fits/), found none")
        def is_test(name: str) -> bool:
            return any(key in name.split("--") or key in name for key in TEST_CAPTURE_KEYS)
        self.capture_ids = [c for c in captures if is_test(c) == (split == "test")]
        if not self.capture_ids:
            raise DatasetError(f"{root}: no {split} capture found (test captures hold {', '.join(TEST_CAPTURE_KEYS)})")
        self._frames: dict[tuple[str, int], dict | BadRecord] = {}
        for capture in self.capture_ids:
            if cameras == "mugsy":
                self._index_mugsy(capture)
            else:
                self._index_ego(capture)

    @staticmethod
    def _captures_in(root: Path) -> list[str]:
        return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "orig_fits").is_dir())

    # -- index ----------------------------------------------------------------------------------------------
    def _frame_list(self, capture: str) -> list[int]:
        path = require_file(self.root / capture / "frame_list.txt", "frame list, '<name> <frame_idx>' per line")
        frames = []
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                try:
                    frames.append(int(parts[1] if len(parts) > 1 else parts[0]))
                except ValueError:
                    raise DatasetError(f"{path}:{number}: expected '<name> <frame_idx>', got {line.strip()[:40]!r}") from None
        return frames

    def _index_mugsy(self, capture: str) -> None:
        base = require_dir(self.root / capture / "Mugsy_cameras", "third-person cameras")
        params = load_json(base / "cam_params.json", "camera parameters {camera: {R, t, focal, princpt}}")
        image_root = require_dir(base / self.envmap / "images", "one image folder per camera")
        frame_list = self._frame_list(capture) if self.envmap == "envmap_per_segment" else None
        for cam_name in sorted(params):
            try:
                cam = _camera(params[cam_name], f"camera {cam_name}")
            except BadRecord as bad:
                self.skip(bad.reason.split(": ", 1)[-1])
                continue
            cam_dir = image_root / cam_name
            if frame_list is None:
                frames = sorted(int(p.stem) for p in cam_dir.glob("*.png") if p.stem.isdigit()) if cam_dir.is_dir() else []
            else:
                frames = frame_list
            for frame in frames:
                self._add(capture, frame, cam, cam_dir / f"{frame:06d}.png", cam_name)

    def _index_ego(self, capture: str) -> None:
        base = require_dir(self.root / capture / "Ego_cameras" / self.envmap, "egocentric views")
        ratios = load_json(base / "truncation_ratio.json", "per-frame truncation ratios {'%06d': ratio}")
        for frame in self._frame_list(capture):
            ratio = ratios.get(f"{frame:06d}")
            if not _finite_number(ratio):
                self.skip("truncation ratio missing")
                continue
            if ratio < 0.2:
                self.skip("filtered: truncation ratio < 0.2")
                continue
            cam_path = base / "cam_params" / f"{frame:06d}.json"
            try:
                cam = _camera(load_json(cam_path, "egocentric camera of one frame"), "ego camera")
            except DatasetError:
                self.skip("ego camera file missing or unreadable")
                continue
            except BadRecord as bad:
                self.skip(bad.reason.split(": ", 1)[-1])
                continue
            self._add(capture, frame, cam, base / "images" / f"{frame:06d}.png", "ego")

    def _frame(self, capture: str, frame: int) -> dict:
        """Keypoints (world, metres, 24 per hand) and fits of one time step, cached; BadRecord when bad."""
        key = (capture, frame)
        if key not in self._frames:
            try:
                self._frames[key] = self._read_frame(capture, frame)
            except BadRecord as bad:
                self._frames[key] = bad
        value = self._frames[key]
        if isinstance(value, BadRecord):
            raise BadRecord(value.reason)
        return value

    def _read_frame(self, capture: str, frame: int) -> dict:
        folder = self.root / capture
        out = {"joints": {}, "fits": {}}
        for side in SIDES:
            path = folder / "orig_fits" / side / "Keypoints" / f"keypoint-{frame:06d}.json"
            if not path.is_file():
                raise BadRecord("keypoint file missing")
            try:
                values = load_json(path, "24 keypoints", expect=list)
            except DatasetError:
                raise BadRecord("keypoint file not valid JSON") from None
            out["joints"][side] = mm_to_m(as_bounded(values, (24, 3), "keypoints", 1e6))
            out["fits"][side] = None
            fit_path = folder / "mano_fits" / "params" / f"{frame}_{side}.json"
            if self.with_mano and fit_path.is_file():
                try:
                    fit = load_json(fit_path, "a MANO fit {pose, shape, trans}")
                    out["fits"][side] = {
                        "pose": as_bounded(fit["pose"], (48,), "mano pose", 4 * np.pi),
                        "shape": as_bounded(fit["shape"], (10,), "mano shape", 20.0),
                        "trans": as_bounded(fit["trans"], (3,), "mano trans", 1e3),
                    }
                except DatasetError:
                    raise BadRecord("mano fit: not valid JSON") from None
                except KeyError as missing:
                    raise BadRecord(f"mano fit: missing key {missing}") from None
        return out

    def _add(self, capture: str, frame: int, cam: dict, image_path: Path, cam_name: str) -> None:
        try:
            self._frame(capture, frame)
        except BadRecord as bad:
            self.skip(bad.reason)
            return
        self.records.append(
            {"capture": capture, "frame": frame, "camera": cam_name, "cam": cam, "path": image_path}
        )

    # -- samples ----------------------------------------------------------------------------------------------
    def describe(self) -> str:
        return f"{self.root}, split {self.split}, {self.cameras} cameras"

    def record_id(self, record) -> str:
        return f"{record['capture']}/{record['camera']}/{record['frame']:06d}"

    def _model(self):
        if self.hand_model is None:
            from hands.mano import HandModel

            self.hand_model = HandModel(mano_dir=self.mano_dir)
        return self.hand_model

    def load(self, record: dict, with_image: bool = True):
        if with_image:
            image = load_image(record["path"])
            height, width = image.shape[1:]
        else:
            width, height = image_size(record["path"])
            image = torch.zeros(3, height, width)
        data = self._frame(record["capture"], record["frame"])
        cam = record["cam"]
        R = torch.as_tensor(cam["R"], dtype=torch.float32)
        t = torch.as_tensor(cam["t"], dtype=torch.float32)
        K = torch.tensor(
            [[cam["focal"][0], 0.0, cam["princpt"][0]], [0.0, cam["focal"][1], cam["princpt"][1]], [0.0, 0.0, 1.0]],
            dtype=torch.float32,
        )
        dist = torch.as_tensor(cam["D"], dtype=torch.float32)
        hands = {}
        for side in SIDES:
            joints_world = torch.as_tensor(data["joints"][side][list(REIH_TO_OURS)], dtype=torch.float32)
            joints_cam = joints_world @ R.T + t
            mano = {}
            fit = data["fits"][side]
            if fit is not None:
                from hands.datasets.mano_fit import fit_to_camera_mesh

                pose, shape, trans = (torch.as_tensor(fit[k], dtype=torch.float32)[None] for k in ("pose", "shape", "trans"))
                pose_cam, _, verts_cam, wrist_cam = fit_to_camera_mesh(self._model(), side, pose, shape, trans, R[None], t[None])
                mano = {"mano_pose": pose_cam[0], "mano_shape": shape[0], "verts_cam": verts_cam[0], "mesh_wrist_cam": wrist_cam[0]}
            hands[side] = make_hand_labels(
                joints_cam=joints_cam,
                joints_valid=(joints_cam[:, 2] > 1e-3) & (joints_cam[0, 2] > 1e-3),  # no valid wrist: hand absent
                K=K,
                dist=dist,
                image_size=(height, width),
                **mano,
            )
        valid = [side for side in SIDES if bool(hands[side].valid)]
        if not valid:
            raise BadRecord("no valid hand in the image")
        hand_type = "interacting" if len(valid) == 2 else valid[0]
        meta = {
            "dataset": self.name,
            "id": self.record_id(record),
            "is_synthetic": False,
            "image_path": str(record["path"]),
            "capture": record["capture"],
            "camera": record["camera"],
            "frame_idx": record["frame"],
        }
        return assemble_sample(image=image, right=hands["right"], left=hands["left"], K=K, dist=dist, hand_type=hand_type, meta=meta)
