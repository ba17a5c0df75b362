"""Unit tests for shared.platforms and the platform choice in shared.manifest: what an engineer types finds
the entry a registry lists, and a single-platform image serves only its own platform."""

from __future__ import annotations

import json

import pytest

from docker_http_passthrough.shared import manifest as mf
from docker_http_passthrough.shared.errors import NotFound, PassthroughError
from docker_http_passthrough.shared.platforms import Platform, PlatformError, parse_platform


@pytest.mark.parametrize("typed, expected", [
    ("linux/amd64", "linux/amd64"),
    ("linux/x86_64", "linux/amd64"),
    ("linux/amd64/v1", "linux/amd64"),
    ("linux/amd64/v3", "linux/amd64/v3"),
    ("Linux/AArch64", "linux/arm64"),
    ("linux/arm64/v8", "linux/arm64"),
    ("linux/arm64/8", "linux/arm64"),
    ("linux/arm64/v8.0", "linux/arm64"),
    ("linux/arm64/v9", "linux/arm64/v9"),
    ("linux/arm", "linux/arm"),
    ("linux/arm/v7", "linux/arm"),
    ("linux/armhf", "linux/arm"),
    ("linux/armel", "linux/arm/v6"),
    ("linux/arm/v6", "linux/arm/v6"),
    ("linux/i386", "linux/386"),
    ("windows/amd64", "windows/amd64"),
])
def test_typed_platforms_are_normalised_as_containerd_does(typed, expected):
    assert str(parse_platform(typed)) == expected


@pytest.mark.parametrize("bad", ["amd64", "linux", "linux/", "/amd64", "linux/arm64/v8/x", "linux/amd 64",
                                 "linux/amd64%2F", "linux/" + "a" * 40, "linux/-amd64", "../etc/passwd"])
def test_anything_else_is_refused_with_the_shape_it_needs(bad):
    with pytest.raises(PlatformError) as info:
        parse_platform(bad)
    assert "os/architecture" in str(info.value) or "not a platform name" in str(info.value)


def test_path_prefix_spells_the_normalised_platform():
    assert parse_platform("linux/aarch64").path_prefix == "/platform/linux/arm64"
    assert Platform("linux", "arm", "v6").path_prefix == "/platform/linux/arm/v6"


def _index(*platforms: dict) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": mf.OCI_INDEX, "manifests": [
        {"mediaType": mf.OCI_MANIFEST, "digest": "sha256:" + f"{i:064x}", "size": 100 + i, "platform": p}
        for i, p in enumerate(platforms)]}).encode()


ARM_FIRST = _index({"os": "linux", "architecture": "arm", "variant": "v6"},
                   {"os": "linux", "architecture": "arm64", "variant": "v8"},
                   {"os": "linux", "architecture": "arm", "variant": "v7"},
                   {"os": "linux", "architecture": "amd64"})


@pytest.mark.parametrize("wanted, position", [
    ("linux/arm64", 1), ("linux/aarch64", 1), ("linux/arm64/v8", 1),
    ("linux/arm", 2), ("linux/arm/v7", 2), ("linux/arm/v6", 0), ("linux/amd64", 3), ("linux/x86_64", 3)])
def test_select_platform_matches_normalised_names_never_positions(wanted, position):
    assert mf.select_platform(ARM_FIRST, parse_platform(wanted)).size == 100 + position


def test_a_platform_without_variant_takes_a_variant_when_nothing_matches_exactly():
    only_v6 = _index({"os": "linux", "architecture": "arm", "variant": "v6"})
    assert mf.select_platform(only_v6, parse_platform("linux/arm")).size == 100
    with pytest.raises(NotFound):  # an explicit variant never takes another
        mf.select_platform(_index({"os": "linux", "architecture": "arm", "variant": "v7"}),
                           parse_platform("linux/arm/v6"))


def _config(**platform: str) -> bytes:
    return json.dumps({**platform, "rootfs": {"type": "layers", "diff_ids": []}}).encode()


def test_a_single_platform_image_serves_its_own_platform_only():
    arm64 = _config(os="linux", architecture="arm64", variant="v8")
    mf.check_config_platform(arm64, parse_platform("linux/arm64"))
    mf.check_config_platform(arm64, parse_platform("linux/aarch64"))
    with pytest.raises(NotFound) as info:
        mf.check_config_platform(arm64, parse_platform("linux/amd64"))
    body = info.value.to_dict()
    assert (body["status"], body["error"], body["platforms"], body["platform"]) == (
        404, "platform_not_found", ["linux/arm64/v8"], "linux/amd64")


def test_a_config_that_names_no_platform_serves_any():
    mf.check_config_platform(_config(), parse_platform("linux/s390x"))
    mf.check_config_platform(_config(os="linux"), parse_platform("linux/s390x"))


def test_error_details_survive_the_trip_through_a_job_outcome():
    error = mf.platform_not_found(parse_platform("linux/arm64"), ["linux/amd64"])
    again = PassthroughError.from_dict(json.loads(json.dumps(error.to_dict())))
    assert again.to_dict() == error.to_dict()
