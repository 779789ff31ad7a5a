"""What every benchmark script shares: round-robin median timing, the machine, the JSON file.

Scripts run from the repository root as ``python -m bench.<name>``.
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
from torch.utils.flop_counter import FlopCounterMode

from faar.adapters import adapters_of
from faar.config import load_config
from faar.export.gate import cpuinfo
from faar.model import FAARModel, build_model

# Two vector FMA units per core: Zen 2-5 and Intel cores since Haswell. The peak below takes
# AVX-512 at full width (16 fp32 lanes), true of Zen 5 and Intel server cores; Zen 4 runs
# AVX-512 in two 256-bit halves, so there the true peak is half of what it prints.
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


def random_model(config: str, overrides: list[str] | tuple[str, ...] = (), adapted: bool = True) -> FAARModel:
    """The preset with random weights; ``adapted`` gives every adapter a non-zero update
    (``lora_B`` starts at zero), so merging has something to fold and nothing is skipped."""
    torch.manual_seed(0)
    model = build_model(load_config(config, ["model.pretrained=false", *overrides]).model, load_weights=False)
    if adapted:
        with torch.no_grad():
            for a in adapters_of(model).values():
                a.lora_B.normal_(std=0.02)
    return model


def count_flops(module: torch.nn.Module, *inputs: torch.Tensor) -> int:
    """FLOPs of one no-grad call, by ``FlopCounterMode`` (an FMA counts 2; matmuls and convs only)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(*inputs)
    return counter.get_total_flops()


def ort_call(session: Any, feeds: dict[str, Any]) -> Callable[[], object]:
    """``session.run`` on ``feeds``, bound now."""
    return lambda: session.run(None, feeds)


def cpu_peak_gflops(cores: int | None = None) -> dict[str, Any]:
    """fp32 peak = cores x clock x FMA units x SIMD lanes x 2 (an FMA is two FLOPs), from /proc/cpuinfo."""
    info = cpuinfo()
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
    info = cpuinfo()
    flags = set(info.get("flags", "").split())
    return {"cpu": info.get("model name") or platform.processor() or platform.machine(),
            "cpu_family_model": f"{info.get('cpu family', '?')}/{info.get('model', '?')}",
            "mhz": float(info.get("cpu MHz", "0") or 0),
            "simd": "avx512" if "avx512f" in flags else "avx2+fma" if {"avx2", "fma"} <= flags else "older",
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
