"""The seam where every MCP request is written down. A durable, tamper-evident log plugs in here later.

``call`` is entered before anything is forwarded and left after the outcome is known, so a durable
implementation can write first and refuse to forward if it cannot (fail closed).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

from bastion.domain.connections import Principal


@dataclass(slots=True)
class CallRecord:
    """One MCP request as the audit log will see it. Arguments are never stored here, only names."""

    method: str
    gateway: str
    principal: Principal | None
    name: str | None = None
    outcome: str = "ok"
    reason: str | None = None
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    finished_at: datetime | None = None


class Audit:
    """The default sink: keeps the seam's contract (one record per request, outcome filled in) and the last records
    in memory for inspection; the durable log replaces it."""

    def __init__(self, keep: int = 0) -> None:
        self._keep = keep
        self.records: list[CallRecord] = []

    @asynccontextmanager
    async def call(self, record: CallRecord) -> AsyncGenerator[CallRecord, None]:
        try:
            yield record
        except BaseException as exc:
            if record.outcome == "ok":
                record.outcome = "error"
                record.reason = record.reason or type(exc).__name__
            raise
        finally:
            record.finished_at = datetime.now(UTC)
            if self._keep:
                self.records.append(record)
                del self.records[: -self._keep]

    async def refused(self, record: CallRecord) -> None:
        """A request turned away at the door (bad token, disabled host …): written down all the same."""
        async with self.call(record):
            pass
