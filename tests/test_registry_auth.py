"""Unit tests for shared.registry's and shared.registry_auth's auth: anonymous, Basic and bearer flows, the token cache, refusals. Each test
reads what the client sent from the fake registry's request log (tests/support/fake_registry.py)."""

from __future__ import annotations

import types

import docker_http_passthrough.shared.registry_auth as registry_auth
import httpx
import pytest
from docker_http_passthrough.shared import manifest as mf
from docker_http_passthrough.shared.errors import Forbidden, Unauthorized
from docker_http_passthrough.shared.registry import RegistryClient
from docker_http_passthrough.shared.registry_auth import Token
from docker_http_passthrough.shared.targets import Credentials

from tests.support.fake_registry import (
    ALICE,
    BOB,
    REALM,
    REPO,
    SERVICE,
    USERS,
    V1_MANIFEST,
    basic_header,
    sample_registry,
    target,
)
from tests.support.images import sha





# --- anonymous and token flows

@pytest.mark.anyio
async def test_anonymous_head_manifest_is_one_plain_request():
    fake = sample_registry(auth=None)
    async with fake.http() as http:
        desc = await RegistryClient(http, target(), REPO).head_manifest("v1")
    assert desc == mf.Descriptor(mf.DOCKER_MANIFEST, sha(V1_MANIFEST), len(V1_MANIFEST))
    [request] = fake.requests
    assert request.method == "HEAD"
    assert request.url.path == f"/v2/{REPO}/manifests/v1"
    assert "authorization" not in request.headers


@pytest.mark.anyio
async def test_head_sends_accept_with_all_four_manifest_types():
    fake = sample_registry()
    async with fake.http() as http:
        await RegistryClient(http, target(), REPO).head_manifest("v1")
    accept = [part.strip() for part in fake.requests[0].headers["accept"].split(",")]
    for media_type in (mf.DOCKER_MANIFEST, mf.DOCKER_MANIFEST_LIST, mf.OCI_MANIFEST, mf.OCI_INDEX):
        assert media_type in accept
    assert not any(m in accept for m in mf.SCHEMA1)


@pytest.mark.anyio
async def test_bearer_challenge_fetches_pull_token_with_basic_auth_then_retries():
    fake = sample_registry(auth="bearer", users=USERS)
    async with fake.http() as http:
        data, media_type = await RegistryClient(http, target(), REPO, ALICE).get_manifest("v1")
    assert (data, media_type) == (V1_MANIFEST, mf.DOCKER_MANIFEST)
    first, token_req, retry = fake.requests
    assert first.url.host == "reg.example" and "authorization" not in first.headers
    assert token_req.url.host == "auth.example" and token_req.url.path == "/token"
    assert token_req.url.params["service"] == SERVICE
    assert token_req.url.params["scope"] == f"repository:{REPO}:pull"
    assert token_req.headers["authorization"] == basic_header("alice", "alice-secret-pw")
    assert retry.url.host == "reg.example"
    assert retry.headers["authorization"] == "Bearer tok1"


@pytest.mark.anyio
async def test_anonymous_bearer_token_is_fetched_without_authorization():
    fake = sample_registry(auth="bearer")
    async with fake.http() as http:
        await RegistryClient(http, target(), REPO).head_manifest("v1")
    [token_req] = fake.token_requests
    assert "authorization" not in token_req.headers
    assert fake.registry_requests[-1].headers["authorization"] == "Bearer tok1"


@pytest.mark.anyio
async def test_token_is_cached_across_clients_for_same_identity_and_scope():
    fake = sample_registry(auth="bearer", users=USERS)
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
    fake = sample_registry(auth="bearer", users=USERS)
    async with fake.http() as http:
        await RegistryClient(http, target(), REPO, ALICE).head_manifest("v1")
        before = len(fake.requests)
        await RegistryClient(http, target(), REPO, BOB).head_manifest("v1")
        bob_requests = fake.requests[before:]
        before = len(fake.requests)
        await RegistryClient(http, target(), REPO).head_manifest("v1")
        anon_requests = fake.requests[before:]
    for requests, expected_auth in ((bob_requests, basic_header("bob", "bob-secret-pw")), (anon_requests, None)):
        assert all(r.headers.get("authorization") != "Bearer tok1" for r in requests)
        token_reqs = [r for r in requests if r.url.host == "auth.example"]
        assert len(token_reqs) == 1
        assert token_reqs[0].headers.get("authorization") == expected_auth
    assert bob_requests[-1].headers["authorization"] == "Bearer tok2"
    assert anon_requests[-1].headers["authorization"] == "Bearer tok3"
    assert fake.tokens["tok2"][0] == "bob"


@pytest.mark.anyio
async def test_token_is_not_shared_across_scopes():
    fake = sample_registry(auth="bearer", users=USERS)
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
    monkeypatch.setattr(registry_auth, "time", types.SimpleNamespace(time=lambda: now[0]))
    fake = sample_registry(auth="bearer", expires_in=30)
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
    monkeypatch.setattr(registry_auth, "time", types.SimpleNamespace(time=lambda: now[0]))
    fake = sample_registry(auth="bearer")
    async with fake.http() as http:
        for i in range(20_000):
            http.auth.tokens[(REALM, SERVICE, f"repository:flood/r{i}:pull", "")] = Token("t", now[0] - 1)
        await RegistryClient(http, target(), REPO).head_manifest("v1")
    assert fake.issued == 1
    expired = [key for key, token in http.auth.tokens.items() if token.expires <= now[0]]
    assert len(expired) == 0, f"{len(expired)} expired tokens still cached"


@pytest.mark.anyio
async def test_revoked_cached_token_is_replaced_once():
    fake = sample_registry(auth="bearer")
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
    fake = sample_registry(auth="bearer", challenge_service="from-challenge")
    async with fake.http() as http:
        await RegistryClient(http, target(service="configured-service"), REPO).head_manifest("v1")
    [token_req] = fake.token_requests
    assert token_req.url.params["service"] == "configured-service"


@pytest.mark.anyio
async def test_target_token_url_wins_over_challenge_realm():
    fake = sample_registry(auth="bearer", realm="https://elsewhere.example/token")
    async with fake.http() as http:
        await RegistryClient(http, target(token_url=REALM, service=SERVICE), REPO).head_manifest("v1")
    assert not fake.to("elsewhere.example")
    [token_req] = fake.token_requests
    assert str(token_req.url).startswith(REALM + "?")
    assert token_req.url.params["scope"] == f"repository:{REPO}:pull"


@pytest.mark.anyio
async def test_target_token_url_is_used_without_waiting_for_a_challenge():
    """Docker Hub style: the token endpoint is known, so the very first registry request carries a token."""
    fake = sample_registry(auth="bearer")
    async with fake.http() as http:
        await RegistryClient(http, target(token_url=REALM, service=SERVICE), REPO).head_manifest("v1")
    assert [r.url.host for r in fake.requests] == ["auth.example", "reg.example"]
    assert fake.token_requests[0].url.params["service"] == SERVICE
    assert fake.registry_requests[0].headers["authorization"] == "Bearer tok1"


@pytest.mark.anyio
async def test_target_token_url_is_used_when_the_401_names_no_bearer_realm():
    """REGISTRY_AUTH_URL is the token endpoint even when the registry's 401 (e.g. behind a proxy) carries no
    Bearer challenge: README "Credentials" step 2 lists it beside, not after, the challenge."""
    fake = sample_registry(auth="bearer", users=USERS)

    def strip_challenge(request):
        if request.url.host != "reg.example":
            return None
        response = fake.registry(request)
        return httpx.Response(401) if response.status_code == 401 else response

    fake.override = strip_challenge
    async with fake.http() as http:
        await RegistryClient(http, target(token_url=REALM, service=SERVICE), REPO, ALICE).head_manifest("v1")
    assert len(fake.token_requests) == 1
    assert fake.token_requests[0].headers["authorization"] == basic_header("alice", "alice-secret-pw")
    assert fake.registry_requests[-1].headers["authorization"] == "Bearer tok1"


@pytest.mark.anyio
async def test_basic_challenge_is_answered_with_basic_and_remembered():
    fake = sample_registry(auth="basic", users=USERS)
    async with fake.http() as http:
        await RegistryClient(http, target(), REPO, ALICE).head_manifest("v1")
        assert [r.headers.get("authorization") for r in fake.requests] == [None, basic_header("alice", "alice-secret-pw")]
        before = len(fake.requests)
        await RegistryClient(http, target(), REPO, BOB).head_manifest("v1")
    assert [r.headers.get("authorization") for r in fake.requests[before:]] == [basic_header("bob", "bob-secret-pw")]
    assert not fake.token_requests


@pytest.mark.anyio
async def test_basic_only_target_sends_basic_up_front_and_never_fetches_tokens():
    fake = sample_registry(auth="basic", users=USERS)
    async with fake.http() as http:
        await RegistryClient(http, target(basic_only=True), REPO, ALICE).head_manifest("v1")
    [request] = fake.requests
    assert request.headers["authorization"] == basic_header("alice", "alice-secret-pw")
    # Even when the registry answers with a bearer challenge, basic_only means no token endpoint.
    fake2 = sample_registry(auth="bearer", users=USERS)
    async with fake2.http() as http:
        with pytest.raises(Forbidden):
            await RegistryClient(http, target(basic_only=True), REPO, ALICE).head_manifest("v1")
    assert not fake2.token_requests


@pytest.mark.anyio
async def test_static_bearer_token_is_sent_up_front():
    fake = sample_registry(auth="bearer")
    fake.tokens["static-token"] = (None, f"repository:{REPO}:pull")
    async with fake.http() as http:
        await RegistryClient(http, target(), REPO, bearer_token="static-token").head_manifest("v1")
    [request] = fake.requests
    assert request.headers["authorization"] == "Bearer static-token"


@pytest.mark.anyio
async def test_refused_static_bearer_token_is_an_error_not_a_token_fetch():
    fake = sample_registry(auth="bearer")
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
    fake = sample_registry()
    fake.override = lambda request: httpx.Response(401) if request.url.host == "reg.example" else None
    async with fake.http() as http:
        with pytest.raises(Unauthorized) as info:
            await RegistryClient(http, target(), REPO).head_manifest("v1")
    assert (info.value.status, info.value.code) == (401, "registry_unauthorized")
    assert len(fake.requests) == 1


@pytest.mark.anyio
async def test_no_credentials_and_token_endpoint_refusing_anonymous_is_unauthorized():
    fake = sample_registry(auth="bearer", anonymous_tokens=False)
    async with fake.http() as http:
        with pytest.raises(Unauthorized) as info:
            await RegistryClient(http, target(), REPO).head_manifest("v1")
    assert info.value.status == 401
    assert len(fake.token_requests) == 1


@pytest.mark.anyio
async def test_token_endpoint_refusing_credentials_is_forbidden():
    fake = sample_registry(auth="bearer", users=USERS)
    async with fake.http() as http:
        with pytest.raises(Forbidden) as info:
            await RegistryClient(http, target(), REPO, Credentials("alice", "wrong")).head_manifest("v1")
    assert (info.value.status, info.value.code) == (403, "registry_forbidden")
    assert len(fake.token_requests) == 1
    assert "wrong" not in info.value.message


@pytest.mark.anyio
async def test_registry_refusing_after_basic_auth_is_forbidden():
    fake = sample_registry(auth="basic", users=USERS)
    async with fake.http() as http:
        with pytest.raises(Forbidden) as info:
            await RegistryClient(http, target(), REPO, Credentials("alice", "wrong")).head_manifest("v1")
    assert info.value.status == 403
    assert len(fake.requests) == 2  # one unauthenticated, one with Basic; no loop


@pytest.mark.parametrize("credentials, error", [(ALICE, Forbidden), (None, Unauthorized)])
@pytest.mark.anyio
async def test_token_rejected_right_after_fetch_is_not_refetched(credentials, error):
    fake = sample_registry(auth="bearer", users=USERS)
    fake.reject_all_tokens = True
    async with fake.http() as http:
        with pytest.raises(error) as info:
            await RegistryClient(http, target(), REPO, credentials).get_manifest("v1")
    assert info.value.status == error.status
    assert len(fake.token_requests) == 1
    assert len(fake.registry_requests) == 2
