"""Binding listening sockets for tcp, udp, unix and unix-dgram addresses.

A Unix socket path is only ever replaced when it is a socket nobody listens on; any
other file there is an error and is left alone.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

from netd.config.model import Address, Service


class BindError(OSError):
    """An address that cannot be listened on; the message names it and says why."""


def bind(address: Address, backlog: int, blocking: bool) -> socket.socket:
    """A bound (and, for streams, listening) socket for `address`."""
    sock = socket.socket(address.family, address.socktype)
    try:
        if address.path is not None:
            _clear_stale_unix(address)
            os.makedirs(os.path.dirname(address.path) or ".", mode=0o755, exist_ok=True)
            sock.bind(address.path)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if address.family == socket.AF_INET6:
                # v4 gets its own socket when wanted; a v6 socket must not grab v4 too.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address.sockaddr)  # type: ignore[arg-type]
        if address.is_stream:
            sock.listen(backlog)
        sock.setblocking(blocking)
    except OSError as e:
        sock.close()
        if isinstance(e, BindError):
            raise
        raise BindError(e.errno, f"cannot listen on {address}: {e.strerror}") from None
    return sock


def tune(sock: socket.socket, service: Service) -> None:
    """Set the TCP options a service asks for (xinetd's NODELAY and KEEPALIVE flags) on
    its listening socket: the connections accepted from it inherit them, and a wait-mode
    child gets them with the socket itself."""
    if sock.family == socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(service.nodelay))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(service.keepalive))


def _clear_stale_unix(address: Address) -> None:
    assert address.path is not None
    try:
        mode = os.lstat(address.path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise BindError(errno.EEXIST, f"cannot listen on {address}: {address.path} exists and "
                        "is not a socket; not touching it")
    probe = socket.socket(socket.AF_UNIX, address.socktype)
    try:
        probe.connect(address.path)
    except ConnectionRefusedError:
        os.unlink(address.path)  # a socket file left behind by a process that is gone
        return
    except OSError:
        return
    finally:
        probe.close()
    raise BindError(errno.EADDRINUSE, f"cannot listen on {address}: another process is "
                    f"listening on {address.path}")


def set_file_owner(path: str, uid: int | None, gid: int | None, mode: int | None) -> None:
    """Give a Unix socket file its configured owner, group and mode."""
    try:
        if uid is not None or gid is not None:
            os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
        if mode is not None:
            os.chmod(path, mode)
    except OSError as e:
        raise BindError(e.errno, f"cannot give {path} its owner and mode: {e.strerror}") \
            from None


def remove_unix(address: Address) -> None:
    """Remove the socket file of a unix address we bound (if it is still a socket)."""
    if address.path is None:
        return
    try:
        if stat.S_ISSOCK(os.lstat(address.path).st_mode):
            os.unlink(address.path)
    except OSError:
        pass
