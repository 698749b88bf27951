"""Dedicated generator actors (Ray Data) feeding Ray Train workers, on a local Ray cluster on the CPU."""
import json

import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is the optional 'scale' extra")

from mixing.config import MixingConfig  # noqa: E402
from mixing.ray_scale import RayShardProvider, batch_to_rows, rows_to_batch, synthetic_dataset  # noqa: E402
from tests.fakes import fake_batch  # noqa: E402


def test_rows_round_trip():
    batch = fake_batch(0, 3)
    batch.left.verts_cam.normal_()
    back = rows_to_batch(batch_to_rows(batch))
    torch.testing.assert_close(back.left.verts_cam, batch.left.verts_cam)
    assert back.meta == batch.meta and back.hand_type == batch.hand_type


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield tmp_path_factory.mktemp("ray")
    ray.shutdown()


def _loop(config):
    import ray.train

    ctx = ray.train.get_context()
    provider = RayShardProvider(ray.train.get_dataset_shard("synthetic"), epochs=1)
    ids = []
    try:
        while True:
            batch = provider.take(1)
            assert batch.image.shape == (1, 3, 32, 32) and torch.isfinite(batch.image).all()
            ids += [m["id"] for m in batch.meta]
    except StopIteration:
        pass
    with open(f"{config['out']}/rank{ctx.get_world_rank()}.json", "w") as f:
        json.dump(ids, f)


def test_generator_actors_feed_train_workers(local_ray):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = MixingConfig(labels="prior", size=32, num_inference_steps=1, chunk=2)
    ds = synthetic_dataset(cfg, n_chunks=2, num_actors=1, cpus_per_actor=1.0, seed=4)
    trainer = TorchTrainer(
        _loop,
        train_loop_config={"out": str(local_ray)},
        datasets={"synthetic": ds},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(storage_path=str(local_ray / "store")),
    )
    trainer.fit()
    seen = [json.loads((local_ray / f"rank{r}.json").read_text()) for r in range(2)]
    everything = sorted(seen[0] + seen[1])
    assert len(everything) == 4 and len(set(everything)) == 4  # each sample read by exactly one worker
    assert all(seen)  # both workers got a share
