"""ASGI middleware: what must happen around every request, before routing or body parsing.

Plain ASGI classes rather than ``BaseHTTPMiddleware``: they see the raw ``receive``/``send``,
so the body limit can refuse while the bytes stream in (an oversized upload is never held
in full) and the metrics see every answer, including those sent by other middleware.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError, error_response
from .telemetry import Metrics


class BodyLimitMiddleware:
    """413 for a body over ``max_bytes``: from Content-Length before reading, else while counting
    the bytes as they stream in, so an oversized upload is never held in full."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"request body is over the limit of {self.max_bytes} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                answer = error_response(400, "bad_content_length", "Content-Length is not a number")
                await answer(scope, receive, send)
                return
            if int(length) > self.max_bytes:
                await error_response(413, "body_too_large", too_large)(scope, receive, send)
                return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException: FastAPI re-raises it from body parsing as it is.
                    raise ApiError(413, "body_too_large", too_large)
            return message

        await self.app(scope, counting_receive, send)


class MetricsMiddleware:
    """Counts every answer (413s from the body limit and 500s included) by route template."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route: Any = scope.get("route")
            path = getattr(route, "path", "unmatched")  # templates only: bounded label values
            self.metrics.requests.labels(path, scope["method"], str(status)).inc()
            self.metrics.latency.labels(path, scope["method"]).observe(time.perf_counter() - start)
