"""End to end, the failure paths: what a user sees when something goes wrong.

Real registries (anonymous and htpasswd, behind the counting/fault-injecting proxy), real Redis and RQ
workers (two-tier) or none (embedded). Every error must be JSON with the documented status, never a tar,
never a hang; nothing unverified may land in the store; and a failure must not block a later retry.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import redis

from tests.support.downloads import filename_for, get, image_url, tar_members
from tests.support.faults import (
    BackgroundGet,
    BackgroundStream,
    assert_complete_tar,
    assert_json_error,
    closed_port,
    files_in,
    run_cli,
    stray_files,
    wait_until,
)
from tests.support.images import make_config, make_layer
from tests.support.registry import htpasswd_auth

pytestmark = pytest.mark.e2e

CHALLENGE = 'Basic realm="registry credentials"'
# Every stack gets it: two-tier needs it to hand client credentials to a worker.
# A grace long enough for these small images: a failure found while preparing is then a JSON answer (once a
# response streams, a failure can only cut it short: see test_e2e_streaming.py).
BASE_ENV = {"CREDENTIALS_KEY": "test-key", "PREPARE_GRACE": "20"}
USER, PASSWORD = "alice", "s3cret-pw"


def url_for(stack, registry, filename: str, route: str = "registry") -> str:
    """For filenames that name no image (bad ones)."""
    return f"{stack.url}/{route}/http/{registry.host}/docker/{filename}"


def layer_tars(body: bytes) -> list[bytes]:
    return [m for n, m in tar_members(body).items() if n.endswith("/layer.tar")]


def server_log_tail(running, lines: int = 8) -> str:
    text = "\n".join(p.read_text(errors="replace") for p in sorted(running.log_dir.glob("server-*.log")))
    return "server log tail:\n" + "\n".join(text.splitlines()[-lines:])


def hex_of(digest: str) -> str:
    return digest.removeprefix("sha256:")


@pytest.fixture
def proxy(registry):
    """The shared registry's proxy, with counts and faults cleared before and after the test."""
    registry.proxy.reset()
    yield registry.proxy
    registry.proxy.reset()


# --------------------------------------------------------------------------- 400: bad requests


BAD_FILENAMES = [
    # (filename, rule, words the message must contain)
    ("nginx_latest.zip", "extension", (".tar",)),
    ("nginx.tar", "tag_separator", ('"_"',)),
    ("Nginx_latest.tar", "invalid_component", ("lowercase",)),
    ("nginx_.tar", "empty_tag", ("tag",)),
    ("_latest.tar", "empty_path", ("image name",)),
]


def test_bad_filenames_are_400_naming_the_rule_without_asking_the_registry(mode, stack, registry, proxy):
    running = stack(mode, workers=1, env={**BASE_ENV, "REGISTRY_URL": registry.url})
    for filename, rule, words in BAD_FILENAMES:
        for url in (f"{running.url}/docker/{filename}", url_for(running, registry, filename),
                    url_for(running, registry, filename, "registry-auth")):
            result = get(url, auth=(USER, PASSWORD))
            assert_json_error(result, 400, error=f"bad_filename:{rule}", words=words)
    assert proxy.requests == []


BAD_REGISTRIES = [
    # (path, words the message must contain)
    ("/registry/ftp/{host}/docker/x_y.tar", ("ftp",)),
    ("/registry/http/bad_host/docker/x_y.tar", ("bad_host",)),
    ("/registry/http/-leading-dash.example/docker/x_y.tar", ("leading-dash",)),
    ("/registry-auth/http/exa%20mple.com/docker/x_y.tar", ("exa mple.com",)),
    # A port past 65535 is not a host either: a 400, not an attempt to connect.
    ("/registry/http/127.0.0.1:99999/docker/x_y.tar", ("99999",)),
]


def test_bad_registry_scheme_or_host_is_400(stack, registry, proxy):
    running = stack("embedded", env=BASE_ENV)
    for path, words in BAD_REGISTRIES:
        result = get(running.url + path.format(host=registry.host), auth=(USER, PASSWORD))
        assert_json_error(result, 400, error="bad_registry", words=words)
    assert proxy.requests == []


# --------------------------------------------------------------------------- 404


def test_unknown_tag_and_unknown_repository_are_404(mode, stack, registry, proxy, unique_repo):
    registry.push_image(unique_repo, "v1", [make_layer({"a.txt": b"a"})])
    running = stack(mode, workers=1, env=BASE_ENV)

    no_tag = get(image_url(running.url, registry.host, unique_repo, "v2"))
    assert_json_error(no_tag, 404, error="not_found", words=("not found", f"{unique_repo}:v2"))

    no_repo = get(image_url(running.url, registry.host, unique_repo + "-missing", "v1"))
    assert_json_error(no_repo, 404, error="not_found", words=("not found", unique_repo + "-missing"))

    assert files_in(running.cache_dir / "images") == []


# --------------------------------------------------------------------------- 401 / 403: credentials


def test_client_credentials_for_an_htpasswd_registry(mode, stack, registry_factory, tmp_path, unique_repo):
    private = registry_factory(auth=htpasswd_auth(tmp_path / "auth", {USER: PASSWORD}), push_auth=(USER, PASSWORD))
    layer = make_layer({"secret.txt": b"only for alice"})
    private.push_image(unique_repo, "v1", [layer])
    running = stack(mode, workers=1, env=BASE_ENV)
    plain = image_url(running.url, private.host, unique_repo, "v1")
    auth_route = image_url(running.url, private.host, unique_repo, "v1", route="registry-auth")

    # No credentials: the registry's refusal becomes a Basic challenge, so a switch retries with its own.
    anonymous = get(plain)
    assert_json_error(anonymous, 401, words=("credentials",))
    assert anonymous.headers.get("www-authenticate") == CHALLENGE

    # /registry-auth/ insists on credentials before anything else: the registry is not contacted.
    private.proxy.reset()
    demanded = get(auth_route)
    assert_json_error(demanded, 401, words=("credentials",))
    assert demanded.headers.get("www-authenticate") == CHALLENGE
    assert private.proxy.requests == []

    # The right credentials, on both routes.
    ok = get(plain, auth=(USER, PASSWORD))
    assert_complete_tar(ok)
    assert layer_tars(ok.body) == [layer.tar]
    ok_auth_route = get(auth_route, auth=(USER, PASSWORD))
    assert_complete_tar(ok_auth_route)
    assert ok_auth_route.body == ok.body

    # A wrong password is refused with 403 and no challenge (a retry with the same credentials is pointless),
    # even though the image is now prepared.
    for url in (plain, auth_route):
        refused = get(url, auth=(USER, "wrong-password"))
        assert_json_error(refused, 403, words=("refused",))
        assert "www-authenticate" not in refused.headers

    # Prepared or not, anonymous still gets nothing.
    again = get(plain)
    assert_json_error(again, 401)
    assert again.headers.get("www-authenticate") == CHALLENGE


def test_settings_credentials_are_used_only_for_the_configured_registry(mode, stack, registry_factory, tmp_path,
                                                                        unique_repo):
    users = {USER: PASSWORD}
    configured = registry_factory(auth=htpasswd_auth(tmp_path / "one", users), push_auth=(USER, PASSWORD))
    other = registry_factory(auth=htpasswd_auth(tmp_path / "two", users), push_auth=(USER, PASSWORD))
    layer = make_layer({"f.txt": b"settings"})
    for reg in (configured, other):
        reg.push_image(unique_repo, "v1", [layer])
    running = stack(mode, workers=1, env={**BASE_ENV, "REGISTRY_URL": configured.url,
                                           "REGISTRY_USERNAME": USER, "REGISTRY_PASSWORD": PASSWORD})
    filename = filename_for(unique_repo, "v1")

    via_settings = get(f"{running.url}/docker/{filename}")
    assert_complete_tar(via_settings)
    assert layer_tars(via_settings.body) == [layer.tar]

    # Same user exists on the other registry, but the settings' credentials must never travel there.
    other.proxy.reset()
    elsewhere = get(image_url(running.url, other.host, unique_repo, "v1"))
    assert_json_error(elsewhere, 401)
    assert elsewhere.headers.get("www-authenticate") == CHALLENGE
    assert other.proxy.count() >= 1
    assert other.proxy.count(status=401) == other.proxy.count(), other.proxy.requests


# --------------------------------------------------------------------------- 502: registry unreachable / bad content


def test_unreachable_registry_is_502(mode, stack, unique_repo):
    running = stack(mode, workers=1, env=BASE_ENV)
    host = f"127.0.0.1:{closed_port()}"
    result = get(f"{running.url}/registry/http/{host}/docker/{filename_for(unique_repo, 'v1')}")
    assert_json_error(result, 502, error="registry_unreachable", words=("unreachable",))


def test_corrupted_layer_is_502_stores_nothing_and_a_retry_succeeds(mode, stack, registry, proxy, unique_repo):
    good = make_layer({"good.txt": b"fine"})
    bad = make_layer({"payload.bin": os.urandom(200_000)})  # gzip, as registries serve layers
    registry.push_image(unique_repo, "v1", [good, bad])
    running = stack(mode, workers=1, env={**BASE_ENV, "LAYER_CONCURRENCY": "1"})
    url = image_url(running.url, registry.host, unique_repo, "v1")

    proxy.corrupt_path_contains = bad.digest
    failed = get(url)

    body = assert_json_error(failed, 502, error="invalid_content")
    assert proxy.count("GET", kind="blob", path_contains=bad.digest) >= 1, "the fault was never injected"
    cache = Path(running.cache_dir)
    assert f"{hex_of(bad.diff_id)}.tar" not in files_in(cache / "layers" / "sha256")
    assert hex_of(bad.digest) not in files_in(cache / "links")
    assert files_in(cache / "images") == []
    assert stray_files(cache) == []

    # The fault is gone: the same request now works (a failed job must not block the retry).
    proxy.reset()
    retried = get(url)
    assert_complete_tar(retried)
    assert layer_tars(retried.body) == [good.tar, bad.tar]
    assert proxy.count("GET", kind="blob", path_contains=bad.digest) == 1
    assert stray_files(cache) == []

    # Checked last so that the rest is exercised either way: the user is told which layer failed to verify.
    assert bad.digest in body["message"], body


def test_uncompressed_layer_with_wrong_digest_is_502_naming_it(stack, registry, proxy, unique_repo):
    # Without gzip in the way the only check that can catch the flipped byte is the blob digest.
    bad = make_layer({"payload.bin": os.urandom(100_000)}, compression="none")
    registry.push_image(unique_repo, "v1", [bad])
    running = stack("embedded", env=BASE_ENV)
    url = image_url(running.url, registry.host, unique_repo, "v1")

    proxy.corrupt_path_contains = bad.digest
    assert_json_error(get(url), 502, error="invalid_content", words=(bad.digest, "digest"))
    assert files_in(Path(running.cache_dir) / "layers" / "sha256") == []
    assert stray_files(running.cache_dir) == []

    proxy.reset()
    retried = get(url)
    assert_complete_tar(retried)
    assert layer_tars(retried.body) == [bad.tar]


def test_wrong_diff_id_in_config_is_502_and_stores_nothing(mode, stack, registry, proxy, unique_repo):
    layer = make_layer({"x.txt": b"diff id test " + os.urandom(8)})
    config = json.loads(make_config([layer]))
    config["rootfs"]["diff_ids"] = ["sha256:" + "ab" * 32]
    registry.push_image(unique_repo, "v1", [layer], config=json.dumps(config).encode())
    running = stack(mode, workers=1, env=BASE_ENV)

    result = get(image_url(running.url, registry.host, unique_repo, "v1"))

    assert_json_error(result, 502, error="invalid_content", words=("diff_id",))
    cache = Path(running.cache_dir)
    assert files_in(cache / "layers" / "sha256") == []
    assert files_in(cache / "images") == []
    assert hex_of(layer.digest) not in files_in(cache / "links")
    assert stray_files(cache) == []


# --------------------------------------------------------------------------- 504 / 503: time and infrastructure


def test_registry_too_slow_is_504(stack, registry, proxy, unique_repo):
    # Embedded only: the tag is resolved by the API process in both modes, before any worker is involved.
    registry.push_image(unique_repo, "v1", [make_layer({"slow.txt": b"s"})])
    # No retries: this is about UPSTREAM_TIMEOUT per attempt (retries are tested in test_e2e_upstream.py).
    running = stack("embedded", env={**BASE_ENV, "UPSTREAM_TIMEOUT": "1", "UPSTREAM_RETRIES": "0"})
    proxy.delay_seconds_before_headers = 3

    started = time.monotonic()
    result = get(image_url(running.url, registry.host, unique_repo, "v1"), timeout=30)
    took = time.monotonic() - started

    assert_json_error(result, 504, error="timeout", words=("in time",))
    assert took < 2.9, f"answered after {took:.1f}s: the 1 s UPSTREAM_TIMEOUT was not applied"
    # Let the delayed request through the proxy before the next test resets its counts.
    wait_until(lambda: proxy.count() >= 1, timeout=5)


def test_two_tier_worker_killed_mid_job_gives_504_then_a_new_worker_takes_over(stack, registry, proxy,
                                                                              unique_repo):
    lost_timeout = 3
    layer = make_layer({"big.bin": os.urandom(3_000_000)})  # random: gzip keeps it ~3 MB
    registry.push_image(unique_repo, "v1", [layer])
    # PREPARE_GRACE=0: the answer waits for the preparation, so its failure can still be a JSON 504 (with a grace
    # period the response starts early and a failure can only cut it short; see the next test).
    running = stack("two-tier", workers=1, env={**BASE_ENV, "WORKER_LOST_TIMEOUT": str(lost_timeout),
                                                 "PREPARE_GRACE": "0"})
    url = image_url(running.url, registry.host, unique_repo, "v1")
    watch = redis.Redis.from_url(running.redis.url)

    def heartbeat_ms() -> int:
        keys = watch.keys("dhp:heartbeat:*")
        return max((watch.pttl(key) for key in keys), default=-2)

    proxy.throttle_bytes_per_second = 200_000  # ~15 s for the layer
    pending = BackgroundGet(url, timeout=90)
    try:
        assert wait_until(lambda: heartbeat_ms() > 0, timeout=15), "the job never started"
        assert wait_until(lambda: proxy.count("GET", kind="blob", path_contains=layer.digest), timeout=15), \
            "the worker never started downloading the layer"
        # An upper bound must hold in the worst case, so kill right after a heartbeat (the moment the worker
        # looks most alive) rather than at a random phase of the beat, which would make the timing vary.
        previous = [heartbeat_ms()]

        def just_refreshed() -> bool:
            now = heartbeat_ms()
            refreshed, previous[0] = now > previous[0] + 100, now
            return refreshed or pending.done()

        assert wait_until(just_refreshed, timeout=15, interval=0.01), "no second heartbeat"
        assert not pending.done(), "the download ended before the worker was killed"
        running.workers[0].kill()
        killed_at = time.monotonic()

        result = pending.join(timeout=lost_timeout + 40)
        waited = pending.answered_at - killed_at
        assert_json_error(result, 504, error="worker_lost", words=("stopped responding",))
    finally:
        watch.close()

    # A new worker, a new request: the lost job is replaced, not waited for again.
    proxy.reset()
    running.add_worker()
    retried = get(url, timeout=90)
    assert_complete_tar(retried)
    assert layer_tars(retried.body) == [layer.tar]

    # Checked last so that the replacement above is exercised either way.
    assert waited <= lost_timeout + 10, (f"504 came {waited:.1f}s after the kill (WORKER_LOST_TIMEOUT={lost_timeout})"
                                         f"\n{server_log_tail(running)}")


def test_two_tier_worker_killed_after_the_response_started_cuts_it_short(stack, registry, proxy, unique_repo):
    """With PREPARE_GRACE the 200 and its Content-Length go out before the image is ready; if the worker then dies
    the client must be told soon (a short body it cannot load), not be left waiting until PREPARE_TIMEOUT."""
    lost_timeout, prepare_timeout = 3, 18
    layer = make_layer({"big.bin": os.urandom(3_000_000)})
    registry.push_image(unique_repo, "v1", [layer])
    running = stack("two-tier", workers=1, env={**BASE_ENV, "WORKER_LOST_TIMEOUT": str(lost_timeout),
                                                 "PREPARE_GRACE": "1", "PREPARE_TIMEOUT": str(prepare_timeout)})
    proxy.throttle_bytes_per_second = 200_000  # ~15 s for the layer

    pending = BackgroundStream(image_url(running.url, registry.host, unique_repo, "v1"), timeout=60)
    assert wait_until(lambda: pending.headers_at is not None or pending.done(), timeout=15), "no response headers"
    assert pending.status == 200 and not pending.done(), (pending.status, pending.error)
    length = int(pending.headers["content-length"])
    running.workers[0].kill()
    killed_at = time.monotonic()

    pending.join(timeout=prepare_timeout + 20)
    assert pending.received < length, "the body must not be complete: the image was never prepared"
    assert pending.error is not None, "the connection must break, not end as if the body were complete"
    waited = pending.ended_at - killed_at
    assert waited <= lost_timeout + 10, (f"the response was cut {waited:.1f}s after the worker died "
                                         f"(WORKER_LOST_TIMEOUT={lost_timeout}, PREPARE_TIMEOUT={prepare_timeout})"
                                         f"\n{server_log_tail(running)}")


def test_two_tier_redis_down_gives_503_on_health_and_downloads(stack, registry, proxy, unique_repo):
    registry.push_image(unique_repo, "v1", [make_layer({"r.txt": b"redis"})])
    outage = 2
    running = stack("two-tier", workers=1, env={**BASE_ENV, "REDIS_OUTAGE_TIMEOUT": str(outage)})

    healthy = get(f"{running.url}/health")
    assert healthy.status == 200
    assert healthy.json()["mode"] == "two-tier" and healthy.json()["redis"] == "ok"

    running.redis.stop()

    sick = get(f"{running.url}/health", timeout=15)
    assert sick.status == 503, sick.body
    assert sick.json()["redis"].startswith("unreachable"), sick.json()

    started = time.monotonic()
    result = get(image_url(running.url, registry.host, unique_repo, "v1"), timeout=60)
    took = time.monotonic() - started
    assert_json_error(result, 503, error="redis_unavailable", words=("REDIS_OUTAGE_TIMEOUT",))
    assert outage <= took < outage + 8, f"answered after {took:.1f}s (REDIS_OUTAGE_TIMEOUT={outage})"


# --------------------------------------------------------------------------- start-up


@pytest.mark.parametrize("name, value", [
    ("REGISTRY_CLIENT_AUTH", "maybe"),
    ("REGISTRY_URL", "ftp://x"),
    ("PREPARE_TIMEOUT", "-1"),
])
def test_start_up_refuses_bad_settings(tmp_path, name, value):
    run = run_cli(["serve", "--port", "0"], {name: value, "CACHE_DIR": str(tmp_path / "cache")}, timeout=20)
    assert run.returncode == 2, f"exit code {run.returncode} after {run.seconds:.1f}s; stderr:\n{run.stderr}"
    assert run.seconds < 10
    assert name in run.stderr, run.stderr
