"""``/v1``: the inference API (one image, a batch, the model's manifest), behind the API key.

Routes only parse and answer: the query parameters are typed here (so ``/docs`` shows them),
the work is ``Gateway.predict``, the answer is a ``Prediction`` / ``BatchPrediction`` or an
NPZ of the exact arrays, with the server stages in ``Server-Timing``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Query, UploadFile
from fastapi.responses import JSONResponse, Response

from .. import codec
from ..auth import require_api_key
from ..errors import ERROR_RESPONSES, ApiError
from ..gateway import Gateway, GatewayDep, Rendered
from ..schemas import BatchPrediction, Manifest, Prediction, TaskMap

NPZ_MEDIA_TYPE = "application/octet-stream"
TasksQuery = Annotated[str | None, Query(
    description="comma-separated subset, e.g. semseg,depth; default: all", examples=["semseg,depth"])]
FormatQuery = Annotated[Literal["json", "npz"], Query(
    description="json: PNG maps in base64; npz: the exact arrays (float maps, integer label maps, "
                "normals as [3, H, W]); keys '<task>' (batch: '<index>/<task>')")]
PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES, 200: {"content": {NPZ_MEDIA_TYPE: {}}, "description": "JSON, or NPZ with format=npz"}}

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["inference"])


def server_timing(timings: dict[str, float]) -> str:
    return ", ".join(f"{stage};dur={ms}" for stage, ms in timings.items())


def prediction(gw: Gateway, rendered: Rendered) -> Prediction:
    tasks = {name: TaskMap(**fields) for name, fields in rendered.maps.items()}
    return Prediction(model=gw.spec.name, version=gw.spec.version, width=rendered.width,
                      height=rendered.height, tasks=tasks, timings_ms=rendered.timings_ms)


@router.post("/predict", response_model=Prediction, responses=PREDICT_RESPONSES)
async def predict(gw: GatewayDep, image: Annotated[UploadFile, File(description=codec.FORMAT_NAMES)],
                  tasks: TasksQuery = None, format: FormatQuery = "json") -> Any:
    """Every map (or the ``tasks`` asked for) of one image, at the image's own size."""
    names = gw.tasks(tasks)
    (rendered,) = await gw.predict([image], names, format)
    headers = {"Server-Timing": server_timing(rendered.timings_ms)}
    if format == "npz":
        return Response(codec.npz_bytes(rendered.maps), media_type=NPZ_MEDIA_TYPE, headers=headers)
    return JSONResponse(prediction(gw, rendered).model_dump(exclude_none=True), headers=headers)


@router.post("/predict/batch", response_model=BatchPrediction, responses=PREDICT_RESPONSES)
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


@router.get("/model", response_model=Manifest)
async def model(gw: GatewayDep) -> Any:
    """The export manifest of the model being served (tasks, classes, palette, units, parity...)."""
    return gw.spec.manifest
