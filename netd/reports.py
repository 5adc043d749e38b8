"""What a spawner and the supervisor say to each other over their socket pair.

Spawner to supervisor, in batches (one per wake-up of the spawner that did something,
so a busy spawner costs the supervisor a wake-up per batch, not per connection): the
children it started and those that ended, how many connections each service accepted
and refused (by reason) since the last batch, the children it could not start, the log
lines it had to drop, and each service's state when it changed. Counting a connection
is one dict increment.

Supervisor to spawner, as notes: `retire` (stop accepting, let the children finish,
then leave), `stop` (netd is stopping: end the children too), and `ended` (children
that an earlier spawner started, and this one counts, have ended).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

BATCH_MAX = 200  # entries; a fuller batch is sent at once


@dataclass(frozen=True)
class Started:
    """A child as the supervisor keeps it: enough to count it in a later spawner and
    to log its exit if its own spawner dies first."""

    pid: int
    service: str
    source: str | None = None
    wait_key: str | None = None


@dataclass
class Batch:
    """One report of a spawner."""

    started: list[Started] = field(default_factory=list)
    ended: list[tuple[int, int]] = field(default_factory=list)  # (pid, wait status)
    accepted: dict[str, int] = field(default_factory=dict)  # service: connections
    refused: dict[str, dict[str, int]] = field(default_factory=dict)  # service: reason: n
    failed: dict[str, int] = field(default_factory=dict)  # service: children not started
    states: dict[str, str] = field(default_factory=dict)
    lost: int = 0  # log lines the spawner dropped since its last batch
    ready: bool = False  # the first batch: it serves every socket of its plan

    def __len__(self) -> int:
        return (len(self.started) + len(self.ended) + len(self.accepted) + len(self.refused)
                + len(self.failed) + len(self.states) + bool(self.lost) + self.ready)

    def encode(self) -> bytes:
        """The batch as one datagram."""
        return json.dumps({
            "started": [[s.pid, s.service, s.source, s.wait_key] for s in self.started],
            "ended": self.ended, "accepted": self.accepted, "refused": self.refused,
            "failed": self.failed, "states": self.states, "lost": self.lost,
            "ready": self.ready,
        }).encode()

    @classmethod
    def decode(cls, data: bytes) -> Batch:
        """A batch from one datagram."""
        raw: dict[str, Any] = json.loads(data)
        return cls(started=[Started(*entry) for entry in raw["started"]],
                   ended=[(int(pid), int(status)) for pid, status in raw["ended"]],
                   accepted=raw["accepted"], refused=raw["refused"], failed=raw["failed"],
                   states=raw["states"], lost=raw["lost"], ready=raw["ready"])


def send_note(sock: socket.socket, note: dict[str, Any]) -> bool:
    """Send one note; False when the other side is gone or its queue is full."""
    try:
        sock.send(json.dumps(note).encode())
    except OSError:
        return False
    return True


def read_notes(sock: socket.socket) -> list[dict[str, Any]] | None:
    """The notes waiting on `sock`; None once the other side has gone."""
    notes: list[dict[str, Any]] = []
    while True:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            return notes
        except OSError:
            return None
        if not data:  # an end of file stays readable: notes read before it come first
            return notes or None
        notes.append(json.loads(data))


class Reporter:
    """A spawner's side: what it notes during a wake-up goes out as one batch.

    `lost()` is how many log lines the spawner has dropped so far: a batch carries
    those it has not reported yet.
    """

    def __init__(self, link: socket.socket, lost: Callable[[], int] = lambda: 0) -> None:
        self.link = link
        self.batch = Batch()
        self.lost = lost
        self.lost_sent = 0

    def accepted(self, service: str) -> None:
        """One more connection taken for `service`."""
        accepted = self.batch.accepted
        accepted[service] = accepted.get(service, 0) + 1

    def refused(self, service: str, reason: str) -> None:
        """One more connection turned away for `service`, for `reason` (access, ...)."""
        reasons = self.batch.refused.setdefault(service, {})
        reasons[reason] = reasons.get(reason, 0) + 1

    def failed(self, service: str) -> None:
        """A child of `service` could not be started (fork or posix_spawn failed)."""
        failed = self.batch.failed
        failed[service] = failed.get(service, 0) + 1

    def started(self, started: Started) -> None:
        """A child started."""
        self.batch.started.append(started)
        self._full()

    def ended(self, pid: int, status: int) -> None:
        """A child ended with wait status `status`."""
        self.batch.ended.append((pid, status))
        self._full()

    def ready(self) -> None:
        """Every socket of the plan is served (the spawner it replaces may retire)."""
        self.batch.ready = True

    def state(self, service: str, state: str) -> None:
        """The service's state changed (listening, busy, suspended)."""
        self.batch.states[service] = state

    def _full(self) -> None:
        if len(self.batch) >= BATCH_MAX:
            self.flush()

    def flush(self) -> None:
        """Send what was noted, if anything."""
        lost = self.lost()
        if lost != self.lost_sent:
            self.batch.lost, self.lost_sent = lost - self.lost_sent, lost
        if not len(self.batch):
            return
        try:
            self.link.send(self.batch.encode())
        except OSError:
            pass  # the supervisor is gone or not reading: it has its own view to go on
        self.batch = Batch()
