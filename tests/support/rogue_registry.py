"""A registry that lies or misbehaves: it serves whatever manifest and config a test gives it and has none of the
blobs, and any path can be given an answer of its own (a huge body, a drip, a redirect, a challenge).

CNCF distribution refuses a manifest whose blobs it does not hold, so an attacker who runs their own registry
software is simulated here: it names a private layer's digests without having its content, or it tries to make
the server use up memory, time or connections.

- ``answers[path] = Answer(status, headers, body)``: ``body`` is bytes, or a ``Huge`` (``size`` bytes made up on
  the fly, chunked, so nothing tells the size up front) or a ``Drip`` (one byte every ``every`` seconds).
- ``requests``: (method, path, status) as they came; ``served``: per request, the body bytes written and when
  the client went away (``closed_at``, time.monotonic; None while it stayed).
"""

from __future__ import annotations

import select
import socket
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler

from tests.support.images import sha
from tests.support.lifecycle import ThreadedServer


@dataclass(frozen=True)
class Huge:
    size: int
    head: bytes = b'{"schemaVersion": 2, "padding": "'  # what a manifest would start with
    fill: bytes = b"a"


@dataclass(frozen=True)
class Drip:
    data: bytes
    every: float = 2.0


@dataclass(frozen=True)
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | Huge | Drip = b""


@dataclass
class Served:
    method: str
    path: str
    started: float
    sent: int = 0
    closed_at: float | None = None  # when the client hung up, if it did


class RogueRegistry(ThreadedServer):
    def __init__(self, repository: str, tag: str, manifest: bytes, media_type: str, blobs: dict[str, bytes],
                 *, host: str = "127.0.0.1"):
        self.repository = repository
        self.tag = tag
        self.manifest = manifest
        self.media_type = media_type
        self.digest = sha(manifest)
        self.blobs = blobs  # what it really holds (e.g. its config), by digest
        self.answers: dict[str, Answer] = {}
        self.requests: list[tuple[str, str, int]] = []
        self.served: list[Served] = []
        super().__init__(_RogueHandler, "RogueRegistry", bind=host, rogue=self)

    def blob_path(self, digest: str) -> str:
        return f"/v2/{self.repository}/blobs/{digest}"

    def manifest_path(self, reference: str | None = None) -> str:
        return f"/v2/{self.repository}/manifests/{reference or self.tag}"

    def answer(self, path: str) -> Answer:
        if path in self.answers:
            return self.answers[path]
        if path == "/v2/":
            return Answer(200, {"Content-Type": "application/json"}, b"{}")
        if path in (self.manifest_path(), self.manifest_path(self.digest)):
            return Answer(200, {"Content-Type": self.media_type, "Docker-Content-Digest": self.digest}, self.manifest)
        if path.startswith(f"/v2/{self.repository}/blobs/"):
            blob = self.blobs.get(path.rsplit("/", 1)[1])
            if blob is not None:
                return Answer(200, {"Content-Type": "application/octet-stream"}, blob)
        return Answer(404, {"Content-Type": "application/json"}, b'{"errors":[]}')


class _RogueHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self, with_body: bool) -> None:
        rogue: RogueRegistry = self.server.rogue  # type: ignore[attr-defined]
        path = self.path.split("?")[0]
        answer = rogue.answer(path)
        rogue.requests.append((self.command, path, answer.status))
        served = Served(self.command, path, time.monotonic())
        rogue.served.append(served)
        body = answer.body
        self.send_response(answer.status)
        for name, value in answer.headers.items():
            self.send_header(name, value)
        if isinstance(body, Huge):
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(len(body.data if isinstance(body, Drip) else body)))
        self.end_headers()
        if not with_body:
            return
        try:
            self._body(body, served)
        except OSError:
            served.closed_at = time.monotonic()
            self.close_connection = True

    def _body(self, body: bytes | Huge | Drip, served: Served) -> None:
        if isinstance(body, bytes):
            self.wfile.write(body)
            served.sent += len(body)
        elif isinstance(body, Huge):
            piece = body.fill * (64 << 10)
            self._chunk(body.head, served)
            while served.sent < body.size:
                self._chunk(piece[: body.size - served.sent], served)
            self.wfile.write(b"0\r\n\r\n")
        else:
            for index in range(len(body.data)):
                self.wfile.write(body.data[index:index + 1])
                self.wfile.flush()
                served.sent += 1
                # Wait for the next byte, watching for the client hanging up meanwhile.
                readable, _, _ = select.select([self.connection], [], [], body.every)
                if readable and not self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):  # b"": closed
                    raise ConnectionResetError("the client hung up")

    def _chunk(self, data: bytes, served: Served) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        served.sent += len(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._answer(True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(False)

    def log_message(self, *args: object) -> None:
        pass
