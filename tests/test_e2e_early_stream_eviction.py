"""An early-start download under a cache small enough to evict: the slow client still gets every byte.

A switch reads at ~1.4 MB/s, so its stream can be far behind the preparation. The layers it has not read yet
must survive the evictions that the end of this preparation, and of other images' preparations, trigger.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support.downloads import archive_manifest, get, image_url, tar_members
from tests.support.images import make_layer

pytestmark = pytest.mark.e2e


class SlowClient(threading.Thread):
    """Starts a download, reads its first bytes, then stops reading until told to go on (a stalled switch).

    A small receive buffer keeps the server from pushing the whole archive into socket buffers meanwhile."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.started = threading.Event()
        self.resume = threading.Event()
        self.status = 0
        self.expected = -1
        self.body = bytearray()
        self.error: BaseException | None = None

    def run(self) -> None:
        transport = httpx.HTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)])
        try:
            with httpx.Client(transport=transport, timeout=20, trust_env=False) as client, \
                    client.stream("GET", self.url) as response:
                self.status = response.status_code
                self.expected = int(response.headers.get("content-length", -1))
                chunks = response.iter_raw(16 << 10)
                self.body += next(chunks)
                self.started.set()
                self.resume.wait(60)
                for chunk in chunks:
                    self.body += chunk
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.started.set()


def _wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_slow_early_start_client_gets_every_byte_while_the_cache_evicts(stack, registry, unique_repo,
                                                                        docker_engine, tmp_path):
    layers = [make_layer({f"l{i}.bin": os.urandom(1_500_000)}) for i in range(5)]
    registry.push_image(unique_repo, "big", layers)
    old, other = (make_layer({f"{name}.bin": os.urandom(500_000)}) for name in ("old", "other"))
    registry.push_image(unique_repo, "old", [old])
    registry.push_image(unique_repo, "other", [other])
    # Room for a small image only: every preparation ends by evicting whatever is not in use.
    running = stack("two-tier", env={"CACHE_MAX_BYTES": "2M", "PREPARE_GRACE": "1", "PREPARE_TIMEOUT": "120"})
    layers_dir = Path(running.cache_dir) / "layers" / "sha256"
    assert get(image_url(running.url, registry.host, unique_repo, "old")).status == 200  # in the store, in use by no one
    registry.proxy.throttle_bytes_per_second = 1_000_000  # ~3 s to prepare: the response starts early
    images = Path(running.cache_dir) / "images"

    slow = SlowClient(image_url(running.url, registry.host, unique_repo, "big"))
    slow.start()
    assert slow.started.wait(30) and slow.error is None, slow.error
    assert slow.status == 200
    _wait_for(lambda: len(list(images.iterdir())) == 2, "the big image to be prepared")

    # A second image prepared meanwhile: its preparation evicts again.
    assert get(image_url(running.url, registry.host, unique_repo, "other")).status == 200

    slow.resume.set()
    slow.join(60)
    assert not slow.is_alive() and slow.error is None, f"{slow.error!r} after {len(slow.body)} bytes"
    assert len(slow.body) == slow.expected
    members = tar_members(bytes(slow.body))
    assert [m for n, m in members.items() if n.endswith("/layer.tar")] == [layer.tar for layer in layers]
    repo_tag = archive_manifest(bytes(slow.body))[0]["RepoTags"][0]
    archive = tmp_path / "big.tar"
    archive.write_bytes(slow.body)
    assert f"Loaded image: {repo_tag}" in docker_engine.load(archive)
    docker_engine.run("rmi", "-f", repo_tag, check=False)
    # The cache did evict meanwhile (what nobody used), only no layer the slow client had yet to read.
    stored = {path.name.removesuffix(".tar") for path in layers_dir.iterdir()}
    assert old.diff_id.removeprefix("sha256:") not in stored and "evicted" in running.logs()
    assert {layer.diff_id.removeprefix("sha256:") for layer in layers} <= stored
