"""One run on a CUDA machine: export parity on the GPU, fp16, TensorRT through ONNX Runtime, throughput.

What it does, in under ten minutes on one GPU with Swin-T at 448 (``--budget-s`` stops
starting new steps past the budget and says which were skipped):

1. Exports the preset's model (random weights, adapters with non-zero updates, merged) as
   ``faar-export`` does: the fp32 graph and the fp16 graph (spectral blocks kept fp32).
2. Parity of each configuration against the unmerged PyTorch model (fp32, CPU) on
   ``faar.export.parity``'s batches, with the export's own tolerances:
     cuda_fp32     CUDA provider with ``use_tf32=0``: ONNX Runtime's CUDA provider uses TF32
                   by default on Ampere and newer, which is not the fp32 the parity means
     cuda_tf32     the CUDA provider's default (what serving gets), judged at fp16 tolerance
     cuda_fp16     the fp16 graph on the CUDA provider, fp16 tolerance
     trt_fp32      TensorRT through ONNX Runtime (if this build has the provider), engines
                   cached in ``--trt-cache`` (``trt_engine_cache_enable``/``_path``: without
                   them every start rebuilds them, minutes for Swin-T), one optimisation
                   profile for batch 1..max; TensorRT may use TF32 for fp32 layers, so fp16
                   tolerance
     trt_fp16      the same with ``trt_fp16_enable``
3. Throughput (images/s, median of ``--repeats`` timed round-robin after warm-up) of every
   configuration that passed, at batch 1, 8 and 32.

It prints one table and writes the JSON (``--out``). ``--dry-run`` takes the same code path
on the CPU provider with the tiny preset and batches 1 and 2, so CI proves the script runs
(``tests/test_gpu_check.py``); its numbers mean nothing.

    python -m bench.gpu_check --out bench/results/gpu_check.json
    python -m bench.gpu_check --dry-run --out /tmp/gpu_check_dry.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench.common import interleaved_medians, markdown_table, random_model, write_result
from faar.export import TOLERANCES, build_export_module, check_parity, export_onnx, parity_batches
from faar.model import merge_model

CUDA, TRT, CPU = "CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"


@dataclass
class Setup:
    """One way of running a graph: which file, which providers, which parity tolerance."""

    name: str
    graph: str  # "fp32" | "fp16"
    providers: list[Any]
    tolerance: str  # key of faar.export.TOLERANCES
    note: str = ""
    result: dict[str, Any] = field(default_factory=dict)


def setups(dry_run: bool, max_batch: int, input_shape: str, trt_cache: Path) -> list[Setup]:
    """The configurations to check; on a dry run each maps to the CPU provider (same code path)."""
    available = ort.get_available_providers()
    cuda = [(CUDA, {"device_id": 0, "use_tf32": 0}), CPU]
    trt_options = {"device_id": 0, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(trt_cache),
                   "trt_timing_cache_enable": True, "trt_timing_cache_path": str(trt_cache),
                   "trt_profile_min_shapes": f"image:1x{input_shape}",
                   "trt_profile_opt_shapes": f"image:{max_batch}x{input_shape}",
                   "trt_profile_max_shapes": f"image:{max_batch}x{input_shape}"}
    plan = [
        Setup("cuda_fp32", "fp32", cuda, "fp32", "use_tf32=0"),
        Setup("cuda_tf32", "fp32", [(CUDA, {"device_id": 0}), CPU], "fp16", "provider default (TF32 on Ampere+)"),
        Setup("cuda_fp16", "fp16", cuda, "fp16", "spectral blocks fp32"),
        Setup("trt_fp32", "fp32", [(TRT, trt_options), *cuda], "fp16", "engine cache; TF32 allowed"),
        Setup("trt_fp16", "fp32", [(TRT, {**trt_options, "trt_fp16_enable": True}), *cuda], "fp16",
              "engine cache; trt_fp16_enable"),
    ]
    for s in plan:
        wanted = s.providers[0][0]
        if dry_run:
            s.providers, s.note = [CPU], f"dry run: {CPU} in place of {wanted}"
        elif wanted not in available:
            s.result = {"skipped": f"{wanted} not in this onnxruntime ({ort.__version__}): {available}"}
    return plan


def session(path: Path, providers: list[Any]) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=providers)


def run(config: str, batches: list[int], repeats: int, dry_run: bool, budget_s: float, trt_cache: Path) -> dict:
    t0 = time.monotonic()
    model = random_model(config)
    reference = build_export_module(model)  # unmerged, fp32, CPU: what the parity means
    merged = merge_model(model)
    merged.set_fft_backend("matmul")
    h, w = model.img_size
    plan = setups(dry_run, max(batches), f"{h}x{w}x3", trt_cache)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"fp32": Path(tmp) / "fp32.onnx", "fp16": Path(tmp) / "fp16.onnx"}
        export_onnx(build_export_module(merged), paths["fp32"])
        export_onnx(build_export_module(merged), paths["fp16"], fp16=True)
        check_batches = parity_batches((h, w))
        sessions = {}
        for s in plan:
            if s.result.get("skipped"):
                continue
            if time.monotonic() - t0 > budget_s:
                s.result = {"skipped": f"over the {budget_s:.0f} s budget"}
                continue
            try:
                started = time.monotonic()
                parity = check_parity(paths[s.graph], reference, check_batches, TOLERANCES[s.tolerance],
                                      providers=s.providers)
                sess = session(paths[s.graph], s.providers)
            except Exception as exc:  # a provider that fails to initialise is a finding, not a crash
                s.result = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            s.result = {"providers": sess.get_providers(), "parity_passed": parity["passed"],
                        "parity_failures": parity["failures"], "parity_outputs": parity["outputs"],
                        "setup_s": round(time.monotonic() - started, 1)}
            if parity["passed"]:
                sessions[s.name] = sess
        rng = np.random.default_rng(0)
        for batch in batches:
            if time.monotonic() - t0 > budget_s:
                for s in plan:
                    s.result.setdefault("throughput", {})[str(batch)] = None
                continue
            image = rng.integers(0, 256, (batch, h, w, 3), dtype=np.uint8)
            calls = {name: (lambda sess=sess, image=image: sess.run(None, {"image": image}))
                     for name, sess in sessions.items()}
            times = interleaved_medians(calls, repeats, warmup=1)
            for s in plan:
                if s.name in times:
                    s.result.setdefault("throughput", {})[str(batch)] = batch / times[s.name]
    return {"setup": {"config": config, "img_size": [h, w], "batches": batches, "repeats": repeats,
                      "dry_run": dry_run, "onnxruntime": ort.__version__,
                      "available_providers": ort.get_available_providers(),
                      "seconds": round(time.monotonic() - t0, 1)},
            "rows": [{"name": s.name, "graph": s.graph, "tolerance": s.tolerance, "note": s.note, **s.result}
                     for s in plan]}


def _parity_cell(row: dict[str, Any]) -> str:
    if "skipped" in row:
        return "skipped: " + row["skipped"]
    if "error" in row:
        return "error: " + row["error"][:120]
    worst = max((v.get("max_abs_error", 0.0) for v in row["parity_outputs"].values()), default=0.0)
    agree = min((v.get("agreement", 1.0) for v in row["parity_outputs"].values()), default=1.0)
    return f"{'pass' if row['parity_passed'] else 'FAIL'} (max abs {worst:.2g}, labels {100 * agree:.2f} %)"


def print_table(result: dict) -> None:
    print(f"setup: {result['setup']}")
    batches = result["setup"]["batches"]
    rows = []
    for r in result["rows"]:
        tput = r.get("throughput", {})
        rows.append([r["name"], r["graph"], r["note"], _parity_cell(r),
                     *[tput.get(str(b)) if tput.get(str(b)) is not None else "-" for b in batches]])
    print(markdown_table(["config", "graph", "note", "parity vs PyTorch fp32",
                          *[f"b{b} img/s" for b in batches]], rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="faar_pascal_swin_t", help="preset (default: faar_pascal_swin_t)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="start no new step after this many seconds (default: 540, inside ten minutes)")
    parser.add_argument("--trt-cache", type=Path, default=Path("out/trt_cache"),
                        help="TensorRT engine and timing cache folder (default: out/trt_cache)")
    parser.add_argument("--dry-run", action="store_true",
                        help="the same code path on the CPU provider, tiny preset, batches 1 and 2 (CI)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_check.json"))
    args = parser.parse_args(argv)
    if args.dry_run:
        args.config, args.batches, args.repeats = "tiny", [1, 2], 2
    args.trt_cache.mkdir(parents=True, exist_ok=True)
    result = run(args.config, args.batches, args.repeats, args.dry_run, args.budget_s, args.trt_cache)
    print_table(result)
    write_result(args.out, result)
    failed = [r["name"] for r in result["rows"] if r.get("parity_passed") is False or "error" in r]
    if failed:
        print(f"parity failed or errored: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
