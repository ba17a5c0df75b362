"""End to end, issue 12's reach: a platform in the path (an index whose first entry is arm64), a tag with "_" and
a digest pin through /ref/, zstd layers — each archive loaded (and run, where this amd64 engine can) by the test
Docker engine; /ref/ with a private registry's credentials."""

from __future__ import annotations

import time
from urllib.parse import quote

import httpx
import pytest

from tests.support.downloads import archive_config, archive_manifest, filename_for, get, tar_members
from tests.support.images import busybox_layer, make_layer
from tests.support.registry import htpasswd_auth

pytestmark = pytest.mark.e2e

CAT = ["/bin/busybox", "cat", "/app/message.txt"]


def message_layer(text: str, compression: str = "gzip"):
    return make_layer({"app/message.txt": text.encode() + b"\n"}, compression=compression)


def send(method: str, url: str, **kwargs) -> httpx.Response:
    with httpx.Client(timeout=120, trust_env=False) as client:
        return client.request(method, url, **kwargs)


def wait_done(server: str, status_url: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = send("GET", server + status_url).json()
        if status["state"] in ("done", "failed") or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def load_and_run(docker_engine, tmp_path, body: bytes, repo_tag: str, *, run: bool = True) -> str:
    """`docker load` the archive (its RepoTags must be `repo_tag`), then run it or read its architecture."""
    assert archive_manifest(body)[0]["RepoTags"] == [repo_tag]
    archive = tmp_path / "image.tar"
    archive.write_bytes(body)
    assert f"Loaded image: {repo_tag}" in docker_engine.load(archive)
    try:
        if run:
            return docker_engine.run("run", "--rm", "--network", "none", repo_tag).stdout.strip()
        return docker_engine.run("image", "inspect", "--format", "{{.Os}}/{{.Architecture}}", repo_tag).stdout.strip()
    finally:
        docker_engine.run("rmi", "-f", repo_tag, check=False)


def test_platform_in_the_path_picks_it_from_an_index_where_arm64_comes_first(stack, registry, unique_repo,
                                                                             docker_engine, tmp_path):
    arm = registry.push_image(unique_repo, None, [message_layer("arm64")], architecture="arm64", variant="v8",
                              cmd=CAT, flavour="oci")
    amd = registry.push_image(unique_repo, None, [busybox_layer(), message_layer("amd64")], cmd=CAT, flavour="oci")
    registry.push_index(unique_repo, "multi", [(arm, {"os": "linux", "architecture": "arm64", "variant": "v8"}),
                                               (amd, {"os": "linux", "architecture": "amd64"})], flavour="oci")
    registry.push_image(unique_repo, "arm-only", [message_layer("arm64 only")], architecture="arm64", cmd=CAT)
    running = stack("two-tier")
    route = f"registry/http/{registry.host}/docker/{filename_for(unique_repo, 'multi')}"
    arm_url, amd_url = f"{running.url}/platform/linux/arm64/{route}", f"{running.url}/{route}"
    repo_tag = f"{registry.host}/{unique_repo}:multi"

    # Pre-warm both: one job, one status, per platform.
    warmed = {url: send("POST", url) for url in (arm_url, amd_url)}
    assert [r.status_code for r in warmed.values()] == [202, 202], [r.text for r in warmed.values()]
    assert [r.json()["platform"] for r in warmed.values()] == ["linux/arm64", "linux/amd64"]
    assert warmed[arm_url].json()["manifest_digest"] == arm.manifest_digest
    assert warmed[amd_url].json()["manifest_digest"] == amd.manifest_digest
    assert warmed[arm_url].json()["job_id"] != warmed[amd_url].json()["job_id"]
    for response in warmed.values():
        assert wait_done(running.url, response.json()["status_url"])["state"] == "done"

    arm64 = get(arm_url)
    amd64 = get(amd_url)
    assert arm64.status == amd64.status == 200, (arm64.body[:300], amd64.body[:300])
    assert arm64.headers["etag"] != amd64.headers["etag"]
    assert archive_config(arm64.body)["architecture"] == "arm64"
    assert load_and_run(docker_engine, tmp_path, arm64.body, repo_tag, run=False) == "linux/arm64"
    assert load_and_run(docker_engine, tmp_path, amd64.body, repo_tag) == "amd64"  # PLATFORM, the default

    # The same platform however it is spelled, with the same ETag; HEAD says so without a body.
    for spelled in ("linux/aarch64", "linux/arm64/v8"):
        head = send("HEAD", f"{running.url}/platform/{spelled}/{route}")
        assert (head.status_code, head.headers["etag"]) == (200, arm64.headers["etag"]), spelled
    assert send("HEAD", f"{running.url}/platform/linux/amd64/{route}").headers["etag"] == amd64.headers["etag"]

    # A platform the index lacks: 404, listing what it has (as the registry spells it).
    missing = get(f"{running.url}/platform/linux/s390x/{route}")
    assert missing.status == 404 and missing.json()["error"] == "platform_not_found"
    assert missing.json()["platforms"] == ["linux/arm64/v8", "linux/amd64"]
    # A single-platform arm64 image asked for as the default linux/amd64: 404 naming its platform, not an image
    # that cannot run; asked for as arm64, it is served.
    arm_only = f"registry/http/{registry.host}/docker/{filename_for(unique_repo, 'arm-only')}"
    refused = get(f"{running.url}/{arm_only}")
    assert (refused.status, refused.json()["platforms"]) == (404, ["linux/arm64"]), refused.body
    assert get(f"{running.url}/platform/linux/arm64/{arm_only}").status == 200
    bad = get(f"{running.url}/platform/linux/arm64%20x/{route}")
    assert bad.status == 400 and bad.json()["error"] == "bad_platform"


def test_ref_route_serves_a_tag_with_underscore_and_a_digest_pin(stack, registry, unique_repo, docker_engine,
                                                                 tmp_path):
    first = registry.push_image(unique_repo, "1.0_rc1", [busybox_layer(), message_layer("first")], cmd=CAT)
    running = stack("embedded")
    name = f"{registry.host}/{unique_repo}"

    tagged = get(f"{running.url}/ref/{name}:1.0_rc1.tar")
    assert tagged.status == 200, tagged.body[:300]
    assert load_and_run(docker_engine, tmp_path, tagged.body, f"{name}:1.0_rc1") == "first"

    # The tag moves on; the pin does not, and never asks the registry about the tag.
    registry.push_image(unique_repo, "1.0_rc1", [busybox_layer(), message_layer("second")], cmd=CAT)
    registry.proxy.reset()
    pinned = get(f"{running.url}/ref/{name}@{first.manifest_digest}.tar")
    assert pinned.status == 200, pinned.body[:300]
    assert pinned.headers["x-manifest-digest"] == first.manifest_digest
    assert registry.proxy.count("HEAD", kind="manifest", path_contains=first.manifest_digest) == 1
    assert registry.proxy.count(kind="manifest", path_contains="1.0_rc1") == 0
    digest_tag = f"{name}:sha256-{first.manifest_digest.removeprefix('sha256:')}"
    assert load_and_run(docker_engine, tmp_path, pinned.body, digest_tag) == "first"

    # name:tag@digest keeps the tag as given, for the pinned content; percent-encoding changes nothing.
    both = get(f"{running.url}/ref/{name}:1.0_rc1@{first.manifest_digest}.tar")
    assert archive_manifest(both.body)[0]["RepoTags"] == [f"{name}:1.0_rc1"]
    assert tar_members(both.body)[archive_manifest(both.body)[0]["Layers"][1]] == first.layers[1].tar
    encoded = get(f"{running.url}/ref/{quote(name, safe='')}%40{first.manifest_digest.replace(':', '%3A')}.tar")
    assert encoded.body == pinned.body
    assert get(f"{running.url}/ref/{name}:latest.tar").status == 404
    unknown = get(f"{running.url}/ref/{name}@sha256:{'0' * 64}.tar")
    assert unknown.status == 404, unknown.body
    assert get(f"{running.url}/ref/{name}:.bad.tar").json()["error"] == "bad_reference:invalid_reference"


@pytest.mark.parametrize("mode", ["embedded", "two-tier"])
def test_zstd_layers_become_plain_tars_that_load_and_run(mode, stack, registry, unique_repo, docker_engine,
                                                         tmp_path):
    message = f"zstd in {mode}"
    empty = make_layer({}, compression="zstd")  # an empty layer, as builders leave them
    image = registry.push_image(unique_repo, "zstd", [busybox_layer("zstd"), empty, message_layer(message, "zstd")],
                                cmd=CAT, flavour="oci")
    running = stack(mode)
    result = get(f"{running.url}/registry/http/{registry.host}/docker/{filename_for(unique_repo, 'zstd')}")
    assert result.status == 200, result.body[:300]
    layer_tars = [member for name, member in tar_members(result.body).items() if name.endswith("/layer.tar")]
    assert layer_tars == [layer.tar for layer in image.layers]  # plain tars, whatever the registry sent
    assert load_and_run(docker_engine, tmp_path, result.body, f"{registry.host}/{unique_repo}:zstd") == message


def test_ref_routes_use_the_clients_registry_credentials(stack, registry_factory, tmp_path):
    user, password = "puller", "pull-secret"
    private = registry_factory(auth=htpasswd_auth(tmp_path / "htpasswd", {user: password}),
                               push_auth=(user, password))
    private.push_image("team/app", "v1_final", [make_layer({"a.txt": b"a"})])
    running = stack("embedded")
    path = f"{private.host}/team/app:v1_final.tar"

    for route in ("ref", "ref-auth"):
        challenged = get(f"{running.url}/{route}/{path}")
        assert challenged.status == 401 and challenged.headers["www-authenticate"].startswith("Basic "), route
        served = get(f"{running.url}/{route}/{path}", auth=(user, password))
        assert served.status == 200 and archive_manifest(served.body)[0]["RepoTags"] == [
            f"{private.host}/team/app:v1_final"], route
        refused = get(f"{running.url}/{route}/{path}", auth=(user, "wrong"))
        assert refused.status == 403, route
    # On a public image /ref-auth/ still asks first, so a switch gets to send the credentials it has.
    assert get(f"{running.url}/ref-auth/{private.host}/team/app:v1_final.tar").status == 401
