"""Tests for shared.name: download filenames -> image references -> RepoTags."""

import json
import pickle
import subprocess
import sys

import pytest

from docker_http_passthrough.shared.name import (
    FilenameError,
    ImageName,
    parse_filename,
    repo_tag,
)


def ref(image: ImageName) -> str:
    return f"{image.repository}:{image.tag}"


# filename, docker_hub=True, docker_hub=False
TABLE = [
    ("nginx_latest.tar", "library/nginx:latest", "nginx:latest"),
    ("nginx_1.25.tar", "library/nginx:1.25", "nginx:1.25"),
    ("library_nginx_latest.tar", "library/nginx:latest", "library/nginx:latest"),
    ("myrepo_myimage_v1.0.tar", "myrepo/myimage:v1.0", "myrepo/myimage:v1.0"),
    ("team__platform__api_2026.06.tar", "team/platform/api:2026.06", "team/platform/api:2026.06"),
    ("my-org__private-image_latest.tar", "my-org/private-image:latest", "my-org/private-image:latest"),
]


@pytest.mark.parametrize(
    "filename, docker_hub, expected",
    [
        pytest.param(f, hub, exp, id=f"{f}-{'hub' if hub else 'other'}")
        for f, on_hub, off_hub in TABLE
        for hub, exp in ((True, on_hub), (False, off_hub))
    ],
)
def test_filename_maps_to_repository_and_tag_on_and_off_docker_hub(filename, docker_hub, expected):
    assert ref(parse_filename(filename, docker_hub=docker_hub)) == expected


@pytest.mark.parametrize(
    "filename, expected",
    [
        ("a_b_c_latest.tar", "a/b_c:latest"),  # first single "_" splits, rest literal
        ("team__my_app_v2.tar", "team/my_app:v2"),  # "__" mode: single "_" literal
        ("a__b_c__d_1.tar", "a/b_c/d:1"),
        ("my.org_img-x_1.0-rc.1.tar", "my.org/img-x:1.0-rc.1"),
        ("a--b_c_x.tar", "a--b/c:x"),  # repeated dashes are in the grammar
        ("nginx_LATEST.tar", "library/nginx:LATEST"),  # tags may be uppercase
        ("nginx_" + "t" * 128 + ".tar", "library/nginx:" + "t" * 128),
    ],
)
def test_first_single_underscore_splits_and_the_rest_stays_literal(filename, expected):
    assert ref(parse_filename(filename, docker_hub=True)) == expected


@pytest.mark.parametrize("docker_hub", [True, False])
def test_default_namespace_prefixes_single_component(docker_hub):
    image = parse_filename("nginx_latest.tar", docker_hub=docker_hub, default_namespace="myorg")
    assert image == ImageName("myorg/nginx", "latest")


@pytest.mark.parametrize("docker_hub", [True, False])
@pytest.mark.parametrize(
    "filename, expected",
    [
        ("library_nginx_latest.tar", "library/nginx:latest"),
        ("myrepo_myimage_v1.0.tar", "myrepo/myimage:v1.0"),
        ("team__platform__api_2026.06.tar", "team/platform/api:2026.06"),
    ],
)
def test_default_namespace_leaves_multi_component_alone(filename, expected, docker_hub):
    image = parse_filename(filename, docker_hub=docker_hub, default_namespace="myorg")
    assert ref(image) == expected


def test_default_namespace_may_be_nested():
    image = parse_filename("api_1.tar", docker_hub=False, default_namespace="team/platform")
    assert image == ImageName("team/platform/api", "1")


@pytest.mark.parametrize("empty", [None, ""])
def test_empty_default_namespace_is_ignored(empty):
    image = parse_filename("nginx_latest.tar", docker_hub=True, default_namespace=empty)
    assert image == ImageName("library/nginx", "latest")


@pytest.mark.parametrize("namespace", ["MyOrg", "my org", "-org", "org/", "a" * 300])
def test_invalid_default_namespace_is_a_config_error(namespace):
    with pytest.raises(ValueError) as info:
        parse_filename("nginx_latest.tar", docker_hub=True, default_namespace=namespace)
    assert not isinstance(info.value, FilenameError)
    assert "default namespace" in str(info.value)


@pytest.mark.parametrize(
    "filename, rule, quoted",
    [
        pytest.param("nginx_latest", "extension", '".tar"', id="missing-tar"),
        pytest.param("nginx_latest.TAR", "extension", '".tar"', id="uppercase-TAR"),
        pytest.param("nginx_latest.tar.gz", "extension", '".tar"', id="tar-gz"),
        pytest.param("nginx.tar", "tag_separator", '"nginx.tar"', id="no-underscore"),
        pytest.param(".tar", "tag_separator", '".tar"', id="only-extension"),
        pytest.param("nginx_.tar", "empty_tag", '"nginx_.tar"', id="empty-tag"),
        pytest.param("_latest.tar", "empty_path", '"_latest.tar"', id="empty-path"),
        pytest.param("_.tar", "empty_path", '"_.tar"', id="only-underscore"),
        pytest.param("Nginx_latest.tar", "invalid_component", '"Nginx"', id="uppercase"),
        pytest.param("ngi$nx_latest.tar", "invalid_component", '"ngi$nx"', id="dollar"),
        pytest.param("ngi nx_latest.tar", "invalid_component", '"ngi nx"', id="space"),
        pytest.param("nginé_latest.tar", "invalid_component", '"nginé"', id="non-ascii"),
        pytest.param("-nginx_latest.tar", "invalid_component", '"-nginx"', id="leading-dash"),
        pytest.param(".nginx_latest.tar", "invalid_component", '".nginx"', id="leading-dot"),
        pytest.param("nginx-_latest.tar", "invalid_component", '"nginx-"', id="trailing-dash"),
        pytest.param("team__-api_latest.tar", "invalid_component", '"-api"', id="nested-leading-dash"),
        pytest.param("a..b_latest.tar", "invalid_component", '"a..b"', id="double-dot"),
        pytest.param("a___b_latest.tar", "invalid_component", '"_b"', id="triple-underscore"),
        pytest.param("a____b_latest.tar", "empty_component", '"a//b"', id="quad-underscore"),
        pytest.param("nginx__latest.tar", "empty_component", '"nginx/"', id="double-before-tag"),
        pytest.param("team__api___latest.tar", "empty_component", '"team/api/"', id="trailing-nested"),
        pytest.param("_nginx_latest.tar", "empty_component", '"/nginx"', id="leading-underscore"),
        pytest.param("nginx_.latest.tar", "invalid_tag", '".latest"', id="tag-leading-dot"),
        pytest.param("nginx_-rc.tar", "invalid_tag", '"-rc"', id="tag-leading-dash"),
        pytest.param("nginx_v1+2.tar", "invalid_tag", '"v1+2"', id="tag-plus"),
        pytest.param("nginx_vé.tar", "invalid_tag", '"vé"', id="tag-non-ascii"),
        pytest.param("nginx_" + "t" * 129 + ".tar", "invalid_tag", "128", id="tag-too-long"),
        pytest.param("a" * 256 + "_latest.tar", "name_too_long", "255", id="long-single"),
        pytest.param("a" * 254 + "_b_latest.tar", "name_too_long", "255", id="long-pair"),
        pytest.param("nginx/x_latest.tar", "slash", '"/"', id="slash"),
        pytest.param("../nginx_latest.tar", "slash", '"/"', id="traversal"),
    ],
)
def test_bad_filename_names_the_broken_rule_and_quotes_the_part(filename, rule, quoted):
    with pytest.raises(FilenameError) as info:
        parse_filename(filename, docker_hub=True)
    assert info.value.rule == rule
    assert quoted in str(info.value)


def test_library_prefix_counts_toward_the_name_length_on_docker_hub():
    # 248 + len("library/") == 256 on Docker Hub, 248 alone is fine elsewhere.
    filename = "a" * 248 + "_latest.tar"
    assert parse_filename(filename, docker_hub=False).repository == "a" * 248
    with pytest.raises(FilenameError) as info:
        parse_filename(filename, docker_hub=True)
    assert info.value.rule == "name_too_long"


def test_a_255_character_repository_is_accepted():
    filename = "a" * 255 + "_latest.tar"
    assert parse_filename(filename, docker_hub=False).repository == "a" * 255


PATHOLOGICAL = ["a-" * 120 + "$", "a" * 240 + "$", "a__" * 80 + "$", "a.-" * 80 + "$"]


def test_pathological_filenames_are_rejected_within_seconds():
    """Long alternating input must not make the component regex backtrack: a backtracking grammar takes longer than
    the universe on these; ours must reject each 200 times within the child's time limit (a regex cannot be
    interrupted in this process, so it runs in a child that is killed when the limit passes)."""
    code = (
        "import json, time\n"
        "from docker_http_passthrough.shared.name import FilenameError, parse_filename\n"
        f"rules = []\nstarted = time.monotonic()\n"
        f"for path in {PATHOLOGICAL!r}:\n"
        "    for _ in range(200):\n"
        "        try:\n"
        "            parse_filename(path + '_latest.tar', docker_hub=False)\n"
        "        except FilenameError as exc:\n"
        "            rule = exc.rule\n"
        "    rules.append(rule)\n"
        "print(json.dumps({'rules': rules, 'seconds': time.monotonic() - started}))\n"
    )
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("rejecting pathological filenames took more than 20 s: the grammar backtracks")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["rules"] == ["invalid_component"] * len(PATHOLOGICAL)
    assert result["seconds"] < 5, result  # microseconds each when linear; a shared, busy machine allows more


def test_filename_error_keeps_its_rule_across_pickling():
    error = FilenameError("empty_tag", "filename has no tag")
    assert isinstance(error, ValueError)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.rule, str(copy)) == ("empty_tag", "filename has no tag")


@pytest.mark.parametrize(
    "image, registry_host, expected",
    [
        (ImageName("library/nginx", "latest"), None, "nginx:latest"),
        (ImageName("myrepo/myimage", "v1.0"), None, "myrepo/myimage:v1.0"),
        (ImageName("team/platform/api", "1"), None, "team/platform/api:1"),
        # Only "library/<single>" is shortened, as docker's FamiliarName does.
        (ImageName("library/team/api", "1"), None, "library/team/api:1"),
        (ImageName("nginx", "latest"), None, "nginx:latest"),
        (ImageName("library/nginx", "latest"), "docker.io", "nginx:latest"),
        (ImageName("library/nginx", "latest"), "registry-1.docker.io", "nginx:latest"),
        (ImageName("library/nginx", "latest"), "index.docker.io", "nginx:latest"),
        (ImageName("library/nginx", "latest"), "Index.Docker.IO", "nginx:latest"),
        (
            ImageName("team/platform/api", "2026.06"),
            "registry.example.com:5000",
            "registry.example.com:5000/team/platform/api:2026.06",
        ),
        (ImageName("nginx", "latest"), "127.0.0.1:5000", "127.0.0.1:5000/nginx:latest"),
        (ImageName("library/nginx", "latest"), "ghcr.io", "ghcr.io/library/nginx:latest"),
    ],
)
def test_repo_tag_names_the_image_as_docker_pull_would(image, registry_host, expected):
    assert repo_tag(image, registry_host=registry_host) == expected


@pytest.mark.parametrize(
    "filename, registry_host, expected",
    [
        ("nginx_latest.tar", None, "nginx:latest"),
        ("myrepo_myimage_v1.0.tar", None, "myrepo/myimage:v1.0"),
        ("nginx_latest.tar", "127.0.0.1:5000", "127.0.0.1:5000/nginx:latest"),
        (
            "team__platform__api_2026.06.tar",
            "registry.example.com:5000",
            "registry.example.com:5000/team/platform/api:2026.06",
        ),
    ],
)
def test_filename_gives_the_repo_tag_docker_load_shows(filename, registry_host, expected):
    image = parse_filename(filename, docker_hub=registry_host is None)
    assert repo_tag(image, registry_host=registry_host) == expected
