#!/usr/bin/env python3
"""Benchmark docker-http-passthrough against references measured in the same run.

    .venv/bin/python bench/run.py [--size-mib 1024] [--quick]

Everything runs on 127.0.0.1 and is started and stopped by this script: a CNCF registry, nginx (the static-file
reference), skopeo (the cold-copy reference), redis-server, the server under test
(`python -m docker_http_passthrough serve`, embedded or two-tier with `... worker`), counting/throttling proxies.
All files live in one temporary directory that is removed at the end, also on Ctrl-C, SIGTERM or when the
time limit (--time-limit) runs out.

Images are generated here: layers of random (incompressible) bytes mixed with word-salad text (compressible),
built streaming into temporary files, gzip level 1, pushed with a streaming monolithic upload.

It prints a table of figures, each beside its same-run reference and target, with PASS/FAIL. A missed target
does not change the exit status (this is a measuring tool); exit status 1 means an error: wrong bytes, a failed
request, or something that could not be started. 2: bad arguments, 3: time limit hit, 130: interrupted.
"""

from __future__ import annotations

import _thread
import argparse
import asyncio
import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
# Loopback only: never let an environment proxy see (or route) our traffic.
for _name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
    os.environ.pop(_name, None)
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

import httpx

from tests.support.images import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    make_config,
    push_blob,
)
from tests.support.proxy import CountingProxy
from tests.support.registry import free_port, start_registry
from tests.support.services import ServerProcess, WorkerProcess, start_redis

try:  # igzip: ~15x faster than zlib at level 1 on random data; same gzip format
    from isal import isal_zlib as fastz
except ImportError:  # pragma: no cover
    import zlib as fastz

MiB = 1 << 20
MB = 1_000_000
NGINX = "/usr/sbin/nginx"
RSS_LIMIT_MIB = 200
THROTTLE_BYTES_PER_SECOND = 20 * MB
SLOW_RATE = 1.5 * MB
TTFB_REQUESTS = 20
# The server starts a still-preparing response when PREPARE_GRACE runs out, counted from after it resolved the
# tag; headers "within the grace period" therefore means within it plus this much (resolving, planning, loopback).
HEADER_SLACK = 1.0
# One name for the registry in every server, whether it reaches it directly or through a proxy, so that all
# of them put the same image tag into the archive and every download can be compared byte for byte.
REGISTRY_NAME = "registry.bench.invalid:5000"


# ----------------------------------------------------------------------------------------------- output


def say(message: str) -> None:
    print(f"# {message}", flush=True)


def mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


def rate(bytes_per_second: float) -> str:
    value = bytes_per_second / MB
    return f"{value:,.0f} MB/s" if value >= 10 else f"{value:.2f} MB/s"


@dataclass
class Row:
    measure: str
    ours: str
    reference: str
    target: str
    result: str  # PASS / FAIL / "—" (no target) / ERROR


class Report:
    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.errors: list[str] = []
        self.notes: list[str] = []

    def row(self, measure: str, ours: str, reference: str, target: str, ok: bool | None) -> None:
        result = "—" if ok is None else ("PASS" if ok else "FAIL")
        self.rows.append(Row(measure, ours, reference, target, result))
        say(f"{result:4}  {measure}: {ours}  (reference: {reference}; target: {target})")

    def error(self, message: str) -> None:
        self.errors.append(message)
        say(f"ERROR {message}")

    def table(self) -> str:
        header = ("measure", "ours", "reference in the same run", "target", "result")
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in self.rows:
            cells = (r.measure, r.ours, r.reference, r.target, r.result)
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- machine


def _run_text(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc.__class__.__name__})"
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else "?"


def machine_facts() -> list[tuple[str, str]]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    packages = []
    for name in ("uvicorn", "starlette", "httpx", "uvloop", "httptools", "anyio", "isal", "rq", "redis"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            packages.append(f"{name} {importlib.metadata.version(name)}")
    head = _run_text(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return [
        ("date", datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")),
        ("command", " ".join([sys.executable, *sys.argv])),
        ("nproc", str(os.cpu_count())),
        ("cpu", cpu),
        ("memory", mem),
        ("kernel", platform.release()),
        ("python", platform.python_version()),
        ("nginx", _run_text([NGINX, "-v"])),
        ("skopeo", _run_text(["skopeo", "--version"])),
        ("curl", _run_text(["curl", "--version"])),
        ("redis", _run_text(["redis-server", "--version"])),
        ("registry", _run_text(["/usr/bin/docker-registry", "--version"])),
        ("server deps", ", ".join(packages)),
        ("load average at start", " ".join(Path("/proc/loadavg").read_text().split()[:3])
         + " (other work on this machine skews every figure; references run interleaved with ours)"),
        ("code", f"git {head}" + (f" + uncommitted changes in {len(dirty.splitlines())} tracked files"
                                  if dirty else "")),
    ]


# ----------------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class GenLayer:
    diff_id: str
    digest: str
    size: int  # compressed
    tar_size: int
    path: Path


@dataclass
class Image:
    repository: str
    tag: str
    layers: list[GenLayer]
    config_digest: str = ""
    manifest_digest: str = ""

    @property
    def filename(self) -> str:
        return self.repository.replace("/", "__") + f"_{self.tag}.tar"

    @property
    def diff_ids(self) -> list[str]:
        return [layer.diff_id for layer in self.layers]

    @property
    def blob_digests(self) -> list[str]:
        return [layer.digest for layer in self.layers] + [self.config_digest]

    @property
    def compressed_size(self) -> int:
        return sum(layer.size for layer in self.layers)


_WORDS = ["the", "of", "and", "to", "in", "is", "for", "on", "with", "as", "by", "at", "from", "this", "that", "be", "are", "or", "an", "was", "it", "not", "which", "layer", "image", "registry", "docker", "switch", "flash", "copy", "http", "tar", "gzip", "config", "manifest", "digest", "blob", "cache", "worker", "server", "client", "stream", "buffer", "socket", "kernel", "module", "library", "binary", "python", "nginx", "redis", "queue", "job", "bytes"]


def _text_block(rng: random.Random) -> bytes:
    """~1 MiB of word salad: gzip shrinks it about 3x, like source code or text files."""
    text = b""
    while len(text) < MiB:
        words = rng.choices(_WORDS, k=12 * 1024)
        text += ("\n".join(" ".join(words[i:i + 12]) for i in range(0, len(words), 12)) + "\n").encode()
    return text[:MiB]


def _tar_header(name: str, size: int, is_dir: bool = False) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = 0 if is_dir else size
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.mode = 0o755 if is_dir else 0o644
    info.mtime = 0
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _file_sizes(payload: int) -> list[int]:
    return [min(8 * MiB, payload - start) for start in range(0, payload, 8 * MiB)]


def build_layer(path: Path, payload: int, seed: int) -> GenLayer:
    """A gzip layer of ``payload`` bytes in 8 MiB files, 3 of 4 random, streamed to ``path``."""
    rng = random.Random(seed)
    text = _text_block(rng)
    tar_hash, blob_hash = hashlib.sha256(), hashlib.sha256()
    compressor = fastz.compressobj(1, fastz.DEFLATED, 31)
    sizes = {"tar": 0, "blob": 0}

    with open(path, "wb") as out:
        def put(data: bytes) -> None:
            tar_hash.update(data)
            sizes["tar"] += len(data)
            packed = compressor.compress(data)
            if packed:
                blob_hash.update(packed)
                sizes["blob"] += len(packed)
                out.write(packed)

        put(_tar_header(f"layer{seed}", 0, is_dir=True))
        left, index = payload, 0
        while left > 0:
            size = min(8 * MiB, left)
            incompressible = index % 4 != 3
            put(_tar_header(f"layer{seed}/{index:05d}.{'bin' if incompressible else 'txt'}", size))
            done = 0
            while done < size:
                n = min(MiB, size - done)
                if incompressible:
                    piece = os.urandom(n)
                else:
                    stamp = f"{seed}:{index}:{done}\n".encode()
                    piece = stamp + text[: n - len(stamp)]
                assert len(piece) == n, (len(piece), n)
                put(piece)
                done += n
            put(bytes(-size % 512))
            left -= size
            index += 1
        put(bytes(1024))
        tail = compressor.flush()
        blob_hash.update(tail)
        sizes["blob"] += len(tail)
        out.write(tail)
    expected = 512 + sum(512 + size + (-size % 512) for size in _file_sizes(payload)) + 1024
    if sizes["tar"] != expected:
        raise AssertionError(f"generated layer tar is {sizes['tar']} bytes, its headers promise {expected}")
    return GenLayer("sha256:" + tar_hash.hexdigest(), "sha256:" + blob_hash.hexdigest(), sizes["blob"],
                    sizes["tar"], path)


def _check(response: httpx.Response, what: str) -> httpx.Response:
    if not response.is_success:
        raise RuntimeError(f"{what}: {response.request.method} {response.request.url} -> "
                           f"{response.status_code} {response.text[:500]}")
    return response


def push_file_blob(client: httpx.Client, base: str, repository: str, layer: GenLayer) -> None:
    """Monolithic upload streamed from the file: POST uploads/, then PUT ?digest= with the body."""
    started = _check(client.post(f"{base}/v2/{repository}/blobs/uploads/"), "start upload")
    url = httpx.URL(base + "/").join(started.headers["Location"]).copy_merge_params({"digest": layer.digest})
    with open(layer.path, "rb") as body:
        _check(client.put(url, content=body, headers={"Content-Type": "application/octet-stream",
                                                       "Content-Length": str(layer.size)}), "upload blob")


def make_image(workdir: Path, registry_url: str, repository: str, tag: str, total_mib: int, seed: int) -> Image:
    """4 layers (fewer for tiny images) adding up to ``total_mib`` MiB uncompressed; pushed, files removed."""
    count = 4 if total_mib >= 16 else 1
    payload = total_mib * MiB // count
    layers = []
    started = time.monotonic()
    for i in range(count):
        layers.append(build_layer(workdir / f"{seed}-{i}.tar.gz", payload, seed * 100 + i))
    built = time.monotonic()
    image = Image(repository, tag, layers)
    with httpx.Client(timeout=httpx.Timeout(600.0, connect=5.0), trust_env=False) as client:
        for layer in layers:
            push_file_blob(client, registry_url, repository, layer)
        config = make_config(layers)  # uses .diff_id only
        image.config_digest = push_blob(registry_url, repository, config)
        manifest = json.dumps({
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": DOCKER_CONFIG, "digest": image.config_digest, "size": len(config)},
            "layers": [{"mediaType": DOCKER_LAYER_GZIP, "digest": lay.digest, "size": lay.size} for lay in layers],
        }, indent=3).encode()
        _check(client.put(f"{registry_url}/v2/{repository}/manifests/{tag}", content=manifest,
                          headers={"Content-Type": DOCKER_MANIFEST}), "put manifest")
        image.manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    for layer in layers:
        layer.path.unlink()
    say(f"image {repository}:{tag}: {count} layers, {mib(sum(x.tar_size for x in layers))} uncompressed, "
        f"{mib(image.compressed_size)} gzip; built in {built - started:.1f}s, pushed in "
        f"{time.monotonic() - built:.1f}s")
    return image


# ----------------------------------------------------------------------------------------------- checks


@dataclass
class Reference:
    """A full download whose layout and layer contents were checked against the generated image."""

    path: Path
    size: int
    sha256: str
    crc32: int


def hash_file(path: Path) -> tuple[str, int, int]:
    sha, crc, size = hashlib.sha256(), 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            sha.update(chunk)
            crc = fastz.crc32(chunk, crc)
            size += len(chunk)
    return sha.hexdigest(), crc, size


def verify_archive(path: Path, image: Image) -> None:
    """The download is a docker-save tar whose layer.tar members are exactly the generated layers."""
    layer_hashes: dict[str, str] = {}
    manifest: Any = None
    with tarfile.open(path, mode="r|") as tar:
        for member in tar:
            if member.name.endswith("/layer.tar"):
                reader = tar.extractfile(member)
                sha = hashlib.sha256()
                while chunk := reader.read(4 * MiB):
                    sha.update(chunk)
                layer_hashes[member.name] = "sha256:" + sha.hexdigest()
            elif member.name == "manifest.json":
                manifest = json.load(tar.extractfile(member))
    if not manifest:
        raise AssertionError(f"{path.name}: no manifest.json")
    entry = manifest[0]
    found = [layer_hashes.get(name) for name in entry["Layers"]]
    if found != image.diff_ids:
        raise AssertionError(f"{path.name}: layer contents {found} != generated {image.diff_ids}")
    if entry["Config"] != image.config_digest.removeprefix("sha256:") + ".json":
        raise AssertionError(f"{path.name}: Config {entry['Config']} != {image.config_digest}")


def make_reference(path: Path, image: Image) -> Reference:
    verify_archive(path, image)
    sha, crc, size = hash_file(path)
    return Reference(path, size, sha, crc)


def prefix_crcs(path: Path, lengths: list[int]) -> dict[int, int]:
    """crc32 of the first n bytes of ``path`` for every n in ``lengths``, in one pass."""
    out: dict[int, int] = {}
    crc, pos = 0, 0
    with open(path, "rb") as f:
        for n in sorted(set(lengths)):
            while pos < n:
                chunk = f.read(min(4 * MiB, n - pos))
                if not chunk:
                    break
                crc = fastz.crc32(chunk, crc)
                pos += len(chunk)
            out[n] = crc
    return out


# ----------------------------------------------------------------------------------------------- processes


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM in bytes."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


class RssSampler:
    """Samples VmRSS of ``pid`` every 50 ms in a thread; ``peak`` is the largest sample."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval = pid, interval
        self.peak = 0
        self.samples = 0
        self.hwm = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"rss-{pid}")

    def _run(self) -> None:
        while not self._stop.is_set():
            status = proc_status(self.pid)
            if "VmRSS" in status:
                self.peak = max(self.peak, status["VmRSS"])
                self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:  # noqa: PYI034
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.hwm = proc_status(self.pid).get("VmHWM", 0)


class Profiler:
    """Optional py-spy recording of a process during a phase (--profile DIR)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")

    @contextlib.contextmanager
    def record(self, name: str, pid: int) -> Iterator[None]:
        if self.directory is None or not os.access(self.binary, os.X_OK):
            yield
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        out = self.directory / f"{name}.txt"
        proc = subprocess.Popen([self.binary, "record", "--pid", str(pid), "--rate", "200", "--format", "raw",
                                 "--idle", "--threads", "-o", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            time.sleep(0.5)
            yield
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            say(f"py-spy profile of {name}: {out}")


class Nginx:
    """nginx with a generated minimal config (sendfile on) serving ``root`` on a free loopback port."""

    def __init__(self, workdir: Path, root: Path) -> None:
        self.prefix = workdir / "nginx"
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        for _attempt in range(3):
            self.port = free_port()
            p = self.prefix
            user = "user root root;\n" if os.geteuid() == 0 else ""
            (p / "nginx.conf").write_text(f"""{user}worker_processes 1;
pid {p}/nginx.pid;
error_log {p}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    client_body_temp_path {p}/client_body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    server {{
        listen 127.0.0.1:{self.port};
        root {root};
        location / {{ }}
    }}
}}
""")
            with open(p / "stdout.log", "ab") as log:
                self.proc = subprocess.Popen([NGINX, "-p", str(p), "-e", str(p / "error.log"), "-c",
                                              str(p / "nginx.conf"), "-g", "daemon off;"],
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5):
                    return
                time.sleep(0.05)
            self.stop()
        raise RuntimeError(f"nginx did not start: {(self.prefix / 'error.log').read_text(errors='replace')[-2000:]}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


# ----------------------------------------------------------------------------------------------- clients


@dataclass
class Curl:
    speed: float  # bytes/s, curl's speed_download
    ttfb: float
    total: float
    size: int


def curl(url: str, out: str = "/dev/null", timeout: float = 600) -> Curl:
    cmd = ["curl", "-s", "-S", "--noproxy", "*", "-o", out, "--max-time", str(int(timeout)), "-w",
           "%{speed_download} %{time_starttransfer} %{time_total} %{http_code} %{size_download}", url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30, check=False)
    fields = done.stdout.split()
    if done.returncode != 0 or len(fields) != 5 or fields[3] != "200":
        raise RuntimeError(f"curl {url} failed: exit {done.returncode}, {done.stdout!r} {done.stderr.strip()!r}")
    return Curl(float(fields[0]), float(fields[1]), float(fields[2]), int(fields[4]))


@dataclass
class Fetch:
    index: int
    status: int = 0
    content_length: int = -1
    received: int = 0
    crc32: int = 0
    sha256: str | None = None
    started: float = 0.0
    headers_at: float = 0.0
    done_at: float = 0.0
    error: str | None = None

    @property
    def time_to_headers(self) -> float:
        return self.headers_at - self.started

    @property
    def total(self) -> float:
        return self.done_at - self.started


async def fetch(index: int, port: int, path: str, *, pace: float | None = None, stop_after: float | None = None,
                want_sha: bool = False, first_byte_only: bool = False, bufsize: int = MiB) -> Fetch:
    """GET over a raw socket: time to headers, crc32 (and sha256) of the body, optionally paced to ``pace`` B/s
    and closed ``stop_after`` seconds after the headers arrived (a slow client giving up is not an error)."""
    loop = asyncio.get_running_loop()
    result = Fetch(index, started=time.monotonic())
    sha = hashlib.sha256() if want_sha else None
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                                       "User-Agent: dhp-bench\r\nConnection: close\r\n\r\n").encode())
        head = bytearray()
        while (end := head.find(b"\r\n\r\n")) < 0:
            data = await loop.sock_recv(sock, 65536)
            if not data:
                raise ConnectionError(f"closed before the headers ended ({bytes(head[:200])!r})")
            if first_byte_only:
                result.headers_at = time.monotonic()
                result.status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
                return result
            head += data
            if len(head) > 65536:
                raise ConnectionError("headers too long")
        result.headers_at = time.monotonic()
        lines = bytes(head[:end]).decode("latin-1").split("\r\n")
        result.status = int(lines[0].split(" ", 2)[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                result.content_length = int(value.strip())
        if result.status != 200 or result.content_length < 0:
            raise ConnectionError(f"status {result.status}, content-length {result.content_length}: "
                                  f"{bytes(head[end + 4:end + 300])!r}")
        body = bytes(head[end + 4:])
        result.crc32 = fastz.crc32(body)
        if sha:
            sha.update(body)
        result.received = len(body)
        buffer = bytearray(bufsize)
        view = memoryview(buffer)
        while result.received < result.content_length:
            want = min(bufsize, result.content_length - result.received)
            if pace is not None:
                elapsed = time.monotonic() - result.headers_at
                if stop_after is not None and elapsed >= stop_after:
                    break
                allowed = int(pace * elapsed) - result.received
                if allowed <= 0:
                    await asyncio.sleep(min(0.1, -allowed / pace + 0.01))
                    continue
                want = min(want, allowed)
            got = await loop.sock_recv_into(sock, view[:want])
            if not got:
                raise ConnectionError(f"closed after {result.received} of {result.content_length} bytes")
            result.crc32 = fastz.crc32(view[:got], result.crc32)
            if sha:
                sha.update(view[:got])
            result.received += got
    except Exception as exc:  # noqa: BLE001 - every failure is reported per client
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.done_at = time.monotonic()
        sock.close()
        if sha:
            result.sha256 = sha.hexdigest()
    return result


async def _fetch_all(count: int, port: int, path: str, timeout: float, sha_every: int, **kwargs: Any) -> list[Fetch]:
    async def one(i: int) -> Fetch:
        want_sha = bool(sha_every) and i % sha_every == 0
        try:
            return await asyncio.wait_for(fetch(i, port, path, want_sha=want_sha, **kwargs), timeout)
        except TimeoutError:
            return Fetch(i, error=f"no answer within {timeout:.0f}s")
    return list(await asyncio.gather(*(one(i) for i in range(count))))


def fetch_all(count: int, port: int, path: str, timeout: float, sha_every: int = 0, **kwargs: Any) -> list[Fetch]:
    """``count`` concurrent GETs on one event loop (uvloop when available, as the server uses); each computes
    the crc32 of its body, every ``sha_every``-th also the sha256."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_fetch_all(count, port, path, timeout, sha_every, **kwargs))


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def log_errors(path: Path, offset: int) -> list[str]:
    """ERROR lines and tracebacks the server logged after ``offset``."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if " ERROR " in line or line.startswith("Traceback")]


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# ----------------------------------------------------------------------------------------------- the run


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
        )
        self.profiler = Profiler(Path(args.profile).resolve() if args.profile else None)
        # PREPARE_GRACE: after this long a cold GET gets its headers (exact Content-Length) and streams layers as
        # they verify. The throttled phase uses 1 s in --quick, so that its small image still takes that path.
        base_grace = args.grace if args.grace is not None else 20.0
        self.grace = args.grace if args.grace is not None else (1.0 if quick else 20.0)
        self.server_env = {"LOG_LEVEL": "info", "REGISTRY_NAME": REGISTRY_NAME, "PREPARE_GRACE": f"{base_grace:g}"}
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
                if not entry.name.isdigit() or int(entry.name) == os.getpid() or _state(int(entry.name)) == "Z":
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
        server = ServerProcess(full, log)
        self.on_cleanup(server.stop)
        return server, cache

    def stop_server(self, server: ServerProcess, cache: Path | None) -> None:
        server.stop()
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)

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
        big = make_image(gen, registry.url, "bench/big", "v1", plan.big_mib, seed=1)
        mid = make_image(gen, registry.url, "bench/mid", "v1", plan.mid_mib, seed=2)

        ref_big = self.phase_single_client(registry.url, big)
        self.phase_throttled(registry.url, big, ref_big)
        self.phase_two_tier(registry.url, mid)

    def phase_single_client(self, registry_url: str, image: Image) -> Reference:
        plan, report = self.plan, self.report
        path = f"/docker/{image.filename}"
        refdir = self.work / "ref"
        refdir.mkdir()
        ref_path = refdir / "big.tar"

        # Cold: skopeo and a fresh embedded server, alternately, straight from the registry.
        policy = self.work / "policy.json"
        policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
        skopeo_env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("REGISTRY_", "DOCKER_"))}
        skopeo_env.update(TMPDIR=str(self.work), HOME=str(self.work / "home"))
        (self.work / "home").mkdir(exist_ok=True)
        skopeo_times: list[float] = []
        ours_cold: list[Curl] = []
        cold_rss: list[RssSampler] = []
        server = cache = None
        for attempt in range(plan.cold_runs):
            out = self.work / "skopeo.tar"
            host = registry_url.removeprefix("http://")
            started = time.monotonic()
            done = subprocess.run(["skopeo", "--policy", str(policy), "copy", "--src-tls-verify=false",
                                   "--src-no-creds", f"docker://{host}/{image.repository}:{image.tag}",
                                   f"docker-archive:{out}"], capture_output=True, text=True, env=skopeo_env,
                                  timeout=900, check=False)
            elapsed = time.monotonic() - started
            if done.returncode != 0:
                raise RuntimeError(f"skopeo copy failed: {done.stderr[-2000:]}")
            skopeo_times.append(elapsed)
            say(f"cold {attempt + 1}/{plan.cold_runs}: skopeo {elapsed:.2f}s ({mib(out.stat().st_size)})")
            out.unlink()

            if server is not None:
                self.stop_server(server, cache)
            server, cache = self.server(f"embedded{attempt}", {"REGISTRY_URL": registry_url})
            target = ref_path if attempt == 0 else self.work / "cold.tar"
            with RssSampler(server.pid) as rss, self.profiler.record(f"cold-{attempt}", server.pid):
                result = curl(server.url + path, str(target))
            cold_rss.append(rss)
            ours_cold.append(result)
            say(f"cold {attempt + 1}/{plan.cold_runs}: ours {result.total:.2f}s (headers after {result.ttfb:.2f}s), "
                f"API peak RSS {mib(rss.peak)}")
            if attempt == 0:
                reference = make_reference(ref_path, image)
                say(f"reference archive: {mib(reference.size)}, sha256 {reference.sha256[:16]}…, layout and "
                    "layer contents verified")
            else:
                sha, _, size = hash_file(target)
                if (sha, size) != (reference.sha256, reference.size):
                    report.error(f"cold download {attempt + 1} differs from the first one")
                target.unlink()
        assert server is not None
        ours_t = statistics.median(r.total for r in ours_cold)
        skopeo_t = statistics.median(skopeo_times)
        n = f"median of {plan.cold_runs}" if plan.cold_runs > 1 else "1 run"
        report.row(f"cold download, {mib(reference.size)} image, nothing cached (embedded)",
                   f"{ours_t:.2f} s ({rate(reference.size / ours_t)}), {n}",
                   f"skopeo copy → docker-archive: {skopeo_t:.2f} s", "≤ 1.0× skopeo's time",
                   ours_t <= skopeo_t)
        cold_peak = max(r.peak for r in cold_rss)
        report.row(f"API peak RSS, cold {mib(reference.size)} download (embedded: preparation in the API process)",
                   f"{mib(cold_peak)} sampled (VmHWM {mib(max(r.hwm for r in cold_rss))})", "—",
                   f"< {RSS_LIMIT_MIB} MiB", cold_peak < RSS_LIMIT_MIB * MiB)

        # Warm: the same server, now cached, against nginx serving the very same bytes with sendfile.
        nginx = Nginx(self.work, refdir)
        self.on_cleanup(nginx.stop)
        ours_warm, nginx_warm = [], []
        with RssSampler(server.pid) as rss, self.profiler.record("warm", server.pid):
            for i in range(plan.runs):
                ours_warm.append(curl(server.url + path))
                nginx_warm.append(curl(f"{nginx.url}/big.tar"))
                say(f"warm {i + 1}/{plan.runs}: ours {rate(ours_warm[-1].speed)}, nginx {rate(nginx_warm[-1].speed)}")
        for r in ours_warm:
            if r.size != reference.size:
                report.error(f"warm download was {r.size} bytes, expected {reference.size}")
        nginx.stop()
        check = self.work / "warm.tar"
        curl(server.url + path, str(check))
        sha, _, size = hash_file(check)
        check.unlink()
        if (sha, size) != (reference.sha256, reference.size):
            report.error("a warm download differs from the reference")
        ours_s = statistics.median(r.speed for r in ours_warm)
        nginx_s = statistics.median(r.speed for r in nginx_warm)
        report.row(f"warm download, {mib(reference.size)} image, one client (curl)",
                   f"{rate(ours_s)} = {ours_s / nginx_s:.2f}× nginx (median of {plan.runs})",
                   f"nginx sendfile, same file: {rate(nginx_s)}", "≥ 0.8× nginx", ours_s >= 0.8 * nginx_s)
        report.row(f"API peak RSS, warm {mib(reference.size)} downloads", f"{mib(rss.peak)} sampled "
                   f"(VmHWM since start {mib(rss.hwm)})", "—", f"< {RSS_LIMIT_MIB} MiB", rss.peak < RSS_LIMIT_MIB * MiB)

        self.phase_slow_clients(server, path, reference)
        self.stop_server(server, cache)
        return reference

    def phase_slow_clients(self, server: ServerProcess, path: str, reference: Reference) -> None:
        plan, report = self.plan, self.report
        n, seconds = plan.slow_clients, plan.slow_seconds
        say(f"slow clients: {n} × {rate(SLOW_RATE)} for {seconds:.0f}s")
        log_offset = log_size(server.log_path)
        cpu_before = cpu_seconds(server.pid)
        started = time.monotonic()
        with RssSampler(server.pid) as rss, self.profiler.record("slow", server.pid):
            results = fetch_all(n, server.port, path, timeout=seconds + 120, pace=SLOW_RATE, stop_after=seconds,
                                bufsize=256 * 1024)
        wall = time.monotonic() - started
        cpu = cpu_seconds(server.pid) - cpu_before
        time.sleep(2)
        rss_after = proc_status(server.pid).get("VmRSS", 0)
        failed = [r for r in results if r.error]
        crcs = prefix_crcs(reference.path, [r.received for r in results if not r.error])
        wrong = [r for r in results if not r.error and crcs.get(r.received) != r.crc32]
        for r in failed[:5]:
            report.error(f"slow client {r.index}: {r.error}")
        if wrong:
            report.error(f"{len(wrong)} slow clients received bytes that differ from the reference")
        errors_logged = log_errors(server.log_path, log_offset)
        ok = [r for r in results if not r.error]
        rates = [r.received / max(r.done_at - r.headers_at, 1e-9) for r in ok]
        headers = [r.time_to_headers for r in ok]
        report.row(f"{n} slow clients at {SLOW_RATE / MB:.1f} MB/s for {seconds:.0f} s (warm, embedded)",
                   f"{len(failed)} failed, {len(wrong)} wrong bytes, {len(errors_logged)} server ERROR lines; "
                   f"per-client rate median {rate(statistics.median(rates)) if rates else '-'} "
                   f"(min {rate(min(rates)) if rates else '-'}); headers p99 {percentile(headers, 99) * 1000:.0f} ms",
                   "—", "no error", not failed and not wrong and not errors_logged)
        report.row(f"API peak RSS, {n} slow clients", f"{mib(rss.peak)} sampled (VmHWM since start {mib(rss.hwm)}; "
                   f"{mib(rss_after)} 2 s after they left)",
                   "—", f"< {RSS_LIMIT_MIB} MiB", rss.peak < RSS_LIMIT_MIB * MiB)
        per_client = cpu / n
        report.row("API CPU per slow client", f"{per_client * 1000:.0f} ms CPU per client over the {wall:.0f} s phase "
                   f"({per_client / wall * 100:.2f}% of a core each; {cpu / wall * 100:.0f}% total)",
                   "—", "(printed)", None)

    def phase_throttled(self, registry_url: str, image: Image, big_ref: Reference) -> None:
        plan, report = self.plan, self.report
        if plan.throttled_mib != plan.big_mib:
            image = make_image(self.work / "gen", registry_url, "bench/throttled", "v1", plan.throttled_mib, 3)
            reference = None
        else:
            reference = big_ref
        proxy = self.proxy(registry_url)
        proxy.throttle_bytes_per_second = THROTTLE_BYTES_PER_SECOND
        server, cache = self.server("throttled", {"REGISTRY_URL": proxy.url, "PREPARE_GRACE": f"{self.grace:g}"})
        path = f"/docker/{image.filename}"
        # The upstream transfer alone, layers taken in order by LAYER_CONCURRENCY (3) slots: a lower bound for
        # the preparation.
        slots = [0.0, 0.0, 0.0]
        for layer in image.layers:
            slots[slots.index(min(slots))] += layer.size / THROTTLE_BYTES_PER_SECOND
        upstream_seconds = max(slots)
        say(f"throttled: {mib(image.compressed_size)} of gzip at {rate(THROTTLE_BYTES_PER_SECOND)} per upstream "
            f"connection: the transfer alone takes ≥ {upstream_seconds:.1f}s with 3 layers at a time")
        expected_seconds = image.compressed_size / THROTTLE_BYTES_PER_SECOND
        with RssSampler(server.pid) as rss, self.profiler.record("throttled", server.pid):
            result = fetch_all(1, server.port, path, timeout=expected_seconds * 2 + 120, sha_every=1)[0]
        proxy.throttle_bytes_per_second = None
        if reference is None and not result.error:
            # Smaller image (--quick): its reference is a second, unthrottled (warm) download, layout-checked.
            ref_path = self.work / "ref" / "throttled.tar"
            curl(server.url + path, str(ref_path))
            reference = make_reference(ref_path, image)
        self.stop_server(server, cache)
        proxy.stop()
        if result.error:
            report.error(f"throttled download: {result.error}")
            report.row("cold image through a throttled registry", "ERROR", "—", "headers ≤ grace", False)
            return
        correct = result.sha256 == reference.sha256 and result.received == reference.size
        if not correct:
            report.error("the throttled download's bytes differ from the reference")
        exact = result.content_length == reference.size
        report.row(f"cold {mib(reference.size)} image, registry throttled to {rate(THROTTLE_BYTES_PER_SECOND)} "
                   "per connection",
                   f"headers after {result.time_to_headers:.1f} s, Content-Length "
                   f"{'exact' if exact else f'{result.content_length} ≠ {reference.size}'}, done after "
                   f"{result.total:.1f} s, bytes {'correct' if correct else 'WRONG'}; API peak RSS {mib(rss.peak)}",
                   f"upstream transfer alone ≥ {upstream_seconds:.1f} s",
                   f"headers ≤ PREPARE_GRACE {self.grace:g} s + {HEADER_SLACK:g} s, exact length, correct bytes",
                   result.time_to_headers <= self.grace + HEADER_SLACK and exact and correct)

    def phase_two_tier(self, registry_url: str, image: Image) -> None:
        plan, report = self.plan, self.report
        proxy = self.proxy(registry_url)
        redis = start_redis(self.work / "redis")
        self.on_cleanup(redis.stop)
        cache = self.work / "cache-two-tier"
        env = {"REDIS_URL": redis.url, "CACHE_DIR": str(cache), "REGISTRY_URL": proxy.url, **self.server_env}
        workers = []
        for i in range(2):
            worker = WorkerProcess(env, self.work / f"worker{i}.log")
            self.on_cleanup(worker.stop)
            workers.append(worker)
        server, _ = self.server("two-tier", env)
        path = f"/docker/{image.filename}"
        n = plan.clients
        say(f"two-tier: {n} concurrent clients, cold {mib(image.compressed_size)} gzip image, 2 workers")
        proxy.reset()
        log_offset = log_size(server.log_path)
        own_cpu = time.process_time()
        api_cpu = cpu_seconds(server.pid)
        with RssSampler(server.pid) as rss, self.profiler.record("two-tier", server.pid):
            results = fetch_all(n, server.port, path, timeout=600, sha_every=10)
        own_cpu = time.process_time() - own_cpu
        api_cpu = cpu_seconds(server.pid) - api_cpu
        blob_gets = {digest: proxy.count("GET", kind="blob", path_contains=digest) for digest in image.blob_digests}
        manifest_heads = proxy.count("HEAD", kind="manifest")
        manifest_gets = proxy.count("GET", kind="manifest")

        ref_path = self.work / "ref" / "mid.tar"
        curl(server.url + path, str(ref_path))
        reference = make_reference(ref_path, image)
        failed = [r for r in results if r.error]
        for r in failed[:5]:
            report.error(f"client {r.index}: {r.error}")
        wrong = [r for r in results if not r.error and ((r.received, r.crc32) != (reference.size, reference.crc32)
                                                        or r.sha256 not in (None, reference.sha256))]
        hashed = sum(r.sha256 is not None for r in results)
        if wrong:
            report.error(f"{len(wrong)} of {n} clients received bytes that differ from the reference")
        errors_logged = log_errors(server.log_path, log_offset)
        ok = [r for r in results if not r.error]
        once = all(count == 1 for count in blob_gets.values())
        report.row(f"{n} concurrent clients, one cold {mib(reference.size)} image, two-tier, 2 workers: upstream",
                   f"blob GETs per blob: {sorted(blob_gets.values())}; manifest HEAD {manifest_heads}, "
                   f"GET {manifest_gets}", "—", "exactly 1 GET per blob", once)
        if ok:
            first = min(r.started for r in results)
            last = max(r.done_at for r in ok)
            first_headers = min(r.headers_at for r in ok)
            total = sum(r.received for r in ok)
            aggregate = total / (last - first)
            streaming = total / (last - first_headers)
            times = [r.total for r in ok]
            heads = [r.time_to_headers for r in ok]
            report.row(f"{n} concurrent clients, cold {mib(reference.size)}: throughput",
                       f"{rate(aggregate)} over the whole run ({last - first:.1f} s), {rate(streaming)} once "
                       f"headers were sent (after {first_headers - first:.1f} s); {len(failed)} failed, "
                       f"{len(wrong)} wrong (all crc32-checked, {hashed} also sha256), "
                       f"{len(errors_logged)} server ERROR lines; CPU: API {api_cpu:.1f} s, "
                       f"benchmark clients {own_cpu:.1f} s",
                       "—", "≥ 1 GB/s aggregate", aggregate >= 1e9 and not failed and not wrong)
            report.row(f"{n} concurrent clients, cold {mib(reference.size)}: completion time",
                       f"p50 {percentile(times, 50):.1f} s, p99 {percentile(times, 99):.1f} s, max "
                       f"{max(times):.1f} s (headers: p50 {percentile(heads, 50):.1f} s, p99 "
                       f"{percentile(heads, 99):.1f} s)", "—", "(printed)", None)
        report.row(f"API peak RSS, {n} concurrent clients (two-tier)",
                   f"{mib(rss.peak)} sampled (VmHWM since start {mib(rss.hwm)})", "—", f"< {RSS_LIMIT_MIB} MiB",
                   rss.peak < RSS_LIMIT_MIB * MiB)

        # Warm time to first byte, and what it costs upstream.
        proxy.reset()
        ttfbs = []
        for i in range(TTFB_REQUESTS):
            r = fetch_all(1, server.port, path, timeout=30, first_byte_only=True)[0]
            if r.error or r.status != 200:
                report.error(f"warm TTFB request {i}: status {r.status} {r.error or ''}")
            ttfbs.append(r.time_to_headers)
        time.sleep(0.2)
        heads = proxy.count("HEAD", kind="manifest")
        others = len(proxy.requests) - heads
        median = statistics.median(ttfbs)
        report.row(f"warm time to first byte (two-tier, {TTFB_REQUESTS} sequential requests)",
                   f"median {median * 1000:.1f} ms (p90 {percentile(ttfbs, 90) * 1000:.1f} ms); upstream: "
                   f"{heads / TTFB_REQUESTS:.2f} manifest HEAD per request, {others} other requests",
                   "—", "< 50 ms, one manifest HEAD upstream",
                   median < 0.050 and heads == TTFB_REQUESTS and others == 0)
        server.stop()
        for worker in workers:
            worker.stop()
        redis.stop()
        proxy.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=None, help="size of the big image (default 1024; 128 quick)")
    parser.add_argument("--quick", action="store_true", help="small images, fewer clients, ~1-2 minutes")
    parser.add_argument("--runs", type=int, help="warm single-client repetitions (default 5; 2 quick)")
    parser.add_argument("--cold-runs", type=int, help="cold repetitions, each side (default 3; 1 quick)")
    parser.add_argument("--clients", type=int, help="concurrent clients in the two-tier run (default 100; 20 quick)")
    parser.add_argument("--slow-clients", type=int, help="slow clients (default 200; 50 quick)")
    parser.add_argument("--slow-seconds", type=float, help="slow-client phase length (default 60; 10 quick)")
    parser.add_argument("--time-limit", type=float, help="give up after this many seconds (default 2400; 600 quick)")
    parser.add_argument("--profile", metavar="DIR", help="record py-spy profiles of the API (if py-spy is installed)")
    parser.add_argument("--grace", type=float, help="PREPARE_GRACE for the servers (default 20; 1 quick)")
    parser.add_argument("--server-env", action="append", metavar="KEY=VALUE",
                        help="extra environment for the servers and workers (experiments, e.g. MALLOC_ARENA_MAX=2)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs) for inspection")
    args = parser.parse_args()
    if args.size_mib is not None and args.size_mib < 4:
        parser.error("--size-mib must be at least 4")

    for tool in ("curl", "skopeo", NGINX, "redis-server", "/usr/bin/docker-registry"):
        if not shutil.which(tool):
            print(f"bench: {tool} is missing", file=sys.stderr)
            return 1

    report = Report()
    say("machine:")
    facts = machine_facts()
    for key, value in facts:
        say(f"  {key}: {value}")

    workdir = Path(tempfile.mkdtemp(prefix="dhp-bench-"))
    bench = Bench(args, workdir, report)
    limit = args.time_limit or (600.0 if args.quick else 2400.0)
    timed_out = threading.Event()

    def expire() -> None:
        timed_out.set()
        _thread.interrupt_main()  # KeyboardInterrupt in the main thread, which then cleans up

    watchdog = threading.Timer(limit, expire)
    watchdog.daemon = True
    watchdog.start()

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    status = 0
    started = time.monotonic()
    try:
        bench.run()
    except KeyboardInterrupt:
        status = 3 if timed_out.is_set() else 130
        say("time limit reached, stopping" if timed_out.is_set() else "interrupted, stopping")
    except Exception as exc:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        report.error(f"{type(exc).__name__}: {exc}")
        status = 1
    finally:
        watchdog.cancel()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bench.cleanup()
        if args.keep:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    print()
    print(f"docker-http-passthrough benchmark, {'--quick' if args.quick else 'full'} run, "
          f"{time.monotonic() - started:.0f} s")
    for key, value in facts:
        print(f"- {key}: {value}")
    print(f"- load average at end: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    print()
    print(report.table())
    if report.errors:
        print()
        print("ERRORS:")
        for error in report.errors:
            print(f"- {error}")
        status = status or 1
    passed = sum(r.result == "PASS" for r in report.rows)
    failed = sum(r.result == "FAIL" for r in report.rows)
    print()
    print(f"{passed} targets met, {failed} missed; {len(report.errors)} errors")
    return status


if __name__ == "__main__":
    sys.exit(main())
