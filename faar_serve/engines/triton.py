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

The model comes from Triton, not from a repository folder: ``describe`` asks which
version is ready (or checks the one asked for), reads that version's manifest from the
model configuration (the parameter ``faar_manifest_v<version>`` that faar-export writes
into config.pbtxt), and takes ``max_batch_size`` and the instance kind from the same
configuration. ``start`` tries once (for up to 2 s), then leaves a background task
retrying every second until it succeeds, so the gateway starts not ready while Triton is
down and picks the model up when Triton comes; until then ``spec`` is None, ``detail``
says why, and requests get 503. The version is then fixed for the gateway's life: after
Triton switches to a newer version, restart the gateways (calls to the old one fail with
503).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

import aiohttp
import numpy as np
import tritonclient.grpc.aio as grpc_aio
import tritonclient.http.aio as http_aio
from tritonclient.grpc import KeepAliveOptions
from tritonclient.utils import InferenceServerException

from ..manifest import ManifestError, ModelSpec, manifest_from_model_config
from .base import BatchLimit, BatchObserver, DeadlineExceeded, Engine, EngineFailure, EngineResult, EngineUnavailable

log = logging.getLogger("faar_serve")
T = TypeVar("T")
DESCRIBE_INTERVAL_S = 1.0  # how often a gateway that does not know its model yet asks Triton
MAX_MESSAGE_BYTES = 2**31 - 1  # outputs of a batch of 512x512 maps exceed gRPC's 4 MB default
RECONNECT_BACKOFF_MS = 1000
READY_TIMEOUT_S = 2.0  # readiness probes must answer fast even when Triton hangs
TRANSIENT_STATUSES = {
    "StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.RESOURCE_EXHAUSTED",
    "StatusCode.CANCELLED", "429", "502", "503", "504",
}
EXPIRED = ("StatusCode.DEADLINE_EXCEEDED", "Request timeout expired")  # our deadline, or Triton's queue policy
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

    def __init__(self, *, url: str, protocol: str, model: str, version: int | None, max_batch_size: int | None,
                 timeout_s: float, observe_batch: BatchObserver | None = None) -> None:
        self.url = check_url(url, protocol)
        self.protocol = protocol
        self.model = model
        self.wanted_version = version  # None: the version Triton has ready
        self.requested_batch = max_batch_size  # --max-batch-size; capped by config.pbtxt's once known
        self.timeout_s = timeout_s
        self.observe_batch = observe_batch
        self.client: grpc_aio.InferenceServerClient | http_aio.InferenceServerClient | None = None
        self.api: Any = grpc_aio if protocol == "grpc" else http_aio
        # gRPC takes a deadline per call; the aiohttp client one for its whole session.
        self.deadline = {"client_timeout": timeout_s} if protocol == "grpc" else {}
        self.spec: ModelSpec | None = None
        self.max_batch_size = 0  # images per call, once the model is known
        self.instance_kinds: list[str] = []
        self.detail: str | None = f"waiting for Triton at {url} to serve model {model!r}"
        self._describing: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Created inside the running loop: both clients bind to it. Connecting is lazy, so the
        # gateway starts (not ready) while Triton is still down and recovers when it comes up.
        if self.protocol == "grpc":
            self.client = grpc_aio.InferenceServerClient(self.url, channel_args=grpc_channel_args())
        else:
            self.client = http_aio.InferenceServerClient(self.url, conn_timeout=self.timeout_s)
        # One quick try now, so a gateway started after Triton is ready at once; else keep trying.
        if not await self._try_describe(READY_TIMEOUT_S):
            self._describing = asyncio.get_running_loop().create_task(self._describe_until_known(),
                                                                      name="describe-model")

    async def _try_describe(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self.describe(), timeout_s)
        except asyncio.TimeoutError:
            self.detail = f"triton at {self.url}: no answer within {timeout_s} s"
        except (EngineUnavailable, EngineFailure, ManifestError) as exc:
            if str(exc) != self.detail:
                log.warning("model not known yet: %s", exc)
            self.detail = str(exc)
        return self.spec is not None

    async def _describe_until_known(self) -> None:
        while not await self._try_describe(self.timeout_s):
            await asyncio.sleep(DESCRIBE_INTERVAL_S)

    async def _json(self, call: Awaitable[Any]) -> Mapping[str, Any]:
        """A metadata or config answer as JSON (the HTTP client's form; gRPC's with as_json)."""
        return await self._call(asyncio.wait_for(call, self.timeout_s))

    async def describe(self) -> ModelSpec:
        """The model as Triton serves it now: its ready version (or the one asked for, if ready),
        that version's manifest, ``max_batch_size`` and instance kinds from its configuration."""
        if self.client is None:
            raise EngineUnavailable("the Triton client is not started")
        as_json = {"as_json": True} if self.protocol == "grpc" else {}
        source = f"triton at {self.url}: model {self.model!r}"
        try:
            if self.wanted_version is None:
                meta = await self._json(self.client.get_model_metadata(self.model, "", **as_json, **self.deadline))
                ready_versions = [int(v) for v in meta.get("versions", [])]
                if not ready_versions:
                    raise EngineUnavailable(f"{source} has no ready version")
                version = max(ready_versions)
            else:
                version = self.wanted_version
                ready = self.client.is_model_ready(self.model, str(version), **self.deadline)
                if not await self._call(asyncio.wait_for(ready, self.timeout_s)):
                    raise EngineUnavailable(f"{source} version {version} is not ready")
            answer = await self._json(self.client.get_model_config(self.model, str(version), **as_json,
                                                                   **self.deadline))
        except EngineFailure as exc:  # e.g. "unknown model": Triton may still be loading it
            raise EngineUnavailable(str(exc)) from exc
        config = answer.get("config", answer)  # gRPC wraps the configuration
        manifest = manifest_from_model_config(config, version, f"{source} version {version}")
        limit = int(config.get("max_batch_size", 0))
        if limit < 1:
            raise ManifestError(f"{source} sets no positive max_batch_size (the model needs a batch axis)")
        self.instance_kinds = sorted({g.get("kind", "KIND_AUTO") for g in config.get("instance_group", [])})
        self.max_batch_size = BatchLimit(requested=self.requested_batch, model=limit).size()
        self.spec = ModelSpec.from_manifest(manifest, None, version, limit, name=self.model)
        self.detail = None
        log.info("triton engine: %s version %d (%s), batches of up to %d", self.model, version,
                 ", ".join(self.instance_kinds), self.max_batch_size)
        return self.spec

    @property
    def provider(self) -> str | None:
        """Triton's instance kind(s) for the model (KIND_GPU or KIND_CPU): a GPU instance runs on
        CUDA or fails to load, in NVIDIA's backend and in faar-triton's."""
        return "+".join(self.instance_kinds) or None

    async def _call(self, call: Awaitable[T], request_deadline: bool = False) -> T:
        """``call``'s result, or its failure as ``EngineUnavailable`` / ``EngineFailure``; a timeout
        is the request's ``DeadlineExceeded`` where the request's deadline set it."""
        try:
            return await call
        except InferenceServerException as exc:
            message = f"triton at {self.url}: {exc.message()}"
            if request_deadline and (str(exc.status()) == EXPIRED[0] or EXPIRED[1] in str(exc.message())):
                raise DeadlineExceeded(message) from exc
            if str(exc.status()) in TRANSIENT_STATUSES:
                raise EngineUnavailable(message) from exc
            raise EngineFailure(message) from exc
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise EngineUnavailable(f"triton at {self.url}: {type(exc).__name__}: {exc}") from exc

    async def _infer_chunk(self, chunk: np.ndarray, spec: ModelSpec, timeout_s: float,
                           request_deadline: bool) -> dict[str, np.ndarray]:
        assert self.client is not None
        image = self.api.InferInput(spec.input_name, list(chunk.shape), "UINT8")
        image.set_data_from_numpy(chunk)
        outputs = [self.api.InferRequestedOutput(name) for name in spec.output_names]
        if self.observe_batch:
            self.observe_batch(len(chunk))
        # ``timeout`` (µs) goes to Triton's queue policy (config.pbtxt: REJECT, override allowed,
        # a default above it): a request still queued when its caller has given up is dropped,
        # not computed. Without it an overloaded server spends its time on answers nobody waits for.
        # It is what is left of the request's own deadline; gRPC's call deadline is the same.
        deadline = {"client_timeout": timeout_s} if self.protocol == "grpc" else {}
        result = await self._call(self.client.infer(self.model, [image], str(spec.version), outputs=outputs,
                                                    timeout=max(1, int(timeout_s * 1e6)), **deadline),
                                  request_deadline)
        return {name: result.as_numpy(name) for name in spec.output_names}

    async def infer(self, batch: np.ndarray, deadline: float | None = None) -> EngineResult:
        spec = self.spec
        if self.client is None or spec is None:
            raise EngineUnavailable(self.detail or "the Triton client is not started")
        t0 = time.monotonic()
        left = self.timeout_s if deadline is None else deadline - t0
        if left <= 0:
            raise DeadlineExceeded("the request's deadline passed before it reached Triton")
        timeout_s, by_request = min(self.timeout_s, left), left < self.timeout_s
        chunks = [batch[i:i + self.max_batch_size] for i in range(0, len(batch), self.max_batch_size)]
        results = await asyncio.gather(*(self._infer_chunk(c, spec, timeout_s, by_request) for c in chunks))
        outputs = {n: np.concatenate([r[n] for r in results]) for n in spec.output_names}
        return EngineResult(outputs, 0.0, (time.monotonic() - t0) * 1000)

    async def ready(self) -> bool:
        if self.client is None or self.spec is None:
            return False
        call = self._call(self.client.is_model_ready(self.model, str(self.spec.version), **self.deadline))
        try:
            return bool(await asyncio.wait_for(call, min(self.timeout_s, READY_TIMEOUT_S)))
        except (EngineUnavailable, EngineFailure, asyncio.TimeoutError):
            return False

    async def close(self) -> None:
        if self._describing is not None:
            self._describing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._describing
        if self.client is not None:
            await self.client.close()
            self.client = None
