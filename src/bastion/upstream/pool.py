"""Open upstream sessions, one per (server, identity), kept alive and reused across calls.

Each session lives in its own task (anyio requires a context to be exited by the task that entered it);
callers borrow the open ``mcp.Client``. Sessions close when idle (unless something ``keep``s them: a
resource subscription lives on its session), when their identity or server changes, or when the pool is
full and they are the least recently used. A stdio or HTTP+SSE session whose
caller profile declares sampling, elicitation or roots takes its calls in turns (``turn``), so a request
from the upstream reaches the caller whose call is waiting (see ``relay``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Callable, Coroutine, Generator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Final, cast

import anyio
import mcp_types as types
from anyio.abc import TaskGroup
from mcp import Client
from mcp.shared.exceptions import MCPError

from bastion import __version__
from bastion.domain.models import Server, Transport
from bastion.errors import BastionError, Unavailable
from bastion.net.outbound import OutboundPolicy
from bastion.upstream import refusals, relay
from bastion.upstream.breaker import Breakers
from bastion.upstream.budget import RetryBudgets
from bastion.upstream.notifications import UpstreamNotices
from bastion.upstream.refusals import FORBIDDEN, UNAUTHORIZED
from bastion.upstream.relay import NO_PROFILE, Profile
from bastion.upstream.transports import Credential, client_mode, open_transport

logger = logging.getLogger("bastion.upstream")
BACKSTOP_S: Final = 1.0  # the SDK's own request timeout runs this much longer than the server's call timeout
DEFAULT_MAX_SESSIONS: Final = 512
DEFAULT_IDLE_S: Final = 300.0
DEFAULT_PER_SERVER_CONCURRENCY: Final = 64
DEFAULT_PER_SERVER_QUEUE: Final = 256
DEFAULT_TURN_WAIT_S: Final = 60.0  # longest a call waits for a turn on a session whose calls take turns
BUSY_RETRY_AFTER_S: Final = 1
CLIENT_INFO: Final = types.Implementation(name="bastion", version=__version__)


class UpstreamUnavailable(Unavailable):
    code = "upstream_unavailable"
    status = 502
    title = "Upstream unavailable"


class UpstreamBusy(UpstreamUnavailable):
    """Every slot for this upstream is taken and the queue before it is full: refused at once, not queued."""

    code = "upstream_busy"
    status = 503
    title = "Upstream busy"
    retry_after_s = BUSY_RETRY_AFTER_S


class UpstreamFailing(UpstreamBusy):
    """The upstream kept failing, so its circuit is open: refused at once, with how long to wait (upstream/breaker)."""

    code = "upstream_failing"
    title = "Upstream failing"

    def __init__(self, detail: str, *, retry_after_s: int) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class UpstreamRefused(UpstreamUnavailable):
    """The upstream answered HTTP 401 to the credential a session was opening with (expired or revoked)."""

    code = "upstream_refused_credential"
    title = "Upstream refused the credential"

    def __init__(self, detail: str, *, generation: str | None) -> None:
        super().__init__(detail)
        self.generation = generation  # which access token was refused (refusals.generation), never the token


class UpstreamForbidden(UpstreamUnavailable):
    """The upstream answered HTTP 403 to a call: the credential stands, but not for this."""

    code = "upstream_forbidden"
    title = "Upstream refused the call"


def refused_by(alias: str, status: int, generation: str | None = None) -> UpstreamUnavailable:
    """What a call gets when upstream ``alias`` refuses it with ``status`` (401 or 403) and nothing renews it."""
    if status == FORBIDDEN:
        return UpstreamForbidden(f"upstream {alias!r} refused the call (HTTP {status})")
    return UpstreamRefused(f"upstream {alias!r} refused the credential (HTTP {status})", generation=generation)


@dataclass(frozen=True, slots=True)
class SessionKey:
    server_id: str
    server_reach: str  # ``Server.reach``: a description edit keeps the key, an edit of how it is reached does not
    identity_id: str | None
    profile: Profile = NO_PROFILE
    # Which access token of an OAuth identity the session carries: a refreshed token opens a new session,
    # and the old one closes when idle, so calls in flight on it are not cut off.
    generation: str | None = None


@dataclass(slots=True)
class _Session:
    key: SessionKey
    ready: anyio.Event = field(default_factory=anyio.Event)
    closing: anyio.Event = field(default_factory=anyio.Event)
    client: Client | None = None
    error: BaseException | None = None
    last_used: float = field(default_factory=time.monotonic)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    turns: relay.Turns | None = None  # set when the session's calls take turns
    session_id: str | None = None  # the Mcp-Session-Id a Streamable HTTP upstream gave it
    kept: int = 0  # how many ``Kept`` hold it open through idleness
    ended: anyio.Event = field(default_factory=anyio.Event)  # its client has closed, for whatever reason
    busy: int = 0  # calls on it now (``UpstreamPool.using``)
    draining: bool = False  # out of the pool: it closes when its last call ends

    protocol_version: str | None = None  # what the upstream negotiated, read once the session is open

    def lease(self, client: Client) -> Lease:
        return Lease(client, self.key, self.turns, self.session_id, self, self.protocol_version)

    def close(self) -> None:
        """Close now if no call is on it, else once the last one ends (out of the pool either way)."""
        if self.busy:
            self.draining = True
        else:
            self.closing.set()


@dataclass(frozen=True, slots=True)
class Lease:
    """An open session's client, and its turns when calls on it must run one at a time (``UpstreamPool.turn``)."""

    client: Client
    key: SessionKey
    turns: relay.Turns | None = None
    session_id: str | None = None  # the upstream's Mcp-Session-Id (Streamable HTTP, handshake era)
    session: _Session | None = field(default=None, repr=False, compare=False)
    # Kept from when the session opened: the hot path needs it even if the session closes under its call.
    protocol_version: str | None = None


@dataclass(eq=False, slots=True)
class Kept:
    """A session held open through idleness until ``release``; ``ended`` is set once it has closed anyway."""

    _session: _Session
    released: bool = False

    @property
    def ended(self) -> anyio.Event:
        return self._session.ended

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._session.kept -= 1


# Codes the SDK raises itself when a call ends without the upstream's answer.
_UNANSWERED: Final = frozenset({types.REQUEST_TIMEOUT, types.CONNECTION_CLOSED})


class SessionRetired(UpstreamUnavailable):
    """A call waited for its turn on a session that an unanswered call retired; a fresh session is safe to use."""

    code = "upstream_session_retired"


SessionFactory = Callable[[], Client]


class UpstreamPool:
    """Bounded pool of open upstream sessions. Use ``async with pool.running():`` in the app lifespan."""

    def __init__(
        self,
        *,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        idle_s: float = DEFAULT_IDLE_S,
        per_server_concurrency: int = DEFAULT_PER_SERVER_CONCURRENCY,
        per_server_queue: int = DEFAULT_PER_SERVER_QUEUE,
        outbound: OutboundPolicy | None = None,
        notices: UpstreamNotices | None = None,
        breakers: Breakers | None = None,
        retries: RetryBudgets | None = None,
    ) -> None:
        self._max = max_sessions
        # Which upstream servers keep failing: their calls are refused at once, then probed back.
        self.breakers = breakers or Breakers()
        # How many retries (after a renewal, in a fresh session) each server's calls have earned.
        self.retries = retries or RetryBudgets()
        # What HTTP upstreams may be reached; strict unless the settings opt in (wiring passes them).
        self.outbound = outbound or OutboundPolicy()
        # Where sessions' list_changed notifications go, tagged with the (server, identity) they came from.
        self.notices = notices or UpstreamNotices()
        self._idle_s = idle_s
        self._per_server = per_server_concurrency
        self._queue = per_server_queue
        self._sessions: dict[SessionKey, _Session] = {}
        self._limiters: dict[str, anyio.Semaphore] = {}
        self._tasks: TaskGroup | None = None
        self._discard_listeners: list[Callable[[str | None, str | None], None]] = []

    def __repr__(self) -> str:
        return f"UpstreamPool(open={len(self._sessions)})"

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    @asynccontextmanager
    async def running(self) -> AsyncGenerator[UpstreamPool, None]:
        async with anyio.create_task_group() as tasks:
            self._tasks = tasks
            tasks.start_soon(self._reap_idle)
            try:
                yield self
            finally:
                self._tasks = None
                for session in list(self._sessions.values()):
                    session.closing.set()
                tasks.cancel_scope.cancel()

    def limiter(self, server_id: str) -> anyio.Semaphore:
        limiter = self._limiters.get(server_id)
        if limiter is None:
            # Taken without a trip through the event loop while a slot is free: a call's every microsecond counts.
            limiter = self._limiters[server_id] = anyio.Semaphore(self._per_server, fast_acquire=True)
        return limiter

    @asynccontextmanager
    async def slot(self, server_id: str) -> AsyncGenerator[None]:
        """One of the upstream's concurrent call slots, waiting in a bounded queue for it.

        Raises:
            UpstreamBusy: every slot is taken and the queue is full (a slow upstream cannot pile up callers).
            UpstreamFailing: the upstream kept failing (its circuit is open); or another call is probing it.
        """
        self._refuse_if_failing(server_id, probe=True)
        limiter = self.limiter(server_id)
        try:
            if limiter.value < 1 and limiter.statistics().tasks_waiting >= self._queue:
                raise UpstreamBusy("this upstream server is at its limit of concurrent calls; retry shortly")
            async with limiter:
                self.retries.called(server_id)
                yield
        except BaseException as exc:
            # The upstream not answering is a failure; any answer, even an error or a refusal, is not; a call that
            # never went (busy) or was called off says nothing of it.
            if isinstance(exc, TimeoutError | OSError) or type(exc) is UpstreamUnavailable:
                self.breakers.failed(server_id)
            elif isinstance(exc, UpstreamBusy | anyio.get_cancelled_exc_class()):
                self.breakers.abandoned(server_id)
            else:
                self.breakers.succeeded(server_id)
            raise
        self.breakers.succeeded(server_id)

    def _refuse_if_failing(self, server_id: str, *, probe: bool) -> None:
        wait_s = self.breakers.refusal(server_id, probe=probe)
        if wait_s is not None:
            raise UpstreamFailing(
                f"this upstream server keeps failing; calls to it are refused for {wait_s} s", retry_after_s=wait_s
            )

    async def client(
        self, server: Server, credential: Credential, profile: Profile = NO_PROFILE, *, generation: str | None = None
    ) -> Client:
        """An open session's client for ``server`` as ``credential``, opening one if needed (see ``lease``)."""
        return (await self.lease(server, credential, profile, generation=generation)).client

    async def lease(
        self, server: Server, credential: Credential, profile: Profile = NO_PROFILE, *, generation: str | None = None
    ) -> Lease:
        """An open session for ``server`` as ``credential``, opening one if needed.

        Raises:
            UpstreamRefused: the upstream answered 401 to the credential.
            UpstreamUnavailable: the upstream could not be reached or refused the handshake.
        """
        key = SessionKey(server.id, server.reach, credential.identity_id, profile, generation)
        session = self._sessions.get(key)
        if session is None:
            self._refuse_if_failing(server.id, probe=False)
            session = self._open(key, server, credential)
        with anyio.move_on_after(server.connect_timeout_s + 1.0):
            await session.ready.wait()
        if not session.ready.is_set():
            session.scope.cancel()
            if self._sessions.pop(key, None) is not None:  # counted once, not once per waiter
                self.breakers.failed(server.id)
            raise UpstreamUnavailable(f"upstream {server.name!r} did not answer within {server.connect_timeout_s:g} s")
        if session.error is not None or session.client is None:
            self._sessions.pop(key, None)
            if isinstance(session.error, UpstreamRefused):  # a new exception per waiter: each raises its own
                raise UpstreamRefused(str(session.error), generation=session.error.generation)
            raise UpstreamUnavailable(f"upstream {server.name!r} is unavailable: {_describe(session.error)}")
        session.last_used = time.monotonic()
        return session.lease(session.client)

    def cached(
        self, server: Server, identity_id: str | None, profile: Profile = NO_PROFILE, generation: str | None = None
    ) -> Client | None:
        """The open session's client for (server, identity, profile) if there is one (see ``cached_lease``)."""
        lease = self.cached_lease(server, identity_id, profile, generation)
        return lease.client if lease is not None else None

    def cached_lease(
        self, server: Server, identity_id: str | None, profile: Profile = NO_PROFILE, generation: str | None = None
    ) -> Lease | None:
        """The open session for (server, identity, profile) if there is one: the hot path needs no credential lookup."""
        key = SessionKey(server.id, server.reach, identity_id, profile, generation)
        session = self._sessions.get(key)
        if session is None or session.client is None:
            return None
        session.last_used = time.monotonic()
        return session.lease(session.client)

    @contextmanager
    def using(self, lease: Lease) -> Generator[None]:
        """One call on ``lease``'s session: an edit that takes the session out of the pool meanwhile (its server or
        identity changed) closes it only once its calls have ended, so none is cut off."""
        session = lease.session
        if session is None:
            yield
            return
        session.busy += 1
        try:
            yield
        finally:
            session.busy -= 1
            if session.draining and not session.busy:
                session.closing.set()

    def forget(self, lease: Lease) -> None:
        """Close ``lease``'s session (its upstream no longer knows it); the next call opens a fresh one."""
        session = self._sessions.get(lease.key)
        if session is not None and session.client is lease.client:
            self._sessions.pop(lease.key, None)
            session.closing.set()

    @asynccontextmanager
    async def turn(self, lease: Lease, wait_s: float = DEFAULT_TURN_WAIT_S) -> AsyncGenerator[None]:
        """Hold ``lease``'s session for one call of the current downstream request, if its calls take turns.

        The caller waiting here is the one the upstream's requests are relayed to until the call ends. A call
        that ends unanswered retires the session: the upstream may still ask on its behalf.

        Raises:
            UpstreamBusy: as many calls as the per-server queue allows already wait for this session, or the
                turn did not come within ``wait_s`` (an agent answering a sampling request by calling the same
                server again would otherwise wait for its own call).
            SessionRetired: the session was retired while this call waited for its turn.
        """
        turns = lease.turns
        if turns is None:
            yield
            return
        if turns.lock.locked() and turns.lock.statistics().tasks_waiting >= self._queue:
            raise UpstreamBusy("this upstream session is at its limit of waiting calls; retry shortly")
        acquired = False
        with anyio.move_on_after(wait_s):
            await turns.lock.acquire()
            acquired = True
        if not acquired:
            raise UpstreamBusy("another call on this upstream session is still running; retry shortly")
        try:
            if turns.retired:
                raise SessionRetired("the upstream session was closed after an unanswered call; retry")
            turns.caller = relay.downstream.get()
            answered = False
            try:
                yield
                answered = True
            except MCPError as exc:
                answered = exc.code not in _UNANSWERED
                raise
            except UpstreamBusy:
                answered = True  # refused before anything reached the upstream
                raise
            finally:
                turns.caller = None
                if not answered:
                    self._retire(lease.key, turns)
        finally:
            turns.lock.release()

    def _retire(self, key: SessionKey, turns: relay.Turns) -> None:
        turns.retired = True
        session = self._sessions.get(key)
        if session is not None and session.turns is turns:
            self._sessions.pop(key, None)
            session.closing.set()

    def keep(self, client: Client) -> Kept | None:
        """Hold ``client``'s session open through idleness until released; None: it is no longer in the pool."""
        session = next((s for s in self._sessions.values() if s.client is client), None)
        if session is None:
            return None
        session.kept += 1
        return Kept(session)

    def negotiated(self, server: Server) -> str | None:
        """The protocol version any open session to this server (as it is reached now) negotiated, if there is one."""
        for key, session in self._sessions.items():
            if key.server_id == server.id and key.server_reach == server.reach and session.protocol_version:
                return session.protocol_version
        return None

    def on_discard(self, callback: Callable[[str | None, str | None], None]) -> None:
        """Also tell ``callback(server_id, identity_id)`` when sessions are discarded."""
        self._discard_listeners.append(callback)

    def close_later(self, close: Callable[[], Coroutine[Any, Any, None]]) -> bool:
        """Run something in the pool's task group (callers may be synchronous event handlers, or need it to outlive
        their request); False: the pool is not running, so it will not run."""
        if self._tasks is None:
            return False
        self._tasks.start_soon(close)
        return True

    def discard(self, server_id: str | None = None, identity_id: str | None = None) -> None:
        """Close sessions of a server or an identity (its credential or settings changed)."""
        for listener in self._discard_listeners:
            listener(server_id, identity_id)
        for key, session in list(self._sessions.items()):
            if (server_id is not None and key.server_id == server_id) or (
                identity_id is not None and key.identity_id == identity_id
            ):
                self._sessions.pop(key, None)
                session.close()  # calls on it end first; new ones open a fresh session

    def discard_all(self) -> None:
        for server_id in {key.server_id for key in self._sessions}:
            self.discard(server_id=server_id)

    def _open(self, key: SessionKey, server: Server, credential: Credential) -> _Session:
        if self._tasks is None:
            raise UpstreamUnavailable("the upstream pool is not running")
        if len(self._sessions) >= self._max:
            # A kept session (a subscription lives on it) goes only when every session is kept.
            unkept = [s for s in self._sessions.values() if not s.kept] or list(self._sessions.values())
            oldest = min(unkept, key=lambda s: s.last_used)
            self._sessions.pop(oldest.key, None)
            oldest.close()
        session = _Session(key)
        if relay.serializes(server.transport, key.profile):
            session.turns = relay.Turns()
        self._sessions[key] = session
        self._tasks.start_soon(self._hold, session, server, credential)
        return session

    async def _hold(self, session: _Session, server: Server, credential: Credential) -> None:
        # This task inherited the context of the call that opened the session; over stdio and SSE the SDK runs
        # callbacks in the reader task started here, so they would talk to that first caller, whoever calls later.
        # A session whose calls take turns tags each message it reads with the caller whose turn it is instead.
        relay.downstream.set(None)

        def seen(session_id: str) -> None:
            session.session_id = session.session_id or session_id

        transport = open_transport(server, credential, self.outbound, seen)
        if session.turns is not None:
            transport = relay.tagged(transport, session.turns)
        refusal = refusals.watch()  # this session's own requests (the handshake) report a 401 here
        with session.scope:
            try:
                async with Client(
                    transport,
                    mode="legacy" if server.transport is Transport.SSE else client_mode(server),  # type: ignore[arg-type]
                    # A backstop: a call's own timeout is Bastion's (``Proxy``), the same error on every relay.
                    read_timeout_seconds=server.call_timeout_s + BACKSTOP_S,
                    client_info=CLIENT_INFO,
                    cache=None,
                    message_handler=self.notices.handler(session.key.server_id, session.key.identity_id),
                    **relay.callbacks(session.key.profile),
                ) as client:
                    session.client = client
                    session.protocol_version = client.protocol_version
                    session.ready.set()
                    await session.closing.wait()
            except Exception as exc:  # noqa: BLE001  reported to the waiting caller, never raised in the pool task
                session.error = exc
                if refusal.seen:
                    session.error = refused_by(server.name, UNAUTHORIZED, refusal.generation)
                else:  # no session, or one the upstream dropped: it is not answering
                    self.breakers.failed(server.id)
                logger.info(
                    "upstream session ended", extra={"server_id": session.key.server_id, "error": _describe(exc)}
                )
            finally:
                session.client = None
                session.ready.set()
                session.ended.set()
                if self._sessions.get(session.key) is session:
                    self._sessions.pop(session.key, None)

    async def _reap_idle(self) -> None:
        while True:
            await anyio.sleep(max(self._idle_s / 4, 1.0))
            self.reap_idle(time.monotonic())

    def reap_idle(self, now: float) -> None:
        """Close the sessions unused for longer than the idle time at ``now`` (monotonic), except kept ones."""
        cutoff = now - self._idle_s
        for key, session in list(self._sessions.items()):
            if session.ready.is_set() and not session.kept and not session.busy and session.last_used < cutoff:
                self._sessions.pop(key, None)
                session.closing.set()


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "no session"
    error = _innermost(error)
    if isinstance(error, TimeoutError):
        return "timed out while connecting"
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text[:200]


def _innermost(error: BaseException) -> BaseException:
    """What the SDK's task groups wrapped: one of our own errors (an outbound policy refusal) before any other."""
    if not isinstance(error, BaseExceptionGroup):
        return error
    group = cast("BaseExceptionGroup[BaseException]", error)
    leaves = [_innermost(inner) for inner in group.exceptions]
    return next((leaf for leaf in leaves if isinstance(leaf, BastionError)), leaves[0] if leaves else group)
