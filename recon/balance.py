"""InterWild's 50/50 sampling of the 3D training sets against the 2D-only ones (MSCOCO).

InterWild (``common/base.py``, ``data/dataset.py``) concatenates its 3D sets (IH2.6M, ReIH) into one
dataset, its 2D sets (MSCOCO) into another, and wraps the two in ``MultipleDatasets(make_same_len=True)``:
both are stretched to the longer one's length L (index i of the shorter set reads i mod its length; the
last, incomplete round draws at random), so the whole has 2 L samples, half from each side, and a shuffled
loader gives every batch 3D and 2D samples 50/50 in expectation. :class:`SameLength` is that wrapper; its
random tail draw is seeded by (seed, epoch, index) instead of Python's ``random`` so that runs repeat and
resume. :func:`balance_2d_3d` applies it when a run's training sets hold both kinds.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

from torch.utils.data import ConcatDataset, Dataset

__all__ = ["SameLength", "balance_2d_3d", "TWO_D_DATASETS"]

# datasets whose samples carry 2D joints only (meta["joints_3d"] False): InterWild's trainset_2d
TWO_D_DATASETS = ("coco",)


class SameLength(Dataset):
    """InterWild's ``MultipleDatasets(dbs, make_same_len=True)``: every part stretched to the longest one.

    Index ``k * L + i`` (L = the longest part's length) reads part k at ``i mod len_k`` while ``i`` lies in
    the whole rounds of part k (``i < len_k * (L // len_k)``), else at a seeded random index.

    Args:
        datasets: the parts (each non-empty).
        seed: seeds the tail draws with the epoch (:meth:`set_epoch`) and the index.
    """

    def __init__(self, datasets: Sequence[Dataset], *, seed: int = 0):
        self.datasets = list(datasets)
        if not self.datasets or any(len(d) == 0 for d in self.datasets):
            raise ValueError("SameLength: every part needs at least one sample")
        self.longest = max(len(d) for d in self.datasets)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.longest * len(self.datasets)

    def locate(self, index: int) -> tuple[int, int]:
        """(part, index within the part) of ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"SameLength: index {index} out of range for {len(self)} samples")
        part, position = divmod(int(index), self.longest)
        size = len(self.datasets[part])
        if position >= size * (self.longest // size):  # the incomplete last round: a random sample
            digest = hashlib.sha256(f"{self.seed}:{self.epoch}:{index}".encode()).digest()
            return part, int.from_bytes(digest[:8], "little") % size
        return part, position % size

    def __getitem__(self, index: int):
        part, position = self.locate(index)
        return self.datasets[part][position]


def balance_2d_3d(parts: Sequence[Dataset], names: Sequence[str], *, seed: int) -> Dataset:
    """The training set of a run from its per-spec parts: the 3D parts concatenated, the 2D parts
    (:data:`TWO_D_DATASETS`) concatenated, and the two sampled 50/50 (:class:`SameLength`) when both exist;
    else all parts concatenated (InterWild's ``make_same_len=False``)."""
    three_d = [p for p, n in zip(parts, names) if n not in TWO_D_DATASETS]
    two_d = [p for p, n in zip(parts, names) if n in TWO_D_DATASETS]

    def joined(group: list) -> Dataset:
        return group[0] if len(group) == 1 else ConcatDataset(group)

    if three_d and two_d:
        return SameLength([joined(three_d), joined(two_d)], seed=seed)
    return joined(list(parts))
