"""netd's log lines against docs/logging.md: keys and their order, syslog framing and
priorities, the stderr and UDP targets, a missing or stalled syslog socket."""

from __future__ import annotations

import re
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    REPO,
    Netd,
    SyslogSink,
    connect,
    distinct_ports,
    free_port,
    parse_logfmt,
    recv_all,
)

WAIT_S = 10.0
DURATION = re.compile(r"^\d+\.\d{3}s$")
HEADER = re.compile(r"^<(\d+)>([A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d) netd\[(\d+)\]: (event=.*)$")
# The events docs/logging.md's table documents (its first column).
DOCUMENTED = {line.split("|")[1].strip()
              for line in (REPO / "docs" / "logging.md").read_text().splitlines()
              if line.startswith("| ") and not line.startswith("| event")}
SEVERITY = {"err": 3, "warning": 4, "info": 6, "debug": 7}






def keys(event: dict[str, str]) -> list[str]:
    return list(event.keys())


def echo_once(port: int, data: bytes = b"hi\n") -> str:
    """One echo exchange; returns this client's address as logs write it."""
    with connect(port) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == data
        return f"127.0.0.1:{s.getsockname()[1]}"


class Lines:
    """Lines read continuously from a pipe (netd's stderr) or datagrams from a socket."""

    def __init__(self, read: Callable[[], bytes | None]) -> None:
        self.lines: list[str] = []
        self._read = read
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @classmethod
    def of_pipe(cls, proc: subprocess.Popen[bytes]) -> Lines:
        assert proc.stderr is not None
        stream = proc.stderr
        return cls(lambda: stream.readline() or None)

    @classmethod
    def of_socket(cls, sock: socket.socket, delay_s: float = 0.0) -> Lines:
        """Datagrams from `sock`; `delay_s` between reads makes a slow syslog daemon."""
        sock.settimeout(0.2)

        def read() -> bytes | None:
            while True:
                try:
                    time.sleep(delay_s)
                    return sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return None

        return cls(read)

    def _run(self) -> None:
        while (data := self._read()) is not None:
            with self._cond:
                self.lines.append(data.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, pattern: str, timeout_s: float = WAIT_S) -> str:
        """The first line matching the regex `pattern`; fails after timeout_s."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for line in self.lines:
                    if re.search(pattern, line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no line matching {pattern!r}; got:\n"
                                         + "\n".join(self.lines[-30:]))
                self._cond.wait(left)

    def snapshot(self) -> list[str]:
        with self._cond:
            return list(self.lines)


def listening(port: int) -> bool:
    """Whether some socket listens on 127.0.0.1:port (from /proc/net/tcp, no connecting)."""
    want = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == want and fields[3] == "0A":
            return True
    return False


def log_section(address: object, facility: str = "daemon", level: str = "debug",
                to: str = "syslog") -> str:
    return (f"log:\n  to: {to}\n  syslog_address: {address}\n  facility: {facility}\n"
            f"  level: {level}\n")


def test_lifecycle_event_keys_in_order(start_netd: Callable[..., Netd], sink: SyslogSink) -> None:
    """start, listen, ready, accept, exit, stop carry exactly the documented keys, in order."""
    port = free_port()
    netd = start_netd(f"""
        services:
          echo:
            listen: tcp://127.0.0.1:{port}
            exec: [/bin/cat]
        """)
    peer = echo_once(port)
    start = sink.wait_for(event="start")
    assert keys(start) == ["event", "version", "pid", "config"]
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", start["version"]), start
    assert start["pid"] == str(netd.proc.pid)
    assert start["config"] == str(netd.config)
    listen = sink.wait_for(event="listen")
    assert keys(listen) == ["event", "service", "proto", "local", "mode"]
    assert listen == {"event": "listen", "service": "echo", "proto": "tcp",
                      "local": f"127.0.0.1:{port}", "mode": "nowait"}
    ready = sink.wait_for(event="ready")
    assert keys(ready) == ["event", "services", "listeners"]
    assert (ready["services"], ready["listeners"]) == ("1", "1")
    accept = sink.wait_for(event="accept", peer=peer)
    assert keys(accept) == ["event", "service", "proto", "peer", "local", "pid"]
    assert (accept["service"], accept["proto"], accept["local"]) == (
        "echo", "tcp", f"127.0.0.1:{port}")
    exit_ = sink.wait_for(event="exit", pid=accept["pid"])
    assert keys(exit_) == ["event", "service", "pid", "status", "duration"]
    assert exit_["status"] == "0" and DURATION.match(exit_["duration"]), exit_
    assert netd.stop(signal.SIGTERM) == 0
    stop = sink.wait_for(event="stop")
    assert keys(stop) == ["event", "signal"]
    assert stop["signal"] == "SIGTERM"
    names = [e["event"] for e in sink.find()]
    assert names[:3] == ["start", "listen", "ready"], names
    assert names[-1] == "stop", names


def test_inline_event_keys_in_order(start_netd: Callable[..., Netd], sink: SyslogSink) -> None:
    """A builtin served inline: accept (mode=inline, the spawner's pid) and close, with
    the documented keys in order."""
    port = free_port()
    start_netd(f"""
        services:
          echo:
            listen: tcp://127.0.0.1:{port}
            builtin: echo
        """)
    peer = echo_once(port)
    assert sink.wait_for(event="listen")["mode"] == "inline"
    accept = sink.wait_for(event="accept", peer=peer)
    assert keys(accept) == ["event", "service", "proto", "peer", "local", "pid", "mode"]
    assert (accept["service"], accept["local"], accept["mode"]) == (
        "echo", f"127.0.0.1:{port}", "inline")
    close = sink.wait_for(event="close", peer=peer)
    assert keys(close) == ["event", "service", "peer", "pid", "reason", "duration"]
    assert (close["pid"], close["reason"]) == (accept["pid"], "done")
    assert DURATION.match(close["duration"]), close


def test_other_event_keys_in_order(start_netd: Callable[..., Netd], sink: SyslogSink) -> None:
    """accept (wait mode), exit by signal, datagram and stderr keys, as documented."""
    waitp, killp, udp, errp = distinct_ports(4)
    start_netd(f"""
        services:
          waiter:
            listen: udp://127.0.0.1:{waitp}
            exec: [/bin/sh, -c, "head -c 1 >/dev/null"]
          killed:
            listen: tcp://127.0.0.1:{killp}
            exec: [/bin/sh, -c, "kill -9 $$"]
          udpecho:
            listen: udp://127.0.0.1:{udp}
            builtin: echo
          noisy:
            listen: tcp://127.0.0.1:{errp}
            exec: [/bin/sh, -c, "echo 'oops: it broke' >&2"]
        """)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(WAIT_S)
        s.sendto(b"x", ("127.0.0.1", waitp))
        s.sendto(b"y", ("127.0.0.1", udp))
        assert s.recvfrom(100)[0] == b"y"
        client = f"127.0.0.1:{s.getsockname()[1]}"
    for port in (killp, errp):
        with connect(port) as c:
            recv_all(c)

    accept = sink.wait_for(event="accept", service="waiter")
    assert keys(accept) == ["event", "service", "proto", "local", "pid", "mode"]
    assert (accept["proto"], accept["local"], accept["mode"]) == (
        "udp", f"127.0.0.1:{waitp}", "wait")
    assert keys(sink.wait_for(event="exit", pid=accept["pid"])) == [
        "event", "service", "pid", "status", "duration"]
    killed = sink.wait_for(event="exit", service="killed")
    assert keys(killed) == ["event", "service", "pid", "signal", "duration"]
    assert killed["signal"] == "SIGKILL" and DURATION.match(killed["duration"])
    datagram = sink.wait_for(event="datagram", service="udpecho")
    assert keys(datagram) == ["event", "service", "proto", "peer", "local"]
    assert (datagram["proto"], datagram["peer"], datagram["local"]) == (
        "udp", client, f"127.0.0.1:{udp}")
    stderr = sink.wait_for(event="stderr", service="noisy")
    assert keys(stderr) == ["event", "service", "msg"]
    assert stderr["msg"] == "oops: it broke"
    assert 'msg="oops: it broke"' in "\n".join(sink.raw)


def test_listen_mode_is_nowait_or_wait(tmp_path: Path, start_netd: Callable[..., Netd],
                                       sink: SyslogSink) -> None:
    """event=listen says mode=nowait or mode=wait (docs/logging.md), for every kind."""
    tcp, udp_builtin, udp_exec = distinct_ports(3)
    start_netd(f"""
        services:
          tcpecho:
            listen: tcp://127.0.0.1:{tcp}
            builtin: echo
          udpecho:
            listen: udp://127.0.0.1:{udp_builtin}
            builtin: echo
          udpexec:
            listen: udp://127.0.0.1:{udp_exec}
            exec: [/bin/sh, -c, "head -c 1 >/dev/null"]
          unixcat:
            listen: unix:{tmp_path / "cat.sock"}
            exec: [/bin/cat]
        """)
    modes = {e["service"]: e["mode"] for e in sink.find(event="listen")}
    assert modes["tcpecho"] == "inline"  # a builtin, served by its spawner itself
    assert modes["udpexec"] == "wait"
    assert modes["unixcat"] == "nowait"
    assert modes["udpecho"] == "inline", modes


def test_error_event_keys(start_netd: Callable[..., Netd], sink: SyslogSink) -> None:
    """A python handler's exception: event=error with service, the child's pid, msg and
    traceback, in that order."""
    port = free_port()
    start_netd(f"""
        services:
          boom:
            listen: tcp://127.0.0.1:{port}
            python: svc_handlers:boom_or_echo
        """)
    with connect(port) as s:
        s.sendall(b"boom\n")
        recv_all(s)
    error = sink.wait_for(event="error", service="boom")
    assert keys(error) == ["event", "service", "pid", "msg", "traceback"]
    assert "kaboom-7431" in error["traceback"]


def test_only_documented_events(start_netd: Callable[..., Netd], sink: SyslogSink) -> None:
    """Clients that reset, half-close or vanish produce only events docs/logging.md lists."""
    chargen, echo = distinct_ports(2)
    netd = start_netd(f"""
        services:
          chargen:
            listen: tcp://127.0.0.1:{chargen}
            builtin: chargen
          echo:
            listen: tcp://127.0.0.1:{echo}
            builtin: echo
        """)
    for port in (chargen, echo):
        with connect(port) as s:
            s.sendall(b"data\n")
            s.recv(10)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    echo_once(echo)
    sink.wait_for(event="close", service="chargen")
    assert netd.stop() == 0
    sink.wait_for(event="stop")
    seen = {e.get("event") for e in sink.find()}
    assert seen <= DOCUMENTED, "\n".join(sink.raw)


@pytest.mark.parametrize(("facility", "code"), [("daemon", 3), ("local0", 16)])
def test_syslog_priority_and_header(facility: str, code: int, start_netd: Callable[..., Netd],
                                    sink: SyslogSink) -> None:
    """Each datagram is `<PRI>Mmm dd hh:mm:ss netd[PID]: line`, PRI = facility*8+severity."""
    port, killp, udp, boom_port = distinct_ports(4)
    netd = start_netd(log_section(sink.path, facility) + f"""
services:
  echo:
    listen: tcp://127.0.0.1:{port}
    builtin: echo
  killed:
    listen: tcp://127.0.0.1:{killp}
    exec: [/bin/sh, -c, "kill -9 $$"]
  udpecho:
    listen: udp://127.0.0.1:{udp}
    builtin: echo
  boom:
    listen: tcp://127.0.0.1:{boom_port}
    python: svc_handlers:boom_or_echo
""")
    echo_once(port)
    with connect(killp) as s:
        recv_all(s)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(WAIT_S)
        s.sendto(b"d", ("127.0.0.1", udp))
        s.recvfrom(10)
    with connect(boom_port) as s:
        s.sendall(b"boom\n")
        recv_all(s)
    expected = {"start": "info", "ready": "info", "accept": "info", "datagram": "debug",
                "error": "err"}
    for name in expected:
        sink.wait_for(event=name)
    sink.wait_for(event="exit", service="killed")
    for raw in sink.raw:
        match = HEADER.match(raw.rstrip("\n"))
        assert match, raw
        time.strptime(match[2], "%b %d %H:%M:%S")  # day padded with a space, as BSD
        event = parse_logfmt(match[4])
        name = event["event"]
        if name in expected:
            assert int(match[1]) == code * 8 + SEVERITY[expected[name]], raw
        if name == "exit" and "signal" in event:
            assert int(match[1]) == code * 8 + SEVERITY["warning"], raw
        if name in ("start", "ready", "accept", "datagram"):
            assert match[3] == str(netd.proc.pid), raw


def test_log_to_stderr_same_lines(start_netd: Callable[..., Netd], sink: SyslogSink) -> None:
    """log.to: stderr writes the very lines syslog gets (after its header), one per line."""
    tcp, other = distinct_ports(2)
    by_syslog = start_netd(f"""
        services:
          echo:
            listen: tcp://127.0.0.1:{tcp}
            builtin: echo
        """)
    echo_once(tcp)
    sink.wait_for(event="close")
    assert by_syslog.stop() == 0
    sink.wait_for(event="stop")
    syslog_events = sink.find()

    by_stderr = start_netd(log_section("/nonexistent/never-used", to="stderr") + f"""
services:
  echo:
    listen: tcp://127.0.0.1:{other}
    builtin: echo
""", ready=False)
    lines = Lines.of_pipe(by_stderr.proc)
    lines.wait_for(r"^event=ready ")
    echo_once(other)
    lines.wait_for(r"^event=close ")
    assert by_stderr.stop() == 0
    lines.wait_for(r"^event=stop ")
    stderr_lines = lines.snapshot()
    assert all(line.startswith("event=") for line in stderr_lines), stderr_lines
    stderr_events = [parse_logfmt(line) for line in stderr_lines]
    assert [keys(e) for e in stderr_events] == [keys(e) for e in syslog_events]
    for a, b in zip(stderr_events, syslog_events, strict=True):
        for key in ("event", "service", "proto", "mode", "status", "services", "listeners",
                    "signal", "version"):
            assert a.get(key) == b.get(key), (a, b)
    assert stderr_events[0]["pid"] == str(by_stderr.proc.pid)
    assert not any(e.get("pid") == str(by_stderr.proc.pid) for e in sink.find()), \
        "the stderr netd also wrote to syslog"


def test_missing_syslog_socket_falls_back_to_stderr(tmp_path: Path,
                                                    start_netd: Callable[..., Netd],
                                                    sink: SyslogSink) -> None:
    """No socket at syslog_address: one notice on stderr, then the log lines there; it serves."""
    missing = tmp_path / "no-such-log.sock"
    port = free_port()
    netd = start_netd(log_section(missing, level="info") + f"""
services:
  echo:
    listen: tcp://127.0.0.1:{port}
    builtin: echo
""", ready=False)
    lines = Lines.of_pipe(netd.proc)
    lines.wait_for(r"^event=ready ")
    for _ in range(3):
        peer = echo_once(port)
        lines.wait_for(rf"^event=accept .*peer={re.escape(peer)} ")
    lines.wait_for(r"^event=close ")
    assert netd.proc.poll() is None
    assert netd.stop() == 0
    lines.wait_for(r"^event=stop ")
    text = lines.snapshot()
    notices = [line for line in text if not line.startswith("event=")]
    assert len(notices) == 1, text
    assert str(missing) in notices[0], notices
    assert not sink.find(), "nothing should reach the unrelated sink"


def test_udp_syslog_target(start_netd: Callable[..., Netd], sink: SyslogSink) -> None:
    """syslog_address: udp://127.0.0.1:PORT sends the same datagrams over UDP."""
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        udp_port = server.getsockname()[1]
        received = Lines.of_socket(server)
        netd = start_netd(log_section(f"udp://127.0.0.1:{udp_port}", level="info") + f"""
services:
  echo:
    listen: tcp://127.0.0.1:{port}
    builtin: echo
""", ready=False)
        received.wait_for(r"netd\[\d+\]: event=ready ")
        peer = echo_once(port)
        line = received.wait_for(rf"event=accept .*peer={re.escape(peer)} ")
        match = HEADER.match(line)
        assert match, line
        assert match[1] == "30" and match[3] == str(netd.proc.pid), line
        received.wait_for(r"event=close ")
        assert netd.stop() == 0
        received.wait_for(r"event=stop ")
        assert not sink.find()


def test_lines_held_back_at_start_are_sent_while_idle(tmp_path: Path,
                                                      start_netd: Callable[..., Netd],
                                                      sink: SyslogSink) -> None:
    """Start-up lines the syslog socket could not take at once (its queue holds about 10)
    reach it once it is read, with no client traffic to wake netd up."""
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    slow.bind(str(tmp_path / "slow.sock"))
    ports = distinct_ports(15)
    services = "".join(f"""
  s{i}:
    listen: tcp://127.0.0.1:{port}
    builtin: discard
""" for i, port in enumerate(ports))
    try:
        netd = start_netd(log_section(tmp_path / "slow.sock", level="info")
                          + "services:" + services, ready=False)
        # Wait (without connecting, which would wake netd) until the last port listens.
        deadline = time.monotonic() + WAIT_S
        while not listening(ports[-1]):
            assert time.monotonic() < deadline and netd.proc.poll() is None, "netd not up"
            time.sleep(0.05)
        time.sleep(0.5)  # it logs ready right after; then it sits idle in select()
        received = Lines.of_socket(slow)
        received.wait_for(r"event=ready ")
        assert len([line for line in received.snapshot() if "event=listen " in line]) == 15
    finally:
        slow.close()


def test_stalled_syslog_costs_lines_not_service(tmp_path: Path, start_netd: Callable[..., Netd],
                                                sink: SyslogSink) -> None:
    """A syslog socket nobody reads: netd goes on serving; the lines it cannot keep are
    counted, and event=log_dropped is logged once, when the socket takes lines again.

    600 connections make 1200 lines: more than the socket queue (about 10) and netd's
    own backlog (1000 lines) hold, so some must be dropped. A python child forked while
    lines were being dropped, which logs after the socket is read again, must not
    report the supervisor's drops a second time.
    """
    connections_wanted = 600
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stalled.bind(str(tmp_path / "stalled.sock"))
    port, boom = distinct_ports(2)
    try:
        netd = start_netd(log_section(tmp_path / "stalled.sock", level="info") + f"""
services:
  echo:
    listen: tcp://127.0.0.1:{port}
    builtin: echo
  boom:
    listen: tcp://127.0.0.1:{boom}
    python: svc_handlers:boom_or_echo
""", ready=False)
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                echo_once(port)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "netd never listened"
                assert netd.proc.poll() is None, "netd died"
                time.sleep(0.05)
        connections = 1
        while connections < connections_wanted:
            echo_once(port, b"x" * 100)
            connections += 1
        assert netd.proc.poll() is None
        with connect(boom) as held:
            held.sendall(b"bo")  # its child now exists, forked while lines were dropped
            # A slow reader: the socket stays nearly full while netd catches up, so the
            # report of the drops itself must wait for room, not be forgotten.
            received = Lines.of_socket(stalled, delay_s=0.001)
            echo_once(port)
            connections += 1
            dropped_line = received.wait_for(r"event=log_dropped ", timeout_s=20)
            held.sendall(b"om\n")
            assert recv_all(held) == b""
            received.wait_for(r"event=error ")
        # stop comes after every child's exit, so all lines netd meant are in by then.
        assert netd.stop() == 0
        received.wait_for(r"event=stop ")
        got = received.snapshot()
    finally:
        stalled.close()
    match = HEADER.match(dropped_line)
    assert match, dropped_line
    assert int(match[1]) == 3 * 8 + SEVERITY["warning"], dropped_line
    report = parse_logfmt(match[4])
    assert keys(report) == ["event", "count"]
    count = int(report["count"])
    assert count >= 1
    reports = [line for line in got if "event=log_dropped " in line]
    assert len(reports) == 1, reports
    delivered = []
    for line in got:
        header = HEADER.match(line)
        assert header, line
        if "event=log_dropped " not in line:
            delivered.append(parse_logfmt(header[4])["event"])
    # start, 2 listen, ready; accept+exit per echo; accept, error, exit of boom; stop.
    meant = 4 + 2 * connections + 3 + 1
    assert len(delivered) + count == meant, (len(delivered), count)
