"""The supervisor: the one long-lived process that owns the config and the sockets.

It binds (or adopts) every listening socket, forks a spawner per identity
(netd.spawner) and the prefork workers of `workers:` services (netd.worker_pool), and
they serve the sockets: the supervisor does no work per connection. Its loop
(netd.loop) watches the signal wake-up socket, the control socket, the metrics
endpoint (netd.scrape, when the config names one) and its spawners' reports; its
timers are systemd's watchdog, the stop deadline and the restart of a spawner that
died.

Signal handlers only let Python write the signal's number to the wake-up socket; the
loop does the work: SIGCHLD reaps, SIGHUP reloads, SIGTERM and SIGINT stop. A reload
keeps the sockets of every address still configured, and replaces only the spawners
and workers whose services changed; the old ones finish what they serve and leave.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any

from netd import __version__
from netd.children import ChildPool
from netd.config import Address, Config, ConfigError, Service
from netd.config.model import Identity
from netd.control import ControlServer
from netd.listener import Listener
from netd.logs import Log
from netd.loop import EventLoop, Timer
from netd.peer import describe
from netd.reaper import log_exit
from netd.scrape import MetricsEndpoint, Render
from netd.sockets import bind, set_file_owner, tune
from netd.spawn import (
    become_subreaper,
    exited_children,
    give_back_memory,
    load_config_apart,
    signal_group,
)
from netd.spawners import Counts, Group, Spawners
from netd.systemd import Notifier, adopt
from netd.worker_pool import WorkerPool

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
STATUS_EVERY_S = 1.0       # systemd's STATUS= line, at most this often


@dataclass(eq=False)
class Record:
    """A configured service as the supervisor knows it: its sockets and which version
    of its config runs; a removed service is kept (draining) until its children end."""

    service: Service
    listeners: list[Listener]
    draining: bool = False
    generation: int = 0


class Supervisor:
    """Owns the sockets and helpers of one config; `run()` serves until stopped."""

    def __init__(self, config: Config, log: Log, notifier: Notifier | None = None,
                 passed: dict[int, str] | None = None) -> None:
        self.config = config
        self.log = log
        self.notifier = notifier or Notifier()
        self.notifier.log = log  # it says when the service manager stops reading
        self.loop = EventLoop()
        self.records: dict[str, Record] = {}
        self.spawners = Spawners(self.loop, log, self._status_soon)
        self.pools: dict[str, WorkerPool] = {}
        self.workers_by_pid: dict[int, WorkerPool] = {}
        self.pool = ChildPool(config.daemon.max_children)
        self.control = ControlServer(self.loop, config.daemon.control, log, self.answer)
        self.metrics = MetricsEndpoint(self.loop, log)
        self.render_metrics: Render | None = None  # made once the config asks for metrics
        self.reloads = {"ok": 0, "error": 0}
        self.stopping: str | None = None
        self.kill_rounds = 0
        self.status_at: Timer | None = None
        self.started_s = time.monotonic()
        self.started_wall = time.time()
        self.last_reload: dict[str, Any] | None = None
        self.passed_names = dict(passed or {})
        self.passed = {fd: socket.socket(fileno=fd) for fd in self.passed_names}
        # Programs a dead spawner leaves behind become our children, so that they
        # are still reaped and logged.
        become_subreaper()

    # -- start-up and reload ----------------------------------------------------------

    def bind_all(self) -> None:
        """Bind (or adopt) every service's sockets and the control socket, and start
        the spawners and workers; raises OSError with nothing left bound when one fails."""
        self.log.event("start", version=__version__, pid=os.getpid(), config=self.config.path)
        # Before anyone is told we are ready: a SIGHUP or SIGTERM right after must wait
        # in the wake-up socket for the loop, not kill us with its default action.
        self.loop.on_signals(HANDLED_SIGNALS, self._signals)
        try:
            self.apply(self.config)
            self.control.open()
        except OSError:
            self.close_all()
            raise
        for fd, sock in self.passed.items():
            self.log.event("error", "warning", fd=fd, local=describe(sock.getsockname(),
                           sock.family), msg="a passed socket matches no configured address")
            sock.close()
        self.passed.clear()
        listeners = sum(len(r.listeners) for r in self.records.values())
        self.log.event("ready", services=len(self.records), listeners=listeners)
        self.notifier.ready(self._status_line())

    def apply(self, config: Config) -> dict[str, list[str]]:
        """Make the running services match `config`, touching only what differs.

        Every new socket (a service's or the metrics endpoint's) is bound before anything
        is closed, so a failure (raised as OSError) leaves all as it was. A socket whose
        address is still configured is kept as it is, so connections queued on it are not
        lost; a removed service's children run on, and it is forgotten once they have
        exited.
        """
        if config.metrics is not None and self.render_metrics is None:
            self.render_metrics = self._load_metrics()
        pool = {lst.address.key: lst for r in self.records.values() for lst in r.listeners}
        pool.update((lst.address.key, lst) for lst in self.metrics.listeners)
        plan: dict[str, list[Listener]] = {}
        fresh: list[Listener] = []
        try:
            for service in config.services:
                plan[service.name] = [self._keep_or_open(pool, service, address, fresh)
                                      for address in service.listen]
            scraped = [self._metrics_listener(pool, address, fresh)
                       for address in (config.metrics.listen if config.metrics else ())]
        except OSError:
            for lst in fresh:
                self._close_listener(lst)
            raise
        for lst in pool.values():
            self._close_listener(lst)
        changes: dict[str, list[str]] = {"added": [], "changed": [], "removed": []}
        for name, record in self.records.items():
            if name not in plan and not record.draining:
                changes["removed"].append(name)
                record.listeners, record.draining = [], True
        for service in config.services:
            known = self.records.get(service.name)
            if known is None:
                changes["added"].append(service.name)
                known = self.records[service.name] = Record(service, [])
            elif known.draining or known.service != service:
                changes["added" if known.draining else "changed"].append(service.name)
                known.service, known.draining = service, False
                known.generation += 1
            known.listeners = plan[service.name]
            for lst in known.listeners:
                lst.sock.setblocking(service.waits(lst.address))
                tune(lst.sock, service)  # accepted connections inherit the options
        if config.daemon.max_children != self.pool.limit:
            self.pool = ChildPool(config.daemon.max_children)
        self.metrics.serve(scraped, self.render_metrics)
        self.config = config
        self._deploy()
        self._forget_drained()
        return changes

    def _keep_or_open(self, pool: dict[tuple[object, ...], Listener], service: Service,
                      address: Address, fresh: list[Listener]) -> Listener:
        kept = pool.pop(address.key, None)
        return kept if kept is not None else self._open(service, address, fresh)

    def _open(self, service: Service, address: Address, fresh: list[Listener]) -> Listener:
        sock = adopt(address, service.name, self.passed, self.passed_names)
        adopted = sock is not None
        if sock is None:
            sock = bind(address, service.backlog, service.waits(address))
            lst = Listener(address, sock, describe(sock.getsockname(), sock.family))
            fresh.append(lst)
            if address.path is not None:
                perms = service.socket_file
                set_file_owner(address.path, perms.uid, perms.gid, perms.mode)
        else:
            lst = Listener(address, sock, describe(sock.getsockname(), sock.family), adopted)
            fresh.append(lst)
        self.log.event("adopt" if adopted else "listen", service=service.name,
                       proto=address.proto, local=lst.local, mode=service.mode(address))
        return lst

    def _load_metrics(self) -> Render:
        """What makes the metrics page. prometheus_client is imported only now, when a
        config first turns metrics on: a supervisor without them does not carry it."""
        try:
            from netd.metrics import Metrics
        except ImportError as e:
            raise OSError(f"metrics need prometheus_client (python3-prometheus-client): "
                          f"{e}") from None
        return Metrics(self.known).render

    def _metrics_listener(self, pool: dict[tuple[object, ...], Listener], address: Address,
                          fresh: list[Listener]) -> Listener:
        kept = pool.pop(address.key, None)
        if kept is not None:
            return kept
        sock = bind(address, MetricsEndpoint.BACKLOG, blocking=False)
        lst = Listener(address, sock, describe(sock.getsockname(), sock.family))
        fresh.append(lst)
        return lst

    def _close_listener(self, lst: Listener) -> None:
        lst.close()
        lst.remove_file()

    def _deploy(self) -> None:
        """Start the spawners and worker pools the services need, and retire those whose
        services changed (they finish what they serve; the sockets stay open)."""
        groups: dict[Identity, list[tuple[Service, tuple[Listener, ...]]]] = {}
        for name in sorted(self.records):
            record = self.records[name]
            if record.draining:
                continue
            service = record.service
            served = tuple(lst for lst in record.listeners
                           if service.mode(lst.address) != "workers")
            if served:
                groups.setdefault(service.identity, []).append((service, served))
            if service.workers:
                self.workers(record)
        fixed: dict[Identity, Group] = {k: tuple(v) for k, v in groups.items()}
        self.spawners.deploy(fixed, self.pool, self.config.daemon.stop_timeout_s)
        for name in list(self.pools):
            kept = self.records.get(name)
            if kept is None or kept.draining or not kept.service.workers:
                self.pools.pop(name).retire()

    def workers(self, record: Record) -> None:
        """Workers mode: keep `workers` prefork workers of the service running."""
        service = record.service
        listeners = [lst for lst in record.listeners if service.mode(lst.address) == "workers"]
        pool = self.pools.get(service.name)
        if pool is not None and pool.service == service and pool.listeners == listeners:
            return
        if pool is not None:
            pool.retire()
        new = WorkerPool(self.loop, self.log, service, listeners, record.generation,
                         on_start=lambda pid: self.workers_by_pid.__setitem__(pid, new))
        self.pools[service.name] = new
        if not self.stopping:
            new.fill()

    def reload(self) -> dict[str, Any]:
        """Re-read the config file and apply the difference; on any error keep all as is."""
        self.notifier.reloading()
        self.spawners.sync()
        try:
            changes = self.apply(load_config_apart(self.config.path, self.config.services))
        except ConfigError as e:
            result = {"ok": False, "error": "\n".join(e.errors)}
        except OSError as e:
            result = {"ok": False, "error": e.strerror or str(e)}
        else:
            result = {"ok": True, **changes}
        self.control.ensure()
        self.last_reload = {"time": time.time(), **result}
        self.reloads["ok" if result["ok"] else "error"] += 1
        if result["ok"]:
            for warning in self.config.warnings:
                self.log.event("config", "warning", msg=warning)
            self.log.event("reload", result="ok", services=len(self.config.services),
                           added=",".join(changes["added"]) or None,
                           changed=",".join(changes["changed"]) or None,
                           removed=",".join(changes["removed"]) or None)
        else:
            self.log.event("reload", "err", result="error", msg=result["error"])
        give_back_memory()  # the old config and the new one's transfer are garbage now
        self.notifier.ready(self._status_line())
        return result

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT, then stop gracefully; returns the exit code."""
        if self.notifier.watchdog_interval_s is not None:
            self.loop.every(self.notifier.watchdog_interval_s, self.notifier.watchdog)
        while not (self.stopping and not self._running()):
            self.log.pump(self.loop)
            self.loop.run_once()
        self.close_all()
        self.log.wind_up()  # no loop left to flush from: wait for the log instead
        self.log.event("stop", signal=self.stopping)
        self.log.flush()
        return 0

    def _signals(self, received: set[int]) -> None:
        if signal.SIGTERM in received or signal.SIGINT in received:
            self.stop(signal.Signals(signal.SIGTERM if signal.SIGTERM in received
                                     else signal.SIGINT).name)
        elif signal.SIGHUP in received and not self.stopping:
            self.reload()
        self.reap()

    def answer(self, command: str) -> dict[str, Any]:
        """The reply to a control request (status, reload or stop)."""
        if command == "status":
            return {"ok": True, **self.status()}
        if command == "reload":
            return self.reload()
        self.stop("control")
        return {"ok": True, "pid": os.getpid()}

    def stop(self, reason: str) -> None:
        """Stop accepting and have every helper end its children; run() returns once
        all have exited."""
        if self.stopping:
            return
        self.stopping = reason
        self.notifier.stopping()
        self.control.close()
        self.metrics.close()
        for record in self.records.values():
            for lst in record.listeners:
                self._close_listener(lst)
            record.listeners = []
        self.spawners.stop(self.config.daemon.stop_timeout_s)
        for pool in set(self.workers_by_pid.values()):
            pool.retire()
        self.loop.every(self.config.daemon.stop_timeout_s, self._kill_left)

    def _running(self) -> bool:
        """Whether any process of ours still runs: a spawner, a worker or an orphan."""
        return bool(self.spawners.by_pid or self.workers_by_pid or self.spawners.children)

    def _kill_left(self) -> None:
        """At each stop deadline: SIGKILL the workers and orphans still running (each
        spawner does the same for its own children); from the second one on, the
        spawners that have not left too."""
        left = list(self.workers_by_pid) + self.spawners.orphans()
        if left:
            self.log.event("kill", "warning", children=len(left), reason="stop_timeout")
        if self.kill_rounds:
            left += list(self.spawners.by_pid)
        for pid in left:
            signal_group(pid, signal.SIGKILL)
        self.kill_rounds += 1

    def reap(self) -> None:
        """Collect every process of ours that has exited: spawners, workers, orphans."""
        for pid, status in exited_children():
            pool = self.workers_by_pid.pop(pid, None)
            if pool is not None:
                log_exit(self.log, pool.service.name, pid, status,
                         time.monotonic() - pool.started_s[pid])
                pool.lost(pid)
            else:
                self.spawners.exited(pid, status)
        self._forget_drained()

    def _forget_drained(self) -> None:
        """Drop removed services once their last child has exited."""
        busy = {child.started.service for child in self.spawners.children.values()}
        busy.update(pool.service.name for pool in self.workers_by_pid.values())
        for name in [n for n, r in self.records.items() if r.draining and n not in busy]:
            del self.records[name]

    # -- status -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What `netd status` shows: the daemon, then every service with its counters
        (current: the spawners are asked for what they have not reported yet)."""
        self.spawners.sync()
        return self.known()

    def known(self) -> dict[str, Any]:
        """The daemon and its services as the supervisor knows them now, without waiting
        for the spawners (a scrape: counters at most one batch interval old)."""
        children: dict[str, int] = {}
        held = set()
        for child in self.spawners.children.values():
            children[child.started.service] = children.get(child.started.service, 0) + 1
            if child.started.wait_key is not None:
                held.add(child.started.wait_key)
        for pool in self.workers_by_pid.values():
            children[pool.service.name] = children.get(pool.service.name, 0) + 1
        counts = self.spawners.counts
        return {
            "daemon": {
                "pid": os.getpid(), "version": __version__, "config": self.config.path,
                "started": self.started_wall,
                "uptime_s": round(time.monotonic() - self.started_s, 3),
                "children": sum(children.values()), "last_reload": self.last_reload,
                "reloads": dict(self.reloads),
                "log_dropped": {"supervisor": self.log.lost(),
                                "spawners": self.spawners.log_lost},
                "metrics": [lst.local for lst in self.metrics.listeners],
            },
            "services": [
                {"name": name,
                 "state": "draining" if record.draining else _counts(counts, name).state,
                 "handler": record.service.handler,
                 "listen": [{"address": lst.local, "proto": lst.address.proto,
                             "mode": record.service.mode(lst.address),
                             "busy": str(lst.address) in held} for lst in record.listeners],
                 "children": children.get(name, 0), "accepted": _counts(counts, name).accepted,
                 "refused": _counts(counts, name).refused,
                 "refused_by": dict(_counts(counts, name).refused_by),
                 "failed": _counts(counts, name).failed}
                for name, record in self.records.items()
            ] + [{"name": off.name, "state": "disabled", "handler": off.handler,
                  "origin": off.origin, "listen": [], "children": 0, "accepted": 0,
                  "refused": 0, "refused_by": {}, "failed": 0} for off in self.config.disabled],
        }

    def _status_line(self) -> str:
        accepted = sum(c.accepted for c in self.spawners.counts.values())
        return (f"{len(self.records)} services, {len(self.spawners.children)} children, "
                f"{accepted} accepted")

    def _status_soon(self) -> None:
        """Tell systemd the counters, at most once per STATUS_EVERY_S."""
        if self.notifier.enabled and self.status_at is None:
            self.status_at = self.loop.after(STATUS_EVERY_S, self._send_status)

    def _send_status(self) -> None:
        self.status_at = None
        self.notifier.status(self._status_line())

    # -- closing ----------------------------------------------------------------------

    def close_all(self) -> None:
        """Close every socket this supervisor holds (helpers and children are not touched)."""
        self.control.close()
        self.metrics.close()
        for record in self.records.values():
            for lst in record.listeners:
                self._close_listener(lst)
            record.listeners = []
        for sock in self.passed.values():
            sock.close()
        self.spawners.close()
        self.loop.close()


def _counts(counts: dict[str, Counts], name: str) -> Counts:
    return counts.get(name) or Counts()
