"""Standard Webhooks v1 signing as the official `standardwebhooks` verifier judges it, and the retry schedule."""

from __future__ import annotations

import base64
import json
import random
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from bastion.domain import webhooks as wh
from bastion.errors import ValidationFailed

BODY = json.dumps({"type": "webhook.test", "data": {"host": "agent"}}).encode()


def _headers(secrets: list[str], when: datetime, body: bytes = BODY) -> dict[str, str]:
    return wh.signed_headers(
        secrets, wh.message_id("0196f1c2-0000-7000-8000-000000000001"), int(when.timestamp()), body
    )


def test_a_fresh_secret_is_whsec_and_32_random_bytes() -> None:
    first, second = wh.new_secret(), wh.new_secret()
    assert first.startswith("whsec_") and first != second
    assert len(wh.secret_key(first)) == 32
    assert len(base64.b64decode(first.removeprefix("whsec_"))) == 32


@pytest.mark.parametrize(
    "secret",
    [
        "whsec_" + base64.b64encode(b"x" * 23).decode(),  # too short
        "whsec_" + base64.b64encode(b"x" * 65).decode(),  # too long
        "whsec_not base64!",
        base64.b64encode(b"x" * 32).decode(),  # no prefix
    ],
)
def test_secrets_outside_24_to_64_bytes_or_not_whsec_are_refused_without_echoing_them(secret: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        wh.secret_key(secret)
    assert secret not in str(caught.value)


def test_a_signed_event_verifies_with_the_official_verifier() -> None:
    secret = wh.new_secret()
    headers = _headers([secret], datetime.now(UTC))
    assert headers["webhook-id"] == "msg_0196f1c2-0000-7000-8000-000000000001"
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(secret).verify(BODY, headers) == json.loads(BODY)


def test_a_changed_body_or_another_secret_does_not_verify() -> None:
    secret = wh.new_secret()
    headers = _headers([secret], datetime.now(UTC))
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY.replace(b"agent", b"other"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(wh.new_secret()).verify(BODY, headers)


def test_during_a_rotation_both_secrets_sign_and_each_verifies_alone() -> None:
    old, new = wh.new_secret(), wh.new_secret()
    headers = _headers([new, old], datetime.now(UTC))
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert Webhook(old).verify(BODY, headers) == Webhook(new).verify(BODY, headers)


def test_a_six_minute_old_delivery_is_rejected_as_a_replay() -> None:
    secret = wh.new_secret()
    sent = datetime.now(UTC)
    headers = _headers([secret], sent)
    with time_machine.travel(sent + timedelta(minutes=4), tick=False):
        Webhook(secret).verify(BODY, headers)
    with time_machine.travel(sent + timedelta(minutes=6), tick=False), pytest.raises(WebhookVerificationError) as old:
        Webhook(secret).verify(BODY, headers)
    assert "too old" in str(old.value)


def test_the_body_carries_every_wire_field_and_fills_the_secret_ones_only_when_sent() -> None:
    subject = wh.EventSubject("agent", "sales", "c1", "m1", "ada@example.com", "t1")
    occurred = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    stored = wh.payload(wh.EventType.TOKEN_MINTED, "e1", occurred, subject, 3)
    assert stored["timestamp"] == "2026-01-02T03:04:05Z"
    expires = occurred + wh.CLAIM_CODE_LIFETIME
    body = json.loads(
        wh.body_bytes(stored, public_url="https://b.example/", claim_code="bsc_x", claim_expires_at=expires)
    )
    assert body == {
        "type": "token.minted",
        "timestamp": "2026-01-02T03:04:05Z",
        "data": {
            "event_id": "e1",
            "host": "agent",
            "gateway": "sales",
            "connection_id": "c1",
            "version": 3,
            "member": {"id": "m1", "email": "ada@example.com"},
            "token": None,
            "token_id": "t1",
            "claim_code": "bsc_x",
            "claim_expires_at": "2026-01-02T03:14:05Z",
            "mcp_url": "https://b.example/g/sales/mcp",
        },
    }
    assert stored["data"]["claim_code"] is None  # type: ignore[index]  the stored body never holds a secret


def test_retry_delays_are_full_jitter_under_a_doubling_ceiling_capped_at_an_hour() -> None:
    rng = random.Random(1)  # noqa: S311  seeded jitter
    for failures in range(1, 40):
        ceiling = min(wh.RETRY_CAP, wh.RETRY_BASE * 2 ** (failures - 1))
        delays = [wh.retry_delay(failures, rng) for _ in range(200)]
        assert all(wh.RETRY_FLOOR <= d <= max(ceiling, wh.RETRY_FLOOR) for d in delays)
        # Full jitter: the draws spread over the whole range, not around its top.
        if ceiling >= timedelta(minutes=1):
            assert min(delays) < ceiling / 4 and max(delays) > ceiling * 3 / 4


def test_retries_go_on_until_24_hours_after_the_first_attempt_then_stop() -> None:
    rng = random.Random(2)  # noqa: S311  seeded jitter
    first = datetime(2026, 1, 1, tzinfo=UTC)
    assert wh.next_attempt_at(first + timedelta(hours=23, minutes=59), first, 30, rng) is not None
    assert wh.next_attempt_at(first + wh.RETRY_WINDOW, first, 30, rng) is None


def test_redirects_and_errors_are_failures_and_only_2xx_is_delivered() -> None:
    assert wh.answered(204, 3).delivered and not wh.answered(204, 3).endpoint_down
    redirect = wh.answered(302, 3)
    assert (redirect.delivered, redirect.error, redirect.endpoint_down) == (False, "redirect 302", True)
    refused = wh.answered(400, 3)
    assert (refused.delivered, refused.endpoint_down) == (False, False)
    assert wh.answered(503, 3).endpoint_down and wh.answered(429, 3).endpoint_down
    assert wh.failed("ConnectError", 5).endpoint_down


def test_event_type_lists_are_checked_and_default_to_all() -> None:
    assert wh.event_types(None) == wh.SUBSCRIBABLE
    assert wh.event_types(["host.enabled", "token.minted"]) == (wh.EventType.TOKEN_MINTED, wh.EventType.HOST_ENABLED)
    for bad in (["webhook.test"], ["nope"], []):
        with pytest.raises(ValidationFailed):
            wh.event_types(bad)
