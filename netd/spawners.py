"""The supervisor's side of the spawners (netd.spawner is what runs inside one).

`SpawnerHandle` is one spawner process: forked with its plan, its reports read, the
supervisor's notes passed to it. `Spawners` is all of them: the one serving each
identity, those retired but still finishing their children, every child they
reported, what each service accepted and refused, and the log lines they dropped.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from netd import proctitle
from netd.children import ChildPool
from netd.config.model import Identity, Service
from netd.listener import Listener
from netd.logs import Log
from netd.loop import EventLoop, Timer
from netd.reaper import log_exit
from netd.reports import Batch, Started, send_note
from netd.spawn import fork_helper, import_handlers, lowest_fd, signal_group
from netd.spawner import Plan, Spawner
from netd.stderr import StderrReader, stderr_pipe

RESTART_S = 0.2       # a spawner that died is replaced after this, doubling
RESTART_MAX_S = 30.0  # while its replacements keep dying young,
STABLE_S = 10.0       # that is, within this long
SYNC_TIMEOUT_S = 0.5  # how long counters shown may wait for the spawners' latest
SETTLE_TIMEOUT_S = 2.0  # how long a reload waits for its new spawners to serve

Group = tuple[tuple[Service, tuple[Listener, ...]], ...]  # the services of one identity


class SpawnerHandle:
    """One spawner process: `on_batch(handle, batch)` for each report it sends."""

    def __init__(self, plan: Plan, loop: EventLoop, log: Log,
                 on_batch: Callable[[SpawnerHandle, Batch], None]) -> None:
        self.plan = plan
        self.loop = loop
        self.on_batch = on_batch
        self.retired = False
        self.synced = 0  # the last sync note it answered
        self.ready = False  # it serves every socket of its plan
        # The spawners it takes over from: they serve on until it is ready.
        self.replaces: list[SpawnerHandle] = []
        self.link, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sockets = [lst.sock.fileno() for _, listeners in plan.services for lst in listeners]
        devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        # Made here so that the supervisor keeps each read end: it reads on from the
        # children left when their spawner dies (netd.stderr).
        stderr = {service.name: stderr_pipe() for service, _ in plan.services
                  if service.kind == "exec" and service.stderr == "log"}
        self.stderr = {name: read_fd for name, (read_fd, _) in stderr.items()}
        pipe_fds = [fd for pipe in stderr.values() for fd in pipe]

        def failed(e: Exception) -> None:  # a fault of ours: say what, then leave
            log.wind_up()
            log.event("error", "err", user=plan.identity.user, pid=os.getpid(),
                      msg=f"spawner failed: {type(e).__name__}: {e}",
                      traceback="".join(traceback.format_exception(e)).rstrip())

        def prepare() -> None:
            log.in_child(has_loop=True)  # it never stalls its loop on a slow syslog
            proctitle.spawner(plan.identity.user, [service.name for service, _ in plan.services])
            try:
                import_handlers([service for service, _ in plan.services])
            except Exception as e:
                failed(e)
                raise

        def main() -> None:
            try:
                # The fds its children get as their stderr, within the service's nofile.
                Spawner(plan, theirs, log, lowest_fd(devnull),
                        {name: (read_fd, lowest_fd(write_fd))
                         for name, (read_fd, write_fd) in stderr.items()}).run()
            except Exception as e:
                failed(e)
                raise

        try:
            self.pid = fork_helper(main, [theirs.fileno(), devnull, *sockets, *pipe_fds,
                                          *log.fds()], plan.identity, prepare)
        except OSError:
            self.link.close()
            for read_fd in self.stderr.values():
                os.close(read_fd)
            raise
        finally:
            theirs.close()
            os.close(devnull)
            for _, write_fd in stderr.values():
                os.close(write_fd)
        self.link.setblocking(False)
        loop.watch(self.link, self.read)

    def read(self) -> None:
        """Take in every batch waiting on the link."""
        while True:
            try:
                data = self.link.recv(1 << 20)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # it has left (its exit is reaped through SIGCHLD)
                self.loop.unwatch(self.link)
                return
            batch = Batch.decode(data)
            if batch.synced is not None:
                self.synced = batch.synced
            self.ready = self.ready or batch.ready
            self.on_batch(self, batch)

    def read_until(self, done: Callable[[SpawnerHandle], bool], deadline_s: float) -> None:
        """Take in batches until done(self) (or the deadline, or the spawner has left)."""
        while not done(self) and self.loop.watching(self.link):
            left_s = deadline_s - time.monotonic()
            if left_s <= 0 or not select.select([self.link], [], [], left_s)[0]:
                return
            self.read()

    def retire(self) -> None:
        """Stop accepting, let the children finish, then leave."""
        self.retired = True
        send_note(self.link, {"retire": True})

    def stop(self, timeout_s: float) -> None:
        """netd is stopping: stop accepting and end the children (SIGTERM, then SIGKILL
        after `timeout_s`)."""
        self.retired = True
        send_note(self.link, {"stop": timeout_s})

    def ended(self, pids: list[int]) -> None:
        """Children of earlier spawners that it counts have ended."""
        if pids:
            send_note(self.link, {"ended": pids})

    def close(self) -> None:
        """Forget the process (it has exited): drain its last reports, close the link."""
        self.read()
        self.loop.unwatch(self.link)
        self.link.close()
        for read_fd in self.stderr.values():
            os.close(read_fd)
        self.stderr = {}

    def read_stderr_on(self, log: Log) -> None:
        """It has died: log on what the children it left write to their stderr."""
        for service, read_fd in self.stderr.items():
            StderrReader(self.loop, log, service, read_fd)
        self.stderr = {}


@dataclass(eq=False)
class ChildRecord:
    """A child a spawner reported, and which spawner started it."""

    started: Started
    spawner: SpawnerHandle
    started_s: float = field(default_factory=time.monotonic)


@dataclass
class Counts:
    """What one service's spawners reported about it."""

    accepted: int = 0
    refused_by: dict[str, int] = field(default_factory=dict)  # reason: connections
    failed: int = 0  # children that could not be started
    state: str = "listening"

    @property
    def refused(self) -> int:
        """Connections refused, for any reason."""
        return sum(self.refused_by.values())


class Spawners:
    """Every spawner of the supervisor, and the children they reported."""

    def __init__(self, loop: EventLoop, log: Log, on_report: Callable[[], None]) -> None:
        self.loop = loop
        self.log = log
        self.on_report = on_report  # told after each batch (to update systemd's status)
        self.serving: dict[Identity, SpawnerHandle] = {}
        self.by_pid: dict[int, SpawnerHandle] = {}  # every live one, retired ones too
        self.children: dict[int, ChildRecord] = {}
        self.counts: dict[str, Counts] = {}
        self.log_lost = 0  # log lines the spawners reported they dropped
        self.restarts: dict[Identity, Timer] = {}
        self.failures: dict[Identity, int] = {}
        self.groups: dict[Identity, Group] = {}
        self.pool = ChildPool(None)
        self.stop_timeout_s = 0.0
        self.stopping = False
        self.syncs = 0  # the number of the latest sync asked of the spawners

    def deploy(self, groups: dict[Identity, Group], pool: ChildPool,
               stop_timeout_s: float) -> None:
        """Have one spawner serve each group; replace those whose group changed (the old
        one finishes what it serves) and retire those with none left."""
        self.groups, self.pool, self.stop_timeout_s = groups, pool, stop_timeout_s
        gone = [self.serving.pop(identity) for identity in list(self.serving)
                if identity not in groups]
        for identity, services in groups.items():
            current = self.serving.get(identity)
            if (current is None or current.plan.services != services
                    or current.plan.pool is not pool):
                self._start(identity)
        self._settle(gone)

    def _settle(self, gone: list[SpawnerHandle]) -> None:
        """Wait (a little) until new spawners serve, then have the ones they replace and
        those with nothing left to serve stop accepting: when a reload is done, new
        connections meet the new config."""
        deadline_s = time.monotonic() + SETTLE_TIMEOUT_S
        for spawner in list(self.serving.values()):
            if spawner.replaces:
                spawner.read_until(lambda s: s.ready, deadline_s)
                if spawner.ready:
                    gone += spawner.replaces
                    spawner.replaces = []
        for spawner in gone:
            spawner.retired = True
        self._sync(gone, {"retire": True})

    def _start(self, identity: Identity) -> None:
        """Fork the spawner of `identity`, counting the children of its earlier spawners
        that still serve one of its services; the one it replaces retires."""
        self.loop.cancel(self.restarts.pop(identity, None))
        services = self.groups.get(identity)
        if self.stopping or services is None:
            return
        names = {service.name for service, _ in services}
        inherited = tuple(c.started for c in self.children.values()
                          if c.spawner.plan.identity == identity and c.started.service in names)
        plan = Plan(identity, services, self.pool, self.stop_timeout_s, inherited)
        try:
            handle = SpawnerHandle(plan, self.loop, self.log, self._batch)
        except OSError as e:
            self.log.event("error", "err", user=identity.user, msg=f"cannot start spawner: {e}")
            self._restart_later(identity)
            return
        old = self.serving.get(identity)
        if old is not None:
            handle.replaces = [old] if not old.retired else []
            handle.replaces += old.replaces
            old.replaces = []
        self.serving[identity] = handle
        self.by_pid[handle.pid] = handle
        for name in names:
            self.counts.setdefault(name, Counts()).state = "listening"

    def _batch(self, spawner: SpawnerHandle, batch: Batch) -> None:
        if batch.ready:
            for old in spawner.replaces:
                old.retire()
            spawner.replaces = []
        for started in batch.started:
            self.children[started.pid] = ChildRecord(started, spawner)
        ended = [pid for pid, _ in batch.ended if self.children.pop(pid, None) is not None]
        self._tell_ended(spawner.plan.identity, ended, spawner)
        for name, accepted in batch.accepted.items():
            self.counts.setdefault(name, Counts()).accepted += accepted
        for name, reasons in batch.refused.items():
            refused_by = self.counts.setdefault(name, Counts()).refused_by
            for reason, refused in reasons.items():
                refused_by[reason] = refused_by.get(reason, 0) + refused
        for name, failed in batch.failed.items():
            self.counts.setdefault(name, Counts()).failed += failed
        self.log_lost += batch.lost
        if self.serving.get(spawner.plan.identity) is spawner:
            for name, state in batch.states.items():
                self.counts.setdefault(name, Counts()).state = state
        self.on_report()

    def _tell_ended(self, identity: Identity, pids: list[int],
                    reporter: SpawnerHandle | None) -> None:
        """The serving spawner of `identity` counts children of earlier ones: tell it."""
        current = self.serving.get(identity)
        if current is not None and current is not reporter:
            current.ended(pids)

    def sync(self) -> None:
        """Take in everything every spawner has noted so far (so that counters shown or
        carried over a reload are current): ask each, and wait for the answers, at most
        SYNC_TIMEOUT_S in all (a spawner that does not answer is not waited for)."""
        self._sync(list(self.by_pid.values()), {})

    def _sync(self, spawners: list[SpawnerHandle], note: dict[str, object]) -> None:
        """Send each spawner `note` with a sync, and wait for their answers."""
        self.syncs += 1
        number = self.syncs
        asked = [spawner for spawner in spawners
                 if send_note(spawner.link, {**note, "sync": number})]
        deadline_s = time.monotonic() + SYNC_TIMEOUT_S
        for spawner in asked:
            spawner.read_until(lambda s: s.synced >= number, deadline_s)

    # -- processes that exited --------------------------------------------------------

    def exited(self, pid: int, status: int) -> bool:
        """A spawner exited (True), or a child of one that died before it (True, logged
        as its spawner would have); False for neither."""
        spawner = self.by_pid.pop(pid, None)
        if spawner is not None:
            self._spawner_exited(spawner, status)
            return True
        child = self.children.pop(pid, None)
        if child is None:
            return False
        if child.started.wait_key is None:
            # Its place in max_children, which its dead spawner can no longer give back
            # (a wait-mode child holds none; the new spawner counts it without one).
            child.spawner.plan.pool.give_back()
        self._tell_ended(child.spawner.plan.identity, [pid], None)
        log_exit(self.log, child.started.service, pid, status,
                 time.monotonic() - child.started_s)
        return True

    def _spawner_exited(self, spawner: SpawnerHandle, status: int) -> None:
        spawner.read_stderr_on(self.log)
        spawner.close()
        for pid in [pid for pid, c in self.children.items() if c.spawner is spawner]:
            if not _exists(pid):
                del self.children[pid]  # its end was never reported
        identity = spawner.plan.identity
        if spawner.retired:
            if status != 0:  # it did not leave as told, once its children had ended
                self.log.event("error", "err", user=identity.user, pid=spawner.pid,
                               msg=f"retired spawner {how_it_ended(status)}")
            return
        if self.serving.get(identity) is spawner:
            del self.serving[identity]
            if spawner.replaces:  # they serve on until its replacement is ready
                self.serving[identity] = spawner.replaces[0]
                spawner.replaces[0].replaces = spawner.replaces[1:]
        then = ""
        if not self.stopping:
            then = f"; a new one starts in {self._restart_later(identity):.3f}s"
        self.log.event("error", "err", user=identity.user, pid=spawner.pid,
                       msg=f"spawner {how_it_ended(status)}{then}")

    def _restart_later(self, identity: Identity) -> float:
        """Replace a spawner that died, after a delay that doubles while they keep failing;
        returns the delay."""
        failures = self.failures.get(identity, 0)
        self.failures[identity] = failures + 1
        delay_s = min(RESTART_MAX_S, RESTART_S * 2.0 ** failures)
        self.loop.cancel(self.restarts.get(identity))
        self.restarts[identity] = self.loop.after(delay_s, lambda: self._restart(identity))
        return delay_s

    def _restart(self, identity: Identity) -> None:
        self._start(identity)
        # Forgiven once a replacement has lived a while.
        self.loop.after(STABLE_S, lambda: self._forgive(identity))

    def _forgive(self, identity: Identity) -> None:
        if identity in self.serving:
            self.failures.pop(identity, None)

    # -- stopping ---------------------------------------------------------------------

    def stop(self, timeout_s: float) -> None:
        """Have every spawner end its children and leave; SIGTERM the orphans."""
        self.stopping = True
        for identity in list(self.restarts):
            self.loop.cancel(self.restarts.pop(identity))
        for spawner in self.by_pid.values():
            spawner.stop(timeout_s)
        for pid in self.orphans():
            signal_group(pid, signal.SIGTERM)

    def orphans(self) -> list[int]:
        """Children whose spawner has died: ours to reap (the supervisor is a subreaper)."""
        return [pid for pid, child in self.children.items()
                if child.spawner.pid not in self.by_pid]

    def close(self) -> None:
        """Close every link (the processes are not touched)."""
        for spawner in self.by_pid.values():
            spawner.close()


def how_it_ended(status: int) -> str:
    """A wait status in words: "killed by SIGKILL", "exited with status 1"."""
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
