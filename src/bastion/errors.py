"""The one error root. Each subclass has a stable ``code``; edges map them to HTTP, JSON-RPC and HTML."""

from __future__ import annotations

from typing import Any, ClassVar, Final


class BastionError(Exception):
    """Root of every error Bastion raises on purpose."""

    code: ClassVar[str] = "internal"
    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str, *, field: str | None = None) -> None:
        super().__init__(detail)
        self.detail: Final = detail
        self.field: Final = field


PROBLEM_TYPE_BASE: Final = "urn:bastion:problem:"


def problem_of(error: BastionError) -> dict[str, Any]:
    """The error as an RFC 9457 problem document: the API's body, and the CLI's output under --json."""
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + error.code,
        "title": error.title,
        "status": error.status,
        "detail": error.detail,
        "code": error.code,
    }
    if error.field is not None:
        body["field"] = error.field
    return body


class ValidationFailed(BastionError):
    code = "validation_failed"
    status = 422
    title = "Invalid input"


class NotFound(BastionError):
    code = "not_found"
    status = 404
    title = "Not found"


class Conflict(BastionError):
    code = "conflict"
    status = 409
    title = "Conflict"


class VersionMismatch(BastionError):
    code = "version_mismatch"
    status = 412
    title = "Precondition failed"


class Unauthenticated(BastionError):
    code = "unauthenticated"
    status = 401
    title = "Authentication required"


class Forbidden(BastionError):
    code = "forbidden"
    status = 403
    title = "Forbidden"


class ConfigError(BastionError):
    """Settings that must not be used to start the service."""

    code = "config_invalid"
    status = 500
    title = "Configuration error"


class Unavailable(BastionError):
    code = "unavailable"
    status = 503
    title = "Service unavailable"


class Gone(BastionError):
    """Something that existed and is now over for good: an expired, revoked or used-up link or ticket."""

    code = "gone"
    status = 410
    title = "Gone"
