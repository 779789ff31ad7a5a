"""The clients against a live gateway, run as users run them: ``python -m clients.<name>``
from the repository root (and once as a script path, the spelling that also works)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from support import LiveServer, OfflineMaps, encode, image

ROOT = Path(__file__).resolve().parents[1]


def run(client: str, *args: str, as_script: bool = False) -> subprocess.CompletedProcess[str]:
    """``python -m clients.<client> ...`` from the repository root (or ``python clients/<client>.py``)."""
    target = [f"clients/{client}.py"] if as_script else ["-m", f"clients.{client}"]
    return subprocess.run([sys.executable, *target, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_predict_saves_every_map_and_a_preview(live_gateway: LiveServer, offline_maps: OfflineMaps,
                                               tmp_path: Path) -> None:
    rgb = image(700, height=45, width=70)
    (tmp_path / "a.png").write_bytes(encode(rgb))
    (tmp_path / "b.jpg").write_bytes(encode(image(701, 30, 30), "JPEG"))
    out = tmp_path / "maps"
    done = run("predict", str(tmp_path / "a.png"), str(tmp_path / "b.jpg"), "--url", live_gateway.url,
               "--out", str(out))
    assert done.returncode == 0, done.stderr
    tasks = ["semseg", "human_parts", "saliency", "normals", "depth", "edge"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{s}.{t}.png" for s in ("a", "b") for t in tasks] + ["a.preview.png", "b.preview.png"])
    semseg = Image.open(out / "a.semseg.png")
    assert semseg.size == (70, 45)
    np.testing.assert_array_equal(np.asarray(semseg), offline_maps(rgb)["semseg"])
    preview = Image.open(out / "a.preview.png")
    assert preview.height == 256 and preview.width == 7 * round(70 * 256 / 45)  # the image + 6 maps


def test_predict_reports_a_failed_image_and_exits_1(live_gateway: LiveServer, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    done = run("predict", str(tmp_path / "notes.txt"), "--url", live_gateway.url, "--out", str(tmp_path),
               as_script=True)
    assert done.returncode == 1 and "415" in done.stderr and "not_an_image" in done.stderr


def test_loadgen_reports_throughput_percentiles_and_errors(live_gateway: LiveServer) -> None:
    done = run("loadgen", "--url", live_gateway.url, "--concurrency", "4", "--requests", "12", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    counts = (report["requests"], report["ok"], report["errors"], report["by_status"])
    assert counts == (12, 12, 0, {"200": 12})
    assert report["throughput_rps"] > 0
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p95"] <= report["latency_ms"]["p99"]
    stages = report["server_stage_p50_ms"]
    assert set(stages) == {"decode", "resize", "queue", "inference", "encode"}
    assert 0 < stages["inference"] < report["latency_ms"]["p99"]


def test_loadgen_counts_errors_and_stays_on_localhost(live_gateway: LiveServer, tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_text("not an image")
    done = run("loadgen", "--url", live_gateway.url, "--concurrency", "2", "--requests", "4", "--image",
               str(tmp_path / "bad.txt"), "--json")
    assert done.returncode == 1 and json.loads(done.stdout)["by_status"] == {"415": 4}
    refused = run("loadgen", "--url", "http://example.com:8080", "--requests", "1")
    assert refused.returncode == 2 and "this machine" in refused.stderr
