"""The gateway with its embedded ONNX Runtime engine, on a model exported by the real exporter.

TestClient where only the app matters; a real uvicorn socket for concurrency, overload and
streamed bodies. Every map is compared with offline inference (the ``offline_maps`` fixture).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from support import OfflineMaps, ServeApp, assert_maps_equal, encode, image, load_npz, manifest, post_image, settings

from faar_serve.app import create_app
from faar_serve.cli import load_settings
from faar_serve.engines import EngineFailure, EngineResult
from faar_serve.manifest import ManifestError
from faar_serve.settings import usable_cores

EXACT = {"format": "npz", "precision": "float32"}  # the arrays the offline reference is compared with
ALL_TASKS = ["semseg", "human_parts", "saliency", "normals", "depth", "edge"]


@pytest.fixture(scope="module")
def client(repo: Path) -> TestClient:
    with TestClient(create_app(settings(repo, max_image_pixels=1_000_000))) as c:
        yield c


def png_array(b64: str) -> tuple[Image.Image, np.ndarray]:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    return im, np.asarray(im)


# --- one image: every map, right size, equal to offline inference ---------------------------------
def test_json_answer_has_every_map_at_the_image_size_equal_to_offline(client: TestClient, repo: Path,
                                                                     offline_maps: OfflineMaps) -> None:
    rgb = image(1, height=90, width=120)  # not the model's 64x64: resized in and out
    r = client.post("/v1/predict", files=post_image(encode(rgb)))
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["version"], body["width"], body["height"]) == ("faar", 1, 120, 90)
    assert list(body["tasks"]) == ALL_TASKS
    assert (body["image_width"], body["image_height"]) == (120, 90)
    assert set(body["timings_ms"]) == {"decode", "resize", "queue", "inference", "encode"}
    assert "inference;dur=" in r.headers["server-timing"]
    want = offline_maps(rgb)
    tasks = body["tasks"]

    for name in ("semseg", "human_parts"):
        im, arr = png_array(tasks[name]["png"])
        assert im.mode == "P" and im.size == (120, 90)
        np.testing.assert_array_equal(arr, want[name])
        classes = manifest(repo)["tasks"][name]["classes"]
        assert tasks[name]["classes"] == classes
        assert tasks[name]["classes_present"] == [classes[i] for i in np.unique(want[name])]
        assert im.getpalette()[:6] == [c for rgb_ in tasks[name]["palette"][:2] for c in rgb_]
    for name in ("saliency", "edge"):
        im, arr = png_array(tasks[name]["png"])
        assert im.mode == "L" and im.size == (120, 90)
        np.testing.assert_allclose(arr * tasks[name]["scale"], want[name], atol=0.5 / 255 + 1e-6)
    im, arr = png_array(tasks["depth"]["png"])
    assert im.mode.startswith("I") and im.size == (120, 90)  # 16-bit grey
    assert tasks["depth"]["units"] == "m"
    np.testing.assert_allclose(arr * tasks["depth"]["scale"], want["depth"], atol=0.5e-3 + 1e-6)
    im, arr = png_array(tasks["normals"]["png"])
    assert im.mode == "RGB" and im.size == (120, 90)
    assert "y up" in tasks["normals"]["convention"] and "(n + 1) / 2 * 255" in tasks["normals"]["convention"]
    np.testing.assert_allclose(arr.transpose(2, 0, 1) / 127.5 - 1, want["normals"], atol=1 / 255 + 1e-6)


def test_npz_answer_holds_the_exact_arrays(client: TestClient, offline_maps: OfflineMaps) -> None:
    for rgb in (image(2), image(3, height=50, width=77)):
        r = client.post("/v1/predict", params=EXACT, files=post_image(encode(rgb)))
        assert r.status_code == 200, r.text
        got = load_npz(r.content)
        assert_maps_equal(got, offline_maps(rgb))
        assert got["normals"].shape == (3, *rgb.shape[:2]) and got["depth"].dtype == np.float32


def test_task_subset_and_unknown_task(client: TestClient) -> None:
    data = encode(image(4))
    r = client.post("/v1/predict", params={"tasks": "depth,semseg"}, files=post_image(data))
    assert r.status_code == 200 and list(r.json()["tasks"]) == ["depth", "semseg"]
    r = client.post("/v1/predict", params={"tasks": "semseg,depht", "format": "npz"}, files=post_image(data))
    assert r.status_code == 422 and r.json()["error"] == "unknown_task"
    assert "depht" in r.json()["detail"] and "saliency" in r.json()["detail"]


def test_batch_endpoint_answers_in_order(client: TestClient, offline_maps: OfflineMaps) -> None:
    images = [image(10 + i, height=40 + 8 * i, width=64) for i in range(3)]
    files = [("images", (f"{i}.png", encode(a), "image/png")) for i, a in enumerate(images)]
    r = client.post("/v1/predict/batch", params=EXACT, files=files)
    assert r.status_code == 200, r.text
    arrays = load_npz(r.content)
    for i, rgb in enumerate(images):
        assert_maps_equal({t: arrays[f"{i}/{t}"] for t in ALL_TASKS}, offline_maps(rgb))
    r = client.post("/v1/predict/batch", params={"tasks": "semseg"}, files=files)
    results = r.json()["results"]
    assert [(p["height"], list(p["tasks"])) for p in results] == [(h, ["semseg"]) for h in (40, 48, 56)]


# --- what uploads may look like -------------------------------------------------------------------
def _variants() -> dict[str, tuple[bytes, np.ndarray]]:
    """upload bytes -> the RGB image the gateway must see."""
    rgb = image(20, height=48, width=56)
    grey16 = (np.arange(48 * 56, dtype=np.uint32).reshape(48, 56) * 23 % 65536).astype(np.uint16)
    grey16_rgb = np.repeat(np.round(grey16 / 257).astype(np.uint8)[:, :, None], 3, axis=2)
    rgba = np.dstack([rgb, np.where(np.arange(56) < 28, 255, 0)[None].repeat(48, 0).astype(np.uint8)])
    over_white = rgb.copy()
    over_white[:, 28:] = 255
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    return {
        "png": (encode(rgb), rgb),
        "webp-lossless": (encode(rgb, "WEBP", lossless=True), rgb),
        "bmp": (encode(rgb, "BMP"), rgb),
        "tiff": (encode(rgb, "TIFF"), rgb),
        "grey": (encode(grey), np.repeat(grey[:, :, None], 3, axis=2)),
        "palette": (encode(palette), np.asarray(palette.convert("RGB"))),
        "rgba": (encode(rgba), over_white),
        "png-16bit": (encode(grey16), grey16_rgb),
        "tiff-16bit": (encode(grey16, "TIFF"), grey16_rgb),
    }


@pytest.mark.parametrize("kind", list(_variants()))
def test_formats_and_modes_become_rgb(client: TestClient, kind: str, offline_maps: OfflineMaps) -> None:
    data, seen = _variants()[kind]
    r = client.post("/v1/predict", params=EXACT, files=post_image(data, f"x.{kind}"))
    assert r.status_code == 200, r.text
    assert_maps_equal(load_npz(r.content), offline_maps(seen))


def test_jpeg_exif_orientation_is_applied(client: TestClient, offline_maps: OfflineMaps) -> None:
    rgb = image(21, height=40, width=64)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees clockwise (portrait)
    data = encode(rgb, "JPEG", quality=95, exif=exif)
    shown = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").transpose(Image.Transpose.ROTATE_270))
    r = client.post("/v1/predict", params=EXACT, files=post_image(data, "x.jpg"))
    assert r.status_code == 200, r.text
    got = load_npz(r.content)
    assert got["semseg"].shape == (64, 40)
    assert_maps_equal(got, offline_maps(shown))


# --- bad input: a 4xx JSON error that says what is wrong, and the next request works --------------
def _truncated(fmt: str) -> bytes:
    """The first half of a file: the header is intact, the pixel data is not."""
    data = encode(image(30, 200, 200), fmt)
    return data[: len(data) // 2]


def _bomb_png() -> bytes:
    """A 12000x12000 grey PNG: 144 M pixels in about 140 kB."""
    return encode(Image.new("L", (12000, 12000)), optimize=False)


BAD_UPLOADS = {
    "empty file": (b"", 400, "empty_file"),
    "text file": (b"hello, I am not an image" * 10, 415, "not_an_image"),
    "gif (unsupported)": (encode(Image.new("P", (8, 8)), "GIF"), 415, "not_an_image"),
    "truncated png": (_truncated("PNG"), 422, "corrupt_image"),
    "truncated jpeg": (_truncated("JPEG"), 422, "corrupt_image"),
    "over the pixel limit": (encode(Image.new("RGB", (1200, 1000))), 413, "too_many_pixels"),
    "decompression bomb": (_bomb_png(), 413, "too_many_pixels"),
}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's note; the 413 is ours
@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_upload_gets_a_clear_4xx(client: TestClient, case: str, offline_maps: OfflineMaps) -> None:
    data, status, code = BAD_UPLOADS[case]
    r = client.post("/v1/predict", files=post_image(data))
    assert r.status_code == status, r.text
    assert r.json()["error"] == code and r.json()["detail"]
    ok = client.post("/v1/predict", params=EXACT, files=post_image(encode(image(32))))
    assert ok.status_code == 200
    assert_maps_equal(load_npz(ok.content), offline_maps(image(32)))


def test_missing_field_and_bad_parameters(client: TestClient) -> None:
    r = client.post("/v1/predict", files={"picture": ("x.png", encode(image(33)), "image/png")})
    assert r.status_code == 422 and "image" in r.json()["detail"]
    r = client.post("/v1/predict", content=b"raw bytes", headers={"content-type": "application/octet-stream"})
    assert r.status_code == 422
    r = client.post("/v1/predict", params={"format": "xml"}, files=post_image(encode(image(33))))
    assert r.status_code == 422 and "format" in r.json()["detail"]
    files = [("images", ("a.png", encode(image(34)), "image/png")),
             ("images", ("b.txt", b"nope", "text/plain"))]
    r = client.post("/v1/predict/batch", files=files)
    assert r.status_code == 415 and "image 1 ('b.txt')" in r.json()["detail"]


def test_body_limit_is_enforced_while_streaming(repo: Path, live_server: ServeApp) -> None:
    limit = 50_000
    server = live_server(create_app(settings(repo, max_upload_bytes=limit)))
    big = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        # Content-Length known: refused before the body is read.
        r = http.post("/v1/predict", files=post_image(encode(big)))
        assert r.status_code == 413 and r.json()["error"] == "body_too_large"
        assert str(limit) in r.json()["detail"]

        # Chunked (no Content-Length): refused once the counted bytes pass the limit.
        def chunks() -> object:
            yield b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n\r\n"
            for _ in range(40):
                yield b"x" * 4096

        multipart = {"content-type": "multipart/form-data; boundary=b"}
        r = http.post("/v1/predict", content=chunks(), headers=multipart)
        assert r.status_code == 413 and r.json()["error"] == "body_too_large"
        assert http.post("/v1/predict", files=post_image(encode(image(35)))).status_code == 200


# --- concurrency: batching without mix-ups; overload --------------------------------------------
async def _post_many(url: str, uploads: list[bytes], params: dict[str, str]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        return await asyncio.gather(*(http.post("/v1/predict", params=params, files=post_image(d))
                                      for d in uploads))


def test_concurrent_requests_are_batched_and_each_gets_its_own_maps(repo: Path, offline_maps: OfflineMaps,
                                                                    live_server: ServeApp) -> None:
    images = [image(100 + i, height=48 + i, width=64) for i in range(24)]
    wants = [offline_maps(a) for a in images]
    cropped = [w["depth"][:48, :64] for w in wants]
    # Precondition: the maps of distinct images differ, so a mix-up could not pass unnoticed.
    assert min(np.abs(a - b).max() for i, a in enumerate(cropped) for b in cropped[i + 1:]) > 1e-3
    app = create_app(settings(repo, max_batch_size=8, max_queue_delay_ms=50))  # CPU default: 1
    server = live_server(app)
    responses = asyncio.run(_post_many(server.url, [encode(a) for a in images], EXACT))
    metrics = httpx.get(server.url + "/metrics").text
    for r, want in zip(responses, wants, strict=True):
        assert r.status_code == 200, r.text
        assert_maps_equal(load_npz(r.content), want)
    batches = app.state.gateway.metrics.batch_size.collect()[0].samples
    count = next(s.value for s in batches if s.name.endswith("_count"))
    assert count < len(images), "no two requests shared an engine run"
    assert 'faar_requests_total{method="POST",route="/v1/predict",status="200"} 24.0' in metrics


def test_on_the_cpu_the_embedded_engine_runs_one_image_per_call_by_default(repo: Path, live_server: ServeApp) -> None:
    app = create_app(settings(repo, max_queue_delay_ms=50))
    server = live_server(app)
    responses = asyncio.run(_post_many(server.url, [encode(image(300 + i)) for i in range(6)], {}))
    assert [r.status_code for r in responses] == [200] * 6
    samples = {s.name: s.value for s in app.state.gateway.metrics.batch_size.collect()[0].samples
               if s.name.endswith(("_count", "_sum"))}
    assert sorted(samples.values()) == [6.0, 6.0], samples  # six calls of one image each


def test_a_lone_request_does_not_wait_for_the_batch_window(repo: Path) -> None:
    # With nobody else in the gateway, waiting 2 s for company would only add latency.
    app = create_app(settings(repo, max_batch_size=8, max_queue_delay_ms=2000))
    with TestClient(app) as c:
        r = c.post("/v1/predict", files=post_image(encode(image(7))))
    assert r.status_code == 200, r.text
    assert r.json()["timings_ms"]["queue"] < 500


def test_inference_streams_run_side_by_side_with_the_same_answers(repo: Path, live_server: ServeApp) -> None:
    """Two streams: two sessions of cores / 2 threads, two runs at once (each run waits until the
    other has started: one stream at a time would time out), every image with its own answer."""
    images = [encode(image(300 + i)) for i in range(2)]
    with TestClient(create_app(settings(repo))) as c:
        expected = [load_npz(c.post("/v1/predict", files=post_image(d), params={"format": "npz"}).content)
                    for d in images]
    app = create_app(settings(repo, inference_streams=2))
    engine = app.state.gateway.engine
    both_running = threading.Barrier(2, timeout=10)
    run = engine._run

    def run_when_both_run(session: ort.InferenceSession, batch: np.ndarray) -> dict[str, np.ndarray]:
        both_running.wait()
        return run(session, batch)

    engine._run = run_when_both_run
    server = live_server(app)
    assert len(engine.sessions) == 2
    assert {s.get_session_options().intra_op_num_threads for s in engine.sessions} == {max(1, usable_cores() // 2)}
    responses = asyncio.run(_post_many(server.url, images, {"format": "npz"}))
    assert [r.status_code for r in responses] == [200, 200]
    for r, want in zip(responses, expected, strict=True):
        got = load_npz(r.content)
        for task, arr in want.items():
            np.testing.assert_array_equal(got[task], arr)


def test_overload_answers_503_with_retry_after_and_recovers(repo: Path, live_server: ServeApp) -> None:
    # An engine slowed by 1 s keeps the two admitted images in the gateway while the rest arrive.
    app = create_app(settings(repo, max_queue=2, retry_after_s=2))
    engine = app.state.gateway.engine
    infer = engine.infer

    async def slow_infer(batch: np.ndarray, deadline: float | None = None) -> EngineResult:
        await asyncio.sleep(1)
        return await infer(batch, deadline)

    engine.infer = slow_infer
    server = live_server(app)
    responses = asyncio.run(_post_many(server.url, [encode(image(200 + i)) for i in range(6)], {}))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 200, 503, 503, 503, 503]
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "2" and r.json()["error"] == "overloaded"
    assert httpx.post(server.url + "/v1/predict", files=post_image(encode(image(210)))).status_code == 200
    metrics = httpx.get(server.url + "/metrics").text
    assert 'faar_rejected_total{reason="overloaded"} 4.0' in metrics
    assert "faar_queue_depth 0.0" in metrics


# --- operations, auth, CORS -----------------------------------------------------------------------
def test_health_ready_model_metrics_docs(client: TestClient, repo: Path) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"ready": True, "engine": "onnx", "model": "faar", "version": 1,
                                            "provider": "CPUExecutionProvider", "detail": None}
    meta, model = manifest(repo), client.get("/v1/model").json()
    assert {k: model[k] for k in ("model", "input_size", "tasks")} == {k: meta[k] for k in ("model", "input_size",
                                                                                          "tasks")}
    assert model["parity"]["passed"] and model["onnx_sha256"] == meta["onnx"]["sha256"]
    client.post("/v1/predict", files=post_image(encode(image(40))))
    text = client.get("/metrics").text
    assert ('faar_engine_info{engine="onnx",model="faar",provider="CPUExecutionProvider",version="1"} 1.0'
            in text)  # what runs the graph, read from the session at each scrape
    for name in ("faar_requests_total", "faar_request_duration_seconds_bucket", "faar_queue_depth",
                 "faar_engine_batch_size_bucket", 'faar_stage_duration_seconds_count{stage="inference"}'):
        assert name in text
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/predict", "/v1/predict/batch", "/v1/model", "/healthz", "/readyz", "/metrics"} <= set(paths)
    assert client.get("/nope").json()["error"] == "not_found"


def test_the_whole_manifest_only_when_asked(repo: Path) -> None:
    with TestClient(create_app(settings(repo, expose_manifest=True))) as c:
        assert c.get("/v1/model").json()["manifest"] == manifest(repo)


def test_api_key_and_cors(repo: Path) -> None:
    app = create_app(settings(repo, api_key="s3cret", cors_origins=["https://app.example"]))
    with TestClient(app) as c:
        files = post_image(encode(image(41)))
        r = c.post("/v1/predict", files=files)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        wrong, right = {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer s3cret"}
        assert c.post("/v1/predict", files=files, headers=wrong).status_code == 401
        assert c.get("/v1/model").status_code == 401
        assert c.post("/v1/predict", files=files, headers=right).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        assert c.get("/metrics").status_code == 401 and c.get("/metrics", headers=right).status_code == 200
        pre = c.options("/v1/predict", headers={"Origin": "https://app.example",
                                                 "Access-Control-Request-Method": "POST",
                                                 "Access-Control-Request-Headers": "authorization"})
        assert pre.headers["access-control-allow-origin"] == "https://app.example"
        other = c.get("/healthz", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


# --- settings and the process boundary ------------------------------------------------------------
def test_settings_from_flags_and_environment(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAAR_MAX_QUEUE", "12")
    monkeypatch.setenv("FAAR_ENGINE", "triton")
    monkeypatch.setenv("FAAR_CORS_ORIGINS", '["https://a.example"]')
    s = load_settings(["--model-repository", str(repo), "--engine", "onnx", "--max-batch-size", "4",
                       "--cpu-spin-wait"])
    assert (s.max_queue, s.engine, s.max_batch_size, s.cors_origins) == (12, "onnx", 4, ["https://a.example"])
    assert s.cpu_spin_wait and not load_settings(["--model-repository", str(repo)]).cpu_spin_wait
    with pytest.raises(SystemExit, match="max_queue"):
        load_settings(["--model-repository", str(repo), "--max-queue", "0"])
    with pytest.raises(SystemExit):
        load_settings(["--model-repository", str(repo), "--engine", "tensorflow"])
    # the repository is the embedded engine's; the triton engine reads the model from Triton
    monkeypatch.delenv("FAAR_ENGINE")
    with pytest.raises(SystemExit, match="the onnx engine needs model_repository"):
        load_settings([])
    assert load_settings(["--engine", "triton"]).model_repository is None
    assert not s.cuda_tf32 and load_settings(["--engine", "triton", "--cuda-tf32"]).cuda_tf32


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="a CUDA build has it")
def test_device_cuda_without_cuda_stops_the_start(repo: Path) -> None:
    """--device cuda never serves on the CPU quietly (this onnxruntime is the CPU build)."""
    with pytest.raises(EngineFailure, match="device cuda, but this onnxruntime .* has no CUDAExecutionProvider"):
        with TestClient(create_app(settings(repo, device="cuda"))):
            pass


def test_gateway_never_imports_training_code(repo: Path) -> None:
    code = textwrap.dedent(f"""
        import sys
        from fastapi.testclient import TestClient
        import faar_serve.cli, faar_serve.triton_local, faar_serve.engines.triton
        from faar_serve.app import create_app
        from faar_serve.settings import Settings
        with TestClient(create_app(Settings(model_repository={str(repo)!r}))) as c:
            assert c.get("/readyz").status_code == 200
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("faar", "torch", "timm")))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().replace("'", '"')) == []


def test_repository_problems_are_named_at_start(repo: Path, tmp_path: Path) -> None:
    def broken(edit: str) -> Path:
        copy = tmp_path / edit / "repo"
        shutil.copytree(repo, copy, ignore=shutil.ignore_patterns("*.onnx"))
        meta = copy / "faar" / "1" / "manifest.json"
        if edit == "format":
            meta.write_text(json.dumps({**json.loads(meta.read_text()), "format_version": 2}))
        elif edit == "batch":
            config = copy / "faar" / "config.pbtxt"
            config.write_text(config.read_text().replace("max_batch_size: 8", "max_batch_size: 0"))
        elif edit == "version":
            meta.unlink()
        return copy

    cases = [(repo.parent / "nowhere", "not a directory"), (broken("format"), "format 2"),
             (broken("batch"), "max_batch_size"), (broken("version"), "no <version>")]
    for where, message in cases:
        with pytest.raises(ManifestError, match=message):
            create_app(settings(where))
