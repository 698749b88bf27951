"""SyntheticSource: labels -> global and local mesh images -> prompt -> generator -> a HandBatch.

For each requested sample the source draws labels (MANO meshes, joints and a camera) from a label source
(:mod:`mixing.labels`), frames them in a square window (the whole source frame, or the union of the hand boxes
grown by ``extend``: :mod:`generator.framing`) at the generator's resolution, renders the global mesh image there with
:func:`hands.render.render_hands` and the local mesh image with :func:`hands.render.crop_local`, draws a
prompt naming the hands it shows from a seeded :class:`generator.prompts.PromptBank`, and runs the generator.
The returned :class:`hands.sample.HandBatch` holds the generated RGB images and *exactly the labels that were
rendered* (the camera intrinsics, joints_img and boxes are those of the framed window); everything stays on the
device. Random numbers derive from (seed, rank, call counter), so runs repeat and ranks differ.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import torch
from torch import Tensor

from generator.prompts import PromptBank, shown_hands
from generator.framing import window_boxes
from hands.camera import apply_affine, bbox_crop_affine, inside_image, transform_intrinsics
from hands.render import crop_local, render_hands
from hands.sample import Camera, HandBatch, HandLabels

__all__ = ["ImageGenerator", "LabelSource", "SyntheticSource", "frame_labels", "hands_union_box", "keep_rendered_hands"]


class ImageGenerator(Protocol):
    """What the source needs of a generator (AttentionHandPipeline and the baselines of Table A):
    ``__call__(mesh_images (B,3,S,S), local_mesh_images (B,3,S,S) | None, prompts, *, generator=list of B
    torch.Generators) -> object with .images (B, 3, S, S) in [0, 1]``."""

    def __call__(self, mesh_images: Tensor, local_mesh_images: Tensor | None, prompts: Sequence[str], *, generator): ...


class LabelSource(Protocol):
    """``draw(n, generator) -> HandBatch`` of labels with black images (never a dataset's images)."""

    def draw(self, n: int, generator: torch.Generator) -> HandBatch: ...


def hands_union_box(batch: HandBatch) -> Tensor:
    """(B, 4) union of the valid hands' boxes (x0, y0, x1, y1 pixels); the whole image where none is valid."""
    big = torch.finfo(batch.image.dtype).max
    boxes = torch.stack([batch.right.bbox, batch.left.bbox], 1)  # (B, 2, 4)
    valid = torch.stack([batch.right.valid, batch.left.valid], 1)[..., None]  # (B, 2, 1)
    lo = torch.where(valid, boxes[..., :2], boxes.new_tensor(big)).amin(1)
    hi = torch.where(valid, boxes[..., 2:], boxes.new_tensor(-big)).amax(1)
    height, width = batch.image.shape[-2:]
    whole = boxes.new_tensor([0.0, 0.0, width - 1.0, height - 1.0]).expand(len(batch), 4)
    return torch.where(valid.any(1), torch.cat([lo, hi], -1), whole)


def _warp_hand(hand: HandLabels, affine: Tensor, size: int) -> HandLabels:
    joints_img = apply_affine(hand.joints_img, affine)
    corners = hand.bbox.reshape(-1, 2, 2)  # (B, 2, 2): (x0, y0), (x1, y1); the warp has no rotation
    corners = apply_affine(corners, affine)
    bbox = torch.cat([corners.amin(1), corners.amax(1)], -1)
    keep = hand.valid[:, None]
    return dataclasses.replace(
        hand,
        joints_img=torch.where(hand.joints_valid[..., None], joints_img, torch.zeros_like(joints_img)),
        # a generated image shows the whole rendered hand: a joint is in 2D wherever it lies in the window
        joints_trunc=hand.joints_valid & inside_image(joints_img, (size, size)),
        bbox=torch.where(keep, bbox, torch.zeros_like(bbox)),
    )


def frame_labels(labels: HandBatch, size: int, extend: float = 1.5, framing: str = "frame") -> HandBatch:
    """Re-frame a label batch on a (size, size) square window (:func:`generator.framing.window_boxes`).

    labels: HandBatch whose image fixes the source image size; framing ``"frame"``: the window is the whole
    source image, squared about its centre (the paper's global image); ``"hands"``: the union of the valid
    hand boxes made square and grown by ``extend``. Camera-space labels are unchanged; ``camera.K``,
    ``joints_img`` and ``bbox`` move to the window; the image becomes black (size, size).
    """
    box = window_boxes(hands_union_box(labels), tuple(labels.image.shape[-2:]), framing, extend)
    affine = bbox_crop_affine(box, (size, size))  # (B, 2, 3), source pixels -> window pixels
    return dataclasses.replace(
        labels,
        image=labels.image.new_zeros(len(labels), 3, size, size),
        right=_warp_hand(labels.right, affine, size),
        left=_warp_hand(labels.left, affine, size),
        camera=Camera(K=transform_intrinsics(labels.camera.K, affine), dist=labels.camera.dist),
    )


def keep_rendered_hands(labels: HandBatch) -> HandBatch:
    """Only hands with a mesh (``mano_valid``) are rendered, so only they stay valid; ``rel_root_valid`` and
    ``hand_type`` follow. A generated image shows exactly the hands its labels say it shows."""
    hands = {}
    for side in ("right", "left"):
        hand = getattr(labels, side)
        keep = hand.valid & hand.mano_valid
        hands[side] = dataclasses.replace(
            hand, valid=keep, joints_valid=hand.joints_valid & keep[:, None], joints_trunc=hand.joints_trunc & keep[:, None]
        )
    both = hands["right"].valid & hands["left"].valid
    hand_type = [
        "interacting" if b else ("right" if r else "left")
        for b, r in zip(both.tolist(), hands["right"].valid.tolist())
    ]
    return dataclasses.replace(
        labels, right=hands["right"], left=hands["left"], rel_root_valid=labels.rel_root_valid & both, hand_type=hand_type
    )


class SyntheticSource:
    """Generated two-hand samples whose labels are exactly the rendered ones.

    Args:
        labels: a :class:`LabelSource` (training-set annotations or a pose prior).
        generator: an :class:`ImageGenerator` (AttentionHandPipeline or a baseline).
        faces_right, faces_left: (F, 3) mesh faces of the hand model the labels were made with.
        size: generator resolution S (square images), e.g. 512 for SD 1.5, 64 for the tiny generator.
        use_local: pass local mesh images to the generator; off by default: the generated images are the
            global branch's, the reference's inference samples that branch only, and the global images do not
            depend on the local rows (tests/test_mixing_source.py), so the local branch would only double the
            generator's batch.
        framing: the global window, ``"frame"`` (the whole source image, the paper's) or ``"hands"`` (the union
            of the hand boxes, squared, grown by ``extend``), see :mod:`generator.framing`.
        local_scale: the local crop's square hand box is grown by this factor.
        framing, extend and local_scale must be those the generator was trained with (its config's
        ``framing`` / ``extend``; :func:`mixing.build.build_source` passes them), so the generator sees at
        sampling the conditions it learned from.
        prompts: the prompt bank; seed, rank: random streams; device: where everything runs.
        sampling: extra keyword arguments for the generator call (num_inference_steps, guidance_scale, ...).
        blank_mesh: render the conditioning without hands (``mixing.mesh_condition=blank``): the generator gets
            empty mesh images, so its images do not follow the labels they are returned with (a control).
    """

    def __init__(
        self,
        *,
        labels: LabelSource,
        generator: ImageGenerator,
        faces_right: Tensor,
        faces_left: Tensor,
        size: int,
        use_local: bool = False,
        framing: str = "frame",
        extend: float = 1.5,
        local_scale: float = 1.0,
        prompts: PromptBank | None = None,
        seed: int = 0,
        rank: int = 0,
        device: torch.device | str = "cpu",
        sampling: dict | None = None,
        blank_mesh: bool = False,
    ):
        self.labels = labels
        self.generator = generator
        self.device = torch.device(device)
        self.faces_right = faces_right.to(self.device)
        self.faces_left = faces_left.to(self.device)
        self.size = int(size)
        self.use_local = use_local
        self.framing = framing
        self.extend = extend
        self.local_scale = local_scale
        self.prompts = prompts or PromptBank()
        self.seed = seed
        self.rank = rank
        self.sampling = dict(sampling or {})
        self.blank_mesh = bool(blank_mesh)
        self._calls = 0

    def _stream_seed(self, call: int) -> int:
        return (self.seed * 1_000_003 + self.rank * 7_919 + call) % (2**63 - 1)

    def render_conditions(self, framed: HandBatch, local: bool = True) -> tuple[Tensor, Tensor | None]:
        """Global and local mesh images, (B, 3, S, S) each, of a framed label batch (local None when not
        ``local``; with ``blank_mesh`` both are rendered without hands)."""
        right_valid, left_valid = framed.right.valid, framed.left.valid
        if self.blank_mesh:
            right_valid, left_valid = torch.zeros_like(right_valid), torch.zeros_like(left_valid)
        rendered = render_hands(
            framed.right.verts_cam,
            framed.left.verts_cam,
            self.faces_right,
            self.faces_left,
            framed.camera.K,
            (self.size, self.size),
            right_valid=right_valid,
            left_valid=left_valid,
        )
        if not local:
            return rendered.image, None
        return rendered.image, crop_local(rendered.image, hands_union_box(framed), self.size, scale=self.local_scale)

    def generate(self, n: int, *, call: int | None = None) -> HandBatch:
        """``n`` new samples on the device: generated images + the labels they were generated from.

        call: index of the random stream to use (default: the next one); ``python -m mixing.pregenerate``
        passes the shard index so that a resumed run writes the same shards."""
        if call is None:
            call = self._calls
            self._calls += 1
        host_gen = torch.Generator().manual_seed(self._stream_seed(call))
        labels = self.labels.draw(n, host_gen)
        # a prompt names the hands the mesh image shows; the blank-mesh control shows none of its labels, so its
        # prompts stay two-hand ones and carry no label either
        hands = ["both"] * n if self.blank_mesh else shown_hands(labels)
        prompts = self.prompts.sample(n, host_gen, hands=hands)
        labels = labels.to(self.device, non_blocking=True)
        framed = keep_rendered_hands(frame_labels(labels, self.size, self.extend, self.framing))
        mesh_images, local_mesh_images = self.render_conditions(framed, local=self.use_local)
        noise_seeds = torch.randint(2**62, (n,), generator=host_gen).tolist()
        generators = [torch.Generator(device=self.device).manual_seed(s) for s in noise_seeds]
        out = self.generator(
            mesh_images, local_mesh_images if self.use_local else None, prompts, generator=generators, **self.sampling
        )
        images = out.images.to(self.device).clamp(0, 1)
        if tuple(images.shape) != (n, 3, self.size, self.size):
            raise ValueError(f"generator returned images of shape {tuple(images.shape)}, expected {(n, 3, self.size, self.size)}")
        meta = [
            {
                "id": f"gen-{self.rank}-{call}-{i}",
                "label_id": f"{m.get('dataset', '?')}/{m.get('id', '?')}",
                "dataset": "attentionhand",
                "is_synthetic": True,
                "prompt": prompts[i],
            }
            for i, m in enumerate(labels.meta)
        ]
        return dataclasses.replace(framed, image=images, meta=meta)
