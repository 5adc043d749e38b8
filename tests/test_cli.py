"""The `netd` command itself: --version, usage errors, NETD_CONFIG, and `netd run`'s
exit codes on signals, busy ports and unix socket paths it must not take.
"""

from __future__ import annotations

import re
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    REPO,
    WAIT_S,
    Netd,
    SyslogSink,
    connect,
    free_port,
    netd_env,
    output,
    recv_all,
    run_netd,
    write_config,
)

EX_USAGE = 64
EX_OSERR = 71
EX_CONFIG = 78


def project_version() -> str:
    """netd.__version__ as written in the source (not imported, so no side effects)."""
    text = (REPO / "netd" / "__init__.py").read_text()
    match = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", text)
    assert match, "no __version__ in netd/__init__.py"
    return match[1]


def run_until_exit(config: Path, timeout_s: float = 15.0) -> subprocess.CompletedProcess[str]:
    """`netd run -c CONFIG`, expected to exit by itself; fails (after killing it) if not."""
    try:
        return run_netd("run", "-c", str(config), cwd=config.parent, timeout_s=timeout_s)
    except subprocess.TimeoutExpired as e:
        out = e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr
        pytest.fail(f"netd run kept running for {timeout_s}s; stderr: {out}")


def everything_said(result: subprocess.CompletedProcess[str], sink: SyslogSink) -> str:
    """stderr, stdout and every syslog line netd sent: where an error may be reported."""
    return "\n".join([result.stderr, result.stdout, *sink.raw])


@pytest.fixture
def unix_listener(tmp_path: Path) -> Iterator[socket.socket]:
    """A listening Unix stream socket owned by the test, at tmp_path/busy.sock."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(tmp_path / "busy.sock"))
    s.listen(8)
    s.settimeout(WAIT_S)
    yield s
    s.close()


# --- plain command line -----------------------------------------------------------


def test_version() -> None:
    """`netd --version` prints the project's version and exits 0."""
    result = run_netd("--version")
    assert result.returncode == 0, output(result)
    assert project_version() in result.stdout, output(result)


@pytest.mark.parametrize("args", [(), ("frobnicate",), ("check", "--no-such-option"),
                                  ("check", "-c")],
                         ids=["no-args", "bad-command", "bad-option", "missing-value"])
def test_usage_errors_exit_64(args: tuple[str, ...]) -> None:
    """Bad command lines exit 64 with a usage message and no traceback."""
    result = run_netd(*args)
    assert result.returncode == EX_USAGE, output(result)
    assert "usage" in result.stderr.lower(), output(result)
    assert "Traceback" not in result.stderr, output(result)


def _write(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body).lstrip("\n"))
    return path


def test_netd_config_env_selects_config(tmp_path: Path) -> None:
    """Without -c, NETD_CONFIG names the config `netd check` reads."""
    good = _write(tmp_path / "good.yaml", """
        services:
          from-env-var:
            listen: tcp://127.0.0.1:7201
            builtin: echo
        """)
    result = run_netd("check", env={"NETD_CONFIG": str(good)}, cwd=tmp_path)
    assert result.returncode == 0, output(result)
    assert "from-env-var" in result.stdout, output(result)


def test_netd_config_env_bad_config_is_reported(tmp_path: Path) -> None:
    """A bad config named by NETD_CONFIG is the one reported (exit 78, its name)."""
    bad = _write(tmp_path / "bad-by-env.yaml", """
        services:
          x:
            listen: tcp://127.0.0.1:7202
            builtin: nosuchbuiltin
        """)
    result = run_netd("check", env={"NETD_CONFIG": str(bad)}, cwd=tmp_path)
    assert result.returncode == EX_CONFIG, output(result)
    assert "bad-by-env.yaml:" in result.stderr, output(result)


def test_dash_c_wins_over_netd_config(tmp_path: Path) -> None:
    """-c overrides NETD_CONFIG."""
    bad = _write(tmp_path / "bad.yaml", "services: [broken\n")
    good = _write(tmp_path / "good.yaml", """
        services:
          from-dash-c:
            listen: tcp://127.0.0.1:7203
            builtin: echo
        """)
    result = run_netd("check", "-c", str(good), env={"NETD_CONFIG": str(bad)}, cwd=tmp_path)
    assert result.returncode == 0, output(result)
    assert "from-dash-c" in result.stdout, output(result)


# --- netd run: failing to start ----------------------------------------------------


def test_run_port_in_use_exits_71(tmp_path: Path, sink: SyslogSink) -> None:
    """A TCP port someone else holds: exit 71, the address named, no traceback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        config = write_config(tmp_path, f"""
            services:
              echo:
                listen: tcp://127.0.0.1:{port}
                builtin: echo
            """, sink)
        result = run_until_exit(config)
    said = everything_said(result, sink)
    assert result.returncode == EX_OSERR, output(result)
    assert f"127.0.0.1:{port}" in said, said
    assert "Traceback" not in said, said


def test_run_udp_port_in_use_exits_71(tmp_path: Path, sink: SyslogSink) -> None:
    """The same for a UDP port."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        config = write_config(tmp_path, f"""
            services:
              echo:
                listen: udp://127.0.0.1:{port}
                builtin: echo
            """, sink)
        result = run_until_exit(config)
    said = everything_said(result, sink)
    assert result.returncode == EX_OSERR, output(result)
    assert f"127.0.0.1:{port}" in said, said
    assert "Traceback" not in said, said


def test_run_bad_config_exits_78(tmp_path: Path, sink: SyslogSink) -> None:
    """`netd run` on an invalid config exits 78 with FILE:LINE on stderr."""
    config = write_config(tmp_path, """
        services:
          echo:
            listen: tpc://127.0.0.1:7204
            builtin: echo
        """, sink)
    result = run_until_exit(config)
    assert result.returncode == EX_CONFIG, output(result)
    assert re.search(rf"{re.escape(str(config.name))}:\d+: services\.echo\.listen: ",
                     result.stderr), output(result)
    assert "Traceback" not in result.stderr, output(result)


def test_run_non_socket_file_at_unix_path_exits_71(tmp_path: Path, sink: SyslogSink) -> None:
    """A regular file where a unix socket should go: exit 71, the file kept as it was."""
    path = tmp_path / "precious.sock"
    path.write_text("do not delete me\n")
    config = write_config(tmp_path, f"""
        services:
          cat:
            listen: unix:{path}
            exec: [/bin/cat]
        """, sink)
    result = run_until_exit(config)
    said = everything_said(result, sink)
    assert result.returncode == EX_OSERR, output(result)
    assert str(path) in said, said
    assert "Traceback" not in said, said
    assert path.is_file(), "netd removed or replaced a regular file"
    assert path.read_text() == "do not delete me\n"


def test_run_unix_path_in_use_exits_71(tmp_path: Path, sink: SyslogSink,
                                       unix_listener: socket.socket) -> None:
    """A unix socket someone is listening on: exit 71, and it still reaches them."""
    path = tmp_path / "busy.sock"
    config = write_config(tmp_path, f"""
        services:
          cat:
            listen: unix:{path}
            exec: [/bin/cat]
        """, sink)
    result = run_until_exit(config)
    said = everything_said(result, sink)
    assert result.returncode == EX_OSERR, output(result)
    assert "Traceback" not in said, said
    assert stat.S_ISSOCK(path.stat().st_mode), "the socket file is gone"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(WAIT_S)
        client.connect(str(path))
        accepted, _ = unix_listener.accept()
        accepted.close()


# --- netd run: running and stopping -----------------------------------------------


def _echo_roundtrip(port: int) -> bytes:
    with connect(port) as conn:
        conn.sendall(b"ping\n")
        conn.shutdown(socket.SHUT_WR)
        return recv_all(conn)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_run_stops_cleanly_on_signal(start_netd: Callable[..., Netd], sink: SyslogSink,
                                     sig: signal.Signals) -> None:
    """SIGTERM and SIGINT: exit 0, event=stop logged, the port closed, no traceback."""
    port = free_port()
    netd = start_netd(f"""
        services:
          echo:
            listen: tcp://127.0.0.1:{port}
            builtin: echo
        """)
    assert _echo_roundtrip(port) == b"ping\n"
    assert netd.stop(sig) == 0
    stop = sink.wait_for(event="stop")
    assert stop.get("signal") == sig.name, stop
    _, err = netd.proc.communicate(timeout=WAIT_S)
    assert b"Traceback" not in err, err.decode()
    with pytest.raises(ConnectionRefusedError):
        connect(port).close()


def test_stale_unix_socket_is_replaced(start_netd: Callable[..., Netd], sink: SyslogSink,
                                       tmp_path: Path) -> None:
    """A socket file nobody listens on is replaced; the service works; removed on stop."""
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as old:
        old.bind(str(path))
    assert stat.S_ISSOCK(path.stat().st_mode)
    netd = start_netd(f"""
        services:
          cat:
            listen: unix:{path}
            exec: [/bin/cat]
        """)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(WAIT_S)
        client.connect(str(path))
        client.sendall(b"through the new socket\n")
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b"through the new socket\n"
    assert netd.stop() == 0
    assert not path.exists(), "socket file left behind after stop"


def test_run_without_config_anywhere_fails_cleanly(tmp_path: Path) -> None:
    """NETD_CONFIG naming a missing file: exit 78, no traceback, the file named."""
    missing = tmp_path / "absent.yaml"
    proc = subprocess.run([sys.executable, "-m", "netd", "run"], capture_output=True, text=True,
                          env=netd_env({"NETD_CONFIG": str(missing)}), cwd=tmp_path,
                          timeout=15)
    assert proc.returncode == EX_CONFIG, output(proc)
    assert "absent.yaml" in proc.stderr, output(proc)
    assert "Traceback" not in proc.stderr, output(proc)
