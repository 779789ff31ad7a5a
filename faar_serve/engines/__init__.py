"""Engines behind the gateway: embedded ONNX Runtime (``onnx``) or a Triton server (``triton``)."""

from __future__ import annotations

from collections.abc import Callable

from ..manifest import ModelSpec
from ..settings import Settings
from .base import BatchObserver, Engine, EngineFailure, EngineResult, EngineUnavailable

__all__ = ["Engine", "EngineFailure", "EngineResult", "EngineUnavailable", "create_engine"]


def create_engine(settings: Settings, spec: ModelSpec, upstream: Callable[[], int],
                  observe_batch: BatchObserver | None = None) -> Engine:
    """The engine ``settings.engine`` names, for ``spec``'s graph (imports only what it needs).

    ``upstream`` counts images admitted but not yet handed to the engine; the embedded
    micro-batcher waits for company only while it is positive (Triton batches on its side).
    """
    outputs = list(dict.fromkeys(t.output for t in spec.tasks.values()))
    if settings.engine == "triton":
        from .triton import TritonEngine

        return TritonEngine(settings.triton_url, settings.triton_protocol, spec.name, spec.version,
                            spec.input_name, outputs, min(settings.max_batch_size or spec.max_batch_size,
                                                          spec.max_batch_size),
                            settings.triton_timeout_s, observe_batch)
    from .onnx import OnnxEngine

    return OnnxEngine(spec.onnx_path, spec.input_name, outputs, settings.device, settings.max_batch_size,
                      spec.max_batch_size, settings.max_queue_delay_ms, upstream, settings.cpu_spin_wait,
                      observe_batch)
