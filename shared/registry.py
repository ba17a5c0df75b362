"""Registry V2 client: the manifest and blob requests to one registry, for one repository.

Auth follows the registry's own challenge: a 401 carrying `WWW-Authenticate: Bearer realm=…` leads to a
pull-scoped token fetched from the realm (with Basic credentials when we have some), `Basic realm=…` leads to
direct Basic. What registries said about auth is kept in the process's `AuthCache` (see `registry_auth`),
reached through `Registries`, which the API app and each worker process own.
"""

from __future__ import annotations

import asyncio
import hashlib
from contextlib import asynccontextmanager
from typing import AsyncIterator
from urllib.parse import quote, urlsplit

import httpx
from opentelemetry.trace import SpanKind

from docker_http_passthrough.shared import manifest as mf
from docker_http_passthrough.shared.digests import PREFIX, digest_of, sha256_digest
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
from docker_http_passthrough.shared.locks import LocalLocks, Locks
from docker_http_passthrough.shared.metrics import UPSTREAM
from docker_http_passthrough.shared.rate_limits import RateLimits, describe
from docker_http_passthrough.shared.registry_auth import AuthCache, Challenge, TokenKey, parse_challenge
from docker_http_passthrough.shared.settings import Settings
from docker_http_passthrough.shared.targets import Credentials, RegistryTarget
from docker_http_passthrough.shared.telemetry import tracer


class Registries:
    """One process's way to registries: an HTTP connection pool, and what registries told it about auth."""

    def __init__(self, http: httpx.AsyncClient, auth: AuthCache | None = None,
                 foreign_layer_hosts: tuple[str, ...] = (), blob_locks: Locks | None = None):
        self.http = http
        self.auth = AuthCache() if auth is None else auth
        self.foreign_layer_hosts = foreign_layer_hosts  # ALLOW_FOREIGN_LAYERS (see foreign_layers)
        self.rate_limits = RateLimits()
        # Small blobs being fetched, per (registry, repository, digest, identity): requests arriving together
        # share one GET (see small_blobs).
        self.fetches: dict[tuple[str, ...], asyncio.Future] = {}
        # Across processes too (API replicas and workers share Redis in two-tier mode): one GET per small blob.
        self.blob_locks: Locks = blob_locks or LocalLocks()

    async def __aenter__(self) -> "Registries":
        await self.http.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.http.__aexit__(*exc_info)


class RegistryClient:
    """Requests to one registry for one repository, with one set of credentials."""

    def __init__(self, registries: Registries, target: RegistryTarget, repository: str,
                 credentials: Credentials | None = None, bearer_token: str | None = None):
        self.http = registries.http
        self.auth = registries.auth
        self.fetches = registries.fetches
        self.blob_locks = registries.blob_locks
        self.foreign_layer_hosts = registries.foreign_layer_hosts
        self.rate_limits = registries.rate_limits
        self.target = target
        self.repository = repository
        self.credentials = credentials
        self.static_token = bearer_token
        self._authorization: str | None = None
        self._fresh_token = False  # the current token was fetched after the last 401
        if bearer_token:
            self._authorization = f"Bearer {bearer_token}"
            return
        # Reuse what earlier requests learned, so a warm request costs one round trip.
        scheme, params = self._known_challenge()
        if scheme == "bearer":
            cached = self.auth.token(self._token_key(params))
            if cached:
                self._authorization = f"Bearer {cached}"
        elif scheme == "basic" and credentials:
            self._authorization = credentials.basic_header()

    @property
    def identity(self) -> str:
        """Whose access this client has, as a cache key (never a secret itself)."""
        if self.credentials:
            return self.credentials.identity
        return "token:" + hashlib.sha256(self.static_token.encode()).hexdigest() if self.static_token else "anonymous"

    def _known_challenge(self) -> Challenge:
        if self.target.basic_only:
            return "basic", {}
        if self.target.token_url:
            return "bearer", {"realm": self.target.token_url, "service": self.target.service or ""}
        return self.auth.challenge(self.target.api_url)

    @property
    def scope(self) -> str:
        return f"repository:{self.repository}:pull"

    def _token_key(self, params: dict[str, str]) -> TokenKey:
        realm = self.target.token_url or params.get("realm", "")
        service = self.target.service or params.get("service", "")
        return (realm, service, self.scope, self.credentials.identity if self.credentials else "")

    async def _fetch_token(self, params: dict[str, str]) -> str:
        realm = self.target.token_url or params.get("realm")
        if not realm:
            raise Unreachable("the registry asked for a bearer token but named no token endpoint")
        service = self.target.service or params.get("service", "")
        key = self._token_key(params)
        cached = self.auth.token(key)
        if cached and f"Bearer {cached}" != self._authorization:
            return cached
        query = {"scope": self.scope}
        if service:
            query["service"] = service
        headers = {"Authorization": self.credentials.basic_header()} if self.credentials else {}
        attributes = {**self._span_attributes("GET", realm, "{registry_token_endpoint}", "token"),
                      "registry.auth.service": service, "registry.auth.scope_present": True,
                      "registry.auth.type": "bearer", "registry.auth.configured": self.credentials is not None}
        with tracer().start_as_current_span("GET {registry_token_endpoint}", kind=SpanKind.CLIENT,
                                            attributes=attributes) as span:
            try:
                response = await self.http.get(realm, params=query, headers=headers)
            except httpx.TimeoutException:
                UPSTREAM.labels("token", "timeout").inc()
                raise TimedOut("the registry's token endpoint did not answer in time") from None
            except httpx.HTTPError as exc:
                UPSTREAM.labels("token", "error").inc()
                raise Unreachable(f"the registry's token endpoint is unreachable: {type(exc).__name__}") from None
            UPSTREAM.labels("token", str(response.status_code)).inc()
            span.set_attribute("http.response.status_code", response.status_code)
            if response.status_code >= 400:
                span.set_attribute("error.type", str(response.status_code))
        if response.status_code in (401, 403):
            raise (Forbidden if self.credentials else Unauthorized)(
                "the registry's token endpoint refused the credentials" if self.credentials
                else "the registry requires credentials")
        if response.status_code != 200:
            raise Unreachable(f"the registry's token endpoint answered HTTP {response.status_code}")
        try:
            body = response.json()
            token = body.get("token") or body.get("access_token")
            expires_in = float(body.get("expires_in") or 60)
        except (ValueError, AttributeError):
            raise Unreachable("the registry's token endpoint sent an answer that is not JSON") from None
        if not token:
            raise Unreachable("the registry's token endpoint sent no token")
        self.auth.remember_token(key, token, expires_in)
        return token

    async def _authorize(self, response: httpx.Response) -> bool:
        """Prepare credentials after a 401; False when nothing new can be tried."""
        if self.static_token:
            return False
        scheme, params = parse_challenge(response.headers.get("www-authenticate", ""))
        if scheme not in ("bearer", "basic") and self.target.token_url and not self.target.basic_only:
            scheme, params = "bearer", {}  # no usable challenge, but we were told where tokens come from
        if scheme in ("bearer", "basic"):
            self.auth.remember_challenge(self.target.api_url, (scheme, params))
        if scheme == "bearer" and not self.target.basic_only:
            if self._fresh_token:
                return False  # a token fetched just now was refused: another one will be too
            self._authorization = f"Bearer {await self._fetch_token(params)}"
            self._fresh_token = True
            return True
        if self.credentials and self._authorization != self.credentials.basic_header():
            self._authorization = self.credentials.basic_header()
            return True
        return False

    def _refusal(self, response: httpx.Response) -> PassthroughError:
        if response.status_code == 403 or (response.status_code == 401 and self.credentials):
            return Forbidden(f"the registry {self.target.name} refused the credentials for {self.repository}")
        return Unauthorized(f"the registry {self.target.name} requires credentials for {self.repository}")

    def _span_attributes(self, method: str, url: str, template: str, operation: str) -> dict:
        parts = urlsplit(url)  # rebuilt from host and port: a realm from a challenge might carry userinfo
        host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else (parts.hostname or "")
        netloc = f"{host}:{parts.port}" if parts.port else host
        return {
            "http.request.method": method, "url.full": f"{parts.scheme}://{netloc}{parts.path}",
            "url.template": template, "url.scheme": parts.scheme, "server.address": parts.hostname or "",
            "server.port": parts.port or (443 if parts.scheme == "https" else 80),
            "registry.name": self.target.name, "registry.url": self.target.api_url, "registry.operation": operation,
            "oci.image.ref": f"{self.target.name}/{self.repository}",
        }

    async def _send(self, method: str, kind: str, reference: str, headers: dict[str, str], stream: bool,
                    operation: str) -> httpx.Response:
        url = f"{self.target.api_url}/v2/{self.repository}/{kind}/{quote(reference, safe=':@')}"
        template = "/v2/{repository}/manifests/{reference}" if kind == "manifests" else "/v2/{repository}/blobs/{digest}"
        attributes = self._span_attributes(method, url, template, operation)
        scheme, params = self._known_challenge()
        if self._authorization is None and scheme == "bearer" and not self.static_token:
            # The registry wants tokens (we know its endpoint): fetch one now instead of after a 401.
            self._authorization = f"Bearer {await self._fetch_token(params)}"
            self._fresh_token = True
        for attempt in range(3):
            if self._authorization:
                headers = {**headers, "Authorization": self._authorization}
            with tracer().start_as_current_span(f"{method} {template}", kind=SpanKind.CLIENT,
                                                attributes=attributes) as span:
                span.set_attribute("http.request.resend_count", attempt)
                span.set_attribute("registry.auth.type", (self._authorization or "anonymous").split(" ")[0].lower())
                request = self.http.build_request(method, url, headers=headers)
                try:
                    response = await self.http.send(request, stream=stream, follow_redirects=True)
                except httpx.InvalidURL:
                    raise BadRequest(f"{url} is not a URL a registry can have", code="bad_registry") from None
                except httpx.TimeoutException:
                    UPSTREAM.labels(operation, "timeout").inc()
                    span.set_attribute("error.type", "timeout")
                    raise TimedOut(f"the registry {self.target.name} did not answer in time") from None
                except httpx.HTTPError as exc:
                    UPSTREAM.labels(operation, "error").inc()
                    span.set_attribute("error.type", type(exc).__name__)
                    raise Unreachable(f"the registry {self.target.name} is unreachable ({type(exc).__name__})") from None
                UPSTREAM.labels(operation, str(response.status_code)).inc()
                if "ratelimit-remaining" in response.headers:
                    self.rate_limits.observe(self.target.name, response.headers)
                span.set_attribute("http.response.status_code", response.status_code)
                if method == "GET" and response.headers.get("content-length", "").isdigit():
                    span.set_attribute("http.response.body.size", int(response.headers["content-length"]))
                if response.status_code >= 400:
                    span.set_attribute("error.type", str(response.status_code))
            if response.status_code != 401:
                self._fresh_token = False
                return response
            await response.aclose()
            if not await self._authorize(response):
                raise self._refusal(response)
        raise self._refusal(response)

    def _check(self, response: httpx.Response, what: str) -> None:
        status = response.status_code
        if status in (200, 206):
            return
        if status == 404:
            raise NotFound(f"{what} not found at {self.target.name}")
        if status in (401, 403):
            raise self._refusal(response)
        if status == 429:
            said = describe(response.headers)
            raise Unreachable(f"the registry {self.target.name} is rate-limiting requests (HTTP 429"
                              f"{', ' + said if said else ''})", code="rate_limited")
        raise Unreachable(f"the registry {self.target.name} answered HTTP {status} for {what}")

    async def head_manifest(self, reference: str) -> mf.Descriptor:
        """Resolve a tag or digest without counting as a pull (Docker Hub counts GETs only)."""
        what = f"{self.repository}:{reference}" if not reference.startswith(PREFIX) else f"{self.repository}@{reference}"
        response = await self._send("HEAD", "manifests", reference, {"Accept": mf.ACCEPT}, False, "manifest_head")
        self._check(response, what)
        media_type = response.headers.get("content-type", "").split(";")[0].strip()
        digest = response.headers.get("docker-content-digest")
        if not digest:
            # Some registries omit the digest on HEAD; a GET tells it for sure.
            data, media_type = await self.get_manifest(reference)
            digest = sha256_digest(data)
            return mf.Descriptor(media_type, digest, len(data))
        mf.check_supported(media_type)
        return mf.Descriptor(media_type, digest, int(response.headers.get("content-length") or 0))

    async def get_manifest(self, reference: str) -> tuple[bytes, str]:
        """GET a manifest; a digest reference is verified against the bytes."""
        response = await self._send("GET", "manifests", reference, {"Accept": mf.ACCEPT}, False, "manifest_get")
        self._check(response, f"manifest {self.repository}@{reference}")
        data = response.content
        if reference.startswith(PREFIX) and sha256_digest(data) != reference:
            raise InvalidContent(f"manifest {reference} from {self.target.name} does not match its digest")
        media_type = mf.media_type_of(data, response.headers.get("content-type", "").split(";")[0].strip())
        mf.check_supported(media_type)
        return data, media_type

    @asynccontextmanager
    async def blob(self, digest: str) -> AsyncIterator[httpx.Response]:
        """An open streaming response for a blob; read it with `aiter_raw()` to hash the bytes as sent."""
        response = await self._send("GET", "blobs", digest, {}, True, "blob_get")
        try:
            self._check(response, f"blob {digest} of {self.repository}")
            yield response
        finally:
            await response.aclose()

    async def blob_range(self, digest: str, start: int, length: int) -> bytes | None:
        """`length` bytes of a blob from `start`, or None if the registry ignores Range."""
        headers = {"Range": f"bytes={start}-{start + length - 1}"}
        response = await self._send("GET", "blobs", digest, headers, True, "blob_range")
        try:
            if response.status_code != 206:
                return None  # a 200 would be the whole blob: do not read it
            data = await response.aread()
            return data if len(data) == length else None
        finally:
            await response.aclose()

    async def get_blob(self, digest: str, limit: int = 64 << 20) -> bytes:
        """A small blob (an image config), verified against its digest."""
        hasher = hashlib.sha256()
        chunks = []
        size = 0
        async with self.blob(digest) as response:
            async for chunk in response.aiter_raw():
                size += len(chunk)
                if size > limit:
                    raise InvalidContent(f"blob {digest} is larger than {limit} bytes")
                hasher.update(chunk)
                chunks.append(chunk)
        if digest_of(hasher) != digest:
            raise InvalidContent(f"blob {digest} from {self.target.name} does not match its digest")
        return b"".join(chunks)


def new_http_client(settings: Settings) -> httpx.AsyncClient:
    timeout = httpx.Timeout(settings.upstream_timeout, connect=min(settings.upstream_timeout, 10.0))
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    return httpx.AsyncClient(timeout=timeout, limits=limits, follow_redirects=False,
                             headers={"User-Agent": "docker-http-passthrough"})
