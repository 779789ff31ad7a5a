"""Remote engine: a Triton Inference Server, over gRPC or HTTP with ``tritonclient``'s asyncio clients.

Triton does the dynamic batching (config.pbtxt), so every request goes out as it comes,
split only where it holds more images than the model's ``max_batch_size``. One client
(one gRPC channel, or one aiohttp connection pool) is reused for every call, and every
call carries a deadline. Transport failures (server down, restarting, deadline passed)
become ``EngineUnavailable`` (503) right away; nothing is retried inside the gateway, and
the next call simply tries again: the gRPC channel reconnects on its own, with its backoff
capped at one second so a restarted server is found quickly, and aiohttp opens new
connections as needed.

Several Triton replicas are balanced by gRPC itself, not by the gateway: the URL may be any
gRPC target name, ``dns:///triton-headless:8001`` (every address the name resolves to; a
Kubernetes headless Service lists its ready pods) or ``ipv4:10.0.0.1:8001,10.0.0.2:8001``,
and the channel's ``round_robin`` policy keeps a connection to each address and sends each
call to the next ready one. A dead replica fails only the calls in flight on it; its
address is skipped until it accepts connections again. gRPC re-resolves a DNS name when a
connection closes, which Triton's ``--grpc-max-connection-age`` forces now and then so that
new replicas are found (deploy/k8s). The HTTP client talks to one server only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import aiohttp
import numpy as np
import tritonclient.grpc.aio as grpc_aio
import tritonclient.http.aio as http_aio
from tritonclient.grpc import KeepAliveOptions
from tritonclient.utils import InferenceServerException

from .base import BatchLimit, BatchObserver, Engine, EngineFailure, EngineResult, EngineUnavailable

T = TypeVar("T")
MAX_MESSAGE_BYTES = 2**31 - 1  # outputs of a batch of 512x512 maps exceed gRPC's 4 MB default
RECONNECT_BACKOFF_MS = 1000
READY_TIMEOUT_S = 2.0  # readiness probes must answer fast even when Triton hangs
TRANSIENT_STATUSES = {
    "StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.RESOURCE_EXHAUSTED",
    "StatusCode.CANCELLED", "429", "502", "503", "504",
}
GRPC_NAME_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:")  # gRPC's naming doc


def check_url(url: str, protocol: str) -> str:
    """``url`` if ``protocol``'s client can use it, else a ``ValueError`` that says what it takes."""
    if protocol == "grpc":
        if url.startswith(GRPC_NAME_SCHEMES) or ("://" not in url and "," not in url):
            return url
        raise ValueError(f"triton url {url!r}: gRPC takes host:port or a gRPC target name, dns:///host:port "
                         "(every address the name resolves to) or ipv4:host1:port1,host2:port2")
    if url.startswith(GRPC_NAME_SCHEMES) or "://" in url or "," in url:
        raise ValueError(f"triton url {url!r}: the HTTP client talks to one server, give host:port "
                         "(several replicas: --triton-protocol grpc with dns:///host:port or an ipv4: list)")
    return url


def grpc_channel_args() -> list[tuple[str, Any]]:
    keepalive = KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
        ("grpc.lb_policy_name", "round_robin"),  # every resolved address, not just the first
    ]


class TritonEngine(Engine):
    name = "triton"

    def __init__(self, *, url: str, protocol: str, model: str, version: int, input_name: str,
                 output_names: list[str], batch: BatchLimit, timeout_s: float,
                 observe_batch: BatchObserver | None = None) -> None:
        self.url = check_url(url, protocol)
        self.protocol = protocol
        self.model = model
        self.version = str(version)  # the version whose manifest the gateway read
        self.input_name = input_name
        self.output_names = output_names
        self.max_batch_size = batch.size()  # Triton batches on its side; this only splits big requests
        self.timeout_s = timeout_s
        self.observe_batch = observe_batch
        self.client: grpc_aio.InferenceServerClient | http_aio.InferenceServerClient | None = None
        self.api: Any = grpc_aio if protocol == "grpc" else http_aio
        # gRPC takes a deadline per call; the aiohttp client one for its whole session.
        self.deadline = {"client_timeout": timeout_s} if protocol == "grpc" else {}

    async def start(self) -> None:
        # Created inside the running loop: both clients bind to it. Connecting is lazy, so the
        # gateway starts (not ready) while Triton is still down and recovers when it comes up.
        if self.protocol == "grpc":
            self.client = grpc_aio.InferenceServerClient(self.url, channel_args=grpc_channel_args())
        else:
            self.client = http_aio.InferenceServerClient(self.url, conn_timeout=self.timeout_s)

    async def _call(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except InferenceServerException as exc:
            message = f"triton at {self.url}: {exc.message()}"
            if str(exc.status()) in TRANSIENT_STATUSES:
                raise EngineUnavailable(message) from exc
            raise EngineFailure(message) from exc
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise EngineUnavailable(f"triton at {self.url}: {type(exc).__name__}: {exc}") from exc

    async def _infer_chunk(self, chunk: np.ndarray) -> dict[str, np.ndarray]:
        if self.client is None:
            raise EngineUnavailable("the Triton client is not started")
        image = self.api.InferInput(self.input_name, list(chunk.shape), "UINT8")
        image.set_data_from_numpy(chunk)
        outputs = [self.api.InferRequestedOutput(name) for name in self.output_names]
        if self.observe_batch:
            self.observe_batch(len(chunk))
        # ``timeout`` (µs) goes to Triton's queue policy (config.pbtxt: REJECT, override allowed):
        # a request still queued when its caller has given up is dropped, not computed. Without
        # it an overloaded server spends its time on answers nobody waits for.
        result = await self._call(self.client.infer(self.model, [image], self.version, outputs=outputs,
                                                    timeout=int(self.timeout_s * 1e6), **self.deadline))
        return {name: result.as_numpy(name) for name in self.output_names}

    async def infer(self, batch: np.ndarray) -> EngineResult:
        t0 = time.monotonic()
        chunks = [batch[i:i + self.max_batch_size] for i in range(0, len(batch), self.max_batch_size)]
        results = await asyncio.gather(*(self._infer_chunk(c) for c in chunks))
        outputs = {n: np.concatenate([r[n] for r in results]) for n in self.output_names}
        return EngineResult(outputs, 0.0, (time.monotonic() - t0) * 1000)

    async def ready(self) -> bool:
        if self.client is None:
            return False
        call = self._call(self.client.is_model_ready(self.model, self.version, **self.deadline))
        try:
            return bool(await asyncio.wait_for(call, min(self.timeout_s, READY_TIMEOUT_S)))
        except (EngineUnavailable, EngineFailure, asyncio.TimeoutError):
            return False

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None
