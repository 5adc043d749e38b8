"""Reading a PROXY protocol header off a new connection without blocking, and without
taking any of the client's own bytes (they stay in the socket for the child); and the
gate that holds a service's new connections until their header says who the client is."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Generic, TypeVar

from netd.config.model import ProxyProtocol
from netd.firstbytes import FirstBytes
from netd.loop import EventLoop
from netd.peer import Peer
from netd.proxy import Incomplete, ProxyError, ProxyHeader, parse

C = TypeVar("C")
MAX_WAITING = 1024  # connections whose PROXY header may be pending at once

# The longest header: a v2 header with its largest address-and-TLV block.
MAX_HEADER = 16 + 65535


class ProxyWait:
    """A connection whose PROXY header is still arriving, from the load balancer at
    `remote` (read through netd.firstbytes, which bounds the wait)."""

    def __init__(self, conn: socket.socket, remote: tuple[str, int]) -> None:
        self.conn = conn
        self.remote = remote
        self.received = b""

    def read(self) -> ProxyHeader | None:
        """The header once complete (consumed from the socket), None while it is not.

        Raises ProxyError for a malformed header or a peer that closed before sending
        one. Bytes are only peeked until the header is known to end, then exactly the
        header is read.
        """
        try:
            peeked = self.conn.recv(MAX_HEADER - len(self.received), socket.MSG_PEEK)
        except BlockingIOError:
            return None
        except OSError as e:
            raise ProxyError(f"connection failed before the header: {e.strerror}") from None
        if not peeked:
            raise ProxyError("connection closed before the PROXY header")
        result = parse(self.received + peeked)
        if isinstance(result, Incomplete):
            # Every byte so far belongs to the header: take them off the socket, so
            # the next readiness means new bytes.
            self.received += self.conn.recv(len(peeked))
            return None
        self.conn.recv(result.length - len(self.received))
        return result


class _Arrival(ProxyWait, Generic[C]):
    """A connection whose header is awaited, with what the gate's user said about it."""

    def __init__(self, conn: socket.socket, remote: tuple[str, int], context: C) -> None:
        super().__init__(conn, remote)
        self.context = context


class ProxyGate(Generic[C]):
    """New connections held until their PROXY header arrives (from a trusted load
    balancer, in time, well formed): then `on_header(context, conn, peer)` with the real
    client as the peer; otherwise the connection is closed and `on_refuse(context, peer,
    why)` names the balancer."""

    def __init__(self, loop: EventLoop, on_header: Callable[[C, socket.socket, Peer], None],
                 on_refuse: Callable[[C, Peer, str], None]) -> None:
        self.on_header = on_header
        self.on_refuse = on_refuse
        self.waiting: FirstBytes[_Arrival[C], ProxyHeader] = FirstBytes(
            loop, MAX_WAITING, self._arrived, self._failed)

    def __len__(self) -> int:
        return len(self.waiting)

    def wait(self, context: C, conn: socket.socket, remote: tuple[str, int],
             proxy: ProxyProtocol) -> None:
        """Hold `conn`, from the balancer at `remote`, until its header is read."""
        if not proxy.trusted.permits_ip(remote[0]):
            why = "not a trusted load balancer"
        elif not self.waiting.wait(_Arrival(conn, remote, context), proxy.timeout_s,
                                   "no PROXY header in time"):
            why = "too many headers pending"
        else:
            return
        conn.close()
        self.on_refuse(context, Peer.from_ip(*remote), why)

    def _arrived(self, arrival: _Arrival[C], header: ProxyHeader) -> None:
        local = arrival.conn.getsockname()[:2]
        remote = header.source or arrival.remote
        peer = Peer("tcp", socket.AF_INET6 if ":" in remote[0] else socket.AF_INET,
                    remote=remote, local=header.dest or (local[0], local[1]))
        self.on_header(arrival.context, arrival.conn, peer)

    def _failed(self, arrival: _Arrival[C], why: str) -> None:
        arrival.conn.close()
        self.on_refuse(arrival.context, Peer.from_ip(*arrival.remote), why)

    def fail_all(self, why: str) -> None:
        """Refuse every connection still waiting."""
        self.waiting.fail_all(why)
