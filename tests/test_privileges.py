"""Privileges, fd and environment hygiene with a real netd (issue 4, items 4 and 5).

The child reports on itself from the inside: an exec'd /bin/sh cats its own
/proc/PID/status and limits, a python handler does the same in its forked child, so
what is checked is the kernel's view of the running child (real, effective, saved and
filesystem uid/gid, supplementary groups, umask, rlimits, cwd, nice), not what netd
says it set. Identity tests need root and are skipped without it; the fd and
environment tests run either way, for an exec child whose identity is the
supervisor's and for one that runs as someone else.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import REPO, Netd, SyslogSink, connect, free_port, recv_all

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="changing identity needs root")
NOBODY = pwd.getpwnam("nobody")
# The shell reports on itself: $$ is the exec'd sh, whatever runs in $( ).
STATUS_SH = ("cat /proc/$$/status /proc/$$/limits; echo cwd=$(pwd); "
             "echo nice=$(cut -d' ' -f19 /proc/$$/stat)")
STATUS_EXEC = json.dumps(["/bin/sh", "-c", STATUS_SH])
HANDLERS = """\
import os

def status(conn, peer):
    with open("/proc/self/status") as f, open("/proc/self/limits") as g:
        out = f.read() + g.read()
    out += "cwd=%s\\nnice=%d\\n" % (os.getcwd(), os.getpriority(os.PRIO_PROCESS, 0))
    conn.sendall(out.encode())

def listing(conn, peer):
    names = sorted(os.listdir("/"))
    conn.sendall(("cwd=%s\\nuid=%d\\n%s\\n" % (os.getcwd(), os.getuid(), " ".join(names))).encode())
"""
LIMIT_NAMES = {"Max open files": "nofile", "Max processes": "nproc",
               "Max address space": "as", "Max cpu time": "cpu",
               "Max core file size": "core", "Max file size": "fsize"}
TCP_ENV = {"PATH", "PROTO", "TCPREMOTEIP", "TCPREMOTEPORT", "TCPLOCALIP", "TCPLOCALPORT",
           "REMOTE_HOST", "NETD_SERVICE"}


def report(port: int) -> dict[str, object]:
    """Connect to a status service and parse what the child says about itself."""
    with connect(port) as s:
        text = recv_all(s).decode()
    assert "Uid:" in text, text
    found: dict[str, object] = {"limits": {}}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key in ("Uid", "Gid", "Groups", "Umask"):
            found[key] = value.split()
        elif line[:26].strip() in LIMIT_NAMES:
            soft, hard = line[26:].split()[:2]
            found["limits"][LIMIT_NAMES[line[:26].strip()]] = (soft, hard)  # type: ignore[index]
        elif line.startswith(("cwd=", "nice=")):
            k, _, v = line.partition("=")
            found[k] = v
    return found


def handler_env(tmp_path: Path) -> dict[str, str]:
    """Write the python handlers module and put it on netd's PYTHONPATH."""
    (tmp_path / "priv_handlers.py").write_text(HANDLERS)
    return {"PYTHONPATH": f"{REPO}:{tmp_path}"}


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A world-traversable directory (tmp_path is 0700 under root)."""
    path = Path(tempfile.mkdtemp(prefix="netd-priv-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- who the child is ---------------------------------------------------------------


@needs_root
def test_default_user_is_nobody_under_root(tmp_path: Path, start_netd: Callable[..., Netd],
                                           sink: SyslogSink) -> None:
    """A service that names no user runs as nobody (real, effective, saved and fs ids),
    with nobody's groups, for an exec'd program and for a python handler alike, while
    the supervisor itself stays root."""
    sh, py = free_port(), free_port()
    netd = start_netd(f"""
        services:
          sh:
            listen: tcp://127.0.0.1:{sh}
            exec: {STATUS_EXEC}
          py:
            listen: tcp://127.0.0.1:{py}
            python: priv_handlers:status
        """, env=handler_env(tmp_path))
    groups = sorted(str(g) for g in os.getgrouplist("nobody", NOBODY.pw_gid))
    for port in (sh, py):
        got = report(port)
        assert got["Uid"] == [str(NOBODY.pw_uid)] * 4, got
        assert got["Gid"] == [str(NOBODY.pw_gid)] * 4, got
        assert sorted(got["Groups"]) == groups, got  # type: ignore[arg-type]
    supervisor = Path(f"/proc/{netd.proc.pid}/status").read_text()
    assert "Uid:\t0\t0\t0\t0" in supervisor


@needs_root
def test_user_root_keeps_root(tmp_path: Path, start_netd: Callable[..., Netd],
                              sink: SyslogSink) -> None:
    """Only `user: root` runs a child as root."""
    sh, py = free_port(), free_port()
    start_netd(f"""
        services:
          sh:
            listen: tcp://127.0.0.1:{sh}
            exec: {STATUS_EXEC}
            user: root
          py:
            listen: tcp://127.0.0.1:{py}
            python: priv_handlers:status
            user: root
        """, env=handler_env(tmp_path))
    for port in (sh, py):
        got = report(port)
        assert got["Uid"] == ["0"] * 4 and got["Gid"] == ["0"] * 4, got


@needs_root
def test_user_group_groups_umask_cwd_nice_rlimits(tmp_path: Path,
                                                  start_netd: Callable[..., Netd],
                                                  sink: SyslogSink) -> None:
    """Every identity key, from defaults: and per service, seen from inside the exec'd
    program (started by a spawner) and the python handler (forked)."""
    daemon_gid, sys_gid = grp.getgrnam("daemon").gr_gid, grp.getgrnam("sys").gr_gid
    sh, py, other = free_port(), free_port(), free_port()
    start_netd(f"""
        defaults:
          user: nobody
          group: daemon
          groups: [daemon, sys]
          umask: '027'
          cwd: /var
          nice: 7
          rlimits: {{nofile: 64, core: 0, nproc: 200, as: 2G, cpu: 30, fsize: 1M}}
        services:
          sh:
            listen: tcp://127.0.0.1:{sh}
            exec: {STATUS_EXEC}
          py:
            listen: tcp://127.0.0.1:{py}
            python: priv_handlers:status
          other:
            listen: tcp://127.0.0.1:{other}
            exec: {STATUS_EXEC}
            group: nogroup
            groups: []
            umask: '077'
            cwd: /tmp
            nice: 3
            rlimits: {{nofile: 4096}}
        """, env=handler_env(tmp_path))
    for port in (sh, py):
        got = report(port)
        assert got["Uid"] == [str(NOBODY.pw_uid)] * 4, got
        assert got["Gid"] == [str(daemon_gid)] * 4, got
        assert sorted(map(int, got["Groups"])) == sorted({daemon_gid, sys_gid}), got  # type: ignore[call-overload]
        assert got["Umask"] == ["0027"], got
        assert got["cwd"] == "/var" and got["nice"] == "7", got
        assert got["limits"] == {"nofile": ("64", "64"), "core": ("0", "0"),
                                 "nproc": ("200", "200"),
                                 "as": (str(2 << 30), str(2 << 30)),
                                 "cpu": ("30", "30"),
                                 "fsize": (str(1 << 20), str(1 << 20))}, got
    got = report(other)
    nogroup = grp.getgrnam("nogroup").gr_gid
    assert got["Gid"] == [str(nogroup)] * 4, got
    # An empty `groups:` leaves the primary group alone as the group list.
    assert got["Groups"] in ([], [str(nogroup)]), got
    assert got["Umask"] == ["0077"] and got["cwd"] == "/tmp" and got["nice"] == "3", got
    assert got["limits"]["nofile"] == ("4096", "4096"), got  # type: ignore[index]


@needs_root
def test_an_rlimit_the_kernel_cannot_give_is_not_a_silently_dead_service(
        tmp_path: Path, start_netd: Callable[..., Netd], sink: SyslogSink) -> None:
    """`nofile: unlimited` is above what the kernel allows (fs.nr_open): netd must say so
    at load time (exit 78 naming the key), or give the child the most it can have; a
    config that loads and then fails on every connection is neither."""
    port = free_port()
    body = f"""
        services:
          many:
            listen: tcp://127.0.0.1:{port}
            exec: {STATUS_EXEC}
            rlimits: {{nofile: unlimited}}
        """
    netd = start_netd(body, ready=False)
    try:
        sink.wait_for(5.0, event="ready")
    except AssertionError:
        assert netd.proc.wait(timeout=10) == 78
        err = netd.proc.stderr.read().decode() if netd.proc.stderr else ""
        assert "rlimits.nofile" in err, err
        return
    got = report(port)
    nr_open = Path("/proc/sys/fs/nr_open").read_text().strip()
    assert got["limits"]["nofile"] in (("unlimited", "unlimited"), (nr_open, nr_open)), got  # type: ignore[index]


def _busybox() -> str:
    """A static busybox (installed with apt-get when root and missing), or skip."""
    path = "/bin/busybox"
    if not os.access(path, os.X_OK) and IS_ROOT and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "busybox-static"],
                       capture_output=True, timeout=240,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if not os.access(path, os.X_OK):
        pytest.skip("no /bin/busybox (apt-get install busybox-static)")
    info = subprocess.run(["/bin/busybox"], capture_output=True, timeout=10)
    if b"BusyBox" not in info.stdout + info.stderr:
        pytest.skip("/bin/busybox is not BusyBox")
    return path


@needs_root
def test_chroot_for_exec_and_python(tmp_path: Path, start_netd: Callable[..., Netd],
                                    sink: SyslogSink, shared_dir: Path) -> None:
    """chroot: the program sees only the tree it was put in (cwd inside it), as nobody;
    a python handler likewise."""
    busybox = _busybox()
    root = shared_dir / "jail"
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    shutil.copy2(busybox, root / "bin" / "busybox")
    (root / "etc" / "marker").write_text("inside-the-jail\n")
    for d in (root, root / "bin", root / "etc"):
        d.chmod(0o755)
    sh, py = free_port(), free_port()
    start_netd(f"""
        services:
          jailed:
            listen: tcp://127.0.0.1:{sh}
            exec: [/bin/busybox, sh, -c, 'pwd; busybox ls /; busybox cat marker; busybox id -u']
            chroot: {root}
            cwd: /etc
          pyjail:
            listen: tcp://127.0.0.1:{py}
            python: priv_handlers:listing
            chroot: {root}
        """, env=handler_env(tmp_path))
    with connect(sh) as s:
        assert recv_all(s).decode().split() == [
            "/etc", "bin", "etc", "inside-the-jail", str(NOBODY.pw_uid)]
    with connect(py) as s:
        assert recv_all(s).decode().split("\n")[:3] == [
            "cwd=/", f"uid={NOBODY.pw_uid}", "bin etc"]


@needs_root
def test_unix_socket_file_owner_group_and_mode(start_netd: Callable[..., Netd],
                                               sink: SyslogSink, shared_dir: Path) -> None:
    """socket: {user, group, mode} are given to the socket file; a client of that group
    (and not root) can then connect, one of no such group cannot."""
    owned, private = shared_dir / "owned.sock", shared_dir / "private.sock"
    daemon_gid = grp.getgrnam("daemon").gr_gid
    start_netd(f"""
        services:
          owned:
            listen: unix:{owned}
            exec: [/bin/sh, -c, 'echo hi']
            socket: {{user: nobody, group: daemon, mode: '0660'}}
          private:
            listen: unix:{private}
            exec: [/bin/sh, -c, 'echo hi']
            socket: {{mode: '0600'}}
        """)
    info = owned.stat()
    assert stat.S_ISSOCK(info.st_mode)
    assert (info.st_uid, info.st_gid) == (NOBODY.pw_uid, daemon_gid)
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.stat().st_uid == 0

    def connect_as(path: Path, gid: int) -> bytes:
        code = ("import socket,sys; s=socket.socket(socket.AF_UNIX); s.settimeout(10); "
                f"s.connect({str(path)!r}); sys.stdout.buffer.write(s.recv(100))")
        result = subprocess.run(["/usr/bin/python3", "-I", "-c", code], capture_output=True,
                                timeout=20, user=NOBODY.pw_uid, group=gid, extra_groups=[])
        return result.stdout if result.returncode == 0 else result.stderr

    # nobody owns "owned" (rw for owner) so connects; as a stranger in group daemon too.
    assert connect_as(owned, daemon_gid) == b"hi\n"
    assert b"PermissionError" in connect_as(private, daemon_gid)


@needs_root
def test_privileged_port_bound_by_root_served_by_nobody(start_netd: Callable[..., Netd],
                                                         sink: SyslogSink) -> None:
    """netd binds a port below 1024 as root; the child serving it is nobody."""
    port = None
    for candidate in range(980, 700, -7):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            port = candidate
            break
    if port is None:
        pytest.skip("no free privileged port")
    start_netd(f"""
        services:
          low:
            listen: tcp://127.0.0.1:{port}
            exec: {STATUS_EXEC}
        """)
    got = report(port)
    assert got["Uid"] == [str(NOBODY.pw_uid)] * 4, got


# -- fds and environment ------------------------------------------------------------

# Two kinds of spawner (every exec child is started by one, per identity): one that
# takes another identity (under root a service with no user runs as nobody; without
# root, `umask:` alone makes an identity of its own) and one that keeps the
# supervisor's (under root only `user: root` does; without root, no identity keys).
PATHS = {
    "other-identity": "umask: '022'" if not IS_ROOT else "",
    "supervisors-identity": "user: root" if IS_ROOT else "",
}


@pytest.mark.parametrize("path", sorted(PATHS))
def test_exec_child_holds_exactly_fds_0_1_2(path: str, start_netd: Callable[..., Netd],
                                            sink: SyslogSink) -> None:
    """`ls -l /proc/self/fd` from inside the program: 0 and 1 are the connection, 2 the
    stderr pipe, and the only other fd is the one ls opened to read the directory."""
    port, quiet = free_port(), free_port()
    start_netd(f"""
        services:
          fds:
            listen: tcp://127.0.0.1:{port}
            exec: [/bin/ls, -l, /proc/self/fd]
            {PATHS[path]}
          quiet:
            listen: tcp://127.0.0.1:{quiet}
            exec: [/bin/ls, -l, /proc/self/fd]
            stderr: null
            {PATHS[path]}
        """)
    for service_port, stderr_kind in ((port, "pipe:["), (quiet, "/dev/null")):
        with connect(service_port) as s:
            lines = recv_all(s).decode().splitlines()
        fds = {}
        for line in lines:
            if " -> " in line:
                left, target = line.split(" -> ", 1)
                fds[left.split()[-1]] = target
        pid = sink.wait_for(event="accept", local=f"127.0.0.1:{service_port}")["pid"]
        own = {fd for fd, target in fds.items() if target == f"/proc/{pid}/fd"}
        assert set(fds) - own == {"0", "1", "2"} and len(own) == 1, lines
        assert fds["0"] == fds["1"] and fds["0"].startswith("socket:["), fds
        assert fds["2"].startswith(stderr_kind), fds


@pytest.mark.parametrize("path", sorted(PATHS))
def test_exec_environment_is_exactly_pinned(path: str, start_netd: Callable[..., Netd],
                                            sink: SyslogSink) -> None:
    """`env` from inside: PATH, defaults.env + env, the UCSPI variables and NETD_SERVICE,
    and nothing of netd's own environment."""
    port = free_port()
    start_netd(f"""
        defaults:
          env: {{FROM_DEFAULTS: d, BOTH: d}}
        services:
          env:
            listen: tcp://127.0.0.1:{port}
            exec: [/usr/bin/env]
            env: {{BOTH: s, LANG: C.UTF-8}}
            {PATHS[path]}
        """, env={"NETD_LEAK_CHECK": "leaked", "HOME": "/root/leak", "LD_PRELOAD": ""})
    with connect(port) as s:
        client_port = s.getsockname()[1]
        env = dict(line.split("=", 1) for line in recv_all(s).decode().splitlines())
    assert env == {
        "PATH": "/usr/local/bin:/usr/bin:/bin", "PROTO": "TCP",
        "TCPREMOTEIP": "127.0.0.1", "TCPREMOTEPORT": str(client_port),
        "TCPLOCALIP": "127.0.0.1", "TCPLOCALPORT": str(port), "REMOTE_HOST": "127.0.0.1",
        "NETD_SERVICE": "env",
        "FROM_DEFAULTS": "d", "BOTH": "s", "LANG": "C.UTF-8"}, env
    assert set(env) - {"FROM_DEFAULTS", "BOTH", "LANG"} == TCP_ENV


def test_python_handler_child_holds_only_its_connection(
        tmp_path: Path, start_netd: Callable[..., Netd], sink: SyslogSink) -> None:
    """A forked python child keeps 0-2, its connection and the log socket: no listener,
    no control socket, no other child's pipe."""
    (tmp_path / "fd_handlers.py").write_text(textwrap.dedent("""
        import os, socket
        def fds(conn, peer):
            out = []
            for name in sorted(os.listdir("/proc/self/fd"), key=int):
                try:
                    out.append(name + " " + os.readlink("/proc/self/fd/" + name))
                except OSError:
                    pass
            conn.sendall(("\\n".join(out) + "\\n").encode())
        """))
    port, other = free_port(), free_port()
    netd = start_netd(f"""
        services:
          py:
            listen: tcp://127.0.0.1:{port}
            python: fd_handlers:fds
          cat:
            listen: tcp://127.0.0.1:{other}
            exec: [/bin/cat]
        """, env={"PYTHONPATH": f"{REPO}:{tmp_path}"})
    with connect(port) as s:
        lines = recv_all(s).decode().splitlines()
    targets = dict(line.split(" ", 1) for line in lines)
    mine = {fd for fd, t in targets.items() if fd not in ("0", "1", "2")}
    sockets = [t for fd, t in targets.items() if fd in mine and t.startswith("socket:")]
    supervisor = {os.readlink(f"/proc/{netd.proc.pid}/fd/{fd}")
                  for fd in os.listdir(f"/proc/{netd.proc.pid}/fd")}
    # Beyond the connection and the log, nothing the supervisor holds leaked in.
    assert len(sockets) <= 2, lines
    leaked = {t for fd, t in targets.items() if fd in mine} & supervisor
    assert len(leaked) <= 1, (leaked, lines)  # at most the shared log socket
    assert not any(t.startswith("pipe:") for fd, t in targets.items() if fd in mine), lines
