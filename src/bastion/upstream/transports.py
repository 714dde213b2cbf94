"""Opens the transport to one upstream server carrying one credential, and nothing of the caller's."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncGenerator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import httpx2
from mcp.client.sse import sse_client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from bastion.domain.identities import IdentitySecret
from bastion.domain.models import ProtocolEra, Server, Transport

USER_AGENT: Final = "bastion-gateway"
STREAM_READ_TIMEOUT_S: Final = 300.0
# Environment variable a stdio server receives for a token-only identity.
STDIO_TOKEN_ENV: Final = "BASTION_BEARER_TOKEN"  # noqa: S105  a variable name, not a secret
_MODES: Final = {ProtocolEra.AUTO: "auto", ProtocolEra.LEGACY: "legacy", ProtocolEra.MODERN: "2026-07-28"}


@dataclass(frozen=True, slots=True)
class Credential:
    """What an upstream call carries: the member's (or the gateway's shared) credential, never the agent's."""

    identity_id: str | None
    secret: IdentitySecret | None = field(default=None, repr=False)

    def headers(self) -> dict[str, str]:
        return self.secret.outbound_headers() if self.secret is not None else {}

    def environment(self) -> dict[str, str]:
        if self.secret is None:
            return {}
        env = dict(self.secret.headers)
        if self.secret.token or self.secret.access_token:
            env[STDIO_TOKEN_ENV] = self.secret.token or self.secret.access_token or ""
        return env


def client_mode(server: Server) -> str:
    return _MODES[server.era]


def http_client(server: Server, credential: Credential) -> httpx2.AsyncClient:
    """A pooled HTTP client whose only credential is the one given; redirects are not followed."""
    headers: Mapping[str, str] = {"User-Agent": USER_AGENT, **credential.headers()}
    timeout = httpx2.Timeout(server.call_timeout_s, connect=server.connect_timeout_s, read=STREAM_READ_TIMEOUT_S)
    return httpx2.AsyncClient(headers=dict(headers), timeout=timeout, follow_redirects=False)


@asynccontextmanager
async def _streamable(server: Server, credential: Credential) -> AsyncGenerator[Any, None]:
    assert server.url is not None  # noqa: S101  validated on create
    async with http_client(server, credential) as client, streamable_http_client(server.url, http_client=client) as s:
        yield s


def open_transport(server: Server, credential: Credential) -> AbstractAsyncContextManager[Any]:
    """The SDK transport for ``server`` with ``credential``; stdio gets the credential in its environment."""
    if server.transport is Transport.STREAMABLE_HTTP:
        return _streamable(server, credential)
    if server.transport is Transport.SSE:
        assert server.url is not None  # noqa: S101  validated on create
        return sse_client(
            server.url,
            headers={"User-Agent": USER_AGENT, **credential.headers()},
            timeout=server.connect_timeout_s,
            sse_read_timeout=STREAM_READ_TIMEOUT_S,
        )
    assert server.command is not None  # noqa: S101  validated on create
    params = StdioServerParameters(
        command=server.command, args=list(server.args), env={**server.env, **credential.environment()}
    )
    # An upstream's stderr may echo its environment (our member's credential): it never reaches our logs.
    return stdio_client(params, errlog=subprocess.DEVNULL)  # type: ignore[arg-type]  # passed on to open_process
