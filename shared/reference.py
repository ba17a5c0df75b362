"""Full image references, as `docker pull` takes them: the grammar of CNCF distribution
(github.com/distribution/reference, regexp.go and normalize.go), ported regex for regex.

    reference := name [ ":" tag ] [ "@" digest ]
    name      := [ domain "/" ] path-component [ "/" path-component ]*

The `/ref/<reference>.tar` download route reads one (see `reference_from_path`), which is how a tag with `_`
or a digest pin is asked for: the download filename cannot say either.

Normalisation follows distribution's ParseNormalizedNamed: a first component that contains "." or ":", is
"localhost" or has an uppercase letter names the registry; otherwise the registry is Docker Hub, where a
single-component name gets `library/`. One deliberate difference: every Docker Hub alias (`docker.io`,
`index.docker.io`, `registry-1.docker.io`) is Docker Hub, as everywhere else in this project.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote

from docker_http_passthrough.shared.name import DOCKER_HUB_HOSTS, EXTENSION, FilenameError

# --- the grammar (names as in distribution's regexp.go)
_ALPHANUMERIC = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_LOCALHOST = "localhost"
_DOMAIN_NAME_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_OPTIONAL_PORT = r"(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*[:][0-9a-fA-F]{32,}"
_IDENTIFIER = r"([a-f0-9]{64})"
_IPV6_ADDRESS = r"\[(?:[a-fA-F0-9:]+)\]"
_DOMAIN_NAME = _DOMAIN_NAME_COMPONENT + r"(?:\." + _DOMAIN_NAME_COMPONENT + r")*"
_HOST = "(?:" + _DOMAIN_NAME + "|" + _IPV6_ADDRESS + ")"
_DOMAIN_AND_PORT = _HOST + _OPTIONAL_PORT
_PATH_COMPONENT = _ALPHANUMERIC + "(?:" + _SEPARATOR + _ALPHANUMERIC + ")*"
_REMOTE_NAME = _PATH_COMPONENT + "(?:/" + _PATH_COMPONENT + ")*"
_NAME = "(?:" + _DOMAIN_AND_PORT + "/)?" + _REMOTE_NAME

# re.ASCII: Go's \w is [0-9A-Za-z_], never another script's letters.
REFERENCE_RE = re.compile("^(" + _NAME + ")(?::(" + _TAG + "))?(?:@(" + _DIGEST + "))?$", re.ASCII)
_ANCHORED_NAME_RE = re.compile("^(?:(" + _DOMAIN_AND_PORT + ")/)?(" + _REMOTE_NAME + ")$", re.ASCII)
_ANCHORED_IDENTIFIER_RE = re.compile("^" + _IDENTIFIER + "$")
_SHA256_RE = re.compile(r"sha256:[a-f0-9]{64}")

NAME_TOTAL_LENGTH_MAX = 255  # of the path, as distribution counts it
# Longer than any valid reference (host, path, tag and digest at their limits): refused before any regex runs.
REFERENCE_MAX = 1024
DEFAULT_DOMAIN = "docker.io"
OFFICIAL_REPO_PREFIX = "library/"
DEFAULT_TAG = "latest"
ROUTE = "/ref/"
AUTH_ROUTE = "/ref-auth/"


class ReferenceError(FilenameError):
    """An image reference that breaks the grammar; `.rule` is a short stable id, str(e) a sentence for users."""


@dataclass(frozen=True)
class Reference:
    domain: str  # as written, "" when the reference has none (only from parse(), never from parse_normalized())
    path: str  # the repository path at the registry
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        return f"{self.domain}/{self.path}" if self.domain else self.path

    def __str__(self) -> str:
        return self.name + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")

    @property
    def familiar(self) -> str:
        """As Docker shows it: Docker Hub's domain and a lone `library/` left out (`nginx:1.25`)."""
        if self.domain not in DOCKER_HUB_HOSTS:
            return str(self)
        path = self.path
        if path.startswith(OFFICIAL_REPO_PREFIX) and "/" not in path[len(OFFICIAL_REPO_PREFIX):]:
            path = path[len(OFFICIAL_REPO_PREFIX):]
        return str(Reference("", path, self.tag, self.digest))


def parse(text: str) -> Reference:
    """distribution's Parse: the grammar alone, nothing normalised."""
    if not text:
        raise ReferenceError("empty_reference", "the image reference is empty")
    if len(text) > REFERENCE_MAX:
        raise ReferenceError("reference_too_long", f"an image reference is at most {REFERENCE_MAX} characters")
    match = REFERENCE_RE.match(text)
    if match is None:
        if text.lower() != text and REFERENCE_RE.match(text.lower()):
            raise ReferenceError("uppercase", f'"{text}": the repository name must be lowercase')
        raise ReferenceError("invalid_reference", _why_invalid(text))
    name, tag, digest = match.groups()
    named = _ANCHORED_NAME_RE.match(name)
    domain, path = (named.group(1) or "", named.group(2)) if named else ("", name)
    if len(path) > NAME_TOTAL_LENGTH_MAX:
        raise ReferenceError("name_too_long",
                             f"the repository name must be at most {NAME_TOTAL_LENGTH_MAX} characters")
    if digest is not None and not _SHA256_RE.fullmatch(digest):
        raise ReferenceError("invalid_digest", f'"{digest}" is not a digest this server can pin: use '
                                               '"sha256:" and 64 lowercase hex digits')
    return Reference(domain, path, tag, digest)


def _why_invalid(text: str) -> str:
    """The likeliest broken rule, in words (the grammar itself only says yes or no)."""
    if text.startswith(("http://", "https://")):
        return f'"{text}" is a URL; give the image reference as docker pull takes it (host/path:tag)'
    name, _, digest = text.partition("@")
    if digest and not re.fullmatch(_DIGEST, digest):
        return f'"{digest}" is not a digest (like sha256:<64 hex digits>)'
    last = name.rsplit("/", 1)[-1]
    if ":" in last and not re.fullmatch(_TAG, last.split(":", 1)[1], re.ASCII):
        return (f'the tag "{last.split(":", 1)[1]}" is not valid: up to 128 letters, digits, "_", "." and "-", '
                'not starting with "." or "-"')
    return (f'"{text}" is not an image reference: repository path components are lowercase letters and '
            'digits joined by ".", "_", "__" or "-", separated by "/"; a registry host may come first')


def _split_docker_domain(name: str) -> tuple[str, str]:
    """distribution's splitDockerDomain (name: the reference without its digest)."""
    maybe_domain, slash, remainder = name.partition("/")
    if not slash:
        return DEFAULT_DOMAIN, OFFICIAL_REPO_PREFIX + name
    if (maybe_domain == _LOCALHOST or any(c in maybe_domain for c in ".:")
            or maybe_domain.lower() != maybe_domain):
        domain = maybe_domain
    else:
        domain, remainder = DEFAULT_DOMAIN, name
    if domain.lower() in DOCKER_HUB_HOSTS:
        domain = DEFAULT_DOMAIN
        if "/" not in remainder:
            remainder = OFFICIAL_REPO_PREFIX + remainder
    return domain, remainder


def parse_normalized(text: str) -> Reference:
    """distribution's ParseNormalizedNamed: `nginx` → docker.io/library/nginx. The domain stays as written (an
    uppercase first component is what makes `LOCALDOMAIN/app` name a registry); hosts compare lowercased."""
    if _ANCHORED_IDENTIFIER_RE.match(text):
        raise ReferenceError("identifier", f'"{text}" is a bare image id, not a reference: 64-digit hex names '
                                           "are not repository names")
    domain, remainder = _split_docker_domain(text)
    remote = remainder.split(":", 1)[0].split("@", 1)[0]
    if remote.lower() != remote:
        raise ReferenceError("uppercase", f'"{remote}": the repository name must be lowercase')
    return parse(f"{domain}/{remainder}")


# --- the /ref/ route: a reference in a URL path


def reference_from_path(path: str) -> Reference:
    """What `/ref/<path>` asks for: the reference before the final `.tar` (percent-decoding is the server's).

    A reference with neither tag nor digest means `:latest`, as for docker pull."""
    if not path.endswith(EXTENSION):
        raise ReferenceError("extension", f'a /ref/ path ends in "{EXTENSION}" after the image reference, like '
                                          f'/ref/ghcr.io/my-org/app:1.0{EXTENSION}')
    ref = parse_normalized(path[: -len(EXTENSION)])
    if ref.tag is None and ref.digest is None:
        ref = Reference(ref.domain, ref.path, DEFAULT_TAG)
    return ref


def ref_path(ref: Reference, *, client_auth: bool = False) -> str:
    """The path on this server that downloads `ref`: `/ref/<reference>.tar` (`/ref-auth/` when the client must
    send registry credentials). The reference is spelled in full (`docker.io/library/nginx:1.25`: no rule needed
    to read it back) and keeps "/", ":" and "@" as they are: all three are plain path characters in a URL, and no
    query string is needed. Only IPv6 brackets are encoded (curl reads "[" as a glob); anyone may percent-encode
    any other character, the server decodes the path before reading it."""
    return (AUTH_ROUTE if client_auth else ROUTE) + quote(str(ref), safe="/:@") + EXTENSION
