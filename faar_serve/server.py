"""The HTTP server under the gateway: granian (Rust, hyper), with ``--workers`` processes on one port.

Decision (issue 14, "connection hygiene"; numbers from ``python -m bench.servers``, in
bench/RESULTS.md). Five setups served the same ASGI app under one policy (headers at most
16 KiB, 5 s to send them, 5 s keep-alive, 256 connections) and were attacked as the issue
found (limits of 20 s on holding times):

===========================  =========  =============  ============  ===============  ==========
server                       8 MB hdr   4x64 MiB hdr   idle/slow     after 1000 idle  req/s
                                        RSS growth     header        connections      (10 KB POST)
===========================  =========  =============  ============  ===============  ==========
uvicorn (httptools)          200        grows, open    held forever  503 (limit)      115
uvicorn (h11)                400        0, closed      held forever  503 (limit)      139
gunicorn + uvicorn worker    200        grows, open    held forever  200              116
hypercorn (h11)              431        0, closed      closed at 5 s  200 (no cap)     56
granian                      431        0, closed      closed at 5 s  200 once freed   117
===========================  =========  =============  ============  ===============  ==========

(``--quick`` figures here; the full run is in bench/RESULTS.md.) uvicorn has no header
timeout at all (its keep-alive timer starts only after a first answer), its httptools
parser no header size limit, and its h11 parser answers 400, not 431; gunicorn's limits
apply to its own sync workers, not to the uvicorn worker's parser. hypercorn enforces
431 and times out idle and slow headers (its keep-alive timer runs until a request's
headers are complete), but has no connection cap and costs half the throughput in pure
Python. granian (hyper underneath) answers 431 past ``max_buffer_size``, closes idle and
slow-header connections at ``header_read_timeout`` (also the keep-alive idle time: hyper
times the wait for the next request's headers with the same clock), caps the connections
a worker serves at once (``backpressure``; the rest wait in the listen backlog), delivers
``http.disconnect`` when a client goes away, and runs several worker processes on one
port. None of them bounds the time to send a *body* (a per-read timeout does not stop
4 bytes/s), so the gateway does that itself (``middleware.BodyLimitMiddleware``, 408).

Worker processes are forked by granian and build their app from the settings the
parent resolved (``worker_app``), passed as JSON in the environment. With several
workers Prometheus runs in multiprocess mode (``telemetry``): the directory is
``PROMETHEUS_MULTIPROC_DIR`` when set, else a temporary one, emptied at start.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .settings import Settings

SETTINGS_ENV = "FAAR_SERVE_SETTINGS_JSON"  # the parent's resolved settings, for the workers
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own variable


def worker_app() -> Any:
    """granian's factory target: the app for the settings the parent resolved."""
    import json

    from .app import create_app

    return create_app(Settings(**json.loads(os.environ[SETTINGS_ENV])))


@contextlib.contextmanager
def metrics_directory(workers: int) -> Iterator[Path | None]:
    """Prometheus' multiprocess directory (emptied now, removed after if we made it); None with one
    worker and no directory asked for. Set before any worker imports prometheus_client."""
    given = os.environ.get(MULTIPROC_ENV)
    if workers == 1 and not given:
        yield None
        return
    path = Path(given) if given else Path(tempfile.mkdtemp(prefix="faar-metrics-"))
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):  # a previous run's counters would be added to ours
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(path)
    try:
        yield path
    finally:
        if not given:
            shutil.rmtree(path, ignore_errors=True)


def serve(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM, with every connection limit of ``settings`` in force."""
    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP1Settings
    from granian.server import Server

    with metrics_directory(settings.workers):
        os.environ[SETTINGS_ENV] = settings.to_environment()
        http1 = HTTP1Settings(header_read_timeout=max(1, round(settings.header_timeout_s * 1000)),
                              keep_alive=settings.keep_alive, max_buffer_size=settings.max_header_bytes)
        server = Server("faar_serve.server:worker_app", factory=True, interface=Interfaces.ASGI,
                        address=settings.host, port=settings.port, workers=settings.workers, http=HTTPModes.http1,
                        websockets=False, backlog=max(1024, settings.max_connections),
                        backpressure=settings.max_connections, http1_settings=http1,
                        log_level=settings.log_level, log_access=False)
        server.serve()
