"""The PROXY protocol, versions 1 and 2 (HAProxy's proxy-protocol.txt), as a pure parser.

A load balancer sends the header first on each connection to say who the real client
is. `parse` looks at the bytes received so far and answers one of three things:

- Incomplete(need): the bytes so far may still become a header; wait for `need` bytes
  in all. `need` never goes past the end of the header, so a reader that reads no more
  than `need` leaves the client's own first bytes in the socket for the child;
- ProxyHeader: a complete, valid header `length` bytes long;
- ProxyError: these bytes can never start a valid header (raised at the first byte
  that proves it).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

Endpoint = tuple[str, int]

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest line the spec allows, CRLF included
V1_PROTOCOLS = ("TCP4", "TCP6", "UNKNOWN")
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version/command, family/transport, length
V2_LOCAL, V2_PROXY = 0x0, 0x1
# family/transport byte -> (address size, port-struct format); others carry no addresses
V2_ADDRESSES = {0x11: (4, "!4s4sHH"), 0x12: (4, "!4s4sHH"),
                0x21: (16, "!16s16sHH"), 0x22: (16, "!16s16sHH")}
V2_UNIX_BLOCK = 216  # two 108-byte sun_path fields
SHORTEST = len(b"PROXY UNKNOWN\r\n")
DECIMAL = frozenset(b"0123456789")
V6_CHARS = frozenset("0123456789abcdefABCDEF:.")
# Enough endings to turn any prefix of a valid address or port into a valid one.
V4_ENDINGS = ("", "0", ".0", ".0.0", ".0.0.0", "0.0", "0.0.0", "0.0.0.0")
V6_ENDINGS = ("", "0", ":", "::", ":0", ".0", ".0.0", "0.0", "0.0.0")
PORT_ENDINGS = ("", "0")
# Every ending of a protocol name: what could complete a partly received one.
V1_PROTOCOL_ENDINGS = tuple(sorted({p[i:] for p in V1_PROTOCOLS for i in range(len(p) + 1)}))


class ProxyError(ValueError):
    """Bytes that can never become a valid PROXY header."""


@dataclass(frozen=True)
class Incomplete:
    """The bytes so far may become a header: wait until `need` bytes in all."""

    need: int


@dataclass(frozen=True)
class ProxyHeader:
    """A complete header of `length` bytes; endpoints are None for LOCAL and UNKNOWN."""

    version: int
    length: int
    source: Endpoint | None
    dest: Endpoint | None


def parse(buffer: bytes) -> Incomplete | ProxyHeader:
    """What the bytes received so far are: Incomplete, a ProxyHeader, or a ProxyError."""
    if not buffer:
        return Incomplete(SHORTEST)
    if buffer[:1] == V2_SIGNATURE[:1]:
        return _parse_v2(buffer)
    if not buffer.startswith(V1_PREFIX[:len(buffer)]):
        raise ProxyError("not a PROXY protocol header")
    return _parse_v1(buffer)


def _parse_v1(buffer: bytes) -> Incomplete | ProxyHeader:
    end = buffer.find(b"\r\n", 0, V1_MAX)
    if end >= 0:
        fields = _v1_fields(buffer[:end], complete=True)
        if fields[1] == "UNKNOWN":
            return ProxyHeader(1, end + 2, None, None)
        source = (_normal(fields[2]), int(fields[4]))
        dest = (_normal(fields[3]), int(fields[5]))
        return ProxyHeader(1, end + 2, source, dest)
    ends_in_cr = buffer.endswith(b"\r")
    need = len(buffer) + (1 if ends_in_cr else 2)
    if need > V1_MAX:
        raise ProxyError(f"v1 line has no CRLF within {V1_MAX} bytes")
    _v1_fields(buffer[:-1] if ends_in_cr else buffer, complete=ends_in_cr)
    return Incomplete(max(need, SHORTEST))


def _v1_fields(line: bytes, complete: bool) -> list[str]:
    """The checked fields of a v1 line; a partial last one passes if some ending makes it valid."""
    if any(not 0x20 <= byte <= 0x7E for byte in line):
        raise ProxyError("v1 line holds a byte that is not printable ASCII (or a lone CR/LF)")
    fields = line.decode("ascii").split(" ")
    last = len(fields) - 1

    def check(i: int, valid: Callable[[str], bool], endings: tuple[str, ...], what: str) -> None:
        if i > last:
            if complete:
                raise ProxyError(f"v1 line ends before its {what}")
            return
        token = fields[i]
        candidates = endings if (i == last and not complete) else ("",)
        if not any(valid(token + ending) for ending in candidates):
            raise ProxyError(f"v1 line: {token!r} is not a valid {what}")

    # parse() let through only prefixes of "PROXY ", so fields[0] is (part of) PROXY.
    protocol = fields[1] if last >= 1 else ""
    check(1, lambda t: t in V1_PROTOCOLS, V1_PROTOCOL_ENDINGS, "protocol")
    if protocol == "UNKNOWN" or (last < 2 and not complete):
        return fields  # receivers ignore whatever follows UNKNOWN
    if last > 5:
        raise ProxyError("v1 line has more than six fields")
    valid_ip, endings = (_canonical_v4, V4_ENDINGS) if protocol == "TCP4" else (_v6, V6_ENDINGS)
    check(2, valid_ip, endings, "source address")
    check(3, valid_ip, endings, "destination address")
    check(4, _port, PORT_ENDINGS, "source port")
    check(5, _port, PORT_ENDINGS, "destination port")
    return fields


def _normal(text: str) -> str:
    """An address as getpeername() would spell it (inet_ntop), e.g. ::ffff:1.2.3.4."""
    address = ipaddress.ip_address(text)
    return socket.inet_ntop(socket.AF_INET if address.version == 4 else socket.AF_INET6,
                            address.packed)


def _canonical_v4(text: str) -> bool:
    """Dotted decimal with no leading zeros (ipaddress would also take other spellings)."""
    try:
        return str(ipaddress.IPv4Address(text)) == text
    except ValueError:
        return False


def _v6(text: str) -> bool:
    """Any RFC 4291 text form, but no zone id."""
    if not text or not set(text) <= V6_CHARS:
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _port(text: str) -> bool:
    """Decimal 0-65535 with no leading zeros."""
    return (0 < len(text) <= 5 and set(text.encode()) <= DECIMAL
            and (text == "0" or text[0] != "0") and int(text) <= 65535)


def _parse_v2(buffer: bytes) -> Incomplete | ProxyHeader:
    if not buffer.startswith(V2_SIGNATURE[:len(buffer)]):
        raise ProxyError("not a PROXY protocol v2 signature")
    if len(buffer) > 12:
        version, command = buffer[12] >> 4, buffer[12] & 0x0F
        if version != 2:
            raise ProxyError(f"v2 header with version {version}")
        if command not in (V2_LOCAL, V2_PROXY):
            raise ProxyError(f"v2 header with unknown command {command:#x}")
        if command == V2_PROXY and len(buffer) > 13:
            _check_family(buffer[13])
    if len(buffer) < V2_FIXED:
        return Incomplete(V2_FIXED)
    command, family = buffer[12] & 0x0F, buffer[13]
    (length,) = struct.unpack_from("!H", buffer, 14)
    total = V2_FIXED + length
    if command == V2_LOCAL:
        # LOCAL: the proxy's own connection (a health check); the block is ignored.
        return Incomplete(total) if len(buffer) < total else ProxyHeader(2, total, None, None)
    block_size = _address_block_size(family)
    if length < block_size:
        raise ProxyError(f"v2 length {length} is too short for family {family:#04x}"
                         f" (needs {block_size})")
    if len(buffer) < total:
        return Incomplete(total)
    if block_size == 0:
        return ProxyHeader(2, total, None, None)  # UNSPEC: no addresses, nothing to walk
    block = buffer[V2_FIXED:total]
    _check_tlvs(block[block_size:])
    if family not in V2_ADDRESSES:
        return ProxyHeader(2, total, None, None)  # AF_UNIX: no IP endpoints to report
    size, layout = V2_ADDRESSES[family]
    src, dst, src_port, dst_port = struct.unpack_from(layout, block)
    af = socket.AF_INET if size == 4 else socket.AF_INET6
    return ProxyHeader(2, total, (socket.inet_ntop(af, src), src_port),
                       (socket.inet_ntop(af, dst), dst_port))


def _check_family(family: int) -> None:
    if family >> 4 > 3:
        raise ProxyError(f"v2 header with unknown address family {family >> 4:#x}")
    if family & 0x0F > 2:
        raise ProxyError(f"v2 header with unknown transport {family & 0x0F:#x}")


def _address_block_size(family: int) -> int:
    """Bytes the addresses take for a family/transport byte; 0 when it carries none."""
    if family >> 4 == 0 or family & 0x0F == 0:
        return 0
    if family >> 4 == 3:
        return V2_UNIX_BLOCK
    size, _ = V2_ADDRESSES[family]
    return 2 * size + 4


def _check_tlvs(data: bytes) -> None:
    """The bytes after the addresses must be whole type-length-value records."""
    offset = 0
    while offset < len(data):
        if len(data) - offset < 3:
            raise ProxyError("v2 header ends inside a TLV's type and length")
        (size,) = struct.unpack_from("!H", data, offset + 1)
        offset += 3 + size
        if offset > len(data):
            raise ProxyError("v2 TLV runs past the end of the header")
