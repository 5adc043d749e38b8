"""Python handlers used by tests/test_python_handlers.py (netd imports them by name)."""

from __future__ import annotations

import os
import socket


def peer_info(conn: socket.socket, peer: object) -> None:
    """Write back what netd says the peer is, and this child's pid, then close."""
    conn.sendall(f"peer={peer!r} pid={os.getpid()}\n".encode())


def boom_or_echo(conn: socket.socket, peer: object) -> None:
    """Echo one line; a line that says 'boom' raises instead (the error path)."""
    line = b""
    while not line.endswith(b"\n"):
        data = conn.recv(1024)
        if not data:
            break
        line += data
    if line.strip() == b"boom":
        raise ValueError("kaboom-7431 from the handler")
    conn.sendall(line)


def exit_three(conn: socket.socket, peer: object) -> None:
    """Leave the child at once with status 3, behind Python's back."""
    conn.sendall(b"bye\n")
    os._exit(3)
