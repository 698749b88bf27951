"""A seeded bank of in-the-wild prompts for generating two-hand images.

Every prompt names a hand action (a VBG verb) and the word "hands", so hand-token tagging
(:func:`generator.tagging.hand_token_indices`) always finds tokens for TAS. The scenes and lights are the
kinds of in-the-wild context the paper generates (cluttered indoor scenes, outdoor scenes, coloured light);
the prompt's hand pose words are generic on purpose: the pose itself comes from the mesh conditions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PromptBank", "ACTIONS", "SCENES", "LIGHTS", "PEOPLE", "BANKS", "prompt_bank"]

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
        people, actions, scenes, lights: the word lists (defaults: the module's constants).
        suffix: appended to every prompt (after a comma).
        template: how the four words are joined.
    """

    people: tuple[str, ...] = PEOPLE
    actions: tuple[str, ...] = ACTIONS
    scenes: tuple[str, ...] = SCENES
    lights: tuple[str, ...] = LIGHTS
    suffix: str = "realistic photo"
    template: str = "{person} {action} {scene}, {light}"

    @classmethod
    def synthlab(cls) -> "PromptBank":
        """The in-the-wild vocabulary of synthlab's captions (its train-wild/test-wild scenes, lights and two-hand
        actions, in its caption form "a person {action} in {scene} under {light}"): the prompts a generator
        trained on synthlab train-wild, such as the embedded tiny one, has learnt words for."""
        from hands.datasets.synthlab import ACTIONS as LAB_ACTIONS, LIGHTS as LAB_LIGHTS, SCENES as LAB_SCENES

        return cls(people=("a person",), actions=tuple(a for group in LAB_ACTIONS.values() for a in group),
                   scenes=tuple(f"in {phrase}" for _, phrase in LAB_SCENES.values()),
                   lights=tuple(f"under {phrase}" for _, phrase in LAB_LIGHTS.values()), suffix="",
                   template="{person} {action} {scene} {light}")

    def __len__(self) -> int:
        return len(self.people) * len(self.actions) * len(self.scenes) * len(self.lights)

    def prompt(self, index: int) -> str:
        """The prompt with this index in [0, len(self)) (mixed radix over the four lists)."""
        if not 0 <= index < len(self):
            raise IndexError(f"prompt index {index} outside [0, {len(self)})")
        index, p = divmod(index, len(self.people))
        index, a = divmod(index, len(self.actions))
        light, s = divmod(index, len(self.scenes))
        text = self.template.format(person=self.people[p], action=self.actions[a], scene=self.scenes[s],
                                    light=self.lights[light])
        return f"{text}, {self.suffix}" if self.suffix else text

    def sample(self, n: int, generator: torch.Generator) -> list[str]:
        """``n`` prompts drawn uniformly with the given seeded generator (CPU)."""
        idx = torch.randint(len(self), (n,), generator=generator)
        return [self.prompt(int(i)) for i in idx]


BANKS = {"wild": PromptBank, "synthlab": PromptBank.synthlab}


def prompt_bank(name: str) -> PromptBank:
    """The prompt bank a generator config names (its ``prompts`` key): "wild" (the paper's kind of in-the-wild
    scenes) or "synthlab" (synthlab's caption vocabulary)."""
    if name not in BANKS:
        raise ValueError(f"unknown prompt bank {name!r}; known: {', '.join(BANKS)}")
    return BANKS[name]()
