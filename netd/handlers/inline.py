"""Builtin streams served inline: in the loop of the process that accepted them (a
spawner), without a process of their own and without ever blocking that loop.

Each connection follows its builtin's `Stream` row. Output that the peer does not
read yet waits in a bounded buffer (beyond it, input is no longer read), and a
connection that makes no progress for the service's idle timeout is closed.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from netd.handlers.builtins import CHUNK, Stream
from netd.loop import READ, WRITE, EventLoop, Timer

MAX_UNSENT = 256 * 1024  # echo stops reading while this much waits to be sent


class InlineStream:
    """One connection served by a builtin; `on_end(reason)` once it is over (reason
    done, reset or timeout), after the socket is closed."""

    def __init__(self, loop: EventLoop, conn: socket.socket, stream: Stream, timeout_s: float,
                 on_end: Callable[[str], None]) -> None:
        self.loop = loop
        self.conn = conn
        self.stream = stream
        self.timeout_s = timeout_s
        self.on_end = on_end
        self.unsent = b""
        self.closing = False  # once what is unsent is sent, the connection ends
        self.sent_at = 0      # where `endless` goes on from
        self.active_s = time.monotonic()
        self.idle: Timer | None = None

    def start(self) -> None:
        """Begin serving (on_end may be called before this returns)."""
        stream, conn = self.stream, self.conn
        conn.setblocking(False)
        self.idle = self.loop.after(self.timeout_s, self._check_idle)
        if stream.greeting is not None:
            self.unsent, self.closing = stream.greeting(), True
            self._write()
        elif stream.endless is not None:
            conn.shutdown(socket.SHUT_RD)  # RFC 864: what the client sends is ignored
            self.loop.watch(conn, self._write_endless, WRITE)
        else:
            self.loop.watch(conn, self._read, READ)

    def _read(self) -> None:
        try:
            data = self.conn.recv(CHUNK)
        except BlockingIOError:
            return
        except OSError:
            self._end("reset")
            return
        self.active_s = time.monotonic()
        if not data:
            self.closing = True
            self._write()  # what is still unsent goes first
            return
        if self.stream.echo:
            self.unsent += data
            self._write()

    def _write(self) -> None:
        try:
            sent = self.conn.send(self.unsent) if self.unsent else 0
        except BlockingIOError:
            sent = 0
        except OSError:
            self._end("reset")
            return
        if sent:
            self.unsent = self.unsent[sent:]
            self.active_s = time.monotonic()
        if self.closing and not self.unsent:
            self._end("done")
        elif self.closing or len(self.unsent) >= MAX_UNSENT:
            self.loop.watch(self.conn, self._write, WRITE)
        elif self.unsent:
            self.loop.watch(self.conn, self._read_or_write, READ | WRITE)
        else:
            self.loop.watch(self.conn, self._read, READ)

    def _read_or_write(self) -> None:
        self._write()
        if self.conn.fileno() >= 0 and not self.closing:
            self._read()

    def _write_endless(self) -> None:
        endless = self.stream.endless
        assert endless is not None
        try:
            sent = self.conn.send(endless[self.sent_at:] + endless)
        except BlockingIOError:
            return
        except OSError:
            self._end("reset")  # the peer went away: how a chargen session ends
            return
        self.sent_at = (self.sent_at + sent) % len(endless)
        self.active_s = time.monotonic()

    def _check_idle(self) -> None:
        left_s = self.active_s + self.timeout_s - time.monotonic()
        if left_s > 0:
            self.idle = self.loop.after(left_s, self._check_idle)
        else:
            self._end("timeout")

    def _end(self, reason: str) -> None:
        if self.conn.fileno() < 0:
            return
        self.loop.unwatch(self.conn)
        self.loop.cancel(self.idle)
        self.conn.close()
        self.on_end(reason)

    def close(self, reason: str) -> None:
        """End the connection now (netd is stopping)."""
        self._end(reason)
