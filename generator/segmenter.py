"""A silhouette-alignment score for generated hand images: the IoU between the hand mask a small segmenter
predicts on the image and the mesh silhouette the image was generated from.

The paper measures alignment with MSE-2D / MSE-3D: a hand pose estimator runs on the generated images and its
keypoints are compared with the conditioning pose. The embedded benchmark has no pretrained pose estimator that
would read blurry 64 px generated images, so the stand-in asks the simpler question the same way: does a model
that learnt what synthlab's hands look like find a hand where the mesh says there is one? The segmenter learns
hand masks from synthlab train-wild (the images and the exact masks rendered from their MANO meshes, framed as
the generator is), with blur and noise augmentation so that the generators' soft images are in its range, and is
checked on test-wild real images (docs/generator.md gives its IoU there: the score's ceiling). A generator whose
images ignore the meshes scores about what the segmenter finds at random places; one that draws hands on the
silhouettes approaches the real-image IoU.

    python -m generator.segmenter --out generator/weights/hand-segmenter.safetensors     # about 25 min on the shared 2-core machine under load, 600 steps

The weights ship with the project (generator/weights/hand-segmenter.safetensors, 0.4 MB); metadata in the file:
the framing, size, steps, seed and the test-wild IoU.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SHIPPED = Path(__file__).resolve().parent / "weights" / "hand-segmenter.safetensors"
MESH_THRESHOLD = 0.02  # a mesh image's pixel is on the silhouette when its brightest channel exceeds this


def silhouettes(mesh_images: Tensor) -> Tensor:
    """(B, 3, H, W) mesh renders in [0, 1] (black background) -> (B, 1, H, W) bool silhouettes."""
    return mesh_images.amax(1, keepdim=True) > MESH_THRESHOLD


class HandSegmenter(nn.Module):
    """A small fully convolutional network: (B, 3, H, W) RGB in [0, 1] -> (B, 1, H, W) hand logits. One stride-2
    level with dilated convolutions (a receptive field of about 40 px), a skip connection at full resolution."""

    def __init__(self, width: int = 24):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU())
        self.down = nn.Sequential(
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=2, dilation=2), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=4, dilation=4), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(3 * w, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        x = images * 2 - 1
        skip = self.stem(x)
        deep = F.interpolate(self.down(skip), size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(torch.cat([skip, deep], 1))


def iou(pred: Tensor, target: Tensor) -> Tensor:
    """(B, 1, H, W) bool masks -> (B,) intersection over union (1 where both are empty)."""
    inter = (pred & target).flatten(1).sum(1).float()
    union = (pred | target).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


@torch.no_grad()
def silhouette_iou(segmenter: HandSegmenter, images: Tensor, mesh_images: Tensor) -> Tensor:
    """The alignment score of each image: IoU of the segmenter's hand mask (probability > 0.5) with the mesh
    silhouette. images: (B, 3, H, W) in [0, 1]; mesh_images: (B, 3, H, W) the conditioning renders. Returns (B,)."""
    param = next(segmenter.parameters())
    was = segmenter.training
    segmenter.eval()
    try:
        logits = segmenter(images.to(param.device, param.dtype))
    finally:
        segmenter.train(was)
    return iou(logits > 0, silhouettes(mesh_images).to(logits.device)).to(images.device)


class SilhouetteScore:
    """`(images, batch) -> (B,)` IoU of the segmenter's hand mask with the silhouette of the batch's meshes, for
    `eval.genmetrics.GenerationEvaluator(silhouette_scorer=...)`. batch: the labels the images were generated from
    (verts_cam, camera.K in the images' pixels); only the hands with a mesh (valid and mano_valid) are drawn."""

    def __init__(self, segmenter: "HandSegmenter", faces_right: Tensor, faces_left: Tensor):
        self.segmenter, self.faces_right, self.faces_left = segmenter, faces_right, faces_left

    @torch.no_grad()
    def __call__(self, images: Tensor, batch) -> Tensor:
        from hands.render import render_hands

        batch = batch.to(images.device)
        rendered = render_hands(batch.right.verts_cam, batch.left.verts_cam, self.faces_right.to(images.device),
                                self.faces_left.to(images.device), batch.camera.K, tuple(images.shape[-2:]),
                                right_valid=batch.right.valid & batch.right.mano_valid,
                                left_valid=batch.left.valid & batch.left.mano_valid)
        return silhouette_iou(self.segmenter, images, rendered.image.to(images.dtype))


def load_segmenter(path: str | Path | None = None, device=None) -> HandSegmenter:
    """The segmenter saved by `save_segmenter` (default: the shipped one). FileNotFoundError names the path and
    the command that writes it."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path) if path is not None else SHIPPED
    if not path.is_file():
        raise FileNotFoundError(f"hand segmenter weights not found: {path} (write them with python -m "
                                f"generator.segmenter --out {path})")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    model = HandSegmenter(width=int(meta.get("width", 24)))
    model.load_state_dict(load_file(str(path)), strict=True)
    model.meta = meta
    return model.to(device).eval()


def save_segmenter(model: HandSegmenter, path: str | Path, metadata: dict) -> Path:
    from safetensors.torch import save_file

    from hands.paths import write_atomic

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {k: str(v) for k, v in metadata.items()}
    path = Path(path)
    write_atomic(path, lambda tmp: save_file(state, tmp, metadata=meta))
    return path


def framed_images_and_masks(split: str, size: int, *, data_root=None, framing: str = "hands", extend: float = 1.5,
                            limit: int | None = None, hand_model=None) -> tuple[Tensor, Tensor]:
    """(images (N, 3, S, S) in [0, 1], silhouettes (N, 1, S, S) bool) of a synthlab split, framed as the
    generator is (`generator.framing`); the silhouettes are rendered from the samples' MANO meshes."""
    from hands.datasets import build_dataset
    from hands.mano import HandModel

    from .train import FramedDataset, make_train_batch

    hand_model = hand_model if hand_model is not None else HandModel()
    data = FramedDataset(build_dataset("synthlab", data_root, split, hand_model=hand_model), size, extend, framing)
    n = len(data) if limit is None else min(limit, len(data))
    images, masks = [], []
    for lo in range(0, n, 32):
        batch = make_train_batch([data[i] for i in range(lo, min(lo + 32, n))], hand_model.faces_for("right"),
                                 hand_model.faces_for("left"))
        images.append(batch.rgb.float())
        masks.append(silhouettes(batch.mesh))
    return torch.cat(images), torch.cat(masks)


def augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """Random Gaussian blur (sigma 0-2 px, as the generators' soft images), colour gain and noise; flips."""
    import kornia

    b = images.shape[0]
    sigma = torch.rand(b, generator=generator) * 2.0
    out = torch.stack([kornia.filters.gaussian_blur2d(im[None], (7, 7), (float(s), float(s)))[0] if s > 0.2 else im
                       for im, s in zip(images, sigma)])
    gain = 0.8 + 0.4 * torch.rand(b, 3, 1, 1, generator=generator)
    out = out * gain + 0.03 * torch.randn(out.shape, generator=generator)
    return out.clamp(0, 1)


def train_segmenter(images: Tensor, masks: Tensor, *, steps: int = 600, batch_size: int = 16, lr: float = 3e-3,
                    seed: int = 0, width: int = 24, progress: bool = True) -> HandSegmenter:
    """Fit a HandSegmenter on (images, masks) with binary cross-entropy (positives weighted by the background /
    hand pixel ratio), AdamW, seeded; random flips and `augment`."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model = HandSegmenter(width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    pos = masks.float().mean().clamp(1e-3, 0.5)
    weight = (1 - pos) / pos
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in tqdm(range(steps), desc="segmenter", disable=not progress):
        idx = torch.randint(len(images), (batch_size,), generator=g)
        x, y = augment(images[idx], g), masks[idx].float()
        flip = torch.rand(batch_size, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        y = torch.where(flip[:, None, None, None], y.flip(-1), y)
        loss = F.binary_cross_entropy_with_logits(model(x), y, pos_weight=weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m generator.segmenter", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(SHIPPED), help=f"weights file ({SHIPPED})")
    p.add_argument("--data-root", help="synthlab folder (default: the cached synthlab)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--framing", choices=("frame", "hands"), default="hands")
    p.add_argument("--extend", type=float, default=1.5)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    images, masks = framed_images_and_masks("train-wild", args.size, data_root=args.data_root,
                                            framing=args.framing, extend=args.extend)
    model = train_segmenter(images, masks, steps=args.steps, seed=args.seed)
    test_images, test_masks = framed_images_and_masks("test-wild", args.size, data_root=args.data_root,
                                                      framing=args.framing, extend=args.extend)
    with torch.no_grad():
        test_iou = float(iou(model(test_images) > 0, test_masks).mean())
        train_iou = float(iou(model(images) > 0, masks).mean())
        blurred = kornia_blur(test_images, 1.5)
        blur_iou = float(iou(model(blurred) > 0, test_masks).mean())
    meta = {"width": 24, "size": args.size, "framing": args.framing, "extend": args.extend, "steps": args.steps,
            "seed": args.seed, "train_wild_iou": round(train_iou, 4), "test_wild_iou": round(test_iou, 4),
            "test_wild_blur1.5_iou": round(blur_iou, 4)}
    save_segmenter(model, args.out, meta)
    print(json.dumps(meta))
    return 0


def kornia_blur(images: Tensor, sigma: float) -> Tensor:
    import kornia

    return kornia.filters.gaussian_blur2d(images, (7, 7), (sigma, sigma))


if __name__ == "__main__":
    sys.exit(main())
