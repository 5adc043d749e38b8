"""systemd's protocols with the real pieces: a NOTIFY_SOCKET owned by the test sees
the exact sd_notify sequence (READY after binding, RELOADING+MONOTONIC_USEC then READY
around reloads, STOPPING), watchdog pings, socket activation through Debian's
`systemd-socket-activate`, `systemd-analyze verify` on the unit, and `log.to: journal`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    REPO,
    WAIT_S,
    DatagramSink,
    Netd,
    SyslogSink,
    connect,
    free_port,
    netd_env,
    output,
    recv_all,
    run_netd,
    wait_until,
    write_config,
)

EX_CONFIG = 78


def monotonic_usec() -> int:
    return int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)


class NotifySink(DatagramSink):
    """A NOTIFY_SOCKET: each message is kept as a dict of its KEY=VALUE lines, in
    arrival order."""

    def __init__(self, path: Path) -> None:
        self.messages: list[dict[str, str]] = []
        super().__init__(path)

    def keep(self, data: bytes) -> None:
        self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()
                                  if "=" in line))

    def wait_for(self, key: str, count: int = 1, timeout_s: float = WAIT_S) -> dict[str, str]:
        """The `count`-th message that carries `key`; fails after timeout_s."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                found = [m for m in self.messages if key in m]
                if len(found) >= count:
                    return found[count - 1]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {count} messages with {key} in {timeout_s}s; got "
                                         f"{self.messages[-20:]}")
                self._cond.wait(left)

    def with_key(self, key: str) -> list[dict[str, str]]:
        with self._cond:
            return [m for m in self.messages if key in m]

    def states(self) -> list[str]:
        """The state changes in order (READY, RELOADING, STOPPING): messages that carry
        only STATUS= or WATCHDOG= are left out."""
        kinds: list[str] = []
        with self._cond:
            for m in self.messages:
                for key in ("READY", "RELOADING", "STOPPING"):
                    if key in m:
                        kinds.append(key)
        return kinds


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySink]:
    n = NotifySink(tmp_path / "notify.sock")
    yield n
    n.close()


@pytest.fixture
def netds(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts by hand; killed and reaped in teardown."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        try:
            proc.communicate(timeout=WAIT_S)
        except (subprocess.TimeoutExpired, ValueError):
            pass


def start_notified(tmp_path: Path, sink: SyslogSink | None, body: str,
                   env: dict[str, str], procs: list[subprocess.Popen[bytes]]) -> Netd:
    """`netd run` with extra environment (NOTIFY_SOCKET, ...), not waited for."""
    config = write_config(tmp_path, body, sink)
    netd = Netd(config, sink, netd_env(env))
    procs.append(netd.proc)
    return netd


def echo_roundtrip(port: int, payload: bytes = b"hello\n") -> bytes:
    with connect(port) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        return recv_all(s)


# -- sd_notify --------------------------------------------------------------------------


def test_notify_sequence_for_start_reload_and_stop(
        tmp_path: Path, sink: SyslogSink, notify: NotifySink,
        netds: list[subprocess.Popen[bytes]]) -> None:
    port = free_port()
    body = f"""\
services:
  echo:
    listen: tcp://127.0.0.1:{port}
    builtin: echo
"""
    netd = start_notified(tmp_path, sink, body, {"NOTIFY_SOCKET": str(notify.path)}, netds)
    ready = notify.wait_for("READY")
    assert ready["READY"] == "1"
    assert ready.get("STATUS"), ready
    assert ready.get("MAINPID", str(netd.proc.pid)) == str(netd.proc.pid)
    # READY means every listener is bound: a connection right now is served.
    assert echo_roundtrip(port) == b"hello\n"
    assert notify.states() == ["READY"]
    assert sink.find(event="ready")
    assert echo_roundtrip(port) == b"hello\n"

    # Reload by SIGHUP: RELOADING=1 with the monotonic clock, then READY=1 again.
    before = monotonic_usec()
    netd.proc.send_signal(signal.SIGHUP)
    ready2 = notify.wait_for("READY", count=2)
    after = monotonic_usec()
    reloading = notify.wait_for("RELOADING")
    assert reloading["RELOADING"] == "1"
    assert before <= int(reloading["MONOTONIC_USEC"]) <= after, (before, reloading, after)
    assert ready2["READY"] == "1"
    assert "2 accepted" in ready2.get("STATUS", ""), ready2  # live counters

    # Reload by `netd reload`, then a reload that fails: the old config stays, ready.
    result = run_netd("reload", "-c", str(netd.config))
    assert result.returncode == 0, output(result)
    notify.wait_for("READY", count=3)
    write_config(tmp_path, body + "  broken:\n    builtin: echo\n", sink)
    netd.proc.send_signal(signal.SIGHUP)
    sink.wait_for(event="reload", result="error")
    notify.wait_for("READY", count=4)
    stamps = [int(m["MONOTONIC_USEC"]) for m in notify.with_key("RELOADING")]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)

    assert netd.stop() == 0
    assert notify.with_key("STOPPING")[0]["STOPPING"] == "1"
    assert notify.states() == ["READY", "RELOADING", "READY", "RELOADING", "READY",
                               "RELOADING", "READY", "STOPPING"]


def test_no_notify_socket_no_trouble(tmp_path: Path, sink: SyslogSink,
                                     netds: list[subprocess.Popen[bytes]]) -> None:
    """A NOTIFY_SOCKET that names nothing (the manager went away) never stops netd."""
    port = free_port()
    netd = start_notified(tmp_path, sink, f"""\
services:
  echo:
    listen: tcp://127.0.0.1:{port}
    builtin: echo
""", {"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")}, netds)
    netd.wait_ready()
    assert echo_roundtrip(port) == b"hello\n"
    netd.proc.send_signal(signal.SIGHUP)
    sink.wait_for(event="reload", result="ok")
    assert echo_roundtrip(port) == b"hello\n"
    assert netd.stop() == 0


def test_watchdog_pings_while_idle(tmp_path: Path, sink: SyslogSink, notify: NotifySink,
                                   netds: list[subprocess.Popen[bytes]]) -> None:
    port = free_port()
    netd = start_notified(tmp_path, sink, f"""\
services:
  echo:
    listen: tcp://127.0.0.1:{port}
    builtin: echo
""", {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"}, netds)
    notify.wait_for("READY")
    # Nothing happens on any socket, yet the pings keep coming.
    ping = notify.wait_for("WATCHDOG", count=5)
    assert ping["WATCHDOG"] == "1"
    assert netd.proc.poll() is None
    assert netd.stop() == 0


def test_watchdog_is_pinged_on_its_timer_not_per_wake_up(
        tmp_path: Path, sink: SyslogSink, notify: NotifySink,
        netds: list[subprocess.Popen[bytes]]) -> None:
    """300 connections wake the supervisor's loop many times (their spawner's reports),
    yet WATCHDOG=1 comes once per half WATCHDOG_USEC: never one ping per wake-up (it
    used to be 732 pings for 300 connections)."""
    port = free_port()
    netd = start_notified(tmp_path, sink, f"""\
services:
  cat:
    listen: tcp://127.0.0.1:{port}
    exec: [/bin/cat]
""", {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "2000000"}, netds)
    notify.wait_for("READY")
    started = time.monotonic()
    for _ in range(300):
        assert echo_roundtrip(port) == b"hello\n"
    took_s = time.monotonic() - started
    pings = len(notify.with_key("WATCHDOG"))
    # One ping per second (half of 2 s), and one more for a second begun meanwhile.
    assert pings <= took_s + 1, (pings, took_s)
    assert netd.stop() == 0


def test_watchdog_meant_for_another_process_is_not_pinged(
        tmp_path: Path, sink: SyslogSink, notify: NotifySink,
        netds: list[subprocess.Popen[bytes]]) -> None:
    """WATCHDOG_PID names someone else (e.g. a wrapper): netd must not ping for it."""
    port = free_port()
    netd = start_notified(tmp_path, sink, f"""\
services:
  echo:
    listen: tcp://127.0.0.1:{port}
    builtin: echo
""", {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "100000",
      "WATCHDOG_PID": "1"}, netds)
    notify.wait_for("READY")
    # Pinging every 50 ms would send ~10 pings by the time these are done.
    for _ in range(5):
        assert echo_roundtrip(port) == b"hello\n"
    time.sleep(0.5)
    assert notify.with_key("WATCHDOG") == []
    assert netd.stop() == 0


def test_unread_notify_socket_costs_messages_not_service(
        tmp_path: Path, sink: SyslogSink, netds: list[subprocess.Popen[bytes]]) -> None:
    """A NOTIFY_SOCKET nobody reads (a stalled service manager): its queue fills with
    watchdog pings, yet netd answers 50 connections; the messages it could not send
    are dropped and counted: the first drop is logged, and once the socket is read
    again, how many were dropped.
    (libsystemd's sd_notify blocked in sendmsg here: netd froze after 5 connections.)"""
    path = tmp_path / "notify.sock"
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stalled.bind(str(path))
    try:
        port = free_port()
        netd = start_notified(tmp_path, sink, f"""\
services:
  echo:
    listen: tcp://127.0.0.1:{port}
    builtin: echo
""", {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000"}, netds)
        netd.wait_ready()
        for n in range(50):
            assert echo_roundtrip(port, f"{n}\n".encode()) == f"{n}\n".encode()
        assert netd.proc.poll() is None
        first = sink.wait_for(event="notify_dropped")
        assert first["socket"] == str(path), first
        # Read: pings go through again, and the drops are reported, once, with their count.
        stalled.settimeout(0.2)
        reading = threading.Thread(target=read_until_closed, args=(stalled,), daemon=True)
        reading.start()
        wait_until(lambda: len(sink.find(event="notify_dropped")) >= 2, "the count of drops")
        reports = sink.find(event="notify_dropped")
        assert int(reports[1]["count"]) > 0, reports
        assert echo_roundtrip(port) == b"hello\n"
        assert netd.stop() == 0
        assert len(sink.find(event="notify_dropped")) == 2, sink.find(event="notify_dropped")
    finally:
        stalled.close()


def read_until_closed(sock: socket.socket) -> None:
    """Read and forget datagrams until `sock` is closed (its timeout bounds each read)."""
    while True:
        try:
            sock.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            return


def test_notify_socket_in_the_abstract_namespace(
        tmp_path: Path, sink: SyslogSink, netds: list[subprocess.Popen[bytes]]) -> None:
    """NOTIFY_SOCKET=@name is a socket in Linux's abstract namespace, as systemd may
    pass it: READY=1 reaches it."""
    name = f"netd-test-{os.getpid()}-{time.monotonic_ns()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind("\0" + name)
    listener.settimeout(WAIT_S)
    try:
        port = free_port()
        netd = start_notified(tmp_path, sink, f"""\
services:
  echo:
    listen: tcp://127.0.0.1:{port}
    builtin: echo
""", {"NOTIFY_SOCKET": "@" + name}, netds)
        assert b"READY=1" in listener.recv(4096).split(b"\n")
        assert echo_roundtrip(port) == b"hello\n"
        assert netd.stop() == 0
    finally:
        listener.close()


# -- socket activation ------------------------------------------------------------------


ACTIVATE = shutil.which("systemd-socket-activate")
needs_activate = pytest.mark.skipif(ACTIVATE is None, reason="systemd-socket-activate missing")


def activate(tmp_path: Path, config: Path, listen: list[str], fdnames: list[str],
             procs: list[subprocess.Popen[bytes]],
             env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`systemd-socket-activate -l ADDR... [--fdname=...] python -m netd run -c CONFIG`.

    systemd-socket-activate binds the addresses, waits for the first connection, then
    execs netd (same pid) with LISTEN_FDS; it passes on only the -E variables.
    """
    assert ACTIVATE is not None
    argv = [ACTIVATE]
    for address in listen:
        argv += ["-l", address]
    if fdnames:
        argv.append("--fdname=" + ":".join(fdnames))
    for key, value in {"PYTHONPATH": netd_env()["PYTHONPATH"], **(env or {})}.items():
        argv += ["-E", f"{key}={value}"]
    argv += [sys.executable, "-m", "netd", "run", "-c", str(config)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=tmp_path, env=netd_env())
    procs.append(proc)
    return proc


def first_connection(make: Callable[[], socket.socket], proc: subprocess.Popen[bytes],
                     timeout_s: float = WAIT_S) -> socket.socket:
    """Connect as soon as systemd-socket-activate listens (this triggers the activation)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return make()
        except (ConnectionRefusedError, FileNotFoundError):
            if proc.poll() is not None or time.monotonic() >= deadline:
                raise AssertionError(f"systemd-socket-activate never listened "
                                     f"(exit {proc.poll()})") from None
            time.sleep(0.02)


def tcp(port: int) -> Callable[[], socket.socket]:
    return lambda: connect(port)


def unix(path: Path) -> Callable[[], socket.socket]:
    def make() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(WAIT_S)
        try:
            s.connect(str(path))
        except OSError:
            s.close()
            raise
        return s
    return make


def stop_activated(proc: subprocess.Popen[bytes], sink: SyslogSink) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=WAIT_S) == 0
    sink.wait_for(event="stop")


@needs_activate
def test_socket_activation_by_name(tmp_path: Path, sink: SyslogSink,
                                   netds: list[subprocess.Popen[bytes]]) -> None:
    """A passed socket named after the service is adopted, not re-bound; the connection
    that triggered the activation is served."""
    port = free_port()
    config = write_config(tmp_path, f"""\
services:
  echo:
    listen: tcp://127.0.0.1:{port}
    builtin: echo
""", sink)
    proc = activate(tmp_path, config, [f"127.0.0.1:{port}"], ["echo"], netds)
    with first_connection(tcp(port), proc) as s:
        s.sendall(b"activated\n")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"activated\n"
    adopted = sink.wait_for(event="adopt", service="echo")
    assert adopted.get("local") == f"127.0.0.1:{port}"
    assert sink.find(event="listen", service="echo") == []
    sink.wait_for(event="ready")
    assert echo_roundtrip(port) == b"hello\n"
    stop_activated(proc, sink)


@needs_activate
def test_socket_activation_by_address(tmp_path: Path, sink: SyslogSink,
                                      netds: list[subprocess.Popen[bytes]]) -> None:
    """Unnamed passed sockets are matched by address; configured addresses not passed
    are bound as usual; a passed socket nothing matches is logged and closed; children
    do not inherit LISTEN_*."""
    passed, own, stray = free_port(), free_port(), free_port()
    config = write_config(tmp_path, f"""\
services:
  web:
    listen: tcp://127.0.0.1:{passed}
    exec: [/usr/bin/env]
  own:
    listen: tcp://127.0.0.1:{own}
    builtin: echo
""", sink)
    proc = activate(tmp_path, config, [f"127.0.0.1:{passed}", f"127.0.0.1:{stray}"], [],
                    netds)
    with first_connection(tcp(passed), proc) as s:
        s.shutdown(socket.SHUT_WR)
        child_env = recv_all(s).decode()
    assert "NETD_SERVICE=web" in child_env, child_env
    assert "LISTEN_" not in child_env, child_env
    sink.wait_for(event="adopt", service="web")
    sink.wait_for(event="listen", service="own")
    assert sink.find(event="listen", service="web") == []
    assert sink.find(event="adopt", service="own") == []
    warning = sink.wait_for(event="error", local=f"127.0.0.1:{stray}")
    assert "matches no" in warning.get("msg", ""), warning
    sink.wait_for(event="ready")
    assert echo_roundtrip(own) == b"hello\n"
    with pytest.raises(ConnectionRefusedError):
        connect(stray)
    stop_activated(proc, sink)


@needs_activate
def test_adopted_unix_socket_is_left_in_place_at_stop(
        tmp_path: Path, sink: SyslogSink, notify: NotifySink,
        netds: list[subprocess.Popen[bytes]]) -> None:
    """The socket unit owns an adopted unix path: netd serves it and leaves it at stop,
    while it removes the unix socket it bound itself."""
    adopted, bound = tmp_path / "adopted.sock", tmp_path / "bound.sock"
    config = write_config(tmp_path, f"""\
services:
  u:
    listen: unix:{adopted}
    builtin: echo
  mine:
    listen: unix:{bound}
    builtin: echo
""", sink)
    proc = activate(tmp_path, config, [str(adopted)], ["u"], netds,
                    env={"NOTIFY_SOCKET": str(notify.path)})
    with first_connection(unix(adopted), proc) as s:
        s.sendall(b"over unix\n")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"over unix\n"
    sink.wait_for(event="adopt", service="u")
    sink.wait_for(event="listen", service="mine")
    notify.wait_for("READY")  # NOTIFY_SOCKET passed through the activation too
    stop_activated(proc, sink)
    assert adopted.exists(), "netd removed a socket it did not create"
    assert not bound.exists(), "netd left the socket it bound"


# -- the unit file and the journal ------------------------------------------------------


UNIT = REPO / "systemd" / "netd.service"


def installed_copy(unit: Path, tmp_path: Path) -> Path:
    """The unit as it would verify once installed: an ExecStart/ExecReload program not
    installed on this machine (netd is not, in a checkout) is pointed at the venv's."""
    local = shutil.which("netd") or str(REPO / ".venv" / "bin" / "netd")
    lines = []
    for line in unit.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() in ("ExecStart", "ExecReload", "ExecStartPre", "ExecStop"):
            prefix = value[:len(value) - len(value.lstrip("-@:+!"))]
            command, *rest = value[len(prefix):].split(" ", 1)
            if command.endswith("/netd") and not os.access(command, os.X_OK):
                line = f"{key}={prefix}{local}{' ' + rest[0] if rest else ''}"
        lines.append(line)
    copy = tmp_path / unit.name
    copy.write_text("\n".join(lines) + "\n")
    return copy


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.skipif(not UNIT.exists(), reason="systemd/netd.service not written yet")
def test_unit_file_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` exits 0 even for some errors: anything it says about
    the unit is a failure too."""
    result = subprocess.run(["systemd-analyze", "verify", "--man=no",
                             str(installed_copy(UNIT, tmp_path))],
                            capture_output=True, text=True, timeout=60)
    said = result.stdout + result.stderr
    assert result.returncode == 0, output(result)
    assert "netd.service" not in said, output(result)
    text = UNIT.read_text()
    for needed in ("Type=notify", "ExecReload=", "Restart=on-failure", " run"):
        assert needed in text, f"{needed!r} missing from {UNIT}"


def test_check_accepts_log_to_journal(tmp_path: Path) -> None:
    config = write_config(tmp_path, """\
log:
  to: journal
services:
  echo:
    listen: tcp://127.0.0.1:7
    builtin: echo
""", None)
    result = run_netd("check", "-c", str(config))
    assert result.returncode == 0, output(result)


def test_run_with_log_to_journal_serves(tmp_path: Path, notify: NotifySink,
                                        netds: list[subprocess.Popen[bytes]]) -> None:
    """With no journald around the lines go nowhere, but netd serves and stops cleanly."""
    port = free_port()
    netd = start_notified(tmp_path, None, f"""\
log:
  to: journal
services:
  echo:
    listen: tcp://127.0.0.1:{port}
    builtin: echo
""", {"NOTIFY_SOCKET": str(notify.path)}, netds)
    notify.wait_for("READY")
    assert echo_roundtrip(port) == b"hello\n"
    netd.proc.send_signal(signal.SIGTERM)
    _, err = netd.proc.communicate(timeout=WAIT_S)
    assert netd.proc.returncode == 0, err
    assert b"Traceback" not in err
