"""Mixed batches: exactly ``round(r * B)`` generated samples and ``B - round(r * B)`` real ones.

The real samples come from the regressor's own data pipeline (a DataLoader over a dataset reader with the
arch's crop and augmentation), already batched to the real share ``B - n_synthetic`` (see
:func:`split_batch_size`). The synthetic samples come from a *provider* with ``take(n) -> HandBatch``:
- ``online``: :class:`mixing.pool.SamplePool`, filled asynchronously by the generator;
- ``sync``: :class:`SyncProvider`, which generates inline (debugging and ablations);
- ``offline``: :class:`mixing.shards.ShardReader`, reading ``python -m mixing.pregenerate`` shards.
Generated samples go through ``preprocess_synthetic`` (the same crop and augmentation as the real ones,
applied on the device) before they are concatenated after the real ones.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Protocol

import torch

from hands.sample import HandBatch, concat_batches

__all__ = ["SyntheticProvider", "SyncProvider", "Mixer", "split_batch_size", "batch_with_real", "batch_parts",
           "SYNTHETIC_BATCH_MODES"]

SYNTHETIC_BATCH_MODES = ("share", "add")


class SyntheticProvider(Protocol):
    def take(self, n: int) -> HandBatch: ...

    def stats(self) -> dict: ...

    def close(self) -> None: ...


def split_batch_size(batch_size: int, ratio: float) -> tuple[int, int]:
    """(n_real, n_synthetic) with n_synthetic = round(ratio * batch_size) (Python's round: half to even)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"synthetic ratio must satisfy 0 <= r < 1, got {ratio}")
    n_syn = int(round(ratio * batch_size))
    return batch_size - n_syn, n_syn


def batch_with_real(n_real: int, ratio: float) -> int:
    """The batch of ``n_real`` real samples and generated ones on top: as many generated as the whole number
    nearest to ratio x n_real / (1 - ratio), the count that would make them the share ``ratio`` of the batch
    (16 real at r = 0.3: 16 + round(6.86) = 23; 1 real at r = 0.5: 1 + 1). It is also a share batch with exactly
    that split: :func:`split_batch_size` of it gives back (n_real, the generated), since ratio x B then differs
    from the generated count by less than 1/2."""
    if n_real < 1:
        raise ValueError(f"n_real must be >= 1, got {n_real}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"synthetic ratio must satisfy 0 <= r < 1, got {ratio}")
    return n_real + int(round(ratio * n_real / (1.0 - ratio)))


def batch_parts(batch_size: int, ratio: float, mode: str = "share") -> tuple[int, int]:
    """(n_real, n_synthetic) of a step's batch under ``train.synthetic_batch``:

    - ``share``: ``batch_size`` counts every sample; round(r x B) of them are generated (:func:`split_batch_size`);
    - ``add``: ``batch_size`` counts the real samples; the generated ones come on top, about the share r of the
      whole batch (:func:`batch_with_real`): the same real images a step as at r = 0.
    """
    if mode == "share":
        return split_batch_size(batch_size, ratio)
    if mode == "add":
        return batch_size, batch_with_real(batch_size, ratio) - batch_size
    raise ValueError(f"synthetic batch mode must be one of {', '.join(SYNTHETIC_BATCH_MODES)}, got {mode!r}")


class SyncProvider:
    """Generates the requested samples inline, on the caller's thread (``mix_mode="sync"``).

    Args:
        generate: callable ``generate(n) -> HandBatch`` (e.g. :meth:`mixing.source.SyntheticSource.generate`).
    """

    def __init__(self, generate: Callable[[int], HandBatch]):
        self.generate = generate
        self._taken = 0
        self._dropped = 0

    def take(self, n: int) -> HandBatch:
        parts, need = [], n
        for _ in range(100):  # bounded: a generator that only makes non-finite images is an error
            batch = self.generate(need)
            finite = torch.isfinite(batch.image.flatten(1)).all(1)
            n_bad = int((~finite).sum())
            self._dropped += n_bad
            if n_bad:
                batch = batch.select(finite)
            if len(batch):
                parts.append(batch)
            need -= len(batch)
            if need <= 0:
                self._taken += n
                return concat_batches(parts)
        raise RuntimeError(f"sync generation gave non-finite images {self._dropped} times in a row; check the generator")

    def stats(self) -> dict:
        return {"taken": self._taken, "dropped_nonfinite": self._dropped, "fresh_fraction": 1.0 if self._taken else 0.0}

    def close(self) -> None:
        pass


class Mixer:
    """Iterates mixed batches.

    Args:
        real_batches: an iterable of real HandBatches of size ``n_real`` (an epoch of a DataLoader); the
            mixer ends when it ends.
        provider: the synthetic samples' provider, or None when ``n_synthetic`` is 0.
        n_synthetic: synthetic samples per batch.
        device: where mixed batches live.
        preprocess_synthetic: callable applied to each synthetic HandBatch (the arch's crop/augmentation on
            the device) so that its images match the real ones in size and framing.
    """

    def __init__(
        self,
        real_batches: Iterable[HandBatch],
        provider: SyntheticProvider | None,
        *,
        n_synthetic: int,
        device: torch.device | str = "cpu",
        preprocess_synthetic: Callable[[HandBatch], HandBatch] | None = None,
    ):
        if n_synthetic > 0 and provider is None:
            raise ValueError(f"n_synthetic={n_synthetic} needs a synthetic provider")
        self.real_batches = real_batches
        self.provider = provider
        self.n_synthetic = n_synthetic
        self.device = torch.device(device)
        self.preprocess_synthetic = preprocess_synthetic

    def __iter__(self) -> Iterator[HandBatch]:
        for real in self.real_batches:
            real = real.to(self.device, non_blocking=True)
            if self.n_synthetic == 0:
                yield real
                continue
            synthetic = self.provider.take(self.n_synthetic)
            if self.preprocess_synthetic is not None:
                synthetic = self.preprocess_synthetic(synthetic)
            if synthetic.image.shape[1:] != real.image.shape[1:]:
                raise ValueError(
                    f"synthetic images are {tuple(synthetic.image.shape[1:])} but real ones "
                    f"{tuple(real.image.shape[1:])}: preprocess_synthetic must crop them to the arch's input"
                )
            yield concat_batches([real, synthetic.to(self.device)])
