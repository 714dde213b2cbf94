"""Map 1 on SQLite and PostgreSQL: events in any order end in the newest state; tokens are sealed at rest."""

from __future__ import annotations

import itertools
import secrets

import anyio
import pytest
import sqlalchemy as sa

from agent_support import event_body
from bastion_agent import (
    Ambiguous,
    Delivered,
    Disabled,
    Enrollment,
    NotEnrolled,
    SealError,
    TokenCipher,
    TokenMap,
    parse_event,
)
from bastion_agent._db import create_engine

pytestmark = pytest.mark.anyio
LINK = "https://bastion.example.com/enroll/bsl_link"


def _lifecycle(connection: str) -> list[bytes]:
    """One connection's history: created with token A, disabled, token B minted, A revoked, enabled again."""
    a, b = f"{connection}-A", f"{connection}-B"
    return [
        event_body("connection.created", version=1, connection_id=connection, token=f"bst_{a}", token_id=a),
        event_body("connection.disabled", version=2, connection_id=connection),
        event_body("token.minted", version=3, connection_id=connection, token=f"bst_{b}", token_id=b),
        event_body("token.revoked", version=4, connection_id=connection, token_id=a),
        event_body("connection.enabled", version=5, connection_id=connection),
    ]


async def _only(token_map: TokenMap, person: str = "ada@example.com") -> Enrollment:
    found = await token_map.enrollments(person)
    assert len(found) == 1, found
    return found[0]


async def test_every_delivery_order_ends_in_the_state_of_the_newest_events(token_map: TokenMap) -> None:
    # Each permutation runs on its own connection (and member), so one database holds them all.
    for number, order in enumerate(itertools.permutations(range(5))):
        connection = f"c{number}"
        events = _lifecycle(connection)
        for index in order:
            await token_map.apply(parse_event(events[index]))
        # Applying the history once more, retries without webhook-ids included, changes nothing.
        for body in events:
            assert not (await token_map.apply(parse_event(body))).changed
        found = [e for e in await token_map.enrollments() if e.connection_id == connection]
        assert [(e.status, e.token_id, e.version) for e in found] == [("active", f"{connection}-B", 5)], order


async def test_a_late_mint_of_a_revoked_token_does_not_bring_it_back(token_map: TokenMap) -> None:
    await token_map.apply(parse_event(event_body("token.revoked", version=2, token_id="tok-A")))
    await token_map.apply(parse_event(event_body("connection.created", version=1, token="bst_tok_A", token_id="tok-A")))
    enrollment = await _only(token_map)
    assert (enrollment.status, enrollment.token_id, enrollment.version) == ("revoked", None, 2)
    with pytest.raises(NotEnrolled) as caught:
        await token_map.credential("ada@example.com", link=LINK)
    assert caught.value.reason == "revoked"
    assert caught.value.link == LINK
    assert LINK in str(caught.value)


async def test_a_disabled_host_or_connection_keeps_the_token_and_re_enabling_restores_it(token_map: TokenMap) -> None:
    await token_map.apply(parse_event(event_body("connection.created", version=1, token="bst_ada", token_id="t1")))
    host_off = event_body("host.disabled", version=7, connection_id=None, member=None)
    await token_map.apply(parse_event(host_off))
    assert (await _only(token_map)).status == "host_disabled"
    with pytest.raises(Disabled) as caught:
        await token_map.credential("ada@example.com")
    assert caught.value.reason == "host_disabled"
    # An older host.enabled (a retry overtaken by the newer disable) changes nothing.
    await token_map.apply(parse_event(event_body("host.enabled", version=6, connection_id=None, member=None)))
    assert (await _only(token_map)).status == "host_disabled"
    await token_map.apply(parse_event(event_body("host.enabled", version=8, connection_id=None, member=None)))
    assert (await token_map.credential("ada@example.com")).token == "bst_ada"

    await token_map.apply(parse_event(event_body("connection.disabled", version=2)))
    with pytest.raises(Disabled) as caught:
        await token_map.credential("ada@example.com")
    assert caught.value.reason == "connection_disabled"
    assert "re-enable" in str(caught.value)
    assert (await _only(token_map)).token_id == "t1"  # still held
    await token_map.apply(parse_event(event_body("connection.enabled", version=3)))
    assert (await token_map.credential("ada@example.com")).token == "bst_ada"


async def test_a_token_about_to_expire_is_followed_by_its_successor_in_either_order(token_map: TokenMap) -> None:
    for connection, successor_first in (("c1", True), ("c2", False)):
        old, new = f"{connection}-old", f"{connection}-new"
        created = event_body("connection.created", version=1, connection_id=connection, token="bst_o", token_id=old)
        successor = event_body("token.minted", version=2, connection_id=connection, token="bst_n", token_id=new)
        expiring = event_body(
            "token.expiring",
            version=3,
            connection_id=connection,
            token_id=old,
            expires_at="2026-02-01T00:00:00Z",
            successor_token_id=new,
        )
        parsed = parse_event(expiring)
        assert (parsed.token_id, parsed.expires_at, parsed.successor_token_id) == (old, "2026-02-01T00:00:00Z", new)
        for body in (created, successor, expiring) if successor_first else (created, expiring, successor):
            await token_map.apply(parse_event(body))
        (found,) = [e for e in await token_map.enrollments() if e.connection_id == connection]
        assert (found.status, found.token_id, found.version) == ("active", new, 3)
    with pytest.raises(ValueError, match=r"token\.expiring event names the token"):
        parse_event(event_body("token.expiring", version=4, expires_at="2026-02-01T00:00:00Z"))


async def test_a_person_not_in_the_map_is_not_enrolled_and_gets_the_link(token_map: TokenMap) -> None:
    with pytest.raises(NotEnrolled) as caught:
        await token_map.credential("grace@example.com", link=LINK)
    assert caught.value.reason == "unknown"
    assert str(caught.value) == f"grace@example.com has not connected this agent; send them the connection link: {LINK}"
    # Enrolled, but the token never arrived (e.g. a claim code that could not be redeemed).
    await token_map.apply(parse_event(event_body("connection.created", version=1)))
    with pytest.raises(NotEnrolled) as caught:
        await token_map.credential("ada@example.com")
    assert caught.value.reason == "no_token"


async def test_people_are_found_by_email_case_insensitively_and_follow_an_email_change(token_map: TokenMap) -> None:
    await token_map.apply(parse_event(event_body("connection.created", version=1, token="bst_ada", token_id="t1")))
    assert (await token_map.credential("Ada@Example.com")).token == "bst_ada"
    renamed = event_body("connection.disabled", version=2, member=("mem-ada", "ada.lovelace@example.com"))
    await token_map.apply(parse_event(renamed))
    # An older event still naming the old email does not undo the change.
    await token_map.apply(parse_event(event_body("token.minted", version=1, token="bst_ada", token_id="t1")))
    assert await token_map.enrollments("ada@example.com") == []
    assert (await _only(token_map, "ada.lovelace@example.com")).member_id == "mem-ada"


async def test_a_person_in_several_gateways_names_one(token_map: TokenMap) -> None:
    for connection, gateway in (("c-sales", "sales"), ("c-support", "support")):
        body = event_body(
            "connection.created",
            version=1,
            connection_id=connection,
            gateway=gateway,
            token=f"bst_{gateway}",
            token_id=f"t-{gateway}",
        )
        await token_map.apply(parse_event(body))
    with pytest.raises(Ambiguous, match="sales, support"):
        await token_map.credential("ada@example.com")
    credential = await token_map.credential("ada@example.com", gateway="support")
    assert credential.token == "bst_support"
    assert credential.enrollment.mcp_url == "http://bastion.test/g/support/mcp"
    assert "bst_support" not in repr(credential)


async def test_webhook_ids_are_applied_once(token_map: TokenMap) -> None:
    body = event_body("connection.created", version=1, token="bst_ada", token_id="t1")
    first = await token_map.apply(parse_event(body), webhook_id="msg_1")
    again = await token_map.apply(parse_event(body), webhook_id="msg_1")
    assert (first.duplicate, first.changed) == (False, True)
    assert (again.duplicate, again.changed) == (True, False)
    assert await token_map.seen("msg_1")
    assert not await token_map.seen("msg_2")


async def test_tokens_are_sealed_at_rest_and_bound_to_their_person(map_url: str, cipher: TokenCipher) -> None:
    async with await TokenMap.open(map_url, cipher) as token_map:
        await token_map.apply(
            parse_event(event_body("connection.created", version=1, token="bst_ada_plaintext", token_id="t-ada"))
        )
        bob = event_body(
            "connection.created",
            version=1,
            connection_id="conn-bob",
            member=("mem-bob", "bob@example.com"),
            token="bst_bob_plaintext",
            token_id="t-bob",
        )
        await token_map.apply(parse_event(bob))
        assert "bst_ada" not in repr(token_map)
    engine = create_engine(map_url)
    async with engine.begin() as conn:
        rows = {r.token_id: r.sealed for r in (await conn.execute(sa.text("SELECT * FROM bastion_agent_tokens"))).all()}
        dumped = b"".join(bytes(v) for v in rows.values())
        assert b"bst_ada_plaintext" not in dumped and b"bst_bob_plaintext" not in dumped
        assert cipher.open(bytes(rows["t-ada"]), token_id="t-ada", connection_id="conn-1", member_id="mem-ada")
        # Someone with database access swaps Bob's ciphertext onto Ada's row: it does not open as Ada's token.
        await conn.execute(
            sa.text("UPDATE bastion_agent_tokens SET sealed = :s WHERE token_id = 't-ada'"), {"s": rows["t-bob"]}
        )
    await engine.dispose()
    async with await TokenMap.open(map_url, cipher) as token_map:
        with pytest.raises(SealError, match="moved to another row"):
            await token_map.credential("ada@example.com")
    # Without the key, the map is useless.
    async with await TokenMap.open(map_url, TokenCipher(secrets.token_bytes(32))) as token_map:
        with pytest.raises(SealError, match="not given"):
            await token_map.credential("bob@example.com")


async def test_a_token_the_gateway_rejects_is_forgotten(token_map: TokenMap) -> None:
    await token_map.apply(parse_event(event_body("connection.created", version=1)), delivered=Delivered("bst_a", "t1"))
    assert (await token_map.credential("ada@example.com")).token == "bst_a"
    await token_map.forget_token("t1")
    with pytest.raises(NotEnrolled) as caught:
        await token_map.credential("ada@example.com")
    assert caught.value.reason == "revoked"
    # A retried delivery of the old mint does not bring it back.
    await token_map.apply(parse_event(event_body("token.minted", version=2, token="bst_a", token_id="t1")))
    assert (await _only(token_map)).status == "revoked"


async def test_only_sqlite_and_postgresql_urls_are_accepted(cipher: TokenCipher) -> None:
    with pytest.raises(ValueError, match="SQLite or PostgreSQL"):
        await TokenMap.open("mysql://localhost/agent", cipher)


async def test_a_copy_of_an_event_raced_in_without_its_token_does_not_lose_the_token(token_map: TokenMap) -> None:
    body = event_body("connection.created", version=1)
    assert not (await token_map.apply(parse_event(body), webhook_id="msg_1")).duplicate
    late = await token_map.apply(parse_event(body), webhook_id="msg_1", delivered=Delivered("bst_claimed", "t1"))
    assert (late.duplicate, late.changed) == (True, True)
    assert (await token_map.credential("ada@example.com")).token == "bst_claimed"


async def test_events_applied_concurrently_end_in_the_newest_state(token_map: TokenMap) -> None:
    # Several deliveries at once (retries overlapping, several workers): row locks and unique ids keep it right.
    events = _lifecycle("conc")
    async with anyio.create_task_group() as tasks:
        for number, body in enumerate(events * 2):
            tasks.start_soon(lambda b=body, n=number: token_map.apply(parse_event(b), webhook_id=f"msg_{n % 5}"))
    (enrollment,) = await token_map.enrollments()
    assert (enrollment.status, enrollment.token_id, enrollment.version) == ("active", "conc-B", 5)
    assert all([await token_map.seen(f"msg_{n}") for n in range(5)])
