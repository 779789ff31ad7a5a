"""The HTTP server under the gateway: granian (Rust, hyper), with ``--workers`` processes on one port.

Decision (issue 14, "connection hygiene"; ``python -m bench.servers``, full table in
bench/RESULTS.md, "Servers under attack"). Five setups served the same ASGI app under one
policy (headers at most 16 KiB, 5 s to send them, 5 s keep-alive, 256 connections or
requests at once) and were attacked as the issue found; holding times capped at 20 s.
Taken on a loaded 2-core AMD EPYC (load average about 10):

===========================  ======  ===================  ==============  ===========  =================
server                       8 MB    4 x 64 MiB unfinished  idle / slow     req/s        request after 1000
                             header  header: MiB taken,     header (4 B/s)  (10 KB POST, idle connections
                                     RSS growth                             c=16)
===========================  ======  ===================  ==============  ===========  =================
uvicorn (httptools)          200     64 each, +351 MiB,   held / held     176          503 (limit), 4 ms
                                     never closed
uvicorn (h11)                400     4, +0, closed        held / held     251          503 (limit), 1 ms
gunicorn + uvicorn worker    200     51, worker killed     held / held     225          200, 5 ms
                                     by its timeout
hypercorn (h11)              431     4, +2 MiB, closed    5 s / 5 s       203          200, 6 ms (no cap)
granian                      431     1, +0, closed        5 s / 5 s       305          waits for room
===========================  ======  ===================  ==============  ===========  =================

uvicorn has no header timeout at all (its keep-alive timer starts only after a first
answer), its httptools parser no header size limit, and its h11 parser answers 400, not
431; gunicorn's limits apply to its own sync workers, not to the uvicorn worker's parser.
hypercorn enforces 431 and times out idle and slow headers (its keep-alive timer runs
until a request's headers are complete), but has no connection cap and is a third slower.
granian (hyper underneath) answers 431 past ``max_buffer_size``, closes idle and
slow-header connections at ``header_read_timeout`` (also the keep-alive idle time: hyper
times the wait for the next request's headers with the same clock), caps the connections
a worker serves at once (``backpressure``; the rest wait in the listen backlog), delivers
``http.disconnect`` when a client goes away, runs several worker processes on one port,
and was the fastest. So faar-serve runs on granian.

What a cap costs: connections past it wait in the backlog, first come first served, so a
client that holds N idle connections delays a newcomer by up to ``header_timeout_s`` for
each ``max_connections`` of them queued ahead (1000 idle against a cap of 256 and 5 s:
the newcomer was not served within 10 s). Idle connections cost granian next to nothing
(no RSS growth above), so the default cap is high (1024 per worker) and the header timeout
short (10 s); behind a proxy, the proxy's own limits come first. None of the servers
bounds the time to send a *body* (a per-read timeout does not stop 4 bytes/s), so the
gateway does that itself (``middleware.BodyLimitMiddleware``, 408).

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
