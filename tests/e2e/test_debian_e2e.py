"""The Debian package, end to end: built from the checkout with the README's one
command, checked by lintian, installed with apt in a booted Debian container
(tests/e2e/container.py), then the administrator's day with it: the unit enabled and
started by the install and serving nothing until told to, `man netd`, a service added
in services.d and reloaded, a broken reload that keeps the old config, the logs, the
process titles in `ps` and a metrics scrape, `netd start` on Debian's python-daemon, a
package registering with update-inetd (fingerd) answering through netd with nothing
else done and going away when removed, stop, and purge leaving nothing behind.

Run as root with `pytest -m e2e tests/e2e`; without it the module is skipped. The
package's build-dependencies (from debian/control) and lintian are installed on the
host when missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pytest
from container import (
    REPO,
    Admin,
    Container,
    Held,
    booted,
    checkout_tar,
    free,
    tcp,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

UPPER, CAT, SHOUT, FINGER = 7020, 7022, 7023, 79
HELLO, POOLED, METRICS = 7024, 7025, 9101
HOST_PORTS = [("tcp", port) for port in (UPPER, CAT, SHOUT, FINGER, HELLO, POOLED, METRICS)]
# The build runs with Debian's own tools and Python, whatever the caller's PATH holds
# (a virtualenv's python3 would be the one pybuild runs otherwise).
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
             "DEBIAN_FRONTEND": "noninteractive"}


@dataclass(frozen=True)
class Built:
    deb: Path
    lintian: str


def run(cmd: list[str], cwd: Path | None = None, timeout_s: float = 600
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=CLEAN_ENV, capture_output=True, text=True,
                          timeout=timeout_s)


def build_tools(src: Path) -> None:
    """Install the package's build-dependencies (read from debian/control) and lintian
    on the host, when any is missing."""
    if run(["dpkg-checkbuilddeps"], cwd=src).returncode == 0 and shutil.which("lintian"):
        return
    for cmd in (["apt-get", "build-dep", "-y", "-q", str(src)],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", "lintian"]):
        result = run(cmd)
        if result.returncode != 0:
            run(["apt-get", "update", "-q"])
            result = run(cmd)
        assert result.returncode == 0, f"{' '.join(cmd)}:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
          ) -> Built:
    """The .deb, built on the host from a copy of the checkout as the README says, and
    what lintian says about it."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    src = tmp_path_factory.mktemp("deb") / "netd"
    src.mkdir()
    with tarfile.open(fileobj=BytesIO(checkout_tar())) as tar:
        tar.extractall(src, filter="tar")
    build_tools(src)
    started = time.monotonic()
    result = run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src)
    assert result.returncode == 0, f"dpkg-buildpackage:\n{result.stdout[-4000:]}\n" \
                                   f"{result.stderr[-4000:]}"
    (deb,) = src.parent.glob("netd_*_all.deb")
    (changes,) = src.parent.glob("netd_*.changes")
    built_s = time.monotonic() - started
    lint = run(["lintian", "--display-info", "--pedantic", str(changes)])
    said = "\n".join(line for line in (lint.stdout + lint.stderr).splitlines()
                     if "running with root privileges" not in line)
    print(f"\ne2e: {deb.name} built in {built_s:.0f}s, {deb.stat().st_size} bytes; "
          f"lintian:\n{said or '(nothing)'}")
    return Built(deb, said)


@pytest.fixture(scope="module")
def box(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
        built: Built) -> Iterator[Container]:
    """A booted container with the .deb in /root (not yet installed)."""
    with booted(request, tmp_path_factory, HOST_PORTS) as container:
        container.sh(f"cat > /root/{built.deb.name}", stdin=built.deb.read_bytes())
        yield container


def apt(admin: Admin, args: str) -> str:
    result = admin.sh(f"DEBIAN_FRONTEND=noninteractive apt-get {args} -y -q 2>&1",
                      timeout_s=300)
    return result.stdout


def reads_inetd_conf() -> bool:
    """Whether the package's system config serves /etc/inetd.conf (issue 11's `inetd:`
    key, which this branch cannot use before it lands)."""
    lines = (REPO / "debian" / "netd.yaml").read_text().splitlines()
    return any("/etc/inetd.conf" in line.split("#")[0] for line in lines)


def test_lintian_finds_no_error(built: Built) -> None:
    errors = [line for line in built.lintian.splitlines() if line.startswith("E:")]
    assert errors == [], built.lintian


def test_debian_administrators_day(box: Container, built: Built) -> None:
    admin = Admin(box)
    timings: dict[str, float] = {}
    t0 = time.monotonic()

    # 1. apt installs the package with Debian's Python libraries, enables and starts
    #    netd, which serves nothing: no demo port is opened by a package.
    out = apt(admin, f"install /root/{built.deb.name}")
    for dependency in ("python3-yaml", "python3-systemd", "python3-daemon",
                       "python3-setproctitle", "python3-prometheus-client"):
        assert admin.sh(f"dpkg-query -W -f='${{Status}}' {dependency}").stdout \
            == "install ok installed", out
    assert admin.sh("readlink -f \"$(command -v netd)\"").stdout.strip() == "/usr/bin/netd"
    assert admin.sh("head -1 /usr/bin/netd").stdout.strip() == "#!/usr/bin/python3"
    assert admin.sh("systemctl is-enabled netd netd-inetd.path").stdout.split() == [
        "enabled", "enabled"]
    assert admin.state() == "active", admin.diagnose()
    assert admin.state("netd-inetd.path") == "active"
    check = admin.sh("netd check")
    assert "OK, 0 service(s)" in check.stdout, check.stdout
    assert admin.sh("ss -Hltnup | grep -c netd || true").stdout.strip() == "0"
    conffiles = admin.sh("dpkg-query -W -f='${Conffiles}' netd").stdout
    assert "/etc/netd/netd.yaml" in conffiles, conffiles
    assert admin.sh("test -f /etc/inetd.conf && test -d /etc/netd/services.d && "
                    "test -f /usr/share/bash-completion/completions/netd && "
                    "test -f /usr/share/doc/netd/examples/netd.yaml && echo ok").stdout == "ok\n"
    timings["apt install"] = time.monotonic() - t0

    # 2. The manual.
    page = admin.sh("MANWIDTH=80 man netd 2>&1").stdout
    assert "netd reload -c FILE" in page and "SYNOPSIS" in page, page[:2000]
    page = admin.sh("MANWIDTH=80 man 5 netd.yaml 2>&1").stdout
    assert "stop_timeout" in page and "CONFIGURATION REFERENCE" in page, page[:2000]

    # 3. A service in services.d, checked and reloaded; its lines in both logs.
    pid = admin.main_pid()
    admin.write("/etc/netd/services.d/upper.yaml", f"""\
        services:
          upper:
            listen: tcp://127.0.0.1:{UPPER}
            exec: [/usr/bin/tr, a-z, A-Z]
        """)
    assert "OK, 1 service(s)" in admin.sh("netd check").stdout
    admin.sh("systemctl reload netd")
    assert admin.main_pid() == pid, "systemctl reload restarted netd"
    assert tcp(UPPER, b"hello\n") == b"HELLO\n"
    admin.log_line("file", event="reload", result="ok", added="upper")
    admin.log_line("file", event="accept", service="upper")
    admin.log_line("journal", event="accept", service="upper")
    status = admin.sh("netd status upper").stdout
    assert "upper: listening" in status and f"pid {pid}" in status, status
    timings["add + reload"] = time.monotonic() - t0

    # 4. A broken file: the reload fails and says where, netd serves on.
    admin.write("/etc/netd/services.d/typo.yaml", """\
        services:
          typo: {listen: tcp://127.0.0.1:7021, builtin: ech}
        """)
    assert admin.sh("systemctl reload netd", check=False).returncode != 0
    assert admin.state() == "active" and admin.main_pid() == pid, admin.diagnose()
    assert tcp(UPPER, b"still\n") == b"STILL\n"
    shown = admin.sh("systemctl status --no-pager -n 20 netd", check=False).stdout
    assert "typo.yaml:2" in shown, shown
    admin.sh("rm /etc/netd/services.d/typo.yaml && systemctl reload netd")
    timings["bad reload"] = time.monotonic() - t0

    # 4b. Watching it: `ps` tells netd's processes apart by their titles, and a metrics
    #     address added to netd.yaml is scraped (from the host) and parses.
    admin.sh(f"echo 'metrics: {{listen: \"tcp://127.0.0.1:{METRICS}\"}}' "
             ">> /etc/netd/netd.yaml")
    admin.write("/etc/netd/services.d/watch.yaml", f"""\
        services:
          hello:
            listen: tcp://127.0.0.1:{HELLO}
            python: netd.examples.hello:handle
          pooled:
            listen: tcp://127.0.0.1:{POOLED}
            python: netd.examples.upper:handle
            workers: 1
        """)
    admin.sh("systemctl reload netd")
    held = Held(HELLO)  # the handler waits for a line: its child stays
    try:
        assert held.sock.recv(4096).startswith(b"hello ")
        peer = f"127.0.0.1:{held.sock.getsockname()[1]}"
        expected = ["root netd: supervisor -c /etc/netd/netd.yaml",
                    "nobody netd: spawner user=nobody (hello, upper)",
                    "nobody netd: worker pooled",
                    f"nobody netd: hello {peer}"]

        def titles() -> list[str]:
            lines = admin.sh("ps -e -o user=,args=").stdout.splitlines()
            return [" ".join(line.split()) for line in lines if " netd: " in line]

        wait_until(f"the titles {expected}", lambda: sorted(titles()) == sorted(expected),
                   diagnose=lambda: "\n".join(titles()))
        expected_samples = (
            ("netd_connections_accepted_total", {"service": "upper"}, 2),
            ("netd_connections_accepted_total", {"service": "hello"}, 1),
            ("netd_children", {"service": "hello"}, 1),
            # `systemctl reload` ran `netd reload`, which refused the broken file
            # itself: the daemon never saw it.
            ("netd_reloads_total", {"result": "error"}, 0),
            ("netd_config_last_reload_successful", {}, 1),
            ("netd_info", {"config": "/etc/netd/netd.yaml",
                           "version": admin.sh("netd --version").stdout.split()[1]}, 1))
        scraped: list[str] = []

        def scrape_shows_all() -> bool:
            # A scrape's counters may be one report batch behind the spawners (README,
            # `metrics:`): poll until they have caught up.
            text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS}/metrics",
                                          timeout=10).read().decode()
            scraped[:] = [text]
            found = {(s.name, tuple(sorted(s.labels.items()))): s.value
                     for family in text_string_to_metric_families(text)
                     for s in family.samples}
            return all(found.get((name, tuple(sorted(labels.items())))) == count
                       for name, labels, count in expected_samples) \
                and found.get(("netd_reloads_total", (("result", "ok"),)), 0) >= 3

        wait_until("a scrape that parses and shows the connections and reloads",
                   scrape_shows_all, diagnose=lambda: "".join(scraped))
        held.sock.sendall(b"bye\n")
        assert held.sock.recv(4096) == b"you said: bye\n"
    finally:
        held.close()
    admin.sh("rm /etc/netd/services.d/watch.yaml && systemctl reload netd")
    timings["titles + metrics"] = time.monotonic() - t0

    # 5. A change to /etc/inetd.conf, here by update-inetd as packages make it, reloads
    #    netd through netd-inetd.path, with nothing else done.
    def reloads() -> int:
        return int(admin.sh("grep -c 'event=reload result=ok' /var/log/netd.log",
                            check=False).stdout.strip() or 0)

    before = reloads()
    admin.sh("update-inetd --group OTHER --add "
             "'#<off># netdtest\tstream\ttcp\tnowait\tnobody\t/bin/cat\tcat'")
    wait_until("a reload after update-inetd changed /etc/inetd.conf",
               lambda: reloads() > before, diagnose=admin.diagnose)
    assert admin.main_pid() == pid
    admin.sh("update-inetd --remove netdtest")
    wait_until("another reload", lambda: reloads() > before + 1, diagnose=admin.diagnose)
    wait_until("netd-inetd.service to finish",
               lambda: admin.state("netd-inetd.service") == "inactive")
    timings["update-inetd"] = time.monotonic() - t0

    # 6. `netd start` detaches through Debian's python-daemon (2.3.2 on bookworm).
    version = admin.sh("dpkg-query -W -f='${Version}' python3-daemon").stdout
    admin.sh("systemctl stop netd")
    started = admin.sh("netd start")
    assert started.stdout.startswith("netd started (pid "), started
    assert tcp(UPPER, b"detached\n") == b"DETACHED\n"
    assert "upper: listening" in admin.sh("netd status").stdout
    assert admin.sh("netd stop").stdout.startswith("netd stopped"), version
    wait_until(f"port {UPPER} free after netd stop", lambda: free("tcp", UPPER))
    admin.sh("systemctl start netd")
    timings[f"netd start (python-daemon {version})"] = time.monotonic() - t0

    # 7. update-inetd wakes netd: fingerd registers its inetd.conf line (through tcpd)
    #    and answers; removing it disables the line and finger stops answering.
    if reads_inetd_conf():
        out = apt(admin, "install fingerd finger")  # in.fingerd runs finger to answer
        line = admin.sh("grep -E '^finger[[:space:]]' /etc/inetd.conf", check=False).stdout
        assert "/usr/sbin/tcpd" in line, out + admin.sh("cat /etc/inetd.conf").stdout
        answer = wait_until("finger to answer through netd",
                            lambda: tcp(FINGER, b"\r\n"), diagnose=admin.diagnose)
        assert isinstance(answer, bytes) and (b"Login" in answer or b"No one" in answer), answer
        admin.log_line("file", event="accept", service="finger")
        apt(admin, "remove fingerd")
        assert "#<off># finger" in admin.sh("cat /etc/inetd.conf").stdout
        wait_until("finger to stop answering", lambda: free("tcp", FINGER),
                   diagnose=admin.diagnose)
        admin.log_line("file", event="reload", result="ok", removed="finger")
        assert tcp(UPPER, b"after\n") == b"AFTER\n"
        timings["fingerd"] = time.monotonic() - t0

        # Two lines added back to back, as a package with two services does: the
        # second change lands while the first reload runs, and is served too.
        admin.sh(f"update-inetd --add '{CAT}\tstream\ttcp\tnowait\tnobody\t/bin/cat\tcat' && "
                 f"update-inetd --add '{SHOUT}\tstream\ttcp\tnowait\tnobody\t/usr/bin/tr\t"
                 "tr a-z A-Z'")
        wait_until("both new inetd.conf lines to be served",
                   lambda: tcp(CAT, b"cat\n") == b"cat\n" and tcp(SHOUT, b"tr\n") == b"TR\n",
                   diagnose=admin.diagnose)
        admin.sh(f"update-inetd --remove {CAT} && update-inetd --remove {SHOUT}")
        wait_until("both lines to be gone", lambda: free("tcp", CAT) and free("tcp", SHOUT),
                   diagnose=admin.diagnose)
        # A stop while a reload runs kills its `netd reload` and leaves the unit failed
        # (systemd's rule for a control process killed by a signal): let it finish.
        wait_until("the path-triggered reloads to finish",
                   lambda: admin.state("netd-inetd.service") == "inactive",
                   diagnose=admin.diagnose)
        timings["two update-inetd lines"] = time.monotonic() - t0

    # 8. Stop, then purge: nothing the package created is left.
    admin.sh("systemctl stop netd")
    assert admin.state() == "inactive" and admin.cgroup_pids() == [], admin.diagnose()
    for port in (UPPER, CAT, SHOUT, METRICS):
        assert free("tcp", port), port
    apt(admin, "purge netd")
    # The administrator's own file stays, as dpkg leaves files it did not install.
    left = admin.sh("find /etc/netd /var/log/netd.log* /etc/inetd.conf /run/netd "
                    "/etc/systemd/system/*.wants/netd* /etc/rsyslog.d/30-netd.conf "
                    "/etc/logrotate.d/netd /usr/bin/netd /usr/share/doc/netd "
                    "/var/lib/systemd/deb-systemd-helper-enabled/netd* 2>/dev/null",
                    check=False).stdout.split()
    assert left == ["/etc/netd", "/etc/netd/services.d", "/etc/netd/services.d/upper.yaml"
                    ], f"left behind by purge: {left}"
    assert admin.sh("dpkg-query -W -f='${Status}' netd", check=False).stdout in (
        "", "unknown ok not-installed")
    # Its processes, by their command line or, once titled, by their title.
    assert admin.sh("pgrep -a -f '/usr/bin/netd|^netd: '", check=False).stdout == ""
    timings["stop + purge"] = time.monotonic() - t0
    print("e2e (deb) steps (cumulative s): "
          + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
