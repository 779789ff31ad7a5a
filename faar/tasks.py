"""The task registry: what each dense task predicts, how it is trained and post-processed.

Everything task-specific lives here (channels, loss, output activation, palette) and
travels into the export manifest, so the gateway never imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F

IGNORE_INDEX = 255

Kind = Literal["labels", "probability", "normals", "depth"]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: Kind
    channels: int
    loss: str
    weight: float  # MTLoRA's default loss weight
    description: str
    classes: tuple[str, ...] = ()
    units: str = ""
    # Balanced BCE: weight of the positive class (MTI-Net uses 0.95 for edges);
    # None means "balance from the batch's own label frequencies".
    pos_weight: float | None = None

    def with_classes(self, classes: Sequence[str]) -> TaskSpec:
        return replace(self, classes=tuple(classes), channels=len(classes))

    # --- training -----------------------------------------------------------------
    def compute_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of raw network output ``pred`` (B,C,H,W) against the label map."""
        if self.kind == "labels":
            return F.cross_entropy(pred, target.long(), ignore_index=IGNORE_INDEX)
        if self.kind == "probability":
            return balanced_bce(pred, target, self.pos_weight)
        if self.kind == "normals":
            # L1 between unit normals on pixels that have a label (MTI-Net/MTLoRA).
            valid = (target.abs().sum(1, keepdim=True) > 0) & (target != IGNORE_INDEX).all(1, keepdim=True)
            diff = (F.normalize(pred, dim=1) - target).abs() * valid
            return diff.sum() / valid.sum().clamp(min=1) / 3
        if self.kind == "depth":
            valid = (target > 0) & (target != IGNORE_INDEX)
            return ((pred - target).abs() * valid).sum() / valid.sum().clamp(min=1)
        raise ValueError(self.kind)

    # --- inference ----------------------------------------------------------------
    def activate(self, pred: torch.Tensor) -> torch.Tensor:
        """Raw output -> the map users want (float); label tasks return probabilities."""
        if self.kind == "labels":
            return pred.softmax(1)
        if self.kind == "probability":
            return pred.sigmoid()
        if self.kind == "normals":
            return F.normalize(pred, dim=1)
        return pred.clamp(min=0)

    def postprocess(self, pred: torch.Tensor) -> torch.Tensor:
        """Raw output -> final map: class indices (int64, B,H,W) or the activated map."""
        if self.kind == "labels":
            return pred.argmax(1)
        return self.activate(pred)


def balanced_bce(logits: torch.Tensor, target: torch.Tensor, pos_weight: float | None) -> torch.Tensor:
    """Class-balanced binary cross-entropy (MTI-Net's BalancedCrossEntropyLoss)."""
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


PASCAL_CONTEXT_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
HUMAN_PARTS_CLASSES = ("background", "head", "torso", "upper_arm", "lower_arm", "upper_leg", "lower_leg")

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("semseg", "labels", 21, "cross_entropy", 1.0, "semantic segmentation",
                 classes=PASCAL_CONTEXT_CLASSES),
        TaskSpec("human_parts", "labels", 7, "cross_entropy", 2.0, "human (object) part segmentation",
                 classes=HUMAN_PARTS_CLASSES),
        TaskSpec("saliency", "probability", 1, "balanced_bce", 5.0, "salient-object probability"),
        TaskSpec("normals", "normals", 3, "l1", 10.0,
                 "unit surface normals, camera frame: x right, y up, z towards the camera"),
        TaskSpec("depth", "depth", 1, "l1", 1.0, "depth along the optical axis", units="m"),
        TaskSpec("edge", "probability", 1, "balanced_bce", 50.0, "object-boundary probability",
                 pos_weight=0.95),
    )
}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task '{name}' (known: {', '.join(TASKS)})") from None


def resolve_tasks(names: Sequence[str], classes: dict[str, Sequence[str]] | None = None,
                  num_classes: dict[str, int] | None = None) -> dict[str, TaskSpec]:
    """Task specs for a model: dataset class names win, then explicit counts, then defaults."""
    if not names:
        raise ValueError("a model needs at least one task")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate task in {list(names)}")
    out = {}
    for name in names:
        spec = get_task(name)
        if classes and name in classes:
            spec = spec.with_classes(classes[name])
        elif num_classes and name in num_classes:
            n = num_classes[name]
            if spec.kind != "labels":
                raise ValueError(f"num_classes given for '{name}', which has no classes")
            names_ = spec.classes[:n] if n <= len(spec.classes) else tuple(f"class_{i}" for i in range(n))
            spec = replace(spec, channels=n, classes=tuple(names_))
        out[name] = spec
    extra = set(num_classes or {}) - set(names)
    if extra:
        raise ValueError(f"num_classes names task(s) not in the model: {sorted(extra)}")
    return out


def palette(n: int) -> list[list[int]]:
    """PASCAL VOC's bit-interleaved colour palette, for label maps."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append([r, g, b])
    return out
