"""IntagHand (recon.archs.intaghand, recon.archs.graph): the coarsening halves every level and its permutation
round-trips, the fitted 252 -> 778 upsampling reproduces coarsened meshes, the label normalisation converts back
to wrist-rooted metres, outputs have the documented shapes and units, and the losses fall when overfitting 4
rendered samples. Tiny models (narrow ResNet-18, (8, 16)-channel decoders, 64 x 64 images)."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from hands.camera import bbox_from_points, make_intrinsics, project, scale_bbox
from hands.mano import HandModel
from hands.render import render_hands
from hands.sample import Camera, HandLabels, HandSample, collate
from recon.archs.graph import cluster_mean_matrix, coarsen_mesh, fit_upsampling
from recon.archs.intaghand import (
    BONE_LENGTH,
    IntagHand,
    _joints_from_verts,
    hand_graphs,
    normalise_labels,
    normalised_to_metric,
)
from recon.config import from_config, load_config
from recon.registry import build_regressor

SIZE = 64
TINY = dict(
    backbone="resnet18",
    backbone_kwargs=dict(channels=[8, 16, 32, 64], stem_width=8),
    decoder_width=8,
    fused_width=8,
    gcn_in=[16, 8, 8],
    gcn_out=[8, 8, 4],
    graph_blocks=1,
    heads=2,
    patch_grid=4,
)


@pytest.fixture(scope="module")
def hand_model() -> HandModel:
    return HandModel()


def _posed(hand_model: HandModel, side: str, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    pose = torch.randn(n, 48, generator=gen) * 0.3
    shape = torch.randn(n, 10, generator=gen)
    return hand_model(side, pose, shape).verts.detach()


def _make_batch(hand_model: HandModel, n: int, seed: int = 0):
    """n rendered two-hand samples (64 x 64) with consistent 3D and 2D labels."""
    gen = torch.Generator().manual_seed(seed)
    K = make_intrinsics((80.0, 80.0), ((SIZE - 1) / 2, (SIZE - 1) / 2))
    labels, verts = {}, {}
    for side, offset in (("right", (-0.04, -0.02)), ("left", (0.04, 0.02))):
        pose = torch.randn(n, 48, generator=gen) * 0.25
        pose[:, :3] = torch.tensor([math.pi, 0.0, 0.0]) + torch.randn(n, 3, generator=gen) * 0.3
        shape = torch.randn(n, 10, generator=gen) * 0.5
        out = hand_model(side, pose, shape)
        root = torch.tensor([*offset, 0.6]) + torch.randn(n, 3, generator=gen) * 0.02
        shift = root - out.joints[:, 0]
        joints_cam, verts_cam = out.joints + shift[:, None], out.verts + shift[:, None]
        joints_img = project(joints_cam, K)
        labels[side] = [
            HandLabels(
                mano_pose=pose[i], mano_shape=shape[i], root_cam=root[i], verts_cam=verts_cam[i],
                joints_cam=joints_cam[i], joints_img=joints_img[i],
                bbox=scale_bbox(bbox_from_points(joints_img[i]), 1.2), valid=torch.tensor(True),
                joints_valid=torch.ones(21, dtype=torch.bool), mano_valid=torch.tensor(True),
            )
            for i in range(n)
        ]
        verts[side] = verts_cam
    images = render_hands(
        verts["right"], verts["left"], hand_model.faces_for("right"), hand_model.faces_for("left"), K, (SIZE, SIZE)
    ).image
    samples = [
        HandSample(
            image=images[i], right=labels["right"][i], left=labels["left"][i],
            rel_root=labels["left"][i].root_cam - labels["right"][i].root_cam, rel_root_valid=torch.tensor(True),
            camera=Camera(K=K), hand_type="interacting", meta={"dataset": "test", "id": str(i), "is_synthetic": False},
        )
        for i in range(n)
    ]
    return collate(samples)


# -- graphs ------------------------------------------------------------------------------------------------


def test_coarsening_halves_each_level_and_permutation_round_trips(hand_model):
    graphs = coarsen_mesh(hand_model.faces.numpy(), 778, levels=4, top_nodes=63)
    assert graphs.sizes == [1008, 504, 252, 126, 63]  # IntagHand's chain
    for fine, coarse in zip(graphs.sizes, graphs.sizes[1:]):
        assert fine == 2 * coarse
    # Every real vertex sits at exactly one graph position; the rest are fake nodes.
    assert sorted(graphs.perm[graphs.perm < 778].tolist()) == list(range(778))
    x = torch.randn(2, 778, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(graphs.to_mesh(graphs.to_graph(x)), x)
    # Pooling a constant field gives the constant at every level (fake nodes copy real siblings).
    ones = torch.ones(1, 778, 1)
    for level in range(5):
        assert torch.allclose(graphs.pool_to(ones, level), torch.ones(1, graphs.sizes[level], 1))
    # Rescaled Laplacians of the decoder's levels (252, 126, 63 nodes): symmetric, spectrum in [-1, 1].
    for level in (2, 3, 4):
        laplacian = graphs.laplacians[level]
        assert np.allclose(laplacian, laplacian.T)
        eig = np.linalg.eigvalsh(laplacian)
        assert eig.min() >= -1 - 1e-6 and eig.max() <= 1 + 1e-6
        adjacency = graphs.adjacencies[level]
        assert np.allclose(adjacency, adjacency.T) and np.all(np.diag(adjacency) == 0)
    # Adjacent vertices of the mesh end up in the same or adjacent clusters at level 2.
    faces = hand_model.faces.numpy()
    cluster = graphs.inverse // 4
    a, b = cluster[faces[:, 0]], cluster[faces[:, 1]]
    assert np.all((a == b) | (graphs.adjacencies[2][a, b] > 0))


def test_coarsening_retries_seeded_orders_for_a_smaller_top(hand_model):
    # Index order coarsens the procedural hand to 60 top nodes; asking for at most 59 takes a seeded order.
    faces = hand_model.faces.numpy()
    assert coarsen_mesh(faces, 778, levels=4).sizes[-1] == 60
    graphs = coarsen_mesh(faces, 778, levels=4, top_nodes=59)
    assert graphs.sizes == [944, 472, 236, 118, 59]
    assert np.array_equal(graphs.perm, coarsen_mesh(faces, 778, levels=4, top_nodes=59).perm)  # deterministic


def test_coarsening_small_grid_without_padding():
    # A 6 x 6 vertex grid (50 triangles): 36 vertices -> 2 levels; the top count is the matching's own.
    idx = np.arange(36).reshape(6, 6)
    quads = np.stack([idx[:-1, :-1], idx[:-1, 1:], idx[1:, 1:], idx[1:, :-1]], -1).reshape(-1, 4)
    faces = np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]])
    graphs = coarsen_mesh(faces, 36, levels=2)
    assert graphs.sizes[0] == 4 * graphs.sizes[2] and graphs.sizes[1] == 2 * graphs.sizes[2]
    assert graphs.sizes[2] < 36
    x = torch.arange(36.0).reshape(1, 36, 1)
    assert torch.equal(graphs.to_mesh(graphs.to_graph(x)), x)
    with pytest.raises(ValueError, match="top_nodes"):
        coarsen_mesh(faces, 36, levels=1, top_nodes=2)


def test_upsampling_reproduces_coarsened_smooth_meshes(hand_model):
    derived = hand_graphs(hand_model)
    assert hand_graphs(hand_model) is derived  # cached per hand model
    for side in ("right", "left"):
        graphs, upsample = derived.graphs[side], derived.upsample[side].astype(np.float64)
        assert upsample.shape == (778, 252)
        assert np.allclose(upsample.sum(1), 1.0, atol=1e-5)  # affine rows: commutes with translation
        meshes = _posed(hand_model, side, 8, seed=123).double().numpy()  # held out (the fit used seed 0)
        down = cluster_mean_matrix(graphs, 2)  # (252, 778)
        rebuilt = np.einsum("vu,suc->svc", upsample @ down, meshes)
        error_mm = np.linalg.norm(rebuilt - meshes, axis=-1).mean() * 1000
        assignment = np.zeros_like(upsample)
        assignment[np.arange(778), graphs.inverse // 4] = 1.0
        assigned = np.einsum("vu,suc->svc", assignment @ down, meshes)
        baseline_mm = np.linalg.norm(assigned - meshes, axis=-1).mean() * 1000
        assert error_mm < 1.0, error_mm  # sub-millimetre on ~10 cm hands
        assert error_mm < 0.2 * baseline_mm, (error_mm, baseline_mm)
    # The fit is deterministic: refitting on the same samples gives the same map.
    samples = _posed(hand_model, "right", 4, seed=5).double().numpy()
    graphs = derived.graphs["right"]
    assert np.array_equal(fit_upsampling(graphs, 2, samples), fit_upsampling(graphs, 2, samples))


def test_label_normalisation_round_trips_to_wrist_rooted_metres(hand_model):
    verts = {
        side: _posed(hand_model, side, 3, seed=i) + torch.tensor([0.05 * i, 0.0, 0.5])
        for i, side in enumerate(("right", "left"))
    }
    joints = {side: _joints_from_verts(hand_model, side, verts[side]) for side in verts}
    has = torch.ones(3, dtype=torch.bool)
    origin, scale, valid = normalise_labels(verts["right"], verts["left"], joints["right"], joints["left"], has, has)
    assert valid.all()
    assert torch.allclose(origin, joints["left"][:, 9])  # left middle knuckle
    norm = {side: (verts[side] - origin[:, None]) * scale[:, None, None] for side in verts}
    norm_joints = {side: (joints[side] - origin[:, None]) * scale[:, None, None] for side in verts}
    bones = torch.stack([(norm_joints[s][:, 9] - norm_joints[s][:, 0]).norm(dim=-1) for s in verts], 1).mean(1)
    assert torch.allclose(bones, torch.full_like(bones, BONE_LENGTH))
    out = normalised_to_metric(norm["right"], norm["left"], norm_joints["right"], norm_joints["left"], 1.0 / scale)
    for side in ("right", "left"):
        wrist = joints[side][:, :1]
        assert torch.allclose(out[f"{side}_verts"], verts[side] - wrist, atol=1e-6)
        assert torch.allclose(out[f"{side}_joints"], joints[side] - wrist, atol=1e-6)
    assert torch.allclose(out["rel_root"], joints["left"][:, 0] - joints["right"][:, 0], atol=1e-6)
    # Left hand absent: the right middle knuckle is the origin and only the right bone sets the scale.
    no = torch.zeros(3, dtype=torch.bool)
    origin, scale, _ = normalise_labels(verts["right"], verts["left"], joints["right"], joints["left"], has, no)
    assert torch.allclose(origin, joints["right"][:, 9])
    right_bone = (joints["right"][:, 9] - joints["right"][:, 0]).norm(dim=-1)
    assert torch.allclose(scale, BONE_LENGTH / right_bone)


# -- the regressor ---------------------------------------------------------------------------------------


def test_outputs_have_documented_shapes_and_units(hand_model):
    torch.manual_seed(0)
    model = build_regressor("intaghand", **TINY).eval()
    assert isinstance(model, IntagHand)
    batch = _make_batch(hand_model, 2)
    with torch.no_grad():
        out = model(batch)
    out.validate(2)
    extras = out.extras
    assert extras["heatmaps"].shape == (2, 42, SIZE // 4, SIZE // 4)
    assert extras["masks"].shape == (2, 2, SIZE // 4, SIZE // 4)
    assert extras["dense"].shape == (2, 6, SIZE // 4, SIZE // 4)
    assert extras["right_nodes_norm"].shape == (2, 252, 3) and extras["left_verts_norm"].shape == (2, 778, 3)
    for side in ("right", "left"):
        verts, joints = out.side(side)
        # Wrist-rooted: the mesh's regressed wrist is the origin, and joint 0 is that wrist.
        wrist = torch.einsum("v,bvc->bc", hand_model.j_regressor_for(side)[0], verts)
        assert torch.allclose(wrist, torch.zeros_like(wrist), atol=1e-6)
        assert torch.allclose(joints[:, 0], torch.zeros(2, 3), atol=1e-7)
        # Metres under the canonical size: the normalised prediction, shifted only.
        shifted = extras[f"{side}_verts_norm"] - extras[f"{side}_joints_norm"][:, :1]
        assert torch.allclose(verts, shifted, atol=1e-7)
    wrists = {s: extras[f"{s}_joints_norm"][:, 0] for s in ("right", "left")}
    assert torch.allclose(out.rel_root, wrists["left"] - wrists["right"], atol=1e-7)
    # IntagHand's own protocol: the same prediction scaled by the GT bone length / 0.095.
    model.rescale_with_gt_bone_length = True
    with torch.no_grad():
        scaled = model(batch)
    bones = []
    for side in ("right", "left"):
        gt_joints = _joints_from_verts(hand_model, side, batch.hand(side).verts_cam)
        bones.append((gt_joints[:, 9] - gt_joints[:, 0]).norm(dim=-1))
    factor = torch.stack(bones, 1).mean(1) / BONE_LENGTH
    assert torch.allclose(scaled.right_verts, out.right_verts * factor[:, None, None], atol=1e-6)
    assert torch.allclose(scaled.rel_root, out.rel_root * factor[:, None], atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 32"):
        model(dataclasses.replace(batch, image=torch.zeros(2, 3, 48, 48)))


def test_losses_fall_when_overfitting_four_samples(hand_model):
    torch.manual_seed(0)
    model = build_regressor("intaghand", **TINY)
    batch = _make_batch(hand_model, 4, seed=1)
    model.set_epoch(0)
    first = model.losses(model(batch), batch)
    assert set(first) == {
        "verts", "joints", "verts_2d", "normal", "edge", "coarse_verts", "coarse_verts_2d", "mask", "dense", "heatmap"
    }
    assert first["edge"].item() == 0.0  # off before edge_loss_epoch
    model.set_epoch(50)
    assert model.losses(model(batch), batch)["edge"].item() > 0.0
    model.set_epoch(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    history = []
    for _ in range(8):
        losses = model.losses(model(batch), batch)
        total = sum(losses.values())
        assert torch.isfinite(total)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append({name: value.item() for name, value in losses.items()})
    assert sum(history[-1].values()) < 0.5 * sum(history[0].values())
    for name in ("verts", "joints", "verts_2d", "coarse_verts", "mask", "heatmap"):
        assert history[-1][name] < history[0][name], name


def test_render_targets_match_the_rendered_sides(hand_model):
    model = build_regressor("intaghand", **TINY)
    batch = _make_batch(hand_model, 2)
    labels = model._labels(batch, hand_model)
    masks, dense = model._render_targets(labels, batch.camera.K, (SIZE, SIZE))
    side = render_hands(
        batch.right.verts_cam, batch.left.verts_cam, hand_model.faces_for("right"), hand_model.faces_for("left"),
        batch.camera.K, (SIZE, SIZE),
    ).side
    assert torch.equal(masks[:, 0].bool(), side == 1) and torch.equal(masks[:, 1].bool(), side == 2)
    on = masks.sum(1) > 0
    assert (dense.amax(1)[~on] == 0).all() and (dense.amax(1)[on] > 0).all() and dense.max() <= 1.0


def test_config_profiles_and_backbone_weights(tmp_path):
    paper = load_config(profile="paper", arch="intaghand")
    assert list(paper.data.image_size) == [256, 256] and paper.data.crop == "hands"
    assert paper.model.backbone == "resnet50" and list(paper.model.gcn_in) == [512, 256, 128]
    assert paper.train.batch_size == 64 and paper.train.epochs == 200 and list(paper.optim.lr_decay_epochs) == [150]
    kwargs = from_config(paper, IntagHand)
    assert kwargs["edge_loss_epoch"] == 50 and kwargs["weight_mask"] == 500.0
    demo = load_config(profile="demo", arch="intaghand")
    assert demo.model.backbone == "resnet18" and demo.data.image_size[0] % 32 == 0
    torch.manual_seed(0)
    source = build_regressor("intaghand", **TINY)
    path = tmp_path / "encoder.pt"
    torch.save(source.encoder.state_dict(), path)
    target = build_regressor("intaghand", **TINY)
    target.load_backbone_weights(str(path))
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(target.encoder.state_dict()[key], value)
    torch.save({"not_a_layer.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not fit the encoder"):
        target.load_backbone_weights(str(tmp_path / "bad.pt"))
