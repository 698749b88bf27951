"""IHMR's collision term, in torch: how deep one hand's vertices sit inside the other hand's mesh.

The reference (penincillin/IHMR ``LossUtil._collision_loss`` -> penincillin/SDF_ihmr ``SDFLoss``, adapted from
JiangWenPL/multiperson) builds, with a custom CUDA op and without gradient, a 32^3 grid ``phi`` over each
hand's bounding box (enlarged 1.2x, a cube of half-side ``scale``): ``phi`` = the distance to the hand's
surface for grid points inside the mesh (ray-parity test), 0 outside. It samples the grid trilinearly
(``grid_sample``) at the *other* hand's vertices, in the box's normalised units, and sums
``phi / num_hands**2`` over the vertices of both hands: per sample, ``sum_v phi(v) / 4``. The gradient
reaches only the penetrating vertices (phi is a constant of the other mesh).

Here the same quantity is computed exactly at the vertices, with no grid and no custom op:

- ``depth(p)`` = distance from ``p`` to the other hand's triangles when ``p`` is inside that hand, 0 outside
  (:func:`penetration_depth`, metres);
- inside = an odd number of ray crossings (:func:`ray_parity`, the reference's test) of the mesh with its
  wrist opening closed by a fan of triangles (:func:`close_boundary`): MANO's mesh is open at the wrist
  (16 boundary edges), where the reference's parity test on the open mesh miscounts;
- the loss divides the depth by the owner's box scale (the reference's normalised units) and sums /4, so that
  the reference's weights apply unchanged (:func:`collision_loss`). The other mesh is detached, as the
  reference's grid is.

Only vertices inside the other hand's bounding box can be inside it, so only those are measured: in the usual
case (hands apart or touching) that is a small part of the 778.

Convention: vertices in any common 3D frame (camera axes), metres; faces (F, 3) long.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "close_boundary",
    "point_triangle_distance",
    "point_triangle_distance_pairs",
    "surface_distance",
    "winding_number",
    "ray_parity",
    "penetration_depth",
    "collision_loss",
    "box_scale",
]

BOX_ENLARGE = 0.2  # the reference's scale_factor: the grid covers the box enlarged by 20 %
NUM_HANDS = 2


def close_boundary(faces: Tensor) -> Tensor:
    """Faces that close every boundary loop of a triangle mesh with a fan from the loop's first vertex,
    wound against the loop's existing half-edges (so the closed mesh keeps one orientation).

    faces: (F, 3) long. Returns (F_cap, 3) long on the faces' device (empty for a closed mesh); for MANO's
    16-edge wrist opening, 14 triangles. No new vertices are added. Raises ValueError for a boundary that is
    not a set of simple loops (a non-manifold mesh).
    """
    directed = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2).tolist()  # half-edges u -> v
    present = {(u, v) for u, v in directed}
    boundary = {u: v for u, v in directed if (v, u) not in present}  # half-edges without a twin
    if len(boundary) != sum(1 for u, v in directed if (v, u) not in present):
        raise ValueError("close_boundary: a vertex starts two boundary edges (non-manifold mesh)")
    caps = []
    remaining = dict(boundary)
    while remaining:
        start = next(iter(remaining))
        loop = [start]
        nxt = remaining.pop(start)
        while nxt != start:
            if nxt not in remaining:
                raise ValueError("close_boundary: a boundary edge chain does not close into a loop")
            loop.append(nxt)
            nxt = remaining.pop(nxt)
        # the existing faces traverse the loop u -> v; the cap goes the other way: (b0, b[i+1], b[i])
        caps += [(loop[0], loop[i + 1], loop[i]) for i in range(1, len(loop) - 1)]
    return torch.tensor(caps, dtype=torch.long, device=faces.device).reshape(-1, 3)


def _cross(u: Tensor, v: Tensor, dim: int = -1) -> Tensor:
    """Cross product over the last axis, written out (exports to ONNX, where linalg.cross does not)."""
    ux, uy, uz = u[..., 0], u[..., 1], u[..., 2]
    vx, vy, vz = v[..., 0], v[..., 1], v[..., 2]
    return torch.stack([uy * vz - uz * vy, uz * vx - ux * vz, ux * vy - uy * vx], dim=-1)


def _segment_distance2(points: Tensor, start: Tensor, end: Tensor) -> Tensor:
    """Squared distance from points (..., 3) to segments start-end (..., 3), broadcast -> (...)."""
    edge = end - start  # (1, F, 3)
    t = ((points - start) * edge).sum(-1) / (edge * edge).sum(-1).clamp_min(1e-20)  # (N, F)
    closest = start + t.clamp(0.0, 1.0)[..., None] * edge  # (N, F, 3)
    return ((points - closest) ** 2).sum(-1)


def point_triangle_distance_pairs(points: Tensor, triangles: Tensor) -> Tensor:
    """Euclidean distance from points (..., 3) to triangles (..., 3, 3) (broadcast against each other; the
    closest point anywhere on the triangle). Differentiable in both: per pair, the plane when the point
    projects inside the triangle, else the nearest edge. Returns (...)."""
    p = points
    a, b, c = triangles[..., 0, :], triangles[..., 1, :], triangles[..., 2, :]
    normal = _cross(b - a, c - a, dim=-1)
    normal_len2 = (normal * normal).sum(-1).clamp_min(1e-20)
    inside = (
        ((_cross(b - a, p - a, dim=-1) * normal).sum(-1) >= 0)
        & ((_cross(c - b, p - b, dim=-1) * normal).sum(-1) >= 0)
        & ((_cross(a - c, p - c, dim=-1) * normal).sum(-1) >= 0)
    )  # the projection onto the plane falls inside the triangle
    plane2 = ((p - a) * normal).sum(-1) ** 2 / normal_len2
    edges2 = torch.minimum(
        torch.minimum(_segment_distance2(p, a, b), _segment_distance2(p, b, c)), _segment_distance2(p, c, a)
    )
    dist2 = torch.where(inside, plane2, edges2)
    return dist2.clamp_min(1e-18).sqrt()


def point_triangle_distance(points: Tensor, triangles: Tensor) -> Tensor:
    """Distance from each point to each triangle: points (N, 3), triangles (F, 3, 3) -> (N, F)."""
    return point_triangle_distance_pairs(points[:, None, :], triangles[None])


def winding_number(points: Tensor, triangles: Tensor) -> Tensor:
    """Generalised winding number of a triangle soup at each point (Jacobson et al. 2013): the sum of the
    triangles' signed solid angles / 4 pi (Van Oosterom & Strackee). For a closed, consistently oriented mesh:
    +-1 inside (the sign follows the orientation), 0 outside. (Robust but ~5x the work of :func:`ray_parity`;
    kept as a check.)

    points: (N, 3); triangles: (F, 3, 3). Returns (N,).
    """
    rel = triangles[None] - points[:, None, None, :]  # (N, F, 3, 3)
    a, b, c = rel[:, :, 0], rel[:, :, 1], rel[:, :, 2]
    la, lb, lc = a.norm(dim=-1), b.norm(dim=-1), c.norm(dim=-1)
    numerator = (a * _cross(b, c, dim=-1)).sum(-1)
    denominator = la * lb * lc + (a * b).sum(-1) * lc + (b * c).sum(-1) * la + (c * a).sum(-1) * lb
    return (2.0 * torch.atan2(numerator, denominator)).sum(-1) / (4.0 * math.pi)


def _ray_frame(dtype, device) -> Tensor:
    """A fixed rotation taking the ray direction (1, 2, 3)/|.| (no mesh axis is likely to align with it)
    to +z. (3, 3)."""
    z = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    z = z / z.norm()
    x = torch.linalg.cross(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), z)
    x = x / x.norm()
    y = torch.linalg.cross(z, x)
    return torch.stack([x, y, z]).to(dtype=dtype, device=device)


def ray_parity(points: Tensor, triangles: Tensor, *, cells: int = 16) -> Tensor:
    """Inside test of a closed mesh by ray casting, as the reference's kernel: a point is inside when a ray
    from it crosses the surface an odd number of times. The ray is a fixed direction; in a frame where it is
    +z a crossing is a triangle whose xy projection holds the point and whose plane lies above it.

    Only the triangles whose xy bounding box shares a cell of a ``cells`` x ``cells`` grid with the point are
    tested (all of them while tracing for export, where shapes must not depend on the data).

    points: (N, 3); triangles: (F, 3, 3). Returns (N,) bool.
    """
    frame = _ray_frame(points.dtype, points.device)
    p = points @ frame.T  # (N, 3)
    t = triangles @ frame.T  # (F, 3, 3)
    if torch.jit.is_tracing() or cells < 1:
        candidates = torch.arange(t.shape[0], device=t.device).expand(p.shape[0], -1)  # (N, F)
    else:
        candidates = _grid_candidates(p[:, :2], t[:, :, :2], cells)  # (N, K), -1 pads
    safe = candidates.clamp(min=0)
    a, b, c = t[safe, 0], t[safe, 1], t[safe, 2]  # (N, K, 3)
    px, py = p[:, None, 0], p[:, None, 1]  # (N, 1)

    def edge(u: Tensor, v: Tensor) -> Tensor:  # twice the signed area of (u, v, p) in xy: (N, K)
        return (v[..., 0] - u[..., 0]) * (py - u[..., 1]) - (v[..., 1] - u[..., 1]) * (px - u[..., 0])

    e_bc, e_ca, e_ab = edge(b, c), edge(c, a), edge(a, b)
    area = e_bc + e_ca + e_ab  # twice the triangle's signed xy area
    holds = ((e_bc >= 0) & (e_ca >= 0) & (e_ab >= 0)) | ((e_bc <= 0) & (e_ca <= 0) & (e_ab <= 0))
    z = (e_bc * a[..., 2] + e_ca * b[..., 2] + e_ab * c[..., 2]) / torch.where(area == 0, torch.ones_like(area), area)
    crossing = holds & (area != 0) & (z > p[:, None, 2]) & (candidates >= 0)
    return crossing.sum(dim=1) % 2 == 1


def _grid_candidates(points_xy: Tensor, triangles_xy: Tensor, cells: int) -> Tensor:
    """For each point (N, 2), the indices of the triangles (F, 3, 2) whose xy bounding box touches the
    point's cell of a uniform grid over the triangles' extent; (N, K) long, padded with -1."""
    low, high = triangles_xy.amin(dim=1), triangles_xy.amax(dim=1)  # (F, 2)
    origin = low.amin(dim=0)
    size = (high.amax(dim=0) - origin).clamp_min(1e-12) / cells  # (2,)
    first = ((low - origin) / size).floor().long().clamp(0, cells - 1)  # (F, 2)
    last = ((high - origin) / size).floor().long().clamp(0, cells - 1)
    span = last - first + 1  # (F, 2)
    steps_x = torch.arange(int(span[:, 0].max()), device=points_xy.device)
    steps_y = torch.arange(int(span[:, 1].max()), device=points_xy.device)
    covered = (steps_x[None, :, None] < span[:, 0, None, None]) & (steps_y[None, None, :] < span[:, 1, None, None])
    cell = (first[:, 0, None, None] + steps_x[None, :, None]) * cells + first[:, 1, None, None] + steps_y[None, None, :]
    triangle = torch.arange(triangles_xy.shape[0], device=points_xy.device)[:, None, None].expand_as(cell)
    cell, triangle = cell[covered], triangle[covered]  # one entry per (triangle, covered cell)
    order = torch.argsort(cell, stable=True)
    cell, triangle = cell[order], triangle[order]
    counts = torch.bincount(cell, minlength=cells * cells)
    starts = torch.cumsum(counts, 0) - counts
    table = torch.full((cells * cells, int(counts.max())), -1, dtype=torch.long, device=points_xy.device)
    table[cell, torch.arange(cell.numel(), device=cell.device) - starts[cell]] = triangle
    index = ((points_xy - origin) / size).floor().long()  # (N, 2)
    inside_grid = ((index >= 0) & (index < cells)).all(dim=1)
    flat = index[:, 0].clamp(0, cells - 1) * cells + index[:, 1].clamp(0, cells - 1)
    candidates = table[flat]
    return torch.where(inside_grid[:, None], candidates, torch.full_like(candidates, -1))


def _chunks(n_points: int, n_faces: int, budget: int = 1 << 20) -> int:
    """Points per chunk so that a (chunk, F) pair table holds about ``budget`` entries."""
    return max(1, budget // max(n_faces, 1))


def penetration_depth(points: Tensor, verts: Tensor, faces: Tensor, cap_faces: Optional[Tensor] = None) -> Tensor:
    """How deep each point lies inside a mesh: the distance to the mesh's triangles for a point inside it
    (:func:`ray_parity` on the mesh closed by ``cap_faces``), 0 for a point outside.

    points: (N, 3); verts: (V, 3); faces: (F, 3) long; cap_faces: (C, 3) long closing the mesh's openings
    (:func:`close_boundary`; None computes them). Returns (N,) metres (the frame's unit), differentiable in
    ``points`` and ``verts`` where inside (callers detach ``verts`` to push only the points).
    """
    if cap_faces is None:
        cap_faces = close_boundary(faces)
    depth = points.new_zeros(points.shape[0])
    if points.shape[0] == 0:
        return depth
    triangles = verts[faces]  # (F, 3, 3)
    closed = torch.cat([triangles, verts[cap_faces]], 0).detach()  # (F + C, 3, 3)
    step = _chunks(points.shape[0], closed.shape[0])
    with torch.no_grad():
        inside = torch.cat([ray_parity(points[i : i + step].detach(), closed) for i in range(0, points.shape[0], step)])
    if torch.jit.is_tracing():  # export: fixed shapes, every point measured against every triangle
        distance = point_triangle_distance(points, triangles).min(dim=1).values
        return torch.where(inside, distance, torch.zeros_like(distance))
    index = inside.nonzero().flatten()
    if index.numel() == 0:
        return depth
    return depth.index_put((index,), surface_distance(points[index], verts, faces))


def surface_distance(points: Tensor, verts: Tensor, faces: Tensor) -> Tensor:
    """Distance from each point to a triangle mesh (the closest point on any triangle), exactly, measuring only
    the triangles that can be the closest: with ``d`` the distance to the nearest vertex, a triangle holding a
    point within ``d`` has every corner within ``d`` + its longest edge.

    points: (N, 3); verts: (V, 3); faces: (F, 3) long. Returns (N,), differentiable in points and verts.
    """
    triangles = verts[faces]  # (F, 3, 3)
    with torch.no_grad():
        to_verts = torch.cdist(points.detach(), verts.detach())  # (N, V)
        nearest = to_verts.min(dim=1).values  # (N,)
        longest = (triangles - triangles.roll(1, dims=1)).norm(dim=-1).amax(dim=1)  # (F,)
        farthest_corner = to_verts[:, faces].amax(dim=-1)  # (N, F)
        pair_point, pair_face = (farthest_corner <= nearest[:, None] + longest[None] + 1e-9).nonzero(as_tuple=True)
    step = _chunks(pair_point.numel(), 1, budget=1 << 20)
    distance = torch.cat([
        point_triangle_distance_pairs(points[pair_point[i : i + step]], triangles[pair_face[i : i + step]])
        for i in range(0, pair_point.numel(), step)
    ])  # (P,)
    table = points.new_full((points.shape[0], faces.shape[0]), float("inf"))
    return table.index_put((pair_point, pair_face), distance).min(dim=1).values


def box_scale(verts: Tensor) -> Tensor:
    """The reference's box scale of each mesh: (1 + 0.2) x half the largest side of its bounding box.

    verts: (B, V, 3). Returns (B,) in the verts' unit (no gradient, as the reference's boxes)."""
    with torch.no_grad():
        extent = verts.amax(dim=1) - verts.amin(dim=1)  # (B, 3)
        return (1.0 + BOX_ENLARGE) * 0.5 * extent.amax(dim=-1)


def collision_loss(
    right_verts: Tensor,
    left_verts: Tensor,
    faces_right: Tensor,
    faces_left: Tensor,
    *,
    caps_right: Optional[Tensor] = None,
    caps_left: Optional[Tensor] = None,
    robustifier: Optional[float] = None,
    samples: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """IHMR's collision term per sample.

    right_verts, left_verts: (B, 778, 3) both hands in one frame (e.g. right-wrist-rooted camera axes), metres.
    faces_right, faces_left: (F, 3) long; caps_*: their wrist caps (:func:`close_boundary`; None: computed).
    robustifier: the reference's ``sdf_robustifier`` (``phi <- (phi/r)^2 / ((phi/r)^2 + 1)``), None: off.
    samples: (B,) bool, the samples to measure (the others get 0); None: all.

    Returns (loss (B,), depth_sum (B,)): ``loss`` = sum over the vertices of both hands of
    ``depth / other hand's box scale / 4`` (the reference's normalised units; gradient to the penetrating
    vertices only), ``depth_sum`` the same sum in metres without the /4 (no gradient; the reference's
    ``collision_loss_origin_scale`` summed). Both are 0 for hands that do not interpenetrate.
    """
    if caps_right is None:
        caps_right = close_boundary(faces_right)
    if caps_left is None:
        caps_left = close_boundary(faces_left)
    device = right_verts.device
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):  # inside tests need float32
        with torch.autocast(device.type, enabled=False):
            return collision_loss(
                right_verts.float(), left_verts.float(), faces_right, faces_left,
                caps_right=caps_right, caps_left=caps_left, robustifier=robustifier, samples=samples,
            )
    batch = right_verts.shape[0]
    scale = {"right": box_scale(right_verts), "left": box_scale(left_verts)}
    verts = {"right": right_verts, "left": left_verts}
    faces = {"right": (faces_right, caps_right), "left": (faces_left, caps_left)}
    with torch.no_grad():
        low = {side: v.amin(dim=1) for side, v in verts.items()}  # (B, 3) boxes
        high = {side: v.amax(dim=1) for side, v in verts.items()}
    losses, depths = [], []
    measure = [True] * batch if samples is None or torch.jit.is_tracing() else samples.tolist()  # one host sync
    for b in range(batch):
        # 0 with a gradient path (to nothing): a batch without contact still backpropagates
        loss_b = (right_verts[b, :1, :1].sum() + left_verts[b, :1, :1].sum()) * 0.0
        depth_b = right_verts.new_zeros(())
        if not measure[b]:
            losses.append(loss_b)
            depths.append(depth_b)
            continue
        for side, other in (("right", "left"), ("left", "right")):
            points = verts[side][b]  # (778, 3)
            if torch.jit.is_tracing():  # export: fixed shapes, no pruning (the same values)
                depth = penetration_depth(points, verts[other][b].detach(), *faces[other])
            else:
                with torch.no_grad():
                    in_box = ((points >= low[other][b]) & (points <= high[other][b])).all(dim=-1)
                index = in_box.nonzero().flatten()
                if index.numel() == 0:
                    continue
                depth = penetration_depth(points[index], verts[other][b].detach(), *faces[other])  # (n,)
            phi = depth / scale[other][b]  # the other hand's normalised units, as its grid's
            if robustifier:
                frac = (phi / robustifier) ** 2
                phi = frac / (frac + 1.0)
            loss_b = loss_b + phi.sum() / NUM_HANDS**2
            depth_b = depth_b + depth.detach().sum()
        losses.append(loss_b)
        depths.append(depth_b)
    return torch.stack(losses), torch.stack(depths)
