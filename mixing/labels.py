"""Label sources for generation: MANO meshes, joints and cameras, never images.

- :class:`DatasetLabelSource` draws the annotations of a training set (IH2.6M, ReIH, synthlab train-lab)
  through its reader's ``load_labels(index)`` (the reader's own parsing and camera conversion, without
  decoding the image).
- :class:`PriorLabelSource` samples two-hand configurations from the pose prior of
  :mod:`hands.datasets.poses` (finger curls within joint limits, clasped / facing / near / single hands)
  seen by random cameras, as synthlab does.

Both return a :class:`hands.sample.HandBatch` whose images are black at the labels' image size and whose
hands are *mesh-consistent*: for every hand with a MANO fit, ``joints_cam`` are the joints regressed from
that very mesh (a dataset's annotated joints can differ from its MANO fit by the fit's error; a generated
image shows the mesh, so its labels must be the mesh's). Hands without a fit are dropped by
:func:`mixing.source.keep_rendered_hands` before rendering.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from hands.camera import make_intrinsics, project
from hands.datasets.common import assemble_sample, make_hand_labels
from hands.camera import inside_image
from hands.datasets.mano_fit import fit_to_camera_mesh
from hands.datasets.poses import PoseSampler
from hands.datasets.synthlab import random_rig
from hands.sample import HandBatch, HandLabels, HandSample, collate

__all__ = ["DatasetLabelSource", "PriorLabelSource", "mesh_consistent"]


@torch.no_grad()
def mesh_consistent(sample: HandSample, hand_model) -> HandSample:
    """Replace each MANO-fitted hand's joints by the joints regressed from its mesh (``HandModel.regress_joints``
    on ``verts_cam``, InterWild's definition) and recompute ``joints_img``, ``root_cam`` and ``rel_root``."""
    hands = {}
    for side in ("right", "left"):
        hand = getattr(sample, side)
        if not bool(hand.mano_valid):
            hands[side] = hand
            continue
        joints_cam = hand_model.regress_joints(side, hand.verts_cam)
        joints_img = project(joints_cam[None], sample.camera.K[None])[0]
        hands[side] = dataclasses.replace(
            hand,
            joints_cam=joints_cam,
            joints_img=joints_img,
            joints_valid=torch.ones_like(hand.joints_valid),
            joints_trunc=inside_image(joints_img, sample.image_size),
            root_cam=joints_cam[0].clone(),
        )
    both = bool(hands["right"].valid and hands["left"].valid)
    rel_root = hands["left"].root_cam - hands["right"].root_cam if both else torch.zeros(3)
    return dataclasses.replace(
        sample, right=hands["right"], left=hands["left"], rel_root=rel_root, rel_root_valid=torch.tensor(both)
    )


class DatasetLabelSource:
    """Labels of a dataset reader's samples, drawn uniformly with the caller's generator.

    Args:
        dataset: a reader with ``load_labels(index) -> HandSample`` (black image) and ``__len__``
            (the IH2.6M-layout readers: ih26m, synthlab; ReIH).
        hand_model: the HandModel the dataset's fits are for.
        require_mano: draw only samples with at least one MANO-fitted hand (the rest cannot be rendered).
    """

    def __init__(self, dataset, hand_model, *, require_mano: bool = True):
        if not hasattr(dataset, "load_labels"):
            raise TypeError(f"{type(dataset).__name__} has no load_labels(index); it cannot serve labels for generation")
        if len(dataset) == 0:
            raise ValueError(f"{type(dataset).__name__}: no samples to draw labels from")
        self.dataset = dataset
        self.hand_model = hand_model
        self.require_mano = require_mano

    def _one(self, generator: torch.Generator) -> HandSample:
        for _ in range(100):
            index = int(torch.randint(len(self.dataset), (1,), generator=generator))
            sample = self.dataset.load_labels(index)
            if not self.require_mano or bool(sample.right.mano_valid) or bool(sample.left.mano_valid):
                return mesh_consistent(sample, self.hand_model)
        raise ValueError(f"{type(self.dataset).__name__}: 100 draws found no sample with a MANO fit")

    def draw(self, n: int, generator: torch.Generator) -> HandBatch:
        return collate([self._one(generator) for _ in range(n)])


class PriorLabelSource:
    """Two-hand labels sampled from the pose prior of :mod:`hands.datasets.poses`, seen by random cameras.

    Args:
        hand_model: a HandModel (CPU).
        image_size: side of the (square) virtual image, pixels.
    """

    def __init__(self, hand_model, *, image_size: int = 256):
        self.hand_model = hand_model
        self.sampler = PoseSampler(hand_model)
        self.image_size = int(image_size)

    @torch.no_grad()
    def _one(self, rng: np.random.Generator, index: int) -> HandSample:
        size = self.image_size
        for _ in range(30):
            config, fits = self.sampler.sample_frame(rng)
            cam = random_rig(rng, size, 1)[0]
            R = torch.as_tensor(cam["R"], dtype=torch.float32)[None]
            t = -(R[0] @ torch.as_tensor(cam["position"], dtype=torch.float32))[None]
            K = make_intrinsics(cam["focal"], cam["princpt"])
            hands, in_view = {}, True
            for side, fit in fits.items():
                if fit is None:
                    hands[side] = None
                    continue
                pose_cam, _, verts_cam, _ = fit_to_camera_mesh(
                    self.hand_model,
                    side,
                    torch.as_tensor(fit.pose, dtype=torch.float32)[None],
                    torch.as_tensor(fit.shape, dtype=torch.float32)[None],
                    torch.as_tensor(fit.trans, dtype=torch.float32)[None],
                    R,
                    t,
                )
                joints_cam = self.hand_model.regress_joints(side, verts_cam[0])
                uv = project(verts_cam, K[None])[0]
                if (verts_cam[0, :, 2] < 0.1).any() or (uv < 0).any() or (uv > size - 1).any():
                    in_view = False
                hands[side] = make_hand_labels(
                    joints_cam=joints_cam,
                    joints_valid=torch.ones(21, dtype=torch.bool),
                    K=K,
                    image_size=(size, size),
                    mano_pose=pose_cam[0],
                    mano_shape=torch.as_tensor(fit.shape, dtype=torch.float32),
                    verts_cam=verts_cam[0],
                )
            if in_view:
                break
        right = hands["right"] if hands["right"] is not None else HandLabels.empty()
        left = hands["left"] if hands["left"] is not None else HandLabels.empty()
        hand_type = "interacting" if (hands["right"] is not None and hands["left"] is not None) else config.split("-")[1]
        return assemble_sample(
            image=torch.zeros(3, size, size),
            right=right,
            left=left,
            K=K,
            dist=None,
            hand_type=hand_type,
            meta={"dataset": "prior", "id": f"prior-{index}", "is_synthetic": True, "config": config},
        )

    def draw(self, n: int, generator: torch.Generator) -> HandBatch:
        seed = int(torch.randint(2**62, (1,), generator=generator))
        rng = np.random.default_rng(seed)
        return collate([self._one(rng, seed + i) for i in range(n)])
