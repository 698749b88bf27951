import threading
import time

import pytest
import torch

from mixing.pool import ProducerError, SamplePool
from tests.fakes import fake_batch


class Counter:
    def __init__(self, chunk=4):
        self.next = 0
        self.chunk = chunk
        self.lock = threading.Lock()

    def __call__(self):
        with self.lock:
            start = self.next
            self.next += self.chunk
        return fake_batch(start, self.chunk)


def test_take_returns_fresh_samples_first_and_respects_capacity():
    with SamplePool(Counter(), capacity=8, max_reuse=2, seed=0) as pool:
        first = pool.take(4, timeout=10)
        assert len(first) == 4
        time.sleep(0.2)
        assert len(pool) <= 8
        ids = [m["id"] for m in first.meta]
        assert len(set(ids)) == 4
        stats = pool.stats()
        assert stats["fresh_fraction"] == 1.0
        assert stats["taken"] == 4


def test_max_reuse_evicts_and_counts_reuse():
    produced = []

    def produce():
        if produced:  # one chunk only, then empty chunks
            time.sleep(0.05)
            return fake_batch(100, 1).select([])
        produced.append(1)
        return fake_batch(0, 4)

    with SamplePool(produce, capacity=4, max_reuse=2, seed=0) as pool:
        a = pool.take(4, timeout=10)
        b = pool.take(4, timeout=10)
        assert sorted(m["id"] for m in a.meta) == sorted(m["id"] for m in b.meta)
        assert len(pool) == 0  # each sample drawn max_reuse = 2 times has left
        stats = pool.stats()
        assert stats["reuse_histogram"] == {"0": 4, "1": 4}
        assert stats["mean_reuse"] == 0.5
        assert stats["evicted"] == 4
        with pytest.raises(TimeoutError):
            pool.take(1, timeout=0.3)


def test_nonfinite_images_are_dropped_and_counted():
    calls = []

    def produce():
        calls.append(1)
        b = fake_batch(len(calls) * 10, 4)
        b.image[1] = float("nan")
        return b

    with SamplePool(produce, capacity=6, max_reuse=1) as pool:
        got = pool.take(6, timeout=10)
        assert torch.isfinite(got.image).all()
        assert pool.stats()["dropped_nonfinite"] >= 2


def test_producer_exception_surfaces_in_take_with_its_cause():
    def produce():
        raise KeyError("generator exploded")

    pool = SamplePool(produce, capacity=4)
    with pytest.raises(ProducerError, match="generator exploded") as info:
        pool.take(2, timeout=10)
    assert isinstance(info.value.__cause__, KeyError)
    pool.close()


def test_close_joins_the_producer_and_take_after_close_fails():
    pool = SamplePool(Counter(), capacity=4)
    pool.take(2, timeout=10)
    pool.close()
    assert pool._thread is None
    # what is left can still be drained; then take says the producer is gone instead of hanging
    with pytest.raises(ProducerError, match="not running"):
        for _ in range(4 * pool.max_reuse + 1):
            pool.take(1, timeout=1)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="capacity"):
        SamplePool(Counter(), capacity=0, start=False)
    with pytest.raises(ValueError, match="max_reuse"):
        SamplePool(Counter(), max_reuse=0, start=False)
    with SamplePool(Counter(), capacity=4) as pool:
        with pytest.raises(ValueError, match="at most 4"):
            pool.take(5)


def test_prime_waits_for_the_first_samples_without_counting_stall():
    def slow():
        time.sleep(0.3)
        return fake_batch(0, 4)

    with SamplePool(slow, capacity=4, max_reuse=1) as pool:
        waited = pool.prime(2, timeout=10)
        assert waited > 0.1 and len(pool) >= 2
        pool.take(2, timeout=10)
        stats = pool.stats()
        assert stats["prime_s"] == waited and stats["trainer_stall_s"] < 0.05


def test_a_generator_that_only_makes_nonfinite_images_fails_take_instead_of_hanging():
    def broken():
        batch = fake_batch(0, 2)
        batch.image[:] = float("nan")
        return batch

    with SamplePool(broken, capacity=4, max_reuse=1, max_dropped_chunks=5) as pool:
        with pytest.raises(ProducerError, match="5 chunks in a row with no finite image") as info:
            pool.take(1, timeout=30)
        assert isinstance(info.value.__cause__, RuntimeError)
        assert pool.stats()["dropped_nonfinite"] == 10


def test_the_pool_reports_the_memory_its_samples_hold():
    one = fake_batch(0, 4)
    chunk_mib = sum(t.nbytes for t in one.tensors()) / 2**20
    calls = []

    def two_chunks():  # then empty chunks: the pool cannot refill behind take()
        calls.append(1)
        if len(calls) > 2:
            time.sleep(0.05)
            return fake_batch(100, 1).select([])
        return fake_batch(4 * len(calls), 4)

    with SamplePool(two_chunks, capacity=8, max_reuse=1, seed=0) as pool:
        pool.prime(8, timeout=10)
        stats = pool.stats()
        assert stats["pool_mib"] == pytest.approx(2 * chunk_mib)  # capacity 8 = two chunks of 4
        pool.take(8, timeout=10)  # max_reuse 1: both chunks leave
        stats = pool.stats()
        assert stats["pool_peak_mib"] == pytest.approx(2 * chunk_mib) and stats["pool_mib"] == 0


def test_close_waits_for_a_slow_generator_to_finish_its_chunk():
    def slow():
        time.sleep(0.3)
        return fake_batch(0, 2)

    pool = SamplePool(slow, capacity=64, max_reuse=1)
    pool.prime(2, timeout=10)  # one chunk took 0.3 s: close waits up to 0.9 s for the one in flight
    pool.close(timeout=0.05)
    assert pool._thread is None
