"""What every benchmark script shares: round-robin median timing, the machine, the JSON file.

Scripts run as ``python bench/<name>.py`` (this folder is then on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

# Zen 2/3/4 and Intel since Haswell issue two vector FMAs per cycle per core.
FMA_UNITS_PER_CORE = 2


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per callable, timed round-robin so drift on a shared machine hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def eager_call(module: torch.nn.Module, *inputs: torch.Tensor) -> Callable[[], object]:
    """``module(*inputs)`` without autograd, bound now (safe to build inside a loop)."""
    def call() -> object:
        with torch.no_grad():
            return module(*inputs)

    return call


def ort_call(session: Any, feeds: dict[str, Any]) -> Callable[[], object]:
    """``session.run`` on ``feeds``, bound now."""
    return lambda: session.run(None, feeds)


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def cpu_peak_gflops(cores: int | None = None) -> dict[str, Any]:
    """fp32 peak = cores x clock x FMA units x SIMD lanes x 2 (an FMA is two FLOPs), from /proc/cpuinfo."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    lanes = 16 if "avx512f" in flags else 8 if {"avx2", "fma"} <= flags else 4
    ghz = float(info.get("cpu MHz", "0") or 0) / 1000
    cores = cores or torch.get_num_threads()
    peak = cores * ghz * FMA_UNITS_PER_CORE * lanes * 2
    return {"gflops": round(peak, 1), "cores": cores, "ghz": round(ghz, 3), "fp32_lanes": lanes,
            "fma_units_per_core": FMA_UNITS_PER_CORE,
            "formula": f"{cores} cores x {ghz:.3f} GHz x {FMA_UNITS_PER_CORE} FMA x {lanes} lanes x 2"}


def machine() -> dict[str, Any]:
    """Enough about the machine and the stack to tell whether two results are comparable."""
    versions = {}
    for pkg in ("torch", "timm", "onnx", "onnxruntime", "fastapi", "tritonclient", "nvidia-pytriton"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {"cpu": _cpuinfo().get("model name") or platform.processor() or platform.machine(),
            "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "versions": versions}


def write_result(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**result, "machine": machine()}, indent=2))


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A table that reads in a terminal and pastes into RESULTS.md as is."""
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
