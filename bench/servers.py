"""Candidate HTTP servers for the gateway against a hostile client's attacks (issue 14's findings).

Each candidate serves the same tiny ASGI app (``app`` below: reads the whole body, answers its
length) as a real process on a free port, configured as close as its options allow to one
policy: headers at most 16 KiB, 5 s to send them, 5 s keep-alive, at most 256 connections or
requests at once. Then ``clients.attacks`` measures, per candidate:

  8 MB header       the status a complete request with an 8 MB header gets (431 wanted)
  4x64 MiB flood    four connections each sending an unfinished 64 MiB header: MiB the
                    server accepted per connection, and its peak RSS growth
  idle / slow hdr   seconds a silent connection, and headers at 4 bytes/s, are held
  slow body         seconds a body at 4 bytes/s is held (the app reads it)
  keep-alive        seconds an idle connection is held after one answered request
  1000 conns        idle connections still open after 1 s, and whether a request on a new
                    one is served (status, seconds)
  req/s             small POSTs at concurrency 16 (what the server costs per request)

Holding times are capped at ``--limit`` s ("held" in the table). The gateway's own choice
and why is in ``faar_serve/server.py``; the numbers are in bench/RESULTS.md.

    pip install hypercorn gunicorn     # the two candidates the gateway does not depend on
    python -m bench.servers --out bench/results/servers.json
    python -m bench.servers --quick --only granian "uvicorn (httptools)"   # what the smoke test runs
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import markdown_table, write_result
from clients import attacks
from faar_serve.net import free_port

HOST = "127.0.0.1"
HEADER_LIMIT = 16384
TIMEOUT_S = 5
CAP = 256


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the whole body, answers its length: the least an upload endpoint does."""
    if scope["type"] != "http":
        return
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = str(size).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def candidates(port: int) -> dict[str, list[str]]:
    py, bind = sys.executable, ["--host", HOST, "--port", str(port)]
    target = "bench.servers:app"
    uvicorn = [py, "-m", "uvicorn", target, *bind, "--log-level", "warning", "--timeout-keep-alive", str(TIMEOUT_S),
               "--limit-concurrency", str(CAP)]
    return {
        "uvicorn (httptools)": [*uvicorn, "--http", "httptools"],
        "uvicorn (h11)": [*uvicorn, "--http", "h11", "--h11-max-incomplete-event-size", str(HEADER_LIMIT)],
        "gunicorn + uvicorn worker": [py, "-m", "gunicorn", "-k", "uvicorn.workers.UvicornWorker", "-w", "1",
                                      "-b", f"{HOST}:{port}", "--keep-alive", str(TIMEOUT_S), "--timeout",
                                      str(TIMEOUT_S), "--limit-request-field_size", str(HEADER_LIMIT),
                                      "--worker-connections", str(CAP), "--log-level", "warning", target],
        "hypercorn (h11)": [py, "-m", "hypercorn", "-b", f"{HOST}:{port}", "--keep-alive", str(TIMEOUT_S),
                            "--read-timeout", str(TIMEOUT_S), "--log-level", "warning", target],
        "granian": [py, "-m", "granian", "--interface", "asgi", "--http", "1", "--no-ws", *bind,
                    "--http1-buffer-size", str(HEADER_LIMIT), "--http1-header-read-timeout",
                    str(TIMEOUT_S * 1000), "--backpressure", str(CAP), "--log-level", "warning", target],
    }


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """``field`` of ``pid`` and its descendants (workers), in KiB."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith(field)), 0)
        stack += [int(c) for c in children]
    return total


def wait_listening(port: int, proc: subprocess.Popen, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://{HOST}:{port}/", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise TimeoutError("server did not answer")


async def _throughput(url: str, requests: int, concurrency: int) -> float:
    body = b"x" * 10_000
    remaining = iter(range(requests))

    async def worker(http: httpx.AsyncClient) -> None:
        for _ in remaining:
            (await http.post("/", content=body)).raise_for_status()

    async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=concurrency)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        return requests / (time.perf_counter() - t0)


def measure(name: str, cmd: list[str], port: int, limit_s: float, flood_mib: int, conns: int,
            requests: int) -> dict[str, Any]:
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[1])
    row: dict[str, Any] = {"server": name, "command": " ".join(cmd[1:])}
    try:
        wait_listening(port, proc)
        row["req_per_s"] = round(asyncio.run(_throughput(f"http://{HOST}:{port}", requests, 16)), 1)
        row["big_header_8mb_status"] = attacks.big_header(HOST, port, 8 << 20)
        base = rss_kib(proc.pid)
        flood = attacks.unfinished_headers(HOST, port, 4, flood_mib)
        row["flood_mib_accepted"] = flood.sent_mib
        row["flood_closed"] = all(flood.closed)
        row["flood_rss_growth_mib"] = round((rss_kib(proc.pid, "VmHWM") - base) / 1024, 1)
        timed: dict[str, Any] = {}
        runs = {"idle_s": lambda: attacks.idle(HOST, port, limit_s),
                "slow_header_s": lambda: attacks.slow_headers(HOST, port, limit_s),
                "slow_body_s": lambda: attacks.slow_body(HOST, port, limit_s),
                "keep_alive_s": lambda: attacks.keep_alive_idle(HOST, port, limit_s)[1]}
        threads = [threading.Thread(target=lambda k=k, f=f: timed.__setitem__(k, f())) for k, f in runs.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(limit_s + 30)
        row.update(timed)
        alive, status, seconds = attacks.open_connections(HOST, port, conns)
        row.update(conns_open=alive, conns_then_status=status, conns_then_s=seconds)
    except Exception as exc:  # a candidate that breaks under attack is a result, not a crash of the bench
        row["failed"] = f"{type(exc).__name__}: {exc}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return row


def print_table(rows: list[dict[str, Any]], limit_s: float) -> None:
    def held(v: Any) -> str:
        return "held" if v is None else f"{v:.1f}"

    print(markdown_table(
        ["server", "req/s", "8 MB header", "flood MiB accepted/conn", "flood RSS +MiB", "idle s", "slow header s",
         "slow body s", "keep-alive s", "1000 conns: open / then", "note"],
        [[r["server"], r.get("req_per_s"), r.get("big_header_8mb_status"),
          max(r.get("flood_mib_accepted") or [0]), r.get("flood_rss_growth_mib"), held(r.get("idle_s")),
          held(r.get("slow_header_s")), held(r.get("slow_body_s")), held(r.get("keep_alive_s")),
          f"{r.get('conns_open')} / {r.get('conns_then_status')} in {r.get('conns_then_s')} s", r.get("failed", "")]
         for r in rows]))
    print(f"('held': still open after {limit_s:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=float, default=20.0, help="seconds an attack waits for the server")
    parser.add_argument("--flood-mib", type=int, default=64, help="MiB per unfinished header")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=2000, help="for req/s")
    parser.add_argument("--only", nargs="+", help="candidates whose name starts with these")
    parser.add_argument("--quick", action="store_true", help="short limits, small floods")
    parser.add_argument("--out", type=Path, default=Path("bench/results/servers.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.limit, args.flood_mib, args.connections, args.requests = 6.0, 4, 200, 100
    rows = []
    for name in candidates(0):
        if args.only and not any(name.startswith(o) for o in args.only):
            continue
        port = free_port()
        rows.append(measure(name, candidates(port)[name], port, args.limit, args.flood_mib, args.connections,
                            args.requests))
        print(rows[-1], flush=True)
    print_table(rows, args.limit)
    write_result(args.out, {"policy": {"header_bytes": HEADER_LIMIT, "timeouts_s": TIMEOUT_S, "cap": CAP,
                                       "limit_s": args.limit, "flood_mib": args.flood_mib,
                                       "connections": args.connections}, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
