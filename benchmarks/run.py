"""`python -m benchmarks.run [--quick] [--device cpu|cuda] [--only p1,p4] [--threads N] [--out FILE]`

Runs the performance targets of issue 10 and writes `benchmarks/results/<device>.json` (or --out) and a Markdown
table next to it (same name, .md), also printed. Every figure is a ratio of medians over interleaved repetitions
in this one run (see benchmarks.common); the JSON records the machine, versions, load average, command and date.

- p1_sampler: our AttentionHandPipeline over diffusers' StableDiffusionControlNetPipeline, images/s (>= 1.3 CPU).
- p2_mixing: recon.train step time at --synthetic-ratio 0.3 (online) over 0 (<= 1.10, stall <= 1% of wall).
- p3_tas: sampling with TAS on the first k = steps/2 steps over without (<= 1.3).
- p4_render: hands.render over moderngl (EGL) for global + local mesh images, 16 samples at 256 px (<= 3.0 CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ("p1", "p2", "p3", "p4")
NAMES = {"p1": "p1_sampler", "p2": "p2_mixing", "p3": "p3_tas", "p4": "p4_render"}
TITLES = {
    "p1_sampler": "P1 sampler: ours / diffusers ControlNet pipeline (images/s)",
    "p2_mixing": "P2 training step: synthetic 0.3 online / 0",
    "p3_tas": "P3 sampling: TAS on first k steps / no TAS",
    "p4_render": "P4 mesh images: hands.render / moderngl (time)",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repetitions (a few minutes)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--only", default=",".join(TARGETS), help="comma-separated subset of p1,p2,p3,p4")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads, and llvmpipe's (LP_NUM_THREADS) for moderngl (default 1: the shared "
                             "2-core machine; P2's recon.train children use their profile's threads setting)")
    parser.add_argument("--p2-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra recon.train override for both sides of P2, e.g. mixing.max_reuse=8 (repeatable)")
    parser.add_argument("--out", help="JSON file to write (default: benchmarks/results/<device>.json)")
    args = parser.parse_args(argv)
    only = [t.strip() for t in args.only.split(",") if t.strip()]
    unknown = [t for t in only if t not in TARGETS]
    if unknown or not only:
        parser.error(f"--only: unknown target(s) {', '.join(unknown) or '(none given)'}; choose from {','.join(TARGETS)}")
    # p4 last: a torch.compile run after an EGL context was made segfaulted here (torch 2.14.1, Mesa 22.3)
    args.only = [t for t in TARGETS if t in only]
    if args.threads < 1:
        parser.error(f"--threads must be >= 1; got {args.threads}")
    return args


def settings_for(quick: bool, p2_set=()):
    from .mixing import MixingSettings
    from .render import RenderSettings
    from .sampler import SamplerSettings

    if quick:
        sampler = SamplerSettings(size=64, batch=2, steps=10, tas_steps=5, repeats=3)
        return sampler, MixingSettings(steps=8, batch=8, repeats=1, overrides=p2_set), RenderSettings(repeats=3)
    # the tiny generator at its native 64 px (8 x 8 latents) and the mixing chunk of 8, as mixing runs it
    sampler = SamplerSettings(size=64, batch=8, steps=20, tas_steps=10, repeats=5)
    return sampler, MixingSettings(steps=32, batch=16, repeats=3, overrides=p2_set), RenderSettings(repeats=9)


def markdown(report: dict) -> str:
    lines = [f"Benchmarks on {report['machine']['device']} ({report['machine']['cpu_count']} CPUs, torch "
             f"{report['machine']['torch']}, diffusers {report['machine']['diffusers']}), {report['date']}, load "
             f"average {report['load_average']['start']} -> {report['load_average']['end']}; `{report['command']}`",
             "", "| target | ratio | target | met | medians | peak memory (MiB; growth while running) |", "|---|---|---|---|---|---|"]
    for key, title in TITLES.items():
        entry = report.get(key)
        if entry is None:
            continue
        bound = (">= " if entry["better"] == "higher" else "<= ") + str(entry["target"])
        medians = entry.get("median_s") or entry.get("step_s_median")
        median_text = ", ".join(f"{n} {v:.3g} s" for n, v in medians.items())
        if key == "p2_mixing":
            bound += f", stall <= {entry['stall_target']:.0%}"
            median_text += f"; stall {entry['stall_fraction']:.1%} of the loop"
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
    sampler, mixing, render = settings_for(args.quick, list(args.p2_set))
    report = {
        "command": " ".join(["python -m benchmarks.run", shlex.join(sys.argv[1:] if argv is None else list(argv))]).strip(),
        "date": now_utc(), "quick": args.quick, "machine": machine_info(device),
        "lp_num_threads": args.threads, "load_average": {"start": load_average()},
    }
    for target in args.only:
        print(f"benchmarks: {NAMES[target]} ...", flush=True)
        if target == "p1":
            from .sampler import run_p1

            entry = run_p1(sampler, device)
        elif target == "p2":
            from .mixing import run_p2

            entry = run_p2(mixing)
        elif target == "p3":
            from .sampler import run_p3

            entry = run_p3(sampler, device)
        else:
            from .render import run_p4

            entry = run_p4(render, device)
        entry["load_average_after"] = load_average()
        report[NAMES[target]] = entry
        print(f"benchmarks: {NAMES[target]} ratio {entry['ratio']} (target {entry['target']}, "
              f"met {entry['met']})", flush=True)
    report["load_average"]["end"] = load_average()
    out = Path(args.out) if args.out else RESULTS / f"{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
