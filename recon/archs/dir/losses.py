"""DIR's loss functions (reference: ``models/loss.py``, ``models/lovasz_loss.py``, ``models/dir.py``), each a
plain function of tensors with an optional per-sample validity mask.

The reference trains on IntagHand's two-hand frames only (both MANO fits present), so it masks nothing; here
``valid`` (B,) bool selects the samples a term can be computed on, and a term averages the reference's
per-sample value over the valid samples (0, with a gradient path, when none is valid).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "HUBER_DELTA",
    "SEG_CLASS_WEIGHTS",
    "smooth_l1",
    "edge_length_loss",
    "normal_vector_loss",
    "lovasz_softmax",
    "segmentation_loss",
]

HUBER_DELTA = 0.01  # DIR's SmoothL1Loss: 0.5 z^2 below 0.01, 0.01 (|z| - 0.005) above
SEG_CLASS_WEIGHTS = (0.1, 0.45, 0.45)  # background, left, right


def _masked_sample_mean(per_sample: Tensor, valid: Optional[Tensor]) -> Tensor:
    """per_sample: (B,); valid: (B,) bool or None -> scalar mean over the valid samples."""
    if valid is None:
        return per_sample.mean()
    weight = valid.to(per_sample.dtype)
    return (per_sample * weight).sum() / weight.sum().clamp(min=1.0)


def smooth_l1(pred: Tensor, target: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """DIR's ``SmoothL1Loss``: a Huber loss with delta 0.01 (``0.5 z^2`` for |z| < 0.01, else
    ``0.01 (|z| - 0.005)``), averaged over each sample's elements, then over the (valid) samples.

    pred, target: (B, ...) same shape; valid: (B,) bool or None. Returns a scalar.
    """
    if pred.shape != target.shape:
        raise ValueError(f"smooth_l1: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    error = F.huber_loss(pred, target.to(pred.dtype), reduction="none", delta=HUBER_DELTA)
    return _masked_sample_mean(error.flatten(1).mean(1), valid)


def _edges(verts: Tensor, faces: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """verts (B, V, 3), faces (F, 3) -> the three edge vectors v1 - v0, v2 - v0, v2 - v1, each (B, F, 3)."""
    v0, v1, v2 = verts[:, faces[:, 0]], verts[:, faces[:, 1]], verts[:, faces[:, 2]]
    return v1 - v0, v2 - v0, v2 - v1


def edge_length_loss(pred: Tensor, target: Tensor, faces: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """DIR's ``EdgeLengthLoss``: mean |edge length (pred) - edge length (target)| over the faces' three edges
    (v0v1, v0v2, v1v2; lengths with +1e-12 inside the square root), then over the valid samples.

    pred, target: (B, V, 3); faces: (F, 3) long; valid: (B,) bool or None.
    """
    def lengths(verts: Tensor) -> Tensor:
        e01, e02, e12 = _edges(verts, faces)
        return torch.stack([((e**2).sum(-1) + 1e-12).sqrt() for e in (e01, e02, e12)], -1)  # (B, F, 3)

    return _masked_sample_mean((lengths(pred) - lengths(target.to(pred.dtype))).abs().flatten(1).mean(1), valid)


def normal_vector_loss(pred: Tensor, target: Tensor, faces: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """DIR's ``NormalVectorLoss``: mean |cos| between each predicted (unit) edge of a face and the target
    face's unit normal ``normalize((v1 - v0) x (v2 - v0))``, then over the valid samples.

    pred, target: (B, V, 3); faces: (F, 3) long; valid: (B,) bool or None.
    """
    e01, e02, e12 = (F.normalize(e, dim=-1) for e in _edges(pred, faces))
    t01, t02, _ = (F.normalize(e, dim=-1) for e in _edges(target.to(pred.dtype), faces))
    normal = F.normalize(torch.cross(t01, t02, dim=-1), dim=-1)  # (B, F, 3)
    cosines = torch.stack([(e * normal).sum(-1).abs() for e in (e01, e02, e12)], -1)  # (B, F, 3)
    return _masked_sample_mean(cosines.flatten(1).mean(1), valid)


def _lovasz_grad(gt_sorted: Tensor) -> Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss w.r.t. sorted errors (Berman et al., Alg. 1).
    gt_sorted: (P,) float 0/1 in the order of decreasing error."""
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1.0 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    if gt_sorted.numel() > 1:
        jaccard = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
    return jaccard


def lovasz_softmax(scores: Tensor, labels: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Multi-class Lovasz-Softmax loss over all pixels of the batch (``per_image=False``), averaged over the
    classes present in ``labels`` (``classes='present'``).

    scores: (B, C, h, w) per-class scores. The reference passes the segmentation head's raw *logits* here (not
    softmax probabilities, as the loss's definition asks); DIR is reproduced as it trains. labels: (B, h, w)
    long in [0, C); valid: (B,) bool or None (pixels of invalid samples are left out). Returns a scalar
    (0 with a gradient path when no pixel counts).

    Without host synchronisation: a left-out pixel gets error 0 and no foreground, which sorts it after every
    counted error and leaves the others' Lovasz gradients unchanged (its own term is 0 x its weight); an absent
    class is computed and weighted 0.
    """
    classes = scores.shape[1]
    flat_scores = scores.permute(0, 2, 3, 1).reshape(-1, classes)  # (P, C)
    flat_labels = labels.reshape(-1)
    keep = torch.ones_like(flat_labels, dtype=flat_scores.dtype)
    if valid is not None:
        keep = valid[:, None, None].expand_as(labels).reshape(-1).to(flat_scores.dtype)
    losses, present = [], []
    for c in range(classes):
        foreground = (flat_labels == c).to(flat_scores.dtype) * keep
        errors = (foreground - flat_scores[:, c]).abs() * keep
        errors_sorted, order = torch.sort(errors, descending=True)
        losses.append(torch.dot(errors_sorted, _lovasz_grad(foreground[order])))
        present.append((foreground.sum() > 0).to(flat_scores.dtype))
    losses, present = torch.stack(losses), torch.stack(present)
    return (losses * present).sum() / present.sum().clamp(min=1.0)


def segmentation_loss(logits: Tensor, labels: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """DIR's weighted cross-entropy over (background, left, right) with class weights (0.1, 0.45, 0.45)
    (``nn.CrossEntropyLoss(weight=...)``: the weighted mean over pixels), over the valid samples' pixels.

    logits: (B, 3, h, w); labels: (B, h, w) long; valid: (B,) bool or None.
    """
    weight = torch.stack([torch.full_like(logits[0, 0, 0, 0], w) for w in SEG_CLASS_WEIGHTS])  # (3,) on device
    pixel_weight = weight[labels]  # (B, h, w)
    if valid is not None:
        pixel_weight = pixel_weight * valid[:, None, None].to(pixel_weight.dtype)
    loss = F.cross_entropy(logits, labels, reduction="none")  # (B, h, w)
    return (loss * pixel_weight).sum() / pixel_weight.sum().clamp(min=1e-12)
