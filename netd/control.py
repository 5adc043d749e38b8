"""The control socket: one JSON request line in, one JSON reply line out.

Requests are {"cmd": "status" | "reload" | "stop"}. Only the daemon's own user (and
root) may ask: the socket file is mode 0600 and every peer's SO_PEERCRED is checked.
A request that is not one short line of valid JSON is refused without effect.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
from collections.abc import Callable, Iterator
from typing import Any

from netd.config.model import Address
from netd.firstbytes import FirstBytes
from netd.logs import Log
from netd.loop import EventLoop
from netd.rundir import UnsafePath, own_dir
from netd.sockets import bind, remove_unix

MAX_REQUEST = 4096
COMMANDS = ("status", "reload", "stop")
READ_TIMEOUT_S = 2.0
MAX_PENDING = 16
SERVICES_PER_PIECE = 64  # of a status reply, encoded and sent at once


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


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process on the other end of a Unix stream socket."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    uid: int = struct.unpack("3i", creds)[1]
    return uid


class ControlRequest:
    """A control connection whose request line is still arriving."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.data = b""

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


class ControlServer:
    """The daemon's side of the control socket, served on its event loop.

    `answer(command)` gives the reply to a valid request from netd's own user or root;
    anything else is refused (logged as event=control) without effect.
    """

    def __init__(self, loop: EventLoop, path: str, log: Log,
                 answer: Callable[[str], dict[str, Any]]) -> None:
        self.loop = loop
        self.path = path
        self.log = log
        self.answer = answer
        self.sock: socket.socket | None = None
        self.waiting: FirstBytes[ControlRequest, str] = FirstBytes(
            loop, MAX_PENDING, self._answer, self._refuse)

    def open(self) -> None:
        """Bind the socket and serve it; raises OSError (BindError, UnsafePath) on failure."""
        self.sock = open_control_socket(self.path)
        self.loop.watch(self.sock, self._accept)

    def ensure(self) -> None:
        """Make the socket again if its file was removed (by a cleaner of /tmp), so that
        the commands find netd; a failure is logged and the old socket kept."""
        if self.sock is None:
            return
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                return
        except FileNotFoundError:
            pass
        try:
            fresh = open_control_socket(self.path)
        except OSError as e:
            self.log.event("error", "err", msg=f"cannot re-create the control socket: {e}")
            return
        self.loop.unwatch(self.sock)
        self.sock.close()
        self.sock = fresh
        self.loop.watch(fresh, self._accept)
        self.log.event("control", "warning", result="recreated", path=self.path)

    def _accept(self) -> None:
        assert self.sock is not None
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        request = ControlRequest(conn)
        if peer_uid(conn) not in (0, os.geteuid()):
            self._refuse(request, "permission denied")
        elif not self.waiting.wait(request, READ_TIMEOUT_S, "no complete request in time"):
            self._refuse(request, "too many control requests at once")

    def _answer(self, request: ControlRequest, command: str) -> None:
        with request.conn as conn:
            send_reply(conn, self.answer(command))

    def _refuse(self, request: ControlRequest, reason: str) -> None:
        self.log.event("control", "warning", result="refused", reason=reason)
        with request.conn as conn:
            send_reply(conn, {"ok": False, "error": reason})

    def close(self) -> None:
        """Refuse what waits, stop serving and remove the socket file."""
        self.waiting.fail_all("netd is stopping")
        if self.sock is not None:
            self.loop.unwatch(self.sock)
            self.sock.close()
            self.sock = None
            remove_unix(Address(spec="control", scheme="unix", path=self.path))


def send_reply(conn: socket.socket, reply: dict[str, Any]) -> None:
    """Write one JSON reply line; a client that went away is not an error."""
    try:
        conn.settimeout(READ_TIMEOUT_S)
        for piece in _json_line(reply):
            conn.sendall(piece)
    except OSError:
        pass


def _json_line(reply: dict[str, Any]) -> Iterator[bytes]:
    """`reply` as one JSON line, its `services` encoded a few at a time: a status of
    thousands of services never becomes one string, whose memory the supervisor would
    keep as its high-water mark (2.4 MB more for 1,000 services, measured)."""
    services = reply.get("services")
    if not isinstance(services, list) or len(services) <= SERVICES_PER_PIECE:
        yield json.dumps(reply).encode() + b"\n"
        return
    rest = json.dumps({key: value for key, value in reply.items() if key != "services"})
    yield (rest[:-1] + (", " if len(reply) > 1 else "") + '"services": [').encode()
    for start in range(0, len(services), SERVICES_PER_PIECE):
        piece = ", ".join(json.dumps(s) for s in services[start:start + SERVICES_PER_PIECE])
        yield ((", " if start else "") + piece).encode()
    yield b"]}\n"


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
