"""Hostile input against a real netd (issue 4, item 7).

Each test starts one netd with every builtin (TCP and UDP), a PROXY-protocol service,
a held exec service with `instances: 5` and a `probe` service, takes a baseline of
the supervisor's resident memory (VmRSS) and open fds (/proc/PID/fd), then attacks
while a prober thread connects to `probe` every 20 ms and times how long the answer
takes. Every test checks that:

- every probe was answered (how fast is a figure, not a test: bench/hostile.py);
- once the attack is over, the supervisor's fd count is back at its baseline and its
  memory within MEMORY_SLACK_KB of it;
- nothing crashed: no event=error, and the supervisor still serves.

The figures seen (worst probe latency, memory growth) are printed as `HOSTILE ...`
lines (`pytest -s` shows them), for information only: a loaded machine makes any
latency bound fail (one test here measured 1.04 s once), so the latency under attack is
measured on a quiet machine by bench/hostile.py instead.

Covered elsewhere, not repeated here: a billion-laughs alias bomb and non-UTF-8 bytes
in the main file via `netd check` (test_config.py::test_alias_bomb_is_a_clean_error,
test_non_utf8_bytes_are_a_clean_error); control-socket garbage (test_daemon.py);
the PROXY parser on millions of generated inputs (test_proxy_parser.py).
"""

from __future__ import annotations

import os
import pwd
import random
import signal
import socket
import struct
import subprocess
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import (
    Netd,
    SyslogSink,
    children_of,
    free_port,
    free_tcp_udp_port,
    recv_all,
    run_netd,
    write_config,
)

IS_ROOT = os.geteuid() == 0
WAIT_S = 10.0
MEMORY_SLACK_KB = 8 * 1024   # what "back near baseline" allows for allocator slack
BUILTINS = ("echo", "discard", "chargen", "daytime", "time")
V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


# -- the netd under attack, and the watch on it --------------------------------------


@dataclass
class Target:
    """A running netd and its ports."""

    netd: Netd
    sink: SyslogSink
    ports: dict[str, int]

    @property
    def pid(self) -> int:
        return self.netd.proc.pid


def rss_kb(pid: int) -> int:
    """The process's resident set size in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Watch:
    """Probes `probe` (daytime) every 20 ms from a thread; records each latency."""

    port: int
    latencies: list[float] = field(default_factory=list)
    when: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _probe_once(self) -> None:
        started = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                data = recv_all(s)
        except OSError as e:
            self.failures.append(f"{type(e).__name__}: {e}")
            return
        if not data.endswith(b"\r\n"):
            self.failures.append(f"probe answered {data!r}")
        self.latencies.append(time.monotonic() - started)
        self.when.append(started)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._probe_once()
            self._stop.wait(0.02)

    def __enter__(self) -> Watch:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=10)

    @property
    def worst_s(self) -> float:
        return max(self.latencies, default=0.0)


@pytest.fixture
def target(tmp_path: Path, start_netd: Callable[..., Netd],
           sink: SyslogSink) -> Iterator[Target]:
    """netd with every builtin, a PROXY service, a held service with instances: 5 and
    a probe; warmed up (a spawner exists, each service forked once) before use."""
    ports: dict[str, int] = {}
    for name in (*BUILTINS, "probe", "pp", "flood", "cat"):
        pick = free_tcp_udp_port if name in BUILTINS else free_port
        port = pick()
        while port in ports.values():  # the kernel may hand out a port twice in a row
            port = pick()
        ports[name] = port
    builtins = "".join(f"""
          {name}:
            listen: [tcp://127.0.0.1:{ports[name]}, udp://127.0.0.1:{ports[name]}]
            builtin: {name}
            timeout: 1s
""" for name in BUILTINS)
    netd = start_netd(f"""
        services:
          probe:
            listen: tcp://127.0.0.1:{ports['probe']}
            builtin: daytime
          pp:
            listen: tcp://127.0.0.1:{ports['pp']}
            exec: [/bin/cat]
            proxy_protocol: {{from: [127.0.0.1], timeout: 1s}}
          flood:
            listen: tcp://127.0.0.1:{ports['flood']}
            exec: [/bin/sh, -c, 'echo up; read x']
            limits: {{instances: 5}}
          cat:
            listen: tcp://127.0.0.1:{ports['cat']}
            exec: [/bin/cat]
{builtins}""", ready=False)
    try:
        sink.wait_for(event="ready")
    except AssertionError as e:
        netd.proc.kill()
        _, err = netd.proc.communicate(timeout=WAIT_S)
        raise AssertionError(f"netd did not get ready: {e}\nstderr: {err.decode()}") from None
    t = Target(netd, sink, ports)
    _warm_up(t)
    yield t
    # Everything the test left running has ended; the supervisor is still there.
    assert netd.proc.poll() is None, "netd died"
    errors = sink.find(event="error")
    assert not errors, errors


def _warm_up(t: Target) -> None:
    """One connection to each TCP service, so that lazily made things (a spawner per
    identity, imports) are part of the baseline."""
    for name in (*BUILTINS, "probe", "flood", "cat"):
        with socket.create_connection(("127.0.0.1", t.ports[name]), timeout=5) as s:
            if name == "flood":
                assert s.recv(3) == b"up\n"
                s.sendall(b"go\n")
            elif name in ("echo", "cat"):
                s.sendall(b"warm\n")
                assert s.recv(10) == b"warm\n"
            elif name == "chargen":
                assert s.recv(10)
            elif name in ("daytime", "time"):
                assert recv_all(s)
    with socket.create_connection(("127.0.0.1", t.ports["pp"]), timeout=5) as s:
        s.sendall(b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\nwarm\n")
        assert s.recv(10) == b"warm\n"
    wait_accepted(t, len(BUILTINS) + 4)
    quiesce(t, None)


def wait_accepted(t: Target, count: int, **match: str) -> None:
    """Wait for `count` accept lines (matching `match`). A program can answer its client
    before its spawner's loop has collected its start, closed its own copy of the
    connection and logged the accept: a baseline of fds is taken after the line."""
    deadline = time.monotonic() + WAIT_S
    while len(t.sink.find(event="accept", **match)) < count:
        assert time.monotonic() < deadline, t.sink.raw[-20:]
        time.sleep(0.01)


def long_lived(t: Target) -> set[int]:
    """The supervisor and its spawners (after the warm-up, its only children: every
    connection's child is a spawner's)."""
    return {t.pid} | children_of(t.pid)


def quiesce(t: Target, baseline_fds: dict[int, int] | None,
            timeout_s: float = 15.0) -> dict[int, int]:
    """Wait until every connection has ended (a child's exit, or the close of one served
    inline) and, given a baseline, each long-lived process's fd count is back at it;
    returns the fd counts."""
    deadline = time.monotonic() + timeout_s
    while True:
        accepts = len(t.sink.find(event="accept"))
        ends = len(t.sink.find(event="exit")) + len([e for e in t.sink.find(event="close")
                                                     if "peer" in e])
        fds = {pid: fd_count(pid) for pid in (baseline_fds or long_lived(t))}
        if accepts == ends and (baseline_fds is None or fds == baseline_fds):
            return fds
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not settled: {accepts} accepts, {ends} ends, {fds} fds "
                f"(baseline {baseline_fds}); fds now: "
                + "; ".join(f"{pid}: " + ", ".join(sorted(
                    os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")))
                    for pid in fds))
        time.sleep(0.05)


class Attack:
    """Baseline, a Watch during the attack, and the checks and figures after it: the
    supervisor and every spawner end with the fds they had and about the memory."""

    def __init__(self, t: Target, name: str) -> None:
        self.t, self.name = t, name
        self.fds = {pid: fd_count(pid) for pid in long_lived(t)}
        self.rss = {pid: rss_kb(pid) for pid in self.fds}
        self.watch = Watch(t.ports["probe"])

    def __enter__(self) -> Attack:
        self.started = time.monotonic()
        self.watch.__enter__()
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        self.watch.__exit__()
        if kind is not None:
            return
        took = time.monotonic() - self.started
        quiesce(self.t, self.fds)
        growth = max(rss_kb(pid) - rss for pid, rss in self.rss.items())
        print(f"\nHOSTILE {self.name}: probes={len(self.watch.latencies)} "
              f"worst={self.watch.worst_s * 1000:.1f}ms rss_base={self.rss}KB "
              f"rss_growth={growth}KB fds={self.fds} took={took:.2f}s")
        slow = sorted(zip(self.watch.latencies, self.watch.when, strict=True))[-5:]
        print("  slowest probes (latency @ seconds into the attack): " + ", ".join(
            f"{lat * 1000:.0f}ms@{at - self.started:.2f}s" for lat, at in reversed(slow)))
        assert not self.watch.failures, self.watch.failures[:5]
        assert self.watch.latencies, "no probe completed"
        assert growth < MEMORY_SLACK_KB, f"a long-lived process grew {growth} KB"
        assert self.t.netd.proc.poll() is None


def closed_by_server(s: socket.socket) -> bool:
    """Read until netd closes; True when it did (EOF or reset) before the timeout."""
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def rst_close(s: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a reset, not a FIN."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def connect(port: int, timeout_s: float = WAIT_S) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout_s)


# -- slowloris ----------------------------------------------------------------------


def test_slowloris_idle_connections(target: Target) -> None:
    """100 connections to echo (timeout: 1s) and 300 to the PROXY service (header
    timeout 1s) that never send, plus 20 that dribble a header a byte at a time: all
    are closed by netd (close reason=timeout; refuse reason=proxy), none is held."""
    t = target
    with Attack(t, "slowloris") as attack:
        idle = [connect(t.ports["echo"]) for _ in range(100)]
        idle += [connect(t.ports["pp"]) for _ in range(300)]
        dribblers = [connect(t.ports["pp"]) for _ in range(20)]
        header = b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 2000\r\n"
        deadline = time.monotonic() + 3.0
        for i in range(len(header)):
            if time.monotonic() > deadline:
                break
            for s in dribblers:
                try:
                    s.send(header[i:i + 1])
                except OSError:
                    pass
            time.sleep(0.25)
        for s in idle + dribblers:
            s.settimeout(8)
            assert closed_by_server(s)
            s.close()
    assert attack.watch.latencies
    timeouts = t.sink.find(event="close", service="echo", reason="timeout")
    assert len(timeouts) == 100
    refused = t.sink.find(event="refuse", service="pp", reason="proxy")
    assert len(refused) == 320
    assert not t.sink.find(event="accept", service="pp", peer="192.0.2.1:1000")


# -- a flood far beyond the limits --------------------------------------------------


def test_connection_flood_beyond_instances(target: Target) -> None:
    """5 held children fill `instances: 5`; then 2000 more connections from 8 threads
    are each refused without a fork. Once the 5 leave, the service serves again."""
    t = target
    warm = len(t.sink.find(event="accept", service="flood"))
    held = [connect(t.ports["flood"]) for _ in range(5)]
    for s in held:
        assert s.recv(3) == b"up\n"
    # A spawner reports a child's pid after the child may already have said "up".
    deadline = time.monotonic() + WAIT_S
    while len(t.sink.find(event="accept", service="flood")) < warm + 5:
        assert time.monotonic() < deadline, "the 5 held children were not all logged"
        time.sleep(0.02)
    accepted_before = warm + 5
    refused = 0
    lock = threading.Lock()

    def flood(n: int) -> None:
        nonlocal refused
        for _ in range(n):
            with connect(t.ports["flood"]) as s:
                if closed_by_server(s):
                    with lock:
                        refused += 1

    with Attack(t, "flood-2000") as attack:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(flood, [250] * 8))
        for s in held:
            s.sendall(b"go\n")
            assert closed_by_server(s)
            s.close()
    assert refused == 2000
    assert len(t.sink.find(event="accept", service="flood")) == accepted_before
    logged = t.sink.find(event="refuse", service="flood")
    assert logged and {e["reason"] for e in logged} == {"instances"}
    print(f"HOSTILE flood: {len(logged)} of 2000 refusals logged "
          f"(the rest dropped and counted by the log if it fell behind); "
          f"worst probe {attack.watch.worst_s * 1000:.1f}ms")
    # The counts fell back: the service serves again.
    with connect(t.ports["flood"]) as s:
        assert s.recv(3) == b"up\n"
        s.sendall(b"go\n")


def accept_queue(port: int) -> int:
    """Connections waiting in the accept queue of the listener on 127.0.0.1:port."""
    want = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == want and fields[3] == "0A":  # LISTEN
            return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"no listener on 127.0.0.1:{port}")


def test_connection_burst_all_at_once(target: Target) -> None:
    """2000 connections opened at once (non-blocking, far beyond the backlog) at the
    service whose `instances: 5` are held full: netd drains its accept queue, refuses
    every connection the kernel completed, starts no child; the kernel's own overflow
    (handshakes it never completed) is not netd's to see."""
    t = target
    warm = len(t.sink.find(event="accept", service="flood"))
    held = [connect(t.ports["flood"]) for _ in range(5)]
    for s in held:
        assert s.recv(3) == b"up\n"
    wait_accepted(t, warm + 5, service="flood")
    burst: list[socket.socket] = []
    with Attack(t, "burst-2000") as attack:
        try:
            for _ in range(2000):
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", t.ports["flood"]))
                burst.append(s)
            deadline = time.monotonic() + WAIT_S
            while accept_queue(t.ports["flood"]) or time.monotonic() < attack.started + 1:
                assert time.monotonic() < deadline, "netd left its accept queue full"
                time.sleep(0.05)
            time.sleep(0.3)
            # While the 5 are held, nothing else may be accepted. (Once they leave,
            # handshakes the kernel completes late are rightly served.)
            accepted_while_held = len(t.sink.find(event="accept", service="flood"))
            closed = 0
            for s in burst:
                try:
                    closed += s.recv(1) == b""
                except BlockingIOError:
                    pass
                except OSError:
                    closed += 1
        finally:
            for s in burst:
                s.close()
            for s in held:
                s.sendall(b"go\n")
                closed_by_server(s)
                s.close()
    refused = t.sink.find(event="refuse", service="flood")
    assert accepted_while_held == warm + 5
    # (With the queue overflowing, SYN cookies let the kernel complete a handshake
    # late, even twice for one client port once its socket is closed; each such
    # connection is refused again. So the count is not compared with 2000.)
    assert refused and {e["reason"] for e in refused} == {"instances"}
    assert closed > 100, (closed, len(refused))
    print(f"HOSTILE burst: {len(refused)} refusals, {closed} of the 2000 clients saw "
          f"netd close them within the attack")


# -- resets ---------------------------------------------------------------------------


def test_clients_that_reset_mid_way(target: Target) -> None:
    """60 clients per service reset (SO_LINGER 0) mid-conversation: echo mid-echo,
    chargen mid-stream, discard mid-upload, an exec'd cat, the PROXY service in the
    middle of a header. Every child ends and is reaped; nothing logs an error."""
    t = target
    junk = os.urandom(256 * 1024)
    with Attack(t, "resets"):
        for _ in range(60):
            s = connect(t.ports["echo"])
            s.sendall(junk[:65536])
            s.recv(100)
            rst_close(s)
            s = connect(t.ports["chargen"])
            s.recv(4096)
            rst_close(s)
            s = connect(t.ports["discard"])
            s.sendall(junk)
            rst_close(s)
            s = connect(t.ports["cat"])
            s.sendall(junk[:100000])
            rst_close(s)
            s = connect(t.ports["pp"])
            s.sendall(b"PROXY TCP4 192.0.2.")
            rst_close(s)
            s = connect(t.ports["daytime"])
            rst_close(s)
    refused = t.sink.find(event="refuse", service="pp", reason="proxy")
    assert len(refused) == 60


# -- huge lines and junk to every builtin ------------------------------------------


def test_huge_lines_and_binary_junk_to_every_builtin(target: Target) -> None:
    """8 MB with no newline to echo (echoed back byte for byte) and discard; junk to
    chargen, daytime and time; junk datagrams up to 65507 bytes to every UDP builtin
    (echo answers each exactly, the others as RFC says)."""
    t = target
    rng = random.Random(4)
    huge = rng.randbytes(8 << 20).replace(b"\n", b"\0")
    with Attack(t, "junk"):
        with connect(t.ports["echo"]) as s:
            writer = threading.Thread(target=lambda: (s.sendall(huge), s.shutdown(socket.SHUT_WR)))
            writer.start()
            got = recv_all(s, limit=len(huge) + 1)
            writer.join(timeout=30)
        assert got == huge
        with connect(t.ports["discard"]) as s:
            s.sendall(huge)
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == b""
        with connect(t.ports["chargen"]) as s:
            s.sendall(huge[:1 << 20])
            got = b""
            while len(got) < 1 << 20:
                data = s.recv(65536)
                assert data
                got += data
            assert set(got) <= set(range(32, 127)) | {13, 10}
        for name in ("daytime", "time"):
            with connect(t.ports[name]) as s:
                try:
                    s.sendall(huge[:1 << 20])
                except (BrokenPipeError, ConnectionResetError):
                    pass
                assert closed_by_server(s)
        for name in BUILTINS:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.settimeout(2)
                for size in (0, 1, 512, 1472, 9000, 65507):
                    u.sendto(huge[:size], ("127.0.0.1", t.ports[name]))
                    if name == "discard":
                        continue
                    reply = u.recvfrom(70000)[0]
                    if name == "echo":
                        assert reply == huge[:size]
                    elif name == "time":
                        assert len(reply) == 4
                    elif name == "daytime":
                        assert reply.endswith(b"\r\n")
                for _ in range(500):  # and a burst nobody reads the answers to
                    u.sendto(huge[:rng.randrange(1, 65507)], ("127.0.0.1", t.ports[name]))
    # The echo child held 8 MB of traffic; the supervisor never saw it.


# -- garbage and truncated PROXY headers -------------------------------------------


def _bad_headers() -> list[tuple[str, bytes, bool]]:
    """(name, bytes, keep_open): headers that can never be valid, or are cut short."""
    v1 = b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 2000\r\n"
    v2 = (V2_SIG + bytes([0x21, 0x11]) + struct.pack("!H", 12)
          + socket.inet_aton("192.0.2.1") + socket.inet_aton("192.0.2.2")
          + struct.pack("!HH", 1000, 2000))
    cases = [
        ("http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False),
        ("tls-hello", bytes.fromhex("160301020001") + os.urandom(64), False),
        ("ssh", b"SSH-2.0-OpenSSH_9.2\r\n", False),
        ("nul", b"\0" * 64, False),
        ("lower-case", v1.lower(), False),
        ("v1-no-crlf-107", b"PROXY TCP4 " + b"1" * 120, False),
        ("v1-bare-lf", b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 2000\n", False),
        ("v1-bad-proto", b"PROXY UDP4 192.0.2.1 192.0.2.2 1000 2000\r\n", False),
        ("v1-bad-ip", b"PROXY TCP4 192.0.2.256 192.0.2.2 1000 2000\r\n", False),
        ("v1-v6-in-tcp4", b"PROXY TCP4 ::1 ::1 1000 2000\r\n", False),
        ("v1-port-70000", b"PROXY TCP4 192.0.2.1 192.0.2.2 70000 2000\r\n", False),
        ("v1-leading-zero", b"PROXY TCP4 192.0.2.01 192.0.2.2 1000 2000\r\n", False),
        ("v1-extra-field", b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 2000 9\r\n", False),
        ("v1-utf8", "PROXY TCP4 192.0.2.1 192.0.2.2 1000 2000é\r\n".encode(), False),
        ("v2-bad-version", v2[:12] + b"\x11" + v2[13:], False),
        ("v2-bad-command", v2[:12] + b"\x2f" + v2[13:], False),
        ("v2-bad-family", v2[:13] + b"\x51" + v2[14:], False),
        ("v2-short-length", v2[:14] + struct.pack("!H", 4) + v2[16:], False),
        ("v2-tlv-overrun", v2[:14] + struct.pack("!H", 16) + v2[16:] + b"\x01\x00\x09x",
         False),
        ("v2-bad-signature", b"\r\n\r\n\x00\r\nQUIZ\n" + v2[12:], False),
    ]
    # Truncations of valid headers: closed after the cut, or left hanging (timeout).
    for cut in (1, 5, 6, 20, len(v1) - 1):
        cases.append((f"v1-cut-{cut}-closed", v1[:cut], False))
    for cut in (1, 12, 13, 15, 16, 20, len(v2) - 1):
        cases.append((f"v2-cut-{cut}-closed", v2[:cut], False))
    for cut in (3, len(v1) - 2):
        cases.append((f"v1-cut-{cut}-hanging", v1[:cut], True))
    for cut in (10, len(v2) - 3):
        cases.append((f"v2-cut-{cut}-hanging", v2[:cut], True))
    cases.append(("v2-length-65535-hanging",
                  v2[:14] + struct.pack("!H", 65535) + v2[16:] + os.urandom(1000), True))
    rng = random.Random(20240601)
    for i in range(150):  # random bytes, closed after sending
        cases.append((f"random-{i}", rng.randbytes(rng.randrange(1, 300)), False))
    for i in range(50):  # a valid-looking start, random tail
        start = (v1 if i % 2 else v2)[:rng.randrange(1, 14)]
        cases.append((f"prefix-random-{i}", start + rng.randbytes(rng.randrange(1, 200)),
                      False))
    return cases


def test_garbage_and_truncated_proxy_headers(target: Target) -> None:
    """~250 bad headers (crafted, truncated, random) each on its own connection: every
    one is refused with reason=proxy and never reaches a child; a valid header with a
    binary payload right after it still gets through intact."""
    t = target
    cases = _bad_headers()

    def send(case: tuple[str, bytes, bool]) -> str | None:
        name, data, keep_open = case
        with connect(t.ports["pp"]) as s:
            try:
                s.sendall(data)
                if not keep_open:
                    s.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # netd may have refused it already (reset, or not connected)
            s.settimeout(8)
            return None if closed_by_server(s) else name

    with Attack(t, "proxy-headers"):
        with ThreadPoolExecutor(16) as pool:
            stuck = [n for n in pool.map(send, cases) if n is not None]
        assert not stuck, stuck
        payload = os.urandom(4096) + b"PROXY TCP4 1.1.1.1 2.2.2.2 1 2\r\n"
        with connect(t.ports["pp"]) as s:
            s.sendall(b"PROXY TCP4 192.0.2.9 192.0.2.2 999 2000\r\n" + payload)
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == payload
    refused = t.sink.find(event="refuse", service="pp")
    assert len(refused) == len(cases), (len(refused), len(cases))
    assert {e["reason"] for e in refused} == {"proxy"}
    deadline = time.monotonic() + WAIT_S  # the accept line comes once the pid is known
    while len(accepts := t.sink.find(event="accept", service="pp")) < 2:
        assert time.monotonic() < deadline, accepts
        time.sleep(0.02)
    assert [e["peer"] for e in accepts[1:]] == ["192.0.2.9:999"]  # [0] is the warm-up
    print(f"HOSTILE proxy-headers: {len(cases)} bad headers, all refused")


# -- hostile configs ------------------------------------------------------------------

DEEP = 5000        # flow collections: [[[[...]]]]
DEEP_BLOCK = 1500  # indented mappings (the file grows with the square of the depth)


def _hostile_configs(port: int) -> dict[str, tuple[str | bytes, dict[str, bytes]]]:
    """name -> (the main file, as text or raw bytes; {relative path: bytes} besides)."""
    service = f"services:\n  probe:\n    listen: tcp://127.0.0.1:{port}\n    builtin: daytime\n"
    bomb = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        bomb.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    bomb_text = "\n".join(bomb) + "\nservices: *i\n"
    return {
        "deep-flow-nesting": (service + "    env: " + "[" * DEEP + "]" * DEEP + "\n", {}),
        "deep-block-nesting": (service + "    env:\n" + "".join(
            "  " * (i + 3) + f"k{i}:\n" for i in range(DEEP_BLOCK)), {}),
        "alias-bomb-in-include": (service + "include: [inc/*.yaml]\n",
                                  {"inc/bomb.yaml": bomb_text.encode()}),
        "non-utf8-in-include": (service + "include: [inc/*.yaml]\n",
                                {"inc/bad.yaml": b"services:\n  x:\n    listen: tcp://"
                                                 b"127.0.0.1:1\n    builtin: \xff\xfeecho\n"}),
        "utf16-file": (service.encode("utf-16"), {}),
        "huge-scalar": (service + "    env: {X: '" + "x" * (8 << 20) + "'}\n", {}),
    }


def _write(tmp_path: Path, main: str | bytes, extra: dict[str, bytes],
           sink: SyslogSink | None) -> Path:
    for rel, data in extra.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    if isinstance(main, bytes):
        path = tmp_path / "netd.yaml"
        path.write_bytes(main)
        return path
    return write_config(tmp_path, main, sink)


@pytest.mark.parametrize("case", ["deep-flow-nesting", "deep-block-nesting",
                                  "alias-bomb-in-include", "non-utf8-in-include",
                                  "utf16-file", "huge-scalar"])
def test_hostile_yaml_is_a_clean_config_error(case: str, tmp_path: Path) -> None:
    """`netd check` on each: exit 78 with FILE:LINE errors, no traceback, in bounded time."""
    main, extra = _hostile_configs(1)[case]
    config = _write(tmp_path, main, extra, None)
    result = run_netd("check", "-c", str(config), timeout_s=30)
    output = result.stdout + result.stderr
    if case == "huge-scalar":  # big but valid: loads, or is refused, never a traceback
        assert result.returncode in (0, 78) and "Traceback" not in output, output[-2000:]
        return
    assert result.returncode == 78, output[-2000:]
    assert "Traceback" not in output, output[-2000:]
    assert f"{tmp_path}" in result.stderr, result.stderr[-2000:]
    if "include" in case:
        assert "inc/" in result.stderr, result.stderr


@pytest.mark.parametrize("case", ["deep-flow-nesting", "alias-bomb-in-include",
                                  "non-utf8-in-include"])
def test_hostile_yaml_on_reload_keeps_the_running_config(
        case: str, tmp_path: Path, start_netd: Callable[..., Netd],
        sink: SyslogSink) -> None:
    """The same files arriving by SIGHUP: the reload is refused and logged, and the old
    config goes on serving throughout: every probe is answered."""
    port = free_port()
    netd = start_netd(f"""
        services:
          probe:
            listen: tcp://127.0.0.1:{port}
            builtin: daytime
        """)
    main, extra = _hostile_configs(port)[case]
    _write(tmp_path, main, extra, sink)
    with Watch(port) as watch:
        time.sleep(0.1)
        netd.proc.send_signal(signal.SIGHUP)
        event = sink.wait_for(event="reload")
        time.sleep(0.3)
    assert event["result"] == "error", event
    assert netd.proc.poll() is None, "netd died on a hostile reload"
    assert watch.latencies and not watch.failures, watch.failures[:3]
    print(f"\nHOSTILE reload {case}: worst={watch.worst_s * 1000:.1f}ms")


# -- config files others may write ------------------------------------------------------


def _trusted_setup(tmp_path: Path, port: int, sink: SyslogSink | None) -> tuple[Path, Path]:
    config = write_config(tmp_path, f"""
        include: [inc/*.yaml]
        services:
          probe:
            listen: tcp://127.0.0.1:{port}
            builtin: daytime
        """, sink)
    inc = tmp_path / "inc"
    inc.mkdir()
    included = inc / "more.yaml"
    included.write_text("services: {}\n")
    return config, included


UNSAFE = {
    "main-world-writable": ("main", 0o666),
    "main-group-writable": ("main", 0o664),
    "include-world-writable": ("include", 0o646),
    "include-group-writable": ("include", 0o620),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_config_writable_by_others_is_refused(case: str, tmp_path: Path) -> None:
    """A config or include file that group or others may write is refused by check and
    run (exit 78), naming the file and saying why."""
    which, mode = UNSAFE[case]
    config, included = _trusted_setup(tmp_path, free_port(), None)
    unsafe = config if which == "main" else included
    unsafe.chmod(mode)
    for command in ("check", "run"):
        result = run_netd(command, "-c", str(config), timeout_s=30)
        assert result.returncode == 78, (command, result.stdout, result.stderr)
        assert str(unsafe) in result.stderr and "writable" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    unsafe.chmod(0o644)
    assert run_netd("check", "-c", str(config)).returncode == 0


@pytest.mark.skipif(not IS_ROOT, reason="chown to another user needs root")
def test_config_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    """A config owned by someone other than root or netd's user is refused, saying so."""
    config, included = _trusted_setup(tmp_path, free_port(), None)
    os.chown(included, pwd.getpwnam("nobody").pw_uid, -1)
    result = run_netd("check", "-c", str(config))
    assert result.returncode == 78 and str(included) in result.stderr, result.stderr
    assert "owned by" in result.stderr, result.stderr


def test_writable_config_on_reload_keeps_the_running_one(
        tmp_path: Path, start_netd: Callable[..., Netd], sink: SyslogSink) -> None:
    """Made group-writable while netd runs, the file is refused at reload: logged as
    reload result=error naming why, and the running config serves on."""
    port = free_port()
    netd = start_netd(f"""
        services:
          probe:
            listen: tcp://127.0.0.1:{port}
            builtin: daytime
        """)
    config = netd.config
    config.write_text(config.read_text() + textwrap.dedent(f"""\
          extra:
            listen: tcp://127.0.0.1:{free_port()}
            builtin: echo
        """))
    config.chmod(0o666)
    netd.proc.send_signal(signal.SIGHUP)
    event = sink.wait_for(event="reload")
    assert event["result"] == "error" and "writable" in event["msg"], event
    with connect(port) as s:
        assert recv_all(s).endswith(b"\r\n")
    assert not sink.find(event="listen", service="extra")


def test_out_of_fds_pauses_the_service_instead_of_spinning(
        start_netd: Callable[..., Netd], sink: SyslogSink) -> None:
    """accept() failing with EMFILE leaves the socket readable: netd must pause the
    service with one line (event=suspend reason=resources, whose msg says what ran
    short), retry without a line per try, and, once fds are free, log one
    event=resume and serve every connection that waited meanwhile."""
    port = free_port()
    # Its spawner as netd's own user: lowering another user's limits takes
    # CAP_SYS_RESOURCE, which root does not have everywhere (not in this sandbox).
    netd = start_netd(f"""
        services:
          hold:
            listen: tcp://127.0.0.1:{port}
            exec: [/bin/cat]
            {"user: root" if IS_ROOT else ""}
        """)
    # The process that accepts for the service: its spawner, the supervisor's one child,
    # once it serves (it has opened all it needs).
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"ready?\n")
        assert s.recv(16) == b"ready?\n"
    # Logged once the spawner has closed its copy of that connection (see wait_accepted).
    sink.wait_for(event="accept", service="hold")
    (pid,) = children_of(netd.proc.pid)
    # No fd to spare: the spawner hands each connection on at once, so only a limit at
    # its lowest free fd number makes accept() fail (it holds every one below).
    held = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    limit = min(set(range(len(held) + 1)) - held)
    # The soft limit only: lowering the hard one could not be undone without
    # CAP_SYS_RESOURCE.
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={limit}:"], check=True, timeout=10)
    clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
    try:
        event = sink.wait_for(event="suspend", service="hold")
        assert event["reason"] == "resources"
        assert f"out of file descriptors (RLIMIT_NOFILE {limit})" in event["msg"], event
        ticks = _cpu_ticks(pid)
        time.sleep(0.5)
        assert _cpu_ticks(pid) - ticks < 25, "netd spins while out of fds"
        time.sleep(2.0)  # two retries or more, every second
        assert len(sink.find(event="suspend", service="hold")) == 1, sink.raw[-10:]
        assert not sink.find(event="resume") and not sink.find(event="error")
        subprocess.run(["prlimit", f"--pid={pid}", "--nofile=4096:"], check=True, timeout=10)
        sink.wait_for(event="resume", service="hold")
        for i, c in enumerate(clients):  # they waited in the backlog
            c.sendall(b"waited %d\n" % i)
            assert c.recv(16) == b"waited %d\n" % i
    finally:
        for c in clients:
            c.close()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"back\n")
        assert s.recv(16) == b"back\n"
    assert len(sink.find(event="resume", service="hold")) == 1


def _cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])
