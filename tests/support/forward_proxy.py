"""An outbound HTTP proxy as companies run one: `CONNECT host:port` tunnels (https URLs) and absolute-URI requests
(http URLs), for HTTPS_PROXY / HTTP_PROXY tests.

It is also the test's DNS: ``hosts`` maps `name:port` to a loopback address and port, so a test can use real
names (`registry-1.docker.io:443`, `registry.dhp.test:443`) that lead to local servers. Any other target must be
a loopback address, or the proxy answers 502 (nothing ever leaves this machine). ``requests`` records
(method, target) in arrival order: `("CONNECT", "registry-1.docker.io:443")`, `("GET", "http://…/v2/")`.
"""

from __future__ import annotations

import ipaddress
import select
import socket
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import urlsplit

from tests.support.lifecycle import ThreadedServer

PIPE_CHUNK = 64 * 1024


class ForwardProxy(ThreadedServer):
    def __init__(self, hosts: dict[str, tuple[str, int]] | None = None):
        self.hosts = dict(hosts or {})
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        super().__init__(_ProxyHandler, "ForwardProxy", forward=self)

    def route(self, host: str, port: int) -> tuple[str, int] | None:
        """Where a target really is: a mapped name, or itself if it is a loopback address."""
        mapped = self.hosts.get(f"{host}:{port}")
        if mapped is not None:
            return mapped
        try:
            return (host, port) if ipaddress.ip_address(host.strip("[]")).is_loopback else None
        except ValueError:
            return None

    def count(self, method: str | None = None, contains: str = "") -> int:
        with self._lock:
            return sum(1 for m, target in self.requests if (method is None or m == method) and contains in target)

    def _record(self, method: str, target: str) -> None:
        with self._lock:
            self.requests.append((method, target))


def _pipe(a: socket.socket, b: socket.socket) -> None:
    """Copy both ways until either side closes."""
    sockets = [a, b]
    while True:
        readable, _, broken = select.select(sockets, [], sockets, 60)
        if broken or not readable:
            return
        for source in readable:
            data = source.recv(PIPE_CHUNK)
            if not data:
                return
            (b if source is a else a).sendall(data)


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def _connect(self, host: str, port: int) -> socket.socket | None:
        route = self.server.forward.route(host, port)
        if route is None:
            self.send_error(502, f"this test proxy reaches only loopback and mapped names, not {host}")
            return None
        try:
            return socket.create_connection(route, timeout=10)
        except OSError:
            self.send_error(502, f"cannot reach {host}:{port}")
            return None

    def do_CONNECT(self) -> None:  # noqa: N802 - http.server's naming
        self.server.forward._record("CONNECT", self.path)
        host, _, port = self.path.rpartition(":")
        upstream = self._connect(host.strip("[]"), int(port or 443))
        if upstream is None:
            return
        with upstream:
            self.send_response(200, "Connection established")
            self.end_headers()
            self.wfile.flush()
            _pipe(self.connection, upstream)
        self.close_connection = True

    def _forward(self) -> None:
        """An absolute-URI request: sent on as origin-form, the answer copied back, then the connection closes."""
        self.server.forward._record(self.command, self.path)
        target = urlsplit(self.path)
        if target.scheme != "http" or not target.hostname:
            self.send_error(400, "absolute http:// URI expected")
            return
        upstream = self._connect(target.hostname, target.port or 80)
        if upstream is None:
            return
        path = (target.path or "/") + (f"?{target.query}" if target.query else "")
        lines = [f"{self.command} {path} HTTP/1.1"]
        lines += [f"{name}: {value}" for name, value in self.headers.items()
                  if name.lower() not in ("connection", "proxy-connection", "proxy-authorization", "keep-alive")]
        lines.append("Connection: close")
        with upstream:
            upstream.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                upstream.sendall(self.rfile.read(length))
            while data := upstream.recv(PIPE_CHUNK):
                self.wfile.write(data)
        self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = _forward
