"""Reading an upstream's answer as it arrives: its media type, its server-sent events, and the bound on its size."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

MAX_ANSWER_BYTES: Final = 16 * 1024 * 1024  # the largest JSON answer or event read from an upstream
EVENT_END: Final = re.compile(rb"\r?\n\r?\n")
JSON: Final = b"application/json"
SSE: Final = b"text/event-stream"


class AnswerTooLarge(Exception):
    """An answer (or one of its events) that had to be read whole is larger than ``MAX_ANSWER_BYTES``."""


def media(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The media type of a response, lower case and without parameters (b"" when it has none)."""
    content_type = next((v for k, v in headers if k == b"content-type"), b"")
    return content_type.split(b";")[0].strip().lower()


def fields(event: bytes) -> tuple[bytes, str | None, int | None, bool]:
    """An SSE event's data (lines joined), its id, its retry interval in ms, and whether it had a comment."""
    data: list[bytes] = []
    event_id: str | None = None
    retry_ms: int | None = None
    comment = False
    for line in event.splitlines():
        if line.startswith(b":"):
            comment = True
            continue
        field, _, value = line.partition(b":")
        value = value.removeprefix(b" ")
        if field == b"data":
            data.append(value)
        elif field == b"id" and b"\0" not in value:
            event_id = value.decode("utf-8", "replace")
        elif field == b"retry" and value.isdigit():
            retry_ms = int(value)
    return b"\n".join(data), event_id, retry_ms, comment
