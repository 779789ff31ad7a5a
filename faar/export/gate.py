"""The accuracy gate of a reduced-precision export, and the images it and calibration use.

A quantised (or fp16) graph is judged by task metrics, not by raw output errors: its
metrics on held-out labelled images (``faar.evaluation``: the gateway's image path and the
training meters) against those of the fp32 graph of the same run on the same images.
Each task is judged on its headline metric (the first its meter reports, as the training
log does) against a limit in that metric's units, or in percent of the fp32 value where
the limit says so; a task outside its limit fails the export, named.

Decisions:

* Default limits, per headline metric: mIoU (semseg, parts, saliency max-IoU) and the edge
  F-score may lose 1 point, the mean normal angle may grow by 0.5 degrees, depth rmse by
  2 %. ``--gate TASK=VALUE[%]`` replaces a task's limit (tests relax it on random weights).
* Held-out images: the run's validation split (``config.yaml`` in the run directory, the
  data root replaceable with ``--data-root``), never the calibration images, which come
  from the training split or a folder (``--calibration``). Both are spread evenly over the
  split rather than its first N, so one scene type or sequence does not fill them.
* The gate runs on the exporting machine's ONNX Runtime CPU kernels; the manifest names the
  CPU and whether it has VNNI, because int8 kernels differ per instruction set.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from faar_serve import codec

from ..config import Config, ConfigError, load_config
from ..data import build_dataset
from ..evaluation import Sample, samples
from ..metrics import LOWER_IS_BETTER
from .options import ExportError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
MAX_CALIBRATION_PIXELS = 100_000_000  # calibration folders are trusted; a bomb still gets a clear error


@dataclass(frozen=True)
class Limit:
    """How much a task's headline metric may worsen: in its own units, or in percent of fp32."""

    worse_by: float
    relative: bool = False

    def __str__(self) -> str:
        return f"{self.worse_by:g}{'%' if self.relative else ''}"


# Per headline metric (the first key a meter reports): mIoU and F-scores in points, the mean
# normal angle in degrees, depth rmse in percent of the fp32 model's.
DEFAULT_LIMITS: dict[str, Limit] = {"miou": Limit(1.0), "odsf": Limit(1.0), "mean": Limit(0.5),
                                    "rmse": Limit(2.0, relative=True)}


def parse_limit(text: str) -> tuple[str, Limit]:
    """``TASK=VALUE`` or ``TASK=VALUE%`` (``--gate``) -> (task, limit)."""
    match = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*=\s*(-?\d+(?:\.\d*)?(?:e-?\d+)?)\s*(%?)\s*", text)
    if not match:
        raise ExportError(f"--gate {text!r}: expected TASK=VALUE or TASK=VALUE% (e.g. depth=2%)")
    return match.group(1), Limit(float(match.group(2)), relative=bool(match.group(3)))


def gate_limits(tasks: Sequence[str], headline: Mapping[str, str],
                overrides: Mapping[str, Limit] | None = None) -> dict[str, Limit]:
    """The limit of each task: its override, else the default for its headline metric."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(tasks))
    if unknown:
        raise ExportError(f"--gate names task(s) {unknown} that the model does not have ({list(tasks)})")
    limits = {}
    for task in tasks:
        if task in overrides:
            limits[task] = overrides[task]
        elif headline[task] in DEFAULT_LIMITS:
            limits[task] = DEFAULT_LIMITS[headline[task]]
        else:
            raise ExportError(f"no default gate limit for {task}.{headline[task]}; pass --gate {task}=VALUE")
    return limits


def judge(reference: Mapping[str, Mapping[str, float]], candidate: Mapping[str, Mapping[str, float]],
          limits: Mapping[str, Limit]) -> dict[str, Any]:
    """Each task's headline metric, candidate against reference, within its limit?

    ``worse_by`` is how much worse the candidate is (positive = worse) in the limit's units;
    ``score`` the largest worse_by / limit over tasks (1 = at a limit): what the
    sensitivity pass lowers.
    """
    tasks: dict[str, Any] = {}
    failures = []
    for task, limit in limits.items():
        metric = next(iter(reference[task]))
        ref, cand = reference[task][metric], candidate[task][metric]
        worse = (cand - ref) if metric in LOWER_IS_BETTER else (ref - cand)
        if limit.relative:
            worse = 100 * worse / abs(ref) if ref else math.inf
        passed = bool(worse <= limit.worse_by)  # NaN fails
        tasks[task] = {"metric": metric, "fp32": ref, "candidate": cand, "worse_by": worse,
                       "limit": str(limit), "passed": passed}
        if not passed:
            failures.append(f"{task} {metric} {ref:.4g} -> {cand:.4g}, worse by {worse:.3g}"
                            f"{'%' if limit.relative else ''} (limit {limit})")
    score = max((_score(t["worse_by"], limits[k]) for k, t in tasks.items()), default=0.0)
    return {"passed": not failures, "failures": failures, "score": score, "tasks": tasks}


def _score(worse: float, limit: Limit) -> float:
    if math.isnan(worse):
        return math.inf
    if limit.worse_by > 0:
        return worse / limit.worse_by
    return 0.0 if worse <= limit.worse_by else math.inf


# --- the images ---------------------------------------------------------------------------------
def spread(total: int, n: int) -> list[int]:
    """``n`` indices spread evenly over ``range(total)`` (all of them when n >= total)."""
    if n >= total:
        return list(range(total))
    return sorted({int(round(i)) for i in np.linspace(0, total - 1, n)})


def run_config(run_dir: Path, data_root: str | None = None) -> Config:
    """The run's config (its data section says where calibration and held-out images are)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ExportError(f"{path} does not exist: a reduced-precision export calibrates and gates on the "
                          "run's data (faar-train writes config.yaml)")
    try:
        return load_config(str(path), [f"data.root={data_root}"] if data_root else [])
    except ConfigError as exc:
        raise ExportError(f"{path}: {exc}") from exc


def _split(cfg: Config, split: str, tasks: Sequence[str], size: tuple[int, int]):
    try:
        return build_dataset(cfg.data, split, list(tasks), size, train=False)
    except (ValueError, FileNotFoundError) as exc:
        raise ExportError(f"the run's data ({cfg.data.dataset}, split {split!r}) is not readable here: {exc}; "
                          "pass --data-root") from exc


def held_out(cfg: Config, tasks: Sequence[str], size: tuple[int, int], n: int) -> list[Sample]:
    """Up to ``n`` labelled images of the run's validation split, spread over it."""
    dataset = _split(cfg, cfg.data.val_split, tasks, size)
    return [s for i in spread(len(dataset), n) for s in samples(dataset, size, limit=1, start=i)]


def calibration_images(source: str, cfg: Config | None, tasks: Sequence[str], size: tuple[int, int],
                       n: int) -> list[np.ndarray]:
    """``n`` uint8 images at the model's size from the run's training split (``source`` "run")
    or from a folder of image files, resized (and decoded) by the gateway's own codec."""
    if source == "run":
        if cfg is None:
            raise ExportError("--calibration run needs the run's config.yaml")
        dataset = _split(cfg, cfg.data.train_split, tasks, size)
        return [codec.model_input(dataset.raw(i)["image"], *size) for i in spread(len(dataset), n)]
    root = Path(source)
    if not root.is_dir():
        raise ExportError(f"--calibration {source}: not 'run' and not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ExportError(f"calibration folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for i in spread(len(files), n):
        try:
            # the gateway's own path: header checks, reduced-scale decode, resize to the model
            prepared = codec.prepare(codec.probe(files[i].read_bytes(), MAX_CALIBRATION_PIXELS), *size)
        except (OSError, codec.ImageError) as exc:
            raise ExportError(f"calibration image {files[i]}: {exc}") from exc
        images.append(prepared.pixels)
    return images


def cpuinfo() -> dict[str, str]:
    """The first processor's ``/proc/cpuinfo`` fields (empty where there is none)."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def cpu_description() -> dict[str, Any]:
    """The CPU whose int8 kernels the gate measured (VNNI changes them)."""
    info = cpuinfo()
    flags = set(info.get("flags", "").split())
    return {"model": info.get("model name", "unknown"), "cores": os.cpu_count() or 0,
            "avx2": "avx2" in flags, "avx512": "avx512f" in flags,
            "vnni": bool({"avx512_vnni", "avx_vnni"} & flags)}

