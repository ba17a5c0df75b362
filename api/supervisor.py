"""`serve --workers N`: N API processes on one port, every one serving downloads, and a parent that keeps them.

- Each process listens on a socket of its own, all bound to the same address with SO_REUSEPORT, so the kernel
  spreads new connections evenly over them (one shared socket lets whichever process wakes first take a whole
  burst of a fleet). The parent holds every socket, so a process that dies leaves its queue of not-yet-accepted
  connections to its replacement, never to a refusal.
- Metrics: the parent sets PROMETHEUS_MULTIPROC_DIR to a fresh directory before any process imports
  prometheus_client; /metrics in any process adds every process's values up (shared.metrics), and the parent
  marks each process that exits as dead, so "live" gauges drop its values. The directory goes when the parent
  exits.
- Per process: the connection limits (api.connections), the request limits (api.limits), the error cache and the
  coalescing of requests that wait for the same preparation. Once for all, in the parent: the file-descriptor
  limit (children inherit it) and the sweep of partial files.
- Shutdown: SIGTERM or SIGINT to the parent stops every process gracefully (running downloads finish); a second
  one stops them at once. A process that dies is started again, unless it failed to start (then all stop).
  Each child gets SIGTERM should the parent itself be killed.
Each API process is `docker-http-passthrough serve --socket-fd N`: a fresh interpreter (nothing forked from a
parent with threads or a loop) that reads the same settings from the environment it inherits.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


log = logging.getLogger("docker_http_passthrough.api")

METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
SUPERVISOR_ENV = "DHP_SUPERVISOR_PID"  # tells an API process which parent to die with
STARTUP_FAILURE = 3  # uvicorn's exit status when the app's startup failed: restarting would fail the same way
# A process that dies sooner than this after its start is restarted only after this long (no restart storm).
RESTART_PAUSE = 1.0
WATCH_EVERY = 0.2
PR_SET_PDEATHSIG = 1


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (a container's CPU limit),
    rounded up."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota()
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> float | None:
    """The tightest CPU quota (in CPUs) on this process's cgroup and its ancestors, cgroup v2 or v1; None: none."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: "0::/path"
            quotas += _quotas(root, path, ("cpu.max",))
        elif "cpu" in controllers.split(","):
            quotas += _quotas(root / controllers, path, ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
            quotas += _quotas(root / "cpu", path, ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
    return min(quotas) if quotas else None


def _quotas(base: Path, path: str, files: tuple[str, ...]) -> list[float]:
    """Quotas found from `base/path` up to `base` (a container sees its own cgroup as the root)."""
    found = []
    parts = [p for p in path.strip("/").split("/") if p]
    for depth in range(len(parts), -1, -1):
        directory = base.joinpath(*parts[:depth])
        try:
            if len(files) == 1:
                limit, period = (directory / files[0]).read_text().split()[:2]
            else:
                limit, period = ((directory / name).read_text().strip() for name in files)
        except (OSError, ValueError):
            continue
        if limit not in ("max", "-1") and float(period) > 0:
            found.append(float(limit) / float(period))
    return found


def bind_reuseport(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) that other sockets of this user may bind too (the kernel balances them)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def fresh_metrics_dir() -> str:
    """A new directory for this start's metric files, inside PROMETHEUS_MULTIPROC_DIR when the operator set one
    (e.g. a writable volume under a read-only root), else in the temp directory; exported for every child."""
    parent = os.environ.get(METRICS_ENV) or None
    if parent:
        os.makedirs(parent, exist_ok=True)
    path = tempfile.mkdtemp(prefix="dhp-metrics-", dir=parent)
    os.environ[METRICS_ENV] = path
    return path


def die_with_parent() -> None:
    """SIGTERM this process when its supervisor dies (Linux), so no API process outlives a killed supervisor."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if str(os.getppid()) != os.environ.get(SUPERVISOR_ENV):  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class _Slot:
    """One of the N places: its socket, and the process serving it now."""

    sock: socket.socket
    process: subprocess.Popen | None = None
    started: float = 0.0
    restart_at: float | None = None


class Supervisor:
    """Starts one `command + [fd]` process per socket (the socket's descriptor passed to it) and keeps them until
    told to stop; returns the exit status for the parent."""

    def __init__(self, command: list[str], sockets: list[socket.socket], metrics_dir: str):
        self.command = command
        self.slots = [_Slot(sock) for sock in sockets]
        self.metrics_dir = metrics_dir
        self.stopping = 0  # signals received

    def _start(self, slot: _Slot) -> None:
        fd = slot.sock.fileno()
        slot.process = subprocess.Popen([*self.command, str(fd)], pass_fds=(fd,), stdin=subprocess.DEVNULL)
        slot.started, slot.restart_at = time.monotonic(), None

    def _signal(self, signum: int, frame: Any) -> None:
        self.stopping += 1
        # First signal: every process finishes its running downloads, then exits. Second: at once.
        log.info("received %s: stopping %d API processes%s", signal.Signals(signum).name, len(self.slots),
                 "" if self.stopping == 1 else " now")
        for slot in self.slots:
            if slot.process is not None and slot.process.poll() is None:
                for forward in (signal.SIGTERM,) if self.stopping == 1 else (signal.SIGINT, signal.SIGINT):
                    slot.process.send_signal(forward)  # uvicorn quits at once on a second SIGINT

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._signal)
        os.environ[SUPERVISOR_ENV] = str(os.getpid())
        for slot in self.slots:
            self._start(slot)
        log.info("serving with %d API processes (pids %s); /metrics of any shows them all (metrics directory %s)",
                 len(self.slots), " ".join(str(slot.process.pid) for slot in self.slots if slot.process),
                 self.metrics_dir)
        status = 0
        while any(slot.process is not None or (slot.restart_at is not None and not self.stopping)
                  for slot in self.slots):
            time.sleep(WATCH_EVERY)
            for slot in self.slots:
                if slot.process is not None and slot.process.poll() is not None:
                    status = max(status, self._ended(slot))
            self._restart_due()
        self._cleanup()
        return status

    def _ended(self, slot: _Slot) -> int:
        process = slot.process
        assert process is not None
        slot.process = None
        self._mark_dead(process.pid)
        if self.stopping:
            return 0
        if process.returncode == STARTUP_FAILURE:
            log.error("API process %d failed to start: stopping all of them", process.pid)
            self._signal(signal.SIGTERM, None)
            return 1
        quick = time.monotonic() - slot.started < RESTART_PAUSE
        log.warning("API process %d exited with status %s; starting another%s", process.pid, process.returncode,
                    f" in {RESTART_PAUSE:g} s" if quick else "")
        slot.restart_at = time.monotonic() + (RESTART_PAUSE if quick else 0.0)
        return 0

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.process is None and slot.restart_at is not None and now >= slot.restart_at and not self.stopping:
                self._start(slot)

    def _mark_dead(self, pid: int) -> None:
        from prometheus_client import multiprocess  # after METRICS_ENV is set, like every import of it here

        try:
            multiprocess.mark_process_dead(pid, self.metrics_dir)
        except OSError:
            pass

    def _cleanup(self) -> None:
        for slot in self.slots:
            slot.sock.close()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
