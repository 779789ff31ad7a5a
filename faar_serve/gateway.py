"""The Gateway: what every route shares, and one prediction from uploads to rendered maps.

``predict`` is the request path after the body limit: admission -> read + decode + resize
(worker threads) -> one engine call for all uploads -> resize maps back + encode (worker
threads). CPU work never runs on the event loop, so no upload can stall other requests.
The parts (settings, model spec, metrics, admission, engine) are built and wired by
``app.create_app``; routes reach the Gateway through the ``GatewayDep`` dependency.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from . import codec
from .admission import Admission
from .engines import Engine, EngineResult
from .errors import ApiError
from .manifest import ModelSpec
from .settings import Settings
from .telemetry import Metrics


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


@dataclass
class Gateway:
    """What the routes share: settings, model, metrics, admission, engine."""

    settings: Settings
    spec: ModelSpec
    metrics: Metrics
    admission: Admission
    engine: Engine

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


def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
