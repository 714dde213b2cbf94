"""A session something keeps (a resource subscription lives on it) is not closed for idleness until let go; one
that calls are on is not closed by an edit until they end."""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import anyio
import pytest

from bastion.domain.models import AuthKind, ProtocolEra, Server, Transport
from bastion.types import ServerId, WorkspaceId
from bastion.upstream.pool import UpstreamPool
from bastion.upstream.relay import NO_PROFILE, Profile
from bastion.upstream.transports import Credential

pytestmark = pytest.mark.anyio

FIXTURE: Final = Path(__file__).resolve().parents[1] / "fixtures" / "sampling_server.py"
IDLE_S: Final = 60.0


def _stdio_server() -> Server:
    now = datetime.now(UTC)
    return Server(
        id=ServerId("srv_kept"),
        workspace_id=WorkspaceId("ws"),
        name="kept",
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


async def test_a_kept_session_outlives_its_idle_time_until_released_while_others_are_closed() -> None:
    pool = UpstreamPool(idle_s=IDLE_S)
    server = _stdio_server()
    async with pool.running():
        kept_lease = await pool.lease(server, Credential(None), NO_PROFILE)
        idle_lease = await pool.lease(server, Credential(None), Profile(sampling=True))
        kept = pool.keep(kept_lease.client)
        assert kept is not None and pool.open_sessions == 2
        pool.reap_idle(time.monotonic() + IDLE_S + 1)
        assert pool.cached_lease(server, None, NO_PROFILE) is not None
        assert pool.cached_lease(server, None, Profile(sampling=True)) is None
        assert not kept.ended.is_set()
        kept.release()
        kept.release()  # idempotent: one keep, one release
        pool.reap_idle(time.monotonic() + IDLE_S + 1)
        assert pool.cached_lease(server, None, NO_PROFILE) is None
        with anyio.fail_after(20):
            await kept.ended.wait()  # whoever kept it learns that it closed
        assert pool.keep(idle_lease.client) is None  # no longer in the pool: nothing to keep


async def test_a_session_taken_out_of_the_pool_by_an_edit_closes_only_once_its_calls_have_ended() -> None:
    pool = UpstreamPool(idle_s=IDLE_S)
    server = _stdio_server()
    async with pool.running():
        lease = await pool.lease(server, Credential(None), NO_PROFILE)
        assert lease.session is not None
        with pool.using(lease):
            pool.discard(server_id=server.id)  # an edit of how the server is reached, mid-call
            assert pool.cached_lease(server, None, NO_PROFILE) is None  # new calls open a fresh session
            assert not lease.session.ended.is_set()
            await lease.client.list_tools()  # the call on it goes on
        with anyio.fail_after(20):
            await lease.session.ended.wait()  # and the session closes once that call has ended
        idle = await pool.lease(server, Credential(None), NO_PROFILE)
        assert idle.session is not None and idle.session is not lease.session
        pool.discard(server_id=server.id)  # nothing on it: closed at once
        with anyio.fail_after(20):
            await idle.session.ended.wait()


def test_a_description_edit_keeps_how_a_server_is_reached_and_a_timeout_edit_does_not() -> None:
    server = _stdio_server()
    assert replace(server, description="now described", version=2).reach == server.reach
    assert replace(server, call_timeout_s=21.0).reach != server.reach
    assert replace(server, env={"REGION": "eu"}).reach != server.reach
