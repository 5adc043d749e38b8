"""The supervisor: one event loop over every listener, the signal wake-up fd and the
stderr pipes of exec children; it accepts, starts children, reaps them and stops.

Signal handlers do nothing but let Python write the signal number to the wake-up
socket; the loop reads those numbers and does the work. With nothing to do, the loop
sleeps in select() with no timeout: zero CPU at rest.
"""

from __future__ import annotations

import errno
import os
import selectors
import signal
import socket
import time
from dataclasses import dataclass, field

from netd import __version__
from netd.config import Address, Config, Service
from netd.handlers.builtins import BUILTINS
from netd.handlers.python import load_handler
from netd.logs import Log
from netd.sockets import bind, describe, remove_unix
from netd.spawn import Peer, exec_env, fork_child, spawn_exec

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
ACCEPTS_PER_WAKEUP = 64
DATAGRAMS_PER_WAKEUP = 64
STDERR_LINE_MAX = 2048
STOP_TIMEOUT_S = 10.0


@dataclass
class Listener:
    """One bound socket of a service; in wait mode, `busy_pid` holds it while a child runs."""

    service: str
    address: Address
    sock: socket.socket
    local: str
    busy_pid: int | None = None


@dataclass
class Child:
    """A running child and what it serves."""

    pid: int
    service: str
    started_s: float
    listener: Listener | None = None


@dataclass
class ServiceState:
    """A configured service at run time: its sockets, its children, its counters."""

    service: Service
    listeners: list[Listener] = field(default_factory=list)
    children: set[int] = field(default_factory=set)
    accepted: int = 0
    env: dict[str, str] = field(default_factory=dict)
    stderr_r: int | None = None
    stderr_w: int | None = None
    stderr_partial: bytes = b""


class Supervisor:
    """Owns the sockets and children of one config; `run()` serves until stopped."""

    def __init__(self, config: Config, log: Log) -> None:
        self.config = config
        self.log = log
        self.selector = selectors.DefaultSelector()
        self.services: dict[str, ServiceState] = {}
        self.children: dict[int, Child] = {}
        self.stopping: str | None = None
        self.devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        self.wakeup_r, self.wakeup_w = socket.socketpair()

    # -- start-up ---------------------------------------------------------------

    def bind_all(self) -> None:
        """Bind every service's addresses; raises BindError (nothing left bound) on failure."""
        self.log.event("start", version=__version__, pid=os.getpid(), config=self.config.path)
        try:
            for service in self.config.services:
                self.services[service.name] = self._open_service(service)
        except OSError:
            self.close_all()
            raise
        listeners = sum(len(s.listeners) for s in self.services.values())
        self.log.event("ready", services=len(self.services), listeners=listeners)

    def _open_service(self, service: Service) -> ServiceState:
        state = ServiceState(service, env=dict(service.env))
        for address in service.listen:
            sock = bind(address, service.backlog, blocking=service.waits(address))
            local = describe(sock.getsockname(), sock.family)
            listener = Listener(service.name, address, sock, local)
            state.listeners.append(listener)
            self.selector.register(sock, selectors.EVENT_READ, listener)
            self.log.event("listen", service=service.name, proto=address.proto,
                           local=listener.local, mode=service.mode(address))
        if service.kind == "exec" and service.stderr == "log":
            state.stderr_r, state.stderr_w = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(state.stderr_r, False)
            self.selector.register(state.stderr_r, selectors.EVENT_READ, state)
        return state

    # -- the loop ---------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT, then stop gracefully; returns the exit code."""
        self.wakeup_r.setblocking(False)
        self.wakeup_w.setblocking(False)
        signal.set_wakeup_fd(self.wakeup_w.fileno(), warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, _note_signal)
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, None)
        deadline_s: float | None = None
        while not (self.stopping and not self.children):
            timeout = None if deadline_s is None else max(0.0, deadline_s - time.monotonic())
            for key, _ in self.selector.select(timeout):
                self._dispatch(key.data)
            if self.stopping and deadline_s is None:
                deadline_s = time.monotonic() + STOP_TIMEOUT_S
                self._signal_children(signal.SIGTERM)
            elif deadline_s is not None and time.monotonic() >= deadline_s and self.children:
                self._signal_children(signal.SIGKILL)
                deadline_s = time.monotonic() + STOP_TIMEOUT_S
        self._drain_stderr()
        self.close_all()
        self.log.event("stop", signal=self.stopping)
        return 0

    def _dispatch(self, target: object) -> None:
        if target is None:
            self._handle_signals()
        elif isinstance(target, Listener):
            service = self.services[target.service].service
            if target.address.is_stream and not service.waits(target.address):
                self.accept(target, service)
            elif service.kind == "builtin":
                self.answer_datagrams(target, service)
            else:
                self.hand_over(target, service)
        elif isinstance(target, ServiceState):
            self._read_stderr(target)

    def _handle_signals(self) -> None:
        try:
            received = self.wakeup_r.recv(256)
        except BlockingIOError:
            return
        for signum in set(received):
            if signum == signal.SIGCHLD:
                self.reap()
            elif signum in (signal.SIGTERM, signal.SIGINT) and not self.stopping:
                self.stopping = signal.Signals(signum).name
                self._stop_listening()
        self.reap()

    # -- serving ----------------------------------------------------------------

    def accept(self, listener: Listener, service: Service) -> None:
        """Accept what is queued on a nowait stream listener and start a child for each."""
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                conn, remote = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.log.event("error", "err", service=service.name,
                               msg=f"accept failed: {e.strerror}")
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return
                continue
            with conn:
                peer = Peer.of(conn, listener.address.proto, remote)
                self._start(service, listener, conn, peer, remote)

    def hand_over(self, listener: Listener, service: Service) -> None:
        """Wait mode: the child gets the listening socket itself until it exits."""
        self.selector.unregister(listener.sock)
        peer = Peer.of(listener.sock, listener.address.proto, None)
        pid = self._start(service, listener, listener.sock, peer, None)
        if pid is None:
            self.selector.register(listener.sock, selectors.EVENT_READ, listener)
        else:
            listener.busy_pid = pid

    def _start(self, service: Service, listener: Listener, conn: socket.socket, peer: Peer,
               remote: object) -> int | None:
        state = self.services[service.name]
        try:
            if service.kind == "exec":
                env = exec_env(state.env, service.name, peer)
                stderr_fd = self.devnull if state.stderr_w is None else state.stderr_w
                pid = spawn_exec(service.argv, env, conn.fileno(), stderr_fd)
            else:
                pid = fork_child(lambda: _serve(service, conn, remote),
                                 [conn.fileno(), *self.log.fds()], self.log, service.name)
        except OSError as e:
            self.log.event("error", "err", service=service.name, msg=f"cannot start child: {e}")
            return None
        waits = service.waits(listener.address)
        self.children[pid] = Child(pid, service.name, time.monotonic(),
                                   listener if waits else None)
        state.children.add(pid)
        state.accepted += 1
        self._log_accept(service, listener, peer, pid, waits)
        return pid

    def _log_accept(self, service: Service, listener: Listener, peer: Peer, pid: int,
                    waits: bool) -> None:
        family = listener.address.family
        local = describe(peer.local, family) if peer.local else listener.local
        if waits:
            self.log.event("accept", service=service.name, proto=listener.address.proto,
                           local=local, pid=pid, mode="wait")
        elif peer.remote is not None:
            self.log.event("accept", service=service.name, proto=listener.address.proto,
                           peer=describe(peer.remote, family), local=local,
                           pid=pid)
        else:
            self.log.event("accept", service=service.name, proto=listener.address.proto,
                           local=local, peer_pid=peer.pid, peer_uid=peer.uid,
                           peer_gid=peer.gid, pid=pid)

    def answer_datagrams(self, listener: Listener, service: Service) -> None:
        """A UDP builtin: answer each queued datagram right here, no child needed."""
        assert service.builtin is not None
        reply_to = BUILTINS[service.builtin].datagram
        for _ in range(DATAGRAMS_PER_WAKEUP):
            try:
                request, remote = listener.sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # an ICMP error queued for an earlier reply
            if _reflection_risk(remote):
                continue
            reply = reply_to(request)
            if reply is not None:
                try:
                    listener.sock.sendto(reply, remote)
                except OSError:
                    pass  # a full send buffer drops the reply, as UDP may
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
            child = self.children.pop(pid, None)
            if child is None:
                continue
            duration = f"{time.monotonic() - child.started_s:.3f}s"
            if os.WIFSIGNALED(status):
                self.log.event("exit", "warning", service=child.service, pid=pid,
                               signal=signal.Signals(os.WTERMSIG(status)).name, duration=duration)
            else:
                self.log.event("exit", service=child.service, pid=pid,
                               status=os.waitstatus_to_exitcode(status), duration=duration)
            state = self.services.get(child.service)
            if state is not None:
                state.children.discard(pid)
            listener = child.listener
            if listener is not None and listener.busy_pid == pid:
                listener.busy_pid = None
                if not self.stopping:
                    self.selector.register(listener.sock, selectors.EVENT_READ, listener)

    def _signal_children(self, sig: int) -> None:
        for pid in self.children:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    # -- exec children's stderr ---------------------------------------------------

    def _read_stderr(self, state: ServiceState) -> None:
        assert state.stderr_r is not None
        try:
            data = os.read(state.stderr_r, 65536)
        except BlockingIOError:
            return
        lines = (state.stderr_partial + data).split(b"\n")
        state.stderr_partial = lines.pop()
        if len(state.stderr_partial) > STDERR_LINE_MAX:
            lines.append(state.stderr_partial)
            state.stderr_partial = b""
        for line in lines:
            if line.strip():
                self.log.event("stderr", "warning", service=state.service.name,
                               msg=line[:STDERR_LINE_MAX].decode("utf-8", "replace").rstrip("\r"))

    def _drain_stderr(self) -> None:
        for state in self.services.values():
            if state.stderr_r is not None:
                self._read_stderr(state)
                if state.stderr_partial:
                    state.stderr_partial += b"\n"
                    self._read_stderr(state)

    # -- stopping ---------------------------------------------------------------

    def _stop_listening(self) -> None:
        for state in self.services.values():
            for listener in state.listeners:
                if listener.busy_pid is None:
                    self.selector.unregister(listener.sock)
                listener.sock.close()
                remove_unix(listener.address)
            state.listeners.clear()

    def close_all(self) -> None:
        """Close every socket and pipe this supervisor holds (children are not touched)."""
        self._stop_listening()
        for state in self.services.values():
            for fd in (state.stderr_r, state.stderr_w):
                if fd is not None:
                    os.close(fd)
            state.stderr_r = state.stderr_w = None
        self.selector.close()
        os.close(self.devnull)
        self.wakeup_r.close()
        self.wakeup_w.close()


def _note_signal(signum: int, frame: object) -> None:
    """The signal number reaches the loop through the wake-up fd; nothing to do here."""


def _reflection_risk(remote: tuple[str, int]) -> bool:
    """Never answer port 0 or another small-services port: that is how UDP loops start."""
    return remote[1] in (0, 7, 9, 13, 19, 37)


def _serve(service: Service, conn: socket.socket, remote: object) -> None:
    """In the child: run the service's builtin or python handler on `conn`."""
    conn.settimeout(service.timeout_s)
    if service.kind == "builtin":
        assert service.builtin is not None
        BUILTINS[service.builtin].stream(conn)
    else:
        assert service.python is not None
        load_handler(service.python)(conn, remote)
