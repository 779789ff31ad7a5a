"""Embedded engine: ONNX Runtime in this process, behind a micro-batcher.

Concurrent requests are gathered image by image into one ``session.run`` of up to
``max_batch_size`` images: the first waiting image holds the batch open for at most
``max_queue_delay_ms``, but only while more images are on their way (admitted by the
gateway, still being read or decoded): a lone request never waits for company that cannot
come. Images that queued while the previous batch ran go at once. Runs
happen one at a time on a dedicated worker thread (ONNX Runtime already uses every core
for one run), so the event loop never blocks. Each image keeps its own future, so results
go back to the request that sent them, whatever the batch composition.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .base import BatchLimit, BatchObserver, Engine, EngineFailure, EngineResult, EngineUnavailable

log = logging.getLogger("faar_serve")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
RunFn = Callable[[np.ndarray], dict[str, np.ndarray]]


def providers_for(device: str) -> list[Any]:
    """Execution providers for ``device`` (auto: CUDA when this onnxruntime build has it)."""
    available = ort.get_available_providers()
    if device == "cuda" and CUDA not in available:
        raise EngineFailure(f"--device cuda, but this onnxruntime ({ort.__version__}) has no {CUDA}; "
                            "install onnxruntime-gpu (and a CUDA runtime) or use --device cpu")
    if device == "cpu" or CUDA not in available:
        return [CPU]
    # Device 0 of what CUDA_VISIBLE_DEVICES shows; HEURISTIC avoids a slow cuDNN search at first run.
    # The CPU provider stays as a fallback for nodes without a CUDA kernel.
    return [(CUDA, {"device_id": 0, "cudnn_conv_algo_search": "HEURISTIC"}), CPU]


def create_session(path: Path, device: str, spin_wait: bool = False) -> ort.InferenceSession:
    """A session with the best measured settings (bench/RESULTS.md): every graph optimisation,
    intra-op threads = cores, sequential execution. ``spin_wait`` lets the CPU threads
    busy-wait between operators: faster alone, but in the gateway they take the cores that
    decode and encode other requests (15-27 % of throughput under load for a small model,
    no clear difference for Swin-T)."""
    providers = providers_for(device)
    wanted_cuda = providers[0] != CPU
    if wanted_cuda:
        ort.preload_dlls()  # CUDA/cuDNN of the nvidia-* wheels (onnxruntime-gpu[cuda,cudnn]) or the system
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_wait else "0")
    session = ort.InferenceSession(str(path), options, providers=providers)
    if wanted_cuda and CUDA not in session.get_providers():
        # onnxruntime-gpu silently falls back to the CPU when CUDA/cuDNN libraries are missing.
        if device == "cuda":
            raise EngineFailure(f"{CUDA} failed to initialise (CUDA/cuDNN libraries?); see onnxruntime's log")
        log.warning("CUDA provider failed to initialise; running on the CPU")
    return session


@dataclass
class _Item:
    image: np.ndarray
    future: asyncio.Future[tuple[dict[str, np.ndarray], float]]
    enqueued: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """Gathers single images into batches for ``run`` (a blocking function, called on one thread)."""

    def __init__(self, *, run: RunFn, max_batch_size: int, max_delay_s: float, upstream: Callable[[], int],
                 observe_batch: BatchObserver | None = None) -> None:
        self.run = run
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.upstream = upstream  # images on their way to submit(); 0: nobody to wait for
        self.observe_batch = observe_batch
        self._pending: deque[_Item] = deque()
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx-run")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="micro-batcher")

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def submit(self, image: np.ndarray) -> tuple[dict[str, np.ndarray], float]:
        """One image -> (its outputs without the batch axis, seconds it waited for its batch)."""
        if not self.alive:
            raise EngineUnavailable("the ONNX Runtime engine is not running")
        item = _Item(image, asyncio.get_running_loop().create_future())
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
        batch = [self._pending.popleft() for _ in range(min(len(self._pending), self.max_batch_size))]
        return [item for item in batch if not item.future.done()]  # done: its request was cancelled

    async def _loop(self) -> None:
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
                outputs = await loop.run_in_executor(self._executor, self.run, batch)
            except Exception as exc:  # onnxruntime raises untyped errors; every waiting request hears it
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(EngineFailure(f"onnxruntime: {exc}"))
                continue
            for k, item in enumerate(items):
                if not item.future.done():
                    item.future.set_result(({n: a[k] for n, a in outputs.items()}, started - item.enqueued))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.set_exception(EngineUnavailable("the gateway is shutting down"))
        self._executor.shutdown(wait=True)


class OnnxEngine(Engine):
    name = "onnx"

    def __init__(self, *, onnx_path: Path, input_name: str, output_names: list[str], device: str,
                 batch: BatchLimit, max_queue_delay_ms: float, upstream: Callable[[], int],
                 spin_wait: bool = False, observe_batch: BatchObserver | None = None) -> None:
        self.onnx_path = onnx_path
        self.input_name = input_name
        self.output_names = output_names
        self.device = device
        self.batch = batch
        self.max_delay_s = max_queue_delay_ms / 1000
        self.upstream = upstream
        self.spin_wait = spin_wait
        self.observe_batch = observe_batch
        self.session: ort.InferenceSession | None = None
        self.batcher: MicroBatcher | None = None

    async def start(self) -> None:
        self.session = await asyncio.to_thread(create_session, self.onnx_path, self.device, self.spin_wait)
        max_batch_size = self.batch.size(cpu=self.session.get_providers()[0] == CPU)
        log.info("onnx engine: %s on %s, batches of up to %d", self.onnx_path, self.session.get_providers(),
                 max_batch_size)
        self.batcher = MicroBatcher(run=self._run, max_batch_size=max_batch_size, max_delay_s=self.max_delay_s,
                                    upstream=self.upstream, observe_batch=self.observe_batch)
        self.batcher.start()

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        assert self.session is not None
        arrays = self.session.run(self.output_names, {self.input_name: batch})
        return dict(zip(self.output_names, arrays, strict=True))

    async def infer(self, batch: np.ndarray) -> EngineResult:
        if self.batcher is None:
            raise EngineUnavailable("the ONNX Runtime engine is not loaded")
        t0 = time.monotonic()
        results = await asyncio.gather(*(self.batcher.submit(image) for image in batch))
        wall = time.monotonic() - t0
        queue = min(waited for _, waited in results)
        outputs = {n: np.stack([r[n] for r, _ in results]) for n in self.output_names}
        return EngineResult(outputs, queue * 1000, (wall - queue) * 1000)

    async def ready(self) -> bool:
        return self.batcher is not None and self.batcher.alive

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()
