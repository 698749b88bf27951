"""A bounded, device-resident pool of generated samples, filled asynchronously by a producer thread.

The producer calls ``produce()`` (a callable returning a :class:`hands.sample.HandBatch` on the pool's
device: in practice :meth:`mixing.source.SyntheticSource.generate`) whenever the pool has room, while the
trainer draws samples with :meth:`SamplePool.take`. Each sample carries a reuse count; a sample drawn
``max_reuse`` times leaves the pool. ``take`` prefers fresh samples, then the least-reused ones, so the
trainer never waits while the pool holds enough usable samples; it waits (and the wait is counted as
stall time) only when fewer than the requested number are usable.

On a CUDA device the producer selects the pool's device (``torch.cuda.set_device``: each DDP rank's producer
works on its own GPU) and runs on its own stream, created at the lowest priority (``PRODUCER_PRIORITY``; the
trainer runs on a higher-priority stream, :func:`trainer_stream`, so that the GPU's scheduler serves the
trainer's kernels first when both have work queued), which first waits for the stream that built the pool
(the generator's weights: the constructing thread's current stream, not the producer thread's). Every chunk it adds carries an event. ``take`` makes the consumer's current stream wait
on the events of the chunks it reads *before* reading them, and marks their tensors with ``record_stream`` for
the consumer's stream (they were allocated on the producer's stream: without it the caching allocator could
hand their memory back to the producer while the trainer still reads it). Tensors the producer reads but did
not allocate (``resident``: the generator's weights, the renderer's faces) are marked for the producer's stream
once. There is no host sync on the trainer's side.

Failures: a generated sample with a non-finite image is dropped and counted (``dropped_nonfinite``); an
exception in ``produce`` stops the producer and is re-raised in the trainer by the next ``take`` (as a
:class:`ProducerError` whose ``__cause__`` is the original), never a hang; so is a producer whose last
``max_dropped_chunks`` chunks were all non-finite (a broken generator would otherwise loop forever).
``close()`` stops and joins the producer; the pool is also a context manager.

One device, two jobs: besides ``capacity`` (samples), ``max_resident_mib`` bounds the bytes the pool's samples
hold, and ``max_share`` caps the producer's share of wall time (after a chunk that took ``t`` seconds it pauses
``t * (1 / max_share - 1)``). Neither holds the producer back while the trainer would stall: when a ``take``
waits, or when the draws the pool has left would run out before one more chunk is made (:func:`running_low`:
at the trainer's measured rate of takes and the last chunk's generation time), the producer generates at once.
On CUDA, :meth:`SamplePool.stats` also reports the memory the caching allocator holds for the producer's stream
(its generator activations and the pool's samples: blocks are cached per stream, so this is the producer's
high-water mark) and the two streams' priorities.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from hands.sample import HandBatch, concat_batches

__all__ = ["SamplePool", "PoolStats", "ProducerError", "resident_tensors", "trainer_stream", "share_pause",
           "running_low", "stream_memory", "PRODUCER_PRIORITY", "TRAINER_PRIORITY"]

# CUDA stream priorities: a lower number is a higher priority; 0 is the lowest (and the default streams'),
# a value beyond the device's range is clamped to it (torch.cuda.Stream).
PRODUCER_PRIORITY = 0
TRAINER_PRIORITY = -1


@contextmanager
def trainer_stream(device: torch.device | str, priority: int = TRAINER_PRIORITY) -> Iterator:
    """Run the block on a new CUDA stream of ``priority`` (higher than the pool's producer's), ordered after the
    current stream's work on entry and before it on exit. Yields the stream (None, and does nothing, off CUDA)."""
    device = torch.device(device)
    if device.type != "cuda":
        yield None
        return
    previous = torch.cuda.current_stream(device)
    stream = torch.cuda.Stream(device, priority=priority)
    stream.wait_stream(previous)
    try:
        with torch.cuda.stream(stream):
            yield stream
    finally:
        previous.wait_stream(stream)


def share_pause(busy_s: float, max_share: float) -> float:
    """The pause after ``busy_s`` seconds of generation that keeps the producer's share of wall time at
    ``max_share``: busy / (busy + pause) = max_share."""
    if not 0 < max_share <= 1:
        raise ValueError(f"max_share must be in (0, 1], got {max_share}")
    return busy_s * (1.0 / max_share - 1.0)


def running_low(draws_left: int, n: int, chunk_s: float, take_interval_s: float) -> bool:
    """Whether a pool with ``draws_left`` draws (its samples' remaining uses) runs out before one more chunk is
    ready, for a trainer taking ``n`` samples every ``take_interval_s`` seconds and a chunk that takes
    ``chunk_s`` seconds to make (n x (1 + chunk_s / interval) draws are needed meanwhile). Unknown rates
    (0: no take or no chunk yet): running low only below one take."""
    if take_interval_s <= 0 or chunk_s <= 0:
        return draws_left < n
    return draws_left < n * (1.0 + chunk_s / take_interval_s)


def stream_memory(segments: Iterable[dict], stream_handle: int, device_index: int) -> tuple[int, int]:
    """(reserved, allocated) bytes of the caching allocator's segments that belong to one stream on one device
    (``segments``: :func:`torch.cuda.memory_snapshot`; its blocks are cached per stream)."""
    reserved = allocated = 0
    for segment in segments:
        if segment.get("stream") == stream_handle and segment.get("device", device_index) == device_index:
            reserved += int(segment.get("total_size", 0))
            allocated += int(segment.get("allocated_size", 0))
    return reserved, allocated


def resident_tensors(*objects) -> list[torch.Tensor]:
    """The tensors of ``objects``: tensors themselves, a module's parameters and buffers, and, one level down,
    those of the modules and tensors an object holds as attributes (a pipeline's UNet, VAE, ...)."""
    out: dict[int, torch.Tensor] = {}

    def add(obj, depth: int) -> None:
        if isinstance(obj, torch.Tensor):
            out.setdefault(id(obj), obj)
        elif isinstance(obj, nn.Module):
            for t in (*obj.parameters(), *obj.buffers()):
                out.setdefault(id(t), t)
        elif depth == 0 and hasattr(obj, "__dict__"):
            for value in vars(obj).values():
                add(value, 1)

    for obj in objects:
        add(obj, 0)
    return list(out.values())


class ProducerError(RuntimeError):
    """The pool's producer raised; ``__cause__`` holds the original exception."""


@dataclass
class PoolStats:
    """Counters of a :class:`SamplePool` (all plain Python numbers; read them with :meth:`SamplePool.stats`)."""

    produced: int = 0
    dropped_nonfinite: int = 0
    evicted: int = 0
    taken: int = 0
    taken_fresh: int = 0
    stall_s: float = 0.0
    prime_s: float = 0.0
    busy_s: float = 0.0
    throttle_s: float = 0.0  # pauses of the producer for max_share
    capped_s: float = 0.0  # waits of the producer for max_resident_mib
    resident_bytes: int = 0  # the pool's samples in memory now (every chunk holding a live sample)
    peak_resident_bytes: int = 0
    reuse_histogram: Counter = field(default_factory=Counter)  # reuse count at the time of drawing -> n

    def as_dict(self, wall_s: float | None = None) -> dict:
        out = {
            "produced": self.produced,
            "dropped_nonfinite": self.dropped_nonfinite,
            "evicted": self.evicted,
            "taken": self.taken,
            "fresh_fraction": self.taken_fresh / self.taken if self.taken else 0.0,
            "mean_reuse": (
                sum(k * v for k, v in self.reuse_histogram.items()) / self.taken if self.taken else 0.0
            ),
            "reuse_histogram": {str(k): v for k, v in sorted(self.reuse_histogram.items())},
            "trainer_stall_s": self.stall_s,
            "prime_s": self.prime_s,
            "generator_busy_s": self.busy_s,
            "images_per_s": self.produced / self.busy_s if self.busy_s > 0 else 0.0,
            "producer_throttle_s": self.throttle_s,
            "producer_capped_s": self.capped_s,
            "pool_mib": self.resident_bytes / 2**20,
            "pool_peak_mib": self.peak_resident_bytes / 2**20,
        }
        if wall_s:
            out["stall_fraction"] = self.stall_s / wall_s
            out["producer_share"] = self.busy_s / wall_s
        return out


class _Chunk:
    """One produced HandBatch and the reuse count of each of its samples."""

    def __init__(self, batch: HandBatch, event):
        self.batch = batch
        self.reuse = [0] * len(batch)
        self.alive = [True] * len(batch)
        self.event = event  # a torch.cuda.Event on CUDA, else None
        self.streams: set = set()  # consumer streams its tensors are recorded on
        self.nbytes = sum(t.nbytes for t in batch.tensors())

    def n_alive(self) -> int:
        return sum(self.alive)


class SamplePool:
    """A bounded pool of generated samples with a background producer.

    Args:
        produce: callable returning a HandBatch of new samples (on ``device``).
        capacity: the most samples the pool holds (it stops producing when full).
        max_reuse: a sample is drawn at most this many times.
        device: where the samples live; a CUDA device gives the producer its own stream.
        seed: seeds the tie-breaking among equally-reused samples, so runs repeat.
        start: start the producer thread now (else call :meth:`start`).
        resident: tensors (or modules, or objects holding them, see :func:`resident_tensors`) allocated
            outside the producer that it reads on CUDA (the generator's weights); recorded on its stream.
        max_dropped_chunks: the producer fails (ProducerError in ``take``) after this many chunks in a row
            with no finite image.
        max_resident_mib: the most MiB the pool's samples may hold (None: no bound but ``capacity``); the
            producer waits while one more chunk (the size of the last) would pass it.
        max_share: the most the producer may be busy, as a fraction of wall time (1: no cap).
        Both yield to a trainer that would stall (a ``take`` waits, or the pool's remaining draws would run out
        before one more chunk is made: :func:`running_low`).
    """

    def __init__(
        self,
        produce: Callable[[], HandBatch],
        *,
        capacity: int = 256,
        max_reuse: int = 4,
        device: torch.device | str = "cpu",
        seed: int = 0,
        start: bool = True,
        resident: Iterable = (),
        max_dropped_chunks: int = 100,
        max_resident_mib: float | None = None,
        max_share: float = 1.0,
    ):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if max_reuse < 1:
            raise ValueError(f"max_reuse must be >= 1, got {max_reuse}")
        self.produce = produce
        self.capacity = capacity
        self.max_reuse = max_reuse
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.resident = resident_tensors(*resident) if self.device.type == "cuda" else []
        if max_dropped_chunks < 1:
            raise ValueError(f"max_dropped_chunks must be >= 1, got {max_dropped_chunks}")
        self.max_dropped_chunks = max_dropped_chunks
        if max_resident_mib is not None and not max_resident_mib > 0:
            raise ValueError(f"max_resident_mib must be > 0 (or None), got {max_resident_mib}")
        self.max_resident_bytes = None if max_resident_mib is None else int(max_resident_mib * 2**20)
        share_pause(0.0, max_share)  # checks the range
        self.max_share = max_share
        self._demand = 0  # samples a waiting take / prime needs (0: none waits)
        self._last_n = 0  # what the last take asked for: fewer usable samples means the next one waits
        self._chunk_bytes = 0  # the last chunk's size, for max_resident_mib
        self._chunk_s = 0.0  # the last chunk's generation time, and the trainer's time between takes (mean of
        self._take_interval = 0.0  # the last few): how early the producer must resume (running_low)
        self._last_take_at = None
        self._stream = None  # the producer's CUDA stream
        # the stream the pool is built on (the generator's weights were written there): the producer waits on it
        self._origin = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        self.generator_bytes = sum(t.nbytes for t in resident_tensors(*resident))
        self._chunks: list[_Chunk] = []
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._rng = torch.Generator().manual_seed(seed)
        self._stats = PoolStats()
        self._slowest_chunk_s = 0.0
        self._started_at = time.perf_counter()
        if start:
            self.start()

    # ------------------------------------------------------------------ producer side
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="SamplePool-producer", daemon=True)
        self._thread.start()

    def _size(self) -> int:
        return sum(c.n_alive() for c in self._chunks)

    def _waiting(self) -> bool:  # under the lock: a take waits, or the next one would
        return self._size() < max(self._demand, self._last_n)

    def _running_low(self) -> bool:  # under the lock: the trainer would wait before one more chunk is made
        if self._waiting():
            return True
        draws_left = sum(self.max_reuse - c.reuse[p] for c in self._chunks for p in range(len(c.reuse)) if c.alive[p])
        return self._last_n > 0 and running_low(draws_left, self._last_n, self._chunk_s, self._take_interval)

    def _may_produce(self) -> bool:  # under the lock
        if self._waiting():
            return True
        if self._size() >= self.capacity:
            return False
        limit = self.max_resident_bytes
        if limit is None or self._stats.resident_bytes + self._chunk_bytes <= limit or not self._chunks:
            return True
        return self._running_low()

    def _run(self) -> None:
        stream = None
        dropped_in_a_row = 0
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)  # this thread's current device: a context on the right GPU
                stream = torch.cuda.Stream(self.device, priority=PRODUCER_PRIORITY)
                stream.wait_stream(self._origin)  # weights written before the pool, on the building thread's stream
                for tensor in self.resident:
                    tensor.record_stream(stream)
                with self._lock:
                    self._stream = stream
            while not self._stop.is_set():
                with self._lock:
                    held = time.perf_counter()
                    full = self._size() >= self.capacity
                    while not self._stop.is_set() and not self._may_produce():
                        self._lock.wait(timeout=0.1)
                    if not full:  # held back by max_resident_mib, not by capacity
                        self._stats.capped_s += time.perf_counter() - held
                if self._stop.is_set():
                    return
                started = time.perf_counter()
                if stream is not None:
                    with torch.cuda.stream(stream):
                        batch = self.produce()
                        batch = self._drop_nonfinite(batch)
                        event = torch.cuda.Event()
                        event.record(stream)
                else:
                    batch = self._drop_nonfinite(self.produce())
                    event = None
                busy = time.perf_counter() - started
                self._slowest_chunk_s = max(self._slowest_chunk_s, busy)
                self._chunk_s = busy
                dropped_in_a_row = 0 if batch is not None else dropped_in_a_row + 1
                if dropped_in_a_row >= self.max_dropped_chunks:
                    raise RuntimeError(
                        f"the generator made {dropped_in_a_row} chunks in a row with no finite image "
                        f"({self._stats.dropped_nonfinite} images dropped); check the generator"
                    )
                with self._lock:
                    self._stats.busy_s += busy
                    if batch is not None and len(batch):
                        chunk = _Chunk(batch, event)
                        self._chunks.append(chunk)
                        self._chunk_bytes = chunk.nbytes
                        self._stats.produced += len(batch)
                        self._count_memory()
                    self._lock.notify_all()
                    pause = share_pause(busy, self.max_share)
                    if pause > 0 and not self._stop.is_set() and not self._running_low():
                        paused = time.perf_counter()  # cut short when the trainer would stall
                        self._lock.wait_for(lambda: self._stop.is_set() or self._running_low(), timeout=pause)
                        self._stats.throttle_s += time.perf_counter() - paused
        except BaseException as exc:  # surfaced in the trainer by take()
            with self._lock:
                self._error = exc
                self._lock.notify_all()

    def _drop_nonfinite(self, batch: HandBatch) -> HandBatch | None:
        # One reduction per produced chunk; the host reads it to decide what to keep (outside the trainer).
        finite = torch.isfinite(batch.image.flatten(1)).all(1)
        n_bad = int((~finite).sum())
        if n_bad == 0:
            return batch
        with self._lock:
            self._stats.dropped_nonfinite += n_bad
        return batch.select(finite) if n_bad < len(batch) else None

    def _count_memory(self) -> None:  # under the lock
        self._stats.resident_bytes = sum(c.nbytes for c in self._chunks)
        self._stats.peak_resident_bytes = max(self._stats.peak_resident_bytes, self._stats.resident_bytes)

    # ------------------------------------------------------------------ consumer side
    def prime(self, n: int, timeout: float | None = None) -> float:
        """Wait until ``n`` usable samples are in the pool (before training starts, so that the first steps
        do not stall on the first generator call). Returns the wait in seconds, counted as ``prime_s``,
        not as trainer stall. Raises like :meth:`take`."""
        start = time.perf_counter()
        with self._lock:
            if self._size() < n:
                self._demand = n
                self._lock.notify_all()
            while self._size() < n:
                if self._error is not None:
                    raise ProducerError(f"the sample pool's producer failed: {self._error!r}") from self._error
                if self._thread is None or not self._thread.is_alive():
                    raise ProducerError("the sample pool's producer is not running (closed or never started)")
                self._lock.wait(timeout=0.05)
                if timeout is not None and time.perf_counter() - start > timeout:
                    raise TimeoutError(f"prime({n}): the pool did not fill within {timeout} s")
            waited = time.perf_counter() - start
            self._demand = 0
            self._stats.prime_s += waited
        return waited

    def take(self, n: int, timeout: float | None = None) -> HandBatch:
        """Draw ``n`` samples: fresh ones first, then the least reused; waits only if fewer are usable.

        Raises :class:`ProducerError` if the producer failed, ``TimeoutError`` after ``timeout`` seconds.
        """
        if n < 1:
            raise ValueError(f"take: n must be >= 1, got {n}")
        if n > self.capacity:
            raise ValueError(f"take: asked for {n} samples but the pool holds at most {self.capacity}")
        waited = 0.0
        with self._lock:
            start = time.perf_counter()
            self._last_n = n
            if self._size() < n:
                self._demand = n
                self._lock.notify_all()  # a pausing producer resumes
            while self._size() < n:
                if self._error is not None:
                    raise ProducerError(f"the sample pool's producer failed: {self._error!r}") from self._error
                if self._thread is None or not self._thread.is_alive():
                    if self._error is None:
                        raise ProducerError("the sample pool's producer is not running (closed or never started)")
                self._lock.wait(timeout=0.05)
                if timeout is not None and time.perf_counter() - start > timeout:
                    raise TimeoutError(f"take({n}): the pool did not fill within {timeout} s")
            now = time.perf_counter()
            waited = now - start
            self._demand = 0
            if self._last_take_at is not None:  # the trainer's pace (a running mean over the last few takes)
                interval = now - self._last_take_at
                self._take_interval = interval if self._take_interval == 0 else 0.7 * self._take_interval + 0.3 * interval
            self._last_take_at = now
            picks = self._pick(n)
            for chunk, positions in picks:
                for p in positions:
                    self._stats.reuse_histogram[chunk.reuse[p]] += 1
                    if chunk.reuse[p] == 0:
                        self._stats.taken_fresh += 1
                    chunk.reuse[p] += 1
                    if chunk.reuse[p] >= self.max_reuse:
                        chunk.alive[p] = False
                        self._stats.evicted += 1
            self._chunks = [c for c in self._chunks if c.n_alive() > 0]
            self._count_memory()
            self._stats.taken += n
            self._stats.stall_s += waited
            self._lock.notify_all()
        # The chunks' tensors are read only after the consumer's stream waits on their events (CUDA), and are
        # recorded on it once per chunk (they were allocated on the producer's stream).
        current = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        parts = []
        for chunk, positions in picks:
            if current is not None and chunk.event is not None:
                current.wait_event(chunk.event)
                if current not in chunk.streams:
                    chunk.batch.record_stream(current)
                    chunk.streams.add(current)
            parts.append(chunk.batch.select(positions))
        return concat_batches(parts)

    def _pick(self, n: int) -> list[tuple[_Chunk, list[int]]]:
        candidates = [
            (chunk.reuse[p], int(torch.randint(1 << 30, (1,), generator=self._rng)), ci, p)
            for ci, chunk in enumerate(self._chunks)
            for p in range(len(chunk.reuse))
            if chunk.alive[p]
        ]
        candidates.sort()
        chosen: dict[int, list[int]] = {}
        for _, _, ci, p in candidates[:n]:
            chosen.setdefault(ci, []).append(p)
        return [(self._chunks[ci], sorted(ps)) for ci, ps in sorted(chosen.items())]

    # ------------------------------------------------------------------ bookkeeping
    def __len__(self) -> int:
        with self._lock:
            return self._size()

    def stats(self) -> dict:
        """Fresh fraction, mean reuse, reuse histogram, trainer stall and generator busy time, images/s, the
        producer's share of wall time and its pauses, the pool's memory and the generator's weights (MiB); on
        CUDA also the streams' priorities and the caching allocator's memory of the producer's stream (read
        from :func:`torch.cuda.memory_snapshot`, no device sync)."""
        with self._lock:
            out = self._stats.as_dict(wall_s=time.perf_counter() - self._started_at)
            out["generator_mib"] = self.generator_bytes / 2**20
            stream = self._stream
        if stream is not None:  # a simulated device may not know priorities, handles or the allocator: absent then
            priorities = getattr(stream, "priority", None), getattr(self._origin, "priority", None)
            if None not in priorities:
                out["producer_stream_priority"], out["trainer_stream_priority"] = priorities
            handle = getattr(stream, "cuda_stream", None)
            try:
                segments = torch.cuda.memory_snapshot() if handle is not None else None
            except Exception:  # the device cannot be asked (a simulator, a broken driver)
                segments = None
            if segments is not None:
                reserved, allocated = stream_memory(segments, handle, self.device.index)
                out["producer_reserved_mib"] = reserved / 2**20
                out["producer_allocated_mib"] = allocated / 2**20
        return out

    def close(self, timeout: float = 30.0) -> None:
        """Stop the producer and join it (it finishes the chunk it is generating). The wait is ``timeout`` or
        three times the slowest chunk so far, whichever is longer (a slow generator, e.g. SD 1.5 on a CPU, is
        not a hang); a producer still running after that is an error."""
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
            timeout = max(timeout, 3 * self._slowest_chunk_s)
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"the sample pool's producer did not stop within {timeout} s")
            self._thread = None

    def __enter__(self) -> "SamplePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
