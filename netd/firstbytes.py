"""Waiting on the loop for the first bytes of new connections, each by a deadline.

Two small servers need this: the control socket (one request line) and services
behind a load balancer (a PROXY header). Each connection is read without blocking,
so a client that sends nothing, or one byte at a time, costs one fd and one timer
until its deadline, never the loop; and the number waiting at once is bounded.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from netd.loop import EventLoop, Timer

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Reader(Protocol[T_co]):
    """What reads one connection's first bytes: read() returns the result once complete,
    None while more must come, and raises ValueError for bytes that can never do."""

    @property
    def conn(self) -> socket.socket: ...

    def read(self) -> T_co | None: ...


R = TypeVar("R", bound=Reader[object])


class FirstBytes(Generic[R, T]):
    """Connections whose first bytes are still arriving: `on_done(reader, result)` once
    one is complete, `on_fail(reader, why)` when it is bad, closed or late."""

    def __init__(self, loop: EventLoop, limit: int, on_done: Callable[[R, T], None],
                 on_fail: Callable[[R, str], None]) -> None:
        self.loop = loop
        self.limit = limit
        self.on_done = on_done
        self.on_fail = on_fail
        self._deadlines: dict[R, Timer] = {}

    def __len__(self) -> int:
        return len(self._deadlines)

    def wait(self, reader: R, timeout_s: float, late: str) -> bool:
        """Start reading `reader`'s connection; False (nothing done) when `limit` wait
        already. `late` is what on_fail says when the deadline passes."""
        if len(self._deadlines) >= self.limit:
            return False
        reader.conn.setblocking(False)
        self._deadlines[reader] = self.loop.after(timeout_s, lambda: self._fail(reader, late))
        self.loop.watch(reader.conn, lambda: self._read(reader))
        return True

    def _read(self, reader: R) -> None:
        try:
            result = reader.read()
        except (ValueError, OSError) as e:
            self._fail(reader, str(e))
            return
        if result is not None:
            self._forget(reader)
            self.on_done(reader, result)  # type: ignore[arg-type]

    def _fail(self, reader: R, why: str) -> None:
        if self._forget(reader):
            self.on_fail(reader, why)

    def _forget(self, reader: R) -> bool:
        timer = self._deadlines.pop(reader, None)
        if timer is None:
            return False
        self.loop.cancel(timer)
        self.loop.unwatch(reader.conn)
        return True

    def fail_all(self, why: str) -> None:
        """Give up on every connection still waiting (on_fail for each)."""
        for reader in list(self._deadlines):
            self._fail(reader, why)
