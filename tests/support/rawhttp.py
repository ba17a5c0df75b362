"""HTTP/1.1 over a bare socket, for requests no client library would send (malformed, slow, half-finished), and
the server-side figures hostile-client tests look at (resident memory, open file descriptors).

- ``exchange``: send bytes, read one response (or see the connection close or time out);
  ``read_response``: one whole response from a socket already open.
- ``SlowReader``: a GET whose body is read a little at a time, on a small receive buffer.
- ``memory_kib``/``open_fds``: from /proc of the server process.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RawResult:
    status: int | None = None  # None: no response at all
    reason: str = ""
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names; repeated names joined with ", "
    body: bytes = b""
    seconds: float = 0.0
    ended: str = "complete"  # complete | closed (before a response / mid-body) | timeout | reset
    chunked: bool = False

    def json(self) -> dict:
        return json.loads(self.body)


def _read_head(sock: socket.socket, buffer: bytearray) -> int | None:
    """Read until the end of the response head; returns its end offset in buffer (None: EOF first)."""
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            return end + 4
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buffer += chunk


def _parse_head(head: bytes, result: RawResult) -> None:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    result.status = int(parts[1])
    result.reason = parts[2] if len(parts) > 2 else ""
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            value = value.strip()
            result.headers[name] = f"{result.headers[name]}, {value}" if name in result.headers else value


def _read_body(sock: socket.socket, buffer: bytearray, result: RawResult, head_only: bool) -> None:
    length = result.headers.get("content-length")
    result.chunked = "chunked" in result.headers.get("transfer-encoding", "").lower()
    if head_only or result.status in (204, 304) or (result.status or 0) < 200:
        wanted = 0
    elif length is not None and length.isdigit():
        wanted = int(length)
    else:
        wanted = None  # until the server closes (chunked bodies are read whole, then flagged)
    while wanted is None or len(buffer) < wanted:
        chunk = sock.recv(1 << 20)
        if not chunk:
            if wanted is not None:
                result.ended = "closed"
            break
        buffer += chunk
    result.body = bytes(buffer if wanted is None else buffer[:wanted])


def read_response(sock: socket.socket, *, head_only: bool = False, into: RawResult | None = None) -> RawResult:
    """Read one whole response from a connected socket (however many segments it arrives in)."""
    result = into if into is not None else RawResult()
    buffer = bytearray()
    while result.status is None or result.status == 100:  # skip a 100 Continue
        result.headers.clear()
        end = _read_head(sock, buffer)
        if end is None:
            result.ended = "closed"
            result.status = None
            return result
        _parse_head(bytes(buffer[:end]), result)
        del buffer[:end]
    _read_body(sock, buffer, result, head_only)
    return result


def exchange(address: tuple[str, int], data: bytes, *, timeout: float = 10.0, head_only: bool = False,
             source: str | None = None) -> RawResult:
    """Send ``data`` on a fresh connection and read one response; never raises for what the server does."""
    result = RawResult()
    started = time.monotonic()
    try:
        with socket.create_connection(address, timeout=timeout,
                                      source_address=(source, 0) if source else None) as sock:
            sock.settimeout(timeout)
            try:
                sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server may answer and close before reading everything: read what it said
            read_response(sock, head_only=head_only, into=result)
    except socket.timeout:
        result.ended = "timeout"
    except ConnectionResetError:
        result.ended = "reset"
    finally:
        result.seconds = time.monotonic() - started
    return result


def request_bytes(method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"",
                  host: str = "127.0.0.1") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class SlowReader:
    """GET ``path`` and read the body ``step`` bytes every ``pause`` seconds on a small receive buffer, in a thread;
    ``digest``/``received`` when done, ``error`` if the connection broke."""

    def __init__(self, address: tuple[str, int], path: str, *, step: int = 64 << 10, pause: float = 0.05):
        self.status: int | None = None
        self.length: int | None = None
        self.received = 0
        self.error: str | None = None
        self.digest: str | None = None
        self._thread = threading.Thread(target=self._run, args=(address, path, step, pause), daemon=True)
        self._thread.start()

    def _run(self, address: tuple[str, int], path: str, step: int, pause: float) -> None:
        hasher = hashlib.sha256()
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
                sock.settimeout(30)
                sock.connect(address)
                sock.sendall(request_bytes("GET", path))
                buffer = bytearray()
                end = _read_head(sock, buffer)
                if end is None:
                    raise ConnectionError("closed before the response head")
                head = RawResult()
                _parse_head(bytes(buffer[:end]), head)
                self.status, self.length = head.status, int(head.headers["content-length"])
                pending = bytes(buffer[end:])
                while True:
                    hasher.update(pending)
                    self.received += len(pending)
                    if self.received >= self.length:
                        break
                    time.sleep(pause)
                    pending = sock.recv(step)
                    if not pending:
                        raise ConnectionError(f"closed after {self.received} of {self.length} bytes")
            self.digest = hasher.hexdigest()
        except (OSError, ValueError, KeyError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"the slow download did not end within {timeout:.0f}s")


def _status_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise KeyError(name)


def memory_kib(pid: int) -> tuple[int, int]:
    """(resident now, peak resident) of a process, KiB."""
    return _status_field(pid, "VmRSS"), _status_field(pid, "VmHWM")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def fd_limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise KeyError("Max open files")
