"""Real inetd-style programs from Debian packages, unmodified under netd.

Each test runs a classic inetd program (rsync daemon, in.tftpd, git daemon) as an
exec service on an ephemeral loopback port and drives it with its own real client,
then checks the bytes that arrived and the accept/exit lines netd logged.
scripts/setup.sh --test installs the packages (rsync, tftpd-hpa, tftp-hpa, git).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Netd, SyslogSink, free_port

RSYNC = "/usr/bin/rsync"
IN_TFTPD = "/usr/sbin/in.tftpd"
GIT = "/usr/bin/git"
CLIENT_TIMEOUT_S = 60.0
EXIT_WAIT_S = 30.0

StartNetd = Callable[..., Netd]


def need(*programs: str) -> list[str]:
    """Absolute paths of `programs` (names or paths); skip the test if one is missing."""
    found = []
    for program in programs:
        path = program if os.path.isabs(program) else shutil.which(program)
        if not path or not os.access(path, os.X_OK):
            pytest.skip(f"{program} is not installed (scripts/setup.sh --test installs it)")
        found.append(path)
    return found


def run_client(argv: list[str], cwd: Path, env: dict[str, str] | None = None,
               ) -> subprocess.CompletedProcess[str]:
    """Run a real client to completion; fail with its output if it exits non-zero."""
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=CLIENT_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, (f"{argv} exited {done.returncode}\n"
                                  f"stdout: {done.stdout}\nstderr: {done.stderr}")
    return done


def exec_service(name: str, listen: str, argv: list[str], wait: bool = False) -> str:
    """A config body with one exec service (argv written as a JSON/YAML flow list)."""
    # user: root: these daemons read the test's tmp_path (mode 0700) and drop
    # privileges themselves, as they do under inetd.
    return (f"services:\n  {name}:\n    listen: {listen}\n    exec: {json.dumps(argv)}\n"
            "    user: root\n"
            f"    wait: {'true' if wait else 'false'}\n")


def wait_count(sink: SyslogSink, count: int, timeout_s: float = EXIT_WAIT_S,
               **match: str) -> list[dict[str, str]]:
    """Wait until at least `count` events match; return them all."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = sink.find(**match)
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(found)} events matching {match}, wanted {count}; got:\n"
                                 + "\n".join(sink.raw[-40:]))
        time.sleep(0.05)


def check_accept_exit(sink: SyslogSink, service: str, proto: str, port: int,
                      accept: dict[str, str] | None = None,
                      ) -> tuple[dict[str, str], dict[str, str]]:
    """The accept line for `service` (or the one given) and the exit line of its pid."""
    if accept is None:
        accept = sink.wait_for(event="accept", service=service)
    assert accept["proto"] == proto
    assert accept["local"] == f"127.0.0.1:{port}"
    assert int(accept["pid"]) > 0
    exit_ = sink.wait_for(EXIT_WAIT_S, event="exit", service=service, pid=accept["pid"])
    assert "status" in exit_, f"child ended by a signal: {exit_}"
    return accept, exit_


def tree(root: Path) -> dict[str, bytes]:
    """Every regular file under root, by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --- rsync daemon, nowait TCP -------------------------------------------------------


def rsyncd_conf(tmp_path: Path, module_dir: Path) -> Path:
    """An rsyncd.conf with one read-only module `mod` at module_dir."""
    # As root the daemon would switch to nobody, who cannot enter pytest's 0700 tmp dirs.
    ids = "uid = 0\ngid = 0\n" if os.geteuid() == 0 else ""
    conf = tmp_path / "rsyncd.conf"
    conf.write_text(
        "use chroot = no\n"
        f"{ids}"
        f"log file = {tmp_path / 'rsyncd.log'}\n"
        "[mod]\n"
        f"  path = {module_dir}\n"
        "  comment = netd test module\n"
        "  read only = yes\n"
    )
    return conf


def start_rsync(tmp_path: Path, start_netd: StartNetd) -> tuple[str, int, Path]:
    """netd serving an rsync daemon; returns the rsync client, the port and the module dir."""
    (client,) = need("rsync")
    need(RSYNC)
    module_dir = tmp_path / "module"
    module_dir.mkdir()
    conf = rsyncd_conf(tmp_path, module_dir)
    port = free_port()
    start_netd(exec_service("rsync", f"tcp://127.0.0.1:{port}",
                            [RSYNC, "--daemon", f"--config={conf}"]))
    return client, port, module_dir


def test_rsync_lists_modules(tmp_path: Path, sink: SyslogSink, start_netd: StartNetd) -> None:
    """`rsync rsync://host:port/` lists the module with its comment."""
    client, port, _ = start_rsync(tmp_path, start_netd)
    out = run_client([client, f"rsync://127.0.0.1:{port}/"], cwd=tmp_path).stdout
    # One line per module: the name padded with spaces, a tab, the comment.
    listing = [[field.strip() for field in line.split("\t")] for line in out.splitlines()]
    assert listing == [["mod", "netd test module"]]
    accept, _ = check_accept_exit(sink, "rsync", "tcp", port)
    assert accept["peer"].startswith("127.0.0.1:")
    # rsync's own daemon exits 255 after a listing, so only the exit line is checked.


def test_rsync_copies_tree_byte_identical(tmp_path: Path, sink: SyslogSink,
                                          start_netd: StartNetd) -> None:
    """`rsync -a rsync://host:port/mod/ dest/` copies every file exactly, twice in a row."""
    client, port, src = start_rsync(tmp_path, start_netd)
    (src / "hello.txt").write_text("hello from netd\n")
    (src / "random.bin").write_bytes(os.urandom(300_000))
    (src / "empty").write_bytes(b"")
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "sub" / "deeper" / "all-bytes").write_bytes(bytes(range(256)) * 64)
    (src / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (src / "run.sh").chmod(0o755)
    dest = tmp_path / "dest"
    dest.mkdir()

    run_client([client, "-a", f"rsync://127.0.0.1:{port}/mod/", f"{dest}/"], cwd=tmp_path)
    assert tree(dest) == tree(src)
    assert (dest / "run.sh").stat().st_mode & 0o777 == 0o755
    first, exit_ = check_accept_exit(sink, "rsync", "tcp", port)
    assert exit_["status"] == "0"

    # A second connection (a new child) picks up a changed file.
    (src / "hello.txt").write_text("changed, and longer than before\n")
    run_client([client, "-a", "--checksum", f"rsync://127.0.0.1:{port}/mod/", f"{dest}/"],
               cwd=tmp_path)
    assert tree(dest) == tree(src)
    accepts = wait_count(sink, 2, event="accept", service="rsync")
    second = accepts[1]
    assert second["pid"] != first["pid"]
    _, exit_ = check_accept_exit(sink, "rsync", "tcp", port, accept=second)
    assert exit_["status"] == "0"


# --- in.tftpd, wait UDP ------------------------------------------------------------------


def test_tftp_get_twice_wait_mode(tmp_path: Path, sink: SyslogSink, start_netd: StartNetd) -> None:
    """in.tftpd in wait mode serves a get, exits, and netd re-arms for a second get."""
    (client,) = need("tftp")
    need(IN_TFTPD)
    if os.geteuid() != 0:
        pytest.skip("in.tftpd always calls setgroups() to drop to --user, which needs root")
    root = tmp_path / "tftproot"
    root.mkdir()
    big = os.urandom(70_000)        # many 512-byte blocks, the last one short
    exact = os.urandom(1024)        # a multiple of 512: the transfer ends with an empty block
    (root / "big.bin").write_bytes(big)
    (root / "exact.bin").write_bytes(exact)
    port = free_port(socket.SOCK_DGRAM)
    # -t 1: after serving, in.tftpd waits only one second for more requests, then exits.
    start_netd(exec_service("tftp", f"udp://127.0.0.1:{port}",
                            [IN_TFTPD, "--user", "root", "-t", "1", "-s", str(root)], wait=True))

    def get(remote: str, local: str) -> bytes:
        # tftp-hpa exits 0 even on a TFTP error, so the bytes are the real check.
        run_client([client, "-m", "binary", "127.0.0.1", str(port), "-c", "get", remote, local],
                   cwd=tmp_path)
        return (tmp_path / local).read_bytes()

    assert get("big.bin", "got-big") == big
    first, _ = check_accept_exit(sink, "tftp", "udp", port)
    assert first["mode"] == "wait"

    # The first child has exited, so only a re-armed listener can answer this one.
    assert get("exact.bin", "got-exact") == exact
    accepts = wait_count(sink, 2, event="accept", service="tftp")
    second = accepts[1]
    assert second["pid"] != first["pid"]
    assert second["mode"] == "wait"
    check_accept_exit(sink, "tftp", "udp", port, accept=second)


# --- git daemon --inetd, nowait TCP -------------------------------------------------------


def git_env(tmp_path: Path) -> dict[str, str]:
    """An environment for the git client that ignores the user's and system's config."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_AUTHOR_NAME": "netd test", "GIT_AUTHOR_EMAIL": "test@netd.invalid",
        "GIT_COMMITTER_NAME": "netd test", "GIT_COMMITTER_EMAIL": "test@netd.invalid",
    }


def test_git_daemon_clone(tmp_path: Path, sink: SyslogSink, start_netd: StartNetd) -> None:
    """`git clone git://host:port/repo.git` through `git daemon --inetd` gets the commit."""
    (client,) = need("git")
    need(GIT)
    env = git_env(tmp_path)
    work = tmp_path / "work"
    run_client([client, "init", "-q", "-b", "main", str(work)], cwd=tmp_path, env=env)
    (work / "README").write_text("served by git daemon under netd\n")
    (work / "data.bin").write_bytes(os.urandom(50_000))
    run_client([client, "add", "."], cwd=work, env=env)
    run_client([client, "commit", "-q", "-m", "first commit under netd"], cwd=work, env=env)
    head = run_client([client, "rev-parse", "HEAD"], cwd=work, env=env).stdout.strip()
    base = tmp_path / "repos"
    base.mkdir()
    run_client([client, "clone", "-q", "--bare", str(work), str(base / "repo.git")],
               cwd=tmp_path, env=env)

    port = free_port()
    start_netd(exec_service("git", f"tcp://127.0.0.1:{port}",
                            [GIT, "daemon", "--inetd", "--export-all",
                             f"--base-path={base}", str(base)]))
    clone = tmp_path / "clone"
    run_client([client, "clone", "-q", f"git://127.0.0.1:{port}/repo.git", str(clone)],
               cwd=tmp_path, env=env)

    assert run_client([client, "rev-parse", "HEAD"], cwd=clone, env=env).stdout.strip() == head
    subject = run_client([client, "log", "-1", "--format=%s"], cwd=clone, env=env).stdout
    assert subject.strip() == "first commit under netd"
    assert (clone / "README").read_bytes() == (work / "README").read_bytes()
    assert (clone / "data.bin").read_bytes() == (work / "data.bin").read_bytes()
    accept, exit_ = check_accept_exit(sink, "git", "tcp", port)
    assert accept["peer"].startswith("127.0.0.1:")
    assert exit_["status"] == "0"
