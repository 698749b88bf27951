"""What every reader shares: the error type, skip counting, file loading and HandLabels assembly.

Conventions (all readers):
- Positions are metres in the camera frame of the sample's image; datasets' millimetres are converted on
  load with :func:`hands.units.mm_to_m`.
- Bad input: a missing file or folder raises :class:`DatasetError` naming the path and what the reader
  expected there. A bad *record* (missing keys, wrong types, NaN, an empty or out-of-image box) is dropped
  when the index is built and counted in ``dataset.skipped`` by reason. An image that does not decode is
  found in ``__getitem__``: the reader counts it, remembers it, and
  - for training (``substitute = True``, the default) returns the next valid sample (deterministically:
    index + 1, + 2, ...) with ``meta["substituted_for"]`` naming the sample it replaces, so that counts made in
    DataLoader worker processes are not lost;
  - for testing (``substitute = False``) returns a :class:`SkippedRecord` instead: a score never includes
    another sample's data twice, and the evaluation counts the record as skipped.
  ``report_skips()`` logs the counts once (call it once per epoch).
"""
from __future__ import annotations

import inspect
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from hands.camera import bbox_from_points, inside_image, project, scale_bbox
from hands.sample import Camera, HandLabels, HandSample

__all__ = [
    "DatasetError",
    "BadRecord",
    "SkippedRecord",
    "HandDataset",
    "require_dir",
    "require_file",
    "load_json",
    "load_image",
    "image_size",
    "as_array",
    "as_bounded",
    "as_int",
    "as_rotation",
    "project_points",
    "hand_bbox_from_joints",
    "make_hand_labels",
    "assemble_sample",
]

logger = logging.getLogger("hands.datasets")


class DatasetError(ValueError):
    """A dataset file or folder is missing, unreadable or not in the expected layout.

    The message names the path and what the reader expected there.
    """


class BadRecord(Exception):
    """Raised inside a reader for one bad record; the reader catches it and counts ``reason``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SkippedRecord:
    """What a reader with ``substitute = False`` returns for a record that does not load: the dataset, the
    record's id and the reason. Collation for evaluation drops it and counts it (:mod:`recon.evaluate`)."""

    dataset: str
    record: str
    reason: str


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a folder, else a DatasetError naming it and ``what`` should be there."""
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"{path}: expected a folder ({what}), found {'a file' if path.exists() else 'nothing'}")
    return path


def require_file(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: expected a file ({what}), found {'a folder' if path.exists() else 'nothing'}")
    return path


def load_json(path: Path, what: str, expect: type | None = dict) -> Any:
    """Parse a JSON file; any failure (missing, truncated, wrong top-level type) is a DatasetError naming it."""
    path = require_file(path, what)
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({what}): {exc}") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({what}): {exc}") from None
    if expect is not None and not isinstance(data, expect):
        raise DatasetError(f"{path}: expected a JSON {expect.__name__} at the top level ({what}), got {type(data).__name__}")
    return data


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file from its header, without decoding it; BadRecord if unreadable."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise BadRecord(f"image header unreadable ({type(exc).__name__})") from None


def load_image(path: Path) -> Tensor:
    """Decode an image file -> (3, H, W) float32 RGB in [0, 1]. Raises BadRecord when it does not decode."""
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise BadRecord("image file missing") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise BadRecord("image does not decode") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def as_array(value: Any, shape: Sequence[int], field: str, allow_nan: bool = False) -> np.ndarray:
    """A JSON value -> float64 array of ``shape``; a wrong type/shape or a NaN/inf raises BadRecord."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise BadRecord(f"{field}: not numeric") from None
    if array.size != math.prod(shape):
        raise BadRecord(f"{field}: wrong size")
    array = array.reshape(shape)
    if not allow_nan and not np.isfinite(array).all():
        raise BadRecord(f"{field}: NaN or inf")
    return array


def as_rotation(value: Any, field: str) -> np.ndarray:
    """A JSON 3x3 -> rotation matrix; BadRecord unless orthonormal with determinant +1 (tolerance 1e-3)."""
    R = as_bounded(value, (3, 3), field, 2.0)
    if np.abs(R.T @ R - np.eye(3)).max() > 1e-3 or np.linalg.det(R) < 0:
        raise BadRecord(f"{field}: not a rotation matrix")
    return R


def as_bounded(value: Any, shape: Sequence[int], field: str, limit: float) -> np.ndarray:
    """:func:`as_array` that also rejects values beyond +-limit (implausible, and they overflow float32)."""
    array = as_array(value, shape, field)
    if np.abs(array).max(initial=0.0) > limit:
        raise BadRecord(f"{field}: implausible value")
    return array


def as_int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BadRecord(f"{field}: not an integer")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise BadRecord(f"{field}: not an integer") from None
    if not math.isfinite(number) or number != int(number):
        raise BadRecord(f"{field}: not an integer")
    return int(number)


def index_images(entries: list, skip: Callable[[str], None]) -> dict[int, dict]:
    """COCO-style ``images`` entries by their integer ``id``; an entry that is not an object or has no integer id
    is left out and counted through ``skip(reason)`` (its annotations are then skipped as not among the images)."""
    images: dict[int, dict] = {}
    for image in entries:
        if not isinstance(image, dict):
            skip("image entry: not an object")
            continue
        try:
            images[as_int(image.get("id"), "image id")] = image
        except BadRecord:
            skip("image entry: id not an integer")
    return images


def image_entry(image: dict, keys: Sequence[str] = ("file_name", "width", "height")) -> tuple[str, int, int]:
    """A COCO-style ``images`` entry checked (``keys`` present, a non-empty ``file_name``, width and height in
    1..100000): (file_name, width, height); a :class:`BadRecord` naming the fault otherwise."""
    for key in keys:
        if key not in image:
            raise BadRecord(f"image: missing key {key!r}")
    if not isinstance(image["file_name"], str) or not image["file_name"]:
        raise BadRecord("image: file_name not a string")
    width, height = as_int(image["width"], "width"), as_int(image["height"], "height")
    if not (0 < width <= 100_000 and 0 < height <= 100_000):
        raise BadRecord("image: width/height not in 1..100000")
    return image["file_name"], width, height


def project_points(points_cam: Tensor, K: Tensor, dist: Tensor | None = None) -> Tensor:
    """points_cam: (N, 3) metres, camera frame; K: (3, 3); dist: (4,) fisheye k1..k4 or None -> (N, 2) px.

    With non-zero ``dist`` the OpenCV fisheye (Kannala-Brandt) model is used, via kornia.
    """
    if dist is None or not bool(dist.abs().sum() > 0):
        return project(points_cam, K)
    from kornia.geometry.camera.distortion_kannala_brandt import distort_points_kannala_brandt

    z = points_cam[:, 2:3].clamp(min=1e-6)
    normalized = points_cam[:, :2] / z  # (N, 2) on the z = 1 plane
    params = torch.cat([K[0, 0:1], K[1, 1:2], K[0, 2:3], K[1, 2:3], dist.to(K.dtype)])  # (8,)
    return distort_points_kannala_brandt(normalized, params.expand(normalized.shape[0], 8))


def hand_bbox_from_joints(
    joints_img: Tensor, joints_valid: Tensor, image_size: tuple[int, int], extend: float = 1.2, box_joints: str = "inside"
) -> Tensor | None:
    """A hand box from its projected joints (InterWild's ``get_bbox``: the joints' box x1.2, clipped).

    joints_img: (21, 2) px; joints_valid: (21,) bool; image_size: (H, W); box_joints: which joints span the
    box: "inside" (the valid joints inside the image: InterWild's ReIH loader, joint_trunc) or "valid" (every
    valid joint, also outside the image: its IH2.6M loader, which then clips the box, sanitize_bbox).
    Returns (4,) x0, y0, x1, y1 clipped to the image, or None: with "inside" when no valid joint lies in the
    image, with "valid" when the x1.2 box of the valid joints does not overlap the image by a pixel (so a hand
    whose joints all lie just outside the image keeps the part of its box that reaches in, as InterWild's).
    """
    if box_joints not in ("inside", "valid"):
        raise ValueError(f"box_joints must be 'inside' or 'valid', got {box_joints!r}")
    height, width = image_size
    inside = (
        joints_valid
        & (joints_img[:, 0] >= 0)
        & (joints_img[:, 0] <= width - 1)
        & (joints_img[:, 1] >= 0)
        & (joints_img[:, 1] <= height - 1)
    )
    span = inside if box_joints == "inside" else joints_valid
    if not bool(span.any()):
        return None
    box = scale_bbox(bbox_from_points(joints_img, span), extend)
    box = torch.stack(
        [box[0].clamp(0, width - 1), box[1].clamp(0, height - 1), box[2].clamp(0, width - 1), box[3].clamp(0, height - 1)]
    )
    if bool(box[2] - box[0] < 1) or bool(box[3] - box[1] < 1):
        return None
    return box


def make_hand_labels(
    *,
    joints_cam: Tensor,
    joints_valid: Tensor,
    K: Tensor,
    image_size: tuple[int, int],
    joints_2d_valid: Tensor | None = None,
    dist: Tensor | None = None,
    mano_pose: Tensor | None = None,
    mano_shape: Tensor | None = None,
    verts_cam: Tensor | None = None,
    mesh_wrist_cam: Tensor | None = None,
    box_joints: str = "inside",
    keep_out_of_frame: bool = False,
) -> HandLabels:
    """Assemble one hand's HandLabels in camera space (metres).

    joints_cam: (21, 3) our joint order; joints_valid: (21,) bool, the 3D validity (InterWild's
    ``joint_valid``); joints_2d_valid: (21,) bool, the dataset's own 2D flags where it has them (IH2.6M's
    annotation ``joint_valid``, which InterWild reads as ``joint_trunc``), None = the 3D flags; K: (3, 3);
    image_size: (H, W); mano_pose (48,) / mano_shape (10,) / verts_cam (778, 3): a MANO fit already in camera
    space; ``mano_valid`` is set when pose and verts are given (a mesh without parameters, as HIC's, sets
    ``verts_cam`` only); mesh_wrist_cam (3,): the mesh's wrist (regressor row 0), used as root when the
    wrist joint is not valid.

    ``joints_img`` is the projection of every 3D-valid joint (also outside the image). The 2D-labelled joints
    are the 3D-valid ones with the 2D flag (a joint without a 3D position has no projection here). The hand
    is ``valid`` when :func:`hand_bbox_from_joints` gives a box from the 2D-labelled joints (``box_joints``
    says which span it); ``joints_trunc`` = 2D-labelled and inside the image, ``joints_valid`` = the 3D flags,
    so a hand can be valid in 3D and truncated in 2D. With ``keep_out_of_frame`` a hand none of whose joints
    projects into the image stays valid (in 3D; its 2D joints are truncated), with the unclipped x1.2 box of
    its projected joints: InterWild evaluates every HIC hand that has a mesh.
    ``root_cam`` is the annotated wrist when valid, else the mesh wrist.
    """
    dtype = torch.float32
    joints_cam = joints_cam.to(dtype)
    joints_valid = joints_valid.bool() & torch.isfinite(joints_cam).all(-1)
    joints_cam = torch.where(joints_valid[:, None], joints_cam, torch.zeros_like(joints_cam))
    labels = HandLabels.empty(dtype)
    joints_img = project_points(joints_cam, K.to(dtype), dist)
    joints_valid = joints_valid & torch.isfinite(joints_img).all(-1)  # a wild fisheye model can give NaN
    joints_img = torch.where(joints_valid[:, None], joints_img, torch.zeros_like(joints_img))
    labelled_2d = joints_valid if joints_2d_valid is None else joints_valid & joints_2d_valid.bool()
    bbox = hand_bbox_from_joints(joints_img, labelled_2d, image_size, box_joints=box_joints)
    has_mano = mano_pose is not None and verts_cam is not None
    if bbox is None and keep_out_of_frame and bool(labelled_2d.any()):
        bbox = scale_bbox(bbox_from_points(joints_img, labelled_2d), 1.2)  # outside the image, not clipped
    if bbox is None:
        return labels  # no 2D-labelled joint in or near the image: the hand is absent from this sample
    labels.joints_cam = joints_cam
    labels.joints_img = joints_img
    labels.joints_valid = joints_valid
    labels.joints_trunc = labelled_2d & inside_image(joints_img, image_size)
    labels.bbox = bbox.to(dtype)
    labels.valid = torch.tensor(True)
    if bool(joints_valid[0]):
        labels.root_cam = joints_cam[0].clone()
    elif mesh_wrist_cam is not None:
        labels.root_cam = mesh_wrist_cam.to(dtype)
    if verts_cam is not None:
        labels.verts_cam = verts_cam.to(dtype).reshape(778, 3)
    if has_mano:
        labels.mano_pose = mano_pose.to(dtype).reshape(48)
        labels.mano_shape = (mano_shape if mano_shape is not None else torch.zeros(10)).to(dtype).reshape(10)
        labels.mano_valid = torch.tensor(True)
    return labels


def assemble_sample(
    *,
    image: Tensor,
    right: HandLabels,
    left: HandLabels,
    K: Tensor,
    dist: Tensor | None,
    hand_type: str,
    meta: dict,
) -> HandSample:
    """A HandSample with ``rel_root`` = left wrist - right wrist when both wrist joints are valid."""
    both = bool(right.valid and left.valid and right.joints_valid[0] and left.joints_valid[0])
    rel_root = (left.root_cam - right.root_cam) if both else torch.zeros(3)
    return HandSample(
        image=image,
        right=right,
        left=left,
        rel_root=rel_root.float(),
        rel_root_valid=torch.tensor(both),
        camera=Camera(K=K.float(), dist=(dist if dist is not None else torch.zeros(4)).float()),
        hand_type=hand_type,
        meta=meta,
    )


class HandDataset(torch.utils.data.Dataset):
    """Base of the readers: an index of records, skip counting, decode-failure substitution.

    Subclasses fill ``self.records`` (a list, one per sample) in their constructor, counting dropped
    records with :meth:`skip`, and implement :meth:`load(record) -> HandSample` which may raise
    :class:`BadRecord` (an image that does not decode).

    Attributes:
        skipped: Counter of dropped records by reason (index-time skips and decode failures seen by this
            process).
    """

    name = "base"
    substitute = True  # a record that does not decode: the next valid sample (training) or a SkippedRecord

    def __init__(self) -> None:
        self.records: list = []
        self.skipped: Counter = Counter()
        self._bad: set[int] = set()
        self._reported: Counter = Counter()

    # -- bookkeeping --------------------------------------------------------------------------------------
    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def report_skips(self, log: Callable[[str], None] | None = None) -> str | None:
        """Log one warning with every skip count so far (call it once per epoch); return it, or None when
        nothing was ever skipped. Decode failures met in DataLoader worker processes are counted there;
        in the main process they show as samples with ``meta["substituted_for"]``."""
        if not self.skipped:
            return None
        new = sum((self.skipped - self._reported).values())
        self._reported = Counter(self.skipped)
        parts = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.skipped.items()))
        message = (
            f"{self.name} ({self.describe()}): {sum(self.skipped.values())} record(s) skipped so far "
            f"({new} new since the last report): {parts}"
        )
        (log or logger.warning)(message)
        return message

    def describe(self) -> str:
        return self.name

    # -- access -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def load(self, record) -> HandSample:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int) -> HandSample:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range for {len(self)} samples")
        if not self.substitute:
            try:
                return self.load(self.records[index])
            except BadRecord as bad:
                if index not in self._bad:
                    self._bad.add(index)
                    self.skip(bad.reason)
                return SkippedRecord(self.describe(), self.record_id(self.records[index]), bad.reason)
        for offset in range(len(self)):
            current = (index + offset) % len(self)
            if current in self._bad:
                continue
            try:
                sample = self.load(self.records[current])
            except BadRecord as bad:
                self._bad.add(current)
                self.skip(bad.reason)
                logger.debug("%s: record %d skipped (%s)", self.name, current, bad.reason)
                continue
            if offset:
                sample.meta["substituted_for"] = self.record_id(self.records[index])
            return sample
        raise DatasetError(f"{self.name} ({self.describe()}): no sample could be loaded; every image failed to decode")

    def record_id(self, record) -> str:
        return str(record)

    def load_labels(self, index: int) -> HandSample:
        """Sample ``index``'s labels without decoding its image (the image is black, at the annotated size):
        what :mod:`mixing` draws labels for generation from. Readers whose ``load`` takes ``with_image``
        support it (IH2.6M, synthlab, ReIH); HIC's meshes come with its images only in the test split."""
        if "with_image" not in inspect.signature(self.load).parameters:
            raise TypeError(f"{self.name}: this reader cannot load labels without images")
        return self.load(self.records[index], with_image=False)
