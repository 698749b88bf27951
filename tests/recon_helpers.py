"""Shared pieces of the recon tests: a tiny synthlab and tiny model overrides."""
from __future__ import annotations

from pathlib import Path

# A narrow ResNet-18 ((8, 16, 32, 64) channels) on 64 px inputs; no TensorBoard images unless asked.
TINY = [
    "model.backbone=resnet18",
    "model.backbone_kwargs.channels=[8,16,32,64]",
    "model.backbone_kwargs.stem_width=8",
    "model.hidden_dim=32",
    "data.image_size=[64,64]",
    "train.image_every=0",
]
# The tiny generator side of a mixed run: 32 px samples, 2 sampling steps, small chunks and pool.
GEN = ["mixing.size=32", "mixing.num_inference_steps=2", "mixing.chunk=4", "mixing.capacity=8", "mixing.max_reuse=2"]


def write_tiny_synthlab(root: Path) -> Path:
    """12 train-lab, 6 test-lab and 6 test-wild images of 64 px in IH2.6M layout."""
    from hands.datasets.synthlab import write_synthlab

    sizes = {"train-lab": 12, "test-lab": 6, "train-wild": 0, "test-wild": 6}
    return write_synthlab(root, sizes=sizes, resolution=64, show_progress=False)


def run_args(synthlab_root: Path, out: Path, *extra: str) -> list[str]:
    """recon.train arguments for a tiny run on the tiny synthlab."""
    return [
        "--data-root", str(synthlab_root), "--datasets", "synthlab",
        "--test-datasets", "synthlab:test-lab,synthlab:test-wild",
        "--out", str(out), "--batch-size", "4", "--seed", "3", *TINY, *extra,
    ]


def arch_run_args(synthlab_root: Path, out: Path, arch: str, model_args, *extra: str) -> list[str]:
    """:func:`run_args` for ``--arch arch`` with that arch's own tiny ``model.*`` overrides instead of TINY's."""
    args = run_args(synthlab_root, out, "--arch", arch, *extra)
    return [arg for arg in args if not arg.startswith("model.")] + list(model_args)


def tiny_mixed_run(tmp_path_factory, arch: str, model_args) -> tuple:
    """(synthlab root, run folder, result) of 2 steps of a tiny ``arch`` with half of each batch generated
    (sync mixing, the tiny generator side :data:`GEN`), on one torch thread."""
    import torch

    from recon import train as recon_train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = write_tiny_synthlab(tmp_path_factory.mktemp(f"synthlab_{arch}"))
        out = tmp_path_factory.mktemp(f"{arch}_run")
        args = arch_run_args(root, out, arch, model_args, "--synthetic-ratio", "0.5", "--mix-mode", "sync",
                             "--max-steps", "2", *GEN)
        result = recon_train.train(recon_train.parse_args(args))
    finally:
        torch.set_num_threads(threads)
    return root, out, result


def torchrun_two_processes(argv, timeout: int = 400):
    """``torch.distributed.run --standalone --nproc-per-node 2 -m recon.train argv`` on one thread per process
    (this checkout first on the path); the CompletedProcess, output captured."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "recon.train", *argv]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def rendered_two_hand_samples(hand_model, n: int, seed: int = 0, *, size: int = 64, offset: float = 0.04) -> list:
    """n rendered two-hand samples (size x size) with consistent 3D, 2D and MANO labels: random poses about a
    palm-down root, the right wrist at (-offset, -0.02, 0.6) m and the left at (offset, 0.02, 0.6) m (+- 2 cm),
    labels exactly those of the rendered meshes. Collate them with `hands.sample.collate` for a batch."""
    import math

    import torch

    from hands.camera import bbox_from_points, inside_image, make_intrinsics, project, scale_bbox
    from hands.render import render_hands
    from hands.sample import Camera, HandLabels, HandSample

    gen = torch.Generator().manual_seed(seed)
    K = make_intrinsics((80.0 * size / 64, 80.0 * size / 64), ((size - 1) / 2, (size - 1) / 2))
    labels, verts = {}, {}
    for side, xy in (("right", (-offset, -0.02)), ("left", (offset, 0.02))):
        pose = torch.randn(n, 48, generator=gen) * 0.25
        pose[:, :3] = torch.tensor([math.pi, 0.0, 0.0]) + torch.randn(n, 3, generator=gen) * 0.3
        shape = torch.randn(n, 10, generator=gen) * 0.5
        out = hand_model(side, pose, shape)
        root = torch.tensor([*xy, 0.6]) + torch.randn(n, 3, generator=gen) * 0.02
        shift = root - out.joints[:, 0]
        joints_cam, verts_cam = out.joints + shift[:, None], out.verts + shift[:, None]
        joints_img = project(joints_cam, K)
        labels[side] = [
            HandLabels(
                mano_pose=pose[i], mano_shape=shape[i], root_cam=root[i], verts_cam=verts_cam[i],
                joints_cam=joints_cam[i], joints_img=joints_img[i],
                bbox=scale_bbox(bbox_from_points(joints_img[i]), 1.2), valid=torch.tensor(True),
                joints_valid=torch.ones(21, dtype=torch.bool), joints_trunc=inside_image(joints_img[i], (size, size)),
                mano_valid=torch.tensor(True),
            )
            for i in range(n)
        ]
        verts[side] = verts_cam
    images = render_hands(
        verts["right"], verts["left"], hand_model.faces_for("right"), hand_model.faces_for("left"), K, (size, size)
    ).image
    return [
        HandSample(
            image=images[i], right=labels["right"][i], left=labels["left"][i],
            rel_root=labels["left"][i].root_cam - labels["right"][i].root_cam, rel_root_valid=torch.tensor(True),
            camera=Camera(K=K), hand_type="interacting", meta={"dataset": "test", "id": str(i), "is_synthetic": False},
        )
        for i in range(n)
    ]


def overfit_history(model, batch, steps: int, lr: float) -> list[dict]:
    """Train `model` on the one `batch` for `steps` Adam steps (its own `losses`, summed); every total must be
    finite. Returns the per-step losses as floats, for the overfit tests of each regressor."""
    import torch

    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    for _ in range(steps):
        losses = model.losses(model(batch), batch)
        total = sum(losses.values())
        assert torch.isfinite(total)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append({name: value.item() for name, value in losses.items()})
    return history
