"""Benchmark clients: curl (one download, or many curl processes at once), and many asyncio raw-socket clients on
one event loop (uvloop) or spread over several processes, each timing its headers, checking its body's crc32 (and
sha256), and noting the longest it waited for bytes it wanted; optionally paced like a slow switch."""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
import socket
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
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


def _curl_command(url: str, out: str, timeout: float) -> list[str]:
    return ["curl", "-s", "-S", "--noproxy", "*", "-o", out, "--max-time", str(int(timeout)), "-w",
            "%{speed_download} %{time_starttransfer} %{time_total} %{http_code} %{size_download}", url]


def _curl_result(url: str, returncode: int, stdout: str, stderr: str) -> Curl:
    fields = stdout.split()
    if returncode != 0 or len(fields) != 5 or fields[3] != "200":
        raise RuntimeError(f"curl {url} failed: exit {returncode}, {stdout!r} {stderr.strip()!r}")
    return Curl(float(fields[0]), float(fields[1]), float(fields[2]), int(fields[4]))


def curl(url: str, out: str = "/dev/null", timeout: float = 600) -> Curl:
    done = subprocess.run(_curl_command(url, out, timeout), capture_output=True, text=True, timeout=timeout + 30,
                          check=False)
    return _curl_result(url, done.returncode, done.stdout, done.stderr)


@dataclass
class CurlFleet:
    """``count`` curl processes started together: what each got, and the wall time from the first start to the
    last exit."""

    results: list[Curl]
    errors: list[str]
    seconds: float

    @property
    def received(self) -> int:
        return sum(r.size for r in self.results)


def curl_many(count: int, url: str, timeout: float = 600) -> CurlFleet:
    started = time.monotonic()
    procs = [subprocess.Popen(_curl_command(url, "/dev/null", timeout), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(count)]
    results, errors = [], []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout + 30)
            results.append(_curl_result(url, proc.returncode, out, err))
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            proc.kill()
            proc.wait()
            errors.append(str(exc))
    return CurlFleet(results, errors, time.monotonic() - started)


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
    longest_wait: float = 0.0  # the longest the client waited for body bytes it was ready to take
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
            asked = time.monotonic()
            got = await loop.sock_recv_into(sock, view[:want])
            result.longest_wait = max(result.longest_wait, time.monotonic() - asked)
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


async def _fetch_all(count: int, port: int, path: str, timeout: float, sha_every: int, first: int = 0,
                     **kwargs: Any) -> list[Fetch]:
    async def one(i: int) -> Fetch:
        want_sha = bool(sha_every) and i % sha_every == 0
        try:
            return await asyncio.wait_for(fetch(i, port, path, want_sha=want_sha, **kwargs), timeout)
        except TimeoutError:
            return Fetch(i, error=f"no answer within {timeout:.0f}s")
    return list(await asyncio.gather(*(one(i) for i in range(first, first + count))))


def fetch_all(count: int, port: int, path: str, timeout: float, sha_every: int = 0, start_at: float | None = None,
              **kwargs: Any) -> list[Fetch]:
    """``count`` concurrent GETs on one event loop (uvloop when available, as the server uses); each computes
    the crc32 of its body, every ``sha_every``-th also the sha256. ``start_at``: a time.monotonic() to begin at."""
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.monotonic()))
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_fetch_all(count, port, path, timeout, sha_every, **kwargs))


def fetch_spread(count: int, processes: int, port: int, path: str, timeout: float, **kwargs: Any) -> list[Fetch]:
    """``fetch_all`` split over ``processes`` client processes that start together (one event loop cannot take
    in what a thousand clients or a multi-core server deliver)."""
    if processes <= 1 or count < 2 * processes:
        return fetch_all(count, port, path, timeout, **kwargs)
    shares = [count // processes + (i < count % processes) for i in range(processes)]
    start_at = time.monotonic() + 1.0 + 0.5 * processes  # time for the spawned interpreters to start
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(fetch_all, share, port, path, timeout, start_at=start_at, first=sum(shares[:i]),
                               **kwargs) for i, share in enumerate(shares)]
        return [fetch for future in futures for fetch in future.result()]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

