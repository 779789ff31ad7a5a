"""A hostile client's primitives over raw sockets: what ``bench.servers`` measures candidate
HTTP servers with and ``tests/test_serve_attacks.py`` attacks the gateway with.

Each attack is bounded in bytes and time and talks only to this machine (a measuring and
testing tool, not a way to flood others). Each returns what the server did: the status it
answered, or how long it held the connection before closing it (``None``: still open when
the attack gave up).
"""

from __future__ import annotations

import socket
import threading
import time
import zlib
from dataclasses import dataclass

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def declared_png(width: int, height: int) -> bytes:
    """A valid PNG of ``width`` x ``height`` grey pixels that is only a few KB (every row zero):
    issue 14's 35 KB upload that costs gigabytes to serve."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])  # 8-bit grey
    rows = zlib.compress(bytes(height * (width + 1)), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def connect(host: str, port: int, timeout_s: float = 5.0) -> socket.socket:
    if host not in LOCAL_HOSTS:
        raise ValueError(f"attacks go to this machine only, not {host!r}")
    sock = socket.create_connection((host, port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def status_of(answer: bytes) -> int | None:
    """``HTTP/1.1 431 ...`` -> 431; None for no answer."""
    parts = answer.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def read_answer(sock: socket.socket, timeout_s: float) -> bytes:
    """Whatever the server sends until it closes or goes quiet for ``timeout_s``."""
    sock.settimeout(timeout_s)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and not _expects_more(b"".join(chunks)):
                break
    except (TimeoutError, OSError):
        pass
    return b"".join(chunks)


def _expects_more(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return len(body) < int(value.strip())
    return False


def held_for(sock: socket.socket, limit_s: float) -> float | None:
    """Seconds until the server closes ``sock`` (reading and dropping what it sends); None if it
    is still open after ``limit_s``."""
    t0 = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - t0 < limit_s:
        try:
            if not sock.recv(65536):
                return round(time.monotonic() - t0, 2)
        except TimeoutError:
            continue
        except OSError:
            return round(time.monotonic() - t0, 2)
    return None


def request_head(path: str = "/", method: str = "GET", extra: str = "", length: int | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n" + extra).encode()


def big_header(host: str, port: int, header_bytes: int, path: str = "/") -> int | None:
    """One complete request whose headers hold ``header_bytes`` bytes: the status answered."""
    with connect(host, port, 30) as sock:
        value = b"a" * header_bytes
        try:
            sock.sendall(request_head(path) + b"X-Big: " + value + b"\r\n\r\n")
        except OSError:
            pass  # closed while we sent: the answer (if any) is still readable
        return status_of(read_answer(sock, 10))


@dataclass
class Flood:
    """What unfinished headers of ``mib`` MiB on ``connections`` sockets got from the server."""

    sent_mib: list[float]  # per connection, before the server closed it (or all of it)
    closed: list[bool]
    statuses: list[int | None]


def unfinished_headers(host: str, port: int, connections: int, mib: int, path: str = "/") -> Flood:
    """``connections`` sockets each sending ``mib`` MiB of one header line that never ends."""
    sent = [0.0] * connections
    closed = [False] * connections
    statuses: list[int | None] = [None] * connections
    chunk = b"a" * (1 << 20)

    def one(i: int) -> None:
        with connect(host, port, 10) as sock:
            try:
                sock.sendall(request_head(path) + b"X-Big: ")
                for _ in range(mib):
                    sock.sendall(chunk)
                    sent[i] += 1
            except OSError:
                closed[i] = True
            answer = read_answer(sock, 2)
            statuses[i] = status_of(answer)
            closed[i] = closed[i] or held_for(sock, 2) is not None

    threads = [threading.Thread(target=one, args=(i,)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return Flood(sent, closed, statuses)


def idle(host: str, port: int, limit_s: float) -> float | None:
    """A connection that sends nothing: seconds until the server closes it."""
    with connect(host, port) as sock:
        return held_for(sock, limit_s)


def trickle(sock: socket.socket, data: bytes, bytes_per_s: float, limit_s: float) -> float | None:
    """Sends ``data`` at ``bytes_per_s``; seconds until the server closes or answers (None: neither
    within ``limit_s``)."""
    t0 = time.monotonic()
    step = max(1, int(bytes_per_s))
    sock.settimeout(0.05)
    for i in range(0, len(data), step):
        if time.monotonic() - t0 > limit_s:
            return None
        try:
            sock.sendall(data[i:i + step])
        except OSError:
            return round(time.monotonic() - t0, 2)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                sock.recv(65536)  # an answer or a close: the server is done with us
                return round(time.monotonic() - t0, 2)
            except TimeoutError:
                continue
            except OSError:
                return round(time.monotonic() - t0, 2)
    return held_for(sock, max(0.0, limit_s - (time.monotonic() - t0)))


def slow_headers(host: str, port: int, limit_s: float, bytes_per_s: float = 4, path: str = "/") -> float | None:
    """Headers at ``bytes_per_s`` (slowloris): seconds until the server gives up on us."""
    with connect(host, port) as sock:
        return trickle(sock, request_head(path) + b"X-Slow: " + b"a" * 10_000, bytes_per_s, limit_s)


def slow_body(host: str, port: int, limit_s: float, bytes_per_s: float = 4, path: str = "/",
              extra: str = "") -> float | None:
    """Complete headers announcing 1 MB, then the body at ``bytes_per_s``: seconds until the server
    answers or closes."""
    with connect(host, port) as sock:
        sock.sendall(request_head(path, "POST", extra, length=1_000_000) + b"\r\n")
        return trickle(sock, b"a" * 1_000_000, bytes_per_s, limit_s)


def keep_alive_idle(host: str, port: int, limit_s: float, path: str = "/") -> tuple[int | None, float | None]:
    """One complete request, then silence: (its status, seconds until the server closes)."""
    with connect(host, port) as sock:
        sock.sendall(request_head(path) + b"\r\n")
        status = status_of(read_answer(sock, 10))
        return status, held_for(sock, limit_s)


def open_connections(host: str, port: int, count: int, path: str = "/") -> tuple[int, int | None, float | None]:
    """``count`` idle connections held open, then one request on a new one: (connections the server
    kept open after 1 s, that request's status, its seconds). Every socket is closed on return."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            try:
                socks.append(connect(host, port, 2))
            except OSError:
                break
        time.sleep(1.0)
        alive = 0
        for s in socks:
            s.settimeout(0)
            try:
                alive += s.recv(1) != b""
            except BlockingIOError:
                alive += 1
            except OSError:
                pass
        t0 = time.monotonic()
        try:
            with connect(host, port, 10) as sock:
                sock.sendall(request_head(path) + b"\r\n")
                status = status_of(read_answer(sock, 10))
        except OSError:
            status = None
        return alive, status, round(time.monotonic() - t0, 3)
    finally:
        for s in socks:
            s.close()
