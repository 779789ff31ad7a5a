"""Embedded engine: ONNX Runtime in this process, behind a micro-batcher.

Concurrent requests are gathered image by image into one ``session.run`` of up to
``max_batch_size`` images: the first waiting image holds the batch open for at most
``max_queue_delay_ms``, but only while more images are on their way (admitted by the
gateway, still being read or decoded): a lone request never waits for company that cannot
come. Images that queued while the previous batch ran go at once. Runs happen on
dedicated worker threads, so the event loop never blocks: one at a time by default (ONNX
Runtime already uses every core for one run), or ``streams`` at once, each on its own
session with cores / streams threads. A small model cannot keep several cores busy within
one image, so on the CPU two single-threaded runs side by side serve about 1.6x the images
of one run on two threads (the demo model, bench/RESULTS.md); a large model gains nothing
and each image takes longer, hence one stream by default. Each image keeps its own future,
so results go back to the request that sent them, whatever the batch composition. Nothing
is computed for a caller who is gone: an image whose request was cancelled (its client
disconnected) or whose deadline has passed is dropped when its batch is formed.

The session comes from ``faar_serve.providers`` (device, TF32 off unless asked, no silent
CPU fall-back for ``--device cuda``); ``provider`` says what runs now (``/readyz``,
``/metrics``), since with ``--device auto`` ONNX Runtime may fall back to the CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from ..manifest import ModelSpec
from ..providers import CPU, ProviderError, create_session, running_provider
from ..settings import usable_cores
from .base import BatchLimit, BatchObserver, DeadlineExceeded, Engine, EngineFailure, EngineResult, EngineUnavailable

log = logging.getLogger("faar_serve")
RunFn = Callable[[np.ndarray], dict[str, np.ndarray]]


@dataclass
class _Item:
    image: np.ndarray
    future: asyncio.Future[tuple[dict[str, np.ndarray], float]]
    deadline: float | None = None
    enqueued: float = field(default_factory=time.monotonic)

    def wanted(self, now: float) -> bool:
        """Still awaited by its request and not past its deadline (then failed with ``DeadlineExceeded``)."""
        if self.future.done():  # its request was cancelled
            return False
        if self.deadline is not None and now > self.deadline:
            self.future.set_exception(DeadlineExceeded("the request's deadline passed while it was queued"))
            return False
        return True


class MicroBatcher:
    """Gathers single images into batches for ``runs`` (blocking functions, each called on its own
    thread: one batch at a time per function, as many batches at once as there are functions)."""

    def __init__(self, *, runs: list[RunFn], max_batch_size: int, max_delay_s: float,
                 upstream: Callable[[], int], observe_batch: BatchObserver | None = None) -> None:
        self.runs = runs
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.upstream = upstream  # images on their way to submit(); 0: nobody to wait for
        self.observe_batch = observe_batch
        self._pending: deque[_Item] = deque()
        self._arrived = asyncio.Event()
        self._executors = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"onnx-run-{i}")
                           for i in range(len(runs))]
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._loop(run, executor), name=f"micro-batcher-{i}")
                       for i, (run, executor) in enumerate(zip(self.runs, self._executors, strict=True))]

    @property
    def alive(self) -> bool:
        return bool(self._tasks) and not any(task.done() for task in self._tasks)

    async def submit(self, image: np.ndarray, deadline: float | None = None) -> tuple[dict[str, np.ndarray], float]:
        """One image -> (its outputs without the batch axis, seconds it waited for its batch)."""
        if not self.alive:
            raise EngineUnavailable("the ONNX Runtime engine is not running")
        item = _Item(image, asyncio.get_running_loop().create_future(), deadline)
        self._pending.append(item)
        self._arrived.set()
        return await item.future

    async def _wait_arrival(self, timeout: float | None) -> bool:
        self._arrived.clear()
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def _next_batch(self) -> list[_Item]:
        while not self._pending:
            await self._wait_arrival(None)
        deadline = self._pending[0].enqueued + self.max_delay_s
        while len(self._pending) < self.max_batch_size and self.upstream() > 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not await self._wait_arrival(remaining):
                break
        now = time.monotonic()
        batch: list[_Item] = []
        while self._pending and len(batch) < self.max_batch_size:
            item = self._pending.popleft()
            if item.wanted(now):
                batch.append(item)
        return batch

    async def _loop(self, run: RunFn, executor: ThreadPoolExecutor) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._next_batch()
            if not items:
                continue
            started = time.monotonic()
            if self.observe_batch:
                self.observe_batch(len(items))
            try:
                batch = np.stack([i.image for i in items])
                outputs = await loop.run_in_executor(executor, run, batch)
            except Exception as exc:  # onnxruntime raises untyped errors; every waiting request hears it
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(EngineFailure(f"onnxruntime: {exc}"))
                continue
            for k, item in enumerate(items):
                if not item.future.done():
                    item.future.set_result(({n: a[k] for n, a in outputs.items()}, started - item.enqueued))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.set_exception(EngineUnavailable("the gateway is shutting down"))
        for executor in self._executors:
            executor.shutdown(wait=True)


class OnnxEngine(Engine):
    name = "onnx"

    def __init__(self, *, spec: ModelSpec, device: str, max_batch_size: int | None, max_queue_delay_ms: float,
                 upstream: Callable[[], int], spin_wait: bool = False, tf32: bool = False, streams: int = 1,
                 observe_batch: BatchObserver | None = None) -> None:
        self.spec = spec
        self.onnx_path = spec.onnx_path
        self.input_name = spec.input_name
        self.output_names = spec.output_names
        self.batch = BatchLimit(requested=max_batch_size, model=spec.max_batch_size)
        self.device = device
        self.tf32 = tf32
        self.max_delay_s = max_queue_delay_ms / 1000
        self.upstream = upstream
        self.spin_wait = spin_wait
        self.streams = streams
        self.observe_batch = observe_batch
        self.sessions: list[ort.InferenceSession] = []
        self.batcher: MicroBatcher | None = None

    async def start(self) -> None:
        threads = 0 if self.streams == 1 else max(1, usable_cores() // self.streams)  # 0: every core
        try:
            self.sessions = [await asyncio.to_thread(create_session, self.onnx_path, self.device, self.spin_wait,
                                                     self.tf32, threads) for _ in range(self.streams)]
        except ProviderError as exc:
            raise EngineFailure(str(exc)) from exc
        max_batch_size = self.batch.size(cpu=running_provider(self.sessions[0]) == CPU)
        log.info("onnx engine: %s on %s, batches of up to %d, %d at once", self.onnx_path,
                 self.sessions[0].get_providers(), max_batch_size, self.streams)
        self.batcher = MicroBatcher(runs=[functools.partial(self._run, s) for s in self.sessions],
                                    max_batch_size=max_batch_size, max_delay_s=self.max_delay_s,
                                    upstream=self.upstream, observe_batch=self.observe_batch)
        self.batcher.start()

    def _run(self, session: ort.InferenceSession, batch: np.ndarray) -> dict[str, np.ndarray]:
        arrays = session.run(self.output_names, {self.input_name: batch})
        return dict(zip(self.output_names, arrays, strict=True))

    async def infer(self, batch: np.ndarray, deadline: float | None = None) -> EngineResult:
        if self.batcher is None:
            raise EngineUnavailable("the ONNX Runtime engine is not loaded")
        t0 = time.monotonic()
        results = await asyncio.gather(*(self.batcher.submit(image, deadline) for image in batch))
        wall = time.monotonic() - t0
        queue = min(waited for _, waited in results)
        outputs = {n: np.stack([r[n] for r, _ in results]) for n in self.output_names}
        return EngineResult(outputs, queue * 1000, (wall - queue) * 1000)

    async def ready(self) -> bool:
        return self.batcher is not None and self.batcher.alive

    @property
    def provider(self) -> str | None:
        """The session's first provider, read each time: ONNX Runtime may have fallen back since."""
        return running_provider(self.sessions[0]) if self.sessions else None

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()
