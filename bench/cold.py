"""Cold downloads, nothing cached: one client against skopeo's time for the same image, and the same image
through a throttled registry, where the response must start after PREPARE_GRACE with the exact length."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from bench.checks import Reference, hash_file, make_reference
from bench.clients import Curl, curl, fetch_all
from bench.images import Image, make_image
from bench.processes import RssSampler
from bench.references import Skopeo
from bench.report import MB, RSS_LIMIT_MIB, MiB, mib, rate, say
from tests.support.services import ServerProcess

if TYPE_CHECKING:
    from bench.harness import Bench

THROTTLE_BYTES_PER_SECOND = 20 * MB
# The server starts a still-preparing response when PREPARE_GRACE runs out, counted from after it resolved the
# tag; headers "within the grace period" therefore means within it plus this much (resolving, planning, loopback).
HEADER_SLACK = 1.0


def single_client(bench: Bench, registry_url: str, image: Image,
                  report: bool = True) -> tuple[ServerProcess, Path, Reference]:
    """skopeo and a fresh embedded server, alternately, straight from the registry. Returns the last server (its
    cache now holds the image) and the reference archive: the first download, layout and layers verified.
    Without ``report`` (only the warm phases wanted): one download of ours, no skopeo, no rows."""
    plan, table = bench.plan, bench.report
    refdir = bench.work / "ref"
    refdir.mkdir(exist_ok=True)
    skopeo = Skopeo(bench.work)
    skopeo_times: list[float] = []
    ours: list[tuple[Curl, RssSampler]] = []
    server = cache = reference = None
    for attempt in range(plan.cold_runs if report else 1):
        if report:
            out = bench.work / "skopeo.tar"
            skopeo_times.append(skopeo.copy(registry_url, f"{image.repository}:{image.tag}", out))
            say(f"cold {attempt + 1}/{plan.cold_runs}: skopeo {skopeo_times[-1]:.2f}s ({mib(out.stat().st_size)})")
            out.unlink()

        if server is not None:
            bench.stop_server(server, cache)
        server, cache = bench.server(f"embedded{attempt}", {"REGISTRY_URL": registry_url})
        target = refdir / "big.tar" if attempt == 0 else bench.work / "cold.tar"
        ours.append(_download(bench, server, image, target, attempt))
        if reference is None:
            reference = make_reference(target, image)
            say(f"reference archive: {mib(reference.size)}, sha256 {reference.sha256[:16]}…, layout and "
                "layer contents verified")
        else:
            sha, _, size = hash_file(target)
            if (sha, size) != (reference.sha256, reference.size):
                table.error(f"cold download {attempt + 1} differs from the first one")
            target.unlink()
    assert server is not None and cache is not None and reference is not None
    if report:
        _report(bench, reference, [result for result, _ in ours], skopeo_times, [rss for _, rss in ours])
    return server, cache, reference


def warm_reference(bench: Bench, server: ServerProcess, image: Image, name: str) -> Reference:
    """Prepare ``image`` on ``server`` with one download, kept in the reference directory (nginx serves it from
    there) after its layout and layers are checked."""
    target = bench.work / "ref" / name
    curl(f"{server.url}/docker/{image.filename}", str(target))
    return make_reference(target, image)


def _download(bench: Bench, server: ServerProcess, image: Image, target: Path, attempt: int) -> tuple[Curl, RssSampler]:
    with RssSampler(server.pid) as rss, bench.profiler.record(f"cold-{attempt}", server.pid):
        result = curl(f"{server.url}/docker/{image.filename}", str(target))
    say(f"cold {attempt + 1}/{bench.plan.cold_runs}: ours {result.total:.2f}s (headers after {result.ttfb:.2f}s), "
        f"API {rss.describe()}")
    return result, rss


def _report(bench: Bench, reference: Reference, ours: list[Curl], skopeo_times: list[float],
            rss: list[RssSampler]) -> None:
    runs = bench.plan.cold_runs
    ours_t = statistics.median(r.total for r in ours)
    skopeo_t = statistics.median(skopeo_times)
    n = f"median of {runs}" if runs > 1 else "1 run"
    bench.report.row(f"cold download, {mib(reference.size)} image, nothing cached (embedded)",
                     f"{ours_t:.2f} s ({rate(reference.size / ours_t)}), {n}",
                     f"skopeo copy → docker-archive: {skopeo_t:.2f} s", "≤ 1.0× skopeo's time",
                     ours_t <= skopeo_t)
    cold_peak = max(rss, key=lambda r: r.peak_memory)
    bench.report.row(f"API memory, cold {mib(reference.size)} download (embedded: preparation in the API process)",
                     cold_peak.describe(), "—", f"< {RSS_LIMIT_MIB} MiB", cold_peak.peak_memory < RSS_LIMIT_MIB * MiB)


def throttled(bench: Bench, registry_url: str, image: Image, big_ref: Reference | None) -> None:
    """A cold image through a registry paced to 20 MB/s per connection: headers after PREPARE_GRACE with the exact
    Content-Length, layers streamed as they verify, every byte right."""
    plan = bench.plan
    reference: Reference | None = big_ref
    if plan.throttled_mib != plan.big_mib:
        image = make_image(bench.work / "gen", registry_url, "bench/throttled", "v1", plan.throttled_mib, 3)
        reference = None
    proxy = bench.proxy(registry_url)
    proxy.throttle_bytes_per_second = THROTTLE_BYTES_PER_SECOND
    server, cache = bench.server("throttled", {"REGISTRY_URL": proxy.url, "PREPARE_GRACE": f"{bench.grace:g}"})
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
    with RssSampler(server.pid) as rss, bench.profiler.record("throttled", server.pid):
        result = fetch_all(1, server.port, path, timeout=expected_seconds * 2 + 120, sha_every=1)[0]
    proxy.throttle_bytes_per_second = None
    if reference is None and not result.error:
        # Smaller image (--quick): its reference is a second, unthrottled (warm) download, layout-checked.
        ref_path = bench.work / "ref" / "throttled.tar"
        curl(server.url + path, str(ref_path))
        reference = make_reference(ref_path, image)
    bench.stop_server(server, cache)
    proxy.stop()
    if result.error or reference is None:
        bench.report.error(f"throttled download: {result.error}")
        bench.report.row("cold image through a throttled registry", "ERROR", "—", "headers ≤ grace", False)
        return
    correct = result.sha256 == reference.sha256 and result.received == reference.size
    if not correct:
        bench.report.error("the throttled download's bytes differ from the reference")
    exact = result.content_length == reference.size
    bench.report.row(
        f"cold {mib(reference.size)} image, registry throttled to {rate(THROTTLE_BYTES_PER_SECOND)} per connection",
        f"headers after {result.time_to_headers:.1f} s, Content-Length "
        f"{'exact' if exact else f'{result.content_length} ≠ {reference.size}'}, done after "
        f"{result.total:.1f} s, bytes {'correct' if correct else 'WRONG'}; API {rss.describe()}",
        f"upstream transfer alone ≥ {upstream_seconds:.1f} s",
        f"headers ≤ PREPARE_GRACE {bench.grace:g} s + {HEADER_SLACK:g} s, exact length, correct bytes",
        result.time_to_headers <= bench.grace + HEADER_SLACK and exact and correct)
