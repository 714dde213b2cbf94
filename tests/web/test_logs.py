"""Log lines: JSON with the request id, written by a thread of their own, nothing lost at shutdown."""

from __future__ import annotations

import io
import json
import logging
import threading

from bastion.web.logs import Background, JsonFormatter, request_id_var


def _background(out: io.StringIO, formatter: logging.Formatter) -> tuple[logging.Logger, Background]:
    target = logging.StreamHandler(out)
    target.setFormatter(formatter)
    handler = Background(target)
    logger = logging.getLogger(f"bastion.test.{id(out)}")
    logger.propagate = False
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    return logger, handler


def test_a_queued_record_keeps_its_request_id_message_and_traceback_and_closing_writes_them_all() -> None:
    out = io.StringIO()
    logger, handler = _background(out, JsonFormatter())
    written_by: list[str] = []
    original = handler._target.handle  # pyright: ignore[reportPrivateUsage]

    def handle(record: logging.LogRecord) -> bool:
        written_by.append(threading.current_thread().name)
        return original(record)

    handler._target.handle = handle  # pyright: ignore[reportPrivateUsage]
    token = request_id_var.set("req-1")
    try:
        logger.info("call %s of %d", "echo", 2, extra={"status": 200})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        request_id_var.reset(token)
    logger.info("outside any request")
    handler.close()  # what logging.shutdown does at exit
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["msg"], e.get("request_id")) for e in lines] == [
        ("call echo of 2", "req-1"),
        ("failed", "req-1"),
        ("outside any request", None),
    ]
    assert lines[0]["status"] == 200
    assert "ValueError: boom" in lines[1]["exc"]
    assert "request_id" not in lines[2]
    assert set(written_by) == {"bastion-log"}


def test_the_text_format_keeps_the_traceback_too() -> None:
    out = io.StringIO()
    logger, handler = _background(out, logging.Formatter("%(levelname)s %(message)s"))
    try:
        raise KeyError("missing")
    except KeyError:
        logger.exception("lookup failed")
    handler.close()
    text = out.getvalue()
    assert text.startswith("ERROR lookup failed\n")
    assert "KeyError: 'missing'" in text
