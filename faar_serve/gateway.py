"""The Gateway: what every route shares, and one prediction from uploads to rendered maps.

``predict`` is the request path after the body limit: read the uploads -> each image's
header (size, nothing decoded) -> its cost -> admission (budget, deadline, count:
``admission``) -> decode + resize (worker threads) -> one engine call for all uploads, with
the request's deadline -> resize maps back + encode (worker threads). CPU work never runs
on the event loop, so no upload can stall other requests.

A caller who goes away is not computed for: ``until_disconnected`` cancels the request's
work when the server reports the disconnect, which drops its images from the engine's
queue (the embedded batcher skips cancelled items; a cancelled gRPC call leaves Triton's
queue). Work already running in a thread finishes before its memory leaves the budget
(``_in_thread``), so the budget never counts less than what is held.

The parts (settings, model spec, metrics, admission, engine) are built and wired by
``app.create_app``; routes reach the Gateway through the ``GatewayDep`` dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import Depends, Request, UploadFile
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import State

from . import codec, cost
from .admission import Admission
from .engines import Engine, EngineResult
from .errors import ApiError
from .manifest import ModelSpec
from .settings import Settings
from .telemetry import Metrics

T = TypeVar("T")
CLIENT_GONE = 499  # nginx's "client closed request": only the metrics and the log see it


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
        """The ``tasks`` parameter -> task names; absent: all; present but naming none: 422."""
        if names is not None and not any(n.strip() for n in names.split(",")):
            raise ApiError(422, "no_tasks", f"tasks={names!r} names no task; leave it out for every task, or "
                           f"name some of {list(self.spec.tasks)}")
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

    def cost(self, data: bytes, tasks: list[str], fmt: str, where: str) -> int:
        """Peak bytes of one upload, from its header (``cost``); the pixel limit is checked here too."""
        hw = cost.header_size(data) or (0, 0)
        if hw[0] * hw[1] > self.settings.max_image_pixels:
            raise ApiError(413, "too_many_pixels", f"{where}image is {hw[1]}x{hw[0]} = {hw[0] * hw[1]} pixels; "
                           f"the limit is {self.settings.max_image_pixels}")
        return cost.image_cost(upload_bytes=len(data), decoded_hw=hw, output_hw=hw, spec=self.spec, tasks=tasks,
                               fmt=fmt)

    async def predict(self, uploads: list[UploadFile], tasks: list[str], fmt: str,
                      state: State | None = None) -> list[Rendered]:
        """Admit, decode, infer in one engine call, render: one ``Rendered`` per upload, in order.
        ``state`` is the request's (``middleware.MetricsMiddleware``): the deadline counts from its
        ``arrived``, and its ``answered`` is set to tell admission when the answer has gone."""
        deadline = getattr(state, "arrived", time.monotonic()) + self.settings.request_timeout_s
        payloads = [await upload.read() for upload in uploads]
        batch = len(uploads) > 1  # errors name the image only where there are several
        where = [f"image {i} ({u.filename!r}): " if batch else "" for i, u in enumerate(uploads)]
        costs = [self.cost(data, tasks, fmt, w) for data, w in zip(payloads, where, strict=True)]
        async with self.admission.admit(costs, deadline) as ticket:
            if state is not None:
                state.answered = functools.partial(ticket.answered, self.admission.clock)
            t0 = time.monotonic()
            decoded = await asyncio.gather(*map(self._decode, payloads, where))
            self.admission.clock.stage("decode", (time.monotonic() - t0) / len(decoded))
            with self.admission.engine(ticket):
                result = await self.engine.infer(np.stack([d.pixels for d in decoded]), deadline)
            t0 = time.monotonic()
            rendered = await asyncio.gather(*(_in_thread(self.render, result, i, d, tasks, fmt)
                                              for i, d in enumerate(decoded)))
            self.admission.clock.stage("render", (time.monotonic() - t0) / len(decoded))
            return list(rendered)

    async def _decode(self, data: bytes, where: str) -> Decoded:
        try:
            return await _in_thread(self.decode, data)
        except codec.ImageError as exc:
            raise ApiError(exc.status, exc.code, where + str(exc)) from exc

    async def until_disconnected(self, request: Request, work: Awaitable[T]) -> T:
        """``work``, cancelled if the client disconnects first (``ClientGone``)."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            watcher.cancel()
        if task.cancelled():
            self.metrics.rejected.labels("client_gone").inc()
            raise ApiError(CLIENT_GONE, "client_gone", "the client closed the connection; its work was dropped")
        return task.result()


async def _disconnected(request: Request) -> None:
    """Returns when the server reports the client gone (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on a worker thread; if the caller is cancelled meanwhile, it still waits for the
    thread to end (what it holds stays counted) before the cancellation goes on."""
    future = asyncio.ensure_future(run_in_threadpool(fn, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await future
        raise


def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
