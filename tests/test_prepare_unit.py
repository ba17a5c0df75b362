"""Unit tests for shared.prepare and the modules it puts together (layer_sink, layer_download, possession): layer inflation and verification, reuse rules, and download de-duplication.

The registry is an in-memory fake behind httpx.MockTransport (any host name serves the same content unless told
otherwise) that counts requests by (host, method, digest); the store is a tmp directory.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import pytest

from docker_http_passthrough.shared import layer_download, layer_sink
from docker_http_passthrough.shared import manifest as mf
from docker_http_passthrough.shared.errors import InvalidContent, NotFound
from docker_http_passthrough.shared.jobs import image_key
from docker_http_passthrough.shared.layer_download import fetch_layer
from docker_http_passthrough.shared.layer_sink import LayerSink, zstd
from docker_http_passthrough.shared.locks import LocalLocks
from docker_http_passthrough.shared.prepare import prepare_image
from docker_http_passthrough.shared.registry import Registries, RegistryClient
from docker_http_passthrough.shared.store import TEMP_MARK, Store
from docker_http_passthrough.shared.targets import RegistryTarget
from tests.support.fake_registry import REPO, FakeRegistry
from tests.support.images import sha
from tests.support.testdata import MULTI_MEMBER_DIFF_ID, MULTI_MEMBER_LAYER

GZIP_TYPE = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_GZIP_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
PLAIN_TYPE = "application/vnd.oci.image.layer.v1.tar"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "cache")


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def make_tar(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


TAR_A = make_tar({"etc/a": b"alpha\n" * 300})
TAR_B = make_tar({"bin/b": bytes(range(256)) * 20})
# pigz -p / some builders: one tar split over two concatenated gzip members.
MULTI_TAR = TAR_A + TAR_B
MULTI_BLOB = gz(TAR_A) + gz(TAR_B)


def layer_files(store: Store) -> list[Path]:
    return sorted((store.root / "layers" / "sha256").iterdir())


def partials(store: Store) -> list[Path]:
    return [p for p in store.root.rglob("*") if TEMP_MARK in p.name]


class Layer:
    def __init__(self, blob: bytes, diff_id: str, media_type: str = GZIP_TYPE, size: int | None = None):
        self.blob, self.diff_id, self.media_type = blob, diff_id, media_type
        self.descriptor = mf.Descriptor(media_type, sha(blob), len(blob) if size is None else size)

    @classmethod
    def gzipped(cls, tar: bytes, media_type: str = GZIP_TYPE) -> "Layer":
        return cls(gz(tar), sha(tar), media_type)


class Image:
    def __init__(self, layers: list[Layer], label: str = "x", diff_ids: list[str] | None = None):
        self.layers = layers
        self.config = json.dumps({
            "architecture": "amd64", "os": "linux", "config": {"Labels": {"l": label}},
            "rootfs": {"type": "layers", "diff_ids": diff_ids or [layer.diff_id for layer in layers]},
        }).encode()
        self.manifest = json.dumps({
            "schemaVersion": 2, "mediaType": mf.DOCKER_MANIFEST,
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                       "digest": sha(self.config), "size": len(self.config)},
            "layers": [{"mediaType": layer.media_type, "digest": layer.descriptor.digest, "size": layer.descriptor.size}
                       for layer in layers],
        }).encode()
        self.digest = sha(self.manifest)


def serving(*images: Image, chunk: int = 4096, blob_delay: float = 0.0) -> FakeRegistry:
    fake = FakeRegistry(chunk=chunk, blob_delay=blob_delay)
    for image in images:
        fake.add_image(image.manifest, image.config, [layer.blob for layer in image.layers])
    return fake


def client(http: Registries, host: str = "reg.example") -> RegistryClient:
    return RegistryClient(http, RegistryTarget(f"https://{host}", host), REPO)


# --- LayerSink


def run_sink(blob: bytes, cuts: list[int] = (), compression: str = "gzip") -> tuple[bytes, str | None, LayerSink]:
    """Feed `blob` split at `cuts`, then finish. Returns (tar bytes, refusal, sink): the refusal however the sink
    reports it, raised (InvalidContent) or remembered for fetch_layer (`inflate_error`)."""
    out = io.BytesIO()
    sink = LayerSink(out, compression)
    try:
        previous = 0
        for cut in [*cuts, len(blob)]:
            sink.feed(blob[previous:cut])
            previous = cut
        sink.finish()
    except InvalidContent as exc:
        return out.getvalue(), str(exc), sink
    return out.getvalue(), sink.inflate_error, sink


@pytest.mark.parametrize("step", [len(MULTI_BLOB), 4096, 7, 1])
def test_sink_inflates_concatenated_gzip_members(step: int):
    tar, error, sink = run_sink(MULTI_BLOB, list(range(step, len(MULTI_BLOB), step)))
    assert error is None
    assert tar == MULTI_TAR
    assert "sha256:" + sink.tar_hash.hexdigest() == sha(MULTI_TAR)
    assert "sha256:" + sink.blob_hash.hexdigest() == sha(MULTI_BLOB)
    assert (sink.blob_size, sink.tar_size) == (len(MULTI_BLOB), len(MULTI_TAR))


def _member_ends(blob: bytes) -> list[int]:
    """Where each gzip member of ``blob`` ends."""
    ends, offset = [], 0
    while offset < len(blob):
        inflater = zlib.decompressobj(wbits=31)
        inflater.decompress(blob[offset:])
        assert inflater.eof, "a member that does not end"
        offset = len(blob) - len(inflater.unused_data)
        ends.append(offset)
    return ends


def test_sink_inflates_bgzips_multi_member_layer_to_its_diff_id():
    """testdata/multi-member-layer.tar.gz, made by a real tool (htslib's bgzip): a gzip member per 64 KiB block
    and an empty last member. Its diff_id is the one recorded when it was made, and what Python's own
    multi-member gunzip gives; the sink must reach it however the network cuts the bytes."""
    blob = MULTI_MEMBER_LAYER.read_bytes()
    ends = _member_ends(blob)
    assert len(ends) >= 4 and ends[-1] == len(blob)
    assert gzip.decompress(blob[ends[-2]:]) == b""  # bgzip's end-of-file marker: an empty member
    assert sha(gzip.decompress(blob)) == MULTI_MEMBER_DIFF_ID
    splits = [[], [end + delta for end in ends[:-1] for delta in (-1, 0, 1)]] + [
        list(range(step, len(blob), step)) for step in (7, 4096)]
    for cuts in splits:
        tar, error, sink = run_sink(blob, cuts)
        assert error is None, (error, cuts[:5])
        assert "sha256:" + sink.tar_hash.hexdigest() == MULTI_MEMBER_DIFF_ID and sha(tar) == MULTI_MEMBER_DIFF_ID
        assert (sink.blob_size, sink.tar_size) == (len(blob), len(tar))


def test_sink_inflates_multi_member_at_every_split_point():
    for split in range(len(MULTI_BLOB) + 1):
        tar, error, _ = run_sink(MULTI_BLOB, [split])
        assert (tar, error) == (MULTI_TAR, None), split


def test_sink_accepts_trailing_zero_padding_wherever_the_feeds_split():
    """The sink accepts zeros after the last member (as some tools write); that must not depend on where the
    network happened to split the bytes into feeds."""
    blob = gz(TAR_A) + b"\0" * 64
    assert run_sink(blob)[:2] == (TAR_A, None)  # accepted in one feed
    failures = []
    for split in range(len(blob) + 1):
        tar, error, _ = run_sink(blob, [split])
        if error is not None or tar != TAR_A:
            failures.append((split, error))
    assert failures == [], f"{len(failures)} of {len(blob) + 1} split points fail, first: {failures[:1]}"


def test_sink_bounds_each_inflate_step(monkeypatch):
    monkeypatch.setattr(layer_sink, "INFLATE_STEP", 64 << 10)
    bomb = b"\0" * (3 << 20)
    writes: list[int] = []

    class Out:
        def write(self, data: bytes) -> None:
            writes.append(len(data))

    sink = LayerSink(Out(), "gzip")
    sink.feed(gz(bomb) + gz(b"tail"))
    sink.finish()
    assert sink.inflate_error is None
    assert sum(writes) == len(bomb) + 4
    assert max(writes) <= 64 << 10
    assert "sha256:" + sink.tar_hash.hexdigest() == sha(bomb + b"tail")


TRUNCATIONS = {
    "middle": lambda: gz(TAR_A)[: len(gz(TAR_A)) // 2],
    "trailer": lambda: gz(TAR_A)[:-4],  # deflate data complete, CRC/size missing
    "second_member": lambda: MULTI_BLOB[: len(gz(TAR_A)) + 30],
}


@pytest.mark.parametrize("cut", sorted(TRUNCATIONS))
def test_sink_refuses_truncated_gzip(cut: str):
    blob = TRUNCATIONS[cut]()
    for cuts in ([], [len(blob) // 3]):
        _, error, _ = run_sink(blob, cuts)
        assert error is not None, (cut, cuts)


def test_sink_refuses_garbage_after_last_member():
    _, error, _ = run_sink(gz(TAR_A) + b"not gzip at all")
    assert error is not None


# --- LayerSink, zstd


def zst(data: bytes, options: dict | None = None) -> bytes:
    return zstd.compress(data, options=options)


def skippable(payload: bytes, magic: int = 0x184D2A50) -> bytes:
    """A zstd skippable frame (magic 0x184D2A50..5F, 4-byte length, payload): decoders pass over it."""
    return magic.to_bytes(4, "little") + len(payload).to_bytes(4, "little") + payload


# Two frames with a skippable frame before, between and after them, as a seekable-format or annotating writer
# might leave them; the first frame carries a content checksum.
ZSTD_BLOB = (skippable(b"head") + zst(TAR_A, options={zstd.CompressionParameter.checksum_flag: 1})
             + skippable(b"", 0x184D2A5F) + zst(TAR_B) + skippable(b"tail" * 3))


def test_sink_inflates_multi_frame_zstd_with_skippable_frames_at_every_split_point():
    assert zstd.decompress(ZSTD_BLOB) == MULTI_TAR  # the reference decoder agrees on what it holds
    for split in range(len(ZSTD_BLOB) + 1):
        tar, error, sink = run_sink(ZSTD_BLOB, [split], "zstd")
        assert (tar, error) == (MULTI_TAR, None), split
    for step in (1, 7, 4096):
        tar, error, sink = run_sink(ZSTD_BLOB, list(range(step, len(ZSTD_BLOB), step)), "zstd")
        assert (tar, error) == (MULTI_TAR, None), step
        assert "sha256:" + sink.tar_hash.hexdigest() == sha(MULTI_TAR)
        assert (sink.blob_size, sink.tar_size) == (len(ZSTD_BLOB), len(MULTI_TAR))


def test_sink_bounds_each_zstd_step(monkeypatch):
    monkeypatch.setattr(layer_sink, "INFLATE_STEP", 64 << 10)
    bomb = b"\0" * (3 << 20)
    blob = zst(bomb) + zst(b"tail")
    assert len(blob) < 1000  # a thousand-fold expansion: all of it in one call would be the bomb
    writes: list[int] = []

    class Out:
        def write(self, data: bytes) -> None:
            writes.append(len(data))

    sink = LayerSink(Out(), "zstd")
    sink.feed(blob)
    sink.finish()
    assert sink.inflate_error is None
    assert sum(writes) == len(bomb) + 4 and max(writes) <= 64 << 10
    assert "sha256:" + sink.tar_hash.hexdigest() == sha(bomb + b"tail")


ZSTD_REFUSALS = {
    "middle": lambda: zst(TAR_A)[: len(zst(TAR_A)) // 2],
    "last_byte": lambda: ZSTD_BLOB[: len(ZSTD_BLOB) - len(skippable(b"tail" * 3)) - 1],
    "inside_a_skippable_frame": lambda: ZSTD_BLOB[:-3],
    "garbage_after": lambda: zst(TAR_A) + b"not zstd at all",
    "zero_padding": lambda: zst(TAR_A) + b"\0" * 8,  # unlike gzip, no zstd writer pads: refused
    "gzip_as_zstd": lambda: gz(TAR_A),
}


@pytest.mark.parametrize("case", sorted(ZSTD_REFUSALS))
def test_sink_refuses_broken_zstd_wherever_it_is_cut(case: str):
    blob = ZSTD_REFUSALS[case]()
    for cuts in ([], [len(blob) // 3], list(range(5, len(blob), 5))):
        _, error, _ = run_sink(blob, cuts, "zstd")
        assert error is not None and "zstd" in error, (case, cuts[:3], error)


# --- fetch_layer


@pytest.mark.anyio
async def test_fetch_layer_stores_a_multi_member_gzip_layer_as_one_tar(store: Store):
    fake = FakeRegistry(chunk=333)
    layer = Layer(MULTI_BLOB, sha(MULTI_TAR))
    fake.blobs[layer.descriptor.digest] = MULTI_BLOB
    async with fake.http() as http:
        size = await fetch_layer(client(http), store, layer.descriptor, layer.diff_id)
    assert size == len(MULTI_TAR)
    assert store.layer_path(layer.diff_id).read_bytes() == MULTI_TAR
    assert store.linked_diff_id(layer.descriptor.digest) == layer.diff_id
    assert store.seen("https://reg.example", REPO, layer.descriptor.digest)
    assert partials(store) == []


@pytest.mark.anyio
async def test_fetch_layer_stores_a_zstd_layer_as_its_plain_tar(store: Store):
    layer = Layer(ZSTD_BLOB, sha(MULTI_TAR), "application/vnd.oci.image.layer.v1.tar+zstd")
    fake = FakeRegistry(chunk=777)
    fake.blobs[layer.descriptor.digest] = ZSTD_BLOB
    async with fake.http() as http:
        size = await fetch_layer(client(http), store, layer.descriptor, layer.diff_id)
        with pytest.raises(InvalidContent, match="invalid diff_id"):
            await fetch_layer(client(http), store, layer.descriptor, sha(TAR_A))
    assert size == len(MULTI_TAR) and store.layer_path(layer.diff_id).read_bytes() == MULTI_TAR
    assert store.linked_diff_id(layer.descriptor.digest) == layer.diff_id
    assert partials(store) == []


@pytest.mark.anyio
async def test_fetch_layer_stores_bgzips_multi_member_layer_under_its_diff_id(store: Store):
    blob = MULTI_MEMBER_LAYER.read_bytes()
    layer = Layer(blob, MULTI_MEMBER_DIFF_ID)
    fake = FakeRegistry(chunk=1000)
    fake.blobs[layer.descriptor.digest] = blob
    async with fake.http() as http:
        size = await fetch_layer(client(http), store, layer.descriptor, layer.diff_id)
    stored = store.layer_path(MULTI_MEMBER_DIFF_ID).read_bytes()
    assert (size, sha(stored)) == (len(stored), MULTI_MEMBER_DIFF_ID)
    assert store.linked_diff_id(layer.descriptor.digest) == MULTI_MEMBER_DIFF_ID
    with tarfile.open(fileobj=io.BytesIO(stored)) as tar:
        assert sorted(tar.getnames()) == ["etc", "etc/motd", "usr", "usr/share", "usr/share/doc",
                                          "usr/share/doc/fox.txt"]


@pytest.mark.anyio
async def test_fetch_layer_accepts_zero_padding_across_a_feed_boundary(store: Store, monkeypatch):
    """Same as the sink test above, through the real download path: the padding straddles two feeds."""
    monkeypatch.setattr(layer_download, "FEED_SIZE", 64)
    member = gz(TAR_A)
    blob = member + b"\0" * 100
    layer = Layer(blob, sha(TAR_A))
    fake = FakeRegistry(chunk=len(member))  # the first feed ends exactly after the member
    fake.blobs[layer.descriptor.digest] = blob
    async with fake.http() as http:
        await fetch_layer(client(http), store, layer.descriptor, layer.diff_id)
    assert store.layer_path(layer.diff_id).read_bytes() == TAR_A


def _assert_nothing_stored(store: Store, layer: Layer) -> None:
    assert layer_files(store) == []
    assert partials(store) == []
    assert store.linked_diff_id(layer.descriptor.digest) is None
    assert not store.seen("https://reg.example", REPO, layer.descriptor.digest)


@pytest.mark.parametrize("cut", sorted(TRUNCATIONS))
@pytest.mark.anyio
async def test_fetch_layer_refuses_truncated_gzip_and_stores_nothing(store: Store, cut: str):
    blob = TRUNCATIONS[cut]()
    # The descriptor matches the truncated bytes, so only the gzip check can notice.
    layer = Layer(blob, sha(MULTI_TAR if cut == "second_member" else TAR_A))
    fake = FakeRegistry()
    fake.blobs[layer.descriptor.digest] = blob
    async with fake.http() as http:
        with pytest.raises(InvalidContent) as info:
            await fetch_layer(client(http), store, layer.descriptor, layer.diff_id)
    assert info.value.status == 502
    _assert_nothing_stored(store, layer)


@pytest.mark.anyio
async def test_fetch_layer_refuses_a_blob_that_does_not_match_its_digest(store: Store):
    layer = Layer.gzipped(TAR_A)
    other = gz(TAR_B)
    fake = FakeRegistry()
    fake.blobs[layer.descriptor.digest] = other  # wrong bytes under the right name
    # diff_id of what is actually sent, so only the blob digest check can notice.
    descriptor = mf.Descriptor(GZIP_TYPE, layer.descriptor.digest, len(other))
    async with fake.http() as http:
        with pytest.raises(InvalidContent) as info:
            await fetch_layer(client(http), store, descriptor, sha(TAR_B))
    assert "digest" in info.value.message
    _assert_nothing_stored(store, layer)
    assert not store.has_layer(sha(TAR_B))


@pytest.mark.anyio
async def test_fetch_layer_refuses_a_tar_that_does_not_match_its_diff_id(store: Store):
    layer = Layer(gz(TAR_A), sha(TAR_B))  # the config claims another tar
    fake = FakeRegistry()
    fake.blobs[layer.descriptor.digest] = layer.blob
    async with fake.http() as http:
        with pytest.raises(InvalidContent) as info:
            await fetch_layer(client(http), store, layer.descriptor, layer.diff_id)
    assert "diff_id" in info.value.message
    _assert_nothing_stored(store, layer)
    assert not store.has_layer(sha(TAR_A)) and not store.has_layer(sha(TAR_B))


@pytest.mark.anyio
async def test_fetch_layer_refuses_a_blob_longer_than_its_descriptor(store: Store):
    blob = gz(TAR_A)
    layer = Layer(blob, sha(TAR_A), size=len(blob) - 10)  # digest and diff_id would verify
    fake = FakeRegistry(chunk=50)
    fake.blobs[layer.descriptor.digest] = blob
    async with fake.http() as http:
        with pytest.raises(InvalidContent) as info:
            await fetch_layer(client(http), store, layer.descriptor, layer.diff_id)
    assert "longer" in info.value.message
    _assert_nothing_stored(store, layer)


@pytest.mark.anyio
async def test_fetch_layer_stores_an_uncompressed_layer_as_sent(store: Store):
    layer = Layer(TAR_B, sha(TAR_B), PLAIN_TYPE)
    fake = FakeRegistry(chunk=1000)
    fake.blobs[layer.descriptor.digest] = TAR_B
    async with fake.http() as http:
        size = await fetch_layer(client(http), store, layer.descriptor, layer.diff_id)
    assert size == len(TAR_B)
    assert store.layer_path(layer.diff_id).read_bytes() == TAR_B
    # A gzip blob declared as plain is stored as sent, so its diff_id must be the blob's own digest.
    gz_as_plain = Layer(gz(TAR_A), sha(TAR_A), PLAIN_TYPE)
    fake.blobs[gz_as_plain.descriptor.digest] = gz_as_plain.blob
    async with fake.http() as http:
        with pytest.raises(InvalidContent):
            await fetch_layer(client(http), store, gz_as_plain.descriptor, gz_as_plain.diff_id)
    assert not store.has_layer(sha(TAR_A))


# --- prepare_image


@pytest.mark.anyio
async def test_prepare_image_stores_and_then_serves_from_store(store: Store):
    image = Image([Layer(MULTI_BLOB, sha(MULTI_TAR), OCI_GZIP_TYPE), Layer(TAR_B, sha(TAR_B), PLAIN_TYPE)])
    fake = serving(image)
    async with fake.http() as http:
        record = await prepare_image(client(http), store, image.digest, LocalLocks())
        assert [(l.diff_id, l.size, l.digest) for l in record.layers] == [
            (sha(MULTI_TAR), len(MULTI_TAR), sha(MULTI_BLOB)), (sha(TAR_B), len(TAR_B), sha(TAR_B))]
        assert record.config_digest == sha(image.config)
        assert store.get_image(image_key("https://reg.example", REPO, image.digest)) == record
        assert Counter(r.method for r in fake.requests) == {"GET": 4}
        before = len(fake.requests)
        again = await prepare_image(client(http), store, image.digest, LocalLocks())
    assert again == record
    assert len(fake.requests) == before


@pytest.mark.anyio
async def test_linked_layer_from_another_registry_is_proven_with_its_tail_not_downloaded(store: Store):
    shared_layer = Layer.gzipped(TAR_A)
    image = Image([shared_layer])
    fake = serving(image)
    async with fake.http() as http:
        await prepare_image(client(http, "first.example"), store, image.digest, LocalLocks())
        assert fake.count("GET", shared_layer.descriptor.digest) == 1
        record = await prepare_image(client(http, "second.example"), store, image.digest, LocalLocks())
    digest = shared_layer.descriptor.digest
    assert fake.ranged(digest, "second.example") == 1  # the blob's last bytes, as proof it holds the blob
    assert fake.count("GET", digest, "second.example") == 1  # that ranged GET, and no full download
    assert store.seen("https://second.example", REPO, digest)
    assert record.registry == "https://second.example"
    assert [l.diff_id for l in record.layers] == [shared_layer.diff_id]


@pytest.mark.anyio
async def test_registry_that_only_knows_the_digest_cannot_prove_it_holds_the_blob(store: Store):
    """Answering HEAD 200 (anyone who read a manifest can) is not enough: the forged tail fails the proof, the
    blob is then downloaded for real and fails its digest check. The stored layer is never handed out."""
    shared_layer = Layer.gzipped(TAR_A)
    image = Image([shared_layer])
    fake = serving(image)
    digest = shared_layer.descriptor.digest
    fake.forged_ranges[("second.example", digest)] = bytes(len(shared_layer.blob))
    async with fake.http() as http:
        await prepare_image(client(http, "first.example"), store, image.digest, LocalLocks())
        fake.blobs[digest] = bytes(len(shared_layer.blob))  # what the liar serves in full
        with pytest.raises(InvalidContent):
            await prepare_image(client(http, "second.example"), store, image.digest, LocalLocks())
    assert fake.ranged(digest, "second.example") == 1
    assert not store.seen("https://second.example", REPO, digest)
    assert store.get_image(image_key("https://second.example", REPO, image.digest)) is None


@pytest.mark.anyio
async def test_linked_layer_is_not_served_when_this_registry_lacks_the_blob(store: Store):
    shared_layer = Layer.gzipped(TAR_A)
    image = Image([shared_layer])
    fake = serving(image)
    fake.missing.add(("second.example", shared_layer.descriptor.digest))
    async with fake.http() as http:
        await prepare_image(client(http, "first.example"), store, image.digest, LocalLocks())
        with pytest.raises(NotFound):
            await prepare_image(client(http, "second.example"), store, image.digest, LocalLocks())
    assert fake.count("GET", shared_layer.descriptor.digest, "second.example") >= 1
    assert not store.seen("https://second.example", REPO, shared_layer.descriptor.digest)
    assert store.get_image(image_key("https://second.example", REPO, image.digest)) is None


@pytest.mark.anyio
async def test_stored_but_unlinked_layer_is_never_served_for_another_blob(store: Store):
    private = Layer.gzipped(TAR_A)
    legit = Image([private], label="private")
    # The attacker names the private diff_id but can only serve other bytes under their own blob digest.
    evil_blob = gz(b"attacker tar" * 100)
    attack = Image([Layer(evil_blob, private.diff_id)], label="attack")
    fake = serving(legit, attack)
    async with fake.http() as http:
        await prepare_image(client(http, "private.example"), store, legit.digest, LocalLocks())
        with pytest.raises(InvalidContent) as info:
            await prepare_image(client(http, "evil.example"), store, attack.digest, LocalLocks())
    assert "diff_id" in info.value.message
    assert fake.count("GET", sha(evil_blob), "evil.example") == 1
    assert fake.count("HEAD", private.descriptor.digest, "evil.example") == 0
    assert store.layer_path(private.diff_id).read_bytes() == TAR_A  # untouched
    assert store.linked_diff_id(sha(evil_blob)) is None
    assert store.get_image(image_key("https://evil.example", REPO, attack.digest)) is None
    assert partials(store) == []


@pytest.mark.anyio
async def test_concurrent_preparations_download_a_shared_blob_once(store: Store):
    base = Layer.gzipped(TAR_A)
    one = Image([base, Layer.gzipped(make_tar({"one": b"1" * 999}))], label="one")
    two = Image([base, Layer.gzipped(make_tar({"two": b"2" * 999}))], label="two")
    fake = serving(one, two, blob_delay=0.05)
    locks = LocalLocks()
    async with fake.http() as http:
        first, second = await asyncio.gather(
            prepare_image(client(http), store, one.digest, locks),
            prepare_image(client(http), store, two.digest, locks))
    assert fake.count("GET", base.descriptor.digest) == 1
    assert fake.count("GET", one.layers[1].descriptor.digest) == 1
    assert fake.count("GET", two.layers[1].descriptor.digest) == 1
    assert first.layers[0] == second.layers[0]
    assert store.layer_path(base.diff_id).read_bytes() == TAR_A
    assert locks._locks == {}  # nothing left behind
