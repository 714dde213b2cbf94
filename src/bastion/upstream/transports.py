"""Opens the transport to one upstream server carrying one credential, and nothing of the caller's."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import httpx2
from mcp.client.sse import sse_client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from bastion.domain.identities import IdentitySecret
from bastion.domain.models import ProtocolEra, Server, Transport
from bastion.domain.specs import changes_how_commands_run
from bastion.net.outbound import OutboundPolicy
from bastion.upstream import refusals
from bastion.upstream.liberal import liberal

USER_AGENT: Final = "bastion-gateway"
STREAM_READ_TIMEOUT_S: Final = 300.0
# Environment variable a stdio server receives for a token-only identity, unless the server names its own (token_env).
STDIO_TOKEN_ENV: Final = "BASTION_BEARER_TOKEN"  # noqa: S105  a variable name, not a secret
_MODES: Final = {ProtocolEra.AUTO: "auto", ProtocolEra.LEGACY: "legacy", ProtocolEra.MODERN: "2026-07-28"}


@dataclass(frozen=True, slots=True)
class Credential:
    """What an upstream call carries: the member's (or the gateway's shared) credential, never the agent's."""

    identity_id: str | None
    secret: IdentitySecret | None = field(default=None, repr=False)

    def headers(self) -> dict[str, str]:
        return self.secret.outbound_headers() if self.secret is not None else {}

    def environment(self, token_env: str | None = None) -> dict[str, str]:
        """What a stdio server's environment gets: the token under ``token_env`` (default ``STDIO_TOKEN_ENV``)."""
        if self.secret is None:
            return {}
        # A header identity's names become variables: only names a token may use, never PATH, LD_PRELOAD or
        # NODE_OPTIONS, whose values (the identity owner's) would change what the command runs.
        env = {name: value for name, value in self.secret.headers.items() if not changes_how_commands_run(name)}
        if self.secret.token or self.secret.access_token:
            env[token_env or STDIO_TOKEN_ENV] = self.secret.token or self.secret.access_token or ""
        return env


def client_mode(server: Server) -> str:
    return _MODES[server.era]


def http_client(server: Server, credential: Credential, policy: OutboundPolicy) -> httpx2.AsyncClient:
    """A pooled HTTP client whose only credential is the one given; redirects are not followed.

    Every request's URL and every connection's resolved address pass ``policy``; connections are pinned to
    the checked address.
    """
    headers: Mapping[str, str] = {"User-Agent": USER_AGENT, **credential.headers()}
    timeout = httpx2.Timeout(server.call_timeout_s, connect=server.connect_timeout_s, read=STREAM_READ_TIMEOUT_S)
    client = policy.client(timeout=timeout, headers=headers)
    client.event_hooks["response"].append(refusals.note)  # a 401 tells the waiting call to refresh and retry
    return client


async def _check_target(server: Server, policy: OutboundPolicy) -> str:
    """The server's URL once it and the addresses its host resolves to now pass ``policy`` (a clear early error).

    Raises:
        UrlRefused: the policy refuses the URL or an address (each connection is checked again anyway).
    """
    assert server.url is not None  # noqa: S101  validated on create
    # A name that does not resolve now is left to the connection, which reports it in the SDK's words.
    with contextlib.suppress(OSError):
        await policy.resolve_url(server.url)
    return server.url


SessionIdSink = Callable[[str], None]


@asynccontextmanager
async def _streamable(
    server: Server, credential: Credential, policy: OutboundPolicy, on_session_id: SessionIdSink | None
) -> AsyncGenerator[Any, None]:
    url = await _check_target(server, policy)
    async with http_client(server, credential, policy) as client, streamable_http_client(url, http_client=client) as s:
        if on_session_id is not None:

            async def seen(response: httpx2.Response) -> None:
                # The upstream session a handshake-era server opened: the hot path posts calls into it too.
                session_id = response.headers.get("mcp-session-id")
                if session_id:
                    on_session_id(session_id)

            client.event_hooks["response"].append(seen)
        yield s


@asynccontextmanager
async def _sse(server: Server, credential: Credential, policy: OutboundPolicy) -> AsyncGenerator[Any, None]:
    url = await _check_target(server, policy)

    def factory(
        headers: dict[str, str] | None = None, timeout: httpx2.Timeout | None = None, auth: httpx2.Auth | None = None
    ) -> httpx2.AsyncClient:
        client = policy.client(timeout=timeout or httpx2.Timeout(server.connect_timeout_s), headers=headers)
        client.event_hooks["response"].append(refusals.note)
        if auth is not None:
            client.auth = auth
        return client

    async with sse_client(
        url,
        headers={"User-Agent": USER_AGENT, **credential.headers()},
        timeout=server.connect_timeout_s,
        sse_read_timeout=STREAM_READ_TIMEOUT_S,
        httpx_client_factory=factory,
    ) as streams:
        yield streams


def open_transport(
    server: Server, credential: Credential, policy: OutboundPolicy, on_session_id: SessionIdSink | None = None
) -> AbstractAsyncContextManager[Any]:
    """The SDK transport for ``server`` with ``credential``; stdio gets the credential in its environment.

    HTTP transports reach only what ``policy`` allows (stdio servers are commands an admin configured).
    ``on_session_id`` hears the ``Mcp-Session-Id`` a Streamable HTTP server gives the session.
    """
    if server.transport is Transport.STREAMABLE_HTTP:
        return liberal(_streamable(server, credential, policy, on_session_id))
    if server.transport is Transport.SSE:
        return liberal(_sse(server, credential, policy))
    assert server.command is not None  # noqa: S101  validated on create
    params = StdioServerParameters(
        command=server.command, args=list(server.args), env={**server.env, **credential.environment(server.token_env)}
    )
    # An upstream's stderr may echo its environment (our member's credential): it never reaches our logs.
    return liberal(stdio_client(params, errlog=subprocess.DEVNULL))  # type: ignore[arg-type]  # passed on to open_process
