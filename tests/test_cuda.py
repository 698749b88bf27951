"""On a real CUDA device (marked cuda: skipped without one; `make gpu-check` runs them): augmentation on the device
equals the CPU's, the pool under stress hands out uncorrupted samples, pinned batches, the sampler in fp32 / fp16 /
bf16 and compiled, and recon.train with online mixing, mixed precision and channels-last, with its host syncs per
step counted by CUDA's own sync debug mode."""
from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

from tests.recon_helpers import GEN, run_args, write_tiny_synthlab

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def synthlab_root(tmp_path_factory):
    return write_tiny_synthlab(tmp_path_factory.mktemp("synthlab_cuda"))


@pytest.fixture(scope="module")
def batch(synthlab_root):
    from hands.datasets.synthlab import SynthLab
    from hands.sample import collate

    reader = SynthLab(synthlab_root, split="train-lab")
    return collate([reader[i] for i in range(4)])


@pytest.mark.parametrize("box", ["image", "hands"])
def test_augmentation_on_the_gpu_equals_the_cpu(batch, box):
    from hands.datasets.transforms import InterWildAugment

    augment = InterWildAugment((64, 48), box=box, rot_prob=1.0, flip_prob=1.0)
    for i, sample in enumerate(batch.unbind()):
        params = augment.draw(torch.Generator().manual_seed(i))
        cpu = augment.apply(sample, params)
        gpu = augment.apply(batch.to("cuda").unbind()[i], params)
        assert gpu.image.is_cuda and gpu.right.joints_img.is_cuda
        torch.testing.assert_close(gpu.image.cpu(), cpu.image, atol=1e-4, rtol=0)
        torch.testing.assert_close(gpu.right.joints_img.cpu(), cpu.right.joints_img, atol=1e-3, rtol=0)


def test_the_pool_under_stress_hands_out_uncorrupted_samples(batch):
    """Every produced image is filled with its sample's number on the producer's stream; whatever the allocator
    does with freed chunks, each taken image must still hold its own number only."""
    from mixing.pool import SamplePool

    template = batch.to("cuda").select([0, 1, 2, 3])
    counter = {"n": 0}

    def produce():
        start = counter["n"]
        counter["n"] += 4
        ids = torch.arange(start, start + 4, device="cuda", dtype=torch.float32)
        image = ids[:, None, None, None].expand_as(template.image).clone()
        torch.cuda._sleep(1_000_000)  # a slow kernel on the producer's stream: reads before it ends would see junk
        meta = [dict(m, id=str(start + k)) for k, m in enumerate(template.meta)]
        return dataclasses.replace(template, image=image, meta=meta)

    with SamplePool(produce, capacity=16, max_reuse=2, device="cuda") as pool:
        pool.prime(8)
        for _ in range(200):
            taken = pool.take(4)
            junk = torch.randn(64, 1024, 1024, device="cuda")  # churn the allocator on the trainer's stream
            expected = torch.tensor([float(m["id"]) for m in taken.meta], device="cuda")
            assert torch.equal(taken.image.amin((1, 2, 3)), expected) and torch.equal(taken.image.amax((1, 2, 3)), expected)
            del junk
    torch.cuda.synchronize()


def test_a_pinned_batch_copies_asynchronously(batch):
    pinned = batch.pin_memory()
    assert all(t.is_pinned() for t in pinned.tensors())
    moved = pinned.to("cuda", non_blocking=True)
    torch.testing.assert_close(moved.image.cpu(), batch.image)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_the_sampler_in_each_dtype_gives_finite_images_close_to_fp32(dtype):
    from generator.model import build_components, load_config
    from generator.pipeline import AttentionHandPipeline

    config = load_config("tiny-synthlab")

    def pipe():
        return AttentionHandPipeline.from_components(build_components(config).to("cuda"),
                                                     attention_downsample=config.attention_downsample,
                                                     sampling=config.sampling)

    reference, tested = pipe(), pipe().optimize(dtype=dtype, channels_last=True)
    size = reference.default_size
    mesh = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)).cuda()
    prompts = ["a photo of two hands", "a hand"]

    def run(p):
        return p(mesh, mesh, prompts, num_inference_steps=4, tas_steps=2,
                 generator=[torch.Generator("cuda").manual_seed(i) for i in range(2)])

    a, b = run(reference), run(tested)
    assert b.images.dtype == b.tas_losses.dtype == torch.float32 and torch.isfinite(b.images).all()
    assert (a.images - b.images).abs().mean() < 0.02


@pytest.mark.parametrize("mode", [True, "reduce-overhead"])  # reduce-overhead: CUDA graphs of the static steps
def test_the_compiled_sampler_agrees_with_eager(mode):
    from generator.model import build_components, load_config
    from generator.pipeline import AttentionHandPipeline

    config = load_config("tiny-synthlab")
    components = build_components(config).to("cuda")
    eager = AttentionHandPipeline.from_components(components, attention_downsample=config.attention_downsample,
                                                  sampling=config.sampling)
    compiled = AttentionHandPipeline.from_components(components, attention_downsample=config.attention_downsample,
                                                     sampling=config.sampling).optimize(compile=mode)
    mesh = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)).cuda()
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1)).cuda()
    a = eager(mesh, mesh, ["two hands", "a hand"], num_inference_steps=4, latents=noise).images
    b = compiled(mesh, mesh, ["two hands", "a hand"], num_inference_steps=4, latents=noise).images
    c = compiled(mesh, mesh, ["two hands", "a hand"], num_inference_steps=4, latents=noise).images  # replayed
    torch.testing.assert_close(b, a, atol=2e-3, rtol=0)
    torch.testing.assert_close(c, b, atol=1e-5, rtol=0)


def test_training_with_online_mixing_amp_and_channels_last_syncs_a_handful_of_times_per_step(synthlab_root, tmp_path,
                                                                                           monkeypatch):
    import threading

    from recon import train as recon_train

    trainer_syncs, marks = [], []

    def hook(message, category, filename, lineno, file=None, line=None):  # CUDA's sync debug mode warns per sync
        if "synchroniz" in str(message) and threading.current_thread().name == "MainThread":
            trainer_syncs.append(f"{filename}:{lineno}")

    real_step = torch.optim.Adam.step

    def counted_step(self, *args, **kwargs):
        marks.append(len(trainer_syncs))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", counted_step)
    out = tmp_path / "run"
    args = run_args(synthlab_root, out, "--synthetic-ratio", "0.5", "--max-steps", "6", "--device", "cuda",
                    "train.amp=auto", "train.channels_last=true", *GEN)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = hook
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = recon_train.train(recon_train.parse_args(args))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert result["step"] == 6 and result["mixing"]["taken"] == 12
    mixing = result["mixing"]  # the producer's stream below the trainer's; its memory read from the allocator
    assert mixing["producer_stream_priority"] > mixing["trainer_stream_priority"]
    assert mixing["producer_reserved_mib"] > 0 and mixing["pool_peak_mib"] > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(v["MPVPE"] > 0 for v in metrics.values() if isinstance(v, dict) and "MPVPE" in v)
    per_step = (marks[5] - marks[2]) / 3  # steps 3-5: warm, no checkpoint, no image grid
    assert per_step <= 3, trainer_syncs[marks[2]:marks[5]]
