"""shared.gzip_tail and api.size_probes: a gzip layer's inflated size from its last bytes — counted, read from
ISIZE, or unknown when the blob has several members — probed once per blob, a bounded number at a time."""

from __future__ import annotations

import asyncio
import gzip
import os
import zlib

import pytest

from docker_http_passthrough.api.size_probes import PROBE_CONCURRENCY, SizeGuesses
from docker_http_passthrough.shared import manifest as mf
from docker_http_passthrough.shared.gzip_tail import TAIL_WINDOW, size_from_tail
from docker_http_passthrough.shared.registry import RegistryClient
from tests.support.fake_registry import REPO, FakeRegistry, target
from tests.support.testdata import MULTI_MEMBER_LAYER

LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
TAR_SIZE = 512 * 400  # sizes a tar can have: whole 512-byte blocks


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def tail_size(blob: bytes):
    return size_from_tail(blob[-TAIL_WINDOW:], len(blob))


def test_a_small_blob_is_counted_whole_members_and_padding_included():
    data = os.urandom(TAR_SIZE // 4) + bytes(TAR_SIZE - TAR_SIZE // 4)
    found = tail_size(gz(data))
    assert (found.size, found.exact) == (TAR_SIZE, True)
    parts = gz(data[:1000]) + gz(data[1000:]) + bytes(20)
    assert tail_size(parts).size == TAR_SIZE
    bgzip = MULTI_MEMBER_LAYER.read_bytes()  # htslib's bgzip: several members, an empty one last
    assert tail_size(bgzip).size == 225_280 and tail_size(bgzip).exact
    assert tail_size(b"not gzip at all, not at all" * 10).size is None


def test_a_large_single_member_blob_gives_its_isize():
    data = os.urandom(TAR_SIZE)
    found = tail_size(gz(data))
    assert (found.size, found.how) == (TAR_SIZE, "one member (ISIZE)")


@pytest.mark.parametrize("blob", [
    pytest.param(gz(os.urandom(TAR_SIZE)) + gz(os.urandom(10_240)), id="a small last member"),
    pytest.param(b"".join(gz(os.urandom(TAR_SIZE)[i:i + 65_536]) for i in range(0, TAR_SIZE, 65_536)) + gz(b""),
                 id="bgzip-like blocks"),
    pytest.param(gz(os.urandom(TAR_SIZE)) + bytes(100), id="zero padding after the stream"),
    pytest.param(gz(os.urandom(TAR_SIZE)) + gz(os.urandom(TAR_SIZE // 2)), id="a last member smaller than the blob"),
])
def test_several_members_or_padding_make_the_size_unknown(blob):
    assert len(blob) > TAIL_WINDOW
    assert tail_size(blob).size is None


def test_long_members_whose_last_inflates_past_the_blob_are_the_one_case_the_tail_cannot_tell():
    """The documented limit: such a blob looks like one member; the guess (the last member's size) is wrong, and
    the stream is cut when the layer is unpacked (see test_early_gate)."""
    first, last = os.urandom(TAR_SIZE // 2), os.urandom(3 * TAR_SIZE // 4).hex().encode()  # hex: about 2:1
    blob = gz(first) + gz(last)
    assert len(gz(last)) > TAIL_WINDOW and len(last) > len(blob)
    assert tail_size(blob).size == len(last) != len(first) + len(last)


def test_incompressible_data_is_not_taken_for_4_gib_more():
    """zlib stores incompressible data in blocks of 16 KiB with 5 bytes each: a blob a little larger than its
    tar, by more than a 64 KiB block overhead would allow (a 256 MiB random layer was announced as 4 GiB more)."""
    size = 32 << 20
    blob = gzip.compress(os.urandom(size), compresslevel=6, mtime=0)
    assert len(blob) - size > (len(blob) >> 13) + 4096  # past the old bound
    assert tail_size(blob).size == size


def test_isize_is_lifted_by_4_gib_steps_to_what_the_compressed_size_allows():
    tail = gz(os.urandom(TAR_SIZE))[-TAIL_WINDOW:]
    assert size_from_tail(tail, 5 << 30).size == TAR_SIZE + 2 * (1 << 32)  # ≥ 5 GiB compressed: ≥ ~5 GiB inflated
    assert size_from_tail(tail, 3 << 30).size == TAR_SIZE + (1 << 32)


@pytest.mark.anyio
async def test_probes_are_shared_between_requests_and_bounded_in_number():
    fake = FakeRegistry()
    blobs = [gz(os.urandom(512 * 150) + bytes(TAR_SIZE)) for _ in range(40)]
    layers = [mf.Descriptor(LAYER_GZIP, fake.add_blob(blob), len(blob)) for blob in blobs]
    running = peak = 0
    served = fake.handle

    async def slow_handle(request):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await asyncio.sleep(0.02)
            return await served(request)
        finally:
            running -= 1

    fake.handle = slow_handle
    guesses = SizeGuesses()
    async with fake.http() as registries:
        client = RegistryClient(registries, target(), REPO)
        first, second = await asyncio.gather(*(asyncio.gather(*(guesses.gzip_size(client, layer) for layer in layers))
                                               for _request in range(2)))
    expected = [len(zlib.decompress(blob, wbits=31)) for blob in blobs]
    assert [found.size for found in first] == [found.size for found in second] == expected
    assert all(fake.ranged(layer.digest, "reg.example") == 1 for layer in layers), "one probe per blob"
    assert 1 < peak <= PROBE_CONCURRENCY
