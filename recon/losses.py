"""Loss helpers shared by regressors. Each is a plain function of tensors (STYLE §6: losses are callables,
never chosen by a mode string)."""
from __future__ import annotations

from torch import Tensor

__all__ = ["masked_l1"]


def masked_l1(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean absolute error over the elements where ``mask`` holds.

    pred, target: (B, ...) same shape; mask: bool, broadcastable to pred (e.g. (B, 1, 1) per sample or
    (B, J, 1) per joint). Returns a scalar; 0 (with a gradient path) when nothing is valid, so that a batch
    without a label does not produce NaN.
    """
    weight = mask.to(pred.dtype).expand_as(pred)
    error = (pred - target.to(pred.dtype)).abs() * weight
    return error.sum() / weight.sum().clamp(min=1.0)
