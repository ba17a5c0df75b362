"""api.archive_stream and api.early_stream: the one streaming path, its leases, and the early-start gate that
holds bytes back until the preparation verified them — and cuts the stream at once when they will never come."""

from __future__ import annotations

import asyncio
import io
import json
import os
import time

import pytest

from docker_http_passthrough.api.archive_stream import stream_archive
from docker_http_passthrough.api.lease_book import LeaseBook
from docker_http_passthrough.api.early_stream import EarlyGate, EarlyPlan, EarlyStreamAborted
from docker_http_passthrough.api.preparation import JobState
from docker_http_passthrough.shared.archive import LayerFile, plan_archive
from docker_http_passthrough.shared.archive_reader import ArchiveSourceError, FileSpan, write_archive
from docker_http_passthrough.shared.errors import InvalidContent
from docker_http_passthrough.shared.eviction import evict
from docker_http_passthrough.shared.store import Store
from tests.support.images import sha

REGISTRY, REPOSITORY = "https://reg.example", "team/app"


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "cache")


def image(store: Store, sizes=(300_000, 5_000, 200_000)):
    """(plan, [(blob digest, diff_id)], layer contents) of an image whose layers are not stored yet."""
    contents = [os.urandom(size) for size in sizes]
    diff_ids = [sha(data) for data in contents]
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    store.put_blob(sha(config), config)
    files = [LayerFile(d, len(c), str(store.layer_path(d))) for d, c in zip(diff_ids, contents)]
    plan = plan_archive(config, sha(config), files, "team/app:v1")
    layers = [(sha(b"blob" + data[:64]), diff_id) for data, diff_id in zip(contents, diff_ids)]
    return plan, layers, contents


def store_layer(store: Store, digest: str, diff_id: str, data: bytes) -> None:
    """What a preparation does once a layer verified."""
    with store.atomic_writer(store.layer_path(diff_id)) as out:
        out.write(data)
    store.link_layer(digest, diff_id, len(data), data[-32:])
    store.mark_seen(REGISTRY, REPOSITORY, digest)


async def read_all(stream) -> bytes:
    return b"".join([bytes(piece) async for piece in stream])


@pytest.mark.anyio
async def test_stream_sends_the_range_and_leases_its_layers_until_it_ends(store):
    plan, layers, contents = image(store)
    for (digest, diff_id), data in zip(layers, contents):
        store_layer(store, digest, diff_id, data)
    reference = io.BytesIO()
    write_archive(plan, reference)
    expected = reference.getvalue()
    diff_ids = [diff_id for _digest, diff_id in layers]

    stream = stream_archive(LeaseBook(store), plan, diff_ids, 1000, plan.size - 10)
    first = bytes(await stream.__anext__())
    assert evict(store, 1) == [], "a layer being streamed is never evicted"
    rest = await read_all(stream)
    assert first + rest == expected[1000:plan.size - 10]
    assert len(evict(store, 1)) == 3, "once the stream ended, its layers may go"


@pytest.mark.anyio
async def test_zero_copy_parts_are_the_same_bytes_and_each_layer_is_closed_once_passed(store):
    plan, layers, contents = image(store, sizes=(3_000_000, 700_000, 2_000_000))
    for (digest, diff_id), data in zip(layers, contents):
        store_layer(store, digest, diff_id, data)
    reference = io.BytesIO()
    write_archive(plan, reference)
    diff_ids = [diff_id for _digest, diff_id in layers]
    open_before = len(os.listdir("/proc/self/fd"))

    sent, spans, open_files = bytearray(), 0, []
    async for piece in stream_archive(LeaseBook(store), plan, diff_ids, 700, plan.size - 3, zero_copy=True):
        if isinstance(piece, FileSpan):  # what the server sends with sendfile: read it the same way here
            sent += os.pread(piece.fd, piece.count, piece.offset)
            spans += 1
        else:
            sent += piece
        open_files.append(len(os.listdir("/proc/self/fd")) - open_before)
    assert bytes(sent) == reference.getvalue()[700:plan.size - 3]
    assert spans >= 3, "layer bytes in the page cache go out as file spans"
    assert max(open_files) <= 2, "one layer file open at a time (two where a piece spans the end of one)"
    assert len(os.listdir("/proc/self/fd")) == open_before


@pytest.mark.anyio
async def test_stream_with_a_missing_layer_fails_at_once(store):
    plan, layers, contents = image(store)
    for (digest, diff_id), data in list(zip(layers, contents))[:2]:
        store_layer(store, digest, diff_id, data)  # the last layer is not there
    started = time.monotonic()
    with pytest.raises(ArchiveSourceError):
        await read_all(stream_archive(LeaseBook(store), plan, [d for _g, d in layers], 0, plan.size))
    assert time.monotonic() - started < 2


class Preparation:
    """A preparation the gate watches: its state, and the store it fills."""

    def __init__(self, store: Store, plan, layers):
        self.store, self.plan, self.layers = store, plan, layers
        self.state = JobState("running")
        self.looks = 0

    async def job_state(self) -> JobState:
        self.looks += 1
        return self.state

    def image_ready(self) -> bool:
        return all(self.store.layer_path(diff_id).exists() for _digest, diff_id in self.layers)

    def gate(self, timeout: float = 30.0) -> EarlyGate:
        return EarlyGate(EarlyPlan(self.plan, self.layers), self.store, REGISTRY, REPOSITORY, self.job_state,
                         self.image_ready, timeout)


@pytest.mark.anyio
async def test_gate_lets_each_layer_out_only_once_verified_and_the_end_last(store):
    plan, layers, contents = image(store)
    preparation = Preparation(store, plan, layers)
    gate = preparation.gate()
    file_ends = [s.offset + s.length for s in plan.segments if s.path is not None]

    waiting = asyncio.ensure_future(gate(0))
    await asyncio.sleep(0.6)
    assert not waiting.done(), "nothing before the first layer verified"
    store_layer(store, *layers[0], contents[0])
    assert await asyncio.wait_for(waiting, 2) == file_ends[0]
    # A layer stored for another registry's image is not verified for this one: still held back.
    digest, diff_id = layers[1]
    with store.atomic_writer(store.layer_path(diff_id)) as out:
        out.write(contents[1])
    waiting = asyncio.ensure_future(gate(file_ends[0]))
    await asyncio.sleep(0.6)
    assert not waiting.done()
    store.link_layer(digest, diff_id, len(contents[1]), contents[1][-32:])
    store.mark_seen(REGISTRY, REPOSITORY, digest)
    assert await asyncio.wait_for(waiting, 2) == file_ends[1]
    store_layer(store, *layers[2], contents[2])
    assert await gate(file_ends[1]) == file_ends[2]
    assert await gate(file_ends[2]) == plan.size  # the closing files: the whole image is there


@pytest.mark.anyio
@pytest.mark.parametrize("ended", ["done", "gone"])
async def test_gate_cuts_at_once_when_the_preparation_ended_without_the_layer(store, ended):
    """The bug of issue 9: a layer evicted after its preparation ended was waited for until PREPARE_TIMEOUT."""
    plan, layers, contents = image(store)
    preparation = Preparation(store, plan, layers)
    store_layer(store, *layers[0], contents[0])
    preparation.state = JobState(ended)
    started = time.monotonic()
    body = stream_archive(LeaseBook(store), plan, [d for _g, d in layers], 0, plan.size, preparation.gate(timeout=3600))
    with pytest.raises(EarlyStreamAborted, match="ended without layer"):
        await read_all(body)
    assert time.monotonic() - started < 2


@pytest.mark.anyio
async def test_gate_cuts_when_the_preparation_fails_or_takes_too_long(store):
    plan, layers, contents = image(store)
    preparation = Preparation(store, plan, layers)
    preparation.state = JobState("failed", error=InvalidContent("layer sha256:… digest mismatch"))
    with pytest.raises(EarlyStreamAborted, match="digest mismatch"):
        await preparation.gate()(0)
    preparation.state = JobState("running")
    with pytest.raises(EarlyStreamAborted, match="gave up waiting"):
        await preparation.gate(timeout=0.3)(0)
