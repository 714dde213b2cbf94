"""Circuit breaking per upstream server: one that keeps failing is refused at once for a while, then probed back.

A failure is the upstream not answering: a connection that fails or drops, a session that cannot be opened, a
call that times out. Any answer, even a refusal or an error, is the upstream answering. After
``failures_to_open`` failures in a row the server's circuit opens: calls are refused at once (with how long to
wait) for ``open_s``. Then one call is let through as a probe; its success closes the circuit, its failure opens
it again for twice as long (at most ``max_open_s``). Each process keeps its own circuits.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

logger = logging.getLogger("bastion.upstream")

FAILURES_TO_OPEN: Final = 5
OPEN_S: Final = 5.0
MAX_OPEN_S: Final = 60.0
PROBE_BUSY_RETRY_S: Final = 1  # what a caller is told while another call probes the upstream


@dataclass(slots=True)
class _Circuit:
    failures: int = 0  # in a row
    open_until: float | None = None  # while set, the circuit is open (until then) or half-open (after)
    open_s: float = OPEN_S
    probing: bool = False


class Breakers:
    """The circuits of every upstream server this process calls, by server id."""

    def __init__(
        self,
        *,
        failures_to_open: int = FAILURES_TO_OPEN,
        open_s: float = OPEN_S,
        max_open_s: float = MAX_OPEN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._failures_to_open = failures_to_open
        self._open_s = open_s
        self._max_open_s = max_open_s
        self._clock = clock
        self._circuits: dict[str, _Circuit] = {}

    def refusal(self, server_id: str, *, probe: bool) -> int | None:
        """Seconds to wait when a call to ``server_id`` must be refused now; None when it may go.

        With ``probe``, a call that goes while the circuit is half-open is the probe (report how it ended with
        ``succeeded``, ``failed`` or ``abandoned``); without, it only checks (a session being opened, say).
        """
        circuit = self._circuits.get(server_id)
        if circuit is None or circuit.open_until is None:
            return None
        left = circuit.open_until - self._clock()
        if left > 0:
            return max(1, math.ceil(left))
        if not probe:
            return None
        if circuit.probing:
            return PROBE_BUSY_RETRY_S
        circuit.probing = True
        return None

    def succeeded(self, server_id: str) -> None:
        circuit = self._circuits.pop(server_id, None)
        if circuit is not None and circuit.open_until is not None:
            logger.warning("upstream answers again; its circuit is closed", extra={"server_id": server_id})

    def failed(self, server_id: str) -> None:
        circuit = self._circuits.setdefault(server_id, _Circuit(open_s=self._open_s))
        now = self._clock()
        if circuit.open_until is not None and now >= circuit.open_until:  # the probe (or a half-open try) failed
            circuit.open_s = min(circuit.open_s * 2, self._max_open_s)
            circuit.open_until = now + circuit.open_s
            circuit.probing = False
            return
        circuit.failures += 1
        if circuit.open_until is None and circuit.failures >= self._failures_to_open:
            circuit.open_until = now + circuit.open_s
            logger.warning(
                "upstream keeps failing; its circuit is open",
                extra={"server_id": server_id, "failures": circuit.failures, "open_s": circuit.open_s},
            )

    def abandoned(self, server_id: str) -> None:
        """A call that went ended without saying anything of the upstream (cancelled): another may probe."""
        circuit = self._circuits.get(server_id)
        if circuit is not None:
            circuit.probing = False

    def forget(self, server_id: str | None = None) -> None:
        """An edit of how a server is reached (or of every server) starts its circuit afresh."""
        if server_id is None:
            self._circuits.clear()
        else:
            self._circuits.pop(server_id, None)
