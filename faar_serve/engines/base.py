"""The one interface the gateway talks to, whichever runtime is behind it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

BatchObserver = Callable[[int], None]  # told the size of every batch the engine runs


class EngineUnavailable(RuntimeError):
    """The engine cannot answer now (not loaded, server down, deadline passed): retry later (503)."""


class EngineFailure(RuntimeError):
    """The engine answered with an error that retrying will not fix (502)."""


@dataclass(frozen=True)
class EngineResult:
    outputs: dict[str, np.ndarray]  # graph output name -> [B, ...]
    queue_ms: float  # waiting for a batch slot inside the gateway (0 where the server batches)
    inference_ms: float  # the rest of the engine's wall time


class Engine(ABC):
    name: str

    @abstractmethod
    async def start(self) -> None:
        """Load or connect; called once from the app's lifespan."""

    @abstractmethod
    async def infer(self, batch: np.ndarray) -> EngineResult:
        """uint8 ``[B, H, W, 3]`` at the model's input size -> every output, in order."""

    @abstractmethod
    async def ready(self) -> bool:
        """Loaded and answering (cheap: called by /readyz)."""

    @abstractmethod
    async def close(self) -> None:
        """Release threads and connections; pending calls fail with ``EngineUnavailable``."""
