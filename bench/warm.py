"""Warm downloads: the image cached, one client (curl) against nginx serving the very same bytes with sendfile
(worker_processes auto)."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

from bench.checks import Reference, hash_file
from bench.clients import curl
from bench.images import Image
from bench.processes import RssSampler
from bench.references import Nginx
from bench.report import RSS_LIMIT_MIB, MiB, mib, rate, say
from tests.support.services import ServerProcess

if TYPE_CHECKING:
    from bench.harness import Bench


def single_client(bench: Bench, server: ServerProcess, image: Image, reference: Reference) -> None:
    """Ours and nginx in turn, ``--runs`` times each; then one more download of ours, compared with the reference."""
    plan, report = bench.plan, bench.report
    url = f"{server.url}/docker/{image.filename}"
    nginx = Nginx(bench.work, reference.path.parent)
    bench.on_cleanup(nginx.stop)
    ours_warm, nginx_warm = [], []
    with RssSampler(server.pid) as rss, bench.profiler.record("warm", server.pid):
        for i in range(plan.runs):
            ours_warm.append(curl(url))
            nginx_warm.append(curl(f"{nginx.url}/{reference.path.name}"))
            say(f"warm {i + 1}/{plan.runs}: ours {rate(ours_warm[-1].speed)}, nginx {rate(nginx_warm[-1].speed)}")
    for r in ours_warm:
        if r.size != reference.size:
            report.error(f"warm download was {r.size} bytes, expected {reference.size}")
    nginx.stop()
    check = bench.work / "warm.tar"
    curl(url, str(check))
    sha, _, size = hash_file(check)
    check.unlink()
    if (sha, size) != (reference.sha256, reference.size):
        report.error("a warm download differs from the reference")
    ours_s = statistics.median(r.speed for r in ours_warm)
    nginx_s = statistics.median(r.speed for r in nginx_warm)
    report.row(f"warm download, {mib(reference.size)} image, one client (curl)",
               f"{rate(ours_s)} = {ours_s / nginx_s:.2f}× nginx (median of {plan.runs})",
               f"nginx sendfile, same file: {rate(nginx_s)}", "≥ 1.0× nginx", ours_s >= nginx_s)
    report.row(f"API memory, warm {mib(reference.size)} downloads", rss.describe(), "—", f"< {RSS_LIMIT_MIB} MiB",
               rss.peak_memory < RSS_LIMIT_MIB * MiB)
