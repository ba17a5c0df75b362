"""Property-based tests (hypothesis) of the parsers hostile input reaches first: download filenames, the
registry's WWW-Authenticate challenge, manifests and indexes, and the Range header.

Each parser must never fail with anything but its own error, and what it accepts must mean what the rules say.
Example counts are bounded and derandomized for CI (profile "ci" in conftest); HYPOTHESIS_PROFILE=dev searches
wider.
"""

from __future__ import annotations

import json
import re
import string

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from docker_http_passthrough.api.ranges import UnsatisfiableRange, requested_range
from docker_http_passthrough.shared import manifest as mf
from docker_http_passthrough.shared import platforms
from docker_http_passthrough.shared.platforms import parse_platform
from docker_http_passthrough.shared.errors import PassthroughError
from docker_http_passthrough.shared.name import (
    NAME_MAX,
    FilenameError,
    ImageName,
    filename_for,
    parse_filename,
)
from docker_http_passthrough.shared.registry_auth import parse_challenge

# --------------------------------------------------------------------------- filenames

COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*")
TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
RULES = {"slash", "extension", "tag_separator", "empty_path", "empty_tag", "invalid_tag", "name_too_long",
         "empty_component", "invalid_component"}

filename_text = st.one_of(
    st.text(max_size=300),
    st.from_regex(r"[a-zA-Z0-9_.\-/]{0,60}\.tar", fullmatch=True),
    st.from_regex(r"([a-z0-9]{1,8}(_|__|-|\.)){0,6}[a-z0-9]{1,8}_[A-Za-z0-9_.\-]{1,12}\.tar", fullmatch=True),
)
ALNUM = st.text(alphabet=string.ascii_lowercase + string.digits, min_size=1, max_size=6)
components = st.builds(lambda first, rest: first + "".join(sep + run for sep, run in rest), ALNUM,
                       st.lists(st.tuples(st.sampled_from([".", "_", "__", "-", "--"]), ALNUM), max_size=3))
images = st.builds(
    ImageName,
    repository=st.lists(components, min_size=1, max_size=4).map("/".join).filter(lambda r: len(r) <= NAME_MAX),
    tag=st.text(alphabet=string.ascii_letters + string.digits + "_.-", min_size=1, max_size=20).filter(
        lambda t: TAG.fullmatch(t) is not None),
)


@given(filename_text, st.booleans(), st.sampled_from([None, "team", "team/base"]))
@example("Nginx_latest.tar", True, None)
@example("a" * 300 + "_x.tar", False, None)
def test_filename_parser_fails_only_with_filename_error_and_accepts_only_the_grammar(filename, docker_hub, namespace):
    try:
        image = parse_filename(filename, docker_hub=docker_hub, default_namespace=namespace)
    except FilenameError as exc:
        assert exc.rule in RULES
        assert str(exc)
        return
    assert len(image.repository) <= NAME_MAX
    assert all(COMPONENT.fullmatch(part) for part in image.repository.split("/")), image
    assert TAG.fullmatch(image.tag) and "_" not in image.tag
    assert filename.endswith(".tar") and f"_{image.tag}.tar" in filename


def _representable(image: ImageName, docker_hub: bool) -> bool:
    parts = image.repository.split("/")
    single = len(parts) == 1 and (docker_hub or "_" in parts[0])  # Docker Hub puts library/ in front of those
    return "_" not in image.tag and not any("__" in p for p in parts) and not single


@given(images, st.booleans())
@example(ImageName("team/platform/api", "2026.06"), False)
@example(ImageName("myrepo/my_app", "v1"), False)
@example(ImageName("my_app", "v1"), False)
@example(ImageName("library/nginx", "1.25"), True)
def test_filename_round_trip(image, docker_hub):
    """filename_for (the reference rules' direction) and parse_filename are one rule set."""
    try:
        filename = filename_for(image.repository, image.tag, docker_hub=docker_hub)
    except FilenameError as exc:
        assert not _representable(image, docker_hub), (exc.rule, image)
        return
    assert _representable(image, docker_hub)
    assert parse_filename(filename, docker_hub=docker_hub) == image


# --------------------------------------------------------------------------- WWW-Authenticate

TCHAR = string.ascii_letters + string.digits + "!#$%&'*+.^_`|~-"
tokens = st.text(alphabet=TCHAR, min_size=1, max_size=16)
values = st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), max_size=60)
spaces = st.sampled_from(["", " ", "  ", "\t"])


@given(st.text(max_size=400))
@example('Bearer realm="unterminated')
@example('Bearer realm="a\\')
@example('Bearer ' + 'x="' * 200)
def test_challenge_parser_never_raises(header):
    scheme, params = parse_challenge(header)
    assert isinstance(scheme, str) and scheme == scheme.lower()
    assert all(isinstance(k, str) and k == k.lower() and isinstance(v, str) for k, v in params.items())


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@given(tokens, st.dictionaries(tokens.map(str.lower), st.tuples(values, st.booleans()), max_size=5),
       spaces, spaces)
def test_challenge_round_trip(scheme, params, around_equals, after_comma):
    parts = []
    for name, (value, as_token) in params.items():
        plain = as_token and value and all(c in TCHAR for c in value)
        parts.append(f"{name.upper() if as_token else name}{around_equals}={around_equals}"
                     f"{value if plain else _quoted(value)}")
    header = f"{scheme} " + f",{after_comma}".join(parts)
    assert parse_challenge(header) == (scheme.lower(), {name: value for name, (value, _) in params.items()})


def test_challenge_of_real_registries():
    assert parse_challenge('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
                           'scope="repository:library/nginx:pull"') == ("bearer", {
                               "realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                               "scope": "repository:library/nginx:pull"})
    assert parse_challenge('Basic realm="Registry Realm"') == ("basic", {"realm": "Registry Realm"})
    assert parse_challenge("Bearer realm=\"a \\\"quoted\\\" realm\", service=token-form") == (
        "bearer", {"realm": 'a "quoted" realm', "service": "token-form"})


# --------------------------------------------------------------------------- manifests and indexes

HEX = "0123456789abcdef"
digests = st.one_of(
    st.text(alphabet=HEX, min_size=64, max_size=64).map("sha256:".__add__),
    st.text(alphabet=HEX, min_size=128, max_size=128).map("sha512:".__add__),
    st.sampled_from(["", "sha256:", "sha256:../../etc/passwd", "SHA256:" + "A" * 64, "md5:x"]),
    st.text(max_size=20),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
media_types = st.one_of(st.sampled_from(sorted(mf.GZIP_LAYERS | mf.PLAIN_LAYERS) + list(mf.IMAGE_MANIFESTS)
                                        + list(mf.INDEXES) + list(mf.SCHEMA1)), json_values)
platforms = st.fixed_dictionaries({}, optional={
    "os": st.sampled_from(["linux", "windows"]) | json_values,
    "architecture": st.sampled_from(["amd64", "arm64"]) | json_values,
    "variant": st.sampled_from(["v8", "v7"]) | json_values})
descriptors = st.fixed_dictionaries({}, optional={
    "mediaType": media_types, "digest": digests | json_values,
    "size": st.integers(min_value=-5, max_value=1 << 40) | json_values,
    "platform": platforms | json_values,
    "annotations": st.dictionaries(st.sampled_from([mf.REFERENCE_TYPE, "org.opencontainers.x"]), json_values)
    | json_values})
documents = st.fixed_dictionaries({}, optional={
    "schemaVersion": st.sampled_from([1, 2]) | json_values, "mediaType": media_types,
    "config": descriptors | json_values, "layers": st.lists(descriptors, max_size=4) | json_values,
    "manifests": st.lists(descriptors, max_size=4) | json_values})


def _encoded(doc: object, nan_style: bool) -> bytes:
    return json.dumps(doc, allow_nan=nan_style).encode() if nan_style else json.dumps(doc, default=str).encode()


manifest_bytes = st.one_of(
    st.builds(_encoded, documents | json_values, st.booleans()).filter(bool),
    st.binary(max_size=200),
    st.sampled_from([b"[" * 100_000, b'{"layers": ' + b"[" * 50_000, b"Infinity", b'{"config": {"size": 1e999}}']),
)


def _valid(descriptor: mf.Descriptor) -> bool:
    return bool(re.fullmatch(r"sha256:[0-9a-f]{64}", descriptor.digest)) and descriptor.size >= 0 \
        and type(descriptor.size) is int and isinstance(descriptor.media_type, str)


@given(manifest_bytes, st.sampled_from(["linux/amd64", "linux/arm64/v8"]))
@example(b'{"layers": 5}', "linux/amd64")
@example(b'{"manifests": [1, "x", {"platform": []}]}', "linux/amd64")
@example(b'{"config": {"mediaType": "x", "digest": "sha256:' + b"a" * 64 + b'", "size": NaN}}', "linux/amd64")
def test_manifest_parsers_give_a_result_or_our_error(data, platform):
    try:
        manifest = mf.parse_image_manifest(data)
    except PassthroughError:
        pass
    else:
        assert _valid(manifest.config) and all(_valid(layer) for layer in manifest.layers)
        assert all(layer.media_type in mf.GZIP_LAYERS | mf.ZSTD_LAYERS | mf.PLAIN_LAYERS for layer in manifest.layers)
    wanted = parse_platform(platform)
    try:
        chosen = mf.select_platform(data, wanted)
    except PassthroughError:
        pass
    else:
        assert _valid(chosen)
        entry = next(e for e in json.loads(data)["manifests"]
                     if isinstance(e, dict) and e.get("digest") == chosen.digest)
        assert platforms.fit(platforms.offered(entry["platform"]), wanted)  # its platform, however spelled
    try:
        declared = mf.media_type_of(data, "fallback/type")
    except PassthroughError:
        pass
    else:
        assert isinstance(declared, str) and declared


# --------------------------------------------------------------------------- Range

ETAG = '"abc"'
positions = st.integers(min_value=0, max_value=1 << 45)


def _digits(n: int, zeros: int) -> str:
    return "0" * zeros + str(n)


def _answer(header: str, size: int, if_range: str | None = None):
    try:
        return requested_range(header, if_range, ETAG, size)
    except UnsatisfiableRange:
        return "416"


@given(st.one_of(st.text(max_size=60), st.from_regex(r"\s*(bytes|BYTES|items)\s*=\s*[0-9 ,-]{0,20}\s*",
                                                      fullmatch=True)),
       st.integers(min_value=0, max_value=1 << 40))
@example("bytes=" + "9" * 5000 + "-", 100)
@example("bytes=٣-", 100)  # an Arabic-Indic digit is not a DIGIT
def test_range_results_are_always_inside_the_archive(header, size):
    answer = _answer(header, size)
    if isinstance(answer, tuple):
        start, end = answer
        assert 0 <= start < end <= size
    if not re.fullmatch(r"bytes=[0-9]*-[0-9]*", header.strip(), re.IGNORECASE):
        assert answer is None, "only a single byte-range-spec is ever honoured"


@given(positions, positions, st.integers(min_value=1, max_value=1 << 40), st.integers(0, 3), st.integers(0, 3))
def test_first_last_ranges_follow_rfc_9110(first, last, size, zeros_a, zeros_b):
    answer = _answer(f"bytes={_digits(first, zeros_a)}-{_digits(last, zeros_b)}", size)
    if last < first:
        assert answer is None  # invalid: ignored, the whole archive is sent
    elif first >= size:
        assert answer == "416"
    else:
        assert answer == (first, min(last + 1, size))
    open_ended = _answer(f"bytes={first}-", size)
    assert open_ended == ("416" if first >= size else (first, size))


@given(positions, st.integers(min_value=1, max_value=1 << 40))
def test_suffix_ranges_follow_rfc_9110(length, size):
    answer = _answer(f"bytes=-{length}", size)
    assert answer == ("416" if length == 0 else (max(size - length, 0), size))


@given(positions, positions, st.integers(min_value=1, max_value=1 << 40), st.text(max_size=10))
def test_if_range_sends_everything_unless_it_matches(first, last, size, other):
    header = f"bytes={first}-{last}"
    assume(other.strip() != ETAG)
    assert _answer(header, size, if_range=other) is None
    assert _answer(header, size, if_range=ETAG) == _answer(header, size)


@pytest.mark.parametrize("header", ["bytes=0-1,3-4", "bytes=0-1, 3-4", "bytes=--1", "bytes=1-2-3", "bytes 0-1"])
def test_multi_and_malformed_ranges_are_ignored(header):
    assert _answer(header, 100) is None
