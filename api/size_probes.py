"""Learning a gzip layer's inflated size before it is downloaded: a ranged read of its tail (`shared.gzip_tail`).

One probe per blob per API process, however many requests wait on it, and at most PROBE_CONCURRENCY at once per
process: an image of hundreds of layers is probed in a few round trips (issue 10 item 9: one GET after another
took 92 s for a many-layer image), and a fleet asking for many images does not open hundreds of connections.
"""

from __future__ import annotations

import asyncio
import logging

from docker_http_passthrough.shared import manifest as mf
from docker_http_passthrough.shared.errors import PassthroughError
from docker_http_passthrough.shared.gzip_tail import TAIL_WINDOW, TailSize, size_from_tail
from docker_http_passthrough.shared.registry import RegistryClient

log = logging.getLogger("docker_http_passthrough.api")

PROBE_CONCURRENCY = 16
SIZE_GUESSES_KEPT = 4096


class SizeGuesses:
    """Blob digest → what its tail says about its inflated size; bounded, one per API process (the app owns it)."""

    def __init__(self, limit: int = SIZE_GUESSES_KEPT, concurrency: int = PROBE_CONCURRENCY):
        self.limit = limit
        self.asked: dict[str, asyncio.Future] = {}
        self.slots = asyncio.Semaphore(concurrency)

    async def gzip_size(self, client: RegistryClient, layer: mf.Descriptor) -> TailSize:
        asked = self.asked.get(layer.digest)
        if asked is None:
            asked = asyncio.ensure_future(self._probe(client, layer))
            self.asked[layer.digest] = asked
            if len(self.asked) > self.limit:
                self.asked.pop(next(iter(self.asked)))
        try:
            return await asyncio.shield(asked)
        except PassthroughError as exc:
            if self.asked.get(layer.digest) is asked:
                del self.asked[layer.digest]  # another client's credentials may do better
            return TailSize(None, f"probe failed: {exc.message}")

    async def _probe(self, client: RegistryClient, layer: mf.Descriptor) -> TailSize:
        if layer.size < 18:
            return TailSize(None, "blob too short for gzip")
        window = min(layer.size, TAIL_WINDOW)
        async with self.slots:
            tail = await client.blob_range(layer.digest, layer.size - window, window)
        if tail is None:
            return TailSize(None, "the registry ignores Range")
        found = size_from_tail(tail, layer.size)
        log.debug("layer %s: %s bytes (%s)", layer.digest, found.size, found.how)
        return found
