"""netd with many services: the configs, the reload under load and `netd check`.

The 300-service config shows whether the work per wake-up grows with the number of
services (issue 9); the 1,000-service config is issue 13's reload and check.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field

from servers import Netd, free_port, netd_command

# Idle services that fill a config: (protocol, handler), in turn.
FILLERS = (("tcp", "builtin: echo"), ("tcp", "builtin: daytime"), ("tcp", "exec: [/bin/cat]"),
           ("udp", "builtin: daytime"))
PROBE_PAUSE_S = 0.001      # between two connections of a prober
PROBE_TIMEOUT_S = 5.0      # a connection that takes longer is a failure
PROBE_MAX = 200_000        # connections per prober, at most
RELOAD_TIMEOUT_S = 60.0
PAYLOAD = b"x" * 64
SLOW_S = 0.050             # issue 13: no connection to an unchanged service waits longer


def service(name: str, proto: str, handler: str, user: str | None = None) -> str:
    """One line of a `services:` mapping on a fresh loopback port."""
    port = free_port(both=proto == "udp")
    who = f", user: {user}" if user else ""
    return f"{name}: {{listen: '{proto}://127.0.0.1:{port}', {handler}{who}}}\n"


def fillers(count: int, users: list[str | None]) -> str:
    """`count` idle services, cycling through FILLERS and `users`."""
    lines = []
    for i in range(count):
        proto, handler = FILLERS[i % len(FILLERS)]
        lines.append(service(f"idle{i}", proto, handler, users[i % len(users)]))
    return "".join(lines)


def identities(root: bool) -> list[str | None]:
    """The users the many-service configs spread services over: several as root (those
    of nobody, daemon, bin and root that exist), else netd's own user only."""
    if not root:
        return [None]
    found: list[str | None] = []
    for name in ("nobody", "daemon", "bin", "root"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        found.append(name)
    return found or [None]


def port_of(line: str) -> int:
    """The port of a line made by `service`."""
    return int(line.split("127.0.0.1:", 1)[1].split("'", 1)[0])


class ThousandServices:
    """The 1,000-service config: `edited` changes at each reload; `probe-same` (same user
    as `edited`, so served by the spawner its change replaces) and `probe-other` (another
    user) do not; 997 idle services of every kind, over several users."""

    COUNT = 1000

    def __init__(self, users: list[str | None]) -> None:
        self.users = users
        self.edited_user = users[0]
        same = service("probe-same", "tcp", "builtin: echo", users[0])
        other = service("probe-other", "tcp", "builtin: echo", users[1 % len(users)])
        self.probes = {"probe-same": port_of(same), "probe-other": port_of(other)}
        self.edited_line = service("edited", "tcp", "exec: [/bin/cat], env: {GENERATION: 'N'}",
                                   users[0])
        self.rest = same + other + fillers(self.COUNT - 3, users)

    def body(self, generation: int) -> str:
        """The services, with `edited`'s environment at this generation."""
        return self.edited_line.replace("'N'", f"'{generation}'") + self.rest


class Prober(threading.Thread):
    """Connects to a port in a loop, one 64 B echo per connection, keeping each wait
    (connect to echo received); bounded by PROBE_MAX connections and `until_s`."""

    def __init__(self, port: int, until_s: float) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.until_s = until_s
        self.done = threading.Event()
        self.waits: list[tuple[float, float]] = []   # (started, seconds)
        self.failures: list[float] = []              # started

    def run(self) -> None:
        while (not self.done.is_set() and time.monotonic() < self.until_s
               and len(self.waits) + len(self.failures) < PROBE_MAX):
            started = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", self.port), PROBE_TIMEOUT_S) as s:
                    s.sendall(PAYLOAD)
                    got = b""
                    while len(got) < len(PAYLOAD):
                        chunk = s.recv(len(PAYLOAD) - len(got))
                        if not chunk:
                            raise OSError("closed before the echo")
                        got += chunk
            except OSError:
                self.failures.append(started)
            else:
                self.waits.append((started, time.monotonic() - started))
            self.done.wait(PROBE_PAUSE_S)

    def finish(self) -> None:
        """Stop and wait for the thread (bounded by one connection's timeout)."""
        self.done.set()
        self.join(PROBE_TIMEOUT_S + 1)


@dataclass
class Reload:
    """One reload: how it was asked for, how long it took, what netd said."""

    how: str          # "netd reload" or "SIGHUP"
    seconds: float
    outcome: str
    began_s: float    # monotonic


@dataclass
class ReloadFigures:
    """Issue 13's reload of 1,000 services: every reload, and every probe connection."""

    users: list[str | None]
    reloads: list[Reload] = field(default_factory=list)
    waits: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # (started, s)
    failures: dict[str, list[float]] = field(default_factory=dict)             # started
    ended_s: float = 0.0
    rss_before_mb: float | None = None
    rss_after_mb: float | None = None
    refused: int | None = None

    def between(self, probe: str, began_s: float, ended_s: float) -> list[float]:
        """The waits of the probe's connections started in [began_s, ended_s)."""
        return [w for s, w in self.waits.get(probe, []) if began_s <= s < ended_s]

    def during(self, probe: str) -> list[float]:
        """The waits from the first reload on (until the probes stopped)."""
        began = self.reloads[0].began_s if self.reloads else self.ended_s
        return self.between(probe, began, float("inf"))

    def before(self, probe: str) -> list[float]:
        """The waits before the first reload: the baseline."""
        began = self.reloads[0].began_s if self.reloads else self.ended_s
        return self.between(probe, 0.0, began)

    @property
    def longest_ms(self) -> float | None:
        """The longest wait of a connection to an unchanged service during the reloads."""
        found = [max(d) for d in (self.during(p) for p in self.waits) if d]
        return 1000 * max(found) if found else None


def reload_by_command(netd: Netd) -> tuple[float, str]:
    """`netd reload -c CONFIG`: (its wall time, its output)."""
    started = time.monotonic()
    done = subprocess.run([*netd_command(), "reload", "-c", str(netd.config)],
                          capture_output=True, text=True, timeout=RELOAD_TIMEOUT_S,
                          env=netd.env)
    seconds = time.monotonic() - started
    said = (done.stdout.strip() or done.stderr.strip()).splitlines()
    return seconds, (said[-1] if said else f"exit {done.returncode}")[:200]


def reload_by_signal(netd: Netd) -> tuple[float, str]:
    """SIGHUP: (seconds until netd's status shows the reload done, its outcome)."""
    assert netd.main_pid is not None
    sent = time.time()
    os.kill(netd.main_pid, signal.SIGHUP)
    deadline = time.monotonic() + RELOAD_TIMEOUT_S
    while time.monotonic() < deadline:
        time.sleep(0.02)
        try:
            last = netd.request("status", RELOAD_TIMEOUT_S)["daemon"].get("last_reload")
        except (OSError, ValueError, KeyError):
            continue
        if last and last.get("time", 0) >= sent:
            changes = ", ".join(f"{k} {','.join(last[k])}" for k in ("added", "changed",
                                                                    "removed") if last.get(k))
            outcome = f"ok ({changes or 'no changes'})" if last.get("ok") else \
                f"error: {last.get('error')}"
            return float(last["time"]) - sent, outcome[:200]
    return RELOAD_TIMEOUT_S, "no reload seen in status"


def measure_reload(netd: Netd, config: ThousandServices, reloads: int, settle_s: float,
                   figures: ReloadFigures) -> None:
    """Probe both unchanged services while `edited` is changed and netd reloaded
    `reloads` times, by `netd reload` and SIGHUP in turn, `settle_s` apart."""
    until = time.monotonic() + 2 * settle_s + reloads * (RELOAD_TIMEOUT_S + settle_s)
    probers = {name: Prober(port, until) for name, port in config.probes.items()}
    for prober in probers.values():
        prober.start()
    time.sleep(settle_s)
    try:
        for generation in range(1, reloads + 1):
            netd.write(config.body(generation))
            began = time.monotonic()
            how = "netd reload" if generation % 2 else "SIGHUP"
            seconds, outcome = (reload_by_command if generation % 2 else reload_by_signal)(netd)
            figures.reloads.append(Reload(how, seconds, outcome, began))
            time.sleep(settle_s)
    finally:
        figures.ended_s = time.monotonic()
        for prober in probers.values():
            prober.finish()
    for name, prober in probers.items():
        figures.waits[name] = prober.waits
        figures.failures[name] = prober.failures


def measure_check(config: str, runs: int) -> tuple[list[float], str]:
    """Wall times of `netd check -c CONFIG`, `runs` times; and its error, if it failed."""
    times = []
    for _ in range(runs):
        started = time.monotonic()
        done = subprocess.run([*netd_command(), "check", "-c", config], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, timeout=RELOAD_TIMEOUT_S)
        if done.returncode != 0:
            return times, (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[0]
        times.append(time.monotonic() - started)
    return times, ""


def reload_rows(figures: ReloadFigures) -> list[list[str]]:
    """The reload table's rows: each probe's waits, then each reload with the longest
    wait of each probe from its start to the next one's."""
    rows = []
    began = figures.reloads[0].began_s if figures.reloads else figures.ended_s
    for name in figures.waits:
        during, before = figures.during(name), figures.before(name)
        failed = sum(1 for s in figures.failures.get(name, []) if s >= began)
        rows.append([f"{name}: connections during the reloads (failed)",
                     f"{len(during):,} ({failed})"])
        if during:
            p99 = sorted(during)[int(0.99 * (len(during) - 1))]
            slow = sum(1 for w in during if w > SLOW_S)
            rows.append([f"{name}: longest wait during the reloads (p99, median; waits over "
                         f"{1000 * SLOW_S:.0f} ms)",
                         f"{1000 * max(during):.1f} ms ({1000 * p99:.1f}, "
                         f"{1000 * statistics.median(during):.2f} ms; {slow})"])
        if before:
            rows.append([f"{name}: longest wait before the first reload "
                         f"({len(before):,} connections)", f"{1000 * max(before):.1f} ms"])
    for i, reload in enumerate(figures.reloads):
        until = (figures.reloads[i + 1].began_s if i + 1 < len(figures.reloads)
                 else float("inf"))
        longest = ", ".join(
            f"{name} {1000 * max(waits):.1f} ms" for name in figures.waits
            if (waits := figures.between(name, reload.began_s, until)))
        rows.append([f"reload {i + 1} ({reload.how}): how long it took; each probe's longest "
                     "wait from it to the next; what netd said",
                     f"{reload.seconds:.2f} s; {longest or 'no connection'}; {reload.outcome}"])
    for how, what in (("netd reload", "`netd reload` command, wall time (it checks the "
                       "file first)"), ("SIGHUP", "SIGHUP until netd's status shows it "
                                        "applied")):
        took = [r.seconds for r in figures.reloads if r.how == how]
        if took:
            rows.append([f"{what}: median (max) of {len(took)}",
                         f"{statistics.median(took):.2f} s ({max(took):.2f} s)"])
    return rows
