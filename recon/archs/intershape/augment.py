"""InterShape's training augmentation: InterNet's (training release ``common/utils/preprocessing.py``
``get_aug_config`` / ``augmentation``, which InterShape's training uses) on :class:`hands.sample.HandSample`, drawn
from a torch.Generator:

1. translation: the box moved by U(-0.15, 0.15) x its width and x its height;
2. scale 1 + 0.25 clip(N, -1, 1) (a larger scale shows more context);
3. rotation 45 clip(N, -2, 2) degrees with probability 0.6, else 0;
4. horizontal flip with probability 0.5 (sides swap);
5. colour: each channel x U(0.8, 1.2).

It is InterWild's augmentation (:class:`hands.datasets.transforms.InterWildAugment`, the same scheme with a 30 degree
rotation and no translation) with InterNet's rotation and translation; the box is the run's ``data.crop`` (InterShape
reads ``hands``: the union of the hand boxes x1.3; InterNet's box is the annotation's hand box x1.25).
"""
from __future__ import annotations

import torch

from hands.camera import scale_bbox, square_bbox
from hands.datasets.transforms import InterWildAugment, _image_box, color_scale, crop, hands_box, hflip
from hands.sample import HandSample

__all__ = ["InterNetAugment"]


class InterNetAugment(InterWildAugment):
    """InterNet's augmentation (module docstring) then the crop to ``out_size``. ``shift``: the translation range as
    a fraction of the box (0.15); the other arguments as :class:`InterWildAugment`'s, with InterNet's rotation."""

    def __init__(self, out_size: tuple[int, int] = (256, 256), *, shift: float = 0.15, rot_sigma_deg: float = 45.0,
                 box: str = "hands", **kwargs) -> None:
        super().__init__(out_size, rot_sigma_deg=rot_sigma_deg, box=box, **kwargs)
        self.shift = shift

    def draw(self, generator: torch.Generator | None = None) -> dict:
        """InterWildAugment's parameters and ``shift`` (2,) in [-shift, shift], a fraction of the box."""
        params = super().draw(generator)
        params["shift"] = (torch.rand(2, generator=generator) * 2.0 - 1.0) * self.shift
        return params

    def apply(self, sample: HandSample, params: dict) -> HandSample:
        box = _image_box(sample) if self.box == "image" else hands_box(sample, 1.3)
        out_h, out_w = self.out_size
        box = square_bbox(box, aspect=out_w / out_h)
        size = box[2:] - box[:2]
        moved = params["shift"].to(box) * size
        box = scale_bbox(torch.cat([box[:2] + moved, box[2:] + moved]), params["scale"])
        out = crop(sample, box, self.out_size, rotation_deg=params["rotation_deg"])
        out = color_scale(out, params["color"])
        if params["flip"]:
            out = hflip(out)
        out.meta["augment"] = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in params.items()}
        return out
