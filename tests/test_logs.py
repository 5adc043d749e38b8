"""netd's log lines against docs/logging.md: keys and their order, syslog framing and
priorities, the stderr and UDP targets, a missing, stalled, restarted or replaced
syslog socket, and faults that repeat folded into counts."""

from __future__ import annotations

import re
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
    wait_until,
)

from netd.logs import Log, Repeats, SyslogTarget

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


# -- a syslog daemon that goes away -----------------------------------------------------


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks (100 a second)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def drain(log: Log, lines: Lines, pattern: str, timeout_s: float = WAIT_S) -> str:
    """Drive `log` as an event loop would (flush, and tick when due) until a line
    matching `pattern` arrives; returns it."""
    deadline = time.monotonic() + timeout_s
    while True:
        log.flush()
        due = log.due_s()
        if due is not None and due <= time.monotonic():
            log.tick()
        try:
            return lines.wait_for(pattern, timeout_s=0.02)
        except AssertionError:
            if time.monotonic() >= deadline:
                raise


def test_log_reconnects_on_a_timer_with_one_fd(tmp_path: Path) -> None:
    """The syslog socket closed, then a regular file at its path, then a new socket
    there: lines wait, the log's fd stays the same one (never closed under a loop that
    watches it) and is not offered for watching while nothing is connected; retries
    wait on the timer, further apart each time; the new socket gets the lines and one
    log_dropped line that says how long and why."""
    path = tmp_path / "log.sock"
    first = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    first.bind(str(path))
    log = Log(SyslogTarget(str(path), "daemon"))
    fds = log.fds()
    log.event("start", pid=1)
    assert b"event=start pid=1" in first.recv(1000)
    first.close()  # the daemon stops: its socket file stays, nobody reads it

    log.event("accept", service="s", pid=2)
    assert log.fileno() is None and log.waiting()
    retry = log.due_s()
    assert retry is not None
    path.unlink()
    path.write_text("not a socket")
    gaps = []
    for _ in range(3):
        due = log.due_s()
        assert due is not None
        wait_until(lambda due=due: time.monotonic() >= due, "the retry to be due")
        ticked = time.monotonic()
        log.tick()
        next_due = log.due_s()
        assert next_due is not None and log.fileno() is None
        gaps.append(next_due - ticked)
    assert gaps == sorted(gaps) and gaps[0] < gaps[-1], gaps  # backing off, no spinning
    log.event("exit", service="s", pid=2, status=0)
    assert log.fds() == fds

    path.unlink()
    second = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    second.bind(str(path))
    try:
        lines = Lines.of_socket(second)
        report = drain(log, lines, r"event=log_dropped ")
        assert log.fileno() == fds[0] and not log.waiting() and log.due_s() is None
        got = lines.snapshot()
    finally:
        second.close()
    assert [re.sub(r"^.*\]: ", "", line) for line in got[:2]] == [
        "event=accept service=s pid=2", "event=exit service=s pid=2 status=0"]
    match = HEADER.match(report)
    assert match, report
    fields = parse_logfmt(match[4])
    assert keys(fields) == ["event", "count", "outage", "msg"]
    assert fields["count"] == "0" and DURATION.match(fields["outage"]), fields
    assert fields["msg"] == f"{path} is not a socket", fields


def gone_syslog(start_netd: Callable[..., Netd], sink: SyslogSink) -> tuple[Netd, int]:
    """A netd with an echo service whose syslog daemon has just stopped reading and
    closed its socket (its file stays at the path, as when rsyslog stops)."""
    port = free_port()
    netd = start_netd(f"""
        services:
          echo:
            listen: tcp://127.0.0.1:{port}
            builtin: echo
        """)
    sink.close()
    return netd, port


def stderr_of(netd: Netd) -> str:
    """What a stopped netd wrote on its stderr."""
    _, err = netd.proc.communicate(timeout=WAIT_S)
    return err.decode()


def test_syslog_daemon_restart_keeps_netd_serving(start_netd: Callable[..., Netd],
                                                  sink: SyslogSink) -> None:
    """The syslog daemon restarts (its socket closed, then a new one at the same path):
    netd serves all along, holds the lines meanwhile and delivers them to the new
    socket, then says once how long logging was out and that no line was lost.
    (It used to crash: `ValueError: Invalid file descriptor: -1` in _watch_log.)"""
    netd, port = gone_syslog(start_netd, sink)
    peers = [echo_once(port) for _ in range(3)]
    assert netd.proc.poll() is None
    sink.path.unlink()
    back = SyslogSink(sink.path)
    try:
        report = back.wait_for(event="log_dropped")
        assert report["count"] == "0" and DURATION.match(report["outage"]), report
        assert "closed its socket" in report["msg"], report
        for peer in peers:
            back.wait_for(event="accept", peer=peer)
        wait_until(lambda: len(back.find(event="close")) == 3, "the 3 closes held meanwhile")
        peer = echo_once(port)
        back.wait_for(event="accept", peer=peer)
        assert netd.stop() == 0
        back.wait_for(event="stop")
        assert len(back.find(event="log_dropped")) == 1
    finally:
        back.close()
    notices = [line for line in stderr_of(netd).splitlines() if "syslog" in line]
    assert len(notices) == 1 and str(sink.path) in notices[0], notices


def test_syslog_socket_gone_for_long_costs_counted_lines_not_cpu(
        start_netd: Callable[..., Netd], sink: SyslogSink) -> None:
    """No socket at the path while 600 connections make 1200 lines: more than the
    backlog holds. netd serves them all, does not spin while it waits for syslog, and
    once a socket is back it gets the held lines and one log_dropped line whose count
    makes up exactly for the rest."""
    netd, port = gone_syslog(start_netd, sink)
    sink.path.unlink()
    connections = 600
    for _ in range(connections):
        echo_once(port, b"x" * 10)
    assert netd.proc.poll() is None
    time.sleep(0.5)  # the last children exit; then netd has nothing to do but wait
    ticks = cpu_ticks(netd.proc.pid)
    time.sleep(1.0)
    assert cpu_ticks(netd.proc.pid) - ticks < 25, "netd spins while syslog is gone"
    back = SyslogSink(sink.path)
    try:
        report = back.wait_for(event="log_dropped")
        echo_once(port)
        connections += 1
        assert netd.stop() == 0
        back.wait_for(event="stop")
        delivered = [e for e in back.find() if e["event"] != "log_dropped"]
    finally:
        back.close()
    count = int(report["count"])
    assert count > 0, report
    assert "No such file or directory" in report["msg"], report
    # accept + close per connection, then stop: each delivered or counted, once.
    assert len(delivered) + count == 2 * connections + 1, (len(delivered), count)


def test_syslog_socket_replaced_by_a_file(start_netd: Callable[..., Netd],
                                          sink: SyslogSink) -> None:
    """A regular file where the syslog socket was: netd serves, does not spin, and
    when a socket is back it says that the path was not a socket."""
    netd, port = gone_syslog(start_netd, sink)
    sink.path.unlink()
    sink.path.write_text("a file, not a socket\n")
    peer = echo_once(port)
    time.sleep(0.5)
    ticks = cpu_ticks(netd.proc.pid)
    time.sleep(1.0)
    assert cpu_ticks(netd.proc.pid) - ticks < 25, "netd spins on a file at the socket's path"
    assert echo_once(port) and netd.proc.poll() is None
    sink.path.unlink()
    back = SyslogSink(sink.path)
    try:
        report = back.wait_for(event="log_dropped")
        assert report["msg"] == f"{sink.path} is not a socket", report
        back.wait_for(event="accept", peer=peer)
        assert netd.stop() == 0
    finally:
        back.close()
    notices = [line for line in stderr_of(netd).splitlines() if "syslog" in line]
    assert len(notices) == 1, notices


# -- a fault that repeats ---------------------------------------------------------------


def test_repeats_folded_into_counts_on_a_real_socket(tmp_path: Path) -> None:
    """3,000 identical errors make one line, then one line with repeated=2999 when the
    window ends; a pid or traceback that differs does not make another fault, another
    msg or service does; accept and exit lines are never folded."""
    path = tmp_path / "log.sock"
    reader = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    reader.bind(str(path))
    try:
        lines = Lines.of_socket(reader)
        log = Log(SyslogTarget(str(path), "daemon"))
        log.repeats = Repeats(window_s=0.5)
        for i in range(3000):
            log.event("error", "err", service="s", pid=i, msg="accept failed: Boom",
                      traceback=f"frame {i}")
        log.event("error", "err", service="s", msg="something else")
        log.event("error", "err", service="t", msg="accept failed: Boom")
        for pid in (7, 7, 8):
            log.event("accept", service="s", proto="tcp", pid=pid)
            log.event("exit", service="s", pid=pid, status=0)
        summary = drain(log, lines, r"repeated=")
        got = [re.sub(r"^.*\]: ", "", line) for line in lines.snapshot()]
    finally:
        reader.close()
    assert got[0] == 'event=error service=s pid=0 msg="accept failed: Boom" traceback="frame 0"'
    assert summary.endswith('event=error service=s pid=2999 msg="accept failed: Boom" '
                            'traceback="frame 2999" repeated=2999'), summary
    assert got.count('event=error service=s msg="something else"') == 1
    assert got.count('event=error service=t msg="accept failed: Boom"') == 1
    assert got.count("event=accept service=s proto=tcp pid=7") == 2
    assert got.count("event=exit service=s pid=7 status=0") == 2
    assert len(got) == 10, got
    assert log.due_s() is None  # nothing left to report: no timer while idle


def test_repeats_not_counted_yet_are_logged_when_the_loop_ends(tmp_path: Path) -> None:
    """A process that stops within a window (the supervisor at SIGTERM) logs the count
    of the repeats folded so far before its last line, not never."""
    path = tmp_path / "log.sock"
    reader = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    reader.bind(str(path))
    try:
        lines = Lines.of_socket(reader)
        log = Log(SyslogTarget(str(path), "daemon"))
        for _ in range(3):
            log.event("control", "warning", result="refused", reason="garbage")
        log.wind_up()
        log.event("stop", signal="SIGTERM")
        lines.wait_for(r"event=stop ")
        got = [re.sub(r"^.*\]: ", "", line) for line in lines.snapshot()]
    finally:
        reader.close()
    assert got == ["event=control result=refused reason=garbage",
                   "event=control result=refused reason=garbage repeated=2",
                   "event=stop signal=SIGTERM"], got
    assert log.due_s() is None


def test_a_fault_repeating_thousands_of_times_logs_a_few_lines(
        tmp_path: Path, start_netd: Callable[..., Netd], sink: SyslogSink) -> None:
    """An exec service whose program was removed after start: every one of 1,500
    connections fails to start a child. The log gets the first error, then at most
    one line per window with the count of repeats, and the counts add up exactly."""
    program = tmp_path / "hello.sh"
    program.write_text("#!/bin/sh\necho hello\n")
    program.chmod(0o755)
    port = free_port()
    netd = start_netd(f"""
        services:
          hello:
            listen: tcp://127.0.0.1:{port}
            exec: [{program}]
            user: root  # nobody could not reach tmp_path
        """)
    with connect(port) as s:
        assert recv_all(s) == b"hello\n"
    program.unlink()
    started = time.monotonic()

    def fail(_: int) -> None:
        for _ in range(500):
            with connect(port) as s:
                assert recv_all(s) == b""

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(fail, range(3)))

    def failures() -> int:
        return sum(int(e.get("repeated", "1")) for e in sink.find(event="error"))

    wait_until(lambda: failures() >= 1500, "every failure counted", timeout_s=20)
    windows = (time.monotonic() - started) / Repeats().window_s
    errors = sink.find(event="error")
    assert failures() == 1500, errors
    assert len(errors) <= 2 + windows, errors
    assert errors[0]["msg"].startswith("cannot start child"), errors[0]
    assert "repeated" not in errors[0] and all("repeated" in e for e in errors[1:]), errors
    assert netd.proc.poll() is None
