"""Builtins served inline by a spawner: each stream connection in its own loop (as an
InlineStream, with its accept and close lines), each datagram answered at once."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

from netd.children import Ticket
from netd.config.model import Service
from netd.handlers.builtins import BUILTINS
from netd.handlers.inline import InlineStream
from netd.listener import Listener
from netd.logs import Log
from netd.loop import EventLoop
from netd.peer import Peer, accept_fields, describe
from netd.reports import Reporter

DATAGRAMS_PER_WAKEUP = 64
# A UDP builtin never answers port 0 or another small-services port: that is how two
# servers start bouncing datagrams off each other.
SMALL_SERVICE_PORTS = frozenset((0, 7, 9, 13, 19, 37))


class InlineServer:
    """The builtin connections and datagrams of one spawner; `refuse(service, peer,
    reason)` turns a datagram away as the spawner turns connections away."""

    def __init__(self, loop: EventLoop, log: Log, report: Reporter,
                 refuse: Callable[[Service, Peer, str], None]) -> None:
        self.loop = loop
        self.log = log
        self.report = report
        self.refuse = refuse
        self.streams: set[InlineStream] = set()
        self.received = bytearray(65536)  # every datagram is read into it: no 64 KB each

    def stream(self, service: Service, conn: socket.socket, peer: Peer, local: str,
               ticket: Ticket) -> None:
        """Serve an admitted connection until it is over; `ticket` is given back then."""
        assert service.builtin is not None
        self.report.accepted(service.name)
        pid = os.getpid()
        self.log.event("accept", "info" if service.log_accept else "debug",
                       **accept_fields(service.name, peer, local, pid, "inline"))
        started_s = time.monotonic()

        def ended(reason: str) -> None:
            self.streams.discard(stream)
            ticket.release()
            logged = service.log_exit or reason != "done"
            self.log.event("close", "info" if logged else "debug", service=service.name,
                           **peer.who(), pid=pid, reason=reason,
                           duration=f"{time.monotonic() - started_s:.3f}s")

        stream = InlineStream(self.loop, conn, BUILTINS[service.builtin].stream,
                              service.timeout_s, ended)
        self.streams.add(stream)
        stream.start()

    def datagrams(self, service: Service, listener: Listener) -> None:
        """A UDP builtin: answer each datagram queued on `listener`."""
        assert service.builtin is not None
        reply_to = BUILTINS[service.builtin].datagram
        # This loop is the whole cost of a UDP request: what is constant is hoisted.
        sock = listener.sock
        access = service.access if service.access.restricts_ip else None
        logged = self.log.wants("debug")
        received = self.received
        view = memoryview(received)
        for _ in range(DATAGRAMS_PER_WAKEUP):
            try:
                size, remote = sock.recvfrom_into(received)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # an ICMP error queued for an earlier reply
            if remote[1] in SMALL_SERVICE_PORTS:
                continue
            if access is not None and not access.permits_ip(remote[0]):
                self.refuse(service, Peer.from_ip(remote[0], remote[1], "udp"), "access")
                continue
            reply = reply_to(bytes(view[:size]))
            if reply is not None:
                try:
                    sock.sendto(reply, remote)
                except OSError:
                    pass  # a full send buffer drops the reply, as UDP may
            if logged:
                self.log.event("datagram", "debug", service=service.name, proto="udp",
                               peer=describe(remote, listener.address.family),
                               local=listener.local)

    def close_all(self, reason: str) -> None:
        """End every connection now (netd is stopping)."""
        for stream in list(self.streams):
            stream.close(reason)
