"""The control socket: one JSON request line in, one JSON reply line out.

Requests are {"cmd": "status" | "reload" | "stop"}. Only the daemon's own user (and
root) may ask: the socket file is mode 0600 and every peer's SO_PEERCRED is checked.
A request that is not one short line of valid JSON is refused without effect.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any

MAX_REQUEST = 4096
COMMANDS = ("status", "reload", "stop")
READ_TIMEOUT_S = 1.0


class NotRunning(Exception):
    """No daemon answers on the control socket."""


class BadRequest(ValueError):
    """A control request that is refused; the message says why."""


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process on the other end of a Unix stream socket."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    uid: int = struct.unpack("3i", creds)[1]
    return uid


def read_request(conn: socket.socket) -> str:
    """The command a control client asks for; raises BadRequest (or OSError)."""
    if peer_uid(conn) not in (0, os.geteuid()):
        raise BadRequest("permission denied")
    conn.settimeout(READ_TIMEOUT_S)
    data = b""
    while b"\n" not in data:
        chunk = conn.recv(MAX_REQUEST + 1 - len(data))
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise BadRequest(f"request longer than {MAX_REQUEST} bytes")
    try:
        request = json.loads(data.split(b"\n", 1)[0])
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("request is not a JSON line") from None
    command = request.get("cmd") if isinstance(request, dict) else None
    if command not in COMMANDS:
        raise BadRequest(f"unknown command (expected one of {', '.join(COMMANDS)})")
    return str(command)


def send_reply(conn: socket.socket, reply: dict[str, Any]) -> None:
    """Write one JSON reply line; a client that went away is not an error."""
    try:
        conn.sendall(json.dumps(reply).encode() + b"\n")
    except OSError:
        pass


def request(path: str, command: str, timeout_s: float = 30.0) -> dict[str, Any]:
    """Ask the daemon listening at `path`; raises NotRunning when nobody answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise NotRunning(f"netd is not running (no control socket at {path}: "
                             f"{e.strerror})") from None
        sock.sendall(json.dumps({"cmd": command}).encode() + b"\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    if not data:
        raise NotRunning(f"netd closed the control connection at {path} without a reply")
    reply: dict[str, Any] = json.loads(data)
    return reply
