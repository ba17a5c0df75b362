"""Image references from download filenames.

A client asks for ``GET /docker/<filename>``; the filename names the image:

* it ends in ``.tar``;
* the last ``_`` separates the image path from the tag (so a tag can never
  contain ``_``: that is a known limitation of the scheme);
* if the path contains ``__``, every ``__`` is a ``/`` and single underscores
  stay literal (``team__my_app`` -> ``team/my_app``); otherwise the first
  ``_`` separates namespace and image (``myrepo_myimage`` -> ``myrepo/myimage``);
* a single-component name gets ``default_namespace`` in front, or
  ``library/`` on Docker Hub.

Percent-decoding is not done here: the web framework already decoded the path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DOCKER_HUB_HOSTS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

# CNCF distribution reference grammar (github.com/distribution/reference).
# Each group needs its own alphanumeric run, so matching cannot backtrack badly.
_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*")
# re.ASCII: the grammar's \w means [A-Za-z0-9_], not any Unicode letter.
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)

EXTENSION = ".tar"
NAME_MAX = 255  # total repository length, as in the reference grammar
TAG_MAX = 128


class FilenameError(ValueError):
    """A download filename that breaks a rule. `.rule` is a short stable id, str(e) a sentence for users."""

    def __init__(self, rule: str, message: str):
        super().__init__(message)
        self.rule = rule

    # Default exception pickling would call FilenameError(message) and fail;
    # errors may cross process boundaries (job queue), so keep both fields.
    def __reduce__(self):
        return (type(self), (self.rule, str(self)))


@dataclass(frozen=True)
class ImageName:
    repository: str  # path at the registry, e.g. "library/nginx", "team/platform/api"
    tag: str


def _component_problem(component: str) -> str | None:
    """Why one repository path component is not valid, or None if it is."""
    if _COMPONENT_RE.fullmatch(component):
        return None
    hint = " (use lowercase)" if _COMPONENT_RE.fullmatch(component.lower()) else ""
    return (
        f'repository component "{component}" is not valid{hint}: components are '
        'lowercase letters and digits, joined by ".", "_", "__" or "-"'
    )


def _check_default_namespace(namespace: str) -> None:
    # A configuration mistake, not the user's: plain ValueError, not FilenameError.
    for component in namespace.split("/"):
        problem = _component_problem(component)
        if problem:
            raise ValueError(f'default namespace "{namespace}" is not valid: {problem}')
    if len(namespace) >= NAME_MAX:
        raise ValueError(f'default namespace "{namespace}" is too long')


def _path_and_tag(filename: str) -> tuple[str, str]:
    """The image path and the tag of a download filename, each checked on its own."""
    if "/" in filename:
        raise FilenameError("slash", f'filename must not contain "/": "{filename}"')
    if not filename.endswith(EXTENSION):
        raise FilenameError("extension", f'filename must end in "{EXTENSION}": "{filename}"')
    stem = filename[: -len(EXTENSION)]

    path, sep, tag = stem.rpartition("_")
    if not sep:
        raise FilenameError(
            "tag_separator",
            f'filename must separate image and tag with "_", like "nginx_latest.tar": "{filename}"',
        )
    if not path:
        raise FilenameError("empty_path", f'filename has no image name before the last "_": "{filename}"')
    if not tag:
        raise FilenameError("empty_tag", f'filename has no tag after the last "_": "{filename}"')
    if len(tag) > TAG_MAX:
        raise FilenameError("invalid_tag", f'tag must be at most {TAG_MAX} characters: "{tag}"')
    if not _TAG_RE.fullmatch(tag):
        raise FilenameError(
            "invalid_tag",
            f'tag "{tag}" is not valid: it must start with a letter or digit '
            'and contain only letters, digits, ".", "-"',
        )
    return path, tag


def parse_filename(
    filename: str, *, docker_hub: bool, default_namespace: str | None = None
) -> ImageName:
    """Turn a download filename such as ``nginx_latest.tar`` into an ImageName.

    Raises FilenameError (with a stable ``.rule``) if the filename breaks a
    rule, and a plain ValueError if ``default_namespace`` itself is invalid.
    """
    if default_namespace:
        _check_default_namespace(default_namespace)

    path, tag = _path_and_tag(filename)

    if "__" in path:
        components = path.split("__")
    else:
        components = path.split("_", 1)
    if len(components) == 1:
        if default_namespace:
            components = [default_namespace, *components]
        elif docker_hub:
            components = ["library", *components]

    # Check the length first: cheap, and keeps regex work bounded on huge input.
    repository = "/".join(components)
    if len(repository) > NAME_MAX:
        raise FilenameError(
            "name_too_long",
            f"repository name must be at most {NAME_MAX} characters, "
            f'got {len(repository)}: "{repository[:40]}..."',
        )
    # Split the joined name: default_namespace may itself hold several components.
    for component in repository.split("/"):
        if not component:
            raise FilenameError(
                "empty_component",
                f'filename "{filename}" gives an empty repository component in "{repository}"',
            )
        problem = _component_problem(component)
        if problem:
            raise FilenameError("invalid_component", problem)

    return ImageName(repository=repository, tag=tag)


def repo_tag(image: ImageName, *, registry_host: str | None) -> str:
    """The RepoTags entry for manifest.json, named as ``docker pull`` would name it.

    Docker Hub (``registry_host`` None or a Docker Hub host) uses the familiar
    short form (``nginx:latest``, ``myrepo/myimage:v1.0``); any other registry
    is spelled out (``registry.example.com:5000/team/api:1``).
    """
    if registry_host is None or registry_host.lower() in DOCKER_HUB_HOSTS:
        repository = image.repository
        # Like distribution's FamiliarName: only "library/<single>" is shortened.
        short = repository.removeprefix("library/")
        if short != repository and "/" not in short:
            repository = short
        return f"{repository}:{image.tag}"
    return f"{registry_host}/{image.repository}:{image.tag}"
