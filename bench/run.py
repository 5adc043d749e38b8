"""netd's benchmark: netd as deployed and every peer super-server side by side, in one run.

    python3 bench/run.py [--quick] [--runs N] [--json FILE]

Not run by the repository's .venv, it runs `bash scripts/setup.sh` when .venv has no
netd yet (a fresh clone), then runs itself again with .venv/bin/python.

Builds the C load generator (bench/loadgen.c), the C epoll echo ceiling (bench/cecho.c)
and the syslog reader (bench/logsink.c) into bench/.build/. netd runs as deployed: `netd
run` on a config with no `limits:` keys (the default limits hold), logging every
connection to a syslog socket read by logsink, with the open-files limit of its systemd
unit. Every server is started at once on 127.0.0.1 ports, and measured: short TCP
connections per second (64-byte echo, then close) at concurrency 1, 16 and 128 with
p50/p99 latency, for exec /bin/cat and for echo services; UDP echo requests per second;
bulk echo MB/s; the CPU of each netd process per connection. Then netd alone: CPU per
UDP datagram with 1 and with 300 services; a config of 1,000 services reloaded under
load and checked; the supervisor's idle RSS in every config. The servers of a table
take turns, round after round, so that compared figures are taken seconds apart; each
figure is the median of the rounds, each ratio netd/peer the median of the per-round
ratios. It prints Markdown tables and issue 13's targets, each met or missed.
Every load run is bounded by a count and a time and stops by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bootstrap import ensure_venv
from peers import Peers, is_root
from procs import CpuSplit, cpu_ticks, rss_mb, wakeups
from report import (
    CONCURRENCY,
    ROLES,
    UDP_WINDOWS,
    at_least,
    at_most,
    cpu_table,
    errors,
    load_table,
    markdown,
    median,
    median_of,
    paired_ratio,
    ratio_table,
    udp_scale_table,
)
from scale import (
    ReloadFigures,
    ThousandServices,
    fillers,
    identities,
    measure_check,
    measure_reload,
    reload_rows,
)
from servers import Netd, Server, Skipped, Target, build, free_port, netd_command, netd_env

PAYLOAD = 64
NOFILE = 65536  # LimitNOFILE of systemd/netd.service
RSS_TARGET_MB = 25.0
TABLES = ("exec", "echo", "udp", "bulk")


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
    reloads: int       # of the 1,000-service config, `netd reload` and SIGHUP in turn
    checks: int        # runs of `netd check` of the 1,000-service config
    settle_s: float    # between two reloads
    count: int = 30000


FULL = Settings(runs=3, tcp_s=1.2, udp_s=1.0, bulk_mb=1000, bulk_s=3.0, warmup_s=0.3,
                idle_s=3.0, reloads=6, checks=5, settle_s=1.0)
QUICK = Settings(runs=1, tcp_s=0.4, udp_s=0.4, bulk_mb=256, bulk_s=1.0, warmup_s=0.1,
                 idle_s=1.0, reloads=2, checks=3, settle_s=0.5)


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


class Bench:
    """Starts the servers, runs the rounds and netd's own measurements, prints the report."""

    def __init__(self, settings: Settings, workdir: Path) -> None:
        self.settings = settings
        self.workdir = workdir
        self.loadgen = str(build("loadgen"))
        self.logsink = build("logsink")
        self.peers = Peers(workdir)
        self.cecho = build("cecho")
        self.servers: list[Server] = []
        self.skipped: list[Skipped] = []
        self.notes: list[str] = []
        self.netd: Netd | None = None
        self.figures: dict[str, str] = {}     # the supervisor's table: figure -> value
        self.rss: dict[str, float | None] = {}  # config -> the supervisor's idle RSS
        self.peak_rss_mb = 0.0
        self.udp_scale: tuple[Target, Target] | None = None
        self.reload: ReloadFigures | None = None
        self.check_s: list[float] = []
        self.check_error = ""

    # -- the main config and the peers -------------------------------------------------

    def plan(self) -> None:
        """Decide every server and service to measure; what cannot run is skipped."""
        self.plan_netd()
        self.peers.plan(self.cecho)
        self.servers += self.peers.servers
        self.skipped += self.peers.skipped

    def plan_netd(self) -> None:
        root = is_root()
        ports = {name: free_port(both=name == "echo")
                 for name in ("cat", "catnobody", "echo", "wecho", "aecho")}

        def tcp(name: str) -> str:
            return f"listen: 'tcp://127.0.0.1:{ports[name]}'"

        # (table, label, name, the service's line)
        wanted = [
            ("exec", "netd exec /bin/cat, user: root" if root else "netd exec /bin/cat", "cat",
             f"{{{tcp('cat')}, exec: [/bin/cat]{', user: root' if root else ''}}}"),
            ("exec", "netd exec /bin/cat, user: nobody", "catnobody",
             f"{{{tcp('catnobody')}, exec: [/bin/cat], user: nobody}}"),
            ("echo", "netd builtin echo (no mode keys)", "echo",
             f"{{listen: ['tcp://127.0.0.1:{ports['echo']}', 'udp://127.0.0.1:{ports['echo']}'],"
             " builtin: echo}"),
            ("echo", "netd builtin echo, workers: 2", "wecho",
             f"{{{tcp('wecho')}, builtin: echo, workers: 2}}"),
            ("echo", "netd python async echo, workers: 2", "aecho",
             f"{{{tcp('aecho')}, python: 'echo_handlers:async_echo', workers: 2}}"),
        ]
        lines = {name: f"{name}: {line}\n" for _, _, name, line in wanted}
        refused = self.refused_services(lines)
        if not root:
            refused.setdefault("catnobody", "not root: netd cannot run a service as nobody")
        netd = Netd("netd", self.workdir, "".join(line for name, line in lines.items()
                                                  if name not in refused), self.logsink)
        for table, label, name, _ in wanted:
            if name in refused:
                self.skipped.append(Skipped(table, label, f"n/a: {refused[name]}"))
            else:
                netd.add(table, label, ports[name], is_netd=True)
        if "echo" not in refused:
            netd.add("udp", "netd builtin echo (UDP, in its spawner)", ports["echo"], is_netd=True)
            netd.add("bulk", "netd builtin echo", ports["echo"], is_netd=True)
        if "cat" not in refused:
            netd.add("bulk", "netd exec /bin/cat", ports["cat"], is_netd=True)
        netd.workers_ports = {ports[name] for name in ("wecho", "aecho")}
        if netd.targets:
            self.netd = netd
            self.servers.append(netd)

    def refused_services(self, lines: dict[str, str]) -> dict[str, str]:
        """The services `netd check` refuses, each with its first error line: the whole
        config is checked once, and each service alone only if that fails."""
        if self.check("".join(lines.values())) is None:
            return {}
        found = {}
        for name, line in lines.items():
            if (why := self.check(line)) is not None:
                found[name] = f"netd check says: {why}"
        return found

    def check(self, services: str) -> str | None:
        """None when `netd check` accepts these services, else its first error line."""
        probe = Netd("check", self.workdir, services, self.logsink)
        done = subprocess.run([*netd_command(), "check", "-c", str(probe.config)],
                              env=netd_env(), capture_output=True, text=True, timeout=120)
        if done.returncode == 0:
            return None
        said = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        return said[0][:300] if said else f"exit {done.returncode}"

    def start_all(self) -> None:
        for server in list(self.servers):
            try:
                server.start()
            except RuntimeError as e:
                self.servers.remove(server)
                self.skipped += [Skipped(t.table, t.label, f"did not start: {e}")
                                 for t in server.targets]
                if server is self.netd:
                    self.netd = None
        xinetd = next((s for s in self.servers if s.name == "xinetd"), None)
        if xinetd is not None and self.peers.xinetd_udp is not None:
            xinetd.targets.append(self.peers.xinetd_udp)
        for server in self.servers:
            if server.main_pid:
                server.idle_rss_mb = rss_mb(server.main_pid)
        if self.netd is not None:
            self.rss["main (the tables above)"] = self.netd.idle_rss_mb

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()

    # -- load runs ------------------------------------------------------------------

    def loadgen_run(self, mode: str, port: int, conc: int, seconds: float) -> dict[str, float]:
        count = self.settings.count * (10 if mode == "udp" else 1)
        argv = [self.loadgen, mode, "-p", str(port), "-c", str(conc), "-t", str(seconds),
                "-n", str(count), "-s", str(PAYLOAD)]
        if mode == "bulk":
            argv += ["-m", str(self.settings.bulk_mb)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
        if done.returncode != 0:  # counted as a failed run; the report shows the errors
            print(f"loadgen {' '.join(argv[1:])}: {done.stderr.strip()}", file=sys.stderr)
            return {key: 0.0 for key in ("started", "done", "timeouts", "elapsed_s", "rate",
                                         "p50_ms", "p99_ms", "mb_s", "cpu_s")} | {"errors": 1.0}
        result: dict[str, float] = json.loads(done.stdout)
        return result

    def plan_of(self, table: str) -> list[tuple[str, int, float]]:
        """(loadgen mode, concurrency, seconds) of every measurement in a table."""
        s = self.settings
        if table in ("exec", "echo"):
            return [("tcp-short", c, s.tcp_s) for c in CONCURRENCY]
        if table.startswith("udp"):
            return [("udp", w, s.udp_s) for w in UDP_WINDOWS]
        return [("bulk", 1, s.bulk_s)]

    def measure(self, target: Target, mode: str, conc: int, seconds: float,
                split_cpu: bool = False) -> None:
        """One load run against one target; for netd, its RSS peak at c=128 and, when
        `split_cpu`, the CPU each of its processes used."""
        server = target.server
        sampler = split = None
        if server is self.netd and server.main_pid and conc == max(CONCURRENCY):
            sampler = RssSampler(server.main_pid)
        if split_cpu and isinstance(server, Netd) and server.main_pid:
            split = CpuSplit(server.main_pid)
        try:
            result = self.loadgen_run(mode, target.port, conc, seconds)
        finally:
            if sampler is not None:
                self.peak_rss_mb = max(self.peak_rss_mb, sampler.stop())
        if split is not None and isinstance(server, Netd):
            spent = split.stop()
            roles = server.roles(list(spent))
            for role in ROLES:
                result[f"{role}_cpu_s"] = sum(s for p, s in spent.items() if roles[p] == role)
                result[f"{role}s"] = sum(1 for p in spent if roles[p] == role)
            result["netd_cpu_s"] = sum(spent.values())
            serving = server.holders(target.port, "udp" if mode == "udp" else "tcp")
            result["serving_cpu_s"] = sum(spent.get(p, 0.0) for p in serving)
        target.results.setdefault(conc, []).append(result)
        if mode != "udp":
            target.connections += int(result.get("started", 0))
        time.sleep(0.05)

    def targets(self) -> list[Target]:
        found = [t for server in self.servers for t in server.targets if t.table in TABLES]
        return sorted(found, key=lambda t: TABLES.index(t.table))

    def run_tables(self) -> None:
        """Every table, interleaved: for each table and concurrency, round after round of
        all its servers back to back, so that compared figures are taken seconds apart
        and a passing disturbance hits every server alike."""
        s = self.settings
        if self.netd is not None and self.netd.main_pid:
            self.measure_idle(self.netd.main_pid, "main config")
        for target in self.targets():
            if target.table in ("exec", "echo"):
                warm = self.loadgen_run("tcp-short", target.port, 16, s.warmup_s)
                target.connections += int(warm.get("started", 0))
        for table in TABLES:
            group = [t for t in self.targets() if t.table == table]
            progress(f"{table}: {len(group)} servers")
            for mode, conc, seconds in self.plan_of(table):
                for _ in range(s.runs):
                    for target in group:
                        self.measure(target, mode, conc, seconds,
                                     split_cpu=target.is_netd and conc == 16)
        for server in self.servers:
            if server.proc is not None and server.proc.poll() is not None:
                self.notes.append(f"{server.name} exited during the run (status "
                                  f"{server.proc.returncode}); its later figures are "
                                  f"failures{server.last_words()}")

    def finish_tables(self) -> None:
        """netd's figures that need it still running, then every server of the tables
        stopped (netd before its logsink, which then says how many lines it read)."""
        netd = self.netd
        if netd is not None and netd.main_pid and netd.proc and netd.proc.poll() is None:
            self.figures["RSS peak during the c=128 runs, main config"] = fmt_mb(self.peak_rss_mb)
            self.figures["RSS after the load, idle again, main config"] = fmt_mb(
                rss_mb(netd.main_pid))
            time.sleep(0.5)  # the spawners' last reports reach the supervisor
            self.refusals(netd, "main config")
        self.stop_all()
        if netd is not None:
            connections = sum(t.connections for t in netd.targets)
            # An exec or inline connection is an accept and an exit (or close) line; a
            # workers one only its accept line.
            expected = sum(t.connections * (1 if t.port in netd.workers_ports else 2)
                           for t in netd.targets)
            lines = netd.log_lines
            self.figures["log lines read by logsink, main config: per TCP connection; of the "
                         "lines expected (2 per exec or inline connection, 1 per workers "
                         "one)"] = ("n/a (logsink did not say)" if lines is None else
                                    f"{lines:,} for {connections:,} connections: "
                                    f"{lines / max(connections, 1):.2f} per connection; "
                                    f"{lines / max(expected, 1):.1%} of {expected:,}")

    def refusals(self, netd: Netd, label: str) -> None:
        refused = netd.refused()
        self.figures[f"connections refused (default limits), {label}"] = (
            "n/a (no status)" if refused is None else str(refused))

    def measure_idle(self, pid: int, label: str) -> None:
        """Wake-ups and CPU ticks of the supervisor over idle_s seconds with no traffic."""
        time.sleep(0.3)
        w0, c0 = wakeups(pid), cpu_ticks(pid)
        time.sleep(self.settings.idle_s)
        w1, c1 = wakeups(pid), cpu_ticks(pid)
        idle = f"{self.settings.idle_s:g}s idle"
        self.figures[f"wake-ups in {idle}, {label}"] = str(w1 - w0)
        self.figures[f"CPU ticks in {idle}, {label}"] = str(c1 - c0)

    # -- netd alone, with many services -------------------------------------------------

    @contextlib.contextmanager
    def running(self, *netds: Netd) -> Iterator[bool]:
        """Start these netds and note their idle RSS; yields whether they all started
        (a note says why not); always stops them."""
        try:
            started = True
            for netd in netds:
                try:
                    netd.start()
                except RuntimeError as e:
                    self.notes.append(f"{netd.name} did not start: {e}")
                    started = False
                    break
            if started:
                time.sleep(0.5)  # its spawners and workers settle
                for netd in netds:
                    assert netd.main_pid is not None
                    netd.idle_rss_mb = rss_mb(netd.main_pid)
            yield started
        finally:
            for netd in netds:
                netd.stop()

    def udp_services(self) -> None:
        """Issue 9: CPU per UDP datagram of netd's processes with 1 service, and with the
        same service among 300 (299 idle, of every kind, all of one identity, so that
        the spawner that answers also holds every other socket)."""
        progress("udp: 1 and 300 services")
        one_port, many_port = free_port(both=True), free_port(both=True)
        echo = "echo: {{listen: 'udp://127.0.0.1:{}', builtin: echo}}\n"
        one = Netd("netd-1", self.workdir, echo.format(one_port), self.logsink)
        many = Netd("netd-300", self.workdir, echo.format(many_port) + fillers(299, [None]),
                    self.logsink)
        pair = (one.add("udp-scale", "netd, 1 service", one_port, is_netd=True),
                many.add("udp-scale", "netd, 300 services", many_port, is_netd=True))
        with self.running(one, many) as ok:
            if not ok:
                return
            self.rss["1 service (UDP echo)"] = one.idle_rss_mb
            self.rss["300 services (UDP echo + 299 idle)"] = many.idle_rss_mb
            for mode, window, seconds in self.plan_of("udp-scale"):
                for _ in range(self.settings.runs):
                    for target in pair:
                        self.measure(target, mode, window, seconds, split_cpu=True)
            self.udp_scale = pair

    def hundred_services(self) -> None:
        """netd with 100 services (echo, exec cat, daytime): idle RSS and wake-ups."""
        kinds = ["builtin: echo", "exec: [/bin/cat]", "builtin: daytime"]
        ports = [free_port() for _ in range(100)]
        body = "".join(f"s{i}: {{listen: 'tcp://127.0.0.1:{port}', {kinds[i % 3]}}}\n"
                       for i, port in enumerate(ports))
        netd = Netd("netd-100", self.workdir, body, self.logsink)
        netd.add("probe", "s0", ports[0])
        with self.running(netd) as ok:
            if ok:
                assert netd.main_pid is not None
                self.rss["100 services (echo, exec cat, daytime)"] = netd.idle_rss_mb
                self.measure_idle(netd.main_pid, "100 services")

    def thousand_services(self) -> None:
        """Issue 13: a config of 1,000 services, checked, then reloaded under load."""
        progress("1,000 services: check and reload")
        users = identities(is_root())
        config = ThousandServices(users)
        netd = Netd("netd-1000", self.workdir, config.body(0), self.logsink)
        for name, port in config.probes.items():
            netd.add("probe", name, port)
        figures = ReloadFigures(users)
        with self.running(netd) as ok:
            if not ok:
                return
            self.check_s, self.check_error = measure_check(str(netd.config),
                                                           self.settings.checks)
            figures.rss_before_mb = netd.idle_rss_mb
            measure_reload(netd, config, self.settings.reloads, self.settings.settle_s, figures)
            assert netd.main_pid is not None
            time.sleep(0.5)
            figures.rss_after_mb = rss_mb(netd.main_pid)
            figures.refused = netd.refused()
            self.rss["1,000 services (before the reloads)"] = figures.rss_before_mb
            self.rss["1,000 services (after the reloads)"] = figures.rss_after_mb
            self.figures["connections refused (default limits), 1,000 services"] = (
                "n/a (no status)" if figures.refused is None else str(figures.refused))
        self.reload = figures

    # -- the report -----------------------------------------------------------------

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
            out += [f"### {title}\n", *load_table(table, targets, skipped)]
            ratios = ratio_table(table, targets)
            out += ["", *ratios] if ratios else []
            out.append("")
        mine = [t for t in self.targets() if t.is_netd]
        if cpu := cpu_table(mine):
            out += ["### CPU of each netd process per connection (per datagram for UDP) at "
                    "c=16\n", *cpu, "",
                    "Supervisor, spawners (one per identity) and prefork workers, measured "
                    "during the c=16 runs of the tables above; the programs they start "
                    "(/bin/cat) are not counted, as for the peers. The last column is the part "
                    "of it spent by the process(es) holding the service's socket.", ""]
        if self.udp_scale is not None:
            out += ["### CPU per UDP datagram with 1 and with 300 services (issue 9)\n",
                    *udp_scale_table(*self.udp_scale), "",
                    "The same UDP builtin echo alone, and among 299 idle services (TCP echo, "
                    "TCP daytime, exec /bin/cat, UDP daytime) of the same identity, so that "
                    "the spawner that answers holds all 300 sockets. A cost per wake-up "
                    "proportional to the number of services shows as a ratio over 1, most at "
                    "window 1 (one datagram per wake-up).", ""]
        if self.reload is not None:
            users = ", ".join(u or "netd's own user" for u in self.reload.users)
            out += ["### Reload of 1,000 services (issue 13)\n",
                    *markdown(["figure", "value"], reload_rows(self.reload)), "",
                    f"1,000 services over {len(self.reload.users)} users ({users}): TCP "
                    "echo, TCP daytime, exec /bin/cat, UDP daytime. One thread per probe "
                    "connects in a loop (64 B echo, then close; 1 ms apart) to an unchanged "
                    "builtin echo: probe-same has the user of the service each reload "
                    "changes (its spawner is replaced), probe-other another user. "
                    f"{self.settings.reloads} reloads, `netd reload` and SIGHUP in turn, "
                    f"{self.settings.settle_s:g} s apart; a wait is from connect() to the "
                    "echo received.", ""]
        out += ["### netd supervisor (main process) and netd as deployed\n"]
        rows = [[k, v] for k, v in self.figures.items()]
        rows += [[f"RSS idle, {config}", fmt_mb(mb)] for config, mb in self.rss.items()]
        if self.check_s or self.check_error:
            rows.append([f"`netd check` of 1,000 services, wall time: median (min, max) of "
                         f"{len(self.check_s)}", self.check_error or
                         f"{statistics.median(self.check_s):.3f} s ({min(self.check_s):.3f}, "
                         f"{max(self.check_s):.3f})"])
        out += markdown(["figure", "value"], rows)
        others = [s for s in self.servers if s.name not in ("netd", "cecho") and s.idle_rss_mb]
        if others:
            out.append("\nIdle RSS of the peers' main process: " + ", ".join(
                f"{s.name} {fmt_mb(s.idle_rss_mb)}" for s in others) + ".")
        out.append("")
        out += [f"**Note:** {note}\n" for note in self.notes]
        out += self.targets_table()
        out += self.loadgen_headroom()
        return "\n".join(out)

    def find(self, label_start: str, table: str) -> Target | None:
        return next((t for t in self.targets()
                     if t.table == table and t.label.startswith(label_start)), None)

    def targets_table(self) -> list[str]:
        """Issue 13's targets, each with the measured figure and met or missed by how much."""
        rows: list[list[str]] = []

        def ratio_row(what: str, mine: Target | None, peer: Target | None, conc: int,
                      want: float) -> None:
            value = paired_ratio(mine, peer, conc) if mine and peer else None
            rows.append([what, *at_least(value, want, "{:.2f}x")])

        tcpserver = self.find("tcpserver", "exec")
        xinetd = self.find("xinetd internal echo", "echo")
        for who in ("root", "nobody"):
            mine = self.find(f"netd exec /bin/cat, user: {who}", "exec")
            ratio_row(f"exec /bin/cat c=16, user: {who}: >= 1.2x tcpserver", mine, tcpserver,
                      16, 1.2)
        for who in ("root", "nobody"):
            mine = self.find(f"netd exec /bin/cat, user: {who}", "exec")
            count = float(errors(mine, 128)) if mine and mine.results.get(128) else None
            rows.append([f"exec /bin/cat c=128, user: {who}: no errors",
                         *at_most(count, 0, "{:.0f}")])
        ratio_row("builtin echo, no mode keys, c=16: >= 1.0x xinetd internal echo",
                  self.find("netd builtin echo (no mode", "echo"), xinetd, 16, 1.0)
        ratio_row("builtin echo, workers: 2, c=16: >= 3x xinetd internal echo",
                  self.find("netd builtin echo, workers", "echo"), xinetd, 16, 3.0)
        ratio_row("python asyncio echo, workers: 2, c=16: >= 3x xinetd internal echo",
                  self.find("netd python async echo", "echo"), xinetd, 16, 3.0)
        ratio_row("UDP builtin echo, window 16: >= 0.9x the Python recvfrom/sendto loop",
                  self.find("netd builtin echo", "udp"),
                  self.find("Python recvfrom", "udp"), 16, 0.9)
        longest = self.reload.longest_ms if self.reload else None
        rows.append(["reload of 1,000 services: no connection to an unchanged service "
                     "waits > 50 ms", *at_most(longest, 50, "{:.1f} ms")])
        rows.append(["`netd check` of 1,000 services < 0.25 s (median)",
                     *at_most(median_of(self.check_s), 0.25, "{:.3f} s", strict=True)])
        for config, mb in self.rss.items():
            rows.append([f"supervisor RSS idle < 25 MB: {config}",
                         *at_most(mb, RSS_TARGET_MB, "{:.1f} MB", strict=True)])
        refused = [v for k, v in self.figures.items() if k.startswith("connections refused")]
        counts = [int(v) for v in refused if v.isdigit()]
        rows.append(["default limits in force: no connection refused",
                     *at_most(float(sum(counts)) if counts else None, 0, "{:.0f}")])
        return ["### Targets (issue 13)\n", *markdown(["target", "measured", ""], rows), ""]

    def loadgen_headroom(self) -> list[str]:
        ceiling = self.find("C epoll echo", "echo")
        if ceiling is None:
            return []
        best = max((median(t, c, "rate") for t in self.targets()
                    if t.table in ("exec", "echo") and not t.ceiling for c in CONCURRENCY),
                   default=0.0)
        rates = ", ".join(f"{median(ceiling, c, 'rate'):,.0f}" for c in CONCURRENCY)
        cpu = min(1.0, median_of(r["cpu_s"] / max(r["elapsed_s"], 1e-9)
                                 for r in ceiling.results.get(16, [])) or 0.0)
        return [
            "### Is the load generator the bottleneck?\n",
            f"Against the C epoll echo server the same load generator makes {rates} short "
            f"connections/s at c={', '.join(map(str, CONCURRENCY))} (using {100 * cpu:.0f}% of "
            f"one core at c=16); the fastest super-server above makes {best:,.0f}/s, "
            f"{best / max(median(ceiling, 16, 'rate'), 1):.0%} of that ceiling.",
            "",
        ]

    def raw(self) -> dict[str, object]:
        """Every raw result, for --json."""
        targets = self.targets() + (list(self.udp_scale) if self.udp_scale else [])
        return {"results": [{"table": t.table, "label": t.label, "results": t.results}
                            for t in targets],
                "netd": self.figures, "rss_idle_mb": self.rss, "check_s": self.check_s,
                "reload": dataclasses.asdict(self.reload) if self.reload else None,
                "skipped": [dataclasses.asdict(s) for s in self.skipped]}


def fmt_mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} MB"


def progress(what: str) -> None:
    print(f"{what} ...", file=sys.stderr, flush=True)


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), "unknown CPU")
    return (f"{os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}, "
            f"Python {platform.python_version()}, {'root' if is_root() else 'not root'}")


def raise_nofile() -> int:
    """The open-files limit netd gets under its systemd unit (as far as the hard limit
    allows): the 1,000-service config needs more than the usual 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE if hard == resource.RLIM_INFINITY else min(NOFILE, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def parser() -> argparse.ArgumentParser:
    """The command line: --quick, --runs, --json."""
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round (about a minute)")
    parser.add_argument("--runs", type=int, help="rounds (the median is reported)")
    parser.add_argument("--json", type=Path, help="also write every raw result here")
    return parser


def main() -> int:
    """Run the whole benchmark and print the report."""
    args = parser().parse_args()
    ensure_venv(__file__)
    settings = dataclasses.replace(QUICK if args.quick else FULL)
    if args.runs:
        settings.runs = args.runs
    started = time.monotonic()
    load_before = os.getloadavg()
    nofile = raise_nofile()
    with tempfile.TemporaryDirectory(prefix="netd-bench-") as tmp:
        bench = Bench(settings, Path(tmp))
        try:
            bench.plan()
            bench.start_all()
            bench.run_tables()
            bench.finish_tables()
            bench.udp_services()
            bench.hundred_services()
            bench.thousand_services()
        finally:
            bench.stop_all()
    command = "python3 bench/run.py" + (" --quick" if args.quick else "") + (
        f" --runs {args.runs}" if args.runs else "")
    load_after = os.getloadavg()
    print(f"## netd benchmark, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}\n")
    print(f"Machine: {machine()}.  ")
    print(f"Command: `{command}` ({settings.runs} round(s), median reported; "
          f"{time.monotonic() - started:.0f}s). netd logs every connection to a syslog "
          "socket read by bench/logsink.c; no `limits:` keys (the default limits hold); "
          f"open files limit {nofile}. Load average (1, 5, 15 min) "
          f"{' '.join(f'{x:.2f}' for x in load_before)} before, "
          f"{' '.join(f'{x:.2f}' for x in load_after)} after (the bench itself adds about "
          "1.5).\n")
    print("Ratios netd/peer are the median of per-round ratios, each pair measured seconds "
          "apart.\n")
    print(bench.report())
    if args.json:
        args.json.write_text(json.dumps(bench.raw(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
