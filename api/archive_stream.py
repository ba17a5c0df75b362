"""The one way an archive's bytes leave the server, warm or early-start: one `ArchiveReader`, pieces sized by
the `PiecePacer`, and leases on every layer (the process's `LeaseBook`) so no eviction removes one mid-stream.

Each piece goes out as it is read (a memoryview) or, when the server can send files itself (`zero_copy`: the
`http.response.zerocopysend` extension of api.connections), as the reader's parts: the in-memory members as
memory, the layer bytes in the page cache as `FileSpan`s the server sends with sendfile. Either way a piece is
sent before the next is read, so the pacer sees how fast the client takes them.

An early-start stream passes a gate (see `early_gate`) that says how far the bytes may go now and lends the
reader the file a layer is being inflated into, and holds the end back until the whole image verified. A layer
file that is missing or not the planned size raises ArchiveSourceError at once: the server then cuts the
connection, and the client holds a short file, never a wrong one.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable, Mapping, Protocol, Sequence

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from docker_http_passthrough.api.lease_book import LeaseBook
from docker_http_passthrough.api.pacer import PiecePacer
from docker_http_passthrough.api.zero_copy import ZERO_COPY
from docker_http_passthrough.shared.archive import ArchivePlan
from docker_http_passthrough.shared.archive_reader import ArchiveReader, FileSpan


class Gate(Protocol):
    async def __call__(self, position: int, reader: ArchiveReader) -> int:
        """Wait until bytes from `position` may go out (lending `reader` what to read them from); return where
        that permission ends."""

    def close(self) -> None:
        """The stream ended: release what the gate holds."""


async def stream_archive(leases: LeaseBook, plan: ArchivePlan, diff_ids: Sequence[str], start: int, end: int,
                         gate: Gate | None = None, zero_copy: bool = False) -> AsyncIterator[memoryview | FileSpan]:
    """Bytes [start, end) of the archive."""
    loop = asyncio.get_running_loop()
    pacer = PiecePacer(loop.time(), zero_copy)
    try:
        async with leases.hold(diff_ids):
            with ArchiveReader(plan) as reader:
                position = start
                while position < end:
                    allowed = end
                    if gate is not None:
                        waiting_since = loop.time()
                        allowed = min(end, await gate(position, reader))
                        pacer.waited(loop.time() - waiting_since)
                    stop = min(position + pacer.piece, allowed)
                    pieces = await reader.parts(position, stop) if zero_copy else (await reader.read(position, stop),)
                    sent_at = loop.time()
                    for piece in pieces:
                        yield piece  # returns once the server has handed it to the socket
                    reader.release_before(stop)
                    pacer.sent(stop - position, sent_at, loop.time())
                    position = stop
                    # A turn for the other connections (and for the cancellation of this one, whose client may be
                    # gone): a send the socket takes at once awaits nothing.
                    await asyncio.sleep(0)
    finally:
        if gate is not None:
            gate.close()


class ArchiveResponse(StreamingResponse):
    """A response whose body is `stream(zero_copy)`: zero-copy when the server offers the extension (ours does;
    an in-process test client does not). FileSpans go out as `http.response.zerocopysend`, memory as body."""

    def __init__(self, stream: Callable[[bool], AsyncIterator[memoryview | FileSpan]], status_code: int = 200,
                 headers: Mapping[str, str] | None = None):
        super().__init__((), status_code, headers)
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.body_iterator = self.stream(ZERO_COPY in (scope.get("extensions") or {}))
        await super().__call__(scope, receive, send)

    async def stream_response(self, send: Send) -> None:
        body = self.body_iterator
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for piece in body:  # type: ignore[union-attr]
                if type(piece) is FileSpan:
                    await send({"type": ZERO_COPY, "file": piece.fd, "offset": piece.offset, "count": piece.count,
                                "more_body": True})
                else:
                    await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except ConnectionError:
            return  # the client is gone; the access log says the download did not complete
        finally:
            await body.aclose()  # type: ignore[union-attr] - the leases and files go now, not when collected
