"""`docker-http-passthrough prewarm` against a running server and the test registry, and `url` as a user runs it."""

from __future__ import annotations

import io
import os
import re

import httpx
import pytest

from docker_http_passthrough.prewarm import Display, Warmup, summary
from tests.support.faults import run_cli
from tests.support.images import make_layer

pytestmark = pytest.mark.e2e


def _layers(count: int, size: int) -> list:
    return [make_layer({f"p{i}.bin": os.urandom(size)}) for i in range(count)]


def test_prewarm_warms_every_image_and_names_each_failure(mode, stack, registry, unique_repo):
    registry.push_image(f"{unique_repo}-a", "v1", _layers(2, 500_000))
    registry.push_image(f"{unique_repo}-b", "2026.06", _layers(1, 100_000))
    running = stack(mode, env={"REGISTRY_URL": registry.url})
    good = [f"{registry.host}/{unique_repo}-a:v1", f"{registry.host}/{unique_repo}-b:2026.06"]
    missing = f"{registry.host}/{unique_repo}-a:missing"
    registry.proxy.throttle_bytes_per_second = 300_000  # ~3 s for image a: progress lines to see

    run = run_cli(["prewarm", "--server", running.url, *good, missing, "Bad/Name", "--interval", "0.2"], {},
                  timeout=120)
    registry.proxy.throttle_bytes_per_second = 0
    assert run.returncode == 1, (run.stdout, run.stderr)
    out = run.stdout
    assert re.search(rf"{re.escape(good[0])}: \[[#-]+\] running: \d/2 layers", out), out  # plain lines, no tty
    assert "\x1b[" not in out
    with httpx.Client(trust_env=False, timeout=30) as client:
        for reference, path in zip(good, [f"test_{unique_repo[5:]}-a_v1.tar", f"test_{unique_repo[5:]}-b_2026.06.tar"]):
            head = client.head(f"{running.url}/docker/{path}")
            assert head.status_code == 200, head.text
            row = next(line for line in out.splitlines() if line.startswith(reference + " ") and "ready" in line)
            assert f"{int(head.headers['content-length']):,}" in row and head.headers["etag"] in row, row
    assert f"{missing}: the registry has no such repository, tag or platform" in out, out
    assert "Bad/Name: " in out and "use lowercase" in out, out
    registry.proxy.reset()

    again = run_cli(["prewarm", "--server", running.url, *good], {}, timeout=60)
    assert again.returncode == 0, (again.stdout, again.stderr)
    assert registry.proxy.count("GET", kind="blob") == 0  # already prepared: nothing downloaded again


def test_prewarm_warms_the_platform_asked_for_and_names_the_ones_an_image_has(stack, registry, unique_repo):
    arm = registry.push_image(unique_repo, None, [make_layer({"arch": b"arm64"})], architecture="arm64")
    amd = registry.push_image(unique_repo, None, [make_layer({"arch": b"amd64"})])
    registry.push_index(unique_repo, "multi", [(arm, {"os": "linux", "architecture": "arm64"}),
                                               (amd, {"os": "linux", "architecture": "amd64"})])
    running = stack("embedded", env={"REGISTRY_URL": registry.url})
    ref = f"{registry.host}/{unique_repo}:multi"
    run = run_cli(["prewarm", "--server", running.url, "--platform", "linux/aarch64", ref], {}, timeout=60)
    assert run.returncode == 0, (run.stdout, run.stderr)
    assert f"{ref} (linux/arm64)" in run.stdout
    with httpx.Client(trust_env=False, timeout=30) as client:
        path = f"/platform/linux/arm64/docker/{unique_repo.replace('/', '_')}_multi.tar"
        head = client.head(running.url + path)
        assert head.status_code == 200 and head.headers["x-manifest-digest"] == arm.manifest_digest
        assert head.headers["etag"] in run.stdout
    missing = run_cli(["prewarm", "--server", running.url, "--platform", "linux/s390x", ref], {}, timeout=60)
    assert missing.returncode == 1 and "the image has no such platform" in missing.stdout, missing.stdout
    assert "offered: linux/arm64, linux/amd64" in missing.stdout
    unreachable = run_cli(["prewarm", "--server", "http://127.0.0.1:9", f"{registry.host}/x:1"], {})
    assert unreachable.returncode == 1 and "the server did not answer" in unreachable.stdout


def test_prewarm_draws_bars_in_place_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    items = [Warmup("a", image="docker.io/library/a:1"), Warmup("b", image="docker.io/library/b:1")]
    out = Terminal()
    display = Display(items, out)
    display.start()
    items[0].state, items[0].progress = "running", {"layers_done": 1, "layers_total": 2, "bytes_done": 5,
                                                    "bytes_total": 10}
    display.changed(items[0])
    items[1].fail("the registry has no such repository, tag or platform")
    display.changed(items[1])
    frames = out.getvalue().split("\x1b[2F")
    assert len(frames) == 3  # first draw, then two redraws moving up over both lines
    assert "[############------------] running: 1/2 layers" in frames[1]  # cut to the terminal width
    assert "] failed: the registry" in frames[2]
    assert "FAILED" in summary(items) and "docker.io/library/b:1: the registry has no such" in summary(items)


def test_url_command_prints_the_url_and_the_ios_block():
    run = run_cli(["url", "ghcr.io/my-org/app:1.0", "--server", "http://10.20.30.40:8080", "--auth",
                   "--registry-in-url", "--destination", "usbflash1:"], {})
    assert run.returncode == 0, run.stderr
    url = "http://10.20.30.40:8080/registry-auth/https/ghcr.io/docker/my-org_app_1.0.tar"
    lines = run.stdout.splitlines()
    assert lines[0] == url
    assert f"copy {url} usbflash1:my-org_app_1.0.tar" in lines
    assert lines.index(" ip http client username <registry-username>") < lines.index(f"copy {url} usbflash1:my-org_app_1.0.tar") \
        < lines.index(" no ip http client password")
    assert "app-hosting install appid app package usbflash1:my-org_app_1.0.tar" in lines
    bad = run_cli(["url", "nginx:1.0_beta", "--server", "http://user:pw@10.0.0.1:8080"], {})
    assert bad.returncode == 2 and "must not carry credentials" in bad.stderr
    # What a filename cannot say goes through /ref/, said in full, behind the platform asked for.
    tag = run_cli(["url", "nginx:1.0_beta", "--platform", "linux/aarch64", "--auth"], {})
    assert tag.returncode == 0, tag.stderr
    ref_url = "http://localhost:8080/platform/linux/arm64/ref-auth/docker.io/library/nginx:1.0_beta.tar"
    assert tag.stdout.splitlines()[0] == ref_url
    assert "! docker.io/library/nginx:1.0_beta for linux/arm64 through docker-http-passthrough" in tag.stdout
    assert "cannot say this reference (tag_underscore)" in tag.stderr
    digest = "sha256:" + "ab" * 32
    pinned = run_cli(["url", f"registry.lab:5000/team/app@{digest}"], {})
    assert pinned.stdout.splitlines()[0] == f"http://localhost:8080/ref/registry.lab:5000/team/app@{digest}.tar"
    insecure = run_cli(["url", "--insecure-registry", "registry.lab/team/app:1_0"], {})
    assert insecure.returncode == 1 and "over HTTPS only" in insecure.stderr
    platform = run_cli(["url", "nginx", "--platform", "linux"], {})
    assert platform.returncode == 1 and "os/architecture" in platform.stderr
