"""The GPU code paths, checked on the CPU with a fake CUDA device (tests/fake_cuda.py): the augmentation of
generated samples on the device, the sample pool's streams, the sampler, and recon.train's step with online
mixing. Zero device mismatches, zero cross-stream hazards, and a handful of host syncs per training step."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from hands.datasets.transforms import InterWildAugment
from tests.fake_cuda import fake_cuda, report
from tests.recon_helpers import GEN, run_args, write_tiny_synthlab

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
HAZARDS = ("mismatch", "cpu0d", "generator", "race", "xstream")


@pytest.fixture(scope="module")
def synthlab_root(tmp_path_factory):
    return write_tiny_synthlab(tmp_path_factory.mktemp("synthlab_fake_cuda"))


@pytest.fixture(scope="module")
def batch(synthlab_root):
    from hands.datasets.synthlab import SynthLab
    from hands.sample import collate

    reader = SynthLab(synthlab_root, split="train-lab")
    return collate([reader[i] for i in range(4)])


def test_the_harness_sees_a_cpu_constant_a_cpu_generator_and_an_unordered_stream(batch):
    """Negative controls: what the other tests assert absent is seen when present."""
    with fake_cuda() as fake:
        image = batch.image.to("cuda:0")
        _ = image * torch.tensor([0.5, 1.0, 2.0]).reshape(1, 3, 1, 1)  # a CPU constant (the old colour factors)
        torch.randn(3, device="cuda:0", generator=torch.Generator().manual_seed(0))
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            made = image * 2
        _ = made + 1  # read on the default stream: no wait, no record_stream
        float(image.sum())
    assert fake.events["mismatch"] and fake.events["generator"]
    assert fake.events["race"] and fake.events["xstream"]
    assert fake.syncs["MainThread"] == 1


@pytest.mark.parametrize("box", ["image", "hands"])
def test_augmenting_on_the_device_mixes_no_cpu_tensor_and_does_not_sync(batch, box):
    augment = InterWildAugment((64, 48), box=box, rot_prob=1.0, flip_prob=1.0)
    params = augment.draw(torch.Generator().manual_seed(1))  # drawn on the host, as per_sample_preprocess does
    expected = augment.apply(batch.unbind()[0], params)
    with fake_cuda() as fake:
        sample = batch.to("cuda:0").unbind()[0]
        out = augment.apply(sample, params)
        assert out.image.device.type == "meta"  # the fake device
        got = out.image.elem.clone()
        got_joints = out.right.joints_img.elem.clone()
    assert report(fake, HAZARDS) == ""
    assert fake.syncs["MainThread"] == 0, fake.events["sync"]
    torch.testing.assert_close(got, expected.image)
    torch.testing.assert_close(got_joints, expected.right.joints_img)


def test_the_pool_orders_its_streams_and_records_its_chunks(batch):
    from mixing.pool import SamplePool

    with fake_cuda() as fake:
        weights = torch.ones(3, 1, 1, device="cuda:0")  # made on the default stream, read by the producer
        source = batch.to("cuda:0")

        def produce():
            return dataclasses.replace(source, image=source.image * weights)

        with SamplePool(produce, capacity=8, max_reuse=2, device="cuda:0", resident=[weights, source.image]) as pool:
            pool.prime(4)
            for _ in range(4):
                taken = pool.take(3)
                _ = taken.image.sum(dim=0) + 1  # the trainer reads them on its stream
    assert report(fake, HAZARDS) == ""
    assert fake.syncs["MainThread"] == 0, fake.events["sync"]


def test_under_the_trainers_stream_the_producer_waits_for_the_weights_and_has_the_lower_priority(batch):
    """recon.train builds the generator and the pool on its high-priority stream (mixing.pool.trainer_stream):
    the producer orders itself after that stream (not its own thread's default one) and runs below it."""
    from mixing.pool import SamplePool, trainer_stream

    with fake_cuda() as fake:
        source = batch.to("cuda:0")
        with trainer_stream("cuda:0") as trainer:
            weights = torch.ones(3, 1, 1, device="cuda:0") * 2  # written on the trainer's stream

            def produce():
                return dataclasses.replace(source, image=source.image * weights)

            with SamplePool(produce, capacity=8, max_reuse=2, device="cuda:0", resident=[weights, source.image]) as pool:
                pool.prime(4)
                _ = pool.take(4).image.sum() + 1
                stats = pool.stats()
        after = torch.zeros(1, device="cuda:0") + 1  # back on the default stream, after the trainer's work
    assert report(fake, HAZARDS) == ""
    assert trainer.priority < fake.default.priority == 0
    assert stats["producer_stream_priority"] == 0 and stats["trainer_stream_priority"] == trainer.priority
    assert stats["generator_mib"] == pytest.approx((weights.nbytes + source.image.nbytes) / 2**20)
    assert {"producer_reserved_mib", "producer_allocated_mib"} <= set(stats)
    del after


def test_a_pool_chunk_read_without_its_event_is_caught(batch):
    """The harness sees a chunk read on the trainer's stream with no wait and no record_stream (the old take())."""
    from mixing.pool import SamplePool

    with fake_cuda() as fake:
        source = batch.to("cuda:0")
        with SamplePool(lambda: source.select(slice(0, 4)), capacity=4, max_reuse=1, device="cuda:0") as pool:
            pool.prime(4)
            pool._chunks[0].event = None  # take() then neither waits on it nor records it
            _ = pool.take(2).image + 1
    assert fake.events["xstream"]


def test_the_sampler_runs_on_the_device_without_cpu_tensors():
    from generator.model import build_components, load_config
    from generator.pipeline import AttentionHandPipeline

    config = load_config("tiny-synthlab")
    components = build_components(config)  # weights load on the host, outside the fake device
    pipe = AttentionHandPipeline.from_components(components, attention_downsample=config.attention_downsample,
                                                 sampling=config.sampling)
    size = pipe.default_size
    mesh = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with fake_cuda() as fake:
        pipe.to("cuda:0")
        generators = [torch.Generator("cuda:0").manual_seed(i) for i in range(2)]
        out = pipe(mesh.to("cuda:0"), mesh.to("cuda:0"), ["a photo of two hands", "a hand"], generator=generators,
                   num_inference_steps=2, tas_steps=1)
        assert out.images.shape == (2, 3, size, size)
    assert report(fake, HAZARDS) == ""
    assert fake.syncs["MainThread"] <= 3, fake.events["sync"]  # the input range check and the timesteps, once


@pytest.mark.parametrize("scheduler", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_the_few_step_schedulers_sample_on_the_device_without_cpu_tensors(scheduler):
    import diffusers

    from generator.model import build_components, load_config
    from generator.pipeline import AttentionHandPipeline

    config = load_config("tiny-synthlab")
    components = build_components(config)
    pipe = AttentionHandPipeline.from_components(components, sampling=config.sampling)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    mesh = torch.rand(2, 3, pipe.default_size, pipe.default_size, generator=torch.Generator().manual_seed(0))
    with fake_cuda() as fake:
        pipe.to("cuda:0")
        out = pipe(mesh.to("cuda:0"), None, "a photo of two hands", num_inference_steps=3,
                   generator=torch.Generator("cuda:0").manual_seed(0))
        assert torch.isfinite(out.images.elem).all()
    assert report(fake, HAZARDS) == ""
    # the input check and the timesteps before the loop, the step index found once; UniPC's linalg.solve adds an
    # error check per corrector step (in mixing all of them are on the producer's thread, not the trainer's)
    assert fake.syncs["MainThread"] <= (4 if scheduler.startswith("DPM") else 3 + 3), fake.events["sync"]


def test_a_training_step_with_online_mixing_is_device_clean_and_syncs_a_handful_of_times(synthlab_root, tmp_path, monkeypatch):
    import generator.model as generator_model
    import generator.pipeline as generator_pipeline
    from recon import train as recon_train

    template = generator_model.load_config("tiny-synthlab")
    on_host = generator_model.build_components(template)

    def build_on_host(config):  # weights load on the host; the fake device gets a copy (.to(device) in mixing)
        assert config.sd_path == template.sd_path  # the shipped tiny generator, whatever its sampling settings
        return copy.deepcopy(on_host)

    monkeypatch.setattr(generator_model, "build_components", build_on_host)
    monkeypatch.setattr(generator_pipeline, "build_components", build_on_host)
    steps = []
    real_step = torch.optim.Adam.step

    def counted_step(self, *args, **kwargs):
        steps.append(fake.syncs["MainThread"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", counted_step)
    args = run_args(synthlab_root, tmp_path / "run", "--synthetic-ratio", "0.5", "--max-steps", "4", "--device", "cuda:0",
                    "eval.at_end=false", "train.average_last=1", *GEN)  # the steps; no averaged weights at the end
    with fake_cuda() as fake:
        result = recon_train.train(recon_train.parse_args(args))
    assert result["step"] == 4 and result["mixing"]["taken"] == 4 * 2
    assert result["mixing"]["producer_stream_priority"] > result["mixing"]["trainer_stream_priority"]
    assert report(fake, HAZARDS) == ""
    per_step = (steps[3] - steps[1]) / 2  # steps 2 and 3: warm, no checkpoint, no image grid
    assert per_step <= 2, sorted(fake.events["sync"].items(), key=lambda kv: -kv[1])[:12]


def test_an_interwild_step_on_the_device_needs_no_host_sync(synthlab_root, batch):
    """InterWild's forward, losses and backward on the fake device: no CPU tensor, no sync (its MANO calls, the
    virtual camera's inverse, the box stride and its constants were the syncs and blocking copies)."""
    from recon.registry import build_regressor, load_builtin_regressors
    from tests.test_recon_interwild import TINY

    load_builtin_regressors()
    torch.manual_seed(0)
    model = build_regressor("interwild", **{**TINY, "body_input_size": (32, 32), "hand_input_size": 32})
    with fake_cuda() as fake:
        model.to("cuda:0").train()
        device_batch = batch.to("cuda:0")
        for _ in range(2):  # the second step: constants and the MANO layer already on the device
            before = fake.syncs["MainThread"]
            h2d = sum(fake.events["h2d"].values())
            losses = model.losses(model(device_batch), device_batch)
            sum(losses.values()).backward()
    assert report(fake, HAZARDS) == ""
    assert fake.syncs["MainThread"] == before, fake.events["sync"]
    assert sum(fake.events["h2d"].values()) == h2d, fake.events["h2d"]


@pytest.mark.parametrize("name", ["intaghand", "dir", "internet"])
def test_the_other_regressors_augmentations_on_the_device_mix_no_cpu_tensor(batch, name):
    """IntagHand's, DIR's and InterNet's augmentations, as mixing applies them to generated samples on the device
    (mixing.build), with their parameters drawn on the host: no CPU tensor in a device op (IntagHand's colour
    factors were one), the same image as on the CPU. Their vertex box reads validity flags from the host (syncs)."""
    from recon.archs.dir.augment import DIRAugment
    from recon.archs.intershape.augment import InterNetAugment
    from hands.datasets.transforms import IntagHandAugment

    augment = {"intaghand": lambda: IntagHandAugment((32, 32)), "dir": lambda: DIRAugment((32, 32), box="verts"),
               "internet": lambda: InterNetAugment((32, 32), box="hands")}[name]()
    params = augment.draw(torch.Generator().manual_seed(3))
    expected = augment.apply(batch.unbind()[0], params)
    with fake_cuda() as fake:
        out = augment.apply(batch.to("cuda:0").unbind()[0], params)
        assert out.image.device.type == "meta"  # the fake device
        got = out.image.elem.clone()
    assert report(fake, HAZARDS) == ""
    torch.testing.assert_close(got, expected.image)


def test_intaghands_vertex_crop_on_the_device_mixes_no_cpu_tensor(batch):
    """vertex_box (IntagHand's and DIR's input box) keeps its box on the sample's device, the no-hand fallback
    included; what it reads from the host is only the per-hand validity flags."""
    import dataclasses as dc

    from hands.datasets.transforms import crop_to_vertices, vertex_box

    sample = batch.unbind()[0]
    no_hand = dc.replace(sample, right=dc.replace(sample.right, valid=torch.tensor(False)),
                         left=dc.replace(sample.left, valid=torch.tensor(False)))
    expected = crop_to_vertices(sample, (32, 32))
    with fake_cuda() as fake:
        out = crop_to_vertices(sample.to("cuda:0"), (32, 32))
        got = out.image.elem.clone()
        fallback = vertex_box(no_hand.to("cuda:0"))
        assert fallback.device.type == "meta"
    assert report(fake, HAZARDS) == ""
    torch.testing.assert_close(got, expected.image)
