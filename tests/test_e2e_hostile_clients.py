"""End to end, clients that are slow, idle, malformed or greedy, against a running server over real sockets.

- Every error the server itself makes is JSON of the documented shape, on every route and method (HEAD: the
  same headers, no body): unknown paths, trailing slashes (no redirects), wrong methods, unsatisfiable ranges,
  malformed HTTP, oversized headers, a bare CRLF, an unexpected exception (logged, never shown).
- Slow and idle connections are cut (HEADER_TIMEOUT, IDLE_TIMEOUT, SEND_TIMEOUT); past MAX_CONNECTIONS the
  longest-waiting ones go first, so /health and real downloads carry on under a flood, even with the process
  held to 256 file descriptors. The soft fd limit is raised at start.
- Request limits answer 429 with Retry-After: downloads in progress per client address, cold images in flight.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import socket
import time

import httpx
import pytest

from tests.support.faults import BackgroundGet, assert_complete_tar, wait_until
from tests.support.flood import FdLimitedServer, Flood
from tests.support.images import make_layer
from tests.support.rawhttp import (
    RawResult,
    SlowReader,
    exchange,
    fd_limits,
    open_fds,
    read_response,
    request_bytes,
)

pytestmark = pytest.mark.e2e

BASE_ENV = {"CREDENTIALS_KEY": "test-key"}


def filename_for(repository: str, tag: str) -> str:
    return repository.replace("/", "__") + f"_{tag}.tar"


def assert_raw_json_error(result: RawResult, status: int, *, error: str | None = None, head: bool = False) -> dict:
    assert result.status == status, f"expected {status}, got {result.status} ({result.ended}): {result.body[:300]!r}"
    assert result.headers.get("content-type", "").startswith("application/json"), result.headers
    if head:
        assert result.body == b"" and int(result.headers["content-length"]) > 0, (result.headers, result.body)
        return {}
    body = json.loads(result.body)
    assert set(body) >= {"error", "status", "message"} and body["status"] == status, body
    if error is not None:
        assert body["error"] == error, body
    return body


# --------------------------------------------------------------------------- every error is JSON


def test_every_error_the_server_makes_is_json(stack, registry, unique_repo):
    registry.push_image(unique_repo, "v1", [make_layer({"a.txt": b"json errors"})])
    running = stack("embedded", env={**BASE_ENV, "REGISTRY_URL": registry.url, "HEADER_TIMEOUT": "2"})
    address = ("127.0.0.1", running.server.port)
    image_path = f"/docker/{filename_for(unique_repo, 'v1')}"

    def ask(method: str, path: str, headers: dict[str, str] | None = None) -> RawResult:
        return exchange(address, request_bytes(method, path, headers), head_only=method == "HEAD")

    archive = ask("GET", image_path)
    assert archive.status == 200 and archive.headers["content-type"] == "application/x-tar"
    size = len(archive.body)

    # Unknown paths, and trailing slashes: a JSON 404 that names the path without the slash, never a redirect.
    assert "see the README" in assert_raw_json_error(ask("GET", "/no/such/route"), 404, error="not_found")["message"]
    for path, without in (("/health/", "/health"), (image_path + "/", image_path), ("/status/x/", "/status/x")):
        body = assert_raw_json_error(ask("GET", path), 404, error="not_found")
        assert body["message"].endswith(f"paths never end in a slash: {without}"), body
    # HEAD: the headers a GET gets, no body.
    get_404, head_404 = ask("GET", "/health/"), ask("HEAD", "/health/")
    assert_raw_json_error(head_404, 404, head=True)
    assert head_404.headers["content-length"] == get_404.headers["content-length"]

    # Wrong methods: 405 with Allow, on every route.
    for method, path, allowed in (("DELETE", "/health", {"GET", "HEAD"}), ("POST", "/metrics", {"GET", "HEAD"}),
                                  ("PUT", image_path, {"GET", "HEAD", "POST"}), ("PATCH", "/status/x", {"GET", "HEAD"}),
                                  ("OPTIONS", f"/registry/http/{registry.host}{image_path}", {"GET", "HEAD", "POST"})):
        result = ask(method, path)
        body = assert_raw_json_error(result, 405, error="method_not_allowed")
        assert set(result.headers["allow"].replace(" ", "").split(",")) == allowed, result.headers
        assert method in body["message"]

    # A range past the end: 416 JSON with the size, never an empty body typed as a tar.
    for method in ("GET", "HEAD"):
        beyond = ask(method, image_path, {"Range": f"bytes={size}-"})
        assert_raw_json_error(beyond, 416, error="range_not_satisfiable", head=method == "HEAD")
        assert beyond.headers["content-range"] == f"bytes */{size}"

    # Malformed HTTP, request smuggling shapes, bytes that are no request: 400 JSON from the protocol layer.
    for raw in (b"GARBAGE\r\n\r\n", b"GET /health HTTP/1.1\r\nNo colon here\r\n\r\n",
                b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc",
                b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n"):
        result = exchange(address, raw)
        assert result.status in (400, 404), (raw, result)
        assert_raw_json_error(result, result.status)
    # Headers past 32 KiB: 431 JSON.
    assert_raw_json_error(exchange(address, request_bytes("GET", "/health", {"X-Big": "a" * 40_000})), 431,
                          error="headers_too_large")
    # A bare CRLF, or a request line that never ends: 408 JSON after HEADER_TIMEOUT, not a hang.
    for raw in (b"\r\n", b"GET /health HTTP/1.1\r\nHost: x\r\n"):
        started = time.monotonic()
        assert_raw_json_error(exchange(address, raw, timeout=10), 408, error="request_timeout")
        assert 1.5 < time.monotonic() - started < 5
    # An Upgrade we do not speak is served as plain HTTP.
    upgraded = ask("GET", "/health", {"Connection": "Upgrade", "Upgrade": "websocket"})
    assert upgraded.status == 200 and upgraded.json()["status"] == "ok"

    # An unexpected exception (here a damaged record in the store): JSON 500, the traceback only in the log.
    (record_file,) = list((running.cache_dir / "images").glob("*.json"))
    record_file.write_text("{ damaged")
    for method in ("GET", "HEAD"):
        crashed = ask(method, image_path)
        assert_raw_json_error(crashed, 500, error="internal_error", head=method == "HEAD")
        assert b"Traceback" not in crashed.body and b"JSONDecodeError" not in crashed.body
    assert wait_until(lambda: "Traceback" in running.logs() and "JSONDecodeError" in running.logs(), timeout=5)


# --------------------------------------------------------------------------- slow and idle clients


def test_fd_limit_is_raised_at_start_and_the_connection_cap_follows_it(tmp_path):
    server = FdLimitedServer({"CACHE_DIR": str(tmp_path / "cache")}, tmp_path / "server.log", nofile=(512, 2048))
    try:
        assert fd_limits(server.pid) == (2048, 2048)
        log = server.log_text()
        assert "soft limit raised from 512 to 2048" in log, log
        assert "at most 597 per process (MAX_CONNECTIONS, from the fd limit)" in log, log
        assert "raise the file-descriptor limit" in log  # 597 is too few for a big fleet: say so
    finally:
        server.stop()


def test_slow_and_idle_clients_are_cut_while_health_and_downloads_go_on(stack, registry, unique_repo):
    registry.push_image(unique_repo, "v1", [make_layer({"big.bin": bytes(range(256)) * 24_000})])  # ~6 MB
    running = stack("embedded", env={**BASE_ENV, "REGISTRY_URL": registry.url, "HEADER_TIMEOUT": "3",
                                     "IDLE_TIMEOUT": "2", "MAX_CONNECTIONS": "60"})
    address = ("127.0.0.1", running.server.port)
    image_path = f"/docker/{filename_for(unique_repo, 'v1')}"
    reference = hashlib.sha256(exchange(address, request_bytes("GET", image_path), timeout=60).body).hexdigest()
    # 256 file descriptors, like a small container: without the cap the flood below would exhaust them.
    resource.prlimit(running.server.pid, resource.RLIMIT_NOFILE, (256, 256))
    baseline_fds = open_fds(running.server.pid)

    # Kept alive and then idle: closed after IDLE_TIMEOUT.
    with socket.create_connection(address, timeout=10) as kept:
        kept.sendall(request_bytes("GET", "/health"))
        assert read_response(kept).status == 200  # whole, even when it comes in several segments
        answered = time.monotonic()
        assert kept.recv(65536) == b""
        assert 1.5 < time.monotonic() - answered < 4

    # A device already downloading (slowly) when the flood starts.
    device = SlowReader(address, image_path, step=64 << 10, pause=0.04)
    assert wait_until(lambda: device.received > 0 or device.done(), timeout=10), device.error
    flood = Flood(address, idle=400, slow=100, interval=0.5)
    try:
        time.sleep(1.0)
        for _ in range(5):  # /health answers at once, however many connections the flood holds
            started = time.monotonic()
            health = exchange(address, request_bytes("GET", "/health"), timeout=5)
            assert health.status == 200, health
            assert time.monotonic() - started < 1.5
        # A new download during the flood is served whole.
        during = exchange(address, request_bytes("GET", image_path), timeout=60)
        assert during.status == 200 and hashlib.sha256(during.body).hexdigest() == reference
        device.join(timeout=60)
        assert device.error is None and device.digest == reference, device.error
        # Every flood connection is gone within HEADER_TIMEOUT (+ slack): shed early, or timed out.
        assert wait_until(lambda: flood.open_now() == 0, timeout=3 + 4), flood.report()
        report = flood.report()
    finally:
        flood.stop()
    # Shed at once to make room (503 if they had sent bytes, else a silent close), or timed out after
    # HEADER_TIMEOUT: 408 for a slow one, a silent close for one that never sent a byte.
    assert set(report.answers) <= {None, 408, 503}, report.answers
    timed_out = [(slow, status) for slow, _, status, seconds in report.closed if seconds >= 2.5]
    assert timed_out and all(status == (408 if slow else None) for slow, status in timed_out), timed_out
    assert all(seconds < 3 + 1.5 for *_, seconds in report.closed), report.slowest_close
    assert wait_until(lambda: open_fds(running.server.pid) <= baseline_fds + 5, timeout=5)
    log = running.logs()
    assert "connection cap MAX_CONNECTIONS=60 reached" in log and "Too many open files" not in log


def test_past_the_cap_with_every_connection_busy_only_health_is_served(stack, registry, unique_repo):
    registry.push_image(unique_repo, "v1", [make_layer({"f.bin": os.urandom(600_000)})])
    running = stack("embedded", env={**BASE_ENV, "REGISTRY_URL": registry.url, "PREPARE_GRACE": "0",
                                     "MAX_CONNECTIONS": "3"})
    address = ("127.0.0.1", running.server.port)
    url = f"{running.url}/docker/{filename_for(unique_repo, 'v1')}"
    registry.proxy.throttle_bytes_per_second = 150_000  # the three downloads wait a few seconds for it
    busy = [BackgroundGet(url, timeout=60) for _ in range(3)]
    assert wait_until(lambda: registry.proxy.count("GET", kind="blob") >= 1, timeout=15)
    time.sleep(0.3)

    health = exchange(address, request_bytes("GET", "/health"))
    assert health.status == 200 and health.json()["status"] == "ok"
    refused = exchange(address, request_bytes("GET", "/docker/other_v1.tar"))
    body = assert_raw_json_error(refused, 503, error="overloaded")
    assert refused.headers["retry-after"] == "10" and "MAX_CONNECTIONS=3" in body["message"]
    for download in busy:  # never shed: they had a request in progress
        assert_complete_tar(download.join(timeout=60))


def test_a_response_nobody_reads_is_cut_after_send_timeout(stack, registry, unique_repo):
    registry.push_image(unique_repo, "v1", [make_layer({"big.bin": bytes(range(256)) * 24_000})])  # ~6 MB
    running = stack("embedded", env={**BASE_ENV, "REGISTRY_URL": registry.url, "SEND_TIMEOUT": "2"})
    address = ("127.0.0.1", running.server.port)
    image_path = f"/docker/{filename_for(unique_repo, 'v1')}"
    size = len(exchange(address, request_bytes("GET", image_path), timeout=60).body)

    # A slow reader that keeps reading is never cut, although the kernel's send buffer takes more from us only
    # every few seconds (longer than SEND_TIMEOUT).
    reader = SlowReader(address, image_path, step=64 << 10, pause=0.05)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as stuck:
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(address)
        stuck.sendall(request_bytes("GET", image_path))
        time.sleep(2 + 3)  # SEND_TIMEOUT, and the check after it
        stuck.settimeout(10)
        received = 0
        try:
            while chunk := stuck.recv(1 << 20):
                received += len(chunk)
        except ConnectionResetError:
            pass
    assert received < size, "the stuck client was sent the whole archive?"
    assert "read nothing of its response for SEND_TIMEOUT=2s" in running.logs()
    reader.join(timeout=120)
    assert reader.error is None and reader.received == reader.length == size, reader.error


# --------------------------------------------------------------------------- request limits (429)


def _get_from(source: str, url: str, method: str = "GET") -> httpx.Response:
    """From another loopback address (127.0.0.0/8 is all ours): another client, as the server sees it."""
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, timeout=60, trust_env=False) as client:
        return client.request(method, url)


def test_request_limits_answer_429_with_retry_after(mode, stack, registry, unique_repo):
    for tag in ("a", "b"):
        registry.push_image(unique_repo, tag, [make_layer({"f.bin": os.urandom(600_000)})])
    running = stack(mode, workers=1, env={**BASE_ENV, "REGISTRY_URL": registry.url, "PREPARE_GRACE": "0",
                                          "MAX_DOWNLOADS_PER_CLIENT": "2", "MAX_COLD_IMAGES": "1"})
    url_a = f"{running.url}/docker/{filename_for(unique_repo, 'a')}"
    url_b = f"{running.url}/docker/{filename_for(unique_repo, 'b')}"
    registry.proxy.throttle_bytes_per_second = 150_000  # image a takes a few seconds to prepare

    waiting = [BackgroundGet(url_a, timeout=60) for _ in range(2)]
    assert wait_until(lambda: registry.proxy.count("GET", kind="blob") >= 1, timeout=15), "a never started"
    time.sleep(0.3)  # both requests are in
    # A third download from the same address: 429, with when to come back.
    third = _get_from("127.0.0.1", url_a)
    assert third.status_code == 429 and third.headers["retry-after"] == "30", third.text[:300]
    assert third.json()["error"] == "too_many_downloads" and "MAX_DOWNLOADS_PER_CLIENT=2" in third.json()["message"]
    # Another cold image while a is in flight: 429 (GET and POST); one more request for a joins a, not refused.
    for refused in (_get_from("127.0.0.2", url_b), _get_from("127.0.0.4", url_b, "POST")):
        assert refused.status_code == 429 and refused.headers["retry-after"] == "30", refused.text[:300]
        assert refused.json()["error"] == "too_many_cold_images", refused.json()
        assert "MAX_COLD_IMAGES=1" in refused.json()["message"]
    joined = _get_from("127.0.0.3", url_a)
    assert joined.status_code == 200 and joined.headers["content-type"] == "application/x-tar"
    for pending in waiting:
        assert_complete_tar(pending.join(timeout=60))

    # a is done: b may start now, and the first address may download again.
    registry.proxy.reset()
    after = _get_from("127.0.0.1", url_b)
    assert after.status_code == 200 and int(after.headers["content-length"]) == len(after.content)
