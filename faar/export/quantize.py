"""INT8: static QDQ quantisation calibrated on real images, with a measured sensitivity pass.

The fp32 graph that passed the parity check is quantised with ``onnxruntime.quantization``:
static ranges from calibration images, QDQ format (every execution provider and TensorRT
read it), per-channel int8 weights, uint8 activations. Which operators stay float is
measured, never listed: the graph's MatMul and Conv nodes fall into groups by role
(``node_groups``); the pass quantises all of them and asks the gate (``gate.judge``); if
that fails, it quantises everything but one group, for each group, and keeps groups float,
the one whose float copy helps most first, until the gate passes (every step measured on
the held-out images, not extrapolated). If nothing short of the fp32 model passes, the
export fails and names the tasks.

Decisions:

* ``quant_pre_process`` is not run. Its symbolic shape inference fails on this graph from
  both exporters: TorchScript records every ``x.shape`` read in timm's Swin (window
  padding, partition, patch merging) as Shape -> Gather -> Sub/Mod arithmetic; with a
  dynamic batch axis ONNX Runtime folds no ``Shape`` (it folds only fully static shapes),
  so the pads of the window ``Pad`` nodes stay computed, the inference gives the padded
  tensor fresh symbols, and the residual ``Add`` cannot reconcile them with ``batch``
  ("Incomplete symbolic shape inference"). With ``auto_merge`` it gets further and then
  crashes in ``Expand`` (``F.normalize``'s ``expand_as`` takes its shape from a
  Shape-derived Concat); the dynamo graph stops at the same Expand. Folding ``Shape ->
  Gather`` of static dims at export removed 42 of 108 such Gathers on the tiny model and
  none of the failures (ONNX shape inference loses the dims at the same Pads). The other
  two steps of the pre-processing are done anyway: ONNX Runtime's basic optimisation at
  export, ONNX shape inference inside ``quantize_static``. Nothing the quantiser needs
  comes from the failing step (weight shapes are initializers, tensor types come from
  ONNX inference), so the graph is quantised as exported: a workaround, not a fix.
* Only MatMul and Conv are quantised (the FLOPs); element-wise ops, LayerNorm, Softmax and
  Resize stay float, so ONNX Runtime runs integer GEMMs with float outputs
  (MatMulIntegerToFloat) and keeps the rest of the graph as it was.
* ``reduce_range`` (7-bit weights): without VNNI, x86's u8 x s8 kernels use VPMADDUBSW,
  whose 16-bit pair sums saturate with full 8-bit weights (255 x 127 x 2 > 32767). A graph
  exported on a VNNI machine may be served on one without, so it is always on.
* Calibration: MinMax ranges (ONNX Runtime's default), computed once and cached, so every
  candidate of the sensitivity pass shares them.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from ..evaluation import Sample, evaluate, onnx_predictor
from ..tasks import TaskSpec
from .gate import Limit, gate_limits, judge
from .options import ExportError

QUANTIZED_OPS = ("MatMul", "Conv")


class _Reader(CalibrationDataReader):
    """Calibration images one at a time (ONNX Runtime's calibrator reads each once)."""

    def __init__(self, input_name: str, images: Sequence[np.ndarray]) -> None:
        self.input_name = input_name
        self.images = list(images)
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.images):
            return None
        self._next += 1
        return {self.input_name: self.images[self._next - 1][None]}

    def __len__(self) -> int:
        return len(self.images)


def node_groups(proto: onnx.ModelProto) -> dict[str, list[str]]:
    """The quantisable nodes by role, told apart by the exported names (``/model/backbone/...``)
    and by whether the second operand is a weight."""
    constants = {t.name for t in proto.graph.initializer}
    groups: dict[str, list[str]] = {}
    for node in proto.graph.node:
        if node.op_type not in QUANTIZED_OPS:
            continue
        weighted = len(node.input) > 1 and node.input[1] in constants
        if "/decoder/" in node.name:
            group = "decoder.spectral" if "/spectral" in node.name else "decoder.conv"
        elif "patch_embed" in node.name:
            group = "backbone.patch_embed"
        elif not weighted:
            group = "backbone.attention"  # q @ k^T and attention @ v: both operands are activations
        else:
            group = "backbone.linear"
        groups.setdefault(group, []).append(node.name)
    return groups


class _SkipPreprocessAdvice(logging.Filter):
    """quantize_static advises ``quant_pre_process`` on every call; the module docstring says why not."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


def quantize_graph(fp32: Path, out: Path, input_name: str, calibration: Sequence[np.ndarray], cache: Path,
                   keep_float: Sequence[str] = ()) -> None:
    """Static QDQ int8 of ``fp32`` into ``out`` (nodes named in ``keep_float`` stay float);
    calibration ranges are read from ``cache`` when it exists, else computed and saved there."""
    advice = _SkipPreprocessAdvice()
    logging.getLogger().addFilter(advice)
    try:
        quantize_static(str(fp32), str(out), _Reader(input_name, calibration), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True, reduce_range=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=list(keep_float), calibrate_method=CalibrationMethod.MinMax,
                        calibration_cache_path=cache)
    finally:
        logging.getLogger().removeFilter(advice)


def quantize_with_gate(fp32: Path, out: Path, input_name: str, tasks: Mapping[str, TaskSpec],
                       calibration: Sequence[np.ndarray], held_out: Sequence[Sample],
                       limits: Mapping[str, Limit] | None = None, batch_size: int = 8) -> dict[str, Any]:
    """Quantise ``fp32`` into ``out`` so that it passes the gate on ``held_out``; returns the
    record for the manifest (``Quantization`` fields less the calibration, plus ``gate``: the
    judged result, and ``limits``). Raises ``ExportError`` naming the failing tasks when no tested set
    of float groups passes (``out`` is then not written)."""
    if not calibration:
        raise ExportError("no calibration images")
    if not held_out:
        raise ExportError("no held-out images for the accuracy gate")
    groups = node_groups(onnx.load(str(fp32), load_external_data=False))
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=out.parent) as tmp:
        work = Path(tmp)
        cache = work / "calibration.json"

        def metrics_of(path: Path) -> dict[str, dict[str, float]]:
            return evaluate({"m": onnx_predictor(path, tasks, input_name)}, tasks, held_out, batch_size)[0]["m"]

        reference = metrics_of(fp32)
        limits = gate_limits(list(tasks), {t: next(iter(m)) for t, m in reference.items()}, limits)
        tried: list[dict[str, Any]] = []

        def attempt(float_groups: list[str]) -> tuple[list[str], dict[str, Any], Path]:
            path = work / f"candidate-{len(tried)}.onnx"
            quantize_graph(fp32, path, input_name, calibration, cache, [n for g in float_groups for n in groups[g]])
            result = judge(reference, metrics_of(path), limits)
            tried.append({"float_groups": float_groups, "passed": result["passed"], "score": result["score"],
                          "worse_by": {t: v["worse_by"] for t, v in result["tasks"].items()}})
            return float_groups, result, path

        best = attempt([])
        sensitivity: dict[str, float] = {}
        if not best[1]["passed"] and len(groups) > 1:
            alone = {g: attempt([g]) for g in groups}
            sensitivity = {g: a[1]["score"] for g, a in alone.items()}
            order = sorted(groups, key=sensitivity.__getitem__)
            best = min([best, *alone.values()], key=lambda a: a[1]["score"])
            for k in range(2, len(groups)):  # all groups float would be the fp32 model itself
                if best[1]["passed"]:
                    break
                candidate = attempt(order[:k])
                if candidate[1]["score"] < best[1]["score"]:
                    best = candidate
        float_groups, result, path = best
        if not result["passed"]:
            failed = [t for t, v in result["tasks"].items() if not v["passed"]]
            raise ExportError(f"int8 fails the accuracy gate on {', '.join(failed)} (best with "
                              f"{float_groups or 'nothing'} kept float; nothing written): "
                              + "; ".join(result["failures"]))
        os.replace(path, out)
    return {
        "method": {"format": "QDQ", "weights": "int8, per channel, 7-bit range", "activations": "uint8, per tensor",
                   "calibration": "MinMax", "operators": list(QUANTIZED_OPS)},
        "groups": {g: len(n) for g, n in groups.items()}, "float_groups": float_groups,
        "sensitivity": sensitivity, "tried": tried,
        "gate": result, "limits": limits,
    }
