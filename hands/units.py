"""The one place where units change: metres inside the project, millimetres in reported metrics and in
some datasets' files."""
from __future__ import annotations

import torch

MM_PER_M = 1000.0


def to_mm(x_m):
    """Metres -> millimetres (tensor, array or float)."""
    return x_m * MM_PER_M


def mm_to_m(x_mm):
    """Millimetres -> metres (tensor, array or float)."""
    return x_mm / MM_PER_M


def looks_like_mm(x: torch.Tensor, max_metres: float = 20.0) -> bool:
    """True when a tensor of positions meant to be in metres holds values a metre-scale hand scene never
    reaches (|x| > ``max_metres``), which happens when millimetres are passed by mistake."""
    finite = x[torch.isfinite(x)]
    return bool(finite.numel() and finite.abs().max() > max_metres)
