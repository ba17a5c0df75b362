"""End to end, a full store volume (issue 10, item 5), in both modes, on a real tmpfs that fills up: a cold image
gets a JSON 507 naming the store and leaves no temporary file; warm images are still served; once space is back
the same request succeeds without a restart; with CACHE_MAX_BYTES set, least-recently-used layers are evicted
and the write tried again first."""

from __future__ import annotations

import os

import pytest

from tests.support.downloads import get, image_url, tar_members
from tests.support.faults import assert_complete_tar, assert_json_error
from tests.support.images import make_layer
from tests.support.job_faults import fill, leftovers, small_volume

pytestmark = pytest.mark.e2e

VOLUME = "16m"


@pytest.fixture
def volume(tmp_path):
    with small_volume(tmp_path / "volume", VOLUME) as mounted:
        yield mounted


def push(registry, repository: str, tag: str, size: int):
    layer = make_layer({"payload.bin": os.urandom(size)})  # random: the layer is as big as it says
    registry.push_image(repository, tag, [layer])
    return layer


def layer_tars(body: bytes) -> list[bytes]:
    return [member for name, member in tar_members(body).items() if name.endswith("/layer.tar")]


def test_a_full_store_is_507_naming_it_warm_images_still_serve_and_space_back_recovers(
        mode, stack, registry, unique_repo, volume):
    cache = volume / "cache"
    running = stack(mode, cache_dir=cache)
    warm_layer = push(registry, unique_repo, "warm", 64 << 10)
    cold_layer = push(registry, unique_repo, "cold", 1 << 20)
    warm_url = image_url(running.url, registry.host, unique_repo, "warm")
    cold_url = image_url(running.url, registry.host, unique_repo, "cold")
    assert_complete_tar(get(warm_url))
    filler = fill(volume, leave_free=256 << 10)

    full = get(cold_url, timeout=60)
    body = assert_json_error(full, 507, error="store_full", words=(str(cache), "full"))
    assert leftovers(cache) == [], f"nothing half-written stays: {leftovers(cache)}"

    served = get(warm_url)
    assert_complete_tar(served)
    assert layer_tars(served.body) == [warm_layer.tar]

    filler.unlink()  # space is back: no restart, no setting
    recovered = get(cold_url, timeout=60)
    assert_complete_tar(recovered)
    assert layer_tars(recovered.body) == [cold_layer.tar], body


def test_a_full_store_with_cache_max_bytes_evicts_and_tries_again(mode, stack, registry, unique_repo, volume):
    cache = volume / "cache"
    # CACHE_MAX_BYTES larger than the volume (a common mistake): the volume fills before the bound is reached.
    running = stack(mode, cache_dir=cache, env={"CACHE_MAX_BYTES": "1G"})
    old_layer = push(registry, unique_repo, "old", 1 << 20)
    new_layer = push(registry, unique_repo, "new", 1 << 20)
    assert_complete_tar(get(image_url(running.url, registry.host, unique_repo, "old")))
    fill(volume, leave_free=512 << 10)

    result = get(image_url(running.url, registry.host, unique_repo, "new"), timeout=60)
    assert_complete_tar(result)
    assert layer_tars(result.body) == [new_layer.tar]
    assert not (cache / "layers" / "sha256" / f"{old_layer.diff_id.removeprefix('sha256:')}.tar").exists(), \
        "the least recently used layer made room"
    assert leftovers(cache) == []
