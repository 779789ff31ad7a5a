"""Operations: liveness, readiness and Prometheus metrics; public, outside ``/v1``.

``/healthz`` answers while the process runs; ``/readyz`` asks the engine (for Triton: is
the model ready there), so load balancers stop sending work while Triton is down without
the container being restarted. Both ``/readyz`` and ``/metrics`` (``faar_engine_info``)
say what runs the graph: ONNX Runtime's execution provider now (it may have fallen back to
the CPU) or Triton's instance kind. A gateway in front of Triton that has not reached it
yet answers ``/readyz`` 503 with ``version`` null and the reason in ``detail``.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

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
    engine = gw.engine
    ready = await engine.ready()
    spec = engine.spec
    body = Readiness(ready=ready, engine=engine.name, model=gw.settings.model, version=spec.version if spec else None,
                     provider=engine.provider, detail=None if ready else engine.detail)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response)
async def metrics(gw: GatewayDep) -> Response:
    """Prometheus text format (every worker's, with ``--workers``); needs the API key when one is set,
    unless ``--metrics-public``."""
    gw.metrics.describe_engine(gw.engine)
    return Response(gw.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
