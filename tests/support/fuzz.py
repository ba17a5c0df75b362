"""HTTP-level fuzzing: random and mutated requests against a running server, and what each answer must be.

Used by tests/test_e2e_fuzz.py (a few hundred requests in CI) and scripts/faults.py (thousands). Requests are
built from parts (methods, paths on every route, versions, headers, bodies, encodings, line endings) and then,
for some, mutated byte by byte (flips, insertions, cuts, repeats). Every registry a request names is on
127.0.0.1 (the test registry, a closed port) or an invalid host the server refuses before any lookup; byte
mutations never touch a request naming a registry host, so no request can send the server off the machine.

What must hold (``check``): an answer or a close within the deadline; never a redirect; no 5xx other than the
documented 502/503/504; every error body JSON of the shape {"error", "status", "message"} with that status; HEAD
without a body; success never chunked; a 200/206 download body exactly Content-Length long.
"""

from __future__ import annotations

import base64
import concurrent.futures
import random
import time
from collections import Counter
from dataclasses import dataclass, field

from tests.support.rawhttp import RawResult, exchange

ALLOWED_5XX = {502, 503, 504}


@dataclass(frozen=True)
class FuzzTarget:
    address: tuple[str, int]
    good_filename: str  # an image REGISTRY_URL holds
    registry_host: str  # 127.0.0.1:port of the test registry
    closed_host: str  # 127.0.0.1:port nobody listens on


@dataclass
class FuzzReport:
    requests: int = 0
    statuses: Counter = field(default_factory=Counter)
    findings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, other: "FuzzReport") -> None:
        self.requests += other.requests
        self.statuses.update(other.statuses)
        self.findings += other.findings


METHODS = ["GET", "GET", "GET", "HEAD", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT",
           "get", "PRI", "BREW", "G\x00T", "GET /", "A" * 300, "", "\u00e9GET"]
VERSIONS = ["HTTP/1.1"] * 8 + ["HTTP/1.0", "HTTP/1.0", "", "HTTP/0.9", "HTTP/2.0", "HTTP/1.2", "HTTP/9.9",
                               "http/1.1", "HTTP/1.1 extra", "HTTP/1"]
FILENAMES = ["nginx_latest.tar", "x_y.tar", "Nginx_latest.tar", "a.tar", "_.tar", "nginx_.tar", "a__b__c_1.tar",
             "x_" + "t" * 200 + ".tar", "a" * 300 + "_x.tar", "..%2F..%2Fetc_passwd.tar", "%00_x.tar",
             "caf\u00e9_1.tar", "x_y.tar.gz", "x_y", "%ff%fe_x.tar", "x%5Fy.tar", "x_y.TAR"]
BAD_HOSTS = ["bad_host", "-x", "exa%20mple.com", "127.0.0.1:99999", "[::1", "a..b", "%00", "127.0.0.1:0"]
ODD_PATHS = ["/", "", "*", "/health/", "//health", "/health?x=1", "/health#frag", "/HEALTH", "/metrics/",
             "/status/", "/status/prepare-" + "0" * 40, "/status/../health", "/../../etc/passwd",
             "/docker/", "/docker", "/docker//", "/registry/http/", "/%2e%2e/%2e%2e/etc/passwd", "/%c0%af",
             "/\u00fcber", "/" + "a" * 9000, "/docker/" + "%41" * 3000 + ".tar", "http://127.0.0.1/health",
             "/status/%ff", "/docker/x_y.tar;param", "/docker/x_y.tar?", "/health\t", "/\x7f"]
RANGES = ["bytes=0-0", "bytes=0-", "bytes=-1", "bytes=-0", "bytes=5-1", "bytes=0-1,2-3", "bytes=99999999999-",
          "items=0-1", "bytes=" + "9" * 5000 + "-", "bytes=\u0663-", "bytes = 0-1", "bytes=-"]


def _path(rng: random.Random, target: FuzzTarget) -> str:
    choice = rng.random()
    filename = target.good_filename if rng.random() < 0.35 else rng.choice(FILENAMES)
    if choice < 0.3:
        return f"/docker/{filename}"
    if choice < 0.45:
        host = rng.choice([target.registry_host, target.registry_host, target.closed_host, *BAD_HOSTS])
        route = rng.choice(["registry", "registry-auth"])
        scheme = rng.choice(["http", "http", "https", "ftp", ""])
        return f"/{route}/{scheme}/{host}/docker/{filename}"
    if choice < 0.6:
        return rng.choice(["/health", "/metrics", f"/status/prepare-{rng.getrandbits(160):040x}", "/status/x"])
    return rng.choice(ODD_PATHS)


def _headers(rng: random.Random, hostile: bool) -> list[tuple[str, str]]:
    headers = [] if hostile and rng.random() < 0.1 else [("Host", rng.choice(["127.0.0.1", "dhp.test:8080"]))]
    fair = [
        ("Range", lambda: rng.choice(RANGES)), ("If-Range", lambda: rng.choice(['"x"', "", "W/\"x\""])),
        ("Authorization", lambda: rng.choice([
            "Basic " + base64.b64encode(b"alice:s3cret-pw").decode(), "Basic !!!", "Basic " + "A" * 3000,
            "Basic " + base64.b64encode(b"no-colon").decode(), "Bearer x", "Basic", "Digest x=y"])),
        ("Connection", lambda: rng.choice(["close", "keep-alive", "Upgrade", "close, close", ""])),
        ("Upgrade", lambda: rng.choice(["websocket", "h2c", "TLS/1.2"])),
        ("Expect", lambda: rng.choice(["100-continue", "nothing"])),
        ("Content-Encoding", lambda: rng.choice(["gzip", "br", "x"])),
        ("Accept-Encoding", lambda: "gzip, deflate, br"),
        ("X-Forwarded-For", lambda: rng.choice(["10.0.0.1", "evil", "1.1.1.1, 2.2.2.2"])),
        ("User-Agent", lambda: rng.choice(["cisco-IOS", "curl/8", "\u00e9t\u00e9", "x" * 2000])),
        ("X-Latin", lambda: "\u00ff\u00fe"), ("Content-Length", lambda: rng.choice(["0", "5"])),
    ]
    foul = [
        ("Host", lambda: rng.choice(["", "[::1]:80", "a" * 300])),
        ("Transfer-Encoding", lambda: rng.choice(["chunked", "gzip", "chunked, identity", "identity", "x"])),
        ("Content-Length", lambda: rng.choice(["-1", "99999999999999999999", "1, 2", "abc"])),
        ("X-Long", lambda: "v" * rng.choice([5000, 20000, 40000])),
        ("Bad Name", lambda: "x"), ("X-Nul", lambda: "a\x00b"), (" X-Leading-Space", lambda: "x"),
        ("X-Folded", lambda: "a\r\n continued"),
    ]
    for name, value in rng.sample(fair, rng.randint(0, 4)):
        headers.append((name, value()))
    if hostile:
        for name, value in rng.sample(foul, rng.randint(0, 2)):
            headers.append((name, value()))
        if rng.random() < 0.05:
            headers += [(f"X-Many-{i}", "y") for i in range(rng.choice([100, 1200]))]
    return headers


def _body(rng: random.Random, headers: list[tuple[str, str]]) -> bytes:
    if any(name == "Transfer-Encoding" for name, _ in headers) and rng.random() < 0.7:
        return rng.choice([b"5\r\nhello\r\n0\r\n\r\n", b"zz\r\nhello\r\n", b"5\r\nhel", b"0\r\n\r\n"])
    if rng.random() < 0.15:
        return rng.choice([b"x" * 5, b"{}", bytes(rng.getrandbits(8) for _ in range(100)),
                           b"\x1f\x8b\x08\x00" + b"\x00" * 20])
    return b""


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not buf:
            break
        at = rng.randrange(len(buf))
        kind = rng.random()
        if kind < 0.35:
            buf[at] = rng.getrandbits(8)
        elif kind < 0.55:
            buf[at:at] = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 8)))
        elif kind < 0.75:
            del buf[at:at + rng.randint(1, 16)]
        elif kind < 0.9:
            buf[at:at] = buf[at:at + rng.randint(1, 64)] * rng.randint(2, 50)
        else:
            del buf[at:]  # cut short: the server must time the rest out
    return bytes(buf)


def fuzz_request(rng: random.Random, target: FuzzTarget) -> tuple[str, bytes]:
    """(method it was built with, request bytes: a mutation may have changed the method). Half the requests are
    well-formed HTTP with odd values; the other half break the syntax too."""
    hostile = rng.random() < 0.5
    method = rng.choice(METHODS) if hostile else rng.choice(["GET", "GET", "HEAD", "POST", "PUT", "OPTIONS"])
    version = rng.choice(VERSIONS) if hostile else rng.choice(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0"])
    path = _path(rng, target)
    headers = _headers(rng, hostile)
    body = _body(rng, headers)
    newline = "\r\n" if not hostile or rng.random() < 0.8 else rng.choice(["\n", "\r", "\r\r\n"])
    start = f"{method} {path} {version}".rstrip() if version else f"{method} {path}"
    text = newline.join([start, *(f"{n}: {v}" for n, v in headers)]) + newline + newline
    encoding = "utf-8" if rng.random() < 0.5 else "latin-1"
    data = text.encode(encoding, errors="replace") + body
    if hostile and "/registry" not in path and rng.random() < 0.5:
        data = _mutate(rng, data)
    return method, data


def check(method: str, result: RawResult, deadline: float) -> list[str]:
    """What is wrong with one answer (empty: nothing)."""
    if result.status is None:
        if result.ended == "timeout" or result.seconds > deadline:
            return [f"no answer and no close within {result.seconds:.1f}s"]
        return []  # closed without a response: only allowed for what is not a request at all
    problems = []
    status = result.status
    head = method == "HEAD"
    if 300 <= status < 400:
        problems.append(f"redirect {status}")
    if status >= 500 and status not in ALLOWED_5XX:
        problems.append(f"status {status}")
    if result.chunked:
        problems.append("chunked response")
    if head and result.body:
        problems.append("HEAD with a body")
    if status >= 400:
        if not result.headers.get("content-type", "").startswith("application/json"):
            problems.append(f"{status} typed {result.headers.get('content-type')!r}")
        elif not head and result.ended == "complete":
            try:
                body = result.json()
                if set(body) < {"error", "status", "message"} or body["status"] != status:
                    problems.append(f"{status} with JSON {body!r:.200}")
            except ValueError:
                problems.append(f"{status} with a body that is not JSON: {result.body[:120]!r}")
    if status in (200, 206) and not head and result.ended != "complete":
        problems.append(f"{status} body ended early ({result.ended}, {len(result.body)} bytes)")
    if result.seconds > deadline:
        problems.append(f"answered after {result.seconds:.1f}s")
    return problems


def run_fuzz(target: FuzzTarget, count: int, seed: int, *, threads: int = 8, deadline: float = 20.0) -> FuzzReport:
    """``count`` requests from ``threads`` connections at a time; findings name the request (seed, index)."""
    report = FuzzReport()
    started = time.monotonic()

    def one(index: int) -> FuzzReport:
        rng = random.Random(f"{seed}-{index}")
        _, data = fuzz_request(rng, target)
        method = data.split(b" ", 1)[0].decode("latin-1")  # as sent, mutations included
        result = exchange(target.address, data, timeout=deadline + 5, head_only=method == "HEAD")
        single = FuzzReport(requests=1)
        single.statuses[result.status if result.status is not None else result.ended] += 1
        for problem in check(method, result, deadline):
            single.findings.append(f"seed {seed} #{index} {data[:100]!r}: {problem}")
        return single

    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
        for single in pool.map(one, range(count)):
            report.add(single)
    report.seconds = time.monotonic() - started
    return report
