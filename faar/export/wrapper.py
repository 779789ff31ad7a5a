"""The module that becomes the graph: uint8 pixels in, post-processed maps out, one per task.

Decisions:

* The graph takes what clients have: uint8 RGB pixels ``[B, H, W, 3]``; the cast and the
  ImageNet normalisation run inside it. The cast to float comes first and label maps'
  cast to uint8 (after an int64 ArgMax) comes last: TensorRT takes UINT8 only as a network
  input or output, so a uint8 Transpose or a cast inside would split its graph. H and W
  are fixed at export (the spectral filters are shaped to one feature size), the batch
  axis is dynamic.
* Outputs are laid out and post-processed in the graph by each task's kind
  (``faar.tasks.TaskKind.outputs`` / ``export_maps``), so PyTorch and ONNX run the same
  code: label maps as uint8 class indices (255 classes at most), probabilities, unit
  normals and metric depth as float32, class probabilities on request.
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
    """The graph's outputs, in task order, each task's as its kind lays them out (``TaskKind.outputs``)."""
    h, w = size
    out = []
    for name, spec in tasks.items():
        try:
            layouts = spec.rules.outputs(spec, probabilities)
        except ValueError as exc:  # a task the kind cannot export (e.g. too many classes for uint8)
            raise ExportError(str(exc)) from exc
        out += [TensorSpec(name + o.suffix, o.dtype, (h, w) if o.channels is None else (o.channels, h, w),
                           name, o.role, o.meaning) for o in layouts]
    return out


class ExportWrapper(nn.Module):
    """uint8 NHWC RGB pixels -> the tuple of post-processed maps in ``self.outputs`` order."""

    def __init__(self, model: FAARModel, probabilities: bool = False) -> None:
        super().__init__()
        self.model = model
        self.probabilities = probabilities
        size = model.img_size
        self.inputs = [input_spec(size)]
        self.outputs = output_specs(model.tasks, size, probabilities)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = (image.float().permute(0, 3, 1, 2) / 255.0 - self.mean) / self.std  # cast first: TensorRT
        raw = self.model(x)
        maps = []
        for name, spec in self.model.tasks.items():
            maps += spec.rules.export_maps(spec, raw[name], self.probabilities)
        return tuple(maps)


def build_export_module(model: FAARModel, probabilities: bool = False) -> ExportWrapper:
    """The wrapper around ``model`` (merged or not) in eval mode."""
    return ExportWrapper(model, probabilities).eval()
