"""A seeded bank of in-the-wild prompts for generating two-hand images.

Every prompt names a hand action (a VBG verb) and the word "hand" or "hands", so hand-token tagging
(:func:`generator.tagging.hand_token_indices`) always finds tokens for TAS. The scenes and lights are the
kinds of in-the-wild context the paper generates (cluttered indoor scenes, outdoor scenes, coloured light);
the prompt's hand pose words are generic on purpose: the pose itself comes from the mesh conditions.

A prompt names as many hands as its mesh image shows: :meth:`PromptBank.sample` with ``hands`` draws a
two-hand action for a label with both hands and a one-hand action naming the side ("the left hand") for a
label with one, so that the text never asks for a hand the mesh image does not hold (the paper's generator
is trained on "single or both hands of only one person", supplementary D.1).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["PromptBank", "ACTIONS", "ONE_HAND_ACTIONS", "SCENES", "LIGHTS", "PEOPLE", "BANKS", "HAND_SETS",
           "prompt_bank", "shown_hands"]

PEOPLE = (
    "a person",
    "a man",
    "a woman",
    "a young person",
    "an old man",
    "an old woman",
    "a child",
)
ACTIONS = (
    "holding hands together",
    "clapping hands",
    "interlocking the fingers of both hands",
    "touching fingertips with both hands",
    "rubbing hands",
    "pointing with one hand and waving the other hand",
    "making a heart gesture with both hands",
    "counting on the fingers of both hands",
    "grasping one hand with the other hand",
    "folding hands",
    "showing both hands to the camera",
    "crossing the fingers of both hands",
)
ONE_HAND_ACTIONS = (
    "waving the {side} hand",
    "raising the {side} hand",
    "pointing with the {side} hand",
    "making a fist with the {side} hand",
    "holding a cup in the {side} hand",
    "showing the {side} hand to the camera",
    "counting on the fingers of the {side} hand",
    "making a thumbs-up with the {side} hand",
)
HAND_SETS = ("both", "right", "left")
SCENES = (
    "in a cluttered kitchen",
    "in a busy street",
    "in a living room with bookshelves",
    "in a forest",
    "on a beach",
    "in an office with a messy desk",
    "in a garage full of tools",
    "at a crowded market",
    "in a colourful playground",
    "in front of a brick wall",
    "in a park with trees",
    "in a workshop",
)
LIGHTS = (
    "under warm light",
    "under cold blue light",
    "at sunset",
    "in bright daylight",
    "under dim indoor light",
    "under neon light",
    "with strong shadows",
)


@dataclass(frozen=True)
class PromptBank:
    """Draws prompts ``"{person} {action} {scene}, {light}, realistic photo"`` from fixed word lists.

    Args:
        people, actions, scenes, lights: the word lists (defaults: the module's constants); ``actions`` are
            two-hand actions.
        one_hand_actions: one-hand actions with a ``{side}`` field ("left" / "right"), for labels with one hand.
        suffix: appended to every prompt (after a comma).
        template: how the four words are joined.
    """

    people: tuple[str, ...] = PEOPLE
    actions: tuple[str, ...] = ACTIONS
    one_hand_actions: tuple[str, ...] = ONE_HAND_ACTIONS
    scenes: tuple[str, ...] = SCENES
    lights: tuple[str, ...] = LIGHTS
    suffix: str = "realistic photo"
    template: str = "{person} {action} {scene}, {light}"

    @classmethod
    def synthlab(cls) -> "PromptBank":
        """The in-the-wild vocabulary of synthlab's captions (its train-wild/test-wild scenes, lights and two-hand
        actions, in its caption form "a person {action} in {scene} under {light}"): the prompts a generator
        trained on synthlab train-wild, such as the embedded tiny one, has learnt words for."""
        from hands.datasets.synthlab import ACTIONS as LAB_ACTIONS, GESTURE_PHRASES, LIGHTS as LAB_LIGHTS
        from hands.datasets.synthlab import SCENES as LAB_SCENES

        return cls(people=("a person",), actions=tuple(a for group in LAB_ACTIONS.values() for a in group),
                   one_hand_actions=tuple(GESTURE_PHRASES.values()),
                   scenes=tuple(f"in {phrase}" for _, phrase in LAB_SCENES.values()),
                   lights=tuple(f"under {phrase}" for _, phrase in LAB_LIGHTS.values()), suffix="",
                   template="{person} {action} {scene} {light}")

    def __len__(self) -> int:
        """The number of two-hand prompts."""
        return self._count(self.actions)

    def _count(self, actions: tuple[str, ...]) -> int:
        return len(self.people) * len(actions) * len(self.scenes) * len(self.lights)

    def prompt(self, index: int, hands: str = "both") -> str:
        """The prompt with this index (mixed radix over the four lists): a two-hand one for ``hands="both"``
        (index in [0, len(self))), else a one-hand one naming that side (index below the one-hand count)."""
        if hands not in HAND_SETS:
            raise ValueError(f"hands {hands!r}: expected one of {', '.join(HAND_SETS)}")
        actions = self.actions if hands == "both" else self.one_hand_actions
        count = self._count(actions)
        if not 0 <= index < count:
            raise IndexError(f"prompt index {index} outside [0, {count})")
        index, p = divmod(index, len(self.people))
        index, a = divmod(index, len(actions))
        light, s = divmod(index, len(self.scenes))
        action = actions[a] if hands == "both" else actions[a].format(side=hands)
        text = self.template.format(person=self.people[p], action=action, scene=self.scenes[s],
                                    light=self.lights[light])
        return f"{text}, {self.suffix}" if self.suffix else text

    def sample(self, n: int, generator: torch.Generator, hands: Sequence[str] | None = None) -> list[str]:
        """``n`` prompts drawn uniformly with the given seeded generator (CPU).

        hands: per prompt, the hands its image shows ("both", "right" or "left"): a one-hand entry draws from
        the one-hand actions naming that side. None: two-hand prompts only (the same draws as before ``hands``
        existed)."""
        idx = torch.randint(len(self), (n,), generator=generator)
        if hands is None:
            return [self.prompt(int(i)) for i in idx]
        if len(hands) != n:
            raise ValueError(f"hands: {len(hands)} entries for {n} prompts")
        if not self.one_hand_actions and any(h != "both" for h in hands):
            raise ValueError("this prompt bank has no one-hand actions for labels with one hand")
        one = torch.randint(max(self._count(self.one_hand_actions), 1), (n,), generator=generator)
        return [self.prompt(int(i)) if h == "both" else self.prompt(int(j), h) for i, j, h in zip(idx, one, hands)]


BANKS = {"wild": PromptBank, "synthlab": PromptBank.synthlab}


def prompt_bank(name: str) -> PromptBank:
    """The prompt bank a generator config names (its ``prompts`` key): "wild" (the paper's kind of in-the-wild
    scenes) or "synthlab" (synthlab's caption vocabulary)."""
    if name not in BANKS:
        raise ValueError(f"unknown prompt bank {name!r}; known: {', '.join(BANKS)}")
    return BANKS[name]()


def shown_hands(labels) -> list[str]:
    """Per sample of a :class:`hands.sample.HandBatch`, the hands its mesh image shows (valid and with a MANO
    mesh: the ones rendered): "both", "right" or "left", the ``hands`` of :meth:`PromptBank.sample`. A sample
    with no hand gets "both" (a two-hand prompt, as every sample got before prompts followed the labels). Reads
    the flags on the host: call it on labels before they move to a device."""
    right = (labels.right.valid & labels.right.mano_valid).tolist()
    left = (labels.left.valid & labels.left.mano_valid).tolist()
    return ["right" if r and not l else "left" if l and not r else "both" for r, l in zip(right, left)]
