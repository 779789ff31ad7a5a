"""The gateway's ``size`` and ``precision`` parameters, and parallel rendering, over HTTP."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from support import OfflineMaps, encode, image, load_npz, post_image, reference_resize, settings

from faar_serve.app import create_app, create_gateway


@pytest.fixture(scope="module")
def client(repo: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings(repo))) as c:
        yield c


def png_size(b64: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(b64))).size


def test_size_original_model_and_longest_side(client: TestClient, repo: Path) -> None:
    data = encode(image(900, height=90, width=150))
    for size, want in (("original", (150, 90)), ("model", (64, 64)), ("100", (100, 60)), ("149", (149, 89)),
                       ("150", (150, 90)), ("5000", (150, 90))):
        r = client.post("/v1/predict", params={"size": size}, files=post_image(data))
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["width"], body["height"]) == want, size
        assert (body["image_width"], body["image_height"]) == (150, 90)
        assert {png_size(t["png"]) for t in body["tasks"].values()} == {want}, size
    r = client.post("/v1/predict", params={"size": "100", "format": "npz"}, files=post_image(data))
    arrays = load_npz(r.content)
    assert arrays["normals"].shape == (3, 60, 100) and arrays["semseg"].shape == (60, 100)
    for bad in ("0", "-5", "big", "1.5", "original,model"):
        r = client.post("/v1/predict", params={"size": bad}, files=post_image(data))
        assert r.status_code == 422 and r.json()["error"] == "invalid_request" and "size" in r.json()["detail"], bad


def test_size_model_is_the_raw_model_output(client: TestClient, repo: Path, offline_maps: OfflineMaps) -> None:
    # Nothing resampled: the model's maps as the engine returned them (offline: same input, no resize back).
    rgb = image(901, height=64, width=64)
    r = client.post("/v1/predict", params={"size": "model", "format": "npz", "precision": "float32"},
                    files=post_image(encode(rgb)))
    for task, want in offline_maps(rgb).items():
        np.testing.assert_allclose(load_npz(r.content)[task], want, atol=1e-5, err_msg=task)


def test_npz_dtypes_float16_by_default_float32_on_request(client: TestClient, offline_maps: OfflineMaps) -> None:
    rgb = image(902, height=48, width=80)
    default = load_npz(client.post("/v1/predict", params={"format": "npz"}, files=post_image(encode(rgb))).content)
    exact = load_npz(client.post("/v1/predict", params={"format": "npz", "precision": "float32"},
                                 files=post_image(encode(rgb))).content)
    want = offline_maps(rgb)
    for task in want:
        labels = want[task].dtype == np.uint8
        assert default[task].dtype == (np.uint8 if labels else np.float16), task
        assert exact[task].dtype == (np.uint8 if labels else np.float32), task
        if not labels:  # float16 is the float32 answer rounded: within 2^-11 of each value
            assert (np.abs(default[task] - exact[task]) <= np.abs(exact[task]) * 2.0**-11 + 1e-7).all(), task
    r = client.post("/v1/predict", params={"format": "npz", "precision": "float64"}, files=post_image(encode(rgb)))
    assert r.status_code == 422 and "precision" in r.json()["detail"]


def test_openapi_documents_size_and_precision(client: TestClient) -> None:
    for path in ("/v1/predict", "/v1/predict/batch"):
        params = {p["name"]: p for p in client.get("/openapi.json").json()["paths"][path]["post"]["parameters"]}
        assert "longest side" in params["size"]["description"] and params["size"]["schema"]["default"] == "original"
        assert params["precision"]["schema"]["default"] == "float16"
        assert "float32" in str(params["precision"]["schema"])


def test_parallel_rendering_gives_the_same_answer(repo: Path) -> None:
    data = encode(image(903, height=70, width=110), "JPEG")
    answers = []
    for threads in (1, 3):
        with TestClient(create_app(settings(repo, render_threads=threads))) as c:
            answers.append({k: v for k, v in c.post("/v1/predict", files=post_image(data)).json().items()
                            if k != "timings_ms"})
    assert answers[0] == answers[1]


def test_one_answer_renders_in_parallel_only_while_cores_are_idle(repo: Path) -> None:
    """The pool is used while fewer images than render threads are in the gateway (idle cores),
    not under load, where the hand-offs cost throughput (bench/RESULTS.md, data path)."""
    gateway = create_gateway(settings(repo, render_threads=2))
    assert gateway.render_pool is not None
    gateway.admission.images = 1  # this answer's image alone
    assert gateway._render_pool() is gateway.render_pool
    gateway.admission.images = 2
    assert gateway._render_pool() is None
    assert create_gateway(settings(repo, render_threads=1))._render_pool() is None
    gateway.render_pool.shutdown()


def test_labels_are_nearest_of_the_model_output_through_the_gateway(client: TestClient,
                                                                    offline_maps: OfflineMaps) -> None:
    rgb = image(904, height=37, width=201)  # shrinks one axis, grows the other
    got = load_npz(client.post("/v1/predict", params={"format": "npz"}, files=post_image(encode(rgb))).content)
    model = load_npz(client.post("/v1/predict", params={"format": "npz", "size": "model"},
                                 files=post_image(encode(rgb))).content)
    np.testing.assert_array_equal(got["semseg"], reference_resize("labels", model["semseg"], 37, 201))
    np.testing.assert_array_equal(got["semseg"], offline_maps(rgb)["semseg"])
