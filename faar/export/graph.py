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
* fp16 keeps the graph's input and output types and every node of the decoder's spectral
  blocks (``TaskSpectralBlock``: DFT MatMuls or DFT nodes, filters, masks, inverse) in
  fp32, as ``faar/spectral.py`` does under AMP: a spectrum's zero-frequency bin is a sum
  over the whole feature map (about 459 at 16x16 in the demo), and fp16's headroom below
  65504 shrinks with the input size. Blocking only the ``DFT`` op left the MatMul DFT in
  fp16. The blocks are found by name scope (``spectral_nodes``): TorchScript names nodes
  ``/model/decoder/spectral.3/...``; dynamo nodes carry their module path in metadata,
  which ONNX Runtime's optimiser drops, so it is written into their names first.
* TensorRT takes UINT8 only as a network input or output, so the uint8 image must reach
  nothing but its cast to float (``ExportWrapper`` casts before transposing); the dynamo
  graph also reads the input's shape for the dynamic batch, which ``read_input_through_cast``
  points at the cast's output (same shape).
* The saved file must pass ``onnx.checker`` (full check) with the planned I/O types and
  shapes, and hold no adapter, magnitude or rank-gate tensor name (a merge bug).
"""

from __future__ import annotations

import ast
import os
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from ..spectral import DFT2, TaskSpectralBlock
from .options import DEFAULT_OPSET, MIN_OPSET, Exporter, ExporterChoice, ExportError, resolve_exporter
from .wrapper import INPUT_NAME, ExportWrapper, TensorSpec

FORBIDDEN_NAME_PARTS = ("lora", "magnitude", "gate")
ONNX_TYPES = {"uint8": onnx.TensorProto.UINT8, "float32": onnx.TensorProto.FLOAT}
DYNAMO_SCOPES = "pkg.torch.onnx.name_scopes"  # node metadata of the dynamo exporter: module paths, then the op


def _uses_torch_fft(module: nn.Module) -> bool:
    return any(isinstance(m, DFT2) and m.backend == "torch" for m in module.modules())


def export_onnx(module: ExportWrapper, path: str | os.PathLike, opset: int | None = None, fp16: bool = False,
                exporter: ExporterChoice = "auto") -> dict[str, Any]:
    """Write ``module`` as a checked ONNX file at ``path``; returns what was done
    (the fields of ``faar_serve.manifest.GraphInfo``).

    Export (``resolve_exporter``), ONNX Runtime's basic offline optimisation, optional
    fp16 conversion (I/O types and the spectral blocks stay fp32), exact I/O shapes with a
    symbolic batch axis, the adapter-name assertion, ``onnx.checker.check_model(full_check=True)``.
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
            if chosen == "dynamo":
                scoped = onnx.load(str(raw))
                name_nodes_by_scope(scoped)
                onnx.save(scoped, str(raw))
            export_s = time.perf_counter() - t0
            session_options = ort.SessionOptions()
            session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            session_options.optimized_model_filepath = str(path)
            ort.InferenceSession(str(raw), session_options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # exporters and onnxruntime raise many types; all mean "no graph"
            raise ExportError(f"ONNX export ({chosen}, opset {opset}) failed: {exc}") from exc
    proto = onnx.load(str(path))
    read_input_through_cast(proto, module.inputs[0].name)
    if fp16:
        proto = to_fp16(proto, spectral_scopes(module))
    return {"exporter": chosen, "export_seconds": round(export_s, 2), "fp16": fp16,
            **finish_graph(proto, path, module.inputs + module.outputs),
            "seconds": round(time.perf_counter() - t0, 2)}


def finish_graph(proto: onnx.ModelProto, path: str | os.PathLike, specs: Sequence[TensorSpec]) -> dict[str, Any]:
    """Declare exact I/O, prune opset imports, refuse training tensors, save to ``path`` and run
    ``onnx.checker`` (full); returns the graph's description (``GraphInfo`` fields). Every graph
    written (fp32, fp16, int8) ends here."""
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


def read_input_through_cast(proto: onnx.ModelProto, name: str) -> None:
    """Make the cast of input ``name`` to float its only reader: shape readers (Shape, Size)
    read the cast's output instead; anything else reading the raw input is refused."""
    readers = [n for n in proto.graph.node if name in n.input]
    casts = [n for n in readers if n.op_type == "Cast"
             and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in n.attribute)]
    if not casts:
        raise ExportError(f"the graph does not cast its input {name!r} to float first (TensorRT needs it)")
    cast = casts[0]
    for node in readers:
        if node is cast:
            continue
        if node.op_type not in ("Shape", "Size"):
            raise ExportError(f"{node.op_type} node {node.name!r} reads the uint8 input {name!r} "
                              "(TensorRT takes uint8 only through a cast)")
        node.input[:] = [cast.output[0] if i == name else i for i in node.input]
    nodes = proto.graph.node  # the cast reads only the graph input: first, so the order stays topological
    moved = onnx.NodeProto()
    moved.CopyFrom(cast)
    nodes.remove(cast)
    nodes.insert(0, moved)


def module_scope(path: str) -> str:
    """A module path as both exporters scope node names: ``model.decoder.spectral.3`` ->
    ``/model/decoder/spectral.3`` (an item of a ModuleList keeps its index after a dot)."""
    parts: list[str] = []
    for part in path.split("."):
        if part.isdigit() and parts:
            parts[-1] += "." + part
        else:
            parts.append(part)
    return "/" + "/".join(parts)


def name_nodes_by_scope(proto: onnx.ModelProto) -> None:
    """Prefix each dynamo node's name with its module's scope, as TorchScript names them
    (the metadata holding it does not survive ONNX Runtime's optimiser; names do)."""
    for node in proto.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = ast.literal_eval(meta[DYNAMO_SCOPES]) if DYNAMO_SCOPES in meta else []
        if len(scopes) >= 2 and scopes[-2]:  # [..., deepest module path, op]; "" at the top level
            node.name = f"{module_scope(scopes[-2])}/{node.name}"


def spectral_scopes(module: nn.Module) -> list[str]:
    """Node-name scopes of the decoder's spectral blocks in ``module``'s graph."""
    return [module_scope(name) for name, m in module.named_modules() if isinstance(m, TaskSpectralBlock)]


def _reachable(start: Iterable[str], edges: dict[str, set[str]]) -> set[str]:
    seen = set(start)
    stack = list(seen)
    while stack:
        for nxt in edges[stack.pop()] - seen:
            seen.add(nxt)
            stack.append(nxt)
    return seen


def spectral_nodes(proto: onnx.ModelProto, scopes: Sequence[str]) -> list[str]:
    """Names of the nodes of each spectral block: those in its scope and any node the
    optimiser put between two of them (reachable from one and reaching another)."""
    producer = {out: n.name for n in proto.graph.node for out in n.output}
    succ: dict[str, set[str]] = defaultdict(set)
    pred: dict[str, set[str]] = defaultdict(set)
    for node in proto.graph.node:
        for name in node.input:
            if name in producer:
                succ[producer[name]].add(node.name)
                pred[node.name].add(producer[name])
    found: set[str] = set()
    for scope in scopes:
        inside = {n.name for n in proto.graph.node if n.name.startswith(scope + "/")}
        if not inside:
            raise ExportError(f"no node of the spectral block {scope} in the graph (node names changed?); "
                              "refusing an fp16 export that might put spectra in fp16")
        found |= _reachable(inside, succ) & _reachable(inside, pred)
    return sorted(found)


def to_fp16(proto: onnx.ModelProto, spectral: Sequence[str]) -> onnx.ModelProto:
    """float16 weights and compute, except the graph's inputs and outputs and every node of the
    spectral blocks named by their scopes ``spectral``."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    converted = convert_float_to_float16(proto, keep_io_types=True,
                                         op_block_list=[*DEFAULT_OP_BLOCK_LIST, "DFT"],
                                         node_block_list=spectral_nodes(proto, spectral))
    # The converter appends the casts around blocked nodes at the end and leaves intermediate
    # types as they were: drop those (the checker infers them again) and restore the node order.
    del converted.graph.value_info[:]
    model = OnnxModel(converted)
    model.topological_sort()
    return model.model


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
