"""Downloading one layer: network reads overlap hashing and inflating, and nothing is stored unless both the
blob digest and the diff_id verify. A cut connection resumes where it stopped (`RegistryClient.blob_stream`):
the sink just goes on with the next bytes, and the digest covers the whole blob. While it inflates, how far it
got is published (`growing_layer`), so cold downloads stream the layer's bytes as they come."""

from __future__ import annotations

import asyncio
import os
from contextlib import asynccontextmanager
from typing import AsyncIterator

import httpx

from docker_http_passthrough.shared import manifest as mf
from docker_http_passthrough.shared.digests import digest_of
from docker_http_passthrough.shared.errors import InvalidContent, NotFound
from docker_http_passthrough.shared.foreign_layers import foreign_layer_error, open_foreign
from docker_http_passthrough.shared.growing_layer import GrowingLayer
from docker_http_passthrough.shared.jobs import Progress
from docker_http_passthrough.shared.layer_sink import LayerSink, TarBudget
from docker_http_passthrough.shared.metrics import UPSTREAM_BYTES
from docker_http_passthrough.shared.registry import RegistryClient
from docker_http_passthrough.shared.store import Store
from docker_http_passthrough.shared.telemetry import tracer

# Hand bytes to the decompress thread in pieces this large: fewer thread hops, bounded memory…
FEED_SIZE = 1 << 20
# …or after this long, from a slow registry: a stream that sends the layer as it inflates must not pause.
FEED_EVERY = 0.1
# Pieces waiting between the network and the inflating thread, per layer.
PIPELINE_DEPTH = 4


async def all_or_nothing(*coroutines):
    """Run together; the first failure cancels the others (their temp files go away with them)."""
    tasks = [asyncio.create_task(coroutine) for coroutine in coroutines]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _pipeline(chunks: AsyncIterator[bytes], sink: LayerSink, progress: Progress | None,
                    growing: GrowingLayer) -> None:
    """Network reads and hashing/inflating/writing overlap: one task receives, a thread works on what came
    before (at most PIPELINE_DEPTH pieces wait in between, so memory stays bounded)."""
    pieces: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=PIPELINE_DEPTH)

    async def receive() -> None:
        pending: list[bytes] = []
        pending_size = 0
        loop = asyncio.get_running_loop()
        handed = loop.time()
        async for chunk in chunks:
            pending.append(chunk)
            pending_size += len(chunk)
            if pending_size >= FEED_SIZE or loop.time() - handed >= FEED_EVERY:
                await pieces.put(b"".join(pending))
                pending, pending_size, handed = [], 0, loop.time()
        if pending:
            await pieces.put(b"".join(pending))
        await pieces.put(None)

    def feed(piece: bytes) -> None:
        sink.feed(piece)
        sink.out.flush()
        growing.wrote(sink.tar_size)

    async def work() -> None:
        while (piece := await pieces.get()) is not None:
            await asyncio.to_thread(feed, piece)
            if progress:
                progress.bytes_done += len(piece)

    await all_or_nothing(receive(), work())


async def _sized(response: httpx.Response, layer: mf.Descriptor) -> AsyncIterator[bytes]:
    """A foreign layer's bytes as sent, never more than its descriptor says."""
    received = 0
    async for chunk in response.aiter_raw():
        UPSTREAM_BYTES.inc(len(chunk))
        received += len(chunk)
        if received > layer.size:
            raise InvalidContent(f"layer {layer.digest} is longer than the {layer.size} bytes its manifest says")
        yield chunk


@asynccontextmanager
async def _layer_chunks(client: RegistryClient, layer: mf.Descriptor) -> AsyncIterator[AsyncIterator[bytes]]:
    """The layer's bytes: a foreign layer from its descriptor's URLs when ALLOW_FOREIGN_LAYERS allows them (the
    registry if none answers), any other layer from the registry (resumed after cuts). A foreign layer the
    registry does not serve either is an error that names it and says what would fetch it. Foreign URLs go
    through the guarded client (REGISTRY_ALLOWED_HOSTS, after DNS) and within the transfer's deadline; they are
    not resumed."""
    async with client.transfer(f"the layer {layer.digest}", layer.size):
        foreign, problems = await open_foreign(client.registries.guarded, layer, client.foreign_layer_hosts)
        if foreign is not None:
            try:
                yield _sized(foreign, layer)
            finally:
                await foreign.aclose()
            return
    try:
        async with client.blob_stream(layer.digest, layer.size) as chunks:
            yield chunks
    except NotFound:
        if not layer.foreign:
            raise
        raise foreign_layer_error(layer, client.foreign_layer_hosts, problems) from None


async def _inflate(client: RegistryClient, layer: mf.Descriptor, sink: LayerSink, progress: Progress | None,
                   growing: GrowingLayer) -> None:
    publisher = asyncio.create_task(growing.keep_publishing())
    try:
        async with _layer_chunks(client, layer) as chunks:
            await _pipeline(chunks, sink, progress, growing)
        await asyncio.to_thread(sink.finish)
    finally:
        publisher.cancel()


def _verify(sink: LayerSink, layer: mf.Descriptor, diff_id: str) -> None:
    if digest_of(sink.blob_hash) != layer.digest:
        raise InvalidContent(f"layer {layer.digest} does not match its digest (received {sink.blob_size} bytes); "
                             "nothing was stored")
    if sink.inflate_error:
        raise InvalidContent(f"layer {layer.digest} is {sink.inflate_error}; nothing was stored")
    if digest_of(sink.tar_hash) != diff_id:
        raise InvalidContent(f"layer {layer.digest} unpacks to {digest_of(sink.tar_hash)}, but the image "
                             f"config says {diff_id} (invalid diff_id); nothing was stored")


def _record(store: Store, registry: str, repository: str, digest: str, diff_id: str, sink: LayerSink) -> None:
    store.link_layer(digest, diff_id, sink.blob_size, sink.blob_tail)
    store.mark_seen(registry, repository, digest)


async def fetch_layer(client: RegistryClient, store: Store, layer: mf.Descriptor, diff_id: str,
                      progress: Progress | None = None, index: int = 0, budget: TarBudget | None = None) -> int:
    """Download, verify and inflate one layer into the store; returns the tar's size. `budget`: the unpacked
    bytes the whole image may still take (IMAGE_MAX_BYTES), shared by its layers."""
    registry, repository = client.target.api_url, client.repository
    growing = None
    try:
        with tracer().start_as_current_span(f"write_layer_tar_{index}", attributes={
                "oci.layer.index": index, "oci.layer.digest": layer.digest}) as span, \
                store.atomic_writer(store.layer_path(diff_id)) as out:
            growing = GrowingLayer(store, registry, repository, layer.digest, diff_id, out)
            sink = LayerSink(out, mf.compression_of(layer), budget or TarBudget(client.settings.image_max_bytes))
            await _inflate(client, layer, sink, progress, growing)
            _verify(sink, layer, diff_id)
            span.set_attribute("oci.layer.decompressed_size", sink.tar_size)
            await asyncio.to_thread(os.fsync, out.fileno())  # off the event loop: the writer's own fsync is then quick
        # Small files, each fsynced: in a thread too, so that streams in this process do not pause.
        await asyncio.to_thread(_record, store, registry, repository, layer.digest, diff_id, sink)
    finally:
        if growing is not None:
            growing.close()  # only now: a stream looking for the layer finds the record or the verified layer
    return sink.tar_size
