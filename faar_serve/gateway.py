"""The Gateway: what every route shares, and one prediction from uploads to rendered maps.

``predict`` is the request path after the body limit: read the uploads -> each image's
header (format, size, limits; nothing decoded: ``codec.probe``) -> its cost in memory
(``cost``) -> admission (budget, deadline, count: ``admission``) -> decode at the smallest
scale the model needs and resize to its input (worker threads) -> one engine call for all
uploads, with the request's deadline -> resize maps to the size asked for and encode
(worker threads; one answer's maps spread over ``render_threads`` threads while fewer images
than that are in the gateway: parallel where cores are idle, one thread each under load,
where the hand-offs only cost). All of it is ``faar_serve.codec``, the data path
``Predictor`` and ``faar-predict`` share. CPU work never runs on the event loop, so no
upload can stall other requests.

A caller who goes away is not computed for: ``until_disconnected`` cancels the request's
work when the server reports the disconnect, which drops its images from the engine's
queue (the embedded batcher skips cancelled items; a cancelled gRPC call leaves Triton's
queue). Work already running in a thread finishes before its memory leaves the budget
(``_in_thread``), so the budget never counts less than what is held.

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
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import Depends, Request, UploadFile
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import State

from . import codec, cost
from .admission import Admission
from .engines import Engine, EngineResult, EngineUnavailable
from .errors import ApiError
from .manifest import ModelSpec
from .settings import Settings
from .telemetry import Metrics

T = TypeVar("T")
CLIENT_GONE = 499  # nginx's "client closed request": only the metrics and the log see it


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

    def _render_pool(self) -> Executor | None:
        """The render threads while cores are idle (fewer images in the gateway than threads): one
        answer's maps in parallel cut its latency there, and cost throughput under load
        (bench/RESULTS.md, data path)."""
        if self.render_pool is not None and self.admission.images < self.settings.render_threads:
            return self.render_pool
        return None

    @property
    def spec(self) -> ModelSpec:
        """The served model; ``EngineUnavailable`` (503) while the engine does not know it yet."""
        spec = self.engine.spec
        if spec is None:
            raise EngineUnavailable(f"model {self.settings.model!r} is not known yet: {self.engine.detail}")
        return spec

    def check_arrival(self, arrived: float) -> None:
        """A prediction that arrived at ``arrived`` (``time.monotonic()``) and could not make its deadline
        even with one image is refused now, from its headers (``middleware.EarlyRefusalMiddleware``)."""
        self.admission.check_arrival(arrived + self.settings.request_timeout_s)

    def tasks(self, names: str | None) -> list[str]:
        """The ``tasks`` parameter -> task names; absent: all; present but naming none: 422."""
        if names is not None and not any(n.strip() for n in names.split(",")):
            raise ApiError(422, "no_tasks", f"tasks={names!r} names no task; leave it out for every task, or "
                           f"name some of {list(self.spec.tasks)}")
        try:
            return self.spec.select_tasks(names)
        except KeyError as exc:
            raise ApiError(422, "unknown_task", exc.args[0]) from exc

    def probe(self, data: bytes) -> codec.Probe:
        """The header only (format, size, limits): nothing decoded yet."""
        return codec.probe(data, self.settings.max_image_pixels)

    def decode(self, probe: codec.Probe) -> codec.Prepared:
        """The pixels, at the smallest scale the model needs, resized to its input."""
        return codec.prepare(probe, self.spec.height, self.spec.width)

    def cost(self, upload: bytes, probe: codec.Probe, tasks: list[str], fmt: str, size: codec.SizeRequest,
             precision: codec.Precision) -> int:
        """Peak bytes of one upload, from its header (``cost``)."""
        spec = self.spec
        model_hw = tuple(spec.manifest.outputs[0].shape[-2:])  # every map's resolution in the graph
        return cost.image_cost(upload_bytes=len(upload), decoded_hw=probe.decoded_size(spec.height, spec.width),
                               output_hw=codec.output_size(size, probe.size, model_hw), spec=spec, tasks=tasks,
                               fmt=fmt, npz_value_bytes=2 if precision == "float16" else 4)

    def render(self, result: EngineResult, index: int, image: codec.Prepared, tasks: list[str], fmt: str,
               size: codec.SizeRequest, precision: codec.Precision) -> Rendered:
        """Image ``index`` of the engine's batch: its maps at ``size``, encoded for ``fmt``."""
        infos = [self.spec.tasks[name] for name in tasks]
        outputs = {t.output: result.outputs[t.output][index] for t in infos}
        model_hw = next(iter(outputs.values())).shape[-2:]
        height, width = codec.output_size(size, image.size, model_hw)
        maps = codec.render(infos, outputs, height, width, fmt, precision, self._render_pool())
        timings = {"decode": image.decode_ms, "resize": image.resize_ms + maps.resize_ms, "queue": result.queue_ms,
                   "inference": result.inference_ms, "encode": maps.encode_ms}
        self.metrics.observe_stages(timings)
        return Rendered(maps.maps, height, width, *image.size, {k: round(v, 3) for k, v in timings.items()})

    async def predict(self, uploads: list[UploadFile], tasks: list[str], fmt: str,
                      size: codec.SizeRequest = "original", precision: codec.Precision = "float16",
                      state: State | None = None) -> list[Rendered]:
        """Admit, decode, infer in one engine call, render: one ``Rendered`` per upload, in order.
        ``state`` is the request's (``middleware.MetricsMiddleware``): the deadline counts from its
        ``arrived``, and its ``answered`` is set to tell admission when the answer has gone."""
        deadline = getattr(state, "arrived", time.monotonic()) + self.settings.request_timeout_s
        payloads = [await upload.read() for upload in uploads]
        batch = len(uploads) > 1  # errors name the image only where there are several
        where = [f"image {i} ({u.filename!r}): " if batch else "" for i, u in enumerate(uploads)]
        probes = await asyncio.gather(*(self._image_step(self.probe, data, w) for data, w in zip(payloads, where,
                                                                                                  strict=True)))
        costs = [self.cost(data, p, tasks, fmt, size, precision) for data, p in zip(payloads, probes, strict=True)]
        async with self.admission.admit(costs, deadline) as ticket:
            if state is not None:
                state.answered = functools.partial(ticket.answered, self.admission.clock)
            t0 = time.monotonic()
            decoded = await asyncio.gather(*(self._image_step(self.decode, p, w) for p, w in zip(probes, where,
                                                                                                  strict=True)))
            self.admission.clock.stage("decode", (time.monotonic() - t0) / len(decoded))
            with self.admission.engine(ticket):
                result = await self.engine.infer(np.stack([d.pixels for d in decoded]), deadline)
            t0 = time.monotonic()
            rendered = await asyncio.gather(*(_in_thread(self.render, result, i, d, tasks, fmt, size, precision)
                                              for i, d in enumerate(decoded)))
            self.admission.clock.stage("render", (time.monotonic() - t0) / len(decoded))
            return list(rendered)

    async def _image_step(self, step: Callable[[Any], T], item: Any, where: str) -> T:
        """``step(item)`` on a worker thread; a codec error becomes the answer, naming the image."""
        try:
            return await _in_thread(step, item)
        except codec.ImageError as exc:
            raise ApiError(exc.status, exc.code, where + str(exc)) from exc

    async def until_disconnected(self, request: Request, work: Awaitable[T]) -> T:
        """``work``, cancelled if the client disconnects first (499 ``client_gone``)."""
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
