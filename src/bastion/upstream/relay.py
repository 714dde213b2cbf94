"""Relaying what an upstream asks of the caller (sampling, elicitation, roots) and what it reports (logs).

An upstream session is shared by the calls of one person, so its callbacks find *which* downstream
request to talk to through a context variable. Over Streamable HTTP the SDK runs client callbacks in the
context of the call that is waiting on the upstream, so each call sees its own downstream request.

Over stdio and HTTP+SSE every upstream message arrives on one stream that names no call, so a session that
may be asked anything (its profile declares a capability) takes its calls one at a time (``Turns``), and
its read stream (``tagged``) hands each message on in the context of the call waiting when it was read.

Some Streamable HTTP servers send their requests on the standalone stream without naming the call they are
for. Such a request goes to the caller of the session's only call in flight (``in_flight``); with none, or
with several (it cannot be told whose), it is refused.
"""

from __future__ import annotations

import contextvars
from collections.abc import AsyncGenerator, Generator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final
from weakref import WeakKeyDictionary

import anyio
import mcp_types as types
from mcp.client.session import ClientRequestContext
from mcp.server import ServerRequestContext
from mcp.shared.exceptions import MCPError, NoBackChannelError
from mcp.shared.message import ServerMessageMetadata

from bastion.domain.models import Transport

downstream: ContextVar[ServerRequestContext[Any, Any] | None] = ContextVar("bastion_downstream", default=None)
HANDSHAKE_VERSIONS: Final = frozenset({"2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"})


@dataclass(frozen=True, slots=True)
class Profile:
    """Which client capabilities the caller declared; the upstream session declares exactly these."""

    sampling: bool = False
    elicitation: bool = False
    roots: bool = False

    @classmethod
    def of(cls, capabilities: types.ClientCapabilities | None) -> Profile:
        if capabilities is None:
            return cls()
        return cls(
            capabilities.sampling is not None, capabilities.elicitation is not None, capabilities.roots is not None
        )

    def key(self) -> str:
        return "".join(
            flag if on else "-" for flag, on in (("s", self.sampling), ("e", self.elicitation), ("r", self.roots))
        )


NO_PROFILE: Final = Profile()
# Transports on which a server request carries nothing that names the call it belongs to.
UNCORRELATED: Final = frozenset({Transport.STDIO, Transport.SSE})


def serializes(transport: Transport, profile: Profile) -> bool:
    """Whether calls on a session must take turns so that upstream requests reach the right caller."""
    return transport in UNCORRELATED and profile != NO_PROFILE


@dataclass(slots=True, eq=False)
class Turns:
    """One call at a time on a session, and whose downstream request that call serves.

    ``retired`` is set when a call ended without the upstream answering it (timeout, cancellation, dropped
    connection): the upstream may still ask on its behalf, so no later call may run on the session.
    """

    lock: anyio.Lock = field(default_factory=anyio.Lock)
    caller: ServerRequestContext[Any, Any] | None = None
    retired: bool = False


class _TaggedReads:
    """An upstream read stream whose messages carry, as the SDK's ``last_context``, the waiting call's context.

    The SDK spawns the handler of each received message in ``last_context`` (the same hook Streamable HTTP
    uses to carry the POSTing caller's context), so callbacks see ``downstream`` as it was when the message
    was read, in wire order: a request read before a call's response belongs to that call.
    """

    def __init__(self, inner: Any, turns: Turns) -> None:
        self._inner = inner
        self._turns = turns
        self.last_context: contextvars.Context | None = None

    async def receive(self) -> Any:
        item = await self._inner.receive()
        sender: contextvars.Context | None = getattr(self._inner, "last_context", None)
        context = (sender if sender is not None else contextvars.copy_context()).copy()
        context.run(downstream.set, self._turns.caller)
        self.last_context = context
        return item

    async def aclose(self) -> None:
        await self._inner.aclose()

    def __aiter__(self) -> _TaggedReads:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> _TaggedReads:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


@asynccontextmanager
async def tagged(transport: AbstractAsyncContextManager[Any], turns: Turns) -> AsyncGenerator[Any, None]:
    """``transport`` whose read stream tags each message with the call ``turns`` says is waiting."""
    async with transport as (read, write):
        yield _TaggedReads(read, turns), write


# The downstream requests of each upstream session's calls in flight, oldest first.
_in_flight: WeakKeyDictionary[Any, list[ServerRequestContext[Any, Any]]] = WeakKeyDictionary()


@contextmanager
def in_flight(session: Any) -> Generator[None]:
    """Count the current call (its ``downstream`` request) as in flight on the upstream ``session`` meanwhile."""
    caller = downstream.get()
    if caller is None:
        yield
        return
    calls = _in_flight.setdefault(session, [])
    calls.append(caller)
    try:
        yield
    finally:
        calls.remove(caller)
        if not calls:
            _in_flight.pop(session, None)


def _caller(ctx: ClientRequestContext | None) -> ServerRequestContext[Any, Any] | None:
    """Whom an upstream request is for: the call it came with, else the only call in flight on its session."""
    caller = downstream.get()
    if caller is None and ctx is not None:
        calls = _in_flight.get(ctx.session)
        if calls is not None and len(calls) == 1:
            caller = calls[0]
    return caller


def is_legacy(ctx: ServerRequestContext[Any, Any]) -> bool:
    return ctx.protocol_version in HANDSHAKE_VERSIONS


async def _ask(ctx: ClientRequestContext | None, request: types.ServerRequest, result_type: type[Any]) -> Any:
    caller = _caller(ctx)
    if caller is None:
        return types.ErrorData(code=types.INVALID_REQUEST, message="no caller is waiting on this request")
    try:
        return await caller.session.send_request(
            request, result_type, metadata=ServerMessageMetadata(related_request_id=caller.request_id)
        )
    except NoBackChannelError:
        return types.ErrorData(
            code=types.INVALID_REQUEST, message="the caller's connection cannot take requests from the server"
        )
    except MCPError as exc:
        return exc.error


async def sampling(ctx: ClientRequestContext, params: types.CreateMessageRequestParams) -> Any:
    return await _ask(ctx, types.CreateMessageRequest(params=params), types.CreateMessageResult)


async def elicitation(ctx: ClientRequestContext, params: types.ElicitRequestParams) -> Any:
    return await _ask(ctx, types.ElicitRequest(params=params), types.ElicitResult)


async def roots(ctx: ClientRequestContext) -> Any:
    return await _ask(ctx, types.ListRootsRequest(), types.ListRootsResult)


async def logging(params: types.LoggingMessageNotificationParams) -> None:
    """Forward an upstream log line to the caller's request stream (handshake-era callers only)."""
    caller = downstream.get()
    if caller is None or not is_legacy(caller):
        return
    await caller.session.send_notification(
        types.LoggingMessageNotification(params=params), related_request_id=caller.request_id
    )


def callbacks(profile: Profile) -> dict[str, Any]:
    """The Client keyword arguments for ``profile``: no callback means the capability is not declared upstream."""
    out: dict[str, Any] = {"logging_callback": logging, "log_level": "debug"}
    if profile.sampling:
        out["sampling_callback"] = sampling
    if profile.elicitation:
        out["elicitation_callback"] = elicitation
    if profile.roots:
        out["list_roots_callback"] = roots
    return out
