"""Throttles on the pages anyone may hit without signing in: sign-in, password links, starting single sign-on.

Counted per client address and, where one is given, per email (as a keyed digest: no address is stored in the
counters), in the same store as the gateway's rate limits (memory, or Redis shared by every replica).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from starlette.requests import Request

from bastion.errors import BastionError
from bastion.services.apikeys import KeyHasher
from bastion.services.ratelimits import RateLimiter


class Throttled(BastionError):
    """Too many attempts from this address or for this account; the page says when to try again."""

    code = "too_many_attempts"
    status = 429
    title = "Too many attempts"

    def __init__(self, detail: str, retry_after_s: int) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class Limit:
    """``amount`` attempts per ``window_s`` seconds, counted under ``name``."""

    name: str
    amount: int
    window_s: int


# Generous for people (a typo or two, a shared office address), tight for a script. Sign-in also pauses an
# account after 10 wrong passwords in a row; these bound how often anyone may try at all.
SIGN_IN_PER_ADDRESS: Final = Limit("sign_in:ip", 60, 60)
SIGN_IN_PER_EMAIL: Final = Limit("sign_in:email", 30, 600)
TICKET_PER_ADDRESS: Final = Limit("ticket:ip", 30, 60)
TICKET_PER_EMAIL: Final = Limit("ticket:email", 10, 600)
SSO_START_PER_ADDRESS: Final = Limit("sso_start:ip", 30, 60)


def client_address(request: Request) -> str:
    """The address the request came from (the proxy's, unless the server is told to trust its headers)."""
    return request.client.host if request.client is not None else "unknown"


@dataclass(frozen=True, slots=True)
class Throttle:
    limiter: RateLimiter
    hasher: KeyHasher

    async def check(
        self, request: Request, per_address: Limit | None, per_email: Limit | None = None, email: str = ""
    ) -> None:
        """Count this attempt; Throttled (nothing counted) when the address or the email has used its allowance."""
        counters: list[tuple[str, int, int]] = []
        if per_address is not None:
            key = f"ui:{per_address.name}:{client_address(request)}"
            counters.append((key, per_address.amount, per_address.window_s))
        if per_email is not None and email:
            tag = self.hasher.digest("throttle:" + email.strip().lower()).hex()[:32]
            counters.append((f"ui:{per_email.name}:{tag}", per_email.amount, per_email.window_s))
        wait = await self.limiter.take(counters)
        if wait is not None:
            raise Throttled(f"There were too many attempts. Wait {_duration(wait)} and try again.", wait)


def _duration(seconds: int) -> str:
    if seconds < 90:
        return f"{seconds} seconds" if seconds != 1 else "a second"
    return f"{(seconds + 59) // 60} minutes"
