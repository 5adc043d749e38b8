"""The supervisor's side of one spawner process (netd.spawner is what runs inside).

It forks the spawner with its plan, reads the batches it reports, and passes it the
supervisor's notes (retire, stop, children of earlier spawners that ended).
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable

from netd.logs import Log
from netd.loop import EventLoop
from netd.reports import Batch, send_note
from netd.spawn import fork_helper
from netd.spawner import Plan, Spawner


class SpawnerHandle:
    """One spawner process: `on_batch(handle, batch)` for each report it sends."""

    def __init__(self, plan: Plan, loop: EventLoop, log: Log,
                 on_batch: Callable[[SpawnerHandle, Batch], None]) -> None:
        self.plan = plan
        self.loop = loop
        self.on_batch = on_batch
        self.retired = False
        self.link, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sockets = [lst.sock.fileno() for _, listeners in plan.services for lst in listeners]

        devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)

        def main() -> None:
            log.in_child(has_loop=True)  # it never stalls its loop on a slow syslog
            try:
                Spawner(plan, theirs, log, devnull).run()
            except Exception as e:  # a fault of ours: say what, then leave (status 1)
                log.wind_up()
                log.event("error", "err", user=plan.identity.user, pid=os.getpid(),
                          msg=f"spawner failed: {type(e).__name__}: {e}",
                          traceback="".join(traceback.format_exception(e)).rstrip())
                raise

        try:
            self.pid = fork_helper(main, [theirs.fileno(), devnull, *sockets, *log.fds()],
                                   plan.identity)
        finally:
            theirs.close()
            os.close(devnull)
        self.link.setblocking(False)
        loop.watch(self.link, self.read)

    @property
    def services(self) -> list[str]:
        """The names of the services it serves."""
        return [service.name for service, _ in self.plan.services]

    def read(self) -> None:
        """Take in every batch waiting on the link."""
        while True:
            try:
                data = self.link.recv(1 << 20)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # it has left (its exit is reaped through SIGCHLD)
                self.loop.unwatch(self.link)
                return
            self.on_batch(self, Batch.decode(data))

    def retire(self) -> None:
        """Stop accepting, let the children finish, then leave."""
        self.retired = True
        send_note(self.link, {"retire": True})

    def stop(self, timeout_s: float) -> None:
        """netd is stopping: stop accepting and end the children (SIGTERM, then SIGKILL
        after `timeout_s`)."""
        self.retired = True
        send_note(self.link, {"stop": timeout_s})

    def ended(self, pids: list[int]) -> None:
        """Children of earlier spawners that it counts have ended."""
        if pids:
            send_note(self.link, {"ended": pids})

    def close(self) -> None:
        """Forget the process (it has exited): drain its last reports, close the link."""
        self.read()
        self.loop.unwatch(self.link)
        self.link.close()
