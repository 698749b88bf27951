"""A batched pure-torch rasterizer for MANO-sized meshes, and the mesh images of AttentionHand.

Conventions (shared by every function here):

- Image points are pixels, x right, y down, pixel centres at integer coordinates: pixel ``(row i, col j)``
  is covered by a triangle when the point ``(x=j, y=i)`` lies inside it (or on its edge, see the tie rule).
- ``verts_img_z`` (B, V, 3) carries ``x, y`` in pixels and ``z`` the camera-space depth in metres
  (+z in front of the camera). Camera space is OpenCV's (x right, y down, z forward), as in hands.camera.
- Images are (B, C, H, W) floats in [0, 1]; per-pixel maps are (B, H, W).
- Face indices in fragments index the faces tensor given for that batch element (0..F-1); -1 is empty.

Why our own rasterizer: pytorch3d (the renderer AttentionHand used) cannot be installed on these machines,
and the mesh images must be made on the device of the labels, inside the training loop. moderngl is not
differentiable and needs a GL context. So this is a small torch rasterizer:

1. every face's pixel bounding box is computed and clipped to the image; faces with a vertex behind the
   near plane, non-finite vertices, zero screen area or no pixel centre inside their box are dropped;
2. faces are bucketed by the width and height of their box: windows of 1, 2, 3, 4, 6, 8, 12, 16, ...
   pixels along each axis, capped at the image size, so the last buckets are the fallback that holds
   faces as large as the image; each bucket evaluates its faces' windows densely (edge functions), so the
   work is under 2.25x the faces' box areas (1.5x per axis) and no face is ever clipped by its window;
3. candidates are reduced per pixel with ``scatter_reduce(..., "amax")`` on one int64 key that packs
   (float32 inverse-depth bits, face index): the nearest face wins, exact depth ties go to the lower face
   index;
4. barycentrics and depth are computed once per pixel from the winning face (differentiable w.r.t.
   the vertices, though not through the choice of the winner).

Tie rule: coverage is inclusive, a pixel centre exactly on an edge belongs to every face sharing that edge
(the z-buffer then picks one of them). Edge functions use the difference form (x_a - p_x)(y_b - p_y) -
(y_a - p_y)(x_b - p_x), which a neighbour sharing the edge (b, a) evaluates to exactly the negated value,
so adjacent faces leave no cracks even in floating point.

Host synchronisation: one, the ``.tolist()`` of the per-bucket face counts that sizes the buckets'
tensors (see :func:`rasterize`). Everything else stays on the inputs' device. For CPU tensors, where
nothing needs synchronising, the per-pixel work (barycentrics, shading) is done at the covered pixels only
(``nonzero``); on an accelerator every pixel is computed and masked (see ``_COMPACT_ON_CPU``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from hands.camera import bbox_crop_affine, crop_image, project, scale_bbox, square_bbox

__all__ = [
    "Fragments",
    "MeshRender",
    "RenderOutput",
    "RIGHT_HAND_COLOR",
    "LEFT_HAND_COLOR",
    "DEFAULT_AMBIENT",
    "DEFAULT_LIGHT_DIR",
    "SIDE_BACKGROUND",
    "SIDE_RIGHT",
    "SIDE_LEFT",
    "rasterize",
    "vertex_normals",
    "interpolate",
    "shade",
    "render_mesh",
    "render_hands",
    "crop_local",
]

# Colours of the two hands in mesh images (RGB in [0, 1], before shading). AttentionHand's mesh
# images are grey-shaded; we tint the sides so that the generator can tell the right hand from the left.
RIGHT_HAND_COLOR = (0.55, 0.78, 0.95)  # light cyan / blue-grey
LEFT_HAND_COLOR = (0.98, 0.68, 0.55)  # light orange / pink
# Lambert shading: intensity = ambient + (1 - ambient) * |n . l| (two-sided: MANO's wrist is open, so the
# inside of the mesh can be seen and is lit as well).
DEFAULT_AMBIENT = 0.3
# Direction from the surface towards the light, camera space: a light at the camera, shining along +z.
DEFAULT_LIGHT_DIR = (0.0, 0.0, -1.0)
# Values of RenderOutput.side.
SIDE_BACKGROUND, SIDE_RIGHT, SIDE_LEFT = 0, 1, 2

# Faces are evaluated in chunks of at most this many candidate pixels (bounds the temporaries' memory).
_MAX_CANDIDATES = 1 << 22
_LOW_BITS = (1 << 32) - 1  # low half of a packed z-buffer key
# For CPU tensors, per-pixel work (barycentrics, shading) runs on the covered pixels only, found with
# nonzero (no host sync on a CPU). Elsewhere, and under torch.compile, every pixel is computed and masked.
# Tests switch this off to run the accelerator code path on a CPU.
_COMPACT_ON_CPU = True


@dataclass
class Fragments:
    """Per-pixel rasterization result.

    face_index: (B, H, W) long, index of the visible face in that batch element's faces, -1 where empty.
    bary: (B, H, W, 3) perspective-correct barycentric coordinates of the pixel centre in that face
        (zeros where empty).
    depth: (B, H, W) camera-space depth in metres, +inf where empty.
    """

    face_index: Tensor
    bary: Tensor
    depth: Tensor

    @property
    def mask(self) -> Tensor:
        """(B, H, W) bool, True where a face is visible."""
        return self.face_index >= 0


@dataclass
class MeshRender:
    """Output of :func:`render_mesh`.

    image: (B, 3, H, W) shaded colours in [0, 1], ``background`` where empty.
    depth: (B, H, W) metres, +inf where empty. mask: (B, H, W) bool.
    fragments: the :class:`Fragments` it was shaded from.
    """

    image: Tensor
    depth: Tensor
    mask: Tensor
    fragments: Fragments


@dataclass
class RenderOutput:
    """Output of :func:`render_hands`.

    image: (B, 3, H, W) float in [0, 1], black background, right hand in RIGHT_HAND_COLOR and left hand in
        LEFT_HAND_COLOR, Lambert-shaded with a light at the camera.
    depth: (B, H, W) metres, +inf where empty.
    side: (B, H, W) int8, SIDE_BACKGROUND (0), SIDE_RIGHT (1) or SIDE_LEFT (2).
    mask: (B, H, W) bool, True where either hand is visible.
    """

    image: Tensor
    depth: Tensor
    side: Tensor
    mask: Tensor


def _check_image_size(image_size) -> tuple[int, int]:
    try:
        height, width = (int(image_size[0]), int(image_size[1]))
    except (TypeError, IndexError, ValueError):
        raise ValueError(f"image_size must be (H, W) integers, got {image_size!r}") from None
    if height <= 0 or width <= 0:
        raise ValueError(f"image_size must be positive (H, W), got {image_size!r}")
    return height, width


def _batched_faces(faces: Tensor, batch: int, num_verts: int, name: str = "faces") -> Tensor:
    """faces: (F, 3) or (B, F, 3) -> (B, F, 3) long, checked."""
    if faces.dim() == 2:
        faces = faces.unsqueeze(0).expand(batch, -1, -1)
    if faces.dim() != 3 or faces.shape[-1] != 3 or faces.shape[0] != batch:
        raise ValueError(f"{name} must be (F, 3) or (B={batch}, F, 3), got {tuple(faces.shape)}")
    if faces.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be an integer tensor, got {faces.dtype}")
    return faces.long()


def _gather_faces(verts: Tensor, faces: Tensor) -> Tensor:
    """verts: (B, V, C); faces: (B, F, 3) -> (B, F, 3, C) the vertices of each face."""
    batch, num_faces = faces.shape[:2]
    index = faces.reshape(batch, num_faces * 3, 1).expand(-1, -1, verts.shape[-1])
    return torch.gather(verts, 1, index).reshape(batch, num_faces, 3, verts.shape[-1])


def _edge_products(ex: Tensor, ey: Tensor, a: int, b: int) -> Tensor:
    """Edge function of the edge (a, b) at the pixel centres (twice the signed area of (p, v_a, v_b)).

    ex, ey: (n, 3, ., .) vertex minus pixel coordinates. The difference form keeps the test watertight:
    the edge (b, a) of a neighbouring face evaluates to exactly the negated value (same two products).
    """
    return ex[:, a] * ey[:, b] - ey[:, a] * ex[:, b]


def _depth_key(inv_depth: Tensor, face_id: Tensor) -> Tensor:
    """Pack (inverse depth >= 0, face index) into one int64 whose maximum is the nearest face.

    The bit pattern of a non-negative float32 is monotonic in its value, so ``(bits << 32) | (2**32 - 1 -
    face_id)`` orders by inverse depth first (float32 precision) and prefers the lower face index on exact
    ties. Candidates outside their face carry inverse depth 0, i.e. a key below 2**32 ("empty").
    """
    bits = inv_depth.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    return (bits << 32) | (_LOW_BITS - face_id)


def rasterize(
    verts_img_z: Tensor,
    faces: Tensor,
    image_size,
    *,
    near: float = 1e-3,
    cull_backfaces: bool = False,
    face_valid: Tensor | None = None,
    max_candidates: int = _MAX_CANDIDATES,
    compile: bool = False,
) -> Fragments:
    """Rasterize triangle meshes with a z-buffer.

    verts_img_z: (B, V, 3) vertex x, y in pixels (pixel centres at integer coordinates, x right, y down) and
        z, the camera-space depth in metres.
    faces: (F, 3) shared by the batch, or (B, F, 3) one face list per batch element; long.
    image_size: (H, W) pixels.
    near: faces with any vertex at z <= near (metres) are dropped (no clipping).
    cull_backfaces: drop faces whose normal (v1 - v0) x (v2 - v0) points away from the camera, which in
        this image convention (x right, y down) is a positive screen-space signed area. Off by default
        (MANO's wrist is open, so its inside can be seen).
    face_valid: optional (B, F) bool, faces to draw (False faces are dropped).
    max_candidates: a bucket's faces are evaluated in chunks of at most this many candidate pixels.
    compile: run the per-bucket and per-pixel kernels through ``torch.compile`` (several times faster on a
        CPU once compiled; the first calls compile, tens of seconds). Same results up to float rounding.

    Returns :class:`Fragments` on the device of ``verts_img_z``; bary and depth in its dtype (computed in
    at least float32). Depth is exact for perspective projections: 1/z is affine in the image plane, so
    depth = 1 / sum_i(l_i / z_i) with l the screen-space barycentrics, and bary_i = depth * l_i / z_i.
    """
    if verts_img_z.dim() != 3 or verts_img_z.shape[-1] != 3:
        raise ValueError(f"verts_img_z must be (B, V, 3), got {tuple(verts_img_z.shape)}")
    if not verts_img_z.is_floating_point():
        raise ValueError(f"verts_img_z must be a floating tensor, got {verts_img_z.dtype}")
    height, width = _check_image_size(image_size)
    batch, num_verts = verts_img_z.shape[:2]
    device, out_dtype = verts_img_z.device, verts_img_z.dtype
    dtype = torch.promote_types(out_dtype, torch.float32)  # edge functions need at least float32
    verts_img_z = verts_img_z.to(dtype)
    faces = _batched_faces(faces.to(device), batch, num_verts)
    num_faces = faces.shape[1]
    if face_valid is not None and tuple(face_valid.shape) != (batch, num_faces):
        raise ValueError(f"face_valid must be (B={batch}, F={num_faces}), got {tuple(face_valid.shape)}")
    num_pixels = batch * height * width
    if num_faces == 0:
        return Fragments(
            face_index=torch.full((batch, height, width), -1, dtype=torch.long, device=device),
            bary=torch.zeros(batch, height, width, 3, dtype=out_dtype, device=device),
            depth=torch.full((batch, height, width), float("inf"), dtype=out_dtype, device=device),
        )

    tri = _gather_faces(verts_img_z, faces).reshape(batch * num_faces, 3, 3)  # (N, 3, 3), N = B * F
    x, y, z = tri[..., 0], tri[..., 1], tri[..., 2]  # (N, 3)

    # 1. Faces to draw and the box of pixel centres each one can cover, clipped to the image.
    area = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (y[:, 1] - y[:, 0]) * (x[:, 2] - x[:, 0])  # (N,) 2x
    valid = (z > near).all(-1) & torch.isfinite(tri).all(-1).all(-1) & (area != 0)
    if cull_backfaces:
        valid &= area < 0
    if face_valid is not None:
        valid &= face_valid.reshape(-1).to(device=device, dtype=torch.bool)
    # Clamp before rounding so huge / non-finite coordinates cannot overflow the integer conversion.
    x_box = torch.nan_to_num(x, nan=-2.0).clamp(-2.0, width + 1.0)
    y_box = torch.nan_to_num(y, nan=-2.0).clamp(-2.0, height + 1.0)
    col0 = torch.ceil(x_box.amin(-1)).long().clamp(min=0)
    col1 = torch.floor(x_box.amax(-1)).long().clamp(max=width - 1)
    row0 = torch.ceil(y_box.amin(-1)).long().clamp(min=0)
    row1 = torch.floor(y_box.amax(-1)).long().clamp(max=height - 1)
    box_w, box_h = col1 - col0 + 1, row1 - row0 + 1
    valid &= (box_w > 0) & (box_h > 0)

    # Window-pass copy of the faces: counter-clockwise on screen (swap v1, v2 where the area is negative)
    # so that "inside" is simply all three edge functions >= 0, and the inverse-depth weights per edge.
    flip = (area < 0).view(-1, 1, 1)
    tri_ccw = torch.where(flip, tri[:, [0, 2, 1]], tri)  # (N, 3, 3)
    safe = valid.view(-1, 1)
    z_ccw = torch.where(safe, tri_ccw[..., 2], torch.ones_like(tri_ccw[..., 2]))
    area_abs = torch.where(valid, area.abs(), torch.ones_like(area))
    inv_z_weight = 1.0 / (z_ccw * area_abs.unsqueeze(-1))  # (N, 3): 1 / z_i / (2 area)
    face_id = torch.arange(num_faces, device=device).repeat(batch)  # (N,) index within its batch element
    batch_id = torch.arange(batch, device=device).repeat_interleave(num_faces)  # (N,)
    base = (batch_id * height + row0) * width + col0  # (N,) flat index of the box's first pixel

    # 2. Buckets by the box's width and height separately (a long thin face does not pay for a square
    #    window): bucket (i, j) holds faces with box_w <= sizes_x[i] and box_h <= sizes_y[j], sizes
    #    1, 2, 3, 4, 6, 8, 12, 16, ... (powers of two and 1.5x powers of two: a window is at most 1.5x
    #    the box along each axis), capped at the image size, so the last buckets are the fallback for faces
    #    as large as the image.
    sizes_x, sizes_y = _window_sizes(width), _window_sizes(height)
    levels_y = len(sizes_y)
    level_x = torch.searchsorted(torch.tensor(sizes_x, device=device), box_w)  # (N,) first size >= box_w
    level_y = torch.searchsorted(torch.tensor(sizes_y, device=device), box_h)
    num_buckets = len(sizes_x) * levels_y
    bucket = torch.where(valid, level_x * levels_y + level_y, torch.full_like(level_x, num_buckets))
    order = torch.argsort(bucket)  # dropped faces last
    # Host sync (the only one): the face count of each bucket sizes its dense window tensors.
    counts = torch.bincount(bucket, minlength=num_buckets + 1).tolist()

    # Per-face data of the drawn faces in bucket order, packed into one float and one integer table so
    # that each chunk is a slice (a view), not nine gathers. Visibility is discrete: no gradients here.
    drawn = order[: sum(counts[:num_buckets])]
    face_float = torch.cat([tri_ccw.reshape(-1, 9), inv_z_weight], 1).detach()[drawn]  # (M, 12)
    face_int = torch.stack([col0, row0, col1, row1, face_id, base], 1)[drawn]  # (M, 6)

    # z-buffer of packed keys; one spare image of padding takes the window positions past a box's end.
    key = torch.zeros(num_pixels + height * width, dtype=torch.int64, device=device)
    window_kernel, resolve_kernel = _kernels(compile)
    # Compiled kernels: no size-1 window or chunk (dynamic shapes would specialise on 1 and recompile); a
    # wider window only adds masked positions and a repeated face changes nothing under "amax".
    least = 2 if compile else 1
    start = 0
    for b in range(num_buckets):
        count = counts[b]
        if count == 0:
            continue
        win_w = min(max(sizes_x[b // levels_y], least), width)
        win_h = min(max(sizes_y[b % levels_y], least), height)
        chunk = max(least, max_candidates // (win_w * win_h))
        for lo in range(start, start + count, chunk):
            hi = min(lo + chunk, start + count)
            chunk_float, chunk_int = face_float[lo:hi], face_int[lo:hi]
            if hi - lo < least:
                chunk_float, chunk_int = chunk_float.repeat(least, 1), chunk_int.repeat(least, 1)
            window_kernel(key, chunk_float, chunk_int, win_w, win_h, width)
        start += count

    # 3. Winners: the face index and, from the winning face, perspective-correct barycentrics and depth.
    compact = _COMPACT_ON_CPU and device.type == "cpu" and not compile
    face_index, bary, depth = resolve_kernel(key[:num_pixels], tri, valid, area, batch, height, width, compact)
    return Fragments(
        face_index=face_index.view(batch, height, width),
        bary=bary.reshape(batch, height, width, 3).to(out_dtype),
        depth=depth.reshape(batch, height, width).to(out_dtype),
    )


def _window_sizes(limit: int) -> list[int]:
    """Window sides 1, 2, 3, 4, 6, 8, 12, 16, ... up to the first one >= limit, which is set to limit."""
    sizes, power = [1], 2
    while sizes[-1] < limit:
        sizes += [power, power * 3 // 2] if power > 2 else [2, 3]
        power *= 2
    sizes = sorted(set(sizes))
    cut = next(i for i, size in enumerate(sizes) if size >= limit)
    return sizes[:cut] + [limit]


def _resolve(
    key: Tensor, tri: Tensor, valid: Tensor, area: Tensor, batch: int, height: int, width: int, compact: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Unpack the z-buffer and interpolate at each pixel centre from its winning face.

    key: (B*H*W,) packed z-buffer; tri: (N, 3, 3) faces in their own vertex order (N = B * F);
    valid: (N,) bool; area: (N,) twice the signed screen area; compact: compute only at covered pixels
    (see _COMPACT_ON_CPU). Returns face_index (B*H*W,) long (-1 empty),
    bary (B*H*W, 3) and depth (B*H*W,) (+inf where empty). Barycentrics are anchored at v0 for precision:
    p - v0 = l1 (v1 - v0) + l2 (v2 - v0).
    """
    num_faces = tri.shape[0] // batch
    dtype, device = tri.dtype, key.device
    x, y, z = tri[..., 0], tri[..., 1], tri[..., 2]  # (N, 3)
    hit = key >= (1 << 32)  # (B*H*W,)
    face_index = torch.where(hit, _LOW_BITS - (key & _LOW_BITS), torch.full_like(key, -1))
    det = torch.where(valid, area, torch.ones_like(area))  # (N,)
    z_safe = torch.where(valid.unsqueeze(-1), z, torch.ones_like(z))
    table = torch.stack(
        [
            x[:, 0],
            y[:, 0],
            (y[:, 2] - y[:, 0]) / det,  # d l1 / dx
            -(x[:, 2] - x[:, 0]) / det,  # d l1 / dy
            -(y[:, 1] - y[:, 0]) / det,  # d l2 / dx
            (x[:, 1] - x[:, 0]) / det,  # d l2 / dy
            1.0 / z_safe[:, 0],
            1.0 / z_safe[:, 1],
            1.0 / z_safe[:, 2],
        ],
        0,
    )  # (9, N): one row per coefficient, so that each gathered coefficient below is contiguous
    table = torch.where(valid, table, torch.zeros_like(table))
    num_pixels = batch * height * width
    if compact:
        pixels = hit.nonzero().squeeze(1)  # (P,) covered pixels only
        face_rows = face_index[pixels]
    else:
        pixels = torch.arange(num_pixels, device=device)  # (P,) every pixel, P = B*H*W
        face_rows = torch.where(hit, face_index, torch.zeros_like(face_index))
    face_rows = face_rows + torch.div(pixels, height * width, rounding_mode="floor") * num_faces
    x0, y0, a1, b1, a2, b2, inv_z0, inv_z1, inv_z2 = table.index_select(1, face_rows)  # (P,) each
    pix = pixels % (height * width)
    dx = (pix % width).to(dtype) - x0
    dy = torch.div(pix, width, rounding_mode="floor").to(dtype) - y0
    l1 = a1 * dx + b1 * dy
    l2 = a2 * dx + b2 * dy
    q = torch.stack([(1.0 - l1 - l2) * inv_z0, l1 * inv_z1, l2 * inv_z2], -1)  # (P, 3): l_i / z_i
    inv_depth = q.sum(-1)
    if compact:
        depth = torch.full((num_pixels,), float("inf"), dtype=dtype, device=device).index_copy(
            0, pixels, 1.0 / inv_depth
        )
        bary = torch.zeros(num_pixels, 3, dtype=dtype, device=device).index_copy(0, pixels, q / inv_depth[:, None])
    else:
        inv_depth = torch.where(hit, inv_depth, torch.ones((), dtype=dtype, device=device))
        depth = torch.where(hit, 1.0 / inv_depth, torch.full((), float("inf"), dtype=dtype, device=device))
        bary = torch.where(hit.unsqueeze(-1), q / inv_depth.unsqueeze(-1), torch.zeros((), dtype=dtype, device=device))
    return face_index, bary, depth


@functools.lru_cache(maxsize=2)
def _kernels(compiled: bool):
    """(window kernel, resolve kernel): eager functions, or their torch.compile'd versions (built on first
    use, dynamic shapes; the first call of a new configuration compiles for tens of seconds on a CPU)."""
    if not compiled:
        return _rasterize_window, _resolve
    return torch.compile(_rasterize_window, dynamic=True), torch.compile(_resolve, dynamic=True)


def _rasterize_window(key: Tensor, face_float: Tensor, face_int: Tensor, win_w: int, win_h: int, width: int) -> None:
    """Evaluate n faces over a dense (win_h, win_w) window anchored at their box corner; update ``key``.

    key: (B*H*W + H*W,) int64 packed (inverse depth, face) z-buffer, updated in place (scatter amax).
    face_float: (n, 12) the face's vertices (x, y pixels, z metres; counter-clockwise on screen) flattened,
    then 1 / (z_i * twice the area) for i = 0, 1, 2. face_int: (n, 6) clipped pixel box col0, row0, col1,
    row1 (inclusive), the face index within its batch element, and the flat pixel index of (row0, col0).
    """
    tri = face_float[:, :9].reshape(-1, 3, 3)  # (n, 3, 3)
    inv_z_weight = face_float[:, 9:]  # (n, 3)
    col0, row0, col1, row1, face_id, base = face_int.unbind(1)  # (n,) each
    dx = torch.arange(win_w, device=key.device)
    dy = torch.arange(win_h, device=key.device)
    cols = col0[:, None] + dx  # (n, win_w)
    rows = row0[:, None] + dy  # (n, win_h)
    # Window positions past the box get NaN coordinates: every comparison with them is False.
    nan = torch.full((), float("nan"), dtype=tri.dtype, device=tri.device)
    px = torch.where(cols <= col1[:, None], cols.to(tri.dtype), nan)
    py = torch.where(rows <= row1[:, None], rows.to(tri.dtype), nan)
    ex = tri[:, :, None, None, 0] - px[:, None, None, :]  # (n, 3, 1, win_w): x_i - px
    ey = tri[:, :, None, None, 1] - py[:, None, :, None]  # (n, 3, win_h, 1): y_i - py
    w0 = _edge_products(ex, ey, 1, 2)  # (n, win_h, win_w), twice the area of (p, v1, v2)
    w1 = _edge_products(ex, ey, 2, 0)
    w2 = _edge_products(ex, ey, 0, 1)
    inside = (w0 >= 0) & (w1 >= 0) & (w2 >= 0)
    weight = inv_z_weight[:, :, None, None]  # (n, 3, 1, 1)
    inv_depth = w0 * weight[:, 0] + w1 * weight[:, 1] + w2 * weight[:, 2]  # sum_i l_i / z_i
    inv_depth = torch.where(inside, inv_depth, torch.zeros_like(inv_depth))
    cand = _depth_key(inv_depth, face_id[:, None, None])  # (n, win_h, win_w)
    offset = dy[:, None] * width + dx  # (win_h, win_w)
    pixel = base[:, None, None] + offset  # (n, win_h, win_w)
    key.scatter_reduce_(0, pixel.reshape(-1), cand.reshape(-1), reduce="amax", include_self=True)


def vertex_normals(verts: Tensor, faces: Tensor) -> Tensor:
    """Area-weighted unit vertex normals.

    verts: (B, V, 3) positions (any frame, e.g. camera space, metres); faces: (F, 3) or (B, F, 3) long.
    Returns (B, V, 3) in the same frame; a vertex on no (or only degenerate) faces gets a zero normal.
    The orientation follows the faces' winding: n = sum over faces of (v1 - v0) x (v2 - v0).
    """
    batch, num_verts = verts.shape[:2]
    faces = _batched_faces(faces.to(verts.device), batch, num_verts)
    tri = _gather_faces(verts, faces)  # (B, F, 3, 3)
    face_normal = torch.linalg.cross(tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0])  # (B, F, 3)
    normals = torch.zeros_like(verts)
    for corner in range(3):
        normals = normals.scatter_add(1, faces[:, :, corner, None].expand(-1, -1, 3), face_normal)
    return torch.nn.functional.normalize(normals, dim=-1, eps=1e-12)


def _pixel_faces(fragments: Fragments, num_faces: int, pixels: Tensor | None) -> Tensor:
    """Row of each pixel's visible face in a (B*F, ...) table: (P,) for the flat pixel indices ``pixels``
    (or (B*H*W,) for every pixel when None; face 0 of the batch element where empty)."""
    batch, height, width = fragments.face_index.shape
    face = fragments.face_index.reshape(-1)
    if pixels is None:
        pixels = torch.arange(face.shape[0], device=face.device)
    else:
        face = face[pixels]
    return face.clamp(min=0) + torch.div(pixels, height * width, rounding_mode="floor") * num_faces


def _interpolate_at(fragments: Fragments, faces: Tensor, vertex_attrs: Tensor, pixels: Tensor | None) -> Tensor:
    """vertex_attrs (B, V, C) interpolated at the flat pixel indices ``pixels`` (P,) -> (P, C), or at every
    pixel when None -> (B*H*W, C) (zeros where empty)."""
    batch = fragments.face_index.shape[0]
    num_verts, channels = vertex_attrs.shape[1:]
    faces = _batched_faces(faces.to(vertex_attrs.device), batch, num_verts)
    num_faces = faces.shape[1]
    face_attrs = _gather_faces(vertex_attrs, faces).reshape(batch * num_faces, 3, channels)  # (B*F, 3, C)
    corner = face_attrs[_pixel_faces(fragments, num_faces, pixels)]  # (P, 3, C)
    bary = fragments.bary.reshape(-1, 3)
    if pixels is not None:
        bary = bary[pixels]
    out = (corner * bary.to(vertex_attrs.dtype).unsqueeze(-1)).sum(-2)  # (P, C)
    if pixels is None:
        out = torch.where(fragments.mask.reshape(-1, 1), out, torch.zeros_like(out))
    return out


def interpolate(fragments: Fragments, faces: Tensor, vertex_attrs: Tensor) -> Tensor:
    """Interpolate per-vertex attributes at each pixel with the perspective-correct barycentrics.

    fragments: from :func:`rasterize`; faces: (F, 3) or (B, F, 3), the faces it was rasterized with;
    vertex_attrs: (B, V, C). Returns (B, H, W, C), zeros where empty.
    """
    batch, height, width = fragments.face_index.shape
    out = _interpolate_at(fragments, faces, vertex_attrs, None)  # (B*H*W, C)
    return out.view(batch, height, width, vertex_attrs.shape[-1])


def shade(
    fragments: Fragments,
    verts_cam: Tensor,
    faces: Tensor,
    vertex_colors: Tensor | None = None,
    face_colors: Tensor | None = None,
    light_dir=DEFAULT_LIGHT_DIR,
    ambient: float = DEFAULT_AMBIENT,
    background=0.0,
) -> Tensor:
    """Two-sided Lambert + ambient shading with interpolated vertex normals.

    fragments: from :func:`rasterize` of these vertices; verts_cam: (B, V, 3) camera space, metres;
    faces: (F, 3) or (B, F, 3). Colour per pixel: vertex_colors (B, V, 3) interpolated, or face_colors
    (B, F, 3) flat, or white when neither is given (grey shading). light_dir: (3,) or (B, 3) direction from
    the surface towards a directional light, camera space (default: the camera, (0, 0, -1)).
    intensity = ambient + (1 - ambient) * |n . l|. background: a float or (3,) colour for empty pixels.
    Returns (B, 3, H, W) in [0, 1], in the dtype of verts_cam.
    """
    compact = _COMPACT_ON_CPU and verts_cam.device.type == "cpu"
    return _shade(
        fragments, verts_cam, faces, vertex_colors, face_colors, light_dir, ambient, background, compact=compact
    )


def _shade(
    fragments: Fragments,
    verts_cam: Tensor,
    faces: Tensor,
    vertex_colors: Tensor | None = None,
    face_colors: Tensor | None = None,
    light_dir=DEFAULT_LIGHT_DIR,
    ambient: float = DEFAULT_AMBIENT,
    background=0.0,
    compact: bool = False,
) -> Tensor:
    """:func:`shade`; compact: compute at the covered pixels only (found with nonzero)."""
    if vertex_colors is not None and face_colors is not None:
        raise ValueError("give vertex_colors or face_colors, not both")
    batch, height, width = fragments.face_index.shape
    dtype, device = verts_cam.dtype, verts_cam.device
    pixels = fragments.mask.reshape(-1).nonzero().squeeze(1) if compact else None  # (P,) or every pixel
    normals = vertex_normals(verts_cam, faces)  # (B, V, 3)
    if vertex_colors is not None:  # one interpolation for normals and colours (one gather)
        attrs = _interpolate_at(fragments, faces, torch.cat([normals, vertex_colors.to(dtype)], -1), pixels)
        normals, color = attrs[:, :3], attrs[:, 3:]  # (P, 3) each
    else:
        normals = _interpolate_at(fragments, faces, normals, pixels)  # (P, 3)
        if face_colors is not None:
            rows = _pixel_faces(fragments, face_colors.shape[1], pixels)
            color = face_colors.to(dtype).reshape(-1, 3)[rows]  # (P, 3)
        else:
            color = torch.ones((1, 3), dtype=dtype, device=device)
    normals = torch.nn.functional.normalize(normals, dim=-1, eps=1e-12)
    light = torch.as_tensor(light_dir, dtype=dtype, device=device).reshape(-1, 3)  # (1 or B, 3)
    light = torch.nn.functional.normalize(light, dim=-1).expand(batch, 3)
    pixel_batch = torch.div(
        pixels if pixels is not None else torch.arange(batch * height * width, device=device),
        height * width,
        rounding_mode="floor",
    )
    cosine = (normals * light[pixel_batch]).sum(-1, keepdim=True)  # (P, 1)
    lit = (color * (ambient + (1.0 - ambient) * cosine.abs())).clamp(0.0, 1.0)  # (P, 3)
    bg = torch.as_tensor(background, dtype=dtype, device=device).expand(batch * height * width, 3)
    if pixels is not None:
        image = bg.index_copy(0, pixels, lit)
    else:
        image = torch.where(fragments.mask.reshape(-1, 1), lit, bg)
    return image.view(batch, height, width, 3).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)


@functools.lru_cache(maxsize=1)
def _compiled_shade():
    """torch.compile'd :func:`shade`, every pixel (no nonzero: no data-dependent shapes); built on first use."""
    return torch.compile(functools.partial(_shade, compact=False), dynamic=True)


def render_mesh(
    verts_cam: Tensor,
    faces: Tensor,
    K: Tensor,
    image_size,
    vertex_colors: Tensor | None = None,
    *,
    face_colors: Tensor | None = None,
    face_valid: Tensor | None = None,
    light_dir=DEFAULT_LIGHT_DIR,
    ambient: float = DEFAULT_AMBIENT,
    background=0.0,
    near: float = 1e-3,
    cull_backfaces: bool = False,
    compile: bool = False,
) -> MeshRender:
    """Project, rasterize and shade meshes.

    verts_cam: (B, V, 3) camera space, metres; faces: (F, 3) or (B, F, 3); K: (3, 3) or (B, 3, 3)
    intrinsics, pixels; image_size: (H, W). vertex_colors (B, V, 3) / face_colors (B, F, 3) in [0, 1]
    (grey when neither); face_valid: (B, F) bool faces to draw. See :func:`shade` for the lighting and
    :func:`rasterize` for near, cull_backfaces and compile (which here compiles the shading too).
    """
    if verts_cam.dim() != 3 or verts_cam.shape[-1] != 3:
        raise ValueError(f"verts_cam must be (B, V, 3), got {tuple(verts_cam.shape)}")
    K = K.to(device=verts_cam.device, dtype=verts_cam.dtype)
    if K.dim() == 2:
        K = K.expand(verts_cam.shape[0], 3, 3)
    if tuple(K.shape) != (verts_cam.shape[0], 3, 3):
        raise ValueError(f"K must be (3, 3) or (B={verts_cam.shape[0]}, 3, 3), got {tuple(K.shape)}")
    verts_img = project(verts_cam, K)  # (B, V, 2)
    verts_img_z = torch.cat([verts_img, verts_cam[..., 2:3]], -1)
    fragments = rasterize(
        verts_img_z,
        faces,
        image_size,
        near=near,
        cull_backfaces=cull_backfaces,
        face_valid=face_valid,
        compile=compile,
    )
    shade_fn = _compiled_shade() if compile else shade
    image = shade_fn(
        fragments,
        verts_cam,
        faces,
        vertex_colors=vertex_colors,
        face_colors=face_colors,
        light_dir=light_dir,
        ambient=ambient,
        background=background,
    )
    return MeshRender(image=image, depth=fragments.depth, mask=fragments.mask, fragments=fragments)


def render_hands(
    right_verts_cam: Tensor,
    left_verts_cam: Tensor,
    faces_right: Tensor,
    faces_left: Tensor,
    K: Tensor,
    image_size,
    right_valid: Tensor | None = None,
    left_valid: Tensor | None = None,
    *,
    right_color=RIGHT_HAND_COLOR,
    left_color=LEFT_HAND_COLOR,
    light_dir=DEFAULT_LIGHT_DIR,
    ambient: float = DEFAULT_AMBIENT,
    compile: bool = False,
) -> RenderOutput:
    """The global mesh image of AttentionHand: both hands in one z-buffer, sides in distinguishable colours.

    right_verts_cam, left_verts_cam: (B, V_r, 3), (B, V_l, 3) camera space, metres (V = 778 for MANO);
    faces_right, faces_left: (F_r, 3), (F_l, 3) long (each indexes its own hand's vertices);
    K: (B, 3, 3) or (3, 3) intrinsics in pixels; image_size: (H, W);
    right_valid, left_valid: (B,) bool, hands that exist (invalid hands are not drawn); default all valid.
    compile: see :func:`rasterize`.
    Returns :class:`RenderOutput` (image (B, 3, H, W) in [0, 1] with a black background, depth (B, H, W),
    side (B, H, W) int8, mask (B, H, W) bool), in the dtype / on the device of right_verts_cam.
    """
    batch, num_right = right_verts_cam.shape[:2]
    if left_verts_cam.shape[0] != batch:
        raise ValueError(
            f"right_verts_cam and left_verts_cam must have the same batch size, got "
            f"{tuple(right_verts_cam.shape)} and {tuple(left_verts_cam.shape)}"
        )
    dtype, device = right_verts_cam.dtype, right_verts_cam.device
    if faces_right.dim() != 2 or faces_left.dim() != 2:
        raise ValueError(
            f"faces_right / faces_left must be (F, 3), got {tuple(faces_right.shape)} / {tuple(faces_left.shape)}"
        )
    num_faces_right = faces_right.shape[0]
    verts = torch.cat([right_verts_cam, left_verts_cam.to(dtype)], 1)  # (B, V_r + V_l, 3)
    faces = torch.cat([faces_right.long(), faces_left.long() + num_right], 0).to(device)  # (F_r + F_l, 3)

    def _valid(v: Tensor | None, name: str) -> Tensor:
        if v is None:
            return torch.ones(batch, dtype=torch.bool, device=device)
        if tuple(v.shape) != (batch,):
            raise ValueError(f"{name} must be (B={batch},), got {tuple(v.shape)}")
        return v.to(device=device, dtype=torch.bool)

    face_valid = torch.cat(
        [
            _valid(right_valid, "right_valid")[:, None].expand(-1, num_faces_right),
            _valid(left_valid, "left_valid")[:, None].expand(-1, faces_left.shape[0]),
        ],
        1,
    )  # (B, F_r + F_l)
    colors = torch.cat(
        [
            torch.as_tensor(right_color, dtype=dtype, device=device).expand(batch, num_faces_right, 3),
            torch.as_tensor(left_color, dtype=dtype, device=device).expand(batch, faces_left.shape[0], 3),
        ],
        1,
    )  # (B, F_r + F_l, 3)
    out = render_mesh(
        verts, faces, K, image_size, face_colors=colors, face_valid=face_valid, light_dir=light_dir, ambient=ambient,
        compile=compile,
    )
    face_index = out.fragments.face_index
    side = torch.full_like(face_index, SIDE_LEFT, dtype=torch.int8)
    side = side.masked_fill(face_index < num_faces_right, SIDE_RIGHT).masked_fill(face_index < 0, SIDE_BACKGROUND)
    return RenderOutput(image=out.image, depth=out.depth, side=side, mask=out.mask)


def crop_local(
    images: Tensor,
    bbox: Tensor,
    size: int,
    scale: float = 1.0,
    *,
    mode: str = "bilinear",
    return_affine: bool = False,
):
    """The local image of AttentionHand: a square crop around a hand box, resized to (size, size).

    images: (B, C, H, W) (RGB or mesh images); bbox: (B, 4) x0, y0, x1, y1 pixels; size: output side in
    pixels; scale: the square box (the box extended to a square about its centre) is grown by this factor.
    mode: "bilinear" or "nearest" (use nearest for label maps).
    Returns (B, C, size, size), zeros outside the source image; with return_affine=True also the (B, 2, 3)
    affine mapping source pixels to crop pixels (hands.camera.apply_affine maps points with it).
    """
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a floating (B, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
    if bbox.shape != (images.shape[0], 4):
        raise ValueError(f"bbox must be (B={images.shape[0]}, 4), got {tuple(bbox.shape)}")
    if int(size) <= 0:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    size = int(size)
    box = scale_bbox(square_bbox(bbox.to(device=images.device, dtype=images.dtype)), scale)
    affine = bbox_crop_affine(box, (size, size))  # (B, 2, 3)
    crops = crop_image(images, affine, (size, size), mode=mode)
    return (crops, affine) if return_affine else crops
