"""Augmentations and crops on :class:`hands.sample.HandSample`, keeping every label consistent.

Conventions: pixels have their centres at integer coordinates (as in :mod:`hands.camera`); image warps use
kornia through :func:`hands.camera.crop_image`; an image-plane affine changes the intrinsics by
:func:`hands.camera.transform_intrinsics`, so ``joints_img`` stays equal to projecting ``joints_cam`` with
``camera.K`` (through ``camera.dist`` for fisheye views).

- :func:`rotate` turns the image about the optical axis. The pixel map is ``K Rz K^-1`` (an affine, exact for
  pinhole and for radially symmetric fisheye distortion), K is unchanged and the 3D labels (vertices,
  joints, roots, rel_root, the MANO root rotation) are rotated by Rz, so the labels stay consistent.
- :func:`crop` resamples the image inside a box to an output size (an affine; K changes).
- :func:`hflip` mirrors the image (x -> W - 1 - x). The same image comes from the mirrored scene
  (X -> -X in camera space) seen by a camera with ``cx' = W - 1 - cx``; the right hand becomes the left one:
  sides swap, MANO poses become (x, -y, -z) per joint (:func:`hands.rotation.mirror_axis_angle`),
  camera-space positions have x negated (so does the implicit MANO translation). Flipping twice returns
  the sample.
- :func:`color_scale` multiplies each RGB channel.
- :class:`InterWildAugment` draws InterWild's training augmentation (FACTS.md §3) from a torch.Generator:
  scale 1 + 0.25 N clipped to [0.75, 1.25], rotation 30° N clipped to ±60° with probability 0.6, colour
  x U[0.8, 1.2] per channel, horizontal flip with probability 0.5, then the crop to ``out_size``.
- :class:`IntagHandAugment` draws IntagHand's: its input box (:func:`vertex_box`, 1.25x the hands' vertex
  extent), rotation U[-90°, 90°], scale U[0.9, 1.1], colour x U[0.7, 1.3] per channel ±5 % brightness, flip 0.5.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from hands.camera import (
    affine_to_3x3,
    apply_affine,
    bbox_crop_affine,
    crop_image,
    inside_image,
    inverse_3x3,
    project,
    square_bbox,
    scale_bbox,
    transform_intrinsics,
)
from hands.rotation import axis_angle_to_matrix, matrix_to_axis_angle, mirror_axis_angle
from hands.sample import Camera, HandLabels, HandSample

__all__ = [
    "hflip",
    "rotate",
    "crop",
    "color_scale",
    "warp",
    "hands_box",
    "crop_to_hands",
    "InterWildAugment",
    "vertex_box",
    "crop_to_vertices",
    "IntagHandAugment",
]


def _mirror_like(t: Tensor) -> Tensor:
    """(3,) the camera-space mirror (-1, 1, 1) on ``t``'s device and dtype (no host copy on an accelerator)."""
    mirror = torch.ones(3, dtype=t.dtype, device=t.device)
    mirror[0] = -1.0
    return mirror


# -- helpers -------------------------------------------------------------------------------------------------
# boxes in meta (x0, y0, x1, y1 pixels) that move with the image: IH2.6M's annotation box, MSCOCO's person box
_IMAGE_BOXES = ("bbox_ann", "body_bbox")


def _replace_hand(hand: HandLabels, **changes) -> HandLabels:
    return dataclasses.replace(hand, **changes)


def _transform_box(bbox: Tensor, affine: Tensor) -> Tensor:
    """(4,) box -> the axis-aligned box of its four transformed corners, *not* clipped to the output image:
    InterWild's ``process_hand_bbox`` keeps a hand box that the augmentation pushes partly out of the image
    whole, so the box net learns the hand's full extent (the reader clips boxes once, in the original image)."""
    x0, y0, x1, y1 = bbox.unbind(-1)
    corners = torch.stack([torch.stack([x0, y0]), torch.stack([x1, y0]), torch.stack([x1, y1]), torch.stack([x0, y1])])
    moved = apply_affine(corners[None], affine[None].to(corners.dtype))[0]  # (4, 2)
    return torch.cat([moved.amin(0), moved.amax(0)])


def _rotation_z(angle_deg: float, dtype=torch.float32, device=None) -> Tensor:
    """Rotation about the camera's z axis that turns image content counter-clockwise on screen by
    ``angle_deg`` (camera y points down, so this is Rz(-angle)). Built on ``device`` from Python numbers
    (fills, no host-to-device copy)."""
    theta = -math.radians(angle_deg)
    c, s = math.cos(theta), math.sin(theta)
    R = torch.eye(3, dtype=dtype, device=device)
    R[0, 0], R[0, 1], R[1, 0], R[1, 1] = c, -s, s, c
    return R


def _inverse_intrinsics(K: Tensor) -> Tensor:
    """K^-1 of (3, 3) intrinsics (upper triangular, K[2, 2] = 1), without torch.linalg.inv's error check
    (a host sync on an accelerator): :func:`hands.camera.inverse_3x3`."""
    return inverse_3x3(K)


# -- hflip ---------------------------------------------------------------------------------------------------
def _mirror_hand(hand: HandLabels, width: int) -> HandLabels:
    mirror = _mirror_like(hand.joints_cam)
    joints_img = hand.joints_img.clone()
    joints_img[:, 0] = torch.where(hand.joints_valid, (width - 1) - joints_img[:, 0], joints_img[:, 0])
    flipped = torch.stack([(width - 1) - hand.bbox[2], hand.bbox[1], (width - 1) - hand.bbox[0], hand.bbox[3]])
    bbox = torch.where(hand.valid, flipped, hand.bbox)  # no host sync on the validity flag
    return _replace_hand(
        hand,
        mano_pose=mirror_axis_angle(hand.mano_pose),
        root_cam=hand.root_cam * mirror,
        verts_cam=hand.verts_cam * mirror,
        joints_cam=hand.joints_cam * mirror,
        joints_img=joints_img,
        bbox=bbox,
    )


def hflip(sample: HandSample) -> HandSample:
    """Mirror the image horizontally; sides swap and labels are mirrored (see the module docstring)."""
    width = sample.image.shape[-1]
    K = sample.camera.K.clone()
    K[0, 2] = (width - 1) - K[0, 2]
    right = _mirror_hand(sample.left, width)
    left = _mirror_hand(sample.right, width)
    swap = {"right": "left", "left": "right", "interacting": "interacting"}
    meta = dict(sample.meta)
    meta["flipped"] = not bool(meta.get("flipped", False))
    for key in _IMAGE_BOXES:  # IH2.6M's annotation box, MSCOCO's person box follow the image
        if isinstance(meta.get(key), Tensor):
            x0, y0, x1, y1 = meta[key].unbind(-1)
            meta[key] = torch.stack([(width - 1) - x1, y0, (width - 1) - x0, y1])
    rel_root = -(sample.rel_root * _mirror_like(sample.rel_root))  # new left - new right = -M(old rel)
    return HandSample(
        image=sample.image.flip(-1),
        right=right,
        left=left,
        rel_root=torch.where(sample.rel_root_valid, rel_root, sample.rel_root),
        rel_root_valid=sample.rel_root_valid.clone(),
        camera=Camera(K=K, dist=sample.camera.dist.clone()),
        hand_type=swap[sample.hand_type],
        meta=meta,
    )


# -- geometric warps -----------------------------------------------------------------------------------------
def _rotate_hand(hand: HandLabels, Rz: Tensor) -> HandLabels:
    # validity flags select with torch.where (no host sync on an accelerator)
    Rz = Rz.to(hand.joints_cam.dtype)
    pose = hand.mano_pose.clone()
    pose[:3] = torch.where(hand.mano_valid, matrix_to_axis_angle(Rz @ axis_angle_to_matrix(pose[:3])), pose[:3])
    joints_cam = torch.where(hand.joints_valid[:, None], hand.joints_cam @ Rz.T, hand.joints_cam)
    return _replace_hand(
        hand,
        mano_pose=pose,
        root_cam=torch.where(hand.valid, hand.root_cam @ Rz.T, hand.root_cam),
        verts_cam=hand.verts_cam @ Rz.T,
        joints_cam=joints_cam,
    )


def _warp_hand(hand: HandLabels, affine: Tensor, out_size: tuple[int, int]) -> HandLabels:
    joints_img = apply_affine(hand.joints_img[None], affine[None].to(hand.joints_img.dtype))[0]
    joints_img = torch.where(hand.joints_valid[:, None], joints_img, torch.zeros_like(joints_img))
    bbox = torch.where(hand.valid, _transform_box(hand.bbox, affine), hand.bbox)
    # 2D validity (InterWild's joint_trunc): still labelled and inside the output image. A joint truncated
    # once stays truncated: where the warp brings it back into the output, that is padding, not its pixels
    joints_trunc = hand.joints_trunc & inside_image(joints_img, out_size)
    return _replace_hand(hand, joints_img=joints_img, bbox=bbox, joints_trunc=joints_trunc)


def warp(sample: HandSample, affine: Tensor, out_size: tuple[int, int], rotation_deg: float = 0.0) -> HandSample:
    """Resample the image with a pixel affine after an optional rotation about the optical axis.

    affine: (2, 3) mapping pixels of the (rotated) image to the output image; out_size: (H, W);
    rotation_deg: the content turns counter-clockwise on screen by this angle about the principal point
    first (3D labels rotate with it). The image is resampled once.
    """
    K = sample.camera.K
    dtype = K.dtype
    affine = affine.to(dtype)
    right, left, rel_root = sample.right, sample.left, sample.rel_root
    total = affine
    if rotation_deg:
        Rz = _rotation_z(rotation_deg, dtype, K.device)
        rot_pixels = (K @ Rz @ _inverse_intrinsics(K))[:2]  # (2, 3): K Rz K^-1 has last row (0, 0, 1)
        total = (affine_to_3x3(affine) @ affine_to_3x3(rot_pixels))[:2]
        right, left = _rotate_hand(right, Rz), _rotate_hand(left, Rz)
        rel_root = rel_root @ Rz.T.to(rel_root.dtype)
    image = crop_image(sample.image[None], total[None], out_size)[0].clamp_(0.0, 1.0)
    meta = dict(sample.meta)
    for key in _IMAGE_BOXES:  # IH2.6M's annotation box, MSCOCO's person box follow the image
        if isinstance(meta.get(key), Tensor):
            meta[key] = _transform_box(meta[key].to(total.device), total)  # meta stays put in .to(device)
    return HandSample(
        image=image,
        right=_warp_hand(right, total, out_size),
        left=_warp_hand(left, total, out_size),
        rel_root=rel_root,
        rel_root_valid=sample.rel_root_valid.clone(),
        # pixels' = affine K Rz K^-1 (K X) = affine K (Rz X): with the labels rotated, K changes by the affine only
        camera=Camera(K=transform_intrinsics(K, affine), dist=sample.camera.dist.clone()),
        hand_type=sample.hand_type,
        meta=meta,
    )


def rotate(sample: HandSample, angle_deg: float) -> HandSample:
    """Turn the image content counter-clockwise on screen by ``angle_deg`` about the principal point,
    keeping its size; the 3D labels rotate about the optical axis with it."""
    identity = torch.eye(2, 3, dtype=sample.camera.K.dtype, device=sample.camera.K.device)
    return warp(sample, identity, sample.image_size, rotation_deg=angle_deg)


def crop(
    sample: HandSample, bbox: Tensor, out_size: tuple[int, int], rotation_deg: float = 0.0
) -> HandSample:
    """Crop ``bbox`` (4,) x0 y0 x1 y1 (extended to the output's aspect) and resize to out_size (H, W).

    With ``rotation_deg`` the image first turns about the principal point (see :func:`rotate`); the box
    follows its centre, so it keeps framing the same content.
    """
    out_h, out_w = out_size
    box = square_bbox(bbox.to(sample.camera.K.dtype).reshape(4), aspect=out_w / out_h)
    if rotation_deg:
        K = sample.camera.K
        rot_pixels = (K @ _rotation_z(rotation_deg, K.dtype, K.device) @ _inverse_intrinsics(K))[:2]
        centre = (box[:2] + box[2:]) / 2
        moved = apply_affine(centre[None, None], rot_pixels[None])[0, 0]
        box = torch.cat([box[:2] + moved - centre, box[2:] + moved - centre])
    affine = bbox_crop_affine(box[None], out_size)[0]
    return warp(sample, affine, out_size, rotation_deg=rotation_deg)


def color_scale(sample: HandSample, factors: Tensor) -> HandSample:
    """Multiply the RGB channels by ``factors`` (3,), clamped to [0, 1]."""
    factors = factors.to(device=sample.image.device, dtype=sample.image.dtype, non_blocking=True)
    image = (sample.image * factors.reshape(3, 1, 1)).clamp(0.0, 1.0)
    return dataclasses.replace(sample, image=image, meta=dict(sample.meta))


# -- boxes ---------------------------------------------------------------------------------------------------
def hands_box(sample: HandSample, extend: float = 1.0) -> Tensor:
    """(4,) the union of the valid hands' boxes grown by ``extend``; the whole image when no hand is valid."""
    whole = _image_box(sample)
    valid = torch.stack([sample.right.valid, sample.left.valid])  # (2,)
    boxes = torch.stack([sample.right.bbox, sample.left.bbox]).to(whole.dtype)  # (2, 4)
    # the union over valid hands, without a host sync: invalid rows cannot win the min / max
    big = torch.finfo(whole.dtype).max
    lo = torch.where(valid[:, None], boxes[:, :2], big).amin(0)
    hi = torch.where(valid[:, None], boxes[:, 2:], -big).amax(0)
    union = scale_bbox(torch.cat([lo, hi]), extend)
    return torch.where(valid.any(), union, whole)


def _image_box(sample: HandSample) -> Tensor:
    """(4,) the whole image as a box, on the sample's device."""
    height, width = sample.image_size
    box = torch.zeros(4, dtype=sample.camera.K.dtype, device=sample.image.device)
    box[2], box[3] = width - 1.0, height - 1.0
    return box


def crop_to_hands(sample: HandSample, out_size: tuple[int, int] = (256, 256), extend: float = 1.3) -> HandSample:
    """IntagHand-style input: a crop of out_size holding both hands (their union box grown by extend)."""
    return crop(sample, hands_box(sample, extend), out_size)


# -- InterWild's training augmentation -----------------------------------------------------------------------
class InterWildAugment:
    """InterWild's training augmentation (FACTS.md §3) on HandSamples, drawn from a torch.Generator.

    Args:
        out_size: (H, W) of the output image (InterWild: (512, 384)).
        scale_sigma, scale_clip: scale = 1 + scale_sigma * clip(N, -scale_clip, scale_clip); the source window
            is the (aspect-extended) box times ``scale``, so a larger scale shows more context.
        rot_sigma_deg, rot_clip, rot_prob: rotation = rot_sigma_deg * clip(N, ±rot_clip) with probability
            rot_prob, else 0.
        color_range: per-channel factor ~ U[color_range].
        flip_prob: horizontal flip probability (sides swap).
        box: "image" (the whole image, InterWild's body box; a sample with ``meta["body_bbox"]``, MSCOCO's
            person box, uses that box as InterWild does) or "hands" (the union of the hand boxes x1.3).
    """

    def __init__(
        self,
        out_size: tuple[int, int] = (512, 384),
        *,
        scale_sigma: float = 0.25,
        scale_clip: float = 1.0,
        rot_sigma_deg: float = 30.0,
        rot_clip: float = 2.0,
        rot_prob: float = 0.6,
        color_range: tuple[float, float] = (0.8, 1.2),
        flip_prob: float = 0.5,
        box: str = "image",
    ) -> None:
        if box not in ("image", "hands"):
            raise ValueError(f"box must be 'image' or 'hands', got {box!r}")
        self.out_size = tuple(out_size)
        self.scale_sigma, self.scale_clip = scale_sigma, scale_clip
        self.rot_sigma_deg, self.rot_clip, self.rot_prob = rot_sigma_deg, rot_clip, rot_prob
        self.color_range = color_range
        self.flip_prob = flip_prob
        self.box = box

    def draw(self, generator: torch.Generator | None = None) -> dict:
        """Draw one set of parameters: scale, rotation_deg, color (3,), flip."""
        normal = torch.randn(2, generator=generator)
        uniform = torch.rand(5, generator=generator)
        scale = 1.0 + self.scale_sigma * float(normal[0].clamp(-self.scale_clip, self.scale_clip))
        rotation = self.rot_sigma_deg * float(normal[1].clamp(-self.rot_clip, self.rot_clip)) if float(uniform[0]) < self.rot_prob else 0.0
        low, high = self.color_range
        color = low + (high - low) * uniform[1:4]
        flip = bool(uniform[4] < self.flip_prob)
        return {"scale": scale, "rotation_deg": rotation, "color": color, "flip": flip}

    def apply(self, sample: HandSample, params: dict) -> HandSample:
        if self.box == "image" and isinstance(sample.meta.get("body_bbox"), Tensor):
            # MSCOCO: InterWild crops the person box (meta stays where it is in .to(device): follow the image)
            box = sample.meta["body_bbox"].to(device=sample.image.device, dtype=sample.camera.K.dtype)
        elif self.box == "image":
            box = _image_box(sample)
        else:
            box = hands_box(sample, 1.3)
        out_h, out_w = self.out_size
        box = scale_bbox(square_bbox(box, aspect=out_w / out_h), params["scale"])
        out = crop(sample, box, self.out_size, rotation_deg=params["rotation_deg"])
        out = color_scale(out, params["color"])
        if params["flip"]:
            out = hflip(out)
        out.meta["augment"] = {k: (v.tolist() if isinstance(v, Tensor) else v) for k, v in params.items()}
        return out

    def __call__(self, sample: HandSample, generator: torch.Generator | None = None) -> HandSample:
        return self.apply(sample, self.draw(generator))


# -- IntagHand's input crop and training augmentation --------------------------------------------------------
INTAGHAND_BOX_RATIO = 0.8  # IntagHand's HAND_BBOX_RATIO: the vertex extent fills 0.8 of the crop's side


def vertex_box(sample: HandSample, ratio: float = INTAGHAND_BOX_RATIO) -> Tensor:
    """(4,) IntagHand's input box (its ``cut_img``): the square centred on the extent of both hands' projected
    vertices, of side ``max(extent) / ratio`` (1.25x the vertex extent). Hands count when ``valid`` and
    ``mano_valid``; for a fisheye view (``camera.dist`` set), or when no hand has a mesh, the extent of the valid
    hands' ``joints_img`` stands in for the vertices'; the whole image when no hand is valid."""
    points = [
        project(hand.verts_cam, sample.camera.K)
        for hand in (sample.right, sample.left)
        if bool(hand.valid) and bool(hand.mano_valid) and not bool(sample.camera.is_fisheye)
    ]
    if not points:
        points = [
            hand.joints_img[hand.joints_valid.bool()]
            for hand in (sample.right, sample.left)
            if bool(hand.valid) and bool(hand.joints_valid.any())
        ]
    if not points:
        height, width = sample.image_size
        return torch.tensor([0.0, 0.0, width - 1.0, height - 1.0], device=sample.camera.K.device)
    stacked = torch.cat(points).float()
    low, high = stacked.amin(0), stacked.amax(0)
    centre, half = (low + high) / 2, (high - low).amax() / 2 / ratio  # a tensor: no host sync
    return torch.cat([centre - half, centre + half])


def crop_to_vertices(sample: HandSample, out_size: tuple[int, int] = (256, 256)) -> HandSample:
    """IntagHand's deterministic input: :func:`vertex_box` (made to the output's aspect) resampled to out_size."""
    box = square_bbox(vertex_box(sample), aspect=out_size[1] / out_size[0])
    return crop(sample, box, out_size)


class IntagHandAugment:
    """IntagHand's training augmentation (its ``core/loader.py`` and ``utils.imgUtils``) on HandSamples, drawn
    from a torch.Generator, in the reference's order:

    1. the input box: :func:`vertex_box` (``box="verts"``, IntagHand's) or the union of the hand boxes x1.3
       (``box="hands"``);
    2. rotation U[-90, 90] degrees about the optical axis (the 3D labels turn with it) and scale U[0.9, 1.1]
       (a scale above 1 zooms in: the source window is the box / scale), then the crop to ``out_size``;
    3. colour: each RGB channel x U[0.7, 1.3], plus one brightness offset U[-0.05, 0.05] (images in [0, 1];
       its ``add_noise`` with alpha 0.3, beta 0.05 and no Gaussian noise), clamped to [0, 1];
    4. horizontal flip with probability 0.5 (sides swap).
    """

    def __init__(
        self,
        out_size: tuple[int, int] = (256, 256),
        *,
        rot_range_deg: float = 90.0,
        scale_range: tuple[float, float] = (0.9, 1.1),
        color_range: tuple[float, float] = (0.7, 1.3),
        brightness: float = 0.05,
        flip_prob: float = 0.5,
        box: str = "verts",
    ) -> None:
        if box not in ("verts", "hands"):
            raise ValueError(f"box must be 'verts' or 'hands', got {box!r}")
        self.out_size = tuple(out_size)
        self.rot_range_deg, self.scale_range = rot_range_deg, scale_range
        self.color_range, self.brightness, self.flip_prob = color_range, brightness, flip_prob
        self.box = box

    def draw(self, generator: torch.Generator | None = None) -> dict:
        """Draw one set of parameters: rotation_deg, scale, color (3,), brightness, flip."""
        uniform = torch.rand(7, generator=generator)
        rotation = self.rot_range_deg * (2.0 * float(uniform[0]) - 1.0)
        low, high = self.scale_range
        scale = low + (high - low) * float(uniform[1])
        low, high = self.color_range
        color = low + (high - low) * uniform[2:5]
        brightness = self.brightness * (2.0 * float(uniform[5]) - 1.0)
        flip = bool(uniform[6] < self.flip_prob)
        return {"rotation_deg": rotation, "scale": scale, "color": color, "brightness": brightness, "flip": flip}

    def apply(self, sample: HandSample, params: dict) -> HandSample:
        box = vertex_box(sample) if self.box == "verts" else hands_box(sample, 1.3)
        out_h, out_w = self.out_size
        box = scale_bbox(square_bbox(box, aspect=out_w / out_h), 1.0 / params["scale"])
        out = crop(sample, box, self.out_size, rotation_deg=params["rotation_deg"])
        factors = params["color"].to(device=out.image.device, dtype=out.image.dtype, non_blocking=True).reshape(3, 1, 1)
        image = (out.image * factors + params["brightness"]).clamp(0.0, 1.0)
        out = dataclasses.replace(out, image=image, meta=dict(out.meta))
        if params["flip"]:
            out = hflip(out)
        out.meta["augment"] = {k: (v.tolist() if isinstance(v, Tensor) else v) for k, v in params.items()}
        return out

    def __call__(self, sample: HandSample, generator: torch.Generator | None = None) -> HandSample:
        return self.apply(sample, self.draw(generator))
