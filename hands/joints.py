"""Joint orders and index maps between the datasets' and models' conventions.

Our order (InterWild's), 21 joints per hand: wrist, then thumb, index, middle, ring, pinky, each from the
knuckle nearest the palm to the tip (tips are mesh vertices)::

    0 wrist | 1-4 thumb | 5-8 index | 9-12 middle | 13-16 ring | 17-20 pinky

MANO's 16 regressed joints are ordered wrist, index 1-3, middle 1-3, pinky 1-3, ring 1-3, thumb 1-3;
appending the five tip vertices (thumb, index, middle, ring, pinky) as rows 16-20 and indexing with
:data:`MANO21_TO_OURS` gives our order.
"""
from __future__ import annotations

JOINT_NAMES = (
    "wrist",
    "thumb1", "thumb2", "thumb3", "thumb4",
    "index1", "index2", "index3", "index4",
    "middle1", "middle2", "middle3", "middle4",
    "ring1", "ring2", "ring3", "ring4",
    "pinky1", "pinky2", "pinky3", "pinky4",
)
NUM_JOINTS = 21
WRIST = 0
MIDDLE_KNUCKLE = 9  # IntagHand's root joint
FINGER_TIPS = (4, 8, 12, 16, 20)

MANO_JOINT_NAMES = (
    "wrist",
    "index1", "index2", "index3",
    "middle1", "middle2", "middle3",
    "pinky1", "pinky2", "pinky3",
    "ring1", "ring2", "ring3",
    "thumb1", "thumb2", "thumb3",
)
# MANO kinematic tree: parent of each of the 16 joints (-1 for the root).
MANO_PARENTS = (-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 0, 10, 11, 0, 13, 14)

# Fingertip vertices of the official MANO mesh (InterWild's choice): thumb, index, middle, ring, pinky.
MANO_TIP_VERTS = (745, 317, 445, 556, 673)

# rows of [16 MANO joints; 5 tips (thumb, index, middle, ring, pinky)] -> our 21
MANO21_TO_OURS = (0, 13, 14, 15, 16, 1, 2, 3, 17, 4, 5, 6, 18, 10, 11, 12, 19, 7, 8, 9, 20)

# InterHand2.6M, per hand (21 of its 42): thumb tip..base, index tip..base, middle, ring, pinky, wrist last.
IH26M_TO_OURS = (20, 3, 2, 1, 0, 7, 6, 5, 4, 11, 10, 9, 8, 15, 14, 13, 12, 19, 18, 17, 16)
IH26M_RIGHT = tuple(range(0, 21))
IH26M_LEFT = tuple(range(21, 42))

# Skeleton edges in our order (parent, child), for drawing.
SKELETON = tuple(
    (0 if k % 4 == 1 else k - 1, k) for k in range(1, 21)
)
