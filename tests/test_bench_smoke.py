"""Every benchmark runs on tiny sizes as documented (``python -m bench.<name>`` from the repository
root) and writes its JSON (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from faar_serve.settings import usable_cores

ROOT = Path(__file__).resolve().parent.parent


def run_quick(script: str, tmp_path: Path, *extra: str) -> tuple[dict[str, Any], str]:
    """``extra`` narrows the slowest benchmarks to the parts no other test covers (suite time)."""
    out = tmp_path / f"{script}.json"
    proc = subprocess.run([sys.executable, "-m", f"bench.{script}", "--quick", "--out", str(out), *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["machine"]["versions"]["torch"]
    return result, proc.stdout


def test_adapter_cost_quick(tmp_path: Path) -> None:
    result, stdout = run_quick("adapter_cost", tmp_path)
    assert {"floor", "single", "merged", "merged_after_shrink"} <= set(result["inference_s"])
    assert result["ratio_to_floor"]["floor"] == 1.0
    assert set(result["train_step_s"]) == {"fused_r8", "fused_r2", "unmerged_r8", "unmerged_r2"}
    flops = result["gflop_per_image"]
    assert flops["merged"] == flops["floor"] == flops["merged_after_shrink"] < flops["unmerged_r8"]
    assert all(m["activations"] > 0 and m["trainable"] > 0 for m in result["train_memory_mib"].values())
    assert "x floor" in stdout


def test_spectral_quick(tmp_path: Path) -> None:
    result, stdout = run_quick("spectral", tmp_path)
    forms = {"torch_fft_eager", "matmul_eager", "onnx_dft_ort", "matmul_ort"}
    assert {r["form"] for r in result["rows"]} == forms
    assert {r["batch"] for r in result["rows"]} == {1, 2}
    # every backend computes the same transform as torch.fft
    assert max(r["max_abs_err"] for r in result["rows"]) < 1e-3
    assert "x torch.fft" in stdout


def test_runtimes_quick(tmp_path: Path) -> None:
    result, stdout = run_quick("runtimes", tmp_path)
    assert {r["form"] for r in result["rows"]} >= {"torch_eager", "ort_all", "ort_basic", "ort_fp16"}
    assert result["setup"]["gflop_per_image"] > 0
    assert result["peak"]["gflops"] > 0
    assert all(r["images_per_s"] > 0 for r in result["rows"])
    assert "% of peak" in stdout


def test_serving_quick(tmp_path: Path) -> None:
    result, stdout = run_quick("serving", tmp_path)
    assert {r["setup"] for r in result["rows"]} == {"onnx", "onnx_batching", "onnx_spin_wait", "onnx_streams",
                                                    "triton"}
    stages = {"decode", "resize", "queue", "inference", "encode"}
    assert all(set(r["server_stage_p50_ms"]) == stages for r in result["rows"])
    assert all(r["errors"] == 0 and r["ok"] == r["requests"] for r in result["rows"])
    assert all(r["gateway_peak_rss_mib"] > 0 for r in result["rows"])
    assert set(result["bare_images_per_s"]) == {"b1", "b8", f"b1 x{usable_cores()} streams"}
    assert "p99 ms" in stdout


def test_imaging_quick(tmp_path: Path) -> None:
    result, stdout = run_quick("imaging", tmp_path)
    assert {r["decoder"] for r in result["decode"]} >= {"pillow", "pillow_draft"}
    chosen = [r for r in result["encode"] if r["encoder"].startswith("codec writer")]
    assert chosen and all(r["pillow_reads_bit_exact"] for r in result["encode"])
    assert any(r["resize"].startswith("labels codec") for r in result["resize"])


def test_data_path_quick(tmp_path: Path) -> None:
    result, stdout = run_quick("data_path", tmp_path)
    assert {(r["upload"], r["size"]) for r in result["rows"]} == {
        (u, s) for u in ("320x240 PNG", "1280x720 JPEG") for s in ("original", "model")}
    assert all(r["stages_ms"]["inference"] > 0 and r["work_over_inference"] > 0 for r in result["rows"])
    assert "(decode + resize + encode) / inference" in stdout


def test_predict_quick(tmp_path: Path) -> None:
    result, stdout = run_quick("predict", tmp_path)
    (row,) = result["rows"]
    assert row["images"] == 8 and row["ratio"] > 0 and "faar-predict images/s" in stdout


def test_quantization_quick(tmp_path: Path) -> None:
    # the per-group forms: test_int8's sensitivity pass quantises every group
    result, stdout = run_quick("quantization", tmp_path, "--no-groups")
    forms = {r["form"] for r in result["rows"]}
    assert {"fp32", "int8_all"} <= forms
    assert {r["batch"] for r in result["rows"]} == {1, 2}
    assert all(r["images_per_s"] > 0 for r in result["rows"])
    assert result["setup"]["groups"] and isinstance(result["setup"]["cpu"]["vnni"], bool)
    assert "x int8_all" in stdout


def test_overload_quick(tmp_path: Path) -> None:
    # Triton's deadlines: test_serve_attacks and test_triton run them against real servers
    result, stdout = run_quick("overload", tmp_path, "--engines", "onnx")
    assert {r["engine"] for r in result["overload"]} == {"onnx"}
    for row in result["overload"]:
        assert row["answers"] > 0 and sum(row["errors"].values()) == 0
        assert set(row["refusals"]) <= {"503 deadline", "503 expired", "503 overloaded"}
        assert row["capacity_images_per_s"] > 0 and row["gateway_peak_rss_mib"] > 0
    big = result["costly_uploads"]
    assert big["only_allowed_statuses"] and big["normal"]["answers"] > 0 and big["within_budget"]
    assert "goodput req/s" in stdout


def test_servers_quick(tmp_path: Path) -> None:
    result, stdout = run_quick("servers", tmp_path, "--only", "granian", "uvicorn (httptools)")
    rows = {r["server"]: r for r in result["rows"]}
    assert rows["granian"]["big_header_8mb_status"] == 431 and rows["granian"]["idle_s"] is not None
    assert "slow header s" in stdout


def test_workers_quick(tmp_path: Path) -> None:
    result, stdout = run_quick("workers", tmp_path)
    assert {(r["engine"], r["workers"]) for r in result["rows"]} == {(e, n) for e in ("triton", "onnx") for n in (1, 2)}
    for row in result["rows"]:
        assert row["errors"] == 0 and row["metrics_counted"] == row["requests"]  # every worker's requests counted
        assert len(row["worker_rss_mib"]) == row["workers"]
    assert "per worker MiB" in stdout
