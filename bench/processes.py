"""What the server does during a phase: its memory (VmRSS sampled, VmHWM; with several processes the sum over the
process tree, and PSS), its CPU time (the whole tree), a py-spy profile on request, and the ERROR lines it logged."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from bench.report import say



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


def tree_pids(root: int) -> list[int]:
    """``root`` and every process below it (a server's worker processes, nginx's workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, queue = [], [root]
    while queue:
        pid = queue.pop()
        found.append(pid)
        queue.extend(children.get(pid, ()))
    return found


def tree_cpu_seconds(root: int) -> float:
    """utime + stime of ``root`` and its live descendants (a worker process replaced meanwhile would be missed: none
    is, while a phase runs)."""
    total = 0.0
    for pid in tree_pids(root):
        with contextlib.suppress(OSError, IndexError):
            total += cpu_seconds(pid)
    return total


def tree_memory(pids: list[int]) -> tuple[int, int]:
    """(sum of VmRSS, sum of PSS) in bytes over ``pids`` (a process tree). PSS shares pages that several processes
    map (the interpreter, libraries) among them, so its sum is the memory the tree really holds."""
    rss = pss = 0
    for pid in pids:
        rss += proc_status(pid).get("VmRSS", 0)
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                    break
    return rss, pss


def process_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


class RssSampler:
    """Samples the memory of ``pid`` and its descendants every 50 ms in a thread: ``peak`` is the largest sum of
    VmRSS, ``peak_pss`` the largest sum of PSS."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval = pid, interval
        self.peak = 0
        self.peak_pss = 0
        self.samples = 0
        self.hwm = 0
        self.processes = 0  # the most processes sampled at once
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"rss-{pid}")

    def _run(self) -> None:
        pids: list[int] = []
        rounds = 0
        while not self._stop.is_set():
            if rounds % 40 == 0:  # the tree again every 2 s or so: reading all of /proc costs CPU
                pids = tree_pids(self.pid)
                self.processes = max(self.processes, len(pids))
            rounds += 1
            rss, pss = tree_memory(pids)
            if rss:
                self.peak = max(self.peak, rss)
                self.peak_pss = max(self.peak_pss, pss)
                self.samples += 1
            self._stop.wait(self.interval)

    @property
    def peak_memory(self) -> int:
        """What a target is judged on: the PSS sum where the kernel tells it, else the RSS sum."""
        return self.peak_pss or self.peak

    def describe(self) -> str:
        return (f"peak PSS {self.peak_pss / (1 << 20):.1f} MiB (RSS {self.peak / (1 << 20):.1f} MiB) "
                f"over {self.processes} processes")

    def __enter__(self) -> RssSampler:  # noqa: PYI034
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.hwm = sum(proc_status(pid).get("VmHWM", 0) for pid in tree_pids(self.pid))


class Profiler:
    """Optional py-spy recording of a process and its children during a phase (--profile DIR): where they spend
    CPU (on-CPU samples only, native frames included)."""

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
                                 "--native", "--threads", "--subprocesses", "-o", str(out)],
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

