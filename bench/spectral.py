"""The spectral decoder (TS-PD) in every backend, at the decoder's real feature sizes.

One ``TaskSpectralBlock`` per pyramid level (CW-SP + XT-Cons for all tasks, filters and
cross-task weights random, so nothing is an identity), timed as:
  torch_fft_eager   ``torch.fft.rfft2`` / ``irfft2`` in PyTorch (what training runs)
  matmul_eager      the matmul DFT in PyTorch
  onnx_dft_ort      ``fft=torch`` exported with ONNX ``DFT`` nodes, in ONNX Runtime
  matmul_ort        ``fft=matmul`` exported (plain MatMul), in ONNX Runtime (the export default)
Every form's output is compared with ``torch_fft_eager`` (max abs error in the table).

    python -m bench.spectral --config faar_pascal_swin_t --batches 1 8 --out bench/results/spectral_swin_t.json
    python -m bench.spectral --quick
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from bench.common import eager_call, interleaved_medians, markdown_table, ort_call, write_result
from faar.config import load_config
from faar.export import torch_to_onnx
from faar.model import build_model
from faar.spectral import FFTBackend, TaskSpectralBlock


class StackedBlock(nn.Module):
    """A level's block on one (tasks, batch, C, H, W) tensor, so it exports with a single input."""

    def __init__(self, block: TaskSpectralBlock) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.block(list(x.unbind(0))))


def random_block(tasks: int, channels: int, size: tuple[int, int], backend: FFTBackend) -> StackedBlock:
    torch.manual_seed(0)
    block = TaskSpectralBlock(tasks, channels, size, backend)
    with torch.no_grad():
        block.filters.normal_()
        block.scale.uniform_(0.5, 1.5)
        block.shift.normal_(std=0.1)
        block.alpha_low.uniform_(-0.5, 0.5)
        block.alpha_high.uniform_(-0.5, 0.5)
    return StackedBlock(block).eval()


def ort_session(module: StackedBlock, example: torch.Tensor, path: Path, threads: int) -> ort.InferenceSession:
    """Export as faar-export does (dynamo for torch.fft -> DFT, TorchScript for matmul), then load."""
    exporter = "dynamo" if module.block.dft.backend == "torch" else "torchscript"
    torch_to_onnx(module, example, path, exporter, 18, "x", ["y"], batch_dim=1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def levels_of(config: str) -> tuple[int, list[tuple[int, tuple[int, int]]]]:
    """(tasks, [(channels, (H, W)) per level]) of a preset, read off the built model."""
    cfg = load_config(config, ["model.pretrained=false"]).model
    model = build_model(cfg, load_weights=False)
    return len(cfg.tasks), list(zip(cfg.decoder.branch_channels, model.feature_sizes(), strict=True))


def run(config: str, batches: list[int], repeats: int, warmup: int) -> dict:
    tasks, levels = levels_of(config)
    threads = torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for level, (channels, size) in enumerate(levels):
            eager = {b: random_block(tasks, channels, size, b) for b in ("torch", "matmul")}
            example = torch.randn(tasks, 2, channels, *size)
            sessions = {b: ort_session(eager[b], example, Path(tmp) / f"{level}_{b}.onnx", threads)
                        for b in ("torch", "matmul")}
            for batch in batches:
                x = torch.randn(tasks, batch, channels, *size)
                xn = x.numpy()
                with torch.no_grad():
                    reference = eager["torch"](x).numpy()
                    outputs = {"torch_fft_eager": reference, "matmul_eager": eager["matmul"](x).numpy(),
                               "onnx_dft_ort": sessions["torch"].run(None, {"x": xn})[0],
                               "matmul_ort": sessions["matmul"].run(None, {"x": xn})[0]}

                times = interleaved_medians({
                    "torch_fft_eager": eager_call(eager["torch"], x),
                    "matmul_eager": eager_call(eager["matmul"], x),
                    "onnx_dft_ort": ort_call(sessions["torch"], {"x": xn}),
                    "matmul_ort": ort_call(sessions["matmul"], {"x": xn}),
                }, repeats, warmup)
                for form, seconds in times.items():
                    rows.append({"level": level, "size": list(size), "channels": channels, "batch": batch,
                                 "form": form, "ms": seconds * 1000,
                                 "x_torch_fft": seconds / times["torch_fft_eager"],
                                 "max_abs_err": float(np.abs(outputs[form] - reference).max())})
    totals = {}
    for batch in batches:
        for form in ("torch_fft_eager", "matmul_eager", "onnx_dft_ort", "matmul_ort"):
            totals[f"{form}_b{batch}"] = sum(r["ms"] for r in rows if r["batch"] == batch and r["form"] == form)
    return {"setup": {"config": config, "tasks": tasks, "levels": [[c, list(s)] for c, s in levels],
                      "batches": batches, "repeats": repeats, "threads": threads},
            "rows": rows, "total_ms": totals}


def print_table(result: dict) -> None:
    print(f"setup: {result['setup']}")
    print(markdown_table(["level", "HxW", "C", "batch", "form", "median ms", "x torch.fft", "max abs err"],
                         [[r["level"], "x".join(map(str, r["size"])), r["channels"], r["batch"], r["form"],
                           r["ms"], r["x_torch_fft"], r["max_abs_err"]] for r in result["rows"]]))
    print(markdown_table(["all levels", "ms"], [[k, v] for k, v in result["total_ms"].items()]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="faar_pascal_swin_t")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="the tiny preset, batch 1 and 2, few repeats")
    parser.add_argument("--out", type=Path, default=Path("bench/results/spectral.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.config, args.batches, args.repeats, args.warmup = "tiny", [1, 2], 3, 1
    result = run(args.config, args.batches, args.repeats, args.warmup)
    print_table(result)
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
