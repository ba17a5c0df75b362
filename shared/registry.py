"""Registry V2 client: which registry, with which credentials, and the manifest and blob requests.

Auth follows the registry's own challenge: a 401 carrying `WWW-Authenticate: Bearer realm=…` leads to a
pull-scoped token fetched from the realm (with Basic credentials when we have some), `Basic realm=…` leads to
direct Basic. Tokens are cached in memory per (realm, service, scope, identity) until shortly before expiry.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator
from urllib.parse import quote, urlsplit

import httpx
from opentelemetry.trace import SpanKind

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
from docker_http_passthrough.shared.metrics import UPSTREAM
from docker_http_passthrough.shared.name import DOCKER_HUB_HOSTS
from docker_http_passthrough.shared.settings import DOCKER_HUB_API, Settings
from docker_http_passthrough.shared.telemetry import tracer

DOCKER_HUB_TOKEN_URL = "https://auth.docker.io/token"
DOCKER_HUB_SERVICE = "registry.docker.io"
_HOST_RE = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
                      r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")
# Refresh a cached token this long before the registry says it expires.
_TOKEN_MARGIN = 10.0


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    @property
    def identity(self) -> str:
        """A stable, non-reversible key for caches: never the password itself."""
        return hashlib.sha256(f"{self.username}\0{self.password}".encode()).hexdigest()

    def basic_header(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


@dataclass(frozen=True)
class RegistryTarget:
    """One registry: where its API is, what it is called in image names, and how it hands out tokens."""

    api_url: str  # scheme://host[:port], no trailing slash
    name: str  # host[:port] as users write it; "docker.io" for Docker Hub
    token_url: str | None = None  # known token endpoint; None = learn it from the challenge
    service: str | None = None
    basic_only: bool = False  # REGISTRY_AUTH_URL explicitly empty: never look for a token endpoint

    @property
    def is_docker_hub(self) -> bool:
        return self.name in DOCKER_HUB_HOSTS

    @property
    def repo_tag_host(self) -> str | None:
        """Registry part of the RepoTags entry; None gives Docker Hub's short form."""
        return None if self.is_docker_hub else self.name

    def to_dict(self) -> dict:
        return {"api_url": self.api_url, "name": self.name, "token_url": self.token_url,
                "service": self.service, "basic_only": self.basic_only}

    @classmethod
    def from_dict(cls, data: dict) -> "RegistryTarget":
        return cls(**data)


def docker_hub_target() -> RegistryTarget:
    return RegistryTarget(DOCKER_HUB_API, "docker.io", DOCKER_HUB_TOKEN_URL, DOCKER_HUB_SERVICE)


def _valid_host(host: str) -> bool:
    if not _HOST_RE.match(host):
        return False
    if host.startswith("["):
        address, _, rest = host[1:].partition("]")
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            return False
        port = rest[1:] if rest else None
    else:
        port = host.rpartition(":")[2] if ":" in host else None
    return port is None or (port.isdigit() and 0 < int(port) < 65536)


def target_from_url(scheme: str, host: str) -> RegistryTarget:
    """The registry named in a request path (`/registry/{scheme}/{host}/…`); host may carry a port."""
    if scheme not in ("http", "https"):
        raise ValueError(f'registry scheme must be "http" or "https", not "{scheme}"')
    if not _valid_host(host):
        raise ValueError(f'"{host}" is not a registry host (expected host or host:port, port 1-65535)')
    if host.lower() in DOCKER_HUB_HOSTS:
        return docker_hub_target()
    return RegistryTarget(f"{scheme}://{host.lower()}", host.lower())


def target_from_settings(settings: Settings) -> RegistryTarget:
    parts = urlsplit(settings.registry_url)
    host = parts.netloc.lower()
    if host in DOCKER_HUB_HOSTS:
        base = docker_hub_target()
        name = base.name
    else:
        base = RegistryTarget(f"{parts.scheme}://{host}", host)
        name = settings.registry_name or host
    return RegistryTarget(
        api_url=base.api_url if host in DOCKER_HUB_HOSTS else settings.registry_url,
        name=name,
        token_url=settings.registry_auth_url or base.token_url,
        service=settings.registry_service or base.service,
        basic_only=settings.registry_auth_url == "",
    )


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="…",service="…"` → ("bearer", {realm, service, …})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {k.lower(): v for k, v in re.findall(r'(\w+)="([^"]*)"', rest)}
    return scheme.lower(), params


@dataclass
class _Token:
    value: str
    expires: float


# Per process, in memory only: tokens by (realm, service, scope, identity); challenges by registry API URL.
_token_cache: dict[tuple[str, str, str, str], _Token] = {}
_known_challenges: dict[str, tuple[str, dict[str, str]]] = {}
# Clients name registries and credentials, so the caches are bounded: expired tokens go first, then the oldest.
_CACHE_LIMIT = 10_000


def _remember(cache: dict, key: object, value: object) -> None:
    if key not in cache and len(cache) >= _CACHE_LIMIT:
        now = time.time()
        for stale in [k for k, v in cache.items() if isinstance(v, _Token) and v.expires <= now]:
            del cache[stale]
        while len(cache) >= _CACHE_LIMIT:
            del cache[next(iter(cache))]
    cache[key] = value


class RegistryClient:
    """Requests to one registry for one repository, with one set of credentials."""

    def __init__(self, http: httpx.AsyncClient, target: RegistryTarget, repository: str,
                 credentials: Credentials | None = None, bearer_token: str | None = None):
        self.http = http
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
            cached = _token_cache.get(self._token_key(params))
            if cached and cached.expires > time.time():
                self._authorization = f"Bearer {cached.value}"
        elif scheme == "basic" and credentials:
            self._authorization = credentials.basic_header()

    def _known_challenge(self) -> tuple[str, dict[str, str]]:
        if self.target.basic_only:
            return "basic", {}
        if self.target.token_url:
            return "bearer", {"realm": self.target.token_url, "service": self.target.service or ""}
        return _known_challenges.get(self.target.api_url, ("", {}))

    @property
    def scope(self) -> str:
        return f"repository:{self.repository}:pull"

    def _token_key(self, params: dict[str, str]) -> tuple[str, str, str, str]:
        realm = self.target.token_url or params.get("realm", "")
        service = self.target.service or params.get("service", "")
        return (realm, service, self.scope, self.credentials.identity if self.credentials else "")

    async def _fetch_token(self, params: dict[str, str]) -> str:
        realm = self.target.token_url or params.get("realm")
        if not realm:
            raise Unreachable("the registry asked for a bearer token but named no token endpoint")
        service = self.target.service or params.get("service", "")
        key = self._token_key(params)
        cached = _token_cache.get(key)
        if cached and cached.expires > time.time() and f"Bearer {cached.value}" != self._authorization:
            return cached.value
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
        _remember(_token_cache, key, _Token(token, time.time() + max(expires_in - _TOKEN_MARGIN, 1.0)))
        return token

    async def _authorize(self, response: httpx.Response) -> bool:
        """Prepare credentials after a 401; False when nothing new can be tried."""
        if self.static_token:
            return False
        scheme, params = parse_challenge(response.headers.get("www-authenticate", ""))
        if scheme not in ("bearer", "basic") and self.target.token_url and not self.target.basic_only:
            scheme, params = "bearer", {}  # no usable challenge, but we were told where tokens come from
        if scheme in ("bearer", "basic"):
            _remember(_known_challenges, self.target.api_url, (scheme, params))
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
            raise Unreachable(f"the registry {self.target.name} is rate-limiting requests (HTTP 429)", code="rate_limited")
        raise Unreachable(f"the registry {self.target.name} answered HTTP {status} for {what}")

    async def head_manifest(self, reference: str) -> mf.Descriptor:
        """Resolve a tag or digest without counting as a pull (Docker Hub counts GETs only)."""
        what = f"{self.repository}:{reference}" if not reference.startswith("sha256:") else f"{self.repository}@{reference}"
        response = await self._send("HEAD", "manifests", reference, {"Accept": mf.ACCEPT}, False, "manifest_head")
        self._check(response, what)
        media_type = response.headers.get("content-type", "").split(";")[0].strip()
        digest = response.headers.get("docker-content-digest")
        if not digest:
            # Some registries omit the digest on HEAD; a GET tells it for sure.
            data, media_type = await self.get_manifest(reference)
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            return mf.Descriptor(media_type, digest, len(data))
        mf.check_supported(media_type)
        return mf.Descriptor(media_type, digest, int(response.headers.get("content-length") or 0))

    async def get_manifest(self, reference: str) -> tuple[bytes, str]:
        """GET a manifest; a digest reference is verified against the bytes."""
        response = await self._send("GET", "manifests", reference, {"Accept": mf.ACCEPT}, False, "manifest_get")
        self._check(response, f"manifest {self.repository}@{reference}")
        data = response.content
        if reference.startswith("sha256:") and "sha256:" + hashlib.sha256(data).hexdigest() != reference:
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
        if "sha256:" + hasher.hexdigest() != digest:
            raise InvalidContent(f"blob {digest} from {self.target.name} does not match its digest")
        return b"".join(chunks)


def new_http_client(settings: Settings) -> httpx.AsyncClient:
    timeout = httpx.Timeout(settings.upstream_timeout, connect=min(settings.upstream_timeout, 10.0))
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    return httpx.AsyncClient(timeout=timeout, limits=limits, follow_redirects=False,
                             headers={"User-Agent": "docker-http-passthrough"})
