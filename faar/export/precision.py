"""fp16 and int8 graphs from the checked fp32 graph, each behind the accuracy gate (``gate``).

Decisions:

* Both start from the fp32 graph that passed parity against the unmerged PyTorch model, so
  what the gate measures is the precision alone.
* fp16 keeps its parity check against PyTorch (``parity.TOLERANCES["fp16"]``) and adds the
  metric gate when the run carries its data (``config.yaml``); a run without it exports as
  before and the manifest has no gate. int8 always needs the data: calibration and the
  gate both read it, and without a gate an int8 graph is not written.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from ..config import Config
from ..evaluation import Sample, evaluate, onnx_predictor
from ..model import FAARModel
from .gate import (
    Limit,
    calibration_images,
    cpu_description,
    gate_limits,
    held_out,
    judge,
    parse_limit,
    run_config,
)
from .graph import finish_graph, spectral_scopes, to_fp16
from .options import ExportError, ExportOptions
from .quantize import quantize_with_gate
from .wrapper import INPUT_NAME, ExportWrapper


def limits_from(options: ExportOptions) -> dict[str, Limit]:
    limits = dict(parse_limit(text) for text in options.gate)
    if len(limits) != len(options.gate):
        raise ExportError(f"--gate names a task twice: {list(options.gate)}")
    return limits


def preflight(run_dir: Path, model: FAARModel, options: ExportOptions) -> None:
    """What can be checked before minutes of export: the limits, the run's data, the folder."""
    if options.precision == "fp32":
        return
    unknown = sorted(set(limits_from(options)) - set(model.tasks))
    if unknown:
        raise ExportError(f"--gate names task(s) {unknown} that the model does not have ({list(model.tasks)})")
    if options.precision == "int8":
        run_config(run_dir, options.data_root)
        if options.calibration != "run" and not Path(options.calibration).is_dir():
            raise ExportError(f"--calibration {options.calibration}: not 'run' and not a folder")


def graph_metrics(path: Path, model: FAARModel, held: list[Sample]) -> dict[str, dict[str, float]]:
    return evaluate({"graph": onnx_predictor(path, model.tasks, INPUT_NAME)}, model.tasks, held)[0]["graph"]


def gate_record(result: Mapping[str, Any], limits: Mapping[str, Limit], cfg: Config, images: int) -> dict[str, Any]:
    """The judged result as ``faar_serve.manifest.AccuracyGate`` fields."""
    return {**result, "limits": {t: {"worse_by": v.worse_by, "relative": v.relative} for t, v in limits.items()},
            "data": f"{cfg.data.dataset} {cfg.data.val_split}", "images": images,
            "runtime": f"onnxruntime {ort.__version__} (CPU, the gateway's session settings)",
            "cpu": cpu_description()}


def reduce_precision(fp32: Path, out: Path, run_dir: Path, model: FAARModel, module: ExportWrapper,
                     options: ExportOptions) -> dict[str, Any]:
    """Write the ``options.precision`` graph of ``fp32`` at ``out`` if it passes the gate.

    Returns ``{"graph": GraphInfo fields of out, "gate": AccuracyGate fields or None,
    "quantization": Quantization fields or None}``; raises ``ExportError`` otherwise.
    """
    limits = limits_from(options)
    specs = module.inputs + module.outputs
    has_data = (run_dir / "config.yaml").is_file()
    if options.precision == "fp16":
        graph = finish_graph(to_fp16(onnx.load(str(fp32)), spectral_scopes(module)), out, specs)
        if not has_data:
            return {"graph": graph, "gate": None, "quantization": None}
        cfg = run_config(run_dir, options.data_root)
        held = held_out(cfg, list(model.tasks), model.img_size, options.gate_images)
        reference = graph_metrics(fp32, model, held)
        limits = gate_limits(list(model.tasks), {t: next(iter(m)) for t, m in reference.items()}, limits)
        result = judge(reference, graph_metrics(out, model, held), limits)
        if not result["passed"]:
            failed = [t for t, v in result["tasks"].items() if not v["passed"]]
            raise ExportError(f"fp16 fails the accuracy gate on {', '.join(failed)} (nothing written): "
                              + "; ".join(result["failures"]))
        return {"graph": graph, "gate": gate_record(result, limits, cfg, len(held)), "quantization": None}
    cfg = run_config(run_dir, options.data_root)
    tasks = list(model.tasks)
    calibration = calibration_images(options.calibration, cfg, tasks, model.img_size, options.calibration_images)
    held = held_out(cfg, tasks, model.img_size, options.gate_images)
    record = quantize_with_gate(fp32, out, INPUT_NAME, model.tasks, calibration, held, limits)
    graph = finish_graph(onnx.load(str(out)), out, specs)
    source = (f"{cfg.data.dataset} {cfg.data.train_split}" if options.calibration == "run"
              else str(Path(options.calibration).resolve()))
    gate = gate_record(record.pop("gate"), record.pop("limits"), cfg, len(held))
    quantization = {**record, "calibration": {"source": source, "images": len(calibration)}}
    return {"graph": graph, "gate": gate, "quantization": quantization}
