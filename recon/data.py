"""Datasets and data order for ``recon.train`` / ``recon.test``.

- Dataset specs: ``name`` or ``name:split`` (``--datasets ih26m,reih``). Default splits: synthlab trains on
  ``train-lab`` and tests on ``test-lab`` and ``test-wild`` (the lab/wild gap is what generated images are
  meant to close); every other dataset trains on ``train`` and tests on ``test``.
- Roots: ``--data-root DIR`` holds one folder per dataset (``DIR/ih26m``, ``DIR/reih``, ``DIR/hic``,
  ``DIR/synthlab``); when ``DIR/<name>`` does not exist, ``DIR`` itself is taken as that dataset's folder.
  No root: synthlab is the embedded benchmark, written on first use into the cache folder.
- Data order: :class:`ResumableSampler` is a ``DistributedSampler`` (each rank sees its share; a seeded
  permutation per epoch) that can start inside an epoch, so a resumed run reads the batches an
  uninterrupted run would have read. Augmentation draws come from a generator seeded by (seed, epoch,
  index), so they do not depend on worker processes or on where a run was resumed.
"""
from __future__ import annotations

import hashlib
import inspect
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.utils.data import ConcatDataset, Dataset, DistributedSampler, Sampler, Subset

from hands.camera import square_bbox
from hands.datasets import DATASETS, DatasetError, build_dataset, transforms
from hands.datasets.common import SkippedRecord
from hands.sample import HandSample
from recon.balance import SameLength, balance_2d_3d

__all__ = [
    "DataSpecError",
    "DatasetSpec",
    "parse_specs",
    "dataset_root",
    "SeededTransform",
    "ResumableSampler",
    "ShardSampler",
    "eval_transform",
    "check_data",
    "check_input_protocol",
    "describe_default_data",
    "describe_skips",
    "index_skips",
    "build_train_set",
    "augment_kwargs",
    "augmentation_class",
    "augmentation_defaults",
    "train_transform",
    "base_readers",
    "build_test_sets",
]

class DataSpecError(ValueError):
    """A bad dataset name, spec or root in a run's config or on the command line (one line)."""


_DEFAULT_SPLITS = {
    "train": {"synthlab": ("train-lab",)},
    "test": {"synthlab": ("test-lab", "test-wild"), "coco": ()},  # MSCOCO has no 3D test labels
}


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset split. ``key`` names it in metrics.json and reports: the dataset name for a plain
    ``test`` split, else ``name-split`` (``synthlab-test-wild``)."""

    name: str
    split: str

    @property
    def key(self) -> str:
        return self.name if self.split == "test" else f"{self.name}-{self.split}"


def parse_specs(items: Sequence[str], role: str) -> list[DatasetSpec]:
    """``["ih26m,reih", "synthlab:test-wild"]`` -> specs; role "train" or "test" picks default splits.
    An unknown dataset name raises ValueError listing the known ones."""
    specs: list[DatasetSpec] = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            name, _, split = part.partition(":")
            if name not in DATASETS:
                raise DataSpecError(f"dataset {name!r} (in {role} datasets): unknown; known: {', '.join(sorted(DATASETS))}")
            splits = (split,) if split else _DEFAULT_SPLITS[role].get(name, (role,))
            specs.extend(DatasetSpec(name, s) for s in splits)
    if not specs:
        raise DataSpecError(f"no {role} datasets given" + (" (coco has no test split with 3D labels; name --test-datasets)" if role == "test" else ""))
    return specs


def dataset_root(name: str, data_root: Optional[str], n_named: int) -> Optional[Path]:
    """The folder of dataset ``name``: ``<data_root>/<name>`` if it exists, else ``data_root`` itself when it
    is the only dataset named; None for the embedded synthlab when no root is given."""
    if data_root is None:
        if name == "synthlab":
            return None
        raise DataSpecError(f"dataset {name!r} needs --data-root (a folder holding {name}/ or the dataset itself)")
    root = Path(data_root)
    if (root / name).is_dir():
        return root / name
    if n_named == 1:
        return root
    raise DataSpecError(f"--data-root {root}: no folder {name}/ in it (several datasets are named, so each needs its own folder)")


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.sha256(f"{seed}:{epoch}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class SeededTransform(Dataset):
    """Applies ``transform(sample, generator)`` to ``dataset[index]`` with a generator seeded by
    (seed, epoch, index): the same draw whichever process or run reads the sample. Call :meth:`set_epoch`
    before iterating an epoch (DataLoader workers copy the dataset when an epoch's iterator starts)."""

    def __init__(self, dataset: Dataset, transform: Callable[[HandSample, torch.Generator], HandSample], *, seed: int):
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> HandSample:
        generator = torch.Generator().manual_seed(_sample_seed(self.seed, self.epoch, int(index)))
        return self.transform(self.dataset[index], generator)


def set_epoch(dataset: Dataset, epoch: int) -> None:
    """Set the epoch of every :class:`SeededTransform` in ``dataset`` (through ConcatDatasets)."""
    if isinstance(dataset, SeededTransform):
        dataset.set_epoch(epoch)
    elif isinstance(dataset, SameLength):
        dataset.set_epoch(epoch)
        for part in dataset.datasets:
            set_epoch(part, epoch)
    elif isinstance(dataset, ConcatDataset):
        for part in dataset.datasets:
            set_epoch(part, epoch)


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled with ``seed + epoch``, this rank's share, drop_last) that can skip
    the first ``start_batch`` batches of an epoch: ``set_epoch(epoch, start_batch=k)``."""

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int, batch_size: int, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        super().set_epoch(epoch)
        self.start_batch = start_batch

    def batches_per_epoch(self) -> int:
        """Full batches this rank reads in a whole epoch (the last partial batch is dropped)."""
        return self.num_samples // self.batch_size

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start_batch * self.batch_size :])

    def __len__(self) -> int:
        return max(self.num_samples - self.start_batch * self.batch_size, 0)


class ShardSampler(Sampler[int]):
    """Rank ``rank`` of ``num_replicas`` reads indices ``rank, rank + R, ...`` in order, without padding, so
    that sums over ranks count every test sample exactly once."""

    def __init__(self, length: int, *, num_replicas: int, rank: int):
        self.length, self.num_replicas, self.rank = length, num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.num_replicas))


# -- building the datasets of a run ------------------------------------------------------------------------------
def _square_to(box: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    return square_bbox(box, aspect=image_size[1] / image_size[0])


def eval_transform(crop_mode: str, image_size: tuple[int, int], extend: float = 1.3) -> Callable[[HandSample], HandSample]:
    """The deterministic test-time input: the whole image (``crop_mode="image"``; InterWild's
    ``process_bbox([0, 0, W, H], extend_ratio=1.0)``: no ground-truth box is read) or the union of the hand
    boxes grown by ``extend`` (``"hands"``; uses the ground-truth boxes) or 1.25x the extent of both hands'
    projected ground-truth vertices (``"verts"``, IntagHand's ``cut_img``, as its evaluation does),
    made to the input's aspect ratio (the shorter side padded with black) and resized to ``image_size`` (H, W)."""

    def apply(sample: HandSample) -> HandSample:
        height, width = sample.image_size
        if crop_mode == "image":
            box = torch.tensor([0.0, 0.0, width - 1.0, height - 1.0])
        elif crop_mode == "verts":
            box = transforms.vertex_box(sample)
        else:
            box = transforms.hands_box(sample, extend)
        return transforms.crop(sample, _square_to(box, image_size), tuple(image_size))

    return apply


class _Mapped(Dataset):
    """``transform(dataset[index])`` (deterministic transforms)."""

    def __init__(self, dataset: Dataset, transform: Callable[[HandSample], HandSample]):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> HandSample | SkippedRecord:
        sample = self.dataset[index]
        return sample if isinstance(sample, SkippedRecord) else self.transform(sample)


def _limit(dataset: Dataset, limit: Optional[int]) -> Dataset:
    return dataset if limit is None or limit >= len(dataset) else Subset(dataset, range(limit))


def describe_skips(skipped: Counter, limit: int = 3) -> str:
    """``"12 (image does not decode: 10, joints_cam: NaN or inf: 2)"``: the count and the commonest reasons."""
    reasons = ", ".join(f"{reason}: {count}" for reason, count in skipped.most_common(limit))
    more = ", ..." if len(skipped) > limit else ""
    return f"{sum(skipped.values())} ({reasons}{more})"


def index_skips(readers) -> dict[str, dict[str, int]]:
    """``{reader description: {reason: count}}`` of the records each reader dropped when indexing (only
    readers that dropped some)."""
    return {reader.describe(): dict(reader.index_skipped) for reader in readers if getattr(reader, "index_skipped", None)}


def _reader(cfg, spec: DatasetSpec, n_named: int, hand_model, *, role: str = "train") -> Dataset:
    """The reader of ``spec``; ``index_skipped`` keeps the records it dropped when indexing. A split with no
    usable record is a DatasetError naming it and the commonest reason."""
    root = dataset_root(spec.name, cfg.data.root, n_named)
    try:
        reader = build_dataset(spec.name, root, spec.split, hand_model=hand_model)  # synthlab with root None: written on first use
    except DatasetError:
        raise
    except ValueError as error:  # an unknown split and the like, from the reader's constructor
        raise DataSpecError(f"{role} dataset {spec.name}:{spec.split}: {error}") from None
    reader.index_skipped = Counter(reader.skipped)
    if len(reader) == 0:
        why = (f"every record was skipped: {describe_skips(reader.skipped)}" if reader.skipped
               else "the split holds no record")
        raise DatasetError(f"{role} dataset {spec.name}:{spec.split} ({root or 'embedded'}): no usable sample; {why}")
    reader.substitute = role == "train"  # a test record that does not decode is counted, never replaced
    return reader


def check_input_protocol(cfg) -> None:
    """Refuse, in one line, a ``data.crop`` other than the one the regressor's reference reads.

    A regressor class may declare ``input_crop`` ("image": the whole image, e.g. InterWild, whose box net finds
    the hands; "hands": a crop around both hands from the ground-truth boxes; "verts": 1.25x both hands' projected
    ground-truth vertex extent, e.g. IntagHand). Training or testing it on another input would make its numbers
    incomparable with its reference's."""
    from recon.registry import REGRESSORS, load_builtin_regressors

    load_builtin_regressors()
    if cfg.arch not in REGRESSORS:
        return  # a plugin not imported here: recon.train reports unknown names itself
    required = getattr(REGRESSORS.get(cfg.arch), "input_crop", None)
    if required is not None and cfg.data.crop != required:
        what = {
            "image": "the whole image (its box net finds the hands)",
            "hands": "a crop around both hands",
            "verts": "a crop of 1.25x both hands' vertex extent",
        }
        raise DataSpecError(
            f"data.crop={cfg.data.crop!r}: regressor {cfg.arch!r} reads {what.get(required, required)} as its "
            f"reference does; set data.crop={required!r} (a checkpoint trained otherwise must be retrained)"
        )


def check_data(cfg) -> None:
    """Fail early, in one line, on unknown dataset names, missing roots or an input protocol the regressor
    does not use (before anything is loaded)."""
    check_input_protocol(cfg)
    for role in ("train", "test"):
        specs = parse_specs(getattr(cfg.data, role), role)
        n_named = len({spec.name for spec in specs})
        for spec in specs:
            dataset_root(spec.name, cfg.data.root, n_named)


def describe_default_data(cfg) -> Optional[str]:
    """One line when the run falls back to the embedded benchmark (no --data-root, synthlab only)."""
    names = {spec.name for spec in parse_specs(cfg.data.train, "train") + parse_specs(cfg.data.test, "test")}
    if cfg.data.root is None and names == {"synthlab"}:
        hand = "the procedural MANO-format hand" if cfg.mano_dir is None else f"MANO from {cfg.mano_dir}"
        return (
            f"no dataset configured (--data-root/--datasets): using the embedded synthlab benchmark "
            f"(written on first use into the cache folder), {hand}, profile {cfg.profile}"
        )
    return None


def train_transform(cfg) -> Callable[[HandSample, torch.Generator], HandSample]:
    """The training input of a run: InterWild's augmentation (or IntagHand's or DIR's, ``data.augmentation``, built
    with ``data.augment_kwargs``) then the crop to ``cfg.data.image_size`` (``cfg.data.augment``), or the
    deterministic test-time crop. Real samples get it in the data loader, generated ones in :mod:`mixing` (the same
    transform, so both look alike to the regressor)."""
    image_size = tuple(cfg.data.image_size)
    if not cfg.data.augment:
        fixed = eval_transform(cfg.data.crop, image_size)
        return lambda sample, generator: fixed(sample)  # noqa: E731
    cls = augmentation_class(cfg.data.get("augmentation", "interwild"))
    return cls(image_size, box=cfg.data.crop, **augment_kwargs(cfg))


def augmentation_class(name: str) -> type:
    """The class of ``data.augmentation`` ``name``: interwild, intaghand, dir or internet."""
    if name == "intaghand":
        return transforms.IntagHandAugment
    if name == "dir":  # DIR's own (recon.archs.dir.augment)
        from recon.archs.dir.augment import DIRAugment

        return DIRAugment
    if name == "internet":  # InterShape's (InterNet's)
        from recon.archs.intershape.augment import InterNetAugment

        return InterNetAugment
    if name == "interwild":
        return transforms.InterWildAugment
    raise DataSpecError(f"data.augmentation={name!r}: unknown; known: interwild, intaghand, dir, internet")


def _keyword_arguments(cls: type) -> dict[str, tuple[type, object]]:
    """``{argument: (the class whose constructor declares it, its default)}`` for the keyword-only arguments of the
    augmentation class ``cls``, a subclass's own over those it passes on to its base (InterNetAugment's over
    InterWildAugment's)."""
    found = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is not None and klass is not object:
            found.update({name: (klass, p.default) for name, p in inspect.signature(init).parameters.items()
                          if p.kind is p.KEYWORD_ONLY})
    return found


def augmentation_defaults(cls: type) -> dict:
    """``{argument: default}`` of the keyword-only arguments ``data.augment_kwargs`` may set for the augmentation
    class ``cls`` (``box`` comes from data.crop)."""
    return {name: default for name, (_, default) in _keyword_arguments(cls).items() if name != "box"}


_SET_ELSEWHERE = {"out_size": "data.image_size", "box": "data.crop"}


def augment_kwargs(cfg) -> dict:
    """``cfg.data.augment_kwargs`` as plain Python (lists as tuples, as the constructors' defaults) for the run's
    ``data.augmentation``: each key checked against the augmentation's keyword arguments and each value against
    the argument's annotation, as ``model`` sections are (:func:`recon.config.model_schema`); the ranges
    themselves are the user's. Raises DataSpecError naming the key."""
    from recon.config import model_schema

    cls = augmentation_class(cfg.data.get("augmentation", "interwild"))
    raw = cfg.data.get("augment_kwargs") or {}
    if not isinstance(raw, dict):
        raw = OmegaConf.to_container(raw, resolve=True)
    arguments = _keyword_arguments(cls)
    out = {}
    for key, value in raw.items():
        if key in _SET_ELSEWHERE:
            raise DataSpecError(f"data.augment_kwargs.{key}: set by {_SET_ELSEWHERE[key]}, not here")
        if key not in arguments:
            raise DataSpecError(f"data.augment_kwargs.{key}: not an argument of {cls.__name__} (its arguments: "
                                f"{', '.join(sorted(augmentation_defaults(cls)))})")
        owner, default = arguments[key]
        try:
            checked = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(model_schema(owner)), {key: value}))[key]
        except OmegaConfBaseException as error:
            reason = str(getattr(error, "msg", None) or error).splitlines()[0]
            raise DataSpecError(f"data.augment_kwargs.{key}={value!r}: expected a value like {cls.__name__}'s "
                                f"default {default!r} ({reason})") from None
        if any(isinstance(v, float) and not math.isfinite(v) for v in (checked if isinstance(checked, list) else [checked])):
            raise DataSpecError(f"data.augment_kwargs.{key}={value!r}: expected a finite value")
        out[key] = tuple(checked) if isinstance(checked, list) else checked
    return out


def base_readers(dataset: Dataset) -> list:
    """The dataset readers under a training set's wrappers (ConcatDataset, Subset, transforms)."""
    if isinstance(dataset, (ConcatDataset, SameLength)):
        return [r for part in dataset.datasets for r in base_readers(part)]
    inner = getattr(dataset, "dataset", None)
    return base_readers(inner) if inner is not None else [dataset]


def _select_frames(reader: Dataset, frames: str, name: str) -> Dataset:
    """``frames="all"``: the reader itself; ``"interacting_both_fits"``: only its interacting frames (with a valid
    hand type) that carry both hands' MANO fits, as IntagHand trains (its ``dataset/interhand.py``); needs a
    reader in IH2.6M's layout (ih26m, synthlab), whose records hold ``hand_type`` and ``fits``."""
    if frames == "all":
        return reader
    records = getattr(reader, "records", None)
    if frames != "interacting_both_fits" or not records or "fits" not in records[0]:
        raise DataSpecError(
            f"data.train_frames={frames!r}: expected 'all', or 'interacting_both_fits' with a reader in IH2.6M's "
            f"layout (ih26m, synthlab); got dataset {name!r}"
        )
    keep = [
        index
        for index, record in enumerate(records)
        if record["hand_type"] == "interacting"
        and record.get("hand_type_valid", True)
        and all(record["fits"].get(side) is not None for side in ("right", "left"))
    ]
    if not keep:
        raise DataSpecError(f"data.train_frames={frames!r}: dataset {name!r} has no interacting frame with both fits")
    return Subset(reader, keep)


def build_train_set(cfg, *, hand_model) -> Dataset:
    """The training datasets of ``cfg.data.train``, concatenated (3D sets and MSCOCO sampled 50/50 when both
    are named, as InterWild does: :mod:`recon.balance`), each sample augmented (InterWild's augmentation,
    seeded per (seed, epoch, index)) and cropped to ``cfg.data.image_size``."""
    specs = parse_specs(cfg.data.train, "train")
    n_named = len({spec.name for spec in specs})
    augment = train_transform(cfg)
    frames = cfg.data.get("train_frames", "all")
    parts = [
        SeededTransform(
            _limit(_select_frames(_reader(cfg, spec, n_named, hand_model), frames, spec.name), cfg.data.max_train_samples),
            augment,
            seed=cfg.seed,
        )
        for spec in specs
    ]
    return balance_2d_3d(parts, [spec.name for spec in specs], seed=cfg.seed)  # 3D sets vs MSCOCO 50/50


def build_test_sets(cfg, *, hand_model, datasets: Optional[Sequence[str]] = None) -> dict[DatasetSpec, Dataset]:
    """{spec: dataset} for ``datasets`` (default ``cfg.data.test``), cropped deterministically
    (:func:`eval_transform`; :func:`check_input_protocol` first)."""
    check_input_protocol(cfg)
    specs = parse_specs(list(datasets) if datasets is not None else cfg.data.test, "test")
    n_named = len({spec.name for spec in specs})
    transform = eval_transform(cfg.data.crop, tuple(cfg.data.image_size))
    return {
        spec: _Mapped(_limit(_reader(cfg, spec, n_named, hand_model, role="test"), cfg.data.max_test_samples), transform)
        for spec in specs
    }
