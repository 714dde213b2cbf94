"""Log levels: debug shows Bastion's own detail, never the payloads libraries write at debug."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import cast

import pytest

from bastion.web import logs

SECRET = "bst_live_argument_secret_value_0123456789"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Where the test points the configured handler; the logging configuration is restored afterwards."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    levels = {name: logging.getLogger(name).level for name in (*logs.PAYLOAD_LOGGERS, "httpx2", "bastion")}
    out = io.StringIO()
    yield out
    root.handlers[:], _level = saved
    root.setLevel(saved[1])
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.parametrize("level", ["debug", "info"])
def test_no_level_writes_the_json_rpc_messages_the_sdk_logs_at_debug(level: str, captured: io.StringIO) -> None:
    logs.configure_logging(level, "json")
    (handler,) = logging.getLogger().handlers
    cast("logging.StreamHandler[io.StringIO]", handler).setStream(captured)
    # As the SDK's client transport logs each message it sends, and httpcore each response's headers.
    logging.getLogger("mcp.client.streamable_http").debug(f"Sending client message: {{'arguments': '{SECRET}'}}")
    logging.getLogger("httpcore2.http11").debug(f"receive_response_headers.complete set-cookie={SECRET}")
    logging.getLogger("bastion.upstream").debug("upstream session opened")
    logging.getLogger("mcp.server").warning("a warning still shows")
    lines = [json.loads(line) for line in captured.getvalue().splitlines()]
    assert SECRET not in captured.getvalue()
    assert [line["msg"] for line in lines] == (
        ["upstream session opened", "a warning still shows"] if level == "debug" else ["a warning still shows"]
    )
