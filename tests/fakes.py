"""Small hand-made HandBatches for tests that do not need real labels."""
import torch

from hands.sample import Camera, HandBatch, HandLabels, HandSample, collate


def fake_batch(start: int, n: int, value: float | None = None) -> HandBatch:
    samples = []
    for i in range(start, start + n):
        samples.append(
            HandSample(
                image=torch.full((3, 8, 8), value if value is not None else 0.5),
                right=HandLabels.empty(),
                left=HandLabels.empty(),
                rel_root=torch.zeros(3),
                rel_root_valid=torch.tensor(False),
                camera=Camera(K=torch.eye(3)),
                hand_type="right",
                meta={"dataset": "gen", "id": str(i), "is_synthetic": True},
            )
        )
    return collate(samples)
