"""The module that becomes the graph: uint8 pixels in, post-processed maps out, one per task.

Decisions:

* The graph takes what clients have: uint8 RGB pixels ``[B, H, W, 3]``; the cast and the
  ImageNet normalisation run inside it. H and W are fixed at export (the spectral filters
  are shaped to one feature size), the batch axis is dynamic.
* Outputs are post-processed in the graph by the task registry's own ``postprocess`` /
  ``activate`` inside ``ExportWrapper``, so PyTorch and ONNX run the same code: label maps
  as uint8 class indices, probabilities, unit normals and metric depth as float32.
* The parity reference (unmerged model) and the exported graph (merged model) are both
  this wrapper, so the gate compares exactly what merging and export change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..model import IMAGENET_MEAN, IMAGENET_STD, FAARModel
from ..tasks import TaskSpec
from .options import ExportError

INPUT_NAME = "image"
# Label maps are uint8 and 255 is the datasets' "ignore" label, so 255 classes at most.
MAX_CLASSES = 255


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output; ``dims`` exclude the batch axis."""

    name: str
    dtype: Literal["uint8", "float32"]
    dims: tuple[int, ...]
    task: str = ""
    role: Literal["pixels", "labels", "probs", "map"] = "map"
    meaning: str = ""

    def signature(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": [-1, *self.dims]}


def input_spec(size: tuple[int, int]) -> TensorSpec:
    return TensorSpec(INPUT_NAME, "uint8", (size[0], size[1], 3), role="pixels",
                      meaning="RGB pixels, uint8 NHWC; normalised inside the graph")


def output_specs(tasks: dict[str, TaskSpec], size: tuple[int, int], probabilities: bool) -> list[TensorSpec]:
    """The graph's outputs, one per task (plus class probabilities on request), named after it."""
    h, w = size
    out = []
    for name, spec in tasks.items():
        if spec.kind == "labels":
            if spec.channels > MAX_CLASSES:
                raise ExportError(f"task {name!r} has {spec.channels} classes; uint8 label maps hold at most "
                                  f"{MAX_CLASSES} (255 is the ignore label)")
            out.append(TensorSpec(name, "uint8", (h, w), name, "labels", "class index per pixel (argmax)"))
            if probabilities:
                out.append(TensorSpec(f"{name}_probs", "float32", (spec.channels, h, w), name, "probs",
                                      "class probabilities, softmax over axis 1"))
        elif spec.kind == "normals":
            out.append(TensorSpec(name, "float32", (spec.channels, h, w), name, "map",
                                  f"{spec.description}; (x, y, z) along axis 1"))
        elif spec.channels == 1:
            unit = f" in {spec.units}" if spec.units else " in [0, 1]"
            out.append(TensorSpec(name, "float32", (h, w), name, "map", spec.description + unit))
        else:
            raise ExportError(f"task {name!r} ({spec.kind}, {spec.channels} channels) has no export layout")
    return out


class ExportWrapper(nn.Module):
    """uint8 NHWC RGB pixels -> the tuple of post-processed maps in ``self.outputs`` order."""

    def __init__(self, model: FAARModel, probabilities: bool = False) -> None:
        super().__init__()
        self.model = model
        size = model.img_size
        self.inputs = [input_spec(size)]
        self.outputs = output_specs(model.tasks, size, probabilities)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = (image.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std
        raw = self.model(x)
        maps = []
        for out in self.outputs:
            spec, y = self.model.tasks[out.task], raw[out.task]
            if out.role == "labels":
                maps.append(spec.postprocess(y).to(torch.uint8))
            elif out.role == "probs":
                maps.append(spec.activate(y))
            else:
                y = spec.postprocess(y)
                maps.append(y[:, 0] if spec.channels == 1 else y)
        return tuple(maps)


def build_export_module(model: FAARModel, probabilities: bool = False) -> ExportWrapper:
    """The wrapper around ``model`` (merged or not) in eval mode."""
    return ExportWrapper(model, probabilities).eval()
