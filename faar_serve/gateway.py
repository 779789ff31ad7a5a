"""The Gateway: what every route shares, and one prediction from uploads to rendered maps.

``predict`` is the request path after the body limit: admission -> read, header check,
decode at the smallest scale the model needs and resize to its input (worker threads) ->
one engine call for all uploads -> resize maps to the size asked for and encode (worker
threads; one answer's maps in parallel with ``render_threads`` > 1). All of it is
``faar_serve.codec``, the data path ``Predictor`` and ``faar-predict`` share. CPU work never
runs on the event loop, so no upload can stall other requests.

Stages (``Server-Timing``, ``timings_ms``, the stage histogram): ``decode`` (file to pixels),
``resize`` (to the model's input, and its maps to the answer's size), ``queue``,
``inference``, ``encode`` (maps to PNG and base64, or to the NPZ's dtypes).
The parts (settings, metrics, admission, engine) are built and wired by
``app.create_app``; routes reach the Gateway through the ``GatewayDep`` dependency.

The model is the engine's (``Engine.spec``): read from the repository at start by the
embedded engine, from Triton once it answers by the Triton engine. Until then ``spec``
raises ``EngineUnavailable``, so every ``/v1`` route answers 503 with ``Retry-After``
(``/v1/model`` included: there is no manifest to show yet) and ``/readyz`` says why.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from . import codec
from .admission import Admission
from .engines import Engine, EngineResult, EngineUnavailable
from .errors import ApiError
from .manifest import ModelSpec
from .settings import Settings
from .telemetry import Metrics


@dataclass
class Rendered:
    maps: dict[str, Any]  # task -> TaskMap fields (json) or the array (npz)
    height: int  # of every map (the size asked for)
    width: int
    image_height: int  # of the upload, after EXIF orientation
    image_width: int
    timings_ms: dict[str, float]


@dataclass
class Gateway:
    """What the routes share: settings, metrics, admission, engine (and through it the model)."""

    settings: Settings
    metrics: Metrics
    admission: Admission
    engine: Engine
    render_pool: Executor | None = None  # threads for one answer's maps (settings.render_threads > 1)

    @property
    def spec(self) -> ModelSpec:
        """The served model; ``EngineUnavailable`` (503) while the engine does not know it yet."""
        spec = self.engine.spec
        if spec is None:
            raise EngineUnavailable(f"model {self.settings.model!r} is not known yet: {self.engine.detail}")
        return spec

    def tasks(self, names: str | None) -> list[str]:
        try:
            return self.spec.select_tasks(names)
        except KeyError as exc:
            raise ApiError(422, "unknown_task", exc.args[0]) from exc

    def decode(self, data: bytes) -> codec.Prepared:
        """The header first (format, size, limits: nothing decoded yet), then the pixels."""
        probe = codec.probe(data, self.settings.max_image_pixels)
        return codec.prepare(probe, self.spec.height, self.spec.width)

    def render(self, result: EngineResult, index: int, image: codec.Prepared, tasks: list[str], fmt: str,
               size: codec.SizeRequest, precision: codec.Precision) -> Rendered:
        """Image ``index`` of the engine's batch: its maps at ``size``, encoded for ``fmt``."""
        infos = [self.spec.tasks[name] for name in tasks]
        outputs = {t.output: result.outputs[t.output][index] for t in infos}
        model_hw = next(iter(outputs.values())).shape[-2:]
        height, width = codec.output_size(size, image.size, model_hw)
        maps = codec.render(infos, outputs, height, width, fmt, precision, self.render_pool)
        timings = {"decode": image.decode_ms, "resize": image.resize_ms + maps.resize_ms, "queue": result.queue_ms,
                   "inference": result.inference_ms, "encode": maps.encode_ms}
        self.metrics.observe_stages(timings)
        return Rendered(maps.maps, height, width, *image.size, {k: round(v, 3) for k, v in timings.items()})

    async def predict(self, uploads: list[UploadFile], tasks: list[str], fmt: str,
                      size: codec.SizeRequest = "original", precision: codec.Precision = "float16") -> list[Rendered]:
        """Admit, decode, infer in one engine call, render: one ``Rendered`` per upload, in order."""
        with self.admission.slot(len(uploads)):
            with self.admission.before_engine(len(uploads)):
                payloads = [await upload.read() for upload in uploads]
                batch = len(uploads) > 1  # errors name the image only where there are several
                where = [f"image {i} ({u.filename!r}): " if batch else "" for i, u in enumerate(uploads)]
                decoded = await asyncio.gather(*map(self._decode, payloads, where))
            result = await self.engine.infer(np.stack([d.pixels for d in decoded]))
            return list(await asyncio.gather(*(run_in_threadpool(self.render, result, i, d, tasks, fmt, size,
                                                                 precision) for i, d in enumerate(decoded))))

    async def _decode(self, data: bytes, where: str) -> codec.Prepared:
        try:
            return await run_in_threadpool(self.decode, data)
        except codec.ImageError as exc:
            raise ApiError(exc.status, exc.code, where + str(exc)) from exc


def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
