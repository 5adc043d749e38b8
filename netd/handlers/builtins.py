"""The classic built-in services, one row each: echo, discard, chargen, daytime, time.

Stream handlers run in a child with a blocking socket whose timeout is the service's
idle limit, so a dead or silent peer ends the child instead of spinning, and a peer
that never reads blocks the child in send() (bounded by the kernel's buffer) until
the timeout. Datagram handlers are pure functions of the request, answered inline
by the supervisor, since one datagram needs no process of its own.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import time
from asyncio import StreamReader, StreamWriter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

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


# The same services as coroutines, for workers mode, where one event loop serves
# every connection of a worker; each wait is bounded by the idle timeout.


async def _idle(timeout_s: float, waiting: Awaitable[T]) -> T:
    async with asyncio.timeout(timeout_s):
        return await waiting


async def echo_async(reader: StreamReader, writer: StreamWriter, timeout_s: float) -> None:
    while data := await _idle(timeout_s, reader.read(CHUNK)):
        writer.write(data)
        await _idle(timeout_s, writer.drain())


async def discard_async(reader: StreamReader, writer: StreamWriter, timeout_s: float) -> None:
    while await _idle(timeout_s, reader.read(CHUNK)):
        pass


async def chargen_async(reader: StreamReader, writer: StreamWriter, timeout_s: float) -> None:
    while True:
        writer.write(CHARGEN_BLOCK)
        await _idle(timeout_s, writer.drain())


async def daytime_async(reader: StreamReader, writer: StreamWriter, timeout_s: float) -> None:
    writer.write(daytime_text())
    await _idle(timeout_s, writer.drain())


async def time_async(reader: StreamReader, writer: StreamWriter, timeout_s: float) -> None:
    writer.write(time_bytes())
    await _idle(timeout_s, writer.drain())


def chargen_datagram(_request: bytes) -> bytes:
    size = random.randint(0, 512)
    return (CHARGEN_BLOCK * (size // len(CHARGEN_BLOCK) + 1))[:size]


@dataclass(frozen=True)
class Builtin:
    """One built-in service: how it serves a stream (in a child of its own, or as a
    coroutine in a worker), and its reply to a datagram."""

    name: str
    rfc: int
    stream: Callable[[socket.socket], None]
    stream_async: Callable[[StreamReader, StreamWriter, float], Awaitable[None]]
    datagram: Callable[[bytes], bytes | None]


BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in (
        Builtin("echo", 862, echo_stream, echo_async, lambda request: request),
        Builtin("discard", 863, discard_stream, discard_async, lambda request: None),
        Builtin("chargen", 864, chargen_stream, chargen_async, chargen_datagram),
        Builtin("daytime", 867, daytime_stream, daytime_async, lambda request: daytime_text()),
        Builtin("time", 868, time_stream, time_async, lambda request: time_bytes()),
    )
}
