"""Local network helpers shared by the gateway's tools, the demo, benchmarks and tests.

Torch-free and standard library only, so ``faar`` (the demo), ``bench/``, ``docs/`` and the
tests can all use one copy.
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it; another process could take it later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url: str, timeout_s: float = 1.0) -> bool:
    """``GET url`` answers 200; refused connections, timeouts and error statuses are ``False``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Block until the gateway at ``url`` (run by ``proc``) answers ``/readyz`` with 200.

    Raises ``RuntimeError`` as soon as ``proc`` exits, ``TimeoutError`` after ``timeout`` s.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway exited with code {proc.returncode} before it was ready")
        if http_ok(f"{url}/readyz", timeout_s=2):
            return
        time.sleep(0.3)
    raise TimeoutError(f"the gateway at {url} was not ready within {timeout:.0f} s")
