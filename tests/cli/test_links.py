"""`bastion link …`: an enrollment URL is printed once; links list their uses and state, and can be revoked."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from bastion import wiring
from bastion.db.store import Store
from bastion.domain.connections import ConnectionLink
from bastion.services import links
from bastion.settings import load_settings
from tests.cli.conftest import Cli, dump_table, with_store


def link_behind(db_url: str, url: str) -> ConnectionLink:
    """The link an enrollment URL leads to, found as the enrollment page would."""

    async def body(store: Store) -> ConnectionLink:
        async with store.transaction() as conn:
            return await links.find_by_secret(conn, wiring.hasher_from(load_settings()), url.rsplit("/", 1)[1])

    return with_store(db_url, body)


def test_link_lifecycle_through_the_cli(cli: Cli, enrolled: dict[str, Any], db_url: str) -> None:
    created = cli.json("link", "create", "--host", "sales-agent", "--gateway", "sales", "--expires-in", "12h",
                       "--max-uses", "3", "--allow", "Bob@Example.com", "--allow", "carol@example.com",
                       "--note", "sales team")  # fmt: skip
    link, url = created["link"], created["url"]
    assert url.startswith("http://127.0.0.1:8080/enroll/")
    assert link_behind(db_url, url).id == link["id"]
    assert (link["host"], link["gateway"], link["state"], link["uses"], link["max_uses"], link["note"]) == (
        "sales-agent",
        "sales",
        "active",
        0,
        3,
        "sales team",
    )
    assert link["allowed_emails"] == ["bob@example.com", "carol@example.com"]
    expires = datetime.fromisoformat(link["expires_at"])
    assert timedelta(hours=11, minutes=59) < expires - datetime.now(UTC) <= timedelta(hours=12)

    second = cli("link", "create", "--host", "sales-agent", "--gateway", "sales")
    second_url = [line for line in second.stdout.splitlines() if "/enroll/" in line]
    assert len(second_url) == 1
    assert "shown once" in second.stderr
    listed = cli.json("link", "list")
    assert [(x["state"], x["uses"]) for x in listed] == [("active", 0), ("active", 0)]
    assert len(cli.json("link", "list", "--host", "sales-agent", "--gateway", "sales")) == 2

    revoked = cli.json("link", "revoke", link["id"])
    assert (revoked["id"], revoked["state"]) == (link["id"], "revoked")
    assert {x["id"]: x["state"] for x in cli.json("link", "list")}[link["id"]] == "revoked"

    secrets = [url.rsplit("/", 1)[1], second_url[0].strip().rsplit("/", 1)[1]]
    later = cli("link", "list")
    shown = later.stdout + later.stderr + repr(listed) + repr(revoked) + dump_table(db_url, "connection_links")
    assert all(s not in shown for s in secrets)


def test_the_link_url_starts_with_the_public_url_when_one_is_set(
    cli: Cli, enrolled: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BASTION_PUBLIC_URL", "https://bastion.example.com/")
    url = cli.json("link", "create", "--host", "sales-agent", "--gateway", "sales")["url"]
    assert url.startswith("https://bastion.example.com/enroll/bsl_")


def test_a_link_is_shared_for_72_hours_unless_asked_otherwise(cli: Cli, enrolled: dict[str, Any]) -> None:
    base = ("link", "create", "--host", "sales-agent", "--gateway", "sales")
    default = cli.json(*base)["link"]
    assert default["max_uses"] is None  # anyone who signs in through it enrolls, as themselves
    expires = datetime.fromisoformat(default["expires_at"])
    assert timedelta(hours=71, minutes=59) < expires - datetime.now(UTC) <= timedelta(hours=72)
    unlimited = cli.json(*base, "--unlimited-uses", "--expires-in", "30d")["link"]
    assert unlimited["max_uses"] is None
    expires = datetime.fromisoformat(unlimited["expires_at"])
    assert timedelta(days=29, hours=23) < expires - datetime.now(UTC) <= timedelta(days=30)
    assert cli.json(*base, "--max-uses", "1")["link"]["max_uses"] == 1
    assert cli.json(*base, "--max-uses", "5")["link"]["max_uses"] == 5
    refused = cli(*base, "--max-uses", "5", "--unlimited-uses", code=2)
    assert "not both" in refused.stderr


def test_link_errors_map_to_exit_codes(cli: Cli, enrolled: dict[str, Any]) -> None:
    base = ("link", "create", "--host", "sales-agent", "--gateway", "sales")
    cli(*base, "--expires-in", "soon", code=2)
    cli(*base, "--expires-in", "91d", code=2)
    cli(*base, "--expires-in", "1m", code=2)
    cli(*base, "--max-uses", "0", code=2)
    cli(*base, "--allow", "not-an-email", code=2)
    cli("link", "create", "--host", "ghost", "--gateway", "sales", code=3)
    cli("link", "create", "--host", "sales-agent", "--gateway", "ghost", code=3)
    cli("link", "list", "--host", "ghost", code=3)
    cli("link", "revoke", "ghost", code=3)
