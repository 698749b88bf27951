"""What every regressor returns.

Conventions: 3D quantities are in camera axes, metres; each hand's vertices and joints are relative to that
hand's own wrist (joint 0 of :mod:`hands.joints`' order); ``rel_root`` is the left wrist minus the right
wrist. 2D quantities are pixels of the batch's input image. The evaluator (:mod:`eval.evaluator`) reads
``right_verts``, ``left_verts``, ``right_joints``, ``left_joints`` and ``rel_root``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from torch import Tensor

__all__ = ["TwoHandOutput"]

_REQUIRED_SHAPES = {
    "right_verts": (778, 3),
    "left_verts": (778, 3),
    "right_joints": (21, 3),
    "left_joints": (21, 3),
    "rel_root": (3,),
}
_OPTIONAL_SHAPES = {
    "right_joints_img": (21, 2),
    "left_joints_img": (21, 2),
    "right_mano_pose": (48,),
    "left_mano_pose": (48,),
    "right_mano_shape": (10,),
    "left_mano_shape": (10,),
}


@dataclass
class TwoHandOutput:
    """Predictions for a batch of B images.

    right_verts, left_verts: (B, 778, 3) mesh vertices relative to that hand's wrist, camera axes, metres.
    right_joints, left_joints: (B, 21, 3) joints (hands.joints order) relative to that hand's wrist,
        camera axes, metres.
    rel_root: (B, 3) left wrist minus right wrist, camera axes, metres.
    right_joints_img, left_joints_img: optional (B, 21, 2) joints in input-image pixels.
    right_mano_pose, left_mano_pose: optional (B, 48) axis-angle MANO pose (flat_hand_mean=False).
    right_mano_shape, left_mano_shape: optional (B, 10) MANO betas.
    extras: anything else a regressor wants to hand to its own losses (tensors or values).
    """

    right_verts: Tensor
    left_verts: Tensor
    right_joints: Tensor
    left_joints: Tensor
    rel_root: Tensor
    right_joints_img: Optional[Tensor] = None
    left_joints_img: Optional[Tensor] = None
    right_mano_pose: Optional[Tensor] = None
    left_mano_pose: Optional[Tensor] = None
    right_mano_shape: Optional[Tensor] = None
    left_mano_shape: Optional[Tensor] = None
    extras: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.right_verts.shape[0])

    def validate(self, batch_size: Optional[int] = None) -> None:
        """Raise ValueError naming the first field whose shape breaks the contract."""
        batch_size = len(self) if batch_size is None else batch_size
        for name, shape in {**_REQUIRED_SHAPES, **_OPTIONAL_SHAPES}.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_SHAPES:
                continue
            if not isinstance(value, Tensor):
                raise ValueError(f"TwoHandOutput.{name}: expected a tensor, got {type(value).__name__}")
            if tuple(value.shape) != (batch_size, *shape):
                raise ValueError(
                    f"TwoHandOutput.{name}: expected shape {(batch_size, *shape)}, got {tuple(value.shape)}"
                )

    def detach(self) -> "TwoHandOutput":
        """A copy whose tensors are detached (extras are kept as they are)."""
        return dataclasses.replace(
            self,
            **{
                f.name: getattr(self, f.name).detach()
                for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), Tensor)
            },
        )

    def side(self, side: str) -> tuple[Tensor, Tensor]:
        """(verts (B, 778, 3), joints (B, 21, 3)) of ``side`` ("right" or "left")."""
        if side not in ("right", "left"):
            raise ValueError(f"side must be 'right' or 'left', got {side!r}")
        return getattr(self, f"{side}_verts"), getattr(self, f"{side}_joints")
