"""What TAS does to a generator: attention, L_TAS, images and silhouette alignment, with vs without TAS.

    python -m generator.tas_effect --samples 16 --out docs/results          # the shipped generator
    python -m generator.tas_effect --generator-config sd15 --sd-path /models/sd15 \\
        --guidance-path runs/gen-sd15/guidance.safetensors --samples 16 --out runs/tas-effect

For N meshes of a dataset split (synthlab test-wild by default, spread over the split; framed as the generator
was trained, `generator.framing`) and their captions, the generator samples each image twice with the same seed:
without TAS and with TAS on the first k denoising steps (`--tas-steps`, default the config's sampling.tas_steps,
else 10; Attend-and-Excite's sampling: one latent update X <- X - alpha_i grad L_TAS before the guided step of
each of the first k steps). The global branch only, as the reference's inference. Written to
`DIR/tas-effect.json`:

- `l_tas_with_tas`, `l_tas_without_tas`: L_TAS (Eq. 3) of the conditional cross-attention maps averaged over
  heads, layers and denoising steps (the maps of Fig. 9), mean over samples;
- `tas_update_loss_first`, `tas_update_loss_last`: with TAS, L_TAS before the first and the last update;
- `attention_in_mask_with_tas`, `attention_in_mask_without_tas`: the share of each hand token's attention map
  (normalised to sum 1 over the attention grid) that falls inside the global mesh silhouette downsampled to the
  grid (each cell weighted by the fraction of its pixels on the silhouette), mean over hand tokens and samples;
  `silhouette_area` is the share flat attention would give; `attention_in_mask_ratio` = with / without;
- `image_change_in_mask`, `image_change_out_mask`: mean |image with TAS - image without| (RGB in [0, 1]) over the
  pixels on / off the silhouette;
- `silhouette_iou_with_tas`, `silhouette_iou_without_tas`, `silhouette_iou_real`: the alignment score of
  `generator.segmenter` (IoU of the segmenter's hand mask with the mesh silhouette) on the generated images and,
  as its ceiling, on the split's real images;
- `mesh_swap_change_in_mask`, `mesh_swap_change_out_mask`, `mesh_swap_ratio`: without TAS, the same seeds and
  captions with the next sample's mesh images: mean |change| on the union of the two silhouettes and off it (do
  the images follow the meshes?);
- the settings (generator, steps, seeds, indices, prompts, the hands each mesh shows) and per-sample values.

`--prompts bank` replaces the captions with prompts drawn from the generator config's prompt bank naming the
hands each mesh shows (what mixing gives its generated training samples), `--prompts bank-both` with the bank's
two-hand prompts for every mesh (what mixing gave before its prompts followed the labels).

and `DIR/tas-effect.png`, a figure like the paper's Fig. 9: per sample, the mesh, the image and each hand token's
attention map over it, a row without TAS and a row with TAS, the token's text above its column and each map's
max / min ratio at its foot (the maps are min-max normalised for display); and `DIR/tas-effect-samples.png`:
every measured sample as real image | mesh image | without TAS | with TAS.

`--versus OTHER.json` compares two generators on the same meshes, captions and seeds (e.g. one trained with TAS
and one trained without, the reference's training-only TAS): OTHER.json is another run's tas-effect.json with the
same split, indices, prompts, seed, steps, size, framing, guidance scale, TAS schedule and segmenter
(checked before any sampling; a file with other per-sample values is refused in one line); the JSON gains `versus`: for every per-sample value, this
run's mean, the other's and the paired difference (this - other) with its 95 % t-interval over the samples.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .segmenter import silhouettes
from .text_attention import tas_loss_batch, token_mask


def attention_in_mask(maps: Tensor, token_indices: Sequence[Sequence[int]], mesh_images: Tensor) -> Tensor:
    """(B,) mean over each sample's hand tokens of the share of the token's attention inside the silhouette.

    maps: (B, h, w, 77) attention maps; mesh_images: (B, 3, H, W) with H, W multiples of h, w. A token's map is
    normalised to sum 1 over the (h, w) grid; each cell counts with the fraction of its pixels on the silhouette.
    Samples without hand tokens get NaN."""
    b, h, w, _ = maps.shape
    coverage = F.adaptive_avg_pool2d(silhouettes(mesh_images).float(), (h, w))[:, 0].to(maps.device)  # (B, h, w)
    shares = []
    for i, tokens in enumerate(token_indices):
        if not tokens:
            shares.append(maps.new_tensor(float("nan")))
            continue
        m = maps[i][..., list(tokens)].float()  # (h, w, K)
        m = m / m.sum(dim=(0, 1), keepdim=True).clamp_min(1e-12)
        shares.append((m * coverage[i][..., None]).sum(dim=(0, 1)).mean())
    return torch.stack(shares)


def image_change(with_tas: Tensor, without: Tensor, mesh_images: Tensor) -> tuple[float, float]:
    """Mean |with - without| (averaged over RGB) on the silhouettes' pixels and off them."""
    diff = (with_tas.float() - without.float()).abs().mean(1, keepdim=True)
    mask = silhouettes(mesh_images).to(diff.device)
    inside = float(diff[mask].mean()) if mask.any() else float("nan")
    outside = float(diff[~mask].mean()) if (~mask).any() else float("nan")
    return inside, outside


def _mean(values: Tensor) -> float:
    values = values[~torch.isnan(values)]
    return float(values.mean()) if values.numel() else float("nan")


@torch.no_grad()
def measure(pipe, mesh_images: Tensor, prompts: Sequence[str], *, tas_steps: int, num_inference_steps: int,
            seed: int = 0, segmenter=None, real_images: Tensor | None = None, chunk: int = 8,
            mesh_swap: bool = True) -> dict:
    """The with / without TAS comparison on (B, 3, S, S) mesh images and B prompts; sample i is seeded seed + i in
    both runs. Returns the summary dict (see the module docstring) plus "per_sample" lists and "outputs"
    (images and attention maps, with / without, for the figure)."""
    device = mesh_images.device
    runs = {}
    for key, k in (("without", 0), ("with", tas_steps)):
        images, maps, losses, tokens = [], [], [], []
        for lo in range(0, len(prompts), chunk):
            hi = min(lo + chunk, len(prompts))
            gens = [torch.Generator(device=device).manual_seed(seed + i) for i in range(lo, hi)]
            out = pipe(mesh_images[lo:hi], None, list(prompts[lo:hi]), generator=gens,
                       num_inference_steps=num_inference_steps, tas_steps=k, return_attention=True)
            images.append(out.images)
            maps.append(out.attention_maps)
            tokens += out.token_indices
            if out.tas_losses is not None:
                losses.append(out.tas_losses)  # (k, rows)
        runs[key] = {"images": torch.cat(images), "maps": torch.cat(maps), "tokens": tokens,
                     "tas_losses": torch.cat(losses, 1) if losses else None}
    tokens = runs["without"]["tokens"]
    mask = token_mask(tokens, device)
    has = torch.tensor([bool(t) for t in tokens], device=device)
    summary, per_sample = {}, {}
    for key in ("with", "without"):
        r = runs[key]
        l_tas = tas_loss_batch(r["maps"], mask)
        share = attention_in_mask(r["maps"], tokens, mesh_images)
        summary[f"l_tas_{key}_tas"] = _mean(torch.where(has, l_tas, torch.full_like(l_tas, float("nan"))))
        summary[f"attention_in_mask_{key}_tas"] = _mean(share)
        per_sample[f"attention_in_mask_{key}_tas"] = [round(float(v), 5) for v in share]
        per_sample[f"l_tas_{key}_tas"] = [round(float(v), 5) for v in l_tas]
    summary["attention_in_mask_ratio"] = summary["attention_in_mask_with_tas"] / max(
        summary["attention_in_mask_without_tas"], 1e-12)
    summary["silhouette_area"] = float(silhouettes(mesh_images).float().mean())
    with_losses = runs["with"]["tas_losses"]
    if with_losses is not None:
        summary["tas_update_loss_first"] = float(with_losses[0][has].mean())
        summary["tas_update_loss_last"] = float(with_losses[-1][has].mean())
    inside, outside = image_change(runs["with"]["images"], runs["without"]["images"], mesh_images)
    summary["image_change_in_mask"], summary["image_change_out_mask"] = inside, outside
    if segmenter is not None:
        from .segmenter import silhouette_iou

        for key in ("with", "without"):
            scores = silhouette_iou(segmenter, runs[key]["images"], mesh_images)
            summary[f"silhouette_iou_{key}_tas"] = float(scores.mean())
            per_sample[f"silhouette_iou_{key}_tas"] = [round(float(v), 4) for v in scores]
        if real_images is not None:
            summary["silhouette_iou_real"] = float(silhouette_iou(segmenter, real_images, mesh_images).mean())
    if mesh_swap and len(prompts) > 1:
        # the same seeds and captions with the next sample's mesh images (rolled by one), without TAS: what
        # changes should lie on the two samples' silhouettes
        swapped_mesh = mesh_images.roll(1, 0)
        images = []
        for lo in range(0, len(prompts), chunk):
            hi = min(lo + chunk, len(prompts))
            gens = [torch.Generator(device=device).manual_seed(seed + i) for i in range(lo, hi)]
            images.append(pipe(swapped_mesh[lo:hi], None, list(prompts[lo:hi]), generator=gens,
                               num_inference_steps=num_inference_steps, tas_steps=0).images)
        diff = (torch.cat(images).float() - runs["without"]["images"].float()).abs().mean(1, keepdim=True)
        either = silhouettes(mesh_images) | silhouettes(swapped_mesh)
        summary["mesh_swap_change_in_mask"] = float(diff[either].mean())
        summary["mesh_swap_change_out_mask"] = float(diff[~either].mean())
        summary["mesh_swap_ratio"] = summary["mesh_swap_change_in_mask"] / max(summary["mesh_swap_change_out_mask"],
                                                                                1e-12)
    summary["per_sample"] = per_sample
    summary["outputs"] = runs
    return summary


def figure(pipe, mesh_images: Tensor, prompts: Sequence[str], runs: dict, *, rows: Sequence[int], tas_steps: int,
           tile: int = 160):
    """Fig. 9-like PIL image: for each sample in `rows`, two rows (without TAS, with TAS); columns: mesh image,
    generated image, then each hand token's attention map over the image (min-max normalised per map, jet; the
    map's max / min ratio written at its foot, so a flat map does not look structured). Tiles are upsampled to
    `tile` px; the token's text is written above its column, the row's setting at left."""
    from PIL import Image, ImageDraw, ImageFont

    from .figures import heat_overlay, to_pil, token_texts

    try:
        font = ImageFont.load_default(size=15)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    label_w, title_h, pad = 120, 22, 4
    blocks = []
    for i in rows:
        tokens = runs["without"]["tokens"][i]
        words = token_texts(pipe.tokenizer, prompts[i], tokens)
        blocks.append((i, tokens, words))
    cols = 2 + max(len(t) for _, t, _ in blocks)
    width = label_w + cols * (tile + pad) + pad
    caption_h = 20
    height = sum(caption_h + title_h + 2 * (tile + pad) for _ in blocks) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)

    def up(image: Tensor) -> Tensor:
        return F.interpolate(image[None].float(), size=(tile, tile), mode="bilinear", align_corners=False)[0]

    y = pad
    for i, tokens, words in blocks:
        text = prompts[i] if len(prompts[i]) < 110 else prompts[i][:107] + "..."
        draw.text((pad, y), f"sample {i}: {text}", fill=(0, 0, 0), font=font)
        y += caption_h
        for j, title in enumerate(["mesh", "image"] + words):
            draw.text((label_w + j * (tile + pad) + 4, y), title, fill=(0, 0, 0), font=font)
        y += title_h
        for key, label in (("without", "w/o TAS"), ("with", f"w/ TAS ({tas_steps})")):
            image, maps = runs[key]["images"][i], runs[key]["maps"][i]
            tiles = [mesh_images[i], image] + [heat_overlay(image, maps[..., p]) for p in tokens]
            draw.text((pad, y + tile // 2 - 8), label, fill=(0, 0, 0), font=font)
            for j, t in enumerate(tiles):
                canvas.paste(to_pil(up(t)), (label_w + j * (tile + pad), y))
            for j, p in enumerate(tokens):  # the maps are min-max normalised: say how much they really vary
                m = maps[..., p].float()
                note = f"max/min {float(m.max() / m.min().clamp_min(1e-12)):.2f}"
                x0 = label_w + (j + 2) * (tile + pad)
                draw.rectangle((x0, y + tile - 19, x0 + tile - 1, y + tile - 1), fill=(255, 255, 255))
                draw.text((x0 + 3, y + tile - 18), note, fill=(0, 0, 0), font=font)
            y += tile + pad
    return canvas


def samples_grid(mesh_images: Tensor, real_images: Tensor, runs: dict, tile: int = 128, per_row: int = 2):
    """PIL image of every measured sample: real image | mesh | without TAS | with TAS (tiles upsampled to
    `tile` px, `per_row` samples side by side)."""
    from PIL import Image

    from .figures import to_pil

    def up(image: Tensor) -> Tensor:
        return F.interpolate(image[None].float(), size=(tile, tile), mode="bilinear", align_corners=False)[0]

    n, pad = len(mesh_images), 4
    rows = (n + per_row - 1) // per_row
    block = 4 * (tile + pad) + 3 * pad
    canvas = Image.new("RGB", (per_row * block + pad, rows * (tile + pad) + pad), (255, 255, 255))
    for i in range(n):
        r, c = divmod(i, per_row)
        tiles = [real_images[i], mesh_images[i], runs["without"]["images"][i], runs["with"]["images"][i]]
        for j, t in enumerate(tiles):
            canvas.paste(to_pil(up(t)), (pad + c * block + j * (tile + pad), pad + r * (tile + pad)))
    return canvas


VERSUS_KEYS = ("dataset", "split", "indices", "prompts", "seed", "size", "num_inference_steps", "tas_steps",
               "framing", "guidance_scale", "tas_schedule", "segmenter")


def _plain(value):
    """``value`` as it reads back from JSON (tuples -> lists), so settings compare equal to a written file's."""
    return json.loads(json.dumps(value))


def check_same_samples(settings: dict, other: dict) -> None:
    """Raises ValueError naming the first of :data:`VERSUS_KEYS` in which ``other`` differs from ``settings``
    (the samples, or what is measured on them, would not be the same)."""
    for key in VERSUS_KEYS:
        if _plain(settings.get(key)) != _plain(other.get(key)):
            raise ValueError(f"{key} differs ({other.get(key)!r} there, {settings.get(key)!r} here): "
                             "not the same samples")


def check_per_sample(other: dict) -> None:
    """Raises ValueError unless ``other["per_sample"]`` maps names to lists of numbers (NaN allowed) with one value
    per entry of ``other["indices"]``: what :func:`versus` pairs."""
    per_sample, indices = other.get("per_sample"), other.get("indices")
    if not isinstance(per_sample, dict) or not isinstance(indices, list):
        raise ValueError("not a tas-effect.json (no per_sample values or indices)")
    for key, values in per_sample.items():
        if not isinstance(values, list) or len(values) != len(indices) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ValueError(f"per_sample.{key}: expected {len(indices)} numbers, one per sample")


def versus(result: dict, other: dict, *, confidence: float = 0.95) -> dict:
    """Paired per-sample differences of ``result`` (this run) minus ``other`` (a tas-effect.json measured on the
    same samples). Each per-sample key present in both gives {"this", "other" (means over the pairs), and
    :func:`hands.stats.paired_interval`'s "n", "mean", "std", "half_width", "low", "high", "t"}; pairs where
    either value is NaN (a sample without hand tokens) are left out and counted by "n". Raises ValueError naming
    the first setting that differs (the samples would not be the same)."""
    from hands.stats import paired_interval

    check_same_samples(result, other)
    check_per_sample(other)
    differences = {}
    for key, mine in result["per_sample"].items():
        theirs = other.get("per_sample", {}).get(key)
        if theirs is None or len(theirs) != len(mine):
            continue
        pairs = [(float(a), float(b)) for a, b in zip(mine, theirs) if not (math.isnan(float(a)) or math.isnan(float(b)))]
        if not pairs:
            continue
        differences[key] = {"this": statistics.fmean(a for a, _ in pairs), "other": statistics.fmean(b for _, b in pairs),
                            **paired_interval([a - b for a, b in pairs], confidence)}
    return {"other_sd_path": other.get("sd_path"), "other_command": other.get("command"), "confidence": confidence,
            "differences": differences}


def _shown_path(path: str | None) -> str | None:
    """A path inside the repository as relative to its root (the JSON is committed), others as given."""
    if path is None:
        return None
    root = Path(__file__).resolve().parents[1]
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return path


def main(argv: Sequence[str] | None = None) -> int:
    from .figures import add_pipeline_arguments, pipeline_from_args
    from .segmenter import load_segmenter
    from .train import FramedDataset, make_train_batch

    p = argparse.ArgumentParser(prog="python -m generator.tas_effect", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for tas-effect.json and tas-effect.png")
    p.add_argument("--samples", type=int, default=16, help="meshes, spread over the split (16)")
    add_pipeline_arguments(p)
    p.add_argument("--size", type=int, help="resolution (default: the generator's)")
    p.add_argument("--steps", type=int, help="DDIM steps (default: the config's)")
    p.add_argument("--tas-steps", type=int, help="TAS updates, first k steps (default: the config's, else 10)")
    p.add_argument("--figure-samples", type=int, default=2, help="samples shown in the figure (2)")
    p.add_argument("--segmenter", help="hand segmenter weights (default: the shipped one); 'none' skips the score")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", choices=("captions", "bank", "bank-both"), default="captions",
                   help="captions (default): the split's own captions; bank: prompts drawn (--seed) from the "
                        "generator config's prompt bank naming the hands each mesh shows, as mixing draws them; "
                        "bank-both: the bank's two-hand prompts for every mesh")
    p.add_argument("--versus", metavar="OTHER_JSON",
                   help="another generator's tas-effect.json on the same samples: paired differences (this - other)")
    args = p.parse_args(argv)
    if args.samples < 1:
        raise SystemExit("--samples must be >= 1")
    other = None
    if args.versus is not None:
        try:
            other = json.loads(Path(args.versus).read_text())
        except (OSError, ValueError) as error:
            raise SystemExit(f"--versus {args.versus}: cannot read a tas-effect.json ({error})")
        if not isinstance(other, dict):
            raise SystemExit(f"--versus {args.versus}: not a tas-effect.json (no per_sample values or indices)")
        try:
            check_per_sample(other)
        except ValueError as error:
            raise SystemExit(f"--versus {args.versus}: {error}")

    gen_cfg, device, pipe = pipeline_from_args(args)
    size = args.size or pipe.default_size
    steps = args.steps or gen_cfg.sampling.num_inference_steps
    tas_steps = args.tas_steps if args.tas_steps is not None else (gen_cfg.sampling.tas_steps or 10)
    tas_steps = min(tas_steps, steps)

    from hands.datasets import build_dataset
    from hands.mano import HandModel
    from hands.sample import collate

    from .prompts import prompt_bank, shown_hands

    hand_model = HandModel()
    data = FramedDataset(build_dataset(args.dataset, args.data_root, args.split, hand_model=hand_model), size,
                         gen_cfg.extend, gen_cfg.framing)
    n = min(args.samples, len(data))
    indices = sorted({round(i * len(data) / n) for i in range(n)})
    samples = [data[i] for i in indices]
    batch = make_train_batch(samples, hand_model.faces_for("right"), hand_model.faces_for("left"), device=device)
    hands = shown_hands(collate(samples))
    if args.prompts != "captions":
        batch.prompts = prompt_bank(gen_cfg.prompts).sample(
            len(samples), torch.Generator().manual_seed(args.seed), hands=hands if args.prompts == "bank" else None)
    segmenter = None if args.segmenter == "none" else load_segmenter(args.segmenter, device)
    settings = {"dataset": args.dataset, "split": args.split, "indices": indices, "prompts": list(batch.prompts),
                "prompt_source": args.prompts, "hands": hands,
                "size": size, "num_inference_steps": steps, "tas_steps": tas_steps, "seed": args.seed,
                "framing": gen_cfg.framing, "guidance_scale": gen_cfg.sampling.guidance_scale,
                "tas_schedule": {"kind": gen_cfg.sampling.tas_schedule, "scale": gen_cfg.sampling.tas_scale,
                                 "start": gen_cfg.sampling.tas_start, "end": gen_cfg.sampling.tas_end},
                "segmenter": None if segmenter is None else dict(segmenter.meta)}
    if other is not None:
        try:
            check_same_samples(settings, other)
        except ValueError as error:
            raise SystemExit(f"--versus {args.versus}: {error}")
    result = measure(pipe, batch.mesh, batch.prompts, tas_steps=tas_steps, num_inference_steps=steps,
                     seed=args.seed, segmenter=segmenter, real_images=batch.rgb)
    runs = result.pop("outputs")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shown = [i for i, t in enumerate(runs["without"]["tokens"]) if t][:max(args.figure_samples, 0)]
    if shown:
        figure(pipe, batch.mesh, batch.prompts, runs, rows=shown, tas_steps=tas_steps).save(out / "tas-effect.png")
    samples_grid(batch.mesh, batch.rgb, runs).save(out / "tas-effect-samples.png")
    result.update({
        "generator_config": args.generator_config, "sd_path": _shown_path(gen_cfg.sd_path), **settings,
        "command": "python -m generator.tas_effect " + " ".join(argv if argv is not None else sys.argv[1:]),
    })
    if other is not None:
        result["versus"] = versus(result, other)
    from hands.paths import write_atomic

    write_atomic(out / "tas-effect.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    keys = ("attention_in_mask_without_tas", "attention_in_mask_with_tas", "attention_in_mask_ratio",
            "silhouette_area", "l_tas_without_tas", "l_tas_with_tas", "image_change_in_mask",
            "image_change_out_mask", "silhouette_iou_without_tas", "silhouette_iou_with_tas", "silhouette_iou_real",
            "mesh_swap_ratio")
    print(json.dumps({k: round(result[k], 4) for k in keys if k in result}))
    if other is not None and not result["versus"]["differences"]:
        print(f"--versus {args.versus}: no per-sample value to pair (every pair has a NaN, or no name in common)")
    if other is not None:
        for key, d in result["versus"]["differences"].items():
            print(f"{key}: {d['this']:.4f} here, {d['other']:.4f} there, difference {d['mean']:+.4f} "
                  f"[{d['low']:+.4f}, {d['high']:+.4f}] (n = {d['n']})")
    print(f"wrote {out / 'tas-effect.json'}" + (f" and {out / 'tas-effect.png'}" if shown else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
