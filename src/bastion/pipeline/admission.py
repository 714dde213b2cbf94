"""Admission: what a call must pass before anything reaches its upstream, whichever relay carries it.

Routing and provisioning (the name must be one the caller may see), policy, rate limits and content rules on
arguments, each decided as the full path decides it and noted on the audit record, and then the call's event
made durable. Admission also keeps what the byte relays send through: connections per server (they carry no
identity) and, per identity and access token generation, the headers that carry the member's credential.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import httpx2
import mcp_types as types

from bastion.domain.connections import Principal
from bastion.domain.models import ProtocolEra, Transport
from bastion.errors import BastionError
from bastion.pipeline.answers import Send
from bastion.services.audit import Audit, CallRecord
from bastion.services.credentials import generation_of
from bastion.services.directory import Mounted
from bastion.services.proxy import Proxy
from bastion.upstream.pool import UpstreamPool
from bastion.upstream.transports import USER_AGENT
from bastion.upstream.wire import WirePool

MODERN = "2026-07-28"


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


class Admission:
    """Admits calls for the byte relays (see the module docstring)."""

    def __init__(self, proxy: Proxy, pool: UpstreamPool, audit: Audit) -> None:
        self.proxy = proxy
        self.pool = pool
        self.audit = audit
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

    def modern_upstream(self, mounted: Mounted) -> bool:
        server = mounted.server
        if server.transport is not Transport.STREAMABLE_HTTP:
            return False
        if server.era is ProtocolEra.MODERN:
            return True
        if server.era is ProtocolEra.LEGACY:
            return False
        return self.pool.negotiated(server) == MODERN  # an `auto` server: known modern once a session said so

    async def route(self, principal: Principal, name: str) -> tuple[Mounted, str] | None:
        """The server and its own tool name for a call the hot path may take, or None for the full path.

        None when routing refuses the name (the full path gives the same refusal, worded by the SDK). Policy rules,
        rate limits and content rules are applied here as on the full path (``admit``).
        """
        try:
            return await self.proxy.route_tool(principal, name)
        except BastionError:
            return None

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
        guard = self.proxy.guard
        results: Callable[[Any], Any] | None = None
        if guard is not None:
            ruleset = await guard.admit(principal, mounted.alias, tool)
            await guard.count(ruleset, principal, record.name or tool)
            scanned = guard.scanned(ruleset, principal) if ruleset.content else frozenset[str]()
            if "arguments" in scanned:
                arguments = cast("dict[str, Any]", guard.scan(ruleset, principal, arguments or {}, "arguments"))
            if "results" in scanned:
                results = functools.partial(guard.scan, ruleset, principal, where="results")
        else:
            record.server, record.decision = mounted.alias, "allow"
        await self.audit.open(record)
        return Admitted(arguments, results)

    def _wire(self, mounted: Mounted) -> WirePool:
        server = mounted.server
        wire = self._wires.get((server.id, server.reach))
        if wire is None:
            assert server.url is not None  # noqa: S101  streamable HTTP servers always have one
            wire = self._wires[(server.id, server.reach)] = WirePool(
                server.url, self.pool.outbound, connect_timeout_s=server.connect_timeout_s, ssl_context=self._tls
            )
        return wire

    async def upstream(self, principal: Principal, mounted: Mounted) -> tuple[Upstream, str | None]:
        """The connections to the server and this person's credential for it, and which access token that is."""
        credential_id = self.proxy.identity_for(principal, mounted)
        server = mounted.server
        current = await self.proxy.generation(principal, credential_id)
        headers = self._headers.get((server.id, server.reach, credential_id, current))
        if headers is None:
            credential = await self.proxy.credential(principal, credential_id)
            current = generation_of(credential)
            for old in [k for k in self._headers if k[:3] == (server.id, server.reach, credential_id)]:
                del self._headers[old]  # an earlier token of this identity: spent
            headers = [("user-agent", USER_AGENT), *((k.lower(), v) for k, v in credential.headers().items())]
            self._headers[(server.id, server.reach, credential_id, current)] = headers
        return Upstream(self._wire(mounted), headers), current


def call_record(principal: Principal, name: str, call: dict[str, Any]) -> CallRecord:
    """The audit record of a `tools/call` of ``name`` with ``call``'s arguments."""
    record = CallRecord(method="tools/call", gateway=principal.gateway_slug, principal=principal, name=name)
    arguments = call.get("arguments")
    record.arguments = dict(arguments) if isinstance(arguments, dict) else None  # pyright: ignore[reportUnknownArgumentType]
    return record


async def send_error(send: Send, request_id: Any, error: types.ErrorData) -> None:
    raw = json.dumps({"jsonrpc": "2.0", "id": request_id, "error": error.model_dump(exclude_none=True)}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": raw})
