"""Faults around a running netd, each with real processes (issue 10, "Faults to survive").

- A spawner or a prefork worker killed with SIGKILL while connections are in flight:
  every accepted connection is either served or closed (a client never hangs: each
  read has a timeout, and reaching it fails the test), and the next one is served.
  Orphaned exec children keep serving their clients, their stderr still logged; the
  supervisor (a subreaper) logs their exits with their service, and gives back their
  places in max_children.
- The service user's process limit reached (RLIMIT_NPROC): the service pauses with
  one line, the connections in hand wait with the backlog (across a reload too), and
  all are served once children end. A small `nofile` limit on a service of a netd
  with many sockets: its children still get their stderr.
- `systemctl stop netd` during a reload: systemd sends SIGTERM to `netd reload` (its
  ExecReload), which must end cleanly, not be killed by it (that fails the unit).

Covered elsewhere: the syslog socket gone, back or not a socket (test_logs.py), the
notify socket unread (test_systemd.py), out of fds (test_hostile.py), SIGHUP storms
and a removed config (test_reload.py).
"""

from __future__ import annotations

import json
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    REPO,
    Netd,
    SyslogSink,
    children_of,
    connect,
    distinct_ports,
    free_port,
    netd_env,
    output,
    wait_until,
)

WAIT_S = 10.0
IS_ROOT = os.geteuid() == 0
# How long a client waits for an answer before calling it a hang: far beyond the
# spawner's restart (0.2 s) on a loaded machine, far below pytest's patience.
HANG_S = 8.0


# -- helpers -------------------------------------------------------------------------


def children(pid: int) -> set[int]:
    """The direct children of `pid` (of any of its threads), from the kernel."""
    try:
        return children_of(pid)
    except FileNotFoundError:
        return set()


def descendants(pid: int) -> set[int]:
    """Every process under `pid`."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def echo_round(s: socket.socket, data: bytes) -> bytes:
    """Send `data`, read back as many bytes (each read bounded by the socket timeout)."""
    s.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = s.recv(len(data) - len(got))
        if not chunk:
            break
        got += chunk
    return got


def closed_not_hung(s: socket.socket) -> str:
    """Read until the server ends the connection: 'eof' or 'reset'; a read that times
    out is a hang and fails the test."""
    s.settimeout(HANG_S)
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        pytest.fail(f"connection from port {s.getsockname()[1]} left hanging after the "
                    "kill")
    return "eof"


def accepted_pid(sink: SyslogSink, s: socket.socket, service: str) -> int:
    """The pid netd logged for this client's connection (event=accept)."""
    peer = f"127.0.0.1:{s.getsockname()[1]}"
    return int(sink.wait_for(event="accept", service=service, peer=peer)["pid"])


def only_spawner(netd: Netd) -> int:
    """The pid of the one spawner (the supervisor's only child in these configs)."""
    wait_until(lambda: len(children(netd.proc.pid)) == 1, "one spawner")
    (pid,) = children(netd.proc.pid)
    return pid


def supervisor_children(tmp_path: Path) -> int:
    """How many children the supervisor knows of (`netd status`, over its control
    socket at tmp_path/control.sock). A spawner reports the children it started in
    batches (netd.reports, at most every 50 ms): one killed before it sent a batch
    leaves those children unknown to the supervisor, which then neither logs their
    exits nor frees their places; the tests here kill a spawner once it has reported."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(WAIT_S)
        s.connect(str(tmp_path / "control.sock"))
        s.sendall(b'{"cmd": "status"}\n')
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return int(json.loads(reply)["daemon"]["children"])


def kill_spawner(netd: Netd, sink: SyslogSink, pid: int) -> int:
    """SIGKILL the spawner `pid`; returns its replacement's pid (netd's one child that
    was not the spawner's)."""
    theirs = children(pid)
    before = len(sink.find(event="error"))
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: len(sink.find(event="error")) > before, "the spawner's death logged")
    died = sink.find(event="error")[before]
    assert "spawner" in died["msg"] and "SIGKILL" in died["msg"], died

    def replacements() -> set[int]:
        return children(netd.proc.pid) - theirs - {pid}

    wait_until(lambda: len(replacements()) == 1, "a new spawner")
    (new,) = replacements()
    return new


@pytest.fixture
def netd_and_children(start_netd: Callable[..., Netd]) -> Iterator[Callable[..., Netd]]:
    """start_netd; in teardown every process under each netd is killed (an orphaned
    /bin/cat must not outlive the test), then netd itself."""
    started: list[Netd] = []

    def start(body: str, env: dict[str, str] | None = None) -> Netd:
        netd: Netd = start_netd(body, env=env)
        started.append(netd)
        return netd

    yield start
    for netd in started:
        for pid in descendants(netd.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# -- a spawner killed ----------------------------------------------------------------


def test_spawner_killed_with_exec_children_and_a_backlog(
        tmp_path: Path, netd_and_children: Callable[..., Netd], sink: SyslogSink) -> None:
    """The spawner of /bin/cat sessions dies (SIGKILL) with three sessions running and
    two connections queued in the backlog: the sessions go on (their children were
    re-parented to the supervisor), the queued ones are served by the replacement, the
    orphans' exits are logged with their service, and the places they held in
    max_children are given back once they end."""
    port = free_port()
    netd = netd_and_children(f"""
        daemon:
          pidfile: {tmp_path / 'netd.pid'}
          control: {tmp_path / 'control.sock'}
          max_children: 6
        services:
          cat:
            listen: tcp://127.0.0.1:{port}
            exec: [/bin/cat]
        """)
    sessions = [connect(port, timeout_s=HANG_S) for _ in range(3)]
    queued: list[socket.socket] = []
    try:
        for i, s in enumerate(sessions):
            assert echo_round(s, b"before %d\n" % i) == b"before %d\n" % i
        cats = {accepted_pid(sink, s, "cat") for s in sessions}
        spawner = only_spawner(netd)
        assert cats <= children(spawner)
        wait_until(lambda: supervisor_children(tmp_path) == 3, "the children reported")
        # Stopped, it accepts nothing: these wait in the listening socket's backlog,
        # which the supervisor holds.
        os.kill(spawner, signal.SIGSTOP)
        queued = [connect(port, timeout_s=HANG_S) for _ in range(2)]
        for i, s in enumerate(queued):
            s.sendall(b"queued %d\n" % i)
        new = kill_spawner(netd, sink, spawner)
        assert cats <= children(netd.proc.pid), "the orphans were not re-parented to netd"
        for i, s in enumerate(queued):
            assert echo_round(s, b"") == b"" and s.recv(16) == b"queued %d\n" % i
            assert accepted_pid(sink, s, "cat") in children(new)
        for i, s in enumerate(sessions):
            assert echo_round(s, b"after %d\n" % i) == b"after %d\n" % i
        for s in sessions:
            s.close()
        for pid in cats:
            exit_event = sink.wait_for(event="exit", service="cat", pid=str(pid))
            assert exit_event["status"] == "0", exit_event
        for s in queued:
            s.close()
        queued = []
        wait_until(lambda: len(sink.find(event="exit", service="cat")) == 5, "five exits")
        # Every place is free again: max_children (6) sessions at once are all served.
        full = [connect(port, timeout_s=HANG_S) for _ in range(6)]
        try:
            for i, s in enumerate(full):
                assert echo_round(s, b"full %d\n" % i) == b"full %d\n" % i, \
                    sink.find(event="refuse")
        finally:
            for s in full:
                s.close()
        assert not sink.find(event="refuse")
    finally:
        for s in sessions + queued:
            s.close()
    assert netd.stop() == 0


def test_spawner_killed_with_inline_sessions_and_a_pending_proxy_header(
        netd_and_children: Callable[..., Netd], sink: SyslogSink) -> None:
    """The spawner dies while it serves echo sessions inline and holds connections
    whose PROXY header is still pending: each of those clients sees the connection
    end (EOF or a reset), none hangs, and both services are served again."""
    echo, proxied = distinct_ports(2)
    netd = netd_and_children(f"""
        services:
          echo:
            listen: tcp://127.0.0.1:{echo}
            builtin: echo
          pp:
            listen: tcp://127.0.0.1:{proxied}
            exec: [/bin/cat]
            proxy_protocol: {{from: [127.0.0.1], timeout: 30s}}
        """)
    inline = [connect(echo, timeout_s=HANG_S) for _ in range(3)]
    pending = [connect(proxied, timeout_s=HANG_S) for _ in range(2)]
    try:
        for i, s in enumerate(inline):
            assert echo_round(s, b"inline %d\n" % i) == b"inline %d\n" % i
        for s in pending:
            s.sendall(b"PROXY TCP4 10.0.0.1 ")  # and the rest never comes
        spawner = only_spawner(netd)
        # The spawner has taken the pending connections in (nothing left in the backlog).
        wait_until(lambda: _accept_queue(proxied) == 0, "the pending connections taken in")
        kill_spawner(netd, sink, spawner)
        for s in inline + pending:
            closed_not_hung(s)
    finally:
        for s in inline + pending:
            s.close()
    with connect(echo, timeout_s=HANG_S) as s:
        assert echo_round(s, b"next\n") == b"next\n"
    with connect(proxied, timeout_s=HANG_S) as s:
        s.sendall(b"PROXY TCP4 10.0.0.1 10.0.0.2 1000 2000\r\n")
        assert echo_round(s, b"proxied\n") == b"proxied\n"
    assert sink.wait_for(event="accept", service="pp")["peer"] == "10.0.0.1:1000"
    assert netd.stop() == 0


def _accept_queue(port: int) -> int:
    """Connections waiting in the accept queue of the listener on 127.0.0.1:port."""
    want = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == want and fields[3] == "0A":
            return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


# -- a prefork worker killed ---------------------------------------------------------


def test_worker_killed_with_connections_open(
        netd_and_children: Callable[..., Netd], sink: SyslogSink) -> None:
    """A prefork worker dies (SIGKILL) with echo sessions open in it: its clients see the
    connection end, the supervisor logs the exit and a restart, and the new worker
    serves the next connection."""
    port = free_port()
    netd = netd_and_children(f"""
        services:
          pooled:
            listen: tcp://127.0.0.1:{port}
            builtin: echo
            workers: 1
        """)
    worker = int(sink.wait_for(event="worker", service="pooled")["pid"])
    sessions = [connect(port, timeout_s=HANG_S) for _ in range(3)]
    try:
        for i, s in enumerate(sessions):
            assert echo_round(s, b"w %d\n" % i) == b"w %d\n" % i
        os.kill(worker, signal.SIGKILL)
        for s in sessions:
            closed_not_hung(s)
    finally:
        for s in sessions:
            s.close()
    died = sink.wait_for(event="exit", service="pooled", pid=str(worker))
    assert died["signal"] == "SIGKILL", died
    sink.wait_for(event="restart", service="pooled")
    wait_until(lambda: len(sink.find(event="worker", service="pooled")) == 2,
               "a new worker")
    assert alive(int(sink.find(event="worker", service="pooled")[1]["pid"]))
    with connect(port, timeout_s=HANG_S) as s:
        assert echo_round(s, b"next\n") == b"next\n"
    assert netd.stop() == 0


def test_orphans_writing_to_stderr_keep_serving_and_are_logged(
        tmp_path: Path, netd_and_children: Callable[..., Netd], sink: SyslogSink) -> None:
    """An exec child whose spawner was killed still has its stderr (`stderr: log`, the
    default): a line it writes there afterwards is logged, and it goes on serving its
    client instead of dying of SIGPIPE."""
    port = free_port()
    netd = netd_and_children(f"""
        services:
          talk:
            listen: tcp://127.0.0.1:{port}
            exec: [/bin/sh, -c, 'while read line; do echo "$line"; echo "said $line" >&2; done']
        """)
    with connect(port, timeout_s=HANG_S) as s:
        assert echo_round(s, b"one\n") == b"one\n"
        sink.wait_for(event="stderr", service="talk", msg="said one")
        child = accepted_pid(sink, s, "talk")
        wait_until(lambda: supervisor_children(tmp_path) == 1, "the child reported")
        kill_spawner(netd, sink, only_spawner(netd))
        for word in (b"two", b"three"):
            assert echo_round(s, word + b"\n") == word + b"\n", "the orphan died"
            sink.wait_for(event="stderr", service="talk", msg="said " + word.decode())
    assert sink.wait_for(event="exit", service="talk", pid=str(child))["status"] == "0"
    with connect(port, timeout_s=HANG_S) as s:
        assert echo_round(s, b"next\n") == b"next\n"
        sink.wait_for(event="stderr", service="talk", msg="said next")
    assert netd.stop() == 0


# -- the service user's process limit ------------------------------------------------


@pytest.fixture
def throwaway_user() -> Iterator[str]:
    """A system user made for this test alone (so that RLIMIT_NPROC, which counts every
    process of the user on the machine, counts only what netd starts), removed after."""
    # Root is exempt from RLIMIT_NPROC: the limit must bind a user of its own.
    if not IS_ROOT:
        pytest.skip("RLIMIT_NPROC binds a user other than netd's own only when netd "
                    "runs as root and can start the service as that user")
    useradd = shutil.which("useradd")
    if useradd is None:
        pytest.skip("no useradd to make a user whose processes only netd starts")
    name = f"netdnp{uuid.uuid4().hex[:8]}"
    subprocess.run([useradd, "--system", "--no-create-home", "--user-group",
                    "--shell", "/usr/sbin/nologin", name], check=True, timeout=30)
    try:
        yield name
    finally:
        uid = pwd.getpwnam(name).pw_uid
        for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    os.kill(pid, signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError):
                pass
        subprocess.run(["userdel", name], check=False, timeout=30)


def read_up(s: socket.socket) -> bytes:
    """The first line of a HOLD child ('up'), read within HANG_S."""
    s.settimeout(HANG_S)
    got = b""
    while not got.endswith(b"\n"):
        chunk = s.recv(16)
        if not chunk:
            break
        got += chunk
    return got


def release(s: socket.socket) -> None:
    """Let a HOLD child end: it answers bye and exits."""
    s.sendall(b"go\n")
    assert s.recv(16) == b"bye\n"


def held_by_nproc(port: int, user: str) -> str:
    """A service whose children wait for a line, run as `user` with RLIMIT_NPROC 4: its
    spawner and two or three children reach the limit."""
    return f"""
        services:
          hold:
            listen: tcp://127.0.0.1:{port}
            exec: [/bin/sh, -c, 'echo up; read x; echo bye']
            user: {user}
            rlimits: {{nproc: 4}}
        """


def fill_up(port: int, sink: SyslogSink, most: int = 8) -> tuple[list[socket.socket],
                                                                  socket.socket]:
    """Connect one client at a time until the service is suspended for want of
    processes: the clients whose child said up, and the one whose child could not
    start. (RLIMIT_NPROC counts threads too: how many children fit depends on how many
    threads the spawner runs.)"""
    holders: list[socket.socket] = []
    for _ in range(most):
        s = connect(port, timeout_s=HANG_S)
        deadline = time.monotonic() + HANG_S
        while not select.select([s], [], [], 0.05)[0]:
            if sink.find(event="suspend", reason="resources"):
                return holders, s
            if time.monotonic() > deadline:
                pytest.fail("neither served nor suspended")
        assert read_up(s) == b"up\n"
        holders.append(s)
    pytest.fail(f"{most} children started: the process limit did not bind")


def test_process_limit_pauses_the_service_and_connections_wait(
        netd_and_children: Callable[..., Netd], sink: SyslogSink, throwaway_user: str) -> None:
    """RLIMIT_NPROC 4 for the service's user: its spawner and two or three children.
    The next connection cannot get a child (EAGAIN): the service is suspended with one
    line that says so, retries quietly, and the connection in hand waits (neither
    closed nor answered) with the one in the backlog; as children end, each is served."""
    port = free_port()
    netd = netd_and_children(held_by_nproc(port, throwaway_user))
    holders, first = fill_up(port, sink)
    waiting = [first]
    try:
        assert len(holders) >= 2, "the spawner alone takes the whole limit"
        paused = sink.wait_for(event="suspend", service="hold")
        assert paused["reason"] == "resources", paused
        assert f"RLIMIT_NPROC 4 for user {throwaway_user}" in paused["msg"], paused
        waiting.append(connect(port, timeout_s=HANG_S))  # left in the backlog
        time.sleep(2.5)  # two retries or more (every RESOURCE_PAUSE_S)
        assert len(sink.find(event="suspend", service="hold")) == 1, sink.raw[-10:]
        assert not sink.find(event="resume") and not sink.find(event="error")
        for s in waiting:
            s.settimeout(0.2)
            with pytest.raises(TimeoutError):
                s.recv(16)  # neither answered nor closed: it waits
        assert len(sink.find(event="accept", service="hold")) == len(holders)
        # One child ends: the connection in hand gets its place.
        release(holders[0])
        assert read_up(waiting[0]) == b"up\n"
        sink.wait_for(event="resume", service="hold")
        # The one from the backlog is taken in next and waits in turn (the limit is
        # reached again: the second suspend), until another child ends.
        wait_until(lambda: len(sink.find(event="suspend", service="hold")) == 2,
                   "the second suspend")
        release(holders[1])
        assert read_up(waiting[1]) == b"up\n"
        wait_until(lambda: len(sink.find(event="resume", service="hold")) == 2,
                   "the second resume")
        for s in [*holders[2:], *waiting]:
            release(s)
        with connect(port, timeout_s=HANG_S) as s:
            assert read_up(s) == b"up\n"
            release(s)
    finally:
        for s in holders + waiting:
            s.close()
    assert not sink.find(event="error")
    assert not sink.find(event="refuse")
    assert netd.stop() == 0


def test_connection_waiting_for_a_process_survives_a_reload(
        netd_and_children: Callable[..., Netd], sink: SyslogSink, throwaway_user: str) -> None:
    """A reload moves the service to another user while a connection waits for a
    process (the first user's RLIMIT_NPROC reached): the retiring spawner keeps that
    connection and starts its child, as the first user, once the limit allows; the new
    spawner serves what comes after."""
    port = free_port()
    netd = netd_and_children(held_by_nproc(port, throwaway_user))
    holders, waiting = fill_up(port, sink)
    try:
        netd.config.write_text(netd.config.read_text().replace(
            f"user: {throwaway_user}", "user: root"))
        netd.proc.send_signal(signal.SIGHUP)
        assert sink.wait_for(event="reload")["changed"] == "hold"
        # A new connection is served at once, by the new spawner, as root.
        with connect(port, timeout_s=HANG_S) as s:
            assert read_up(s) == b"up\n"
            release(s)
        waiting.settimeout(0.2)
        with pytest.raises(TimeoutError):
            waiting.recv(16)  # still waiting, not closed
        release(holders[0])
        assert read_up(waiting) == b"up\n"
        child = accepted_pid(sink, waiting, "hold")
        assert os.stat(f"/proc/{child}").st_uid == pwd.getpwnam(throwaway_user).pw_uid
        for s in [*holders[1:], waiting]:
            release(s)
    finally:
        for s in [*holders, waiting]:
            s.close()
    assert netd.stop() == 0


# -- a small fd limit ----------------------------------------------------------------


# Says where its fd 2 leads, writes a line there, then echoes.
REPORT_STDERR = 'echo "stderr=$(readlink /proc/$$/fd/2)"; echo to-stderr >&2; exec cat'


@pytest.mark.parametrize("stderr", ["log", "null"])
def test_small_nofile_in_a_netd_with_many_sockets(
        netd_and_children: Callable[..., Netd], sink: SyslogSink, stderr: str) -> None:
    """A service with `rlimits: {nofile: 16}` in a netd that holds forty sockets: its
    spawner inherits what its children get as stderr (the pipe, or /dev/null) with the
    supervisor's high fd numbers, which posix_spawn's file actions refuse above the
    limit (EBADF) unless the spawner moves them down: each child must still get its
    service's stderr."""
    port, *others = distinct_ports(41)
    many = "".join(f"""
          daytime{i}:
            listen: tcp://127.0.0.1:{other}
            builtin: daytime
""" for i, other in enumerate(others))
    netd_and_children(f"""
        services:
          small:
            listen: tcp://127.0.0.1:{port}
            exec: [/bin/sh, -c, '{REPORT_STDERR}']
            rlimits: {{nofile: 16}}
            stderr: {stderr}
{many}""")
    with connect(port, timeout_s=HANG_S) as s:
        line = b""
        while not line.endswith(b"\n"):
            chunk = s.recv(256)
            assert chunk, f"closed early: {line!r}, {sink.find(event='error')}"
            line += chunk
        assert echo_round(s, b"within the limit\n") == b"within the limit\n"
    target = line.decode().strip()
    if stderr == "log":
        assert target.startswith("stderr=pipe:"), target
        sink.wait_for(event="stderr", service="small", msg="to-stderr")
    else:
        assert target == "stderr=/dev/null", target
    assert not sink.find(event="error")


# -- SIGTERM to `netd reload` ---------------------------------------------------------

# A handler module whose import, in the daemon only (NETD_TEST_SLOW_IMPORT), says it has
# begun and then waits for the test's go: the daemon's reload (load_config imports each
# handler module once) lasts as long as the test wants.
SLOW_MODULE = """\
import os
import time
from pathlib import Path

_HERE = Path(__file__).parent
if os.environ.get("NETD_TEST_SLOW_IMPORT"):
    (_HERE / "importing").touch()
    _deadline = time.monotonic() + 30
    while not (_HERE / "go").exists() and time.monotonic() < _deadline:
        time.sleep(0.02)


def handle(conn, peer):
    conn.sendall(b"slow\\n")
"""


def test_reload_command_ends_cleanly_on_sigterm_while_netd_reloads(
        tmp_path: Path, netd_and_children: Callable[..., Netd], sink: SyslogSink) -> None:
    """`netd reload` waits for the daemon's answer while a slow reload runs; SIGTERM (what
    systemd sends it when the unit is stopped meanwhile) ends it with exit 0 and a line
    that says so; the daemon finishes the reload, serves, and stops cleanly after."""
    port, slow = distinct_ports(2)
    module = f"slowimport_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(SLOW_MODULE)
    paths = {"PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)])}
    netd = netd_and_children(f"""
        services:
          echo:
            listen: tcp://127.0.0.1:{port}
            builtin: echo
        """, env={**paths, "NETD_TEST_SLOW_IMPORT": "1"})
    netd.config.write_text(netd.config.read_text() + textwrap.indent(textwrap.dedent(f"""\
        slow:
          listen: tcp://127.0.0.1:{slow}
          python: {module}:handle
        """), "  "))
    reload = subprocess.Popen([sys.executable, "-m", "netd", "reload", "-c", str(netd.config)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=netd_env(paths))
    try:
        wait_until(lambda: (tmp_path / "importing").exists() or reload.poll() is not None,
                   "the daemon's reload under way")
        assert reload.poll() is None, reload.communicate(timeout=WAIT_S)
        reload.send_signal(signal.SIGTERM)
        out, err = reload.communicate(timeout=WAIT_S)
    finally:
        (tmp_path / "go").touch()
        if reload.poll() is None:
            reload.kill()
            reload.communicate(timeout=WAIT_S)
    result = subprocess.CompletedProcess(reload.args, reload.returncode, out, err)
    assert result.returncode == 0, output(result)
    assert "SIGTERM" in err and "reload" in err, output(result)
    done = sink.wait_for(event="reload")
    assert done["result"] == "ok" and done["added"] == "slow", done
    with connect(slow, timeout_s=HANG_S) as s:
        assert s.recv(16) == b"slow\n"
    assert netd.stop() == 0
