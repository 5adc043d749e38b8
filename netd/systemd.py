"""systemd's protocols: readiness notification, watchdog, socket activation.

(The journal log target lives with the other targets in netd.logs.) Everything
here is optional: with no service manager around, notify() does nothing
and no sockets are passed. A manager that went away never stops netd, and one
that does not read its notify socket costs dropped messages, never a blocked loop.
"""

from __future__ import annotations

import os
import socket
import time

from netd.config.model import Address
from netd.logs import Log
from systemd import daemon


class Notifier:
    """sd_notify for the supervisor; silent when NOTIFY_SOCKET is not set.

    It sends on its own non-blocking datagram socket (libsystemd's sd_notify blocks
    in sendmsg when the manager does not read, and that would freeze the loop): a
    message the socket's queue cannot take is dropped and counted in `dropped`. The
    first drop of a run is logged, and so is the count once messages go through again.
    """

    def __init__(self) -> None:
        self.path = os.environ.get("NOTIFY_SOCKET", "")
        self.enabled = bool(self.path)
        # "@name" is a socket in the abstract namespace: a leading NUL byte on the wire.
        self.address = "\0" + self.path[1:] if self.path.startswith("@") else self.path
        self.sock: socket.socket | None = None
        self.dropped = 0
        self.dropping = 0  # dropped in the current run, not yet reported
        self.log: Log | None = None
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        watched = usec.isdigit() and (not pid or pid == str(os.getpid()))
        # Ping at half the interval, as sd_watchdog_enabled(3) advises.
        self.watchdog_interval_s = int(usec) / 2e6 if watched else None

    def send(self, *lines: str) -> None:
        """Send one notification made of `lines` (READY=1, STATUS=..., ...), or drop it
        when the manager's socket cannot take it now."""
        if not self.enabled:
            return
        try:
            if self.sock is None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self.sock.setblocking(False)
            self.sock.sendto("\n".join(lines).encode(), self.address)
        except BlockingIOError:
            self.dropped += 1
            self.dropping += 1
            if self.dropping == 1 and self.log is not None:
                self.log.event("notify_dropped", "warning", socket=self.path)
            return
        except OSError:
            return  # the manager is gone; serving goes on
        if self.dropping:
            if self.log is not None:
                self.log.event("notify_dropped", "warning", count=self.dropping)
            self.dropping = 0

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def reloading(self) -> None:
        usec = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")


def passed_sockets() -> dict[int, str]:
    """Sockets systemd passed (LISTEN_FDS), by fd, with their FileDescriptorName.

    Clears LISTEN_* from os.environ too: the C call only clears the C environment,
    and no child may inherit them.
    """
    fds: dict[int, str] = daemon.listen_fds_with_names()
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    return fds


def adopt(address: Address, service: str, passed: dict[int, socket.socket],
          names: dict[int, str]) -> socket.socket | None:
    """The passed socket for `address` of `service`, taken out of `passed`, if any.

    One bound to exactly the configured address wins; failing that, one named after
    the service (FileDescriptorName=) of the same type, so that a service with
    several addresses never takes the socket meant for another of them.
    """
    candidates = [fd for fd, sock in passed.items()
                  if sock.type == address.socktype and sock.family == address.family]
    for fd in candidates:
        if _bound_to(passed[fd], address):
            return passed.pop(fd)
    for fd in candidates:
        if names.get(fd) == service:
            return passed.pop(fd)
    return None


def _bound_to(sock: socket.socket, address: Address) -> bool:
    local = sock.getsockname()
    if address.path is not None:
        return bool(local == address.path)
    assert address.sockaddr is not None
    return bool(local[:2] == address.sockaddr[:2])
