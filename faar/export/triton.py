"""The Triton side: ``config.pbtxt`` and installing one model version into a repository.

    REPO_DIR/<name>/config.pbtxt             Triton config (native ``onnxruntime`` backend)
    REPO_DIR/<name>/<version>/model.onnx     the graph
    REPO_DIR/<name>/<version>/manifest.json  what it means (``faar_serve.manifest``)

Decisions:

* ``config.pbtxt`` is shared by all versions of ``<name>``, so a folder holds versions of
  one model only (the same inputs and outputs, the same device kind), each with a
  faar-export manifest; an existing ``<name>/<version>/`` is replaced only when asked
  (``--overwrite``). A GPU export under a CPU model's name (or the reverse) is refused:
  rewriting the shared instance kind would make every version unloadable on the other
  machine, hence the default names ``faar`` (cpu) and ``faar_gpu`` (gpu).
* ``config.pbtxt`` carries every version's manifest as a parameter
  ``faar_manifest_v<version>`` (compact JSON), so a gateway that talks only to Triton
  reads it through Triton's model-config API (``faar_serve.manifest``). One parameter per
  version because the file is shared: the gateway picks the one of the version Triton has
  ready. Compact JSON, not compressed: about 20 kB per version for Swin-T (93 adapted
  layers), which Triton's text-format parser, its HTTP/JSON and gRPC config answers and the
  Python backend all take as it is, and which stays readable with ``curl .../config``; the
  text is escaped with protobuf's own C escaping (quotes, backslashes, non-ASCII bytes).
* Dynamic batching with a short queue delay, and a queue policy that rejects a request
  still queued after its timeout. Triton honours a request's own timeout (the gateway
  sends its deadline) only when it is *smaller* than ``default_timeout_microseconds``; left
  at 0 it ignores every request timeout and never drops anything (triton-inference-server/
  core, ``src/scheduler_utils.cc``, ``PriorityQueue::PolicyQueue::Enqueue``). So the
  default is set (``--queue-timeout-s``, 10 s like the gateway's deadline).
* GPU models name the CUDA execution provider with TF32 off (``--tf32`` turns it on):
  ONNX Runtime enables TF32 by default on Ampere and newer (``use_tf32{true}`` in
  ``onnxruntime/core/providers/cuda/cuda_execution_provider_info.h``), which rounds fp32
  MatMul/Conv inputs to 10-bit mantissas, so the server would not compute what the parity
  gate checked. Triton's ONNX Runtime backend takes a ``"cuda"`` accelerator with any CUDA
  option since 24.07 (onnxruntime_backend PR 256); compose.yaml runs 24.10.
* No CUDA graphs: ONNX Runtime replays a captured graph only with the same input shapes
  and buffers, while Triton's dynamic batching changes the batch size and binds each
  request's buffers; the backend has no supported switch for it (onnxruntime_backend
  issue 168, open), so the option is not offered.
* TensorRT stays a comment with FP32 precision: its FP16 mode would run the decoder's
  spectral MatMuls in fp16 (their zero-frequency bins grow with the feature size toward
  fp16's 65504; ``faar/spectral.py`` keeps spectra fp32) and LayerNorm
  (``trt_layer_norm_fp32_fallback`` rescues only that); ONNX Runtime's TensorRT options have
  no per-layer precision. For fp16 on a GPU export with ``--fp16``, which keeps every
  spectral node fp32 in the graph. Engines are cached in a writable path (the repository
  is mounted read-only): mount a volume there to keep them across container starts.
* A version is staged in a temporary folder beside REPO_DIR and renamed into place, so a
  failure never leaves a half-written model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_encoding

from faar_serve.manifest import Manifest, ManifestError, load_manifest, manifest_parameter

from .options import DEFAULT_NAMES, ExportError, ExportOptions
from .wrapper import TensorSpec

QUEUE_DELAY_US = 2000  # negligible next to a forward pass, enough to gather concurrent requests
TRITON_TYPES = {"uint8": "TYPE_UINT8", "float32": "TYPE_FP32"}
TRT_CACHE_ROOT = "/tmp/trt_cache"  # writable in NVIDIA's container; mount a volume to keep engines


def _pbtxt_string(text: str) -> str:
    """``text`` as a quoted protobuf text-format string (C escapes, ASCII only)."""
    return '"' + text_encoding.CEscape(text, as_utf8=False) + '"'


def _gpu_section(name: str, image: TensorSpec, mbs: int, tf32: bool) -> list[str]:
    shape = "x".join(map(str, image.dims))
    return [
        "# CUDA execution provider. TF32 off: fp32 MatMul/Conv compute what the parity gate checked",
        "# (ONNX Runtime's default is on for Ampere and newer). The 'cuda' accelerator needs Triton >= 24.07.",
        "# No CUDA graphs: dynamic batching changes shapes and buffers (onnxruntime_backend issue 168).",
        "optimization { execution_accelerators { gpu_execution_accelerator: [",
        "  {",
        '    name: "cuda"',
        f'    parameters {{ key: "use_tf32" value: "{int(tf32)}" }}',
        "  }",
        "  # TensorRT through ONNX Runtime: uncomment, comma included. FP32 on purpose: FP16 here would",
        "  # also run the spectral MatMuls in fp16 (export with --fp16 instead, which keeps them fp32).",
        "  # The engine cache must be writable (the repository is mounted read-only); mount a volume",
        "  # there to keep engines across restarts. UINT8 is only the graph's input and output.",
        "  # , {",
        '  #   name: "tensorrt"',
        '  #   parameters { key: "precision_mode" value: "FP32" }',
        '  #   parameters { key: "trt_layer_norm_fp32_fallback" value: "1" }',
        '  #   parameters { key: "max_workspace_size_bytes" value: "4294967296" }',
        '  #   parameters { key: "trt_engine_cache_enable" value: "1" }',
        f'  #   parameters {{ key: "trt_engine_cache_path" value: "{TRT_CACHE_ROOT}/{name}" }}',
        f'  #   parameters {{ key: "trt_profile_min_shapes" value: "{image.name}:1x{shape}" }}',
        f'  #   parameters {{ key: "trt_profile_opt_shapes" value: "{image.name}:{mbs}x{shape}" }}',
        f'  #   parameters {{ key: "trt_profile_max_shapes" value: "{image.name}:{mbs}x{shape}" }}',
        "  # }",
        "] } }",
    ]


def config_pbtxt(name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 options: ExportOptions, manifests: Mapping[int, Manifest] | None = None) -> str:
    """Triton model configuration text for the native ``onnxruntime`` backend; ``manifests``
    (version -> manifest) become the ``faar_manifest_v<version>`` parameters."""
    def tensor(spec: TensorSpec) -> str:
        dims = ", ".join(map(str, spec.dims))
        return (f'  {{\n    name: "{spec.name}"\n    data_type: {TRITON_TYPES[spec.dtype]}\n'
                f"    dims: [ {dims} ]\n  }}")

    mbs = options.max_batch_size
    preferred = sorted({b for b in (2, 4, 8, 16, 32, 64) if b < mbs} | ({mbs} if mbs > 1 else set()))
    image = inputs[0]
    lines = [
        "# Written by faar-export. Tasks, classes, palette, units and parity: <version>/manifest.json,",
        "# also in the parameters faar_manifest_v<version> below, for a gateway that reads it from Triton.",
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
        "  # A request still queued after its timeout is rejected, not run. Triton takes a request's own",
        "  # timeout (the gateway sends its deadline) only when it is below default_timeout_microseconds;",
        "  # at 0 every request timeout is ignored (triton core src/scheduler_utils.cc, PolicyQueue::Enqueue).",
        "  default_queue_policy {",
        "    timeout_action: REJECT",
        f"    default_timeout_microseconds: {round(options.queue_timeout_s * 1e6)}",
        "    allow_timeout_override: true",
        "  }",
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
    ]
    if options.device_kind == "gpu":
        lines += _gpu_section(name, image, mbs, options.tf32)
    if options.fft == "torch":
        lines.append("# This graph holds ONNX DFT nodes: they have no CUDA kernel and run on the CPU.")
    for version, manifest in sorted((manifests or {}).items()):
        value = _pbtxt_string(manifest.to_json(compact=True))
        lines.append(f'parameters {{ key: "{manifest_parameter(version)}" value: {{ string_value: {value} }} }}')
    return "\n".join(line for line in lines if line) + "\n"


def write_config_pbtxt(path: str | os.PathLike, name: str, inputs: Sequence[TensorSpec],
                       outputs: Sequence[TensorSpec], options: ExportOptions,
                       manifests: Mapping[int, Manifest] | None = None) -> str:
    text = config_pbtxt(name, inputs, outputs, options, manifests)
    Path(path).write_text(text)
    return text


@dataclass
class Destination:
    """What ``<name>/`` already holds, checked: the other versions' manifests (config.pbtxt
    carries them all) and warnings for the user."""

    manifests: dict[int, Manifest] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def check_destination(model_dir: Path, version: int, planned: Sequence[TensorSpec], options: ExportOptions
                      ) -> Destination:
    """Refuse what would mix models.

    ``<name>/`` may hold other versions of the *same* model (same inputs and outputs, same
    device kind: config.pbtxt is shared by all versions); each must carry a faar-export
    manifest. An existing ``<name>/<version>/`` needs ``options.overwrite``.
    """
    if model_dir.exists() and not model_dir.is_dir():
        raise ExportError(f"{model_dir} exists and is not a directory")
    if not model_dir.is_dir() or not any(model_dir.iterdir()):
        return Destination()
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        raise ExportError(f"{model_dir} is not empty and holds no model version written by faar-export; "
                          "choose another --name or remove it")
    signature = [s.signature() for s in planned]
    found = Destination()
    for v in versions:
        try:
            manifest = load_manifest(model_dir / str(v) / "manifest.json")
        except ManifestError as exc:
            raise ExportError(f"{model_dir / str(v)} was not written by faar-export (no readable manifest: "
                              f"{exc}); choose another --name") from exc
        theirs = [t.model_dump(include={"name", "dtype", "shape"}) for t in (*manifest.inputs, *manifest.outputs)]
        if theirs != signature:
            shapes = [t["name"] + str(t["shape"]) for t in theirs]
            raise ExportError(f"{model_dir} holds a different model (version {v} has inputs/outputs "
                              f"{shapes}); config.pbtxt is shared by all versions, so choose another --name")
        kind = manifest.export.options.device_kind
        if kind != options.device_kind:
            raise ExportError(
                f"{model_dir} is a {kind} model (version {v}); config.pbtxt and its instance kind are shared "
                f"by every version, so a {options.device_kind} export there would leave none of them loadable "
                f"on a {kind} server. Export under another --name (without --name: "
                f"{DEFAULT_NAMES[options.device_kind]!r} for --device-kind {options.device_kind})")
        if v != version:
            found.manifests[v] = manifest
    if version in versions and not options.overwrite:
        raise ExportError(f"{model_dir / str(version)} already exists; "
                          "pass --overwrite or choose another --version")
    newest = max(versions)
    if version < newest:
        found.warnings.append(f"version {version} is older than version {newest} already in {model_dir}: "
                              f"with version_policy latest 1 Triton keeps serving {newest}")
    return found


def install(staged_model: Path, model_dir: Path, version: int, trash: Path) -> None:
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
