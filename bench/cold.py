"""Cold downloads, nothing cached: one client against skopeo's time for the same image (embedded, and two-tier),
and the same image through a throttled registry, where the response must start at once and never pause long."""

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
# Targets (issue 12 item 4): time to the last byte against skopeo's docker-archive copy of the same image.
EMBEDDED_RATIO = 0.6
TWO_TIER_RATIO = 0.8
FIRST_BYTE_SECONDS = 2.0
LARGEST_GAP_SECONDS = 5.0


def _skopeo_then_ours(bench: Bench, skopeo: Skopeo, registry_url: str, image: Image, attempt: int,
                      download) -> float:
    """One round: skopeo's time, then ours (`download(attempt)`), alternately so load hits both alike."""
    out = bench.work / "skopeo.tar"
    seconds = skopeo.copy(registry_url, f"{image.repository}:{image.tag}", out)
    say(f"cold {image.repository} {attempt + 1}/{bench.plan.cold_runs}: skopeo {seconds:.2f}s "
        f"({mib(out.stat().st_size)})")
    out.unlink()
    download(attempt)
    return seconds


def _checked(bench: Bench, target: Path, image: Image, reference: Reference | None) -> Reference:
    """The first download becomes the reference (layout and layers verified); later ones must equal it."""
    if reference is None:
        reference = make_reference(target, image)
        say(f"reference archive: {mib(reference.size)}, sha256 {reference.sha256[:16]}…, layout and layer contents "
            "verified")
        return reference
    sha, _, size = hash_file(target)
    if (sha, size) != (reference.sha256, reference.size):
        bench.report.error(f"a cold download of {image.repository} differs from the first one")
    target.unlink()
    return reference


def single_client(bench: Bench, registry_url: str, image: Image,
                  report: bool = True) -> tuple[ServerProcess, Path, Reference]:
    """skopeo and a fresh embedded server, alternately, straight from the registry. Returns the last server (its
    cache now holds the image) and the reference archive: the first download, layout and layers verified.
    Without ``report`` (only the warm phases wanted): one download of ours, no skopeo, no rows."""
    refdir = bench.work / "ref"
    refdir.mkdir(exist_ok=True)
    skopeo = Skopeo(bench.work)
    ours: list[tuple[Curl, RssSampler]] = []
    running: list[tuple[ServerProcess, Path]] = []
    reference: list[Reference | None] = [None]

    def download(attempt: int) -> None:
        if running:
            bench.stop_server(*running.pop())
        server, cache = bench.server(f"embedded{attempt}", {"REGISTRY_URL": registry_url})
        running.append((server, cache))
        target = refdir / "big.tar" if attempt == 0 else bench.work / "cold.tar"
        with RssSampler(server.pid) as rss, bench.profiler.record(f"cold-{attempt}", server.pid):
            result = curl(f"{server.url}/docker/{image.filename}", str(target))
        say(f"cold {attempt + 1}/{bench.plan.cold_runs}: ours {result.total:.2f}s (first byte after "
            f"{result.ttfb:.2f}s), API {rss.describe()}")
        ours.append((result, rss))
        reference[0] = _checked(bench, target, image, reference[0])

    if not report:
        download(0)
    else:
        skopeo_times = [_skopeo_then_ours(bench, skopeo, registry_url, image, attempt, download)
                        for attempt in range(bench.plan.cold_runs)]
        _report(bench, "embedded", EMBEDDED_RATIO, reference[0], [r for r, _ in ours], skopeo_times)
        cold_peak = max((rss for _, rss in ours), key=lambda r: r.peak_memory)
        bench.report.row(f"API memory, cold {mib(reference[0].size)} download (embedded: preparation in the API "
                         "process)", cold_peak.describe(), "—", f"< {RSS_LIMIT_MIB} MiB",
                         cold_peak.peak_memory < RSS_LIMIT_MIB * MiB)
    assert running and reference[0] is not None
    server, cache = running[0]
    return server, cache, reference[0]


def warm_reference(bench: Bench, server: ServerProcess, image: Image, name: str) -> Reference:
    """Prepare ``image`` on ``server`` with one download, kept in the reference directory (nginx serves it from
    there) after its layout and layers are checked."""
    target = bench.work / "ref" / name
    curl(f"{server.url}/docker/{image.filename}", str(target))
    return make_reference(target, image)


def two_tier_single(bench: Bench, registry_url: str, image: Image) -> None:
    """skopeo and a fresh two-tier deployment (2 workers, empty cache), alternately, one client each."""
    skopeo = Skopeo(bench.work)
    ours: list[Curl] = []
    reference: list[Reference | None] = [None]

    def download(attempt: int) -> None:
        deployment = bench.two_tier(f"cold-two-tier{attempt}", registry_url)
        target = bench.work / f"cold-two-tier{attempt}.tar"
        try:
            with bench.profiler.record(f"cold-two-tier-{attempt}", deployment.server.pid):
                result = curl(f"{deployment.server.url}/docker/{image.filename}", str(target))
        finally:
            deployment.stop()
        say(f"cold two-tier {attempt + 1}/{bench.plan.cold_runs}: ours {result.total:.2f}s (first byte after "
            f"{result.ttfb:.2f}s)")
        ours.append(result)
        reference[0] = _checked(bench, target, image, reference[0])
        if attempt == 0:
            target.unlink()

    skopeo_times = [_skopeo_then_ours(bench, skopeo, registry_url, image, attempt, download)
                    for attempt in range(bench.plan.cold_runs)]
    assert reference[0] is not None
    _report(bench, "two-tier, 2 workers", TWO_TIER_RATIO, reference[0], ours, skopeo_times)


def _report(bench: Bench, mode: str, ratio: float, reference: Reference, ours: list[Curl],
            skopeo_times: list[float]) -> None:
    runs = bench.plan.cold_runs
    ours_t = statistics.median(r.total for r in ours)
    first_byte = statistics.median(r.ttfb for r in ours)
    skopeo_t = statistics.median(skopeo_times)
    n = f"median of {runs}" if runs > 1 else "1 run"
    bench.report.row(f"cold download, {mib(reference.size)} image, nothing cached ({mode}): time to the last byte",
                     f"{ours_t:.2f} s = {ours_t / skopeo_t:.2f}× skopeo ({rate(reference.size / ours_t)}), {n}",
                     f"skopeo copy → docker-archive: {skopeo_t:.2f} s", f"≤ {ratio:g}× skopeo's time",
                     ours_t <= ratio * skopeo_t)
    bench.report.row(f"cold download, {mib(reference.size)} image ({mode}): time to the first byte",
                     f"{first_byte:.2f} s (max {max(r.ttfb for r in ours):.2f} s), {n}", "—",
                     f"≤ {FIRST_BYTE_SECONDS:g} s", first_byte <= FIRST_BYTE_SECONDS)


def throttled(bench: Bench, registry_url: str, image: Image, big_ref: Reference | None) -> None:
    """A cold image through a registry paced to 20 MB/s per connection: the response starts at once with the
    exact Content-Length, bytes flow as layers inflate (the largest pause is measured), every byte right."""
    plan = bench.plan
    reference: Reference | None = big_ref
    if plan.throttled_mib != plan.big_mib:
        image = make_image(bench.work / "gen", registry_url, "bench/throttled", "v1", plan.throttled_mib, 3)
        reference = None
    proxy = bench.proxy(registry_url)
    proxy.throttle_bytes_per_second = THROTTLE_BYTES_PER_SECOND
    server, cache = bench.server("throttled", {"REGISTRY_URL": proxy.url})
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
    target = (f"first byte ≤ {FIRST_BYTE_SECONDS:g} s, no pause > {LARGEST_GAP_SECONDS:g} s, exact length, "
              "correct bytes")
    if result.error or reference is None:
        bench.report.error(f"throttled download: {result.error}")
        bench.report.row("cold image through a throttled registry", "ERROR", "—", target, False)
        return
    correct = result.sha256 == reference.sha256 and result.received == reference.size
    if not correct:
        bench.report.error("the throttled download's bytes differ from the reference")
    exact = result.content_length == reference.size
    bench.report.row(
        f"cold {mib(reference.size)} image, registry throttled to {rate(THROTTLE_BYTES_PER_SECOND)} per connection",
        f"first byte after {result.time_to_headers:.2f} s, largest pause {result.longest_wait:.2f} s, done after "
        f"{result.total:.1f} s; Content-Length {'exact' if exact else f'{result.content_length} ≠ {reference.size}'}, "
        f"bytes {'correct' if correct else 'WRONG'}; API {rss.describe()}",
        f"upstream transfer alone ≥ {upstream_seconds:.1f} s", target,
        result.time_to_headers <= FIRST_BYTE_SECONDS and result.longest_wait <= LARGEST_GAP_SECONDS and exact
        and correct)
