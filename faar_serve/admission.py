"""Admission: refuse early and cheaply what the gateway cannot serve well, before any pixel is decoded.

A request is admitted once, for all its images, after its body is read and each image's
header is probed (``cost``) and before anything is decoded. Before that, from its headers
alone, it is refused when not even one image could be served in time (steps 2-3 for one
image, ``check_arrival``): under overload most refusals then cost no multipart parse, image
header read or thread hop (bench/RESULTS.md, overload). In this order:

1. **Too costly for this gateway**: an image whose peak memory (``cost.image_cost``) is over
   the whole budget could never be admitted: 413 ``too_costly``, with the budget in the text.
2. **Deadline**: the request must answer within ``request_timeout_s`` of its arrival. The
   ``ServiceClock`` measures, under the load there actually is, the engine's time per image
   and the whole gateway's (busy time per finished image, an exponential average, so a
   batching engine, a Triton with several instances or a pipeline of decode, engine and
   render on shared cores all read as their throughput), and the per-image decode and
   render times. With B images ahead in the engine's queue and G in the gateway, a request
   of k images is expected to answer after the longer of max(decode, B x engine) +
   k x engine + render and (G + k) x gateway, times a calibration: the running ratio of
   how long admitted requests took, from admission until their answer had been sent, to
   what was foreseen (it absorbs what the model does not see: HTTP, multipart parsing and
   JSON of this and other requests on the same cores), plus four times its mean deviation, so
   that most admitted requests finish in time rather than half of them (bounded to
   [0.5, 4]). The deadline
   counts from the request's arrival (its headers), as a client sees it. If the expected
   answer is past the deadline the request is refused now, 503 ``deadline`` with a
   Retry-After of the excess, rather than computed for a caller who will have given up.
   With nothing ahead a request is always admitted: the estimate can be stale, and only
   work that runs keeps it true.
3. **Count**: at most ``max_queue`` images between admission and answer (503 ``overloaded``).
4. **Memory budget**: the admitted images' costs add up to at most the budget. Work over it
   waits in arrival order (no small request overtakes a big one that waits) for at most
   ``admission_wait_s`` and never past its deadline, then 503 ``overloaded`` + Retry-After.

Everything runs on the one event loop, so the counters need no lock. The budget is this
worker's: with ``--workers N`` each process admits on its own (the default budget is the
machine's share divided by N).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from .errors import ApiError
from .telemetry import Metrics

MB = 1e6
EWMA = 0.2  # weight of the newest sample: a few requests move the estimate, one outlier does not
CALIBRATION_MIN, CALIBRATION_MAX = 0.5, 4.0
SPREAD = 4.0  # deviations of margin, as TCP: most admitted requests finish in time, not half of them


def _ewma(old: float | None, sample: float) -> float:
    return sample if old is None else old + EWMA * (sample - old)


@dataclass
class BusyClock:
    """Seconds per image while busy: the time since the last start-from-idle or completion, shared by
    the images that complete. Under load that is the inverse of the throughput, whatever the
    batching or parallelism behind it; alone it is one image's service time."""

    per_image_s: float | None = None
    _busy: int = 0  # images inside now
    _mark: float = 0.0

    def started(self, images: int) -> None:
        if self._busy == 0:
            self._mark = time.monotonic()
        self._busy += images

    def finished(self, images: int) -> None:
        now = time.monotonic()
        self.per_image_s = _ewma(self.per_image_s, (now - self._mark) / images)
        self._mark = now
        self._busy -= images


@dataclass
class ServiceClock:
    """Measured service times: the engine's and the whole gateway's per image while busy (admission
    to answer), decode and render per image."""

    engine: BusyClock = field(default_factory=BusyClock)
    system: BusyClock = field(default_factory=BusyClock)
    decode_s: float | None = None
    render_s: float | None = None
    ratio: float = 1.0  # observed / foreseen time of admitted requests: its running mean ...
    ratio_dev: float = 0.0  # ... and mean deviation

    @property
    def calibration(self) -> float:
        """The ratio with a margin for its spread (as TCP's retransmission timer: mean + k x deviation)."""
        return min(CALIBRATION_MAX, max(CALIBRATION_MIN, self.ratio + SPREAD * self.ratio_dev))

    def stage(self, name: str, seconds_per_image: float) -> None:
        setattr(self, f"{name}_s", _ewma(getattr(self, f"{name}_s"), seconds_per_image))

    def expected_s(self, in_engine_queue: int, in_gateway: int, images: int) -> float:
        """Seconds until a request of ``images`` admitted now answers: the engine's queue ahead of it
        (``in_engine_queue`` images) plus its own stages, or the gateway's throughput with
        ``in_gateway`` images ahead (Little's law), whichever is longer. The second one sees what
        the first cannot: decoding and rendering of others on the same cores."""
        engine, decode, render = self.engine.per_image_s or 0.0, self.decode_s or 0.0, self.render_s or 0.0
        by_engine = max(decode, in_engine_queue * engine) + images * engine + render
        return self.calibration * max(by_engine, (in_gateway + images) * (self.system.per_image_s or 0.0))

    def observed(self, expected_s: float, took_s: float) -> None:
        """An admitted request took ``took_s`` where ``expected_s`` was foreseen: the ratio corrects
        later estimates (bounded, so one outlier cannot shut the gateway or open it wide)."""
        if expected_s > 0:
            sample = took_s / (expected_s / self.calibration)  # against the uncalibrated estimate
            self.ratio_dev = _ewma(self.ratio_dev, abs(sample - self.ratio))
            self.ratio = _ewma(self.ratio, sample)


@dataclass
class Ticket:
    """An admitted request's place: whether its images went into and came out of the engine."""

    images: int
    expected_s: float  # foreseen at admission
    admitted: float = field(default_factory=time.monotonic)
    sent: bool = False
    served: bool = False

    def answered(self, clock: ServiceClock, at: float) -> None:
        """The answer left at ``at``: how long it took from admission corrects the clock."""
        if self.served:
            clock.observed(self.expected_s, at - self.admitted)


@dataclass
class _Waiter:
    cost: int
    ready: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Admission:
    """The gateway's admission control: memory budget, deadline, image count."""

    def __init__(self, *, budget_bytes: int, max_images: int, wait_s: float, retry_after_s: int,
                 metrics: Metrics) -> None:
        self.budget = budget_bytes
        self.max_images = max_images
        self.wait_s = wait_s
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        self.clock = ServiceClock()
        self.used_bytes = 0
        self.images = 0  # admitted and not yet answered
        self.ahead = 0  # admitted and not yet out of the engine
        self.upstream = 0  # admitted and not yet handed to the engine (being decoded)
        self._waiting: deque[_Waiter] = deque()

    def _refuse(self, status: int, code: str, detail: str, retry_after_s: float | None = None) -> ApiError:
        self.metrics.rejected.labels(code).inc()
        headers = None
        if retry_after_s is not None:
            headers = {"Retry-After": str(max(self.retry_after_s, math.ceil(retry_after_s)))}
        return ApiError(status, code, detail, headers)

    def check(self, costs: list[int], deadline: float) -> float:
        """Steps 1-3 (no waiting): raises the refusal, or returns the seconds the request is expected to
        take, when it may queue for memory."""
        worst = max(costs)
        if worst > self.budget:
            raise self._refuse(413, "too_costly", f"this image needs about {worst / MB:.0f} MB to serve; the "
                               f"gateway admits at most {self.budget / MB:.0f} MB of images at once "
                               "(--max-inflight-bytes); send a smaller image")
        return self._in_time(len(costs), deadline)

    def check_arrival(self, deadline: float) -> None:
        """Steps 2-3 for the smallest request (one image) from its headers alone: when not even that
        could be served in time, the refusal needs no byte of the body parsed
        (``middleware.EarlyRefusalMiddleware``). Checked again with the real images once the body is in."""
        self._in_time(1, deadline)

    def _in_time(self, images: int, deadline: float) -> float:
        """Steps 2-3: the seconds ``images`` admitted now are expected to take, or the refusal."""
        expected = self.clock.expected_s(self.ahead, self.images, images)
        late = time.monotonic() + expected - deadline
        if self.images > 0 and late > 0:
            raise self._refuse(503, "deadline", f"{self.images} images are ahead; this request would answer in "
                               f"about {expected:.1f} s, past its deadline (--request-timeout-s); retry later",
                               late)
        if self.images + images > self.max_images:
            raise self._refuse(503, "overloaded", f"{self.images} images in progress, the gateway holds "
                               f"{self.max_images} (--max-queue); retry later", self.retry_after_s)
        return expected

    @contextlib.asynccontextmanager
    async def admit(self, costs: list[int], deadline: float) -> AsyncIterator[Ticket]:
        """Holds the request's images and memory while it runs; refuses as described above."""
        expected = self.check(costs, deadline)
        cost, images = sum(costs), len(costs)
        await self._reserve(cost, deadline)
        ticket = Ticket(images, expected)
        self.clock.system.started(images)
        self.images += images
        self.ahead += images
        self.upstream += images
        self._gauges()
        try:
            yield ticket
        finally:
            if not ticket.sent:  # failed or cancelled before its engine call
                self.upstream -= images
            if not ticket.served:
                self.ahead -= images
            self.clock.system.finished(images)
            self.images -= images
            self.used_bytes -= cost
            self._wake()

    async def _reserve(self, cost: int, deadline: float) -> None:
        if not self._waiting and self.used_bytes + cost <= self.budget:
            self.used_bytes += cost
            return
        waiter = _Waiter(cost)
        self._waiting.append(waiter)
        patience = max(0.0, min(self.wait_s, deadline - time.monotonic()))
        try:
            await asyncio.wait_for(asyncio.shield(waiter.ready), patience)
        except asyncio.TimeoutError:
            pass
        except asyncio.CancelledError:  # the client went away while waiting
            self._give_up(waiter)
            raise
        if waiter.ready.done():  # ``_wake`` counted our cost when it admitted us
            return
        self._give_up(waiter)
        raise self._refuse(503, "overloaded", f"{self.used_bytes / MB:.0f} MB of images in flight, the budget "
                           f"is {self.budget / MB:.0f} MB (--max-inflight-bytes); retry later", self.retry_after_s)

    def _give_up(self, waiter: _Waiter) -> None:
        if waiter.ready.done():  # admitted at the last moment: hand the memory back
            self.used_bytes -= waiter.cost
        else:
            self._waiting.remove(waiter)
            waiter.ready.cancel()
        self._wake()

    def _wake(self) -> None:
        """Admit waiters in arrival order while they fit."""
        while self._waiting and self.used_bytes + self._waiting[0].cost <= self.budget:
            waiter = self._waiting.popleft()
            self.used_bytes += waiter.cost
            waiter.ready.set_result(None)
        self._gauges()

    def _gauges(self) -> None:
        self.metrics.queue_depth.set(self.images)
        self.metrics.inflight_bytes.set(self.used_bytes)

    @contextlib.contextmanager
    def engine(self, ticket: Ticket) -> Iterator[None]:
        """Around the engine call: the images leave ``upstream``, and ``ahead`` when it returns."""
        ticket.sent = True
        self.upstream -= ticket.images
        self.clock.engine.started(ticket.images)
        try:
            yield
        finally:
            self.clock.engine.finished(ticket.images)
            ticket.served = True
            self.ahead -= ticket.images
