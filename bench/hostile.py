"""How fast netd serves one service while another is attacked: probe latency figures.

    python bench/hostile.py [--quick]

Starts one netd (its log going to a syslog socket read by bench/logsink.c, as in
production)
with a probe service (builtin daytime), an exec service held full at `instances: 5`,
a PROXY-protocol service and an echo service with a 1 s idle timeout. A prober connects
to the probe every 20 ms and times each answer: first with netd idle (the baseline),
then during each attack in turn:

- flood: connections from 8 threads to the full exec service, each refused;
- slowloris: idle connections to echo and to the PROXY service, held until netd
  closes them;
- proxy-garbage: random bytes instead of a PROXY header, from 16 threads.

It prints, per attack, the probes answered, the median and worst latency and the
worst as a multiple of the idle median. tests/test_hostile.py drives the same attacks
and asserts behaviour only (every probe answered, nothing dropped, no leak).
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bootstrap import ensure_venv
from servers import Netd, build, free_port

PROBE_EVERY_S = 0.02
IO_TIMEOUT_S = 10.0


class Prober:
    """Connects to the probe port every 20 ms from a thread; keeps each latency."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.latencies: list[float] = []
        self.failures = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            started = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", self.port), IO_TIMEOUT_S) as s:
                    while s.recv(256):
                        pass
                self.latencies.append(time.monotonic() - started)
            except OSError:
                self.failures += 1
            self.done.wait(PROBE_EVERY_S)

    def stop(self) -> Prober:
        self.done.set()
        self.thread.join(IO_TIMEOUT_S)
        return self


def closed(s: socket.socket) -> None:
    """Read until netd closes the connection (or the timeout)."""
    try:
        while s.recv(65536):
            pass
    except OSError:
        pass


def flood(port: int, count: int) -> None:
    def one(n: int) -> None:
        for _ in range(n):
            with socket.create_connection(("127.0.0.1", port), IO_TIMEOUT_S) as s:
                closed(s)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, [count // 8] * 8))


def slowloris(ports: list[int], count: int) -> None:
    idle = [socket.create_connection(("127.0.0.1", port), IO_TIMEOUT_S)
            for port in ports for _ in range(count)]
    for s in idle:
        closed(s)
        s.close()


def proxy_garbage(port: int, count: int) -> None:
    rng = random.Random(10)
    payloads = [rng.randbytes(rng.randrange(1, 300)) for _ in range(count)]

    def one(data: bytes) -> None:
        with socket.create_connection(("127.0.0.1", port), IO_TIMEOUT_S) as s:
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            closed(s)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, payloads))


def held(port: int, count: int) -> list[socket.socket]:
    """Fill the exec service's instances with children that wait for a line."""
    conns = [socket.create_connection(("127.0.0.1", port), IO_TIMEOUT_S) for _ in range(count)]
    for s in conns:
        s.recv(3)
    return conns


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small attacks (a few seconds)")
    args = parser.parse_args()
    scale = 0.1 if args.quick else 1.0
    ensure_venv(__file__)
    ports = {name: free_port() for name in ("probe", "held", "pp", "echo")}
    with tempfile.TemporaryDirectory(prefix="netd-hostile-") as tmp:
        netd = Netd("netd", Path(tmp), f"""\
probe: {{listen: 'tcp://127.0.0.1:{ports['probe']}', builtin: daytime}}
held:
  listen: tcp://127.0.0.1:{ports['held']}
  exec: [/bin/sh, -c, 'echo up; read x']
  limits: {{instances: 5}}
pp:
  listen: tcp://127.0.0.1:{ports['pp']}
  exec: [/bin/cat]
  proxy_protocol: {{from: [127.0.0.1], timeout: 1s}}
echo: {{listen: 'tcp://127.0.0.1:{ports['echo']}', builtin: echo, timeout: 1s}}
""", build("logsink"))
        netd.add("probe", "probe", ports["probe"])
        try:
            netd.start()
            holders = held(ports["held"], 5)
            attacks: list[tuple[str, Callable[[], None]]] = [
                ("idle", lambda: time.sleep(max(0.5, 2 * scale))),
                ("flood", lambda: flood(ports["held"], int(2000 * scale))),
                ("slowloris", lambda: slowloris([ports["echo"], ports["pp"]],
                                                int(200 * scale))),
                ("proxy-garbage", lambda: proxy_garbage(ports["pp"], int(2000 * scale))),
            ]
            rows = []
            for name, attack in attacks:
                prober = Prober(ports["probe"])
                attack()
                rows.append((name, prober.stop()))
            for s in holders:
                s.close()
            refused = netd.refused()
        finally:
            netd.stop()
    base = statistics.median(rows[0][1].latencies or [float("nan")])
    print(f"netd (pid {netd.main_pid}) probe latency, one probe every {PROBE_EVERY_S * 1000:.0f} ms"
          f"{' (--quick)' if args.quick else ''}; {os.cpu_count()} CPUs\n")
    print(f"netd refused {refused} connections and logged {netd.log_lines} lines in all.\n")
    print("| attack | probes | failed | median ms | worst ms | worst / idle median |")
    print("|---|---|---|---|---|---|")
    for name, prober in rows:
        lat = prober.latencies
        if not lat:
            print(f"| {name} | 0 | {prober.failures} | - | - | - |")
            continue
        print(f"| {name} | {len(lat)} | {prober.failures} | "
              f"{statistics.median(lat) * 1000:.1f} | {max(lat) * 1000:.1f} | "
              f"{max(lat) / base:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
