"""The one place errors become HTTP problem+json (RFC 9457) responses.

FastAPI is imported only where the admin API's handlers need it, so the listener (web/edge.py) and the outer app
can answer problems without loading the framework at start.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from bastion.errors import BastionError, problem_document
from bastion.web.logs import request_id_var

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger("bastion.api")


def problem_bytes(status: int, code: str, title: str, detail: str, **extra: Any) -> bytes:
    body = problem_document(status, code, title, detail, request_id=request_id_var.get() or None, **extra)
    return json.dumps(body, ensure_ascii=False).encode("utf-8")


def problem(
    status: int, code: str, title: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> Response:
    return Response(
        problem_bytes(status, code, title, detail, **extra),
        status_code=status,
        media_type="application/problem+json",
        headers=headers,
    )


def _field_of(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


async def _bastion_error(_request: Request, exc: Exception) -> Response:
    if not isinstance(exc, BastionError):  # pragma: no cover - registered for BastionError only
        raise exc
    headers = {"WWW-Authenticate": 'Bearer realm="bastion"'} if exc.status == 401 else None
    if exc.status >= 500:
        logger.error("request failed: %s", exc.code, extra={"code": exc.code})
    if exc.status == 503:
        headers = {"Retry-After": "5"}
    return problem(exc.status, exc.code, exc.title, exc.detail, headers=headers, field=exc.field)


async def _validation_error(_request: Request, exc: Exception) -> Response:
    from fastapi.exceptions import RequestValidationError

    if not isinstance(exc, RequestValidationError):  # pragma: no cover - registered for this type only
        raise exc
    errors = [
        {"field": _field_of(tuple(e.get("loc", ()))), "message": str(e.get("msg", "invalid"))} for e in exc.errors()
    ]
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
    return problem(422, "validation_failed", "Invalid input", detail, errors=errors)


async def _http_error(_request: Request, exc: Exception) -> Response:
    if not isinstance(exc, StarletteHTTPException):  # pragma: no cover - registered for this type only
        raise exc
    code = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}.get(exc.status_code, "http_error")
    return problem(
        exc.status_code, code, str(exc.detail), str(exc.detail), headers=dict(exc.headers) if exc.headers else None
    )


async def _unexpected(_request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error", exc_info=exc)
    return problem(500, "internal", "Internal error", "something went wrong; the request id identifies it in the logs")


def install(app: FastAPI) -> None:
    from fastapi.exceptions import RequestValidationError

    app.add_exception_handler(BastionError, _bastion_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
