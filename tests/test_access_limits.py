"""Access lists, limits, rate suspension and timeouts with a real netd and real clients
(issue 4, items 1-3).

Clients pick their source address by binding to 127.0.0.2, 127.0.0.3, ... (all of
127/8 is local on Linux), so one test can be several peers. A refused connection is
closed by netd without a child: the client reads EOF (or a reset) and the log has
`event=refuse ... reason=WHY` and no `event=accept` for that peer. The pure decisions
(every combination of allow/deny, windows, counters) are tested in test_policy.py;
here each path is driven end to end.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    REPO,
    Netd,
    SyslogSink,
    children_of,
    connect,
    free_port,
    free_tcp_udp_port,
    recv_all,
)

IS_ROOT = os.geteuid() == 0
PY = "/usr/bin/python3"
WAIT_S = 10.0
# A child that says it is up, then holds its connection until the client sends a line.
HOLD = "[/bin/sh, -c, 'echo up; read x; echo bye']"


# -- helpers -------------------------------------------------------------------------


def peer_of(s: socket.socket) -> str:
    """How netd's log spells this client: IP:PORT or [IPv6]:PORT."""
    host, port = s.getsockname()[:2]
    return f"[{host}]:{port}" if s.family == socket.AF_INET6 else f"{host}:{port}"


def refused_by_close(s: socket.socket) -> bool:
    """True when netd closed the connection without sending anything."""
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def wait_up(s: socket.socket) -> None:
    """Wait for a HOLD child's first line."""
    got = b""
    while not got.endswith(b"\n"):
        data = s.recv(64)
        assert data, f"closed before the child said up (got {got!r})"
        got += data
    assert got == b"up\n", got


def release(s: socket.socket) -> None:
    """Let a HOLD child finish, and close."""
    with s:
        s.sendall(b"go\n")
        assert recv_all(s) == b"bye\n"


def wait_count(sink: SyslogSink, n: int, timeout_s: float = WAIT_S,
               **match: str) -> list[dict[str, str]]:
    """Wait until at least n events match; fails after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = sink.find(**match)
        if len(found) >= n:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(found)} of {n} events matching {match}; log:\n"
                                 + "\n".join(sink.raw[-40:]))
        time.sleep(0.02)




def echo_round(s: socket.socket, line: bytes) -> bytes:
    """Send one line to an echo service and read it back."""
    s.sendall(line)
    got = b""
    while len(got) < len(line):
        data = s.recv(4096)
        if not data:
            break
        got += data
    return got


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A world-traversable directory (tmp_path is 0700 under root): for unix sockets
    that an unprivileged client must reach."""
    path = Path(tempfile.mkdtemp(prefix="netd-access-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    for entry in path.iterdir():
        entry.unlink()
    path.rmdir()


# -- access lists -------------------------------------------------------------------


def test_ipv4_allow_and_deny_deny_wins(start_netd: Callable[..., Netd],
                                       sink: SyslogSink) -> None:
    """allow 127.0.0.0/8 with deny 127.0.0.2: .1 and .3 are served, .2 is refused without
    a child; a service that allows only 127.0.0.3 refuses 127.0.0.1."""
    port, only3 = free_port(), free_port()
    netd = start_netd(f"""
        services:
          echo:
            listen: tcp://127.0.0.1:{port}
            builtin: echo
            access: {{allow: [127.0.0.0/8], deny: [127.0.0.2]}}
          only3:
            listen: tcp://127.0.0.1:{only3}
            builtin: echo
            access: {{allow: [127.0.0.3/32]}}
        """)
    before = children_of(netd.proc.pid)
    with connect(port, source="127.0.0.2") as denied:
        assert refused_by_close(denied)
        denied_peer = peer_of(denied)
    event = sink.wait_for(event="refuse", service="echo", peer=denied_peer)
    assert event["reason"] == "access"
    for source in ("127.0.0.1", "127.0.0.3"):
        with connect(port, source=source) as ok:
            assert echo_round(ok, b"hello\n") == b"hello\n"
            sink.wait_for(event="accept", service="echo", peer=peer_of(ok))
    with connect(only3, source="127.0.0.1") as outside:
        assert refused_by_close(outside)
        outside_peer = peer_of(outside)
        assert sink.wait_for(event="refuse", service="only3",
                             peer=outside_peer)["reason"] == "access"
    with connect(only3, source="127.0.0.3") as inside:
        assert echo_round(inside, b"x\n") == b"x\n"
    # A refusal costs no fork: no accept for the refused peers, no new child.
    assert not sink.find(event="accept", peer=denied_peer)
    assert not sink.find(event="accept", service="only3", peer=outside_peer)
    accepted = wait_count(sink, 3, event="accept")  # echo from .1 and .3, only3 from .3
    assert len(accepted) == 3, accepted
    assert children_of(netd.proc.pid) <= before | {int(e["pid"]) for e in accepted}


def test_v4_mapped_entry_matches_a_plain_ipv4_client(start_netd: Callable[..., Netd],
                                                     sink: SyslogSink) -> None:
    """deny ::ffff:127.0.0.9 refuses the IPv4 client 127.0.0.9 (the list keeps v4-mapped
    entries as IPv4), and ::ffff:127.0.0.0/104 allows the v4 loopback net."""
    port, mapped_net = free_port(), free_port()
    start_netd(f"""
        services:
          echo:
            listen: tcp://127.0.0.1:{port}
            builtin: echo
            access: {{deny: ['::ffff:127.0.0.9']}}
          mapped:
            listen: tcp://127.0.0.1:{mapped_net}
            builtin: echo
            access: {{allow: ['::ffff:127.0.0.0/104'], deny: ['::ffff:127.0.0.10/127']}}
        """)
    with connect(port, source="127.0.0.9") as denied:
        assert refused_by_close(denied)
        assert sink.wait_for(event="refuse", peer=peer_of(denied))["reason"] == "access"
    with connect(port, source="127.0.0.8") as ok:
        assert echo_round(ok, b"a\n") == b"a\n"
    with connect(mapped_net, source="127.0.0.8") as ok:
        assert echo_round(ok, b"b\n") == b"b\n"
    with connect(mapped_net, source="127.0.0.11") as denied:
        assert refused_by_close(denied)
        assert sink.wait_for(event="refuse", peer=peer_of(denied))["reason"] == "access"


def test_v4_mapped_client_from_a_proxy_header_is_matched_as_ipv4(
        start_netd: Callable[..., Netd], sink: SyslogSink) -> None:
    """netd binds IPv6 sockets V6ONLY, so the one way a v4-mapped peer reaches it is a
    PROXY header naming one: ::ffff:127.0.0.2 is denied by `deny: [127.0.0.2]`, and
    counts for per_source as 127.0.0.2 does."""
    port = free_port()
    start_netd(f"""
        services:
          behind:
            listen: tcp://127.0.0.1:{port}
            exec: {HOLD}
            user: root
            proxy_protocol: {{from: [127.0.0.1], timeout: 5s}}
            access: {{deny: [127.0.0.2]}}
            limits: {{per_source: 1}}
        """)
    with connect(port) as s:
        s.sendall(b"PROXY TCP6 ::ffff:127.0.0.2 ::1 40001 80\r\n")
        assert refused_by_close(s)
    event = sink.wait_for(event="refuse", service="behind", reason="access")
    assert "127.0.0.2" in event["peer"] and "40001" in event["peer"], event
    # per_source: a v4-mapped 127.0.0.5 and a plain 127.0.0.5 are one source.
    first = connect(port)
    try:
        first.sendall(b"PROXY TCP4 127.0.0.5 127.0.0.1 40002 80\r\n")
        wait_up(first)
        with connect(port) as second:
            second.sendall(b"PROXY TCP6 ::ffff:127.0.0.5 ::1 40003 80\r\n")
            assert refused_by_close(second)
        sink.wait_for(event="refuse", service="behind", reason="per_source")
    finally:
        release(first)
    accepted = [e["peer"] for e in sink.find(event="accept")]
    assert not [p for p in accepted if p.endswith((":40001", ":40003"))], accepted


def test_ipv6_allow_and_deny(start_netd: Callable[..., Netd], sink: SyslogSink) -> None:
    """On [::1]: deny ::1 refuses; allow ::/0 with deny of another v6 net serves."""
    try:
        port = free_port(host="::1")
        other = free_port(host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    start_netd(f"""
        services:
          closed6:
            listen: tcp://[::1]:{port}
            builtin: echo
            access: {{deny: ['::1']}}
          open6:
            listen: tcp://[::1]:{other}
            builtin: echo
            access: {{allow: ['::/0'], deny: ['2001:db8::/32', 127.0.0.1]}}
        """)
    with connect(port, source="::1", host="::1") as denied:
        assert refused_by_close(denied)
        event = sink.wait_for(event="refuse", service="closed6", peer=peer_of(denied))
        assert event["reason"] == "access"
    with connect(other, source="::1", host="::1") as ok:
        assert echo_round(ok, b"six\n") == b"six\n"
        sink.wait_for(event="accept", service="open6", peer=peer_of(ok))
    assert not sink.find(event="accept", service="closed6")


def _unix_client(path: Path, user: str | None) -> tuple[int, bytes]:
    """Connect to a unix socket as `user` (a subprocess), read all; (returncode, data)."""
    code = textwrap.dedent(f"""
        import socket, sys
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect({str(path)!r})
        data = b""
        try:
            while chunk := s.recv(4096):
                data += chunk
        except ConnectionResetError:
            pass
        sys.stdout.buffer.write(data)
        """)
    as_user = {}
    if user is not None:
        entry = pwd.getpwnam(user)
        as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    result = subprocess.run([PY, "-I", "-c", code], capture_output=True, timeout=20,
                            **as_user)
    assert result.returncode == 0, result.stderr.decode()
    return result.returncode, result.stdout


@pytest.mark.skipif(not IS_ROOT, reason="a client of another uid needs root")
def test_unix_peers_by_uid_gid_user_and_group(start_netd: Callable[..., Netd],
                                              sink: SyslogSink, shared_dir: Path) -> None:
    """On unix sockets the lists match SO_PEERCRED: deny user:nobody refuses a client
    running as nobody and serves root; allow uid:0 refuses nobody; deny gid:N by the
    primary group; deny wins over allow."""
    nobody = pwd.getpwnam("nobody")
    paths = {name: shared_dir / f"{name}.sock"
             for name in ("denyuser", "allowroot", "denygid", "both")}
    services = {
        "denyuser": "{deny: ['user:nobody']}",
        "allowroot": "{allow: ['uid:0']}",
        "denygid": f"{{deny: ['gid:{nobody.pw_gid}']}}",
        "both": f"{{allow: ['uid:{nobody.pw_uid}', 'uid:0'], deny: ['uid:{nobody.pw_uid}']}}",
    }
    body = "services:\n" + "".join(f"""
          {name}:
            listen: unix:{paths[name]}
            socket: {{mode: '0666'}}
            exec: [/bin/sh, -c, 'echo served-$NETD_SERVICE']
            access: {rules}
""" for name, rules in services.items())
    start_netd(body)
    for name in services:
        _, got = _unix_client(paths[name], "nobody")
        assert got == b"", (name, got)
        event = sink.wait_for(event="refuse", service=name)
        assert event["reason"] == "access", event
        assert event.get("peer_uid") == str(nobody.pw_uid), event
        assert event.get("peer_gid") == str(nobody.pw_gid), event
    for name in ("denyuser", "allowroot", "denygid"):
        _, got = _unix_client(paths[name], None)
        assert got == f"served-{name}\n".encode(), (name, got)
    _, got = _unix_client(paths["both"], None)
    assert got == b"served-both\n"
    accepted = wait_count(sink, 4, event="accept")
    assert len(accepted) == 4 and all(e.get("peer_uid") == "0" for e in accepted), accepted


# -- limits -------------------------------------------------------------------------


def test_instances_refuse_and_fall_back_when_children_exit(
        start_netd: Callable[..., Netd], sink: SyslogSink) -> None:
    """instances: 2 -- a third concurrent connection is refused (no fork); once one child
    exits, a new connection is served again."""
    port = free_port()
    netd = start_netd(f"""
        services:
          held:
            listen: tcp://127.0.0.1:{port}
            exec: {HOLD}
            limits: {{instances: 2}}
        """)
    held = [connect(port), connect(port)]
    try:
        for s in held:
            wait_up(s)
        wait_count(sink, 2, event="accept", service="held")
        kids = children_of(netd.proc.pid)
        for _ in range(3):
            with connect(port, source="127.0.0.4") as extra:
                assert refused_by_close(extra)
        refusals = wait_count(sink, 3, event="refuse", service="held")
        assert {e["reason"] for e in refusals} == {"instances"}
        assert len(sink.find(event="accept", service="held")) == 2
        assert children_of(netd.proc.pid) == kids  # no fork for a refusal
        release(held.pop(0))
        wait_count(sink, 1, event="exit", service="held")
        again = connect(port, source="127.0.0.4")
        held.append(again)
        wait_up(again)
        # (A spawner reports the pid after the child may already have spoken.)
        assert len(wait_count(sink, 3, event="accept", service="held")) == 3
    finally:
        for s in held:
            release(s)
    wait_count(sink, 3, event="exit", service="held")


def test_per_source_refuses_one_source_not_others(start_netd: Callable[..., Netd],
                                                  sink: SyslogSink) -> None:
    """per_source: 1 -- a second connection from 127.0.0.1 is refused while 127.0.0.2
    and 127.0.0.3 are served; after the first child exits, 127.0.0.1 is served again."""
    port = free_port()
    start_netd(f"""
        services:
          held:
            listen: tcp://127.0.0.1:{port}
            exec: {HOLD}
            limits: {{per_source: 1, instances: 10}}
        """)
    first = connect(port, source="127.0.0.1")
    others: list[socket.socket] = []
    try:
        wait_up(first)
        with connect(port, source="127.0.0.1") as second:
            assert refused_by_close(second)
            event = sink.wait_for(event="refuse", service="held", peer=peer_of(second))
            assert event["reason"] == "per_source"
        for source in ("127.0.0.2", "127.0.0.3"):
            others.append(connect(port, source=source))
            wait_up(others[-1])
        release(first)
        sink.wait_for(event="exit", service="held")
        first = connect(port, source="127.0.0.1")
        wait_up(first)
    finally:
        for s in [first, *others]:
            release(s)
    assert len(sink.find(event="refuse", service="held")) == 1


def test_max_children_is_global_across_services(tmp_path: Path,
                                                start_netd: Callable[..., Netd],
                                                sink: SyslogSink) -> None:
    """daemon.max_children: 2 counts every service's children: with one held on each of
    two services, a third connection to either is refused reason=max_children."""
    a, b = free_port(), free_port()
    start_netd(f"""
        daemon:
          pidfile: {tmp_path / 'netd.pid'}
          control: {tmp_path / 'control.sock'}
          max_children: 2
        services:
          a:
            listen: tcp://127.0.0.1:{a}
            exec: {HOLD}
          b:
            listen: tcp://127.0.0.1:{b}
            exec: {HOLD}
        """)
    held = [connect(a), connect(b)]
    try:
        for s in held:
            wait_up(s)
        for port, name in ((a, "a"), (b, "b")):
            with connect(port) as extra:
                assert refused_by_close(extra)
                event = sink.wait_for(event="refuse", service=name, peer=peer_of(extra))
                assert event["reason"] == "max_children"
        release(held.pop())
        sink.wait_for(event="exit", service="b")
        held.append(connect(a))
        wait_up(held[-1])
    finally:
        for s in held:
            release(s)


def test_rate_suspends_then_resumes_and_serves_every_queued_connection(
        start_netd: Callable[..., Netd], sink: SyslogSink) -> None:
    """rate: 3/s -- 8 connections at once: 3 are accepted, the service is suspended
    (event=suspend reason=rate), the rest wait in the backlog and are served after
    event=resume. None is refused, none is lost, and no run of accepts between two
    suspensions is longer than the rate."""
    port = free_port()
    start_netd(f"""
        services:
          echo:
            listen: tcp://127.0.0.1:{port}
            builtin: echo
            limits: {{rate: 3/s, rate_pause: 500ms}}
        """)
    clients = [connect(port) for _ in range(8)]
    try:
        for i, s in enumerate(clients):
            s.sendall(f"line {i}\n".encode())
        for i, s in enumerate(clients):
            want = f"line {i}\n".encode()
            got = b""
            while len(got) < len(want):
                data = s.recv(64)
                assert data, f"client {i} dropped after {got!r}"
                got += data
            assert got == want
    finally:
        for s in clients:
            s.close()
    wait_count(sink, 8, event="accept", service="echo")
    suspends = sink.find(event="suspend", service="echo")
    assert len(suspends) >= 2 and {e["reason"] for e in suspends} == {"rate"}
    assert len(sink.find(event="resume", service="echo")) >= 2
    assert not sink.find(event="refuse")
    # The order of events: accepts come in runs of at most 3, each run after a resume.
    run, runs = 0, []
    for event in list(sink.events):
        if event.get("service") != "echo":
            continue
        if event.get("event") == "accept":
            run += 1
        elif event.get("event") == "suspend":
            runs.append(run)
            run = 0
        elif event.get("event") == "resume":
            assert run == 0, "an accept between suspend and resume"
    runs.append(run)
    assert max(runs) <= 3 and sum(runs) == 8, runs


def test_refusals_are_counted_and_cost_no_fork(start_netd: Callable[..., Netd],
                                               sink: SyslogSink) -> None:
    """A burst of 50 refused connections (access) starts no child: netd's children are
    the same before and after, and there are 50 refuse events and no accept."""
    port = free_port()
    netd = start_netd(f"""
        services:
          closed:
            listen: tcp://127.0.0.1:{port}
            exec: [/bin/cat]
            access: {{deny: [127.0.0.0/8]}}
        """)
    before = children_of(netd.proc.pid)
    for _ in range(50):
        with connect(port) as s:
            assert refused_by_close(s)
    wait_count(sink, 50, event="refuse", service="closed", reason="access")
    assert children_of(netd.proc.pid) == before
    assert not sink.find(event="accept")


def test_udp_builtin_answered_in_the_supervisor_obeys_access(
        start_netd: Callable[..., Netd], sink: SyslogSink) -> None:
    """A UDP echo answered inline by the supervisor must not answer a denied peer (an
    access list that only TCP obeyed would be a hole); allowed peers are answered."""
    port = free_tcp_udp_port()
    start_netd(f"""
        services:
          echo:
            listen: [tcp://127.0.0.1:{port}, udp://127.0.0.1:{port}]
            builtin: echo
            access: {{deny: [127.0.0.2]}}
        """)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ok:
        ok.settimeout(5)
        ok.bind(("127.0.0.3", 0))
        ok.sendto(b"allowed", ("127.0.0.1", port))
        assert ok.recvfrom(100)[0] == b"allowed"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as denied:
        denied.settimeout(1.0)
        denied.bind(("127.0.0.2", 0))
        denied.sendto(b"denied", ("127.0.0.1", port))
        with pytest.raises(TimeoutError):
            got = denied.recvfrom(100)
            pytest.fail(f"a denied UDP peer was answered: {got!r}")
        event = sink.wait_for(event="refuse", service="echo", reason="access")
        assert event["peer"] == f"127.0.0.2:{denied.getsockname()[1]}", event


def test_workers_mode_obeys_access_or_refuses_the_config(
        tmp_path: Path, start_netd: Callable[..., Netd], sink: SyslogSink) -> None:
    """In workers mode the workers accept themselves; a deny list must still hold (or
    the combination must be a config error, not silently ignored)."""
    port = free_port()
    body = f"""
        services:
          pooled:
            listen: tcp://127.0.0.1:{port}
            builtin: echo
            workers: 1
            access: {{deny: [127.0.0.2]}}
        """
    netd = start_netd(body, ready=False)
    try:
        sink.wait_for(5.0, event="ready")
    except AssertionError:
        netd.proc.wait(timeout=WAIT_S)
        err = netd.proc.stderr.read().decode() if netd.proc.stderr else ""
        assert netd.proc.returncode == 78 and "workers" in err, err
        return
    try:
        sink.wait_for(event="worker", service="pooled")
        with connect(port, source="127.0.0.3") as ok:
            assert echo_round(ok, b"ok\n") == b"ok\n"
        with connect(port, source="127.0.0.2") as denied:
            try:
                denied.sendall(b"should not echo\n")
                got = denied.recv(100)
            except ConnectionResetError:
                got = b""
            assert got == b"", "a worker served a denied peer"
    finally:
        netd.stop()  # workers hold netd's stdout: a SIGKILLed netd would leave them


# -- timeouts -----------------------------------------------------------------------


def test_idle_timeout_closes_builtin_and_python_handlers(
        tmp_path: Path, start_netd: Callable[..., Netd], sink: SyslogSink) -> None:
    """timeout: 1s -- a peer that never sends is disconnected by an echo builtin and by
    a python handler, each logged as event=close reason=timeout (and the handler's
    child exits 0; the builtin has no child of its own)."""
    (tmp_path / "idle_handlers.py").write_text(textwrap.dedent("""
        def read_forever(conn, peer):
            while conn.recv(4096):
                pass
        """))
    echo, py = free_port(), free_port()
    start_netd(f"""
        services:
          echo:
            listen: tcp://127.0.0.1:{echo}
            builtin: echo
            timeout: 1s
          py:
            listen: tcp://127.0.0.1:{py}
            python: idle_handlers:read_forever
            timeout: 1s
        """, env={"PYTHONPATH": f"{REPO}:{tmp_path}"})
    for port, name in ((echo, "echo"), (py, "py")):
        with connect(port) as s:
            s.settimeout(8)
            assert recv_all(s) == b""
        sink.wait_for(event="close", service=name, reason="timeout")
        if name == "py":
            assert sink.wait_for(event="exit", service=name)["status"] == "0"


def test_max_duration_sigterm_then_sigkill(start_netd: Callable[..., Netd],
                                           sink: SyslogSink) -> None:
    """max_duration: 1s -- a child still running gets SIGTERM (logged event=timeout
    reason=max_duration signal=SIGTERM); one that ignores it gets SIGKILL 5 s later."""
    polite, stubborn = free_port(), free_port()
    start_netd(f"""
        services:
          polite:
            listen: tcp://127.0.0.1:{polite}
            exec: [/bin/sh, -c, 'echo up; sleep 30']
            max_duration: 1s
          stubborn:
            listen: tcp://127.0.0.1:{stubborn}
            exec: [/bin/sh, -c, 'trap "" TERM; echo up; while :; do sleep 0.2; done']
            max_duration: 1s
        """)
    with connect(polite) as p, connect(stubborn) as s:
        s.settimeout(15)
        wait_up(p)
        wait_up(s)
        pid = sink.wait_for(event="accept", service="polite")["pid"]
        term = sink.wait_for(event="timeout", service="polite", pid=pid)
        assert term["reason"] == "max_duration" and term["signal"] == "SIGTERM"
        assert sink.wait_for(event="exit", pid=pid)["signal"] == "SIGTERM"
        assert recv_all(p) == b""
        spid = sink.wait_for(event="accept", service="stubborn")["pid"]
        sink.wait_for(event="timeout", service="stubborn", pid=spid, signal="SIGTERM")
        kill = sink.wait_for(12, event="timeout", service="stubborn", pid=spid,
                             signal="SIGKILL")
        assert kill["reason"] == "max_duration"
        assert sink.wait_for(event="exit", pid=spid)["signal"] == "SIGKILL"


# -- default limits (issue 10, item 2) ------------------------------------------------

DEFAULT_PER_SOURCE = 256  # README, "Default limits"
FLOOD = 1200


def sleeping_descendants(pid: int) -> list[int]:
    """The /bin/sleep processes anywhere under `pid` (netd's spawner starts them)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            kids = children_of(parent)
        except OSError:
            continue  # it ended meanwhile
        todo.extend(kids)
        for kid in kids:
            try:
                if Path(f"/proc/{kid}/comm").read_text().strip() == "sleep":
                    found.append(kid)
            except OSError:
                pass
    return found


def service_status(directory: Path, name: str) -> dict[str, Any]:
    """One service's entry of the daemon's status, asked on its control socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(WAIT_S)
        s.connect(str(directory / "control.sock"))
        s.sendall(b'{"cmd": "status"}\n')
        reply = json.loads(recv_all(s))
    found: dict[str, Any] = next(x for x in reply["services"] if x["name"] == name)
    return found


def test_default_limits_bound_one_client_and_recover_by_themselves(
        start_netd: Callable[..., Netd], sink: SyslogSink) -> None:
    """No limits in the config: 1,200 connections from one client to a program that
    sleeps 20 s start no more than the default per_source children; the rest are
    refused (reason=per_source) without a fork. Another client is served meanwhile, and
    once the children end, the first client is served again with nobody stepping in."""
    port = free_port()
    netd = start_netd(f"""
        services:
          sleepy:
            listen: tcp://127.0.0.1:{port}
            exec: [/bin/sleep, "20"]
        """)
    try:
        for _ in range(FLOOD):
            connect(port).close()
        # The accept queue is served in order: once the other client's connection is
        # accepted, every one of the flood has been decided.
        with connect(port, source="127.0.0.2") as other:
            sink.wait_for(event="accept", service="sleepy", peer=peer_of(other))
        live = sleeping_descendants(netd.proc.pid)
        assert len(live) == DEFAULT_PER_SOURCE + 1, len(live)
        status = service_status(netd.config.parent, "sleepy")
        assert status["children"] == DEFAULT_PER_SOURCE + 1, status
        assert status["refused"] == FLOOD - DEFAULT_PER_SOURCE, status
        refusals = sink.find(event="refuse", service="sleepy")
        assert refusals and {e["reason"] for e in refusals} == {"per_source"}, refusals[:3]
        assert not sink.find(event="error")

        for pid in live:  # the children end (as if their 20 s were up)
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + WAIT_S
        while service_status(netd.config.parent, "sleepy")["children"]:
            assert time.monotonic() < deadline, "the children's ends were not counted"
            time.sleep(0.05)
        with connect(port) as again:
            sink.wait_for(event="accept", service="sleepy", peer=peer_of(again))
    finally:
        for pid in sleeping_descendants(netd.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
