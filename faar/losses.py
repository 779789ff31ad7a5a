"""The training losses of the dense tasks (MTI-Net / MTLoRA conventions) and the ignore label.

Label conventions (``faar/data/transforms.py``): class maps and binary maps use 255 for
"no label"; normals are all-zero where unlabelled; depth is 0 where unlabelled.

Every loss is the mean over the batch's labelled pixels, and 0 (with a zero gradient)
when the batch has none: a sample without a task's label (all pixels unlabelled) adds
nothing to that task's loss, so a partially labelled batch trains each task exactly as
its labelled samples alone would (tests/test_train.py checks the gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = 255


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel-wise cross-entropy over labelled pixels (semantic segmentation, parts)."""
    target = target.long()
    total = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (target != IGNORE_INDEX).sum().clamp(min=1)


def balanced_bce(logits: torch.Tensor, target: torch.Tensor, pos_weight: float | None) -> torch.Tensor:
    """Class-balanced binary cross-entropy (MTI-Net's BalancedCrossEntropyLoss).

    ``pos_weight`` weighs positives (MTI-Net uses 0.95 for edges); None balances by the
    batch's own share of positives.
    """
    valid = target != IGNORE_INDEX
    t = target.float() * valid
    if pos_weight is None:
        num_pos = (t * valid).sum()
        num_total = valid.sum().clamp(min=1)
        w = 1 - num_pos / num_total
    else:
        w = torch.tensor(pos_weight, device=logits.device)
    per_pixel = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    weights = torch.where(t > 0.5, w, 1 - w) * valid
    return (per_pixel * weights).sum() / valid.sum().clamp(min=1)


def normals_valid(target: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) mask of pixels with a normal label (not all-zero, not 255)."""
    return (target.abs().sum(1, keepdim=True) > 0) & (target != IGNORE_INDEX).all(1, keepdim=True)


def normals_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between the unit-normalised prediction and unit normals, on labelled pixels."""
    valid = normals_valid(target)
    diff = (F.normalize(pred, dim=1) - target).abs() * valid
    return diff.sum() / valid.sum().clamp(min=1) / 3


def depth_valid(target: torch.Tensor) -> torch.Tensor:
    return (target > 0) & (target != IGNORE_INDEX)


def depth_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 in metres on pixels with a depth label."""
    valid = depth_valid(target)
    return ((pred - target).abs() * valid).sum() / valid.sum().clamp(min=1)
