"""The bytes of one blob as they arrive, resumed after a cut: the next request asks `Range: bytes=<received>-`.

What was received stays received: the consumer has already hashed it (and inflated it), so a resumed transfer
just goes on, and the digest is still checked over the whole blob. A 206 must start exactly at the offset asked
for; a 200 means the server ignores Range, and the bytes we already have are skipped as they come again (the
digest then still covers exactly the bytes used). Every resume is an attempt of the transfer (see `retry`).

`resumable_chunks` takes the request as a function of the offset, so any URL can be read this way: registry
blobs (`RegistryClient.blob_stream`) and, with the guarded client, a foreign layer's descriptor `urls`.
"""

from __future__ import annotations

import logging
import re
from typing import AsyncIterator, Awaitable, Callable

import httpx

from docker_http_passthrough.shared.errors import InvalidContent, Unreachable
from docker_http_passthrough.shared.metrics import UPSTREAM_BYTES
from docker_http_passthrough.shared.retry import Attempts, GiveUp

log = logging.getLogger("docker_http_passthrough.upstream")

# Open the blob from this offset (0: the whole blob, else with a Range header); a 200 or 206 response.
Opener = Callable[[int], Awaitable[httpx.Response]]
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


def range_header(offset: int) -> dict[str, str]:
    return {"Range": f"bytes={offset}-"} if offset else {}


def _to_skip(response: httpx.Response, received: int, size: int | None, what: str) -> int:
    """How many bytes of this response we already have."""
    if received == 0 or response.status_code == 200:
        if received:
            log.warning("%s: the server ignored Range, skipping the %d bytes received before", what, received)
        return received
    match = _CONTENT_RANGE.match(response.headers.get("content-range", "").strip())
    if response.status_code != 206 or not match or int(match[1]) != received:
        raise InvalidContent(f"{what}: asked to resume at byte {received}, the server answered "
                             f"HTTP {response.status_code} {response.headers.get('content-range', '')}".rstrip())
    if size is not None and match[3] != "*" and int(match[3]) != size:
        raise InvalidContent(f"{what}: the server says the blob has {match[3]} bytes, not {size}")
    return 0


async def resumable_chunks(open_at: Opener, size: int | None, attempts: Attempts, what: str) -> AsyncIterator[bytes]:
    """The blob's bytes, once each, however often the connection is cut (within the attempts)."""
    received = 0
    while True:
        response = await open_at(received)
        cut: str
        try:
            skip = _to_skip(response, received, size, what)
            try:
                async for chunk in response.aiter_raw():
                    UPSTREAM_BYTES.inc(len(chunk))
                    if skip:
                        chunk, skip = chunk[skip:], max(skip - len(chunk), 0)
                        if not chunk:
                            continue
                    received += len(chunk)
                    if size is not None and received > size:
                        raise InvalidContent(f"{what} is longer than the {size} bytes its descriptor says")
                    yield chunk
            except httpx.TransportError as exc:  # cut, reset, or a read that timed out
                cut = type(exc).__name__
            else:
                if size is None or received == size:
                    return
                cut = "the body ended early"
        finally:
            await response.aclose()
        try:
            await attempts.pause(None, f"{what} was cut after {received} bytes ({cut})")
        except GiveUp as give_up:
            raise Unreachable(f"{give_up}") from None
