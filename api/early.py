"""Starting the response before the preparation is done, so a switch does not give up waiting for headers.

IOS-XE's HTTP client drops a request whose response headers take longer than 30 s (its default), and a cold
1 GB image takes longer to prepare. After PREPARE_GRACE seconds we therefore answer with the exact
Content-Length, computed without unpacking anything:
  - a layer already in the store: its file size;
  - an uncompressed layer: its descriptor size;
  - a gzip layer: the ISIZE trailer (last 4 bytes of the blob, one ranged request); it is the size modulo 4 GiB
    of the last gzip member only, so a wrong guess is possible — and is caught below.
Each layer is sent once the preparation has verified and stored it; `manifest.json` and `repositories` go last,
only after the whole image verified. Any failure or size surprise after the headers closes the connection
early, so a client can only ever hold a short file that `docker load` rejects, never a wrong one that loads.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import AsyncIterator, Awaitable, Callable

from docker_http_passthrough.shared import manifest as mf
from docker_http_passthrough.shared.archive import ArchivePlan, LayerFile, iter_archive, plan_archive
from docker_http_passthrough.shared.errors import PassthroughError
from docker_http_passthrough.shared.prepare import diff_ids_of
from docker_http_passthrough.shared.registry import RegistryClient
from docker_http_passthrough.shared.store import Store

log = logging.getLogger("docker_http_passthrough.api")

POLL = 0.25
# Sizes past this cannot be told from ISIZE (it wraps at 4 GiB): wait for the preparation instead.
ISIZE_LIMIT = 1 << 32


class EarlyStreamAborted(Exception):
    """Raised inside the response body: uvicorn closes the connection, the client holds a short file."""


# Per process: blob digest → ISIZE guess, asked once however many clients wait on the same image.
_isize_asked: dict[str, asyncio.Future] = {}


async def _ask_isize(client: RegistryClient, layer: mf.Descriptor) -> int | None:
    if layer.size < 18 or layer.size >= ISIZE_LIMIT:
        return None
    tail = await client.blob_range(layer.digest, layer.size - 4, 4)
    if tail is None:
        return None
    isize = struct.unpack("<I", tail)[0]
    # A tar is a whole number of 512-byte blocks; anything else means ISIZE does not describe the layer.
    return isize if isize and isize % 512 == 0 else None


async def _gzip_isize(client: RegistryClient, layer: mf.Descriptor) -> int | None:
    asked = _isize_asked.get(layer.digest)
    if asked is None:
        asked = asyncio.ensure_future(_ask_isize(client, layer))
        _isize_asked[layer.digest] = asked
        if len(_isize_asked) > 4096:
            _isize_asked.pop(next(iter(_isize_asked)))
    try:
        return await asyncio.shield(asked)
    except PassthroughError:
        _isize_asked.pop(layer.digest, None)  # another client's credentials may do better
        return None


async def _stored_blob(store: Store, registry: str, repository: str, digest: str, wait: float) -> bytes | None:
    """Manifest and config are the first things a preparation stores; wait briefly for them."""
    for _ in range(int(wait / POLL) + 1):
        if store.seen(registry, repository, digest):
            data = store.get_blob(digest)
            if data is not None:
                return data
        await asyncio.sleep(POLL)
    return None


async def plan_before_ready(client: RegistryClient, store: Store, manifest_digest: str,
                            repo_tag: str) -> tuple[ArchivePlan, list[tuple[str, str]]] | None:
    """The archive's plan with sizes known before unpacking, and its layers as (blob digest, diff_id);
    None when some size cannot be known."""
    registry, repository = client.target.api_url, client.repository
    manifest_data = await _stored_blob(store, registry, repository, manifest_digest, wait=5.0)
    if manifest_data is None:
        return None
    manifest = mf.parse_image_manifest(manifest_data)
    config = await _stored_blob(store, registry, repository, manifest.config.digest, wait=5.0)
    if config is None:
        return None
    diff_ids = diff_ids_of(config)
    files = []
    for layer, diff_id in zip(manifest.layers, diff_ids):
        path = store.layer_path(diff_id)
        if store.linked_diff_id(layer.digest) == diff_id and path.exists():
            size = path.stat().st_size
        elif layer.media_type in mf.PLAIN_LAYERS:
            size = layer.size
        else:
            size = await _gzip_isize(client, layer)
            if size is None:
                return None
        files.append(LayerFile(diff_id, size, str(path)))
    try:
        plan = plan_archive(config, manifest.config.digest, files, repo_tag)
        return plan, [(layer.digest, diff_id) for layer, diff_id in zip(manifest.layers, diff_ids)]
    except ValueError:
        return None


async def stream_as_prepared(plan: ArchivePlan, layers: list[tuple[str, str]], store: Store, registry: str,
                             repository: str, failure: Callable[[], Awaitable[PassthroughError | None]],
                             image_ready: Callable[[], bool], timeout: float) -> AsyncIterator[bytes]:
    """Send the archive in order, each layer once this preparation verified it for this registry and repository
    (a file that merely exists may belong to another registry's image), the closing files once all are."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    position = 0

    async def wait_for(ready: Callable[[], bool], what: str) -> None:
        while not ready():
            error = await failure()
            if error is not None:
                raise EarlyStreamAborted(f"preparation failed after the response started: {error.message}")
            if loop.time() > deadline:
                raise EarlyStreamAborted(f"gave up waiting for {what}")
            await asyncio.sleep(POLL)

    def verified(digest: str, diff_id: str) -> bool:
        return (store.linked_diff_id(digest) == diff_id and store.seen(registry, repository, digest)
                and store.layer_path(diff_id).exists())

    file_segments = [segment for segment in plan.segments if segment.path is not None]
    for segment, (digest, diff_id) in zip(file_segments, layers, strict=True):
        await wait_for(lambda d=digest, i=diff_id: verified(d, i), f"layer {digest}")
        end = segment.offset + segment.length
        async for chunk in iter_archive(plan, position, end):
            yield chunk
        position = end
    await wait_for(image_ready, "the image to verify")
    async for chunk in iter_archive(plan, position, plan.size):
        yield chunk
