"""Errors that reach a user, each with the HTTP status the API answers and a sentence naming the cause."""

from __future__ import annotations


class PassthroughError(Exception):
    status: int = 502
    code: str = "error"

    def __init_subclass__(cls, *, status: int | None = None, code: str | None = None, **kwargs: object):
        super().__init_subclass__(**kwargs)
        if status is not None:
            cls.status = status
        if code is not None:
            cls.code = code

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 details: dict | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}  # more JSON fields for the user (e.g. the platforms an image has)
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code

    def to_dict(self) -> dict:
        return {**self.details, "error": self.code, "status": self.status, "message": self.message}

    def headers(self) -> dict[str, str]:
        """HTTP headers the answer needs besides the JSON body."""
        return {}

    @classmethod
    def from_dict(cls, data: dict) -> "PassthroughError":
        details = {k: v for k, v in data.items() if k not in ("error", "status", "message")}
        return cls(str(data.get("message", "preparation failed")), status=int(data.get("status", 502)),
                   code=str(data.get("error", "error")), details=details)


class BadRequest(PassthroughError, status=400, code="bad_request"):
    """The filename breaks a rule, or the registry host or the client's credentials are malformed."""


class NotFound(PassthroughError, status=404, code="not_found"):
    """No such repository, tag or platform at the registry."""


class Unauthorized(PassthroughError, status=401, code="registry_unauthorized"):
    """The registry refused access; the client may retry with (other) credentials."""


class Forbidden(PassthroughError, status=403, code="registry_forbidden"):
    """The registry refused the credentials that were sent."""


class Unreachable(PassthroughError, status=502, code="registry_unreachable"):
    """The registry did not answer, or answered with an error of its own (5xx, 429)."""


class InvalidContent(PassthroughError, status=502, code="invalid_content"):
    """The registry sent something that does not verify or that we cannot turn into an archive."""


class Unsupported(PassthroughError, status=502, code="unsupported"):
    """Content this tool does not turn into archives (schema1 manifests, zstd layers)."""


class TimedOut(PassthroughError, status=504, code="timeout"):
    """The registry or the preparation took too long, or the worker preparing the image died."""


class Unavailable(PassthroughError, status=503, code="unavailable"):
    """A part of this service is missing: Redis, CREDENTIALS_KEY, a volume shared with the workers."""


class NotAllowed(PassthroughError, status=403, code="registry_not_allowed"):
    """A host this server may not connect to for a client (REGISTRY_ALLOWED_HOSTS): a registry named in the
    URL, or a redirect or token realm it names."""


class LimitExceeded(PassthroughError, status=502, code="limit_exceeded"):
    """The registry sent more than a limit allows (size, layers, redirects, time); the message names the setting."""


class StoreFull(PassthroughError, status=507, code="store_full"):
    """No space left on the store's volume (CACHE_DIR)."""

    def __init__(self, message: str, *, written: int = 0, **kwargs):
        super().__init__(message, **kwargs)
        self.written = written  # bytes the failed write had put down: at least this much room is wanted


class PreparationFailed(PassthroughError, status=502, code="preparation_failed"):
    """A preparation that ended without saying why in our terms (an unexpected exception, a killed job)."""


def failure_of(exc: BaseException) -> PassthroughError:
    """What a user is told about a preparation that raised `exc`."""
    if isinstance(exc, PassthroughError):
        return exc
    return PreparationFailed(f"preparing the image failed: {type(exc).__name__}: {exc}")


class TooManyRequests(PassthroughError, status=429, code="too_many_requests"):
    """A cap on what one client, or all clients together, may have in progress; retry after `retry_after` s."""

    def __init__(self, message: str, *, retry_after: int, code: str | None = None):
        super().__init__(message, code=code)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}
