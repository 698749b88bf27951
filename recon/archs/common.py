"""What several regressors share."""
from __future__ import annotations

import torch

from hands.mano import HandModel

__all__ = ["HandModelMixin"]


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
