"""End to end: real registry, real Redis and RQ workers (two-tier) or none (embedded), real Docker engine."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.support.downloads import (
    archive_config,
    archive_manifest,
    filename_for,
    get,
    get_many,
    image_url,
    tar_members,
)
from tests.support.faults import assert_complete_tar
from tests.support.images import busybox_layer, make_layer

pytestmark = pytest.mark.e2e


def test_archive_loads_and_runs_in_docker(mode, stack, registry, unique_repo, docker_engine, tmp_path):
    message = f"hello from {unique_repo} in {mode}"
    app = make_layer({"app/message.txt": message.encode() + b"\n"})
    registry.push_image(unique_repo, "v1", [busybox_layer(), app], cmd=["/bin/busybox", "cat", "/app/message.txt"])
    running = stack(mode)

    result = get(image_url(running.url, registry.host, unique_repo, "v1"))

    assert result.status == 200, result.body[:500]
    assert int(result.headers["content-length"]) == len(result.body)
    assert result.headers["content-type"] == "application/x-tar"
    names = list(tar_members(result.body))
    assert names[-2:] == ["manifest.json", "repositories"]
    repo_tag = f"{registry.host}/{unique_repo}:v1"
    assert archive_manifest(result.body)[0]["RepoTags"] == [repo_tag]
    archive = tmp_path / "image.tar"
    archive.write_bytes(result.body)
    assert f"Loaded image: {repo_tag}" in docker_engine.load(archive)
    try:
        ran = docker_engine.run("run", "--rm", "--network", "none", repo_tag)
        assert ran.stdout.strip() == message
    finally:
        docker_engine.run("rmi", "-f", repo_tag, check=False)


def test_default_registry_route_and_percent_encoded_host(mode, stack, registry, unique_repo):
    registry.push_image(unique_repo, "1.0", [make_layer({"a.txt": b"a"})])
    running = stack(mode, env={"REGISTRY_URL": registry.url})
    via_settings = get(f"{running.url}/docker/{filename_for(unique_repo, '1.0')}")
    encoded_host = registry.host.replace(":", "%3A")
    via_url = get(f"{running.url}/registry/http/{encoded_host}/docker/{filename_for(unique_repo, '1.0')}")
    assert via_settings.status == 200 and via_url.status == 200
    assert via_settings.body == via_url.body
    assert archive_manifest(via_settings.body)[0]["RepoTags"] == [f"{registry.host}/{unique_repo}:1.0"]


def test_concurrent_cold_requests_share_one_preparation(mode, stack, registry, unique_repo):
    layers = [make_layer({f"layer{i}/data.bin": bytes([i]) * (300_000 + i)}) for i in range(3)]
    image = registry.push_image(unique_repo, "latest", layers)
    running = stack(mode)
    url = image_url(running.url, registry.host, unique_repo, "latest")
    registry.proxy.reset()

    results = get_many([url] * 20)

    assert [r.status for r in results] == [200] * 20, results[0].body[:300]
    assert len({hashlib.sha256(r.body).hexdigest() for r in results}) == 1
    for blob in [image.config_digest] + [layer.digest for layer in layers]:
        assert registry.proxy.count("GET", kind="blob", path_contains=blob, status=200) == 1, registry.proxy.requests
    for layer in layers:  # an early start's size probe (a ranged GET of the blob's tail), shared by all 20
        assert registry.proxy.count("GET", kind="blob", path_contains=layer.digest, status=206) <= 1
    assert registry.proxy.count("GET", kind="manifest") == 1
    # One HEAD per request at most: requests asking at the same moment share one in flight.
    assert 1 <= registry.proxy.count("HEAD", kind="manifest") <= 20

    # Prepared: a second round costs at most one HEAD per request and nothing else.
    registry.proxy.reset()
    again = get_many([url] * 5)
    assert all(r.body == results[0].body for r in again)
    assert registry.proxy.count("GET") == 0, registry.proxy.requests
    assert 1 <= registry.proxy.count("HEAD", kind="manifest") <= 5
    assert registry.proxy.count(kind="blob") == 0


def test_embedded_and_two_tier_give_identical_bytes(stack, registry, unique_repo):
    registry.push_image(unique_repo, "same", [busybox_layer(), make_layer({"x": b"x"})])
    outputs = []
    for mode in ("embedded", "two-tier"):
        running = stack(mode)
        result = get(image_url(running.url, registry.host, unique_repo, "same"))
        assert_complete_tar(result)
        outputs.append(result.body)
    assert outputs[0] == outputs[1]


def test_images_sharing_a_base_layer_store_it_once(mode, stack, registry, unique_repo):
    base = make_layer({"base/big.bin": b"b" * 500_000})
    first = registry.push_image(unique_repo + "-one", "v1", [base, make_layer({"one.txt": b"1"})])
    second = registry.push_image(unique_repo + "-two", "v1", [base, make_layer({"two.txt": b"2"})])
    running = stack(mode)
    registry.proxy.reset()

    assert get(image_url(running.url, registry.host, unique_repo + "-one", "v1")).status == 200
    assert registry.proxy.count("GET", kind="blob", path_contains=base.digest, status=200) == 1
    registry.proxy.reset()
    assert get(image_url(running.url, registry.host, unique_repo + "-two", "v1")).status == 200

    stored = sorted(p.name for p in (Path(running.cache_dir) / "layers" / "sha256").iterdir())
    assert stored == sorted(f"{d.removeprefix('sha256:')}.tar" for d in {base.diff_id, first.layers[1].diff_id,
                                                                            second.layers[1].diff_id})
    # Downloaded once, for the first image; the second repository only had to prove it holds the blob (its last
    # bytes, 206; the stored layer gives its size, so no size probe).
    assert registry.proxy.count("GET", kind="blob", path_contains=base.digest, status=200) == 0
    assert registry.proxy.count("GET", kind="blob", path_contains=base.digest, status=206) == 1


@pytest.mark.parametrize("flavour", ["docker", "oci"])
def test_index_picks_linux_amd64_by_platform_not_position(mode, stack, registry, unique_repo, flavour):
    arm = registry.push_image(unique_repo, None, [make_layer({"arch": b"arm64"})], architecture="arm64",
                              flavour=flavour)
    amd = registry.push_image(unique_repo, None, [make_layer({"arch": b"amd64"})], architecture="amd64",
                              flavour=flavour)
    registry.push_index(unique_repo, "multi", [(arm, {"os": "linux", "architecture": "arm64", "variant": "v8"}),
                                               (amd, {"os": "linux", "architecture": "amd64"})], flavour=flavour)
    running = stack(mode)

    result = get(image_url(running.url, registry.host, unique_repo, "multi"))

    assert result.status == 200, result.body[:300]
    assert archive_config(result.body)["architecture"] == "amd64"
    layer_tars = [m for n, m in tar_members(result.body).items() if n.endswith("/layer.tar")]
    assert layer_tars == [amd.layers[0].tar]


def test_oci_manifest_with_uncompressed_layer(mode, stack, registry, unique_repo):
    plain = make_layer({"plain.txt": b"not compressed"}, compression="none")
    gz = make_layer({"gz.txt": b"compressed"})
    registry.push_image(unique_repo, "oci", [plain, gz], flavour="oci")
    running = stack(mode)
    result = get(image_url(running.url, registry.host, unique_repo, "oci"))
    assert result.status == 200, result.body[:300]
    layer_tars = [m for n, m in tar_members(result.body).items() if n.endswith("/layer.tar")]
    assert layer_tars == [plain.tar, gz.tar]
