"""The servers netd is measured against, found on the machine or installed from Debian.

Peers: tcpserver (ucspi-tcp), socat, xinetd, openbsd-inetd, Python's ForkingTCPServer
and ThreadingTCPServer, a plain Python UDP loop, and the C epoll echo ceiling. As root,
missing peers are installed from Debian packages (xinetd and openbsd-inetd conflict as
packages, so their .debs are unpacked into bench/.build/ instead of installed: no
daemon is started by a package script). A peer that cannot be had is skipped, and the
report says why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from servers import BENCH, BUILD, Server, Skipped, Target, free_port, port_free


def is_root() -> bool:
    """Whether the bench runs as root (it may install peers, netd may change user)."""
    return os.geteuid() == 0


def apt_install(*packages: str) -> str | None:
    """apt-get install as root; None on success, else why not."""
    if not is_root():
        return "not root, cannot install"
    if shutil.which("apt-get") is None:
        return "no apt-get"
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(cmd, env=env, capture_output=True).returncode == 0:
        return None
    subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    return None if done.returncode == 0 else f"apt-get install failed: {done.stderr.strip()[-200:]}"


def find_or_install(command: str, package: str) -> tuple[str | None, str]:
    """A peer's program on PATH, installed from Debian if missing; (path, note)."""
    path = shutil.which(command)
    if path:
        return path, ""
    why = apt_install(package)
    path = shutil.which(command)
    return (path, "installed") if path else (None, why or "not found after install")


def unpacked(command: str, package: str) -> tuple[str | None, str]:
    """xinetd and openbsd-inetd conflict as packages: unpack the .deb into bench/.build.

    The program runs from there in the foreground on a config of ours; its shared
    libraries are installed as ordinary packages. No package script runs, so no system
    daemon is started and nothing is left listening.
    """
    path = shutil.which(command)
    if path and _owned_by(path, package):
        return path, ""
    root = BUILD / "debs" / package
    binary = root / "usr" / "sbin" / command
    if binary.exists():
        return str(binary), f"unpacked {package}.deb"
    if not is_root():
        return None, "not installed and not root"
    (BUILD / "debs").mkdir(parents=True, exist_ok=True)
    fetch = ["apt-get", "download", "-qq", package]
    got = subprocess.run(fetch, cwd=BUILD / "debs", capture_output=True)
    if got.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
        got = subprocess.run(fetch, cwd=BUILD / "debs", capture_output=True)
    debs = sorted((BUILD / "debs").glob(f"{package}_*.deb"))
    if got.returncode != 0 or not debs:
        return None, "apt-get download failed"
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(root)], check=True)
    depends = subprocess.run(["dpkg-deb", "-f", str(debs[-1]), "Depends"],
                             capture_output=True, text=True).stdout
    libs = [d.split("|")[0].split("(")[0].strip() for d in depends.split(",")]
    libs = [lib for lib in libs if lib.startswith("lib")]
    if libs and (why := apt_install(*libs)):
        return None, why
    return (str(binary), f"unpacked {package}.deb") if binary.exists() else (None, "not in .deb")


def _owned_by(path: str, package: str) -> bool:
    done = subprocess.run(["dpkg", "-S", os.path.realpath(path)], capture_output=True, text=True)
    return done.returncode == 0 and done.stdout.split(":")[0] == package


class Peers:
    """Plans every peer server: `servers` to start, `skipped` with the reason."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.servers: list[Server] = []
        self.skipped: list[Skipped] = []
        self.xinetd_udp: Target | None = None  # added once xinetd runs (see plan_xinetd)

    def plan(self, cecho: Path) -> None:
        """Every peer, then the C echo ceiling."""
        self.plan_tcpserver()
        self.plan_socat()
        self.plan_xinetd()
        self.plan_inetd()
        self.plan_python()
        port = free_port(both=True)
        ceiling = Server("cecho", [str(cecho), str(port)])
        for table in ("echo", "udp", "bulk"):
            ceiling.add(table, "C epoll echo (ceiling)", port, ceiling=True)
        self.servers.append(ceiling)

    def plan_tcpserver(self) -> None:
        tcpserver, note = find_or_install("tcpserver", "ucspi-tcp")
        if not tcpserver:
            self.skipped.append(Skipped("exec", "tcpserver", note))
            return
        port = free_port()
        # Its defaults, -c 40 -b 20, would be the limit at c=128. -v: a line at each
        # connection's start and end, as it is deployed (its stderr to a log writer).
        server = Server("tcpserver", [tcpserver, "-v", "-R", "-H", "-l0", "-c", "200", "-b",
                                      "128", "127.0.0.1", str(port), "/bin/cat"],
                        stderr_path=self.workdir / "tcpserver.log")
        server.add("exec", "tcpserver /bin/cat", port, note=note)
        server.add("bulk", "tcpserver /bin/cat", port)
        self.servers.append(server)

    def plan_socat(self) -> None:
        socat, note = find_or_install("socat", "socat")
        if not socat:
            self.skipped.append(Skipped("exec", "socat", note))
            return
        port = free_port()
        server = Server("socat", [socat, f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,"
                                  "backlog=128", "EXEC:/bin/cat"])
        server.add("exec", "socat fork + /bin/cat", port, note=note)
        server.add("bulk", "socat fork + /bin/cat", port)
        self.servers.append(server)

    def plan_xinetd(self) -> None:
        xinetd, note = unpacked("xinetd", "xinetd")
        if not xinetd:
            self.skipped.append(Skipped("exec", "xinetd", note))
            return
        cat, echo = free_port(), free_port(both=True)
        common = "instances = UNLIMITED\n\tcps = 1000000 1\n\tper_source = UNLIMITED\n"
        conf = self.workdir / "xinetd.conf"
        conf.write_text(textwrap.dedent(f"""\
            defaults
            {{
            \t{common}\tlog_type = FILE {self.workdir / "xinetd.log"}
            \tlog_on_success = HOST PID EXIT DURATION
            \tlog_on_failure = HOST
            }}
            service benchcat
            {{
            \ttype = UNLISTED
            \tsocket_type = stream
            \tprotocol = tcp
            \twait = no
            \tuser = root
            \tserver = /bin/cat
            \tbind = 127.0.0.1
            \tport = {cat}
            }}
            service echo
            {{
            \ttype = INTERNAL UNLISTED
            \tid = echo-stream
            \tsocket_type = stream
            \tprotocol = tcp
            \twait = no
            \tuser = root
            \tbind = 127.0.0.1
            \tport = {echo}
            }}
            service echo
            {{
            \ttype = INTERNAL UNLISTED
            \tid = echo-dgram
            \tsocket_type = dgram
            \tprotocol = udp
            \twait = yes
            \tuser = root
            \tbind = 127.0.0.1
            \tport = {echo}
            }}
            """))
        server = Server("xinetd", [xinetd, "-dontfork", "-f", str(conf),
                                   "-pidfile", str(self.workdir / "xinetd.pid")])
        server.add("exec", "xinetd /bin/cat", cat, note=note)
        server.add("echo", "xinetd internal echo", echo)
        server.add("bulk", "xinetd internal echo", echo)
        # Not waited on at start: xinetd's UDP echo answers too rarely for that.
        self.xinetd_udp = Target("udp", "xinetd internal echo", echo, server)
        self.servers.append(server)

    def plan_inetd(self) -> None:
        inetd, note = unpacked("inetd", "openbsd-inetd")
        if not inetd:
            self.skipped.append(Skipped("exec", "openbsd-inetd", note))
            return
        cat = free_port()
        lines = [f"127.0.0.1:{cat} stream tcp nowait.1000000 root /bin/cat cat"]
        # inetd's internal services must be named as in /etc/services: echo is port 7.
        echo_ok = port_free(7)
        if echo_ok:
            lines.append("127.0.0.1:echo stream tcp nowait.1000000 root internal")
        else:
            self.skipped.append(Skipped("echo", "openbsd-inetd internal echo",
                                        "port 7 on 127.0.0.1 is taken"))
        conf = self.workdir / "inetd.conf"
        conf.write_text("\n".join(lines) + "\n")
        server = Server("inetd", [inetd, "-i", "-R", "1000000", str(conf)])
        server.add("exec", "openbsd-inetd /bin/cat", cat, note=note)
        if echo_ok:
            server.add("echo", "openbsd-inetd internal echo", 7)
            server.add("bulk", "openbsd-inetd internal echo", 7)
        self.skipped.append(Skipped("udp", "openbsd-inetd internal echo",
                                    "n/a: it never answers a 127.0.0.0/8 peer (dg_badinput)"))
        self.servers.append(server)

    def plan_python(self) -> None:
        script = str(BENCH / "pyservers.py")
        for kind, label in (("forking", "Python ForkingTCPServer echo"),
                            ("threading", "Python ThreadingTCPServer echo")):
            port = free_port()
            server = Server(f"py-{kind}", [sys.executable, script, kind, str(port)])
            server.add("echo", label, port)
            self.servers.append(server)
        port = free_port(both=True)
        server = Server("py-udp", [sys.executable, script, "udp", str(port)])
        server.add("udp", "Python recvfrom/sendto loop", port)
        self.servers.append(server)
