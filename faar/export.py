"""Run directory -> merged ONNX graph -> parity gate -> Triton model repository.

    REPO_DIR/<name>/config.pbtxt             Triton config (native ``onnxruntime`` backend)
    REPO_DIR/<name>/<version>/model.onnx     uint8 NHWC RGB pixels in, ready-to-use maps out
    REPO_DIR/<name>/<version>/manifest.json  tasks, outputs, classes, palette, units, ranks,
                                             parameter counts, options, parity, SHA-256

Decisions:

* The graph takes what clients have: uint8 RGB pixels ``[B, H, W, 3]``; the cast and the
  ImageNet normalisation run inside it. H and W are fixed at export (the spectral filters
  are shaped to one feature size), the batch axis is dynamic.
* Outputs are post-processed in the graph by the task registry's own ``postprocess`` /
  ``activate`` inside ``ExportWrapper``, so PyTorch and ONNX run the same code: label maps
  as uint8 class indices, probabilities, unit normals and metric depth as float32.
* ``--fft matmul`` (the default) turns the decoder's 2-D DFTs into MatMuls with constant
  cos/sin matrices: ONNX Runtime's ``DFT`` operator has no CUDA kernel (it falls back to
  the CPU inside a GPU graph) and is 5-100x slower than torch.fft on CPU, while the
  MatMul form runs on every execution provider and in TensorRT. ``--fft dft`` keeps
  torch.fft and exports ONNX ``DFT``; both give the same maps (the parity gate checks).
* Exporter: dynamo where the graph holds torch.fft (the only exporter of FFTs),
  TorchScript for matmul graphs (``--exporter`` overrides). Both give the same ops
  (MatMul, Conv, LayerNormalization, ...) and the same ONNX Runtime latency on CPU
  (tiny, batch 4: 33 vs 34 ms; Swin-T at 448, batch 1, best of 6: 0.95 vs 1.09 s); the
  dynamo graph is leaner (Swin-T: 1849 vs 2956 nodes, the extra ones int64 shape
  arithmetic for the dynamic batch), but dynamo exports 3-7x slower (tiny: 45 vs 6 s,
  Swin-T: 43-49 vs 12-16 s on 2 cores), which the test-suite and the demo pay each run.
  The TorchScript exporter is deprecated upstream; the dynamo path is exercised by every
  ``--fft dft`` export, so switching is one option away. Dynamo runs with
  ``optimize=False``: onnxscript's rewrite rules take minutes on this graph and the basic
  pass below does the cleanup.
* ONNX Runtime's *basic* offline optimisation (constant folding, redundant nodes) halves
  the node count (tiny, TorchScript: 5928 -> 2842) and keeps standard ONNX ops, so the
  saved file stays portable to any execution provider and to TensorRT; the extended and
  all levels would bake in CPU-specific fused kernels.
* Nothing is written to REPO_DIR before the saved file passed ``onnx.checker`` (full
  check) and matched the *unmerged* PyTorch model on rendered scenes and random pixels at
  batch 1 and 2. Work happens in a temporary folder beside REPO_DIR and is renamed into
  place, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from . import __version__
from .adapters import AdapterLinear, adapters_of
from .backbone import BackboneError
from .model import IMAGENET_MEAN, IMAGENET_STD, FAARModel, merge_model, parameter_summary
from .run import MODEL_FILE, load_model
from .spectral import DFT2, FFTBackend
from .tasks import TaskSpec, palette

FFTMode = Literal["matmul", "dft"]
DeviceKind = Literal["gpu", "cpu"]
Exporter = Literal["torchscript", "dynamo"]
ExporterChoice = Literal["auto", "torchscript", "dynamo"]

FFT_BACKENDS: dict[str, FFTBackend] = {"matmul": "matmul", "dft": "torch"}
INPUT_NAME = "image"
MANIFEST_FORMAT = 1
# LayerNormalization needs opset 17; the dynamo exporter's op library starts at 18.
MIN_OPSET: dict[Exporter, int] = {"torchscript": 17, "dynamo": 18}
DEFAULT_OPSET = 18
# Label maps are uint8 and 255 is the datasets' "ignore" label, so 255 classes at most.
MAX_CLASSES = 255
FORBIDDEN_NAME_PARTS = ("lora", "magnitude", "gate")
QUEUE_DELAY_US = 2000  # negligible next to a forward pass, enough to gather concurrent requests
TRITON_TYPES = {"uint8": "TYPE_UINT8", "float32": "TYPE_FP32"}
ONNX_TYPES = {"uint8": onnx.TensorProto.UINT8, "float32": onnx.TensorProto.FLOAT}


class ExportError(ValueError):
    """An export that cannot be done as asked; nothing was written."""


@dataclass(frozen=True)
class Tolerance:
    """Parity limits against the unmerged fp32 PyTorch model, over every pixel of every batch."""

    max_abs: float  # continuous maps (probabilities, normals, depth in metres): worst pixel
    mean_abs: float  # continuous maps: mean over pixels (catches small errors everywhere)
    min_label_agreement: float  # share of label-map pixels with the same class


# fp32: the merge and the matmul DFT agree with eager PyTorch to ~1e-6, so these only
# catch real faults. fp16: rounding accumulates through the backbone (Swin-T at 448:
# 0.037 worst pixel on normals, where normalising a short raw vector amplifies it) and
# near-tied logits flip classes on a few pixels (99.8 % agree).
TOLERANCES = {"fp32": Tolerance(1e-3, 1e-4, 0.999), "fp16": Tolerance(0.1, 5e-3, 0.98)}


@dataclass
class ExportOptions:
    name: str = "faar"
    version: int = 1
    height: int | None = None  # None: the run's img_size
    width: int | None = None
    fft: FFTMode = "matmul"
    fp16: bool = False
    max_batch_size: int = 8
    device_kind: DeviceKind = "cpu"
    opset: int | None = None  # None: DEFAULT_OPSET
    probabilities: bool = False  # also <task>_probs for label tasks
    overwrite: bool = False
    exporter: ExporterChoice = "auto"  # auto: torchscript for matmul, dynamo for dft

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ExportError(f"model name {self.name!r}: use letters, digits, '_', '.', '-' "
                              "(it names a folder)")
        if self.version < 1:
            raise ExportError(f"version must be a positive integer (Triton ignores 0), got {self.version}")
        if (self.height is None) != (self.width is None):
            raise ExportError("give both --height and --width, or neither (the run's size)")
        if self.height is not None and any(d < 32 or d % 32 for d in (self.height, self.width)):
            raise ExportError(f"input size {self.height}x{self.width}: height and width must be positive "
                              "multiples of 32 (Swin's patch embedding and three patch mergings)")
        if self.fft not in FFT_BACKENDS:
            raise ExportError(f"fft must be one of {sorted(FFT_BACKENDS)}, got {self.fft!r}")
        if self.max_batch_size < 1:
            raise ExportError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.device_kind not in ("gpu", "cpu"):
            raise ExportError(f"device_kind must be 'gpu' or 'cpu', got {self.device_kind!r}")
        if self.exporter not in ("auto", "torchscript", "dynamo"):
            raise ExportError(f"exporter must be auto, torchscript or dynamo, got {self.exporter!r}")
        exporter = resolve_exporter(self.exporter, torch_fft=self.fft == "dft")
        if self.opset is not None and self.opset < MIN_OPSET[exporter]:
            raise ExportError(f"opset {self.opset} is too old for the {exporter} exporter "
                              f"(needs >= {MIN_OPSET[exporter]})")


def resolve_exporter(choice: ExporterChoice, torch_fft: bool) -> Exporter:
    """``auto``: dynamo where the graph holds torch.fft (the only exporter of it), else TorchScript."""
    if choice == "torchscript" and torch_fft:
        raise ExportError("the TorchScript exporter cannot export torch.fft; "
                          "use --fft matmul or the dynamo exporter")
    if choice == "auto":
        return "dynamo" if torch_fft else "torchscript"
    return choice


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


@dataclass
class ExportResult:
    model_dir: Path
    version_dir: Path
    onnx_path: Path
    config_path: Path
    manifest_path: Path
    manifest: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


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
    """uint8 NHWC RGB pixels -> the tuple of post-processed maps in ``self.outputs`` order.

    The parity reference (unmerged model) and the exported graph (merged model) are both
    this wrapper, so the gate compares exactly what merging and export change.
    """

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


def _uses_torch_fft(module: nn.Module) -> bool:
    return any(isinstance(m, DFT2) and m.backend == "torch" for m in module.modules())


def export_onnx(module: ExportWrapper, path: str | os.PathLike, opset: int | None = None, fp16: bool = False,
                exporter: ExporterChoice = "auto") -> dict[str, Any]:
    """Write ``module`` as a checked ONNX file at ``path``; returns what was done.

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
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        proto = convert_float_to_float16(proto, keep_io_types=True,
                                         op_block_list=[*DEFAULT_OP_BLOCK_LIST, "DFT"])
    _prune_opset_imports(proto)
    _declare_io(proto, module.inputs + module.outputs)
    assert_no_training_ops(proto)
    onnx.save(proto, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"the exported graph fails onnx.checker: {exc}") from exc
    return {
        "exporter": chosen,
        "opset": next(o.version for o in proto.opset_import if o.domain == ""),
        "ir_version": proto.ir_version,
        "optimization": "onnxruntime basic (offline)",
        "fp16": fp16,
        "nodes": len(proto.graph.node),
        "op_types": dict(sorted(Counter(n.op_type for n in proto.graph.node).items())),
        "initializer_elements": sum(int(np.prod(t.dims)) for t in proto.graph.initializer),
        "export_seconds": round(export_s, 2),
        "seconds": round(time.perf_counter() - t0, 2),
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


def parity_batches(size: tuple[int, int], seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """Batches of 1 and 2: rendered scenes (natural statistics) and uniform noise (every pixel value)."""
    from .data.scenes import render_scene

    rng = np.random.default_rng(seed)

    def noise() -> np.ndarray:
        return rng.integers(0, 256, (*size, 3), dtype=np.uint8)

    scene = [render_scene(seed + i, size=size)["image"] for i in range(2)]
    return [
        (f"scene {seed}", scene[0][None]),
        ("2 x random", np.stack([noise(), noise()])),
        (f"scene {seed + 1} + random", np.stack([scene[1], noise()])),
    ]


@torch.inference_mode()
def check_parity(onnx_path: str | os.PathLike, reference: ExportWrapper,
                 batches: Sequence[tuple[str, np.ndarray]], tolerance: Tolerance) -> dict[str, Any]:
    """Run the ONNX file in ONNX Runtime (CPU) and ``reference`` in PyTorch on the same batches.

    Per output, over all pixels of all batches: max and mean abs error (continuous maps)
    or the share of pixels with the same class (label maps). ``passed`` is False when any
    output is out of ``tolerance``, has another shape or dtype, or holds NaN.
    """
    session_options = ort.SessionOptions()
    # no busy-waiting ONNX Runtime threads stealing cores from PyTorch's in this process
    session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(onnx_path), session_options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ExportError(f"ONNX Runtime cannot load {onnx_path}: {exc}") from exc
    names = [o.name for o in reference.outputs]
    got_all = [session.run(names, {INPUT_NAME: batch}) for _, batch in batches]
    del session
    stats = {n: {"same": 0, "max": 0.0, "sum": 0.0, "count": 0} for n in names}
    failures = []
    for (label, batch), got in zip(batches, got_all, strict=True):
        want = reference(torch.from_numpy(batch))
        for spec, g, r in zip(reference.outputs, got, want, strict=True):
            r, st = r.numpy(), stats[spec.name]
            if g.shape != r.shape or g.dtype != r.dtype:
                failures.append(f"{spec.name}: {g.dtype}{list(g.shape)} where PyTorch gives "
                                f"{r.dtype}{list(r.shape)} ({label})")
                continue
            st["count"] += g.size
            if spec.role == "labels":
                st["same"] += int(np.count_nonzero(g == r))
            else:
                diff = np.abs(g.astype(np.float64) - r.astype(np.float64))
                st["max"] = float(np.maximum(st["max"], diff.max()))  # NaN propagates
                st["sum"] += float(diff.sum())
    results: dict[str, dict[str, float]] = {}
    for spec in reference.outputs:
        st = stats[spec.name]
        n = max(st["count"], 1)
        if spec.role == "labels":
            agree = st["same"] / n
            results[spec.name] = {"agreement": agree}
            if not agree >= tolerance.min_label_agreement:
                failures.append(f"{spec.name}: {agree:.3%} of pixels agree "
                                f"(need {tolerance.min_label_agreement:.1%})")
            continue
        worst, mean = st["max"], st["sum"] / n
        results[spec.name] = {"max_abs_error": worst, "mean_abs_error": mean}
        if not (worst <= tolerance.max_abs and mean <= tolerance.mean_abs):  # NaN fails
            failures.append(f"{spec.name}: abs error max {worst:.3g}, mean {mean:.3g} "
                            f"(limits {tolerance.max_abs:g}, {tolerance.mean_abs:g})")
    return {
        "passed": not failures,
        "failures": failures,
        "tolerance": dataclasses.asdict(tolerance),
        "inputs": [{"content": label, "batch": int(b.shape[0])} for label, b in batches],
        "outputs": results,
    }


def config_pbtxt(name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 options: ExportOptions) -> str:
    """Triton model configuration text for the native ``onnxruntime`` backend."""
    def tensor(spec: TensorSpec) -> str:
        dims = ", ".join(map(str, spec.dims))
        return (f'  {{\n    name: "{spec.name}"\n    data_type: {TRITON_TYPES[spec.dtype]}\n'
                f"    dims: [ {dims} ]\n  }}")

    mbs = options.max_batch_size
    preferred = sorted({b for b in (2, 4, 8, 16, 32, 64) if b < mbs} | ({mbs} if mbs > 1 else set()))
    image = inputs[0]
    shape = "x".join(map(str, image.dims))
    lines = [
        "# Written by faar-export; tasks, classes, palette, units and parity: <version>/manifest.json.",
        f'name: "{name}"',
        'backend: "onnxruntime"',
        f"max_batch_size: {mbs}",
        "# Triton serves the newest version; older version folders stay for rollback.",
        "version_policy: { latest: { num_versions: 1 } }",
        "input [\n" + ",\n".join(tensor(s) for s in inputs) + "\n]",
        "output [\n" + ",\n".join(tensor(s) for s in outputs) + "\n]",
        "dynamic_batching {",
        f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]" if preferred else "",
        f"  max_queue_delay_microseconds: {QUEUE_DELAY_US}",
        "  # requests carry the gateway's deadline; one still queued past it is dropped, not run",
        "  default_queue_policy { timeout_action: REJECT allow_timeout_override: true }",
        "}",
        "instance_group [",
        "  {",
        "    count: 1",
        f"    kind: KIND_{options.device_kind.upper()}",
        "  }",
        "]",
        "model_warmup [",
        "  {",
        '    name: "zeros"',
        "    batch_size: 1",
        "    inputs {",
        f'      key: "{image.name}"',
        "      value {",
        f"        data_type: {TRITON_TYPES[image.dtype]}",
        f"        dims: [ {', '.join(map(str, image.dims))} ]",
        "        zero_data: true",
        "      }",
        "    }",
        "  }",
        "]",
        "# GPU only (instance_group KIND_GPU). TensorRT through ONNX Runtime, engines cached:",
        "# optimization { execution_accelerators { gpu_execution_accelerator: [ {",
        '#   name: "tensorrt"',
        '#   parameters { key: "precision_mode" value: "FP16" }',
        '#   parameters { key: "max_workspace_size_bytes" value: "4294967296" }',
        '#   parameters { key: "trt_engine_cache_enable" value: "1" }',
        f'#   parameters {{ key: "trt_profile_min_shapes" value: "{image.name}:1x{shape}" }}',
        f'#   parameters {{ key: "trt_profile_opt_shapes" value: "{image.name}:{mbs}x{shape}" }}',
        f'#   parameters {{ key: "trt_profile_max_shapes" value: "{image.name}:{mbs}x{shape}" }}',
        "# } ] } }",
        "# CUDA graphs in the CUDA execution provider (every node on the GPU, so --fft matmul only;",
        "# ONNX Runtime captures one graph, so only when every batch has the same size):",
        "# optimization { execution_accelerators { gpu_execution_accelerator: [ {",
        '#   name: "cuda"',
        '#   parameters { key: "enable_cuda_graph" value: "1" }',
        "# } ] } }",
    ]
    if options.fft == "dft":
        lines.append("# This graph holds ONNX DFT nodes: they have no CUDA kernel and run on the CPU.")
    return "\n".join(line for line in lines if line) + "\n"


def write_config_pbtxt(path: str | os.PathLike, name: str, inputs: Sequence[TensorSpec],
                       outputs: Sequence[TensorSpec], options: ExportOptions) -> str:
    text = config_pbtxt(name, inputs, outputs, options)
    Path(path).write_text(text)
    return text


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _signature(inputs: Sequence[dict[str, Any]], outputs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: t[k] for k in ("name", "dtype", "shape")} for t in (*inputs, *outputs)]


def _check_destination(model_dir: Path, version: int, signature: list[dict[str, Any]],
                       overwrite: bool) -> list[str]:
    """Refuse what would mix models; returns warnings.

    ``<name>/`` may hold other versions of the *same* model (same inputs and outputs:
    config.pbtxt is shared by all versions); each must carry a faar-export manifest.
    An existing ``<name>/<version>/`` needs ``overwrite``.
    """
    if model_dir.exists() and not model_dir.is_dir():
        raise ExportError(f"{model_dir} exists and is not a directory")
    if not model_dir.is_dir() or not any(model_dir.iterdir()):
        return []
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        raise ExportError(f"{model_dir} is not empty and holds no model version written by faar-export; "
                          "choose another --name or remove it")
    for v in versions:
        manifest = model_dir / str(v) / "manifest.json"
        try:
            meta = json.loads(manifest.read_text())
            theirs = _signature(meta["inputs"], meta["outputs"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ExportError(f"{model_dir / str(v)} was not written by faar-export (no readable manifest: "
                              f"{exc}); choose another --name") from exc
        if theirs != signature:
            shapes = [t["name"] + str(t["shape"]) for t in theirs]
            raise ExportError(f"{model_dir} holds a different model (version {v} has inputs/outputs "
                              f"{shapes}); config.pbtxt is shared by all versions, so choose another --name")
    if version in versions and not overwrite:
        raise ExportError(f"{model_dir / str(version)} already exists; "
                          "pass --overwrite or choose another --version")
    newest = max(versions)
    if version < newest:
        return [f"version {version} is older than version {newest} already in {model_dir}: with "
                f"version_policy latest 1 Triton keeps serving {newest}"]
    return []


def _install(staged_model: Path, model_dir: Path, version: int, trash: Path) -> None:
    """Move the staged ``<name>/`` (config + one version) into place with renames only."""
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    if not model_dir.exists():
        os.rename(staged_model, model_dir)
        return
    target = model_dir / str(version)
    replacing = target.exists()  # --overwrite was checked before
    if replacing:
        os.rename(target, trash)
    try:
        os.rename(staged_model / str(version), target)
    except OSError:
        if replacing:
            os.rename(trash, target)
        raise
    os.replace(staged_model / "config.pbtxt", model_dir / "config.pbtxt")


def _layer_table(model: FAARModel) -> dict[str, dict[str, Any]]:
    """Per adapted linear: rank and parameters before (frozen + adapter) and after merge."""
    table = {}
    for name, a in adapters_of(model).items():
        base = sum(p.numel() for p in a.base.parameters())
        adapter = sum(p.numel() for n, p in a.named_parameters() if not n.startswith("base."))
        table[name] = {"group": a.group, "site": a.site, "kind": a.kind, "rank": a.rank,
                       "parameters_before": base + adapter, "parameters_after": base}
    return table


def _task_entry(spec: TaskSpec, outputs: Sequence[TensorSpec]) -> dict[str, Any]:
    entry: dict[str, Any] = {"kind": spec.kind, "description": spec.description, "channels": spec.channels,
                             "outputs": [o.name for o in outputs if o.task == spec.name]}
    if spec.kind == "labels":
        entry["classes"] = list(spec.classes)
        entry["palette"] = palette(spec.channels)
    elif spec.kind == "normals":
        entry["convention"] = spec.description
    elif spec.kind == "depth":
        entry["units"] = spec.units
    else:
        entry["range"] = [0.0, 1.0]
    return entry


def _manifest(run_dir: Path, model: FAARModel, merged: FAARModel, module: ExportWrapper,
              options: ExportOptions, onnx_path: Path, graph: dict[str, Any], parity: dict[str, Any],
              reference_fft: str) -> dict[str, Any]:
    h, w = model.img_size
    layers = _layer_table(model)
    ranks = [v["rank"] for v in layers.values()]
    before = parameter_summary(model)
    return {
        "format_version": MANIFEST_FORMAT,
        "model": {"name": options.name, "version": options.version},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {"run": str(run_dir.resolve()), "model_sha256": sha256_file(run_dir / MODEL_FILE),
                   "config": dataclasses.asdict(model.config)},
        "inputs": [{**s.signature(), "layout": "NHWC", "color": "RGB", "range": [0, 255],
                    "meaning": s.meaning,
                    "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                                      "formula": "(pixel / 255 - mean) / std per channel, inside the graph"}}
                   for s in module.inputs],
        "outputs": [{**s.signature(), "task": s.task, "meaning": s.meaning} for s in module.outputs],
        "input_size": [h, w],
        "tasks": {t: _task_entry(spec, module.outputs) for t, spec in model.tasks.items()},
        "ranks": {"layers": layers, "count": len(ranks), "total": sum(ranks), "min": min(ranks, default=0),
                  "max": max(ranks, default=0), "mean": round(sum(ranks) / len(ranks), 3) if ranks else 0.0},
        "parameters": {"note": "merged, each task owns a copy of a frozen linear its adapters shared",
                       "before_merge": before["total_parameters"],
                       "trainable_before_merge": before["trainable_parameters"],
                       "after_merge": sum(p.numel() for p in merged.parameters()),
                       "onnx_initializer_elements": graph["initializer_elements"]},
        "export": {"options": dataclasses.asdict(options), "fft_backend": FFT_BACKENDS[options.fft], **graph,
                   "versions": {"faar": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                                "onnxruntime": ort.__version__}},
        "parity": {"reference": {"model": "unmerged run model, eval mode, fp32", "fft_backend": reference_fft,
                                 "runtime": f"torch {torch.__version__}"},
                   "candidate": f"this model.onnx in onnxruntime {ort.__version__} (CPU)", **parity},
        "onnx": {"file": onnx_path.name, "sha256": sha256_file(onnx_path), "bytes": onnx_path.stat().st_size},
    }


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
    reference = build_export_module(model, options.probabilities)
    signature = _signature([s.signature() for s in reference.inputs],
                           [s.signature() for s in reference.outputs])
    found_warnings = _check_destination(model_dir, options.version, signature, options.overwrite)
    if options.fft == "dft" and options.device_kind == "gpu":
        found_warnings.append("--fft dft on a GPU: ONNX Runtime's DFT has no CUDA kernel, "
                              "those nodes run on the CPU")
    merged = merge_model(model)
    merged.set_fft_backend(FFT_BACKENDS[options.fft])
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
        graph = export_onnx(module, onnx_path, options.opset, options.fp16, options.exporter)
        tolerance = TOLERANCES["fp16" if options.fp16 else "fp32"]
        parity = check_parity(onnx_path, reference, parity_batches(model.img_size), tolerance)
        if not parity["passed"]:
            raise ExportError("parity check failed, nothing written: " + "; ".join(parity["failures"]))
        manifest = _manifest(run_dir, model, merged, module, options, onnx_path, graph, parity,
                             model.config.decoder.fft)
        manifest["export"]["total_seconds"] = round(time.perf_counter() - t0, 2)
        (staged / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        write_config_pbtxt(staged_model / "config.pbtxt", options.name, module.inputs, module.outputs,
                           options)
        try:
            _install(staged_model, model_dir, options.version, work / "replaced")
        except OSError as exc:  # e.g. another export created the same version meanwhile
            raise ExportError(f"cannot move the export into {model_dir}: {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    version_dir = model_dir / str(options.version)
    return ExportResult(model_dir, version_dir, version_dir / "model.onnx", model_dir / "config.pbtxt",
                        version_dir / "manifest.json", manifest, found_warnings)
