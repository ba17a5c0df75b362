"""One registry base URL as a client talks to it: authentication, and one logical request with its retries.

Auth follows the registry's own challenge: a 401 carrying `WWW-Authenticate: Bearer realm=…` leads to a
pull-scoped token fetched from the realm (with Basic credentials when we have some), `Basic realm=…` leads to
direct Basic. What registries said about auth is kept in the process's `AuthCache` (`registry_auth`).
A request is retried (see `retry`) after connection errors and "try again" statuses, never after other 4xx;
every attempt is a client span. A `RegistryClient` has one endpoint, or two behind REGISTRY_MIRROR.
"""

from __future__ import annotations

import itertools
import ssl
from typing import TYPE_CHECKING, Iterator
from urllib.parse import quote, urlsplit

import httpx
from opentelemetry.trace import SpanKind

from docker_http_passthrough.shared.errors import (
    BadRequest,
    Forbidden,
    LimitExceeded,
    PassthroughError,
    TimedOut,
    Unauthorized,
    Unreachable,
)
from docker_http_passthrough.shared.metrics import UPSTREAM
from docker_http_passthrough.shared.rate_limits import describe
from docker_http_passthrough.shared.registry_auth import Challenge, TokenKey, parse_challenge
from docker_http_passthrough.shared.retry import RETRYABLE_STATUSES, Attempts, GiveUp
from docker_http_passthrough.shared.targets import Credentials, RegistryTarget
from docker_http_passthrough.shared.telemetry import tracer

if TYPE_CHECKING:
    from docker_http_passthrough.shared.registry import Registries

# A token endpoint's answer is a small JSON document; read no more than this of it.
TOKEN_MAX_BYTES = 1 << 20


async def read_capped(response: httpx.Response, cap: int, setting: str | None, what: str) -> bytes:
    """The body (decoded, as `response.content` would be), read piece by piece and never past `cap` bytes: a
    larger one fails naming `setting`."""
    declared = response.headers.get("content-length", "")
    too_large = LimitExceeded(f"{what} is larger than {f'{setting}=' if setting else ''}{cap} bytes")
    if declared.isdigit() and int(declared) > cap:
        raise too_large
    pieces, size = [], 0
    async for piece in response.aiter_bytes():
        size += len(piece)
        if size > cap:
            raise too_large
        pieces.append(piece)
    return b"".join(pieces)


def transport_failure(exc: httpx.HTTPError, who: str) -> PassthroughError:
    """What a user is told about a request that got no HTTP answer from `who` ("the registry x")."""
    if isinstance(exc, httpx.TimeoutException):
        return TimedOut(f"{who} did not answer in time")
    return Unreachable(f"{who} is unreachable ({type(exc).__name__})")


def _tls_refusal(exc: httpx.HTTPError, host: str) -> PassthroughError | None:
    cause = exc.__cause__ or exc.__context__
    while cause is not None and not isinstance(cause, ssl.SSLCertVerificationError):
        cause = cause.__cause__ or cause.__context__
    if cause is None and "CERTIFICATE_VERIFY_FAILED" not in str(exc):
        return None
    reason = getattr(cause, "verify_message", None) or "certificate verify failed"
    return Unreachable(f"the TLS certificate of {host} does not verify ({reason}): trust its CA with "
                       "REGISTRY_CA_BUNDLE or REGISTRY_CA_BUNDLES, or list the host in REGISTRY_INSECURE_HOSTS",
                       code="registry_tls")


class Endpoint:
    """Requests to one registry base URL for one repository, with one set of credentials."""

    def __init__(self, registries: Registries, target: RegistryTarget, repository: str,
                 credentials: Credentials | None = None, bearer_token: str | None = None):
        self.http = registries.http_for(target.api_url)
        self.auth = registries.auth
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

    # --- one attempt, and one request with its retries

    def span_attributes(self, method: str, url: str, template: str, operation: str) -> dict:
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

    async def _attempt(self, request: httpx.Request, span_name: str, attributes: dict) -> httpx.Response:
        operation = attributes["registry.operation"]
        with tracer().start_as_current_span(span_name, kind=SpanKind.CLIENT, attributes=attributes) as span:
            try:
                response = await self.http.send(request, stream=True, follow_redirects=True)
            except httpx.HTTPError as exc:
                UPSTREAM.labels(operation, "timeout" if isinstance(exc, httpx.TimeoutException) else "error").inc()
                span.set_attribute("error.type", "timeout" if isinstance(exc, httpx.TimeoutException)
                                   else type(exc).__name__)
                raise
            UPSTREAM.labels(operation, str(response.status_code)).inc()
            if "ratelimit-remaining" in response.headers:
                self.rate_limits.observe(self.target.name, response.headers)
            span.set_attribute("http.response.status_code", response.status_code)
            if request.method == "GET" and response.headers.get("content-length", "").isdigit():
                span.set_attribute("http.response.body.size", int(response.headers["content-length"]))
            if response.status_code >= 400:
                span.set_attribute("error.type", str(response.status_code))
        return response

    async def request(self, method: str, url: str | httpx.URL, headers: dict[str, str], attempts: Attempts, *,
                      span_name: str, attributes: dict, what: str, who: str | None = None,
                      resends: Iterator[int] | None = None) -> httpx.Response:
        """An open streaming response that is not a "try again", retried until the attempts give up.
        `resends` numbers the attempts on the spans (http.request.resend_count)."""
        who = who or f"the registry {self.target.name}"
        while True:
            request = self.http.build_request(method, url, headers=headers)
            if resends is not None:
                attributes = {**attributes, "http.request.resend_count": next(resends)}
            try:
                response = await self._attempt(request, span_name, attributes)
            except httpx.InvalidURL:
                raise BadRequest(f"{url} is not a URL a registry can have", code="bad_registry") from None
            except httpx.TooManyRedirects:
                raise LimitExceeded(f"{what} at {self.target.name} was redirected more than "
                                    f"UPSTREAM_MAX_REDIRECTS={self.http.max_redirects} times") from None
            except httpx.UnsupportedProtocol as exc:
                raise Unreachable(f"{what} at {self.target.name} led to an unsupported URL ({exc})") from None
            except httpx.HTTPError as exc:
                refusal = _tls_refusal(exc, request.url.host)
                if refusal is not None:
                    raise refusal from None
                try:
                    await attempts.pause(None, f"{what}: {type(exc).__name__}")
                except GiveUp as give_up:
                    failure = transport_failure(exc, who)
                    raise type(failure)(f"{failure.message}: {give_up}", code=failure.code) from None
                continue
            if response.status_code not in RETRYABLE_STATUSES:
                return response
            await response.aclose()
            try:
                await attempts.pause(response, f"{what}: HTTP {response.status_code}")
            except GiveUp as give_up:
                if response.status_code == 429:
                    said = describe(response.headers)
                    raise Unreachable(f"{who} is rate-limiting requests (HTTP 429{', ' + said if said else ''}): "
                                      f"{give_up}", code="rate_limited") from None
                raise Unreachable(f"{who} answered HTTP {response.status_code}: {give_up}") from None

    # --- auth

    async def _fetch_token(self, params: dict[str, str], attempts: Attempts) -> str:
        realm = self.target.token_url or params.get("realm")
        if not realm:
            raise Unreachable("the registry asked for a bearer token but named no token endpoint")
        service = self.target.service or params.get("service", "")
        key = self._token_key(params)
        cached = self.auth.token(key)
        if cached and f"Bearer {cached}" != self._authorization:
            return cached
        query = {"scope": self.scope, **({"service": service} if service else {})}
        headers = {"Authorization": self.credentials.basic_header()} if self.credentials else {}
        attributes = {**self.span_attributes("GET", realm, "{registry_token_endpoint}", "token"),
                      "registry.auth.service": service, "registry.auth.scope_present": True,
                      "registry.auth.type": "bearer", "registry.auth.configured": self.credentials is not None}
        try:
            url = httpx.URL(realm).copy_merge_params(query)
        except httpx.InvalidURL:
            raise Unreachable("the registry named a token endpoint that is not a URL") from None
        response = await self.request("GET", url, headers, attempts, span_name="GET {registry_token_endpoint}",
                                      attributes=attributes, what="the token request",
                                      who="the registry's token endpoint")
        try:
            if response.status_code in (401, 403):
                raise (Forbidden if self.credentials else Unauthorized)(
                    "the registry's token endpoint refused the credentials" if self.credentials
                    else "the registry requires credentials")
            if response.status_code != 200:
                raise Unreachable(f"the registry's token endpoint answered HTTP {response.status_code}")
            body = await read_capped(response, TOKEN_MAX_BYTES, None, "the token endpoint's answer")
        finally:
            await response.aclose()
        return self._remember_token(key, body)

    def _remember_token(self, key: TokenKey, body: bytes) -> str:
        try:
            answer = httpx.Response(200, content=body).json()
            token = answer.get("token") or answer.get("access_token")
            expires_in = float(answer.get("expires_in") or 60)
        except (ValueError, AttributeError):
            raise Unreachable("the registry's token endpoint sent an answer that is not JSON") from None
        if not token or not isinstance(token, str):
            raise Unreachable("the registry's token endpoint sent no token")
        self.auth.remember_token(key, token, expires_in)
        return token

    async def _authorize(self, response: httpx.Response, attempts: Attempts) -> bool:
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
            self._authorization = f"Bearer {await self._fetch_token(params, attempts)}"
            self._fresh_token = True
            return True
        if self.credentials and self._authorization != self.credentials.basic_header():
            self._authorization = self.credentials.basic_header()
            return True
        return False

    def refusal(self, response: httpx.Response) -> PassthroughError:
        if response.status_code == 403 or (response.status_code == 401 and self.credentials):
            return Forbidden(f"the registry {self.target.name} refused the credentials for {self.repository}")
        return Unauthorized(f"the registry {self.target.name} requires credentials for {self.repository}")

    async def send(self, method: str, kind: str, reference: str, headers: dict[str, str], operation: str,
                   attempts: Attempts, what: str) -> httpx.Response:
        """A manifest or blob request, authorized as the registry asks; an open streaming response."""
        url = f"{self.target.api_url}/v2/{self.repository}/{kind}/{quote(reference, safe=':@')}"
        template = "/v2/{repository}/manifests/{reference}" if kind == "manifests" else "/v2/{repository}/blobs/{digest}"
        attributes = self.span_attributes(method, url, template, operation)
        scheme, params = self._known_challenge()
        if self._authorization is None and scheme == "bearer" and not self.static_token:
            # The registry wants tokens (we know its endpoint): fetch one now instead of after a 401.
            self._authorization = f"Bearer {await self._fetch_token(params, attempts)}"
            self._fresh_token = True
        resends = itertools.count()
        for _ in range(3):
            sent = {**headers, **({"Authorization": self._authorization} if self._authorization else {})}
            attributes["registry.auth.type"] = (self._authorization or "anonymous").split(" ")[0].lower()
            response = await self.request(method, url, sent, attempts, span_name=f"{method} {template}",
                                          attributes=dict(attributes), what=what, resends=resends)
            if response.status_code != 401:
                self._fresh_token = False
                return response
            await response.aclose()
            if not await self._authorize(response, attempts):
                raise self.refusal(response)
        raise self.refusal(response)

