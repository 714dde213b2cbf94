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


def problem_document(status: int, code: str, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    """An RFC 9457 problem document; ``extra`` members that are None are left out."""
    body: dict[str, Any] = {"type": PROBLEM_TYPE_BASE + code, "title": title, "status": status, "detail": detail}
    body["code"] = code
    body.update({k: v for k, v in extra.items() if v is not None})
    return body


def problem_of(error: BastionError) -> dict[str, Any]:
    """The error as a problem document: the API's body, and the CLI's output under --json."""
    return problem_document(error.status, error.code, error.title, error.detail, field=error.field)


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
