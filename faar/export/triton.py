"""The Triton side: ``config.pbtxt`` and installing one model version into a repository.

    REPO_DIR/<name>/config.pbtxt             Triton config (native ``onnxruntime`` backend)
    REPO_DIR/<name>/<version>/model.onnx     the graph
    REPO_DIR/<name>/<version>/manifest.json  what it means (``faar_serve.manifest``)

Decisions:

* ``config.pbtxt`` is shared by all versions of ``<name>``, so a folder holds versions of
  one model only (the same inputs and outputs), each with a faar-export manifest; an
  existing ``<name>/<version>/`` is replaced only when asked (``--overwrite``).
* Dynamic batching with a short queue delay, and a queue policy that drops a request
  still waiting when the deadline its caller sent has passed (the gateway sends one), so
  an overloaded server does not compute answers nobody waits for.
* A version is staged in a temporary folder beside REPO_DIR and renamed into place, so a
  failure never leaves a half-written model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from faar_serve.manifest import ManifestError, load_manifest

from .options import ExportError, ExportOptions
from .wrapper import TensorSpec

QUEUE_DELAY_US = 2000  # negligible next to a forward pass, enough to gather concurrent requests
TRITON_TYPES = {"uint8": "TYPE_UINT8", "float32": "TYPE_FP32"}


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
    if options.fft == "torch":
        lines.append("# This graph holds ONNX DFT nodes: they have no CUDA kernel and run on the CPU.")
    return "\n".join(line for line in lines if line) + "\n"


def write_config_pbtxt(path: str | os.PathLike, name: str, inputs: Sequence[TensorSpec],
                       outputs: Sequence[TensorSpec], options: ExportOptions) -> str:
    text = config_pbtxt(name, inputs, outputs, options)
    Path(path).write_text(text)
    return text


def check_destination(model_dir: Path, version: int, planned: Sequence[TensorSpec], overwrite: bool) -> list[str]:
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
    signature = [s.signature() for s in planned]
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
    if version in versions and not overwrite:
        raise ExportError(f"{model_dir / str(version)} already exists; "
                          "pass --overwrite or choose another --version")
    newest = max(versions)
    if version < newest:
        return [f"version {version} is older than version {newest} already in {model_dir}: with "
                f"version_policy latest 1 Triton keeps serving {newest}"]
    return []


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
