"""`bastion webhook …` and `bastion host-key …`: endpoints, rotation, test events, the log and redelivery from the
shell, against a real receiver that verifies every request with the official `standardwebhooks` package."""

from __future__ import annotations

import json

from tests.cli.conftest import Cli, dump_table
from tests.processes import free_port
from tests.webhooks.receiver import Receiver, in_thread


def _setup(cli: Cli) -> None:
    cli("host", "create", "agent")
    cli("gateway", "create", "sales")
    cli("member", "create", "ada@example.com")


def test_an_endpoint_is_created_tested_rotated_and_its_events_redelivered_from_the_cli(cli: Cli, db_url: str) -> None:
    _setup(cli)
    receiver = Receiver()
    with in_thread(receiver) as base:
        created = cli.json("webhook", "create", "agent", base + "/hook", "--event", "connection.created")
        endpoint, secret = created["endpoint"], created["secret"]
        receiver.secrets.append(secret)
        assert endpoint["event_types"] == ["connection.created"] and endpoint["token_delivery"] == "claim_code"
        assert secret not in dump_table(db_url, "webhook_secrets")

        tested = cli.json("webhook", "test", "agent", endpoint["id"])
        assert (tested["outcome"], tested["status_code"], tested["trigger"]) == ("delivered", 204, "test")
        assert receiver.received[-1].verified_by == (0,)

        # Nothing serves here, so the connection's event waits; redeliver attempts it now.
        cli.json("connection", "create", "--member", "ada@example.com", "--host", "agent", "--gateway", "sales")
        pending = cli.json("webhook", "events", "agent", endpoint["id"], "--status", "pending")
        assert [e["event_type"] for e in pending] == ["connection.created"]
        again = cli.json("webhook", "redeliver", "agent", endpoint["id"], pending[0]["id"])
        assert (again["outcome"], again["trigger"]) == ("delivered", "manual")
        assert receiver.received[-1].data["claim_code"].startswith("bsc_")

        rotated = cli.json("webhook", "rotate", "agent", endpoint["id"], "--overlap-hours", "1")
        receiver.secrets.append(rotated["secret"])
        cli.json("webhook", "test", "agent", endpoint["id"])
        assert receiver.received[-1].verified_by == (0, 1)
        retired = cli.json("webhook", "retire-old", "agent", endpoint["id"])
        assert len(retired["secrets"]) == 1
        cli.json("webhook", "test", "agent", endpoint["id"])
        assert receiver.received[-1].verified_by == (1,)

    log = cli.json("webhook", "deliveries", "agent", endpoint["id"])
    assert [(d["trigger"], d["outcome"]) for d in log] == [
        ("test", "delivered"),
        ("manual", "delivered"),
        ("test", "delivered"),
        ("test", "delivered"),
    ]
    paused = cli.json("webhook", "update", "agent", endpoint["id"], "--disable", "--event", "token.revoked")
    assert (paused["enabled"], paused["event_types"]) == (False, ["token.revoked"])
    cli("webhook", "update", "agent", endpoint["id"], "--event", "nope", code=2)
    assert cli.json("webhook", "delete", "agent", endpoint["id"])["deleted"] is True
    assert cli.json("webhook", "list", "agent") == []


def test_secrets_and_host_keys_are_printed_once_on_their_own_line(cli: Cli, db_url: str) -> None:
    _setup(cli)
    made = cli("webhook", "create", "agent", "https://agent.example.com/hook")
    secret = next(line for line in made.stdout.splitlines() if line.startswith("whsec_"))
    assert "shown once" in made.stderr
    (endpoint,) = cli.json("webhook", "list", "agent")
    assert secret not in cli("webhook", "show", "agent", endpoint["id"]).stdout

    key = cli("host-key", "create", "agent", "--name", "cloud run")
    printed = next(line for line in key.stdout.splitlines() if line.startswith("bsh_"))
    assert "shown once" in key.stderr and printed not in dump_table(db_url, "host_keys")
    (listed,) = cli.json("host-key", "list", "agent")
    assert listed["last4"] == printed[-4:] and listed["revoked_at"] is None
    assert cli.json("host-key", "revoke", "agent", listed["id"])["revoked_at"] is not None
    cli("webhook", "create", "agent", "ftp://agent.example.com/hook", code=2)
    cli("webhook", "test", "nope", endpoint["id"], code=3)


def test_a_host_s_webhook_url_becomes_an_endpoint_that_waits_for_a_rotated_in_secret(cli: Cli) -> None:
    cli("host", "create", "agent", "--webhook-url", "https://agent.example.com/hook")
    (endpoint,) = cli.json("webhook", "list", "agent")
    assert (endpoint["from_host"], endpoint["secrets"]) == (True, [])
    cli("webhook", "test", "agent", endpoint["id"], code=4)  # no signing secret yet
    rotated = cli.json("webhook", "rotate", "agent", endpoint["id"])
    assert rotated["secret"].startswith("whsec_") and len(rotated["endpoint"]["secrets"]) == 1


def test_a_test_event_that_is_not_delivered_exits_1_with_the_reason(cli: Cli) -> None:
    _setup(cli)
    url = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    endpoint = cli.json("webhook", "create", "agent", url)["endpoint"]
    failed = json.loads(cli("webhook", "test", "agent", endpoint["id"], "--json", code=1).stdout)
    assert (failed["outcome"], failed["status_code"]) == ("failed", None) and failed["error"]
    told = cli("webhook", "test", "agent", endpoint["id"], code=1)
    assert "test event failed: " + failed["error"] in told.stderr
    first = cli.json("webhook", "events", "agent", endpoint["id"])[0]  # the two test events
    cli("webhook", "redeliver", "agent", endpoint["id"], first["id"], code=1)
