"""End to end, `serve --workers N` and zero-copy sends, against real processes over real sockets.

- Two API processes: downloads land on both (each holds layer files open while it sends), /metrics of either
  adds up both, one access line per download, a killed process is replaced, SIGTERM to the parent stops all of
  them and removes the metrics directory, and SIGKILL of the parent takes its children along.
- Embedded mode across processes: a cold image asked from both is prepared once (one GET per blob), and a
  pre-warm started in one is followed through /status from either.
- Zero-copy (sendfile) on a warm archive: slow readers get every byte, Range/If-Range/HEAD/ETag still hold, the
  layers are leased while they are sent, and a layer that turns out short cuts the connection.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.downloads import filename_for, get_many
from tests.support.faults import wait_until
from tests.support.images import make_layer
from tests.support.rawhttp import SlowReader, exchange, request_bytes

pytestmark = pytest.mark.e2e

DOWNLOAD_ROUTE = "/registry/{scheme}/{host}/docker/{filename}"


def _big_layer(seed: int, size: int = 6_000_000):
    return make_layer({f"data{seed}.bin": hashlib.shake_256(bytes([seed])).digest(size)})


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _layer_files_open(pid: int, cache: Path) -> int:
    layers = str(cache / "layers")
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(fd).startswith(layers)
        except OSError:
            pass
    return count


def _started(running, processes: int) -> bool:
    return running.logs().count("Application startup complete") >= processes


def _hold(address: tuple[str, int], path: str) -> socket.socket:
    """A GET whose response is read a little and then not at all: the server stays busy sending it."""
    sock = socket.create_connection(address, timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 10)
    sock.sendall(request_bytes("GET", path))
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    return sock


def _metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def test_two_processes_serve_count_and_stop_together(stack, registry, unique_repo):
    registry.push_image(unique_repo, "v1", [_big_layer(1), _big_layer(2)])
    running = stack("embedded", env={"API_WORKERS": "2", "LOG_FORMAT": "text"})
    server = running.server
    assert wait_until(lambda: len(_children(server.pid)) == 2 and _started(running, 2), timeout=60), running.logs()
    children = _children(server.pid)
    address = ("127.0.0.1", server.port)
    path = f"/registry/http/{registry.host}/docker/{filename_for(unique_repo, 'v1')}"
    reference = exchange(address, request_bytes("GET", path), timeout=60)
    assert reference.status == 200
    downloads = 1

    # Connections spread over both processes: each one is sending (holds layer files) at the same time.
    held = [_hold(address, path) for _ in range(16)]
    downloads += len(held)
    try:
        assert wait_until(lambda: all(_layer_files_open(pid, running.cache_dir) for pid in children), timeout=10), \
            {pid: _layer_files_open(pid, running.cache_dir) for pid in children}
    finally:
        for sock in held:
            sock.close()

    # Slow readers get every byte (zero-copy sends, paced by their reading).
    readers = [SlowReader(address, path, step=128 << 10, pause=0.01) for _ in range(4)]
    downloads += len(readers)
    for reader in readers:
        reader.join(timeout=120)
        assert reader.error is None and reader.digest == hashlib.sha256(reference.body).hexdigest()

    # /metrics of whichever process answers adds up both.
    def counted() -> float:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        return _metric(text, "dhp_http_requests_total", route=DOWNLOAD_ROUTE, method="GET", status="200")

    assert wait_until(lambda: counted() == downloads, timeout=20), counted()
    assert [counted() for _ in range(6)] == [downloads] * 6
    # One access line per download, whichever process served it.
    access = [line for line in running.logs().splitlines()
              if "docker_http_passthrough.access: GET /registry/" in line]
    assert len(access) == downloads, access

    # A process that dies is replaced; the port keeps answering meanwhile.
    os.kill(children[0], signal.SIGKILL)
    assert wait_until(lambda: len(_children(server.pid)) == 2 and children[0] not in _children(server.pid),
                      timeout=30)
    assert all(exchange(address, request_bytes("GET", "/health")).status == 200 for _ in range(8))

    # SIGTERM to the parent stops every process and removes the metrics directory.
    metrics_dir = re.search(r"metrics directory (\S+)", running.logs())
    everyone = [server.pid, *_children(server.pid)]
    os.kill(server.pid, signal.SIGTERM)
    assert wait_until(lambda: not any(_alive(pid) for pid in everyone), timeout=30), running.logs()[-3000:]
    assert server.proc.wait(5) == 0
    assert metrics_dir is not None and not Path(metrics_dir.group(1)).exists()


def test_embedded_preparation_is_shared_by_processes(stack, registry, unique_repo):
    layers = [_big_layer(10 + i, 1_500_000) for i in range(3)]
    image = registry.push_image(unique_repo, "cold", layers)
    registry.push_image(unique_repo, "warmed", [_big_layer(20, 2_000_000)])
    running = stack("embedded", env={"API_WORKERS": "2"})
    server = running.server
    assert wait_until(lambda: len(_children(server.pid)) == 2 and _started(running, 2), timeout=60), running.logs()
    registry.proxy.throttle_bytes_per_second = 1_000_000

    # A pre-warm started in one process, followed from both: never an unknown job.
    url = f"{server.url}/registry/http/{registry.host}/docker/{filename_for(unique_repo, 'warmed')}"
    started = httpx.post(url, timeout=30)
    assert started.status_code == 202, started.text
    states = []
    while not states or states[-1] != "done":
        answer = httpx.get(server.url + started.json()["status_url"], timeout=10)
        assert answer.status_code == 200, answer.text
        states.append(answer.json()["state"])
        assert states[-1] in ("queued", "running", "done"), answer.json()
        assert len(states) < 400
        time.sleep(0.05)
    assert "running" in states

    # A cold image asked from both processes at once: prepared once, each blob fetched once (whole: the early
    # start's ranged size probes, once per process, aside).
    registry.proxy.reset()
    cold = f"{server.url}/registry/http/{registry.host}/docker/{filename_for(unique_repo, 'cold')}"
    results = get_many([cold] * 12)
    assert [r.status for r in results] == [200] * 12
    assert len({hashlib.sha256(r.body).hexdigest() for r in results}) == 1
    for blob in [image.config_digest] + [layer.digest for layer in layers]:
        assert registry.proxy.count("GET", kind="blob", path_contains=blob, status=200) == 1, registry.proxy.requests

    # Killing the parent takes the API processes with it.
    children = _children(server.pid)
    os.kill(server.pid, signal.SIGKILL)
    assert wait_until(lambda: not any(_alive(pid) for pid in children), timeout=20)


def test_zero_copy_ranges_leases_and_a_short_layer(stack, registry, unique_repo):
    registry.push_image(unique_repo, "v1", [_big_layer(30, 8_000_000)])
    running = stack("embedded")
    address = ("127.0.0.1", running.server.port)
    path = f"/registry/http/{registry.host}/docker/{filename_for(unique_repo, 'v1')}"
    whole = exchange(address, request_bytes("GET", path), timeout=60).body
    etag = exchange(address, request_bytes("HEAD", path), head_only=True).headers["etag"]

    head = exchange(address, request_bytes("HEAD", path), head_only=True)
    assert head.status == 200 and head.body == b"" and int(head.headers["content-length"]) == len(whole)
    for start, end in ((0, 99), (3000, 5_000_000), (len(whole) - 700, len(whole) - 1)):
        part = exchange(address, request_bytes("GET", path, {"Range": f"bytes={start}-{end}", "If-Range": etag}),
                        timeout=60)
        assert part.status == 206 and part.body == whole[start:end + 1]
        assert part.headers["content-range"] == f"bytes {start}-{end}/{len(whole)}"

    # While a response is being sent its layer is leased; once it is over, the lease is gone.
    leases = Path(running.cache_dir) / "leases"
    layer = next((Path(running.cache_dir) / "layers" / "sha256").glob("*.tar"))
    held = _hold(address, path)
    try:
        assert wait_until(lambda: any(p.name.startswith(layer.stem) for p in leases.iterdir()), timeout=10)
        # The layer turns out short mid-send (a broken disk, someone truncating the store): cut, never padded.
        os.truncate(layer, 1_000_000)
        held.settimeout(30)
        received = 4096
        while chunk := held.recv(1 << 20):
            received += len(chunk)
    finally:
        held.close()
    assert received < len(whole)
    assert wait_until(lambda: not any(p.name.startswith(layer.stem) for p in leases.iterdir()), timeout=10)
    assert "ended" in running.logs() and "early" in running.logs()
