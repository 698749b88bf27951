"""`python -m benchmarks.schedulers [--n 16] [--steps 8,10] [--repeats 3] [--device cpu|cuda] [--out FILE]`

Few-step schedulers for the mixing sampler (`mixing.scheduler`, `mixing.num_inference_steps`) against the
reference's 20-step DDIM, on the shipped generator (configs/generator/tiny-synthlab.yaml): the global mesh images
and captions of `--n` synthlab test-wild samples framed as the generator was trained, the same starting latents
for every scheduler, the generator config's guidance. For each scheduler and step count: the images' agreement
with DDIM-20 (PSNR on [0, 1], mean and max absolute difference) and images/s over DDIM-20's (medians of
interleaved repetitions, benchmarks.common). For scale, the agreement of two DDIM-20 runs from different latents
(unrelated images of the same meshes) is reported beside it.

Writes benchmarks/results/schedulers-<device>.json (or --out) and a Markdown table next to it (.md), also printed.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

import torch

from hands.paths import write_atomic

from .common import interleaved, load_average, machine_info, now_utc

RESULTS = Path(__file__).resolve().parent / "results"
SCHEDULERS = {"ddim": "DDIMScheduler", "dpm++": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler"}
REFERENCE = ("ddim", 20)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.schedulers", description=__doc__.split("\n\n")[1])
    parser.add_argument("--n", type=int, default=16, help="mesh images (synthlab test-wild samples), one batch")
    parser.add_argument("--steps", default="8,10", help="comma-separated step counts for each scheduler")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per variant (interleaved)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the shared machine)")
    parser.add_argument("--out", help="JSON file (default: benchmarks/results/schedulers-<device>.json)")
    args = parser.parse_args(argv)
    try:
        args.steps = sorted({int(s) for s in args.steps.split(",") if s.strip()})
    except ValueError:
        parser.error(f"--steps {args.steps!r}: expected comma-separated integers, e.g. 8,10")
    if not args.steps or min(args.steps) < 1:
        parser.error("--steps: expected positive step counts")
    for key in ("n", "repeats", "threads"):
        if getattr(args, key) < 1:
            parser.error(f"--{key} must be >= 1; got {getattr(args, key)}")
    return args


def conditions(n: int):
    """Global mesh images and captions of n synthlab test-wild samples in the shipped generator's framing."""
    from generator.model import load_config
    from generator.train import FramedDataset, make_train_batch
    from hands.datasets import build_dataset
    from hands.mano import HandModel

    model = HandModel()
    cfg = load_config("tiny-synthlab")
    data = FramedDataset(build_dataset("synthlab", None, "test-wild", hand_model=model), 64, cfg.extend, cfg.framing)
    if len(data) < n:
        raise SystemExit(f"benchmarks.schedulers: --n {n}: synthlab test-wild has {len(data)} samples")
    step = len(data) // n
    batch = make_train_batch([data[i * step] for i in range(n)], model.faces_for("right"), model.faces_for("left"))
    return batch.mesh, list(batch.prompts)


def agreement(images: torch.Tensor, reference: torch.Tensor) -> dict:
    """PSNR (dB, on [0, 1], of the whole batch's mean squared error), mean and max absolute difference."""
    diff = (images.float() - reference.float()).abs()
    mse = float((diff**2).mean())
    return {"psnr_db": round(10 * math.log10(1.0 / mse), 2) if mse > 0 else float("inf"),
            "mean_abs_diff": round(float(diff.mean()), 4), "max_abs_diff": round(float(diff.max()), 4)}


def run(args: argparse.Namespace) -> dict:
    import diffusers

    from generator.model import load_config
    from generator.pipeline import AttentionHandPipeline

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    config = load_config("tiny-synthlab")
    pipe = AttentionHandPipeline.from_config(config).to(device)
    mesh, prompts = conditions(args.n)
    mesh = mesh.to(device)
    latent = mesh.shape[-1] // pipe.vae_scale_factor
    shape = (args.n, pipe.unet.config.in_channels, latent, latent)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    other_noise = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(device)
    schedulers = {name: getattr(diffusers, cls).from_config(pipe.scheduler.config) for name, cls in SCHEDULERS.items()}

    def sampler(name: str, steps: int, latents=noise):
        def call():
            pipe.scheduler = schedulers[name]  # the pipeline copies its scheduler per call
            return pipe(mesh, None, prompts, num_inference_steps=steps, latents=latents).images
        return call

    variants = {f"{REFERENCE[0]}-{REFERENCE[1]}": sampler(*REFERENCE)}
    for name in SCHEDULERS:
        for steps in args.steps:
            if (name, steps) != REFERENCE:
                variants[f"{name}-{steps}"] = sampler(name, steps)
    reference_key = f"{REFERENCE[0]}-{REFERENCE[1]}"
    with torch.inference_mode():
        images = {key: call() for key, call in variants.items()}
        unrelated = sampler(*REFERENCE, latents=other_noise)()
        timings = interleaved(variants, args.repeats, device)
    base_ips = args.n / timings.median(reference_key)
    rows = {}
    for key in variants:
        name, steps = key.rsplit("-", 1)
        ips = args.n / timings.median(key)
        rows[key] = {"scheduler": SCHEDULERS[name], "steps": int(steps), "images_per_s": round(ips, 2),
                     "speedup_vs_ddim20": round(ips / base_ips, 2), "median_s": round(timings.median(key), 4),
                     "seconds": [round(s, 4) for s in timings.seconds[key]],
                     "vs_ddim20": agreement(images[key], images[reference_key])}
    return {
        "what": "few-step schedulers vs 20-step DDIM on the shipped generator (tiny-synthlab, 64 px, global branch, "
                f"guidance {config.sampling.guidance_scale}), {args.n} synthlab test-wild meshes, same latents",
        "device": str(device), "machine": machine_info(device), "date": now_utc(),
        "command": "python -m benchmarks.schedulers " + shlex.join(sys.argv[1:]),
        "load_average_start": args.load_start, "load_average_end": load_average(), "repeats": args.repeats,
        "variants": rows, "ddim20_other_latents": agreement(unrelated, images[reference_key]),
    }


def markdown(result: dict) -> str:
    lines = [f"Few-step schedulers on {result['device']}, {result['date']}, load average "
             f"{result['load_average_start']} -> {result['load_average_end']}; `{result['command']}`", "",
             result["what"] + ".", "",
             "| scheduler | steps | PSNR vs DDIM-20 (dB) | mean abs diff | max abs diff | images/s | x DDIM-20 |",
             "|---|---|---|---|---|---|---|"]
    for row in result["variants"].values():
        a = row["vs_ddim20"]
        lines.append(f"| {row['scheduler']} | {row['steps']} | {a['psnr_db']} | {a['mean_abs_diff']} | "
                     f"{a['max_abs_diff']} | {row['images_per_s']} | {row['speedup_vs_ddim20']} |")
    u = result["ddim20_other_latents"]
    lines += ["", f"For scale, DDIM-20 from other latents (unrelated images of the same meshes): PSNR {u['psnr_db']} "
                  f"dB, mean abs diff {u['mean_abs_diff']}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    args.load_start = load_average()
    result = run(args)
    out = Path(args.out) if args.out else RESULTS / f"schedulers-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    write_atomic(out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    write_atomic(out.with_suffix(".md"), lambda tmp: Path(tmp).write_text(text))
    print(text)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
