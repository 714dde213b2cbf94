"""Retry budgets per upstream server: the retries Bastion makes stay a bounded share of the calls it forwards.

Bastion retries a call only when the upstream did not act on it: once after renewing a refused token (401), once
in a fresh session when the upstream forgot the session (404) or it closed under the call. Each is at most one
per call; the budget bounds them across calls too, so a storm of refusals cannot turn into a storm of token
refreshes and session handshakes: every call forwarded earns ``ratio`` of a retry, and a trickle of
``min_per_s`` a second is always allowed, up to ``burst`` saved. A retry over budget is not made: the call gets
the answer it had (the refusal, the forgotten session). Each process keeps its own budgets.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

RATIO: Final = 0.2
MIN_PER_S: Final = 1.0
BURST: Final = 10.0


@dataclass(slots=True)
class _Balance:
    tokens: float
    at: float


class RetryBudgets:
    """The retry budget of every upstream server this process calls, by server id."""

    def __init__(
        self,
        *,
        ratio: float | None = None,
        min_per_s: float | None = None,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # The module's constants are read here, not at import: a test may set them for a whole app.
        self._ratio = RATIO if ratio is None else ratio
        self._min_per_s = MIN_PER_S if min_per_s is None else min_per_s
        self._burst = BURST if burst is None else burst
        self._clock = clock
        self._balances: dict[str, _Balance] = {}

    def _balance(self, server_id: str) -> _Balance:
        now = self._clock()
        balance = self._balances.get(server_id)
        if balance is None:
            balance = self._balances[server_id] = _Balance(self._burst, now)
        else:
            balance.tokens = min(self._burst, balance.tokens + (now - balance.at) * self._min_per_s)
            balance.at = now
        return balance

    def called(self, server_id: str) -> None:
        """A call was forwarded to ``server_id``: it earns a share of a retry."""
        balance = self._balances.get(server_id)
        if balance is not None:  # a server never retried is at its burst already
            balance.tokens = min(self._burst, balance.tokens + self._ratio)

    def may_retry(self, server_id: str) -> bool:
        """Whether one retry to ``server_id`` fits the budget now (and if so, it is spent)."""
        balance = self._balance(server_id)
        if balance.tokens < 1:
            return False
        balance.tokens -= 1
        return True
