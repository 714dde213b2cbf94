"""`bastion audit …`: read, export and verify the tamper-evident audit log; checkpoint it and prune old events."""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Final

import anyio
import typer

from bastion.cli.context import CliContext, all_pages, guarded, run_with
from bastion.cli.options import JsonFlag
from bastion.cli.output import EXIT_ERROR, emit_json, emit_many, success
from bastion.db.crud import MAX_PAGE_SIZE
from bastion.domain.audit import Checkpoint, Verdict
from bastion.errors import ConfigError, NotFound, ValidationFailed
from bastion.services import audit_query, hosts
from bastion.services.audit_query import AuditFilter, AuditRecord, ExportFormat
from bastion.settings import Settings
from bastion.web.api.schemas_audit import AuditEventOut

audit_app = typer.Typer(no_args_is_help=True, add_completion=False)

COLUMNS: Final = ("occurred_at", "seq", "kind", "method", "outcome", "actor", "host", "gateway", "server", "name")
_AGE: Final = re.compile(r"(\d{1,6})([hdw])")
_AGE_UNITS: Final = {"h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}


class Format(StrEnum):
    JSONL = "jsonl"
    CSV = "csv"


Member = Annotated[str | None, typer.Option(help="Only this member's events (email or id, or the recorded actor).")]
Host = Annotated[str | None, typer.Option(help="Only events through this host (name or id).")]
Gateway = Annotated[str | None, typer.Option(help="Only events of this gateway (slug).")]
Server = Annotated[str | None, typer.Option(help="Only events for this upstream server.")]
Name = Annotated[str | None, typer.Option("--name", "--tool", help="Only this tool, prompt or resource.")]
Outcome = Annotated[str | None, typer.Option(help="Only this outcome: ok, error, refused, denied, …")]
Method = Annotated[str | None, typer.Option(help="Only this MCP method or admin action.")]
Kind = Annotated[str | None, typer.Option(help="Only mcp (gateway requests) or admin (changes) events.")]
Since = Annotated[str | None, typer.Option(help="From this time on: ISO 8601 date or time (no zone = UTC).")]
Until = Annotated[str | None, typer.Option(help="Before this time: ISO 8601 date or time (no zone = UTC).")]


def parse_time(value: str, *, option: str) -> datetime:
    """An ISO 8601 date or time; one without a zone is UTC."""
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValidationFailed(
            f"{option} takes an ISO 8601 date or time, like 2026-01-31 or 2026-01-31T12:00:00Z; got {value!r}",
            field=option.lstrip("-"),
        ) from None
    return moment.replace(tzinfo=UTC) if moment.utcoffset() is None else moment.astimezone(UTC)


def parse_age(value: str) -> timedelta:
    """``90d``, ``12h`` or ``2w``."""
    found = _AGE.fullmatch(value.strip().lower())
    if found is None:
        raise ValidationFailed(
            f"--older-than takes a number and h, d or w, like 90d; got {value!r}", field="older-than"
        )
    return int(found.group(1)) * _AGE_UNITS[found.group(2)]


def _filter(
    member: str | None,
    host: str | None,
    gateway: str | None,
    server: str | None,
    name: str | None,
    outcome: str | None,
    method: str | None,
    kind: str | None,
    since: str | None,
    until: str | None,
) -> AuditFilter:
    return guarded(
        lambda: AuditFilter(
            member=member,
            host=host,
            gateway=gateway,
            server=server,
            name=name,
            outcome=outcome,
            method=method,
            kind=kind,
            since=parse_time(since, option="--since") if since is not None else None,
            until=parse_time(until, option="--until") if until is not None else None,
        )
    )


def audit_key(settings: Settings) -> bytes:
    if settings.audit_key is None:  # check_secrets refuses this before any command runs
        raise ConfigError("BASTION_AUDIT_KEY is missing")
    return settings.audit_key.get_secret_value().encode("utf-8")


def record(item: AuditRecord) -> dict[str, Any]:
    return AuditEventOut.of(item).model_dump(mode="json")


@audit_app.command("list")
def list_(
    member: Member = None,
    host: Host = None,
    gateway: Gateway = None,
    server: Server = None,
    name: Name = None,
    outcome: Outcome = None,
    method: Method = None,
    kind: Kind = None,
    since: Since = None,
    until: Until = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many events.")] = 50,
    json_out: JsonFlag = False,
) -> None:
    """The workspace's events, newest first. Pending ones (still running) have no seq yet."""
    flt = _filter(member, host, gateway, server, name, outcome, method, kind, since, until)

    async def body(ctx: CliContext) -> list[dict[str, Any]]:
        found: list[AuditRecord] = []
        cursor: str | None = None
        while len(found) < limit:
            size = min(MAX_PAGE_SIZE, limit - len(found))
            page = await audit_query.list_page(ctx.store, ctx.actor, flt, cursor, size)
            found += page.items
            cursor = page.next_cursor
            if cursor is None:
                break
        if json_out:
            return [record(r) for r in found]
        known = await all_pages(lambda c, n: hosts.list_page(ctx.store, ctx.actor, cursor=c, limit=n))
        names: dict[str, str] = {h.id: h.name for h in known}
        return [{**record(r), "host": names.get(r.event.host_id or "", r.event.host_id)} for r in found]

    emit_many(run_with(body), json_out, COLUMNS, title="Audit events")


@audit_app.command("export")
def export(
    fmt: Annotated[Format, typer.Option("--format", help="jsonl (every stored value) or csv (for spreadsheets).")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout.")] = None,
    member: Member = None,
    host: Host = None,
    gateway: Gateway = None,
    server: Server = None,
    name: Name = None,
    outcome: Outcome = None,
    method: Method = None,
    kind: Kind = None,
    since: Since = None,
    until: Until = None,
) -> None:
    """Stream the workspace's events, oldest first, a batch at a time."""
    flt = _filter(member, host, gateway, server, name, outcome, method, kind, since, until)
    form: ExportFormat = "csv" if fmt is Format.CSV else "jsonl"

    async def body(ctx: CliContext) -> None:
        chunks = audit_query.export(ctx.store, ctx.actor, flt, form)
        if output is None:
            async for chunk in chunks:
                sys.stdout.write(chunk)
            sys.stdout.flush()
            return
        # Written beside the target and moved into place: a failed export never looks like a complete one.
        partial = anyio.Path(output.with_name(output.name + ".partial"))
        try:
            async with await anyio.open_file(partial, "w", encoding="utf-8", newline="") as out:
                async for chunk in chunks:
                    await out.write(chunk)
            await partial.replace(output)
        except OSError as exc:
            raise ValidationFailed(f"cannot write {output} ({exc.strerror or 'error'})", field="output") from None
        finally:
            await partial.unlink(missing_ok=True)

    run_with(body)
    if output is not None:
        success(f"exported the audit log to {output}")


def _verdict_json(verdict: Verdict) -> dict[str, Any]:
    broken = verdict.broken
    return {
        "ok": verdict.ok,
        "checked": verdict.checked,
        "first_seq": verdict.first_seq,
        "last_seq": verdict.last_seq,
        "broken": None if broken is None else {"kind": broken.kind.value, "seq": broken.seq, "detail": broken.detail},
    }


def verdict_message(verdict: Verdict) -> str:
    broken = verdict.broken
    if broken is not None:
        return f"audit log BROKEN at seq {broken.seq}: {broken.kind.value}: {broken.detail}"
    events = "1 event" if verdict.checked == 1 else f"{verdict.checked} events"
    if verdict.first_seq is None or verdict.last_seq is None:
        return f"audit log intact: {events}"
    return f"audit log intact: {events}, seq {verdict.first_seq}..{verdict.last_seq}"


@audit_app.command("verify")
def verify(
    checkpoints: Annotated[
        Path | None,
        typer.Option(help="Also trust the checkpoints in this JSON Lines file (from `audit checkpoint --append`)."),
    ] = None,
    json_out: JsonFlag = False,
) -> None:
    """Check the whole hash chain, its head and every checkpoint. Exit code 1 when the log was tampered with."""
    extra = guarded(lambda: audit_query.load_checkpoints_file(checkpoints)) if checkpoints is not None else []
    verdict = run_with(lambda ctx: audit_query.verify(ctx.store, audit_key(ctx.settings), extra))
    if json_out:
        emit_json(_verdict_json(verdict))
    else:
        typer.echo(verdict_message(verdict))
    if not verdict.ok:
        raise typer.Exit(EXIT_ERROR)


@audit_app.command("checkpoint")
def checkpoint(
    append: Annotated[
        Path | None, typer.Option(help="Also append it to this JSON Lines file, kept away from the database.")
    ] = None,
) -> None:
    """Sign a checkpoint of the chain's newest event and print it as JSON; keep a copy outside the database."""

    async def body(ctx: CliContext) -> Checkpoint:
        made = await audit_query.make_checkpoint(ctx.store, audit_key(ctx.settings))
        if made is None:
            raise NotFound("the audit log has no events yet; there is nothing to checkpoint")
        return made

    made = run_with(body)
    if append is not None:
        guarded(lambda: audit_query.append_checkpoint_file(append, made))
        success(f"appended the checkpoint for seq {made.seq} to {append}")
    emit_json(made.to_json())


@audit_app.command("prune")
def prune(
    before: Annotated[str | None, typer.Option(help="Delete events before this ISO 8601 date or time.")] = None,
    older_than: Annotated[str | None, typer.Option(help="Delete events older than this: 90d, 12h, 2w.")] = None,
    json_out: JsonFlag = False,
) -> None:
    """Delete old sealed events, keeping a signed checkpoint so the rest still verifies. The log is verified first."""

    def cutoff() -> datetime:
        if (before is None) == (older_than is None):
            raise ValidationFailed("give exactly one of --before and --older-than", field="before")
        if before is not None:
            return parse_time(before, option="--before")
        return datetime.now(UTC) - parse_age(older_than or "")

    moment = guarded(cutoff)
    pruned = run_with(lambda ctx: audit_query.prune(ctx.store, audit_key(ctx.settings), moment))
    if json_out:
        emit_json({"pruned": pruned, "before": moment.isoformat()})
    elif pruned:
        success(f"pruned {pruned} audit events before {moment.isoformat()}; verification now starts at a checkpoint")
    else:
        success(f"nothing to prune: no sealed audit events before {moment.isoformat()}")
