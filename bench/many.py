"""Many clients on a warm image, ours and nginx in turn (the same clients, the same number of times): fast clients
as real `curl` processes and as asyncio clients, then a thousand slow clients paced like switches. Each row gives
the aggregate figures, the CPU both servers spent per GB they served, and (slow clients) the memory of every API
process together. Last, what zero-copy sends gain: ours with and without them, in turn."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench.checks import Reference, prefix_crcs
from bench.clients import Fetch, curl_many, fetch_spread, percentile
from bench.images import Image
from bench.processes import RssSampler, log_errors, log_size, tree_cpu_seconds, tree_pids
from bench.references import Nginx
from bench.report import GB, MB, MiB, mib, rate, say
from tests.support.services import ServerProcess

if TYPE_CHECKING:
    from bench.harness import Bench

SLOW_RATE = 1.5 * MB  # a Catalyst 9300's `copy http:` speed
# A client that waited this long for bytes it was ready to take has stalled (IOS-XE gives up after 30 s).
STALL_SECONDS = 5.0
THOUSAND_MEMORY_MIB = 500
# The asyncio clients run in this many processes: one event loop cannot take in what the servers deliver.
CLIENT_PROCESSES = 2


@dataclass
class Run:
    """One batch of clients against one server."""

    received: int
    seconds: float
    cpu: float  # the server's CPU seconds (all its processes)
    errors: list[str]
    fetches: list[Fetch]

    @property
    def throughput(self) -> float:
        return self.received / self.seconds if self.seconds else 0.0

    @property
    def cpu_per_gb(self) -> float:
        return self.cpu / (self.received / GB) if self.received else float("nan")


@dataclass
class Target:
    name: str
    url: str
    port: int
    path: str
    pid: int  # the root of its process tree


def _measure(target: Target, clients: Callable[[Target], tuple[int, float, list[str], list[Fetch]]]) -> Run:
    pids = tree_pids(target.pid)
    before = tree_cpu_seconds(target.pid)
    received, seconds, errors, fetches = clients(target)
    cpu = tree_cpu_seconds(target.pid) - before
    if tree_pids(target.pid) != pids:
        errors.append(f"{target.name}: its processes changed during the run ({pids} → {tree_pids(target.pid)})")
    return Run(received, seconds, cpu, errors, fetches)


def _curl_clients(count: int, size: int) -> Callable[[Target], tuple[int, float, list[str], list[Fetch]]]:
    def run(target: Target) -> tuple[int, float, list[str], list[Fetch]]:
        fleet = curl_many(count, target.url + target.path)
        errors = list(fleet.errors) + [f"{target.name}: curl got {r.size} bytes, expected {size}"
                                       for r in fleet.results if r.size != size]
        return fleet.received, fleet.seconds, errors, []
    return run


def _asyncio_clients(count: int, reference: Reference) -> Callable[[Target], tuple[int, float, list[str], list[Fetch]]]:
    def run(target: Target) -> tuple[int, float, list[str], list[Fetch]]:
        fetches = fetch_spread(count, CLIENT_PROCESSES, target.port, target.path, timeout=900, sha_every=25)
        errors = [f"{target.name}: client {f.index}: {f.error}" for f in fetches if f.error]
        errors += [f"{target.name}: client {f.index} got other bytes" for f in fetches if not f.error and (
            (f.received, f.crc32) != (reference.size, reference.crc32) or f.sha256 not in (None, reference.sha256))]
        ok = [f for f in fetches if not f.error]
        seconds = max(f.done_at for f in ok) - min(f.started for f in fetches) if ok else 0.0
        return sum(f.received for f in ok), seconds, errors, fetches
    return run


def _targets(server: ServerProcess, nginx: Nginx, image: Image, reference: Reference) -> tuple[Target, Target]:
    return (Target("ours", server.url, server.port, f"/docker/{image.filename}", server.pid),
            Target("nginx", nginx.url, nginx.port, f"/{reference.path.name}", nginx.pid))


def _in_turn(bench: Bench, what: str, ours: Target, nginx: Target, runs: int,
             clients: Callable[[Target], tuple[int, float, list[str], list[Fetch]]]) -> tuple[list[Run], list[Run]]:
    mine: list[Run] = []
    theirs: list[Run] = []
    for i in range(runs):
        with bench.profiler.record(f"{what}-{i}", ours.pid):
            mine.append(_measure(ours, clients))
        theirs.append(_measure(nginx, clients))
        say(f"{what} {i + 1}/{runs}: ours {rate(mine[-1].throughput)} ({mine[-1].cpu_per_gb:.2f} CPU s/GB), "
            f"nginx {rate(theirs[-1].throughput)} ({theirs[-1].cpu_per_gb:.2f} CPU s/GB)")
        for error in mine[-1].errors[:5] + theirs[-1].errors[:5]:
            bench.report.error(error)
    return mine, theirs


def fast_clients(bench: Bench, server: ServerProcess, image: Image, reference: Reference) -> None:
    """``--fast-clients`` clients at once, as curl processes and as asyncio clients, against ours and nginx in
    turn, ``--fast-runs`` times each."""
    plan = bench.plan
    n = plan.fast_clients
    nginx = Nginx(bench.work, reference.path.parent)
    bench.on_cleanup(nginx.stop)
    ours, theirs = _targets(server, nginx, image, reference)
    for kind, clients in (("curl processes", _curl_clients(n, reference.size)),
                          ("asyncio clients", _asyncio_clients(n, reference))):
        say(f"{n} warm {kind} at once on {mib(reference.size)}, ours and nginx in turn, {plan.fast_runs} times")
        mine, nginx_runs = _in_turn(bench, f"{n}-{kind.split()[0]}", ours, theirs, plan.fast_runs, clients)
        ours_rate = statistics.median(r.throughput for r in mine)
        nginx_rate = statistics.median(r.throughput for r in nginx_runs)
        failed = any(r.errors for r in mine + nginx_runs)
        bench.report.row(
            f"{n} warm clients at once ({kind}), {mib(reference.size)} image: aggregate throughput",
            f"{rate(ours_rate)} = {ours_rate / nginx_rate:.2f}× nginx (median of {plan.fast_runs}); "
            f"CPU {statistics.median(r.cpu_per_gb for r in mine):.2f} s/GB",
            f"nginx (worker_processes auto, sendfile), same clients: {rate(nginx_rate)}; CPU "
            f"{statistics.median(r.cpu_per_gb for r in nginx_runs):.2f} s/GB",
            "≥ 0.8× nginx, no error", ours_rate >= 0.8 * nginx_rate and not failed)
    nginx.stop()


def _slow_summary(run: Run, reference: Reference) -> tuple[list[str], list[float], int]:
    """Errors (failed or wrong bytes), the per-client rates, and how many clients stalled."""
    ok = [f for f in run.fetches if not f.error]
    crcs = prefix_crcs(reference.path, [f.received for f in ok])
    errors = [e for e in run.errors if "got other bytes" not in e]
    errors += [f"client {f.index}: wrong bytes" for f in ok if crcs.get(f.received) != f.crc32]
    rates = [f.received / max(f.done_at - f.headers_at, 1e-9) for f in ok]
    stalled = sum(f.longest_wait >= STALL_SECONDS for f in run.fetches)
    return errors, rates, stalled


def thousand_slow(bench: Bench, server: ServerProcess, image: Image, reference: Reference) -> None:
    """``--thousand`` clients paced to SLOW_RATE for ``--thousand-seconds``, on ours and then on nginx."""
    plan = bench.plan
    n, seconds = plan.thousand, plan.thousand_seconds
    nginx = Nginx(bench.work, reference.path.parent)
    bench.on_cleanup(nginx.stop)
    ours, theirs = _targets(server, nginx, image, reference)

    def clients(target: Target) -> tuple[int, float, list[str], list[Fetch]]:
        fetches = fetch_spread(n, CLIENT_PROCESSES, target.port, target.path, timeout=seconds + 180,
                               pace=SLOW_RATE, stop_after=seconds, bufsize=256 * 1024)
        errors = [f"{target.name}: client {f.index}: {f.error}" for f in fetches if f.error]
        ok = [f for f in fetches if not f.error]
        wall = max(f.done_at for f in ok) - min(f.started for f in fetches) if ok else 0.0
        return sum(f.received for f in ok), wall, errors, fetches

    say(f"{n} slow clients × {rate(SLOW_RATE)} for {seconds:.0f} s on {mib(reference.size)}: ours, then nginx")
    log_offset = log_size(server.log_path)
    with RssSampler(server.pid) as memory, bench.profiler.record("thousand", server.pid):
        mine = _measure(ours, clients)
    errors_logged = log_errors(server.log_path, log_offset)
    time.sleep(2)
    nginx_run = _measure(theirs, clients)
    nginx.stop()
    my_errors, my_rates, my_stalls = _slow_summary(mine, reference)
    nginx_errors, nginx_rates, nginx_stalls = _slow_summary(nginx_run, reference)
    for error in (my_errors + [f"nginx {e}" for e in nginx_errors])[:10]:
        bench.report.error(error)
    if not my_rates or not nginx_rates:
        bench.report.row(f"{n} slow clients", "ERROR", "—", "no error", False)
        return
    median, nginx_median = statistics.median(my_rates), statistics.median(nginx_rates)
    longest = max(f.longest_wait for f in mine.fetches)
    nginx_longest = max(f.longest_wait for f in nginx_run.fetches)
    bench.report.row(
        f"{n} warm clients at {SLOW_RATE / MB:.1f} MB/s each for {seconds:.0f} s (asyncio clients)",
        f"{len(my_errors)} errors, {my_stalls} stalled (waited ≥ {STALL_SECONDS:g} s; longest wait {longest:.1f} s), "
        f"{len(errors_logged)} server ERROR lines; per-client rate median {rate(median)} = "
        f"{median / nginx_median:.2f}× nginx (p10 {rate(percentile(my_rates, 10))}); "
        f"CPU {mine.cpu_per_gb:.2f} s/GB",
        f"nginx, same clients: {len(nginx_errors)} errors, {nginx_stalls} stalled (longest wait "
        f"{nginx_longest:.1f} s); median {rate(nginx_median)} (p10 {rate(percentile(nginx_rates, 10))}); "
        f"CPU {nginx_run.cpu_per_gb:.2f} s/GB",
        "no error, no stall, median ≥ 0.8× nginx",
        not my_errors and not my_stalls and not errors_logged and median >= 0.8 * nginx_median)
    bench.report.row(f"API memory, {n} slow clients", memory.describe(), "—", f"< {THOUSAND_MEMORY_MIB} MiB",
                     memory.peak_memory < THOUSAND_MEMORY_MIB * MiB)


def zero_copy_gain(bench: Bench, server: ServerProcess, cache: Path, registry_url: str, image: Image,
                   reference: Reference) -> None:
    """Ours with and without zero-copy sends (ZERO_COPY=false: read into memory, then written), on the same warm
    store, in turn: one curl client (``--runs`` times), and ``--fast-clients`` asyncio clients."""
    plan = bench.plan
    copying, _ = bench.server("copying", {"REGISTRY_URL": registry_url, "CACHE_DIR": str(cache),
                                          "ZERO_COPY": "false"})
    path = f"/docker/{image.filename}"
    with_zc = Target("ours", server.url, server.port, path, server.pid)
    without = Target("ours, ZERO_COPY=false", copying.url, copying.port, path, copying.pid)
    say(f"zero-copy against copying: 1 curl client {plan.runs} times, then {plan.fast_clients} asyncio clients")
    one_zc, one_copy = _in_turn(bench, "1-curl-zc", with_zc, without, plan.runs, _curl_clients(1, reference.size))
    many_zc, many_copy = _in_turn(bench, f"{plan.fast_clients}-zc", with_zc, without, 1,
                                  _asyncio_clients(plan.fast_clients, reference))
    copying.stop()
    for what, zc, copy in (("1 client (curl)", one_zc, one_copy),
                           (f"{plan.fast_clients} asyncio clients", many_zc, many_copy)):
        zc_rate, copy_rate = statistics.median(r.throughput for r in zc), statistics.median(r.throughput for r in copy)
        zc_cpu, copy_cpu = statistics.median(r.cpu_per_gb for r in zc), statistics.median(r.cpu_per_gb for r in copy)
        bench.report.row(f"zero-copy sends, warm {mib(reference.size)}, {what}",
                         f"{rate(zc_rate)}, CPU {zc_cpu:.2f} s/GB", f"ours with ZERO_COPY=false: {rate(copy_rate)}, "
                         f"CPU {copy_cpu:.2f} s/GB", "less CPU per GB", zc_cpu < copy_cpu)
