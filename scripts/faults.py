#!/usr/bin/env python3
"""Fault scenarios against real processes, and what each costs: the numbers of issue 10.

    .venv/bin/python scripts/faults.py [--only NAME ...] [--list] [--fuzz-requests N] [--seed S] [--keep]

Everything runs on 127.0.0.1 and is started and stopped here: a CNCF registry behind a counting proxy, and the
server under test (`python -m docker_http_passthrough serve`). For each fault it prints:

- the extra seconds the waiting devices paid (the same downloads with and without the fault);
- the extra upstream bytes (the API's dhp_upstream_bytes_total);
- what is left on disk (temporary files in CACHE_DIR) and in Redis afterwards;
- for hostile input: volume and findings;
- the server's peak memory, and its health after the run.

Each fault is one function registered with @fault(name, about) that takes the Lab and returns its Figures
(figure name → value, in print order). Add a scenario by adding a function: dead workers, Redis blips, registry
cuts, full disks and hostile registries belong here beside the client-side ones. It is a measuring tool: a bad
figure does not change the exit status; 1 means a scenario could not run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
# Scenario modules beside this script register into this table with `from faults import fault`: run as a script,
# this module must be the one they import.
sys.modules.setdefault("faults", sys.modules[__name__])
for _name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
    os.environ.pop(_name, None)  # loopback only: no environment proxy may see our traffic

import httpx  # noqa: E402

from tests.support.faults import closed_port, stray_files  # noqa: E402
from tests.support.flood import FdLimitedServer, Flood  # noqa: E402
from tests.support.fuzz import FuzzTarget, run_fuzz  # noqa: E402
from tests.support.images import make_layer  # noqa: E402
from tests.support.rawhttp import exchange, memory_kib, open_fds, request_bytes  # noqa: E402
from tests.support.registry_fixtures import RegistryUnderTest, launch_registry  # noqa: E402
from tests.support.services import ServerProcess  # noqa: E402

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
    """What scenarios share: a work directory, one registry, servers (stopped when the run ends)."""

    def __init__(self, workdir: Path, fuzz_requests: int, seed: int):
        self.workdir = workdir
        self.fuzz_requests = fuzz_requests
        self.seed = seed
        self.registry: RegistryUnderTest = launch_registry(workdir / "registry")
        self.servers: list[ServerProcess] = []
        self._images = 0

    def image(self, size: int) -> str:
        """Push an image with one incompressible layer of ``size`` bytes; returns its download filename."""
        self._images += 1
        repository, tag = f"faults/image{self._images}", "v1"
        self.registry.push_image(repository, tag, [make_layer({"payload.bin": os.urandom(size)})])
        return f"{repository.replace('/', '__')}_{tag}.tar"

    def server(self, env: dict[str, str], nofile: tuple[int, int] | None = None) -> ServerProcess:
        index = len(self.servers)
        env = {"REGISTRY_URL": self.registry.url, "CACHE_DIR": str(self.workdir / f"cache{index}"), **env}
        log = self.workdir / f"server{index}.log"
        server = FdLimitedServer(env, log, nofile) if nofile else ServerProcess(env, log)
        self.servers.append(server)
        return server

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        self.registry.stop()


def devices(server: ServerProcess, filename: str, count: int) -> list[float]:
    """``count`` devices download ``filename`` at once; seconds each took (a short or failed copy raises)."""
    def one(_: int) -> float:
        started = time.monotonic()
        with httpx.Client(timeout=120, trust_env=False) as client, \
                client.stream("GET", f"{server.url}/docker/{filename}") as response:
            received = sum(len(chunk) for chunk in response.iter_raw())
            if response.status_code != 200 or received != int(response.headers["content-length"]):
                raise RuntimeError(f"device download failed: {response.status_code}, {received} bytes")
        return time.monotonic() - started

    with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(one, range(count)))


def upstream_bytes(server: ServerProcess) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10, trust_env=False).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("dhp_upstream_bytes_total"))


def health_seconds(server: ServerProcess) -> tuple[int | None, float]:
    started = time.monotonic()
    result = exchange(("127.0.0.1", server.port), request_bytes("GET", "/health"), timeout=30)
    return result.status, time.monotonic() - started


def spread(times: list[float]) -> str:
    return f"median {statistics.median(times):.2f} s, max {max(times):.2f} s"


def leftovers(server: ServerProcess) -> str:
    strays = stray_files(Path(server.env["CACHE_DIR"]))
    return "none" if not strays else f"{len(strays)} temporary files: {', '.join(strays[:3])}"


def after_run(server: ServerProcess, figures: Figures) -> Figures:
    """The figures every scenario ends with."""
    resident, peak = memory_kib(server.pid)
    status, seconds = health_seconds(server)
    figures["server memory now / peak"] = f"{resident // 1024} MiB / {peak // 1024} MiB"
    figures["/health after"] = f"{status} in {seconds * 1000:.0f} ms"
    figures["left on disk"] = leftovers(server)
    figures["left in Redis"] = "n/a (embedded mode)" if "REDIS_URL" not in server.env else "see scenario"
    return figures


# --------------------------------------------------------------------------- client-side faults (issue 10, items 6 and 8)


@fault("slow-clients", "1,100 idle + 300 slowloris connections (1 byte / 5 s) against a server held to 1,024 fds, "
                       "while 20 devices download a warm 16 MiB image")
def slow_clients(lab: Lab) -> Figures:
    filename = lab.image(16 << 20)
    server = lab.server({}, nofile=(1024, 1024))
    devices(server, filename, 1)  # warm
    before = upstream_bytes(server)
    baseline = devices(server, filename, 20)
    fds_before = open_fds(server.pid)
    flood = Flood(("127.0.0.1", server.port), idle=1100, slow=300, interval=5.0)
    try:
        time.sleep(1.0)
        probes = [health_seconds(server) for _ in range(10)]
        during = devices(server, filename, 20)
        held_at_peak = open_fds(server.pid)
        limit = float(server.env.get("HEADER_TIMEOUT", 10))
        deadline = time.monotonic() + limit + 10
        while flood.open_now() and time.monotonic() < deadline:
            time.sleep(0.5)
        report = flood.report()
    finally:
        flood.stop()
    answers = ", ".join(f"{status or 'closed silently'}: {n}" for status, n in sorted(
        report.answers.items(), key=lambda item: str(item[0])))
    return after_run(server, {
        "flood connections opened / refused by the kernel": f"{report.opened} / {report.refused}",
        "devices, no flood": spread(baseline),
        "devices, during the flood": spread(during),
        "extra seconds per device (max)": f"{max(during) - max(baseline):+.2f} s",
        "/health during the flood": f"{sum(s == 200 for s, _ in probes)}/10 answered, slowest "
                                    f"{max(t for _, t in probes) * 1000:.0f} ms",
        "server fds: before / at the flood's height": f"{fds_before} / {held_at_peak} (limit 1,024)",
        "flood connections still open after HEADER_TIMEOUT+10 s": str(report.still_open),
        "slowest close of a flood connection": f"{report.slowest_close:.1f} s",
        "what the flood connections got": answers,
        "extra upstream bytes": f"{upstream_bytes(server) - before:,.0f}",
    })


MALFORMED = [
    ("bare CRLF", b"\r\n"),
    ("request line never ends", b"GET /health HTTP/1.1\r\nHost: x\r\n"),
    ("garbage", b"GARBAGE\r\n\r\n"),
    ("TLS client hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
    ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    ("header without colon", b"GET /health HTTP/1.1\r\nNo colon\r\n\r\n"),
    ("CL + TE (smuggling)", b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ("negative Content-Length", b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"),
    ("40 KB header", request_bytes("GET", "/health", {"X-Big": "a" * 40_000})),
    ("non-ASCII path", b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("unknown path", request_bytes("GET", "/nope")),
    ("trailing slash", request_bytes("GET", "/health/")),
    ("wrong method", request_bytes("DELETE", "/health")),
    ("bad filename", request_bytes("GET", "/docker/Nginx.tar")),
    ("range past the end", request_bytes("GET", "/docker/{image}", {"Range": "bytes=999999999-"})),
    ("websocket upgrade", request_bytes("GET", "/health", {"Connection": "Upgrade", "Upgrade": "websocket"})),
]


@fault("malformed", "one of each malformed or refused request, raw over a socket")
def malformed(lab: Lab) -> Figures:
    filename = lab.image(1 << 20)
    server = lab.server({"HEADER_TIMEOUT": "10"})
    devices(server, filename, 1)
    figures: Figures = {}
    not_json = hangs = 0
    for name, raw in MALFORMED:
        result = exchange(("127.0.0.1", server.port), raw.replace(b"{image}", filename.encode()), timeout=30)
        is_json = result.headers.get("content-type", "").startswith("application/json")
        not_json += result.status is not None and result.status >= 400 and not is_json
        hangs += result.ended == "timeout"
        figures[name] = (f"{result.status or result.ended} {'JSON' if is_json else 'not JSON'} in "
                         f"{result.seconds:.2f} s")
    figures["errors that are not JSON"] = str(not_json)
    figures["hangs (no answer in 30 s)"] = str(hangs)
    return after_run(server, figures)


@fault("fuzz", "random and mutated requests of every kind (tests/support/fuzz.py), 16 connections at a time")
def fuzz(lab: Lab) -> Figures:
    filename = lab.image(256 << 10)
    server = lab.server({"HEADER_TIMEOUT": "2"})
    target = FuzzTarget(("127.0.0.1", server.port), filename, lab.registry.host, f"127.0.0.1:{closed_port()}")
    report = run_fuzz(target, lab.fuzz_requests, lab.seed, threads=16)
    statuses = ", ".join(f"{status}: {n}" for status, n in report.statuses.most_common(8))
    figures = {
        "requests (seed)": f"{report.requests:,} ({lab.seed})",
        "time, rate": f"{report.seconds:.1f} s, {report.requests / max(report.seconds, 1e-9):,.0f} requests/s",
        "most frequent answers": statuses,
        "findings": str(len(report.findings)),
    }
    for index, finding in enumerate(report.findings[:5]):
        figures[f"finding {index + 1}"] = finding[:160]
    return after_run(server, figures)


import faults_upstream  # noqa: E402,F401 - registry-side scenarios (cuts, Retry-After, hostile registries)


# --------------------------------------------------------------------------- running


def print_figures(fault_: Fault, figures: Figures, seconds: float) -> None:
    print(f"\n== {fault_.name}: {fault_.about} ({seconds:.0f} s)")
    width = max(len(name) for name in figures)
    for name, value in figures.items():
        print(f"  {name:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=sorted(FAULTS), help="run these faults only")
    parser.add_argument("--list", action="store_true", help="list the faults and exit")
    parser.add_argument("--fuzz-requests", type=int, default=int(os.environ.get("DHP_FUZZ_REQUESTS", "20000")))
    parser.add_argument("--seed", type=int, default=random.randrange(1 << 31))
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, caches)")
    args = parser.parse_args(argv)
    if args.list:
        for item in FAULTS.values():
            print(f"{item.name:14} {item.about}")
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="dhp-faults-"))
    failed = False
    lab = Lab(workdir, args.fuzz_requests, args.seed)
    try:
        for name in args.only or list(FAULTS):
            started = time.monotonic()
            try:
                figures = FAULTS[name].run(lab)
            except Exception:  # one scenario's failure must not hide the others' figures
                failed = True
                print(f"\n== {name}: could not run\n{traceback.format_exc()}")
                continue
            print_figures(FAULTS[name], figures, time.monotonic() - started)
    finally:
        lab.close()
        if args.keep:
            print(f"\nwork directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
