"""The classic built-in services, one row each: echo, discard, chargen, daytime, time.

A row says what the service sends on a stream and its reply to a datagram. Datagram
replies are pure functions of the request. Streams are served without a process of
their own, never blocking, in the loop of a spawner or a worker, as the row's `stream`
says (netd.handlers.inline).
"""

from __future__ import annotations

import random
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


def chargen_datagram(_request: bytes) -> bytes:
    size = random.randint(0, 512)
    return (CHARGEN_BLOCK * (size // len(CHARGEN_BLOCK) + 1))[:size]


@dataclass(frozen=True)
class Stream:
    """What a builtin does on a stream: send `greeting()` and close; or send back what
    comes (`echo`); or read and drop it; or send `endless` until the peer goes away."""

    greeting: Callable[[], bytes] | None = None
    echo: bool = False
    endless: bytes | None = None


@dataclass(frozen=True)
class Builtin:
    """One built-in service: what it does on a stream, and its reply to a datagram."""

    name: str
    rfc: int
    stream: Stream
    datagram: Callable[[bytes], bytes | None]


BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in (
        Builtin("echo", 862, Stream(echo=True), lambda request: request),
        Builtin("discard", 863, Stream(), lambda request: None),
        Builtin("chargen", 864, Stream(endless=CHARGEN_BLOCK), chargen_datagram),
        Builtin("daytime", 867, Stream(greeting=daytime_text), lambda request: daytime_text()),
        Builtin("time", 868, Stream(greeting=time_bytes), lambda request: time_bytes()),
    )
}
