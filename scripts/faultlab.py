"""The fault lab: what the scenarios of scripts/faults.py share — a registry behind a counting, throttling proxy,
servers and whole deployments (`Lab.server`, `Lab.stack`), devices that download at once, and the figures every
scenario ends with (leftovers on disk and in Redis, memory, health). A scenario is a function registered with
@fault(name, about) that takes the Lab and returns its Figures (figure name → value, in print order)."""

from __future__ import annotations

import concurrent.futures
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis

from tests.support.faults import stray_files
from tests.support.flood import FdLimitedServer
from tests.support.images import Layer, make_layer
from tests.support.job_faults import leftovers, rq_registered
from tests.support.rawhttp import exchange, memory_kib, request_bytes
from tests.support.registry_fixtures import RegistryUnderTest, launch_registry
from tests.support.service_fixtures import Stack, start_stack
from tests.support.services import ServerProcess

Figures = dict[str, str]


@dataclass(frozen=True)
class Fault:
    name: str
    about: str
    run: Callable[["Lab"], Figures]


FAULTS: dict[str, Fault] = {}


def fault(name: str, about: str) -> Callable[[Callable[["Lab"], Figures]], Callable[["Lab"], Figures]]:
    def register(run: Callable[[Lab], Figures]) -> Callable[[Lab], Figures]:
        FAULTS[name] = Fault(name, about, run)
        return run
    return register


# --------------------------------------------------------------------------- the lab


class Lab:
    """What scenarios share: a work directory, one registry, servers and deployments (stopped when the run ends)."""

    def __init__(self, workdir: Path, fuzz_requests: int = 0, seed: int = 0):
        self.workdir = workdir
        self.fuzz_requests = fuzz_requests
        self.seed = seed
        self.registry: RegistryUnderTest = launch_registry(workdir / "registry")
        self.servers: list[ServerProcess] = []
        self.stacks: list[Stack] = []
        self._images = 0

    def image(self, size: int) -> str:
        """Push an image with one incompressible layer of ``size`` bytes; returns its download filename."""
        return self.image_layers(size, small_layers=0)[0]

    def image_layers(self, size: int, small_layers: int = 2) -> tuple[str, list[Layer]]:
        """Push an image: ``small_layers`` tiny layers, then one incompressible layer of ``size`` bytes; returns
        its download filename and layers."""
        self._images += 1
        repository, tag = f"faults/image{self._images}", "v1"
        layers = [make_layer({f"small{i}.txt": os.urandom(512)}) for i in range(small_layers)]
        layers.append(make_layer({"payload.bin": os.urandom(size)}))
        self.registry.push_image(repository, tag, layers)
        return f"{repository.replace('/', '__')}_{tag}.tar", layers

    def server(self, env: dict[str, str], nofile: tuple[int, int] | None = None) -> ServerProcess:
        index = len(self.servers)
        env = {"REGISTRY_URL": self.registry.url, "CACHE_DIR": str(self.workdir / f"cache{index}"), **env}
        log = self.workdir / f"server{index}.log"
        server = FdLimitedServer(env, log, nofile) if nofile else ServerProcess(env, log)
        self.servers.append(server)
        return server

    def stack(self, mode: str, *, workers: int = 2, env: dict[str, str] | None = None,
              cache_dir: Path | None = None) -> Stack:
        """A deployment (the server; Redis and RQ workers in two-tier mode) pulling from the lab's registry."""
        base = self.workdir / f"stack{len(self.stacks)}"
        env = {"REGISTRY_URL": self.registry.url, "WORKER_METRICS_PORT": "0", **(env or {})}
        stack = start_stack(mode, base, cache_dir or base / "cache", workers=workers, env=env)
        self.stacks.append(stack)
        return stack

    def close(self) -> None:
        for stack in self.stacks:
            stack.stop()
        for server in self.servers:
            server.stop()
        self.registry.stop()


# --------------------------------------------------------------------------- devices


def devices(server: ServerProcess, filename: str, count: int) -> list[float]:
    """``count`` devices download ``filename`` at once; seconds each took (a short or failed copy raises)."""
    results = copies(server, filename, count)
    failed = [copy for copy in results if not copy.complete]
    if failed:
        raise RuntimeError(f"device download failed: {failed[0].status}")
    return [copy.seconds for copy in results]


@dataclass
class Copy:
    seconds: float
    status: int | None  # None: the connection broke before an answer
    complete: bool  # 200 and every byte of Content-Length


def copies(server: ServerProcess, filename: str, count: int) -> list[Copy]:
    """``count`` devices download ``filename`` at once; how each copy went (failures included)."""
    def one(_: int) -> Copy:
        started = time.monotonic()
        status, complete = None, False
        try:
            with httpx.Client(timeout=600, trust_env=False) as client, \
                    client.stream("GET", f"{server.url}/docker/{filename}") as response:
                status = response.status_code
                received = sum(len(chunk) for chunk in response.iter_raw())
                complete = status == 200 and received == int(response.headers["content-length"])
        except httpx.HTTPError:
            pass
        return Copy(time.monotonic() - started, status, complete)

    with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(one, range(count)))


def in_background(action: Callable[[], list[Copy]]) -> Callable[[], list[Copy]]:
    """Start ``action`` on a thread; the returned call waits for its result."""
    result: list[list[Copy]] = []
    thread = threading.Thread(target=lambda: result.append(action()), daemon=True)
    thread.start()

    def join() -> list[Copy]:
        thread.join()
        return result[0]
    return join


def spread(times: list[float]) -> str:
    return f"median {statistics.median(times):.2f} s, max {max(times):.2f} s"


def copies_spread(results: list[Copy]) -> str:
    failed = [copy.status for copy in results if not copy.complete]
    return spread([copy.seconds for copy in results]) + (f", {len(failed)} failed ({failed})" if failed
                                                         else ", all complete")


def extra_seconds(baseline: list[Copy], faulty: list[Copy]) -> str:
    return f"{max(c.seconds for c in faulty) - max(c.seconds for c in baseline):+.2f} s (slowest device)"


def wait_for(predicate: Callable[[], object], timeout: float) -> float | None:
    """Seconds until ``predicate()`` held, or None."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.05)
    return None


# --------------------------------------------------------------------------- figures


def upstream_bytes(server: ServerProcess) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10, trust_env=False).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("dhp_upstream_bytes_total"))


def health_seconds(server: ServerProcess) -> tuple[int | None, float]:
    started = time.monotonic()
    result = exchange(("127.0.0.1", server.port), request_bytes("GET", "/health"), timeout=30)
    return result.status, time.monotonic() - started


def memory(pid: int) -> str:
    resident, peak = memory_kib(pid)
    return f"{resident // 1024} MiB / {peak // 1024} MiB"


def _server_figures(server: ServerProcess, figures: Figures) -> Figures:
    status, seconds = health_seconds(server)
    figures["server memory now / peak"] = memory(server.pid)
    figures["/health after"] = f"{status} in {seconds * 1000:.0f} ms"
    return figures


def after_run(server: ServerProcess, figures: Figures) -> Figures:
    """The figures every single-server scenario ends with."""
    strays = stray_files(Path(server.env["CACHE_DIR"]))
    _server_figures(server, figures)
    figures["left on disk"] = "none" if not strays else f"{len(strays)} temporary files: {', '.join(strays[:3])}"
    figures["left in Redis"] = "n/a (embedded mode)" if "REDIS_URL" not in server.env else "see scenario"
    return figures


def after_stack(stack: Stack, figures: Figures, watch: redis.Redis | None = None, settle: float = 10.0) -> Figures:
    """The figures every deployment scenario ends with: leftovers (temp and lease files, per-job Redis keys)
    after up to ``settle`` seconds of cleaning up, workers registered and beating."""
    wait_for(lambda: not leftovers(stack.cache_dir, watch), settle)
    left = leftovers(stack.cache_dir, watch)
    _server_figures(stack.server, figures)
    figures["left on disk and in Redis"] = "nothing" if not left else f"{len(left)}: {', '.join(left[:4])}"
    if watch is not None:
        figures["workers in RQ's registry / beating"] = (f"{len(rq_registered(watch))} / "
                                                         f"{len(watch.smembers('dhp:workers'))}")
    return figures
