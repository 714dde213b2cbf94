"""`/g/{gateway}/mcp`: authenticate the bearer token (Map 2), then hand the request to the SDK's session manager."""

from __future__ import annotations

import json
from typing import Final

from mcp.server.auth.middleware.auth_context import auth_context_var
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from starlette.types import Receive, Scope, Send

from bastion.errors import Forbidden, Unauthenticated, Unavailable
from bastion.services.audit import Audit, CallRecord
from bastion.services.principals import Refused, Resolver
from bastion.web.mcp.fastpath import FastPath, read_body, replaying
from bastion.web.mcp.server import current_principal
from bastion.web.mcp.session_path import HandshakePath

_BEARER: Final = b"bearer "


async def _reply(send: Send, status: int, body: dict[str, str], headers: list[tuple[bytes, bytes]]) -> None:
    raw = json.dumps(body).encode("utf-8")
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": raw})


class McpEndpoint:
    """An ASGI app (a class instance, so Starlette routes it as raw ASGI without a trailing-slash redirect)."""

    def __init__(
        self,
        resolver: Resolver,
        manager: StreamableHTTPSessionManager,
        audit: Audit,
        fast: FastPath | None = None,
        handshake: HandshakePath | None = None,
    ) -> None:
        self._resolver = resolver
        self._manager = manager
        self._audit = audit
        self._fast = fast
        self._handshake = handshake

    async def _refuse(
        self,
        send: Send,
        gateway: str,
        status: int,
        code: str,
        detail: str,
        headers: list[tuple[bytes, bytes]],
        who: Refused | None = None,
    ) -> None:
        record = CallRecord(method="http", gateway=gateway, principal=None, outcome="refused", reason=code)
        record.who = who
        await self._audit.refused(record)
        await _reply(send, status, {"error": code, "error_description": detail}, headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway = scope.get("path_params", {}).get("gateway", "")
        presented = [value for name, value in scope["headers"] if name == b"authorization"]
        challenge = f'Bearer realm="bastion", resource="/g/{gateway}/mcp"'
        if len(presented) > 1:
            # Which one counts would differ between hops (first or last wins); refuse rather than guess (RFC 6750 §3.1).
            value = f'{challenge}, error="invalid_request"'
            detail = "send exactly one Authorization header"
            await self._refuse(send, gateway, 400, "invalid_request", detail, [(b"www-authenticate", value.encode())])
            return
        header = presented[0] if presented else b""
        if header[: len(_BEARER)].lower() != _BEARER:
            detail = "send the access token as `Authorization: Bearer bst_…`"
            await self._refuse(send, gateway, 401, "invalid_token", detail, [(b"www-authenticate", challenge.encode())])
            return
        try:
            principal = await self._resolver.resolve(header[len(_BEARER) :].decode("latin-1").strip(), gateway=gateway)
        except Unauthenticated as exc:
            value = f'{challenge}, error="invalid_token", error_description="{exc.detail}"'
            who = getattr(exc, "who", None)
            headers = [(b"www-authenticate", value.encode())]
            await self._refuse(send, gateway, 401, "invalid_token", exc.detail, headers, who)
            return
        except Forbidden as exc:
            await self._refuse(send, gateway, 403, exc.code, exc.detail, [], getattr(exc, "who", None))
            return
        except Unavailable as exc:
            await self._refuse(send, gateway, 503, exc.code, exc.detail, [(b"retry-after", b"5")])
            return
        # httptools keeps blanks around header values; the SDK compares Mcp-* headers to the body exactly.
        scope["headers"] = [(name, value.strip()) for name, value in scope["headers"]]
        if self._fast is not None and self._fast.eligible(scope):
            body, messages = await read_body(receive)
            if await self._fast.handle(scope, body, receive, send, principal):
                return
            receive = replaying(messages, receive)
        elif self._handshake is not None and self._handshake.eligible(scope):
            body, messages = await read_body(receive)
            if await self._handshake.handle(scope, body, send, principal):
                return
            receive = replaying(messages, receive)
        # The SDK binds each legacy session to this user: another token presenting the session id gets 404.
        user = AuthenticatedUser(
            AccessToken(token=principal.token_id, client_id=principal.host_id, scopes=[], subject=principal.member_id)
        )
        scope["user"] = user
        scope.setdefault("state", {})["principal"] = principal
        principal_token = current_principal.set(principal)
        auth_token = auth_context_var.set(user)
        try:
            await self._manager.handle_request(scope, receive, send)
        finally:
            auth_context_var.reset(auth_token)
            current_principal.reset(principal_token)
