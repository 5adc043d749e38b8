"""The control socket: one JSON request line in, one JSON reply line out.

Requests are {"cmd": "status" | "reload" | "stop"}. Only the daemon's own user (and
root) may ask: the socket file is mode 0600 and every peer's SO_PEERCRED is checked.
A request that is not one short line of valid JSON is refused without effect.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import stat
import struct
from dataclasses import dataclass
from typing import Any

from netd.config.model import Address
from netd.logs import Log
from netd.rundir import UnsafePath, own_dir
from netd.sockets import bind

MAX_REQUEST = 4096
COMMANDS = ("status", "reload", "stop")
READ_TIMEOUT_S = 2.0
MAX_PENDING = 16


class NotRunning(Exception):
    """No daemon answers on the control socket; the message says what is there instead."""


class BadRequest(ValueError):
    """A control request that is refused; the message says why."""


def open_control_socket(path: str) -> socket.socket:
    """Listen on `path`, mode 0600, in a directory no other user controls; a stale socket
    file is replaced, a symbolic link (or any other file) there is refused."""
    own_dir(os.path.dirname(path))
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            raise UnsafePath(f"control socket {path} is a symbolic link; not following it "
                             "(remove it if it is not meant to be there)")
    except FileNotFoundError:
        pass
    sock = bind(Address(spec="control", scheme="unix", path=path), MAX_PENDING,
                blocking=False)
    os.chmod(path, 0o600)  # the directory is netd's: nobody swapped the file meanwhile
    return sock


def ensure_control_socket(sock: socket.socket | None, selector: selectors.BaseSelector,
                          log: Log) -> socket.socket | None:
    """`sock` while its file is still there; a new control socket, watched as `sock` was,
    when the file was removed (by a cleaner of /tmp), so that the commands find netd."""
    if sock is None:
        return None
    path = sock.getsockname()
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            return sock
    except FileNotFoundError:
        pass
    try:
        fresh = open_control_socket(path)
    except OSError as e:
        log.event("error", "err", msg=f"cannot re-create the control socket: {e}")
        return sock
    key = selector.get_key(sock)
    selector.unregister(sock)
    sock.close()
    selector.register(fresh, key.events, key.data)
    log.event("control", "warning", result="recreated", path=path)
    return fresh


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process on the other end of a Unix stream socket."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    uid: int = struct.unpack("3i", creds)[1]
    return uid


@dataclass(eq=False)
class ControlRequest:
    """A control connection whose request line is still arriving (read without blocking,
    so a client that never sends costs one fd until `deadline_s`, never the loop)."""

    conn: socket.socket
    deadline_s: float
    data: bytes = b""

    @classmethod
    def accept(cls, conn: socket.socket, now_s: float) -> ControlRequest:
        """Take a new control connection; raises BadRequest for another user."""
        if peer_uid(conn) not in (0, os.geteuid()):
            raise BadRequest("permission denied")
        conn.setblocking(False)
        return cls(conn, now_s + READ_TIMEOUT_S)

    def read(self) -> str | None:
        """The command once its line is complete, None while it is not; raises BadRequest."""
        try:
            chunk = self.conn.recv(MAX_REQUEST + 1 - len(self.data))
        except BlockingIOError:
            return None
        except OSError as e:
            raise BadRequest(f"connection failed: {e.strerror}") from None
        self.data += chunk
        if len(self.data) > MAX_REQUEST:
            raise BadRequest(f"request longer than {MAX_REQUEST} bytes")
        if chunk and b"\n" not in self.data:
            return None
        try:
            request = json.loads(self.data.split(b"\n", 1)[0])
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("request is not a JSON line") from None
        command = request.get("cmd") if isinstance(request, dict) else None
        if command not in COMMANDS:
            raise BadRequest(f"unknown command (expected one of {', '.join(COMMANDS)})")
        return str(command)


def send_reply(conn: socket.socket, reply: dict[str, Any]) -> None:
    """Write one JSON reply line; a client that went away is not an error."""
    try:
        conn.settimeout(READ_TIMEOUT_S)
        conn.sendall(json.dumps(reply).encode() + b"\n")
    except OSError:
        pass


def request(path: str, command: str, timeout_s: float = 30.0) -> dict[str, Any]:
    """Ask the daemon listening at `path`; raises NotRunning when nobody answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise NotRunning(f"no control socket at {path}") from None
        except ConnectionRefusedError:
            raise NotRunning(f"nothing listens on the control socket {path}") from None
        except PermissionError:
            raise PermissionError(f"permission denied on {path}: only the user netd runs "
                                  "as (and root) may use it; try sudo") from None
        sock.sendall(json.dumps({"cmd": command}).encode() + b"\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    if not data:
        raise NotRunning(f"no reply on the control socket {path}")
    reply: dict[str, Any] = json.loads(data)
    return reply
