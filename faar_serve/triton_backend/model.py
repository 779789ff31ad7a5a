"""A Python-based Triton backend named ``onnxruntime``: serves ``<version>/model.onnx`` per config.pbtxt.

NVIDIA's Triton container runs exported repositories with its native ONNX Runtime backend.
The ``nvidia-pytriton`` wheel ships no such backend, so ``faar-triton`` installs this file as
``<backend-dir>/onnxruntime/model.py``; Triton then runs every ``backend: "onnxruntime"``
model through its Python backend, and the exported repository loads unchanged.

Runs inside Triton's Python stub: it imports only numpy, onnxruntime and Triton's utils.
Dynamic batching hands ``execute`` several requests; they run as one ONNX Runtime call
and the outputs are split back by each request's batch size.

Execution providers, as the native backend does it: a ``KIND_GPU`` instance runs on the
CUDA provider with the options of config.pbtxt's ``"cuda"`` accelerator (``use_tf32``), a
``KIND_CPU`` one on the CPU. A GPU instance that does not get CUDA (an onnxruntime without
it, or CUDA failing to start, after which ONNX Runtime silently uses the CPU) fails to load
with the reason, instead of serving on the CPU while Triton reports a GPU model; the
native backend fails the same way when it cannot append the CUDA provider.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def cuda_options(config: Mapping[str, Any]) -> dict[str, str]:
    """Parameters of the ``"cuda"`` GPU execution accelerator in the model config (JSON)."""
    accelerators = config.get("optimization", {}).get("execution_accelerators", {})
    for accelerator in accelerators.get("gpu_execution_accelerator", []):
        if accelerator.get("name") == "cuda":
            return dict(accelerator.get("parameters", {}))
    return {}


def execution_providers(kind: str, device_id: int, available: list[str],
                        options: Mapping[str, str]) -> list[Any]:
    """What to ask ONNX Runtime for: CUDA (then the CPU for nodes without a CUDA kernel) for a
    GPU instance, the CPU for any other; a GPU instance without CUDA is an error."""
    if kind != "GPU":
        return [CPU]
    if CUDA not in available:
        raise RuntimeError(f"instance kind GPU, but this onnxruntime ({ort.__version__}) has no {CUDA} "
                           f"(it has {available}); install onnxruntime-gpu or export with --device-kind cpu")
    return [(CUDA, {**options, "device_id": device_id}), CPU]


def check_providers(kind: str, got: list[str]) -> None:
    """A GPU instance must run on CUDA: ONNX Runtime falls back to the CPU when CUDA fails to start."""
    if kind == "GPU" and (not got or got[0] != CUDA):
        raise RuntimeError(f"instance kind GPU asked ONNX Runtime for {CUDA} and got {got} (CUDA or cuDNN "
                           "failed to start; see the log above); refusing to serve a GPU model on the CPU")


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        filename = config.get("default_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        kind = args["model_instance_kind"]
        providers = execution_providers(kind, int(args["model_instance_device_id"]), ort.get_available_providers(),
                                        cuda_options(config))
        self.session = ort.InferenceSession(path, providers=providers)
        check_providers(kind, self.session.get_providers())
        if kind == "GPU":
            self.session.disable_fallback()  # a CUDA failure in run() is an error, not a switch to the CPU
        self.input_names = [i["name"] for i in config["input"]]
        self.output_names = [o["name"] for o in config["output"]]

    def execute(self, requests: list[Any]) -> list[Any]:
        try:
            feeds = {name: [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests]
                     for name in self.input_names}
            sizes = [a.shape[0] for a in feeds[self.input_names[0]]]
            outputs = self.session.run(self.output_names, {k: np.concatenate(v) for k, v in feeds.items()})
        except Exception as exc:  # onnxruntime raises untyped errors; each request gets the message
            error = pb_utils.TritonError(f"onnxruntime: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        bounds = np.cumsum([0, *sizes])
        responses = []
        for i, request in enumerate(requests):
            wanted = set(request.requested_output_names()) or set(self.output_names)
            tensors = [pb_utils.Tensor(name, out[bounds[i]:bounds[i + 1]])
                       for name, out in zip(self.output_names, outputs, strict=True) if name in wanted]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
