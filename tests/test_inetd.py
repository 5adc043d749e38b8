"""inetd.conf read natively (`inetd:`): the corpus of lines Debian packages write, the
line forms of inetd.conf(5), and the real programs behind them (tcpd with in.fingerd,
in.talkd and in.ntalkd), each on an ephemeral loopback port.

The corpus (tests/corpus/inetd.conf, copied from shared/corpus with its provenance) is
used as it is; a test that runs a line changes only its address to 127.0.0.1:PORT.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import socket
import struct
from collections.abc import Callable
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
    wait_until,
    write_config,
)

from netd.config.inetd import parse_line, read_inetd

CORPUS = REPO / "tests" / "corpus" / "inetd.conf"
TCPD = "/usr/sbin/tcpd"
IN_FINGERD = "/usr/sbin/in.fingerd"
# talkd depends on an inetd package, so scripts/setup.sh unpacks it here instead.
TALKD_DIR = REPO / ".cache" / "debs" / "talkd" / "usr" / "sbin"
DENIED = "127.0.0.7"  # only this loopback source is denied: a concurrent run is unaffected

StartNetd = Callable[..., Netd]


def corpus_line(name: str) -> list[str]:
    """The fields of the corpus line for service `name` (the first enabled one)."""
    for line in CORPUS.read_text().splitlines():
        fields = line.split()
        if fields and fields[0] == name:
            return fields
    raise AssertionError(f"no {name} line in {CORPUS}")


def write_inetd(tmp_path: Path, lines: list[str], name: str = "inetd.conf") -> Path:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    path.chmod(0o644)
    return path


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("runs services as nobody, as inetd.conf says: needs root")


def talk_program(name: str) -> str:
    """in.talkd or in.ntalkd: installed, or unpacked by scripts/setup.sh --test."""
    for candidate in (Path("/usr/sbin") / name, TALKD_DIR / name):
        if os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.skip(f"{name} is not there (scripts/setup.sh --test unpacks talkd)")


# --- the corpus, line by line -------------------------------------------------------


def test_every_corpus_line_is_served_disabled_or_refused_with_its_reason(
        tmp_path: Path) -> None:
    """`netd check` on the corpus as it is: each line is served, listed as disabled, or
    named FILE:LINE with why not; none stops the others (exit 0)."""
    inetd = write_inetd(tmp_path, CORPUS.read_text().splitlines())
    config = write_config(tmp_path, f"inetd: [{inetd.name}]\n", None)
    done = run_netd("check", "-c", str(config))
    assert done.returncode == 0, output(done)
    served = {line.split()[0] for line in done.stdout.splitlines()[1:]
              if "disabled (" not in line}
    disabled = {line.split()[0]: line for line in done.stdout.splitlines()[1:]
                if "disabled (" in line}
    warnings = done.stderr
    where = f"{inetd}:"

    def fate(name: str, line: int, program: str) -> None:
        if os.access(program, os.X_OK):
            assert name in served, output(done)
        else:
            assert f"{where}{line}: {name}.program: program '{program}' does not exist; " \
                   "line not served" in warnings, output(done)

    fate("amanda", 6, "/usr/lib/amanda/amandad")
    fate("finger", 8, TCPD)
    fate("talk", 10, "/usr/sbin/in.talkd")
    fate("ntalk", 11, "/usr/sbin/in.ntalkd")
    fate("printer", 14, "/usr/lib/cups/daemon/cups-lpd")
    fate("csync2", 16, "/usr/sbin/csync2")
    assert f"{where}19: rstatd: rpc/udp: RPC services must register with rpcbind" \
        in warnings, output(done)
    assert f"({where}15)" in disabled["sane-port"]
    assert f"({where}17)" in disabled["telnet"]
    if "ntalk" not in served:  # the #<off># ntalk line is listed only when no ntalk runs
        assert f"({where}12)" in disabled["ntalk"]
    # Comments, #:GROUP: headings included, are not services.
    assert not any(name.startswith("#") for name in served | set(disabled))


def test_finger_behind_tcpd_refuses_a_denied_client_and_answers_an_allowed_one(
        tmp_path: Path, sink: SyslogSink, start_netd: StartNetd) -> None:
    """The corpus's finger line runs /usr/sbin/tcpd with argv[0] /usr/sbin/in.fingerd:
    tcpd applies hosts.deny (here a private one, bind-mounted in netd's own mount
    namespace, so the machine's file is never touched) and then runs in.fingerd."""
    need_root()
    for program in (TCPD, IN_FINGERD, "/usr/bin/finger"):
        if not os.access(program, os.X_OK):
            pytest.skip(f"{program} is not installed (scripts/setup.sh --test)")
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    (port,) = distinct_ports(1)
    fields = corpus_line("finger")
    assert fields[5:] == [TCPD, IN_FINGERD]
    inetd = write_inetd(tmp_path, ["\t".join([f"127.0.0.1:{port}", *fields[1:]])])
    deny = tmp_path / "hosts.deny"
    deny.write_text(f"in.fingerd: {DENIED}\n")
    deny.chmod(0o644)
    private_deny = ("unshare", "--mount", "--propagation", "private", "sh", "-c",
                    'mount --bind "$0" /etc/hosts.deny && exec "$@"', str(deny))
    start_netd(f"inetd: [{inetd}]\n", wrapper=private_deny)

    with connect(port) as s:
        s.sendall(b"\r\n")
        answer = recv_all(s)
    assert b"logged on" in answer or b"Login" in answer, answer  # finger's user list
    accept = sink.wait_for(event="accept", service=str(port))
    assert accept["peer"].startswith("127.0.0.1:")
    sink.wait_for(event="exit", service=str(port), pid=accept["pid"], status="0")

    with connect(port, source=DENIED, timeout_s=20) as s:
        s.sendall(b"\r\n")
        try:
            refused = recv_all(s)
        except ConnectionResetError:
            refused = b""  # tcpd leaves without reading the query
    assert refused == b"", refused

    def denied_accepts() -> list[dict[str, str]]:
        return [e for e in sink.find(event="accept", service=str(port))
                if e["peer"].startswith(DENIED + ":")]

    wait_until(lambda: bool(denied_accepts()), "the denied client's accept line")
    denied = denied_accepts()[0]
    # tcpd waits 5 s before it leaves a refused client ("be kind to inetd").
    sink.wait_for(20, event="exit", service=str(port), pid=denied["pid"])
    assert "in.fingerd" in deny.read_text()
    with open("/etc/hosts.deny") as f:
        assert DENIED not in f.read(), "the machine's hosts.deny must stay untouched"


def talk_request(client: socket.socket, kind: int = 1) -> bytes:
    """An ntalk CTL_MSG (protocol version 1): LOOK_UP by default, from `client`."""
    ip, port = client.getsockname()[:2]

    def osockaddr(address: str, p: int) -> bytes:
        return struct.pack("!HH4s8x", socket.AF_INET, p, socket.inet_aton(address))

    return (struct.pack("!BBBBI", 1, kind, 0, 0, 42) + osockaddr(ip, 0)
            + osockaddr(ip, port) + struct.pack("!i", os.getpid())
            + b"netdtest".ljust(12, b"\0") + b"nobody".ljust(12, b"\0") + bytes(16))


@pytest.mark.parametrize("name", ["talk", "ntalk"])
def test_talk_lines_serve_in_talkd_in_wait_mode(name: str, tmp_path: Path, sink: SyslogSink,
                                                start_netd: StartNetd) -> None:
    """`talk dgram udp wait nobody.tty ...`: in.talkd gets the UDP socket itself, runs as
    nobody with group tty, and answers a LOOK_UP with a CTL_RESPONSE."""
    need_root()
    fields = corpus_line(name)
    program = talk_program(os.path.basename(fields[5]))
    (port,) = distinct_ports(1)
    inetd = write_inetd(tmp_path, ["\t".join([f"127.0.0.1:{port}", *fields[1:5], program,
                                              *fields[6:]])])
    start_netd(f"inetd: [{inetd}]\n")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(10)
        client.bind(("127.0.0.1", 0))
        client.sendto(talk_request(client), ("127.0.0.1", port))
        reply, _ = client.recvfrom(1024)
    version, kind, answer = struct.unpack("!BBB", reply[:3])
    # Version 1, an answer to LOOK_UP; nobody invited us, so: not here (or failed).
    assert (version, kind) == (1, 1) and answer in (1, 2, 4), reply.hex()
    accept = sink.wait_for(event="accept", service=str(port), mode="wait")
    status = Path(f"/proc/{accept['pid']}/status")
    if status.exists():  # in.talkd lingers a while for more requests
        ids = dict(line.split(":", 1) for line in status.read_text().splitlines())
        assert ids["Uid"].split()[0] == str(pwd.getpwnam("nobody").pw_uid)
        assert ids["Gid"].split()[0] == str(grp.getgrnam("tty").gr_gid)


# --- the line forms ----------------------------------------------------------------


def line(text: str, default_hosts: list[str] | None = None) -> dict[str, object]:
    parsed = parse_line("inetd.conf", 1, text.split(), default_hosts or [])
    assert parsed.body is not None, parsed.problem
    return parsed.body


def problem(text: str) -> str:
    parsed = parse_line("inetd.conf", 1, text.split(), [])
    assert parsed.body is None and parsed.problem is not None
    return parsed.problem


def test_line_fields_become_netd_keys() -> None:
    """Protocols and families, host prefixes, wait.MAX, user.group and user:group,
    argv[0] apart from the program, internal builtins."""
    assert line("finger stream tcp nowait nobody /usr/sbin/tcpd /usr/sbin/in.fingerd") == {
        "listen": ["tcp://:finger"], "exec": ["/usr/sbin/in.fingerd"],
        "program": "/usr/sbin/tcpd", "wait": False, "user": "nobody"}
    assert line("x stream tcp4 nowait u /bin/cat cat")["listen"] == ["tcp://0.0.0.0:x"]
    assert line("x stream tcp6 nowait u /bin/cat cat")["listen"] == ["tcp://[::]:x"]
    assert line("x dgram udp6 wait u /bin/cat cat")["listen"] == ["udp://[::]:x"]
    assert line("x dgram udp4 wait u /bin/cat cat")["listen"] == ["udp://0.0.0.0:x"]
    assert line("127.0.0.1,::1:x stream tcp nowait u /bin/cat cat")["listen"] == [
        "tcp://127.0.0.1:x", "tcp://[::1]:x"]
    assert line("x stream tcp nowait u /bin/cat cat", ["10.0.0.1"])["listen"] == [
        "tcp://10.0.0.1:x"]
    assert line("/run/x.sock stream unix nowait u /bin/cat cat")["listen"] == [
        "unix:/run/x.sock"]
    body = line("x stream tcp nowait.40 u /bin/cat cat")
    assert body["limits"] == {"rate": "40/m"} and body["exec"] == ["cat"] \
        and body["program"] == "/bin/cat"
    assert line("x stream tcp nowait u /bin/cat /bin/cat -u")["exec"] == ["/bin/cat", "-u"]
    assert "program" not in line("x stream tcp nowait u /bin/cat /bin/cat")
    assert line("x stream tcp nowait u /bin/cat")["exec"] == ["/bin/cat"]
    for user in ("nobody.tty", "nobody:tty"):
        body = line(f"talk dgram udp wait {user} /usr/sbin/in.talkd in.talkd")
        assert (body["user"], body["group"], body["wait"]) == ("nobody", "tty", True)
        assert "groups" not in body  # initgroups(nobody, tty): netd's default
    assert line("x stream tcp nowait root.adm /bin/cat cat")["groups"] == ["adm"]
    assert line("echo stream tcp nowait root internal") == {
        "listen": ["tcp://:echo"], "builtin": "echo", "user": "root"}


def test_lines_netd_cannot_serve_say_why() -> None:
    assert "rpcbind" in problem("rstatd/1-5 dgram rpc/udp wait nobody /usr/sbin/tcpd x")
    assert "raw" in problem("x raw icmp wait root /bin/ping ping")
    assert "6 fields" in problem("finger stream tcp nowait nobody")
    assert "builtins" in problem("tcpmux stream tcp nowait root internal")
    assert "wait or nowait" in problem("x stream tcp sometimes u /bin/cat cat")
    assert "does not go with" in problem("x stream udp nowait u /bin/cat cat")
    assert "IPv4" in problem("::1:x stream tcp4 nowait u /bin/cat cat")


def test_comments_groups_off_lines_and_default_hosts() -> None:
    lines = read_inetd("f", "\n".join([
        "#:INFO: Info services",
        "# a comment",
        "",
        "#<off># telnet\tstream\ttcp\tnowait\troot\t/usr/sbin/tcpd\t/usr/sbin/telnetd",
        "127.0.0.1:",
        "a stream tcp nowait u /bin/cat cat",
        "*:",
        "b stream tcp nowait u /bin/cat cat",
    ]))
    assert [(x.name, x.line, x.disabled) for x in lines] == [
        ("telnet", 4, True), ("a", 6, False), ("b", 8, False)]
    assert lines[1].body is not None and lines[1].body["listen"] == ["tcp://127.0.0.1:a"]
    assert lines[2].body is not None and lines[2].body["listen"] == ["tcp://:b"]


# --- inetd.conf services among the others ------------------------------------------


def test_a_name_in_yaml_and_in_inetd_conf_is_an_error_naming_both(tmp_path: Path) -> None:
    inetd = write_inetd(tmp_path, ["# header", "echo stream tcp nowait root internal"])
    config = write_config(tmp_path, f"""\
inetd: [{inetd.name}]
services:
  echo:
    listen: tcp://127.0.0.1:7
    builtin: echo
""", None)
    done = run_netd("check", "-c", str(config))
    assert done.returncode == 78, output(done)
    assert f"{inetd}:2: echo: service 'echo' is defined twice: in inetd.conf here and in " \
           f"YAML at {config}:" in done.stderr, output(done)


def test_builtin_lines_for_tcp_and_udp_are_one_service(tmp_path: Path) -> None:
    """`echo stream tcp ... internal` and `echo dgram udp ... internal` are one netd
    service (builtins serve both); a name with lines running different programs is
    split by protocol."""
    inetd = write_inetd(tmp_path, [
        "echo stream tcp nowait root internal",
        "echo dgram udp wait root internal",
        "daytime stream tcp nowait root /bin/cat cat",
        "daytime dgram udp wait root /bin/true true",
    ])
    config = write_config(tmp_path, f"inetd: [{inetd.name}]\n", None)
    done = run_netd("check", "-c", str(config))
    assert done.returncode == 0, output(done)
    services = {line.split()[0]: line for line in done.stdout.splitlines()[1:]}
    assert sorted(services) == ["daytime-tcp", "daytime-udp", "echo"], output(done)
    assert "tcp://0.0.0.0:7 (nowait)" in services["echo"]
    assert "udp://0.0.0.0:7 (inline)" in services["echo"]


def test_a_bad_line_stops_nothing(tmp_path: Path, sink: SyslogSink,
                                  start_netd: StartNetd) -> None:
    """A broken line is logged as event=config with its FILE:LINE; the rest is served,
    `nowait.MAX` as a rate, user.group as the identity."""
    port, other = distinct_ports(2)
    inetd = write_inetd(tmp_path, [
        f"127.0.0.1:{port} stream tcp nowait root /bin/cat cat",
        "broken stream tcp",
        f"127.0.0.1:{other} stream tcp nowait.50 root.root /usr/bin/id id -G",
    ])
    start_netd(f"inetd: [{inetd}]\n")
    warning = sink.wait_for(event="config")
    assert warning["msg"].startswith(f"{inetd}:2: broken: expected at least 6 fields")
    with connect(port) as s:
        s.sendall(b"cat\n")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"cat\n"
    with connect(other) as s:
        # root with a group gets that group only, as openbsd-inetd does (setgroups(1)).
        assert recv_all(s).split() == [b"0"]


def test_status_lists_disabled_lines_and_reload_serves_a_line_added(
        tmp_path: Path, sink: SyslogSink, start_netd: StartNetd) -> None:
    port, added = distinct_ports(2)
    inetd = write_inetd(tmp_path, [
        f"127.0.0.1:{port} stream tcp nowait root /bin/cat cat",
        "#<off># telnet\tstream\ttcp\tnowait\troot\t/usr/sbin/tcpd\t/usr/sbin/telnetd"])
    netd = start_netd(f"inetd: [{inetd}]\n")
    done = run_netd("status", "-c", str(netd.config), "--json")
    assert done.returncode == 0, output(done)
    services = {s["name"]: s for s in json.loads(done.stdout)["services"]}
    assert services[str(port)]["state"] == "listening"
    assert services["telnet"]["state"] == "disabled"
    assert services["telnet"]["origin"] == f"{inetd}:2"
    text = run_netd("status", "-c", str(netd.config)).stdout
    assert f"telnet: disabled ({inetd}:2)" in text

    with open(inetd, "a") as f:
        f.write(f"127.0.0.1:{added} stream tcp nowait root /bin/cat cat\n")
    done = run_netd("reload", "-c", str(netd.config))
    assert done.returncode == 0 and f"added {added}" in done.stdout, output(done)
    wait_until(lambda: bool(sink.find(event="listen", service=str(added))), "the new line")
    with connect(added) as s:
        s.sendall(b"x")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"x"
