"""The one interface the gateway talks to, whichever runtime is behind it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..manifest import ModelSpec

BatchObserver = Callable[[int], None]  # told the size of every batch the engine runs


class EngineUnavailable(RuntimeError):
    """The engine cannot answer now (not loaded, server down, deadline passed): retry later (503)."""


class DeadlineExceeded(EngineUnavailable):
    """The request's deadline passed before the engine ran it: dropped, not computed (503)."""


class EngineFailure(RuntimeError):
    """The engine answered with an error that retrying will not fix (502)."""


@dataclass(frozen=True)
class BatchLimit:
    """How many images go into one engine call, decided here and nowhere else."""

    requested: int | None  # --max-batch-size; None: the default below
    model: int  # config.pbtxt's max_batch_size, the limit Triton enforces for the same model

    def size(self, cpu: bool = False) -> int:
        """What was asked, at most the model's limit; by default the limit, except 1 for ONNX
        Runtime on the CPU, where one image already uses every core, so batches add latency
        and memory but no throughput (bench/RESULTS.md, serving)."""
        if self.requested is not None:
            return min(self.requested, self.model)
        return 1 if cpu else self.model


@dataclass(frozen=True)
class EngineResult:
    outputs: dict[str, np.ndarray]  # graph output name -> [B, ...]
    queue_ms: float  # waiting for a batch slot inside the gateway (0 where the server batches)
    inference_ms: float  # the rest of the engine's wall time


class Engine(ABC):
    name: str
    spec: ModelSpec | None  # the model it serves; None until known (Triton not reached yet)
    detail: str | None = None  # why it is not ready, when it knows

    @abstractmethod
    async def start(self) -> None:
        """Load or connect; called once from the app's lifespan."""

    @abstractmethod
    async def infer(self, batch: np.ndarray, deadline: float | None = None) -> EngineResult:
        """uint8 ``[B, H, W, 3]`` at the model's input size -> every output, in order. ``deadline``
        (``time.monotonic()``): work still queued then is dropped with ``DeadlineExceeded``."""

    @abstractmethod
    async def ready(self) -> bool:
        """Loaded and answering (cheap: called by /readyz)."""

    @property
    @abstractmethod
    def provider(self) -> str | None:
        """What runs the graph now (/readyz, /metrics): ONNX Runtime's execution provider, or
        Triton's instance kind; None while unknown (not started, Triton not reached yet)."""

    @abstractmethod
    async def close(self) -> None:
        """Release threads and connections; pending calls fail with ``EngineUnavailable``."""
