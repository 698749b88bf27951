import pytest
import torch

from mixing.mixer import Mixer, SyncProvider, batch_parts, batch_with_real, split_batch_size
from mixing.pool import SamplePool
from tests.fakes import fake_batch


def real_batches(n_batches, n_real):
    for k in range(n_batches):
        b = fake_batch(1000 + k * n_real, n_real, value=0.1)
        for m in b.meta:
            m["is_synthetic"] = False
        yield b


@pytest.mark.parametrize("batch_size,ratio,expected", [(8, 0.3, (6, 2)), (32, 0.3, (22, 10)), (5, 0.0, (5, 0)), (4, 0.5, (2, 2))])
def test_split_batch_size(batch_size, ratio, expected):
    assert split_batch_size(batch_size, ratio) == expected


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_split_batch_size_refuses_bad_ratio(ratio):
    with pytest.raises(ValueError, match="0 <= r < 1"):
        split_batch_size(8, ratio)


def test_batch_with_real_adds_the_nearest_count_to_share_r_and_is_a_share_batch_of_that_split():
    assert batch_with_real(16, 0.3) == 23  # 16 real + round(6.86) = 7 generated
    assert batch_with_real(4, 0.3) == 6 and batch_with_real(4, 0.5) == 8 and batch_with_real(4, 0.0) == 4
    assert batch_with_real(1, 0.5) == 2 and batch_with_real(8, 0.25) == 11  # 8 + round(2.67) = 3
    for n_real in range(1, 40):
        for ratio in (0.1, 0.25, 0.3, 0.5, 0.75, 0.9):
            batch = batch_with_real(n_real, ratio)
            assert abs((batch - n_real) - ratio * n_real / (1 - ratio)) <= 0.5
            assert split_batch_size(batch, ratio) == (n_real, batch - n_real)  # the share split of that batch
    with pytest.raises(ValueError, match="n_real must be >= 1"):
        batch_with_real(0, 0.3)


def test_batch_parts_share_counts_every_sample_add_counts_the_real_ones():
    assert batch_parts(16, 0.3) == batch_parts(16, 0.3, "share") == (11, 5)
    assert batch_parts(16, 0.3, "add") == (16, 7)  # the r = 0 run's 16 real images, 7 generated on top: 7/23 ~ 0.3
    assert batch_parts(16, 0.0, "add") == (16, 0)
    assert batch_parts(1, 0.5, "add") == (1, 1)  # share at batch 1 would give round(0.5) = 0 (half to even)
    assert batch_parts(8, 0.5, "add") == (8, 8) and batch_parts(8, 0.5) == (4, 4)
    with pytest.raises(ValueError, match="one of share, add"):
        batch_parts(16, 0.3, "extra")
    with pytest.raises(ValueError, match="0 <= r < 1"):
        batch_parts(16, 1.0, "add")


def test_every_batch_has_exactly_round_rB_synthetic_samples_online():
    n_real, n_syn = split_batch_size(8, 0.3)
    counter = iter(range(10**6))
    with SamplePool(lambda: fake_batch(next(counter) * 4, 4, value=0.9), capacity=8, max_reuse=2) as pool:
        batches = list(Mixer(real_batches(5, n_real), pool, n_synthetic=n_syn))
    assert len(batches) == 5
    for b in batches:
        assert len(b) == 8
        assert b.is_synthetic.sum().item() == 2
        # synthetic after real, images intact
        assert torch.all(b.image[-2:] == 0.9) and torch.all(b.image[:6] == 0.1)


def test_sync_provider_drops_nonfinite_and_preprocess_applies():
    calls = []

    def generate(n):
        calls.append(n)
        b = fake_batch(len(calls) * 100, n, value=0.9)
        if len(calls) == 1:
            b.image[0] = float("nan")
        return b

    def preprocess(b):
        b.image = b.image * 0.5
        return b

    provider = SyncProvider(generate)
    batches = list(Mixer(real_batches(2, 3), provider, n_synthetic=2, preprocess_synthetic=preprocess))
    assert calls[:2] == [2, 1]  # the NaN sample was replaced
    assert provider.stats()["dropped_nonfinite"] == 1
    assert all(torch.all(b.image[-2:] == 0.45) for b in batches)


def test_mismatched_synthetic_image_size_is_an_error():
    provider = SyncProvider(lambda n: fake_batch(0, n))
    real = fake_batch(0, 2)
    real.image = torch.zeros(2, 3, 16, 16)
    with pytest.raises(ValueError, match="preprocess_synthetic"):
        next(iter(Mixer([real], provider, n_synthetic=1)))
