"""Structured JSON logs that carry the request id of the request being served."""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
from datetime import UTC, datetime
from typing import Any, Final

from bastion.context import request_id_var

__all__ = ["JsonFormatter", "configure_logging", "request_id_var"]

# uvicorn adds `color_message` (the message with ANSI colours) to its records; it only repeats `msg`.
_STANDARD_ATTRS: Final = frozenset(vars(logging.makeLogRecord({})).keys()) | {
    "message",
    "asctime",
    "color_message",
    "request_id",  # set by ``Background`` when it queues a record; written on its own
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id and any `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = record.__dict__.get("request_id") or request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        return json.dumps(entry, default=str, ensure_ascii=False)


class Background(logging.Handler):
    """Formats and writes records in a thread of its own: the event loop only queues them.

    A request's log line (and its write to stderr) would otherwise run between answering one request and
    reading the next. What a record means is fixed when it is queued: its message, its traceback and the
    request id of the request being served. Closing (at exit, by ``logging.shutdown``) writes what is queued.
    """

    def __init__(self, target: logging.Handler) -> None:
        super().__init__()
        self._target = target
        self._queue: queue.SimpleQueue[logging.LogRecord | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write, name="bastion-log", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            record.msg, record.args = record.getMessage(), None
            if record.exc_info:
                record.exc_text = _TRACEBACKS.formatException(record.exc_info)
                record.exc_info = None  # its frames would keep every local of the failed call alive meanwhile
            if "request_id" not in record.__dict__:
                record.request_id = request_id_var.get()
        except (TypeError, ValueError):  # a message whose arguments do not fit it, as StreamHandler reports it
            self.handleError(record)
            return
        self._queue.put(record)

    def _write(self) -> None:
        while (record := self._queue.get()) is not None:
            self._target.handle(record)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=5)
        self._target.close()
        super().close()


_TRACEBACKS: Final = logging.Formatter()


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    for old in root.handlers:
        old.close()
    root.handlers[:] = [Background(handler)]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # uvicorn's access log repeats what our request log says, without the request id.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    # httpx2 logs every upstream request at info: a second line per tools/call on the hot path (about 2 % of the
    # gateway's CPU under load, bench/gateway.py) that the request log already covers. Kept at debug.
    logging.getLogger("httpx2").setLevel(logging.NOTSET if level.upper() == "DEBUG" else logging.WARNING)
