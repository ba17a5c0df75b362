"""Cold downloads that stream from the first second (issue 12 item 4), against a registry throttled by the
CountingProxy: headers as soon as the exact length is known, each layer's bytes as they are inflated, no long
pause, the end only after everything verified — and a cut connection, never a wrong archive, when something
fails; a stream whose worker is SIGKILLed goes on from the re-run (issue 10 item 1); multi-member gzip layers
(issue 12 item 3); many layers (issue 10 item 9). The strict figures are the benchmark's (`python -m bench`)."""

from __future__ import annotations

import gzip
import os

import pytest
import redis
from rq import Worker

from docker_http_passthrough.shared.settings import Settings
from tests.support.downloads import archive_manifest, get, image_url, tar_members
from tests.support.faults import BackgroundStream, wait_until
from tests.support.images import Layer, busybox_layer, make_layer, sha
from tests.support.testdata import MULTI_MEMBER_DIFF_ID, MULTI_MEMBER_LAYER

pytestmark = pytest.mark.e2e


def random_layer(name: str, size: int) -> Layer:
    return make_layer({f"{name}.bin": os.urandom(size)})  # random: gzip keeps its size


def layer_tars(body: bytes) -> list[bytes]:
    return [m for n, m in tar_members(body).items() if n.endswith("/layer.tar")]


def block_gzip(layer: Layer, block: int = 65_536) -> Layer:
    """The same tar as block-gzip tools (bgzip) compress it: a member per `block` bytes, an empty one last."""
    members = [gzip.compress(layer.tar[i:i + block], mtime=0) for i in range(0, len(layer.tar), block)]
    blob = b"".join(members) + gzip.compress(b"", mtime=0)
    return Layer(layer.tar, blob, layer.diff_id, sha(blob))


def streamed(url: str, timeout: float = 60) -> BackgroundStream:
    download = BackgroundStream(url, timeout=timeout)
    download.join(timeout + 10)
    return download


def test_a_cold_download_starts_at_once_and_never_pauses_long(mode, stack, registry, unique_repo):
    layers = [random_layer("first", 2_000_000), random_layer("second", 1_000_000)]
    registry.push_image(unique_repo, "v1", layers)
    running = stack(mode)  # the default PREPARE_GRACE
    registry.proxy.throttle_bytes_per_second = 500_000  # ~4 s for the first layer, each on its own connection

    download = streamed(image_url(running.url, registry.host, unique_repo, "v1"))
    assert download.error is None and download.status == 200, (download.status, download.error)
    took = download.ended_at - download.started_at
    assert int(download.headers["content-length"]) == len(download.body)
    assert layer_tars(bytes(download.body)) == [layer.tar for layer in layers]
    assert took > 3, f"{took:.1f}s: the registry was not throttled"
    # Generous bounds (a shared CI machine); the benchmark holds the strict ones (2 s, 5 s).
    assert download.headers_at - download.started_at < 2.5, "headers wait for the sizes only"
    assert download.largest_gap < 2, f"a {download.largest_gap:.1f}s pause: bytes must flow as layers inflate"
    registry.proxy.reset()
    assert get(image_url(running.url, registry.host, unique_repo, "v1")).body == download.body  # = warm bytes


def test_a_corrupt_last_layer_cuts_the_stream_before_manifest_json(stack, registry, unique_repo, docker_engine,
                                                                  tmp_path):
    layers = [busybox_layer(), random_layer("bad", 1_500_000)]
    registry.push_image(unique_repo, "v1", layers, cmd=["/bin/busybox", "true"])
    running = stack("two-tier")
    registry.proxy.throttle_bytes_per_second = 1_000_000
    registry.proxy.corrupt_path_contains = layers[-1].digest  # one byte flipped mid-blob: its digest check fails

    download = streamed(image_url(running.url, registry.host, unique_repo, "v1"))
    assert download.status == 200 and download.error is not None, "the connection must break"
    assert len(download.body) < int(download.headers["content-length"])
    assert len(download.body) > len(layers[0].tar), "bytes flowed before the failure"
    assert b"manifest.json" not in download.body and b"repositories" not in download.body
    received = tmp_path / "received.tar"
    received.write_bytes(download.body)
    rejected = docker_engine.run("load", "-i", str(received), check=False)
    assert rejected.returncode != 0, rejected.stdout


def test_a_stream_survives_its_worker_being_killed(stack, registry, unique_repo):
    """Issue 10 item 1, the stream's side: the job runs again on the other worker and the stream goes on from
    the re-run's file at the offset it had reached; the client gets every byte right."""
    layers = [random_layer("one", 1_000_000), random_layer("two", 2_500_000)]
    registry.push_image(unique_repo, "v1", layers)
    # A short WORKER_LOST_TIMEOUT makes the death noticed fast (the heartbeat key expires after it).
    running = stack("two-tier", workers=2, env={"WORKER_LOST_TIMEOUT": "2"})
    registry.proxy.throttle_bytes_per_second = 400_000
    download = BackgroundStream(image_url(running.url, registry.host, unique_repo, "v1"), timeout=90)
    assert wait_until(lambda: download.received > len(layers[0].tar) + 200_000 or download.done(), 30)

    connection = redis.Redis.from_url(running.redis.url)
    busy = [w.pid for w in Worker.all(connection=connection) if w.get_current_job_id()]
    connection.close()
    assert len(busy) == 1, busy
    victim = next(worker for worker in running.workers if worker.pid == busy[0])
    received_at_kill = download.received
    victim.kill()
    registry.proxy.throttle_bytes_per_second = 2_000_000

    download.join(90)
    assert download.error is None, f"{download.error!r} after {download.received} bytes\n{running.logs()[-3000:]}"
    assert download.received == int(download.headers["content-length"]) > received_at_kill
    assert layer_tars(bytes(download.body)) == [layer.tar for layer in layers]
    assert "running it again" in running.logs()  # the lost job ran again on the other worker
    assert not list((running.cache_dir / "inflating").iterdir()), "no progress record is left behind"


def test_multi_member_gzip_images_stream_with_the_length_they_deliver_and_run(mode, stack, registry, unique_repo,
                                                                              docker_engine, tmp_path):
    bgzip = MULTI_MEMBER_LAYER.read_bytes()  # htslib's bgzip, small: the probe reads it whole and counts it
    testdata = Layer(gzip.decompress(bgzip), bgzip, MULTI_MEMBER_DIFF_ID, sha(bgzip))
    message = f"multi-member in {mode}"
    # Larger than the probe's window: the size is known once the preparation unpacked it.
    big = block_gzip(make_layer({"app/message.txt": message.encode() + b"\n", "app/pad.bin": os.urandom(300_000)}))
    layers = [busybox_layer(), testdata, big]
    registry.push_image(unique_repo, "v1", layers, cmd=["/bin/busybox", "cat", "/app/message.txt"])
    running = stack(mode)
    registry.proxy.throttle_bytes_per_second = 400_000

    download = streamed(image_url(running.url, registry.host, unique_repo, "v1"))
    assert download.error is None and download.status == 200, (download.status, download.error)
    assert int(download.headers["content-length"]) == len(download.body)
    assert layer_tars(bytes(download.body)) == [layer.tar for layer in layers]
    assert "size unknown until it is unpacked (several gzip members)" in running.logs()
    archive = tmp_path / "multi.tar"
    archive.write_bytes(download.body)
    repo_tag = archive_manifest(bytes(download.body))[0]["RepoTags"][0]
    assert f"Loaded image: {repo_tag}" in docker_engine.load(archive)
    try:
        assert docker_engine.run("run", "--rm", "--network", "none", repo_tag).stdout.strip() == message
    finally:
        docker_engine.run("rmi", "-f", repo_tag, check=False)


def test_a_wrong_size_guess_cuts_the_stream_and_the_next_download_is_right(stack, registry, unique_repo):
    """Two gzip members, each longer than the probe's window, the last inflating to more than the whole blob:
    indistinguishable from one member by the tail. The guess is wrong; the stream is cut before its end."""
    random_part, text_part = os.urandom(150_000), os.urandom(200_000).hex().encode()
    layer = make_layer({"a.bin": random_part, "b.txt": text_part})
    split = layer.tar.index(text_part) - 512  # at the second file's header
    blob = gzip.compress(layer.tar[:split], mtime=0) + gzip.compress(layer.tar[split:], mtime=0)
    tricky = Layer(layer.tar, blob, layer.diff_id, sha(blob))
    registry.push_image(unique_repo, "v1", [tricky])
    running = stack("embedded")
    registry.proxy.throttle_bytes_per_second = 300_000

    first = streamed(image_url(running.url, registry.host, unique_repo, "v1"))
    assert first.status == 200 and first.error is not None
    assert int(first.headers["content-length"]) < len(layer.tar), "the guess: the last member's size"
    assert b"manifest.json" not in first.body
    assert "announced" in running.logs()  # "longer than the … announced" or "… bytes, not the … announced"
    assert wait_until(lambda: list((running.cache_dir / "images").iterdir()), 30)
    second = get(image_url(running.url, registry.host, unique_repo, "v1"))
    assert int(second.headers["content-length"]) == len(second.body)
    assert layer_tars(second.body) == [layer.tar]


def test_headers_come_within_the_grace_for_an_image_of_many_layers(stack, registry, unique_repo):
    """Issue 10 item 9: the sizes of as many layers as IMAGE_MAX_LAYERS allows (128) are probed concurrently, not
    one after another."""
    layers = [make_layer({f"l{i}.txt": os.urandom(64)}) for i in range(Settings().image_max_layers)]
    registry.push_image(unique_repo, "v1", layers)
    grace = 5.0  # headers come as soon as the sizes are known; the grace only bounds the wait
    running = stack("embedded", env={"PREPARE_GRACE": f"{grace:g}"})
    registry.proxy.delay_seconds_before_headers = 0.1  # per request: 128 probes in a row would take 12.8 s

    download = streamed(image_url(running.url, registry.host, unique_repo, "v1"))
    assert download.error is None and download.status == 200, (download.status, download.error)
    assert download.headers_at - download.started_at < grace + 2
    assert len(archive_manifest(bytes(download.body))[0]["Layers"]) == len(layers)
    assert layer_tars(bytes(download.body)) == [layer.tar for layer in layers]
