"""Hostile bodies at the gateway URL: deep nesting, batches and oversize bodies get clear errors, and nothing breaks."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import mcp_types as types
import pytest

from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.services.apikeys import KeyHasher
from bastion.settings import Settings
from bastion.web.app import create_app
from tests.e2e.test_audit_calls import _world
from tests.mcp_support import Recorder, recording_upstream, serving

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]
LIMIT = 64 * 1024
MODERN_HEADERS = {
    "Accept": "application/json, text/event-stream",
    "Content-Type": "application/json",
    "MCP-Protocol-Version": "2026-07-28",
}
LEGACY_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
CALL: dict[str, Any] = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "tools/call",
    "params": {
        "name": "crm__echo",
        "arguments": {"text": "still here"},
        "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
        },
    },
}


def _jsonrpc_error(response: httpx2.Response) -> int:
    text = response.text
    start = text.index("{")
    return int(httpx2.Response(200, content=text[start : text.rindex("}") + 1]).json()["error"]["code"])


async def test_deep_nesting_batches_and_oversize_bodies_are_refused_and_the_gateway_keeps_serving(
    settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    recorder = Recorder()
    async with serving(recording_upstream(recorder)) as upstream:
        tokens = await _world(store, vault, hasher, operator, f"{upstream}/mcp")
        app = create_app(settings.model_copy(update={"max_request_body_bytes": LIMIT}), store)
        async with serving(app) as bastion, httpx2.AsyncClient(base_url=bastion, timeout=30) as http:
            headers = {**MODERN_HEADERS, "Authorization": f"Bearer {tokens['ada']}", "Mcp-Method": "tools/call"}
            deep = '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":' + "[" * 20_000 + "]" * 20_000 + "}"
            nested = await http.post("/g/sales/mcp", content=deep, headers={**headers, "Mcp-Name": "crm__echo"})
            assert _jsonrpc_error(nested) == types.PARSE_ERROR

            batch = await http.post("/g/sales/mcp", json=[CALL, {**CALL, "id": 2}], headers=headers)
            assert _jsonrpc_error(batch) == types.INVALID_REQUEST

            oversize = {**CALL, "params": {**CALL["params"], "arguments": {"text": "x" * (LIMIT + 1)}}}
            big = await http.post("/g/sales/mcp", json=oversize, headers={**headers, "Mcp-Name": "crm__echo"})
            assert big.status_code == 413

            async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: refused while streaming in
                for _ in range(4):
                    yield b" " * (LIMIT // 2)

            legacy = {**LEGACY_HEADERS, "Authorization": headers["Authorization"]}
            for era in ({**headers, "Mcp-Name": "crm__echo"}, legacy):
                streamed = await http.post("/g/sales/mcp", content=chunks(), headers=era)
                assert streamed.status_code == 413, streamed.text

            fine = await http.post("/g/sales/mcp", json=CALL, headers={**headers, "Mcp-Name": "crm__echo"})
            assert fine.status_code == 200 and "still here" in fine.text, fine.text
    assert [c.arguments for c in recorder.tool_calls] == [{"text": "still here"}]
    # A refused body is one request log line, never a traceback.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info] == []
