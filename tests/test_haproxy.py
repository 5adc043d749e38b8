"""netd behind a real HAProxy speaking the PROXY protocol, v1 (send-proxy) and v2
(send-proxy-v2), end to end (issue 4, item 6).

HAProxy connects to netd from 127.0.0.1; the test's clients connect to HAProxy from
127.0.0.2 and 127.0.0.3, so the address in the header differs from the connection's
and each check below can only pass if netd used the header: TCPREMOTEIP, the accept
log line, the access list and per_source all see the real client. Without a header,
with a bad one, or with one from an address that is not a configured load balancer,
the connection is refused with reason=proxy. The parser itself is table-, property-
and fuzz-tested in test_proxy_parser.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Netd, SyslogSink, connect, free_port, recv_all

WAIT_S = 10.0
HOLD = "[/bin/sh, -c, 'echo up; read x; echo bye']"


def _haproxy() -> str:
    """The haproxy binary: installed from Debian's packages when root and missing."""
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        # policy-rc.d (as scripts/setup.sh does) keeps the packaged daemon from starting.
        subprocess.run(["apt-get", "install", "-y", "-q", "haproxy"], capture_output=True,
                       timeout=300, env=env)
        found = shutil.which("haproxy", path="/usr/sbin:/sbin")
    if found is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    return found


class HAProxy:
    """A foreground haproxy (-db) with one frontend per backend line given."""

    def __init__(self, tmp_path: Path, routes: list[tuple[str, int, str]]) -> None:
        """routes: (frontend bind address as host:port, netd port, server options)."""
        self.probe = free_port()
        lines = [
            "global", "    maxconn 256",
            "defaults", "    mode tcp", "    timeout connect 3s", "    timeout client 20s",
            "    timeout server 20s",
            # Up when this frontend answers: every frontend is bound before any serves.
            "frontend probe", f"    bind 127.0.0.1:{self.probe}",
            "    tcp-request connection reject",
        ]
        for i, (bind, port, options) in enumerate(routes):
            lines += [f"frontend fe{i}", f"    bind {bind}", f"    default_backend be{i}",
                      f"backend be{i}", f"    server netd 127.0.0.1:{port} {options}"]
        self.config = tmp_path / "haproxy.cfg"
        self.config.write_text("\n".join(lines) + "\n")
        check = subprocess.run([_haproxy(), "-c", "-f", str(self.config)],
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        self.proc = subprocess.Popen([_haproxy(), "-f", str(self.config), "-db"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + WAIT_S
        while True:
            assert self.proc.poll() is None, self.proc.stderr.read().decode()  # type: ignore[union-attr]
            try:
                socket.create_connection(("127.0.0.1", self.probe), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("haproxy did not start listening") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.communicate(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate(timeout=WAIT_S)


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Callable[[list[tuple[str, int, str]]], HAProxy]]:
    """haproxy(routes) -> a running HAProxy, stopped in teardown."""
    started: list[HAProxy] = []

    def start(routes: list[tuple[str, int, str]]) -> HAProxy:
        h = HAProxy(tmp_path, routes)
        started.append(h)
        h.wait_ready()
        return h

    yield start
    for h in started:
        h.stop()



def refused_by_close(s: socket.socket) -> bool:
    """True when the connection ended without a byte from the service."""
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def read_env(s: socket.socket) -> dict[str, str]:
    """The output of /usr/bin/env, sent by the service, as a dict."""
    return dict(line.split("=", 1) for line in recv_all(s).decode().splitlines())


SEND = {"v1": "send-proxy", "v2": "send-proxy-v2"}


@pytest.mark.parametrize("version", sorted(SEND))
def test_real_client_address_reaches_env_logs_and_access(
        version: str, start_netd: Callable[..., Netd], sink: SyslogSink,
        haproxy: Callable[..., HAProxy]) -> None:
    """Through HAProxy: the program's TCPREMOTEIP/PORT is the client (127.0.0.2, its
    port), TCPLOCALIP/PORT what the client connected to; the accept line names the
    client; a deny of 127.0.0.2 refuses it (reason=access) while 127.0.0.3 is served;
    the client's own bytes arrive intact after the header."""
    env_port, guarded, cat = free_port(), free_port(), free_port()
    start_netd(f"""
        services:
          env:
            listen: tcp://127.0.0.1:{env_port}
            exec: [/usr/bin/env]
            proxy_protocol: {{from: [127.0.0.1]}}
          guarded:
            listen: tcp://127.0.0.1:{guarded}
            exec: [/usr/bin/env]
            proxy_protocol: {{from: [127.0.0.1]}}
            access: {{deny: [127.0.0.2]}}
          cat:
            listen: tcp://127.0.0.1:{cat}
            exec: [/bin/cat]
            proxy_protocol: {{from: [127.0.0.1]}}
        """)
    fronts = [free_port() for _ in range(3)]
    haproxy([(f"127.0.0.1:{fronts[0]}", env_port, SEND[version]),
             (f"127.0.0.1:{fronts[1]}", guarded, SEND[version]),
             (f"127.0.0.1:{fronts[2]}", cat, SEND[version])])

    with connect(fronts[0], source="127.0.0.2") as s:
        client_port = s.getsockname()[1]
        env = read_env(s)
    assert env["TCPREMOTEIP"] == "127.0.0.2" and env["TCPREMOTEPORT"] == str(client_port), env
    assert env["TCPLOCALIP"] == "127.0.0.1" and env["TCPLOCALPORT"] == str(fronts[0]), env
    accept = sink.wait_for(event="accept", service="env")
    assert accept["peer"] == f"127.0.0.2:{client_port}", accept

    with connect(fronts[1], source="127.0.0.2") as s:
        denied_port = s.getsockname()[1]
        assert refused_by_close(s)
    refuse = sink.wait_for(event="refuse", service="guarded")
    assert refuse["reason"] == "access" and refuse["peer"] == f"127.0.0.2:{denied_port}"
    with connect(fronts[1], source="127.0.0.3") as s:
        assert read_env(s)["TCPREMOTEIP"] == "127.0.0.3"
    served = sink.wait_for(event="accept", service="guarded")  # (logged once the pid is known)
    assert served["peer"].startswith("127.0.0.3:"), served
    assert len(sink.find(event="accept", service="guarded")) == 1

    payload = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n" + bytes(range(256)) * 64
    with connect(fronts[2], source="127.0.0.3") as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == payload  # a second header is the client's data, untouched
    assert not sink.find(event="refuse", reason="proxy")


@pytest.mark.parametrize("version", sorted(SEND))
def test_limits_count_the_real_client(version: str, start_netd: Callable[..., Netd],
                                      sink: SyslogSink,
                                      haproxy: Callable[..., HAProxy]) -> None:
    """per_source: 1 behind HAProxy: every connection comes from HAProxy's 127.0.0.1, but
    a second one from client 127.0.0.2 is refused (per_source) while 127.0.0.3 is
    served -- the limit counts the address in the header."""
    port = free_port()
    start_netd(f"""
        services:
          held:
            listen: tcp://127.0.0.1:{port}
            exec: {HOLD}
            proxy_protocol: {{from: [127.0.0.1]}}
            limits: {{per_source: 1}}
        """)
    front = free_port()
    haproxy([(f"127.0.0.1:{front}", port, SEND[version])])
    first = connect(front, source="127.0.0.2")
    other = connect(front, source="127.0.0.3")
    try:
        for s in (first, other):
            assert s.recv(3) == b"up\n"
        with connect(front, source="127.0.0.2") as second:
            second_port = second.getsockname()[1]
            assert refused_by_close(second)
        refuse = sink.wait_for(event="refuse", service="held")
        assert refuse["reason"] == "per_source"
        assert refuse["peer"] == f"127.0.0.2:{second_port}", refuse
    finally:
        for s in (first, other):
            with s:
                s.sendall(b"go\n")
                recv_all(s)


@pytest.mark.parametrize("version", sorted(SEND))
def test_ipv6_client_through_haproxy(version: str, start_netd: Callable[..., Netd],
                                     sink: SyslogSink,
                                     haproxy: Callable[..., HAProxy]) -> None:
    """A client on ::1 through HAProxy to netd's IPv4 socket: TCPREMOTEIP is ::1 and the
    log spells the peer as IPv6 ([::1]:PORT)."""
    try:
        front = free_port(host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    port = free_port()
    start_netd(f"""
        services:
          env:
            listen: tcp://127.0.0.1:{port}
            exec: [/usr/bin/env]
            proxy_protocol: {{from: [127.0.0.1]}}
        """)
    haproxy([(f"[::1]:{front}", port, SEND[version])])
    with connect(front, source="::1", host="::1") as s:
        client_port = s.getsockname()[1]
        env = read_env(s)
    assert env["TCPREMOTEIP"] == "::1" and env["TCPREMOTEPORT"] == str(client_port), env
    assert env["TCPLOCALIP"] == "::1" and env["TCPLOCALPORT"] == str(front), env
    accept = sink.wait_for(event="accept", service="env")
    assert accept["peer"] == f"[::1]:{client_port}", accept


def test_missing_bad_and_untrusted_headers_are_refused(start_netd: Callable[..., Netd],
                                                       sink: SyslogSink) -> None:
    """Straight to netd, no HAProxy: a trusted peer that sends no header is refused when
    the header timeout passes; one that sends garbage is refused at once; an untrusted
    peer (127.0.0.3) with a well-formed, forged header is refused without its header
    being believed. Each is reason=proxy and none starts a child."""
    port = free_port()
    start_netd(f"""
        services:
          env:
            listen: tcp://127.0.0.1:{port}
            exec: [/usr/bin/env]
            proxy_protocol: {{from: [127.0.0.1, 127.0.0.2/32], timeout: 1s}}
        """)
    with connect(port, source="127.0.0.1") as silent:
        silent.settimeout(8)
        silent_port = silent.getsockname()[1]
        started = time.monotonic()
        assert refused_by_close(silent)
        assert time.monotonic() - started >= 0.5  # it was the timeout, not an instant close
    event = sink.wait_for(event="refuse", peer=f"127.0.0.1:{silent_port}")
    assert event["reason"] == "proxy" and "time" in event["msg"], event

    with connect(port, source="127.0.0.2") as garbage:
        garbage.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        garbage_port = garbage.getsockname()[1]
        assert refused_by_close(garbage)
    event = sink.wait_for(event="refuse", peer=f"127.0.0.2:{garbage_port}")
    assert event["reason"] == "proxy" and "PROXY" in event["msg"], event

    with connect(port, source="127.0.0.3") as forger:
        forger.sendall(b"PROXY TCP4 127.0.0.1 127.0.0.1 1234 80\r\n")
        forger_port = forger.getsockname()[1]
        assert refused_by_close(forger)
    event = sink.wait_for(event="refuse", peer=f"127.0.0.3:{forger_port}")
    assert event["reason"] == "proxy" and "trusted" in event["msg"], event
    assert not sink.find(event="accept"), "a refused connection got a child"
    assert not sink.find(peer="127.0.0.1:1234")
