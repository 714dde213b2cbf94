"""Per-upstream concurrency: a bounded queue, and a fast refusal beyond it, so a slow upstream cannot pile up calls."""

from __future__ import annotations

import anyio
import pytest

from bastion.upstream.pool import UpstreamBusy, UpstreamPool

pytestmark = pytest.mark.anyio


async def test_callers_beyond_the_slots_and_the_queue_are_refused_at_once_and_others_are_unaffected() -> None:
    pool = UpstreamPool(per_server_concurrency=2, per_server_queue=1)
    release = anyio.Event()
    holding = 0
    entered = anyio.Event()
    order: list[str] = []

    async def hold(name: str) -> None:
        nonlocal holding
        async with pool.slot("slow"):
            order.append(name)
            holding += 1
            if holding == 2:
                entered.set()
            await release.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold, "first")
        tg.start_soon(hold, "second")
        with anyio.fail_after(5):
            await entered.wait()
        tg.start_soon(hold, "queued")
        with anyio.fail_after(5):
            while pool.limiter("slow").statistics().tasks_waiting < 1:
                await anyio.lowlevel.checkpoint()
        with pytest.raises(UpstreamBusy) as refused:
            async with pool.slot("slow"):
                pass
        assert refused.value.retry_after_s >= 1 and refused.value.status == 503
        async with pool.slot("another upstream"):  # its own slots: untouched by the slow one
            order.append("other")
        release.set()
    assert order == ["first", "second", "other", "queued"]


async def test_a_zero_queue_refuses_as_soon_as_every_slot_is_taken() -> None:
    pool = UpstreamPool(per_server_concurrency=1, per_server_queue=0)
    async with pool.slot("s"):
        with pytest.raises(UpstreamBusy):
            async with pool.slot("s"):
                pass
    async with pool.slot("s"):
        pass
