"""The run: its plan (sizes and counts), the parts it starts (each stopped at the end, also on Ctrl-C), and the
phases in order."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import cold, fleet, many, memory, warm
from bench.images import make_image
from bench.processes import Profiler, process_state
from bench.report import Report, say
from tests.support.proxy import CountingProxy
from tests.support.registry import start_registry
from tests.support.services import RedisProcess, ServerProcess, WorkerProcess, start_redis

# One name for the registry in every server, whether it reaches it directly or through a proxy, so that all
# of them put the same image tag into the archive and every download can be compared byte for byte.
REGISTRY_NAME = "registry.bench.invalid:5000"
# In the order they run. The warm ones (warm … thousand) share the server that the cold phase left warm.
PHASES = ("cold", "warm", "slow", "many", "thousand", "zerocopy", "throttled", "fleet")


@dataclass
class Plan:
    big_mib: int
    mid_mib: int
    runs: int  # warm single-client repetitions
    cold_runs: int
    clients: int
    slow_clients: int
    slow_seconds: float
    throttled_mib: int
    fast_clients: int
    fast_runs: int
    thousand: int
    thousand_seconds: float


@dataclass
class TwoTier:
    """A two-tier deployment: the server, 2 RQ workers and their Redis, on one cache."""

    server: ServerProcess
    workers: list[WorkerProcess]
    redis: RedisProcess
    cache: Path

    def stop(self) -> None:
        self.server.stop()
        for worker in self.workers:
            worker.stop()
        self.redis.stop()
        shutil.rmtree(self.cache, ignore_errors=True)


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, report: Report) -> None:
        self.args = args
        self.work = workdir
        self.report = report
        self.cleanups: list[Callable[[], None]] = []
        quick = args.quick
        big = args.size_mib or (128 if quick else 1024)
        self.plan = Plan(
            big_mib=big,
            mid_mib=min(128 if quick else 256, big),
            runs=args.runs or (2 if quick else 5),
            cold_runs=args.cold_runs or (1 if quick else 3),
            clients=args.clients or (20 if quick else 100),
            slow_clients=args.slow_clients or (50 if quick else 200),
            slow_seconds=args.slow_seconds or (10.0 if quick else 60.0),
            throttled_mib=min(128, big) if quick else big,
            fast_clients=args.fast_clients or (20 if quick else 100),
            fast_runs=args.fast_runs or (1 if quick else 3),
            thousand=args.thousand or (200 if quick else 1000),
            thousand_seconds=args.thousand_seconds or (10.0 if quick else 60.0),
        )
        self.phases = set(args.phases)
        self.profiler = Profiler(Path(args.profile).resolve() if args.profile else None)
        # The servers run with the default PREPARE_GRACE (cold GETs stream while their image is prepared) unless
        # --grace sets one. Every client here is 127.0.0.1: the per-address download cap would count a fleet as one.
        self.server_env = {"LOG_LEVEL": "info", "REGISTRY_NAME": REGISTRY_NAME, "MAX_DOWNLOADS_PER_CLIENT": "0"}
        if args.grace is not None:
            self.server_env["PREPARE_GRACE"] = f"{args.grace:g}"
        for item in args.server_env or []:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise SystemExit(f"--server-env wants KEY=VALUE, got {item!r}")
            self.server_env[key] = value

    def on_cleanup(self, fn: Callable[[], None]) -> None:
        self.cleanups.append(fn)

    def cleanup(self) -> None:
        while self.cleanups:
            fn = self.cleanups.pop()
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - keep cleaning
                print(f"# cleanup: {exc!r}", file=sys.stderr)
        self.sweep()

    def sweep(self) -> None:
        """Stop processes we started but hold no handle on (interrupted while they were starting): every one
        names our private temporary directory in its command line or environment (CACHE_DIR, --dir, -p)."""
        needle = str(self.work).encode()

        def ours() -> list[int]:
            found = []
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit() or int(entry.name) == os.getpid() or process_state(int(entry.name)) == "Z":
                    continue
                with contextlib.suppress(OSError):
                    if needle in (entry / "cmdline").read_bytes() or needle in (entry / "environ").read_bytes():
                        found.append(int(entry.name))
            return found

        left = ours()
        if not left:
            return
        say(f"stopping {len(left)} leftover processes: {left}")
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while (left := ours()) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in left:  # re-identified just now, so never a recycled pid
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    # -- parts --------------------------------------------------------------------------------

    def server(self, name: str, env: dict[str, str]) -> tuple[ServerProcess, Path]:
        cache = self.work / f"cache-{name}"
        log = self.work / f"server-{name}.log"
        full = {"CACHE_DIR": str(cache), **self.server_env, **env}
        server = ServerProcess(full, log, workers=None)  # the server's default: one process per CPU
        self.on_cleanup(server.stop)
        return server, cache

    def stop_server(self, server: ServerProcess, cache: Path | None) -> None:
        server.stop()
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)

    def two_tier(self, name: str, registry_url: str) -> TwoTier:
        redis = start_redis(self.work / f"redis-{name}")
        self.on_cleanup(redis.stop)
        cache = self.work / f"cache-{name}"
        env = {"REDIS_URL": redis.url, "CACHE_DIR": str(cache), "REGISTRY_URL": registry_url, **self.server_env}
        workers = []
        for i in range(2):
            worker = WorkerProcess(env, self.work / f"worker-{name}-{i}.log")
            self.on_cleanup(worker.stop)
            workers.append(worker)
        server, _ = self.server(name, env)
        return TwoTier(server, workers, redis, cache)

    def proxy(self, upstream: str) -> CountingProxy:
        proxy = CountingProxy(upstream).start()
        self.on_cleanup(proxy.stop)
        return proxy

    # -- the phases -----------------------------------------------------------------------------

    def run(self) -> None:
        plan = self.plan
        say(f"plan: {plan}")
        registry = start_registry(self.work / "registry")
        self.on_cleanup(registry.stop)
        say(f"registry {registry.url}")
        gen = self.work / "gen"
        gen.mkdir()
        (self.work / "ref").mkdir()
        big = make_image(gen, registry.url, "bench/big", "v1", plan.big_mib, seed=1)
        mid = make_image(gen, registry.url, "bench/mid", "v1", plan.mid_mib, seed=2)

        phases = self.phases
        warm_phases = phases & {"warm", "slow", "many", "thousand", "zerocopy"}
        if "cold" in phases or warm_phases:
            server, cache, ref_big = cold.single_client(self, registry.url, big, report="cold" in phases)
            if "warm" in phases:
                warm.single_client(self, server, big, ref_big)
            if "slow" in phases:
                memory.slow_clients(self, server, big, ref_big)
            mid_ref = None
            if phases & {"many", "zerocopy"}:
                mid_ref = cold.warm_reference(self, server, mid, "mid-warm.tar")
            if "many" in phases:
                many.fast_clients(self, server, mid, mid_ref)
            if "thousand" in phases:
                many.thousand_slow(self, server, big, ref_big)
            if "zerocopy" in phases:
                many.zero_copy_gain(self, server, cache, registry.url, mid, mid_ref)
            self.stop_server(server, cache)
        if "throttled" in phases:
            cold.throttled(self, registry.url, big, ref_big if "cold" in phases or warm_phases else None)
        if "cold" in phases:
            cold.two_tier_single(self, registry.url, mid)
        if "fleet" in phases:
            fleet.two_tier(self, registry.url, mid)
