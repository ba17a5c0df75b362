"""Small helpers for the error-path end-to-end tests (tests/test_e2e_errors.py).

- ``assert_json_error``: what a user must see on failure: the status, a JSON body
  ``{"error", "status", "message"}`` (never a tar), optional message words.
- ``assert_complete_tar``: a 200 whose body is exactly ``Content-Length`` bytes of tar.
- ``closed_port``: a loopback port nobody listens on.
- ``stray_files``: files in a store that do not carry a final, content-addressed name
  (temporary/partial files left behind).
- ``BackgroundGet``: a download running in a thread, with the time it answered.
- ``BackgroundStream``: the same, but watching the response as it streams (headers first, body cut short?).
- ``run_cli``: run ``python -m docker_http_passthrough ...`` to completion (or kill it).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support.downloads import Download, get
from tests.support.services import REPO_ROOT, child_env


def is_tar(body: bytes) -> bool:
    try:
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:") as archive:
            return bool(archive.getmembers())
    except tarfile.TarError:
        return False


def assert_json_error(result: Download, status: int, *, error: str | None = None,
                      error_prefix: str | None = None, words: tuple[str, ...] = ()) -> dict:
    """The answer is ``status`` with a JSON error body naming the cause; returns the body."""
    assert result.status == status, f"expected {status}, got {result.status}: {result.body[:500]!r}"
    assert result.headers.get("content-type", "").startswith("application/json"), result.headers
    assert not is_tar(result.body), "an error response must never be a tar"
    try:
        body = json.loads(result.body)
    except ValueError:
        raise AssertionError(f"error body is not JSON: {result.body[:500]!r}") from None
    assert set(body) >= {"error", "status", "message"}, body
    assert body["status"] == status, body
    if error is not None:
        assert body["error"] == error, body
    if error_prefix is not None:
        assert str(body["error"]).startswith(error_prefix), body
    for word in words:
        assert word.lower() in str(body["message"]).lower(), f"{word!r} not in message: {body}"
    return body


def assert_complete_tar(result: Download) -> None:
    """A 200 that is never short: exactly Content-Length bytes, and a readable tar."""
    assert result.status == 200, f"expected 200, got {result.status}: {result.body[:500]!r}"
    assert result.headers.get("content-type") == "application/x-tar", result.headers
    assert int(result.headers["content-length"]) == len(result.body)
    assert is_tar(result.body)


def closed_port() -> int:
    """A loopback TCP port that was just bound and released: connecting to it is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


# Final names in the store: <hex>, <hex>.tar, <hex>.json (blobs, layers, images, and any
# other content-addressed index). Anything else is a temporary file someone left behind.
_FINAL_NAME = re.compile(r"^[0-9a-f]{16,64}(\.tar|\.json)?$")


# Not content: markers of live readers/writers (eviction leases), named <hex>.<token> on purpose.
_MARKER_DIRS = {"leases", "locks"}  # lease files come and go; lock files stay by design (shared.locks.FileLocks)


def stray_files(root: Path) -> list[str]:
    root = Path(root)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and p.relative_to(root).parts[0] not in _MARKER_DIRS
                  and not _FINAL_NAME.fullmatch(p.name))


def files_in(directory: Path) -> list[str]:
    directory = Path(directory)
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


class BackgroundGet:
    """``get(url)`` in a daemon thread; ``.result`` and ``.answered_at`` (time.monotonic) once done."""

    def __init__(self, url: str, *, auth: tuple[str, str] | None = None, timeout: float = 120.0,
                 method: str = "GET"):
        self.result: Download | None = None
        self.error: Exception | None = None
        self.answered_at: float | None = None
        self._thread = threading.Thread(target=self._run, args=(url, auth, timeout, method), daemon=True)
        self._thread.start()

    def _run(self, url: str, auth: tuple[str, str] | None, timeout: float, method: str) -> None:
        try:
            self.result = get(url, auth=auth, timeout=timeout, method=method)
        except Exception as exc:  # noqa: BLE001 - reported by join()
            self.error = exc
        finally:
            self.answered_at = time.monotonic()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout: float) -> Download:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"the download did not answer within {timeout:.0f}s")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class BackgroundStream:
    """A GET read chunk by chunk in a daemon thread.

    ``status``/``headers`` once the headers arrived (``headers_at``, after ``started_at``), ``received`` bytes so
    far (``body``, their ``sha256``, the longest wait between two pieces in ``largest_gap``), and when the body
    ended (``ended_at``) with ``error`` set if the connection broke before Content-Length bytes came.
    """

    def __init__(self, url: str, *, auth: tuple[str, str] | None = None, timeout: float = 120.0):
        self.status: int | None = None
        self.headers: httpx.Headers | None = None
        self.started_at = time.monotonic()
        self.headers_at: float | None = None
        self.received = 0
        self.body = bytearray()
        self.largest_gap = 0.0
        self.sha256 = hashlib.sha256()
        self.ended_at: float | None = None
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._run, args=(url, auth, timeout), daemon=True)
        self._thread.start()

    def _run(self, url: str, auth: tuple[str, str] | None, timeout: float) -> None:
        try:
            with httpx.Client(timeout=timeout, trust_env=False) as client, \
                    client.stream("GET", url, auth=auth) as response:
                self.status, self.headers = response.status_code, response.headers
                self.headers_at = last = time.monotonic()
                for chunk in response.iter_raw():
                    now = time.monotonic()
                    self.largest_gap, last = max(self.largest_gap, now - last), now
                    self.body += chunk
                    self.received += len(chunk)
                    self.sha256.update(chunk)
        except Exception as exc:  # noqa: BLE001 - a broken body is what some tests expect
            self.error = exc
        finally:
            self.ended_at = time.monotonic()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"the response did not end within {timeout:.0f}s")


@dataclass
class CliRun:
    returncode: int | None  # None: still running after the timeout (then killed)
    stdout: str
    stderr: str
    seconds: float


def run_cli(args: list[str], env: Mapping[str, str], timeout: float = 15.0) -> CliRun:
    """``python -m docker_http_passthrough <args>`` with a minimal environment plus ``env``."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "docker_http_passthrough", *args], cwd=REPO_ROOT,
                            env=child_env(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()  # our own child, by its handle
        stdout, stderr = proc.communicate()
        code = None
    return CliRun(code, stdout, stderr, time.monotonic() - started)
