"""shared.name's inverse: image references → download paths, the examples users read in the docs."""

import pytest

from docker_http_passthrough.shared.name import (
    FilenameError,
    download_path,
    filename_for,
    parse_filename,
    parse_reference,
    registry_scheme,
)
from tests.support.references import generate


@pytest.mark.parametrize("reference, registry_in_url, expected", [
    ("nginx", False, "/docker/nginx_latest.tar"),
    ("nginx:1.25", False, "/docker/nginx_1.25.tar"),
    ("docker.io/library/nginx:1.25", True, "/registry/https/docker.io/docker/nginx_1.25.tar"),
    ("index.docker.io/myrepo/myimage:v1.0", False, "/docker/myrepo_myimage_v1.0.tar"),
    ("ghcr.io/my-org/private-image", True, "/registry/https/ghcr.io/docker/my-org_private-image_latest.tar"),
    ("registry.example.com:5000/team/platform/api:2026.06", True,
     "/registry/https/registry.example.com:5000/docker/team__platform__api_2026.06.tar"),
    ("localhost:5000/team/my_app:2", True, "/registry/http/localhost:5000/docker/team_my_app_2.tar"),
    ("127.1.2.3/my_org/app", True, "/registry/http/127.1.2.3/docker/my_org__app_latest.tar"),
    ("[::1]:5000/a/b", True, "/registry/http/%5B::1%5D:5000/docker/a_b_latest.tar"),
    ("registry.lab/app", True, "/registry/https/registry.lab/docker/app_latest.tar"),
])
def test_reference_to_path(reference, registry_in_url, expected):
    assert download_path(parse_reference(reference), registry_in_url=registry_in_url) == expected


def test_switch_credentials_and_insecure_registries():
    ref = parse_reference("registry.lab:5000/team/app:1.4")
    assert download_path(ref, registry_in_url=True, client_auth=True, insecure_registry=True) == \
        "/registry-auth/http/registry.lab:5000/docker/team_app_1.4.tar"
    assert registry_scheme("docker.io", insecure=True) == "https"
    assert registry_scheme("128.0.0.1") == "https" and registry_scheme("127.255.255.255") == "http"


@pytest.mark.parametrize("reference, rule", [
    ("nginx:1.0_beta", "tag_underscore"),
    ("nginx@sha256:" + "ab" * 32, "digest"),
    ("registry.lab/team/a__b", "component_double_underscore"),
    ("registry.lab/my_app", "single_component_underscore"),
    ("Team/app", "uppercase"),
    ("registry.lab:0/app", "invalid_registry"),
    ("nginx:-x", "invalid_tag"),
    ("nginx@sha256:zz", "invalid_digest"),
    ("", "empty_reference"),
])
def test_what_a_filename_cannot_say(reference, rule):
    with pytest.raises(FilenameError) as caught:
        download_path(parse_reference(reference), registry_in_url=True)
    assert caught.value.rule == rule


def test_default_namespace_changes_single_component_names():
    assert filename_for("library/nginx", "1", docker_hub=True, default_namespace="myorg") == "library_nginx_1.tar"
    with pytest.raises(FilenameError) as caught:
        filename_for("nginx", "1", docker_hub=False, default_namespace="myorg")
    assert caught.value.rule == "single_component"


def test_every_generated_filename_parses_back():
    """The inverse and the parser are one rule set (filename_for also checks this itself, on every call)."""
    checked = 0
    for case in generate(seed=5, count=400):
        try:
            ref = parse_reference(case.reference)
            filename = filename_for(ref.repository, ref.tag or "latest", docker_hub=ref.docker_hub,
                                    default_namespace=case.default_namespace)
        except FilenameError:
            continue
        image = parse_filename(filename, docker_hub=ref.docker_hub, default_namespace=case.default_namespace)
        assert (image.repository, image.tag) == (ref.repository, ref.tag or "latest")
        checked += 1
    assert checked >= 150
