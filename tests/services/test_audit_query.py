"""Reading the audit log: pages and filters per workspace, streamed exports, verification that names the first
tampered event, checkpoints (also kept in files outside the database) and pruning that keeps the rest verifiable."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.db import schema
from bastion.db.audit import event_of
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.audit import (
    GENESIS,
    AuditEvent,
    Checkpoint,
    SealedEvent,
    TamperKind,
    checkpoint_valid,
    derive_key,
    head_mac,
    seal,
)
from bastion.domain.capabilities import ALL_CAPABILITIES, Capability
from bastion.domain.ids import new_id
from bastion.domain.specs import HostSpec, MemberSpec
from bastion.errors import Conflict, Forbidden, NotFound, ValidationFailed
from bastion.services import audit_query, hosts, members
from bastion.services.audit_query import AuditFilter
from bastion.settings import Settings

pytestmark = pytest.mark.anyio

E = schema.audit_events
H = schema.audit_head
C = schema.audit_checkpoints
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
OTHER_WORKSPACE = "0196f1c2-0000-7000-8000-0000000000ff"


# --- helpers the web and CLI tests share ----------------------------------------------------------------------------


def audit_key_of(settings: Settings) -> bytes:
    assert settings.audit_key is not None
    return settings.audit_key.get_secret_value().encode("utf-8")


def make_event(workspace: str, n: int = 0, **fields: Any) -> AuditEvent:
    """An MCP tool call event ``n`` minutes after T0; ``fields`` override any column."""
    values: dict[str, Any] = {
        "id": new_id(),
        "occurred_at": T0 + timedelta(minutes=n),
        "kind": "mcp",
        "method": "tools/call",
        "outcome": "ok",
        "workspace": workspace,
        "correlation_id": f"req-{n}",
        "actor": "alice@example.com",
        "gateway": "sales",
        "server": "github",
        "name": f"tool_{n}",
        "decision": "allow",
        "upstream_status": "200",
        "latency_us": 1000 + n,
        "args_hmac": "ab" * 32,
        "args_preview": '{"q":"hello"}',
        "detail": {"n": n, "note": "ünïcode"},
    }
    values.update(fields)
    return AuditEvent(**values)


async def _head(conn: AsyncConnection) -> tuple[int, str]:
    row = (await conn.execute(sa.select(H.c.seq, H.c.hash).where(H.c.id == 1))).first()
    return (int(row.seq), str(row.hash)) if row is not None else (0, GENESIS)


async def set_head(conn: AsyncConnection, chain_key: bytes, seq: int, hash_: str, mac: str | None = None) -> None:
    values = {"seq": seq, "hash": hash_, "mac": mac or head_mac(chain_key, seq, hash_), "updated_at": datetime.now(UTC)}
    if (await conn.execute(H.update().where(H.c.id == 1).values(**values))).rowcount == 0:
        await conn.execute(H.insert().values(id=1, **values))


async def append_events(store: Store, audit_key: bytes, events: Sequence[AuditEvent]) -> list[SealedEvent]:
    """Chain ``events`` after the current head, insert them as sealed rows and move the head (as the writer does)."""
    chain_key = derive_key(audit_key, "chain")
    async with store.transaction() as conn:
        prev_seq, prev_hash = await _head(conn)
        sealed = seal(chain_key, prev_seq, prev_hash, events)
        await conn.execute(
            sa.insert(E), [{**asdict(s.event), "seq": s.seq, "prev_hash": s.prev_hash, "hash": s.hash} for s in sealed]
        )
        await set_head(conn, chain_key, sealed[-1].seq, sealed[-1].hash)
    return sealed


async def add_pending(store: Store, event: AuditEvent) -> None:
    async with store.transaction() as conn:
        await conn.execute(sa.insert(E).values(**asdict(event), seq=None, prev_hash=None, hash=None))


async def execute(store: Store, *statements: sa.Executable) -> None:
    async with store.transaction() as conn:
        for statement in statements:
            await conn.execute(statement)


def newest_first(events: Sequence[AuditEvent]) -> list[str]:
    return [e.id for e in sorted(events, key=lambda e: (e.occurred_at, e.id), reverse=True)]


# --- fixtures -------------------------------------------------------------------------------------------------------


@pytest.fixture
def key(settings: Settings) -> bytes:
    return audit_key_of(settings)


async def _all_pages(store: Store, actor: Actor, flt: AuditFilter, limit: int) -> list[str]:
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(100):
        page = await audit_query.list_page(store, actor, flt, cursor, limit)
        assert len(page.items) <= limit
        seen += [r.event.id for r in page.items]
        cursor = page.next_cursor
        if cursor is None:
            return seen
    raise AssertionError("pagination never ended")


async def _exported(store: Store, actor: Actor, flt: AuditFilter, fmt: audit_query.ExportFormat) -> str:
    return "".join([chunk async for chunk in audit_query.export(store, actor, flt, fmt)])


# --- listing --------------------------------------------------------------------------------------------------------


async def test_pages_list_the_workspace_events_newest_first_each_once_with_pending_ones(
    store: Store, operator: Actor, key: bytes
) -> None:
    ws = operator.workspace_id
    events = [make_event(ws, n) for n in (1, 2, 3, 5, 8)]
    events.append(make_event(ws, 5))  # the same instant as another: the id breaks the tie
    await append_events(store, key, events)
    pending = make_event(ws, 9, outcome="pending", upstream_status=None, latency_us=None)
    await add_pending(store, pending)
    mine = {e.id for e in [*events, pending]}

    seen = await _all_pages(store, operator, AuditFilter(), limit=2)
    assert len(seen) == len(set(seen)), "an event appeared on two pages"
    assert [i for i in seen if i in mine] == newest_first([*events, pending])

    first = await audit_query.list_page(store, operator, AuditFilter(kind="mcp"), None, 1)
    assert first.items[0].pending and first.items[0].seq is None and first.items[0].hash is None
    assert first.items[0].event == pending


async def test_a_cursor_or_limit_the_api_did_not_hand_out_is_refused(store: Store, operator: Actor) -> None:
    for cursor in ("not-a-cursor!", "YWJj", "MjAyNi0wMy0wMXx4"):
        with pytest.raises(ValidationFailed) as caught:
            await audit_query.list_page(store, operator, AuditFilter(), cursor, 10)
        assert caught.value.field == "cursor"
    for limit in (0, 201):
        with pytest.raises(ValidationFailed) as caught:
            await audit_query.list_page(store, operator, AuditFilter(), None, limit)
        assert caught.value.field == "limit"


async def test_each_filter_keeps_only_the_matching_events(store: Store, operator: Actor, key: bytes) -> None:
    ws = operator.workspace_id
    alice = await members.create(store, operator, MemberSpec("alice@example.com", "Alice"))
    host = await hosts.create(store, operator, HostSpec("sales-agent"))
    a = make_event(ws, 0, member_id=alice.id, actor=None, host_id=host.id, name="search")
    by_label = make_event(ws, 30, actor="alice@example.com", host_id=None)
    b = make_event(
        ws,
        60,
        member_id=new_id(),
        actor="bob@example.com",
        host_id="0196f1c2-0000-7000-8000-00000000dead",  # a host deleted since
        gateway="support",
        server="jira",
        name="create_issue",
        outcome="denied",
        decision="deny",
    )
    admin = make_event(
        ws, 120, kind="admin", method="host.disabled", actor="local operator", gateway=None, server=None, name=None
    )
    await append_events(store, key, [a, by_label, b, admin])
    pending = make_event(ws, 180, member_id=alice.id, actor=None, host_id=host.id, outcome="pending")
    await add_pending(store, pending)
    mine = {e.id for e in (a, by_label, b, admin, pending)}

    async def ids(**fields: Any) -> set[str]:
        page = await audit_query.list_page(store, operator, AuditFilter(**fields), None, 200)
        return {r.event.id for r in page.items} & mine

    assert await ids() == mine
    assert await ids(member="alice@example.com") == {a.id, by_label.id, pending.id}
    assert await ids(member=alice.id) == {a.id, pending.id}
    assert await ids(member="bob@example.com") == {b.id}
    assert await ids(host="sales-agent") == {a.id, pending.id}
    assert await ids(host=host.id) == {a.id, pending.id}
    assert await ids(host="0196f1c2-0000-7000-8000-00000000dead") == {b.id}
    assert await ids(host="ghost") == set()
    assert await ids(gateway="support") == {b.id}
    assert await ids(server="github") == {a.id, by_label.id, pending.id}
    assert await ids(name="create_issue") == {b.id}
    assert await ids(outcome="denied") == {b.id}
    assert await ids(outcome="pending") == {pending.id}
    assert await ids(method="host.disabled") == {admin.id}
    assert await ids(kind="admin") == {admin.id}
    assert await ids(kind="mcp", outcome="ok", server="github") == {a.id, by_label.id}
    assert await ids(since=T0 + timedelta(minutes=60)) == {b.id, admin.id, pending.id}
    assert await ids(until=T0 + timedelta(minutes=60)) == {a.id, by_label.id}
    naive = (T0 + timedelta(minutes=30)).replace(tzinfo=None)  # read as UTC
    assert await ids(since=naive, until=T0 + timedelta(minutes=120)) == {by_label.id, b.id}
    assert await ids(member="alice@example.com", since=T0 + timedelta(minutes=1)) == {by_label.id, pending.id}


async def test_events_of_another_workspace_are_never_listed_read_or_exported(
    store: Store, operator: Actor, key: bytes
) -> None:
    own = make_event(operator.workspace_id, 1)
    foreign = make_event(OTHER_WORKSPACE, 2)
    await append_events(store, key, [own, foreign])

    listed = {r.event.id for r in (await audit_query.list_page(store, operator, AuditFilter(), None, 200)).items}
    assert own.id in listed and foreign.id not in listed
    assert (await audit_query.get(store, operator, own.id)).event == own
    with pytest.raises(NotFound):
        await audit_query.get(store, operator, foreign.id)
    exported = await _exported(store, operator, AuditFilter(), "jsonl")
    assert own.id in exported and foreign.id not in exported
    other = Actor.local_operator(OTHER_WORKSPACE)  # type: ignore[arg-type]
    assert [r.event.id for r in (await audit_query.list_page(store, other, AuditFilter(), None, 200)).items] == [
        foreign.id
    ]


async def test_reading_or_exporting_the_log_needs_the_audit_capability(
    store: Store, operator: Actor, key: bytes
) -> None:
    (sealed,) = await append_events(store, key, [make_event(operator.workspace_id)])
    everything_else = ALL_CAPABILITIES - {Capability.AUDIT_VIEW_EXPORT}
    actor = Actor(operator.workspace_id, None, everything_else, "no audit")
    with pytest.raises(Forbidden):
        await audit_query.list_page(store, actor, AuditFilter(), None, None)
    with pytest.raises(Forbidden):
        await audit_query.get(store, actor, sealed.event.id)
    for fmt in ("jsonl", "csv"):
        with pytest.raises(Forbidden):
            await anext(audit_query.export(store, actor, AuditFilter(), fmt))  # type: ignore[arg-type]


# --- export ---------------------------------------------------------------------------------------------------------


async def test_jsonl_export_streams_every_event_in_chain_order_with_its_chain_fields(
    store: Store, operator: Actor, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_query, "BATCH_ROWS", 2)
    ws = operator.workspace_id
    # Sealed in an order other than their times: the export follows the chain.
    sealed = await append_events(store, key, [make_event(ws, n) for n in (5, 1, 4, 2, 3)])
    pending = [make_event(ws, 7, outcome="pending"), make_event(ws, 6, outcome="pending")]
    for event in pending:
        await add_pending(store, event)

    chunks = [chunk async for chunk in audit_query.export(store, operator, AuditFilter(kind="mcp"), "jsonl")]
    assert len(chunks) > 2, "the export came in one piece, not in batches"
    lines = [json.loads(line) for line in "".join(chunks).splitlines()]
    assert [line["id"] for line in lines] == [s.event.id for s in sealed] + sorted(e.id for e in pending)
    first = lines[0]
    assert (first["seq"], first["prev_hash"], first["hash"]) == (sealed[0].seq, sealed[0].prev_hash, sealed[0].hash)
    assert first["detail"] == {"n": 5, "note": "ünïcode"}
    assert datetime.fromisoformat(first["occurred_at"]) == sealed[0].event.occurred_at
    assert list(first) == list(audit_query.EXPORT_COLUMNS)
    assert (lines[-1]["seq"], lines[-1]["hash"], lines[-1]["outcome"]) == (None, None, "pending")

    only = await _exported(store, operator, AuditFilter(kind="mcp", name="tool_4"), "jsonl")
    assert [json.loads(line)["id"] for line in only.splitlines()] == [sealed[2].event.id]
    assert await _exported(store, operator, AuditFilter(name="nothing"), "jsonl") == ""


async def test_csv_export_has_a_header_json_detail_and_defused_formulas(
    store: Store, operator: Actor, key: bytes
) -> None:
    ws = operator.workspace_id
    plain = make_event(ws, 1)
    hostile = make_event(ws, 2, name='=HYPERLINK("http://evil")', args_preview="+1, line\nbreak", detail=None)
    sealed = await append_events(store, key, [plain, hostile])

    text = await _exported(store, operator, AuditFilter(kind="mcp"), "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert text.splitlines()[0].split(",") == list(audit_query.EXPORT_COLUMNS)
    by_id = {r["id"]: r for r in rows}
    first = by_id[plain.id]
    assert (first["seq"], first["hash"], first["outcome"]) == (str(sealed[0].seq), sealed[0].hash, "ok")
    assert json.loads(first["detail"]) == {"n": 1, "note": "ünïcode"}
    second = by_id[hostile.id]
    assert second["name"] == '\'=HYPERLINK("http://evil")'
    assert second["args_preview"] == "'+1, line\nbreak"
    assert second["detail"] == ""
    assert await _exported(store, operator, AuditFilter(name="nothing"), "csv") == text.splitlines(True)[0]


# --- verification ---------------------------------------------------------------------------------------------------


async def test_an_untouched_log_verifies_in_batches(
    store: Store, operator: Actor, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = await audit_query.verify(store, key)
    assert empty.ok and empty.checked == 0
    monkeypatch.setattr(audit_query, "BATCH_ROWS", 2)
    ws = operator.workspace_id
    sealed = await append_events(store, key, [make_event(ws, n) for n in range(5)])
    sealed += await append_events(store, key, [make_event(OTHER_WORKSPACE, 10)])
    await add_pending(store, make_event(ws, 20, outcome="pending"))

    verdict = await audit_query.verify(store, key)
    assert verdict.ok, verdict.broken
    assert (verdict.checked, verdict.first_seq, verdict.last_seq) == (sealed[-1].seq, 1, sealed[-1].seq)

    wrong = await audit_query.verify(store, b"another audit key, not the one that sealed")
    assert not wrong.ok


async def _alter(conn: AsyncConnection, seqs: list[int]) -> None:
    await conn.execute(E.update().where(E.c.seq == seqs[2]).values(outcome="ok", reason=None))


async def _delete(conn: AsyncConnection, seqs: list[int]) -> None:
    await conn.execute(E.delete().where(E.c.seq == seqs[2]))


async def _swap(conn: AsyncConnection, seqs: list[int]) -> None:
    await conn.execute(E.update().where(E.c.seq == seqs[2]).values(seq=-1))
    await conn.execute(E.update().where(E.c.seq == seqs[3]).values(seq=seqs[2]))
    await conn.execute(E.update().where(E.c.seq == -1).values(seq=seqs[3]))


async def _truncate(conn: AsyncConnection, seqs: list[int]) -> None:
    await conn.execute(E.delete().where(E.c.seq >= seqs[4]))


async def _append_forged(conn: AsyncConnection, seqs: list[int]) -> None:
    forged = make_event(OTHER_WORKSPACE, 99)
    await conn.execute(E.insert().values(**asdict(forged), seq=seqs[-1] + 1, prev_hash="0" * 64, hash="1" * 64))


async def _forge_detail(conn: AsyncConnection, seqs: list[int]) -> None:
    await conn.execute(E.update().where(E.c.seq == seqs[1]).values(detail={"n": 1, "note": "rewritten"}))


async def _drop_head(conn: AsyncConnection, seqs: list[int]) -> None:
    await conn.execute(H.delete())


async def _forge_head(conn: AsyncConnection, seqs: list[int]) -> None:
    await conn.execute(H.update().values(seq=seqs[3]))


Tamper = Callable[[AsyncConnection, list[int]], Awaitable[None]]


@pytest.mark.parametrize(
    ("tamper", "kind", "at"),
    [
        (_alter, TamperKind.ALTERED, 2),
        (_forge_detail, TamperKind.ALTERED, 1),
        (_delete, TamperKind.DELETED, 2),
        (_swap, TamperKind.REORDERED, 2),
        (_truncate, TamperKind.TRUNCATED, 4),
        (_append_forged, TamperKind.INSERTED, 6),
        (_drop_head, TamperKind.DELETED, 5),
        (_forge_head, TamperKind.ALTERED, 3),
    ],
    ids=["update", "update-json", "delete", "swap", "truncate", "insert-past-head", "head-deleted", "head-forged"],
)
async def test_verify_names_the_first_tampered_event(
    store: Store, operator: Actor, key: bytes, tamper: Tamper, kind: TamperKind, at: int
) -> None:
    ws = operator.workspace_id
    sealed = await append_events(store, key, [make_event(ws, n, outcome="error", reason="boom") for n in range(6)])
    seqs = [s.seq for s in sealed]
    async with store.transaction() as conn:
        await tamper(conn, seqs)

    verdict = await audit_query.verify(store, key)
    assert verdict.broken is not None, "the tampering went unnoticed"
    assert (verdict.broken.kind, verdict.broken.seq) == (kind, seqs[at] if at < len(seqs) else seqs[-1] + 1)
    assert verdict.broken.detail


# --- checkpoints ----------------------------------------------------------------------------------------------------


async def test_a_checkpoint_signs_the_chain_head_once(store: Store, operator: Actor, key: bytes) -> None:
    assert await audit_query.make_checkpoint(store, key) is None
    sealed = await append_events(store, key, [make_event(operator.workspace_id, n) for n in range(3)])

    made = await audit_query.make_checkpoint(store, key)
    assert made is not None
    assert (made.seq, made.hash) == (sealed[-1].seq, sealed[-1].hash)
    assert checkpoint_valid(derive_key(key, "checkpoint"), made)
    assert await audit_query.make_checkpoint(store, key) == made
    async with store.transaction() as conn:
        assert (await conn.execute(sa.select(sa.func.count()).select_from(C).where(C.c.seq == made.seq))).scalar() == 1


async def test_a_forged_head_is_never_signed(store: Store, operator: Actor, key: bytes) -> None:
    sealed = await append_events(store, key, [make_event(operator.workspace_id, n) for n in range(3)])
    await execute(store, H.update().values(seq=sealed[1].seq, hash=sealed[1].hash))
    with pytest.raises(Conflict):
        await audit_query.make_checkpoint(store, key)


async def test_a_checkpoint_file_outlives_a_truncated_log_and_a_rolled_back_head(
    store: Store, operator: Actor, key: bytes, tmp_path: Path
) -> None:
    path = tmp_path / "checkpoints.jsonl"
    ws = operator.workspace_id
    early = await append_events(store, key, [make_event(ws, n) for n in range(3)])
    first = await audit_query.make_checkpoint(store, key)
    assert first is not None
    audit_query.append_checkpoint_file(path, first)
    async with store.transaction() as conn:
        old_head = (await conn.execute(sa.select(H.c.seq, H.c.hash, H.c.mac))).one()
    later = await append_events(store, key, [make_event(ws, n) for n in range(3, 6)])
    second = await audit_query.make_checkpoint(store, key)
    assert second is not None
    audit_query.append_checkpoint_file(path, second)
    assert audit_query.load_checkpoints_file(path) == [first, second]
    assert len(path.read_text(encoding="utf-8").splitlines()) == 2

    # Whoever holds the database (not the key) deletes the newest events, the checkpoints that name them, and puts
    # back a head record they saw earlier: the database alone then looks intact.
    await execute(
        store,
        E.delete().where(E.c.seq > early[-1].seq),
        C.delete().where(C.c.seq > early[-1].seq),
        H.update().values(seq=old_head.seq, hash=old_head.hash, mac=old_head.mac),
    )
    assert (await audit_query.verify(store, key)).ok

    verdict = await audit_query.verify(store, key, audit_query.load_checkpoints_file(path))
    assert verdict.broken is not None
    assert (verdict.broken.kind, verdict.broken.seq) == (TamperKind.TRUNCATED, later[0].seq)


async def test_a_forged_checkpoint_in_a_file_is_reported(store: Store, operator: Actor, key: bytes) -> None:
    await append_events(store, key, [make_event(operator.workspace_id, n) for n in range(2)])
    made = await audit_query.make_checkpoint(store, key)
    assert made is not None
    forged = replace(made, hash="f" * 64)
    verdict = await audit_query.verify(store, key, [forged])
    assert verdict.broken is not None and verdict.broken.kind is TamperKind.BAD_CHECKPOINT


def test_a_checkpoint_file_line_that_is_not_a_checkpoint_is_refused_by_number(tmp_path: Path) -> None:
    good = Checkpoint(seq=3, hash="a" * 64, created_at=T0, signature="b" * 64)
    path = tmp_path / "checkpoints.jsonl"
    path.write_text(json.dumps(good.to_json()), encoding="utf-8")  # no newline at the end
    audit_query.append_checkpoint_file(path, replace(good, seq=4))
    assert [c.seq for c in audit_query.load_checkpoints_file(path)] == [3, 4]

    for bad, why in (("{not json", "not JSON"), ('{"seq": 1}', "exactly seq, hash")):
        path.write_text(json.dumps(good.to_json()) + "\n\n" + bad + "\n", encoding="utf-8")
        with pytest.raises(ValidationFailed) as caught:
            audit_query.load_checkpoints_file(path)
        assert f"{path}:3" in caught.value.detail and why in caught.value.detail
    with pytest.raises(ValidationFailed, match="cannot read"):
        audit_query.load_checkpoints_file(tmp_path / "missing.jsonl")
    with pytest.raises(ValidationFailed, match="cannot write"):
        audit_query.append_checkpoint_file(tmp_path / "no-such-dir" / "c.jsonl", good)


# --- pruning --------------------------------------------------------------------------------------------------------


async def test_pruning_old_events_keeps_the_rest_verifiable_from_a_checkpoint(
    store: Store, operator: Actor, key: bytes
) -> None:
    ws = operator.workspace_id
    now = datetime.now(UTC)
    old = [make_event(ws, n, occurred_at=now - timedelta(days=200 - n)) for n in range(4)]
    # Sealed after an old one but itself recent: pruning stops at the first event it must keep.
    recent = [make_event(ws, n, occurred_at=now - timedelta(days=1)) for n in range(2)]
    straggler = make_event(ws, 9, occurred_at=now - timedelta(days=150))
    sealed = await append_events(store, key, [*old, recent[0], straggler, recent[1]])
    stuck = make_event(ws, 10, occurred_at=now - timedelta(days=300), outcome="pending")
    await add_pending(store, stuck)

    assert await audit_query.prune(store, key, now - timedelta(days=90)) == len(old)

    async with store.transaction() as conn:
        left = (await conn.execute(sa.select(E.c.id).order_by(E.c.seq))).scalars().all()
        checkpoints = (await conn.execute(sa.select(C.c.seq))).scalars().all()
    assert set(left) == {recent[0].id, straggler.id, recent[1].id, stuck.id}
    assert sealed[len(old) - 1].seq in checkpoints
    verdict = await audit_query.verify(store, key)
    assert verdict.ok, verdict.broken
    assert (verdict.first_seq, verdict.last_seq) == (sealed[len(old)].seq, sealed[-1].seq)
    assert await audit_query.prune(store, key, now - timedelta(days=90)) == 0

    # The chain goes on after a prune, and verification still starts from the checkpoint.
    await append_events(store, key, [make_event(ws, 11, occurred_at=now)])
    assert (await audit_query.verify(store, key)).ok


async def test_pruning_every_event_leaves_a_log_that_still_verifies_and_grows(
    store: Store, operator: Actor, key: bytes
) -> None:
    ws = operator.workspace_id
    assert await audit_query.prune(store, key, datetime.now(UTC)) == 0
    sealed = await append_events(store, key, [make_event(ws, n) for n in range(3)])
    assert await audit_query.prune(store, key, T0 + timedelta(days=1)) == len(sealed)
    verdict = await audit_query.verify(store, key)
    assert verdict.ok and verdict.checked == 0, verdict
    await append_events(store, key, [make_event(ws, 5)])
    assert (await audit_query.verify(store, key)).ok


async def test_a_tampered_log_is_never_pruned(store: Store, operator: Actor, key: bytes) -> None:
    sealed = await append_events(store, key, [make_event(operator.workspace_id, n) for n in range(3)])
    await execute(store, E.update().where(E.c.seq == sealed[0].seq).values(actor="mallory@example.com"))
    with pytest.raises(Conflict, match=f"broken at seq {sealed[0].seq}"):
        await audit_query.prune(store, key, T0 + timedelta(days=1))
    async with store.transaction() as conn:
        assert (await conn.execute(sa.select(sa.func.count()).select_from(E))).scalar() == len(sealed)


async def test_row_conversion_leaves_pending_rows_out_of_the_chain(store: Store, operator: Actor, key: bytes) -> None:
    (sealed,) = await append_events(store, key, [make_event(operator.workspace_id, 1)])
    pending = make_event(operator.workspace_id, 2, outcome="pending")
    await add_pending(store, pending)
    async with store.transaction() as conn:
        rows = {r.id: r for r in (await conn.execute(sa.select(E))).all()}
    assert audit_query.row_to_sealed(rows[sealed.event.id]) == sealed
    assert audit_query.row_to_sealed(rows[pending.id]) is None
    assert event_of(rows[pending.id]) == pending
