"""The children of a spawner as they live: each recorded when it starts, reaped when it
ends (its exit logged, its admission ticket given back), signalled when it runs past
max_duration, and ended when netd stops.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

from netd.children import Child, ChildTable
from netd.logs import Log
from netd.loop import EventLoop
from netd.reports import Reporter
from netd.spawn import exited_children, signal_group

KILL_GRACE_S = 5.0  # after max_duration's SIGTERM, SIGKILL


class Reaper:
    """The children of one spawner; `on_end(child, status)` after each has ended (status
    None for a child of an earlier spawner, which is not ours to reap)."""

    def __init__(self, loop: EventLoop, log: Log, report: Reporter,
                 on_end: Callable[[Child, int | None], None]) -> None:
        self.loop = loop
        self.log = log
        self.report = report
        self.on_end = on_end
        self.table = ChildTable()

    def add(self, child: Child, max_duration_s: float | None = None) -> None:
        """Record a child that has started (its accept line is logged)."""
        self.table.add(child)
        if max_duration_s is not None:
            child.deadline = self.loop.after(
                max_duration_s, lambda: self._expire(child, signal.SIGTERM))

    def reap(self) -> None:
        """Collect every child that has exited."""
        for pid, status in exited_children():
            child = self.table.pop(pid)
            if child is not None:
                self._end(child, status)

    def forget(self, pid: int) -> None:
        """A child of an earlier spawner, counted here, has ended."""
        child = self.table.pop(pid)
        if child is not None:
            self.on_end(child, None)

    def _end(self, child: Child, status: int) -> None:
        self.loop.cancel(child.deadline)
        log_exit(self.log, child.service, child.pid, status,
                 time.monotonic() - child.started_s, child.log_exit)
        self.report.ended(child.pid, status)
        self.on_end(child, status)

    def _expire(self, child: Child, sig: signal.Signals) -> None:
        """A child ran past max_duration: SIGTERM, then SIGKILL KILL_GRACE_S later."""
        self.log.event("timeout", "warning", service=child.service, pid=child.pid,
                       reason="max_duration", signal=sig.name)
        signal_group(child.pid, sig)
        if sig == signal.SIGTERM:
            child.deadline = self.loop.after(KILL_GRACE_S,
                                             lambda: self._expire(child, signal.SIGKILL))

    def stop(self, timeout_s: float) -> None:
        """netd stops: SIGTERM to each child, and SIGKILL to those left every `timeout_s`."""
        for child in self.table:
            if child.own:
                signal_group(child.pid, signal.SIGTERM)
        self.loop.every(timeout_s, self._kill_left)

    def _kill_left(self) -> None:
        left = [child for child in self.table if child.own]
        if left:
            self.log.event("kill", "warning", children=len(left), reason="stop_timeout")
        for child in left:
            signal_group(child.pid, signal.SIGKILL)

    def running(self) -> int:
        """How many children this spawner started and has not reaped yet."""
        return self.table.own()


def log_exit(log: Log, service: str, pid: int, status: int, lived_s: float,
             logged: bool = True) -> None:
    """The event=exit line of a child that was reaped (`logged` False: at debug, as a
    service's `log_connections` may ask; an end by a signal is a warning all the same)."""
    duration = f"{lived_s:.3f}s"
    if os.WIFSIGNALED(status):
        log.event("exit", "warning", service=service, pid=pid,
                  signal=signal.Signals(os.WTERMSIG(status)).name, duration=duration)
    else:
        log.event("exit", "info" if logged else "debug", service=service, pid=pid,
                  status=os.waitstatus_to_exitcode(status), duration=duration)
