"""Linters on what ships besides Python: hadolint on the Dockerfiles, shellcheck on the shell scripts, yamllint
on all YAML, the workflow and compose files against their published JSON schemas (check-jsonschema's vendored
copies), and the bake file read as HCL and checked against the Dockerfiles and the workflow. All offline."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import hcl2
import pytest
import yaml

from docker_http_passthrough.cli import build_parser
from tests.support.services import REPO_ROOT

BIN = Path(sys.executable).parent
DOCKERFILES = ("Dockerfile.api", "Dockerfile.worker")
WORKFLOW = REPO_ROOT / ".github/workflows/publish.yml"


def run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / tool), *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def tracked(*patterns: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", *patterns],
                         cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    return sorted(set(out.split()))


def test_hadolint_dockerfiles():
    result = run("hadolint", "--failure-threshold", "info", *DOCKERFILES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_scripts():
    scripts = [p for p in tracked("scripts", ".ci") if p.endswith(".sh") or
               (REPO_ROOT / p).read_text(errors="replace").startswith("#!/usr/bin/env bash")]
    assert "scripts/test.sh" in scripts and ".ci/run" in scripts
    result = run("shellcheck", "--severity=style", *scripts)
    assert result.returncode == 0, result.stdout + result.stderr


def test_yamllint_every_yaml_file():
    files = tracked("*.yaml", "*.yml", ".yamllint")
    assert {"compose.yaml", ".github/workflows/publish.yml", "kubernetes/kustomization.yaml"} <= set(files)
    result = run("yamllint", "--strict", *files)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("schema, paths", [
    ("vendor.github-workflows", [".github/workflows/publish.yml"]),
    ("vendor.compose-spec", ["compose.yaml", "tests/compose/host-network.yaml"]),
])
def test_against_published_schemas(schema, paths):
    result = run("check-jsonschema", "--builtin-schema", schema, *paths)
    assert result.returncode == 0, result.stdout + result.stderr


def _unquote(value):
    if isinstance(value, str):
        return value.strip('"')
    if isinstance(value, list):
        return [_unquote(v) for v in value]
    if isinstance(value, dict):
        return {_unquote(k): _unquote(v) for k, v in value.items() if not k.startswith("__")}
    return value


def bake() -> tuple[dict[str, dict], dict[str, list[str]]]:
    """Targets with their inherited attributes resolved (as `docker buildx bake --print` would), and groups."""
    with open(REPO_ROOT / "docker-bake.hcl") as f:
        raw = hcl2.load(f)
    declared = {name: body for block in _unquote(raw["target"]) for name, body in block.items()}
    groups = {name: body["targets"] for block in _unquote(raw["group"]) for name, body in block.items()}

    def resolved(name: str) -> dict:
        merged: dict = {"ancestors": set()}
        for parent in declared[name].get("inherits", []):
            ancestors = merged["ancestors"] | {parent}
            merged.update(resolved(parent))
            merged["ancestors"] |= ancestors
        merged.update({k: v for k, v in declared[name].items() if k != "inherits"})
        return merged

    return {name: resolved(name) for name in declared}, groups


def dockerfile_args(path: str) -> set[str]:
    return set(re.findall(r"^ARG (\w+)", (REPO_ROOT / path).read_text(), flags=re.M))


def test_bake_file_builds_both_images_for_both_platforms():
    targets, groups = bake()
    for group, output, platforms in (("image-local", "type=docker", None),
                                     ("image-all", None, ["linux/amd64", "linux/arm64"]),
                                     ("image-push", "type=registry", ["linux/amd64", "linux/arm64"])):
        members = [targets[name] for name in groups[group]]
        assert sorted(t["dockerfile"] for t in members) == sorted(DOCKERFILES), group
        for target in members:
            assert target.get("platforms") == platforms, group
            assert target.get("output", [None])[0] == output, group
            assert set(target["args"]) <= dockerfile_args(target["dockerfile"])
            assert target["context"] == "." and target["tags"]
    assert groups["default"] == ["image-local"]


def test_publish_workflow_builds_on_pull_requests_and_pushes_main_sha_and_semver():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow["on"]
    assert triggers["push"]["branches"] == ["main"] and triggers["push"]["tags"] == ["v*.*.*"]
    assert "pull_request" in triggers
    steps = workflow["jobs"]["images"]["steps"]
    targets, groups = bake()
    metas = [s for s in steps if s.get("uses", "").startswith("docker/metadata-action@")]
    assert {m["with"]["bake-target"] for m in metas} == {"meta-api", "meta-worker"}
    for meta in metas:  # each image inherits the tags its metadata step writes
        image = "api" if meta["with"]["bake-target"] == "meta-api" else "worker"
        assert meta["with"]["bake-target"] in targets[f"{image}-push"]["ancestors"]
        tags = meta["with"]["tags"]
        for rule in ("type=ref,event=branch", "type=sha,prefix=sha-", "type=semver,pattern={{version}}"):
            assert rule in tags
    (build,) = [s for s in steps if s.get("uses", "").startswith("docker/bake-action@")]
    # PRs build image-all and push nothing; other events push.
    assert build["with"]["targets"] == \
        "${{ github.event_name == 'pull_request' && 'image-all' || 'image-push' }}"
    assert "image-all" in groups and "image-push" in groups
    (login,) = [s for s in steps if s.get("uses", "").startswith("docker/login-action@")]
    assert login["if"] == "github.event_name != 'pull_request'"


def test_dockerfile_commands_are_real_cli_commands():
    """CMD and HEALTHCHECK of both images parse with the project's own command line."""
    parser = build_parser()
    for path in DOCKERFILES:
        text = (REPO_ROOT / path).read_text().replace("\\\n", " ")
        commands = [json.loads(m) for m in re.findall(r"^(?:HEALTHCHECK .*?)?CMD (\[.*\])$", text, flags=re.M)]
        ours = [c for c in commands if c[0] == "docker-http-passthrough"]
        assert ours, path
        for command in ours:
            parser.parse_args(command[1:])
