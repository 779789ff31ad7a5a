"""The task registry: what each dense task predicts, and how each kind of map behaves.

A task (``TaskSpec``: semseg, human_parts, saliency, normals, depth, edge) names its kind;
a kind (``TaskKind``: labels, probability, normals, depth) is defined once, here, with
everything that differs between kinds in ``faar``: loss, output activation and
post-processing, evaluation meter, the input-blind baseline, how augmentation resamples
its labels, the exported graph outputs and the manifest fields. Adding a kind is one
class in this module (and its answer encoding in ``faar_serve/codec.py``); no other
module branches on a kind's name. Task knowledge travels into the export manifest, so
the gateway never imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from .losses import IGNORE_INDEX, balanced_bce, cross_entropy, depth_l1, depth_valid, normals_l1, normals_valid
from .metrics import ConfusionMeter, DepthMeter, EdgeMeter, Meter, NormalsMeter, SaliencyMeter

KindName = Literal["labels", "probability", "normals", "depth"]
# How augmentation resamples a kind's labels (faar/data/transforms.py): class ids and binary maps
# nearest (255 = ignore), normals and depth bilinearly over labelled pixels only.
Resample = Literal["classes", "binary", "normals", "depth"]
# Label maps are uint8 and 255 is the datasets' "ignore" label, so 255 classes at most.
MAX_CLASSES = 255
PROB_EPS = 1e-7  # probabilities handed to a meter as logits are clipped to [PROB_EPS, 1 - PROB_EPS]


@dataclass(frozen=True)
class OutputLayout:
    """One graph output of a task, without the batch axis: ``(H, W)`` or ``(channels, H, W)``."""

    suffix: str  # output name = task name + suffix
    dtype: Literal["uint8", "float32"]
    channels: int | None  # None: one (H, W) plane
    role: Literal["labels", "probs", "map"]
    meaning: str


class TaskKind:
    """How one kind of dense map is trained, evaluated, post-processed and exported."""

    name: ClassVar[KindName]
    resample: ClassVar[Resample]

    def loss(self, spec: TaskSpec, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def activate(self, pred: torch.Tensor) -> torch.Tensor:
        """Raw output -> the continuous map (label kinds: class probabilities)."""
        raise NotImplementedError

    def postprocess(self, pred: torch.Tensor) -> torch.Tensor:
        """Raw output -> the final map users get (label kinds: class indices)."""
        return self.activate(pred)

    def meter(self, spec: TaskSpec, edge_tolerance: float) -> Meter:
        raise NotImplementedError

    def outputs(self, spec: TaskSpec, probabilities: bool) -> list[OutputLayout]:
        """Graph outputs of the exported model (``probabilities``: also class probabilities)."""
        unit = f" in {spec.units}" if spec.units else " in [0, 1]"
        return [OutputLayout("", "float32", None, "map", spec.description + unit)]

    def export_maps(self, spec: TaskSpec, pred: torch.Tensor, probabilities: bool) -> list[torch.Tensor]:
        """The tensors of ``outputs`` (same order) from the raw output, as the graph computes them."""
        return [self.postprocess(pred)[:, 0]]

    def raw_from_map(self, spec: TaskSpec, final: torch.Tensor) -> torch.Tensor:
        """The exported map (``outputs()[0]``, batch axis first) -> a raw output whose
        ``postprocess`` gives the map back, so the meters can score exported models."""
        return final.float()[:, None]

    def manifest_fields(self, spec: TaskSpec) -> dict[str, Any]:
        """Kind-specific manifest fields that tell a client how to read the map."""
        raise NotImplementedError

    def unlabelled(self, spec: TaskSpec, size: tuple[int, int]) -> torch.Tensor:
        """The training target of a sample that lacks this task's label: every pixel unlabelled,
        shaped as ``transform_sample`` shapes a real one ((1, H, W) here)."""
        return torch.full((1, *size), float(IGNORE_INDEX))

    def baseline_sums(self, spec: TaskSpec, target: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Sufficient statistics of one target batch for the input-blind baseline."""
        valid = target != IGNORE_INDEX
        values = target[valid].double()
        return values.sum().reshape(1), values.numel()

    def baseline_output(self, spec: TaskSpec, total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """The constant raw output (per channel) of the input-blind baseline."""
        return total / count.clamp(min=1)


class LabelsKind(TaskKind):
    """Class maps (semantic segmentation, parts): cross-entropy, argmax, mIoU."""

    name = "labels"
    resample = "classes"

    def loss(self, spec: TaskSpec, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(pred, target)

    def activate(self, pred: torch.Tensor) -> torch.Tensor:
        return pred.softmax(1)

    def postprocess(self, pred: torch.Tensor) -> torch.Tensor:
        return pred.argmax(1)

    def meter(self, spec: TaskSpec, edge_tolerance: float) -> Meter:
        return ConfusionMeter(spec)

    def outputs(self, spec: TaskSpec, probabilities: bool) -> list[OutputLayout]:
        if spec.channels > MAX_CLASSES:
            raise ValueError(f"task {spec.name!r} has {spec.channels} classes; uint8 label maps hold at most "
                             f"{MAX_CLASSES} (255 is the ignore label)")
        out = [OutputLayout("", "uint8", None, "labels", "class index per pixel (argmax)")]
        if probabilities:
            out.append(OutputLayout("_probs", "float32", spec.channels, "probs",
                                    "class probabilities, softmax over axis 1"))
        return out

    def export_maps(self, spec: TaskSpec, pred: torch.Tensor, probabilities: bool) -> list[torch.Tensor]:
        maps = [self.postprocess(pred).to(torch.uint8)]
        return maps + [self.activate(pred)] if probabilities else maps

    def raw_from_map(self, spec: TaskSpec, final: torch.Tensor) -> torch.Tensor:
        """One-hot scores: their argmax is the class index."""
        index = final.long()
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= spec.channels):
            raise ValueError(f"{spec.name}: class index outside [0, {spec.channels})")
        return F.one_hot(index, spec.channels).movedim(-1, 1).float()

    def manifest_fields(self, spec: TaskSpec) -> dict[str, Any]:
        return {"classes": list(spec.classes), "palette": palette(spec.channels)}

    def unlabelled(self, spec: TaskSpec, size: tuple[int, int]) -> torch.Tensor:
        return torch.full(size, IGNORE_INDEX, dtype=torch.long)

    def baseline_sums(self, spec: TaskSpec, target: torch.Tensor) -> tuple[torch.Tensor, int]:
        labels = target.long()[target != IGNORE_INDEX]
        return torch.bincount(labels, minlength=spec.channels).double(), labels.numel()

    def baseline_output(self, spec: TaskSpec, total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Log class prior (Laplace-smoothed): its argmax is the most frequent class."""
        return ((total + 1) / (count + spec.channels)).log()


class ProbabilityKind(TaskKind):
    """Per-pixel probabilities (saliency, edges): balanced BCE, sigmoid."""

    name = "probability"
    resample = "binary"

    def loss(self, spec: TaskSpec, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return balanced_bce(pred, target, spec.pos_weight)

    def activate(self, pred: torch.Tensor) -> torch.Tensor:
        return pred.sigmoid()

    def meter(self, spec: TaskSpec, edge_tolerance: float) -> Meter:
        return EdgeMeter(spec, edge_tolerance) if spec.boundary else SaliencyMeter(spec)

    def manifest_fields(self, spec: TaskSpec) -> dict[str, Any]:
        return {"range": [0.0, 1.0]}

    def raw_from_map(self, spec: TaskSpec, final: torch.Tensor) -> torch.Tensor:
        """``logit(p)``, p clipped to [1e-7, 1 - 1e-7] (sigmoid gives p back to float32 precision)."""
        return torch.logit(final.float().clamp(PROB_EPS, 1 - PROB_EPS))[:, None]

    def baseline_output(self, spec: TaskSpec, total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """The logit of the mean positive rate."""
        return torch.logit((total / count.clamp(min=1)).clamp(1e-6, 1 - 1e-6))


class NormalsKind(TaskKind):
    """Unit surface normals: L1 on unit vectors, angular error."""

    name = "normals"
    resample = "normals"

    def loss(self, spec: TaskSpec, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return normals_l1(pred, target)

    def activate(self, pred: torch.Tensor) -> torch.Tensor:
        return F.normalize(pred, dim=1)

    def meter(self, spec: TaskSpec, edge_tolerance: float) -> Meter:
        return NormalsMeter(spec)

    def outputs(self, spec: TaskSpec, probabilities: bool) -> list[OutputLayout]:
        return [OutputLayout("", "float32", spec.channels, "map", f"{spec.description}; (x, y, z) along axis 1")]

    def export_maps(self, spec: TaskSpec, pred: torch.Tensor, probabilities: bool) -> list[torch.Tensor]:
        return [self.postprocess(pred)]

    def raw_from_map(self, spec: TaskSpec, final: torch.Tensor) -> torch.Tensor:
        """Unit normals as they are: normalising is idempotent."""
        return final.float()

    def manifest_fields(self, spec: TaskSpec) -> dict[str, Any]:
        return {"convention": spec.description}

    def unlabelled(self, spec: TaskSpec, size: tuple[int, int]) -> torch.Tensor:
        return torch.zeros(3, *size)

    def baseline_sums(self, spec: TaskSpec, target: torch.Tensor) -> tuple[torch.Tensor, int]:
        vectors = target.movedim(1, -1)[normals_valid(target)[:, 0]].double()
        return vectors.sum(0), vectors.shape[0]

    def baseline_output(self, spec: TaskSpec, total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """The mean labelled normal (``activate`` normalises it: the direction is what counts)."""
        return total / count.clamp(min=1)


class DepthKind(TaskKind):
    """Metric depth: L1 in metres on labelled pixels, clamped at 0."""

    name = "depth"
    resample = "depth"

    def loss(self, spec: TaskSpec, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return depth_l1(pred, target)

    def activate(self, pred: torch.Tensor) -> torch.Tensor:
        return pred.clamp(min=0)

    def meter(self, spec: TaskSpec, edge_tolerance: float) -> Meter:
        return DepthMeter(spec)

    def manifest_fields(self, spec: TaskSpec) -> dict[str, Any]:
        return {"units": spec.units}

    def unlabelled(self, spec: TaskSpec, size: tuple[int, int]) -> torch.Tensor:
        return torch.zeros(1, *size)

    def baseline_sums(self, spec: TaskSpec, target: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The mean labelled depth: the constant with the least rmse."""
        values = target[depth_valid(target)].double()
        return values.sum().reshape(1), values.numel()


KINDS: dict[str, TaskKind] = {k.name: k for k in (LabelsKind(), ProbabilityKind(), NormalsKind(), DepthKind())}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: KindName
    channels: int
    weight: float  # MTLoRA's default loss weight
    description: str
    classes: tuple[str, ...] = ()
    units: str = ""
    # Balanced BCE: weight of the positive class (MTI-Net uses 0.95 for edges);
    # None means "balance from the batch's own label frequencies".
    pos_weight: float | None = None
    # Thin structures (edges): evaluated by a boundary F-measure instead of region overlap.
    boundary: bool = False

    @property
    def rules(self) -> TaskKind:
        """The kind's behaviour (loss, activation, meter, export layout...)."""
        return KINDS[self.kind]

    def with_classes(self, classes: Sequence[str]) -> TaskSpec:
        return replace(self, classes=tuple(classes), channels=len(classes))

    def compute_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of raw network output ``pred`` (B,C,H,W) against the label map."""
        return self.rules.loss(self, pred, target)

    def activate(self, pred: torch.Tensor) -> torch.Tensor:
        """Raw output -> the map users want (float); label tasks return probabilities."""
        return self.rules.activate(pred)

    def postprocess(self, pred: torch.Tensor) -> torch.Tensor:
        """Raw output -> final map: class indices (int64, B,H,W) or the activated map."""
        return self.rules.postprocess(pred)


PASCAL_CONTEXT_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
HUMAN_PARTS_CLASSES = ("background", "head", "torso", "upper_arm", "lower_arm", "upper_leg", "lower_leg")

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("semseg", "labels", 21, 1.0, "semantic segmentation",
                 classes=PASCAL_CONTEXT_CLASSES),
        TaskSpec("human_parts", "labels", 7, 2.0, "human (object) part segmentation",
                 classes=HUMAN_PARTS_CLASSES),
        TaskSpec("saliency", "probability", 1, 5.0, "salient-object probability"),
        TaskSpec("normals", "normals", 3, 10.0,
                 "unit surface normals, camera frame: x right, y up, z towards the camera"),
        TaskSpec("depth", "depth", 1, 1.0, "depth along the optical axis", units="m"),
        TaskSpec("edge", "probability", 1, 50.0, "object-boundary probability",
                 pos_weight=0.95, boundary=True),
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
            if not spec.classes:
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
