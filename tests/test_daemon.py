"""netd as a daemon: `netd start` returns only once ready, the pidfile, `netd status`
(text and --json), `netd stop` leaving nothing behind, graceful stop of children
(SIGTERM, then SIGKILL after daemon.stop_timeout), and a control socket that refuses
garbage, huge, idle and foreign requests without disturbing the daemon.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    WAIT_S,
    Netd,
    SyslogSink,
    connect,
    distinct_ports,
    free_port,
    netd_env,
    output,
    recv_all,
    run_netd,
    wait_until,
)

EX_NOT_RUNNING = 3
EX_OSERR = 71
EX_CONFIG = 78


def wait_for_count(sink: SyslogSink, count: int, **match: str) -> None:
    """Wait until the sink holds `count` events matching `match`."""
    wait_until(lambda: len(sink.find(**match)) >= count, f"{count} events matching {match}")


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def pids_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (a test's unique config path)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and pid_alive(int(entry)):
            found.append(int(entry))
    return found


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (by walking the ppid links in /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_everything(config: Path) -> None:
    """Teardown: SIGKILL any process (and its descendants) started on `config`."""
    for pid in pids_mentioning(str(config)):
        for victim in [pid, *descendants(pid)]:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass


def daemon_config(tmp_path: Path, sink: SyslogSink, services: str,
                  stop_timeout: str = "1s", control: Path | None = None) -> Path:
    """A config with a log section at `sink`, a daemon section in tmp_path, `services`."""
    control = control or tmp_path / "control.sock"
    text = (f"log:\n  to: syslog\n  syslog_address: {sink.path}\n  level: debug\n"
            f"daemon:\n  pidfile: {tmp_path / 'netd.pid'}\n  control: {control}\n"
            f"  stop_timeout: {stop_timeout}\n"
            f"services:\n{services}")
    path = tmp_path / "netd.yaml"
    path.write_text(text)
    return path


def echo_roundtrip(port: int, payload: bytes = b"hello\n", timeout_s: float = WAIT_S) -> bytes:
    """Send `payload` to a TCP echo service, close our side, return all it sent back."""
    with connect(port, timeout_s=timeout_s) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        return recv_all(s)


def control_exchange(path: Path, data: bytes, timeout_s: float = WAIT_S) -> bytes:
    """Send raw bytes on the control socket and read until the daemon closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        s.connect(str(path))
        try:
            s.sendall(data)
            return recv_all(s)
        except (BrokenPipeError, ConnectionResetError):
            return b""  # the daemon hung up on a request it would not read in full


def status_json(config: Path) -> dict[str, Any]:
    result = run_netd("status", "-c", str(config), "--json")
    assert result.returncode == 0, output(result)
    reply: dict[str, Any] = json.loads(result.stdout)
    return reply


def service_status(status: dict[str, Any], name: str) -> dict[str, Any]:
    matches = [s for s in status["services"] if s["name"] == name]
    assert len(matches) == 1, f"service {name} in status: {status['services']}"
    found: dict[str, Any] = matches[0]
    return found


@pytest.fixture
def detached(tmp_path: Path) -> Iterator[None]:
    """Kills, in teardown, whatever a test's `netd start` left running."""
    yield
    kill_everything(tmp_path / "netd.yaml")


# -- netd start / status / reload / stop ------------------------------------------------


def test_start_status_reload_stop_cycle(tmp_path: Path, sink: SyslogSink,
                                        detached: None) -> None:
    """`netd start` returns once serving; status shows the pinned fields; a second start
    refuses; `netd stop` exits 0 leaving no process, pidfile, control or unix socket."""
    port, wait_port = free_port(), free_port()
    unix_path = tmp_path / "echo.sock"
    config = daemon_config(tmp_path, sink, f"""\
  echo:
    listen: [tcp://127.0.0.1:{port}, unix:{unix_path}]
    builtin: echo
  holder:
    listen: tcp://127.0.0.1:{wait_port}
    exec: [/bin/sleep, "30"]
    wait: true
""")
    result = run_netd("start", "-c", str(config))
    assert result.returncode == 0, output(result)
    # Ready means ready: the very first connection after start returns is served.
    assert echo_roundtrip(port) == b"hello\n"
    pid = int((tmp_path / "netd.pid").read_text().strip())
    assert pid_alive(pid)
    assert str(pid) in result.stdout, output(result)
    control = tmp_path / "control.sock"
    assert stat.S_IMODE(os.stat(control).st_mode) == 0o600

    # A wait-mode service whose child holds the socket is busy.
    with socket.create_connection(("127.0.0.1", wait_port), timeout=WAIT_S):
        sink.wait_for(event="accept", service="holder")
        status = status_json(config)
    assert status["daemon"]["pid"] == pid
    assert status["daemon"]["config"] == str(config)
    assert isinstance(status["daemon"]["uptime_s"], (int, float))
    assert status["daemon"]["uptime_s"] >= 0
    assert status["daemon"]["last_reload"] is None
    echo = service_status(status, "echo")
    assert {(lst["address"], lst["mode"]) for lst in echo["listen"]} == {
        (f"127.0.0.1:{port}", "inline"), (str(unix_path), "inline")}
    assert echo["state"] == "listening"
    assert (echo["children"], echo["accepted"], echo["refused"]) == (0, 1, 0)
    holder = service_status(status, "holder")
    assert holder["listen"][0]["mode"] == "wait"
    assert (holder["state"], holder["children"], holder["accepted"]) == ("busy", 1, 1)

    text = run_netd("status", "-c", str(config))
    assert text.returncode == 0, output(text)
    for expected in (f"pid {pid}", str(config), f"127.0.0.1:{port}", str(unix_path),
                     "echo: listening", "1 accepted", "0 refused", "holder: busy", "1 children",
                     "(wait)", "(inline)"):
        assert expected in text.stdout, f"{expected!r} not in:\n{text.stdout}"
    assert "up " in text.stdout

    again = run_netd("start", "-c", str(config))
    assert again.returncode != 0, output(again)
    assert "already running" in again.stderr and str(pid) in again.stderr, output(again)
    assert (tmp_path / "netd.pid").read_text().strip() == str(pid)
    assert echo_roundtrip(port) == b"hello\n"

    reloaded = run_netd("reload", "-c", str(config))
    assert reloaded.returncode == 0, output(reloaded)
    last = status_json(config)["daemon"]["last_reload"]
    assert last is not None and last["ok"] is True
    assert abs(last["time"] - time.time()) < 60  # a wall-clock timestamp, not a duration
    text = run_netd("status", "-c", str(config))
    assert "last reload:" in text.stdout and " ok" in text.stdout, output(text)

    children = descendants(pid)
    assert children, "the wait-mode child should be running"
    stopped = run_netd("stop", "-c", str(config))
    assert stopped.returncode == 0, output(stopped)
    assert not pid_alive(pid)  # `netd stop` returns only once the daemon is gone
    wait_until(lambda: not any(pid_alive(c) for c in children), "netd's children to go")
    assert pids_mentioning(str(config)) == []
    for leftover in (tmp_path / "netd.pid", control, unix_path):
        assert not leftover.exists(), f"{leftover} left behind"
    sink.wait_for(event="stop")
    with pytest.raises(ConnectionRefusedError):
        connect(port)


def test_status_of_named_services_and_check_names(tmp_path: Path, sink: SyslogSink,
                                                  detached: None) -> None:
    """`netd status NAME...` shows only those services and refuses a name the running
    config lacks; `netd check --names` prints the names alone (what shell completion
    offers)."""
    ports = [free_port(), free_port()]
    config = daemon_config(tmp_path, sink, f"""\
  echo:
    listen: tcp://127.0.0.1:{ports[0]}
    builtin: echo
  daytime:
    listen: tcp://127.0.0.1:{ports[1]}
    builtin: daytime
  unused:
    listen: tcp://127.0.0.1:{ports[1]}
    builtin: chargen
    disable: true
""")
    names = run_netd("check", "--names", "-c", str(config))
    assert (names.returncode, names.stdout) == (0, "echo\ndaytime\nunused\n"), output(names)
    result = run_netd("start", "-c", str(config))
    assert result.returncode == 0, output(result)

    text = run_netd("status", "-c", str(config), "daytime")
    assert text.returncode == 0, output(text)
    assert "daytime: listening" in text.stdout and "echo:" not in text.stdout, output(text)
    assert text.stdout.startswith("netd "), output(text)  # the daemon's line stays
    shown = json.loads(run_netd("status", "-c", str(config), "--json", "echo").stdout)
    assert [s["name"] for s in shown["services"]] == ["echo"]
    unknown = run_netd("status", "-c", str(config), "echo", "nosuch")
    assert unknown.returncode == 64 and unknown.stdout == "", output(unknown)
    assert "no service nosuch" in unknown.stderr and "echo, daytime" in unknown.stderr, \
        output(unknown)
    assert run_netd("stop", "-c", str(config)).returncode == 0


def test_status_of_many_services_comes_whole(tmp_path: Path, sink: SyslogSink,
                                            detached: None) -> None:
    """The status of 150 services is sent a few dozen services at a time (the supervisor
    never holds it as one string): the command still reads one reply with every service
    in order, and the text form lists them all."""
    ports = distinct_ports(150)
    config = daemon_config(tmp_path, sink, "".join(
        f"  s{i:03d}: {{listen: 'tcp://127.0.0.1:{port}', builtin: daytime}}\n"
        for i, port in enumerate(ports)))
    result = run_netd("start", "-c", str(config))
    assert result.returncode == 0, output(result)
    shown = run_netd("status", "-c", str(config), "--json")
    assert shown.returncode == 0, output(shown)
    status = json.loads(shown.stdout)
    assert [s["name"] for s in status["services"]] == [f"s{i:03d}" for i in range(150)]
    assert status["services"][149]["listen"][0]["address"] == f"127.0.0.1:{ports[149]}"
    text = run_netd("status", "-c", str(config))
    assert all(f"s{i:03d}: listening" in text.stdout for i in range(150)), output(text)
    assert run_netd("stop", "-c", str(config)).returncode == 0


def test_status_and_stop_work_while_the_config_on_disk_is_broken(
        tmp_path: Path, sink: SyslogSink, detached: None) -> None:
    """An administrator mid-edit (config on disk invalid) can still ask the running
    daemon for its status and stop it: those need only the control socket."""
    port = free_port()
    services = f"""\
  echo:
    listen: tcp://127.0.0.1:{port}
    builtin: echo
"""
    config = daemon_config(tmp_path, sink, services)
    result = run_netd("start", "-c", str(config))
    assert result.returncode == 0, output(result)
    pid = int((tmp_path / "netd.pid").read_text().strip())
    daemon_config(tmp_path, sink, services + "    bogus: 1\n")
    assert run_netd("check", "-c", str(config)).returncode == EX_CONFIG

    status = run_netd("status", "-c", str(config))
    assert status.returncode == 0, output(status)
    assert f"pid {pid}" in status.stdout, output(status)
    stopped = run_netd("stop", "-c", str(config))
    assert stopped.returncode == 0, output(stopped)
    assert not pid_alive(pid)


@pytest.mark.parametrize("owner", ["dead", "unrelated"])
def test_stale_pidfile_is_taken_over_and_logged(tmp_path: Path, sink: SyslogSink,
                                                detached: None, owner: str) -> None:
    """A pidfile nobody holds locked is stale, whether its pid is dead or reused."""
    if owner == "dead":
        gone = subprocess.Popen(["true"])
        gone.wait(timeout=WAIT_S)
        stale_pid = gone.pid
    else:
        stale_pid = os.getpid()  # alive, but not a netd holding the lock
    (tmp_path / "netd.pid").write_text(f"{stale_pid}\n")
    port = free_port()
    config = daemon_config(tmp_path, sink, f"""\
  echo:
    listen: tcp://127.0.0.1:{port}
    builtin: echo
""")
    result = run_netd("start", "-c", str(config))
    assert result.returncode == 0, output(result)
    event = sink.wait_for(event="pidfile")
    assert event["stale_pid"] == str(stale_pid)
    pid = int((tmp_path / "netd.pid").read_text().strip())
    assert pid != stale_pid and pid_alive(pid)
    assert echo_roundtrip(port) == b"hello\n"
    stopped = run_netd("stop", "-c", str(config))
    assert stopped.returncode == 0, output(stopped)
    assert not (tmp_path / "netd.pid").exists()


def test_start_with_bad_config_exits_78_and_says_why(tmp_path: Path, sink: SyslogSink,
                                                     detached: None) -> None:
    config = daemon_config(tmp_path, sink, """\
  echo:
    listen: tcp://127.0.0.1:7
    builtin: echoo
""")
    result = run_netd("start", "-c", str(config))
    assert result.returncode == EX_CONFIG, output(result)
    assert f"{config}:" in result.stderr and "echoo" in result.stderr, output(result)
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "netd.pid").exists()
    assert pids_mentioning(str(config)) == []


def test_start_with_address_in_use_exits_71_and_says_why(tmp_path: Path, sink: SyslogSink,
                                                         detached: None) -> None:
    """The launcher reports the daemon's bind failure; nothing is left running."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        free = free_port()
        config = daemon_config(tmp_path, sink, f"""\
  first:
    listen: tcp://127.0.0.1:{free}
    builtin: echo
  busy:
    listen: tcp://127.0.0.1:{port}
    builtin: echo
""")
        result = run_netd("start", "-c", str(config))
    assert result.returncode == EX_OSERR, output(result)
    assert f"127.0.0.1:{port}" in result.stderr, output(result)
    assert "in use" in result.stderr.lower(), output(result)
    assert "started" not in result.stdout
    wait_until(lambda: pids_mentioning(str(config)) == [], "the failed daemon to exit")
    for leftover in ("netd.pid", "control.sock"):
        assert not (tmp_path / leftover).exists(), f"{leftover} left behind"
    with pytest.raises(ConnectionRefusedError):
        connect(free)  # nothing half-started either


@pytest.mark.parametrize("command, code", [("status", EX_NOT_RUNNING), ("stop", 1),
                                           ("reload", 1)])
def test_commands_without_a_daemon(tmp_path: Path, sink: SyslogSink, command: str,
                                   code: int) -> None:
    config = daemon_config(tmp_path, sink, """\
  echo:
    listen: tcp://127.0.0.1:7
    builtin: echo
""")
    result = run_netd(command, "-c", str(config))
    assert result.returncode == code, output(result)
    assert "not running" in result.stderr, output(result)
    assert "Traceback" not in result.stderr


def test_commands_with_a_dead_daemons_control_socket(tmp_path: Path, sink: SyslogSink) -> None:
    """A control socket file left by a killed daemon means "not running", not a crash."""
    config = daemon_config(tmp_path, sink, """\
  echo:
    listen: tcp://127.0.0.1:7
    builtin: echo
""")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as leftover:
        leftover.bind(str(tmp_path / "control.sock"))
    result = run_netd("status", "-c", str(config))
    assert result.returncode == EX_NOT_RUNNING, output(result)
    assert "not running" in result.stderr and "Traceback" not in result.stderr, output(result)


# -- the commands find the daemon whatever happened around it (issue 10, item 5) ---------

ECHO_AT = """\
  echo:
    listen: tcp://127.0.0.1:{port}
    builtin: echo
"""


def start_detached(tmp_path: Path, sink: SyslogSink, port: int) -> tuple[Path, int]:
    """`netd start` on a daemon_config (pidfile and control in tmp_path); config, pid."""
    config = daemon_config(tmp_path, sink, ECHO_AT.format(port=port))
    result = run_netd("start", "-c", str(config))
    assert result.returncode == 0, output(result)
    return config, int((tmp_path / "netd.pid").read_text().strip())


def test_reload_with_a_yaml_syntax_error_says_so_before_sending(
        tmp_path: Path, sink: SyslogSink, detached: None) -> None:
    """A YAML syntax error in the file is reported as FILE:LINE, exit 78, nothing sent;
    `status` and `stop` still find the daemon through the file's daemon: section."""
    port = free_port()
    config, pid = start_detached(tmp_path, sink, port)
    config.write_text(config.read_text() + "  broken: a: b\n")
    line = len(config.read_text().splitlines())
    reloaded = run_netd("reload", "-c", str(config))
    assert reloaded.returncode == EX_CONFIG, output(reloaded)
    assert f"{config}:{line}:" in reloaded.stderr, output(reloaded)
    assert "not running" not in reloaded.stderr, output(reloaded)
    assert not sink.find(event="reload")

    status = run_netd("status", "-c", str(config))
    assert status.returncode == 0 and f"pid {pid}" in status.stdout, output(status)
    stopped = run_netd("stop", "-c", str(config))
    assert stopped.returncode == 0, output(stopped)
    assert not pid_alive(pid)


def test_reload_of_a_missing_file_names_it(tmp_path: Path, sink: SyslogSink,
                                           detached: None) -> None:
    missing = tmp_path / "gone.yaml"
    result = run_netd("reload", "-c", str(missing))
    assert result.returncode == EX_CONFIG, output(result)
    assert f"{missing}: cannot read" in result.stderr, output(result)
    assert "not running" not in result.stderr and "Traceback" not in result.stderr


def test_commands_after_the_control_socket_was_removed(tmp_path: Path, sink: SyslogSink,
                                                       detached: None) -> None:
    """A cleaner of /tmp removed the control socket: `status` says netd runs (pid) and why
    it cannot say more; `reload` sends SIGHUP, and netd re-creates its socket, which
    brings the result back; `stop` sends SIGTERM and waits for netd to exit."""
    port = free_port()
    config, pid = start_detached(tmp_path, sink, port)
    control = tmp_path / "control.sock"
    control.unlink()

    status = run_netd("status", "-c", str(config))
    assert status.returncode == 0, output(status)
    assert f"running, pid {pid}" in status.stdout, output(status)
    assert f"no control socket at {control}" in status.stderr, output(status)
    reply = json.loads(run_netd("status", "-c", str(config), "--json").stdout)
    assert reply["ok"] is False and reply["daemon"]["pid"] == pid, reply

    reloaded = run_netd("reload", "-c", str(config))
    assert reloaded.returncode == 0, output(reloaded)
    assert "SIGHUP" in reloaded.stderr and "netd reloaded" in reloaded.stdout, output(reloaded)
    assert sink.wait_for(event="control", result="recreated")["path"] == str(control)
    assert stat.S_IMODE(os.stat(control).st_mode) == 0o600
    assert status_json(config)["daemon"]["last_reload"]["ok"] is True
    assert echo_roundtrip(port) == b"hello\n"

    control.unlink()
    stopped = run_netd("stop", "-c", str(config))
    assert stopped.returncode == 0, output(stopped)
    assert "SIGTERM" in stopped.stderr and f"stopped (pid {pid})" in stopped.stdout, \
        output(stopped)
    assert not pid_alive(pid)
    assert not (tmp_path / "netd.pid").exists()
    sink.wait_for(event="stop", signal="SIGTERM")


def test_reload_by_signal_reports_the_daemons_error(tmp_path: Path, sink: SyslogSink,
                                                    detached: None) -> None:
    """Without a control socket, a reload the daemon refuses (an address in use) is
    still reported: the error, exit 78."""
    port = free_port()
    config, pid = start_detached(tmp_path, sink, port)
    (tmp_path / "control.sock").unlink()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        daemon_config(tmp_path, sink, ECHO_AT.format(port=port) + f"""\
  busy:
    listen: tcp://127.0.0.1:{busy}
    builtin: echo
""")
        result = run_netd("reload", "-c", str(config))
    assert result.returncode == EX_CONFIG, output(result)
    assert f"127.0.0.1:{busy}" in result.stderr, output(result)
    assert echo_roundtrip(port) == b"hello\n"
    assert pid_alive(pid)


# -- files others could plant or own (issue 10, item 7) ----------------------------------

EX_NOPERM = 77
IS_ROOT = os.geteuid() == 0
NOBODY = pwd.getpwnam("nobody")


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A fresh directory in /tmp that the test may open to other users."""
    path = Path(tempfile.mkdtemp(prefix="netd-shared-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def files_config(tmp_path: Path, run_dir: Path, port: int) -> Path:
    """A config (in tmp_path) that keeps its pidfile and control socket in `run_dir`."""
    path = tmp_path / "netd.yaml"
    path.write_text(f"log:\n  to: stderr\ndaemon:\n  pidfile: {run_dir / 'netd.pid'}\n"
                    f"  control: {run_dir / 'control.sock'}\n"
                    f"services:\n{ECHO_AT.format(port=port)}")
    return path


@pytest.mark.skipif(not IS_ROOT, reason="planting another user's link needs root")
@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_link_planted_at_the_pidfile_is_refused(tmp_path: Path, shared_tmp: Path,
                                                detached: None, link: str) -> None:
    """In a world-writable sticky directory (like /tmp), another user plants a link at
    the pidfile's path: netd refuses to start (exit 77) naming the pidfile, and neither
    the file it points to nor the link is touched."""
    shared_tmp.chmod(0o1777)
    precious = shared_tmp / "precious"
    precious.write_text("precious data\n")
    pidfile = shared_tmp / "netd.pid"
    if link == "symlink":
        pidfile.symlink_to(precious)
        os.lchown(pidfile, NOBODY.pw_uid, NOBODY.pw_gid)
    else:
        os.link(precious, pidfile)
    config = files_config(tmp_path, shared_tmp, free_port())
    result = run_netd("start", "-c", str(config))
    assert result.returncode == EX_NOPERM, output(result)
    assert str(pidfile) in result.stderr, output(result)
    assert ("symbolic link" if link == "symlink" else "hard link") in result.stderr
    assert precious.read_text() == "precious data\n"
    assert pidfile.is_symlink() if link == "symlink" else pidfile.exists()
    assert not (shared_tmp / "control.sock").exists()
    assert pids_mentioning(str(config)) == []


def test_stop_never_removes_a_link_put_in_the_pidfiles_place(
        tmp_path: Path, sink: SyslogSink, detached: None) -> None:
    """The pidfile was replaced by a link while netd ran: at stop netd leaves the path
    alone, since it no longer names netd's own file."""
    config, pid = start_detached(tmp_path, sink, free_port())
    precious = tmp_path / "precious"
    precious.write_text("precious data\n")
    pidfile = tmp_path / "netd.pid"
    pidfile.unlink()
    pidfile.symlink_to(precious)
    stopped = run_netd("stop", "-c", str(config))
    assert stopped.returncode == 0, output(stopped)
    assert not pid_alive(pid)
    assert pidfile.is_symlink() and precious.read_text() == "precious data\n"


@pytest.mark.parametrize("planted", ["symlink", "stale socket"])
def test_control_socket_path_never_follows_a_link(tmp_path: Path, sink: SyslogSink,
                                                  detached: None, planted: str) -> None:
    """A symbolic link at the control socket's path is refused (exit 77, naming it, the
    link left alone); a socket file left by a netd that is gone is replaced."""
    control = tmp_path / "control.sock"
    target = tmp_path / "target"
    if planted == "symlink":
        target.write_text("not netd's\n")
        control.symlink_to(target)
    else:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as leftover:
            leftover.bind(str(control))
    config = daemon_config(tmp_path, sink, ECHO_AT.format(port=free_port()))
    result = run_netd("start", "-c", str(config))
    if planted == "symlink":
        assert result.returncode == EX_NOPERM, output(result)
        assert str(control) in result.stderr and "symbolic link" in result.stderr
        assert control.is_symlink() and target.read_text() == "not netd's\n"
        assert not (tmp_path / "netd.pid").exists()
        return
    assert result.returncode == 0, output(result)
    assert status_json(config)["daemon"]["pid"] > 0
    assert run_netd("stop", "-c", str(config)).returncode == 0


@pytest.mark.skipif(not IS_ROOT, reason="a directory of another user needs root")
def test_run_dir_made_by_another_user_is_refused(tmp_path: Path, shared_tmp: Path,
                                                 detached: None) -> None:
    """A directory for netd's files that another user made (mode 0777, owned by nobody):
    netd refuses to start (exit 77) naming it and its owner, and puts nothing in it."""
    run_dir = shared_tmp / "run"
    run_dir.mkdir()
    run_dir.chmod(0o777)
    os.chown(run_dir, NOBODY.pw_uid, NOBODY.pw_gid)
    config = files_config(tmp_path, run_dir, free_port())
    for command in ("run", "start"):
        result = run_netd(command, "-c", str(config))
        assert result.returncode == EX_NOPERM, (command, output(result))
        assert str(run_dir) in result.stderr and "owned by uid" in result.stderr, output(result)
    assert list(run_dir.iterdir()) == []


# netd as a user who cannot read root's Python: everything it will import is imported
# first, then the script takes nobody's identity and runs the command line.
AS_NOBODY = f"""
import argparse, encodings.idna, locale, os, sys
import netd.cli, netd.spawn, netd.supervisor
argparse.ArgumentParser(prog="netd")
os.setgroups([])
os.setgid({NOBODY.pw_gid})
os.setuid({NOBODY.pw_uid})
sys.exit(netd.cli.main(sys.argv[1:]))
"""


def as_nobody(args: list[str], xdg: Path, cwd: Path) -> subprocess.Popen[str]:
    """Start `netd ARGS` as nobody with XDG_RUNTIME_DIR=xdg (output on pipes)."""
    return subprocess.Popen([sys.executable, "-c", AS_NOBODY, *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=netd_env({"XDG_RUNTIME_DIR": str(xdg)}))


@pytest.mark.skipif(not IS_ROOT, reason="running netd as nobody needs root")
@pytest.mark.parametrize("premade", ["none", "root 0777", "another user"])
def test_non_root_netd_and_its_default_run_dir(shared_tmp: Path, premade: str) -> None:
    """netd as nobody with no daemon: section keeps its files in $XDG_RUNTIME_DIR/netd:
    made by netd itself (nobody's, not writable by others), or refused (exit 77, naming
    it) when someone else made it first, whether world-writable or another user's."""
    shared_tmp.chmod(0o755)
    xdg = shared_tmp / "xdg"
    xdg.mkdir(mode=0o700)
    os.chown(xdg, NOBODY.pw_uid, NOBODY.pw_gid)
    run_dir = xdg / "netd"
    if premade == "root 0777":
        run_dir.mkdir()
        run_dir.chmod(0o777)
    elif premade == "another user":
        run_dir.mkdir(mode=0o755)
        os.chown(run_dir, pwd.getpwnam("daemon").pw_uid, -1)
    port = free_port()
    config = shared_tmp / "netd.yaml"
    config.write_text(f"log:\n  to: stderr\nservices:\n{ECHO_AT.format(port=port)}")
    proc = as_nobody(["run", "-c", str(config)], xdg, shared_tmp)
    try:
        if premade != "none":
            _, err = proc.communicate(timeout=WAIT_S)
            assert proc.returncode == EX_NOPERM, err
            assert str(run_dir) in err, err
            assert ("may be written by other users" if premade == "root 0777"
                    else "owned by uid") in err, err
            assert list(run_dir.iterdir()) == []
            return
        wait_until(lambda: (run_dir / "control.sock").exists() or proc.poll() is not None,
                   "netd (as nobody) to make its control socket")
        assert proc.poll() is None, proc.communicate(timeout=WAIT_S)
        info = run_dir.stat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode) & 0o022) == (NOBODY.pw_uid, 0)
        pid = int((run_dir / "netd.pid").read_text())
        assert pid == proc.pid and (run_dir / "netd.pid").stat().st_uid == NOBODY.pw_uid
        assert echo_roundtrip(port) == b"hello\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=WAIT_S) == 0
        assert sorted(p.name for p in run_dir.iterdir()) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=WAIT_S)


# -- graceful stop ----------------------------------------------------------------------


def start_run(tmp_path: Path, sink: SyslogSink, services: str, stop_timeout: str = "1s",
              control: Path | None = None) -> Netd:
    """A foreground `netd run` (a child of the test) on a daemon_config, once ready."""
    config = daemon_config(tmp_path, sink, services, stop_timeout, control)
    netd = Netd(config, sink, netd_env())
    try:
        netd.wait_ready()
    except AssertionError:
        netd.kill()
        raise
    return netd


@pytest.fixture
def running(tmp_path: Path, sink: SyslogSink) -> Iterator[list[Netd]]:
    """Every Netd a test adds here is killed and reaped in teardown, with its children."""
    started: list[Netd] = []
    yield started
    for netd in started:
        for victim in descendants(netd.proc.pid):
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
        netd.kill()


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "netd stop"])
def test_graceful_stop_terminates_children(tmp_path: Path, sink: SyslogSink,
                                           running: list[Netd], how: str) -> None:
    """Stop accepting, SIGTERM the children, remove sockets and pidfile, event=stop, exit 0."""
    port = free_port()
    unix_path = tmp_path / "cat.sock"
    netd = start_run(tmp_path, sink, f"""\
  cat:
    listen: [tcp://127.0.0.1:{port}, unix:{unix_path}]
    exec: [/bin/cat]
""", stop_timeout="10s")
    running.append(netd)
    client = connect(port)
    client.sendall(b"ping\n")
    assert client.recv(64) == b"ping\n"
    child = int(sink.wait_for(event="accept", service="cat")["pid"])
    if how == "netd stop":
        result = run_netd("stop", "-c", str(netd.config))
        assert result.returncode == 0, output(result)
        code = netd.proc.wait(timeout=WAIT_S)
    else:
        code = netd.stop(getattr(signal, how))
    assert code == 0
    exit_event = sink.wait_for(event="exit", service="cat", pid=str(child))
    assert exit_event.get("signal") == "SIGTERM", exit_event
    stop = sink.wait_for(event="stop")
    assert stop.get("signal") == {"netd stop": "control"}.get(how, how)
    assert sink.events.index(exit_event) < sink.events.index(stop)
    assert not pid_alive(child)
    assert recv_all(client) == b""  # the child went away: EOF
    client.close()
    for leftover in (tmp_path / "netd.pid", tmp_path / "control.sock", unix_path):
        assert not leftover.exists(), f"{leftover} left behind"


def test_sigterm_right_after_ready_stops_cleanly(tmp_path: Path, sink: SyslogSink,
                                                 running: list[Netd]) -> None:
    """A SIGTERM as soon as netd said it is ready is a graceful stop (exit 0, event=stop,
    files removed), not death by the default action."""
    for attempt in range(1, 4):
        netd = start_run(tmp_path, sink, ECHO_SERVICE.format(port=free_port()))
        running.append(netd)
        wait_for_count(sink, attempt, event="ready")  # this attempt's, not an earlier one
        code = netd.stop(signal.SIGTERM)  # right after event=ready
        assert code == 0, f"netd exited {code} (attempt {attempt})"
        wait_for_count(sink, attempt, event="stop")
        for leftover in (tmp_path / "netd.pid", tmp_path / "control.sock"):
            assert not leftover.exists(), f"{leftover} left behind"


# Children run as nobody when netd runs as root: use an interpreter anyone may run.
SYSTEM_PYTHON = "/usr/bin/python3"
IGNORES_TERM = ("import signal, sys, time\n"
                "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                "sys.stdout.write('ready\\n'); sys.stdout.flush()\n"
                "time.sleep(60)\n")


@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason="no /usr/bin/python3")
def test_child_ignoring_sigterm_is_killed_after_stop_timeout(
        tmp_path: Path, sink: SyslogSink, running: list[Netd]) -> None:
    port = free_port()
    netd = start_run(tmp_path, sink, f"""\
  stubborn:
    listen: tcp://127.0.0.1:{port}
    exec: [{SYSTEM_PYTHON}, -c, {json.dumps(IGNORES_TERM)}]
""", stop_timeout="1s")
    running.append(netd)
    with connect(port) as client:
        assert client.recv(64) == b"ready\n", sink.raw[-5:]  # SIGTERM is ignored from here on
        child = int(sink.wait_for(event="accept", service="stubborn")["pid"])
        netd.proc.send_signal(signal.SIGTERM)
        sink.wait_for(event="kill")
        exit_event = sink.wait_for(event="exit", service="stubborn", pid=str(child))
        assert exit_event.get("signal") == "SIGKILL", exit_event
        assert netd.proc.wait(timeout=WAIT_S) == 0
    stop = sink.wait_for(event="stop")
    assert sink.events.index(exit_event) < sink.events.index(stop)
    assert not pid_alive(child)


# -- control socket abuse ---------------------------------------------------------------


ECHO_SERVICE = """\
  echo:
    listen: tcp://127.0.0.1:{port}
    builtin: echo
"""


def assert_still_serving(netd: Netd, port: int) -> None:
    """The daemon answers status over the control socket and serves its services."""
    result = run_netd("status", "-c", str(netd.config))
    assert result.returncode == 0, output(result)
    assert echo_roundtrip(port) == b"hello\n"
    assert netd.proc.poll() is None


@pytest.mark.parametrize("request_bytes", [
    b"\x00\xffgarbage\r\n",
    b"\xff\xfe\xfd\n",
    b"[1, 2, 3]\n",
    b'{"cmd": "shutdown"}\n',
    b'{"command": "stop"}\n',
    b'"stop"\n',
    b"\n",
], ids=["binary", "bad-utf8", "json-list", "unknown-cmd", "wrong-key", "json-string",
        "empty-line"])
def test_garbage_control_requests_are_refused(tmp_path: Path, sink: SyslogSink,
                                              running: list[Netd],
                                              request_bytes: bytes) -> None:
    port = free_port()
    netd = start_run(tmp_path, sink, ECHO_SERVICE.format(port=port))
    running.append(netd)
    reply = json.loads(control_exchange(tmp_path / "control.sock", request_bytes))
    assert reply["ok"] is False and reply["error"], reply
    sink.wait_for(event="control", result="refused")
    assert_still_serving(netd, port)


def test_huge_control_request_is_refused(tmp_path: Path, sink: SyslogSink,
                                         running: list[Netd]) -> None:
    """A 100 KB line (even one that starts like a valid request) is not acted on."""
    port = free_port()
    netd = start_run(tmp_path, sink, ECHO_SERVICE.format(port=port))
    running.append(netd)
    line = b'{"cmd": "stop", "pad": "' + b"x" * 100_000 + b'"}\n'
    reply = control_exchange(tmp_path / "control.sock", line)
    if reply:
        assert json.loads(reply)["ok"] is False, reply
    event = sink.wait_for(event="control", result="refused")
    assert "long" in event.get("reason", ""), event
    assert_still_serving(netd, port)


def test_idle_control_clients_do_not_stall_the_daemon(tmp_path: Path, sink: SyslogSink,
                                                      running: list[Netd]) -> None:
    """Clients that connect to the control socket and never send are hung up on, and
    meanwhile every service and the control socket itself keep answering."""
    port = free_port()
    netd = start_run(tmp_path, sink, ECHO_SERVICE.format(port=port))
    running.append(netd)
    idle = []
    try:
        for _ in range(12):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(WAIT_S)
            s.connect(str(tmp_path / "control.sock"))
            idle.append(s)
        # If the daemon waited for each idle client in turn, this would wait 12 x its
        # read timeout; a daemon that is not disturbed answers at once.
        assert echo_roundtrip(port, timeout_s=5.0) == b"hello\n"
        reply = json.loads(control_exchange(tmp_path / "control.sock",
                                            b'{"cmd": "status"}\n', timeout_s=5.0))
        assert reply["ok"] is True and reply["daemon"]["pid"] == netd.proc.pid
        for s in idle:  # each is eventually refused and closed
            data = recv_all(s)
            if data:
                assert json.loads(data)["ok"] is False
    finally:
        for s in idle:
            s.close()
    assert_still_serving(netd, port)


NOBODY_CLIENT = """\
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("EACCES")
    sys.exit(0)
data = b""
try:
    s.sendall(b'{"cmd": "stop"}\\n')
    while chunk := s.recv(65536):
        data += chunk
except (ConnectionResetError, BrokenPipeError):  # hung up on without being read
    pass
print(data.decode() or "RESET")
"""


def run_as_nobody(control: Path) -> str:
    """Run a control client as user nobody; what it printed."""
    nobody = pwd.getpwnam("nobody")

    def drop() -> None:
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)

    result = subprocess.run(["/usr/bin/python3", "-c", NOBODY_CLIENT, str(control)],
                            capture_output=True, text=True, timeout=WAIT_S, preexec_fn=drop,
                            cwd="/")
    assert result.returncode == 0, output(result)
    return result.stdout.strip()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as nobody")
def test_control_requests_from_another_user_are_refused(tmp_path: Path, sink: SyslogSink,
                                                        running: list[Netd]) -> None:
    """The socket is 0600 (connect fails); and even when its mode is opened up, the
    daemon checks the peer's uid and refuses."""
    port = free_port()
    shared = Path(tempfile.mkdtemp(prefix="netd-ctl-"))
    try:
        shared.chmod(0o711)
        control = shared / "control.sock"
        netd = start_run(tmp_path, sink, ECHO_SERVICE.format(port=port), control=control)
        running.append(netd)
        assert stat.S_IMODE(os.stat(control).st_mode) == 0o600
        assert run_as_nobody(control) == "EACCES"
        assert_still_serving(netd, port)

        control.chmod(0o666)  # an administrator's mistake: SO_PEERCRED still guards
        said = run_as_nobody(control)
        if said != "RESET":
            assert json.loads(said)["ok"] is False, said
        event = sink.wait_for(event="control", result="refused")
        assert "permission" in event.get("reason", ""), event
        assert_still_serving(netd, port)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
