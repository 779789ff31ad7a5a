"""bench/gpu_check.py cannot meet a GPU here: its --help and its dry run (same code path, CPU provider) must work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def gpu_check(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench.gpu_check", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_help() -> None:
    proc = gpu_check("--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--dry-run" in proc.stdout and "--trt-cache" in proc.stdout


def test_dry_run_checks_every_configuration_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = gpu_check("--dry-run", "--out", str(out), "--trt-cache", str(tmp_path / "trt"), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {"cuda_fp32", "cuda_tf32", "cuda_fp16", "trt_fp32", "trt_fp16"}
    for row in rows.values():
        assert row["providers"] == ["CPUExecutionProvider"] and row["parity_passed"], row
        assert set(row["throughput"]) == {"1", "2"} and all(v > 0 for v in row["throughput"].values())
    assert rows["cuda_fp16"]["graph"] == "fp16" and rows["cuda_fp32"]["tolerance"] == "fp32"
    assert "| config |" in proc.stdout and "b2 img/s" in proc.stdout
