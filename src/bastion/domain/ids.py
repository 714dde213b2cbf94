"""Time-ordered random identifiers (UUIDv7 layout), so ids sort by creation for cursor pagination."""

from __future__ import annotations

import re
import secrets
import time
import uuid
from typing import Final

# An id as new_id writes it (and the API document states it, for page cursors).
ID_PATTERN: Final = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
ID_RE: Final = re.compile(ID_PATTERN)


def new_id() -> str:
    """A UUIDv7 string: 48-bit millisecond timestamp, version and variant bits, 74 random bits."""
    millis = time.time_ns() // 1_000_000
    rand = secrets.randbits(74)
    value = (millis & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= (rand >> 62) << 64  # 12 bits rand_a
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))
