"""The administrator's day under a real systemd, in a booted Debian container.

A Debian root is built once with debootstrap and cached outside the repository
(/var/cache/netd-e2e/root, rebuilt when missing or when its package list changes).
Each run boots it with systemd-nspawn on a throw-away overlay (--volatile=overlay: the
cached root is never written), copies the checkout in, runs the README's install
command, then does what an administrator does, asserting each step: enable, connect,
read the logs, add a service and reload, break the config and reload, kill -9, socket
activation, stop. The container shares the host's network, so the demo services of
etc/netd/netd.yaml are reached from here on their ports.

Run as root with `pytest -m e2e tests/e2e`; without `-m e2e` (or NETD_E2E=1) it is
skipped, so the ordinary suite stays fast. It installs debootstrap and
systemd-container when they are missing.
"""

from __future__ import annotations

import fcntl
import io
import json
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
from pathlib import Path

import pytest

# A cold run (building the root) takes about 80 s here; leave room for a slow mirror.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("NETD_E2E_CACHE", "/var/cache/netd-e2e"))
ROOT = CACHE / "root"
STAMP = CACHE / "root.stamp"
SUITE = "bookworm"
# What the root holds; a change here rebuilds it. The Debian packages install.sh would
# install are included so that a run does not download them again each time.
PACKAGES = (
    "systemd systemd-sysv dbus rsyslog logrotate python3 python3-venv libsystemd-dev "
    "pkg-config gcc python3-dev iproute2 procps ca-certificates"
).split()
STAMP_TEXT = f"netd e2e root 1\nsuite {SUITE}\npackages {' '.join(PACKAGES)}\n"
SRC = "/root/netd"           # where the checkout goes inside the container
INSTALL = "bash scripts/install.sh"   # the README's command, run in SRC as root
WAIT_S = 30.0

# The demo services of etc/netd/netd.yaml and services.d/chargen.yaml, and the one
# the day adds.
ECHO, DAYTIME, CAT, HELLO, CHARGEN, UPPER = 7007, 1313, 7008, 7009, 1919, 7010
CAT_SOCK = "/tmp/netd-demo-cat.sock"
HOST_PORTS = [("tcp", p) for p in (ECHO, DAYTIME, CAT, HELLO, CHARGEN, UPPER)] + [
    ("udp", ECHO), ("udp", DAYTIME)]


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


# -- fixtures --------------------------------------------------------------------------


def _wanted(config: pytest.Config) -> bool:
    return "e2e" in (config.option.markexpr or "") or os.environ.get("NETD_E2E") == "1"


@pytest.fixture(scope="module")
def box(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Container]:
    """A booted container holding a copy of the checkout (not yet installed)."""
    if not _wanted(request.config):
        pytest.skip("end-to-end: run as root with `pytest -m e2e tests/e2e`")
    reason = host_tools()
    if reason:
        pytest.skip(reason)
    busy = [f"{proto}/{port}" for proto, port in HOST_PORTS if not _free(proto, port)]
    assert not busy, (f"ports the demo config uses are taken on this host: {busy}; "
                      "stop whatever listens there (a netd run on etc/netd/netd.yaml?)")
    started = time.monotonic()
    built_s = ensure_root()
    container = Container(ROOT, tmp_path_factory.mktemp("e2e") / "console.log")
    try:
        container.boot()
        booted_s = time.monotonic() - started
        share_trust(container)
        container.sh(f"mkdir -p {SRC} && tar -x -C {SRC}", stdin=checkout_tar())
        root_note = f"built in {built_s:.0f}s" if built_s else "cached"
        print(f"\ne2e: root {root_note}, booted after {booted_s:.1f}s")
        yield container
    finally:
        container.poweroff()
        print(f"e2e: total {time.monotonic() - started:.0f}s")


def share_trust(container: Container) -> None:
    """Give the container this host's TLS trust store and global pip settings, as an
    administrator's machine has its own: pip inside goes out through the same network
    (which may re-sign TLS with a local CA)."""
    for path in ("/etc/ssl/certs/ca-certificates.crt", "/etc/pip.conf"):
        if Path(path).is_file():
            container.sh(f"mkdir -p {Path(path).parent} && cat > {path}",
                         stdin=Path(path).read_bytes())


def _free(proto: str, port: int) -> bool:
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
        chain = self.sh(f"p={pid}; while [ \"$p\" -gt 1 ]; do echo $p; "
                        "p=$(awk '{print $4}' /proc/$p/stat 2>/dev/null || echo 0); done",
                        check=False).stdout.split()
        return [int(p) for p in chain]

    def listeners(self, port: int) -> str:
        return self.sh(f"ss -Hltnp 'sport = :{port}'").stdout


def check_demo_services(admin: Admin) -> None:
    """Every demo service answers, from the host (and the unix socket from inside)."""
    assert tcp(ECHO, b"hello netd\n") == b"hello netd\n"
    assert udp(ECHO, b"ping\n") == b"ping\n"
    assert tcp(CAT, b"through /bin/cat\n") == b"through /bin/cat\n"
    for host in ("127.0.0.1", "::1"):
        daytime = tcp(DAYTIME, host=host)
        assert daytime.endswith(b"\r\n") and str(time.gmtime().tm_year).encode() in daytime
    assert tcp(HELLO, b"hi\n").endswith(b"you said: hi\n")
    chargen = tcp(CHARGEN, shut=False, limit=148)
    assert len(chargen) == 148 and chargen[:74].endswith(b"\r\n"), chargen
    unix = admin.sh(
        "python3 -c 'import socket; s = socket.socket(socket.AF_UNIX); s.settimeout(10); "
        f's.connect("{CAT_SOCK}"); s.sendall(b"unix ok\\n"); s.shutdown(1); '
        "print(s.recv(100).decode(), end=\"\")'")
    assert unix.stdout == "unix ok\n"


def test_administrators_day(box: Container) -> None:
    """Install, enable, watch the logs, add a service, break the config, kill -9,
    socket activation, stop: each step as a person would do it, checked."""
    admin = Admin(box)
    timings: dict[str, float] = {}
    t0 = time.monotonic()

    # 1. Install with the README's command; a second run changes nothing.
    install = admin.sh(f"cd {SRC} && {INSTALL}", timeout_s=600)
    assert "installed /etc/netd/netd.yaml" in install.stdout, install.stdout
    assert admin.sh("readlink /usr/local/bin/netd").stdout.strip() == "/opt/netd/bin/netd"
    assert admin.sh("netd --version").stdout.startswith("netd ")
    built = admin.sh(f"ls -d {SRC}/build {SRC}/*.egg-info 2>/dev/null", check=False).stdout
    assert built == "", f"install.sh left build files in the checkout: {built}"
    lint = admin.sh("systemd-analyze verify netd.service netd.socket 2>&1; "
                    "rsyslogd -N1 2>&1 | grep -v -e 'version' -e 'End of config' || true")
    assert lint.stdout.strip() == "", f"unit or rsyslog lint:\n{lint.stdout}"
    admin.sh("echo '# the administrator was here' >> /etc/netd/netd.yaml")
    again = admin.sh(f"cd {SRC} && {INSTALL}", timeout_s=600)
    assert "kept existing /etc/netd" in again.stdout, again.stdout
    assert "/etc/systemd/system/netd.service is up to date" in again.stdout, again.stdout
    assert "the administrator was here" in admin.sh("cat /etc/netd/netd.yaml").stdout
    timings["install x2"] = time.monotonic() - t0

    # 2. netd check, then enable --now: active, and every demo service answers.
    check = admin.sh("netd check")
    assert "OK, 5 service(s)" in check.stdout, check.stdout
    admin.sh("systemctl enable --now netd")
    assert admin.state() == "active", admin.diagnose()
    assert admin.sh("systemctl is-enabled netd").stdout.strip() == "enabled"
    check_demo_services(admin)
    status = admin.sh("netd status")
    assert f"pid {admin.main_pid()}" in status.stdout, status.stdout
    assert "echo: listening" in status.stdout, status.stdout
    assert admin.sh("stat -c %a /run/netd/control.sock").stdout.strip() == "600"

    # 3. A connection is logged as event=accept in /var/log/netd.log and in the journal.
    with socket.create_connection(("127.0.0.1", ECHO), timeout=WAIT_S) as s:
        peer = f"127.0.0.1:{s.getsockname()[1]}"
        s.sendall(b"logged\n")
        assert s.recv(100) == b"logged\n"
    accept = {"event": "accept", "service": "echo", "proto": "tcp", "peer": peer,
              "local": f"127.0.0.1:{ECHO}"}
    admin.log_line("file", **accept)
    admin.log_line("journal", **accept)
    timings["enable + logs"] = time.monotonic() - t0

    # 4. A new file in services.d, netd check, systemctl reload: the new service
    #    answers, connections held open across the reload are unharmed.
    held_echo, held_cat = Held(ECHO), Held(CAT)
    assert held_echo.roundtrip(b"before\n") == b"before\n"
    assert held_cat.roundtrip(b"before\n") == b"before\n"
    pid = admin.main_pid()
    admin.write("/etc/netd/services.d/upper.yaml", f"""\
        services:
          upper:                     # shouts back: any program reading stdin works
            listen: tcp://127.0.0.1:{UPPER}
            exec: [/usr/bin/tr, a-z, A-Z]
        """)
    check = admin.sh("netd check")
    assert "upper" in check.stdout and "OK, 6 service(s)" in check.stdout, check.stdout
    admin.sh("systemctl reload netd")
    assert admin.main_pid() == pid, "systemctl reload restarted netd"
    assert tcp(UPPER, b"hello\n") == b"HELLO\n"
    assert held_echo.roundtrip(b"after\n") == b"after\n"
    assert held_cat.roundtrip(b"after\n") == b"after\n"
    admin.log_line("file", event="reload", result="ok", added="upper")
    held_echo.close()
    timings["reload"] = time.monotonic() - t0

    # 5. A broken file + reload: the reload fails and says why, netd serves on.
    admin.write("/etc/netd/services.d/typo.yaml", """\
        services:
          typo:
            listen: tpc://127.0.0.1:7011
            builtin: echo
        """)
    check = admin.sh("netd check", check=False)
    assert check.returncode == 78, check
    assert "typo.yaml:3: services.typo.listen:" in check.stderr, check.stderr
    reload = admin.sh("systemctl reload netd", check=False)
    assert reload.returncode != 0, "systemctl reload succeeded on a broken config"
    assert admin.state() == "active" and admin.main_pid() == pid, admin.diagnose()
    assert tcp(ECHO, b"still here\n") == b"still here\n"
    assert tcp(UPPER, b"still\n") == b"STILL\n"
    assert held_cat.roundtrip(b"still\n") == b"still\n"
    shown = admin.sh("systemctl status --no-pager -n 20 netd", check=False).stdout
    assert "active (running)" in shown and "typo.yaml:3" in shown, shown
    line = admin.log_line("file", event="reload", result="error")
    assert "typo.yaml:3" in line, line
    admin.sh("rm /etc/netd/services.d/typo.yaml && systemctl reload netd")
    timings["bad reload"] = time.monotonic() - t0

    # 6. kill -9 of the main process: systemd restarts netd, the services answer, and
    #    nothing of the killed instance is left (its children held clients and ports).
    old_pid = admin.main_pid()
    old_children = [p for p in admin.cgroup_pids() if p != old_pid]
    assert old_children, "expected netd's children (the held /bin/cat at least)"
    restarts = int(admin.prop("NRestarts"))
    admin.sh(f"kill -9 {old_pid}")
    new_pid = int(str(wait_until(
        "netd restarted by systemd",
        lambda: (admin.state() == "active" and admin.main_pid() not in (0, old_pid)
                 and str(admin.main_pid())),
        diagnose=admin.diagnose)))
    assert int(admin.prop("NRestarts")) == restarts + 1
    assert held_cat.closed_by_peer(), "the killed instance's /bin/cat still serves"
    held_cat.close()
    check_demo_services(admin)
    assert tcp(UPPER, b"back\n") == b"BACK\n"
    for pid_now in admin.cgroup_pids():
        assert pid_now not in old_children, f"pid {pid_now} of the killed netd survived"
        assert new_pid in admin.ancestors(pid_now), f"pid {pid_now} is not the new netd's"
    for port in (ECHO, CAT, UPPER):
        owners = admin.listeners(port)
        assert f"pid={new_pid}," in owners and owners.count("pid=") == 1, owners
    timings["kill -9"] = time.monotonic() - t0

    # 7. log.to: journal: the same events, with NETD_* fields; rsyslog still gets
    #    them. With a short watchdog, netd's pings keep it alive.
    admin.sh("sed -i 's/^  to: syslog .*/  to: journal/' /etc/netd/netd.yaml && "
             "mkdir -p /etc/systemd/system/netd.service.d && printf '[Service]\\n"
             "WatchdogSec=2s\\n' > /etc/systemd/system/netd.service.d/watchdog.conf && "
             "systemctl daemon-reload && netd check >/dev/null && systemctl restart netd")
    started_pid = admin.main_pid()
    armed = int(admin.prop("WatchdogTimestampMonotonic"))  # moves on with every ping
    with socket.create_connection(("127.0.0.1", ECHO), timeout=WAIT_S) as s:
        port = s.getsockname()[1]
        s.sendall(b"journal\n")
        assert s.recv(100) == b"journal\n"

    def journal_entry() -> dict[str, str]:
        out = admin.sh("journalctl -u netd -o json --no-pager NETD_EVENT=accept").stdout
        for line in out.splitlines():
            entry = json.loads(line)
            if entry.get("NETD_PEER") == f"127.0.0.1:{port}":
                return dict(entry)
        return {}

    entry = wait_until("an accept with NETD_* fields in the journal", journal_entry,
                       diagnose=admin.diagnose)
    assert isinstance(entry, dict)
    assert entry["NETD_SERVICE"] == "echo" and entry["SYSLOG_IDENTIFIER"] == "netd", entry
    assert logfmt_has(entry["MESSAGE"], event="accept", peer=f"127.0.0.1:{port}"), entry
    admin.log_line("file", event="accept", peer=f"127.0.0.1:{port}")
    time.sleep(5)  # 2.5 watchdog intervals
    assert admin.main_pid() == started_pid and admin.state() == "active", admin.diagnose()
    assert int(admin.prop("WatchdogTimestampMonotonic")) > armed, "no WATCHDOG=1 arrived"
    admin.sh("rm -r /etc/systemd/system/netd.service.d && "
             "sed -i 's/^  to: journal$/  to: syslog/' /etc/netd/netd.yaml && "
             "systemctl daemon-reload && systemctl restart netd")
    timings["journal + watchdog"] = time.monotonic() - t0

    # 8. Socket activation through the shipped netd.socket: the first connection
    #    starts netd, which adopts the socket and serves that connection.
    admin.sh("systemctl stop netd && systemctl enable --now netd.socket")
    assert admin.state() == "inactive" and admin.state("netd.socket") == "active"
    assert tcp(ECHO, b"first\n") == b"first\n"
    assert admin.state() == "active", admin.diagnose()
    admin.log_line("file", event="adopt", service="echo", local=f"127.0.0.1:{ECHO}")
    assert udp(ECHO, b"udp too\n") == b"udp too\n"
    assert tcp(UPPER, b"rest\n") == b"REST\n"
    # A restart hands the same socket, still open in systemd, to the new netd.
    pid = admin.main_pid()
    admin.sh("systemctl restart netd")
    assert admin.main_pid() != pid and tcp(ECHO, b"again\n") == b"again\n"
    adopts = admin.sh("grep -c 'event=adopt service=echo' /var/log/netd.log").stdout
    assert adopts.strip() == "2", adopts
    admin.sh("systemctl disable --now netd.socket && systemctl restart netd")
    assert admin.state() == "active", admin.diagnose()
    check_demo_services(admin)
    timings["socket activation"] = time.monotonic() - t0

    # 9. systemctl stop: inactive, sockets, pidfile and processes gone.
    assert admin.sh(f"test -S {CAT_SOCK} && test -S /run/netd/control.sock && "
                    "cat /run/netd/netd.pid").stdout.strip() == str(admin.main_pid())
    admin.sh("systemctl stop netd")
    assert admin.state() == "inactive", admin.diagnose()
    left = admin.sh(f"ls -d {CAT_SOCK} /run/netd/control.sock /run/netd/netd.pid 2>/dev/null",
                    check=False).stdout
    assert left == "", f"left behind after stop: {left}"
    assert admin.cgroup_pids() == []
    admin.log_line("file", event="stop", signal="SIGTERM")
    for proto, port in HOST_PORTS:
        assert _free(proto, port), f"{proto}/{port} still bound after stop"

    # 10. A start on a broken config fails at once, says why, and is not retried.
    admin.write("/etc/netd/services.d/typo.yaml", """\
        services:
          typo: {listen: tcp://127.0.0.1:7011, builtin: ech}
        """)
    assert admin.sh("systemctl start netd", check=False).returncode != 0
    assert admin.state() == "failed" and admin.prop("NRestarts") == "0", admin.diagnose()
    why = admin.sh("systemctl status --no-pager -n 10 netd", check=False).stdout
    assert "typo.yaml:2: services.typo.builtin:" in why and "status=78" in why, why
    admin.sh("rm /etc/netd/services.d/typo.yaml && systemctl reset-failed netd")
    timings["bad start"] = time.monotonic() - t0
    print("e2e steps (cumulative s): "
          + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    timings["stop"] = time.monotonic() - t0
