"""The children a spawner started, each with the admission ticket it was let in on.

A ticket holds what a connection counts against: its service's counters (instances,
per_source) and, with `daemon.max_children`, one place in the pool shared by every
spawner. It is released exactly once, when the child ends (or its start failed), so
no caller carries a "was it counted" flag around.
"""

from __future__ import annotations

import _multiprocessing
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from netd.loop import Timer
from netd.policy import Counters


class ChildPool:
    """At most `limit` children in all, across processes (a semaphore made before they
    fork); `limit` None means unbounded."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._places = None
        if limit is not None:
            # An unnamed (unlinked at once) semaphore, shared with whoever forks after.
            name = f"/netd-{os.getpid()}-{id(self)}"
            self._places = _multiprocessing.SemLock(1, limit, limit, name, True)

    def in_use(self) -> int:
        """How many places are taken now, by every process sharing the pool."""
        if self._places is None or self.limit is None:
            return 0
        return self.limit - int(self._places._get_value())

    def take(self) -> bool:
        """Take a place if one is free."""
        return self._places is None or bool(self._places.acquire(False))

    def give_back(self) -> None:
        """Free a place taken by take()."""
        if self._places is not None:
            self._places.release()


class Ticket:
    """What one admitted connection holds; `release()` gives it all back, once."""

    __slots__ = ("counters", "source", "pool", "released")

    def __init__(self, counters: Counters, source: str | None, pool: ChildPool | None) -> None:
        self.counters = counters
        self.source = source
        self.pool = pool
        self.released = False
        counters.started(source)

    def release(self) -> None:
        """Give back the counts and the pool place (a second call does nothing)."""
        if self.released:
            return
        self.released = True
        self.counters.ended(self.source)
        if self.pool is not None:
            self.pool.give_back()


@dataclass(eq=False)
class Child:
    """A running child: its service, when it started, what it holds."""

    pid: int
    service: str
    ticket: Ticket | None = None
    started_s: float = field(default_factory=time.monotonic)
    deadline: Timer | None = None  # max_duration's next signal
    wait_key: str | None = None    # the wait-mode socket it holds, if any
    own: bool = True               # False: a previous spawner's, counted here only
    log_exit: bool = True          # its exit line at info (else at debug)


class ChildTable:
    """The children of one spawner by pid."""

    def __init__(self) -> None:
        self._by_pid: dict[int, Child] = {}

    def add(self, child: Child) -> None:
        """Record a child that has started."""
        self._by_pid[child.pid] = child

    def pop(self, pid: int) -> Child | None:
        """Forget the child `pid` (None if it is not ours) and release its ticket."""
        child = self._by_pid.pop(pid, None)
        if child is not None and child.ticket is not None:
            child.ticket.release()
        return child

    def __len__(self) -> int:
        return len(self._by_pid)

    def __iter__(self) -> Iterator[Child]:
        return iter(list(self._by_pid.values()))

    def own(self) -> int:
        """How many of them this process started (and must reap)."""
        return sum(1 for child in self._by_pid.values() if child.own)
