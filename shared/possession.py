"""Reusing a stored layer for another registry only when that registry proves it holds the very blob.

A layer is stored once by content, but serving it for a blob digest that registry B names would let anyone
running a registry read a private layer by naming its digests. So B must show bytes of the blob itself.
"""

from __future__ import annotations

import os
import secrets

from docker_http_passthrough.shared import manifest as mf
from docker_http_passthrough.shared.layer_sink import TAIL_SIZE
from docker_http_passthrough.shared.registry import RegistryClient
from docker_http_passthrough.shared.store import Store


async def possessed(client: RegistryClient, store: Store, layer: mf.Descriptor, diff_id: str) -> bool:
    """Does this registry really hold the blob? A HEAD could be answered by anyone who read the digest in a
    manifest; the blob's own bytes cannot: for gzip its last bytes (deflate end, CRC32 and size of the
    content), for an uncompressed layer random windows of the stored file itself."""
    link = store.layer_link(layer.digest) or {}
    if layer.media_type in mf.PLAIN_LAYERS:
        path = store.layer_path(diff_id)
        size = path.stat().st_size
        for _ in range(4):
            start = secrets.randbelow(max(size - TAIL_SIZE, 1))
            with open(path, "rb") as handle:
                expected = os.pread(handle.fileno(), TAIL_SIZE, start)
            if await client.blob_range(layer.digest, start, len(expected)) != expected:
                return False
        return True
    size, tail = link.get("size", 0), bytes.fromhex(link.get("tail", ""))
    if size != layer.size or len(tail) < min(TAIL_SIZE, size):
        return False
    return await client.blob_range(layer.digest, size - len(tail), len(tail)) == tail


async def reusable(client: RegistryClient, store: Store, layer: mf.Descriptor, diff_id: str,
                   prove: bool = True) -> bool:
    """A stored layer serves this descriptor only if this very blob was verified to unpack to it, and this
    registry proves it holds the blob for this repository (with this request's credentials). Without proof
    the blob is downloaded and verified like any other."""
    if store.linked_diff_id(layer.digest) != diff_id or not store.layer_path(diff_id).exists():
        return False
    registry, repository = client.target.api_url, client.repository
    if not store.seen(registry, repository, layer.digest):
        if not prove or not await possessed(client, store, layer, diff_id):
            return False
        store.mark_seen(registry, repository, layer.digest)
    return True
