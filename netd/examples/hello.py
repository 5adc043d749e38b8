"""The smallest useful handler: greet the peer, echo one line back, and close.

Point a service at it with `python: netd.examples.hello:handle`.
"""

from __future__ import annotations

import socket


def handle(conn: socket.socket, peer: object) -> None:
    """Called in a child of netd with the connected socket and the peer's address."""
    conn.sendall(f"hello {peer}, say something\r\n".encode())
    line = conn.makefile("rb").readline(4096)
    conn.sendall(b"you said: " + line)
