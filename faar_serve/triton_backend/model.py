"""A Python-based Triton backend named ``onnxruntime``: serves ``<version>/model.onnx`` per config.pbtxt.

NVIDIA's Triton container runs exported repositories with its native ONNX Runtime backend.
The ``nvidia-pytriton`` wheel ships no such backend, so ``faar-triton`` installs this file as
``<backend-dir>/onnxruntime/model.py``; Triton then runs every ``backend: "onnxruntime"``
model through its Python backend, and the exported repository loads unchanged.

Runs inside Triton's Python stub: it imports only numpy, onnxruntime and Triton's utils.
Dynamic batching hands ``execute`` several requests; they run as one ONNX Runtime call
and the outputs are split back by each request's batch size.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        filename = config.get("default_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        providers: list[Any] = ["CPUExecutionProvider"]
        if args["model_instance_kind"] == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            device = int(args["model_instance_device_id"])
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device}))
        self.session = ort.InferenceSession(path, providers=providers)
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
