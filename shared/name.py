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
from urllib.parse import quote

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


# The tag a digest-only reference gets in the archive: `docker load` needs name:tag, never name@digest.
DIGEST_TAG_PREFIX = "sha256-"


@dataclass(frozen=True)
class ImageName:
    repository: str  # path at the registry, e.g. "library/nginx", "team/platform/api"
    tag: str | None  # None only for a digest-only reference (/ref/…@sha256:…)
    digest: str | None = None  # a digest pin: the registry is asked for this, never for the tag

    @property
    def reference(self) -> str:
        """What the registry is asked for: the pinned digest, else the tag."""
        return self.digest or self.tag or ""

    @property
    def archive_tag(self) -> str:
        """The tag inside the archive: the one given, else `sha256-<hex>` of the pinned digest."""
        return self.tag or DIGEST_TAG_PREFIX + (self.digest or "").removeprefix("sha256:")

    def __str__(self) -> str:
        return self.repository + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


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
    """The RepoTags entry for manifest.json, named as ``docker pull`` would name it (a digest pin keeps its tag
    when it has one; `docker load` refuses name@digest, so a digest-only pin is tagged `sha256-<hex>`).

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
        return f"{repository}:{image.archive_tag}"
    return f"{registry_host}/{image.repository}:{image.archive_tag}"


# -- The inverse: an image reference as `docker pull` takes it → the download path that asks for it. --------
# The same rules live in docs/index.html (the page's JavaScript) and reach users through the `url` and
# `prewarm` commands; tests/test_reference_agreement.py runs generated references through all three.

LOOPBACK_HOSTS = frozenset({"localhost", "::1"})
_DOMAIN_RE = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?")
_DIGEST_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9A-Fa-f]{32,}")
_IPV4_LOOPBACK_RE = re.compile(r"127(?:\.(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}")


@dataclass(frozen=True)
class Reference:
    registry: str  # lowercase host[:port]; "docker.io" for every Docker Hub alias
    repository: str  # path at the registry, "library/" added on Docker Hub as docker does
    tag: str | None
    digest: str | None

    @property
    def docker_hub(self) -> bool:
        return self.registry in DOCKER_HUB_HOSTS

    def __str__(self) -> str:
        return self.registry + "/" + self.repository + (f":{self.tag}" if self.tag else "") + (
            f"@{self.digest}" if self.digest else "")


def _split_host_port(registry: str) -> tuple[str, str | None]:
    if registry.startswith("["):
        host, _, rest = registry[1:].partition("]")
        return host, rest[1:] or None
    host, sep, port = registry.partition(":")
    return host, port if sep else None


def parse_reference(text: str) -> Reference:
    """`[registry/]path[:tag][@digest]`, normalised as `docker pull` does. Raises FilenameError (rules as ids)."""
    text = text.strip()
    if not text:
        raise FilenameError("empty_reference", "the image reference is empty")
    name, at, digest = text.partition("@")
    if at and not _DIGEST_RE.fullmatch(digest):
        raise FilenameError("invalid_digest", f'"{digest}" is not a digest (like sha256:<64 hex digits>)')
    first, slash, rest = name.partition("/")
    # As docker: a first component with "." or ":", or "localhost", names the registry. (Docker also takes an
    # uppercase one for a registry; we call it a repository that must be lowercase, the likelier mistake.)
    if slash and (any(c in first for c in ".:") or first == "localhost"):
        registry, path = first, rest
    else:
        registry, path = "docker.io", name
    path, colon, tag = path.partition(":")
    if not _DOMAIN_RE.fullmatch(registry):
        raise FilenameError("invalid_registry", f'"{registry}" is not a registry host (host or host:port)')
    port = _split_host_port(registry)[1]
    if port is not None and not 0 < int(port) < 65536:
        raise FilenameError("invalid_registry", f'registry port must be 1-65535: "{registry}"')
    registry = registry.lower()
    if registry in DOCKER_HUB_HOSTS:
        registry = "docker.io"
        if "/" not in path:
            path = f"library/{path}"
    if colon and (not tag or len(tag) > TAG_MAX or not _TAG_RE.fullmatch(tag)):
        raise FilenameError("invalid_tag", f'tag "{tag}" is not valid: at most {TAG_MAX} letters, digits, '
                                           '"_", "." and "-", not starting with "." or "-"')
    for component in path.split("/"):
        problem = _component_problem(component) if component else f'"{path}" has an empty path component'
        if problem:
            rule = "uppercase" if component.lower() != component else "invalid_component"
            raise FilenameError(rule, problem)
    if len(path) > NAME_MAX:
        raise FilenameError("name_too_long", f"repository name must be at most {NAME_MAX} characters")
    return Reference(registry, path, tag if colon else None, digest or None)


def registry_scheme(registry: str, *, insecure: bool = False) -> str:
    """http for loopback registries (as Docker allows by default) and when asked; https otherwise."""
    if registry in DOCKER_HUB_HOSTS:
        return "https"
    host = _split_host_port(registry)[0]
    loopback = host in LOOPBACK_HOSTS or bool(_IPV4_LOOPBACK_RE.fullmatch(host))
    return "http" if loopback or insecure else "https"


def filename_for(repository: str, tag: str, *, docker_hub: bool, default_namespace: str | None = None) -> str:
    """The download filename that parse_filename() turns back into (repository, tag).

    Raises FilenameError when the filename scheme cannot express the reference (a tag with "_", a component
    with "__", ...); `.rule` says which case it is.
    """
    if "_" in tag:
        raise FilenameError("tag_underscore", f'the tag "{tag}" contains "_", which separates image and tag in a '
                                              "filename: this tag cannot be asked for by filename")
    components = repository.split("/")
    if any("__" in component for component in components):
        raise FilenameError("component_double_underscore",
                            f'"{repository}" has a path component containing "__", which a filename reads as "/"')
    if len(components) == 1:
        if default_namespace or docker_hub:
            prefix = default_namespace or "library"
            raise FilenameError("single_component", f'"{repository}" has one path component, and this server '
                                                    f'puts "{prefix}/" in front of such names')
        if "_" in repository:
            raise FilenameError("single_component_underscore", f'"{repository}" is one path component with "_", '
                                                               'which a filename reads as "namespace_image"')
        stem = repository
    elif docker_hub and not default_namespace and components[0] == "library" and len(components) == 2 \
            and "_" not in components[1]:
        stem = components[1]  # "nginx" means library/nginx on Docker Hub
    elif len(components) == 2 and "_" not in components[0]:
        stem = "_".join(components)  # the first "_" separates namespace and image
    else:
        stem = "__".join(components)
    filename = f"{stem}_{tag}{EXTENSION}"
    # The two directions are one rule set: the parser must read back what we wrote (it also checks lengths).
    if parse_filename(filename, docker_hub=docker_hub, default_namespace=default_namespace) != ImageName(repository, tag):
        raise AssertionError(f"{filename} does not parse back to {repository}:{tag}")
    return filename


def download_path(ref: Reference, *, registry_in_url: bool, client_auth: bool = False, insecure_registry: bool = False,
                  default_namespace: str | None = None) -> str:
    """The path on this server that downloads `ref` (a tag; "latest" when none is given).

    `registry_in_url=False` gives `/docker/<filename>`, which the server resolves at its own registry
    (REGISTRY_URL): that must be the registry the reference names. `client_auth` (the switch sends registry
    credentials) picks `/registry-auth/...` when the registry is in the URL.
    """
    if ref.digest:
        hint = f'; drop "@{ref.digest}" to download the tag "{ref.tag}", which may have moved' if ref.tag else ""
        raise FilenameError("digest", f"a digest pin cannot be expressed as a download filename{hint}")
    filename = filename_for(ref.repository, ref.tag or "latest", docker_hub=ref.docker_hub,
                            default_namespace=default_namespace)
    if not registry_in_url:
        return f"/docker/{filename}"
    route = "registry-auth" if client_auth else "registry"
    host = quote(ref.registry, safe=":")  # IPv6 brackets are percent-encoded (curl reads "[" as a glob)
    return f"/{route}/{registry_scheme(ref.registry, insecure=insecure_registry)}/{host}/docker/{filename}"
