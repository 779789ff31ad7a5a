"""Benchmark scripts run on tiny sizes and write their JSON (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_adapter_cost_quick(tmp_path: Path) -> None:
    out = tmp_path / "adapter_cost.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "adapter_cost.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {"floor", "single", "merged", "merged_after_shrink"} <= set(result["inference_s"])
    assert result["ratio_to_floor"]["floor"] == 1.0
    assert set(result["train_step_s"]) == {"fused_r8", "fused_r2", "unmerged_r8", "unmerged_r2"}
    assert "x floor" in proc.stdout
