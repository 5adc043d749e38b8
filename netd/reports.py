"""What a spawner and the supervisor say to each other over their socket pair.

Spawner to supervisor, in batches (one per wake-up of the spawner that did something,
so a busy spawner costs the supervisor a wake-up per batch, not per connection): the
children it started and those that ended, how many connections each service accepted
and refused since the last batch, and each service's state when it changed.

Supervisor to spawner, as notes: `retire` (stop accepting, let the children finish,
then leave), `stop` (netd is stopping: end the children too), and `ended` (children
that an earlier spawner started, and this one counts, have ended).
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field
from typing import Any, NamedTuple

BATCH_MAX = 200  # entries; a fuller batch is sent at once


class Started(NamedTuple):
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
    counts: dict[str, list[int]] = field(default_factory=dict)  # service: [accepted, refused]
    states: dict[str, str] = field(default_factory=dict)
    ready: bool = False  # the first batch: it serves every socket of its plan

    def __len__(self) -> int:
        return (len(self.started) + len(self.ended) + len(self.counts) + len(self.states)
                + self.ready)

    def encode(self) -> bytes:
        """The batch as one datagram."""
        return json.dumps({
            "started": [[s.pid, s.service, s.source, s.wait_key] for s in self.started],
            "ended": self.ended, "counts": self.counts, "states": self.states,
            "ready": self.ready,
        }).encode()

    @classmethod
    def decode(cls, data: bytes) -> Batch:
        """A batch from one datagram."""
        raw: dict[str, Any] = json.loads(data)
        return cls(started=[Started(*entry) for entry in raw["started"]],
                   ended=[(int(pid), int(status)) for pid, status in raw["ended"]],
                   counts=raw["counts"], states=raw["states"], ready=raw["ready"])


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
    """A spawner's side: what it notes during a wake-up goes out as one batch."""

    def __init__(self, link: socket.socket) -> None:
        self.link = link
        self.batch = Batch()

    def accepted(self, service: str) -> None:
        """One more connection taken for `service`."""
        self.batch.counts.setdefault(service, [0, 0])[0] += 1

    def refused(self, service: str) -> None:
        """One more connection turned away for `service`."""
        self.batch.counts.setdefault(service, [0, 0])[1] += 1

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
        if not len(self.batch):
            return
        try:
            self.link.send(self.batch.encode())
        except OSError:
            pass  # the supervisor is gone or not reading: it has its own view to go on
        self.batch = Batch()
