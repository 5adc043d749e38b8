"""Log events: the one formatter (logfmt) and the targets lines go to (syslog, stderr).

Sending to syslog never blocks: the socket is non-blocking, a full queue keeps
lines in a bounded backlog, and only beyond that are lines dropped, counted and
reported once the socket takes lines again.
See docs/logging.md for every event and its keys.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import time
from collections import deque
from typing import Protocol

from netd.loop import WRITE, EventLoop

SEVERITIES = {"emerg": 0, "alert": 1, "crit": 2, "err": 3, "warning": 4, "notice": 5,
              "info": 6, "debug": 7}
FACILITIES = {"kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6,
              "news": 7, "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11,
              **{f"local{i}": 16 + i for i in range(8)}}
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def format_value(value: object) -> str:
    """One logfmt value: bare when safe, otherwise double-quoted with escapes."""
    text = str(value)
    if text and not any(c in ' "=\\' or c < " " or c == "\x7f" for c in text):
        return text
    return '"' + "".join(_ESCAPES.get(c, c if c >= " " else f"\\x{ord(c):02x}") for c in text) + '"'


def format_event(event: str, fields: dict[str, object]) -> str:
    """The one log line for `event`: event=NAME, then the fields in the order given."""
    parts = [f"event={event}"]
    parts.extend(f"{k}={format_value(v)}" for k, v in fields.items() if v is not None)
    return " ".join(parts)


class Target(Protocol):
    def send(self, severity: int, event: str, fields: dict[str, object], line: str) -> bool:
        """Deliver one event (as `line` and as its fields); False when it was dropped."""
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


class SyslogTarget:
    """BSD syslog datagrams (`<PRI>Mmm dd hh:mm:ss netd[PID]: line`) to a Unix or UDP socket."""

    def __init__(self, address: str, facility: str) -> None:
        self.address = address
        self.facility = FACILITIES[facility]
        # Every process of one netd (spawners, workers, handler children) writes the
        # daemon's pid in the header: netd[PID] names the instance; `pid=` the process.
        self.pid = os.getpid()
        self.sock = self._connect()

    def _connect(self) -> socket.socket:
        if self.address.startswith("udp://"):
            host, _, port = self.address[len("udp://"):].rpartition(":")
            family, kind, proto, _, sockaddr = socket.getaddrinfo(
                host.strip("[]"), int(port), 0, socket.SOCK_DGRAM)[0]
            sock = socket.socket(family, kind, proto)
            sock.connect(sockaddr)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                sock.connect(self.address)
            except OSError:
                sock.close()
                raise
        sock.setblocking(False)
        return sock

    def send(self, severity: int, event: str, fields: dict[str, object], line: str) -> bool:
        now = time.localtime()
        stamp = time.strftime("%b ", now) + f"{now.tm_mday:2d}" + time.strftime(" %H:%M:%S", now)
        data = f"<{self.facility * 8 + severity}>{stamp} netd[{self.pid}]: {line}".encode()
        try:
            self.sock.send(data)
        except BlockingIOError:
            return False
        except OSError:
            # The syslog daemon restarted (its socket was re-created): reconnect once.
            try:
                self.sock.close()
                self.sock = self._connect()
                self.sock.send(data)
            except OSError:
                return False
        return True

    def fileno(self) -> int:
        return self.sock.fileno()


class JournalTarget:
    """Lines to the journal, with each field also as a NETD_* journal field."""

    def __init__(self) -> None:
        # Imported only when logging to the journal: it is ~2.6 MB of a small supervisor.
        from systemd import journal

        self.journal = journal

    def send(self, severity: int, event: str, fields: dict[str, object], line: str) -> bool:
        extra = {f"NETD_{key.upper()}": str(value) for key, value in fields.items()
                 if value is not None}
        try:
            self.journal.send(line, PRIORITY=str(severity), SYSLOG_IDENTIFIER="netd",
                         NETD_EVENT=event, **extra)
        except OSError:
            return False
        return True


Line = tuple[int, str, dict[str, object], str]


class Log:
    """Where a process's events go; `event()` is the one way to log anything.

    Lines the target cannot take right now wait in a bounded backlog, sent in order
    by flush() when the target is writable again (the supervisor watches `fds()` for
    that while `backlog` is not empty); beyond BACKLOG_MAX they are dropped, counted,
    and the count is logged once lines flow again. A forked child sets `patience_s`
    instead: it has no loop to flush from, so it waits that long for the target.
    """

    BACKLOG_MAX = 1000

    def __init__(self, target: Target, level: str = "info") -> None:
        self.target = target
        self.max_severity = SEVERITIES[level]
        self.dropped = 0
        self.backlog: deque[Line] = deque()
        self.patience_s = 0.0

    def wants(self, level: str) -> bool:
        """Whether events at `level` are logged at all (to skip building their fields)."""
        return SEVERITIES[level] <= self.max_severity

    def event(self, event: str, level: str = "info", /, **fields: object) -> None:
        """Log `event` with `fields` at `level` (a syslog severity name)."""
        severity = SEVERITIES[level]
        if severity > self.max_severity:
            return
        line = (severity, event, fields, format_event(event, fields))
        if self.backlog or not self._send(line):
            if len(self.backlog) >= self.BACKLOG_MAX:
                self.dropped += 1
            else:
                self.backlog.append(line)
            self.flush()

    def flush(self) -> None:
        """Send what waits in the backlog, until the target would block."""
        while self.backlog and self._send(self.backlog[0]):
            self.backlog.popleft()
        if self.dropped and not self.backlog:
            lost: dict[str, object] = {"count": self.dropped}
            if self._send((SEVERITIES["warning"], "log_dropped", lost,
                           format_event("log_dropped", lost))):
                self.dropped = 0

    def _send(self, line: Line) -> bool:
        if self.target.send(*line):
            return True
        if self.patience_s and self.fds():
            select.select([], self.fds(), [], self.patience_s)
            return self.target.send(*line)
        return False

    def fds(self) -> list[int]:
        """File descriptors the log needs kept open (in forked children)."""
        return [self.target.fileno()] if isinstance(self.target, SyslogTarget) else []

    def pump(self, loop: EventLoop) -> None:
        """Have `loop` flush the backlog when the target has room (call before each
        wait: watched only while lines or a count of dropped ones wait)."""
        waiting = bool(self.backlog) or self.dropped > 0
        for fd in self.fds():
            if waiting:
                loop.watch(fd, self.flush, WRITE)
            else:
                loop.unwatch(fd)

    def forked(self, patience_s: float) -> None:
        """In a freshly forked process: the backlog is the parent's to send. A process
        with no loop to flush from waits up to `patience_s` for the target instead."""
        self.backlog.clear()
        self.patience_s = patience_s


def open_log(to: str, syslog_address: str, facility: str, level: str) -> Log:
    """The Log for a config; a missing syslog socket falls back to stderr, said once."""
    if to == "journal":
        return Log(JournalTarget(), level)
    if to == "syslog":
        try:
            return Log(SyslogTarget(syslog_address, facility), level)
        except (OSError, ValueError, IndexError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            sys.stderr.write(f"netd: cannot log to syslog at {syslog_address} ({reason}); "
                             "logging to stderr instead\n")
    return Log(StderrTarget(), level)
