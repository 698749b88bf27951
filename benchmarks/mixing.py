"""P2: training step time with generated samples mixed in online (`--synthetic-ratio 0.3`) over without them
(`--synthetic-ratio 0`): same regressor, profile, batch, seed and steps.

Each repetition is one `python -m recon.train` subprocess (a fresh process: no warm caches shared between the
two sides; its peak RSS is sampled from outside). The step time is the training loop's time over its steps, as
recon.train prints it ("trained N steps in X s": the loop only, setup, final checkpoint and evaluation excluded);
with mixing, the trainer's stall (waiting on the pool) and the generator's busy time come from its "mixing:" line.
"""
from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .common import RssSampler, mib

_TRAINED = re.compile(r"trained (\d+) steps in ([0-9.]+) s")
_GPU_PEAK = re.compile(r"peak GPU memory ([0-9.]+) MiB")
_MIXING_KEYS = ("trainer_stall_s", "generator_busy_s", "images_per_s", "produced", "taken", "mean_reuse",
                "stall_fraction_of_training")


@dataclass
class MixingSettings:
    steps: int = 40
    batch: int = 16
    repeats: int = 3
    ratio: float = 0.3
    overrides: list[str] = field(default_factory=list)  # extra KEY=VALUE for recon.train (e.g. mixing.max_reuse=8)


def train_command(settings: MixingSettings, ratio: float, out: Path, device: str = "cpu") -> list[str]:
    return [sys.executable, "-m", "recon.train", "--synthetic-ratio", str(ratio), "--max-steps", str(settings.steps), "--epochs", "1000",
            "--batch-size", str(settings.batch), "--seed", "0", "--device", str(device), "--out", str(out),
            "eval.at_end=false", "train.ckpt_every=1000000", "train.image_every=0", "train.log_every=1000000",
            # the regressor every P2 result was measured with (the baseline's demo profile before 2026-12-06: a
            # full-width ResNet-18, final weights), so that results of different commits compare
            "model.backbone_kwargs=null", "train.average_last=1",
            *settings.overrides]


def _parse(text: str) -> dict:
    match = _TRAINED.search(text)
    if match is None:
        tail = "\n".join(text.strip().splitlines()[-5:])
        raise RuntimeError(f"recon.train printed no 'trained N steps in X s' line; its output ended with:\n{tail}")
    steps, loop_s = int(match.group(1)), float(match.group(2))
    result = {"steps": steps, "loop_s": loop_s}
    peak = _GPU_PEAK.search(text)
    if peak is not None:
        result["gpu_peak_mib"] = float(peak.group(1))
    mixing = next((line for line in text.splitlines() if line.startswith("mixing: produced")), None)
    if mixing is not None:
        for key in _MIXING_KEYS:
            found = re.search(rf"\b{key} ([0-9.e+-]+)", mixing)
            if found:
                result[key] = float(found.group(1))
    return result


def run_train_process(command: list[str], workdir: Path, tag: str, what: str) -> tuple[dict, int]:
    """Run one recon.train `command` with its output in `workdir/tag.log`; (parsed figures, peak RSS bytes of the
    child). A non-zero exit raises RuntimeError naming `what` and the log's last lines. P2 and P7 use it."""
    log = workdir / f"{tag}.log"
    with open(log, "w") as handle:
        child = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent)
        sampler = RssSampler(child.pid, interval=0.02).start()
        code = child.wait()
        peak = sampler.stop()
    text = log.read_text(errors="replace")
    if code != 0:
        tail = "\n".join(text.strip().splitlines()[-5:])
        raise RuntimeError(f"recon.train {what} exited with {code}:\n{tail}")
    return _parse(text), peak


def run_once(settings: MixingSettings, ratio: float, workdir: Path, tag: str, device: str = "cpu") -> tuple[dict, int]:
    """One recon.train subprocess; (parsed figures, peak RSS bytes of the child)."""
    return run_train_process(train_command(settings, ratio, workdir / tag, device), workdir, tag,
                             f"--synthetic-ratio {ratio}")


def run_p2(settings: MixingSettings, device="cpu") -> dict:
    """Step time at `settings.ratio` over ratio 0 on `device`, repetitions interleaved (0, r, r, 0, ...)."""
    device = str(device)
    runs: dict[str, list[dict]] = {"mixed": [], "real_only": []}
    peaks = {"mixed": 0, "real_only": 0}
    ratios = {"mixed": settings.ratio, "real_only": 0.0}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_p2_") as tmp:
        for rep in range(settings.repeats):
            order = ["real_only", "mixed"] if rep % 2 == 0 else ["mixed", "real_only"]
            for name in order:
                result, peak = run_once(settings, ratios[name], Path(tmp), f"{name}_{rep}", device)
                runs[name].append(result)
                peaks[name] = max(peaks[name], peak)
    step_s = {n: sorted(r["loop_s"] / r["steps"] for r in v) for n, v in runs.items()}
    median = {n: v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2
              for n, v in step_s.items()}
    ratio = median["mixed"] / median["real_only"]
    stall = sorted(r.get("trainer_stall_s", 0.0) / r["loop_s"] for r in runs["mixed"])
    stall_median = stall[len(stall) // 2]
    busy = sorted(r.get("generator_busy_s", 0.0) / r["loop_s"] for r in runs["mixed"])
    return {
        "ratio": round(ratio, 3), "target": 1.10, "met": bool(ratio <= 1.10 and stall_median <= 0.01),
        "better": "lower",
        "step_s_median": {n: round(v, 4) for n, v in median.items()},
        "step_s": {n: [round(x, 4) for x in v] for n, v in step_s.items()},
        "stall_fraction": round(stall_median, 4), "stall_target": 0.01,
        "generator_busy_fraction": round(busy[len(busy) // 2], 4),
        "steps_per_s": {n: round(1.0 / v, 3) for n, v in median.items()},
        "gpu_peak_mib": {n: max(r.get("gpu_peak_mib", 0.0) for r in v) for n, v in runs.items()
                         if any("gpu_peak_mib" in r for r in v)},
        "runs": runs,
        "peak_mib": {n: mib(b) for n, b in peaks.items()},
        "settings": {"synthetic_ratio": settings.ratio, "steps": settings.steps, "batch": settings.batch,
                     "repeats": settings.repeats, "profile": "demo", "arch": "baseline", "mix_mode": "online",
                     "device": device, "command": " ".join(train_command(settings, settings.ratio, Path("OUT"), device)[1:])},
        "wall_s": round(time.perf_counter() - started, 1),
    }
