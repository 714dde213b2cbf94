"""Structured JSON logs that carry the request id of the request being served."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Final

from bastion.context import request_id_var

__all__ = ["JsonFormatter", "configure_logging", "request_id_var"]

# uvicorn adds `color_message` (the message with ANSI colours) to its records; it only repeats `msg`.
_STANDARD_ATTRS: Final = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id and any `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


# Libraries whose debug lines carry payloads: the SDK writes every JSON-RPC message (tool arguments, tokens passed
# as arguments) and httpcore every response's headers. No log level may write what the audit preview redacts, so
# these never log below info, whatever BASTION_LOG_LEVEL says.
PAYLOAD_LOGGERS: Final = ("mcp", "httpcore", "httpcore2")


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # uvicorn's access log repeats what our request log says, without the request id.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    # httpx2 logs every upstream request at info: a second line per tools/call on the hot path (about 2 % of the
    # gateway's CPU under load, bench/gateway.py) that the request log already covers. Kept at debug.
    logging.getLogger("httpx2").setLevel(logging.NOTSET if level.upper() == "DEBUG" else logging.WARNING)
    for name in PAYLOAD_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLevelNamesMapping()[level.upper()]))
