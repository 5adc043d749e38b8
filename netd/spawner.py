"""A spawner: the process that serves every service run as one identity.

The supervisor forks one spawner per identity (user, groups, limits, umask, cwd,
chroot); it takes that identity for good, then does all the per-connection work of
its services, tcpserver-style, so that nothing changes identity per connection and
the supervisor does no work per connection at all:

- nowait: accept, apply the policy (access, limits, rate), start a child for each
  connection (posix_spawn of a program, or a fork for a python handler);
- wait: hand the listening socket itself to one child, and watch it again once the
  child has exited;
- inline: a builtin answers each datagram, or serves each stream connection, right
  here in the loop, with no child.

It logs each accept, exit and refusal itself, and reports to the supervisor in
batches (netd.reports). A reload that changes what it serves starts a new spawner and
retires this one: it stops accepting, lets its children finish, and leaves.
"""

from __future__ import annotations

import signal
import socket
import time
from dataclasses import dataclass, field
from functools import partial

from netd import proctitle
from netd.children import Child, ChildPool, Ticket
from netd.config.model import Identity, Service
from netd.inline_server import InlineServer
from netd.listener import Listener
from netd.logs import Log
from netd.loop import EventLoop, Timer
from netd.peer import Peer, accept_fields, describe, refuse_fields
from netd.policy import Counters, RateWindow, Refuse, check_rate, decide, source_key
from netd.proxywait import ProxyGate
from netd.reaper import Reaper
from netd.reports import Reporter, Started, read_notes
from netd.shortage import (
    ACCEPT_SHORTAGES,
    RESOURCE_PAUSE_S,
    START_SHORTAGES,
    Waiter,
    what_ran_short,
)
from netd.spawn import (
    ExecSpawn,
    exec_env,
    fork_handler,
    ignored_signals,
    serve_python,
)
from netd.stderr import StderrPipe

ACCEPTS_PER_WAKEUP = 64


@dataclass(frozen=True)
class Plan:
    """What a spawner serves: its identity, its services with the sockets each serves
    through it, and the children of earlier spawners it must count (`inherited`)."""

    identity: Identity
    services: tuple[tuple[Service, tuple[Listener, ...]], ...]
    pool: ChildPool
    stop_timeout_s: float
    inherited: tuple[Started, ...] = ()


@dataclass(eq=False)
class Served:
    """One service as this spawner runs it."""

    service: Service
    listeners: tuple[Listener, ...]
    counters: Counters = field(default_factory=Counters)
    window: RateWindow | None = None
    stderr: StderrPipe | None = None
    state: str = "listening"
    resume_at: Timer | None = None
    running: int = 0  # children of its own this spawner started and has not reaped
    short: bool = False  # out of fds, processes or memory (netd.shortage) until it serves again
    waiting: list[Waiter] = field(default_factory=list)  # connections waiting out a shortage


class Spawner:
    """The loop of one spawner process; `run()` returns when it may leave."""

    def __init__(self, plan: Plan, link: socket.socket, log: Log, devnull: int,
                 stderr: dict[str, tuple[int, int]]) -> None:
        self.plan = plan
        self.link = link
        self.log = log
        self.devnull = devnull  # opened before a chroot could hide /dev/null
        self.stderr = stderr    # the pipes of `stderr: log` services, made by the supervisor
        self.loop = EventLoop()
        self.leaving: str | None = None  # "retire" or "stop"
        self.report = Reporter(link, self.loop, log.lost)
        self.children = Reaper(self.loop, log, self.report, self._ended)
        self.inline = InlineServer(self.loop, log, self.report,
                                   lambda service, peer, reason:
                                   self._refuse(self.served[service.name], peer, reason))
        self.served = {service.name: Served(service, listeners)
                       for service, listeners in plan.services}
        self.proxies: ProxyGate[tuple[Served, Listener]] = ProxyGate(
            self.loop, self._proxied, self._proxy_refused)
        for started in plan.inherited:
            self._inherit(started)
        self.loop.on_signals((signal.SIGCHLD, signal.SIGTERM), self._signals)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        # Made once the dispositions are set: it resets what this process ignores.
        self.spawn = ExecSpawn(ignored_signals())

    # -- setting up -----------------------------------------------------------------

    def run(self) -> None:
        """Serve until retired or stopped and every child has ended."""
        self.link.setblocking(False)
        self.loop.watch(self.link, self._notes)
        for served in self.served.values():
            self._serve(served)
        self.report.ready()
        self.children.reap()  # a child that ended before the handlers were in place
        while not self._done():
            self.report.send_due()  # what this wake-up did, in a batch now or soon
            self.log.pump(self.loop)
            self.loop.run_once()
        self.report.flush()
        self.log.wind_up()
        self.log.flush()

    def _serve(self, served: Served) -> None:
        """Bind each listener's callback once, by the mode its service runs it in."""
        service = served.service
        if service.limits.rate is not None:
            served.window = RateWindow(service.limits.rate)
        if service.name in self.stderr:
            served.stderr = StderrPipe(self.loop, self.log, service.name,
                                       *self.stderr[service.name])
        for listener in served.listeners:
            mode = service.mode(listener.address)
            if mode == "wait":
                listener.serve(self.loop, partial(self.wait, served, listener))
            elif mode == "inline" and not listener.address.is_stream:
                listener.serve(self.loop, partial(self.inline.datagrams, service, listener))
            else:
                listener.serve(self.loop, partial(self.nowait, served, listener))

    def _inherit(self, started: Started) -> None:
        """Count a child an earlier spawner started (the supervisor says when it ends)."""
        served = self.served.get(started.service)
        if served is None:
            return
        ticket = Ticket(served.counters, started.source, None)
        self.children.add(Child(started.pid, started.service, ticket,
                                wait_key=started.wait_key, own=False))
        if started.wait_key is not None:
            for listener in served.listeners:
                if str(listener.address) == started.wait_key:
                    listener.pause("busy")

    # -- nowait: a child (or an inline stream) per connection -----------------------

    def nowait(self, served: Served, listener: Listener) -> None:
        """Take what is queued on a stream listener, each connection through the policy."""
        service = served.service
        for _ in range(ACCEPTS_PER_WAKEUP):
            if served.window is not None:
                now = time.monotonic()
                suspend = check_rate(served.window, service.limits, now)
                if suspend is not None:
                    self.suspend(served, suspend.until_s, "rate")
                    return
                served.window.record(now)
            try:
                conn, remote = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in ACCEPT_SHORTAGES:
                    self._short(served, f"accept failed: {what_ran_short(e)}")
                    return
                self.log.event("error", "err", service=service.name,
                               msg=f"accept failed: {e.strerror}")
                continue
            if served.short:
                self._recovered(served)
            if service.proxy is not None:
                self.proxies.wait((served, listener), conn, remote, service.proxy)
            else:
                peer = Peer.of(conn, listener.address.proto, remote, listener.fixed_local)
                self._admit(served, listener, conn, peer, remote)
            if listener.paused:
                return

    def _admit(self, served: Served, listener: Listener, conn: socket.socket, peer: Peer,
               remote: object) -> None:
        """Apply access and limits to one connection, then serve it; `conn` is ours."""
        service = served.service
        pool = self.plan.pool
        decision = decide(service.access, service.limits, served.counters, peer,
                          pool.in_use(), pool.limit)
        inline = service.kind == "builtin"
        if isinstance(decision, Refuse):
            conn.close()
            self._refuse(served, peer, decision.reason)
            return
        if not inline and not pool.take():
            conn.close()
            self._refuse(served, peer, "max_children")
            return
        source = source_key(peer) if service.limits.per_source is not None else None
        ticket = Ticket(served.counters, source, None if inline else pool)
        if inline:
            self.inline.stream(service, conn, peer, _local(served, listener, peer), ticket)
        elif served.waiting:  # behind those that wait out a shortage
            served.waiting.append(Waiter(listener, conn, peer, remote, ticket))
        else:
            self._start(served, listener, conn, peer, remote, ticket, None)

    def _start(self, served: Served, listener: Listener, sock: socket.socket, peer: Peer,
               remote: object, ticket: Ticket | None, mode: str | None) -> None:
        """Start the child that serves `sock`: a connection (ours to close) or, in wait
        mode, the listening socket itself. An exec child is spawned (vfork + exec), a
        python handler's forked."""
        service = served.service
        waits = mode == "wait"
        try:
            if service.kind == "exec":
                stderr = served.stderr.write_fd if served.stderr is not None else self.devnull
                pid = self.spawn(service.program or service.argv[0], service.argv,
                                 exec_env(service, peer), sock.fileno(), stderr)
            else:
                pid = fork_handler(lambda: serve_python(service, sock, remote),
                                   [sock.fileno(), *self.log.fds()], self.log, service.name)
        except OSError as e:
            waiter = None
            if ticket is not None:  # a connection, not a wait-mode socket
                waiter = Waiter(listener, sock, peer, remote, ticket)
            self._not_started(served, listener, ticket, mode, e, waiter)
            return
        if not waits:
            sock.close()
        self._started(served, Child(pid, service.name, ticket,
                                    wait_key=str(listener.address) if waits else None),
                      listener, peer, mode)

    def _not_started(self, served: Served, listener: Listener, ticket: Ticket | None,
                     mode: str | None, error: OSError, waiter: Waiter | None) -> None:
        """A child could not be started: for want of processes, memory or fds, the
        service pauses and the connection (`waiter`, None in wait mode) waits first in
        line; for any other reason, the connection is closed."""
        self.report.failed(served.service.name)
        if mode == "wait":
            listener.resume("busy")
            self._note_state(served)
        if error.errno in START_SHORTAGES:
            if waiter is not None:
                served.waiting.insert(0, waiter)
            self._short(served, f"cannot start a child: {what_ran_short(error)}")
            return
        self.log.event("error", "err", service=served.service.name,
                       msg=f"cannot start child: {error}")
        if waiter is not None:
            waiter.drop()
        elif ticket is not None:
            ticket.release()

    def _started(self, served: Served, child: Child, listener: Listener, peer: Peer,
                 mode: str | None) -> None:
        service = served.service
        if served.short:
            self._recovered(served)
        child.log_exit = service.log_exit
        served.running += 1
        self.report.accepted(service.name)
        self.log.event("accept", "info" if service.log_accept else "debug",
                       **accept_fields(service.name, peer, _local(served, listener, peer),
                                       child.pid, mode))
        self.report.started(Started(child.pid, service.name, child.ticket.source
                                    if child.ticket else None, child.wait_key))
        if mode == "wait":
            self._note_state(served)
        self.children.add(child, service.max_duration_s)

    def _refuse(self, served: Served, peer: Peer, reason: str, **detail: object) -> None:
        self.report.refused(served.service.name, reason)
        self.log.event("refuse", "notice", **refuse_fields(served.service.name, peer, reason,
                                                           **detail))

    # -- wait: the child gets the socket itself -------------------------------------

    def wait(self, served: Served, listener: Listener) -> None:
        """Hand the listening socket to one child; watch it again once that child ends."""
        listener.pause("busy")
        peer = Peer.of(listener.sock, listener.address.proto, None)
        self._start(served, listener, listener.sock, peer, None, None, "wait")

    # -- PROXY protocol headers -----------------------------------------------------

    def _proxied(self, arrival: tuple[Served, Listener], conn: socket.socket,
                 peer: Peer) -> None:
        served, listener = arrival
        if self.leaving:
            conn.close()
            self._refuse(served, peer, "proxy", msg="service gone")
            return
        if served.service.kind != "builtin":
            conn.setblocking(True)
        self._admit(served, listener, conn, peer, peer.remote)

    def _proxy_refused(self, arrival: tuple[Served, Listener], balancer: Peer,
                       why: str) -> None:
        self._refuse(arrival[0], balancer, "proxy", msg=why)

    # -- suspending over a rate or a shortage ---------------------------------------

    def suspend(self, served: Served, until_s: float, reason: str) -> None:
        """Stop accepting for the service until `until_s`; connections wait in the backlog."""
        if served.resume_at is not None:
            return
        for listener in served.listeners:
            listener.pause("suspended")
        served.resume_at = self.loop.at(until_s, lambda: self.resume(served))
        if reason != "resources":  # a shortage is said once, when it begins (_short)
            self.log.event("suspend", "warning", service=served.service.name, reason=reason,
                           pause=f"{until_s - time.monotonic():.3f}s")
        self._note_state(served)

    def resume(self, served: Served) -> None:
        """Accept again after a suspension; after a shortage, try again: with the first
        connection that waits (the others follow once it has its child), or with the
        next one accepted."""
        served.resume_at = None
        if served.short and served.waiting:
            waiter = served.waiting.pop(0)
            self._start(served, waiter.listener, waiter.conn, waiter.peer, waiter.remote,
                        waiter.ticket, None)
            return
        for listener in served.listeners:
            listener.resume("suspended")
        if not served.short:
            self.log.event("resume", service=served.service.name)
        self._note_state(served)

    def _short(self, served: Served, msg: str) -> None:
        """Out of fds, processes or memory: pause, and try again every RESOURCE_PAUSE_S;
        said once, when the shortage begins (netd.shortage)."""
        if not served.short:
            served.short = True
            self.log.event("suspend", "warning", service=served.service.name,
                           reason="resources", pause=f"{RESOURCE_PAUSE_S:.3f}s",
                           msg=f"{msg}; connections wait, tried again every "
                               f"{RESOURCE_PAUSE_S:g}s until it clears")
        self.suspend(served, time.monotonic() + RESOURCE_PAUSE_S, "resources")

    def _recovered(self, served: Served) -> None:
        """A connection got through again after a shortage: the ones waiting follow, and
        the service accepts again."""
        served.short = False
        self.log.event("resume", service=served.service.name)
        if served.resume_at is None:  # not paused meanwhile (by the rate or a new shortage)
            for listener in served.listeners:
                listener.resume("suspended")
        waiting, served.waiting = served.waiting, []
        for i, waiter in enumerate(waiting):
            if served.short:  # short again: the rest wait on, in their order
                served.waiting.extend(waiting[i:])
                break
            self._start(served, waiter.listener, waiter.conn, waiter.peer, waiter.remote,
                        waiter.ticket, None)
        self._note_state(served)

    def _note_state(self, served: Served) -> None:
        paused = [listener.paused for listener in served.listeners]
        state = ("suspended" if served.resume_at is not None or served.short
                 else "busy" if paused and all("busy" in p for p in paused) else "listening")
        if state != served.state:
            served.state = state
            self.report.state(served.service.name, state)

    # -- children -------------------------------------------------------------------

    def _ended(self, child: Child, status: int | None) -> None:
        """What a child held in its service, now free."""
        served = self.served.get(child.service)
        if served is None:
            return
        if child.wait_key is not None:
            for listener in served.listeners:
                if str(listener.address) == child.wait_key:
                    listener.resume("busy")
            self._note_state(served)
        if child.own:
            served.running -= 1
            if served.stderr is not None and not served.running:
                # The pipe is shared by the service's children: with none left, a last
                # line without its newline is complete.
                served.stderr.drain()

    # -- what the supervisor and signals say ----------------------------------------

    def _signals(self, received: set[int]) -> None:
        if signal.SIGTERM in received:
            self.leave("stop")
        self.children.reap()

    def _notes(self) -> None:
        notes = read_notes(self.link)
        if notes is None:  # the supervisor has gone: stop accepting, let children finish
            self.loop.unwatch(self.link)
            self.leave("retire")
            return
        for note in notes:
            if note.get("retire"):
                self.leave("retire")
            elif "stop" in note:
                self.leave("stop", float(note["stop"]))
            if "sync" in note:
                self.report.sync(int(note["sync"]))
            for pid in note.get("ended", ()):
                self.children.forget(int(pid))

    def leave(self, how: str, stop_timeout_s: float | None = None) -> None:
        """retire: stop accepting and leave once the children have ended; stop: also
        end the children (SIGTERM, then SIGKILL after `stop_timeout_s`, by default
        daemon.stop_timeout as it was when this spawner started)."""
        if self.leaving == how or self.leaving == "stop":
            return
        self.leaving = how
        proctitle.spawner(self.plan.identity.user, list(self.served), how)
        for served in self.served.values():
            for listener in served.listeners:
                listener.close()
            if how == "retire" and served.waiting:
                continue  # it still starts the connections waiting out a shortage
            self.loop.cancel(served.resume_at)
            for waiter in served.waiting:
                waiter.drop()
            served.waiting.clear()
        self.proxies.fail_all("netd is stopping" if how == "stop" else "service gone")
        if how == "stop":
            self.inline.close_all("stop")
            self.children.stop(self.plan.stop_timeout_s if stop_timeout_s is None
                               else stop_timeout_s)

    def _done(self) -> bool:
        return (self.leaving is not None and not self.inline.streams and not self.proxies
                and not self.children.running()
                and not any(served.waiting for served in self.served.values()))


def _local(served: Served, listener: Listener, peer: Peer) -> str:
    """The local address of a connection as logs show it: the listener's own, unless it
    listens on every address or a PROXY header told another."""
    if peer.local is not None and (listener.wildcard or served.service.proxy is not None):
        return describe(peer.local, peer.family)
    return listener.local
