"""Standard Webhooks v1 verification, checked against the official `standardwebhooks` package both ways."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime, timedelta

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from agent_support import event_body, new_secret, signed_headers
from bastion_agent import WebhookRejected, WebhookVerifier, sign


def test_a_signature_made_by_the_official_package_verifies() -> None:
    secret = new_secret()
    body = event_body("token.minted", version=1, token="bst_x", token_id="tok-1")
    now = datetime.now(UTC)
    headers = {
        "webhook-id": "msg_abc",
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign("msg_abc", now, body.decode("utf-8")),
    }
    verified = WebhookVerifier([secret]).verify(headers, body)
    assert verified.webhook_id == "msg_abc"
    assert verified.timestamp == datetime.fromtimestamp(int(now.timestamp()), UTC)


def test_our_signature_verifies_with_the_official_package() -> None:
    secret = new_secret(64)
    body = event_body("connection.created", version=1)
    headers = signed_headers(body, secret)
    assert Webhook(secret).verify(body, headers)["type"] == "connection.created"


def test_during_a_rotation_either_secret_verifies_a_delivery_signed_with_both() -> None:
    old, new = new_secret(), new_secret(24)
    body = event_body("host.disabled", version=3, connection_id=None, member=None)
    headers = signed_headers(body, old, new)
    assert len(headers["webhook-signature"].split()) == 2
    for secrets_ in ([old], [new], [new, old]):
        assert WebhookVerifier(secrets_).verify(headers, body).webhook_id == headers["webhook-id"]
        Webhook(secrets_[0]).verify(body, headers)  # the official verifier agrees
    # A receiver that already dropped the old secret refuses a delivery signed with the old one only.
    with pytest.raises(WebhookRejected, match="no webhook signature matches"):
        WebhookVerifier([new]).verify(signed_headers(body, old), body)


def test_a_six_minute_old_replay_is_rejected_as_the_official_package_rejects_it() -> None:
    secret = new_secret()
    body = event_body("token.minted", version=1, token="bst_x", token_id="tok-1")
    headers = signed_headers(body, secret, at=int(time.time()) - 6 * 60)
    with pytest.raises(WebhookRejected, match="too old"):
        WebhookVerifier([secret]).verify(headers, body)
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(secret).verify(body, headers)
    future = signed_headers(body, secret, at=int(time.time()) + 6 * 60)
    with pytest.raises(WebhookRejected, match="future"):
        WebhookVerifier([secret]).verify(future, body)
    # Within the tolerance it verifies; a narrower tolerance refuses the same delivery.
    recent = signed_headers(body, secret, at=int(time.time()) - 4 * 60)
    WebhookVerifier([secret]).verify(recent, body)
    with pytest.raises(WebhookRejected, match="too old"):
        WebhookVerifier([secret], timedelta(minutes=1)).verify(recent, body)


def test_tampering_with_body_id_or_timestamp_breaks_the_signature() -> None:
    secret = new_secret()
    body = event_body("token.revoked", version=2, token_id="tok-1")
    headers = signed_headers(body, secret)
    verifier = WebhookVerifier([secret])
    with pytest.raises(WebhookRejected, match="no webhook signature matches"):
        verifier.verify(headers, body.replace(b"tok-1", b"tok-2"))
    with pytest.raises(WebhookRejected, match="no webhook signature matches"):
        verifier.verify({**headers, "webhook-id": "msg_other"}, body)
    with pytest.raises(WebhookRejected, match="no webhook signature matches"):
        verifier.verify({**headers, "webhook-timestamp": str(int(headers["webhook-timestamp"]) - 1)}, body)
    with pytest.raises(WebhookRejected, match="no webhook signature matches"):
        WebhookVerifier([new_secret()]).verify(headers, body)


def test_malformed_headers_are_rejected_before_any_signature_check() -> None:
    secret = new_secret()
    body = b"{}"
    good = signed_headers(body, secret, webhook_id="msg_1")
    verifier = WebhookVerifier([secret])
    for name in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        with pytest.raises(WebhookRejected, match="missing"):
            verifier.verify({k: v for k, v in good.items() if k != name}, body)
    with pytest.raises(WebhookRejected, match="malformed webhook-timestamp"):
        verifier.verify({**good, "webhook-timestamp": "12.5"}, body)
    with pytest.raises(WebhookRejected, match="malformed webhook-id"):
        verifier.verify({**good, "webhook-id": "msg 1"}, body)
    # Twelve digits reach past year 9999 (found by tests/fuzz): refused as from the future, not an overflow.
    with pytest.raises(WebhookRejected, match="too far in the future"):
        verifier.verify({**good, "webhook-timestamp": "601793300106"}, body)
    # Signatures of other schemes and undecodable ones are skipped, not fatal: one good v1 signature is enough.
    noisy = {**good, "webhook-signature": "v1a,abc v1,%%% " + good["webhook-signature"]}
    assert verifier.verify(noisy, body).webhook_id == "msg_1"
    with pytest.raises(WebhookRejected, match="no webhook signature matches"):
        verifier.verify({**good, "webhook-signature": "v1a,abc v1,%%%"}, body)


def test_secrets_must_be_whsec_base64_of_24_to_64_bytes() -> None:
    for bad in ("", "secret", "whsec_***", "whsec_" + base64.b64encode(b"x" * 23).decode(), new_secret(65)):
        with pytest.raises(ValueError, match=r"whsec_|bytes|base64"):
            WebhookVerifier([bad])
    with pytest.raises(ValueError, match="at least one"):
        WebhookVerifier([])
    unpadded = new_secret(25).rstrip("=")
    body = b"{}"
    assert WebhookVerifier([unpadded]).verify(signed_headers(body, unpadded, webhook_id="msg_1"), body)
    assert "whsec_" not in repr(WebhookVerifier([unpadded]))


def test_sign_matches_the_reference_for_a_known_vector() -> None:
    # The example of the Standard Webhooks specification.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == expected
