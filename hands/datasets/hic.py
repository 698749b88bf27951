"""HIC (Hand-in-action / two-hand interaction captures) in InterWild's layout (FACTS.md §2). Test only.

Layout under ``root`` (or ``root/data``)::

    HIC.json                    COCO style: images (id, file_name, width, height),
                                annotations (image_id, hand_type, right_mano_path, left_mano_path)
    {file_name}                 images, relative to the folder of HIC.json
    {right,left}_mano_path      .ply ground-truth meshes in metres, camera space (null when the hand is absent)

Intrinsics are fixed: focal (525, 525), principal point (319.5, 239.5). Meshes are read with trimesh
(``process=False`` keeps MANO's vertex order). Joints come from the mesh: the hand model's 16-joint
regressor plus its 5 tip vertices, in our order. ``verts_cam`` is the GT mesh; ``mano_valid`` stays False
because HIC gives no MANO parameters. The evaluator scores HIC hands by ``valid``. With the procedural hand
model the regressed joints of a real MANO mesh are only approximate: pass ``mano_dir`` for real HIC data.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from hands.datasets.common import (
    BadRecord,
    DatasetError,
    HandDataset,
    image_entry,
    index_images,
    as_int,
    assemble_sample,
    load_image,
    load_json,
    make_hand_labels,
    require_dir,
)
from hands.sample import HAND_TYPES, SIDES

__all__ = ["HIC", "HIC_FOCAL", "HIC_PRINCPT"]

HIC_FOCAL = (525.0, 525.0)
HIC_PRINCPT = (319.5, 239.5)
logger = logging.getLogger("hands.datasets")


def load_ply_verts(path: Path) -> np.ndarray:
    """(778, 3) float vertices of a .ply mesh; BadRecord when missing, unreadable, wrong size or not finite."""
    import trimesh

    if not path.is_file():
        raise BadRecord("mesh file missing")
    try:
        mesh = trimesh.load(path, process=False, force="mesh")
        verts = np.asarray(mesh.vertices, dtype=np.float64)
    except Exception:  # trimesh raises many types for broken files; any of them means "does not load"
        raise BadRecord("mesh file does not load") from None
    if verts.shape != (778, 3):
        raise BadRecord("mesh: not 778 vertices")
    if not np.isfinite(verts).all():
        raise BadRecord("mesh: NaN or inf")
    if np.abs(verts).max() > 1e3:
        raise BadRecord("mesh: implausible value (not metres?)")
    return verts


class HIC(HandDataset):
    """HIC as HandSamples (split "test" only).

    Args:
        root: the folder holding HIC.json (or its parent holding ``data/``).
        split: "test".
        hand_model: a HandModel providing ``j_regressor_for(side)`` and ``tip_verts``; built from
            ``mano_dir`` on first use when None.
    """

    name = "hic"

    def __init__(self, root: str | Path, split: str = "test", *, hand_model=None, mano_dir: str | Path | None = None) -> None:
        super().__init__()
        if split != "test":
            raise ValueError(f"hic: only the 'test' split exists, got {split!r}")
        self.split = split
        root = require_dir(Path(root).expanduser(), "the HIC root holding HIC.json")
        if not (root / "HIC.json").exists() and (root / "data" / "HIC.json").exists():
            root = root / "data"
        self.root = root
        self.hand_model, self.mano_dir = hand_model, mano_dir
        data = load_json(root / "HIC.json", "COCO-style images and annotations")
        for key in ("images", "annotations"):
            if not isinstance(data.get(key), list):
                raise DatasetError(f"{root / 'HIC.json'}: expected a list under {key!r}")
        images = index_images(data["images"], self.skip)
        for ann in data["annotations"]:
            try:
                self.records.append(self._record(ann, images))
            except BadRecord as bad:
                self.skip(bad.reason)

    def _record(self, ann, images: dict) -> dict:
        if not isinstance(ann, dict):
            raise BadRecord("annotation: not an object")
        for key in ("image_id", "hand_type", "right_mano_path", "left_mano_path"):
            if key not in ann:
                raise BadRecord(f"annotation: missing key {key!r}")
        image = images.get(as_int(ann["image_id"], "image_id"))
        if image is None:
            raise BadRecord("annotation: image_id not among the images")
        _, width, height = image_entry(image)
        if ann["hand_type"] not in HAND_TYPES:
            raise BadRecord("annotation: hand_type not right/left/interacting")
        paths = {}
        for side in SIDES:
            value = ann[f"{side}_mano_path"]
            if value is not None and (not isinstance(value, str) or not value):
                raise BadRecord(f"annotation: {side}_mano_path not a string or null")
            if value is not None and not (self.root / value).is_file():
                raise BadRecord("mesh file missing")
            paths[side] = value
        if paths["right"] is None and paths["left"] is None:
            raise BadRecord("annotation: no mesh for either hand")
        return {
            "id": str(ann.get("id", ann["image_id"])),
            "path": image["file_name"],
            "size": (height, width),
            "hand_type": ann["hand_type"],
            "meshes": paths,
        }

    def describe(self) -> str:
        return f"{self.root}, split {self.split}"

    def record_id(self, record) -> str:
        return record["id"]

    def _model(self):
        if self.hand_model is None:
            from hands.mano import HandModel

            self.hand_model = HandModel(mano_dir=self.mano_dir)
            if getattr(self.hand_model, "is_procedural", False):
                logger.warning("hic: joints regressed with the procedural hand model; pass mano_dir for real MANO meshes")
        return self.hand_model

    def load(self, record: dict):
        image = load_image(self.root / record["path"])
        height, width = record["size"]
        if tuple(image.shape[1:]) != (height, width):
            raise BadRecord("image size differs from the annotation")
        K = torch.tensor(
            [[HIC_FOCAL[0], 0.0, HIC_PRINCPT[0]], [0.0, HIC_FOCAL[1], HIC_PRINCPT[1]], [0.0, 0.0, 1.0]], dtype=torch.float32
        )
        hands = {}
        for side in SIDES:
            if record["meshes"][side] is None:
                from hands.sample import HandLabels

                hands[side] = HandLabels.empty()
                continue
            verts = torch.as_tensor(load_ply_verts(self.root / record["meshes"][side]), dtype=torch.float32)
            model = self._model()
            joints = model.regress_joints(side, verts)  # InterWild's get_coord: regressor + tips
            hands[side] = make_hand_labels(
                joints_cam=joints,
                joints_valid=(joints[:, 2] > 1e-3) & (joints[0, 2] > 1e-3),  # no valid wrist: hand absent
                K=K,
                image_size=(height, width),
                verts_cam=verts,
                mesh_wrist_cam=joints[0],
                keep_out_of_frame=True,  # InterWild evaluates every hand that has a mesh, in the frame or not
            )
        meta = {
            "dataset": self.name,
            "id": record["id"],
            "is_synthetic": False,
            "image_path": str(self.root / record["path"]),
        }
        return assemble_sample(
            image=image, right=hands["right"], left=hands["left"], K=K, dist=None, hand_type=record["hand_type"], meta=meta
        )
