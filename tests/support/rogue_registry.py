"""A registry that lies: it serves whatever manifest and config a test gives it and has none of the blobs.

CNCF distribution refuses a manifest whose blobs it does not hold, so an attacker who runs their own registry
software is simulated here: it names a private layer's digests without having its content.
"""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class RogueRegistry:
    def __init__(self, repository: str, tag: str, manifest: bytes, media_type: str, blobs: dict[str, bytes]):
        self.repository = repository
        self.tag = tag
        self.manifest = manifest
        self.media_type = media_type
        self.digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        self.blobs = blobs  # what it really holds (e.g. its config), by digest
        self.requests: list[tuple[str, str, int]] = []
        rogue = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, body: bool) -> None:
                path = self.path.split("?")[0]
                status, headers, data = 404, {"Content-Type": "application/json"}, b'{"errors":[]}'
                if path == "/v2/":
                    status, data = 200, b"{}"
                elif path in (f"/v2/{rogue.repository}/manifests/{rogue.tag}",
                              f"/v2/{rogue.repository}/manifests/{rogue.digest}"):
                    status, data = 200, rogue.manifest
                    headers = {"Content-Type": rogue.media_type, "Docker-Content-Digest": rogue.digest}
                elif path.startswith(f"/v2/{rogue.repository}/blobs/"):
                    blob = rogue.blobs.get(path.rsplit("/", 1)[1])
                    if blob is not None:
                        status, data = 200, blob
                        headers = {"Content-Type": "application/octet-stream"}
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

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "RogueRegistry":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
