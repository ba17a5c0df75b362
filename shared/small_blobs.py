"""Small verified blobs (manifests, indexes, configs): from the store when this registry and repository served
them before, else fetched, verified and remembered."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from redis.exceptions import RedisError

from docker_http_passthrough.shared.registry import RegistryClient
from docker_http_passthrough.shared.store import Store
from docker_http_passthrough.shared.telemetry import tracer


def stored_blob(client: RegistryClient, store: Store, digest: str) -> bytes | None:
    """A small blob from the store, if this registry and repository served it before."""
    if not store.seen(client.target.api_url, client.repository, digest):
        return None
    return store.get_blob(digest)


async def _small_blob(client: RegistryClient, store: Store, digest: str,
                      fetch: Callable[[str], Awaitable[bytes]]) -> tuple[bytes, bool]:
    """A verified small blob (manifest, index, config): from the store if this registry and repository served
    it before, else fetched and remembered. Returns (bytes, came from the store)."""
    registry, repository = client.target.api_url, client.repository
    data = stored_blob(client, store, digest)
    if data is not None:
        return data, True

    async def fetch_unless_stored() -> bytes:
        stored = stored_blob(client, store, digest)  # another process may have fetched it while we waited
        if stored is not None:
            return stored
        fetched = await fetch(digest)
        store.put_blob(digest, fetched)
        store.mark_seen(registry, repository, digest)
        return fetched

    async def fetch_and_store() -> bytes:
        try:
            async with client.blob_locks.hold(f"blob-{digest}"):
                return await fetch_unless_stored()
        except RedisError:  # the lock saves a GET; without Redis, fetch anyway
            return await fetch_unless_stored()

    # Requests with the same access that arrive together (a fleet on a cold image) share one GET.
    key = (registry, repository, digest, client.identity)
    pending = client.fetches.get(key)
    if pending is None:
        pending = client.fetches[key] = asyncio.ensure_future(fetch_and_store())
        pending.add_done_callback(lambda _done: client.fetches.pop(key, None))
    # shield: a client that hangs up does not cancel the fetch the others wait for; when the last one is gone,
    # nothing needs it any more and it stops (its upstream connection closes).
    waiting = client.registries.fetch_waiters
    waiting[key] = waiting.get(key, 0) + 1
    try:
        return await asyncio.shield(pending), False
    finally:
        waiting[key] -= 1
        if not waiting[key]:
            del waiting[key]
            pending.cancel()  # a no-op when it is done


async def manifest_bytes(client: RegistryClient, store: Store, digest: str) -> bytes:
    """A manifest or index by digest."""

    async def fetch(reference: str) -> bytes:
        return (await client.get_manifest(reference))[0]

    return (await _small_blob(client, store, digest, fetch))[0]


async def config_bytes(client: RegistryClient, store: Store, digest: str, size: int | None = None) -> bytes:
    """An image config (up to CONFIG_MAX_BYTES; `size`: the manifest's, checked before anything is fetched)."""
    with tracer().start_as_current_span("fetch_config_blob", attributes={"oci.image.config.digest": digest}) as span:
        async def fetch(reference: str) -> bytes:
            return await client.get_blob(reference, size)

        data, stored = await _small_blob(client, store, digest, fetch)
        span.set_attribute("dhp.cache.hit", stored)
    return data
