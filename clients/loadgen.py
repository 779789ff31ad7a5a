"""Load the gateway on this machine: N concurrent clients, M requests in all, then a report.

    python -m clients.loadgen --url http://127.0.0.1:8080 --concurrency 16 --requests 200 [--image photo.jpg]

Reports throughput, latency percentiles (p50/p95/p99 over every answer, errors included),
the error count by status, and the median of each server stage from the answers'
``Server-Timing`` header (decode, queue, inference, encode), which says where the time goes.
Bounded by construction: exactly M requests, each with a timeout, against localhost only
(it is a measuring tool, not a way to flood others).
Without ``--image`` it sends a generated 640x480 PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np
from PIL import Image

LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}
MAX_REQUESTS = 100_000
MAX_CONCURRENCY = 512


def demo_image(height: int = 480, width: int = 640) -> bytes:
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    buf = io.BytesIO()
    coarse.resize((width, height), Image.Resampling.BICUBIC).save(buf, format="PNG")
    return buf.getvalue()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def run(url: str, concurrency: int, requests: int, payload: bytes, params: dict[str, str],
              headers: dict[str, str], timeout_s: float) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    stages: dict[str, list[float]] = {}
    remaining = iter(range(requests))

    async def worker(http: httpx.AsyncClient) -> None:
        for _ in remaining:  # shared iterator: M requests in all, whichever worker sends them
            t0 = time.perf_counter()
            try:
                files = {"image": ("load.png", payload)}
                response = await http.post("/v1/predict", params=params, files=files)
                statuses[str(response.status_code)] += 1
                for stage, ms in server_timing(response.headers.get("server-timing", "")).items():
                    stages.setdefault(stage, []).append(ms)
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1
            latencies.append((time.perf_counter() - t0) * 1000)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ok = statuses.get("200", 0)
    return {
        "requests": requests, "concurrency": concurrency, "seconds": round(elapsed, 3),
        "throughput_rps": round(ok / elapsed, 2), "ok": ok, "errors": requests - ok,
        "by_status": dict(statuses),
        "latency_ms": {f"p{q}": round(percentile(latencies, q), 2) for q in (50, 95, 99)},
        "server_stage_p50_ms": {k: round(percentile(v, 50), 2) for k, v in stages.items()},
    }


def server_timing(header: str) -> dict[str, float]:
    """``decode;dur=1.2, queue;dur=0.1`` -> {"decode": 1.2, "queue": 0.1}; unparsable entries skipped."""
    out = {}
    for entry in header.split(","):
        name, _, params = entry.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur":
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the gateway (localhost only)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--image", type=Path, help="image to send (default: a generated 640x480 PNG)")
    parser.add_argument("--tasks", help="comma-separated subset")
    parser.add_argument("--format", choices=["json", "npz"], default="json")
    parser.add_argument("--api-key")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if urlparse(args.url).hostname not in LOCAL_HOSTS:
        parser.error(f"--url must point at this machine ({', '.join(sorted(LOCAL_HOSTS))})")
    if not 1 <= args.concurrency <= MAX_CONCURRENCY or not 1 <= args.requests <= MAX_REQUESTS:
        parser.error(f"--concurrency 1..{MAX_CONCURRENCY}, --requests 1..{MAX_REQUESTS}")
    payload = args.image.read_bytes() if args.image else demo_image()
    params = {"format": args.format, **({"tasks": args.tasks} if args.tasks else {})}
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    report = asyncio.run(run(args.url, args.concurrency, args.requests, payload, params, headers,
                             args.timeout))
    if args.json:
        print(json.dumps(report))
    else:
        lat = report["latency_ms"]
        print(f"{report['requests']} requests, concurrency {report['concurrency']}, {report['seconds']} s: "
              f"{report['throughput_rps']} ok/s; latency p50 {lat['p50']} ms, p95 {lat['p95']} ms, "
              f"p99 {lat['p99']} ms; errors {report['errors']} {report['by_status']}; server stages p50 (ms) "
              f"{report['server_stage_p50_ms']}")
    return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
