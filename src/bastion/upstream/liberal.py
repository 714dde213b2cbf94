"""Liberal in what upstreams send: what a strict client would refuse, and what a peer plainly meant, is read as meant.

Servers met in the wild (the conformance suite's own TypeScript example server among them) answer 2026-era requests
with results that carry no ``resultType``. The spec's only result type besides an input request is a complete
result, and an input request cannot be one without saying so, so such a result is read as ``"complete"`` before the
SDK client's strict validation sees it. Everything else passes untouched.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import Any, Self

from mcp.shared.message import SessionMessage
from mcp_types import JSONRPCResponse

Item = SessionMessage | Exception


def complete(item: Item) -> Item:
    """``item`` with a result that names no ``resultType`` marked complete (handshake results are left alone)."""
    if isinstance(item, SessionMessage) and isinstance(item.message, JSONRPCResponse):
        result: Any = item.message.result
        if isinstance(result, dict) and "resultType" not in result and "protocolVersion" not in result:
            result["resultType"] = "complete"
    return item


class LiberalStream:
    """A transport's read stream, each item read through ``complete`` (the SDK's ``ReadStream`` protocol)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    @property
    def last_context(self) -> Any:
        """The sender's context of the last item, when the inner stream keeps one (the SDK reads it if present)."""
        return getattr(self._inner, "last_context", None)

    async def receive(self) -> Item:
        return complete(await self._inner.receive())

    async def aclose(self) -> None:
        await self._inner.aclose()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Item:
        return complete(await self._inner.__anext__())

    async def __aenter__(self) -> Self:
        await self._inner.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        return await self._inner.__aexit__(exc_type, exc, tb)


@asynccontextmanager
async def liberal(transport: AbstractAsyncContextManager[Any]) -> AsyncGenerator[tuple[LiberalStream, Any], None]:
    """``transport``'s (read, write) streams, the read stream made liberal."""
    async with transport as (read_stream, write_stream):
        yield LiberalStream(read_stream), write_stream
