"""Run directory -> merged ONNX graph -> parity gate -> Triton model repository.

    REPO_DIR/<name>/config.pbtxt             Triton config (native ``onnxruntime`` backend)
    REPO_DIR/<name>/<version>/model.onnx     uint8 NHWC RGB pixels in, ready-to-use maps out
    REPO_DIR/<name>/<version>/manifest.json  tasks, outputs, classes, palette, units, ranks,
                                             parameter counts, options, parity, SHA-256

One module per step, each with its decisions: ``options`` (what can be asked),
``wrapper`` (the module that becomes the graph), ``graph`` (torch -> checked ONNX),
``parity`` (against PyTorch), ``precision`` / ``quantize`` / ``gate`` (fp16 and int8 graphs
behind task metrics), ``triton`` (config.pbtxt, destination checks, install) and
``manifest`` (built through ``faar_serve.manifest``, the schema the gateway reads).
``export_run`` below strings them together.

Decision: nothing is written to REPO_DIR before the saved file passed ``onnx.checker``
(full check), its fp32 graph matched the *unmerged* PyTorch model on rendered scenes and
random pixels at batch 1 and 2, a reduced-precision graph (``precision``: fp16, int8 via
``quantize``) passed the accuracy gate (``gate``), and its manifest passed the gateway's
schema. Work happens in a
temporary folder beside REPO_DIR and is renamed into place, so a failure leaves nothing
half-written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters import AdapterLinear
from ..backbone import BackboneError
from ..model import merge_model
from ..run import load_model
from .graph import assert_no_training_ops, export_onnx, torch_to_onnx
from .manifest import build_manifest, sha256_file
from .options import (
    DEFAULT_OPSET,
    FFT_BACKENDS,
    MIN_OPSET,
    DeviceKind,
    Exporter,
    ExporterChoice,
    ExportError,
    ExportOptions,
    resolve_exporter,
)
from .parity import TOLERANCES, Tolerance, check_parity, parity_batches
from .precision import preflight, reduce_precision
from .triton import check_destination, config_pbtxt, install, write_config_pbtxt
from .wrapper import INPUT_NAME, ExportWrapper, TensorSpec, build_export_module, input_spec, output_specs

__all__ = [
    "DEFAULT_OPSET", "FFT_BACKENDS", "INPUT_NAME", "MIN_OPSET", "TOLERANCES", "DeviceKind",
    "ExportError", "ExportOptions", "ExportResult", "ExportWrapper", "Exporter", "ExporterChoice", "TensorSpec",
    "Tolerance", "assert_no_training_ops", "build_export_module", "check_parity", "config_pbtxt", "export_onnx",
    "export_run", "input_spec", "output_specs", "parity_batches", "resolve_exporter", "sha256_file",
    "torch_to_onnx", "write_config_pbtxt",
]


@dataclass
class ExportResult:
    model_dir: Path
    version_dir: Path
    onnx_path: Path
    config_path: Path
    manifest_path: Path
    manifest: dict[str, Any]  # as written (JSON types); the schema is faar_serve.manifest.Manifest
    warnings: list[str] = field(default_factory=list)


def export_run(run_dir: str | os.PathLike, repo_dir: str | os.PathLike,
               options: ExportOptions | None = None) -> ExportResult:
    """Rebuild a run's model, merge its adapters, export, gate on parity, write the repository.

    Raises ``faar.run.RunError`` for a bad run directory and ``ExportError`` for
    everything else; in both cases REPO_DIR is unchanged.
    """
    t0 = time.perf_counter()
    options = options or ExportOptions()
    options.validate()
    run_dir, repo_dir = Path(run_dir), Path(repo_dir)
    if repo_dir.exists() and not repo_dir.is_dir():
        raise ExportError(f"{repo_dir} exists and is not a directory")
    model_dir = repo_dir / options.name
    model = load_model(run_dir).eval()
    if options.height is not None:
        try:
            model.set_input_size((options.height, options.width))
        except BackboneError as exc:
            raise ExportError(str(exc)) from exc
    preflight(run_dir, model, options)
    reference = build_export_module(model, options.probabilities)
    destination = check_destination(model_dir, options.version, reference.inputs + reference.outputs, options)
    found_warnings = destination.warnings
    if options.fft == "torch" and options.device_kind == "gpu":
        found_warnings.append("--fft torch on a GPU: ONNX Runtime's DFT has no CUDA kernel, "
                              "those nodes run on the CPU")
    merged = merge_model(model)
    merged.set_fft_backend(options.fft)
    assert not any(isinstance(m, AdapterLinear) for m in merged.modules())
    module = build_export_module(merged, options.probabilities)

    try:
        repo_dir.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{repo_dir.name}.export-", dir=repo_dir.parent))
    except OSError as exc:
        raise ExportError(f"cannot write beside {repo_dir}: {exc}") from exc
    try:
        staged_model = work / options.name
        staged = staged_model / str(options.version)
        staged.mkdir(parents=True)
        onnx_path = staged / "model.onnx"
        fp32_path = onnx_path if options.precision == "fp32" else work / "fp32.onnx"
        graph = export_onnx(module, fp32_path, options.opset, False, options.exporter)
        parity = check_parity(fp32_path, reference, parity_batches(model.img_size), TOLERANCES["fp32"],
                              options.parity_device)
        if not parity["passed"]:
            raise ExportError("parity check failed, nothing written: " + "; ".join(parity["failures"]))
        # every export states its precision, quantisation and gate (None: not applicable)
        graph.update(precision=options.precision, quantization=None)
        parity["gate"] = None
        if options.precision != "fp32":
            reduced = reduce_precision(fp32_path, onnx_path, run_dir, model, module, options)
            graph.update(reduced["graph"], fp16=options.precision == "fp16", quantization=reduced["quantization"])
            if options.precision == "fp16":  # fp16 also keeps a (looser) parity check against PyTorch
                parity = check_parity(onnx_path, reference, parity_batches(model.img_size), TOLERANCES["fp16"],
                                      options.parity_device)
                if not parity["passed"]:
                    raise ExportError("parity check failed, nothing written: " + "; ".join(parity["failures"]))
            parity["gate"] = reduced["gate"]
        manifest = build_manifest(run_dir, model, merged, module, options, onnx_path, graph, parity, t0)
        (staged / "manifest.json").write_text(manifest.to_json())
        write_config_pbtxt(staged_model / "config.pbtxt", options.name, module.inputs, module.outputs,
                           options, {**destination.manifests, options.version: manifest})
        try:
            install(staged_model, model_dir, options.version, work / "replaced")
        except OSError as exc:  # e.g. another export created the same version meanwhile
            raise ExportError(f"cannot move the export into {model_dir}: {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    version_dir = model_dir / str(options.version)
    return ExportResult(model_dir, version_dir, version_dir / "model.onnx", model_dir / "config.pbtxt",
                        version_dir / "manifest.json", manifest.model_dump(mode="json"), found_warnings)
