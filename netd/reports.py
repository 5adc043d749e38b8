"""What a spawner and the supervisor say to each other over their socket pair.

Spawner to supervisor, in batches (at most one per BATCH_INTERVAL_S, so a busy
spawner costs the supervisor a wake-up per batch, not per connection): the children
it started and those that ended, how many connections each service accepted and
refused since the last batch, and each service's state when it changed. A change of
state, and the answer to a `sync`, go out at once.

Supervisor to spawner, as notes: `retire` (stop accepting, let the children finish,
then leave), `stop` (netd is stopping: end the children too), `ended` (children
that an earlier spawner started, and this one counts, have ended) and `sync` (send
what you have now, marked with this number: the supervisor waits for it before it
shows counters or reloads).
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from netd.loop import EventLoop, Timer

BATCH_MAX = 200          # entries; a fuller batch is sent at once
BATCH_INTERVAL_S = 0.05  # otherwise at most this often


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
    synced: int | None = None  # the answer to the supervisor's sync note of that number

    def __len__(self) -> int:
        return (len(self.started) + len(self.ended) + len(self.counts) + len(self.states)
                + self.ready + (self.synced is not None))

    def encode(self) -> bytes:
        """The batch as one datagram."""
        return json.dumps({
            "started": [[s.pid, s.service, s.source, s.wait_key] for s in self.started],
            "ended": self.ended, "counts": self.counts, "states": self.states,
            "ready": self.ready, "synced": self.synced,
        }).encode()

    @classmethod
    def decode(cls, data: bytes) -> Batch:
        """A batch from one datagram."""
        raw: dict[str, Any] = json.loads(data)
        return cls(started=[Started(*entry) for entry in raw["started"]],
                   ended=[(int(pid), int(status)) for pid, status in raw["ended"]],
                   counts=raw["counts"], states=raw["states"], ready=raw["ready"],
                   synced=raw["synced"])


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
    """A spawner's side: what it notes goes out in batches, at most one per
    BATCH_INTERVAL_S unless something is urgent (a state change, a sync)."""

    def __init__(self, link: socket.socket, loop: EventLoop) -> None:
        self.link = link
        self.loop = loop
        self.batch = Batch()
        self.urgent = False
        self.sent_s = 0.0
        self.later: Timer | None = None

    def accepted(self, service: str) -> None:
        """One more connection taken for `service`."""
        self.batch.counts.setdefault(service, [0, 0])[0] += 1

    def refused(self, service: str) -> None:
        """One more connection turned away for `service`."""
        self.batch.counts.setdefault(service, [0, 0])[1] += 1

    def started(self, started: Started) -> None:
        """A child started."""
        self.batch.started.append(started)

    def ended(self, pid: int, status: int) -> None:
        """A child ended with wait status `status`."""
        self.batch.ended.append((pid, status))

    def ready(self) -> None:
        """Every socket of the plan is served (the spawner it replaces may retire)."""
        self.batch.ready = self.urgent = True

    def state(self, service: str, state: str) -> None:
        """The service's state changed (listening, busy, suspended)."""
        self.batch.states[service] = state
        self.urgent = True

    def sync(self, number: int) -> None:
        """The supervisor waits for everything noted so far: send it now."""
        self.batch.synced = number
        self.urgent = True

    def send_due(self) -> None:
        """At the end of a wake-up: send the batch if it is urgent, full or due, else
        make sure a timer sends it when it is due."""
        if not len(self.batch):
            return
        now = time.monotonic()
        if self.urgent or len(self.batch) >= BATCH_MAX or now >= self.sent_s + BATCH_INTERVAL_S:
            self.flush()
        elif self.later is None:
            self.later = self.loop.at(self.sent_s + BATCH_INTERVAL_S, self.flush)

    def flush(self) -> None:
        """Send what was noted, if anything."""
        self.loop.cancel(self.later)
        self.later = None
        if not len(self.batch):
            return
        try:
            self.link.send(self.batch.encode())
        except OSError:
            pass  # the supervisor is gone or not reading: it has its own view to go on
        self.batch = Batch()
        self.urgent = False
        self.sent_s = time.monotonic()
