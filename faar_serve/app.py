"""The FastAPI gateway: ``create_app(settings)`` builds the parts and wires them together.

Request path: metrics (outermost: counts every answer) -> CORS (if configured) -> body
limit (while streaming) -> router -> API key (``/v1`` only) -> ``Gateway.predict``:
admission (bounded: past ``max_queue`` images in the gateway, 503 + Retry-After) -> decode
+ resize (worker thread) -> engine -> resize maps back + encode (worker thread). Every
refusal is a JSON ``{"error", "detail"}`` with a 4xx/5xx status (``errors``); nothing a
client sends can stall the event loop.

Where things live: ``gateway`` (the prediction path), ``admission`` (the bounded queue),
``auth`` (the API key), ``middleware`` (body limit, request metrics), ``errors``,
``telemetry`` (Prometheus), ``routes/`` (one router per audience), ``engines/``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from .admission import Admission
from .engines import create_engine
from .errors import install_error_handlers
from .gateway import Gateway
from .manifest import load_model_spec
from .middleware import BodyLimitMiddleware, MetricsMiddleware
from .routes import inference, operations, web
from .settings import Settings
from .telemetry import Metrics


def create_gateway(settings: Settings) -> Gateway:
    """Reads the model now (a bad repository fails here, named); the engine starts with the app."""
    spec = load_model_spec(settings.model_repository, settings.model, settings.model_version)
    metrics = Metrics()
    admission = Admission(settings.max_queue, metrics, settings.retry_after_s)
    engine = create_engine(settings, spec, lambda: admission.upstream, metrics.batch_size.observe)
    return Gateway(settings, spec, metrics, admission, engine)


def create_app(settings: Settings) -> FastAPI:
    """The gateway for ``settings`` (the model is read now; the engine starts with the app)."""
    gw = create_gateway(settings)

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
    app.include_router(inference.router)
    app.include_router(operations.router)
    app.include_router(web.router)  # the page is public; its API calls carry the key
    app.mount("/static", web.static_files(), name="static")
    install_error_handlers(app, settings.retry_after_s)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], expose_headers=["Server-Timing"])
    app.add_middleware(MetricsMiddleware, metrics=gw.metrics)  # outermost: counts every answer
    return app
