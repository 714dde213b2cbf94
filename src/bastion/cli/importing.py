"""`bastion server import FILE`: servers from a Claude Desktop, Cursor or VS Code config, secrets left out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bastion.cli.context import CliContext, run_with
from bastion.cli.options import JsonFlag
from bastion.cli.output import console, emit_json, emit_table, success
from bastion.domain import importing
from bastion.errors import ValidationFailed
from bastion.services import importing as importing_service
from bastion.services.importing import ImportReport


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValidationFailed(f"{path.name} is not UTF-8 text", field="file") from None


def report_document(report: ImportReport) -> dict[str, Any]:
    """The report as one JSON-ready document. It names where secrets were, never what they were."""
    created = [
        {
            "id": c.id,
            "name": c.spec.name,
            "transport": c.spec.transport.value,
            "url": c.spec.url,
            "command": c.spec.command,
            "args": list(c.spec.args),
            "env": dict(c.spec.env),
            "token_env": c.spec.token_env,
            "auth_kind": c.spec.auth_kind.value,
        }
        for c in report.created
    ]
    return {
        "dry_run": report.dry_run,
        "created": created,
        "skipped": [{"name": s.name, "reason": s.reason} for s in report.skipped],
        "secrets_left_out": [
            {"server": s.server, "where": s.where, "hint": importing.LEFT_OUT_HINT} for s in report.secrets_left_out
        ],
        "renamed": [{"from": r.original, "to": r.name} for r in report.renamed],
        "notes": [{"server": n.server, "message": n.message} for n in report.notes],
    }


def _emit_tables(doc: dict[str, Any]) -> None:
    verb = "would create" if doc["dry_run"] else "created"
    rows = [{**c, "target": c["url"] or " ".join([c["command"] or "", *c["args"]])} for c in doc["created"]]
    emit_table(rows, ("name", "transport", "target", "auth_kind"), title=verb.capitalize())
    if doc["skipped"]:
        emit_table(doc["skipped"], ("name", "reason"), title="Skipped")
    if doc["renamed"]:
        emit_table(doc["renamed"], ("from", "to"), title="Renamed")
    if doc["secrets_left_out"]:
        emit_table(doc["secrets_left_out"], ("server", "where"), title="Secrets left out")
        console.print(f"[yellow]{importing.LEFT_OUT_HINT}[/yellow]")
    if doc["notes"]:
        emit_table(doc["notes"], ("server", "message"), title="Notes")
    success(f"{verb} {len(doc['created'])} server(s), skipped {len(doc['skipped'])}")


def import_(
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="claude_desktop_config.json, mcp.json, settings.json…")
    ],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would happen; change nothing.")] = False,
    json_out: JsonFlag = False,
) -> None:
    """Create servers from an MCP client config. Existing names are skipped; secrets are never stored."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        plan = importing.parse(_read(file))
        return report_document(await importing_service.apply(ctx.store, ctx.actor, plan, dry_run=dry_run))

    doc = run_with(body)
    if json_out:
        emit_json(doc)
    else:
        _emit_tables(doc)
