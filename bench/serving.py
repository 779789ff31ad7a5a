"""The gateway over real HTTP against the bare engine, at several client concurrencies.

Setups, each a real ``faar-serve`` process on a free port fed by ``clients.loadgen``'s
load loop with the same PNG:
  onnx              embedded ONNX Runtime with its defaults (on the CPU: one image per call,
                    no spin-waiting threads)
  onnx_batching     ``--max-batch-size`` = config.pbtxt's max batch (micro-batching)
  onnx_spin_wait    ``--cpu-spin-wait`` (ONNX Runtime threads busy-wait between operators)
  onnx_streams      ``--inference-streams`` = cores (that many runs at once, one thread each)
  triton            ``--engine triton`` against a real local Triton (``faar-triton``'s server,
                    dynamic batching from config.pbtxt), over gRPC
``bare`` is ONNX Runtime alone on the already decoded, resized image at batch 1 and at the
max batch (spin-waiting threads), and one single-threaded session per core running batch 1
side by side: what the model can do without HTTP, decoding, resizing and encoding; the
best of the three is the reference. Reported
per setup and concurrency: throughput, p50/p95/p99 latency, throughput as a share of the
bare engine's best, the gateway's peak RSS (VmHWM; for Triton also the server's process
tree), and the median of each server stage (from the answers' ``Server-Timing``): what is
left of the latency is HTTP, multipart parsing, JSON and the load generator itself, which
shares the same cores. With ``--rounds N`` the setups take turns N times and every number
is the median over the rounds (peak RSS: the maximum), so slow drift of a shared machine
hits every setup alike.

    python -m bench.serving --config demo --concurrency 1 8 32 --out bench/results/serving_demo.json
    python -m bench.serving --quick
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import interleaved_medians, markdown_table, ort_call, random_model, write_result
from clients import loadgen
from faar.data.scenes import render_scene
from faar.export import ExportOptions, export_run
from faar.run import save_model
from faar_serve.manifest import load_model_spec
from faar_serve.net import free_port, wait_ready
from faar_serve.providers import create_session
from faar_serve.settings import usable_cores
from faar_serve.triton_local import LocalTriton

MODEL = "faar"
SETUPS = ("onnx", "onnx_batching", "onnx_spin_wait", "onnx_streams", "triton")
PATIENCE_S = 120.0  # the gateway's deadline here: the load generator's own; bench.overload measures deadlines


def export_repository(config: str, dest: Path, max_batch_size: int, queue_timeout_s: float = 10.0) -> Path:
    """A real repository from a randomly initialised model of the preset (what faar-export writes)."""
    save_model(random_model(config), dest / "run")
    export_run(dest / "run", dest / "repo", ExportOptions(name=MODEL, version=1, max_batch_size=max_batch_size,
                                                          queue_timeout_s=queue_timeout_s))
    return dest / "repo"


def scene_png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(render_scene(2026, size)["image"]).save(buf, format="PNG")
    return buf.getvalue()


def peak_rss_mib(pid: int) -> float:
    """VmHWM of ``pid`` and its descendants (the Triton server forks one stub per model instance)."""
    total, stack = 0.0, [pid]
    while stack:
        p = stack.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")) / 1024
        stack += [int(c) for c in children]
    return round(total, 1)


def bare_engine(repo: Path, image: bytes, max_batch: int, repeats: int) -> dict[str, float]:
    """Images/s of ONNX Runtime alone at batch 1 and at the max batch, with spin-waiting
    threads (the fastest setting when nothing else runs), and of one single-threaded session
    per core at batch 1, all running at once (``--inference-streams``)."""
    spec = load_model_spec(repo, MODEL)
    session = create_session(spec.onnx_path, "cpu", spin_wait=True)
    cores = usable_cores()
    streams = [create_session(spec.onnx_path, "cpu", threads=1) for _ in range(cores)]
    h, w = spec.height, spec.width
    pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB").resize((w, h), Image.Resampling.BILINEAR))
    name = session.get_inputs()[0].name
    batches = {b: np.repeat(pixels[None], b, axis=0) for b in sorted({1, max_batch})}
    per_stream = 8
    forms: dict[str, Callable[[], object]] = {f"b{b}": ort_call(session, {name: x}) for b, x in batches.items()}
    with ThreadPoolExecutor(cores) as pool:
        forms[f"b1 x{cores} streams"] = lambda: list(pool.map(
            lambda s: [s.run(None, {name: batches[1]}) for _ in range(per_stream)], streams))
        times = interleaved_medians(forms, repeats, 2)
    images = {f"b{b}": b for b in batches} | {f"b1 x{cores} streams": cores * per_stream}
    return {form: images[form] / t for form, t in times.items()}


class Gateway:
    """``python -m faar_serve`` in a subprocess, ready when /readyz says so."""

    def __init__(self, repo: Path, *flags: str, pythonpath: str | None = None) -> None:
        """``pythonpath``: where the gateway's ``faar_serve`` comes from (default: this checkout's)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "faar_serve", "--model-repository", str(repo), "--port", str(self.port),
               "--log-level", "warning", "--max-queue", "256", *flags]
        self.log = tempfile.TemporaryFile()
        # The deadline as a variable, which a gateway from before it existed ignores (--gateway-pythonpath).
        env = {"FAAR_REQUEST_TIMEOUT_S": str(PATIENCE_S), **os.environ}
        if pythonpath:
            env["PYTHONPATH"] = pythonpath  # and run there: -m puts cwd first
        self.process = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=pythonpath)
        try:
            wait_ready(self.url, self.process)
        except (RuntimeError, TimeoutError) as exc:
            self.close()
            self.log.seek(0)
            raise RuntimeError(f"{exc}: {self.log.read().decode()[-2000:]}") from exc

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def load(url: str, concurrency: int, requests: int, image: bytes) -> dict:
    return asyncio.run(loadgen.run(url, concurrency, requests, image, {"format": "json"}, {}, 120.0))


def run(config: str, concurrencies: list[int], requests: int, max_batch: int, image_size: tuple[int, int],
        triton: bool, rounds: int, triton_timeout_s: float, only: list[str] | None = None) -> dict:
    image = scene_png(image_size)
    with tempfile.TemporaryDirectory() as tmp:
        repo = export_repository(config, Path(tmp), max_batch)
        bare = bare_engine(repo, image, max_batch, repeats=7)
        setups: dict[str, tuple[str, ...]] = {"onnx": (), "onnx_batching": ("--max-batch-size", str(max_batch)),
                                              "onnx_spin_wait": ("--cpu-spin-wait",),
                                              "onnx_streams": ("--inference-streams", str(usable_cores()))}
        setups = {k: v for k, v in setups.items() if k in only} if only else setups
        triton = triton and (not only or "triton" in only)
        reports: dict[tuple[str, int], list[dict]] = {}
        server = None
        if triton:
            server = LocalTriton(repo)
            server.__enter__()
            setups["triton"] = ("--engine", "triton", "--triton-url", f"127.0.0.1:{server.grpc_port}",
                                "--triton-timeout-s", str(triton_timeout_s))
        try:
            for _ in range(rounds):
                for name, flags in setups.items():
                    gateway = Gateway(repo, *flags)
                    try:
                        load(gateway.url, 4, 8, image)  # warm-up: sessions, batcher, connections
                        for concurrency in concurrencies:
                            report = load(gateway.url, concurrency, max(requests, 2 * concurrency), image)
                            report["gateway_peak_rss_mib"] = peak_rss_mib(gateway.process.pid)
                            reports.setdefault((name, concurrency), []).append(report)
                    finally:
                        gateway.close()
            triton_rss = peak_rss_mib(server.process.pid) if server and server.process else None
        finally:
            if server is not None:
                server.__exit__(None, None, None)
    rows = [{"setup": name, "concurrency": conc, **summarise(runs, max(bare.values()))}
            for (name, conc), runs in reports.items()]
    return {"setup": {"config": config, "image": list(image_size), "max_batch": max_batch, "requests": requests,
                      "concurrency": concurrencies, "rounds": rounds, "triton_timeout_s": triton_timeout_s,
                      "cpus": os.cpu_count()},
            "bare_images_per_s": bare, "triton_peak_rss_mib": triton_rss, "rows": rows}


def summarise(runs: list[dict], bare_best: float) -> dict:
    """One row from a setup's rounds: medians, the worst peak RSS, every error counted."""
    def med(get: Callable[[dict], float]) -> float:
        return round(statistics.median(get(r) for r in runs), 2)

    throughput = med(lambda r: r["throughput_rps"])
    return {"throughput_rps": throughput, "share_of_bare": throughput / bare_best,
            "throughput_by_round": [r["throughput_rps"] for r in runs],
            "latency_ms": {q: med(lambda r, q=q: r["latency_ms"][q]) for q in runs[0]["latency_ms"]},
            "server_stage_p50_ms": {k: med(lambda r, k=k: r["server_stage_p50_ms"].get(k, float("nan")))
                                    for k in runs[0]["server_stage_p50_ms"]},
            "errors": sum(r["errors"] for r in runs), "ok": sum(r["ok"] for r in runs),
            "by_status": dict(sum((Counter(r["by_status"]) for r in runs), Counter())),
            "requests": sum(r["requests"] for r in runs),
            "gateway_peak_rss_mib": max(r["gateway_peak_rss_mib"] for r in runs)}


def print_table(result: dict) -> None:
    print(f"setup: {result['setup']}")
    print(f"bare engine images/s: {result['bare_images_per_s']}; triton server peak RSS: "
          f"{result['triton_peak_rss_mib']} MiB")
    print(markdown_table(["setup", "conc.", "req/s", "x bare best", "p50 ms", "p95 ms", "p99 ms", "errors",
                          "gateway peak RSS MiB", "server p50 ms decode/resize/queue/infer/encode"],
                         [[r["setup"], r["concurrency"], r["throughput_rps"], r["share_of_bare"],
                           r["latency_ms"]["p50"], r["latency_ms"]["p95"], r["latency_ms"]["p99"], r["errors"],
                           r["gateway_peak_rss_mib"], stages(r["server_stage_p50_ms"])] for r in result["rows"]]))


def stages(p50: dict[str, float]) -> str:
    return " / ".join(f"{p50.get(k, float('nan')):.1f}" for k in ("decode", "resize", "queue", "inference", "encode"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=96, help="per setup and concurrency (at least 2x conc.)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--image", type=int, nargs=2, default=[240, 320], metavar=("H", "W"))
    parser.add_argument("--no-triton", dest="triton", action="store_false")
    parser.add_argument("--setups", nargs="+", choices=SETUPS, help="run only these (default: all)")
    parser.add_argument("--rounds", type=int, default=1, help="setups take turns this often; medians reported")
    parser.add_argument("--triton-timeout-s", type=float, default=120.0,
                        help="the gateway's deadline for Triton calls; default: the load generator's own "
                        "patience, as the embedded engine has no deadline")
    parser.add_argument("--quick", action="store_true", help="the tiny preset, few requests")
    parser.add_argument("--out", type=Path, default=Path("bench/results/serving.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.config, args.concurrency, args.requests = "tiny", [1, 4], 8
    result = run(args.config, args.concurrency, args.requests, args.max_batch, tuple(args.image), args.triton,
                 args.rounds, args.triton_timeout_s, args.setups)
    print_table(result)
    write_result(args.out, result)
    return 0 if all(r["errors"] == 0 for r in result["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
