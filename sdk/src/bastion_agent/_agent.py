"""The agent: calls a Bastion gateway as a person, with that person's token from the map."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final, cast, get_args

import httpx2
from mcp import Client, Implementation
from mcp.client.streamable_http import streamable_http_client

from bastion_agent._claims import ClaimRedeemer
from bastion_agent._errors import BastionAgentError, Disabled, DisabledReason, GatewayRefused, NotEnrolled
from bastion_agent._map import Credential, TokenMap
from bastion_agent._receiver import EventHook, WebhookReceiver
from bastion_agent._signing import DEFAULT_TOLERANCE

# Bastion serves the stateless 2026-07-28 era: no handshake round trip before the first call.
DEFAULT_MODE: Final = "2026-07-28"
DEFAULT_TIMEOUT_S: Final = 60.0
CLIENT_INFO: Final = Implementation(name="bastion-agent", version="0.1.0")
_DISABLED: Final[frozenset[str]] = frozenset(get_args(DisabledReason))


@dataclass
class _Refusal:
    """The first 401/403 the gateway answered during one ``as_user`` block."""

    status: int | None = None
    error: str | None = None
    detail: str | None = None


def _hook(refusal: _Refusal) -> Callable[[httpx2.Response], Any]:
    async def on_response(response: httpx2.Response) -> None:
        if response.status_code not in (401, 403) or refusal.status is not None:
            return
        await response.aread()
        try:
            body: Any = json.loads(response.content)
        except ValueError:
            body = None
        fields = cast("dict[str, Any]", body) if isinstance(body, dict) else {}
        error, detail = fields.get("error"), fields.get("error_description")
        refusal.status = response.status_code
        refusal.error = error if isinstance(error, str) else None
        refusal.detail = detail if isinstance(detail, str) else None

    return on_response


class Agent:
    """Calls Bastion gateways as the people in its ``TokenMap``.

    Args:
        token_map: Map 1, filled by this agent's webhook receiver.
        bastion_url: Bastion's public URL (claim codes are redeemed there; gateway URLs come with the events).
        connect_link: the connection link to send a person who has not connected yet: a URL, or a function of the
            person's email that returns one.
        host_key: the host's ``bsh_…`` key, to redeem claim codes (hosts delivering claim codes need it).
        gateway: the gateway to use when a person is enrolled through several and the call does not say.
        mode: the MCP protocol mode of the client (``"2026-07-28"``, ``"auto"`` or ``"legacy"``).
        timeout_s: per HTTP request to the gateway.
    """

    def __init__(
        self,
        token_map: TokenMap,
        *,
        bastion_url: str,
        connect_link: str | Callable[[str], str] | None = None,
        host_key: str | None = None,
        gateway: str | None = None,
        mode: str = DEFAULT_MODE,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.token_map = token_map
        self.bastion_url = bastion_url.rstrip("/")
        self.gateway = gateway
        self.mode = mode
        self.timeout_s = timeout_s
        self._connect_link = connect_link
        self._redeemer = ClaimRedeemer(self.bastion_url, host_key) if host_key is not None else None

    def __repr__(self) -> str:
        return f"Agent({self.bastion_url!r}, gateway={self.gateway!r}, map={self.token_map!r})"

    def link_for(self, person: str) -> str | None:
        """The connection link to send ``person``."""
        if callable(self._connect_link):
            return self._connect_link(person)
        return self._connect_link

    def webhook_receiver(
        self, secrets: Iterable[str], *, tolerance: timedelta = DEFAULT_TOLERANCE, on_event: EventHook | None = None
    ) -> WebhookReceiver:
        """The ASGI app to mount where the host's webhook endpoint points (e.g. ``/webhooks/bastion``)."""
        return WebhookReceiver(self.token_map, secrets, redeemer=self._redeemer, tolerance=tolerance, on_event=on_event)

    @contextlib.asynccontextmanager
    async def as_user(self, person: str, *, gateway: str | None = None) -> AsyncGenerator[Client]:
        """An official MCP client to the gateway, authenticated as ``person`` (their email).

        Raises:
            NotEnrolled: the person has not connected this agent, or their token was revoked (a 401 from the gateway
                also drops the token from the map); carries the connection link to send them.
            Disabled: Bastion refuses calls for them for now (connection, host, member or gateway disabled); their
                token stays in the map.
            GatewayRefused: the gateway refused the token for another reason.
            Ambiguous: they are enrolled through several gateways and none was named.
        """
        credential = await self.token_map.credential(
            person, gateway=gateway or self.gateway, link=self.link_for(person)
        )
        enrollment = credential.enrollment
        url = enrollment.mcp_url or f"{self.bastion_url}/g/{enrollment.gateway}/mcp"
        refusal = _Refusal()
        http = httpx2.AsyncClient(
            headers={"Authorization": f"Bearer {credential.token}"},
            timeout=self.timeout_s,
            event_hooks={"response": [_hook(refusal)]},
        )
        raised: Exception | None = None
        try:
            async with (
                http,
                Client(
                    streamable_http_client(url, http_client=http), mode=self.mode, cache=None, client_info=CLIENT_INFO
                ) as client,
            ):
                try:
                    yield client
                except Exception as exc:  # noqa: BLE001 - re-raised below, after the client closed cleanly
                    # Kept out of the client's exit, whose task groups would wrap it in an exception group.
                    raised = exc
        except Exception as exc:  # noqa: BLE001 - re-raised below, translated if the gateway refused the token
            raised = exc
        # Even when the block caught the gateway's refusal itself, the map learns of a revoked token.
        failure = await self._refused(person, credential, refusal)
        if raised is None:
            return
        if failure is not None:
            raise failure from raised
        raise raised

    async def _refused(self, person: str, credential: Credential, refusal: _Refusal) -> BastionAgentError | None:
        if refusal.status is None:
            return None
        if refusal.status == 401:
            if credential.enrollment.token_id is not None:
                await self.token_map.forget_token(credential.enrollment.token_id)
            return NotEnrolled(person, self.link_for(person), "revoked")
        if refusal.error in _DISABLED:
            return Disabled(person, cast("DisabledReason", refusal.error), refusal.detail)
        return GatewayRefused(person, refusal.status, refusal.error)
