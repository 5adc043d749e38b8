"""Log events: the one formatter (logfmt) and the targets lines go to (syslog, stderr).

Sending never blocks the event loop. To syslog, the socket is non-blocking: a full
queue keeps lines in a bounded backlog, and only beyond that are lines dropped,
counted and reported once the socket takes lines again. A syslog daemon that goes
away (it restarts, its socket is removed or replaced) is reconnected to on a timer
while lines wait in the same backlog. A fault that repeats is logged once, then as a
count of its repeats at most every few seconds.
See docs/logging.md for every event and its keys.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import os
import re
import select
import socket
import stat
import struct
import sys
import time
from collections import OrderedDict, deque
from typing import Any, Protocol

from netd.loop import WRITE, EventLoop, Timer

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SEVERITIES = {"emerg": 0, "alert": 1, "crit": 2, "err": 3, "warning": 4, "notice": 5,
              "info": 6, "debug": 7}
FACILITIES = {"kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6,
              "news": 7, "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11,
              **{f"local{i}": 16 + i for i in range(8)}}
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


# What makes a value need quotes: a space, a quote, '=', a backslash, a control character.
_UNSAFE = re.compile(r'[ "=\\\x00-\x1f\x7f]')


def format_value(value: object) -> str:
    """One logfmt value: bare when safe, otherwise double-quoted with escapes."""
    text = value if type(value) is str else str(value)
    if text and not _UNSAFE.search(text):
        return text
    return '"' + "".join(_ESCAPES.get(c, c if c >= " " else f"\\x{ord(c):02x}") for c in text) + '"'


def format_event(event: str, fields: dict[str, object]) -> str:
    """The one log line for `event`: event=NAME, then the fields in the order given."""
    # Two lines per connection go through here: a plain loop, no generator or f-strings.
    parts = ["event=" + event]
    for key, value in fields.items():
        if value is not None:
            parts.append(key + "=" + format_value(value))
    return " ".join(parts)


class Target(Protocol):
    def send(self, severity: int, event: str, fields: dict[str, object], line: str) -> bool:
        """Deliver one event (as `line` and as its fields); False when the target cannot
        take it now. Raises OSError when the target is gone (see reconnect)."""
        ...

    def fileno(self) -> int | None:
        """The socket that has room again when send() returned False (None: no socket)."""
        ...

    def reconnect(self) -> None:
        """Reach the target again after send() raised; raises OSError if it still cannot."""
        ...


class StderrTarget:
    """Lines on stderr, one per event, as they are (under systemd, the journal keeps them)."""

    def send(self, severity: int, event: str, fields: dict[str, object], line: str) -> bool:
        try:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            return False
        return True

    def fileno(self) -> int | None:
        return None

    def reconnect(self) -> None:
        pass


class SyslogTarget:
    """BSD syslog datagrams (`<PRI>Mmm dd hh:mm:ss netd[PID]: line`) to a Unix or UDP socket.

    One socket for the target's whole life: reconnecting connect()s it again (a
    datagram socket may change its peer), so its fd never changes and is never closed
    under an event loop that watches it, nor under a child that inherited it.
    """

    def __init__(self, address: str, facility: str) -> None:
        self.address = address
        self.facility = FACILITIES[facility]
        # Every process of one netd (spawners, workers, handler children) writes the
        # daemon's pid in the header: netd[PID] names the instance; `pid=` the process.
        self.pid = os.getpid()
        self.stamp_second = -1
        self.stamp = ""
        self.udp = address.startswith("udp://")
        if self.udp:
            host, _, port = address[len("udp://"):].rpartition(":")
            family, kind, proto, _, sockaddr = socket.getaddrinfo(
                host.strip("[]"), int(port), 0, socket.SOCK_DGRAM)[0]
            self.sockaddr: str | tuple[Any, ...] = sockaddr
            self.sock = socket.socket(family, kind, proto)
        else:
            self.sockaddr = address
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.connect(self.sockaddr)
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)

    def encode(self, severity: int, event: str, fields: dict[str, object], line: str) -> bytes:
        """One event as the datagram the daemon reads."""
        second = int(time.time())
        if second != self.stamp_second:  # the header changes once a second at most
            now = time.localtime(second)
            self.stamp_second = second
            self.stamp = (time.strftime("%b ", now) + f"{now.tm_mday:2d}"
                          + time.strftime(" %H:%M:%S", now) + f" netd[{self.pid}]: ")
        return f"<{self.facility * 8 + severity}>{self.stamp}{line}".encode()

    def send(self, severity: int, event: str, fields: dict[str, object], line: str) -> bool:
        data = self.encode(severity, event, fields, line)
        try:
            self.sock.send(data)
        except BlockingIOError:
            return False
        except OSError as e:
            if self.udp and e.errno == errno.ECONNREFUSED:
                # An ICMP "port unreachable" for an earlier datagram: UDP syslog is lossy
                # by design, and the collector may be back for the next one.
                return True
            if e.errno in (errno.ECONNREFUSED, errno.ENOTCONN):
                raise OSError(e.errno, f"{self.address}: the log daemon closed its "
                              "socket") from None
            raise OSError(e.errno, f"{self.address}: {e.strerror or e}") from None
        return True

    def fileno(self) -> int | None:
        return self.sock.fileno()

    def reconnect(self) -> None:
        try:
            self.sock.connect(self.sockaddr)
        except OSError as e:
            if not self.udp and _exists_but_not_socket(self.address):
                raise OSError(errno.ENOTSOCK, f"{self.address} is not a socket") from None
            if isinstance(e, ConnectionRefusedError):
                raise OSError(errno.ECONNREFUSED, f"{self.address}: nobody reads it") from None
            raise OSError(e.errno, f"{self.address}: {e.strerror or e}") from None


def _exists_but_not_socket(path: str) -> bool:
    try:
        return not stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


class JournalTarget(SyslogTarget):
    """Entries in journald's native protocol: the line as MESSAGE, and each field also
    as a NETD_* journal field. Its socket lives as SyslogTarget's does (written by
    netd itself rather than through libsystemd, whose cached socket a forked child
    could neither keep nor see closed)."""

    def __init__(self, address: str = JOURNAL_SOCKET) -> None:
        super().__init__(address, "daemon")

    def encode(self, severity: int, event: str, fields: dict[str, object], line: str) -> bytes:
        entry = {"MESSAGE": line, "PRIORITY": str(severity), "SYSLOG_IDENTIFIER": "netd",
                 "SYSLOG_PID": str(self.pid), "NETD_EVENT": event}
        entry.update((f"NETD_{key.upper()}", str(value)) for key, value in fields.items()
                     if value is not None)
        return b"".join(_journal_field(name, value) for name, value in entry.items())


def _journal_field(name: str, value: str) -> bytes:
    """NAME=value and a newline; a value with newlines goes length-prefixed instead."""
    data = value.encode()
    if b"\n" in data:
        return name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return name.encode() + b"=" + data + b"\n"


Line = tuple[int, str, dict[str, object], str]
Key = tuple[object, ...]

# Fields that name one process or one connection: a fault that repeats in another
# child or for another client is still the same fault.
INSTANCE_KEYS = frozenset({"pid", "peer", "peer_pid", "peer_uid", "peer_gid", "duration",
                           "traceback"})


class _Window:
    """One fault's current window: when it ends, and the repeats folded in so far."""

    __slots__ = ("ends_s", "count", "last")

    def __init__(self, ends_s: float) -> None:
        self.ends_s = ends_s
        self.count = 0
        self.last: tuple[int, str, dict[str, object]] | None = None


class Repeats:
    """Folds repeats of one event into counts: its first occurrence is logged, those
    within the next `window_s` are only counted, and when the window ends one line
    stands for them all (`repeated=N`, with the fields of the last one).

    Memory is bounded: at most `max_kinds` events are followed at once; beyond that a
    new event is logged as it comes, uncollapsed.
    """

    def __init__(self, window_s: float = 5.0, max_kinds: int = 1000) -> None:
        self.window_s = window_s
        self.max_kinds = max_kinds
        # In the order their windows began, which is the order they end.
        self.windows: OrderedDict[Key, _Window] = OrderedDict()
        # (ends_s, tie-breaker, key) of each window that folded repeats in.
        self.due_heap: list[tuple[float, int, Key]] = []
        self.order = itertools.count()

    def seen(self, severity: int, event: str, fields: dict[str, object],
             now: float) -> int | None:
        """How many occurrences the line for this one stands for (1: log it as it is),
        or None when it is folded into a later line."""
        key: Key = (event, severity, *((k, str(v)) for k, v in fields.items()
                                       if k not in INSTANCE_KEYS and v is not None))
        window = self.windows.get(key)
        if window is not None and now < window.ends_s:
            window.count += 1
            window.last = (severity, event, fields)
            if window.count == 1:
                heapq.heappush(self.due_heap, (window.ends_s, next(self.order), key))
            return None
        # Its window is over (or it is new): this line opens the next window, and
        # stands for the repeats not reported yet too.
        stands_for = 1 + (window.count if window is not None else 0)
        self._open(key, now)
        return stands_for

    def due(self, now: float, everything: bool = False) -> list[Line]:
        """The lines for windows that ended with repeats in them (each opens the next);
        with `everything`, for every window with repeats, ended or not."""
        lines: list[Line] = []
        while self.due_heap and (everything or self.due_heap[0][0] <= now):
            ends_s, _, key = heapq.heappop(self.due_heap)
            window = self.windows.get(key)
            if window is None or window.ends_s != ends_s or window.last is None:
                continue  # reported already by the repeat that came after its end
            severity, event, fields = window.last
            fields = {**fields, "repeated": window.count}
            lines.append((severity, event, fields, format_event(event, fields)))
            self._open(key, now)
        return lines

    def next_due_s(self) -> float | None:
        """When the next window with repeats in it ends (None: none has any)."""
        while self.due_heap:
            ends_s, _, key = self.due_heap[0]
            window = self.windows.get(key)
            if window is not None and window.ends_s == ends_s and window.last is not None:
                return ends_s
            heapq.heappop(self.due_heap)
        return None

    def _open(self, key: Key, now: float) -> None:
        self.windows.pop(key, None)
        # Forget windows that ended with nothing folded in (the oldest come first).
        while self.windows:
            window = self.windows[next(iter(self.windows))]
            if window.ends_s > now or window.last is not None:
                break
            self.windows.popitem(last=False)
        if len(self.windows) < self.max_kinds:
            self.windows[key] = _Window(now + self.window_s)


class Log:
    """Where a process's events go; `event()` is the one way to log anything.

    Lines the target cannot take right now wait in a bounded backlog, sent in order
    by flush() when the target has room again; beyond BACKLOG_MAX they are dropped,
    counted, and the count is logged once lines flow again. A target that is gone
    is reconnected to on a timer. The event loop drives this with:
    - fileno(): watch it for writing while waiting() is true, and call flush();
    - due_s(): at that monotonic time call tick() (a retry, or a count of repeats);
    - wind_up() when the loop is over, before the last lines.
    A forked child calls in_child(): with no loop, it waits up to `patience_s`.
    """

    BACKLOG_MAX = 1000
    RETRY_FIRST_S = 0.1   # soon, for a daemon that restarts: little to hold meanwhile
    RETRY_MAX_S = 2.0     # the retry interval doubles up to this while it stays away
    # Events that report a fault, folded when they repeat. Records of connections and
    # children (accept, exit, refuse...) and changes of state (listen, reload,
    # suspend...) never are: each one is news, and their rate has its own bounds.
    COLLAPSED = frozenset({"error", "control"})

    def __init__(self, target: Target, level: str = "info") -> None:
        self.target = target
        self.max_severity = SEVERITIES[level]
        self.dropped = 0
        self.backlog: deque[Line] = deque()
        self.patience_s = 0.0
        self.repeats = Repeats()
        # While the target is gone: when to try again, and the interval after that.
        self.retry_at_s: float | None = None
        self.retry_delay_s = self.RETRY_FIRST_S
        # An outage not reported yet: since when, and why the target was unreachable.
        self.outage_since_s: float | None = None
        self.outage_why = ""
        self.reports_outages = True
        # What pump() set up on the loop that drives this log.
        self._watched_fd: int | None = None
        self._tick: Timer | None = None
        self._tick_due_s: float | None = None

    def wants(self, level: str) -> bool:
        """Whether events at `level` are logged at all (to skip building their fields)."""
        return SEVERITIES[level] <= self.max_severity

    def event(self, event: str, level: str = "info", /, **fields: object) -> None:
        """Log `event` with `fields` at `level` (a syslog severity name)."""
        severity = SEVERITIES[level]
        if severity > self.max_severity:
            return
        if self.repeats.due_heap:
            for line in self.repeats.due(time.monotonic()):
                self._put(line)
        if event in self.COLLAPSED:
            stands_for = self.repeats.seen(severity, event, fields, time.monotonic())
            if stands_for is None:
                return
            if stands_for > 1:
                fields["repeated"] = stands_for
        self._put((severity, event, fields, format_event(event, fields)))

    # -- what the event loop calls ---------------------------------------------------

    def fileno(self) -> int | None:
        """The socket to watch for writing while waiting(); None while the target is
        gone (a peerless datagram socket is always writable: watching it would spin)."""
        return None if self.retry_at_s is not None else self.target.fileno()

    def waiting(self) -> bool:
        """Whether lines, or the report of lost ones, wait for the target."""
        return bool(self.backlog) or self.dropped > 0 or self.outage_since_s is not None

    def flush(self) -> None:
        """Send what waits, in order, then the count of what was lost, until the target
        would block (or, while it is gone, only when a retry is due)."""
        while self.backlog and self._send(self.backlog[0]):
            self.backlog.popleft()
        if self.backlog or not (self.dropped or self.outage_since_s is not None):
            return
        lost: dict[str, object] = {"count": self.dropped}
        if self.outage_since_s is not None and self.reports_outages:
            lost["outage"] = f"{time.monotonic() - self.outage_since_s:.3f}s"
            lost["msg"] = self.outage_why
        elif not self.dropped:
            self.outage_since_s = None
            return
        if self._send((SEVERITIES["warning"], "log_dropped", lost,
                       format_event("log_dropped", lost))):
            self.dropped = 0
            self.outage_since_s = None

    def due_s(self) -> float | None:
        """The monotonic time at which tick() has work (None: nothing timed)."""
        due = self.repeats.next_due_s()
        if (self.retry_at_s is not None and self.waiting()
                and (due is None or self.retry_at_s < due)):
            return self.retry_at_s
        return due

    def tick(self) -> None:
        """Do what is due: log the counts of repeats whose window ended, and try to
        reach a target that is gone (then send what waits)."""
        now = time.monotonic()
        for line in self.repeats.due(now):
            self._put(line)
        if self.retry_at_s is not None and self.retry_at_s <= now:
            self.flush()

    def wind_up(self) -> None:
        """Before the process leaves its loop for good: log the repeats not counted yet,
        and from now on wait up to 1 s for the target (no loop is left to flush from)."""
        self.patience_s = 1.0
        for line in self.repeats.due(time.monotonic(), everything=True):
            self._put(line)

    def pump(self, loop: EventLoop) -> None:
        """Drive this log from `loop` (call before each wait): watch the socket for room
        while lines wait, and have tick() called when it is due."""
        fd = self.fileno() if self.waiting() else None
        if fd != self._watched_fd:
            if self._watched_fd is not None:
                loop.unwatch(self._watched_fd)
            if fd is not None:
                loop.watch(fd, self.flush, WRITE)
            self._watched_fd = fd
        due_s = self.due_s()
        if due_s != self._tick_due_s:
            loop.cancel(self._tick)
            self._tick = None if due_s is None else loop.at(due_s, self.tick)
            self._tick_due_s = due_s

    # -- in a forked child -----------------------------------------------------------

    def in_child(self, has_loop: bool = False) -> None:
        """Make a forked copy of the supervisor's log a child's: what waits and what
        was counted is the supervisor's to send. A child with a loop of its own (a
        spawner) holds lines back like the supervisor and reports its own losses; one
        without waits up to 1 s for room, and tries a gone target at once."""
        self.backlog.clear()
        self.dropped = 0
        self.outage_since_s = None
        self.reports_outages = has_loop
        self.repeats = Repeats()
        self.patience_s = 0.0 if has_loop else 1.0
        self._watched_fd = self._tick = self._tick_due_s = None

    def fds(self) -> list[int]:
        """File descriptors the log needs kept open (in forked children)."""
        fd = self.target.fileno()
        return [] if fd is None else [fd]

    # -- sending ---------------------------------------------------------------------

    def _put(self, line: Line) -> None:
        if (self.backlog or self.dropped or self.outage_since_s is not None
                or not self._send(line)):
            if len(self.backlog) >= self.BACKLOG_MAX:
                self.dropped += 1
            else:
                self.backlog.append(line)
            self.flush()

    def _send(self, line: Line) -> bool:
        """Deliver one line; False when it must wait (no room, or the target is gone)."""
        if self.retry_at_s is not None and not self._reconnect():
            return False
        try:
            if self.target.send(*line):
                return True
            fd = self.target.fileno()
            if self.patience_s and fd is not None:
                select.select([], [fd], [], self.patience_s)
                return self.target.send(*line)
        except OSError as e:
            if e.errno == errno.EMSGSIZE:
                self.dropped += 1  # this line can never fit: lose it, not the ones after
                return True
            self._lost(e)
        return False

    def _reconnect(self) -> bool:
        """Try a gone target once, if the retry is due (always, with no loop to wait in)."""
        assert self.retry_at_s is not None
        if not self.patience_s and time.monotonic() < self.retry_at_s:
            return False
        try:
            self.target.reconnect()
        except OSError as e:
            self._lost(e)
            return False
        self.retry_at_s = None
        return True

    def _lost(self, e: OSError) -> None:
        """The target is gone: hold lines, retry on a timer, say so once per outage."""
        now = time.monotonic()
        why = e.strerror or str(e)
        if self.outage_since_s is None:
            self.outage_since_s = now
            self.retry_delay_s = self.RETRY_FIRST_S
            if self.reports_outages:
                _say(f"netd: cannot log to syslog: {why}; holding up to {self.BACKLOG_MAX} "
                     "lines and retrying")
        else:
            self.retry_delay_s = min(self.retry_delay_s * 2, self.RETRY_MAX_S)
        self.outage_why = why
        self.retry_at_s = now + self.retry_delay_s


def _say(message: str) -> None:
    """One notice on stderr, about the log itself (a closed stderr is no reason to fail)."""
    try:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def open_log(to: str, syslog_address: str, facility: str, level: str) -> Log:
    """The Log for a config; a missing syslog socket falls back to stderr, said once."""
    if to in ("syslog", "journal"):
        try:
            target = (JournalTarget() if to == "journal"
                      else SyslogTarget(syslog_address, facility))
            return Log(target, level)
        except (OSError, ValueError, IndexError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            where = JOURNAL_SOCKET if to == "journal" else syslog_address
            sys.stderr.write(f"netd: cannot log to {to} at {where} ({reason}); "
                             "logging to stderr instead\n")
    return Log(StderrTarget(), level)
