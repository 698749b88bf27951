"""InterHand2.6M in its released layout (FACTS.md §2).

Layout under ``root`` (or under ``root/<variant folder>``)::

    annotations/{split}/InterHand2.6M_{split}_data.json          COCO: images + annotations
    annotations/{split}/InterHand2.6M_{split}_camera.json        [capture][campos|camrot|focal|princpt][cam]
    annotations/{split}/InterHand2.6M_{split}_joint_3d.json      [capture][frame] world_coord (42x3 mm), joint_valid
    annotations/{split}/InterHand2.6M_{split}_MANO_NeuralAnnot.json  [capture][frame][right|left] pose/shape/trans or null
    images/{split}/{file_name}
    aid_human_annot_{split}.txt   (optional; also looked for in annotations/ and annotations/{split}/)

Variants: ``variant="5fps"`` reads ``root/InterHand2.6M_5fps_batch1``, ``variant="30fps"`` reads
``root/InterHand2.6M_30fps_batch1``; any other value names a sub-folder of ``root``; ``None`` reads ``root``
itself when it holds ``annotations/``, else the single variant folder found under it.

Cameras: ``X_cam = R X_world + t`` with ``t = -R campos`` (campos in mm). Joints: the 42-joint order
(per hand thumb tip..base, index, middle, ring, pinky, wrist last) mapped to ours with
:data:`hands.joints.IH26M_TO_OURS`. Two masks, as InterWild's loader keeps them: ``joints_valid`` is the
frame's ``joint_3d`` validity (3D, for ``joints_cam``), ``joints_trunc`` the annotation's ``joint_valid`` (2D)
of a 3D-valid joint that projects into the image; each flag's wrist gates its hand's joints (a hand whose
root is invalid is dropped, with its box and MANO fit). A hand is present when the x1.2 box of its 2D-flagged
joints reaches into the image (``get_bbox`` + ``sanitize_bbox``), so a hand whose joints all lie just outside
the image is valid in 3D and truncated in 2D.
MANO fits (world, metres, flat_hand_mean=False) are moved into camera space with
:func:`hands.datasets.mano_fit.fit_to_camera` and meshed with the hand model in ``__getitem__``; a null fit
gives ``mano_valid`` False. ``joints_cam`` always comes from ``joint_3d``, never from MANO.
``meta``: dataset, id (annotation id), is_synthetic, image_path, capture, camera, frame_idx,
hand_type_valid, bbox_ann (x0, y0, x1, y1 of the annotation's box).
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hands.datasets.common import (
    BadRecord,
    DatasetError,
    HandDataset,
    image_entry,
    index_images,
    as_array,
    as_bounded,
    as_int,
    as_rotation,
    assemble_sample,
    load_image,
    load_json,
    make_hand_labels,
    require_dir,
    require_file,
)
from hands.joints import IH26M_TO_OURS
from hands.sample import HAND_TYPES, SIDES
from hands.units import mm_to_m

__all__ = ["InterHand26M", "VARIANT_FOLDERS", "resolve_variant_root"]

VARIANT_FOLDERS = {"5fps": "InterHand2.6M_5fps_batch1", "30fps": "InterHand2.6M_30fps_batch1"}
_IH_SIDE_ROWS = {"right": np.array(IH26M_TO_OURS), "left": np.array(IH26M_TO_OURS) + 21}
_IMAGE_KEYS = ("id", "file_name", "width", "height", "capture", "camera", "frame_idx")
_ANN_KEYS = ("id", "image_id", "bbox", "joint_valid", "hand_type")


def resolve_variant_root(root: Path, variant: str | None) -> Path:
    """The folder holding ``annotations/`` and ``images/`` for ``variant`` (see the module docstring)."""
    root = require_dir(Path(root).expanduser(), "the InterHand2.6M root")
    if variant is not None:
        folder = VARIANT_FOLDERS.get(variant, variant)
        return require_dir(root / folder, f"the InterHand2.6M {variant!r} variant with annotations/ and images/")
    if (root / "annotations").is_dir():
        return root
    found = [root / name for name in VARIANT_FOLDERS.values() if (root / name / "annotations").is_dir()]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise DatasetError(f"{root}: holds several variants {[p.name for p in found]}; pass variant='5fps' or '30fps'")
    raise DatasetError(
        f"{root / 'annotations'}: expected a folder (InterHand2.6M annotations/{{split}}/...), found nothing; "
        f"nor a variant folder {sorted(VARIANT_FOLDERS.values())}"
    )


def _camera_params(cameras: dict, capture: str, camera: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """-> R (3, 3), t (3,) metres, focal (2,), princpt (2,); BadRecord when missing or malformed."""
    try:
        entry = cameras[capture]
        campos = entry["campos"][camera]
        camrot = entry["camrot"][camera]
        focal = entry["focal"][camera]
        princpt = entry["princpt"][camera]
    except (KeyError, TypeError):
        raise BadRecord("camera parameters missing") from None
    R = as_rotation(camrot, "camrot")
    position_m = mm_to_m(as_bounded(campos, (3,), "campos", 1e6))
    t = -R @ position_m
    focal = as_bounded(focal, (2,), "focal", 1e6)
    princpt = as_bounded(princpt, (2,), "princpt", 1e6)
    if (focal <= 0).any():
        raise BadRecord("focal: not positive")
    return R, t, focal, princpt


def _mano_fit(entry: Any, side: str) -> dict | None:
    """A side's NeuralAnnot fit -> {pose (48,), shape (10,), trans (3,)} arrays, None for null."""
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise BadRecord("mano fit: not an object")
    fit = entry.get(side)
    if fit is None:
        return None
    if not isinstance(fit, dict):
        raise BadRecord("mano fit: not an object")
    try:
        return {
            "pose": as_bounded(fit["pose"], (48,), "mano pose", 4 * math.pi),
            "shape": as_bounded(fit["shape"], (10,), "mano shape", 20.0),
            "trans": as_bounded(fit["trans"], (3,), "mano trans", 1e3),
        }
    except KeyError as missing:
        raise BadRecord(f"mano fit: missing key {missing}") from None


class InterHand26M(HandDataset):
    """InterHand2.6M (or anything written in its layout, such as synthlab) as HandSamples.

    Args:
        root: the dataset folder (see the module docstring).
        split: "train" | "val" | "test" (any folder name under annotations/ works).
        variant: "5fps" | "30fps" | a sub-folder name | None.
        human_annot: None = use the human-annotated id list of this split when its file is present;
            True = require it; False = ignore it.
        annot_id_file: an explicit id list file (one annotation id per line); implies human_annot.
        hand_model: a :class:`hands.mano.HandModel` for the MANO meshes; built from ``mano_dir`` on first
            use when None.
        mano_dir: folder with MANO_RIGHT.pkl / MANO_LEFT.pkl (None: $HANDS_MANO_DIR or the procedural hand).
        with_mano: False skips MANO fits altogether (``mano_valid`` False everywhere).
    """

    name = "ih26m"
    is_synthetic = False

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        variant: str | None = None,
        human_annot: bool | None = None,
        annot_id_file: str | Path | None = None,
        hand_model=None,
        mano_dir: str | Path | None = None,
        with_mano: bool = True,
    ) -> None:
        super().__init__()
        self.split = split
        self.root = resolve_variant_root(Path(root), variant)
        self.hand_model = hand_model
        self.mano_dir = mano_dir
        self.with_mano = with_mano
        annot_dir = require_dir(self.root / "annotations" / split, f"InterHand2.6M annotations of split {split!r}")
        self.image_dir = require_dir(self.root / "images" / split, f"InterHand2.6M images of split {split!r}")
        prefix = f"InterHand2.6M_{split}"
        data = load_json(annot_dir / f"{prefix}_data.json", "COCO-style images and annotations")
        cameras = load_json(annot_dir / f"{prefix}_camera.json", "per-capture camera parameters")
        joints = load_json(annot_dir / f"{prefix}_joint_3d.json", "per-frame world joints")
        mano_path = annot_dir / f"{prefix}_MANO_NeuralAnnot.json"
        manos = load_json(mano_path, "per-frame NeuralAnnot MANO fits; with_mano=False reads without meshes") if with_mano else {}
        for key in ("images", "annotations"):
            if not isinstance(data.get(key), list):
                raise DatasetError(f"{annot_dir / (prefix + '_data.json')}: expected a list under {key!r}")
        id_list = self._id_list(human_annot, annot_id_file)
        self.subset = "human_annot" if id_list is not None else "all"
        self._build_index(data, cameras, joints, manos, id_list)

    # -- index ----------------------------------------------------------------------------------------------
    def _id_list(self, human_annot: bool | None, annot_id_file) -> list[int] | None:
        if annot_id_file is not None:
            path = require_file(Path(annot_id_file), "annotation id list, one id per line")
        elif human_annot is False:
            return None
        else:
            name = f"aid_human_annot_{self.split}.txt"
            candidates = [self.root / name, self.root / "annotations" / name, self.root / "annotations" / self.split / name]
            path = next((p for p in candidates if p.is_file()), None)
            if path is None:
                if human_annot:
                    raise DatasetError(f"{candidates[0]}: expected the human-annotated id list of split {self.split!r}, found nothing")
                return None
        ids = []
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                text = line.strip()
                if not text:
                    continue
                try:
                    ids.append(int(text))
                except ValueError:
                    raise DatasetError(f"{path}:{number}: expected an integer annotation id, got {text[:40]!r}") from None
        return ids

    def _build_index(self, data: dict, cameras: dict, joints: dict, manos: dict, id_list: list[int] | None) -> None:
        images = index_images(data["images"], self.skip)
        annotations = [a for a in data["annotations"] if isinstance(a, dict)]
        self.skipped.update({"annotation: not an object": len(data["annotations"]) - len(annotations)})
        if id_list is not None:
            by_id = {}
            for ann in annotations:
                try:
                    by_id[as_int(ann.get("id"), "annotation id")] = ann
                except BadRecord:
                    continue
            annotations = []
            for aid in id_list:
                if aid in by_id:
                    annotations.append(by_id[aid])
                else:
                    self.skip("listed id not in annotations")
        self._cache: dict = {}
        for ann in annotations:
            try:
                self.records.append(self._record(ann, images, cameras, joints, manos))
            except BadRecord as bad:
                self.skip(bad.reason)
        del self._cache
        self.skipped += Counter()  # drop zero counts

    def _record(self, ann: dict, images: dict, cameras: dict, joints: dict, manos: dict) -> dict:
        for key in _ANN_KEYS:
            if key not in ann:
                raise BadRecord(f"annotation: missing key {key!r}")
        image = images.get(as_int(ann["image_id"], "image_id"))
        if image is None:
            raise BadRecord("annotation: image_id not among the images")
        _, width, height = image_entry(image, _IMAGE_KEYS)
        hand_type = ann["hand_type"]
        if hand_type not in HAND_TYPES:
            raise BadRecord("annotation: hand_type not right/left/interacting")
        capture, camera = str(image["capture"]), str(image["camera"])
        frame = str(as_int(image["frame_idx"], "frame_idx"))
        R, t, K = self._cached(("camera", capture, camera), lambda: self._camera(cameras, capture, camera))

        # the annotation box (x, y, w, h): non-empty and overlapping the image
        x, y, w, h = as_bounded(ann["bbox"], (4,), "bbox", 1e6)
        if w <= 0 or h <= 0 or x >= width or y >= height or x + w <= 0 or y + h <= 0:
            raise BadRecord("bbox empty or outside the image")

        joints_world, valid_3d, fits = self._cached(("frame", capture, frame), lambda: self._frame(joints, manos, capture, frame))
        valid_2d = as_array(ann["joint_valid"], (42,), "annotation joint_valid").astype(bool)
        valid_3d = valid_3d.copy()
        # InterWild's loader keeps the two flags apart: joint_3d's joint_valid (3D, for joint_cam) and the
        # annotation's joint_valid (its joint_trunc, 2D: boxes, 2D targets). Without a valid root (wrist) a
        # hand's root-relative pose is not valid, so each flag's wrist gates that flag's joints; a hand with
        # no 2D-flagged joint is then absent (no box, no MANO mesh, not counted by the evaluator)
        for rows in _IH_SIDE_ROWS.values():
            valid_3d[rows] &= valid_3d[rows[0]]
            valid_2d[rows] &= valid_2d[rows[0]]
        if not np.isfinite(joints_world[valid_3d]).all():
            raise BadRecord("world_coord: NaN or inf at a valid joint")
        if (np.abs(joints_world[valid_3d]) > 1e3).any():
            raise BadRecord("world_coord: implausible value")
        joints_world = np.where(valid_3d[:, None], joints_world, 0.0)
        joints_cam = joints_world @ R.T + t  # (42, 3)
        if (joints_cam[valid_3d, 2] <= 1e-3).any():
            raise BadRecord("world_coord: a valid joint behind the camera")

        type_valid = ann.get("hand_type_valid", 1)
        if isinstance(type_valid, bool) or isinstance(type_valid, (int, float)):
            type_valid = bool(type_valid) and not (isinstance(type_valid, float) and math.isnan(type_valid))
        else:
            raise BadRecord("annotation: hand_type_valid not a number")
        record = {
            "aid": as_int(ann["id"], "annotation id"),
            "path": image["file_name"],
            "size": (height, width),
            "capture": capture,
            "camera": camera,
            "frame": frame,
            "R": R,
            "t": t,
            "K": K,
            "joints_cam": joints_cam.astype(np.float32),
            "valid_3d": valid_3d,
            "valid_2d": valid_2d,
            "hand_type": hand_type,
            "hand_type_valid": type_valid,
            "bbox_ann": np.array([x, y, x + w, y + h], dtype=np.float32),
            "fits": fits,
            "image_id": image["id"],
        }
        if not self._any_hand_in_image(record):
            raise BadRecord("no valid hand in the image")
        return record

    def _cached(self, key: tuple, make):
        """Parse once per camera / time step during indexing (IH2.6M has many cameras per frame)."""
        if key not in self._cache:
            try:
                self._cache[key] = make()
            except BadRecord as bad:
                self._cache[key] = bad
        value = self._cache[key]
        if isinstance(value, BadRecord):
            raise BadRecord(value.reason)
        return value

    @staticmethod
    def _camera(cameras: dict, capture: str, camera: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> R (3, 3), t (3,) metres, K (3, 3), float32."""
        R, t, focal, princpt = _camera_params(cameras, capture, camera)
        K = np.array([[focal[0], 0.0, princpt[0]], [0.0, focal[1], princpt[1]], [0.0, 0.0, 1.0]])
        return R.astype(np.float32), t.astype(np.float32), K.astype(np.float32)

    def _frame(self, joints: dict, manos: dict, capture: str, frame: str) -> tuple[np.ndarray, np.ndarray, dict]:
        """-> world joints (42, 3) metres (NaN kept), joint_3d validity (42,) bool, {side: fit or None}."""
        try:
            frame_joints = joints[capture][frame]
            world_mm = frame_joints["world_coord"]
            valid_3d = frame_joints["joint_valid"]
        except (KeyError, TypeError):
            raise BadRecord("joint_3d entry missing") from None
        valid = as_array(valid_3d, (42,), "joint_3d joint_valid").astype(bool)
        joints_world = mm_to_m(as_array(world_mm, (42, 3), "world_coord", allow_nan=True))
        fits = {side: None for side in SIDES}
        if self.with_mano:
            frame_fits = manos.get(capture, {}) if isinstance(manos, dict) else {}
            entry = frame_fits.get(frame) if isinstance(frame_fits, dict) else None
            for side in SIDES:
                fits[side] = _mano_fit(entry, side)
        return joints_world, valid, fits

    @staticmethod
    def _hand_args(record: dict, side: str) -> dict:
        """make_hand_labels' arguments for one side: the 3D and 2D flags apart; the box spans every 2D-flagged
        joint (also outside the image) and is clipped (InterWild's get_bbox + sanitize_bbox)."""
        rows = _IH_SIDE_ROWS[side]
        return dict(
            joints_cam=torch.from_numpy(record["joints_cam"][rows]),
            joints_valid=torch.from_numpy(record["valid_3d"][rows]),
            joints_2d_valid=torch.from_numpy(record["valid_2d"][rows]),
            K=torch.from_numpy(record["K"]),
            image_size=record["size"],
            box_joints="valid",
        )

    @classmethod
    def _any_hand_in_image(cls, record: dict) -> bool:
        """A hand is present when the x1.2 box of its 2D-flagged joints reaches into the image (InterWild:
        ``sanitize_bbox`` not None), also when every joint lies just outside it (valid in 3D, truncated in 2D)."""
        return any(bool(make_hand_labels(**cls._hand_args(record, side)).valid) for side in SIDES)

    # -- samples ----------------------------------------------------------------------------------------------
    def describe(self) -> str:
        return f"{self.root}, split {self.split}"

    def record_id(self, record) -> str:
        return str(record["aid"])

    def _model(self):
        if self.hand_model is None:
            from hands.mano import HandModel

            self.hand_model = HandModel(mano_dir=self.mano_dir)
        return self.hand_model

    def _mano_labels(self, record: dict, side: str) -> dict:
        fit = record["fits"][side]
        if fit is None:
            return {}
        from hands.datasets.mano_fit import fit_to_camera_mesh

        model = self._model()
        dtype = torch.float32
        pose = torch.as_tensor(fit["pose"], dtype=dtype)[None]
        shape = torch.as_tensor(fit["shape"], dtype=dtype)[None]
        trans = torch.as_tensor(fit["trans"], dtype=dtype)[None]
        R = torch.as_tensor(record["R"], dtype=dtype)[None]
        t = torch.as_tensor(record["t"], dtype=dtype)[None]
        pose_cam, _, verts_cam, wrist_cam = fit_to_camera_mesh(model, side, pose, shape, trans, R, t)
        return {"mano_pose": pose_cam[0], "mano_shape": shape[0], "verts_cam": verts_cam[0], "mesh_wrist_cam": wrist_cam[0]}

    def load(self, record: dict, with_image: bool = True):
        height, width = record["size"]
        if with_image:
            image = load_image(self.image_dir / record["path"])
            if tuple(image.shape[1:]) != (height, width):
                raise BadRecord("image size differs from the annotation")
        else:
            image = torch.zeros(3, height, width)
        K = torch.from_numpy(record["K"])
        hands = {}
        for side in SIDES:
            args = self._hand_args(record, side)
            hands[side] = make_hand_labels(**args)
            if bool(hands[side].valid) and record["fits"][side] is not None:  # mesh only for present hands
                hands[side] = make_hand_labels(**args, **self._mano_labels(record, side))
        meta = {
            "dataset": self.name,
            "id": str(record["aid"]),
            "is_synthetic": self.is_synthetic,
            "image_path": str(self.image_dir / record["path"]),
            "capture": record["capture"],
            "camera": record["camera"],
            "frame_idx": int(record["frame"]),
            "hand_type_valid": record["hand_type_valid"],
            "bbox_ann": torch.from_numpy(record["bbox_ann"]),
        }
        return assemble_sample(
            image=image, right=hands["right"], left=hands["left"], K=K, dist=None, hand_type=record["hand_type"], meta=meta
        )

