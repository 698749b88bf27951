"""``python -m generator.table1``: paper Table 1 / Table 4 / Fig. 10 in one command: every generator trained alike,
sampled on the same labels, prompts and seeds, and measured.

    python -m generator.table1 --out docs/results                  # the miniature on synthlab (2 CPU cores)
    python -m generator.table1 --dataset coco --root DATA/coco --mano-dir MANO --sd-path SD15 \
        --inception-weights pt_inception-2015-12-05-6726825d.pth --mediapipe --mse3d-ckpt runs/interwild \
        --n 5000 --steps 50000 --train-batch-size 1 --lr 1e-5 --out runs/table1     # the paper's setup

1. Training (``--runs``, default runs/table1-<dataset>): each generator of ``--generators`` that is trained
   (``VARIANTS``: every baseline and ablation) runs ``generator.train`` from the same base (the generator config:
   the shipped tiny generator, or SD 1.5), on the same training split, with the same steps, batch size, learning
   rate and seed; only the variant's own settings differ. Every guidance module starts fresh (``--fresh-guidance``:
   a copy of the UNet's encoder, or a seeded T2I-Adapter), so none inherits AttentionHand's shipped weights. A
   finished run (its last checkpoint at ``--steps``) is skipped, an interrupted one resumed. "sd" is the base
   alone; "attentionhand-shipped" (optional) is the generator config's own guidance module.
2. Labels and prompts: synthlab ``--split`` (test-wild) samples with their own captions, or (``--dataset coco``)
   MSCOCO train annotations with one person and a MANO fit and the cleaned captions of MSCOCO val (AttentionHand
   supplementary, "Text-to-Image Generation"), ``--n`` of them drawn with ``--seed``; framed as the generator was
   trained (its config's framing), global and local mesh images rendered as in training (``make_train_batch``).
3. Generation: every generator gets the same mesh images, prompts and per-sample noise seeds; the global branch
   only (the reference inference), the sampling settings of the generator config.
4. Metrics (``eval.genmetrics.GenerationEvaluator``): FID / KID, FID-H / KID-H on hand crops (the label's mesh
   box, ours; with ``--mediapipe`` also Hand1000's union box of MediaPipe landmarks: "FID-H(lm)"), Hand Conf
   (Hand1000's definition, with ``--mediapipe``), MSE-2D (MediaPipe's 21 landmarks vs the labels' projected
   joints, with ``--mediapipe``; squared pixels of the generated image), MSE-3D (``--mse3d-ckpt``: a ``recon``
   checkpoint run on the generated images; wrist-aligned joints vs the labels', squared mm) and SilhouetteIoU
   (the hand segmenter's mask vs the mesh silhouette, needs no extra). Definitions in docs/generator.md
   ("Table 1 metrics"). Features: pytorch-fid's Inception
   weights (``--inception-weights``; the paper's protocol) or, without them, the shipped hand segmenter's
   features (``SegmenterFeatures``; numbers comparable only within one table).
5. Output in ``--out``: ``mini-table1.{json,md,png}`` (synthlab) or ``table1.{json,md,png}`` (coco): the table
   with the paper's printed rows beside ours, the settings, and a figure with one row per generator on the same
   meshes (first rows: mesh images, real images).

Numbers are comparable between runs of this code with the same weights and settings; KID needs a few hundred
samples, FID thousands, to be stable.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

__all__ = ["Table1Settings", "Variant", "VARIANTS", "PAPER_ROWS", "val_prompts", "protocol_items", "train_variants",
           "build_generator", "run_generators", "run_table1", "main"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """One row: how it samples (a `generator.baselines` name) and what it trains (TrainConfig overrides; None:
    nothing is trained). paper: the row of the paper's tables it stands for."""

    sampler: str
    train: dict | None
    paper: str


TAS_UPDATES = 2  # TAS updates per training step of the TAS rows: with 1, the "constant" and "reference" schedules coincide
VARIANTS: dict[str, Variant] = {
    "sd": Variant("sd", None, "Table 1: Stable Diffusion"),
    "controlnet": Variant("controlnet", {"local_branch": False, "tas_updates": 0}, "Table 1: ControlNet"),
    "t2i-adapter": Variant("t2i-adapter", {"guidance": "t2i-adapter", "local_branch": False, "tas_updates": 0},
                           "Table 1: T2I-Adapter"),
    "attentionhand-no-tas": Variant("attentionhand", {"tas_updates": 0}, "Table 1: AttentionHand (w/o TAS)"),
    "attentionhand": Variant("attentionhand", {"tas_updates": TAS_UPDATES}, "Table 1: AttentionHand (w/ TAS)"),
    "no-local": Variant("attentionhand", {"tas_updates": TAS_UPDATES, "local_branch": False},
                        "Table 4: globality only (+ TAS)"),
    "separate-weights": Variant("attentionhand", {"tas_updates": TAS_UPDATES, "separate_weights": True},
                                "Table 4: separated weights"),
    "no-gaussian": Variant("attentionhand", {"tas_updates": TAS_UPDATES, "tas_smoothing": False},
                           "Fig. 10: w/o Gaussian filter"),
    "l-lb": Variant("attentionhand", {"tas_updates": TAS_UPDATES, "tas_loss": "lb"}, "Fig. 10: L_LB instead of L_TAS"),
    "constant-step": Variant("attentionhand", {"tas_updates": TAS_UPDATES, "tas_schedule": "constant"},
                             "Fig. 10: w/o step-size regularisation"),
    "attentionhand-shipped": Variant("attentionhand", None, "(the generator config's own guidance weights)"),
}
DEFAULT_GENERATORS = tuple(name for name in VARIANTS if name != "attentionhand-shipped")

# The paper's printed numbers (Table 1 and Table 4; FID, KID, FID-H, KID-H, Hand Conf., MSE-2D, MSE-3D), MSCOCO.
PAPER_METRICS = ("FID", "KID", "FID-H", "KID-H", "HandConf", "MSE-2D", "MSE-3D")
PAPER_ROWS: dict[str, tuple[float, ...]] = {
    "sd": (40.52, 0.00684, 50.78, 0.02554, 0.651, 2.932, 4.591),
    "uni-controlnet": (30.34, 0.00744, 37.77, 0.02004, 0.855, 2.105, 3.039),
    "t2i-adapter": (22.00, 0.00761, 32.08, 0.01568, 0.914, 1.546, 2.451),
    "controlnet": (21.67, 0.00658, 40.32, 0.02098, 0.810, 1.252, 2.182),
    "attentionhand-no-tas": (21.27, 0.00331, 28.56, 0.01390, 0.955, 1.211, 2.042),
    "attentionhand": (20.71, 0.00301, 27.09, 0.01287, 0.965, 1.026, 1.986),
    "separate-weights": (21.90, 0.00293, 26.89, 0.01340, 0.960, 1.108, 2.017),
}


class Table1Settings:
    """What a Table 1 run needs besides the generators and the metrics' networks (keyword-only).

    dataset "coco" (root: MSCOCO with val captions; labels from train) or "synthlab" (root None: the cached one;
    labels and captions from `split`). framing / extend: the generator's training window (its config's)."""

    def __init__(self, *, root: str | Path | None = None, n: int = 1000, batch_size: int = 8, size: int | None = None,
                 seed: int = 0, use_local: bool = False, mano_dir: str | None = None,
                 prompts_file: str | Path | None = None, device: str = "cpu", dataset: str = "coco",
                 split: str = "test-wild", framing: str = "frame", extend: float = 1.5):
        if n < 1 or batch_size < 1:
            raise ValueError(f"--n and --batch-size must be positive; got {n}, {batch_size}")
        if dataset not in ("coco", "synthlab"):
            raise ValueError(f"--dataset {dataset!r}: expected coco or synthlab")
        if dataset == "coco" and root is None:
            raise ValueError("--dataset coco needs --root (MSCOCO in InterWild's data/MSCOCO layout)")
        self.root = Path(root) if root is not None else None
        self.n, self.batch_size, self.size = int(n), int(batch_size), size
        self.seed, self.use_local, self.mano_dir, self.device = int(seed), bool(use_local), mano_dir, device
        self.prompts_file = Path(prompts_file) if prompts_file is not None else None
        self.dataset, self.split, self.framing, self.extend = dataset, split, framing, float(extend)


def val_prompts(root: str | Path, prompts_file: str | Path | None = None) -> list[str]:
    """The non-empty cleaned captions of MSCOCO val (sorted by file name); ValueError naming the file when none."""
    from hands.datasets.captions import default_captions_path, load_captions

    path = Path(prompts_file) if prompts_file is not None else default_captions_path(root, "val")
    captions = load_captions(path)
    if not captions:
        raise ValueError(f"{path}: no hand-related caption of MSCOCO val; write them with "
                         f"python -m generator.caption --dataset coco --root {root} --split val --model VLM")
    return [captions[name] for name in sorted(captions)]


def protocol_items(settings: Table1Settings, size: int, hand_model) -> tuple[list, list[str], list[int], int]:
    """(framed samples, prompts, noise seeds, prompts available) of the protocol: `settings.n` labels drawn
    without replacement with `settings.seed` (fewer when the split has fewer, with a warning)."""
    from hands.datasets import build_dataset

    from .train import FramedDataset

    host = torch.Generator().manual_seed(settings.seed)
    if settings.dataset == "coco":
        prompts = val_prompts(settings.root, settings.prompts_file)
        reader = build_dataset("coco", settings.root, "train", hand_model=hand_model, one_person=True,
                               require_fit=True, captions=None)
        if len(reader) == 0:
            raise ValueError(f"{settings.root}: no MSCOCO train annotation with one person and a MANO fit")
    else:
        prompts = None
        reader = build_dataset("synthlab", settings.root, settings.split, hand_model=hand_model)
        if len(reader) == 0:
            raise ValueError(f"synthlab {settings.split}: no sample")
    data = FramedDataset(reader, size, settings.extend, settings.framing)
    n = min(settings.n, len(reader))
    if n < settings.n:
        logger.warning("generator.table1: only %d labelled samples, not %d", n, settings.n)
    order = torch.randperm(len(reader), generator=host)[:n].tolist()
    samples = [data[i] for i in order]
    if prompts is not None:
        prompt_index = torch.randint(len(prompts), (n,), generator=host).tolist()
        chosen = [prompts[k] for k in prompt_index]
    else:
        chosen = [s.meta.get("prompt") or "a photo of two hands" for s in samples]
    noise_seeds = torch.randint(2**62, (n,), generator=host).tolist()
    return samples, chosen, noise_seeds, len(prompts) if prompts is not None else len(set(chosen))


@torch.no_grad()
def run_generators(settings: Table1Settings, pipes: dict, *, feature_extractor: Callable, keypoint_detector=None,
                   silhouette_scorer=None, landmark_detector=None, joint_regressor=None, hand_model=None,
                   progress: bool = True, keep: int = 6, mse3d_unit: str = "mm") -> dict:
    """Generate `settings.n` images with every generator of `pipes` ({name: pipe}, AttentionHandPipeline's
    call) on the same labels, prompts and noise seeds, and measure each against the same real images.
    keypoint_detector: Hand Conf and MSE-2D; landmark_detector: Hand1000's landmark-box crops (FID-H(lm));
    silhouette_scorer: SilhouetteIoU; joint_regressor: MSE-3D in squared `mse3d_unit` (mm or cm; see
    `eval.genmetrics.GenerationEvaluator`).

    Returns {"metrics": {name: {...}}, "real_alignment": the alignment metrics (``ALIGNMENT``) of the real images
    the labels come from (what a generator that reproduced them would score), "n", "size", "prompts_available",
    "mesh" / "real" (keep, 3, S, S) of the first labels, "images": {name: (keep, 3, S, S)}}."""
    from tqdm.auto import tqdm

    from eval.genmetrics import GenerationEvaluator
    from hands.mano import HandModel
    from hands.sample import collate

    from .train import make_train_batch

    device = torch.device(settings.device)
    hand_model = hand_model if hand_model is not None else HandModel(mano_dir=settings.mano_dir)
    first = next(iter(pipes.values()))
    size = settings.size or getattr(first, "default_size", None)
    if size is None:
        raise ValueError(f"--size: the generator {type(first).__name__} has no default size; give one")
    samples, prompts, noise_seeds, available = protocol_items(settings, size, hand_model)
    n = len(samples)
    make = lambda: GenerationEvaluator(feature_extractor=feature_extractor, keypoint_detector=keypoint_detector,  # noqa: E731
                                       silhouette_scorer=silhouette_scorer, landmark_detector=landmark_detector,
                                       joint_regressor=joint_regressor, mse3d_unit=mse3d_unit,
                                       kid_subset_size=max(2, min(1000, n)))
    real, reference = make(), make()
    evaluators = {name: make() for name in pipes}
    faces_right, faces_left = hand_model.faces_for("right").to(device), hand_model.faces_for("left").to(device)
    kept: dict[str, list] = {name: [] for name in pipes}
    kept_mesh, kept_real = [], []
    bar = tqdm(total=n * len(pipes), desc="table1", unit="img", disable=not progress)
    for start in range(0, n, settings.batch_size):
        chunk = samples[start : start + settings.batch_size]
        batch_prompts = prompts[start : start + len(chunk)]
        train_batch = make_train_batch(chunk, faces_right, faces_left, device=device)
        labels = collate(chunk).to(device)
        real.add_real(train_batch.rgb, labels)
        reference.add_generated(train_batch.rgb, labels)  # the real images through the alignment metrics
        if sum(m.shape[0] for m in kept_mesh) < keep:
            kept_mesh.append(train_batch.mesh.cpu())
            kept_real.append(train_batch.rgb.cpu())
        for name, pipe in pipes.items():
            generators = [torch.Generator(device=device).manual_seed(noise_seeds[start + k]) for k in range(len(chunk))]
            out = pipe(train_batch.mesh, train_batch.mesh_local if settings.use_local else None, batch_prompts,
                       generator=generators)
            images = out.images.to(device).float().clamp(0, 1)
            evaluators[name].add_generated(images, labels)
            if sum(m.shape[0] for m in kept[name]) < keep:
                kept[name].append(images.cpu())
            bar.update(len(chunk))
    bar.close()
    metrics = {}
    for name, evaluator in evaluators.items():
        evaluator.share_real(real)
        metrics[name] = evaluator.compute()
    measured = reference.compute()
    real_alignment = {k: measured[k] for k in ALIGNMENT}
    cut = lambda parts: torch.cat(parts)[:keep]  # noqa: E731
    return {"metrics": metrics, "real_alignment": real_alignment, "n": n, "size": size, "prompts_available": available,
            "prompts": prompts[:keep], "mesh": cut(kept_mesh), "real": cut(kept_real),
            "images": {k: cut(v) for k, v in kept.items()}}


@torch.no_grad()
def run_table1(settings: Table1Settings, pipe, *, feature_extractor: Callable, keypoint_detector=None,
               hand_model=None, progress: bool = True) -> dict:
    """One generator through `run_generators`: {"metrics": {...}, "n", "prompts_available", "samples_grid":
    (3 K, 3, S, S) mesh, generated, real rows of the first K = min(n, batch size) labels}."""
    result = run_generators(settings, {"generator": pipe}, feature_extractor=feature_extractor,
                            keypoint_detector=keypoint_detector, hand_model=hand_model, progress=progress,
                            keep=min(settings.batch_size, settings.n))
    grid = torch.cat([result["mesh"], result["images"]["generator"], result["real"]])
    return {"metrics": result["metrics"]["generator"], "n": result["n"],
            "prompts_available": result["prompts_available"], "samples_grid": grid}


class SegmenterFeatures(torch.nn.Module):
    """FID/KID features where pytorch-fid's Inception weights are absent: the shipped hand segmenter's deep
    features (trained on synthlab's images, `generator.segmenter`), their mean and standard deviation over the
    image positions (96 numbers per image). An Inception replica with random weights gives near-constant
    features (FID ~1e-13 between any two sets, measured), so it cannot rank generators; these features were
    trained on hands in synthlab's scenes. Numbers are comparable only within one table."""

    def __init__(self, segmenter):
        super().__init__()
        self.segmenter = segmenter

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        seg = self.segmenter
        deep = seg.down(seg.stem(images.to(next(seg.parameters()).dtype) * 2 - 1)).flatten(2)  # (B, C, hw)
        return torch.cat([deep.mean(-1), deep.std(-1)], 1).float()


# -- training ------------------------------------------------------------------------------------------------------
def run_folder(runs: str | Path, name: str) -> Path:
    return Path(runs) / name


def guidance_of(name: str, folder: Path) -> Path:
    """Where the trained variant's weights are (generator.train's outputs)."""
    from .train import ADAPTER_DIR, GUIDANCE_FILE

    return folder / (ADAPTER_DIR if VARIANTS[name].train.get("guidance") == "t2i-adapter" else GUIDANCE_FILE)


def train_variants(names: Sequence[str], base, runs: str | Path, *, hand_model=None, log=print) -> dict[str, Path]:
    """Train every variant of `names` that trains (`VARIANTS[name].train`) with the settings `base` (a
    generator.train TrainConfig: base model, data, steps, batch size, lr, seed) plus the variant's own, into
    `runs`/<name>/. A run whose last checkpoint is at `base.steps` is skipped; an interrupted one resumes.
    Returns {name: weights path}."""
    from .train import checkpoints, train

    paths = {}
    for name in names:
        variant = VARIANTS[name]
        if variant.train is None:
            continue
        folder = run_folder(runs, name)
        done = checkpoints(folder)
        step = json.loads((done[-1] / "state.json").read_text())["step"] if done else 0
        if step >= base.steps and guidance_of(name, folder).exists():
            log(f"table1: {name}: trained ({step} steps), skipped")
        else:
            cfg = dataclasses.replace(base, **variant.train, out=str(folder), fresh_guidance=True,
                                      resume=str(folder) if done else None)
            log(f"table1: {name}: training {'from step %d' % step if done else 'from the base'} to {base.steps} steps")
            result = train(cfg, hand_model=hand_model)
            log(f"table1: {name}: {json.dumps(result)}")
        paths[name] = guidance_of(name, folder)
    return paths


def build_generator(name: str, gen_cfg, weights: Path | None):
    """The sampler of row `name`: its `generator.baselines` pipeline with its own trained weights (`weights`;
    None for "sd" and "attentionhand-shipped", which use the generator config as it is)."""
    from .baselines import build_baseline

    variant = VARIANTS[name]
    cfg = gen_cfg if weights is None else dataclasses.replace(gen_cfg, guidance_path=str(weights))
    return build_baseline(variant.sampler, cfg)


# -- output ----------------------------------------------------------------------------------------------------------
COLUMNS = ("FID", "KID", "FID-H", "KID-H", "FID-H(lm)", "KID-H(lm)", "HandConf", "MSE-2D", "MSE-3D", "SilhouetteIoU")
# the columns that also mean something for the real images (detector / regressor / segmenter against the labels)
ALIGNMENT = ("HandConf", "HandConf-labelled", "num_detected_hands", "MSE-2D", "MSE-3D", "SilhouetteIoU")


def _value(v) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "-"
    return f"{v:.4g}" if isinstance(v, (int, float)) else str(v)


def markdown_table(metrics: dict, settings: dict, *, paper: bool = True, real_alignment: dict | None = None) -> str:
    """Our rows (one per generator), the real images' alignment row (when given) and, below, the paper's printed
    rows for the same generators."""
    names = [k for k in COLUMNS if any(k in m for m in metrics.values())]
    lines = ["| generator | paper row | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    for gen, m in metrics.items():
        row = VARIANTS[gen].paper if gen in VARIANTS else ""
        lines.append(f"| {gen} | {row} | " + " | ".join(_value(m.get(k, math.nan)) for k in names) + " |")
    if real_alignment is not None:
        lines.append("| (real test images) | the alignment columns' reference | "
                     + " | ".join(_value(real_alignment.get(k, math.nan)) for k in names) + " |")
    text = "\n".join(lines) + "\n"
    if paper:
        shown = [g for g in list(metrics) + ["uni-controlnet"] if g in PAPER_ROWS]
        lines = ["| generator (paper, MSCOCO, SD 1.5) | " + " | ".join(PAPER_METRICS) + " |",
                 "|" + "---|" * (len(PAPER_METRICS) + 1)]
        lines += [f"| {g} | " + " | ".join(_value(v) for v in PAPER_ROWS[g]) + " |" for g in shown]
        text += "\nThe paper's printed rows (Tables 1 and 4):\n\n" + "\n".join(lines) + "\n"
    return text + "\n" + f"Settings: `{json.dumps(settings)}`\n"


def figure(result: dict, path: Path, *, scale: int = 2) -> Path:
    """One row per generator on the same meshes (rows: mesh, real, then the generators), labelled."""
    from PIL import Image, ImageDraw

    rows = [("mesh", result["mesh"]), ("real", result["real"])] + list(result["images"].items())
    k, _, s, _ = result["mesh"].shape
    cell, label_w, pad = s * scale, 150, 2
    canvas = Image.new("RGB", (label_w + k * (cell + pad), len(rows) * (cell + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (name, images) in enumerate(rows):
        y = r * (cell + pad)
        draw.text((4, y + cell // 2 - 6), name, fill="black")
        for c in range(min(k, images.shape[0])):
            array = (images[c].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            tile = Image.fromarray(array).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (label_w + c * (cell + pad), y))
    from hands.paths import write_atomic

    write_atomic(path, lambda tmp: canvas.save(tmp, format="PNG"))
    return path


def _markdown(metrics: dict, settings: dict) -> str:
    return markdown_table({settings["generator"]: metrics}, settings, paper=False)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m generator.table1", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("synthlab", "coco"), default="synthlab",
                        help="synthlab (the miniature) or coco (the paper's protocol, needs --root)")
    parser.add_argument("--root", help="MSCOCO in InterWild's data/MSCOCO layout with val captions; synthlab's "
                                       "folder (default: the cached synthlab)")
    parser.add_argument("--split", default="test-wild", help="synthlab's test split (test-wild)")
    parser.add_argument("--out", required=True, help="output folder (mini-table1.* for synthlab, table1.* for coco)")
    parser.add_argument("--runs", help="training runs folder (default: runs/table1-<dataset>)")
    parser.add_argument("--generators", default=",".join(DEFAULT_GENERATORS),
                        help=f"comma-separated rows, of: {', '.join(VARIANTS)}")
    parser.add_argument("--generator", help="one generator, sampled with --guidance-path (no training)")
    parser.add_argument("--inception-weights",
                        help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (the paper's FID/KID features); "
                             "without it: the shipped hand segmenter's features (SegmenterFeatures)")
    parser.add_argument("--generator-config", default=None, help="the base: a name in configs/generator or a YAML path "
                                                                 "(tiny-synthlab for synthlab, sd15 for coco)")
    parser.add_argument("--sd-path", help="local Stable Diffusion 1.5 folder")
    parser.add_argument("--guidance-path", help="with --generator: its trained weights")
    parser.add_argument("--mano-dir", help="MANO files the labels are for")
    parser.add_argument("--prompts", help="captions file of MSCOCO val (default: the split's default file)")
    parser.add_argument("--n", type=int, default=64, help="labelled test samples (64)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, help="generator resolution (default: the generator's)")
    parser.add_argument("--steps", type=int, default=250, help="training steps of every trained row (250)")
    parser.add_argument("--train-batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate of every trained row (2e-4)")
    parser.add_argument("--train-split", help="training split (synthlab: train-wild; coco: train)")
    parser.add_argument("--use-local", action="store_true", help="also feed the local mesh images at sampling")
    parser.add_argument("--mediapipe", action="store_true",
                        help="Hand Conf, MSE-2D and the landmark-box FID-H with MediaPipe Hands (optional extra)")
    parser.add_argument("--mse3d-ckpt", metavar="RUN",
                        help="MSE-3D: a recon checkpoint (run folder or sidecar JSON) run on the generated images "
                             "(the paper: InterWild; e.g. python -m recon.train --arch interwild ...)")
    parser.add_argument("--mse3d-unit", choices=("mm", "cm"), default="mm",
                        help="MSE-3D in squared mm (default) or squared cm (the paper prints no unit)")
    parser.add_argument("--plugin", action="append", default=[],
                        help="with --mse3d-ckpt: a module or .py file registering its regressor (as recon.test)")
    parser.add_argument("--no-silhouette", action="store_true", help="skip the hand-segmenter alignment score")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    from eval.genmetrics import InceptionFeatures, MediaPipeHands
    from hands.datasets import DatasetError
    from hands.mano import HandModel

    from .model import load_config
    from .train import TrainConfig, user_errors

    prefix = "mini-table1" if args.dataset == "synthlab" else "table1"
    try:
        config_name = args.generator_config or ("tiny-synthlab" if args.dataset == "synthlab" else "sd15")
        overrides = [f"sd_path={args.sd_path}"] if args.sd_path else []
        gen_cfg = load_config(config_name, overrides)
        settings = Table1Settings(root=args.root, n=args.n, batch_size=args.batch_size, size=args.size, seed=args.seed,
                                  use_local=args.use_local, mano_dir=args.mano_dir, prompts_file=args.prompts,
                                  device=args.device, dataset=args.dataset, split=args.split,
                                  framing=gen_cfg.framing, extend=gen_cfg.extend)
        if args.dataset == "coco":
            val_prompts(settings.root, settings.prompts_file)  # fail before loading the networks
        names = [args.generator] if args.generator else [g.strip() for g in args.generators.split(",") if g.strip()]
        unknown = [g for g in names if g not in VARIANTS]
        if unknown:
            raise ValueError(f"--generators: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
        from .segmenter import load_segmenter

        if args.inception_weights:
            features = InceptionFeatures(args.inception_weights)
        else:
            features = SegmenterFeatures(load_segmenter())
        features = features.to(args.device).eval()
        detector = MediaPipeHands(min_detection_confidence=0.0) if args.mediapipe else None  # Hand1000's Hand Conf
        landmarks = MediaPipeHands(min_detection_confidence=0.5) if args.mediapipe else None  # Hand1000's FID-H
        hand_model = HandModel(mano_dir=args.mano_dir)
        scorer = None
        if not args.no_silhouette:
            from .segmenter import SilhouetteScore

            scorer = SilhouetteScore(load_segmenter(device=args.device), hand_model.faces_for("right"),
                                     hand_model.faces_for("left"))
        regressor = None
        if args.mse3d_ckpt:
            # the one place generator reaches into recon: a regressor checkpoint is loaded by the code that wrote it
            from recon.registry import import_plugin
            from recon.test import CheckpointJoints

            for plugin in args.plugin:
                import_plugin(plugin)
            regressor = CheckpointJoints(args.mse3d_ckpt, device=args.device, mano_dir=args.mano_dir,
                                         hand_model=hand_model)
            if regressor.warning:
                print(f"generator.table1: warning: --mse3d-ckpt: {regressor.warning}", file=sys.stderr)
        elif args.plugin:
            raise ValueError("--plugin: only with --mse3d-ckpt")
        runs = Path(args.runs or f"runs/table1-{args.dataset}")
        if args.generator:
            weights = {args.generator: Path(args.guidance_path) if args.guidance_path else None}
        else:
            base = TrainConfig(
                dataset=args.dataset, data_root=args.root if args.dataset == "coco" else args.root,
                split=args.train_split or ("train-wild" if args.dataset == "synthlab" else "train"),
                dataset_options={"one_person": True, "require_fit": True} if args.dataset == "coco" else {},
                mano_dir=args.mano_dir, generator_config=config_name, sd_path=args.sd_path, steps=args.steps,
                batch_size=args.train_batch_size, lr=args.lr, size=args.size, framing=gen_cfg.framing,
                extend=gen_cfg.extend, seed=args.seed, device=args.device, progress=not args.no_progress,
                sample_every=0, checkpoint_every=max(1, args.steps // 5), sample_steps=10)
            weights = dict(train_variants(names, base, runs, hand_model=hand_model, log=lambda m: print(m, flush=True)))
        pipes = {name: build_generator(name, gen_cfg, weights.get(name)).to(args.device) for name in names}
        result = run_generators(settings, pipes, feature_extractor=features, keypoint_detector=detector,
                                silhouette_scorer=scorer, landmark_detector=landmarks, joint_regressor=regressor,
                                hand_model=hand_model, progress=not args.no_progress, mse3d_unit=args.mse3d_unit)
    # recon's CheckpointError and PluginError (a bad --mse3d-ckpt or --plugin) are ValueErrors
    except (DatasetError, ValueError, OSError, ImportError) + user_errors() as error:
        print(f"generator.table1: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_settings = {"dataset": args.dataset, "split": args.split if args.dataset == "synthlab" else "train/val",
                    "generator_config": config_name, "sd_path": args.sd_path, "n": result["n"], "seed": args.seed,
                    "train_steps": args.steps, "train_batch_size": args.train_batch_size, "lr": args.lr,
                    "tas_updates": TAS_UPDATES, "use_local": args.use_local,
                    "features": "inception (pytorch-fid weights)" if args.inception_weights else
                                "hand segmenter features (SegmenterFeatures)",
                    "mediapipe": args.mediapipe,
                    "mse2d": f"squared px of the {result['size']} px generated image, per detected labelled joint "
                             "(MediaPipe)" if args.mediapipe else None,
                    "mse3d": dict(regressor.describe(),
                                  unit=f"squared {args.mse3d_unit}, wrist-aligned, per labelled joint")
                             if regressor is not None else None,
                    "prompts_available": result["prompts_available"],
                    "figure_prompts": result["prompts"]}
    from hands.paths import write_atomic
    from hands.provenance import code_version

    provenance = {"command": " ".join(["python -m generator.table1", *map(str, argv if argv is not None else sys.argv[1:])]),
                  "created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), **code_version()}
    payload = {"metrics": result["metrics"], "real_alignment": result["real_alignment"], "settings": run_settings,
               "provenance": provenance,
               "paper_rows": {k: dict(zip(PAPER_METRICS, v)) for k, v in PAPER_ROWS.items()}}
    text = markdown_table(result["metrics"], run_settings, real_alignment=result["real_alignment"])
    write_atomic(out / f"{prefix}.json", lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=1)))
    write_atomic(out / f"{prefix}.md", lambda tmp: Path(tmp).write_text(text))
    figure(result, out / f"{prefix}.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
