"""``Predictor``: every map of an image from a model repository, in Python, without a server.

    from faar_serve.predictor import Predictor
    with Predictor("model_repository") as predictor:
        p = predictor.predict("photo.jpg", tasks="semseg,depth")
        p["depth"]            # float32 [H, W] in metres, at the photo's size
        p.classes("semseg")   # class names; p.palette("semseg"), p.units("depth")
        p.save("out/")        # the gateway's PNGs + a side-by-side preview

Decisions:

* One data path: decoding, resizing and encoding are ``faar_serve.codec``'s, exactly what the
  gateway runs (same reduced-scale decoding, same resampling contract, same PNG bytes).
* The engines are the gateway's (``faar_serve.engines``: embedded ONNX Runtime on CPU or
  CUDA, or a Triton server). They are asyncio objects, so the predictor runs one event
  loop on a background thread and blocks on it: a small synchronous facade, no second
  implementation of either engine.
* Arrays, not encodings, come back: label maps uint8, every other map float32 (the values
  every encoding is rounded from); ``save`` encodes. The model's own outputs are kept too
  (``outputs``), so a preview or another size costs no second inference.
* Torch-free: importable with the gateway's install.
"""

from __future__ import annotations

import asyncio
import io
import os
import threading
from collections.abc import Coroutine, Iterable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image, ImageOps

from .. import codec
from ..engines import Engine, EngineResult, EngineUnavailable, create_engine
from ..manifest import ModelSpec, TaskInfo
from ..preview import PREVIEW_HEIGHT, panel, side_by_side
from ..settings import Settings

T = TypeVar("T")
ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray
MAX_IMAGE_PIXELS = Settings.model_fields["max_image_pixels"].default


class EngineThread:
    """One of the gateway's engines on an event loop of its own thread; every call blocks."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="faar-engine", daemon=True)
        self.thread.start()
        try:
            self.call(engine.start())
        except BaseException:
            self.close()
            raise

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def infer(self, batch: np.ndarray) -> EngineResult:
        return self.call(self.engine.infer(batch))

    def close(self) -> None:
        if self.loop.is_closed():
            return
        try:
            self.call(self.engine.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join()
            self.loop.close()


@dataclass
class Prediction:
    """One image's maps at the size asked for (``maps``), and what they mean (``tasks``)."""

    maps: dict[str, np.ndarray]  # task -> labels uint8 [H, W]; float32 [H, W]; normals float32 [3, H, W]
    tasks: dict[str, TaskInfo]  # kind, description, classes, palette, units per task
    outputs: dict[str, np.ndarray]  # graph output -> the model's own map (model resolution)
    image: np.ndarray  # the RGB image as decoded for the model (reduced scale for a large JPEG)
    image_size: tuple[int, int]  # (height, width) of the input as displayed
    source: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)

    def __getitem__(self, task: str) -> np.ndarray:
        return self.maps[task]

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of every map."""
        return next(iter(self.maps.values())).shape[-2:]

    def classes(self, task: str) -> tuple[str, ...]:
        return self.tasks[task].classes

    def palette(self, task: str) -> tuple[tuple[int, int, int], ...]:
        return self.tasks[task].palette

    def units(self, task: str) -> str:
        return self.tasks[task].units

    def encoded(self, fmt: codec.Format, precision: codec.Precision = "float16",
                pool: Executor | None = None) -> dict[str, Any]:
        """task -> the map as the gateway encodes it (``png``: (bytes, fields); ``npz``: array)."""
        return codec.encode_maps(list(self.tasks.values()), self.outputs, self.maps, fmt, precision, pool)

    def preview(self) -> Image.Image:
        """The image and every map side by side (maps drawn at the preview's own size)."""
        height, width = self.size
        small = (PREVIEW_HEIGHT, max(1, round(width * PREVIEW_HEIGHT / height)))
        tasks = list(self.tasks.values())
        resized = codec.resize_maps(tasks, self.outputs, *small)
        pngs = codec.encode_maps(tasks, self.outputs, resized, "png")
        return side_by_side([("image", Image.fromarray(self.image))] + [
            (name, panel(task.kind, Image.open(io.BytesIO(pngs[name][0])))) for name, task in self.tasks.items()])

    def save(self, directory: str | os.PathLike, stem: str | None = None, fmt: str = "png",
             precision: codec.Precision = "float16", preview: bool = True, pool: Executor | None = None) -> list[Path]:
        """Write ``<stem>.<task>.png`` per map (``fmt="png"``, the gateway's encodings) or one
        ``<stem>.npz`` (``fmt="npz"``, the gateway's NPZ arrays), and ``<stem>.preview.png``."""
        paths = output_paths(Path(directory), stem or Path(self.source or "image").stem, list(self.tasks), fmt,
                             preview)
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        if fmt == "npz":
            write_atomically(paths[0], codec.npz_bytes(self.encoded("npz", precision, pool)))
        else:
            pngs = self.encoded("png", precision, pool).values()
            for path, (data, _) in zip(paths[:len(self.tasks)], pngs, strict=True):
                write_atomically(path, data)
        if preview:  # last: a preview on disk means every map before it is complete
            buf = io.BytesIO()
            self.preview().save(buf, format="PNG")
            write_atomically(paths[-1], buf.getvalue())
        return paths


def write_atomically(path: Path, data: bytes) -> None:
    """``data`` under a temporary name, then renamed: a reader (or a resumed run) never sees half a file."""
    part = path.with_name(path.name + ".part")
    part.write_bytes(data)
    os.replace(part, path)


def output_paths(directory: Path, stem: str, tasks: Sequence[str], fmt: str, preview: bool) -> list[Path]:
    """The files ``Prediction.save`` writes, in order (the preview last)."""
    files = [directory / f"{stem}.npz"] if fmt == "npz" else [directory / f"{stem}.{t}.png" for t in tasks]
    return files + ([directory / f"{stem}.preview.png"] if preview else [])


def read_input(image: ImageInput, max_pixels: int = MAX_IMAGE_PIXELS) -> codec.Probe | np.ndarray:
    """A path or file bytes -> its probed header (decoded later at reduced scale); a PIL image
    (EXIF orientation applied) or an array -> uint8 RGB."""
    if isinstance(image, str | os.PathLike):
        image = Path(image).read_bytes()
    if isinstance(image, bytes):
        return codec.probe(image, max_pixels)
    if isinstance(image, Image.Image):
        image = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise codec.ImageError(422, "bad_array", f"an image array must be uint8 [H, W], [H, W, 3] (RGB) or "
                                                 f"[H, W, 4] (RGBA); got {arr.dtype} {list(arr.shape)}")
    if arr.shape[0] * arr.shape[1] > max_pixels:
        raise codec.ImageError(413, "too_many_pixels", f"image has {arr.shape[0] * arr.shape[1]} pixels; "
                                                       f"the limit is {max_pixels}")
    return codec.rgb_array(arr)


class Predictor:
    """A model repository (``faar-export``'s) behind the gateway's engine and data path."""

    def __init__(self, model_repository: str | os.PathLike | None = None, model: str = "faar",
                 version: int | None = None, *, engine: str = "onnx", device: str = "auto",
                 triton_url: str = "127.0.0.1:8001", triton_protocol: str = "grpc", batch_size: int | None = None,
                 threads: int | None = None, max_image_pixels: int = MAX_IMAGE_PIXELS) -> None:
        """``model_repository`` for the embedded engine; with ``engine="triton"`` the model (manifest,
        version) comes from Triton itself, as for the gateway."""
        settings = Settings(model_repository=None if model_repository is None else Path(model_repository),
                            model=model, model_version=version, engine=engine, device=device,
                            triton_url=triton_url, triton_protocol=triton_protocol, max_batch_size=batch_size,
                            max_image_pixels=max_image_pixels)
        self.max_image_pixels = max_image_pixels
        self.engine = EngineThread(create_engine(settings, upstream=lambda: 0))
        spec = self.engine.engine.spec
        if spec is None:
            self.engine.close()
            raise EngineUnavailable(f"model {model!r} is not available: {self.engine.engine.detail}")
        self.spec: ModelSpec = spec
        self.pool = ThreadPoolExecutor(threads or os.cpu_count() or 2, thread_name_prefix="faar-predict")

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.engine.close()
        self.pool.shutdown()

    def tasks(self, names: str | Sequence[str] | None = None) -> list[TaskInfo]:
        """``"semseg,depth"`` or ``["semseg", "depth"]`` -> those tasks; None -> every task."""
        joined = ",".join(names) if isinstance(names, list | tuple) else names
        return [self.spec.tasks[n] for n in self.spec.select_tasks(joined)]

    def prepare(self, image: ImageInput) -> codec.Prepared:
        """Read and decode one input for the model (thread-safe; the pipeline runs it in workers)."""
        return codec.prepare(read_input(image, self.max_image_pixels), self.spec.height, self.spec.width)

    def infer(self, batch: Sequence[codec.Prepared]) -> list[dict[str, np.ndarray]]:
        """One engine call for prepared images -> each image's model outputs (no batch axis)."""
        result = self.engine.infer(np.stack([p.pixels for p in batch]))
        return [{name: out[i] for name, out in result.outputs.items()} for i in range(len(batch))]

    def finish(self, prepared: codec.Prepared, outputs: dict[str, np.ndarray], tasks: list[TaskInfo],
               size: codec.SizeRequest, source: str | None = None, pool: Executor | None = None) -> Prediction:
        """Model outputs -> maps at the size asked for."""
        model_hw = next(iter(outputs.values())).shape[-2:]
        height, width = codec.output_size(size, prepared.size, model_hw)
        mine = {t.output: outputs[t.output] for t in tasks}
        maps = codec.resize_maps(tasks, mine, height, width, pool)
        return Prediction(maps, {t.name: t for t in tasks}, mine, prepared.image, prepared.size, source,
                          {"decode": prepared.decode_ms, "resize": prepared.resize_ms})

    def predict(self, image: ImageInput, tasks: str | Sequence[str] | None = None,
                size: codec.SizeRequest | str = "original") -> Prediction:
        """Every map (or ``tasks``) of one image at ``size`` (``original``, ``model`` or a longest side)."""
        return self.predict_batch([image], tasks, size)[0]

    def predict_batch(self, images: Iterable[ImageInput], tasks: str | Sequence[str] | None = None,
                      size: codec.SizeRequest | str = "original") -> list[Prediction]:
        """Several images: decoded in parallel, one engine call, maps resized in parallel."""
        images = list(images)
        wanted, request = self.tasks(tasks), codec.parse_size(size)
        prepared = list(self.pool.map(self.prepare, images))
        outputs = self.infer(prepared)
        sources = [str(i) if isinstance(i, str | os.PathLike) else None for i in images]
        if len(images) == 1:  # one image: its maps in parallel instead
            return [self.finish(prepared[0], outputs[0], wanted, request, sources[0], self.pool)]
        return list(self.pool.map(lambda k: self.finish(prepared[k], outputs[k], wanted, request, sources[k]),
                                  range(len(images))))
