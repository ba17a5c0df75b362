"""What one client connection may hold, and for how long: uvicorn's httptools protocol with limits (per process).

uvicorn bounds none of this by itself: it has no header-read timeout, no cap on header bytes (llhttp buffers a
header line of any length), no end for a response nobody reads, and its only connection limit answers a plain
503 to everyone, /health included. GuardedProtocol adds:

- HEADER_TIMEOUT: a request line and headers must arrive within this long of the connection opening, or of the
  first byte of the next request on a kept-alive one. Else 408 (JSON) if any byte came, a silent close if none.
- IDLE_TIMEOUT between requests is uvicorn's keep-alive timeout.
- MAX_HEADER_BYTES: a request line plus headers larger than this gets 431.
- SEND_TIMEOUT: a response whose unsent bytes have not moved for this long is aborted (the client stopped
  reading, or vanished without a FIN: TCP would probe a zero window forever).
- MAX_CONNECTIONS: past it, the connection that has waited longest for a request is closed to make room
  (never one with a request in progress). With nobody waiting, the newcomer is still read, and answered 503
  with Retry-After unless it asks for /health. Past MAX_CONNECTIONS plus a reserve it is closed at once: file
  descriptors are what keeps the process answering.

Every answer written here has the API's error shape, {"error", "status", "message"}. The limits come in with a
functools.partial over the class. Each API process (`serve --workers N`) has its own limits.

The protocol also offers the `http.response.zerocopysend` extension (api.zero_copy): its sends are watched by
SEND_TIMEOUT like the transport's, and count for MAX_CONNECTIONS' file descriptors (a duplicate socket).
"""

from __future__ import annotations

import json
import logging
import resource
import socket
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from docker_http_passthrough.api.zero_copy import ZERO_COPY, SocketSender, ZeroCopyCycle
from docker_http_passthrough.shared.errors import PassthroughError
from docker_http_passthrough.shared.settings import Settings

log = logging.getLogger("docker_http_passthrough.api")

# nginx answers 400/431 past 32 KiB of headers (4 x 8k buffers); a switch sends a few hundred bytes.
MAX_HEADER_BYTES = 32 << 10
# Seconds a client is told to wait when the connection cap turns it away.
OVERLOAD_RETRY_AFTER = 10
HEALTH_PATH = "/health"
# Offset of tcpi_bytes_acked (u64) in Linux's struct tcp_info (since 4.1).
TCPI_BYTES_ACKED = 120


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float
    send_timeout: float
    max_connections: int
    max_header_bytes: int = MAX_HEADER_BYTES

    @property
    def ceiling(self) -> int:
        """Open connections past which a newcomer is closed unread: the cap plus room to answer 503s and /health."""
        return self.max_connections + max(16, self.max_connections // 8)


def connection_cap(fd_limit: int) -> int:
    """MAX_CONNECTIONS by default: a download holds three descriptors — its socket, the socket's duplicate for
    zero-copy sends (api.zero_copy), and one layer file at a time (each closed once passed) — so a third of
    what is left after a reserve (upstream sockets, the store's files, the preparations')."""
    return max(32, (fd_limit - min(256, fd_limit // 4)) // 3)


def limits_from(settings: Settings, fd_limit: int) -> ConnectionLimits:
    return ConnectionLimits(settings.header_timeout, settings.send_timeout,
                            settings.max_connections or connection_cap(fd_limit))


def current_fd_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_fd_limit() -> int:
    """Raise the soft file-descriptor limit to the hard one where the system allows it; returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # Linux caps it at fs.nr_open anyway
        try:
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("file descriptors: soft limit raised from %d to %d", soft, target)
            return target
        except (ValueError, OSError) as exc:
            log.warning("file descriptors: could not raise the soft limit from %d to %d (%s)", soft, target, exc)
            return soft
    log.info("file descriptors: limit %d (the hard limit)", soft)
    return soft


def error_bytes(status: int, code: str, message: str, default_headers: list[tuple[bytes, bytes]],
                extra: dict[str, str] | None = None) -> bytes:
    """A whole HTTP/1.1 error response that closes the connection."""
    body = json.dumps(PassthroughError(message, status=status, code=code).to_dict()).encode()
    lines = [STATUS_LINE[status]]
    headers = [*default_headers, (b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    lines += [name + b": " + value + b"\r\n" for name, value in headers]
    return b"".join([*lines, b"\r\n", body])


class _WaitingRoom:
    """Per server (so per process): connections waiting for a request, longest-waiting first."""

    def __init__(self) -> None:
        self.queue: OrderedDict[GuardedProtocol, None] = OrderedDict()
        self.closing = 0  # closed by us, not gone yet: they no longer count against the cap
        self.shed = self.refused = 0
        self.noted_at = 0.0

    def note(self, limits: ConnectionLimits) -> None:
        """One log line per 10 s at most, however hard the flood."""
        now = time.monotonic()
        if now - self.noted_at >= 10 and (self.shed or self.refused):
            log.warning("connection cap MAX_CONNECTIONS=%d reached: closed %d waiting connections, refused %d new "
                        "ones since the last note", limits.max_connections, self.shed, self.refused)
            self.noted_at, self.shed, self.refused = now, 0, 0


_rooms: WeakKeyDictionary[Any, _WaitingRoom] = WeakKeyDictionary()


class QuietRepeats(logging.Filter):
    """uvicorn warns once per malformed request: a hostile client would fill the log. One line per 10 s each,
    with how many were left out; and no advice to install a WebSocket library (we serve none on purpose)."""

    REPEATED = ("Invalid HTTP request received.", "Unsupported upgrade request.")

    def __init__(self) -> None:
        super().__init__()
        self.last: dict[str, float] = {}
        self.dropped: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg if isinstance(record.msg, str) else ""
        if message.startswith("No supported WebSocket library"):
            return False
        if message not in self.REPEATED:
            return True
        now = time.monotonic()
        if now - self.last.get(message, -1e9) < 10:
            self.dropped[message] = self.dropped.get(message, 0) + 1
            return False
        self.last[message] = now
        dropped = self.dropped.pop(message, 0)
        if dropped:
            record.msg = f"{message} ({dropped} more in the last 10 s not logged)"
        return True


def _quiet_uvicorn_once() -> None:
    """Per process (uvicorn's `--workers` start fresh processes, without the parent's log filters)."""
    uvicorn_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, QuietRepeats) for f in uvicorn_log.filters):
        uvicorn_log.addFilter(QuietRepeats())


class _HealthOnly:
    """The app for a connection admitted past the cap: /health as usual, anything else a 503 it may retry."""

    def __init__(self, app: Any, max_connections: int):
        self.app = app
        self.max_connections = max_connections

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] == HEALTH_PATH:
            await self.app(scope, receive, send)
            return
        error = PassthroughError(f"the server has MAX_CONNECTIONS={self.max_connections} connections open, all busy; "
                                 f"retry in {OVERLOAD_RETRY_AFTER} s", status=503, code="overloaded")
        body = json.dumps(error.to_dict()).encode()
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(OVERLOAD_RETRY_AFTER).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class GuardedProtocol(HttpToolsProtocol):
    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any], _loop: Any = None, *,
                 limits: ConnectionLimits):
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self.room = _rooms.get(server_state)
        if self.room is None:  # the first connection of this server (so of this process)
            self.room = _rooms[server_state] = _WaitingRoom()
            _quiet_uvicorn_once()
        self.header_timer: Any = None
        self.header_bytes = 0  # of the request being read, until its headers are complete
        self.closed_by_us = False
        self.oversized = False
        self.send_timer: Any = None
        self.resumes = 0  # times the client drained the write buffer: progress
        self.progress_mark = (0, 0, 0, 0)
        self.sender: SocketSender | None = None  # zero-copy sends on this connection, once one happened

    # -- admission -------------------------------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        open_now = len(self.connections) - self.room.closing
        if open_now > self.limits.max_connections and not self._shed_longest_waiting():
            if open_now > self.limits.ceiling:
                self.room.refused += 1
                self.room.note(self.limits)
                self.closed_by_us = True
                self.room.closing += 1
                transport.abort()
                return
            self.app = _HealthOnly(self.app, self.limits.max_connections)
        self._await_request()
        self.header_timer = self.loop.call_later(self.limits.header_timeout, self._header_timeout)

    def _shed_longest_waiting(self) -> bool:
        for victim in self.room.queue:
            if victim is not self:
                self.room.shed += 1
                self.room.note(self.limits)
                if victim.header_bytes:
                    victim._answer(503, "overloaded", "the server is at its connection cap and closed this "
                                   "connection, which had not sent a whole request", {"Retry-After": "1"})
                else:
                    victim._close()
                return True
        return False

    # -- reading a request -----------------------------------------------------------------------------------

    def _await_request(self) -> None:
        self.header_bytes = 0
        self.room.queue[self] = None
        self.room.queue.move_to_end(self)

    def _request_arrived(self) -> None:
        self.room.queue.pop(self, None)
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def data_received(self, data: bytes) -> None:
        if self.closed_by_us:
            return
        waiting = self in self.room.queue
        if waiting:
            if self.header_timer is None:  # first byte of the next request on a kept-alive connection
                self.header_timer = self.loop.call_later(self.limits.header_timeout, self._header_timeout)
            self.header_bytes += len(data)
        super().data_received(data)
        if waiting and self in self.room.queue and self.header_bytes > self.limits.max_header_bytes:
            self.oversized = True  # and still incomplete: llhttp would buffer a header line of any length
            self.send_400_response("")

    def on_headers_complete(self) -> None:
        self._request_arrived()
        if len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers) > \
                self.limits.max_header_bytes:
            self.oversized = True
            raise ValueError("headers too large")  # the parser stops; send_400_response answers 431
        self.scope["extensions"] = {ZERO_COPY: {}}  # type: ignore[typeddict-unknown-key]
        super().on_headers_complete()
        if type(self.cycle) is RequestResponseCycle:  # its task has not run yet: it sends through the subclass
            self.cycle.__class__ = ZeroCopyCycle
            self.cycle.protocol = self  # type: ignore[attr-defined]

    def socket_sender(self) -> SocketSender:
        if self.sender is None:
            self.sender = SocketSender(self.transport, self.loop, self._sender_waits)
        return self.sender

    def _sender_waits(self) -> None:
        if self.send_timer is None and self.limits.send_timeout:
            self._arm_send_timer()

    def on_response_complete(self) -> None:
        cycle = self.cycle
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if cycle is not None and cycle.more_body and cycle is self.cycle:
            self._close()  # answered before its body came: what follows would be read as a new request
        elif self.cycle is None or self.cycle.response_complete:  # not a pipelined request already parsed
            self._await_request()

    def _header_timeout(self) -> None:
        self.header_timer = None
        if self in self.room.queue:
            if self.header_bytes:
                self._answer(408, "request_timeout", f"the request headers did not arrive within HEADER_TIMEOUT="
                             f"{self.limits.header_timeout:g}s")
            else:
                self._close()

    def timeout_keep_alive_handler(self) -> None:
        self._close()

    def send_400_response(self, msg: str) -> None:
        if self.oversized:
            self._answer(431, "headers_too_large",
                         f"the request line and headers are larger than {self.limits.max_header_bytes} bytes")
        else:
            self._answer(400, "bad_request", "the request is not valid HTTP/1.1 (request line or headers malformed)")

    # -- a response the client does not read -----------------------------------------------------------------

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.send_timer is None and self.limits.send_timeout:
            self._arm_send_timer()

    def resume_writing(self) -> None:
        super().resume_writing()
        self.resumes += 1

    def _progress(self) -> tuple[int, int, int, int]:
        """(times drained, -bytes still in our buffer, bytes sent with sendfile, bytes the peer acknowledged): any
        rise is progress. The kernel's send buffer (megabytes) takes our bytes back only once half of it is free,
        so for a slow reader the acknowledged count (TCP_INFO) is what moves; where it is unknown, the others
        still tell."""
        acked = 0
        try:
            info = self.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
            acked = struct.unpack_from("Q", info, TCPI_BYTES_ACKED)[0]
        except (AttributeError, OSError, struct.error):
            pass
        return (self.resumes, -self.transport.get_write_buffer_size(), self.sender.sent if self.sender else 0,
                acked)

    def _arm_send_timer(self) -> None:
        self.progress_mark = self._progress()
        self.send_timer = self.loop.call_later(self.limits.send_timeout, self._check_sending)

    def _check_sending(self) -> None:
        self.send_timer = None
        if self.transport.is_closing() or not (self.flow.write_paused or (self.sender and self.sender.waiting)):
            return
        if any(now > before for now, before in zip(self._progress(), self.progress_mark)):
            self._arm_send_timer()
            return
        log.info("closing the connection of %s: it read nothing of its response for SEND_TIMEOUT=%gs",
                 self.client[0] if self.client else "?", self.limits.send_timeout)
        self._mark_closed()
        self.transport.abort()
        if self.sender is not None:
            self.sender.close()  # its descriptor would keep the socket open

    # -- ending ----------------------------------------------------------------------------------------------

    def _answer(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        """Write an error and close; if a response is already going out, only close (never mix the two)."""
        if not self.transport.is_closing() and (self.cycle is None or not self.cycle.response_started
                                                or self.cycle.response_complete):
            self.transport.write(error_bytes(status, code, message, self.server_state.default_headers, headers))
        self._close()

    def _mark_closed(self) -> None:
        if not self.closed_by_us:
            self.closed_by_us = True
            self.room.closing += 1
        self._request_arrived()

    def _close(self) -> None:
        self._mark_closed()
        if not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.sender is not None:
            self.sender.close()
        self._request_arrived()
        if self.send_timer is not None:
            self.send_timer.cancel()
            self.send_timer = None
        if self.closed_by_us:
            self.room.closing -= 1
            self.closed_by_us = False
