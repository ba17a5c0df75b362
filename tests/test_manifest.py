"""Unit tests for shared.manifest against real-shaped fixtures: an OCI index with BuildKit's attestation manifests,
and a signed schema1 manifest as CNCF distribution writes one (testdata/README.md)."""

from __future__ import annotations

import json

import pytest

from docker_http_passthrough.shared import manifest as mf
from docker_http_passthrough.shared.errors import NotFound, Unsupported
from docker_http_passthrough.shared.platforms import parse_platform
from tests.support.testdata import OCI_INDEX_WITH_ATTESTATIONS, SCHEMA1, SCHEMA1_MEDIA_TYPE

ATTESTATION = "attestation-manifest"


def _index() -> dict:
    return json.loads(OCI_INDEX_WITH_ATTESTATIONS.read_bytes())


def _entries(index: dict, attestations: bool) -> list[dict]:
    return [entry for entry in index["manifests"]
            if (entry.get("annotations", {}).get("vnd.docker.reference.type") == ATTESTATION) is attestations]


def test_fixture_is_shaped_as_buildkit_writes_it():
    index = _index()
    images, attestations = _entries(index, False), _entries(index, True)
    assert index["mediaType"] == mf.OCI_INDEX and len(images) == len(attestations) == 2
    assert index["manifests"] == images + attestations  # runnable manifests first, as BuildKit orders them
    assert {a["annotations"]["vnd.docker.reference.digest"] for a in attestations} == {i["digest"] for i in images}
    assert all(a["platform"] == {"architecture": "unknown", "os": "unknown"} for a in attestations)


@pytest.mark.parametrize("platform, architecture", [
    ("linux/amd64", "amd64"), ("linux/arm64", "arm64"), ("linux/arm64/v8", "arm64")])
@pytest.mark.parametrize("attestations_first", [False, True])
def test_select_platform_picks_the_image_never_its_attestation(platform, architecture, attestations_first):
    index = _index()
    images = _entries(index, False)
    if attestations_first:  # position must not matter
        index["manifests"] = _entries(index, True) + images
    chosen = mf.select_platform(json.dumps(index).encode(), parse_platform(platform))
    wanted = next(entry for entry in images if entry["platform"]["architecture"] == architecture)
    assert chosen == mf.Descriptor(wanted["mediaType"], wanted["digest"], wanted["size"])


@pytest.mark.parametrize("platform", ["linux/arm/v7", "linux/s390x", "unknown/unknown", "linux/arm64/v9"])
def test_a_platform_the_index_lacks_is_not_found_and_attestations_are_not_offered(platform):
    with pytest.raises(NotFound) as info:
        mf.select_platform(OCI_INDEX_WITH_ATTESTATIONS.read_bytes(), parse_platform(platform))
    assert info.value.code == "platform_not_found" and info.value.status == 404
    assert info.value.message.endswith("(offered: linux/amd64, linux/arm64/v8)"), info.value.message
    # The JSON a user gets lists them as a field too, spelled as the registry spells them.
    assert info.value.to_dict()["platforms"] == ["linux/amd64", "linux/arm64/v8"]


def test_schema1_manifest_is_refused_with_advice():
    data = SCHEMA1.read_bytes()
    assert b'"signatures"' in data and json.loads(data)["schemaVersion"] == 1  # the real, signed shape
    assert mf.media_type_of(data, SCHEMA1_MEDIA_TYPE) == SCHEMA1_MEDIA_TYPE  # schema1 declares no mediaType
    for refuse in (lambda: mf.parse_image_manifest(data), lambda: mf.check_supported(SCHEMA1_MEDIA_TYPE)):
        with pytest.raises(Unsupported) as info:
            refuse()
        assert info.value.status == 502
        assert "schema1" in info.value.message and "push the image again" in info.value.message
