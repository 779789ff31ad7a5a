"""A real Triton Inference Server (nvidia-pytriton's binary) on the exported repository, unchanged.

The gateway in ``triton`` mode must give the maps the embedded engine gives, answer 503
quickly while Triton is stopped or hung, and recover by itself when it is back.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from support import OfflineMaps, ServeApp, assert_maps_equal, encode, image, load_npz, post_image, settings

from clients import triton_infer
from faar_serve.app import create_app
from faar_serve.net import free_port
from faar_serve.triton_local import LocalTriton, TritonStartError


@pytest.fixture(scope="module")
def triton(repo: Path) -> Iterator[LocalTriton]:
    with LocalTriton(repo) as server:
        yield server


def url_of(server: LocalTriton, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.http_url


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_triton_serves_the_exported_folder_unchanged(triton: LocalTriton, repo: Path, tmp_path: Path,
                                                     protocol: str, offline_maps: OfflineMaps) -> None:
    assert 'backend: "onnxruntime"' in (repo / "faar" / "config.pbtxt").read_text()
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(encode(image(300 + i)))  # 64x64: no resize on either side
    outputs = triton_infer.infer(url_of(triton, protocol), protocol, "faar", paths, timeout_s=10)
    for i in range(3):
        assert_maps_equal({t: a[i] for t, a in outputs.items()}, offline_maps(image(300 + i)))


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_gateway_on_triton_equals_the_embedded_engine(triton: LocalTriton, repo: Path, protocol: str,
                                                      offline_maps: OfflineMaps) -> None:
    images = [image(400 + i, height=40 + 3 * i, width=70) for i in range(10)]  # 10 > max batch 8: 2 calls
    files = [("images", (f"{i}.png", encode(a), "image/png")) for i, a in enumerate(images)]
    answers = {}
    for engine in ("triton", "onnx"):
        app = create_app(settings(repo, engine=engine, triton_url=url_of(triton, protocol),
                                  triton_protocol=protocol, triton_timeout_s=10))
        with TestClient(app) as client:
            assert client.get("/readyz").json()["ready"] is True
            r = client.post("/v1/predict/batch", params={"format": "npz"}, files=files)
            assert r.status_code == 200, r.text
            answers[engine] = load_npz(r.content)
            one = client.post("/v1/predict", files=post_image(encode(images[0])))
            assert one.status_code == 200 and set(one.json()["timings_ms"]) >= {"queue", "inference"}
    assert_maps_equal(answers["triton"], answers["onnx"], atol=0)
    for i, rgb in enumerate(images):
        got = {key.split("/")[1]: a for key, a in answers["triton"].items() if key.startswith(f"{i}/")}
        assert_maps_equal(got, offline_maps(rgb))


async def _statuses_while(url: str, action: object, before: int, after: int) -> tuple[list[int], list[float]]:
    """Requests in flight while ``action`` runs (in a thread), then ``after`` more, timed."""
    data = encode(image(500))
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        async def one() -> tuple[int, float]:
            t0 = time.perf_counter()
            r = await http.post("/v1/predict", files=post_image(data))
            if r.status_code == 503:
                assert r.headers["retry-after"] and r.json()["error"] == "engine_unavailable"
            return r.status_code, time.perf_counter() - t0

        inflight = [asyncio.create_task(one()) for _ in range(before)]
        await asyncio.sleep(0.05)
        await asyncio.to_thread(action)
        later = [await one() for _ in range(after)]
        results = [*(await asyncio.gather(*inflight)), *later]
    return [s for s, _ in results], [t for _, t in later]


def _wait_for_200(url: str, timeout_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        r = httpx.post(url + "/v1/predict", files=post_image(encode(image(501))), timeout=30)
        if r.status_code == 200:
            return time.monotonic() - start
        time.sleep(0.2)
    raise AssertionError(f"the gateway did not recover within {timeout_s} s")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_gateway_answers_503_while_triton_is_down_or_hung_and_recovers(repo: Path, protocol: str, live_server: ServeApp,
                                                                       offline_maps: OfflineMaps) -> None:
    timeout_s = 1.0
    with LocalTriton(repo) as server:
        app = create_app(settings(repo, engine="triton", triton_url=url_of(server, protocol),
                                  triton_protocol=protocol, triton_timeout_s=timeout_s))
        gateway = live_server(app)
        first = httpx.post(gateway.url + "/v1/predict", files=post_image(encode(image(502))))
        assert first.status_code == 200

        # Hung (SIGSTOP): every call ends at its deadline with 503.
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            statuses, times = asyncio.run(_statuses_while(gateway.url, lambda: None, 0, 2))
            assert statuses == [503, 503] and max(times) < timeout_s + 1.5
            assert httpx.get(gateway.url + "/readyz").status_code == 503
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        _wait_for_200(gateway.url, 10)

        # Stopped mid-run: in-flight requests finish or get 503, later ones get 503 at once.
        statuses, times = asyncio.run(_statuses_while(gateway.url, server.stop, 6, 3))
        assert set(statuses) <= {200, 503} and statuses[-3:] == [503, 503, 503]
        assert max(times) < 1.0, times
        assert httpx.get(gateway.url + "/readyz").json()["ready"] is False

        # Back on the same ports: the same gateway recovers by itself.
        server.start()
        _wait_for_200(gateway.url, 15)
        assert httpx.get(gateway.url + "/readyz").json()["ready"] is True
        r = httpx.post(gateway.url + "/v1/predict", params={"format": "npz"},
                       files=post_image(encode(image(503, 30, 90))))
        assert_maps_equal(load_npz(r.content), offline_maps(image(503, 30, 90)))


def test_faar_triton_command_starts_serves_and_stops(repo: Path) -> None:
    http_port, grpc_port = free_port(), free_port()
    code = "from faar_serve.cli import triton_main; triton_main()"
    proc = subprocess.Popen([sys.executable, "-c", code, "--model-repository", str(repo), "--http-port",
                             str(http_port), "--grpc-port", str(grpc_port), "--timeout", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("triton ready") and str(grpc_port) in line, line + proc.stdout.read()
        assert httpx.get(f"http://127.0.0.1:{http_port}/v2/models/faar/ready").status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert "stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{http_port}/v2/health/live")


def test_a_model_that_cannot_load_fails_the_start_with_its_log(repo: Path, tmp_path: Path) -> None:
    broken = tmp_path / "repo"
    shutil.copytree(repo, broken)
    (broken / "faar" / "1" / "model.onnx").write_bytes(b"not onnx")
    server = LocalTriton(broken)
    t0 = time.monotonic()
    with pytest.raises(TritonStartError, match="faar") as err:
        server.start(timeout_s=60)
    assert time.monotonic() - t0 < 30 and not server.running()
    assert "onnxruntime" in str(err.value) or "model.onnx" in str(err.value)
    server.close()

