"""Prefork workers: long-lived children that accept on a service's shared sockets and
serve many connections each, for builtin and python services with `workers: N`.

A worker runs one asyncio loop. It accepts on every socket of its service; a builtin
(as a coroutine) or an `async def handle(reader, writer)` runs in that loop, while a
plain `def handle(conn, peer)` runs in a pool of `threads` threads with a blocking
socket and the service's idle timeout. A handler's exception is logged with its traceback
and ends only that connection. On SIGTERM the worker stops accepting, lets what it
serves finish (the supervisor SIGKILLs it after daemon.stop_timeout), and exits.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import socket
import traceback
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from netd import proctitle
from netd.config import Service
from netd.handlers.async_builtins import serve_stream
from netd.handlers.builtins import BUILTINS
from netd.handlers.python import load_handler
from netd.logs import Log
from netd.sockets import describe
from netd.spawn import die_with_parent


def run_worker(service: Service, sockets: list[socket.socket], log: Log) -> None:
    """The whole life of one worker (in a forked child that took the service's identity)."""
    # A worker left behind by a supervisor killed with SIGKILL would go on accepting
    # on its sockets for ever: have the kernel SIGTERM it when the supervisor dies.
    die_with_parent(signal.SIGTERM)
    proctitle.worker(service.name)
    log.in_child(has_loop=True)  # never stall every connection of a worker on a slow syslog
    asyncio.run(_serve_all(service, sockets, log))


async def _serve_all(service: Service, sockets: list[socket.socket], log: Log) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    pool = ThreadPoolExecutor(service.threads, thread_name_prefix=service.name)
    serve = _server(service, log, pool)
    serving: set[asyncio.Task[None]] = set()
    accepting = [asyncio.create_task(_accept_forever(sock, serve, serving)) for sock in sockets]
    await stop.wait()
    for task in accepting:
        task.cancel()
    for sock in sockets:
        sock.close()  # our copy: the supervisor and other workers keep theirs
    if serving:
        await asyncio.wait(serving)
    pool.shutdown(wait=False, cancel_futures=True)


async def _accept_forever(sock: socket.socket,
                          serve: Callable[[socket.socket, Any], Any],
                          serving: set[asyncio.Task[None]]) -> None:
    loop = asyncio.get_running_loop()
    while True:
        try:
            conn, peer = await loop.sock_accept(sock)
        except (ConnectionAbortedError, InterruptedError):
            continue
        task = asyncio.create_task(serve(conn, peer))
        serving.add(task)
        task.add_done_callback(serving.discard)


def _server(service: Service, log: Log,
            pool: ThreadPoolExecutor) -> Callable[[socket.socket, Any], Any]:
    """The coroutine that serves one accepted connection of `service`."""
    async_handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[Any]]
    sync_handler: Callable[[socket.socket, Any], Any] | None = None
    if service.kind == "builtin":
        assert service.builtin is not None
        stream = BUILTINS[service.builtin].stream

        async def serve_builtin(reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
            await serve_stream(stream, reader, writer, service.timeout_s)

        async_handler = serve_builtin
    else:
        assert service.python is not None
        loaded = load_handler(service.python)
        if inspect.iscoroutinefunction(loaded):
            async_handler = loaded
        else:
            sync_handler = loaded
    restricted = service.access.restricts_ip

    async def serve(conn: socket.socket, peer: Any) -> None:
        loop = asyncio.get_running_loop()
        if restricted and isinstance(peer, tuple) and not service.access.permits_ip(peer[0]):
            conn.close()
            log.event("refuse", "notice", service=service.name,
                      peer=describe(peer, conn.family), reason="access", pid=os.getpid())
            return
        log.event("accept", "info" if service.log_accept else "debug", service=service.name,
                  proto="unix" if conn.family == socket.AF_UNIX else "tcp",
                  peer=describe(peer, conn.family),
                  local=describe(conn.getsockname(), conn.family), pid=os.getpid(),
                  mode="workers")
        try:
            if sync_handler is not None:
                conn.setblocking(True)
                conn.settimeout(service.timeout_s)
                await loop.run_in_executor(pool, sync_handler, conn, peer)
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

    return serve
