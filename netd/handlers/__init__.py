"""What serves a connection in the child: builtin services and python handlers."""

from __future__ import annotations

import socket

from netd.config.model import Service
from netd.handlers.builtins import BUILTINS
from netd.handlers.python import load_handler


def serve_connection(service: Service, conn: socket.socket, remote: object) -> None:
    """In the child: run the service's builtin or python handler on `conn`."""
    conn.settimeout(service.timeout_s)
    if service.kind == "builtin":
        assert service.builtin is not None
        BUILTINS[service.builtin].stream(conn)
    else:
        assert service.python is not None
        load_handler(service.python)(conn, remote)
