"""The agent journey end to end: `bastion serve`, the example agent (bastion-agent SDK) and a real upstream.

An admin sets up a host with a host key and a webhook endpoint pointing at the example agent (claim codes, the
default), a gateway in front of a recording upstream, and a connection link. A member enrolls through the link in
the web pages (pasting their own upstream credential); Bastion's webhook hands the agent a claim code, the agent
redeems it and its map holds the person; the agent asks a tool as that person and the upstream sees the person's own
credential; the audit log names them. Disabling the host refuses the next call with a clear error and keeps the
person in the map; enabling it again restores calls. And: the agent is down while events are produced; once back,
every event arrives, one of them retried out of order, and the map ends in the state of the newest events. And: a
token about to expire is succeeded, and the agent moves to the successor with nobody copying a token.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import anyio
import httpx2
import pytest
from examples.agent.app import Config, create_app
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion.settings import generate_secrets
from bastion_agent import Applied, Event, TokenMap, generate_key, sign
from tests.mcp_support import Recorder, recording_upstream, serving
from tests.processes import Server, clean_env, free_port, run_bastion
from tests.processes import serving as bastion_serving
from tests.web.ui.support import Browser

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.timeout(300)]

HOST: Final = "agent"
GATEWAY: Final = "sales"
SERVER: Final = "crm"
TOOL: Final = f"{SERVER}__whoami"
WAIT_S: Final = 60  # Bastion retries with backoff: a delivery after an outage may take a few retry rounds
# Announced a quarter of it (5 s) ahead of its expiry: room for a sweep (every second) held up on a busy machine.
SHORT_LIFETIME: Final = timedelta(seconds=20)
TOKEN_ON_PAGE: Final = re.compile(r'id="token" type="text" readonly value="(bst_[A-Za-z0-9]+)"')


@dataclass(frozen=True)
class Person:
    email: str
    password: str
    credential: str  # their own upstream credential, pasted at enrollment


ADA: Final = Person("ada@example.com", "ada-bastion-passphrase", "Bearer ada-own-upstream-credential")
BOB: Final = Person("bob@example.com", "bob-bastion-passphrase", "Bearer bob-own-upstream-credential")


@dataclass
class Inbox:
    """The events the agent committed to its map, in arrival order; tests wait on it instead of sleeping."""

    events: list[Event] = field(default_factory=list[Event])
    _changed: anyio.Event = field(default_factory=anyio.Event)

    async def on_event(self, event: Event, _applied: Applied) -> None:
        self.events.append(event)
        self._changed.set()
        self._changed = anyio.Event()

    def types(self) -> list[str]:
        return [e.type for e in self.events]

    async def wait_for(self, what: str, done: Callable[[list[Event]], bool]) -> None:
        try:
            with anyio.fail_after(WAIT_S):
                while not done(self.events):
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"the agent never received {what}; it got {self.types()}") from None


@dataclass
class World:
    bastion: Server
    admin: httpx2.AsyncClient  # the admin's API client (/api/v1, their API key)
    recorder: Recorder
    link_url: str
    invitations: dict[str, str]
    agent_port: int
    config: Config
    endpoint_id: str

    @property
    def base_url(self) -> str:
        return self.bastion.base_url


def _cli(env: dict[str, str], cwd: Path, *args: str) -> Any:
    done = run_bastion(*args, "--json", env=env, cwd=cwd)
    assert done.returncode == 0, f"bastion {' '.join(args)} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout)


async def _ok(response: httpx2.Response, status: int = 200) -> Any:
    assert response.status_code == status, f"{response.request.method} {response.request.url}: {response.text}"
    return response.json()


async def _admin_sets_up_the_agents_host(admin: httpx2.AsyncClient, webhook_url: str) -> tuple[str, str, str]:
    """A host key and a webhook endpoint delivering claim codes to ``webhook_url``: (key, endpoint id, secret)."""
    key = await _ok(await admin.post(f"/hosts/{HOST}/keys", json={"name": "example agent"}), 201)
    created = await _ok(
        await admin.post(f"/hosts/{HOST}/webhooks", json={"url": webhook_url, "token_delivery": "claim_code"}), 201
    )
    return key["secret"], created["endpoint"]["id"], created["secret"]


@pytest.fixture
async def world(tmp_path: Path) -> AsyncGenerator[World]:
    recorder = Recorder()
    async with serving(recording_upstream(recorder)) as upstream:
        bastion_port, agent_port = free_port(), free_port()
        env = clean_env(
            BASTION_DATA_DIR=str(tmp_path / "data"),
            BASTION_PUBLIC_URL=f"http://127.0.0.1:{bastion_port}",
            BASTION_OUTBOUND_ALLOW_LOOPBACK="true",  # the upstream and the agent listen on http://127.0.0.1
            BASTION_JANITOR_INTERVAL_S="1",  # tokens about to expire are announced within a second
            **{f"BASTION_{k.upper()}": v for k, v in generate_secrets().items()},
        )
        admin_key = _cli(env, tmp_path, "init", "--owner-email", "admin@example.com")["owner"]["api_key"]
        _cli(env, tmp_path, "server", "create", SERVER, "--url", f"{upstream}/mcp", "--auth-kind", "bearer")
        _cli(env, tmp_path, "gateway", "create", GATEWAY, "--server", SERVER)
        _cli(env, tmp_path, "host", "create", HOST, "--description", "The example agent")
        for person in (ADA, BOB):
            _cli(env, tmp_path, "member", "create", person.email)
        link = _cli(env, tmp_path, "link", "create", "--host", HOST, "--gateway", GATEWAY, "--max-uses", "5")
        with bastion_serving(env, tmp_path, port=bastion_port) as bastion:
            async with httpx2.AsyncClient(
                base_url=f"{bastion.base_url}/api/v1", headers={"Authorization": f"Bearer {admin_key}"}, timeout=30
            ) as admin:
                invitations = {
                    p.email: (await _ok(await admin.post(f"/members/{p.email}/invitation"), 201))["url"]
                    for p in (ADA, BOB)
                }
                host_key, endpoint_id, secret = await _admin_sets_up_the_agents_host(
                    admin, f"http://127.0.0.1:{agent_port}/webhooks/bastion"
                )
                config = Config(
                    bastion_url=bastion.base_url,
                    token_key=generate_key(),
                    webhook_secrets=(secret,),
                    tool=TOOL,
                    database_url=f"sqlite:///{tmp_path / 'agent.db'}",
                    host_key=host_key,
                    connect_link=link["url"],
                )
                yield World(bastion, admin, recorder, link["url"], invitations, agent_port, config, endpoint_id)


@dataclass(frozen=True)
class RunningAgent:
    http: httpx2.AsyncClient  # talks to the agent's web service
    token_map: TokenMap  # the agent's own map, to look into


@asynccontextmanager
async def running_agent(
    world: World, inbox: Inbox, wrap: Callable[[ASGIApp], ASGIApp] | None = None
) -> AsyncGenerator[RunningAgent]:
    """The example agent on its port (the same one every time: Bastion's endpoint points there)."""
    app = create_app(world.config, on_event=inbox.on_event)
    async with (
        serving(wrap(app) if wrap else app, port=world.agent_port) as url,
        httpx2.AsyncClient(base_url=url, timeout=60) as client,
    ):
        yield RunningAgent(client, app.state.agent.token_map)


async def enroll(world: World, person: Person) -> str:
    """The person accepts their invitation, opens the link, pastes their credential and approves; their token."""
    async with httpx2.AsyncClient(base_url=world.base_url, timeout=30) as http:
        browser = Browser(http)
        welcome = world.invitations[person.email].removeprefix(world.base_url)
        await browser.get(welcome)
        saved = await browser.post(welcome, {"password": person.password, "password_again": person.password})
        assert saved.status_code == 303, saved.text
        link = world.link_url.removeprefix(world.base_url)
        landing = await browser.get(link)
        assert f"Signed in as <strong>{person.email}</strong>" in landing.text
        started = await browser.post(f"{link}/start")
        assert started.status_code == 303, started.text
        draft = started.headers["location"]
        await browser.get(draft)
        pasted = await browser.post(f"{draft}/servers/{SERVER}/token", {"token": person.credential})
        assert pasted.status_code == 303, pasted.text
        await browser.get(f"{draft}/review")
        approved = await browser.post(f"{draft}/approve")
        assert approved.status_code == 200, approved.text
        found = TOKEN_ON_PAGE.search(approved.text)
        assert found is not None, "the token page shows no token"
        return found.group(1)


async def ask(agent: RunningAgent, person: Person) -> httpx2.Response:
    return await agent.http.post("/ask", json={"person": person.email, "question": "Who am I?"})


def _about(person: Person, *types: str) -> Callable[[list[Event]], bool]:
    def done(events: list[Event]) -> bool:
        got = {e.type for e in events if e.member is not None and e.member.email == person.email}
        return set(types) <= got

    return done


def _host_event(kind: str, count: int = 1) -> Callable[[list[Event]], bool]:
    return lambda events: sum(e.type == kind for e in events) >= count


async def test_a_member_enrolls_and_the_agent_calls_as_them_until_the_host_is_disabled(world: World) -> None:
    inbox = Inbox()
    async with running_agent(world, inbox) as agent:
        # Before enrolling, the agent has nobody to call as, and says whom to send where.
        before = await ask(agent, ADA)
        assert before.status_code == 404
        assert before.json()["error"] == "not_enrolled"
        assert before.json()["connect_link"] == world.link_url

        token = await enroll(world, ADA)
        await inbox.wait_for("Ada's connection", _about(ADA, "connection.created"))
        created = next(e for e in inbox.events if e.type == "connection.created")
        assert created.token is None and created.claim_code is not None  # a claim code, not the token, travelled
        enrollments = await agent.token_map.enrollments(ADA.email)
        assert [(e.status, e.gateway) for e in enrollments] == [("active", GATEWAY)]
        assert (await agent.token_map.credential(ADA.email)).token == token  # redeemed: the token Ada was shown

        answered = await ask(agent, ADA)
        assert answered.status_code == 200, answered.text
        assert answered.json() == {"person": ADA.email, "tool": TOOL, "answer": ADA.credential}
        # The upstream saw Ada's own credential, never the agent's Bastion token.
        assert world.recorder.tool_calls[-1].authorization == ADA.credential
        assert not any("bst_" in str(h) for h in world.recorder.other_headers)

        audit = await _ok(await world.admin.get("/audit/events", params={"method": "tools/call", "name": TOOL}))
        assert [(e["actor"], e["member_id"], e["outcome"]) for e in audit["items"]] == [
            (ADA.email, created.member.id if created.member else None, "ok")
        ]

        # The admin disables the host: the next call fails clearly, and Ada stays in the map.
        await _ok(await world.admin.post(f"/hosts/{HOST}/disable"))
        await inbox.wait_for("host.disabled", _host_event("host.disabled"))
        refused = await ask(agent, ADA)
        assert refused.status_code == 403
        assert refused.json()["reason"] == "host_disabled"
        assert "this agent (its host) is disabled" in refused.json()["detail"]
        kept = await agent.token_map.enrollments(ADA.email)
        assert [(e.status, e.token_id) for e in kept] == [("host_disabled", enrollments[0].token_id)]

        await _ok(await world.admin.post(f"/hosts/{HOST}/enable"))
        await inbox.wait_for("host.enabled", _host_event("host.enabled"))
        again = await ask(agent, ADA)
        assert again.status_code == 200, again.text
        assert again.json()["answer"] == ADA.credential


def refuse_first(kind: str, refused: list[bytes]) -> Callable[[ASGIApp], ASGIApp]:
    """In front of the agent: answer the first delivery of a ``kind`` event with a 409, as a glitch would.

    A 4xx fails that event alone: Bastion goes on with the later ones and retries it afterwards. The refused body is
    kept in ``refused``, so the test can deliver it once more, late, as a retry that lost every race would arrive.
    """

    def wrap(app: ASGIApp) -> ASGIApp:
        async def glitchy(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http" or scope["path"] != "/webhooks/bastion" or refused:
                await app(scope, receive, send)
                return
            messages: list[Message] = []
            while True:
                message = await receive()
                messages.append(message)
                if message["type"] != "http.request" or not message.get("more_body", False):
                    break
            body = b"".join(m.get("body", b"") for m in messages)
            if json.loads(body).get("type") == kind:
                refused.append(body)
                await send({"type": "http.response.start", "status": 409, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return
            pending = iter(messages)

            async def replay() -> Message:
                return next(pending, None) or await receive()

            await app(scope, replay, send)

        return glitchy

    return wrap


async def test_events_produced_while_the_agent_is_down_all_arrive_and_end_in_the_newest_state(world: World) -> None:
    inbox = Inbox()
    async with running_agent(world, inbox) as agent:
        first_token = await enroll(world, ADA)
        await inbox.wait_for("Ada's connection", _about(ADA, "connection.created"))
        assert (await ask(agent, ADA)).status_code == 200
        (before,) = await agent.token_map.enrollments(ADA.email)
    assert before.token_id is not None

    # The agent is down. Meanwhile Ada's connection is disabled, given a new token, loses the old one and is
    # enabled again; Bob enrolls; the host is disabled and enabled.
    connection = f"/connections/{before.connection_id}"
    await _ok(await world.admin.post(f"{connection}/disable"))
    minted = await _ok(await world.admin.post(f"{connection}/tokens", json={}), 201)
    await _ok(await world.admin.post(f"/tokens/{before.token_id}/revoke"))
    await _ok(await world.admin.post(f"{connection}/enable"))
    await enroll(world, BOB)
    await _ok(await world.admin.post(f"/hosts/{HOST}/disable"))
    await _ok(await world.admin.post(f"/hosts/{HOST}/enable"))
    produced = {"connection.disabled", "token.minted", "token.revoked", "connection.enabled"}

    endpoint = f"/hosts/{HOST}/webhooks/{world.endpoint_id}"
    events = f"{endpoint}/events"

    # Back up, behind a glitch that fails the first delivery of connection.disabled: it arrives last.
    refused: list[bytes] = []
    async with running_agent(world, inbox, wrap=refuse_first("connection.disabled", refused)) as agent:
        await inbox.wait_for("Ada's events", _about(ADA, *produced))
        await inbox.wait_for("Bob's connection", _about(BOB, "connection.created"))
        await inbox.wait_for("the host's events", _host_event("host.enabled"))
        # Retries arrive in no fixed order: wait for every event Bastion produced for the endpoint, not just these.
        produced_ids = {
            m["event_id"] for m in (await _ok(await world.admin.get(events, params={"limit": 100})))["items"]
        }
        await inbox.wait_for("every produced event", lambda got: produced_ids <= {e.event_id for e in got})
        assert [json.loads(body)["type"] for body in refused] == ["connection.disabled"]
        applied = len(inbox.events)
        # However Bastion's retries interleaved, an older event arriving after a newer one must not win: deliver the
        # refused connection.disabled once more (a new webhook-id, as a redelivery from elsewhere would carry).
        late_id, now = "msg_late_redelivery", int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": late_id,
            "webhook-timestamp": str(now),
            "webhook-signature": sign(world.config.webhook_secrets[0], late_id, now, refused[0]),
        }
        async with httpx2.AsyncClient() as http:
            late = await http.post(
                f"http://127.0.0.1:{world.agent_port}/webhooks/bastion", content=refused[0], headers=headers
            )
        assert late.status_code == 200, late.text
        assert "connection.enabled" in inbox.types()[:applied]

        # Ada: enabled (the late disable is older than the enable), the new token live, the revoked one gone.
        (after,) = await agent.token_map.enrollments(ADA.email)
        assert (after.status, after.token_id) == ("active", minted["token"]["id"])
        credential = await agent.token_map.credential(ADA.email)
        assert credential.token == minted["secret"] != first_token
        for person in (ADA, BOB):
            answered = await ask(agent, person)
            assert answered.status_code == 200, answered.text
            assert answered.json()["answer"] == person.credential
        assert world.recorder.tool_calls[-2].authorization == ADA.credential

    # None lost: every event Bastion produced for the endpoint was delivered and applied by the agent, once.
    listed = await _ok(await world.admin.get(events, params={"limit": 100}))
    assert {m["status"] for m in listed["items"]} == {"delivered"}
    assert sorted(m["event_id"] for m in listed["items"]) == sorted(e.event_id for e in inbox.events[:applied])
    # Bastion's delivery log shows the outage (refused connections) and the glitch (the 409), then the deliveries.
    log = await _ok(await world.admin.get(f"{endpoint}/deliveries", params={"limit": 100}))
    outcomes = [(d["status_code"], d["outcome"]) for d in log["items"]]
    assert (None, "failed") in outcomes
    assert (409, "failed") in outcomes
    assert outcomes.count((200, "delivered")) == len(listed["items"])
    assert {e.type for e in inbox.events} >= produced | {"connection.created", "host.disabled", "host.enabled"}


def _token_event(kind: str, token_id: str | None) -> Callable[[list[Event]], bool]:
    return lambda events: any(e.type == kind and e.token_id == token_id for e in events)


async def test_a_token_about_to_expire_is_succeeded_and_the_agent_moves_to_the_successor(world: World) -> None:
    inbox = Inbox()
    async with running_agent(world, inbox) as agent:
        await enroll(world, ADA)
        await inbox.wait_for("Ada's connection", _about(ADA, "connection.created"))
        (enrolled,) = await agent.token_map.enrollments(ADA.email)
        # Ada's connection is left with one token, which expires soon; the agent uses it, so it is succeeded.
        expires_at = datetime.now(UTC) + SHORT_LIFETIME
        connection = f"/connections/{enrolled.connection_id}"
        short = await _ok(
            await world.admin.post(f"{connection}/tokens", json={"expires_at": expires_at.isoformat()}), 201
        )
        await _ok(await world.admin.post(f"/tokens/{enrolled.token_id}/revoke"))
        short_id = short["token"]["id"]
        await inbox.wait_for("the short-lived token", _token_event("token.minted", short_id))
        assert (await ask(agent, ADA)).status_code == 200

        await inbox.wait_for("token.expiring", _token_event("token.expiring", short_id))
        expiring = next(e for e in inbox.events if e.type == "token.expiring" and e.token_id == short_id)
        assert expiring.successor_token_id is not None and expiring.expires_at is not None
        assert datetime.fromisoformat(expiring.expires_at) == datetime.fromisoformat(short["token"]["expires_at"])
        await inbox.wait_for("the successor", _token_event("token.minted", expiring.successor_token_id))
        (moved,) = await agent.token_map.enrollments(ADA.email)
        assert (moved.status, moved.token_id) == ("active", expiring.successor_token_id)

        # The agent calls as Ada with the successor, with nobody having copied a token.
        answered = await ask(agent, ADA)
        assert answered.status_code == 200, answered.text
        assert answered.json()["answer"] == ADA.credential
        tokens = (await _ok(await world.admin.get("/tokens", params={"member": ADA.email})))["items"]
        successor = next(t for t in tokens if t["id"] == expiring.successor_token_id)
        assert successor["revoked_at"] is None and successor["last_used_at"] is not None
