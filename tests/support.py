"""Plain helpers of the serving tests (no tests, no state; fixtures are in ``conftest.py``).

* ``settings``, ``manifest``: the gateway's settings and the export manifest of a repository;
* ``image``, ``encode``, ``post_image``, ``load_npz``: test inputs and answers;
* ``offline_inference``: the reference, computed without the gateway: Pillow resize to the
  model size, ONNX Runtime on the file, maps resized back by ``reference_resize``, a slow
  float64 implementation written from the definitions ``faar_serve/codec/resize.py`` promises;
* ``assert_maps_equal``: the gateway's maps against that reference;
* ``LiveServer``: uvicorn on a free port in a thread, for tests where the socket matters
  (started and stopped by the ``live_server`` / ``live_gateway`` fixtures).
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import uvicorn
from PIL import Image

from faar_serve.net import free_port
from faar_serve.settings import Settings

MODEL = "faar"
OfflineMaps = Callable[[np.ndarray], dict[str, np.ndarray]]  # the ``offline_maps`` fixture


def manifest(repo: Path) -> dict[str, Any]:
    return json.loads((repo / MODEL / "1" / "manifest.json").read_text())


def settings(repo: Path, **overrides: Any) -> Settings:
    return Settings(model_repository=repo, **overrides)


def image(seed: int, height: int = 64, width: int = 64) -> np.ndarray:
    """A distinct, smooth-ish RGB image per seed (blobs plus a little noise)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((width, height),
                                                                                      Image.Resampling.BICUBIC)
    noise = rng.integers(-12, 13, (height, width, 3))
    return np.clip(np.asarray(coarse, dtype=np.int64) + noise, 0, 255).astype(np.uint8)


def encode(arr: np.ndarray | Image.Image, fmt: str = "PNG", **params: Any) -> bytes:
    im = arr if isinstance(arr, Image.Image) else Image.fromarray(arr)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **params)
    return buf.getvalue()


def nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output index: floor((i + 0.5) * n_in / n_out), in exact integer arithmetic."""
    return (2 * np.arange(n_out) + 1) * n_in // (2 * n_out)


def bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two source indices and the weight of the second, per output index: half-pixel centres,
    the sample position clamped to the first and last source pixel."""
    x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    x0 = np.floor(x).astype(np.intp)
    return x0, np.minimum(x0 + 1, n_in - 1), x - x0


def reference_resize(kind: str, arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """A model map (``[h, w]``, normals ``[3, h, w]``) at ``height x width``: labels nearest, the rest
    bilinear in float64, normals renormalised."""
    if kind == "labels":
        return arr[np.ix_(nearest_index(arr.shape[0], height), nearest_index(arr.shape[1], width))]
    r0, r1, fy = bilinear_taps(arr.shape[-2], height)
    c0, c1, fx = bilinear_taps(arr.shape[-1], width)
    a = arr.astype(np.float64)
    top = a[..., r0, :][..., c0] * (1 - fx) + a[..., r0, :][..., c1] * fx
    bottom = a[..., r1, :][..., c0] * (1 - fx) + a[..., r1, :][..., c1] * fx
    out = top * (1 - fy)[:, None] + bottom * fy[:, None]
    return out / np.linalg.norm(out, axis=0, keepdims=True) if kind == "normals" else out


def offline_inference(session: ort.InferenceSession, meta: dict[str, Any], rgb: np.ndarray) -> dict[str, np.ndarray]:
    """task -> map at ``rgb``'s size: ONNX Runtime on the Pillow-resized image, maps resized back
    by ``reference_resize``."""
    _, h, w, _ = meta["inputs"][0]["shape"]
    height, width = rgb.shape[:2]
    x = rgb
    if (height, width) != (h, w):
        x = np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR, reducing_gap=3.0))
    names = [o.name for o in session.get_outputs()]
    raw = dict(zip(names, (o[0] for o in session.run(names, {"image": x[None]})), strict=True))
    return {task: reference_resize(entry["kind"], raw[task], height, width) for task, entry in meta["tasks"].items()}


def load_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data)) as z:
        return {k: z[k] for k in z.files}


def assert_maps_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray], atol: float = 1e-5) -> None:
    """Label maps exactly, float maps to ``atol`` (the same ONNX file, CPU, any batch composition)."""
    assert sorted(got) == sorted(want)
    for task, ref in want.items():
        assert got[task].shape == ref.shape, task
        if ref.dtype == np.uint8:
            assert np.issubdtype(got[task].dtype, np.integer), task
            np.testing.assert_array_equal(got[task], ref, err_msg=task)
        else:
            np.testing.assert_allclose(got[task], ref, atol=atol, rtol=0, err_msg=task)


def post_image(data: bytes, name: str = "image.png", field: str = "image") -> dict[str, Any]:
    """``files=`` for httpx / TestClient: one upload in ``field``."""
    return {field: (name, data, "application/octet-stream")}


class LiveServer:
    """The app behind a real socket: uvicorn in a thread, stopped on exit."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)


ServeApp = Callable[[Any], LiveServer]  # the ``live_server`` fixture: app in, running server out
