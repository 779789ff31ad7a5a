"""Engines behind the gateway: embedded ONNX Runtime (``onnx``) or a Triton server (``triton``).

Each engine knows the model it serves (``Engine.spec``): the embedded one reads it from
``--model-repository`` when it is created (a bad repository stops the start-up), the
Triton one from Triton itself once Triton answers (``engines.triton``), so a gateway in
front of Triton needs no copy of the repository.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..manifest import load_model_spec
from ..settings import Settings
from .base import (
    BatchLimit,
    BatchObserver,
    DeadlineExceeded,
    Engine,
    EngineFailure,
    EngineResult,
    EngineUnavailable,
)

log = logging.getLogger("faar_serve")
__all__ = ["BatchLimit", "DeadlineExceeded", "Engine", "EngineFailure", "EngineResult", "EngineUnavailable",
           "create_engine"]


def create_engine(settings: Settings, upstream: Callable[[], int], observe_batch: BatchObserver | None = None
                  ) -> Engine:
    """The engine ``settings.engine`` names (imports only what it needs).

    ``upstream`` counts images admitted but not yet handed to the engine; the embedded
    micro-batcher waits for company only while it is positive (Triton batches on its side).
    """
    if settings.engine == "triton":
        from .triton import TritonEngine

        if settings.model_repository is not None:
            log.info("--model-repository %s is not read: the triton engine reads the model from Triton",
                     settings.model_repository)
        return TritonEngine(url=settings.triton_url, protocol=settings.triton_protocol, model=settings.model,
                            version=settings.model_version, max_batch_size=settings.max_batch_size,
                            timeout_s=settings.triton_deadline_s, observe_batch=observe_batch)
    from .onnx import OnnxEngine

    assert settings.model_repository is not None  # Settings requires it for the onnx engine
    spec = load_model_spec(settings.model_repository, settings.model, settings.model_version)
    return OnnxEngine(spec=spec, device=settings.device, max_batch_size=settings.max_batch_size,
                      max_queue_delay_ms=settings.max_queue_delay_ms, upstream=upstream,
                      spin_wait=settings.cpu_spin_wait, tf32=settings.cuda_tf32, streams=settings.inference_streams,
                      observe_batch=observe_batch)
