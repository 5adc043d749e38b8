"""The administrator's day under a real systemd, in a booted Debian container, with
netd installed by scripts/install.sh (the install for systems other than Debian).

The container (tests/e2e/container.py) gets a copy of the checkout and runs the
install command, then does what an administrator does, asserting each step: enable,
connect, read the logs, add a service and reload, break the config and reload, kill
-9, socket activation, stop. The container shares the host's network, so the demo
services of etc/netd/netd.yaml are reached from here on their ports.

Run as root with `pytest -m e2e tests/e2e`; without `-m e2e` (or NETD_E2E=1) it is
skipped, so the ordinary suite stays fast. It installs debootstrap and
systemd-container when they are missing.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator

import pytest
from container import (
    WAIT_S,
    Admin,
    Container,
    Held,
    booted,
    checkout_tar,
    free,
    logfmt_has,
    tcp,
    udp,
    wait_until,
)

# A cold run (building the root) takes about 80 s here; leave room for a slow mirror.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

SRC = "/root/netd"           # where the checkout goes inside the container
INSTALL = "bash scripts/install.sh"   # run in SRC as root

# The demo services of etc/netd/netd.yaml and services.d/chargen.yaml, and the one
# the day adds.
ECHO, DAYTIME, CAT, HELLO, CHARGEN, UPPER = 7007, 1313, 7008, 7009, 1919, 7010
CAT_SOCK = "/tmp/netd-demo-cat.sock"
HOST_PORTS = [("tcp", p) for p in (ECHO, DAYTIME, CAT, HELLO, CHARGEN, UPPER)] + [
    ("udp", ECHO), ("udp", DAYTIME)]


@pytest.fixture(scope="module")
def box(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Container]:
    """A booted container holding a copy of the checkout (not yet installed)."""
    with booted(request, tmp_path_factory, HOST_PORTS) as container:
        container.sh(f"mkdir -p {SRC} && tar -x -C {SRC}", stdin=checkout_tar())
        yield container


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
    assert admin.sh("man -w netd netd.yaml | xargs readlink -f").stdout.split() == [
        "/usr/local/share/man/man8/netd.8", "/usr/local/share/man/man5/netd.yaml.5"]
    assert "netd reload -c FILE" in admin.sh("MANWIDTH=80 man netd").stdout
    admin.sh("test -f /usr/local/share/bash-completion/completions/netd")
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
    # `netd reload` (ExecReload) checks the file itself and refuses it before asking
    # the daemon: its error reaches the log through the unit's output.
    wait_until("the reload's error in /var/log/netd.log",
               lambda: "typo.yaml:3" in admin.sh("cat /var/log/netd.log").stdout,
               diagnose=admin.diagnose)
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
        chain = admin.ancestors(pid_now)
        # The last connection's child may end (and be reaped) between the two looks.
        gone = chain == [pid_now] and admin.sh(f"test -e /proc/{pid_now}",
                                               check=False).returncode != 0
        assert new_pid in chain or gone, (f"pid {pid_now} is not the new netd's:\n"
                                          + admin.sh("ps -e -o pid,ppid,user,args").stdout)
    for port in (ECHO, CAT, UPPER):
        # The new netd holds each port, and so do its spawners (which serve it): no
        # process of the killed instance does.
        owners = admin.listeners(port)
        holders = {int(pid) for pid in re.findall(r"pid=(\d+),", owners)}
        assert new_pid in holders, owners
        for holder in holders - {new_pid}:
            assert new_pid in admin.ancestors(holder), owners
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
        assert free(proto, port), f"{proto}/{port} still bound after stop"

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
