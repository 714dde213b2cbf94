"""The hot path: a 2026-era `tools/call` to a 2026-era Streamable HTTP upstream is forwarded as bytes.

Both ends speak the same stateless era, so rebuilding the request through an SDK server and an SDK
client (most of a call's CPU) adds nothing: Bastion checks Host/Origin, routes and authorises the
tool name exactly as the full path does, rewrites only `params.name` and the `Mcp-Name` header,
swaps in the member's credential, and streams the upstream's answer (JSON or SSE, progress
included) back. Anything else — other methods, other eras, stdio or SSE upstreams, an `auto`
upstream whose era is not yet known — takes the full path.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, cast

import anyio
import httpx2
import mcp_types as types
from mcp.server.transport_security import TransportSecurityMiddleware
from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from bastion.domain.connections import Principal
from bastion.domain.models import ProtocolEra, Transport
from bastion.errors import BastionError
from bastion.net.outbound import UrlRefused
from bastion.pipeline.answers import AnswerRelay
from bastion.pipeline.errors import UPSTREAM_UNAVAILABLE, refused, to_jsonrpc, upstream_failure
from bastion.pipeline.frames import MAX_ANSWER_BYTES, AnswerTooLarge
from bastion.services.audit import Audit, CallRecord
from bastion.services.credentials import generation_of
from bastion.services.directory import Mounted
from bastion.services.proxy import Proxy
from bastion.types import json_object
from bastion.upstream.pool import UpstreamBusy, UpstreamPool
from bastion.upstream.refusals import FORBIDDEN, UNAUTHORIZED
from bastion.upstream.transports import USER_AGENT
from bastion.upstream.wire import WirePool, WireResponse
from bastion.web.mcp import headers

logger = logging.getLogger("bastion.fastpath")
MODERN: Final = "2026-07-28"
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


@dataclass(frozen=True, slots=True)
class Admitted:
    """A call past admission: its arguments as they go upstream, and the content rules its result must pass (None:
    no rule reads results here, so the answer is relayed as it comes)."""

    arguments: dict[str, Any] | None = field(repr=False)
    results: Callable[[Any], Any] | None


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where a call goes and the only credential it carries there."""

    wire: WirePool
    headers: list[tuple[str, str]] = field(repr=False)


class FastPath:
    def __init__(self, proxy: Proxy, pool: UpstreamPool, audit: Audit, security: TransportSecurityMiddleware) -> None:
        self._proxy = proxy
        self._pool = pool
        self._audit = audit
        self._security = security
        self._passed: set[tuple[bytes | None, bytes | None, bytes | None]] = set()
        # Connections per (server, version): they carry no identity, each request carries its own credential.
        self._wires: dict[tuple[str, str], WirePool] = {}
        # The headers each (server, version, identity, access token generation) sends; a refreshed token has its own.
        self._headers: dict[tuple[str, str, str | None, str | None], list[tuple[str, str]]] = {}
        # The same trust as every other outbound client (httpx2's certifi bundle, no environment overrides).
        self._tls = httpx2.create_ssl_context(trust_env=False)
        pool.on_discard(self._forget)

    def _forget(self, server_id: str | None, identity_id: str | None) -> None:
        for key in [
            k for k in self._headers if (server_id and k[0] == server_id) or (identity_id and k[2] == identity_id)
        ]:
            del self._headers[key]
        for key in [k for k in self._wires if server_id and k[0] == server_id]:
            self._wires.pop(key).close()  # at once: a pool already stopping would never run a later close

    async def close(self) -> None:
        for wire in self._wires.values():
            wire.close()
        self._wires.clear()
        self._headers.clear()

    def eligible(self, scope: Scope) -> bool:
        if scope["method"] != "POST":
            return False
        headers = dict(scope["headers"])
        return headers.get(b"mcp-protocol-version") == MODERN.encode() and headers.get(b"mcp-method") == b"tools/call"

    def _modern_upstream(self, mounted: Mounted) -> bool:
        server = mounted.server
        if server.transport is not Transport.STREAMABLE_HTTP:
            return False
        if server.era is ProtocolEra.MODERN:
            return True
        if server.era is ProtocolEra.LEGACY:
            return False
        return self._pool.negotiated(server) == MODERN  # an `auto` server: known modern once a session said so

    async def handle(self, scope: Scope, body: bytes, send: Send, principal: Principal) -> bool:
        """Forward the call and return True, or return False (nothing sent) for the full path to take it."""
        message = json_object(body)
        if message is None:  # the full path answers it with the JSON-RPC parse error
            return False
        params: Any = message.get("params")
        if not isinstance(params, dict) or message.get("method") != "tools/call" or "id" not in message:
            return False
        call: dict[str, Any] = params  # pyright: ignore[reportUnknownVariableType]
        name = call.get("name")
        if (
            not isinstance(name, str)
            or not (name.isascii() and name.isprintable())  # lone surrogates and non-ASCII: the full path's
            or not _routing_headers_match(scope, name)
        ):
            return False  # the full path rejects mismatched or duplicated routing headers as the spec requires
        routed = await self.route(principal, name)
        if routed is None or not self._modern_upstream(routed[0]):
            return False
        mounted, tool = routed
        # Mcp-Param-* headers come from the arguments and the tool's annotations, never from the agent's values:
        # with the tool's schema not known here yet, a call that mirrors arguments takes the full path.
        declared = self._proxy.param_headers(principal, name)
        if declared is None and headers.sends_params(scope["headers"]):
            return False
        arguments: Any = call.get("arguments")
        given = cast("dict[str, Any]", arguments) if isinstance(arguments, dict) else None
        if await self.rejected(scope, send):
            return True
        record = call_record(principal, name, call)
        async with self._audit.call(record):
            try:
                admitted = await self.admit(principal, mounted, tool, record, given)
                upstream, current = await self.upstream(principal, mounted)
            except BastionError as exc:
                record.failed(exc.code)
                await jsonrpc_error(send, message["id"], to_jsonrpc(exc).error)
                return True
            call["name"] = tool
            if admitted.arguments is not given:
                call["arguments"] = admitted.arguments
            # Derived from the arguments as they leave Bastion: a redacted value is redacted in its header too.
            params = headers.params(declared or {}, admitted.arguments or {})

            async def renewed() -> Upstream | None:
                """After a 401: the renewed token's headers, or None when there is nothing to renew."""
                if not await self._proxy.renew(principal, self._proxy.identity_for(principal, mounted), current):
                    return None
                return (await self.upstream(principal, mounted))[0]

            await self._forward(
                scope,
                json.dumps(message, separators=(",", ":")).encode(),
                tool,
                principal,
                mounted,
                upstream,
                params,
                send,
                record,
                message["id"],
                renewed,
                admitted.results,
            )
        return True

    async def route(self, principal: Principal, name: str) -> tuple[Mounted, str] | None:
        """The server and its own tool name for a call the hot path may take, or None for the full path.

        None when routing refuses the name (the full path gives the same refusal, worded by the SDK). Policy rules,
        rate limits and content rules are applied here as on the full path (``admit``).
        """
        try:
            return await self._proxy.route_tool(principal, name)
        except BastionError:
            return None

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

    async def admit(
        self, principal: Principal, mounted: Mounted, tool: str, record: CallRecord, arguments: dict[str, Any] | None
    ) -> Admitted:
        """Apply policy, rate limits and the content rules on arguments as the full path does (each decision goes
        on the record), then make the call's event durable, with the arguments as the rules left them.

        Raises:
            PolicyDenied: a rule denies the call (the record says "denied").
            RateLimited: a limit has no room (the record says "limited").
            ContentBlocked: a content rule blocks the arguments (the record says "blocked").
        """
        guard = self._proxy.guard
        results: Callable[[Any], Any] | None = None
        if guard is not None:
            ruleset = await guard.admit(principal, mounted.alias, tool)
            await guard.count(ruleset, principal, record.name or tool)
            if guard.scans(ruleset, principal, "arguments"):
                arguments = cast("dict[str, Any]", guard.scan(ruleset, principal, arguments or {}, "arguments"))
            if guard.scans(ruleset, principal, "results"):
                results = functools.partial(guard.scan, ruleset, principal, where="results")

        else:
            record.server, record.decision = mounted.alias, "allow"
        await self._audit.open(record)
        return Admitted(arguments, results)

    def _wire(self, mounted: Mounted) -> WirePool:
        server = mounted.server
        wire = self._wires.get((server.id, server.reach))
        if wire is None:
            assert server.url is not None  # noqa: S101  streamable HTTP servers always have one
            wire = self._wires[(server.id, server.reach)] = WirePool(
                server.url, self._pool.outbound, connect_timeout_s=server.connect_timeout_s, ssl_context=self._tls
            )
        return wire

    async def upstream(self, principal: Principal, mounted: Mounted) -> tuple[Upstream, str | None]:
        """The connections to the server and this person's credential for it, and which access token that is."""
        credential_id = self._proxy.identity_for(principal, mounted)
        server = mounted.server
        current = await self._proxy.generation(principal, credential_id)
        headers = self._headers.get((server.id, server.reach, credential_id, current))
        if headers is None:
            credential = await self._proxy.credential(principal, credential_id)
            current = generation_of(credential)
            for old in [k for k in self._headers if k[:3] == (server.id, server.reach, credential_id)]:
                del self._headers[old]  # an earlier token of this identity: spent
            headers = [("user-agent", USER_AGENT), *((k.lower(), v) for k, v in credential.headers().items())]
            self._headers[(server.id, server.reach, credential_id, current)] = headers
        return Upstream(self._wire(mounted), headers), current

    async def _forward(
        self,
        scope: Scope,
        body: bytes,
        tool: str,
        principal: Principal,
        mounted: Mounted,
        upstream: Upstream,
        params: list[tuple[str, str]],
        send: Send,
        record: CallRecord,
        request_id: Any,
        renewed: Callable[[], Awaitable[Upstream | None]],
        results: Callable[[Any], Any] | None = None,
    ) -> None:
        passed = [*headers.to_upstream(scope["headers"]), ("mcp-name", tool), *params]
        timeout = mounted.server.call_timeout_s
        started = False
        try:
            async with self._pool.slot(mounted.server.id):
                with anyio.fail_after(timeout):  # the whole call, streamed answer included
                    response = await upstream.wire.post(
                        [*upstream.headers, *passed], body, first_byte_timeout_s=timeout
                    )
                    if response.status_code == UNAUTHORIZED:
                        # Refused before the upstream acted on the call: renew the token once and send it again.
                        await response.aclose()
                        try:
                            fresh = await renewed()
                        except BastionError as exc:
                            record.outcome, record.reason = "error", exc.code
                            await jsonrpc_error(send, request_id, to_jsonrpc(exc).error)
                            return
                        if fresh is None:
                            record.outcome, record.reason = "error", "http_401"
                            record.upstream_status = str(UNAUTHORIZED)
                            await jsonrpc_error(send, request_id, refused(mounted))
                            return
                        response = await fresh.wire.post([*fresh.headers, *passed], body, first_byte_timeout_s=timeout)
                    if response.status_code in (UNAUTHORIZED, FORBIDDEN):
                        await self.refusal(response, principal, mounted, record, send, request_id)
                        return
                    relay = AnswerRelay(send, request_id, results, headers.to_agent(response.headers))
                    try:
                        await relay.relay(response)
                    finally:
                        started = relay.started
                        await response.aclose()
                    record.upstream_status = relay.status
        except UpstreamBusy as exc:
            record.outcome, record.reason = "error", exc.code
            await jsonrpc_error(send, request_id, to_jsonrpc(exc).error)
        except AnswerTooLarge:
            record.outcome, record.reason = "error", "upstream_answer_too_large"
            if not started:
                message = f"the answer of upstream {mounted.alias!r} is larger than {MAX_ANSWER_BYTES} bytes"
                await jsonrpc_error(send, request_id, types.ErrorData(code=UPSTREAM_UNAVAILABLE, message=message))
        except (OSError, UrlRefused, TimeoutError) as exc:
            error = upstream_failure(exc, mounted, record)
            if started:  # the caller already has a status line: end the stream; its client sees it cut short
                with contextlib.suppress(OSError):  # the caller itself may be what went away
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await jsonrpc_error(send, request_id, error)
        else:
            # As the full path records it: a tool's error result is "error", a JSON-RPC error its code (at whatever
            # HTTP status it came), an HTTP error without an answer its status; a rule's block stays the outcome.
            if record.upstream_status is None:
                record.upstream_status = f"http_{response.status_code}"
            if record.upstream_status not in ("ok", "error") and record.outcome == "ok":
                record.outcome, record.reason = "error", record.upstream_status

    async def refusal(
        self,
        response: WireResponse,
        principal: Principal,
        mounted: Mounted,
        record: CallRecord,
        send: Send,
        request_id: Any,
    ) -> None:
        """The upstream refused the call (401 after a renewal, or 403): answer the caller with a JSON-RPC error.

        As on the full path, never the upstream's challenge (which would send the agent after the upstream's
        authorization server with its Bastion token); a 403 may instead say that more scope would help.
        """
        challenges = [v.decode("latin-1") for k, v in response.headers if k == b"www-authenticate"]
        await response.aclose()
        record.outcome, record.reason = "error", f"http_{response.status_code}"
        record.upstream_status = str(response.status_code)
        if response.status_code == FORBIDDEN:
            try:
                await self._proxy.step_up(principal, mounted, challenges)
            except BastionError as exc:
                record.reason = exc.code
                await jsonrpc_error(send, request_id, to_jsonrpc(exc).error)
                return
        await jsonrpc_error(send, request_id, refused(mounted, response.status_code))


def call_record(principal: Principal, name: str, call: dict[str, Any]) -> CallRecord:
    """The audit record of a `tools/call` of ``name`` with ``call``'s arguments."""
    record = CallRecord(method="tools/call", gateway=principal.gateway_slug, principal=principal, name=name)
    arguments = call.get("arguments")
    record.arguments = dict(arguments) if isinstance(arguments, dict) else None  # pyright: ignore[reportUnknownArgumentType]
    return record


def _routing_headers_match(scope: Scope, name: str) -> bool:
    routing = [(k, v) for k, v in scope["headers"] if k in (b"mcp-name", b"mcp-method", b"mcp-protocol-version")]
    names = [k for k, _ in routing]
    return len(names) == len(set(names)) == 3 and (b"mcp-name", name.encode("ascii")) in routing


async def _no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def jsonrpc_error(send: Send, request_id: Any, error: types.ErrorData) -> None:
    raw = json.dumps({"jsonrpc": "2.0", "id": request_id, "error": error.model_dump(exclude_none=True)}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": raw})
