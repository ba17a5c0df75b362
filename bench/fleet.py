"""A fleet, two-tier: many clients at once on one cold image (2 RQ workers, one preparation, one GET per blob
upstream), then the warm time to first byte and what it costs the registry."""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING

from bench.checks import Reference, make_reference
from bench.clients import Fetch, curl, fetch_all, percentile
from bench.images import Image
from bench.processes import RssSampler, log_errors, log_size, tree_cpu_seconds
from bench.report import RSS_LIMIT_MIB, MiB, mib, rate, say
from tests.support.proxy import CountingProxy
from tests.support.services import ServerProcess

if TYPE_CHECKING:
    from bench.harness import Bench

TTFB_REQUESTS = 20


def two_tier(bench: Bench, registry_url: str, image: Image) -> None:
    proxy = bench.proxy(registry_url)
    deployment = bench.two_tier("two-tier", proxy.url)
    cold_clients(bench, deployment.server, proxy, image)
    warm_time_to_first_byte(bench, deployment.server, proxy, image)
    deployment.stop()
    proxy.stop()


def cold_clients(bench: Bench, server: ServerProcess, proxy: CountingProxy, image: Image) -> None:
    """``--clients`` clients at once on the cold image; the reference is a download made after them."""
    n = bench.plan.clients
    path = f"/docker/{image.filename}"
    say(f"two-tier: {n} concurrent clients, cold {mib(image.compressed_size)} gzip image, 2 workers")
    proxy.reset()
    log_offset = log_size(server.log_path)
    own_cpu = time.process_time()
    api_cpu = tree_cpu_seconds(server.pid)
    with RssSampler(server.pid) as rss, bench.profiler.record("two-tier", server.pid):
        results = fetch_all(n, server.port, path, timeout=600, sha_every=10)
    own_cpu = time.process_time() - own_cpu
    api_cpu = tree_cpu_seconds(server.pid) - api_cpu
    # Whole blobs (200), apart from the early-start size probes: ranged reads of a blob's last 64 KiB (206).
    blob_gets = {digest: proxy.count("GET", kind="blob", path_contains=digest, status=200)
                 for digest in image.blob_digests}
    probes = sum(proxy.count("GET", kind="blob", path_contains=digest, status=206) for digest in image.blob_digests)
    upstream = (f"whole-blob GETs per blob: {sorted(blob_gets.values())}, size probes (64 KiB ranges): {probes}; "
                f"manifest HEAD {proxy.count('HEAD', kind='manifest')}, GET {proxy.count('GET', kind='manifest')}",
                all(count == 1 for count in blob_gets.values()))

    ref_path = bench.work / "ref" / "mid.tar"
    curl(server.url + path, str(ref_path))
    reference = make_reference(ref_path, image)
    errors_logged = len(log_errors(server.log_path, log_offset))
    _report(bench, results, reference, upstream, errors_logged,
            f"CPU: API {api_cpu:.1f} s, benchmark clients {own_cpu:.1f} s")
    bench.report.row(f"API memory, {n} concurrent clients (two-tier)", rss.describe(), "—", f"< {RSS_LIMIT_MIB} MiB",
                     rss.peak_memory < RSS_LIMIT_MIB * MiB)


def _report(bench: Bench, results: list[Fetch], reference: Reference, upstream: tuple[str, bool], errors_logged: int,
            cpu: str) -> None:
    n, report = len(results), bench.report
    failed = [r for r in results if r.error]
    for r in failed[:5]:
        report.error(f"client {r.index}: {r.error}")
    wrong = [r for r in results if not r.error and ((r.received, r.crc32) != (reference.size, reference.crc32)
                                                    or r.sha256 not in (None, reference.sha256))]
    hashed = sum(r.sha256 is not None for r in results)
    if wrong:
        report.error(f"{len(wrong)} of {n} clients received bytes that differ from the reference")
    report.row(f"{n} concurrent clients, one cold {mib(reference.size)} image, two-tier, 2 workers: upstream",
               upstream[0], "—", "exactly 1 whole-blob GET per blob", upstream[1])
    ok = [r for r in results if not r.error]
    if not ok:
        return
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
               f"{errors_logged} server ERROR lines; {cpu}",
               "—", "≥ 1 GB/s aggregate", aggregate >= 1e9 and not failed and not wrong)
    report.row(f"{n} concurrent clients, cold {mib(reference.size)}: completion time",
               f"p50 {percentile(times, 50):.1f} s, p99 {percentile(times, 99):.1f} s, max "
               f"{max(times):.1f} s (headers: p50 {percentile(heads, 50):.1f} s, p99 "
               f"{percentile(heads, 99):.1f} s)", "—", "(printed)", None)


def warm_time_to_first_byte(bench: Bench, server: ServerProcess, proxy: CountingProxy, image: Image) -> None:
    """Sequential requests for the prepared image: time to the first response byte, and the upstream requests."""
    proxy.reset()
    ttfbs = []
    for i in range(TTFB_REQUESTS):
        r = fetch_all(1, server.port, f"/docker/{image.filename}", timeout=30, first_byte_only=True)[0]
        if r.error or r.status != 200:
            bench.report.error(f"warm TTFB request {i}: status {r.status} {r.error or ''}")
        ttfbs.append(r.time_to_headers)
    time.sleep(0.2)
    heads = proxy.count("HEAD", kind="manifest")
    others = len(proxy.requests) - heads
    median = statistics.median(ttfbs)
    bench.report.row(f"warm time to first byte (two-tier, {TTFB_REQUESTS} sequential requests)",
                     f"median {median * 1000:.1f} ms (p90 {percentile(ttfbs, 90) * 1000:.1f} ms); upstream: "
                     f"{heads / TTFB_REQUESTS:.2f} manifest HEAD per request, {others} other requests",
                     "—", "< 50 ms, one manifest HEAD upstream",
                     median < 0.050 and heads == TTFB_REQUESTS and others == 0)
