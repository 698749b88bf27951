import torch

from mixing import pregenerate
from mixing.shards import ShardReader, load_shard, shard_paths


def test_pregenerate_writes_resumable_deterministic_shards(tmp_path):
    out = tmp_path / "shards"
    args = ["--n", "3", "--shard-size", "2", "--out", str(out), "--labels", "prior", "--size", "32", "--steps", "1", "--device", "cpu"]
    assert pregenerate.main(args) == 0
    paths = shard_paths(out)
    assert [p.name for p in paths] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    first = load_shard(paths[1])
    assert len(load_shard(paths[0])) == 2 and len(first) == 1
    assert all(m["is_synthetic"] for m in first.meta)
    # an interrupted run (shard 1 lost its commit marker) is completed with the same content
    (out / "shard-00001.json").unlink()
    assert pregenerate.main(args) == 0
    again = load_shard(out / "shard-00001.safetensors")
    torch.testing.assert_close(again.image, first.image)
    torch.testing.assert_close(again.right.verts_cam, first.right.verts_cam)
    assert len(ShardReader(out).take(3)) == 3


def test_pregenerate_refuses_bad_sizes(tmp_path, capsys):
    assert pregenerate.main(["--n", "0", "--out", str(tmp_path)]) == 2
    assert "--n" in capsys.readouterr().err
