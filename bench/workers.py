"""``faar-serve --workers N``: what a second worker process buys and costs (issue 15, item 3).

For N in ``--workers``: a real ``faar-serve`` with N worker processes on one port, fed by
``clients.loadgen`` at ``--concurrency`` with the same PNG, once with ``--engine triton``
against one real local Triton (the model lives in Triton; the workers only decode, call and
encode) and once with the embedded engine (each worker loads its own copy of the model).
Reported: throughput, latency percentiles, errors, and the gateway's memory: the whole
process tree's RSS and each worker's. ``/metrics`` is read after the load: its request
count must equal what the load generator sent, whichever worker answered (multiprocess mode).

    python -m bench.workers --config demo --out bench/results/workers_demo.json
    python -m bench.workers --quick
"""

from __future__ import annotations

import argparse
import asyncio
import re
import tempfile
from pathlib import Path
from typing import Any

import httpx

from bench.common import markdown_table, write_result
from bench.overload import Gateway
from bench.servers import rss_kib
from bench.serving import export_repository, scene_png
from clients import loadgen
from faar_serve.triton_local import LocalTriton


def worker_rss_mib(gateway: Gateway) -> list[float]:
    """RSS of each worker process (the children of granian's main process)."""
    pid = gateway.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [round(rss_kib(int(c)) / 1024, 1) for c in children]


def counted_requests(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(float(v) for v in re.findall(r'faar_requests_total\{[^}]*route="/v1/predict"[^}]*\} (\S+)', text))


def measure(repo: Path, engine_flags: list[str], workers: int, args: argparse.Namespace,
            image: bytes) -> dict[str, Any]:
    gateway = Gateway(repo, "--workers", str(workers), "--max-queue", "512", "--request-timeout-s", "600",
                      *engine_flags)
    try:
        asyncio.run(loadgen.run(gateway.url, 2 * workers, 4 * workers, image, {}, {}, 120.0))  # warm every worker
        before = counted_requests(gateway.url)
        report = asyncio.run(loadgen.run(gateway.url, args.concurrency, args.requests, image, {}, {}, 120.0))
        counted = counted_requests(gateway.url) - before
        return {"workers": workers, "throughput_rps": report["throughput_rps"], "latency_ms": report["latency_ms"],
                "errors": report["errors"], "metrics_counted": counted, "requests": report["requests"],
                "gateway_rss_mib": round(rss_kib(gateway.process.pid) / 1024, 1),
                "worker_rss_mib": worker_rss_mib(gateway)}
    finally:
        gateway.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--image", type=int, nargs=2, default=[240, 320], metavar=("H", "W"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/results/workers.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.config, args.concurrency, args.requests = "tiny", 4, 24
    image = scene_png(tuple(args.image))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = export_repository(args.config, Path(tmp), max_batch_size=8)
        with LocalTriton(repo) as triton:
            for n in args.workers:
                rows.append({"engine": "triton", **measure(repo, ["--engine", "triton", "--triton-url",
                                                                  f"127.0.0.1:{triton.grpc_port}"], n, args, image)})
        for n in args.workers:
            rows.append({"engine": "onnx", **measure(repo, [], n, args, image)})
    print(markdown_table(["engine", "workers", "req/s", "p50 ms", "p99 ms", "errors", "/metrics counted",
                          "gateway RSS MiB", "per worker MiB"],
                         [[r["engine"], r["workers"], r["throughput_rps"], r["latency_ms"]["p50"],
                           r["latency_ms"]["p99"], r["errors"], f"{r['metrics_counted']:.0f} of {r['requests']}",
                           r["gateway_rss_mib"], r["worker_rss_mib"]] for r in rows]))
    write_result(args.out, {"setup": {"config": args.config, "concurrency": args.concurrency,
                                      "requests": args.requests, "image": args.image}, "rows": rows})
    return 0 if all(r["errors"] == 0 and r["metrics_counted"] == r["requests"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
