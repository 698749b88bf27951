"""Shared machinery of the benchmarks: interleaved repetitions, medians, peak memory, run metadata.

Every figure is a ratio of medians: the variants of one measurement run in turn (A B, B A, A B, ...) inside one
process, so that a load change on a shared machine hits both sides alike. Peak memory is sampled (RSS of the
process, or of a child process, every few milliseconds while a variant runs) on a CPU, and read from
`torch.cuda.max_memory_allocated` on a GPU.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


class RssSampler:
    """Peak resident set size (bytes) of process `pid` (default: this one), sampled every `interval` s in a
    background thread between `start()` and `stop()`. A sampled peak: spikes shorter than `interval` can be missed."""

    def __init__(self, pid: int | None = None, interval: float = 0.005):
        import psutil

        self._process = psutil.Process(pid or os.getpid())
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                rss = self._process.memory_info().rss
            except psutil.Error:  # the child ended
                return
            self.peak = max(self.peak, rss)
            self._stop.wait(self.interval)

    def start(self) -> "RssSampler":
        self.start_rss = self._process.memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.peak


@dataclass
class Timings:
    """Seconds per repetition of each variant, and each variant's peak memory (bytes)."""

    seconds: dict[str, list[float]] = field(default_factory=dict)
    peak_bytes: dict[str, int] = field(default_factory=dict)
    # growth of the peak over the memory in use when the variant started (RSS on a CPU, allocated on a GPU):
    # the process's RSS holds everything loaded before (torch, the models), the same for every variant
    peak_growth_bytes: dict[str, int] = field(default_factory=dict)
    extra: dict[str, list] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                warmup: int = 1) -> Timings:
    """Time each variant `repeats` times, interleaved (order alternates every round), after `warmup` untimed
    rounds. A variant may return a float: then that value (seconds measured inside it) is used instead of the
    wall time of the call. Returns the per-repetition seconds and per-variant peak memory."""
    names = list(variants)
    timings = Timings(seconds={n: [] for n in names}, peak_bytes={n: 0 for n in names},
                      peak_growth_bytes={n: 0 for n in names})
    for _ in range(warmup):
        for name in names:
            variants[name]()
    for rep in range(repeats):
        for name in (names if rep % 2 == 0 else names[::-1]):
            sampler = None
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                in_use = torch.cuda.memory_allocated(device)
            else:
                sampler = RssSampler().start()
            start = time.perf_counter()
            value = variants[name]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device)
            else:
                peak = sampler.stop()
                in_use = sampler.start_rss
            timings.peak_bytes[name] = max(timings.peak_bytes[name], peak)
            timings.peak_growth_bytes[name] = max(timings.peak_growth_bytes[name], peak - in_use)
            timings.seconds[name].append(float(value) if isinstance(value, float) else elapsed)
    return timings


def machine_info(device: torch.device) -> dict:
    """Platform, CPU count, load average, device name and library versions."""
    import diffusers

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        import moderngl

        info["moderngl"] = moderngl.__version__
    except ImportError:
        info["moderngl"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def mib(nbytes: int) -> float:
    return round(nbytes / 2**20, 1)
