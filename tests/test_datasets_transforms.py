"""Augmentations and crops keep every label consistent with the image."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from hands.camera import crop_image
from hands.datasets.common import assemble_sample, make_hand_labels
from hands.datasets.fixtures import random_world_fit
from hands.datasets.transforms import InterWildAugment, color_scale, crop, crop_to_hands, hflip, rotate
from hands.render import render_hands
from hands.sample import HandSample

SIZE = (64, 80)  # H, W


@pytest.fixture(scope="module")
def model():
    from hands.mano import HandModel

    return HandModel()


def _render(model, sample: HandSample):
    """Render the sample's own meshes with its camera: (image (3, H, W), side map (H, W))."""
    out = render_hands(
        sample.right.verts_cam[None], sample.left.verts_cam[None], model.faces_for("right"), model.faces_for("left"),
        sample.camera.K[None], sample.image_size, right_valid=sample.right.valid[None], left_valid=sample.left.valid[None],
    )
    return out.image[0], out.side[0]


@pytest.fixture(scope="module")
def sample(model):
    """Two hands 0.45 m in front of a camera whose principal point is off-centre; the image is their render."""
    rng = np.random.default_rng(3)
    K = torch.tensor([[70.0, 0.0, 37.0], [0.0, 72.0, 33.5], [0.0, 0.0, 1.0]])
    hands = {}
    for side, x in (("right", -0.035), ("left", 0.035)):
        fit = random_world_fit(rng, model, side, np.array([x, 0.0, 0.45]))
        hands[side] = make_hand_labels(
            joints_cam=torch.tensor(fit["joints"], dtype=torch.float32),
            joints_valid=torch.ones(21, dtype=torch.bool),
            K=K,
            image_size=SIZE,
            mano_pose=torch.tensor(fit["pose"], dtype=torch.float32),
            mano_shape=torch.tensor(fit["shape"], dtype=torch.float32),
            verts_cam=torch.tensor(fit["verts"], dtype=torch.float32),
        )
    base = assemble_sample(
        image=torch.zeros(3, *SIZE), right=hands["right"], left=hands["left"], K=K, dist=None, hand_type="interacting",
        meta={"dataset": "test", "id": "0", "is_synthetic": False},
    )
    image, _ = _render(model, base)
    return dataclasses.replace(base, image=image)


def _tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, f.name), f"{prefix}.{f.name}")


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


def _assert_consistent(sample: HandSample):
    from hands.camera import project

    for side in ("right", "left"):
        hand = sample.hand(side)
        if bool(hand.valid):
            valid = hand.joints_valid
            assert torch.allclose(hand.joints_img[valid], project(hand.joints_cam[valid], sample.camera.K), atol=1e-3)


def test_flip_twice_returns_the_sample(sample):
    sample = dataclasses.replace(sample, meta={**sample.meta, "bbox_ann": torch.tensor([3.0, 4.0, 30.0, 40.0])})
    once = hflip(sample)
    assert torch.allclose(once.meta["bbox_ann"], torch.tensor([SIZE[1] - 31.0, 4.0, SIZE[1] - 4.0, 40.0]))
    twice = hflip(once)
    assert torch.allclose(twice.meta["bbox_ann"], sample.meta["bbox_ann"])
    for (name, a), (_, b) in zip(_tensors(sample), _tensors(twice)):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    assert twice.hand_type == sample.hand_type and not twice.meta["flipped"]


def test_flipped_labels_render_onto_the_flipped_hand_pixels(model, sample):
    flipped = hflip(sample)
    flipped.validate()
    _assert_consistent(flipped)
    _, side_before = _render(model, sample)
    _, side_after = _render(model, flipped)
    mirrored = side_before.flip(-1)
    # the new right hand covers the old left hand's (mirrored) pixels and vice versa
    assert _iou(side_after == 1, mirrored == 2) > 0.97
    assert _iou(side_after == 2, mirrored == 1) > 0.97
    assert torch.allclose(flipped.rel_root, flipped.left.root_cam - flipped.right.root_cam, atol=1e-6)
    # MANO: the flipped pose meshes to the mirrored mesh (up to translation)
    pose, shape = flipped.right.mano_pose[None], flipped.right.mano_shape[None]
    mesh = model("right", pose, shape).verts[0]
    expected = flipped.right.verts_cam
    assert torch.allclose(mesh - mesh.mean(0), expected - expected.mean(0), atol=1e-4)


def test_rotation_turns_labels_with_the_image(model, sample):
    turned = rotate(sample, 25.0)
    turned.validate()
    _assert_consistent(turned)
    _, side_before = _render(model, sample)
    _, side_after = _render(model, turned)
    # warp the original hand mask with the same pixel map and compare with the re-rendered labels
    K = sample.camera.K
    from hands.datasets.transforms import _rotation_z

    affine = (K @ _rotation_z(25.0) @ torch.linalg.inv(K))[:2]
    warped = crop_image((side_before > 0).float()[None, None], affine[None], SIZE)[0, 0] > 0.5
    assert _iou(warped, side_after > 0) > 0.9
    # the content turned counter-clockwise on screen: the right-to-left wrist vector turns by -25 deg in
    # image coordinates (y down)
    def angle(s):
        d = s.left.joints_img[0] - s.right.joints_img[0]
        return float(torch.atan2(d[1], d[0]))
    turn = np.degrees(angle(turned) - angle(sample))
    assert abs((turn + 25.0 + 180) % 360 - 180) < 3.0
    # MANO root follows: the rotated pose meshes to the rotated mesh (up to translation)
    mesh = model("left", turned.left.mano_pose[None], turned.left.mano_shape[None]).verts[0]
    assert torch.allclose(mesh - mesh.mean(0), turned.left.verts_cam - turned.left.verts_cam.mean(0), atol=1e-4)


def test_crop_updates_intrinsics_joints_and_boxes(model, sample):
    _, side_before = _render(model, sample)
    white = dataclasses.replace(sample, image=(side_before > 0).float().expand(3, -1, -1).contiguous())
    cropped = crop_to_hands(white, (48, 48))
    cropped.validate()
    assert cropped.image_size == (48, 48)
    _assert_consistent(cropped)
    # the re-rendered labels land on the cropped image's hand pixels
    _, side = _render(model, cropped)
    assert _iou(side > 0, cropped.image[0] > 0.5) > 0.9
    for hand in (cropped.right, cropped.left):
        x0, y0, x1, y1 = hand.bbox.tolist()
        inside = hand.joints_img
        assert 0 <= x0 < x1 <= 47 and 0 <= y0 < y1 <= 47
        assert (inside[:, 0] >= x0 - 1).all() and (inside[:, 0] <= x1 + 1).all()
    rotated_crop = crop(sample, torch.tensor([10.0, 10.0, 60.0, 50.0]), (32, 40), rotation_deg=-40.0)
    _assert_consistent(rotated_crop)


def test_interwild_augment_is_seeded_and_keeps_labels_consistent(sample):
    augment = InterWildAugment(out_size=(48, 40))
    first = augment(sample, torch.Generator().manual_seed(5))
    again = augment(sample, torch.Generator().manual_seed(5))
    assert torch.equal(first.image, again.image) and first.meta["augment"] == again.meta["augment"]
    assert first.image_size == (48, 40)
    params = [augment.draw(torch.Generator().manual_seed(s)) for s in range(300)]
    scales = np.array([p["scale"] for p in params])
    rotations = np.array([p["rotation_deg"] for p in params])
    colors = torch.stack([p["color"] for p in params])
    flips = np.array([p["flip"] for p in params])
    assert scales.min() >= 0.75 and scales.max() <= 1.25
    assert np.abs(rotations).max() <= 60.0 and 0.5 < (rotations != 0).mean() < 0.7
    assert colors.min() >= 0.8 and colors.max() <= 1.2
    assert 0.4 < flips.mean() < 0.6
    for seed in range(6):
        out = augment(sample, torch.Generator().manual_seed(seed))
        out.validate()
        _assert_consistent(out)
        assert out.hand_type == "interacting"


def test_color_scale_multiplies_channels(sample):
    scaled = color_scale(sample, torch.tensor([0.5, 1.0, 0.0]))
    assert torch.allclose(scaled.image[0], sample.image[0] * 0.5)
    assert torch.equal(scaled.image[1], sample.image[1]) and scaled.image[2].abs().max() == 0
