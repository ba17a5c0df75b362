"""Errors that reach a user, each with the HTTP status the API answers and a sentence naming the cause."""

from __future__ import annotations


class PassthroughError(Exception):
    status: int = 502
    code: str = "error"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code

    def to_dict(self) -> dict:
        return {"error": self.code, "status": self.status, "message": self.message}

    @classmethod
    def from_dict(cls, data: dict) -> "PassthroughError":
        return cls(str(data.get("message", "preparation failed")), status=int(data.get("status", 502)),
                   code=str(data.get("error", "error")))


class BadRequest(PassthroughError):
    status, code = 400, "bad_request"


class NotFound(PassthroughError):
    status, code = 404, "not_found"


class Unauthorized(PassthroughError):
    """The registry refused access; the client may retry with (other) credentials."""

    status, code = 401, "registry_unauthorized"


class Forbidden(PassthroughError):
    status, code = 403, "registry_forbidden"


class Unreachable(PassthroughError):
    status, code = 502, "registry_unreachable"


class InvalidContent(PassthroughError):
    """The registry sent something that does not verify or that we cannot turn into an archive."""

    status, code = 502, "invalid_content"


class Unsupported(PassthroughError):
    status, code = 502, "unsupported"


class TimedOut(PassthroughError):
    status, code = 504, "timeout"


class Unavailable(PassthroughError):
    status, code = 503, "unavailable"
