"""Delivering webhook events: one signed POST per attempt, and the worker that drains the outbox.

Every request goes through the outbound URL policy (https only, internal addresses refused, each connection pinned
to a checked address) with a connect timeout and a total deadline; a redirect is a failure, never followed; only a
2xx answer counts as delivered, and the answer's body is never read. The worker leases due rows (so replicas do
not attempt the same row twice), attempts each endpoint's rows in order, and when an endpoint is down puts its
later rows back behind the failed one. It wakes when a change commits an event (on this replica, or on another one
through PostgreSQL NOTIFY) and otherwise when the next retry is due, polling at least every ``poll_s``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, NoReturn

import anyio
import httpx2

from bastion.db.store import Store
from bastion.domain.ids import new_id
from bastion.domain.webhooks import (
    CONNECT_TIMEOUT_S,
    TOTAL_TIMEOUT_S,
    Attempt,
    TokenDelivery,
    Trigger,
    answered,
    body_bytes,
    failed,
    message_id,
    signed_headers,
)
from bastion.events.bus import Changed, Subject
from bastion.net.outbound import OutboundPolicy, UrlRefused
from bastion.services import claims, endpoints, outbox
from bastion.services.outbox import Message
from bastion.vault.sealer import Vault

logger = logging.getLogger("bastion.webhooks")

DEFAULT_POLL_S: Final = 5.0
DEFAULT_BATCH: Final = 50
DEFAULT_CONCURRENCY: Final = 8  # endpoints attempted at once by one worker
LEASE: Final = timedelta(seconds=TOTAL_TIMEOUT_S * 4)
SWEEP_EVERY: Final = timedelta(minutes=5)

Post = Callable[[str, dict[str, str], bytes], Awaitable[Attempt]]


@dataclass(frozen=True, slots=True)
class Sender:
    """What an attempt needs besides the database: the vault, the outbound policy and the gateways' public URL."""

    vault: Vault
    policy: OutboundPolicy
    public_url: str | None = None

    def client(self) -> httpx2.AsyncClient:
        return self.policy.client(timeout=httpx2.Timeout(TOTAL_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))

    def poster(self, client: httpx2.AsyncClient) -> Post:
        async def post(url: str, headers: dict[str, str], body: bytes) -> Attempt:
            return await _post(client, url, headers, body)

        return post


async def _post(client: httpx2.AsyncClient, url: str, headers: dict[str, str], body: bytes) -> Attempt:
    started = time.monotonic()

    def elapsed() -> int:
        return int((time.monotonic() - started) * 1000)

    try:
        with anyio.fail_after(TOTAL_TIMEOUT_S):
            # Streamed and closed unread: a receiver's answer is its status, however much it sends.
            async with client.stream("POST", url, headers=headers, content=body) as response:
                return answered(response.status_code, elapsed())
    except TimeoutError:
        return failed("timeout", elapsed())
    except UrlRefused as exc:
        return failed(f"url_refused ({exc.rule})", elapsed())
    except httpx2.TimeoutException:
        return failed("timeout", elapsed())
    except httpx2.HTTPError as exc:
        return failed(type(exc).__name__, elapsed())
    except OSError as exc:
        return failed(type(exc).__name__, elapsed())


async def attempt(store: Store, sender: Sender, post: Post, message: Message, *, now: datetime) -> Attempt:
    """Sign and send one row now: the secret it carries is opened, a claim code's life starts over."""
    token: str | None = None
    code: str | None = None
    claim_expires_at: datetime | None = None
    async with store.transaction() as conn:
        live = await endpoints.live_secrets(conn, sender.vault, message.endpoint_id, now)
        if message.dek_wrapped is not None and message.secret_sealed is not None:
            opened = sender.vault.open(message.workspace_id, message.id, message.dek_wrapped, message.secret_sealed)
            if message.secret_kind == TokenDelivery.CLAIM_CODE.value:
                code = opened.token
                claim_expires_at = await claims.extend(conn, message.claim_id, now) if message.claim_id else None
            else:
                token = opened.token
    if not live:
        return failed("no_signing_secret", 0)
    body = body_bytes(
        message.payload, public_url=sender.public_url, token=token, claim_code=code, claim_expires_at=claim_expires_at
    )
    headers = signed_headers(live, message_id(message.event_id), int(now.timestamp()), body)
    return await post(message.url, headers, body)


class Worker:
    """Drains the outbox until cancelled. One per process; several processes share a PostgreSQL database safely."""

    def __init__(
        self,
        store: Store,
        sender: Sender,
        *,
        poll_s: float = DEFAULT_POLL_S,
        batch: int = DEFAULT_BATCH,
        concurrency: int = DEFAULT_CONCURRENCY,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.sender = sender
        self.poll_s = poll_s
        self.batch = batch
        self.owner = f"worker:{new_id()}"
        # Jitter spreads retries; it guards no secret, so a seeded generator is fine (tests pass one).
        self.rng = rng or random.Random()  # noqa: S311
        self._limit = anyio.CapacityLimiter(concurrency)
        self._wake = anyio.Event()
        self._last_sweep: datetime | None = None

    def __repr__(self) -> str:
        return f"Worker(owner={self.owner!r})"

    def wake(self) -> None:
        self._wake.set()

    def _on_change(self, event: Changed) -> None:
        if event.subject in (Subject.WEBHOOK, Subject.ALL):
            self._wake.set()

    async def run(self) -> NoReturn:
        unsubscribe = self.store.bus.subscribe(self._on_change)
        try:
            async with self.sender.client() as client:
                post = self.sender.poster(client)
                while True:
                    self._wake = anyio.Event()
                    try:
                        while await self.run_once(post) >= self.batch:
                            pass
                        await self._maybe_sweep()
                        wait = await self._idle_s()
                    except Exception as exc:  # noqa: BLE001  the worker outlives a database blip; rows stay queued
                        logger.warning("webhook worker: a round failed (%s); trying again", type(exc).__name__)
                        wait = self.poll_s
                    with anyio.move_on_after(wait):
                        await self._wake.wait()
        finally:
            unsubscribe()

    async def _idle_s(self) -> float:
        now = datetime.now(UTC)
        due = await outbox.next_due(self.store, now)
        if due is None:
            return self.poll_s
        return min(self.poll_s, max(0.0, (due - now).total_seconds()))

    async def _maybe_sweep(self) -> None:
        now = datetime.now(UTC)
        if self._last_sweep is None or now - self._last_sweep >= SWEEP_EVERY:
            self._last_sweep = now
            await outbox.sweep(self.store, now)

    async def run_once(self, post: Post) -> int:
        """Lease one batch of due rows and attempt them; returns how many rows were leased."""
        now = datetime.now(UTC)
        leased = await outbox.lease_due(self.store, self.owner, now, limit=self.batch, lease=LEASE)
        by_endpoint: dict[str, list[Message]] = {}
        for message in leased:
            by_endpoint.setdefault(message.endpoint_id, []).append(message)
        async with anyio.create_task_group() as tasks:
            for messages in by_endpoint.values():
                tasks.start_soon(self._endpoint, post, messages)
        return len(leased)

    async def _endpoint(self, post: Post, messages: list[Message]) -> None:
        async with self._limit:
            for n, message in enumerate(messages):
                now = datetime.now(UTC)
                result = await attempt(self.store, self.sender, post, message, now=now)
                recorded = await outbox.record(
                    self.store, message, result, owner=self.owner, now=now, trigger=Trigger.SCHEDULED, rng=self.rng
                )
                if not result.delivered:
                    logger.info(
                        "webhook attempt failed",
                        extra={"endpoint": message.endpoint_id, "event": message.event_id, "error": result.error},
                    )
                if result.endpoint_down:
                    rest = [m.id for m in messages[n + 1 :]]
                    await outbox.postpone(self.store, rest, self.owner, recorded.retry_at or now, now)
                    return
