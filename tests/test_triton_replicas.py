"""Two real Triton servers behind one gateway, balanced by gRPC's own round_robin.

The gateway gets ``ipv4:127.0.0.1:P1,127.0.0.1:P2`` (what a Kubernetes headless Service gives
through ``dns:///name:port``, spelt out). Under load at concurrency 16 one server is killed
(SIGKILL to its process group): only the requests in flight at that moment may fail, with
503, the survivor answers the rest, and the restarted server takes traffic again within
seconds. Both servers run with the maximum connection age that deploy/k8s gives Triton, so
the GOAWAYs it sends every two seconds are part of the load as well. How many requests each
server answered comes from Triton's statistics API, not from the gateway.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import tritonclient.http as tritonhttp
from support import MODEL, ServeApp, encode, image, post_image, settings

from faar_serve.app import create_app
from faar_serve.engines.triton import check_url
from faar_serve.triton_local import LocalTriton

CONCURRENCY = 16
WARM_S, OUTAGE_S, AFTER_S = 3.0, 3.0, 3.0
IN_FLIGHT_S = 0.5  # a request that started this long after the kill was not in flight on the dead server
BACK_WITHIN_S = 10.0
# Shorter than deploy/k8s's 60 s so that connections are recycled during the test, same mechanism.
CONNECTION_AGE = ["--grpc-max-connection-age=2000", "--grpc-max-connection-age-grace=10000"]


@dataclass
class Outcome:
    start: float
    end: float
    status: int
    error: str | None


@pytest.fixture(scope="module")
def servers(repo: Path) -> Iterator[tuple[LocalTriton, LocalTriton]]:
    with LocalTriton(repo, extra_args=CONNECTION_AGE) as a, LocalTriton(repo, extra_args=CONNECTION_AGE) as b:
        yield a, b


def answered(server: LocalTriton) -> int:
    """Requests the server completed since it started (Triton's statistics API)."""
    stats = tritonhttp.InferenceServerClient(server.http_url).get_inference_statistics(MODEL)
    return sum(int(m["inference_stats"]["success"]["count"]) for m in stats["model_stats"])


async def _client(http: httpx.AsyncClient, data: bytes, stop: asyncio.Event, outcomes: list[Outcome]) -> None:
    while not stop.is_set():
        start = time.monotonic()
        r = await http.post("/v1/predict", files=post_image(data))
        error = r.json().get("error") if r.status_code != 200 else None
        outcomes.append(Outcome(start, time.monotonic(), r.status_code, error))


async def _scenario(url: str, a: LocalTriton, b: LocalTriton) -> dict[str, Any]:
    """Load through ``url`` while B is killed and restarted; Triton's own counts per window."""
    data = encode(image(700))
    outcomes: list[Outcome] = []
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=CONCURRENCY)

    async def counts() -> tuple[int, int]:
        return (await asyncio.to_thread(answered, a),
                await asyncio.to_thread(answered, b) if b.running() else 0)

    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
        clients = [asyncio.create_task(_client(http, data, stop, outcomes)) for _ in range(CONCURRENCY)]
        await asyncio.sleep(WARM_S)
        warm = await counts()
        assert b.process is not None
        killed_at = time.monotonic()
        os.killpg(b.process.pid, signal.SIGKILL)  # the server and its Python stubs, no shutdown
        await asyncio.sleep(OUTAGE_S)
        outage = await counts()
        await asyncio.to_thread(b.stop)  # reap what is left
        await asyncio.to_thread(b.start)  # same ports; returns once the model is ready
        ready_at = time.monotonic()
        while (await counts())[1] == 0 and time.monotonic() - ready_at < BACK_WITHIN_S:
            await asyncio.sleep(0.05)
        back_after_s = time.monotonic() - ready_at
        back = await counts()
        await asyncio.sleep(AFTER_S)
        end = await counts()
        stop.set()
        await asyncio.gather(*clients)
    return {"outcomes": outcomes, "killed_at": killed_at, "back_after_s": back_after_s, "windows": {
        "both up": warm,
        "B killed": (outage[0] - warm[0], 0),
        "B restarting": (back[0] - outage[0], back[1]),
        "B back": (end[0] - back[0], end[1] - back[1]),
    }}


def test_a_killed_replica_fails_only_its_requests_in_flight(servers: tuple[LocalTriton, LocalTriton], repo: Path,
                                                            live_server: ServeApp) -> None:
    a, b = servers
    target = f"ipv4:127.0.0.1:{a.grpc_port},127.0.0.1:{b.grpc_port}"
    gateway = live_server(create_app(settings(repo, engine="triton", triton_url=target, triton_timeout_s=10)))
    run = asyncio.run(_scenario(gateway.url, a, b))
    outcomes: list[Outcome] = run["outcomes"]
    killed_at = run["killed_at"]
    ok = [o for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status == 503 and o.error == "overloaded"]
    failed = [o for o in outcomes if o.status != 200 and o not in refused]
    windows = run["windows"]
    print(f"\nreplica failover at concurrency {CONCURRENCY}: {len(outcomes)} requests, answered {len(ok)}, "
          f"refused {len(refused)}, failed {len(failed)}; B answered again {run['back_after_s']:.2f} s after "
          "it was ready; answered by A/B (Triton statistics): "
          + ", ".join(f"{name} {x}/{y}" for name, (x, y) in windows.items()))

    # Both replicas took traffic before the kill, and again once B was back.
    for name in ("both up", "B back"):
        share_b = windows[name][1] / sum(windows[name])
        assert 0.2 <= share_b <= 0.8, (name, windows[name])
    # Every failure is a 503 "engine unavailable" of a request that was in flight when B died.
    assert not refused
    for o in failed:
        assert (o.status, o.error) == (503, "engine_unavailable"), o
        assert o.start < killed_at + IN_FLIGHT_S and o.end >= killed_at, (o, killed_at)
    assert len(failed) <= CONCURRENCY
    # The survivor answered everything sent while B was down.
    assert windows["B killed"][0] > 0 and windows["B restarting"][0] > 0
    assert run["back_after_s"] < BACK_WITHIN_S
    assert len(ok) == len(outcomes) - len(failed) > 0



@pytest.mark.parametrize(("url", "protocol"), [
    ("triton:8001", "grpc"), ("dns:///triton-headless:8001", "grpc"), ("dns:triton-headless.faar:8001", "grpc"),
    ("ipv4:10.0.0.1:8001,10.0.0.2:8001", "grpc"), ("unix:/run/triton.sock", "grpc"), ("triton:8000", "http"),
])
def test_urls_each_client_takes(url: str, protocol: str) -> None:
    assert check_url(url, protocol) == url


@pytest.mark.parametrize(("url", "protocol", "says"), [
    ("http://triton:8000", "http", "one server"), ("10.0.0.1:8000,10.0.0.2:8000", "http", "--triton-protocol grpc"),
    ("dns:///triton-headless:8000", "http", "one server"), ("grpc://triton:8001", "grpc", "dns:///"),
    ("10.0.0.1:8001,10.0.0.2:8001", "grpc", "ipv4:"),
])
def test_a_url_the_client_cannot_use_is_refused_at_start(url: str, protocol: str, says: str, repo: Path) -> None:
    # faar-serve prints this message as its one-line error (cli.main turns ValueError into an exit).
    with pytest.raises(ValueError, match=re.escape(says)):
        create_app(settings(repo, engine="triton", triton_url=url, triton_protocol=protocol))
