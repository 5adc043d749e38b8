"""Reading a PROXY protocol header off a new connection without blocking, and without
taking any of the client's own bytes (they stay in the socket for the child)."""

from __future__ import annotations

import socket

from netd.proxy import Incomplete, ProxyError, ProxyHeader, parse

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
