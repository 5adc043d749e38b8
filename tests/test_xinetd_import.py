"""`netd import`: every corpus xinetd file becomes YAML that `netd check` accepts, and
what xinetd means is kept, checked side by side with the real xinetd (Debian's 2.3.15,
unpacked by scripts/setup.sh --test): each client is served by both or refused by both.
"""

from __future__ import annotations

import os
import socket
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    REPO,
    Netd,
    SyslogSink,
    connect,
    distinct_ports,
    output,
    recv_all,
    run_netd,
)

from netd.config.xinetd import xinetd_networks

CORPUS = REPO / "tests" / "corpus" / "xinetd.d"
XINETD = REPO / ".cache" / "debs" / "xinetd" / "usr" / "sbin" / "xinetd"
WAIT_S = 10.0
SOURCES = ("127.0.0.1", "127.0.5.9", "127.0.6.1", "127.0.7.1")

StartNetd = Callable[..., Netd]


def imported(tmp_path: Path, *files: Path) -> tuple[Path, str]:
    """`netd import FILES` written as a config next to the test; (its path, stderr)."""
    done = run_netd("import", *map(str, files))
    assert done.returncode == 0, output(done)
    config = tmp_path / "imported.yaml"
    config.write_text(done.stdout)
    config.chmod(0o644)
    return config, done.stderr


@pytest.mark.parametrize("name", sorted(p.name for p in CORPUS.iterdir()))
def test_every_corpus_file_imports_to_yaml_netd_check_accepts(name: str,
                                                              tmp_path: Path) -> None:
    config, warnings = imported(tmp_path, CORPUS / name)
    done = run_netd("check", "-c", str(config))
    assert done.returncode == 0, output(done) + warnings
    listed = done.stdout.splitlines()[1:]
    assert len(listed) == 1 and listed[0].split()[0] == name, output(done)
    enabled = name == "finger" and os.access("/usr/sbin/in.fingerd", os.X_OK)
    assert ("disabled (" not in listed[0]) == enabled, output(done) + warnings


def test_attributes_not_carried_are_warnings_naming_file_and_line(tmp_path: Path) -> None:
    _, warnings = imported(tmp_path, CORPUS / "tangd", CORPUS / "tftp")
    assert f"{CORPUS}/tangd:11: tangd: log_on_success USERID: netd does not log it" \
        in warnings
    assert f"{CORPUS}/tangd:12: tangd: log_on_failure USERID" in warnings
    assert f"{CORPUS}/tftp:11: tftp: per_source: netd does not apply it to a wait-mode" \
        in warnings
    assert f"{CORPUS}/tftp:12: tftp: cps: netd does not apply it" in warnings


def test_defaults_are_xinetds(tmp_path: Path) -> None:
    """groups = no, cps = 50 10 (written out), argv[0] the server's base name, and the
    log lines log_on_success asks for (HOST: the start line only)."""
    done = run_netd("import", str(CORPUS / "finger"))
    assert done.returncode == 0, output(done)
    assert textwrap.dedent("""\
        listen: tcp://:finger
        program: /usr/sbin/in.fingerd
        exec: [in.fingerd, -l, -w]
        wait: false
        user: nobody
        groups: []
        limits: {rate: 50/s, rate_pause: 10s}
        log_connections: [accept]
    """) in textwrap.dedent("\n".join(done.stdout.splitlines()[4:]) + "\n"), done.stdout


def test_only_from_forms() -> None:
    assert xinetd_networks("128.138.12.0") == (["128.138.12.0/24"], None)
    assert xinetd_networks("10.0.0.0") == (["10.0.0.0/8"], None)
    assert xinetd_networks("0.0.0.0") == (["0.0.0.0/0"], None)
    assert xinetd_networks("10.1.2.3") == (["10.1.2.3"], None)
    assert xinetd_networks("128.138.{209,10}") == (["128.138.209.0/24", "128.138.10.0/24"],
                                                   None)
    assert xinetd_networks("10.1.2.3/8") == (["10.0.0.0/8"], None)
    assert xinetd_networks("::1") == (["::1"], None)
    assert xinetd_networks("example.org")[0] == []
    assert xinetd_networks(".example.org")[0] == []


# --- side by side with the real xinetd -----------------------------------------------


SERVICES = {
    # name: attribute lines; every service runs /bin/echo served as nobody
    "slash24": ["only_from = 127.0.5.0"],
    "everyone": ["only_from = 0.0.0.0"],
    "nobody": ["only_from ="],
    "both": ["only_from = 127.0.0.1", "no_access = 127.0.0.0/8"],
    "factorized": ["only_from = 127.0.{5,6}"],
    "denied": ["no_access = 127.0.6.0"],
    "narrower": ["only_from = 127.0.0.0/8", "no_access = 127.0.7.1"],
}
# What xinetd 2.3.15 does (also asserted, so that "both refuse everything" cannot pass).
EXPECTED = {
    "slash24": {"127.0.5.9"},
    "everyone": set(SOURCES),
    "nobody": set(),
    "both": set(),
    "factorized": {"127.0.5.9", "127.0.6.1"},
    "denied": {"127.0.0.1", "127.0.5.9", "127.0.7.1"},
    "narrower": {"127.0.0.1", "127.0.5.9", "127.0.6.1"},
}


def xinetd_file(ports: dict[str, int], services: dict[str, list[str]], server: str,
                args: str, user: str = "nobody") -> str:
    blocks = []
    for name, lines in services.items():
        attributes = "".join(f"\t{line}\n" for line in lines)
        if not any(line.startswith("server") for line in lines):
            attributes += f"\tserver = {server}\n\tserver_args = {args}\n"
        blocks.append(f"service {name}\n{{\n\ttype = UNLISTED\n\tsocket_type = stream\n"
                      f"\tprotocol = tcp\n\twait = no\n\tuser = {user}\n\tbind = 127.0.0.1\n"
                      f"\tport = {ports[name]}\n{attributes}}}\n")
    return "\n".join(blocks)


@pytest.fixture
def xinetd(tmp_path: Path) -> Iterator[Callable[[str], None]]:
    """xinetd(conf_text): the real xinetd in the foreground on that file, until teardown."""
    if os.geteuid() != 0:
        pytest.skip("xinetd runs services as other users: needs root")
    if not os.access(XINETD, os.X_OK):
        pytest.skip("xinetd is not unpacked (scripts/setup.sh --test)")
    procs: list[subprocess.Popen[bytes]] = []

    def start(text: str) -> None:
        conf = tmp_path / "xinetd.conf"
        conf.write_text(text)
        log = tmp_path / "xinetd.log"
        procs.append(subprocess.Popen(
            [str(XINETD), "-dontfork", "-f", str(conf), "-pidfile",
             str(tmp_path / "xinetd.pid"), "-filelog", str(log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + WAIT_S
        while not (log.exists() and "Started working" in log.read_text()):
            assert procs[-1].poll() is None, log.read_text() if log.exists() else ""
            assert time.monotonic() < deadline, "xinetd did not start"
            time.sleep(0.05)

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=WAIT_S)


def answer(port: int, source: str) -> bytes:
    """What a client from `source` gets: the server's output, or b"" when refused."""
    try:
        with connect(port, source=source) as s:
            return recv_all(s)
    except ConnectionResetError:
        return b""


def side_by_side(tmp_path: Path, start_netd: StartNetd, xinetd: Callable[[str], None],
                 services: dict[str, list[str]], server: str, args: str,
                 ) -> tuple[dict[str, int], dict[str, int]]:
    """The same service file under xinetd and, imported, under netd; their ports."""
    ports = distinct_ports(2 * len(services))
    x_ports = dict(zip(services, ports[: len(services)], strict=True))
    n_ports = dict(zip(services, ports[len(services):], strict=True))
    xinetd(xinetd_file(x_ports, services, server, args))
    source = tmp_path / "for-netd"
    source.write_text(xinetd_file(n_ports, services, server, args))
    config, _ = imported(tmp_path, source)
    start_netd(config.read_text())
    return x_ports, n_ports


def test_access_lists_mean_what_xinetd_does(tmp_path: Path, sink: SyslogSink,
                                           start_netd: StartNetd,
                                           xinetd: Callable[[str], None]) -> None:
    """only_from / no_access: a.b.c.0 is a /24, 0.0.0.0 is everyone, an empty only_from
    lets nobody in, a peer on both lists is refused, a.b.{c,d} lists networks."""
    x_ports, n_ports = side_by_side(tmp_path, start_netd, xinetd, SERVICES, "/bin/echo",
                                    "served")
    for name in SERVICES:
        by_xinetd = {s for s in SOURCES if answer(x_ports[name], s) == b"served\n"}
        by_netd = {s for s in SOURCES if answer(n_ports[name], s) == b"served\n"}
        assert by_netd == by_xinetd == EXPECTED[name], (name, by_xinetd, by_netd)


def test_groups_and_remote_host_as_xinetd_gives_them(tmp_path: Path, sink: SyslogSink,
                                                     start_netd: StartNetd,
                                                     xinetd: Callable[[str], None]) -> None:
    """groups = no (the default): no supplementary groups; REMOTE_HOST is the peer's
    address. The server prints its own environment and /proc/self/status."""
    services = {"groups": ["server = /bin/grep", "server_args = ^Groups: /proc/self/status"],
                "env": ["server = /usr/bin/env"]}
    x_ports, n_ports = side_by_side(tmp_path, start_netd, xinetd, services, "", "")
    outputs = []
    for ports in (x_ports, n_ports):
        groups = answer(ports["groups"], "127.0.5.9").decode()
        env = dict(line.split("=", 1)
                   for line in answer(ports["env"], "127.0.5.9").decode().splitlines())
        outputs.append((groups.strip(), env.get("REMOTE_HOST")))
    assert outputs[0] == outputs[1] == ("Groups:", "127.0.5.9"), outputs


def test_cps_is_on_by_default(tmp_path: Path, sink: SyslogSink,
                              start_netd: StartNetd) -> None:
    """xinetd's default cps = 50 10: over 50 connections a second the service pauses."""
    (port,) = distinct_ports(1)
    source = tmp_path / "burst"
    source.write_text(xinetd_file({"burst": port}, {"burst": []}, "/bin/true", "x",
                                  user="root"))
    config, _ = imported(tmp_path, source)
    start_netd(config.read_text())
    clients = []
    try:
        for _ in range(60):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=WAIT_S))
        suspend = sink.wait_for(event="suspend", service="burst")
    finally:
        for client in clients:
            client.close()
    assert suspend["reason"] == "rate"


def test_imported_finger_runs_the_real_in_fingerd(tmp_path: Path, sink: SyslogSink,
                                                  start_netd: StartNetd) -> None:
    """The corpus's finger file, imported, serves in.fingerd with argv[0] in.fingerd;
    log_on_success = HOST keeps the accept line at info and the exit line at debug."""
    if os.geteuid() != 0 or not os.access("/usr/sbin/in.fingerd", os.X_OK):
        pytest.skip("needs root and in.fingerd (scripts/setup.sh --test)")
    (port,) = distinct_ports(1)
    config, _ = imported(tmp_path, CORPUS / "finger")
    text = config.read_text().replace("tcp://:finger", f"tcp://127.0.0.1:{port}")
    start_netd(text)
    with connect(port) as s:
        s.sendall(b"\r\n")
        got = recv_all(s)
    assert b"logged on" in got or b"Login" in got, got  # finger's list of users
    accept = sink.wait_for(event="accept", service="finger")
    exit_ = sink.wait_for(event="exit", service="finger", pid=accept["pid"])
    priorities = {e: next(raw for raw in sink.raw if f"event={e} service=finger" in raw)
                  for e in ("accept", "exit")}
    assert priorities["accept"].startswith("<30>"), priorities  # daemon.info
    assert priorities["exit"].startswith("<31>"), priorities  # daemon.debug
    assert exit_["status"] == "0"


def test_import_rejects_what_is_not_xinetd_nor_inetd(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_text("service broken\n{\n\tuser = root\n")
    done = run_netd("import", str(bad))
    assert done.returncode == 78 and f"{bad}:1: entry not closed" in done.stderr, output(done)
    missing = run_netd("import", str(tmp_path / "none"))
    assert missing.returncode == 78 and "cannot read" in missing.stderr

