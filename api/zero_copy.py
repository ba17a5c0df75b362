"""Zero-copy file bytes: the ASGI `http.response.zerocopysend` extension, served by our uvicorn protocol.

uvicorn has no such extension, and uvloop no `loop.sendfile` (it raises NotImplementedError) nor `add_writer` on a
transport's socket (RuntimeError: the fd is used by the transport). So, per connection, `SocketSender` keeps a
duplicate of the client socket's descriptor and calls os.sendfile on it — the page cache goes to the socket with
no copy through Python — only when the transport has nothing buffered: the transport's write limits are set to
(0, 0) on the first zero-copy send, so any byte it holds pauses the response until written, and transport writes
and sendfile never interleave. When the socket is full, it waits for it to be writable with `add_writer` on the
duplicate; the protocol's send timeout (SEND_TIMEOUT) watches these waits as it watches a paused transport.

Message: {"type": "http.response.zerocopysend", "file": <int fd or object with fileno()>, "offset": int,
"count": int, "more_body": bool} — offset and count are required here; the file is not moved. Once the client is
gone, a zerocopysend raises OSError (a response that goes on sending would never learn it otherwise).
"""

from __future__ import annotations

import asyncio
import errno
import os
from typing import Any

from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from docker_http_passthrough.shared.archive_reader import ArchiveSourceError

ZERO_COPY = "http.response.zerocopysend"
_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN, errno.EBADF)


class SourceEnded(ArchiveSourceError):
    """The file had fewer bytes than the message asked for (truncated meanwhile): the response must be cut."""


class SocketSender:
    """sendfile onto one connection's socket, through a descriptor of our own (the transport may close its own at
    any time, and a number it freed may be reused by the next open())."""

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop, on_wait: Any):
        self.transport = transport
        self.loop = loop
        self.on_wait = on_wait  # called when a send has to wait for the client: the send timeout starts
        self.fd = os.dup(transport.get_extra_info("socket").fileno())
        self.waiter: asyncio.Future | None = None
        self.sent = 0  # bytes handed to the kernel: progress, for the send timeout
        # From now on a byte in the transport's buffer pauses the response until it is written (see above).
        transport.set_write_buffer_limits(high=0, low=0)

    @property
    def waiting(self) -> bool:
        return self.waiter is not None

    async def send(self, file: int, offset: int, count: int) -> None:
        while count:
            if self.fd < 0 or self.transport.is_closing():
                raise ConnectionResetError(errno.ECONNRESET, "the client connection is closed")
            try:
                n = os.sendfile(self.fd, file, offset, count)
            except BlockingIOError:
                await self._writable()
                continue
            except OSError as exc:
                if exc.errno not in _GONE:
                    raise
                self.transport.abort()
                raise ConnectionResetError(exc.errno, "the client connection is closed") from exc
            if n == 0:
                raise SourceEnded(f"a layer file ended {count} bytes early, at offset {offset}")
            offset += n
            count -= n
            self.sent += n
            if count:  # the socket took what it had room for: trying again now would only say EAGAIN
                await self._writable()

    async def _writable(self) -> None:
        self.waiter = self.loop.create_future()
        self.loop.add_writer(self.fd, self._wake)
        self.on_wait()
        try:
            await self.waiter
        finally:
            if self.waiter is not None:  # not woken: cancelled, or the connection closed under it
                self.waiter = None
                if self.fd >= 0:
                    self.loop.remove_writer(self.fd)

    def _wake(self) -> None:
        # At once, not when the send resumes: the socket stays writable, and the loop would call again.
        self.loop.remove_writer(self.fd)
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        """The connection is gone (or being cut): wake a waiting send with an error, let the socket go."""
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError(errno.ECONNRESET, "the client connection is closed"))
        if self.fd >= 0:
            self.loop.remove_writer(self.fd)
            os.close(self.fd)
            self.fd = -1


class ZeroCopyCycle(RequestResponseCycle):
    """uvicorn's request/response cycle plus `http.response.zerocopysend`. GuardedProtocol turns each new cycle
    into one of these (uvicorn builds the cycle inside on_headers_complete and offers no hook for its class)."""

    protocol: Any

    async def send(self, message: Any) -> None:
        if message["type"] != ZERO_COPY:
            await super().send(message)
            return
        if not self.response_started or self.response_complete or self.chunked_encoding is not False:
            raise RuntimeError("http.response.zerocopysend needs a started response with a Content-Length")
        count = message["count"]
        if count > self.expected_content_length:
            raise RuntimeError("Response content longer than Content-Length")
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            raise ConnectionResetError(errno.ECONNRESET, "the client connection is closed")
        if self.scope["method"] != "HEAD" and count:
            file = message["file"]
            await self.protocol.socket_sender().send(file if isinstance(file, int) else file.fileno(),
                                                     message["offset"], count)
        self.expected_content_length -= count
        if not message.get("more_body", False):
            await super().send({"type": "http.response.body", "body": b"", "more_body": False})
