"""DIR's training augmentation (reference: ``dataset/interhand.py`` ``InterHandDataset.__getitem__`` and
``utils/utils.py`` ``imgUtils``) on :class:`hands.sample.HandSample`, drawn from a torch.Generator.

The reference augments IntagHand's 256 px crops holding both hands:

1. ``get_aug_config(0.1, 180, 10, True)``: scale 1 + U(-0.1, 0.1), rotation U(-180, 180) degrees, shift
   U(-10, 10) px in x and y, horizontal flip with probability 0.5 (sides swap);
2. with probability 0.3 ``motion_blur``: a line kernel of size randint(3, 10) (3..9 px), rotated by
   ``np.random.uniform(-180, 180) * pi / 180`` handed to ``cv2.getRotationMatrix2D``, which reads degrees: the
   line turns by at most +-3.14 degrees, so the blur is nearly along the crop's x axis before the rotation of
   step 3 turns it with the image (reproduced as it trains);
3. the affine (rotation and scale about the crop's centre, then the shift) on image and 2D labels, the 3D labels
   back-projected from the moved 2D points and their depths;
4. ``add_noise(noise=0.01)``: per channel x U(0.7, 1.3), plus 255 x 0.05 x U(-1, 1), plus Gaussian noise of
   standard deviation 0.01 x 255, clipped to [0, 255].

Here the crop is IntagHand's (``data.crop: verts``: the square of 1.25x both hands' projected vertex extent; or
the union of the hand boxes x1.3, or the whole image) and the scale, rotation and shift move that crop window, so the image is resampled once and every label stays
consistent (:func:`hands.datasets.transforms.crop`: the rotation turns the 3D labels about the optical axis,
:func:`hflip` mirrors them). The blur is applied to the output with its line turned by the same rotation (and
mirrored with a flip), which equals blurring before the affine up to the kernel's scale.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from kornia.geometry.transform import rotate as rotate_image
from torch import Tensor

from hands.camera import scale_bbox, square_bbox
from hands.datasets.transforms import crop, hands_box, hflip, vertex_box
from hands.sample import HandSample

__all__ = ["DIRAugment", "motion_blur_kernel", "motion_blur"]


def motion_blur_kernel(size: int, angle_deg: float, *, dtype=torch.float32, device=None) -> Tensor:
    """(size, size) normalised line kernel: ones along row (size - 1) // 2, turned counter-clockwise (on screen)
    by ``angle_deg`` about ((size - 1) / 2, (size - 1) / 2), bilinear (``imgUtils.motion_blur``'s kernel)."""
    kernel = torch.zeros(1, 1, size, size, dtype=dtype, device=device)
    kernel[..., (size - 1) // 2, :] = 1.0
    centre = torch.tensor([[(size - 1) / 2.0, (size - 1) / 2.0]], dtype=dtype, device=device)
    turned = rotate_image(kernel, torch.tensor([float(angle_deg)], dtype=dtype, device=device), center=centre)[0, 0]
    return turned / turned.sum()


def motion_blur(image: Tensor, size: int, angle_deg: float) -> Tensor:
    """image: (3, H, W) in [0, 1] -> the image correlated with :func:`motion_blur_kernel` (``cv2.filter2D``:
    anchor at (size // 2, size // 2), reflect-101 borders)."""
    kernel = motion_blur_kernel(size, angle_deg, dtype=image.dtype, device=image.device)
    before, after = size // 2, size - 1 - size // 2
    padded = F.pad(image[None], (before, after, before, after), mode="reflect")
    return F.conv2d(padded, kernel.expand(3, 1, size, size), groups=3)[0]


class DIRAugment:
    """DIR's training augmentation (module docstring), then the crop to ``out_size``.

    Args (keyword-only after out_size): scale_range (0.1), rotation_deg (180), shift_px (10, in pixels of a
    ``shift_reference`` = 256 px crop, scaled to ``out_size``), flip_prob (0.5), blur_prob (0.3), blur_sizes (3, 9)
    inclusive, blur_angle_deg (pi: the reference's radians read as degrees), color_range (0.7, 1.3), brightness
    (0.05), noise_std (0.01), box: "verts" (IntagHand's crop, which DIR's data is: the square of 1.25x both hands'
    projected vertex extent, :func:`hands.datasets.transforms.vertex_box`), "hands" (the union of the hand boxes
    x1.3) or "image".
    """

    def __init__(
        self,
        out_size: tuple[int, int] = (256, 256),
        *,
        scale_range: float = 0.1,
        rotation_deg: float = 180.0,
        shift_px: float = 10.0,
        shift_reference: int = 256,
        flip_prob: float = 0.5,
        blur_prob: float = 0.3,
        blur_sizes: tuple[int, int] = (3, 9),
        blur_angle_deg: float = math.pi,
        color_range: tuple[float, float] = (0.7, 1.3),
        brightness: float = 0.05,
        noise_std: float = 0.01,
        box: str = "verts",
    ) -> None:
        if box not in ("verts", "hands", "image"):
            raise ValueError(f"box must be 'verts', 'hands' or 'image', got {box!r}")
        self.out_size = tuple(out_size)
        self.scale_range, self.rotation_deg = scale_range, rotation_deg
        self.shift_px, self.shift_reference = shift_px, shift_reference
        self.flip_prob, self.blur_prob, self.blur_sizes, self.blur_angle_deg = flip_prob, blur_prob, tuple(blur_sizes), blur_angle_deg
        self.color_range, self.brightness, self.noise_std = tuple(color_range), brightness, noise_std
        self.box = box

    def draw(self, generator: torch.Generator | None = None) -> dict:
        """One set of parameters: scale, rotation_deg, shift (x, y output px), flip, blur (None or (size,
        angle_deg)), color (3,), brightness offset, noise_seed."""
        u = torch.rand(11, generator=generator)
        symmetric = lambda k: float(2.0 * u[k] - 1.0)  # noqa: E731  U(-1, 1)
        scale_out = self.out_size[1] / self.shift_reference
        low, high = self.blur_sizes
        blur = None
        if float(u[5]) < self.blur_prob:
            size = low + min(int(float(u[6]) * (high - low + 1)), high - low)
            blur = (size, self.blur_angle_deg * symmetric(7))
        c_low, c_high = self.color_range
        return {
            "scale": 1.0 + self.scale_range * symmetric(0),
            "rotation_deg": self.rotation_deg * symmetric(1),
            "shift": (self.shift_px * scale_out * symmetric(2), self.shift_px * scale_out * symmetric(3)),
            "flip": bool(u[4] < self.flip_prob),
            "blur": blur,
            "color": (c_low + (c_high - c_low) * torch.rand(3, generator=generator)).tolist(),
            "brightness": self.brightness * symmetric(8),
            "noise_seed": int(torch.randint(0, 2**31 - 1, (1,), generator=generator)),
        }

    def apply(self, sample: HandSample, params: dict) -> HandSample:
        if self.box == "verts":
            box = vertex_box(sample).to(device=sample.image.device, dtype=sample.camera.K.dtype)
        elif self.box == "hands":
            box = hands_box(sample, 1.3)
        else:
            height, width = sample.image_size
            box = torch.tensor([0.0, 0.0, width - 1.0, height - 1.0], dtype=sample.camera.K.dtype, device=sample.image.device)
        out_h, out_w = self.out_size
        box = square_bbox(box, aspect=out_w / out_h)
        # content magnified by `scale` and moved by `shift` output pixels <=> the window shrunk and moved back
        box = scale_bbox(box, 1.0 / params["scale"])
        per_pixel = (box[2] - box[0]) / out_w
        shift = box.new_tensor(params["shift"]) * per_pixel
        box = box - torch.cat([shift, shift])
        out = crop(sample, box, self.out_size, rotation_deg=params["rotation_deg"])
        if params["flip"]:
            out = hflip(out)
        image = out.image
        if params["blur"] is not None:
            size, angle = params["blur"]
            # the reference blurs before its affine: the line turns with the content (mirrored by a flip)
            turned = angle + params["rotation_deg"]
            image = motion_blur(image, size, -turned if params["flip"] else turned)
        generator = torch.Generator().manual_seed(params["noise_seed"])
        noise = torch.randn(image.shape, generator=generator).to(image) * self.noise_std
        color = image.new_tensor(params["color"]).reshape(3, 1, 1)
        image = (image * color + params["brightness"] + noise).clamp(0.0, 1.0)
        out = dataclasses.replace(out, image=image, meta=dict(out.meta))
        out.meta["augment"] = {k: (v.tolist() if isinstance(v, Tensor) else v) for k, v in params.items()}
        return out

    def __call__(self, sample: HandSample, generator: torch.Generator | None = None) -> HandSample:
        return self.apply(sample, self.draw(generator))
