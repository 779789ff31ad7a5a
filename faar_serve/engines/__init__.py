"""Engines behind the gateway: embedded ONNX Runtime (``onnx``) or a Triton server (``triton``)."""

from __future__ import annotations

from collections.abc import Callable

from ..manifest import ModelSpec
from ..settings import Settings
from .base import BatchLimit, BatchObserver, Engine, EngineFailure, EngineResult, EngineUnavailable

__all__ = ["BatchLimit", "Engine", "EngineFailure", "EngineResult", "EngineUnavailable", "create_engine"]


def create_engine(settings: Settings, spec: ModelSpec, upstream: Callable[[], int],
                  observe_batch: BatchObserver | None = None) -> Engine:
    """The engine ``settings.engine`` names, for ``spec``'s graph (imports only what it needs).

    ``upstream`` counts images admitted but not yet handed to the engine; the embedded
    micro-batcher waits for company only while it is positive (Triton batches on its side).
    """
    outputs = list(dict.fromkeys(t.output for t in spec.tasks.values()))
    batch = BatchLimit(requested=settings.max_batch_size, model=spec.max_batch_size)
    if settings.engine == "triton":
        from .triton import TritonEngine

        return TritonEngine(url=settings.triton_url, protocol=settings.triton_protocol, model=spec.name,
                            version=spec.version, input_name=spec.input_name, output_names=outputs, batch=batch,
                            timeout_s=settings.triton_timeout_s, observe_batch=observe_batch)
    from .onnx import OnnxEngine

    return OnnxEngine(onnx_path=spec.onnx_path, input_name=spec.input_name, output_names=outputs,
                      device=settings.device, batch=batch, max_queue_delay_ms=settings.max_queue_delay_ms,
                      upstream=upstream, spin_wait=settings.cpu_spin_wait, observe_batch=observe_batch)
