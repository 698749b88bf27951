"""`python -m benchmarks.run [--quick] [--device cpu|cuda] [--only p1,p4] [--threads N] [--out FILE]`

Runs the performance targets of issue 10 and writes `benchmarks/results/<device>.json` (or --out) and a Markdown
table next to it (same name, .md), also printed. Every figure is a ratio of medians over interleaved repetitions
in this one run (see benchmarks.common); the JSON records the machine, versions, load average, command and date.

- p1_sampler: our AttentionHandPipeline over diffusers' StableDiffusionControlNetPipeline, images/s (>= 1.5 CPU, issue 26; 1.3 before).
- p2_mixing: recon.train step time at --synthetic-ratio 0.3 (online) over 0 (<= 1.10, stall <= 1% of wall).
- p3_tas: sampling with TAS on the first k = steps/2 steps over without (<= 1.3).
- p4_render: hands.render over moderngl (EGL) for global + local mesh images, 16 samples at 256 px (<= 3.0 CPU).
- p6_generation: the mixing producer's images/s (SyntheticSource.generate, shipped generator) in the default
  mixing config over the issue-26-time behaviour (local branch rows sampled too, mesh images encoded every
  step), same size, steps and samples (>= 2.0).
- p7_train_step (CPU only, run when named: `--only p7`, about 12 min): InterWild's demo training step with both
  threads and channels-last over the demo as it ships (one thread), the step time issue 25's 40 mm in 15 minutes
  needs (<= 0.625; benchmarks.train_step).
- p5_sd15 (CUDA only, in the default set there): an SD1.5-sized random-initialised generator (UNet 320/640/1280/1280,
  ControlNet, VAE) at 512 px, 20 DDIM steps with guidance: images/s in the default mixing setting (mixing.dtype
  auto: bf16 / fp16) over fp32, ours over diffusers' pipeline in fp32 beside it.

A target that fails (an exception; e.g. no EGL for P4) is recorded with its error and the others still run; the
JSON and Markdown files are rewritten after every target, so a crash of the process keeps the finished ones.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from hands.paths import write_atomic

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ("p1", "p2", "p3", "p5", "p6", "p7", "p4")
NAMES = {"p1": "p1_sampler", "p2": "p2_mixing", "p3": "p3_tas", "p4": "p4_render", "p5": "p5_sd15", "p6": "p6_generation",
         "p7": "p7_train_step"}
TITLES = {
    "p1_sampler": "P1 sampler: ours / diffusers ControlNet pipeline (images/s)",
    "p2_mixing": "P2 training step: synthetic 0.3 online / 0",
    "p3_tas": "P3 sampling: TAS on first k steps / no TAS",
    "p4_render": "P4 mesh images: hands.render / moderngl (time)",
    "p5_sd15": "P5 SD1.5-sized sampler, 512 px: default mixing dtype / fp32 (images/s)",
    "p6_generation": "P6 mixing generator: default config / issue-time (local rows, per-step mesh encoding) (images/s)",
    "p7_train_step": "P7 InterWild demo step: 2 threads + channels-last / the demo's 1 thread (time)",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repetitions (a few minutes)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--only", help="comma-separated subset of p1,p2,p3,p4,p5,p6,p7 (default: p1-p4 and p6, with p5 on "
                        "CUDA; p7, about 12 min of training with both threads, only when named)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads, and llvmpipe's (LP_NUM_THREADS) for moderngl (default 1: the shared "
                             "2-core machine; P2's recon.train children use their profile's threads setting, P7's its own sides)")
    parser.add_argument("--p2-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra recon.train override for both sides of P2, e.g. mixing.max_reuse=8 (repeatable)")
    parser.add_argument("--out", help="JSON file to write (default: benchmarks/results/<device>.json)")
    args = parser.parse_args(argv)
    default = tuple(t for t in TARGETS if t != "p7" and (t != "p5" or args.device == "cuda"))
    only = [t.strip() for t in (args.only or ",".join(default)).split(",") if t.strip()]
    unknown = [t for t in only if t not in TARGETS]
    if unknown or not only:
        parser.error(f"--only: unknown target(s) {', '.join(unknown) or '(none given)'}; choose from {','.join(TARGETS)}")
    # p4 last: a torch.compile run after an EGL context was made segfaulted here (torch 2.14.1, Mesa 22.3)
    args.only = [t for t in TARGETS if t in only]
    if args.threads < 1:
        parser.error(f"--threads must be >= 1; got {args.threads}")
    return args


def settings_for(quick: bool, p2_set=(), device: str = "cpu"):
    from .mixing import MixingSettings
    from .render import RenderSettings
    from .generation import GenerationSettings
    from .sampler import SD15_SIZED, SamplerSettings
    from .train_step import TrainStepSettings

    if quick:
        sampler = SamplerSettings(size=64, batch=2, steps=10, tas_steps=5, repeats=3)
        sd15 = SamplerSettings(config="tiny", overrides=SD15_SIZED, size=256, batch=1, steps=4, repeats=1, compile=False)
        return (sampler, MixingSettings(steps=8, batch=8, repeats=1, overrides=p2_set), RenderSettings(repeats=3), sd15,
                GenerationSettings(repeats=1), TrainStepSettings(steps=8, repeats=1))
    # the tiny generator at its native 64 px (8 x 8 latents) and the mixing chunk of 8, as mixing runs it
    sampler = SamplerSettings(size=64, batch=8, steps=20, tas_steps=10, repeats=5)
    sd15 = SamplerSettings(config="tiny", overrides=SD15_SIZED, size=512, batch=4, steps=20, repeats=3, compile=False)
    if device == "cuda":  # make gpu-check: the 200-step online run of the issue, once per side
        return (sampler, MixingSettings(steps=200, batch=16, repeats=1, overrides=p2_set), RenderSettings(repeats=9),
                sd15, GenerationSettings(repeats=5), TrainStepSettings())
    return (sampler, MixingSettings(steps=32, batch=16, repeats=3, overrides=p2_set), RenderSettings(repeats=9), sd15,
            GenerationSettings(repeats=5), TrainStepSettings())


def markdown(report: dict) -> str:
    lines = [f"Benchmarks on {report['machine']['device']} ({report['machine']['cpu_count']} CPUs, torch "
             f"{report['machine']['torch']}, diffusers {report['machine']['diffusers']}), {report['date']}, load "
             f"average {report['load_average']['start']} -> {report['load_average']['end']}; `{report['command']}`",
             "", "| target | ratio | target | met | medians | peak memory (MiB; growth while running) |", "|---|---|---|---|---|---|"]
    for key, title in TITLES.items():
        entry = report.get(key)
        if entry is None:
            continue
        if "error" in entry:
            lines.append(f"| {title} | - | {entry['target']} | failed | {entry['error']} | - |")
            continue
        bound = (">= " if entry["better"] == "higher" else "<= ") + str(entry["target"])
        medians = entry.get("median_s") or entry.get("step_s_median")
        median_text = ", ".join(f"{n} {v:.3g} s" for n, v in medians.items())
        if key == "p2_mixing":
            bound += f", stall <= {entry['stall_target']:.0%}"
            median_text += f"; stall {entry['stall_fraction']:.1%} of the loop"
            if entry.get("steps_per_s"):
                median_text += "; steps/s " + ", ".join(f"{n} {v:.3g}" for n, v in entry["steps_per_s"].items())
            if entry.get("gpu_peak_mib"):
                median_text += "; GPU peak MiB " + ", ".join(f"{n} {v:.0f}" for n, v in entry["gpu_peak_mib"].items())
        if key == "p7_train_step":
            median_text += (f"; channels-last alone {entry['channels_last_ratio']:.2f}, 2 threads alone "
                            f"{entry['threads_ratio']:.2f}; steps in 15 min " +
                            ", ".join(f"{n} {v}" for n, v in entry["steps_for_15_min"].items()))
        if entry.get("images_per_s"):
            median_text += "; images/s " + ", ".join(f"{n} {v:.3g}" for n, v in entry["images_per_s"].items())
        growth = entry.get("peak_growth_mib", {})
        peak = ", ".join(f"{n} {v:.0f}" + (f" (+{growth[n]:.0f})" if n in growth else "")
                         for n, v in entry["peak_mib"].items())
        lines.append(f"| {title} | {entry['ratio']:.2f} | {bound} | {'yes' if entry['met'] else 'no'} | "
                     f"{median_text} | {peak} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["LP_NUM_THREADS"] = str(args.threads)  # llvmpipe reads it when the GL context is made
    import torch

    from .common import load_average, machine_info, now_utc

    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks.run: error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sampler, mixing, render, sd15, generation, train_step = settings_for(args.quick, list(args.p2_set), args.device)
    report = {
        "command": " ".join(["python -m benchmarks.run", shlex.join(sys.argv[1:] if argv is None else list(argv))]).strip(),
        "date": now_utc(), "quick": args.quick, "machine": machine_info(device),
        "lp_num_threads": args.threads, "load_average": {"start": load_average()},
    }
    from hands.provenance import code_version

    report.update(code_version())  # the commit measured (and whether the tree had changes)
    out = Path(args.out) if args.out else RESULTS / f"{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    failed = []
    for target in args.only:
        print(f"benchmarks: {NAMES[target]} ...", flush=True)
        try:
            entry = run_target(target, device, sampler=sampler, mixing=mixing, render=render, sd15=sd15,
                               generation=generation, train_step=train_step)
            print(f"benchmarks: {NAMES[target]} ratio {entry['ratio']} (target {entry['target']}, "
                  f"met {entry['met']})", flush=True)
        except Exception as error:  # one target failing (no EGL for P4, out of memory) keeps the others
            message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
            entry = {"error": message, "met": False, "target": TARGET_BOUNDS[target]}
            failed.append(NAMES[target])
            print(f"benchmarks: {NAMES[target]} failed: {message}", file=sys.stderr, flush=True)
        entry["load_average_after"] = load_average()
        report[NAMES[target]] = entry
        report["load_average"]["end"] = load_average()
        write_report(report, out)  # after every target: a crash later keeps these
    table = markdown(report)
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 1 if failed else 0


TARGET_BOUNDS = {"p1": ">= 1.5 (CPU), >= 2.0 (CUDA)", "p2": "<= 1.1, stall <= 1%", "p3": "<= 1.3", "p4": "<= 3.0",
                 "p5": ">= 2.0", "p6": ">= 2.0", "p7": "<= 0.625"}


def run_target(target: str, device, *, sampler, mixing, render, sd15, generation, train_step) -> dict:
    if target == "p1":
        from .sampler import run_p1

        return run_p1(sampler, device)
    if target == "p2":
        from .mixing import run_p2

        return run_p2(mixing, device)
    if target == "p3":
        from .sampler import run_p3

        return run_p3(sampler, device)
    if target == "p5":
        from .sampler import run_p5

        return run_p5(sd15, device)
    if target == "p6":
        from .generation import run_p6

        return run_p6(generation, device)
    if target == "p7":
        from .train_step import run_p7

        if device.type != "cpu":
            raise ValueError("P7 measures the CPU's threads and memory layout; run it with --device cpu")
        return run_p7(train_step)
    from .render import run_p4

    return run_p4(render, device)


def write_report(report: dict, out: Path) -> None:
    """The JSON and its Markdown table, each written whole (temporary file, then renamed)."""
    for path, text in ((out, json.dumps(report, indent=2) + "\n"), (out.with_suffix(".md"), markdown(report))):
        write_atomic(path, lambda tmp, text=text: Path(tmp).write_text(text))


if __name__ == "__main__":
    sys.exit(main())
