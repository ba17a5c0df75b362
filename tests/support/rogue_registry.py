"""A registry that lies: it serves whatever manifest and config a test gives it and has none of the blobs.

CNCF distribution refuses a manifest whose blobs it does not hold, so an attacker who runs their own registry
software is simulated here: it names a private layer's digests without having its content.
"""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler

from tests.support.images import sha
from tests.support.lifecycle import ThreadedServer


class RogueRegistry(ThreadedServer):
    def __init__(self, repository: str, tag: str, manifest: bytes, media_type: str, blobs: dict[str, bytes]):
        self.repository = repository
        self.tag = tag
        self.manifest = manifest
        self.media_type = media_type
        self.digest = sha(manifest)
        self.blobs = blobs  # what it really holds (e.g. its config), by digest
        self.requests: list[tuple[str, str, int]] = []
        super().__init__(_RogueHandler, "RogueRegistry", rogue=self)

    def answer(self, path: str) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) for a GET or HEAD of ``path``."""
        if path == "/v2/":
            return 200, {"Content-Type": "application/json"}, b"{}"
        if path in (f"/v2/{self.repository}/manifests/{self.tag}", f"/v2/{self.repository}/manifests/{self.digest}"):
            return 200, {"Content-Type": self.media_type, "Docker-Content-Digest": self.digest}, self.manifest
        if path.startswith(f"/v2/{self.repository}/blobs/"):
            blob = self.blobs.get(path.rsplit("/", 1)[1])
            if blob is not None:
                return 200, {"Content-Type": "application/octet-stream"}, blob
        return 404, {"Content-Type": "application/json"}, b'{"errors":[]}'


class _RogueHandler(BaseHTTPRequestHandler):
    def _answer(self, body: bool) -> None:
        rogue: RogueRegistry = self.server.rogue  # type: ignore[attr-defined]
        path = self.path.split("?")[0]
        status, headers, data = rogue.answer(path)
        rogue.requests.append((self.command, path, status))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._answer(True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(False)

    def log_message(self, *args: object) -> None:
        pass
