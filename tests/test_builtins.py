"""The built-in services (RFC 862/863/864/867/868) over TCP and UDP, with a real netd."""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Netd, SyslogSink, children_of, connect, distinct_ports, recv_all

RFC868_OFFSET_S = 2_208_988_800
# RFC 864: the 95 printing characters (space through tilde) as a ring; line N holds
# characters N..N+71 (mod 95), then CRLF.
RING = "".join(chr(c) for c in range(32, 127))
LINE0 = ' !"#$%&\'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefg'
LINE1 = '!"#$%&\'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefgh'
BUILTINS = ("echo", "discard", "chargen", "daytime", "time")


def chargen_line(n: int) -> bytes:
    """Line n of the RFC 864 pattern, CRLF included."""
    return "".join(RING[(n + i) % 95] for i in range(72)).encode() + b"\r\n"




def all_builtins(host: str = "127.0.0.1") -> tuple[str, dict[str, int]]:
    """A config body with every builtin on TCP and UDP (same port each), and the ports."""
    ports: dict[str, int] = {}
    lines = ["services:"]
    numbers = distinct_ports(len(BUILTINS), host)
    for name, port in zip(BUILTINS, numbers, strict=True):
        spec = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        ports[name] = port
        lines += [f"  {name}:", f'    listen: ["tcp://{spec}", "udp://{spec}"]',
                  f"    builtin: {name}"]
    return "\n".join(lines) + "\n", ports




def udp_ask(port: int, data: bytes, host: str = "127.0.0.1", timeout_s: float = 5.0) -> bytes:
    """Send one datagram and return the one reply."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout_s)
        s.sendto(data, (host, port))
        reply, _ = s.recvfrom(65536)
        return reply


def client_port(s: socket.socket) -> int:
    return int(s.getsockname()[1])


def accept_pid(sink: SyslogSink, service: str, s: socket.socket) -> int:
    """The pid netd logged in event=accept for the connection `s` (the spawner that
    serves it inline)."""
    event = sink.wait_for(event="accept", service=service, peer=f"127.0.0.1:{client_port(s)}")
    assert event["mode"] == "inline", event
    return int(event["pid"])


def peer_of(s: socket.socket) -> str:
    """How netd's log lines name the client of `s`."""
    return f"127.0.0.1:{client_port(s)}"


def rss_kb(pid: int) -> int:
    """VmRSS of a live process, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def echo_roundtrip(port: int, data: bytes, host: str = "127.0.0.1") -> bytes:
    """Send `data` to a stream echo while reading back, then half-close; returns all read."""
    with connect(port, host) as s:
        errors: list[BaseException] = []

        def write() -> None:
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
            except BaseException as e:  # reported by the reader
                errors.append(e)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        got = recv_all(s, limit=len(data) + 1)
        writer.join(timeout=10)
        assert not errors, errors
        return got


@pytest.fixture
def builtins_netd(start_netd: Callable[..., Netd],
                  sink: SyslogSink) -> tuple[Netd, dict[str, int]]:
    body, ports = all_builtins()
    return start_netd(body), ports


def test_echo_tcp_short_and_binary(builtins_netd: tuple[Netd, dict[str, int]]) -> None:
    """Echo sends back exactly what it got, text or arbitrary bytes (NUL, 0xff, CRLF)."""
    _, ports = builtins_netd
    assert echo_roundtrip(ports["echo"], b"hello netd\r\n") == b"hello netd\r\n"
    junk = bytes(range(256)) * 64 + b"\x00\xff\r\n\x00"
    assert echo_roundtrip(ports["echo"], junk) == junk


def test_echo_tcp_one_megabyte(builtins_netd: tuple[Netd, dict[str, int]]) -> None:
    """A 1 MB stream, written while it is read back, comes back byte for byte."""
    _, ports = builtins_netd
    payload = bytes((i * 7 + i // 251) & 0xFF for i in range(1 << 20))
    got = echo_roundtrip(ports["echo"], payload)
    assert len(got) == len(payload)
    assert got == payload


def test_echo_udp(builtins_netd: tuple[Netd, dict[str, int]]) -> None:
    """A UDP echo datagram comes back unchanged, binary and a few kB included."""
    _, ports = builtins_netd
    assert udp_ask(ports["echo"], b"ping") == b"ping"
    junk = bytes(range(256)) * 31 + b"\x00"
    assert udp_ask(ports["echo"], junk) == junk


def test_discard_tcp_and_udp(builtins_netd: tuple[Netd, dict[str, int]], sink: SyslogSink) -> None:
    """Discard swallows a stream (EOF, no bytes back) and never answers a datagram."""
    _, ports = builtins_netd
    assert echo_roundtrip(ports["discard"], b"x" * 200_000) == b""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        s.sendto(b"anyone there?", ("127.0.0.1", ports["discard"]))
        with pytest.raises(socket.timeout):
            s.recvfrom(65536)
    # The datagram did reach netd (it logs it at debug), it just got no answer.
    sink.wait_for(event="datagram", service="discard")


def test_chargen_tcp_pattern(builtins_netd: tuple[Netd, dict[str, int]]) -> None:
    """TCP chargen streams RFC 864's rotating 72-character lines, from line 0, wrapping at 95."""
    _, ports = builtins_netd
    lines_wanted = 200
    size = lines_wanted * 74
    with connect(ports["chargen"]) as s:
        s.sendall(b"ignored input\r\n")
        data = b""
        while len(data) < size:
            chunk = s.recv(65536)
            assert chunk, "chargen closed the stream"
            data += chunk
    lines = data[:size].split(b"\r\n")[:lines_wanted]
    assert lines[0] == LINE0.encode()
    assert lines[1] == LINE1.encode()
    assert all(len(line) == 72 for line in lines)
    for n in range(lines_wanted):
        assert lines[n] + b"\r\n" == chargen_line(n), f"line {n}"
    assert lines[95] == lines[0]


def test_chargen_udp(builtins_netd: tuple[Netd, dict[str, int]]) -> None:
    """A UDP chargen reply is 0-512 characters taken from the pattern, whatever was sent."""
    _, ports = builtins_netd
    stream = b"".join(chargen_line(n) for n in range(2 * 95))
    sizes = set()
    for i in range(20):
        reply = udp_ask(ports["chargen"], b"q" * i)
        assert len(reply) <= 512
        assert reply in stream, reply[:80]
        sizes.add(len(reply))
    assert len(sizes) > 1, "every reply had the same size; RFC 864 asks for a random one"


def check_daytime(text: bytes) -> None:
    line = text.decode("ascii")
    assert line.endswith("\n") and line.count("\n") == 1, repr(line)
    assert 8 <= len(line) <= 100, repr(line)
    years = {time.strftime("%Y", time.localtime(time.time() + d)) for d in (-60, 0, 60)}
    assert any(y in line for y in years), repr(line)
    assert re.search(r"\b\d{1,2}:\d\d(:\d\d)?\b", line), f"no hh:mm:ss in {line!r}"
    assert all(" " <= c <= "~" for c in line.rstrip("\r\n")), repr(line)


def test_daytime_tcp_and_udp(builtins_netd: tuple[Netd, dict[str, int]]) -> None:
    """Daytime (RFC 867) sends one human-readable date line, then closes the stream."""
    _, ports = builtins_netd
    with connect(ports["daytime"]) as s:
        check_daytime(recv_all(s))
    check_daytime(udp_ask(ports["daytime"], b"\n"))


def check_time(data: bytes) -> None:
    assert len(data) == 4, data
    (seconds,) = struct.unpack("!I", data)
    now = int(time.time()) + RFC868_OFFSET_S
    assert abs(seconds - now) <= 5, (seconds, now)


def test_time_tcp_and_udp(builtins_netd: tuple[Netd, dict[str, int]]) -> None:
    """Time (RFC 868) is 4 bytes big-endian, seconds since 1900, close to now."""
    _, ports = builtins_netd
    with connect(ports["time"]) as s:
        check_time(recv_all(s))
    check_time(udp_ask(ports["time"], b""))


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no ::1 on this host")
def test_builtins_on_ipv6(start_netd: Callable[..., Netd], sink: SyslogSink) -> None:
    """Every builtin answers on [::1] over TCP and UDP; logs write [IP]:PORT."""
    body, ports = all_builtins("::1")
    start_netd(body)
    assert echo_roundtrip(ports["echo"], b"six\n", "::1") == b"six\n"
    assert udp_ask(ports["echo"], b"six", "::1") == b"six"
    with connect(ports["chargen"], "::1") as s:
        assert s.recv(74, socket.MSG_WAITALL) == LINE0.encode() + b"\r\n"
        local_port = client_port(s)
    with connect(ports["time"], "::1") as s:
        check_time(recv_all(s))
    check_time(udp_ask(ports["time"], b"", "::1"))
    with connect(ports["daytime"], "::1") as s:
        check_daytime(recv_all(s))
    assert len(udp_ask(ports["chargen"], b"", "::1")) <= 512
    event = sink.wait_for(event="accept", service="chargen", peer=f"[::1]:{local_port}")
    assert event["local"] == f"[::1]:{ports['chargen']}"


def test_chargen_reader_that_never_reads(start_netd: Callable[..., Netd],
                                         sink: SyslogSink) -> None:
    """A chargen client that never reads leaves its connection waiting, not growing the
    spawner that serves it; a reset ends it.

    Meanwhile the spawner keeps serving other clients.
    """
    body, ports = all_builtins()
    start_netd(body)
    with connect(ports["chargen"]) as lazy:
        lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        pid = accept_pid(sink, "chargen", lazy)
        peer = peer_of(lazy)
        time.sleep(1.0)  # let the socket buffers fill
        first_kb = rss_kb(pid)
        # The spawner answers others while that connection cannot take more.
        assert echo_roundtrip(ports["echo"], b"still here\n") == b"still here\n"
        check_time(udp_ask(ports["time"], b""))
        time.sleep(3.0)
        later_kb = rss_kb(pid)
        assert later_kb - first_kb < 8 * 1024, (first_kb, later_kb)
        assert not sink.find(event="close", peer=peer), "netd gave up on a live client"
        # A rude abort (RST), which RFC 864 says the server must expect.
        lazy.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sink.wait_for(event="close", service="chargen", peer=peer)
    with connect(ports["chargen"]) as again:
        assert again.recv(74, socket.MSG_WAITALL) == LINE0.encode() + b"\r\n"


def test_client_closing_mid_echo_ends_child(start_netd: Callable[..., Netd],
                                            sink: SyslogSink) -> None:
    """A client that writes, reads a little, then closes ends its echo connection."""
    body, ports = all_builtins()
    start_netd(body)
    s = connect(ports["echo"])
    try:
        accept_pid(sink, "echo", s)
        peer = peer_of(s)
        s.sendall(b"e" * 65536)
        assert s.recv(1024)
    finally:
        s.close()
    sink.wait_for(event="close", service="echo", peer=peer)
    assert echo_roundtrip(ports["echo"], b"next\n") == b"next\n"


def test_many_short_connections_start_no_process(start_netd: Callable[..., Netd],
                                                   sink: SyslogSink) -> None:
    """50 daytime connections: 50 accepts and 50 closes (reason done), served by the
    spawner itself: no process is started for any of them."""
    body, ports = all_builtins()
    netd = start_netd(body)
    spawners = children_of(netd.proc.pid)
    peers = []
    for _ in range(50):
        with connect(ports["daytime"]) as s:
            check_daytime(recv_all(s))
            accept_pid(sink, "daytime", s)
            peers.append(peer_of(s))
    for peer in peers:
        assert sink.wait_for(event="close", peer=peer)["reason"] == "done"
    assert not sink.find(event="exit")
    for spawner in spawners:
        assert not children_of(spawner)


def test_builtins_in_workers_mode(start_netd: Callable[..., Netd], sink: SyslogSink) -> None:
    """With workers: the same RFC behaviour from long-lived workers, and a silent peer
    is disconnected after the idle timeout (event=close reason=timeout)."""
    echo, chargen, daytime, tm = distinct_ports(4)
    start_netd(f"""
        services:
          echo:
            listen: tcp://127.0.0.1:{echo}
            builtin: echo
            workers: 2
            timeout: 1s
          chargen:
            listen: tcp://127.0.0.1:{chargen}
            builtin: chargen
            workers: 1
          daytime:
            listen: tcp://127.0.0.1:{daytime}
            builtin: daytime
            workers: 1
          time:
            listen: tcp://127.0.0.1:{tm}
            builtin: time
            workers: 1
        """)
    assert echo_roundtrip(echo, b"\x00binary\xffjunk\n" * 1000) == b"\x00binary\xffjunk\n" * 1000
    with connect(chargen) as s:
        first = b""
        while len(first) < 3 * 74:
            first += s.recv(4096)
    assert first[: 3 * 74] == chargen_line(0) + chargen_line(1) + chargen_line(2)
    with connect(daytime) as s:
        check_daytime(recv_all(s))
    with connect(tm) as s:
        check_time(recv_all(s))
    with connect(echo) as idle:
        assert recv_all(idle) == b""  # closed by netd after 1 s of silence
    close = sink.wait_for(event="close", service="echo")
    assert close["reason"] == "timeout"
    assert all(e.get("mode") == "workers" for e in sink.find(event="accept"))
