"""The manifest of one export, built through the schema the gateway reads it with.

The schema (fields, kinds, format version, validation) is ``faar_serve.manifest``; this
module only gathers the values: tasks and outputs from the wrapper, ranks and parameter
counts from the unmerged model, the graph and parity reports, file hashes and versions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch

from faar_serve.manifest import FORMAT_VERSION, Manifest, ManifestError, parse_manifest

from .. import __version__
from ..adapters import adapters_of
from ..model import IMAGENET_MEAN, IMAGENET_STD, FAARModel, parameter_summary
from ..run import MODEL_FILE
from ..tasks import TaskSpec
from .options import ExportError, ExportOptions
from .wrapper import ExportWrapper, TensorSpec


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _layer_table(model: FAARModel) -> dict[str, dict[str, Any]]:
    """Per adapted linear: rank and parameters before (frozen + adapter) and after merge."""
    table = {}
    for name, a in adapters_of(model).items():
        base = sum(p.numel() for p in a.base.parameters())
        adapter = sum(p.numel() for n, p in a.named_parameters() if not n.startswith("base."))
        table[name] = {"group": a.group, "site": a.site, "kind": a.kind, "rank": a.rank,
                       "parameters_before": base + adapter, "parameters_after": base}
    return table


def _ranks(model: FAARModel) -> dict[str, Any]:
    layers = _layer_table(model)
    ranks = [v["rank"] for v in layers.values()]
    return {"layers": layers, "count": len(ranks), "total": sum(ranks), "min": min(ranks, default=0),
            "max": max(ranks, default=0), "mean": round(sum(ranks) / len(ranks), 3) if ranks else 0.0}


def _task_entry(spec: TaskSpec, outputs: Sequence[TensorSpec]) -> dict[str, Any]:
    return {"kind": spec.kind, "description": spec.description, "channels": spec.channels,
            "outputs": [o.name for o in outputs if o.task == spec.name], **spec.rules.manifest_fields(spec)}


def _input_entry(spec: TensorSpec) -> dict[str, Any]:
    return {**spec.signature(), "layout": "NHWC", "color": "RGB", "range": [0, 255], "meaning": spec.meaning,
            "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                              "formula": "(pixel / 255 - mean) / std per channel, inside the graph"}}


def build_manifest(run_dir: Path, model: FAARModel, merged: FAARModel, module: ExportWrapper,
                   options: ExportOptions, onnx_path: Path, graph: dict[str, Any], parity: dict[str, Any],
                   started: float) -> Manifest:
    """The validated manifest of ``module`` (merged) exported from ``model`` (unmerged) at ``onnx_path``.

    ``graph`` and ``parity`` are the reports of ``export_onnx`` and ``check_parity``;
    ``started`` the ``time.perf_counter()`` of the export's start.
    """
    before = parameter_summary(model)
    tf32 = ", TF32 off" if parity["provider"] == "CUDAExecutionProvider" else ""
    candidate = f"this model.onnx in onnxruntime {ort.__version__} ({parity['provider']}{tf32})"
    if options.precision == "int8":
        candidate = (f"the fp32 graph this int8 model.onnx was quantised from, in onnxruntime {ort.__version__} "
                     f"({parity['provider']}); the int8 graph is judged by the accuracy gate (parity.gate)")
    data = {
        "format_version": FORMAT_VERSION,
        "model": {"name": options.name, "version": options.version},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {"run": str(run_dir.resolve()), "model_sha256": sha256_file(run_dir / MODEL_FILE),
                   "config": dataclasses.asdict(model.config)},
        "inputs": [_input_entry(s) for s in module.inputs],
        "outputs": [{**s.signature(), "task": s.task, "meaning": s.meaning} for s in module.outputs],
        "input_size": list(model.img_size),
        "tasks": {t: _task_entry(spec, module.outputs) for t, spec in model.tasks.items()},
        "ranks": _ranks(model),
        "parameters": {"note": "merged, each task owns a copy of a frozen linear its adapters shared",
                       "before_merge": before["total_parameters"],
                       "trainable_before_merge": before["trainable_parameters"],
                       "after_merge": sum(p.numel() for p in merged.parameters()),
                       "onnx_initializer_elements": graph["initializer_elements"]},
        "export": {**graph, "options": dataclasses.asdict(options), "fft_backend": options.fft,
                   "versions": {"faar": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                                "onnxruntime": ort.__version__}},
        "parity": {**parity,
                   "reference": {"model": "unmerged run model, eval mode, fp32",
                                 "fft_backend": model.config.decoder.fft, "runtime": f"torch {torch.__version__}"},
                   "candidate": candidate},
        "onnx": {"file": onnx_path.name, "sha256": sha256_file(onnx_path), "bytes": onnx_path.stat().st_size},
    }
    data["export"]["total_seconds"] = round(time.perf_counter() - started, 2)
    try:
        return parse_manifest(data, f"the manifest of {options.name} version {options.version}")
    except ManifestError as exc:  # the exporter wrote something the gateway would refuse: a bug here
        raise ExportError(str(exc)) from exc
