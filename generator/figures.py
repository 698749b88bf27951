"""Figures of the generator: attention maps per hand token without / with TAS (paper Figs. 2 and 9) and several
samples from one mesh (Fig. 11a), written as PNGs.

    python -m generator.figures --out docs/images                 # tiny generator, a synthlab test-wild mesh
    python -m generator.figures --out figs --generator-config sd15 --sd-path /models/sd15 \\
        --guidance-path runs/gen-sd15/guidance.safetensors --size 512 --steps 20 --tas-steps 10

Attention maps: AttentionHandPipeline's `return_attention` maps (conditional cross-attention at the TAS
resolution, averaged over heads, layers and denoising steps) of each hand-related token, min-max normalised per
map, upsampled (bilinear) to the image size, coloured (jet) and laid over the generated image. One row per
setting (without TAS, with TAS on the first k steps, same seed), one column per hand token with the token's text
as the caption; the first column is the generated image itself.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

CAPTION_HEIGHT = 14
PAD = 2


def to_pil(image: Tensor):
    """(3, H, W) in [0, 1] -> PIL RGB image."""
    from PIL import Image

    return Image.fromarray((image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())


def heat_overlay(image: Tensor, attention: Tensor, alpha: float = 0.5) -> Tensor:
    """image (3, H, W) in [0, 1]; attention (h, w) map -> (3, H, W): the map min-max normalised, upsampled
    bilinearly to (H, W), coloured with the jet colour map and blended over the image with weight alpha."""
    from kornia.color import ColorMap, ColorMapType, apply_colormap

    a = attention.float()
    a = (a - a.min()) / (a.max() - a.min()).clamp_min(1e-12)
    a = F.interpolate(a[None, None], size=image.shape[-2:], mode="bilinear", align_corners=False).clamp(0, 1)
    heat = apply_colormap(a, ColorMap(base=ColorMapType.jet, num_colors=256, device=a.device))[0]
    return (1 - alpha) * image.float() + alpha * heat.to(image.device)


def token_texts(tokenizer, prompt: str, positions: Sequence[int]) -> list[str]:
    """The BPE text of the CLIP tokens at `positions` of the prompt (end-of-word marks removed)."""
    ids = tokenizer(prompt, truncation=True, max_length=77).input_ids
    return [tokenizer.convert_ids_to_tokens(ids[p]).replace("</w>", "") for p in positions]


def labelled_grid(rows: Sequence[Sequence[Tensor]], captions: Sequence[Sequence[str]],
                  row_labels: Sequence[str] = ()):
    """A PIL image of tiles (3, S, S) in [0, 1] with a caption under each (PIL ImageDraw). rows: lists of
    tiles (ragged rows are padded with black); captions: same layout; row_labels: written on each row's first tile."""
    from PIL import Image, ImageDraw

    size = rows[0][0].shape[-1]
    cols = max(len(r) for r in rows)
    cell_w, cell_h = size + PAD, size + CAPTION_HEIGHT + PAD
    canvas = Image.new("RGB", (cols * cell_w + PAD, len(rows) * cell_h + PAD), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (tiles, texts) in enumerate(zip(rows, captions)):
        for j, (tile, text) in enumerate(zip(tiles, texts)):
            x, y = PAD + j * cell_w, PAD + i * cell_h
            canvas.paste(to_pil(tile), (x, y))
            draw.text((x + 1, y + size + 1), text[: max(size // 6, 4)], fill=(0, 0, 0))
        if i < len(row_labels) and row_labels[i]:
            draw.text((PAD + 2, PAD + i * cell_h + 1), row_labels[i], fill=(255, 255, 255))
    return canvas


@torch.no_grad()
def attention_figure(pipe, mesh_image: Tensor, prompt: str, *, tas_steps: int, seed: int = 0,
                     num_inference_steps: int | None = None, local_mesh_image: Tensor | None = None):
    """Figs. 2 / 9: rows "w/o TAS" and "w/ TAS k" (k = tas_steps updates), columns: the image, then each hand token's
    attention map over it. mesh_image (1, 3, S, S) in [0, 1]. Returns (PIL image, {"tokens": [...],
    "maps": {"without": (h, w, 77), "with": (h, w, 77)}})."""
    outputs = {}
    for key, k in (("without", 0), ("with", tas_steps)):
        outputs[key] = pipe(mesh_image, local_mesh_image, [prompt], generator=torch.Generator(
            device=mesh_image.device).manual_seed(seed), num_inference_steps=num_inference_steps, tas_steps=k,
            return_attention=True)
    positions = outputs["without"].token_indices[0]
    if not positions:
        raise ValueError(f"prompt {prompt!r} has no hand-related word (hand, hands, finger(s), gesture or a VBG "
                         "verb): there is no hand token to show")
    words = token_texts(pipe.tokenizer, prompt, positions)
    rows, captions = [], []
    for key, label in (("without", "w/o TAS"), ("with", f"w/ TAS {tas_steps}")):  # fits under a 64 px tile
        out = outputs[key]
        image, maps = out.images[0], out.attention_maps[0]
        rows.append([image] + [heat_overlay(image, maps[..., p]) for p in positions])
        captions.append([label] + words)
    figure = labelled_grid(rows, captions)
    return figure, {"tokens": words, "maps": {k: v.attention_maps[0] for k, v in outputs.items()}}


@torch.no_grad()
def samples_figure(pipe, mesh_image: Tensor, prompt: str, *, num_samples: int = 4, seed: int = 0,
                   num_inference_steps: int | None = None, local_mesh_image: Tensor | None = None):
    """Fig. 11a: the mesh image, then num_samples images generated from it with seeds seed, seed+1, ...
    mesh_image (1, 3, S, S). Returns (PIL image, images (num_samples, 3, S, S))."""
    b = num_samples
    local = None if local_mesh_image is None else local_mesh_image.expand(b, -1, -1, -1)
    gens = [torch.Generator(device=mesh_image.device).manual_seed(seed + i) for i in range(b)]
    images = pipe(mesh_image.expand(b, -1, -1, -1), local, [prompt] * b, generator=gens,
                  num_inference_steps=num_inference_steps).images
    figure = labelled_grid([[mesh_image[0]] + list(images)], [["mesh"] + [f"seed {seed + i}" for i in range(b)]])
    return figure, images


def mesh_from_dataset(dataset: str, root, split: str, index: int, size: int, *, hand_model=None, extend=1.5,
                      framing: str = "frame"):
    """(mesh (1, 3, S, S), local mesh (1, 3, S, S), caption) of one sample, framed (`generator.framing`) and
    rendered as in training."""
    from hands.datasets import build_dataset
    from hands.mano import HandModel

    from .train import frame_sample, make_train_batch

    hand_model = hand_model if hand_model is not None else HandModel()
    data = build_dataset(dataset, root, split, hand_model=hand_model)
    if not 0 <= index < len(data):
        raise IndexError(f"--index {index} outside the {len(data)} samples of {dataset} {split}")
    batch = make_train_batch([frame_sample(data[index], size, extend, framing)], hand_model.faces_for("right"),
                             hand_model.faces_for("left"))
    return batch.mesh, batch.mesh_local, batch.prompts[0]


def main(argv: Sequence[str] | None = None) -> int:
    from .train import user_errors

    try:
        return _main(argv)
    except user_errors() as error:
        print(f"generator.figures: error: {' '.join(str(error).split()) or type(error).__name__}", file=sys.stderr)
        return 2


def add_pipeline_arguments(p: argparse.ArgumentParser) -> None:
    """The flags :func:`pipeline_from_args` reads, and the mesh source's (``--dataset``, ``--data-root``,
    ``--split``, ``--device``): one definition for generator.figures and generator.tas_effect."""
    p.add_argument("--generator-config", default="tiny-synthlab", help="tiny-synthlab (shipped) | tiny | sd15 | a YAML path")
    p.add_argument("--sd-path", help="local Stable Diffusion 1.5 folder (diffusers layout)")
    p.add_argument("--guidance-path", help="trained guidance weights (generator.train's guidance.safetensors)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--dataset", default="synthlab")
    p.add_argument("--data-root", help="dataset folder (default: the cached synthlab)")
    p.add_argument("--split", default="test-wild")
    p.add_argument("--device", default="auto")


def pipeline_from_args(args: argparse.Namespace):
    """(generator config, device, pipeline on it) from ``--generator-config``, ``--sd-path``, ``--guidance-path``,
    ``--set KEY=VALUE`` (``overrides``) and ``--device`` (the flags of generator.figures and generator.tas_effect)."""
    from .model import load_config
    from .pipeline import AttentionHandPipeline
    from .train import resolve_device

    overrides = list(args.overrides)
    if args.sd_path:
        overrides.append(f"sd_path={args.sd_path}")
    if args.guidance_path:
        overrides.append(f"guidance_path={args.guidance_path}")
    gen_cfg = load_config(args.generator_config, overrides)
    device = resolve_device(args.device)
    return gen_cfg, device, AttentionHandPipeline.from_config(gen_cfg).to(device)


def _main(argv: Sequence[str] | None) -> int:
    p = argparse.ArgumentParser(prog="python -m generator.figures", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the PNGs")
    add_pipeline_arguments(p)
    p.add_argument("--index", type=int, default=0, help="which sample's mesh to use")
    p.add_argument("--prompt", help="text prompt (default: the sample's caption)")
    p.add_argument("--size", type=int, help="resolution (default: 64 tiny, 512 SD)")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps")
    p.add_argument("--tas-steps", type=int, default=5, help="TAS updates (first k steps) of the w/ TAS row")
    p.add_argument("--samples", type=int, default=4, help="images generated from one mesh (Fig. 11a)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    gen_cfg, device, pipe = pipeline_from_args(args)
    size = args.size or pipe.default_size
    mesh, local, caption = mesh_from_dataset(args.dataset, args.data_root, args.split, args.index, size,
                                             extend=gen_cfg.extend, framing=gen_cfg.framing)
    prompt = args.prompt or caption
    mesh, local = mesh.to(device), local.to(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figure, info = attention_figure(pipe, mesh, prompt, tas_steps=min(args.tas_steps, args.steps), seed=args.seed,
                                    num_inference_steps=args.steps)
    figure.save(out / "generator-attention-tas.png")
    samples, _ = samples_figure(pipe, mesh, prompt, num_samples=args.samples, seed=args.seed,
                                num_inference_steps=args.steps)
    samples.save(out / "generator-samples.png")
    print(f"prompt: {prompt!r}; hand tokens: {info['tokens']}")
    print(f"wrote {out / 'generator-attention-tas.png'} and {out / 'generator-samples.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
