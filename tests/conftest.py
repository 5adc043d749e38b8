"""Shared fixtures: real netd processes, a real syslog sink, free loopback ports.

Every wait has a timeout and every process a test starts is killed and reaped in
teardown, so a failing test never leaves a netd behind.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WAIT_S = 10.0


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    """A port the kernel just handed out on loopback for `kind` (TCP or UDP)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def free_tcp_udp_port() -> int:
    """A port free on 127.0.0.1 for both TCP and UDP."""
    for _ in range(50):
        port = free_port(socket.SOCK_STREAM)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no port free for both TCP and UDP")

def distinct_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n different ports on host, each free for TCP and UDP when probed (the kernel may
    hand out the same port twice in a row)."""
    found: list[int] = []
    for _ in range(50 * n):
        port = free_port(socket.SOCK_STREAM, host)
        try:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                               socket.SOCK_DGRAM) as probe:
                probe.bind((host, port))
        except OSError:
            continue
        if port not in found:
            found.append(port)
        if len(found) == n:
            return found
    raise RuntimeError(f"no {n} distinct free ports on {host}")


def parse_logfmt(line: str) -> dict[str, str]:
    """Split one logfmt line (key=value, values optionally double-quoted) into a dict."""
    fields: dict[str, str] = {}
    i, n = 0, len(line)
    while i < n:
        while i < n and line[i] == " ":
            i += 1
        eq = line.find("=", i)
        if eq < 0:
            break
        key = line[i:eq]
        i = eq + 1
        if i < n and line[i] == '"':
            i += 1
            value = []
            while i < n and line[i] != '"':
                if line[i] == "\\" and i + 1 < n:
                    i += 1
                    value.append({"n": "\n", "t": "\t"}.get(line[i], line[i]))
                else:
                    value.append(line[i])
                i += 1
            i += 1
            fields[key] = "".join(value)
        else:
            end = line.find(" ", i)
            end = n if end < 0 else end
            fields[key] = line[i:end]
            i = end
    return fields


class DatagramSink:
    """A Unix datagram socket owned by the test and read continuously by a thread (its
    queue holds only about ten datagrams); subclasses keep() what each one says."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        # As /dev/log is: netd's spawners, which run as other users, send to it too.
        os.chmod(path, 0o666)
        self.sock.settimeout(0.2)
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self.keep(data)
                self._cond.notify_all()

    def keep(self, data: bytes) -> None:
        """Record one datagram (called with the condition held)."""
        raise NotImplementedError

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=2)
        self.sock.close()


class SyslogSink(DatagramSink):
    """A syslog socket standing in for /dev/log.

    Each datagram is kept raw (`raw`) and as the logfmt fields of its message
    (`events`), the message being what follows "netd[PID]: ".
    """

    def __init__(self, path: Path) -> None:
        self.raw: list[str] = []
        self.events: list[dict[str, str]] = []
        super().__init__(path)

    def keep(self, data: bytes) -> None:
        text = data.decode("utf-8", "replace")
        marker = text.find("]: ")
        message = text[marker + 3 :] if marker >= 0 else text
        self.raw.append(text)
        self.events.append(parse_logfmt(message.rstrip("\n")))

    def wait_for(self, timeout_s: float = WAIT_S, **match: str) -> dict[str, str]:
        """The first event whose fields include all of `match`; fails after timeout_s."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for event in self.events:
                    if all(event.get(k) == v for k, v in match.items()):
                        return event
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no event matching {match} in {timeout_s}s; got:\n"
                                         + "\n".join(self.raw[-40:]))
                self._cond.wait(left)

    def find(self, **match: str) -> list[dict[str, str]]:
        """All events seen so far whose fields include all of `match`."""
        with self._cond:
            return [e for e in self.events if all(e.get(k) == v for k, v in match.items())]

class Netd:
    """A real `netd run` process on a config written by the test."""

    def __init__(self, config: Path, sink: SyslogSink | None, env: dict[str, str],
                 wrapper: tuple[str, ...] = ()) -> None:
        self.config = config
        self.sink = sink
        # `wrapper` runs before netd and execs it (unshare, to give netd private files).
        self.proc = subprocess.Popen(
            [*wrapper, sys.executable, "-m", "netd", "run", "-c", str(config)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=config.parent,
        )

    def wait_ready(self, timeout_s: float = WAIT_S) -> None:
        assert self.sink is not None
        self.sink.wait_for(timeout_s, event="ready")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = WAIT_S) -> int:
        """Send `sig`, wait for exit, return the exit code (kills after timeout_s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=timeout_s)
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.communicate(timeout=WAIT_S)
        except (subprocess.TimeoutExpired, ValueError):
            pass


def netd_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a test's netd runs with: this interpreter's, repo on PYTHONPATH."""
    env = dict(os.environ)
    paths = [str(REPO), str(REPO / "tests" / "handlers")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.pop("NOTIFY_SOCKET", None)
    env.update(extra or {})
    return env


@pytest.fixture
def sink() -> Iterator[SyslogSink]:
    """A syslog socket owned by the test, in a directory of its own that every user may
    reach, as /dev/log is: spawners that run as other users connect to it anew when
    it comes back after going away."""
    directory = Path(tempfile.mkdtemp(prefix="netd-log-"))
    directory.chmod(0o755)
    s = SyslogSink(directory / "log.sock")
    yield s
    s.close()
    shutil.rmtree(directory, ignore_errors=True)


def write_config(tmp_path: Path, body: str, sink: SyslogSink | None,
                 name: str = "netd.yaml") -> Path:
    """Write `body` (a YAML services/... document) with a log section pointing at `sink`."""
    text = textwrap.dedent(body)
    if sink is not None and not re.search(r"^log:", text, re.M):
        text = (f"log:\n  to: syslog\n  syslog_address: {sink.path}\n  level: debug\n" + text)
    if not re.search(r"^daemon:", text, re.M):
        # Each test's netd gets its own pidfile and control socket.
        text = (f"daemon:\n  pidfile: {tmp_path / 'netd.pid'}\n"
                f"  control: {tmp_path / 'control.sock'}\n" + text)
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def start_netd(tmp_path: Path, sink: SyslogSink) -> Iterator[Callable[..., Netd]]:
    """start_netd(config_body, env=None, ready=True, wrapper=()) -> a running Netd, stopped
    in teardown."""
    started: list[Netd] = []

    def start(body: str, env: dict[str, str] | None = None, ready: bool = True,
              wrapper: tuple[str, ...] = ()) -> Netd:
        config = write_config(tmp_path, body, sink)
        n = Netd(config, sink, netd_env(env), wrapper)
        started.append(n)
        if ready:
            try:
                n.wait_ready()
            except AssertionError as e:
                n.proc.kill()
                _, err = n.proc.communicate(timeout=WAIT_S)
                raise AssertionError(f"netd did not get ready: {e}\nstderr: {err.decode()}"
                                     ) from None
        return n

    yield start
    for n in started:
        n.kill()


def run_netd(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
             timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run a short netd command (check, --version, ...) to completion."""
    return subprocess.run([sys.executable, "-m", "netd", *args], capture_output=True,
                          text=True, env=netd_env(env), cwd=cwd, timeout=timeout_s)


def connect(port: int, host: str = "127.0.0.1", timeout_s: float = WAIT_S,
            source: str | None = None) -> socket.socket:
    """A TCP connection to host:port (from the address `source`, any of 127/8 or ::1,
    when given) with a timeout on every operation."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout_s)
    try:
        if source is not None:
            s.bind((source, 0))
        s.connect((host, port))
    except OSError:
        s.close()
        raise
    return s


def recv_all(s: socket.socket, limit: int = 1 << 20) -> bytes:
    """Read until EOF (or limit bytes); the socket's timeout bounds each read."""
    chunks, size = [], 0
    while size < limit:
        data = s.recv(65536)
        if not data:
            break
        chunks.append(data)
        size += len(data)
    return b"".join(chunks)


def children_of(pid: int) -> set[int]:
    """The pids whose parent is `pid`, whichever of its threads started them."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found.update(int(p) for p in (task / "children").read_text().split())
        except OSError:
            pass  # the thread ended meanwhile
    return found


def output(result: subprocess.CompletedProcess[str]) -> str:
    """A finished command's exit code, stdout and stderr, for assertion messages."""
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}--- stderr\n{result.stderr}"


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    """Poll `predicate` until true; fail naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.01)
