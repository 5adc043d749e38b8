"""The supervisor's side of a service's prefork workers (`workers: N`).

It keeps N workers running, each forked once with the service's identity and its
sockets (netd.workers is what runs inside). A worker that dies is replaced after a
delay that doubles while workers keep dying young, so a crash loop never becomes a
fork storm. A reload that changes the service retires the pool: its workers finish
what they serve and leave, and a new pool takes over the same sockets.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable

from netd.config.model import Service
from netd.listener import Listener
from netd.logs import Log
from netd.loop import EventLoop, Timer
from netd.spawn import fork_helper, import_handlers, signal_group

BACKOFF_S = 0.1       # first restart delay; doubles while workers keep dying young
BACKOFF_MAX_S = 30.0
STABLE_S = 10.0       # a worker that lived this long resets the back-off


class WorkerPool:
    """The workers of one service, of one generation (one version of its config)."""

    def __init__(self, loop: EventLoop, log: Log, service: Service,
                 listeners: list[Listener], generation: int,
                 on_start: Callable[[int], None]) -> None:
        self.loop = loop
        self.on_start = on_start  # told each new worker's pid
        self.log = log
        self.service = service
        self.listeners = listeners
        self.generation = generation
        self.started_s: dict[int, float] = {}  # pid: when
        self.failures = 0
        self.restart_at: Timer | None = None
        self.retired = False

    @property
    def pids(self) -> set[int]:
        """The workers running now."""
        return set(self.started_s)

    def fill(self) -> None:
        """Start the workers the pool is missing."""
        service = self.service
        sockets = [lst.sock for lst in self.listeners]
        supervisor = os.getpid()  # the worker dies with it: known before the fork
        for _ in range(service.workers - len(self.started_s)):
            try:
                pid = fork_helper(lambda: _run_worker(service, sockets, self.log, supervisor),
                                  [s.fileno() for s in sockets] + self.log.fds(),
                                  service.identity, lambda: _load_worker(service))
            except OSError as e:
                self.log.event("error", "err", service=service.name,
                               msg=f"cannot start worker: {e}")
                break
            self.started_s[pid] = time.monotonic()
            self.on_start(pid)
            self.log.event("worker", service=service.name, pid=pid, generation=self.generation)

    def lost(self, pid: int) -> None:
        """A worker exited: restart one after the back-off (unless the pool is retired)."""
        started_s = self.started_s.pop(pid)
        if self.retired:
            return
        lived_s = time.monotonic() - started_s
        self.failures = 0 if lived_s >= STABLE_S else self.failures + 1
        delay_s = min(BACKOFF_MAX_S, BACKOFF_S * 2 ** self.failures)
        self.loop.cancel(self.restart_at)
        self.restart_at = self.loop.after(delay_s, self._restart)
        self.log.event("restart", "warning", service=self.service.name,
                       delay=f"{delay_s:.3f}s", failures=self.failures)

    def _restart(self) -> None:
        self.restart_at = None
        if not self.retired:
            self.fill()

    def retire(self, sig: int = signal.SIGTERM) -> None:
        """Ask every worker to finish what it serves and leave; start no more."""
        self.retired = True
        self.loop.cancel(self.restart_at)
        for pid in self.started_s:
            signal_group(pid, sig)


# The worker's code pulls in asyncio (and ssl), ~6 MB, and a python service's handler
# module whatever it imports: only workers carry them, never the supervisor. They are
# imported in the forked worker before it takes its identity, while netd's own files
# are surely readable.
def _load_worker(service: Service) -> None:
    import netd.workers  # noqa: F401

    import_handlers([service])


def _run_worker(service: Service, sockets: list[socket.socket], log: Log,
                supervisor: int) -> None:
    from netd.workers import run_worker

    run_worker(service, sockets, log, supervisor)
