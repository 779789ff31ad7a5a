"""Engines behind the gateway: embedded ONNX Runtime (``onnx``) or a Triton server (``triton``)."""

from __future__ import annotations

from ..manifest import ModelSpec
from ..settings import Settings
from .base import BatchObserver, Engine, EngineFailure, EngineResult, EngineUnavailable

__all__ = ["Engine", "EngineFailure", "EngineResult", "EngineUnavailable", "create_engine"]


def create_engine(settings: Settings, spec: ModelSpec, observe_batch: BatchObserver | None = None) -> Engine:
    """The engine ``settings.engine`` names, for ``spec``'s graph (imports only what it needs)."""
    outputs = list(dict.fromkeys(t.output for t in spec.tasks.values()))
    max_batch_size = settings.max_batch_size or spec.max_batch_size
    if settings.engine == "triton":
        from .triton import TritonEngine

        return TritonEngine(settings.triton_url, settings.triton_protocol, spec.name, spec.version,
                            spec.input_name, outputs, min(max_batch_size, spec.max_batch_size),
                            settings.triton_timeout_s, observe_batch)
    from .onnx import OnnxEngine

    return OnnxEngine(spec.onnx_path, spec.input_name, outputs, settings.device, max_batch_size,
                      settings.max_queue_delay_ms, observe_batch)
