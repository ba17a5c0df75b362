"""Connections that try to hold a server's sockets, as a hostile or broken client would.

``Flood(address, idle=N, slow=M)`` opens N connections that never send a byte and M that send a request one
byte every ``interval`` seconds (slowloris), and watches them all in one thread (epoll): when the server closed
each, and what it answered before closing, if anything. ``FdLimitedServer`` is the server held to a given
file-descriptor limit, as in a small container.
"""

from __future__ import annotations

import resource
import selectors
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from tests.support.services import ServerProcess

# Never completes: the header value grows one byte per drip.
SLOW_REQUEST = b"GET /health HTTP/1.1\r\nHost: flood\r\nX-Slow: "


@dataclass(eq=False)
class _Held:
    sock: socket.socket
    slow: bool
    opened_at: float
    sent: int = 0
    received: bytes = b""
    closed_at: float | None = None

    @property
    def status(self) -> int | None:
        line = self.received.split(b"\r\n", 1)[0].split(b" ")
        return int(line[1]) if len(line) > 1 and line[1].isdigit() else None


@dataclass
class FloodReport:
    opened: int
    refused: int  # connect() itself failed
    still_open: int
    answers: Counter = field(default_factory=Counter)  # status (or None: closed without an answer) → count
    slowest_close: float = 0.0  # seconds from open to the server's close, for those it closed
    # Per closed connection: (slow?, bytes it sent, status it got or None, seconds it was open).
    closed: list[tuple[bool, int, int | None, float]] = field(default_factory=list)


class Flood:
    def __init__(self, address: tuple[str, int], *, idle: int, slow: int, interval: float = 0.5):
        self.interval = interval
        self.held: list[_Held] = []
        self.refused = 0
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        for index in range(idle + slow):
            try:
                sock = socket.create_connection(address, timeout=5)
            except OSError:
                self.refused += 1
                continue
            sock.setblocking(False)
            held = _Held(sock, slow=index >= idle, opened_at=time.monotonic())
            self.held.append(held)
            self._selector.register(sock, selectors.EVENT_READ, held)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _drip(self) -> None:
        for held in self.held:
            if held.slow and held.closed_at is None:
                byte = SLOW_REQUEST[held.sent:held.sent + 1] or b"a"
                try:
                    held.sock.send(byte)
                    held.sent += 1
                except OSError:
                    self._closed(held)

    def _closed(self, held: _Held) -> None:
        if held.closed_at is None:
            held.closed_at = time.monotonic()
            self._selector.unregister(held.sock)

    def _run(self) -> None:
        next_drip = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_drip:
                with self._lock:
                    self._drip()
                next_drip = now + self.interval
            for key, _ in self._selector.select(timeout=min(0.05, max(next_drip - now, 0))):
                held: _Held = key.data
                with self._lock:
                    try:
                        data = held.sock.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if data:
                        held.received += data
                    else:
                        self._closed(held)

    def open_now(self) -> int:
        with self._lock:
            return sum(held.closed_at is None for held in self.held)

    def report(self) -> FloodReport:
        with self._lock:
            closed = [held for held in self.held if held.closed_at is not None]
            return FloodReport(
                opened=len(self.held), refused=self.refused, still_open=len(self.held) - len(closed),
                answers=Counter(held.status for held in closed),
                slowest_close=max((held.closed_at - held.opened_at for held in closed), default=0.0),
                closed=[(h.slow, h.sent, h.status, h.closed_at - h.opened_at) for h in closed])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for held in self.held:
            held.sock.close()
        self._selector.close()


class FdLimitedServer(ServerProcess):
    """The server started with other file-descriptor limits (soft, hard)."""

    def __init__(self, env: Mapping[str, str], log_path: Path, nofile: tuple[int, int]):
        self.preexec_fn = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile)
        super().__init__(env, log_path)
