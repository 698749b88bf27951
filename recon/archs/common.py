"""What several regressors share."""
from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import Tensor, nn

from hands.mano import HandModel

__all__ = ["HandModelMixin", "read_weights", "load_backbone_state"]


class HandModelMixin:
    """Keeps the regressor's :class:`hands.mano.HandModel` outside the nn.Module tree, so that MANO's
    (licence-restricted) buffers never enter a state dict or a checkpoint: the run's ``mano_dir`` rebuilds
    it, and the checkpoint's sidecar records its fingerprint. ``_hand_model_on(device)`` moves it lazily to
    the inputs' device."""

    def _set_hand_model(self, mano_dir) -> None:
        self._hand_model = [HandModel(mano_dir=mano_dir)]  # a list hides it from nn.Module's registration

    @property
    def hand_model(self) -> HandModel:
        return self._hand_model[0]

    def _hand_model_on(self, device: torch.device) -> HandModel:
        if self.hand_model.faces.device != device:
            self._hand_model[0] = self.hand_model.to(device)
        return self.hand_model


def read_weights(path, keys: Sequence[str] = ("state_dict",)) -> Dict[str, Tensor]:
    """A state dict from a ``--backbone-weights`` file: a .safetensors file, or a torch file holding a state dict
    (plain, or under the first of ``keys`` it has). Raises ValueError naming the file when it cannot be read."""
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"--backbone-weights {path}: cannot read it ({type(error).__name__}: {error})") from None
    for key in keys:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ValueError(f"--backbone-weights {path}: not a state dict")
    return state


def load_backbone_state(module: nn.Module, state: Dict[str, Tensor], path, what: str = "backbone") -> None:
    """Load ``state`` into ``module`` (a ResNet-like backbone; a classifier's ``fc.`` / ``head.`` /
    ``classifier.`` keys are ignored). Raises ValueError naming ``path`` when it does not fit."""
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        first = " ".join(str(error).split())[:300]
        raise ValueError(f"--backbone-weights {path}: does not fit the {what}: {first}") from None
    unexpected = [key for key in unexpected if not key.startswith(("fc.", "head.", "classifier."))]
    if missing or unexpected:
        raise ValueError(
            f"--backbone-weights {path}: does not fit the {what}: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}"
        )
