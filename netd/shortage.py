"""A service short of processes, memory or fds: said once, retried quietly, and the
recovery said once.

accept() failing for want of fds, or the start of a child failing for want of
processes (fork's EAGAIN: the user's RLIMIT_NPROC, or the system's pid or thread
limit) or memory, leaves the socket readable, and the next try would fail the same
way: the spawner pauses the service instead and tries again every RESOURCE_PAUSE_S,
with the first connection in hand whose child could not be started (a `Waiter`), or
the next one accepted. Connections wait in the backlog, and those in hand wait too;
once one gets its child, the others follow and the service accepts again. One
`event=suspend reason=resources` line says what ran short when the shortage begins;
the retries log nothing; one `event=resume` says when a connection got through.
"""

from __future__ import annotations

import errno
import os
import pwd
import resource
import socket
from dataclasses import dataclass

from netd.children import Ticket
from netd.listener import Listener
from netd.peer import Peer

RESOURCE_PAUSE_S = 1.0  # between tries while out of fds, processes or memory
# What accept() fails with for want of fds or memory.
ACCEPT_SHORTAGES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# What posix_spawn or fork fails with for want of processes, memory or fds.
START_SHORTAGES = (errno.EAGAIN, *ACCEPT_SHORTAGES)


@dataclass(eq=False, slots=True)
class Waiter:
    """A connection accepted and admitted whose child could not be started yet: it
    keeps its admission ticket while it waits."""

    listener: Listener
    conn: socket.socket
    peer: Peer
    remote: object
    ticket: Ticket

    def drop(self) -> None:
        """Close it and give back its ticket (its child will not be started)."""
        self.conn.close()
        self.ticket.release()


def what_ran_short(e: OSError) -> str:
    """The shortage behind `e` (one of START_SHORTAGES), in words an administrator can
    act on, with the limit this process (and so its children) has."""
    if e.errno == errno.EAGAIN:
        soft = resource.getrlimit(resource.RLIMIT_NPROC)[0]
        limit = "unlimited" if soft == resource.RLIM_INFINITY else str(soft)
        return (f"out of processes (RLIMIT_NPROC {limit} for user {_user()}, or the "
                "system's pid or thread limit)")
    if e.errno == errno.EMFILE:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return f"out of file descriptors (RLIMIT_NOFILE {soft})"
    if e.errno == errno.ENFILE:
        return "the system's file table is full (fs.file-max)"
    if e.errno == errno.ENOMEM:
        return "out of memory"
    return e.strerror or str(e)


def _user() -> str:
    uid = os.getuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # in a chroot without the user's entry
        return str(uid)
