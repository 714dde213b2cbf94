"""The webhook receiver, an ASGI app: verify, deduplicate, redeem the claim code, apply to the map, then answer 2xx.

Answers (a non-2xx answer makes Bastion retry the delivery later, with the same webhook-id):
- 200 once the event is committed to the map, or when its webhook-id was applied before (an event whose claim code
  Bastion refuses for good, being used, revoked or another host's, is applied without its token: a retry would
  carry the same code);
- 400 for a body that verified but is not an event, 401 for a delivery that does not verify (signature, timestamp
  outside the tolerance, missing headers), 405 for anything but POST, 413 for an oversized body;
- 503 when the map or Bastion (redeeming a claim code) failed for now: the retry will find them back.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any, Final

from bastion_agent._claims import ClaimRedeemer
from bastion_agent._errors import ClaimFailed, WebhookRejected
from bastion_agent._events import CONNECTION_EVENTS, MAX_BODY_BYTES, Event, parse_event
from bastion_agent._map import Applied, Delivered, TokenMap
from bastion_agent._signing import DEFAULT_TOLERANCE, WebhookVerifier

logger = logging.getLogger("bastion_agent.webhooks")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
EventHook = Callable[[Event, Applied], Awaitable[None]]
_JSON: Final = [(b"content-type", b"application/json")]


class _TooLarge(Exception):
    pass


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _answer(send: Send, status: int, body: Mapping[str, object]) -> None:
    raw = json.dumps(body).encode("utf-8")
    headers = [*_JSON, (b"content-length", str(len(raw)).encode("ascii"))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": raw})


class WebhookReceiver:
    """An ASGI app receiving one host's Bastion webhooks into a ``TokenMap``.

    Args:
        token_map: where events land.
        secrets: the endpoint's ``whsec_…`` signing secrets; give both during a rotation.
        redeemer: redeems claim codes (needed when the host delivers claim codes rather than tokens).
        tolerance: how far a delivery's timestamp may be from now (replays older than this are refused).
        on_event: awaited after each event is committed (not for duplicates), e.g. to log or notify.
    """

    def __init__(
        self,
        token_map: TokenMap,
        secrets: Iterable[str],
        *,
        redeemer: ClaimRedeemer | None = None,
        tolerance: timedelta = DEFAULT_TOLERANCE,
        max_body_bytes: int = MAX_BODY_BYTES,
        on_event: EventHook | None = None,
    ) -> None:
        self.token_map = token_map
        self._verifier = WebhookVerifier(secrets, tolerance)
        self._redeemer = redeemer
        self._max_body_bytes = max_body_bytes
        self._on_event = on_event

    def __repr__(self) -> str:
        return f"WebhookReceiver({self.token_map!r}, {self._verifier!r})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # served on its own (not mounted): nothing to start or stop
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        if scope["method"] != "POST":
            await _answer(send, 405, {"error": "method_not_allowed", "detail": "webhooks are POSTed"})
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._max_body_bytes:
            await _answer(send, 413, {"error": "too_large", "detail": f"at most {self._max_body_bytes} bytes"})
            return
        try:
            body = await _read_body(receive, self._max_body_bytes)
        except _TooLarge:
            await _answer(send, 413, {"error": "too_large", "detail": f"at most {self._max_body_bytes} bytes"})
            return
        status, answer = await self.handle(headers, body)
        await _answer(send, status, answer)

    async def handle(self, headers: Mapping[str, str], body: bytes) -> tuple[int, dict[str, object]]:
        """One delivery, from its lower-cased headers and raw body: the HTTP status and JSON to answer with."""
        try:
            verified = self._verifier.verify(headers, body)
        except WebhookRejected as exc:
            logger.warning("webhook delivery refused: %s", exc)
            return 401, {"error": "invalid_signature", "detail": str(exc)}
        try:
            event = parse_event(body)
        except ValueError as exc:
            logger.warning("webhook %s is not a Bastion event: %s", verified.webhook_id, exc)
            return 400, {"error": "invalid_event", "detail": str(exc)}
        refused: ClaimFailed | None = None
        try:
            if await self.token_map.seen(verified.webhook_id):
                return 200, {"status": "duplicate"}
            try:
                delivered = await self._claim(event)
            except ClaimFailed as exc:
                if exc.retryable:
                    raise
                # Used, expired, revoked or another host's: a retry would carry the same code, so the event is applied
                # without its token and the person shows as enrolled without one (NotEnrolled "no_token").
                refused, delivered = exc, None
            applied = await self.token_map.apply(event, webhook_id=verified.webhook_id, delivered=delivered)
        except ClaimFailed as exc:
            logger.warning("webhook %s (%s): %s", verified.webhook_id, event.type, exc)
            # Bastion unreachable or failing (or the host key refused): a 503 holds the queue until it answers again.
            return 503, {"error": "claim_failed", "detail": str(exc)}
        except Exception:
            logger.exception("webhook %s (%s) could not be applied", verified.webhook_id, event.type)
            return 503, {"error": "unavailable", "detail": "the event could not be stored; retry later"}
        if applied.duplicate:
            return 200, {"status": "duplicate"}
        if self._on_event is not None:
            try:
                await self._on_event(event, applied)
            except Exception:
                logger.exception("the on_event hook failed for webhook %s", verified.webhook_id)
        if refused is not None:
            logger.warning("webhook %s (%s) applied without its token: %s", verified.webhook_id, event.type, refused)
            return 200, {"status": "applied_without_token", "detail": str(refused)}
        return 200, {"status": "applied" if applied.changed else "unchanged"}

    async def _claim(self, event: Event) -> Delivered | None:
        if event.claim_code is None or event.type not in CONNECTION_EVENTS or event.type == "token.revoked":
            return None
        if self._redeemer is None:
            raise ClaimFailed("the event carries a claim code but this receiver has no host key", retryable=True)
        return await self._redeemer.redeem(event.claim_code, connection_id=event.connection_id)
