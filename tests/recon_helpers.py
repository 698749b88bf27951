"""Shared pieces of the recon tests: a tiny synthlab and tiny model overrides."""
from __future__ import annotations

from pathlib import Path

# A narrow ResNet-18 ((8, 16, 32, 64) channels) on 64 px inputs; no TensorBoard images unless asked.
TINY = [
    "model.backbone=resnet18",
    "model.backbone_kwargs.channels=[8,16,32,64]",
    "model.backbone_kwargs.stem_width=8",
    "model.hidden_dim=32",
    "data.image_size=[64,64]",
    "train.image_every=0",
]


def write_tiny_synthlab(root: Path) -> Path:
    """12 train-lab, 6 test-lab and 6 test-wild images of 64 px in IH2.6M layout."""
    from hands.datasets.synthlab import write_synthlab

    sizes = {"train-lab": 12, "test-lab": 6, "train-wild": 0, "test-wild": 6}
    return write_synthlab(root, sizes=sizes, resolution=64, show_progress=False)


def run_args(synthlab_root: Path, out: Path, *extra: str) -> list[str]:
    """recon.train arguments for a tiny run on the tiny synthlab."""
    return [
        "--data-root", str(synthlab_root), "--datasets", "synthlab",
        "--test-datasets", "synthlab:test-lab,synthlab:test-wild",
        "--out", str(out), "--batch-size", "4", "--seed", "3", *TINY, *extra,
    ]
