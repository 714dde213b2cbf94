"""The janitor: what expires is deleted on a schedule, not only when someone happens to pass by.

Expired enrollment drafts (their sealed tokens with them), long-expired OAuth states (connecting upstreams and
signing in) and web sessions that can no longer be used are otherwise only cleaned in passing, by the next
person who starts or finishes something. ``run`` sweeps every ``interval_s`` for as long as the app serves
(one task per process; the deletes are idempotent, so replicas may overlap). A failing sweep is logged by
name and error type only (never a value: statements may carry digests) and tried again next time.

It also announces tokens about to expire (`tokens.announce_expiring`), handing their hosts successors.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, NoReturn

import anyio

from bastion.db import changes
from bastion.db.store import Store
from bastion.oauth.revocation import Revoker
from bastion.services import enrollment, oauth_connect, sessions, sso, tokens
from bastion.services.apikeys import KeyHasher
from bastion.services.sessions import Lifetimes

__all__ = ["DEFAULT_INTERVAL_S", "Swept", "run", "sweep"]

logger = logging.getLogger("bastion.janitor")

DEFAULT_INTERVAL_S: Final = 300.0


@dataclass(frozen=True, slots=True)
class Swept:
    """How many rows one sweep deleted, per kind; None where that part failed (it is logged)."""

    drafts: int | None
    oauth_states: int | None
    sign_in_states: int | None
    sessions: int | None
    change_log: int | None = 0  # rows of the embedded database's change log older than an hour (db/changes.py)
    expiring: int | None = 0  # tokens announced as expiring (not deleted: tokens.announce_expiring)


async def _part(name: str, work: Callable[[], Awaitable[int]]) -> int | None:
    try:
        return await work()
    except Exception as exc:  # noqa: BLE001  one part failing must stop neither the others nor the process
        logger.warning("janitor: sweeping %s failed (%s); tried again next time", name, type(exc).__name__)
        return None


async def sweep(
    store: Store, lifetimes: Lifetimes, revoker: Revoker | None = None, hasher: KeyHasher | None = None
) -> Swept:
    """Delete everything expired once; each part on its own, so one failing leaves the others done.

    ``revoker``: revokes the OAuth grants expired enrollment drafts held (RFC 7009). ``hasher``: announces tokens
    about to expire too (it mints their successors).
    """
    return Swept(
        drafts=await _part("enrollment drafts", lambda: enrollment.sweep(store, revoker, lifetimes)),
        oauth_states=await _part("OAuth states", lambda: oauth_connect.purge_states(store)),
        sign_in_states=await _part("sign-in states", lambda: sso.purge_states(store)),
        sessions=await _part("web sessions", lambda: sessions.sweep(store, lifetimes)),
        change_log=await _part("change log", lambda: _prune_changes(store)),
        expiring=await _part("expiring tokens", lambda: tokens.announce_expiring(store, hasher)) if hasher else 0,
    )


async def _prune_changes(store: Store) -> int:
    async with store.transaction() as conn:
        return await changes.prune(conn)


async def run(
    store: Store,
    lifetimes: Lifetimes,
    *,
    interval_s: float = DEFAULT_INTERVAL_S,
    revoker: Revoker | None = None,
    hasher: KeyHasher | None = None,
) -> NoReturn:
    """Sweep every ``interval_s`` (the first after one interval: starting up stays quick) until cancelled.

    Cancellation (shutdown) lands between sweeps: a sweep is shielded, as a transaction cancelled halfway
    could leave its connection (and on SQLite, the write lock) to nobody.
    """
    while True:
        await anyio.sleep(interval_s)
        with anyio.CancelScope(shield=True):
            await _sweep_and_log(store, lifetimes, revoker, hasher)


async def _sweep_and_log(store: Store, lifetimes: Lifetimes, revoker: Revoker | None, hasher: KeyHasher | None) -> None:
    swept = await sweep(store, lifetimes, revoker, hasher)
    counts = {
        "drafts": swept.drafts,
        "oauth_states": swept.oauth_states,
        "sign_in_states": swept.sign_in_states,
        "sessions": swept.sessions,
        "change_log": swept.change_log,
    }
    deleted = {name: count for name, count in counts.items() if count}
    if deleted:
        logger.info("janitor: deleted expired rows", extra=deleted)
    if swept.expiring:
        logger.info("janitor: announced tokens about to expire", extra={"tokens": swept.expiring})
