"""Registry V2 client: the manifest and blob requests to one registry, for one repository.

Every operation is one *transfer* with one overall deadline (UPSTREAM_DEADLINE, plus the blob's size at
UPSTREAM_MIN_RATE for blobs; a download's resolution also ends by RESOLVE_TIMEOUT), its bounded retries
(`retry`), and documents read with a cap (MANIFEST_MAX_BYTES, CONFIG_MAX_BYTES), never whole into memory.
Blobs resume after a cut (`blob_stream`). Requests go to the registry's `Endpoint` (auth, retries); for Docker
Hub behind REGISTRY_MIRROR, to the mirror first. `Registries` is what a process owns to reach registries: the
HTTP clients (built by `upstream_http` from the settings), the auth cache, and the settings of the transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from typing import AsyncIterator

import httpx

from docker_http_passthrough.shared import manifest as mf
from docker_http_passthrough.shared.blob_stream import range_header, resumable_chunks
from docker_http_passthrough.shared.digests import PREFIX, digest_of, sha256_digest
from docker_http_passthrough.shared.errors import (
    Forbidden,
    InvalidContent,
    LimitExceeded,
    NotFound,
    TimedOut,
    Unauthorized,
    Unreachable,
)
from docker_http_passthrough.shared.locks import LocalLocks, Locks
from docker_http_passthrough.shared.rate_limits import RateLimits
from docker_http_passthrough.shared.registry_auth import AuthCache
from docker_http_passthrough.shared.registry_endpoint import Endpoint, read_capped
from docker_http_passthrough.shared.retry import Attempts
from docker_http_passthrough.shared.settings import Settings
from docker_http_passthrough.shared.targets import Credentials, RegistryTarget, settings_auth, target_from_settings

log = logging.getLogger("docker_http_passthrough.upstream")
# A mirror that fails is left at once for the registry itself: one attempt, no retries.
MIRROR_FALLBACK = (Unreachable, TimedOut, Unauthorized, Forbidden)


class Registries:
    """One process's way to registries: HTTP clients, what registries told it about auth, the transport's settings.

    `http` reaches the registries the operator configured (REGISTRY_URL, REGISTRY_MIRROR); `guarded` every other
    one, under REGISTRY_ALLOWED_HOSTS (see `upstream_http`). Tests may pass one client for both."""

    def __init__(self, http: httpx.AsyncClient, auth: AuthCache | None = None,
                 foreign_layer_hosts: tuple[str, ...] | None = None, blob_locks: Locks | None = None, *,
                 guarded: httpx.AsyncClient | None = None, settings: Settings | None = None):
        self.http = http
        self.guarded = guarded or http
        self.auth = AuthCache() if auth is None else auth
        self.settings = settings or Settings()
        # ALLOW_FOREIGN_LAYERS (see foreign_layers)
        self.foreign_layer_hosts = self.settings.foreign_layer_hosts if foreign_layer_hosts is None \
            else foreign_layer_hosts
        self.rate_limits = RateLimits()
        # Small blobs being fetched, per (registry, repository, digest, identity): requests arriving together
        # share one GET (see small_blobs).
        self.fetches: dict[tuple[str, ...], asyncio.Future] = {}
        self.fetch_waiters: dict[tuple[str, ...], int] = {}  # who still waits for each of them
        # Across processes too (API replicas and workers share Redis in two-tier mode): one GET per small blob.
        self.blob_locks: Locks = blob_locks or LocalLocks()
        self.configured = target_from_settings(self.settings)
        mirror = self.settings.registry_mirror
        self.mirror = RegistryTarget(mirror, mirror.split("://", 1)[1]) if mirror else None

    def http_for(self, api_url: str) -> httpx.AsyncClient:
        trusted = api_url == self.configured.api_url or (self.mirror is not None and api_url == self.mirror.api_url)
        return self.http if trusted else self.guarded

    def mirror_for(self, target: RegistryTarget, credentials: Credentials | None) -> RegistryTarget | None:
        """The mirror to ask first: for Docker Hub, unless the request carries credentials of its own (only
        Docker Hub can check those; the settings' credentials are no reason to skip the mirror)."""
        if self.mirror is None or not target.is_docker_hub:
            return None
        if credentials is not None and credentials != settings_auth(self.settings)[0]:
            return None
        return self.mirror

    async def __aenter__(self) -> "Registries":
        await self.http.__aenter__()
        if self.guarded is not self.http:
            await self.guarded.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self.guarded is not self.http:
            await self.guarded.__aexit__(*exc_info)
        await self.http.__aexit__(*exc_info)


class RegistryClient:
    """Requests to one registry for one repository, with one set of credentials.

    `until` (event-loop time) bounds everything this client does: a download's RESOLVE_TIMEOUT."""

    def __init__(self, registries: Registries, target: RegistryTarget, repository: str,
                 credentials: Credentials | None = None, bearer_token: str | None = None, *,
                 until: float | None = None):
        self.registries = registries
        self.settings = registries.settings
        self.target = target
        self.repository = repository
        self.credentials = credentials
        self.static_token = bearer_token
        self.until = until
        self.fetches = registries.fetches
        self.blob_locks = registries.blob_locks
        self.foreign_layer_hosts = registries.foreign_layer_hosts
        mirror = registries.mirror_for(target, credentials)
        self.endpoints = [Endpoint(registries, mirror, repository)] if mirror else []
        self.endpoints.append(Endpoint(registries, target, repository, credentials, bearer_token))

    @property
    def identity(self) -> str:
        """Whose access this client has, as a cache key (never a secret itself)."""
        if self.credentials:
            return self.credentials.identity
        return "token:" + hashlib.sha256(self.static_token.encode()).hexdigest() if self.static_token else "anonymous"

    # --- transfers: one deadline, bounded attempts

    @contextlib.asynccontextmanager
    async def transfer(self, what: str, size: int = 0) -> AsyncIterator[Attempts]:
        """The attempts of one transfer; TimedOut naming the setting when its deadline passes."""
        s = self.settings
        deadline = asyncio.get_running_loop().time() + s.upstream_deadline + size / s.upstream_min_rate
        rule = f"UPSTREAM_DEADLINE={s.upstream_deadline:g}s" + (
            f" plus {size} bytes at UPSTREAM_MIN_RATE={s.upstream_min_rate} bytes/s" if size else "")
        if self.until is not None and self.until < deadline:
            deadline, rule = self.until, f"RESOLVE_TIMEOUT={s.resolve_timeout:g}s"
        try:
            async with asyncio.timeout_at(deadline):
                yield Attempts(s.upstream_retries, deadline, s.upstream_retry_after_max)
        except TimeoutError:
            raise TimedOut(f"{what} from {self.target.name} did not finish in time ({rule})",
                           code="upstream_deadline") from None

    async def _send(self, method: str, kind: str, reference: str, headers: dict[str, str], operation: str,
                    attempts: Attempts, what: str) -> httpx.Response:
        """The mirror first, if any: its failures, 404s and 5xx fall back to the registry itself."""
        for mirror in self.endpoints[:-1]:
            # One attempt, in at most half the time left: a mirror that hangs must leave time for the registry.
            left = attempts.deadline - asyncio.get_running_loop().time()
            try:
                async with asyncio.timeout(max(left / 2, 0.1)):
                    response = await mirror.send(method, kind, reference, headers, operation,
                                                 Attempts(0, attempts.deadline, 0), what)
            except (*MIRROR_FALLBACK, TimeoutError) as exc:
                log.info("mirror %s failed for %s (%s); asking %s", mirror.target.name, what,
                         getattr(exc, "message", "no answer in time"), self.target.name)
                continue
            if response.status_code < 400:
                return response
            await response.aclose()
            log.info("mirror %s answered HTTP %d for %s; asking %s", mirror.target.name, response.status_code,
                     what, self.target.name)
        return await self.endpoints[-1].send(method, kind, reference, headers, operation, attempts, what)

    def _check(self, response: httpx.Response, what: str) -> None:
        status = response.status_code
        if status in (200, 206):
            return
        if status == 404:
            raise NotFound(f"{what} not found at {self.target.name}")
        if status in (401, 403):
            raise self.endpoints[-1].refusal(response)
        raise Unreachable(f"the registry {self.target.name} answered HTTP {status} for {what}")

    # --- manifests

    async def head_manifest(self, reference: str) -> mf.Descriptor:
        """Resolve a tag or digest without counting as a pull (Docker Hub counts GETs only)."""
        what = f"{self.repository}:{reference}" if not reference.startswith(PREFIX) else f"{self.repository}@{reference}"
        async with self.transfer(f"the manifest {what}") as attempts:
            response = await self._send("HEAD", "manifests", reference, {"Accept": mf.ACCEPT}, "manifest_head",
                                        attempts, f"the manifest {what}")
            await response.aclose()
        self._check(response, what)
        size = int(response.headers.get("content-length") or 0)
        if size > self.settings.manifest_max_bytes:
            raise LimitExceeded(f"the manifest {what} is larger than MANIFEST_MAX_BYTES="
                                f"{self.settings.manifest_max_bytes} bytes ({size})")
        media_type = response.headers.get("content-type", "").split(";")[0].strip()
        digest = response.headers.get("docker-content-digest")
        if not digest:
            # Some registries omit the digest on HEAD; a GET tells it for sure.
            data, media_type = await self.get_manifest(reference)
            return mf.Descriptor(media_type, sha256_digest(data), len(data))
        mf.check_supported(media_type)
        return mf.Descriptor(media_type, digest, size)

    async def get_manifest(self, reference: str) -> tuple[bytes, str]:
        """GET a manifest (read up to MANIFEST_MAX_BYTES); a digest reference is verified against the bytes."""
        what = f"manifest {self.repository}@{reference}"
        async with self.transfer(f"the {what}") as attempts:
            response = await self._send("GET", "manifests", reference, {"Accept": mf.ACCEPT}, "manifest_get",
                                        attempts, f"the {what}")
            try:
                self._check(response, what)
                data = await read_capped(response, self.settings.manifest_max_bytes, "MANIFEST_MAX_BYTES",
                                         f"the {what}")
            finally:
                await response.aclose()
        if reference.startswith(PREFIX) and sha256_digest(data) != reference:
            raise InvalidContent(f"manifest {reference} from {self.target.name} does not match its digest")
        media_type = mf.media_type_of(data, response.headers.get("content-type", "").split(";")[0].strip())
        mf.check_supported(media_type)
        return data, media_type

    # --- blobs

    async def _open_blob(self, digest: str, offset: int, attempts: Attempts) -> httpx.Response:
        what = f"blob {digest} of {self.repository}"
        response = await self._send("GET", "blobs", digest, range_header(offset), "blob_get", attempts, f"the {what}")
        if response.status_code not in (200, 206):
            await response.aclose()
            self._check(response, what)
        return response

    @contextlib.asynccontextmanager
    async def blob_stream(self, digest: str, size: int | None) -> AsyncIterator[AsyncIterator[bytes]]:
        """The blob's bytes as sent (hash them for the digest), resumed with Range after cuts, within one
        deadline. `size`: the descriptor's, or None when unknown."""
        async with self.transfer(f"the blob {digest}", size or 0) as attempts:
            chunks = resumable_chunks(lambda offset: self._open_blob(digest, offset, attempts), size, attempts,
                                      f"the blob {digest} from {self.target.name}")
            async with contextlib.aclosing(chunks):
                yield chunks

    async def blob_range(self, digest: str, start: int, length: int) -> bytes | None:
        """`length` bytes of a blob from `start`, or None if the registry ignores Range."""
        headers = {"Range": f"bytes={start}-{start + length - 1}"}
        async with self.transfer(f"bytes of the blob {digest}") as attempts:
            response = await self._send("GET", "blobs", digest, headers, "blob_range", attempts,
                                        f"bytes of the blob {digest}")
            try:
                if response.status_code != 206:
                    return None  # a 200 would be the whole blob: do not read it
                data = await read_capped(response, length, None, f"a range of the blob {digest}")
            except LimitExceeded:
                return None
            finally:
                await response.aclose()
        return data if len(data) == length else None

    async def get_blob(self, digest: str, size: int | None = None, limit: int | None = None) -> bytes:
        """A small blob (an image config, up to CONFIG_MAX_BYTES), verified against its digest."""
        limit = self.settings.config_max_bytes if limit is None else limit
        too_large = LimitExceeded(f"the blob {digest} from {self.target.name} is larger than "
                                  f"CONFIG_MAX_BYTES={limit} bytes")
        if size is not None and size > limit:
            raise too_large
        hasher, pieces, received = hashlib.sha256(), [], 0
        async with self.blob_stream(digest, size) as chunks:
            async for chunk in chunks:
                received += len(chunk)
                if received > limit:
                    raise too_large
                hasher.update(chunk)
                pieces.append(chunk)
        if digest_of(hasher) != digest:
            raise InvalidContent(f"blob {digest} from {self.target.name} does not match its digest")
        return b"".join(pieces)
