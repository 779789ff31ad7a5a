"""ASGI middleware: what must happen around every request, before routing or body parsing.

Plain ASGI classes rather than ``BaseHTTPMiddleware``: they see the raw ``receive``/``send``,
so the API key is checked before any of the body is read, a prediction that cannot be
served in time is refused before any of its body is parsed, the body limit and the body
timeout refuse while the bytes stream in (an oversized or trickled upload is never held
in full or for long), and the metrics see every answer, including those sent by other
middleware.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection
from typing import Any

from pydantic import SecretStr
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import key_matches, needs_key
from .errors import ApiError, error_response
from .telemetry import Metrics


class ApiKeyMiddleware:
    """401 from the headers alone, before the body is read, for the paths that need the key."""

    def __init__(self, app: ASGIApp, key: SecretStr, metrics_public: bool) -> None:
        self.app = app
        self.key = key
        self.metrics_public = metrics_public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and needs_key(scope["path"], self.metrics_public):
            if not key_matches(self.key, dict(scope["headers"]).get(b"authorization")):
                answer = error_response(401, "unauthorized", "missing or wrong API key: send 'Authorization: "
                                        "Bearer <key>'", {"WWW-Authenticate": "Bearer", "Connection": "close"})
                await answer(scope, receive, send)
                return
        await self.app(scope, receive, send)


class EarlyRefusalMiddleware:
    """The answer from the headers, with no byte of the body parsed, for the ``paths`` ``check``
    refuses: ``check(arrived)`` raises the ``ApiError`` (a prediction that cannot make its
    deadline, ``admission.Admission.check_arrival``) or returns to let the request in.

    A client that sent ``Expect: 100-continue`` (curl does for big files) is answered at once and
    never sends its body: no ``100 Continue`` goes out until the app reads. Any other client is
    sending its body already; it is read and dropped (no multipart parsing, nothing kept, under
    the body limit and timeout outside this middleware) before the answer goes out. Answering
    before it and closing, as ``ApiKeyMiddleware`` does, was measured under load (bench/overload,
    demo model): 42 % of such refusals reached httpx as a reset connection instead of the 503, the
    close racing the upload still in flight."""

    def __init__(self, app: ASGIApp, paths: Collection[str], check: Callable[[float], None]) -> None:
        self.app = app
        self.paths = paths
        self.check = check

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.paths:
            try:
                self.check(scope.get("state", {}).get("arrived", time.monotonic()))
            except ApiError as refusal:
                headers = dict(refusal.headers or {})
                if dict(scope["headers"]).get(b"expect", b"").lower() == b"100-continue":
                    headers["Connection"] = "close"  # the unsent body must not be read as the next request
                else:
                    try:
                        message = await receive()
                        while message["type"] == "http.request" and message.get("more_body", False):
                            message = await receive()
                    except ApiError as exc:  # the body broke its limit or timeout meanwhile
                        refusal, headers = exc, dict(exc.headers or {})
                    else:
                        if message["type"] == "http.disconnect":  # gone: nobody to answer
                            return
                answer = error_response(refusal.status_code, refusal.code, refusal.detail, headers)
                await answer(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for a body over ``max_bytes``: from Content-Length before reading, else while counting
    the bytes as they stream in, so an oversized upload is never held in full. 408 for a body
    not complete within ``timeout_s`` of the first read: no HTTP server measured here bounds
    that (bench/RESULTS.md, servers), and 4 bytes/s would hold a connection for days."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

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
        complete = False
        deadline: float | None = None

        async def counting_receive() -> Message:
            nonlocal received, complete, deadline
            if complete:  # the body is in: what follows is the wait for a disconnect, untimed
                return await receive()
            deadline = deadline or time.monotonic() + self.timeout_s
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise ApiError(408, "body_timeout", f"the request body did not arrive within {self.timeout_s:g} s",
                               {"Connection": "close"}) from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException: FastAPI re-raises it from body parsing as it is.
                    raise ApiError(413, "body_too_large", too_large)
            return message

        await self.app(scope, counting_receive, send)


class MetricsMiddleware:
    """Counts every answer (413s from the body limit and 500s included) by route template. Notes when
    each request arrived (``request.state.arrived``, ``time.monotonic()``: its deadline counts from
    there) and calls ``request.state.answered(time)`` once the answer has been sent, if set."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()
        state = scope.setdefault("state", {})
        state["arrived"] = time.monotonic()  # the deadline counts from here

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            if "answered" in state:  # the gateway wants to know when the answer has gone
                state["answered"](time.monotonic())
            route: Any = scope.get("route")
            path = getattr(route, "path", "unmatched")  # templates only: bounded label values
            self.metrics.requests.labels(path, scope["method"], str(status)).inc()
            took = time.perf_counter() - start
            self.metrics.latency.labels(path, scope["method"]).observe(took)
            if status == 503:
                self.metrics.refusal_latency.observe(took)
