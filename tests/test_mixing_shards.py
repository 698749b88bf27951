import pytest
import torch

from mixing.shards import ShardError, ShardReader, load_shard, save_shard, shard_paths
from tests.fakes import fake_batch


def test_shard_round_trip_keeps_every_field(tmp_path):
    batch = fake_batch(0, 3)
    batch.right.verts_cam.normal_()
    batch.left.joints_valid[1, 4] = True
    save_shard(batch, tmp_path / "shard-00000.safetensors")
    back = load_shard(tmp_path / "shard-00000.safetensors")
    torch.testing.assert_close(back.right.verts_cam, batch.right.verts_cam)
    assert back.left.joints_valid.dtype == torch.bool and bool(back.left.joints_valid[1, 4])
    assert back.meta == batch.meta and back.hand_type == batch.hand_type


def test_incomplete_or_truncated_shards_are_refused(tmp_path):
    path = tmp_path / "shard-00000.safetensors"
    save_shard(fake_batch(0, 2), path)
    (tmp_path / "shard-00001.safetensors").write_bytes(path.read_bytes())  # no JSON: incomplete
    assert shard_paths(tmp_path) == [path]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match="shard-00000"):
        load_shard(path)


def test_reader_serves_every_sample_once_per_pass(tmp_path):
    for k in range(3):
        save_shard(fake_batch(10 * k, 4), tmp_path / f"shard-{k:05d}.safetensors")
    reader = ShardReader(tmp_path, seed=1)
    ids = [m["id"] for _ in range(4) for m in reader.take(3).meta]
    assert sorted(ids) == sorted(str(10 * k + i) for k in range(3) for i in range(4))
    again = ShardReader(tmp_path, seed=1)
    assert [m["id"] for m in again.take(5).meta] == ids[:5]
    rank1 = ShardReader(tmp_path, seed=1, rank=1, world_size=2)
    assert {m["id"] for m in rank1.take(4).meta} == {"10", "11", "12", "13"}
    with pytest.raises(ShardError, match="no complete shards"):
        ShardReader(tmp_path / "empty")
