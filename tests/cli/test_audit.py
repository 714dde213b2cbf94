"""`bastion audit …`: list and export the log, verify it (exit 1 naming the broken seq), checkpoint it into a file
kept outside the database, and prune old events so that what is left still verifies."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain.audit import AuditEvent, SealedEvent
from bastion.services import workspace
from tests.cli.conftest import Cli, with_store
from tests.services.test_audit_query import add_pending, append_events, make_event, newest_first

E = schema.audit_events
H = schema.audit_head


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables show whole cells and messages stay on one line, as on a wide terminal."""
    monkeypatch.setenv("COLUMNS", "400")


def _seed(db_url: str, key: bytes, *events: AuditEvent) -> list[SealedEvent]:
    return with_store(db_url, lambda store: append_events(store, key, events))


def _workspace_id(db_url: str) -> str:
    async def body(store: Store) -> str:
        return (await workspace.default_workspace(store)).id

    return with_store(db_url, body)


def _execute(db_url: str, *statements: sa.Executable) -> None:
    async def body(store: Store) -> None:
        async with store.transaction() as conn:
            for statement in statements:
                await conn.execute(statement)

    with_store(db_url, body)


def _key(cli_env: dict[str, str]) -> bytes:
    return cli_env["BASTION_AUDIT_KEY"].encode("utf-8")


def test_audit_list_shows_the_newest_events_as_a_table_or_json(cli: Cli, cli_env: dict[str, str], db_url: str) -> None:
    ws = _workspace_id(db_url)
    sealed = _seed(db_url, _key(cli_env), *(make_event(ws, n) for n in range(4)))
    pending = make_event(ws, 9, outcome="pending", name="slow_tool")
    with_store(db_url, lambda store: add_pending(store, pending))

    listed = cli.json("audit", "list", "--kind", "mcp")
    assert [e["id"] for e in listed] == [pending.id, *(s.event.id for s in reversed(sealed))]
    assert listed[0]["seq"] is None and listed[1]["seq"] == sealed[-1].seq
    assert [e["id"] for e in cli.json("audit", "list", "--kind", "mcp", "--limit", "2")] == [
        pending.id,
        sealed[-1].event.id,
    ]
    assert [e["id"] for e in cli.json("audit", "list", "--tool", "tool_2")] == [sealed[2].event.id]
    since = cli.json("audit", "list", "--kind", "mcp", "--since", "2026-03-01T12:01:00Z", "--until", "2026-03-01T12:03")
    assert [e["id"] for e in since] == [sealed[2].event.id, sealed[1].event.id]

    table = cli("audit", "list", "--outcome", "pending").stdout
    assert "slow_tool" in table and "tools/call" in table and "Audit events" in table
    cli("audit", "list", "--since", "yesterday", code=2)
    cli("audit", "list", "--limit", "0", code=2)


def test_audit_export_streams_jsonl_or_csv_to_stdout_or_a_file(
    cli: Cli, cli_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    ws = _workspace_id(db_url)
    sealed = _seed(db_url, _key(cli_env), *(make_event(ws, n) for n in range(3)))

    out = cli("audit", "export", "--format", "jsonl", "--kind", "mcp").stdout
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(x["id"], x["seq"], x["hash"]) for x in lines] == [(s.event.id, s.seq, s.hash) for s in sealed]

    target = tmp_path / "exports" / "audit.csv"
    target.parent.mkdir()
    result = cli("audit", "export", "--format", "csv", "--kind", "mcp", "--server", "github", "-o", str(target))
    assert result.stdout == "" and str(target) in result.stderr
    rows = list(csv.DictReader(io.StringIO(target.read_text(encoding="utf-8"))))
    assert [r["id"] for r in rows] == [s.event.id for s in sealed]
    assert json.loads(rows[0]["detail"]) == {"n": 0, "note": "ünïcode"}
    assert list(target.parent.iterdir()) == [target], "the partial file was left behind"
    cli("audit", "export", "--format", "xml", code=2)


def test_audit_verify_says_intact_or_names_the_broken_seq_with_exit_code_1(
    cli: Cli, cli_env: dict[str, str], db_url: str
) -> None:
    assert cli("audit", "verify").stdout.strip() == "audit log intact: 0 events"
    ws = _workspace_id(db_url)
    sealed = _seed(db_url, _key(cli_env), *(make_event(ws, n) for n in range(5)))
    first, last = 1, sealed[-1].seq

    assert cli("audit", "verify").stdout.strip() == f"audit log intact: {last} events, seq {first}..{last}"
    verdict = cli.json("audit", "verify")
    assert (verdict["ok"], verdict["checked"], verdict["broken"]) == (True, last, None)

    _execute(db_url, E.update().where(E.c.seq == sealed[2].seq).values(name="harmless_tool"))
    result = cli("audit", "verify", code=1)
    assert result.stdout.startswith(f"audit log BROKEN at seq {sealed[2].seq}: altered: ")
    broken = json.loads(cli("audit", "verify", "--json", code=1).stdout)
    assert (broken["ok"], broken["broken"]["kind"], broken["broken"]["seq"]) == (False, "altered", sealed[2].seq)
    assert broken["checked"] == sealed[2].seq - 1

    _execute(db_url, E.delete().where(E.c.seq == sealed[2].seq))
    assert cli("audit", "verify", code=1).stdout.startswith(f"audit log BROKEN at seq {sealed[2].seq}: deleted: ")


def test_a_checkpoint_file_lets_verify_catch_a_truncated_log(
    cli: Cli, cli_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    cli("audit", "checkpoint", code=3)  # nothing to checkpoint yet
    ws = _workspace_id(db_url)
    key = _key(cli_env)
    kept = _seed(db_url, key, *(make_event(ws, n) for n in range(3)))
    file = tmp_path / "checkpoints.jsonl"
    printed = json.loads(cli("audit", "checkpoint", "--append", str(file)).stdout)
    assert (printed["seq"], printed["hash"]) == (kept[-1].seq, kept[-1].hash)
    head_then = with_store(db_url, _head_row)
    lost = _seed(db_url, key, *(make_event(ws, n) for n in range(3, 6)))
    second = cli("audit", "checkpoint", "--append", str(file))
    assert f"seq {lost[-1].seq}" in second.stderr
    assert [json.loads(line)["seq"] for line in file.read_text(encoding="utf-8").splitlines()] == [
        kept[-1].seq,
        lost[-1].seq,
    ]
    assert cli("audit", "verify", "--checkpoints", str(file)).stdout.startswith("audit log intact")

    # The newest events, their checkpoints and the head are rolled back to an earlier, validly MAC'd state.
    _execute(
        db_url,
        E.delete().where(E.c.seq > kept[-1].seq),
        schema.audit_checkpoints.delete().where(schema.audit_checkpoints.c.seq > kept[-1].seq),
        H.update().values(seq=head_then[0], hash=head_then[1], mac=head_then[2]),
    )
    assert cli("audit", "verify").stdout.startswith("audit log intact")
    result = cli("audit", "verify", "--checkpoints", str(file), code=1)
    assert result.stdout.startswith(f"audit log BROKEN at seq {lost[0].seq}: truncated: ")

    file.write_text("not a checkpoint\n", encoding="utf-8")
    assert "checkpoints.jsonl:1" in cli("audit", "verify", "--checkpoints", str(file), code=2).stderr


async def _head_row(store: Store) -> tuple[int, str, str]:
    async with store.transaction() as conn:
        row = (await conn.execute(sa.select(H.c.seq, H.c.hash, H.c.mac))).one()
    return int(row.seq), str(row.hash), str(row.mac)


def test_audit_prune_deletes_old_events_and_the_rest_still_verifies(
    cli: Cli, cli_env: dict[str, str], db_url: str
) -> None:
    ws = _workspace_id(db_url)
    now = datetime.now(UTC)
    old = [make_event(ws, n, occurred_at=now - timedelta(days=120 + n)) for n in range(3)]
    new = [make_event(ws, n, occurred_at=now - timedelta(days=2)) for n in range(2)]
    sealed = _seed(db_url, _key(cli_env), *old, *new)

    assert cli.json("audit", "prune", "--older-than", "90d")["pruned"] == len(old)
    verdict = cli.json("audit", "verify")
    assert (verdict["ok"], verdict["first_seq"], verdict["last_seq"]) == (True, sealed[len(old)].seq, sealed[-1].seq)
    assert "nothing to prune" in cli("audit", "prune", "--before", (now - timedelta(days=30)).date().isoformat()).stderr
    assert [e["id"] for e in cli.json("audit", "list", "--kind", "mcp")] == newest_first(new)

    cli("audit", "prune", code=2)
    cli("audit", "prune", "--before", "2026-01-01", "--older-than", "90d", code=2)
    cli("audit", "prune", "--older-than", "ninety days", code=2)
    cli("audit", "prune", "--before", "soon", code=2)

    _execute(db_url, E.update().where(E.c.seq == sealed[-1].seq).values(outcome="error"))
    refused = cli("audit", "prune", "--older-than", "1d", code=4)
    assert f"broken at seq {sealed[-1].seq}" in refused.stderr
