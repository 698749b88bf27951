"""Writers of the datasets' on-disk layouts: synthlab writes IH2.6M's; tests write tiny fixtures of all three.

Inputs are in the project's units (metres, camera or world frame as named) and are converted to each
dataset's own units on the way out (IH2.6M and ReIH keypoints and camera positions in millimetres).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from hands.units import to_mm

__all__ = ["IH26MWriter", "save_image", "write_reih_frame", "write_reih_cameras", "write_hic_json", "write_ply"]


def save_image(path: Path, image, quality: int = 92) -> None:
    """image: (H, W, 3) uint8 array or (3, H, W) float tensor in [0, 1]; the suffix picks the format."""
    if hasattr(image, "detach"):
        image = (image.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"quality": quality} if path.suffix.lower() in (".jpg", ".jpeg") else {}
    Image.fromarray(np.ascontiguousarray(image)).save(path, **kwargs)


def _list(x) -> list:
    return np.asarray(x, dtype=np.float64).tolist()


class IH26MWriter:
    """Collects cameras, frames and images of one split and writes InterHand2.6M's four JSON files.

    root/annotations/{split}/InterHand2.6M_{split}_{data,camera,joint_3d,MANO_NeuralAnnot}.json and
    root/images/{split}/{file_name}.
    """

    def __init__(self, root: Path, split: str) -> None:
        self.root, self.split = Path(root), split
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.cameras: dict = {}
        self.joints: dict = {}
        self.manos: dict = {}

    @property
    def image_dir(self) -> Path:
        return self.root / "images" / self.split

    def add_camera(self, capture: int, camera: str, R: np.ndarray, campos_m: np.ndarray, focal, princpt) -> None:
        """R: (3, 3) world -> camera; campos_m: (3,) camera centre in world metres; focal, princpt: (2,) px."""
        entry = self.cameras.setdefault(str(capture), {"campos": {}, "camrot": {}, "focal": {}, "princpt": {}})
        entry["campos"][camera] = _list(to_mm(np.asarray(campos_m, dtype=np.float64)))
        entry["camrot"][camera] = _list(R)
        entry["focal"][camera] = _list(focal)
        entry["princpt"][camera] = _list(princpt)

    def add_frame(self, capture: int, frame_idx: int, joints_world_m: np.ndarray, joint_valid: np.ndarray, fits: dict) -> None:
        """joints_world_m: (42, 3) world metres in IH2.6M's order; joint_valid (42,); fits: {right, left} ->
        {pose (48,), shape (10,), trans (3,)} world metres, or None."""
        self.joints.setdefault(str(capture), {})[str(frame_idx)] = {
            "world_coord": _list(to_mm(np.asarray(joints_world_m, dtype=np.float64))),
            "joint_valid": [int(v) for v in np.asarray(joint_valid).reshape(-1)],
        }
        self.manos.setdefault(str(capture), {})[str(frame_idx)] = {
            side: (None if fit is None else {k: _list(fit[k]) for k in ("pose", "shape", "trans")})
            for side, fit in fits.items()
        }

    def add_image(
        self,
        file_name: str,
        *,
        size: tuple[int, int],
        capture: int,
        camera: str,
        frame_idx: int,
        seq_name: str,
        hand_type: str,
        bbox_xywh: Sequence[float],
        joint_valid: np.ndarray,
        hand_type_valid: int = 1,
        image=None,
    ) -> int:
        """Register one image (and save ``image`` when given); returns its annotation id."""
        image_id = len(self.images)
        height, width = size
        self.images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "width": int(width),
                "height": int(height),
                "capture": int(capture),
                "seq_name": seq_name,
                "camera": camera,
                "frame_idx": int(frame_idx),
            }
        )
        self.annotations.append(
            {
                "id": image_id,
                "image_id": image_id,
                "bbox": [float(v) for v in bbox_xywh],
                "joint_valid": [[int(v)] for v in np.asarray(joint_valid).reshape(-1)],
                "hand_type": hand_type,
                "hand_type_valid": int(hand_type_valid),
            }
        )
        if image is not None:
            save_image(self.image_dir / file_name, image)
        return image_id

    def write(self) -> Path:
        """Write the four JSON files; returns the annotation folder."""
        folder = self.root / "annotations" / self.split
        folder.mkdir(parents=True, exist_ok=True)
        self.image_dir.mkdir(parents=True, exist_ok=True)
        prefix = f"InterHand2.6M_{self.split}"
        payloads = {
            "data": {"images": self.images, "annotations": self.annotations},
            "camera": self.cameras,
            "joint_3d": self.joints,
            "MANO_NeuralAnnot": self.manos,
        }
        for name, payload in payloads.items():
            with open(folder / f"{prefix}_{name}.json", "w") as f:
                json.dump(payload, f)
        return folder


def write_reih_cameras(capture_dir: Path, cameras: dict) -> None:
    """cameras: {name: {R (3, 3), t_m (3,), focal (2,), princpt (2,)}} -> Mugsy_cameras/cam_params.json (t in mm)."""
    out = {
        name: {"R": _list(c["R"]), "t": _list(to_mm(np.asarray(c["t_m"]))), "focal": _list(c["focal"]), "princpt": _list(c["princpt"])}
        for name, c in cameras.items()
    }
    path = capture_dir / "Mugsy_cameras" / "cam_params.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))


def write_reih_frame(capture_dir: Path, frame: int, keypoints_world_m: dict, fits: dict) -> None:
    """keypoints_world_m: {right, left} -> (24, 3) world metres (ReIH order); fits: {side: {pose, shape,
    trans} or None} world metres."""
    for side, joints in keypoints_world_m.items():
        path = capture_dir / "orig_fits" / side / "Keypoints" / f"keypoint-{frame:06d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_list(to_mm(np.asarray(joints)))))
    for side, fit in fits.items():
        if fit is None:
            continue
        path = capture_dir / "mano_fits" / "params" / f"{frame}_{side}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({k: _list(fit[k]) for k in ("pose", "shape", "trans")}))


def write_ply(path: Path, verts: np.ndarray, faces: np.ndarray) -> None:
    """A mesh (metres) as .ply, through trimesh (vertex order kept)."""
    import trimesh

    path.parent.mkdir(parents=True, exist_ok=True)
    trimesh.Trimesh(vertices=np.asarray(verts, dtype=np.float64), faces=np.asarray(faces), process=False).export(path)


def write_hic_json(root: Path, images: list[dict], annotations: list[dict]) -> Path:
    path = Path(root) / "HIC.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path
