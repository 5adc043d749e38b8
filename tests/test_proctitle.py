"""Process titles: `ps` tells the supervisor, its spawners, the prefork workers and the
python handlers' children apart (netd.proctitle), read from /proc/PID/cmdline of a
real netd."""

from __future__ import annotations

import os
import pwd
import signal
import socket
from collections.abc import Callable
from pathlib import Path

from conftest import (
    REPO,
    Netd,
    SyslogSink,
    connect,
    distinct_ports,
    netd_env,
    recv_all,
    wait_until,
)

from netd import proctitle


def title(pid: int | str) -> str:
    """What `ps -o args` shows for `pid`."""
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode()


def comm(pid: int | str) -> str:
    """What `ps -e`, `top` and /proc/PID/stat show: one word."""
    return Path(f"/proc/{pid}/comm").read_text().rstrip("\n")


def parent(pid: int | str) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def user_of(pid: int | str) -> str:
    uid = Path(f"/proc/{pid}").stat().st_uid
    return pwd.getpwuid(uid).pw_name


def test_every_kind_of_process_has_its_title(start_netd: Callable[..., Netd],
                                             sink: SyslogSink) -> None:
    """The supervisor names its config, a spawner its user and services, a worker its
    service, a handler's child its service and peer; an exec child is its program."""
    echo, cat, hold, pooled = distinct_ports(4)
    netd = start_netd(f"""
        services:
          echo: {{listen: "tcp://127.0.0.1:{echo}", builtin: echo}}
          cat: {{listen: "tcp://127.0.0.1:{cat}", exec: [/bin/cat]}}
          hold: {{listen: "tcp://127.0.0.1:{hold}", python: "svc_handlers:boom_or_echo"}}
          pooled: {{listen: "tcp://127.0.0.1:{pooled}", builtin: echo, workers: 1}}
        """)
    assert title(netd.proc.pid) == f"netd: supervisor -c {netd.config}"
    assert comm(netd.proc.pid) == "netd-supervisor"
    worker = sink.wait_for(event="worker", service="pooled")["pid"]
    # The supervisor logs the worker as soon as it forked it.
    wait_until(lambda: title(worker) == "netd: worker pooled", "the worker's title")
    with connect(hold) as held, connect(cat) as catting:
        held.sendall(b"waiting ")  # the handler holds the connection until a newline
        peer = f"127.0.0.1:{held.getsockname()[1]}"
        child = sink.wait_for(event="accept", service="hold", peer=peer)["pid"]
        spawner = parent(child)
        # The spawner logs the accept as soon as it forked the child.
        wait_until(lambda: title(child) == f"netd: hold {peer}", "the handler child's title")
        assert title(spawner) == f"netd: spawner user={user_of(spawner)} (cat, echo, hold)"
        assert (comm(spawner), comm(child), comm(worker)) == (
            "netd-spawner", "netd-handler", "netd-worker")
        assert parent(spawner) == netd.proc.pid
        catting.sendall(b"x")
        assert catting.recv(1) == b"x"
        cat_child = sink.wait_for(event="accept", service="cat")["pid"]
        assert title(cat_child) == "/bin/cat"
        held.sendall(b"done\n")
        assert recv_all(held) == b"waiting done\n"


def test_a_handler_child_on_a_unix_socket_names_its_client(
        start_netd: Callable[..., Netd], sink: SyslogSink, tmp_path: Path) -> None:
    """On a unix socket the client is its pid (SO_PEERCRED)."""
    path = tmp_path / "hold.sock"
    start_netd(f"""
        services:
          hold: {{listen: "unix:{path}", python: "svc_handlers:boom_or_echo"}}
        """)
    with socket.socket(socket.AF_UNIX) as held:
        held.settimeout(10)
        held.connect(str(path))
        held.sendall(b"waiting ")
        child = sink.wait_for(event="accept", service="hold")["pid"]
        expected = f"netd: hold unix pid={os.getpid()}"
        wait_until(lambda: title(child) == expected, f"the title {expected!r}")
        held.sendall(b"done\n")
        assert recv_all(held) == b"waiting done\n"


def test_a_spawner_of_many_services_keeps_its_title_short(
        start_netd: Callable[..., Netd], sink: SyslogSink) -> None:
    """Five services: three named, the rest counted."""
    ports = distinct_ports(5)
    services = "".join(f'  s{i}: {{listen: "tcp://127.0.0.1:{port}", builtin: echo}}\n'
                       for i, port in enumerate(ports))
    netd = start_netd("services:\n" + services)
    with connect(ports[0]) as s:
        s.sendall(b"x")
        assert s.recv(1) == b"x"
    spawner = sink.wait_for(event="accept", service="s0")["pid"]  # inline: the spawner
    assert parent(spawner) == netd.proc.pid
    assert title(spawner) == f"netd: spawner user={user_of(spawner)} (s0, s1, s2, +2 more)"


def test_a_retired_spawner_says_so(start_netd: Callable[..., Netd], sink: SyslogSink) -> None:
    """After a reload that changes its services, the old spawner finishes its children
    under a title that says it is retiring."""
    hold, other = distinct_ports(2)
    body = f"""
        services:
          hold: {{listen: "tcp://127.0.0.1:{hold}", python: "svc_handlers:boom_or_echo"}}
        """
    netd = start_netd(body)
    with connect(hold) as held:
        held.sendall(b"waiting ")
        child = sink.wait_for(event="accept", service="hold")["pid"]
        old = parent(child)
        netd.config.write_text(netd.config.read_text() + (
            f'  other: {{listen: "tcp://127.0.0.1:{other}", builtin: echo}}\n'))
        netd.proc.send_signal(signal.SIGHUP)
        sink.wait_for(event="reload", result="ok")
        expected = f"netd: spawner user={user_of(old)} (hold) retiring"
        # It is told to retire once its replacement serves.
        wait_until(lambda: title(old) == expected, f"the title {expected!r}")
        held.sendall(b"done\n")
        assert recv_all(held) == b"waiting done\n"


def test_netd_runs_without_setproctitle(start_netd: Callable[..., Netd], sink: SyslogSink,
                                        tmp_path: Path) -> None:
    """Titles are a nicety: with setproctitle missing netd serves as before, with the
    command line it was started with."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "setproctitle.py").write_text("raise ImportError('not installed here')\n")
    (port,) = distinct_ports(1)
    env = netd_env()
    env["PYTHONPATH"] = os.pathsep.join([str(shadow), env["PYTHONPATH"]])
    netd = start_netd(f"""
        services:
          echo: {{listen: "tcp://127.0.0.1:{port}", builtin: echo}}
        """, env=env)
    with connect(port) as s:
        s.sendall(b"still\n")
        s.shutdown(1)
        assert recv_all(s) == b"still\n"
    assert title(netd.proc.pid).endswith(f"-m netd run -c {netd.config}")


def test_titles_are_set_when_setproctitle_is_there() -> None:
    """setproctitle is a dependency of netd (setup.cfg, debian/control through it): the
    tests run with it."""
    assert proctitle._setters() is not None, "setproctitle is not installed"
    assert "setproctitle" in (REPO / "setup.cfg").read_text()


def test_the_child_that_loads_a_config_says_so(start_netd: Callable[..., Netd],
                                                sink: SyslogSink, tmp_path: Path) -> None:
    """At a reload the config is read in a child of the supervisor: while it reads (here
    an inetd.conf that is a FIFO nobody has opened yet) `ps` shows what it does."""
    (port,) = distinct_ports(1)
    body = f'services:\n  echo: {{listen: "tcp://127.0.0.1:{port}", builtin: echo}}\n'
    netd = start_netd(body)
    fifo = tmp_path / "inetd.conf"
    os.mkfifo(fifo, 0o600)
    netd.config.write_text(netd.config.read_text() + f"inetd: [{fifo}]\n")
    netd.proc.send_signal(signal.SIGHUP)

    def loaders() -> list[int]:
        children = Path(f"/proc/{netd.proc.pid}/task/{netd.proc.pid}/children").read_text()
        return [int(c) for c in children.split() if comm(c) == "netd-loader"]

    wait_until(lambda: bool(loaders()), "the loading child")
    (loader,) = loaders()
    assert title(loader) == f"netd: loading {netd.config}"
    with open(fifo, "w") as writer:  # lets it read an empty inetd.conf
        writer.write("")
    assert sink.wait_for(event="reload")["result"] == "ok"
