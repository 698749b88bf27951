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


def test_share_pause_keeps_the_producers_share_of_wall_time():
    from mixing.pool import share_pause

    assert share_pause(1.0, 1.0) == 0.0
    assert share_pause(1.0, 0.25) == pytest.approx(3.0)  # busy 1 s of 4
    assert share_pause(0.2, 0.5) == pytest.approx(0.2)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="max_share"):
            share_pause(1.0, bad)


def test_the_byte_cap_bounds_the_pool_below_its_capacity():
    chunk_bytes = sum(t.nbytes for t in fake_batch(0, 4).tensors())
    producer = Counter(chunk=4)
    # room for 2.5 chunks in bytes, 64 samples in count: the byte cap holds the producer at two chunks
    with SamplePool(producer, capacity=64, max_reuse=4, seed=0, max_resident_mib=2.5 * chunk_bytes / 2**20) as pool:
        pool.prime(8, timeout=10)
        deadline = time.perf_counter() + 0.5
        while time.perf_counter() < deadline:  # whenever it is looked at, the bound holds
            stats = pool.stats()
            assert stats["pool_mib"] * 2**20 <= 2.5 * chunk_bytes and stats["produced"] == 8
            time.sleep(0.02)
        assert stats["producer_capped_s"] > 0
        # a take that wants more than the cap allows is served, not left waiting
        assert len(pool.take(8, timeout=10)) == 8


def test_the_share_cap_pauses_the_producer_but_never_while_the_trainer_waits():
    def slow():
        time.sleep(0.05)
        return fake_batch(0, 2)

    # share 0.001: after each 0.05 s chunk the producer would pause ~50 s; a take that finds too few samples
    # wakes it at once, so three chunks in a row arrive well within the timeout
    with SamplePool(slow, capacity=64, max_reuse=1, seed=0, max_share=0.001) as pool:
        pool.prime(2, timeout=10)
        assert len(pool.take(6, timeout=10)) == 6
        # max_reuse 1 empties the pool: the next take of 6 would wait, so the producer refills 6 at once ...
        deadline = time.perf_counter() + 10
        while pool.stats()["produced"] < 12 and time.perf_counter() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        stats = pool.stats()  # ... and then pauses, far from its capacity of 64
        assert stats["produced"] == 12 and len(pool) == 6
        assert stats["producer_throttle_s"] > 0 and stats["producer_share"] < 1.0


def test_pool_caps_are_checked():
    with pytest.raises(ValueError, match="max_resident_mib"):
        SamplePool(Counter(), start=False, max_resident_mib=0)
    with pytest.raises(ValueError, match="max_share"):
        SamplePool(Counter(), start=False, max_share=0)


def test_stream_memory_sums_the_producer_streams_segments_on_its_device():
    from mixing.pool import stream_memory

    segments = [
        {"device": 0, "stream": 7, "total_size": 4 << 20, "allocated_size": 3 << 20},
        {"device": 0, "stream": 7, "total_size": 2 << 20, "allocated_size": 0},
        {"device": 0, "stream": 0, "total_size": 64 << 20, "allocated_size": 64 << 20},  # the trainer's
        {"device": 1, "stream": 7, "total_size": 8 << 20, "allocated_size": 8 << 20},  # another GPU
    ]
    assert stream_memory(segments, 7, 0) == (6 << 20, 3 << 20)
    assert stream_memory(segments, 9, 0) == (0, 0)


def test_running_low_resumes_the_producer_one_chunk_ahead_of_the_trainer():
    from mixing.pool import running_low

    # a trainer taking 5 samples every 2 s, a chunk made in 6 s: 5 x (1 + 3) = 20 draws are needed meanwhile
    assert running_low(19, 5, chunk_s=6.0, take_interval_s=2.0)
    assert not running_low(20, 5, chunk_s=6.0, take_interval_s=2.0)
    assert running_low(30, 5, chunk_s=12.0, take_interval_s=2.0)  # a slower generator resumes earlier
    # before the rates are known: only when the next take would wait
    assert running_low(4, 5, chunk_s=0.0, take_interval_s=0.0) and not running_low(5, 5, chunk_s=6.0, take_interval_s=0.0)
