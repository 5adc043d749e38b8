"""The processes the benchmark starts: ports, readiness, stopping, and netd itself.

A `Server` is one process with the `Target`s (services) it is measured on. `Netd` is
netd as deployed: `netd run` on a config with no `limits:` keys (the default limits
hold), logging every connection to a syslog socket read by bench/logsink.c, with its own
pidfile and control socket so that several can run side by side.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bootstrap import REPO
from procs import helpers, holds, socket_inodes

BENCH = REPO / "bench"
BUILD = BENCH / ".build"
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
CONTROL_TIMEOUT_S = 60.0
PORTS_BELOW_EPHEMERAL = range(20000, 32000)
_handed_out: set[int] = set()


def build(name: str) -> Path:
    """Compile bench/NAME.c with gcc -O2 into bench/.build/NAME unless it is up to date."""
    source, binary = BENCH / f"{name}.c", BUILD / name
    BUILD.mkdir(exist_ok=True)
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(source)], check=True)
    return binary


def free_port(both: bool = False) -> int:
    """A loopback port free for TCP (and UDP too when `both`), never handed out before.

    Taken below the ephemeral range, so that it cannot collide with the load
    generator's own outgoing ports or with another port this run handed out.
    """
    for _ in range(10000):
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
    """Whether nothing is bound to 127.0.0.1:port, TCP or UDP."""
    return _bindable(port, socket.SOCK_STREAM) and _bindable(port, socket.SOCK_DGRAM)


def wait_tcp(port: int, proc: subprocess.Popen[bytes]) -> None:
    """Until a connection to the port succeeds; raises RuntimeError if proc exits first."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode}")
        with socket.socket() as probe:
            probe.settimeout(0.5)
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} not ready within {READY_TIMEOUT_S:g}s")


def wait_udp(port: int, proc: subprocess.Popen[bytes]) -> None:
    """Until a datagram to the port is echoed; raises RuntimeError if proc exits first."""
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
        raise RuntimeError(f"udp port {port} not answering within {READY_TIMEOUT_S:g}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL to the whole process group; always reaped."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_TIMEOUT_S)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@dataclass
class Target:
    """One service of one running server, measured in one table."""

    table: str          # exec | echo | udp | bulk | udp-scale
    label: str
    port: int
    server: Server
    is_netd: bool = False
    ceiling: bool = False
    note: str = ""
    results: dict[int, list[dict[str, float]]] = field(default_factory=dict)
    connections: int = 0  # TCP connections made to it, for the log's lines per connection


@dataclass
class Skipped:
    """A server or service that could not be measured, and why."""

    table: str
    label: str
    why: str


@dataclass
class Server:
    """A process started for the benchmark, with the targets it serves."""

    name: str
    argv: list[str]
    targets: list[Target] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    main_pid: int | None = None
    idle_rss_mb: float | None = None
    stderr_path: Path | None = None  # kept to say why it died; else /dev/null
    env: dict[str, str] | None = None

    def add(self, table: str, label: str, port: int, **extra: Any) -> Target:
        """A service of this server, measured in `table`."""
        target = Target(table, label, port, self, **extra)
        self.targets.append(target)
        return target

    def start(self) -> None:
        """Start the process and wait until every target answers; raises RuntimeError
        (with the last line it wrote on stderr) when it does not."""
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
                if target.table.startswith("udp"):
                    wait_udp(target.port, self.proc)
                elif target.table != "bulk":
                    wait_tcp(target.port, self.proc)
                    target.connections += 1
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"{e}{self.last_words()}") from None

    def last_words(self) -> str:
        """The last lines it wrote on stderr, if they were kept, for a message."""
        if self.stderr_path is None or not self.stderr_path.exists():
            return ""
        lines = self.stderr_path.read_text(errors="replace").strip().splitlines()
        return f": {' / '.join(lines[-3:])[:600]}" if lines else ""

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL) if it was started."""
        if self.proc is not None:
            stop(self.proc)


class LogSink:
    """bench/logsink.c on a Unix datagram socket: a syslog socket read as fast as it can."""

    def __init__(self, binary: Path, path: Path) -> None:
        self.path = path
        self.proc = subprocess.Popen([str(binary), str(path)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"logsink did not start: {self._said()}")
            time.sleep(0.01)

    def _said(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode(errors="replace").strip()

    def close(self) -> int | None:
        """SIGTERM; the number of lines it read, None if it did not say."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            return None
        with contextlib.suppress(ValueError):
            return int(out.split()[0])
        return None


def netd_command() -> list[str]:
    """`netd` as installed in .venv (its console script, as the systemd unit runs it)."""
    script = REPO / ".venv" / "bin" / "netd"
    return [str(script)] if script.exists() else [sys.executable, "-m", "netd"]


def netd_env() -> dict[str, str]:
    """netd's environment: ours, plus bench/ on PYTHONPATH for echo_handlers."""
    return {**os.environ, "PYTHONPATH": str(BENCH)}


class Netd(Server):
    """netd run on its own config, logging to its own logsink, with its control socket.

    `services` is the `services:` mapping's body in YAML, one service a line.
    """

    def __init__(self, name: str, workdir: Path, services: str, logsink: Path) -> None:
        self.workdir = workdir
        self.config = workdir / f"{name}.yaml"
        self.control = workdir / f"{name}.control"
        self.sink_path = workdir / f"{name}.log.sock"
        self.logsink = logsink
        self.sink: LogSink | None = None
        self.log_lines: int | None = None
        self.workers_ports: set[int] = set()  # ports of workers-mode services
        self.write(services)
        super().__init__(name, [*netd_command(), "run", "-c", str(self.config)],
                         stderr_path=workdir / f"{name}.stderr", env=netd_env())

    def write(self, services: str) -> None:
        """(Re)write the config file with these services."""
        self.config.write_text(
            f"log: {{to: syslog, syslog_address: {self.sink_path}}}\n"
            f"daemon: {{pidfile: {self.workdir / self.config.stem}.pid, "
            f"control: {self.control}}}\n"
            "services:\n" + textwrap.indent(services, "  "))

    def start(self) -> None:
        """Start its logsink, then netd; raises RuntimeError if either does not come up."""
        self.sink = LogSink(self.logsink, self.sink_path)
        try:
            super().start()
        except RuntimeError:
            self.sink.close()
            self.sink = None
            raise

    def stop(self) -> None:
        """Stop netd (it flushes its log), then its logsink, keeping the lines it read."""
        super().stop()
        if self.sink is not None:
            self.log_lines = self.sink.close()
            self.sink = None

    def request(self, command: str, timeout_s: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
        """One request on the control socket ({"cmd": command}); its JSON reply."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout_s)
            conn.connect(str(self.control))
            conn.sendall(json.dumps({"cmd": command}).encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = conn.recv(1 << 20)
                if not chunk:
                    break
                reply += chunk
        answer: dict[str, Any] = json.loads(reply)
        return answer

    def refused(self) -> int | None:
        """Connections refused so far, all services together (netd status); None if it
        does not answer."""
        try:
            status = self.request("status", 10.0)
        except (OSError, ValueError):
            return None
        return sum(int(s.get("refused", 0)) for s in status.get("services", []))

    def roles(self, pids: list[int]) -> dict[int, str]:
        """supervisor, spawner or worker for each of its processes: a helper that holds
        the socket of a workers-mode service is one of its workers."""
        inodes: set[str] = set()
        for port in self.workers_ports:
            inodes |= socket_inodes(port, "tcp")
        return {pid: "supervisor" if pid == self.main_pid
                else "worker" if inodes and holds(pid, inodes) else "spawner" for pid in pids}

    def holders(self, port: int, proto: str) -> list[int]:
        """Its helpers that hold the socket of 127.0.0.1:port (who serves it)."""
        if self.main_pid is None:
            return []
        inodes = socket_inodes(port, proto)
        return [pid for pid in helpers(self.main_pid) if holds(pid, inodes)]
