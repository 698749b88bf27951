"""The generator's window on a sample: the whole frame (the paper's global image) or a window around the hands.

The paper's global image is the whole input image resized to the generator size, its local image the hand box
(§3.2, Fig. 3). `framing="frame"` does that: the window is the whole image, made square about its centre (a
non-square image is padded, never stretched, so the window is still a pinhole camera and the labels stay
exact). `framing="hands"` is the option the project used before: the union of the valid hand boxes, squared and
grown by `extend` (1.5), for data whose frames are large and whose hands are small (e.g. in-the-wild photos at a
64 px generator). Both `generator.train` and `mixing` frame with `window_boxes`, so a generator samples in the
framing it was trained in (the generator config's `framing` / `extend`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from hands.camera import scale_bbox, square_bbox

FRAMINGS = ("frame", "hands")


def frame_box(height: int, width: int, *, dtype=torch.float32, device=None) -> Tensor:
    """(4,) the box whose crop is the whole image resized: pixel edges (-0.5, -0.5, W - 0.5, H - 0.5) (pixel
    centres at integers, as `hands.camera.bbox_crop_affine`)."""
    return torch.tensor([-0.5, -0.5, width - 0.5, height - 0.5], dtype=dtype, device=device)


def window_boxes(hands_union: Tensor, image_hw: tuple[int, int], framing: str = "frame",
                 extend: float = 1.5) -> Tensor:
    """(..., 4) square windows x0 y0 x1 y1 (pixels) for `framing`.

    hands_union: (..., 4) union of the valid hand boxes (used by "hands" only); image_hw: the source image's
    (H, W). "frame": the whole image, squared about its centre; "hands": the union box squared and x extend."""
    if framing == "frame":
        box = frame_box(int(image_hw[0]), int(image_hw[1]), dtype=hands_union.dtype, device=hands_union.device)
        return square_bbox(box.expand_as(hands_union))
    if framing == "hands":
        return scale_bbox(square_bbox(hands_union), extend)
    raise ValueError(f"framing {framing!r}: expected one of {', '.join(FRAMINGS)}")
