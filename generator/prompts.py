"""A seeded bank of in-the-wild prompts for generating two-hand images.

Every prompt names a hand action (a VBG verb) and the word "hands", so hand-token tagging
(:func:`generator.tagging.hand_token_indices`) always finds tokens for TAS. The scenes and lights are the
kinds of in-the-wild context the paper generates (cluttered indoor scenes, outdoor scenes, coloured light);
the prompt's hand pose words are generic on purpose: the pose itself comes from the mesh conditions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PromptBank", "ACTIONS", "SCENES", "LIGHTS", "PEOPLE"]

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
        suffix: appended to every prompt.
    """

    people: tuple[str, ...] = PEOPLE
    actions: tuple[str, ...] = ACTIONS
    scenes: tuple[str, ...] = SCENES
    lights: tuple[str, ...] = LIGHTS
    suffix: str = "realistic photo"

    def __len__(self) -> int:
        return len(self.people) * len(self.actions) * len(self.scenes) * len(self.lights)

    def prompt(self, index: int) -> str:
        """The prompt with this index in [0, len(self)) (mixed radix over the four lists)."""
        if not 0 <= index < len(self):
            raise IndexError(f"prompt index {index} outside [0, {len(self)})")
        index, p = divmod(index, len(self.people))
        index, a = divmod(index, len(self.actions))
        light, s = divmod(index, len(self.scenes))
        text = f"{self.people[p]} {self.actions[a]} {self.scenes[s]}, {self.lights[light]}"
        return f"{text}, {self.suffix}" if self.suffix else text

    def sample(self, n: int, generator: torch.Generator) -> list[str]:
        """``n`` prompts drawn uniformly with the given seeded generator (CPU)."""
        idx = torch.randint(len(self), (n,), generator=generator)
        return [self.prompt(int(i)) for i in idx]
