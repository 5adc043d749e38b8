"""The supervisor: the one long-lived process that owns the config and the sockets.

It binds (or adopts) every listening socket, forks a spawner per identity
(netd.spawner) and the prefork workers of `workers:` services (netd.worker_pool), and
they serve the sockets: the supervisor does no work per connection. Its loop
(netd.loop) watches the signal wake-up socket, the control socket and its spawners'
reports; its timers are systemd's watchdog, the stop deadline and the restart of a
spawner that died.

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
from dataclasses import dataclass, field
from typing import Any

from netd import __version__
from netd.children import ChildPool
from netd.config import Address, Config, ConfigError, Service, load_config
from netd.config.model import Identity
from netd.control import ControlServer
from netd.listener import Listener
from netd.logs import Log
from netd.loop import EventLoop, Timer
from netd.peer import describe
from netd.reports import Batch, Started
from netd.sockets import bind, set_file_owner, tune
from netd.spawn import become_subreaper, signal_group
from netd.spawner import Plan
from netd.spawner_handle import SpawnerHandle
from netd.systemd import Notifier, adopt
from netd.worker_pool import WorkerPool

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
STATUS_EVERY_S = 1.0       # systemd's STATUS= line, at most this often
RESTART_S = 0.2            # a spawner that died is replaced after this, doubling
RESTART_MAX_S = 30.0       # while its replacements keep dying young,
STABLE_S = 10.0            # that is, within this long


@dataclass(eq=False)
class Record:
    """A configured service as the supervisor knows it: its sockets and what its
    spawner reported; a removed service is kept (draining) until its children end."""

    service: Service
    listeners: list[Listener]
    accepted: int = 0
    refused: int = 0
    state: str = "listening"
    draining: bool = False
    generation: int = 0


@dataclass(eq=False)
class ChildRecord:
    """A child a spawner reported, and which spawner started it."""

    started: Started
    spawner: SpawnerHandle
    started_s: float = field(default_factory=time.monotonic)


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
        self.spawners: dict[Identity, SpawnerHandle] = {}      # the serving one per identity
        self.helpers: dict[int, SpawnerHandle | WorkerPool] = {}  # every live one, by pid
        self.pools: dict[str, WorkerPool] = {}
        self.children: dict[int, ChildRecord] = {}
        self.pool = ChildPool(config.daemon.max_children)
        self.control = ControlServer(self.loop, config.daemon.control, log, self.answer)
        self.restarts: dict[Identity, Timer] = {}
        self.spawner_failures: dict[Identity, int] = {}
        self.stopping: str | None = None
        self.kill_rounds = 0
        self.status_at: Timer | None = None
        self.started_s = time.monotonic()
        self.started_wall = time.time()
        self.last_reload: dict[str, Any] | None = None
        self.passed_names = dict(passed or {})
        self.passed = {fd: socket.socket(fileno=fd) for fd in self.passed_names}
        self.wakeup_r, self.wakeup_w = socket.socketpair()
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
        self.wakeup_r.setblocking(False)
        self.wakeup_w.setblocking(False)
        signal.set_wakeup_fd(self.wakeup_w.fileno(), warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, _note_signal)
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

        Every new socket is bound before anything is closed, so a failure (raised as
        OSError) leaves all as it was. A socket whose address is still configured is
        kept as it is, so connections queued on it are not lost; a removed service's
        children run on, and it is forgotten once they have exited.
        """
        pool = {lst.address.key: lst for r in self.records.values() for lst in r.listeners}
        plan: dict[str, list[Listener]] = {}
        fresh: list[Listener] = []
        try:
            for service in config.services:
                plan[service.name] = [self._keep_or_open(pool, service, address, fresh)
                                      for address in service.listen]
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
        for identity in list(self.spawners):
            if identity not in groups:
                self.spawners.pop(identity).retire()
        for identity, services in groups.items():
            current = self.spawners.get(identity)
            if (current is None or current.plan.services != tuple(services)
                    or current.plan.pool is not self.pool):
                self._start_spawner(identity, tuple(services))
        for name in list(self.pools):
            kept = self.records.get(name)
            if kept is None or kept.draining or not kept.service.workers:
                self.pools.pop(name).retire()

    def _start_spawner(self, identity: Identity,
                       services: tuple[tuple[Service, tuple[Listener, ...]], ...]) -> None:
        """Fork the spawner for `services` (retiring the one it replaces, if any); it
        counts the children of earlier spawners of its identity that still run."""
        self.loop.cancel(self.restarts.pop(identity, None))
        if self.stopping:
            return
        names = {service.name for service, _ in services}
        inherited = tuple(c.started for c in self.children.values()
                          if c.spawner.plan.identity == identity and c.started.service in names)
        plan = Plan(identity, services, self.pool, self.config.daemon.stop_timeout_s, inherited)
        try:
            handle = SpawnerHandle(plan, self.loop, self.log, self._batch)
        except OSError as e:
            self.log.event("error", "err", user=identity.user, msg=f"cannot start spawner: {e}")
            self._restart_later(identity)
            return
        old = self.spawners.get(identity)
        self.spawners[identity] = handle
        self.helpers[handle.pid] = handle
        if old is not None:
            old.retire()
        for name in names:
            self.records[name].state = "listening"

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
                         on_start=lambda pid: self.helpers.__setitem__(pid, new))
        self.pools[service.name] = new
        if not self.stopping:
            new.fill()

    def reload(self) -> dict[str, Any]:
        """Re-read the config file and apply the difference; on any error keep all as is."""
        self.notifier.reloading()
        self._read_reports()
        try:
            changes = self.apply(load_config(self.config.path))
        except ConfigError as e:
            result = {"ok": False, "error": "\n".join(e.errors)}
        except OSError as e:
            result = {"ok": False, "error": e.strerror or str(e)}
        else:
            result = {"ok": True, **changes}
        self.control.ensure()
        self.last_reload = {"time": time.time(), **result}
        if result["ok"]:
            for warning in self.config.warnings:
                self.log.event("config", "warning", msg=warning)
            self.log.event("reload", result="ok", services=len(self.config.services),
                           added=",".join(changes["added"]) or None,
                           changed=",".join(changes["changed"]) or None,
                           removed=",".join(changes["removed"]) or None)
        else:
            self.log.event("reload", "err", result="error", msg=result["error"])
        self.notifier.ready(self._status_line())
        return result

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT, then stop gracefully; returns the exit code."""
        self.loop.watch(self.wakeup_r, self._signals)
        if self.notifier.watchdog_interval_s is not None:
            self.loop.every(self.notifier.watchdog_interval_s, self.notifier.watchdog)
        while not (self.stopping and not self.helpers and not self.children):
            self.log.pump(self.loop)
            self.loop.run_once()
        self.close_all()
        self.log.wind_up()  # no loop left to flush from: wait for the log instead
        self.log.event("stop", signal=self.stopping)
        self.log.flush()
        return 0

    def _signals(self) -> None:
        try:
            received = set(self.wakeup_r.recv(256))
        except BlockingIOError:
            return
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
        for record in self.records.values():
            for lst in record.listeners:
                self._close_listener(lst)
            record.listeners = []
        for identity in list(self.restarts):
            self.loop.cancel(self.restarts.pop(identity))
        for helper in set(self.helpers.values()):
            if isinstance(helper, SpawnerHandle):
                helper.stop(self.config.daemon.stop_timeout_s)
            else:
                helper.retire()
        for pid in self._orphans():
            signal_group(pid, signal.SIGTERM)
        self.loop.every(self.config.daemon.stop_timeout_s, self._kill_left)

    def _kill_left(self) -> None:
        """At each stop deadline: SIGKILL the workers and orphans still running (each
        spawner does the same for its own children); from the second one on, the
        spawners that have not left too."""
        workers = [pid for pid, h in self.helpers.items() if isinstance(h, WorkerPool)]
        left = workers + self._orphans()
        if left:
            self.log.event("kill", "warning", children=len(left), reason="stop_timeout")
        if self.kill_rounds:
            left += [pid for pid, h in self.helpers.items() if isinstance(h, SpawnerHandle)]
        for pid in left:
            signal_group(pid, signal.SIGKILL)
        self.kill_rounds += 1

    def _orphans(self) -> list[int]:
        """Children whose spawner has died: they are ours to reap (we are a subreaper)."""
        return [pid for pid, child in self.children.items()
                if child.spawner.pid not in self.helpers]

    # -- what the helpers report ------------------------------------------------------

    def _batch(self, spawner: SpawnerHandle, batch: Batch) -> None:
        for started in batch.started:
            self.children[started.pid] = ChildRecord(started, spawner)
        ended = [pid for pid, _ in batch.ended if self.children.pop(pid, None) is not None]
        self._tell_ended(spawner.plan.identity, ended, spawner)
        for name, (accepted, refused) in batch.counts.items():
            record = self.records.get(name)
            if record is not None:
                record.accepted += accepted
                record.refused += refused
        if self.spawners.get(spawner.plan.identity) is spawner:
            for name, state in batch.states.items():
                if name in self.records:
                    self.records[name].state = state
        if batch.fatal is not None:
            self.log.event("error", "err", user=spawner.plan.identity.user,
                           msg=f"spawner failed: {batch.fatal}")
        if ended:
            self._forget_drained()
        self._status_soon()

    def _tell_ended(self, identity: Identity, pids: list[int],
                    reporter: SpawnerHandle | None) -> None:
        """The serving spawner of `identity` counts children of earlier ones: tell it."""
        current = self.spawners.get(identity)
        if current is not None and current is not reporter:
            current.ended(pids)

    def reap(self) -> None:
        """Collect every process of ours that has exited: spawners, workers, orphans."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            helper = self.helpers.pop(pid, None)
            if isinstance(helper, SpawnerHandle):
                self._spawner_exited(helper, status)
            elif helper is not None:
                self._log_exit(helper.service.name, pid, status,
                               time.monotonic() - helper.started_s[pid])
                helper.lost(pid)
            elif pid in self.children:
                child = self.children.pop(pid)
                self._log_exit(child.started.service, pid, status,
                               time.monotonic() - child.started_s)
                self._tell_ended(child.spawner.plan.identity, [pid], None)
        self._forget_drained()

    def _spawner_exited(self, spawner: SpawnerHandle, status: int) -> None:
        spawner.close()
        identity = spawner.plan.identity
        for pid in [pid for pid, c in self.children.items() if c.spawner is spawner]:
            if not _exists(pid):
                del self.children[pid]  # its end was never reported
        if spawner.retired:
            return  # it left as told, once its children had ended
        if self.spawners.get(identity) is spawner:
            del self.spawners[identity]
        self.log.event("error", "err", user=identity.user,
                       msg=f"spawner exited (status {os.waitstatus_to_exitcode(status)})")
        if not self.stopping:
            self._restart_later(identity)

    def _restart_later(self, identity: Identity) -> None:
        """Replace a spawner that died, after a delay that doubles while they keep failing."""
        failures = self.spawner_failures.get(identity, 0)
        self.spawner_failures[identity] = failures + 1
        delay_s = min(RESTART_MAX_S, RESTART_S * 2 ** failures)
        self.loop.cancel(self.restarts.get(identity))
        self.restarts[identity] = self.loop.after(delay_s, lambda: self._restart(identity))

    def _restart(self, identity: Identity) -> None:
        self.restarts.pop(identity, None)
        self._deploy()
        # Forgiven once a replacement has lived a while.
        self.loop.after(STABLE_S, lambda: self._forgive(identity))

    def _forgive(self, identity: Identity) -> None:
        if identity in self.spawners:
            self.spawner_failures.pop(identity, None)

    def _log_exit(self, service: str, pid: int, status: int, lived_s: float) -> None:
        duration = f"{lived_s:.3f}s"
        if os.WIFSIGNALED(status):
            self.log.event("exit", "warning", service=service, pid=pid,
                           signal=signal.Signals(os.WTERMSIG(status)).name, duration=duration)
        else:
            self.log.event("exit", service=service, pid=pid,
                           status=os.waitstatus_to_exitcode(status), duration=duration)

    def _forget_drained(self) -> None:
        """Drop removed services once their last child has exited."""
        busy = {child.started.service for child in self.children.values()}
        busy.update(pool.service.name for pool in set(self.helpers.values())
                    if isinstance(pool, WorkerPool))
        for name in [n for n, r in self.records.items() if r.draining and n not in busy]:
            del self.records[name]

    # -- status -----------------------------------------------------------------------

    def _read_reports(self) -> None:
        """Take in what every spawner has reported so far (so counters are current)."""
        for helper in list(self.helpers.values()):
            if isinstance(helper, SpawnerHandle):
                helper.read()

    def status(self) -> dict[str, Any]:
        """What `netd status` shows: the daemon, then every service with its counters."""
        self._read_reports()
        children: dict[str, int] = {}
        held = set()
        for child in self.children.values():
            children[child.started.service] = children.get(child.started.service, 0) + 1
            if child.started.wait_key is not None:
                held.add(child.started.wait_key)
        for helper in self.helpers.values():
            if isinstance(helper, WorkerPool):
                children[helper.service.name] = children.get(helper.service.name, 0) + 1
        return {
            "daemon": {
                "pid": os.getpid(), "version": __version__, "config": self.config.path,
                "started": self.started_wall,
                "uptime_s": round(time.monotonic() - self.started_s, 3),
                "children": sum(children.values()), "last_reload": self.last_reload,
            },
            "services": [
                {"name": name, "state": "draining" if record.draining else record.state,
                 "handler": record.service.handler,
                 "listen": [{"address": lst.local, "proto": lst.address.proto,
                             "mode": record.service.mode(lst.address),
                             "busy": str(lst.address) in held} for lst in record.listeners],
                 "children": children.get(name, 0), "accepted": record.accepted,
                 "refused": record.refused}
                for name, record in self.records.items()
            ] + [{"name": off.name, "state": "disabled", "handler": off.handler,
                  "origin": off.origin, "listen": [], "children": 0, "accepted": 0,
                  "refused": 0} for off in self.config.disabled],
        }

    def _status_line(self) -> str:
        accepted = sum(r.accepted for r in self.records.values())
        return (f"{len(self.records)} services, {len(self.children)} children, "
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
        for record in self.records.values():
            for lst in record.listeners:
                self._close_listener(lst)
            record.listeners = []
        for sock in self.passed.values():
            sock.close()
        for helper in set(self.helpers.values()):
            if isinstance(helper, SpawnerHandle):
                helper.close()
        self.loop.close()
        self.wakeup_r.close()
        self.wakeup_w.close()


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _note_signal(signum: int, frame: object) -> None:
    """The signal number reaches the loop through the wake-up fd; nothing to do here."""
