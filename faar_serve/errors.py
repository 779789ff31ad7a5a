"""Every refusal as one JSON shape: ``{"error": code, "detail": text}`` with a 4xx/5xx status.

``ApiError`` carries a stable machine-readable code next to the human detail; the handlers
installed by ``install_error_handlers`` turn it, FastAPI's own errors, engine errors and
anything unexpected into that shape, so a client never parses an HTML page or a bare 500.

Engine errors say only what a client can act on ("inference engine unavailable", with a
stable code); what went wrong inside (Triton's address, the gRPC or ONNX Runtime message)
goes to the log, never into an answer.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .engines import DeadlineExceeded, EngineFailure, EngineUnavailable
from .schemas import ErrorBody

log = logging.getLogger("faar_serve")

# For the OpenAPI page: what each status means on the inference routes.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text} for status, text in {
        400: "empty file", 401: "API key missing or wrong", 408: "the body was not sent in time",
        413: "body, image or batch too large, or an image over the memory budget",
        415: "not an image in a supported format",
        422: "truncated image, unknown or empty task list, repeated field or parameter",
        502: "the engine returned an error",
        503: "overloaded, deadline cannot be met (deadline) or passed in the engine's queue (expired), or engine "
             "unavailable (see Retry-After)",
    }.items()
}


class ApiError(HTTPException):
    """An HTTP error with a stable machine-readable ``code`` next to the human ``detail``."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, detail, headers)
        self.code = code


def error_response(status: int, code: str, detail: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where, field = err["loc"][0], ".".join(str(x) for x in err["loc"][1:])
        if err["type"] == "missing" and where == "body":
            parts.append(f"missing form field {field!r} (send the file as multipart/form-data)")
        else:
            parts.append(f"{where} {field}: {err['msg']}")
    return "; ".join(parts)


def install_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = getattr(exc, "code", None) or HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")
        return error_response(exc.status_code, code, str(exc.detail), exc.headers)

    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", _validation_detail(exc))

    async def unavailable(request: Request, exc: EngineUnavailable) -> JSONResponse:
        # ``expired``, not ``deadline``: admitted as feasible, then the engine's queue outlasted it.
        code, detail = ("expired", "the request's deadline passed while it waited for the inference engine") \
            if isinstance(exc, DeadlineExceeded) else ("engine_unavailable", "inference engine unavailable")
        request.app.state.gateway.metrics.rejected.labels(code).inc()
        log.warning("%s on %s: %s", code, request.url.path, exc)
        return error_response(503, code, detail, {"Retry-After": str(retry_after_s)})

    async def failed(request: Request, exc: EngineFailure) -> JSONResponse:
        log.error("engine failure on %s: %s", request.url.path, exc)
        return error_response(502, "engine_failure", "inference engine failed; the gateway's log has the cause")

    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal_error", f"{type(exc).__name__}: the server failed; see its log")

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(EngineUnavailable, unavailable)
    app.add_exception_handler(EngineFailure, failed)
    app.add_exception_handler(Exception, crashed)
