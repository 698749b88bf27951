"""hands.render: the bucketed rasterizer against a slow naive reference, shading, the two-hand mesh image,
and the local crop. Images are 32-64 px; meshes are random triangle soups and procedural spheres/capsules."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh

from hands.camera import apply_affine, make_intrinsics, project
from hands.render import (
    LEFT_HAND_COLOR,
    RIGHT_HAND_COLOR,
    SIDE_BACKGROUND,
    SIDE_LEFT,
    SIDE_RIGHT,
    crop_local,
    interpolate,
    rasterize,
    render_hands,
    render_mesh,
    vertex_normals,
)



# ----------------------------------------------------------------------------------------------------------
# The slow reference: loop over faces, test every pixel centre of the face's bounding box.


def naive_rasterize(verts_img_z: torch.Tensor, faces: torch.Tensor, height: int, width: int, near: float = 1e-3):
    """verts_img_z (V, 3), faces (F, 3) -> face_index (H, W) long, depth (H, W) float64 (inf where empty).

    Same tie rule as hands.render: a pixel centre on an edge is inside (inclusive test); the nearest depth
    wins, exact depth ties keep the lower face index (faces are visited in order, replaced on strictly
    smaller depth). Computed in float64 so that it is independent of the rasterizer's float32 arithmetic.
    """
    v = verts_img_z.detach().double().cpu().numpy()
    face_index = np.full((height, width), -1, dtype=np.int64)
    depth = np.full((height, width), np.inf)
    for f, (a, b, c) in enumerate(faces.cpu().numpy()):
        (x0, y0, z0), (x1, y1, z1), (x2, y2, z2) = v[a], v[b], v[c]
        if min(z0, z1, z2) <= near:
            continue
        area = (x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0)
        if area == 0:
            continue
        c0 = max(math.ceil(min(x0, x1, x2)), 0)
        c1 = min(math.floor(max(x0, x1, x2)), width - 1)
        r0 = max(math.ceil(min(y0, y1, y2)), 0)
        r1 = min(math.floor(max(y0, y1, y2)), height - 1)
        for row in range(r0, r1 + 1):
            for col in range(c0, c1 + 1):
                px, py = float(col), float(row)
                l0 = ((x1 - px) * (y2 - py) - (y1 - py) * (x2 - px)) / area
                l1 = ((x2 - px) * (y0 - py) - (y2 - py) * (x0 - px)) / area
                l2 = ((x0 - px) * (y1 - py) - (y0 - py) * (x1 - px)) / area
                if l0 < 0 or l1 < 0 or l2 < 0:
                    continue
                d = 1.0 / (l0 / z0 + l1 / z1 + l2 / z2)
                if d < depth[row, col]:
                    depth[row, col] = d
                    face_index[row, col] = f
    return torch.from_numpy(face_index), torch.from_numpy(depth)


# ----------------------------------------------------------------------------------------------------------
# Meshes.


def triangle_soup(num_faces: int, size: int, min_extent: float, max_extent: float, generator: torch.Generator):
    """Independent random triangles (V = 3F): centres anywhere (also partly outside the image), extents in
    [min_extent, max_extent] pixels, each triangle at its own depth in [0.5, 3] m with a random tilt."""
    centre = torch.rand(num_faces, 1, 2, generator=generator) * (size + 8) - 4
    extent = min_extent + torch.rand(num_faces, 1, 1, generator=generator) * (max_extent - min_extent)
    offsets = (torch.rand(num_faces, 3, 2, generator=generator) - 0.5) * extent
    xy = centre + offsets
    z = 0.5 + 2.5 * torch.rand(num_faces, 1, 1, generator=generator) + 0.3 * torch.rand(num_faces, 3, 1, generator=generator)
    verts = torch.cat([xy, z], -1).reshape(num_faces * 3, 3)
    faces = torch.arange(num_faces * 3).reshape(num_faces, 3)
    return verts, faces


def sphere(radius: float, centre, subdivisions: int = 2):
    """An icosphere (outward-facing faces): verts (V, 3) metres, faces (F, 3) long."""
    mesh = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    verts = torch.tensor(mesh.vertices, dtype=torch.float32) + torch.tensor(centre, dtype=torch.float32)
    return verts, torch.tensor(mesh.faces, dtype=torch.long)


def capsule(radius: float, height: float, centre):
    """A finger-like capsule along the camera's y axis: verts (V, 3) metres, faces (F, 3) long."""
    mesh = trimesh.creation.capsule(height=height, radius=radius, count=[12, 12])
    verts = torch.tensor(mesh.vertices, dtype=torch.float32)[:, [0, 2, 1]] * torch.tensor([1.0, 1.0, 1.0])
    faces = torch.tensor(mesh.faces, dtype=torch.long)[:, [0, 2, 1]]  # the axis swap flips the winding
    return verts + torch.tensor(centre, dtype=torch.float32), faces


def projected(verts_cam: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """(V, 3) camera space -> (V, 3) pixels + depth."""
    return torch.cat([project(verts_cam, K), verts_cam[:, 2:]], -1)


def compare_with_reference(verts_img_z, faces, size, max_edge_fraction=0.005):
    """Rasterize one mesh both ways; coverage masks agree except for pixel centres on edges, depth to 1e-4."""
    frag = rasterize(verts_img_z[None], faces, (size, size))
    ref_face, ref_depth = naive_rasterize(verts_img_z, faces, size, size)
    mask, ref_mask = frag.mask[0], ref_face >= 0
    differing = (mask != ref_mask).sum().item()
    assert differing <= max_edge_fraction * size * size, f"{differing} pixels differ in coverage"
    both = mask & ref_mask
    err = (frag.depth[0][both].double() - ref_depth[both]).abs()
    assert err.max().item() < 1e-4
    assert torch.isinf(frag.depth[0][~mask]).all()
    assert (frag.face_index[0][~mask] == -1).all()
    # the visible face is the reference's face, up to faces at equal depth on a shared pixel
    same_face = frag.face_index[0][both] == ref_face[both]
    assert same_face.float().mean().item() > 0.99
    return mask, ref_mask


# ----------------------------------------------------------------------------------------------------------
# Rasterizer vs the naive reference.


@pytest.mark.parametrize(
    "seed,num_faces,min_extent,max_extent,size",
    [
        pytest.param(1, 6, 30.0, 140.0, 48, id="large faces spanning the image"),
        pytest.param(2, 60, 1.0, 40.0, 64, id="mixed sizes overlapping at different depths"),
        pytest.param(3, 300, 0.2, 1.5, 32, id="tiny sub-pixel faces"),
        pytest.param(4, 150, 1.0, 6.0, 32, id="small faces"),
    ],
)
def test_rasterize_matches_naive_reference_on_triangle_soups(seed, num_faces, min_extent, max_extent, size):
    generator = torch.Generator().manual_seed(seed)
    verts, faces = triangle_soup(num_faces, size, min_extent, max_extent, generator)
    mask, ref_mask = compare_with_reference(verts, faces, size)
    assert ref_mask.any()  # the scene is not empty


def test_rasterize_matches_naive_reference_on_closed_meshes():
    """Spheres and a capsule through a pinhole camera: shared edges, self-occlusion (front hides back)."""
    size = 48
    K = make_intrinsics((60.0, 60.0), (23.5, 23.5))
    v1, f1 = sphere(0.05, (-0.03, 0.0, 0.30))
    v2, f2 = sphere(0.04, (0.03, 0.02, 0.25), subdivisions=1)
    v3, f3 = capsule(0.015, 0.12, (0.0, 0.0, 0.28))
    verts = torch.cat([v1, v2, v3])
    faces = torch.cat([f1, f2 + len(v1), f3 + len(v1) + len(v2)])
    verts_img_z = projected(verts, K)
    mask, ref_mask = compare_with_reference(verts_img_z, faces, size)
    # a closed mesh seen from outside shows only front faces (normal towards the camera)
    frag = rasterize(verts_img_z[None], faces, (size, size))
    culled = rasterize(verts_img_z[None], faces, (size, size), cull_backfaces=True)
    assert torch.equal(frag.mask, culled.mask)
    assert (frag.face_index == culled.face_index).float().mean() > 0.99


def test_no_face_is_missed_whatever_its_size():
    """One triangle larger than the image covers every pixel (the bug of a fixed-size window)."""
    verts = torch.tensor([[[-100.0, -100.0, 1.0], [300.0, -100.0, 1.0], [-100.0, 300.0, 1.0]]])
    frag = rasterize(verts, torch.tensor([[0, 1, 2]]), (40, 56))
    assert frag.mask.all()
    assert torch.allclose(frag.depth, torch.ones_like(frag.depth))
    # A long thin diagonal sliver is drawn along its whole length.
    sliver = torch.tensor([[[0.0, 0.0, 1.0], [63.0, 63.0, 1.0], [63.0, 61.0, 1.0]]])
    frag = rasterize(sliver, torch.tensor([[0, 1, 2]]), (64, 64))
    ref_face, _ = naive_rasterize(sliver[0], torch.tensor([[0, 1, 2]]), 64, 64)
    assert torch.equal(frag.mask[0], ref_face >= 0)
    assert frag.mask[0].sum() > 60


def test_chunked_buckets_give_the_same_result():
    """Splitting buckets into chunks of few candidates (bounded memory) changes nothing."""
    generator = torch.Generator().manual_seed(5)
    verts, faces = triangle_soup(80, 48, 0.5, 60.0, generator)
    whole = rasterize(verts[None], faces, (48, 48))
    chunked = rasterize(verts[None], faces, (48, 48), max_candidates=64)
    assert torch.equal(whole.face_index, chunked.face_index)
    assert torch.equal(whole.depth, chunked.depth)


def test_backface_culling_keeps_faces_whose_normal_faces_the_camera():
    K = make_intrinsics(40.0, (15.5, 15.5))
    # counter-clockwise seen from the camera (normal (v1 - v0) x (v2 - v0) towards -z, the camera)
    front = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.3, 1.0], [0.3, 0.0, 1.0]])
    assert torch.linalg.cross(front[1] - front[0], front[2] - front[0])[2] < 0
    face = torch.tensor([[0, 1, 2]])
    for verts, drawn in ((front, True), (front[[0, 2, 1]], False)):
        frag = rasterize(projected(verts, K)[None], face, (32, 32), cull_backfaces=True)
        assert frag.mask.any().item() is drawn
        assert rasterize(projected(verts, K)[None], face, (32, 32)).mask.any()  # drawn without culling


def test_edge_tie_rule_shared_edge_has_no_cracks():
    """Two triangles sharing a diagonal through pixel centres: every pixel of the square is covered once
    by exactly one face; centres on the shared edge go to the lower face index (equal depth)."""
    verts = torch.tensor([[[2.0, 2.0, 1.0], [12.0, 2.0, 1.0], [12.0, 12.0, 1.0], [2.0, 12.0, 1.0]]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    frag = rasterize(verts, faces, (16, 16))
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[2:13, 2:13] = True
    assert torch.equal(frag.mask[0], inside)
    diag = torch.arange(2, 13)
    assert (frag.face_index[0, diag, diag] == 0).all()


# ----------------------------------------------------------------------------------------------------------
# Depth order, near plane, perspective-correct barycentrics.


def quad(x0, y0, x1, y1, z):
    verts = torch.tensor([[x0, y0, z], [x1, y0, z], [x1, y1, z], [x0, y1, z]], dtype=torch.float32)
    return verts, torch.tensor([[0, 1, 2], [0, 2, 3]])


@pytest.mark.parametrize("near_first", [True, False])
def test_nearest_face_wins_whatever_the_face_order(near_first):
    near_v, near_f = quad(4, 4, 20, 20, 1.0)
    far_v, far_f = quad(10, 10, 28, 28, 2.0)
    parts = [(near_v, near_f), (far_v, far_f)] if near_first else [(far_v, far_f), (near_v, near_f)]
    verts = torch.cat([parts[0][0], parts[1][0]])
    faces = torch.cat([parts[0][1], parts[1][1] + 4])
    frag = rasterize(verts[None], faces, (32, 32))
    assert frag.depth[0, 15, 15] == 1.0  # overlap: the near quad
    assert frag.depth[0, 25, 25] == 2.0  # only the far quad
    near_faces = (0, 1) if near_first else (2, 3)
    assert frag.face_index[0, 15, 15].item() in near_faces


def test_faces_behind_the_camera_are_not_drawn():
    behind_v, behind_f = quad(0, 0, 31, 31, -1.0)
    frag = rasterize(behind_v[None], behind_f, (32, 32))
    assert not frag.mask.any()
    assert torch.isinf(frag.depth).all()
    # a face with one vertex behind the near plane is dropped, the other one drawn
    verts = torch.tensor([[[0.0, 0.0, 1.0], [31.0, 0.0, 1.0], [31.0, 31.0, 1.0], [0.0, 31.0, 0.0]]])
    frag = rasterize(verts, torch.tensor([[0, 1, 2], [0, 2, 3]]), (32, 32))
    assert set(frag.face_index.unique().tolist()) == {-1, 0}
    # a whole mesh behind the camera through render_mesh
    v, f = sphere(0.05, (0.0, 0.0, -0.3))
    out = render_mesh(v[None], f, make_intrinsics(40.0, (15.5, 15.5)), (32, 32))
    assert not out.mask.any() and (out.image == 0).all()


def test_barycentrics_are_perspective_correct():
    """The 3D point interpolated with the barycentrics lies on the pixel's ray at the reported depth."""
    K = make_intrinsics((50.0, 50.0), (15.5, 15.5))
    verts_cam = torch.tensor([[-0.2, -0.15, 0.4], [0.25, -0.1, 1.2], [0.0, 0.3, 0.7]])
    frag = rasterize(projected(verts_cam, K)[None], torch.tensor([[0, 1, 2]]), (32, 32))
    mask = frag.mask[0]
    assert mask.sum() > 50
    point = interpolate(frag, torch.tensor([[0, 1, 2]]), verts_cam[None])[0][mask]  # (P, 3)
    rows, cols = torch.nonzero(mask, as_tuple=True)
    pixel = torch.stack([cols, rows], -1).float()
    assert torch.allclose(project(point, K), pixel, atol=1e-3)
    assert torch.allclose(point[:, 2], frag.depth[0][mask], atol=1e-5)
    assert torch.allclose(frag.bary[0][mask].sum(-1), torch.ones(mask.sum()), atol=1e-5)


def test_image_and_depth_are_differentiable_wrt_the_vertices():
    """Gradients flow from the shaded image and the depth into the vertices (not through visibility)."""
    v, f = sphere(0.05, (0.0, 0.0, 0.3), subdivisions=1)
    v = v[None].clone().requires_grad_(True)
    out = render_mesh(v, f, make_intrinsics(60.0, (15.5, 15.5)), (32, 32))
    (out.image.sum() + out.depth[out.mask].sum()).backward()
    assert torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------
# Batches, dtype, device.


def test_batch_of_different_meshes_equals_one_at_a_time():
    generator = torch.Generator().manual_seed(3)
    soups = [triangle_soup(40, 40, 1.0, 25.0, generator) for _ in range(3)]
    verts = torch.stack([v for v, _ in soups])  # (3, 120, 3)
    faces = torch.stack([f.flip(0) if i == 1 else f for i, (_, f) in enumerate(soups)])  # (3, 40, 3)
    face_valid = torch.ones(3, 40, dtype=torch.bool)
    face_valid[2, ::2] = False
    frag = rasterize(verts, faces, (40, 48), face_valid=face_valid)
    for i in range(3):
        f = faces[i][face_valid[i]]
        one = rasterize(verts[i : i + 1], f, (40, 48))
        assert torch.equal(frag.mask[i], one.mask[0])
        assert torch.equal(frag.depth[i], one.depth[0])
        kept = torch.nonzero(face_valid[i]).squeeze(1)
        assert torch.equal(frag.face_index[i][frag.mask[i]], kept[one.face_index[0][one.mask[0]]])


def test_accelerator_code_path_gives_the_same_images(monkeypatch):
    """On CPU, per-pixel work runs at covered pixels only; the every-pixel path (CUDA, torch.compile) agrees."""
    import hands.render as render

    right_v, left_v, faces = two_capsule_hands(2)
    K = make_intrinsics(150.0, (31.5, 31.5)).expand(2, 3, 3)
    v, f = sphere(0.05, (0.0, 0.0, 0.3))
    colors = torch.rand(1, len(v), 3)
    compact = render_hands(right_v, left_v, faces, faces, K, (48, 64))
    compact_mesh = render_mesh(v[None], f, K[0], (32, 32), vertex_colors=colors)
    monkeypatch.setattr(render, "_COMPACT_ON_CPU", False)
    dense = render_hands(right_v, left_v, faces, faces, K, (48, 64))
    dense_mesh = render_mesh(v[None], f, K[0], (32, 32), vertex_colors=colors)
    assert torch.equal(compact.side, dense.side)
    assert torch.allclose(compact.image, dense.image, atol=1e-6)
    assert torch.equal(compact.depth, dense.depth)
    assert torch.allclose(compact_mesh.image, dense_mesh.image, atol=1e-6)
    assert torch.allclose(compact_mesh.fragments.bary, dense_mesh.fragments.bary, atol=1e-6)


def test_output_dtype_and_device_follow_the_input():
    v, f = sphere(0.05, (0.0, 0.0, 0.3))
    K = make_intrinsics(60.0, (15.5, 15.5))
    out32 = render_mesh(v[None], f, K, (32, 32))
    out64 = render_mesh(v[None].double(), f, K.double(), (32, 32))
    assert out32.image.dtype == torch.float32 and out64.image.dtype == torch.float64
    assert out64.depth.dtype == torch.float64 and out64.fragments.bary.dtype == torch.float64
    assert torch.equal(out32.mask, out64.mask)
    assert torch.allclose(out32.image.double(), out64.image, atol=1e-4)
    assert out32.image.device == v.device and out32.fragments.face_index.dtype == torch.long


@pytest.mark.cuda
def test_runs_on_cuda_and_matches_cpu():
    v, f = sphere(0.05, (0.0, 0.0, 0.3))
    K = make_intrinsics(60.0, (15.5, 15.5))
    cpu = render_mesh(v[None], f, K, (32, 32))
    gpu = render_mesh(v[None].cuda(), f.cuda(), K.cuda(), (32, 32))
    assert gpu.image.is_cuda and gpu.fragments.face_index.is_cuda
    assert (gpu.mask.cpu() != cpu.mask).sum() <= 2
    assert torch.allclose(gpu.image.cpu()[:, :, cpu.mask[0]], cpu.image[:, :, cpu.mask[0]], atol=1e-3)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="verts_img_z"):
        rasterize(torch.zeros(4, 3), torch.tensor([[0, 1, 2]]), (8, 8))
    with pytest.raises(ValueError, match="faces"):
        rasterize(torch.zeros(1, 4, 3), torch.tensor([0, 1, 2]), (8, 8))
    with pytest.raises(ValueError, match="image_size"):
        rasterize(torch.zeros(1, 4, 3), torch.tensor([[0, 1, 2]]), (0, 8))
    with pytest.raises(ValueError, match="bbox"):
        crop_local(torch.zeros(2, 3, 8, 8), torch.zeros(4), 8)


# ----------------------------------------------------------------------------------------------------------
# Normals and shading.


def test_vertex_normals_of_a_sphere_point_outwards():
    v, f = sphere(0.1, (0.0, 0.0, 0.0), subdivisions=2)
    n = vertex_normals(v[None], f)[0]
    assert torch.allclose(n.norm(dim=-1), torch.ones(len(v)), atol=1e-5)
    assert (n * torch.nn.functional.normalize(v, dim=-1)).sum(-1).min() > 0.98


def test_shading_is_brightest_facing_the_camera_and_uses_vertex_colors():
    v, f = sphere(0.05, (0.0, 0.0, 0.3), subdivisions=3)
    K = make_intrinsics(120.0, (31.5, 31.5))
    red = torch.tensor([1.0, 0.0, 0.0]).expand(1, len(v), 3)
    out = render_mesh(v[None], f, K, (64, 64), vertex_colors=red, ambient=0.2)
    image = out.image[0]
    assert (image[1:] == 0).all() and (image[:, ~out.mask[0]] == 0).all()
    centre, rim = image[0, 32, 32].item(), image[0, 32, out.mask[0, 32].nonzero().min()].item()
    assert centre > 0.97 and 0.2 <= rim < 0.6


# ----------------------------------------------------------------------------------------------------------
# Two-hand mesh images.


def two_capsule_hands(batch: int = 2):
    """Stand-ins for MANO hands: the 'right hand' capsule on the image's left, the 'left hand' on its right,
    the right one nearer so that it hides the left where they overlap."""
    right_v, faces = capsule(0.02, 0.10, (-0.03, 0.0, 0.30))
    left_v, _ = capsule(0.02, 0.10, (0.0, 0.0, 0.35))
    return right_v.expand(batch, -1, -1).clone(), left_v.expand(batch, -1, -1).clone(), faces


def test_render_hands_labels_sides_colours_and_occlusion():
    right_v, left_v, faces = two_capsule_hands(2)
    K = make_intrinsics(150.0, (31.5, 31.5))
    out = render_hands(right_v, left_v, faces, faces, K.expand(2, 3, 3), (64, 64))
    assert out.image.shape == (2, 3, 64, 64) and out.side.dtype == torch.int8
    assert 0.0 <= out.image.min() and out.image.max() <= 1.0
    side = out.side[0]
    right_px = tuple(project(right_v[0].mean(0, keepdim=True), K)[0].round().long().tolist())
    left_px = tuple(project(left_v[0].mean(0, keepdim=True), K)[0].round().long().tolist())
    assert side[right_px[1], right_px[0]] == SIDE_RIGHT
    assert side[left_px[1], left_px[0]] == SIDE_LEFT
    assert side[0, 0] == SIDE_BACKGROUND and (out.image[0][:, side == SIDE_BACKGROUND] == 0).all()
    assert torch.equal(out.mask, out.side > 0)
    # where both project, the nearer (right) capsule is visible: its depth is the z-buffer's
    # (column 25 sees x = -0.013 m on the right capsule at 0.30 m and x = -0.015 m on the left one at 0.35 m)
    assert side[32, 25] == SIDE_RIGHT and 0.27 < out.depth[0, 32, 25] < 0.30
    # colours: the right hand is blue-ish, the left orange-ish, in the documented hues
    rgb_right = out.image[0][:, side == SIDE_RIGHT].mean(-1)
    rgb_left = out.image[0][:, side == SIDE_LEFT].mean(-1)
    assert rgb_right[2] > rgb_right[0] and rgb_left[0] > rgb_left[2]
    for rgb, ref in ((rgb_right, RIGHT_HAND_COLOR), (rgb_left, LEFT_HAND_COLOR)):
        ratio = rgb / torch.tensor(ref)
        assert (ratio.max() - ratio.min()) < 0.02  # shading scales the colour, keeps the hue
    # depth: metres, finite exactly where a hand is visible
    assert torch.isfinite(out.depth[out.mask]).all() and torch.isinf(out.depth[~out.mask]).all()
    assert 0.27 < out.depth[0][side == SIDE_RIGHT].min() < 0.30


def test_render_hands_does_not_draw_invalid_hands():
    right_v, left_v, faces = two_capsule_hands(3)
    K = make_intrinsics(150.0, (31.5, 31.5)).expand(3, 3, 3)
    right_valid = torch.tensor([True, False, True])
    left_valid = torch.tensor([True, True, False])
    out = render_hands(right_v, left_v, faces, faces, K, (48, 64), right_valid, left_valid)
    assert out.image.shape == (3, 3, 48, 64)
    present = [set(out.side[i].unique().tolist()) for i in range(3)]
    assert present == [{0, 1, 2}, {0, 2}, {0, 1}]
    # without the right hand in front, more of the left hand shows
    assert (out.side[1] == SIDE_LEFT).sum() > (out.side[0] == SIDE_LEFT).sum()


def _posed_procedural_hands(model, batch: int):
    """Both procedural hands, palms towards the camera, fingers up, side by side 0.5 m away; sample 1 bent."""
    from hands.rotation import axis_angle_to_matrix

    pose = torch.zeros(batch, 48)
    pose[1:, 3:] = 0.3 * torch.randn(batch - 1, 45, generator=torch.Generator().manual_seed(0))
    shape = torch.zeros(batch, 10)
    right = model("right", pose, shape).verts
    left = model("left", pose, shape).verts
    face_camera = axis_angle_to_matrix(torch.tensor([math.pi / 2, 0.0, 0.0]))
    right_rot = axis_angle_to_matrix(torch.tensor([0.0, 0.0, math.pi / 2])) @ face_camera
    left_rot = axis_angle_to_matrix(torch.tensor([0.0, 0.0, -math.pi / 2])) @ face_camera
    right = (right - right.mean(1, keepdim=True)) @ right_rot.T + torch.tensor([-0.07, 0.0, 0.5])
    left = (left - left.mean(1, keepdim=True)) @ left_rot.T + torch.tensor([0.07, 0.01, 0.55])
    return right, left


def test_render_procedural_hands_and_write_png(tmp_path, monkeypatch):
    """The two procedural MANO-format hands (hands.mano): each side where its hand projects, the local crop
    of a hand shows that hand; the 256 px picture of docs/images/render-hands.png (global | local right | local
    left) is written to a temporary folder (a test changes no tracked file)."""
    mano = pytest.importorskip("hands.mano")
    from hands.camera import bbox_from_points

    monkeypatch.setenv("ATTENTIONHAND_CACHE", str(tmp_path))  # the procedural files go to a temporary cache
    monkeypatch.delenv("HANDS_MANO_DIR", raising=False)
    model = mano.HandModel()
    batch = 2
    right, left = _posed_procedural_hands(model, batch)
    faces_right, faces_left = model.faces_for("right"), model.faces_for("left")

    size = 64
    K = make_intrinsics((75.0, 75.0), ((size - 1) / 2, (size - 1) / 2)).expand(batch, 3, 3)
    out = render_hands(right, left, faces_right, faces_left, K, (size, size))
    for i in range(batch):
        for verts, label in ((right, SIDE_RIGHT), (left, SIDE_LEFT)):
            col, row = project(verts[i].mean(0, keepdim=True), K[i])[0].round().long().tolist()
            assert out.side[i, row, col] == label  # the palm centre
            assert (out.side[i] == label).sum() > 100
    right_box = bbox_from_points(project(right, K))
    local_side = crop_local((out.side == SIDE_RIGHT).float()[:, None], right_box, 32, scale=1.1, mode="nearest")
    assert (local_side.mean((1, 2, 3)) > 0.25).all()  # the right hand fills a good part of its local image

    # The picture for the docs, at 256 px.
    big = 256
    K_big = make_intrinsics((300.0, 300.0), ((big - 1) / 2, (big - 1) / 2)).expand(batch, 3, 3)
    out_big = render_hands(right, left, faces_right, faces_left, K_big, (big, big))
    local_right = crop_local(out_big.image, bbox_from_points(project(right, K_big)), big, scale=1.2)
    local_left = crop_local(out_big.image, bbox_from_points(project(left, K_big)), big, scale=1.2)
    grid = torch.cat([torch.cat([out_big.image[i], local_right[i], local_left[i]], -1) for i in range(batch)], -2)
    from PIL import Image

    path = tmp_path / "render-hands.png"
    Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().numpy()).save(path)
    assert Image.open(path).size == (3 * big, batch * big)


# ----------------------------------------------------------------------------------------------------------
# Local crops.


def test_crop_local_maps_the_box_to_the_square_crop():
    images = torch.zeros(2, 3, 48, 64)
    boxes = torch.tensor([[10.0, 12.0, 30.0, 24.0], [40.0, 5.0, 52.0, 41.0]])
    centres = ((boxes[:, :2] + boxes[:, 2:]) / 2).round().long()
    for i, (cx, cy) in enumerate(centres.tolist()):
        images[i, :, cy, cx] = 1.0
    size = 32
    crops, affine = crop_local(images, boxes, size, scale=1.0, return_affine=True)
    assert crops.shape == (2, 3, size, size)
    # the bright pixel lands at the crop centre (intensity-weighted centroid)
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    for i in range(2):
        w = crops[i, 0]
        assert w.sum() > 0
        cx = (w * xs).sum() / w.sum()
        cy = (w * ys).sum() / w.sum()
        expected = apply_affine(centres[i].float()[None, None], affine[i : i + 1])[0, 0]
        assert torch.allclose(torch.stack([cx, cy]), expected, atol=0.05)
        assert torch.allclose(expected, torch.tensor([(size - 1) / 2] * 2), atol=2.0)
    # the longer side of the box spans the crop exactly: its end points land on the crop's borders
    corners = torch.tensor([[[10.0, 18.0], [30.0, 18.0]], [[46.0, 5.0], [46.0, 41.0]]])
    mapped = apply_affine(corners, affine)
    assert torch.allclose(mapped[0, :, 0], torch.tensor([-0.5, size - 0.5]), atol=0.6)
    assert torch.allclose(mapped[1, :, 1], torch.tensor([-0.5, size - 0.5]), atol=0.6)
    # scale > 1 shows more around the box: the bright pixel's blob shrinks
    wider = crop_local(images, boxes, size, scale=2.0)
    assert (wider[:, 0] > 0.01).sum() < (crops[:, 0] > 0.01).sum()
