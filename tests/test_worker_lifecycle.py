"""The worker as a container runs it: its health check asks RQ, and SIGTERM (what Kubernetes and Docker send on
stop) finishes the running job before the worker exits; a second SIGTERM stops the job and says so.

RQ 3's SimpleWorker (rq/worker/base.py, request_stop / request_force_stop): the first SIGINT or SIGTERM while
busy sets _stop_requested and lets the job run to its end, then the work loop exits (warm shutdown); when idle
it exits at once. A second signal (more than a second later) raises SystemExit in the job: cold shutdown.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.support.downloads import image_url, tar_members
from tests.support.faults import BackgroundGet, assert_json_error, run_cli, wait_until
from tests.support.images import make_layer
from tests.support.services import REPO_ROOT, child_env, tail

pytestmark = pytest.mark.e2e


def worker_env(redis_server, tmp_path: Path) -> dict[str, str]:
    return {"REDIS_URL": redis_server.url, "CACHE_DIR": str(tmp_path / "cache"), "WORKER_METRICS_PORT": "0"}


@pytest.fixture
def named_worker(redis_server, tmp_path):
    """`worker --name-file PATH`, as the worker image starts it; yields (process, name file)."""
    name_file = tmp_path / "worker-name"
    log_path = tmp_path / "worker.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "docker_http_passthrough", "worker", "--name-file",
                                 str(name_file)], cwd=REPO_ROOT, env=child_env(worker_env(redis_server, tmp_path)),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        client = redis_server.client()
        assert wait_until(lambda: name_file.exists() and client.scard("rq:workers") == 1, timeout=20), \
            tail(log_path)
        yield proc, name_file
    finally:
        if proc.poll() is None:
            proc.kill()  # our own child, by its handle
        proc.wait(10)


def health(redis_server, tmp_path: Path, *args: str):
    return run_cli(["worker-health", *args], worker_env(redis_server, tmp_path), timeout=20)


def test_worker_health_asks_rq_for_this_worker(redis_server, tmp_path, named_worker):
    proc, name_file = named_worker
    name = name_file.read_text().strip()
    assert redis_server.client().sismember("rq:workers", f"rq:worker:{name}")

    by_file = health(redis_server, tmp_path, "--name-file", str(name_file))
    assert by_file.returncode == 0 and name in by_file.stdout, by_file
    by_host = health(redis_server, tmp_path)  # no name: any worker registered from this host
    assert by_host.returncode == 0, by_host
    unknown = health(redis_server, tmp_path, "--name", "someone-else")
    assert unknown.returncode == 1 and "no worker named someone-else" in unknown.stderr

    # An idle worker beats every WORKER_TTL - 15 s: with a 1 s bound its heartbeat is soon too old.
    time.sleep(1.5)
    stale = health(redis_server, tmp_path, "--name-file", str(name_file), "--max-age", "1")
    assert stale.returncode == 1 and "last heartbeat" in stale.stderr, stale

    proc.send_signal(signal.SIGTERM)  # idle: RQ exits at once and unregisters
    assert proc.wait(15) == 0
    gone = health(redis_server, tmp_path, "--name-file", str(name_file))
    assert gone.returncode == 1 and "no worker" in gone.stderr, gone


def test_worker_health_before_start_and_without_redis(redis_server, tmp_path):
    missing = health(redis_server, tmp_path, "--name-file", str(tmp_path / "nothing-yet"))
    assert missing.returncode == 1 and "does not exist yet" in missing.stderr
    down = run_cli(["worker-health"], {"REDIS_URL": "redis://127.0.0.1:1/0"}, timeout=20)
    assert down.returncode == 1 and "unreachable" in down.stderr, down


def slow_image(registry, unique_repo):
    layer = make_layer({"big.bin": os.urandom(2_000_000)})  # random: stays ~2 MB gzipped
    registry.push_image(unique_repo, "v1", [layer])
    registry.proxy.reset()
    registry.proxy.throttle_bytes_per_second = 400_000  # ~5 s for the layer
    return image_url("", registry.host, unique_repo, "v1"), layer


def wait_for_running_job(running, registry, layer) -> str:
    client = redis.Redis.from_url(running.redis.url)
    assert wait_until(lambda: client.keys("dhp:heartbeat:*"), timeout=20), "the job never started"
    assert wait_until(lambda: registry.proxy.count("GET", kind="blob", path_contains=layer.digest), timeout=20)
    return client.keys("dhp:heartbeat:*")[0].decode().removeprefix("dhp:heartbeat:")


def test_sigterm_mid_job_finishes_the_job_then_the_worker_exits(stack, registry, unique_repo, tmp_path):
    path, layer = slow_image(registry, unique_repo)
    running = stack("two-tier", workers=1, env={"PREPARE_GRACE": "0"})
    worker = running.workers[0]
    pending = BackgroundGet(running.url + path, timeout=90)
    wait_for_running_job(running, registry, layer)

    # Busy with a long job: RQ's own heartbeat is not refreshed, the job's is, so the check says alive.
    busy = run_cli(["worker-health", "--max-age", "1"], running.worker_env(), timeout=20)
    assert busy.returncode == 0 and "busy" in busy.stdout, busy

    os.kill(worker.pid, signal.SIGTERM)
    result = pending.join(timeout=60)
    assert result.status == 200, result.body[:300]
    assert [m for n, m in tar_members(result.body).items() if n.endswith("layer.tar")] == [layer.tar]
    assert wait_until(lambda: not worker.alive(), timeout=20), "the worker did not exit after its job"
    assert worker.proc.wait(5) == 0
    assert "prepared" in worker.log_text()
    registry.proxy.reset()


def test_second_sigterm_stops_the_job_and_the_waiting_download_is_told(stack, registry, unique_repo):
    path, layer = slow_image(registry, unique_repo)
    running = stack("two-tier", workers=1, env={"PREPARE_GRACE": "0"})
    worker = running.workers[0]
    pending = BackgroundGet(running.url + path, timeout=90)
    wait_for_running_job(running, registry, layer)

    os.kill(worker.pid, signal.SIGTERM)
    time.sleep(1.5)  # RQ ignores a repeat within one second (a pool's duplicate signal)
    os.kill(worker.pid, signal.SIGTERM)
    started = time.monotonic()
    result = pending.join(timeout=30)
    assert time.monotonic() - started < 10  # told at once, not after WORKER_LOST_TIMEOUT
    assert_json_error(result, 503, error="worker_stopped", words=("stopped",))
    assert wait_until(lambda: not worker.alive(), timeout=20)

    registry.proxy.throttle_bytes_per_second = None
    running.add_worker()
    again = BackgroundGet(running.url + path, timeout=60).join(timeout=60)
    assert again.status == 200, again.body[:300]
    registry.proxy.reset()
