"""Benchmark clients: curl for single downloads, and many asyncio raw-socket clients on one event loop (uvloop),
each timing its headers and checking its body's crc32 (and sha256), optionally paced like a slow switch."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.checks import fastz
from bench.report import MiB



@dataclass
class Curl:
    speed: float  # bytes/s, curl's speed_download
    ttfb: float
    total: float
    size: int


def curl(url: str, out: str = "/dev/null", timeout: float = 600) -> Curl:
    cmd = ["curl", "-s", "-S", "--noproxy", "*", "-o", out, "--max-time", str(int(timeout)), "-w",
           "%{speed_download} %{time_starttransfer} %{time_total} %{http_code} %{size_download}", url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30, check=False)
    fields = done.stdout.split()
    if done.returncode != 0 or len(fields) != 5 or fields[3] != "200":
        raise RuntimeError(f"curl {url} failed: exit {done.returncode}, {done.stdout!r} {done.stderr.strip()!r}")
    return Curl(float(fields[0]), float(fields[1]), float(fields[2]), int(fields[4]))


@dataclass
class Fetch:
    index: int
    status: int = 0
    content_length: int = -1
    received: int = 0
    crc32: int = 0
    sha256: str | None = None
    started: float = 0.0
    headers_at: float = 0.0
    done_at: float = 0.0
    largest_gap: float = 0.0  # the longest wait for body bytes after the headers
    error: str | None = None

    @property
    def time_to_headers(self) -> float:
        return self.headers_at - self.started

    @property
    def total(self) -> float:
        return self.done_at - self.started


async def _read_head(loop: asyncio.AbstractEventLoop, sock: socket.socket, result: Fetch,
                     first_byte_only: bool) -> bytes | None:
    """Read the response headers into ``result``; returns the body bytes that came with them (None: the caller
    wanted the first byte only, and has it)."""
    head = bytearray()
    while (end := head.find(b"\r\n\r\n")) < 0:
        data = await loop.sock_recv(sock, 65536)
        if not data:
            raise ConnectionError(f"closed before the headers ended ({bytes(head[:200])!r})")
        if first_byte_only:
            result.headers_at = time.monotonic()
            result.status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
            return None
        head += data
        if len(head) > 65536:
            raise ConnectionError("headers too long")
    result.headers_at = time.monotonic()
    lines = bytes(head[:end]).decode("latin-1").split("\r\n")
    result.status = int(lines[0].split(" ", 2)[1])
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            result.content_length = int(value.strip())
    if result.status != 200 or result.content_length < 0:
        raise ConnectionError(f"status {result.status}, content-length {result.content_length}: "
                              f"{bytes(head[end + 4:end + 300])!r}")
    return bytes(head[end + 4:])


async def fetch(index: int, port: int, path: str, *, pace: float | None = None, stop_after: float | None = None,
                want_sha: bool = False, first_byte_only: bool = False, bufsize: int = MiB) -> Fetch:
    """GET over a raw socket: time to headers, crc32 (and sha256) of the body, optionally paced to ``pace`` B/s
    and closed ``stop_after`` seconds after the headers arrived (a slow client giving up is not an error)."""
    loop = asyncio.get_running_loop()
    result = Fetch(index, started=time.monotonic())
    sha = hashlib.sha256() if want_sha else None
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                                       "User-Agent: dhp-bench\r\nConnection: close\r\n\r\n").encode())
        body = await _read_head(loop, sock, result, first_byte_only)
        if body is None:
            return result
        result.crc32 = fastz.crc32(body)
        if sha:
            sha.update(body)
        result.received = len(body)
        buffer = bytearray(bufsize)
        view = memoryview(buffer)
        while result.received < result.content_length:
            want = min(bufsize, result.content_length - result.received)
            if pace is not None:
                elapsed = time.monotonic() - result.headers_at
                if stop_after is not None and elapsed >= stop_after:
                    break
                allowed = int(pace * elapsed) - result.received
                if allowed <= 0:
                    await asyncio.sleep(min(0.1, -allowed / pace + 0.01))
                    continue
                want = min(want, allowed)
            waiting_since = time.monotonic()
            got = await loop.sock_recv_into(sock, view[:want])
            if pace is None:  # a paced client waits on itself
                result.largest_gap = max(result.largest_gap, time.monotonic() - waiting_since)
            if not got:
                raise ConnectionError(f"closed after {result.received} of {result.content_length} bytes")
            result.crc32 = fastz.crc32(view[:got], result.crc32)
            if sha:
                sha.update(view[:got])
            result.received += got
    except Exception as exc:  # noqa: BLE001 - every failure is reported per client
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.done_at = time.monotonic()
        sock.close()
        if sha:
            result.sha256 = sha.hexdigest()
    return result


async def _fetch_all(count: int, port: int, path: str, timeout: float, sha_every: int, **kwargs: Any) -> list[Fetch]:
    async def one(i: int) -> Fetch:
        want_sha = bool(sha_every) and i % sha_every == 0
        try:
            return await asyncio.wait_for(fetch(i, port, path, want_sha=want_sha, **kwargs), timeout)
        except TimeoutError:
            return Fetch(i, error=f"no answer within {timeout:.0f}s")
    return list(await asyncio.gather(*(one(i) for i in range(count))))


def fetch_all(count: int, port: int, path: str, timeout: float, sha_every: int = 0, **kwargs: Any) -> list[Fetch]:
    """``count`` concurrent GETs on one event loop (uvloop when available, as the server uses); each computes
    the crc32 of its body, every ``sha_every``-th also the sha256."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_fetch_all(count, port, path, timeout, sha_every, **kwargs))


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

