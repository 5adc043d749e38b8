"""Prefork workers: long-lived children that accept on a service's shared sockets and
serve many connections each, for builtin and python services with `workers: N`.

A builtin's worker serves its connections in netd's own event loop, as a spawner
serves builtins inline (netd.handlers.inline). A python service's worker runs one
asyncio loop: an `async def handle(reader, writer)` runs in it, while a plain
`def handle(conn, peer)` runs in a pool of `threads` threads with a blocking socket
and the service's idle timeout. A handler's exception is logged with its traceback
and ends only that connection. On SIGTERM a worker stops accepting, lets what it
serves finish (the supervisor SIGKILLs it after daemon.stop_timeout), and exits.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import socket
import traceback
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from netd import proctitle
from netd.config import Service
from netd.handlers.builtins import BUILTINS
from netd.handlers.inline import InlineStream
from netd.handlers.python import load_handler
from netd.logs import Log
from netd.loop import EventLoop
from netd.peer import Peer, accept_fields, describe, refuse_fields
from netd.spawn import die_with_parent

ACCEPTS_PER_WAKEUP = 64


def run_worker(service: Service, sockets: list[socket.socket], log: Log,
               supervisor: int) -> None:
    """The whole life of one worker (in a forked child that took the service's identity)."""
    # A worker left behind by a supervisor killed with SIGKILL would go on accepting
    # on its sockets for ever: have the kernel SIGTERM it when the supervisor dies.
    die_with_parent(signal.SIGTERM, supervisor)
    proctitle.worker(service.name)
    log.in_child(has_loop=True)  # never stall every connection of a worker on a slow syslog
    if service.kind == "builtin":
        BuiltinWorker(service, sockets, log).run()
    else:
        asyncio.run(_serve_all(service, sockets, log))


def _admitted(service: Service, log: Log, conn: socket.socket, peer: Peer) -> bool:
    """Apply `access` (workers apply no limits) and log the accept or the refusal."""
    permitted = (service.access.permits_unix(peer.uid, peer.gid) if peer.remote is None
                 else not service.access.restricts_ip
                 or service.access.permits_ip(peer.remote[0]))
    if not permitted:
        log.event("refuse", "notice", **refuse_fields(service.name, peer, "access"))
        return False
    local = describe(conn.getsockname(), conn.family)
    log.event("accept", "info" if service.log_accept else "debug",
              **accept_fields(service.name, peer, local, os.getpid(), "workers"))
    return True


class BuiltinWorker:
    """A worker of a builtin service: its connections served in netd's own loop."""

    def __init__(self, service: Service, sockets: list[socket.socket], log: Log) -> None:
        assert service.builtin is not None
        self.service = service
        self.stream = BUILTINS[service.builtin].stream
        self.sockets = sockets
        self.log = log
        self.loop = EventLoop()
        self.streams: set[InlineStream] = set()
        self.stopping = False
        self.loop.on_signals((signal.SIGTERM, signal.SIGINT), self._stop)

    def run(self) -> None:
        """Serve until SIGTERM, then until the connections being served are over."""
        for sock in self.sockets:
            sock.setblocking(False)
            self.loop.watch(sock, partial(self._accept, sock))
        while not (self.stopping and not self.streams):
            self.log.pump(self.loop)
            self.loop.run_once()
        self.log.wind_up()
        self.log.flush()

    def _accept(self, sock: socket.socket) -> None:
        proto = "unix" if sock.family == socket.AF_UNIX else "tcp"
        for conn, remote in _queued(sock, self.log, self.service.name):
            peer = Peer.of(conn, proto, remote)
            if not _admitted(self.service, self.log, conn, peer):
                conn.close()
                continue
            self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        # on_end is called from start() at the earliest, once `stream` is bound here.
        stream = InlineStream(self.loop, conn, self.stream, self.service.timeout_s,
                              lambda reason: self._ended(stream, reason))
        self.streams.add(stream)
        stream.start()

    def _ended(self, stream: InlineStream, reason: str) -> None:
        self.streams.discard(stream)
        if reason != "done":  # a worker logs the peers that went away or fell silent
            self.log.event("close", service=self.service.name, pid=os.getpid(), reason=reason)

    def _stop(self, received: set[int]) -> None:
        self.stopping = True
        for sock in self.sockets:
            self.loop.unwatch(sock)
            sock.close()  # our copy: the supervisor and other workers keep theirs


# -- python services: asyncio -----------------------------------------------------------


async def _serve_all(service: Service, sockets: list[socket.socket], log: Log) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    pool = ThreadPoolExecutor(service.threads, thread_name_prefix=service.name)
    pump = _AsyncioLogPump(loop, log)
    serve = _server(service, log, pool, pump)
    serving: set[asyncio.Task[None]] = set()
    for sock in sockets:
        sock.setblocking(False)
        loop.add_reader(sock, _accept_queued, sock, serve, serving, log, service.name)
    await stop.wait()
    for sock in sockets:
        loop.remove_reader(sock)
        sock.close()  # our copy: the supervisor and other workers keep theirs
    if serving:
        await asyncio.wait(serving)
    pool.shutdown(wait=False, cancel_futures=True)
    log.wind_up()
    log.flush()


def _queued(sock: socket.socket, log: Log, name: str) -> Iterator[tuple[socket.socket, Any]]:
    """The connections queued on a listening socket, at most one wake-up's worth. An
    accept error other than an empty queue is logged and ends the batch (out of fds:
    the other workers and the backlog wait)."""
    for _ in range(ACCEPTS_PER_WAKEUP):
        try:
            conn, remote = sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as e:
            log.event("error", "err", service=name, msg=f"accept failed: {e.strerror}")
            return
        yield conn, remote


def _accept_queued(sock: socket.socket, serve: Callable[[socket.socket, Any], Any],
                   serving: set[asyncio.Task[None]], log: Log, name: str) -> None:
    """Take what is queued on a listening socket, a task for each connection: one
    reader bound once, where loop.sock_accept would add and remove one per accept."""
    for conn, peer in _queued(sock, log, name):
        task = asyncio.create_task(serve(conn, peer))
        serving.add(task)
        task.add_done_callback(serving.discard)


class _AsyncioLogPump:
    """What Log.pump does for netd's loop, for an asyncio loop: flush when the socket
    has room while lines wait, and tick when the log has something due."""

    def __init__(self, loop: asyncio.AbstractEventLoop, log: Log) -> None:
        self.loop = loop
        self.log = log
        self.watched: int | None = None
        self.tick: asyncio.TimerHandle | None = None
        self.tick_due_s: float | None = None

    def __call__(self) -> None:
        """Bring the watches up to date (after anything that logged)."""
        fd = self.log.fileno() if self.log.waiting() else None
        if fd != self.watched:
            if self.watched is not None:
                self.loop.remove_writer(self.watched)
            if fd is not None:
                self.loop.add_writer(fd, self._flush)
            self.watched = fd
        due_s = self.log.due_s()
        if due_s != self.tick_due_s:
            if self.tick is not None:
                self.tick.cancel()
            # asyncio's clock is time.monotonic(), as the log's is.
            self.tick = None if due_s is None else self.loop.call_at(due_s, self._tick)
            self.tick_due_s = due_s

    def _flush(self) -> None:
        self.log.flush()
        self()

    def _tick(self) -> None:
        self.tick = self.tick_due_s = None
        self.log.tick()
        self()


def _server(service: Service, log: Log, pool: ThreadPoolExecutor,
            pump: Callable[[], None]) -> Callable[[socket.socket, Any], Any]:
    """The coroutine that serves one accepted connection of a python service."""
    assert service.python is not None
    loaded = load_handler(service.python)
    async_handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[Any]] \
        | None = loaded if inspect.iscoroutinefunction(loaded) else None

    async def serve(conn: socket.socket, remote: Any) -> None:
        loop = asyncio.get_running_loop()
        peer = Peer.of(conn, "unix" if conn.family == socket.AF_UNIX else "tcp", remote)
        if not _admitted(service, log, conn, peer):
            conn.close()
            pump()
            return
        pump()
        try:
            if async_handler is None:
                conn.setblocking(True)
                conn.settimeout(service.timeout_s)
                await loop.run_in_executor(pool, loaded, conn, remote)
            else:
                reader, writer = await asyncio.open_connection(sock=conn)
                try:
                    await async_handler(reader, writer)
                finally:
                    writer.close()
        except (ConnectionError, TimeoutError) as e:
            log.event("close", service=service.name, pid=os.getpid(),
                      reason="timeout" if isinstance(e, TimeoutError) else "reset")
        except Exception as e:  # a handler's fault ends its connection, not the worker
            log.event("error", "err", service=service.name, pid=os.getpid(),
                      msg=f"handler raised {type(e).__name__}: {e}",
                      traceback="".join(traceback.format_exception(e)).rstrip())
        finally:
            conn.close()
            pump()

    return serve
