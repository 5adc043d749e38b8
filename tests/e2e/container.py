"""What the end-to-end tests share: the cached Debian root, a booted systemd-nspawn
container on a volatile overlay of it, clients on the host, and the administrator's
helpers inside.

The root is built once with debootstrap and cached outside the repository
(/var/cache/netd-e2e/root, rebuilt when missing or when its package lists change). Each
test module boots its own container on a throw-away overlay (--volatile=overlay: the
cached root is never written). The container shares the host's network, so services
netd serves inside are reached from here on their ports.
"""

from __future__ import annotations

import fcntl
import io
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tarfile
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("NETD_E2E_CACHE", "/var/cache/netd-e2e"))
ROOT = CACHE / "root"
STAMP = CACHE / "root.stamp"
SUITE = "bookworm"
# What the root holds; a change here rebuilds it. The Debian packages install.sh would
# install are included so that a run does not download them again each time.
# man-db: an administrator reads `man netd`.
PACKAGES = (
    "systemd systemd-sysv dbus rsyslog logrotate python3 python3-venv libsystemd-dev "
    "pkg-config gcc python3-dev iproute2 procps ca-certificates man-db"
).split()
# Fetched into the root's apt cache, not installed: what `apt-get install ./netd_*.deb`
# and `apt-get install fingerd` pull in, so apt resolves them for real in each run
# without downloading them again.
DOWNLOADED = (
    "python3-yaml python3-systemd python3-daemon python3-setproctitle "
    "python3-prometheus-client tcpd update-inetd fingerd finger"
).split()
STAMP_TEXT = (f"netd e2e root 2\nsuite {SUITE}\npackages {' '.join(PACKAGES)}\n"
              f"downloaded {' '.join(DOWNLOADED)}\n")
WAIT_S = 30.0


# -- the host side: tools, the cached root -------------------------------------------


def _missing_tools() -> list[str]:
    return [t for t in ("systemd-nspawn", "debootstrap", "nsenter", "git")
            if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]


def host_tools() -> str | None:
    """Install what the test needs on the host; the reason to skip, or None."""
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn, debootstrap)"
    if _missing_tools() and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        cmd = ["apt-get", "install", "-y", "-q", "debootstrap", "systemd-container", "git"]
        if subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True,
                           timeout=600)
            subprocess.run(cmd, env=env, capture_output=True, timeout=600)
    missing = _missing_tools()
    if missing:
        return f"missing on the host: {', '.join(missing)}"
    if not Path("/sys/fs/cgroup").is_dir():
        return "no cgroup file system: systemd cannot boot in a container here"
    return None


def _mirror() -> str:
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    return "http://deb.debian.org/debian"


def ensure_root() -> float:
    """Build the cached root unless it is there with the same package list; returns
    the seconds spent building (0 when reused). A lock keeps two runs from racing, and
    a root is built aside and renamed, so an interrupted build is never used."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ROOT.is_dir() and STAMP.exists() and STAMP.read_text() == STAMP_TEXT:
            return 0.0
        started = time.monotonic()
        new = CACHE / "root.new"
        shutil.rmtree(new, ignore_errors=True)
        result = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
             SUITE, str(new), _mirror()],
            capture_output=True, text=True, timeout=1800)
        if result.returncode != 0:
            raise AssertionError(f"debootstrap failed ({result.returncode}):\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        for step in (["apt-get", "update", "-q"],
                     ["apt-get", "install", "--download-only", "-y", "-q", *DOWNLOADED]):
            result = subprocess.run(["chroot", str(new), *step], capture_output=True,
                                    text=True, timeout=600,
                                    env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                         "DEBIAN_FRONTEND": "noninteractive"})
            if result.returncode != 0:
                raise AssertionError(f"{' '.join(step)} in the new root failed:\n"
                                     f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        STAMP.unlink(missing_ok=True)
        shutil.rmtree(ROOT, ignore_errors=True)
        new.rename(ROOT)
        STAMP.write_text(STAMP_TEXT)
        return time.monotonic() - started


def checkout_tar() -> bytes:
    """The checkout as git sees it (tracked and new files, as they are on disk now),
    as a tar archive."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in sorted(set(listed)):
            path = REPO / name
            if (not name or name.startswith((".venv/", "build/")) or "__pycache__" in name
                    or ".egg-info/" in name or not path.is_file()):
                continue
            tar.add(path, arcname=name, recursive=False)
    return buffer.getvalue()


# -- the container ---------------------------------------------------------------------


class Container:
    """A booted systemd-nspawn container on a volatile overlay of the cached root."""

    def __init__(self, root: Path, log: Path) -> None:
        self.name = f"netd-e2e-{os.getpid()}"
        self.log = log
        self.log_file = open(log, "wb")
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "-D", str(root), "--boot", "--register=no", "--keep-unit",
             "--volatile=overlay", "-M", self.name],
            stdin=subprocess.DEVNULL, stdout=self.log_file, stderr=subprocess.STDOUT)
        self.init = 0

    def boot(self, timeout_s: float = 60.0) -> None:
        """Wait for the container's systemd to finish booting."""
        deadline = time.monotonic() + timeout_s
        while not self.init:
            self.init = self._init_of(self.proc.pid)
            if self.proc.poll() is not None:
                raise AssertionError(f"systemd-nspawn exited {self.proc.returncode}:\n"
                                     + self.log.read_text(errors="replace"))
            if time.monotonic() > deadline:
                raise AssertionError("the container's init did not appear")
            time.sleep(0.05)
        state = ""
        while time.monotonic() < deadline:
            # Fails with "Failed to connect to bus" until the container's dbus is up.
            state = self.sh("systemctl is-system-running --wait", check=False,
                            timeout_s=deadline - time.monotonic()).stdout.strip()
            if state in ("running", "degraded"):
                break
            time.sleep(0.1)
        if state == "degraded":
            failed = self.sh("systemctl --failed --no-pager", check=False).stdout
            raise AssertionError(f"the container booted degraded:\n{failed}")
        assert state == "running", f"the container did not boot: {state!r}"

    @staticmethod
    def _init_of(pid: int) -> int:
        """The container's init: the child of nspawn that is PID 1 in its own pid
        namespace (nspawn forks helpers too while it sets up)."""
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return 0
        for child in children:
            try:
                status = Path(f"/proc/{child}/status").read_text()
            except OSError:
                continue
            nspids = next((line.split()[1:] for line in status.splitlines()
                           if line.startswith("NSpid:")), [])
            if len(nspids) > 1 and nspids[-1] == "1":
                return int(child)
        return 0

    def sh(self, script: str, check: bool = True, timeout_s: float = WAIT_S,
           stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
        """Run a bash script inside, as root in a login-like environment (none of the
        host's variables, such as its pip settings, leak in)."""
        cmd = ["nsenter", "-t", str(self.init), "-a", "env", "-i",
               "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOME=/root", "LANG=C.UTF-8", "TERM=dumb", "SYSTEMD_PAGER=", "bash", "-c",
               script]
        result = subprocess.run(cmd, input=stdin, capture_output=True,
                                timeout=max(timeout_s, 1.0))
        done = subprocess.CompletedProcess(
            result.args, result.returncode, result.stdout.decode(errors="replace"),
            result.stderr.decode(errors="replace"))
        if check and done.returncode != 0:
            raise AssertionError(f"in the container: {script}\nexit {done.returncode}\n"
                                 f"--- stdout\n{done.stdout}--- stderr\n{done.stderr}")
        return done

    def poweroff(self, timeout_s: float = WAIT_S) -> None:
        """Power off and wait; kill the nspawn process (by its pid) only if it hangs."""
        if self.proc.poll() is None and self.init:
            subprocess.run(["nsenter", "-t", str(self.init), "-a", "systemctl", "poweroff"],
                           capture_output=True, timeout=timeout_s)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=timeout_s)
        # A killed nspawn can leave the container's init running on its own (seen: its
        # rsyslogd then spun on a core): end it too, by its pid.
        if self.init:
            try:
                os.kill(self.init, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log_file.close()


# -- clients on the host ---------------------------------------------------------------


def tcp(port: int, send: bytes = b"", host: str = "127.0.0.1", shut: bool = True,
        limit: int = 1 << 16) -> bytes:
    """Connect, send, half-close, read until EOF (or `limit` bytes)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(WAIT_S)
        s.connect((host, port))
        if send:
            s.sendall(send)
        if shut:
            s.shutdown(socket.SHUT_WR)
        data = b""
        while len(data) < limit:
            chunk = s.recv(limit - len(data))
            if not chunk:
                break
            data += chunk
        return data


def udp(port: int, send: bytes, host: str = "127.0.0.1") -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(WAIT_S / 6)
        for _ in range(6):  # a datagram may be lost; ask again
            s.sendto(send, (host, port))
            try:
                return s.recv(65536)
            except TimeoutError:
                continue
    raise AssertionError(f"no UDP answer from {host}:{port}")


class Held:
    """A connection kept open across a reload or restart, to check what it survives."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
        self.port = port

    def roundtrip(self, payload: bytes) -> bytes:
        self.sock.sendall(payload)
        data = b""
        while len(data) < len(payload):
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data

    def closed_by_peer(self) -> bool:
        """True when the server side went away (EOF or reset) within WAIT_S."""
        try:
            self.sock.sendall(b"anyone there?\n")
            while True:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def wait_until(what: str, check: Callable[[], object], timeout_s: float = WAIT_S,
               diagnose: Callable[[], str] = lambda: "") -> object:
    """Poll `check` until it returns something true; fail naming `what`."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except (OSError, AssertionError) as e:
            last_error = e
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}"
                         + (f" (last error: {last_error})" if last_error else "")
                         + f"\n{diagnose()}")


def logfmt_has(line: str, **fields: str) -> bool:
    """True when `line` holds every key=value of `fields` (bare values)."""
    words = set(line.split())
    return all(f"{k}={v}" in words for k, v in fields.items())



def share_trust(container: Container) -> None:
    """Give the container this host's TLS trust store and global pip settings, as an
    administrator's machine has its own: pip inside goes out through the same network
    (which may re-sign TLS with a local CA)."""
    for path in ("/etc/ssl/certs/ca-certificates.crt", "/etc/pip.conf"):
        if Path(path).is_file():
            container.sh(f"mkdir -p {Path(path).parent} && cat > {path}",
                         stdin=Path(path).read_bytes())


def free(proto: str, port: int) -> bool:
    """True when nothing on this host holds `port` (TIME-WAIT aside)."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        # As servers do: a connection of an earlier run in TIME-WAIT does not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True



# -- the day ---------------------------------------------------------------------------


class Admin:
    """What the administrator types, inside the container, with helpers to look."""

    def __init__(self, box: Container) -> None:
        self.box = box

    def sh(self, script: str, check: bool = True, timeout_s: float = WAIT_S
           ) -> subprocess.CompletedProcess[str]:
        return self.box.sh(script, check=check, timeout_s=timeout_s)

    def prop(self, name: str, unit: str = "netd") -> str:
        return self.sh(f"systemctl show -p {name} --value {unit}").stdout.strip()

    def state(self, unit: str = "netd") -> str:
        return self.sh(f"systemctl is-active {unit}", check=False).stdout.strip()

    def main_pid(self) -> int:
        return int(self.prop("MainPID"))

    def diagnose(self) -> str:
        out = self.sh("systemctl status --no-pager -n 0 netd netd.socket; "
                      "journalctl -u netd -u netd.socket --no-pager -n 40; "
                      "tail -n 20 /var/log/netd.log", check=False)
        return f"--- diagnosis\n{out.stdout}{out.stderr}"

    def write(self, path: str, text: str) -> None:
        self.sh(f"cat > {shlex.quote(path)} <<'EOF'\n{textwrap.dedent(text)}EOF")

    def log_line(self, where: str, **fields: str) -> str:
        """Wait for a line holding `fields` in /var/log/netd.log or journalctl -u netd."""
        source = {"file": "cat /var/log/netd.log",
                  "journal": "journalctl -u netd -o cat --no-pager"}[where]

        def find() -> str:
            lines = self.sh(source, check=False).stdout.splitlines()
            return next((line for line in lines if logfmt_has(line, **fields)), "")

        return str(wait_until(f"{fields} in {source}", find, diagnose=self.diagnose))

    def cgroup_pids(self) -> list[int]:
        group = self.prop("ControlGroup")
        if not group:
            return []
        # cgroup v2, or the v1/hybrid layouts (systemd's own hierarchy) of some hosts.
        text = self.sh(f"for top in /sys/fs/cgroup /sys/fs/cgroup/unified "
                       f"/sys/fs/cgroup/systemd; do f=$top{group}/cgroup.procs; "
                       "if [ -f $f ]; then cat $f; exit; fi; done; echo no cgroup.procs >&2; "
                       "exit 1").stdout
        return [int(p) for p in text.split()]

    def ancestors(self, pid: int) -> list[int]:
        """pid and its parents, from inside the container's pid namespace."""
        # The parent is the second field after the command's ")": a command (a process
        # title) may hold spaces and parentheses itself.
        chain = self.sh(f"p={pid}; while [ \"$p\" -gt 1 ]; do echo $p; "
                        "p=$(sed 's/.*) [A-Za-z] \\([0-9]*\\) .*/\\1/' /proc/$p/stat "
                        "2>/dev/null || echo 0); done", check=False).stdout.split()
        return [int(p) for p in chain]

    def listeners(self, port: int) -> str:
        return self.sh(f"ss -Hltnp 'sport = :{port}'").stdout



# -- booting one for a test module -------------------------------------------------------


def wanted(config: pytest.Config) -> bool:
    """True when the run asked for the end-to-end tests (-m e2e, or NETD_E2E=1)."""
    return "e2e" in (config.option.markexpr or "") or os.environ.get("NETD_E2E") == "1"


@contextmanager
def booted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           ports: list[tuple[str, int]]) -> Iterator[Container]:
    """A booted container for one test module; skips unless the e2e tests were asked
    for and can run here, and fails when a port the module serves on is taken."""
    if not wanted(request.config):
        pytest.skip("end-to-end: run as root with `pytest -m e2e tests/e2e`")
    reason = host_tools()
    if reason:
        pytest.skip(reason)
    busy = [f"{proto}/{port}" for proto, port in ports if not free(proto, port)]
    assert not busy, (f"ports the test serves on are taken on this host: {busy}; "
                      "stop whatever listens there (a netd run on etc/netd/netd.yaml?)")
    started = time.monotonic()
    built_s = ensure_root()
    container = Container(ROOT, tmp_path_factory.mktemp("e2e") / "console.log")
    try:
        container.boot()
        booted_s = time.monotonic() - started
        share_trust(container)
        root_note = f"built in {built_s:.0f}s" if built_s else "cached"
        print(f"\ne2e: root {root_note}, booted after {booted_s:.1f}s")
        yield container
    finally:
        container.poweroff()
        print(f"e2e: total {time.monotonic() - started:.0f}s")
