"""Which HTTP headers cross Bastion on a forwarded call, each way: one allow-list per direction.

Toward the upstream a call carries only what describes the request (its media types, protocol version, method
and tool name) and the member's own credential; the spec's ``Mcp-Param-*`` headers are derived from the call's
arguments and the tool's ``x-mcp-header`` annotations, never copied from what the agent sent. Toward the agent
an answer carries only what describes its body (media type and encoding, caching, when to retry): an upstream
cannot set cookies on Bastion's origin, speak for its CORS policy or send its own challenges and internals.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from mcp.shared.inbound import mcp_param_headers

# Request headers of the agent's that travel to the upstream (``Mcp-Name`` is Bastion's: the upstream's name).
TO_UPSTREAM: Final = frozenset({b"accept", b"content-type", b"mcp-protocol-version", b"mcp-method"})
# Response headers of the upstream's that travel to the agent.
TO_AGENT: Final = frozenset({b"content-type", b"content-encoding", b"cache-control", b"retry-after"})
PARAM_PREFIX: Final = b"mcp-param-"


def to_upstream(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """The agent's request headers that travel to the upstream."""
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers if k in TO_UPSTREAM]


def to_agent(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The upstream's response headers that travel to the agent."""
    return [(k, v) for k, v in headers if k in TO_AGENT]


def sends_params(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether the agent mirrored any argument into an ``Mcp-Param-*`` header."""
    return any(k.startswith(PARAM_PREFIX) for k, _v in headers)


def params(declared: Mapping[tuple[str, ...], str], arguments: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The ``Mcp-Param-*`` headers a call carries for ``arguments``, given the tool's ``x-mcp-header`` annotations
    (argument path → header name, ``Proxy.param_headers``)."""
    return list(mcp_param_headers(declared, arguments).items()) if declared else []
