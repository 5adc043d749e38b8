"""The classic built-in services, one row each: echo, discard, chargen, daytime, time.

Stream handlers run in a child with a blocking socket whose timeout is the service's
idle limit, so a dead or silent peer ends the child instead of spinning, and a peer
that never reads blocks the child in send() (bounded by the kernel's buffer) until
the timeout. Datagram handlers are pure functions of the request, answered inline
by the supervisor, since one datagram needs no process of its own.
"""

from __future__ import annotations

import random
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

CHUNK = 65536
CHARGEN_PRINTABLE = bytes(range(32, 127))
CHARGEN_LINE = 72
# Seconds between 1900-01-01 (RFC 868's epoch) and 1970-01-01.
RFC868_OFFSET_S = 2_208_988_800


def chargen_line(n: int) -> bytes:
    """Line `n` of RFC 864's rotating pattern: 72 printable characters and CRLF."""
    start = n % len(CHARGEN_PRINTABLE)
    doubled = CHARGEN_PRINTABLE + CHARGEN_PRINTABLE
    return doubled[start : start + CHARGEN_LINE] + b"\r\n"


CHARGEN_BLOCK = b"".join(chargen_line(n) for n in range(len(CHARGEN_PRINTABLE)))


def daytime_text() -> bytes:
    """RFC 867 leaves the format free; this is the one inetd uses, in local time."""
    return time.strftime("%A, %B %d, %Y %H:%M:%S-%Z").encode() + b"\r\n"


def time_bytes() -> bytes:
    """RFC 868: seconds since 1900 as a 32-bit big-endian number (wraps in 2036)."""
    return struct.pack("!I", (int(time.time()) + RFC868_OFFSET_S) & 0xFFFFFFFF)


def echo_stream(conn: socket.socket) -> None:
    while data := conn.recv(CHUNK):
        conn.sendall(data)


def discard_stream(conn: socket.socket) -> None:
    while conn.recv(CHUNK):
        pass


def chargen_stream(conn: socket.socket) -> None:
    # Ignore what the client sends (RFC 864); stop when it goes away.
    conn.shutdown(socket.SHUT_RD)
    while True:
        conn.sendall(CHARGEN_BLOCK)


def daytime_stream(conn: socket.socket) -> None:
    conn.sendall(daytime_text())


def time_stream(conn: socket.socket) -> None:
    conn.sendall(time_bytes())


def chargen_datagram(_request: bytes) -> bytes:
    size = random.randint(0, 512)
    return (CHARGEN_BLOCK * (size // len(CHARGEN_BLOCK) + 1))[:size]


@dataclass(frozen=True)
class Builtin:
    """One built-in service: how it serves a stream, and its reply to a datagram
    (netd.handlers.async_builtins serves the same streams in workers mode)."""

    name: str
    rfc: int
    stream: Callable[[socket.socket], None]
    datagram: Callable[[bytes], bytes | None]


BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in (
        Builtin("echo", 862, echo_stream, lambda request: request),
        Builtin("discard", 863, discard_stream, lambda request: None),
        Builtin("chargen", 864, chargen_stream, chargen_datagram),
        Builtin("daytime", 867, daytime_stream, lambda request: daytime_text()),
        Builtin("time", 868, time_stream, lambda request: time_bytes()),
    )
}
