"""The supervisor's run-time records: sockets, children and services as they run.

Plain data the supervisor updates; the decisions are in netd.supervisor and
netd.policy.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from netd.config import Address, Service
from netd.policy import Counters, RateWindow
from netd.spawn import Peer, Spawner


@dataclass(eq=False)
class Listener:
    """One bound socket; in wait mode it is `busy` while a child holds it."""

    service: str
    address: Address
    sock: socket.socket
    local: str
    adopted: bool = False
    busy: bool = False


@dataclass
class Child:
    """A running child and what it serves."""

    pid: int
    service: str
    started_s: float
    listener: Listener | None = None
    spawner: Spawner | None = None
    worker_of: int | None = None  # the service generation a prefork worker serves
    counted: bool = False  # counted in its service's Counters (under `source`)
    source: str | None = None


@dataclass
class Pending:
    """A connection handed to a spawner, until it says which pid serves it."""

    service: str
    listener: Listener
    peer: Peer
    spawner: Spawner
    asked_s: float
    counted: bool
    source: str | None


@dataclass(eq=False)
class ServiceState:
    """A service at run time: its sockets, children and counters; it outlives a reload
    that removes it until its last child has exited (draining)."""

    service: Service
    listeners: list[Listener] = field(default_factory=list)
    children: set[int] = field(default_factory=set)
    accepted: int = 0
    refused: int = 0
    draining: bool = False
    generation: int = 0
    worker_failures: int = 0
    counters: Counters = field(default_factory=Counters)
    window: RateWindow | None = None
    suspended_until_s: float | None = None
    stderr_r: int | None = None
    stderr_w: int | None = None
    stderr_partial: bytes = b""

    def state(self) -> str:
        """listening, busy (every socket held by a wait-mode child), suspended (over
        its rate), or draining."""
        if self.draining:
            return "draining"
        if self.suspended_until_s is not None:
            return "suspended"
        if self.listeners and all(lst.busy for lst in self.listeners):
            return "busy"
        return "listening"
