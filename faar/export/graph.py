"""torch -> a checked, portable ONNX file: export, basic optimisation, fp16, exact I/O.

Decisions:

* Exporter: dynamo where the graph holds torch.fft (the only exporter of FFTs),
  TorchScript for matmul graphs (``--exporter`` overrides). Both give the same ops
  (MatMul, Conv, LayerNormalization, ...) and the same ONNX Runtime latency on CPU
  (tiny, batch 4: 33 vs 34 ms; Swin-T at 448, batch 1, best of 6: 0.95 vs 1.09 s); the
  dynamo graph is leaner (Swin-T: 1849 vs 2956 nodes, the extra ones int64 shape
  arithmetic for the dynamic batch), but dynamo exports 3-7x slower (tiny: 45 vs 6 s,
  Swin-T: 43-49 vs 12-16 s on 2 cores), which the test-suite and the demo pay each run.
  The TorchScript exporter is deprecated upstream; the dynamo path is exercised by every
  ``--fft torch`` export, so switching is one option away. Dynamo runs with
  ``optimize=False``: onnxscript's rewrite rules take minutes on this graph and the basic
  pass below does the cleanup.
* ONNX Runtime's *basic* offline optimisation (constant folding, redundant nodes) halves
  the node count (tiny, TorchScript: 5928 -> 2842) and keeps standard ONNX ops, so the
  saved file stays portable to any execution provider and to TensorRT; the extended and
  all levels would bake in CPU-specific fused kernels.
* fp16 keeps the graph's input and output types and runs ``DFT`` nodes and the decoder's
  spectral blocks (the DFT as MatMuls, the filters) in fp32 (``to_fp16``).
* The saved file must pass ``onnx.checker`` (full check) with the planned I/O types and
  shapes, and hold no adapter, magnitude or rank-gate tensor name (a merge bug).
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from ..spectral import DFT2
from .options import DEFAULT_OPSET, MIN_OPSET, Exporter, ExporterChoice, ExportError, resolve_exporter
from .wrapper import INPUT_NAME, ExportWrapper, TensorSpec

FORBIDDEN_NAME_PARTS = ("lora", "magnitude", "gate")
ONNX_TYPES = {"uint8": onnx.TensorProto.UINT8, "float32": onnx.TensorProto.FLOAT}


def _uses_torch_fft(module: nn.Module) -> bool:
    return any(isinstance(m, DFT2) and m.backend == "torch" for m in module.modules())


def export_onnx(module: ExportWrapper, path: str | os.PathLike, opset: int | None = None, fp16: bool = False,
                exporter: ExporterChoice = "auto") -> dict[str, Any]:
    """Write ``module`` as a checked ONNX file at ``path``; returns what was done
    (the fields of ``faar_serve.manifest.GraphInfo``).

    Export (``resolve_exporter``), ONNX Runtime's basic offline optimisation, optional
    fp16 conversion (I/O types and DFT stay fp32), exact I/O shapes with a symbolic batch
    axis, the adapter-name assertion, ``onnx.checker.check_model(full_check=True)``.
    """
    path = Path(path)
    chosen = resolve_exporter(exporter, _uses_torch_fft(module))
    opset = opset or DEFAULT_OPSET
    if opset < MIN_OPSET[chosen]:
        raise ExportError(f"the {chosen} exporter needs opset >= {MIN_OPSET[chosen]}, got {opset}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # the raw export never lands beside the result
        raw = Path(tmp) / "raw.onnx"
        try:
            _torch_export(module, raw, chosen, opset)
            export_s = time.perf_counter() - t0
            session_options = ort.SessionOptions()
            session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            session_options.optimized_model_filepath = str(path)
            ort.InferenceSession(str(raw), session_options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # exporters and onnxruntime raise many types; all mean "no graph"
            raise ExportError(f"ONNX export ({chosen}, opset {opset}) failed: {exc}") from exc
    proto = onnx.load(str(path))
    if fp16:
        proto = to_fp16(proto)
    return {"exporter": chosen, "export_seconds": round(export_s, 2), "fp16": fp16,
            **finish_graph(proto, path, module.inputs + module.outputs),
            "seconds": round(time.perf_counter() - t0, 2)}


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """float16 weights and compute; inputs, outputs, ``DFT`` and every node of the decoder's
    spectral blocks (``/spectral`` in the name) stay fp32: spectra are kept in fp32 (spectral.py),
    and the zero-frequency bin of a feature map grows with its size towards fp16's 65504."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    spectral = [n.name for n in proto.graph.node if "/spectral" in n.name]
    half = OnnxModel(convert_float_to_float16(proto, keep_io_types=True, node_block_list=spectral,
                                              op_block_list=[*DEFAULT_OP_BLOCK_LIST, "DFT"]))
    half.topological_sort()  # the converter appends the Casts it adds around blocked nodes at the end
    return half.model


def finish_graph(proto: onnx.ModelProto, path: str | os.PathLike, specs: Sequence[TensorSpec]) -> dict[str, Any]:
    """Declare exact I/O, prune opset imports, refuse training tensors, save to ``path`` and run
    ``onnx.checker`` (full); returns the graph's description (``GraphInfo`` fields)."""
    _prune_opset_imports(proto)
    _declare_io(proto, specs)
    assert_no_training_ops(proto)
    onnx.save(proto, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"the exported graph fails onnx.checker: {exc}") from exc
    return {
        "opset": next(o.version for o in proto.opset_import if o.domain == ""),
        "ir_version": proto.ir_version,
        "optimization": "onnxruntime basic (offline)",
        "nodes": len(proto.graph.node),
        "op_types": dict(sorted(Counter(n.op_type for n in proto.graph.node).items())),
        "initializer_elements": sum(int(np.prod(t.dims)) for t in proto.graph.initializer),
    }


def _torch_export(module: ExportWrapper, path: Path, exporter: Exporter, opset: int) -> None:
    h, w, _ = module.inputs[0].dims
    example = torch.zeros(2, h, w, 3, dtype=torch.uint8)  # batch 2: no 0/1 specialisation
    torch_to_onnx(module, example, path, exporter, opset, INPUT_NAME, [o.name for o in module.outputs])


def torch_to_onnx(module: torch.nn.Module, example: torch.Tensor, path: Path, exporter: Exporter, opset: int,
                  input_name: str, output_names: list[str], batch_dim: int = 0) -> None:
    """One-input ``module`` to ONNX with a dynamic batch axis ``batch_dim``, by either exporter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter, not actionable here
        if exporter == "dynamo":
            # optimize=False: onnxscript's rewrite rules take minutes here; the basic pass does the cleanup
            torch.onnx.export(module, (example,), path, dynamo=True, optimize=False, verbose=False,
                              opset_version=opset, input_names=[input_name], output_names=output_names,
                              dynamic_shapes={input_name: {batch_dim: torch.export.Dim("batch", min=1)}},
                              external_data=False)
        else:
            torch.onnx.export(module, (example,), path, dynamo=False, opset_version=opset,
                              input_names=[input_name], output_names=output_names,
                              dynamic_axes={n: {batch_dim: "batch"} for n in [input_name, *output_names]})


def _prune_opset_imports(proto: onnx.ModelProto) -> None:
    """ONNX Runtime's optimiser declares all its domains; keep the ones the graph uses."""
    used = {n.domain for n in proto.graph.node} | {""}
    keep = [o for o in proto.opset_import if o.domain in used]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)


def _declare_io(proto: onnx.ModelProto, specs: Sequence[TensorSpec]) -> None:
    """Exact I/O types and shapes (``batch`` + fixed dims); the full check then verifies them."""
    by_name = {s.name: s for s in specs}
    values = list(proto.graph.input) + list(proto.graph.output)
    found = {v.name for v in values}
    if found != set(by_name):
        raise ExportError(f"graph I/O {sorted(found)} differs from the planned {sorted(by_name)}")
    for v in values:
        spec = by_name[v.name]
        tensor = v.type.tensor_type
        if tensor.elem_type != ONNX_TYPES[spec.dtype]:
            got = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
            raise ExportError(f"graph {v.name!r} is {got}, planned {spec.dtype}")
        tensor.shape.Clear()
        tensor.shape.dim.add().dim_param = "batch"
        for d in spec.dims:
            tensor.shape.dim.add().dim_value = d


def assert_no_training_ops(proto: onnx.ModelProto) -> None:
    """Merged graphs hold no adapter, magnitude or rank-gate tensors; any such name is a bug."""
    g = proto.graph
    names = [n.name for n in g.node] + [x for n in g.node for x in (*n.input, *n.output)]
    names += [t.name for t in g.initializer] + [v.name for v in (*g.input, *g.output, *g.value_info)]
    bad = sorted({n for n in names if any(part in n.lower() for part in FORBIDDEN_NAME_PARTS)})
    if bad:
        raise ExportError(f"training-only tensors left in the graph: {bad[:5]}")
