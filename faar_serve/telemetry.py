"""Prometheus metrics of the gateway, one registry per app (several apps can live in one process,
as in tests). ``middleware.MetricsMiddleware`` counts requests; the rest is fed where it happens."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("faar_requests_total", "HTTP requests by route and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("faar_request_duration_seconds", "HTTP request latency by route",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.stages = Histogram("faar_stage_duration_seconds", "time per image in each stage "
                                "(decode, queue, inference, encode)", ["stage"], buckets=LATENCY_BUCKETS,
                                registry=self.registry)
        self.batch_size = Histogram("faar_engine_batch_size", "images per engine call (onnx: per run; "
                                    "triton: per request, Triton batches further)", buckets=BATCH_BUCKETS,
                                    registry=self.registry)
        self.queue_depth = Gauge("faar_queue_depth", "images admitted and not yet answered",
                                 registry=self.registry)
        self.rejected = Counter("faar_rejected_total", "requests refused with 503 by reason", ["reason"],
                                registry=self.registry)

    def observe_stages(self, timings_ms: dict[str, float]) -> None:
        for stage, ms in timings_ms.items():
            self.stages.labels(stage).observe(ms / 1000)
