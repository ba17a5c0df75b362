"""The report: progress lines, the table of figures beside their references and targets, and the machine facts."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
MB = 1_000_000
GB = 1_000_000_000
NGINX = "/usr/sbin/nginx"
RSS_LIMIT_MIB = 200  # the target of every "API peak RSS" row


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
        ("command", " ".join([sys.executable, "-m", "bench", *sys.argv[1:]])),
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

