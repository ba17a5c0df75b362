"""HTTP-level fuzzing against a running server (embedded mode, real registry): random and mutated requests of
every kind, DHP_FUZZ_REQUESTS of them (default 300; scripts/faults.py runs thousands), from DHP_FUZZ_SEED.

No 5xx but the documented 502/503/504, every error JSON, no redirect, no hang; /health answers all along; the
server's memory stays bounded.
"""

from __future__ import annotations

import os
import threading
import time

import httpx
import pytest

from tests.support.faults import closed_port
from tests.support.fuzz import FuzzTarget, run_fuzz
from tests.support.images import make_layer
from tests.support.rawhttp import memory_kib

pytestmark = pytest.mark.e2e

FUZZ_REQUESTS = int(os.environ.get("DHP_FUZZ_REQUESTS", "300"))
FUZZ_SEED = int(os.environ.get("DHP_FUZZ_SEED", "20261130"))
# Peak resident memory of the API after the run; it idles at ~70 MiB.
MEMORY_BOUND_MIB = 300


class HealthWatch:
    """/health every 0.2 s in a thread: the slowest answer and any failure."""

    def __init__(self, url: str):
        self.url, self.slowest, self.failures, self.checks = url, 0.0, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=10, trust_env=False) as client:
            while not self._stop.wait(0.2):
                started = time.monotonic()
                try:
                    status = client.get(self.url).status_code
                    if status != 200:
                        self.failures.append(status)
                except httpx.HTTPError as exc:
                    self.failures.append(type(exc).__name__)
                self.slowest = max(self.slowest, time.monotonic() - started)
                self.checks += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


def test_fuzzed_requests_get_clean_answers_and_the_server_stays_healthy(stack, registry, unique_repo):
    registry.push_image(unique_repo, "v1", [make_layer({"f.txt": b"fuzz target"})])
    running = stack("embedded", env={"REGISTRY_URL": registry.url, "HEADER_TIMEOUT": "1", "CREDENTIALS_KEY": "k"})
    target = FuzzTarget(address=("127.0.0.1", running.server.port),
                        good_filename=unique_repo.replace("/", "__") + "_v1.tar",
                        registry_host=registry.host, closed_host=f"127.0.0.1:{closed_port()}")
    watch = HealthWatch(f"{running.url}/health")
    try:
        report = run_fuzz(target, FUZZ_REQUESTS, FUZZ_SEED)
    finally:
        watch.stop()
    resident, peak = memory_kib(running.server.pid)

    print(f"fuzz: {report.requests} requests in {report.seconds:.1f}s, statuses {dict(report.statuses)}, "
          f"peak {peak // 1024} MiB, slowest /health {watch.slowest:.2f}s")
    assert report.findings == [], "\n".join(report.findings[:30])
    answered = sum(n for status, n in report.statuses.items() if isinstance(status, int))
    assert answered >= 0.8 * report.requests, report.statuses  # closing on everyone would pass the rest
    assert report.statuses[200] > 0 and report.statuses[400] > 0, report.statuses  # both kinds were exercised
    assert watch.failures == [] and watch.checks > 0, watch.failures
    assert watch.slowest < 5, f"/health took {watch.slowest:.1f}s during the fuzz"
    assert httpx.get(f"{running.url}/health", timeout=5).status_code == 200
    assert peak < MEMORY_BOUND_MIB * 1024, f"peak resident memory {peak // 1024} MiB (now {resident // 1024} MiB)"
    # A flood of malformed requests is one warning per 10 s in the log, not one each.
    log = running.logs()
    assert log.count("Invalid HTTP request received.") <= 1 + report.seconds / 10, report.statuses[400]
    assert "No supported WebSocket library" not in log
