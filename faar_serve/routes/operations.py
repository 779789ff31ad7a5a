"""Operations: liveness, readiness and Prometheus metrics; public, outside ``/v1``.

``/healthz`` answers while the process runs; ``/readyz`` asks the engine (for Triton: is
the model ready there), so load balancers stop sending work while Triton is down without
the container being restarted.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..gateway import GatewayDep
from ..schemas import Health, Readiness

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is up (liveness)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(gw: GatewayDep) -> JSONResponse:
    """The engine is loaded and answering (for Triton: the model is ready there)."""
    ready = await gw.engine.ready()
    body = Readiness(ready=ready, engine=gw.engine.name, model=gw.spec.name, version=gw.spec.version)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response)
async def metrics(gw: GatewayDep) -> Response:
    """Prometheus text format."""
    return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)
