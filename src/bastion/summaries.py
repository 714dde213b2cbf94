"""Log lines that summarise repeated events (refusals, failed writes) instead of writing one line each."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Final

SUMMARY_EVERY_S: Final = 60.0


class Tally:
    """Counts events by kind and logs them as one line, at most once per ``every_s``: the first at once, then
    what gathered since, when the next event comes after the period (with the traceback of that event, if any)."""

    def __init__(
        self,
        logger: logging.Logger,
        message: str,
        *,
        level: int = logging.WARNING,
        every_s: float = SUMMARY_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._message = message
        self._level = level
        self._every_s = every_s
        self._clock = clock
        self._counts: Counter[str] = Counter()
        self._logged_at: float | None = None

    def note(self, kind: str, *, error: BaseException | None = None) -> None:
        self._counts[kind] += 1
        now = self._clock()
        if self._logged_at is not None and now - self._logged_at < self._every_s:
            return
        counts = dict(self._counts)
        summary = ", ".join(f"{n} {k}" for k, n in counts.items())
        self._logger.log(self._level, "%s: %s", self._message, summary, extra={"counts": counts}, exc_info=error)
        self._counts.clear()
        self._logged_at = now
