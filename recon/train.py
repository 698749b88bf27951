"""``python -m recon.train``: train a two-hand regressor, checkpoint it, evaluate it.

    python -m recon.train                                   # the embedded default (synthlab, demo profile)
    python -m recon.train --arch baseline --epochs 2 optim.lr=3e-4
    python -m recon.train --profile paper --data-root /data --datasets ih26m --mano-dir /mano
    torchrun --nproc-per-node 2 -m recon.train ...           # DDP: gloo on CPU, NCCL on GPUs
    python -m recon.train --resume --out runs/recon          # continue the newest checkpoint in --out
    python -m recon.train --overwrite --out runs/recon       # replace the run in --out by a new one

A plain PyTorch loop, read top to bottom:
1. arguments -> config (:mod:`recon.config`: profile, arch and --config files, flags, key=value), checked;
2. processes (torchrun's environment), device, seeds; the run folder claimed (:mod:`recon.runs`: one run
   per --out, locked while it runs);
3. data: the training and test sets (skipped records reported; an empty split is an error), a resumable sampler, and the one ``batches`` iterator per epoch (the mixer of
   :mod:`mixing` puts ``round(r * B)`` generated samples into each batch when --synthetic-ratio > 0, or, with
   --synthetic-batch add, B real ones and the generated ones on top: :func:`mixing.mixer.batch_parts`);
4. model (through the registry), optimizer; --resume restores weights, optimizer, RNG and data order;
5. the loop: lr, forward, loss dict, finite check, backward, clip, step, log, checkpoint;
6. a final checkpoint, evaluation on the test sets (MPVPE / RRVE / MRRPE in mm), ``<out>/metrics.json``
   (with ``"skips"``: the records skipped per dataset and reason).

Rank 0 alone prints, writes TensorBoard logs (``<out>/tb``), checkpoints (``<out>/checkpoints``) and
metrics. Bad arguments exit with status 2 and one line; a non-finite loss exits with status 1 and the loss
dict.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from collections import Counter
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from eval.report import mesh_overlay_grid
from hands.datasets import DatasetError
from hands.mano import HandModel, MANOError
from hands.sample import collate
from mixing.build import build_label_source, build_provider, build_source, per_sample_preprocess
from mixing.pool import trainer_stream
from mixing.config import MIX_MODES, MixingConfig
from mixing.mixer import SYNTHETIC_BATCH_MODES, Mixer, batch_parts
from recon import checkpoint as ckpt
from recon.cards import build_card
from recon.config import ConfigError, from_config, from_dict, load_config, to_dict
from recon.data import (
    DataSpecError,
    ResumableSampler,
    base_readers,
    build_test_sets,
    build_train_set,
    describe_skips,
    index_skips,
    check_data,
    describe_default_data,
    set_epoch,
    augment_kwargs,
    train_transform,
)
from recon.evaluate import evaluate_regressor, format_results
from recon.registry import REGRESSORS, PluginError, build_regressor, import_plugin, load_builtin_regressors
from recon.runs import RunFolderError, claim_run_folder

__all__ = ["main", "parse_args", "NonFiniteLoss", "UsageError"]


class UsageError(ValueError):
    """A bad command line, in one line."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the message holds the step and the loss dict."""


def one_line(error: BaseException, limit: int = 600) -> str:
    """An error's message on one line (whitespace runs, newlines included, become one space), at most
    ``limit`` characters: what a command line prints after ``error:``."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number 0 <= r < 1, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected 0 <= r < 1, got {value}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m recon.train",
        description="Train a two-hand mesh regressor; evaluate it at the end (MPVPE / RRVE / MRRPE, mm).",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=3e-4")
    load_builtin_regressors()
    parser.add_argument(
        "--arch", help=f"registered regressor: {', '.join(REGRESSORS.names())} or a --plugin's (default: baseline)"
    )
    parser.add_argument("--synthetic-ratio", type=_ratio, help="share r of each batch from the generator, 0 <= r < 1")
    parser.add_argument(
        "--synthetic-batch", choices=SYNTHETIC_BATCH_MODES,
        help="share (default): --batch-size counts every sample, round(r * B) generated; add: --batch-size counts "
        "the real samples and the generated ones come on top (16 real at r = 0.3: 16 + 7)",
    )
    parser.add_argument("--profile", choices=("demo", "paper"), help="configs/recon/<profile>.yaml (default: demo)")
    parser.add_argument("--config", help="a YAML file layered over the profile and arch files")
    parser.add_argument("--data-root", help="folder with one sub-folder per dataset (or the one dataset's folder)")
    parser.add_argument("--datasets", help="training datasets, e.g. ih26m,reih or synthlab:train-wild")
    parser.add_argument("--test-datasets", help="test datasets (default: the training datasets' test splits)")
    parser.add_argument("--mano-dir", help="folder with MANO_RIGHT.pkl / MANO_LEFT.pkl (default: procedural hand)")
    parser.add_argument("--out", help="run folder for checkpoints, TensorBoard logs and metrics.json")
    parser.add_argument("--max-steps", type=positive_int, help="stop after this many optimizer steps")
    parser.add_argument("--epochs", type=positive_int)
    parser.add_argument("--batch-size", type=positive_int, help="samples per step and process (the real ones with --synthetic-batch add)")
    parser.add_argument("--resume", nargs="?", const="auto", help="continue from a checkpoint (default: newest in --out)")
    parser.add_argument("--overwrite", action="store_true",
                        help="a new run replaces the run already in --out (its checkpoints, logs, metrics); with "
                        "--resume, drops that run's checkpoints later than the one resumed")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--plugin", action="append", default=[], help="module or .py file registering regressors")
    parser.add_argument("--backbone-weights", help="pretrained backbone weights for the regressor")
    parser.add_argument("--mix-mode", choices=MIX_MODES, help="how generated samples arrive (default: online)")
    parser.add_argument("--generator", help="attentionhand (default) or a baseline generator of Table A")
    parser.add_argument("--sd-path", help="local Stable Diffusion 1.5 folder (diffusers layout) for the generator")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_intermixed_args(argv)  # KEY=VALUE may come before or after the flags


def _flags(args: argparse.Namespace) -> dict:
    """Command-line flags as dotted config keys (None: not given)."""
    flags = {
        "arch": args.arch,
        "profile": args.profile,
        "data.root": args.data_root,
        "mano_dir": args.mano_dir,
        "out": args.out,
        "seed": args.seed,
        "device": args.device,
        "train.synthetic_ratio": args.synthetic_ratio,
        "train.synthetic_batch": args.synthetic_batch,
        "train.max_steps": args.max_steps,
        "train.epochs": args.epochs,
        "train.batch_size": args.batch_size,
        "train.backbone_weights": args.backbone_weights,
        "mixing.mode": args.mix_mode,
        "mixing.generator": args.generator,
        "mixing.sd_path": args.sd_path,
    }
    if args.datasets:
        flags["data.train"] = [part for part in args.datasets.split(",") if part]
        if not args.test_datasets:
            flags["data.test"] = flags["data.train"]
    if args.test_datasets:
        flags["data.test"] = [part for part in args.test_datasets.split(",") if part]
    return flags


def _budget_clock() -> float:
    """Seconds, for train.max_minutes (a function of its own, so that tests can run the budget on a clock of theirs)."""
    return time.perf_counter()


def _out_of_time(spent: bool, world_size: int, device: torch.device) -> bool:
    """Whether any process has spent its time budget (train.max_minutes): every process must stop at the same
    step. One process: ``spent`` as it is; several: the maximum over them (an all-reduce at a checkpoint step,
    only in runs with a budget)."""
    if world_size == 1:
        return spent
    flag = torch.tensor([1.0 if spent else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def check_config(cfg: DictConfig) -> None:
    """Value checks the types cannot express; UsageError names the key."""
    if not 0.0 <= cfg.train.synthetic_ratio < 1.0:
        raise UsageError(f"train.synthetic_ratio={cfg.train.synthetic_ratio}: expected 0 <= r < 1")
    if synthetic_batch(cfg) not in SYNTHETIC_BATCH_MODES:
        raise UsageError(f"train.synthetic_batch={synthetic_batch(cfg)}: expected one of {', '.join(SYNTHETIC_BATCH_MODES)}")
    for key in ("train.epochs", "train.batch_size", "eval.batch_size", "train.ckpt_every", "train.log_every"):
        if OmegaConf.select(cfg, key) < 1:
            raise UsageError(f"{key}={OmegaConf.select(cfg, key)}: expected a positive integer")
    if cfg.train.max_steps is not None and cfg.train.max_steps < 1:
        raise UsageError(f"train.max_steps={cfg.train.max_steps}: expected a positive integer")
    budget = cfg.train.get("max_minutes")  # .get: checkpoints' configs from before the key
    if budget is not None and not (math.isfinite(budget) and budget > 0):
        raise UsageError(f"train.max_minutes={budget}: expected a positive number of minutes (null: no time budget)")
    if cfg.train.get("epoch_steps") is not None and cfg.train.epoch_steps < 1:
        raise UsageError(f"train.epoch_steps={cfg.train.epoch_steps}: expected a positive integer (null: the data's epochs)")
    if cfg.train.average_last < 1:
        raise UsageError(f"train.average_last={cfg.train.average_last}: expected a positive integer (1: the final weights)")
    if min(cfg.data.image_size) < 16:
        raise UsageError(f"data.image_size={list(cfg.data.image_size)}: expected at least 16 px per side")
    if cfg.data.crop not in ("hands", "image", "verts"):
        raise UsageError(f"data.crop={cfg.data.crop!r}: expected 'hands', 'image' or 'verts'")
    if cfg.data.train_frames not in ("all", "interacting_both_fits"):
        raise UsageError(f"data.train_frames={cfg.data.train_frames!r}: expected 'all' or 'interacting_both_fits'")
    if cfg.data.augmentation not in ("interwild", "intaghand", "dir", "internet"):
        raise UsageError(
            f"data.augmentation={cfg.data.augmentation!r}: expected 'interwild', 'intaghand', 'dir' or 'internet'"
        )
    if cfg.data.augment and (cfg.data.augmentation, cfg.data.crop) in (
        ("interwild", "verts"), ("internet", "verts"), ("intaghand", "image")
    ):
        raise UsageError(
            f"data.augmentation={cfg.data.augmentation!r} does not crop data.crop={cfg.data.crop!r} "
            "(InterWild's and InterNet's crop 'image' or 'hands', IntagHand's 'verts' or 'hands')"
        )
    augment_kwargs(cfg)  # checked against data.augmentation's arguments before any data is read (even with augment off)
    if cfg.optim.warmup_epochs < 0 or not 0.0 <= cfg.optim.warmup_start <= 1.0:
        raise UsageError(
            f"optim.warmup_epochs={cfg.optim.warmup_epochs}, optim.warmup_start={cfg.optim.warmup_start}: "
            "expected epochs >= 0 and a start factor in [0, 1]"
        )
    if not 0 <= cfg.seed < 2**32:  # NumPy's limit; torch's generators take 64 bits
        raise UsageError(f"seed={cfg.seed}: expected 0 <= seed < 2**32")
    if cfg.threads is not None and cfg.threads < 1:
        raise UsageError(f"threads={cfg.threads}: expected a positive number of CPU threads")
    if not (cfg.optim.lr > 0 and math.isfinite(cfg.optim.lr)):  # NaN fails the comparison too
        raise UsageError(f"optim.lr={cfg.optim.lr}: expected a positive learning rate")
    for key in ("optim.weight_decay", "optim.grad_clip", "optim.lr_decay_gamma"):
        value = OmegaConf.select(cfg, key)
        if value is not None and not (value >= 0 and math.isfinite(value)):
            raise UsageError(f"{key}={value}: expected a finite number >= 0")
    if cfg.data.num_workers < 0:
        raise UsageError(f"data.num_workers={cfg.data.num_workers}: expected 0 (load in the main process) or more")
    if cfg.optim.optimizer not in ("adam", "adamw"):
        raise UsageError(f"optim.optimizer={cfg.optim.optimizer!r}: expected 'adam' or 'adamw'")
    if cfg.optim.schedule not in ("step", "cosine"):
        raise UsageError(f"optim.schedule={cfg.optim.schedule!r}: expected 'step' or 'cosine'")
    phases, periods = list(cfg.optim.cosine_phases), list(cfg.optim.cosine_periods)
    if any(p < 1 for p in phases) or any(p < 1 for p in periods):
        raise UsageError(f"optim.cosine_phases={phases}, optim.cosine_periods={periods}: expected positive epoch counts")
    if periods and len(periods) != len(phases):
        raise UsageError(f"optim.cosine_periods={periods}: expected one period per cosine phase ({len(phases)}) or none")
    if cfg.train.amp not in AMP_MODES:
        raise UsageError(f"train.amp={cfg.train.amp!r}: expected one of {', '.join(AMP_MODES)}")
    try:
        MixingConfig(**OmegaConf.to_container(cfg.mixing)).check()
    except ValueError as error:
        raise UsageError(str(error)) from None
    if cfg.arch not in REGRESSORS:
        raise UsageError(f"--arch {cfg.arch}: unknown regressor; known: {', '.join(REGRESSORS.names())} (plugins: --plugin MODULE)")
    for key in ("data.max_train_samples", "data.max_test_samples"):
        if OmegaConf.select(cfg, key) is not None and OmegaConf.select(cfg, key) < 1:
            raise UsageError(f"{key}={OmegaConf.select(cfg, key)}: expected a positive number of samples (or null)")
    check_mixing(cfg)


def synthetic_batch(cfg: DictConfig) -> str:
    """train.synthetic_batch (share | add); .get: checkpoints' configs from before the key were share."""
    return str(cfg.train.get("synthetic_batch", "share"))


def batch_split(cfg: DictConfig) -> tuple[int, int]:
    """(real, generated) samples in each step's batch of one process (:func:`mixing.mixer.batch_parts`)."""
    return batch_parts(cfg.train.batch_size, cfg.train.synthetic_ratio, synthetic_batch(cfg))


def describe_batch(cfg: DictConfig) -> str:
    """'batch 16', 'batch 16 (11 real + 5 generated)', or with add 'batch 23 (16 real + 7 generated on top)'."""
    n_real, n_synthetic = batch_split(cfg)
    if n_synthetic == 0:
        return f"batch {n_real + n_synthetic}"
    return (f"batch {n_real + n_synthetic} ({n_real} real + {n_synthetic} generated"
            f"{' on top' if synthetic_batch(cfg) == 'add' else ''})")


def check_mixing(cfg: DictConfig) -> None:
    """The combinations of batch size, ratio and mixing settings that would fail once training runs;
    UsageError names the flag or key. Nothing is checked when no generated sample is used (round(r * B) = 0)."""
    ratio, batch = cfg.train.synthetic_ratio, cfg.train.batch_size
    n_real, n_synthetic = batch_split(cfg)
    if n_real < 1:
        raise UsageError(
            f"--synthetic-ratio {ratio} with --batch-size {batch}: round(r * B) = {n_synthetic} generated samples "
            "leave no real sample in a batch; lower the ratio or raise the batch size"
        )
    if n_synthetic == 0:
        return
    if cfg.mixing.mode == "online" and cfg.mixing.capacity < n_synthetic:
        raise UsageError(
            f"mixing.capacity={cfg.mixing.capacity}: smaller than the {n_synthetic} generated samples each batch takes "
            f"({describe_batch(cfg)}); raise it to at least {n_synthetic}"
        )
    if cfg.mixing.mode == "offline":
        return  # the shards' images are used as they are
    from generator.model import check_sd_folder
    from mixing.build import generator_config

    try:
        generator_cfg = generator_config(MixingConfig(**OmegaConf.to_container(cfg.mixing)))
    except Exception as error:  # not found, unknown keys, a YAML or OmegaConf parse error: the user's file
        raise UsageError(f"mixing.generator_config={cfg.mixing.generator_config}: {one_line(error)}") from None
    multiple = None
    if generator_cfg.sd_path:
        try:
            root = check_sd_folder(generator_cfg.sd_path)
            levels = [
                len(json.loads((root / sub / "config.json").read_text())["block_out_channels"]) for sub in ("vae", "unet")
            ]
            multiple = 2 ** (levels[0] - 1) * 2 ** (levels[1] - 1)
        except ValueError as error:  # also a config.json that is not JSON (JSONDecodeError)
            raise UsageError(f"--sd-path {generator_cfg.sd_path}: {one_line(error)}") from None
        except (KeyError, TypeError, OSError) as error:
            raise UsageError(f"--sd-path {generator_cfg.sd_path}: unreadable vae/unet config.json ({one_line(error)})") from None
    else:
        tiny = generator_cfg.tiny
        multiple = 2 ** (len(tiny.vae_channels) - 1) * 2 ** (len(tiny.unet_channels) - 1)
    if multiple and cfg.mixing.size % multiple:
        raise UsageError(
            f"mixing.size={cfg.mixing.size}: generator {cfg.mixing.generator_config} needs a multiple of {multiple} px "
            f"(its VAE and UNet downsampling); e.g. mixing.size={max(multiple, cfg.mixing.size // multiple * multiple)}"
        )


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device name (auto, cpu, cuda, cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


AMP_MODES = ("off", "bf16", "fp16", "auto")


def amp_dtype(mode: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``train.amp`` on ``device`` (None: full precision). ``auto``: bf16 on a CUDA device
    that supports it, else fp16 there; full precision on the CPU."""
    if mode == "auto":
        if device.type != "cuda":
            return None
        try:
            bf16 = torch.cuda.is_bf16_supported()
        except Exception:  # the device cannot be asked (a simulator, a broken driver): full precision
            return None
        return torch.bfloat16 if bf16 else torch.float16
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def lr_at(cfg: DictConfig, epoch: int, step: int = 0) -> float:
    """Step decay: ``lr * gamma ** (number of lr_decay_epochs <= epoch + number of lr_decay_steps <= step)``;
    ``optim.schedule=cosine``: ``lr * (1 + cos(pi * epoch / train.epochs)) / 2``, per epoch (DIR's), or per step
    over ``train.max_steps`` when that is set (``lr * (1 + cos(pi * step / max_steps)) / 2``: runs of equal steps,
    as recon.table2's, then anneal alike whatever their steps per epoch); either after a linear warm-up over the
    first ``optim.warmup_epochs`` epochs (see OptimConfig)."""
    warmup = cfg.optim.get("warmup_epochs", 0)
    factor = 1.0
    if epoch < warmup:
        start = cfg.optim.get("warmup_start", 1e-3)
        factor = start + (1.0 - start) * epoch / warmup
    if cfg.optim.get("schedule", "step") == "cosine":  # .get: hand-made configs without the key mean step decay
        phases = list(cfg.optim.get("cosine_phases", []) or [])
        if phases:
            periods = list(cfg.optim.get("cosine_periods", []) or []) or phases
            start = 0
            for index, (length, period) in enumerate(zip(phases, periods)):
                if epoch < start + length or index == len(phases) - 1:
                    local = min(epoch - start, length)
                    return factor * cfg.optim.lr * 0.5 * (1.0 + math.cos(math.pi * local / period))
                start += length
        if cfg.train.max_steps:
            progress = min(step, cfg.train.max_steps) / cfg.train.max_steps
            return factor * cfg.optim.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        return factor * cfg.optim.lr * 0.5 * (1.0 + math.cos(math.pi * min(epoch, cfg.train.epochs) / cfg.train.epochs))
    drops = sum(1 for milestone in cfg.optim.lr_decay_epochs if epoch >= milestone)
    drops += sum(1 for milestone in cfg.optim.lr_decay_steps if step >= milestone)
    return cfg.optim.lr * cfg.optim.lr_decay_gamma**drops * factor


def generator_seed(cfg: DictConfig) -> int:
    """The seed of a run's generator side (labels, prompts, noise, synthetic augmentation; ranks differ by their
    rank inside mixing), derived from the run's seed."""
    return int(cfg.seed) * 1000 + 17


def synthetic_provider(cfg: DictConfig, *, hand_model, train_set, device, rank: int, world_size: int):
    """The generator side of the mixed batches for r > 0 (:mod:`mixing`): labels of the training readers
    (or the pose prior), the generator, and the provider of ``cfg.mixing.mode``; plus the preprocessing that
    gives generated samples the real ones' crop and augmentation. Seeds derive from (seed, rank)."""
    mix_cfg = MixingConfig(**OmegaConf.to_container(cfg.mixing))
    seed = generator_seed(cfg)
    source = None
    if mix_cfg.mode != "offline":
        labels = build_label_source(mix_cfg, hand_model=hand_model, train_readers=base_readers(train_set))
        source = build_source(mix_cfg, hand_model=hand_model, labels=labels, device=device, seed=seed, rank=rank)
    provider = build_provider(mix_cfg, source=source, device=device, seed=seed, rank=rank, world_size=world_size)
    preprocess = per_sample_preprocess(train_transform(cfg), seed=seed, rank=rank)
    return provider, preprocess


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; initialises the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, 0
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("RECON_DDP_BACKEND") != "gloo" else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def _reduce_mean(values: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= world_size
    return values


def claim_out(out: Path, *, resume_meta, overwrite: bool, is_main: bool, world_size: int, say):
    """Rank 0 claims the run folder (:func:`recon.runs.claim_run_folder`: lock, one run per folder); every
    rank learns the outcome, so a refused folder stops all of them with the same one line."""
    folder, error = None, None
    if is_main:
        try:
            folder = claim_run_folder(out, resume_meta=resume_meta, overwrite=overwrite, say=say)
        except RunFolderError as refused:
            error = str(refused)
    if world_size > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise UsageError(error)
    return folder


def train(args: argparse.Namespace) -> dict:
    """Run a training job from parsed arguments; returns {"metrics": ..., "out": ..., "step": ...}."""
    with ExitStack() as cleanup:  # releases the run folder's lock however the run ends
        return _train(args, cleanup)


def _train(args: argparse.Namespace, cleanup: ExitStack) -> dict:
    wall_start = time.perf_counter()

    # 1. arguments -> config ------------------------------------------------------------------------------
    for plugin in args.plugin:
        import_plugin(plugin)
    load_builtin_regressors()
    resume_info = None
    if args.resume is not None:
        where = args.resume
        if args.resume == "auto":  # the newest checkpoint of the run in --out
            where = Path(args.out or load_config(profile=args.profile, flags=_flags(args)).out) / "checkpoints"
            if not where.is_dir():
                raise UsageError(f"--resume: no checkpoints in {where}; nothing to resume (give --out or a checkpoint)")
        resume_info = ckpt.read_checkpoint_info(where, need_state=True)
        base = from_dict(resume_info.meta["config"])
        if args.arch and args.arch != base.arch:
            raise UsageError(f"--arch {args.arch}: the checkpoint to resume was trained as {base.arch!r}")
        cfg = load_config(base=base, flags=_flags(args), overrides=args.overrides)
    else:
        cfg = load_config(
            profile=args.profile, arch=args.arch, config_file=args.config, flags=_flags(args), overrides=args.overrides
        )
    check_config(cfg)
    check_data(cfg)
    arch_cls = REGRESSORS.get(cfg.arch)
    model_kwargs = from_config(cfg, arch_cls)
    n_real, n_synthetic = batch_split(cfg)
    if resume_info is not None and batch_split(base)[0] != n_real:  # the sampler resumes in batches of real samples
        raise UsageError(
            f"--resume {resume_info.json_path}: trained with {describe_batch(base)}, this command gives "
            f"{describe_batch(cfg)}: {batch_split(base)[0]} real samples a step cannot resume as {n_real}; keep "
            "--batch-size, --synthetic-ratio and --synthetic-batch (or start a new run)"
        )

    # 2. processes, device, seeds -------------------------------------------------------------------------
    rank, world_size, local_rank = _distributed()
    is_main = rank == 0
    device = resolve_device(cfg.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if n_synthetic > 0 and cfg.mixing.mode == "online":  # above the generator's stream (mixing.pool)
            cleanup.enter_context(trainer_stream(device))
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    np.random.seed(cfg.seed % 2**32)  # any NumPy / Python draw (a plugin's, a library's) is seeded too
    random.seed(cfg.seed)
    out = Path(cfg.out).expanduser()
    say = print if is_main else (lambda *a, **k: None)
    if cfg.train.synthetic_ratio > 0 and n_synthetic == 0 and is_main:
        print(
            f"recon.train: warning: --synthetic-ratio {cfg.train.synthetic_ratio} with --batch-size {cfg.train.batch_size}: "
            "round(r * B) = 0, so no batch gets a generated sample; this run trains on real samples only "
            "(its checkpoints record no generator)",
            file=sys.stderr,
        )
    run_folder = claim_out(
        out, resume_meta=resume_info.meta if resume_info is not None else None, overwrite=args.overwrite,
        is_main=is_main, world_size=world_size, say=say,
    )
    if run_folder is not None:
        cleanup.callback(run_folder.release)

    # 3. data ---------------------------------------------------------------------------------------------
    hand_model = HandModel(mano_dir=cfg.mano_dir)
    default_note = describe_default_data(cfg)
    if default_note:
        say(default_note)
    train_set = build_train_set(cfg, hand_model=hand_model)
    # the test sets too, before training: an empty split is an error now, not after the run
    test_sets = build_test_sets(cfg, hand_model=hand_model) if cfg.eval.at_end else {}
    skip_report = {"train": index_skips(base_readers(train_set)), "test": {}}
    for spec, dataset in test_sets.items():
        skip_report["test"].update({spec.key: n for n in index_skips(base_readers(dataset)).values()})
    for role, found in skip_report.items():
        for name, skipped in found.items():
            say(f"{role} {name}: {describe_skips(Counter(skipped))} record(s) skipped when indexing")
    sampler = ResumableSampler(train_set, num_replicas=world_size, rank=rank, seed=cfg.seed, batch_size=n_real)
    loader = DataLoader(
        train_set,
        batch_size=n_real,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=collate,
        drop_last=True,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global RNG out of the data order
    )
    batches_per_epoch = sampler.batches_per_epoch()
    if batches_per_epoch < 1:
        raise UsageError(
            f"train.batch_size={cfg.train.batch_size}: larger than this process's share of the training set "
            f"({sampler.num_samples} samples); lower --batch-size"
        )
    provider, preprocess_synthetic = None, None
    if n_synthetic > 0:
        try:
            provider, preprocess_synthetic = synthetic_provider(
                cfg, hand_model=hand_model, train_set=train_set, device=device, rank=rank, world_size=world_size
            )
        except (ValueError, ImportError, OSError) as error:  # OSError: diffusers' unreadable weight files
            raise UsageError(f"--synthetic-ratio {cfg.train.synthetic_ratio}: {one_line(error)}") from error
        say(
            f"mixing: {n_synthetic} of {n_real + n_synthetic} samples per batch from {cfg.mixing.generator} "
            f"({cfg.mixing.mode}, labels: {cfg.mixing.labels}, {cfg.mixing.size} px)"
        )

    def make_batches(epoch: int, start_batch: int):
        """The one place where a step's batch comes from (mixing.Mixer when r > 0)."""
        sampler.set_epoch(epoch, start_batch)
        set_epoch(train_set, epoch)
        return Mixer(loader, provider, n_synthetic=n_synthetic, device=device, preprocess_synthetic=preprocess_synthetic)

    # 4. model, optimizer, resume -------------------------------------------------------------------------
    model = build_regressor(cfg.arch, **model_kwargs).to(device)
    if cfg.train.backbone_weights and resume_info is None:
        if not callable(getattr(model, "load_backbone_weights", None)):
            raise UsageError(f"--backbone-weights: regressor {cfg.arch!r} has no load_backbone_weights()")
        try:
            model.load_backbone_weights(cfg.train.backbone_weights)
        except Exception as error:  # a user's file: unreadable, not a state dict, not fitting (torch, safetensors, pickle)
            message = one_line(error)
            if not message.startswith("--backbone-weights"):
                message = f"--backbone-weights {cfg.train.backbone_weights}: cannot load it ({type(error).__name__}: {message})"
            raise UsageError(message) from None
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer_cls = torch.optim.AdamW if cfg.optim.optimizer == "adamw" else torch.optim.Adam
    optimizer = optimizer_cls(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    autocast_dtype = amp_dtype(cfg.train.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)  # fp16 only
    step, epoch, start_batch = 0, 0, 0
    if resume_info is not None:
        if int(resume_info.meta.get("world_size", 1)) != world_size:
            raise UsageError(
                f"--resume {resume_info.json_path}: trained with {resume_info.meta.get('world_size')} processes, "
                f"resumed with {world_size}; the data order would differ"
            )
        ckpt.load_weights(model, resume_info, device=device)
        state = ckpt.load_training_state(resume_info)
        optimizer.load_state_dict(state["optimizer"])
        if scaler.is_enabled() and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng_state(state["rng"])
        step, epoch, start_batch = (int(resume_info.meta[k]) for k in ("step", "epoch", "step_in_epoch"))
        say(f"resuming {resume_info.json_path} at step {step} (epoch {epoch}, batch {start_batch})")
    ddp_model = DistributedDataParallel(model) if world_size > 1 else model
    forward = torch.compile(ddp_model) if cfg.train.compile else ddp_model  # training only; `model` stays plain
    max_steps = cfg.train.max_steps or cfg.train.epochs * batches_per_epoch

    writer = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run drops the events logged after its checkpoint's step (they belong to the lost attempt)
        writer = SummaryWriter(str(out / "tb"), purge_step=step + 1 if resume_info is not None else None)
        run_folder.record()  # run.json: from here on the folder holds this run
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))

    def save(epoch_now: int, batch_in_epoch: int, *, averaged_steps: Optional[list] = None, interrupted: bool = False) -> Path:
        """A resumable checkpoint in OUT/checkpoints; with ``averaged_steps``, the averaged weights (no optimizer
        state: not resumable) in OUT/averaged, which resuming and pruning never look into."""
        if batch_in_epoch >= batches_per_epoch:  # a finished epoch resumes at the start of the next one
            epoch_now, batch_in_epoch = epoch_now + 1, 0
        progress = dict(
            step=step, epoch=epoch_now, step_in_epoch=batch_in_epoch, sampler_seed=cfg.seed, world_size=world_size
        )
        extra = {"hand_model": hand_model.fingerprint(), "procedural_hand": bool(hand_model.is_procedural), **build_card(cfg, hand_model)}
        if averaged_steps is not None:
            extra["averaged_steps"] = list(averaged_steps)
        if interrupted:  # resumable, but never averaged (train.average_last): a Ctrl-C step is not a scheduled one
            extra["interrupted"] = True
        return ckpt.save_checkpoint(
            out / ("averaged" if averaged_steps is not None else "checkpoints"),
            model=model,
            arch=cfg.arch,
            model_kwargs=model_kwargs,
            config=to_dict(cfg),
            optimizer=optimizer,
            scaler=scaler,
            progress=progress,
            # averaged weights are kept (metrics.json names them); of the resumable ones, enough to average
            # N scheduled checkpoints after an interrupted one
            keep_last=max(3, cfg.train.average_last + 1) if averaged_steps is None else 0,
            run_id=run_folder.run_id,
            extra=extra,
            resumable=averaged_steps is None,
        )

    # 5. the loop -----------------------------------------------------------------------------------------
    say(
        f"training {cfg.arch} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters) on {device}, "
        f"{world_size} process(es), {batches_per_epoch} steps/epoch, {max_steps} steps, {describe_batch(cfg)}"
        " per process"
        + (f"; forward pass under {str(autocast_dtype).replace('torch.', '')} autocast (train.amp={cfg.train.amp})"
           if autocast_dtype is not None else "")
    )
    if provider is not None and callable(getattr(provider, "prime", None)):
        provider.prime(n_synthetic)  # the first generated batch before the clock starts (reported as prime_s)
    saved_step = resumed_step = step if resume_info is not None else -1
    epoch_steps = cfg.train.get("epoch_steps")  # .get: checkpoints' configs from before the key
    budget_s = None if cfg.train.get("max_minutes") is None else 60.0 * float(cfg.train.max_minutes)
    budget_spent = False
    loop_start, samples_seen, substituted = time.perf_counter(), 0, 0
    budget_start = _budget_clock() if budget_s is not None else None
    batch_in_epoch, bar = start_batch, None
    try:
        while step < max_steps and epoch < cfg.train.epochs:
            model.train()
            if epoch_steps is None and callable(getattr(model, "set_epoch", None)):  # epoch-dependent losses
                model.set_epoch(epoch)  # (IntagHand's edge term)
            bar = tqdm(
                total=batches_per_epoch, initial=start_batch, desc=f"epoch {epoch}", disable=not is_main, dynamic_ncols=True
            )
            batch_in_epoch = start_batch
            for batch in make_batches(epoch, start_batch):
                clock = epoch if epoch_steps is None else step // epoch_steps  # the epoch of the schedules
                if epoch_steps is not None and callable(getattr(model, "set_epoch", None)):
                    model.set_epoch(clock)
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(cfg, clock, step)
                if cfg.train.channels_last:
                    batch = dataclasses.replace(batch, image=batch.image.contiguous(memory_format=torch.channels_last))
                with torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext():
                    output = forward(batch)
                losses = model.losses(output, batch)  # outside autocast: the losses in full precision
                loss = sum(losses.values())
                logged = _reduce_mean(torch.stack([loss.detach(), *(v.detach() for v in losses.values())]), world_size)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                # the step's one host sync (on a GPU): the finiteness check, progress bar and logs read these
                # numbers, taken once the backward pass is queued; a non-finite loss stops before the update
                values = logged.tolist()
                if not all(math.isfinite(v) for v in values):
                    named = dict(zip(["total", *losses], values))
                    raise NonFiniteLoss(f"non-finite loss at step {step} (epoch {epoch}): {named}")
                if cfg.optim.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                step += 1
                batch_in_epoch += 1
                samples_seen += len(batch) * world_size
                substituted += sum(1 for meta in batch.meta if "substituted_for" in meta)  # images that did not decode
                speed = samples_seen / max(time.perf_counter() - loop_start, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{values[0]:.4f}", samples_per_s=f"{speed:.1f}")
                if writer is not None and step % cfg.train.log_every == 0:
                    writer.add_scalar("train/loss", values[0], step)
                    for name, value in zip(losses, values[1:]):
                        writer.add_scalar(f"train/loss_{name}", value, step)
                    writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
                    writer.add_scalar("train/samples_per_s", speed, step)
                    if provider is not None:
                        for name, value in provider.stats().items():
                            if isinstance(value, (int, float)):
                                writer.add_scalar(f"mixing/{name}", value, step)
                if writer is not None and cfg.train.image_every > 0 and (step % cfg.train.image_every == 0 or step == 1):
                    grid = mesh_overlay_grid(
                        batch,
                        output,
                        faces_right=hand_model.faces_for("right").to(device),
                        faces_left=hand_model.faces_for("left").to(device),
                        j_regressor_right=hand_model.j_regressor_for("right").to(device),
                        j_regressor_left=hand_model.j_regressor_for("left").to(device),
                    )
                    writer.add_image("train/input_gt_pred", grid, step)
                if is_main and step % cfg.train.ckpt_every == 0:
                    save(epoch, batch_in_epoch)
                    saved_step = step
                if budget_s is not None and step % cfg.train.ckpt_every == 0 and step < max_steps:
                    if _out_of_time(_budget_clock() - budget_start >= budget_s, world_size, device):
                        say(f"\ntrain.max_minutes={cfg.train.max_minutes}: the time budget is spent; the run ends at "
                            f"step {step} of {max_steps}")
                        max_steps, budget_spent = step, True  # the run's last step, as if train.max_steps said so
                if step >= max_steps:
                    break
            bar.close()
            if batch_in_epoch >= batches_per_epoch:
                epoch, start_batch = epoch + 1, 0
            else:
                start_batch = batch_in_epoch
    except KeyboardInterrupt:  # Ctrl-C: leave a checkpoint that --resume continues from
        if is_main and step > 0 and saved_step != step:
            # a scheduled step (a multiple of ckpt_every, or the last) is what its own save would have written
            scheduled = step % cfg.train.ckpt_every == 0 or step >= max_steps
            path = save(epoch, batch_in_epoch, interrupted=not scheduled)
            say(f"\ninterrupted at step {step}; resumable checkpoint {path}")
        raise
    finally:  # joins the generator's producer thread, whatever ended the loop
        if bar is not None:
            bar.close()
        if provider is not None:
            provider.close()
    train_time = time.perf_counter() - loop_start
    mixing_stats = None
    if provider is not None:
        mixing_stats = provider.stats()
        if "trainer_stall_s" in mixing_stats:
            mixing_stats["stall_fraction_of_training"] = mixing_stats["trainer_stall_s"] / max(train_time, 1e-9)
        if world_size > 1:  # every rank generates and mixes its own share: keep each rank's statistics
            per_rank = [None] * world_size
            dist.all_gather_object(per_rank, mixing_stats)
            mixing_stats = dict(mixing_stats, ranks=per_rank)
        say("mixing: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in mixing_stats.items()))

    # 6. final checkpoint, evaluation, metrics.json -------------------------------------------------------
    final = None
    if is_main and saved_step != step:
        final = save(epoch, start_batch)
    elif is_main:  # nothing trained since the last checkpoint this run wrote (or resumed from)
        final = ckpt.find_checkpoint(out / "checkpoints") if saved_step != resumed_step else resume_info.json_path
    peak = f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB" if device.type == "cuda" else ""
    say(f"trained {step} steps in {train_time:.1f} s; checkpoint {final}{peak}")

    averaged_steps = None
    if cfg.train.average_last > 1:  # evaluate the mean of the last checkpoints' weights (every rank loads them)
        box = [ckpt.run_checkpoints(out / "checkpoints", run_folder.run_id, scheduled_only=True)[-cfg.train.average_last:]
               if is_main else None]
        if world_size > 1:
            dist.broadcast_object_list(box, src=0)
        sidecars = box[0]
        averaged_steps = ckpt.average_checkpoints(model, sidecars)
        if len(sidecars) < cfg.train.average_last:
            say(f"train.average_last={cfg.train.average_last}: only {len(sidecars)} scheduled checkpoint(s) of this run are kept")
        if is_main:
            final = save(epoch, start_batch, averaged_steps=averaged_steps)
        say(f"averaged the weights of steps {', '.join(map(str, averaged_steps))} (train.average_last); saved as {final}"
            + ("; evaluating them" if cfg.eval.at_end else ""))

    if substituted:  # this process's count (each rank reads its own share)
        skip_report["train_samples_substituted"] = substituted
        say(f"train: {substituted} sample(s) replaced by the next one because their image did not decode")
    metrics: dict = {}
    stale = out / "metrics.json"
    if is_main and not cfg.eval.at_end and stale.is_file():
        try:
            earlier = json.loads(stale.read_text())
        except (OSError, ValueError):
            earlier = {}
        scored = (earlier.get("weights") if isinstance(earlier, dict) else None) or {}
        if isinstance(scored, dict) and "step" in scored:  # it says which weights it scored
            same = scored["step"] == step and scored.get("averaged_steps") == averaged_steps
        else:  # written before metrics.json named its step: the same weights only if nothing changed since
            same = saved_step == resumed_step and averaged_steps is None
        if not same:  # it scored other weights than this run now ends with: kept aside, not deleted
            os.replace(stale, out / "metrics.previous.json")
            say(f"moved {stale} to metrics.previous.json: it scored other weights than this run ends with "
                "(eval.at_end=false)")
    if cfg.eval.at_end:
        test_skips: dict = {}
        metrics = evaluate_regressor(
            model,
            test_sets,
            hand_model=hand_model,
            device=device,
            batch_size=cfg.eval.batch_size,
            num_workers=cfg.data.num_workers,
            rank=rank,
            world_size=world_size,
            skips=test_skips,
        )
        skip_report["test"] = {key: dict(found) for key, found in test_skips.items() if found}
        if is_main:
            say(format_results(metrics))
            for key, found in skip_report["test"].items():
                say(f"test {key}: {describe_skips(Counter(found))} record(s) skipped, not scored")
            report = dict(metrics, skips=skip_report)
            report["weights"] = {"step": step}  # which weights were scored: the final ones, or the averaged ones
            if averaged_steps is not None:
                report["weights"].update(averaged_steps=averaged_steps, checkpoint=str(Path(final).relative_to(out)))
            if mixing_stats is not None:
                report["mixing"] = mixing_stats
            if budget_s is not None:  # a time-budgeted run: how long it trained and whether the budget ended it
                report["time_budget"] = {"max_minutes": float(cfg.train.max_minutes), "ended_run": budget_spent,
                                         "steps": step, "train_time_s": round(train_time, 1)}
            tmp = out / ".metrics.json.tmp"  # written whole, then renamed: a reader never sees half of it
            tmp.write_text(json.dumps(report, indent=2, sort_keys=True))
            os.replace(tmp, out / "metrics.json")
            for key, values in metrics.items():
                for name in ("MPVPE", "RRVE", "MRRPE"):
                    if math.isfinite(values.get(name, math.nan)):
                        writer.add_scalar(f"test/{key}/{name}", values[name], step)
    if writer is not None:
        writer.close()
    say(f"wall time {time.perf_counter() - wall_start:.1f} s")
    return {
        "metrics": metrics,
        "mixing": mixing_stats,
        "out": str(out),
        "step": step,
        "train_time_s": train_time,
        "checkpoint": str(final) if final else None,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except (UsageError, ConfigError, ckpt.CheckpointError, DatasetError, DataSpecError, PluginError, MANOError,
            OmegaConfBaseException) as error:  # OmegaConf: an interpolation (${...}) resolved when first read
        print(f"recon.train: error: {one_line(error)}", file=sys.stderr)
        return 2
    except NonFiniteLoss as error:
        print(f"recon.train: {error}; stopping", file=sys.stderr)
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
