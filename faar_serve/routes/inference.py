"""``/v1``: the inference API (one image, a batch, the model's manifest), behind the API key.

Routes only parse and answer: the query parameters are typed here (so ``/docs`` shows them),
the work is ``Gateway.predict`` (cancelled if the client disconnects), the answer is a
``Prediction`` / ``BatchPrediction`` or an NPZ of the exact arrays, with the server stages in
``Server-Timing``. The API key is checked before the body by ``middleware.ApiKeyMiddleware``;
the ``bearer`` scheme here only documents it in the OpenAPI schema.

Input rules (issue 14): no silent choices. A query parameter given twice, or two ``image``
fields on ``/v1/predict``, is a 422 naming it; ``tasks`` absent means every task, and
``tasks`` present but naming none (``tasks=`` or ``tasks=,``) is a 422 rather than an
answer without maps that still cost an inference.
"""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Query, Request, Security, UploadFile
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from .. import codec
from ..auth import bearer
from ..errors import ERROR_RESPONSES, ApiError
from ..gateway import Gateway, GatewayDep, Rendered
from ..schemas import BatchPrediction, ModelInfo, Prediction, TaskMap

NPZ_MEDIA_TYPE = "application/octet-stream"
TasksQuery = Annotated[str | None, Query(
    description="comma-separated subset, e.g. semseg,depth; absent: all; present but empty: 422",
    examples=["semseg,depth"])]
FormatQuery = Annotated[Literal["json", "npz"], Query(
    description="json: PNG maps in base64; npz: the arrays (label maps uint8, the other maps float16 or "
                "float32 as `precision` says, normals as [3, H, W]); keys '<task>' (batch: '<index>/<task>')")]
SizeQuery = Annotated[str, Query(
    pattern=codec.SIZE_PATTERN, description=f"the maps' size: {codec.SIZE_HELP}; the answer's width and height "
    "state it", examples=["original", "model", "1024"])]
PrecisionQuery = Annotated[codec.Precision, Query(
    description="format=npz: float16 (default; 11 significant bits, e.g. depth at 10 m to within 4 mm) or "
                "float32 for every map other than labels")]
PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES, 200: {"content": {NPZ_MEDIA_TYPE: {}}, "description": "JSON, or NPZ with format=npz"}}



async def no_repeated_parameters(request: Request) -> None:
    repeated = sorted(k for k, n in Counter(k for k, _ in request.query_params.multi_items()).items() if n > 1)
    if repeated:
        raise ApiError(422, "repeated_parameter", f"query parameter(s) {repeated} given more than once; give each "
                       "once (several tasks: tasks=a,b)")


async def one_image(request: Request) -> None:
    """``/v1/predict`` takes one ``image`` field (the form is parsed and cached by then)."""
    count = len((await request.form()).getlist("image"))
    if count > 1:
        raise ApiError(422, "repeated_field", f"{count} 'image' fields; /v1/predict takes one image, "
                       "/v1/predict/batch several (field 'images')")


router = APIRouter(prefix="/v1", dependencies=[Security(bearer), Depends(no_repeated_parameters)],
                   tags=["inference"])


def server_timing(timings: dict[str, float]) -> str:
    return ", ".join(f"{stage};dur={ms}" for stage, ms in timings.items())


def prediction(gw: Gateway, rendered: Rendered) -> Prediction:
    tasks = {name: TaskMap(**fields) for name, fields in rendered.maps.items()}
    return Prediction(model=gw.spec.name, version=gw.spec.version, width=rendered.width, height=rendered.height,
                      image_width=rendered.image_width, image_height=rendered.image_height, tasks=tasks,
                      timings_ms=rendered.timings_ms)


@router.post("/predict", response_model=Prediction, responses=PREDICT_RESPONSES,
             dependencies=[Depends(one_image)])
async def predict(gw: GatewayDep, request: Request,
                  image: Annotated[UploadFile, File(description=codec.FORMAT_NAMES)],
                  tasks: TasksQuery = None, format: FormatQuery = "json", size: SizeQuery = "original",
                  precision: PrecisionQuery = "float16") -> Any:
    """Every map (or the ``tasks`` asked for) of one image, at the image's own size or the ``size`` asked for."""
    names = gw.tasks(tasks)
    work = gw.predict([image], names, format, codec.parse_size(size), precision, request.state)
    (rendered,) = await gw.until_disconnected(request, work)
    headers = {"Server-Timing": server_timing(rendered.timings_ms)}
    if format == "npz":
        return Response(codec.npz_bytes(rendered.maps), media_type=NPZ_MEDIA_TYPE, headers=headers)
    return JSONResponse(prediction(gw, rendered).model_dump(exclude_none=True), headers=headers)


@router.post("/predict/batch", response_model=BatchPrediction, responses=PREDICT_RESPONSES)
async def predict_batch(gw: GatewayDep, request: Request,
                        images: Annotated[list[UploadFile], File(description="one field per image")],
                        tasks: TasksQuery = None, format: FormatQuery = "json", size: SizeQuery = "original",
                        precision: PrecisionQuery = "float16") -> Any:
    """Several images in one request (one engine call), answered in upload order."""
    names = gw.tasks(tasks)
    limit = min(gw.settings.max_batch_images, gw.settings.max_queue)  # a bigger one could never be admitted
    if len(images) > limit:
        raise ApiError(413, "too_many_images", f"{len(images)} images; a batch request takes at most {limit}")
    work = gw.predict(images, names, format, codec.parse_size(size), precision, request.state)
    rendered = await gw.until_disconnected(request, work)
    if format == "npz":
        arrays = {f"{i}/{task}": arr for i, r in enumerate(rendered) for task, arr in r.maps.items()}
        return Response(codec.npz_bytes(arrays), media_type=NPZ_MEDIA_TYPE)
    answer = BatchPrediction(model=gw.spec.name, version=gw.spec.version,
                             results=[prediction(gw, r) for r in rendered])
    return JSONResponse(answer.model_dump(exclude_none=True))


@router.get("/model", response_model=ModelInfo)
async def model(gw: GatewayDep) -> JSONResponse:
    """The served model: tasks (classes, palettes, units), input size, version, parity summary."""
    manifest = gw.spec.manifest
    body = ModelInfo.of(manifest).model_dump(mode="json", exclude={"manifest"})
    if gw.settings.expose_manifest:
        body["manifest"] = manifest.model_dump(mode="json")  # as the file has it, nulls included
    return JSONResponse(body)


# The routes ``middleware.EarlyRefusalMiddleware`` may refuse from their headers.
PREDICTION_PATHS = frozenset(r.path for r in router.routes if isinstance(r, APIRoute) and "POST" in r.methods)
