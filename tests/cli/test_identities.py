"""`bastion identity …`: credentials read from files or stdin, sealed; only fingerprints and last 4 ever shown."""

from __future__ import annotations

from pathlib import Path

from click.testing import Result

from bastion import wiring
from bastion.db.store import Store
from bastion.domain.identities import IdentitySecret
from bastion.services import identities, workspace
from bastion.settings import load_settings
from tests.cli.conftest import Cli, dump_table, secret_file, with_store

TOKEN = "ghp_" + "Qw3rTy" * 5 + "LaSt"
NEW_TOKEN = "ghp_" + "Zx9Vb" * 6 + "N3w4"


def open_secret(db_url: str, identity_id: str) -> IdentitySecret:
    """What the data plane would send upstream, opened with the vault the settings describe."""

    async def body(store: Store) -> IdentitySecret:
        ws = await workspace.default_workspace(store)
        vault = wiring.vault_from(load_settings())
        return await identities.open_secret(store, vault, ws.id, identity_id)

    return with_store(db_url, body)


def shown(results: list[Result]) -> str:
    return "\n".join(r.stdout + r.stderr for r in results)


def test_identity_lifecycle_through_the_cli_never_shows_the_secret(cli: Cli, db_url: str, tmp_path: Path) -> None:
    cli("server", "create", "github", "--url", "https://api.githubcopilot.com/mcp/")
    cli("member", "create", "alice@example.com")
    results: list[Result] = []

    def run(*args: str) -> Result:
        results.append(cli(*args))
        return results[-1]

    path = secret_file(tmp_path, "token", TOKEN)
    created = cli.json("identity", "create", "--member", "alice@example.com", "--server", "github",
                       "--bearer-token-file", path, "--label", "Alice on GitHub")  # fmt: skip
    run("identity", "create", "--member", "alice@example.com", "--server", "github", "--bearer-token-file", path)
    assert (created["owner"], created["server"], created["scope"], created["label"]) == (
        "alice@example.com",
        "github",
        "private",
        "Alice on GitHub",
    )
    assert (created["last4"], created["status"], created["kind"], len(created["fingerprint"])) == (
        "LaSt",
        "active",
        "bearer",
        16,
    )
    assert open_secret(db_url, created["id"]).outbound_headers() == {"Authorization": f"Bearer {TOKEN}"}

    listed = cli.json("identity", "list", "--member", "alice@example.com")
    assert [i["label"] for i in listed] == ["Alice on GitHub", "github (bearer)"]
    assert len(cli.json("identity", "list")) == 2
    assert len(cli.json("identity", "list", "--all", "--server", "github")) == 2
    assert cli.json("identity", "list", "--global") == []
    assert cli.json("identity", "show", created["id"])["fingerprint"] == created["fingerprint"]
    run("identity", "list")
    run("identity", "show", created["id"])

    disabled = cli.json("identity", "update", created["id"], "--status", "disabled", "--label", "Old")
    assert (disabled["status"], disabled["label"], disabled["version"]) == ("disabled", "Old", 2)
    replaced = cli.json("identity", "update", created["id"], "--bearer-token-file",
                        secret_file(tmp_path, "new", NEW_TOKEN))  # fmt: skip
    assert (replaced["last4"], replaced["status"]) == ("N3w4", "disabled")
    assert replaced["fingerprint"] != created["fingerprint"]
    assert open_secret(db_url, created["id"]).token == NEW_TOKEN
    run("identity", "update", created["id"], "--status", "active")

    stored = dump_table(db_url, "identities")
    assert created["id"] in stored
    assert TOKEN not in stored
    assert NEW_TOKEN not in stored

    assert cli.json("identity", "delete", created["id"])["deleted"] is True
    run("identity", "delete", listed[1]["id"])
    assert cli.json("identity", "list") == []
    text = shown(results)
    assert "deleted identity" in text
    assert TOKEN not in text
    assert NEW_TOKEN not in text
    assert TOKEN[4:-4] not in text


def test_a_global_identity_takes_its_token_from_stdin_and_headers_from_files(
    cli: Cli, db_url: str, tmp_path: Path
) -> None:
    cli("server", "create", "linear", "--url", "https://mcp.linear.app/mcp")
    result = cli("identity", "create", "--global", "--server", "linear", "--bearer-token-stdin", "--json",
                 input=f"Bearer {TOKEN}\n")  # fmt: skip
    assert TOKEN not in result.stdout + result.stderr
    shared = cli.json("identity", "list", "--global")
    assert [(i["owner"], i["scope"], i["last4"]) for i in shared] == [("(global)", "global", "LaSt")]
    assert open_secret(db_url, shared[0]["id"]).token == TOKEN

    key_file = secret_file(tmp_path, "api-key", NEW_TOKEN)
    by_header = cli("identity", "create", "--global", "--server", "linear", "--header", f"X-Api-Key=@{key_file}",
                    "--header", "X-Team=sales", "--json")  # fmt: skip
    assert NEW_TOKEN not in by_header.stdout + by_header.stderr
    headers_id = cli.json("identity", "list", "--global")[1]["id"]
    assert open_secret(db_url, headers_id).outbound_headers() == {"X-Api-Key": NEW_TOKEN, "X-Team": "sales"}
    assert cli.json("identity", "show", headers_id)["details"]["header_names"] == ["X-Api-Key", "X-Team"]

    from_dash = cli.json("identity", "update", headers_id, "--bearer-token-file", "-", input=NEW_TOKEN)
    assert from_dash["last4"] == "N3w4"
    assert open_secret(db_url, headers_id).outbound_headers() == {"Authorization": f"Bearer {NEW_TOKEN}"}


def test_identity_input_errors_map_to_exit_codes(cli: Cli, tmp_path: Path) -> None:
    cli("server", "create", "github", "--url", "https://api.githubcopilot.com/mcp/")
    cli("member", "create", "alice@example.com")
    path = secret_file(tmp_path, "token", TOKEN)
    base = ("identity", "create", "--member", "alice@example.com", "--server", "github")
    cli(*base, "--bearer-token", TOKEN, code=2)  # a secret is never a plain argument
    cli(*base, code=2)
    cli(*base, "--bearer-token-file", path, "--bearer-token-stdin", code=2)
    cli(*base, "--bearer-token-file", str(tmp_path / "missing"), code=2)
    cli(*base, "--bearer-token-file", secret_file(tmp_path, "empty", ""), code=2)
    cli(*base, "--header", "X-A=@-", "--header", "X-B=@-", input="a", code=2)
    cli(*base, "--header", "Host=@" + path, code=2)
    cli(*base, "--global", "--bearer-token-file", path, code=2)
    cli("identity", "create", "--server", "github", "--bearer-token-file", path, code=2)  # whose?
    cli("identity", "create", "--member", "bob@example.com", "--server", "github", "--bearer-token-file", path, code=3)
    cli("identity", "create", "--member", "alice@example.com", "--server", "ghost", "--bearer-token-file", path,
        code=3)  # fmt: skip
    cli("identity", "list", "--global", "--all", code=2)
    cli("identity", "show", "ghost", code=3)
    cli("identity", "update", "ghost", "--label", "x", code=3)
    created = cli.json(*base, "--bearer-token-file", path)
    cli("identity", "update", created["id"], code=2)
    cli("identity", "update", created["id"], "--status", "needs_reauth", code=2)
    cli("identity", "delete", "ghost", code=3)
