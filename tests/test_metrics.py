"""Metrics: a real netd scraped over HTTP (urllib) and the page parsed with
prometheus_client's own parser, after real connections, refusals, spawn failures,
reloads and dropped log lines; scrapers that stall; bad `metrics:` values."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    REPO,
    Netd,
    SyslogSink,
    connect,
    distinct_ports,
    netd_env,
    recv_all,
    run_netd,
    wait_until,
    write_config,
)
from prometheus_client.parser import text_string_to_metric_families

from netd import scrape
from netd.logs import Log, SyslogTarget

WAIT_S = 10.0
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape_page(port: int, path: str = "/metrics") -> tuple[str, str]:
    """GET the page: its text and Content-Type."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=WAIT_S) as reply:
        return reply.read().decode(), reply.headers["Content-Type"]


def samples(port: int) -> Samples:
    """Every sample of a scrape, by name and labels."""
    text, _ = scrape_page(port)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def echo_once(port: int, data: bytes = b"hi\n") -> bytes:
    with connect(port) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        return recv_all(s)


def turned_away(port: int) -> bool:
    """True when the connection is closed without an answer (EOF, or a reset since
    what the client sent was never read)."""
    try:
        return echo_once(port) == b""
    except ConnectionResetError:
        return True


def test_a_scrape_counts_what_happened(start_netd: Callable[..., Netd], sink: SyslogSink,
                                       tmp_path: Path) -> None:
    """Accepted connections, refusals by reason, children running and spawn failures
    per service, as real clients made them; netd's own families alongside."""
    mport, echo, guarded, one, broken = distinct_ports(5)
    program = tmp_path / "gone-soon"
    program.write_text("#!/bin/sh\necho never\n")
    program.chmod(0o755)
    netd = start_netd(f"""
        metrics: {{listen: "tcp://127.0.0.1:{mport}"}}
        services:
          echo: {{listen: "tcp://127.0.0.1:{echo}", builtin: echo}}
          guarded:
            listen: tcp://127.0.0.1:{guarded}
            exec: [/bin/cat]
            access: {{deny: [127.0.0.0/8]}}
          one:
            listen: tcp://127.0.0.1:{one}
            python: svc_handlers:boom_or_echo
            limits: {{instances: 1}}
          broken: {{listen: "tcp://127.0.0.1:{broken}", exec: [{program}]}}
        """)
    listening = sink.wait_for(event="metrics", local=f"127.0.0.1:{mport}")
    assert list(listening) == ["event", "local", "path"] and listening["path"] == "/metrics"
    _, content_type = scrape_page(mport)
    assert content_type.startswith("text/plain; version="), content_type
    first = samples(mport)
    assert value(first, "netd_info", version="0.1.0", config=str(netd.config)) == 1
    assert value(first, "netd_connections_accepted_total", service="echo") == 0
    assert value(first, "netd_connections_refused_total", service="one",
                 reason="per_source") == 0
    assert value(first, "netd_services", state="listening") == 4
    assert value(first, "process_start_time_seconds") is not None

    for _ in range(3):
        assert echo_once(echo) == b"hi\n"
    for _ in range(2):
        assert turned_away(guarded)  # refused: closed without a child
    program.unlink()  # the next connection to `broken` cannot start its program
    assert turned_away(broken)
    with connect(one) as held:
        held.sendall(b"held ")  # the handler waits for the end of its line
        sink.wait_for(event="accept", service="one")
        assert turned_away(one)  # over instances: 1
        expected = {
            ("netd_connections_accepted_total", "echo", None): 3,
            ("netd_connections_accepted_total", "one", None): 1,
            ("netd_connections_accepted_total", "guarded", None): 0,
            ("netd_connections_refused_total", "guarded", "access"): 2,
            ("netd_connections_refused_total", "one", "instances"): 1,
            ("netd_connections_refused_total", "one", "access"): 0,
            ("netd_children", "one", None): 1,
            ("netd_children", "echo", None): 0,
            ("netd_spawn_failures_total", "broken", None): 1,
            ("netd_spawn_failures_total", "echo", None): 0,
        }

        def seen() -> dict[tuple[str, str, str | None], float | None]:
            found = samples(mport)
            return {(name, service, reason): value(found, name, service=service,
                                                   **({"reason": reason} if reason else {}))
                    for name, service, reason in expected}

        wait_until(lambda: seen() == expected, f"the counts {expected}")
        held.sendall(b"done\n")
        assert recv_all(held) == b"held done\n"
    sink.wait_for(event="error", service="broken")
    wait_until(lambda: value(samples(mport), "netd_children", service="one") == 0,
               "the held child to be gone from the count")
    status = run_netd("status", "--json", "-c", str(netd.config), timeout_s=WAIT_S)
    by_name = {s["name"]: s for s in json.loads(status.stdout)["services"]}
    assert by_name["one"]["refused_by"] == {"instances": 1}, status.stdout
    assert by_name["broken"]["failed"] == 1, status.stdout
    assert json.loads(status.stdout)["daemon"]["metrics"] == [f"127.0.0.1:{mport}"]
    shown = run_netd("status", "-c", str(netd.config), timeout_s=WAIT_S).stdout
    assert f"metrics: GET /metrics on 127.0.0.1:{mport}\n" in shown, shown


def test_reloads_are_counted_and_the_endpoint_follows_the_config(
        start_netd: Callable[..., Netd], sink: SyslogSink, tmp_path: Path) -> None:
    """Metrics turned on, moved and turned off by reloads; a refused reload is counted
    and leaves the endpoint as it was."""
    first, second, echo = distinct_ports(3)
    services = f'services:\n  echo: {{listen: "tcp://127.0.0.1:{echo}", builtin: echo}}\n'
    netd = start_netd(services)

    def reload(body: str, result: str) -> None:
        before = len(sink.find(event="reload"))
        write_config(tmp_path, body, sink)
        netd.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: len(sink.find(event="reload")) > before, "the reload")
        assert sink.find(event="reload")[-1]["result"] == result

    reload(f'metrics: {{listen: "tcp://127.0.0.1:{first}"}}\n' + services, "ok")
    found = samples(first)
    assert value(found, "netd_reloads_total", result="ok") == 1
    assert value(found, "netd_reloads_total", result="error") == 0
    assert value(found, "netd_config_last_reload_successful") == 1

    reload(f'metrics: {{listen: "udp://127.0.0.1:{second}"}}\n' + services, "error")
    found = samples(first)
    assert value(found, "netd_reloads_total", result="error") == 1
    assert value(found, "netd_config_last_reload_successful") == 0

    reload(f'metrics: {{listen: "tcp://127.0.0.1:{second}"}}\n' + services, "ok")
    assert value(samples(second), "netd_reloads_total", result="ok") == 2
    with pytest.raises(urllib.error.URLError):
        scrape_page(first)

    reload(services, "ok")
    with pytest.raises(urllib.error.URLError):
        scrape_page(second)
    assert echo_once(echo) == b"hi\n"


def test_metrics_on_a_unix_socket(start_netd: Callable[..., Netd], sink: SyslogSink,
                                  tmp_path: Path) -> None:
    """`listen: unix:PATH` serves the same page to a raw HTTP/1.0 request; 404 and 405
    for what is not a GET of /metrics; the socket file goes when netd stops."""
    path = tmp_path / "metrics.sock"
    (echo,) = distinct_ports(1)
    netd = start_netd(f"""
        metrics: {{listen: "unix:{path}"}}
        services:
          echo: {{listen: "tcp://127.0.0.1:{echo}", builtin: echo}}
        """)

    def ask(request: bytes) -> bytes:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(WAIT_S)
            s.connect(str(path))
            s.sendall(request)
            return recv_all(s)

    checked = run_netd("check", "-c", str(netd.config), timeout_s=WAIT_S).stdout
    assert f"metrics: GET /metrics on unix:{path}\n" in checked, checked
    reply = ask(b"GET /metrics HTTP/1.0\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK\r\n"), head
    assert f"content-length: {len(body)}".encode() in head.lower(), head
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert {"netd_connections_accepted", "netd_reloads", "netd_children"} <= names, names
    assert ask(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.0 404 ")
    assert ask(b"POST /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 405 ")
    assert ask(b"HEAD /metrics HTTP/1.0\r\n\r\n").endswith(b"\r\n\r\n")
    assert ask(b"hello\r\n\r\n").startswith(b"HTTP/1.0 400 ")
    assert netd.stop() == 0
    assert not path.exists()


def test_stalled_scrapers_do_not_stall_netd(start_netd: Callable[..., Netd], sink: SyslogSink,
                                            tmp_path: Path) -> None:
    """Scrapers that send nothing, send a byte at a time, or do not read a page larger
    than the socket buffers: services, the control socket, reloads and other scrapes go
    on meanwhile; each stalled one costs a bounded slot, answered (408) or closed by
    its deadline, and beyond the bound a scraper is closed at once."""
    mport, echo = distinct_ports(2)
    # Many services make a page larger than the socket buffers of a scraper that
    # does not read.
    names = [f"svc{i:03d}" for i in range(300)]
    body = [f'metrics: {{listen: "tcp://127.0.0.1:{mport}"}}', "services:",
            f'  echo: {{listen: "tcp://127.0.0.1:{echo}", builtin: echo}}']
    body += [f'  {name}: {{listen: "unix:{tmp_path / name}", builtin: echo}}' for name in names]
    netd = start_netd("\n".join(body) + "\n")
    page, _ = scrape_page(mport)
    assert len(page) > 100_000, len(page)

    stalled: list[socket.socket] = []

    def scraper() -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(WAIT_S)
        s.connect(("127.0.0.1", mport))
        stalled.append(s)
        return s

    try:
        silent = scraper()
        trickle = scraper()
        trickle.sendall(b"GE")
        deaf = scraper()
        deaf.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")  # and reads nothing for now

        for _ in range(3):
            assert echo_once(echo) == b"hi\n"
            assert len(scrape_page(mport)[0]) > 100_000
            trickle.sendall(b"T")
        status = run_netd("status", "-c", str(netd.config), timeout_s=WAIT_S)
        assert status.returncode == 0 and "echo: listening" in status.stdout, status.stdout
        netd.proc.send_signal(signal.SIGHUP)
        sink.wait_for(event="reload", result="ok")
        # All that while the silent scraper is still waited for: not answered yet.
        silent.setblocking(False)
        with pytest.raises(BlockingIOError):
            silent.recv(1)
        silent.settimeout(WAIT_S)

        # The bound: with every slot taken, one more scraper is closed at once.
        for _ in range(scrape.MAX_SCRAPERS):
            scraper()
        wait_until(lambda: _closed_at_once(mport), "a scraper over the bound to be closed")

        # The deaf one gets its whole page once it reads (within the write deadline).
        head, _, got = recv_all(deaf).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200 OK"), head
        families = {f.name for f in text_string_to_metric_families(got.decode())}
        assert "netd_connections_accepted" in families
        # The silent one is answered 408 at its deadline.
        assert recv_all(silent).startswith(b"HTTP/1.0 408 "), "no 408 for a silent scraper"
    finally:
        for s in stalled:
            s.close()
    wait_until(lambda: len(scrape_page(mport)[0]) > 100_000, "scrapes to work again")


def _closed_at_once(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        try:
            return recv_all(s) == b""
        except ConnectionResetError:  # closed with the request unread
            return True


def test_dropped_log_lines_are_counted(start_netd: Callable[..., Netd],
                                       sink: SyslogSink) -> None:
    """With syslog gone, a spawner drops lines beyond its backlog: the scrape counts
    them, as many as the log_dropped lines say once syslog is back."""
    mport, echo = distinct_ports(2)
    start_netd(f"""
        metrics: {{listen: "tcp://127.0.0.1:{mport}"}}
        services:
          echo: {{listen: "tcp://127.0.0.1:{echo}", builtin: echo}}
        """)
    sink.close()  # the socket file stays, nobody reads: as when rsyslog stops
    sink.path.unlink()
    for _ in range(600):  # accept + close: 1200 lines, more than the 1000 held
        assert echo_once(echo, b"x\n") == b"x\n"

    def dropped() -> tuple[float | None, float | None]:
        found = samples(mport)
        return (value(found, "netd_log_dropped_total", process="spawners"),
                value(found, "netd_log_dropped_total", process="supervisor"))

    wait_until(lambda: (dropped()[0] or 0) >= 200, "the spawner's drops to be counted")
    back = SyslogSink(sink.path)
    try:
        back.wait_for(event="log_dropped")

        def reported() -> int:
            return sum(int(e["count"]) for e in back.find(event="log_dropped"))

        wait_until(lambda: reported() == sum(n or 0 for n in dropped()),
                   "the counts to match what the log_dropped lines say")
        assert echo_once(echo) == b"hi\n"
    finally:
        back.close()


def test_log_lost_counts_every_dropped_line(tmp_path: Path) -> None:
    """Log.lost(): what a log dropped so far, before and after the log_dropped line
    reports it (a real socket nobody reads, then read)."""
    path = tmp_path / "log.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    try:
        log = Log(SyslogTarget(str(path), "daemon"))
        for i in range(Log.BACKLOG_MAX + 2000):
            log.event("accept", service="x", n=i)
        lost = log.lost()
        assert lost > 0 and log.dropped == lost
        receiver.settimeout(0.2)
        reports: list[bytes] = []
        for _ in range(5000):
            log.flush()
            try:
                data = receiver.recv(65536)
            except TimeoutError:
                break
            if b"event=log_dropped" in data:
                reports.append(data)
        assert len(reports) == 1, reports
        assert f"count={lost}".encode() in reports[0], reports
        assert log.dropped == 0 and log.lost() == lost
    finally:
        receiver.close()


@pytest.mark.parametrize(("metrics", "line", "message"), [
    ("metrics: tcp://127.0.0.1:9101", 1,
     "metrics: expected a mapping such as {listen: tcp://127.0.0.1:9101}"),
    ("metrics: {}", 1, "metrics.listen: is required (for example tcp://127.0.0.1:9101)"),
    ("metrics:\n  listn: tcp://127.0.0.1:9101", 2, "metrics.listn: unknown key; did you mean"),
    ("metrics:\n  listen: tpc://127.0.0.1:9101", 2, "metrics.listen: unknown scheme 'tpc'"),
    ("metrics:\n  listen: udp://127.0.0.1:9101", 2,
     "metrics.listen: 'udp://127.0.0.1:9101' is a datagram address"),
    ("metrics:\n  listen: tcp://127.0.0.1:99999", 2, "metrics.listen: port 99999 is out of"),
    ("metrics:\n  listen: tcp://127.0.0.1:7", 2,
     "metrics.listen: tcp://127.0.0.1:7 is where services.echo listens"),
])
def test_a_bad_metrics_value_is_a_config_error(tmp_path: Path, metrics: str, line: int,
                                               message: str) -> None:
    config = tmp_path / "netd.yaml"
    config.write_text(metrics + "\nservices:\n  echo: {listen: 'tcp://127.0.0.1:7', "
                      "builtin: echo}\n")
    result = run_netd("check", "-c", str(config))
    assert result.returncode == 78, result.stdout + result.stderr
    assert f"{config}:{line}: {message}" in result.stderr, result.stderr


def test_prometheus_client_is_loaded_only_with_metrics(tmp_path: Path) -> None:
    """A supervisor without metrics never imports prometheus_client (several MB of RSS);
    one whose config turns metrics on does."""
    (port,) = distinct_ports(1)
    script = textwrap.dedent(f"""
        import sys
        from netd.config import load_config
        from netd.logs import Log, StderrTarget
        from netd.supervisor import Supervisor

        off = load_config({str(tmp_path / "off.yaml")!r})
        supervisor = Supervisor(off, Log(StderrTarget()))
        supervisor.apply(off)
        print("off", "prometheus_client" in sys.modules)
        supervisor.apply(load_config({str(tmp_path / "on.yaml")!r}))
        print("on", "prometheus_client" in sys.modules)
        supervisor.close_all()
        """)
    (tmp_path / "off.yaml").write_text("services: {}\n")
    (tmp_path / "on.yaml").write_text(f'metrics: {{listen: "tcp://127.0.0.1:{port}"}}\n')
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=netd_env(), cwd=REPO, timeout=30)
    assert result.stdout.split() == ["off", "False", "on", "True"], result.stderr


def test_metrics_without_prometheus_client_is_a_clean_error(tmp_path: Path,
                                                           sink: SyslogSink) -> None:
    """prometheus_client is a dependency, but a system without it gets a message naming
    it (exit 71, as for an address netd cannot use), not a traceback."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "prometheus_client.py").write_text("raise ImportError('not installed here')\n")
    (port,) = distinct_ports(1)
    config = write_config(tmp_path, f'metrics: {{listen: "tcp://127.0.0.1:{port}"}}\n', sink)
    env = netd_env()
    env["PYTHONPATH"] = os.pathsep.join([str(shadow), env["PYTHONPATH"]])
    result = subprocess.run([sys.executable, "-m", "netd", "run", "-c", str(config)],
                            capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 71, result.stderr
    assert "metrics need prometheus_client (python3-prometheus-client)" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr
