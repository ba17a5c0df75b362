"""A counting, throttling, fault-injecting HTTP/1.1 reverse proxy for tests.

Put it between the code under test and a real registry to see exactly which
requests were made (``requests`` / ``count``) and how many body bytes went out
(``body_bytes``), and to inject faults: corrupted bodies, slow bodies, error
statuses and slow headers.

Bodies are streamed in chunks in both directions, so multi-GiB blobs are fine.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any, Literal, NamedTuple
from urllib.parse import urlsplit

from tests.support.lifecycle import ThreadedServer

Kind = Literal["manifest", "blob", "upload", "base"]

CHUNK_SIZE = 64 * 1024
UPSTREAM_TIMEOUT_SECONDS = 60.0

# RFC 9110 §7.6.1 hop-by-hop headers, plus ones this proxy recomputes itself.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "expect",  # the 100-continue handshake is done by the proxy's own server side
        "host",  # set to the upstream's
    }
)

_MANIFEST_RE = re.compile(r"^/v2/.+/manifests/[^/]+$")
_BLOB_RE = re.compile(r"^/v2/.+/blobs/[A-Za-z0-9_+.-]+:[A-Za-z0-9=_-]+$")


def kind_of(path: str) -> Kind | None:
    """Classify a registry API path (without query string)."""
    if path in ("/v2/", "/v2"):
        return "base"
    if "/blobs/uploads/" in path or path.endswith("/blobs/uploads"):
        return "upload"
    if _BLOB_RE.match(path):
        return "blob"
    if _MANIFEST_RE.match(path):
        return "manifest"
    return None


class ProxyRecord(NamedTuple):
    method: str
    path: str  # without the query string
    status: int


class CountingProxy(ThreadedServer):
    """Reverse proxy on 127.0.0.1:<free port> in front of ``upstream_url``.

    Fault knobs may be changed at any time (they are read per request, or per
    chunk for throttling) and are cleared by ``reset()``:

    - ``corrupt_path_contains``: flip one byte in the middle of 2xx response
      bodies whose path contains this substring (length unchanged).
    - ``throttle_bytes_per_second``: pace response bodies to this rate.
    - ``fail_status``: {path substring: status}; matching requests get that
      status with an empty body and never reach the upstream.
    - ``delay_seconds_before_headers``: sleep before handling each request.
    - ``cut(path_contains, after_bytes, times=1)``: close the connection after that many body bytes of the next
      ``times`` matching 2xx responses (a registry connection cut mid-blob).
    - ``fail(path_contains, status, times=1, headers=None)``: the next ``times`` matching requests get ``status``
      with ``headers`` (e.g. ``{"Retry-After": "1"}``) and never reach the upstream.

    ``body_bytes(path_contains)`` tells how many response body bytes went out for matching paths.
    """

    def __init__(self, upstream_url: str) -> None:
        upstream = urlsplit(upstream_url)
        if upstream.scheme != "http" or not upstream.hostname:
            raise ValueError(f"upstream must be an http:// URL, got {upstream_url!r}")
        self.upstream_url = f"http://{upstream.netloc}"
        self.upstream_netloc = upstream.netloc
        self._upstream_address = (upstream.hostname, upstream.port or 80)

        self._lock = threading.Lock()
        self._requests: list[ProxyRecord] = []
        self._body_bytes: dict[str, int] = {}  # path -> response body bytes sent downstream
        self.corrupt_path_contains: str | None = None
        self.throttle_bytes_per_second: float | None = None
        self.fail_status: dict[str, int] = {}
        self.delay_seconds_before_headers: float = 0.0
        self._cuts: list[list] = []  # [path substring, after bytes, times left]
        self._fails: list[list] = []  # [path substring, status, times left, headers]

        super().__init__(_ProxyHandler, "CountingProxy", proxy=self)

    def cut(self, path_contains: str, after_bytes: int, times: int = 1) -> None:
        with self._lock:
            self._cuts.append([path_contains, after_bytes, times])

    def fail(self, path_contains: str, status: int, times: int = 1, headers: dict[str, str] | None = None) -> None:
        with self._lock:
            self._fails.append([path_contains, status, times, dict(headers or {})])

    def _take(self, faults: list[list], path: str, longer_than: int | None = None) -> list | None:
        """The first fault matching ``path`` with uses left, one use taken. A cut is taken only by a response
        longer than its offset (``longer_than``: its length, when known): a short ranged read is not cut."""
        with self._lock:
            for fault in faults:
                if fault[0] in path and fault[2] > 0 and (longer_than is None or longer_than > fault[1]):
                    fault[2] -= 1
                    return fault
        return None

    def _sent(self, path: str, size: int) -> None:
        with self._lock:
            self._body_bytes[path] = self._body_bytes.get(path, 0) + size

    # -- recording -----------------------------------------------------------------

    @property
    def requests(self) -> list[ProxyRecord]:
        """Snapshot of the requests seen so far, in arrival-of-response order."""
        with self._lock:
            return list(self._requests)

    def reset(self) -> None:
        """Forget recorded requests and clear all fault injection."""
        with self._lock:
            self._requests.clear()
            self._body_bytes.clear()
            self.corrupt_path_contains = None
            self.throttle_bytes_per_second = None
            self.fail_status = {}
            self.delay_seconds_before_headers = 0.0
            self._cuts.clear()
            self._fails.clear()

    def count(self, method: str | None = None, kind: Kind | None = None, path_contains: str | None = None,
              status: int | None = None) -> int:
        """Number of recorded requests matching all given filters."""
        return sum(1 for record in self.requests
                   if (method is None or record.method == method.upper())
                   and (kind is None or kind_of(record.path) == kind)
                   and (path_contains is None or path_contains in record.path)
                   and (status is None or record.status == status))

    def body_bytes(self, path_contains: str = "") -> int:
        """Response body bytes sent so far for paths containing ``path_contains`` (all paths by default)."""
        with self._lock:
            return sum(sent for path, sent in self._body_bytes.items() if path_contains in path)

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self._requests.append(ProxyRecord(method, path, status))

    def _injected_status(self, path: str) -> int | None:
        for substring, status in dict(self.fail_status).items():
            if substring in path:
                return status
        return None

    def _rewrite_location(self, value: str) -> str:
        if value.startswith(self.upstream_url):
            return self.url + value[len(self.upstream_url) :]
        return value


class _ClientGone(Exception):
    """The downstream client disconnected; abandon this connection."""


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive + chunked responses
    disable_nagle_algorithm = True
    timeout = 120  # reap idle keep-alive connections eventually

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # no per-request noise on stderr

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    # -- request side --------------------------------------------------------------

    def _handle(self) -> None:
        proxy = self.server.proxy
        method = self.command
        target = urlsplit(self.path)
        path = target.path or "/"
        upstream_target = path + (f"?{target.query}" if target.query else "")

        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            # Not needed by anything under test; refuse loudly rather than mis-proxy.
            self.close_connection = True
            self._send_empty(method, path, 501)
            return
        try:
            body_length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            self._send_empty(method, path, 400)
            return

        delay = proxy.delay_seconds_before_headers
        if delay:
            time.sleep(delay)

        injected = proxy._injected_status(path)
        fault = proxy._take(proxy._fails, path) if injected is None else None
        if injected is not None or fault is not None:
            self._discard_request_body(body_length)
            self._send_empty(method, path, injected or fault[1], headers=fault[3] if fault else None)
            return

        upstream = http.client.HTTPConnection(
            *proxy._upstream_address, timeout=UPSTREAM_TIMEOUT_SECONDS
        )
        try:
            try:
                response = self._forward_request(
                    upstream, method, upstream_target, body_length
                )
            except _ClientGone:
                self.close_connection = True
                return
            except (OSError, http.client.HTTPException) as exc:
                self.close_connection = True
                self._send_empty(method, path, 502, reason=f"upstream: {exc!r}")
                return
            self._forward_response(response, method, path)
        except _ClientGone:
            self.close_connection = True
        finally:
            upstream.close()

    def _forward_request(
        self,
        upstream: http.client.HTTPConnection,
        method: str,
        target: str,
        body_length: int,
    ) -> http.client.HTTPResponse:
        proxy = self.server.proxy
        upstream.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        upstream.putheader("Host", proxy.upstream_netloc)
        for name, value in self._end_to_end(self.headers.items(), self.headers):
            upstream.putheader(name, value)
        upstream.endheaders()
        remaining = body_length
        while remaining > 0:
            try:
                data = self.rfile.read(min(CHUNK_SIZE, remaining))
            except OSError as exc:
                raise _ClientGone() from exc
            if not data:
                raise _ClientGone()
            upstream.send(data)
            remaining -= len(data)
        return upstream.getresponse()

    def _discard_request_body(self, length: int) -> None:
        # Keeps the keep-alive connection in sync after an injected answer.
        while length > 0:
            data = self.rfile.read(min(CHUNK_SIZE, length))
            if not data:
                self.close_connection = True
                return
            length -= len(data)

    # -- response side -------------------------------------------------------------

    def _forward_response(
        self, response: http.client.HTTPResponse, method: str, path: str
    ) -> None:
        proxy = self.server.proxy
        status = response.status
        has_body = method != "HEAD" and status not in (204, 304) and status >= 200
        content_length = response.getheader("Content-Length")
        rechunk = has_body and content_length is None

        headers: list[tuple[str, str]] = []
        for name, value in self._end_to_end(response.getheaders(), response.msg):
            if name.lower() == "location":
                value = proxy._rewrite_location(value)
            headers.append((name, value))
        if rechunk:
            headers.append(("Transfer-Encoding", "chunked"))

        cut = (proxy._take(proxy._cuts, path, int(content_length) if content_length else None)
               if has_body and 200 <= status < 300 else None)
        corrupt_at: int | None = None
        if (
            has_body
            and 200 <= status < 300
            and proxy.corrupt_path_contains is not None
            and proxy.corrupt_path_contains in path
        ):
            corrupt_at = int(content_length) // 2 if content_length else 0

        proxy._record(method, path, status)
        try:
            self.send_response_only(status, response.reason)
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            if has_body:
                self._stream_body(response, rechunk, corrupt_at, path, cut[1] if cut else None)
        except OSError as exc:
            raise _ClientGone() from exc

    def _stream_body(
        self, response: http.client.HTTPResponse, rechunk: bool, corrupt_at: int | None, path: str,
        cut_after: int | None,
    ) -> None:
        proxy = self.server.proxy
        sent = 0
        pace_rate: float | None = None
        pace_start = 0.0
        pace_sent = 0
        while True:
            rate = proxy.throttle_bytes_per_second
            if rate != pace_rate:  # (re)start pacing whenever the knob changes
                pace_rate, pace_start, pace_sent = rate, time.monotonic(), 0
            # Small chunks under throttling (~20 writes/s) keep the rate smooth.
            size = max(1, min(CHUNK_SIZE, int(rate / 20))) if rate else CHUNK_SIZE
            try:
                data = response.read1(size)
            except (OSError, http.client.HTTPException):
                data = b""
                self.close_connection = True  # upstream broke: truncate for the client
            if not data:
                break
            if cut_after is not None and sent + len(data) >= cut_after:
                data = data[: cut_after - sent]
                self.wfile.write(data)
                proxy._sent(path, len(data))
                self.close_connection = True  # the cut: no more bytes, the connection goes
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if corrupt_at is not None and sent <= corrupt_at < sent + len(data):
                mutable = bytearray(data)
                mutable[corrupt_at - sent] ^= 0xFF
                data = bytes(mutable)
            if rechunk:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            else:
                self.wfile.write(data)
            proxy._sent(path, len(data))
            sent += len(data)
            if rate:
                pace_sent += len(data)
                wait = pace_start + pace_sent / rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
        if rechunk and not self.close_connection:
            self.wfile.write(b"0\r\n\r\n")

    def _send_empty(self, method: str, path: str, status: int, reason: str | None = None,
                    headers: dict[str, str] | None = None) -> None:
        self.server.proxy._record(method, path, status)
        try:
            self.send_response_only(status, reason)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
        except OSError:
            self.close_connection = True

    @staticmethod
    def _end_to_end(
        items: list[tuple[str, str]] | Any, message: Any
    ) -> list[tuple[str, str]]:
        """Drop hop-by-hop headers, including any named in ``Connection``."""
        named = {
            token.strip().lower()
            for value in (message.get_all("Connection") or [])
            for token in value.split(",")
        }
        return [
            (name, value)
            for name, value in items
            if name.lower() not in _HOP_BY_HOP and name.lower() not in named
        ]
