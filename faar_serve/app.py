"""The FastAPI gateway: ``create_app(settings)`` builds the parts and wires them together.

Request path, each step refusing as early and as cheaply as it can: the HTTP server
(``server``: header size 431, header and keep-alive timeouts, connection cap) -> metrics
(outermost ASGI: counts every answer) -> CORS (if configured) -> API key (from the headers,
before the body) -> body limit and body timeout (while streaming) -> early refusal (a
prediction that cannot make its deadline, from the headers) -> router (input rules)
-> ``Gateway.predict``: each image's header -> its cost -> admission (memory budget,
deadline, count; 413/503 + Retry-After) -> decode + resize (worker thread) -> engine (with
the deadline) -> resize maps back + encode (worker thread). Every refusal is a JSON
``{"error", "detail"}`` with a 4xx/5xx status (``errors``); nothing a client sends can
stall the event loop.

Where things live: ``gateway`` (the prediction path), ``cost`` (an image's peak memory),
``admission`` (budget, deadline, count), ``auth`` (the API key), ``middleware`` (key, body
limit and timeout, request metrics), ``errors``, ``telemetry`` (Prometheus), ``routes/``
(one router per audience), ``engines/``, ``server`` (granian and its workers).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from .admission import Admission
from .engines import create_engine
from .errors import install_error_handlers
from .gateway import Gateway
from .manifest import ModelSpec
from .middleware import ApiKeyMiddleware, BodyLimitMiddleware, EarlyRefusalMiddleware, MetricsMiddleware
from .routes import inference, operations, web
from .settings import Settings
from .telemetry import Metrics


def create_gateway(settings: Settings) -> Gateway:
    """The embedded engine reads the model now (a bad repository fails here, named); the Triton
    engine learns it from Triton once it answers. Engines start with the app."""
    metrics = Metrics()
    admission = Admission(budget_bytes=settings.budget_bytes, max_images=settings.max_queue,
                          wait_s=settings.admission_wait_s, retry_after_s=settings.retry_after_s, metrics=metrics)
    engine = create_engine(settings, lambda: admission.upstream, metrics.batch_size.observe)
    pool = None
    if settings.render_threads > 1:
        pool = ThreadPoolExecutor(settings.render_threads, thread_name_prefix="faar-render")
    return Gateway(settings, metrics, admission, engine, pool)


def describe(settings: Settings, spec: ModelSpec | None) -> str:
    """The OpenAPI description: the model's tasks and size when known at start."""
    if spec is None:
        return (f"Dense maps of uploaded images from model {settings.model!r} served by Triton at "
                f"{settings.triton_url}; its tasks, input size and version: GET /v1/model.")
    return (f"Dense maps ({', '.join(spec.tasks)}) of uploaded images from model {spec.name!r} "
            f"v{spec.version} ({spec.height}x{spec.width} input), engine {settings.engine}.")


def create_app(settings: Settings) -> FastAPI:
    """The gateway for ``settings`` (the embedded engine reads the model now; engines start with the app)."""
    gw = create_gateway(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gw.engine.start()
        try:
            yield
        finally:
            await gw.engine.close()
            if gw.render_pool is not None:
                gw.render_pool.shutdown()

    spec = gw.engine.spec
    app = FastAPI(title="FAAR gateway", version=str(spec.version) if spec else "from Triton", lifespan=lifespan,
                  description=describe(settings, spec), docs_url=None, redoc_url=None)  # /docs: routes.web
    app.state.gateway = gw
    app.include_router(inference.router)
    app.include_router(operations.router)
    app.include_router(web.router)  # the page is public; its API calls carry the key
    app.mount(web.SWAGGER, web.swagger_files(), name="swagger")
    app.mount("/static", web.static_files(), name="static")
    install_error_handlers(app, settings.retry_after_s)
    app.add_middleware(EarlyRefusalMiddleware, paths=inference.PREDICTION_PATHS, check=gw.check_arrival)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes, timeout_s=settings.body_timeout_s)
    if settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, key=settings.api_key, metrics_public=settings.metrics_public)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], expose_headers=["Server-Timing"])
    app.add_middleware(MetricsMiddleware, metrics=gw.metrics)  # outermost: counts every answer
    return app
