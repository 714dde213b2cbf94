"""Upstream requests over stdio reach the caller whose call is waiting, and no one else's.

stdio and HTTP+SSE name no call in a server->client request, so a session whose callers declared sampling,
elicitation or roots takes its calls in turns, and each upstream message is tagged, as it is read, with the
caller whose turn it is.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import anyio
import mcp_types as types
import pytest
from mcp.shared.message import SessionMessage

from bastion.domain.models import AuthKind, ProtocolEra, Server, Transport
from bastion.types import ServerId, WorkspaceId
from bastion.upstream import relay
from bastion.upstream.pool import Lease, SessionRetired, UpstreamBusy, UpstreamPool
from bastion.upstream.relay import NO_PROFILE, Profile
from bastion.upstream.transports import Credential

pytestmark = pytest.mark.anyio

FIXTURE: Final = Path(__file__).resolve().parents[1] / "fixtures" / "sampling_server.py"
SAMPLING: Final = Profile(sampling=True)


def _stdio_server() -> Server:
    now = datetime.now(UTC)
    return Server(
        id=ServerId("srv_sampling"),
        workspace_id=WorkspaceId("ws"),
        name="sampler",
        description="",
        transport=Transport.STDIO,
        url=None,
        command=sys.executable,
        args=(str(FIXTURE),),
        env={},
        auth_kind=AuthKind.NONE,
        oauth=None,
        era=ProtocolEra.LEGACY,
        connect_timeout_s=20.0,
        call_timeout_s=20.0,
        version=1,
        created_at=now,
        updated_at=now,
    )


@dataclass
class _Agent:
    """Stands in for a downstream request's session: records what it is asked, answers once ``release`` is set."""

    name: str
    asked: list[str] = field(default_factory=list[str])
    arrived: anyio.Event = field(default_factory=anyio.Event)
    release: anyio.Event = field(default_factory=anyio.Event)

    async def send_request(self, request: Any, _result_type: Any, metadata: Any = None) -> types.CreateMessageResult:
        self.asked.append(request.params.messages[0].content.text)
        self.arrived.set()
        await self.release.wait()
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text=f"{self.name}'s answer"), model="m"
        )


@dataclass
class _Caller:
    """Stands in for the downstream ``ServerRequestContext`` the relay talks to."""

    session: _Agent
    request_id: int = 1
    protocol_version: str = "2025-11-25"


async def _ask(pool: UpstreamPool, lease: Lease, caller: _Caller | None, label: str) -> str:
    relay.downstream.set(caller)  # type: ignore[arg-type]  # a stand-in for the downstream request
    async with pool.turn(lease):
        result = await lease.client.call_tool("ask", {"label": label})
    content = result.content[0]
    assert isinstance(content, types.TextContent)
    return content.text


async def test_two_callers_on_one_stdio_session_each_get_only_their_own_sampling_request() -> None:
    pool = UpstreamPool()
    ada, bob = _Agent("ada"), _Agent("bob")
    answers: dict[str, str] = {}
    async with pool.running():
        lease = await pool.lease(_stdio_server(), Credential(None), SAMPLING)
        assert lease.turns is not None

        async def call(agent: _Agent) -> None:
            answers[agent.name] = await _ask(pool, lease, _Caller(agent), f"for {agent.name}")

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, ada)
            with anyio.fail_after(20):
                await ada.arrived.wait()
            tg.start_soon(call, bob)
            with anyio.fail_after(5):  # bob's call is in flight, waiting for its turn, while ada is being asked
                while lease.turns.lock.statistics().tasks_waiting < 1:
                    await anyio.lowlevel.checkpoint()
            assert bob.asked == []
            ada.release.set()
            bob.release.set()
    assert ada.asked == ["for ada"] and bob.asked == ["for bob"]
    assert answers == {"ada": "answer: ada's answer", "bob": "answer: bob's answer"}


async def test_an_upstream_request_with_no_caller_waiting_gets_an_error_and_reaches_no_one() -> None:
    pool = UpstreamPool()
    async with pool.running():
        lease = await pool.lease(_stdio_server(), Credential(None), SAMPLING)
        with anyio.fail_after(20):
            text = await _ask(pool, lease, None, "for nobody")
    assert text == "refused: no caller is waiting on this request"


async def test_a_call_that_ends_unanswered_retires_its_session_and_callers_queued_on_it_move_to_a_fresh_one() -> None:
    pool = UpstreamPool()
    ada, bob = _Agent("ada"), _Agent("bob")
    bob.release.set()
    async with pool.running():
        lease = await pool.lease(_stdio_server(), Credential(None), SAMPLING)
        assert lease.turns is not None
        refused: list[BaseException] = []

        async def queued() -> None:
            try:
                await _ask(pool, lease, _Caller(bob), "for bob")
            except SessionRetired as exc:
                refused.append(exc)

        async with anyio.create_task_group() as tg:
            abandoned = anyio.CancelScope()

            async def abandon() -> None:
                with abandoned:
                    await _ask(pool, lease, _Caller(ada), "for ada")

            tg.start_soon(abandon)
            with anyio.fail_after(20):
                await ada.arrived.wait()
            tg.start_soon(queued)
            with anyio.fail_after(5):
                while lease.turns.lock.statistics().tasks_waiting < 1:
                    await anyio.lowlevel.checkpoint()
            abandoned.cancel()  # ada's call ends while the upstream still waits on ada's agent
        assert lease.turns.retired
        assert len(refused) == 1 and bob.asked == []
        fresh = await pool.lease(_stdio_server(), Credential(None), SAMPLING)
        assert fresh.client is not lease.client
        with anyio.fail_after(20):
            assert await _ask(pool, fresh, _Caller(bob), "for bob") == "answer: bob's answer"
    assert ada.asked == ["for ada"] and bob.asked == ["for bob"]


async def test_a_message_keeps_the_caller_whose_turn_it_was_when_read_even_after_the_turn_passes() -> None:
    turns = relay.Turns()
    send, receive = anyio.create_memory_object_stream[Any](2)
    message = SessionMessage(types.JSONRPCRequest(jsonrpc="2.0", id=1, method="roots/list"))
    ada, bob = _Caller(_Agent("ada")), _Caller(_Agent("bob"))

    @asynccontextmanager
    async def transport() -> AsyncGenerator[Any]:
        async with send, receive:
            yield receive, send

    async with relay.tagged(transport(), turns) as (reads, _writes):
        turns.caller = ada  # type: ignore[assignment]
        await send.send(message)
        await send.send(message)
        assert await reads.receive() is message
        turns.caller = bob  # type: ignore[assignment]
        tagged_for_ada = reads.last_context
        assert await reads.receive() is message
        tagged_for_bob = reads.last_context
    assert tagged_for_ada is not None and tagged_for_bob is not None
    assert tagged_for_ada.run(relay.downstream.get) is ada
    assert tagged_for_bob.run(relay.downstream.get) is bob
    assert relay.downstream.get() is None  # the reader's own context is untouched


def test_only_stdio_and_sse_sessions_with_a_declared_capability_take_turns() -> None:
    assert relay.serializes(Transport.STDIO, SAMPLING)
    assert relay.serializes(Transport.SSE, Profile(elicitation=True))
    assert relay.serializes(Transport.SSE, Profile(roots=True))
    assert not relay.serializes(Transport.STDIO, NO_PROFILE)
    assert not relay.serializes(Transport.SSE, NO_PROFILE)
    assert not relay.serializes(Transport.STREAMABLE_HTTP, SAMPLING)


async def test_a_call_whose_turn_does_not_come_in_time_is_refused_as_busy_and_the_session_stays() -> None:
    # Ada's agent, asked to sample, calls the same server again before answering: that second call must not wait
    # for the first one (which waits for it) until the first times out.
    pool = UpstreamPool()
    ada = _Agent("ada")
    async with pool.running():
        lease = await pool.lease(_stdio_server(), Credential(None), SAMPLING)
        assert lease.turns is not None
        async with anyio.create_task_group() as tg:
            first: list[str] = []

            async def ask_first() -> None:
                first.append(await _ask(pool, lease, _Caller(ada), "first"))

            tg.start_soon(ask_first)
            with anyio.fail_after(20):
                await ada.arrived.wait()
            relay.downstream.set(_Caller(ada))  # type: ignore[arg-type]
            with pytest.raises(UpstreamBusy, match="still running"):
                async with pool.turn(lease, wait_s=0.01):
                    pytest.fail("the second call got a turn while the first held it")
            ada.release.set()
        assert first == ["answer: ada's answer"]
        assert not lease.turns.retired  # a refused wait is not an unanswered call
        assert await pool.lease(_stdio_server(), Credential(None), SAMPLING) == lease
