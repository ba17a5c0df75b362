"""Preparing one image: manifest, config and every layer into the store, each verified before it becomes visible.

The same code runs in an RQ worker (two-tier) and inside the API process (embedded). The parts it puts
together live in their own modules: `small_blobs` (manifest, config), `possession` (may a stored layer serve
this registry?), `layer_download` (download, verify, inflate one layer through `layer_sink`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from docker_http_passthrough.shared import manifest as mf
from docker_http_passthrough.shared.errors import InvalidContent, StoreFull
from docker_http_passthrough.shared.eviction import evict, held_leases, record_use
from docker_http_passthrough.shared.jobs import Progress, image_key, job_id_for
from docker_http_passthrough.shared.layer_download import all_or_nothing, fetch_layer
from docker_http_passthrough.shared.layer_sink import TarBudget
from docker_http_passthrough.shared.locks import Locks
from docker_http_passthrough.shared.metrics import JOBS_IN_FLIGHT, PREPARE_SECONDS
from docker_http_passthrough.shared.possession import reusable
from docker_http_passthrough.shared.registry import RegistryClient
from docker_http_passthrough.shared.small_blobs import config_bytes, manifest_bytes
from docker_http_passthrough.shared.store import ImageRecord, PreparedLayer, Store
from docker_http_passthrough.shared.telemetry import tracer


@dataclass
class _Job:
    """What every layer of one preparation shares."""

    client: RegistryClient
    store: Store
    locks: Locks
    slots: asyncio.Semaphore
    progress: Progress
    budget: TarBudget  # unpacked bytes the image may still take
    cache_max_bytes: int = 0


async def prepare_image(client: RegistryClient, store: Store, manifest_digest: str, locks: Locks,
                        concurrency: int = 3, progress: Progress | None = None,
                        cache_max_bytes: int = 0) -> ImageRecord:
    """The prepared image; with `cache_max_bytes`, the store is then evicted down to it (never this image)."""
    key = image_key(client.target.api_url, client.repository, manifest_digest)
    attributes = {"registry.name": client.target.name, "registry.url": client.target.api_url,
                  "container.image.name": f"{client.target.name}/{client.repository}",
                  "oci.manifest.digest": manifest_digest, "dhp.job.id": job_id_for(key)}
    started = time.monotonic()
    JOBS_IN_FLIGHT.inc()
    try:
        with tracer().start_as_current_span("prepare_image", attributes=attributes):
            record = store.get_image(key)
            if record is not None:
                return record
            job = _Job(client, store, locks, asyncio.Semaphore(concurrency), progress or Progress(),
                       TarBudget(client.settings.image_max_bytes), cache_max_bytes)
            return await _prepare(job, key, manifest_digest, cache_max_bytes)
    finally:
        JOBS_IN_FLIGHT.dec()
        PREPARE_SECONDS.observe(time.monotonic() - started)


async def _prepare(job: _Job, key: str, manifest_digest: str, cache_max_bytes: int) -> ImageRecord:
    client, store = job.client, job.store
    manifest = mf.parse_image_manifest(await manifest_bytes(client, store, manifest_digest))
    mf.check_limits(manifest, client.settings.image_max_layers, client.settings.image_max_bytes)
    diff_ids = mf.diff_ids_of(await config_bytes(client, store, manifest.config.digest, manifest.config.size))
    if len(diff_ids) != len(manifest.layers):
        raise InvalidContent(f"the manifest lists {len(manifest.layers)} layers but the config has "
                             f"{len(diff_ids)} diff_ids")
    job.progress.layers_total = len(manifest.layers)
    job.progress.bytes_total = sum(layer.size for layer in manifest.layers)
    # Leased until the store is evicted below: no eviction, ours or another process's, removes this image's
    # layers while it is prepared, nor right after (a request is about to stream them).
    async with held_leases(store, diff_ids):
        sizes = await all_or_nothing(*(_layer(job, index, layer, diff_id)
                                       for index, (layer, diff_id) in enumerate(zip(manifest.layers, diff_ids))))
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
        await asyncio.to_thread(evict, store, cache_max_bytes)
    return record


async def _layer(job: _Job, index: int, layer: mf.Descriptor, diff_id: str) -> int:
    """One layer into the store (downloaded, or reused when this registry may use the stored one); its size."""
    client, store = job.client, job.store
    async with job.slots:
        attributes = {"oci.layer.index": index, "oci.layer.digest": layer.digest,
                      "oci.layer.compressed_size": layer.size}
        with tracer().start_as_current_span(f"download_layer_{index}", attributes=attributes) as span:
            fetched = False
            if not await reusable(client, store, layer, diff_id):
                # Lock by blob: two jobs needing the same blob at once download it once.
                async with job.locks.hold(f"blob-{layer.digest}"):
                    # Someone may have fetched it for this registry while we waited for the lock.
                    if not await reusable(client, store, layer, diff_id, prove=False):
                        await _fetch_making_room(job, index, layer, diff_id)
                        fetched = True
            if not fetched:
                job.progress.bytes_done += layer.size  # already stored counts as done
            job.progress.layers_done += 1
            size = store.layer_path(diff_id).stat().st_size
            span.set_attribute("dhp.cache.hit", not fetched)
            span.set_attribute("oci.layer.decompressed_size", size)
            return size


async def _fetch_making_room(job: _Job, index: int, layer: mf.Descriptor, diff_id: str) -> None:
    """fetch_layer; on a full volume with CACHE_MAX_BYTES set, evict least-recently-used layers (never this
    image's: they are leased) to free what the failed write needed plus the blob's size, and try once more."""
    done_before = job.progress.bytes_done
    try:
        await fetch_layer(job.client, job.store, layer, diff_id, job.progress, index, job.budget)
    except StoreFull as full:
        wanted = full.written + layer.size
        if not job.cache_max_bytes or not await asyncio.to_thread(evict, job.store, job.cache_max_bytes,
                                                                  free=wanted):
            raise
        job.progress.bytes_done = done_before  # other layers may have moved it meanwhile: close enough
        job.budget.refund(full.written)  # the failed write took from the budget
        await fetch_layer(job.client, job.store, layer, diff_id, job.progress, index, job.budget)
