"""One image's maps, resized and encoded: the step the gateway, ``Predictor`` and ``faar-predict`` share.

Two phases, each timed on the wall clock: every map is resized (``resize``), then every map
is encoded (``encode``). With a thread pool the maps of one phase run in parallel, the
costliest first so that a cheap one finishes last: OpenCV, numpy, zlib-ng and fpng release
the GIL, so this uses cores that would otherwise be idle (one request at a time); under
load every core is busy anyway and it only adds hand-offs (the gateway then passes no
pool; bench/RESULTS.md says when it helps). The barrier between the phases keeps the two
stages' times meaningful.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np

from ..manifest import TaskInfo
from .maps import Precision, npz_map, png_map, resize_map

R = TypeVar("R")
Format = Literal["json", "png", "npz"]  # json: PNG fields with base64; png: (PNG bytes, fields); npz: arrays


@dataclass
class RenderedMaps:
    maps: dict[str, Any]  # task -> json fields | (png bytes, fields) | array
    height: int
    width: int
    resize_ms: float
    encode_ms: float


# Relative cost of one map by kind (resize + encode of a 1080p map, bench/RESULTS.md): the pool
# starts the costliest first, so the last map to finish is a cheap one.
_WORK = {"normals": 4, "depth": 2, "probability": 2, "labels": 1}


def _each(pool: Executor | None, fn: Callable[[TaskInfo], R], tasks: Sequence[TaskInfo]) -> list[R]:
    """``fn`` of every task, in order; on ``pool`` (costliest first) when given."""
    if pool is None or len(tasks) < 2:
        return [fn(task) for task in tasks]
    costliest_first = sorted(range(len(tasks)), key=lambda i: -_WORK.get(tasks[i].kind, 1))
    futures = {i: pool.submit(fn, tasks[i]) for i in costliest_first}
    return [futures[i].result() for i in range(len(tasks))]


def resize_maps(tasks: Sequence[TaskInfo], outputs: Mapping[str, np.ndarray], height: int, width: int,
                pool: Executor | None = None) -> dict[str, np.ndarray]:
    """task name -> its map at ``height x width`` (labels uint8, the rest float32)."""
    resized = _each(pool, lambda t: resize_map(t.kind, outputs[t.output], height, width), tasks)
    return {t.name: arr for t, arr in zip(tasks, resized, strict=True)}


def encode_maps(tasks: Sequence[TaskInfo], outputs: Mapping[str, np.ndarray], resized: Mapping[str, np.ndarray],
                fmt: Format, precision: Precision = "float16", pool: Executor | None = None) -> dict[str, Any]:
    """task name -> the map in ``fmt``."""
    def one(task: TaskInfo) -> Any:
        if fmt == "npz":
            return npz_map(task, resized[task.name], precision)
        data, fields = png_map(task, outputs[task.output], resized[task.name])
        return {**fields, "png": base64.b64encode(data).decode("ascii")} if fmt == "json" else (data, fields)

    return {t.name: m for t, m in zip(tasks, _each(pool, one, tasks), strict=True)}


def render(tasks: Sequence[TaskInfo], outputs: Mapping[str, np.ndarray], height: int, width: int, fmt: Format,
           precision: Precision = "float16", pool: Executor | None = None) -> RenderedMaps:
    """One image's model outputs (no batch axis) -> every map in ``tasks`` at ``height x width`` in ``fmt``."""
    t0 = time.perf_counter()
    resized = resize_maps(tasks, outputs, height, width, pool)
    t1 = time.perf_counter()
    maps = encode_maps(tasks, outputs, resized, fmt, precision, pool)
    t2 = time.perf_counter()
    return RenderedMaps(maps, height, width, (t1 - t0) * 1000, (t2 - t1) * 1000)
