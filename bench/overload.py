"""The gateway overloaded on purpose: goodput under a deadline, refusal latency, memory (issue 14).

Two parts, each against a real ``faar-serve`` process (granian) on a model exported by the
real exporter from a randomly initialised preset:

**Overload.** ``--concurrency`` clients in a closed loop for ``--seconds`` against the
gateway with ``--request-timeout-s`` = the deadline, once with the embedded engine and once
with ``--engine triton`` against a real local Triton. Clients behave: a 503 is followed by
a pause of its Retry-After (at most the deadline) before the next request. Reported:
goodput (answers within the deadline per second), the engine's capacity measured in the
same run (ONNX Runtime alone on the prepared image with the gateway's session settings;
for Triton, direct gRPC calls at the same concurrency, no gateway; the mean of a
measurement before and one after the gateway's runs, both reported, since this VM drifts
by tens of per cent within minutes) and the gateway's own
throughput without a deadline (same clients, ``--request-timeout-s 600``), the ratios, the
counts of answers, late answers, refusals by code and errors, the p50/p99 latency of
answers and of refusals, and the gateway's peak RSS.

**Costly uploads among normal traffic.** Normal clients send the usual image while three
clients upload, all at once, a small PNG that declares 6000x6000 pixels (issue 14's 35 KB
upload) with ``format=npz``, twice each. The gateway runs with ``--max-inflight-bytes``
set to ``--big-budget-mb``. Reported: what the big uploads got (only 200, 413 and 503 are
allowed), the normal requests' answers and failures during that time, and the gateway's
baseline and peak RSS against the budget.

    python -m bench.overload --config faar_pascal_swin_t --deadline 10 --out bench/results/overload_swin_t.json
    python -m bench.overload --config demo --deadline 0.6 --out bench/results/overload_demo.json
    python -m bench.overload --quick
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from bench.common import markdown_table, write_result
from bench.servers import rss_kib
from bench.serving import MODEL, export_repository, scene_png
from clients.attacks import declared_png
from faar_serve.manifest import load_model_spec
from faar_serve.net import free_port, wait_ready
from faar_serve.triton_local import LocalTriton

ROOT = Path(__file__).resolve().parents[1]


class Gateway:
    """``python -m faar_serve`` with ``flags`` on a free port; its RSS (process tree) on demand."""

    def __init__(self, repo: Path, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen([sys.executable, "-m", "faar_serve", "--model-repository", str(repo),
                                         "--port", str(self.port), "--log-level", "error", *flags], cwd=ROOT,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_ready(self.url, self.process)
        except (RuntimeError, TimeoutError) as exc:
            self.log.seek(0)
            raise RuntimeError(f"{exc}: {self.log.read().decode()[-2000:]}") from exc

    def rss_mib(self, field: str = "VmRSS") -> float:
        return round(rss_kib(self.process.pid, field) / 1024, 1)

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def prepared(repo: Path, payload: bytes) -> np.ndarray:
    """The upload as the engine gets it: RGB at the model's input size."""
    spec = load_model_spec(repo, MODEL)
    rgb = Image.open(io.BytesIO(payload)).convert("RGB")
    return np.asarray(rgb.resize((spec.width, spec.height), Image.Resampling.BILINEAR))


@contextlib.contextmanager
def priority(nice: int) -> Iterator[None]:
    """This thread (the clients' event loop) at ``nice`` meanwhile (negative needs root). The
    clients stand for machines elsewhere: sharing the gateway's cores at equal priority, their
    own wait for a core after each answer is counted as the gateway's latency."""
    if nice == 0:
        yield
        return
    before = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)  # on Linux: this thread only
    except PermissionError as exc:
        raise SystemExit(f"--client-nice {nice} needs root (CAP_SYS_NICE): {exc}") from None
    try:
        yield
    finally:
        os.setpriority(os.PRIO_PROCESS, 0, before)


def server_refusals(url: str) -> dict[str, Any]:
    """The gateway's own view of its 503s (``faar_refusal_duration_seconds``: arrival to answer sent,
    no client in it): how many, the share under 100 ms, and the bucket bound under which 99 % fall."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    family = next(f for f in text_string_to_metric_families(text) if f.name == "faar_refusal_duration_seconds")
    buckets = sorted((float(s.labels["le"]), s.value) for s in family.samples if s.name.endswith("_bucket"))
    total = buckets[-1][1]
    if not total:
        return {"count": 0, "share_under_100ms": None, "p99_at_most_ms": None}
    under = next(n for le, n in buckets if le == 0.1)
    p99 = next(le for le, n in buckets if n >= 0.99 * total)
    return {"count": int(total), "share_under_100ms": round(under / total, 4),
            "p99_at_most_ms": None if p99 == float("inf") else round(p99 * 1000)}


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


async def closed_loop(url: str, concurrency: int, seconds: float, payload: bytes, deadline_s: float,
                      params: dict[str, str]) -> dict[str, Any]:
    """``concurrency`` clients for ``seconds``: each sends, waits for the answer, honours Retry-After."""
    answers: list[float] = []  # ms, status 200
    refusals: dict[str, list[float]] = {}
    errors: Counter[str] = Counter()
    stop = time.monotonic() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            try:
                r = await http.post("/v1/predict", params=params, files={"image": ("x.png", payload)})
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] += 1
                continue
            ms = (time.perf_counter() - t0) * 1000
            if r.status_code == 200:
                answers.append(ms)
                continue
            code = r.json().get("error", str(r.status_code)) if r.status_code < 500 or r.status_code == 503 \
                else str(r.status_code)
            refusals.setdefault(f"{r.status_code} {code}", []).append(ms)
            if r.status_code == 503:
                await asyncio.sleep(min(float(r.headers.get("retry-after", 1)), deadline_s))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=max(60.0, 3 * deadline_s), limits=limits) as http:
        t0 = time.monotonic()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        elapsed = time.monotonic() - t0
    in_time = [ms for ms in answers if ms <= deadline_s * 1000]
    refused = [ms for v in refusals.values() for ms in v]
    return {"seconds": round(elapsed, 1), "answers": len(answers), "in_time": len(in_time),
            "late": len(answers) - len(in_time), "goodput_rps": round(len(in_time) / elapsed, 3),
            "refusals": {k: len(v) for k, v in sorted(refusals.items())}, "errors": dict(errors),
            "answer_ms": {"p50": _pct(answers, 50), "p99": _pct(answers, 99), "max": _pct(answers, 100)},
            "refusal_ms": {"p50": _pct(refused, 50), "p99": _pct(refused, 99)}}


async def triton_capacity(grpc_url: str, repo: Path, payload: bytes, concurrency: int, seconds: float) -> float:
    """Images/s of Triton alone: ``concurrency`` direct gRPC calls of one prepared image, no deadline."""
    import tritonclient.grpc.aio as grpc_aio

    spec = load_model_spec(repo, MODEL)
    pixels = prepared(repo, payload)[None]
    outputs = list(dict.fromkeys(t.output for t in spec.tasks.values()))
    client = grpc_aio.InferenceServerClient(grpc_url)
    done = 0
    stop = time.monotonic() + seconds

    async def caller() -> None:
        nonlocal done
        while time.monotonic() < stop:
            x = grpc_aio.InferInput(spec.input_name, list(pixels.shape), "UINT8")
            x.set_data_from_numpy(pixels)
            await client.infer(MODEL, [x], outputs=[grpc_aio.InferRequestedOutput(o) for o in outputs])
            done += 1

    t0 = time.monotonic()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    rate = done / (time.monotonic() - t0)
    await client.close()
    return round(rate, 3)


def onnx_capacity(repo: Path, payload: bytes, seconds: float) -> float:
    """Images/s of ONNX Runtime alone, one image per run, with the gateway's session settings."""
    from faar_serve.engines.onnx import create_session

    spec = load_model_spec(repo, MODEL)
    session = create_session(spec.onnx_path, "cpu", spin_wait=False)
    feeds = {spec.input_name: prepared(repo, payload)[None]}
    session.run(None, feeds)
    done, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < seconds:
        session.run(None, feeds)
        done += 1
    return round(done / (time.monotonic() - t0), 3)


def overload(repo: Path, engine: str, triton: LocalTriton | None, args: argparse.Namespace,
             payload: bytes) -> dict[str, Any]:
    flags = ["--max-queue", "512"]
    if engine == "triton":
        assert triton is not None
        flags += ["--engine", "triton", "--triton-url", f"127.0.0.1:{triton.grpc_port}"]

    def capacity() -> float:
        if triton is not None:
            return asyncio.run(triton_capacity(f"127.0.0.1:{triton.grpc_port}", repo, payload, args.concurrency,
                                               args.capacity_seconds))
        return onnx_capacity(repo, payload, args.capacity_seconds)

    before = capacity()
    patient = Gateway(repo, *flags, "--request-timeout-s", "600")  # no deadline: the gateway's capacity
    try:
        asyncio.run(closed_loop(patient.url, 2, min(5.0, args.seconds), payload, 60, {}))  # warm-up
        with priority(args.client_nice):
            served = asyncio.run(closed_loop(patient.url, args.concurrency, args.capacity_seconds, payload, 600, {}))
    finally:
        patient.close()
    gateway = Gateway(repo, *flags, "--request-timeout-s", str(args.deadline))
    try:
        asyncio.run(closed_loop(gateway.url, 2, min(5.0, args.seconds), payload, 60, {}))  # warm-up
        with priority(args.client_nice):
            result = asyncio.run(closed_loop(gateway.url, args.concurrency, args.seconds, payload, args.deadline,
                                             {}))
        result["gateway_peak_rss_mib"] = gateway.rss_mib("VmHWM")
        result["server_refusals"] = server_refusals(gateway.url)
    finally:
        gateway.close()
    # Measured before and after the gateway's runs: how far this machine drifted meanwhile.
    after = capacity()
    engine_rate = (before + after) / 2
    gateway_capacity = served["answers"] / served["seconds"]
    return {"engine": engine, "capacity_images_per_s": round(engine_rate, 3),
            "capacity_before_after": [before, after], "gateway_capacity_rps": round(gateway_capacity, 3),
            "goodput_share": round(result["goodput_rps"] / engine_rate, 3),
            "goodput_share_of_gateway": round(result["goodput_rps"] / gateway_capacity, 3), **result}


def costly_uploads(repo: Path, args: argparse.Namespace, payload: bytes) -> dict[str, Any]:
    """Three clients upload a PNG declaring ``--big-side``^2 pixels (npz) twice each, among normal traffic."""
    budget = int(args.big_budget_mb * 1e6)
    gateway = Gateway(repo, "--max-inflight-bytes", str(budget), "--request-timeout-s", "120")
    big = declared_png(args.big_side, args.big_side)
    try:
        asyncio.run(closed_loop(gateway.url, 2, 3.0, payload, 60, {}))  # warm-up
        baseline = gateway.rss_mib()

        async def scenario() -> tuple[dict[str, Any], list[str]]:
            big_statuses: list[str] = []

            async def big_client(http: httpx.AsyncClient) -> None:
                for _ in range(2):
                    r = await http.post("/v1/predict", params={"format": "npz"}, files={"image": ("big.png", big)})
                    big_statuses.append(f"{r.status_code} {r.json().get('error', '') if r.status_code != 200 else ''}"
                                        .strip())

            async def bigs() -> None:
                await asyncio.sleep(2)
                async with httpx.AsyncClient(base_url=gateway.url, timeout=300) as http:
                    await asyncio.gather(*(big_client(http) for _ in range(3)))

            normal, _ = await asyncio.gather(closed_loop(gateway.url, args.big_normal_clients, args.big_seconds,
                                                         payload, 60, {}), bigs())
            return normal, big_statuses

        with priority(args.client_nice):
            normal, big_statuses = asyncio.run(scenario())
        peak = gateway.rss_mib("VmHWM")
    finally:
        gateway.close()
    allowed = all(s.split()[0] in ("200", "413", "503") for s in big_statuses)
    return {"budget_mb": args.big_budget_mb, "declared": f"{args.big_side}x{args.big_side}", "png_bytes": len(big),
            "big_uploads": dict(Counter(big_statuses)), "only_allowed_statuses": allowed,
            "normal": normal, "baseline_rss_mib": baseline, "peak_rss_mib": peak,
            "peak_over_baseline_mib": round(peak - baseline, 1),
            "within_budget": (peak - baseline) * 2**20 <= budget}


def _in_gateway(refusals: dict[str, Any]) -> str:
    if not refusals["count"]:
        return "-"
    return f"{refusals['share_under_100ms']:.1%}, {refusals['p99_at_most_ms']} ms"


def print_tables(result: dict[str, Any]) -> None:
    s = result["setup"]
    print(f"{s['config']}: concurrency {s['concurrency']}, {s['seconds']} s, deadline {s['deadline_s']} s")
    print(markdown_table(
        ["engine", "engine img/s (before / after)", "gateway req/s (no deadline)", "goodput req/s", "x engine",
         "x gateway", "answers", "late", "refusals", "errors",
         "answer p50/p99 ms", "refusal p50/p99 ms", "refusals in gateway: < 100 ms, p99 <=",
         "gateway peak RSS MiB"],
        [[r["engine"], "{} ({} / {})".format(r["capacity_images_per_s"], *r["capacity_before_after"]),
          r["gateway_capacity_rps"], r["goodput_rps"], r["goodput_share"],
          r["goodput_share_of_gateway"], r["answers"], r["late"],
          ", ".join(f"{k}: {v}" for k, v in r["refusals"].items()) or "-", sum(r["errors"].values()),
          f"{r['answer_ms']['p50']} / {r['answer_ms']['p99']}", f"{r['refusal_ms']['p50']} / {r['refusal_ms']['p99']}",
          _in_gateway(r["server_refusals"]), r["gateway_peak_rss_mib"]] for r in result["overload"]]))
    b = result.get("costly_uploads")
    if b:
        n = b["normal"]
        print(markdown_table(
            ["declared", "budget MB", "big uploads", "normal answers", "normal refusals", "normal errors",
             "baseline RSS MiB", "peak RSS MiB", "peak - baseline", "within budget"],
            [[b["declared"], b["budget_mb"], ", ".join(f"{k}: {v}" for k, v in b["big_uploads"].items()),
              n["answers"], sum(n["refusals"].values()), sum(n["errors"].values()), b["baseline_rss_mib"],
              b["peak_rss_mib"], b["peak_over_baseline_mib"], b["within_budget"]]]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="faar_pascal_swin_t")
    parser.add_argument("--deadline", type=float, default=10.0, help="--request-timeout-s of the gateway")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=120.0, help="per engine")
    parser.add_argument("--capacity-seconds", type=float, default=20.0)
    parser.add_argument("--image", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    parser.add_argument("--engines", nargs="+", choices=["onnx", "triton"], default=["onnx", "triton"])
    parser.add_argument("--big-side", type=int, default=6000, help="costly uploads declare side x side pixels")
    parser.add_argument("--big-budget-mb", type=float, default=5000, help="--max-inflight-bytes for that part")
    parser.add_argument("--big-seconds", type=float, default=40.0)
    parser.add_argument("--big-normal-clients", type=int, default=4)
    parser.add_argument("--client-nice", type=int, default=0,
                        help="the clients' nice value while they run (e.g. -10, as root): clients on other machines")
    parser.add_argument("--no-big", dest="big", action="store_false", help="skip the costly uploads")
    parser.add_argument("--quick", action="store_true", help="tiny model, seconds instead of minutes")
    parser.add_argument("--out", type=Path, default=Path("bench/results/overload.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.config, args.deadline, args.concurrency, args.seconds, args.capacity_seconds = "tiny", 0.5, 8, 4.0, 2.0
        args.big_side, args.big_budget_mb, args.big_seconds, args.big_normal_clients = 1500, 400, 5.0, 2
    payload = scene_png(tuple(args.image))
    with tempfile.TemporaryDirectory() as tmp:
        # Triton's own queue limit above any wait here: the engine-alone capacity keeps 32 calls in
        # flight (tens of seconds of queue on Swin-T); the gateway's deadlines, shorter, still apply.
        repo = export_repository(args.config, Path(tmp), max_batch_size=8, queue_timeout_s=600)
        rows = []
        for engine in args.engines:
            if engine == "triton":
                with LocalTriton(repo) as triton:
                    rows.append(overload(repo, engine, triton, args, payload))
            else:
                rows.append(overload(repo, engine, None, args, payload))
            print(rows[-1], flush=True)
        big = costly_uploads(repo, args, payload) if args.big else None
    result = {"setup": {"config": args.config, "concurrency": args.concurrency, "seconds": args.seconds,
                        "deadline_s": args.deadline, "image": args.image, "client_nice": args.client_nice,
                        "client": "closed loop, honours Retry-After (at most the deadline)"},
              "overload": rows, "costly_uploads": big}
    print_tables(result)
    write_result(args.out, result)
    ok = all(sum(r["errors"].values()) == 0 for r in rows) and (big is None or big["only_allowed_statuses"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
