import pytest
import torch

from hands.sample import Camera, HandBatch, HandLabels, HandSample, collate, concat_batches


def make_sample(i: int, hand_type: str = "interacting", size: int = 16) -> HandSample:
    right = HandLabels.empty()
    right.valid = torch.tensor(True)
    right.root_cam = torch.tensor([0.0, 0.0, 0.5 + i])
    left = HandLabels.empty()
    return HandSample(
        image=torch.full((3, size, size), i / 10.0),
        right=right,
        left=left,
        rel_root=torch.tensor([0.1 * i, 0.0, 0.0]),
        rel_root_valid=torch.tensor(True),
        camera=Camera(K=torch.eye(3) * (i + 1)),
        hand_type=hand_type,
        meta={"dataset": "unit", "id": str(i), "is_synthetic": i % 2 == 1},
    )


def test_collate_stacks_every_field_and_keeps_lists():
    batch = collate([make_sample(i) for i in range(3)])
    assert len(batch) == 3
    assert batch.image.shape == (3, 3, 16, 16)
    assert batch.right.verts_cam.shape == (3, 778, 3)
    assert batch.left.joints_valid.shape == (3, 21) and batch.left.joints_valid.dtype == torch.bool
    assert batch.camera.K.shape == (3, 3, 3) and batch.camera.dist.shape == (3, 4)
    assert batch.right.valid.tolist() == [True, True, True]
    assert batch.left.valid.tolist() == [False, False, False]
    assert [m["id"] for m in batch.meta] == ["0", "1", "2"]
    assert batch.is_synthetic.tolist() == [False, True, False]


def test_select_unbind_and_concat_round_trip():
    batch = collate([make_sample(i) for i in range(4)])
    sub = batch.select(torch.tensor([False, True, False, True]))
    assert [m["id"] for m in sub.meta] == ["1", "3"]
    torch.testing.assert_close(sub.right.root_cam[:, 2], torch.tensor([1.5, 3.5]))
    joined = concat_batches([batch.select([0, 1]), batch.select(slice(2, 4))])
    torch.testing.assert_close(joined.image, batch.image)
    assert joined.hand_type == batch.hand_type
    samples = batch.unbind()
    assert samples[2].meta["id"] == "2"
    torch.testing.assert_close(samples[2].camera.K, torch.eye(3) * 3)
    samples[0].validate()


def test_to_moves_floats_and_keeps_masks():
    batch = collate([make_sample(0)])
    half = batch.to(dtype=torch.float64)
    assert half.image.dtype == torch.float64 and half.right.verts_cam.dtype == torch.float64
    assert half.right.valid.dtype == torch.bool


def test_validate_names_the_bad_field():
    s = make_sample(0)
    s.left.joints_cam = torch.zeros(20, 3)
    with pytest.raises(ValueError, match=r"left\.joints_cam"):
        s.validate()
    s = make_sample(0, hand_type="both")
    with pytest.raises(ValueError, match="hand_type"):
        s.validate()


def test_collate_refuses_mixed_image_sizes():
    with pytest.raises(ValueError, match="images differ"):
        collate([make_sample(0, size=16), make_sample(1, size=8)])
