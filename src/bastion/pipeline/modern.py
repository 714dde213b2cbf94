"""The byte relay of a 2026-era `tools/call` to a 2026-era Streamable HTTP upstream.

Both ends speak the same stateless era, so rebuilding the request through an SDK server and an SDK client (most of
a call's CPU) adds nothing: once admitted, the call is sent as bytes with only ``params.name``, the ``Mcp-Name``
header and the credential changed, and the upstream's answer (JSON or SSE, progress included) streams back through
``AnswerRelay``. An upstream 401 renews the token and is sent again once; a 401 or 403 that stands becomes a
JSON-RPC error, never the upstream's challenge.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final, cast

import anyio

from bastion.domain.connections import Principal
from bastion.errors import BastionError
from bastion.net.outbound import UrlRefused
from bastion.pipeline import headers
from bastion.pipeline.admission import Admission, Upstream, call_record, send_error
from bastion.pipeline.answers import AnswerRelay, Receive, Send
from bastion.pipeline.errors import answer_too_large, refused, to_jsonrpc, upstream_failure
from bastion.pipeline.frames import AnswerTooLarge
from bastion.services.audit import CallRecord
from bastion.services.directory import Mounted
from bastion.upstream.pool import UpstreamBusy
from bastion.upstream.refusals import FORBIDDEN, UNAUTHORIZED
from bastion.upstream.wire import WireResponse

logger = logging.getLogger("bastion.fastpath")
HANG_UP_CHECK_S: Final = 0.25  # a call still out after this long watches for its caller hanging up


class ModernRelay:
    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._proxy = admission.proxy
        self._pool = admission.pool

    async def call(
        self,
        request_headers: list[tuple[bytes, bytes]],
        message: dict[str, Any],
        principal: Principal,
        mounted: Mounted,
        tool: str,
        declared: Any,
        send: Send,
        receive: Receive,
    ) -> None:
        """Admit the call ``message`` (a `tools/call` routed to ``tool`` at ``mounted``) and relay it; a caller that
        hangs up meanwhile cancels it (the upstream's request is closed, which is how a 2026-era call is cancelled)."""
        call: dict[str, Any] = message["params"]
        name: str = call["name"]
        arguments: Any = call.get("arguments")
        given = cast("dict[str, Any]", arguments) if isinstance(arguments, dict) else None
        record = call_record(principal, name, call)
        async with self._admission.audit.call(record):
            try:
                admitted = await self._admission.admit(principal, mounted, tool, record, given)
                upstream, current = await self._admission.upstream(principal, mounted)
            except BastionError as exc:
                record.failed(exc.code)
                await send_error(send, message["id"], to_jsonrpc(exc).error)
                return
            call["name"] = tool
            if admitted.arguments is not given:
                call["arguments"] = admitted.arguments
            # Derived from the arguments as they leave Bastion: a redacted value is redacted in its header too.
            params = headers.params(declared or {}, admitted.arguments or {})

            async def renewed() -> Upstream | None:
                """After a 401: the renewed token's headers, or None when there is nothing to renew."""
                identity_id = self._proxy.identity_for(principal, mounted)
                if not await self._proxy.renew(principal, mounted, identity_id, current):
                    return None
                return (await self._admission.upstream(principal, mounted))[0]

            with anyio.CancelScope() as scope:
                hang_up = _HangUp(receive, send, record, scope)
                try:
                    await self._forward(
                        request_headers,
                        json.dumps(message, separators=(",", ":")).encode(),
                        tool,
                        principal,
                        mounted,
                        upstream,
                        params,
                        hang_up.send,
                        record,
                        message["id"],
                        renewed,
                        admitted.results,
                    )
                finally:
                    hang_up.close()

    async def _forward(
        self,
        request_headers: list[tuple[bytes, bytes]],
        body: bytes,
        tool: str,
        principal: Principal,
        mounted: Mounted,
        upstream: Upstream,
        params: list[tuple[str, str]],
        send: Send,
        record: CallRecord,
        request_id: Any,
        renewed: Callable[[], Awaitable[Upstream | None]],
        results: Callable[[Any], Any] | None = None,
    ) -> None:
        passed = [*headers.to_upstream(request_headers), ("mcp-name", tool), *params]
        timeout = mounted.server.call_timeout_s
        started = False
        try:
            async with self._pool.slot(mounted.server.id):
                with anyio.fail_after(timeout):  # the whole call, streamed answer included
                    response = await upstream.wire.post(
                        [*upstream.headers, *passed], body, first_byte_timeout_s=timeout
                    )
                    if response.status_code == UNAUTHORIZED:
                        # Refused before the upstream acted on the call: renew the token once and send it again.
                        await response.aclose()
                        try:
                            fresh = await renewed()
                        except BastionError as exc:
                            record.outcome, record.reason = "error", exc.code
                            record.upstream_status = str(UNAUTHORIZED)
                            await send_error(send, request_id, to_jsonrpc(exc).error)
                            return
                        if fresh is None:
                            await send_error(send, request_id, refused(mounted, record))
                            return
                        response = await fresh.wire.post([*fresh.headers, *passed], body, first_byte_timeout_s=timeout)
                    if response.status_code in (UNAUTHORIZED, FORBIDDEN):
                        await self.refusal(response, principal, mounted, record, send, request_id)
                        return
                    relay = AnswerRelay(send, request_id, results, headers.to_agent(response.headers))
                    try:
                        await relay.relay(response)
                    finally:
                        started = relay.started
                        await response.aclose()
                    record.upstream_status = relay.status
        except UpstreamBusy as exc:
            record.outcome, record.reason = "error", exc.code
            await send_error(send, request_id, to_jsonrpc(exc).error)
        except AnswerTooLarge:
            error = answer_too_large(mounted, record)
            if not started:
                await send_error(send, request_id, error)
        except (OSError, UrlRefused, TimeoutError) as exc:
            error = upstream_failure(exc, mounted, record)
            if started:  # the caller already has a status line: end the stream; its client sees it cut short
                with contextlib.suppress(OSError):  # the caller itself may be what went away
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await send_error(send, request_id, error)
        else:
            # As the full path records it: a tool's error result is "error", a JSON-RPC error its code (at whatever
            # HTTP status it came), an HTTP error without an answer its status; a rule's block stays the outcome.
            if record.upstream_status is None:
                record.upstream_status = f"http_{response.status_code}"
            if record.upstream_status not in ("ok", "error") and record.outcome == "ok":
                record.outcome, record.reason = "error", record.upstream_status

    async def refusal(
        self,
        response: WireResponse,
        principal: Principal,
        mounted: Mounted,
        record: CallRecord,
        send: Send,
        request_id: Any,
    ) -> None:
        """The upstream refused the call (401 after a renewal, or 403): answer the caller with a JSON-RPC error.

        As on the full path, never the upstream's challenge (which would send the agent after the upstream's
        authorization server with its Bastion token); a 403 may instead say that more scope would help.
        """
        challenges = [v.decode("latin-1") for k, v in response.headers if k == b"www-authenticate"]
        await response.aclose()
        error = refused(mounted, record, response.status_code)
        if response.status_code == FORBIDDEN:
            try:
                await self._proxy.step_up(principal, mounted, challenges)
            except BastionError as exc:
                record.reason = exc.code
                await send_error(send, request_id, to_jsonrpc(exc).error)
                return
        await send_error(send, request_id, error)


class _HangUp:
    """Cancels a call whose caller hangs up before its answer was sent in full. Once the body is read, ``receive``
    gives only a disconnect: the caller's, or the server's note that the answer went out (``send`` tells the two
    apart). It starts watching once the call has been out for ``HANG_UP_CHECK_S``: a quick call costs a timer, not
    a task; a hang-up before then is seen then."""

    def __init__(self, receive: Receive, send: Send, record: CallRecord, scope: anyio.CancelScope) -> None:
        self._receive, self._send, self._record, self._scope = receive, send, record, scope
        self._answered = False
        self._timer = asyncio.get_running_loop().call_later(HANG_UP_CHECK_S, self._watch)
        self._task: asyncio.Task[None] | None = None

    async def send(self, message: dict[str, Any]) -> None:
        """The caller's ``send``, noting when the answer's last part has gone out."""
        await self._send(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self._answered = True

    def _watch(self) -> None:
        self._task = asyncio.ensure_future(self._wait())

    async def _wait(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        if not self._answered and self._record.outcome == "ok":  # neither answered in full nor refused
            self._record.failed("cancelled")
            self._scope.cancel()

    def close(self) -> None:
        self._timer.cancel()
        if self._task is not None:
            self._task.cancel()
