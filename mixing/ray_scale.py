"""Generation on dedicated workers with Ray: Ray Data actors run the generator, Ray Train workers train.

When the generator should not share the trainer's devices (dedicated generator GPUs, several nodes), the
synthetic samples come from a Ray Data pipeline instead of the in-process pool:

    ray.data.range(n_chunks)                       # one row per generator call
      .map_batches(GeneratorActor, ...)            # actors, each holding a generator on its own GPU
    -> TorchTrainer(datasets={"synthetic": ds})    # Ray Train workers (DDP) read their shard
    -> RayShardProvider(get_dataset_shard(...))    # take(n) like mixing.pool.SamplePool

Each row of the dataset is one generated sample: the flat tensors of :func:`mixing.shards.batch_to_tensors`
as numpy columns, plus ``hand_type`` and ``meta`` (JSON text). Ray is an optional extra
(``pip install -e '.[scale]'``); importing this module does not import Ray. See docs/scaling.md for when to
use this path rather than the in-process pool.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any, Iterator

import numpy as np
import torch

from hands.sample import HandBatch, concat_batches
from mixing.config import MixingConfig
from mixing.shards import batch_from_tensors, batch_to_tensors

__all__ = ["GeneratorActor", "synthetic_dataset", "RayShardProvider", "rows_to_batch", "batch_to_rows"]


def _ray():
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError as exc:  # one line naming the extra
        raise ImportError("mixing.ray_scale needs Ray: pip install -e '.[scale]' (ray[data,train])") from exc
    return ray


def batch_to_rows(batch: HandBatch) -> dict[str, np.ndarray]:
    """A HandBatch -> Ray Data columns (one row per sample)."""
    cols = {k: v.numpy() for k, v in batch_to_tensors(batch).items()}
    cols["hand_type"] = np.asarray(batch.hand_type, dtype=object)
    cols["meta"] = np.asarray([json.dumps(m) for m in batch.meta], dtype=object)
    return cols


def rows_to_batch(cols: dict[str, Any], device: torch.device | str = "cpu") -> HandBatch:
    """Ray Data columns (a numpy batch) -> a HandBatch on ``device``."""
    tensors = {k: np.ascontiguousarray(v) for k, v in cols.items() if k not in ("hand_type", "meta")}
    batch = batch_from_tensors(tensors, [str(h) for h in cols["hand_type"]], [json.loads(m) for m in cols["meta"]])
    return batch.to(device)


class GeneratorActor:
    """A Ray Data actor: builds a hand model, a label source and the generator once, then turns each input
    row (a chunk index) into ``chunk`` generated samples (random stream = the chunk index, so the output does
    not depend on which actor ran it).

    Args:
        mixing: a MixingConfig as a dict; chunk: samples per row; seed: base seed; mano_dir: hand model;
        dataset / data_root / split: the label dataset (with ``mixing["labels"] == "train"``).
    """

    def __init__(self, *, mixing: dict, chunk: int, seed: int = 0, mano_dir=None, dataset="synthlab", data_root=None, split=None):
        from hands.mano import HandModel
        from mixing.build import build_label_source, build_source

        cfg = MixingConfig(**mixing)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        hand_model = HandModel(mano_dir=mano_dir)
        readers = []
        if cfg.labels == "train":
            from hands.datasets import build_dataset

            split = split or ("train-lab" if dataset == "synthlab" else "train")
            readers.append(build_dataset(dataset, data_root, split, hand_model=hand_model))
        labels = build_label_source(cfg, hand_model=hand_model, train_readers=readers)
        self.source = build_source(cfg, hand_model=hand_model, labels=labels, device=device, seed=seed)
        self.chunk = chunk

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batches = [self.source.generate(self.chunk, call=int(i)) for i in rows["id"]]
        return batch_to_rows(concat_batches(batches).to("cpu"))


def synthetic_dataset(
    cfg: MixingConfig,
    n_chunks: int,
    *,
    num_actors: int = 1,
    gpus_per_actor: float = 0.0,
    cpus_per_actor: float = 1.0,
    seed: int = 0,
    mano_dir=None,
    dataset: str = "synthlab",
    data_root=None,
    split=None,
):
    """A Ray Dataset of ``n_chunks * cfg.chunk`` generated samples made by ``num_actors`` GeneratorActors."""
    ray = _ray()
    return ray.data.range(n_chunks).map_batches(
        GeneratorActor,
        fn_constructor_kwargs=dict(
            mixing=asdict(cfg), chunk=cfg.chunk, seed=seed, mano_dir=mano_dir, dataset=dataset, data_root=data_root, split=split
        ),
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_gpus=gpus_per_actor,
        num_cpus=cpus_per_actor,
    )


class RayShardProvider:
    """A synthetic provider (``take(n)``) over a Ray Train worker's dataset shard, for :class:`mixing.mixer.Mixer`.

    Args:
        shard: ``ray.train.get_dataset_shard("synthetic")`` (or any Ray Dataset / DataIterator).
        device: where returned batches live.
        epochs: how many passes over the shard before ``take`` raises StopIteration (None: cycle forever).
    """

    def __init__(self, shard, *, device: torch.device | str = "cpu", epochs: int | None = None):
        self.shard = shard
        self.device = torch.device(device)
        self.epochs = epochs
        self._pass = 0
        self._rows: Iterator | None = None
        self._taken = 0

    def _next_row_batch(self, n: int) -> dict:
        while True:
            if self._rows is None:
                if self.epochs is not None and self._pass >= self.epochs:
                    raise StopIteration("the Ray dataset shard is exhausted")
                self._rows = iter(self.shard.iter_batches(batch_size=n, batch_format="numpy"))
                self._pass += 1
            try:
                return next(self._rows)
            except StopIteration:
                self._rows = None

    def take(self, n: int) -> HandBatch:
        parts, need = [], n
        while need > 0:
            batch = rows_to_batch(self._next_row_batch(need), self.device)
            parts.append(batch.select(slice(0, need)))
            need -= len(parts[-1])
        self._taken += n
        return concat_batches(parts)

    def stats(self) -> dict:
        return {"taken": self._taken, "passes": self._pass}

    def close(self) -> None:
        self._rows = None
