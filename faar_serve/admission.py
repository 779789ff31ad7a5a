"""Admission: the gateway's bounded queue, so overload is answered at once instead of piling up.

At most ``limit`` images are between admission and answer (decode, engine, encode); one
more is refused with 503 and ``Retry-After``. Counting images, not requests, keeps a batch
request from slipping sixteen images past a queue sized for single uploads. Everything
runs on the one event loop, so the counters need no lock.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .errors import ApiError
from .telemetry import Metrics


class Admission:
    """The bounded queue: at most ``limit`` images between admission and answer."""

    def __init__(self, limit: int, metrics: Metrics, retry_after_s: int) -> None:
        self.limit = limit
        self.used = 0
        self.upstream = 0  # images admitted and not yet handed to the engine (being read or decoded)
        self.metrics = metrics
        self.retry_after_s = retry_after_s

    @contextlib.contextmanager
    def slot(self, images: int) -> Iterator[None]:
        if self.used + images > self.limit:  # one event loop: no lock needed
            self.metrics.rejected.labels("overloaded").inc()
            raise ApiError(503, "overloaded", f"{self.used} images in progress, the queue holds "
                           f"{self.limit}; retry later", {"Retry-After": str(self.retry_after_s)})
        self.used += images
        self.metrics.queue_depth.set(self.used)
        try:
            yield
        finally:
            self.used -= images
            self.metrics.queue_depth.set(self.used)

    @contextlib.contextmanager
    def before_engine(self, images: int) -> Iterator[None]:
        """Counts ``images`` as on their way to the engine, so its batcher knows whom to wait for."""
        self.upstream += images
        try:
            yield
        finally:
            self.upstream -= images
