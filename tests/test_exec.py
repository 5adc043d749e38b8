"""exec services with a real netd: the program's socket, environment, fds, stderr, wait mode
and exit statuses."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    Netd,
    SyslogSink,
    connect,
    distinct_ports,
    free_port,
    free_tcp_udp_port,
    recv_all,
)

# A system interpreter for the exec'd scripts: children may run as nobody, who cannot
# reach a virtualenv under /root; the script goes in argv (-c) for the same reason.
PY = "/usr/bin/python3"
needs_py = pytest.mark.skipif(not os.access(PY, os.X_OK), reason=f"no {PY}")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
TCP_KEYS = {"PROTO", "TCPREMOTEIP", "TCPREMOTEPORT", "TCPLOCALIP", "TCPLOCALPORT",
            "REMOTE_HOST", "NETD_SERVICE", "PATH"}
# ucspi-unix's names: the peer's effective uid and gid (SO_PEERCRED).
UNIX_KEYS = {"PROTO", "UNIXREMOTEPID", "UNIXREMOTEEUID", "UNIXREMOTEEGID", "UNIXLOCALPATH",
             "NETD_SERVICE", "PATH"}
# Reads the environment the program was exec'd with (/proc/self/environ, untouched by the
# interpreter's own start-up) and every open fd, and writes them to the socket as JSON.
DUMP = """\
import json, os
with open("/proc/self/environ", "rb") as f:
    raw = f.read()
env = dict(kv.split("=", 1) for kv in raw.decode().split("\\0") if kv)
fds = {}
for name in os.listdir("/proc/self/fd"):
    try:
        fds[name] = os.readlink("/proc/self/fd/" + name)
    except OSError:
        fds[name] = None
os.write(1, json.dumps({"env": env, "fds": fds, "pid": os.getpid()}).encode())
"""
# Wait mode on UDP: fd 0 is the listening socket itself; answer one datagram and leave.
UDP_ONCE = """\
import json, os, socket, time
with open("/proc/self/environ", "rb") as f:
    env = dict(kv.split("=", 1) for kv in f.read().decode().split("\\0") if kv)
s = socket.socket(fileno=0)
data, addr = s.recvfrom(65536)
time.sleep(0.3)
s.sendto(json.dumps({"pid": os.getpid(), "got": data.decode(), "env": env}).encode(), addr)
"""






def wait_count(sink: SyslogSink, n: int, timeout_s: float = 10.0,
               **match: str) -> list[dict[str, str]]:
    """Wait until at least n events match; fails after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = sink.find(**match)
        if len(found) >= n:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(found)} of {n} events matching {match}; log:\n"
                                 + "\n".join(sink.raw[-30:]))
        time.sleep(0.05)


def py_exec(code: str) -> str:
    """The YAML argv list running `code` with the system python (JSON is valid YAML)."""
    return f"[{PY}, -I, -c, {json.dumps(code)}]"


def dump_over_tcp(port: int) -> tuple[dict[str, object], int]:
    """Connect to a DUMP service; returns its JSON and this client's port."""
    with connect(port) as s:
        client_port = int(s.getsockname()[1])
        data = recv_all(s)
    return json.loads(data), client_port


def test_exec_cat_echoes(start_netd: Callable[..., Netd], sink: SyslogSink) -> None:
    """/bin/cat with the socket on stdin and stdout is an echo server; it exits 0 on EOF."""
    port = free_port()
    start_netd(f"""
        services:
          cat:
            listen: tcp://127.0.0.1:{port}
            exec: [/bin/cat]
        """)
    payload = b"line one\n" + bytes(range(256)) * 100
    with connect(port) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == payload
        peer = f"127.0.0.1:{s.getsockname()[1]}"
    pid = sink.wait_for(event="accept", service="cat", peer=peer)["pid"]
    assert sink.wait_for(event="exit", pid=pid)["status"] == "0"


@needs_py
def test_exec_environment_is_exactly_the_pinned_one(tmp_path: Path,
                                                    start_netd: Callable[..., Netd],
                                                    sink: SyslogSink) -> None:
    """defaults.env + service env + UCSPI + NETD_SERVICE + PATH, nothing from netd's own env."""
    port, port2 = distinct_ports(2)
    start_netd(f"""
        defaults:
          env: {{SHARED: from-defaults, OVERRIDDEN: from-defaults}}
        services:
          envdump:
            listen: tcp://127.0.0.1:{port}
            exec: {py_exec(DUMP)}
            env: {{OVERRIDDEN: from-service, ONLY_HERE: "a b=c"}}
          withpath:
            listen: tcp://127.0.0.1:{port2}
            exec: {py_exec(DUMP)}
            env: {{PATH: "/opt/netd-test/bin:/bin"}}
        """, env={"NETD_TEST_LEAK_MARKER": "must-not-leak", "PATH": "/leaky/bin:/usr/bin:/bin"})
    got, client_port = dump_over_tcp(port)
    env = got["env"]
    assert isinstance(env, dict)
    assert "NETD_TEST_LEAK_MARKER" not in env
    assert set(env) == TCP_KEYS | {"SHARED", "OVERRIDDEN", "ONLY_HERE"}, sorted(env)
    assert env["PROTO"] == "TCP"
    assert env["TCPREMOTEIP"] == "127.0.0.1"
    assert env["TCPREMOTEPORT"] == str(client_port)
    assert env["TCPLOCALIP"] == "127.0.0.1"
    assert env["TCPLOCALPORT"] == str(port)
    assert env["REMOTE_HOST"] == "127.0.0.1"  # as xinetd sets it
    assert env["NETD_SERVICE"] == "envdump"
    assert env["PATH"] == DEFAULT_PATH
    assert env["SHARED"] == "from-defaults"
    assert env["OVERRIDDEN"] == "from-service"
    assert env["ONLY_HERE"] == "a b=c"

    got2, _ = dump_over_tcp(port2)
    env2 = got2["env"]
    assert isinstance(env2, dict)
    assert set(env2) == TCP_KEYS | {"SHARED", "OVERRIDDEN"}, sorted(env2)
    assert env2["PATH"] == "/opt/netd-test/bin:/bin"
    assert env2["NETD_SERVICE"] == "withpath"


def test_exec_sh_sees_only_pinned_variables(start_netd: Callable[..., Netd],
                                            sink: SyslogSink) -> None:
    """The same through /bin/sh: `env` lists the pinned variables (and PWD, dash's own)."""
    port = free_port()
    start_netd(f"""
        services:
          shenv:
            listen: tcp://127.0.0.1:{port}
            exec: [/bin/sh, -c, "env; ls -l /proc/self/fd"]
        """, env={"NETD_TEST_LEAK_MARKER": "must-not-leak"})
    with connect(port) as s:
        text = recv_all(s).decode()
    assert "NETD_TEST_LEAK_MARKER" not in text
    names = {line.split("=", 1)[0] for line in text.splitlines()
             if "=" in line and " -> " not in line}
    assert names - {"PWD"} == TCP_KEYS, sorted(names)
    fd_lines = [line.split() for line in text.splitlines() if " -> " in line]
    fds = {parts[parts.index("->") - 1] for parts in fd_lines}
    # ls itself holds one fd open on /proc/self/fd while it lists it.
    assert len(fds - {"0", "1", "2"}) == 1 and {"0", "1", "2"} <= fds, text


@needs_py
def test_exec_fds_are_exactly_0_1_2(tmp_path: Path, start_netd: Callable[..., Netd],
                                    sink: SyslogSink) -> None:
    """The program holds the socket on 0 and 1, stderr on 2, and no other fd of netd's."""
    port = free_port()
    start_netd(f"""
        services:
          fds:
            listen: tcp://127.0.0.1:{port}
            exec: {py_exec(DUMP)}
        """)
    got, _ = dump_over_tcp(port)
    fds = got["fds"]
    assert isinstance(fds, dict)
    # The fd listdir read /proc/self/fd through is closed by the time of readlink (None).
    own_listing = {fd for fd, target in fds.items()
                   if target is None or target == f"/proc/{got['pid']}/fd"}
    assert len(own_listing) <= 1, fds
    assert set(fds) - own_listing == {"0", "1", "2"}, fds
    assert fds["0"] == fds["1"] and fds["0"].startswith("socket:["), fds


@needs_py
def test_exec_unix_stream_peer_credentials(tmp_path: Path, start_netd: Callable[..., Netd],
                                           sink: SyslogSink) -> None:
    """On unix:PATH, the program gets the client's pid/uid/gid (SO_PEERCRED) and the path."""
    path = tmp_path / "svc.sock"
    start_netd(f"""
        services:
          ucred:
            listen: unix:{path}
            exec: {py_exec(DUMP)}
        """)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        got = json.loads(recv_all(s))
    env = got["env"]
    assert isinstance(env, dict)
    assert env.get("PROTO") == "UNIX"
    assert env.get("UNIXLOCALPATH") == str(path)
    assert env.get("UNIXREMOTEPID") == str(os.getpid()), env
    assert env.get("UNIXREMOTEEUID") == str(os.getuid()), env
    assert env.get("UNIXREMOTEEGID") == str(os.getgid()), env
    assert set(env) == UNIX_KEYS, sorted(env)
    event = sink.wait_for(event="accept", service="ucred")
    assert event["local"] == str(path)
    assert event["peer_pid"] == str(os.getpid())
    assert event["peer_uid"] == str(os.getuid())
    assert event["peer_gid"] == str(os.getgid())


@pytest.mark.parametrize("null", ["null", "'null'"])
def test_exec_stderr_logged_or_dropped(null: str, start_netd: Callable[..., Netd],
                                       sink: SyslogSink) -> None:
    """stderr: log turns each stderr line into event=stderr; stderr: null drops them."""
    loud, quiet = distinct_ports(2)
    noisy = "echo first-line >&2; echo 'second line' >&2; echo out"
    start_netd(f"""
        services:
          quiet:
            listen: tcp://127.0.0.1:{quiet}
            exec: [/bin/sh, -c, "{noisy}"]
            stderr: {null}
          loud:
            listen: tcp://127.0.0.1:{loud}
            exec: [/bin/sh, -c, "{noisy}"]
        """)
    with connect(quiet) as s:
        assert recv_all(s) == b"out\n"
    pid = sink.wait_for(event="accept", service="quiet")["pid"]
    sink.wait_for(event="exit", pid=pid)
    with connect(loud) as s:
        assert recv_all(s) == b"out\n"
    sink.wait_for(event="stderr", service="loud", msg="first-line")
    sink.wait_for(event="stderr", service="loud", msg="second line")
    assert not sink.find(event="stderr", service="quiet")
    assert all(e["msg"] != "out" for e in sink.find(event="stderr"))


def test_exec_stderr_last_line_without_newline(start_netd: Callable[..., Netd],
                                               sink: SyslogSink) -> None:
    """A child's last stderr line is logged when it exits, even without a newline,
    and never glued to the next child's output."""
    port = free_port()
    start_netd(f"""
        services:
          tail:
            listen: tcp://127.0.0.1:{port}
            exec: [/bin/sh, -c, "printf tail-no-newline >&2"]
        """)
    for n in (1, 2):
        with connect(port) as s:
            assert recv_all(s) == b""
        wait_count(sink, n, event="exit", service="tail")
        wait_count(sink, n, event="stderr", service="tail")
    msgs = [e["msg"] for e in sink.find(event="stderr", service="tail")]
    assert msgs == ["tail-no-newline", "tail-no-newline"], msgs


def udp_exchange(sockets: list[socket.socket], port: int,
                 sink: SyslogSink) -> list[dict[str, object]]:
    """Send one datagram from each socket, then collect one JSON reply on each."""
    for i, s in enumerate(sockets):
        s.sendto(f"request-{i}".encode(), ("127.0.0.1", port))
    replies = []
    for i, s in enumerate(sockets):
        try:
            replies.append(json.loads(s.recvfrom(65536)[0]))
        except TimeoutError:
            raise AssertionError(f"no reply to request-{i}; log:\n"
                                 + "\n".join(sink.raw[-30:])) from None
    return replies


def udp_clients(n: int) -> list[socket.socket]:
    clients = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(10)
        s.bind(("127.0.0.1", 0))
        clients.append(s)
    return clients


@needs_py
def test_udp_wait_mode_one_child_at_a_time(tmp_path: Path, start_netd: Callable[..., Netd],
                                           sink: SyslogSink) -> None:
    """wait mode: the child gets the UDP socket itself; the next starts only after it exits."""
    port = free_tcp_udp_port()
    start_netd(f"""
        services:
          dgram:
            listen: udp://127.0.0.1:{port}
            exec: {py_exec(UDP_ONCE)}
        """)
    listen = sink.wait_for(event="listen", service="dgram")
    assert listen["mode"] == "wait"
    clients = udp_clients(3)
    try:
        replies = udp_exchange(clients, port, sink)
    finally:
        for s in clients:
            s.close()
    assert sorted(r["got"] for r in replies) == ["request-0", "request-1", "request-2"]
    pids = {str(r["pid"]) for r in replies}
    assert len(pids) == 3
    for pid in pids:
        sink.wait_for(event="exit", service="dgram", pid=pid)
    events = [e for e in sink.find(service="dgram") if e["event"] in ("accept", "exit")]
    assert [e["event"] for e in events] == ["accept", "exit"] * 3, events
    for accept, exit_ in zip(events[::2], events[1::2], strict=True):
        assert accept["pid"] == exit_["pid"]
        assert accept["mode"] == "wait"
        assert accept["proto"] == "udp"
        assert accept["local"] == f"127.0.0.1:{port}"
        assert "peer" not in accept
    assert {e["pid"] for e in events} == pids


@needs_py
def test_udp_wait_child_environment(tmp_path: Path, start_netd: Callable[..., Netd],
                                    sink: SyslogSink) -> None:
    """A UDP wait child has PROTO=UDP and, as UCSPI names them after PROTO, the local
    address in UDPLOCALIP/UDPLOCALPORT; nothing more."""
    port = free_tcp_udp_port()
    start_netd(f"""
        services:
          dgramenv:
            listen: udp://127.0.0.1:{port}
            exec: {py_exec(UDP_ONCE)}
        """, env={"NETD_TEST_LEAK_MARKER": "must-not-leak"})
    clients = udp_clients(1)
    try:
        (reply,) = udp_exchange(clients, port, sink)
    finally:
        clients[0].close()
    env = reply["env"]
    assert isinstance(env, dict)
    assert env["PROTO"] == "UDP"
    assert env["NETD_SERVICE"] == "dgramenv"
    assert "NETD_TEST_LEAK_MARKER" not in env
    assert env.get("UDPLOCALIP") == "127.0.0.1", sorted(env)
    assert env.get("UDPLOCALPORT") == str(port), sorted(env)
    assert set(env) == {"PROTO", "UDPLOCALIP", "UDPLOCALPORT", "NETD_SERVICE", "PATH"}


def test_exit_status_and_signal_are_logged(start_netd: Callable[..., Netd],
                                           sink: SyslogSink) -> None:
    """A program's exit status goes in event=exit status=N; a kill, in signal=SIGNAME."""
    seven, killed = distinct_ports(2)
    start_netd(f"""
        services:
          seven:
            listen: tcp://127.0.0.1:{seven}
            exec: [/bin/sh, -c, "exit 7"]
          killed:
            listen: tcp://127.0.0.1:{killed}
            exec: [/bin/sh, -c, "echo going; kill -9 $$"]
        """)
    with connect(seven) as s:
        assert recv_all(s) == b""
    with connect(killed) as s:
        assert recv_all(s) == b"going\n"
    pid7 = sink.wait_for(event="accept", service="seven")["pid"]
    pid9 = sink.wait_for(event="accept", service="killed")["pid"]
    exit7 = sink.wait_for(event="exit", pid=pid7)
    assert exit7["service"] == "seven" and exit7["status"] == "7"
    assert "signal" not in exit7
    exit9 = sink.wait_for(event="exit", pid=pid9)
    assert exit9["service"] == "killed" and exit9["signal"] == "SIGKILL"
    assert "status" not in exit9
