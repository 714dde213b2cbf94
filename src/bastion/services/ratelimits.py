"""Counting calls against rate-limit rules, in process memory or in Redis shared by every replica."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import anyio
from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.storage.redis.coredis import CoredisBridge
from limits.aio.strategies import FixedWindowRateLimiter, SlidingWindowCounterRateLimiter
from limits.aio.strategies import RateLimiter as Counter
from limits.errors import StorageError

from bastion.domain.ratelimits import RateLimitRule, applies, key_for
from bastion.domain.ratelimits import Strategy as StrategyKind
from bastion.errors import ConfigError, Unavailable

__all__ = ["KEY_PREFIX", "STORE_TIMEOUT_S", "Limited", "RateLimiter"]

logger = logging.getLogger("bastion.ratelimits")

# A healthy Redis answers in well under a millisecond; past this, refusing the call beats stalling every caller.
STORE_TIMEOUT_S: Final = 2.0
# Every Redis key Bastion writes for rate limits starts with "bastion:", so they never meet another app's keys.
KEY_PREFIX: Final = "bastion"
_NAMESPACE: Final = "ratelimit"
_THROTTLE: Final = "throttle"
UNREACHABLE: Final = "the rate-limit store is unreachable; try again shortly"


@dataclass(frozen=True, slots=True)
class Limited:
    """A call refused by a rule: which one, and how long until it would be allowed."""

    rule_id: str
    retry_after_s: int
    detail: str


class RateLimiter:
    """Tests and consumes rate-limit quota for a call; one per process, shared by every request."""

    def __init__(self, storage_url: str = "memory://", *, timeout_s: float = STORE_TIMEOUT_S) -> None:
        """Args:
        storage_url: ``memory://`` (this process only) or ``redis://host:port[/db]`` / ``rediss://…`` (shared).
        timeout_s: how long one ``hit`` may wait on the store before it fails closed.

        Raises:
            ConfigError: for any other URL.
        """
        self._storage = _storage_for(storage_url)
        self._errors: tuple[type[Exception], ...] = (StorageError,)
        if isinstance(self._storage, RedisStorage):
            # The library leaves its sliding-window calls unwrapped: those fail with the driver's own errors.
            base = self._storage.base_exceptions
            self._errors += base if isinstance(base, tuple) else (base,)
        self._timeout_s = timeout_s
        self._fixed = FixedWindowRateLimiter(self._storage)
        # The counter approximation keeps two integers per key, where a moving window keeps one timestamp per call
        # (a "10 000 per hour" rule would hold 10 000 entries per member); the approximation errs by a fraction.
        self._sliding = SlidingWindowCounterRateLimiter(self._storage)

    async def hit(
        self, rules: Sequence[RateLimitRule], *, member_id: str, host_id: str, gateway_id: str, tool: str
    ) -> Limited | None:
        """Count one call against every rule that applies; ``Limited`` (nothing consumed) if any has no room.

        Raises:
            Unavailable: the store did not answer in time or refused the connection (we fail closed).
        """
        applicable = [rule for rule in rules if applies(rule, gateway_id, tool)]
        if not applicable:
            return None
        try:
            with anyio.fail_after(self._timeout_s):
                return await self._hit(applicable, member_id=member_id, host_id=host_id, tool=tool)
        except TimeoutError as exc:
            logger.warning("rate-limit store did not answer within %s s", self._timeout_s)
            raise Unavailable(UNREACHABLE) from exc
        except self._errors as exc:
            logger.warning("rate-limit store failed: %s", exc)
            raise Unavailable(UNREACHABLE) from exc

    async def _hit(self, rules: Sequence[RateLimitRule], *, member_id: str, host_id: str, tool: str) -> Limited | None:
        counters = [(rule, _item(rule), key_for(rule, member_id, host_id, tool)) for rule in rules]
        # Test every rule before consuming any, so a call refused by one rule costs nothing under the others.
        refused = [(rule, item, key) for rule, item, key in counters if not await self._strategy(rule).test(item, key)]
        if refused:
            # The caller must wait for the slowest rule; telling them less only earns another refusal.
            verdicts = [await self._limited(rule, item, key) for rule, item, key in refused]
            return max(verdicts, key=lambda v: v.retry_after_s)
        # Between test and hit another replica may take the last slot. Each hit is atomic in the store and its answer
        # is final, so the limit is never exceeded; the race only means such a refused call may already have spent
        # quota under the rules hit before it, which errs towards refusing, never towards allowing.
        for rule, item, key in counters:
            if not await self._strategy(rule).hit(item, key):
                return await self._limited(rule, item, key)
        return None

    async def take(self, counters: Sequence[tuple[str, int, int]]) -> int | None:
        """Count one attempt against each ``(key, amount, window_s)`` counter (fixed windows, ``amount`` attempts per
        ``window_s`` seconds); None when every counter had room, else the seconds until the fullest one has (and
        nothing is consumed). For throttling anonymous pages: sign-in, password links, single sign-on.

        Raises:
            Unavailable: the store did not answer in time or refused the connection (we fail closed).
        """
        if not counters:
            return None
        try:
            with anyio.fail_after(self._timeout_s):
                return await self._take(counters)
        except TimeoutError as exc:
            logger.warning("rate-limit store did not answer within %s s", self._timeout_s)
            raise Unavailable(UNREACHABLE) from exc
        except self._errors as exc:
            logger.warning("rate-limit store failed: %s", exc)
            raise Unavailable(UNREACHABLE) from exc

    async def _take(self, counters: Sequence[tuple[str, int, int]]) -> int | None:
        items = [
            (RateLimitItemPerSecond(amount, window_s, namespace=_THROTTLE), key) for key, amount, window_s in counters
        ]
        waits = [await self._wait(item, key) for item, key in items if not await self._fixed.test(item, key)]
        if waits:
            return max(waits)
        for item, key in items:
            if not await self._fixed.hit(item, key):  # another replica took the last slot meanwhile
                return await self._wait(item, key)
        return None

    async def _wait(self, item: RateLimitItem, key: str) -> int:
        stats = await self._fixed.get_window_stats(item, key)
        return max(1, math.ceil(stats.reset_time - time.time()))

    async def close(self) -> None:
        """Drop the connections to Redis (memory storage holds none)."""
        if isinstance(self._storage, RedisStorage) and isinstance(self._storage.bridge, CoredisBridge):
            self._storage.bridge.get_connection().connection_pool.disconnect()

    def _strategy(self, rule: RateLimitRule) -> Counter:
        return self._fixed if rule.strategy is StrategyKind.FIXED else self._sliding

    async def _limited(self, rule: RateLimitRule, item: RateLimitItem, key: str) -> Limited:
        stats = await self._strategy(rule).get_window_stats(item, key)
        # A fixed window's reset is exact. A sliding window's is the next moment its weighted count drops, which may
        # still leave no room: a lower bound, never a promise. Under a second is rounded up so clients do not spin.
        retry_after_s = max(1, math.ceil(stats.reset_time - time.time()))
        calls = "call" if rule.amount == 1 else "calls"
        detail = (
            f"rate limit of {rule.amount} {calls} per {rule.window_s} s per {rule.per.value} reached; "
            f"retry in {retry_after_s} s"
        )
        return Limited(rule_id=rule.id, retry_after_s=retry_after_s, detail=detail)


def _storage_for(url: str) -> Storage:
    scheme = urlsplit(url).scheme
    if url == "memory://":
        return MemoryStorage()
    if scheme in ("redis", "rediss"):
        # wrap_exceptions turns driver errors into StorageError where the library wraps at all.
        return RedisStorage(f"async+{url}", wrap_exceptions=True, implementation="coredis", key_prefix=KEY_PREFIX)
    raise ConfigError(f"unsupported rate-limit store {scheme or url!r}; use memory:// or redis://host:port/db")


def _item(rule: RateLimitRule) -> RateLimitItem:
    # The library puts amount and window in the key too, so editing a rule's limit starts its counts afresh.
    return RateLimitItemPerSecond(rule.amount, rule.window_s, namespace=_NAMESPACE)
