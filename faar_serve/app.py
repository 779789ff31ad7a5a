"""The FastAPI gateway: ``create_app(settings)`` and its routers.

Request path: body limit (while streaming) -> admission (bounded: past ``max_queue``
images in the gateway, 503 + Retry-After) -> decode + resize (worker thread) -> engine ->
resize maps back + encode (worker thread). Every refusal is a JSON ``{"error", "detail"}``
with a 4xx/5xx status; nothing a client sends can stall the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import codec, web
from .engines import Engine, EngineFailure, EngineResult, EngineUnavailable, create_engine
from .manifest import ModelSpec, load_model_spec
from .metrics import Metrics, MetricsMiddleware
from .schemas import BatchPrediction, ErrorBody, Health, Manifest, Prediction, Readiness, TaskMap
from .settings import Settings

log = logging.getLogger("faar_serve")
NPZ_MEDIA_TYPE = "application/octet-stream"
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text} for status, text in {
        400: "empty file", 401: "API key missing or wrong", 413: "body, image or batch too large",
        415: "not an image in a supported format", 422: "truncated image, unknown task, missing field",
        502: "the engine returned an error", 503: "overloaded or engine unavailable (see Retry-After)",
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


@dataclass
class Decoded:
    pixels: np.ndarray  # model input size
    height: int  # the upload's size, after EXIF orientation
    width: int
    decode_ms: float


@dataclass
class Rendered:
    maps: dict[str, Any]  # task -> TaskMap fields (json) or the array (npz)
    height: int
    width: int
    timings_ms: dict[str, float]


class Gateway:
    """What the routes share: settings, model, engine, metrics, admission."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.spec: ModelSpec = load_model_spec(settings.model_repository, settings.model,
                                               settings.model_version)
        self.metrics = Metrics()
        self.admission = Admission(settings.max_queue, self.metrics, settings.retry_after_s)
        self.engine: Engine = create_engine(settings, self.spec, lambda: self.admission.upstream,
                                            self.metrics.batch_size.observe)

    def tasks(self, names: str | None) -> list[str]:
        try:
            return self.spec.select_tasks(names)
        except KeyError as exc:
            raise ApiError(422, "unknown_task", exc.args[0]) from exc

    def decode(self, data: bytes) -> Decoded:
        t0 = time.perf_counter()
        rgb = codec.decode_image(data, self.settings.max_image_pixels)
        pixels = codec.resize_image(rgb, self.spec.height, self.spec.width)
        return Decoded(pixels, rgb.shape[0], rgb.shape[1], (time.perf_counter() - t0) * 1000)

    def render(self, result: EngineResult, index: int, image: Decoded, tasks: list[str],
               fmt: str) -> Rendered:
        """Image ``index`` of the engine's batch: maps back at the upload's size, encoded for ``fmt``."""
        t0 = time.perf_counter()
        maps: dict[str, Any] = {}
        for name in tasks:
            task = self.spec.tasks[name]
            arr = codec.resize_map(task.kind, result.outputs[task.output][index], image.height, image.width)
            maps[name] = arr if fmt == "npz" else codec.encode_map(task, arr)
        timings = {"decode": image.decode_ms, "queue": result.queue_ms, "inference": result.inference_ms,
                   "encode": (time.perf_counter() - t0) * 1000}
        self.metrics.observe_stages(timings)
        return Rendered(maps, image.height, image.width, {k: round(v, 3) for k, v in timings.items()})

    async def predict(self, uploads: list[UploadFile], tasks: list[str], fmt: str) -> list[Rendered]:
        """Admit, decode, infer in one engine call, render: one ``Rendered`` per upload, in order."""
        with self.admission.slot(len(uploads)):
            with self.admission.before_engine(len(uploads)):
                payloads = [await upload.read() for upload in uploads]
                batch = len(uploads) > 1  # errors name the image only where there are several
                where = [f"image {i} ({u.filename!r}): " if batch else "" for i, u in enumerate(uploads)]
                decoded = await asyncio.gather(*map(self._decode, payloads, where))
            result = await self.engine.infer(np.stack([d.pixels for d in decoded]))
            return list(await asyncio.gather(*(run_in_threadpool(self.render, result, i, d, tasks, fmt)
                                               for i, d in enumerate(decoded))))

    async def _decode(self, data: bytes, where: str) -> Decoded:
        try:
            return await run_in_threadpool(self.decode, data)
        except codec.ImageError as exc:
            raise ApiError(exc.status, exc.code, where + str(exc)) from exc


def gateway(request: Request) -> Gateway:
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(gateway)]
bearer = HTTPBearer(auto_error=False, description="only when the gateway runs with an API key")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


async def require_api_key(gw: GatewayDep, credentials: Credentials) -> None:
    key = gw.settings.api_key
    if key is None:
        return
    given = credentials.credentials.encode() if credentials else b""
    if not secrets.compare_digest(given, key.get_secret_value().encode()):
        raise ApiError(401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer <key>'",
                       {"WWW-Authenticate": "Bearer"})


TasksQuery = Annotated[str | None, Query(
    description="comma-separated subset, e.g. semseg,depth; default: all", examples=["semseg,depth"])]
FormatQuery = Annotated[Literal["json", "npz"], Query(
    description="json: PNG maps in base64; npz: the exact arrays (float maps, integer label maps, "
                "normals as [3, H, W]); keys '<task>' (batch: '<index>/<task>')")]
PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES, 200: {"content": {NPZ_MEDIA_TYPE: {}}, "description": "JSON, or NPZ with format=npz"}}

api = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["inference"])


def server_timing(timings: dict[str, float]) -> str:
    return ", ".join(f"{stage};dur={ms}" for stage, ms in timings.items())


def prediction(gw: Gateway, rendered: Rendered) -> Prediction:
    tasks = {name: TaskMap(**fields) for name, fields in rendered.maps.items()}
    return Prediction(model=gw.spec.name, version=gw.spec.version, width=rendered.width,
                      height=rendered.height, tasks=tasks, timings_ms=rendered.timings_ms)


@api.post("/predict", response_model=Prediction, responses=PREDICT_RESPONSES)
async def predict(gw: GatewayDep, image: Annotated[UploadFile, File(description=codec.FORMAT_NAMES)],
                  tasks: TasksQuery = None, format: FormatQuery = "json") -> Any:
    """Every map (or the ``tasks`` asked for) of one image, at the image's own size."""
    names = gw.tasks(tasks)
    (rendered,) = await gw.predict([image], names, format)
    headers = {"Server-Timing": server_timing(rendered.timings_ms)}
    if format == "npz":
        return Response(codec.npz_bytes(rendered.maps), media_type=NPZ_MEDIA_TYPE, headers=headers)
    return JSONResponse(prediction(gw, rendered).model_dump(exclude_none=True), headers=headers)


@api.post("/predict/batch", response_model=BatchPrediction, responses=PREDICT_RESPONSES)
async def predict_batch(gw: GatewayDep,
                        images: Annotated[list[UploadFile], File(description="one field per image")],
                        tasks: TasksQuery = None, format: FormatQuery = "json") -> Any:
    """Several images in one request (one engine call), answered in upload order."""
    names = gw.tasks(tasks)
    limit = min(gw.settings.max_batch_images, gw.settings.max_queue)  # a bigger one could never be admitted
    if len(images) > limit:
        raise ApiError(413, "too_many_images", f"{len(images)} images; a batch request takes at most {limit}")
    rendered = await gw.predict(images, names, format)
    if format == "npz":
        arrays = {f"{i}/{task}": arr for i, r in enumerate(rendered) for task, arr in r.maps.items()}
        return Response(codec.npz_bytes(arrays), media_type=NPZ_MEDIA_TYPE)
    answer = BatchPrediction(model=gw.spec.name, version=gw.spec.version,
                             results=[prediction(gw, r) for r in rendered])
    return JSONResponse(answer.model_dump(exclude_none=True))


@api.get("/model", response_model=Manifest)
async def model(gw: GatewayDep) -> Any:
    """The export manifest of the model being served (tasks, classes, palette, units, parity...)."""
    return gw.spec.manifest


ops = APIRouter(tags=["operations"])


@ops.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is up (liveness)."""
    return Health(status="ok")


@ops.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(gw: GatewayDep) -> JSONResponse:
    """The engine is loaded and answering (for Triton: the model is ready there)."""
    ready = await gw.engine.ready()
    body = Readiness(ready=ready, engine=gw.engine.name, model=gw.spec.name, version=gw.spec.version)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@ops.get("/metrics", response_class=Response)
async def metrics(gw: GatewayDep) -> Response:
    """Prometheus text format."""
    return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)


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
        request.app.state.gateway.metrics.rejected.labels("engine_unavailable").inc()
        return error_response(503, "engine_unavailable", str(exc), {"Retry-After": str(retry_after_s)})

    async def failed(request: Request, exc: EngineFailure) -> JSONResponse:
        log.error("engine failure: %s", exc)
        return error_response(502, "engine_failure", str(exc))

    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal_error", f"{type(exc).__name__}: the server failed; see its log")

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(EngineUnavailable, unavailable)
    app.add_exception_handler(EngineFailure, failed)
    app.add_exception_handler(Exception, crashed)


def create_app(settings: Settings) -> FastAPI:
    """The gateway for ``settings`` (the model is read now; the engine starts with the app)."""
    gw = Gateway(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gw.engine.start()
        try:
            yield
        finally:
            await gw.engine.close()

    spec = gw.spec
    description = (f"Dense maps ({', '.join(spec.tasks)}) of uploaded images from model {spec.name!r} "
                   f"v{spec.version} ({spec.height}x{spec.width} input), engine {settings.engine}.")
    app = FastAPI(title="FAAR gateway", version=str(spec.version), lifespan=lifespan, description=description)
    app.state.gateway = gw
    app.include_router(api)
    app.include_router(ops)
    app.include_router(web.router)  # the page is public; its API calls carry the key
    app.mount("/static", web.static_files(), name="static")
    install_error_handlers(app, settings.retry_after_s)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], expose_headers=["Server-Timing"])
    app.add_middleware(MetricsMiddleware, metrics=gw.metrics)  # outermost: counts every answer
    return app
