"""netd's benchmark: netd and every peer super-server side by side, in one run.

    python bench/run.py [--quick] [--runs N] [--json FILE] [--netd-log stderr|syslog]

Builds the C load generator (bench/loadgen.c) and the C epoll echo ceiling
(bench/cecho.c) into bench/.build/, starts every server at once on 127.0.0.1
ephemeral ports, and measures: short TCP connections per second (64-byte echo, then
close) at concurrency 1, 16 and 128 with p50/p99 latency, for exec /bin/cat and for
echo services; UDP echo requests per second; bulk echo MB/s; netd's supervisor RSS
(idle, under load, with 100 services), its CPU per connection and its wake-ups while
idle. The servers of a table take turns, run after run, so that compared figures are
taken seconds apart; each figure is the median of the rounds, each ratio netd/peer
the median of the per-round ratios. It prints Markdown tables and the issue's targets.

Peers: tcpserver (ucspi-tcp), socat, xinetd, openbsd-inetd, Python's ForkingTCPServer
and ThreadingTCPServer, a plain Python UDP loop. As root, missing peers are installed
from Debian packages (xinetd and openbsd-inetd conflict as packages, so their .debs
are unpacked into bench/.build/ instead of installed: no daemon is started by a
package script). A peer that cannot be had is skipped and the report says why.
Every load run is bounded by a count and a time and stops by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
BUILD = BENCH / ".build"
CONCURRENCY = (1, 16, 128)
UDP_WINDOWS = (1, 16)
PAYLOAD = 64
READY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


@dataclass
class Settings:
    """How long and how often each measurement runs."""

    runs: int
    tcp_s: float
    udp_s: float
    bulk_mb: int
    bulk_s: float
    warmup_s: float
    idle_s: float
    count: int = 30000


FULL = Settings(runs=3, tcp_s=1.2, udp_s=1.0, bulk_mb=1000, bulk_s=3.0, warmup_s=0.3, idle_s=3.0)
QUICK = Settings(runs=1, tcp_s=0.4, udp_s=0.4, bulk_mb=256, bulk_s=1.0, warmup_s=0.1, idle_s=1.0)


# -- building and finding the programs -------------------------------------------


def build(name: str) -> Path:
    """Compile bench/NAME.c with gcc -O2 into bench/.build/NAME unless it is up to date."""
    source, binary = BENCH / f"{name}.c", BUILD / name
    BUILD.mkdir(exist_ok=True)
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(source)], check=True)
    return binary


def is_root() -> bool:
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


def netd_env() -> dict[str, str]:
    """netd's environment: ours, plus bench/ on PYTHONPATH for echo_handlers."""
    return {**os.environ, "PYTHONPATH": str(BENCH)}


def netd_python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


# -- ports, processes, readiness ----------------------------------------------------


PORTS_BELOW_EPHEMERAL = range(20000, 32000)
_handed_out: set[int] = set()


def free_port(both: bool = False) -> int:
    """A loopback port free for TCP (and UDP too when `both`), never handed out before.

    Taken below the ephemeral range, so that it cannot collide with the load
    generator's own outgoing ports or with another port this run handed out.
    """
    for _ in range(1000):
        port = random.choice(PORTS_BELOW_EPHEMERAL)
        if port in _handed_out:
            continue
        kinds = (socket.SOCK_STREAM, socket.SOCK_DGRAM) if both else (socket.SOCK_STREAM,)
        if all(_bindable(port, kind) for kind in kinds):
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port")


def _bindable(port: int, kind: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def port_free(port: int) -> bool:
    return _bindable(port, socket.SOCK_STREAM) and _bindable(port, socket.SOCK_DGRAM)


def wait_tcp(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode}")
        with socket.socket() as probe:
            probe.settimeout(0.5)
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} not ready within {READY_TIMEOUT_S}s")


def wait_udp(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.settimeout(0.1)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"exited with status {proc.returncode}")
            with contextlib.suppress(OSError):
                probe.sendto(b"ping", ("127.0.0.1", port))
                if probe.recv(64) == b"ping":
                    return
        raise RuntimeError(f"udp port {port} not answering within {READY_TIMEOUT_S}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL to the whole process group; always reaped."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def proc_status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def rss_mb(pid: int) -> float | None:
    value = proc_status(pid).get("VmRSS")
    return int(value.split()[0]) / 1024 if value else None


def wakeups(pid: int) -> int:
    """Context switches of every thread of pid: each one is a wake-up."""
    total = 0
    for task in Path(f"/proc/{pid}/task").glob("*"):
        status = proc_status_path(task / "status")
        total += int(status.get("voluntary_ctxt_switches", "0"))
        total += int(status.get("nonvoluntary_ctxt_switches", "0"))
    return total


def proc_status_path(path: Path) -> dict[str, str]:
    try:
        text = path.read_text()
    except OSError:
        return {}
    return {k: v.strip() for k, v in (ln.split(":", 1) for ln in text.splitlines() if ":" in ln)}


def cpu_ticks(pid: int) -> int:
    """utime + stime of pid in clock ticks (0 once it has gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


# The process names netd.proctitle gives netd's spawners and workers.
HELPER_NAMES = ("netd-spawner", "netd-worker")


def helpers(pid: int) -> list[int]:
    """Long-lived Python children of pid (netd's spawners or workers), not exec'd programs:
    by their names, or, without setproctitle, by their parent's name."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    comm = proc_status(pid).get("Name", "").strip()
    names = {int(c): proc_status(int(c)).get("Name", "").strip() for c in children}
    return [c for c, name in names.items() if name == comm or name in HELPER_NAMES]


class CpuSplit:
    """CPU time of a supervisor and its helper processes over one load run."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.helpers = helpers(pid)
        self.main0 = cpu_ticks(pid)
        self.helpers0 = {h: cpu_ticks(h) for h in self.helpers}

    def stop(self) -> tuple[float, float]:
        """(supervisor seconds, helpers' seconds) since start, for helpers alive throughout."""
        tick = os.sysconf("SC_CLK_TCK")
        main = (cpu_ticks(self.pid) - self.main0) / tick
        alive = set(helpers(self.pid))
        spent = sum(cpu_ticks(h) - t0 for h, t0 in self.helpers0.items() if h in alive)
        return main, spent / tick


# -- what is measured -----------------------------------------------------------------


@dataclass
class Target:
    """One service of one running server, measured in one table."""

    table: str          # exec | echo | udp | bulk
    label: str
    port: int
    server: Server
    is_netd: bool = False
    ceiling: bool = False
    note: str = ""
    results: dict[int, list[dict[str, float]]] = field(default_factory=dict)


@dataclass
class Server:
    """A process started for the benchmark, with the targets it serves."""

    name: str
    argv: list[str]
    targets: list[Target] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    ready: Callable[[], None] | None = None
    main_pid: int | None = None
    idle_rss_mb: float | None = None
    stderr_path: Path | None = None  # kept for a server that only idles; else /dev/null
    env: dict[str, str] | None = None

    def add(self, table: str, label: str, port: int, **extra: object) -> Target:
        target = Target(table, label, port, self, **extra)  # type: ignore[arg-type]
        self.targets.append(target)
        return target

    def start(self) -> None:
        with contextlib.ExitStack() as files:
            stderr: int | IO[bytes] = subprocess.DEVNULL
            if self.stderr_path is not None:
                stderr = files.enter_context(self.stderr_path.open("wb"))
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=stderr,
                                         env=self.env, cwd=REPO, start_new_session=True)
        self.main_pid = self.proc.pid
        try:
            for target in self.targets:
                if target.table == "udp":
                    wait_udp(target.port, self.proc)
                elif target.table != "bulk":
                    wait_tcp(target.port, self.proc)
        except RuntimeError as e:
            stop(self.proc)
            if self.stderr_path is not None:
                said = self.stderr_path.read_text(errors="replace").strip().splitlines()
                if said:
                    raise RuntimeError(f"{e}: {said[-1][:200]}") from None
            raise


@dataclass
class Skipped:
    table: str
    label: str
    why: str


class Bench:
    """Starts the servers, runs the rounds, prints the report."""

    def __init__(self, settings: Settings, workdir: Path, netd_log: str) -> None:
        self.settings = settings
        self.workdir = workdir
        self.netd_log = netd_log
        self.loadgen = str(build("loadgen"))
        self.cecho = str(build("cecho"))
        self.servers: list[Server] = []
        self.skipped: list[Skipped] = []
        self.notes: list[str] = []
        self.netd: Server | None = None
        self.netd_figures: dict[str, str] = {}
        self.peak_rss_mb = 0.0
        self.sink: SyslogSink | None = None
        self.xinetd_udp: Target | None = None
        self.netd_daemon_section: bool | None = None

    # -- servers ------------------------------------------------------------------

    def plan(self) -> None:
        """Decide every server and service to measure; peers that cannot run are skipped."""
        self.plan_netd()
        self.plan_peers()
        cecho_port = free_port(both=True)
        ceiling = Server("cecho", [self.cecho, str(cecho_port)])
        for table in ("echo", "udp", "bulk"):
            ceiling.add(table, "C epoll echo (ceiling)", cecho_port, ceiling=True)
        self.servers.append(ceiling)

    def netd_config(self, services: str, name: str = "netd") -> str:
        """A netd config: the log, this instance's own pidfile and control socket, services."""
        if self.netd_log == "syslog":
            assert self.sink is not None
            head = f"log: {{to: syslog, syslog_address: {self.sink.path}}}\n"
        else:
            head = "log: {to: stderr}\n"
        daemon = (f"daemon: {{pidfile: {self.workdir}/{name}.pid, "
                  f"control: {self.workdir}/{name}.control}}\n")
        if self.netd_daemon_section is None:
            self.netd_daemon_section = False
            probe = (f"{head}{daemon}services:\n"
                     f"  probe: {{listen: tcp://127.0.0.1:{free_port()}, builtin: echo}}\n")
            self.netd_daemon_section = self.netd_accepts(probe, raw=True) is None
        if self.netd_daemon_section:
            head += daemon
        return head + "services:\n" + textwrap.indent(services, "  ")

    def netd_accepts(self, services: str, raw: bool = False) -> str | None:
        """None when `netd check` accepts these services, else its first error line."""
        path = self.workdir / "check.yaml"
        path.write_text(services if raw else self.netd_config(services))
        done = subprocess.run([netd_python(), "-m", "netd", "check", "-c", str(path)],
                              cwd=REPO, env=netd_env(), capture_output=True, text=True)
        if done.returncode == 0:
            return None
        lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
        return lines[0].split(": ", 1)[-1] if lines else f"exit {done.returncode}"

    def plan_netd(self) -> None:
        if self.netd_log == "syslog":
            self.sink = SyslogSink(self.workdir / "syslog.sock")
        cat, echo = free_port(), free_port(both=True)
        body = (f"cat: {{listen: tcp://127.0.0.1:{cat}, exec: [/bin/cat]}}\n"
                f"echo: {{listen: [tcp://127.0.0.1:{echo}, udp://127.0.0.1:{echo}], "
                "builtin: echo}\n")
        if why := self.netd_accepts(body):
            self.skipped.append(Skipped("exec", "netd", f"netd check failed: {why}"))
            return
        server = Server("netd", [])
        server.add("exec", "netd exec /bin/cat", cat, is_netd=True)
        # Features that may not exist yet: measured when `netd check` takes them.
        optional = [
            ("exec", "netd exec /bin/cat, user nobody", "catnobody",
             "exec: [/bin/cat], user: nobody"),
            ("echo", "netd builtin echo (nowait)", "", ""),
            ("echo", "netd builtin echo, workers: 2", "wecho", "builtin: echo, workers: 2"),
            ("echo", "netd python async echo, workers: 2", "aecho",
             'python: "echo_handlers:async_echo", workers: 2'),
        ]
        for table, label, name, handler in optional:
            if not name:
                server.add(table, label, echo, is_netd=True)
                continue
            port = free_port()
            text = f"{name}: {{listen: tcp://127.0.0.1:{port}, {handler}}}\n"
            if why := self.netd_accepts(text):
                self.skipped.append(Skipped(table, label, f"n/a: netd check says: {why}"))
                continue
            body += text
            server.add(table, label, port, is_netd=True)
        server.add("udp", "netd builtin echo (in supervisor)", echo, is_netd=True)
        server.add("bulk", "netd exec /bin/cat", cat, is_netd=True)
        server.add("bulk", "netd builtin echo", echo, is_netd=True)
        config = self.workdir / "netd.yaml"
        config.write_text(self.netd_config(body))
        server.argv = [netd_python(), "-m", "netd", "run", "-c", str(config)]
        server.env = netd_env()
        server.stderr_path = self.workdir / "netd.stderr"  # its log; read if it dies
        self.netd = server
        self.servers.append(server)

    def plan_peers(self) -> None:
        tcpserver, note = find_or_install("tcpserver", "ucspi-tcp")
        if tcpserver:
            port = free_port()
            server = Server("tcpserver", [tcpserver, "-R", "-H", "-l0", "-c", "200", "-b", "128",
                                          "127.0.0.1", str(port), "/bin/cat"])
            server.add("exec", "tcpserver /bin/cat", port, note=note)
            server.add("bulk", "tcpserver /bin/cat", port)
            self.servers.append(server)
        else:
            self.skipped.append(Skipped("exec", "tcpserver", note))

        socat, note = find_or_install("socat", "socat")
        if socat:
            port = free_port()
            server = Server("socat", [socat, f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,"
                                      "backlog=128", "EXEC:/bin/cat"])
            server.add("exec", "socat fork + /bin/cat", port, note=note)
            server.add("bulk", "socat fork + /bin/cat", port)
            self.servers.append(server)
        else:
            self.skipped.append(Skipped("exec", "socat", note))

        self.plan_xinetd()
        self.plan_inetd()

        python = sys.executable
        script = str(BENCH / "pyservers.py")
        for kind, label in (("forking", "Python ForkingTCPServer echo"),
                            ("threading", "Python ThreadingTCPServer echo")):
            port = free_port()
            server = Server(f"py-{kind}", [python, script, kind, str(port)])
            server.add("echo", label, port)
            self.servers.append(server)
        port = free_port(both=True)
        server = Server("py-udp", [python, script, "udp", str(port)])
        server.add("udp", "Python recvfrom/sendto loop", port)
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
            \t{common}\tlog_type = FILE /dev/null
            \tlog_on_success =
            \tlog_on_failure =
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
        # Not in `udp` readiness: xinetd's UDP echo answers too rarely to wait on.
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

    # -- running ------------------------------------------------------------------

    def start_all(self) -> None:
        for server in list(self.servers):
            try:
                server.start()
            except RuntimeError as e:
                self.servers.remove(server)
                for target in server.targets:
                    self.skipped.append(Skipped(target.table, target.label,
                                                f"did not start: {e}"))
                if server is self.netd:
                    self.netd = None
        xinetd = next((s for s in self.servers if s.name == "xinetd"), None)
        if xinetd is not None and self.xinetd_udp is not None:
            xinetd.targets.append(self.xinetd_udp)
        for server in self.servers:
            if server.main_pid:
                server.idle_rss_mb = rss_mb(server.main_pid)

    def stop_all(self) -> None:
        for server in self.servers:
            if server.proc is not None:
                stop(server.proc)
        if self.sink is not None:
            self.sink.close()

    def loadgen_run(self, mode: str, port: int, conc: int, seconds: float) -> dict[str, float]:
        argv = [self.loadgen, mode, "-p", str(port), "-c", str(conc), "-t", str(seconds),
                "-n", str(self.settings.count if mode != "udp" else 10 * self.settings.count),
                "-s", str(PAYLOAD)]
        if mode == "bulk":
            argv += ["-m", str(self.settings.bulk_mb)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
        if done.returncode != 0:  # counted as a failed run; the report shows the errors
            print(f"loadgen {' '.join(argv[1:])}: {done.stderr.strip()}", file=sys.stderr)
            return {key: 0.0 for key in ("done", "errors", "timeouts", "elapsed_s", "rate",
                                         "p50_ms", "p99_ms", "mb_s", "cpu_s")} | {"errors": 1.0}
        result: dict[str, float] = json.loads(done.stdout)
        return result

    def plan_of(self, table: str) -> list[tuple[str, int, float]]:
        """(loadgen mode, concurrency, seconds) of every measurement in a table."""
        s = self.settings
        if table in ("exec", "echo"):
            return [("tcp-short", c, s.tcp_s) for c in CONCURRENCY]
        if table == "udp":
            return [("udp", c, s.udp_s) for c in UDP_WINDOWS]
        return [("bulk", 1, s.bulk_s)]

    def measure(self, target: Target, mode: str, conc: int, seconds: float) -> None:
        """One load run against one target; netd's runs also sample its RSS and CPU."""
        sampler = split = None
        pid = target.server.main_pid
        if target.is_netd and pid and conc == max(CONCURRENCY):
            sampler = RssSampler(pid)
        if target.is_netd and pid and conc == 16:
            split = CpuSplit(pid)
        try:
            result = self.loadgen_run(mode, target.port, conc, seconds)
        finally:
            if sampler is not None:
                self.peak_rss_mb = max(self.peak_rss_mb, sampler.stop())
        if split is not None:
            result["supervisor_cpu_s"], result["helpers_cpu_s"] = split.stop()
            result["helpers"] = len(split.helpers)
        target.results.setdefault(conc, []).append(result)
        time.sleep(0.05)

    def targets(self) -> list[Target]:
        order = {"exec": 0, "echo": 1, "udp": 2, "bulk": 3}
        found = [t for server in self.servers for t in server.targets]
        return sorted(found, key=lambda t: order[t.table])

    def run(self) -> None:
        """Every measurement, runs interleaved: for each table and concurrency, round after
        round of all its servers back to back, so that compared figures are taken seconds
        apart and a passing disturbance hits every server alike."""
        s = self.settings
        if self.netd is not None and self.netd.main_pid:
            self.measure_idle(self.netd.main_pid, "netd (few services)")
        for target in self.targets():
            if target.table in ("exec", "echo"):
                self.loadgen_run("tcp-short", target.port, 16, s.warmup_s)
        for table in ("exec", "echo", "udp", "bulk"):
            group = [t for t in self.targets() if t.table == table]
            print(f"{table}: {len(group)} servers ...", file=sys.stderr, flush=True)
            for mode, conc, seconds in self.plan_of(table):
                for _ in range(s.runs):
                    for target in group:
                        self.measure(target, mode, conc, seconds)
        for server in self.servers:
            if server.proc is not None and server.proc.poll() is not None:
                said = ""
                if server.stderr_path is not None:
                    lines = server.stderr_path.read_text(errors="replace").splitlines()
                    said = " Its last words: `" + " / ".join(lines[-3:])[:600] + "`"
                self.notes.append(f"{server.name} exited during the run (status "
                                  f"{server.proc.returncode}); its later figures are "
                                  f"failures.{said}")
        if self.netd is not None and self.netd.main_pid:
            after = rss_mb(self.netd.main_pid)
            self.netd_figures["RSS at start, idle"] = fmt_mb(self.netd.idle_rss_mb)
            self.netd_figures["RSS peak during c=128 runs"] = fmt_mb(self.peak_rss_mb)
            self.netd_figures["RSS after the load, idle again"] = fmt_mb(after)

    def measure_idle(self, pid: int, label: str) -> None:
        """Wake-ups and CPU ticks of the supervisor over idle_s seconds with no traffic."""
        time.sleep(0.3)
        w0, c0 = wakeups(pid), cpu_ticks(pid)
        time.sleep(self.settings.idle_s)
        w1, c1 = wakeups(pid), cpu_ticks(pid)
        self.netd_figures[f"wake-ups in {self.settings.idle_s:g}s idle, {label}"] = str(w1 - w0)
        self.netd_figures[f"CPU ticks in {self.settings.idle_s:g}s idle, {label}"] = str(c1 - c0)

    def hundred_services(self) -> None:
        """netd with 100 services (echo, exec cat, daytime): idle RSS and wake-ups."""
        kinds = ["builtin: echo", "exec: [/bin/cat]", "builtin: daytime"]
        body = "".join(f"s{i}: {{listen: tcp://127.0.0.1:{free_port()}, {kinds[i % 3]}}}\n"
                       for i in range(100))
        config = self.workdir / "netd100.yaml"
        config.write_text(self.netd_config(body, "netd100"))
        server = Server("netd100", [netd_python(), "-m", "netd", "run", "-c", str(config)],
                        stderr_path=self.workdir / "netd100.stderr", env=netd_env())
        first = int(body.split("127.0.0.1:")[1].split(",")[0])
        server.add("echo", "netd 100 services", first)
        try:
            server.start()
        except RuntimeError as e:
            self.netd_figures["RSS idle, 100 services"] = f"n/a (did not start: {e})"
            return
        try:
            assert server.main_pid is not None
            self.netd_figures["RSS idle, 100 services"] = fmt_mb(rss_mb(server.main_pid))
            self.measure_idle(server.main_pid, "100 services")
        finally:
            assert server.proc is not None
            stop(server.proc)

    # -- the report ---------------------------------------------------------------

    def report(self) -> str:
        out: list[str] = []
        titles = {
            "exec": "Short TCP connections/s, exec /bin/cat (64 B echo, then close)",
            "echo": "Short TCP connections/s, echo services (64 B echo, then close)",
            "udp": "UDP echo requests/s (64 B; window = requests in flight)",
            "bulk": f"Bulk echo through one connection ({self.settings.bulk_mb} MB)",
        }
        for table, title in titles.items():
            targets = [t for t in self.targets() if t.table == table]
            skipped = [s for s in self.skipped if s.table == table]
            if not targets and not skipped:
                continue
            out.append(f"### {title}\n")
            out.extend(self.table(table, targets, skipped))
            out.extend(self.ratios(table, targets))
            out.append("")
        out.append("### netd supervisor (main process)\n")
        out.append("| figure | value |")
        out.append("|---|---|")
        out.extend(f"| {k} | {v} |" for k, v in self.netd_figures.items())
        if self.sink is not None:
            out.append(f"| connections refused (event=refuse; the default limits must "
                       f"leave none) | {self.sink.refusals} |")
        out.extend(self.cpu_split())
        others = [s for s in self.servers if s.name not in ("netd", "cecho") and s.idle_rss_mb]
        if others:
            out.append("\nIdle RSS of the peers' main process: " + ", ".join(
                f"{s.name} {fmt_mb(s.idle_rss_mb)}" for s in others) + ".")
        out.append("")
        out.extend(f"**Note:** {note}\n" for note in self.notes)
        out.extend(self.targets_summary())
        out.extend(self.loadgen_headroom())
        return "\n".join(out)

    def table(self, table: str, targets: list[Target], skipped: list[Skipped]) -> list[str]:
        if table in ("exec", "echo"):
            head = ["server"] + [f"c={c}" for c in CONCURRENCY] + [
                "p50/p99 ms c=1", "p50/p99 ms c=16", "p50/p99 ms c=128", "errors"]
            concs: tuple[int, ...] = CONCURRENCY
        elif table == "udp":
            head = ["server"] + [f"window {w}" for w in UDP_WINDOWS] + [
                "p50/p99 ms w=1", "p50/p99 ms w=16", "lost"]
            concs = UDP_WINDOWS
        else:
            head = ["server", "MB/s", "seconds", "errors"]
            concs = (1,)
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for t in targets:
            if table == "bulk":
                mb, secs = median(t, 1, "mb_s"), median(t, 1, "elapsed_s")
                cells = [t.label, f"{mb:,.0f}", f"{secs:.2f}", str(total(t, "errors"))]
            else:
                cells = [t.label] + [f"{median(t, c, 'rate'):,.0f}" for c in concs]
                cells += [f"{median(t, c, 'p50_ms'):.2f} / {median(t, c, 'p99_ms'):.2f}"
                          for c in concs]
                if table == "udp":
                    sent = total(t, "done") + total(t, "timeouts")
                    cells.append(f"{100 * total(t, 'timeouts') / max(sent, 1):.1f}%")
                else:
                    cells.append(str(total(t, "errors") + total(t, "timeouts")))
            lines.append("| " + " | ".join(cells) + " |")
        for s in skipped:
            lines.append("| " + " | ".join([s.label] + ["n/a"] * (len(head) - 2) + [s.why])
                         + " |")
        return lines

    def ratios(self, table: str, targets: list[Target]) -> list[str]:
        mine = [t for t in targets if t.is_netd]
        peers = [t for t in targets if not t.is_netd and not t.ceiling]
        if not mine or not peers:
            return []
        concs = (1,) if table == "bulk" else UDP_WINDOWS if table == "udp" else CONCURRENCY
        key = "mb_s" if table == "bulk" else "rate"
        lines = ["", "| netd / peer | " + " | ".join(
            "ratio" if table == "bulk" else f"{'w' if table == 'udp' else 'c'}={c}"
            for c in concs) + " |", "|---|" + "---|" * len(concs)]
        for m in mine:
            for p in peers:
                cells = [f"{ratio(m, p, c, key)}" for c in concs]
                lines.append(f"| {m.label} / {p.label} | " + " | ".join(cells) + " |")
        return lines

    def cpu_split(self) -> list[str]:
        """Where netd spends CPU at c=16: supervisor and helpers, per connection or request."""
        lines = []
        for t in self.targets():
            runs = [r for r in t.results.get(16, []) if "supervisor_cpu_s" in r]
            if not t.is_netd or not runs:
                continue
            main = statistics.median(r["supervisor_cpu_s"] / r["elapsed_s"] for r in runs)
            helper = statistics.median(r["helpers_cpu_s"] / r["elapsed_s"] for r in runs)
            per_op = statistics.median(r["supervisor_cpu_s"] / max(r["done"], 1) for r in runs)
            unit = "request" if t.table == "udp" else "connection"
            where = "UDP w=16" if t.table == "udp" else f"{t.table} c=16"
            count = int(max(r["helpers"] for r in runs))
            lines.append(f"| CPU, {where}, {t.label} | supervisor {100 * main:.0f}% of a core "
                         f"({1e6 * per_op:.0f} µs per {unit}); {count} helpers (spawners, workers) "
                         f"{100 * helper:.0f}% |")
        return lines

    def find(self, label_start: str, table: str) -> Target | None:
        return next((t for t in self.targets()
                     if t.table == table and t.label.startswith(label_start)), None)

    def targets_summary(self) -> list[str]:
        """The issue's targets, each with the measured figure and met / missed."""
        rows: list[tuple[str, str, str]] = []

        def ratio_row(what: str, mine: Target | None, peer: Target | None, conc: int,
                      want: float) -> None:
            if mine is None or peer is None:
                rows.append((what, "n/a", "not measured"))
                return
            r = paired_ratio(mine, peer, conc) or 0.0
            rows.append((what, f"{r:.2f}x", "met" if r >= want else f"missed by {want - r:.2f}x"))

        tcpserver = self.find("tcpserver", "exec")
        ratio_row("exec cat c=16 >= 1.0x tcpserver (aim 1.2x)", self.find("netd exec", "exec"),
                  tcpserver, 16, 1.0)
        ratio_row("exec cat as nobody c=16 >= 1.0x tcpserver",
                  self.find("netd exec /bin/cat, user", "exec"), tcpserver, 16, 1.0)
        workers = self.find("netd builtin echo, workers", "echo")
        ratio_row("workers echo c=16 >= 3x xinetd internal echo", workers,
                  self.find("xinetd", "echo"), 16, 3.0)
        if workers is not None:
            rate = median(workers, 16, "rate")
            rows.append(("workers echo c=16 >= 5,000/s", f"{rate:,.0f}/s",
                         "met" if rate >= 5000 else f"missed by {5000 - rate:,.0f}/s"))
        else:
            rows.append(("workers echo c=16 >= 5,000/s", "n/a", "workers mode not available"))
        ratio_row("UDP echo w=16 >= 0.8x Python loop", self.find("netd", "udp"),
                  self.find("Python recvfrom", "udp"), 16, 0.8)
        exec_cat = self.find("netd exec", "exec")
        if exec_cat is not None:
            rate = median(exec_cat, 16, "rate")
            rows.append(("floor (issue 2): exec cat c=16 >= 1,000/s", f"{rate:,.0f}/s",
                         "met" if rate >= 1000 else "missed"))
        rss100 = self.netd_figures.get("RSS idle, 100 services", "n/a")
        if rss100.endswith("MB"):
            value = float(rss100.split()[0])
            rows.append(("RSS idle with 100 services < 25 MB (floor 30 MB)", rss100,
                         "met" if value < 25 else "missed (floor met)" if value < 30
                         else "missed"))
        for key, figure in self.netd_figures.items():
            if key.startswith("wake-ups"):
                rows.append((f"zero {key}", figure, "met" if figure == "0" else "missed"))
        lines = ["### Targets (issues 2 and 6)\n", "| target | measured | |", "|---|---|---|"]
        lines.extend(f"| {a} | {b} | {c} |" for a, b, c in rows)
        return lines + [""]

    def loadgen_headroom(self) -> list[str]:
        ceiling = self.find("C epoll echo", "echo")
        if ceiling is None:
            return []
        best = max((median(t, c, "rate") for t in self.targets()
                    if t.table in ("exec", "echo") and not t.ceiling for c in CONCURRENCY),
                   default=0.0)
        rates = ", ".join(f"{median(ceiling, c, 'rate'):,.0f}" for c in CONCURRENCY)
        cpu = min(1.0, statistics.median(r["cpu_s"] / max(r["elapsed_s"], 1e-9)
                                for r in ceiling.results.get(16, [{"cpu_s": 0, "elapsed_s": 1}])))
        return [
            "### Is the load generator the bottleneck?\n",
            f"Against the C epoll echo server the same load generator makes {rates} short "
            f"connections/s at c={', '.join(map(str, CONCURRENCY))} (using {100 * cpu:.0f}% of "
            f"one core at c=16); the fastest super-server above makes {best:,.0f}/s, "
            f"{best / max(median(ceiling, 16, 'rate'), 1):.0%} of that ceiling.",
            "",
        ]


class SyslogSink:
    """A Unix datagram socket read by a thread, standing in for /dev/log."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.lines = 0
        self.refusals = 0  # with the default limits, a benchmark run must see none
        self.running = True
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while self.running:
            with contextlib.suppress(TimeoutError, OSError):
                line = self.sock.recv(8192)
                self.lines += 1
                self.refusals += b" event=refuse " in line

    def close(self) -> None:
        self.running = False
        self.thread.join(2)
        self.sock.close()


class RssSampler:
    """Samples a process's VmRSS every 50 ms in a thread; `stop()` returns the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(0.05):
            self.peak = max(self.peak, rss_mb(self.pid) or 0.0)

    def stop(self) -> float:
        self.done.set()
        self.thread.join(2)
        return self.peak


def median(target: Target, conc: int, key: str) -> float:
    values = [r[key] for r in target.results.get(conc, [])]
    return statistics.median(values) if values else 0.0


def total(target: Target, key: str) -> int:
    return int(sum(r[key] for runs in target.results.values() for r in runs))


def paired_ratio(mine: Target, peer: Target, conc: int, key: str = "rate") -> float | None:
    """Median over rounds of mine/peer, each pair measured seconds apart."""
    pairs = zip(mine.results.get(conc, []), peer.results.get(conc, []), strict=False)
    ratios = [m[key] / p[key] for m, p in pairs if p[key] > 0]
    return statistics.median(ratios) if ratios else None


def ratio(mine: Target, peer: Target, conc: int, key: str) -> str:
    value = paired_ratio(mine, peer, conc, key)
    return "n/a" if value is None else f"{value:.2f}x"


def fmt_mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} MB"


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), "unknown CPU")
    return (f"{os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}, "
            f"Python {platform.python_version()}, {'root' if is_root() else 'not root'}")


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="netd-bench-") as path:
        yield Path(path)


def main() -> int:
    """Run the whole benchmark and print the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round (under a minute)")
    parser.add_argument("--runs", type=int, help="rounds (the median is reported)")
    parser.add_argument("--json", type=Path, help="also write every raw result here")
    parser.add_argument("--netd-log", choices=("stderr", "syslog"), default="stderr",
                        help="netd logs to stderr (kept in a temporary file, read only if "
                        "netd dies; the default) or to a syslog socket read by this script")
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    if args.runs:
        settings.runs = args.runs
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    with workdir() as work:
        bench = Bench(settings, work, args.netd_log)
        bench.plan()
        try:
            bench.start_all()
            bench.run()
            if bench.netd is not None:
                bench.hundred_services()
        finally:
            bench.stop_all()
    command = "python bench/run.py" + (" --quick" if args.quick else "") + (
        f" --runs {args.runs}" if args.runs else "") + (
        " --netd-log syslog" if args.netd_log == "syslog" else "")
    print(f"## netd benchmark, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}\n")
    print(f"Machine: {machine()}.  ")
    print(f"Command: `{command}` ({settings.runs} round(s), median reported; "
          f"{time.monotonic() - started:.0f}s). netd logs to "
          f"{'a syslog socket read by the script' if args.netd_log == 'syslog' else 'a file'}"
          f". Load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
          "(the bench itself adds about 1.5).\n")
    print("Ratios netd/peer are the median of per-round ratios, each pair measured seconds "
          "apart.\n")
    print(bench.report())
    if args.json:
        raw = [{"table": t.table, "label": t.label, "results": t.results}
               for t in bench.targets()]
        args.json.write_text(json.dumps({"results": raw, "netd": bench.netd_figures,
                                         "skipped": [s.__dict__ for s in bench.skipped]},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
