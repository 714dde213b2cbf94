"""Per-request context every layer may read: the request id that ties logs, errors and audit events together."""

from __future__ import annotations

from contextvars import ContextVar

request_id_var: ContextVar[str | None] = ContextVar("bastion_request_id", default=None)
