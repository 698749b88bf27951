"""``python -m mixing.pregenerate --n N --out DIR``: write generated samples as shards for offline mixing.

Shard k holds ``--shard-size`` samples generated from random stream k of the source (seeded by ``--seed``),
so the output does not depend on how often the command was interrupted: a rerun skips the complete shards
(both files present) and writes the missing ones. Shards are written atomically (:mod:`mixing.shards`).
Train with them via ``python -m recon.train ... --mix-mode offline mixing.shards=DIR``.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mixing.config import LABEL_SOURCES, MixingConfig
from mixing.shards import save_shard

logger = logging.getLogger("mixing.pregenerate")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mixing.pregenerate", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, required=True, help="number of samples to generate")
    p.add_argument("--out", type=Path, required=True, help="output folder of shard-*.safetensors/.json")
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--labels", choices=LABEL_SOURCES, default="train", help="training-set labels or the pose prior")
    p.add_argument("--dataset", default="synthlab", help="label dataset (with --labels train): ih26m, reih, coco, synthlab")
    p.add_argument("--split", default=None, help="its split (default: train-lab for synthlab, else train)")
    p.add_argument("--data-root", default=None, help="the dataset's folder (default: the embedded synthlab)")
    p.add_argument("--mano-dir", default=None)
    p.add_argument("--generator", default="attentionhand")
    p.add_argument("--generator-config", default="tiny-synthlab", help="tiny-synthlab (trained, default) | tiny | sd15 | a YAML path")
    p.add_argument("--sd-path", default=None)
    p.add_argument("--guidance-path", default=None)
    p.add_argument("--size", type=int, default=64, help="generator resolution (square)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the generator config's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    if args.n < 1 or args.shard_size < 1:
        print("mixing.pregenerate: error: --n and --shard-size must be positive", file=sys.stderr)
        return 2
    cfg = MixingConfig(
        mode="sync",
        generator=args.generator,
        generator_config=args.generator_config,
        sd_path=args.sd_path,
        guidance_path=args.guidance_path,
        size=args.size,
        labels=args.labels,
        num_inference_steps=args.steps,
    )
    try:
        cfg.check()
        return _pregenerate(args, cfg)
    except (ValueError, OSError, RuntimeError) as exc:  # bad flags, files, datasets, MANO folders, devices
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"mixing.pregenerate: error: {message}", file=sys.stderr)
        return 2


def _pregenerate(args: argparse.Namespace, cfg: MixingConfig) -> int:
    from hands.mano import HandModel
    from hands.paths import output_folder
    from mixing.build import build_label_source, build_source

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device}: not a device name (cpu, cuda, cuda:N)") from None
    output_folder(args.out, "--out")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps {args.steps}: expected a positive number of sampling steps")
    hand_model = HandModel(mano_dir=args.mano_dir)
    readers = []
    if args.labels == "train":
        from hands.datasets import build_dataset

        split = args.split or ("train-lab" if args.dataset == "synthlab" else "train")
        readers.append(build_dataset(args.dataset, args.data_root, split, hand_model=hand_model))
    labels = build_label_source(cfg, hand_model=hand_model, train_readers=readers)
    source = build_source(cfg, hand_model=hand_model, labels=labels, device=device, seed=args.seed)

    n_shards = math.ceil(args.n / args.shard_size)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    todo = [k for k in range(n_shards) if not ((out / f"shard-{k:05d}.safetensors").is_file() and (out / f"shard-{k:05d}.json").is_file())]
    if len(todo) < n_shards:
        logger.info("%s: %d of %d shards already complete; writing the other %d", out, n_shards - len(todo), n_shards, len(todo))
    started = time.perf_counter()
    written = 0
    for k in tqdm(todo, desc="shards", unit="shard"):
        size = min(args.shard_size, args.n - k * args.shard_size)
        batch = source.generate(size, call=k)
        save_shard(batch, out / f"shard-{k:05d}.safetensors")
        written += size
    elapsed = time.perf_counter() - started
    logger.info("wrote %d samples in %d shards to %s in %.1f s", written, len(todo), out, elapsed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
