"""A spawner's second thread: it starts exec children while the first runs the loop.

Most of a spawn is the parent waiting for the vfork'd child to exec; netd.spawn's
ExecSpawn releases the GIL for that wait, so with the spawns in a thread of their own
the spawner accepts, applies the policy and logs at the same time. Requests go in a
queue; results come back through a deque and one byte on a socket pair that the loop
watches, so the loop itself never blocks on a spawn.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from netd.loop import EventLoop
from netd.spawn import ExecSpawn


@dataclass(eq=False)
class SpawnRequest:
    """One program to start on `fd`: a connection (closed once collected, if its program
    started) or a wait-mode socket (`keep_fd`); `context` is whatever the caller needs
    back with the result."""

    program: str
    argv: tuple[str, ...]
    env: dict[str, str]
    fd: int
    stderr_fd: int
    keep_fd: bool = False
    context: Any = None
    pid: int | None = field(default=None, init=False)
    error: OSError | None = field(default=None, init=False)


class SpawnQueue:
    """Spawns in order, in a thread; `on_done(request)` on the loop for each, with
    `request.pid` or `request.error` set."""

    def __init__(self, loop: EventLoop, spawn: ExecSpawn,
                 on_done: Callable[[SpawnRequest], None]) -> None:
        self.loop = loop
        self.spawn = spawn
        self.on_done = on_done
        self.pending = 0  # submitted, and not yet handed to on_done
        self.requests: queue.SimpleQueue[SpawnRequest | None] = queue.SimpleQueue()
        self.done: deque[SpawnRequest] = deque()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        loop.watch(self.wake_r, self._collect)
        self.thread = threading.Thread(target=self._run, name="spawn", daemon=True)
        self.thread.start()

    def submit(self, request: SpawnRequest) -> None:
        """Start request's program as soon as the thread gets to it."""
        self.pending += 1
        self.requests.put(request)

    def _run(self) -> None:
        while (request := self.requests.get()) is not None:
            try:
                request.pid = self.spawn(request.program, request.argv, request.env,
                                         request.fd, request.stderr_fd)
            except OSError as e:
                request.error = e
            self.done.append(request)
            if len(self.done) == 1:
                # The loop may be asleep with nothing else to collect. When more wait, it
                # has not collected the first yet and gets them all with it.
                try:
                    self.wake_w.send(b"\0")
                except BlockingIOError:
                    pass  # wake-ups wait already

    def _collect(self) -> None:
        try:
            self.wake_r.recv(4096)
        except BlockingIOError:
            pass
        self.collect()

    def collect(self) -> None:
        """Hand what is done to on_done (the loop also calls this at each wake-up)."""
        while self.done:
            request = self.done.popleft()
            if not request.keep_fd and request.pid is not None:
                # Here: a close in the thread would hand the GIL over. A connection whose
                # program could not start is on_done's (it may wait out a shortage).
                os.close(request.fd)
            self.pending -= 1
            self.on_done(request)

    def close(self) -> None:
        """Finish what was submitted, then end the thread (results are not collected)."""
        self.requests.put(None)
        self.thread.join()
        self.loop.unwatch(self.wake_r)
        self.wake_r.close()
        self.wake_w.close()
