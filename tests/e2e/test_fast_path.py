"""With the (experimental, opt-in) fast path, a 2026-era tools/call to a 2026-era upstream is forwarded as bytes."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import mcp_types as types
import pytest
import sqlalchemy as sa
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server import Server, ServerRequestContext
from mcp.shared.exceptions import MCPError
from starlette.types import ASGIApp, Receive, Scope, Send

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.identities import bearer_secret
from bastion.domain.models import AuthKind, ProtocolEra, Provisioning, ProvisionMode, Transport
from bastion.domain.policy import Effect, SubjectKind
from bastion.domain.ratelimits import LimitPer
from bastion.domain.specs import GatewayServerSpec, GatewaySpec, HostSpec, MemberSpec, ServerSpec
from bastion.pipeline.answers import HOLD_BYTES, AnswerRelay
from bastion.pipeline.errors import POLICY_DENIED, RATE_LIMITED
from bastion.pipeline.frames import MAX_ANSWER_BYTES, AnswerTooLarge
from bastion.services import connections, gateways, hosts, identities, members, rules, servers
from bastion.services.apikeys import KeyHasher
from bastion.settings import Settings
from bastion.web.app import create_app
from tests.mcp_support import gateway_client, mcp_app, serving
from tests.worlds import ada_connected

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]
CLIENT_INFO_KEY = "io.modelcontextprotocol/clientInfo"
E = schema.audit_events
_JSON = b"application/json"


def upstream(seen: list[dict[str, Any]]) -> ASGIApp:
    """Records, per call, the caller's client name (from the request envelope) and the credential it carried."""

    async def list_tools(_ctx: ServerRequestContext[Any, Any], _p: Any) -> types.ListToolsResult:
        schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
        return types.ListToolsResult(
            tools=[
                types.Tool(name="add", description="n+1", input_schema=schema),
                types.Tool(name="secret", description="hidden", input_schema=schema),
            ]
        )

    async def call_tool(ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams) -> Any:
        meta = dict((ctx.params or {}).get("_meta", {}))
        seen.append(
            {
                "client": meta.get(CLIENT_INFO_KEY, {}).get("name"),
                "auth": ctx.request.headers.get("authorization") if ctx.request is not None else None,
                "agent_headers": [h for h in ("x-api-key", "cookie") if ctx.request and h in ctx.request.headers],
            }
        )
        for step in (1, 2):
            await ctx.session.report_progress(step, 2)
        n = int((params.arguments or {}).get("n", 0))
        return types.CallToolResult(content=[types.TextContent(type="text", text=str(n + 1))])

    server: Server[Any] = Server("modern-upstream", version="1", on_list_tools=list_tools, on_call_tool=call_tool)
    return mcp_app(server)


async def _token(store: Store, vault: Any, hasher: KeyHasher, operator: Actor, url: str) -> str:
    await servers.create(
        store,
        operator,
        ServerSpec("calc", Transport.STREAMABLE_HTTP, url=url, auth_kind=AuthKind.BEARER, era=ProtocolEra.MODERN),
    )
    tools = Provisioning(ProvisionMode.ALLOW_SELECTED, frozenset({"add"}))
    await gateways.create(store, operator, GatewaySpec("g", servers=(GatewayServerSpec("calc", tools=tools),)))
    await hosts.create(store, operator, HostSpec("agent"))
    await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
    await identities.create(
        store,
        vault,
        hasher,
        operator,
        server="calc",
        owner="ada@example.com",
        secret=bearer_secret("ada-calc-credential"),
    )
    _c, _t, token = await connections.create(
        store, hasher, operator, host="agent", gateway="g", member="ada@example.com"
    )
    return token


@pytest.mark.parametrize("mode", ["2026-07-28", "legacy"])
async def test_modern_calls_are_forwarded_as_bytes_and_legacy_calls_take_the_full_path(
    mode: str, settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    seen: list[dict[str, Any]] = []
    async with serving(upstream(seen)) as up:
        token = await _token(store, vault, hasher, operator, f"{up}/mcp")
        fast = settings.model_copy(update={"fast_path": True})
        async with (
            serving(create_app(fast, store)) as bastion,
            gateway_client(f"{bastion}/g/g/mcp", token, mode) as client,
        ):
            assert [t.name for t in (await client.list_tools()).tools] == ["calc__add"]
            steps: list[float] = []

            async def progress(value: float, _total: float | None, _message: str | None) -> None:
                steps.append(value)

            result = await client.call_tool("calc__add", {"n": 41}, progress_callback=progress)
            assert result.content[0].text == "42"  # type: ignore[union-attr]
            assert steps == [1, 2]
            with pytest.raises(MCPError) as caught:
                await client.call_tool("calc__secret", {"n": 1})
            assert caught.value.code == types.INVALID_PARAMS
    assert [s["auth"] for s in seen] == ["Bearer ada-calc-credential"]
    # The 2026 caller's own request envelope reached the upstream (bytes forwarded); a handshake-era caller's call
    # was rebuilt by Bastion's upstream client.
    assert seen[0]["client"] == ("mcp" if mode == "2026-07-28" else "bastion")


def refusing(inner: ASGIApp, status: int, seen: list[bytes]) -> ASGIApp:
    """``inner``, except that every tools/call is refused with ``status`` and an OAuth challenge."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers", []))
        if scope["type"] != "http" or headers.get(b"mcp-method") != b"tools/call":
            await inner(scope, receive, send)
            return
        seen.append(headers.get(b"authorization", b""))
        challenge = b'Bearer error="insufficient_scope", scope="calc:write", resource_metadata="https://as.example/x"'
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"www-authenticate", challenge), (b"content-length", b"0")],
            }
        )
        await send({"type": "http.response.body", "body": b""})

    return app


@pytest.mark.parametrize(("status", "code"), [(401, "upstream_refused_credential"), (403, "upstream_forbidden")])
async def test_an_upstream_refusal_reaches_the_agent_as_a_jsonrpc_error_never_as_the_upstreams_challenge(
    status: int, code: str, settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    seen: list[dict[str, Any]] = []
    refused: list[bytes] = []
    async with serving(refusing(upstream(seen), status, refused)) as up:
        token = await _token(store, vault, hasher, operator, f"{up}/mcp")
        async with (
            serving(create_app(settings, store)) as bastion,
            gateway_client(f"{bastion}/g/g/mcp", token, "2026-07-28") as client,
        ):
            await client.list_tools()
            with pytest.raises(MCPError) as caught:
                await client.call_tool("calc__add", {"n": 1})
            # The agent keeps its Bastion token: it is told the upstream refused, not challenged to re-authenticate.
            assert caught.value.code == -32052
            assert caught.value.data == {"code": code}
            assert f"HTTP {status}" in caught.value.message
            assert "as.example" not in caught.value.message
            # The gateway goes on serving the same agent.
            assert [t.name for t in (await client.list_tools()).tools] == ["calc__add"]
    # A pasted bearer credential has nothing to renew: the call was sent once, with the member's credential.
    assert refused == [b"Bearer ada-calc-credential"]


def outcomes_upstream() -> ASGIApp:
    """A 2026-era upstream whose tools answer, answer with a tool error, or fail with a JSON-RPC error."""

    async def list_tools(_ctx: ServerRequestContext[Any, Any], _p: Any) -> types.ListToolsResult:
        schema = {"type": "object"}
        return types.ListToolsResult(
            tools=[types.Tool(name=name, description=name, input_schema=schema) for name in ("fine", "fail", "boom")]
        )

    async def call_tool(ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams) -> Any:
        if params.name == "boom":
            raise MCPError(-32099, "the upstream gave up")
        await ctx.session.report_progress(1, 1)  # an SSE answer, as soon as anything is sent before the result
        text = types.TextContent(type="text", text='an "error" in the text is not an error')
        return types.CallToolResult(content=[text], is_error=params.name == "fail")

    server: Server[Any] = Server("outcomes", version="1", on_list_tools=list_tools, on_call_tool=call_tool)
    return mcp_app(server)


@pytest.mark.parametrize("mode", ["2026-07-28", "legacy"])
async def test_the_audit_log_records_a_calls_outcome_alike_on_the_fast_and_the_full_path(
    mode: str, settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    async with serving(outcomes_upstream()) as up:
        calc = ServerSpec(
            "calc", Transport.STREAMABLE_HTTP, url=f"{up}/mcp", auth_kind=AuthKind.NONE, era=ProtocolEra.MODERN
        )
        token = await ada_connected(store, hasher, operator, calc)
        async with (
            serving(create_app(settings, store)) as bastion,
            gateway_client(f"{bastion}/g/g/mcp", token, mode) as client,
        ):
            await client.list_tools()
            assert not (await client.call_tool("calc__fine", {})).is_error
            assert (await client.call_tool("calc__fail", {})).is_error
            with pytest.raises(MCPError) as caught:
                await client.call_tool("calc__boom", {})
            assert caught.value.code == -32099
    async with store.transaction() as conn:
        query = sa.select(schema.audit_events).where(schema.audit_events.c.method == "tools/call")
        events = {row.name: (row.outcome, row.upstream_status) for row in (await conn.execute(query)).all()}
    assert events == {
        "calc__fine": ("ok", "ok"),
        "calc__fail": ("ok", "error"),
        "calc__boom": ("error", "-32099"),
    }


_SSE = b"text/event-stream"


class _Answer:
    """An upstream's HTTP answer as the relay reads it, arriving in ``parts``."""

    def __init__(self, status_code: int, content_type: bytes, *parts: bytes) -> None:
        self.status_code = status_code
        self.headers = [(b"content-type", content_type)]
        self._parts = parts

    async def chunks(self) -> AsyncIterator[bytes]:
        for part in self._parts:
            yield part


async def _relayed(answer: _Answer, results: Any = None) -> tuple[str | None, bytes]:
    """What the caller got of ``answer`` (call id 7), and the status the audit log records for it."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    relay = AnswerRelay(send, 7, results, answer.headers)
    await relay.relay(answer)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == answer.status_code
    assert sent[-1].get("more_body", False) is False
    return relay.status, b"".join(m.get("body", b"") for m in sent[1:])


_ERROR_LOG = b'event: message\r\ndata: {"jsonrpc":"2.0","method":"notifications/message","params":{"level":"error"}}'


@pytest.mark.parametrize(
    ("parts", "content_type", "http_status", "status"),
    [
        ([b'{"jsonrpc":"2.0","id":7,"result":{"content":[],"resultType":"complete"}}'], _JSON, 200, "ok"),
        (
            [b'{"jsonrpc":"2.0","id":7,"result":{"content":[],"isError":true,"resultType":"complete"}}'],
            _JSON,
            200,
            "error",
        ),
        ([b'{"jsonrpc":"2.0","id":7,"error":{"code":-32602,"message":"bad"}}'], _JSON, 200, "-32602"),
        ([b'{"jsonrpc":"2.0","id":7,"error":{"code":-32602,"message":"bad"}}'], _JSON, 400, "-32602"),
        ([b"<html>Bad Gateway</html>"], b"text/html", 502, None),  # an HTTP error without an answer
        # Another message's error, or an error-looking text, is not this answer's.
        ([b'{"jsonrpc":"2.0","id":8,"error":{"code":-32602,"message":"bad"}}'], _JSON, 200, "ok"),
        (
            [
                _ERROR_LOG + b"\r\n\r\nevent: mes",
                b'sage\r\ndata: {"jsonrpc":"2.0","id":7,"result":{"isError":true,"resultType":"complete"}}\r\n\r\n',
            ],
            b"text/event-stream; charset=utf-8",
            200,
            "error",
        ),
        ([b'data: {"jsonrpc":"2.0","id":7,\ndata: "error":{"code":-1,"message":"m"}}\n\n'], _SSE, 200, "-1"),
        ([b'{"jsonrpc":"2.0","id":7,"result":{"isError":tru'], _JSON, 200, "ok"),  # unreadable: as it came
    ],
)
async def test_an_answers_outcome_is_read_from_the_bytes_the_caller_got(
    parts: list[bytes], content_type: bytes, http_status: int, status: str | None
) -> None:
    got_status, body = await _relayed(_Answer(http_status, content_type, *parts))
    assert got_status == status
    assert body.replace(b"\r\n", b"\n") == b"".join(parts).replace(b"\r\n", b"\n")  # passed on as it came


@pytest.mark.parametrize("content_type", [_JSON, _SSE])
async def test_a_result_without_result_type_reaches_a_2026_caller_complete(content_type: bytes) -> None:
    answer = b'{"jsonrpc":"2.0","id":7,"result":{"content":[{"type":"text","text":"hi"}]}}'
    framed = answer if content_type == _JSON else b"id: e1\r\nevent: message\r\ndata: " + answer + b"\r\n\r\n"
    status, body = await _relayed(_Answer(200, content_type, framed[:20], framed[20:]))
    assert status == "ok"
    data = body if content_type == _JSON else body.split(b"data: ", 1)[1].strip()
    assert json.loads(data)["result"] == {"content": [{"type": "text", "text": "hi"}], "resultType": "complete"}
    if content_type == _SSE:
        assert body.startswith(b"id: e1\r\n")  # the event keeps its id


async def test_an_answer_too_large_to_hold_passes_as_it_came_unless_rules_must_read_it() -> None:
    big = b'{"jsonrpc":"2.0","id":7,"result":{"content":[{"type":"text","text":"' + b"x" * HOLD_BYTES + b'"}]}}'
    status, body = await _relayed(_Answer(200, _JSON, big[: HOLD_BYTES // 2], big[HOLD_BYTES // 2 :]))
    assert (status, body) == ("ok", big)
    with pytest.raises(AnswerTooLarge):
        await _relayed(_Answer(200, _JSON, big + b"x" * MAX_ANSWER_BYTES), results=lambda value: value)


@pytest.mark.parametrize("mode", ["2026-07-28", "legacy"])
async def test_policy_and_rate_limits_keep_calls_on_the_fast_path_and_refuse_as_the_full_path_does(
    mode: str, settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    """With a policy rule and a rate limit in the workspace, allowed calls still go the fast way (the upstream
    sees the caller's own client info), and a limited or denied call gets the same JSON-RPC error and the same
    audit event whichever way the call would have gone."""
    seen: list[dict[str, Any]] = []

    async def run(fast_path: bool) -> tuple[list[Any], list[tuple[Any, ...]]]:
        limit = await rules.create_rate_limit(store, operator, per=LimitPer.MEMBER, limit="2/minute")
        other = await rules.create_policy(
            store, operator, effect=Effect.DENY, subject_kind=SubjectKind.MEMBER, subject="bob@example.com"
        )
        answers: list[Any] = []
        async with store.transaction() as conn:
            calls = sa.select(sa.func.count()).select_from(E).where(E.c.method == "tools/call")
            before = (await conn.execute(calls)).scalar_one()
        chosen = settings.model_copy(update={"fast_path": fast_path})
        async with (
            serving(create_app(chosen, store)) as bastion,
            gateway_client(f"{bastion}/g/g/mcp", token, mode) as client,
        ):
            for n in range(3):  # two admitted, the third over the limit
                try:
                    answers.append((await client.call_tool("calc__add", {"n": n})).content[0].text)  # type: ignore[union-attr]
                except MCPError as exc:
                    answers.append((exc.code, exc.message, sorted((exc.data or {}).items())))
            await rules.delete_rate_limit(store, operator, limit.rule.id)
            denial = await rules.create_policy(
                store, operator, effect=Effect.DENY, subject_kind=SubjectKind.MEMBER, subject="ada@example.com"
            )
            with pytest.raises(MCPError) as denied:
                await client.call_tool("calc__add", {"n": 9})
            answers.append((denied.value.code, denied.value.message, sorted((denied.value.data or {}).items())))
        for rule in (other, denial):
            await rules.delete_policy(store, operator, rule.rule.id)
        async with store.transaction() as conn:
            query = (
                sa.select(E.c.outcome, E.c.reason, E.c.decision, E.c.name)
                .where(E.c.method == "tools/call")
                .order_by(E.c.seq)
                .offset(before)
            )
            events = [tuple(row) for row in (await conn.execute(query)).all()]
        # Each run made its own rules: name them by what they are, so the two runs compare.
        named = json.dumps([answers, events])
        for rule, placeholder in ((limit, "<limit>"), (other, "<other>"), (denial, "<denial>")):
            named = named.replace(rule.rule.id, placeholder)
        named = re.sub(r"retry in \d+ s", "retry in N s", named)  # the window counts down meanwhile
        answers, events = json.loads(named)
        return answers, [tuple(event) for event in events]

    async with serving(upstream(seen)) as up:
        token = await _token(store, vault, hasher, operator, f"{up}/mcp")
        fast, fast_events = await run(fast_path=True)
        admitted_fast = [s["client"] for s in seen]
        seen.clear()
        full, full_events = await run(fast_path=False)
    assert fast[:2] == full[:2] == ["1", "2"]
    # The limit's retryAfter counts down the window: compare it apart.
    for answer in (fast[2], full[2]):
        data = dict(answer[2])
        assert answer[0] == RATE_LIMITED and data["status"] == 429 and 0 < data["retryAfter"] <= 60
    assert [a[:2] for a in (fast[2], full[2])] == [full[2][:2]] * 2
    assert [k for k, _v in fast[2][2]] == [k for k, _v in full[2][2]]
    assert fast[3] == full[3] and fast[3][0] == POLICY_DENIED
    assert fast_events == full_events
    assert [e[0] for e in fast_events] == ["ok", "ok", "limited", "denied"]
    # Allowed 2026-era calls went the fast way, rules and all (the caller's own client info reached the upstream);
    # a legacy caller of this 2026-era upstream goes the full way (across eras) either way.
    assert admitted_fast == (["mcp", "mcp"] if mode == "2026-07-28" else ["bastion", "bastion"])
    assert [s["client"] for s in seen] == ["bastion", "bastion"]


def leaky_upstream(seen: list[dict[str, str]]) -> ASGIApp:
    """A 2026-era upstream whose `locate` tool mirrors `region` into `Mcp-Param-Region`, and whose every answer
    carries headers no agent should get from Bastion: a cookie for Bastion's own origin, a CORS grant, a
    challenge and an internal header."""

    async def list_tools(_ctx: ServerRequestContext[Any, Any], _p: Any) -> types.ListToolsResult:
        region = {"type": "string", "x-mcp-header": "Region"}
        schema = {"type": "object", "properties": {"region": region}, "required": ["region"]}
        return types.ListToolsResult(tools=[types.Tool(name="locate", input_schema=schema)])

    async def call_tool(ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams) -> Any:
        headers = ctx.request.headers if ctx.request is not None else {}
        seen.append({k: v for k, v in headers.items() if k.startswith("mcp-param-")})
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=str((params.arguments or {})["region"]))]
        )

    app = mcp_app(Server("leaky", version="1", on_list_tools=list_tools, on_call_tool=call_tool))
    planted = [
        (b"set-cookie", b"__Host-bastion=planted; Path=/; Secure"),
        (b"access-control-allow-origin", b"*"),
        (b"www-authenticate", b'Bearer resource_metadata="https://as.example/x"'),
        (b"x-internal-node", b"db-7.internal"),
    ]

    async def leaking(scope: Scope, receive: Receive, send: Send) -> None:
        async def planting(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *planted]}
            await send(message)

        await app(scope, receive, planting)

    return leaking


async def test_the_fast_path_passes_only_allowed_headers_and_derives_mcp_param_headers_from_the_arguments(
    settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    seen: list[dict[str, str]] = []
    answered: list[httpx2.Response] = []

    async def tamper(request: httpx2.Request) -> None:
        if b'"tools/call"' in request.content:
            request.headers["mcp-param-region"] = "spoofed"  # the agent's own value: never forwarded

    async def keep(response: httpx2.Response) -> None:
        if response.request.method == "POST" and b'"tools/call"' in response.request.content:
            answered.append(response)

    async with serving(leaky_upstream(seen)) as up:
        geo = ServerSpec("geo", Transport.STREAMABLE_HTTP, url=f"{up}/mcp", era=ProtocolEra.MODERN)
        token = await ada_connected(store, hasher, operator, geo)
        async with (
            serving(create_app(settings, store)) as bastion,
            httpx2.AsyncClient(
                headers={"Authorization": f"Bearer {token}"},
                timeout=30,
                event_hooks={"request": [tamper], "response": [keep]},
            ) as http,
            Client(
                streamable_http_client(f"{bastion}/g/g/mcp", http_client=http), mode="2026-07-28", cache=None
            ) as client,  # type: ignore[arg-type]
        ):
            assert [t.name for t in (await client.list_tools()).tools] == ["geo__locate"]
            result = await client.call_tool("geo__locate", {"region": "eu-west"})
            assert result.content[0].text == "eu-west"  # type: ignore[union-attr]
    assert seen == [{"mcp-param-region": "eu-west"}]  # derived from the arguments, the agent's value dropped
    (answer,) = answered
    assert answer.headers["content-type"].startswith(("application/json", "text/event-stream"))
    for planted in ("set-cookie", "access-control-allow-origin", "www-authenticate", "x-internal-node"):
        assert planted not in answer.headers, planted
