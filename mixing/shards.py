"""Shards of generated samples on disk (``offline`` mixing) and a reader that serves them like the pool.

A shard is two files written atomically (temporary name, then ``os.replace``; the JSON last, so a shard
without its JSON is incomplete and ignored):
- ``shard-00012.safetensors``: every tensor of a :class:`hands.sample.HandBatch`, flattened to
  ``"image"``, ``"right.verts_cam"``, ``"camera.K"``, ... (safetensors: no pickle, mmap-able);
- ``shard-00012.json``: ``{"n": B, "hand_type": [...], "meta": [...], "format": 1}``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hands.camera import inside_image
from hands.paths import write_atomic
from hands.sample import Camera, HandBatch, HandLabels, concat_batches

__all__ = ["save_shard", "load_shard", "shard_paths", "ShardReader", "ShardError", "batch_to_tensors", "batch_from_tensors"]

FORMAT = 1


class ShardError(ValueError):
    """A shard file is missing, truncated or not a shard."""


def batch_to_tensors(batch: HandBatch) -> dict[str, torch.Tensor]:
    """Every tensor of a HandBatch under a flat name ("image", "right.verts_cam", "camera.K", ...), on the CPU."""
    out = {"image": batch.image, "rel_root": batch.rel_root, "rel_root_valid": batch.rel_root_valid}
    for side in ("right", "left"):
        labels = getattr(batch, side)
        for f in dataclasses.fields(HandLabels):
            out[f"{side}.{f.name}"] = getattr(labels, f.name)
    out["camera.K"] = batch.camera.K
    out["camera.dist"] = batch.camera.dist
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def batch_from_tensors(tensors: dict, hand_type: list[str], meta: list[dict]) -> HandBatch:
    """Inverse of :func:`batch_to_tensors` (tensors may be numpy arrays); KeyError names a missing field."""
    t = {k: torch.as_tensor(v) for k, v in tensors.items()}
    for side in ("right", "left"):  # shards written before the 2D mask existed: valid joints inside the image
        if f"{side}.joints_trunc" not in t and f"{side}.joints_img" in t and f"{side}.joints_valid" in t and "image" in t:
            t[f"{side}.joints_trunc"] = t[f"{side}.joints_valid"].bool() & inside_image(t[f"{side}.joints_img"], tuple(t["image"].shape[-2:]))
    labels = {
        side: HandLabels(**{f.name: t[f"{side}.{f.name}"] for f in dataclasses.fields(HandLabels)}) for side in ("right", "left")
    }
    return HandBatch(
        image=t["image"],
        right=labels["right"],
        left=labels["left"],
        rel_root=t["rel_root"],
        rel_root_valid=t["rel_root_valid"],
        camera=Camera(K=t["camera.K"], dist=t["camera.dist"]),
        hand_type=list(hand_type),
        meta=list(meta),
    )


def save_shard(batch: HandBatch, path: str | os.PathLike) -> Path:
    """Write ``batch`` as ``path`` (.safetensors) + its .json sidecar, atomically. Returns the JSON path."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"shard path must end in .safetensors, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = batch_to_tensors(batch)
    write_atomic(path, lambda tmp: save_file(tensors, tmp))
    sidecar = path.with_suffix(".json")
    sidecar_text = json.dumps({"format": FORMAT, "n": len(batch), "hand_type": batch.hand_type, "meta": batch.meta})
    write_atomic(sidecar, lambda tmp: Path(tmp).write_text(sidecar_text))
    return sidecar


def load_shard(path: str | os.PathLike, device: torch.device | str = "cpu") -> HandBatch:
    """Read a shard written by :func:`save_shard` (``path`` is the .safetensors file)."""
    path = Path(path)
    sidecar = path.with_suffix(".json")
    if not path.is_file() or not sidecar.is_file():
        raise ShardError(f"{path}: shard incomplete (needs {path.name} and {sidecar.name})")
    try:
        info = json.loads(sidecar.read_text())
        tensors = load_file(str(path), device=str(device))
    except Exception as exc:  # safetensors raises its own error types for truncated headers
        raise ShardError(f"{path}: not a readable shard ({exc})") from exc
    try:
        batch = batch_from_tensors(tensors, info["hand_type"], info["meta"])
    except KeyError as exc:
        raise ShardError(f"{path}: missing field {exc.args[0]!r}") from exc
    if len(batch) != info.get("n") or len(batch.meta) != len(batch):
        raise ShardError(f"{path}: sidecar says {info.get('n')} samples, tensors hold {len(batch)}")
    return batch


def shard_paths(folder: str | os.PathLike) -> list[Path]:
    """Complete shards (both files present) in ``folder``, in name order."""
    folder = Path(folder)
    return sorted(p for p in folder.glob("shard-*.safetensors") if p.with_suffix(".json").is_file())


class ShardReader:
    """Serves pre-generated samples like :class:`mixing.pool.SamplePool` (``take(n)``, ``stats()``).

    Shards are visited in a seeded order, cycling; samples within a shard in a seeded order. Each pass
    over all shards is one reuse of every sample.

    Args:
        folder: a folder of shards written by ``python -m mixing.pregenerate``.
        device: where returned batches live.
        seed, rank, world_size: the order derives from (seed, pass); under DDP each rank reads the shards
            whose index is congruent to its rank.
    """

    def __init__(self, folder, *, device="cpu", seed: int = 0, rank: int = 0, world_size: int = 1):
        self.paths = shard_paths(folder)[rank::world_size]
        if not self.paths:
            raise ShardError(f"{folder}: no complete shards (shard-*.safetensors with .json) for rank {rank}")
        self.device = torch.device(device)
        self.seed = seed
        self._pass = 0
        self._order: list[int] = []
        self._buffer: HandBatch | None = None
        self._taken = 0

    def _next_shard(self) -> HandBatch:
        if not self._order:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self._pass)
            self._order = torch.randperm(len(self.paths), generator=g).tolist()
            self._pass += 1
        batch = load_shard(self.paths[self._order.pop(0)], self.device)
        g = torch.Generator().manual_seed(self.seed * 7919 + self._pass * 104729 + len(self._order))
        return batch.select(torch.randperm(len(batch), generator=g))

    def take(self, n: int) -> HandBatch:
        parts, need = [], n
        while need > 0:
            if self._buffer is None or len(self._buffer) == 0:
                self._buffer = self._next_shard()
            k = min(need, len(self._buffer))
            parts.append(self._buffer.select(slice(0, k)))
            self._buffer = self._buffer.select(slice(k, len(self._buffer)))
            need -= k
        self._taken += n
        return concat_batches(parts)

    def stats(self) -> dict:
        return {"taken": self._taken, "passes": self._pass, "shards": len(self.paths)}

    def close(self) -> None:
        self._buffer = None
