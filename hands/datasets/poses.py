"""A simple two-hand pose sampler for synthlab: finger curls within joint limits, named gestures, and
two-hand configurations (clasped, palms facing, near each other, single hands) in a world frame.

Axes are found from the hand model itself, so the sampler works for the procedural hand and for real MANO:
at the model's mean pose (zero parameters, flat_hand_mean=False) the palm normal n points to the side the
fingertips curl towards; for each finger joint the flexion axis is, among the joint's three local axes
(and their negatives), the one whose rotation moves the finger's tip furthest along n (for the thumb:
towards the palm and the little finger's base); the sideways (abduction) axis of a knuckle is the one that
moves the tip furthest across the palm. Curls are added to the mean pose as axis-angle offsets.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hands.rotation import axis_angle_to_matrix, matrix_to_axis_angle, mirror_axis_angle

__all__ = ["PoseSampler", "GESTURES", "CONFIGS", "HandFit", "ORIENTATIONS"]

# MANO parameter joints (1..15) per finger, knuckle to tip; tip vertex index in model.tip_verts
FINGERS = {
    "thumb": ((13, 14, 15), 0),
    "index": ((1, 2, 3), 1),
    "middle": ((4, 5, 6), 2),
    "ring": ((10, 11, 12), 3),
    "pinky": ((7, 8, 9), 4),
}
# flexion limits in radians (offsets from the mean pose), per joint level (knuckle, middle, distal)
FLEX_LIMITS = {
    "finger": ((-0.25, 1.35), (0.0, 1.55), (0.0, 1.1)),
    "thumb": ((-0.3, 0.7), (-0.1, 0.8), (-0.2, 1.1)),
}
ABDUCTION_LIMIT = 0.25
# per-finger curl fractions in [0, 1] (thumb, index, middle, ring, pinky); None = random
GESTURES = {
    "open": (0.0, 0.0, 0.0, 0.0, 0.0),
    "relaxed": (0.25, 0.2, 0.25, 0.3, 0.35),
    "fist": (0.8, 0.95, 0.95, 0.95, 0.95),
    "point": (0.7, 0.0, 0.9, 0.9, 0.9),
    "peace": (0.8, 0.0, 0.0, 0.9, 0.9),
    "pinch": (0.55, 0.6, 0.1, 0.1, 0.1),
    "random": None,
}
# two-hand configurations: (probability, gap between palm centres' mirror plane and the right palm, metres);
# the left hand is then moved apart until no two vertices are closer than 4 mm (1.5 mm for clasped hands;
# PoseSampler.separate)
CONFIGS = {
    "clasp": (0.2, (0.016, 0.024)),
    "facing": (0.2, (0.025, 0.05)),
    "near": (0.2, (0.05, 0.1)),
    "single-right": (0.2, None),
    "single-left": (0.2, None),
}
# how the hands' global orientations are drawn (PoseSampler's ``orientation``):
#   uniform: uniformly over all rotations (synthlab's default; with cameras from every direction and any roll, a
#            hand is seen at any orientation: the mean hand of the data is a point)
#   upright: hands held in front of a person, fingers up, palms sideways (the right palm towards +x, the left
#            towards -x, i.e. towards each other), then turned about the vertical by U[-90, 90] degrees and
#            tilted about a random axis by up to 45 degrees: the orientations of hands held before a capture
#            rig's front cameras (used with synthlab's ``studio`` viewpoints)
ORIENTATIONS = ("uniform", "upright")
UPRIGHT_YAW = np.pi / 2
UPRIGHT_TILT = np.pi / 4


@dataclass
class HandFit:
    """One hand's MANO fit in the world frame: pose (48,), shape (10,), trans (3,) metres; gesture name."""

    pose: np.ndarray
    shape: np.ndarray
    trans: np.ndarray
    gesture: str


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random rotation matrix (3, 3) from a random unit quaternion."""
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _small_rotation(rng: np.random.Generator, max_rad: float) -> np.ndarray:
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    return axis_angle_to_matrix(torch.tensor(axis * rng.uniform(-max_rad, max_rad), dtype=torch.float64)).numpy()


class PoseSampler:
    """Samples plausible hand poses and two-hand world configurations with a hand model.

    Args:
        model: a :class:`hands.mano.HandModel` (CPU).
    """

    def __init__(self, model, orientation: str = "uniform") -> None:
        if orientation not in ORIENTATIONS:
            raise ValueError(f"PoseSampler: unknown orientation {orientation!r}; known: {', '.join(ORIENTATIONS)}")
        self.model = model
        self.orientation = orientation
        self.axes = {side: self._find_axes(side) for side in ("right", "left")}
        self.upright = {side: self._upright_frame(side) for side in ("right", "left")} if orientation == "upright" else None

    # -- model queries -------------------------------------------------------------------------------------
    def forward(self, side: str, pose: np.ndarray, shape: np.ndarray, trans: np.ndarray | None = None):
        """Batched forward: pose (B, 48), shape (B, 10), trans (B, 3) numpy -> (verts, joints) numpy, metres."""
        pose_t = torch.as_tensor(np.atleast_2d(pose), dtype=torch.float32)
        shape_t = torch.as_tensor(np.atleast_2d(shape), dtype=torch.float32)
        trans_t = None if trans is None else torch.as_tensor(np.atleast_2d(trans), dtype=torch.float32)
        with torch.no_grad():
            out = self.model(side, pose_t, shape_t, trans_t)
        return out.verts.numpy().astype(np.float64), out.joints.numpy().astype(np.float64)

    @staticmethod
    def palm_frame(joints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """joints: (21, 3) our order -> (palm centre (3,), unit normal of the wrist/index1/pinky1 plane (3,),
        sign not fixed)."""
        wrist, index1, middle1, pinky1 = joints[0], joints[5], joints[9], joints[17]
        centre = (wrist + index1 + middle1 + pinky1) / 4
        normal = np.cross(index1 - wrist, pinky1 - wrist)
        return centre, normal / np.linalg.norm(normal)

    def palm_normal(self, joints: np.ndarray, side: str) -> np.ndarray:
        """The unit normal pointing out of the palm (the side fingers curl to), from the cached sign."""
        _, normal = self.palm_frame(joints)
        return normal * self.axes[side]["palm_sign"]

    def _find_axes(self, side: str) -> dict:
        zero_pose, zero_shape = np.zeros((1, 48)), np.zeros((1, 10))
        _, joints = self.forward(side, zero_pose, zero_shape)
        joints = joints[0]
        centre, normal = self.palm_frame(joints)
        tips_mean = joints[[8, 12, 16, 20]].mean(0)
        sign = 1.0 if float((tips_mean - centre) @ normal) > 0 else -1.0  # the mean pose curls to the palm
        normal = normal * sign
        across = joints[5] - joints[17]  # pinky knuckle -> index knuckle
        across /= np.linalg.norm(across)
        # try +-0.5 rad about each local axis of every finger joint: 15 joints x 3 axes
        trial = np.zeros((45, 48))
        for j in range(15):
            for a in range(3):
                trial[3 * j + a, 3 * (j + 1) + a] = 0.5
        _, moved = self.forward(side, trial, np.zeros((45, 10)))
        tips_before = joints[[4, 8, 12, 16, 20]]
        flex, abduct = {}, {}
        for name, (mano_joints, tip) in FINGERS.items():
            target = normal
            if name == "thumb":
                to_pinky = joints[17] - joints[4]
                target = normal + to_pinky / np.linalg.norm(to_pinky)
                target /= np.linalg.norm(target)
            for level, j in enumerate(mano_joints):
                delta = moved[3 * (j - 1) : 3 * (j - 1) + 3, [4, 8, 12, 16, 20][tip]] - tips_before[tip]  # (3 axes, 3)
                along = delta @ target
                best = int(np.argmax(np.abs(along)))
                axis = np.zeros(3)
                axis[best] = np.sign(along[best])
                flex[j] = axis
                if level == 0 and name != "thumb":
                    sideways = np.abs(delta @ across)
                    sideways[best] = -1.0
                    other = int(np.argmax(sideways))
                    side_axis = np.zeros(3)
                    side_axis[other] = 1.0
                    abduct[j] = side_axis
        return {"palm_sign": sign, "flex": flex, "abduct": abduct}

    def _upright_frame(self, side: str) -> np.ndarray:
        """The root rotation (3, 3) that turns the model's mean-pose hand upright: wrist -> middle knuckle along
        world +z, the palm's outward normal along +x (right hand) or -x (left hand)."""
        _, joints = self.forward(side, np.zeros((1, 48)), np.zeros((1, 10)))
        joints = joints[0]
        normal = self.palm_normal(joints, side)
        up = joints[9] - joints[0]
        up = up - normal * (up @ normal)
        up /= np.linalg.norm(up)
        source = np.stack([np.cross(up, normal), up, normal], axis=1)  # columns: a right-handed frame
        palm = np.array([1.0, 0.0, 0.0]) if side == "right" else np.array([-1.0, 0.0, 0.0])
        vertical = np.array([0.0, 0.0, 1.0])
        target = np.stack([np.cross(vertical, palm), vertical, palm], axis=1)
        return target @ source.T

    def root_rotation(self, side: str, rng: np.random.Generator) -> np.ndarray:
        """A global orientation (3, 3) for one hand, drawn as ``orientation`` says (module comment)."""
        if self.orientation == "uniform":
            return _random_rotation(rng)
        yaw = rng.uniform(-UPRIGHT_YAW, UPRIGHT_YAW)
        turn = axis_angle_to_matrix(torch.tensor([0.0, 0.0, yaw], dtype=torch.float64)).numpy()
        return _small_rotation(rng, UPRIGHT_TILT) @ turn @ self.upright[side]

    # -- poses ---------------------------------------------------------------------------------------------
    def articulation(self, side: str, rng: np.random.Generator, gesture: str | None = None) -> tuple[np.ndarray, str]:
        """(45,) finger pose parameters (offsets from the mean pose) for ``gesture`` (random when None)."""
        if gesture is None:
            gesture = str(rng.choice(list(GESTURES)))
        fractions = GESTURES[gesture]
        if fractions is None:
            fractions = rng.uniform(0.0, 1.0, size=5)
        axes = self.axes[side]
        pose = np.zeros((16, 3))
        for (name, (mano_joints, _)), fraction in zip(FINGERS.items(), fractions):
            limits = FLEX_LIMITS["thumb" if name == "thumb" else "finger"]
            for level, j in enumerate(mano_joints):
                low, high = limits[level]
                frac = float(np.clip(fraction + rng.normal(0.0, 0.08), 0.0, 1.0))
                pose[j] += axes["flex"][j] * (low + frac * (high - low))
                if j in axes["abduct"]:
                    pose[j] += axes["abduct"][j] * rng.uniform(-ABDUCTION_LIMIT, ABDUCTION_LIMIT)
        return pose.reshape(48)[3:], gesture

    def sample_shape(self, rng: np.random.Generator) -> np.ndarray:
        return np.clip(rng.normal(0.0, 0.8, size=10), -2.0, 2.0)

    def place(self, side: str, pose: np.ndarray, shape: np.ndarray, centre_target: np.ndarray) -> np.ndarray:
        """The translation putting the hand's palm centre at ``centre_target`` (3,) world metres."""
        _, joints = self.forward(side, pose[None], shape[None])
        centre, _ = self.palm_frame(joints[0])
        return centre_target - centre

    def separate(
        self, pose_right: np.ndarray, trans_right: np.ndarray, pose_left: np.ndarray, trans_left: np.ndarray,
        shape: np.ndarray, direction: np.ndarray, clearance: float = 0.004, step: float = 0.005, max_steps: int = 20,
    ) -> np.ndarray:
        """Shift the left hand along ``direction`` (3,) in ``step`` metres until no pair of vertices of the
        two hands is closer than ``clearance`` metres (a cheap stand-in for a collision test); returns the
        new left translation."""
        verts_right, _ = self.forward("right", pose_right[None], shape[None], trans_right[None])
        verts_left, _ = self.forward("left", pose_left[None], shape[None], np.zeros((1, 3)))
        right = torch.from_numpy(verts_right[0])
        left = torch.from_numpy(verts_left[0])
        for _ in range(max_steps):
            if float(torch.cdist(right, left + torch.from_numpy(trans_left)).min()) >= clearance:
                break
            trans_left = trans_left + step * direction
        return trans_left

    def sample_frame(self, rng: np.random.Generator, config: str | None = None) -> tuple[str, dict]:
        """One time step: (config name, {right, left} -> HandFit or None) in a world frame whose origin is
        near the hands."""
        if config is None:
            names = list(CONFIGS)
            probs = np.array([CONFIGS[n][0] for n in names])
            config = str(rng.choice(names, p=probs / probs.sum()))
        shape = self.sample_shape(rng)  # one person: both hands share the shape
        if config.startswith("single"):
            side = config.split("-")[1]
            fingers, gesture = self.articulation(side, rng)
            root = matrix_to_axis_angle(torch.tensor(self.root_rotation(side, rng))).numpy()
            pose = np.concatenate([root, fingers])
            trans = self.place(side, pose, shape, rng.uniform(-0.02, 0.02, size=3))
            fits = {side: HandFit(pose, shape, trans, gesture), ("left" if side == "right" else "right"): None}
            return config, fits

        # right hand: random orientation, palm centre near the origin
        fingers_right, gesture_right = self.articulation("right", rng)
        root_right = self.root_rotation("right", rng)
        pose_right = np.concatenate([matrix_to_axis_angle(torch.tensor(root_right)).numpy(), fingers_right])
        trans_right = self.place("right", pose_right, shape, rng.uniform(-0.02, 0.02, size=3))
        _, joints_right = self.forward("right", pose_right[None], shape[None], trans_right[None])
        centre_right, _ = self.palm_frame(joints_right[0])
        normal = self.palm_normal(joints_right[0], "right")

        # left hand: the right hand reflected across a plane facing its palm, then perturbed
        gap = rng.uniform(*CONFIGS[config][1])
        H = np.eye(3) - 2.0 * np.outer(normal, normal)
        M = np.diag([-1.0, 1.0, 1.0])
        wobble = {"clasp": 0.35, "facing": 0.4, "near": 0.9}[config]
        root_left = _small_rotation(rng, wobble) @ H @ root_right @ M
        if config == "clasp":
            fingers_left = mirror_axis_angle(torch.tensor(fingers_right)).numpy() + rng.normal(0.0, 0.05, size=45)
            gesture_left = gesture_right
        else:
            fingers_left, gesture_left = self.articulation("left", rng)
        pose_left = np.concatenate([matrix_to_axis_angle(torch.tensor(root_left)).numpy(), fingers_left])
        lateral = rng.normal(0.0, 0.015 if config != "near" else 0.04, size=3)
        lateral -= normal * (lateral @ normal)
        centre_left = centre_right + 2.0 * gap * normal + lateral
        trans_left = self.place("left", pose_left, shape, centre_left)
        # move the left hand out of the right one (clasped hands may touch: a smaller clearance)
        away = (centre_left - centre_right) / np.linalg.norm(centre_left - centre_right)
        clearance = 0.0015 if config == "clasp" else 0.004
        trans_left = self.separate(pose_right, trans_right, pose_left, trans_left, shape, away, clearance=clearance)
        fits = {
            "right": HandFit(pose_right, shape, trans_right, gesture_right),
            "left": HandFit(pose_left, shape, trans_left, gesture_left),
        }
        return config, fits
