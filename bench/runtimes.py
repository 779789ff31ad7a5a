"""PyTorch eager against the exported ONNX graph in ONNX Runtime: images/s and achieved GFLOP/s.

Both run the same thing end to end: the merged model behind the export wrapper (uint8
NHWC in, normalisation, backbone, decoder, argmax / activations out). ONNX Runtime is
tried in the settings it offers on CPU:
  ort_all      graph optimisation ORT_ENABLE_ALL, intra-op threads = cores (the gateway's setting)
  ort_basic    only the basic (offline) optimisations the exporter already applied
  ort_1thread  ORT_ENABLE_ALL with one intra-op thread
  ort_parallel ORT_PARALLEL execution (independent task branches at once), 1 intra x cores inter
  ort_fp16     the ``--fp16`` export (weights and activations half, DFT and I/O fp32), ORT_ENABLE_ALL
FLOPs are counted once per image with ``torch.utils.flop_counter.FlopCounterMode`` on the
merged model with the matmul DFT (the exported graph); achieved GFLOP/s = FLOPs x batch /
median seconds, against the CPU's fp32 peak (``bench.common.cpu_peak_gflops`` says how).

    python -m bench.runtimes --config faar_pascal_swin_t --batches 1 4 8 --out bench/results/runtimes_swin_t.json
    python -m bench.runtimes --quick
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from bench.common import (
    count_flops,
    cpu_peak_gflops,
    eager_call,
    interleaved_medians,
    markdown_table,
    ort_call,
    random_model,
    write_result,
)
from faar.export import build_export_module, export_onnx
from faar.model import FAARModel, merge_model


def merged_model(config: str) -> FAARModel:
    """The preset's DoRA model with random adapter updates, merged as faar-export merges it."""
    return merge_model(random_model(config)).eval()


def session(path: Path, level: ort.GraphOptimizationLevel, intra: int, parallel: bool = False,
            inter: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = intra
    if parallel:
        options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        options.inter_op_num_threads = inter
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(config: str, batches: list[int], repeats: int, warmup: int, fp16: bool) -> dict:
    cores = torch.get_num_threads()
    eager_model = merged_model(config)
    wrapper = build_export_module(eager_model)
    levels = ort.GraphOptimizationLevel
    with tempfile.TemporaryDirectory() as tmp:
        served = merged_model(config)
        served.set_fft_backend("matmul")
        flops = count_flops(served, torch.randn(1, 3, *served.img_size))
        fp32_path, fp16_path = Path(tmp) / "fp32.onnx", Path(tmp) / "fp16.onnx"
        export_onnx(build_export_module(served), fp32_path)
        sessions = {"ort_all": session(fp32_path, levels.ORT_ENABLE_ALL, cores),
                    "ort_basic": session(fp32_path, levels.ORT_ENABLE_BASIC, cores),
                    "ort_1thread": session(fp32_path, levels.ORT_ENABLE_ALL, 1),
                    "ort_parallel": session(fp32_path, levels.ORT_ENABLE_ALL, 1, parallel=True, inter=cores)}
        if fp16:
            export_onnx(build_export_module(served), fp16_path, fp16=True)
            sessions["ort_fp16"] = session(fp16_path, levels.ORT_ENABLE_ALL, cores)
        h, w = eager_model.img_size
        rows = []
        for batch in batches:
            image = np.random.default_rng(batch).integers(0, 256, (batch, h, w, 3), dtype=np.uint8)
            name = sessions["ort_all"].get_inputs()[0].name

            forms = {"torch_eager": eager_call(wrapper, torch.from_numpy(image))}
            forms |= {key: ort_call(sess, {name: image}) for key, sess in sessions.items()}
            times = interleaved_medians(forms, repeats, warmup)
            for form, seconds in times.items():
                rows.append({"batch": batch, "form": form, "ms_per_batch": seconds * 1000,
                             "images_per_s": batch / seconds, "gflops_per_s": flops * batch / seconds / 1e9,
                             "x_eager": times["torch_eager"] / seconds})
    peak = cpu_peak_gflops(cores)
    for row in rows:
        row["share_of_peak"] = row["gflops_per_s"] / peak["gflops"]
    return {"setup": {"config": config, "img_size": [h, w], "batches": batches, "repeats": repeats,
                      "threads": cores, "gflop_per_image": flops / 1e9},
            "peak": peak, "rows": rows}


def print_table(result: dict) -> None:
    print(f"setup: {result['setup']}")
    print(f"fp32 peak: {result['peak']['gflops']} GFLOP/s = {result['peak']['formula']}")
    print(markdown_table(["batch", "form", "ms/batch", "images/s", "GFLOP/s", "% of peak", "x eager"],
                         [[r["batch"], r["form"], r["ms_per_batch"], r["images_per_s"], r["gflops_per_s"],
                           100 * r["share_of_peak"], r["x_eager"]] for r in result["rows"]]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="faar_pascal_swin_t")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-fp16", dest="fp16", action="store_false", help="skip the fp16 export")
    parser.add_argument("--quick", action="store_true", help="the tiny preset, batch 1 and 2, few repeats")
    parser.add_argument("--out", type=Path, default=Path("bench/results/runtimes.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.config, args.batches, args.repeats = "tiny", [1, 2], 3
    result = run(args.config, args.batches, args.repeats, args.warmup, args.fp16)
    print_table(result)
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
