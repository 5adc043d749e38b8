"""The metrics endpoint: a tiny HTTP/1.0 server of `GET /metrics` on the supervisor's
own loop, for Prometheus (and curl) to scrape.

Nothing here blocks or runs in a thread. A scraper's request is read by
netd.firstbytes (by a deadline, a bounded number at once) and the reply is written as
fast as the socket takes it, by a deadline too, so a slow or silent scraper costs an
fd and a timer until then, never the loop and never a connection of a service. The
page is made at each scrape by `render()` (netd.metrics); nothing is counted per
connection for it.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from functools import partial

from netd.firstbytes import FirstBytes
from netd.listener import Listener
from netd.logs import Log
from netd.loop import WRITE, EventLoop, Timer

MAX_REQUEST = 8192         # bytes of request line and headers
READ_TIMEOUT_S = 5.0       # for the whole request
WRITE_TIMEOUT_S = 10.0     # for the whole reply
MAX_SCRAPERS = 8           # connections read from or written to at once; more are closed
ACCEPTS_PER_WAKEUP = 16
SHORTAGE_PAUSE_S = 1.0     # accept() out of fds leaves the socket readable: pause instead
SHORTAGES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
PATH = "/metrics"
LATE = "no complete request in time"
STOPPING = "netd is stopping"

Render = Callable[[], tuple[bytes, str]]  # the page and its Content-Type


class HttpRequest:
    """A scraper's connection whose request is still arriving."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.data = b""

    def read(self) -> tuple[str, str] | None:
        """(method, target) once the request's headers are complete, None while they
        are not; raises ValueError for what is not an HTTP/1 request."""
        try:
            chunk = self.conn.recv(MAX_REQUEST + 1 - len(self.data))
        except BlockingIOError:
            return None
        self.data += chunk
        if len(self.data) > MAX_REQUEST:
            raise ValueError(f"request longer than {MAX_REQUEST} bytes")
        if b"\r\n\r\n" not in self.data and b"\n\n" not in self.data:
            if chunk:
                return None
            if b"\n" not in self.data:
                raise ValueError("closed before its request line")
        words = self.data.split(b"\n", 1)[0].rstrip(b"\r").split(b" ")
        if len(words) != 3 or not words[2].startswith(b"HTTP/1."):
            raise ValueError("not an HTTP/1 request line")
        return words[0].decode("latin-1"), words[1].decode("latin-1")


class Replies:
    """Replies being written as their sockets take them; each socket is closed once its
    reply is out, or when WRITE_TIMEOUT_S has passed."""

    def __init__(self, loop: EventLoop) -> None:
        self.loop = loop
        self._writing: dict[socket.socket, tuple[memoryview, Timer]] = {}

    def __len__(self) -> int:
        return len(self._writing)

    def send(self, conn: socket.socket, data: bytes) -> None:
        """Write `data` to `conn` (non-blocking), then close it."""
        left = _write(conn, memoryview(data))
        if not left:
            conn.close()
            return
        deadline = self.loop.after(WRITE_TIMEOUT_S, lambda: self._end(conn))
        self._writing[conn] = (left, deadline)
        self.loop.watch(conn, lambda: self._more(conn), WRITE)

    def _more(self, conn: socket.socket) -> None:
        view, deadline = self._writing[conn]
        left = _write(conn, view)
        if left:
            self._writing[conn] = (left, deadline)
        else:
            self._end(conn)

    def _end(self, conn: socket.socket) -> None:
        entry = self._writing.pop(conn, None)
        if entry is not None:
            self.loop.cancel(entry[1])
            self.loop.unwatch(conn)
            conn.close()

    def close_all(self) -> None:
        """Give up on every reply still being written."""
        for conn in list(self._writing):
            self._end(conn)


def _write(conn: socket.socket, view: memoryview) -> memoryview:
    """What is left of `view` once the socket takes what it can now (nothing after an
    error: the scraper went away)."""
    try:
        sent = conn.send(view)
    except (BlockingIOError, InterruptedError):
        return view
    except OSError:
        return view[:0]
    return view[sent:]


def response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8",
             head: bool = False, extra: str = "") -> bytes:
    """An HTTP/1.0 response; the connection closes after it."""
    headers = (f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n"
               f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n")
    return headers.encode("latin-1") + (b"" if head else body)


class MetricsEndpoint:
    """The supervisor's metrics sockets and the scrapes in progress on them."""

    BACKLOG = 16  # scrapers queued by the kernel before netd accepts them

    def __init__(self, loop: EventLoop, log: Log) -> None:
        self.loop = loop
        self.log = log
        self.listeners: list[Listener] = []
        self.render: Render | None = None
        self.waiting: FirstBytes[HttpRequest, tuple[str, str]] = FirstBytes(
            loop, MAX_SCRAPERS, self._answer, self._refuse)
        self.replies = Replies(loop)

    def serve(self, listeners: list[Listener], render: Render | None) -> None:
        """Serve the metrics made by `render` on `listeners` (bound by the supervisor),
        and no longer on the ones served before that are not among them."""
        for old in self.listeners:
            if old not in listeners:
                old.detach()  # closed by the supervisor, or a service's socket now
        for lst in listeners:
            if lst not in self.listeners:
                lst.sock.setblocking(False)
                lst.serve(self.loop, partial(self._accept, lst))
                self.log.event("metrics", local=lst.local, path=PATH)
        self.listeners = listeners
        self.render = render

    def _accept(self, lst: Listener) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                conn, _ = lst.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in SHORTAGES:
                    lst.pause("resources")
                    self.loop.after(SHORTAGE_PAUSE_S, lambda: lst.resume("resources"))
                return
            if (len(self.waiting) + len(self.replies) >= MAX_SCRAPERS
                    or not self.waiting.wait(HttpRequest(conn), READ_TIMEOUT_S, LATE)):
                conn.close()  # scrapers are few: this many at once are stuck or hostile

    def _answer(self, request: HttpRequest, method_target: tuple[str, str]) -> None:
        method, target = method_target
        head = method == "HEAD"
        if target.split("?", 1)[0] != PATH:
            reply = response("404 Not Found", f"netd serves its metrics at {PATH}\n".encode(),
                             head=head)
        elif method not in ("GET", "HEAD"):
            reply = response("405 Method Not Allowed", b"GET only\n",
                             extra="Allow: GET, HEAD\r\n")
        elif self.render is None:  # the config no longer names a metrics address
            reply = response("503 Service Unavailable", b"metrics are off\n", head=head)
        else:
            body, content_type = self.render()
            reply = response("200 OK", body, content_type, head=head)
        self.replies.send(request.conn, reply)

    def _refuse(self, request: HttpRequest, why: str) -> None:
        status = {LATE: "408 Request Timeout", STOPPING: "503 Service Unavailable"}.get(
            why, "400 Bad Request")
        self.replies.send(request.conn, response(status, why.encode() + b"\n"))

    def close(self) -> None:
        """Stop serving: the listeners are closed (unix socket files removed), and the
        scrapes in progress dropped."""
        self.waiting.fail_all(STOPPING)
        self.replies.close_all()
        for lst in self.listeners:
            lst.close()
            lst.remove_file()
        self.listeners = []
        self.render = None
