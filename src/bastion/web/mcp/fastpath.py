"""The web side of the 2026-era byte relay: which requests may take it, and the checks the SDK's transport makes.

A 2026-era `tools/call` whose routing headers match its body, routed to a 2026-era Streamable HTTP upstream, is
handed to the pipeline's byte relay (``pipeline/modern.py``) once Host and Origin pass the check the SDK's
transport makes. Anything else — other methods, other eras, stdio or SSE upstreams, an `auto` upstream whose era
is not yet known — takes the full path.
"""

from __future__ import annotations

from typing import Any, Final

from mcp.server.transport_security import TransportSecurityMiddleware
from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from bastion.domain.connections import Principal
from bastion.pipeline import headers
from bastion.pipeline.admission import MODERN, Admission
from bastion.pipeline.modern import ModernRelay
from bastion.types import json_object

_CHECKED: Final = frozenset({b"content-type", b"host", b"origin"})  # what the SDK's Host/Origin check reads
MAX_PASSED_CHECKS: Final = 256  # header combinations remembered as passing that check


async def read_body(receive: Receive) -> tuple[bytes, list[Message]]:
    """The whole request body, and the messages it came in (to replay to the full path)."""
    chunks: list[bytes] = []
    messages: list[Message] = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks), messages


def replaying(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay


class FastPath:
    def __init__(self, admission: Admission, relay: ModernRelay, security: TransportSecurityMiddleware) -> None:
        self.admission = admission
        self._relay = relay
        self._security = security
        self._passed: set[tuple[bytes | None, bytes | None, bytes | None]] = set()

    def eligible(self, scope: Scope) -> bool:
        if scope["method"] != "POST":
            return False
        headers = dict(scope["headers"])
        return headers.get(b"mcp-protocol-version") == MODERN.encode() and headers.get(b"mcp-method") == b"tools/call"

    async def handle(self, scope: Scope, body: bytes, receive: Receive, send: Send, principal: Principal) -> bool:
        """Relay the call and return True, or return False (nothing sent) for the full path to take it."""
        message = json_object(body)
        if message is None:  # the full path answers it with the JSON-RPC parse error
            return False
        params: Any = message.get("params")
        if not isinstance(params, dict) or message.get("method") != "tools/call" or "id" not in message:
            return False
        name = params.get("name")  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
        if (
            not isinstance(name, str)
            or not (name.isascii() and name.isprintable())  # lone surrogates and non-ASCII: the full path's
            or not _routing_headers_match(scope, name)
        ):
            return False  # the full path rejects mismatched or duplicated routing headers as the spec requires
        routed = await self.admission.route(principal, name)
        if routed is None or not self.admission.modern_upstream(routed[0]):
            return False
        mounted, tool = routed
        # Mcp-Param-* headers come from the arguments and the tool's annotations, never from the agent's values:
        # with the tool's schema not known here yet, a call that mirrors arguments takes the full path.
        declared = self.admission.proxy.param_headers(principal, name)
        if declared is None and headers.sends_params(scope["headers"]):
            return False
        if await self.rejected(scope, send):
            return True
        await self._relay.call(scope["headers"], message, principal, mounted, tool, declared, send, receive)
        return True

    async def rejected(self, scope: Scope, send: Send) -> bool:
        """Answer a request whose Host or Origin is not allowed (as the SDK would) and say so."""
        # The check depends on these three headers alone (and fixed settings): combinations that passed are kept.
        first: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            if name in _CHECKED and name not in first:  # the SDK reads the first of repeated headers
                first[name] = value
        key = (first.get(b"content-type"), first.get(b"host"), first.get(b"origin"))
        if key in self._passed:
            return False
        rejection = await self._security.validate_request(Request(scope), is_post=True)
        if rejection is None:
            if len(self._passed) >= MAX_PASSED_CHECKS:
                self._passed.clear()
            self._passed.add(key)
            return False
        await rejection(scope, _no_body, send)
        return True


def _routing_headers_match(scope: Scope, name: str) -> bool:
    routing = [(k, v) for k, v in scope["headers"] if k in (b"mcp-name", b"mcp-method", b"mcp-protocol-version")]
    names = [k for k, _ in routing]
    return len(names) == len(set(names)) == 3 and (b"mcp-name", name.encode("ascii")) in routing


async def _no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}
