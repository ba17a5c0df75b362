"""Client-side fault scenarios (issue 10, items 6 and 8): slow and idle connections, malformed requests, fuzz.
Registered in faultlab.FAULTS on import."""

from __future__ import annotations

import time

from faultlab import Figures, Lab, after_run, devices, fault, health_seconds, spread, upstream_bytes
from tests.support.faults import closed_port
from tests.support.flood import Flood
from tests.support.fuzz import FuzzTarget, run_fuzz
from tests.support.rawhttp import exchange, open_fds, request_bytes


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
