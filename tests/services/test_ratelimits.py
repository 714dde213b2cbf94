"""Rate limits: per member, host or tool, in process memory and in a Redis shared by separate processes."""

from __future__ import annotations

import itertools
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import anyio
import coredis
import pytest
import time_machine
from anyio.abc import ByteReceiveStream, Process, SocketAttribute, SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from bastion.domain.ratelimits import LimitPer, RateLimitRule, Strategy
from bastion.errors import ConfigError, Unavailable
from bastion.services.ratelimits import KEY_PREFIX, Limited, RateLimiter
from tests.processes import free_port

pytestmark = pytest.mark.anyio

REDIS_URL: Final = os.environ.get("BASTION_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
WORKER: Final = Path(__file__).parents[1] / "fixtures" / "ratelimit_worker.py"
# On a minute boundary (and an hour one), so sliding windows start exactly when the clock does.
START: Final = datetime(2030, 1, 1, tzinfo=UTC)


def rule(
    per: LimitPer = LimitPer.MEMBER,
    amount: int = 3,
    window_s: int = 60,
    strategy: Strategy = Strategy.FIXED,
    *,
    gateway_id: str | None = None,
    name: str | None = None,
    rule_id: str | None = None,
) -> RateLimitRule:
    return RateLimitRule(
        rule_id or f"rl_{secrets.token_hex(6)}", per, amount, window_s, strategy, gateway_id=gateway_id, name=name
    )


async def call(
    limiter: RateLimiter,
    rules: Sequence[RateLimitRule],
    *,
    member: str = "ada",
    host: str = "agent",
    gateway: str = "gw",
    tool: str = "bq__query",
) -> Limited | None:
    return await limiter.hit(rules, member_id=member, host_id=host, gateway_id=gateway, tool=tool)


async def allowed_of(limiter: RateLimiter, rules: Sequence[RateLimitRule], attempts: int, **who: str) -> int:
    """How many of ``attempts`` calls in a row get through."""
    return sum([await call(limiter, rules, **who) is None for _ in range(attempts)])


@pytest.fixture
def clock() -> Iterator[time_machine.Traveller]:
    with time_machine.travel(START, tick=False) as traveller:
        yield traveller


@pytest.fixture
async def limiter(clock: time_machine.Traveller) -> AsyncIterator[RateLimiter]:
    memory = RateLimiter("memory://")
    try:
        yield memory
    finally:
        await memory.close()


@pytest.fixture
async def redis_rule_id() -> AsyncIterator[str]:
    """A rule id no other test or run uses; its keys are deleted from Redis afterwards."""
    rule_id = f"rl_{secrets.token_hex(8)}"
    yield rule_id
    client = coredis.Redis.from_url(REDIS_URL)
    try:
        if keys := await client.keys(f"{KEY_PREFIX}:*{rule_id}*"):
            await client.delete(list(keys))
    finally:
        client.connection_pool.disconnect()


# ---- memory storage ----------------------------------------------------------------------------------------------


async def test_a_fixed_window_refuses_the_call_past_its_amount_and_says_when_to_retry(
    limiter: RateLimiter, clock: time_machine.Traveller
) -> None:
    limit = rule(amount=10, window_s=60)
    assert await allowed_of(limiter, [limit], 10) == 10
    clock.shift(12)

    refused = await call(limiter, [limit])

    assert refused == Limited(
        rule_id=limit.id,
        retry_after_s=48,
        detail="rate limit of 10 calls per 60 s per member reached; retry in 48 s",
    )


async def test_a_sliding_window_refuses_the_call_past_its_amount(limiter: RateLimiter) -> None:
    limit = rule(amount=3, window_s=60, strategy=Strategy.SLIDING)
    assert await allowed_of(limiter, [limit], 5) == 3

    refused = await call(limiter, [limit])

    assert refused is not None
    assert refused.rule_id == limit.id
    assert 1 <= refused.retry_after_s <= 60


async def test_the_retry_hint_is_never_below_one_second(limiter: RateLimiter, clock: time_machine.Traveller) -> None:
    limit = rule(amount=1, window_s=60)
    assert await call(limiter, [limit]) is None
    clock.shift(59.9)

    refused = await call(limiter, [limit])

    assert refused is not None
    assert refused.retry_after_s == 1
    assert refused.detail == "rate limit of 1 call per 60 s per member reached; retry in 1 s"


async def test_each_member_has_a_count_of_their_own(limiter: RateLimiter) -> None:
    per_member = rule(LimitPer.MEMBER, amount=2)
    assert await allowed_of(limiter, [per_member], 3, member="ada") == 2

    assert await allowed_of(limiter, [per_member], 3, member="bob") == 2
    assert await call(limiter, [per_member], member="ada") is not None


async def test_a_per_host_rule_counts_every_member_behind_that_host_together(limiter: RateLimiter) -> None:
    per_host = rule(LimitPer.HOST, amount=3)
    assert await allowed_of(limiter, [per_host], 2, member="ada", host="agent") == 2
    assert await allowed_of(limiter, [per_host], 2, member="bob", host="agent") == 1

    assert await allowed_of(limiter, [per_host], 4, member="bob", host="other-agent") == 3


async def test_a_per_tool_rule_counts_every_caller_of_that_tool_together(limiter: RateLimiter) -> None:
    per_tool = rule(LimitPer.TOOL, amount=3)
    assert await allowed_of(limiter, [per_tool], 2, member="ada", host="agent", tool="bq__query") == 2
    assert await allowed_of(limiter, [per_tool], 2, member="bob", host="laptop", tool="bq__query") == 1

    assert await allowed_of(limiter, [per_tool], 4, member="ada", tool="bq__list_tables") == 3


async def test_rules_for_another_gateway_or_another_tool_do_not_apply(limiter: RateLimiter) -> None:
    other_gateway = rule(amount=1, gateway_id="other-gw")
    bq_only = rule(amount=1, name="bq__*")
    rules = [other_gateway, bq_only]

    assert await allowed_of(limiter, rules, 5, gateway="gw", tool="github__search") == 5
    assert await allowed_of(limiter, [other_gateway], 5, gateway="gw", tool="bq__query") == 5
    assert await allowed_of(limiter, [other_gateway], 5, gateway="other-gw", tool="github__search") == 1
    assert await allowed_of(limiter, rules, 5, gateway="gw", tool="bq__query") == 1


async def test_no_rules_means_no_limit(limiter: RateLimiter) -> None:
    assert await allowed_of(limiter, [], 100) == 100


async def test_a_call_refused_by_one_rule_spends_nothing_under_the_others(limiter: RateLimiter) -> None:
    per_host = rule(LimitPer.HOST, amount=3)
    per_member = rule(LimitPer.MEMBER, amount=1)
    rules = [per_host, per_member]  # the host rule is counted first: a refusal by the member rule must undo nothing
    assert await call(limiter, rules, member="ada") is None

    for _ in range(5):
        refused = await call(limiter, rules, member="ada")
        assert refused is not None
        assert refused.rule_id == per_member.id

    assert await call(limiter, rules, member="bob") is None
    assert await call(limiter, rules, member="cy") is None
    refused = await call(limiter, rules, member="dee")
    assert refused is not None
    assert refused.rule_id == per_host.id


async def test_a_call_refused_by_two_rules_reports_the_longer_wait(limiter: RateLimiter) -> None:
    per_ten_s = rule(amount=1, window_s=10)
    per_hour = rule(amount=1, window_s=3600)
    assert await call(limiter, [per_ten_s, per_hour]) is None

    refused = await call(limiter, [per_ten_s, per_hour])

    assert refused is not None
    assert (refused.rule_id, refused.retry_after_s) == (per_hour.id, 3600)


async def test_rules_with_the_same_shape_never_share_a_counter(limiter: RateLimiter) -> None:
    first, second = rule(amount=2), rule(amount=2)
    assert await allowed_of(limiter, [first], 3) == 2

    assert await allowed_of(limiter, [second], 3) == 2


async def test_a_fixed_window_allows_calls_again_once_it_has_passed(
    limiter: RateLimiter, clock: time_machine.Traveller
) -> None:
    limit = rule(amount=3, window_s=60)
    assert await allowed_of(limiter, [limit], 4) == 3
    clock.shift(59)
    assert await call(limiter, [limit]) is not None

    clock.shift(2)

    assert await allowed_of(limiter, [limit], 4) == 3


async def test_a_sliding_window_frees_quota_gradually_as_the_last_window_ages(
    limiter: RateLimiter, clock: time_machine.Traveller
) -> None:
    limit = rule(amount=3, window_s=60, strategy=Strategy.SLIDING)
    assert await allowed_of(limiter, [limit], 4) == 3
    clock.shift(30)
    assert await call(limiter, [limit]) is not None

    clock.shift(31)  # the last window's 3 calls now weigh 59/60: 2.95, which the library rounds down to 2
    assert await allowed_of(limiter, [limit], 3) == 1
    clock.shift(44)  # they weigh 15/60 now: 0.75 + the 1 call of this window leaves room for 2 more

    assert await allowed_of(limiter, [limit], 3) == 2


def test_a_store_url_other_than_memory_or_redis_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="memcached"):
        RateLimiter("memcached://127.0.0.1:11211")


async def test_take_counts_every_key_and_refuses_without_spending_any(
    limiter: RateLimiter, clock: time_machine.Traveller
) -> None:
    address, email = ("ui:t:ip:10.0.0.1", 3, 60), ("ui:t:email:ada", 2, 600)
    assert await limiter.take([address, email]) is None
    assert await limiter.take([address, email]) is None
    clock.shift(15)
    assert await limiter.take([address, email]) == 585  # the email's window is the one to wait for
    assert await limiter.take([address]) is None  # the refusal spent nothing under the address: 3 of 3 now
    assert await limiter.take([address]) == 45
    assert await limiter.take([]) is None


# ---- Redis -------------------------------------------------------------------------------------------------------


async def test_take_in_redis_refuses_past_the_amount_and_says_when_to_retry(redis_rule_id: str) -> None:
    window = _window_far_from_a_boundary()
    key = ("ui:t:" + redis_rule_id, 2, window)
    limiter = RateLimiter(REDIS_URL)
    try:
        assert await limiter.take([key]) is None
        assert await limiter.take([key]) is None
        wait = await limiter.take([key])
    finally:
        await limiter.close()
    assert wait is not None and 1 <= wait <= window


@pytest.mark.parametrize("strategy", list(Strategy))
async def test_redis_refuses_the_call_past_the_amount_and_says_when_to_retry(
    redis_rule_id: str, strategy: Strategy
) -> None:
    limit = rule(amount=3, window_s=_window_far_from_a_boundary(), strategy=strategy, rule_id=redis_rule_id)
    limiter = RateLimiter(REDIS_URL)
    try:
        assert await allowed_of(limiter, [limit], 3) == 3
        refused = await call(limiter, [limit])
        assert await call(limiter, [limit], member="bob") is None
    finally:
        await limiter.close()

    assert refused is not None
    assert refused.rule_id == redis_rule_id
    assert 1 <= refused.retry_after_s <= limit.window_s


@pytest.mark.e2e
@pytest.mark.parametrize("strategy", list(Strategy))
async def test_a_limit_in_redis_holds_across_two_processes_hitting_it_at_once(
    redis_rule_id: str, strategy: Strategy
) -> None:
    # Neither process can use the whole amount alone, so both must draw on the one shared count to reach it.
    amount, calls_each = 100, 80
    args = [REDIS_URL, redis_rule_id, str(amount), str(_window_far_from_a_boundary()), strategy.value, str(calls_each)]

    allowed = await _run_together([sys.executable, str(WORKER), *args], copies=2)

    assert sum(allowed) == amount
    assert min(allowed) >= amount - calls_each


async def test_an_unreachable_redis_fails_closed_at_once() -> None:
    limiter = RateLimiter(f"redis://127.0.0.1:{free_port()}/0")
    try:
        for strategy in Strategy:  # the library wraps fixed-window errors but not sliding-window ones
            with anyio.fail_after(5), pytest.raises(Unavailable, match="rate-limit store is unreachable"):
                await call(limiter, [rule(strategy=strategy)])
    finally:
        await limiter.close()


async def test_a_redis_that_never_answers_fails_closed_after_the_timeout() -> None:
    async def swallow(stream: SocketStream) -> None:
        async with stream:
            async for _ in stream:
                pass

    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener, anyio.create_task_group() as tg:
        # anyio's typed attributes, not Django's QuerySet.extra
        port = listener.extra(SocketAttribute.local_port)  # noqa: S610
        limiter = RateLimiter(f"redis://127.0.0.1:{port}/0", timeout_s=0.2)
        tg.start_soon(listener.serve, swallow)
        try:
            with anyio.fail_after(5), pytest.raises(Unavailable, match="rate-limit store is unreachable"):
                await call(limiter, [rule()])
        finally:
            await limiter.close()
            tg.cancel_scope.cancel()


def _window_far_from_a_boundary() -> int:
    """A window of about an hour, now well inside it: sliding windows are aligned to the clock, and a test that
    straddled a boundary would see the last window's weight and allow one call more than it should."""
    return next(w for w in itertools.count(3600) if 60 < time.time() % w < w - 60)


async def _run_together(command: list[str], *, copies: int) -> list[int]:
    """Start ``copies`` workers, release them at once when all are ready, and return what each printed."""
    with anyio.fail_after(60):
        async with AsyncExitStack() as stack:  # closing a process that is still running kills it
            processes = [await stack.enter_async_context(await anyio.open_process(command)) for _ in range(copies)]
            outputs = [BufferedByteReceiveStream(_stdout(p)) for p in processes]
            for process, output in zip(processes, outputs, strict=True):
                assert await _line(process, output) == "ready"
            for process in processes:
                assert process.stdin is not None
                await process.stdin.send(b"go\n")
            return [int(await _line(process, output)) for process, output in zip(processes, outputs, strict=True)]


def _stdout(process: Process) -> ByteReceiveStream:
    assert process.stdout is not None
    return process.stdout


async def _line(process: Process, output: BufferedByteReceiveStream) -> str:
    try:
        return (await output.receive_until(b"\n", 4096)).decode("utf-8")
    except anyio.IncompleteRead:
        assert process.stderr is not None
        errors = b"".join([chunk async for chunk in process.stderr])
        raise AssertionError(f"the worker died: {errors.decode('utf-8', 'replace')}") from None
