"""A tiny synchronous publish/subscribe bus for change events, published after the change commits."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

logger = logging.getLogger("bastion.events")
CHANGES_CHANNEL = "bastion_changes"


class Subject(StrEnum):
    HOST = "host"
    GATEWAY = "gateway"
    MEMBER = "member"
    ROLE = "role"  # a role renamed or its capabilities changed: look-ups that carry its name are read again
    CONNECTION = "connection"
    TOKEN = "token"  # noqa: S105  a subject name, not a secret
    IDENTITY = "identity"  # what is presented upstream changed (the secret's value) or it stopped serving: sessions go
    IDENTITY_INFO = "identity_info"  # its label, a re-seal, or a recovery: cached credentials are read again
    SERVER = "server"  # how a server is reached changed: its pooled sessions and cached schemas go
    SERVER_INFO = "server_info"  # only what describes it (its description): views refresh, sessions stay
    POLICY = "policy"  # policy rules, content rules and rate limits of a workspace (id: the workspace id)
    WEBHOOK = "webhook"  # webhook events waiting in the outbox (id: the endpoint id): wakes the delivery workers
    ALL = "all"


@dataclass(frozen=True, slots=True)
class Changed:
    subject: Subject
    id: str

    def encode(self) -> str:
        return f"{self.subject.value}:{self.id}"

    @classmethod
    def decode(cls, payload: str) -> Changed | None:
        subject, _, object_id = payload.partition(":")
        try:
            return cls(Subject(subject), object_id)
        except ValueError:
            return None


Listener = Callable[[Changed], None]


class EventBus:
    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        # Counts publications. A cache reads it before a look-up and stores the answer only if it has not moved:
        # a change committed while the look-up ran must not be undone by the older answer it read.
        self.generation = 0
        # False while a replica's change listener is not connected: it may miss changes, so caches keep nothing.
        self.live = True

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def keeps(self, generation: int) -> bool:
        """Whether a cache may store what it read since ``generation``: nothing was published meanwhile, and this
        process hears every change."""
        return self.live and generation == self.generation

    def publish(self, event: Changed) -> None:
        self.generation += 1
        for listener in list(self._listeners):
            listener(event)
