"""The webhook receiver as an ASGI app: verify, deduplicate, redeem claim codes, commit, and only then answer 2xx."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from agent_support import event_body, new_secret, signed_headers
from bastion_agent import Applied, ClaimRedeemer, Event, NotEnrolled, TokenCipher, TokenMap, WebhookReceiver

pytestmark = pytest.mark.anyio
HOST_KEY = "bsh_the_agents_host_key"


@dataclass
class FakeBastion:
    """Bastion's claim endpoint: each code redeemable once, with this host's key only; can be made to fail."""

    codes: dict[str, dict[str, object]] = field(default_factory=dict[str, dict[str, object]])
    redeemed: list[str] = field(default_factory=list[str])
    failing: bool = False

    def app(self) -> Starlette:
        async def redeem(request: Request) -> JSONResponse:
            if self.failing:
                return JSONResponse({"title": "unavailable"}, status_code=503)
            if request.headers.get("authorization") != f"Bearer {HOST_KEY}":
                return JSONResponse({"title": "unauthenticated"}, status_code=401)
            code = (await request.json())["claim_code"]
            answer = self.codes.pop(code, None)
            if answer is None:
                return JSONResponse({"title": "not found"}, status_code=404)
            self.redeemed.append(code)
            return JSONResponse(answer)

        return Starlette(routes=[Route("/api/v1/claims/redeem", redeem, methods=["POST"])])


@pytest.fixture
def secret() -> str:
    return new_secret()


@pytest.fixture
def bastion() -> FakeBastion:
    return FakeBastion()


@pytest.fixture
async def webhook(
    token_map: TokenMap, secret: str, bastion: FakeBastion
) -> AsyncIterator[tuple[httpx2.AsyncClient, list[tuple[Event, Applied]]]]:
    seen: list[tuple[Event, Applied]] = []

    async def on_event(event: Event, applied: Applied) -> None:
        seen.append((event, applied))

    claims_http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=bastion.app()))
    redeemer = ClaimRedeemer("http://bastion.test", HOST_KEY, http=claims_http)
    receiver = WebhookReceiver(token_map, [secret], redeemer=redeemer, on_event=on_event)
    async with (
        claims_http,
        httpx2.AsyncClient(transport=httpx2.ASGITransport(app=receiver), base_url="http://agent.test") as client,
    ):
        yield client, seen


async def _post(client: httpx2.AsyncClient, body: bytes, headers: dict[str, str]) -> httpx2.Response:
    return await client.post("/", content=body, headers=headers)


async def test_a_signed_event_lands_in_the_map_before_the_2xx(
    webhook: tuple[httpx2.AsyncClient, list[tuple[Event, Applied]]], token_map: TokenMap, secret: str
) -> None:
    client, seen = webhook
    body = event_body("connection.created", version=1, token="bst_ada", token_id="t1")
    response = await _post(client, body, signed_headers(body, secret))
    assert (response.status_code, response.json()) == (200, {"status": "applied"})
    assert (await token_map.credential("ada@example.com")).token == "bst_ada"
    assert [e.type for e, _ in seen] == ["connection.created"]
    assert "bst_ada" not in repr(seen[0][0])


async def test_a_redelivered_webhook_id_is_answered_without_being_applied_again(
    webhook: tuple[httpx2.AsyncClient, list[tuple[Event, Applied]]], token_map: TokenMap, secret: str
) -> None:
    client, seen = webhook
    body = event_body("connection.created", version=1, token="bst_ada", token_id="t1")
    assert (await _post(client, body, signed_headers(body, secret, webhook_id="msg_1"))).status_code == 200
    # The same event retried later (a fresh timestamp and signature, the same webhook-id).
    retry = await _post(client, body, signed_headers(body, secret, webhook_id="msg_1", at=int(time.time()) + 60))
    assert (retry.status_code, retry.json()) == (200, {"status": "duplicate"})
    assert len(seen) == 1
    assert await token_map.seen("msg_1")


async def test_forged_replayed_and_malformed_deliveries_change_nothing(
    webhook: tuple[httpx2.AsyncClient, list[tuple[Event, Applied]]], token_map: TokenMap, secret: str
) -> None:
    client, seen = webhook
    body = event_body("connection.created", version=1, token="bst_forged", token_id="t1")
    forged = await _post(client, body, signed_headers(body, new_secret()))
    assert forged.status_code == 401
    assert forged.json()["error"] == "invalid_signature"
    replayed = await _post(client, body, signed_headers(body, secret, at=int(time.time()) - 6 * 60))
    assert replayed.status_code == 401
    assert "too old" in replayed.json()["detail"]
    unsigned = await client.post("/", content=body)
    assert unsigned.status_code == 401
    not_json = b"not json"
    assert (await _post(client, not_json, signed_headers(not_json, secret, webhook_id="msg_x"))).status_code == 400
    no_member = event_body("token.minted", version=1, member=None, token="bst_x", token_id="t1")
    assert (await _post(client, no_member, signed_headers(no_member, secret))).status_code == 400
    assert (await client.get("/")).status_code == 405
    huge = b"x" * (64 * 1024 + 1)
    assert (await _post(client, huge, signed_headers(huge, secret, webhook_id="msg_big"))).status_code == 413
    assert seen == []
    assert await token_map.enrollments() == []
    assert not await token_map.seen("msg_x")


async def test_test_events_and_unknown_types_are_acknowledged(
    webhook: tuple[httpx2.AsyncClient, list[tuple[Event, Applied]]], token_map: TokenMap, secret: str
) -> None:
    client, _seen = webhook
    for kind in ("webhook.test", "member.renamed"):
        body = json.dumps({"type": kind, "timestamp": "2026-01-01T00:00:00Z", "data": {"host": "agent"}}).encode()
        response = await _post(client, body, signed_headers(body, secret, webhook_id=f"msg_{kind}"))
        assert (response.status_code, response.json()) == (200, {"status": "unchanged"})
    assert await token_map.enrollments() == []


async def test_a_claim_code_is_redeemed_once_with_the_host_key_and_the_token_stored(
    webhook: tuple[httpx2.AsyncClient, list[tuple[Event, Applied]]],
    token_map: TokenMap,
    secret: str,
    bastion: FakeBastion,
) -> None:
    client, _seen = webhook
    bastion.codes["bsc_code"] = {
        "token": "bst_claimed",
        "token_id": "t1",
        "connection_id": "conn-1",
        "member": {"id": "mem-ada", "email": "ada@example.com"},
        "gateway": "sales",
    }
    body = event_body("connection.created", version=1, claim_code="bsc_code")
    headers = signed_headers(body, secret, webhook_id="msg_claim")
    assert (await _post(client, body, headers)).status_code == 200
    assert bastion.redeemed == ["bsc_code"]
    assert (await token_map.credential("ada@example.com")).token == "bst_claimed"
    # A retry of the same delivery is a duplicate: the spent code is not presented again.
    assert (await _post(client, body, headers)).json() == {"status": "duplicate"}
    assert bastion.redeemed == ["bsc_code"]


async def test_a_claim_bastion_cannot_honour_now_is_retried_and_nothing_is_stored_meanwhile(
    webhook: tuple[httpx2.AsyncClient, list[tuple[Event, Applied]]],
    token_map: TokenMap,
    secret: str,
    bastion: FakeBastion,
) -> None:
    client, _seen = webhook
    bastion.codes["bsc_code"] = {"token": "bst_claimed", "token_id": "t1", "connection_id": "conn-1"}
    body = event_body("token.minted", version=1, claim_code="bsc_code")
    bastion.failing = True
    first = await _post(client, body, signed_headers(body, secret, webhook_id="msg_claim"))
    assert (first.status_code, first.json()["error"]) == (503, "claim_failed")
    assert "bsc_code" not in first.text
    assert not await token_map.seen("msg_claim")
    assert await token_map.enrollments() == []
    bastion.failing = False
    second = await _post(client, body, signed_headers(body, secret, webhook_id="msg_claim"))
    assert second.status_code == 200
    assert (await token_map.credential("ada@example.com")).token == "bst_claimed"


async def test_a_claim_refused_for_good_is_applied_without_its_token(
    webhook: tuple[httpx2.AsyncClient, list[tuple[Event, Applied]]],
    token_map: TokenMap,
    secret: str,
    bastion: FakeBastion,
) -> None:
    client, _seen = webhook
    bastion.codes["bsc_other"] = {"token": "bst_other", "token_id": "t9", "connection_id": "conn-9"}
    body = event_body("token.minted", version=1, claim_code="bsc_other")
    other = await _post(client, body, signed_headers(body, secret))
    assert (other.status_code, other.json()["status"]) == (200, "applied_without_token")
    assert "another connection" in other.json()["detail"]
    unknown = event_body("token.minted", version=2, claim_code="bsc_unknown")
    refused = await _post(client, unknown, signed_headers(unknown, secret))
    assert (refused.status_code, refused.json()["status"]) == (200, "applied_without_token")
    assert "bsc_unknown" not in refused.text
    # The event is applied (a retry would carry the same spent code), the person is enrolled without a token.
    with pytest.raises(NotEnrolled) as caught:
        await token_map.credential("ada@example.com")
    assert caught.value.reason == "no_token"


async def test_without_a_host_key_claim_codes_wait_for_one(token_map: TokenMap, secret: str) -> None:
    receiver = WebhookReceiver(token_map, [secret])
    body = event_body("token.minted", version=1, claim_code="bsc_code")
    status, answer = await receiver.handle(signed_headers(body, secret), body)
    assert (status, answer["error"]) == (503, "claim_failed")
    assert "no host key" in str(answer["detail"])


def test_host_keys_are_checked_and_hidden() -> None:
    with pytest.raises(ValueError, match="bsh_"):
        ClaimRedeemer("http://bastion.test", "not-a-host-key")
    assert HOST_KEY not in repr(ClaimRedeemer("http://bastion.test", HOST_KEY))


async def test_a_map_that_cannot_commit_answers_503_so_bastion_retries(
    tmp_path: Path, cipher: TokenCipher, secret: str
) -> None:
    broken = TokenMap(f"sqlite:///{tmp_path / 'missing' / 'agent.db'}", cipher)
    try:
        receiver = WebhookReceiver(broken, [secret])
        body = event_body("connection.created", version=1, token="bst_ada", token_id="t1")
        status, answer = await receiver.handle(signed_headers(body, secret), body)
    finally:
        await broken.close()
    assert (status, answer["error"]) == (503, "unavailable")
    assert "bst_ada" not in json.dumps(answer)


async def test_a_failing_event_hook_does_not_undo_the_delivery(token_map: TokenMap, secret: str) -> None:
    async def on_event(_event: Event, _applied: Applied) -> None:
        raise RuntimeError("the agent's hook broke")

    receiver = WebhookReceiver(token_map, [secret], on_event=on_event)
    body = event_body("connection.created", version=1, token="bst_ada", token_id="t1")
    status, _answer = await receiver.handle(signed_headers(body, secret), body)
    assert status == 200
    assert (await token_map.credential("ada@example.com")).token == "bst_ada"
