"""Redeeming a claim code: the agent trades the one-time code from an event for the token, with its host key."""

from __future__ import annotations

from typing import Any, Final, cast

import httpx2

from bastion_agent._errors import ClaimFailed
from bastion_agent._map import Delivered

REDEEM_PATH: Final = "/api/v1/claims/redeem"
DEFAULT_TIMEOUT_S: Final = 10.0
HOST_KEY_PREFIX: Final = "bsh_"


class ClaimRedeemer:
    """Redeems claim codes at ``{bastion_url}/api/v1/claims/redeem`` with the host key (``bsh_…``).

    Raises:
        ValueError: a host key that is not a ``bsh_`` key.
    """

    __slots__ = ("_host_key", "_http", "_url")

    def __init__(self, bastion_url: str, host_key: str, *, http: httpx2.AsyncClient | None = None) -> None:
        if not host_key.startswith(HOST_KEY_PREFIX):
            raise ValueError("a Bastion host key starts with 'bsh_'")
        self._url = bastion_url.rstrip("/") + REDEEM_PATH
        self._host_key = host_key
        self._http = http

    def __repr__(self) -> str:
        return f"ClaimRedeemer({self._url!r}, host_key=<hidden>)"

    async def redeem(self, claim_code: str, *, connection_id: str | None = None) -> Delivered:
        """The token the claim code stands for (redeemable once, by this host only).

        Raises:
            ClaimFailed: refused for good (unknown, used, expired or another host's code: ``retryable`` False), or
                Bastion could not be reached or failed (``retryable`` True: the delivery should be retried).
        """
        headers = {"Authorization": f"Bearer {self._host_key}"}
        try:
            if self._http is not None:
                response = await self._http.post(self._url, json={"claim_code": claim_code}, headers=headers)
            else:
                async with httpx2.AsyncClient(timeout=DEFAULT_TIMEOUT_S, follow_redirects=False) as http:
                    response = await http.post(self._url, json={"claim_code": claim_code}, headers=headers)
        except httpx2.HTTPError as exc:
            reason = type(exc).__name__
            raise ClaimFailed(
                f"Bastion could not be reached to redeem a claim code: {reason}", retryable=True
            ) from None
        if response.status_code >= 500 or response.status_code == 429:
            raise ClaimFailed(f"Bastion failed to redeem a claim code: HTTP {response.status_code}", retryable=True)
        if response.status_code != 200:
            raise ClaimFailed(
                f"Bastion refused the claim code (HTTP {response.status_code}): unknown, used, expired or not this "
                "host's; check the host key",
                retryable=response.status_code in (401, 403),
            )
        try:
            raw: Any = response.json()
        except ValueError:
            raw = None
        body = cast("dict[str, Any]", raw) if isinstance(raw, dict) else {}
        token, token_id = body.get("token"), body.get("token_id")
        if not isinstance(token, str) or not isinstance(token_id, str):
            raise ClaimFailed("Bastion's claim answer carries no token", retryable=False)
        if connection_id is not None and body.get("connection_id") not in (None, connection_id):
            raise ClaimFailed("Bastion's claim answer is for another connection", retryable=False)
        return Delivered(token, token_id)
