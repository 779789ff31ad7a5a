"""Prometheus metrics of the gateway, one registry per app (several apps can live in one process,
as in tests). ``middleware.MetricsMiddleware`` counts requests; the rest is fed where it happens.

With several worker processes (``--workers``) every worker writes its values to files in
``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode, set up by
``server.metrics_directory`` before any worker starts), and ``/metrics`` answers the sum over
all workers, whichever worker is asked: counters and histograms add up, the gauges of
work in flight are summed over the live workers. ``faar_engine`` (an Info, which
multiprocess mode cannot store) lives in a registry of its own and is the asked worker's;
every worker serves the same model with the same engine.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from .engines.base import Engine

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("faar_requests_total", "HTTP requests by route and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("faar_request_duration_seconds", "HTTP request latency by route",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.refusal_latency = Histogram("faar_refusal_duration_seconds", "time to answer a 503 (overloaded, "
                                         "deadline, expired, engine unavailable): how fast a client learns to "
                                         "retry",
                                         buckets=LATENCY_BUCKETS, registry=self.registry)
        self.stages = Histogram("faar_stage_duration_seconds", "time per image in each stage "
                                "(decode, resize, queue, inference, encode)", ["stage"], buckets=LATENCY_BUCKETS,
                                registry=self.registry)
        self.batch_size = Histogram("faar_engine_batch_size", "images per engine call (onnx: per run; "
                                    "triton: per request, Triton batches further)", buckets=BATCH_BUCKETS,
                                    registry=self.registry)
        self.queue_depth = Gauge("faar_queue_depth", "images admitted and not yet answered",
                                 registry=self.registry, multiprocess_mode="livesum")
        self.inflight_bytes = Gauge("faar_inflight_bytes", "memory admitted for images in flight (the budget's "
                                    "use)", registry=self.registry, multiprocess_mode="livesum")
        self.rejected = Counter("faar_rejected_total", "requests refused by reason (overloaded, deadline, "
                                "expired, too_costly, engine_unavailable, client_gone)", ["reason"],
                                registry=self.registry)
        self.info_registry = CollectorRegistry()
        self.engine = Info("faar_engine", "what serves the model: engine, execution provider (ONNX Runtime's, "
                           "read at each scrape) or Triton's instance kind, model and version",
                           registry=self.info_registry)

    def describe_engine(self, engine: Engine) -> None:
        spec = engine.spec
        self.engine.info({"engine": engine.name, "provider": engine.provider or "unknown",
                          "model": spec.name if spec else "unknown", "version": str(spec.version) if spec else ""})

    def observe_stages(self, timings_ms: dict[str, float]) -> None:
        for stage, ms in timings_ms.items():
            self.stages.labels(stage).observe(ms / 1000)

    def exposition(self) -> bytes:
        """The text for ``/metrics``: this app's registry, or every worker's in multiprocess mode."""
        registry = self.registry
        if os.environ.get(MULTIPROC_ENV):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
        return generate_latest(registry) + generate_latest(self.info_registry)
