"""Registry credentials end to end: token and Basic registries, client credentials that are never stored,
and a shared cache that never serves an image to someone the registry would refuse."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest
import redis

from tests.support.downloads import filename_for, get, image_url, tar_members
from tests.support.images import DOCKER_MANIFEST, make_config, make_layer, sha
from tests.support.registry import htpasswd_auth
from tests.support.rogue_registry import RogueRegistry

pytestmark = pytest.mark.e2e

ALICE = ("alice", "wonderland")
KEY_ENV = {"CREDENTIALS_KEY": "test-credentials-key"}


@pytest.fixture
def private_image(token_registry):
    repo = token_registry.repo("private")
    layer = make_layer({"secret.txt": b"private layer content 42\n"})
    token_registry.registry.push_image(repo, "v1", [layer])
    token_registry.reset()
    return repo, layer


def test_public_repository_of_a_token_registry_needs_no_credentials(mode, stack, token_registry):
    repo = token_registry.repo("public")
    token_registry.registry.push_image(repo, "v1", [make_layer({"p": b"public"})])
    token_registry.reset()
    running = stack(mode, env=KEY_ENV)
    result = get(image_url(running.url, token_registry.host, repo, "v1"))
    assert result.status == 200, result.body[:300]
    assert token_registry.tokens.count(username=None) >= 1
    assert token_registry.tokens.count(username="alice") == 0


def test_device_sequence_challenge_then_retry_with_basic(mode, stack, token_registry, private_image):
    """IOS-XE sends the request bare, gets the 401 challenge, and retries with Basic (like curl --anyauth)."""
    repo, layer = private_image
    running = stack(mode, env=KEY_ENV)
    url = image_url(running.url, token_registry.host, repo, "v1")

    first = get(url)
    assert first.status == 401
    assert first.headers["www-authenticate"] == 'Basic realm="registry credentials"'
    assert "credentials" in first.json()["message"]

    # One connection, as the device keeps it: the bare request, then the retry with Basic.
    with httpx.Client(timeout=60, trust_env=False) as client:
        assert client.get(url).status_code == 401
        retried = client.get(url, auth=ALICE)
    assert retried.status_code == 200, retried.text[:300]
    assert [m for n, m in tar_members(retried.content).items() if n.endswith("layer.tar")] == [layer.tar]
    assert token_registry.tokens.count(username="alice") >= 1


def test_registry_auth_route_forwards_client_credentials(mode, stack, token_registry, private_image):
    repo, layer = private_image
    running = stack(mode, env=KEY_ENV)
    url = image_url(running.url, token_registry.host, repo, "v1", route="registry-auth")
    bare = get(url)
    assert bare.status == 401 and "www-authenticate" in bare.headers
    assert token_registry.registry.proxy.count() == 0  # refused before asking the registry
    assert get(url, auth=ALICE).status == 200


def test_wrong_password_is_403_saying_the_registry_refused(mode, stack, token_registry, private_image):
    repo, _ = private_image
    running = stack(mode, env=KEY_ENV)
    result = get(image_url(running.url, token_registry.host, repo, "v1"), auth=("alice", "wrong"))
    assert result.status == 403
    assert "refused" in result.json()["message"]
    assert "www-authenticate" not in result.headers
    assert not list((Path(running.cache_dir) / "layers" / "sha256").iterdir())


def test_settings_credentials_serve_the_default_route(mode, stack, token_registry, private_image):
    repo, _ = private_image
    running = stack(mode, env={**KEY_ENV, "REGISTRY_URL": token_registry.url, "REGISTRY_USERNAME": "alice",
                               "REGISTRY_PASSWORD": "wonderland"})
    assert get(f"{running.url}/docker/{filename_for(repo, 'v1')}").status == 200


def test_static_bearer_token_is_sent_without_fetching_one(stack, token_registry, private_image):
    repo, _ = private_image
    token = token_registry.tokens.token_for("alice", repo, ["pull"])
    running = stack("two-tier", env={**KEY_ENV, "REGISTRY_URL": token_registry.url, "REGISTRY_TOKEN": token})
    result = get(f"{running.url}/docker/{filename_for(repo, 'v1')}")
    assert result.status == 200, result.body[:300]
    assert token_registry.tokens.count() == 0  # the static token was sent as is, no token fetched


def test_client_auth_required_off_and_optional(stack, token_registry, private_image):
    repo, _ = private_image
    public = token_registry.repo("public")
    token_registry.registry.push_image(public, "v1", [make_layer({"p": b"p"})])
    base = {**KEY_ENV, "REGISTRY_URL": token_registry.url}

    required = stack("embedded", env={**base, "REGISTRY_CLIENT_AUTH": "required"})
    bare = get(f"{required.url}/docker/{filename_for(public, 'v1')}")
    assert bare.status == 401 and bare.headers["www-authenticate"] == 'Basic realm="registry credentials"'
    assert get(f"{required.url}/docker/{filename_for(public, 'v1')}", auth=ALICE).status == 200

    off = stack("embedded", env={**base, "REGISTRY_CLIENT_AUTH": "off"})
    assert get(f"{off.url}/docker/{filename_for(public, 'v1')}").status == 200
    ignored = get(f"{off.url}/docker/{filename_for(repo, 'v1')}", auth=ALICE)
    assert ignored.status == 401 and "www-authenticate" not in ignored.headers  # credentials ignored, no challenge
    # /registry-auth always takes them
    assert get(image_url(off.url, token_registry.host, repo, "v1", route="registry-auth"), auth=ALICE).status == 200

    optional = stack("embedded", env=base)
    assert get(f"{optional.url}/docker/{filename_for(public, 'v1')}").status == 200
    assert get(f"{optional.url}/docker/{filename_for(repo, 'v1')}", auth=ALICE).status == 200


def test_htpasswd_registry_gets_the_clients_basic_credentials(mode, stack, registry_factory, tmp_path, unique_repo):
    basic = registry_factory(auth=htpasswd_auth(tmp_path / "htpasswd", {"bob": "builder"}), push_auth=("bob", "builder"))
    basic.push_image(unique_repo, "v1", [make_layer({"b": b"basic"})])
    running = stack(mode, env=KEY_ENV)
    url = image_url(running.url, basic.host, unique_repo, "v1")
    assert get(url).status == 401
    assert get(url, auth=("bob", "builder")).status == 200
    assert get(url, auth=("bob", "nope")).status == 403


def test_cached_private_image_needs_the_requests_own_credentials(mode, stack, token_registry, private_image):
    repo, layer = private_image
    running = stack(mode, env=KEY_ENV)
    url = image_url(running.url, token_registry.host, repo, "v1")
    assert get(url, auth=ALICE).status == 200  # now prepared and cached

    for auth, status in ((None, 401), (("alice", "wrong"), 403), (("mallory", "x"), 403)):
        result = get(url, auth=auth)
        assert result.status == status, (auth, result.body[:200])
        assert layer.tar not in result.body and result.headers["content-type"] == "application/json"


def _scan_for_secrets(stack, secrets: list[bytes]) -> list[str]:
    found = []
    client = redis.Redis.from_url(stack.redis.url)
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        values: list[bytes] = [key]
        if kind == "string":
            values.append(client.get(key) or b"")
        elif kind == "hash":
            values += [b"%s=%s" % item for item in client.hgetall(key).items()]
        elif kind == "list":
            values += client.lrange(key, 0, -1)
        elif kind in ("set",):
            values += list(client.smembers(key))
        elif kind == "zset":
            values += [member for member, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            for _id, fields in client.xrange(key):
                values += [b"%s=%s" % item for item in fields.items()]
        for value in values:
            for secret in secrets:
                if secret in value:
                    found.append(f"redis {key!r}: {secret!r}")
    for path in Path(stack.cache_dir).rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"file {path}: {s!r}" for s in secrets if s in data]
    logs = stack.logs().encode()
    found += [f"logs: {s!r}" for s in secrets if s in logs]
    return found


def test_client_credentials_never_stored_anywhere(stack, token_registry, private_image):
    repo, _ = private_image
    running = stack("two-tier", env={**KEY_ENV, "LOG_LEVEL": "debug"})
    url = image_url(running.url, token_registry.host, repo, "v1", route="registry-auth")
    assert get(url, auth=ALICE).status == 200
    issued = token_registry.tokens.count(username="alice")
    assert issued >= 2  # the API's HEAD and the worker's downloads each fetched a token

    # Control: the scan does see what is there (the repository name is in job descriptions, logs and files).
    assert _scan_for_secrets(running, [repo.encode()])
    secrets = [b"wonderland", base64.b64encode(b"alice:wonderland"), b"eyJ"]  # eyJ: any JWT (token) at all
    assert _scan_for_secrets(running, secrets) == []


def test_cross_registry_digest_attack_reads_nothing(mode, stack, token_registry, private_image):
    """A rogue registry names the private layer's digest and diff_id in its own manifest: no bytes leak."""
    repo, layer = private_image
    running = stack(mode, env=KEY_ENV)
    assert get(image_url(running.url, token_registry.host, repo, "v1"), auth=ALICE).status == 200

    config = make_config([layer])
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": sha(config),
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": layer.digest,
                    "size": len(layer.blob)}],
    }).encode()
    with RogueRegistry("evil/app", "v1", manifest, DOCKER_MANIFEST, {sha(config): config}) as rogue:
        result = get(image_url(running.url, rogue.host, "evil/app", "v1"))
        assert result.status in (404, 502), result.status
        assert layer.tar not in result.body
        assert ("HEAD", f"/v2/evil/app/blobs/{layer.digest}", 404) in rogue.requests or \
               ("GET", f"/v2/evil/app/blobs/{layer.digest}", 404) in rogue.requests


def test_cross_registry_own_blob_with_victims_diff_id(mode, stack, token_registry, private_image, registry,
                                                      unique_repo):
    """An attacker's real blob, with a config claiming it unpacks to the private layer: unpacked and refused."""
    repo, layer = private_image
    running = stack(mode, env=KEY_ENV)
    assert get(image_url(running.url, token_registry.host, repo, "v1"), auth=ALICE).status == 200

    decoy = make_layer({"decoy": b"attacker's own bytes"})
    config = make_config([layer])  # diff_ids: the victim's
    registry.push_image(unique_repo, "v1", [decoy], config=config)
    result = get(image_url(running.url, registry.host, unique_repo, "v1"))
    assert result.status == 502 and "diff_id" in result.json()["message"]
    assert layer.tar not in result.body


def test_two_tier_without_credentials_key_prepares_client_credentials_in_the_api(stack, token_registry,
                                                                                 private_image):
    """No CREDENTIALS_KEY: a /registry-auth download still works; the preparation runs in the API process, so
    the client's credentials reach neither a worker nor Redis. Requests without them still go to the workers."""
    repo, layer = private_image
    public = token_registry.repo("public")
    token_registry.registry.push_image(public, "v1", [make_layer({"p": b"public, prepared by a worker"})])
    running = stack("two-tier", env={"LOG_LEVEL": "debug"})
    assert "CREDENTIALS_KEY is not set" in running.server.log_text()

    result = get(image_url(running.url, token_registry.host, repo, "v1", route="registry-auth"), auth=ALICE)
    assert result.status == 200, result.body[:300]
    assert [m for n, m in tar_members(result.body).items() if n.endswith("layer.tar")] == [layer.tar]
    assert token_registry.tokens.count(username="alice") >= 1
    client = redis.Redis.from_url(running.redis.url)
    assert list(client.scan_iter("rq:job:*")) == []  # no job: it ran in the API
    assert "prepared" not in "".join(w.log_text() for w in running.workers)

    assert get(image_url(running.url, token_registry.host, public, "v1")).status == 200
    assert len(list(client.scan_iter("rq:job:*"))) == 1  # the anonymous one went to a worker
    secrets = [b"wonderland", base64.b64encode(b"alice:wonderland"), b"eyJ"]
    assert _scan_for_secrets(running, secrets) == []
