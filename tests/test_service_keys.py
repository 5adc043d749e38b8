"""The service keys that came with the inetd world: disable, program (argv[0] apart
from the program), passenv, log_connections, nodelay and keepalive; REMOTE_HOST."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from conftest import Netd, SyslogSink, connect, distinct_ports, output, recv_all, run_netd

StartNetd = Callable[..., Netd]
PY = "/usr/bin/python3"  # the system's: children run as nobody, who cannot enter .venv


def test_a_disabled_service_is_not_bound_and_is_listed(tmp_path: Path, sink: SyslogSink,
                                                       start_netd: StartNetd) -> None:
    """disable: true: not bound; `netd check` and `netd status` list it as disabled; what
    is wrong with it (a program not installed yet) is a warning, not an error."""
    port, off = distinct_ports(2)
    body = f"""
        services:
          active:
            listen: tcp://127.0.0.1:{port}
            builtin: echo
          later:
            disable: true
            listen: tcp://127.0.0.1:{off}
            exec: [/opt/not-installed/server]
        """
    netd = start_netd(body)
    assert not sink.find(event="listen", service="later")
    try:
        connect(off).close()
        raise AssertionError("a disabled service must not listen")
    except ConnectionRefusedError:
        pass
    check = run_netd("check", "-c", str(netd.config))
    assert check.returncode == 0, output(check)
    assert "OK, 1 service(s), 1 disabled" in check.stdout
    assert f"later   disabled ({netd.config}:" in check.stdout
    assert "program '/opt/not-installed/server' does not exist (service disabled)" \
        in check.stderr
    status = json.loads(run_netd("status", "-c", str(netd.config), "--json").stdout)
    assert [(s["name"], s["state"]) for s in status["services"]] == [
        ("active", "listening"), ("later", "disabled")]


def test_program_runs_with_its_own_argv0_and_env_has_passenv_and_remote_host(
        tmp_path: Path, sink: SyslogSink, start_netd: StartNetd) -> None:
    """program: the file run; exec: argv, whose first item is only argv[0] (as tcpd
    wants it). passenv takes variables from netd's environment; REMOTE_HOST is set."""
    (port,) = distinct_ports(1)
    script = 'echo "$0"; echo "$NETD_TEST_PASSED"; echo "$NETD_TEST_NOT_PASSED"; ' \
             'echo "$REMOTE_HOST"'
    start_netd(f"""
        services:
          named:
            listen: tcp://127.0.0.1:{port}
            program: /bin/sh
            exec: [argv-zero, -c, {json.dumps(script)}]
            passenv: [NETD_TEST_PASSED]
        """, env={"NETD_TEST_PASSED": "yes", "NETD_TEST_NOT_PASSED": "no"})
    with connect(port, source="127.0.0.5") as s:
        lines = recv_all(s).decode().split()
    assert lines == ["argv-zero", "yes", "127.0.0.5"], lines


def test_log_connections_and_tcp_options(tmp_path: Path, sink: SyslogSink,
                                         start_netd: StartNetd) -> None:
    """log_connections: [exit] logs the accept line at debug and the exit line at info;
    nodelay and keepalive are set on the connection the program gets."""
    (port,) = distinct_ports(1)
    script = ("import socket; s = socket.socket(fileno=0); "
              "print(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), "
              "s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))")
    start_netd(f"""
        services:
          poller:
            listen: tcp://127.0.0.1:{port}
            exec: [{PY}, -I, -c, {json.dumps(script)}]
            log_connections: [exit]
            nodelay: true
            keepalive: true
        """)
    with connect(port) as s:
        assert recv_all(s).split() == [b"1", b"1"]
    accept = sink.wait_for(event="accept", service="poller")
    sink.wait_for(event="exit", service="poller", pid=accept["pid"])
    raw = {e: next(r for r in sink.raw if f"event={e} service=poller" in r)
           for e in ("accept", "exit")}
    assert raw["accept"].startswith("<31>") and raw["exit"].startswith("<30>"), raw


def test_new_keys_are_checked(tmp_path: Path) -> None:
    from conftest import write_config

    config = write_config(tmp_path, """\
services:
  a:
    listen: udp://127.0.0.1:9
    builtin: echo
    program: /bin/cat
    nodelay: true
    log_connections: [start]
    passenv: [A=B]
    disable: maybe
""", None)
    done = run_netd("check", "-c", str(config))
    assert done.returncode == 78, output(done)
    for message in ("services.a.disable: expected true or false",
                    "services.a.program: goes with exec",
                    "services.a.nodelay: is for tcp:// addresses",
                    "services.a.log_connections: expected true, false or a list of accept",
                    "services.a.passenv: expected a list of variable names"):
        assert message in done.stderr, output(done)
