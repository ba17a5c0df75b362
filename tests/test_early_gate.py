"""api.early_gate with shared.growing_layer: an early-start stream sends each layer's bytes as its writer publishes
them, goes on from a re-run's file when a writer dies, and holds the end back until everything verified — cutting
the stream (EarlyStreamAborted) on a failure, a size other than announced, or bytes that differ."""

from __future__ import annotations

import asyncio
import io
import os
import time

import pytest

from docker_http_passthrough.api.archive_stream import stream_archive
from docker_http_passthrough.api.early_gate import EarlyGate, EarlyStreamAborted
from docker_http_passthrough.api.early_stream import EarlyPlan, PlannedLayer
from docker_http_passthrough.api.lease_book import LeaseBook
from docker_http_passthrough.api.preparation import JobState, PreparationWatch
from docker_http_passthrough.shared.archive import LayerFile, plan_archive
from docker_http_passthrough.shared.archive_reader import FileSpan, write_archive
from docker_http_passthrough.shared.errors import InvalidContent, TimedOut
from docker_http_passthrough.shared.growing_layer import GrowingLayer, growth, record_path
from docker_http_passthrough.shared.jobs import JobSpec
from docker_http_passthrough.shared.store import TEMP_MARK, ImageRecord, PreparedLayer, Store
from tests.test_archive_stream import REGISTRY, REPOSITORY, image, read_all, store_layer

KEY = "k" * 40
SPEC = JobSpec({"api_url": REGISTRY, "name": "reg.example"}, REPOSITORY, "sha256:" + "0" * 64, "anonymous")


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "cache")


class Writer:
    """What fetch_layer does in the store for one layer, a step at a time: a temp file beside the layer, its
    progress published, then linked into place (or left behind by a writer that dies)."""

    def __init__(self, store: Store, digest: str, diff_id: str):
        self.store, self.digest, self.diff_id = store, digest, diff_id
        final = store.layer_path(diff_id)
        self.temp = final.with_name(f"{final.name}{TEMP_MARK}{os.urandom(6).hex()}")
        self.out = open(self.temp, "xb")
        self.growing = GrowingLayer(store, REGISTRY, REPOSITORY, digest, diff_id, self.out)

    def write(self, data: bytes) -> None:
        self.out.write(data)
        self.out.flush()
        self.growing.wrote(self.out.tell())
        self.growing.publish()

    def finish(self) -> None:
        self.out.close()
        os.link(self.temp, self.store.layer_path(self.diff_id))
        self.temp.unlink()
        self.store.link_layer(self.digest, self.diff_id, 100, b"")
        self.store.mark_seen(REGISTRY, REPOSITORY, self.digest)
        self.growing.close()

    def die(self) -> None:
        self.out.close()  # SIGKILL: the temp file and the record stay


class Preparer:
    """A preparer whose runs the test ends: ensure() waits for the last run's outcome."""

    def __init__(self):
        self.runs: list[asyncio.Future] = []
        self.picked_up = True

    async def ensure(self, spec, credentials, token):
        self.runs.append(asyncio.get_running_loop().create_future())
        return await self.runs[-1]

    async def state(self, job_id):
        return JobState("running" if self.picked_up else "queued")


class Early:
    """An image whose layers are not stored yet, its archive as it must come out, and a gate to stream it."""

    def __init__(self, store: Store, sizes=(300_000, 5_000, 200_000), announced=None):
        self.store = store
        self.plan, self.layers, self.contents = image(store, sizes)
        self.announced = list(announced or sizes)
        if announced:  # a wrong guess: the headers announce other sizes than the layers have
            config_digest = "sha256:" + self.plan.config_name.removesuffix(".json")
            files = [LayerFile(d, size, str(store.layer_path(d))) for (_g, d), size in zip(self.layers, announced)]
            self.plan = plan_archive(store.get_blob(config_digest), config_digest, files, self.plan.repo_tag)
        self.preparer = Preparer()

    def expected(self) -> bytes:
        """The archive as a warm download sends it (the layers are stored for it, then removed again)."""
        for (digest, diff_id), data in zip(self.layers, self.contents):
            store_layer(self.store, digest, diff_id, data)
        reference = io.BytesIO()
        write_archive(self.plan, reference)
        for digest, diff_id in self.layers:
            self.store.layer_path(diff_id).unlink()
            (self.store.root / "links" / digest.removeprefix("sha256:")).unlink()
        return reference.getvalue()

    def gate(self, timeout: float = 30.0) -> EarlyGate:
        early = EarlyPlan(self.plan, tuple(PlannedLayer(d, i, s) for (d, i), s in zip(self.layers, self.announced)))
        watch = PreparationWatch(self.preparer, SPEC, None, None, pick_up=1.0)
        return EarlyGate(early, self.store, REGISTRY, REPOSITORY, KEY, watch, timeout)

    def stream(self, zero_copy: bool = False, **kwargs):
        return stream_archive(LeaseBook(self.store), self.plan, [d for _g, d in self.layers], 0, self.plan.size,
                              self.gate(**kwargs), zero_copy)

    def prepared(self) -> None:
        """The preparation's last act: the image record (its layers must be in place)."""
        config_digest = "sha256:" + self.plan.config_name.removesuffix(".json")
        record = ImageRecord(REGISTRY, REPOSITORY, SPEC.manifest_digest, config_digest,
                             tuple(PreparedLayer(i, len(c), d) for (d, i), c in zip(self.layers, self.contents)))
        self.store.put_image(KEY, record)
        self.preparer.runs[-1].set_result(record)


async def received_so_far(task: asyncio.Task, sink: bytearray, size: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while len(sink) < size:
        assert not task.done(), task.exception() if task.done() else None
        assert time.monotonic() < deadline, f"only {len(sink)} of {size} bytes came"
        await asyncio.sleep(0.02)


async def collect(stream, sink: bytearray) -> None:
    async for piece in stream:
        # A zero-copy stream's file spans, read as sendfile would send them: the file must hold those bytes now.
        sink += os.pread(piece.fd, piece.count, piece.offset) if isinstance(piece, FileSpan) else piece


def first_layer_start(early: Early) -> int:
    return next(s.offset for s in early.plan.segments if s.path is not None)


@pytest.mark.anyio
@pytest.mark.parametrize("zero_copy", [False, True])
async def test_a_layer_streams_as_it_is_written_and_the_end_waits_for_the_image(store, zero_copy):
    early = Early(store)
    expected = early.expected()
    sink = bytearray()
    task = asyncio.ensure_future(collect(early.stream(zero_copy), sink))
    start = first_layer_start(early)
    await received_so_far(task, sink, start)  # the headers before the first layer go at once
    await asyncio.sleep(0.3)
    assert len(sink) == start, "no layer bytes before any are written"

    writers = [Writer(store, digest, diff_id) for digest, diff_id in early.layers]
    writers[0].write(early.contents[0][:100_000])
    await received_so_far(task, sink, start + 100_000)
    assert bytes(sink) == expected[:start + 100_000]
    writers[0].write(early.contents[0][100_000:])
    for writer, data in zip(writers[1:], early.contents[1:]):
        writer.write(data)
    for writer in writers:
        writer.finish()
    tail = len(expected) - len(early.plan.segments[-1].data)
    await received_so_far(task, sink, tail)
    await asyncio.sleep(0.3)
    assert len(sink) == tail, "manifest.json and repositories wait for the image to verify"
    assert not list((store.root / "inflating").iterdir()), "finished writers leave no record"
    early.prepared()
    await asyncio.wait_for(task, 5)
    assert bytes(sink) == expected


@pytest.mark.anyio
@pytest.mark.parametrize("same_bytes", [True, False])
async def test_a_dead_writers_stream_goes_on_from_the_rerun_and_checks_what_it_read(store, same_bytes):
    early = Early(store, sizes=(400_000,))
    (digest, diff_id), data = early.layers[0], early.contents[0]
    expected = early.expected()
    sink = bytearray()
    task = asyncio.ensure_future(collect(early.stream(), sink))
    start = first_layer_start(early)

    dead = Writer(store, digest, diff_id)
    dead.write(data[:150_000] if same_bytes else bytes(150_000))  # a writer that got bad bytes, then died
    await received_so_far(task, sink, start + 150_000)
    dead.die()
    await asyncio.sleep(0.3)
    assert len(sink) == start + 150_000

    rerun = Writer(store, digest, diff_id)
    rerun.write(data[:100_000])
    assert growth(store, REGISTRY, REPOSITORY, digest, diff_id).written == 100_000  # the re-run's record now
    await asyncio.sleep(0.3)
    assert len(sink) == start + 150_000, "the stream goes on from where it was, not before"
    rerun.write(data[100_000:])
    rerun.finish()
    early.prepared()
    if same_bytes:
        await asyncio.wait_for(task, 5)
        assert bytes(sink) == expected
    else:
        with pytest.raises(EarlyStreamAborted, match="differ"):
            await asyncio.wait_for(task, 5)
        assert b"manifest.json" not in sink


@pytest.mark.anyio
async def test_a_layer_longer_or_shorter_than_announced_cuts_the_stream(store):
    too_small = Early(store, sizes=(300_000,), announced=(299_520,))  # e.g. ISIZE of a last gzip member only
    Writer(store, *too_small.layers[0]).write(too_small.contents[0])
    with pytest.raises(EarlyStreamAborted, match="longer than the 299520 bytes announced"):
        await asyncio.wait_for(read_all(too_small.stream()), 5)

    too_big = Early(store, sizes=(300_000,), announced=(300_512,))
    writer = Writer(store, *too_big.layers[0])
    writer.write(too_big.contents[0])
    writer.finish()
    with pytest.raises(EarlyStreamAborted, match="not the 300512 announced"):
        await asyncio.wait_for(read_all(too_big.stream()), 5)


@pytest.mark.anyio
async def test_the_stream_is_cut_when_the_preparation_fails_and_goes_on_when_its_worker_died(store):
    early = Early(store, sizes=(100_000,))
    (digest, diff_id), data = early.layers[0], early.contents[0]
    sink = bytearray()
    task = asyncio.ensure_future(collect(early.stream(), sink))
    await asyncio.sleep(0.2)
    early.preparer.runs[-1].set_exception(TimedOut("no heartbeat", code="worker_lost"))
    await asyncio.sleep(0.3)
    assert not task.done() and len(early.preparer.runs) == 2, "a preparation whose worker died is started again"
    writer = Writer(store, digest, diff_id)
    writer.write(data[:50_000])
    await received_so_far(task, sink, first_layer_start(early) + 50_000)
    early.preparer.runs[-1].set_exception(InvalidContent("layer does not match its digest"))
    with pytest.raises(EarlyStreamAborted, match="does not match its digest"):
        await asyncio.wait_for(task, 5)

    # A restarted preparation no worker takes up is given up after WORKER_LOST_TIMEOUT (pick_up).
    task = asyncio.ensure_future(read_all(early.stream()))
    await asyncio.sleep(0.2)
    early.preparer.picked_up = False
    early.preparer.runs[-1].set_exception(TimedOut("no heartbeat", code="worker_lost"))
    started = time.monotonic()
    with pytest.raises(EarlyStreamAborted, match="no worker took it up"):
        await asyncio.wait_for(task, 5)
    assert 1.0 <= time.monotonic() - started < 2


@pytest.mark.anyio
async def test_the_stream_is_cut_at_once_when_the_preparation_ended_without_the_layer(store):
    early = Early(store)
    store_layer(store, *early.layers[0], early.contents[0])
    gate = early.gate(timeout=3600)
    body = stream_archive(LeaseBook(store), early.plan, [d for _g, d in early.layers], 0, early.plan.size, gate)
    await asyncio.sleep(0)
    early.preparer.runs[-1].set_result("done")  # yet the second layer is not there (evicted, say)
    started = time.monotonic()
    with pytest.raises(EarlyStreamAborted, match="ended without layer"):
        await read_all(body)
    assert time.monotonic() - started < 2
    with pytest.raises(EarlyStreamAborted, match="gave up waiting"):
        await read_all(early.stream(timeout=0.3))


def test_a_writer_removes_only_its_own_record_and_never_publishes_after_closing(store):
    digest, diff_id = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    first, second = Writer(store, digest, diff_id), Writer(store, digest, diff_id)
    first.write(b"x" * 1000)
    second.write(b"y" * 10)  # a re-run took over the record
    first.growing.close()
    assert growth(store, REGISTRY, REPOSITORY, digest, diff_id).written == 10
    second.growing.close()
    assert not record_path(store, REGISTRY, REPOSITORY, digest).exists()
    second.write(b"y")  # a publish racing the close
    assert growth(store, REGISTRY, REPOSITORY, digest, diff_id) is None
    # Another registry's reader does not see this writer: bytes go only to streams of the same registry.
    third = Writer(store, digest, diff_id)
    third.write(b"z" * 10)
    assert growth(store, "https://other.example", REPOSITORY, digest, diff_id) is None
    assert growth(store, REGISTRY, REPOSITORY, digest, "sha256:" + "c" * 64) is None
