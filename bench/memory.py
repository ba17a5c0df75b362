"""Memory under a fleet of slow switches: many clients reading a warm image at a Catalyst's copy speed, each
checked against the reference, with the memory of all API processes sampled throughout and their CPU time per
client."""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING

from bench.checks import Reference, prefix_crcs
from bench.clients import fetch_all, percentile
from bench.images import Image
from bench.processes import RssSampler, log_errors, log_size, tree_cpu_seconds, tree_memory, tree_pids
from bench.report import MB, RSS_LIMIT_MIB, MiB, mib, rate, say
from tests.support.services import ServerProcess

if TYPE_CHECKING:
    from bench.harness import Bench

SLOW_RATE = 1.5 * MB  # a Catalyst 9300's `copy http:` speed


def slow_clients(bench: Bench, server: ServerProcess, image: Image, reference: Reference) -> None:
    """``--slow-clients`` clients paced to SLOW_RATE for ``--slow-seconds``, then they hang up."""
    plan, report = bench.plan, bench.report
    path = f"/docker/{image.filename}"
    n, seconds = plan.slow_clients, plan.slow_seconds
    say(f"slow clients: {n} × {rate(SLOW_RATE)} for {seconds:.0f}s")
    log_offset = log_size(server.log_path)
    cpu_before = tree_cpu_seconds(server.pid)
    started = time.monotonic()
    with RssSampler(server.pid) as rss, bench.profiler.record("slow", server.pid):
        results = fetch_all(n, server.port, path, timeout=seconds + 120, pace=SLOW_RATE, stop_after=seconds,
                            bufsize=256 * 1024)
    wall = time.monotonic() - started
    cpu = tree_cpu_seconds(server.pid) - cpu_before
    time.sleep(2)
    _, pss_after = tree_memory(tree_pids(server.pid))
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
    report.row(f"API memory, {n} slow clients", f"{rss.describe()}; PSS {mib(pss_after)} 2 s after they left",
               "—", f"< {RSS_LIMIT_MIB} MiB", rss.peak_memory < RSS_LIMIT_MIB * MiB)
    per_client = cpu / n
    report.row("API CPU per slow client", f"{per_client * 1000:.0f} ms CPU per client over the {wall:.0f} s phase "
               f"({per_client / wall * 100:.2f}% of a core each; {cpu / wall * 100:.0f}% total)",
               "—", "(printed)", None)

