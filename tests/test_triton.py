"""A real Triton Inference Server (nvidia-pytriton's binary) on the exported repository, unchanged.

The gateway in ``triton`` mode must give the maps the embedded engine gives, answer 503
quickly while Triton is stopped or hung, and recover by itself when it is back. It needs
no copy of the repository: it reads the model from Triton, and waits (not ready) until
Triton serves it. Triton must drop a request still queued past the deadline it carries.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest
import tritonclient.grpc as grpcclient
from fastapi.testclient import TestClient
from support import OfflineMaps, ServeApp, assert_maps_equal, encode, image, load_npz, post_image, settings

from clients import triton_infer
from faar_serve.app import create_app
from faar_serve.manifest import Tensor, load_manifest
from faar_serve.net import free_port
from faar_serve.triton_local import BACKEND_MODEL, LocalTriton, TritonStartError, pytriton_server_dir


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
            r = client.post("/v1/predict/batch", params={"format": "npz", "precision": "float32"}, files=files)
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
        r = httpx.post(gateway.url + "/v1/predict", params={"format": "npz", "precision": "float32"},
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



# --- a gateway that needs only Triton ----------------------------------------------------------------
def _wait(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout_s} s")


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_a_gateway_without_the_repository_reads_the_model_from_triton(repo: Path, tmp_path: Path,
                                                                      offline_maps: OfflineMaps) -> None:
    """Real processes: ``faar-serve --engine triton`` with no repository setting, in an empty folder,
    started before ``faar-triton``: not ready until Triton serves the model, then the manifest and
    the maps come from Triton. The repository is renamed once Triton has loaded it, so no path to it
    exists while the gateway works."""
    served = tmp_path / "served"
    shutil.copytree(repo, served)
    empty = tmp_path / "gateway-cwd"
    empty.mkdir()
    port, http_port, grpc_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAAR_")}
    env.update(FAAR_ENGINE="triton", FAAR_TRITON_URL=f"127.0.0.1:{grpc_port}", FAAR_PORT=str(port),
               FAAR_EXPOSE_MANIFEST="true", PYTHONPATH=str(Path(__file__).parents[1]))
    gateway = subprocess.Popen([sys.executable, "-m", "faar_serve", "--triton-timeout-s", "5"], cwd=empty, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    code = "from faar_serve.cli import triton_main; triton_main()"
    triton = None
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: _answers(url), 60, "the gateway did not answer /healthz")
        waiting = httpx.get(url + "/readyz")
        assert waiting.status_code == 503
        body = waiting.json()
        assert (body["ready"], body["engine"], body["model"], body["version"], body["provider"]) == (
            False, "triton", "faar", None, None)
        assert f"127.0.0.1:{grpc_port}" in body["detail"]
        for r in (httpx.get(url + "/v1/model"), httpx.post(url + "/v1/predict", files=post_image(encode(image(1))))):
            assert r.status_code == 503 and r.json()["error"] == "engine_unavailable" and r.headers["retry-after"]
            assert r.json()["detail"] == "inference engine unavailable"  # the reason: /readyz and the log

        triton = subprocess.Popen([sys.executable, "-c", code, "--model-repository", str(served), "--http-port",
                                   str(http_port), "--grpc-port", str(grpc_port), "--timeout", "60"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert triton.stdout is not None
        line = triton.stdout.readline()
        assert line.startswith("triton ready"), line + triton.stdout.read()
        moved = served.rename(tmp_path / "moved-away")
        _wait(lambda: httpx.get(url + "/readyz").status_code == 200, 20, "the gateway did not become ready")
        assert httpx.get(url + "/readyz").json() == {"ready": True, "engine": "triton", "model": "faar",
                                                     "version": 1, "provider": "KIND_CPU", "detail": None}
        whole = httpx.get(url + "/v1/model").json()["manifest"]  # --expose-manifest
        assert whole == json.loads((moved / "faar" / "1" / "manifest.json").read_text())
        r = httpx.post(url + "/v1/predict", params={"format": "npz", "precision": "float32"},
                       files=post_image(encode(image(7, 48, 80))))
        assert r.status_code == 200, r.text
        assert_maps_equal(load_npz(r.content), offline_maps(image(7, 48, 80)))
        metrics = httpx.get(url + "/metrics").text
        assert 'faar_engine_info{engine="triton",model="faar",provider="KIND_CPU",version="1"} 1.0' in metrics
    finally:
        for proc in (gateway, triton):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


# --- Triton's queue policy ------------------------------------------------------------------------------
def test_triton_drops_a_request_queued_past_its_timeout(repo: Path, tmp_path: Path) -> None:
    """The exported queue policy (REJECT, override allowed, default_timeout_microseconds set) makes
    Triton reject a request whose own timeout passed while it was queued; the same model without
    the default ignores the request's timeout and runs it (triton core PolicyQueue::Enqueue takes
    the request's timeout only when it is below the default, and the default 0 means none)."""
    both = tmp_path / "repo"
    shutil.copytree(repo / "faar", both / "faar")
    shutil.copytree(repo / "faar", both / "no_default")
    config = both / "no_default" / "config.pbtxt"
    text = config.read_text()
    assert "default_timeout_microseconds: 10000000" in text
    config.write_text("\n".join(line for line in text.replace('name: "faar"', 'name: "no_default"').splitlines()
                                if "default_timeout_microseconds" not in line) + "\n")
    batch = image(9)[None]
    with LocalTriton(both) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)

        def outcome(model: str, timeout_us: int) -> str:
            pixels = grpcclient.InferInput("image", list(batch.shape), "UINT8")
            pixels.set_data_from_numpy(batch)
            try:
                client.infer(model, [pixels], timeout=timeout_us)
            except grpcclient.InferenceServerException as exc:
                return f"{exc.status()}: {exc.message()}"
            return "ok"

        # 1 µs: expired before the scheduler looks at it, however idle the server is
        assert {outcome("faar", 1) for _ in range(8)} == {"StatusCode.UNAVAILABLE: Request timeout expired"}
        assert {outcome("no_default", 1) for _ in range(8)} == {"ok"}
        assert outcome("faar", 10**9) == "ok" and outcome("faar", 0) == "ok"  # the default (10 s) applies
        client.close()


# --- device kinds ----------------------------------------------------------------------------------------
def test_faar_triton_loads_only_the_models_named(repo: Path, tmp_path: Path) -> None:
    """A repository holding ``faar`` and its GPU export ``faar_gpu`` (config.pbtxt as faar-export writes
    it for --device-kind gpu): without a GPU the GPU model stops the server, ``--model faar`` serves."""
    from faar.export import ExportOptions, TensorSpec, config_pbtxt

    mixed = tmp_path / "repo"
    shutil.copytree(repo / "faar", mixed / "faar")
    shutil.copytree(repo / "faar", mixed / "faar_gpu")
    manifest = load_manifest(mixed / "faar" / "1" / "manifest.json")

    def spec(t: Tensor) -> TensorSpec:
        return TensorSpec(t.name, t.dtype, tuple(t.shape[1:]))

    options = ExportOptions(device_kind="gpu")
    assert options.name == "faar_gpu"
    (mixed / "faar_gpu" / "config.pbtxt").write_text(config_pbtxt(
        options.name, [spec(t) for t in manifest.inputs], [spec(t) for t in manifest.outputs], options, {1: manifest}))
    with pytest.raises(TritonStartError, match="faar_gpu has kind KIND_GPU but no GPUs are available"):
        LocalTriton(mixed).start(timeout_s=60)

    http_port, grpc_port = free_port(), free_port()
    code = "from faar_serve.cli import triton_main; triton_main()"
    proc = subprocess.Popen([sys.executable, "-c", code, "--model-repository", str(mixed), "--model", "faar",
                             "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--timeout", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("triton ready"), line + proc.stdout.read()
        base = f"http://127.0.0.1:{http_port}/v2/models"
        assert httpx.get(f"{base}/faar/ready").status_code == 200
        assert httpx.get(f"{base}/faar_gpu/ready").status_code != 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


# --- the Python backend's execution providers --------------------------------------------------------
@pytest.fixture(scope="module")
def backend() -> ModuleType:
    """``triton_backend/model.py`` as the stub loads it, with Triton's own utils module."""
    sys.path.insert(0, str(pytriton_server_dir() / "backends" / "python"))
    try:
        spec = importlib.util.spec_from_file_location("faar_triton_backend_model", BACKEND_MODEL)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    return module


def test_backend_provider_decision(backend: ModuleType) -> None:
    """The decision alone; the CPU path runs for real in every Triton test above (``provider`` is
    KIND_CPU in /readyz), and a GPU instance without CUDA fails to load instead of serving on the CPU."""
    cuda, cpu = "CUDAExecutionProvider", "CPUExecutionProvider"
    config = {"optimization": {"execution_accelerators": {"gpu_execution_accelerator": [
        {"name": "tensorrt", "parameters": {"precision_mode": "FP32"}},
        {"name": "cuda", "parameters": {"use_tf32": "0"}}]}}}
    assert backend.cuda_options(config) == {"use_tf32": "0"} and backend.cuda_options({}) == {}
    assert backend.execution_providers("CPU", 0, [cuda, cpu], {"use_tf32": "0"}) == [cpu]
    assert backend.execution_providers("GPU", 1, [cuda, cpu], {"use_tf32": "0"}) == [
        (cuda, {"use_tf32": "0", "device_id": 1}), cpu]
    with pytest.raises(RuntimeError, match="instance kind GPU, but this onnxruntime .* has no CUDAExecutionProvider"):
        backend.execution_providers("GPU", 0, [cpu], {})
    backend.check_providers("GPU", [cuda, cpu])
    backend.check_providers("CPU", [cpu])
    with pytest.raises(RuntimeError, match="refusing to serve a GPU model on the CPU"):
        backend.check_providers("GPU", [cpu])
