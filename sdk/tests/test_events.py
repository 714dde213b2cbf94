"""Parsing event bodies, claim redemption edge cases, and the receiver served on its own by a real server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx2
import pytest

from agent_support import closed_port, event_body, new_secret, serving, signed_headers
from bastion_agent import ClaimFailed, ClaimRedeemer, TokenMap, WebhookReceiver, parse_event

pytestmark = pytest.mark.anyio


def _body(data: object, kind: object = "token.minted") -> bytes:
    return json.dumps({"type": kind, "timestamp": "2026-01-01T00:00:00Z", "data": data}).encode()


def test_an_event_parses_into_typed_fields_and_hides_its_secrets() -> None:
    event = parse_event(event_body("token.minted", version=7, token="bst_secret", token_id="t1", claim_code="bsc_x"))
    assert (event.type, event.version, event.host, event.gateway, event.token_id) == (
        "token.minted",
        7,
        "agent",
        "sales",
        "t1",
    )
    assert event.member is not None and event.member.email == "ada@example.com"
    assert "bst_secret" not in repr(event) and "bsc_x" not in repr(event)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\xff not json", "not JSON"),
        (b"[]", "no 'data' object"),
        (_body("text"), "no 'data' object"),
        (_body({"version": 1}, kind=""), "'type'"),
        (_body({"version": -1, "host": "agent"}, kind="host.enabled"), "'version'"),
        (_body({"version": True, "host": "agent"}, kind="host.enabled"), "'version'"),
        (_body({"version": 1}, kind="host.enabled"), "names its host"),
        (_body({"version": 1, "host": "agent", "connection_id": "c"}), "host, connection and member"),
        (_body({"version": 1, "host": "agent", "connection_id": "c", "member": "ada"}), "'member' must be an object"),
        (_body({"version": 1, "host": "agent", "connection_id": "c", "member": {"id": "m"}}), "'email'"),
        (
            _body(
                {"version": 1, "host": "agent", "connection_id": "c", "member": {"id": "m", "email": "a@b"}},
                "token.revoked",
            ),
            "names the token",
        ),
        (
            _body(
                {
                    "version": 1,
                    "host": "agent",
                    "connection_id": "c",
                    "member": {"id": "m", "email": "a@b"},
                    "token": "bst_x",
                }
            ),
            "names its token id",
        ),
        (_body({"version": 1, "host": 5}, kind="host.enabled"), "'host'"),
    ],
)
def test_malformed_events_are_refused_with_a_reason(body: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_event(body)


async def test_an_unreachable_bastion_is_a_retryable_claim_failure() -> None:
    redeemer = ClaimRedeemer(f"http://127.0.0.1:{closed_port()}", "bsh_key")
    with pytest.raises(ClaimFailed) as caught:
        await redeemer.redeem("bsc_code")
    assert caught.value.retryable
    assert "could not be reached" in str(caught.value) and "bsc_code" not in str(caught.value)


@pytest.mark.parametrize(
    ("status", "content", "retryable", "message"),
    [
        (200, b"not json", False, "carries no token"),
        (200, b'{"token": "bst_x"}', False, "carries no token"),
        (401, b"{}", True, "check the host key"),
        (429, b"{}", True, "HTTP 429"),
    ],
)
async def test_odd_claim_answers_are_failures(status: int, content: bytes, retryable: bool, message: str) -> None:
    def answer(_request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(status, content=content)

    async with httpx2.AsyncClient(transport=httpx2.MockTransport(answer)) as http:
        with pytest.raises(ClaimFailed, match=message) as caught:
            await ClaimRedeemer("http://bastion.test", "bsh_key", http=http).redeem("bsc_code")
    assert caught.value.retryable is retryable


async def test_the_receiver_served_on_its_own_answers_over_http(token_map: TokenMap) -> None:
    secret = new_secret()
    receiver = WebhookReceiver(token_map, [secret], max_body_bytes=1024)
    async with serving(receiver) as url, httpx2.AsyncClient(base_url=url) as http:
        body = event_body("connection.created", version=1, token="bst_ada", token_id="t1")
        assert (await http.post("/", content=body, headers=signed_headers(body, secret))).status_code == 200

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(4):
                yield b"x" * 400

        streamed = await http.post("/", content=chunks(), headers=signed_headers(b"", secret, webhook_id="msg_big"))
        assert streamed.status_code == 413
        declared = await http.post("/", content=b"x" * 2000, headers=signed_headers(b"", secret, webhook_id="msg_big"))
        assert declared.status_code == 413
    assert (await token_map.credential("ada@example.com")).token == "bst_ada"
