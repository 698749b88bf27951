"""MSCOCO with COCO-WholeBody hand annotations and NeuralAnnot MANO fits, in InterWild's layout.

Layout under ``root`` (InterWild's ``data/MSCOCO``)::

    annotations/coco_wholebody_{train,val}_v1.0.json   COCO-WholeBody: images (id, file_name, width,
                                                       height), annotations (id, image_id, bbox, iscrowd,
                                                       num_keypoints, {left,right}hand_valid,
                                                       {left,right}hand_box (x, y, w, h),
                                                       {left,right}hand_kpts (21 x (x, y, score)))
    annotations/MSCOCO_train_MANO_NeuralAnnot.json     {str(annotation id): {"right"|"left": null or
                                                       {"mano_param": {pose (48), shape (10), trans (3)},
                                                        "cam_param": {focal (2), princpt (2)[, R (3x3),
                                                        t (3, metres)]}}}}
                                                       (train only; camera space, metres, flat_hand_mean=False)
    images/{train2017,val2017}/{file_name}

What is kept, as InterWild's ``data/MSCOCO/MSCOCO.py`` keeps it (one sample per person annotation):

- an annotation is skipped (counted) when ``iscrowd`` is set or ``num_keypoints`` is 0, when neither hand
  is valid, or when its person box is empty after InterWild's ``sanitize_bbox`` (clip to the image);
- a hand box is used when ``<side>hand_valid`` is true and the sanitised box is non-empty; it is then
  x0, y0, x1, y1 with x1 = x + w' where w' = min(w - 1, W - 1 - x) (InterWild's rule, reproduced exactly);
- 2D keypoints are the 21 hand keypoints in COCO-WholeBody's order, which is ours (wrist, then thumb,
  index, middle, ring, pinky, knuckle to tip); a keypoint is valid when its score is > 0;
- a MANO fit is looked up by ``str(annotation id)`` (train split only); a missing entry or a null side
  means no fit.

What a sample holds (the 2D-only supervision InterWild gives COCO):

- ``joints_img`` / ``joints_valid``: the annotated keypoints; ``joints_cam`` is zero and
  ``meta["joints_3d"]`` is False (InterWild's ``is_3D = 0``): regressors must not read 3D joint targets
  from such a sample (see :attr:`hands.sample.HandBatch.joints_3d`). ``rel_root_valid`` is False.
- ``bbox``: the annotated hand box; a hand without one (``<side>hand_valid`` false or the box outside the
  image) but with valid keypoints or a fit gets the box of its keypoints inside the image (x1.2, InterWild's
  ``get_bbox`` rule), else of its fit's projected joints (InterWild masks the box loss of such a hand);
  ``valid``: the hand has a box (annotated or derived).
- with a fit: ``mano_pose``, ``mano_shape``, ``verts_cam``, ``root_cam`` (the mesh's wrist) and
  ``mano_valid`` True. NeuralAnnot fits each hand with its own virtual camera (focal, princpt in the
  original image's pixels). The sample's camera ``K`` is the right fit's camera (else the left's, else
  a pinhole with focal max(W, H) at the image centre); a hand whose camera differs is moved so that its
  wrist projects to the same pixel and its image size is kept (depth scaled by f_K / f_hand), which is
  exact for the wrist and first-order for the rest of the hand (see docs/fidelity.md).
- ``meta``: dataset, id (annotation id), image_id, is_synthetic, image_path, joints_3d False, prompt (the
  image's hand-related caption, when a captions file has one: see ``captions``),
  body_bbox (x0, y0, x1, y1: InterWild's ``process_bbox``, the person box made 384:512 and x1.25, the crop
  InterWild trains on), persons (annotations of that image in the file).

Options: ``one_person=True`` keeps only images with exactly one annotation in the file (the paper's filter
for the generator's training data: "we filtered out the case of more than one person"); crowd regions count,
since they hold people. ``require_fit=True`` keeps only annotations with a fit for at least one hand (the
generator needs a mesh image). ``captions``: see :class:`MSCOCO`. Bad records (missing keys, wrong types or sizes, NaN) are counted skips; a bad fit
drops the fit only (counted as ``fit dropped: ...``) and keeps the 2D labels.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from hands.camera import inside_image, make_intrinsics, project
from hands.datasets.common import (
    BadRecord,
    DatasetError,
    HandDataset,
    image_entry,
    index_images,
    as_bounded,
    as_int,
    as_rotation,
    hand_bbox_from_joints,
    load_image,
    load_json,
    require_dir,
    require_file,
)
from hands.datasets.captions import default_captions_path, load_captions
from hands.sample import Camera, HandLabels, HandSample, SIDES

__all__ = ["MSCOCO", "SPLIT_FOLDERS", "sanitize_box", "body_box", "neuralannot_camera_shift"]

logger = logging.getLogger("hands.datasets")

SPLIT_FOLDERS = {"train": "train2017", "val": "val2017"}
ANNOTATION_FILES = {"train": "coco_wholebody_train_v1.0.json", "val": "coco_wholebody_val_v1.0.json"}
MANO_FILE = "MSCOCO_train_MANO_NeuralAnnot.json"
# InterWild's input is 512 x 384 (H, W): the person box is made W:H = 384:512 and grown x1.25
BODY_ASPECT = 384 / 512
BODY_EXTEND = 1.25
_SIDE_KEY = {"right": "righthand", "left": "lefthand"}
_PIXEL_LIMIT = 1e7  # boxes and keypoints beyond this many pixels are malformed (and overflow float32 math)


def sanitize_box(box_xywh, width: int, height: int) -> np.ndarray | None:
    """InterWild's ``sanitize_bbox``: (x, y, w, h) clipped to the image -> (x, y, w', h') or None when empty.

    x1 = max(0, x), x2 = min(W - 1, x1 + max(0, w - 1)) (same for y); None unless w h > 0 and x2 > x1, y2 > y1.
    """
    x, y, w, h = (float(v) for v in box_xywh)
    x1, y1 = max(0.0, x), max(0.0, y)
    x2 = min(width - 1.0, x1 + max(0.0, w - 1.0))
    y2 = min(height - 1.0, y1 + max(0.0, h - 1.0))
    if w * h > 0 and x2 > x1 and y2 > y1:
        return np.array([x1, y1, x2 - x1, y2 - y1], dtype=np.float32)
    return None


def body_box(box_xywh, width: int, height: int) -> np.ndarray | None:
    """InterWild's ``process_bbox`` for 512 x 384 inputs: the sanitised person box made W:H = 384:512 about its
    centre and grown x1.25 -> (x0, y0, x1, y1) float32, or None when the box is empty."""
    box = sanitize_box(box_xywh, width, height)
    if box is None:
        return None
    w, h = float(box[2]), float(box[3])
    cx, cy = float(box[0]) + w / 2, float(box[1]) + h / 2
    if w > BODY_ASPECT * h:
        h = w / BODY_ASPECT
    elif w < BODY_ASPECT * h:
        w = h * BODY_ASPECT
    w, h = w * BODY_EXTEND, h * BODY_EXTEND
    return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dtype=np.float32)


def neuralannot_camera_shift(wrist_cam: torch.Tensor, cam_hand: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """The translation that moves a hand fitted in camera ``cam_hand`` into camera ``K``.

    wrist_cam: (3,) the wrist in the fit's camera, metres; cam_hand: (3, 3) the fit's intrinsics; K: (3, 3)
    the sample's. Returns (3,) metres to add to every vertex/joint: afterwards the wrist projects through K to
    the pixel it projected to through cam_hand, at depth z * fx_K / fx_hand (so the hand keeps its image size).
    """
    pixel = cam_hand[:2, :2] @ (wrist_cam[:2] / wrist_cam[2]) + cam_hand[:2, 2]  # (2,)
    depth = wrist_cam[2] * K[0, 0] / cam_hand[0, 0]
    xy = (pixel - K[:2, 2]) / torch.stack([K[0, 0], K[1, 1]]) * depth
    return torch.cat([xy, depth[None]]) - wrist_cam


class MSCOCO(HandDataset):
    """COCO-WholeBody hands (2D) with NeuralAnnot MANO fits (3D pseudo-labels), one sample per person.

    Args:
        root: InterWild's ``data/MSCOCO`` folder (``annotations/`` and ``images/``).
        split: "train" (with fits) or "val" (2D only, as InterWild reads it).
        one_person: keep only images with one person annotation (the paper's generator data).
        require_fit: keep only annotations with a MANO fit for at least one hand (the generator's training data
            needs a mesh image).
        captions: a captions file (``python -m generator.caption``) whose hand-related caption of an image
            becomes ``meta["prompt"]`` of its samples; "auto" (default) reads the split's default file
            (:func:`hands.datasets.captions.default_captions_path`) when it exists; None reads none.
        hand_model: a HandModel for meshing the fits; built from ``mano_dir`` on first use when None.
        mano_dir: folder of the MANO files (None: the procedural hand; give the real MANO for real fits).
    """

    name = "coco"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        one_person: bool = False,
        require_fit: bool = False,
        captions: str | Path | None = "auto",
        hand_model=None,
        mano_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        if split not in SPLIT_FOLDERS:
            raise ValueError(f"coco: split must be one of {', '.join(SPLIT_FOLDERS)}, got {split!r}")
        self.split, self.one_person, self.require_fit = split, bool(one_person), bool(require_fit)
        self.root = require_dir(Path(root).expanduser(), "InterWild's MSCOCO folder holding annotations/ and images/")
        self.image_dir = self.root / "images" / SPLIT_FOLDERS[split]
        self.hand_model, self.mano_dir = hand_model, mano_dir
        if captions == "auto":
            captions = default_captions_path(self.root, split)
            captions = captions if captions.is_file() else None
        elif captions is not None:
            require_file(Path(captions).expanduser(), "a captions file written by python -m generator.caption")
        try:
            self.captions = load_captions(Path(captions).expanduser()) if captions is not None else {}
        except ValueError as exc:
            raise DatasetError(str(exc)) from None
        annotations = self.root / "annotations"
        data = load_json(annotations / ANNOTATION_FILES[split], "COCO-WholeBody annotations")
        fits = load_json(annotations / MANO_FILE, "NeuralAnnot MANO fits of MSCOCO train") if split == "train" else {}
        for key in ("images", "annotations"):
            if not isinstance(data.get(key), list):
                raise DatasetError(f"{annotations / ANNOTATION_FILES[split]}: expected a list under {key!r}")
        images = index_images(data["images"], self.skip)
        persons: Counter = Counter()
        for ann in data["annotations"]:
            if isinstance(ann, dict):
                try:
                    persons[as_int(ann.get("image_id"), "image_id")] += 1
                except BadRecord:
                    pass
        for ann in data["annotations"]:
            try:
                record = self._record(ann, images, fits, persons)
            except BadRecord as bad:
                self.skip(bad.reason)
                continue
            self.records.append(record)

    # -- index ------------------------------------------------------------------------------------------------
    def _record(self, ann, images: dict, fits: dict, persons: Counter) -> dict:
        if not isinstance(ann, dict):
            raise BadRecord("annotation: not an object")
        for key in ("id", "image_id", "bbox", "iscrowd", "num_keypoints", "lefthand_valid", "righthand_valid"):
            if key not in ann:
                raise BadRecord(f"annotation: missing key {key!r}")
        aid = as_int(ann["id"], "annotation id")
        image_id = as_int(ann["image_id"], "image_id")
        image = images.get(image_id)
        if image is None:
            raise BadRecord("annotation: image_id not among the images")
        _, width, height = image_entry(image)
        num_keypoints = as_int(ann["num_keypoints"], "num_keypoints")
        if ann["iscrowd"] or num_keypoints == 0:
            raise BadRecord("crowd or no body keypoints (InterWild's filter)")
        hands_valid = {}
        for side in SIDES:
            value = ann[f"{_SIDE_KEY[side]}_valid"]
            if not isinstance(value, (bool, int)):
                raise BadRecord(f"annotation: {_SIDE_KEY[side]}_valid not a boolean")
            hands_valid[side] = bool(value)
        if not any(hands_valid.values()):
            raise BadRecord("neither hand valid (InterWild's filter)")
        if self.one_person and persons[image_id] > 1:
            raise BadRecord("more than one person in the image (one_person)")
        body = body_box(as_bounded(ann["bbox"], (4,), "bbox", _PIXEL_LIMIT), width, height)
        if body is None:
            raise BadRecord("person box empty after clipping to the image (InterWild's filter)")
        boxes, keypoints = {}, {}
        for side in SIDES:
            prefix = _SIDE_KEY[side]
            box = None
            if hands_valid[side]:
                if f"{prefix}_box" not in ann:
                    raise BadRecord(f"annotation: missing key '{prefix}_box'")
                box = sanitize_box(as_bounded(ann[f"{prefix}_box"], (4,), f"{prefix}_box", _PIXEL_LIMIT), width, height)
                if box is not None:
                    box[2:] += box[:2]  # xywh -> xyxy
            boxes[side] = box
            if f"{prefix}_kpts" not in ann:
                raise BadRecord(f"annotation: missing key '{prefix}_kpts'")
            kpts = as_bounded(ann[f"{prefix}_kpts"], (21, 3), f"{prefix}_kpts", _PIXEL_LIMIT).astype(np.float32)
            keypoints[side] = (kpts[:, :2].copy(), kpts[:, 2] > 0)
        record_fits = {"right": None, "left": None}
        if self.split == "train" and str(aid) in fits:
            entry = fits[str(aid)]
            if not isinstance(entry, dict):
                self.skip("fit dropped: entry not an object")
            else:
                for side in SIDES:
                    try:
                        record_fits[side] = _parse_fit(entry.get(side))
                    except BadRecord as bad:
                        self.skip(f"fit dropped: {bad.reason}")
        if self.require_fit and not any(fit is not None for fit in record_fits.values()):
            raise BadRecord("no MANO fit (require_fit)")
        return {
            "aid": aid,
            "image_id": image_id,
            "path": image["file_name"],
            "size": (height, width),
            "body_bbox": body,
            "boxes": boxes,
            "keypoints": keypoints,
            "fits": record_fits,
            "persons": persons[image_id],
        }

    def describe(self) -> str:
        return (f"{self.root}, split {self.split}" + (", one person per image" if self.one_person else "")
                + (", annotations with a MANO fit" if self.require_fit else ""))

    def record_id(self, record) -> str:
        return str(record["aid"])

    def _model(self):
        if self.hand_model is None:
            from hands.mano import HandModel

            self.hand_model = HandModel(mano_dir=self.mano_dir)
            if getattr(self.hand_model, "is_procedural", False):
                logger.warning("coco: NeuralAnnot fits meshed with the procedural hand model; pass mano_dir for real MANO")
        return self.hand_model

    # -- samples ----------------------------------------------------------------------------------------------
    def camera(self, record: dict) -> torch.Tensor:
        """(3, 3) the sample's intrinsics: the right fit's camera, else the left's, else focal max(W, H) at
        the image centre."""
        for side in SIDES:
            fit = record["fits"][side]
            if fit is not None:
                return make_intrinsics(fit["focal"], fit["princpt"])
        height, width = record["size"]
        return make_intrinsics(float(max(width, height)), ((width - 1) / 2, (height - 1) / 2))

    def _hand(self, record: dict, side: str, K: torch.Tensor) -> HandLabels:
        labels = HandLabels.empty()
        box = record["boxes"][side]
        points, score_valid = record["keypoints"][side]
        joints_valid = torch.from_numpy(score_valid.copy())
        fit = record["fits"][side]
        if box is None and not bool(joints_valid.any()) and fit is None:
            return labels
        labels.valid = torch.tensor(True)
        labels.joints_valid = joints_valid
        labels.joints_img = torch.where(joints_valid[:, None], torch.from_numpy(points), torch.zeros(21, 2))
        labels.joints_trunc = joints_valid & inside_image(labels.joints_img, record["size"])  # 2D labels in the image
        if fit is not None:
            model = self._model()
            pose = torch.as_tensor(fit["pose"], dtype=torch.float32)
            shape = torch.as_tensor(fit["shape"], dtype=torch.float32)
            trans = torch.as_tensor(fit["trans"], dtype=torch.float32)
            if fit.get("R") is not None:  # extrinsics in cam_param (InterWild's get_mano_data applies them too)
                from hands.datasets.mano_fit import fit_to_camera

                R = torch.as_tensor(fit["R"], dtype=torch.float32)[None]
                t = torch.as_tensor(fit["t"], dtype=torch.float32)[None]
                pose, trans = (x[0] for x in fit_to_camera(model, side, pose[None], shape[None], trans[None], R, t))
            with torch.no_grad():
                out = model(side, pose[None], shape[None], trans[None])
            verts = out.verts[0]
            joints = model.regress_joints(side, verts)  # InterWild's get_mano_data: joint regressor on the mesh
            cam_hand = make_intrinsics(fit["focal"], fit["princpt"])
            if not torch.allclose(cam_hand, K):
                shift = neuralannot_camera_shift(joints[0], cam_hand, K)
                verts, joints = verts + shift, joints + shift
            labels.mano_pose, labels.mano_shape = pose, shape
            labels.verts_cam, labels.root_cam = verts, joints[0].clone()
            labels.mano_valid = torch.tensor(True)
        height, width = record["size"]
        if box is not None:
            labels.bbox = torch.from_numpy(box.copy())
        else:  # no annotated box: the keypoints' box (x1.2), else the fit's projected joints' box
            derived = hand_bbox_from_joints(labels.joints_img, joints_valid, (height, width))
            if derived is None and fit is not None:
                derived = hand_bbox_from_joints(project(joints[None], K[None])[0], torch.ones(21, dtype=torch.bool), (height, width))
            if derived is None:
                return HandLabels.empty()
            labels.bbox = derived.float()
        return labels

    def load(self, record: dict, with_image: bool = True) -> HandSample:
        height, width = record["size"]
        path = self.image_dir / record["path"]
        if with_image:
            image = load_image(path)
            if tuple(image.shape[1:]) != (height, width):
                raise BadRecord("image size differs from the annotation")
        else:
            image = torch.zeros(3, height, width)
        K = self.camera(record)
        right, left = self._hand(record, "right", K), self._hand(record, "left", K)
        hand_type = "interacting" if bool(right.valid) and bool(left.valid) else ("right" if bool(right.valid) else "left")
        meta = {
            "dataset": self.name,
            "id": str(record["aid"]),
            "image_id": record["image_id"],
            "is_synthetic": False,
            "image_path": str(path),
            "joints_3d": False,
            "body_bbox": torch.from_numpy(record["body_bbox"].copy()),
            "persons": record["persons"],
        }
        if record["path"] in self.captions:
            meta["prompt"] = self.captions[record["path"]]
        return HandSample(
            image=image,
            right=right,
            left=left,
            rel_root=torch.zeros(3),
            rel_root_valid=torch.tensor(False),
            camera=Camera(K=K, dist=torch.zeros(4)),
            hand_type=hand_type,
            meta=meta,
        )


def _parse_fit(value) -> dict | None:
    """One side of a NeuralAnnot entry -> {pose (48,), shape (10,), trans (3,), focal (2,), princpt (2,)} or
    None (null side); BadRecord for a malformed fit."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("mano_param"), dict) or not isinstance(value.get("cam_param"), dict):
        raise BadRecord("fit: expected {mano_param, cam_param}")
    mano, cam = value["mano_param"], value["cam_param"]
    for key, where in (("pose", mano), ("shape", mano), ("trans", mano), ("focal", cam), ("princpt", cam)):
        if key not in where:
            raise BadRecord(f"fit: missing {key!r}")
    fit = {
        "pose": as_bounded(mano["pose"], (48,), "fit pose", 2 * math.pi * 4),
        "shape": as_bounded(mano["shape"], (10,), "fit shape", 100.0),
        "trans": as_bounded(mano["trans"], (3,), "fit trans", 1e4),
        "focal": as_bounded(cam["focal"], (2,), "fit focal", 1e7),
        "princpt": as_bounded(cam["princpt"], (2,), "fit princpt", 1e7),
    }
    if (fit["focal"] <= 0).any():
        raise BadRecord("fit focal: not positive")
    if "R" in cam:  # optional extrinsics (metres), as InterWild's get_mano_data reads them
        fit["R"] = as_rotation(cam["R"], "fit R")
        fit["t"] = as_bounded(cam.get("t", [0.0, 0.0, 0.0]), (3,), "fit t", 1e4)
    return fit
