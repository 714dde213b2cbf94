"""Fuzz targets: Bastion's parsers of what strangers send, each fed raw bytes.

A target returns, or raises the one refusal its parser documents (a ``VaultError``, ``WebhookRejected``,
``ValidationFailed``...); any other exception is a crash. ``tests/fuzz/run.py`` drives them with atheris;
``test_fuzz.py`` replays every input under ``corpus/<target>/`` (the seeds, and any crash found since, kept as a
regression) and runs a short fuzz of each target with a fixed seed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final

from bastion.domain import importing
from bastion.domain import tokens as token_format
from bastion.errors import ValidationFailed
from bastion.oauth.challenge import parse_www_authenticate
from bastion.pipeline.answers import answer_status
from bastion.pipeline.frames import EVENT_END, fields
from bastion.types import json_object
from bastion.vault.crypto import Keyring, VaultError, parse
from bastion.vault.sealer import Binding, Vault
from bastion_agent import WebhookRejected, WebhookVerifier, parse_event

PREFIXES: Final = (
    token_format.ACCESS_TOKEN_PREFIX,
    token_format.API_KEY_PREFIX,
    token_format.LINK_PREFIX,
    token_format.HOST_KEY_PREFIX,
    token_format.CLAIM_CODE_PREFIX,
)
WEBHOOK_SECRET: Final = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # a fixed test secret, base64 of 24 bytes
NOW: Final = datetime(2026, 12, 7, tzinfo=UTC)
VAULT: Final = Vault(Keyring({"k1": bytes(range(32))}, "k1"))
VERIFIER: Final = WebhookVerifier([WEBHOOK_SECRET])


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def credentials(data: bytes) -> None:
    """A presented token (each prefix: access token, API key, link, host key, claim code) and an upstream's
    ``WWW-Authenticate`` header values."""
    text = _text(data)
    for prefix in PREFIXES:
        if token_format.well_formed(text, prefix):
            assert token_format.last4(text) == text[-4:]
    for challenge in parse_www_authenticate(text.split("\n")):
        assert challenge.scheme == challenge.scheme.lower()


def ciphertext(data: bytes) -> None:
    """A sealed value as stored: the envelope, and opening it as an identity's wrapped key and secret."""
    try:
        envelope = parse(data)
    except VaultError:
        return
    assert len(envelope.nonce) == 12
    cut = len(data) // 2
    for binding in (None, Binding("server", "owner")):
        with contextlib.suppress(VaultError):
            VAULT.open("ws", "identity", data[:cut], data[cut:], binding)


def webhook(data: bytes) -> None:
    """A webhook delivery as the agent SDK receives it: three header lines (id, timestamp, signature), then the
    body; verified, and parsed as an event."""
    lines = data.split(b"\n", 3)
    names = ("webhook-id", "webhook-timestamp", "webhook-signature")
    headers = {name: _text(value) for name, value in zip(names, lines, strict=False)}
    body = lines[3] if len(lines) > 3 else b""
    with contextlib.suppress(WebhookRejected):
        VERIFIER.verify(headers, body, now=NOW)
    with contextlib.suppress(ValueError):
        parse_event(body)


def data_plane(data: bytes) -> None:
    """What the data plane decodes: a POSTed JSON-RPC body, and an upstream's answer as an SSE stream."""
    message = json_object(data)
    if message is not None:
        answer_status(message)
    start = 0
    while (end := EVENT_END.search(data, start)) is not None:
        payload, _event_id, retry_ms, _comment = fields(data[start : end.start()])
        assert retry_ms is None or retry_ms >= 0
        event = json_object(payload)
        if event is not None:
            answer_status(event)
        start = end.end()


def import_file(data: bytes) -> None:
    """A Claude Desktop, Cursor or VS Code config file given to `bastion server import`."""
    with contextlib.suppress(ValidationFailed):
        importing.parse(_text(data))


TARGETS: Final[dict[str, Callable[[bytes], None]]] = {
    "credentials": credentials,
    "ciphertext": ciphertext,
    "webhook": webhook,
    "data_plane": data_plane,
    "import_file": import_file,
}
