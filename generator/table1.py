"""``python -m generator.table1``: Table 1's test protocol on MSCOCO (AttentionHand supplementary, "Text-to-Image
Generation": "For the test, RGB hand images and mesh images were also utilized from the train set of MSCOCO ... text
prompts were utilized from the validation set of MSCOCO").

    python -m generator.table1 --root DATA/coco --mano-dir MANO --generator-config sd15 --sd-path SD15 \\
        --guidance-path runs/gen-coco/guidance.safetensors --inception-weights pt_inception-2015-12-05-6726825d.pth \\
        --n 5000 --out runs/table1-attentionhand

1. Labels and real images: ``--n`` annotations of the ``coco`` reader's train split with one person per image and
   a MANO fit (``one_person``, ``require_fit``: the generator's own data filter), drawn without replacement with
   ``--seed``; each is framed as ``generator.train`` frames its training samples (``FramedDataset``) and its global
   and local mesh images are rendered as in training (``make_train_batch``).
2. Prompts: the cleaned captions of MSCOCO val (``python -m generator.caption --split val``), one drawn per sample
   with ``--seed``; images whose caption is empty are not drawn from.
3. Generation: ``--generator`` (``attentionhand`` or a baseline of ``generator.baselines``) from the generator
   config, one seeded noise per sample; the global branch only unless ``--use-local`` (the reference inference runs
   the global branch).
4. Metrics (``eval.genmetrics.GenerationEvaluator``): FID and KID between the framed real images and the generated
   ones, FID-H and KID-H on their hand crops, with the user's Inception weights (pytorch-fid's file: the paper's
   protocol); hand confidence and MSE-2D with ``--mediapipe`` (the optional extra). Written to
   ``<out>/table1.json`` and ``table1.md`` with the settings, and ``<out>/table1-samples.png`` (mesh | generated |
   real rows of the first batch).

Numbers are comparable between runs of this code with the same weights and settings; KID needs a few hundred
samples, FID thousands, to be stable.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

__all__ = ["Table1Settings", "val_prompts", "run_table1", "main"]

logger = logging.getLogger(__name__)


class Table1Settings:
    """What a Table 1 run needs besides the generator and the metrics' networks (keyword-only)."""

    def __init__(self, *, root: str | Path, n: int = 1000, batch_size: int = 8, size: int | None = None,
                 seed: int = 0, use_local: bool = False, mano_dir: str | None = None,
                 prompts_file: str | Path | None = None, device: str = "cpu"):
        if n < 1 or batch_size < 1:
            raise ValueError(f"--n and --batch-size must be positive; got {n}, {batch_size}")
        self.root, self.n, self.batch_size, self.size = Path(root), int(n), int(batch_size), size
        self.seed, self.use_local, self.mano_dir, self.device = int(seed), bool(use_local), mano_dir, device
        self.prompts_file = Path(prompts_file) if prompts_file is not None else None


def val_prompts(root: str | Path, prompts_file: str | Path | None = None) -> list[str]:
    """The non-empty cleaned captions of MSCOCO val (sorted by file name); ValueError naming the file when none."""
    from hands.datasets.captions import default_captions_path, load_captions

    path = Path(prompts_file) if prompts_file is not None else default_captions_path(root, "val")
    captions = load_captions(path)
    if not captions:
        raise ValueError(f"{path}: no hand-related caption of MSCOCO val; write them with "
                         f"python -m generator.caption --dataset coco --root {root} --split val --model VLM")
    return [captions[name] for name in sorted(captions)]


@torch.no_grad()
def run_table1(settings: Table1Settings, pipe, *, feature_extractor: Callable, keypoint_detector=None,
               hand_model=None, progress: bool = True) -> dict:
    """Generate ``settings.n`` images on MSCOCO train labels with MSCOCO val prompts and measure them.

    pipe: a generator with AttentionHandPipeline's call (``pipe(mesh, local_mesh, prompts, generator=...)``)
    on ``settings.device``. Returns {"metrics": {...}, "n": ..., "samples_grid": (3 B, 3, S, S) tensor of
    the first batch (mesh, generated, real rows)}."""
    from tqdm.auto import tqdm

    from eval.genmetrics import GenerationEvaluator
    from hands.datasets import build_dataset
    from hands.mano import HandModel
    from hands.sample import collate

    from .train import FramedDataset, make_train_batch

    device = torch.device(settings.device)
    hand_model = hand_model if hand_model is not None else HandModel(mano_dir=settings.mano_dir)
    prompts = val_prompts(settings.root, settings.prompts_file)
    reader = build_dataset("coco", settings.root, "train", hand_model=hand_model, one_person=True, require_fit=True,
                           captions=None)
    if len(reader) == 0:
        raise ValueError(f"{settings.root}: no MSCOCO train annotation with one person and a MANO fit")
    size = settings.size or getattr(pipe, "default_size", None)
    if size is None:
        raise ValueError(f"--size: the generator {type(pipe).__name__} has no default size; give one")
    data = FramedDataset(reader, size)
    host = torch.Generator().manual_seed(settings.seed)
    n = min(settings.n, len(reader))
    if n < settings.n:
        logger.warning("generator.table1: only %d labelled samples, not %d", n, settings.n)
    order = torch.randperm(len(reader), generator=host)[:n].tolist()
    prompt_index = torch.randint(len(prompts), (n,), generator=host).tolist()
    noise_seeds = torch.randint(2**62, (n,), generator=host).tolist()
    evaluator = GenerationEvaluator(feature_extractor=feature_extractor, keypoint_detector=keypoint_detector,
                                    kid_subset_size=max(2, min(1000, n)))
    faces_right, faces_left = hand_model.faces_for("right").to(device), hand_model.faces_for("left").to(device)
    grid = None
    bar = tqdm(total=n, desc="table1", unit="img", disable=not progress)
    for start in range(0, n, settings.batch_size):
        indices = order[start : start + settings.batch_size]
        samples = [data[i] for i in indices]
        batch_prompts = [prompts[prompt_index[start + k]] for k in range(len(indices))]
        train_batch = make_train_batch(samples, faces_right, faces_left, device=device)
        generators = [torch.Generator(device=device).manual_seed(noise_seeds[start + k]) for k in range(len(indices))]
        out = pipe(train_batch.mesh, train_batch.mesh_local if settings.use_local else None, batch_prompts,
                   generator=generators)
        images = out.images.to(device).float().clamp(0, 1)
        labels = collate(samples).to(device)
        evaluator.add_real(train_batch.rgb, labels)
        evaluator.add_generated(images, labels)
        if grid is None:
            grid = torch.cat([train_batch.mesh, images, train_batch.rgb]).cpu()
        bar.update(len(indices))
    bar.close()
    return {"metrics": evaluator.compute(), "n": n, "prompts_available": len(prompts), "samples_grid": grid}


def _markdown(metrics: dict, settings: dict) -> str:
    names = [k for k in ("FID", "KID", "FID-H", "KID-H", "HandConf", "MSE-2D", "MSE-3D") if k in metrics]
    names += [k for k in metrics if k not in names]
    lines = ["| " + " | ".join(["generator", *names]) + " |", "|" + "---|" * (len(names) + 1)]
    value = lambda v: f"{v:.4g}" if isinstance(v, (int, float)) else str(v)  # noqa: E731
    lines.append("| " + " | ".join([settings["generator"], *(value(metrics[k]) for k in names)]) + " |")
    return "\n".join(lines) + "\n\n" + f"Settings: `{json.dumps(settings)}`\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m generator.table1", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="MSCOCO in InterWild's data/MSCOCO layout, with val captions")
    parser.add_argument("--out", required=True, help="output folder (table1.json, table1.md, table1-samples.png)")
    parser.add_argument("--inception-weights", required=True,
                        help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (FID/KID features; not downloadable here)")
    parser.add_argument("--generator", default="attentionhand", help="attentionhand or a baseline (generator.baselines)")
    parser.add_argument("--generator-config", default="sd15", help="a name in configs/generator or a YAML path")
    parser.add_argument("--sd-path", help="local Stable Diffusion 1.5 folder")
    parser.add_argument("--guidance-path", help="trained guidance weights (python -m generator.train)")
    parser.add_argument("--mano-dir", help="MANO files the NeuralAnnot fits are for")
    parser.add_argument("--prompts", help="captions file of MSCOCO val (default: the split's default file)")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, help="generator resolution (default: the generator's, 512 for SD)")
    parser.add_argument("--use-local", action="store_true", help="also feed the local mesh images")
    parser.add_argument("--mediapipe", action="store_true", help="hand confidence and MSE-2D with MediaPipe Hands")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    from eval.genmetrics import InceptionFeatures, MediaPipeHands
    from hands.datasets import DatasetError

    from .baselines import build_baseline
    from .model import load_config
    from .train import save_png

    try:
        overrides = [f"{key}={value}" for key, value in (("sd_path", args.sd_path), ("guidance_path", args.guidance_path)) if value]
        gen_cfg = load_config(args.generator_config, overrides)
        settings = Table1Settings(root=args.root, n=args.n, batch_size=args.batch_size, size=args.size, seed=args.seed,
                                  use_local=args.use_local, mano_dir=args.mano_dir, prompts_file=args.prompts,
                                  device=args.device)
        val_prompts(settings.root, settings.prompts_file)  # fail before loading the networks
        features = InceptionFeatures(args.inception_weights).to(args.device).eval()
        detector = MediaPipeHands() if args.mediapipe else None
        pipe = build_baseline(args.generator, gen_cfg).to(args.device)
        result = run_table1(settings, pipe, feature_extractor=features, keypoint_detector=detector,
                            progress=not args.no_progress)
    except (DatasetError, ValueError, OSError) as error:
        print(f"generator.table1: error: {error}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_settings = {"generator": args.generator, "generator_config": args.generator_config, "sd_path": args.sd_path,
                    "guidance_path": args.guidance_path, "n": result["n"], "seed": args.seed, "use_local": args.use_local,
                    "prompts_available": result["prompts_available"]}
    (out / "table1.json").write_text(json.dumps({"metrics": result["metrics"], "settings": run_settings}, indent=1))
    (out / "table1.md").write_text(_markdown(result["metrics"], run_settings))
    save_png(_grid(result["samples_grid"]), out / "table1-samples.png")
    print(_markdown(result["metrics"], run_settings))
    return 0


def _grid(rows: torch.Tensor) -> torch.Tensor:
    """(3 B, 3, S, S) mesh, generated, real rows -> one (3, 3 S, B S) image."""
    b = rows.shape[0] // 3
    return torch.cat([torch.cat(list(rows[r * b : (r + 1) * b]), -1) for r in range(3)], -2)


if __name__ == "__main__":
    sys.exit(main())
