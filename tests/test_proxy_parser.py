"""netd.proxy.parse on PROXY protocol v1 and v2 headers: hand-built valid and invalid
headers, every truncation of valid ones, early rejection, and property-based fuzzing
(random bytes, mutated headers) that may raise nothing but ProxyError.

Expected results are written out by the test, never computed with netd's own code.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netd.proxy import Incomplete, ProxyError, ProxyHeader, parse

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
PAYLOAD = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROPERTY = settings(max_examples=150, deadline=None)


def v2(command: int = 1, family: int = 0x11, block: bytes = b"", length: int | None = None,
       version: int = 2) -> bytes:
    """A v2 header built field by field; `length` defaults to the block's."""
    size = len(block) if length is None else length
    return SIG + bytes([version << 4 | command, family]) + struct.pack("!H", size) + block


def inet_block(src: str, dst: str, sport: int, dport: int) -> bytes:
    """The address block for two IPs of the same family and their ports."""
    return (ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed
            + struct.pack("!HH", sport, dport))


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


# -- valid headers, written by hand -------------------------------------------------------

V1_TCP4 = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
# The header HAProxy's send-proxy-v2 put on the wire in a public capture (hexdump):
# 0d0a0d0a000d0a515549540a 21 11 000c ac130001 ac130003 a652 0050
HAPROXY_V2_CAPTURE = bytes.fromhex("0d0a0d0a000d0a515549540a2111000cac130001ac130003a6520050")

VALID = [
    pytest.param(V1_TCP4, ProxyHeader(1, 47, ("192.168.0.1", 56324), ("192.168.0.11", 443)),
                 id="v1-tcp4-spec-example"),
    pytest.param(b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
                 ProxyHeader(1, 56, ("255.255.255.255", 65535), ("255.255.255.255", 65535)),
                 id="v1-tcp4-longest"),
    pytest.param(b"PROXY TCP4 0.0.0.0 10.0.0.1 0 7\r\n",
                 ProxyHeader(1, 33, ("0.0.0.0", 0), ("10.0.0.1", 7)), id="v1-tcp4-zeros"),
    pytest.param(b"PROXY TCP6 ::1 2001:db8::2 1234 80\r\n",
                 ProxyHeader(1, 36, ("::1", 1234), ("2001:db8::2", 80)), id="v1-tcp6-short"),
    pytest.param(b"PROXY TCP6 2001:0DB8:0000:0000:0000:0000:0000:0001 ::ffff:10.1.2.3 1 2\r\n",
                 ProxyHeader(1, 72, ("2001:db8::1", 1), ("::ffff:10.1.2.3", 2)),
                 id="v1-tcp6-long-and-mapped"),
    pytest.param(b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
                 b" ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
                 ProxyHeader(1, 104, ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
                             ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)),
                 id="v1-tcp6-longest"),
    pytest.param(b"PROXY UNKNOWN\r\n", ProxyHeader(1, 15, None, None), id="v1-unknown-short"),
    pytest.param(b"PROXY UNKNOWN ffff:f::f ffff:f::f 65535 65535\r\n",
                 ProxyHeader(1, 47, None, None), id="v1-unknown-with-ignored-fields"),
    pytest.param(HAPROXY_V2_CAPTURE,
                 ProxyHeader(2, 28, ("172.19.0.1", 42578), ("172.19.0.3", 80)),
                 id="v2-haproxy-capture"),
    pytest.param(v2(1, 0x21, inet_block("2001:db8::1", "::ffff:1.2.3.4", 65535, 0)),
                 ProxyHeader(2, 52, ("2001:db8::1", 65535), ("::ffff:1.2.3.4", 0)),
                 id="v2-tcp6"),
    pytest.param(v2(1, 0x12, inet_block("10.0.0.1", "10.0.0.2", 53, 5353)),
                 ProxyHeader(2, 28, ("10.0.0.1", 53), ("10.0.0.2", 5353)), id="v2-udp4"),
    pytest.param(v2(1, 0x22, inet_block("::2", "::3", 1, 2)),
                 ProxyHeader(2, 52, ("::2", 1), ("::3", 2)), id="v2-udp6"),
    pytest.param(v2(1, 0x11, inet_block("1.2.3.4", "5.6.7.8", 1, 2)
                    + tlv(0x01, b"h2") + tlv(0x04, b"") + tlv(0xE0, b"x" * 300)),
                 ProxyHeader(2, 28 + 5 + 3 + 303, ("1.2.3.4", 1), ("5.6.7.8", 2)),
                 id="v2-tcp4-with-tlvs"),
    pytest.param(v2(0, 0x00), ProxyHeader(2, 16, None, None), id="v2-local"),
    pytest.param(v2(0, 0x11, inet_block("1.2.3.4", "5.6.7.8", 1, 2)),
                 ProxyHeader(2, 28, None, None), id="v2-local-ignores-addresses"),
    pytest.param(v2(0, 0xFF, b"junk"), ProxyHeader(2, 20, None, None),
                 id="v2-local-ignores-family"),
    pytest.param(v2(1, 0x00, b"whatever"), ProxyHeader(2, 24, None, None), id="v2-unspec"),
    pytest.param(v2(1, 0x10, b"\x01\x02"), ProxyHeader(2, 18, None, None),
                 id="v2-inet-unspec-transport"),
    pytest.param(v2(1, 0x31, b"/a".ljust(108, b"\0") + b"/b".ljust(108, b"\0") + tlv(2, b"h")),
                 ProxyHeader(2, 16 + 216 + 4, None, None), id="v2-unix-stream"),
]


@pytest.mark.parametrize(("header", "expected"), VALID)
def test_valid_header_is_parsed_and_the_payload_left_alone(header: bytes,
                                                            expected: ProxyHeader) -> None:
    assert expected.length == len(header)
    assert parse(header) == expected
    assert parse(header + PAYLOAD) == expected


@pytest.mark.parametrize(("header", "expected"), VALID)
def test_every_truncation_asks_for_more_without_reading_past_the_header(
        header: bytes, expected: ProxyHeader) -> None:
    for cut in range(len(header)):
        result = parse(header[:cut])
        assert isinstance(result, Incomplete), (cut, result)
        assert cut < result.need <= len(header), (cut, result)


def test_a_reader_following_need_stops_exactly_at_the_header_end() -> None:
    stream = V1_TCP4 + PAYLOAD
    buffer = b""
    reads = 0
    while isinstance(result := parse(buffer), Incomplete):
        buffer = stream[:result.need]
        reads += 1
        assert reads < 100
    assert result.length == len(buffer) == len(V1_TCP4)


# -- invalid headers, each rejected at the first byte that proves it ----------------------

TCP4_OK = inet_block("1.2.3.4", "5.6.7.8", 1, 2)

# (bytes, how many bytes it takes to know they can never be a header)
INVALID = [
    pytest.param(b"GET / HTTP/1.1\r\n", 1, id="http"),
    pytest.param(b"SSH-2.0-OpenSSH_9.2\r\n", 1, id="ssh"),
    pytest.param(b"\x16\x03\x01\x02\x00\x01", 1, id="tls-client-hello"),
    pytest.param(b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", 1, id="v1-lowercase"),
    pytest.param(b"PROXY\r\n", 6, id="v1-no-protocol"),
    pytest.param(b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", 7, id="v1-double-space"),
    pytest.param(b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", 10, id="v1-tcp5"),
    pytest.param(b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", 8, id="v1-udp4"),
    pytest.param(b"PROXY UNKNOWNX\r\n", 14, id="v1-unknown-glued"),
    pytest.param(b"PROXY TCP4\r\n", 11, id="v1-tcp4-cut"),
    pytest.param(b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", 13, id="v1-leading-zero-ip"),
    pytest.param(b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", 20, id="v1-octet-256"),
    pytest.param(b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", 17, id="v1-three-octets"),
    pytest.param(b"PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n", 19, id="v1-five-octets"),
    pytest.param(b"PROXY TCP4 ::1 ::1 1 2\r\n", 12, id="v1-v6-in-tcp4"),
    pytest.param(b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", 13, id="v1-v4-in-tcp6"),
    pytest.param(b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", 19, id="v1-zone-id"),
    pytest.param(b"PROXY TCP6 1::2::3 ::1 1 2\r\n", 17, id="v1-two-double-colons"),
    pytest.param(b"PROXY TCP6 12345::1 ::1 1 2\r\n", 16, id="v1-long-hex-group"),
    pytest.param(b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", 27, id="v1-nine-groups"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", 29, id="v1-leading-zero-port"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", 32, id="v1-port-65536"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", 28, id="v1-negative-port"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", 29, id="v1-missing-port"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", 31, id="v1-extra-field"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", 31, id="v1-bare-lf"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", 32, id="v1-cr-cr-lf"),
    pytest.param(b"PROXY UNKNOWN\n\r\n", 14, id="v1-unknown-bare-lf"),
    pytest.param(b"PROXY UNKNOWN x\ny\r\n", 16, id="v1-unknown-lf-in-ignored-part"),
    pytest.param(b"PROXY UNKNOWN x\ry\r\n", 17, id="v1-unknown-cr-in-ignored-part"),
    pytest.param(b"PROXY UNKNOWN \x00\r\n", 15, id="v1-unknown-nul"),
    pytest.param(b"PROXY UNKNOWN \xff\r\n", 15, id="v1-unknown-8-bit"),
    pytest.param(b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n", 19, id="v1-tab"),
    pytest.param("PROXY TCP4 1.2.3.4 5.6.7.8 1 ٢\r\n".encode(), 30, id="v1-non-ascii-digit"),
    pytest.param(b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n", 106, id="v1-108-bytes"),
    pytest.param(b"PROXY UNKNOWN " + b"x" * 200, 106, id="v1-no-crlf"),
    pytest.param(SIG[:5] + b"\x01", 6, id="v2-bad-signature"),
    pytest.param(v2(version=1, block=TCP4_OK), 13, id="v2-version-1"),
    pytest.param(v2(version=3, block=TCP4_OK), 13, id="v2-version-3"),
    pytest.param(v2(command=2, block=TCP4_OK), 13, id="v2-command-2"),
    pytest.param(v2(command=0xF, block=TCP4_OK), 13, id="v2-command-f"),
    pytest.param(v2(family=0x41, block=TCP4_OK), 14, id="v2-family-4"),
    pytest.param(v2(family=0x13, block=TCP4_OK), 14, id="v2-transport-3"),
    pytest.param(v2(family=0x11, block=TCP4_OK[:11]), 16, id="v2-tcp4-short-block"),
    pytest.param(v2(family=0x21, block=TCP4_OK), 16, id="v2-tcp6-with-tcp4-block"),
    pytest.param(v2(family=0x31, block=b"\0" * 215), 16, id="v2-unix-short-block"),
    pytest.param(v2(block=TCP4_OK + b"\x01\x00"), 30, id="v2-tlv-cut-in-its-length"),
    pytest.param(v2(block=TCP4_OK + b"\x01\x00\x05abcd"), 35, id="v2-tlv-past-the-end"),
    pytest.param(v2(block=TCP4_OK + tlv(1, b"ok") + b"\x04"), 34, id="v2-trailing-byte"),
]


@pytest.mark.parametrize(("data", "known_bad_at"), INVALID)
def test_invalid_input_is_rejected_as_soon_as_it_can_never_be_valid(data: bytes,
                                                                   known_bad_at: int) -> None:
    for cut in range(known_bad_at):
        assert isinstance(parse(data[:cut]), Incomplete), cut
    for cut in range(known_bad_at, len(data) + 1):
        with pytest.raises(ProxyError):
            parse(data[:cut])
    with pytest.raises(ProxyError):
        parse(data + PAYLOAD)


def test_proxy_error_is_a_value_error_with_a_reason() -> None:
    with pytest.raises(ValueError, match="leading|not a valid source address"):
        parse(b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n")
    with pytest.raises(ProxyError, match="version 3"):
        parse(SIG + b"\x31")


# -- generated headers ----------------------------------------------------------------------


@st.composite
def v6_text(draw: st.DrawFn) -> tuple[str, str]:
    """An IPv6 address in any valid spelling, and the inet_ntop spelling expected."""
    # Groups with or without leading zeros, in either case; the last 32 bits maybe dotted;
    # any run of zero groups (not only the longest) maybe written "::".
    address = draw(st.ip_addresses(v=6) | st.sampled_from(
        [ipaddress.IPv6Address(a) for a in ("::", "::1", "1::", "::ffff:1.2.3.4", "1:0:0:2::")]))
    assert isinstance(address, ipaddress.IPv6Address)
    groups = [int(g, 16) for g in address.exploded.split(":")]
    words = [draw(st.sampled_from([f"{g:x}", f"{g:04x}", f"{g:X}"])) for g in groups]
    zero = [g == 0 for g in groups]
    if draw(st.booleans()):
        words[6:] = [str(ipaddress.IPv4Address(address.packed[12:]))]
        zero[6:] = [False]
    zero_runs = [(i, j) for i in range(len(words)) for j in range(i + 1, len(words) + 1)
                 if all(zero[i:j])]
    compress: bool = draw(st.booleans())
    if zero_runs and compress:
        i, j = draw(st.sampled_from(zero_runs))
        text = ":".join(words[:i]) + "::" + ":".join(words[j:])
    else:
        text = ":".join(words)
    return text, socket.inet_ntop(socket.AF_INET6, address.packed)


ports = st.integers(0, 65535)


@st.composite
def v1_headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    """A valid v1 header and what it says."""
    kind = draw(st.sampled_from(["TCP4", "TCP6", "UNKNOWN"]))
    if kind == "UNKNOWN":
        rest = draw(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=92))
        line = ("PROXY UNKNOWN" + (" " + rest if rest or draw(st.booleans()) else "")).encode()
        return line + b"\r\n", ProxyHeader(1, len(line) + 2, None, None)
    if kind == "TCP4":
        src = str(draw(st.ip_addresses(v=4)))
        dst = str(draw(st.ip_addresses(v=4)))
        src_said, dst_said = src, dst
    else:
        src, src_said = draw(v6_text())
        dst, dst_said = draw(v6_text())
    sport, dport = draw(ports), draw(ports)
    line = f"PROXY {kind} {src} {dst} {sport} {dport}\r\n".encode()
    if len(line) > 107:  # two long spellings can overflow the line; use the short ones
        line = f"PROXY {kind} {src_said} {dst_said} {sport} {dport}\r\n".encode()
    return line, ProxyHeader(1, len(line), (src_said, sport), (dst_said, dport))


@st.composite
def v2_headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    """A valid v2 header (any command, family and TLVs) and what it says."""
    tlvs = b"".join(tlv(kind, value) for kind, value in draw(st.lists(
        st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4)))
    case = draw(st.sampled_from(["inet", "inet6", "unix", "unspec", "local"]))
    if case == "local":
        block = draw(st.binary(max_size=64))
        family = draw(st.integers(0, 255))
        header = v2(0, family, block)
        return header, ProxyHeader(2, len(header), None, None)
    if case == "unspec":
        family = draw(st.sampled_from([0x00, 0x01, 0x02, 0x10, 0x20, 0x30]))
        header = v2(1, family, draw(st.binary(max_size=64)))
        return header, ProxyHeader(2, len(header), None, None)
    transport = draw(st.sampled_from([1, 2]))
    if case == "unix":
        header = v2(1, 0x30 | transport, draw(st.binary(min_size=216, max_size=216)) + tlvs)
        return header, ProxyHeader(2, len(header), None, None)
    version: Literal[4, 6] = 4 if case == "inet" else 6
    src, dst = draw(st.ip_addresses(v=version)), draw(st.ip_addresses(v=version))
    sport, dport = draw(ports), draw(ports)
    family = (0x10 if version == 4 else 0x20) | transport
    header = v2(1, family, inet_block(str(src), str(dst), sport, dport) + tlvs)
    af = socket.AF_INET if version == 4 else socket.AF_INET6
    return header, ProxyHeader(2, len(header), (socket.inet_ntop(af, src.packed), sport),
                               (socket.inet_ntop(af, dst.packed), dport))


headers = st.one_of(v1_headers(), v2_headers())


@PROPERTY
@given(headers, st.binary(max_size=64))
def test_generated_valid_headers_parse_to_what_they_say(case: tuple[bytes, ProxyHeader],
                                                        payload: bytes) -> None:
    header, expected = case
    assert parse(header + payload) == expected


@PROPERTY
@given(headers)
def test_no_truncation_of_a_generated_header_is_an_error(case: tuple[bytes, ProxyHeader]) -> None:
    header, _ = case
    for cut in range(len(header)):
        result = parse(header[:cut])
        assert isinstance(result, Incomplete), (cut, result)
        assert cut < result.need <= len(header)


@PROPERTY
@given(headers, st.binary(min_size=1, max_size=64), st.lists(st.integers(1, 64), min_size=1))
def test_a_peeking_reader_never_consumes_the_clients_bytes(
        case: tuple[bytes, ProxyHeader], payload: bytes, arrivals: list[int]) -> None:
    """Peek at what has arrived; on Incomplete every byte so far is header, so take it all."""
    header, expected = case
    stream = header + payload
    consumed, arrived = b"", 0
    for size in arrivals * (len(stream) // min(arrivals) + 1):
        arrived = min(len(stream), arrived + size)
        peeked = stream[len(consumed):arrived]
        result = parse(consumed + peeked)
        if isinstance(result, ProxyHeader):
            break
        consumed += peeked
        assert len(consumed) < len(header)
    assert result == expected
    assert stream[result.length:] == payload


# -- fuzzing: never an exception but ProxyError, never a header with bad fields -------------


def check_consistent(data: bytes) -> None:
    """parse(data) is Incomplete, a sane header, or ProxyError, and so are its prefixes."""
    try:
        result = parse(data)
    except ProxyError:
        return
    if isinstance(result, Incomplete):
        assert result.need > len(data)
        assert result.need <= 16 + 65535
        return
    assert_sane(result, data)
    for cut in range(result.length):
        assert isinstance(parse(data[:cut]), Incomplete)


def assert_sane(header: ProxyHeader, data: bytes) -> None:
    """Everything a header says is well-formed and comes from its own bytes."""
    assert header.version in (1, 2)
    assert 0 < header.length <= len(data)
    own = data[:header.length]
    if header.version == 1:
        assert header.length <= 107
        assert own.startswith(b"PROXY ") and own.endswith(b"\r\n")
        assert b"\r" not in own[:-2] and b"\n" not in own[:-2]
    else:
        assert own.startswith(SIG)
        assert header.length == 16 + struct.unpack_from("!H", own, 14)[0]
    assert parse(own) == header
    assert (header.source is None) == (header.dest is None)
    if header.source is not None and header.dest is not None:
        families = set()
        for ip, port in (header.source, header.dest):
            address = ipaddress.ip_address(ip)
            families.add(address.version)
            af = socket.AF_INET if address.version == 4 else socket.AF_INET6
            assert socket.inet_ntop(af, address.packed) == ip
            assert 0 <= port <= 65535
        assert len(families) == 1


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    check_consistent(data)


@FUZZ
@given(st.sampled_from([b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN", SIG,
                        SIG + b"\x21\x11", SIG + b"\x20"]),
       st.binary(max_size=120) | st.text("0123456789abcdef.: \r\nPROXYTCUNKW", max_size=120)
       .map(str.encode))
def test_plausible_prefixes_with_random_tails(prefix: bytes, tail: bytes) -> None:
    check_consistent(prefix + tail)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid header with a few bytes replaced, inserted or deleted, or cut."""
    data = bytearray(draw(headers)[0] + draw(st.binary(max_size=16)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["replace", "insert", "delete", "cut"]))
        byte = draw(st.sampled_from([0, 0x0A, 0x0D, 0x20, 0x2E, 0x30, 0x3A, 0xFF])
                    | st.integers(0, 255))
        if action == "replace" and at < len(data):
            data[at] = byte
        elif action == "insert":
            data.insert(at, byte)
        elif action == "delete" and at < len(data):
            del data[at]
        elif action == "cut":
            del data[at:]
    return bytes(data)


@FUZZ
@given(mutated())
def test_mutated_valid_headers(data: bytes) -> None:
    check_consistent(data)


def check_monotonic(data: bytes, more: bytes) -> None:
    """More bytes never undo an error, and never change a complete header."""
    try:
        before = parse(data)
    except ProxyError:
        with pytest.raises(ProxyError):
            parse(data + more)
        return
    if isinstance(before, ProxyHeader):
        assert parse(data + more) == before


@PROPERTY
@given(st.binary(max_size=120), st.binary(min_size=1, max_size=40))
def test_more_bytes_after_random_bytes(data: bytes, more: bytes) -> None:
    check_monotonic(data, more)


@PROPERTY
@given(mutated(), st.binary(min_size=1, max_size=40))
def test_more_bytes_after_a_mutated_header(data: bytes, more: bytes) -> None:
    check_monotonic(data, more)
