"""Preparing one image: manifest, config and every layer into the store, each verified before it becomes visible.

The same code runs in an RQ worker (two-tier) and inside the API process (embedded).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Awaitable, Callable

from docker_http_passthrough.shared import manifest as mf
from docker_http_passthrough.shared.errors import InvalidContent
from docker_http_passthrough.shared.eviction import LEASE_REFRESH, Leases, leased, record_use
from docker_http_passthrough.shared.locks import Locks
from docker_http_passthrough.shared.metrics import JOBS_IN_FLIGHT, PREPARE_SECONDS, UPSTREAM_BYTES
from docker_http_passthrough.shared.registry import RegistryClient
from docker_http_passthrough.shared.store import ImageRecord, PreparedLayer, Store
from docker_http_passthrough.shared.telemetry import tracer

try:  # isal inflates ~1.7x faster than stdlib zlib, same interface
    from isal import isal_zlib as zlib_impl
except ImportError:  # pragma: no cover
    import zlib as zlib_impl

# Hand bytes to the decompress thread in pieces this large: fewer thread hops, bounded memory.
FEED_SIZE = 1 << 20
# Pieces waiting between the network and the inflating thread, per layer.
PIPELINE_DEPTH = 4
# Bytes of a blob that another registry must show us before we reuse our stored copy for it.
TAIL_SIZE = 32
# Inflate at most this much per call, so a small, highly compressed input cannot balloon memory.
INFLATE_STEP = 4 << 20

@dataclass
class Progress:
    """How far a preparation is; read by the status route (embedded) or copied to Redis by the worker."""

    layers_total: int = 0
    layers_done: int = 0
    bytes_total: int = 0  # compressed bytes to download, from the manifest
    bytes_done: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def image_key(registry_api_url: str, repository: str, manifest_digest: str) -> str:
    """One preparation per (registry, repository, manifest digest); the key names the job and the record."""
    return hashlib.sha256(f"{registry_api_url}\n{repository}\n{manifest_digest}".encode()).hexdigest()[:40]


def job_id_for(key: str) -> str:
    # RQ job ids allow letters, digits, "_" and "-" only.
    return f"prepare-{key}"


class _LayerSink:
    """Hashes the blob as sent, inflates it if needed, hashes and writes the tar. Runs in a worker thread.

    A stream that does not inflate is remembered, not raised at once: the blob is still hashed to the end, so
    the error can say whether the registry sent the wrong bytes (digest mismatch) or a broken gzip.
    """

    def __init__(self, out, gzip: bool):
        self.out = out
        self.blob_hash = hashlib.sha256()
        self.tar_hash = hashlib.sha256()
        self.blob_size = 0
        self.tar_size = 0
        self.inflater = zlib_impl.decompressobj(wbits=31) if gzip else None
        self.gzip_error: str | None = None
        self.padding = False  # past the last gzip member: only zeros may follow
        self.blob_tail = b""  # the blob's last TAIL_SIZE bytes, kept as proof material (see _possessed)

    def _emit(self, data: bytes) -> None:
        self.tar_hash.update(data)
        self.tar_size += len(data)
        self.out.write(data)

    def feed(self, data: bytes) -> None:
        self.blob_hash.update(data)
        self.blob_size += len(data)
        self.blob_tail = (self.blob_tail + data[-TAIL_SIZE:])[-TAIL_SIZE:]
        if self.inflater is None:
            self._emit(data)
        elif self.gzip_error is None:
            try:
                self._inflate(data)
            except zlib_impl.error as exc:
                self.gzip_error = f"not valid gzip ({exc})"

    def _inflate(self, data: bytes) -> None:
        if self.padding:
            if data.strip(b"\0"):
                raise zlib_impl.error("data after the end of the gzip stream")
            return
        while data:
            if self.inflater.eof:
                if not data.strip(b"\0"):
                    # Zero padding after the last member, as some tools write: a member starts with 1f 8b, so
                    # zeros here can only be padding, however the download was cut into pieces.
                    self.padding = True
                    return
                # Concatenated gzip members (pigz, some builders): start a fresh member.
                self.inflater = zlib_impl.decompressobj(wbits=31)
            self._emit(self.inflater.decompress(data, INFLATE_STEP))
            data = self.inflater.unused_data if self.inflater.eof else self.inflater.unconsumed_tail

    def finish(self) -> None:
        if self.inflater is not None and self.gzip_error is None:
            self._emit(self.inflater.flush())
            if not self.inflater.eof and self.blob_size:
                self.gzip_error = "a gzip stream that ends early"


async def _all_or_nothing(*coroutines):
    """Run together; the first failure cancels the others (their temp files go away with them)."""
    tasks = [asyncio.create_task(coroutine) for coroutine in coroutines]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _pipeline(response, layer: mf.Descriptor, sink: _LayerSink, progress: Progress | None) -> None:
    """Network reads and hashing/inflating/writing overlap: one task receives, a thread works on what came
    before (at most PIPELINE_DEPTH pieces wait in between, so memory stays bounded)."""
    pieces: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=PIPELINE_DEPTH)

    async def receive() -> None:
        pending: list[bytes] = []
        pending_size = received = 0
        async for chunk in response.aiter_raw():
            received += len(chunk)
            if received > layer.size:
                raise InvalidContent(f"layer {layer.digest} is longer than the {layer.size} bytes its manifest says")
            pending.append(chunk)
            pending_size += len(chunk)
            if pending_size >= FEED_SIZE:
                await pieces.put(b"".join(pending))
                pending, pending_size = [], 0
        if pending:
            await pieces.put(b"".join(pending))
        await pieces.put(None)

    async def work() -> None:
        while (piece := await pieces.get()) is not None:
            await asyncio.to_thread(sink.feed, piece)
            if progress:
                progress.bytes_done += len(piece)

    await _all_or_nothing(receive(), work())


async def fetch_layer(client: RegistryClient, store: Store, layer: mf.Descriptor, diff_id: str,
                      progress: Progress | None = None, index: int = 0) -> int:
    """Download, verify and inflate one layer into the store; returns the tar's size."""
    gzip = layer.media_type in mf.GZIP_LAYERS
    with tracer().start_as_current_span(f"write_layer_tar_{index}", attributes={
            "oci.layer.index": index, "oci.layer.digest": layer.digest}) as span, \
            store.atomic_writer(store.layer_path(diff_id)) as out:
        sink = _LayerSink(out, gzip)
        async with client.blob(layer.digest) as response:
            await _pipeline(response, layer, sink, progress)
        await asyncio.to_thread(sink.finish)
        if "sha256:" + sink.blob_hash.hexdigest() != layer.digest:
            raise InvalidContent(f"layer {layer.digest} does not match its digest (received {sink.blob_size} bytes); "
                                 "nothing was stored")
        if sink.gzip_error:
            raise InvalidContent(f"layer {layer.digest} is {sink.gzip_error}; nothing was stored")
        if "sha256:" + sink.tar_hash.hexdigest() != diff_id:
            raise InvalidContent(f"layer {layer.digest} unpacks to sha256:{sink.tar_hash.hexdigest()}, but the image "
                                 f"config says {diff_id} (invalid diff_id); nothing was stored")
        span.set_attribute("oci.layer.decompressed_size", sink.tar_size)
    UPSTREAM_BYTES.inc(sink.blob_size)
    store.link_layer(layer.digest, diff_id, sink.blob_size, sink.blob_tail)
    store.mark_seen(client.target.api_url, client.repository, layer.digest)
    return sink.tar_size


async def _small_blob(client: RegistryClient, store: Store, digest: str,
                      fetch: Callable[[str], Awaitable[bytes]]) -> tuple[bytes, bool]:
    """A verified small blob (manifest, index, config): from the store if this registry and repository served
    it before, else fetched and remembered. Returns (bytes, came from the store)."""
    registry, repository = client.target.api_url, client.repository
    data = store.get_blob(digest) if store.seen(registry, repository, digest) else None
    if data is not None:
        return data, True
    data = await fetch(digest)
    store.put_blob(digest, data)
    store.mark_seen(registry, repository, digest)
    return data, False


async def manifest_bytes(client: RegistryClient, store: Store, digest: str) -> bytes:
    """A manifest or index by digest."""

    async def fetch(reference: str) -> bytes:
        return (await client.get_manifest(reference))[0]

    return (await _small_blob(client, store, digest, fetch))[0]


async def _config_bytes(client: RegistryClient, store: Store, digest: str) -> bytes:
    with tracer().start_as_current_span("fetch_config_blob", attributes={"oci.image.config.digest": digest}) as span:
        data, stored = await _small_blob(client, store, digest, client.get_blob)
        span.set_attribute("dhp.cache.hit", stored)
    return data


async def _possessed(client: RegistryClient, store: Store, layer: mf.Descriptor, diff_id: str) -> bool:
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


async def _reusable(client: RegistryClient, store: Store, layer: mf.Descriptor, diff_id: str,
                    prove: bool = True) -> bool:
    """A stored layer serves this descriptor only if this very blob was verified to unpack to it, and this
    registry proves it holds the blob for this repository (with this request's credentials). Without proof
    the blob is downloaded and verified like any other."""
    if store.linked_diff_id(layer.digest) != diff_id or not store.layer_path(diff_id).exists():
        return False
    registry, repository = client.target.api_url, client.repository
    if not store.seen(registry, repository, layer.digest):
        if not prove or not await _possessed(client, store, layer, diff_id):
            return False
        store.mark_seen(registry, repository, layer.digest)
    return True


async def _keep_fresh(leases: Leases) -> None:
    while True:
        await asyncio.sleep(LEASE_REFRESH)
        leases.refresh(force=True)


def diff_ids_of(config: bytes) -> list[str]:
    try:
        diff_ids = json.loads(config)["rootfs"]["diff_ids"]
        assert isinstance(diff_ids, list) and all(isinstance(d, str) for d in diff_ids)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise InvalidContent("the image config has no rootfs.diff_ids list") from None
    return diff_ids


async def prepare_image(client: RegistryClient, store: Store, manifest_digest: str, locks: Locks,
                        concurrency: int = 3, progress: Progress | None = None) -> ImageRecord:
    attributes = {"registry.name": client.target.name, "registry.url": client.target.api_url,
                  "container.image.name": f"{client.target.name}/{client.repository}",
                  "oci.manifest.digest": manifest_digest,
                  "dhp.job.id": job_id_for(image_key(client.target.api_url, client.repository, manifest_digest))}
    started = time.monotonic()
    JOBS_IN_FLIGHT.inc()
    try:
        with tracer().start_as_current_span("prepare_image", attributes=attributes):
            return await _prepare_image(client, store, manifest_digest, locks, concurrency, progress)
    finally:
        JOBS_IN_FLIGHT.dec()
        PREPARE_SECONDS.observe(time.monotonic() - started)


async def _prepare_image(client: RegistryClient, store: Store, manifest_digest: str, locks: Locks,
                        concurrency: int = 3, progress: Progress | None = None) -> ImageRecord:
    key = image_key(client.target.api_url, client.repository, manifest_digest)
    record = store.get_image(key)
    if record is not None:
        return record
    manifest = mf.parse_image_manifest(await manifest_bytes(client, store, manifest_digest))
    config = await _config_bytes(client, store, manifest.config.digest)
    diff_ids = diff_ids_of(config)
    if len(diff_ids) != len(manifest.layers):
        raise InvalidContent(f"the manifest lists {len(manifest.layers)} layers but the config has "
                             f"{len(diff_ids)} diff_ids")
    slots = asyncio.Semaphore(concurrency)
    progress = progress or Progress()
    progress.layers_total = len(manifest.layers)
    progress.bytes_total = sum(layer.size for layer in manifest.layers)

    async def one(index: int, layer: mf.Descriptor, diff_id: str) -> int:
        async with slots:
            attributes = {"oci.layer.index": index, "oci.layer.digest": layer.digest,
                          "oci.layer.compressed_size": layer.size}
            with tracer().start_as_current_span(f"download_layer_{index}", attributes=attributes) as span:
                fetched = False
                if not await _reusable(client, store, layer, diff_id):
                    # Lock by blob: two jobs needing the same blob at once download it once.
                    async with locks.hold(f"blob-{layer.digest}"):
                        # Someone may have fetched it for this registry while we waited for the lock.
                        if not await _reusable(client, store, layer, diff_id, prove=False):
                            await fetch_layer(client, store, layer, diff_id, progress, index)
                            fetched = True
                if not fetched:
                    progress.bytes_done += layer.size  # already stored counts as done
                progress.layers_done += 1
                size = store.layer_path(diff_id).stat().st_size
                span.set_attribute("dhp.cache.hit", not fetched)
                span.set_attribute("oci.layer.decompressed_size", size)
                return size

    with leased(store, diff_ids) as leases:  # no eviction of this image's layers while it is prepared
        keeper = asyncio.create_task(_keep_fresh(leases))
        try:
            sizes = await _all_or_nothing(*(one(index, layer, diff_id)
                                            for index, (layer, diff_id) in enumerate(zip(manifest.layers, diff_ids))))
        finally:
            keeper.cancel()
        record_use(store, diff_ids)
    record = ImageRecord(
        registry=client.target.api_url,
        repository=client.repository,
        manifest_digest=manifest_digest,
        config_digest=manifest.config.digest,
        layers=tuple(PreparedLayer(diff_id, size, layer.digest)
                     for layer, diff_id, size in zip(manifest.layers, diff_ids, sizes)),
    )
    store.put_image(key, record)
    return record
