"""Dataset readers yielding :class:`hands.sample.HandSample`, and the synthlab benchmark.

``build_dataset(name, root, split, **options)`` with names:

- ``ih26m``: InterHand2.6M (:class:`hands.datasets.ih26m.InterHand26M`), splits train/val/test;
- ``reih``: ReInterHand (:class:`hands.datasets.reih.ReInterHand`), splits train/test;
- ``hic``: HIC (:class:`hands.datasets.hic.HIC`), split test;
- ``coco``: MSCOCO with COCO-WholeBody hands and NeuralAnnot MANO fits (:class:`hands.datasets.coco.MSCOCO`),
  splits train/val; 2D-only supervision where no fit exists (``meta["joints_3d"]`` False);
- ``synthlab``: the embedded benchmark (:class:`hands.datasets.synthlab.SynthLab`), splits train-lab,
  test-lab, train-wild, test-wild; ``root=None`` writes it on first use (:func:`ensure_synthlab`).

Bad input: :class:`DatasetError` (a ValueError) names the missing/unreadable file or folder; bad records are
skipped and counted in ``dataset.skipped`` (see :mod:`hands.datasets.common`). Importing this package
reads nothing and writes nothing.
"""
from __future__ import annotations

from pathlib import Path

from hands.datasets.common import DatasetError, HandDataset

__all__ = ["DATASETS", "DatasetError", "HandDataset", "build_dataset"]

# name -> "module:Class", imported on use so that importing the package stays cheap
DATASETS = {
    "ih26m": "hands.datasets.ih26m:InterHand26M",
    "reih": "hands.datasets.reih:ReInterHand",
    "hic": "hands.datasets.hic:HIC",
    "coco": "hands.datasets.coco:MSCOCO",
    "synthlab": "hands.datasets.synthlab:SynthLab",
}


def build_dataset(name: str, root: str | Path | None, split: str, **options) -> HandDataset:
    """Build a reader by name. ``options`` go to its constructor (keyword-only arguments).

    An unknown name raises ValueError listing the known ones; a missing root raises DatasetError.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    import importlib

    module_name, class_name = DATASETS[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if root is None and name != "synthlab":
        raise DatasetError(f"{name}: no root folder given; pass the dataset's folder (e.g. --data-root)")
    return cls(root, split, **options)
