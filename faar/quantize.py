"""INT8 export: static QDQ quantisation calibrated on real images, a measured sensitivity pass, the gate.

The fp32 graph that passed the parity check is quantised with ``onnxruntime.quantization``:
static ranges from calibration images, QDQ format (portable: every execution provider and
TensorRT read it), per-channel int8 weights, uint8 activations. Which operators stay float
is measured, never listed: the graph's MatMul and Conv nodes fall into a few groups by role
(backbone linears, attention products, patch embedding, the decoder's spectral MatMuls, the
decoder's convolutions); the pass quantises everything, scores each group by how much the
gate improves when that group alone stays float, and keeps groups float, best first, until
the gate passes (each step measured, not extrapolated). If it cannot pass, the export fails.

The gate compares task metrics (``faar.metrics`` through ``faar.evaluation``, the gateway's
image path) of the candidate against the fp32 graph on held-out images: the run's validation
split, never the calibration images. Each task is judged on its headline metric (the first
its meter reports, as the training log does) against a limit in that metric's units, or in
percent of the fp32 value where the limit says so.

Decisions:

* ``quant_pre_process`` is not run. Its symbolic shape inference fails on both exporters'
  graphs: TorchScript records every ``x.shape`` read in timm's Swin (window padding,
  partition, patch merging) as Shape -> Gather -> Sub/Mod arithmetic; with a dynamic batch
  axis ONNX Runtime cannot fold ``Shape`` (it folds only fully static shapes), the pads of
  the window ``Pad`` nodes stay computed, and the inference gives the padded tensor fresh
  symbols that the residual ``Add`` cannot reconcile with ``batch`` ("Incomplete symbolic
  shape inference"). With ``auto_merge`` it goes further and then crashes in ``Expand``
  (``F.normalize``'s ``expand_as`` takes its shape from a Shape-derived Concat); the dynamo
  graph stops at the same Expand. Its other two steps are already done: ONNX Runtime's basic
  optimisation at export, and ONNX shape inference, which ``quantize_static`` runs itself.
  Nothing the quantiser needs comes from the failing step (weights' shapes are initializers,
  tensor types come from ONNX inference), so the graph is quantised as exported.
* Only MatMul and Conv are quantised (the FLOPs); element-wise ops, LayerNorm, Softmax and
  Resize stay float, so ONNX Runtime runs integer GEMMs with float outputs
  (MatMulIntegerToFloat) or QLinearConv where a quantised consumer follows.
* ``reduce_range`` (7-bit weights): without VNNI, x86's u8 x s8 kernels use VPMADDUBSW, whose
  16-bit pair sums saturate with full 8-bit weights (255 x 127 x 2 > 32767). The graph may be
  served on such a CPU even when exported on a VNNI one, so it is always on.
* Calibration: MinMax ranges (ONNX Runtime's default), computed once and cached, so every
  candidate of the sensitivity pass shares them.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from faar_serve import codec
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from .evaluation import Sample, evaluate, onnx_predictor
from .metrics import LOWER_IS_BETTER
from .tasks import TaskSpec

QUANTIZED_OPS = ("MatMul", "Conv")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
MAX_CALIBRATION_PIXELS = 100_000_000  # calibration folders are trusted, but a bomb still gets a clear error


class QuantizationError(ValueError):
    """Quantisation that cannot be done or does not pass the gate; nothing was written."""


@dataclass(frozen=True)
class Limit:
    """How much a task's headline metric may worsen: in its own units, or in percent of fp32."""

    worse_by: float
    relative: bool = False

    def __str__(self) -> str:
        return f"{self.worse_by:g}{'%' if self.relative else ''}"


# Per headline metric (the first key a meter reports): mIoU and F-scores in points, the mean
# normal angle in degrees, depth rmse in percent of the fp32 model's.
DEFAULT_LIMITS: dict[str, Limit] = {"miou": Limit(1.0), "odsf": Limit(1.0), "mean": Limit(0.5),
                                    "rmse": Limit(2.0, relative=True)}


def parse_limit(text: str) -> tuple[str, Limit]:
    """``TASK=VALUE`` or ``TASK=VALUE%`` (``--gate``) -> (task, limit)."""
    match = re.fullmatch(r"\s*([A-Za-z_][\w]*)\s*=\s*(-?[0-9.]+(?:e-?\d+)?)\s*(%?)\s*", text)
    if not match:
        raise QuantizationError(f"--gate {text!r}: expected TASK=VALUE or TASK=VALUE% (e.g. depth=2%)")
    return match.group(1), Limit(float(match.group(2)), relative=bool(match.group(3)))


def gate_limits(tasks: Mapping[str, TaskSpec], headline: Mapping[str, str],
                overrides: Mapping[str, Limit] | None = None) -> dict[str, Limit]:
    """The limit for each task: an override, else the default for its headline metric."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(tasks))
    if unknown:
        raise QuantizationError(f"--gate names task(s) {unknown} that the model does not have ({list(tasks)})")
    limits = {}
    for task in tasks:
        if task in overrides:
            limits[task] = overrides[task]
        elif headline[task] in DEFAULT_LIMITS:
            limits[task] = DEFAULT_LIMITS[headline[task]]
        else:
            raise QuantizationError(f"no default gate limit for {task}.{headline[task]}; pass --gate {task}=VALUE")
    return limits


def judge(reference: Mapping[str, Mapping[str, float]], candidate: Mapping[str, Mapping[str, float]],
          limits: Mapping[str, Limit]) -> dict[str, Any]:
    """Each task's headline metric, candidate against reference, within its limit?

    ``worse_by`` is how much worse the candidate is (positive = worse) in the limit's units;
    ``score`` is worse_by / limit (1 = at the limit), the quantity the sensitivity pass lowers.
    """
    tasks: dict[str, Any] = {}
    failures = []
    for task, limit in limits.items():
        metric = next(iter(reference[task]))
        ref, cand = reference[task][metric], candidate[task][metric]
        worse = (cand - ref) if metric in LOWER_IS_BETTER else (ref - cand)
        if limit.relative:
            worse = 100 * worse / abs(ref) if ref else math.inf
        ok = bool(worse <= limit.worse_by)  # NaN fails
        tasks[task] = {"metric": metric, "fp32": ref, "candidate": cand, "worse_by": worse,
                       "limit": str(limit), "passed": ok}
        if not ok:
            tasks[task]["failed"] = True
            failures.append(f"{task} {metric}: {ref:.4g} -> {cand:.4g}, worse by {worse:.3g}"
                            f"{'%' if limit.relative else ''} (limit {limit})")
    score = max((_score(t["worse_by"], limits[k]) for k, t in tasks.items()), default=0.0)
    return {"passed": not failures, "failures": failures, "score": score, "tasks": tasks}


def _score(worse: float, limit: Limit) -> float:
    if math.isnan(worse):
        return math.inf
    if limit.worse_by > 0:
        return worse / limit.worse_by
    return 0.0 if worse <= limit.worse_by else math.inf


# --- calibration -------------------------------------------------------------------------------
class _Reader(CalibrationDataReader):
    """Calibration images, one at a time (ONNX Runtime's calibrator reads them once)."""

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


def spread(total: int, n: int) -> list[int]:
    """``n`` indices spread evenly over ``range(total)`` (all of them when n >= total)."""
    if n >= total:
        return list(range(total))
    return sorted({int(round(i)) for i in np.linspace(0, total - 1, n)})


def folder_images(folder: str | os.PathLike, n: int, size: tuple[int, int]) -> list[np.ndarray]:
    """Up to ``n`` images of a folder (recursively, spread over the sorted names), decoded and
    resized by the gateway's own codec."""
    root = Path(folder)
    if not root.is_dir():
        raise QuantizationError(f"calibration folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise QuantizationError(f"calibration folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for i in spread(len(files), n):
        try:
            rgb = codec.decode_image(files[i].read_bytes(), MAX_CALIBRATION_PIXELS)
        except (OSError, codec.ImageError) as exc:
            raise QuantizationError(f"calibration image {files[i]}: {exc}") from exc
        images.append(codec.resize_image(rgb, *size))
    return images


def node_groups(proto: onnx.ModelProto) -> dict[str, list[str]]:
    """The quantisable nodes by role, from the exported names (``/model/backbone/...``)."""
    constants = {t.name for t in proto.graph.initializer}
    groups: dict[str, list[str]] = {}
    for node in proto.graph.node:
        if node.op_type not in QUANTIZED_OPS:
            continue
        weighted = len(node.input) > 1 and node.input[1] in constants
        name = node.name
        if "/decoder/" in name:
            group = "decoder.spectral" if "/spectral" in name else "decoder.conv"
        elif "patch_embed" in name:
            group = "backbone.patch_embed"
        elif node.op_type == "MatMul" and not weighted:
            group = "backbone.attention"  # q @ k^T and attention @ v: both sides are activations
        else:
            group = "backbone.linear"
        groups.setdefault(group, []).append(name)
    return groups


def quantize_graph(fp32: Path, out: Path, input_name: str, calibration: Sequence[np.ndarray], cache: Path,
                   keep_float: Iterable[str] = ()) -> None:
    """Static QDQ int8 of ``fp32`` into ``out``; nodes in ``keep_float`` stay float."""
    quantize_static(str(fp32), str(out), _Reader(input_name, calibration), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True, reduce_range=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=list(keep_float), calibrate_method=CalibrationMethod.MinMax,
                    calibration_cache_path=cache)


@dataclass
class Candidate:
    float_groups: list[str]
    gate: dict[str, Any]
    path: Path


def quantize_with_gate(fp32: Path, out: Path, input_name: str, tasks: Mapping[str, TaskSpec],
                       calibration: Sequence[np.ndarray], held_out: Sequence[Sample],
                       limits: Mapping[str, Limit] | None = None, batch_size: int = 8) -> dict[str, Any]:
    """Quantise ``fp32`` into ``out`` so that it passes the gate on ``held_out``; returns the record.

    Raises ``QuantizationError`` (naming the tasks that fail) when no tested set of float
    groups passes; ``out`` is then not written.
    """
    if not calibration:
        raise QuantizationError("no calibration images")
    if not held_out:
        raise QuantizationError("no held-out images for the accuracy gate")
    groups = node_groups(onnx.load(str(fp32), load_external_data=False))
    with tempfile.TemporaryDirectory(prefix="faar-int8-", dir=out.parent) as tmp:
        work = Path(tmp)
        cache = work / "calibration.json"

        def metrics_of(path: Path) -> dict[str, dict[str, float]]:
            return evaluate({"m": onnx_predictor(path, tasks, input_name)}, tasks, held_out, batch_size)[0]["m"]

        reference = metrics_of(fp32)
        headline = {t: next(iter(m)) for t, m in reference.items()}
        limits = gate_limits(tasks, headline, limits)
        tried: list[dict[str, Any]] = []

        def attempt(float_groups: list[str]) -> Candidate:
            path = work / f"candidate-{len(tried)}.onnx"
            quantize_graph(fp32, path, input_name, calibration, cache,
                           [n for g in float_groups for n in groups[g]])
            result = judge(reference, metrics_of(path), limits)
            tried.append({"float_groups": float_groups, "passed": result["passed"], "score": result["score"],
                          "worse_by": {t: v["worse_by"] for t, v in result["tasks"].items()}})
            return Candidate(float_groups, result, path)

        best = attempt([])
        sensitivity = {}
        if not best.gate["passed"]:
            # Each group alone kept float: how much of the loss does it account for?
            alone = {g: attempt([g]) for g in groups}
            sensitivity = {g: c.gate["score"] for g, c in alone.items()}
            order = sorted(groups, key=lambda g: sensitivity[g])
            best = min(alone.values(), key=lambda c: c.gate["score"])
            chosen: list[str] = [order[0]]
            for group in order[1:]:
                if best.gate["passed"] or len(chosen) == len(groups) - 1:
                    break  # everything float would be the fp32 model itself
                chosen = [*chosen, group]
                candidate = attempt(chosen)
                if candidate.gate["score"] < best.gate["score"]:
                    best = candidate
        if not best.gate["passed"]:
            failed = [t for t, v in best.gate["tasks"].items() if not v["passed"]]
            raise QuantizationError(
                f"int8 fails the accuracy gate on {', '.join(failed)} even with {best.float_groups or 'nothing'} "
                f"kept float: " + "; ".join(best.gate["failures"]))
        os.replace(best.path, out)
    return {
        "format": "QDQ", "weights": "int8 per channel (7-bit range)", "activations": "uint8 per tensor",
        "calibration_method": "MinMax", "quantized_ops": list(QUANTIZED_OPS),
        "groups": {g: len(n) for g, n in groups.items()}, "float_groups": best.float_groups,
        "sensitivity_score_if_float": sensitivity, "tried": tried,
        "gate": {**best.gate, "limits": {t: asdict(v) for t, v in limits.items()},
                 "held_out_images": len(held_out), "reference": "the fp32 export of the same run"},
    }
