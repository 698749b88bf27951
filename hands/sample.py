"""The sample schema every dataset reader, the synthetic source and every regressor speak.

Conventions (stated once for the module):
- Everything is in camera space: extrinsics are already applied. Units are metres; pixels for image
  coordinates. Millimetres appear only in reported metrics (see :func:`hands.units.to_mm`).
- Joint order: 21 joints per hand, wrist first, then thumb, index, middle, ring, pinky, each from knuckle
  to tip (InterWild's order; see :mod:`hands.joints`).
- ``rel_root`` is always the left wrist minus the right wrist (camera axes, metres).
- MANO poses are 48 axis-angle values, root first, in the ``flat_hand_mean=False`` convention.

A :class:`HandSample` holds one image; :func:`collate` stacks samples into a :class:`HandBatch` whose
tensors carry a leading batch dimension B. Both move with ``.to(device)``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = [
    "SIDES",
    "HAND_TYPES",
    "Camera",
    "HandLabels",
    "HandSample",
    "HandBatch",
    "collate",
    "concat_batches",
]

SIDES = ("right", "left")
HAND_TYPES = ("right", "left", "interacting")
NUM_VERTS = 778
NUM_JOINTS = 21


def _map_tensors(obj: Any, fn) -> Any:
    """Apply ``fn`` to every tensor field of a (nested) schema dataclass; other fields are shared."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(
            obj, **{f.name: _map_tensors(getattr(obj, f.name), fn) for f in dataclasses.fields(obj)}
        )
    return obj


@dataclass
class Camera:
    """Intrinsics of the (already extrinsics-applied) camera.

    K: (3, 3) pinhole intrinsics in pixels (or (B, 3, 3) in a batch).
    dist: (4,) OpenCV fisheye coefficients k1..k4 (ReInterHand's egocentric views); zeros for a pinhole
        camera (or (B, 4) in a batch).
    """

    K: Tensor
    dist: Tensor = field(default_factory=lambda: torch.zeros(4))

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> "Camera":
        return _map_tensors(self, lambda t: _move(t, device, dtype, non_blocking))

    @property
    def is_fisheye(self) -> Tensor:
        """(...,) bool, True where distortion coefficients are set."""
        return self.dist.abs().sum(-1) > 0


def _move(t: Tensor, device, dtype, non_blocking: bool) -> Tensor:
    # Only floating tensors change dtype; masks stay bool.
    if dtype is not None and t.is_floating_point():
        return t.to(device=device, dtype=dtype, non_blocking=non_blocking)
    return t.to(device=device, non_blocking=non_blocking)


@dataclass
class HandLabels:
    """Labels of one hand (shapes for one sample; a batch adds a leading B).

    mano_pose: (48,) axis-angle, root first, flat_hand_mean=False convention.
    mano_shape: (10,) MANO betas.
    root_cam: (3,) the wrist in camera space, metres.
    verts_cam: (778, 3) mesh vertices in camera space, metres.
    joints_cam: (21, 3) joints in camera space, metres, wrist first (hands.joints order).
    joints_img: (21, 2) joints in image pixels (x, y) of this sample's image.
    bbox: (4,) x0, y0, x1, y1 in image pixels.
    valid: () bool, the hand is present/annotated in this sample.
    joints_valid: (21,) bool, per-joint validity in 3D (InterWild's ``joint_valid``): joints_cam is a label
        (and joints_img its projection, also outside the image).
    joints_trunc: (21,) bool, per-joint validity in 2D (InterWild's ``joint_trunc``): joints_img is a label
        and lies inside this sample's image (pixel centres at integers: [-0.5, W - 0.5) x [-0.5, H - 0.5));
        a hand can be valid in 3D and truncated in 2D. 2D losses use this mask, 3D losses ``joints_valid``.
    mano_valid: () bool, mano_pose / mano_shape / verts_cam come from a MANO fit.
    """

    mano_pose: Tensor
    mano_shape: Tensor
    root_cam: Tensor
    verts_cam: Tensor
    joints_cam: Tensor
    joints_img: Tensor
    bbox: Tensor
    valid: Tensor
    joints_valid: Tensor
    joints_trunc: Tensor
    mano_valid: Tensor

    @classmethod
    def empty(cls, dtype: torch.dtype = torch.float32) -> "HandLabels":
        """An absent hand: zeros everywhere and every validity mask False."""
        return cls(
            mano_pose=torch.zeros(48, dtype=dtype),
            mano_shape=torch.zeros(10, dtype=dtype),
            root_cam=torch.zeros(3, dtype=dtype),
            verts_cam=torch.zeros(NUM_VERTS, 3, dtype=dtype),
            joints_cam=torch.zeros(NUM_JOINTS, 3, dtype=dtype),
            joints_img=torch.zeros(NUM_JOINTS, 2, dtype=dtype),
            bbox=torch.zeros(4, dtype=dtype),
            valid=torch.tensor(False),
            joints_valid=torch.zeros(NUM_JOINTS, dtype=torch.bool),
            joints_trunc=torch.zeros(NUM_JOINTS, dtype=torch.bool),
            mano_valid=torch.tensor(False),
        )

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> "HandLabels":
        return _map_tensors(self, lambda t: _move(t, device, dtype, non_blocking))

    def validate(self, where: str = "hand") -> None:
        """Raise ValueError naming the field whose shape is wrong (single-sample shapes)."""
        expected = {
            "mano_pose": (48,),
            "mano_shape": (10,),
            "root_cam": (3,),
            "verts_cam": (NUM_VERTS, 3),
            "joints_cam": (NUM_JOINTS, 3),
            "joints_img": (NUM_JOINTS, 2),
            "bbox": (4,),
            "valid": (),
            "joints_valid": (NUM_JOINTS,),
            "joints_trunc": (NUM_JOINTS,),
            "mano_valid": (),
        }
        for name, shape in expected.items():
            value = getattr(self, name)
            if not isinstance(value, Tensor):
                raise ValueError(f"{where}.{name}: expected a tensor, got {type(value).__name__}")
            if tuple(value.shape) != shape:
                raise ValueError(f"{where}.{name}: expected shape {shape}, got {tuple(value.shape)}")
        for name in ("valid", "joints_valid", "joints_trunc", "mano_valid"):
            if getattr(self, name).dtype != torch.bool:
                raise ValueError(f"{where}.{name}: expected a bool tensor, got {getattr(self, name).dtype}")


@dataclass
class HandSample:
    """One image with both hands' labels.

    image: (3, H, W) float RGB in [0, 1].
    right, left: :class:`HandLabels` (an absent hand has ``valid`` False).
    rel_root: (3,) left wrist minus right wrist, camera axes, metres.
    rel_root_valid: () bool.
    camera: :class:`Camera` intrinsics.
    hand_type: "right" | "left" | "interacting".
    meta: dict with at least ``dataset`` (str), ``id`` (str), ``is_synthetic`` (bool); optional
        ``prompt`` (str), ``joints_3d`` (bool, default True: False when ``joints_cam`` is not a label,
        only ``joints_img``; see :attr:`HandBatch.joints_3d`) and anything a reader wants to keep (e.g.
        ``hand_type_valid``).
    """

    image: Tensor
    right: HandLabels
    left: HandLabels
    rel_root: Tensor
    rel_root_valid: Tensor
    camera: Camera
    hand_type: str
    meta: dict = field(default_factory=dict)

    def hand(self, side: str) -> HandLabels:
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        return getattr(self, side)

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> "HandSample":
        return _map_tensors(self, lambda t: _move(t, device, dtype, non_blocking))

    def validate(self) -> None:
        """Raise ValueError naming the first field with a wrong shape, dtype or value."""
        if self.image.ndim != 3 or self.image.shape[0] != 3:
            raise ValueError(f"image: expected shape (3, H, W), got {tuple(self.image.shape)}")
        if not self.image.is_floating_point():
            raise ValueError(f"image: expected a float tensor in [0, 1], got {self.image.dtype}")
        self.right.validate("right")
        self.left.validate("left")
        if tuple(self.rel_root.shape) != (3,):
            raise ValueError(f"rel_root: expected shape (3,), got {tuple(self.rel_root.shape)}")
        if tuple(self.camera.K.shape) != (3, 3):
            raise ValueError(f"camera.K: expected shape (3, 3), got {tuple(self.camera.K.shape)}")
        if self.hand_type not in HAND_TYPES:
            raise ValueError(f"hand_type: expected one of {HAND_TYPES}, got {self.hand_type!r}")
        for key in ("dataset", "id", "is_synthetic"):
            if key not in self.meta:
                raise ValueError(f"meta: missing key {key!r}")

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the image."""
        return int(self.image.shape[-2]), int(self.image.shape[-1])


@dataclass
class HandBatch:
    """B samples stacked: every tensor field of :class:`HandSample` with a leading B.

    image: (B, 3, H, W); right/left: :class:`HandLabels` with (B, ...) tensors; rel_root (B, 3);
    rel_root_valid (B,); camera.K (B, 3, 3), camera.dist (B, 4); hand_type: list of B strings;
    meta: list of B dicts.
    """

    image: Tensor
    right: HandLabels
    left: HandLabels
    rel_root: Tensor
    rel_root_valid: Tensor
    camera: Camera
    hand_type: list[str]
    meta: list[dict]

    def __len__(self) -> int:
        return int(self.image.shape[0])

    @property
    def device(self) -> torch.device:
        return self.image.device

    def hand(self, side: str) -> HandLabels:
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        return getattr(self, side)

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> "HandBatch":
        return _map_tensors(self, lambda t: _move(t, device, dtype, non_blocking))

    def pin_memory(self) -> "HandBatch":
        """The batch in page-locked host memory (what a DataLoader with ``pin_memory=True`` calls), so that
        ``.to(cuda, non_blocking=True)`` is an asynchronous copy."""
        return _map_tensors(self, lambda t: t.pin_memory())

    def record_stream(self, stream) -> None:
        """Mark every tensor as used on ``stream`` (CUDA's caching allocator then keeps their memory until the
        work queued there is done, although they were allocated on another stream)."""
        _map_tensors(self, lambda t: t.record_stream(stream))

    def tensors(self) -> list[Tensor]:
        """Every tensor field, in field order."""
        out: list[Tensor] = []
        _map_tensors(self, lambda t: out.append(t) or t)
        return out

    @property
    def is_synthetic(self) -> Tensor:
        """(B,) bool on the batch's device."""
        return _flags([bool(m.get("is_synthetic", False)) for m in self.meta], self.device)

    @property
    def joints_3d(self) -> Tensor:
        """(B,) bool on the batch's device: False for 2D-only samples (``meta["joints_3d"]`` False, MSCOCO's
        InterWild ``is_3D = 0``), whose ``joints_cam`` are not labels and whose ``joints_img`` /
        ``joints_valid`` are; True when the key is absent. Losses on joints_cam (or on depths taken from
        it) multiply their mask by this."""
        return _flags([bool(m.get("joints_3d", True)) for m in self.meta], self.device)

    @property
    def interacting(self) -> Tensor:
        """(B,) bool, hand_type == "interacting"."""
        return _flags([t == "interacting" for t in self.hand_type], self.device)

    def select(self, index: Tensor | Sequence[int] | slice) -> "HandBatch":
        """The sub-batch at ``index`` (a slice, a list of ints, or a 1-D long/bool tensor)."""
        if isinstance(index, slice):
            positions = list(range(len(self)))[index]
        elif isinstance(index, Tensor):
            index = index.detach().cpu()
            positions = index.nonzero().flatten().tolist() if index.dtype == torch.bool else index.tolist()
        else:
            positions = list(index)
        if positions and positions == list(range(positions[0], positions[-1] + 1)):
            start, stop = positions[0], positions[-1] + 1  # a contiguous run: no index copy to the device
            picked = _map_tensors(self, lambda t: t[start:stop].clone())
        else:
            idx = torch.as_tensor(positions, dtype=torch.long).to(self.device, non_blocking=True)
            picked = _map_tensors(self, lambda t: t.index_select(0, idx.to(t.device)))
        return dataclasses.replace(
            picked, hand_type=[self.hand_type[i] for i in positions], meta=[self.meta[i] for i in positions]
        )

    def unbind(self) -> list[HandSample]:
        """Split back into HandSamples (views on this batch's tensors)."""
        out = []
        for i in range(len(self)):
            item = _map_tensors(self, lambda t: t[i])
            out.append(
                HandSample(
                    image=item.image,
                    right=item.right,
                    left=item.left,
                    rel_root=item.rel_root,
                    rel_root_valid=item.rel_root_valid,
                    camera=item.camera,
                    hand_type=self.hand_type[i],
                    meta=self.meta[i],
                )
            )
        return out


def _flags(values: list[bool], device: torch.device) -> Tensor:
    """(B,) bool from host values, copied without blocking (a blocking copy waits for the device's stream)."""
    return torch.tensor(values, dtype=torch.bool).to(device, non_blocking=True)


def _stack(values: list) -> Any:
    first = values[0]
    if isinstance(first, Tensor):
        return torch.stack(values, 0)
    if dataclasses.is_dataclass(first):
        return type(first)(**{f.name: _stack([getattr(v, f.name) for v in values]) for f in dataclasses.fields(first)})
    raise TypeError(f"cannot stack values of type {type(first).__name__}")


def collate(samples: Sequence[HandSample]) -> HandBatch:
    """Stack HandSamples into a HandBatch (usable as a DataLoader ``collate_fn``).

    All images must share one size; crop/resize them first (hands.datasets.transforms).
    """
    if len(samples) == 0:
        raise ValueError("collate: got no samples")
    sizes = {tuple(s.image.shape) for s in samples}
    if len(sizes) != 1:
        raise ValueError(f"collate: images differ in shape {sorted(sizes)}; resize or crop them first")
    return HandBatch(
        image=torch.stack([s.image for s in samples], 0),
        right=_stack([s.right for s in samples]),
        left=_stack([s.left for s in samples]),
        rel_root=torch.stack([s.rel_root for s in samples], 0),
        rel_root_valid=torch.stack([s.rel_root_valid for s in samples], 0),
        camera=_stack([s.camera for s in samples]),
        hand_type=[s.hand_type for s in samples],
        meta=[dict(s.meta) for s in samples],
    )


def _cat(values: list) -> Any:
    first = values[0]
    if isinstance(first, Tensor):
        return torch.cat([v.to(first.device) for v in values], 0)
    if dataclasses.is_dataclass(first):
        return type(first)(**{f.name: _cat([getattr(v, f.name) for v in values]) for f in dataclasses.fields(first)})
    raise TypeError(f"cannot concatenate values of type {type(first).__name__}")


def concat_batches(batches: Sequence[HandBatch]) -> HandBatch:
    """Concatenate HandBatches along B (on the first batch's device); image sizes must match."""
    batches = [b for b in batches if len(b) > 0]
    if not batches:
        raise ValueError("concat_batches: got no non-empty batches")
    sizes = {tuple(b.image.shape[1:]) for b in batches}
    if len(sizes) != 1:
        raise ValueError(f"concat_batches: image shapes differ {sorted(sizes)}")
    return HandBatch(
        image=_cat([b.image for b in batches]),
        right=_cat([b.right for b in batches]),
        left=_cat([b.left for b in batches]),
        rel_root=_cat([b.rel_root for b in batches]),
        rel_root_valid=_cat([b.rel_root_valid for b in batches]),
        camera=_cat([b.camera for b in batches]),
        hand_type=[t for b in batches for t in b.hand_type],
        meta=[m for b in batches for m in b.meta],
    )
