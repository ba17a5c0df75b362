"""Unit tests for shared.registry: auth flows, token cache, errors, verification, targets.

No network: the registry, its token endpoint and a CDN are an in-memory fake behind httpx.MockTransport that
records every request, so each test checks what the client actually sent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import types

import httpx
import pytest

import docker_http_passthrough.shared.registry as registry
from docker_http_passthrough.shared import manifest as mf
from docker_http_passthrough.shared.errors import Forbidden, InvalidContent, NotFound, TimedOut, Unauthorized, Unreachable, Unsupported
from docker_http_passthrough.shared.registry import (
    DOCKER_HUB_SERVICE,
    DOCKER_HUB_TOKEN_URL,
    Credentials,
    RegistryClient,
    RegistryTarget,
    target_from_settings,
    target_from_url,
)
from docker_http_passthrough.shared.settings import load_settings

REG = "https://reg.example"
REALM = "https://auth.example/token"
SERVICE = "reg.example"
REPO = "team/app"
pytestmark = pytest.mark.usefixtures("fresh_registry_caches")


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


MANIFEST = json.dumps({
    "schemaVersion": 2,
    "mediaType": mf.DOCKER_MANIFEST,
    "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": sha(b"{}"), "size": 2},
    "layers": [],
}, indent=3).encode()
BLOB = b"some config blob \x00\x01\x02" * 50

class Chunks(httpx.AsyncByteStream):
    """A response body as a real transport gives it: not read yet, in several chunks."""

    def __init__(self, data: bytes, size: int = 1000):
        self.data, self.size = data, size

    async def __aiter__(self):
        for i in range(0, len(self.data), self.size):
            yield self.data[i:i + self.size]


def streamed(data: bytes, status: int = 200) -> httpx.Response:
    return httpx.Response(status, headers={"Content-Length": str(len(data))}, stream=Chunks(data))


_PATH_RE = re.compile(r"^/v2/(?P<repo>.+)/(?P<kind>manifests|blobs)/(?P<ref>[^/]+)$")


class FakeRegistry:
    """A V2 registry at reg.example with its token endpoint at auth.example; records every request."""

    def __init__(self, auth: str | None = None, users: dict[str, str] | None = None, anonymous_tokens: bool = True,
                 expires_in: float = 300, realm: str = REALM, challenge_service: str = SERVICE):
        self.auth = auth  # None (open), "bearer" or "basic"
        self.users = users or {}
        self.anonymous_tokens = anonymous_tokens
        self.expires_in = expires_in
        self.realm = realm
        self.challenge_service = challenge_service
        self.requests: list[httpx.Request] = []
        self.tokens: dict[str, tuple[str | None, str | None]] = {}  # token -> (user, scope)
        self.issued = 0
        self.reject_all_tokens = False
        self.manifests: dict[str, tuple[bytes, str]] = {"v1": (MANIFEST, mf.DOCKER_MANIFEST),
                                                       sha(MANIFEST): (MANIFEST, mf.DOCKER_MANIFEST)}
        self.blobs: dict[str, bytes] = {sha(BLOB): BLOB}
        self.send_digest_on_head = True
        self.override = None  # request -> Response | None, tried first

    # --- plumbing
    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handle), follow_redirects=False)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.override is not None:
            response = self.override(request)
            if response is not None:
                return response
        if request.url.host == "auth.example":
            return self._token(request)
        if request.url.host == "reg.example":
            return self._registry(request)
        return httpx.Response(599)

    def to(self, host: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.host == host]

    @property
    def registry_requests(self) -> list[httpx.Request]:
        return self.to("reg.example")

    @property
    def token_requests(self) -> list[httpx.Request]:
        return self.to("auth.example")

    def _user(self, header: str | None) -> str | None | bool:
        """None: no credentials; False: wrong ones; else the user name."""
        if not header:
            return None
        if not header.startswith("Basic "):
            return False
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return user if self.users.get(user) == password else False

    def _token(self, request: httpx.Request) -> httpx.Response:
        user = self._user(request.headers.get("authorization"))
        if user is False or (user is None and not self.anonymous_tokens):
            return httpx.Response(401, json={"details": "bad credentials"})
        self.issued += 1
        token = f"tok{self.issued}"
        self.tokens[token] = (user, request.url.params.get("scope"))
        return httpx.Response(200, json={"token": token, "expires_in": self.expires_in})

    def _challenge(self) -> dict[str, str]:
        if self.auth == "bearer":
            return {"WWW-Authenticate": f'Bearer realm="{self.realm}",service="{self.challenge_service}"'}
        return {"WWW-Authenticate": 'Basic realm="Registry Realm"'}

    def _allowed(self, request: httpx.Request, repo: str) -> bool:
        header = request.headers.get("authorization", "")
        if self.auth is None:
            return True
        if self.auth == "basic":
            return bool(self._user(header))
        if not header.startswith("Bearer ") or self.reject_all_tokens:
            return False
        grant = self.tokens.get(header[7:])
        return grant is not None and grant[1] == f"repository:{repo}:pull"

    def _registry(self, request: httpx.Request) -> httpx.Response:
        match = _PATH_RE.match(request.url.path)
        if not match:
            return httpx.Response(404)
        if not self._allowed(request, match["repo"]):
            return httpx.Response(401, headers=self._challenge(), json={"errors": [{"code": "UNAUTHORIZED"}]})
        if match["repo"] not in (REPO, "team/other"):
            return httpx.Response(404)
        if match["kind"] == "manifests":
            if match["ref"] not in self.manifests:
                return httpx.Response(404)
            data, media_type = self.manifests[match["ref"]]
            headers = {"Content-Type": media_type}
            if request.method == "HEAD":
                headers["Content-Length"] = str(len(data))
                if self.send_digest_on_head:
                    headers["Docker-Content-Digest"] = sha(data)
                return httpx.Response(200, headers=headers)
            headers["Docker-Content-Digest"] = sha(data)
            return httpx.Response(200, headers=headers, content=data)
        data = self.blobs.get(match["ref"])
        if data is None:
            return httpx.Response(404)
        if request.method == "HEAD":
            return httpx.Response(200, headers={"Content-Length": str(len(data))})
        return streamed(data)


def target(**kwargs) -> RegistryTarget:
    return RegistryTarget(REG, "reg.example", **kwargs)


ALICE = Credentials("alice", "alice-secret-pw")
BOB = Credentials("bob", "bob-secret-pw")
USERS = {"alice": "alice-secret-pw", "bob": "bob-secret-pw"}


# --- anonymous and token flows

@pytest.mark.anyio
async def test_anonymous_head_manifest_is_one_plain_request():
    fake = FakeRegistry(auth=None)
    async with fake.http() as http:
        desc = await RegistryClient(http, target(), REPO).head_manifest("v1")
    assert desc == mf.Descriptor(mf.DOCKER_MANIFEST, sha(MANIFEST), len(MANIFEST))
    [request] = fake.requests
    assert request.method == "HEAD"
    assert request.url.path == f"/v2/{REPO}/manifests/v1"
    assert "authorization" not in request.headers


@pytest.mark.anyio
async def test_head_sends_accept_with_all_four_manifest_types():
    fake = FakeRegistry()
    async with fake.http() as http:
        await RegistryClient(http, target(), REPO).head_manifest("v1")
    accept = [part.strip() for part in fake.requests[0].headers["accept"].split(",")]
    for media_type in (mf.DOCKER_MANIFEST, mf.DOCKER_MANIFEST_LIST, mf.OCI_MANIFEST, mf.OCI_INDEX):
        assert media_type in accept
    assert not any(m in accept for m in mf.SCHEMA1)


@pytest.mark.anyio
async def test_bearer_challenge_fetches_pull_token_with_basic_auth_then_retries():
    fake = FakeRegistry(auth="bearer", users=USERS)
    async with fake.http() as http:
        data, media_type = await RegistryClient(http, target(), REPO, ALICE).get_manifest("v1")
    assert (data, media_type) == (MANIFEST, mf.DOCKER_MANIFEST)
    first, token_req, retry = fake.requests
    assert first.url.host == "reg.example" and "authorization" not in first.headers
    assert token_req.url.host == "auth.example" and token_req.url.path == "/token"
    assert token_req.url.params["service"] == SERVICE
    assert token_req.url.params["scope"] == f"repository:{REPO}:pull"
    assert token_req.headers["authorization"] == basic("alice", "alice-secret-pw")
    assert retry.url.host == "reg.example"
    assert retry.headers["authorization"] == "Bearer tok1"


@pytest.mark.anyio
async def test_anonymous_bearer_token_is_fetched_without_authorization():
    fake = FakeRegistry(auth="bearer")
    async with fake.http() as http:
        await RegistryClient(http, target(), REPO).head_manifest("v1")
    [token_req] = fake.token_requests
    assert "authorization" not in token_req.headers
    assert fake.registry_requests[-1].headers["authorization"] == "Bearer tok1"


@pytest.mark.anyio
async def test_token_is_cached_across_clients_for_same_identity_and_scope():
    fake = FakeRegistry(auth="bearer", users=USERS)
    async with fake.http() as http:
        await RegistryClient(http, target(), REPO, ALICE).head_manifest("v1")
        before = len(fake.requests)
        await RegistryClient(http, target(), REPO, Credentials("alice", "alice-secret-pw")).head_manifest("v1")
    later = fake.requests[before:]
    assert len(later) == 1, [str(r.url) for r in later]
    assert later[0].headers["authorization"] == "Bearer tok1"
    assert fake.issued == 1


@pytest.mark.anyio
async def test_token_is_not_shared_across_credentials():
    fake = FakeRegistry(auth="bearer", users=USERS)
    async with fake.http() as http:
        await RegistryClient(http, target(), REPO, ALICE).head_manifest("v1")
        before = len(fake.requests)
        await RegistryClient(http, target(), REPO, BOB).head_manifest("v1")
        bob_requests = fake.requests[before:]
        before = len(fake.requests)
        await RegistryClient(http, target(), REPO).head_manifest("v1")
        anon_requests = fake.requests[before:]
    for requests, expected_auth in ((bob_requests, basic("bob", "bob-secret-pw")), (anon_requests, None)):
        assert all(r.headers.get("authorization") != "Bearer tok1" for r in requests)
        token_reqs = [r for r in requests if r.url.host == "auth.example"]
        assert len(token_reqs) == 1
        assert token_reqs[0].headers.get("authorization") == expected_auth
    assert bob_requests[-1].headers["authorization"] == "Bearer tok2"
    assert anon_requests[-1].headers["authorization"] == "Bearer tok3"
    assert fake.tokens["tok2"][0] == "bob"


@pytest.mark.anyio
async def test_token_is_not_shared_across_scopes():
    fake = FakeRegistry(auth="bearer", users=USERS)
    async with fake.http() as http:
        await RegistryClient(http, target(), REPO, ALICE).head_manifest("v1")
        before = len(fake.requests)
        await RegistryClient(http, target(), "team/other", ALICE).head_manifest("v1")
    later = fake.requests[before:]
    assert all(r.headers.get("authorization") != "Bearer tok1" for r in later)
    [token_req] = [r for r in later if r.url.host == "auth.example"]
    assert token_req.url.params["scope"] == "repository:team/other:pull"
    assert later[-1].headers["authorization"] == "Bearer tok2"


@pytest.mark.anyio
async def test_expired_token_is_refetched(monkeypatch):
    now = [1_000_000.0]
    monkeypatch.setattr(registry, "time", types.SimpleNamespace(time=lambda: now[0]))
    fake = FakeRegistry(auth="bearer", expires_in=30)
    async with fake.http() as http:
        await RegistryClient(http, target(), REPO).head_manifest("v1")
        assert fake.issued == 1
        now[0] += 5  # still valid: sent up front
        before = len(fake.requests)
        await RegistryClient(http, target(), REPO).head_manifest("v1")
        assert [r.headers.get("authorization") for r in fake.requests[before:]] == ["Bearer tok1"]
        now[0] += 60  # expired
        before = len(fake.requests)
        await RegistryClient(http, target(), REPO).head_manifest("v1")
        later = fake.requests[before:]
    assert all(r.headers.get("authorization") != "Bearer tok1" for r in later)
    assert fake.issued == 2
    assert later[-1].headers["authorization"] == "Bearer tok2"


@pytest.mark.anyio
async def test_expired_tokens_do_not_accumulate(monkeypatch):
    """Each distinct (registry, repository, credentials) adds an entry, and a client may name any registry and
    send any credentials: expired entries must go, or memory grows without bound under such a flood."""
    now = [1_000_000.0]
    monkeypatch.setattr(registry, "time", types.SimpleNamespace(time=lambda: now[0]))
    for i in range(20_000):
        registry._token_cache[(REALM, SERVICE, f"repository:flood/r{i}:pull", "")] = registry._Token("t", now[0] - 1)
    fake = FakeRegistry(auth="bearer")
    async with fake.http() as http:
        await RegistryClient(http, target(), REPO).head_manifest("v1")
    assert fake.issued == 1
    expired = [key for key, token in registry._token_cache.items() if token.expires <= now[0]]
    assert len(expired) == 0, f"{len(expired)} expired tokens still cached"


@pytest.mark.anyio
async def test_revoked_cached_token_is_replaced_once():
    fake = FakeRegistry(auth="bearer")
    async with fake.http() as http:
        await RegistryClient(http, target(), REPO).head_manifest("v1")
        del fake.tokens["tok1"]  # the registry forgets it (revoked, restarted)
        before = len(fake.requests)
        await RegistryClient(http, target(), REPO).head_manifest("v1")
    later = fake.requests[before:]
    assert [(r.url.host, r.headers.get("authorization")) for r in later] == [
        ("reg.example", "Bearer tok1"), ("auth.example", None), ("reg.example", "Bearer tok2")]


@pytest.mark.anyio
async def test_target_service_overrides_challenge_service():
    fake = FakeRegistry(auth="bearer", challenge_service="from-challenge")
    async with fake.http() as http:
        await RegistryClient(http, target(service="configured-service"), REPO).head_manifest("v1")
    [token_req] = fake.token_requests
    assert token_req.url.params["service"] == "configured-service"


@pytest.mark.anyio
async def test_target_token_url_wins_over_challenge_realm():
    fake = FakeRegistry(auth="bearer", realm="https://elsewhere.example/token")
    async with fake.http() as http:
        await RegistryClient(http, target(token_url=REALM, service=SERVICE), REPO).head_manifest("v1")
    assert not fake.to("elsewhere.example")
    [token_req] = fake.token_requests
    assert str(token_req.url).startswith(REALM + "?")
    assert token_req.url.params["scope"] == f"repository:{REPO}:pull"


@pytest.mark.anyio
async def test_target_token_url_is_used_without_waiting_for_a_challenge():
    """Docker Hub style: the token endpoint is known, so the very first registry request carries a token."""
    fake = FakeRegistry(auth="bearer")
    async with fake.http() as http:
        await RegistryClient(http, target(token_url=REALM, service=SERVICE), REPO).head_manifest("v1")
    assert [r.url.host for r in fake.requests] == ["auth.example", "reg.example"]
    assert fake.token_requests[0].url.params["service"] == SERVICE
    assert fake.registry_requests[0].headers["authorization"] == "Bearer tok1"


@pytest.mark.anyio
async def test_target_token_url_is_used_when_the_401_names_no_bearer_realm():
    """REGISTRY_AUTH_URL is the token endpoint even when the registry's 401 (e.g. behind a proxy) carries no
    Bearer challenge: README "Credentials" step 2 lists it beside, not after, the challenge."""
    fake = FakeRegistry(auth="bearer", users=USERS)

    def strip_challenge(request):
        if request.url.host != "reg.example":
            return None
        response = fake._registry(request)
        return httpx.Response(401) if response.status_code == 401 else response

    fake.override = strip_challenge
    async with fake.http() as http:
        await RegistryClient(http, target(token_url=REALM, service=SERVICE), REPO, ALICE).head_manifest("v1")
    assert len(fake.token_requests) == 1
    assert fake.token_requests[0].headers["authorization"] == basic("alice", "alice-secret-pw")
    assert fake.registry_requests[-1].headers["authorization"] == "Bearer tok1"


@pytest.mark.anyio
async def test_basic_challenge_is_answered_with_basic_and_remembered():
    fake = FakeRegistry(auth="basic", users=USERS)
    async with fake.http() as http:
        await RegistryClient(http, target(), REPO, ALICE).head_manifest("v1")
        assert [r.headers.get("authorization") for r in fake.requests] == [None, basic("alice", "alice-secret-pw")]
        before = len(fake.requests)
        await RegistryClient(http, target(), REPO, BOB).head_manifest("v1")
    assert [r.headers.get("authorization") for r in fake.requests[before:]] == [basic("bob", "bob-secret-pw")]
    assert not fake.token_requests


@pytest.mark.anyio
async def test_basic_only_target_sends_basic_up_front_and_never_fetches_tokens():
    fake = FakeRegistry(auth="basic", users=USERS)
    async with fake.http() as http:
        await RegistryClient(http, target(basic_only=True), REPO, ALICE).head_manifest("v1")
    [request] = fake.requests
    assert request.headers["authorization"] == basic("alice", "alice-secret-pw")
    # Even when the registry answers with a bearer challenge, basic_only means no token endpoint.
    fake2 = FakeRegistry(auth="bearer", users=USERS)
    async with fake2.http() as http:
        with pytest.raises(Forbidden):
            await RegistryClient(http, target(basic_only=True), REPO, ALICE).head_manifest("v1")
    assert not fake2.token_requests


@pytest.mark.anyio
async def test_static_bearer_token_is_sent_up_front():
    fake = FakeRegistry(auth="bearer")
    fake.tokens["static-token"] = (None, f"repository:{REPO}:pull")
    async with fake.http() as http:
        await RegistryClient(http, target(), REPO, bearer_token="static-token").head_manifest("v1")
    [request] = fake.requests
    assert request.headers["authorization"] == "Bearer static-token"


@pytest.mark.anyio
async def test_refused_static_bearer_token_is_an_error_not_a_token_fetch():
    fake = FakeRegistry(auth="bearer")
    async with fake.http() as http:
        with pytest.raises((Unauthorized, Forbidden)) as info:
            await RegistryClient(http, target(), REPO, bearer_token="revoked-token").head_manifest("v1")
    assert info.value.status in (401, 403)
    assert not fake.token_requests
    [request] = fake.requests
    assert request.headers["authorization"] == "Bearer revoked-token"


# --- refusals

@pytest.mark.anyio
async def test_no_credentials_and_plain_401_is_unauthorized():
    fake = FakeRegistry()
    fake.override = lambda request: httpx.Response(401) if request.url.host == "reg.example" else None
    async with fake.http() as http:
        with pytest.raises(Unauthorized) as info:
            await RegistryClient(http, target(), REPO).head_manifest("v1")
    assert (info.value.status, info.value.code) == (401, "registry_unauthorized")
    assert len(fake.requests) == 1


@pytest.mark.anyio
async def test_no_credentials_and_token_endpoint_refusing_anonymous_is_unauthorized():
    fake = FakeRegistry(auth="bearer", anonymous_tokens=False)
    async with fake.http() as http:
        with pytest.raises(Unauthorized) as info:
            await RegistryClient(http, target(), REPO).head_manifest("v1")
    assert info.value.status == 401
    assert len(fake.token_requests) == 1


@pytest.mark.anyio
async def test_token_endpoint_refusing_credentials_is_forbidden():
    fake = FakeRegistry(auth="bearer", users=USERS)
    async with fake.http() as http:
        with pytest.raises(Forbidden) as info:
            await RegistryClient(http, target(), REPO, Credentials("alice", "wrong")).head_manifest("v1")
    assert (info.value.status, info.value.code) == (403, "registry_forbidden")
    assert len(fake.token_requests) == 1
    assert "wrong" not in info.value.message


@pytest.mark.anyio
async def test_registry_refusing_after_basic_auth_is_forbidden():
    fake = FakeRegistry(auth="basic", users=USERS)
    async with fake.http() as http:
        with pytest.raises(Forbidden) as info:
            await RegistryClient(http, target(), REPO, Credentials("alice", "wrong")).head_manifest("v1")
    assert info.value.status == 403
    assert len(fake.requests) == 2  # one unauthenticated, one with Basic; no loop


@pytest.mark.parametrize("credentials, error", [(ALICE, Forbidden), (None, Unauthorized)])
@pytest.mark.anyio
async def test_token_rejected_right_after_fetch_is_not_refetched(credentials, error):
    fake = FakeRegistry(auth="bearer", users=USERS)
    fake.reject_all_tokens = True
    async with fake.http() as http:
        with pytest.raises(error) as info:
            await RegistryClient(http, target(), REPO, credentials).get_manifest("v1")
    assert info.value.status == error.status
    assert len(fake.token_requests) == 1
    assert len(fake.registry_requests) == 2


# --- other failures

@pytest.mark.parametrize("status, error, http_status, code", [
    (404, NotFound, 404, "not_found"),
    (429, Unreachable, 502, "rate_limited"),
    (500, Unreachable, 502, "registry_unreachable"),
    (503, Unreachable, 502, "registry_unreachable"),
])
@pytest.mark.anyio
async def test_registry_status_codes_map_to_errors(status, error, http_status, code):
    fake = FakeRegistry()
    fake.override = lambda request: httpx.Response(status)
    async with fake.http() as http:
        client = RegistryClient(http, target(), REPO)
        for call in (client.head_manifest("v1"), client.get_manifest("v1"), client.get_blob(sha(BLOB))):
            with pytest.raises(error) as info:
                await call
            assert (info.value.status, info.value.code) == (http_status, code)
    assert len(fake.requests) == 3


@pytest.mark.anyio
async def test_connection_error_is_unreachable():
    def refuse(request):
        raise httpx.ConnectError("connection refused", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as http:
        with pytest.raises(Unreachable) as info:
            await RegistryClient(http, target(), REPO).head_manifest("v1")
    assert info.value.status == 502


@pytest.mark.parametrize("exc", [httpx.ReadTimeout, httpx.ConnectTimeout])
@pytest.mark.anyio
async def test_timeout_is_timed_out(exc):
    def slow(request):
        raise exc("too slow", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(slow)) as http:
        with pytest.raises(TimedOut) as info:
            await RegistryClient(http, target(), REPO).get_manifest("v1")
    assert (info.value.status, info.value.code) == (504, "timeout")


@pytest.mark.anyio
async def test_token_endpoint_timeout_is_timed_out():
    fake = FakeRegistry(auth="bearer")

    def slow_token(request):
        if request.url.host == "auth.example":
            raise httpx.ReadTimeout("too slow", request=request)
        return None

    fake.override = slow_token
    async with fake.http() as http:
        with pytest.raises(TimedOut) as info:
            await RegistryClient(http, target(), REPO).head_manifest("v1")
    assert info.value.status == 504


@pytest.mark.anyio
async def test_head_with_schema1_media_type_is_unsupported():
    fake = FakeRegistry()
    fake.manifests["old"] = (b'{"schemaVersion": 1}', mf.SCHEMA1[1])
    async with fake.http() as http:
        with pytest.raises(Unsupported) as info:
            await RegistryClient(http, target(), REPO).head_manifest("old")
    assert info.value.status == 502
    assert "schema1" in info.value.message


@pytest.mark.anyio
async def test_head_without_digest_falls_back_to_get_and_computes_it():
    fake = FakeRegistry()
    fake.send_digest_on_head = False
    async with fake.http() as http:
        desc = await RegistryClient(http, target(), REPO).head_manifest("v1")
    assert [r.method for r in fake.requests] == ["HEAD", "GET"]
    assert desc == mf.Descriptor(mf.DOCKER_MANIFEST, sha(MANIFEST), len(MANIFEST))


@pytest.mark.anyio
async def test_get_manifest_by_digest_verifies_bytes():
    fake = FakeRegistry()
    wrong = sha(b"something else")
    fake.manifests[wrong] = (MANIFEST, mf.DOCKER_MANIFEST)
    async with fake.http() as http:
        client = RegistryClient(http, target(), REPO)
        assert (await client.get_manifest(sha(MANIFEST)))[0] == MANIFEST
        with pytest.raises(InvalidContent) as info:
            await client.get_manifest(wrong)
    assert info.value.status == 502
    assert fake.requests[-1].url.path == f"/v2/{REPO}/manifests/{wrong}"


@pytest.mark.anyio
async def test_get_blob_verifies_digest():
    fake = FakeRegistry()
    wrong = sha(b"not the blob")
    fake.blobs[wrong] = BLOB
    async with fake.http() as http:
        client = RegistryClient(http, target(), REPO)
        assert await client.get_blob(sha(BLOB)) == BLOB
        with pytest.raises(InvalidContent):
            await client.get_blob(wrong)
        with pytest.raises(InvalidContent):
            await client.get_blob(sha(BLOB), limit=100)  # larger than the limit
    assert [r.url.path for r in fake.requests] == [f"/v2/{REPO}/blobs/{sha(BLOB)}", f"/v2/{REPO}/blobs/{wrong}",
                                                  f"/v2/{REPO}/blobs/{sha(BLOB)}"]


@pytest.mark.parametrize("location, keeps_auth", [
    ("https://cdn.example/storage/blob?sig=1", False),  # another origin: credentials must not follow
    ("https://reg.example/v2/storage/blob", True),  # same origin: httpx keeps them
])
@pytest.mark.anyio
async def test_blob_redirect_is_followed_without_leaking_authorization(location, keeps_auth):
    fake = FakeRegistry(auth="basic", users=USERS)

    def redirect(request):
        if request.url.path.startswith("/v2/storage/") or request.url.host == "cdn.example":
            return streamed(BLOB)
        if "/blobs/" in request.url.path and request.method == "GET":
            if not request.headers.get("authorization"):
                return None  # let the fake challenge
            return httpx.Response(307, headers={"Location": location})
        return None

    fake.override = redirect
    async with fake.http() as http:
        data = await RegistryClient(http, target(basic_only=True), REPO, ALICE).get_blob(sha(BLOB))
    assert data == BLOB
    first, followed = fake.requests
    assert first.headers["authorization"] == basic("alice", "alice-secret-pw")
    assert str(followed.url) == location
    assert ("authorization" in followed.headers) is keeps_auth


# --- targets and credentials

@pytest.mark.parametrize("scheme, host, api_url, name", [
    ("https", "registry.example.com:5000", "https://registry.example.com:5000", "registry.example.com:5000"),
    ("http", "Registry.Example.COM", "http://registry.example.com", "registry.example.com"),
    ("http", "[::1]:5000", "http://[::1]:5000", "[::1]:5000"),
    ("http", "[fd00::1]", "http://[fd00::1]", "[fd00::1]"),
    ("https", "reg.example:65535", "https://reg.example:65535", "reg.example:65535"),
    ("http", "127.0.0.1:5000", "http://127.0.0.1:5000", "127.0.0.1:5000"),
    ("https", "localhost", "https://localhost", "localhost"),
])
def test_target_from_url_accepts_hosts(scheme, host, api_url, name):
    t = target_from_url(scheme, host)
    assert (t.api_url, t.name, t.token_url, t.service, t.basic_only) == (api_url, name, None, None, False)
    assert t.repo_tag_host == name


@pytest.mark.parametrize("scheme, host", [
    ("https", "bad host"),
    ("ftp", "registry.example.com"),
    ("HTTPS", "registry.example.com"),
    ("https", ""),
    ("https", "registry.example.com/path"),
    ("https", "user@registry.example.com"),
    ("https", "registry.example.com:"),
    ("https", "-bad.example.com"),
    ("http", "127.0.0.1:99999"),  # no such port: the socket layer fails with OverflowError, not an HTTPError
    ("http", "127.0.0.1:65536"),
    ("http", "localhost:0"),
    ("http", "[::1]:99999"),
    ("http", "[:]"),  # not an IPv6 address: httpx raises InvalidURL (not an HTTPError)
    ("http", "[1:2:3]"),
])
def test_target_from_url_rejects(scheme, host):
    with pytest.raises(ValueError):
        target_from_url(scheme, host)


@pytest.mark.parametrize("host", ["docker.io", "index.docker.io", "registry-1.docker.io", "Docker.IO"])
def test_target_from_url_maps_docker_hub(host):
    t = target_from_url("https", host)
    assert t.api_url == "https://registry-1.docker.io"
    assert t.token_url == DOCKER_HUB_TOKEN_URL == "https://auth.docker.io/token"
    assert t.service == DOCKER_HUB_SERVICE == "registry.docker.io"
    assert t.name == "docker.io" and t.is_docker_hub and t.repo_tag_host is None


@pytest.mark.parametrize("env", [{}, {"REGISTRY_URL": "https://docker.io"}, {"REGISTRY_URL": "https://index.docker.io/"}])
def test_target_from_settings_docker_hub(env):
    t = target_from_settings(load_settings(env))
    assert (t.api_url, t.name, t.token_url, t.service, t.basic_only) == (
        "https://registry-1.docker.io", "docker.io", "https://auth.docker.io/token", "registry.docker.io", False)


def test_target_from_settings_private_registry_basic_only():
    t = target_from_settings(load_settings({
        "REGISTRY_URL": "https://reg.internal:5000/", "REGISTRY_NAME": "registry.corp.example",
        "REGISTRY_AUTH_URL": ""}))
    assert t.api_url == "https://reg.internal:5000"
    assert t.name == "registry.corp.example" and t.repo_tag_host == "registry.corp.example"
    assert t.token_url is None and t.basic_only is True


def test_target_from_settings_private_registry_with_token_endpoint():
    t = target_from_settings(load_settings({
        "REGISTRY_URL": "http://reg.internal:5000", "REGISTRY_AUTH_URL": "https://auth.internal/token",
        "REGISTRY_SERVICE": "internal-svc"}))
    assert (t.api_url, t.name, t.token_url, t.service, t.basic_only) == (
        "http://reg.internal:5000", "reg.internal:5000", "https://auth.internal/token", "internal-svc", False)
    assert RegistryTarget.from_dict(t.to_dict()) == t


def test_credentials_repr_and_identity_hide_the_password():
    creds = Credentials("alice", "p4ssw0rd-very-secret")
    for text in (repr(creds), str(creds), creds.identity, repr(RegistryTarget(REG, "reg.example"))):
        assert "p4ssw0rd-very-secret" not in text
    assert "alice" in repr(creds)
    assert creds.identity == Credentials("alice", "p4ssw0rd-very-secret").identity
    assert creds.identity != Credentials("alice", "other").identity
    assert creds.basic_header() == basic("alice", "p4ssw0rd-very-secret")
