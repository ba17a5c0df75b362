"""Prove the bearer-token test support (TokenServer + token_registry) against distribution 2.8.

What the real registry answers (recorded here so other tests can rely on it):

- no Authorization: 401, ``WWW-Authenticate: Bearer realm="<tokens>/token",
  service="test-registry"`` (plus ``,scope="repository:<name>:pull"`` on
  repository endpoints);
- valid token lacking the requested action: 401 with the same challenge plus
  ``error="insufficient_scope"`` (never 403);
- bad signature / expired / not yet valid: 401 with ``error="invalid_token"``;
- ``exp`` and ``nbf`` get 60 s of leeway: a token that expired 1-2 s ago still works.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support.images import MANIFEST_ACCEPT, make_layer
from tests.support.pushing import PushedImage
from tests.support.token_fixtures import TokenRegistry, TokenRegistryFactory
from tests.support.bearer_client import parse_bearer_challenge
from tests.support.jwt_signing import decode_jwt
from tests.support.token_server import TokenServer


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10.0, trust_env=False) as client:
        yield client


@pytest.fixture(scope="module")
def pushed(_token_registry_session: TokenRegistry) -> dict[str, PushedImage]:
    """One image in a private and one in a public repository (pushed as ``pusher``)."""
    under_test = _token_registry_session
    return {
        "private": under_test.registry.push_image(
            under_test.repo("private"), "v1", [make_layer({"secret.txt": b"psst\n"})]
        ),
        "public": under_test.registry.push_image(
            under_test.repo("public"), "v1", [make_layer({"hello.txt": b"hi\n"})]
        ),
    }


def get_token(
    http: httpx.Client,
    tokens: TokenServer,
    *scopes: str,
    auth: tuple[str, str] | None = None,
) -> httpx.Response:
    params = [("service", tokens.service)] + [("scope", scope) for scope in scopes]
    return http.get(tokens.realm, params=params, auth=auth)


def get_manifest(
    http: httpx.Client, base_url: str, image: PushedImage, token: str | None
) -> httpx.Response:
    headers = {"Accept": MANIFEST_ACCEPT}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return http.get(f"{base_url}/v2/{image.repository}/manifests/{image.tag}", headers=headers)


def challenge_of(response: httpx.Response) -> dict[str, str]:
    challenge = parse_bearer_challenge(response.headers.get("WWW-Authenticate", ""))
    assert challenge is not None, response.headers
    return challenge


def test_anonymous_base_endpoint_gets_bearer_challenge(
    token_registry: TokenRegistry, http: httpx.Client
) -> None:
    for base_url in (token_registry.registry.direct_url, token_registry.url):  # proxy too
        response = http.get(f"{base_url}/v2/")
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == (
            f'Bearer realm="{token_registry.tokens.realm}",service="test-registry"'
        )
    # Any valid token, even one granting nothing, opens /v2/.
    empty = token_registry.tokens.token_for(None)
    response = http.get(
        f"{token_registry.url}/v2/", headers={"Authorization": f"Bearer {empty}"}
    )
    assert response.status_code == 200


def test_pushes_fetch_one_push_token_and_reuse_it(token_registry: TokenRegistry, http: httpx.Client) -> None:
    repository = token_registry.repo("private")
    image = token_registry.registry.push_image(
        repository, "v1", [make_layer({"again.txt": b"again\n"})]
    )
    # One token, asked for pull,push on the first challenge, then reused (cached).
    assert token_registry.tokens.requests == [
        ("/token", "pusher", f"repository:{repository}:pull,push", 200)
    ]
    token_registry.registry.push_image(repository, "v2", [make_layer({"b": b"b"})])
    assert token_registry.tokens.count() == 1
    token = token_registry.tokens.token_for("pusher", repository)
    response = get_manifest(http, token_registry.url, image, token)
    assert response.status_code == 200
    assert response.content == image.manifest


def test_anonymous_pulls_public(
    token_registry: TokenRegistry, pushed: dict[str, PushedImage], http: httpx.Client
) -> None:
    image = pushed["public"]
    tokens = token_registry.tokens

    response = get_manifest(http, token_registry.url, image, None)
    assert response.status_code == 401
    assert challenge_of(response) == {
        "realm": tokens.realm,
        "service": "test-registry",
        "scope": f"repository:{image.repository}:pull",
    }

    response = get_token(http, tokens, f"repository:{image.repository}:pull,push")
    assert response.status_code == 200
    body = response.json()
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == 300
    assert body["issued_at"].endswith("Z")
    header, claims = decode_jwt(body["token"])
    assert header["alg"] == "RS256" and len(header["x5c"]) == 1
    assert claims["sub"] == "" and claims["aud"] == "test-registry"
    assert claims["iss"] == "test-issuer"
    assert claims["exp"] - claims["iat"] == 300
    # push is not granted to anonymous callers, pull is
    assert claims["access"] == [
        {"type": "repository", "name": image.repository, "actions": ["pull"]}
    ]
    assert tokens.requests == [
        ("/token", None, f"repository:{image.repository}:pull,push", 200)
    ]
    assert tokens.count(username=None) == 1 and tokens.count(username="alice") == 0

    response = get_manifest(http, token_registry.url, image, body["token"])
    assert response.status_code == 200
    assert response.content == image.manifest


def test_anonymous_token_for_private_is_insufficient_scope(
    token_registry: TokenRegistry, pushed: dict[str, PushedImage], http: httpx.Client
) -> None:
    image = pushed["private"]
    response = get_token(http, token_registry.tokens, f"repository:{image.repository}:pull")
    assert response.status_code == 200  # the token server never refuses anonymous
    token = response.json()["token"]
    assert decode_jwt(token)[1]["access"] == [
        {"type": "repository", "name": image.repository, "actions": []}
    ]

    response = get_manifest(http, token_registry.url, image, token)
    assert response.status_code == 401  # distribution 2.8 never says 403 here
    assert challenge_of(response) == {
        "realm": token_registry.tokens.realm,
        "service": "test-registry",
        "scope": f"repository:{image.repository}:pull",
        "error": "insufficient_scope",
    }
    assert response.json()["errors"][0]["code"] == "UNAUTHORIZED"

    # A token for some *other* repository is just as insufficient.
    other = token_registry.tokens.token_for(None, pushed["public"].repository, ["pull"])
    response = get_manifest(http, token_registry.url, image, other)
    assert response.status_code == 401
    assert challenge_of(response)["error"] == "insufficient_scope"


def test_alice_pulls_private_and_public(
    token_registry: TokenRegistry, pushed: dict[str, PushedImage], http: httpx.Client
) -> None:
    private, public = pushed["private"], pushed["public"]
    response = get_token(
        http,
        token_registry.tokens,
        f"repository:{private.repository}:pull",
        f"repository:{public.repository}:pull",
        auth=("alice", "wonderland"),
    )
    assert response.status_code == 200
    token = response.json()["token"]
    assert decode_jwt(token)[1]["sub"] == "alice"
    for image in (private, public):
        response = get_manifest(http, token_registry.url, image, token)
        assert response.status_code == 200, image.repository
        assert response.content == image.manifest
    assert token_registry.tokens.count(username="alice", status=200) == 1
    assert token_registry.registry.proxy.count(kind="manifest", status=200) == 2


def test_wrong_password_is_refused_by_token_server(
    token_registry: TokenRegistry, pushed: dict[str, PushedImage], http: httpx.Client
) -> None:
    scope = f"repository:{pushed['private'].repository}:pull"
    for auth in (("alice", "not-wonderland"), ("mallory", "wonderland")):
        response = get_token(http, token_registry.tokens, scope, auth=auth)
        assert response.status_code == 401
        assert response.json()["errors"][0]["code"] == "UNAUTHORIZED"
        assert response.headers["WWW-Authenticate"].startswith("Basic ")
    assert token_registry.tokens.count(status=401) == 2
    assert token_registry.tokens.count(status=200) == 0


def test_forged_and_expired_tokens_are_invalid(
    token_registry: TokenRegistry, pushed: dict[str, PushedImage], http: httpx.Client
) -> None:
    image = pushed["private"]
    tokens = token_registry.tokens

    # Signed by a key the registry does not trust.
    with TokenServer(issuer=tokens.issuer, service=tokens.service) as stranger:
        forged = stranger.token_for("alice", image.repository, ["pull"])
    response = get_manifest(http, token_registry.url, image, forged)
    assert response.status_code == 401
    assert challenge_of(response)["error"] == "invalid_token"

    # expires_in=1 + a 2 s wait: still accepted, thanks to distribution's 60 s leeway.
    tokens.expires_in = 1
    response = get_token(
        http, tokens, f"repository:{image.repository}:pull", auth=("alice", "wonderland")
    )
    assert response.json()["expires_in"] == 1
    short_lived = response.json()["token"]
    time.sleep(2)
    assert get_manifest(http, token_registry.url, image, short_lived).status_code == 200

    # Expired beyond the leeway (backdated by 120 s): 401 invalid_token.
    tokens.issued_offset = -120
    response = get_token(
        http, tokens, f"repository:{image.repository}:pull", auth=("alice", "wonderland")
    )
    expired = response.json()["token"]
    response = get_manifest(http, token_registry.url, image, expired)
    assert response.status_code == 401
    assert challenge_of(response)["error"] == "invalid_token"

    # Not valid before 120 s from now: same answer.
    not_yet = tokens.token_for("alice", image.repository, ["pull"], issued_offset=120)
    response = get_manifest(http, token_registry.url, image, not_yet)
    assert response.status_code == 401
    assert challenge_of(response)["error"] == "invalid_token"


def test_reset_restores_users_policy_and_token_knobs(token_registry: TokenRegistry, http: httpx.Client) -> None:
    tokens = token_registry.tokens
    tokens.expires_in = 5
    tokens.users["eve"] = "x"
    tokens.access = None
    get_token(http, tokens, "repository:private/z:pull", auth=("eve", "x"))
    assert tokens.count() == 1
    token_registry.reset()
    assert tokens.count() == 0 and tokens.requests == []
    assert tokens.expires_in == 300 and tokens.issued_offset == 0
    assert "eve" not in tokens.users
    assert tokens.allowed_actions(None, "private/z", ["pull"]) == []


def test_token_policy_merges_prefix_and_exact_grants() -> None:
    server = TokenServer(
        {"alice": "pw"},
        {"lib/*": {"*": ["pull"], "alice": ["push"]}, "lib/special": {"alice": ["delete"]}},
    )
    try:
        assert server.allowed_actions(None, "lib/a", ["pull", "push"]) == ["pull"]
        assert server.allowed_actions("alice", "lib/a", ["pull", "push"]) == ["pull", "push"]
        assert server.allowed_actions("alice", "lib/special", ["delete", "pull"]) == [
            "delete",
            "pull",
        ]
        assert server.allowed_actions("alice", "other", ["pull"]) == []
        everything = TokenServer()
        assert everything.allowed_actions(None, "x/y", ["pull", "push"]) == ["pull", "push"]
        everything.stop()  # never started: only cleans its temp dir
    finally:
        server.stop()


def test_callable_policy_decides_who_may_pull(
    token_registry_factory: TokenRegistryFactory, http: httpx.Client
) -> None:
    def only_bob(user: str | None, repository: str, requested: list[str]) -> list[str]:
        return ["pull"] if user == "bob" else []

    under_test = token_registry_factory(users={"bob": "builder"}, access=only_bob)
    image = under_test.registry.push_image("any/thing", "v1", [make_layer({"f": b"f"})])
    anonymous = get_token(http, under_test.tokens, "repository:any/thing:pull").json()["token"]
    assert get_manifest(http, under_test.url, image, anonymous).status_code == 401
    bob = get_token(
        http, under_test.tokens, "repository:any/thing:pull", auth=("bob", "builder")
    ).json()["token"]
    assert get_manifest(http, under_test.url, image, bob).status_code == 200
