"""Relaying what an upstream asks of the caller (sampling, elicitation, roots) and what it reports (logs).

An upstream session is shared by the calls of one person, so its callbacks find *which* downstream
request to talk to through a context variable: the SDK runs client callbacks in the context of the
call that is waiting on the upstream, so each call sees its own downstream request.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final

import mcp_types as types
from mcp.client.session import ClientRequestContext
from mcp.server import ServerRequestContext
from mcp.shared.exceptions import MCPError, NoBackChannelError
from mcp.shared.message import ServerMessageMetadata

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


def is_legacy(ctx: ServerRequestContext[Any, Any]) -> bool:
    return ctx.protocol_version in HANDSHAKE_VERSIONS


async def _ask(request: types.ServerRequest, result_type: type[Any]) -> Any:
    caller = downstream.get()
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


async def sampling(_ctx: ClientRequestContext, params: types.CreateMessageRequestParams) -> Any:
    return await _ask(types.CreateMessageRequest(params=params), types.CreateMessageResult)


async def elicitation(_ctx: ClientRequestContext, params: types.ElicitRequestParams) -> Any:
    return await _ask(types.ElicitRequest(params=params), types.ElicitResult)


async def roots(_ctx: ClientRequestContext) -> Any:
    return await _ask(types.ListRootsRequest(), types.ListRootsResult)


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
