"""The project's own MANO-format hand model, built from code (the embedded default of :mod:`hands.mano`).

The official MANO files are licence-restricted and never shipped, so this module writes ``MANO_RIGHT.pkl`` and
``MANO_LEFT.pkl`` with the keys, shapes and conventions of the official files (FACTS.md §7), deterministically
(byte-identical on every run), and ``hands.mano.HandModel`` loads them through smplx exactly like real MANO.

Keys (V = 778 vertices, F = 1538 faces, 16 joints):

- ``v_template`` (V, 3) rest mesh, metres; ``f`` (F, 3) faces, counter-clockwise seen from outside;
- ``shapedirs`` (V, 3, 10), ``posedirs`` (V, 3, 135) (MANO's ``lrotmin`` features: ``R_j - I`` of joints 1..15,
  row-major), ``weights`` (V, 16) skinning weights, ``J_regressor`` (16, V) ``scipy.sparse.csc_matrix``,
  ``J`` (16, 3) = ``J_regressor @ v_template``, ``kintree_table`` (2, 16) (row 0 parents, row 0 of the root
  = 2**32 - 1 as in the official files; row 1 the joint ids);
- ``hands_components`` (45, 45) an orthonormal pose basis (rows are components, by decreasing variance of a
  seeded sample of plausible hand poses), ``hands_mean`` (45) a slightly curled rest pose (added to the pose,
  smplx's ``flat_hand_mean=False``);
- ``bs_style`` ``'lbs'``, ``bs_type`` ``'lrotmin'``; extra keys the official files do not have:
  ``fingertip_verts`` (5,) thumb, index, middle, ring, pinky tip vertices, and ``model_source`` (a string
  that marks the file as this procedural model).

Frame (right hand, like the official right template): metres, fingers point along **-x**, the back of the
hand faces **+y** (the palm faces -y), the thumb is on the **+z** side; the wrist joint sits at
``WRIST_POSITION`` = (0.095, 0.006, 0.006), *not* at the origin, as in the official template (so code that
forgets that smplx rotates the root about the wrist and adds ``transl`` after posing fails here as it would
with real MANO). The 16 joints are MANO's (wrist, index 1-3, middle 1-3, pinky 1-3, ring 1-3, thumb 1-3)
with MANO's kinematic tree. Flexing a finger is a positive rotation about roughly +z (the palm side).
The left model is the exact mirror: x -> -x of every position and direction, faces' winding reversed,
pose-space quantities mirrored as axis-angle (x, -y, -z).

Construction (see docs/hand-model.md):

- topology: a palm tube that starts at a 16-vertex wrist ring (the only boundary: the wrist opening) and
  widens to rings of ``4 n + 4`` vertices; its distal ring is stitched to the four finger base rings of ``n = 8``
  vertices (their dorsal halves, then their palmar halves), with two triangles of web between neighbouring
  fingers; the thumb tube (rings of 10) leaves a 10-vertex hole cut in the radial, palmar side of the palm;
  each digit ends in a rounded cap closed by a pole vertex (the fingertip vertex). The surface is a genus-0
  manifold with one 16-edge boundary, so ``V = 778`` forces ``F = 2 V - 18 = 1538``; the vertex count is
  met exactly by splitting a few palm quads with a centre vertex;
- geometry: digits are tubes along their bone chains with elliptic cross-sections that bulge at the knuckles
  and taper to the tip; the palm is a superelliptic tube whose cross-section grows from the wrist to the
  knuckles; a light Taubin smoothing evens the junctions;
- skinning: each digit vertex has an arc-length coordinate along its chain; weights blend the two bones at
  every joint with a smoothstep a few millimetres wide; palm weights (wrist = 1) diffuse into the palm
  near the digit roots;
- joint regressor: each row is a convex combination (non-negative, summing to 1) of the vertex rings around
  the joint, solved so that it reproduces the designed joint position; row 0 is the wrist ring's centre;
- shape directions: overall size, finger length, finger thickness, palm width, palm length, thumb length,
  hand thickness, index-vs-ring length, finger taper, wrist size (one each, unit-variance scale);
- pose correctives: a volume-preserving bulge at each bent joint, ``2.5 mm x (1 - cos angle)`` outwards from
  the bone, which is linear in MANO's ``R - I`` features (``1 - cos angle = -trace(R - I) / 2``).

``python -m hands.procedural --out DIR [--render PNG] [--docs DIR]`` writes the two files (and optionally
pictures, made with hands.render; the docs/images/hand-*.png pictures come from ``--docs docs/images``).
"""
from __future__ import annotations

import argparse
import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.optimize
import scipy.sparse

from hands.joints import MANO_PARENTS
from hands.paths import write_atomic

__all__ = [
    "PROCEDURAL_VERSION",
    "MODEL_SOURCE",
    "WRIST_POSITION",
    "NUM_VERTS",
    "NUM_FACES",
    "DEMO_POSES",
    "build_procedural_mano",
    "demo_pose",
    "mirror_model",
    "model_bytes",
    "render_pose_sheet",
    "render_shape_sheet",
    "render_topology_sheet",
    "render_weight_sheet",
    "write_procedural_mano",
]

PROCEDURAL_VERSION = "1"
MODEL_SOURCE = f"attentionhand-aug procedural MANO-format hand v{PROCEDURAL_VERSION}"
NUM_VERTS = 778
NUM_FACES = 1538
WRIST_POSITION = np.array([0.095, 0.006, 0.006])
# Local construction frame (u distal, s radial = thumb side, d dorsal), wrist joint at 0, right hand.
# Mapping to the output frame: x = -u, y = d, z = s (a proper rotation), then + WRIST_POSITION.
_LOCAL_TO_OUT = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])  # out = M @ (u, s, d)

_FINGER_RING = 8  # vertices around a finger
_THUMB_RING = 10  # vertices around the thumb (= the palm hole's boundary: 3 x 2 quads)
_WRIST_RING = 16  # MANO's wrist opening has 16 edges
_SIDE_COLUMNS = 2  # extra palm columns on each of the radial and ulnar edges of the palm
_THENAR_SMOOTH_RADIUS = 0.025  # metres around the thumb hole smoothed further
_THENAR_SMOOTH_ITERS = 20


@dataclass(frozen=True)
class _Digit:
    """One digit in the local frame: joints (4, 3) = joint 1, 2, 3 and the tip point (metres)."""

    name: str
    part: int  # 1 index, 2 middle, 3 ring, 4 pinky, 5 thumb
    mano_joints: tuple[int, int, int]
    joints: np.ndarray  # (4, 3): joint1, joint2, joint3, tip (surface point at the end of the cap)
    dorsal: np.ndarray  # (3,) direction of the nail side, roughly perpendicular to the chain
    # half-width / half-thickness profile: (relative arc position in [0, 1], half-width, half-thickness)
    profile: tuple[tuple[float, float, float], ...]
    start: float  # arc length (from joint 1) of the first ring
    ring: int


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _direction(radial_deg: float, palmar_deg: float) -> np.ndarray:
    """Unit vector in the local frame: ``radial_deg`` from +u towards +s, then ``palmar_deg`` towards -d."""
    a, b = np.radians(radial_deg), np.radians(palmar_deg)
    return np.array([np.cos(b) * np.cos(a), np.cos(b) * np.sin(a), -np.sin(b)])


def _finger(name, part, mano_joints, base, radial_deg, lengths, width, thickness) -> _Digit:
    direction = _direction(radial_deg, 0.0)
    cum = np.concatenate([[0.0], np.cumsum(lengths)])
    joints = np.asarray(base)[None] + cum[:, None] * direction[None]
    total = cum[-1]
    k1, k2 = cum[1] / total, cum[2] / total
    # knuckle bulges at joints 2 and 3, slimmer shafts, a narrower distal pad
    profile = (
        (0.0, width * 1.00, thickness * 1.00),
        (0.5 * k1, width * 0.93, thickness * 0.92),
        (k1, width * 0.95, thickness * 0.95),
        (0.5 * (k1 + k2), width * 0.86, thickness * 0.85),
        (k2, width * 0.87, thickness * 0.86),
        (0.5 * (k2 + 1.0), width * 0.84, thickness * 0.80),
        (1.0, width * 0.78, thickness * 0.72),
    )
    return _Digit(name, part, mano_joints, joints, np.array([0.0, 0.0, 1.0]), profile, 0.010, _FINGER_RING)


def _hand_digits() -> list[_Digit]:
    """Adult proportions (about 18.7 cm from the wrist joint to the middle fingertip)."""
    fingers = [
        _finger("index", 1, (1, 2, 3), (0.086, 0.026, 0.000), 4.0, (0.040, 0.024, 0.022), 0.0094, 0.0086),
        _finger("middle", 2, (4, 5, 6), (0.090, 0.006, 0.000), 0.0, (0.045, 0.028, 0.024), 0.0096, 0.0088),
        _finger("ring", 3, (10, 11, 12), (0.086, -0.013, -0.001), -5.0, (0.042, 0.027, 0.023), 0.0090, 0.0083),
        _finger("pinky", 4, (7, 8, 9), (0.078, -0.030, -0.003), -11.0, (0.033, 0.019, 0.021), 0.0078, 0.0072),
    ]
    cmc = np.array([0.020, 0.020, -0.010])
    mcp = cmc + 0.046 * _direction(24.0, 24.0)
    ip = mcp + 0.032 * _direction(36.0, 8.0)
    tip = ip + 0.027 * _direction(40.0, 4.0)
    axis = _unit(tip - cmc)
    nail = np.array([0.0, 0.8, 0.6])
    nail = _unit(nail - nail.dot(axis) * axis)
    thumb_profile = (
        (0.00, 0.0190, 0.0160),
        (0.15, 0.0180, 0.0150),
        (0.33, 0.0128, 0.0112),
        (0.45, 0.0112, 0.0098),
        (0.60, 0.0100, 0.0088),
        (0.75, 0.0104, 0.0088),
        (0.88, 0.0098, 0.0078),
        (1.00, 0.0085, 0.0066),
    )
    thumb = _Digit("thumb", 5, (13, 14, 15), np.stack([cmc, mcp, ip, tip]), nail, thumb_profile, 0.026, _THUMB_RING)
    return fingers + [thumb]


# ----------------------------------------------------------------------------------------------------------
# mesh assembly


class _Builder:
    """Vertices with metadata (part, arc length) and oriented triangles."""

    def __init__(self) -> None:
        self.verts: list[np.ndarray] = []
        self.part: list[int] = []
        self.ell: list[float] = []
        self.faces: list[tuple[int, int, int]] = []

    def add(self, points: np.ndarray, part: int, ell: float) -> np.ndarray:
        start = len(self.verts)
        for p in np.atleast_2d(points):
            self.verts.append(np.asarray(p, dtype=np.float64))
            self.part.append(part)
            self.ell.append(ell)
        return np.arange(start, len(self.verts))

    def quad(self, a0: int, a1: int, b1: int, b0: int) -> None:
        """Quad ``a0 -> a1 -> b1 -> b0`` (counter-clockwise from outside), split along its shorter diagonal."""
        v = self.verts
        if np.linalg.norm(v[a0] - v[b1]) <= np.linalg.norm(v[a1] - v[b0]):
            self.faces += [(a0, a1, b1), (a0, b1, b0)]
        else:
            self.faces += [(a0, a1, b0), (a1, b1, b0)]

    def band(self, ring_a: np.ndarray, ring_b: np.ndarray) -> None:
        """Join two rings of equal size, ``ring_b`` ahead of ``ring_a``; both counter-clockwise about the
        forward axis."""
        n = len(ring_a)
        for i in range(n):
            j = (i + 1) % n
            self.quad(ring_a[i], ring_a[j], ring_b[j], ring_b[i])

    def zip(self, ring_a, angles_a, ring_b, angles_b) -> None:
        """Join rings of different sizes by walking both in angle order (angles increasing, in [0, 2 pi))."""
        m, n = len(ring_a), len(ring_b)
        ua = np.append(np.unwrap(angles_a), np.unwrap(angles_a)[0] + 2 * np.pi)
        ub = np.append(np.unwrap(angles_b), np.unwrap(angles_b)[0] + 2 * np.pi)
        i = j = 0
        while i < m or j < n:
            if j == n or (i < m and ua[i + 1] - ua[0] <= ub[j + 1] - ub[0]):
                self.faces.append((ring_a[i % m], ring_a[(i + 1) % m], ring_b[j % n]))
                i += 1
            else:
                self.faces.append((ring_a[i % m], ring_b[(j + 1) % n], ring_b[j % n]))
                j += 1

    def fan(self, ring: np.ndarray, pole: int) -> None:
        n = len(ring)
        for i in range(n):
            self.faces.append((ring[i], ring[(i + 1) % n], pole))


def _interp_profile(profile, t: float) -> tuple[float, float]:
    ts = [p[0] for p in profile]
    return float(np.interp(t, ts, [p[1] for p in profile])), float(np.interp(t, ts, [p[2] for p in profile]))


def _ring_points(centre, tangent, dorsal, half_w, half_t, n, phase) -> np.ndarray:
    """(n, 3) points of an ellipse around ``tangent``, counter-clockwise about it, starting at the side axis."""
    dorsal = _unit(dorsal - dorsal.dot(tangent) * tangent)
    side = np.cross(dorsal, tangent)  # tangent x side = dorsal
    th = phase + 2 * np.pi * np.arange(n) / n
    return centre[None] + half_w * np.cos(th)[:, None] * side[None] + half_t * np.sin(th)[:, None] * dorsal[None]


def _digit_frame(digit: _Digit, ell: float) -> tuple[np.ndarray, np.ndarray]:
    """Point and smoothed tangent of the digit's chain at arc length ``ell`` (from joint 1)."""
    pts = digit.joints
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    k = int(np.clip(np.searchsorted(cum, ell, side="right") - 1, 0, len(seg) - 1))
    point = pts[k] + (ell - cum[k]) / seg[k] * (pts[k + 1] - pts[k])
    tangents = [_unit(pts[i + 1] - pts[i]) for i in range(len(seg))]
    tangent = tangents[k]
    blend = 0.006  # tangents blend over +-6 mm around each joint
    if k > 0 and ell - cum[k] < blend:
        w = 0.5 + 0.5 * (ell - cum[k]) / blend
        tangent = _unit(w * tangents[k] + (1 - w) * tangents[k - 1])
    if k + 1 < len(seg) and cum[k + 1] - ell < blend:
        w = 0.5 + 0.5 * (cum[k + 1] - ell) / blend
        tangent = _unit(w * tangents[k] + (1 - w) * tangents[k + 1])
    return point, tangent


def _ring_positions(start: float, joints_ell: list[float], end: float, spacing: float) -> list[float]:
    """Arc positions of rings from ``start`` to ``end`` with a ring exactly at every joint inside."""
    marks = [start] + [j for j in joints_ell if start < j < end] + [end]
    out = [start]
    for a, b in zip(marks[:-1], marks[1:]):
        k = max(1, int(round((b - a) / spacing)))
        out += list(a + (b - a) * np.arange(1, k + 1) / k)
    return out


@dataclass
class _Mesh:
    verts: np.ndarray  # (V, 3) local frame
    faces: np.ndarray  # (F, 3)
    part: np.ndarray  # (V,) 0 palm, 1..5 digits
    ell: np.ndarray  # (V,) arc length along the digit chain (nan on the palm)
    wrist_ring: np.ndarray
    digit_rings: dict  # part -> list of (ell, vertex ids)
    knuckle_cols: dict  # part -> palm vertex ids of the distal palm ring facing that finger
    hole: np.ndarray  # palm vertex ids around the thumb hole
    tips: dict  # part -> pole vertex id


def _palm_section(rho: float) -> tuple[float, float, float, float]:
    """Palm cross-section at relative position ``rho`` (0 wrist, 1 knuckles): centre s, centre d, half-width,
    half-thickness (metres)."""
    c_s = np.interp(rho, [0.0, 1.0], [0.0, -0.002])
    c_d = np.interp(rho, [0.0, 0.5, 1.0], [0.000, -0.002, -0.001])
    half_w = np.interp(rho, [0.0, 0.25, 0.6, 1.0], [0.029, 0.036, 0.041, 0.040])
    half_t = np.interp(rho, [0.0, 0.3, 0.7, 1.0], [0.019, 0.0165, 0.0150, 0.0130])
    return float(c_s), float(c_d), float(half_w), float(half_t)


_SUPERELLIPSE = 2.6


def _palm_point(u: float, rho: float, theta: float) -> np.ndarray:
    c_s, c_d, w, t = _palm_section(rho)
    c, s = np.cos(theta), np.sin(theta)
    e = 2.0 / _SUPERELLIPSE
    return np.array([u, c_s + w * np.sign(c) * abs(c) ** e, c_d + t * np.sign(s) * abs(s) ** e])


def _column_angle(s: float, dorsal: bool) -> float:
    """Superellipse angle of the knuckle section's point with radial coordinate ``s`` on the dorsal (angle in
    (0, pi)) or palmar (angle in (pi, 2 pi)) side."""
    c_s, _, w, _ = _palm_section(1.0)
    x = float(np.clip((s - c_s) / w, -0.97, 0.97))
    c = np.sign(x) * abs(x) ** (_SUPERELLIPSE / 2.0)
    a = float(np.arccos(c))
    return a if dorsal else 2 * np.pi - a


def _assemble(spacing: float, palm_rows: int, extra_verts_wanted: int | None) -> _Mesh:
    digits = _hand_digits()
    fingers, thumb = digits[:4], digits[4]
    b = _Builder()

    # 1. finger tubes (base ring first) and caps
    digit_rings: dict[int, list] = {}
    tips: dict[int, int] = {}
    for d in digits:
        seg = np.linalg.norm(np.diff(d.joints, axis=0), axis=1)
        total = float(seg.sum())
        tip_w, tip_t = _interp_profile(d.profile, 1.0)
        cap = 0.85 * tip_w
        joints_ell = [float(seg[0]), float(seg[0] + seg[1])]
        ells = _ring_positions(d.start, joints_ell, total - cap, spacing)
        rings = []
        phase = np.pi / d.ring  # no vertex exactly on the side axis: n/2 dorsal, n/2 palmar
        for ell in ells:
            c, tan = _digit_frame(d, ell)
            hw, ht = _interp_profile(d.profile, ell / total)
            centre = c - 0.12 * ht * _unit(d.dorsal - d.dorsal.dot(tan) * tan)  # bone sits dorsal of centre
            rings.append((ell, b.add(_ring_points(centre, tan, d.dorsal, hw, ht, d.ring, phase), d.part, ell)))
        for r0, r1 in zip(rings[:-1], rings[1:]):
            b.band(r0[1], r1[1])
        # rounded cap: two shrinking rings and the pole (the fingertip vertex)
        end = total - cap
        c_end, tan = _digit_frame(d, end)
        last = rings[-1][1]
        for frac in (0.55, 0.88):
            ang = frac * np.pi / 2
            ell = end + cap * np.sin(ang)
            c, _ = _digit_frame(d, min(ell, total - 1e-6))
            hw, ht = tip_w * np.cos(ang), tip_t * np.cos(ang)
            centre = c - 0.12 * tip_t * _unit(d.dorsal - d.dorsal.dot(tan) * tan) * np.cos(ang)
            ring = b.add(_ring_points(centre, tan, d.dorsal, hw, ht, d.ring, phase), d.part, ell)
            b.band(last, ring)
            rings.append((ell, ring))
            last = ring
        pole_point = d.joints[-1] - 0.25 * tip_t * _unit(d.dorsal - d.dorsal.dot(tan) * tan)
        pole = int(b.add(pole_point, d.part, total)[0])
        b.fan(last, pole)
        tips[d.part] = pole
        digit_rings[d.part] = rings

    # 2. the distal palm sequence: dorsal halves radial -> ulnar, then palmar halves ulnar -> radial
    half = _FINGER_RING // 2
    seq = []
    seq_part = []
    for f in fingers:
        base = digit_rings[f.part][0][1]
        seq += list(base[:half])
        seq_part += [f.part] * half
    for f in reversed(fingers):
        base = digit_rings[f.part][0][1]
        seq += list(base[half:])
        seq_part += [f.part] * half
    seq = np.array(seq)
    verts = np.array(b.verts)

    # palm columns: one per sequence vertex, at the superellipse angle whose s matches the vertex's s (so the
    # columns run monotonically across the back of the hand and back across the palm), plus side columns
    n_seq = len(seq)
    seq_theta = np.array([_column_angle(verts[v, 1], k < n_seq // 2) for k, v in enumerate(seq)])
    cols, col_part = [], []
    for k in range(n_seq):
        cols.append(seq_theta[k])
        col_part.append(seq_part[k])
        if k == n_seq // 2 - 1:  # ulnar edge, between the pinky's dorsal and palmar halves
            gap = (seq_theta[k], seq_theta[k + 1])
            for i in range(1, _SIDE_COLUMNS + 1):
                cols.append(gap[0] + (gap[1] - gap[0]) * i / (_SIDE_COLUMNS + 1))
                col_part.append(4)
        if k == n_seq - 1:  # radial edge, between the index's palmar and dorsal halves
            gap = (seq_theta[k], seq_theta[0] + 2 * np.pi)
            for i in range(1, _SIDE_COLUMNS + 1):
                cols.append((gap[0] + (gap[1] - gap[0]) * i / (_SIDE_COLUMNS + 1)) % (2 * np.pi))
                col_part.append(1)
    cols = np.array(cols)
    # rotate so that column 0 is the first radial side column (the thumb hole straddles the radial edge)
    shift = n_seq + _SIDE_COLUMNS
    cols = np.roll(cols, -shift)
    col_part = np.roll(np.array(col_part), -shift)
    n_cols = len(cols)

    # knuckle-line u per column (arched: the finger's joint 1 minus 8 mm; side columns follow the edge fingers)
    mcp_u = {f.part: f.joints[0, 0] for f in fingers}
    u_end = np.array([mcp_u[p] - 0.008 for p in col_part])

    # 3. palm rows: row 0 = wrist ring (16), rows 1..palm_rows (n_cols)
    wrist_theta = np.linspace(0, 2 * np.pi, _WRIST_RING, endpoint=False)  # evenly around the wrist
    wrist = b.add(np.stack([_palm_point(0.0, 0.0, t) for t in wrist_theta]), 0, np.nan)
    rows = []
    rho_rows = np.linspace(0.12, 1.0, palm_rows)
    for rho in rho_rows:
        pts = np.stack([_palm_point(rho * u_end[c], rho, cols[c]) for c in range(n_cols)])
        rows.append(b.add(pts, 0, np.nan))
    order = np.argsort(cols)
    b.zip(wrist, wrist_theta, rows[0][order], cols[order])

    # thumb hole: 3 rows x 2 columns of quads around the radial edge (columns -1, 0, 1)
    hole_rows = (1, 4)  # quads between rows 1..4 (row indices into `rows`)
    hole_cols = (n_cols - 2, n_cols - 1, 0)
    skipped = {(r, c) for r in range(hole_rows[0], hole_rows[1]) for c in (hole_cols[0], hole_cols[1])}
    for r in range(len(rows) - 1):
        ra, rb = rows[r][order], rows[r + 1][order]
        for i in range(n_cols):
            j = (i + 1) % n_cols
            if (r, order[i]) in skipped:
                continue
            b.quad(ra[i], ra[j], rb[j], rb[i])
    # hole loop (grid coordinates), then orient it against the palm faces around it
    cs = [hole_cols[0], hole_cols[1], hole_cols[2]]
    loop = [rows[hole_rows[0]][c] for c in cs]
    loop += [rows[r][cs[-1]] for r in range(hole_rows[0] + 1, hole_rows[1] + 1)]
    loop += [rows[hole_rows[1]][c] for c in reversed(cs[:-1])]
    loop += [rows[r][cs[0]] for r in range(hole_rows[1] - 1, hole_rows[0], -1)]
    loop = np.array(loop)
    removed = [rows[r][cs[1]] for r in range(hole_rows[0] + 1, hole_rows[1])]
    directed = {(f[i], f[(i + 1) % 3]) for f in b.faces for i in range(3)}
    if (loop[0], loop[1]) in directed:
        loop = loop[::-1]
    # thumb's first ring joins the hole; pick the cyclic shift that pairs nearest vertices
    thumb_first = digit_rings[thumb.part][0][1]
    verts = np.array(b.verts)
    best = min(range(len(loop)), key=lambda s: np.linalg.norm(verts[np.roll(loop, -s)] - verts[thumb_first], axis=1).sum())
    b.band(np.roll(loop, -best), thumb_first)

    # 4. distal palm row -> finger sequence (zip by angle), then the webs between fingers
    last_row = rows[-1]
    start = int(np.argmin(cols[order] % (2 * np.pi)))
    a_ring = np.roll(last_row[order], -start)
    a_theta = np.roll(cols[order], -start)
    s0 = int(np.argmin(seq_theta))
    b.zip(a_ring, a_theta, np.roll(seq, -s0), np.roll(seq_theta, -s0))
    for f, g in zip(fingers[:-1], fingers[1:]):
        fr, gr = digit_rings[f.part][0][1], digit_rings[g.part][0][1]
        f3, f4, g0, g7 = fr[half - 1], fr[half], gr[0], gr[-1]
        b.faces += [(f3, g0, g7), (f3, g7, f4)]

    # 5. reach the exact vertex count: split palm quads (dorsal, mid palm) with a centre vertex
    knuckle_cols = {f.part: np.array([last_row[c] for c in range(n_cols) if col_part[c] == f.part]) for f in fingers}
    hole = loop
    mesh = _Mesh(np.array(b.verts), np.array(b.faces, dtype=np.int64), np.array(b.part), np.array(b.ell),
                 wrist, digit_rings, knuckle_cols, hole, tips)
    if extra_verts_wanted:
        mesh = _split_palm_quads(mesh, rows, order, extra_verts_wanted)
    return _compact(mesh, removed)


def _compact(mesh: _Mesh, removed: list[int]) -> _Mesh:
    """Drop the vertices inside the thumb hole (no face uses them) and renumber everything."""
    keep = np.ones(len(mesh.verts), dtype=bool)
    keep[removed] = False
    if np.isin(removed, mesh.faces).any():
        raise RuntimeError("procedural hand: a removed vertex is still used by a face")
    new = np.cumsum(keep) - 1
    mesh.verts, mesh.part, mesh.ell = mesh.verts[keep], mesh.part[keep], mesh.ell[keep]
    mesh.faces = new[mesh.faces]
    mesh.wrist_ring = new[mesh.wrist_ring]
    mesh.digit_rings = {p: [(e, new[r]) for e, r in rings] for p, rings in mesh.digit_rings.items()}
    mesh.knuckle_cols = {p: new[v] for p, v in mesh.knuckle_cols.items()}
    mesh.hole = new[mesh.hole]
    mesh.tips = {p: int(new[v]) for p, v in mesh.tips.items()}
    return mesh


def _split_palm_quads(mesh: _Mesh, rows, order, count: int) -> _Mesh:
    """Insert ``count`` vertices at the centres of dorsal palm quads (each replaces the quad's two triangles
    by four)."""
    faces = [tuple(f) for f in mesh.faces]
    verts = list(mesh.verts)
    part, ell = list(mesh.part), list(mesh.ell)
    n_cols = len(order)
    # candidate quads: on the back of the palm (centre more than 4 mm dorsal), inner rows, sorted for a
    # deterministic spread from the middle of the back of the hand outwards
    cands = []
    for r in range(1, len(rows) - 2):
        for i in range(n_cols):
            j = (i + 1) % n_cols
            a0, a1, b0, b1 = rows[r][order[i]], rows[r][order[j]], rows[r + 1][order[i]], rows[r + 1][order[j]]
            centre = (mesh.verts[a0] + mesh.verts[a1] + mesh.verts[b0] + mesh.verts[b1]) / 4
            if centre[2] <= 0.004:
                continue
            cands.append((abs(centre[1]) + abs(r - len(rows) / 2) * 0.004, r, i, (a0, a1, b1, b0)))
    cands.sort(key=lambda c: (round(c[0], 9), c[1], c[2]))
    used = 0
    for _, r, i, quad in cands:
        if used == count:
            break
        a0, a1, b1, b0 = quad
        tris = [f for f in faces if f is not None and set(f) <= set(quad)]
        if len(tris) != 2:  # not split along a diagonal of this quad (or part of the thumb hole)
            continue
        for t in tris:
            faces[faces.index(t)] = None
        c = len(verts)
        verts.append((mesh.verts[a0] + mesh.verts[a1] + mesh.verts[b0] + mesh.verts[b1]) / 4)
        part.append(0)
        ell.append(np.nan)
        faces += [(a0, a1, c), (a1, b1, c), (b1, b0, c), (b0, a0, c)]
        used += 1
    if used != count:
        raise RuntimeError(f"procedural hand: could only add {used} of {count} palm vertices")
    faces = [f for f in faces if f is not None]
    mesh.verts, mesh.faces = np.array(verts), np.array(faces, dtype=np.int64)
    mesh.part, mesh.ell = np.array(part), np.array(ell)
    return mesh


# ----------------------------------------------------------------------------------------------------------
# model parameters


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _convex_weights(points: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Non-negative weights summing to 1 with ``weights @ points ~= target``, as close to uniform as allowed."""
    k = len(points)
    big = 1e3
    a = np.vstack([big * points.T, big * np.ones((1, k)), np.eye(k)])
    rhs = np.concatenate([big * target, [big], np.full(k, 1.0 / k)])
    w, _ = scipy.optimize.nnls(a, rhs, maxiter=50 * k)
    return w / w.sum()


def _taubin(verts: np.ndarray, faces: np.ndarray, fixed: np.ndarray, iterations: int) -> np.ndarray:
    """Taubin smoothing (lambda 0.5, mu -0.53) on the uniform graph Laplacian, ``fixed`` vertices pinned.

    Written here (not trimesh.smoothing) because trimesh's filters cannot pin vertices, and the wrist ring
    and fingertip poles must stay where they were designed."""
    n = len(verts)
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    edges = np.concatenate([edges, edges[:, ::-1]])
    adj = scipy.sparse.coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n)).tocsr()
    adj.data[:] = 1.0
    deg = np.asarray(adj.sum(1)).ravel()
    v = verts.copy()
    free = ~fixed
    for _ in range(iterations):
        for lam in (0.5, -0.53):
            lap = adj @ v / deg[:, None] - v
            v[free] += lam * lap[free]
    return v


def _skinning_weights(mesh: _Mesh, digits: list[_Digit]) -> np.ndarray:
    """(V, 16) weights: digits blend their bones around each joint; the palm diffuses from the digits."""
    n = len(mesh.verts)
    w = np.zeros((n, 16))
    w[mesh.part == 0, 0] = 1.0
    for d in digits:
        seg = np.linalg.norm(np.diff(d.joints, axis=0), axis=1)
        joint_ell = [0.0, seg[0], seg[0] + seg[1]]
        half = [0.012 if d.part == 5 else 0.006, 0.005, 0.004]  # blend half-widths (metres)
        idx = np.where(mesh.part == d.part)[0]
        ell = mesh.ell[idx]
        s = [_smoothstep((ell - j + h) / (2 * h)) for j, h in zip(joint_ell, half)]
        chain = [0, *d.mano_joints]
        w[idx, chain[0]] = 1 - s[0]
        w[idx, chain[1]] = s[0] - s[1]
        w[idx, chain[2]] = s[1] - s[2]
        w[idx, chain[3]] = s[2]
    # palm: a few Jacobi sweeps of neighbour averaging, digits and wrist ring fixed
    faces = mesh.faces
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    edges = np.concatenate([edges, edges[:, ::-1]])
    adj = scipy.sparse.coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n)).tocsr()
    adj.data[:] = 1.0
    deg = np.asarray(adj.sum(1)).ravel()
    free = mesh.part == 0
    free[mesh.wrist_ring] = False
    for _ in range(2):
        avg = adj @ w / deg[:, None]
        w[free] = avg[free]
    w = np.clip(w, 0.0, None)
    return w / w.sum(1, keepdims=True)


def _joint_regressor(mesh: _Mesh, digits: list[_Digit]) -> scipy.sparse.csc_matrix:
    """(16, V): row 0 the wrist ring's centre; other rows convex combinations of the rings at each joint."""
    reg = np.zeros((16, len(mesh.verts)))
    reg[0, mesh.wrist_ring] = 1.0 / len(mesh.wrist_ring)
    for d in digits:
        seg = np.linalg.norm(np.diff(d.joints, axis=0), axis=1)
        joint_ell = [0.0, seg[0], seg[0] + seg[1]]
        rings = mesh.digit_rings[d.part]
        for k, (j, ell_j) in enumerate(zip(d.mano_joints, joint_ell)):
            if k == 0:
                first = rings[0][1]
                if d.part == 5:
                    cand = np.concatenate([mesh.hole, first, rings[1][1]])
                    # the thumb's joint 1 lies inside the palm: add palm vertices facing the hole
                    palm = np.where(mesh.part == 0)[0]
                    dist = np.linalg.norm(mesh.verts[palm] - d.joints[0], axis=1)
                    cand = np.concatenate([cand, palm[np.argsort(dist)[:12]]])
                else:
                    cand = np.concatenate([mesh.knuckle_cols[d.part], first])
            else:
                nearest = sorted(rings, key=lambda r: abs(r[0] - ell_j))[:2]
                cand = np.concatenate([r[1] for r in nearest])
            cand = np.unique(cand)
            reg[j, cand] = _convex_weights(mesh.verts[cand], d.joints[k])
    reg[np.abs(reg) < 1e-9] = 0.0
    reg /= reg.sum(1, keepdims=True)
    return scipy.sparse.csc_matrix(reg)


def _bone_axes(digits: list[_Digit]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """MANO joint id -> (joint position, direction of the bone it drives), local frame."""
    out = {}
    for d in digits:
        for k, j in enumerate(d.mano_joints):
            out[j] = (d.joints[k], _unit(d.joints[k + 1] - d.joints[k]))
    return out


def _pose_correctives(mesh: _Mesh, digits: list[_Digit], verts: np.ndarray) -> np.ndarray:
    """(V, 3, 135) bulge of 2.5 mm x (1 - cos angle) outwards from the bone around each bent joint."""
    posedirs = np.zeros((len(verts), 3, 135))
    bulge, sigma = 0.0025, 0.006
    for d in digits:
        idx = np.where(mesh.part == d.part)[0]
        if d.part != 5:
            idx = np.concatenate([idx, mesh.knuckle_cols[d.part]])
        for k, j in enumerate(d.mano_joints):
            centre = d.joints[k]
            axis = _unit(d.joints[k + 1] - d.joints[k])
            rel = verts[idx] - centre
            along = rel @ axis
            radial = rel - along[:, None] * axis
            radial /= np.linalg.norm(radial, axis=1, keepdims=True) + 1e-12
            g = np.exp(-((along / sigma) ** 2))
            disp = bulge * g[:, None] * radial  # displacement at 90 degrees (1 - cos = 1)
            base = 9 * (j - 1)
            for a in range(3):  # -trace(R - I) / 2 = 1 - cos(angle)
                posedirs[idx, :, base + 4 * a] += -0.5 * disp
    return posedirs


def _shape_directions(mesh: _Mesh, digits: list[_Digit], verts: np.ndarray) -> np.ndarray:
    """(V, 3, 10) displacements per unit shape coefficient (local frame, metres), roughly one standard
    deviation of adult variation each."""
    n = len(verts)
    dirs = np.zeros((n, 3, 10))
    fingers, thumb = digits[:4], digits[4]
    part = mesh.part
    # 0: overall size (+5 %), about the wrist joint
    dirs[:, :, 0] = 0.05 * verts
    # 1: finger length (+4 % of each finger beyond its joint 1, along the finger)
    # 2: finger thickness (+6 % radially about the finger axis)
    # 7: index vs ring length (index +4 %, ring -4 %)
    # 8: finger taper (distal half thinner, -8 % at the tip)
    for f in fingers:
        idx = np.where(part == f.part)[0]
        axis = _unit(f.joints[-1] - f.joints[0])
        rel = verts[idx] - f.joints[0]
        along = rel @ axis
        radial = rel - along[:, None] * axis
        total = np.linalg.norm(f.joints[-1] - f.joints[0])
        dirs[idx, :, 1] = 0.04 * along[:, None] * axis
        dirs[idx, :, 2] = 0.06 * radial
        dirs[idx, :, 7] = {1: 0.04, 3: -0.04}.get(f.part, 0.0) * along[:, None] * axis
        dirs[idx, :, 8] = -0.08 * np.clip(along / total - 0.3, 0, None)[:, None] / 0.7 * radial
    # 3: palm width (+5 % across the palm; fingers and thumb move with their side of the palm)
    dirs[:, 1, 3] = 0.05 * verts[:, 1]
    for d in digits:
        idx = np.where(part == d.part)[0]
        dirs[idx, 1, 3] = 0.05 * d.joints[0, 1]
    # 4: palm length (+5 % of the palm; fingers move with their knuckles)
    dirs[part == 0, 0, 4] = 0.05 * np.clip(verts[part == 0, 0], 0, None)
    for d in digits:
        idx = np.where(part == d.part)[0]
        dirs[idx, 0, 4] = 0.05 * d.joints[0, 0]
    # 5: thumb length (+6 % along the thumb beyond joint 1)
    idx = np.where(part == thumb.part)[0]
    axis = _unit(thumb.joints[-1] - thumb.joints[0])
    along = (verts[idx] - thumb.joints[0]) @ axis
    dirs[idx, :, 5] = 0.06 * np.clip(along, 0, None)[:, None] * axis
    # 6: hand thickness (+8 % dorsal-palmar on the palm and thumb, +4 % on the fingers)
    dirs[:, 2, 6] = 0.08 * verts[:, 2]
    for f in fingers:
        idx = np.where(part == f.part)[0]
        dirs[idx, 2, 6] = 0.04 * (verts[idx, 2] - f.joints[0, 2])
    # 9: wrist size (+8 % at the wrist ring, fading out towards the knuckles)
    fade = np.clip(1.0 - verts[:, 0] / 0.06, 0.0, 1.0) * (part == 0)
    rel = verts.copy()  # about the wrist axis (u), so only s and d scale
    rel[:, 0] = 0.0
    dirs[:, :, 9] = 0.08 * fade[:, None] * rel
    return dirs


def _joint_axes(digits: list[_Digit]) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """MANO joint id (1..15) -> (flexion axis, abduction axis, bone direction), local frame, unit vectors.

    A positive rotation about the flexion axis moves the bone towards the palm (fingers) or towards the
    pad side (thumb); a positive rotation about the abduction axis swings it sideways towards the thumb
    side; the twist axis is the bone itself."""
    out = {}
    palm_normal = np.array([0.0, 0.0, -1.0])  # palmar, local
    for d in digits:
        for k, j in enumerate(d.mano_joints):
            bone = _unit(d.joints[k + 1] - d.joints[k])
            if d.part == 5:
                pad = -_unit(d.dorsal - d.dorsal.dot(bone) * bone)
            else:
                pad = palm_normal - palm_normal.dot(bone) * bone
            flex = _unit(np.cross(bone, _unit(pad)))
            abduct = _unit(pad)  # rotating about the pad direction swings the bone sideways...
            if np.cross(abduct, bone)[1] < 0:  # ... positive towards the thumb side (+s)
                abduct = -abduct
            out[j] = (flex, abduct, bone)
    return out


def _pose_basis(digits: list[_Digit]) -> tuple[np.ndarray, np.ndarray]:
    """hands_mean (45,) and hands_components (45, 45) for the right hand, output frame.

    The mean curls every joint slightly about its flexion axis. The components are the principal axes of a
    seeded sample of 4000 poses: a shared grasp synergy, per-finger curl, abduction at joint 1 and small
    twists, plus isotropic noise so that all 45 directions are defined."""
    axes = _joint_axes(digits)
    by_joint = {j: (*axes[j], None) for j in axes}
    mean = _pose_mean(digits)
    rng = np.random.default_rng(20261124)
    n = 4000
    grasp = rng.uniform(-0.2, 1.4, size=n)
    samples = np.zeros((n, 15, 3))
    for d in digits:
        curl = grasp + 0.35 * rng.standard_normal(n)
        spread = 0.12 * rng.standard_normal(n)
        for k, j in enumerate(d.mano_joints):
            flex, abduct, bone, _ = by_joint[j]
            scale = (0.9, 1.1, 0.7)[k] if d.part != 5 else (0.5, 0.6, 0.8)[k]
            angle = scale * curl + 0.1 * rng.standard_normal(n)
            vec = angle[:, None] * flex[None] + 0.05 * rng.standard_normal(n)[:, None] * bone[None]
            if k == 0:
                vec += spread[:, None] * abduct[None]
            samples[:, j - 1] = vec @ _LOCAL_TO_OUT.T
    flat = samples.reshape(n, 45) + 0.02 * rng.standard_normal((n, 45))
    flat -= flat.mean(0)
    _, _, vt = np.linalg.svd(flat, full_matrices=False)
    # deterministic signs: the largest entry of each component is positive
    signs = np.sign(vt[np.arange(45), np.abs(vt).argmax(1)])
    return mean, vt * signs[:, None]


def _pose_mean(digits: list[_Digit]) -> np.ndarray:
    """(45,) hands_mean of the right hand, output frame: every joint curled a little about its flexion axis,
    more towards the little finger."""
    axes = _joint_axes(digits)
    rest = {1: (0.20, 0.30, 0.15), 2: (0.25, 0.35, 0.18), 3: (0.30, 0.40, 0.20), 4: (0.35, 0.45, 0.20),
            5: (0.20, 0.15, 0.20)}
    mean = np.zeros((15, 3))
    for d in digits:
        for k, j in enumerate(d.mano_joints):
            mean[j - 1] = _LOCAL_TO_OUT @ (rest[d.part][k] * axes[j][0])
    return mean.reshape(45)


# Named poses for pictures and examples: per digit (joint 1, 2, 3) as (flexion, abduction, twist) radians
# about the procedural model's axes (see _joint_axes); "relaxed" is the model's hands_mean.
_FIST = {1: ((1.45, 0, 0), (1.6, 0, 0), (0.9, 0, 0)), 2: ((1.45, 0, 0), (1.6, 0, 0), (0.9, 0, 0)),
         3: ((1.45, 0, 0), (1.6, 0, 0), (0.9, 0, 0)), 4: ((1.45, 0, 0), (1.6, 0, 0), (0.9, 0, 0)),
         5: ((0.5, -0.6, 0.0), (0.6, 0, 0), (0.5, 0, 0))}
_DEMO_POSES = {
    "flat": {p: ((0, 0, 0),) * 3 for p in range(1, 6)},
    "fist": _FIST,
    "point": {**_FIST, 1: ((0.0, 0.05, 0), (0.05, 0, 0), (0.05, 0, 0))},
    # thumb and index tips 12 mm apart (fitted once by gradient descent on the procedural model)
    "pinch": {1: ((0.64, 0.0, 0), (0.98, 0, 0), (0.55, 0, 0)), 2: ((0.3, 0, 0), (0.45, 0, 0), (0.3, 0, 0)),
              3: ((0.35, 0, 0), (0.5, 0, 0), (0.3, 0, 0)), 4: ((0.4, 0, 0), (0.5, 0, 0), (0.3, 0, 0)),
              5: ((0.4, -0.15, 0.15), (0.1, 0.15, 0.11), (0.18, 0.14, 0.08))},
}
DEMO_POSES = ("flat", "relaxed", "fist", "point", "pinch")


def demo_pose(name: str, side: str = "right") -> np.ndarray:
    """(45,) hand pose (the 15 joints after the root, axis-angle, ``flat_hand_mean=False`` convention: the
    model's hands_mean is subtracted, so HandModel shows exactly this pose) for one of :data:`DEMO_POSES`.
    Built on the procedural model's joint axes; on real MANO files the pose is only roughly the same."""
    if name not in DEMO_POSES:
        raise ValueError(f"unknown demo pose {name!r}; known: {', '.join(DEMO_POSES)}")
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if name == "relaxed":  # the mean hand itself: nothing to add
        return np.zeros(45)
    digits = _hand_digits()
    mean = _pose_mean(digits)
    axes = _joint_axes(digits)
    pose = np.zeros((15, 3))
    for d in digits:
        for k, j in enumerate(d.mano_joints):
            flex, abduct, bone = axes[j]
            a, b, c = _DEMO_POSES[name][d.part][k]
            pose[j - 1] = _LOCAL_TO_OUT @ (a * flex + b * abduct + c * bone)
    pose = pose.reshape(45) - mean
    if side == "left":
        pose = pose * np.tile([1.0, -1.0, -1.0], 15)
    return pose


# ----------------------------------------------------------------------------------------------------------
# public API


def _build_local(spacing=0.0075, palm_rows=6):
    digits = _hand_digits()
    base = _assemble(spacing, palm_rows, None)
    extra = NUM_VERTS - len(base.verts)
    if extra < 0:
        raise RuntimeError(f"procedural hand has {len(base.verts)} vertices before padding, more than {NUM_VERTS}")
    mesh = _assemble(spacing, palm_rows, extra)
    fixed = np.zeros(len(mesh.verts), dtype=bool)
    fixed[mesh.wrist_ring] = True
    fixed[list(mesh.tips.values())] = True
    mesh.verts = _taubin(mesh.verts, mesh.faces, fixed, iterations=6)
    # the thenar junction (palm hole -> thumb tube) folds where the two meet: smooth it more
    centre = mesh.verts[mesh.hole].mean(0)
    far = np.linalg.norm(mesh.verts - centre, axis=1) > _THENAR_SMOOTH_RADIUS
    mesh.verts = _taubin(mesh.verts, mesh.faces, fixed | far, iterations=_THENAR_SMOOTH_ITERS)
    return mesh, digits


def build_procedural_mano() -> tuple[dict, dict]:
    """Build the right and left models: two dicts with the official MANO keys (numpy arrays, scipy sparse
    regressor) plus ``fingertip_verts`` and ``model_source``. Deterministic."""
    mesh, digits = _build_local()
    verts_local = mesh.verts
    if len(verts_local) != NUM_VERTS or len(mesh.faces) != NUM_FACES:
        raise RuntimeError(f"procedural hand has {len(verts_local)} vertices / {len(mesh.faces)} faces")
    weights = _skinning_weights(mesh, digits)
    regressor = _joint_regressor(mesh, digits)
    shapedirs_local = _shape_directions(mesh, digits, verts_local)
    posedirs_local = _pose_correctives(mesh, digits, verts_local)
    hands_mean, hands_components = _pose_basis(digits)

    m = _LOCAL_TO_OUT
    v_template = verts_local @ m.T + WRIST_POSITION
    shapedirs = np.einsum("ij,vjk->vik", m, shapedirs_local)
    # posedirs: displacement vectors map like positions; the (R - I) features are already in the output
    # frame because R is a rotation of the output frame: re-express the local-frame feature coefficients.
    # A local coefficient on (R_local - I)[a, b] with R_local = M^T R M -> (R_local - I) = M^T (R - I) M.
    p = posedirs_local.reshape(len(verts_local), 3, 15, 3, 3)  # (V, xyz_local, joint, a_local, b_local)
    p = np.einsum("ij,vjkab,ca,db->vikcd", m, p, m, m)  # (V, xyz_out, joint, a_out, b_out)
    posedirs = p.reshape(len(verts_local), 3, 135)
    j = regressor @ v_template
    tips = [mesh.tips[5], mesh.tips[1], mesh.tips[2], mesh.tips[3], mesh.tips[4]]
    parents = np.array(MANO_PARENTS, dtype=np.int64)
    kintree = np.stack([np.where(parents < 0, 2**32 - 1, parents), np.arange(16)]).astype(np.int64)
    right = {
        "v_template": v_template.astype(np.float64),
        "f": mesh.faces.astype(np.uint32),
        "shapedirs": shapedirs.astype(np.float64),
        "posedirs": posedirs.astype(np.float64),
        "J_regressor": regressor,
        "J": np.asarray(j, dtype=np.float64),
        "weights": weights.astype(np.float64),
        "kintree_table": kintree,
        "hands_components": hands_components.astype(np.float64),
        "hands_mean": hands_mean.astype(np.float64),
        "bs_style": "lbs",
        "bs_type": "lrotmin",
        "fingertip_verts": np.array(tips, dtype=np.int64),
        "model_source": MODEL_SOURCE,
    }
    return right, mirror_model(right)


def mirror_model(model: dict) -> dict:
    """The mirror image (x -> -x) of a MANO-format model dict: positions and displacements negate x, faces
    reverse their winding, pose-space quantities mirror as axis-angle (x, -y, -z) and ``posedirs``
    coefficients pick up the sign ``m_k m_a m_b`` (offset component k, feature entry (a, b))."""
    sign = np.array([-1.0, 1.0, 1.0])  # position mirror
    aa = np.array([1.0, -1.0, -1.0])  # axis-angle mirror
    out = dict(model)
    out["v_template"] = model["v_template"] * sign
    out["J"] = np.asarray(model["J"]) * sign
    out["f"] = model["f"][:, ::-1].copy()
    out["shapedirs"] = model["shapedirs"] * sign[None, :, None]
    feat = (sign[:, None] * sign[None, :]).reshape(9)
    coef = sign[:, None, None] * np.tile(feat, 15)[None, None, :]  # (3, 1, 135)
    out["posedirs"] = model["posedirs"] * coef.reshape(1, 3, 135)
    out["hands_mean"] = model["hands_mean"] * np.tile(aa, 15)
    out["hands_components"] = model["hands_components"] * np.tile(aa, 15)[None]
    out["J_regressor"] = model["J_regressor"].copy()
    return out


def model_bytes(model: dict) -> bytes:
    """Pickle (protocol 2, readable with ``encoding='latin1'`` like the official files), deterministic."""
    buf = io.BytesIO()
    pickle.Pickler(buf, protocol=2).dump({k: model[k] for k in sorted(model)})
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def write_procedural_mano(out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``MANO_RIGHT.pkl`` and ``MANO_LEFT.pkl`` into ``out_dir`` (created if needed), each atomically
    (temporary file + ``os.replace``), and return their paths (right, left)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    right, left = build_procedural_mano()
    right_path, left_path = out / "MANO_RIGHT.pkl", out / "MANO_LEFT.pkl"
    _write_atomic(right_path, model_bytes(right))
    _write_atomic(left_path, model_bytes(left))
    return right_path, left_path


_SHAPE_NAMES = ("size", "finger length", "finger thickness", "palm width", "palm length", "thumb length",
                "hand thickness", "index vs ring", "finger taper", "wrist size")


def _views():
    """Camera rotations (3, 3) turning the template's right hand fingers-up: back, palm, 3/4 radial."""
    import torch

    from hands.rotation import axis_angle_to_matrix

    back = torch.tensor([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # fingers up, back to camera

    def about_y(deg):
        return axis_angle_to_matrix(torch.tensor([0.0, np.radians(deg), 0.0], dtype=torch.float32))

    return {"back": back, "palm": about_y(180.0) @ back, "three-quarter": about_y(-140.0) @ back}


def _tile(model, right_hand_pose, rotation, size: int, shape=None, gap: float = 0.004):
    """(3, size, size) image: the right hand (image right) and its mirror image, the left hand (image left),
    both with the hand pose ``right_hand_pose`` (45,) (mirrored for the left), turned by ``rotation``."""
    import torch

    from hands.render import render_hands
    from hands.rotation import matrix_to_axis_angle, mirror_axis_angle

    pose = torch.zeros(1, 48)
    pose[0, :3] = matrix_to_axis_angle(rotation[None])[0]
    pose[0, 3:] = right_hand_pose
    shape = torch.zeros(1, 10) if shape is None else shape
    right = model("right", pose, shape).verts
    left = model("left", mirror_axis_angle(pose), shape).verts
    centre = (right.amax(1) + right.amin(1)) / 2  # (1, 3)
    offset = torch.tensor([gap + (right.amax(1) - right.amin(1))[0, 0] / 2, 0.0, 0.0])
    right = right - centre[:, None] + offset + torch.tensor([0.0, 0.0, 0.55])
    left = left - centre[:, None] * torch.tensor([-1.0, 1.0, 1.0]) - offset + torch.tensor([0.0, 0.0, 0.55])
    k = torch.tensor([[1.35 * size, 0.0, size / 2], [0.0, 1.35 * size, size / 2], [0.0, 0.0, 1.0]])[None]
    faces_right, faces_left = model.faces_for("right"), model.faces_for("left")
    return render_hands(right, left, faces_right, faces_left, k, (size, size)).image[0]


def _save(grid, png: Path) -> None:
    from PIL import Image

    arr = (grid.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(png)


def render_pose_sheet(mano_dir: str | os.PathLike, png: str | os.PathLike, size: int = 256) -> Path:
    """PNG grid: rows flat, relaxed, fist, point, pinch; columns back, palm and 3/4 views; each tile shows the
    left hand (image left) and the right hand (image right). Needs hands.render."""
    import torch

    from hands.mano import HandModel

    model = HandModel(mano_dir)
    rows = []
    for name in DEMO_POSES:
        hand = torch.tensor(demo_pose(name), dtype=torch.float32)
        rows.append(torch.cat([_tile(model, hand, rot, size) for rot in _views().values()], dim=2))
    _save(torch.cat(rows, dim=1), Path(png))
    return Path(png)


def render_weight_sheet(mano_dir: str | os.PathLike, png: str | os.PathLike, size: int = 320) -> Path:
    """PNG: the right hand coloured by its skinning weights (one colour per bone, blended), flat and in a
    fist, back and palm views."""
    import torch

    from hands.mano import HandModel
    from hands.render import render_mesh
    from hands.rotation import matrix_to_axis_angle

    model = HandModel(mano_dir)
    weights = model.layers["right"].lbs_weights  # (V, 16)
    palette = torch.tensor(
        [[0.85, 0.85, 0.85], [0.90, 0.20, 0.20], [0.95, 0.55, 0.20], [1.00, 0.85, 0.30],
         [0.20, 0.70, 0.25], [0.45, 0.85, 0.45], [0.75, 0.95, 0.60], [0.55, 0.25, 0.75],
         [0.75, 0.50, 0.90], [0.90, 0.75, 1.00], [0.15, 0.45, 0.85], [0.40, 0.65, 0.95],
         [0.70, 0.85, 1.00], [0.60, 0.40, 0.20], [0.80, 0.60, 0.35], [0.95, 0.80, 0.55]]
    )
    colours = (weights @ palette)[None]  # (1, V, 3)
    tiles = []
    for name in ("flat", "fist"):
        for view in ("back", "palm"):
            pose = torch.zeros(1, 48)
            pose[0, :3] = matrix_to_axis_angle(_views()[view][None])[0]
            pose[0, 3:] = torch.tensor(demo_pose(name), dtype=torch.float32)
            verts = model("right", pose, torch.zeros(1, 10)).verts
            verts = verts - (verts.amax(1) + verts.amin(1))[:, None] / 2 + torch.tensor([0.0, 0.0, 0.42])
            k = torch.tensor([[1.3 * size, 0.0, size / 2], [0.0, 1.3 * size, size / 2], [0.0, 0.0, 1.0]])
            tiles.append(render_mesh(verts, model.faces, k, (size, size), colours).image[0])
    _save(torch.cat(tiles, dim=2), Path(png))
    return Path(png)


def render_shape_sheet(mano_dir: str | os.PathLike, png: str | os.PathLike, size: int = 220) -> Path:
    """PNG: one tile per shape direction k, showing shape[k] = -2 (orange, image left) and +2 (blue, image
    right) on the flat right hand seen from the back, labelled with the direction's name."""
    import torch
    from PIL import Image, ImageDraw

    from hands.mano import HandModel
    from hands.render import render_hands
    from hands.rotation import matrix_to_axis_angle

    model = HandModel(mano_dir)
    tiles = []
    for k in range(10):
        pose = torch.zeros(2, 48)
        pose[:, :3] = matrix_to_axis_angle(_views()["back"][None])[0]
        pose[:, 3:] = torch.tensor(demo_pose("flat"), dtype=torch.float32)
        shape = torch.zeros(2, 10)
        shape[0, k], shape[1, k] = -2.0, 2.0
        verts = model("right", pose, shape).verts
        centre = (verts[1].amax(0) + verts[1].amin(0)) / 2
        small = verts[0] - centre + torch.tensor([-0.06, 0.0, 0.65])
        large = verts[1] - centre + torch.tensor([0.06, 0.0, 0.65])
        kmat = torch.tensor([[1.4 * size, 0.0, size / 2], [0.0, 1.4 * size, size / 2], [0.0, 0.0, 1.0]])[None]
        img = render_hands(large[None], small[None], model.faces, model.faces, kmat, (size, size)).image[0]
        arr = (img.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        pil = Image.fromarray(arr)
        ImageDraw.Draw(pil).text((6, 4), f"shape[{k}] {_SHAPE_NAMES[k]}", fill=(255, 255, 255))
        tiles.append(torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255)
    rows = [torch.cat(tiles[i : i + 5], dim=2) for i in (0, 5)]
    _save(torch.cat(rows, dim=1), Path(png))
    return Path(png)


def render_topology_sheet(mano_dir: str | os.PathLike, png: str | os.PathLike, size: int = 480) -> Path:
    """PNG: the flat right hand from the back and the palm with its visible edges drawn over the shading
    (edges whose midpoint is not behind the depth buffer), wrist-ring edges in red."""
    import torch
    from PIL import Image, ImageDraw

    from hands.camera import project
    from hands.mano import HandModel
    from hands.render import render_mesh
    from hands.rotation import matrix_to_axis_angle

    model = HandModel(mano_dir)
    faces = model.faces
    edges = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).sort(dim=1).values.unique(dim=0)
    counts = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).sort(dim=1).values
    boundary = {tuple(e) for e, n in zip(*counts.unique(dim=0, return_counts=True)) if n == 1}
    boundary = {tuple(int(x) for x in e) for e in boundary}
    tiles = []
    for view in ("back", "palm"):
        pose = torch.zeros(1, 48)
        pose[0, :3] = matrix_to_axis_angle(_views()[view][None])[0]
        pose[0, 3:] = torch.tensor(demo_pose("flat"), dtype=torch.float32)
        verts = model("right", pose, torch.zeros(1, 10)).verts
        verts = verts - (verts.amax(1) + verts.amin(1))[:, None] / 2 + torch.tensor([0.0, 0.0, 0.36])
        k = torch.tensor([[1.3 * size, 0.0, size / 2], [0.0, 1.3 * size, size / 2], [0.0, 0.0, 1.0]])
        out = render_mesh(verts, faces, k, (size, size))
        pix = project(verts, k[None])[0]  # (V, 2)
        mid = (verts[0, edges[:, 0]] + verts[0, edges[:, 1]]) / 2
        mid_pix = project(mid[None], k[None])[0].round().long().clamp(0, size - 1)
        visible = mid[:, 2] <= out.depth[0, mid_pix[:, 1], mid_pix[:, 0]] + 2e-3
        arr = (out.image[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        pil = Image.fromarray(arr)
        draw = ImageDraw.Draw(pil)
        for (a, b), vis in zip(edges.tolist(), visible.tolist()):
            if vis:
                colour = (220, 40, 40) if (a, b) in boundary else (40, 40, 60)
                draw.line([tuple(pix[a].tolist()), tuple(pix[b].tolist())], fill=colour, width=1)
        tiles.append(torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255)
    _save(torch.cat(tiles, dim=2), Path(png))
    return Path(png)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the procedural MANO-format hand model files.")
    parser.add_argument("--out", required=True, type=Path, help="folder for MANO_RIGHT.pkl and MANO_LEFT.pkl")
    parser.add_argument("--render", type=Path, default=None, help="also write a PNG sheet of both hands in poses")
    parser.add_argument(
        "--docs", type=Path, default=None,
        help="also write the documentation pictures (hand-poses/weights/shapes/topology.png) here",
    )
    args = parser.parse_args(argv)
    right_path, left_path = write_procedural_mano(args.out)
    print(f"wrote {right_path} and {left_path}")
    if args.render is not None:
        print(f"wrote {render_pose_sheet(args.out, args.render)}")
    if args.docs is not None:
        for fn, name in ((render_pose_sheet, "hand-poses.png"), (render_weight_sheet, "hand-weights.png"),
                         (render_shape_sheet, "hand-shapes.png"), (render_topology_sheet, "hand-topology.png")):
            print(f"wrote {fn(args.out, args.docs / name)}")


if __name__ == "__main__":
    main()
