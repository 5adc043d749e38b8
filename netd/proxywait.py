"""Reading a PROXY protocol header off a new connection without blocking, and without
taking any of the client's own bytes (they stay in the socket for the child)."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from netd.proxy import Incomplete, ProxyError, ProxyHeader, parse

# The longest header: a v2 header with its largest address-and-TLV block.
MAX_HEADER = 16 + 65535


@dataclass(eq=False)
class ProxyWait:
    """A connection whose PROXY header is still arriving; `deadline_s` bounds the wait."""

    conn: socket.socket
    remote: tuple[str, int]
    listener: object
    deadline_s: float
    received: bytes = field(default=b"")

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
