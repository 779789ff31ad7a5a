"""Task metrics of an exported model, measured through the gateway's own image path (``faar-eval``).

What a user of the served model gets is what is measured: each dataset image (uint8 RGB at its
native size) is resized to the graph's input size with the gateway's ``codec.model_input``,
the ONNX graph runs in ONNX Runtime (a session made by the gateway's ``create_session``), and
every output map is resized back to the label's size with the gateway's ``codec.resize_map``
(nearest for class indices, bilinear for probabilities and depth, bilinear then renormalised
for normals). The metrics are the training loop's own ``faar.metrics.MultiTaskMetrics`` on
labels in the datasets' conventions at their native size.

Decisions:

* Exported outputs are post-processed maps; the meters take raw network outputs and apply the
  task's own ``postprocess`` / ``activate``. Each kind's ``raw_from_map`` (faar/tasks.py) hands
  its meter the raw output whose post-processing gives back the map: a one-hot tensor for
  class indices (argmax returns the index), ``logit(p)`` for probabilities (sigmoid returns p;
  p is clipped to [1e-7, 1 - 1e-7] first, which moves no pixel across a threshold in
  [0.2, 0.9]), unit normals as they are (normalising is idempotent) and metres as they are
  (clamp at 0 is too). So no meter changes and every metric means what it means in training.
* Labels at native size: ``transform_sample`` with the identity augmentation at the sample's
  own size, which converts every label to the training conventions (ignore values, normals'
  validity, depth 0 = no label) without moving a pixel.
* ``--run``: the run's *unmerged* PyTorch model in eval mode gets the same uint8 pixels,
  normalised as the graph does, and its raw outputs go to the meters, which resize raw
  outputs to the label's size bilinearly (the training evaluator's convention). The
  difference therefore covers everything export changes: merging, ONNX, precision, and
  post-processing before resizing instead of after.
* Images are decoded by the dataset (Pillow, RGB), as the gateway decodes an upload; no
  dataset here carries EXIF orientation, the one step of the gateway's decode that is skipped.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from faar_serve import codec
from faar_serve.manifest import load_model_spec
from faar_serve.providers import create_session

from .config import DataConfig
from .data import build_dataset
from .data.base import MultiTaskDataset
from .data.transforms import transform_sample
from .metrics import MultiTaskMetrics
from .model import IMAGENET_MEAN, IMAGENET_STD, FAARModel
from .tasks import TaskSpec, get_task

# A predictor takes uint8 pixels [B, H, W, 3] at the model size and the label size of each image,
# and returns per image the raw-like predictions the meters take, one [1, C, h, w] tensor per task.
Predictor = Callable[[np.ndarray, Sequence[tuple[int, int]]], list[dict[str, torch.Tensor]]]


class EvalError(ValueError):
    """An evaluation that cannot run as asked (model, dataset or tasks do not fit)."""


@dataclass(frozen=True)
class Sample:
    name: str
    pixels: np.ndarray  # uint8 [H, W, 3] at the model's input size, resized by the gateway's codec
    targets: dict[str, torch.Tensor]  # per task, training conventions, native size, batch axis of 1

    @property
    def label_size(self) -> tuple[int, int]:
        return tuple(next(iter(self.targets.values())).shape[-2:])  # type: ignore[return-value]


def samples(dataset: MultiTaskDataset, size: tuple[int, int], limit: int | None = None,
            start: int = 0) -> Iterator[Sample]:
    """Samples ``start .. start + limit`` of ``dataset`` (every one after ``start`` by default)."""
    stop = len(dataset) if limit is None else min(len(dataset), start + limit)
    for i in range(start, stop):
        raw = dataset.raw(i)
        labelled = transform_sample(raw, tuple(raw["image"].shape[:2]))
        targets = {t: labelled[t].unsqueeze(0) for t in dataset.tasks}
        yield Sample(str(raw["meta"]["name"]), codec.model_input(raw["image"], *size), targets)


def maps_as_raw(spec: TaskSpec, arr: np.ndarray) -> torch.Tensor:
    """A post-processed map (``[h, w]``, normals ``[3, h, w]``) -> the raw ``[1, C, h, w]`` output
    whose post-processing by ``spec`` gives the map back (``TaskKind.raw_from_map``)."""
    try:
        return spec.rules.raw_from_map(spec, torch.from_numpy(np.require(arr, requirements=["C", "W"]))[None])
    except ValueError as exc:
        raise EvalError(str(exc)) from exc


def onnx_predictor(path: str | os.PathLike, tasks: Mapping[str, TaskSpec], input_name: str = "image",
                   outputs: Mapping[str, str] | None = None, device: str = "cpu") -> Predictor:
    """An exported graph in ONNX Runtime (the gateway's session settings); ``outputs`` maps each
    task to its graph output (default: the output named after the task, as faar-export names them)."""
    session = create_session(Path(path), device)
    names = dict(outputs or {t: t for t in tasks})

    def predict(pixels: np.ndarray, sizes: Sequence[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        arrays = dict(zip(names.values(), session.run(list(names.values()), {input_name: pixels}), strict=True))
        return [{t: maps_as_raw(spec, codec.resize_map(spec.kind, arrays[names[t]][k], *sizes[k]))
                 for t, spec in tasks.items()} for k in range(len(sizes))]

    return predict


def torch_predictor(model: FAARModel) -> Predictor:
    """A PyTorch model on the same pixels, normalised as the exported graph normalises them."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    model.eval()

    @torch.no_grad()
    def predict(pixels: np.ndarray, sizes: Sequence[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
        raw = model(x)
        return [{t: y[k:k + 1].float() for t, y in raw.items()} for k in range(len(sizes))]

    return predict


def evaluate(predictors: Mapping[str, Predictor], tasks: Mapping[str, TaskSpec], data: Iterable[Sample],
             batch_size: int = 8) -> tuple[dict[str, dict[str, dict[str, float]]], int]:
    """Every predictor over the same samples in one pass: (metrics per predictor, images seen)."""
    metrics = {name: MultiTaskMetrics(tasks) for name in predictors}
    count = 0
    batch: list[Sample] = []

    def flush() -> None:
        pixels = np.stack([s.pixels for s in batch])
        sizes = [s.label_size for s in batch]
        for name, predict in predictors.items():
            for sample, preds in zip(batch, predict(pixels, sizes), strict=True):
                metrics[name].update(preds, sample.targets)
        batch.clear()

    for sample in data:
        batch.append(sample)
        count += 1
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if count == 0:
        raise EvalError("no images to evaluate")
    return {name: m.compute() for name, m in metrics.items()}, count


def difference(a: Mapping[str, Mapping[str, float]], b: Mapping[str, Mapping[str, float]]) -> dict[str, dict]:
    """``a - b`` per task and metric, on the metrics both have."""
    return {t: {k: a[t][k] - b[t][k] for k in a[t] if k in b.get(t, {})} for t in a}


def evaluate_export(repository: str | os.PathLike, data: DataConfig, split: str | None = None,
                    name: str = "faar", version: int | None = None, run_dir: str | os.PathLike | None = None,
                    limit: int | None = None, batch_size: int = 8, device: str = "cpu") -> dict[str, Any]:
    """Metrics of an exported model (and of the run's PyTorch model with ``run_dir``) on a split."""
    from .run import load_model

    spec = load_model_spec(repository, name, version)
    tasks = {t: get_task(t).with_classes(info.classes) if info.kind == "labels" else get_task(t)
             for t, info in spec.tasks.items()}
    size = (spec.height, spec.width)
    split = split or data.val_split
    try:
        dataset = build_dataset(data, split, list(tasks), size, train=False)
    except (ValueError, FileNotFoundError) as exc:
        raise EvalError(str(exc)) from exc
    _check_classes(tasks, dataset)
    predictors: dict[str, Predictor] = {
        "exported": onnx_predictor(spec.onnx_path, tasks, spec.input_name,
                                   {t: info.output for t, info in spec.tasks.items()}, device)}
    if run_dir is not None:
        model = load_model(run_dir)
        if set(model.tasks) != set(tasks):
            raise EvalError(f"run {run_dir} has tasks {list(model.tasks)}, the export {list(tasks)}")
        predictors["pytorch"] = torch_predictor(model)
    results, count = evaluate(predictors, tasks, samples(dataset, size, limit), batch_size)
    report: dict[str, Any] = {
        "model": {"repository": str(repository), "name": name, "version": spec.version,
                  "onnx": str(spec.onnx_path), "input_size": list(size),
                  "precision": spec.manifest.export.precision or ("fp16" if spec.manifest.export.fp16 else "fp32")},
        "data": {"dataset": data.dataset, "root": data.root, "split": split, "images": count},
        **results,
    }
    if run_dir is not None:
        report["run"] = str(run_dir)
        report["difference"] = difference(results["exported"], results["pytorch"])
    return report


def _check_classes(tasks: Mapping[str, TaskSpec], dataset: MultiTaskDataset) -> None:
    for task, names in dataset.classes.items():
        if task in tasks and len(names) != tasks[task].channels:
            raise EvalError(f"{task}: the model predicts {tasks[task].channels} classes, the dataset has "
                            f"{len(names)}")


def format_table(report: Mapping[str, Any]) -> str:
    """Rows of task | metric | exported [| pytorch | difference]; per-class IoUs left to the JSON."""
    columns = [c for c in ("exported", "pytorch", "difference") if c in report]
    lines = ["| task | metric | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for task, values in report["exported"].items():
        for metric in values:
            if metric.startswith("iou_"):
                continue
            cells = [_cell(report[c][task].get(metric)) for c in columns]
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}"
