"""From a download request to a manifest digest: parse, pick credentials, ask the registry (or remember).

- Every request resolves the tag at the registry with its own credentials (one HEAD), so the shared store
  never serves an image to someone the registry would refuse. Requests asking for the same tag with the same
  credentials at the same moment (a fleet starting a rollout) share that one HEAD while it is in flight
  (`SharedLookups`, per API process): the registry's answer is the same for each of them.
- Refusals and missing tags are remembered for ERROR_CACHE_SECONDS, so a fleet asking for a missing tag
  does not hammer the registry.
- When the registry is unreachable, a tag prepared before may be served stale (SERVE_STALE), except to
  requests carrying their own credentials: those we cannot check without the registry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Hashable

from opentelemetry import trace
from starlette.requests import Request

from docker_http_passthrough.api.client_auth import UpstreamAuth, basic_credentials, choose_upstream_auth
from docker_http_passthrough.shared import manifest as mf
from docker_http_passthrough.shared.errors import (
    BadRequest,
    Forbidden,
    InvalidContent,
    NotFound,
    PassthroughError,
    TimedOut,
    Unauthorized,
    Unreachable,
)
from docker_http_passthrough.shared.jobs import image_key
from docker_http_passthrough.shared.name import FilenameError, ImageName, parse_filename
from docker_http_passthrough.shared.platforms import Platform, PlatformError, parse_platform
from docker_http_passthrough.shared.reference import ReferenceError, reference_from_path
from docker_http_passthrough.shared.registry import RegistryClient
from docker_http_passthrough.shared.small_blobs import config_bytes, manifest_bytes, stored_blob
from docker_http_passthrough.shared.store import Store
from docker_http_passthrough.shared.targets import Credentials, RegistryTarget, target_for_reference, target_from_url
from docker_http_passthrough.shared.telemetry import tracer

log = logging.getLogger("docker_http_passthrough.api")

REMEMBERED_ERRORS = (NotFound, Unauthorized, Forbidden)
PLATFORM_PREFIX = "/platform/"
AUTH_ROUTES = ("/registry-auth/", "/ref-auth/")
STALE_WORTHY = (Unreachable, TimedOut)


@dataclass(frozen=True)
class ImageRequest:
    filename: str  # what the archive is called (Content-Disposition)
    target: RegistryTarget
    image: ImageName
    client_credentials: Credentials | None
    auth: UpstreamAuth
    platform: Platform  # from the path (/platform/<os>/<arch>[/<variant>]/…), else PLATFORM


@dataclass(frozen=True)
class Resolution:
    digest: str
    key: str
    stale_reason: str | None = None


class ErrorCache:
    """Recent failures per (registry, repository, tag or digest, platform, identity); in memory, identities are
    hashes."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.entries: dict[tuple[str, ...], tuple[float, PassthroughError]] = {}

    def get(self, key: tuple[str, ...]) -> PassthroughError | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry[0] < time.monotonic():
            del self.entries[key]
            return None
        return entry[1]

    def put(self, key: tuple[str, ...], error: PassthroughError) -> None:
        if self.seconds <= 0:
            return
        if len(self.entries) > 10_000:  # bound memory under a flood of distinct bad names
            now = time.monotonic()
            self.entries = {k: v for k, v in self.entries.items() if v[0] > now}
        self.entries[key] = (time.monotonic() + self.seconds, error)


class SharedLookups:
    """Registry lookups in flight, by what they ask and with which identity: a request asking the same as one
    in flight waits for its answer (or its error) instead of asking again. A requester that goes away does not
    cancel the lookup for the others; when the last one has gone, it is cancelled (its registry connection
    closes: upstream work nobody needs stops)."""

    def __init__(self) -> None:
        self.flights: dict[Hashable, tuple[asyncio.Future, list[int]]] = {}  # key -> (lookup, [waiters])

    async def run(self, key: Hashable, lookup: Callable[[], Awaitable[str]]) -> str:
        entry = self.flights.get(key)
        if entry is None:
            flight = asyncio.ensure_future(lookup())
            entry = self.flights[key] = (flight, [0])
            flight.add_done_callback(lambda done: self._landed(key, done))
        else:
            trace.get_current_span().set_attribute("dhp.resolution.shared", True)
        flight, waiters = entry
        waiters[0] += 1
        try:
            return await asyncio.shield(flight)
        finally:
            waiters[0] -= 1
            if not waiters[0] and not flight.done():
                # Forgotten at once: a request arriving now must not join a lookup that is being cancelled.
                if self.flights.get(key) is entry:
                    del self.flights[key]
                flight.cancel()

    def _landed(self, key: Hashable, flight: asyncio.Future) -> None:
        entry = self.flights.get(key)
        if entry is not None and entry[0] is flight:
            del self.flights[key]
        if not flight.cancelled():
            flight.exception()  # looked at: nobody may be waiting any more


def route_path(request: Request) -> str:
    """The request path without its `/platform/<os>/<arch>[/<variant>]` prefix: which route it is."""
    path = request.url.path
    if not path.startswith(PLATFORM_PREFIX):
        return path
    skip = 4 if "variant" in request.path_params else 3  # "", "platform", os, arch[, variant]
    return "/" + path.split("/", skip + 1)[skip + 1]


def auth_route(request: Request) -> bool:
    """/registry-auth/… and /ref-auth/…: the client must send registry credentials."""
    return route_path(request).startswith(AUTH_ROUTES)


def _platform(request: Request) -> Platform:
    params = request.path_params
    if "os" not in params:
        return parse_platform(request.app.state.settings.platform)
    try:
        return parse_platform("/".join(params[k] for k in ("os", "arch", "variant") if k in params))
    except PlatformError as exc:
        raise BadRequest(str(exc), code="bad_platform") from None


def _target_source(request: Request, target: RegistryTarget) -> str:
    """"url" when the request path names the registry (unless /ref/ names the configured one), else "settings"."""
    named = "host" in request.path_params or target != request.app.state.default_target
    return "url" if named else "settings"


def _image_from_filename(request: Request) -> tuple[RegistryTarget, ImageName, str]:
    params = request.path_params
    target = request.app.state.default_target
    if "host" in params:
        try:
            target = target_from_url(params["scheme"], params["host"])
        except ValueError as exc:
            raise BadRequest(str(exc), code="bad_registry") from None
    filename = params["filename"]
    try:
        image = parse_filename(filename, docker_hub=target.is_docker_hub,
                               default_namespace=request.app.state.settings.registry_default_namespace)
    except FilenameError as exc:
        raise BadRequest(str(exc), code=f"bad_filename:{exc.rule}") from None
    return target, image, filename


def _image_from_reference(request: Request) -> tuple[RegistryTarget, ImageName, str]:
    try:
        ref = reference_from_path(request.path_params["reference"])
        target = target_for_reference(ref.domain, request.app.state.default_target)
    except ReferenceError as exc:
        raise BadRequest(str(exc), code=f"bad_reference:{exc.rule}") from None
    except ValueError as exc:
        raise BadRequest(str(exc), code="bad_registry") from None
    image = ImageName(ref.path, ref.tag, ref.digest)
    # As the page and `url` name the file on the switch (routes.local_filename): a digest by its first 12 digits.
    return target, image, f"{ref.path.rsplit('/', 1)[-1]}_{image.tag or image.archive_tag[:19]}.tar"


def parse_image_request(request: Request) -> ImageRequest:
    with tracer().start_as_current_span("parse_image_request") as span:
        wanted = _parse_image_request(request)
        span.set_attributes(image_attributes(request, wanted))
        return wanted


def image_attributes(request: Request, wanted: ImageRequest) -> dict:
    """What every span of a download says about the image and the registry (never a credential)."""
    settings = request.app.state.settings
    return {
        "container.image.name": f"{wanted.target.name}/{wanted.image.repository}",
        "container.image.tag": wanted.image.tag or "",
        "oci.manifest.pinned_digest": wanted.image.digest or "",
        "dhp.platform": str(wanted.platform),
        "registry.name": wanted.target.name,
        "registry.url": wanted.target.api_url,
        "registry.target.source": _target_source(request, wanted.target),
        "registry.default_namespace": settings.registry_default_namespace or "",
        "registry.auth.configured": wanted.auth.source != "anonymous",
        "registry.client_auth.mode": settings.registry_client_auth,
        "registry.client_auth.credentials_present": "authorization" in request.headers,
        "registry.client_auth.credentials_used": wanted.client_credentials is not None,
    }


def _parse_image_request(request: Request) -> ImageRequest:
    settings = request.app.state.settings
    platform = _platform(request)
    by_reference = "reference" in request.path_params
    target, image, filename = (_image_from_reference if by_reference else _image_from_filename)(request)
    default = request.app.state.default_target
    # REGISTRY_CLIENT_AUTH=required guards the configured registry: /docker/…, and /ref/… when it names it.
    requires_client_auth = auth_route(request) or (settings.registry_client_auth == "required" and target == default
                                                  and route_path(request).startswith(("/docker/", "/ref/")))
    # Known now, even if the credentials check below refuses the request: the route span should say it.
    getattr(request.state, "span_attributes", {}).update({
        "container.image.name": f"{target.name}/{image.repository}", "container.image.tag": image.tag or "",
        "registry.name": target.name, "registry.url": target.api_url, "dhp.platform": str(platform),
        "registry.target.source": _target_source(request, target)})
    with tracer().start_as_current_span("extract_registry_client_credentials") as span:
        client = None
        if auth_route(request) or settings.registry_client_auth != "off":
            client = basic_credentials(request.headers.get("authorization"))
        span.set_attribute("registry.client_auth.mode", settings.registry_client_auth)
        span.set_attribute("registry.client_auth.credentials_present", "authorization" in request.headers)
        span.set_attribute("registry.client_auth.credentials_used", client is not None)
        if requires_client_auth and client is None:
            raise Unauthorized("this route needs your registry credentials (HTTP Basic)", code="credentials_required")
    return ImageRequest(
        filename=filename,
        target=target,
        image=image,
        client_credentials=client,
        auth=choose_upstream_auth(settings, target, default, client),
        platform=platform,
    )


async def resolve_platform_digest(client: RegistryClient, store: Store, reference: str, platform: Platform) -> str:
    """Tag or digest → digest of the platform's image manifest: one HEAD (with the request's credentials, even for
    a digest pin: it proves access), plus, when not stored yet, the index GET — or, for a single-platform image,
    the manifest and config GETs that check its platform (the preparation then finds them stored)."""
    head = await client.head_manifest(reference)
    if reference.startswith("sha256:") and head.digest != reference:
        raise InvalidContent(f"the registry {client.target.name} answered {head.digest} for the digest {reference}")
    if head.media_type in mf.INDEXES:
        index = await manifest_bytes(client, store, head.digest)
        return mf.select_platform(index, platform).digest
    manifest = mf.parse_image_manifest(await manifest_bytes(client, store, head.digest))
    mf.check_limits(manifest, client.settings.image_max_layers, client.settings.image_max_bytes)
    config = stored_blob(client, store, manifest.config.digest) or await config_bytes(
        client, store, manifest.config.digest, manifest.config.size)
    mf.check_config_platform(config, platform)
    return head.digest


async def resolve(request: Request, wanted: ImageRequest) -> Resolution:
    with tracer().start_as_current_span("resolve_manifest") as span:
        resolution = await _resolve(request, wanted)
        span.set_attribute("oci.manifest.digest", resolution.digest)
        span.set_attribute("dhp.served_stale", resolution.stale_reason is not None)
        return resolution


async def _resolve(request: Request, wanted: ImageRequest) -> Resolution:
    state = request.app.state
    settings = state.settings
    target, image, auth = wanted.target, wanted.image, wanted.auth
    identity = auth.credentials.identity if auth.credentials else (auth.token and "token") or "anonymous"
    error_key = (target.api_url, image.repository, image.reference, str(wanted.platform), identity)
    remembered = state.error_cache.get(error_key)
    if remembered is not None:
        trace.get_current_span().set_attribute("dhp.error_cache.hit", True)
        raise remembered
    # Retries and Retry-After waits included, the resolution ends by RESOLVE_TIMEOUT: the device waits for headers.
    until = asyncio.get_running_loop().time() + settings.resolve_timeout
    client = RegistryClient(state.registries, target, image.repository, auth.credentials, auth.token, until=until)
    try:
        digest = await state.lookups.run(error_key, lambda: resolve_platform_digest(
            client, state.store, image.reference, wanted.platform))
    except REMEMBERED_ERRORS as exc:
        state.error_cache.put(error_key, exc)
        raise
    except STALE_WORTHY as exc:
        stale = state.store.tag_digest(target.api_url, image.repository, image.reference, str(wanted.platform))
        key = stale and image_key(target.api_url, image.repository, stale)
        if settings.serve_stale and auth.source != "client" and key and state.store.get_image(key):
            log.warning("serving %s/%s (%s) stale (%s) because the registry failed: %s", target.name, image,
                        wanted.platform, stale, exc.message)
            return Resolution(stale, key, stale_reason=exc.message)
        raise
    state.store.remember_tag(target.api_url, image.repository, image.reference, str(wanted.platform), digest)
    return Resolution(digest, image_key(target.api_url, image.repository, digest))
