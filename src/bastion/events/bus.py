"""A tiny synchronous publish/subscribe bus for change events, published after the change commits."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

logger = logging.getLogger("bastion.events")


class Subject(StrEnum):
    HOST = "host"
    GATEWAY = "gateway"
    MEMBER = "member"
    CONNECTION = "connection"
    TOKEN = "token"
    IDENTITY = "identity"
    SERVER = "server"


@dataclass(frozen=True, slots=True)
class Changed:
    subject: Subject
    id: str


Listener = Callable[[Changed], None]


class EventBus:
    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def publish(self, event: Changed) -> None:
        for listener in list(self._listeners):
            listener(event)
