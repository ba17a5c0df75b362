"""shared.reference against the test cases of CNCF distribution's reference package (reference_test.go,
normalize_test.go, regexp_test.go at github.com/distribution/reference), ported case by case, and the /ref/
route's path form round-tripped for every valid one."""

from __future__ import annotations

import re
import time
from urllib.parse import unquote

import pytest

from docker_http_passthrough.shared.reference import (
    DEFAULT_TAG,
    Reference,
    ReferenceError,
    parse,
    parse_normalized,
    ref_path,
    reference_from_path,
)

F64 = "f" * 64
DIGEST = "sha256:" + F64

# reference_test.go TestReferenceParse: (input, domain, path, tag, digest); the repository there is domain/path.
PARSE_VALID = [
    ("test_com", "", "test_com", None, None),
    ("test.com:tag", "", "test.com", "tag", None),
    ("test.com:5000", "", "test.com", "5000", None),
    ("test.com/repo:tag", "test.com", "repo", "tag", None),
    ("test:5000/repo", "test:5000", "repo", None, None),
    ("test:5000/repo:tag", "test:5000", "repo", "tag", None),
    (f"test:5000/repo@{DIGEST}", "test:5000", "repo", None, DIGEST),
    (f"test:5000/repo:tag@{DIGEST}", "test:5000", "repo", "tag", DIGEST),
    ("lowercase:Uppercase", "", "lowercase", "Uppercase", None),
    ("a/" * 127 + "a:tag-puts-this-over-max", "a", "a/" * 126 + "a", "tag-puts-this-over-max", None),
    ("sub-dom1.foo.com/bar/baz/quux", "sub-dom1.foo.com", "bar/baz/quux", None, None),
    ("sub-dom1.foo.com/bar/baz/quux:some-long-tag", "sub-dom1.foo.com", "bar/baz/quux", "some-long-tag", None),
    ("b.gcr.io/test.example.com/my-app:test.example.com", "b.gcr.io", "test.example.com/my-app",
     "test.example.com", None),
    ("xn--n3h.com/myimage:xn--n3h.com", "xn--n3h.com", "myimage", "xn--n3h.com", None),
    (f"xn--7o8h.com/myimage:xn--7o8h.com@{DIGEST}", "xn--7o8h.com", "myimage", "xn--7o8h.com", DIGEST),
    ("foo_bar.com:8080", "", "foo_bar.com", "8080", None),
    ("foo/foo_bar.com:8080", "foo", "foo_bar.com", "8080", None),
    ("192.168.1.1", "", "192.168.1.1", None, None),
    ("192.168.1.1:tag", "", "192.168.1.1", "tag", None),
    ("192.168.1.1:5000", "", "192.168.1.1", "5000", None),
    ("192.168.1.1/repo", "192.168.1.1", "repo", None, None),
    ("192.168.1.1:5000/repo", "192.168.1.1:5000", "repo", None, None),
    ("192.168.1.1:5000/repo:5050", "192.168.1.1:5000", "repo", "5050", None),
    ("[2001:db8::1]/repo", "[2001:db8::1]", "repo", None, None),
    ("[2001:db8:1:2:3:4:5:6]/repo:tag", "[2001:db8:1:2:3:4:5:6]", "repo", "tag", None),
    ("[2001:db8::1]:5000/repo", "[2001:db8::1]:5000", "repo", None, None),
    ("[2001:db8::1]:5000/repo:tag", "[2001:db8::1]:5000", "repo", "tag", None),
    (f"[2001:db8::1]:5000/repo@{DIGEST}", "[2001:db8::1]:5000", "repo", None, DIGEST),
    (f"[2001:db8::1]:5000/repo:tag@{DIGEST}", "[2001:db8::1]:5000", "repo", "tag", DIGEST),
    ("[2001:db8::]:5000/repo", "[2001:db8::]:5000", "repo", None, None),
    ("[::1]:5000/repo", "[::1]:5000", "repo", None, None),
    ("example.com/" + "a" * 255 + ":tag", "example.com", "a" * 255, "tag", None),
]

PARSE_INVALID = [
    ("", "empty_reference"),
    (":justtag", "invalid_reference"),
    (f"@{DIGEST}", "invalid_reference"),
    ("repo@sha256:" + "f" * 34, "invalid_digest"),  # too short for sha256 (distribution: ErrDigestInvalidLength)
    (f"validname@invaliddigest:{F64}", "invalid_digest"),  # unregistered algorithm
    ("validname@sha512:" + "f" * 128, "invalid_digest"),  # not registered in distribution's tests either
    ("Uppercase:tag", "uppercase"),
    ("test:5000/Uppercase/lowercase:tag", "uppercase"),
    ("domain/" + "a" * 256 + ":tag", "name_too_long"),
    ("aa/asdf$$^/aa", "invalid_reference"),
    ("[2001:db8::1]", "invalid_reference"),
    ("[2001:db8::1]:5000", "invalid_reference"),
    ("[2001:db8::1]:tag", "invalid_reference"),
    ("[fe80::1%eth0]:5000/repo", "invalid_reference"),
    ("[fe80::1%@invalidzone]:5000/repo", "invalid_reference"),
]


@pytest.mark.parametrize("text, domain, path, tag, digest", PARSE_VALID, ids=lambda v: str(v)[:40])
def test_parse_splits_as_distribution_does(text, domain, path, tag, digest):
    ref = parse(text)
    assert (ref.domain, ref.path, ref.tag, ref.digest) == (domain, path, tag, digest)
    assert str(ref) == text


@pytest.mark.parametrize("text, rule", PARSE_INVALID, ids=lambda v: str(v)[:40])
def test_parse_refuses_what_distribution_refuses(text, rule):
    with pytest.raises(ReferenceError) as info:
        parse(text)
    assert info.value.rule == rule, str(info.value)


# normalize_test.go TestValidateReferenceName and TestValidateRemoteName.
NORMALIZED_VALID = [
    "docker/docker", "library/debian", "debian", "localhost/library/debian", "localhost/debian",
    "LOCALDOMAIN/library/debian", "LOCALDOMAIN/debian", "docker.io/docker/docker", "docker.io/library/debian",
    "docker.io/debian", "index.docker.io/docker/docker", "index.docker.io/library/debian",
    "index.docker.io/debian", "127.0.0.1:5000/docker/docker", "127.0.0.1:5000/library/debian",
    "127.0.0.1:5000/debian", "192.168.0.1", "192.168.0.1:80", "192.168.0.1:8/debian", "192.168.0.2:25000/debian",
    "thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev", "[fc00::1]:5000/docker",
    "[fc00::1]:5000/docker/docker", "[fc00:1:2:3:4:5:6:7]:5000/library/debian",
    "docker.io/1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a", "Docker/docker", "DOCKER/docker",
    "docker-rules/docker", "docker---rules/docker", "doc/docker", "d/docker", "jess/t", "dock__er/docker",
]
NORMALIZED_INVALID = [
    "https://github.com/docker/docker", "docker/Docker", "-docker", "-docker/docker", "-docker.io/docker/docker",
    "docker///docker", "docker.io/docker/Docker", "docker.io/docker///docker", "[fc00::1]", "[fc00::1]:5000",
    "fc00::1:5000/debian", "[fe80::1%eth0]:5000/debian", "[2001:db8:3:4::192.0.2.33]:5000/debian",
    "1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a", "docker-/docker", "-docker-/docker",
    "____/____", "_docker/_docker", "dock..er/docker", "dock_.er/docker", "dock-.er/docker", "docker/",
    "this_is_not_a_valid_namespace_because_its_lenth_is_greater_than_255_" * 4 + "/docker",
]


@pytest.mark.parametrize("text", NORMALIZED_VALID)
def test_normalized_names_distribution_accepts(text):
    parse_normalized(text)


@pytest.mark.parametrize("text", NORMALIZED_INVALID, ids=lambda v: v[:40])
def test_normalized_names_distribution_refuses(text):
    with pytest.raises(ReferenceError):
        parse_normalized(text)


# normalize_test.go TestParseRepositoryInfo: (remote name, familiar, full, ambiguous spellings, domain).
REPOSITORY_INFO = [
    ("fooo", "localhost/fooo", "localhost/fooo", [], "localhost"),
    ("fooo/bar", "localhost/fooo/bar", "localhost/fooo/bar", [], "localhost"),
    ("fooo", "LOCALDOMAIN/fooo", "LOCALDOMAIN/fooo", [], "LOCALDOMAIN"),
    ("fooo/bar", "fooo/bar", "docker.io/fooo/bar", ["index.docker.io/fooo/bar"], "docker.io"),
    ("library/ubuntu", "ubuntu", "docker.io/library/ubuntu", ["library/ubuntu"], "docker.io"),
    ("nonlibrary/ubuntu", "nonlibrary/ubuntu", "docker.io/nonlibrary/ubuntu", [], "docker.io"),
    ("other/library", "other/library", "docker.io/other/library", [], "docker.io"),
    ("private/moonbase", "127.0.0.1:8000/private/moonbase", "127.0.0.1:8000/private/moonbase", [],
     "127.0.0.1:8000"),
    ("privatebase", "127.0.0.1:8000/privatebase", "127.0.0.1:8000/privatebase", [], "127.0.0.1:8000"),
    ("private/moonbase", "example.com/private/moonbase", "example.com/private/moonbase", [], "example.com"),
    ("privatebase", "example.com/privatebase", "example.com/privatebase", [], "example.com"),
    ("private/moonbase", "example.com:8000/private/moonbase", "example.com:8000/private/moonbase", [],
     "example.com:8000"),
    ("privatebasee", "example.com:8000/privatebasee", "example.com:8000/privatebasee", [], "example.com:8000"),
    ("library/ubuntu-12.04-base", "ubuntu-12.04-base", "docker.io/library/ubuntu-12.04-base",
     ["index.docker.io/library/ubuntu-12.04-base"], "docker.io"),
    ("library/foo", "foo", "docker.io/library/foo", ["docker.io/foo"], "docker.io"),
    ("library/foo/bar", "library/foo/bar", "docker.io/library/foo/bar", [], "docker.io"),
    ("store/foo/bar", "store/foo/bar", "docker.io/store/foo/bar", [], "docker.io"),
    ("bar", "Foo/bar", "Foo/bar", [], "Foo"),
    ("bar", "FOO/bar", "FOO/bar", [], "FOO"),
]


@pytest.mark.parametrize("remote, familiar, full, ambiguous, domain", REPOSITORY_INFO, ids=lambda v: str(v)[:30])
def test_repository_info_as_distribution_normalises_it(remote, familiar, full, ambiguous, domain):
    for spelling in [familiar, full, *ambiguous]:
        ref = parse_normalized(spelling)
        assert (ref.domain, ref.path) == (domain, remote), spelling
        assert ref.familiar == familiar, spelling
        assert str(ref) == full, spelling


def test_tag_and_digest_together_as_distribution_keeps_them():
    short = "busybox:latest@sha256:86e0e091d0da6bde2456dbb48306f3956bbeb2eae1b5b9a43045843f69fe4aaa"
    ref = parse_normalized(short)
    assert str(ref) == "docker.io/library/" + short
    assert ref.tag == "latest" and ref.digest.startswith("sha256:86e0")
    assert ref.familiar == short


@pytest.mark.parametrize("alias", ["docker.io", "index.docker.io", "registry-1.docker.io"])
def test_every_docker_hub_alias_is_docker_hub(alias):
    """One deliberate difference from distribution: registry-1.docker.io is Docker Hub too (its API host)."""
    assert parse_normalized(f"{alias}/nginx:1.25") == Reference("docker.io", "library/nginx", "1.25")
    assert parse_normalized(f"{alias}/team/app") == Reference("docker.io", "team/app")


# regexp_test.go TestDomainRegexp, through whole references "<domain>/repo" (valid ones only parse with a domain).
DOMAINS = [("test.com", True), ("test.com:10304", True), ("test.com:http", False), ("localhost", True),
           ("localhost:8080", True), ("a.b", True), ("ab.cd.com", True), ("a-b.com", True), ("-ab.com", False),
           ("ab-.com", False), ("ab.c-om", True), ("ab.-com", False), ("ab.com-", False), ("0101.com", True),
           ("001a.com", True), ("b.gbc.io:443", True), ("xn--n3h.com", True), ("Asdf.com", True),
           ("192.168.1.1:75050", True), ("[fd00:1:2::3]:75050", True), ("[fd00:1:2::3]75050", False),
           ("[fd00:1:2::3]::75050", False), ("[fd00:1:2::3%eth0]:75050", False),
           ("[2001:0db8:85a3:0000:0000:8a2e:0370:7334]:75050", True), ("fd00:1:2::3:75050", False)]


@pytest.mark.parametrize("domain, valid", DOMAINS)
def test_registry_hosts_as_distribution_reads_them(domain, valid):
    if valid:
        assert parse_normalized(f"{domain}/repo").domain == domain
    else:
        with pytest.raises(ReferenceError):
            parse_normalized(f"{domain}/repo")


ROUND_TRIP = [text for text, *_ in PARSE_VALID] + NORMALIZED_VALID + [
    "ghcr.io/my-org/app:1.0_rc1", f"ghcr.io/my-org/app@{DIGEST}", f"registry.example.com:5000/team/app:v1@{DIGEST}",
    "nginx", "nginx:1.25", "localhost:5000/app:v1.tar", "[::1]:5000/team/app:__x"]


@pytest.mark.parametrize("text", ROUND_TRIP, ids=lambda v: v[:40])
def test_ref_path_reads_back_to_the_same_reference(text):
    """Every reference the grammar accepts (and docker normalises) has a /ref/ path that the server reads back
    to it: what the URL builders write, the route parses."""
    ref = parse_normalized(text)
    path = ref_path(ref)
    assert path.startswith("/ref/") and path.endswith(".tar") and "?" not in path and "#" not in path
    read = reference_from_path(unquote(path.removeprefix("/ref/")))
    expected = ref if (ref.tag or ref.digest) else Reference(ref.domain, ref.path, DEFAULT_TAG)
    assert read == expected
    assert ref_path(ref, client_auth=True) == "/ref-auth/" + path.removeprefix("/ref/")


def test_a_path_without_tar_says_how_the_route_is_spelled():
    with pytest.raises(ReferenceError) as info:
        reference_from_path("ghcr.io/my-org/app:1.0")
    assert info.value.rule == "extension" and "/ref/ghcr.io/my-org/app:1.0.tar" in str(info.value)


@pytest.mark.parametrize("text, says", [
    ("https://ghcr.io/my-org/app:1.0", "is a URL"),
    ("ghcr.io/my-org/app:.bad", 'the tag ".bad" is not valid'),
    ("ghcr.io/my-org/app@sha256:xyz", "is not a digest"),
    ("ghcr.io/My-Org/app:1", "must be lowercase"),
])
def test_errors_name_the_broken_rule(text, says):
    with pytest.raises(ReferenceError) as info:
        parse_normalized(text)
    assert says in str(info.value)


def test_pathological_references_are_refused_quickly():
    started = time.monotonic()
    for text in ("a" * 5000, "a." * 500 + "!", "a-" * 500 + "/", "a" * 200 + "/" + "b_" * 300 + "!",
                 "[" + "a" * 900 + "/a", "a/" * 500 + "A"):
        with pytest.raises(ReferenceError):
            parse_normalized(text)
    assert time.monotonic() - started < 1.0


def test_the_grammar_is_distributions_regexp():
    """The composed regexp, written out as regexp.go's ReferenceRegexp expands it."""
    from docker_http_passthrough.shared import reference

    assert reference.REFERENCE_RE.pattern.startswith("^((?:(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])")
    assert re.compile(reference.REFERENCE_RE.pattern).match("docker.io/library/nginx:1.25")
