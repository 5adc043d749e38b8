"""The supervisor: one event loop over every listener, the signal wake-up fd, the
control socket and the stderr pipes of exec children. It accepts, starts children,
reaps them, reloads and stops.

Signal handlers do nothing but let Python write the signal number to the wake-up
socket; the loop reads those numbers and does the work. With nothing to do, the loop
sleeps in select() with no timeout: zero CPU at rest. It wakes by itself only when a
timer is due (a worker restart, a max_duration, the end of a rate suspension, a PROXY
header or control request deadline, the stop deadline, systemd's watchdog).
"""

from __future__ import annotations

import errno
import heapq
import itertools
import os
import selectors
import signal
import socket
import time
from typing import Any

from netd import __version__
from netd.config import Address, Config, ConfigError, Service, load_config
from netd.config.model import Identity
from netd.control import (
    MAX_PENDING,
    BadRequest,
    ControlRequest,
    ensure_control_socket,
    open_control_socket,
    send_reply,
)
from netd.handlers.builtins import BUILTINS
from netd.logs import Log
from netd.policy import RateWindow, Refuse, UnixPeer, check_rate, decide, source_key
from netd.proxy import ProxyError
from netd.proxywait import ProxyWait
from netd.runtime import Child, Listener, Pending, ServiceState
from netd.sockets import bind, describe, remove_unix, set_file_owner, tune
from netd.spawn import (
    Peer,
    Spawner,
    become_subreaper,
    exec_env,
    fork_child,
    serve_connection,
)
from netd.systemd import Notifier, adopt

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
ACCEPTS_PER_WAKEUP = 64
DATAGRAMS_PER_WAKEUP = 64
STDERR_LINE_MAX = 2048
STATUS_EVERY_S = 1.0
MAX_PROXY_WAITS = 1024     # connections whose PROXY header may be pending at once
# A UDP builtin never answers port 0 or another small-services port: that is how two
# servers start bouncing datagrams off each other.
SMALL_SERVICE_PORTS = frozenset((0, 7, 9, 13, 19, 37))
SPAWNER_RETRY_S = 5.0      # after a spawner failed to take its identity
RESOURCE_PAUSE_S = 1.0     # a service stops accepting this long when accept() runs out
KILL_GRACE_S = 5.0          # after max_duration's SIGTERM, SIGKILL
WORKER_BACKOFF_S = 0.1      # first restart delay; doubles while workers keep dying young
WORKER_BACKOFF_MAX_S = 30.0
WORKER_STABLE_S = 10.0      # a worker that lived this long resets the back-off


class Supervisor:
    """Owns the sockets and children of one config; `run()` serves until stopped."""

    def __init__(self, config: Config, log: Log, notifier: Notifier | None = None,
                 passed: dict[int, str] | None = None) -> None:
        self.config = config
        self.log = log
        self.notifier = notifier or Notifier()
        self.selector = selectors.DefaultSelector()
        self.services: dict[str, ServiceState] = {}
        self.children: dict[int, Child] = {}
        self.stopping: str | None = None
        self.devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        self.wakeup_r, self.wakeup_w = socket.socketpair()
        self.control: socket.socket | None = None
        self.started_s = time.monotonic()
        self.started_wall = time.time()
        self.last_reload: dict[str, Any] | None = None
        self.last_status_s = 0.0
        self.passed_names = dict(passed or {})
        self.passed = {fd: socket.socket(fileno=fd) for fd in self.passed_names}
        self.spawners: dict[Identity, Spawner] = {}
        self.restarts: dict[str, float] = {}  # service -> when to restart its workers
        # (when, tie-breaker, child, signal): children past their service's max_duration
        self.expiries: list[tuple[float, int, Child, signal.Signals]] = []
        self.expiry_order = itertools.count()
        self.proxy_waits: set[ProxyWait] = set()
        self.control_requests: set[ControlRequest] = set()
        self.pending: dict[int, Pending] = {}
        # Listeners not watched while their spawner's socket is full.
        self.held_back: dict[Spawner, set[Listener]] = {}
        self.spawner_failed_s: dict[Identity, float] = {}
        self.next_token = 0
        # Programs a dead spawner leaves behind become our children, so that they
        # are still reaped and logged.
        become_subreaper()

    # -- start-up and reload ------------------------------------------------------

    def bind_all(self) -> None:
        """Bind (or adopt) every service's sockets and the control socket; raises
        OSError with nothing left bound when one fails."""
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
            self.control = open_control_socket(self.config.daemon.control)
        except OSError:
            self.close_all()
            raise
        self.selector.register(self.control, selectors.EVENT_READ, "control")
        for fd, sock in self.passed.items():
            self.log.event("error", "warning", fd=fd, local=describe(sock.getsockname(),
                           sock.family), msg="a passed socket matches no configured address")
            sock.close()
        self.passed.clear()
        listeners = sum(len(s.listeners) for s in self.services.values())
        self.log.event("ready", services=len(self.services), listeners=listeners)
        self.notifier.ready(self._status_line())

    def apply(self, config: Config) -> dict[str, list[str]]:
        """Make the running services match `config`, touching only what differs.

        Every new socket is bound before anything is closed, so a failure (raised as
        OSError) leaves all as it was. A socket whose address is still configured is
        kept as it is, so connections queued on it are not lost; a removed service's
        children run on, and it is dropped once they have exited.
        """
        pool = {lst.address.key: lst for st in self.services.values() for lst in st.listeners}
        plan: dict[str, list[Listener]] = {}
        fresh: list[Listener] = []
        try:
            for service in config.services:
                plan[service.name] = []
                for address in service.listen:
                    kept = pool.pop(address.key, None)
                    plan[service.name].append(kept or self._open(service, address, fresh))
        except OSError:
            for lst in fresh:
                lst.sock.close()
                if not lst.adopted:
                    remove_unix(lst.address)
            raise
        for lst in pool.values():
            self._close_listener(lst)
        changes: dict[str, list[str]] = {"added": [], "changed": [], "removed": []}
        for name, old in self.services.items():
            if name not in plan and not old.draining:
                changes["removed"].append(name)
                old.listeners, old.draining = [], True
                self._retire_workers(old)
        for service in config.services:
            state = self.services.get(service.name)
            if state is None:
                changes["added"].append(service.name)
                state = self.services[service.name] = ServiceState(service)
            elif state.draining or state.service != service:
                changes["added" if state.draining else "changed"].append(service.name)
                state.service, state.draining = service, False
                state.generation += 1
                self._retire_workers(state)
            state.listeners = plan[service.name]
            rate = service.limits.rate
            if state.window is None or state.window.rate != rate:
                state.window = RateWindow(rate) if rate is not None else None
            self._arm(state)
        for name in changes["removed"]:
            self._forget_if_done(self.services[name])
        self.config = config
        return changes

    def _open(self, service: Service, address: Address, fresh: list[Listener]) -> Listener:
        blocking = service.waits(address)
        sock = adopt(address, service.name, self.passed, self.passed_names)
        adopted = sock is not None
        if sock is None:
            sock = bind(address, service.backlog, blocking)
            if address.path is not None:
                perms = service.socket_file
                try:
                    set_file_owner(address.path, perms.uid, perms.gid, perms.mode)
                except OSError:
                    sock.close()
                    remove_unix(address)
                    raise
        sock.setblocking(blocking)
        lst = Listener(service.name, address, sock, describe(sock.getsockname(), sock.family),
                       adopted=adopted)
        fresh.append(lst)
        self.log.event("adopt" if lst.adopted else "listen", service=service.name,
                       proto=address.proto, local=lst.local, mode=service.mode(address))
        return lst

    def _arm(self, state: ServiceState) -> None:
        """Point a service's sockets at it, watch the idle ones, and give exec
        services a stderr pipe (kept for the life of the service)."""
        service = state.service
        for lst in state.listeners:
            lst.service = service.name
            lst.sock.setblocking(service.waits(lst.address))
            watched = lst.sock in self.selector.get_map()
            if service.mode(lst.address) == "workers":
                if watched:
                    self.selector.unregister(lst.sock)
            elif not lst.busy and not watched and state.suspended_until_s is None:
                self.selector.register(lst.sock, selectors.EVENT_READ, lst)
        if service.workers:
            self._start_workers(state)
        if service.kind == "exec" and state.stderr_r is None:
            state.stderr_r, state.stderr_w = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(state.stderr_r, False)
            self.selector.register(state.stderr_r, selectors.EVENT_READ, state)

    def _close_listener(self, lst: Listener) -> None:
        if lst.sock in self.selector.get_map():
            self.selector.unregister(lst.sock)
        lst.sock.close()
        if not lst.adopted:
            remove_unix(lst.address)

    def _forget_if_done(self, state: ServiceState) -> None:
        """Drop a removed service once its last child has exited."""
        if not state.draining or state.children:
            return
        self._drain_stderr(state)
        for fd in (state.stderr_r, state.stderr_w):
            if fd is not None:
                if fd == state.stderr_r:
                    self.selector.unregister(fd)
                os.close(fd)
        state.stderr_r = state.stderr_w = None
        if self.services.get(state.service.name) is state:
            del self.services[state.service.name]

    def reload(self) -> dict[str, Any]:
        """Re-read the config file and apply the difference; on any error keep all as is."""
        self.notifier.reloading()
        try:
            changes = self.apply(load_config(self.config.path))
        except ConfigError as e:
            result = {"ok": False, "error": "\n".join(e.errors)}
        except OSError as e:
            result = {"ok": False, "error": e.strerror or str(e)}
        else:
            result = {"ok": True, **changes}
        self.control = ensure_control_socket(self.control, self.selector, self.log)
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

    # -- the loop ---------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT, then stop gracefully; returns the exit code."""
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, None)
        ping_s = self.notifier.watchdog_interval_s
        deadline_s: float | None = None
        while not (self.stopping and not self.children):
            self._watch_log()  # lines held back since the last select need its wake-up
            timeout = ping_s
            timers = self._timers() + ([deadline_s] if deadline_s is not None else [])
            for due_s in timers:
                left = max(0.0, due_s - time.monotonic())
                timeout = left if timeout is None else min(timeout, left)
            for key, _ in self.selector.select(timeout):
                self._dispatch(key.data)
            self._restart_due_workers()
            self._expire_children()
            self._resume_due_services()
            self._expire_proxy_waits()
            self._expire_control_requests()
            if ping_s is not None:
                self.notifier.watchdog()
            if self.stopping and deadline_s is None:
                deadline_s = time.monotonic() + self.config.daemon.stop_timeout_s
                self._signal_children(signal.SIGTERM)
            elif deadline_s is not None and time.monotonic() >= deadline_s and self.children:
                self.log.event("kill", "warning", children=len(self.children),
                               reason="stop_timeout")
                self._signal_children(signal.SIGKILL)
                deadline_s = time.monotonic() + self.config.daemon.stop_timeout_s
        for state in list(self.services.values()):
            self._drain_stderr(state)
        self.close_all()
        self.log.patience_s = 1.0  # no loop left to flush from: wait for the log instead
        self.log.event("stop", signal=self.stopping)
        self.log.flush()
        return 0

    def _timers(self) -> list[float]:
        """When something must happen without any fd waking us (none when idle)."""
        due = list(self.restarts.values())
        if self.expiries:
            due.append(self.expiries[0][0])
        due.extend(s.suspended_until_s for s in self.services.values()
                   if s.suspended_until_s is not None)
        if self.proxy_waits:
            due.append(min(wait.deadline_s for wait in self.proxy_waits))
        if self.control_requests:
            due.append(min(request.deadline_s for request in self.control_requests))
        return due

    def _dispatch(self, target: object) -> None:
        if target is None:
            self._handle_signals()
        elif isinstance(target, Listener):
            service = self.services[target.service].service
            mode = service.mode(target.address)
            if mode == "nowait":
                self.accept(target, service)
            elif mode == "inline":
                self.answer_datagrams(target, service)
            else:
                self.hand_over(target, service)
        elif isinstance(target, ServiceState):
            self._read_stderr(target)
        elif isinstance(target, Spawner):
            self._spawner_events(target)
        elif isinstance(target, ProxyWait):
            self._proxy_header(target)
        elif target == "control":
            self._accept_control()
        elif isinstance(target, ControlRequest):
            self._serve_control(target)
        elif target == "log":
            self.log.flush()

    def _watch_log(self) -> None:
        """Watch the log socket for room while lines wait in the log's backlog, or the
        count of dropped lines waits to be reported."""
        waiting = bool(self.log.backlog) or self.log.dropped > 0
        for fd in self.log.fds():
            watched = fd in self.selector.get_map()
            if waiting and not watched:
                self.selector.register(fd, selectors.EVENT_WRITE, "log")
            elif not waiting and watched:
                self.selector.unregister(fd)

    def _handle_signals(self) -> None:
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

    def stop(self, reason: str) -> None:
        """Stop accepting; run() then ends the children and returns."""
        if self.stopping:
            return
        self.stopping = reason
        self.notifier.stopping()
        self._stop_listening()

    # -- serving ----------------------------------------------------------------

    def accept(self, listener: Listener, service: Service) -> None:
        """Accept what is queued on a nowait stream listener and start a child for each
        connection the policy lets in; over its rate, the service is suspended instead
        and connections wait in the backlog."""
        state = self.services[service.name]
        for _ in range(ACCEPTS_PER_WAKEUP):
            now = time.monotonic()
            suspend = check_rate(state.window, service.limits, now)
            if suspend is not None:
                self._suspend(state, suspend.until_s)
                return
            try:
                conn, remote = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.log.event("error", "err", service=service.name,
                               msg=f"accept failed: {e.strerror}")
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of fds or memory: the socket stays readable, so watching it
                    # would spin. Pause the service; connections wait in the backlog.
                    self._suspend(state, now + RESOURCE_PAUSE_S, reason="resources")
                    return
                continue
            if state.window is not None:
                state.window.record(now)
            if service.proxy is not None:
                self._await_proxy_header(service, listener, conn, remote, now)
                continue
            with conn:
                peer = Peer.of(conn, listener.address.proto, remote)
                self._admit(service, listener, conn, peer, remote)
            if listener.sock not in self.selector.get_map():
                return  # held back (its spawner is behind) or suspended meanwhile

    def _admit(self, service: Service, listener: Listener, conn: socket.socket, peer: Peer,
               remote: object) -> None:
        """Apply access and limits to one connection, then start its child."""
        state = self.services[service.name]
        who = _policy_peer(peer)
        decision = decide(service.access, service.limits, state.counters, who,
                          len(self.children) + len(self.pending),
                          self.config.daemon.max_children)
        if isinstance(decision, Refuse):
            self._refuse(service, peer, decision.reason)
            return
        # Counted per source only where a per_source limit reads it (parsing costs).
        source = source_key(who) if service.limits.per_source is not None else None
        state.counters.started(source)
        if not self._start(service, listener, conn, peer, remote, True, source):
            state.counters.ended(source)

    def _refuse(self, service: Service, peer: Peer, reason: str, **detail: object) -> None:
        self.services[service.name].refused += 1
        family = socket.AF_INET6 if peer.remote and ":" in peer.remote[0] else socket.AF_INET
        where: dict[str, object] = (
            {"peer": describe(peer.remote, family)} if peer.remote is not None
            else {"peer_uid": peer.uid, "peer_gid": peer.gid})
        self.log.event("refuse", "notice", service=service.name, **where, reason=reason,
                       **detail)

    # -- rate suspension ----------------------------------------------------------

    def _suspend(self, state: ServiceState, until_s: float, reason: str = "rate") -> None:
        state.suspended_until_s = until_s
        for lst in state.listeners:
            if lst.sock in self.selector.get_map():
                self.selector.unregister(lst.sock)
        self.log.event("suspend", "warning", service=state.service.name, reason=reason,
                       pause=f"{until_s - time.monotonic():.3f}s")

    def _resume_due_services(self) -> None:
        now = time.monotonic()
        for state in self.services.values():
            if state.suspended_until_s is not None and state.suspended_until_s <= now:
                state.suspended_until_s = None
                if not state.draining and not self.stopping:
                    self._arm(state)
                self.log.event("resume", service=state.service.name)

    # -- PROXY protocol headers ---------------------------------------------------

    def _await_proxy_header(self, service: Service, listener: Listener, conn: socket.socket,
                            remote: tuple[str, int], now: float) -> None:
        """Watch a new connection until its PROXY header arrives (or its time is up)."""
        assert service.proxy is not None
        balancer = Peer.of(conn, "tcp", remote)
        if not service.proxy.trusted.permits_ip(remote[0]):
            conn.close()
            self._refuse(service, balancer, "proxy", msg="not a trusted load balancer")
            return
        if len(self.proxy_waits) >= MAX_PROXY_WAITS:
            conn.close()
            self._refuse(service, balancer, "proxy", msg="too many headers pending")
            return
        conn.setblocking(False)
        wait = ProxyWait(conn, remote, listener, now + service.proxy.timeout_s)
        self.proxy_waits.add(wait)
        self.selector.register(conn, selectors.EVENT_READ, wait)

    def _proxy_header(self, wait: ProxyWait) -> None:
        assert isinstance(wait.listener, Listener)
        state = self.services.get(wait.listener.service)
        try:
            header = wait.read()
        except ProxyError as e:
            self._end_proxy_wait(wait, f"bad PROXY header: {e}")
            return
        if header is None:
            return
        if state is None or self.stopping:
            self._end_proxy_wait(wait, "service gone")
            return
        self.proxy_waits.discard(wait)
        self.selector.unregister(wait.conn)
        with wait.conn as conn:
            conn.setblocking(True)
            local = conn.getsockname()[:2]
            peer = Peer("tcp", remote=header.source or wait.remote,
                        local=header.dest or (local[0], local[1]))
            self._admit(state.service, wait.listener, conn, peer, peer.remote)

    def _end_proxy_wait(self, wait: ProxyWait, why: str) -> None:
        """Refuse a connection whose PROXY header is bad, late or never came."""
        assert isinstance(wait.listener, Listener)
        self.proxy_waits.discard(wait)
        if wait.conn in self.selector.get_map():
            self.selector.unregister(wait.conn)
        balancer = Peer("tcp", remote=wait.remote)
        wait.conn.close()
        state = self.services.get(wait.listener.service)
        if state is not None:
            self._refuse(state.service, balancer, "proxy", msg=why)

    def _expire_proxy_waits(self) -> None:
        now = time.monotonic()
        for wait in [w for w in self.proxy_waits if w.deadline_s <= now]:
            self._end_proxy_wait(wait, "no PROXY header in time")

    def hand_over(self, listener: Listener, service: Service) -> None:
        """Wait mode: the child gets the listening socket itself until it exits."""
        self.selector.unregister(listener.sock)
        listener.busy = True
        peer = Peer.of(listener.sock, listener.address.proto, None)
        if not self._start(service, listener, listener.sock, peer, None):
            listener.busy = False
            self.selector.register(listener.sock, selectors.EVENT_READ, listener)

    def _start(self, service: Service, listener: Listener, conn: socket.socket, peer: Peer,
               remote: object, counted: bool = False, source: str | None = None) -> bool:
        """Start the child for one connection (or wait-mode socket); False if it failed.

        `counted` says the connection was admitted under the service's limits (as
        `source`), to be uncounted when its child ends. A spawner starts its program
        asynchronously: the child is recorded when it reports the pid (_spawned).
        """
        state = self.services[service.name]
        identity = service.identity
        try:
            tune(conn, service)
            if service.kind == "exec":
                # Even as netd's own user: the spawner's posix_spawn then runs beside the
                # supervisor's loop, on the other core (measured: ~25% more connections/s
                # than spawning from the loop itself).
                env = exec_env(service, peer)
                stderr_fd = state.stderr_w if service.stderr == "log" else None
                spawner = self._spawner(identity)
                self.next_token += 1
                spawner.request(self.next_token, service.program or service.argv[0],
                                service.argv, env, conn.fileno(), stderr_fd or self.devnull)
                self.pending[self.next_token] = Pending(
                    service.name, listener, peer, spawner, time.monotonic(), counted, source)
                if spawner.held:
                    self._hold_back(spawner, listener)
                return True
            else:
                pid = fork_child(lambda: serve_connection(service, conn, remote),
                                 [conn.fileno(), *self.log.fds()], self.log, service.name,
                                 identity)
        except OSError as e:
            self.log.event("error", "err", service=service.name, msg=f"cannot start child: {e}")
            return False
        child = Child(pid, service.name, time.monotonic(), counted=counted, source=source)
        self._started(child, service, listener, peer)
        return True

    def _started(self, child: Child, service: Service, listener: Listener,
                 peer: Peer) -> None:
        waits = service.waits(listener.address)
        pid = child.pid
        child.listener = listener if waits else None
        self.children[pid] = child
        if service.max_duration_s is not None:
            self._expire_at(child.started_s + service.max_duration_s, child, signal.SIGTERM)
        state = self.services[service.name]
        state.children.add(pid)
        state.accepted += 1
        self._log_accept(service, listener, peer, pid, waits)
        if self.notifier.enabled and time.monotonic() - self.last_status_s >= STATUS_EVERY_S:
            self.notifier.status(self._status_line())

    # -- spawners -----------------------------------------------------------------

    def _spawner(self, identity: Identity) -> Spawner:
        spawner = self.spawners.get(identity)
        failed_s = self.spawner_failed_s.get(identity)
        if spawner is None and failed_s is not None \
                and time.monotonic() - failed_s < SPAWNER_RETRY_S:
            # It could not take this identity a moment ago: do not fork one per connection.
            raise OSError(f"no spawner for user {identity.user} (it failed; retrying "
                          f"{SPAWNER_RETRY_S:g}s after)")
        if spawner is None:
            spawner = Spawner(identity, self.log.fds())
            self.spawners[identity] = spawner
            self.selector.register(spawner.sock, selectors.EVENT_READ, spawner)
        return spawner

    def _hold_back(self, spawner: Spawner, listener: Listener) -> None:
        """The spawner is behind: stop accepting on `listener` (connections wait in the
        kernel's backlog) and wake when the spawner's socket has room."""
        if listener.sock in self.selector.get_map() and not listener.busy:
            self.selector.unregister(listener.sock)
        self.held_back.setdefault(spawner, set()).add(listener)
        self.selector.modify(spawner.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                             spawner)

    def _catch_up(self, spawner: Spawner) -> None:
        """Send what the spawner held; once all is through, accept again."""
        spawner.flush()
        if spawner.held or spawner not in self.held_back:
            return
        self.selector.modify(spawner.sock, selectors.EVENT_READ, spawner)
        for listener in self.held_back.pop(spawner):
            state = self.services.get(listener.service)
            if state is not None and listener in state.listeners and not self.stopping:
                self._arm(state)

    def _spawner_events(self, spawner: Spawner) -> None:
        if spawner.held:
            self._catch_up(spawner)
        events = spawner.events()
        for event in events or ():
            if "exit" in event:
                self._child_exited(int(event["exit"]), int(event["status"]))
            elif "fatal" in event:
                self.spawner_failed_s[spawner.identity] = time.monotonic()
                self.log.event("error", "err", user=spawner.identity.user,
                               msg=f"spawner failed: {event['fatal']}")
            else:
                self._spawned(event)
        if events is None:
            self._drop_spawner(spawner)

    def _spawned(self, event: dict[str, Any]) -> None:
        pending = self.pending.pop(int(event["token"]), None)
        if pending is None:
            return
        state = self.services.get(pending.service)
        if "pid" in event and state is not None:
            child = Child(int(event["pid"]), pending.service, pending.asked_s,
                          spawner=pending.spawner, counted=pending.counted,
                          source=pending.source)
            self._started(child, state.service, pending.listener, pending.peer)
            return
        self.log.event("error", "err", service=pending.service,
                       msg=f"cannot start child: {event.get('error', 'service gone')}")
        self._unpend(pending)

    def _unpend(self, pending: Pending) -> None:
        """A connection handed to a spawner got no child: free what it held."""
        state = self.services.get(pending.service)
        if state is not None and pending.counted:
            state.counters.ended(pending.source)
        if pending.listener.busy:
            self._rearm(pending.listener)

    def _drop_spawner(self, spawner: Spawner) -> None:
        """A spawner went away: fail what it had not started yet."""
        if self.spawners.get(spawner.identity) is spawner:
            del self.spawners[spawner.identity]
        for listener in self.held_back.pop(spawner, set()):
            state = self.services.get(listener.service)
            if state is not None and listener in state.listeners and not self.stopping:
                self._arm(state)
        if spawner.sock.fileno() >= 0:
            self.selector.unregister(spawner.sock)
            spawner.close()
        for token, pending in list(self.pending.items()):
            if pending.spawner is spawner:
                del self.pending[token]
                self._unpend(pending)

    def _log_accept(self, service: Service, listener: Listener, peer: Peer, pid: int,
                    waits: bool) -> None:
        family = listener.address.family
        local = describe(peer.local, family) if peer.local else listener.local
        level = "info" if service.log_accept else "debug"
        if waits:
            self.log.event("accept", level, service=service.name, proto=listener.address.proto,
                           local=local, pid=pid, mode="wait")
        elif peer.remote is not None:
            self.log.event("accept", level, service=service.name, proto=listener.address.proto,
                           peer=describe(peer.remote, family), local=local, pid=pid)
        else:
            self.log.event("accept", level, service=service.name, proto=listener.address.proto,
                           local=local, peer_pid=peer.pid, peer_uid=peer.uid,
                           peer_gid=peer.gid, pid=pid)

    def answer_datagrams(self, listener: Listener, service: Service) -> None:
        """A UDP builtin: answer each queued datagram right here, no child needed."""
        assert service.builtin is not None
        reply_to = BUILTINS[service.builtin].datagram
        # This loop is the whole cost of a UDP request: what is constant is hoisted.
        sock = listener.sock
        access = service.access if service.access.restricts_ip else None
        logged = self.log.wants("debug")
        for _ in range(DATAGRAMS_PER_WAKEUP):
            try:
                request, remote = sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # an ICMP error queued for an earlier reply
            if remote[1] in SMALL_SERVICE_PORTS:
                continue
            if access is not None and not access.permits_ip(remote[0]):
                self._refuse(service, Peer("udp", remote=remote), "access")
                continue
            reply = reply_to(request)
            if reply is not None:
                try:
                    sock.sendto(reply, remote)
                except OSError:
                    pass  # a full send buffer drops the reply, as UDP may
            if logged:
                self.log.event("datagram", "debug", service=service.name, proto="udp",
                               peer=describe(remote, listener.address.family),
                               local=listener.local)

    # -- children ---------------------------------------------------------------

    def reap(self) -> None:
        """Collect every child that has exited, log it, and re-arm wait-mode sockets."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            spawner = next((s for s in self.spawners.values() if s.pid == pid), None)
            if spawner is not None:
                self.log.event("error", "err", user=spawner.identity.user,
                               msg=f"spawner exited (status {status})")
                self._drop_spawner(spawner)
            self._child_exited(pid, status)

    def _child_exited(self, pid: int, status: int) -> None:
        """Log a child's end and free what it held."""
        child = self.children.pop(pid, None)
        if child is None:
            return
        if len(self.expiries) > 2 * len(self.children) + 64:
            # Drop the deadlines of children that ended in time, so the heap stays
            # the size of what runs, whatever max_duration is.
            self.expiries = [e for e in self.expiries if self.children.get(e[2].pid) is e[2]]
            heapq.heapify(self.expiries)
        duration = f"{time.monotonic() - child.started_s:.3f}s"
        state = self.services.get(child.service)
        if os.WIFSIGNALED(status):
            self.log.event("exit", "warning", service=child.service, pid=pid,
                           signal=signal.Signals(os.WTERMSIG(status)).name, duration=duration)
        else:
            self.log.event("exit", "info" if state is None or state.service.log_exit else "debug",
                           service=child.service, pid=pid,
                           status=os.waitstatus_to_exitcode(status), duration=duration)
        if child.listener is not None:
            self._rearm(child.listener)
        if state is not None and child.counted:
            state.counters.ended(child.source)
        if state is not None and child.worker_of == state.generation:
            self._worker_lost(state, child)
        if state is not None:
            state.children.discard(pid)
            if not state.children:
                # The pipe is shared by the service's children: with none left, a last
                # line without its newline is complete.
                self._drain_stderr(state)
            self._forget_if_done(state)

    # -- prefork workers --------------------------------------------------------

    def _start_workers(self, state: ServiceState) -> None:
        """Start the workers a service is missing (not while a restart waits)."""
        service = state.service
        running = sum(1 for pid in state.children
                      if self.children[pid].worker_of == state.generation)
        if self.stopping or service.name in self.restarts:
            return
        sockets = [lst.sock for lst in state.listeners
                   if service.mode(lst.address) == "workers"]
        # Imported here, not at the top: asyncio (and the ssl it pulls in) is ~9 MB the
        # supervisor carries only when some service runs workers.
        from netd.workers import run_worker

        for _ in range(service.workers - running):
            try:
                pid = fork_child(lambda: run_worker(service, sockets, self.log),
                                 [s.fileno() for s in sockets] + self.log.fds(), self.log,
                                 service.name, service.identity)
            except OSError as e:
                self.log.event("error", "err", service=service.name,
                               msg=f"cannot start worker: {e}")
                return
            self.children[pid] = Child(pid, service.name, time.monotonic(),
                                       worker_of=state.generation)
            state.children.add(pid)
            self.log.event("worker", service=service.name, pid=pid,
                           generation=state.generation)

    def _worker_lost(self, state: ServiceState, child: Child) -> None:
        """A current worker died: restart it, backing off while it keeps dying young."""
        if self.stopping or state.draining:
            return
        lived_s = time.monotonic() - child.started_s
        state.worker_failures = 0 if lived_s >= WORKER_STABLE_S else state.worker_failures + 1
        delay_s = min(WORKER_BACKOFF_MAX_S, WORKER_BACKOFF_S * 2 ** state.worker_failures)
        self.restarts[state.service.name] = time.monotonic() + delay_s
        self.log.event("restart", "warning", service=state.service.name,
                       delay=f"{delay_s:.3f}s", failures=state.worker_failures)

    def _restart_due_workers(self) -> None:
        now = time.monotonic()
        for name, due_s in list(self.restarts.items()):
            if due_s <= now:
                del self.restarts[name]
                state = self.services.get(name)
                if state is not None and not state.draining:
                    self._start_workers(state)

    def _retire_workers(self, state: ServiceState) -> None:
        """Ask workers of an older generation to finish what they serve and leave."""
        self.restarts.pop(state.service.name, None)
        for pid in state.children:
            child = self.children[pid]
            if child.worker_of is not None and (state.draining
                                                or child.worker_of != state.generation):
                _signal_group(pid, signal.SIGTERM)

    # -- max_duration ---------------------------------------------------------------

    def _expire_at(self, when_s: float, child: Child, sig: signal.Signals) -> None:
        heapq.heappush(self.expiries, (when_s, next(self.expiry_order), child, sig))

    def _expire_children(self) -> None:
        """SIGTERM children past max_duration; SIGKILL them KILL_GRACE_S later."""
        now = time.monotonic()
        while self.expiries and self.expiries[0][0] <= now:
            _, _, child, sig = heapq.heappop(self.expiries)
            if self.children.get(child.pid) is not child:
                continue  # it ended in time
            self.log.event("timeout", "warning", service=child.service, pid=child.pid,
                           reason="max_duration", signal=sig.name)
            _signal_group(child.pid, sig)
            if sig == signal.SIGTERM:
                self._expire_at(now + KILL_GRACE_S, child, signal.SIGKILL)

    def _rearm(self, listener: Listener) -> None:
        """A wait-mode socket is free again: watch it (unless it was closed meanwhile)."""
        listener.busy = False
        live = listener.sock.fileno() >= 0 and not self.stopping
        if live and listener.sock not in self.selector.get_map():
            self.selector.register(listener.sock, selectors.EVENT_READ, listener)

    def _signal_children(self, sig: int) -> None:
        for pid in self.children:
            _signal_group(pid, sig)

    # -- exec children's stderr ---------------------------------------------------

    def _read_stderr(self, state: ServiceState, final: bool = False) -> None:
        """Log the complete lines waiting in a service's stderr pipe; with `final`, the
        unfinished last one too."""
        assert state.stderr_r is not None
        try:
            data = os.read(state.stderr_r, 65536)
        except BlockingIOError:
            data = b""
        lines = (state.stderr_partial + data).split(b"\n")
        state.stderr_partial = lines.pop()
        if final or len(state.stderr_partial) > STDERR_LINE_MAX:
            lines.append(state.stderr_partial)
            state.stderr_partial = b""
        for line in lines:
            if line.strip():
                self.log.event("stderr", "warning", service=state.service.name,
                               msg=line[:STDERR_LINE_MAX].decode("utf-8", "replace").rstrip("\r"))

    def _drain_stderr(self, state: ServiceState) -> None:
        if state.stderr_r is not None:
            self._read_stderr(state, final=True)

    # -- the control socket -------------------------------------------------------

    def _accept_control(self) -> None:
        assert self.control is not None
        try:
            conn, _ = self.control.accept()
        except OSError:
            return
        try:
            if len(self.control_requests) >= MAX_PENDING:
                raise BadRequest("too many control requests at once")
            request = ControlRequest.accept(conn, time.monotonic())
        except (BadRequest, OSError) as e:
            self.log.event("control", "warning", result="refused", reason=str(e))
            with conn:
                send_reply(conn, {"ok": False, "error": str(e)})
            return
        self.control_requests.add(request)
        self.selector.register(conn, selectors.EVENT_READ, request)

    def _serve_control(self, request: ControlRequest) -> None:
        try:
            command = request.read()
        except BadRequest as e:
            self._end_control(request, str(e))
            return
        if command is None:
            return
        self._end_control(request, None)
        with request.conn as conn:
            if command == "status":
                send_reply(conn, {"ok": True, **self.status()})
            elif command == "reload":
                send_reply(conn, self.reload())
            else:
                send_reply(conn, {"ok": True, "pid": os.getpid()})
                self.stop("control")

    def _end_control(self, request: ControlRequest, refused: str | None) -> None:
        """Stop watching a control connection; refuse it (and close it) if `refused`."""
        self.control_requests.discard(request)
        if request.conn in self.selector.get_map():
            self.selector.unregister(request.conn)
        if refused is not None:
            self.log.event("control", "warning", result="refused", reason=refused)
            with request.conn:
                send_reply(request.conn, {"ok": False, "error": refused})

    def _expire_control_requests(self) -> None:
        now = time.monotonic()
        for request in [r for r in self.control_requests if r.deadline_s <= now]:
            self._end_control(request, "no complete request in time")

    def status(self) -> dict[str, Any]:
        """What `netd status` shows: the daemon, then every service with its counters."""
        return {
            "daemon": {
                "pid": os.getpid(), "version": __version__, "config": self.config.path,
                "started": self.started_wall,
                "uptime_s": round(time.monotonic() - self.started_s, 3),
                "children": len(self.children), "last_reload": self.last_reload,
            },
            "services": [
                {"name": name, "state": state.state(), "handler": state.service.handler,
                 "listen": [{"address": lst.local, "proto": lst.address.proto,
                             "mode": state.service.mode(lst.address),
                             "busy": lst.busy} for lst in state.listeners],
                 "children": len(state.children), "accepted": state.accepted,
                 "refused": state.refused}
                for name, state in self.services.items()
            ] + [{"name": off.name, "state": "disabled", "handler": off.handler,
                  "origin": off.origin, "listen": [], "children": 0, "accepted": 0,
                  "refused": 0} for off in self.config.disabled],
        }

    def _status_line(self) -> str:
        self.last_status_s = time.monotonic()
        accepted = sum(s.accepted for s in self.services.values())
        return (f"{len(self.services)} services, {len(self.children)} children, "
                f"{accepted} accepted")

    # -- stopping ---------------------------------------------------------------

    def _stop_listening(self) -> None:
        for state in self.services.values():
            for lst in state.listeners:
                self._close_listener(lst)
            state.listeners = []
        for request in list(self.control_requests):
            self._end_control(request, "netd is stopping")
        for wait in list(self.proxy_waits):
            self._end_proxy_wait(wait, "netd is stopping")
        if self.control is not None:
            if self.control in self.selector.get_map():
                self.selector.unregister(self.control)
            self.control.close()
            remove_unix(Address(spec="control", scheme="unix", path=self.config.daemon.control))
            self.control = None

    def close_all(self) -> None:
        """Close every socket and pipe this supervisor holds (children are not touched)."""
        self._stop_listening()
        for state in self.services.values():
            for fd in (state.stderr_r, state.stderr_w):
                if fd is not None:
                    os.close(fd)
            state.stderr_r = state.stderr_w = None
        for sock in self.passed.values():
            sock.close()
        for spawner in self.spawners.values():
            spawner.close()  # it exits when its socket closes
            try:
                os.waitpid(spawner.pid, 0)
            except ChildProcessError:
                pass
        self.spawners.clear()
        self.selector.close()
        os.close(self.devnull)
        self.wakeup_r.close()
        self.wakeup_w.close()


def _signal_group(pid: int, sig: int) -> None:
    """Signal a child and what it started: every child leads its own session and group."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _policy_peer(peer: Peer) -> str | UnixPeer:
    """Who a connection is from, as the access and limits policy sees it."""
    if peer.remote is not None:
        return peer.remote[0]
    return UnixPeer(peer.uid, peer.gid)


def _note_signal(signum: int, frame: object) -> None:
    """The signal number reaches the loop through the wake-up fd; nothing to do here."""
